"""8-bit scales and zero-points (`hf_ratequant.quantizers.scales`, `CacheLayout(scale_bits=8)`): what is stored,
that every group stays covered, that the cache, its byte arithmetic, configs, calibration and the command line
carry them."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.config import ModelFingerprint
from hf_ratequant.footprint import cache_bytes, true_bits_per_element, unit_bits_per_element
from hf_ratequant.quantizers import get_quantizer, scales
from hf_ratequant.quantizers.scales import SCALE_BLOCK_TOKENS
from hf_ratequant.settings import CacheLayout

DESIGNS = ("kivi", "token", "rotated")


def _states(tokens: int = 64, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, tokens, 64, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 20  # an outlier channel
    x[:, :, 40 % tokens] *= 30  # a loud token
    x[1, 2] *= 1e-3  # a quiet head
    return x.to(dtype)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_coded_scales_store_bytes_and_reconstruct_what_roundtrip_measures(design, dtype, kind):
    """The packed block holds one byte per scale and per zero-point plus the super-blocks' numbers in the model's
    dtype; it dequantizes to exactly what `roundtrip` (the calibration measure) computes, and nearly as well as
    16-bit scales."""
    x = _states(dtype=dtype)
    q16, q8 = get_quantizer(design), get_quantizer(design, scale_bits=8)
    for bits in (1, 2, 3, 4, 8):
        block = q8.quantize(x, bits, kind)
        assert block.scale.dtype == block.zero.dtype == torch.uint8 and block.ranges.dtype == dtype
        assert block.scale.shape == q16.quantize(x, bits, kind).scale.shape
        out = q8.dequantize(block, kind)
        same = q8.roundtrip(x, bits, kind)  # the rotated design's CPU kernel unrotates within a few ulps of it
        assert out.dtype == dtype and (torch.equal(out, same) if design != "rotated" else
                                       torch.allclose(out.float(), same.float(), rtol=1e-5, atol=1e-5 * 20 * 30))
        err8 = (out.float() - x.float()).square().mean()
        err16 = (q16.roundtrip(x, bits, kind).float() - x.float()).square().mean()
        assert torch.isfinite(err8) and err8 <= 1.12 * err16, (bits, err8 / err16)


@pytest.mark.parametrize("design", DESIGNS)
def test_every_group_stays_covered(design):
    """Both codes round outward: every element lies within half a decoded step of its reconstruction (the same
    bound as 16-bit scales), including a quiet group next to a loud one in the same super-block."""
    x = _states()
    q = get_quantizer(design, scale_bits=8)
    for kind in ("key", "value"):
        for bits in (1, 2, 4):
            block = q.quantize(x, bits, kind)
            wide = block.expanded()
            groups = q._to_groups(q._rotate(x.float()), kind)
            step = wide.scale.float()[..., None]
            zero = wide.zero.float()[..., None]
            assert bool((zero <= groups.amin(-1, keepdim=True)).all())
            assert bool((zero + ((1 << bits) - 1) * step >= groups.amax(-1, keepdim=True) * (1 - 1e-6) - 1e-6).all())
            recon = q._to_groups(q._rotate(q.dequantize(block, kind).float()), kind)
            assert bool(((recon - groups).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all())


def test_constant_and_zero_states_reconstruct_exactly():
    for design in DESIGNS:
        q = get_quantizer(design, scale_bits=8)
        for x in (torch.zeros(1, 2, 32, 64), torch.full((1, 2, 32, 64), 3.0)):
            for kind in ("key", "value"):
                assert torch.allclose(q.dequantize(q.quantize(x, 2, kind), kind), x, atol=1e-6)


def test_float16_extremes_stay_finite():
    x = torch.full((1, 1, 32, 64), 65000.0).to(torch.float16)
    x[..., ::2] = -65000
    for design in DESIGNS:
        q = get_quantizer(design, scale_bits=8)
        for kind in ("key", "value"):
            out = q.dequantize(q.quantize(x, 3, kind), kind)
            assert bool(torch.isfinite(out).all()) and (out.float() - x.float()).abs().max() <= 130000 / 7 / 2


def test_blocks_are_cut_and_joined_at_super_blocks():
    """Quantized in pieces of 32 tokens or in one call, the same bytes; a cut inside a super-block is refused."""
    from hf_ratequant.quantizers import QuantizedBlock

    x = _states(96)
    for design in DESIGNS:
        q = get_quantizer(design, scale_bits=8)
        whole = q.quantize(x, 3, "value")
        parts = QuantizedBlock.cat([q.quantize(x[:, :, i:i + 32], 3, "value") for i in (0, 32, 64)])
        for a, b in zip(whole._tensors(), parts._tensors()):
            assert torch.equal(a, b)
        middle = whole.tokens(32, 64)
        assert torch.equal(q.dequantize(middle, "value"), q.dequantize(whole, "value")[:, :, 32:64])
        assert whole.token_block == SCALE_BLOCK_TOKENS
        with pytest.raises(ValueError, match="not aligned to blocks of 32 tokens"):
            whole.tokens(1, 33)
        with pytest.raises(ValueError, match="blocks of 32 tokens; got 16"):
            q.quantize(x[:, :, :16], 3, "value")


def test_rates_count_every_stored_byte():
    """A 64-channel row group: 16 bits of scale and zero-point per row plus 48 bits per super-block of 32 rows
    (0.273 bits per element instead of 0.5); kivi keys over 32 tokens: 16 / 32 + 48 / (32 x 64)."""
    assert unit_bits_per_element("token", 32, 3, "key", 64, scale_bits=8) == 3 + 16 / 64 + 48 / (32 * 64)
    assert unit_bits_per_element("rotated", 32, 2, "value", 64, scale_bits=8) == 2 + 16 / 64 + 48 / (32 * 64)
    assert unit_bits_per_element("kivi", 32, 2, "key", 64, scale_bits=8) == 2 + 16 / 32 + 48 / (32 * 64)
    assert unit_bits_per_element("kivi", 32, 2, "value", 64, scale_bits=8) == 2 + 16 / 32 + 48 / (32 * 32)
    assert unit_bits_per_element("kivi", 64, 2, "key", 64, scale_bits=8) == 2 + 16 / 64 + 48 / (64 * 64)


@pytest.fixture(scope="module")
def llama_config():
    return LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, num_attention_heads=4, hidden_size=128,
                       head_dim=32, vocab_size=64)


@pytest.mark.parametrize("quantizer", DESIGNS)
def test_cache_stores_bytes_and_crops_inside_a_super_block(llama_config, quantizer):
    """The stored scales are bytes and the cache holds fewer bytes than with 16-bit ones (its bytes against
    `cache_bytes`: `test_cli.test_cache_bytes_equal_a_real_cache`); a crop inside a super-block returns its tokens
    to the window and leaves the rest as it was."""
    bits = torch.tensor([[[3, 16], [1, 5]], [[2, 2], [8, 4]], [[4, 1], [16, 16]]])
    fp = ModelFingerprint.from_model_config(llama_config)
    config = RateQuantConfig.from_bits(bits, CacheLayout(quantizer=quantizer, residual_length=64, scale_bits=8))
    cache = RateQuantCache(config=llama_config, quant_config=config)
    states = torch.randn(2, 2, 333, 32, generator=torch.Generator().manual_seed(0))
    for layer in range(3):
        cache.update(states, states, layer)
    stored = [b for b in cache.layers[1].past_keys.data if b is not None]
    assert stored and all(b.scale.dtype == torch.uint8 for b in stored)
    sixteen = RateQuantConfig.from_bits(bits, CacheLayout(quantizer=quantizer, residual_length=64))
    assert cache.nbytes < cache_bytes(sixteen, fp, 333, batch=2, dtype=torch.float32).total
    before = cache.layers[0].past_keys.dequantize(0, 100, states)
    cache.crop(250)
    assert cache.get_seq_length() == 250 and cache.layers[0].past_keys.num_tokens % 32 == 0
    assert torch.equal(cache.layers[0].past_keys.dequantize(0, 100, states), before)


@pytest.mark.parametrize("tokens", [10, 99, 130, 200, 333])
def test_sliding_layers_release_and_drop_whole_super_blocks(tokens):
    """With G = 8 the window releases tokens in super-blocks of 32 (8-bit scales), and a sliding layer drops
    them whole: bytes as `cache_bytes` says, and decoding keeps every part aligned."""
    model_config = Gemma3TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, sliding_window=100,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    config = RateQuantConfig.from_bits(torch.tensor([[[3, 2], [1, 4]], [[2, 2], [8, 4]], [[4, 1], [16, 3]]]),
                                       CacheLayout(residual_length=16, group_size=8, sink_length=8, scale_bits=8))
    cache = RateQuantCache(config=model_config, quant_config=config)
    states = torch.randn(1, 2, tokens, 32, generator=torch.Generator().manual_seed(1))
    for layer in range(3):
        cache.update(states, states, layer)
    assert cache.layers[2].flush_block == 32
    footprint = cache_bytes(config, ModelFingerprint.from_model_config(model_config), tokens, dtype=torch.float32)
    assert footprint.total == cache.nbytes and footprint.bytes_16bit == cache.nbytes_16bit()
    for step in range(40):  # decoding keeps every layer's parts aligned
        one = torch.randn(1, 2, 1, 32, generator=torch.Generator().manual_seed(100 + step))
        for layer in range(3):
            keys, _ = cache.update(one, one, layer)
            assert torch.isfinite(keys).all()
    for layer in cache.layers:
        held = [b.shape[2] if isinstance(b, torch.Tensor) else b.num_tokens
                for b in layer.past_keys.data if b is not None]
        assert all(n % 32 == 0 for n in held)


def test_generate_with_coded_scales_matches_full_precision_on_a_short_prompt(tiny_llama):
    """Eight-bit codes with 8-bit scales are nearly lossless: greedy decoding agrees with DynamicCache for a
    prompt longer than the window."""
    model = tiny_llama
    ids = torch.randint(1, 100, (1, 260), generator=torch.Generator().manual_seed(0))
    config = RateQuantConfig.uniform(model.config, bits=8, scale_bits=8)
    out = model.generate(ids, past_key_values=RateQuantCache(quant_config=config, config=model.config),
                         max_new_tokens=8, do_sample=False)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)


def test_config_schema_5_round_trips_and_old_readers_refuse_it(tmp_path):
    model_config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=128)
    config = RateQuantConfig.uniform(model_config, bits=3, scale_bits=8)
    assert config.version == 5 and config.layout.scale_bits == 8
    assert "8-bit scales" in config.layout.describe()
    config.save_pretrained(tmp_path)
    loaded = RateQuantConfig.from_pretrained(tmp_path)
    assert loaded.scale_bits == 8 and loaded.version == 5
    plain = RateQuantConfig.uniform(model_config, bits=3)
    assert "scale_bits" not in plain.to_dict() and plain.version == 2  # older releases read it as before
    assert RateQuantConfig.from_dict({k: v for k, v in plain.to_dict().items()}).scale_bits == 16
    data = config.to_dict()
    data["version"] = 4
    with pytest.raises(ValueError, match="schema version 4 but hold scale_bits=8"):
        RateQuantConfig.from_dict(data)
    for bad in (12, 8.0, "8", True, None, [8]):
        data["version"], data["scale_bits"] = 5, bad
        with pytest.raises(ValueError, match="scale_bits=.* must be 16"):
            RateQuantConfig.from_dict(data)
    with pytest.raises(ValueError, match="scale_bits=4 is not a scale precision"):
        CacheLayout(scale_bits=4)
    assert true_bits_per_element(config, 64) < true_bits_per_element(plain, 64) - 0.4


def test_calibrate_with_coded_scales_stores_them_within_the_budget():
    from test_options import TEXT, _CharTokenizer, _tiny

    from hf_ratequant.calibration import calibrate

    model = _tiny()
    config = calibrate(model, _CharTokenizer(), data=TEXT, quantizer="token", budget=2.5, budget_unit="true",
                       scale_bits=8, groups=(32,), n_samples=2, n_validation=2, seq_len=256, progress=False)
    assert config.scale_bits == 8 and config.version == 5
    assert true_bits_per_element(config, 64) <= 2.5 + 1e-9
    # 2 code bits with 16-bit scales cost 2.5: with 8-bit ones the same bytes buy more code bits
    assert config.average_bits > 2.0
    cache = RateQuantCache.from_pretrained(config, model=model)
    out = model.generate(torch.randint(1, 128, (1, 300)), max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 303)
    assert all(b.ranges is not None for b in cache.layers[0].past_keys.data if b is not None)


def test_command_line_takes_scale_bits():
    from hf_ratequant.cli import _calibration_overrides, build_parser

    parser = build_parser()
    args = parser.parse_args(["calibrate", "-o", "x", "--scale-bits", "8", "--budget-unit", "true"])
    assert _calibration_overrides(args)["scale_bits"] == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "-o", "x", "--scale-bits", "4"])



def test_calibrate_with_coded_scales_without_groups_allocates_bytes():
    """Without other group sizes, a true budget with 8-bit scales is still allocated over bytes: the code budget is
    the most the units can average within them, and the fixed configurations of at most the budget race."""
    from test_options import TEXT, _CharTokenizer, _tiny

    from hf_ratequant.calibration import calibrate

    model = _tiny()
    config = calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=3.0, budget_unit="true",
                       scale_bits=8, n_samples=2, n_validation=2, seq_len=256, progress=False)
    record = config.calibration
    assert config.scale_bits == 8 and true_bits_per_element(config, 64) <= 3.0 + 1e-9
    assert any(name.startswith("ratequant-options") for name in record["validation_kl"])
    assert "K2g32V2g32" in record["validation_kl"]  # 2.53 true bits: the richest fixed pair within 3
    assert config.budget <= 3.0 - 0.53


@pytest.mark.parametrize("quantizer", DESIGNS)
def test_the_ops_take_the_stored_bytes(llama_config, quantizer):
    """The cache hands the ops its 8-bit scales as stored (byte codes and the super-blocks' numbers, nothing decoded
    in PyTorch per step); schemas and fake implementations agree (`opcheck`), and the op's keys and values are what
    the cache's own dequantization gives."""
    config = RateQuantConfig.uniform(llama_config, 3, quantizer=quantizer, group_size=32, residual_length=32,
                                     sink_length=32, scale_bits=8)
    cache = RateQuantCache(config=llama_config, quant_config=config, attention="dequantize")
    gen = torch.Generator().manual_seed(4)
    shape = (1, llama_config.num_key_value_heads, 150, llama_config.hidden_size // llama_config.num_attention_heads)
    layer = cache.layers[0]
    layer.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    args = layer._op_args()
    n = len(args) // 2
    for kind in (args[:n], args[n:]):
        scale, ranges = kind[2], kind[6]
        assert all(s.dtype == torch.uint8 for s in scale) and all(r.numel() for r in ranges)
    full = (*args, layer.keys, layer.values, quantizer)
    torch.library.opcheck(torch.ops.hf_ratequant.dequantize_layer.default, full)
    query = torch.randn(1, llama_config.num_attention_heads, 1, shape[-1], generator=gen)
    torch.library.opcheck(torch.ops.hf_ratequant.decode_attention.default, (query, None, *full, 0.125))
    keys, values = torch.ops.hf_ratequant.dequantize_layer(*full)
    held = layer.get_seq_length()
    want_k = layer.past_keys.dequantize(0, layer.past_keys.num_tokens, layer.keys)
    want_v = layer.past_values.dequantize(0, layer.past_values.num_tokens, layer.values)
    assert keys.shape[2] == values.shape[2] == held
    assert torch.equal(keys[:, :, : want_k.shape[2]], want_k) and torch.equal(values[:, :, : want_v.shape[2]], want_v)


def test_scale_steps_are_the_correctly_rounded_powers_and_codes_the_finest_that_cover():
    """The step table is 2^(-e/32) rounded once to float32 (not torch's vectorised exp2, which is one ulp off for
    some codes on AVX2), and each group takes the largest code whose step still covers its need."""
    table = scales.steps(torch.device("cpu"))
    exact = torch.tensor([2.0 ** (-e / 32) for e in range(256)], dtype=torch.float64).float()
    assert torch.equal(table, exact) and table[0] == 1 and table[32] == 0.5
    lo = torch.zeros(1, 1, 32, 1)
    hi = torch.tensor([1.0, *[table[e].item() for e in range(31)]]).reshape(1, 1, 32, 1)  # 1 bit: need = hi
    hi[0, 0, 5] = torch.nextafter(table[4], torch.tensor(1.0))  # just above step 4: step 3 covers it
    e, _, _, scale, _ = scales.encode(lo, hi, 1, torch.float32, 32, False, lambda t, dtype, up: t)
    assert e.flatten()[1:].tolist() == [0, *range(1, 4), 3, *range(5, 31)]
    assert bool((scale >= hi).all())


_CODES_SCRIPT = """
import hashlib, torch
from hf_ratequant.quantizers import get_quantizer, scales
h = hashlib.sha256()
for shrink in (1.0, 1 - 1e-6):  # a group on every step of the table, and one just below each
    need = torch.tensor([2.0 ** (-e / 32) * (shrink if e % 32 else 1.0) for e in range(256)]).reshape(1, 1, 256, 1)
    for t in scales.encode(torch.zeros_like(need), need, 1, torch.float32, 32, False, lambda t, dtype, up: t):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
g = torch.Generator().manual_seed(0)  # integers times powers of two: the same input on every instruction set
x = torch.randint(-999, 1000, (2, 3, 64, 64), generator=g).float() * torch.exp2(torch.arange(64.0) % 13 - 9)
for design in ("kivi", "token", "rotated"):
    for kind in ("key", "value"):
        q = get_quantizer(design, 32, 8).quantize(x, 3, kind)
        for t in (q.codes, q.scale, q.zero, q.ranges):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_coded_scales_are_the_same_on_every_cpu_instruction_set():
    """A config must give the same cache on every machine: the 8-bit codes, scale and zero-point bytes and
    super-block numbers with this CPU's vectorised kernels equal those of PyTorch's portable ones
    (`ATEN_CPU_CAPABILITY=default`). With the exp2 table of before, one ulp apart on AVX2, they did not."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    portable = subprocess.run([sys.executable, "-c", _CODES_SCRIPT], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    native = subprocess.run([sys.executable, "-c", _CODES_SCRIPT], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert len(portable) == 64 and native == portable
