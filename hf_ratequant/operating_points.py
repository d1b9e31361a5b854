"""Allocation over operating points: each unit picks one option with a rate and a distortion, under a rate budget.

A unit (one layer, kv-head and K or V) can be stored in several ways: a bit-width and a group size, each with its
true rate (code bits plus the scales and zero-points of its groups, in bits per element) and a measured
distortion. Choosing one option per unit to minimise the total distortion with the total rate at most a budget is a
multiple-choice knapsack; reverse waterfilling ([`allocation.allocate_bits`]) is the special case where every option
costs one more code bit than the last and the distortion falls exponentially in it.

- [`pareto_options`]: a unit's options that no other option beats in both rate and distortion.
- [`lower_hull`]: the options on a unit's lower convex hull of (rate, distortion) points.
- [`hull_path`]: the greedy over hull slopes. Starting from every unit's cheapest hull point, it takes the steps
  with the largest distortion saved per unit of rate first. Each prefix of the path is a Lagrangian solution, hence
  optimal among all allocations of no more rate (Everett): exact whenever the budget lands on a prefix, which it
  does when every step costs the same (whole bits, one group size).
- [`allocate_rate`]: the exact integer optimum for any budget: the hull path when one of its prefixes spends the
  budget exactly, otherwise a dynamic program over the running total rate, over every Pareto option (an option
  above the hull can be the optimum when the budget is tight). Rates are integers: pass rates in a unit that makes
  them exact, e.g. bits per block of elements (see [`integer_rates`]).
- [`allocate_blocks`]: the same when units come in blocks that each pick a *mode* first: a mode restricts the
  options of the block's units and costs the block an extra rate (a layer whose keys use larger token groups keeps
  a longer full-precision window). Exact too: each block's Pareto frontier over its modes and its units' options,
  then [`allocate_rate`] over the blocks.

Pure functions, deterministic, float64 on CPU; no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

__all__ = ["allocate_blocks", "allocate_rate", "block_frontier", "hull_path", "integer_rates", "lower_hull",
           "pareto_options", "total_rate"]

_MAX_CAPACITY = 1 << 26  # the dynamic program's running totals: a budget past this is a unit mistake


def _check(rates: torch.Tensor, distortion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rates, distortion = torch.as_tensor(rates), torch.as_tensor(distortion, dtype=torch.float64)
    if rates.dim() != 2 or rates.shape != distortion.shape or rates.numel() == 0:
        raise ValueError(
            f"rates and distortion must both have shape (n_units, n_options), got {tuple(rates.shape)} and "
            f"{tuple(distortion.shape)}; one row per unit, one column per option."
        )
    if rates.dtype.is_floating_point or rates.dtype == torch.bool or bool((rates < 0).any()):
        raise ValueError(
            f"rates must be non-negative integers (got dtype {rates.dtype}, min {rates.min().item()}); express them "
            "in a unit that makes them exact, e.g. integer_rates(bits_per_element)."
        )
    if bool(torch.isnan(distortion).any()) or bool((distortion == -math.inf).any()):
        raise ValueError("distortion must not be NaN or -inf; mark an option a unit cannot take with +inf.")
    usable = torch.isfinite(distortion)
    if not bool(usable.any(1).all()):
        unit = int((~usable.any(1)).nonzero()[0, 0])
        raise ValueError(f"unit {unit} has no usable option (every distortion is +inf); give it at least one.")
    return rates.to(torch.long).cpu(), distortion.cpu()


def pareto_options(rates: torch.Tensor, distortion: torch.Tensor) -> list[int]:
    """Indices of the options of one unit that no other option beats: less distortion at no more rate, in
    increasing rate (and strictly decreasing distortion). Options of infinite distortion are never kept; of options
    with equal rate and distortion the first is kept."""
    r, d = torch.as_tensor(rates).tolist(), torch.as_tensor(distortion, dtype=torch.float64).tolist()
    order = sorted((i for i in range(len(r)) if math.isfinite(d[i])), key=lambda i: (r[i], d[i], i))
    kept: list[int] = []
    for i in order:  # by rate, then distortion: a later option of the same rate never has less distortion
        if not kept or d[i] < d[kept[-1]]:
            kept.append(i)
    return kept


def lower_hull(rates: torch.Tensor, distortion: torch.Tensor) -> list[int]:
    """Indices of one unit's options on the lower convex hull of its (rate, distortion) points, from the cheapest:
    the Pareto options whose distortion saved per unit of rate never increases along the way."""
    r = torch.as_tensor(rates).tolist()
    d = torch.as_tensor(distortion, dtype=torch.float64).tolist()
    hull: list[int] = []
    for i in pareto_options(rates, distortion):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is on the hull only if the slope a->b is steeper (saves more per rate) than the slope b->i
            if (d[a] - d[b]) * (r[i] - r[b]) > (d[b] - d[i]) * (r[b] - r[a]):
                break
            hull.pop()
        hull.append(i)
    return hull


def total_rate(rates: torch.Tensor, choice: torch.Tensor) -> int:
    """The total rate of `choice` (one option index per unit)."""
    return int(torch.as_tensor(rates).gather(1, torch.as_tensor(choice)[:, None]).sum())


def hull_path(rates: torch.Tensor, distortion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The greedy over hull slopes, as a path of allocations.

    Returns:
        `(start, steps, totals)`: `start` (`(n_units,)` long) is every unit's cheapest hull option; step `k` moves
        unit `steps[k, 0]` to option `steps[k, 1]`, and `totals[k]` is the total rate after it. Steps come in
        decreasing distortion saved per unit of rate (ties: lower unit, then cheaper step first), so every prefix is
        the optimum among all allocations of no more rate.
    """
    rates, distortion = _check(rates, distortion)
    start, moves = [], []  # moves: (-slope, unit, position on the hull, option)
    for u in range(rates.shape[0]):
        hull = lower_hull(rates[u], distortion[u])
        start.append(hull[0])
        for k, (a, b) in enumerate(zip(hull, hull[1:])):
            slope = (float(distortion[u, a]) - float(distortion[u, b])) / int(rates[u, b] - rates[u, a])
            moves.append((-slope, u, k, b))
    moves.sort()  # along one hull the slopes fall, so a unit's steps come in order
    start_t = torch.tensor(start, dtype=torch.long)
    steps = torch.tensor([(u, b) for _, u, _, b in moves], dtype=torch.long).reshape(-1, 2)
    totals = torch.empty(len(moves), dtype=torch.long)
    current, choice = total_rate(rates, start_t), start_t.clone()
    for k, (u, b) in enumerate(steps.tolist()):
        current += int(rates[u, b] - rates[u, choice[u]])
        choice[u] = b
        totals[k] = current
    return start_t, steps, totals


