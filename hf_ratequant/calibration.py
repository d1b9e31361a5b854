"""Calibration: measure how much each (layer, kv-head, key/value) unit's quantization hurts, fit its curve, allocate.

1. **Capture.** A forward and backward pass over calibration windows with a capturing cache: its layers receive the
   post-RoPE keys and values through transformers' own cache API (so every architecture the cache serves is seen),
   make them leaves that require grad, and keep them with their gradients. Model weights are frozen for the pass and
   restored afterwards (`calibration_mode`).
2. **Measure.** For every unit and bit-width in play, the gradient-weighted error that the real quantizer causes in
   the layer's attention output, attention recomputed with the quantized states ([`output_distortion`]; or in the
   states themselves, [`fisher_distortion`]); fit D_u(b) = alpha_u * beta_u^(-b) per unit ([`fit_curves`]).
3. **Allocate** by reverse waterfilling ([`allocate_bits`]) and, exactly, from the measured table.
4. **Validate.** Every candidate (RateQuant allocations and every fixed keys/values split of the same budget) is
   evaluated by KL to the full-precision cache, through the real cache, on calibration windows held back from the
   fit. The best one is returned, with every score recorded in `config.calibration`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from huggingface_hub.utils import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .allocation import allocate_bits, allocate_from_table, descent_path, fixed_allocations
from .config import ModelFingerprint, RateQuantConfig
from .data import load_text, text_fingerprint, tokenize_windows
from .distortion import fisher_distortion, fit_curves, fixed_beta_fit, output_distortion
from .distributed import Processes
from .evaluation import SharedPrefix, evaluate_quality, reference_logprobs, shared_prefix
from .quantizers import get_quantizer

logger = logging.getLogger(__name__)

__all__ = [
    "allocation_candidates",
    "calibrate",
    "calibration_mode",
    "calibration_windows",
    "capture_states",
    "measure_distortion",
    "measure_distortions",
    "residual_split_mask",
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

    def __init__(self, split: bool = False):
        super().__init__()
        self.split = split

    def update(self, key_states, value_states, *args, **kwargs):
        keys = key_states.detach().requires_grad_(True)
        values = value_states.detach().requires_grad_(True)
        self.captured = (keys, values)
        if self.split:
            near_k, near_v = key_states.detach(), value_states.detach()
            return torch.cat([keys, near_k], dim=-2), torch.cat([values, near_v], dim=-2)
        return keys, values


class _CaptureCache(DynamicCache):
    def __init__(self, num_layers: int, split: bool = False):
        super(DynamicCache, self).__init__(layers=[_CaptureLayer(split) for _ in range(num_layers)])


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
    sink_length: int = 0, attention: bool = False,
) -> list[tuple]:
    """Post-RoPE keys and values of every layer with the gradient of the LM loss with respect to them.

    Args:
        residual_length (`int`, *optional*): when given, the gradients flow only through attention to keys the
            cache would hold quantized (see [`residual_split_mask`]); by default through all attention.
        sink_length (`int`, *optional*, defaults to 0): with `residual_length`, the first tokens the cache keeps
            as they are (no gradient flows to them).
        attention (`bool`, *optional*, defaults to `False`): also record every layer's attention (through a
            recording attention implementation that runs the model's own) for [`output_distortion`].

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
    with calibration_mode(model), torch.enable_grad(), recording as calls:
        out = model(input_ids=ids, labels=ids, past_key_values=cache, use_cache=True, **kwargs)
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
        if not torch.isfinite(out.loss):
            raise ValueError(f"The calibration loss is {out.loss.item()}: the model produces non-finite outputs on "
                             "this data; check its dtype and weights.")
        leaves = [t for layer in cache.layers for t in layer.captured]
        # The sum over windows of each window's mean token loss: a window's gradients do not depend on which other
        # windows share its batch (so any batching, or sharding across processes, measures the same table).
        outputs = [call[-1] for call in calls]
        grads = torch.autograd.grad(out.loss * ids.shape[0], leaves + outputs, allow_unused=True)
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

            def attend(keys, values, module=module, inner=inner, q=q, m=m, kw=kw):
                with torch.no_grad():
                    return inner(module, q, keys, values, m, **kw)[0]

            g_out = _or_zeros(grads[len(leaves) + i], output)[:, start:]
            row += ((attend, key, value, g_out, seq_len),)
        result.append(row)
    return result


