"""Allocation over (rate, distortion) options per unit: exact against brute force on small problems."""

import itertools
import math

import pytest
import torch

from hf_ratequant.allocation import allocate_bits
from hf_ratequant.operating_points import (
    allocate_blocks,
    allocate_rate,
    block_frontier,
    hull_path,
    integer_rates,
    lower_hull,
    pareto_options,
    total_rate,
)


def _brute_force(rates, distortion, budget):
    """(best distortion, least rate among the best) over every allocation of total rate <= budget."""
    best = (math.inf, math.inf)
    for choice in itertools.product(*[range(rates.shape[1])] * rates.shape[0]):
        r = sum(int(rates[u, c]) for u, c in enumerate(choice))
        d = sum(float(distortion[u, c]) for u, c in enumerate(choice))
        if r <= budget and (d, r) < best:
            best = (d, r)
    return best


def _problem(seed, n_units=3, n_options=4, convex=False):
    g = torch.Generator().manual_seed(seed)
    rates = torch.randint(0, 9, (n_units, n_options), generator=g)
    distortion = torch.rand(n_units, n_options, generator=g, dtype=torch.float64) * 10
    if convex:  # bits 1..n with an exponential curve: the classic case
        rates = torch.arange(1, n_options + 1).expand(n_units, -1).clone()
        distortion = torch.rand(n_units, 1, generator=g, dtype=torch.float64) * 4.0 ** -rates.double()
    if seed % 3 == 0:  # some options a unit cannot take
        distortion[torch.rand(n_units, n_options, generator=g) < 0.2] = math.inf
        distortion[:, 0] = torch.rand(n_units, generator=g, dtype=torch.float64) + 10  # each unit keeps one option
    return rates, distortion


@pytest.mark.parametrize("seed", range(6))
def test_the_dynamic_program_gives_the_least_distortion_of_every_exact_total(seed):
    """Every total rate up to the capacity: the least distortion of the allocations of exactly that rate over the
    units' Pareto options (inf where none), and the picks trace one back, although each unit only updates the
    totals the units before it reach."""
    from hf_ratequant.operating_points import _backtrack, _exact_totals

    rates, distortion = _problem(seed, n_units=4, n_options=4)
    capacity = int(rates.max(1).values.sum()) - 3  # some totals past it
    cost, picks = _exact_totals(rates, distortion, capacity)
    exact = [math.inf] * (capacity + 1)
    for choice in itertools.product(*[pareto_options(rates[u], distortion[u]) for u in range(rates.shape[0])]):
        r = sum(int(rates[u, c]) for u, c in enumerate(choice))
        if r <= capacity:
            exact[r] = min(exact[r], sum(float(distortion[u, c]) for u, c in enumerate(choice)))
    assert cost.tolist() == pytest.approx(exact, rel=1e-12, abs=1e-12)
    for total in torch.isfinite(cost).nonzero().flatten().tolist():
        choice = _backtrack(rates, picks, total)
        assert total_rate(rates, choice) == total
        assert math.isclose(float(distortion.gather(1, choice[:, None]).sum()), exact[total], rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(18))
def test_exact_against_brute_force_at_every_budget(seed):
    rates, distortion = _problem(seed, n_units=3 + seed % 2, n_options=3 + seed % 2)
    usable = torch.isfinite(distortion)
    cheapest = int(torch.where(usable, rates, 10**6).min(1).values.sum())
    richest = int(torch.where(usable, rates, 0).max(1).values.sum())
    for budget in range(cheapest, richest + 2):
        choice = allocate_rate(rates, distortion, budget)
        d = float(distortion.gather(1, choice[:, None]).sum())
        best_d, best_r = _brute_force(rates, distortion, budget)
        assert total_rate(rates, choice) <= budget
        assert math.isclose(d, best_d, rel_tol=1e-12, abs_tol=1e-12), (budget, d, best_d)
        assert total_rate(rates, choice) == best_r


@pytest.mark.parametrize("seed", range(20))
def test_every_prefix_of_the_hull_path_is_optimal_at_its_rate(seed):
    rates, distortion = _problem(seed, n_units=3, n_options=4)
    start, steps, totals = hull_path(rates, distortion)
    choice = start.clone()
    prefixes = [(choice.clone(), total_rate(rates, start))]
    for (u, b), t in zip(steps.tolist(), totals.tolist()):
        choice[u] = b
        prefixes.append((choice.clone(), t))
    for choice, t in prefixes:
        assert total_rate(rates, choice) == t
        d = float(distortion.gather(1, choice[:, None]).sum())
        assert math.isclose(d, _brute_force(rates, distortion, t)[0], rel_tol=1e-12, abs_tol=1e-12)


def test_reverse_waterfilling_is_the_special_case():
    """Whole bits with one group size (every step costs one bit): the hull path spends every budget exactly and
    agrees with allocate_bits."""
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    beta = 3.0 + 2 * torch.rand(12, generator=g, dtype=torch.float64)
    bits = torch.arange(1, 7)
    rates = bits.expand(12, -1).clone()
    distortion = alpha[:, None] * beta[:, None] ** (-bits.double())
    for budget in (1.5, 2.5, 3.0, 4.25):
        ours = bits[allocate_rate(rates, distortion, round(budget * 12))]
        assert torch.equal(ours, allocate_bits(alpha, beta, budget, 1, 6))


def test_an_option_above_the_hull_can_be_the_optimum():
    rates = torch.tensor([[0, 1, 2], [0, 1, 2]])
    distortion = torch.tensor([[10.0, 9.9, 0.0], [10.0, 9.9, 0.0]], dtype=torch.float64)
    assert lower_hull(rates[0], distortion[0]) == [0, 2]
    assert allocate_rate(rates, distortion, 1).tolist() in ([1, 0], [0, 1])  # 19.9, not 20
    assert allocate_rate(rates, distortion, 3).tolist() in ([2, 1], [1, 2])


def test_pareto_and_hull():
    r = torch.tensor([4, 1, 2, 2, 3, 5])
    d = torch.tensor([1.0, 8.0, 5.0, 4.0, 3.9, 1.0], dtype=torch.float64)
    assert pareto_options(r, d) == [1, 3, 4, 0]  # 2 has the rate of 3 and more distortion; 5 costs more than 0
    assert lower_hull(r, d) == [1, 3, 0]  # 4 lies above the chord from 3 to 0
    d[0] = math.inf
    assert pareto_options(r, d) == [1, 3, 4, 5]


def test_integer_rates_are_exact():
    rates, scale = integer_rates(torch.tensor([[2.0, 1.5, 2.25], [3.0, 2.5, 3.125]]))
    assert scale == 8 and rates.tolist() == [[16, 12, 18], [24, 20, 25]]
    with pytest.raises(ValueError, match="not a non-negative fraction"):
        integer_rates(torch.tensor([math.pi]), max_denominator=64)


@pytest.mark.parametrize("rates, distortion, budget, match", [
    (torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.5]]), 0, "below the cheapest allocation, 1"),
    (torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.5]]), 2, "non-negative integers"),
    (torch.tensor([[1, -2]]), torch.tensor([[1.0, 0.5]]), 2, "non-negative integers"),
    (torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.5, 0.1]]), 2, "shape"),
    (torch.tensor([[1, 2]]), torch.tensor([[math.inf, math.inf]]), 2, "no usable option"),
    (torch.tensor([[1, 2]]), torch.tensor([[math.nan, 1.0]]), 2, "NaN"),
    (torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.5]]), 2.5, "integer total rate"),
])
def test_bad_input(rates, distortion, budget, match):
    with pytest.raises(ValueError, match=match):
        allocate_rate(rates, distortion, budget)


def test_a_real_size_problem_is_fast():
    """90 units x (6 bits x 3 group sizes), a budget between hull points: the exact program, well under a second."""
    import time

    g = torch.Generator().manual_seed(1)
    bits = torch.arange(1, 7).double()
    rate_bpe = torch.cat([bits + 32 / G for G in (32, 64, 128)])  # code bits + 16-bit scale and zero per group
    rates, scale = integer_rates(rate_bpe.expand(90, -1))
    alpha = torch.rand(90, 1, generator=g, dtype=torch.float64)
    group_penalty = torch.tensor([1.0] * 6 + [1.3] * 6 + [1.8] * 6, dtype=torch.float64)
    distortion = alpha * 4.0 ** (-torch.cat([bits] * 3)) * group_penalty
    start = time.perf_counter()
    choice = allocate_rate(rates, distortion, round(3.0 * 90 * scale) + 1)
    assert time.perf_counter() - start < 5.0
    assert total_rate(rates, choice) <= round(3.0 * 90 * scale) + 1


