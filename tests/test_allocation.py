import doctest
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ratequant import allocation
from hf_ratequant.allocation import (
    allocate_bits,
    allocate_from_table,
    fixed_allocations,
    total_distortion,
    waterfill,
)


def _random_alpha(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-4.0, 4.0, generator=generator))


def _brute_force(table: torch.Tensor, b_lo: int, total: int) -> float:
    """Minimum of sum_u table[u, b_u - b_lo] over every bit vector with sum == total."""
    n_units, n_bits = table.shape
    best = math.inf
    for choice in itertools.product(range(n_bits), repeat=n_units):
        if sum(choice) + n_units * b_lo == total:
            best = min(best, sum(float(table[u, k]) for u, k in enumerate(choice)))
    return best


def _table_cost(table: torch.Tensor, b_lo: int, bits: torch.Tensor) -> float:
    return float(table.gather(1, (bits - b_lo)[:, None]).sum())


@pytest.mark.parametrize("shared_beta", [True, False])
def test_allocate_bits_matches_brute_force(shared_beta):
    generator = torch.Generator().manual_seed(0)
    for trial in range(24):
        n = 3 + trial % 3
        b_max = 4 + trial % 2
        alpha = _random_alpha(n, generator)
        if shared_beta:
            beta = float(torch.empty(()).uniform_(1.2, 6.0, generator=generator))
        else:
            beta = torch.empty(n, dtype=torch.float64).uniform_(1.2, 6.0, generator=generator)
        grid = torch.arange(1, b_max + 1)
        table = alpha[:, None] * torch.as_tensor(beta, dtype=torch.float64).reshape(-1, 1) ** (-grid.double())
        for total in range(n, n * b_max + 1):
            bits = allocate_bits(alpha, beta, total / n, b_min=1, b_max=b_max)
            assert int(bits.sum()) == total
            cost = float(total_distortion(alpha, beta, bits))
            assert cost == pytest.approx(_table_cost(table, 1, bits), rel=1e-12)
            assert cost <= _brute_force(table, 1, total) * (1 + 1e-12)


@pytest.mark.parametrize("convex", [True, False])
def test_allocate_from_table_matches_brute_force(convex):
    generator = torch.Generator().manual_seed(1)
    for trial in range(24):
        n = 3 + trial % 3
        b_lo = 1 + trial % 2
        n_bits = 4 + trial % 2
        if convex:  # decreasing gains: cumulative sums of sorted positive steps
            steps = torch.rand(n, n_bits - 1, generator=generator, dtype=torch.float64).sort(1, descending=True).values
            table = 10.0 - torch.cat([torch.zeros(n, 1, dtype=torch.float64), steps.cumsum(1)], 1)
        else:  # arbitrary, typically non-convex and non-monotone
            table = torch.rand(n, n_bits, generator=generator, dtype=torch.float64)
        grid = torch.arange(b_lo, b_lo + n_bits)
        for total in range(n * b_lo, n * (b_lo + n_bits - 1) + 1):
            bits = allocate_from_table(table, grid, total / n)
            assert int(bits.sum()) == total
            assert bool(((bits >= b_lo) & (bits < b_lo + n_bits)).all())
            assert _table_cost(table, b_lo, bits) <= _brute_force(table, b_lo, total) + 1e-12


def test_allocate_from_table_agrees_with_model():
    generator = torch.Generator().manual_seed(2)
    alpha = _random_alpha(40, generator)
    grid = torch.arange(2, 7)
    table = alpha[:, None] * 2.5 ** (-grid.double())
    for budget in (2.25, 2.5, 3.0, 4.75):
        from_table = allocate_from_table(table, grid, budget)
        from_model = allocate_bits(alpha, 2.5, budget, b_min=2, b_max=6)
        assert float(total_distortion(alpha, 2.5, from_table)) == pytest.approx(
            float(total_distortion(alpha, 2.5, from_model)), rel=1e-12
        )


def test_non_convex_table_beats_greedy():
    # unit 0 gains nothing from its first extra bit but a lot from the second: greedy would not see it
    table = torch.tensor([[10.0, 10.0, 0.0], [5.0, 4.0, 3.9]], dtype=torch.float64)
    bits = allocate_from_table(table, [1, 2, 3], budget=2.0)
    assert bits.tolist() == [3, 1]


