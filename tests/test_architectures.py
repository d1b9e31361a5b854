"""`RateQuantCache` on tiny random models of several architectures, against `DynamicCache(config=model.config)`.

Llama (GQA), Qwen3 (q/k norms), Mistral (sliding window everywhere), Gemma-2 and Gemma-3 (alternating sliding and
full attention), Phi-3 (sliding window) and Llama-4 (chunked attention). Sliding windows are 16 tokens, so every
generation here goes well past them. Hybrid (linear-attention / SSM) architectures must be refused.
"""

from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import DynamicCache

from hf_ratequant import RateQuantCache, RateQuantConfig, RateQuantSlidingLayer

WINDOW = 16
PROMPT, NEW = 30, 30  # 60 tokens: well past the sliding window

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
    initializer_range=0.1,
)

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_hidden_layers=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(num_hidden_layers=2)),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_hidden_layers=2, sliding_window=WINDOW),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=16),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            num_hidden_layers=4,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        ),
    ),
    "phi3": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        dict(num_hidden_layers=2, sliding_window=WINDOW, head_dim=None),
    ),
    "llama4": (
        transformers.Llama4TextConfig,
        transformers.Llama4ForCausalLM,
        dict(num_hidden_layers=4, attention_chunk_size=WINDOW, intermediate_size_mlp=128, num_local_experts=2),
    ),
}
SLIDING = {"mistral", "gemma2", "gemma3", "phi3", "llama4"}


def _param(name, *marks):
    return pytest.param(name, id=name, marks=list(marks))


def _archs():
    """Every architecture, as pytest params."""
    return [_param(name) for name in ARCHS]


_MODELS = {}


def build_model(model_cls, config, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def tiny_model(name):
    """A seeded tiny model of architecture `name` (built once per session)."""
    if name not in _MODELS:
        config_cls, model_cls, extra = ARCHS[name]
        kwargs = {**COMMON, **extra}
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim")
        _MODELS[name] = build_model(model_cls, config_cls(**kwargs), seed=0)
    return _MODELS[name]


def prompt(length=PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, length), generator=g)


def generate(model, ids, cache, new_tokens=NEW, **kwargs):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        past_key_values=cache,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def held_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# ---- 16 bits: the same tokens as DynamicCache, past the sliding window ------------------------------------------
@pytest.mark.parametrize("residual_length", [0, 8, 16])
@pytest.mark.parametrize("arch", _archs())
def test_greedy_at_16_bits_equals_dynamic_past_the_window(arch, residual_length, cache_factory, tie_aware_equal):
    model = tiny_model(arch)
    ids = prompt()
    ref_cache = DynamicCache(config=model.config)
    ref, ref_logits = generate(model, ids, ref_cache)
    cache = cache_factory(model, bits=16, group_size=8, residual_length=residual_length)
    out, logits = generate(model, ids, cache)
    tie_aware_equal(out[0, PROMPT:], ref[0, PROMPT:], ref_logits[0], what=f"{arch} R={residual_length}")
    if torch.equal(out, ref):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # Same layer structure as DynamicCache builds from the config, and the same sequence lengths.
    assert cache.is_sliding == ref_cache.is_sliding
    assert any(cache.is_sliding) == (arch in SLIDING)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        assert layer.get_seq_length() == ref_layer.get_seq_length() == PROMPT + NEW - 1
        if isinstance(layer, RateQuantSlidingLayer):
            assert layer.dropped > 0, "the generation never went past the sliding window"
            assert layer.past_keys.num_tokens + layer.keys.shape[-2] >= WINDOW - 1  # it holds the whole window
    if residual_length < WINDOW - 1 or not all(cache.is_sliding):  # else the window alone spans the attention window
        assert any(layer.past_keys.num_tokens > 0 for layer in cache.layers)


# ---- 4 bits: runs, finite, and smaller than DynamicCache ---------------------------------------------------------
@pytest.mark.parametrize("arch", _archs())
def test_4_bits_runs_finite_and_is_smaller(arch, cache_factory):
    model = tiny_model(arch)
    ids = prompt()
    cache = cache_factory(model, bits=4, quantizer="kivi", group_size=8, residual_length=8)
    out, logits = generate(model, ids, cache)
    assert out.shape == (1, PROMPT + NEW)
    assert torch.isfinite(logits).all()
    assert cache.get_seq_length() == PROMPT + NEW - 1
    full_layers = [layer for layer in cache.layers if not isinstance(layer, RateQuantSlidingLayer)]
    for layer in full_layers or cache.layers:
        assert layer.past_keys.num_tokens > 0, "nothing was quantized"
    ref_cache = DynamicCache(config=model.config)
    generate(model, ids, ref_cache)
    assert cache.nbytes < held_bytes(ref_cache)


