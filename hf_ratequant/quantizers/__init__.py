"""Quantizer designs, behind a registry keyed by the name stored in a [`RateQuantConfig`]."""

from . import kivi, rotated, token  # noqa: F401  (registers the designs)
from .base import (
    ALLOWED_BITS,
    KEEP_BITS,
    NonFiniteError,
    QuantizedBlock,
    Quantizer,
    available_quantizers,
    check_bits,
    get_quantizer,
    register_quantizer,
)
from .packing import pack, packed_size, unpack

__all__ = [
    "ALLOWED_BITS",
    "KEEP_BITS",
    "NonFiniteError",
    "QuantizedBlock",
    "Quantizer",
    "available_quantizers",
    "check_bits",
    "get_quantizer",
    "pack",
    "packed_size",
    "register_quantizer",
    "unpack",
]
