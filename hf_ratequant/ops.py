"""The cache's kernels as `torch.library` ops, so that the cache calls one op per layer and step and torch's
dispatcher picks the implementation.

- `hf_ratequant::dequantize_layer`: the keys and values attention reads, `(batch, kv_heads, tokens, head_dim)` each:
  sinks, the packed past of every bit class dequantized, and the full-precision window, in one tensor per kind.
- `hf_ratequant::decode_attention`: attention of the new token(s) over sinks + packed past + window, without writing
  the 16-bit past to memory (flash-decoding over the packed codes).

Implementations: on CUDA the Triton kernels of [`hf_ratequant.triton_kernels`]; everywhere else (and on CUDA where
Triton is missing or cannot compile, with one warning naming the reason) the PyTorch reference below, which is what
the CPU always ran: the quantizers' own dequantization (with the CPU kernel) and `scaled_dot_product_attention` over
its result. Both ops have fake (meta) implementations, so `torch.compile` traces through them.

`HF_RATEQUANT_STRICT_KERNELS=1` turns a failing Triton kernel into an exception instead of a warning and a fallback
(the test suite sets it).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)


class PastPart(NamedTuple):
    """The stored past of one layer's keys (or values) as the kernels read it.

    Tokens are laid out as `[sink | quantized | window]`; the window is passed beside it.

    Attributes:
        sink (`torch.Tensor`): `(batch, heads, S, head_dim)` in the model's dtype, S >= 0 (the attention sinks).
        data (`list[torch.Tensor]`): one entry per bit class: `uint8` packed codes `(batch, Hc, Tq, ceil(head_dim *
            bits / 8))`, or for 16 bits the plain states `(batch, Hc, Tq, head_dim)` in the model's dtype. Every class
            holds the same Tq >= 0 tokens; the last dimension is contiguous, the others may be strided.
        scale (`list[torch.Tensor]`): per class `(batch, Hc, Tq // time_block, n_groups)` in the model's dtype (an
            empty tensor for 16 bits), or `uint8` codes where the class's `ranges` are not empty (8-bit scales,
            [`quantizers.scales`]); element `(t, d)` of a head uses `scale[..., t // time_block, d // (head_dim //
            n_groups)]`. Last dimension contiguous.
        zero (`list[torch.Tensor]`): the zero-points (group minima), laid out like `scale`.
        bits (`list[int]`): each class's bit-width, 1..8 or 16.
        groups (`list[int]`): each class's group size: elements per group along the design's group axis (kivi keys:
            tokens; kivi values and the per-token designs: channels). A class is one (bits, group) pair.
        head_class (`list[int]`): for every kv-head of the layer, the index of its class.
        head_local (`list[int]`): for every kv-head, its index inside its class's tensors (dimension 1).
        time_blocks (`list[int]`): per class, the tokens sharing one row of its scales (kivi keys: the group size;
            otherwise 1). Tq is a multiple of every one.
        ranges (`list[torch.Tensor]`): per class, an empty tensor (16-bit scales), or with 8-bit scales its
            super-blocks' numbers `(batch, Hc, Tq // super_tokens, 1 or n_groups, 3)` in the model's dtype
            ([`QuantizedBlock.ranges`]).
    """

    sink: torch.Tensor
    data: list[torch.Tensor]
    scale: list[torch.Tensor]
    zero: list[torch.Tensor]
    bits: list[int]
    groups: list[int]
    head_class: list[int]
    head_local: list[int]
    time_blocks: list[int]
    ranges: list[torch.Tensor]

    @classmethod
    def from_args(cls, sink, data, scale, zero, head_bits: list[int], head_groups: list[int], ranges,
                  time_block) -> PastPart:
        """The part described by the flat op arguments (classes in ascending (bits, group), heads in order inside
        each). `ranges`: per class (empty tensors for 16-bit scales), or None for 16-bit scales everywhere.
        `time_block`: per class, or one number for all, or a function of a class's group."""
        classes, head_class, head_local = _layout(tuple(head_bits), tuple(head_groups))
        bits, groups = [c[0] for c in classes], [c[1] for c in classes]
        if callable(time_block):
            blocks = [time_block(g) for g in groups]
        elif isinstance(time_block, int):
            blocks = [time_block] * len(classes)
        else:
            blocks = list(time_block)
        if ranges is None:
            ranges = [sink.new_empty(0)] * len(classes)
        return cls(sink, list(data), list(scale), list(zero), bits, groups, list(head_class), list(head_local),
                   blocks, list(ranges))

    @property
    def num_heads(self) -> int:
        return len(self.head_class)

    @property
    def num_quantized(self) -> int:
        return self.data[0].shape[2] if self.data else 0

    def block(self, c: int, head_dim: int):
        """Class `c`'s packed past as a [`QuantizedBlock`] (None for a 16-bit class)."""
        from .quantizers import KEEP_BITS, QuantizedBlock

        if self.bits[c] == KEEP_BITS:
            return None
        ranges = self.ranges[c] if self.ranges[c].numel() else None
        return QuantizedBlock(self.data[c], self.scale[c], self.zero[c], self.bits[c], head_dim,
                              self.time_blocks[c], ranges)


