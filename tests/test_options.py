"""Calibration over (bits, group size) options (`hf_ratequant.options`): the grid, its true rates, the exact
allocation against brute force, the fixed pairs of equal bytes, the measure on equal tokens, and `calibrate` /
`hf-ratequant calibrate` with `groups`."""

import itertools
import math

import pytest
import torch
from conftest import build_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ratequant.allocation import Candidate
from hf_ratequant.calibration import calibrate
from hf_ratequant.cards import model_card
from hf_ratequant.footprint import true_bits_per_element
from hf_ratequant.options import OptionGrid, fixed_option_candidates, measuring_quantizers, option_candidates
from hf_ratequant.quantizers import get_quantizer
from hf_ratequant.record import RECORD_VERSION
from hf_ratequant.settings import CacheLayout, CalibrationSettings

KIVI = CacheLayout("kivi", 32, 128, 32)
TOKEN = CacheLayout("token", 32, 128, 32)


def _random_table(grid, gen):
    """A `(2 layers, 1 kv-head, 2, n_options)` distortion table for `grid`: falling with bits, a little higher for
    larger groups, with noise; its `(4, n_options)` rows; and per unit the options its kind can take."""
    rates = grid.rates()
    base = torch.rand(2, 1, 2, 1, generator=gen) * 10 + 0.1
    d = torch.stack([base * 4.0 ** -b * (1 + 0.3 * math.log2(g / 32) + 0.2 * torch.rand(2, 1, 2, 1, generator=gen))
                     for g in grid.groups for b in grid.bit_grid], dim=-1).squeeze(-2)
    options = [[o for o in range(grid.n_options) if not math.isnan(rates[u % 2, o])] for u in range(4)]
    return d, d.reshape(4, -1), options


def _best_under(options, flat, budget, spent):
    """Brute force: the least total distortion of any choice of options whose `spent(choice)` fits `budget`."""
    totals = [sum(float(flat[u, o]) for u, o in enumerate(combo)) for combo in itertools.product(*options)
              if spent(combo) <= budget + 1e-9]
    return min(totals, default=math.inf)


def _chosen_options(cand, grid):
    """The option index of every unit of a candidate over `grid`."""
    return [grid.groups.index(g) * len(grid.bit_grid) + grid.bit_grid.index(b)
            for b, g in zip(cand.bits.reshape(-1).tolist(), cand.groups.reshape(-1).tolist())]


def test_grid_offers_each_kind_the_groups_that_fit_it():
    grid = OptionGrid.build(KIVI, (32, 64, 128), [1, 2, 3], head_dim=64)
    assert grid.usable == {"key": (32, 64, 128), "value": (32, 64)} and grid.own == {"key": 32, "value": 32}
    rates = grid.rates()  # (kind, group-major options): bits + 32 / group
    assert rates[0].tolist() == [1 + 1, 2 + 1, 3 + 1, 1.5, 2.5, 3.5, 1.25, 2.25, 3.25]
    assert rates[1, :6].tolist() == [2, 3, 4, 1.5, 2.5, 3.5] and bool(rates[1, 6:].isnan().all())
    assert grid.token_block() == 128 and grid.option(4) == (2, 64)
    token = OptionGrid.build(TOKEN, (16, 32), [2], head_dim=64)
    assert token.usable == {"key": (16, 32, 64), "value": (16, 32, 64)} and token.own["key"] == 64
    assert token.token_block() == 1


@pytest.mark.parametrize(("groups", "message"), [
    ((48,), r"groups \[48\] fit neither kind of kivi.*multiples of 32 tokens.*divisors of 64 channels"),
    ((64, 96), r"token groups \[32, 64, 96\] must each divide the largest"),
    ((128,), r"groups \[128\] fit neither kind of token"),
])
def test_groups_that_cannot_be_stored_are_refused(groups, message):
    layout = TOKEN if message.endswith("token") else KIVI
    with pytest.raises(ValueError, match=message):
        OptionGrid.build(layout, groups, [1, 2], head_dim=64)


def test_settings_check_the_groups():
    assert CalibrationSettings(groups=[128, 64, 64]).groups == (64, 128)
    for bad in ([], [0], [32.0], "32"):
        with pytest.raises(ValueError, match="groups"):
            CalibrationSettings(groups=bad)


