"""The `"ratequant"` attention implementation: transformers' sdpa, plus the fused decode-attention op over the packed
past of a [`RateQuantCache`].

It is registered through transformers' public `AttentionInterface` (and `AttentionMaskInterface`, with sdpa's
masks), never by patching model classes. A `RateQuantCache` whose layers run the fused path returns, from
`update`, the full-precision window tagged with a [`FusedPast`] (what the op needs: the layer's packed codes, scales,
sinks and window as they were before this step's flush) instead of the dequantized history. [`ratequant_attention`]
recognises the tag and calls `hf_ratequant::decode_attention`; wherever the op cannot apply it dequantizes the tagged
past (`hf_ratequant::dequantize_layer`) and runs sdpa as the model would have: a query longer than
[`ops.FUSED_MAX_QUERY`] tokens (prefill chunks), a mask that is not boolean or not the cache's length, dropout,
softcapping, learned sinks, position biases, or `output_attentions`. Untagged inputs (any other cache, the prefill of
a `RateQuantCache`) go to sdpa unchanged, so a model switched to `"ratequant"` behaves exactly as with `"sdpa"`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import ops

logger = logging.getLogger(__name__)

ATTENTION_NAME = "ratequant"
"""The name under which the implementation is registered (`model.set_attn_implementation("ratequant")`)."""
TAG = "_ratequant_past"
"""The attribute of the tensor returned by a fused layer's `update` that holds its [`FusedPast`]."""


@dataclass
class FusedPast:
    """What a fused `RateQuantLayer.update` hands to attention: the op arguments of its keys and values."""

    k_args: tuple
    v_args: tuple
    k_window: torch.Tensor
    v_window: torch.Tensor
    quantizer: str

    @property
    def num_tokens(self) -> int:
        sink, data = self.k_args[0], self.k_args[1]
        return sink.shape[2] + (data[0].shape[2] if data else 0) + self.k_window.shape[2]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values as the model's own attention would have received them."""
        return torch.ops.hf_ratequant.dequantize_layer(
            *self.k_args, *self.v_args, self.k_window, self.v_window, self.quantizer
        )

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """`(batch, q_heads, q_len, head_dim)` attention output of `query` over the whole past, fused."""
        return torch.ops.hf_ratequant.decode_attention(
            query, attention_mask, *self.k_args, *self.v_args, self.k_window, self.v_window, self.quantizer, scaling,
        )


def unfused_reason(past: FusedPast, query: torch.Tensor, attention_mask, dropout: float, kwargs: dict) -> str | None:
    """Why this attention call must dequantize and run sdpa instead of the fused op (`None`: it need not)."""
    if query.shape[2] > ops.FUSED_MAX_QUERY:
        return f"query of {query.shape[2]} tokens (> {ops.FUSED_MAX_QUERY})"
    if dropout:
        return "dropout"
    for name in ("softcap", "position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return name
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if query.shape[1] % past.k_window.shape[1]:
        return f"{query.shape[1]} query heads for {past.k_window.shape[1]} kv-heads"
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            return f"a {attention_mask.dtype} attention mask"
        if attention_mask.dim() != 4 or attention_mask.shape[-1] != past.num_tokens:
            return f"an attention mask of shape {tuple(attention_mask.shape)}"
        if attention_mask.shape[-2] != query.shape[2]:
            return f"an attention mask of shape {tuple(attention_mask.shape)}"
    return None


def ratequant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: the fused op for a tagged `key`, transformers' sdpa otherwise.

    Returns `(attn_output (batch, q_len, q_heads, head_dim), None)`, as sdpa does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    past: FusedPast | None = getattr(key, TAG, None)
    if past is not None:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        reason = unfused_reason(past, query, attention_mask, dropout, kwargs)
        if reason is None:
            out = past.attend(query, attention_mask, scaling)
            return out.transpose(1, 2).contiguous(), None
        logger.debug("ratequant attention: dequantizing (%s)", reason)
        key, value = past.dequantize()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Register [`ratequant_attention`] (and sdpa's masks) under [`ATTENTION_NAME`]; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, ratequant_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_fused_attention(config) -> bool:
    """Switch a model config whose attention is sdpa to `"ratequant"` (sdpa plus the fused op), registering it;
    `True` if the config now uses it. Other implementations (eager, flash-attention, flex) are left alone."""
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION_NAME:
        return True
    if current != "sdpa":
        return False
    register()
    config._attn_implementation = ATTENTION_NAME
    logger.info("RateQuantCache: attention now runs as %r (sdpa plus the fused decode kernel over the packed "
                "past); pass attention='dequantize' to the cache to keep %r.", ATTENTION_NAME, current)
    return True
