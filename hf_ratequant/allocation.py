"""Bit allocation across KV-cache units under an average-bit budget.

A *unit* is one (layer, kv-head, K or V) slice of the KV cache. Quantized at `b` bits, unit `u` is modelled as having
distortion `D_u(b) = alpha_u * beta_u ** (-b)`. We pick integer bits `b_u` in `[b_min, b_max]` minimising
`sum_u D_u(b_u)` subject to `mean_u b_u == budget`.

- [`waterfill`] solves the continuous relaxation by reverse waterfilling: every unclipped unit has the same slope
  `-D_u'(b_u) = lambda`, so `b_u = clip(log(alpha_u * ln(beta_u) / lambda) / ln(beta_u), b_min, b_max)`, with
  `lambda` found by bisection (in log space) so that the mean equals the budget.
- [`allocate_bits`] returns the exact integer optimum. `D_u` is convex in `b`, so adding bits one at a time to
  the largest marginal gain `D_u(b) - D_u(b + 1)` is optimal; since each unit's gains decrease with `b`, this is the
  same as taking the `total - n_units * b_min` largest gains overall (ties: lower bit first, then lower unit index).
- [`allocate_from_table`] does the same from a table of measured distortions. Convex rows use the greedy; otherwise an
  exact dynamic program over the total bit count is used.
- [`descent_path`] walks from a given allocation (a fixed keys/values split) towards the table's optimum, one bit
  moved per step, so that calibration can also try allocations part of the way there.
- [`Candidate`] is one allocation calibration may return, with its [`Family`]; [`fixed_candidates`] and
  [`descent_candidates`] make the fixed keys/values splits and the steps from the best of them, and
  [`successive_halving`] races candidates on rungs of validation windows with an injected scoring function.

All functions are deterministic and work in float64 on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

logger = logging.getLogger(__name__)

ALLOWED_BITS = tuple(range(1, 9))
_BISECTION_STEPS = 200
_TOTAL_TOL = 1e-6


def _check_bounds(b_min: int, b_max: int) -> None:
    for name, value in (("b_min", b_min), ("b_max", b_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
            raise ValueError(
                f"{name}={value!r} is not an allowed bit-width: allowed bit-widths are the integers "
                f"{ALLOWED_BITS[0]}..{ALLOWED_BITS[-1]}; pass an integer in that range."
            )
    if b_min > b_max:
        raise ValueError(f"b_min={b_min} is greater than b_max={b_max}; pass b_min <= b_max.")


def _check_budget(budget: float, b_min: int, b_max: int) -> float:
    budget = float(budget)
    if not math.isfinite(budget) or not b_min <= budget <= b_max:
        raise ValueError(
            f"budget {budget} is outside the allowed range [b_min, b_max] = [{b_min}, {b_max}]; choose a budget in "
            "that range or widen the bounds."
        )
    return budget


def _total_bits(budget: float, n_units: int) -> int:
    """Integer total `budget * n_units`, or a ValueError naming the nearest feasible budgets."""
    total = budget * n_units
    nearest = round(total)
    if abs(total - nearest) > _TOTAL_TOL:
        below, above = math.floor(total), math.ceil(total)
        raise ValueError(
            f"budget {budget} with {n_units} units needs {total:.6g} total bits, which is not an integer; choose a "
            f"budget that is a multiple of 1/{n_units}, e.g. {below / n_units:.6g} or {above / n_units:.6g}."
        )
    return nearest


def check_budget(budget: float, n_units: int, b_min: int, b_max: int) -> None:
    """Raise a `ValueError` unless `n_units` units of `b_min..b_max` bits can average exactly `budget` bits."""
    _check_bounds(b_min, b_max)
    _total_bits(_check_budget(budget, b_min, b_max), n_units)


def _as_float64(values: float | torch.Tensor) -> torch.Tensor:
    """CPU float64 copy; Python numbers and lists go straight to float64 (no float32 round trip)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64)
    return torch.as_tensor(values, dtype=torch.float64)


