"""Scales and zero-points in 8 bits: every group's pair coded relative to three 16-bit numbers per super-block.

A group's scale and zero-point in the model's dtype cost 32 bits, which is one bit per element at groups of 32 and
half of the rate at 2 code bits. Coded, each takes one byte:

- the **scale** as the super-block's largest scale times a power of two in steps of 1/[`SCALE_STEPS_PER_OCTAVE`]
  octave: `scale = top * 2 ** (-e / 32)`, `e` in 0..255 (at most 2.2% coarser than the group needs; a group whose
  range is under 1/250 of the largest in its super-block gets 1/250 of it);
- the **zero-point** on a 255-step grid from the super-block's smallest zero-point to its largest: `zero = low + z *
  (high - low) / 255`, `z` in 0..255.

`top`, `low` and `high` are stored in the model's dtype, once per super-block ([`RANGE_FIELDS`]). Both codes are
rounded *outward*, as 16-bit scales and zero-points are (`base._round_outward`): the zero-point down, then the scale
up from what the coded zero-point needs, each checked on the value the decoder computes (the float32 product rounded
to the model's dtype), so every group's range stays covered and every element is reconstructed within half a step.

A super-block is [`SCALE_BLOCK_TOKENS`] consecutive tokens of one head (or one block of tokens, where a design groups
over more): for groups along channels (the per-token designs, kivi's values) each place in the row has its own
super-block, so an outlier channel's groups keep their own range; for groups along tokens (kivi's keys) every
channel's group of one block shares one. Tokens are therefore quantized in whole super-blocks
(`Quantizer.token_block`), which the cache's window releases them in (G = 32 by default: nothing changes there).

Measured before it was built (`benchmarks/group_options.py --scale-bits 16 8`, SmolLM2): at equal true bits per
element the calibration objective drops 21-57% against 16-bit scales for every design.
"""

from __future__ import annotations

import math

import torch

SCALE_BITS = (16, 8)
"""The precisions a scale and zero-point can be stored in: 16 (the model's dtype) or 8 (coded, this module)."""
SCALE_BLOCK_TOKENS = 32
"""Tokens of one super-block (at least; a design grouping keys over more tokens uses its block)."""
SCALE_STEPS_PER_OCTAVE = 32
"""Scale codes step by 2^(1/32) (2.2%)."""
RANGE_FIELDS = ("top", "low", "high")
"""The three numbers a super-block stores in the model's dtype: its largest scale, its smallest and largest zero."""
_CODES = 255  # largest code of either byte
_FIXES = 4  # outward corrections tried before falling back to the super-block's own top / low


def check_scale_bits(scale_bits, what: str = "scale_bits") -> int:
    """Validate a scale precision: the integer 16 or 8 (a bool or a float is refused, not rounded)."""
    if type(scale_bits) is not int or scale_bits not in SCALE_BITS:
        raise ValueError(f"{what}={scale_bits!r} is not a scale precision: it must be 16 (scales and zero-points in "
                         "the model's dtype) or 8 (coded per super-block of 32 tokens).")
    return scale_bits


def super_rows(time_block: int) -> int:
    """Rows of scales (one per `time_block` tokens) in one super-block."""
    return math.lcm(time_block, SCALE_BLOCK_TOKENS) // time_block