def _block_problem(seed):
    """Units in blocks of 2 or 3; each block has 1-3 modes, each allowing a random subset of options (always at
    least option 0) at an extra rate of 0-3."""
    g = torch.Generator().manual_seed(100 + seed)
    rates, distortion = _problem(seed, n_units=4 + seed % 2, n_options=3)
    blocks = [[0, 1], list(range(2, rates.shape[0]))]
    modes = []
    for block in blocks:
        block_modes = []
        for _ in range(1 + int(torch.randint(0, 3, (1,), generator=g))):
            allowed = torch.rand(len(block), rates.shape[1], generator=g) < 0.6
            allowed[:, 0] = True
            block_modes.append((allowed, int(torch.randint(0, 4, (1,), generator=g))))
        modes.append(block_modes)
    return rates, distortion, blocks, modes


def _brute_force_blocks(rates, distortion, blocks, modes, budget):
    best = (math.inf, math.inf)
    for mode_choice in itertools.product(*[range(len(m)) for m in modes]):
        allowed = torch.zeros_like(distortion, dtype=torch.bool)
        extra = 0
        for block, block_modes, m in zip(blocks, modes, mode_choice):
            allowed[block] = block_modes[m][0]
            extra += block_modes[m][1]
        d = torch.where(allowed, distortion, math.inf)
        if not bool(torch.isfinite(d).any(1).all()):
            continue
        best = min(best, (lambda r: (r[0], r[1] + extra))(_brute_force(rates, d, budget - extra)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_blocks_with_modes_exact_against_brute_force(seed):
    """A mode per block (an extra rate, a subset of options) and an option per unit: the exact optimum at every
    budget, against trying every mode and every allocation."""
    rates, distortion, blocks, modes = _block_problem(seed)
    for budget in range(0, int(rates.max()) * rates.shape[0] + 8):
        best_d, best_r = _brute_force_blocks(rates, distortion, blocks, modes, budget)
        if not math.isfinite(best_d):
            with pytest.raises(ValueError, match="below the cheapest"):
                allocate_blocks(rates, distortion, blocks, modes, budget)
            continue
        choice, picked = allocate_blocks(rates, distortion, blocks, modes, budget)
        total = total_rate(rates, choice) + sum(modes[b][m][1] for b, m in enumerate(picked))
        for block, m in zip(blocks, picked):  # every unit's option is one its block's mode allows
            assert bool(modes[blocks.index(block)][m][0][torch.arange(len(block)), choice[block]].all())
        d = float(distortion.gather(1, choice[:, None]).sum())
        assert total <= budget
        assert math.isclose(d, best_d, rel_tol=1e-12, abs_tol=1e-12), (budget, d, best_d)
        assert total == best_r


def test_one_free_mode_is_allocate_rate():
    """One mode allowing everything at no extra rate: the same allocation as [`allocate_rate`]."""
    rates, distortion = _problem(4, n_units=6, n_options=5)
    everything = torch.ones(3, 5, dtype=torch.bool)
    for budget in range(int(rates.min(1).values.sum()), int(rates.max(1).values.sum()) + 1):
        choice, _ = allocate_blocks(rates, distortion, [[0, 1, 2], [3, 4, 5]], [[(everything, 0)]] * 2, budget)
        expected = allocate_rate(rates, distortion, budget)
        assert float(distortion.gather(1, choice[:, None]).sum()) == pytest.approx(
            float(distortion.gather(1, expected[:, None]).sum()), rel=1e-12)


def test_block_frontier_is_pareto():
    rates, distortion, blocks, modes = _block_problem(5)
    totals, dists, _ = block_frontier(rates[blocks[1]], distortion[blocks[1]], modes[1])
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    assert all(a > b for a, b in zip(dists, dists[1:]))


def test_blocks_bad_input():
    rates, distortion = torch.tensor([[1, 2], [1, 2]]), torch.tensor([[1.0, 0.5], [1.0, 0.5]])
    every = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly once"):
        allocate_blocks(rates, distortion, [[0]], [[(every, 0)]], 4)
    with pytest.raises(ValueError, match="no mode"):
        allocate_blocks(rates, distortion, [[0], [1]], [[(every, 0)], [(torch.zeros(1, 2, dtype=torch.bool), 0)]], 4)


def test_a_real_size_block_problem_is_fast():
    """30 layers x 6 units x (6 bits x 3 groups), each layer choosing one of 3 flush blocks at a window charge, on
    a 1/16-bit grid and a budget between hull points: well under the time of a calibration."""
    import time

    g = torch.Generator().manual_seed(2)
    bits = torch.arange(1, 7).double()
    rate_bpe = torch.cat([bits + 32 / G for G in (32, 64, 128)])
    rates, scale = integer_rates(rate_bpe.expand(180, -1))
    rates, scale = rates * (16 // scale), 16
    distortion = torch.rand(180, 1, generator=g, dtype=torch.float64) * 4.0 ** (-torch.cat([bits] * 3)) * \
        torch.tensor([1.0] * 6 + [1.3] * 6 + [1.8] * 6, dtype=torch.float64)
    group = torch.tensor([32] * 6 + [64] * 6 + [128] * 6)
    masks = [(group[None, :] <= block).expand(6, -1) for block in (32, 64, 128)]
    modes = [[(m, c) for m, c in zip(masks, (0, 7, 19))] for _ in range(30)]
    blocks = [list(range(6 * layer, 6 * layer + 6)) for layer in range(30)]
    budget = round(2.5 * 180 * scale) + 3
    start = time.perf_counter()
    choice, picked = allocate_blocks(rates, distortion, blocks, modes, budget)
    assert time.perf_counter() - start < 10.0
    spent = total_rate(rates, choice) + sum(modes[b][m][1] for b, m in enumerate(picked))
    assert budget - 16 < spent <= budget


@pytest.mark.parametrize("seed", range(6))
def test_weighted_blocks_exact_against_brute_force(seed):
    """Each block's whole rate (options and mode) times its weight, as when layers hold different numbers of
    tokens: the exact optimum at every budget, against trying every mode and every allocation."""
    rates, distortion, blocks, modes = _block_problem(seed)
    weights = [1 + seed % 3, 4]
    for budget in range(0, 4 * (int(rates.max()) * rates.shape[0] + 6), 3):
        best = (math.inf, math.inf)
        for mode_choice in itertools.product(*[range(len(m)) for m in modes]):
            per_block = []
            for block, block_modes, m in zip(blocks, modes, mode_choice):
                allowed = block_modes[m][0]
                options = [[o for o in range(rates.shape[1]) if bool(allowed[i, o])
                            and math.isfinite(float(distortion[u, o]))] for i, u in enumerate(block)]
                per_block.append([(sum(int(rates[u, o]) for u, o in zip(block, combo)) + block_modes[m][1],
                                   sum(float(distortion[u, o]) for u, o in zip(block, combo)))
                                  for combo in itertools.product(*options)])
            for picks in itertools.product(*per_block):
                rate = sum(w * r for w, (r, _) in zip(weights, picks))
                d = sum(d for _, d in picks)
                if rate <= budget and (d, rate) < best:
                    best = (d, rate)
        if not math.isfinite(best[0]):
            with pytest.raises(ValueError, match="below the cheapest"):
                allocate_blocks(rates, distortion, blocks, modes, budget, weights)
            continue
        choice, picked = allocate_blocks(rates, distortion, blocks, modes, budget, weights)
        spent = sum(w * (int(rates[block].gather(1, choice[block][:, None]).sum()) + modes[b][m][1])
                    for b, (block, w, m) in enumerate(zip(blocks, weights, picked)))
        d = float(distortion.gather(1, choice[:, None]).sum())
        assert spent <= budget
        assert math.isclose(d, best[0], rel_tol=1e-12, abs_tol=1e-12), (budget, d, best)


def test_a_block_of_weight_zero_is_free_and_weights_are_checked():
    rates, distortion = torch.tensor([[1, 2], [1, 2]]), torch.tensor([[1.0, 0.5], [1.0, 0.4]])
    every = torch.ones(1, 2, dtype=torch.bool)
    choice, _ = allocate_blocks(rates, distortion, [[0], [1]], [[(every, 0)], [(every, 0)]], 1, [1, 0])
    assert choice.tolist() == [0, 1]  # unit 1 holds nothing: its best option costs nothing
    for bad in ([1], [1, -1], [1, 0.5], [True, 1]):
        with pytest.raises(ValueError, match="non-negative integer per block"):
            allocate_blocks(rates, distortion, [[0], [1]], [[(every, 0)], [(every, 0)]], 4, bad)