@functools.lru_cache(maxsize=4096)
def _layout(head_bits: tuple[int, ...], head_groups: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
    """`(classes, head_class, head_local)` of a layer's per-head bits and group sizes, the classes its distinct
    `(bits, group)` pairs in ascending order (cached: the ops run every step)."""
    if len(head_bits) != len(head_groups):
        raise ValueError(f"{len(head_bits)} head bit-widths but {len(head_groups)} head group sizes.")
    pairs = tuple(zip(head_bits, head_groups))
    classes = tuple(sorted(set(pairs)))
    head_class = tuple(classes.index(p) for p in pairs)
    head_local = tuple(pairs[:h].count(p) for h, p in enumerate(pairs))
    return classes, head_class, head_local


@functools.lru_cache(maxsize=4096)
def _class_runs(head_class: tuple[int, ...], c: int) -> tuple[list[int], list[tuple[slice, slice]]]:
    """The heads of class `c` and their runs of consecutive heads (see [`_runs`]), cached."""
    heads = [i for i, k in enumerate(head_class) if k == c]
    return heads, _runs(heads)


@functools.lru_cache(maxsize=4096)
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The heads of a class as an index tensor on `device`, made once (not a host-to-device copy every step)."""
    return torch.tensor(heads, device=device)


FUSED_MAX_QUERY = 16
"""Longest query (new tokens in one forward pass) the fused decode-attention op serves; longer ones (prefill
chunks) dequantize and run the model's own attention."""


# ---- the PyTorch reference -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _quantizer(name: str, group: int):
    """Design `name` with groups of `group` elements along its group axis (a class's own quantizer)."""
    from .quantizers import get_quantizer

    return get_quantizer(name, group).regrouped(group)


def _dequantize_part(part: PastPart, quantizer: str, kind: str, window: torch.Tensor) -> torch.Tensor:
    """`[sink | dequantized past | window]` of one kind, `(batch, heads, tokens, head_dim)` in the window's dtype."""
    b, h, w, d = window.shape
    s, t = part.sink.shape[2], part.num_quantized
    out = window.new_empty(b, h, s + t + w, d)
    if s:
        out[:, :, :s] = part.sink
    out[:, :, s + t :] = window
    if t == 0:
        return out
    past = out[:, :, s : s + t]
    scatter = _scatter_classes(out.device)
    head_class = tuple(part.head_class)
    for c, (bits, group) in enumerate(zip(part.bits, part.groups)):
        heads, runs = _class_runs(head_class, c)
        data = part.data[c]
        block = part.block(c, d)
        q = _quantizer(quantizer, group)
        if len(runs) > 1 and scatter:
            # Off the CPU every call costs kernel launches: one dequantization per class and one scatter
            # (an H100, Qwen3-8B layer, 32k tokens, heads alternating 2/3 bits: 4.2 -> 1.2 ms for K + V).
            whole = data if block is None else q.dequantize(block, kind)
            past.index_copy_(1, _head_index(tuple(heads), out.device), whole)
            continue
        # On the CPU, one call per run of consecutive heads, written straight into the output, is cheaper than a
        # scatter (one per class when its heads are contiguous).
        for layer_heads, class_heads in runs:
            if block is None:
                past[:, layer_heads] = data[:, class_heads]
            else:
                one = block if len(runs) == 1 else block.map(lambda x, sel=class_heads: x[:, sel])
                q.dequantize(one, kind, out=past[:, layer_heads])
    return out


def _scatter_classes(device: torch.device) -> bool:
    """Whether heads of one bit-width that lie in several runs are dequantized together and scattered (off the CPU)
    rather than run by run (on the CPU)."""
    return device.type != "cpu"


def _runs(heads: list[int]) -> list[tuple[slice, slice]]:
    """Runs of consecutive heads as (slice of the layer's heads, slice of the class's heads)."""
    runs, first = [], 0
    for i in range(1, len(heads) + 1):
        if i == len(heads) or heads[i] != heads[i - 1] + 1:
            runs.append((slice(heads[first], heads[i - 1] + 1), slice(first, i)))
            first = i
    return runs


def _reference_attention(query, attention_mask, keys, values, scaling: float) -> torch.Tensor:
    """What the model's sdpa attention computes over the dequantized states: `(batch, q_heads, q_len, head_dim)`."""
    n_rep = query.shape[1] // keys.shape[1]
    if n_rep > 1:
        keys = keys.repeat_interleave(n_rep, dim=1)
        values = values.repeat_interleave(n_rep, dim=1)
    q_len, kv_len = query.shape[2], keys.shape[2]
    if attention_mask is None and q_len > 1:  # causal, aligned to the end of the past
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=attention_mask, scale=scaling
    )


