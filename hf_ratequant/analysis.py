"""The distortion-model mismatch, reproduced: fit every quantizer's curves on one model, then allocate for quantizer B
with quantizer A's curves and see what it costs.

RateQuant's claim is that each quantizer design has its own distortion curve D(b) = alpha * beta^(-b), and that an
allocation computed from the wrong curve (another design's, or kvq's fixed beta = 4) can invert the order of the
units and do worse than uniform bits. [`fit_quantizer_curves`] measures every design on the *same* captured states
(one forward and backward pass per batch), [`beta_table`] summarises the fitted betas, and [`mismatch_study`]
evaluates every (curves of A, quantizer B) pair through the real cache on held-out text, next to B's fixed
allocations of the same budget. The rows say whether the inversion happens on this model; nothing is assumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .allocation import Candidate, allocate_bits, fixed_candidates
from .calibration import calibration_windows, measure_distortions, residual_split_works
from .config import ModelFingerprint, RateQuantConfig
from .distortion import CurveFit, fit_curves, fixed_beta_fit
from .evaluation import evaluate_quality, reference_logprobs, shared_prefix
from .quantizers import available_quantizers
from .settings import CacheLayout, CalibrationSettings, EvaluationSettings, layout_with, split_settings

logger = logging.getLogger(__name__)
_CALIBRATION, _EVALUATION = CalibrationSettings(), EvaluationSettings()  # the defaults below

__all__ = ["ANALYSIS_SETTINGS", "KVQ_BETA", "QuantizerCurves", "beta_table", "fit_quantizer_curves", "kvq_candidate",
           "mismatch_study"]

KINDS = ("key", "value")
KVQ_BETA = 4.0
"""kvq's rule: every unit's distortion falls by the same factor beta = 4 per bit (alpha fitted, beta fixed)."""
ANALYSIS_SETTINGS = CalibrationSettings(n_samples=8)
"""[`fit_quantizer_curves`]'s defaults: those of `calibrate` (b_min = 1, 32 sinks through [`CacheLayout`]) but 8
measured windows instead of 16, since the analysis measures every registered quantizer."""


@dataclass
class QuantizerCurves:
    """One quantizer design's measured distortion table `(layers, kv_heads, 2, n_bits)` and its fitted curves."""

    quantizer: str
    bit_grid: list[int]
    distortion: torch.Tensor
    fit: CurveFit

    def allocation(self, budget: float) -> torch.LongTensor:
        """Closed-form (reverse waterfilling) allocation of `budget` bits from these curves: `(layers, heads, 2)`."""
        return _waterfill(self.fit, budget, self.bit_grid)

    def kvq_allocation(self, budget: float) -> torch.LongTensor:
        """The allocation kvq's fixed beta ([`KVQ_BETA`]) rule makes of the same measurements: `(layers, heads, 2)`."""
        return _waterfill(fixed_beta_fit(self.distortion, self.bit_grid, KVQ_BETA), budget, self.bit_grid)


def _waterfill(fit: CurveFit, budget: float, bit_grid: list[int]) -> torch.LongTensor:
    bits = allocate_bits(fit.alpha.reshape(-1), fit.beta.reshape(-1), budget, min(bit_grid), max(bit_grid))
    return bits.reshape(fit.alpha.shape)


def kvq_candidate(distortion: torch.Tensor, bit_grid: list[int], budget: float) -> Candidate:
    """`kvq-beta4`: kvq's fixed beta rule on a `(layers, kv_heads, 2, n_bits)` table, as a `"ratequant"`-family
    [`Candidate`] (a research comparison that `calibrate` no longer computes; older records list it)."""
    bits = _waterfill(fixed_beta_fit(distortion, bit_grid, KVQ_BETA), budget, bit_grid)
    return Candidate(f"kvq-beta{KVQ_BETA:g}", "ratequant", bits)


def fit_quantizer_curves(
    model: Any, tokenizer: Any, data: Any = None, quantizers: list[str] | None = None, *,
    layout: CacheLayout | None = None, settings: CalibrationSettings | None = None, progress: bool = True,
    **overrides: Any,
) -> dict[str, QuantizerCurves]:
    """Measure and fit the distortion curves of every quantizer in `quantizers` (default: all registered ones) on the
    same calibration windows.

    Args:
        layout ([`CacheLayout`], *optional*): group size, residual window and sinks of the measured cache (its
            quantizer is ignored: every design in `quantizers` is measured).
        settings ([`CalibrationSettings`], *optional*, defaults to [`ANALYSIS_SETTINGS`]): `n_samples`, `seq_len`,
            `b_min`, `b_max`, `batch_size`, `measure`, `residual_aware`, `data_column` are used.
        overrides: any field of either (None keeps the default), as for `calibrate`.
    """
    layout, settings = split_settings(overrides, layout, settings or ANALYSIS_SETTINGS)
    s, quantizers = settings, list(quantizers or available_quantizers())
    windows, _text, _source = calibration_windows(tokenizer, data, seq_len=s.seq_len, n_windows=s.n_samples,
                                                  column=s.data_column)
    aware = s.residual_aware and residual_split_works(model, windows, layout.residual_length, layout.group_size)
    tables = measure_distortions(model, windows, quantizers, s.bit_grid, group_size=layout.group_size,
                                 batch_size=s.batch_size, residual_length=layout.residual_length if aware else None,
                                 sink_length=layout.sink_length, progress=progress, measure=s.measure)
    return {q: QuantizerCurves(q, s.bit_grid, t, fit_curves(t, s.bit_grid)) for q, t in tables.items()}