def _first_bad(values: torch.Tensor, bad: torch.Tensor) -> str:
    index = int(bad.nonzero()[0, 0]) if values.dim() else 0
    return f"[{index}] = {float(values.reshape(-1)[index])}"


def _check_alpha(alpha: torch.Tensor) -> torch.Tensor:
    alpha = _as_float64(alpha)
    if alpha.dim() != 1 or alpha.numel() == 0:
        raise ValueError(
            f"alpha must be a non-empty 1-D tensor of shape (n_units,), got shape {tuple(alpha.shape)}; flatten it "
            "with alpha.reshape(-1)."
        )
    bad = ~(torch.isfinite(alpha) & (alpha > 0))
    if bad.any():
        raise ValueError(
            f"alpha must be positive and finite, got alpha{_first_bad(alpha, bad)}; distortion scales must be > 0 "
            "(clamp tiny or zero values, e.g. alpha.clamp_min(1e-12))."
        )
    return alpha


def _check_beta(beta: float | torch.Tensor, n_units: int) -> torch.Tensor:
    beta = _as_float64(beta)
    if beta.shape not in ((), (1,), (n_units,)):
        raise ValueError(
            f"beta must be a float or a tensor of shape (), (1,) or (n_units,) = ({n_units},), got shape "
            f"{tuple(beta.shape)}; pass one beta per unit or a single shared value."
        )
    bad = ~(torch.isfinite(beta) & (beta > 1))
    if bad.any():
        raise ValueError(
            f"beta must be finite and > 1 (distortion must fall as bits grow), got beta{_first_bad(beta, bad)}; "
            "refit the distortion model or pass a value > 1."
        )
    return beta.expand(n_units)


def _greedy_counts(gains: torch.Tensor, n_extra: int) -> torch.Tensor:
    """Extra bits per unit from the `n_extra` largest marginal gains; rows of `gains` must be non-increasing."""
    n_units = gains.shape[0]
    flat = gains.T.reshape(-1)  # (n_steps * n_units,), index = step * n_units + unit
    chosen = torch.argsort(flat, descending=True, stable=True)[:n_extra]  # ties: lower step, then lower unit
    return torch.bincount(chosen % n_units, minlength=n_units)  # (n_units,)


def _dp_counts(table: torch.Tensor, n_extra: int) -> torch.Tensor:
    """Exact minimiser of `sum_u table[u, k_u]` subject to `sum_u k_u == n_extra` (any table shape)."""
    n_units, n_choices = table.shape
    cost = torch.full((n_extra + 1,), math.inf, dtype=torch.float64)  # (n_extra + 1,) best cost per running total
    cost[0] = 0.0
    choice = torch.zeros(n_units, n_extra + 1, dtype=torch.uint8)  # (n_units, n_extra + 1)
    for u in range(n_units):
        candidates = torch.full((n_choices, n_extra + 1), math.inf, dtype=torch.float64)
        for k in range(min(n_choices, n_extra + 1)):
            candidates[k, k:] = cost[: n_extra + 1 - k] + table[u, k]
        best = candidates.argmin(0)  # first minimum: fewest bits for this unit on ties
        cost = candidates.gather(0, best[None]).squeeze(0)
        choice[u] = best.to(torch.uint8)
    counts = torch.zeros(n_units, dtype=torch.long)
    remaining = n_extra
    for u in range(n_units - 1, -1, -1):
        counts[u] = int(choice[u, remaining])
        remaining -= int(counts[u])
    return counts


