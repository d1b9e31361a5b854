"""Numerics: half-precision models and states, huge outliers, inf/NaN, degenerate prompts, and "every token is
quantized exactly once".

fp32 quantizer properties are in `test_quantizers.py` and the decoding modes in `test_generate.py`; this file adds
what only shows up in bfloat16/float16, at the edges of the float16 range, and with unusual inputs.
"""

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from hf_ratequant import RateQuantCache, RateQuantConfig, available_quantizers
from hf_ratequant.quantizers import NonFiniteError, Quantizer, get_quantizer, unpack

QUANTIZERS = available_quantizers()
HALF = (torch.bfloat16, torch.float16)
KINDS = ("key", "value")
MIXED_KEY_BITS = [[8, 2], [3, 16]]
MIXED_VALUE_BITS = [[4, 4], [1, 5]]
FP16_MAX = torch.finfo(torch.float16).max  # 65504
# Rounding to nearest moves a value by at most UNIT_ROUNDOFF * |value| (directed rounding: twice that), or among
# subnormals by at most SUBNORMAL (the spacing of subnormals).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SUBNORMAL = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
# How far the tiny model's logits may move with an 8-bit cache, about twice what was measured over several prompts
# for every quantizer (a 6-bit cache already moves them up to 0.13 in bfloat16 and 0.12 in float16, 4 bits up to 0.4).
LOGIT_GAP_8_BITS = {torch.bfloat16: 0.08, torch.float16: 0.05}


# ---- helpers ----------------------------------------------------------------------------------------------------
def prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random token ids in [3, 128): never the pad token (0)."""
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, cache, new_tokens, attention_mask=None, **kwargs):
    """Greedy decoding; returns `(sequences, logits (batch, new_tokens, vocab))`."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        past_key_values=cache,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def forward(model, ids, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


def assert_quantized(cache: RateQuantCache) -> None:
    for i, layer in enumerate(cache.layers):
        assert layer.past_keys.num_tokens > 0, f"layer {i}: nothing was quantized, the test exercises nothing"


@pytest.fixture(scope="module")
def half_llamas(tiny_llama):
    """`tiny_llama` in bfloat16 and in float16 (copies: the session model stays fp32)."""
    return {dtype: copy.deepcopy(tiny_llama).to(dtype) for dtype in HALF}


