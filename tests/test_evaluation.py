"""Perplexity and KL through the real cache, on a tiny random model."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ratequant import RateQuantConfig
from hf_ratequant.evaluation import evaluate_kl, evaluate_perplexity, evaluate_quality, reference_logprobs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 96, (3, 96), generator=torch.Generator().manual_seed(1))


def test_full_precision_perplexity_equals_one_forward(model, windows):
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    ppl = evaluate_perplexity(model, None, windows, None, chunk=16, batch_size=2)
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_16_bits_has_zero_kl_and_same_perplexity(model, windows):
    cfg = RateQuantConfig.uniform(model.config, bits=16, group_size=8, residual_length=8)
    res = evaluate_quality(model, windows, cfg, chunk=16, progress=False)
    ref = evaluate_quality(model, windows, None, chunk=16, progress=False)
    assert res.kl == pytest.approx(0, abs=1e-6)
    assert res.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    assert res.tokens == 3 * 95


def test_fewer_bits_more_kl(model, windows):
    kls = [
        evaluate_kl(model, None, windows, RateQuantConfig.uniform(model.config, bits=b, group_size=8,
                                                                    residual_length=0), chunk=16)
        for b in (8, 4, 2)
    ]
    assert 0 < kls[0] < kls[1] < kls[2]


def test_chunk_size_does_not_change_full_precision(model, windows):
    a = evaluate_perplexity(model, None, windows, None, chunk=7)
    b = evaluate_perplexity(model, None, windows, None, chunk=96)
    assert a == pytest.approx(b, rel=1e-5)


def test_bad_windows(model):
    with pytest.raises(ValueError, match="n_windows, window"):
        evaluate_perplexity(model, None, torch.zeros(5, dtype=torch.long))


def test_precomputed_reference_gives_the_same_kl(model, windows):
    cfg = RateQuantConfig.uniform(model.config, bits=3, group_size=8, residual_length=8)
    lockstep = evaluate_quality(model, windows, cfg, chunk=16, batch_size=2, progress=False)
    ref = reference_logprobs(model, windows, batch_size=2)
    cached = evaluate_quality(model, windows, cfg, chunk=16, batch_size=2, progress=False, reference=ref)
    assert cached.kl == pytest.approx(lockstep.kl, rel=1e-4)
    assert cached.perplexity == pytest.approx(lockstep.perplexity, rel=1e-6)