def test_option_allocation_is_the_brute_force_optimum():
    grid = OptionGrid.build(KIVI, (32, 64, 128), [1, 2, 3], head_dim=64)
    gen = torch.Generator().manual_seed(0)
    rates = grid.rates()
    for trial in range(4):
        # 2 layers x 1 kv-head x K/V = 4 units; distortion falls with bits, larger groups cost a little more of it.
        d, flat, options = _random_table(grid, gen)
        for budget in (1.5, 2.25, 2.5, 3.0):
            (cand, _) = option_candidates(d, grid, budget, (4.0,))
            chosen = (cand.bits.reshape(-1).tolist(), cand.groups.reshape(-1).tolist())
            best_total = math.inf
            for combo in itertools.product(*options):
                rate = sum(float(rates[u % 2, o]) for u, o in enumerate(combo)) / 4
                total = sum(float(flat[u, o]) for u, o in enumerate(combo))
                if rate <= budget + 1e-9 and total < best_total - 1e-12:
                    best_total = total
            got = sum(float(flat[u, grid.groups.index(g) * 3 + grid.bit_grid.index(b)])
                      for u, (b, g) in enumerate(zip(*chosen)))
            assert math.isclose(got, best_total, rel_tol=1e-9), (trial, budget)
            spent = sum(float(rates[u % 2, grid.groups.index(g) * 3 + grid.bit_grid.index(b)])
                        for u, (b, g) in enumerate(zip(*chosen))) / 4
            assert spent <= budget + 1e-9


def test_fixed_pairs_are_exactly_the_budget_and_off_the_layout_group():
    grid = OptionGrid.build(KIVI, (32, 64, 128), list(range(1, 7)), head_dim=64)
    fixed = fixed_option_candidates(grid, 2.5, num_layers=2, num_kv_heads=3)
    names = {c.name for c in fixed}
    assert names == {"K1g64V3g64", "K2g64V2g64", "K3g64V1g64"}
    assert "K1g32V2g32" not in names  # the layout's own split is allocation.fixed_candidates' K1V2
    for c in fixed:
        rates = grid.rates()
        k = grid.groups.index(int(c.groups[0, 0, 0])) * 6 + int(c.bits[0, 0, 0]) - 1
        v = grid.groups.index(int(c.groups[0, 0, 1])) * 6 + int(c.bits[0, 0, 1]) - 1
        assert (float(rates[0, k]) + float(rates[1, v])) / 2 == 2.5 and c.family == "fixed"


def test_candidates_with_other_groups_are_other_allocations():
    bits = torch.full((1, 1, 2), 2)
    assert Candidate("a", "fixed", bits).key != Candidate("b", "fixed", bits, torch.full((1, 1, 2), 64)).key


def test_every_group_is_measured_on_the_same_tokens():
    grid = OptionGrid.build(KIVI, (64, 128), [2], head_dim=64)
    designs = measuring_quantizers(grid)
    assert set(designs) == {"g32", "g64", "g128"}
    x = torch.randn(1, 2, 256, 64)
    for name, q in designs.items():
        assert q.token_block("key") == q.token_block("value") == 128
        # keys grouped over `group` tokens
        assert torch.equal(q.roundtrip(x, 2, "key"), get_quantizer("kivi", int(name[1:])).roundtrip(x, 2, "key"))


def test_a_group_only_one_kind_can_take_is_measured_for_that_kind_only():
    """kivi values cannot take 128-channel groups at head_dim 64: that entry is not measured (inf, as the option
    table masks it), and what is measured equals measuring both kinds."""
    from hf_ratequant.distortion import output_distortion
    from hf_ratequant.options import _MeasuredOption

    grid = OptionGrid.build(KIVI, (64, 128), [1, 2, 3], head_dim=64)
    designs = measuring_quantizers(grid)
    assert designs["g128"].kinds == ("key",) and designs["g64"].kinds == ("key", "value")
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 256, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g)
    query, grad = torch.randn(1, 4, 8, 64, generator=g), torch.randn(1, 8, 4, 64, generator=g)

    def attend(k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return torch.softmax(query @ k.transpose(-1, -2) / 8, dim=-1).matmul(v).transpose(1, 2)

    skipped = output_distortion(attend, keys, values, grad, 256, designs["g128"], [1, 2, 3], designs["g128"].kinds)
    both = _MeasuredOption(designs["g128"]._q, designs["g128"].block)
    full = output_distortion(attend, keys, values, grad, 256, both, [1, 2, 3], both.kinds)
    assert torch.isinf(skipped[:, 1]).all() and torch.isfinite(full[:, 1]).all()
    assert torch.equal(skipped[:, 0], full[:, 0])


def _tiny():
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return build_model(LlamaForCausalLM, config)


class _CharTokenizer:
    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) % 128 for c in text]}