# ---- rollback on sliding-window layers (assisted / prompt-lookup decoding) ----------------------------------------
@pytest.mark.parametrize("arch", _archs())
def test_crop_then_refeed_at_16_bits_equals_uncached(arch, cache_factory):
    """Minimal form of what assisted decoding does: feed candidates, reject them, feed others."""
    model = tiny_model(arch)
    ids = prompt(40)
    with torch.no_grad():
        full = model(ids).logits
        cache = cache_factory(model, bits=16, group_size=8, residual_length=0)
        model(ids[:, :30], past_key_values=cache)
        cache.activate_past_recording()  # as generate() does after the prefill of assisted decoding
        model(torch.full((1, 4), 7), past_key_values=cache)  # 4 candidates, all rejected
        cache.crop(-4)
        assert cache.get_seq_length() == 30
        logits = model(ids[:, 30:], past_key_values=cache).logits
    torch.testing.assert_close(logits, full[:, 30:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_rollback_without_recording_is_refused(arch, cache_factory):
    """Without past recording a sliding layer drops old tokens; rolling back then cannot be exact: it must refuse."""
    model = tiny_model(arch)
    with torch.no_grad():
        cache = cache_factory(model, bits=16, group_size=8, residual_length=0)
        model(prompt(40), past_key_values=cache)
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            cache.crop(-4)


@pytest.mark.parametrize("arch", _archs())
def test_prompt_lookup_at_16_bits_matches_greedy(arch, cache_factory):
    model = tiny_model(arch)
    base = prompt(10, seed=4)
    ids = torch.cat([base, base, base[:, :5]], dim=1)
    ref, ref_logits = generate(model, ids, DynamicCache(config=model.config))
    # transformers' own cache rolls back correctly: any difference below is RateQuantCache's.
    dyn, dyn_logits = generate(model, ids, DynamicCache(config=model.config), prompt_lookup_num_tokens=3)
    assert torch.equal(dyn, ref)
    torch.testing.assert_close(dyn_logits, ref_logits, rtol=1e-4, atol=1e-4)
    cache = cache_factory(model, bits=16, group_size=8, residual_length=0)
    out, logits = generate(model, ids, cache, prompt_lookup_num_tokens=3)
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


# ---- architectures the cache cannot serve -------------------------------------------------------------------------
def _fake_hybrid():
    return SimpleNamespace(
        architectures=["FakeHybridForCausalLM"],
        model_type="fake_hybrid",
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    )


UNSUPPORTED = [
    pytest.param(lambda: transformers.Qwen3NextConfig(num_hidden_layers=4), r"qwen3_next", id="qwen3_next"),
    pytest.param(lambda: transformers.JambaConfig(num_hidden_layers=4), r"jamba", id="jamba"),
    pytest.param(lambda: transformers.FalconH1Config(num_hidden_layers=2), r"falcon_h1", id="falcon_h1"),
    pytest.param(_fake_hybrid, r"FakeHybridForCausalLM", id="fake_linear_attention"),
    pytest.param(
        lambda: transformers.MambaConfig(num_hidden_layers=2),
        r"mamba",
        id="mamba",
    ),
]


@pytest.mark.parametrize("make_config, name", UNSUPPORTED)
def test_unsupported_architecture_is_refused(make_config, name):
    config = make_config()
    with pytest.raises(ValueError, match=name):
        quant_config = RateQuantConfig.uniform(config, bits=4, group_size=8, residual_length=8)
        RateQuantCache(config=config, quant_config=quant_config)
    # A table of the right shape made without the model is refused too, when the model's config is given.
    table = [[4, 4]]
    with pytest.raises(ValueError, match=name):
        RateQuantCache(config=config, quant_config=RateQuantConfig(key_bits=table, value_bits=table))


def test_unsupported_message_names_the_layer_types():
    config = _fake_hybrid()
    quant_config = RateQuantConfig.uniform(config, bits=4, group_size=8, residual_length=8)
    with pytest.raises(ValueError, match=r"FakeHybridForCausalLM.*linear_attention.*full_attention"):
        RateQuantCache(config=config, quant_config=quant_config)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", _archs())
def test_every_architecture_honours_the_split_mask(arch, implementation):
    """Calibration weights the error by attention to the quantized keys only when the model honours the split mask
    (`residual_split_works`); every supported architecture does, past its sliding window or chunk."""
    from hf_ratequant.calibration import residual_split_works

    model = tiny_model(arch)
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation(implementation)
    except ValueError:  # Gemma 2 has no SDPA attention
        pytest.skip(f"{arch} has no {implementation} attention")
    try:
        assert residual_split_works(model, prompt(64).expand(2, -1), residual_length=8, group_size=4)
    finally:
        model.set_attn_implementation(original)


@pytest.mark.parametrize("arch", _archs())
def test_the_measure_recomputing_only_far_columns_equals_the_models_own_attention(arch, monkeypatch):
    """The attention-output measure recomputes a layer's attention for every option; where the layer's attention is
    plain softmax attention (checked against its own output) only the far columns are recomputed
    (`SplitAttention`). The table is the one the model's own attention gives over every column; Gemma 2's logit
    soft-capping is not plain softmax, so it keeps the model's attention."""
    import hf_ratequant.calibration as calibration
    from hf_ratequant.calibration import capture_states, measure_distortions
    from hf_ratequant.split_attention import SplitAttention

    model = tiny_model(arch)
    ids = prompt(64).expand(2, -1).clone()
    ids[1] = prompt(64, seed=1)
    split = dict(residual_length=8, group_size=8, sink_length=8)
    states = capture_states(model, ids, attention=True, **split)
    uses_split = [isinstance(row[4][0], SplitAttention) for row in states]
    assert uses_split == [arch != "gemma2"] * len(states)

    kwargs = dict(bit_grid=[1, 2, 3, 4], batch_size=2, progress=False, **split)
    monkeypatch.setattr(calibration, "ATTEND_BLOCK", 16)  # several blocks of queries
    fast = measure_distortions(model, ids, ["kivi", "token"], **kwargs)
    monkeypatch.setattr(calibration, "SPLIT_ATTENTION", False)
    reference = measure_distortions(model, ids, ["kivi", "token"], **kwargs)
    for name, table in reference.items():
        torch.testing.assert_close(fast[name], table, rtol=1e-4, atol=1e-12)
