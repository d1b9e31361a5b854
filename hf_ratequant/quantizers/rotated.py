"""QuaRot-style rotation: an orthonormal Hadamard transform of head_dim, then per-token round-to-nearest
(Ashkboos et al., 2024, https://arxiv.org/abs/2404.00456)."""

from __future__ import annotations

import functools

import torch

from .base import register_quantizer
from .token import TokenQuantizer


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def hadamard(head_dim: int) -> torch.Tensor:
    """Orthonormal, symmetric rotation of `head_dim` channels.

    A Sylvester-Hadamard matrix when `head_dim` is a power of two; otherwise the block-diagonal matrix of Hadamard
    blocks of the largest power of two dividing `head_dim` (e.g. 96 -> three 32 x 32 blocks), still orthonormal.
    """
    block = head_dim & (-head_dim)  # largest power of two dividing head_dim
    h = _hadamard_cpu(block)
    return torch.block_diag(*([h] * (head_dim // block))) if block != head_dim else h


@register_quantizer("rotated")
class RotatedQuantizer(TokenQuantizer):
    """Rotate every head row by a Hadamard matrix (spreading outlier channels), then quantize per token.
    Dequantization rotates back; the rotation is exact up to float rounding.

    The orthonormal [`hadamard`] matrix is divided by sqrt(n), n the size of its Hadamard blocks, so that every
    rotated value is an average of n values with signs: never larger in magnitude than the row's largest value. An
    orthonormal rotation can grow a value sqrt(n) times (a row of equal values becomes one value sqrt(n) times
    larger), which would overflow float16 scales and zero-points for rows near its 65504 limit. Min-max quantization
    is scale-equivariant, so the factor changes nothing else (for a power-of-4 n, such as 64, not even a rounding).
    """

    rotates = True

    def __init__(self, group_size: int = 32, row_group: int | None = None, scale_bits: int = 16):
        super().__init__(group_size, row_group, scale_bits)
        self._cache: dict[tuple, torch.Tensor] = {}

    def _matrix(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        key = (x.shape[-1], x.device, x.dtype, inverse)
        if key not in self._cache:
            d = x.shape[-1]
            block = d & (-d)  # the size of hadamard()'s blocks
            h = hadamard(d)  # symmetric and orthonormal: its own inverse
            h = h * block**0.5 if inverse else h / block**0.5
            self._cache[key] = h.to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def kernel_hadamard(self, head_dim: int) -> int:
        # The inverse rotation is the +-1 Hadamard matrix of these blocks: the CPU kernel applies it as a fast
        # Walsh-Hadamard transform ([`fwht`]) while it dequantizes, about 3x faster than dequantizing and then
        # multiplying. (In PyTorch ops the passes cost more than the matrix product, which stays the fallback.)
        return head_dim & (-head_dim)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._matrix(x, inverse=False)

    def _unrotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._matrix(x, inverse=True)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """The unnormalised Sylvester-Hadamard transform of every `block` consecutive channels of `x` (a power of two
    dividing the last size): `x @ H` for the +-1 matrix `H` (`hadamard(block) * block**0.5`), in log2(block) passes
    that replace each pair (a, b) by (a + b, a - b). The definition of what the CPU kernel computes (the same passes
    in the same order: bit for bit the same result); it rounds differently from the matrix product (to ~1e-7 of
    the values' size)."""
    shape, d = x.shape, x.shape[-1]
    h = 1
    while h < block:
        pairs = x.reshape(-1, d // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x.reshape(shape)