def _apply(start: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
    choice = start.clone()
    for u, b in steps[:n].tolist():
        choice[u] = b
    return choice


def _exact_totals(rates: torch.Tensor, distortion: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic program over running total rates, over every unit's Pareto options: `(cost, picks)`, with
    `cost[t]` the least distortion of any allocation of total rate exactly `t` (inf: none) for `t` up to `capacity`,
    and `picks[u, t]` unit `u`'s option on the way there ([`_backtrack`]). O(capacity) memory per unit; each unit
    only updates the totals the units so far can reach."""
    n_units = rates.shape[0]
    cost = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
    cost[0] = 0.0
    picks = torch.zeros(n_units, capacity + 1, dtype=torch.long)
    low = high = 0  # the units so far reach totals in [low, high] only
    for u in range(n_units):
        best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
        options = [(o, r) for o in pareto_options(rates[u], distortion[u]) if (r := int(rates[u, o])) <= capacity]
        for o, r in options:  # cheapest first: on ties the cheaper option stays
            top = min(high + r, capacity)
            if low + r > top:
                continue
            shifted = cost[low: top - r + 1] + float(distortion[u, o])
            current = best[low + r: top + 1]
            better = shifted < current
            picks[u, low + r: top + 1].masked_fill_(better, o)
            torch.minimum(current, shifted, out=current)
        if options:  # Pareto options come cheapest first
            low, high = low + options[0][1], min(high + options[-1][1], capacity)
        cost = best
    return cost, picks


def _backtrack(rates: torch.Tensor, picks: torch.Tensor, total: int) -> torch.Tensor:
    """The option per unit of the [`_exact_totals`] allocation of total rate `total`."""
    choice = torch.empty(rates.shape[0], dtype=torch.long)
    for u in range(rates.shape[0] - 1, -1, -1):
        choice[u] = picks[u, total]
        total -= int(rates[u, choice[u]])
    return choice


def _dynamic_program(rates: torch.Tensor, distortion: torch.Tensor, budget: int) -> torch.Tensor:
    """Exact minimiser of `sum_u distortion[u, c_u]` with `sum_u rates[u, c_u] <= budget`, over Pareto options."""
    cost, picks = _exact_totals(rates, distortion, budget)
    if not math.isfinite(float(cost.min())):
        raise AssertionError("unreachable: the cheapest allocation was checked to fit")
    return _backtrack(rates, picks, int(torch.argmin(cost)))  # the least total rate among the best


def allocate_rate(rates: torch.Tensor, distortion: torch.Tensor, budget: int) -> torch.LongTensor:
    """The option per unit minimising the total distortion with the total rate at most `budget`, exactly.

    Args:
        rates (`torch.Tensor`): non-negative integer rates of shape `(n_units, n_options)`, e.g. from
            [`integer_rates`]. Units may differ in their options' rates.
        distortion (`torch.Tensor`): distortions of the same shape; `+inf` marks an option a unit cannot take.
        budget (`int`): the most total rate, summed over units.

    Returns:
        `torch.LongTensor`: the chosen option of every unit, shape `(n_units,)`. Of equally good allocations the
        one of least total rate is returned.

    Example:
        >>> rates = torch.tensor([[2, 3, 4], [2, 3, 4]])
        >>> allocate_rate(rates, torch.tensor([[4.0, 2.0, 1.0], [64.0, 16.0, 4.0]]), budget=7)
        tensor([1, 2])
    """
    rates, distortion = _check(rates, distortion)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be an integer total rate, got {budget!r}; see integer_rates.")
    masked = torch.where(torch.isfinite(distortion), rates, torch.iinfo(torch.long).max)
    cheapest, richest = int(masked.min(1).values.sum()), int(rates.where(torch.isfinite(distortion), 0).max(1)
                                                             .values.sum())
    if budget < cheapest:
        raise ValueError(
            f"budget {budget} is below the cheapest allocation, {cheapest} (every unit at its cheapest option); "
            f"the budget must be in [{cheapest}, {richest}]."
        )
    start, steps, totals = hull_path(rates, distortion)
    fits = int((totals <= budget).sum())  # totals only grow along the path
    if (fits and int(totals[fits - 1]) == budget) or (fits == len(totals)):
        return _apply(start, steps, fits)  # a Lagrangian point spending the budget (or everything fits)
    if total_rate(rates, start) == budget:
        return start
    if budget > _MAX_CAPACITY:
        raise ValueError(f"budget {budget} is too large for the exact program (at most {_MAX_CAPACITY}); express "
                         "rates in a coarser unit.")
    return _dynamic_program(rates, distortion, budget)


def block_frontier(rates: torch.Tensor, distortion: torch.Tensor, modes: list[tuple[torch.Tensor, int]]
                   ) -> tuple[list[int], list[float], list[tuple[int, torch.Tensor]]]:
    """The Pareto frontier of one block of units over its modes: every (total rate, total distortion) no other
    choice of mode and options beats, with the choice that reaches it.

    Args:
        rates, distortion (`torch.Tensor`): `(n_units, n_options)` of the block's units, as for [`allocate_rate`].
        modes (`list[tuple[torch.Tensor, int]]`): per mode, a `(n_units, n_options)` bool mask of the options it
            allows and the extra (integer) rate the block pays in it.

    Returns:
        `(totals, distortions, choices)`, in increasing rate and strictly decreasing distortion; `choices[i]` is
        `(mode, options)` with `options` the `(n_units,)` option per unit.
    """
    rates, distortion = _check(rates, distortion)
    points: list[tuple[int, float, int, int]] = []  # (total with the mode's rate, distortion, mode, options' total)
    picks_of: dict[int, torch.Tensor] = {}
    for m, (allowed, extra) in enumerate(modes):
        d = torch.where(torch.as_tensor(allowed, dtype=torch.bool), distortion, math.inf)
        if not bool(torch.isfinite(d).any(1).all()):
            continue  # some unit has no option this mode allows
        cost, picks_of[m] = _exact_totals(rates, d, int(rates.where(torch.isfinite(d), 0).max(1).values.sum()))
        reachable = torch.isfinite(cost).nonzero().flatten()
        points += [(total + int(extra), value, m, total)
                   for total, value in zip(reachable.tolist(), cost[reachable].tolist())]
    if not points:
        raise ValueError("no mode of the block allows an option for every unit.")
    totals, dists, choices = [], [], []
    for total, dist, m, own in sorted(points, key=lambda p: (p[0], p[1], p[2])):
        if not dists or dist < dists[-1]:  # on the frontier: only these are traced back
            totals.append(total)
            dists.append(dist)
            choices.append((m, _backtrack(rates, picks_of[m], own)))
    return totals, dists, choices


def allocate_blocks(rates: torch.Tensor, distortion: torch.Tensor, blocks: list[list[int]],
                    modes: list[list[tuple[torch.Tensor, int]]], budget: int, weights: Sequence[int] | None = None,
                    ) -> tuple[torch.LongTensor, list[int]]:
    """The option per unit and the mode per block minimising the total distortion with the total rate (the
    units' options plus every block's mode rate, times the block's weight) at most `budget`, exactly.

    Args:
        rates, distortion (`torch.Tensor`): `(n_units, n_options)`, as for [`allocate_rate`].
        blocks (`list[list[int]]`): the units of each block; every unit in exactly one.
        modes (`list[list[tuple[torch.Tensor, int]]]`): per block, its modes as [`block_frontier`] takes them (masks
            over the block's units, in the order `blocks` lists them).
        budget (`int`): the most total rate.
        weights (`Sequence[int]`, *optional*): a non-negative integer per block that its whole rate is multiplied
            by (e.g. the tokens a layer holds, when the budget is bytes and layers hold different numbers of tokens);
            None: all 1.

    Returns:
        `(choice, block_modes)`: the `(n_units,)` option of every unit and the mode of every block.

    Example:
        >>> rates = torch.tensor([[2, 3], [2, 3]])
        >>> one = torch.ones(1, 2, dtype=torch.bool)
        >>> cheap_only = torch.tensor([[True, False]])
        >>> allocate_blocks(rates, torch.tensor([[4.0, 1.0], [4.0, 2.0]]), [[0], [1]],
        ...                 [[(one, 1)], [(cheap_only, 0), (one, 1)]], budget=6)
        (tensor([1, 0]), [0, 0])
    """
    rates, distortion = _check(rates, distortion)
    units = sorted(u for block in blocks for u in block)
    if units != list(range(rates.shape[0])) or len(modes) != len(blocks):
        raise ValueError(f"blocks must list every one of the {rates.shape[0]} units exactly once and modes give one "
                         f"list per block (got {len(blocks)} blocks, {len(modes)} mode lists).")
    if weights is None:
        weights = [1] * len(blocks)
    if len(weights) != len(blocks) or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in weights):
        raise ValueError(f"weights must give a non-negative integer per block ({len(blocks)} blocks), got "
                         f"{list(weights)}.")
    fronts = [block_frontier(rates[block], distortion[block], block_modes) for block, block_modes in
              zip(blocks, modes)]
    width = max(len(f[0]) for f in fronts)
    outer_rates = torch.zeros(len(blocks), width, dtype=torch.long)
    outer_dist = torch.full((len(blocks), width), math.inf, dtype=torch.float64)
    for b, (totals, dists, _) in enumerate(fronts):
        outer_rates[b, : len(totals)] = torch.tensor(totals, dtype=torch.long) * weights[b]
        outer_dist[b, : len(dists)] = torch.tensor(dists, dtype=torch.float64)
    picked = allocate_rate(outer_rates, outer_dist, budget)
    choice = torch.empty(rates.shape[0], dtype=torch.long)
    block_modes = []
    for b, (block, (_, _, choices)) in enumerate(zip(blocks, fronts)):
        m, options = choices[int(picked[b])]
        choice[block] = options
        block_modes.append(m)
    return choice, block_modes


def integer_rates(rates: torch.Tensor, max_denominator: int = 1024) -> tuple[torch.LongTensor, int]:
    """Exact integer rates from rational ones: `(rates * scale, scale)` with the least `scale` making every rate
    an integer, e.g. bits per element `[2.0, 1.5, 2.25]` -> `([8, 6, 9], 4)`. A rate that is not a fraction with a
    denominator up to `max_denominator` is an error: nothing is rounded."""
    values = torch.as_tensor(rates, dtype=torch.float64)
    scale = 1
    for v in values.reshape(-1).tolist():
        f = Fraction(v).limit_denominator(max_denominator)
        if not math.isclose(float(f), v, rel_tol=0, abs_tol=1e-9) or f < 0:
            raise ValueError(f"rate {v} is not a non-negative fraction with a denominator <= {max_denominator}; "
                             "pass rates in a unit that makes them exact.")
        scale = math.lcm(scale, f.denominator)
    scaled = values * scale
    return torch.round(scaled).to(torch.long), scale