# ---- Triton, where it applies --------------------------------------------------------------------------------------
def _strict() -> bool:
    return os.environ.get("HF_RATEQUANT_STRICT_KERNELS", "0").strip().lower() in ("1", "true", "yes", "on")


_broken: dict[str, str] = {}  # op name -> why its Triton kernel is no longer tried in this process


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason(device_index: int | None = None) -> str | None:
    """Why the Triton kernels cannot run on this CUDA device (`None` when they can): no Triton, or a GPU older than
    compute capability 8.0 (Ampere)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install 'hf-ratequant[gpu]')"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; the kernels need 8.0 (Ampere) or newer"
    return None


def fused_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused decode-attention kernel cannot serve a layer on `device` with states of `dtype` and
    `head_dim` (`None` when it can)."""
    if device.type != "cuda":
        return f"the cache is on {device.type}, the fused kernel runs on CUDA"
    reason = triton_unavailable_reason(device.index)
    if reason is None:
        from . import triton_kernels

        reason = triton_kernels.unsupported_reason(head_dim, dtype)
    return reason


def _run_triton(op: str, fn, fallback):
    """Run a Triton implementation; on failure warn once and fall back (raise under `HF_RATEQUANT_STRICT_KERNELS`)."""
    if op not in _broken:
        try:
            return fn()
        except torch.OutOfMemoryError:
            raise  # not the kernel's fault, and the reference would need more memory still
        except Exception as err:  # a compile or launch error: never silent
            if _strict():
                raise
            _broken[op] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"hf_ratequant: the Triton kernel of {op} failed ({_broken[op]}); using the PyTorch implementation "
                "from now on in this process (slower, same results). Please report this with your GPU and versions.",
                RuntimeWarning,
                stacklevel=3,
            )
    return fallback()


# ---- the ops ---------------------------------------------------------------------------------------------------
_PAST = ("Tensor {p}_sink, Tensor[] {p}_data, Tensor[] {p}_scale, Tensor[] {p}_zero, int[] {p}_head_bits, "
         "int[] {p}_head_groups, Tensor[] {p}_ranges")
_LIB = torch.library.Library("hf_ratequant", "DEF")
_LIB.define(
    f"dequantize_layer({_PAST.format(p='k')}, {_PAST.format(p='v')}, Tensor k_window, Tensor v_window, "
    "str quantizer) -> (Tensor, Tensor)"
)
_LIB.define(
    f"decode_attention(Tensor query, Tensor? attention_mask, {_PAST.format(p='k')}, {_PAST.format(p='v')}, "
    "Tensor k_window, Tensor v_window, str quantizer, float scaling) -> Tensor"
)
_N_PAST = 7  # flat arguments per kind


def _parts(quantizer: str, k_args, v_args) -> tuple[bool, PastPart, PastPart]:
    """`(rotates, keys, values)`: whether the design rotates, and both kinds' parts."""
    k = PastPart.from_args(*k_args, lambda g: _quantizer(quantizer, g).time_block("key"))
    v = PastPart.from_args(*v_args, lambda g: _quantizer(quantizer, g).time_block("value"))
    return _rotates(quantizer), k, v


@functools.lru_cache(maxsize=None)
def _rotates(name: str) -> bool:
    """Whether design `name` rotates (asked every step: the design is built once)."""
    from .quantizers import get_quantizer

    return get_quantizer(name).rotates


def _dequantize_layer_reference(*args):
    k_args, v_args = args[:_N_PAST], args[_N_PAST : 2 * _N_PAST]
    k_window, v_window, quantizer = args[2 * _N_PAST :]
    _, k, v = _parts(quantizer, k_args, v_args)
    return _dequantize_part(k, quantizer, "key", k_window), _dequantize_part(v, quantizer, "value", v_window)


