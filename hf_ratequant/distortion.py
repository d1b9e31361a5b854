"""Measuring and fitting the distortion curves D_u(b) = alpha_u * beta_u^(-b) (pure tensor math, no hooks, no I/O).

The measure is *gradient-weighted* (a diagonal Fisher approximation of the change in the LM loss): for a unit u with
states x (post-RoPE keys or values of one kv-head) and the gradient g of the loss with respect to them,

    D_u(b) = sum_{tokens, channels} g^2 * (Q_b(x) - x)^2,

where Q_b is the real quantizer at b bits. Raw reconstruction error alone carries no importance (every unit looks
alike); the squared gradient says how much the model's output cares about each error. [`output_distortion`] takes
the same measure one step later, on the attention output recomputed with the quantized states (exact through the
softmax), with the gradient of the loss with respect to that output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .quantizers import Quantizer
from .split_attention import SplitAttention

__all__ = ["CurveFit", "fisher_distortion", "fit_curves", "fixed_beta_fit", "output_distortion"]

_TINY = 1e-30


def fisher_distortion(
    states: torch.Tensor, grads: torch.Tensor, quantizer: Quantizer, kind: str, bit_grid: list[int]
) -> torch.Tensor:
    """Gradient-weighted quantization error of every kv-head at every bit-width of `bit_grid`.

    Args:
        states (`torch.Tensor`): `(batch, kv_heads, tokens, head_dim)` keys or values.
        grads (`torch.Tensor`): the loss gradient with respect to `states`, same shape.
        quantizer (`Quantizer`): the design whose error is measured.
        kind (`str`): `"key"` or `"value"`.
        bit_grid (`list[int]`): bit-widths to measure.

    Returns:
        `torch.Tensor`: float64 `(kv_heads, len(bit_grid))`.
    """
    tb = quantizer.token_block(kind)
    usable = states.shape[2] - states.shape[2] % tb
    x = states[:, :, :usable].float()
    w = grads[:, :, :usable].float().square()  # (B, H, T, D)
    out = []
    for bits in bit_grid:
        err = quantizer.roundtrip(x, bits, kind) - x
        out.append((w * err.square()).sum(dim=(0, 2, 3)).double())  # (H,)
    return torch.stack(out, dim=-1)  # (H, n_bits)


def output_distortion(
    attend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | SplitAttention,
    keys: torch.Tensor,
    values: torch.Tensor,
    grad_out: torch.Tensor,
    n_quantized: int,
    quantizer: Quantizer,
    bit_grid: list[int],
    kinds: tuple[str, ...] = ("key", "value"),
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient-weighted error of one layer's *attention output* when its keys (or its values) are quantized.

    The first-order measure on the states ([`fisher_distortion`]) misjudges keys: their error acts through the
    softmax, which is far from linear at 2-3 bits. Here attention itself is recomputed with the quantized states, so
    the softmax is exact, and only the step from the attention output to the loss is linearised. Every kv-head's
    states are quantized at once (a query head only reads its own kv-head), so one attention call measures all
    heads of a layer at one bit-width of the keys, and one call all bit-widths of the values (attention is linear
    in them: [`_value_errors`]).

    Args:
        attend (`Callable` or `SplitAttention`): `attend(keys, values)` -> the layer's attention output `(batch,
            tokens, q_heads, head_dim)` for the queries being measured; or a [`SplitAttention`] over the same
            states, which recomputes only what the first `n_quantized` tokens change (same table, less work).
        keys, values (`torch.Tensor`): `(batch, kv_heads, kv_tokens, head_dim)`, as attention receives them.
        grad_out (`torch.Tensor`): the loss gradient with respect to that output, same shape as the output.
        n_quantized (`int`): the first `n_quantized` key/value tokens are the ones the cache would quantize (the
            rest, if any, are the full-precision copies of the residual-aware split).
        quantizer (`Quantizer`): the design whose error is measured.
        bit_grid (`list[int]`): bit-widths to measure.
        kinds (`tuple[str, ...]`, *optional*): the kinds to measure; the other's entries are `inf` (not measured).
        base (`torch.Tensor`, *optional*): `attend(keys, values)` in float32, when the caller has it (several
            designs measured on the same states share it).

    Returns:
        `torch.Tensor`: float64 `(kv_heads, 2, len(bit_grid))`, keys then values.
    """
    kv_heads = keys.shape[1]
    w = grad_out.float().square()
    if isinstance(attend, SplitAttention):
        return _split_output_distortion(attend, keys, values, w, n_quantized, quantizer, bit_grid, kinds)
    base = attend(keys, values).float() if base is None else base

    def quantized(x: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
        return _quantize_leading(x, n_quantized, quantizer, kind, bits)

    out = torch.full((kv_heads, 2, len(bit_grid)), float("inf"), dtype=torch.float64)
    if "key" in kinds:
        for i, bits in enumerate(bit_grid):
            err = (attend(quantized(keys, "key", bits), values).float() - base).square_().mul_(w).sum(dim=(0, 1, 3))
            out[:, 0, i] = err.view(kv_heads, -1).sum(-1).double().cpu()  # (q_heads,) -> (kv_heads,)
    if "value" in kinds:
        copies = [quantized(values, "value", bits) for bits in bit_grid]
        err = _value_errors(attend, keys, values, w, copies)
        if err is None:  # one attention call per bit-width
            err = torch.stack([(attend(keys, v).float() - base).square_().mul_(w).sum(dim=(0, 1, 3))
                               for v in copies], dim=-1)
        out[:, 1] = err.view(kv_heads, -1, len(bit_grid)).sum(1).double().cpu()
    return out


def _quantize_leading(x: torch.Tensor, n_quantized: int, quantizer: Quantizer, kind: str, bits: int) -> torch.Tensor:
    """`x` with its first `n_quantized` tokens, in whole time blocks of the quantizer, replaced by their
    reconstruction at `bits`."""
    usable = n_quantized - n_quantized % quantizer.token_block(kind)
    if usable == x.shape[2]:
        return quantizer.roundtrip(x, bits, kind)
    return torch.cat([quantizer.roundtrip(x[:, :, :usable], bits, kind), x[:, :, usable:]], dim=2)


def _split_output_distortion(attend: SplitAttention, keys: torch.Tensor, values: torch.Tensor, w: torch.Tensor,
                             n_quantized: int, quantizer: Quantizer, bit_grid: list[int],
                             kinds: tuple[str, ...]) -> torch.Tensor:
    """[`output_distortion`] where only the far copy (the first `n_quantized` tokens) is recomputed: key options
    through [`SplitAttention.with_far_keys`], every value bit-width's error in one
    [`SplitAttention.far_output`] call (attention is linear in the values)."""
    kv_heads = keys.shape[1]

    def quantized(x: torch.Tensor, kind: str, bits: int) -> torch.Tensor:  # the far copy only
        return _quantize_leading(x[:, :, :n_quantized], n_quantized, quantizer, kind, bits)

    out = torch.full((kv_heads, 2, len(bit_grid)), float("inf"), dtype=torch.float64)
    if "key" in kinds:
        for i, bits in enumerate(bit_grid):
            err = (attend.with_far_keys(quantized(keys, "key", bits)) - attend.base).square_().mul_(w)
            out[:, 0, i] = err.sum(dim=(0, 1, 3)).view(kv_heads, -1).sum(-1).double().cpu()
    if "value" in kinds:
        far = values[:, :, :n_quantized].float()
        errors = torch.cat([quantized(values, "value", bits).float() - far for bits in bit_grid], dim=-1)
        err = attend.far_output(errors).unflatten(-1, (len(bit_grid), -1)).square_().mul_(w.unsqueeze(-2))
        out[:, 1] = err.sum(dim=(0, 1, 4)).view(kv_heads, -1, len(bit_grid)).sum(1).double().cpu()
    return out


def _value_errors(attend: Callable, keys: torch.Tensor, values: torch.Tensor, w: torch.Tensor,
                  quantized: list[torch.Tensor]) -> torch.Tensor | None:
    """The weighted output error of every quantized copy of the values in one attention call, or None where the
    attention implementation cannot take it.

    Attention is linear in the values (the softmax weights depend on the keys only), so the output error of
    quantized values is the attention of their error: `attend(K, V_b) - attend(K, V) = attend(K, V_b - V)`. The
    errors of every bit-width ride along the channels of one call (values of `n * head_dim` channels), which costs
    one score matrix instead of one per bit-width, and is more exact than the difference of two outputs in 16 bits.

    Returns:
        `torch.Tensor`: `(q_heads, n)` float32, or None.
    """
    n, head_dim = len(quantized), values.shape[-1]
    errors = torch.cat([(q.float() - values.float()).to(values.dtype) for q in quantized], dim=-1)
    try:
        out = attend(keys, errors)
    except (RuntimeError, ValueError, NotImplementedError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        return None  # e.g. a kernel that needs the values' channels to match the queries'
    if out.shape[-1] != n * head_dim:
        return None
    out = out.float().unflatten(-1, (n, head_dim))  # (batch, tokens, q_heads, n, head_dim)
    return out.square_().mul_(w.unsqueeze(-2)).sum(dim=(0, 1, 4))


@dataclass
class CurveFit:
    """Least-squares fit of log D = log alpha - b log beta for every unit.

    Attributes:
        alpha (`torch.Tensor`), beta (`torch.Tensor`): per unit, shape of the distortion table without its last axis.
        r2 (`torch.Tensor`): coefficient of determination of each fit, in log space.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    r2: torch.Tensor


def fit_curves(distortion: torch.Tensor, bit_grid: list[int], min_beta: float = 1.05) -> CurveFit:
    """Fit D_u(b) = alpha_u * beta_u^(-b) to a `(..., n_bits)` table of measured distortion.

    Args:
        distortion (`torch.Tensor`): measured distortion, `(..., n_bits)`, non-negative.
        bit_grid (`list[int]`): the bit-widths of the last axis (at least two).
        min_beta (`float`, *optional*, defaults to 1.05): betas are clamped to at least this (a curve must fall).
    """
    if len(bit_grid) < 2 or distortion.shape[-1] != len(bit_grid):
        raise ValueError(f"Need a distortion table over at least two bit-widths, got {len(bit_grid)} bit-widths for "
                         f"a table of shape {tuple(distortion.shape)}.")
    y = distortion.double().clamp_min(_TINY).log()  # (..., n_bits)
    b = torch.tensor(bit_grid, dtype=torch.float64)
    bc = b - b.mean()
    slope = ((y - y.mean(-1, keepdim=True)) * bc).sum(-1) / bc.square().sum()  # = -log beta
    intercept = y.mean(-1) - slope * b.mean()
    pred = intercept.unsqueeze(-1) + slope.unsqueeze(-1) * b
    ss_res = (y - pred).square().sum(-1)
    ss_tot = (y - y.mean(-1, keepdim=True)).square().sum(-1).clamp_min(_TINY)
    beta = (-slope).exp().clamp_min(min_beta)
    return CurveFit(alpha=intercept.exp(), beta=beta, r2=1 - ss_res / ss_tot)


def fixed_beta_fit(distortion: torch.Tensor, bit_grid: list[int], beta: float = 4.0) -> CurveFit:
    """One fixed beta for every unit (kvq's rule, beta = 4 from high-resolution theory) and, per unit, the
    least-squares alpha of the measured `(..., n_bits)` table under that beta.
    `r2` is that curve's fit in log space."""
    y = distortion.double().clamp_min(_TINY).log()
    b = torch.tensor(bit_grid, dtype=torch.float64)
    slope = -torch.log(torch.tensor(float(beta), dtype=torch.float64))
    intercept = (y - slope * b).mean(-1)
    ss_res = (y - intercept.unsqueeze(-1) - slope * b).square().sum(-1)
    ss_tot = (y - y.mean(-1, keepdim=True)).square().sum(-1).clamp_min(_TINY)
    return CurveFit(alpha=intercept.exp(), beta=torch.full_like(intercept, float(beta)), r2=1 - ss_res / ss_tot)