def beta_table(curves: dict[str, QuantizerCurves]) -> list[dict]:
    """Median and range of the fitted per-unit beta, per quantizer and kind, with the median fit R^2."""
    rows = []
    for q, c in curves.items():
        for i, kind in enumerate(KINDS):
            beta, r2 = c.fit.beta[..., i].reshape(-1), c.fit.r2[..., i].reshape(-1)
            rows.append(dict(quantizer=q, kind=kind, beta_median=float(beta.median()), beta_min=float(beta.min()),
                             beta_max=float(beta.max()), r2_median=float(r2.median())))
    return rows


def _study_plans(b_name: str, curves: dict[str, QuantizerCurves], budget: float, fp: ModelFingerprint
                 ) -> list[tuple[str, str, torch.Tensor]]:
    """`(allocation name, kind, bits)` evaluated for quantizer `b_name`: its fixed splits, its own curves' allocation,
    every other design's and kvq's."""
    own = curves[b_name]
    grid = own.bit_grid
    fixed = fixed_candidates(fp.num_layers, fp.num_kv_heads, budget, min(grid), max(grid))
    plans = [(c.name, "fixed", c.bits) for c in fixed]
    plans.append(("own curves", "own", own.allocation(budget)))
    plans += [(f"curves of {a}", "mismatched", c.allocation(budget)) for a, c in curves.items() if a != b_name]
    plans.append((f"kvq beta={KVQ_BETA:g}", "mismatched", own.kvq_allocation(budget)))
    return plans


def mismatch_study(
    model: Any, windows: torch.LongTensor, curves: dict[str, QuantizerCurves], budget: float = _CALIBRATION.budget, *,
    layout: CacheLayout | None = None, chunk: int = _EVALUATION.chunk, batch_size: int = _EVALUATION.batch_size,
    progress: bool = True,
    **layout_fields: Any,
) -> list[dict]:
    """Evaluate, for every quantizer B in `curves`, B's fixed allocations of `budget`, the allocation from B's own
    curves, from every other design's curves, and from kvq's fixed beta = 4, all through B's real cache on `windows`.

    Args:
        layout ([`CacheLayout`], *optional*): group size, residual window and sinks of every cache evaluated (its
            quantizer is replaced by each B); `layout_fields` (e.g. `sink_length=0`) replace its fields.

    Returns:
        `list[dict]`: one row per (B, allocation): `quantizer`, `allocation` (`"own curves"`, `"curves of A"`,
        `"kvq beta=4"`, `"uniform-3"`, `"K3V2"`, ...), `kind` (`own`, `mismatched`, `fixed`), `perplexity`, `kl`,
        `key_bits` (mean), `units_changed` (units whose bits differ from B's own allocation) and
        `rank_agreement` (Spearman correlation of the units' bits with B's own allocation).
    """
    layout = layout_with(layout, **layout_fields)
    fp = ModelFingerprint.from_model_config(model.config)
    reference = reference_logprobs(model, windows, batch_size=batch_size)
    prefix, rows = None, []
    for b_name in curves:
        own = curves[b_name].allocation(budget)
        for name, kind, bits in _study_plans(b_name, curves, budget, fp):
            cfg = RateQuantConfig.from_bits(bits, layout_with(layout, quantizer=b_name), fingerprint=fp, method=name,
                                            budget=budget)
            if prefix is None:  # every config here shares R, S and G: their exact start is run once
                prefix = shared_prefix(model, windows, cfg, chunk=chunk, batch_size=batch_size, reference=reference)
            res = evaluate_quality(model, windows, cfg, chunk=chunk, batch_size=batch_size, progress=False,
                                   reference=reference, prefix=prefix)
            rows.append(dict(quantizer=b_name, allocation=name, kind=kind, perplexity=res.perplexity, kl=res.kl,
                             key_bits=float(bits[..., 0].double().mean()),
                             units_changed=int((bits != own).sum()), rank_agreement=_spearman(bits, own)))
            logger.info("%s with %-22s ppl %.3f KL %.5f", b_name, name, res.perplexity, res.kl)
    return rows


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Rank correlation of two allocations (ties get their average rank); None when either is constant."""
    ra, rb = _ranks(a.reshape(-1).double()), _ranks(b.reshape(-1).double())
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):  # average rank of ties
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks
