"""RateQuantConfig: construction, validation, JSON + safetensors round trip, model checks."""

import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.config import CONFIG_NAME, CURVES_NAME, SCHEMA_VERSION, ModelFingerprint


@pytest.fixture
def llama_config():
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, architectures=["LlamaForCausalLM"],
    )


def test_uniform_and_split(llama_config):
    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    assert cfg.key_bits == [[4, 4]] * 3 and cfg.value_bits == [[4, 4]] * 3
    assert cfg.average_bits == 4 and cfg.method == "uniform"
    split = RateQuantConfig.uniform(llama_config, key_bits=3, value_bits=2, quantizer="rotated")
    assert split.average_bits == 2.5 and split.method == "kv-split" and split.quantizer == "rotated"
    assert split.bits_tensor().shape == (3, 2, 2)
    assert split.fingerprint.geometry() == (3, 2, 32)


@pytest.mark.parametrize("bits", [0, 9, 17, 2.5, "4", True])
def test_bad_bits_name_value_and_allowed(llama_config, bits):
    with pytest.raises(ValueError, match=r"not a valid bit-width.*1\.\.8.*16"):
        RateQuantConfig.uniform(llama_config, bits=bits)


def test_bad_tables():
    with pytest.raises(ValueError, match="different lengths"):
        RateQuantConfig(key_bits=[[4, 4], [4]], value_bits=[[4, 4], [4, 4]])
    with pytest.raises(ValueError, match=r"key_bits\[1\]\[0\]=0"):
        RateQuantConfig(key_bits=[[4, 4], [0, 4]], value_bits=[[4, 4], [4, 4]])
    with pytest.raises(ValueError, match="both must be num_layers x num_kv_heads"):
        RateQuantConfig(key_bits=[[4, 4]], value_bits=[[4, 4], [4, 4]])
    with pytest.raises(ValueError, match="Unknown quantizer 'hqq'.*kivi"):
        RateQuantConfig(key_bits=[[4]], value_bits=[[4]], quantizer="hqq")
    with pytest.raises(ValueError, match="multiple of group_size"):
        RateQuantConfig(key_bits=[[4]], value_bits=[[4]], group_size=32, residual_length=100)


def test_mismatched_model_refused_naming_both(llama_config):
    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    other = LlamaConfig(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, hidden_size=64)
    with pytest.raises(ValueError, match=r"3 layers x 2 kv-heads.*llama: 5 layers x 4 kv-heads"):
        RateQuantCache(config=other, quant_config=cfg)


def test_fingerprint_mismatch_with_same_geometry_refused(llama_config, caplog):
    from transformers import MistralConfig

    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    geometry = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32)
    mistral = MistralConfig(**geometry, sliding_window=64)
    with pytest.raises(ValueError, match=r"calibrated for LlamaForCausalLM.*but the model is mistral.*"
                                         r"model_type llama vs mistral.*sliding_window None vs 64"):
        RateQuantCache.from_pretrained(cfg, model_config=mistral)
    # A fine-tune (same architecture and geometry, another name) is used, with a warning.
    tuned_other = LlamaConfig(**geometry, architectures=["LlamaForCausalLM"])
    object.__setattr__(cfg, "fingerprint", dataclasses.replace(cfg.fingerprint, name_or_path="org/base"))
    tuned_other._name_or_path = "org/fine-tune"
    with caplog.at_level("WARNING", logger="hf_ratequant.config"):
        RateQuantCache.from_pretrained(cfg, model_config=tuned_other)
    assert "calibrated on org/base; the model is org/fine-tune" in caplog.text


def test_unsupported_layer_type_named(llama_config):
    llama_config.layer_types = ["full_attention", "linear_attention", "full_attention"]
    cfg = RateQuantConfig(key_bits=[[4, 4]] * 3, value_bits=[[4, 4]] * 3)
    with pytest.raises(ValueError, match=r"linear_attention.*cannot serve.*supported layer types"):
        RateQuantCache(config=llama_config, quant_config=cfg)


def test_save_load_roundtrip(tmp_path, llama_config):
    cfg = RateQuantConfig.uniform(llama_config, key_bits=3, value_bits=2)
    cfg.key_bits[0][1] = 16
    cfg.curves = {"alpha": torch.rand(3, 2, 2), "beta": torch.tensor(4.6)}
    cfg.calibration = {"tokens": 4096, "source": "pydoc"}
    cfg.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, CURVES_NAME]
    back = RateQuantConfig.from_pretrained(tmp_path)
    assert back.to_dict() == cfg.to_dict()
    assert back.fingerprint == cfg.fingerprint
    for k, v in cfg.curves.items():
        assert torch.equal(back.curves[k], v)
    cache = RateQuantCache.from_pretrained(tmp_path, model_config=llama_config)
    assert cache.layers[0].key_bits == [3, 16]


def test_unknown_keys_tolerated_newer_version_refused(tmp_path, llama_config):
    RateQuantConfig.uniform(llama_config, bits=4).save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data["from_the_future"] = {"x": 1}
    data["fingerprint"]["also_new"] = 3
    path.write_text(json.dumps(data))
    assert RateQuantConfig.from_pretrained(tmp_path).average_bits == 4
    data["version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="newer than the 1.*upgrade"):
        RateQuantConfig.from_pretrained(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        RateQuantConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RateQuantConfig.from_pretrained(tmp_path)


def test_failed_save_keeps_previous_artefact(tmp_path, llama_config, monkeypatch):
    good = RateQuantConfig.uniform(llama_config, bits=4)
    good.save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()
    bad = RateQuantConfig.uniform(llama_config, bits=2)
    monkeypatch.setattr(RateQuantConfig, "to_dict", lambda self: {"x": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        bad.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME]


def test_fingerprint_reads_sliding_and_gqa():
    from transformers import MistralConfig

    fp = ModelFingerprint.from_model_config(
        MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=64,
                      sliding_window=16)
    )
    assert fp.num_kv_heads == 1 and fp.head_dim == 16
    assert set(fp.layer_types) == {"sliding_attention"} and fp.sliding_window == 16


def test_cli_cache_specs(llama_config):
    from types import SimpleNamespace

    from hf_ratequant.cli import _parse_cache_spec

    model = SimpleNamespace(config=llama_config)
    assert _parse_cache_spec("none", model) is None
    assert _parse_cache_spec("uniform:3", model).average_bits == 3
    assert _parse_cache_spec("kv:3,2", model).key_bits[0] == [3, 3]
    for bad, words in [("bogus", "accepted are"), ("kv:3", "kv:KBITS,VBITS"), ("uniform:x", "not an integer"),
                       ("uniform:9", "not a valid bit-width")]:
        with pytest.raises(ValueError, match=words):
            _parse_cache_spec(bad, model)
