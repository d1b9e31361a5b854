"""Calibration: measure how much each (layer, kv-head, key/value) unit's quantization hurts, fit its curve, allocate.

1. **Capture.** A forward and backward pass over calibration windows with a capturing cache: its layers receive the
   post-RoPE keys and values through transformers' own cache API (so every architecture the cache serves is seen),
   make them leaves that require grad, and keep them with their gradients. Model weights are frozen for the pass and
   restored afterwards (`calibration_mode`).
2. **Measure.** For every unit and bit-width in play, the gradient-weighted error that the real quantizer causes in
   the layer's attention output, attention recomputed with the quantized states ([`output_distortion`]: only the
   columns the quantized states change, [`SplitAttention`], where the layer's attention is plain softmax attention;
   or in the states themselves, [`fisher_distortion`]); fit D_u(b) = alpha_u * beta_u^(-b) per unit ([`fit_curves`]).
3. **Allocate** by reverse waterfilling ([`allocate_bits`]) and, exactly, from the measured table.
4. **Validate.** Every candidate (RateQuant allocations and every fixed keys/values split of the same budget) is
   evaluated by KL to the full-precision cache, through the real cache, on calibration windows held back from the
   fit. The best one is returned, with every score recorded in `config.calibration`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from huggingface_hub.utils import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .allocation import (
    VALIDATION_FINALISTS,
    Candidate,
    RaceResult,
    RungScore,
    RungTally,
    allocate_bits,
    allocate_from_table,
    check_budget,
    descent_candidates,
    fixed_candidates,
    successive_halving,
    validation_rungs,
)
from .config import ModelFingerprint, RateQuantConfig
from .data import load_text, text_fingerprint, tokenize_windows
from .distortion import CurveFit, fisher_distortion, fit_curves, output_distortion
from .distributed import Processes
from .evaluation import evaluate_quality, reference_and_prefix
from .footprint import REPORT_TOKENS, code_budget, layer_weights, true_bits_per_element
from .memory_guard import OutOfCalibrationMemory, available_bytes, saved_memory_limit
from .models import cache_kwargs, last_hidden_states, output_head
from .options import (
    OptionGrid,
    fixed_option_candidates,
    measuring_quantizers,
    near_candidates,
    option_candidates,
    option_table,
    window_costs,
)
from .quantizers import Quantizer, get_quantizer
from .record import CalibrationRecord, measure_description
from .settings import BUDGET_UNITS, DEFAULT_SINK_TOKENS, MEASURES, CacheLayout, CalibrationSettings, split_settings
from .split_attention import SplitAttention

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationData",
    "DEFAULT_SINK_TOKENS",
    "MEASURES",
    "Measurement",
    "OptionSpace",
    "allocation_candidates",
    "budget_weights",
    "calibrate",
    "calibration_candidates",
    "calibration_mode",
    "calibration_record",
    "calibration_windows",
    "candidate_config",
    "capture_states",
    "check_feasible",
    "fits_true_budget",
    "in_code_bits",
    "load_calibration_data",
    "measure_distortion",
    "measure_distortions",
    "measure_units",
    "option_space",
    "residual_split_mask",
    "residual_split_works",
    "resolve_settings",
    "validate_candidates",
]


@contextlib.contextmanager
def calibration_mode(model: Any):
    """Freeze the weights and switch to eval mode for a calibration pass; always restore both."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _CaptureLayer(DynamicLayer):
    """A cache layer that turns the states it receives into grad-requiring leaves and keeps them.

    With `split=True` attention gets every state twice, `[far copy, near copy]` along the token axis, and the mask
    from [`residual_split_mask`] lets each query read a key from the far copy exactly when the real cache would hold
    that key quantized. The gradient on the far copy is then the gradient of the loss through the quantized part of
    the cache only: local attention, which the full-precision residual window serves, carries no weight.
    """

    def __init__(self, split: bool = False, blank_far: bool = False):
        super().__init__()
        self.split, self.blank_far = split, blank_far  # blank_far: zeros for the far copy ([`residual_split_works`])

    def update(self, key_states, value_states, *args, **kwargs):
        keys = key_states.detach().requires_grad_(True)
        values = value_states.detach().requires_grad_(True)
        self.captured = (keys, values)
        if self.split:
            near_k, near_v = key_states.detach(), value_states.detach()
            far_k, far_v = (torch.zeros_like(near_k), torch.zeros_like(near_v)) if self.blank_far else (keys, values)
            return torch.cat([far_k, near_k], dim=-2), torch.cat([far_v, near_v], dim=-2)
        return keys, values


class _CaptureCache(DynamicCache):
    def __init__(self, num_layers: int, split: bool = False, blank_far: bool = False):
        super(DynamicCache, self).__init__(layers=[_CaptureLayer(split, blank_far) for _ in range(num_layers)])


_RECORDING_NAME = "ratequant_recording"


@dataclass
class _Recording:
    implementation: Any  # the model's own attention implementation, which does the work
    calls: list = field(default_factory=list)  # (module, query, key, value, mask, kwargs, output) per call


_ACTIVE: list[_Recording] = []