def waterfill(
    alpha: torch.Tensor, beta: float | torch.Tensor, budget: float, b_min: int = 1, b_max: int = 8
) -> torch.Tensor:
    """Continuous reverse-waterfilling allocation minimising `sum_u alpha_u * beta_u ** (-b_u)`.

    Every unit not at a bound gets `b_u = log(alpha_u * ln(beta_u) / lambda) / ln(beta_u)`; `lambda` is found by
    bisection on `log(lambda)` so that the mean of the clipped bits equals `budget`. With one shared `beta` and no unit
    at a bound this is `budget + log_beta(alpha_u) - mean_u(log_beta(alpha_u))`.

    Args:
        alpha (`torch.Tensor`): positive, finite distortion scales of shape `(n_units,)`.
        beta (`float` or `torch.Tensor`): distortion decay per bit, `> 1`; one shared value or shape `(n_units,)`.
        budget (`float`): average bits per unit, in `[b_min, b_max]`; need not make the total an integer.
        b_min (`int`, *optional*, defaults to 1): smallest bit-width, 1 to 8.
        b_max (`int`, *optional*, defaults to 8): largest bit-width, 1 to 8.

    Returns:
        `torch.Tensor`: float64 bits of shape `(n_units,)` in `[b_min, b_max]` with mean `budget`.

    Example:
        >>> waterfill(torch.tensor([1.0, 4.0]), 2.0, budget=3.0).round(decimals=9)
        tensor([2., 4.], dtype=torch.float64)
    """
    _check_bounds(b_min, b_max)
    budget = _check_budget(budget, b_min, b_max)
    alpha = _check_alpha(alpha)
    log_beta = _check_beta(beta, alpha.numel()).log()  # (n_units,)
    if budget in (b_min, b_max):
        return torch.full_like(alpha, budget)
    intercept = alpha.log() + log_beta.log()  # (n_units,) log(alpha * ln beta)

    def bits_at(log_lambda: float) -> torch.Tensor:
        return ((intercept - log_lambda) / log_beta).clamp(b_min, b_max)  # (n_units,)

    lo = float((intercept - b_max * log_beta).min())  # every unit at b_max: mean >= budget
    hi = float((intercept - b_min * log_beta).max())  # every unit at b_min: mean <= budget
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if float(bits_at(mid).mean()) > budget:
            lo = mid
        else:
            hi = mid
    return bits_at(0.5 * (lo + hi))


def allocate_bits(
    alpha: torch.Tensor, beta: float | torch.Tensor, budget: float, b_min: int = 1, b_max: int = 8
) -> torch.LongTensor:
    """Optimal integer bits minimising `sum_u alpha_u * beta_u ** (-b_u)` with `mean_u b_u == budget` exactly.

    Starts every unit at `b_min` and hands out the remaining `budget * n_units - n_units * b_min` bits one at a time to
    the largest marginal gain `D_u(b) - D_u(b + 1)` (compared in log space, so tiny distortions do not underflow). The
    model is convex in `b`, so this is optimal. Ties go to the lower bit-width, then to the lower unit index. A larger
    budget hands out a superset of the same bits, so no unit ever loses bits when the budget grows.

    Args:
        alpha (`torch.Tensor`): positive, finite distortion scales of shape `(n_units,)`.
        beta (`float` or `torch.Tensor`): distortion decay per bit, `> 1`; one shared value or shape `(n_units,)`.
        budget (`float`): average bits per unit, in `[b_min, b_max]`; `budget * n_units` must be an integer.
        b_min (`int`, *optional*, defaults to 1): smallest bit-width, 1 to 8.
        b_max (`int`, *optional*, defaults to 8): largest bit-width, 1 to 8.

    Returns:
        `torch.LongTensor`: bits of shape `(n_units,)` in `[b_min, b_max]` summing to `budget * n_units`.

    Example:
        >>> allocate_bits(torch.tensor([1.0, 16.0]), 2.0, budget=2.5)
        tensor([1, 4])
    """
    _check_bounds(b_min, b_max)
    budget = _check_budget(budget, b_min, b_max)
    alpha = _check_alpha(alpha)
    log_beta = _check_beta(beta, alpha.numel()).log()  # (n_units,)
    n_units = alpha.numel()
    n_extra = _total_bits(budget, n_units) - n_units * b_min
    steps = torch.arange(b_min, b_max, dtype=torch.float64)  # (n_steps,) bit-width before each added bit
    # log(D(b) - D(b + 1)) = log(alpha) - b * ln(beta) + log(1 - 1 / beta): non-increasing in b for each unit
    log_gains = (alpha.log() + torch.log1p(-torch.exp(-log_beta)))[:, None] - steps[None, :] * log_beta[:, None]
    return b_min + _greedy_counts(log_gains, n_extra)  # (n_units,)


