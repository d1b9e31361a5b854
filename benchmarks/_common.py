"""What every benchmark records about the machine it ran on (results are only comparable on the same machine)."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine(device: torch.device | str = "cpu", packages: tuple[str, ...] = ()) -> dict:
    """CPU, cores, torch threads, library versions, the GPU when there is one, and the load average at the start."""
    device = torch.device(device)
    info = dict(
        cpu=cpu_name(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=dist_version("transformers"),
        python=platform.python_version(),
        device=str(device),
        load_average_start=load_average(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in packages:
        info[name] = dist_version(name)
    return info


# Architectures of real checkpoints, for timing on a machine that cannot download them: decode speed and cache
# memory depend on the shapes (layers, heads, head_dim, hidden size), not on the values of the weights.
RANDOM_PRESETS = {
    "qwen3-8b": (
        "Qwen3Config",
        dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
             rope_theta=1e6, tie_word_embeddings=False),
    ),
    "llama-3.1-8b": (
        "LlamaConfig",
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
             rope_theta=5e5, tie_word_embeddings=False),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
             rope_theta=5e5, tie_word_embeddings=True),
    ),
}
MODEL_HELP = (
    "'smollm2' (the embedded default), a Hub id or folder, or 'random:NAME' for the architecture of a real\n"
    f"checkpoint with random weights (timing only; NAME in {', '.join(RANDOM_PRESETS)})"
)


def load_benchmark_model(spec: str, dtype: torch.dtype, device: torch.device):
    """`(model, tokenizer or None, name)` on `device`: see `MODEL_HELP`. A random model has no tokenizer; its
    inputs are random token ids (`benchmark_ids`)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from hf_ratequant.models import load_model

    if not spec.startswith("random:"):
        model, tokenizer = load_model(spec, dtype=dtype)
        return model.to(device), tokenizer, model.config._name_or_path
    name = spec.split(":", 1)[1]
    if name not in RANDOM_PRESETS:
        raise SystemExit(f"Unknown random model {name!r}: choose one of {', '.join(RANDOM_PRESETS)}.")
    cls_name, kwargs = RANDOM_PRESETS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._name_or_path = f"{name} architecture, random weights"
    return model.eval(), None, model.config._name_or_path


def benchmark_ids(tokenizer, model, text_spec: str, seq_len: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """`(1, seq_len)` input ids from `text_spec` through `tokenizer`, or seeded random ids for a random model."""
    from hf_ratequant.data import load_text, tokenize_windows

    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(100, model.config.vocab_size, (1, seq_len), generator=gen)
        return ids.to(device), "random token ids (seed 0)"
    text, source = load_text(text_spec)
    return tokenize_windows(tokenizer, text, seq_len=seq_len, n_windows=1).to(device), source


def time_fwd_bwd(model, ids: torch.LongTensor, batch_size: int) -> dict:
    """One plain forward + backward pass (every parameter requiring grad, `loss.backward()`) over `ids`."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        model.eval()  # calibration runs in eval mode too
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with torch.enable_grad():
            for batch in torch.split(ids, batch_size):
                out = model(input_ids=batch, labels=batch, use_cache=False)
                out.loss.backward()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return dict(wall_s=wall, cpu_s=cpu, tokens=int(ids.numel()), batch_size=batch_size)