@pytest.mark.parametrize("budget", [2.25, 2.5, 3.0, 4.0])
def test_mean_equals_budget_exactly(budget):
    generator = torch.Generator().manual_seed(3)
    alpha = _random_alpha(180, generator)
    beta = torch.empty(180, dtype=torch.float64).uniform_(1.5, 5.0, generator=generator)
    bits = allocate_bits(alpha, beta, budget, b_min=1, b_max=8)
    assert bits.dtype == torch.long
    assert int(bits.sum()) == round(budget * 180)
    assert float(bits.double().mean()) == budget
    table = alpha[:, None] * beta[:, None] ** (-torch.arange(1, 9).double())
    assert int(allocate_from_table(table, torch.arange(1, 9), budget).sum()) == round(budget * 180)
    assert float(waterfill(alpha, beta, budget).mean()) == pytest.approx(budget, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    log_alpha=st.lists(st.floats(-6.0, 6.0), min_size=2, max_size=12),
    betas=st.lists(st.floats(1.05, 8.0), min_size=12, max_size=12),
    shared=st.booleans(),
    bounds=st.tuples(st.integers(1, 8), st.integers(1, 8)).map(sorted),
)
def test_more_budget_never_lowers_bits(log_alpha, betas, shared, bounds):
    n = len(log_alpha)
    alpha = torch.tensor(log_alpha, dtype=torch.float64).exp()
    beta = betas[0] if shared else torch.tensor(betas[:n], dtype=torch.float64)
    b_min, b_max = bounds
    previous = None
    for total in range(n * b_min, n * b_max + 1):
        bits = allocate_bits(alpha, beta, total / n, b_min=b_min, b_max=b_max)
        assert int(bits.sum()) == total
        if previous is not None:
            assert bool((bits >= previous).all())
        previous = bits
    continuous = [waterfill(alpha, beta, total / n, b_min, b_max) for total in range(n * b_min, n * b_max + 1)]
    for low, high in zip(continuous, continuous[1:]):
        assert bool((high >= low - 1e-9).all())


def test_waterfill_closed_form_shared_beta():
    alpha = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.8], dtype=torch.float64)
    for beta, budget in ((2.0, 4.0), (3.7, 2.5), (1.8, 5.25)):
        log_beta_alpha = alpha.log() / math.log(beta)
        expected = budget + log_beta_alpha - log_beta_alpha.mean()
        assert bool(((expected > 1) & (expected < 8)).all())  # no unit at a bound
        torch.testing.assert_close(waterfill(alpha, beta, budget), expected, rtol=0, atol=1e-9)


def test_waterfill_kkt_with_clipping():
    generator = torch.Generator().manual_seed(4)
    alpha = _random_alpha(50, generator) ** 3  # wide spread: several units at the bounds
    beta = torch.empty(50, dtype=torch.float64).uniform_(1.5, 4.0, generator=generator)
    bits = waterfill(alpha, beta, 3.0, b_min=2, b_max=6)
    assert float(bits.mean()) == pytest.approx(3.0, abs=1e-9)
    assert bool((bits == 2).any()) and bool((bits == 6).any())
    slope = alpha * beta.log() * beta ** (-bits)  # -dD/db, equal to lambda on free units
    free = (bits > 2) & (bits < 6)
    lam = slope[free]
    torch.testing.assert_close(lam, lam[:1].expand_as(lam), rtol=1e-8, atol=0)
    assert bool((slope[bits == 2] <= lam[0] * (1 + 1e-8)).all())
    assert bool((slope[bits == 6] >= lam[0] * (1 - 1e-8)).all())