def allocate_from_table(distortion: torch.Tensor, bit_grid: torch.Tensor, budget: float) -> torch.LongTensor:
    """Optimal integer bits from a table of measured distortions, with `mean_u b_u == budget` exactly.

    Minimises `sum_u distortion[u, b_u - bit_grid[0]]`. If every row is convex in the bit-width (non-increasing
    marginal gains, the usual case for measured or fitted curves), bits are handed out greedily by marginal gain as in
    [`allocate_bits`]. Otherwise greedy is not optimal and an exact dynamic program over the running total of extra
    bits is used: `O(n_units * n_bits * extra)` time and `n_units * extra` bytes, where `extra` is
    `budget * n_units - n_units * bit_grid[0]`. Both paths return an exact optimum (ties may be broken differently).

    Args:
        distortion (`torch.Tensor`): finite distortions of shape `(n_units, n_bits)`; column `j` is the distortion at
            `bit_grid[j]` bits.
        bit_grid (`torch.Tensor`): 1-D tensor (or sequence) of `n_bits` consecutive increasing integers in 1..8, e.g.
            `[2, 3, 4, 5, 6]`.
        budget (`float`): average bits per unit, in `[bit_grid[0], bit_grid[-1]]`; `budget * n_units` must be an
            integer.

    Returns:
        `torch.LongTensor`: bits of shape `(n_units,)`, each in `bit_grid`, summing to `budget * n_units`.

    Example:
        >>> table = torch.tensor([[4.0, 2.0, 1.0], [64.0, 16.0, 4.0]])
        >>> allocate_from_table(table, torch.tensor([2, 3, 4]), budget=3.5)
        tensor([3, 4])
    """
    grid = torch.as_tensor(bit_grid)
    table = _as_float64(distortion)  # (n_units, n_bits)
    if grid.dim() != 1 or grid.numel() == 0:
        raise ValueError(f"bit_grid must be a non-empty 1-D tensor, got shape {tuple(grid.shape)}; e.g. [2, 3, 4].")
    values = [float(b) for b in grid.tolist()]
    first = values[0]
    if not first.is_integer() or values != [first + j for j in range(len(values))] or not (
        ALLOWED_BITS[0] <= first and values[-1] <= ALLOWED_BITS[-1]
    ):
        raise ValueError(
            f"bit_grid must be consecutive increasing integers within {ALLOWED_BITS[0]}..{ALLOWED_BITS[-1]}, got "
            f"{values}; pass e.g. [2, 3, 4, 5, 6]."
        )
    b_lo, b_hi = int(first), int(values[-1])
    if table.dim() != 2 or table.shape[0] == 0 or table.shape[1] != len(values):
        raise ValueError(
            f"distortion must have shape (n_units, n_bits) = (n_units, {len(values)}) to match bit_grid, got "
            f"{tuple(table.shape)}; one column per bit-width in bit_grid."
        )
    if not torch.isfinite(table).all():
        raise ValueError("distortion must be finite, got NaN or inf entries; drop or re-measure those units.")
    budget = _check_budget(budget, b_lo, b_hi)
    n_units = table.shape[0]
    n_extra = _total_bits(budget, n_units) - n_units * b_lo
    gains = table[:, :-1] - table[:, 1:]  # (n_units, n_bits - 1) gain of each added bit
    if bool((gains[:, 1:] <= gains[:, :-1]).all()):
        return b_lo + _greedy_counts(gains, n_extra)  # (n_units,)
    logger.debug("Non-convex distortion table: exact dynamic program (%d units, %d extra bits).", n_units, n_extra)
    return b_lo + _dp_counts(table, n_extra)  # (n_units,)


