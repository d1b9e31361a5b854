"""Exact bit packing of integer codes: n codes of b bits take ceil(n * b / 8) bytes, for every b in 1..8.

Codes are packed along the last dimension. Eight consecutive codes form one little-endian word of b bytes, code j
occupying bits [j * b, (j + 1) * b). Widths 1, 2, 4 and 8 use shifts on uint8 only; 3, 5, 6 and 7 go through an int64
word (at most 56 bits, so it never overflows).
"""

from __future__ import annotations

import math
import sys

import torch

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
    if _use_lookup(packed, bits):
        return _unpack_lookup(packed, bits, n_pad)[..., :n_codes]
    mask = (1 << bits) - 1
    # Plain uint8 shifts and masks: no wider intermediate, no gather.
    if 8 % bits == 0:
        fields = [packed >> s if s + bits == 8 else (packed >> s) & mask for s in range(0, 8, bits)]
    else:
        words = packed.reshape(*lead, -1, bits)  # (..., n_words, bits): one word holds 8 codes
        fields = []
        for j in range(8):
            start = j * bits
            lo, shift = start // 8, start % 8
            code = words[..., lo] >> shift
            if shift + bits > 8:  # the code continues in the next byte; uint8 overflow drops only unused bits
                code = code | (words[..., lo + 1] << (8 - shift))
            fields.append(code & mask)
    codes = torch.stack(fields, dim=-1)  # (..., n_units, codes per unit)
    return codes.reshape(*lead, n_pad)[..., :n_codes]


# Table lookups: the CPU path, measured there (unpacking 8192 tokens x 3 heads x 64 codes, median of 50) at about 2x
# the speed of shifts and masks, which pay one pass over memory per code field. Every byte value maps to what it holds,
# laid out as the bytes of one integer, so gathers write the unpacked codes and reading the result as uint8
# (little-endian) puts them in order. 4 bits stay with shifts (2 fields: a gather of int16 is slower there).
_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}
_BYTE_WORDS = {1: torch.int64, 2: torch.int32}  # 8 or 4 codes per byte


def _table(bits: int, device: torch.device) -> torch.Tensor:
    """For 1 and 2 bits: `(256,)`, the codes of every byte value. For 3, 5, 6 and 7 bits: `(bits, 256)`, entry
    `[k, v]` holding the bits that byte `k` of a `bits`-byte word (8 codes) contributes to each code, one code per
    byte of an int64: the contributions of different bytes never overlap, so OR-ing them gives the word's codes."""
    key = (bits, device)
    if key not in _TABLES:
        mask = (1 << bits) - 1
        v = torch.arange(256, dtype=torch.int64)
        if bits in _BYTE_WORDS:
            codes = (v[:, None] >> torch.arange(0, 8, bits)) & mask  # (256, codes per byte)
            table = codes.to(torch.uint8).contiguous().view(_BYTE_WORDS[bits]).reshape(256)
        else:
            word = v[None, :, None] << (8 * torch.arange(bits))[:, None, None]  # (bits, 256, 1): byte k in place
            codes = (word >> (bits * torch.arange(8))) & mask  # (bits, 256, 8): what byte k gives code j
            table = (codes << (8 * torch.arange(8))).sum(-1)  # codes < 128: no overflow
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def _use_lookup(packed: torch.Tensor, bits: int) -> bool:
    return packed.device.type == "cpu" and sys.byteorder == "little" and bits != 4


def _unpack_lookup(packed: torch.Tensor, bits: int, n_pad: int) -> torch.Tensor:
    lead = packed.shape[:-1]
    table = _table(bits, packed.device)
    if bits in _BYTE_WORDS:
        words = table.index_select(0, packed.reshape(-1).to(torch.int32))
    else:
        columns = packed.reshape(-1, bits)  # (n_words, bits): one word holds 8 codes
        words = table[0].index_select(0, columns[:, 0].to(torch.int32))
        for k in range(1, bits):
            words |= table[k].index_select(0, columns[:, k].to(torch.int32))
    return words.view(torch.uint8).view(*lead, n_pad)