@pytest.mark.parametrize("b_min,b_max", [(1, 8), (2, 4), (3, 3)])
def test_bounds(b_min, b_max):
    generator = torch.Generator().manual_seed(5)
    alpha = _random_alpha(16, generator) ** 4
    for function in (allocate_bits, waterfill):
        low = function(alpha, 2.0, b_min, b_min=b_min, b_max=b_max)
        high = function(alpha, 2.0, b_max, b_min=b_min, b_max=b_max)
        assert bool((low == b_min).all()) and bool((high == b_max).all())
        middle = function(alpha, 2.0, (b_min + b_max) / 2, b_min=b_min, b_max=b_max)
        assert bool(((middle >= b_min) & (middle <= b_max)).all())
    table = alpha[:, None] * 2.0 ** (-torch.arange(b_min, b_max + 1).double())
    grid = torch.arange(b_min, b_max + 1)
    assert bool((allocate_from_table(table, grid, b_min) == b_min).all())
    assert bool((allocate_from_table(table, grid, b_max) == b_max).all())


def test_deterministic_and_tie_breaking():
    alpha = torch.ones(6, dtype=torch.float64)  # all gains tied
    first = allocate_bits(alpha, 2.0, 2.5, b_min=1, b_max=4)
    assert first.tolist() == [3, 3, 3, 2, 2, 2]  # ties: lower bit first, then lower unit index
    assert torch.equal(first, allocate_bits(alpha.clone(), 2.0, 2.5, b_min=1, b_max=4))
    generator = torch.Generator().manual_seed(6)
    table = torch.rand(7, 5, generator=generator, dtype=torch.float64)
    grid = torch.arange(2, 7)
    assert torch.equal(allocate_from_table(table, grid, 4.0), allocate_from_table(table.clone(), grid, 4.0))
    alpha = _random_alpha(30, generator)
    assert torch.equal(waterfill(alpha, 3.0, 2.5), waterfill(alpha.clone(), 3.0, 2.5))


def test_total_distortion():
    alpha = torch.tensor([1.0, 8.0], dtype=torch.float64)
    assert float(total_distortion(alpha, 2.0, torch.tensor([1, 3]))) == pytest.approx(1.5)
    assert float(total_distortion(alpha, torch.tensor([2.0, 4.0]), torch.tensor([0.5, 1.5]))) == pytest.approx(
        2**-0.5 + 1.0
    )


def test_fixed_allocations():
    assert fixed_allocations(10, 10, 2.5) == [(1, 4), (2, 3), (3, 2), (4, 1)]
    assert fixed_allocations(10, 10, 3.0, 1, 8) == [(1, 5), (2, 4), (3, 3), (4, 2), (5, 1)]
    assert fixed_allocations(10, 10, 3.0, 2, 4) == [(2, 4), (3, 3), (4, 2)]
    assert fixed_allocations(10, 10, 2.25) == []
    assert fixed_allocations(2, 1, 3.0) == [(1, 7), (2, 5), (3, 3), (4, 1)]


def test_large_problem_is_fast():
    generator = torch.Generator().manual_seed(7)
    alpha = _random_alpha(10_000, generator)
    bits = allocate_bits(alpha, 2.0, 2.5)
    assert int(bits.sum()) == 25_000


def test_docstring_examples():
    assert doctest.testmod(allocation, extraglobs={"torch": torch}).failed == 0


