"""What a GGUF file says about itself, read from its header alone: the architecture, and how long the file must be.

`gguf.GGUFReader` maps every tensor and every tokenizer string into numpy objects (seconds for a small model); to
refuse a bad file before any weights load, this reads only the key/value header and the tensor table (tens of
milliseconds), with the format's constants from the `gguf` package.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass

__all__ = ["GGUFHeader", "read_gguf_header"]


@dataclass(frozen=True)
class GGUFHeader:
    """`architecture` (`general.architecture`, None if absent), the number of tensors, and `needed_bytes`: where
    the last tensor's data ends, which the file's size must reach."""

    version: int
    architecture: str | None
    n_tensors: int
    needed_bytes: int


class _Reader:
    def __init__(self, f):
        self.f = f

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise EOFError
        return struct.unpack("<" + fmt, raw)

    def string(self) -> bytes:
        (n,) = self.take("Q")
        raw = self.f.read(n)
        if len(raw) != n:
            raise EOFError
        return raw

    def skip(self, n: int) -> None:
        self.f.seek(n, os.SEEK_CUR)


def _value(r: _Reader, vtype: int, keep: bool):
    """One value of type `vtype`: returned when `keep` (strings and scalars), else skipped."""
    from gguf import GGUFValueType

    kind = GGUFValueType(vtype)
    if kind == GGUFValueType.STRING:
        raw = r.string()
        return raw.decode("utf-8", "replace") if keep else None
    if kind == GGUFValueType.ARRAY:
        itype, count = r.take("IQ")
        fixed = _scalar_formats().get(GGUFValueType(itype))
        if fixed is not None:
            r.skip(count * struct.calcsize(fixed))
        else:
            for _ in range(count):
                _value(r, itype, False)
        return None
    (value,) = r.take(_scalar_formats()[kind])
    return value


@functools.cache
def _scalar_formats() -> dict:
    from gguf import GGUFValueType as T

    return {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i", T.FLOAT32: "f",
            T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}


def read_gguf_header(path: str) -> GGUFHeader:
    """The header of the GGUF file at `path`. Raises `ValueError` naming the file when it is not GGUF or its
    header is cut short."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        r = _Reader(f)
        try:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
            (version,) = r.take("I")
            n_tensors, n_kv = r.take("QQ")
            meta = {}
            for _ in range(n_kv):
                key = r.string().decode("utf-8", "replace")
                (vtype,) = r.take("I")
                meta[key] = _value(r, vtype, key.startswith("general."))
            ends = []
            for _ in range(n_tensors):
                r.string()
                (n_dims,) = r.take("I")
                dims = r.take("Q" * n_dims)
                qtype, offset = r.take("IQ")
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
                ends.append(offset + math.prod(dims) // block * type_size)
            align = int(meta.get("general.alignment") or 32)
            data_start = -(-f.tell() // align) * align
        except (EOFError, struct.error):
            raise ValueError(f"{path} is truncated: its header ends early.") from None
        except (KeyError, ValueError) as e:
            if str(e).startswith(path):
                raise
            raise ValueError(f"{path} has a malformed GGUF header ({e!r}).") from None
    return GGUFHeader(version, meta.get("general.architecture"), n_tensors, data_start + max(ends, default=0))
