"""Attention sinks: the first `sink_length` tokens of a sequence stay in full precision when they leave the window."""

import json

import pytest
import torch

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.cache import RateQuantLayer, RateQuantSlidingLayer
from hf_ratequant.calibration import residual_split_mask
from hf_ratequant.config import CONFIG_NAME, ModelFingerprint
from hf_ratequant.quantizers import NonFiniteError, get_quantizer

G, R, S = 8, 16, 16  # group size, residual window, sink tokens


def states(tokens: int, heads: int = 2, dim: int = 32, seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(2))


def layer(sink_length: int = S, quantizer: str = "kivi", bits=(2, 3), sliding_window: int | None = None):
    args = (list(bits), list(bits), get_quantizer(quantizer, G), R, G)
    if sliding_window is not None:
        return RateQuantSlidingLayer(*args, sliding_window=sliding_window, sink_length=sink_length)
    return RateQuantLayer(*args, sink_length=sink_length)


@pytest.mark.parametrize("quantizer", ["kivi", "token", "rotated"])
def test_sink_tokens_come_back_exact_and_the_rest_quantized(quantizer):
    k, v = states(100)
    plain, sinks = layer(0, quantizer), layer(S, quantizer)
    plain.update(k, v)
    sinks.update(k, v)
    k1, v1 = states(1, seed=1)
    keys, values = sinks.update(k1, v1)
    keys0, values0 = plain.update(k1, v1)
    assert sinks.past_keys.num_sink == sinks.past_values.num_sink == S
    assert torch.equal(keys[:, :, :S], k[:, :, :S]) and torch.equal(values[:, :, :S], v[:, :, :S])
    assert not torch.equal(keys0[:, :, :S], k[:, :, :S])  # without sinks they are quantized
    quantized = sinks.past_keys.num_tokens
    assert quantized > S
    assert (keys[:, :, S:quantized] - k[:, :, S:quantized]).abs().max() > 0  # the rest really is quantized
    # The tokens after the sinks are grouped as without sinks (S is a multiple of G), so they come back the same.
    assert torch.equal(keys[:, :, S:], keys0[:, :, S:]) and torch.equal(values[:, :, S:], values0[:, :, S:])
    window = sinks.keys.shape[-2]
    assert torch.equal(keys[:, :, -window:], torch.cat([k, k1], 2)[:, :, -window:])


def test_sink_bytes_are_counted():
    k, v = states(100)
    plain, sinks = layer(0), layer(S)
    plain.update(k, v)
    sinks.update(k, v)
    exact = 2 * S * 2 * 32 * 4  # keys + values, 2 heads, head_dim 32, fp32
    assert sinks.nbytes > plain.nbytes
    assert sinks.nbytes - exact < plain.nbytes  # the S sink tokens replace S quantized ones


def test_crop_into_the_sinks_then_regrow_equals_one_shot():
    k, v = states(100)
    one_shot = layer()
    expected = one_shot.update(k, v)
    cropped = layer()
    cropped.update(k, v)
    cropped.crop(10)  # back inside the sink
    sinks = cropped.past_keys
    assert cropped.get_seq_length() == 10 and sinks.num_sink == 8 and sinks.sink_room == S - 8  # whole groups
    got = cropped.update(k[:, :, 10:], v[:, :, 10:])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert cropped.past_keys.num_sink == S and cropped.past_keys.num_tokens == one_shot.past_keys.num_tokens


def test_crop_past_the_sinks_keeps_them():
    k, v = states(100)
    cache = layer()
    cache.update(k, v)
    cache.crop(50)
    assert cache.get_seq_length() == 50 and cache.past_keys.num_sink == S and cache.past_keys.sink_room == 0
    keys, _ = cache.update(*states(1, seed=2))
    assert torch.equal(keys[:, :, :S], k[:, :, :S])


def test_exactly_the_sinks_flushed_then_crop_reorder_and_iterate(tiny_llama):
    quant = RateQuantConfig.uniform(tiny_llama.config, bits=4, group_size=G, residual_length=R, sink_length=S)
    cache = RateQuantCache(config=tiny_llama.config, quant_config=quant)
    k, v = states(S + R, batch=2)  # the first S tokens leave the window, straight into the sinks
    for i in range(len(cache.layers)):
        cache.update(k, v, i)
    first = cache.layers[0]
    assert first.past_keys.num_sink == S and first.past_keys.num_tokens == S  # nothing quantized
    assert all(torch.equal(keys, k) and torch.equal(values, v) for keys, values, _ in cache)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(first.past_values.sink, v[[1, 0], :, :S])
    cache.crop(S)
    assert cache.get_seq_length() == S and first.past_keys.sink_room == 0
    before = first.nbytes
    cache.crop(G)  # inside the sinks: the part cut off is freed
    assert first.past_keys.num_sink == G and first.nbytes < before
    assert first.past_keys.sink.untyped_storage().nbytes() == first.past_keys.sink.numel() * 4


