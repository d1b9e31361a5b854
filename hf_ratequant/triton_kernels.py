"""Triton kernels of the cache: dequantize a layer's packed past, and attend over it without dequantizing it to memory.

Both serve every kv-head of a layer in one launch, whatever their mix of bit-widths (1..8, and 16 for heads kept as
they are): the host writes one row of a small int64 table per (kind, head) — pointers already offset to the head,
strides, bit-width, row bytes, grouping — and the kernels read each head's layout from its row.

- [`dequantize_layer`]: `[sink | dequantized past | window]` of keys and values, `(batch, heads, tokens, head_dim)`
  each; bit for bit `Quantizer.dequantize` for kivi and token (float32 math, `code * scale` then `+ zero`, rounded
  once to the model's dtype; 8-bit scales decoded from their bytes in the kernel, as `scales.decode` does); for
  rotated the dequantized rows are multiplied by the +-1 Hadamard matrix.
- [`decode_attention`]: flash-decoding split-K over the packed codes. Every program reads one kv-head's codes once for
  all the query heads of its group and all query tokens, keeps an online softmax in float32 and writes partial
  `(max, sum, accumulator)` rows; a second kernel combines them. For rotated designs the quantized splits use the
  rotated query (`q . (x M) = (q M) . x`, M symmetric) and their value accumulators are rotated back once, in the
  combination.

[`unsupported_reason`] says which inputs the kernels do not take (callers fall back to PyTorch); the wrappers raise
`ValueError` on them. On the CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set before
Triton is imported), which has no bfloat16.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

if TYPE_CHECKING:  # annotations only: ops imports this module when a kernel is asked for
    from .ops import PastPart

__all__ = ["decode_attention", "dequantize_layer", "unsupported_reason"]

KEEP_BITS = 16
LOG2E = 1.4426950408889634
_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# ---- the per-(kind, head) table ------------------------------------------------------------------------------------
# Row `kind * H + h` (kind 0 keys, 1 values) of an int64 `(2 * H, _NF)` tensor. Pointers are byte addresses already
# offset to the head (dimension 1); strides are in elements of the tensor they belong to.
_F_DATA = tl.constexpr(0)  # packed codes (uint8), or for 16 bits the plain states (model dtype)
_F_DATA_SB = tl.constexpr(1)  # codes: stride of dim 0 (batch)
_F_DATA_ST = tl.constexpr(2)  # codes: stride of dim 2 (tokens)
_F_SCALE = tl.constexpr(3)  # scales (model dtype); 0 for 16 bits
_F_SCALE_SB = tl.constexpr(4)
_F_SCALE_ST = tl.constexpr(5)  # stride of one row of scales (time_block tokens)
_F_ZERO = tl.constexpr(6)  # zero-points (model dtype); 0 for 16 bits
_F_ZERO_SB = tl.constexpr(7)
_F_ZERO_ST = tl.constexpr(8)
_F_BITS = tl.constexpr(9)  # 1..8, or 16
_F_ROW_BYTES = tl.constexpr(10)  # ceil(head_dim * bits / 8)
_F_TIME_BLOCK = tl.constexpr(11)  # tokens per row of scales
_F_GROUP_LEN = tl.constexpr(12)  # channels per scale: head_dim // n_groups
_F_SINK = tl.constexpr(13)  # sink (model dtype), (B, H, S, D)
_F_SINK_SB = tl.constexpr(14)
_F_SINK_ST = tl.constexpr(15)
_F_WIN = tl.constexpr(16)  # window (model dtype), (B, H, W, D)
_F_WIN_SB = tl.constexpr(17)
_F_WIN_ST = tl.constexpr(18)
_F_S = tl.constexpr(19)  # sink tokens S (the same in every row of a kind)
_F_TQ = tl.constexpr(20)  # quantized tokens Tq
_F_W = tl.constexpr(21)  # window tokens W
_F_OUT = tl.constexpr(22)  # dequantize_layer: output (B, H, S + Tq + W, D), contiguous; 0 for attention
_F_OUT_SB = tl.constexpr(23)
# 8-bit scales (quantizers.scales): _F_SCALE / _F_ZERO then point to uint8 codes, decoded from their super-block's
# numbers (top, low, high in the model's dtype) with the 256 scale steps (float32), as scales.decode computes them.
_F_RANGES = tl.constexpr(24)  # super-blocks (model dtype), (B, Hc, Tq // super_tokens, 1 or G, 3); 0: 16-bit scales
_F_RANGES_SB = tl.constexpr(25)
_F_RANGES_ST = tl.constexpr(26)  # stride of one super-block
_F_RANGES_GS = tl.constexpr(27)  # stride of one group's triple: 3, or 0 where one triple serves every group
_F_SUPER_ROWS = tl.constexpr(28)  # rows of scales per super-block
_F_STEPS = tl.constexpr(29)  # the 256 scale steps 2^(-e / 32), float32
_NF = tl.constexpr(30)


# ---- shared device helpers -----------------------------------------------------------------------------------------
@triton.jit
def _to_dtype(x, DTYPE: tl.constexpr):
    """float32 -> the model's dtype; float16 saturates at +-65504 (as `Quantizer.dequantize` does)."""
    if DTYPE == tl.float16:
        x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
    return x.to(DTYPE)


