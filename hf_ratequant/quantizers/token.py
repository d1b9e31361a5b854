"""Per-token round-to-nearest, as transformers' `QuantizedCache` backends do."""

from __future__ import annotations

import torch

from .base import Quantizer, register_quantizer


@register_quantizer("token")
class TokenQuantizer(Quantizer):
    """Each token's `head_dim` channels form one asymmetric min-max group, for keys and values alike (or, with
    `row_group`, each run of `row_group` consecutive channels of a token does).

    Args:
        group_size (`int`, *optional*, defaults to 32): unused by this design (a group is a whole head row); kept so
            every design is built the same way.
        row_group (`int`, *optional*): channels per group, a divisor of head_dim; `None` (the default) for one group
            per row. Smaller groups cost more scales and zero-points (`32 / row_group` bits per element at 16 bits)
            and fit their values more closely.
        scale_bits (`int`, *optional*, defaults to 16): see [`Quantizer`].
    """

    chunked_groups = True

    def __init__(self, group_size: int = 32, row_group: int | None = None, scale_bits: int = 16):
        super().__init__(group_size, scale_bits)
        if row_group is not None and (isinstance(row_group, bool) or not isinstance(row_group, int) or row_group < 1):
            raise ValueError(f"row_group={row_group!r} must be a positive integer dividing head_dim, or None for "
                             "one group per row.")
        self.row_group = row_group

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group_size={self.group_size}, row_group={self.row_group}{self._scale_repr()})"

    def unit_group(self, kind: str, head_dim: int) -> int:
        return head_dim if self.row_group is None else self.row_group

    def regrouped(self, group: int) -> TokenQuantizer:
        return self if group == self.row_group else type(self)(self.group_size, row_group=group,
                                                               scale_bits=self.scale_bits)

    def check_head_dim(self, head_dim: int, kind: str | None = None) -> None:
        if self.row_group is not None and head_dim % self.row_group:
            divisors = [g for g in (8, 16, 32, 64, 128, 256) if head_dim % g == 0 and g <= head_dim]
            raise ValueError(
                f"{self.name} groups {self.row_group} channels, which does not divide head_dim={head_dim}: choose "
                f"row_group from the divisors of {head_dim} (e.g. {divisors}), or None for one group per row."
            )

    def _to_groups(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        b, h, t, d = x.shape
        if self.row_group is None or self.row_group == d:
            return x.unsqueeze(-2)  # (B, H, T, 1, D)
        return x.reshape(b, h, t, d // self.row_group, self.row_group)  # (B, H, T, D / g, g)

    def _from_groups(self, g: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
        return g.reshape(shape)