def test_sliding_layer_drops_the_sinks_with_the_window():
    k, v = states(120)
    sliding = layer(sliding_window=40)
    sliding.update(k, v)
    assert sliding.dropped > 0
    assert sliding.past_keys.num_sink == 0 and sliding.past_keys.sink_room == 0  # gone, never refilled
    sliding.update(*states(40, seed=3))
    assert sliding.past_keys.num_sink == 0


def test_non_finite_sink_tokens_are_kept_but_later_tokens_refused():
    k, v = states(100)
    k[0, 1, 3, 5] = float("nan")  # inside the sinks: kept as is, like the window
    cache = layer()
    cache.update(k, v)
    assert torch.isnan(cache.past_keys.sink).any()
    k2, v2 = states(100)
    k2[0, 0, 40, 0] = float("inf")  # leaves the window quantized
    k2[0, 0, 3, 0] = float("nan")  # a sink: kept, neither reported nor counted
    fresh = layer()
    with pytest.raises(NonFiniteError, match=r"contain inf \(1 values\) in kv-heads \[0\] at token positions 40,"):
        fresh.update(k2, v2)
    assert fresh.get_seq_length() == 0


def test_reorder_and_batch_ops_move_the_sinks(tiny_llama):
    quant = RateQuantConfig.uniform(tiny_llama.config, bits=4, group_size=G, residual_length=R, sink_length=S)
    cache = RateQuantCache(config=tiny_llama.config, quant_config=quant)
    k, v = states(60, batch=3)
    cache.update(k, v, 0)
    cache.layers[0].reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.layers[0].past_keys.sink, k[[2, 0, 1], :, :S])
    cache.layers[0].batch_repeat_interleave(2)
    assert cache.layers[0].past_values.sink.shape[0] == 6


def test_generate_with_sinks_at_8_bits_matches_dynamic(tiny_llama, tie_aware_equal):
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    quant = RateQuantConfig.uniform(tiny_llama.config, bits=8, group_size=G, residual_length=R, sink_length=S)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    out = tiny_llama.generate(ids, past_key_values=RateQuantCache(config=tiny_llama.config, quant_config=quant),
                              **kwargs)
    ref = tiny_llama.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    logits = torch.stack(ref.logits, dim=1)
    for row in range(2):
        tie_aware_equal(out[row, 40:], ref.sequences[row, 40:], logits[row], what=f"row {row}")
    beams = tiny_llama.generate(ids, past_key_values=RateQuantCache(config=tiny_llama.config, quant_config=quant),
                                num_beams=3, **kwargs)
    assert beams.shape == (2, 70)


def test_config_sink_length_is_validated_and_saved(tmp_path, tiny_llama):
    for bad, match in ((12, "multiple of group_size=8"), (-8, "sink_length=-8"), (True, "sink_length=True")):
        with pytest.raises(ValueError, match=match):
            RateQuantConfig.uniform(tiny_llama.config, bits=4, group_size=G, residual_length=R, sink_length=bad)
    quant = RateQuantConfig.uniform(tiny_llama.config, bits=4, group_size=G, residual_length=R, sink_length=S)
    assert RateQuantConfig.from_dict(quant.to_dict()) == quant and quant.version == 2
    quant.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["sink_length"] == S and saved["version"] == 2  # older releases refuse it rather than drop the sinks
    assert RateQuantConfig.from_pretrained(tmp_path).sink_length == S
    plain = RateQuantConfig.uniform(tiny_llama.config, bits=4, group_size=G, residual_length=R,
                                    sink_length=0).to_dict()
    assert "sink_length" not in plain and plain["version"] == 1  # without sinks: readable by older releases
    assert RateQuantConfig.from_dict(plain).sink_length == 0
    assert RateQuantConfig.from_dict(plain) == RateQuantConfig.from_dict({**plain, "version": 2})  # v2, no sinks


def test_calibration_mask_never_reads_sinks_from_the_quantized_copy():
    fp = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=1, num_kv_heads=1, head_dim=32,
                          layer_types=("full_attention",))
    n = 80
    plain = residual_split_mask(n, R, G, fp, torch.float32)[0, 0] == 0
    sinks = residual_split_mask(n, R, G, fp, torch.float32, sink_length=S)[0, 0] == 0
    far_plain, far_sinks = plain[:, :n], sinks[:, :n]
    assert far_plain[:, :S].any() and not far_sinks[:, :S].any()
    assert torch.equal(far_plain[:, S:], far_sinks[:, S:])
    # every allowed key is read from exactly one copy
    assert torch.equal(sinks[:, :n] | sinks[:, n:], torch.ones(n, n, dtype=torch.bool).tril())
