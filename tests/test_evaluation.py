"""Perplexity and KL through the real cache, on a tiny random model."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ratequant import RateQuantConfig
from hf_ratequant.evaluation import evaluate_kl, evaluate_perplexity, evaluate_quality, reference_logprobs
from hf_ratequant.models import cache_kwargs


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
                                                                    residual_length=0, sink_length=0), chunk=16)
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


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap"])
def test_a_reference_over_the_memory_bound_keeps_hidden_states_and_gives_the_same_kl(model, windows, arch):
    """Past `max_bytes` the reference holds tokens x hidden size, not tokens x vocabulary (for a 262k vocabulary
    the difference between 21 MB and 8.6 GB), and recomputes each chunk's log-probabilities: the same KL."""
    if arch != "llama":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, final_logit_softcapping=2.0, sliding_window=4096,
        )).eval()
    cfg = RateQuantConfig.uniform(model.config, bits=3, group_size=8, residual_length=8)
    stored = reference_logprobs(model, windows, batch_size=2)
    bounded = reference_logprobs(model, windows, batch_size=2, max_bytes=0)
    assert all(r.logprobs is not None for r in stored) and all(r.hidden is not None for r in bounded)
    assert sum(r.nbytes for r in bounded) == windows.shape[0] * (windows.shape[1] - 1) * 64 * 4
    for a, b in zip(stored, bounded):
        torch.testing.assert_close(b.slice(0, a.logprobs.shape[1]), a.logprobs, rtol=1e-5, atol=1e-5)
    want = evaluate_quality(model, windows, cfg, chunk=16, batch_size=2, progress=False, reference=stored)
    got = evaluate_quality(model, windows, cfg, chunk=16, batch_size=2, progress=False, reference=bounded)
    assert got.kl == pytest.approx(want.kl, rel=1e-5) and got.perplexity == want.perplexity


def test_a_model_whose_logits_are_not_its_head_of_hidden_keeps_full_log_probabilities(windows, caplog):
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, logit_scale=0.25,
    )).eval()
    ref = reference_logprobs(model, windows, batch_size=2, max_bytes=0)
    assert all(r.logprobs is not None for r in ref) and "keeps full log-probabilities" in caplog.text
    with torch.no_grad():
        logits = model(input_ids=windows[:2]).logits[:, :-1]
    torch.testing.assert_close(ref[0].logprobs, torch.log_softmax(logits, -1))


def test_stop_above_stops_after_the_chunk_that_passes_it(model, windows):
    cfg = _mixed(model, "kivi", 16, 8)
    ref = reference_logprobs(model, windows, batch_size=2)
    full = evaluate_quality(model, windows, cfg, chunk=8, batch_size=2, progress=False, reference=ref)
    assert full.complete and full.kl > 0
    total = full.kl * full.tokens
    same = evaluate_quality(model, windows, cfg, chunk=8, batch_size=2, progress=False, reference=ref,
                            stop_above=total * 1.001)
    assert (same.kl, same.tokens, same.complete) == (full.kl, full.tokens, True)
    part = evaluate_quality(model, windows, cfg, chunk=8, batch_size=2, progress=False, reference=ref,
                            stop_above=total / 3)
    assert not part.complete and part.tokens < full.tokens and total / 3 < part.kl * part.tokens <= total * 1.0001
    shorter = evaluate_quality(model, windows, cfg, chunk=8, batch_size=2, progress=False, reference=ref,
                               stop_above=part.kl * part.tokens * 0.999)  # passed one chunk earlier at the latest
    assert shorter.tokens <= part.tokens
    with pytest.raises(ValueError, match="stop_above"):
        evaluate_quality(model, windows, cfg, progress=False, with_kl=False, stop_above=1.0)


# ---- the shared prefix: the start of the windows that every cache of one (R, S, G) serves exactly ---------------


def _mixed(model, quantizer, residual_length, sink_length, group_size=8, seed=0):
    from hf_ratequant.config import ModelFingerprint

    fp = ModelFingerprint.from_model_config(model.config)
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(1, 5, (fp.num_layers, fp.num_kv_heads, 2), generator=g).tolist()
    return RateQuantConfig(
        key_bits=[[u[0] for u in layer] for layer in bits], value_bits=[[u[1] for u in layer] for layer in bits],
        quantizer=quantizer, group_size=group_size, residual_length=residual_length, sink_length=sink_length,
        budget=2.5, b_min=1, b_max=4, fingerprint=fp,
    )


@pytest.mark.parametrize("quantizer", ["kivi", "token", "rotated"])
@pytest.mark.parametrize(("residual_length", "sink_length", "chunk"),
                         [(16, 8, 8), (24, 0, 16), (8, 16, 12), (80, 8, 8)])