TEXT = [" ".join(f"word{i % 97} thing{i % 13}" for i in range(j, j + 400)) for j in range(60)]


def test_calibrate_over_groups_returns_a_stored_allocation_within_the_bytes(tmp_path):
    from hf_ratequant import RateQuantCache, RateQuantConfig

    model = _tiny()
    config = calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=2.5, budget_unit="true",
                       groups=(64, 128), n_samples=2, n_validation=2, seq_len=256, progress=False)
    record = config.calibration
    assert record["group_grid"] == [32, 64, 128] and record["true_budget"] == 2.5
    assert any(name.startswith("ratequant-options") for name in record["validation_kl"])
    assert any(name.endswith("g64") for name in record["validation_kl"])  # the fixed pairs of other groups raced
    assert true_bits_per_element(config, 64) <= 2.5 + 1e-9
    # the bytes held at 4k tokens (a period of the largest group), window included, are within the budget's
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import cache_bytes

    fp, plain = ModelFingerprint.from_model_config(model.config), RateQuantConfig.uniform(model.config, bits=2)
    period = range(4096, 4096 + 128)
    held = sum(cache_bytes(config, fp, t).total for t in period)
    at_g = [cache_bytes(plain, fp, t) for t in period]  # 2 code bits at G = 32: 3 true bits
    assert held <= sum(f.quantized * 2.5 / 3 + f.window + f.sinks for f in at_g)
    assert record["window_tokens"] == 4096
    assert config.curves["option_distortion"].shape == (2, 2, 2, 3 * 6)
    card = model_card(config, "me/tiny-options")
    assert "Group sizes per unit" in card and "bits per stored element" in card
    assert "longer full-precision window of layers whose keys use larger token groups, counted at 4096" in card
    config.save_pretrained(tmp_path)
    loaded = RateQuantConfig.from_pretrained(tmp_path)
    assert loaded.key_groups == config.key_groups and loaded.method == config.method
    out = model.generate(torch.randint(1, 128, (1, 300)), max_new_tokens=3, do_sample=False,
                         past_key_values=RateQuantCache.from_pretrained(loaded, model=model))
    assert out.shape == (1, 303)


def test_groups_need_a_budget_in_true_bits_before_any_work():
    with pytest.raises(ValueError, match="budget in true bits per element"):
        calibrate(_tiny(), _CharTokenizer(), data=None, budget=2.5, groups=(64,))
    with pytest.raises(ValueError, match=r"groups \[48\] fit neither kind"):
        calibrate(_tiny(), _CharTokenizer(), data=None, budget=2.5, budget_unit="true", groups=(48,))


def test_a_layer_releases_its_window_in_blocks_of_its_largest_key_group():
    grid = OptionGrid.build(KIVI, (64, 128), [1, 2], head_dim=64)
    assert grid.flush_blocks() == (32, 64, 128)
    in_64 = grid.allowed(64)  # keys up to 64-token groups; values group channels, free
    assert [grid.option(i) for i in range(grid.n_options) if in_64[0, i]] == [(1, 32), (2, 32), (1, 64), (2, 64)]
    assert bool(in_64[1].all())
    assert OptionGrid.build(TOKEN, (16, 32), [2], head_dim=64).flush_blocks() == (32,)  # no token groups