@triton.jit
def _aligned(base, rows, ALIGN: tl.constexpr):
    """`(base, rows)` for rows at element offsets `rows` from pointer `base`, telling the compiler what the host
    checked: `base` and every row start are ALIGN-byte aligned (so rows move as vectors of up to 16 bytes)."""
    ESIZE: tl.constexpr = base.dtype.element_ty.primitive_bitwidth // 8
    if ALIGN > ESIZE:
        base = tl.multiple_of(base, ALIGN)
        rows = tl.multiple_of(rows, ALIGN // ESIZE)
    return base, rows


@triton.jit
def _quantized_tile(tab, row, b, t, t_ok, ONE_GROUP: tl.constexpr, ALIGN: tl.constexpr, D: tl.constexpr,
                    DTYPE: tl.constexpr):
    """`(BLOCK, D)` in the model's dtype: the quantized tokens `t` `(BLOCK,)` of table row `row`, batch `b`,
    dequantized as `code * scale + zero` in float32, then rounded (or, for 16 bits, the states as stored); 0 where
    not `t_ok`.

    Rows of codes (and of scales) are loaded whole, as vectors, and the codes picked out of them in registers
    (`tl.gather`): every row's bytes are read once, without a pointer per code. `ONE_GROUP`: every class has one
    scale per row of scales (token, rotated), loaded once per token. `ALIGN`: see [`_aligned`]."""
    f = tab + row * _NF
    data = tl.load(f + _F_DATA)
    bits = tl.load(f + _F_BITS).to(tl.int32)
    rows = b * tl.load(f + _F_DATA_SB) + t.to(tl.int64) * tl.load(f + _F_DATA_ST)  # (BLOCK,) element offsets
    cols = tl.arange(0, D)
    if bits == 16:
        plain, rows16 = _aligned(data.to(tl.pointer_type(DTYPE)), rows, ALIGN)
        x = tl.load(plain + rows16[:, None] + cols[None, :], mask=t_ok[:, None], other=0.0)
    else:
        # Code j sits at bits [j * bits, (j + 1) * bits) of the row's little-endian byte string (<= D bytes).
        n_bytes = tl.load(f + _F_ROW_BYTES).to(tl.int32)
        codes, rows8 = _aligned(data.to(tl.pointer_type(tl.uint8)), rows, ALIGN)
        packed = tl.load(codes + rows8[:, None] + cols[None, :], mask=t_ok[:, None] & (cols < n_bytes)[None, :],
                         other=0).to(tl.int32)  # (BLOCK, D): byte i of each row in column i
        first = cols * bits
        byte = tl.broadcast_to((first >> 3)[None, :], packed.shape)
        lo = tl.gather(packed, byte, 1)
        hi = tl.gather(packed, tl.minimum(byte + 1, D - 1), 1)  # the next byte (0 past the row)
        code = ((lo | (hi << 8)) >> (first & 7)[None, :]) & ((1 << bits) - 1)
        block = (t // tl.load(f + _F_TIME_BLOCK).to(tl.int32)).to(tl.int64)  # (BLOCK,) row of scales
        group_len = tl.load(f + _F_GROUP_LEN).to(tl.int32)  # channels per scale
        ranges = tl.load(f + _F_RANGES)
        if ranges != 0:  # 8-bit scales: byte codes and their super-blocks' numbers
            sc, zr = _coded_scales(f, b, block, t_ok, ranges, cols, group_len, ONE_GROUP, D, DTYPE)
        else:
            scale = tl.load(f + _F_SCALE).to(tl.pointer_type(DTYPE))
            zero = tl.load(f + _F_ZERO).to(tl.pointer_type(DTYPE))
            scale, s_rows = _aligned(scale, b * tl.load(f + _F_SCALE_SB) + block * tl.load(f + _F_SCALE_ST), ALIGN)
            zero, z_rows = _aligned(zero, b * tl.load(f + _F_ZERO_SB) + block * tl.load(f + _F_ZERO_ST), ALIGN)
            if ONE_GROUP:
                sc = tl.load(scale + s_rows, mask=t_ok, other=0.0).to(tl.float32)[:, None]
                zr = tl.load(zero + z_rows, mask=t_ok, other=0.0).to(tl.float32)[:, None]
            else:  # (BLOCK, n_groups) scales in the first columns
                ok = t_ok[:, None] & (cols < D // group_len)[None, :]
                sc = tl.load(scale + s_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                zr = tl.load(zero + z_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if not ONE_GROUP:  # each channel's group picked out of the first columns
            if group_len > 1:
                group = tl.broadcast_to((cols // group_len)[None, :], packed.shape)
                sc = tl.gather(sc, group, 1)
                zr = tl.gather(zr, group, 1)
        x = _to_dtype(code.to(tl.float32) * sc + zr, DTYPE)
    return x


@triton.jit
def _coded_scales(f, b, block, t_ok, ranges, cols, group_len, ONE_GROUP: tl.constexpr, D: tl.constexpr,
                  DTYPE: tl.constexpr):
    """float32 scales and zero-points of the rows of scales `block` `(BLOCK,)` from 8-bit codes: `(BLOCK, 1)` each
    (`ONE_GROUP`), else `(BLOCK, D)` with the n_groups values in the first columns. `scale = steps[e] * top`,
    `zero = z * ((high - low) / 255) + low`, each operation rounded apart in float32 and the result rounded to the
    model's dtype, as `scales.decode` computes them (the launch turns off fused multiply-adds)."""
    codes_e = tl.load(f + _F_SCALE).to(tl.pointer_type(tl.uint8))
    codes_z = tl.load(f + _F_ZERO).to(tl.pointer_type(tl.uint8))
    steps = tl.load(f + _F_STEPS).to(tl.pointer_type(tl.float32))
    numbers = ranges.to(tl.pointer_type(DTYPE))
    s_rows = b * tl.load(f + _F_SCALE_SB) + block * tl.load(f + _F_SCALE_ST)
    z_rows = b * tl.load(f + _F_ZERO_SB) + block * tl.load(f + _F_ZERO_ST)
    r_rows = b * tl.load(f + _F_RANGES_SB) + (block // tl.load(f + _F_SUPER_ROWS)) * tl.load(f + _F_RANGES_ST)
    if ONE_GROUP:
        e = tl.load(codes_e + s_rows, mask=t_ok, other=0).to(tl.int32)[:, None]
        z = tl.load(codes_z + z_rows, mask=t_ok, other=0).to(tl.float32)[:, None]
        triple = r_rows[:, None]
        ok = t_ok[:, None]
    else:
        ok = t_ok[:, None] & (cols < D // group_len)[None, :]
        e = tl.load(codes_e + s_rows[:, None] + cols[None, :], mask=ok, other=0).to(tl.int32)
        z = tl.load(codes_z + z_rows[:, None] + cols[None, :], mask=ok, other=0).to(tl.float32)
        triple = r_rows[:, None] + (cols * tl.load(f + _F_RANGES_GS))[None, :]
    top = tl.load(numbers + triple, mask=ok, other=0.0).to(tl.float32)
    low = tl.load(numbers + triple + 1, mask=ok, other=0.0).to(tl.float32)
    high = tl.load(numbers + triple + 2, mask=ok, other=0.0).to(tl.float32)
    sc = (tl.load(steps + e, mask=ok, other=0.0) * top).to(DTYPE).to(tl.float32)
    zr = (z * tl.math.div_rn(high - low, 255.0) + low).to(DTYPE).to(tl.float32)
    return sc, zr


@triton.jit
def _full_tile(tab, row, b, f, f_ok, S, ALIGN: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr):
    """`(BLOCK, D)` in the model's dtype: tokens `f` `(BLOCK,)` of `[sink | window]` of table row `row`, batch `b`
    (`f < S` from the sink, the others from the window); 0 where not `f_ok`."""
    fr = tab + row * _NF
    cols = tl.arange(0, D)[None, :]
    in_sink = f < S
    sink = tl.load(fr + _F_SINK).to(tl.pointer_type(DTYPE))
    s_rows = b * tl.load(fr + _F_SINK_SB) + f.to(tl.int64) * tl.load(fr + _F_SINK_ST)
    sink, s_rows = _aligned(sink, s_rows, ALIGN)
    x = tl.load(sink + s_rows[:, None] + cols, mask=(f_ok & in_sink)[:, None], other=0.0)
    win = tl.load(fr + _F_WIN).to(tl.pointer_type(DTYPE))
    w_rows = b * tl.load(fr + _F_WIN_SB) + (f - S).to(tl.int64) * tl.load(fr + _F_WIN_ST)
    win, w_rows = _aligned(win, w_rows, ALIGN)
    y = tl.load(win + w_rows[:, None] + cols, mask=(f_ok & ~in_sink)[:, None], other=0.0)
    return tl.where(in_sink[:, None], x, y)


@triton.jit
def _hadamard_columns(c0, D: tl.constexpr, BC: tl.constexpr):
    """float32 `(D, BC)`: columns `[c0, c0 + BC)` of the +-1 Sylvester-Hadamard matrix of size D (<= 256), entry
    `(i, j) = (-1) ** popcount(i & j)`."""
    x = tl.arange(0, D)[:, None] & (c0 + tl.arange(0, BC))[None, :]
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return tl.where((x & 1) == 1, -1.0, 1.0)


# ---- dequantize_layer ----------------------------------------------------------------------------------------------
@triton.jit
def _store_rows(out, rows, x, ok, ALIGN: tl.constexpr, D: tl.constexpr):
    """Store `x` `(BLOCK, D)` (in `out`'s dtype) at element offsets `rows` `(BLOCK,)` of `out` where `ok`."""
    out, rows = _aligned(out, rows, ALIGN)
    tl.store(out + rows[:, None] + tl.arange(0, D)[None, :], x, mask=ok[:, None])


@triton.jit
def _store_rotated(out, rows, x, ok, ALIGN: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Store `x @ M` (`x` in the model's dtype, M the +-1 Hadamard matrix, float32 accumulation), BC output columns
    at a time."""
    out, rows = _aligned(out, rows, ALIGN)
    for c in tl.static_range(D // BC):
        y = tl.dot(x, _hadamard_columns(c * BC, D, BC).to(x.dtype), input_precision=PRECISION)  # (BLOCK, BC)
        cols = c * BC + tl.arange(0, BC)
        tl.store(out + rows[:, None] + cols[None, :], _to_dtype(y, DTYPE), mask=ok[:, None])


@triton.jit
def _dequantize_tokens(tab, row, b, out, t, S, Tq, ONE_GROUP: tl.constexpr, ALIGN: tl.constexpr, ROTATED: tl.constexpr,
                       D: tl.constexpr, BC: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Dequantize the quantized tokens `t` `(BLOCK,)` of table row `row` into `out` (at positions `S + t`)."""
    ok = t < Tq
    rows = (S + t).to(tl.int64) * D
    x = _quantized_tile(tab, row, b, t, ok, ONE_GROUP, ALIGN, D, DTYPE)  # (BLOCK, D)
    if ROTATED:  # rotated designs: the true states are x @ M, except for 16-bit heads (stored as they are)
        if tl.load(tab + row * _NF + _F_BITS) != 16:
            _store_rotated(out, rows, x, ok, ALIGN, D, BC, DTYPE, PRECISION)
        else:
            _store_rows(out, rows, x, ok, ALIGN, D)
    else:
        _store_rows(out, rows, x, ok, ALIGN, D)


@triton.jit
def _copy_tokens(tab, row, b, out, f, end, S, Tq, ALIGN: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr):
    """Copy tokens `f` `(BLOCK,)` (< `end`) of `[sink | window]` of table row `row` into `out`."""
    ok = f < end
    x = _full_tile(tab, row, b, f, ok, S, ALIGN, D, DTYPE)
    _store_rows(out, tl.where(f < S, f, f + Tq).to(tl.int64) * D, x, ok, ALIGN, D)


@triton.jit(do_not_specialize=["H"])
def _dequantize_kernel(tab, H, BLOCK_T: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, ONE_GROUP: tl.constexpr,
                       ALIGN: tl.constexpr, ROTATED: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid `(tiles, B * H, 2)`: program `(i, b * H + h, kind)` writes tile i of `[sink | quantized | window]` (tiles
    never straddle two parts) of head h, batch b, keys (kind 0) or values (kind 1)."""
    tile, bh, kind = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // H).to(tl.int64)
    row = kind * H + bh % H
    fr = tab + row * _NF
    S = tl.load(fr + _F_S).to(tl.int32)
    Tq = tl.load(fr + _F_TQ).to(tl.int32)
    W = tl.load(fr + _F_W).to(tl.int32)
    n_sink, n_quant = tl.cdiv(S, BLOCK_T), tl.cdiv(Tq, BLOCK_T)
    out = tl.load(fr + _F_OUT).to(tl.pointer_type(DTYPE)) + b * tl.load(fr + _F_OUT_SB)
    r = tl.arange(0, BLOCK_T)
    if tile < n_sink:
        _copy_tokens(tab, row, b, out, tile * BLOCK_T + r, S, S, Tq, ALIGN, D, DTYPE)
    elif tile < n_sink + n_quant:
        _dequantize_tokens(tab, row, b, out, (tile - n_sink) * BLOCK_T + r, S, Tq, ONE_GROUP, ALIGN, ROTATED, D, BC,
                           DTYPE, PRECISION)
    elif tile < n_sink + n_quant + tl.cdiv(W, BLOCK_T):
        _copy_tokens(tab, row, b, out, S + (tile - n_sink - n_quant) * BLOCK_T + r, S + W, S, Tq, ALIGN, D, DTYPE)


# ---- decode_attention ----------------------------------------------------------------------------------------------
# Sizes are not specialised on (Triton compiles a variant for every size equal to 1 otherwise): fewer compilations,
# and no loop over a constant empty range (n_q_items == n_items == 1 crashes Triton 3.6's coalescing pass).
_ATTENTION_SIZES = ["H", "n_rep", "Lq", "S", "Tq", "W", "split_len", "n_q_items", "ROWS"]
_COMBINE_SIZES = ["H", "n_rep", "Lq", "n_q_items", "n_items", "ROWS"]


@triton.jit
def _states_tile(tab, row, b, t, t_ok, is_quant, S, ONE_GROUP: tl.constexpr, ALIGN: tl.constexpr, D: tl.constexpr,
                 DTYPE: tl.constexpr):
    """`(BLOCK, D)` in the model's dtype: quantized tokens `t` (dequantized), or tokens `t` of `[sink | window]`."""
    if is_quant:
        x = _quantized_tile(tab, row, b, t, t_ok, ONE_GROUP, ALIGN, D, DTYPE)
    else:
        x = _full_tile(tab, row, b, t, t_ok, S, ALIGN, D, DTYPE)
    return x


@triton.jit(do_not_specialize=_ATTENTION_SIZES)
def _attention_kernel(
    tab,
    q_ptr, sq_rot, sq_b, sq_h, sq_l,  # queries (1 or 2, B, Hq, Lq, D): [q, q @ M / 2**k] for rotated designs
    mask_ptr, sm_b, sm_h, sm_l, sm_k,  # bool mask as uint8, broadcast to (B, Hq, Lq, Tk) by its strides
    acc_ptr, m_ptr, l_ptr,  # partials, float32: (items, B * H, ROWS, D), (items, B * H, ROWS) twice
    H, n_rep, Lq, S, Tq, W, split_len, n_q_items, ROWS, qk_scale_rot, qk_scale_f,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_GROUP: tl.constexpr, ALIGN: tl.constexpr, ROTATED: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid `(items, B * H, row blocks)`. Item i < n_q_items: quantized tokens `[i * split_len, (i + 1) * split_len)`;
    the others: the same length of `[sink | window]`. Rows r of a program are the (query head, query token) pairs
    `(h * n_rep + r // Lq, r % Lq)` of its kv-head h."""
    item, bh, rb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < n_rep * Lq
    hq, qi = h * n_rep + r // Lq, r % Lq  # (BLOCK_M,)
    is_quant = item < n_q_items
    # The quantized keys of rotated designs are rotated (not those of 16-bit heads): they take the rotated query.
    rotated = is_quant & ROTATED & (tl.load(tab + h * _NF + _F_BITS) != 16)
    qk_scale = tl.where(rotated, qk_scale_rot, qk_scale_f)
    if is_quant:
        lo = item * split_len
        hi = tl.minimum(lo + split_len, Tq)
    else:
        lo = (item - n_q_items) * split_len
        hi = tl.minimum(lo + split_len, S + W)
    cols = tl.arange(0, D)
    q_rows = rotated.to(tl.int64) * sq_rot + b * sq_b + hq.to(tl.int64) * sq_h + qi.to(tl.int64) * sq_l
    q_base, q_rows = _aligned(q_ptr, q_rows, ALIGN)
    q = tl.load(q_base + q_rows[:, None] + cols[None, :], mask=r_ok[:, None], other=0.0)  # (BLOCK_M, D)
    last = S + Tq + W - Lq + qi  # (BLOCK_M,): the last key each row sees without a mask (causal)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    n0 = lo
    while n0 < hi:  # (a while loop: Triton's interpreter takes no runtime bounds in range())
        t = n0 + tl.arange(0, BLOCK_N)
        t_ok = t < hi
        k = _states_tile(tab, h, b, t, t_ok, is_quant, S, ONE_GROUP, ALIGN, D, DTYPE)  # (BLOCK_N, D)
        pos = tl.where(is_quant, S + t, tl.where(t < S, t, t + Tq))  # (BLOCK_N,) key positions
        vis = r_ok[:, None] & t_ok[None, :]  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            m_rows = b * sm_b + hq.to(tl.int64) * sm_h + qi.to(tl.int64) * sm_l
            keep = tl.load(mask_ptr + m_rows[:, None] + pos.to(tl.int64)[None, :] * sm_k, mask=vis, other=0)
            vis = vis & (keep != 0)
        else:
            vis = vis & (pos[None, :] <= last[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _states_tile(tab, H + h, b, t, t_ok, is_quant, S, ONE_GROUP, ALIGN, D, DTYPE)  # late: fewer registers
        acc = tl.dot(p.to(DTYPE), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        n0 += BLOCK_N
    part = (item.to(tl.int64) * tl.num_programs(1) + bh) * ROWS + r  # (BLOCK_M,); padding rows are not written
    tl.store(acc_ptr + part[:, None] * D + cols[None, :], acc, mask=r_ok[:, None])
    tl.store(m_ptr + part, m_i, mask=r_ok)
    tl.store(l_ptr + part, l_i, mask=r_ok)


@triton.jit
def _combine_items(m_ptr, l_ptr, acc_ptr, bh, BH, r, r_ok, cols, m, first, stop, ROWS, D: tl.constexpr):
    """Sum over items `[first, stop)` of `exp2(m_i - m) * (l_i, acc_i[:, cols])`: `(BLOCK_M,)` and `(BLOCK_M, C)`
    (0 in rows not `r_ok`)."""
    l_sum = tl.zeros(r.shape, tl.float32)
    acc = tl.zeros((r.shape[0], cols.shape[0]), tl.float32)
    i = tl.cast(first, tl.int32)  # a tensor even where `first` is a constant: it is loop-carried
    while i < stop:
        part = (i * BH + bh).to(tl.int64) * ROWS + r
        w = tl.exp2(tl.load(m_ptr + part, mask=r_ok, other=float("-inf")) - m)
        l_sum += w * tl.load(l_ptr + part, mask=r_ok, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + part[:, None] * D + cols[None, :], mask=r_ok[:, None], other=0.0)
        i += 1
    return l_sum, acc


@triton.jit(do_not_specialize=_COMBINE_SIZES)
def _combine_kernel(
    tab, acc_ptr, m_ptr, l_ptr, out_ptr, H, n_rep, Lq, n_q_items, n_items, ROWS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BC: tl.constexpr, ROTATED: tl.constexpr,
):
    """Grid `(B * H, ROWS // BLOCK_M, D // BC)`: combines the partials of BLOCK_M rows of one kv-head into BC
    columns of `out` `(B, Hq, Lq, D)` (contiguous). Rotated designs: the quantized items' accumulators are summed
    in rotated space and multiplied by the Hadamard matrix first (where the head's values are not kept at 16 bits)."""
    bh, rb, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BH = tl.num_programs(0)
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < n_rep * Lq
    cols = c * BC + tl.arange(0, BC)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    i = tl.cast(0, tl.int32)  # a tensor: it is loop-carried
    while i < n_items:
        m = tl.maximum(m, tl.load(m_ptr + (i * BH + bh).to(tl.int64) * ROWS + r, mask=r_ok, other=float("-inf")))
        i += 1
    m = tl.where(m == float("-inf"), 0.0, m)
    if ROTATED:
        if tl.load(tab + (H + bh % H) * _NF + _F_BITS) != 16:  # the head's quantized values are rotated
            every = tl.arange(0, D)
            l_q, rot = _combine_items(m_ptr, l_ptr, acc_ptr, bh, BH, r, r_ok, every, m, 0, n_q_items, ROWS, D)
            l_f, acc = _combine_items(m_ptr, l_ptr, acc_ptr, bh, BH, r, r_ok, cols, m, n_q_items, n_items, ROWS, D)
            l_sum = l_q + l_f
            acc += tl.dot(rot, _hadamard_columns(c * BC, D, BC), input_precision="tf32x3")  # M is exact in tf32
        else:
            l_sum, acc = _combine_items(m_ptr, l_ptr, acc_ptr, bh, BH, r, r_ok, cols, m, 0, n_items, ROWS, D)
    else:
        l_sum, acc = _combine_items(m_ptr, l_ptr, acc_ptr, bh, BH, r, r_ok, cols, m, 0, n_items, ROWS, D)
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # a row that sees no key: 0
    o_rows = (bh.to(tl.int64) * n_rep * Lq + r) * D  # row (b, h * n_rep + r // Lq, r % Lq) of (B, Hq, Lq, D)
    tl.store(out_ptr + o_rows[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


# ---- host side -----------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (decided when they were defined)."""
    return isinstance(_attention_kernel, InterpretedFunction)


def unsupported_reason(query_or_window, head_dim=None, dtype=None) -> str | None:
    """Why the kernels cannot take these inputs (`None` when they can); callers then fall back to PyTorch.

    Args:
        query_or_window (`torch.Tensor` or `int`): the query or the window (its device, and by default its head_dim
            and dtype), or directly the head_dim (the form `unsupported_reason(head_dim, dtype)`).
        head_dim (`int`, *optional*): the head_dim, when it is not the tensor's last size.
        dtype (`torch.dtype`, *optional*): the model's dtype, when it is not the tensor's.

    The kernels take head_dim a power of two from 16 to 256, and float16, bfloat16 or float32 states, on CUDA (or on
    the CPU under Triton's interpreter, which has no bfloat16).
    """
    tensor = None
    if isinstance(query_or_window, torch.Tensor):
        tensor = query_or_window
        head_dim = tensor.shape[-1] if head_dim is None else head_dim
        dtype = tensor.dtype if dtype is None else dtype
    else:  # unsupported_reason(head_dim, dtype)
        head_dim, dtype = query_or_window, head_dim if dtype is None else dtype
    if not isinstance(head_dim, int) or head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim}: the Triton kernels take a power of two from 16 to 256"
    if dtype not in _DTYPES:
        return f"dtype {dtype}: the Triton kernels take float16, bfloat16 or float32"
    if _interpreted() and dtype == torch.bfloat16:
        return "Triton's interpreter (TRITON_INTERPRET=1) has no bfloat16"
    if tensor is not None:
        if tensor.device.type == "cpu" and not _interpreted():
            return "the tensors are on the CPU: the Triton kernels run on CUDA (or under TRITON_INTERPRET=1)"
        if tensor.device.type not in ("cpu", "cuda"):
            return f"the tensors are on {tensor.device.type}: the Triton kernels run on CUDA"
    return None


def _check(tensor: torch.Tensor, head_dim: int, dtype: torch.dtype) -> None:
    reason = unsupported_reason(tensor, head_dim, dtype)
    if reason is not None:
        raise ValueError(f"hf_ratequant.triton_kernels: {reason}.")


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _part_rows(part: PastPart, window: torch.Tensor, out: torch.Tensor | None, keep: list,
               rowed: list) -> list[list[int]]:
    """The table rows of one kind's heads (see `_F_*`). The tensors the rows point into go to `keep` (some are
    copies made here) and, with the output, to `rowed` (their alignment sets the kernels' `ALIGN`)."""
    b, h, w, d = window.shape
    dtype, esize = window.dtype, window.element_size()
    sink = _last_contiguous(part.sink)
    window = _last_contiguous(window)
    keep += [sink, window]
    rowed += [sink, window] + ([out] if out is not None else [])
    tensors = [sink, *part.data, *part.scale, *part.zero, *part.ranges]
    if any(t.device != window.device for t in tensors):
        raise ValueError(f"every tensor of the past must be on the window's device {window.device}.")
    s, tq = sink.shape[2], part.num_quantized
    if tuple(sink.shape) != (b, h, s, d) or sink.dtype != dtype:
        raise ValueError(f"sink {tuple(sink.shape)} {sink.dtype} does not match the window {tuple(window.shape)} "
                         f"{dtype}.")
    if len(part.head_class) != h or len(part.head_local) != h:
        raise ValueError(f"head_class / head_local describe {len(part.head_class)} heads, the window has {h}.")
    n_classes = len(part.bits)
    if not len(part.data) == len(part.scale) == len(part.zero) == len(part.ranges) == n_classes:
        raise ValueError(f"{n_classes} bit classes but {len(part.data)} / {len(part.scale)} / {len(part.zero)} / "
                         f"{len(part.ranges)} data / scale / zero / ranges tensors.")
    if any(not 0 <= c < n_classes or not 0 <= i < part.data[c].shape[1]
           for c, i in zip(part.head_class, part.head_local)):
        raise ValueError(f"head_class {part.head_class} / head_local {part.head_local} point outside the classes.")
    if len(part.time_blocks) != n_classes or any(tb < 1 or tq % tb for tb in part.time_blocks):
        raise ValueError(f"{tq} quantized tokens are not a multiple of every class's time_block "
                         f"{part.time_blocks} (or the classes and time blocks disagree in number).")
    classes = []
    for data, scale, zero, ranges, bits, tb in zip(part.data, part.scale, part.zero, part.ranges, part.bits,
                                                   part.time_blocks):
        if data.dim() != 4 or data.shape[0] != b or data.shape[2] != tq:
            raise ValueError(f"a class of {bits} bits holds {tuple(data.shape)}: expected ({b}, heads, {tq}, ...).")
        data = _last_contiguous(data)
        keep.append(data)
        if bits == KEEP_BITS:
            if data.dtype != dtype or data.shape[3] != d:
                raise ValueError(f"16-bit states {tuple(data.shape)} {data.dtype}: expected head_dim {d}, {dtype}.")
            rowed.append(data)
            classes.append((data.data_ptr(), data.stride(), data.stride(0), data.stride(2), *(0,) * 8, bits, 0, d,
                            tb, (0,) * 7))
            continue
        n_groups = scale.shape[-1] if scale.dim() == 4 else 0
        row_bytes = -(-d * bits // 8)
        shape = (b, data.shape[1], tq // tb, n_groups)
        if not 1 <= bits <= 8 or data.dtype != torch.uint8 or data.shape[3] != row_bytes:
            raise ValueError(f"a class of {bits} bits holds {tuple(data.shape)} {data.dtype}: expected uint8 rows "
                             f"of {row_bytes} bytes.")
        if n_groups < 1 or d % n_groups or tuple(scale.shape) != shape or tuple(zero.shape) != shape:
            raise ValueError(f"scales {tuple(scale.shape)} / zero-points {tuple(zero.shape)} of a {bits}-bit class: "
                             f"expected {shape} with n_groups dividing head_dim {d}.")
        scale, zero = _last_contiguous(scale), _last_contiguous(zero)
        coded = _coded_fields(scale, zero, ranges, shape, tb, dtype, keep)
        if coded is None:
            if scale.dtype != dtype or zero.dtype != dtype:
                raise ValueError(f"scales and zero-points must be in the model's dtype {dtype}.")
            rowed += [scale, zero]
            coded = (0,) * 7
        keep += [scale, zero]
        rowed.append(data)
        classes.append((data.data_ptr(), data.stride(), data.stride(0), data.stride(2), scale.data_ptr(),
                        scale.stride(1) * scale.element_size(), scale.stride(0), scale.stride(2), zero.data_ptr(),
                        zero.stride(1) * zero.element_size(), zero.stride(0), zero.stride(2), bits, row_bytes,
                        d // n_groups, tb, coded))
    out_ptr, out_sb = (out.data_ptr(), out.stride(0)) if out is not None else (0, 0)
    rows = []
    for head, (c, local) in enumerate(zip(part.head_class, part.head_local)):
        ptr, strides, sb, st, sc, sc_h, sc_b, sc_t, zr, zr_h, zr_b, zr_t, bits, row_bytes, glen, tb, coded = classes[c]
        dsize = esize if bits == KEEP_BITS else 1
        ranges_ptr, ranges_h, *ranges_rest = coded
        rows.append([
            ptr + local * strides[1] * dsize, sb, st, sc + local * sc_h, sc_b, sc_t, zr + local * zr_h, zr_b, zr_t,
            bits, row_bytes, tb, glen,
            sink.data_ptr() + head * sink.stride(1) * esize, sink.stride(0), sink.stride(2),
            window.data_ptr() + head * window.stride(1) * esize, window.stride(0), window.stride(2),
            s, tq, w,
            out_ptr + head * (out.stride(1) * esize if out is not None else 0), out_sb,
            ranges_ptr + local * ranges_h if ranges_ptr else 0, *ranges_rest,
        ])
    return rows


def _coded_fields(scale: torch.Tensor, zero: torch.Tensor, ranges: torch.Tensor, shape: tuple, time_block: int,
                  dtype: torch.dtype, keep: list) -> tuple | None:
    """What the table needs of a class's 8-bit scales: `(ranges pointer, its head stride in bytes, then the fields
    _F_RANGES_SB .. _F_STEPS)`; None for 16-bit scales (an empty `ranges`). The tensors they point into go to
    `keep`; the codes and numbers are not rows the kernels move as vectors (not in `rowed`)."""
    if not ranges.numel():
        return None
    from .quantizers import scales

    rows = scales.super_rows(time_block)
    if scale.dtype != torch.uint8 or zero.dtype != torch.uint8 or ranges.dtype != dtype:
        raise ValueError(f"8-bit scales: uint8 codes and super-block numbers in the model's dtype {dtype}, got "
                         f"{scale.dtype} / {zero.dtype} / {ranges.dtype}.")
    if tuple(ranges.shape) not in scales.ranges_shapes(shape, time_block):
        raise ValueError(f"super-block numbers {tuple(ranges.shape)} do not match scales {shape} "
                         f"({rows} rows per super-block).")
    triple = len(scales.RANGE_FIELDS)  # top, low, high: what the tile reads at +0, +1, +2
    ranges = ranges if ranges.stride(-1) == 1 and ranges.stride(-2) == triple else ranges.contiguous()
    steps = scales.steps(ranges.device)
    keep += [ranges, steps]
    group_stride = triple if ranges.shape[3] > 1 else 0
    return (ranges.data_ptr(), ranges.stride(1) * ranges.element_size(), ranges.stride(0), ranges.stride(2),
            group_stride, rows, steps.data_ptr())


def _alignment(tensors: list[torch.Tensor]) -> int:
    """The kernels' `ALIGN`: the largest power of two <= 16 dividing every tensor's address and every stride in bytes
    that is used (all but the last dimension's, of dimensions longer than 1)."""
    g = 16
    for t in tensors:
        if t.numel():
            g = math.gcd(g, t.data_ptr(), *(st * t.element_size() for n, st in zip(t.shape[:-1], t.stride()) if n > 1))
    return g


def _table(k: PastPart, v: PastPart, k_window, v_window, k_out=None, v_out=None,
           extra: tuple = ()) -> tuple[torch.Tensor, list, bool, int]:
    """The int64 `(2 * H, _NF)` table on the window's device; the tensors it points into (keep them alive until
    the launch); whether every quantized class has one scale per row (`ONE_GROUP`); and the kernels' `ALIGN` over
    everything they read or write as rows (`extra` too)."""
    keep: list = []
    rowed: list = list(extra)
    rows = _part_rows(k, k_window, k_out, keep, rowed) + _part_rows(v, v_window, v_out, keep, rowed)
    one_group = all(r[12] == k_window.shape[-1] for r in rows)  # group length == head_dim
    align = _alignment(rowed)
    device = k_window.device
    if device.type == "cuda":
        table = torch.tensor(rows, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    else:
        table = torch.tensor(rows, dtype=torch.int64)
    return table, keep, one_group, align


def _on(device: torch.device):
    """Launch on `device` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _validate(k: PastPart, v: PastPart, k_window: torch.Tensor, v_window: torch.Tensor) -> None:
    if k_window.dim() != 4 or v_window.shape != k_window.shape:
        raise ValueError(f"windows {tuple(k_window.shape)} and {tuple(v_window.shape)} must be the same "
                         "(batch, heads, tokens, head_dim).")
    if k_window.shape[0] * k_window.shape[1] > 65535:
        raise ValueError(f"batch x kv-heads = {k_window.shape[0] * k_window.shape[1]}: at most 65535 (a grid axis).")
    if v_window.dtype != k_window.dtype or v_window.device != k_window.device:
        raise ValueError("the key and value windows must share dtype and device.")
    _check(k_window, k_window.shape[-1], k_window.dtype)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dequantize_config(head_dim: int, dtype: torch.dtype, rotated: bool) -> tuple[int, int, int]:
    """`(BLOCK_T, BC, num_warps)` of the dequantization kernel: tiles that compile without register spills for
    sm_90 (checked with ptxas), but for rotated float32 at head_dim 256."""
    if rotated and dtype == torch.float32 and head_dim >= 128:  # (D = 256 still spills some)
        return 16, 128 if head_dim == 128 else 64, 8
    return 32 if head_dim <= 128 else 16, min(head_dim, 64), 4 if head_dim <= 64 else 8


def _attention_config(head_dim: int, n_rows: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """`(BLOCK_M, BLOCK_N, num_warps)` of the attention kernel for `n_rows` query rows per kv-head: tiles that
    compile without register spills for sm_90 and sm_80 (checked with ptxas), but for float32 at head_dim 256."""
    if dtype == torch.float32:  # float32 dots run on FMA units ("ieee"), which take many more registers
        return 16, 16, 4 if head_dim <= 64 else 8
    block_m = min(64 if head_dim <= 64 else 32 if head_dim == 128 else 16, max(16, triton.next_power_of_2(n_rows)))
    return block_m, 32 if head_dim <= 128 else 16, 4 if head_dim <= 64 else 8


def _precision(dtype: torch.dtype) -> str:
    """`input_precision` of the attention's dots: float32 exactly ("ieee"; TF32 would cost float32 models about
    1e-3 of accuracy); 16-bit operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _rotation_precision(dtype: torch.dtype) -> str:
    """`input_precision` of products by the +-1 Hadamard matrix: for float32 "tf32x3" (three TF32 products on
    tensor cores, float32-accurate here since the matrix is exact in TF32; "ieee" would spill registers)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def dequantize_layer(k: PastPart, v: PastPart, k_window: torch.Tensor, v_window: torch.Tensor,
                     rotated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(batch, heads, S + Tq + W, head_dim)` in the windows' dtype: sinks, the dequantized past
    (for `rotated` designs multiplied by the Hadamard matrix), windows; one launch for both kinds and all heads.

    Raises:
        `ValueError`: inputs the kernel does not take ([`unsupported_reason`]) or inconsistent shapes.
    """
    _validate(k, v, k_window, v_window)
    b, h, w, d = k_window.shape
    dtype = k_window.dtype
    outs = [k_window.new_empty(b, h, p.sink.shape[2] + p.num_quantized + w, d) for p in (k, v)]
    if outs[0].numel() + outs[1].numel() == 0:
        return outs[0], outs[1]
    table, keep, one_group, align = _table(k, v, k_window, v_window, *outs)
    block_t, bc, warps = _dequantize_config(d, dtype, bool(rotated))
    tiles = max(sum(-(-n // block_t) for n in (p.sink.shape[2], p.num_quantized, w)) for p in (k, v))
    with _on(k_window.device):
        _dequantize_kernel[(tiles, b * h, 2)](
            table, h, BLOCK_T=block_t, D=d, BC=bc, ONE_GROUP=one_group, ALIGN=align, ROTATED=bool(rotated),
            DTYPE=_DTYPES[dtype], PRECISION=_rotation_precision(dtype), num_warps=warps,
            enable_fp_fusion=False,  # code * scale, then + zero: two roundings, as the reference
        )
    del keep
    return outs[0], outs[1]


@functools.lru_cache(maxsize=8)
def _hadamard(d: int, device: torch.device) -> torch.Tensor:
    """The +-1 Sylvester-Hadamard matrix of size d (a power of two), float64."""
    i = torch.arange(d)
    bits = (i[:, None] & i[None, :]).to(torch.int64)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).to(torch.float64).to(device)


def _query_rows(query, dtype, rotated: bool) -> tuple[torch.Tensor, float]:
    """`(1 or 2, B, Hq, Lq, D)` queries in `dtype`: `[q]`, or `[q, q @ M / 2**k]` with 2**k about sqrt(D) (so that
    the rotated query keeps the query's magnitude in 16 bits), and the factor 2**k to put back in the scaling."""
    q = query.to(dtype)
    if not rotated:
        return q[None], 1.0
    d = q.shape[-1]
    factor = float(2 ** (int(math.log2(d)) // 2))
    q_rot = (q.double() @ _hadamard(d, q.device)).div_(factor).to(dtype)
    return torch.stack([q, q_rot]), factor


def _mask_arg(attention_mask, b: int, hq: int, lq: int, tk: int, device) -> tuple[torch.Tensor | None, tuple]:
    """The mask as uint8 broadcast to `(B, Hq, Lq, Tk)` (by strides, not copied) and its strides."""
    if attention_mask is None:
        return None, (0, 0, 0, 0)
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be None or boolean (True = attend), got {attention_mask.dtype}.")
    mask = attention_mask
    if mask.dim() > 4:
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)}: expected at most 4 dimensions.")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[-1] > tk:  # transformers' masks may be longer than the keys; sdpa_attention_forward slices them
        mask = mask[..., :tk]
    try:
        mask = mask.to(device).expand(b, hq, lq, tk)
    except RuntimeError as err:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to "
                         f"{(b, hq, lq, tk)}.") from err
    return mask.view(torch.uint8), tuple(mask.stride())


def decode_attention(query: torch.Tensor, attention_mask: torch.Tensor | None, k: PastPart, v: PastPart,
                     k_window: torch.Tensor, v_window: torch.Tensor, scaling: float, rotated: bool,
                     num_splits: int | None = None) -> torch.Tensor:
    """`softmax(scaling * q K^T + mask) V` over `[sink | packed past | window]`, `(B, Hq, Lq, D)` in the query's dtype,
    without writing the dequantized past to memory.

    Args:
        query (`torch.Tensor`): `(B, Hq, Lq, D)`, Hq a multiple of the kv-heads H (grouped-query attention).
        attention_mask (`torch.Tensor`, *optional*): boolean, broadcastable to `(B, Hq, Lq, Tk)` (True = attend;
            a longer last dimension is cut to Tk). `None`: causal, aligned to the end (query i sees keys
            `p <= Tk - Lq + i`; every key for one query token). A row that sees no key gives 0.
        k, v ([`PastPart`]): the stored past of keys and values; they must hold the same sink and quantized lengths.
        k_window, v_window (`torch.Tensor`): `(B, H, W, D)` in the model's dtype.
        scaling (`float`): the softmax scale.
        rotated (`bool`): the past holds Hadamard-rotated states.
        num_splits (`int`, *optional*): about how many programs split one kv-head's keys (the quantized part and
            `[sink | window]` are split separately, in pieces of equal length); by default enough to fill the GPU.

    Raises:
        `ValueError`: inputs the kernel does not take ([`unsupported_reason`]) or inconsistent shapes.
    """
    _validate(k, v, k_window, v_window)
    if query.dim() != 4:
        raise ValueError(f"query {tuple(query.shape)}: expected (B, Hq, Lq, D).")
    bsz, hq, lq, d = query.shape
    b, h, w, _ = k_window.shape
    dtype = k_window.dtype
    if bsz != b or d != k_window.shape[-1] or h == 0 or hq % h:
        raise ValueError(f"query {tuple(query.shape)} does not fit windows {tuple(k_window.shape)}: expected "
                         "(B, Hq, Lq, D) with Hq a multiple of the kv-heads.")
    if query.device != k_window.device or not query.is_floating_point():
        raise ValueError(f"query ({query.dtype} on {query.device}) must be floating point, on {k_window.device}.")
    s, tq = k.sink.shape[2], k.num_quantized
    if v.sink.shape[2] != s or v.num_quantized != tq:
        raise ValueError(f"keys hold {s} sink + {tq} quantized tokens, values {v.sink.shape[2]} + "
                         f"{v.num_quantized}: decode_attention needs the same split.")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits={num_splits!r} must be a positive integer or None.")
    tk = s + tq + w
    out = torch.empty(bsz, hq, lq, d, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    if tk == 0:
        return out.zero_()
    n_rep, n_rows = hq // h, hq // h * lq
    block_m, block_n, warps = _attention_config(d, n_rows, dtype)
    row_blocks = -(-n_rows // block_m)
    if num_splits is None:
        programs = 4 * (_num_sms(query.device.index) if query.device.type == "cuda" else 1)
        num_splits = min(max(1, -(-programs // (b * h * row_blocks))), 128)
    num_splits = min(num_splits, triton.cdiv(tk, block_n))
    split_len = triton.cdiv(triton.cdiv(tk, num_splits), block_n) * block_n  # tokens per item, a multiple of BLOCK_N
    n_q_items, n_f_items = triton.cdiv(tq, split_len), triton.cdiv(s + w, split_len)
    n_items = n_q_items + n_f_items

    queries, factor = _query_rows(query, dtype, rotated)
    mask, mask_strides = _mask_arg(attention_mask, b, hq, lq, tk, query.device)
    table, keep, one_group, align = _table(k, v, k_window, v_window, extra=(queries,))
    rows = row_blocks * block_m
    acc = torch.empty(n_items, b * h, rows, d, dtype=torch.float32, device=query.device)
    ml = torch.empty(2, n_items, b * h, rows, dtype=torch.float32, device=query.device)
    bc = min(d, 64 if d <= 128 else 32)
    with _on(query.device):
        _attention_kernel[(n_items, b * h, row_blocks)](
            table, queries, queries.stride(0), *queries.stride()[1:4],
            mask if mask is not None else queries, *mask_strides,
            acc, ml[0], ml[1], h, n_rep, lq, s, tq, w, split_len, n_q_items, rows,
            scaling * factor * LOG2E, scaling * LOG2E,
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=mask is not None, ONE_GROUP=one_group, ALIGN=align,
            ROTATED=bool(rotated), DTYPE=_DTYPES[dtype], PRECISION=_precision(dtype), num_warps=warps,
        )
        _combine_kernel[(b * h, rows // 16, d // bc)](  # 16 rows per program (rows is a multiple of 16)
            table, acc, ml[0], ml[1], out, h, n_rep, lq, n_q_items, n_items, rows, D=d, BLOCK_M=16, BC=bc,
            ROTATED=bool(rotated), num_warps=4,
        )
    del keep
    return out