def _dequantize_layer_triton(*args):
    from . import triton_kernels

    k_window, v_window, quantizer = args[2 * _N_PAST :]
    rotates, k, v = _parts(quantizer, args[:_N_PAST], args[_N_PAST : 2 * _N_PAST])
    return triton_kernels.dequantize_layer(k, v, k_window, v_window, rotated=rotates)


def _dequantize_layer_cuda(*args):
    if triton_unavailable_reason(args[2 * _N_PAST].device.index) is not None:
        return _dequantize_layer_reference(*args)
    return _run_triton("dequantize_layer", lambda: _dequantize_layer_triton(*args),
                       lambda: _dequantize_layer_reference(*args))


def _decode_attention_reference(query, mask, *args):
    *past, scaling = args
    keys, values = _dequantize_layer_reference(*past)
    return _reference_attention(query, mask, keys, values, scaling)


def _decode_attention_triton(query, mask, *args):
    from . import triton_kernels

    *past, scaling = args
    k_window, v_window, quantizer = past[2 * _N_PAST :]
    rotates, k, v = _parts(quantizer, past[:_N_PAST], past[_N_PAST : 2 * _N_PAST])
    return triton_kernels.decode_attention(query, mask, k, v, k_window, v_window, scaling, rotated=rotates)


def _decode_attention_cuda(*args):
    if triton_unavailable_reason(args[0].device.index) is not None:
        return _decode_attention_reference(*args)
    return _run_triton("decode_attention", lambda: _decode_attention_triton(*args),
                       lambda: _decode_attention_reference(*args))


def _decode_attention_cpu(*args):
    if cpu_backend() == "triton":  # Triton's interpreter, for tests
        return _decode_attention_triton(*args)
    return _decode_attention_reference(*args)


def _dequantize_layer_cpu(*args):
    if cpu_backend() == "triton":  # Triton's interpreter, for tests
        return _dequantize_layer_triton(*args)
    return _dequantize_layer_reference(*args)


_CPU_BACKEND = {"name": "reference"}


def cpu_backend(name: str | None = None) -> str:
    """The implementation the ops use on CPU tensors: "reference" (PyTorch ops and the CPU kernel; the default) or
    "triton" (the Triton kernels under Triton's interpreter, `TRITON_INTERPRET=1`: slow, for tests). With `name`,
    set it first."""
    if name is not None:
        if name not in ("reference", "triton"):
            raise ValueError(f"cpu_backend must be 'reference' or 'triton', got {name!r}.")
        _CPU_BACKEND["name"] = name
    return _CPU_BACKEND["name"]


def _dequantize_layer_fake(*args):
    def shape(sink, data, window):
        t = data[0].shape[2] if data else 0
        return (window.shape[0], window.shape[1], sink.shape[2] + t + window.shape[2], window.shape[3])

    k_window, v_window = args[2 * _N_PAST], args[2 * _N_PAST + 1]
    return (k_window.new_empty(shape(args[0], args[1], k_window)),
            v_window.new_empty(shape(args[_N_PAST], args[_N_PAST + 1], v_window)))


def _decode_attention_fake(query, *args):
    return torch.empty_like(query)


_LIB.impl("dequantize_layer", _dequantize_layer_cpu, "CPU")
_LIB.impl("dequantize_layer", _dequantize_layer_cuda, "CUDA")
_LIB.impl("decode_attention", _decode_attention_cpu, "CPU")
_LIB.impl("decode_attention", _decode_attention_cuda, "CUDA")
torch.library.register_fake("hf_ratequant::dequantize_layer", _dequantize_layer_fake, lib=_LIB)
torch.library.register_fake("hf_ratequant::decode_attention", _decode_attention_fake, lib=_LIB)


def part_args(part: PastPart, head_bits: list[int], head_groups: list[int]) -> tuple:
    """The flat op arguments of one kind: `(sink, data, scale, zero, head_bits, head_groups, ranges)`."""
    return part.sink, part.data, part.scale, part.zero, head_bits, head_groups, part.ranges


def dequantize_layer(k: PastPart, v: PastPart, k_window, v_window, k_bits, v_bits, k_groups, v_groups,
                     quantizer: str):
    """`(keys, values)` attention reads: see the module docstring."""
    return torch.ops.hf_ratequant.dequantize_layer(
        *part_args(k, k_bits, k_groups), *part_args(v, v_bits, v_groups), k_window, v_window, quantizer
    )