def residual_split_works(model: Any, input_ids: torch.LongTensor, residual_length: int, group_size: int) -> bool:
    """Whether `model` honours the split mask: with identical far and near copies its logits must not change."""
    fp = ModelFingerprint.from_model_config(model.config)
    device = model.get_input_embeddings().weight.device
    ids = input_ids[:1].to(device)
    mask = residual_split_mask(ids.shape[1], residual_length, group_size, fp, model.dtype, device)
    with torch.no_grad():
        plain = model(input_ids=ids, past_key_values=_CaptureCache(fp.num_layers), use_cache=True).logits
        try:
            split = model(input_ids=ids, past_key_values=_CaptureCache(fp.num_layers, split=True), use_cache=True,
                          attention_mask=mask).logits
        except Exception as err:  # any failure means the model cannot take the custom mask
            logger.debug("split-mask forward failed: %r", err)
            return False
    tol = 1e-3 if plain.dtype == torch.float32 else 5e-2
    return split.shape == plain.shape and torch.allclose(split, plain, atol=tol, rtol=tol)


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.detach()


MEASURES = ("output", "state")
"""`"output"`: gradient-weighted error of the attention output recomputed with the quantized states
([`output_distortion`]); `"state"`: gradient-weighted error of the states themselves ([`fisher_distortion`])."""


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
    quantizers: list[str],
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
    pass per batch whatever the number of designs): `{quantizer: (layers, kv_heads, 2, n_bits)}`."""
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}: choose one of {', '.join(MEASURES)}.")
    designs = {name: get_quantizer(name, group_size) for name in quantizers}
    totals: dict[str, torch.Tensor] = {}
    desc = f"calibrate {', '.join(quantizers)}"
    for ids in tqdm(torch.split(windows, batch_size), desc=desc, disable=not progress):
        states = capture_states(model, ids, residual_length=residual_length, group_size=group_size,
                                sink_length=sink_length, attention=measure == "output")
        for name, q in designs.items():
            if measure == "output":
                table = torch.stack([output_distortion(*row[4], q, bit_grid) for row in states])
            else:
                table = torch.stack([
                    torch.stack([fisher_distortion(k, gk, q, "key", bit_grid),
                                 fisher_distortion(v, gv, q, "value", bit_grid)], dim=1)
                    for k, v, gk, gv in states
                ])  # (layers, kv_heads, 2, n_bits)
            totals[name] = table if name not in totals else totals[name] + table
    return totals


DEFAULT_SINK_TOKENS = 32
"""`calibrate`'s default attention sinks: at least this many first tokens, rounded up to whole groups."""
KEY_WEIGHTS = (4.0,)
"""Key weights of the `ratequant-keys-xW` candidates. With the state measure x0.25, x4 and x16 were tried; with the
attention-output measure x0.25 and x16 never won on the default model (12 budgets x designs), x4 twice."""
def validation_rungs(n_windows: int) -> list[int]:
    """How successive halving splits `n_windows` validation windows into rungs: a quarter, a quarter and the half
    left from 8 windows on, two halves from 4, one rung below that. Candidates scored on the first rung are cut to
    `VALIDATION_FINALISTS` x 2 before the second and to `VALIDATION_FINALISTS` before the third."""
    if n_windows >= 8:
        return [n_windows // 4, n_windows // 4, n_windows - 2 * (n_windows // 4)]
    if n_windows >= 4:
        return [n_windows // 2, n_windows - n_windows // 2]
    return [n_windows]


DESCENT_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
"""How far along the descent from the best fixed split (towards the measured optimum) the extra candidates lie."""
VALIDATION_FINALISTS = 3
"""Candidates scored on every validation window; the others only on the first rungs (see [`validation_rungs`])."""


def allocation_candidates(
    distortion: torch.Tensor, bit_grid: list[int], budget: float, key_weights: tuple[float, ...] = KEY_WEIGHTS
) -> dict[str, torch.LongTensor]:
    """Allocations of `budget` bits from a `(layers, kv_heads, 2, n_bits)` distortion table, each `(layers,
    kv_heads, 2)`:

    - `ratequant`: reverse waterfilling on the fitted per-unit curves (closed form);
    - `ratequant-measured`: the exact optimum of the measured table;
    - `ratequant-shrunk`: the measured table with each unit's log-distortion pulled halfway to the mean of its layer
      (same kind), which damps the noise of small calibration sets;
    - `ratequant-keys-xW` for W in `key_weights`: the measured table with every key unit's distortion times W. The
      gradient-weighted error is a first-order measure: it ranks units of one kind well but misjudges the exchange
      rate between key errors (which act through the softmax) and value errors (linear in the output), badly so for
      coarse per-token key quantization. Validation picks the rate;
    - `kvq-beta4`: kvq's fixed beta = 4 rule applied to the same measurements (recorded for comparison, not
      validated and never returned).
    """
    shape = distortion.shape[:-1]
    flat = distortion.reshape(-1, len(bit_grid))
    b_min, b_max = min(bit_grid), max(bit_grid)
    fit = fit_curves(flat, bit_grid)
    grid = torch.tensor(bit_grid)
    log_d = distortion.clamp_min(1e-30).log()
    layer_mean = log_d.mean(dim=1, keepdim=True)  # (layers, 1, 2, n_bits)
    shrunk = ((log_d + layer_mean) / 2).exp().reshape(-1, len(bit_grid))
    kvq = fixed_beta_fit(flat, bit_grid, 4.0)
    candidates = {
        "ratequant": allocate_bits(fit.alpha, fit.beta, budget, b_min, b_max),
        "ratequant-measured": allocate_from_table(flat, grid, budget),
        "ratequant-shrunk": allocate_from_table(shrunk, grid, budget),
    }
    for w in key_weights:
        weighted = distortion.clone()
        weighted[:, :, 0] *= w
        candidates[f"ratequant-keys-x{w:g}"] = allocate_from_table(weighted.reshape(-1, len(bit_grid)), grid, budget)
    candidates["kvq-beta4"] = allocate_bits(kvq.alpha, kvq.beta, budget, b_min, b_max)
    return {name: bits.reshape(shape) for name, bits in candidates.items()}


def calibration_windows(
    tokenizer: Any, data: Any, *, seq_len: int, n_windows: int, column: str | None = None
) -> tuple[torch.LongTensor, str, str]:
    """`(n_windows, seq_len)` calibration token windows of `data` (WikiText-2 train by default, local text offline),
    with the text and a description of its source. Too little text is a clear error that says the minimum."""
    text, source = load_text(data, split="train", column=column)
    windows = tokenize_windows(tokenizer, text, seq_len=seq_len, n_windows=n_windows, min_windows=n_windows)
    return windows, text, source


def _config_from_bits(bits: torch.Tensor, template: RateQuantConfig, method: str) -> RateQuantConfig:
    return RateQuantConfig(
        key_bits=bits[:, :, 0].tolist(),
        value_bits=bits[:, :, 1].tolist(),
        quantizer=template.quantizer,
        group_size=template.group_size,
        residual_length=template.residual_length,
        sink_length=template.sink_length,
        budget=template.budget,
        b_min=template.b_min,
        b_max=template.b_max,
        method=method,
        fingerprint=template.fingerprint,
    )


def calibrate(
    model: Any,
    tokenizer: Any,
    data: Any = None,
    quantizer: str = "kivi",
    budget: float = 2.5,
    *,
    n_samples: int = 16,
    seq_len: int = 512,
    n_validation: int = 8,
    group_size: int = 32,
    residual_length: int = 128,
    sink_length: int | None = None,
    b_min: int = 1,
    b_max: int = 6,
    batch_size: int = 4,
    chunk: int = 64,
    validate: bool = True,
    residual_aware: bool = True,
    data_column: str | None = None,
    progress: bool = True,
    measure: str = "output",
) -> RateQuantConfig:
    """Calibrate a RateQuant allocation of `budget` average bits for `quantizer` on `model`.

    Args:
        model (`PreTrainedModel`): the causal LM.
        tokenizer (`PreTrainedTokenizer`): its tokenizer.
        data (*optional*): calibration text: WikiText-2 train through `datasets` by default (local Python docs
            text offline, with a warning), a `datasets` name (`"name"` or `"name:config"`, text column
            `data_column`, default `"text"`), a text file or a list of strings.
        quantizer (`str`, *optional*, defaults to `"kivi"`): registered quantizer design.
        budget (`float`, *optional*, defaults to 2.5): average bits over all units.
        n_samples (`int`, *optional*, defaults to 16): calibration windows used for the fit.
        seq_len (`int`, *optional*, defaults to 512): tokens per window.
        n_validation (`int`, *optional*, defaults to 8): further windows, held back from the fit, on which the
            candidates are compared (0 or `validate=False` skips validation and returns the closed-form allocation).
        sink_length (`int`, *optional*): the first tokens of every sequence the cache keeps in full precision
            (attention sinks; a multiple of `group_size`); by default the smallest multiple of `group_size` of at
            least 32 (32 for G = 32). 0 quantizes them like every other token, as KIVI does. The measure and the
            validation both see the cache with them.
        b_min (`int`, *optional*, defaults to 1), b_max (`int`, *optional*, defaults to 6): bounds of every unit's
            bits. One-bit units (values of unimportant heads, mostly) pay for more bits elsewhere; validation
            refuses them where they do not.
        residual_aware (`bool`, *optional*, defaults to `True`): weight each unit's error only by the attention that
            reads it quantized (the cache keeps the last `residual_length` tokens in full precision); falls back to
            all attention, with a warning, on a model that does not honour a custom attention mask.
        measure (`str`, *optional*, defaults to `"output"`): `"output"` weights the error of each layer's attention
            output, recomputed with the quantized keys or values (exact through the softmax, about 30% more time);
            `"state"` the error of the states themselves (first order: it underrates coarse key quantization).

    Returns:
        [`RateQuantConfig`]: the winning allocation, with the fitted curves and the validation scores.

    Example:
        >>> config = calibrate(model, tokenizer, quantizer="kivi", budget=2.5)
        >>> config.save_pretrained("smollm2-ratequant-kivi-2.5")
    """
    start = time.perf_counter()
    fp = ModelFingerprint.from_model_config(model.config)
    get_quantizer(quantizer, group_size)  # fail early on an unknown design
    if sink_length is None:
        sink_length = -(-DEFAULT_SINK_TOKENS // group_size) * group_size
    if residual_aware and seq_len <= residual_length + sink_length + group_size:
        raise ValueError(
            f"seq_len={seq_len} is too short to measure anything: the cache keeps the first sink_length="
            f"{sink_length} and the last residual_length={residual_length} tokens in full precision and quantizes "
            f"whole groups of group_size={group_size}, so no query of such a window reads a quantized token. Use "
            f"seq_len > {residual_length + sink_length + group_size} (512 by default), or a smaller residual_length "
            "or sink_length."
        )
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}: choose one of {', '.join(MEASURES)}.")
    bit_grid = list(range(b_min, b_max + 1))
    if len(bit_grid) < 2:
        raise ValueError(f"b_min={b_min} and b_max={b_max} leave fewer than two bit-widths to fit a curve on.")
    template = RateQuantConfig(
        key_bits=[[b_min] * fp.num_kv_heads] * fp.num_layers, value_bits=[[b_min] * fp.num_kv_heads] * fp.num_layers,
        quantizer=quantizer, group_size=group_size, residual_length=residual_length, sink_length=sink_length,
        budget=budget, b_min=b_min, b_max=b_max, fingerprint=fp,
    )
    n_validation = n_validation if validate else 0
    procs = Processes()
    windows, text, source = procs.run(
        lambda: calibration_windows(tokenizer, data, seq_len=seq_len, n_windows=n_samples + n_validation,
                                    column=data_column), "loading the calibration data")
    procs.agree((fp.geometry(), fp.layer_types, fp.model_type, text_fingerprint(text), tuple(windows.shape),
                 quantizer, budget, group_size, residual_length, sink_length, b_min, b_max, measure),
                "model, data or settings")
    fit_windows, val_windows = windows[:n_samples], windows[n_samples:]
    my_fit = procs.shard(fit_windows, "calibration")
    my_val = procs.shard(val_windows, "validation")

    t0 = time.perf_counter()
    if residual_aware and not residual_split_works(model, my_fit, residual_length, group_size):
        logger.warning("%s does not honour a custom attention mask: the distortion is weighted by all attention, "
                       "including the residual window the cache keeps in full precision.", fp.architecture)
        residual_aware = False
    procs.agree(residual_aware, "residual-aware measure")
    table = procs.run(lambda: measure_distortion(
        model, my_fit, quantizer, bit_grid, group_size=group_size, batch_size=batch_size,
        residual_length=residual_length if residual_aware else None, sink_length=sink_length,
        progress=progress and procs.is_main, measure=measure,
    ), "measuring the distortion")
    table = procs.sum(table).cpu()  # measured on the model's device; the fit and allocation are CPU math
    measure_s = time.perf_counter() - t0
    fit = fit_curves(table, bit_grid)
    candidates = allocation_candidates(table, bit_grid, budget)
    for k_bits, v_bits in fixed_allocations(fp.num_layers * fp.num_kv_heads, fp.num_layers * fp.num_kv_heads,
                                            budget, b_min, b_max):
        name = f"uniform-{k_bits}" if k_bits == v_bits else f"K{k_bits}V{v_bits}"
        candidates[name] = torch.stack([torch.full((fp.num_layers, fp.num_kv_heads), k_bits),
                                        torch.full((fp.num_layers, fp.num_kv_heads), v_bits)], dim=-1)

    scores: dict[str, float] = {}
    t0 = time.perf_counter()
    if len(val_windows):
        # Successive halving (one process): every candidate is scored on the first rung of validation windows, and
        # each further rung adds windows for the best of the candidates still in the race, down to the
        # VALIDATION_FINALISTS scored on every window; the winner is the best finalist.
        sizes = validation_rungs(len(my_val)) if procs.count == 1 else [len(my_val)]
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        parts = [my_val[a:b] for a, b in zip(bounds, bounds[1:])]
        reference: dict[int, list[torch.Tensor]] = {}  # per part: full-precision log-probs, per batch
        prefixes: dict[int, SharedPrefix | None] = {}  # per part: what every candidate's cache serves exactly
        sums: dict[tuple[int, ...], list[list[float]]] = {}  # allocation -> [KL sum, tokens] per part scored
        bits_of: dict[tuple[int, ...], torch.Tensor] = {}

        def key_of(bits: torch.Tensor) -> tuple[int, ...]:
            return tuple(bits.reshape(-1).tolist())

        def score(keys: list[tuple[int, ...]], part: int) -> None:
            todo = [k for k in dict.fromkeys(keys) if len(sums.get(k, [])) == part]

            def kl_sums() -> torch.Tensor:  # per allocation: KL summed over this process's tokens, and the tokens
                if part not in reference:
                    reference[part] = reference_logprobs(model, parts[part], batch_size=batch_size)
                    prefixes[part] = shared_prefix(model, parts[part], template, chunk=chunk, batch_size=batch_size,
                                                   reference=reference[part])
                ref = reference[part]
                out = []
                for k in todo:
                    res = evaluate_quality(model, parts[part], _config_from_bits(bits_of[k], template, "candidate"),
                                           chunk=chunk, batch_size=batch_size, progress=False, reference=ref,
                                           prefix=prefixes[part])
                    out.append([res.kl * res.tokens, res.tokens])
                return torch.tensor(out, dtype=torch.float64).reshape(-1, 2)

            if todo:
                for k, pair in zip(todo, procs.sum(procs.run(kl_sums, "validating the candidates")).tolist()):
                    sums.setdefault(k, []).append(pair)

        def kl(k: tuple[int, ...]) -> float:
            return sum(p[0] for p in sums[k]) / sum(p[1] for p in sums[k])

        def add(batch: dict[str, torch.Tensor]) -> None:
            for name, bits in batch.items():
                bits_of.setdefault(key_of(bits), bits)
            score([key_of(b) for b in batch.values()], 0)
            for name, bits in batch.items():
                scores[name] = kl(key_of(bits))

        add({n: b for n, b in candidates.items() if n != "kvq-beta4"})
        fixed = [n for n in scores if not n.startswith(("ratequant", "kvq"))]
        if fixed:
            # Part of the way from the best fixed split towards the measured optimum: small moves from a split known
            # to be good, where the measure's predictions are the most reliable.
            origin = min(fixed, key=scores.get)
            path = descent_path(table.reshape(-1, len(bit_grid)), torch.tensor(bit_grid),
                                candidates[origin].reshape(-1))
            steps = sorted({max(1, round(len(path) * f)) for f in DESCENT_FRACTIONS}) if path else []
            near = {f"ratequant-from-{origin}-{s}": path[s - 1].reshape(candidates[origin].shape) for s in steps}
            candidates.update(near)
            add(near)
        racing = list(dict.fromkeys(key_of(candidates[n]) for n in scores))
        for rung in range(1, len(parts)):
            racing = sorted(racing, key=kl)[: VALIDATION_FINALISTS * 2 ** (len(parts) - 1 - rung)]
            score(racing, rung)
        finalists = [n for n in scores if key_of(candidates[n]) in racing]
        windows_scored = {}
        for name in scores:
            scores[name] = kl(key_of(candidates[name]))
            windows_scored[name] = sum(sizes[: len(sums[key_of(candidates[name])])])
            logger.info("validation KL %-26s %.5f (%d of %d windows)", name, scores[name], windows_scored[name],
                        len(my_val))
        winner = min(finalists, key=scores.get)
    else:
        finalists, windows_scored = [], {}
        winner = "ratequant"
    validate_s = time.perf_counter() - t0

    config = _config_from_bits(candidates[winner], template, winner)
    best_fixed = min((s for n, s in scores.items() if not n.startswith(("ratequant", "kvq"))), default=None)
    config.calibration = {
        "source": source,
        "text_sha256": text_fingerprint(text),
        "fit_tokens": int(fit_windows.numel()),
        "validation_tokens": int(val_windows.numel()),
        "seq_len": seq_len,
        "measure": ("gradient-weighted squared error of the attention output recomputed with the quantized states"
                    if measure == "output" else "gradient-weighted squared quantization error of the states")
        + " (diagonal Fisher), summed over tokens"
        + (", gradients through the quantized part of the cache only" if residual_aware else ""),
        "residual_aware": residual_aware,
        "bit_grid": bit_grid,
        "winner": winner,
        "validation_kl": scores,
        "validation_finalists": finalists,
        "validation_windows": windows_scored,
        "gain_vs_best_fixed": (1 - scores[winner] / best_fixed) if best_fixed else None,
        "beta_median": {"key": float(fit.beta[:, :, 0].median()), "value": float(fit.beta[:, :, 1].median())},
        "fit_r2_median": float(fit.r2.median()),
        "seconds": {"measure": measure_s, "validate": validate_s, "total": time.perf_counter() - start},
        "processes": procs.count,
        "candidates": {n: b.tolist() for n, b in candidates.items() if n.startswith(("ratequant", "kvq"))},
    }
    config.curves = {"alpha": fit.alpha.float(), "beta": fit.beta.float(), "r2": fit.r2.float(),
                     "distortion": table.float(), "bit_grid": torch.tensor(bit_grid)}
    logger.info("calibration: %s won (validation KL %s), %.1f s", winner, scores.get(winner),
                time.perf_counter() - start)
    return config
