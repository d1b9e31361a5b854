"""Per-token round-to-nearest, as transformers' `QuantizedCache` backends do."""

from __future__ import annotations

import torch

from .base import Quantizer, register_quantizer


@register_quantizer("token")
class TokenQuantizer(Quantizer):
    """Each token's `head_dim` channels form one asymmetric min-max group, for keys and values alike.

    Args:
        group_size (`int`, *optional*, defaults to 32): unused by this design (a group is a whole head row); kept so
            every design is built the same way.
    """

    chunked_groups = True

    def _to_groups(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        return x.unsqueeze(-2)  # (B, H, T, 1, D)

    def _from_groups(self, g: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
        return g.reshape(shape)
