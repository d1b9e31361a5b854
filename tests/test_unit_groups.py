"""A group size per unit (schema 4): every (layer, kv-head, K/V) stored at its own bits *and* group size, really
packed, through the cache, its ops (the PyTorch reference and the Triton kernels under the interpreter), `nbytes`
against `footprint.cache_bytes`, crops and sliding windows, and the config's checks and files."""

import importlib.util
import json

import pytest
import torch
from conftest import build_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ratequant import RateQuantCache, RateQuantConfig, ops
from hf_ratequant.config import ModelFingerprint
from hf_ratequant.footprint import cache_bytes, flush_block, option_bits_per_element, true_bits_per_element
from hf_ratequant.quantizers import KEEP_BITS, get_quantizer

HAS_TRITON = importlib.util.find_spec("triton") is not None
HEAD_DIM, R, G, S = 64, 32, 16, 16
KEY_BITS = [[2, 3, 16], [4, 2, 1]]
VALUE_BITS = [[2, 2, 3], [16, 1, 5]]
GROUPS = {  # per design: key groups, value groups (kivi keys group tokens: multiples of G dividing the largest)
    "kivi": ([[16, 32, 64], [64, 16, 16]], [[16, 32, 64], [64, 8, 32]]),
    "token": ([[16, 32, 64], [64, 64, 32]], [[8, 32, 64], [64, 16, 32]]),
    "rotated": ([[16, 32, 64], [64, 64, 32]], [[8, 32, 64], [64, 16, 32]]),
}
MODEL = LlamaConfig(num_hidden_layers=2, num_key_value_heads=3, num_attention_heads=6, hidden_size=6 * HEAD_DIM,
                    intermediate_size=64, vocab_size=128, head_dim=HEAD_DIM)


def grouped_config(quantizer: str, fingerprint=None, sliding: int | None = None, **overrides) -> RateQuantConfig:
    key_groups, value_groups = GROUPS[quantizer]
    fields = dict(key_bits=KEY_BITS, value_bits=VALUE_BITS, key_groups=key_groups, value_groups=value_groups,
                  quantizer=quantizer, group_size=G, residual_length=R, sink_length=S, fingerprint=fingerprint)
    fields.update(overrides)
    return RateQuantConfig(**fields)


def fingerprint(sliding: int | None = None) -> ModelFingerprint:
    fp = ModelFingerprint.from_model_config(MODEL)
    if sliding is None:
        return fp
    return ModelFingerprint(fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim,
                            ("sliding_attention", "full_attention"), sliding_window=sliding)


def feed(cache, steps, seed=0):
    """Feed random states in chunks of `steps` tokens; return the last update's history and every state fed."""
    gen = torch.Generator().manual_seed(seed)
    fed = {i: ([], []) for i in range(len(cache.layers))}
    out = None
    for n in steps:
        out = []
        for i, layer in enumerate(cache.layers):
            k, v = torch.randn(2, 3, n, HEAD_DIM, generator=gen), torch.randn(2, 3, n, HEAD_DIM, generator=gen)
            k[..., ::9] *= 5  # outlier channels, as real keys have
            fed[i][0].append(k)
            fed[i][1].append(v)
            out.append(layer.update(k, v))
    return out, {i: (torch.cat(k, 2), torch.cat(v, 2)) for i, (k, v) in fed.items()}


def reference(quantizer, kind, x, bits, group, sinks, n_quantized):
    """One head's `[sink | quantized alone at (bits, group) | window]`, `x` `(batch, 1, tokens, head_dim)`."""
    if bits == KEEP_BITS:
        return x
    q = get_quantizer(quantizer, G)
    q = q if group == q.unit_group(kind, HEAD_DIM) else q.regrouped(group)
    part = x[:, :, sinks : sinks + n_quantized]
    dequantized = q.dequantize(q.quantize(part, bits, kind), kind)
    return torch.cat([x[:, :, :sinks], dequantized, x[:, :, sinks + n_quantized :]], dim=2)


@pytest.mark.parametrize("quantizer", list(GROUPS))
def test_every_unit_is_stored_at_its_bits_and_group(quantizer):
    config = grouped_config(quantizer, fingerprint())
    cache = RateQuantCache(config=MODEL, quant_config=config, attention="dequantize")
    out, fed = feed(cache, [150, 1, 1, 37] + [1] * 70)
    tokens = cache.get_seq_length()
    for i, layer in enumerate(cache.layers):
        f = flush_block(config, i)
        assert layer.flush_block == f
        assert R <= layer.keys.shape[2] < R + f  # the window releases whole groups of the largest key group
        n_quantized = layer.past_keys.num_tokens - layer.past_keys.num_sink
        for kind, past, bits_row, group_row, history in (
            ("key", layer.past_keys, KEY_BITS[i], config.key_groups[i], out[i][0]),
            ("value", layer.past_values, VALUE_BITS[i], config.value_groups[i], out[i][1]),
        ):
            assert n_quantized % past.time_block == 0
            for (bits, group, heads), data in zip(past.classes, past.data):
                for h in heads:
                    assert bits == bits_row[h] and (bits == KEEP_BITS or group == group_row[h])
                if bits == KEEP_BITS:
                    continue
                q = get_quantizer(quantizer, G)
                if q.group_axis(kind) == "tokens":  # one scale row per `group` tokens, one scale per channel
                    assert data.scale.shape[2:] == (n_quantized // group, HEAD_DIM)
                else:  # one scale row per token, head_dim / group scales
                    assert data.scale.shape[2:] == (n_quantized, HEAD_DIM // group)
            states = fed[i][0 if kind == "key" else 1]
            for h in range(3):
                want = reference(quantizer, kind, states[:, h : h + 1], bits_row[h], group_row[h], S, n_quantized)
                torch.testing.assert_close(history[:, h : h + 1], want, rtol=1e-6, atol=1e-6)
    assert cache.nbytes == cache_bytes(config, fingerprint(), tokens, batch=2, dtype=torch.float32).total


@pytest.mark.parametrize("quantizer", list(GROUPS))
def test_nbytes_is_the_arithmetic_at_every_length_and_for_sliding_layers(quantizer):
    for fp in (fingerprint(), fingerprint(sliding=100)):
        config = grouped_config(quantizer, fp)
        for tokens in (1, R + G - 1, R + G, 97, 160, 333):
            cache = RateQuantCache(config=None, quant_config=config, attention="dequantize")
            feed(cache, [tokens])
            want = cache_bytes(config, fp, tokens, batch=2, dtype=torch.float32)
            assert cache.nbytes == want.total, (fp.layer_types, tokens)
    # The group sizes change the bytes: every unit at the design's own group would be another number.
    plain = RateQuantConfig(key_bits=KEY_BITS, value_bits=VALUE_BITS, quantizer=quantizer, group_size=G,
                            residual_length=R, sink_length=S, fingerprint=fingerprint())
    assert true_bits_per_element(config, HEAD_DIM) != true_bits_per_element(plain, HEAD_DIM)


def test_option_rates_are_what_the_packer_stores():
    # 2 code bits + a 16-bit scale and zero-point per group: 32 / group bits per element.
    for group in (16, 32, 64):
        assert option_bits_per_element("kivi", 2, group, "key", HEAD_DIM) == 2 + 32 / group
        assert option_bits_per_element("kivi", 2, group, "value", HEAD_DIM) == 2 + 32 / group
        assert option_bits_per_element("token", 3, group, "key", HEAD_DIM) == 3 + 32 / group
        assert option_bits_per_element("rotated", 3, group, "value", HEAD_DIM) == 3 + 32 / group


@pytest.mark.parametrize("quantizer", ["kivi", "token"])
def test_crop_keeps_whole_blocks_and_the_prefix(quantizer):
    config = grouped_config(quantizer, fingerprint())
    cache = RateQuantCache(config=MODEL, quant_config=config, attention="dequantize")
    feed(cache, [200])
    before = [layer._history() for layer in cache.layers]
    for target in (190, 170, 120, 49, 17, 5):
        cache.crop(target)
        assert cache.get_seq_length() == target
        for layer, (keys, values) in zip(cache.layers, before):
            n_quantized = layer.past_keys.num_tokens - layer.past_keys.num_sink
            assert n_quantized % layer.past_keys.time_block == 0 and n_quantized % layer.past_values.time_block == 0
            k, v = layer._history() if layer.past_keys.num_tokens else (layer.keys, layer.values)
            torch.testing.assert_close(k, keys[:, :, :target], rtol=0, atol=0)  # cut, never quantized again
            torch.testing.assert_close(v, values[:, :, :target], rtol=0, atol=0)
    feed(cache, [3, 90, 1], seed=1)  # and it grows again in whole blocks
    for layer in cache.layers:
        n_quantized = layer.past_keys.num_tokens - layer.past_keys.num_sink
        assert n_quantized % layer.past_keys.time_block == 0 and n_quantized % layer.past_values.time_block == 0


def test_sliding_layers_drop_whole_blocks():
    fp = fingerprint(sliding=100)
    config = grouped_config("kivi", fp)
    cache = RateQuantCache(config=None, quant_config=config, attention="dequantize")
    _, fed = feed(cache, [120] + [1] * 150)
    sliding = cache.layers[0]
    assert sliding.dropped > 0 and sliding.past_keys.num_sink == 0  # the sinks went first
    held = sliding.past_keys.num_tokens + sliding.keys.shape[2]
    assert 99 <= held <= 99 + sliding.flush_block
    assert sliding.past_keys.num_tokens % sliding.flush_block == 0
    keys, _ = sliding._history()
    torch.testing.assert_close(keys[:, :, -sliding.keys.shape[2]:], fed[0][0][:, :, -sliding.keys.shape[2]:])


def test_generate_with_per_unit_groups_and_16_bit_units_equal_to_dynamic():
    model = build_model(LlamaForCausalLM, MODEL)
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    config = grouped_config("kivi", fingerprint(), key_bits=[[16] * 3] * 2, value_bits=[[16] * 3] * 2)
    ref = model.generate(ids, max_new_tokens=20, do_sample=False)
    got = model.generate(ids, max_new_tokens=20, do_sample=False,
                         past_key_values=RateQuantCache(config=model.config, quant_config=config))
    assert torch.equal(got, ref)
    quantized = RateQuantCache(config=model.config, quant_config=grouped_config("kivi", fingerprint()))
    out = model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=quantized)
    assert out.shape == ref.shape and quantized.layers[1].flush_block == 64


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# 8-bit scales on kivi: keys with one super-block triple for every channel, values with one per group (the Triton
# tests cover the other designs' coded scales)
@pytest.mark.parametrize("quantizer,scale_bits", [*((q, 16) for q in GROUPS), ("kivi", 8)])
def test_triton_kernels_read_every_class_at_its_group(quantizer, scale_bits, monkeypatch):
    config = grouped_config(quantizer, fingerprint(), scale_bits=scale_bits)
    cache = RateQuantCache(config=MODEL, quant_config=config, attention="dequantize")
    feed(cache, [140, 1, 1])
    query = torch.randn(2, 6, 1, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    for layer in cache.layers:
        args = (*layer._op_args(), layer.keys, layer.values, quantizer)
        coded = [r.numel() > 0 for r in args[6] + args[13]]  # the ops get 8-bit scales as stored
        assert any(coded) == (scale_bits == 8)
        want_k, want_v = torch.ops.hf_ratequant.dequantize_layer(*args)
        want_o = torch.ops.hf_ratequant.decode_attention(query, None, *args, HEAD_DIM**-0.5)
        monkeypatch.setattr(ops, "_CPU_BACKEND", {"name": "triton"})
        got_k, got_v = torch.ops.hf_ratequant.dequantize_layer(*args)
        got_o = torch.ops.hf_ratequant.decode_attention(query, None, *args, HEAD_DIM**-0.5)
        monkeypatch.setattr(ops, "_CPU_BACKEND", {"name": "reference"})
        tol = dict(rtol=1e-5, atol=1e-5) if quantizer == "rotated" else dict(rtol=0, atol=0)
        torch.testing.assert_close(got_k, want_k, **tol)
        torch.testing.assert_close(got_v, want_v, **tol)
        torch.testing.assert_close(got_o, want_o, rtol=1e-4, atol=1e-4)


# ---- the config ----------------------------------------------------------------------------------------------------
def test_groups_round_trip_as_schema_4_and_plain_configs_stay_older(tmp_path):
    config = grouped_config("kivi", fingerprint())
    assert config.version == 4 and config.has_unit_groups
    config.save_pretrained(tmp_path / "grouped")
    data = json.loads((tmp_path / "grouped" / "ratequant_config.json").read_text())
    assert data["version"] == 4 and data["key_groups"] == GROUPS["kivi"][0]
    loaded = RateQuantConfig.from_pretrained(tmp_path / "grouped")
    assert loaded.key_groups == config.key_groups and loaded.value_groups == config.value_groups
    assert torch.equal(loaded.groups_tensor(HEAD_DIM), config.groups_tensor(HEAD_DIM))
    plain = RateQuantConfig.uniform(MODEL, bits=3)
    plain.save_pretrained(tmp_path / "plain")
    data = json.loads((tmp_path / "plain" / "ratequant_config.json").read_text())
    assert "key_groups" not in data and data["version"] == 2  # older releases still read it
    assert plain.groups_tensor(HEAD_DIM).unique().tolist() == [32]
    assert RateQuantConfig.uniform(MODEL, bits=3, quantizer="token").groups_tensor(HEAD_DIM).unique().tolist() == [64]


def test_uniform_takes_a_group_size():
    config = RateQuantConfig.uniform(MODEL, bits=3, quantizer="token", group=32)
    assert config.key_groups == [[32] * 3] * 2 and config.value_groups == [[32] * 3] * 2
    config = RateQuantConfig.uniform(MODEL, bits=2, quantizer="kivi", key_group=128, value_group=64)
    assert config.key_groups == [[128] * 3] * 2 and config.value_groups == [[64] * 3] * 2
    assert abs(true_bits_per_element(config, HEAD_DIM) - (2 + (32 / 128 + 32 / 64) / 2)) < 1e-9
    own = RateQuantConfig.uniform(MODEL, bits=3, quantizer="token", group=HEAD_DIM)  # one group per row: the default
    assert own.key_groups is None and own.version == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(key_groups=[[24, 32, 64], [64, 16, 16]]), r"\[24\].*multiple of 16"),
        (dict(key_groups=[[48, 32, 64], [64, 16, 16]]), r"\[48\].*do not divide the largest key group 64"),
        (dict(value_groups=[[16, 32, 48], [64, 8, 32]]), r"\[48\].*do not divide head_dim=64"),
        (dict(value_groups=None), "Only key_groups is set"),
        (dict(key_groups=[[16, 32], [64, 16]]), "key_groups is 2x2 but the bit tables are 2x3"),
        (dict(key_groups=[[16, 0, 64], [64, 16, 16]]), r"key_groups\[0\]\[1\]=0 \(int\) must be an integer in 1\.\."),
        (dict(value_groups=[[16, 32.0, 64], [64, 8, 32]]), r"value_groups\[0\]\[1\]=32.0 \(float\) must be"),
    ],
)
def test_bad_groups_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        grouped_config("kivi", fingerprint(), **overrides)


