"""What a config's bits cost in memory: true bits per element and the bytes of a cache at a given length.

A unit's *code bits* (what `RateQuantConfig.average_bits` averages) leave out the scale and zero-point every group
stores in the model's dtype; [`true_bits_per_element`] counts them, measured from what the quantizer really stores
(a small tensor is quantized and its bytes counted). [`cache_bytes`] splits the bytes a `RateQuantCache` holds after
`tokens` tokens into its three parts:

- the full-precision window: the last R to R + G - 1 tokens (R + [`flush_block`] - 1 for a layer whose keys are
  grouped over more tokens than G), in the model's dtype;
- the sinks: the first S tokens, in the model's dtype;
- the quantized part: every other token, at its unit's true bits.

At short prompts every token sits in the window (or the sinks), so a cache of a float32 model holds *more* than a
16-bit cache; the saving appears once most tokens are quantized (a few thousand tokens).

Example:
    >>> from transformers import LlamaConfig
    >>> from hf_ratequant import RateQuantConfig
    >>> from hf_ratequant.config import ModelFingerprint
    >>> from hf_ratequant.footprint import cache_bytes, true_bits_per_element
    >>> model_config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=256)
    >>> config = RateQuantConfig.uniform(model_config, bits=2)
    >>> true_bits_per_element(config, head_dim=64)  # 2 code bits + a 16-bit scale and zero-point per 32 elements
    3.0
    >>> cache_bytes(config, ModelFingerprint.from_model_config(model_config), tokens=4096).vs_16bit
    0.219...
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .quantizers import KEEP_BITS, get_quantizer
from .quantizers.base import KINDS

if TYPE_CHECKING:
    from .config import ModelFingerprint, RateQuantConfig

__all__ = [
    "REPORT_TOKENS",
    "CacheFootprint",
    "cache_bytes",
    "code_budget",
    "flush_block",
    "layer_weights",
    "option_bits_per_element",
    "option_groups",
    "option_rates",
    "true_bits_per_element",
    "unit_bits_per_element",
    "window_growth",
]


REPORT_TOKENS = 4096
"""The context at which bytes are reported (command line, cards, README): long enough that most tokens are
quantized."""


@functools.lru_cache(maxsize=None)
def unit_bits_per_element(quantizer: str, group_size: int, bits: int, kind: str, head_dim: int,
                          dtype: torch.dtype = torch.float16, row_group: int | None = None,
                          scale_bits: int = 16) -> float:
    """Bits one stored element of a unit costs: its code bits plus its share of the group's scale and zero-point
    (and, with 8-bit scales, of its super-block's three numbers).

    Measured: one token block (`group_size` tokens, or a super-block of 8-bit scales) of `head_dim` channels (a
    whole number of groups for every design) is quantized and the bytes of the packed codes, scales and
    zero-points counted. A unit kept at 16 bits costs its dtype's bits. `row_group`: channels per group of the
    per-token designs (token, rotated; default one group per row).
    """
    if bits == KEEP_BITS:
        return float(torch.finfo(dtype).bits)
    q = get_quantizer(quantizer, group_size, scale_bits)
    if row_group is not None:
        if not hasattr(q, "row_group"):
            raise ValueError(f"row_group applies to the per-token designs (token, rotated), not {quantizer!r}.")
        q = q.regrouped(row_group)
    tokens = math.lcm(group_size, q.token_block(kind))
    x = torch.randn(1, 1, tokens, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    block = q.quantize(x, bits, kind)
    return block.nbytes * 8 / x.numel()


def option_bits_per_element(quantizer: str, bits: int, group: int, kind: str, head_dim: int,
                            dtype: torch.dtype = torch.float16, scale_bits: int = 16) -> float:
    """Bits one stored element costs for a unit of `kind` at `bits` with groups of `group` elements along the
    design's group axis (kivi keys: tokens; kivi values and the per-token designs: channels), scales and
    zero-points in `scale_bits` (16 or 8)."""
    q = get_quantizer(quantizer)
    if q.group_axis(kind) == "tokens":
        return unit_bits_per_element(quantizer, group, bits, kind, head_dim, dtype, scale_bits=scale_bits)
    if hasattr(q, "row_group"):
        return unit_bits_per_element(quantizer, q.group_size, bits, kind, head_dim, dtype, row_group=group,
                                     scale_bits=scale_bits)
    return unit_bits_per_element(quantizer, group, bits, kind, head_dim, dtype, scale_bits=scale_bits)


def option_groups(quantizer: str, group_size: int, groups: tuple[int, ...], head_dim: int) -> dict[str, list[int]]:
    """Per kind, the group sizes a unit of that kind may choose: the layout's own, and those of `groups` that fit
    the kind's group axis (tokens: multiples of `group_size` dividing the largest; channels: divisors of
    `head_dim`). A size that fits no kind, or token groups that do not divide the largest, are a `ValueError`."""
    q = get_quantizer(quantizer, group_size)
    out = {}
    for kind in KINDS:
        fit = {g for g in groups if q.fits_group(kind, g, head_dim)}
        out[kind] = sorted(fit | {q.unit_group(kind, head_dim)})
        if q.group_axis(kind) == "tokens" and q.unnested(out[kind]):
            raise ValueError(f"{quantizer} groups {kind}s over tokens, released from the window in whole groups of "
                             f"the largest: the token groups {out[kind]} must each divide the largest (e.g. "
                             f"{group_size}, {2 * group_size}, {4 * group_size}).")
    unused = sorted(set(groups) - set(out["key"]) - set(out["value"]))
    if unused:
        raise ValueError(f"groups {unused} fit neither kind of {quantizer} at head_dim {head_dim} and G={group_size}: "
                         f"key groups must be {q.group_rule('key', head_dim)}, value groups "
                         f"{q.group_rule('value', head_dim)}.")
    return out


def option_rates(quantizer: str, groups: list[int], bit_grid: list[int], usable: dict[str, list[int]],
                 head_dim: int, dtype: torch.dtype = torch.float16, scale_bits: int = 16) -> torch.Tensor:
    """`(2, len(groups), len(bit_grid))` bits per stored element of every (kind, group, bits) option, NaN where
    the kind cannot take the group (`usable`, from [`option_groups`])."""
    out = torch.full((2, len(groups), len(bit_grid)), float("nan"), dtype=torch.float64)
    for k, kind in enumerate(KINDS):
        for i, g in enumerate(groups):
            if g in usable[kind]:
                for j, b in enumerate(bit_grid):
                    out[k, i, j] = option_bits_per_element(quantizer, b, g, kind, head_dim, dtype, scale_bits)
    return out


def _unit_costs(config: RateQuantConfig, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """`(num_layers, num_kv_heads, 2)` bits per stored element of every unit, its own group size counted."""
    bits, groups = config.bits_tensor().tolist(), config.groups_tensor(head_dim).tolist()
    return torch.tensor([[[option_bits_per_element(config.quantizer, b, g, kind, head_dim, dtype, config.scale_bits)
                           for kind, b, g in zip(KINDS, unit_bits, unit_groups)]
                          for unit_bits, unit_groups in zip(layer_bits, layer_groups)]
                         for layer_bits, layer_groups in zip(bits, groups)], dtype=torch.float64)


def true_bits_per_element(config: RateQuantConfig, head_dim: int, dtype: torch.dtype = torch.float16,
                          fingerprint: ModelFingerprint | None = None, tokens: int = REPORT_TOKENS) -> float:
    """Mean bits per quantized element of `config`, scales and zero-points included; compare with
    `config.average_bits`, the code bits alone. Without `fingerprint` every unit counts as much (it holds as many
    elements); with it, each layer's units count by the tokens the layer quantizes after `tokens` tokens
    ([`layer_weights`]): the same mean unless some layers slide over fewer tokens than others."""
    costs = _unit_costs(config, head_dim, dtype)
    if fingerprint is None:
        return float(costs.mean())
    weights = torch.tensor(layer_weights(config, fingerprint, tokens), dtype=torch.float64)
    if not bool((weights > 0).any()):
        return float(costs.mean())
    return float((costs.mean(dim=(1, 2)) * weights).sum() / weights.sum())


def layer_weights(layout, fingerprint: ModelFingerprint, tokens: int = REPORT_TOKENS) -> list[int]:
    """What one element of each layer's units weighs in the cache's bytes after `tokens` tokens: the tokens the
    layer quantizes then (its window released in groups of G), divided by their greatest common divisor.

    Equal (all 1) for a model whose layers all hold every token; a sliding-window layer holds at most its window, so
    on Gemma 3 270M (15 layers sliding over 512 tokens, 3 global) at 4096 tokens with R = 128, G = S = 32 its
    384 quantized tokens weigh 4 against a global layer's 3936, 41. A budget in true bits per element then counts
    bytes: a sliding layer's extra bit costs a tenth of a global one's. A layer that quantizes nothing weighs 0.

    Args:
        layout: anything with `group_size`, `residual_length` and `sink_length` (a [`CacheLayout`] or a config).
        fingerprint ([`ModelFingerprint`]): the model (layer types and windows).
        tokens (`int`, *optional*, defaults to [`REPORT_TOKENS`]): the context the bytes are counted at.
    """
    if not fingerprint.layer_types:  # a fingerprint from before layer types were recorded: every layer full
        return [1] * fingerprint.num_layers
    held = [_held_tokens(tokens, fingerprint.window(kind), layout, layout.group_size)[0]
            for kind in fingerprint.layer_types]
    common = math.gcd(*held)
    return [h // common for h in held] if common else [0] * len(held)


def flush_block(config: RateQuantConfig, layer: int) -> int:
    """Tokens a layer's full-precision window releases at a time (after the sinks): G, or the least common
    multiple of G, the layer's key token groups where those are larger (see `RateQuantConfig.key_groups`) and,
    with 8-bit scales, their super-block."""
    q = get_quantizer(config.quantizer, config.group_size, config.scale_bits)
    blocks = [config.group_size, *(q.token_block(kind) for kind in KINDS)]  # 8-bit scales: their super-block
    if config.has_unit_groups:
        for kind, groups, bits in zip(KINDS, (config.key_groups, config.value_groups),
                                      (config.key_bits, config.value_bits)):
            if q.group_axis(kind) == "tokens":  # a 16-bit unit has no groups
                blocks += [g for g, b in zip(groups[layer], bits[layer]) if b != KEEP_BITS]
    return math.lcm(*blocks)


def window_growth(layout, fingerprint: ModelFingerprint, layer: int, block: int, tokens: int = REPORT_TOKENS,
                  window_bits: int = 16) -> float:
    """What releasing the window in blocks of `block` tokens instead of G costs a layer, in bits per quantized
    element of one unit, summed over the layer's units (its keys and values of every kv-head).

    A layer whose keys are grouped over more tokens than G releases its full-precision window in whole blocks of the
    largest group ([`flush_block`]), so it holds on average `(block - G) / 2` more window tokens, at `window_bits`
    each (16: a bf16/fp16 cache). Averaged over the contexts `tokens .. tokens + block - 1` and divided by the
    quantized tokens the layer holds there with blocks of G (a sliding-window layer holds fewer, so its window weighs
    more). An upper bound: the tokens kept in the window are not also counted out of the quantized part.

    Args:
        layout: anything with `group_size`, `residual_length` and `sink_length` (a [`CacheLayout`] or a config).
        fingerprint ([`ModelFingerprint`]): the model (kv-heads, layer types and windows).
        layer (`int`), block (`int`): the layer and the tokens its window releases at a time.
        tokens (`int`, *optional*, defaults to [`REPORT_TOKENS`]): the context the bytes are counted at.
    """
    if block % layout.group_size:
        raise ValueError(f"block={block} must be a multiple of group_size={layout.group_size}.")
    window = fingerprint.window(fingerprint.layer_types[layer])
    extra = quantized = 0
    for t in range(tokens, tokens + block):
        n_quantized, _, recent = _held_tokens(t, window, layout, layout.group_size)
        quantized += n_quantized
        extra += _held_tokens(t, window, layout, block)[2] - recent
    if quantized == 0:
        return 0.0 if extra == 0 else math.inf
    return extra * window_bits * 2 * fingerprint.num_kv_heads / quantized


def code_budget(true_bits: float, quantizer: str, group_size: int, head_dim: int, b_min: int, b_max: int,
                scale_bits: int = 16) -> float:
    """The average code bits whose allocations store exactly `true_bits` bits per element (scales and zero-points
    in `scale_bits`).

    Every option of `b_min..b_max` bits of one design and group size pays the same metadata per element (one scale
    and zero-point per group: kivi G = 32, +1 bit; the per-token designs, one group per row of 64 channels, +0.5),
    so a true budget is the code budget plus that constant, averaged over keys and values (as many units each).
    A `ValueError` names the range of true budgets reachable, or says why no constant applies.

    Example:
        >>> code_budget(3.0, "kivi", 32, head_dim=64, b_min=1, b_max=6)
        2.0
    """
    if isinstance(true_bits, bool) or not isinstance(true_bits, (int, float)) or not math.isfinite(true_bits):
        raise ValueError(f"true_bits={true_bits!r} must be a number of bits per stored element (e.g. 3.0).")
    overhead = []
    for kind in KINDS:
        extra = {round(unit_bits_per_element(quantizer, group_size, b, kind, head_dim, scale_bits=scale_bits) - b, 9)
                 for b in range(b_min, b_max + 1)}
        if len(extra) != 1:
            raise ValueError(f"{quantizer} with G={group_size} and head_dim={head_dim} stores {kind}s with a "
                             f"metadata cost that depends on the bit-width ({sorted(extra)} bits per element), so a "
                             "true-bits budget has no single code-bits equivalent: give the budget in code bits.")
        overhead.append(extra.pop())
    extra = sum(overhead) / len(overhead)
    low, high = b_min + extra, b_max + extra
    if not low - 1e-9 <= true_bits <= high + 1e-9:
        raise ValueError(f"A budget of {true_bits:g} true bits per element is outside [{low:g}, {high:g}], what "
                         f"{quantizer} with G={group_size} (+{extra:g} bits per element for scales and zero-points "
                         f"at head_dim {head_dim}) stores with units of b_min={b_min} to b_max={b_max} code bits. "
                         "Pass a budget in that range, or widen b_min/b_max.")
    return round(min(max(true_bits - extra, b_min), b_max), 9)


@dataclass(frozen=True)
class CacheFootprint:
    """Bytes of a `RateQuantCache` after some tokens, by part (see the module docstring).

    Attributes:
        tokens (`int`): tokens held per sequence.
        quantized (`int`): bytes of the quantized tokens (codes, scales, zero-points, 16-bit units).
        window (`int`): bytes of the full-precision window of recent tokens.
        sinks (`int`): bytes of the full-precision sink tokens.
        bytes_16bit (`int`): bytes a 16-bit `DynamicCache` holds for the same tokens.
    """

    tokens: int
    quantized: int
    window: int
    sinks: int
    bytes_16bit: int

    @property
    def total(self) -> int:
        return self.quantized + self.window + self.sinks

    @property
    def vs_16bit(self) -> float:
        return self.total / self.bytes_16bit if self.bytes_16bit else float("nan")


def _held_tokens(tokens: int, window: int | None, config: RateQuantConfig, block: int) -> tuple[int, int, int]:
    """`(quantized, sinks, full-precision window)` tokens one layer holds after `tokens` tokens fed at once (its
    window releasing whole groups of G into the sinks, then of `block`). A sliding layer (attention `window`) then
    drops whole groups from the front of its quantized past, sinks first, until it holds no more than `window - 1`
    tokens (or trims the full-precision window when the past is gone)."""
    r, g = config.residual_length, config.group_size
    avail = max(tokens - r, 0)
    sinks = min(config.sink_length, avail // g * g)
    past = sinks + (avail - sinks) // block * block
    recent = tokens - past
    excess = tokens - (window - 1) if window else 0
    if excess > 0:
        cut = min(excess, past)
        dropped = cut // g * g if cut <= sinks else sinks + (cut - sinks) // block * block
        sinks, past, excess = max(sinks - dropped, 0), past - dropped, excess - dropped
        if past == 0 and excess > 0:
            recent -= excess
    return past - sinks, sinks, recent


def cache_bytes(config: RateQuantConfig, fingerprint: ModelFingerprint, tokens: int, batch: int = 1,
                dtype: torch.dtype = torch.float16) -> CacheFootprint:
    """The bytes a `RateQuantCache` of `config` holds after `tokens` tokens of `batch` sequences, by part.

    Exact for full-attention layers (the window after `tokens` tokens does not depend on how they were fed). A
    sliding-window layer is counted as after one prefill of `tokens` tokens: it keeps at most its attention
    window (less one token) plus up to one group, and decoding token by token holds up to one group more or less.
    `bytes_16bit` is what the same held tokens take at 16 bits (as `RateQuantCache.nbytes_16bit`).

    Args:
        config ([`RateQuantConfig`]): the bits and layout.
        fingerprint ([`ModelFingerprint`]): the model (layers, kv-heads, head_dim, layer types).
        tokens (`int`): tokens per sequence.
        batch (`int`, *optional*, defaults to 1): sequences.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): the model's dtype (window, sinks, scales).
    """
    head_dim, heads, element = fingerprint.head_dim, config.num_kv_heads, torch.finfo(dtype).bits // 8
    row = batch * head_dim  # elements per token of one unit
    per_token = 2 * heads * row  # elements per token of one layer's keys and values
    quantized = window_bytes = sink_bytes = ref = 0.0
    costs = _unit_costs(config, head_dim, dtype)
    for layer, kind_of_layer in enumerate(fingerprint.layer_types):
        attention_window = fingerprint.window(kind_of_layer)
        n_quantized, n_sinks, n_recent = _held_tokens(tokens, attention_window, config, flush_block(config, layer))
        quantized += float(costs[layer].sum()) * n_quantized * row / 8
        window_bytes += n_recent * per_token * element
        sink_bytes += n_sinks * per_token * element
        ref += (n_quantized + n_sinks + n_recent) * per_token * 2
    return CacheFootprint(tokens=tokens, quantized=round(quantized), window=round(window_bytes),
                          sinks=round(sink_bytes), bytes_16bit=round(ref))
