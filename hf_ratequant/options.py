"""Calibration over (bit-width, group size) options: what a unit may choose when its group size is free too.

A unit (layer, kv-head, K or V) at `b` bits with groups of `g` elements costs `b + 32 / g` bits per stored element
(a 16-bit scale and zero-point per group; with `CacheLayout.scale_bits = 8`, about `b + 16 / g`) and has its own
measured distortion. With the group sizes of `CalibrationSettings.groups`, calibration measures every option in
the same pass ([`measuring_quantizers`]: one quantizer per group size, all measured on the same tokens), then
allocates exactly over them under a budget in true bits per element ([`option_candidates`], through
[`operating_points.allocate_rate`]), and races the result through the real cache against every fixed (bits, group)
pair of keys and values of the same bytes ([`fixed_option_candidates`]).

- [`OptionGrid`]: the options of each kind: the group sizes that fit it (the layout's own always among them) times
  the bit grid, with their true rates.

The budget counts every byte a layer's choice costs: a layer whose keys are grouped over more tokens than G
releases its full-precision window in whole groups of the largest, so it keeps a longer window
([`footprint.window_growth`], at the context [`footprint.REPORT_TOKENS`]). Each layer picks a *flush block*
([`OptionGrid.flush_blocks`]) that its key token groups must divide and pays its window's growth, and the exact
allocation runs over layers ([`operating_points.allocate_blocks`]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .allocation import Candidate
from .footprint import option_groups, option_rates, window_growth
from .operating_points import allocate_blocks, allocate_rate, integer_rates
from .quantizers import Quantizer, get_quantizer
from .quantizers.base import KINDS
from .settings import CacheLayout

__all__ = ["OptionGrid", "fixed_option_candidates", "measuring_quantizers", "near_candidates", "option_candidates",
           "option_table", "window_costs"]

WINDOW_GRID = 16
"""A layer's window growth is charged in whole 1/16 bits per element (summed over its units), rounded up: the
exact allocation needs integer rates, and rounding up keeps the bytes within the budget."""


@dataclass(frozen=True)
class OptionGrid:
    """The (bits, group) options of a layout on a model.

    Attributes:
        quantizer (`str`), group_size (`int`), head_dim (`int`): the design, its G, the model's head_dim.
        groups (`tuple[int, ...]`): every group size measured, ascending (the union over both kinds).
        bit_grid (`tuple[int, ...]`): the bit-widths measured.
        usable (`dict[str, tuple[int, ...]]`): per kind, the group sizes it can take.
        own (`dict[str, int]`): per kind, the layout's own group size (what a config without groups uses).
        scale_bits (`int`): how every option stores its scales and zero-points (the layout's, 16 or 8).
    """

    quantizer: str
    group_size: int
    head_dim: int
    groups: tuple[int, ...]
    bit_grid: tuple[int, ...]
    usable: dict[str, tuple[int, ...]]
    own: dict[str, int]
    scale_bits: int = 16

    @classmethod
    def build(cls, layout: CacheLayout, groups: tuple[int, ...], bit_grid: list[int], head_dim: int) -> OptionGrid:
        """The grid of `groups` (and the layout's own) for `layout` at `head_dim`; a `ValueError` names a group
        that fits no kind (see [`footprint.option_groups`])."""
        usable = option_groups(layout.quantizer, layout.group_size, tuple(groups), head_dim)
        q = get_quantizer(layout.quantizer, layout.group_size)
        own = {kind: q.unit_group(kind, head_dim) for kind in KINDS}
        union = tuple(sorted(set(usable["key"]) | set(usable["value"])))
        return cls(layout.quantizer, layout.group_size, head_dim, union, tuple(bit_grid),
                   {k: tuple(v) for k, v in usable.items()}, own, layout.scale_bits)

    @property
    def n_options(self) -> int:
        return len(self.groups) * len(self.bit_grid)

    def option(self, index: int) -> tuple[int, int]:
        """`(bits, group)` of option `index` (options run group-major: every bit-width of the first group first)."""
        return self.bit_grid[index % len(self.bit_grid)], self.groups[index // len(self.bit_grid)]

    def option_indices(self, bits: torch.Tensor, groups: torch.Tensor) -> torch.LongTensor:
        """The option index of every `(bits, group)` pair, elementwise (the inverse of [`option`])."""
        group_index = torch.tensor([self.groups.index(g) for g in groups.reshape(-1).tolist()]).reshape(groups.shape)
        return group_index * len(self.bit_grid) + (bits - self.bit_grid[0])

    def own_index(self, kind: str) -> int:
        return self.groups.index(self.own[kind])

    def rates(self) -> torch.Tensor:
        """`(2, n_options)` true bits per element of every option, NaN where the kind cannot take it."""
        return option_rates(self.quantizer, list(self.groups), list(self.bit_grid),
                            {k: list(v) for k, v in self.usable.items()}, self.head_dim,
                            scale_bits=self.scale_bits).reshape(2, -1)

    def flush_blocks(self) -> tuple[int, ...]:
        """The blocks a layer's window can release tokens in: G and every token group a kind can take (nested: each
        divides the largest, so a layer's block is its largest token group)."""
        q = get_quantizer(self.quantizer, self.group_size)
        return tuple(sorted({self.group_size} | {g for kind in KINDS if q.group_axis(kind) == "tokens"
                                                 for g in self.usable[kind]}))

    def allowed(self, block: int) -> torch.Tensor:
        """`(2, n_options)` bool: the options a unit of each kind can take in a layer releasing blocks of `block`
        tokens (token groups dividing it; channel groups are free)."""
        q = get_quantizer(self.quantizer, self.group_size)
        out = torch.ones(2, self.n_options, dtype=torch.bool)
        for k, kind in enumerate(KINDS):
            if q.group_axis(kind) == "tokens":
                for i in range(self.n_options):
                    out[k, i] = block % self.option(i)[1] == 0
        return out

    def token_block(self) -> int:
        """Tokens every option is measured on a multiple of: the least common multiple of the token groups (and of
        the super-block of 8-bit scales)."""
        q = get_quantizer(self.quantizer, self.group_size, self.scale_bits)
        return math.lcm(*(g for kind in KINDS if q.group_axis(kind) == "tokens" for g in self.usable[kind]),
                        *(q.token_block(kind) for kind in KINDS))


class _MeasuredOption:
    """One group size of a design as the distortion measure sees it: the design at that group for each kind that
    can take it (the layout's own for a kind that cannot: measured, then masked), quantizing whole blocks of
    `block` tokens, so that every group size is measured on the same tokens. `kinds`: those it is measured for."""

    def __init__(self, per_kind: dict[str, Quantizer], block: int, kinds: tuple[str, ...] = KINDS):
        self._q, self.block, self.kinds = per_kind, block, kinds  # kinds: those that can take this group

    def token_block(self, kind: str) -> int:
        return self.block

    def roundtrip(self, x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        return self._q[kind].roundtrip(x, bits, kind)


def measuring_quantizers(grid: OptionGrid) -> dict[str, _MeasuredOption]:
    """`{"g<group>": quantizer}` for `calibration.measure_distortions`, one per group size of `grid`."""
    base = get_quantizer(grid.quantizer, grid.group_size, grid.scale_bits)
    block = grid.token_block()
    out = {}
    for g in grid.groups:
        per_kind = {}
        for kind in KINDS:
            group = g if g in grid.usable[kind] else grid.own[kind]
            per_kind[kind] = base if group == base.unit_group(kind, grid.head_dim) else base.regrouped(group)
        kinds = tuple(kind for kind in KINDS if g in grid.usable[kind])  # the others are masked: not measured
        out[f"g{g}"] = _MeasuredOption(per_kind, block, kinds)
    return out


def option_table(tables: dict[str, torch.Tensor], grid: OptionGrid) -> torch.Tensor:
    """The measured `(layers, kv_heads, 2, n_options)` table from the per-group `(layers, kv_heads, 2, n_bits)`
    ones, +inf where a kind cannot take the group."""
    parts = []
    for g in grid.groups:
        t = tables[f"g{g}"].clone()
        for k, kind in enumerate(KINDS):
            if g not in grid.usable[kind]:
                t[:, :, k] = float("inf")
        parts.append(t)
    return torch.cat(parts, dim=-1)


def _unit_rows(options: torch.Tensor, rates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit (in `(layers, kv_heads, 2)` order): its distortion and rate rows."""
    layers, heads = options.shape[:2]
    dist = options.reshape(-1, options.shape[-1]).double()
    rate_rows = rates.unsqueeze(0).expand(layers * heads, 2, -1).reshape(-1, rates.shape[-1])
    dist = torch.where(torch.isnan(rate_rows), torch.full_like(dist, float("inf")), dist)
    return dist, rate_rows


def _capacity(true_budget: float, n_units: int, scale: int) -> int:
    cap = true_budget * n_units * scale
    return int(math.floor(cap + 1e-9))


def _weighted(weights: list[int] | None) -> list[int] | None:
    """`weights` when layers weigh differently ([`footprint.layer_weights`]), else None (every unit counts once)."""
    return None if weights is None or len(set(weights)) <= 1 else list(weights)


def _chosen(choice: torch.Tensor, grid: OptionGrid, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [grid.option(i) for i in choice.tolist()]
    bits = torch.tensor([b for b, _ in pairs]).reshape(shape)
    groups = torch.tensor([g for _, g in pairs]).reshape(shape)
    return bits, groups


def window_costs(grid: OptionGrid, layout: CacheLayout, fingerprint, tokens: int) -> torch.Tensor:
    """`(num_layers, n_blocks)`: what each layer pays, in bits per element summed over its units, for releasing its
    window in each of `grid.flush_blocks()` ([`footprint.window_growth`] at `tokens` tokens)."""
    return torch.tensor([[window_growth(layout, fingerprint, layer, block, tokens) for block in grid.flush_blocks()]
                         for layer in range(fingerprint.num_layers)], dtype=torch.float64)


def _allocate(int_rates: torch.Tensor, table: torch.Tensor, grid: OptionGrid, cap: int, heads: int,
              charges: torch.Tensor | None, weights: list[int] | None = None) -> torch.Tensor:
    """One exact allocation: over units when no layer pays for its window and every layer weighs the same, else
    over layers (their blocks and their weights)."""
    if charges is None and weights is None:
        return allocate_rate(int_rates, table, cap)
    per_layer = 2 * heads  # units run (layer, kv-head, K/V)
    n_layers = int_rates.shape[0] // per_layer
    blocks = [list(range(layer * per_layer, (layer + 1) * per_layer)) for layer in range(n_layers)]
    if charges is None:
        everything = torch.ones(per_layer, int_rates.shape[1], dtype=torch.bool)
        modes = [[(everything, 0)] for _ in range(n_layers)]
    else:
        masks = [grid.allowed(block).repeat(heads, 1) for block in grid.flush_blocks()]
        # a block whose window would hold tokens the layer never quantizes at that context costs +inf: not offered
        modes = [[(mask, int(c)) for mask, c in zip(masks, row.tolist()) if math.isfinite(c)] for row in charges]
    return allocate_blocks(int_rates, table, blocks, modes, cap, weights)[0]


def _charged(charges: torch.Tensor | None, scale: int) -> tuple[torch.Tensor | None, int]:
    """Charges in whole steps of a rate grid fine enough for them ([`WINDOW_GRID`]), rounded up, and the factor
    the rates' own scale is multiplied by; `(None, 1)` when no layer can pay anything."""
    if charges is None or not bool((charges > 0).any()):
        return None, 1
    factor = math.lcm(scale, WINDOW_GRID) // scale
    return torch.ceil(charges * scale * factor - 1e-9).clamp_min(0), factor  # float: +inf stays +inf


def option_candidates(options: torch.Tensor, grid: OptionGrid, true_budget: float,
                      key_weights: tuple[float, ...], charges: torch.Tensor | None = None,
                      weights: list[int] | None = None) -> list[Candidate]:
    """The exact allocations over every unit's options of at most `true_budget` true bits per element on average:
    `ratequant-options` on the measured table, and `ratequant-options-keys-xW` with the keys' distortion times W
    (as `calibration.allocation_candidates` does for bits). `charges` ([`window_costs`]): what a layer pays for
    each flush block; the budget then covers them too (rounded up to 1/[`WINDOW_GRID`] bit). `weights`
    ([`footprint.layer_weights`]): what an element of each layer weighs in bytes; the average is then over the
    elements the cache holds, so a layer that slides over fewer tokens pays less for its bits."""
    shape = options.shape[:3]
    weights = _weighted(weights)
    dist, rate_rows = _unit_rows(options, grid.rates())
    int_rates, scale = integer_rates(torch.nan_to_num(rate_rows, nan=0.0))
    steps, factor = _charged(charges, scale)
    int_rates, scale = int_rates * factor, scale * factor
    units = dist.shape[0] if weights is None else sum(weights) * 2 * shape[1]
    cap = _capacity(true_budget, units, scale)
    tables = {"ratequant-options": dist}
    for w in key_weights:
        weighted = dist.clone()
        weighted[0::2] *= w  # units alternate key, value
        tables[f"ratequant-options-keys-x{w:g}"] = weighted
    out = []
    for name, table in tables.items():
        bits, groups = _chosen(_allocate(int_rates, table, grid, cap, shape[1], steps, weights), grid, shape)
        out.append(Candidate(name, "ratequant", bits, groups))
    return out


NEAR_RADII = (1, 2)
"""How many bits from the best fixed configuration the allocations of [`near_candidates`] may move each unit."""


def near_candidates(options: torch.Tensor, grid: OptionGrid, true_budget: float, origin: Candidate,
                    charges: torch.Tensor | None = None, weights: list[int] | None = None,
                    radii: tuple[int, ...] = NEAR_RADII) -> list[Candidate]:
    """The exact allocations of [`option_candidates`] with every unit kept at its group in `origin` and within `r`
    bits of its bits there, for each `r` in `radii`: named `ratequant-from-{origin}-r{r}`, family `"descent"`. Small
    moves from a configuration known to be good, where the measure's predictions are the most reliable, as
    `allocation.descent_candidates` takes them for budgets in code bits; these keep the budget in bytes however the
    layers weigh ([`footprint.layer_weights`]). `origin` must fit the budget (a fixed configuration of it does)."""
    layers, heads = options.shape[:2]
    own = torch.tensor([grid.own["key"], grid.own["value"]]).expand(layers, heads, 2)
    groups = own if origin.groups is None else origin.groups
    option_bits = torch.tensor([grid.option(i)[0] for i in range(grid.n_options)])
    option_groups = torch.tensor([grid.option(i)[1] for i in range(grid.n_options)])
    same_group = option_groups == groups.unsqueeze(-1)
    out, seen = [], set()
    for r in radii:
        near = same_group & ((option_bits - origin.bits.unsqueeze(-1)).abs() <= r)
        masked = torch.where(near, options.double(), torch.full_like(options.double(), float("inf")))
        c = option_candidates(masked, grid, true_budget, (), charges, weights)[0]
        c = Candidate(f"ratequant-from-{origin.name}-r{r}", "descent", c.bits,
                      None if origin.groups is None else c.groups)
        if c.key not in seen and not torch.equal(c.bits, origin.bits):
            seen.add(c.key)
            out.append(c)
    return out


FIXED_SLACK = 0.25
"""With window charges a fixed configuration rarely spends the budget exactly: those up to this many bits per
element below it race too."""


def fixed_option_candidates(grid: OptionGrid, true_budget: float, num_layers: int,
                            num_kv_heads: int, charges: torch.Tensor | None = None,
                            weights: list[int] | None = None) -> list[Candidate]:
    """Every fixed configuration of exactly `true_budget` true bits per element that uses a group size other than
    the layout's: one (bits, group) option for all keys and one for all values, named like `"K2g64V2g64"` (the
    layout's own fixed splits are `allocation.fixed_candidates`). With `charges` ([`window_costs`]) its layers'
    window growth counts too (each layer's by its `weights`, [`footprint.layer_weights`]), and the configurations
    of at most the budget and at most [`FIXED_SLACK`] below it race. With 8-bit scales, whose rates rarely add up
    to the budget, those of at most the budget and at most [`FIXED_SLACK`] below the richest of them race, the
    layout's own groups included."""
    weights = [1] * num_layers if weights is None or not any(weights) else list(weights)
    rates = grid.rates()
    blocks = grid.flush_blocks()
    allowed = {b: grid.allowed(b) for b in blocks}
    charged = charges is not None and bool((charges > 0).any())
    coded = grid.scale_bits != 16  # 8-bit scales: hardly any configuration spends the budget exactly
    out = []
    for ko in range(grid.n_options):
        for vo in range(grid.n_options):
            rk, rv = float(rates[0, ko]), float(rates[1, vo])
            if math.isnan(rk) or math.isnan(rv):
                continue
            (kb, kg), (vb, vg) = grid.option(ko), grid.option(vo)
            mean = (rk + rv) / 2
            if charged:
                block = min(b for b in blocks if bool(allowed[b][0, ko]) and bool(allowed[b][1, vo]))
                mean += sum(float(c) * w for c, w in zip(charges[:, blocks.index(block)].tolist(), weights)
                            if w) / (2 * sum(weights) * num_kv_heads)  # a layer that quantizes nothing weighs 0
            if charged or coded:  # at most the budget; coded: cut below the richest after the loop
                least = -math.inf if coded else true_budget - FIXED_SLACK
                if not least - 1e-9 <= mean <= true_budget + 1e-9:
                    continue
            elif not math.isclose(mean, true_budget, abs_tol=1e-9):
                continue
            if kg == grid.own["key"] and vg == grid.own["value"] and not coded:
                continue  # `allocation.fixed_candidates` races the layout's own (exact in code bits)
            shape = (num_layers, num_kv_heads)
            bits = torch.stack([torch.full(shape, kb), torch.full(shape, vb)], dim=-1)
            groups = torch.stack([torch.full(shape, kg), torch.full(shape, vg)], dim=-1)
            out.append((mean, Candidate(f"K{kb}g{kg}V{vb}g{vg}", "fixed", bits, groups)))
    if coded:  # the richest within the budget: those at most FIXED_SLACK below the richest
        top = max((mean for mean, _ in out), default=0.0)
        out = [(mean, c) for mean, c in out if mean >= top - FIXED_SLACK - 1e-9]
    return [c for _, c in out]
    return out
