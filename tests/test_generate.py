"""`RateQuantCache` inside `model(...)` and `model.generate(...)`, on a tiny local Llama.

Ports the ideas of transformers' `tests/utils/test_cache_utils.py` and `tests/generation/test_utils.py` (which use Hub
models): at 16 bits the cache must be indistinguishable from `DynamicCache`; at 8 bits greedy decoding must agree up to
near-ties; at low bits every decoding mode must run (beam search, sampling, left padding, continuation, cropping,
assisted and prompt-lookup decoding) with the quantized part of the cache really in use.
"""

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from hf_ratequant import RateQuantCache, RateQuantConfig, available_quantizers
from hf_ratequant.quantizers import get_quantizer

QUANTIZERS = available_quantizers()
MIXED_KEY_BITS = [[8, 2], [3, 16]]
MIXED_VALUE_BITS = [[4, 4], [1, 5]]


# ---- helpers ---------------------------------------------------------------------------------------------------
def prompt(length: int, batch: int = 1, seed: int = 0, device="cpu") -> torch.Tensor:
    """Random token ids in [3, 128): never the pad token (0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g).to(device)


def greedy(model, ids, cache, new_tokens, attention_mask=None, **kwargs):
    """Greedy decoding with an explicit attention mask (else generate would infer one from pad ids in `ids`)."""
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache, **kwargs
    )


def greedy_with_logits(model, ids, cache, new_tokens, attention_mask=None):
    """Greedy decoding; returns `(sequences, logits (batch, new_tokens, vocab))`."""
    out = greedy(model, ids, cache, new_tokens, attention_mask, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def forward(model, ids, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


def assert_quantized(cache: RateQuantCache) -> None:
    """The quantized (past) part of every layer holds tokens: the quantized path really ran."""
    for i, layer in enumerate(cache.layers):
        assert layer.past_keys.num_tokens > 0, f"layer {i}: nothing was quantized, the test exercises nothing"
        assert layer.past_values.num_tokens == layer.past_keys.num_tokens


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# ---- 16 bits: indistinguishable from DynamicCache -----------------------------------------------------------------
@pytest.mark.parametrize("residual_length", [0, 8])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_chunked_forward_at_16_bits_equals_dynamic(tiny_llama_on, cache_factory, device, quantizer, residual_length):
    model = tiny_llama_on
    ids = prompt(45, batch=2, device=device)
    cache = cache_factory(model, bits=16, quantizer=quantizer, residual_length=residual_length)
    ref = DynamicCache(config=model.config)
    for start, stop in [(0, 20), (20, 21), (21, 33), (33, 45)]:
        torch.testing.assert_close(forward(model, ids[:, start:stop], cache), forward(model, ids[:, start:stop], ref))
        assert cache.get_seq_length() == ref.get_seq_length() == stop
    assert_quantized(cache)
    for (k, v, _), layer in zip(cache, ref.layers):
        torch.testing.assert_close(k, layer.keys, rtol=0, atol=0)
        torch.testing.assert_close(v, layer.values, rtol=0, atol=0)
    # The chunks together give the logits of one uncached forward of the whole sequence (up to float reordering).
    fresh = cache_factory(model, bits=16, quantizer=quantizer, residual_length=residual_length)
    chunked = torch.cat([forward(model, ids[:, a:b], fresh) for a, b in [(0, 20), (20, 21), (21, 33), (33, 45)]], 1)
    torch.testing.assert_close(chunked, forward(model, ids, None), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_greedy_at_16_bits_equals_dynamic(tiny_llama_on, cache_factory, device, quantizer):
    model = tiny_llama_on
    ids = prompt(40, device=device)
    cache = cache_factory(model, bits=16, quantizer=quantizer, residual_length=8)
    out = greedy(model, ids, cache, 30)
    ref = greedy(model, ids, DynamicCache(config=model.config), 30)
    assert torch.equal(out, ref)
    assert_quantized(cache)
    assert cache.get_seq_length() == 40 + 30 - 1


# ---- 8 bits: greedy agrees up to near-ties ------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_greedy_at_8_bits_matches_dynamic_tie_aware(tiny_llama_on, cache_factory, tie_aware_equal, device, quantizer):
    model = tiny_llama_on
    ids = prompt(40, device=device)
    cache = cache_factory(model, bits=8, quantizer=quantizer, residual_length=0)
    out = greedy(model, ids, cache, 30)
    ref, ref_logits = greedy_with_logits(model, ids, DynamicCache(config=model.config), 30)
    assert_quantized(cache)
    # R=0: everything older than the last partial group is quantized.
    assert all(layer.keys.shape[-2] < 8 for layer in cache.layers)
    tie_aware_equal(out[0, 40:], ref[0, 40:], ref_logits[0], what=f"{quantizer} 8 bits")


def test_tie_aware_helper_rejects_a_real_divergence(tie_aware_equal):
    logits = torch.zeros(3, 5)
    logits[:, 1] = 1.0  # a clear winner at every step
    with pytest.raises(AssertionError, match="diverges"):
        tie_aware_equal(torch.tensor([1, 2, 1]), torch.tensor([1, 1, 1]), logits)
    logits[1, 2] = 0.995  # a near-tie at step 1: a flip there is allowed
    tie_aware_equal(torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]), logits)


# ---- mixed per-head bits, greedy and sampled decoding -------------------------------------------------------------
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_mixed_per_head_bits_store_each_head_at_its_bits(tiny_llama, cache_factory, quantizer):
    ids = prompt(37, batch=2)
    cache = cache_factory(
        tiny_llama, quantizer=quantizer, key_bits=MIXED_KEY_BITS, value_bits=MIXED_VALUE_BITS, residual_length=8
    )
    ref = DynamicCache(config=tiny_llama.config)
    forward(tiny_llama, ids, cache)
    forward(tiny_llama, ids, ref)
    assert_quantized(cache)
    for layer_idx, ((keys, values, _), ref_layer) in enumerate(zip(cache, ref.layers)):
        layer = cache.layers[layer_idx]
        n = layer.past_keys.num_tokens
        for kind, got, want, table in (
            ("key", keys, ref_layer.keys, MIXED_KEY_BITS),
            ("value", values, ref_layer.values, MIXED_VALUE_BITS),
        ):
            groups = layer.past_keys if kind == "key" else layer.past_values
            assert {bits: heads for bits, _, heads in groups.classes} == {
                b: [h for h, hb in enumerate(table[layer_idx]) if hb == b] for b in set(table[layer_idx])
            }
            for (bits, _, _), data in zip(groups.classes, groups.data):
                if bits == 16:
                    assert isinstance(data, torch.Tensor) and data.dtype == torch.float32
                else:
                    assert data.bits == bits and data.codes.dtype == torch.uint8
            assert got.shape == want.shape
            # The full-precision window is exact; the past is exact for 16-bit heads and more accurate with more bits.
            torch.testing.assert_close(got[:, :, n:], want[:, :, n:], rtol=0, atol=0)
            errors = {}
            for head, bits in enumerate(table[layer_idx]):
                err = (got[:, head, :n] - want[:, head, :n]).abs().max().item()
                if bits == 16:
                    assert err == 0, (kind, layer_idx, head)
                else:
                    assert err > 0, (kind, layer_idx, head)
                    if quantizer != "rotated":  # round-to-nearest: at most half a step of a range <= 2 max|x|
                        assert err <= want[:, head, :n].abs().max().item() / (2**bits - 1) * 1.001 + 1e-6
                errors[bits] = err
            quantized = sorted(b for b in errors if b != 16)
            if len(quantized) == 2 and quantized[1] - quantized[0] >= 2:
                assert errors[quantized[1]] < errors[quantized[0]], (kind, layer_idx, errors)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("scatter", [False, True], ids=["per-run", "per-class"])
def test_heads_of_one_width_in_several_runs_dequantize_in_place(device, quantizer, scatter, monkeypatch):
    """Heads of one bit-width that are not adjacent (2 bits at heads 0, 2, 4; 16 bits at 1 and 5) land at their own
    places, whether dequantized run by run (the CPU's way) or per bit-width and scattered (the GPU's way)."""
    from hf_ratequant import cache as cache_module
    from hf_ratequant import ops

    monkeypatch.setattr(ops, "_scatter_classes", lambda dev: scatter)
    bits = [2, 16, 2, 3, 2, 16]
    groups = cache_module._HeadGroups(bits, get_quantizer(quantizer, 8), "value", sink_length=8)
    groups.prepare(32, torch.device(device))
    x = torch.randn(2, len(bits), 40, 32, generator=torch.Generator().manual_seed(0)).to(device)
    groups.append(x[:, :, :24])
    groups.append(x[:, :, 24:])
    window = x[:, :, :0]
    part = ops.PastPart.from_args(*groups.op_args(window), [q.time_block("value") for q in groups.quantizers])
    out = ops._dequantize_part(part, quantizer, "value", window)
    assert out.shape == x.shape
    assert torch.equal(out[:, :, :8], x[:, :, :8])  # the sink
    assert torch.equal(out[:, [1, 5]], x[:, [1, 5]])  # 16-bit heads are exact
    for head, b in enumerate(bits):
        if b != 16:
            alone = get_quantizer(quantizer, 8).quantize(x[:, head : head + 1, 8:], b, "value")
            want = get_quantizer(quantizer, 8).dequantize(alone, "value")
            torch.testing.assert_close(out[:, head : head + 1, 8:], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_greedy_and_sampled_generate_with_mixed_bits(tiny_llama, cache_factory, quantizer):
    ids = prompt(30)

    def run(**kwargs):
        cache = cache_factory(
            tiny_llama, quantizer=quantizer, key_bits=MIXED_KEY_BITS, value_bits=MIXED_VALUE_BITS, residual_length=8
        )
        out = tiny_llama.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, past_key_values=cache, **kwargs
        )
        assert out.shape == (1, 50)
        assert_quantized(cache)
        assert cache.get_seq_length() == 49
        return out

    g1, g2 = run(do_sample=False), run(do_sample=False)
    assert torch.equal(g1, g2)
    torch.manual_seed(1234)
    s1 = run(do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(1234)
    s2 = run(do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(4321)
    s3 = run(do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(s1, s2), "same seed, different samples"
    assert not torch.equal(s1, s3), "different seeds gave the same 20 samples from a 128-token vocabulary"


def test_sampling_at_16_bits_equals_dynamic(tiny_llama, cache_factory):
    ids = prompt(30)
    outs = []
    for cache in (cache_factory(tiny_llama, bits=16, residual_length=8), DynamicCache(config=tiny_llama.config)):
        torch.manual_seed(7)
        outs.append(
            tiny_llama.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                do_sample=True,
                top_k=0,
                past_key_values=cache,
            )
        )
    assert torch.equal(*outs)


# ---- beam search ------------------------------------------------------------------------------------------------
def _spy_reorders(cache):
    calls = []
    original = cache.reorder_cache

    def spy(beam_idx):
        calls.append(beam_idx.clone())
        return original(beam_idx)

    cache.reorder_cache = spy
    return calls


def test_beam_search_at_16_bits_equals_dynamic_and_really_reorders(tiny_llama, cache_factory):
    ids = prompt(30)
    cache = cache_factory(tiny_llama, bits=16, residual_length=8)
    calls = _spy_reorders(cache)
    kwargs = dict(num_beams=3, do_sample=False, max_new_tokens=20, attention_mask=torch.ones_like(ids))
    out = tiny_llama.generate(ids, past_key_values=cache, **kwargs)
    ref = tiny_llama.generate(ids, past_key_values=DynamicCache(config=tiny_llama.config), **kwargs)
    assert torch.equal(out, ref)
    assert calls and any(not torch.equal(idx, torch.arange(3)) for idx in calls), "beams were never reordered"
    assert cache.layers[0].keys.shape[0] == 3
    assert_quantized(cache)
    # Beam search found something other than the greedy path, so reordering mattered for the output.
    assert not torch.equal(out, greedy(tiny_llama, ids, None, 20))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_beam_search_runs_at_4_bits(tiny_llama, cache_factory, quantizer):
    ids = prompt(30, batch=2)
    cache = cache_factory(tiny_llama, bits=4, quantizer=quantizer, residual_length=8)
    calls = _spy_reorders(cache)
    out = tiny_llama.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        max_new_tokens=20,
        past_key_values=cache,
    )
    assert out.shape == (4, 50)
    assert torch.equal(out[:, :30], ids.repeat_interleave(2, dim=0))
    assert any(not torch.equal(idx, torch.arange(6)) for idx in calls)
    assert cache.layers[0].keys.shape[0] == 6
    assert_quantized(cache)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_reorder_cache_permutes_the_batch(tiny_llama, cache_factory, quantizer, mixed):
    bits = dict(key_bits=MIXED_KEY_BITS, value_bits=MIXED_VALUE_BITS) if mixed else dict(bits=3)
    cache = cache_factory(tiny_llama, quantizer=quantizer, residual_length=8, **bits)
    forward(tiny_llama, prompt(37, batch=3), cache)
    assert_quantized(cache)
    before = [(k.clone(), v.clone()) for k, v, _ in cache]
    nbytes, length = cache.nbytes, cache.get_seq_length()
    perm = torch.tensor([2, 0, 1])
    cache.reorder_cache(perm)
    after = list(cache)
    for (k0, v0), (k1, v1, _) in zip(before, after):
        torch.testing.assert_close(k1, k0[perm], rtol=0, atol=0)
        torch.testing.assert_close(v1, v0[perm], rtol=0, atol=0)
    assert cache.nbytes == nbytes and cache.get_seq_length() == length
    # A repeated index (beam search dropping a beam) duplicates rows.
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    k2 = next(iter(cache))[0]
    torch.testing.assert_close(k2, before[0][0][perm][torch.tensor([1, 1, 0])], rtol=0, atol=0)
    assert torch.isfinite(forward(tiny_llama, prompt(3, batch=3, seed=1), cache)).all()


# ---- sampling with several return sequences -----------------------------------------------------------------------
def test_num_return_sequences_with_sampling(tiny_llama, cache_factory):
    ids = prompt(30)

    def run(seed):
        cache = cache_factory(tiny_llama, bits=4, residual_length=8)
        torch.manual_seed(seed)
        out = tiny_llama.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=0,
            num_return_sequences=3,
            max_new_tokens=20,
            past_key_values=cache,
        )
        assert out.shape == (3, 50)
        assert torch.equal(out[:, :30], ids.expand(3, -1))
        assert cache.layers[0].keys.shape[0] == 3
        assert_quantized(cache)
        return out

    out = run(3)
    assert torch.equal(out, run(3))
    assert len({tuple(row.tolist()) for row in out}) > 1, "three samples of 20 tokens were identical"


# ---- batched, left-padded inputs ----------------------------------------------------------------------------------
def _left_padded(prompts: list[torch.Tensor], pad: int = 0):
    width = max(p.shape[-1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[-1] :] = p[0]
        mask[i, width - p.shape[-1] :] = 1
    return ids, mask


def test_left_padded_batch_at_16_bits_equals_unbatched(tiny_llama, cache_factory, tie_aware_equal):
    prompts = [prompt(30, seed=1), prompt(21, seed=2), prompt(26, seed=3)]
    ids, mask = _left_padded(prompts)
    cache = cache_factory(tiny_llama, bits=16, residual_length=8)
    out = greedy(tiny_llama, ids, cache, 20, attention_mask=mask, pad_token_id=0)
    assert_quantized(cache)
    for row, p in enumerate(prompts):
        alone_cache = cache_factory(tiny_llama, bits=16, residual_length=8)
        alone, alone_logits = greedy_with_logits(tiny_llama, p, alone_cache, 20)
        tie_aware_equal(out[row, 30:], alone[0, p.shape[-1] :], alone_logits[0], what=f"row {row}")
    # And the batched run with our cache equals the batched run with DynamicCache exactly.
    ref = greedy(tiny_llama, ids, DynamicCache(config=tiny_llama.config), 20, attention_mask=mask, pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_left_padded_batch_runs_at_3_bits(tiny_llama, cache_factory, quantizer):
    ids, mask = _left_padded([prompt(30, seed=1), prompt(19, seed=2)])
    cache = cache_factory(tiny_llama, bits=3, quantizer=quantizer, residual_length=8)
    out = tiny_llama.generate(
        ids,
        attention_mask=mask,
        pad_token_id=0,
        max_new_tokens=20,
        do_sample=False,
        past_key_values=cache,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (2, 50)
    assert torch.equal(out.sequences[:, :30], ids)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert_quantized(cache)
    assert cache.get_seq_length() == 49


# ---- continuing from a returned cache, and copying a prefix cache -------------------------------------------------
def test_continue_from_returned_cache_at_16_bits_equals_one_shot(tiny_llama, cache_factory):
    ids = prompt(30)
    cache = cache_factory(tiny_llama, bits=16, residual_length=8)
    first = greedy(tiny_llama, ids, cache, 10)
    assert cache.get_seq_length() == 39
    second = greedy(tiny_llama, first, cache, 10)
    one_shot = greedy(tiny_llama, ids, cache_factory(tiny_llama, bits=16, residual_length=8), 20)
    assert torch.equal(second, one_shot)
    assert torch.equal(one_shot, greedy(tiny_llama, ids, DynamicCache(config=tiny_llama.config), 20))
    assert cache.get_seq_length() == 49
    assert_quantized(cache)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_continue_from_returned_cache_at_4_bits(tiny_llama, cache_factory, quantizer):
    ids = prompt(30)
    cache = cache_factory(tiny_llama, bits=4, quantizer=quantizer, residual_length=8)
    first = greedy(tiny_llama, ids, cache, 10)
    second = greedy(tiny_llama, first, cache, 10)
    assert second.shape == (1, 50)
    assert torch.equal(second[:, :40], first)
    assert cache.get_seq_length() == 49
    assert_quantized(cache)


@pytest.mark.parametrize("bits", [16, 4])
def test_deepcopy_of_a_prefix_cache(tiny_llama, cache_factory, bits):
    ids = prompt(30)
    prefix = cache_factory(tiny_llama, bits=bits, residual_length=8)
    forward(tiny_llama, ids[:, :20], prefix)
    assert_quantized(prefix)
    snapshot = [(k.clone(), v.clone()) for k, v, _ in prefix]
    a = greedy(tiny_llama, ids, copy.deepcopy(prefix), 10)
    b = greedy(tiny_llama, ids, copy.deepcopy(prefix), 10)
    assert torch.equal(a, b)
    # Using the copies left the prefix untouched.
    assert prefix.get_seq_length() == 20
    for (k, v, _), (k0, v0) in zip(prefix, snapshot):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    if bits == 16:
        assert torch.equal(a, greedy(tiny_llama, ids, DynamicCache(config=tiny_llama.config), 10))


# ---- crop, as assisted decoding does -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 5, 8, 9, 12, 20, 27])
@pytest.mark.parametrize("residual_length", [0, 8, 16])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_crop_across_the_quantized_boundary(tiny_llama, cache_factory, quantizer, residual_length, n):
    ids = prompt(50)
    full = forward(tiny_llama, ids, None)
    for bits in (16, 4):
        cache = cache_factory(tiny_llama, bits=bits, quantizer=quantizer, residual_length=residual_length)
        forward(tiny_llama, ids[:, :40], cache)
        assert_quantized(cache)
        n_past = cache.layers[0].past_keys.num_tokens
        cache.crop(-n)
        target = 40 - n
        assert cache.get_seq_length() == target
        for layer_idx, layer in enumerate(cache.layers):
            assert layer.past_keys.num_tokens + layer.keys.shape[-2] == target
            assert layer.past_values.num_tokens + layer.values.shape[-2] == target
            assert layer.past_keys.num_tokens % layer.past_keys.time_block == 0
            assert layer.get_mask_sizes(10) == (target + 10, 0)
            assert cache.get_mask_sizes(10, layer_idx) == (target + 10, 0)
        if target < n_past:  # the crop reached into the quantized past
            kept = cache.layers[0].past_keys.num_tokens
            # kivi keys are quantized in blocks of 8 tokens: a crop inside a block sends that block's kept tokens
            # back to the window (dequantized); the per-token designs keep every token.
            assert kept == ((target // 8) * 8 if quantizer == "kivi" else target)
        logits = forward(tiny_llama, ids[:, target:50], cache)
        assert cache.get_seq_length() == 50
        assert [k.shape[-2] for k, _, _ in cache] == [50] * len(cache.layers)
        if bits == 16:
            torch.testing.assert_close(logits, full[:, target:50])
        else:
            assert torch.isfinite(logits).all()


def test_crop_at_16_bits_equals_dynamic_cache(tiny_llama, cache_factory):
    """The crop/refeed cycle of assisted decoding, side by side with DynamicCache."""
    ids = prompt(60)
    cache = cache_factory(tiny_llama, bits=16, residual_length=8)
    ref = DynamicCache(config=tiny_llama.config)
    pos = 0
    for step, (feed, drop) in enumerate([(25, 0), (5, 3), (6, 5), (9, 9), (4, 1), (12, 2)]):
        chunk = ids[:, pos : pos + feed]
        torch.testing.assert_close(forward(tiny_llama, chunk, cache), forward(tiny_llama, chunk, ref))
        cache.crop(-drop)
        ref.crop(-drop)
        pos += feed - drop
        assert cache.get_seq_length() == ref.get_seq_length() == pos, step
    assert_quantized(cache)
    for (k, v, _), layer in zip(cache, ref.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_crop_more_than_held_is_refused(tiny_llama, cache_factory):
    cache = cache_factory(tiny_llama, bits=4, residual_length=8)
    forward(tiny_llama, prompt(20), cache)
    with pytest.raises(ValueError):
        cache.crop(-21)
    cache.crop(0)
    assert cache.get_seq_length() == 20


def _repetitive_prompt(seed=0):
    base = prompt(10, seed=seed)
    return torch.cat([base, base, base[:, :5]], dim=1)  # prompt lookup finds its n-grams


def _assist_kwargs(mode, assistant):
    return dict(prompt_lookup_num_tokens=3) if mode == "prompt_lookup" else dict(assistant_model=assistant)


def _spy_crops(cache):
    calls = []
    original = cache.crop

    def spy(n):
        calls.append(n)
        return original(n)

    cache.crop = spy
    return calls


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
@pytest.mark.parametrize("residual_length", [0, 8])
def test_assisted_decoding_at_16_bits_matches_greedy(
    tiny_llama, tiny_llama_assistant, cache_factory, mode, residual_length
):
    ids = _repetitive_prompt()
    kwargs = _assist_kwargs(mode, tiny_llama_assistant)
    ref = greedy(tiny_llama, ids, DynamicCache(config=tiny_llama.config), 30)
    cache = cache_factory(tiny_llama, bits=16, residual_length=residual_length)
    crops = _spy_crops(cache)
    out = greedy(tiny_llama, ids, cache, 30, **kwargs)
    assert torch.equal(out, ref)
    assert any(n < 0 for n in crops), f"no candidate was ever rejected: crop calls {crops}"
    assert_quantized(cache)
    assert cache.get_seq_length() == 25 + 30 - 1


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_assisted_decoding_runs_at_4_bits(tiny_llama, tiny_llama_assistant, cache_factory, quantizer, mode):
    ids = _repetitive_prompt()
    kwargs = _assist_kwargs(mode, tiny_llama_assistant)
    cache = cache_factory(tiny_llama, bits=4, quantizer=quantizer, residual_length=8)
    crops = _spy_crops(cache)
    out = greedy(tiny_llama, ids, cache, 30, **kwargs)
    assert out.shape == (1, 55)
    assert crops
    assert_quantized(cache)
    assert cache.get_seq_length() == 54
    for layer in cache.layers:
        assert layer.past_keys.num_tokens + layer.keys.shape[-2] == 54


# ---- sequence length and mask sizes -------------------------------------------------------------------------------
@pytest.mark.parametrize("residual_length", [0, 8, 16])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_seq_length_and_mask_sizes_track_dynamic_cache(tiny_llama, cache_factory, quantizer, residual_length):
    ids = prompt(50)
    cache = cache_factory(tiny_llama, bits=4, quantizer=quantizer, residual_length=residual_length)
    ref = DynamicCache(config=tiny_llama.config)
    num_layers = tiny_llama.config.num_hidden_layers

    def check(query_length):
        assert cache.get_seq_length() == ref.get_seq_length()
        for i in range(num_layers):
            assert cache.layers[i].get_seq_length() == ref.layers[i].get_seq_length()
            assert cache.get_mask_sizes(query_length, i) == ref.get_mask_sizes(query_length, i)

    check(25)
    forward(tiny_llama, ids[:, :25], cache)
    forward(tiny_llama, ids[:, :25], ref)
    check(1)
    windows = set()
    for t in range(25, 50):
        forward(tiny_llama, ids[:, t : t + 1], cache)
        forward(tiny_llama, ids[:, t : t + 1], ref)
        check(1)
        check(4)
        windows.add(cache.layers[0].keys.shape[-2])
        # The residual window holds R..R+G-1 tokens (R = residual_length, G = 8) once the sequence is longer than R.
        assert residual_length <= cache.layers[0].keys.shape[-2] <= residual_length + 7
    assert windows == set(range(residual_length, residual_length + 8))
    assert_quantized(cache)


# ---- dtypes and the byte count -------------------------------------------------------------------------------------
def _expected_nbytes(cache: RateQuantCache, quantizer: str, group_size: int) -> int:
    total = 0
    for layer in cache.layers:
        b, h, t_win, d = layer.keys.shape
        es = layer.keys.element_size()
        total += 2 * b * h * t_win * d * es  # the full-precision windows
        t = layer.past_keys.num_tokens
        for kind, bits_per_head in (("key", layer.key_bits), ("value", layer.value_bits)):
            for bits in bits_per_head:
                if bits == 16:
                    total += b * t * d * es
                    continue
                total += b * t * math.ceil(d * bits / 8)  # codes, packed exactly
                if quantizer == "kivi":
                    n_groups = (t // group_size) * d if kind == "key" else t * (d // group_size)
                else:
                    n_groups = t
                total += 2 * b * n_groups * es  # one scale and one zero-point per group
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_dtype_of_stored_states_and_nbytes(tiny_llama, device, cache_factory, quantizer, dtype):
    model = copy.deepcopy(tiny_llama).to(device=device, dtype=dtype)
    cache = cache_factory(
        model, quantizer=quantizer, key_bits=MIXED_KEY_BITS, value_bits=MIXED_VALUE_BITS, residual_length=8
    )
    logits = forward(model, prompt(37, batch=2, device=device), cache)
    assert torch.isfinite(logits).all()
    assert_quantized(cache)
    for layer in cache.layers:
        assert layer.keys.dtype == layer.values.dtype == dtype
        for groups in (layer.past_keys, layer.past_values):
            for (bits, _, _), data in zip(groups.classes, groups.data):
                if bits == 16:
                    assert data.dtype == dtype
                else:
                    assert data.codes.dtype == torch.uint8
                    assert data.scale.dtype == data.zero.dtype == dtype
                    assert data.codes.device.type == device
    for k, v, _ in cache:
        assert k.dtype == v.dtype == dtype and k.shape[-2] == v.shape[-2] == 37
    assert cache.nbytes == _expected_nbytes(cache, quantizer, 8)
    ref = DynamicCache(config=model.config)
    forward(model, prompt(37, batch=2, device=device), ref)
    assert cache.nbytes < dynamic_bytes(ref)
    small = cache_factory(model, bits=4, quantizer=quantizer, residual_length=8)
    out = greedy(model, prompt(20, device=device), small, 12)
    assert out.shape == (1, 32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_nbytes_arithmetic_for_every_bit_width(tiny_llama, cache_factory, bits):
    cache = cache_factory(tiny_llama, bits=bits, residual_length=8)
    forward(tiny_llama, prompt(45, batch=2), cache)
    assert_quantized(cache)
    assert cache.nbytes == _expected_nbytes(cache, "kivi", 8)
    ref = DynamicCache(config=tiny_llama.config)
    forward(tiny_llama, prompt(45, batch=2), ref)
    assert cache.nbytes < dynamic_bytes(ref)


# ---- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layers, heads, pattern",
    [
        (3, 2, r"3 layers x 2 kv-heads.*2 layers x 2 kv-heads"),
        (2, 4, r"2 layers x 4 kv-heads.*2 layers x 2 kv-heads"),
    ],
)
def test_config_for_another_geometry_is_refused(tiny_llama, layers, heads, pattern):
    table = [[4] * heads for _ in range(layers)]
    quant_config = RateQuantConfig(key_bits=table, value_bits=table, group_size=8, residual_length=8)
    with pytest.raises(ValueError, match=pattern):
        RateQuantCache(config=tiny_llama.config, quant_config=quant_config)
    with pytest.raises(ValueError, match=pattern):
        RateQuantCache.from_pretrained(quant_config, model=tiny_llama)


@pytest.mark.parametrize("bad", [0, 9, 3.5, -1, True])
def test_invalid_bits_are_refused(tiny_llama, bad):
    with pytest.raises(ValueError, match="not a valid bit-width"):
        RateQuantConfig.uniform(tiny_llama.config, bits=bad)
    with pytest.raises(ValueError, match=r"key_bits\[1\]\[0\]"):
        RateQuantConfig(key_bits=[[4, 4], [bad, 4]], value_bits=[[4, 4], [4, 4]])
    with pytest.raises(ValueError, match=r"value_bits\[0\]\[1\]"):
        RateQuantConfig(key_bits=[[4, 4], [4, 4]], value_bits=[[4, bad], [4, 4]])


def test_kivi_group_size_must_divide_head_dim(tiny_llama, cache_factory):
    # head_dim is 32; kivi groups value channels by 12: refused before anything is stored.
    with pytest.raises(ValueError, match=r"12 channels.*head_dim=32"):
        cache = cache_factory(tiny_llama, bits=4, quantizer="kivi", group_size=12, residual_length=12)
        forward(tiny_llama, prompt(30), cache)
    # The per-token designs group whole rows: any group size works.
    cache = cache_factory(tiny_llama, bits=4, quantizer="token", group_size=12, residual_length=12)
    assert torch.isfinite(forward(tiny_llama, prompt(30), cache)).all()
