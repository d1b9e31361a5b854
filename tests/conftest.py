"""Shared fixtures: an offline, isolated Hugging Face cache, tiny seeded local models and a `RateQuantCache` factory.

Nothing here touches the network or the user's Hub cache; every model is built from a config with random weights.
"""

import copy
import os

import pytest
import torch

# Triton kernels run under Triton's interpreter where there is no GPU (decided when a kernel is defined, so before
# hf_ratequant.triton_kernels is imported); a kernel that fails raises instead of falling back.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_RATEQUANT_STRICT_KERNELS", "1")
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ratequant import RateQuantCache, RateQuantConfig

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    # Token 0 pads; no EOS, so generation always runs to `max_new_tokens`.
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
    # Wider than the default 0.02 so that the top-2 logits of the random model are rarely near-ties.
    initializer_range=0.1,
)


@pytest.fixture(autouse=True)
def _offline_isolated_hf(monkeypatch, tmp_path):
    """Point every Hugging Face cache at a temporary folder and forbid network access."""
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


def build_model(model_cls, config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A model with seeded random weights, in eval mode, without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model and its tokenizer, loaded once per session (about 20 s)."""
    from hf_ratequant import load_default_model

    return load_default_model()


@pytest.fixture
def smollm_cli(smollm, monkeypatch):
    """`hf-ratequant` subcommands get the already loaded default model instead of loading it again."""
    monkeypatch.setattr("hf_ratequant.models.load_model", lambda *a, **k: smollm)
    return smollm


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer GQA Llama (4 query heads, 2 kv-heads, head_dim 32), seeded, fp32, eval. Do not mutate it."""
    return build_model(LlamaForCausalLM, LlamaConfig(**TINY_LLAMA), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_assistant():
    """A 1-layer Llama with the same vocabulary as `tiny_llama`, for assisted decoding."""
    return build_model(LlamaForCausalLM, LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 1}), seed=1)


def make_cache(
    model,
    bits: int | None = 4,
    quantizer: str = "kivi",
    key_bits=None,
    value_bits=None,
    residual_length: int = 16,
    group_size: int = 8,
    sink_length: int = 0,
) -> RateQuantCache:
    """A `RateQuantCache` for `model` (no sink tokens unless asked: most tests are about the packed past).

    `key_bits` / `value_bits` may be integers (a uniform split of keys and values) or `num_layers x num_kv_heads`
    tables (a per-head allocation); otherwise every unit gets `bits`.
    """
    if isinstance(key_bits, (list, tuple)) or isinstance(value_bits, (list, tuple)):
        quant_config = RateQuantConfig(
            key_bits=key_bits,
            value_bits=value_bits,
            quantizer=quantizer,
            group_size=group_size,
            residual_length=residual_length,
            sink_length=sink_length,
        )
    else:
        quant_config = RateQuantConfig.uniform(
            model.config,
            bits=bits,
            key_bits=key_bits,
            value_bits=value_bits,
            quantizer=quantizer,
            group_size=group_size,
            residual_length=residual_length,
            sink_length=sink_length,
        )
    return RateQuantCache(config=model.config, quant_config=quant_config)


@pytest.fixture
def cache_factory():
    """`cache_factory(model, bits=4, quantizer="kivi", key_bits=None, value_bits=None, residual_length=16,
    group_size=8, sink_length=0)` -> a fresh `RateQuantCache`."""
    return make_cache


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def device(request) -> str:
    """Every device the tests can run on: "cpu", and "cuda" when a GPU is available."""
    return request.param


@pytest.fixture
def tiny_llama_on(tiny_llama, device):
    """`tiny_llama` on `device` (a copy when that is not the CPU, so the session model is never moved)."""
    return tiny_llama if device == "cpu" else copy.deepcopy(tiny_llama).to(device)


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first position where the 1-D token sequences `a` and `b` differ, or None."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a != b).nonzero()
    return None if diff.numel() == 0 else int(diff[0, 0])


def assert_tie_aware_equal(tokens, ref_tokens, ref_logits, tol: float = 1e-2, what: str = "") -> None:
    """Greedy `tokens` must equal `ref_tokens`, or first differ at a step where the reference's top-2 logit margin is
    below `tol` (a near-tie that a tiny numerical difference can legitimately flip).

    Args:
        tokens, ref_tokens (`torch.Tensor`): the generated tokens only, `(new_tokens,)`.
        ref_logits (`torch.Tensor`): the reference's raw logits at each generation step, `(new_tokens, vocab)`.
    """
    tokens, ref_tokens, ref_logits = tokens.cpu(), ref_tokens.cpu(), ref_logits.float().cpu()
    step = first_divergence(tokens, ref_tokens)
    if step is None:
        return
    top2 = ref_logits[step].topk(2).values
    margin = float(top2[0] - top2[1])
    assert margin < tol, (
        f"{what}: greedy output diverges from the reference at new token {step} although the reference's top-2 "
        f"margin there is {margin:.4g} (>= {tol}): {tokens.tolist()} vs {ref_tokens.tolist()}"
    )


@pytest.fixture
def tie_aware_equal():
    """The `assert_tie_aware_equal(tokens, ref_tokens, ref_logits, tol=1e-2, what="")` helper."""
    return assert_tie_aware_equal