def _inner_attention(module: Any, implementation: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward to record attention with.")
    return eager


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that runs the model's own one and keeps its inputs and output."""
    rec = _ACTIVE[-1]
    inner = _inner_attention(module, rec.implementation)
    out, weights = inner(module, query, key, value, attention_mask, **kwargs)
    rec.calls.append((module, inner, query.detach(), key.detach(), value.detach(), attention_mask, kwargs, out))
    return out, weights


@contextlib.contextmanager
def _record_attention(model: Any):
    """Route every attention call of `model` through [`_recording_attention`]; always restore the implementation."""
    from transformers import AttentionInterface

    implementation = model.config._attn_implementation
    AttentionInterface.register(_RECORDING_NAME, _recording_attention)
    rec = _Recording(implementation)
    _ACTIVE.append(rec)
    try:
        model.set_attn_implementation(_RECORDING_NAME)
        yield rec.calls
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(implementation)


def residual_split_mask(
    seq_len: int, residual_length: int, group_size: int, fingerprint: ModelFingerprint, dtype: torch.dtype,
    device: torch.device | str = "cpu", sink_length: int = 0,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive attention masks `(1, 1, seq_len, 2 * seq_len)` over `[far copy, near copy]` of the keys.

    Query i reads key j < i from the far copy when the cache holds it quantized while token i is decoded (tokens
    `sink_length <= j` among the first `((i - residual_length) // group_size) * group_size`: the cache flushes whole
    groups once its full-precision window exceeds `residual_length`, and keeps the first `sink_length` as they are),
    and from the near copy otherwise. Each layer type keeps its own window (sliding or chunked attention). One tensor
    for single-type models, a `{layer_type: mask}` dict otherwise (what transformers' mixed-attention models accept).
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    quantized = ((i - residual_length).clamp_min(0) // group_size) * group_size
    far = (j < quantized) & (j >= sink_length)
    masks = {}
    for layer_type in dict.fromkeys(fingerprint.layer_types):
        allowed = j <= i
        window = fingerprint.window(layer_type)
        if window and layer_type == "chunked_attention":
            allowed &= (i // window) == (j // window)
        elif window:
            allowed &= (i - j) < window
        both = torch.cat([allowed & far, allowed & ~far], dim=1)
        mask = torch.zeros(both.shape, dtype=dtype, device=device).masked_fill_(~both, torch.finfo(dtype).min)
        masks[layer_type] = mask[None, None]
    return next(iter(masks.values())) if len(masks) == 1 else masks


def capture_states(
    model: Any, input_ids: torch.LongTensor, *, residual_length: int | None = None, group_size: int = 32,
    sink_length: int = 0, attention: bool = False, memory_limit: int | None = None,
) -> list[tuple]:
    """Post-RoPE keys and values of every layer with the gradient of the LM loss with respect to them.

    Args:
        residual_length (`int`, *optional*): when given, the gradients flow only through attention to keys the
            cache would hold quantized (see [`residual_split_mask`]); by default through all attention.
        sink_length (`int`, *optional*, defaults to 0): with `residual_length`, the first tokens the cache keeps
            as they are (no gradient flows to them).
        attention (`bool`, *optional*, defaults to `False`): also record every layer's attention (through a
            recording attention implementation that runs the model's own) for [`output_distortion`].
        memory_limit (`int`, *optional*): bytes the forward pass may save for its backward; past them it stops
            with [`OutOfCalibrationMemory`] (see [`saved_memory_limit`]).

    Returns:
        `list[tuple]`: per layer `(keys, values, key_grads, value_grads)`, each `(batch, kv_heads, tokens, head_dim)`;
        with `attention=True` a fifth element, `(attend, keys, values, grad_out, n_quantized)`: the arguments of
        [`output_distortion`] for that layer (only the queries that read quantized keys are recomputed).
    """
    fp = ModelFingerprint.from_model_config(model.config)
    split = residual_length is not None
    cache = _CaptureCache(fp.num_layers, split=split)
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)
    kwargs = {}
    if split:
        kwargs["attention_mask"] = residual_split_mask(ids.shape[1], residual_length, group_size, fp, model.dtype,
                                                       device, sink_length)
    recording = _record_attention(model) if attention else contextlib.nullcontext([])
    head = _chunked_head(model, ids)
    with calibration_mode(model), torch.enable_grad(), recording as calls:
        if head is None:
            with saved_memory_limit(memory_limit, model):
                out = model(input_ids=ids, labels=ids, use_cache=True, **cache_kwargs(model, cache), **kwargs)
            loss, roots, root_grads = out.loss, [out.loss * ids.shape[0]], None
        else:
            with saved_memory_limit(memory_limit, model):
                hidden = last_hidden_states(model, ids, use_cache=True, **cache_kwargs(model.get_decoder(), cache),
                                            **kwargs)
            loss, d_hidden = _chunked_loss(head, hidden, ids)
            roots, root_grads = [hidden], [d_hidden]
        if attention and len(calls) != fp.num_layers:
            raise ValueError(f"{fp.architecture}: {len(calls)} attention calls for {fp.num_layers} layers; the "
                             "attention-output measure needs one per layer (use measure='state').")
        missing = [i for i, layer in enumerate(cache.layers) if not hasattr(layer, "captured")]
        if missing:
            raise ValueError(
                f"{fp.architecture}: layers {missing} never wrote keys/values through the cache, so calibration "
                "cannot see their attention. Supported: models whose attention layers call `past_key_values.update`."
            )
        for i, layer in enumerate(cache.layers):
            for name, t in zip(("keys", "values"), layer.captured):
                if not torch.isfinite(t).all():
                    raise ValueError(f"Layer {i} produced non-finite {name} during calibration (inf or NaN): check "
                                     "the model's weights and dtype (float16 overflows are common; try bfloat16 or "
                                     "float32).")
        if not torch.isfinite(loss):
            raise ValueError(f"The calibration loss is {loss.item()}: the model produces non-finite outputs on "
                             "this data; check its dtype and weights.")
        leaves = [t for layer in cache.layers for t in layer.captured]
        # The sum over windows of each window's mean token loss: a window's gradients do not depend on which other
        # windows share its batch (so any batching, or sharding across processes, measures the same table).
        outputs = [call[-1] for call in calls]
        grads = torch.autograd.grad(roots, leaves + outputs, grad_outputs=root_grads, allow_unused=True)
    result = []
    seq_len = ids.shape[1]
    # The first query that reads any token from the quantized (far) copy; earlier rows see no quantization error.
    first = min(seq_len, residual_length + sink_length + group_size) if split else 0
    for i, layer in enumerate(cache.layers):
        k, v = layer.captured
        gk, gv = grads[2 * i], grads[2 * i + 1]
        row = (k.detach(), v.detach(), _or_zeros(gk, k), _or_zeros(gv, v))
        if attention:
            module, inner, query, key, value, mask, kw, output = calls[i]
            start = first if isinstance(mask, torch.Tensor) else 0  # a causal flag instead of a mask: every row
            q, m = query[:, :, start:], (mask[..., start:, :] if start else mask)

            attend = _layer_attention(module, inner, q, key, value, m, kw, output[:, start:], seq_len)

            g_out = _or_zeros(grads[len(leaves) + i], output)[:, start:]
            row += ((attend, key, value, g_out, seq_len),)
        result.append(row)
    return result


SPLIT_ATTENTION = True
"""Whether the attention-output measure recomputes only the far columns ([`SplitAttention`]) where it can; `False`
calls the model's own attention over every column for every option (the reference the tests compare with)."""
ATTEND_BLOCK = 64
"""Queries per block when the measure recomputes a layer's attention over the split ([`SplitAttention`])."""
_NOT_SOFTMAX = ("softcap", "s_aux", "sinks", "position_bias")


def _layer_attention(module: Any, inner: Callable, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: Any, kwargs: dict, output: torch.Tensor, n_far: int) -> Callable | SplitAttention:
    """What the attention-output measure recomputes one layer's attention with: a [`SplitAttention`] (only the far
    columns each query reads are recomputed per option) where the layer's attention is plain softmax attention under
    a mask, checked against the output the model's own implementation produced; otherwise `attend(keys, values)`,
    the model's own implementation called again."""
    def attend(keys, values):
        with torch.no_grad():
            return inner(module, query, keys, values, mask, **kwargs)[0]

    if not SPLIT_ATTENTION or not isinstance(mask, torch.Tensor) or mask.dim() != 4 or kwargs.get("dropout") or any(
            kwargs.get(name) is not None for name in _NOT_SOFTMAX):
        return attend
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    with torch.no_grad():
        split = SplitAttention(query, keys, values, mask, scaling, n_far, ATTEND_BLOCK)
        expected = output.detach().float()
        tol = (1e-4 if query.dtype == torch.float32 else 2e-2) * expected.abs().amax().clamp_min(1e-6)
        if split.base.shape != expected.shape or not (split.base - expected).abs().amax() <= tol:  # NaN: not equal
            logger.debug("%s: plain softmax attention does not reproduce the layer's output; the measure calls the "
                         "model's attention for every option", type(module).__name__)
            return attend
    return split


LOGITS_MAX_BYTES = 1 << 30
"""Above this many bytes of float32 logits per calibration batch (4 x 512 tokens x a 262k vocabulary: 2.1 GB, with
their gradient twice that), [`capture_states`] computes the loss a few tokens at a time from the last hidden states
instead of materialising them; the gradients are the same up to rounding."""
_LOSS_CHUNK = 256


def _chunked_head(model: Any, ids: torch.LongTensor) -> Callable | None:
    logits_bytes = ids.numel() * model.config.get_text_config().vocab_size * 4
    if logits_bytes <= LOGITS_MAX_BYTES:
        return None
    with calibration_mode(model):
        head = output_head(model, ids[:1, :16])
    if head is None:
        logger.warning("This model's logits are not its output layer applied to its hidden states: calibration "
                       "materialises all of them (%.1f GB per batch).", logits_bytes / 1e9)
    return head


def _chunked_loss(head: Callable, hidden: torch.Tensor, ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss `model(labels=ids).loss * batch` (the sum over windows of each window's mean next-token loss) and
    its gradient with respect to `hidden`, computed `_LOSS_CHUNK` positions at a time: only one chunk's logits
    (batch x chunk x vocabulary) exist at once."""
    detached = hidden.detach().requires_grad_(True)
    targets = ids[:, 1:].to(hidden.device)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, ids.shape[1] - 1, _LOSS_CHUNK):
        stop = min(start + _LOSS_CHUNK, ids.shape[1] - 1)
        logits = head(detached[:, start:stop]).float()
        part = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, start:stop].flatten(),
                                                 reduction="sum") / (ids.shape[1] - 1)
        part.backward()
        total += part.detach().double().cpu()
    return total, detached.grad


def residual_split_works(model: Any, input_ids: torch.LongTensor, residual_length: int, group_size: int) -> bool:
    """Whether `model` honours the split mask: with identical far and near copies its logits must not change, and
    with a blank far copy neither may those of the queries that read no far key (the first `residual_length +
    group_size`; an attention that ignores the mask reads the far copy there, whichever way it aligns its causal
    mask). Checked on the first `residual_length + 2 * group_size` tokens of one window, or past the shortest
    sliding window where one is shorter than the window."""
    fp = ModelFingerprint.from_model_config(model.config)
    device = model.get_input_embeddings().weight.device
    windows = [w for w in map(fp.window, dict.fromkeys(fp.layer_types)) if w and w < input_ids.shape[1]]
    ids = input_ids[:1, : max([residual_length + 2 * group_size] + [w + group_size for w in windows])].to(device)
    mask = residual_split_mask(ids.shape[1], residual_length, group_size, fp, model.dtype, device)
    near_only = residual_length + group_size  # queries before this read no far key

    def logits(**kwargs) -> torch.Tensor:
        return model(input_ids=ids, use_cache=True, **kwargs).logits

    with torch.no_grad():
        plain = logits(**cache_kwargs(model, _CaptureCache(fp.num_layers)))
        try:
            split = logits(attention_mask=mask, **cache_kwargs(model, _CaptureCache(fp.num_layers, split=True)))
            blank = logits(attention_mask=mask, **cache_kwargs(
                model, _CaptureCache(fp.num_layers, split=True, blank_far=True)))[:, :near_only]
        except Exception as err:  # any failure means the model cannot take the custom mask
            logger.debug("split-mask forward failed: %r", err)
            return False
    tol = 1e-3 if plain.dtype == torch.float32 else 5e-2
    return (split.shape == plain.shape and torch.allclose(split, plain, atol=tol, rtol=tol)
            and torch.allclose(blank, plain[:, :near_only], atol=tol, rtol=tol))


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.detach()


def measure_distortion(
    model: Any,
    windows: torch.LongTensor,
    quantizer: str,
    bit_grid: list[int],
    *,
    group_size: int = 32,
    batch_size: int = 4,
    residual_length: int | None = None,
    sink_length: int = 0,
    progress: bool = True,
    measure: str = "output",
) -> torch.Tensor:
    """Gradient-weighted distortion of every unit at every bit-width: float64 `(layers, kv_heads, 2, n_bits)`,
    `[..., 0, :]` keys and `[..., 1, :]` values, summed over `windows`. With `residual_length`, gradients flow only
    through the attention the cache serves from quantized tokens ([`capture_states`]), sink tokens excluded.
    `measure` is one of [`MEASURES`]."""
    return measure_distortions(model, windows, [quantizer], bit_grid, group_size=group_size, batch_size=batch_size,
                               residual_length=residual_length, sink_length=sink_length,
                               progress=progress, measure=measure)[quantizer]


def measure_distortions(
    model: Any,
    windows: torch.LongTensor,
    quantizers: list[str] | dict[str, Quantizer],
    bit_grid: list[int],
    *,
    group_size: int = 32,
    batch_size: int = 4,
    residual_length: int | None = None,
    sink_length: int = 0,
    progress: bool = True,
    measure: str = "output",
) -> dict[str, torch.Tensor]:
    """[`measure_distortion`] for several quantizer designs on the same captured states (one forward and backward
    pass per batch whatever the number of designs): `{quantizer: (layers, kv_heads, 2, n_bits)}`. `quantizers`
    names registered designs (built with `group_size`) or maps labels to built quantizers (e.g. one design at
    several group sizes); `group_size` is also the granularity of the residual-aware split."""
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}: choose one of {', '.join(MEASURES)}.")
    designs = dict(quantizers) if isinstance(quantizers, dict) else {
        name: get_quantizer(name, group_size) for name in quantizers}
    totals: dict[str, torch.Tensor] = {}
    limit = _saved_bytes_limit(model)
    bar = tqdm(total=windows.shape[0], desc=f"calibrate {', '.join(designs)}", disable=not progress)
    done = 0
    while done < windows.shape[0]:
        ids = windows[done : done + batch_size]
        try:
            states = capture_states(model, ids, residual_length=residual_length, group_size=group_size,
                                    sink_length=sink_length, attention=measure == "output", memory_limit=limit)
        except OutOfCalibrationMemory as err:
            batch_size = _smaller_batch(err, ids)
            continue
        done += ids.shape[0]
        bar.update(ids.shape[0])
        tables = _output_tables(states, designs, bit_grid) if measure == "output" else {
            name: torch.stack([
                torch.stack([_fisher_or_inf(k, gk, q, "key", bit_grid, _kinds(q)),
                             _fisher_or_inf(v, gv, q, "value", bit_grid, _kinds(q))], dim=1)
                for k, v, gk, gv, *_ in states
            ]) for name, q in designs.items()}  # (layers, kv_heads, 2, n_bits)
        for name, table in tables.items():
            totals[name] = table if name not in totals else totals[name] + table
    bar.close()
    return totals


def _kinds(q: Any) -> tuple[str, ...]:
    return getattr(q, "kinds", ("key", "value"))  # an option grid's group measures only the kinds that can take it


def _output_tables(states: list[tuple], designs: dict[str, Any], bit_grid: list[int]) -> dict[str, torch.Tensor]:
    """[`output_distortion`] of every design, layer by layer; the designs share each layer's exact output."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in designs}
    for *_, (attend, keys, values, grad_out, n_quantized) in states:
        shared = len(designs) > 1 and not isinstance(attend, SplitAttention)  # a SplitAttention keeps its own
        base = attend(keys, values).float() if shared else None
        for name, q in designs.items():
            rows[name].append(output_distortion(attend, keys, values, grad_out, n_quantized, q, bit_grid, _kinds(q),
                                                base))
    return {name: torch.stack(r) for name, r in rows.items()}  # (layers, kv_heads, 2, n_bits)


def _fisher_or_inf(states, grads, q, kind: str, bit_grid: list[int], kinds) -> torch.Tensor:
    if kind in kinds:
        return fisher_distortion(states, grads, q, kind, bit_grid)
    return torch.full((states.shape[1], len(bit_grid)), float("inf"), dtype=torch.float64, device=states.device)


SAVED_FRACTION = 0.5
"""Share of the memory free when measuring starts that one batch's forward pass may save for its backward (the
backward, the captured states and the attention recomputations need the rest)."""


def _saved_bytes_limit(model: Any) -> int | None:
    free = available_bytes(model.get_input_embeddings().weight.device)
    return None if free is None else int(free * SAVED_FRACTION)


def _smaller_batch(err: OutOfCalibrationMemory, ids: torch.LongTensor) -> int:
    """Half the batch that did not fit, with a warning; for a single window, the error that says what to change."""
    if ids.shape[0] == 1:
        raise MemoryError(
            f"Calibration does not fit in memory even one window at a time: {err} (half of the memory free when "
            f"measuring started) for one window of {ids.shape[1]} tokens. Shorten the windows (seq_len, "
            "--seq-len), free memory, or calibrate on a device with more."
        ) from None
    smaller = ids.shape[0] // 2
    logger.warning("A batch of %d windows of %d tokens does not fit in memory (%s): measuring %d at a time "
                   "(batch_size=%d; the table is the same).", ids.shape[0], ids.shape[1], err, smaller, smaller)
    return smaller


KEY_WEIGHTS = (4.0,)
"""Key weights of the `ratequant-keys-xW` candidates. With the state measure x0.25, x4 and x16 were tried; with the
attention-output measure x0.25 and x16 never won on the default model (12 budgets x designs), x4 twice."""


def allocation_candidates(
    distortion: torch.Tensor, bit_grid: list[int], budget: float, key_weights: tuple[float, ...] = KEY_WEIGHTS
) -> list[Candidate]:
    """The `"ratequant"` family: allocations of `budget` bits from a `(layers, kv_heads, 2, n_bits)` distortion
    table, each `(layers, kv_heads, 2)`:

    - `ratequant`: reverse waterfilling on the fitted per-unit curves (closed form);
    - `ratequant-measured`: the exact optimum of the measured table;
    - `ratequant-shrunk`: the measured table with each unit's log-distortion pulled halfway to the mean of its layer
      (same kind), which damps the noise of small calibration sets;
    - `ratequant-keys-xW` for W in `key_weights`: the measured table with every key unit's distortion times W. The
      gradient-weighted error is a first-order measure: it ranks units of one kind well but misjudges the exchange
      rate between key errors (which act through the softmax) and value errors (linear in the output), badly so for
      coarse per-token key quantization. Validation picks the rate.

    (kvq's fixed beta = 4 rule, a research comparison, is [`analysis.QuantizerCurves.kvq_allocation`].)
    """
    shape = distortion.shape[:-1]
    flat = distortion.reshape(-1, len(bit_grid))
    b_min, b_max = min(bit_grid), max(bit_grid)
    fit = fit_curves(flat, bit_grid)
    grid = torch.tensor(bit_grid)
    log_d = distortion.clamp_min(1e-30).log()
    layer_mean = log_d.mean(dim=1, keepdim=True)  # (layers, 1, 2, n_bits)
    shrunk = ((log_d + layer_mean) / 2).exp().reshape(-1, len(bit_grid))
    allocations = {
        "ratequant": allocate_bits(fit.alpha, fit.beta, budget, b_min, b_max),
        "ratequant-measured": allocate_from_table(flat, grid, budget),
        "ratequant-shrunk": allocate_from_table(shrunk, grid, budget),
    }
    for w in key_weights:
        weighted = distortion.clone()
        weighted[:, :, 0] *= w
        allocations[f"ratequant-keys-x{w:g}"] = allocate_from_table(weighted.reshape(-1, len(bit_grid)), grid, budget)
    return [Candidate(name, "ratequant", bits.reshape(shape)) for name, bits in allocations.items()]


def calibration_windows(
    tokenizer: Any, data: Any, *, seq_len: int, n_windows: int, column: str | None = None
) -> tuple[torch.LongTensor, str, str]:
    """`(n_windows, seq_len)` calibration token windows of `data` (WikiText-2 train by default, local text offline),
    with the text and a description of its source. Too little text is a clear error that says the minimum."""
    text, source = load_text(data, split="train", column=column)
    windows = tokenize_windows(tokenizer, text, seq_len=seq_len, n_windows=n_windows, min_windows=n_windows)
    return windows, text, source


@dataclass(frozen=True)
class CalibrationData:
    """The calibration windows this process works on: `fit` (measured) and `validation` (held back), with the
    text's `source`, its `text_sha256` and the token counts of all processes together."""

    fit: torch.LongTensor
    validation: torch.LongTensor
    source: str
    text_sha256: str
    fit_tokens: int
    validation_tokens: int


@dataclass(frozen=True)
class Measurement:
    """The measured distortion table `(layers, kv_heads, 2, n_bits)` (float64, CPU, summed over every process's
    windows) at the layout's group size, whether it is `residual_aware`, and the `seconds` it took. With
    `CalibrationSettings.groups`, also the table of every (bits, group) option `(layers, kv_heads, 2, n_options)`
    and its [`OptionGrid`]."""

    distortion: torch.Tensor
    residual_aware: bool
    seconds: float
    options: torch.Tensor | None = None
    grid: OptionGrid | None = None


def resolve_settings(
    quantizer: str | None = None, budget: float | None = None, *, layout: CacheLayout | None = None,
    settings: CalibrationSettings | None = None, **overrides: Any,
) -> tuple[CacheLayout, CalibrationSettings]:
    """The layout and settings `calibrate` runs with: `layout` and `settings` (defaults when None) with `quantizer`,
    `budget` and the [`CacheLayout`] / [`CalibrationSettings`] fields in `overrides` replaced, checked. The keyword
    `validate=False` (older spelling) means `n_validation=0`."""
    if not overrides.pop("validate", True):
        overrides["n_validation"] = 0
    return split_settings({"quantizer": quantizer, "budget": budget, **overrides}, layout, settings)


def in_code_bits(
    true_bits: float, layout: CacheLayout, settings: CalibrationSettings, fingerprint: ModelFingerprint
) -> CalibrationSettings:
    """`settings` with the budget of `true_bits` bits per stored element (scales and zero-points included)
    as the average code bits [`code_budget`] gives for `layout` on this model. A `ValueError` before any work when
    the model's units cannot store exactly that many. With 8-bit scales a unit's metadata is no whole fraction of a
    bit, so the code budget is the most code bits the units can average whose bytes fit (the allocation over
    bytes, [`option_space`], then spends the rest)."""
    layout.check_head_dim(fingerprint.head_dim)
    code = code_budget(true_bits, layout.quantizer, layout.group_size, fingerprint.head_dim, settings.b_min,
                       settings.b_max, layout.scale_bits)
    if layout.scale_bits != 16:
        n_units = 2 * fingerprint.num_layers * fingerprint.num_kv_heads
        code = max(math.floor(code * n_units + 1e-9) / n_units, settings.b_min)
    try:
        check_budget(code, 2 * fingerprint.num_layers * fingerprint.num_kv_heads, settings.b_min, settings.b_max)
    except ValueError as e:
        raise ValueError(f"{true_bits:g} true bits per element are {code:g} average code bits for {layout.quantizer} "
                         f"with G={layout.group_size} on this model: {e}") from None
    return dataclasses.replace(settings, budget=code)


def check_feasible(layout: CacheLayout, settings: CalibrationSettings, fingerprint: ModelFingerprint) -> None:
    """The checks that need the model but no data: its head_dim suits the layout, and its units can average
    exactly `settings.budget` bits. A `ValueError` before any text is loaded or the model run."""
    layout.check_head_dim(fingerprint.head_dim)
    n_units = 2 * fingerprint.num_layers * fingerprint.num_kv_heads
    check_budget(settings.budget, n_units, settings.b_min, settings.b_max)
    if settings.groups is not None:
        OptionGrid.build(layout, settings.groups, settings.bit_grid, fingerprint.head_dim)


def load_calibration_data(
    tokenizer: Any, data: Any, layout: CacheLayout, settings: CalibrationSettings, fingerprint: ModelFingerprint,
    processes: Processes,
) -> CalibrationData:
    """Load the `n_samples + n_validation` windows (every process the same), check that every process agrees on
    the model, data and settings, and take this process's share of the fit and validation windows."""
    s, fp = settings, fingerprint
    windows, text, source = processes.run(
        lambda: calibration_windows(tokenizer, data, seq_len=s.seq_len, n_windows=s.n_samples + s.n_validation,
                                    column=s.data_column), "loading the calibration data")
    sha = text_fingerprint(text)
    processes.agree((fp.geometry(), fp.layer_types, fp.model_type, sha, tuple(windows.shape), layout.quantizer,
                     s.budget, layout.group_size, layout.residual_length, layout.sink_length, layout.scale_bits,
                     s.b_min, s.b_max, s.measure, s.groups, s.budget_context), "model, data or settings")
    fit, validation = windows[: s.n_samples], windows[s.n_samples :]
    return CalibrationData(processes.shard(fit, "calibration"), processes.shard(validation, "validation"), source,
                           sha, int(fit.numel()), int(validation.numel()))


def measure_units(
    model: Any, windows: torch.LongTensor, layout: CacheLayout, settings: CalibrationSettings, *,
    processes: Processes, progress: bool = True,
) -> Measurement:
    """[`measure_distortion`] of `layout`'s quantizer on this process's `windows`, summed over the processes.

    Residual-aware (when asked) only if the model honours the split mask; otherwise a warning, and the error is
    weighted by all attention.
    """
    start = time.perf_counter()
    aware = settings.residual_aware
    if aware and not residual_split_works(model, windows, layout.residual_length, layout.group_size):
        logger.warning("%s does not honour a custom attention mask: the distortion is weighted by all attention, "
                       "including the residual window the cache keeps in full precision.",
                       ModelFingerprint.from_model_config(model.config).architecture)
        aware = False
    processes.agree(aware, "residual-aware measure")
    grid = None
    if settings.groups is None:
        designs: dict[str, Any] = {layout.quantizer: get_quantizer(layout.quantizer, layout.group_size,
                                                                   layout.scale_bits)}
    else:
        head_dim = ModelFingerprint.from_model_config(model.config).head_dim
        grid = OptionGrid.build(layout, settings.groups, settings.bit_grid, head_dim)
        designs = measuring_quantizers(grid)
    tables = processes.run(lambda: measure_distortions(
        model, windows, designs, settings.bit_grid, group_size=layout.group_size,
        batch_size=settings.batch_size, residual_length=layout.residual_length if aware else None,
        sink_length=layout.sink_length, progress=progress and processes.is_main, measure=settings.measure,
    ), "measuring the distortion")
    # Measured on the model's device; the fit and allocation are CPU math.
    tables = {name: processes.sum(t).cpu() for name, t in tables.items()}
    if grid is None:
        return Measurement(tables[layout.quantizer], aware, time.perf_counter() - start)
    options = option_table(tables, grid)
    n_bits = len(settings.bit_grid)
    own = torch.stack([options[:, :, k, grid.own_index(kind) * n_bits : (grid.own_index(kind) + 1) * n_bits]
                       for k, kind in enumerate(("key", "value"))], dim=2)
    return Measurement(own, aware, time.perf_counter() - start, options, grid)


def budget_weights(layout: CacheLayout, fingerprint: ModelFingerprint, true_budget: float | None,
                   tokens: int = REPORT_TOKENS) -> list[int] | None:
    """What an element of each layer weighs in a budget of `true_budget` true bits per element: the tokens each
    layer quantizes at `tokens` tokens (`CalibrationSettings.budget_context`, [`footprint.layer_weights`]), so that
    the budget counts the bytes the cache holds there. None for a budget in code bits (an average over units, as
    in the paper) and where every layer weighs the same (no sliding-window layers)."""
    if true_budget is None:
        return None
    weights = layer_weights(layout, fingerprint, tokens)
    return weights if len(set(weights)) > 1 else None


def fits_true_budget(candidate: Candidate, layout: CacheLayout, fingerprint: ModelFingerprint,
                     true_budget: float, tokens: int = REPORT_TOKENS) -> bool:
    """Whether a candidate at the layout's group sizes stores at most `true_budget` bits per element at `tokens`
    tokens, each layer's elements weighed by the tokens it holds ([`budget_weights`]). The allocations over group
    sizes are made within the budget (their longer windows included), so they always fit; so do the fixed
    splits."""
    if candidate.groups is not None:
        return True
    config = RateQuantConfig.from_bits(candidate.bits, layout, fingerprint=fingerprint)
    held = true_bits_per_element(config, fingerprint.head_dim, fingerprint=fingerprint, tokens=tokens)
    return held <= true_budget + 1e-9


def calibration_candidates(
    distortion: torch.Tensor, settings: CalibrationSettings, fingerprint: ModelFingerprint,
    space: OptionSpace | None = None, true_budget: float | None = None, layout: CacheLayout | None = None,
) -> list[Candidate]:
    """What validation races first: the [`allocation_candidates`], then every fixed split of the budget. With the
    [`option_space`] of a budget of `true_budget` true bits per element, also the exact allocations over its
    options and every fixed (bits, group) pair of the same bytes; with the `layout`, the bytes include the longer
    window of layers whose keys take larger token groups, at `settings.budget_context` tokens
    ([`options.window_costs`]).

    Where the space weighs layers by the tokens they hold (sliding-window layers, [`budget_weights`]), the exact
    allocations weigh them so (over the layout's own group sizes when no others were measured), and a bits-only
    candidate that would hold more bytes than the budget is left out ([`fits_true_budget`])."""
    s = settings
    out = (allocation_candidates(distortion, s.bit_grid, s.budget)
           + fixed_candidates(fingerprint.num_layers, fingerprint.num_kv_heads, s.budget, s.b_min, s.b_max))
    if space is not None:
        chosen = option_candidates(space.options, space.grid, true_budget, KEY_WEIGHTS, space.charges, space.weights)
        out += [dataclasses.replace(c, groups=None) for c in chosen] if space.own_groups else chosen
        out += fixed_option_candidates(space.grid, true_budget, fingerprint.num_layers, fingerprint.num_kv_heads,
                                       space.charges, space.weights)
    if space is not None and space.weights is not None:
        out = [c for c in out if fits_true_budget(c, layout, fingerprint, true_budget, s.budget_context)]
    return out


@dataclass(frozen=True)
class OptionSpace:
    """What a budget in true bits allocates over: the option `grid` and its measured `options` table, each layer's
    window `charges` ([`options.window_costs`], None without a layout), the layers' `weights` ([`budget_weights`],
    None when equal) and whether the grid holds only the layout's own groups (`own_groups`: measured without
    `groups`, allocated over bits alone, by bytes)."""

    grid: OptionGrid
    options: torch.Tensor
    charges: torch.Tensor | None
    weights: list[int] | None
    own_groups: bool


def option_space(
    distortion: torch.Tensor, settings: CalibrationSettings, fingerprint: ModelFingerprint,
    measured: Measurement | None, true_budget: float | None, layout: CacheLayout | None,
) -> OptionSpace | None:
    """The [`OptionSpace`] of a calibration: the measured (bits, group) options with a budget in true bits, or the
    layout's own groups where layers weigh differently in bytes or scales are coded in 8 bits; None where the
    budget counts code bits per unit over the layout's groups (the bits-only candidates alone)."""
    grid, options = (measured.grid, measured.options) if measured is not None else (None, None)
    if true_budget is None:
        if grid is not None:
            raise ValueError("A measurement over group sizes is allocated under a budget in true bits per element: "
                             "pass true_budget.")
        return None
    weights = None if layout is None else budget_weights(layout, fingerprint, true_budget, settings.budget_context)
    coded = layout is not None and layout.scale_bits != 16  # bytes no code budget states exactly
    own_groups = grid is None and (weights is not None or coded)
    if own_groups:
        grid = OptionGrid.build(layout, (), settings.bit_grid, fingerprint.head_dim)
        options = option_table({f"g{g}": distortion for g in grid.groups}, grid)
    if grid is None:
        return None
    charges = None if layout is None else window_costs(grid, layout, fingerprint, settings.budget_context)
    return OptionSpace(grid, options, charges, weights, own_groups)


def candidate_config(
    bits: torch.Tensor, layout: CacheLayout, settings: CalibrationSettings, fingerprint: ModelFingerprint,
    method: str, groups: torch.Tensor | None = None,
) -> RateQuantConfig:
    """The config of one allocation (bits, and group sizes where it chose them) under calibration's layout, budget
    and bounds."""
    return RateQuantConfig.from_bits(bits, layout, fingerprint=fingerprint, method=method, budget=settings.budget,
                                     b_min=settings.b_min, b_max=settings.b_max, groups=groups)


def _kl_scorer(
    model: Any, parts: list[torch.LongTensor], layout: CacheLayout, settings: CalibrationSettings,
    fingerprint: ModelFingerprint, processes: Processes, bar: Any,
) -> RungScore:
    """The [`successive_halving`] scorer: KL to the full-precision cache through the real cache, on rung `r`'s
    windows `parts[r]` (summed over processes), stopped once past the race's bound (one process only: with
    several, no process sees the whole sum). The reference and the exact shared start of a rung's windows are
    computed once, in one pass ([`reference_and_prefix`]), when the rung is first scored."""
    s, reference, prefixes = settings, {}, {}
    template = candidate_config(torch.full((fingerprint.num_layers, fingerprint.num_kv_heads, 2), s.b_min), layout,
                                s, fingerprint, "ratequant")

    def kl_sum(candidate: Candidate, rung: int, stop_above: float) -> torch.Tensor:  # KL sum, tokens, complete
        if rung not in reference:
            reference[rung], prefixes[rung] = reference_and_prefix(model, parts[rung], template, chunk=s.chunk,
                                                                   batch_size=s.batch_size)
        config = candidate_config(candidate.bits, layout, s, fingerprint, "candidate", candidate.groups)
        stop = stop_above if processes.count == 1 and math.isfinite(stop_above) else None
        res = evaluate_quality(model, parts[rung], config, chunk=s.chunk, batch_size=s.batch_size, progress=False,
                               reference=reference[rung], prefix=prefixes[rung], stop_above=stop)
        bar.update()
        tokens = parts[rung].shape[0] * (parts[rung].shape[1] - 1)  # every window predicts all but its first token
        return torch.tensor([res.kl * res.tokens, tokens, res.complete], dtype=torch.float64)

    def score(candidate: Candidate, rung: int, stop_above: float) -> RungTally:
        total = processes.sum(processes.run(lambda: kl_sum(candidate, rung, stop_above), "validating the candidates"))
        return RungTally(float(total[0]), float(total[1]), bool(total[2] == processes.count))

    return score


def modelled_distortion(candidate: Candidate, distortion: torch.Tensor, bit_grid: list[int],
                        space: OptionSpace | None = None) -> float:
    """The measured distortion of `candidate`'s allocation summed over its units (what the allocations minimise): the
    `(layers, kv_heads, 2, n_bits)` table at the layout's groups, the `space`'s options where the candidate chose
    group sizes. Validation scores the candidates in this order, the likeliest first."""
    if candidate.groups is None:
        return float(distortion.gather(-1, (candidate.bits - bit_grid[0]).unsqueeze(-1)).sum())
    index = space.grid.option_indices(candidate.bits, candidate.groups)
    return float(space.options.gather(-1, index.unsqueeze(-1)).sum())


def validate_candidates(
    model: Any, windows: torch.LongTensor, candidates: list[Candidate], distortion: torch.Tensor,
    layout: CacheLayout, settings: CalibrationSettings, fingerprint: ModelFingerprint, *,
    processes: Processes, progress: bool = True, descend_from: Callable[[Candidate], list[Candidate]] | None = None,
    space: OptionSpace | None = None,
) -> RaceResult:
    """Race `candidates` by KL through the real cache on this process's validation `windows` ([`successive_halving`]
    on [`validation_rungs`]; one rung when several processes share the windows), each rung's candidates in the order
    of their [`modelled_distortion`] (over the `space`'s options where they chose group sizes), so that the race
    can stop the hopeless ones early. After the first rung the candidates near the best fixed split join the race:
    `descend_from(split)`, by default the [`descent_candidates`] on `distortion` (a budget in bytes whose layers
    weigh differently passes [`options.near_candidates`])."""
    rungs = validation_rungs(len(windows)) if processes.count == 1 else [len(windows)]
    bounds = [sum(rungs[:i]) for i in range(len(rungs) + 1)]
    parts = [windows[a:b] for a, b in zip(bounds, bounds[1:])]

    def descend(scores: dict[str, float]) -> list[Candidate]:
        fixed = [c for c in candidates if c.is_fixed_split]
        if not fixed:
            return []
        best = min(fixed, key=lambda c: scores[c.name])
        if descend_from is not None:
            return descend_from(best)
        return descent_candidates(distortion, settings.bit_grid, best)

    def order(c: Candidate) -> float:
        return modelled_distortion(c, distortion, settings.bit_grid, space)

    with tqdm(desc=f"validating {len(candidates)} candidates", unit="cache",
              disable=not (progress and processes.is_main)) as bar:
        score = _kl_scorer(model, parts, layout, settings, fingerprint, processes, bar)
        race = successive_halving(candidates, rungs, score, finalists=VALIDATION_FINALISTS, extend=descend,
                                  order=order)
    for name, kl in race.scores.items():
        logger.info("validation KL %-26s %s%.5f (%d of %d windows)", name, ">" if name in race.stopped else " ", kl,
                    race.windows[name], len(windows))
    return race


def calibration_record(
    data: CalibrationData, measured: Measurement, fit: CurveFit, settings: CalibrationSettings,
    candidates: list[Candidate], race: RaceResult | None, *, validate_s: float, total_s: float, processes: int,
    true_budget: float | None = None, weights: list[int] | None = None,
) -> CalibrationRecord:
    """What the calibration did ([`CalibrationRecord`]); `race` is None when nothing was validated (the closed-form
    `ratequant` allocation wins, or under a budget in bytes whose layers weigh differently, `ratequant-options`, the
    exact allocation by bytes) and `candidates` every candidate considered."""
    winner = race.winner if race else ("ratequant-options" if weights else "ratequant")
    scores = race.scores if race else {}
    families = {c.name: c.family for c in candidates}
    best_fixed = min((kl for name, kl in scores.items() if families[name] == "fixed"), default=None)
    return CalibrationRecord(
        source=data.source, text_sha256=data.text_sha256, fit_tokens=data.fit_tokens,
        validation_tokens=data.validation_tokens, seq_len=settings.seq_len,
        measure=measure_description(settings.measure, measured.residual_aware),
        residual_aware=measured.residual_aware, bit_grid=settings.bit_grid, winner=winner,
        validation_kl=dict(scores), validation_finalists=list(race.finalists) if race else [],
        validation_windows=dict(race.windows) if race else {},
        validation_stopped=list(race.stopped) if race else [],
        gain_vs_best_fixed=(1 - scores[winner] / best_fixed) if best_fixed else None,
        beta_median={"key": float(fit.beta[:, :, 0].median()), "value": float(fit.beta[:, :, 1].median())},
        fit_r2_median=float(fit.r2.median()),
        seconds={"measure": measured.seconds, "validate": validate_s, "total": total_s}, processes=processes,
        candidates={c.name: c.bits.tolist() for c in candidates if c.family != "fixed"}, families=families,
        true_budget=true_budget, group_grid=list(measured.grid.groups) if measured.grid else [],
        candidate_groups={c.name: c.groups.tolist() for c in candidates
                          if c.family != "fixed" and c.groups is not None},
        window_tokens=(settings.budget_context if measured.grid is not None and len(measured.grid.flush_blocks()) > 1
                       else None),
        layer_weights=list(weights or []), budget_context=settings.budget_context if true_budget is not None else None,
    )


def calibrate(
    model: Any, tokenizer: Any, data: Any = None, quantizer: str | None = None, budget: float | None = None, *,
    layout: CacheLayout | None = None, settings: CalibrationSettings | None = None, budget_unit: str = "code",
    progress: bool = True, **overrides: Any,
) -> RateQuantConfig:
    """Calibrate a RateQuant allocation of `budget` average bits for `quantizer` on `model`.

    The stages, each usable alone: [`resolve_settings`] and [`check_feasible`] (before any data is loaded),
    [`load_calibration_data`], [`measure_units`], [`fit_curves`], [`calibration_candidates`],
    [`validate_candidates`], [`calibration_record`].

    Args:
        model (`PreTrainedModel`): the causal LM.
        tokenizer (`PreTrainedTokenizer`): its tokenizer.
        data (*optional*): calibration text: WikiText-2 train through `datasets` by default (local Python docs
            text offline, with a warning), a `datasets` name (`"name"` or `"name:config"`, text column
            `data_column`, default `"text"`), a text file or a list of strings.
        quantizer (`str`, *optional*): registered quantizer design (default `layout.quantizer`, `"kivi"`).
        budget (`float`, *optional*): average bits over all units (default `settings.budget`, 2.5), counted as
            `budget_unit` says.
        layout ([`CacheLayout`], *optional*): quantizer, group size, residual window and sinks of the cache (the
            measure and the validation both see the cache with them).
        settings ([`CalibrationSettings`], *optional*): what is measured, on how many windows, and how.
        budget_unit (`str`, *optional*, defaults to `"code"`): one of [`BUDGET_UNITS`]: `"code"`, average code bits
            per unit; `"true"`, bits per stored element with the scales and zero-points included, turned
            into code bits by [`in_code_bits`] (the config records the code bits); on a model with sliding-window
            layers each layer's elements count by the tokens it holds at `budget_context` tokens (4096 by default,
            [`budget_weights`]).
        progress (`bool`, *optional*, defaults to `True`): progress bars for the measure and the validation.
        overrides: any field of [`CacheLayout`] or [`CalibrationSettings`] (`n_samples`, `seq_len`, `n_validation`,
            `group_size`, `residual_length`, `sink_length`, `scale_bits`, `b_min`, `b_max`, `batch_size`, `chunk`,
            `measure`, `residual_aware`, `data_column`, `groups`, `budget_context`; None keeps the default), or
            `validate=False` for `n_validation=0`.

    Returns:
        [`RateQuantConfig`]: the winning allocation, with the fitted curves and the [`CalibrationRecord`] (as a
        dict) in `config.calibration`.

    Example:
        >>> config = calibrate(model, tokenizer, quantizer="kivi", budget=2.5)
        >>> config.save_pretrained("smollm2-ratequant-kivi-2.5")
    """
    start = time.perf_counter()
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit={budget_unit!r} must be one of {', '.join(BUDGET_UNITS)}.")
    true_bits = None
    if budget_unit == "true":
        true_bits, budget = (budget if budget is not None else (settings or CalibrationSettings()).budget), None
    layout, settings = resolve_settings(quantizer, budget, layout=layout, settings=settings, **overrides)
    fp = ModelFingerprint.from_model_config(model.config)
    if settings.groups is not None and true_bits is None:
        raise ValueError(f"groups={list(settings.groups)} lets every unit choose its group size, which changes its "
                         "bytes: give the budget in true bits per element (budget_unit='true', or --budget-unit "
                         "true on the command line).")
    if true_bits is None and settings.budget_context != REPORT_TOKENS:
        raise ValueError(f"budget_context={settings.budget_context} says at which context a budget in bytes counts "
                         "them; a budget in code bits is an average over units and has none: give the budget in "
                         "true bits per element (budget_unit='true', or --budget-unit true on the command line).")
    if true_bits is not None:
        settings = in_code_bits(true_bits, layout, settings, fp)
    check_feasible(layout, settings, fp)
    procs = Processes()
    data = load_calibration_data(tokenizer, data, layout, settings, fp, procs)
    measured = measure_units(model, data.fit, layout, settings, processes=procs, progress=progress)
    fit = fit_curves(measured.distortion, settings.bit_grid)
    space = option_space(measured.distortion, settings, fp, measured, true_bits, layout)
    candidates = calibration_candidates(measured.distortion, settings, fp, space, true_bits, layout)
    t0, race = time.perf_counter(), None
    weights = space.weights if space is not None else None
    if len(data.validation):
        descend_from = None
        if weights is not None:  # steps from the best fixed split that keep the bytes
            def descend_from(origin: Candidate) -> list[Candidate]:
                return near_candidates(space.options, space.grid, true_bits, origin, space.charges, weights)
        race = validate_candidates(model, data.validation, candidates, measured.distortion, layout, settings, fp,
                                   processes=procs, progress=progress, descend_from=descend_from, space=space)
        candidates += [c for c in race.entrants if c.family == "descent"]
    else:
        candidates = [c for c in candidates if c.family == "ratequant"]
    validate_s = time.perf_counter() - t0
    record = calibration_record(data, measured, fit, settings, candidates, race, validate_s=validate_s,
                                total_s=time.perf_counter() - start, processes=procs.count, true_budget=true_bits,
                                weights=weights)
    winner = next(c for c in candidates if c.name == record.winner)
    config = candidate_config(winner.bits, layout, settings, fp, winner.name, winner.groups)
    config.calibration = record.to_dict()
    config.curves = {"alpha": fit.alpha.float(), "beta": fit.beta.float(), "r2": fit.r2.float(),
                     "distortion": measured.distortion.float(), "bit_grid": torch.tensor(settings.bit_grid)}
    if measured.grid is not None:  # every option's distortion, options group-major (group_grid x bit_grid)
        config.curves.update(option_distortion=measured.options.float(),
                             group_grid=torch.tensor(measured.grid.groups))
    logger.info("calibration: %s won (validation KL %s), %.1f s", record.winner, record.validation_kl.get(
        record.winner), time.perf_counter() - start)
    return config
