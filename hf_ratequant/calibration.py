"""Calibration: measure how much each (layer, kv-head, key/value) unit's quantization hurts, fit its curve, allocate.

1. **Capture.** A forward and backward pass over calibration windows with a capturing cache: its layers receive the
   post-RoPE keys and values through transformers' own cache API (so every architecture the cache serves is seen),
   make them leaves that require grad, and keep them with their gradients. Model weights are frozen for the pass and
   restored afterwards (`calibration_mode`).
2. **Measure.** For every unit and bit-width in play, the gradient-weighted error of the real quantizer
   ([`fisher_distortion`]); fit D_u(b) = alpha_u * beta_u^(-b) per unit ([`fit_curves`]).
3. **Allocate** by reverse waterfilling ([`allocate_bits`]) and, exactly, from the measured table.
4. **Validate.** Every candidate (RateQuant allocations and every fixed keys/values split of the same budget) is
   evaluated by KL to the full-precision cache, through the real cache, on calibration windows held back from the
   fit. The best one is returned, with every score recorded in `config.calibration`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from huggingface_hub.utils import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .allocation import allocate_bits, allocate_from_table, fixed_allocations
from .config import ModelFingerprint, RateQuantConfig
from .data import load_text, text_fingerprint, tokenize_windows
from .distortion import fisher_distortion, fit_curves
from .evaluation import evaluate_quality, reference_logprobs
from .quantizers import get_quantizer

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "calibration_mode", "capture_states", "measure_distortion", "allocation_candidates"]


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
    """A cache layer that turns the states it receives into grad-requiring leaves and keeps them."""

    def update(self, key_states, value_states, *args, **kwargs):
        keys = key_states.detach().requires_grad_(True)
        values = value_states.detach().requires_grad_(True)
        self.captured = (keys, values)
        return keys, values


class _CaptureCache(DynamicCache):
    def __init__(self, num_layers: int):
        super(DynamicCache, self).__init__(layers=[_CaptureLayer() for _ in range(num_layers)])


def capture_states(model: Any, input_ids: torch.LongTensor) -> list[tuple[torch.Tensor, ...]]:
    """Post-RoPE keys and values of every layer with the gradient of the LM loss with respect to them.

    Returns:
        `list[tuple]`: per layer `(keys, values, key_grads, value_grads)`, each `(batch, kv_heads, tokens, head_dim)`.
    """
    fp = ModelFingerprint.from_model_config(model.config)
    cache = _CaptureCache(fp.num_layers)
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)
    with calibration_mode(model), torch.enable_grad():
        out = model(input_ids=ids, labels=ids, past_key_values=cache, use_cache=True)
        if not torch.isfinite(out.loss):
            raise ValueError(f"The calibration loss is {out.loss.item()}: the model produces non-finite outputs on "
                             "this data; check its dtype and weights.")
        missing = [i for i, layer in enumerate(cache.layers) if not hasattr(layer, "captured")]
        if missing:
            raise ValueError(
                f"{fp.architecture}: layers {missing} never wrote keys/values through the cache, so calibration "
                "cannot see their attention. Supported: models whose attention layers call `past_key_values.update`."
            )
        leaves = [t for layer in cache.layers for t in layer.captured]
        grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    result = []
    for i, layer in enumerate(cache.layers):
        k, v = layer.captured
        gk, gv = grads[2 * i], grads[2 * i + 1]
        for name, t in (("keys", k), ("values", v)):
            if not torch.isfinite(t).all():
                raise ValueError(f"Layer {i} produced non-finite {name} during calibration.")
        result.append((k.detach(), v.detach(), _or_zeros(gk, k), _or_zeros(gv, v)))
    return result


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
    progress: bool = True,
) -> torch.Tensor:
    """Gradient-weighted distortion of every unit at every bit-width: float64 `(layers, kv_heads, 2, n_bits)`,
    `[..., 0, :]` keys and `[..., 1, :]` values, summed over `windows`."""
    q = get_quantizer(quantizer, group_size)
    total = None
    for ids in tqdm(torch.split(windows, batch_size), desc=f"calibrate {quantizer}", disable=not progress):
        states = capture_states(model, ids)
        table = torch.stack(
            [
                torch.stack([fisher_distortion(k, gk, q, "key", bit_grid), fisher_distortion(v, gv, q, "value",
                                                                                               bit_grid)], dim=1)
                for k, v, gk, gv in states
            ]
        )  # (layers, kv_heads, 2, n_bits)
        total = table if total is None else total + table
    return total


def allocation_candidates(
    distortion: torch.Tensor, bit_grid: list[int], budget: float
) -> dict[str, torch.LongTensor]:
    """Allocations of `budget` bits from a `(layers, kv_heads, 2, n_bits)` distortion table, each `(layers,
    kv_heads, 2)`:

    - `ratequant`: reverse waterfilling on the fitted per-unit curves (closed form);
    - `ratequant-measured`: the exact optimum of the measured table;
    - `ratequant-shrunk`: the measured table with each unit's log-distortion pulled halfway to the mean of its layer
      (same kind), which damps the noise of small calibration sets;
    - `kvq-beta4`: kvq's fixed beta = 4 rule applied to the same measurements (for comparison; never returned by
      calibration unless it wins validation like any other candidate).
    """
    shape = distortion.shape[:-1]
    flat = distortion.reshape(-1, len(bit_grid))
    b_min, b_max = min(bit_grid), max(bit_grid)
    fit = fit_curves(flat, bit_grid)
    grid = torch.tensor(bit_grid)
    log_d = distortion.clamp_min(1e-30).log()
    layer_mean = log_d.mean(dim=1, keepdim=True)  # (layers, 1, 2, n_bits)
    shrunk = ((log_d + layer_mean) / 2).exp().reshape(-1, len(bit_grid))
    kvq_alpha = (flat.clamp_min(1e-30).log() + grid.double() * torch.log(torch.tensor(4.0, dtype=torch.float64)))
    candidates = {
        "ratequant": allocate_bits(fit.alpha, fit.beta, budget, b_min, b_max),
        "ratequant-measured": allocate_from_table(flat, grid, budget),
        "ratequant-shrunk": allocate_from_table(shrunk, grid, budget),
        "kvq-beta4": allocate_bits(kvq_alpha.mean(-1).exp(), 4.0, budget, b_min, b_max),
    }
    return {name: bits.reshape(shape) for name, bits in candidates.items()}


def _config_from_bits(bits: torch.Tensor, template: RateQuantConfig, method: str) -> RateQuantConfig:
    return RateQuantConfig(
        key_bits=bits[:, :, 0].tolist(),
        value_bits=bits[:, :, 1].tolist(),
        quantizer=template.quantizer,
        group_size=template.group_size,
        residual_length=template.residual_length,
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
    n_samples: int = 8,
    seq_len: int = 512,
    n_validation: int = 4,
    group_size: int = 32,
    residual_length: int = 128,
    b_min: int = 2,
    b_max: int = 6,
    batch_size: int = 4,
    chunk: int = 64,
    validate: bool = True,
    progress: bool = True,
) -> RateQuantConfig:
    """Calibrate a RateQuant allocation of `budget` average bits for `quantizer` on `model`.

    Args:
        model (`PreTrainedModel`): the causal LM.
        tokenizer (`PreTrainedTokenizer`): its tokenizer.
        data (*optional*): calibration text: WikiText-2 train through `datasets` by default (local Python docs
            text offline, with a warning), a `datasets` name, a text file or a list of strings.
        quantizer (`str`, *optional*, defaults to `"kivi"`): registered quantizer design.
        budget (`float`, *optional*, defaults to 2.5): average bits over all units.
        n_samples (`int`, *optional*, defaults to 8): calibration windows used for the fit.
        seq_len (`int`, *optional*, defaults to 512): tokens per window.
        n_validation (`int`, *optional*, defaults to 4): further windows, held back from the fit, on which the
            candidates are compared (0 or `validate=False` skips validation and returns the closed-form allocation).
        b_min (`int`, *optional*, defaults to 2), b_max (`int`, *optional*, defaults to 6): bounds of every unit's
            bits (one-bit units are risky: their distortion is far from the fitted curve).

    Returns:
        [`RateQuantConfig`]: the winning allocation, with the fitted curves and the validation scores.

    Example:
        >>> config = calibrate(model, tokenizer, quantizer="kivi", budget=2.5)
        >>> config.save_pretrained("smollm2-ratequant-kivi-2.5")
    """
    start = time.perf_counter()
    fp = ModelFingerprint.from_model_config(model.config)
    get_quantizer(quantizer, group_size)  # fail early on an unknown design
    bit_grid = list(range(b_min, b_max + 1))
    if len(bit_grid) < 2:
        raise ValueError(f"b_min={b_min} and b_max={b_max} leave fewer than two bit-widths to fit a curve on.")
    template = RateQuantConfig(
        key_bits=[[b_min] * fp.num_kv_heads] * fp.num_layers, value_bits=[[b_min] * fp.num_kv_heads] * fp.num_layers,
        quantizer=quantizer, group_size=group_size, residual_length=residual_length, budget=budget, b_min=b_min,
        b_max=b_max, fingerprint=fp,
    )
    n_validation = n_validation if validate else 0
    text, source = load_text(data, split="train")
    windows = tokenize_windows(tokenizer, text, seq_len=seq_len, n_windows=n_samples + n_validation,
                               min_windows=n_samples + n_validation)
    fit_windows, val_windows = windows[:n_samples], windows[n_samples:]

    t0 = time.perf_counter()
    table = measure_distortion(model, fit_windows, quantizer, bit_grid, group_size=group_size,
                               batch_size=batch_size, progress=progress)
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
        ref = reference_logprobs(model, val_windows, batch_size=batch_size)
        for name, bits in candidates.items():
            cfg = _config_from_bits(bits, template, name)
            scores[name] = evaluate_quality(model, val_windows, cfg, chunk=chunk, batch_size=batch_size,
                                            progress=False, reference=ref).kl
            logger.info("validation KL %-20s %.5f", name, scores[name])
        eligible = {n: s for n, s in scores.items() if n != "kvq-beta4"}
        winner = min(eligible, key=eligible.get)
    else:
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
        "measure": "gradient-weighted squared quantization error (diagonal Fisher), summed over tokens",
        "bit_grid": bit_grid,
        "winner": winner,
        "validation_kl": scores,
        "gain_vs_best_fixed": (1 - scores[winner] / best_fixed) if best_fixed else None,
        "beta_median": {"key": float(fit.beta[:, :, 0].median()), "value": float(fit.beta[:, :, 1].median())},
        "fit_r2_median": float(fit.r2.median()),
        "seconds": {"measure": measure_s, "validate": validate_s, "total": time.perf_counter() - start},
        "candidates": {n: b.tolist() for n, b in candidates.items() if n.startswith(("ratequant", "kvq"))},
    }
    config.curves = {"alpha": fit.alpha.float(), "beta": fit.beta.float(), "r2": fit.r2.float(),
                     "distortion": table.float(), "bit_grid": torch.tensor(bit_grid)}
    logger.info("calibration: %s won (validation KL %s), %.1f s", winner, scores.get(winner),
                time.perf_counter() - start)
    return config