def test_window_growth_matches_the_bytes_a_cache_holds():
    """The charge of a block is what a config using it holds more than one of G, averaged over a period."""
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import cache_bytes, window_growth

    model_config = _tiny().config
    fp = ModelFingerprint.from_model_config(model_config)
    plain = RateQuantConfig.uniform(model_config, bits=2, layout=KIVI)
    wide = RateQuantConfig.uniform(model_config, bits=2, layout=KIVI, key_group=128)
    period = range(4096, 4096 + 128)
    extra_window = sum(cache_bytes(wide, fp, t).window - cache_bytes(plain, fp, t).window for t in period)
    # bits per element of one unit, summed over a layer's units: the layers' extra window bits over the elements
    # one unit quantizes (2 bits + 1 for scales: 3 true bits; 2 layers x 2 kv-heads x K/V = 8 units)
    unit_elements = sum(cache_bytes(plain, fp, t).quantized for t in period) * 8 / 3.0 / 8
    expected = extra_window * 8 / unit_elements / fp.num_layers
    assert window_growth(KIVI, fp, 0, 128) == pytest.approx(expected, rel=1e-9)
    assert window_growth(KIVI, fp, 0, 32) == 0.0


def test_option_allocation_with_window_charges_is_the_brute_force_optimum():
    """Each layer pays for its largest key group (charges on the 1/16-bit grid, so none is rounded): the exact
    allocation against every combination."""
    grid = OptionGrid.build(KIVI, (64, 128), [1, 2, 3], head_dim=64)
    rates = grid.rates()
    blocks = grid.flush_blocks()
    charges = torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.5, 1.0]], dtype=torch.float64)  # (layers, blocks)
    gen = torch.Generator().manual_seed(1)
    for trial in range(3):
        d, flat, options = _random_table(grid, gen)
        for budget in (1.75, 2.25, 2.5, 3.0):
            def spent(combo):
                return (sum(float(rates[u % 2, o]) for u, o in enumerate(combo)) + sum(
                    float(charges[layer, blocks.index(max(32, grid.option(combo[2 * layer])[1]))])
                    for layer in range(2))) / 4

            best_total = _best_under(options, flat, budget, spent)
            chosen = _chosen_options(option_candidates(d, grid, budget, (4.0,), charges)[0], grid)
            got = sum(float(flat[u, o]) for u, o in enumerate(chosen))
            assert math.isclose(got, best_total, rel_tol=1e-9), (trial, budget, got, best_total)
            assert spent(chosen) <= budget + 1e-9


def test_fixed_pairs_with_window_charges_fit_the_budget():
    grid = OptionGrid.build(KIVI, (64, 128), list(range(1, 7)), head_dim=64)
    charges = torch.tensor([[0.0, 0.4, 1.2]] * 2, dtype=torch.float64)  # 2 layers, 3 kv-heads: 12 units
    fixed = fixed_option_candidates(grid, 2.5, num_layers=2, num_kv_heads=3, charges=charges)
    names = {c.name for c in fixed}
    assert "K2g64V2g64" not in names  # 2.5 + 0.8 / 12: over the budget once its window counts
    assert "K2g64V1g64" not in names  # 2.0 + 0.8 / 12: more than FIXED_SLACK below it
    assert {"K1g32V2g64", "K1g128V2g32"} <= names  # 2.25 (no charge); 2.125 + 2.4 / 12 = 2.325


def test_a_block_a_layer_cannot_pay_for_is_not_offered():
    """A window block whose growth cannot be counted (+inf: the layer quantizes nothing at that context) is left
    out of that layer's choices; the other layer may still take it."""
    grid = OptionGrid.build(KIVI, (64, 128), [1, 2, 3], head_dim=64)
    options = torch.stack([4.0 ** -torch.tensor([float(b) for g in grid.groups for b in grid.bit_grid])
                           * (1 + 0.01 * torch.arange(grid.n_options))] * 4).reshape(2, 1, 2, -1)
    options[:, :, 0, 6:] /= 50  # 128-token key groups look far better: both layers would take them
    charges = torch.tensor([[0.0, 0.0, math.inf], [0.0, 0.0, 0.0]], dtype=torch.float64)
    cand = option_candidates(options, grid, 3.0, (), charges)[0]
    assert int(cand.groups[0, 0, 0]) != 128 and int(cand.groups[1, 0, 0]) == 128


# ---- budgets in bytes when layers hold different numbers of tokens (sliding-window attention) --------------------
def _gemma3_tiny(sliding_window=512):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=16,
                              sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"] * 2)
    return build_model(Gemma3ForCausalLM, config)