ALPHA = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
TABLE = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: allocate_bits(ALPHA, 2.0, 9.0), r"budget 9.0 is outside .*\[1, 8\]"),
        (lambda: allocate_bits(ALPHA, 2.0, 0.5), r"budget 0.5 is outside"),
        (lambda: allocate_bits(ALPHA, 2.0, 2.0, b_min=5, b_max=3), r"b_min=5 is greater than b_max=3"),
        (lambda: allocate_bits(ALPHA, 2.0, 2.0, b_min=0), r"b_min=0 .*integers 1..8"),
        (lambda: allocate_bits(ALPHA, 2.0, 2.0, b_max=9), r"b_max=9 .*integers 1..8"),
        (lambda: waterfill(ALPHA, 2.0, 2.0, b_min=2.5), r"b_min=2.5 .*integers 1..8"),
        (lambda: allocate_bits(torch.tensor([1.0, 0.0, 2.0]), 2.0, 2.0), r"positive and finite, got alpha\[1\] = 0.0"),
        (lambda: waterfill(torch.tensor([1.0, -1.0]), 2.0, 2.0), r"alpha\[1\] = -1.0"),
        (lambda: allocate_bits(torch.tensor([1.0, math.nan]), 2.0, 2.0), r"positive and finite, got alpha\[1\] = nan"),
        (lambda: allocate_bits(torch.tensor([1.0, math.inf]), 2.0, 2.0), r"alpha\[1\] = inf"),
        (lambda: allocate_bits(ALPHA, 1.0, 2.0), r"beta must be finite and > 1 .*beta\[0\] = 1.0"),
        (lambda: allocate_bits(ALPHA, torch.tensor([2.0, 0.5, 3.0]), 2.0), r"beta\[1\] = 0.5"),
        (lambda: allocate_bits(ALPHA, torch.tensor([2.0, 3.0]), 2.0), r"beta must be .*\(3,\), got shape \(2,\)"),
        (lambda: allocate_bits(ALPHA.reshape(1, 3), 2.0, 2.0), r"alpha must be a non-empty 1-D .*\(1, 3\)"),
        (lambda: allocate_bits(ALPHA, 2.0, 2.5), r"2.5 with 3 units needs 7.5 total bits.*2.33333 or 2.66667"),
        (lambda: total_distortion(ALPHA, 2.0, torch.tensor([1, 2])), r"bits must have the same shape"),
        (lambda: allocate_from_table(TABLE, [1, 2, 4], 2.0), r"bit_grid must be consecutive"),
        (lambda: allocate_from_table(TABLE, [7, 8, 9], 8.0), r"bit_grid must be consecutive .*1..8"),
        (lambda: allocate_from_table(TABLE, [1, 2], 2.0), r"distortion must have shape \(n_units, n_bits\)"),
        (lambda: allocate_from_table(TABLE, [2, 3, 4], 1.0), r"budget 1.0 is outside .*\[2, 4\]"),
        (lambda: allocate_from_table(TABLE, [2, 3, 4], 2.5), r"budget 2.5 with 3 units .*not an integer"),
        (lambda: allocate_from_table(TABLE * math.nan, [2, 3, 4], 3.0), r"distortion must be finite"),
        (lambda: fixed_allocations(0, 4, 2.5), r"n_units_k must be a positive integer, got 0"),
        (lambda: fixed_allocations(4, 4, 9.0), r"budget 9.0 is outside"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- descent from a given allocation ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_descent_path_moves_one_bit_per_step_and_ends_at_the_optimum(n_units, seed):
    from hf_ratequant.allocation import descent_path

    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(n_units, generator=g, dtype=torch.float64) * 10 + 0.01
    beta = torch.rand(n_units, generator=g, dtype=torch.float64) * 4 + 1.5
    grid = torch.tensor([2, 3, 4, 5])
    table = alpha[:, None] * beta[:, None] ** (-grid.double())  # convex rows
    start = torch.randint(2, 6, (n_units,), generator=g)
    path = descent_path(table, grid, start)
    total = lambda b: float(table[torch.arange(n_units), b - 2].sum())  # noqa: E731
    previous = start
    for bits in path:
        assert int(bits.sum()) == int(start.sum()) and bits.min() >= 2 and bits.max() <= 5
        assert sorted((bits - previous).abs().tolist())[-2:] == [1, 1] and int((bits != previous).sum()) == 2
        assert total(bits) < total(previous)
        previous = bits
    budget = float(start.double().mean())
    if (budget * n_units) % 1 == 0:
        assert total(previous) == pytest.approx(total(allocate_from_table(table, grid, budget)), rel=1e-12)


def test_descent_path_from_the_optimum_is_empty_and_bad_starts_are_refused():
    from hf_ratequant.allocation import descent_path

    table = torch.tensor([[4.0, 2.0, 1.0], [64.0, 16.0, 4.0]])
    assert descent_path(table, torch.tensor([2, 3, 4]), torch.tensor([3, 4])) == []
    with pytest.raises(ValueError, match=r"start must lie within \[2, 4\], got \[1\] = 5"):
        descent_path(table, torch.tensor([2, 3, 4]), torch.tensor([3, 5]))
    with pytest.raises(ValueError, match=r"shape \(n_units, n_bits\) = \(3, 3\)"):
        descent_path(table, torch.tensor([2, 3, 4]), torch.tensor([3, 3, 3]))
