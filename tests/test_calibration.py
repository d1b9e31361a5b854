"""Calibration on a tiny random model: capture, measure, fit, allocate, validate."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.calibration import allocation_candidates, calibrate, capture_states, measure_distortion

WORDS = "the a cat dog runs sleeps on under table mat quickly slowly red blue big small".split()


class WordTokenizer:
    """A deterministic whitespace tokenizer, enough for calibration windows."""

    def __init__(self):
        self.vocab = {w: i for i, w in enumerate(WORDS)}

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [self.vocab[w] for w in text.split() if w in self.vocab]}

    def encode(self, text, add_special_tokens=False, **kwargs):
        return self(text)["input_ids"]


def corpus(n_words, seed=0):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32,
    )
    return LlamaForCausalLM(cfg).eval()


def test_capture_leaves_model_unchanged(model):
    ids = torch.randint(0, len(WORDS), (2, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        logits = model(ids).logits
    states = capture_states(model, ids)
    assert len(states) == 2 and all(t.shape == (2, 2, 32, 32) for t in states[0])
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap"])
def test_the_loss_computed_a_few_tokens_at_a_time_gives_the_same_gradients(model, monkeypatch, arch):
    """Past `LOGITS_MAX_BYTES` the logits (tokens x vocabulary, with their gradient) are never materialised at once:
    the loss runs over chunks of the last hidden states, through the output layer (and Gemma 2's soft cap).
    Captured states, gradients and the attention-output rows are the same up to rounding."""
    import hf_ratequant.calibration as calibration

    if arch != "llama":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, final_logit_softcapping=2.0,
            sliding_window=4096,
        )).eval()
    ids = torch.randint(0, len(WORDS), (2, 40), generator=torch.Generator().manual_seed(5))
    kwargs = dict(residual_length=8, group_size=8, sink_length=8, attention=True)
    whole = capture_states(model, ids, **kwargs)
    monkeypatch.setattr(calibration, "LOGITS_MAX_BYTES", 0)
    monkeypatch.setattr(calibration, "_LOSS_CHUNK", 7)  # several chunks, the last one short
    chunked = capture_states(model, ids, **kwargs)
    for a, b in zip(whole, chunked):
        for x, y in zip(a[:4], b[:4]):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b[4][3], a[4][3], rtol=1e-4, atol=1e-7)  # the attention outputs' gradients
    assert whole[1][2].abs().sum() > 0


def test_a_batch_that_does_not_fit_is_measured_in_halves_with_the_same_table(model, monkeypatch, caplog):
    """The forward's saved tensors are counted as they are saved; past the limit the batch is split (a warning says
    so) and the table is the one of the whole batch. A single window that does not fit is a clear error."""
    import hf_ratequant.calibration as calibration
    from hf_ratequant.calibration import measure_distortions
    from hf_ratequant.memory_guard import OutOfCalibrationMemory, available_bytes

    ids = torch.randint(0, len(WORDS), (4, 64), generator=torch.Generator().manual_seed(9))
    kwargs = dict(group_size=8, batch_size=4, residual_length=8, progress=False)
    whole = measure_distortions(model, ids, ["kivi"], [2, 3, 4], **kwargs)["kivi"]

    def saved_bytes(n):  # the least limit under which n windows pass
        lo, hi = 1, 10**9
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                capture_states(model, ids[:n], residual_length=8, group_size=8, attention=True, memory_limit=mid)
                hi = mid
            except OutOfCalibrationMemory:
                lo = mid + 1
        return lo

    one, four = saved_bytes(1), saved_bytes(4)
    assert 3 * one < four < 5 * one  # the saved tensors grow with the batch
    monkeypatch.setattr(calibration, "_saved_bytes_limit", lambda m: (saved_bytes(2) + four) // 2)
    halves = measure_distortions(model, ids, ["kivi"], [2, 3, 4], **kwargs)["kivi"]
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-9)
    assert "measuring 2 at a time (batch_size=2" in caplog.text and "measuring 1" not in caplog.text
    monkeypatch.setattr(calibration, "_saved_bytes_limit", lambda m: one // 2)
    with pytest.raises(MemoryError, match="even one window at a time.*window of 64 tokens.*seq_len"):
        measure_distortions(model, ids, ["kivi"], [2, 3, 4], **kwargs)
    assert available_bytes("cpu") is None or available_bytes("cpu") > 0


def test_captured_gradient_is_the_loss_gradient(model):
    """The gradient on the captured keys equals a finite difference of the loss."""
    import copy

    model = copy.deepcopy(model).double()  # float64: the finite difference is not drowned by rounding
    ids = torch.randint(0, len(WORDS), (1, 16), generator=torch.Generator().manual_seed(3))
    k, _v, gk, _gv = capture_states(model, ids)[1]
    assert gk.abs().sum() > 0
    # Perturb layer 1's keys through a cache that adds eps to one entry.
    from hf_ratequant.calibration import _CaptureCache

    class Nudged(_CaptureCache):
        def update(self, key_states, value_states, layer_idx, *a, **kw):
            if layer_idx == 1:
                key_states = key_states.clone()
                key_states[0, 1, 5, 7] += eps
            return super().update(key_states, value_states, layer_idx, *a, **kw)

    eps = 1e-3
    losses = []
    for sign in (1, -1):
        eps = sign * 1e-3
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=Nudged(2), use_cache=True).logits  # float64
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
    fd = (losses[0] - losses[1]) / 2e-3
    assert fd.item() == pytest.approx(gk[0, 1, 5, 7].item(), rel=2e-2)


def test_distortion_falls_with_bits(model):
    ids = torch.randint(0, len(WORDS), (2, 64))
    table = measure_distortion(model, ids, "kivi", [2, 3, 4], group_size=8, progress=False)
    assert table.shape == (2, 2, 2, 3)
    assert (table[..., :-1] > table[..., 1:]).all()


def test_candidates_meet_the_budget():
    table = torch.rand(3, 2, 2, 1) * torch.tensor([4.0, 1.0, 0.25]).view(1, 1, 1, 3)
    for c in allocation_candidates(table, [2, 3, 4], 2.5):
        assert c.family == "ratequant" and c.bits.shape == (3, 2, 2) and c.bits.double().mean() == 2.5


def test_calibrate_end_to_end(model):
    cfg = calibrate(model, WordTokenizer(), [corpus(2000)], quantizer="kivi", budget=2.5, n_samples=2,
                    n_validation=2, seq_len=64, group_size=8, residual_length=8, b_min=2, b_max=4, chunk=16,
                    progress=False)
    assert isinstance(cfg, RateQuantConfig) and cfg.average_bits == 2.5
    scores = cfg.calibration["validation_kl"]
    assert all(kl > 0 for kl in scores.values())  # chunks of 16: later chunks read quantized tokens
    assert {"ratequant", "K3V2", "K2V3", "uniform-2"} - set(scores) == {"uniform-2"}
    assert cfg.method == min(scores, key=scores.get) and "kvq-beta4" not in cfg.calibration["candidates"]
    assert set(cfg.curves) >= {"alpha", "beta", "distortion"} and cfg.curves["alpha"].shape == (2, 2, 2)
    RateQuantCache(config=model.config, quant_config=cfg)
    # Part of the way from the best fixed split towards the measured optimum: validated too, and on the budget.
    from hf_ratequant.allocation import descent_path

    families = cfg.calibration["families"]
    origin = min((n for n in scores if families[n] == "fixed"), key=scores.get)
    k, v = (3, 2) if origin == "K3V2" else (2, 3)
    start = torch.tensor([k, v]).repeat(4)  # (layer, head, kind) flattened
    path = descent_path(cfg.curves["distortion"].double().reshape(-1, 3), torch.tensor([2, 3, 4]), start)
    near = {n: torch.tensor(b) for n, b in cfg.calibration["candidates"].items() if families[n] == "descent"}
    assert {n.rsplit("-", 1)[0] for n in near} == ({f"ratequant-from-{origin}"} if path else set())
    for name, bits in near.items():
        assert name in scores and torch.equal(bits.reshape(-1), path[int(name.rsplit("-", 1)[1]) - 1])


def test_calibrate_with_sinks_measures_and_validates_the_cache_with_them(model, monkeypatch):
    import hf_ratequant.calibration as calibration

    seen = []
    real = calibration.evaluate_quality
    monkeypatch.setattr(calibration, "evaluate_quality",
                        lambda m, w, cfg, **kw: seen.append(cfg) or real(m, w, cfg, **kw))
    kwargs = dict(quantizer="kivi", budget=2.5, n_samples=2, n_validation=1, seq_len=64, group_size=8,
                  residual_length=8, b_min=2, b_max=4, progress=False)
    plain = calibrate(model, WordTokenizer(), [corpus(2000)], sink_length=0, **kwargs)
    cfg = calibrate(model, WordTokenizer(), [corpus(2000)], sink_length=16, **kwargs)
    assert cfg.sink_length == 16 and plain.sink_length == 0
    assert {c.sink_length for c in seen} == {0, 16} and seen[-1].sink_length == 16  # validated with its sinks
    # By default: at least 32 sink tokens, in whole groups.
    assert calibrate(model, WordTokenizer(), [corpus(2000)], **{**kwargs, "group_size": 8}).sink_length == 32
    # The first 16 tokens are never read quantized, so their error carries no weight: the measure changes.
    assert not torch.equal(cfg.curves["distortion"], plain.curves["distortion"])
    with pytest.raises(ValueError, match="multiple of group_size"):
        calibrate(model, WordTokenizer(), [corpus(2000)], sink_length=12, **kwargs)
    # Windows too short for any query to read a quantized token: said before any work is done.
    with pytest.raises(ValueError, match=r"seq_len=48 is too short .* Use seq_len > 48"):
        calibrate(model, WordTokenizer(), [corpus(2000)], sink_length=32, **{**kwargs, "seq_len": 48})


def test_calibrate_bad_input(model):
    with pytest.raises(ValueError, match="tokens"):
        calibrate(model, WordTokenizer(), [corpus(50)], seq_len=64, n_samples=2, n_validation=1, group_size=8,
                  residual_length=8, progress=False)
    with pytest.raises(ValueError, match="Unknown quantizer"):
        calibrate(model, WordTokenizer(), [corpus(500)], quantizer="nf4", progress=False)
    with pytest.raises(ValueError, match="budget"):
        calibrate(model, WordTokenizer(), [corpus(2000)], budget=7.5, seq_len=64, n_samples=2, n_validation=1,
                  group_size=8, residual_length=8, progress=False)


def test_calibrate_to_a_budget_in_true_bits(model):
    """kivi with G = 8 on head_dim 32 stores a 16-bit scale and zero-point per 8 elements: +4 bits per element."""
    from hf_ratequant.footprint import true_bits_per_element

    kwargs = dict(quantizer="kivi", n_samples=2, n_validation=0, seq_len=64, group_size=8, residual_length=8,
                  sink_length=0, b_min=2, b_max=4, progress=False)
    cfg = calibrate(model, WordTokenizer(), [corpus(2000)], budget=6.5, budget_unit="true", **kwargs)
    assert cfg.average_bits == cfg.budget == 2.5 and true_bits_per_element(cfg, head_dim=32) == 6.5
    # Refused before any text is read (50 words are too few for any window).
    with pytest.raises(ValueError, match=r"3 true bits per element is outside \[6, 8\]"):
        calibrate(model, WordTokenizer(), [corpus(50)], budget=3, budget_unit="true", **kwargs)
    with pytest.raises(ValueError, match=r"6.4 true bits per element are 2.4 average code bits .* multiple of 1/8"):
        calibrate(model, WordTokenizer(), [corpus(50)], budget=6.4, budget_unit="true", **kwargs)
    with pytest.raises(ValueError, match="budget_unit='bytes' must be one of code, true"):
        calibrate(model, WordTokenizer(), [corpus(50)], budget=3, budget_unit="bytes", **kwargs)


def test_residual_split_mask_reads_each_key_once():
    from hf_ratequant.calibration import residual_split_mask
    from hf_ratequant.config import ModelFingerprint

    fp = ModelFingerprint("LlamaForCausalLM", 2, 2, 32, layer_types=("full_attention",) * 2)
    mask = residual_split_mask(40, residual_length=8, group_size=4, fingerprint=fp, dtype=torch.float32)
    allowed = mask[0, 0] == 0  # (T, 2T)
    far, near = allowed[:, :40], allowed[:, 40:]
    assert torch.equal(far | near, torch.ones(40, 40, dtype=torch.bool).tril())  # every past key exactly once...
    assert not (far & near).any()
    # ...from the far copy exactly when the cache holds it quantized while that query is decoded.
    for i in (0, 8, 11, 12, 15, 16, 39):
        assert int(far[i].sum()) == max(0, (i - 8) // 4 * 4)
    sliding = ModelFingerprint("MistralForCausalLM", 2, 2, 32, layer_types=("sliding_attention", "full_attention"),
                               sliding_window=16)
    masks = residual_split_mask(40, 8, 4, sliding, torch.float32)
    assert set(masks) == {"sliding_attention", "full_attention"}
    window = masks["sliding_attention"][0, 0] == 0
    assert int((window[:, :40] | window[:, 40:])[39].sum()) == 16


def test_residual_aware_gradient_is_the_gradient_through_quantized_keys(model):
    """The far-copy gradient equals a finite difference of the loss when only the far copy is perturbed."""
    import copy

    from hf_ratequant.calibration import _CaptureCache, residual_split_mask, residual_split_works
    from hf_ratequant.config import ModelFingerprint

    model = copy.deepcopy(model).double()
    ids = torch.randint(0, len(WORDS), (1, 40), generator=torch.Generator().manual_seed(5))
    assert residual_split_works(model, ids, residual_length=8, group_size=4)
    k, _v, gk, _gv = capture_states(model, ids, residual_length=8, group_size=4)[1]
    never = (39 - 8) // 4 * 4  # keys from here on are never read quantized, even by the last query
    assert gk[0, :, never:].abs().sum() == 0 and gk[0, :, never - 4 : never].abs().sum() > 0
    mask = residual_split_mask(40, 8, 4, ModelFingerprint.from_model_config(model.config), torch.float64)

    class Nudged(_CaptureCache):
        def update(self, key_states, value_states, layer_idx, *a, **kw):
            keys, values = super().update(key_states, value_states, layer_idx, *a, **kw)
            if layer_idx == 1:
                keys = keys.clone()
                keys[0, 1, 3, 7] += eps  # far copy of token 3
            return keys, values

    losses = []
    for eps in (1e-3, -1e-3):
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=Nudged(2, split=True), use_cache=True,
                           attention_mask=mask).logits
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
    fd = (losses[0] - losses[1]) / 2e-3
    assert gk[0, 1, 3, 7] != 0 and fd.item() == pytest.approx(gk[0, 1, 3, 7].item(), rel=2e-2)
    plain = capture_states(model, ids)[1][2]
    assert not torch.allclose(plain, gk)  # local attention no longer counts


def test_calibrate_falls_back_when_the_model_ignores_the_mask(model, monkeypatch, caplog):
    import hf_ratequant.calibration as calibration

    monkeypatch.setattr(calibration, "residual_split_works", lambda *a, **k: False)
    with caplog.at_level("WARNING", logger="hf_ratequant.calibration"):
        cfg = calibrate(model, WordTokenizer(), [corpus(2000)], n_samples=2, validate=False, seq_len=64,
                        group_size=8, residual_length=8, b_min=2, b_max=4, progress=False)
    assert "does not honour a custom attention mask" in caplog.text
    assert cfg.calibration["residual_aware"] is False


@pytest.mark.parametrize("residual_length", [8, 40])
@pytest.mark.parametrize("aligned", ["top-left", "bottom-right"])
def test_the_split_check_fails_for_an_attention_that_ignores_masks(model, residual_length, aligned):
    """The check runs on a window's first R + 2G tokens only, and tells an attention that honours the split mask
    from one that ignores it: plain causal attention over the [far, near] copies, aligned to the first key (torch's
    `is_causal`, which reads identical copies exactly as the split mask does) or to the last (flash attention's)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_ratequant.calibration import residual_split_works

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        q, k = query.shape[2], key.shape[2]
        causal = torch.ones(q, k, dtype=torch.bool).tril(diagonal=0 if aligned == "top-left" else k - q)
        return sdpa_attention_forward(module, query, key, value, causal, **kwargs)

    ids = torch.randint(0, len(WORDS), (2, 128), generator=torch.Generator().manual_seed(5))
    assert residual_split_works(model, ids, residual_length=residual_length, group_size=8)
    AttentionInterface.register("test_causal_only", causal_only)
    model.set_attn_implementation("test_causal_only")
    try:
        assert not residual_split_works(model, ids, residual_length=residual_length, group_size=8)
    finally:
        model.set_attn_implementation("sdpa")


def test_several_quantizers_share_one_capture(model):
    from hf_ratequant.calibration import measure_distortions

    ids = torch.randint(0, len(WORDS), (2, 64), generator=torch.Generator().manual_seed(1))
    tables = measure_distortions(model, ids, ["kivi", "token", "rotated"], [2, 3], group_size=8, progress=False)
    assert set(tables) == {"kivi", "token", "rotated"}
    assert torch.equal(tables["token"], measure_distortion(model, ids, "token", [2, 3], group_size=8, progress=False))
    assert not torch.equal(tables["kivi"], tables["token"])


def test_non_finite_activations_name_the_layer(model):
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[1].self_attn.k_proj.weight[0, 0] = float("inf")
    ids = torch.randint(0, len(WORDS), (1, 32))
    with pytest.raises(ValueError, match=r"Layer 1 produced non-finite keys.*dtype"):
        capture_states(broken, ids)


# ---- the attention-output measure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_recording_attention_leaves_the_model_as_it_was(model, implementation):
    import copy

    m = copy.deepcopy(model)
    m.set_attn_implementation(implementation)
    ids = torch.randint(0, len(WORDS), (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = m(ids).logits
    rows = capture_states(m, ids, residual_length=8, group_size=8, sink_length=8, attention=True)
    assert m.config._attn_implementation == implementation
    assert all(len(row) == 5 for row in rows)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, logits)
    # The recorded attention reproduces the layer's output for the measured query rows (here from row 24 on): plain
    # softmax attention, so the measure recomputes it in two parts (checked against the layer's own output).
    from hf_ratequant.split_attention import SplitAttention

    attend, keys, values, grad_out, n_quantized = rows[1][4]
    assert keys.shape == (2, 2, 96, 32) and n_quantized == 48 and grad_out.shape == (2, 48 - 24, 4, 32)
    assert isinstance(attend, SplitAttention) and attend(keys, values).shape == grad_out.shape


def test_output_measure_quantizes_all_heads_at_once_as_if_one_by_one(model):
    """One attention call with every kv-head quantized gives each kv-head the error it would have alone (a query
    head reads only its own kv-head), summed over that kv-head's query heads."""
    from hf_ratequant.distortion import output_distortion
    from hf_ratequant.quantizers import get_quantizer

    ids = torch.randint(0, len(WORDS), (2, 64), generator=torch.Generator().manual_seed(4))
    attend, keys, values, g, n = capture_states(model, ids, residual_length=8, group_size=8, attention=True)[0][4]
    q = get_quantizer("token", 8)
    table = output_distortion(attend, keys, values, g, n, q, [2, 3])
    assert table.shape == (2, 2, 2) and (table[..., 0] > table[..., 1]).all()
    base = attend(keys, values)
    for head in range(2):
        for kind_idx, kind in enumerate(("key", "value")):
            k, v = keys.clone(), values.clone()
            x = k if kind == "key" else v
            x[:, head : head + 1, :n] = q.dequantize(q.quantize(x[:, head : head + 1, :n], 2, kind), kind)
            err = ((attend(k, v) - base).square() * g.square())[:, :, 2 * head : 2 * head + 2].sum()
            assert table[head, kind_idx, 0].item() == pytest.approx(err.item(), rel=1e-5)


def test_unknown_measure_is_refused(model):
    ids = torch.randint(0, len(WORDS), (1, 32))
    with pytest.raises(ValueError, match="Unknown measure 'fisher': choose one of output, state"):
        measure_distortion(model, ids, "kivi", [2, 3], group_size=8, progress=False, measure="fisher")


def test_candidates_that_coincide_share_one_score(model):
    """(The race itself, with fake scores: tests/test_pipeline.py.)"""
    cfg = calibrate(model, WordTokenizer(), [corpus(2000)], quantizer="kivi", budget=2.5, n_samples=2,
                    n_validation=2, seq_len=64, group_size=8, residual_length=8, b_min=2, b_max=4, chunk=16,
                    progress=False)
    candidates = {**cfg.calibration["candidates"], "K3V2": [[[3, 2]] * 2] * 2, "K2V3": [[[2, 3]] * 2] * 2}
    validated = {n: tuple(torch.tensor(b).reshape(-1).tolist()) for n, b in candidates.items()}
    assert set(validated) == set(cfg.calibration["validation_kl"]) == set(cfg.calibration["families"])
    assert len(set(validated.values())) < len(validated)
    for name, bits in validated.items():  # coinciding candidates share one score
        assert cfg.calibration["validation_kl"][name] == cfg.calibration["validation_kl"][
            next(n for n, b in validated.items() if b == bits)]


def test_validation_with_eight_windows_scores_the_finalists_on_every_window(model):
    """All candidates on 2 windows, the best 2 x F on 2 more, the best F on the last 4 (F = VALIDATION_FINALISTS);
    the winner is the best finalist. (The race with fake scores: tests/test_pipeline.py.)"""
    cfg = calibrate(model, WordTokenizer(), [corpus(8000)], quantizer="token", budget=3, n_samples=2,
                    n_validation=8, seq_len=64, group_size=8, residual_length=8, b_min=2, b_max=4, chunk=16,
                    progress=False)
    cal = cfg.calibration
    assert cfg.method in cal["validation_finalists"]
    assert cal["validation_kl"][cfg.method] == min(cal["validation_kl"][n] for n in cal["validation_finalists"])
    assert {cal["validation_windows"][n] for n in cal["validation_finalists"]} == {8}
    assert set(cal["validation_windows"].values()) <= {2, 4, 8}


def test_validation_that_stops_candidates_early_decides_as_if_it_scored_every_token(monkeypatch):
    """The race stops a candidate once it can no longer stay in it; scored in full, the race decides the same.
    (Its rule, on random races: tests/test_pipeline.py.)"""
    import hf_ratequant.calibration as calibration

    torch.manual_seed(0)  # larger weights than the `model` fixture's: peaked predictions, KLs far apart
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, initializer_range=0.3)).eval()
    kwargs = dict(quantizer="kivi", budget=2.5, n_samples=2, n_validation=8, seq_len=64, group_size=8,
                  residual_length=8, b_min=1, b_max=4, chunk=8, progress=False)
    fast = calibrate(model, WordTokenizer(), [corpus(8000)], **kwargs).calibration
    real = calibration.evaluate_quality
    monkeypatch.setattr(calibration, "evaluate_quality", lambda *a, stop_above=None, **kw: real(*a, **kw))
    full = calibrate(model, WordTokenizer(), [corpus(8000)], **kwargs).calibration
    assert full.get("validation_stopped") is None and "K1V4" in fast["validation_stopped"]
    for name in ("winner", "validation_finalists", "validation_windows"):
        assert fast[name] == full[name], name
    assert fast["gain_vs_best_fixed"] <= full["gain_vs_best_fixed"] + 1e-12  # against a lower bound, if stopped
    for name, kl in full["validation_kl"].items():
        if name in fast["validation_stopped"]:
            assert fast["validation_kl"][name] <= kl
        else:
            assert fast["validation_kl"][name] == kl, name