def test_group_not_dividing_head_dim_is_refused_by_the_cache_without_a_fingerprint():
    config = grouped_config("token", None, value_groups=[[8, 32, 48], [64, 16, 32]])
    cache = RateQuantCache(config=None, quant_config=config)
    with pytest.raises(ValueError, match="does not divide head_dim=64"):
        feed(cache, [10])


def test_a_file_with_groups_but_an_older_version_is_refused(tmp_path):
    grouped_config("kivi", fingerprint()).save_pretrained(tmp_path)
    path = tmp_path / "ratequant_config.json"
    data = json.loads(path.read_text())
    data["version"] = 2
    with pytest.raises(ValueError, match="schema version 2 but hold.*key_groups"):
        RateQuantConfig.from_dict(data)
    data["version"] = 6
    with pytest.raises(ValueError, match="newer than the 5 this hf-ratequant understands"):
        RateQuantConfig.from_dict(data)


def test_a_design_without_per_unit_groups_still_serves_the_cache_and_refuses_other_groups():
    from hf_ratequant.cache import RateQuantLayer
    from hf_ratequant.quantizers import Quantizer, register_quantizer
    from hf_ratequant.quantizers.base import _REGISTRY

    class OneGroupPerRow(Quantizer):  # the base class's defaults: no group size per unit
        chunked_groups = True

        def _to_groups(self, x, kind):
            return x.unsqueeze(-2)

        def _from_groups(self, g, kind, shape):
            return g.reshape(shape)

    register_quantizer("one-group-per-row")(OneGroupPerRow)
    try:
        q = OneGroupPerRow(group_size=G)  # a layout G other than the registry's default of 32
        layer = RateQuantLayer([2, 3], [2, 2], q, residual_length=R, group_size=G)
        x = torch.randn(1, 2, 80, HEAD_DIM)
        layer.update(x, x)
        keys, _ = layer.update(x[:, :, :5], x[:, :, :5])  # the past goes through the ops now
        assert keys.shape == (1, 2, 85, HEAD_DIM) and layer.past_keys.num_tokens == 85 - R - (85 - R) % G
        torch.testing.assert_close(keys[:, :, -5:], x[:, :, :5])
        grouped = RateQuantLayer([2, 3], [2, 2], q, residual_length=R, group_size=G, key_groups=[32, None])
        with pytest.raises(ValueError, match="'one-group-per-row' quantizer has no group size per unit"):
            grouped.update(x, x)
    finally:
        del _REGISTRY["one-group-per-row"]