def total_distortion(alpha: torch.Tensor, beta: float | torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Modelled total distortion `sum_u alpha_u * beta_u ** (-bits_u)`.

    Args:
        alpha (`torch.Tensor`): positive, finite distortion scales of shape `(n_units,)`.
        beta (`float` or `torch.Tensor`): distortion decay per bit, `> 1`; one shared value or shape `(n_units,)`.
        bits (`torch.Tensor`): integer or continuous bits of shape `(n_units,)`.

    Returns:
        `torch.Tensor`: float64 scalar.
    """
    alpha = _check_alpha(alpha)
    log_beta = _check_beta(beta, alpha.numel()).log()  # (n_units,)
    bits = torch.as_tensor(bits)
    if bits.shape != alpha.shape:
        raise ValueError(
            f"bits must have the same shape as alpha, {tuple(alpha.shape)}, got {tuple(bits.shape)}; pass one "
            "bit-width per unit."
        )
    return (alpha * torch.exp(-bits.to(torch.float64) * log_beta)).sum()


def fixed_allocations(
    n_units_k: int, n_units_v: int, budget: float, b_min: int = 1, b_max: int = 8
) -> list[tuple[int, int]]:
    """Every uniform (key bits, value bits) pair whose unit-weighted mean equals `budget`.

    Keys all get `k` bits and values all get `v` bits, with `b_min <= k, v <= b_max` and
    `(n_units_k * k + n_units_v * v) / (n_units_k + n_units_v) == budget`. With equal unit counts this is
    `(k + v) / 2 == budget`, e.g. budget 2.5 gives `[(1, 4), (2, 3), (3, 2), (4, 1)]`. The list may be empty when no
    uniform split hits the budget (e.g. 2.25 with equal counts).

    Args:
        n_units_k (`int`): number of key units, `> 0`.
        n_units_v (`int`): number of value units, `> 0`.
        budget (`float`): average bits per unit, in `[b_min, b_max]`.
        b_min (`int`, *optional*, defaults to 1): smallest bit-width, 1 to 8.
        b_max (`int`, *optional*, defaults to 8): largest bit-width, 1 to 8.

    Returns:
        `list[tuple[int, int]]`: `(key_bits, value_bits)` pairs sorted by increasing key bits.
    """
    _check_bounds(b_min, b_max)
    budget = _check_budget(budget, b_min, b_max)
    for name, count in (("n_units_k", n_units_k), ("n_units_v", n_units_v)):
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"{name} must be a positive integer, got {count!r}; pass the number of units.")
    target = budget * (n_units_k + n_units_v)
    return [
        (k, v)
        for k in range(b_min, b_max + 1)
        for v in range(b_min, b_max + 1)
        if abs(n_units_k * k + n_units_v * v - target) <= _TOTAL_TOL
    ]


def descent_path(distortion: torch.Tensor, bit_grid: torch.Tensor, start: torch.Tensor) -> list[torch.LongTensor]:
    """The allocations met by steepest descent on a measured table from `start`, one bit moved per step.

    Every step moves one bit from the unit that loses least by giving it up to the unit that gains most by receiving
    it, as long as the table predicts a strict improvement; the sum of bits never changes. Stopping early keeps an
    allocation close to `start` (e.g. the best fixed keys/values split), where a measured table's predictions of small
    moves are more trustworthy than its prediction of the far-away optimum.

    Args:
        distortion (`torch.Tensor`): `(n_units, n_bits)`, column `j` the distortion at `bit_grid[j]` bits.
        bit_grid (`torch.Tensor`): consecutive increasing integers, e.g. `[2, 3, 4, 5, 6]`.
        start (`torch.Tensor`): `(n_units,)` integer bits within `bit_grid`.

    Returns:
        `list[torch.LongTensor]`: the allocation after each step (empty if no step improves on `start`).

    Example:
        >>> table = torch.tensor([[4.0, 2.0, 1.0], [64.0, 16.0, 4.0]])
        >>> descent_path(table, torch.tensor([2, 3, 4]), torch.tensor([4, 3]))
        [tensor([3, 4])]
    """
    grid = torch.as_tensor(bit_grid)
    table = _as_float64(distortion)
    b_lo, b_hi = int(grid[0]), int(grid[-1])
    bits = torch.as_tensor(start).long().clone()
    if table.dim() != 2 or table.shape != (bits.numel(), grid.numel()):
        raise ValueError(f"distortion must have shape (n_units, n_bits) = ({bits.numel()}, {grid.numel()}), got "
                         f"{tuple(table.shape)}.")
    if bool(((bits < b_lo) | (bits > b_hi)).any()):
        bad = _first_bad(bits, (bits < b_lo) | (bits > b_hi))
        raise ValueError(f"start must lie within [{b_lo}, {b_hi}], got {bad}.")
    rows = torch.arange(bits.numel())
    path = []
    for _ in range(bits.numel() * grid.numel()):  # every step lowers the total: it ends well before this
        j = bits - b_lo
        gain = torch.where(bits < b_hi, table[rows, j] - table[rows, (j + 1).clamp_max(grid.numel() - 1)],
                           torch.tensor(-math.inf, dtype=torch.float64))
        loss = torch.where(bits > b_lo, table[rows, (j - 1).clamp_min(0)] - table[rows, j],
                           torch.tensor(math.inf, dtype=torch.float64))
        up = int(gain.argmax())
        loss[up] = math.inf
        down = int(loss.argmin())
        if not gain[up] > loss[down]:
            break
        bits[up] += 1
        bits[down] -= 1
        path.append(bits.clone())
    return path


# ---- candidates and the validation race -------------------------------------------------------------------------

Family = Literal["ratequant", "descent", "fixed"]
"""Where a candidate allocation comes from: `"ratequant"` from the measured distortion, `"descent"` a few steps from
the best fixed split towards the measured optimum, `"fixed"` the same bits for every key and for every value."""

DESCENT_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
"""How far along the descent from the best fixed split (towards the measured optimum) the extra candidates lie."""
VALIDATION_FINALISTS = 3
"""Candidates scored on every validation window; the others only on the first rungs (see [`validation_rungs`])."""


@dataclass(frozen=True, eq=False)
class Candidate:
    """One allocation calibration may return.

    Args:
        name (`str`): unique among the candidates, e.g. `"ratequant-measured"` or `"K3V2"`.
        family ([`Family`]): where the allocation comes from.
        bits (`torch.LongTensor`): `(layers, kv_heads, 2)` bits, `[..., 0]` keys and `[..., 1]` values.
        groups (`torch.LongTensor`, *optional*): every unit's group size, same shape (None: the layout's).
    """

    name: str
    family: Family
    bits: torch.LongTensor
    groups: torch.LongTensor | None = None

    @property
    def key(self) -> tuple[int, ...]:
        """The flattened bits (and group sizes): candidates with equal keys are the same allocation (scored
        once)."""
        bits = tuple(self.bits.reshape(-1).tolist())
        return bits if self.groups is None else bits + (-1,) + tuple(self.groups.reshape(-1).tolist())

    @property
    def is_fixed_split(self) -> bool:
        """A fixed keys/values split of bits alone at the layout's group (where descent starts from)."""
        return self.family == "fixed" and self.groups is None

    @property
    def is_fixed_pair(self) -> bool:
        """A fixed (bits, group) pair of keys and one of values: a comparison point of budgets in bytes."""
        return self.family == "fixed" and self.groups is not None