def test_layer_weights_are_the_tokens_each_layer_quantizes():
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import cache_bytes, layer_weights

    fp = ModelFingerprint.from_model_config(_gemma3_tiny().config)
    # at 4096 tokens: a sliding layer keeps 511, of which 384 quantized (R = 128 in full precision, the sinks
    # dropped); a global one quantizes 4096 - 128 - 32 = 3936; 384 : 3936 = 4 : 41
    assert layer_weights(KIVI, fp) == [4, 41, 4, 41]
    assert layer_weights(KIVI, ModelFingerprint.from_model_config(_tiny().config)) == [1, 1]
    assert layer_weights(KIVI, fp, tokens=400) == [1, 1, 1, 1]  # a short context: nothing slides yet
    # the weighted true bits are the bytes of the quantized part, per element held
    config = RateQuantConfig.from_bits(torch.tensor([[[6, 5]], [[2, 1]], [[5, 6]], [[1, 2]]]), KIVI, fingerprint=fp)
    held = cache_bytes(config, fp, 4096).quantized * 8 / ((384 * 2 + 3936 * 2) * 2 * 64)
    assert true_bits_per_element(config, 64, fingerprint=fp) == pytest.approx(held, rel=1e-12)
    assert true_bits_per_element(config, 64) == pytest.approx(4.5)  # every unit counted once
    assert held < 3.0


def test_weighted_option_allocation_is_the_brute_force_optimum():
    """Layer 0 weighs 1, layer 1 weighs 3: the exact allocation over the options, against every combination under
    the budget averaged over the weighted elements."""
    grid = OptionGrid.build(KIVI, (64,), [1, 2, 3], head_dim=64)
    rates = grid.rates()
    weights = [1, 3]
    gen = torch.Generator().manual_seed(3)
    for trial in range(3):
        d, flat, options = _random_table(grid, gen)
        for budget in (2.0, 2.5, 3.0, 3.5):
            def spent(combo):
                return sum(weights[u // 2] * float(rates[u % 2, o]) for u, o in enumerate(combo)) / 8

            best = _best_under(options, flat, budget, spent)
            chosen = _chosen_options(option_candidates(d, grid, budget, (), weights=weights)[0], grid)
            assert math.isclose(sum(float(flat[u, o]) for u, o in enumerate(chosen)), best, rel_tol=1e-9)
            assert spent(chosen) <= budget + 1e-9
    # equal weights are no weights
    assert torch.equal(option_candidates(d, grid, 2.5, (), weights=[2, 2])[0].bits,
                       option_candidates(d, grid, 2.5, ())[0].bits)


def test_calibrate_counts_the_bytes_sliding_layers_hold(capsys):
    """A true budget on a model with sliding-window layers: every candidate raced holds no more bytes than the
    budget at 4096 tokens, the byte-weighted allocation races, and the record says how layers were weighed."""
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import cache_bytes

    model = _gemma3_tiny()
    fp = ModelFingerprint.from_model_config(model.config)
    config = calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=3.0, budget_unit="true",
                       n_samples=2, n_validation=2, seq_len=256, progress=False)
    record = config.calibration
    assert record["layer_weights"] == [4, 41, 4, 41] and record["record_version"] == RECORD_VERSION
    assert record["budget_context"] == 4096
    assert any(name.startswith("ratequant-options") for name in record["validation_kl"])
    # the steps from the best fixed split keep the bytes too
    assert any(name.startswith("ratequant-from-") and name[-3:] in ("-r1", "-r2") for name in record["validation_kl"])
    assert true_bits_per_element(config, 64, fingerprint=fp) <= 3.0 + 1e-9
    for name, bits in record["candidates"].items():
        if name in record["validation_kl"] and name not in record.get("candidate_groups", {}):
            raced = RateQuantConfig.from_bits(torch.tensor(bits), KIVI, fingerprint=fp)
            assert true_bits_per_element(raced, 64, fingerprint=fp) <= 3.0 + 1e-9, name
    uniform = RateQuantConfig.uniform(model.config, bits=2, layout=KIVI)  # 3 true bits
    assert cache_bytes(config, fp, 4096).total <= cache_bytes(uniform, fp, 4096).total
    from hf_ratequant.cli import _print_calibration

    _print_calibration(config, model)
    held = true_bits_per_element(config, 64, fingerprint=fp)
    assert f"{held:.4g} per element held at 4096 tokens" in capsys.readouterr().out
    assert "per element held" in model_card(config, "me/tiny-sliding")
    # without validation the exact allocation by bytes is returned (the closed form would not fit)
    unvalidated = calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=3.0, budget_unit="true",
                            n_samples=2, n_validation=0, seq_len=256, progress=False)
    assert unvalidated.method == "ratequant-options"
    assert true_bits_per_element(unvalidated, 64, fingerprint=fp) <= 3.0 + 1e-9
    # a budget in code bits stays an average over units, as in the paper
    plain = calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=2.0, n_samples=2,
                      n_validation=0, seq_len=256, progress=False)
    assert "layer_weights" not in plain.calibration and plain.average_bits == 2.0
    assert "budget_context" not in plain.calibration


