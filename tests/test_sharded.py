"""Models placed by accelerate (`device_map`, CPU and disk offload): the cache and calibration follow the layers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_ratequant import RateQuantCache, RateQuantConfig, calibrate
from tests.test_calibration import WordTokenizer, corpus


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


def _generate(model, quant):
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = RateQuantCache.from_pretrained(quant, model=model)
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=24,
                          do_sample=False)


def test_disk_offloaded_model_generates_the_same_tokens(saved, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(saved).eval()
    offloaded = AutoModelForCausalLM.from_pretrained(saved, device_map=DEVICE_MAP,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert getattr(offloaded, "hf_device_map", {}).get("model.layers.1") == "disk"
    quant = RateQuantConfig.uniform(plain.config, key_bits=4, value_bits=3, residual_length=8, group_size=8)
    assert torch.equal(_generate(offloaded, quant), _generate(plain, quant))


def test_disk_offloaded_model_calibrates_like_the_plain_one(saved, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(saved).eval()
    offloaded = AutoModelForCausalLM.from_pretrained(saved, device_map=DEVICE_MAP,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    settings = dict(n_samples=2, n_validation=1, seq_len=48, group_size=8, residual_length=8, sink_length=0,
                    b_min=2, b_max=4, progress=False)
    a = calibrate(plain, WordTokenizer(), [corpus(1000)], **settings)
    b = calibrate(offloaded, WordTokenizer(), [corpus(1000)], **settings)
    assert a.bits_tensor().tolist() == b.bits_tensor().tolist()
    assert torch.allclose(a.curves["distortion"], b.curves["distortion"], rtol=1e-4)
