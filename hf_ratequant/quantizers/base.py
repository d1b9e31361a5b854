"""The quantizer interface, the packed container it produces, and the registry of designs.

A quantizer turns a `(batch, heads, tokens, head_dim)` tensor into a [`QuantizedBlock`]: packed integer codes plus
one scale and one zero-point per group, stored in the input's dtype (or, with `scale_bits=8`, as one byte each
relative to three numbers per super-block of tokens: [`scales`]). Groups are asymmetric min-max round-to-nearest.
Subclasses only say how values are grouped (and, optionally, how they are rotated first); the base class validates
input, does the rounding, the packing and the bookkeeping.

Scales and zero-points are computed in float32 and rounded to the storage dtype *outward* (the zero-point down, the
scale up), so the stored grid always covers the group: every value is reconstructed within half a stored step, which
is at most the exact step times (1 + the dtype's rounding error). Rounding them to nearest instead would let the top
of a group fall off the grid (by up to qmax times the scale's rounding error: about a whole step at 8 bits in
bfloat16). A scale too large for the dtype (float16, 1 bit, a group spanning more than 65504) is stored as the
dtype's largest value, which clips the top of the group by at most half the exact step; and float16 reconstructions
within half a step of +-65504 saturate there instead of overflowing to inf.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import cpu_kernel, scales
from .packing import PACKABLE_BITS, pack, unpack

KEEP_BITS = 16
"""The bit-width that means "keep the unit as is, unquantized"."""
ALLOWED_BITS = (*PACKABLE_BITS, KEEP_BITS)
KINDS = ("key", "value")


class NonFiniteError(ValueError):
    """Raised when states containing inf or NaN would be quantized (a single one poisons its whole group)."""


def _round_outward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round float32 `x` to `dtype`, up (`up=True`) or down, within the finite range of `dtype`.

    Round-to-nearest can land on the wrong side of `x`; those elements move one representable value further out.
    Values beyond the finite range saturate at it (float16 tops out at 65504).
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return x.to(dtype)  # float32 (exact) or wider
    fmax = torch.finfo(dtype).max
    x = x.clamp(-fmax, fmax)
    y = x.to(dtype)
    wrong_side = y.float() < x if up else y.float() > x
    further = torch.nextafter(y, torch.full_like(y, float("inf") if up else -float("inf")))
    return torch.where(wrong_side, further, y)  # y < x <= fmax (or y > x >= -fmax): `further` stays finite


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate one bit-width: an integer in 1..8, or 16 for "keep as is"."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(
            f"{what}={bits!r} is not a valid bit-width: allowed are the integers 1..8, or 16 to keep a unit "
            "unquantized. Nothing is clamped: choose one of those values."
        )
    return bits


@dataclass
class QuantizedBlock:
    """Packed codes of a `(batch, heads, tokens, head_dim)` tensor, concatenable along tokens.

    Attributes:
        codes (`torch.Tensor`): `uint8`, `(batch, heads, tokens, ceil(head_dim * bits / 8))`.
        scale (`torch.Tensor`): `(batch, heads, tokens // time_block, n_groups)` in the model's dtype (`uint8`
            codes when `ranges` is set).
        zero (`torch.Tensor`): same shape as `scale`; the group minimum (`uint8` codes when `ranges` is set).
        bits (`int`): bit-width of every code.
        head_dim (`int`): number of codes in one row before packing.
        time_block (`int`): tokens sharing one row of `scale`/`zero` (group size for per-channel, 1 for per-token).
        ranges (`torch.Tensor`, *optional*): 8-bit scales ([`scales`]): every super-block's three numbers in the
            model's dtype, `(batch, heads, tokens // super_tokens, 1 or n_groups, 3)`; None: 16-bit scales.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    head_dim: int
    time_block: int
    ranges: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the block was quantized from (and dequantizes to)."""
        return self.scale.dtype if self.ranges is None else self.ranges.dtype

    @property
    def token_block(self) -> int:
        """Tokens the block can be cut at: `time_block`, or the super-block of coded scales."""
        return self.time_block if self.ranges is None else scales.super_tokens(self.time_block)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        parts = (self.codes, self.scale, self.zero)
        return parts if self.ranges is None else (*parts, self.ranges)

    def expanded(self) -> QuantizedBlock:
        """This block with 16-bit scales and zero-points (the coded ones decoded; itself when they are not coded):
        what the kernels read."""
        if self.ranges is None:
            return self
        scale, zero = scales.decode(self.scale, self.zero, self.ranges, scales.super_rows(self.time_block))
        return replace(self, scale=scale, zero=zero, ranges=None)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedBlock:
        """Apply `fn` to every stored tensor (for batch selection and device moves)."""
        ranges = None if self.ranges is None else fn(self.ranges)
        return replace(self, codes=fn(self.codes), scale=fn(self.scale), zero=fn(self.zero), ranges=ranges)

    def tokens(self, start: int, stop: int) -> QuantizedBlock:
        """The tokens `[start, stop)`; both must be multiples of `token_block`."""
        block = self.token_block
        if start % block or stop % block:
            raise ValueError(f"Token range [{start}, {stop}) is not aligned to blocks of {block} tokens.")
        tb = self.time_block
        ranges = None if self.ranges is None else self.ranges[:, :, start // block : stop // block]
        return replace(
            self,
            codes=self.codes[:, :, start:stop],
            scale=self.scale[:, :, start // tb : stop // tb],
            zero=self.zero[:, :, start // tb : stop // tb],
            ranges=ranges,
        )

    @staticmethod
    def cat(blocks: list[QuantizedBlock]) -> QuantizedBlock:
        if len(blocks) == 1:
            return blocks[0]
        ranges = None if blocks[0].ranges is None else torch.cat([b.ranges for b in blocks], dim=2)
        return replace(
            blocks[0],
            codes=torch.cat([b.codes for b in blocks], dim=2),
            scale=torch.cat([b.scale for b in blocks], dim=2),
            zero=torch.cat([b.zero for b in blocks], dim=2),
            ranges=ranges,
        )


class Quantizer:
    """Base class of the quantizer designs.

    Subclasses set `name` and implement `_to_groups` / `_from_groups` (how a `(B, H, T, D)` tensor is laid out as
    `(..., n_elements_per_group)` rows, and back), and optionally `_rotate` / `_unrotate`.

    Args:
        group_size (`int`, *optional*, defaults to 32): the group size G of the design.
        scale_bits (`int`, *optional*, defaults to 16): 16 stores every group's scale and zero-point in the model's
            dtype; 8 codes them in one byte each per super-block of [`scales.SCALE_BLOCK_TOKENS`] tokens
            ([`scales`]), so tokens are quantized in whole super-blocks ([`token_block`]).
    """

    name: str = ""

    def __init__(self, group_size: int = 32, scale_bits: int = 16):
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} must be a positive integer (KIVI uses 32).")
        self.group_size = group_size
        self.scale_bits = scales.check_scale_bits(scale_bits)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group_size={self.group_size}{self._scale_repr()})"

    def _scale_repr(self) -> str:
        return "" if self.scale_bits == 16 else f", scale_bits={self.scale_bits}"

    # ---- what subclasses define -------------------------------------------------------------------------------
    def time_block(self, kind: str) -> int:
        """Tokens sharing one row of scales and zero-points for `kind` ("key" or "value")."""
        return 1

    def token_block(self, kind: str) -> int:
        """Tokens that must be quantized together for `kind`: [`time_block`], or with 8-bit scales the super-block
        of tokens their codes are relative to."""
        tb = self.time_block(kind)
        return tb if self.scale_bits == 16 else scales.super_tokens(tb)

    def check_head_dim(self, head_dim: int, kind: str | None = None) -> None:
        """Raise a `ValueError` if this design cannot quantize rows of `head_dim` channels (of `kind`, "key" or
        "value"; None: of both)."""

    # ---- the group-size axis of a unit (what a per-unit group size means for this design) -------------------
    def group_axis(self, kind: str) -> str:
        """What a group of `kind` spans: `"tokens"` (consecutive tokens of one channel) or `"channels"`
        (consecutive channels of one token)."""
        return "channels"

    def unit_group(self, kind: str, head_dim: int) -> int:
        """Elements per group of a `kind` unit at this quantizer's settings, along [`group_axis`] (by default
        `group_size`; a design whose groups are something else says so)."""
        return self.group_size

    def fits_group(self, kind: str, group: int, head_dim: int | None) -> bool:
        """Whether a `kind` unit can take groups of `group` elements along its [`group_axis`]: tokens leave the
        window in groups of `group_size`, so a token group is a multiple of it; a channel group divides `head_dim`
        (unknown `head_dim`: any)."""
        if self.group_axis(kind) == "tokens":
            return group % self.group_size == 0
        return head_dim is None or head_dim % group == 0

    def group_rule(self, kind: str, head_dim: int | None) -> str:
        """[`fits_group`] in words, for error messages."""
        if self.group_axis(kind) == "tokens":
            return f"multiples of {self.group_size} tokens"
        return f"divisors of {head_dim} channels" if head_dim is not None else "divisors of head_dim channels"

    @staticmethod
    def unnested(token_groups) -> list[int]:
        """The token groups that do not divide the largest: a layer releases window tokens in whole groups of its
        largest key group, so every other must divide it."""
        largest = max(token_groups)
        return sorted({g for g in token_groups if largest % g})

    def regrouped(self, group: int) -> Quantizer:
        """This design with groups of `group` elements along the group axis of the kind it is used for (a unit's
        own group size); the same quantizer when nothing changes. A design that cannot change its group size per
        unit refuses any other."""
        if group == self.group_size:
            return self
        raise ValueError(f"The {self.name!r} quantizer has no group size per unit (it was asked for {group}); "
                         "use its own group size, or implement `regrouped` for it.")

    def _to_groups(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, H, T, D) -> (B, H, T // time_block, n_groups, group_len)."""
        raise NotImplementedError

    def _from_groups(self, g: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
        """Inverse of `_to_groups`."""
        raise NotImplementedError

    chunked_groups: bool = False
    """Whether every group is `time_block` consecutive tokens times one contiguous chunk of `head_dim / n_groups`
    channels (`n_groups` the last size of the scales). Dequantization then broadcasts the scales over the codes as
    they lie, which is much faster than going through `_to_groups` (a transposed copy for per-channel keys)."""

    rotates: bool = False
    """Whether `_rotate`/`_unrotate` do anything."""

    def kernel_hadamard(self, head_dim: int) -> int:
        """For a design whose `_unrotate` on the CPU is the unnormalised Hadamard transform of blocks of channels:
        the block size, which the CPU kernel then applies itself; 0 otherwise."""
        return 0

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _unrotate(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # ---- what the base class does -----------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, bits: int, kind: str) -> QuantizedBlock:
        """Quantize `x` of shape `(batch, heads, tokens, head_dim)` at `bits` bits (1..8).

        Raises:
            `ValueError`: bad bits, or tokens not a multiple of `time_block(kind)`; [`NonFiniteError`] (a
            `ValueError`) when `x` contains inf or NaN.
        """
        codes, scale, zero, coded = self._encode(x, bits, kind)
        codes = self._from_groups(codes.to(torch.uint8), kind, x.shape)  # (B, H, T, D)
        ranges = None
        if coded is not None:
            scale, zero, ranges = coded
        return QuantizedBlock(
            codes=pack(codes, bits),
            scale=scale.squeeze(-1) if coded is None else scale,
            zero=zero.squeeze(-1) if coded is None else zero,
            bits=bits,
            head_dim=x.shape[-1],
            time_block=self.time_block(kind),
            ranges=ranges,
        )

    def roundtrip(self, x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
        """`dequantize(quantize(x, bits, kind), kind)` without packing the codes: the tensor the cache would
        reconstruct from `x`, in `x`'s dtype (calibration measures thousands of them). The same codes, scales and
        arithmetic as the packed path, so the same values (the CPU kernel's inverse Hadamard transform of a
        rotating design rounds differently from `_unrotate`: within a few float32 ulps there)."""
        codes, scale, zero, _ = self._encode(x, bits, kind)
        dtype = x.dtype
        work = _work_dtype(x.device, dtype)
        out = self._from_groups(_affine_(codes.to(work), scale, zero), kind, x.shape)
        if self.rotates:
            out = self._unrotate(out)
        if dtype == torch.float16:
            fmax = torch.finfo(dtype).max
            out = out.clamp(-fmax, fmax)
        return out.to(dtype)

    def _encode(self, x: torch.Tensor, bits: int, kind: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """Checks `x`, then its codes in the group layout (float32 integers in `0..2^bits - 1`, `(B, H, T // tb,
        n_groups, group_len)`) with the scale and zero-point of each group as dequantization sees them (`x`'s dtype,
        last size 1), and, with 8-bit scales, what is stored of them: `(scale_codes, zero_codes, ranges)`
        ([`scales.encode`]); else None."""
        check_bits(bits)
        if bits == KEEP_BITS:
            raise ValueError("16 bits means 'keep as is': such units are stored unquantized, not quantized.")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} must be one of {KINDS}.")
        if x.dim() != 4:
            raise ValueError(f"Expected a (batch, heads, tokens, head_dim) tensor, got shape {tuple(x.shape)}.")
        self.check_head_dim(x.shape[-1], kind)
        tb, block = self.time_block(kind), self.token_block(kind)
        if x.shape[2] % block:
            raise ValueError(f"{self.name} quantizes {kind}s in blocks of {block} tokens; got {x.shape[2]} tokens.")
        dtype = x.dtype
        groups = self._to_groups(self._rotate(x.float()), kind)  # (B, H, T // tb, n_groups, group_len)
        lo = groups.amin(-1, keepdim=True)
        hi = groups.amax(-1, keepdim=True)
        # amin/amax propagate NaN, and an inf is some group's max or min: checking them checks every element, at a
        # group_len-th of the cost of checking x
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise NonFiniteError(
                f"Cannot quantize {kind}s containing inf or NaN ({self.name} quantizer): the model produced "
                "non-finite attention states; run it in a wider dtype (float32/bfloat16) or check its weights."
            )
        qmax = (1 << bits) - 1
        coded = None
        if self.scale_bits != 16:
            rows, across = scales.super_rows(tb), tb > 1  # groups along tokens share one super-block per block
            e, z, ranges, scale_f, zero_f = scales.encode(lo.squeeze(-1), hi.squeeze(-1), qmax, dtype, rows, across,
                                                          _round_outward)
            scale_f, zero_f, coded = scale_f.unsqueeze(-1), zero_f.unsqueeze(-1), (e, z, ranges)
            scale, zero = scale_f.to(dtype), zero_f.to(dtype)
        else:
            # Round zero-point and scale to the storage dtype *before* coding, so codes match what is stored;
            # outward (zero down, scale up from what the rounded zero needs), so that zero + qmax * scale >= hi.
            zero = _round_outward(lo, dtype, up=False)
            zero_f = zero.float()
            scale = _round_outward((hi - zero_f) / qmax, dtype, up=True)
            scale_f = scale.float()
        inv = torch.where(scale_f > 0, 1.0 / scale_f, torch.zeros_like(scale_f))  # constant groups: all codes 0
        codes = (groups - zero_f).mul_(inv).round_().clamp_(0, qmax)
        return codes, scale, zero, coded

    def dequantize(self, q: QuantizedBlock, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct the `(batch, heads, tokens, head_dim)` tensor in the stored dtype.

        Args:
            out (`torch.Tensor`, *optional*): a tensor (or view) of that shape and dtype to write into, which saves a
                copy when the caller assembles a larger tensor.
        """
        dtype = q.dtype
        device = q.codes.device
        shape = torch.Size((*q.codes.shape[:3], q.head_dim))
        work = _work_dtype(device, dtype)
        # float16 only: a value within half a step of 65504 may be reconstructed just past it (inf once rounded).
        fmax = torch.finfo(dtype).max if dtype == torch.float16 else None
        in_place = out is not None and work == dtype  # reconstruct straight into `out`
        if self.chunked_groups:
            # Codes stay in their (B, H, T, D) layout; scales and zero-points broadcast over it (no transposed copy).
            b, h, t, d = shape
            tb, n_groups = q.time_block, q.scale.shape[-1]
            x = out if in_place else torch.empty(shape, dtype=work, device=device)
            hadamard = self.kernel_hadamard(d) if self.rotates else 0
            if cpu_kernel.dequantize_into(q, x, hadamard=hadamard):  # the one-pass CPU kernel, where it applies
                unrotated = hadamard > 0
            else:
                unrotated = False
                q = q.expanded()  # coded 8-bit scales: decoded for this call
                chunks = (b, h, t // tb, tb, n_groups, d // n_groups)
                view = x.view(chunks)
                view.copy_(unpack(q.codes, q.bits, q.head_dim).reshape(chunks))
                _affine_(view, q.scale[:, :, :, None, :, None], q.zero[:, :, :, None, :, None])
        else:
            q = q.expanded()
            codes = unpack(q.codes, q.bits, q.head_dim)  # uint8 (B, H, T, D)
            g = self._to_groups(codes, kind).to(work)  # (B, H, T // tb, n_groups, group_len)
            scale, zero = q.scale.to(work)[..., None], q.zero.to(work)[..., None]
            x = self._from_groups(torch.addcmul(zero, g, scale), kind, shape)
            unrotated = False
        if self.rotates and not unrotated:
            x = self._unrotate(x)  # a new tensor
        if fmax is not None:
            x = x.clamp_(-fmax, fmax)
        if x is out:
            return out
        x = x.to(dtype)
        if out is not None:
            out.copy_(x)
        return x


def _affine_(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`codes * scale + zero` in place, in the dtype of `codes` (the work dtype; exact integers there). float32: the
    product and the sum rounded apart (two passes, cheaper than an in-place addcmul on CPU, and what the CPU kernel
    does); 16-bit (GPU): one rounding, and code * scale may not fit float16 before zero is added."""
    if codes.dtype == torch.float32:
        return codes.mul_(scale).add_(zero)
    return torch.addcmul(zero, codes, scale, out=codes)


def _work_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype dequantization computes in: float32 on CPU (faster there than 16-bit math, and exact enough), the
    model's dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else dtype


_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str):
    """Class decorator adding a [`Quantizer`] subclass to the registry under `name`."""

    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY:
            raise ValueError(f"A quantizer named {name!r} is already registered ({_REGISTRY[name].__name__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_quantizers() -> list[str]:
    """Names of the registered quantizer designs."""
    return sorted(_REGISTRY)


def get_quantizer(name: str, group_size: int = 32, scale_bits: int = 16) -> Quantizer:
    """Instantiate the registered quantizer `name` (`scale_bits`: see [`Quantizer`]).

    Raises:
        `ValueError`: `name` is not registered; the message lists the registered names.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown quantizer {name!r}: registered quantizers are {available_quantizers()}.")
    return _REGISTRY[name](group_size=group_size, scale_bits=scale_bits)