def check_reconstruction(q: Quantizer, x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    """Quantize and dequantize `x` and check everything the design promises. Returns |y - x|.

    - shapes, dtypes and devices are preserved, scale, zero-point and reconstruction are finite;
    - the zero-point is the group minimum rounded down (exact for kivi and token: the minimum is a value of x), the
      scale covers the group (zero + qmax * scale >= max) and is at most one rounding above what that needs, or the
      dtype's largest value where that is too small (float16, 1 bit);
    - in the quantizer's space (rotated for "rotated"), the codes reconstruct every value within half a step: the
      stored scale, or the exact step where the stored one saturated (then the top of the group is clipped by at
      most that much);
    - the returned tensor is that reconstruction rotated back, rounded once to the dtype (saturating at the float16
      range, which only brings it closer to x).
    """
    block = q.quantize(x, bits, kind)
    y = q.dequantize(block, kind)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert block.scale.dtype == block.zero.dtype == x.dtype
    assert block.codes.device == block.scale.device == x.device
    assert torch.isfinite(block.scale).all() and torch.isfinite(block.zero).all() and torch.isfinite(y).all()

    dtype, qmax = x.dtype, (1 << bits) - 1
    u, tiny, fmax = UNIT_ROUNDOFF[dtype], SUBNORMAL[dtype], torch.finfo(dtype).max
    groups = q._to_groups(q._rotate(x.float()), kind)  # (B, H, T // tb, n_groups, group_len)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    zero, scale = block.zero.float().unsqueeze(-1), block.scale.float().unsqueeze(-1)
    assert (zero <= lo).all() and (lo - zero <= 2 * u * lo.abs() + tiny).all()  # directed: at most one ulp
    if not q.rotates:
        assert torch.equal(zero, lo)
    slack = 2e-6 * torch.maximum(lo.abs(), hi.abs())  # float32 arithmetic (and rotation) on the way
    needed = (hi - zero) / qmax
    saturated = needed > fmax
    assert (scale[saturated] == fmax).all() and (dtype == torch.float16 or not saturated.any())
    assert (saturated | (zero + qmax * scale >= hi - slack)).all()
    assert (saturated | (scale <= needed * (1 + 2 * u) + tiny)).all()

    codes = q._to_groups(unpack(block.codes, bits, x.shape[-1]), kind).float()
    recon = zero + codes * scale  # the reconstruction in the quantizer's space, float32
    step = torch.where(saturated, (hi - lo) / qmax, scale)
    worst = ((recon - groups).abs() / (step / 2 + slack)).max().item()
    assert worst <= 1, f"{q.name} {kind} {bits} bits {dtype}: error up to {worst:.3f} x half a step"

    expected = q._unrotate(q._from_groups(recon, kind, x.shape)).clamp(-fmax, fmax)
    rounding = u * expected.abs() + tiny
    if q.rotates:  # float32 slack of the rotation, which mixes a whole row
        rounding = rounding + 2e-6 * expected.abs().amax(-1, keepdim=True)
        if x.device.type != "cpu":  # there dequantization rotates back in the dtype: every term of a row is rounded
            rounding = rounding + 2 * u * q._from_groups(recon.abs().sum(-1, keepdim=True), kind, x.shape[:-1] + (1,))
    assert ((y.float() - expected).abs() <= rounding).all(), "the output is not the reconstruction, rounded once"
    return (y.float() - x.float()).abs()


# ---- bfloat16 / float16 models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_generate_with_mixed_bits(half_llamas, cache_factory, dtype, quantizer):
    model = half_llamas[dtype]
    cache = cache_factory(
        model, quantizer=quantizer, key_bits=MIXED_KEY_BITS, value_bits=MIXED_VALUE_BITS, residual_length=8
    )
    out, logits = greedy(model, prompt(30, batch=2), cache, 24)
    assert out.shape == (2, 54)
    assert torch.isfinite(logits).all()  # (generate returns float32 logits)
    assert_quantized(cache)
    for layer in cache.layers:
        assert layer.keys.dtype == layer.values.dtype == dtype
        for groups in (layer.past_keys, layer.past_values):
            for (bits, _, _), data in zip(groups.classes, groups.data):
                assert (data.dtype if bits == 16 else data.scale.dtype) == dtype
    for keys, values, _ in cache:
        assert keys.dtype == values.dtype == dtype and keys.shape[-2] == 53
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_8_bits_matches_dynamic_tie_aware(
    half_llamas, cache_factory, tie_aware_equal, dtype, quantizer
):
    model = half_llamas[dtype]
    ids = prompt(40)
    cache = cache_factory(model, bits=8, quantizer=quantizer, residual_length=0)
    out, logits = greedy(model, ids, cache, 30)
    ref, ref_logits = greedy(model, ids, DynamicCache(config=model.config), 30)
    assert_quantized(cache)
    # Up to the first differing token (included) both runs saw the same tokens: their logits must be close...
    differ = (out[0, 40:] != ref[0, 40:]).nonzero()
    steps = 30 if differ.numel() == 0 else int(differ[0, 0]) + 1
    gap = (logits[0, :steps] - ref_logits[0, :steps]).abs().max().item()
    assert gap <= LOGIT_GAP_8_BITS[dtype], f"8-bit logits differ by {gap:.4f} from DynamicCache's in {dtype}"
    # ... and greedy may only flip a near-tie that this gap can flip.
    tie_aware_equal(out[0, 40:], ref[0, 40:], ref_logits[0], tol=2 * gap + 1e-6, what=f"{quantizer} 8 bits {dtype}")


# ---- quantizer properties in bfloat16 / float16 -----------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(QUANTIZERS),
    dtype=st.sampled_from(HALF),
    kind=st.sampled_from(KINDS),
    bits=st.integers(1, 8),
    group=st.sampled_from([8, 16]),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.sampled_from([16, 32, 48, 64])),
    magnitude=st.floats(-4, 4),
    outliers=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_half_precision_reconstruction_within_half_a_step(
    device, name, dtype, kind, bits, group, shape, magnitude, outliers, seed
):
    b, h, blocks, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, blocks * group, d, generator=g) * 10**magnitude
    if outliers:  # one channel and one token 1e4 times larger (clipped to the float16 range)
        x[..., int(torch.randint(d, (1,), generator=g))] *= 1e4
        x[..., int(torch.randint(blocks * group, (1,), generator=g)), :] *= 1e4
    x = x.clamp(-FP16_MAX, FP16_MAX).to(device=device, dtype=dtype)
    check_reconstruction(get_quantizer(name, group_size=group), x, bits, kind)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(QUANTIZERS),
    dtype=st.sampled_from(HALF),
    kind=st.sampled_from(KINDS),
    bits=st.integers(1, 8),
    magnitude=st.floats(-4, 4.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_half_precision_constant_groups_are_exact(device, name, dtype, kind, bits, magnitude, seed):
    q = get_quantizer(name, group_size=8)
    shape = (2, 2, 16, 32)
    g = torch.Generator().manual_seed(seed)
    if q.rotates:  # a constant row c rotates to (c, 0, ..., 0): not constant, only within half a step (1 bit: exact)
        x = (torch.randn(2, 2, 16, 1, generator=g) * 10**magnitude).expand(shape)
        x = x.clamp(-FP16_MAX, FP16_MAX).to(device=device, dtype=dtype).contiguous()
        err = check_reconstruction(q, x, bits, kind)
        assert bits > 1 or (err == 0).all()
        return
    # One random constant per group of the design, laid out back into (B, H, T, D).
    groups = q._to_groups(torch.empty(shape), kind)
    c = torch.randn(*groups.shape[:-1], 1, generator=g) * 10**magnitude
    x = q._from_groups(c.expand_as(groups).contiguous(), kind, shape)
    x = x.clamp(-FP16_MAX, FP16_MAX).to(device=device, dtype=dtype).contiguous()
    y = q.dequantize(q.quantize(x, bits, kind), kind)
    assert y.dtype == dtype and y.device == x.device and torch.equal(y, x)


# ---- huge outliers ----------------------------------------------------------------------------------------------
def outlier_states(dtype: torch.dtype, tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """`(1, 2, tokens, 64)` states with the pathologies of real activations, scaled to the edge of `dtype`.

    Two outlier channels and one outlier token x1e4; in float16 also values at +-65504 in one group (a range of
    131008, which no float16 scale at 1 bit can hold) and a whole token row near 6e4 (an orthonormal rotation would
    make it 4.8e5).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, tokens, 64, generator=g)
    x[..., [3, 40]] *= 1e4
    x[..., 17, :] *= 1e4
    if dtype == torch.float16:
        x[0, 0, 0, 0], x[0, 0, 1, 0] = FP16_MAX, -FP16_MAX  # one key group of channel 0, one value group of token 0-1
        x[0, 0, 0, 1:8] = -FP16_MAX
        x[0, 1, 5, :] = 6e4 + torch.rand(64, generator=g) * 1e3
        x[0, 1, 6, :] = -6e4 - torch.rand(64, generator=g) * 1e3
    return x.clamp(-FP16_MAX, FP16_MAX).to(dtype)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_outliers_at_the_edge_of_the_dtype(dtype, name, kind, bits):
    q = get_quantizer(name, group_size=32)
    x = outlier_states(dtype)
    err = check_reconstruction(q, x, bits, kind)
    if not q.rotates:  # overall, no element is off by more than half the widest possible step (a range of 2 max|x|)
        assert err.max().item() <= x.float().abs().max().item() / ((1 << bits) - 1) * (1 + 2 * UNIT_ROUNDOFF[dtype])


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_outliers_through_the_cache_stay_finite(tiny_llama, dtype, quantizer):
    """Prefill and decode updates, as the model makes them, with outlier states at every bit-width in one cache."""
    table = [[1, 2], [4, 8]]
    cache = RateQuantCache(
        config=tiny_llama.config,
        quant_config=RateQuantConfig(
            key_bits=table, value_bits=table, quantizer=quantizer, group_size=32, residual_length=32
        ),
    )
    states = outlier_states(dtype, tokens=160)[..., :32]  # (1, 2, 160, 32): 2 kv-heads, head_dim 32
    for layer_idx in range(2):
        keys, values = cache.update(states[:, :, :100], states[:, :, :100].flip(-1), layer_idx)
        for t in range(100, 160):
            keys, values = cache.update(states[:, :, t : t + 1], states[:, :, t : t + 1].flip(-1), layer_idx)
        assert keys.dtype == values.dtype == dtype and keys.shape[-2] == 160
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
        if quantizer == "rotated":  # its error is bounded in the rotated space (test_outliers_at_the_edge_of_...)
            continue
        # Each head is as accurate as its bits allow: half a step of a range of at most 2 max|x| (+ rounding).
        scale = states.float().abs().amax((0, 2, 3))
        for head, bits in enumerate(table[layer_idx]):
            err = (keys[:, head].float() - states[:, head].float()).abs().max().item()
            assert err <= scale[head].item() / ((1 << bits) - 1) * (1 + 4 * UNIT_ROUNDOFF[dtype])
    assert_quantized(cache)


# ---- inf / NaN reaching the cache --------------------------------------------------------------------------------
class inject_inf:
    """Context manager: the output of `proj` ("k_proj" or "v_proj") of layer 1 gets inf at token `position` of the
    next forward call (the first `calls` calls), through a forward hook removed on exit."""

    def __init__(self, model, proj: str, position: int, calls: int = 1):
        self.module = getattr(model.model.layers[1].self_attn, proj)
        self.position, self.calls = position, calls

    def hook(self, module, inputs, output):
        if self.calls > 0 and output.shape[1] > self.position:
            self.calls -= 1
            output = output.clone()
            output[:, self.position, :4] = float("inf")  # a few channels of kv-head 0 (head_dim 32)
            return output

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("kind", ["keys", "values"])
def test_non_finite_states_are_refused_when_quantized(tiny_llama, cache_factory, quantizer, kind):
    cache = cache_factory(tiny_llama, bits=4, quantizer=quantizer, residual_length=8)
    proj = "k_proj" if kind == "keys" else "v_proj"
    # Position 3 of a 40-token prompt leaves the window (R=8, G=8) during prefill: refused at once.
    with inject_inf(tiny_llama, proj, position=3), pytest.raises(ValueError) as info:
        forward(tiny_llama, prompt(40), cache)
    assert isinstance(info.value, NonFiniteError)
    message = str(info.value)
    # keys: inf through RoPE (inf * cos - inf * sin) becomes NaN or inf; values stay inf.
    pattern = r"layer 1 keys contain (NaN|inf)" if kind == "keys" else r"layer 1 values contain inf \(4 values\)"
    assert re.search(pattern, message), message
    assert "kv-heads [0] at token positions 3, which are leaving" in message and "wider dtype" in message
    # Layer 0 (before the bad one) took the prompt; layer 1 was left as it was (empty), nothing half-stored.
    assert cache.layers[0].get_seq_length() == 40
    layer = cache.layers[1]
    assert layer.get_seq_length() == 0 and layer.past_keys.num_tokens == layer.past_values.num_tokens == 0


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_non_finite_states_in_the_window_pass_through_until_they_leave_it(tiny_llama, cache_factory, quantizer):
    ids = prompt(40)
    cache = cache_factory(tiny_llama, bits=4, quantizer=quantizer, residual_length=16)
    ref = DynamicCache(config=tiny_llama.config)
    # A 12-token prompt stays in the window (R=16): held as is, exactly like DynamicCache holds it.
    with inject_inf(tiny_llama, "v_proj", position=3, calls=2):
        logits, ref_logits = forward(tiny_llama, ids[:, :12], cache), forward(tiny_llama, ids[:, :12], ref)
    assert not torch.isfinite(ref_logits).all()  # (even masked positions: 0 * inf is NaN in the attention matmul)
    torch.testing.assert_close(logits, ref_logits, equal_nan=True)
    # Decoding goes on (with non-finite logits, as with DynamicCache) until token 3 leaves the window: when it holds
    # R + G = 24 tokens, i.e. at the 12th decode step.
    for t in range(12, 23):
        step = ids[:, t : t + 1]
        torch.testing.assert_close(forward(tiny_llama, step, cache), forward(tiny_llama, step, ref), equal_nan=True)
    with pytest.raises(NonFiniteError, match=r"layer 1 values contain inf \(4 values\) in kv-heads \[0\] at token "
                       r"positions 3, which"):
        forward(tiny_llama, ids[:, 23:24], cache)
    assert [layer.get_seq_length() for layer in cache.layers] == [24, 23]
    # Cropping back to before the bad token makes the cache consistent and finite again.
    cache.crop(3)
    assert [layer.get_seq_length() for layer in cache.layers] == [3, 3]
    assert torch.isfinite(forward(tiny_llama, ids[:, 3:40], cache)).all()
    assert cache.get_seq_length() == 40
    assert_quantized(cache)


def test_non_finite_states_in_16_bit_heads_are_held_as_dynamic_cache_does(tiny_llama, cache_factory):
    cache = cache_factory(tiny_llama, key_bits=[[4, 4], [4, 4]], value_bits=[[4, 4], [16, 4]], residual_length=8)
    ref = DynamicCache(config=tiny_llama.config)
    with inject_inf(tiny_llama, "v_proj", position=3, calls=2):
        logits, ref_logits = forward(tiny_llama, prompt(40), cache), forward(tiny_llama, prompt(40), ref)
    assert torch.equal(torch.isfinite(logits), torch.isfinite(ref_logits))
    assert cache.get_seq_length() == 40
    assert_quantized(cache)


# ---- degenerate prompts -----------------------------------------------------------------------------------------
def test_empty_prompt_is_refused_and_the_cache_stays_usable(tiny_llama, cache_factory):
    cache = cache_factory(tiny_llama, bits=3, residual_length=8)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"0 new tokens.*input_ids of shape \(batch, 0\).*BOS"):
        tiny_llama.generate(empty, attention_mask=empty, max_new_tokens=4, past_key_values=cache, do_sample=False)
    with pytest.raises(ValueError, match="0 new tokens"):
        forward(tiny_llama, empty, cache)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    # Not corrupted: it then generates exactly what a fresh cache generates.
    ids = prompt(20)
    out, _ = greedy(tiny_llama, ids, cache, 20)
    ref, _ = greedy(tiny_llama, ids, cache_factory(tiny_llama, bits=3, residual_length=8), 20)
    assert torch.equal(out, ref)
    assert_quantized(cache)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_one_token_prompt(tiny_llama, cache_factory, quantizer):
    ids = prompt(1)
    out16, _ = greedy(tiny_llama, ids, cache_factory(tiny_llama, bits=16, quantizer=quantizer, residual_length=8), 40)
    ref, _ = greedy(tiny_llama, ids, DynamicCache(config=tiny_llama.config), 40)
    assert torch.equal(out16, ref)
    cache = cache_factory(tiny_llama, bits=3, quantizer=quantizer, residual_length=8)
    out, logits = greedy(tiny_llama, ids, cache, 40)
    assert out.shape == (1, 41) and torch.isfinite(logits).all()
    assert cache.get_seq_length() == 40
    assert_quantized(cache)


def _left_padded(prompts: list[torch.Tensor]):
    width = max(p.shape[-1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[-1] :], mask[i, width - p.shape[-1] :] = p[0], 1
    return ids, mask


def test_batch_of_very_different_prompt_lengths(tiny_llama, cache_factory, tie_aware_equal):
    """3 and 150 tokens, left-padded, with R = 16: the long row is mostly quantized, the short one mostly padding."""
    prompts = [prompt(3, seed=1), prompt(150, seed=2)]
    ids, mask = _left_padded(prompts)
    cache = cache_factory(tiny_llama, bits=16, residual_length=16)
    out, _ = greedy(tiny_llama, ids, cache, 20, attention_mask=mask, pad_token_id=0)
    assert_quantized(cache)
    for row, p in enumerate(prompts):
        alone, alone_logits = greedy(tiny_llama, p, cache_factory(tiny_llama, bits=16, residual_length=16), 20)
        tie_aware_equal(out[row, 150:], alone[0, p.shape[-1] :], alone_logits[0], what=f"row {row}")
    for quantizer in QUANTIZERS:
        cache = cache_factory(tiny_llama, bits=3, quantizer=quantizer, residual_length=16)
        out, logits = greedy(tiny_llama, ids, cache, 20, attention_mask=mask, pad_token_id=0)
        assert out.shape == (2, 170) and torch.equal(out[:, :150], ids)
        assert torch.isfinite(logits).all()
        assert_quantized(cache)


# ---- every token is quantized exactly once -----------------------------------------------------------------------
class QuantizeSpy:
    """Context manager recording which (layer, keys/values, kv-head, position) every `quantizer.quantize` call of
    `cache` receives: each quantized row is looked up among all the states the layer was given.

    Values of the same token are the same wherever it occurs in the first layer (they do not depend on the position,
    unlike keys, which are rotated by RoPE), so a forward hook writes the token's position into channel 0 of every
    kv-head's value: every state row is then unique. (This changes what the model computes, which does not matter
    here.)
    """

    def __init__(self, model, cache: RateQuantCache):
        self.model, self.cache = model, cache
        self.history = {i: {"key": [], "value": []} for i in range(len(cache.layers))}
        self.seen: dict[tuple[int, str, int], list[int]] = {}
        self.chunks: list[int] = []
        self.current = None

    def __enter__(self):
        quantizer = self.cache.layers[0].quantizer
        assert all(layer.quantizer is quantizer for layer in self.cache.layers)
        original_quantize = quantizer.quantize

        def quantize(x, bits, kind):
            self.record(x, kind)
            return original_quantize(x, bits, kind)

        quantizer.quantize = quantize
        for i, layer in enumerate(self.cache.layers):
            layer.update = self.wrap_update(i, layer.update)
        head_dim = self.model.config.head_dim
        self.handles = []
        for layer in self.model.model.layers:
            counter = [0]

            def tag_positions(module, inputs, output, counter=counter):
                output = output.clone()
                n = output.shape[1]
                output[..., ::head_dim] = torch.arange(counter[0], counter[0] + n, dtype=output.dtype)[:, None]
                counter[0] += n
                return output

            self.handles.append(layer.self_attn.v_proj.register_forward_hook(tag_positions))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        del self.cache.layers[0].quantizer.quantize  # the instance attributes set above: back to the methods
        for layer in self.cache.layers:
            del layer.update

    def wrap_update(self, i, update):
        def wrapped(key_states, value_states, *args, **kwargs):
            self.history[i]["key"].append(key_states.clone())
            self.history[i]["value"].append(value_states.clone())
            self.current = i
            return update(key_states, value_states, *args, **kwargs)

        return wrapped

    def record(self, x, kind):
        states = torch.cat(self.history[self.current][kind], dim=2)  # (batch, kv_heads, tokens so far, head_dim)
        self.chunks.append(x.shape[2])
        for j in range(x.shape[1]):
            # (kv_heads, chunk tokens, tokens so far): which stored state each quantized row is.
            same = (states[:, :, None] == x[:, j][:, None, :, None]).all(-1).all(0)
            for row in range(x.shape[2]):
                hits = same[:, row].nonzero().tolist()  # [[head, position]]
                assert len(hits) == 1, f"a quantized row matches {len(hits)} states"
                head, position = hits[0]
                self.seen.setdefault((self.current, kind, head), []).append(position)


@pytest.mark.parametrize("sinks", [0, 16])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_token_is_quantized_exactly_once(tiny_llama, quantizer, sinks):
    r, g, prompt_len, new = 16, 8, 45, 150
    quant = RateQuantConfig(key_bits=MIXED_KEY_BITS, value_bits=MIXED_VALUE_BITS, quantizer=quantizer, group_size=g,
                            residual_length=r, sink_length=sinks)
    cache = RateQuantCache(config=tiny_llama.config, quant_config=quant)
    with QuantizeSpy(tiny_llama, cache) as spy:
        out = tiny_llama.generate(
            prompt(prompt_len, batch=2),
            attention_mask=torch.ones(2, prompt_len, dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            past_key_values=cache,
        )
    total = prompt_len + new - 1  # the last generated token is never fed back
    assert out.shape[1] == prompt_len + new and cache.get_seq_length() == total
    for i, layer in enumerate(cache.layers):
        window = layer.keys.shape[-2]
        assert r <= window < r + g
        left = total - window  # the tokens that left the window
        assert layer.past_keys.num_tokens == layer.past_values.num_tokens == left
        for kind, bits_per_head in (("key", MIXED_KEY_BITS[i]), ("value", MIXED_VALUE_BITS[i])):
            for head, bits in enumerate(bits_per_head):
                positions = spy.seen.get((i, kind, head), [])
                if bits == 16:  # kept as is: never goes through the quantizer
                    assert positions == []
                else:  # each position that left the window exactly once, in order, and nothing else
                    assert positions == list(range(sinks, left)), (i, kind, head)  # the sinks: never
        if sinks:  # kept exactly as the first update gave them
            assert torch.equal(layer.past_keys.sink, spy.history[i]["key"][0][:, :, :sinks])
    # Prefill quantizes its whole groups (after the sinks) in one call; then every call is one group of G tokens.
    first_flush = (prompt_len - r) // g * g
    assert set(spy.chunks) == {c for c in (first_flush - sinks, g) if c}


def test_transformers_quantized_cache_requantizes_old_tokens(tiny_llama, monkeypatch):
    """For contrast: transformers' `QuantizedCache` quantizes its whole history again every R steps."""
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache
    from transformers.cache_utils import QuantoQuantizedLayer

    quantized_tokens = []
    original = QuantoQuantizedLayer._quantize

    def spy(self, tensor, axis):
        quantized_tokens.append(tensor.shape[-2])
        return original(self, tensor, axis)

    monkeypatch.setattr(QuantoQuantizedLayer, "_quantize", spy)
    cache = QuantizedCache(backend="quanto", config=tiny_llama.config, nbits=4, q_group_size=32, residual_length=16)
    ids = prompt(45)
    tiny_llama.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=150, do_sample=False, past_key_values=cache
    )
    per_layer_and_kind = sum(quantized_tokens) / (2 * tiny_llama.config.num_hidden_layers)
    assert per_layer_and_kind > 3 * (45 + 150)  # every token quantized several times over
