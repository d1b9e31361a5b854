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

from .allocation import allocate_bits, fixed_allocations
from .calibration import calibration_windows, measure_distortions, residual_split_works
from .config import ModelFingerprint, RateQuantConfig
from .distortion import CurveFit, fit_curves, fixed_beta_fit
from .evaluation import evaluate_quality, reference_logprobs, shared_prefix
from .quantizers import available_quantizers

logger = logging.getLogger(__name__)

__all__ = ["QuantizerCurves", "beta_table", "fit_quantizer_curves", "mismatch_study"]

KINDS = ("key", "value")


@dataclass
class QuantizerCurves:
    """One quantizer design's measured distortion table `(layers, kv_heads, 2, n_bits)` and its fitted curves."""

    quantizer: str
    bit_grid: list[int]
    distortion: torch.Tensor
    fit: CurveFit

    def allocation(self, budget: float) -> torch.LongTensor:
        """Closed-form (reverse waterfilling) allocation of `budget` bits from these curves: `(layers, heads, 2)`."""
        bits = allocate_bits(self.fit.alpha.reshape(-1), self.fit.beta.reshape(-1), budget, min(self.bit_grid),
                             max(self.bit_grid))
        return bits.reshape(self.fit.alpha.shape)


def fit_quantizer_curves(
    model: Any,
    tokenizer: Any,
    data: Any = None,
    quantizers: list[str] | None = None,
    *,
    n_samples: int = 8,
    seq_len: int = 512,
    group_size: int = 32,
    residual_length: int = 128,
    b_min: int = 2,
    b_max: int = 6,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, QuantizerCurves]:
    """Measure and fit the distortion curves of every quantizer in `quantizers` (default: all registered ones) on the
    same calibration windows. Arguments as [`calibrate`]."""
    quantizers = list(quantizers or available_quantizers())
    bit_grid = list(range(b_min, b_max + 1))
    windows, _text, _source = calibration_windows(tokenizer, data, seq_len=seq_len, n_windows=n_samples)
    aware = residual_split_works(model, windows, residual_length, group_size)
    tables = measure_distortions(model, windows, quantizers, bit_grid, group_size=group_size, batch_size=batch_size,
                                 residual_length=residual_length if aware else None, progress=progress)
    return {q: QuantizerCurves(q, bit_grid, t, fit_curves(t, bit_grid)) for q, t in tables.items()}


def beta_table(curves: dict[str, QuantizerCurves]) -> list[dict]:
    """Median and range of the fitted per-unit beta, per quantizer and kind, with the median fit R^2."""
    rows = []
    for q, c in curves.items():
        for i, kind in enumerate(KINDS):
            beta, r2 = c.fit.beta[..., i].reshape(-1), c.fit.r2[..., i].reshape(-1)
            rows.append(dict(quantizer=q, kind=kind, beta_median=float(beta.median()), beta_min=float(beta.min()),
                             beta_max=float(beta.max()), r2_median=float(r2.median())))
    return rows


def _config(bits: torch.Tensor, quantizer: str, fp: ModelFingerprint, method: str, budget: float, group_size: int,
            residual_length: int) -> RateQuantConfig:
    return RateQuantConfig(key_bits=bits[..., 0].tolist(), value_bits=bits[..., 1].tolist(), quantizer=quantizer,
                           group_size=group_size, residual_length=residual_length, budget=budget, method=method,
                           fingerprint=fp)


def mismatch_study(
    model: Any,
    windows: torch.LongTensor,
    curves: dict[str, QuantizerCurves],
    budget: float = 2.5,
    *,
    group_size: int = 32,
    residual_length: int = 128,
    chunk: int = 64,
    batch_size: int = 4,
    progress: bool = True,
) -> list[dict]:
    """Evaluate, for every quantizer B in `curves`, B's fixed allocations of `budget`, the allocation from B's own
    curves, from every other design's curves, and from kvq's fixed beta = 4, all through B's real cache on `windows`.

    Returns:
        `list[dict]`: one row per (B, allocation): `quantizer`, `allocation` (`"own curves"`, `"curves of A"`,
        `"kvq beta=4"`, `"uniform-3"`, `"K3V2"`, ...), `kind` (`own`, `mismatched`, `fixed`), `perplexity`, `kl`,
        `key_bits` (mean), `units_changed` (units whose bits differ from B's own allocation) and
        `rank_agreement` (Spearman correlation of the units' bits with B's own allocation).
    """
    fp = ModelFingerprint.from_model_config(model.config)
    reference = reference_logprobs(model, windows, batch_size=batch_size)
    prefix = None
    n_heads = fp.num_layers * fp.num_kv_heads
    b_min, b_max = min(next(iter(curves.values())).bit_grid), max(next(iter(curves.values())).bit_grid)
    rows = []
    for b_name, own_curves in curves.items():
        own = own_curves.allocation(budget)
        plans: list[tuple[str, str, torch.Tensor]] = []
        for k, v in fixed_allocations(n_heads, n_heads, budget, b_min, b_max):
            name = f"uniform-{k}" if k == v else f"K{k}V{v}"
            plans.append((name, "fixed", torch.stack([torch.full(own.shape[:-1], k), torch.full(own.shape[:-1], v)],
                                                     dim=-1)))
        plans.append(("own curves", "own", own))
        plans += [(f"curves of {a}", "mismatched", c.allocation(budget)) for a, c in curves.items() if a != b_name]
        kvq = QuantizerCurves(b_name, own_curves.bit_grid, own_curves.distortion,
                              fixed_beta_fit(own_curves.distortion, own_curves.bit_grid, 4.0))
        plans.append(("kvq beta=4", "mismatched", kvq.allocation(budget)))
        for name, kind, bits in plans:
            cfg = _config(bits, b_name, fp, name, budget, group_size, residual_length)
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
