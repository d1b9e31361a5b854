"""KIVI: keys per channel, values per token (Liu et al., 2024, https://arxiv.org/abs/2402.02750)."""

from __future__ import annotations

import torch

from .base import Quantizer, register_quantizer


@register_quantizer("kivi")
class KIVIQuantizer(Quantizer):
    """Keys are grouped per channel over `group_size` consecutive tokens (outlier channels get their own range);
    values are grouped per token over `group_size` consecutive channels.

    Args:
        group_size (`int`, *optional*, defaults to 32): tokens per key group and channels per value group.
    """

    def time_block(self, kind: str) -> int:
        return self.group_size if kind == "key" else 1

    def group_axis(self, kind: str) -> str:
        return "tokens" if kind == "key" else "channels"

    def unit_group(self, kind: str, head_dim: int) -> int:
        return self.group_size

    def regrouped(self, group: int) -> KIVIQuantizer:
        return self if group == self.group_size else type(self)(group, scale_bits=self.scale_bits)

    def check_head_dim(self, head_dim: int, kind: str | None = None) -> None:
        if kind != "key" and head_dim % self.group_size:  # key groups are tokens: any head_dim
            raise ValueError(
                f"kivi groups values over {self.group_size} channels, which does not divide head_dim={head_dim}: "
                f"choose a group_size that divides {head_dim} "
                f"(e.g. {_power_of_two_divisor(head_dim, self.group_size)})."
            )

    chunked_groups = True

    def _to_groups(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        b, h, t, d = x.shape
        g = self.group_size
        if kind == "key":  # (B, H, T/G, G, D) -> (B, H, T/G, D, G): one group per channel per block of tokens
            return x.reshape(b, h, t // g, g, d).transpose(-1, -2)
        return x.reshape(b, h, t, d // g, g)  # (B, H, T, D/G, G)

    def _from_groups(self, g: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
        if kind == "key":
            return g.transpose(-1, -2).reshape(shape)
        return g.reshape(shape)


def _power_of_two_divisor(n: int, at_most: int) -> int:
    """Largest power of two dividing `n` and at most `at_most` (it also divides the usual residual lengths)."""
    d = 1
    while n % (d * 2) == 0 and d * 2 <= at_most:
        d *= 2
    return d
