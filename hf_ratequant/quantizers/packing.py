"""Exact bit packing of integer codes: n codes of b bits take ceil(n * b / 8) bytes, for every b in 1..8.

Codes are packed along the last dimension. Eight consecutive codes form one little-endian word of b bytes, code j
occupying bits [j * b, (j + 1) * b). Widths 1, 2, 4 and 8 use shifts on uint8 only; 3, 5, 6 and 7 go through an int64
word (at most 56 bits, so it never overflows).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

PACKABLE_BITS = tuple(range(1, 9))


def packed_size(n_codes: int, bits: int) -> int:
    """Bytes taken by `n_codes` codes of `bits` bits: `ceil(n_codes * bits / 8)`."""
    return math.ceil(n_codes * bits / 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"Cannot pack codes of {bits} bits: allowed bit-widths are {list(PACKABLE_BITS)}.")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in `[0, 2**bits)` along the last dimension.

    Args:
        codes (`torch.Tensor`): `uint8` codes of shape `(..., n)`.
        bits (`int`): bit-width of every code, 1 to 8.

    Returns:
        `torch.Tensor`: `uint8` tensor of shape `(..., ceil(n * bits / 8))`.

    Example:
        >>> codes = torch.tensor([[1, 0, 3, 2, 1]], dtype=torch.uint8)
        >>> pack(codes, 2).shape
        torch.Size([1, 2])
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"Codes must be uint8, got {codes.dtype}.")
    if bits == 8:
        return codes.contiguous()
    n = codes.shape[-1]
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    lead = codes.shape[:-1]
    if 8 % bits == 0:  # 1, 2, 4: several codes per byte
        per_byte = 8 // bits
        grouped = codes.reshape(*lead, -1, per_byte)  # (..., n_bytes, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        packed = (grouped << shifts).sum(-1, dtype=torch.uint8)  # bit fields do not overlap: sum == or
    else:  # 3, 5, 6, 7: 8 codes -> one word of `bits` bytes
        grouped = codes.reshape(*lead, -1, 8).to(torch.int64)  # (..., n_words, 8)
        shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=codes.device)
        word = (grouped << shifts).sum(-1, keepdim=True)  # (..., n_words, 1)
        byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=codes.device)
        packed = ((word >> byte_shifts) & 0xFF).to(torch.uint8)  # (..., n_words, bits)
    packed = packed.reshape(*lead, -1)
    return packed[..., : packed_size(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of [`pack`]: returns the `uint8` codes of shape `(..., n_codes)`."""
    _check_bits(bits)
    if packed.shape[-1] != packed_size(n_codes, bits):
        raise ValueError(
            f"A packed row of {n_codes} codes at {bits} bits must have {packed_size(n_codes, bits)} bytes, "
            f"got {packed.shape[-1]}."
        )
    if bits == 8:
        return packed
    lead = packed.shape[:-1]
    n_pad = n_codes + (-n_codes) % 8
    full_bytes = n_pad * bits // 8
    if full_bytes != packed.shape[-1]:
        packed = torch.nn.functional.pad(packed, (0, full_bytes - packed.shape[-1]))
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask  # (..., n_bytes, per_byte)
    else:
        # Code j of a word starts at bit j * bits: read the (at most two) bytes it spans as one int32.
        lo, hi, shift = (t.to(packed.device) for t in _odd_layout(bits))
        words = packed.reshape(*lead, -1, bits).to(torch.int32)  # (..., n_words, bits)
        pair = words[..., lo] | (words[..., hi] << 8)  # (..., n_words, 8)
        codes = ((pair >> shift) & mask).to(torch.uint8)
    return codes.reshape(*lead, n_pad)[..., :n_codes]


@functools.lru_cache(maxsize=None)
def _odd_layout(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 8 codes of one `bits`-byte word: the byte each starts in, the next byte, and the shift."""
    start = torch.arange(8) * bits
    lo = start // 8
    return lo, (lo + 1).clamp(max=bits - 1), start % 8


@functools.lru_cache(maxsize=None)
def _byte_table(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits): the codes held in each possible byte, as floating-point numbers."""
    byte = torch.arange(256)
    return torch.stack([(byte >> s) & ((1 << bits) - 1) for s in range(0, 8, bits)], dim=-1).to(device, dtype)


def unpack_float(packed: torch.Tensor, bits: int, n_codes: int, dtype: torch.dtype) -> torch.Tensor:
    """[`unpack`] straight to floating-point codes of `dtype` (what dequantization needs).

    Widths dividing 8 look every byte up in a 256-entry table, which yields the float codes in one pass.
    """
    if 8 % bits or packed.shape[-1] != packed_size(n_codes, bits) or n_codes % 8:
        return unpack(packed, bits, n_codes).to(dtype)
    if bits == 8:
        return packed.to(dtype)
    table = _byte_table(bits, dtype, packed.device)
    codes = F.embedding(packed.to(torch.int32 if packed.is_cuda else torch.int64), table)  # (..., n_bytes, 8 // bits)
    return codes.reshape(*packed.shape[:-1], n_codes)