def test_validation_shares_the_exact_start_of_its_windows_without_changing_a_score(model, monkeypatch):
    """Validation runs the chunks every candidate's cache serves in full precision once, in the pass that computes
    its reference (`reference_and_prefix`); the scores are the ones of running them for every candidate against
    the same reference, bit for bit."""
    import hf_ratequant.calibration as calibration

    kwargs = dict(quantizer="token", budget=2.5, n_samples=2, n_validation=4, seq_len=64, group_size=8,
                  residual_length=8, sink_length=8, b_min=1, b_max=4, chunk=8, progress=False)
    shared = calibrate(model, WordTokenizer(), [corpus(4000)], **kwargs)
    lengths = []
    real = calibration.reference_and_prefix

    def spying(*args, **kw):
        reference, prefix = real(*args, **kw)
        lengths.append(prefix.length)
        return reference, prefix

    monkeypatch.setattr(calibration, "reference_and_prefix", spying)
    assert calibrate(model, WordTokenizer(), [corpus(4000)], **kwargs).calibration["validation_kl"] == \
        shared.calibration["validation_kl"]
    assert lengths and set(lengths) == {24}  # the chunk starting at 24 reads the first quantized group (16..23)
    monkeypatch.setattr(calibration, "reference_and_prefix", lambda *args, **kw: (real(*args, **kw)[0], None))
    alone = calibrate(model, WordTokenizer(), [corpus(4000)], **kwargs)
    assert alone.calibration["validation_kl"] == shared.calibration["validation_kl"]
    assert alone.calibration["winner"] == shared.calibration["winner"]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_value_errors_of_every_width_in_one_call_equal_one_call_each(model, implementation):
    """Attention is linear in the values: every bit-width's value error measured in one call (values of n x
    head_dim channels) equals measuring them one call each, which an attention that refuses such values falls
    back to."""
    from hf_ratequant.distortion import output_distortion
    from hf_ratequant.quantizers import get_quantizer

    model.set_attn_implementation(implementation)
    try:
        ids = torch.randint(0, len(WORDS), (2, 64), generator=torch.Generator().manual_seed(5))
        attend, keys, values, g, n = capture_states(model, ids, residual_length=8, group_size=8, attention=True)[1][4]
    finally:
        model.set_attn_implementation("sdpa")
    calls = []

    def narrow(k, v):  # as a kernel that needs the values' channels to equal the queries'
        calls.append(v.shape[-1])
        if v.shape[-1] != k.shape[-1]:
            raise RuntimeError("value head_dim must equal query head_dim")
        return attend(k, v)

    q = get_quantizer("kivi", 8)
    one_call = output_distortion(attend, keys, values, g, n, q, [1, 2, 3, 4], ("value",))
    each = output_distortion(narrow, keys, values, g, n, q, [1, 2, 3, 4], ("value",))
    assert calls == [32, 4 * 32, 32, 32, 32, 32]  # base, the refused batched call, then one per width
    assert torch.isinf(one_call[:, 0]).all() and torch.isfinite(one_call[:, 1]).all()
    torch.testing.assert_close(one_call, each, rtol=1e-5, atol=0)


def test_designs_measured_together_equal_each_measured_alone(model):
    """Several designs on the same captured states (sharing each layer's exact output) give each the table it gets
    alone."""
    from hf_ratequant.calibration import measure_distortions
    from hf_ratequant.quantizers import get_quantizer

    ids = torch.randint(0, len(WORDS), (2, 64), generator=torch.Generator().manual_seed(6))
    designs = {"kivi": get_quantizer("kivi", 8), "token": get_quantizer("token", 8)}
    kw = dict(group_size=8, residual_length=8, sink_length=8, progress=False)
    together = measure_distortions(model, ids, designs, [2, 3], **kw)
    for name, q in designs.items():
        assert torch.equal(together[name], measure_distortions(model, ids, {name: q}, [2, 3], **kw)[name])
