"""The `--cache` grammar (`hf_ratequant.cache_spec`) and the command line: arguments checked before any work, help
text with defaults, what the subcommands print."""

import pytest
import torch
from transformers import LlamaConfig

from hf_ratequant import RateQuantConfig
from hf_ratequant.cache_spec import CacheSpec, parse_cache_spec
from hf_ratequant.settings import CacheLayout


@pytest.fixture
def llama_config():
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, architectures=["LlamaForCausalLM"],
    )


# ---- the cache-spec grammar ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("none", CacheSpec("none", "none")),
    (" FP16 ", CacheSpec("FP16", "none")),
    ("uniform:3", CacheSpec("uniform:3", "uniform", 3, 3)),
    ("kv:3,2", CacheSpec("kv:3,2", "kv", 3, 2)),
    ("kv: 4 , 16", CacheSpec("kv: 4 , 16", "kv", 4, 16)),
    ("user/config", CacheSpec("user/config", "saved", source="user/config")),
])
def test_parse_cache_spec(text, expected):
    assert parse_cache_spec(text) == expected


@pytest.mark.parametrize("bad, error, words", [
    ("bogus", ValueError, "accepted are"),
    ("kv:3", ValueError, "kv:KBITS,VBITS"),
    ("kv:3,2,1", ValueError, "kv:KBITS,VBITS"),
    ("uniform:x", ValueError, "not an integer"),
    ("uniform:9", ValueError, "not a valid bit-width"),
    ("./no/such/folder", FileNotFoundError, "no such folder"),
    (3, TypeError, "string"),
])
def test_malformed_specs_fail_at_parse(bad, error, words):
    with pytest.raises(error, match=words):
        parse_cache_spec(bad)


def test_build_fixed_specs_take_the_default_layout(llama_config):
    assert parse_cache_spec("none").build(llama_config) is None
    uniform = parse_cache_spec("uniform:3").build(llama_config)
    assert uniform.average_bits == 3 and uniform.layout == CacheLayout()
    assert uniform.sink_length == 32  # the same sinks a calibrated config keeps
    split = parse_cache_spec("kv:3,2").build(llama_config, CacheLayout(sink_length=0, quantizer="token"))
    assert split.key_bits[0] == [3, 3] and split.value_bits[0] == [2, 2]
    assert split.sink_length == 0 and split.quantizer == "token"


def test_saved_config_keeps_its_layout_and_refuses_a_contradiction(llama_config, tmp_path):
    RateQuantConfig.uniform(llama_config, bits=4, sink_length=0).save_pretrained(tmp_path)
    spec = parse_cache_spec(str(tmp_path))
    assert spec.kind == "saved"
    assert spec.build(llama_config).sink_length == 0
    # a layout that was not set on purpose does not apply to a saved config
    assert spec.build(llama_config, CacheLayout(), explicit=()).sink_length == 0
    assert spec.build(llama_config, CacheLayout(group_size=64), explicit={"quantizer"}).group_size == 32
    with pytest.raises(ValueError, match=r"sink_length=32 \(--sink-length\) does not apply to the saved config.*"
                                         r"keeps sink_length=0"):
        spec.build(llama_config, CacheLayout(), explicit={"sink_length"})
    with pytest.raises(ValueError, match="sink_length=32"):
        spec.build(llama_config, CacheLayout())  # a layout passed in Python is checked whole


def test_bad_layout_for_a_shorthand_is_refused(llama_config):
    with pytest.raises(ValueError, match="multiple of group_size"):
        parse_cache_spec("kv:3,2").build(llama_config, CacheLayout(sink_length=12))


# ---- what the numbers mean: true bits and bytes by part -------------------------------------------------------------
def test_true_bits_count_scales_and_zero_points(llama_config):
    from hf_ratequant.footprint import true_bits_per_element

    two = RateQuantConfig.uniform(llama_config, bits=2)
    assert true_bits_per_element(two, head_dim=32) == 2 + 2 * 16 / 32  # a 16-bit scale and zero-point per 32
    assert true_bits_per_element(two, head_dim=32, dtype=torch.float32) == 2 + 2 * 32 / 32
    kept = RateQuantConfig.uniform(llama_config, key_bits=16, value_bits=2)
    assert true_bits_per_element(kept, head_dim=32) == (16 + 3) / 2


@pytest.mark.parametrize("quantizer", ["kivi", "token", "rotated"])
@pytest.mark.parametrize("tokens, chunk", [(40, 40), (200, 7), (333, 64), (600, 600)])
def test_cache_bytes_equal_a_real_cache(llama_config, quantizer, tokens, chunk):
    from hf_ratequant import RateQuantCache
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import cache_bytes

    config = RateQuantConfig.from_bits(
        torch.tensor([[[3, 16], [1, 5]], [[2, 2], [8, 4]], [[4, 1], [16, 16]]]),
        CacheLayout(quantizer=quantizer, residual_length=64),
    )
    cache = RateQuantCache(config=llama_config, quant_config=config)
    states = torch.randn(2, 2, tokens, 32, generator=torch.Generator().manual_seed(0))
    for start in range(0, tokens, chunk):
        for layer in range(3):
            cache.update(states[:, :, start:start + chunk], states[:, :, start:start + chunk], layer)
    footprint = cache_bytes(config, ModelFingerprint.from_model_config(llama_config), tokens, batch=2,
                            dtype=torch.float32)
    assert footprint.total == cache.nbytes and footprint.bytes_16bit == cache.nbytes_16bit()
    assert footprint.sinks == (32 * 3 * 2 * 2 * 32 * 2 * 4 if tokens >= 64 + 64 else 0)
