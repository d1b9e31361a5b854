"""`RateQuantCache`: a `DynamicCache` whose layers store every kv-head at its own bit-width, really packed.

Each layer keeps the most recent `residual_length` (R) tokens in full precision. Older tokens leave that window in
whole groups of `group_size` (G) tokens and are quantized exactly once: every kv-head at its own bits (and, with
`RateQuantConfig.key_groups` / `value_groups`, its own group size), keys and values separately, heads sharing a
(bit-width, group size) quantized together in one vectorised call. The window therefore holds between R and
R + G - 1 tokens once the sequence is longer than R; a layer whose keys are grouped over more tokens than G (kivi
keys at 64 or 128) releases them in whole groups of its largest (`flush_block`), after the sinks have been filled,
and its window holds R to R + flush_block - 1. With 8-bit scales (`RateQuantConfig.scale_bits = 8`) every group's
scale and zero-point are stored in one byte each, relative to three numbers per super-block of 32 tokens
([`quantizers.scales`]; tokens then leave the window in whole super-blocks); the kernels (the CPU kernel and the
Triton ones) read those bytes and decode each row's scales themselves.

Non-finite states: keys or values containing inf or NaN are refused when they would be quantized, with a
[`NonFiniteError`] (a `ValueError`) naming the layer, keys or values, the kv-heads and the token positions (an inf or
NaN would otherwise silently turn the scale of its whole group into NaN). The failing layer is left as it was before
the call; layers earlier in the same forward pass already hold the new tokens, so `cache.crop(length_before)` makes
the cache consistent again. Until they leave the window, such tokens are held as is, like `DynamicCache` does
(attention over them gives non-finite logits), and so are heads kept at 16 bits: the error comes at the latest when
they leave the window, R to R + G - 1 tokens later, and at once for the part of a long prompt that is quantized
during prefill.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import attention as fused_attention
from . import ops
from .config import RateQuantConfig
from .quantizers import KEEP_BITS, NonFiniteError, QuantizedBlock, Quantizer, get_quantizer, packed_size

__all__ = ["RateQuantCache", "RateQuantLayer", "RateQuantSlidingLayer"]


ATTENTION_MODES = ("auto", "fused", "dequantize")


class _HeadGroups:
    """The past of one layer's keys (or values) that has left the full-precision window.

    The first `sink_length` tokens ever appended (the attention sinks) are kept as they are, all heads in one tensor.
    The tokens after them are quantized, kv-heads grouped into classes of one (bit-width, group size): for every
    class the head indices, its quantizer (the design at that group size) and one [`QuantizedBlock`] (or, for 16
    bits, a plain tensor) with those heads' tokens. A head's group size is elements per group along the design's
    group axis (kivi keys: tokens; kivi values and the per-token designs: channels); `None` is the design's own.
    """

    def __init__(self, bits_per_head: list[int], quantizer: Quantizer, kind: str, sink_length: int = 0,
                 groups_per_head: list[int | None] | None = None):
        self.quantizer, self.kind = quantizer, kind
        self.sink_length = sink_length
        self.sink: torch.Tensor | None = None  # (batch, heads, <= sink_length, head_dim), kept as is
        self.sink_room = sink_length  # tokens the sink still takes: 0 once full, or once its front was dropped
        self.num_heads = len(bits_per_head)
        self.bits = list(bits_per_head)
        self.requested_groups = list(groups_per_head) if groups_per_head is not None else [None] * self.num_heads
        if len(self.requested_groups) != self.num_heads:
            raise ValueError(f"{self.num_heads} {kind} bit-widths but {len(self.requested_groups)} group sizes.")
        self.head_dim: int | None = None
        self.groups: list[int] = []  # every head's group size, known once the head_dim is (`prepare`)
        self.classes: list[tuple[int, int, list[int]]] = []  # (bits, group, heads), ascending (bits, group)
        self.quantizers: list[Quantizer] = []
        self.index: list[slice | torch.Tensor] = []
        self.data: list[QuantizedBlock | torch.Tensor | None] = []
        self.num_tokens = 0  # sink tokens included

    @property
    def num_sink(self) -> int:
        return 0 if self.sink is None else self.sink.shape[2]

    def prepare(self, head_dim: int, device: torch.device) -> None:
        """Resolve every head's group size for `head_dim` (a 16-bit head takes the design's own: it has no groups),
        check it, and build the classes with their head selectors on `device`: a slice where a class's heads are
        contiguous, else an index tensor."""
        own = self.quantizer.unit_group(self.kind, head_dim)
        groups = [own if g is None or b == KEEP_BITS else g for b, g in zip(self.bits, self.requested_groups)]
        if head_dim != self.head_dim or groups != self.groups:
            pairs = sorted(set(zip(self.bits, groups)))
            self.classes = [(b, g, [h for h in range(self.num_heads) if (self.bits[h], groups[h]) == (b, g)])
                            for b, g in pairs]
            self.quantizers = [self.quantizer if g == own else self.quantizer.regrouped(g) for _, g, _ in self.classes]
            for q in self.quantizers:
                q.check_head_dim(head_dim, self.kind)
            self.data = [None] * len(self.classes)
            self.head_dim, self.groups = head_dim, groups
        self.index = []
        for _, _, heads in self.classes:
            if heads == list(range(heads[0], heads[-1] + 1)):
                self.index.append(slice(heads[0], heads[-1] + 1))
            else:
                self.index.append(torch.tensor(heads, device=device))

    @property
    def time_block(self) -> int:
        """Tokens the quantized past grows and is cut by: the least common multiple of its classes' token blocks
        (their time blocks, or with 8-bit scales their super-blocks)."""
        return math.lcm(*(q.token_block(self.kind) for q in self.quantizers)) if self.quantizers else 1

    def non_finite(self, x: torch.Tensor) -> torch.Tensor | None:
        """`None` if the heads to be quantized hold only finite values in the tokens of `x` `(batch, heads, tokens,
        head_dim)` that will be quantized, else a `(heads, tokens, head_dim)` mask of their non-finite elements
        (16-bit heads and sink tokens are stored as is)."""
        quantized = [h for bits, _, heads in self.classes if bits != KEEP_BITS for h in heads]
        sink = min(self.sink_room, x.shape[2])
        if not quantized or sink == x.shape[2]:
            return None
        part = x[:, :, sink:] if len(quantized) == self.num_heads else x[:, quantized, sink:]
        if torch.isfinite(part).all():
            return None
        bad = ~torch.isfinite(x).any(0)  # (heads, tokens, head_dim): non-finite in any batch row
        bad[:, :sink] = False
        keep = torch.zeros(self.num_heads, dtype=torch.bool, device=x.device)
        keep[quantized] = True
        return bad & keep[:, None, None]

    def append(self, x: torch.Tensor) -> None:
        """Append `x` `(batch, heads, tokens, head_dim)` along tokens: into the sink while it has room, the rest
        quantized."""
        sink = min(self.sink_room, x.shape[2])
        if sink:
            part = x[:, :, :sink].clone()
            self.sink = part if self.sink is None else torch.cat([self.sink, part], dim=2)
            self.sink_room -= sink
            self.num_tokens += sink
            x = x[:, :, sink:]
            if x.shape[2] == 0:
                return
        for i, ((bits, _, _), sel, q) in enumerate(zip(self.classes, self.index, self.quantizers)):
            part = x[:, sel]
            new = part.clone() if bits == KEEP_BITS else q.quantize(part, bits, self.kind)
            old = self.data[i]
            if old is None:
                self.data[i] = new
            elif bits == KEEP_BITS:
                self.data[i] = torch.cat([old, new], dim=2)
            else:
                self.data[i] = QuantizedBlock.cat([old, new])
        self.num_tokens += x.shape[2]

    def op_args(self, window: torch.Tensor) -> tuple:
        """The arguments of the `hf_ratequant` ops for this past: `(sink, data, scale, zero, head_bits,
        head_groups, ranges)` (see [`ops.PastPart`]); `window` `(batch, heads, tokens, head_dim)` gives the shapes
        of empty parts. 8-bit scales go as stored (codes and their super-blocks' numbers)."""
        b, _, _, d = window.shape
        sink = self.sink if self.sink is not None else window.new_empty(b, self.num_heads, 0, d)
        data, scale, zero, ranges = [], [], [], []
        for (bits, group, heads), block, q in zip(self.classes, self.data, self.quantizers):
            if bits == KEEP_BITS:
                data.append(block if block is not None else window.new_empty(b, len(heads), 0, d))
                scale.append(window.new_empty(0))
                zero.append(window.new_empty(0))
                ranges.append(window.new_empty(0))
            elif block is None:  # nothing quantized yet (the kernels then read no scales)
                data.append(torch.empty(b, len(heads), 0, packed_size(d, bits), dtype=torch.uint8,
                                        device=window.device))
                n_groups = d // group if q.group_axis(self.kind) == "channels" else d
                scale.append(window.new_empty(b, len(heads), 0, n_groups))
                zero.append(window.new_empty(b, len(heads), 0, n_groups))
                ranges.append(window.new_empty(0))
            else:
                data.append(block.codes)
                scale.append(block.scale)
                zero.append(block.zero)
                ranges.append(block.ranges if block.ranges is not None else window.new_empty(0))
        return sink, data, scale, zero, self.bits, self.groups, ranges

    def dequantize(self, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
        """Dequantized tokens `[start, stop)`; `start` must be a multiple of `time_block` (the sink's length is)."""
        ns = self.num_sink
        out = like.new_empty(like.shape[0], self.num_heads, stop - start, like.shape[-1])
        if start < ns:
            out[:, :, : min(stop, ns) - start] = self.sink[:, :, start : min(stop, ns)]
        if stop <= ns:
            return out
        q_start, q_stop = max(start, ns) - ns, stop - ns  # in the quantized tokens
        tb = self.time_block
        aligned_stop = -(-q_stop // tb) * tb
        part = like.new_empty(like.shape[0], self.num_heads, aligned_stop - q_start, like.shape[-1])
        for (bits, _, _), sel, data, q in zip(self.classes, self.index, self.data, self.quantizers):
            if bits == KEEP_BITS:
                part[:, sel] = data[:, :, q_start:aligned_stop]
            else:
                part[:, sel] = q.dequantize(data.tokens(q_start, aligned_stop), self.kind)
        out[:, :, max(start, ns) - start :] = part[:, :, : q_stop - q_start]
        return out

    def keep(self, start: int, stop: int) -> None:
        """Keep only the tokens `[start, stop)` (both multiples of `time_block`). Sink tokens cut from the end
        return to the window and re-enter the sink when they leave it again; once the front is dropped (sliding
        windows), the sink takes no more tokens."""
        ns = self.num_sink
        if ns:
            # A copy, so the part cut off is freed (and `nbytes` stays true).
            self.sink = self.sink[:, :, start:stop].clone() if start < min(stop, ns) else None
            if start:
                self.sink_room = 0
            elif stop < ns:
                self.sink_room += ns - stop
        q_start, q_stop = max(start - ns, 0), max(stop - ns, 0)
        for i, (bits, _, _) in enumerate(self.classes):
            data = self.data[i]
            if data is not None:
                self.data[i] = data[:, :, q_start:q_stop] if bits == KEEP_BITS else data.tokens(q_start, q_stop)
        self.num_tokens = stop - start

    def map(self, fn) -> None:
        """Apply `fn` to every stored tensor (batch reordering, device moves)."""
        if self.sink is not None:
            self.sink = fn(self.sink)
        for i, (bits, _, _) in enumerate(self.classes):
            data = self.data[i]
            if data is not None:
                self.data[i] = fn(data) if bits == KEEP_BITS else data.map(fn)

    def clear(self) -> None:
        self.data = [None] * len(self.classes)
        self.sink, self.sink_room = None, self.sink_length
        self.num_tokens = 0

    @property
    def nbytes(self) -> int:
        total = 0 if self.sink is None else self.sink.numel() * self.sink.element_size()
        for (bits, _, _), data in zip(self.classes, self.data):
            if data is not None:
                total += data.numel() * data.element_size() if bits == KEEP_BITS else data.nbytes
        return total


class RateQuantLayer(DynamicLayer):
    """One attention layer's cache: a quantized past (per-head bits) plus a full-precision residual window.

    `self.keys` / `self.values` hold the residual window, `(batch, kv_heads, tokens, head_dim)`.

    Args:
        key_bits (`list[int]`): bits of every kv-head's keys (1..8, or 16 to keep as is).
        value_bits (`list[int]`): bits of every kv-head's values.
        quantizer (`Quantizer`): the quantizer design.
        residual_length (`int`): tokens kept in full precision (R).
        group_size (`int`): tokens leave the window in multiples of this (G), or of the least common multiple of G
            and the units' token groups (kivi keys grouped over more tokens) where that is larger.
        layer_idx (`int`, *optional*): the layer's index in the model, used in error messages.
        sink_length (`int`, *optional*, defaults to 0): the first tokens kept as they are when they leave the window
            (attention sinks); a multiple of `group_size`.
        attention (`str`, *optional*, defaults to `"auto"`): how attention reads the packed past. `"fused"`: `update`
            returns the window tagged with the packed past, for the `"ratequant"` attention implementation to run
            the fused decode-attention op (only while `attn_config` uses that implementation). `"dequantize"`:
            `update` returns the dequantized history, for any attention. `"auto"`: fused on CUDA where the kernel
            supports the states (dtype, head_dim; else one warning naming the reason), dequantize elsewhere.
        attn_config (`PretrainedConfig`, *optional*): the (text) config whose `_attn_implementation` the model's
            attention reads; the fused path is only taken while it is `"ratequant"`.
    """

    is_croppable = True

    def __init__(
        self,
        key_bits: list[int],
        value_bits: list[int],
        quantizer: Quantizer,
        residual_length: int,
        group_size: int,
        layer_idx: int | None = None,
        sink_length: int = 0,
        attention: str = "auto",
        attn_config: Any = None,
        key_groups: list[int | None] | None = None,
        value_groups: list[int | None] | None = None,
    ):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r} must be one of {ATTENTION_MODES}.")
        self.attention = attention
        self.attn_config = _SharedRef(attn_config)
        self.fused = False
        if sink_length < 0 or sink_length % group_size:
            raise ValueError(f"sink_length={sink_length} must be a non-negative multiple of group_size={group_size}.")
        self.layer_idx = layer_idx
        if len(key_bits) != len(value_bits):
            raise ValueError(f"{len(key_bits)} key bit-widths but {len(value_bits)} value bit-widths.")
        self.key_bits, self.value_bits = list(key_bits), list(value_bits)
        self.quantizer = quantizer
        self.residual_length = residual_length
        self.group_size = group_size
        self.sink_length = sink_length
        self.past_keys = _HeadGroups(self.key_bits, quantizer, "key", sink_length, key_groups)
        self.past_values = _HeadGroups(self.value_bits, quantizer, "value", sink_length, value_groups)
        self.flush_block = group_size  # set for the head_dim by lazy_initialization

    def __repr__(self):
        return f"{type(self).__name__}(key_bits={self.key_bits}, value_bits={self.value_bits})"

    # ---- the cache-layer protocol ----------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != len(self.key_bits):
            raise ValueError(
                f"This layer was configured for {len(self.key_bits)} kv-heads but received {key_states.shape[1]}: "
                "the RateQuantConfig does not match the model."
            )
        self.quantizer.check_head_dim(key_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0].clone()
        self.values = value_states[:, :, :0].clone()
        self.past_keys.prepare(key_states.shape[-1], self.device)
        self.past_values.prepare(key_states.shape[-1], self.device)
        self.flush_block = math.lcm(self.group_size, self.past_keys.time_block, self.past_values.time_block)
        self.fused = self._use_fused(key_states)
        self.is_initialized = True

    def _use_fused(self, states: torch.Tensor) -> bool:
        """Whether `update` serves the fused decode-attention op (see `attention`)."""
        if self.attention != "auto":
            return self.attention == "fused"
        if states.device.type != "cuda":
            return False
        reason = ops.fused_unavailable_reason(states.device, states.dtype, states.shape[-1])
        if reason is not None:
            _warn_once(f"RateQuantCache: {reason}; decoding dequantizes the past and runs the model's attention "
                       "instead of the fused kernel (slower, same results).")
        return reason is None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new states; return the whole history as attention should see it.

        The past comes back dequantized, the residual window and the new tokens in full precision. Then every whole
        group of tokens older than the window is quantized.

        Raises:
            [`NonFiniteError`]: tokens leaving the window hold inf or NaN in a quantized head; the layer is left
                unchanged.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        window_keys = torch.cat([self.keys, key_states], dim=-2) if self.keys.shape[-2] else key_states
        window_values = torch.cat([self.values, value_states], dim=-2) if self.values.shape[-2] else value_states
        n = self._flush_length(window_keys.shape[-2])
        if n:  # check before anything changes, so that a refused update leaves the layer as it was
            self._check_finite(window_keys[:, :, :n], window_values[:, :, :n])
        self.keys, self.values = window_keys, window_values
        if self.past_keys.num_tokens == 0:
            keys, values = self.keys, self.values
        elif self.fused and self.attn_config.uses(fused_attention.ATTENTION_NAME):
            keys, values = self._tagged_window()
        else:
            keys, values = self._history()
        self._flush()
        return keys, values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.past_keys.num_tokens + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        _check_query_length(query_length)
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # ---- internals -------------------------------------------------------------------------------------------
    def _op_args(self) -> tuple:
        return (*self.past_keys.op_args(self.keys), *self.past_values.op_args(self.values))

    def _history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token held, `(batch, kv_heads, tokens, head_dim)`: one `dequantize_layer` op."""
        return torch.ops.hf_ratequant.dequantize_layer(
            *self._op_args(), self.keys, self.values, self.quantizer.name
        )

    def _tagged_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window (new tokens included), as views tagged with the packed past for the fused attention op. The
        tag holds the tensors as they are now: the flush that follows replaces them, so attention sees this step's
        tokens as the dequantize path would (in full precision until after this step)."""
        args = self._op_args()
        n = len(args) // 2
        past = fused_attention.FusedPast(args[:n], args[n:], self.keys, self.values, self.quantizer.name)
        keys, values = self.keys.view_as(self.keys), self.values.view_as(self.values)
        setattr(keys, fused_attention.TAG, past)
        return keys, values

    def past_parts(self) -> tuple[ops.PastPart, ops.PastPart]:
        """The stored past of keys and values as the kernels read it (sinks and quantized tokens; the window is
        `self.keys` / `self.values`)."""
        args = self._op_args()
        n = len(args) // 2
        k = ops.PastPart.from_args(*args[:n], [q.time_block("key") for q in self.past_keys.quantizers])
        v = ops.PastPart.from_args(*args[n:], [q.time_block("value") for q in self.past_values.quantizers])
        return k, v

    def _flush_length(self, window: int) -> int:
        """How many tokens leave a window of `window` tokens: the whole groups older than the last R (groups of
        G while they fill the sinks, of `flush_block` after them)."""
        avail = max(window - self.residual_length, 0)
        g, f = self.group_size, self.flush_block
        if f == g:
            return avail // g * g
        sink = min(self.past_keys.sink_room, avail // g * g)
        return sink + (avail - sink) // f * f

    def _check_finite(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Raise a [`NonFiniteError`] if the tokens about to be quantized hold inf or NaN in a quantized head."""
        for kind, past, x in (("keys", self.past_keys, keys), ("values", self.past_values, values)):
            bad = past.non_finite(x)
            if bad is None:
                continue
            first = past.num_tokens + getattr(self, "dropped", 0)  # absolute position of x's first token
            heads = bad.flatten(1).any(1).nonzero().flatten().tolist()
            positions = (bad.any(2).any(0).nonzero().flatten() + first).tolist()
            shown = ", ".join(map(str, positions[:8])) + (", ..." if len(positions) > 8 else "")
            quantized = x[:, heads, min(past.sink_room, x.shape[2]) :]  # sink tokens are kept as they are
            nan, inf = int(torch.isnan(quantized).sum()), int(torch.isinf(quantized).sum())
            what = " and ".join(f"{name} ({count} values)" for name, count in (("NaN", nan), ("inf", inf)) if count)
            layer = "this layer" if self.layer_idx is None else f"layer {self.layer_idx}"
            raise NonFiniteError(
                f"{layer} {kind} contain {what} in kv-heads {heads} at token positions {shown}, which are leaving "
                f"the full-precision window to be quantized ({self.quantizer.name}): an inf or NaN cannot be "
                "quantized. The model produced non-finite attention states: run it in a wider dtype (float32 or "
                "bfloat16 rather than float16) or check its weights and inputs. This layer was left unchanged; "
                "layers before it already hold the new tokens (`cache.crop(n)` back to the previous length makes "
                "the cache consistent again)."
            )

    def _flush(self) -> None:
        """Quantize the whole groups of tokens that are older than the residual window."""
        n = self._flush_length(self.keys.shape[-2])
        if n <= 0:
            return
        # Slices are copied so the (small) residual does not keep the whole prefill tensor alive.
        self.past_keys.append(self.keys[:, :, :n])
        self.past_values.append(self.values[:, :, :n])
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def _truncate(self, length: int) -> None:
        """Keep the first `length` tokens. A partial group of the quantized past returns to the window dequantized
        (those tokens keep the error they already had; they are not quantized twice)."""
        n_past = self.past_keys.num_tokens
        if length >= n_past:
            self.keys = self.keys[:, :, : length - n_past]
            self.values = self.values[:, :, : length - n_past]
            return
        block = math.lcm(self.past_keys.time_block, self.past_values.time_block)
        ns = self.past_keys.num_sink
        n_keep = length // block * block if length <= ns else ns + (length - ns) // block * block
        tail_k = self.past_keys.dequantize(n_keep, length, self.keys)
        tail_v = self.past_values.dequantize(n_keep, length, self.values)
        self.past_keys.keep(0, n_keep)
        self.past_values.keep(0, n_keep)
        self.keys, self.values = tail_k, tail_v

    def _map(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.past_keys.map(fn)
        self.past_values.map(fn)

    # ---- what generate() calls -------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (negative, as assisted decoding passes it), or keep the first
        `tokens_to_remove` tokens when it is positive (the older transformers convention)."""
        if not self.is_initialized:
            return
        length = self.get_seq_length()
        target = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        if target < 0:
            raise ValueError(f"Cannot remove {-tokens_to_remove} tokens from a cache holding {length}.")
        if target < length:
            self._truncate(target)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.device)
            self._map(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._map(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.past_keys.clear()
        self.past_values.clear()
        super().reset()

    def offload(self):
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales, zero-points, unquantized heads and the residual window."""
        if not self.is_initialized:
            return 0
        window = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return self.past_keys.nbytes + self.past_values.nbytes + window


class RateQuantSlidingLayer(RateQuantLayer):
    """A quantized sliding-window layer: like [`RateQuantLayer`], and groups of tokens that have left the
    attention window (`sliding_window`) are dropped. Attention sees at least the last `sliding_window - 1` tokens;
    the mask, built from absolute positions, hides the older ones that are still held.

    Args:
        sliding_window (`int`): the model's sliding window.
    """

    is_sliding = True

    def __init__(self, *args, sliding_window: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.sliding_window = sliding_window
        self.dropped = 0  # tokens dropped from the front
        self.record_past = False

    def activate_past_recording(self) -> None:
        """Keep every token until the next `crop` (generate() calls this before assisted or prompt-lookup decoding,
        which may roll back tokens that the window would otherwise already have dropped)."""
        self.record_past = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if not self.record_past:
            self._drop_old()
        return keys, values

    def _drop_old(self) -> None:
        excess = RateQuantLayer.get_seq_length(self) - (self.sliding_window - 1)
        if excess <= 0:
            return
        n_past = self.past_keys.num_tokens
        if n_past:
            n = self._front_cut(min(excess, n_past))
            if n:
                self.past_keys.keep(n, n_past)
                self.past_values.keep(n, n_past)
                self.dropped += n
                excess -= n
        if self.past_keys.num_tokens == 0 and excess > 0:  # the window alone is longer than the attention window
            self.keys, self.values = self.keys[:, :, excess:], self.values[:, :, excess:]
            self.dropped += excess
            self.past_keys.sink_room = self.past_values.sink_room = 0  # the first tokens are gone: no sinks

    def _front_cut(self, n: int) -> int:
        """The most tokens, at most `n`, that can be dropped from the front of the stored past: whole groups of G
        of the sinks, then whole `flush_block`s of the quantized tokens (which keeps every class's blocks whole)."""
        ns, g = self.past_keys.num_sink, self.group_size
        return n // g * g if n <= ns else ns + (n - ns) // self.flush_block * self.flush_block

    def get_seq_length(self) -> int:
        return self.dropped + super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        _check_query_length(query_length)
        return super().get_seq_length() + query_length, self.dropped

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return
        total = self.get_seq_length()
        target = tokens_to_remove if tokens_to_remove > 0 else total + tokens_to_remove
        if target < total and self.dropped and not self.record_past:
            raise RuntimeError(
                f"Cannot roll back a sliding-window layer that has already dropped {self.dropped} old tokens: the "
                "tokens now needed are gone. Call `cache.activate_past_recording()` before decoding steps that may "
                "be cropped (generate() does so for assisted and prompt-lookup decoding)."
            )
        if target < self.dropped:
            raise ValueError(f"Cannot crop a sliding-window layer to {target} tokens: the first {self.dropped} "
                             "have already been dropped.")
        if target < total:
            self._truncate(target - self.dropped)
        self._drop_old()  # a crop also restricts the layer back to what its window needs

    def reset(self) -> None:
        self.dropped = 0
        super().reset()


class _SharedRef:
    """A reference to the model's config that copies of the cache share (`copy.deepcopy` of a prefix cache must
    still see the model's current attention implementation, not a frozen copy of it)."""

    def __init__(self, config: Any):
        self.config = config

    def __deepcopy__(self, memo):
        return self

    def uses(self, implementation: str) -> bool:
        return getattr(self.config, "_attn_implementation", None) == implementation


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _check_query_length(query_length: int) -> None:
    """Refuse a forward pass over no tokens before the model fails on it with an obscure reshape error."""
    if query_length == 0:
        raise ValueError(
            "RateQuantCache received a forward pass over 0 new tokens (an empty prompt, e.g. input_ids of shape "
            "(batch, 0)?): there is nothing to attend from. Give at least one token, e.g. the tokenizer's BOS token. "
            "The cache was not changed."
        )


def _attention_config(config: Any, attention: str) -> Any:
    """The text config whose attention the fused path relies on, switched to `"ratequant"` where that path may run;
    `None` where it will not."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTION_MODES}.")
    if attention == "dequantize" or config is None:
        if attention == "fused":
            raise ValueError("attention='fused' needs the model's config (RateQuantCache(config=model.config, ...) "
                             "or from_pretrained(..., model=model)): the cache switches its attention implementation.")
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if attention == "auto" and not torch.cuda.is_available():
        return text
    if not fused_attention.use_fused_attention(text) and attention == "fused":
        raise ValueError(
            f"attention='fused' needs the model's attention implementation to be 'sdpa' (or 'ratequant'), but it is "
            f"{getattr(text, '_attn_implementation', None)!r}: load the model with attn_implementation='sdpa', or use "
            "attention='auto' or 'dequantize'."
        )
    return text


class RateQuantCache(DynamicCache):
    """A drop-in `DynamicCache` that stores each (layer, kv-head), keys and values separately, at its own bits.

    RateQuant: calibrated distortion curves and closed-form bit allocation for KV-cache quantization
    (https://arxiv.org/abs/2605.06675).

    Args:
        ddp_cache_data (*optional*): kept as the first argument for `DynamicCache` compatibility; states to
            pre-fill the layers with, one `(keys, values)` pair per layer.
        config (`PretrainedConfig`, *optional*): the model's config; checked against `quant_config` and used to find
            sliding-window layers.
        quant_config (`RateQuantConfig`): the bit allocation and quantizer.
        attention (`str`, *optional*, defaults to `"auto"`): `"auto"` decodes with the fused Triton kernel over the
            packed past on CUDA (falling back with one warning where it cannot), `"fused"` asks for that path on any
            device (on the CPU its PyTorch reference), `"dequantize"` dequantizes the past every step for the
            model's own attention. The fused path needs `config`: where CUDA is available (or with `"fused"`), a
            model config whose attention is `"sdpa"` is switched to `"ratequant"` (sdpa plus the fused op, through
            transformers' `AttentionInterface`; see [`hf_ratequant.attention`]), which changes nothing for any
            other cache.

    Example:
        >>> from hf_ratequant import RateQuantCache, RateQuantConfig, load_default_model
        >>> model, tokenizer = load_default_model()
        >>> cache = RateQuantCache(config=model.config, quant_config=RateQuantConfig.uniform(model.config, bits=4))
        >>> inputs = tokenizer("The capital of France is", return_tensors="pt")
        >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=8)
    """

    def __init__(
        self,
        ddp_cache_data=None,
        config: Any = None,
        *,
        quant_config: RateQuantConfig,
        attention: str = "auto",
    ):
        if not isinstance(quant_config, RateQuantConfig):
            raise TypeError(f"quant_config must be a RateQuantConfig, got {type(quant_config).__name__}.")
        attn_config = _attention_config(config, attention)
        if config is not None:
            fp = quant_config.check_model(config)
        elif quant_config.fingerprint is not None:
            fp = quant_config.fingerprint
        else:
            fp = None
        layer_types = list(fp.layer_types) if fp is not None and fp.layer_types else None
        quantizer = get_quantizer(quant_config.quantizer, quant_config.group_size, quant_config.scale_bits)
        layers: list[RateQuantLayer] = []
        for i, (kb, vb) in enumerate(zip(quant_config.key_bits, quant_config.value_bits)):
            args = (kb, vb, quantizer, quant_config.residual_length, quant_config.group_size)
            window = fp.window(layer_types[i]) if layer_types is not None else None
            kwargs = dict(layer_idx=i, sink_length=quant_config.sink_length, attention=attention,
                          attn_config=attn_config)
            if quant_config.has_unit_groups:
                kwargs.update(key_groups=quant_config.key_groups[i], value_groups=quant_config.value_groups[i])
            if window is not None:
                layers.append(RateQuantSlidingLayer(*args, sliding_window=window, **kwargs))
            else:
                layers.append(RateQuantLayer(*args, **kwargs))
        self.quant_config = quant_config
        # `Cache.__init__` directly: `DynamicCache.__init__` would build its own (unquantized) layers.
        super(DynamicCache, self).__init__(layers=layers)
        if ddp_cache_data is not None:
            for layer, (keys, values, *_) in zip(self.layers, ddp_cache_data):
                if keys is not None:
                    layer.update(keys, values)

    @classmethod
    def from_pretrained(
        cls,
        config_or_path: RateQuantConfig | str | os.PathLike,
        *,
        model: Any = None,
        model_config: Any = None,
        **kwargs,
    ) -> RateQuantCache:
        """Build a cache from a `RateQuantConfig`, a folder saved with `save_pretrained`, or a Hub repo id.

        Args:
            config_or_path (`RateQuantConfig`, `str` or `os.PathLike`): the allocation, or where to load it from.
            model (`PreTrainedModel`, *optional*): the model the cache is for; its config is checked against the
                allocation's fingerprint and a mismatch is refused.
            model_config (`PretrainedConfig`, *optional*): alternatively, the model's config.
            kwargs: passed to [`RateQuantConfig.from_pretrained`] (e.g. `revision`) and `attention` to the cache.
        """
        attention = kwargs.pop("attention", "auto")
        if isinstance(config_or_path, RateQuantConfig):
            quant_config = config_or_path
        else:
            quant_config = RateQuantConfig.from_pretrained(config_or_path, **kwargs)
        if model is not None:
            model_config = model.config
        return cls(config=model_config, quant_config=quant_config, attention=attention)

    def __iter__(self):
        for layer in self.layers:
            n = layer.past_keys.num_tokens if layer.is_initialized else 0
            keys, values = layer._history() if n else (layer.keys, layer.values)
            yield keys, values, None

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the cache: packed codes, scales, zero-points and full-precision windows."""
        return sum(layer.nbytes for layer in self.layers)

    def nbytes_16bit(self) -> int:
        """Bytes the same tokens would take in a 16-bit `DynamicCache` (the usual serving baseline)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                total += 2 * b * h * (layer.get_seq_length() - getattr(layer, "dropped", 0)) * d * 2
        return total