def fixed_split_name(key_bits: int, value_bits: int) -> str:
    """The name of a fixed split: `"uniform-3"` when keys and values get the same bits, else `"K3V2"`."""
    return f"uniform-{key_bits}" if key_bits == value_bits else f"K{key_bits}V{value_bits}"


def fixed_candidates(num_layers: int, num_kv_heads: int, budget: float, b_min: int, b_max: int) -> list[Candidate]:
    """Every fixed keys/values split of `budget` bits ([`fixed_allocations`]), in increasing key bits."""
    n_units = num_layers * num_kv_heads
    return [
        Candidate(fixed_split_name(k, v), "fixed", torch.stack([torch.full((num_layers, num_kv_heads), k),
                                                                  torch.full((num_layers, num_kv_heads), v)], dim=-1))
        for k, v in fixed_allocations(n_units, n_units, budget, b_min, b_max)
    ]


def descent_candidates(distortion: torch.Tensor, bit_grid: list[int], origin: Candidate) -> list[Candidate]:
    """Allocations part of the way ([`DESCENT_FRACTIONS`]) along [`descent_path`] from `origin` on a `(layers,
    kv_heads, 2, n_bits)` table, named `ratequant-from-{origin}-{steps}`: small moves from a split known to be good,
    where the measure's predictions are the most reliable."""
    path = descent_path(distortion.reshape(-1, len(bit_grid)), torch.tensor(bit_grid), origin.bits.reshape(-1))
    steps = sorted({max(1, round(len(path) * f)) for f in DESCENT_FRACTIONS}) if path else []
    return [Candidate(f"ratequant-from-{origin.name}-{s}", "descent", path[s - 1].reshape(origin.bits.shape))
            for s in steps]