def test_calibrate_counts_bytes_at_the_context_served(capsys):
    """`budget_context` moves the weights: at 1024 tokens a global layer of the tiny Gemma 3 quantizes 864 tokens
    against a sliding layer's 384 (4 : 9, not 4 : 41); the config keeps the budget there, and the record, the card
    and the command line say where the bytes were counted."""
    from hf_ratequant.cli import _print_calibration
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import layer_weights

    model = _gemma3_tiny()
    fp = ModelFingerprint.from_model_config(model.config)
    assert layer_weights(KIVI, fp, 1024) == [4, 9, 4, 9]
    config = calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=3.0, budget_unit="true",
                       budget_context=1024, n_samples=2, n_validation=0, seq_len=256, progress=False)
    record = config.calibration
    assert record["layer_weights"] == [4, 9, 4, 9] and record["budget_context"] == 1024
    held = true_bits_per_element(config, 64, fingerprint=fp, tokens=1024)
    assert held <= 3.0 + 1e-9
    _print_calibration(config, model)
    assert f"{held:.4g} per element held at 1024 tokens" in capsys.readouterr().out
    assert "held at 1024 tokens" in model_card(config, "me/tiny-sliding")
    with pytest.raises(ValueError, match="budget_context=0 must be an integer"):
        calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=3.0, budget_unit="true",
                  budget_context=0, progress=False)
    with pytest.raises(ValueError, match="budget_context=1024 says at which context.*budget_unit='true'"):
        calibrate(model, _CharTokenizer(), data=TEXT, quantizer="kivi", budget=2.5, budget_context=1024,
                  progress=False)


def test_near_candidates_stay_near_the_origin_within_the_bytes():
    """Exact allocations by bytes with every unit within r bits of a fixed split: they move bits to the layer
    that weighs less, keep the weighted budget and never move a unit further than r."""
    from hf_ratequant.allocation import fixed_candidates
    from hf_ratequant.options import near_candidates

    grid = OptionGrid.build(KIVI, (), [1, 2, 3, 4, 5], head_dim=64)
    rates = grid.rates()
    origin = next(c for c in fixed_candidates(2, 1, 2.5, 1, 5) if c.name == "K3V2")
    d = torch.stack([4.0 ** -torch.tensor([float(b) for b in grid.bit_grid])] * 4).reshape(2, 1, 2, -1)
    weights = [1, 4]
    near = near_candidates(d, grid, 3.5, origin, weights=weights)
    assert [c.name for c in near] == ["ratequant-from-K3V2-r1", "ratequant-from-K3V2-r2"]
    for c, r in zip(near, (1, 2)):
        assert c.family == "descent" and c.groups is None
        assert int((c.bits - origin.bits).abs().max()) <= r
        spent = sum(weights[layer] * float(rates[k, int(c.bits[layer, 0, k]) - 1])
                    for layer in range(2) for k in range(2)) / (2 * sum(weights))
        assert spent <= 3.5 + 1e-9
        assert int(c.bits[0].sum()) > int(origin.bits[0].sum())  # the light layer gains bits


def test_option_indices_invert_option():
    grid = OptionGrid.build(KIVI, (64, 128), list(range(1, 7)), 64)
    pairs = [grid.option(i) for i in range(grid.n_options)]
    bits, groups = torch.tensor([b for b, _ in pairs]), torch.tensor([g for _, g in pairs])
    assert grid.option_indices(bits, groups).tolist() == list(range(grid.n_options))