def ranges_shapes(scale_shape: tuple, time_block: int) -> set[tuple]:
    """The shapes the super-blocks' numbers may have beside scale codes of `scale_shape` `(B, H, R, n)` (one row per
    `time_block` tokens): `(B, H, R // rows, 1 or n, 3)`; empty when `R` is not a whole number of super-blocks."""
    b, h, r, n = scale_shape
    rows = super_rows(time_block)
    return set() if r % rows else {(b, h, r // rows, m, len(RANGE_FIELDS)) for m in (1, n)}


def super_tokens(time_block: int) -> int:
    """Tokens of one super-block for a design whose scales cover `time_block` tokens."""
    return math.lcm(time_block, SCALE_BLOCK_TOKENS)


def _reduce(t: torch.Tensor, rows: int, across: bool, fn) -> torch.Tensor:
    """`fn` (amin or amax) over each super-block of `t` `(B, H, R, n)`: `(B, H, R // rows, 1 if across else n)`."""
    b, h, r, n = t.shape
    out = fn(t.reshape(b, h, r // rows, rows, n), dim=3)
    return fn(out, dim=-1, keepdim=True) if across else out


def _spread(per_block: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """`(B, H, R // rows, 1 or n)` -> `(B, H, R, n)`: each super-block's number on each of its groups."""
    b, h, nb, m = per_block.shape
    return per_block[:, :, :, None, :].expand(b, h, nb, rows, n if m == 1 else m).reshape(b, h, nb * rows, n)


def decode(scale_codes: torch.Tensor, zero_codes: torch.Tensor, ranges: torch.Tensor, rows: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and zero-points `(B, H, R, n)` in `ranges`' dtype from their codes (`uint8`, `(B, H, R, n)`) and
    the super-blocks' numbers (`(B, H, R // rows, 1 or n, 3)`, [`RANGE_FIELDS`]): a few elementwise passes over one
    byte per group, broadcasting each super-block's numbers over its rows."""
    b, h, r, n = scale_codes.shape
    f = ranges.float()[:, :, :, None]  # (B, H, R // rows, 1, 1 or n, 3)
    top, low, high = f[..., 0], f[..., 1], f[..., 2]
    table = steps(scale_codes.device)
    scale = (table[scale_codes.long()].view(b, h, r // rows, rows, n) * top).view(b, h, r, n)
    zero = (zero_codes.float().view(b, h, r // rows, rows, n) * ((high - low) / _CODES) + low).view(b, h, r, n)
    return scale.to(ranges.dtype), zero.to(ranges.dtype)


_STEPS: dict[torch.device, torch.Tensor] = {}


def steps(device: torch.device) -> torch.Tensor:
    """`2 ** (-e / 32)` for every scale code `e`, float32, on `device`: the same numbers on every machine (Python's
    `2.0 ** x` in double precision, then rounded to float32; torch's vectorised `exp2` differs by one ulp between CPU
    instruction sets, and a different table is a different cache)."""
    if device not in _STEPS:
        exact = [2.0 ** (-e / SCALE_STEPS_PER_OCTAVE) for e in range(_CODES + 1)]
        _STEPS[device] = torch.tensor(exact, dtype=torch.float64).to(torch.float32).to(device)
    return _STEPS[device]


def encode(lo: torch.Tensor, hi: torch.Tensor, qmax: int, dtype: torch.dtype, rows: int, across: bool,
           round_outward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code the float32 group minima `lo` and maxima `hi` `(B, H, R, n)` (`R` a multiple of `rows`).

    Returns `(scale_codes, zero_codes, ranges, scale, zero)`: the two `uint8` code tensors, the super-blocks'
    numbers in `dtype`, and the decoded scale and zero-point (float32, exactly what [`decode`] gives) that the
    element codes must be computed with.
    """
    n = lo.shape[-1]
    low = round_outward(_reduce(lo, rows, across, torch.amin), dtype, up=False)
    high = round_outward(_reduce(lo, rows, across, torch.amax), dtype, up=True)
    low_f, high_f = _spread(low.float(), rows, n), _spread(high.float(), rows, n)
    step = (high_f - low_f) / _CODES

    def zero_of(z: torch.Tensor) -> torch.Tensor:
        return (z * step + low_f).to(dtype).float()

    z = torch.where(step > 0, torch.floor((lo - low_f) / torch.where(step > 0, step, 1.0)), 0.0).clamp_(0, _CODES)
    zero = zero_of(z)
    for _ in range(_FIXES):  # one code down where the decoded zero-point rounded above the group's minimum
        above = zero > lo
        if not bool(above.any()):
            break
        z = torch.where(above, (z - 1).clamp_min(0), z)
        zero = zero_of(z)
    z = torch.where(zero > lo, 0.0, z)  # code 0 decodes to `low` itself, at most every minimum
    zero = zero_of(z)

    need = (hi - zero) / qmax
    top = round_outward(_reduce(need, rows, across, torch.amax), dtype, up=True)
    top_f = _spread(top.float(), rows, n)

    table = steps(lo.device)

    def scale_of(e: torch.Tensor) -> torch.Tensor:
        return (table[e.long()] * top_f).to(dtype).float()

    # The finest code whose step still covers the group: the largest e with step e >= need / top (the table falls
    # with e). Comparisons with the table only: flooring -32 * log2(need / top) lost a step at the table's own steps,
    # where the code depended on how the log2 kernel rounded.
    ratio = torch.where(top_f > 0, need / torch.where(top_f > 0, top_f, 1.0), 1.0)
    e = (torch.searchsorted(table.flip(0).contiguous(), ratio.contiguous(), right=False).neg_()
         .add_(_CODES).clamp_(0, _CODES).to(torch.float32))
    scale = scale_of(e)
    for _ in range(_FIXES):  # one step coarser where the decoded scale rounded below what the group needs
        short = scale < need
        if not bool(short.any()):
            break
        e = torch.where(short, (e - 1).clamp_min(0), e)
        scale = scale_of(e)
    e = torch.where(scale < need, 0.0, e)  # code 0 decodes to `top` itself, at least every need
    scale = scale_of(e)
    ranges = torch.stack([top, low, high], dim=-1)  # (B, H, R // rows, 1 or n, 3)
    return e.to(torch.uint8), z.to(torch.uint8), ranges, scale, zero


__all__ = ["RANGE_FIELDS", "SCALE_BITS", "SCALE_BLOCK_TOKENS", "SCALE_STEPS_PER_OCTAVE", "check_scale_bits",
           "decode", "encode", "ranges_shapes", "steps", "super_rows", "super_tokens"]