def validation_rungs(n_windows: int) -> list[int]:
    """How successive halving splits `n_windows` validation windows into rungs: a quarter, a quarter and the half
    left from 8 windows on, two halves from 4, one rung below that. Candidates scored on the first rung are cut to
    `VALIDATION_FINALISTS` x 2 before the second and to `VALIDATION_FINALISTS` before the third."""
    if n_windows >= 8:
        return [n_windows // 4, n_windows // 4, n_windows - 2 * (n_windows // 4)]
    if n_windows >= 4:
        return [n_windows // 2, n_windows - n_windows // 2]
    return [n_windows]


class RungTally(NamedTuple):
    """A candidate's score on one rung: the KL summed over the rung's tokens, the rung's tokens, and whether every
    token was scored (`complete=False`: the scorer stopped once the sum passed `stop_above`, and `kl_sum` is a
    lower bound of the full sum, KL per token being non-negative)."""

    kl_sum: float
    tokens: float
    complete: bool = True


RungScore = Callable[["Candidate", int, float], RungTally]
"""`score(candidate, rung, stop_above)`: the candidate's [`RungTally`] on rung `rung`; the scorer may stop once the
KL summed over the rung passes `stop_above` (`inf`: score every token), returning `complete=False`."""


@dataclass(frozen=True)
class RaceResult:
    """What [`successive_halving`] found: the `winner`'s name, every candidate's mean KL (`scores`, in entry
    order) over the windows it was scored on (`windows`), the `finalists` scored on every rung, the `entrants`
    (the candidates given, then those `extend` added), and the candidates `stopped` early, whose score is a lower
    bound."""

    winner: str
    scores: dict[str, float]
    finalists: list[str]
    windows: dict[str, int]
    entrants: list[Candidate]
    stopped: list[str] = dataclasses.field(default_factory=list)


def successive_halving(
    candidates: Sequence[Candidate],
    rungs: Sequence[int],
    score: RungScore,
    *,
    finalists: int = VALIDATION_FINALISTS,
    extend: Callable[[dict[str, float]], list[Candidate]] | None = None,
    order: Callable[[Candidate], float] | None = None,
) -> RaceResult:
    """Race `candidates` over `rungs` (window counts) of validation windows, scoring each distinct allocation once
    per rung through `score`.

    Every candidate is scored on the first rung; `extend` (if given) sees those scores and may enter more candidates,
    scored on the first rung too. Fixed splits with group sizes (family `"fixed"`, comparison points rarely near the
    best) are scored after the extension, whose candidates tighten the bound they are stopped by; `extend` does not
    see them. Before rung `r` (from 1) the field is cut to the `finalists * 2 ** (len(rungs) - 1
    - r)` best by mean KL over the rungs scored so far (ties: entry order), so `finalists` are scored on every
    window; the winner is the best finalist (ties: the first entered). Candidates with equal bits share one score.

    Early stopping: a candidate is scored with `stop_above`, the rung's KL sum past which its total can no longer
    make the next cut (nor win, on the last rung), given the candidates of the rung already scored in full; a
    scorer that stops there saves the rest of the rung and reports a lower bound (listed in `stopped`). A fixed
    split of bits alone (family `"fixed"`, no group sizes) also stays on the first rung until it can no longer be
    the best of them, where `extend` starts descent from. Nothing the race decides depends on stopping: the cut,
    the finalists, the winner and the best fixed split of bits alone are those of scoring every token. To stop the
    hopeless early, each rung scores the likeliest first: on the first rung in `order` (lowest first, e.g. the
    modelled distortion; entry order without it), on later ones by mean KL so far.
    """
    if not rungs:
        raise ValueError("successive_halving needs at least one rung of validation windows (got none).")
    entrants: dict[str, Candidate] = {}
    tally: dict[tuple[int, ...], list[RungTally]] = {}  # allocation -> its tally per rung scored
    fixed: set[tuple[int, ...]] = set()  # the allocations of fixed splits of bits alone

    def total(key: tuple[int, ...]) -> float:
        return sum(t.kl_sum for t in tally[key])

    def mean_kl(key: tuple[int, ...]) -> float:
        return total(key) / sum(t.tokens for t in tally[key])

    def complete(key: tuple[int, ...], rung: int) -> bool:
        return len(tally.get(key, [])) == rung + 1 and tally[key][-1].complete

    def stop_above(c: Candidate, field: list[Candidate], rung: int) -> float:
        keep = finalists * 2 ** (len(rungs) - 2 - rung) if rung < len(rungs) - 1 else 1
        done = sorted(total(k) for k in {d.key for d in field} if complete(k, rung))
        bound = done[keep - 1] if len(done) >= keep else math.inf
        if c.key in fixed and not rung:
            bound = max(bound, min((total(k) for k in fixed if complete(k, 0)), default=math.inf))
        prior = sum(t.kl_sum for t in tally.get(c.key, [])[:rung])
        return bound - prior

    def score_rung(field: list[Candidate], rung: int) -> None:
        todo = [c for c in _distinct(field) if len(tally.get(c.key, [])) == rung]
        if rung:
            todo.sort(key=lambda c: mean_kl(c.key))
        elif order is not None:
            todo.sort(key=order)
        for c in todo:
            result = RungTally(*score(c, rung, stop_above(c, field, rung)))
            tally.setdefault(c.key, []).append(result)

    def enter(batch: Sequence[Candidate]) -> None:
        names = [c.name for c in batch]
        clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(entrants)))
        if clash:
            raise ValueError(f"Candidate names must be unique; {clash} entered twice. Rename the candidates.")
        entrants.update({c.name: c for c in batch})
        fixed.update(c.key for c in batch if c.is_fixed_split)

    def first(field: list[Candidate]) -> list[Candidate]:
        return [c for c in field if not c.is_fixed_pair]

    enter(candidates)
    if extend is not None:
        score_rung(first(list(entrants.values())), 0)
        enter(extend({name: mean_kl(c.key) for name, c in entrants.items() if c.key in tally}))
        score_rung(first(list(entrants.values())), 0)
    score_rung(list(entrants.values()), 0)
    racing = _distinct(list(entrants.values()))
    for rung in range(1, len(rungs)):
        racing = sorted(racing, key=lambda c: mean_kl(c.key))[: finalists * 2 ** (len(rungs) - 1 - rung)]
        score_rung(racing, rung)
    final_keys = {c.key for c in racing}
    scores = {name: mean_kl(c.key) for name, c in entrants.items()}
    last = [name for name, c in entrants.items() if c.key in final_keys]
    windows = {name: sum(rungs[: len(tally[c.key])]) for name, c in entrants.items()}
    stopped = [name for name, c in entrants.items() if not tally[c.key][-1].complete]
    return RaceResult(min(last, key=scores.get), scores, last, windows, list(entrants.values()), stopped)


def _distinct(field: list[Candidate]) -> list[Candidate]:
    """The first candidate of each distinct allocation, in order."""
    first: dict[tuple[int, ...], Candidate] = {}
    for c in field:
        first.setdefault(c.key, c)
    return list(first.values())