def test_shared_prefix_gives_the_same_results_bit_for_bit(model, windows, quantizer, residual_length, sink_length,
                                                          chunk):
    from hf_ratequant.evaluation import exact_prefix_length, shared_prefix

    ref = reference_logprobs(model, windows, batch_size=2)
    configs = [_mixed(model, quantizer, residual_length, sink_length, seed=s) for s in range(2)]
    prefix = shared_prefix(model, windows, configs[0], chunk=chunk, batch_size=2, reference=ref)
    length = exact_prefix_length(configs[0], chunk, windows.shape[1])
    assert prefix is not None and prefix.length == length > 0
    for cfg in configs:
        plain = evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=2, progress=False, reference=ref)
        shared = evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=2, progress=False, reference=ref,
                                  prefix=prefix)
        assert (shared.perplexity, shared.kl, shared.tokens) == (plain.perplexity, plain.kl, plain.tokens)
        assert (shared.kl > 1e-6) == (length < windows.shape[1])  # R = 80: all 96 tokens are served exactly
        for stop in (shared.kl * shared.tokens / 2, 0.0):  # stopped early: at the same chunk, with the same sums
            plain_stop, shared_stop = (evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=2, progress=False,
                                                        reference=ref, prefix=p, stop_above=stop)
                                       for p in (None, prefix))
            assert plain_stop == shared_stop
        no_kl = evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=2, progress=False, with_kl=False,
                                 prefix=prefix)
        assert no_kl.perplexity == plain.perplexity


@pytest.mark.parametrize(("quantizer", "residual_length", "sink_length", "chunk"),
                         [("kivi", 16, 8, 8), ("token", 8, 16, 12), ("rotated", 80, 8, 8)])
@pytest.mark.parametrize("max_bytes", [None, 0])  # log-probabilities stored / recomputed from the hidden states
def test_reference_and_prefix_in_one_pass_are_those_of_two(model, windows, quantizer, residual_length, sink_length,
                                                           chunk, max_bytes):
    from hf_ratequant.evaluation import reference_and_prefix, shared_prefix

    limit = {} if max_bytes is None else {"max_bytes": max_bytes}
    cfg = _mixed(model, quantizer, residual_length, sink_length)
    ref, prefix = reference_and_prefix(model, windows, cfg, chunk=chunk, batch_size=2, **limit)
    alone = reference_logprobs(model, windows, batch_size=2, **limit)
    assert [r.hidden is None for r in ref] == [r.hidden is None for r in alone] == [max_bytes is None] * 2
    for ours, theirs in zip(ref, alone):  # the rest of each window fed after the prefix's chunks: float rounding
        assert torch.allclose(ours.slice(0, windows.shape[1] - 1), theirs.slice(0, windows.shape[1] - 1), atol=1e-5)
    two = shared_prefix(model, windows, cfg, chunk=chunk, batch_size=2, reference=ref)
    assert (prefix.length, prefix.chunk, prefix.with_kl) == (two.length, two.chunk, two.with_kl)
    for ours, theirs in zip(prefix.states, two.states):
        assert all(torch.equal(a, b) for pair, other in zip(ours, theirs) for a, b in zip(pair, other))
    assert all(torch.equal(a, b) for a, b in zip(prefix.last_logits, two.last_logits))
    assert prefix.scores == two.scores
    plain = evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=2, progress=False, reference=ref)
    shared = evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=2, progress=False, reference=ref,
                              prefix=prefix)
    assert shared == plain and (plain.kl > 1e-6) == (prefix.length < windows.shape[1])  # R = 80: all served exactly


def test_reference_and_prefix_without_a_prefix_for_short_sliding_windows(windows):
    from transformers import MistralConfig, MistralForCausalLM

    from hf_ratequant.evaluation import reference_and_prefix

    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=48)).eval()
    ref, prefix = reference_and_prefix(sliding, windows, _mixed(sliding, "kivi", 16, 8), chunk=8, batch_size=2)
    assert prefix is None
    assert all(torch.equal(a.logprobs, b.logprobs)
               for a, b in zip(ref, reference_logprobs(sliding, windows, batch_size=2)))


@pytest.mark.parametrize("seed", range(40))
def test_exact_prefix_length_is_where_the_cache_first_serves_a_quantized_token(model, seed):
    """Against the cache itself: feed chunks and look at what it holds quantized before each one."""
    from hf_ratequant import RateQuantCache
    from hf_ratequant.evaluation import exact_prefix_length

    g = torch.Generator().manual_seed(seed)
    group = 2 ** int(torch.randint(0, 4, (1,), generator=g))  # dividing head_dim, as the quantizers need
    residual, sinks = (group * int(torch.randint(0, 12, (1,), generator=g)),
                       group * int(torch.randint(0, 4, (1,), generator=g)))
    chunk, window = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(2, 120, (1,), generator=g))
    cfg = RateQuantConfig.uniform(model.config, bits=2, group_size=group, residual_length=residual, sink_length=sinks)
    cache = RateQuantCache(config=model.config, quant_config=cfg)
    k = torch.zeros(1, 2, 1, 32)
    expected = window
    for start in range(0, window, chunk):
        if cache.layers[0].past_keys.num_tokens > sinks:  # this chunk reads quantized tokens
            expected = start
            break
        n = min(chunk, window - start)
        cache.update(k.expand(1, 2, n, 32).clone(), k.expand(1, 2, n, 32).clone(), 0)
    assert exact_prefix_length(cfg, chunk, window) == expected


def test_shared_prefix_refuses_other_settings(model, windows):
    from hf_ratequant.evaluation import shared_prefix

    ref = reference_logprobs(model, windows, batch_size=2)
    cfg = _mixed(model, "kivi", 16, 8)
    prefix = shared_prefix(model, windows, cfg, chunk=8, batch_size=2, reference=ref)
    with pytest.raises(ValueError, match="residual_length=24.*exact for"):
        evaluate_quality(model, windows, _mixed(model, "kivi", 24, 8), chunk=8, batch_size=2, progress=False,
                         reference=ref, prefix=prefix)
    with pytest.raises(ValueError, match="other windows, chunk or batch_size"):
        evaluate_quality(model, windows, cfg, chunk=16, batch_size=2, progress=False, reference=ref, prefix=prefix)
    with pytest.raises(ValueError, match="other windows, chunk or batch_size"):
        evaluate_quality(model, windows.flip(1), cfg, chunk=8, batch_size=2, progress=False, reference=ref,
                         prefix=prefix)
    with pytest.raises(ValueError, match="only start a RateQuantConfig"):
        evaluate_quality(model, windows, None, chunk=8, batch_size=2, progress=False, prefix=prefix)
    with pytest.raises(ValueError, match="precomputed `reference`"):
        evaluate_quality(model, windows, cfg, chunk=8, batch_size=2, progress=False, prefix=prefix)
    no_ref = shared_prefix(model, windows, cfg, chunk=8, batch_size=2)
    with pytest.raises(ValueError, match="precomputed `reference`"):
        evaluate_quality(model, windows, cfg, chunk=8, batch_size=2, progress=False, reference=ref, prefix=no_ref)


def test_what_is_shared_without_a_residual_window_or_with_short_sliding_windows(model, windows):
    from transformers import MistralConfig, MistralForCausalLM

    from hf_ratequant.evaluation import shared_prefix

    assert shared_prefix(model, windows, _mixed(model, "kivi", 0, 0), chunk=8, batch_size=2).length == 8  # 1st chunk
    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=48)).eval()
    assert shared_prefix(sliding, windows, _mixed(sliding, "kivi", 16, 8), chunk=8, batch_size=2) is None


def test_kl_equals_the_kl_computed_by_hand_from_raw_logits(windows):
    """KL(full precision || quantized cache) per predicted token, from the raw logits of both, with nothing of
    `evaluate_quality`'s code: the windows fed chunk by chunk through a fresh `RateQuantCache`, the reference one
    forward pass over each whole window."""
    from hf_ratequant import RateQuantCache

    torch.manual_seed(0)  # larger weights than the default init: peaked distributions, a KL far above float noise
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         initializer_range=0.2)).eval()

    cfg = RateQuantConfig.uniform(model.config, key_bits=1, value_bits=2, group_size=8, residual_length=8,
                                  sink_length=0)
    chunk = 16
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            ids = ids[None]
            cache = RateQuantCache(config=model.config, quant_config=cfg)
            feed = cache_kwargs(model, cache)
            logits = torch.cat([model(input_ids=ids[:, s : s + chunk], use_cache=True, **feed).logits
                                for s in range(0, ids.shape[1], chunk)], dim=1)[0, :-1].double()
            ref = model(input_ids=ids).logits[0, :-1].double()
            p_ref = torch.softmax(ref, -1)
            kl = (p_ref * (torch.log(p_ref) - torch.log(torch.softmax(logits, -1)))).sum(-1)
            total, tokens = total + kl.sum().item(), tokens + kl.numel()
    res = evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=2, progress=False)
    assert res.tokens == tokens
    assert res.kl > 1e-4  # far from zero (16 bits: below 1e-9), so the comparison means something
    # evaluate_quality works in float32 log-probabilities (~4.6 nats each), the hand computation in float64
    assert res.kl == pytest.approx(total / tokens, rel=2e-3)


def test_the_library_passes_its_cache_under_the_name_the_installed_transformers_takes(model, windows):
    """transformers 5.24 renamed the models' cache argument `past_key_values` -> `cache` (the old name warns and is
    to be removed): the library's own calls use whichever name the model's forward takes, so they neither warn on
    new versions nor pass an argument old ones would not read."""
    import inspect
    import warnings

    from hf_ratequant.models import cache_kwargs

    params = inspect.signature(type(model).forward).parameters
    (name,) = cache_kwargs(model, None)
    assert name in params
    assert name == ("cache" if "cache" in params and "past_key_values" not in params else "past_key_values")
    assert cache_kwargs(object(), None) == {"past_key_values": None}  # nothing readable: the long-standing name
    cfg = RateQuantConfig.uniform(model.config, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        res = evaluate_quality(model, windows[:1], cfg, chunk=16, progress=False)
    assert math.isfinite(res.kl)
