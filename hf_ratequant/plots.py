"""PNG plots of distortion curves and allocations (matplotlib, headless; imported only when a plot is asked for)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .analysis import QuantizerCurves
    from .config import RateQuantConfig

__all__ = ["plot_allocation", "plot_distortion_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_distortion_curves(curves: dict[str, QuantizerCurves], path: str | os.PathLike) -> str:
    """One panel per quantizer: the measured distortion of every unit against bits (normalised by each unit's value
    at the lowest bit-width, so units of very different importance share an axis), the median per kind, and the
    curve with the median fitted beta. Returns the path written."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), sharey=True, squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items()):
        grid = torch.tensor(c.bit_grid, dtype=torch.float64)
        for i, (kind, color) in enumerate((("keys", "tab:blue"), ("values", "tab:orange"))):
            d = c.distortion[..., i, :].reshape(-1, len(c.bit_grid)).double().clamp_min(1e-30)
            rel = d / d[:, :1]
            for row in rel:
                ax.plot(grid, row, color=color, alpha=0.06, lw=0.8)
            beta = float(c.fit.beta[..., i].median())
            ax.plot(grid, rel.median(0).values, "o", color=color, label=f"{kind}: median unit")
            ax.plot(grid, beta ** (-(grid - grid[0])), "-", color=color, label=f"{kind}: beta {beta:.2f}")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("bits")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("distortion / distortion at lowest bits")
    fig.suptitle("Measured distortion D(b) per unit and fitted alpha * beta^(-b)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)


def plot_allocation(config: RateQuantConfig, path: str | os.PathLike, title: str | None = None) -> str:
    """Two heatmaps, layers x kv-heads, of the bits given to keys and to values. Returns the path written."""
    plt = _pyplot()
    bits = config.bits_tensor()  # (layers, heads, 2)
    shown = bits.clamp_max(9)  # 16 ("kept as is") would flatten the colour scale
    lo, hi = int(shown.min()), int(shown.max())
    layers, heads = bits.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 0.45 * heads * 2, 1.2 + 0.16 * layers), squeeze=False)
    for ax, i, kind in ((axes[0][0], 0, "keys"), (axes[0][1], 1, "values")):
        im = ax.imshow(shown[..., i].numpy(), cmap="viridis", vmin=lo - 0.5, vmax=hi + 0.5, aspect="auto",
                       interpolation="nearest")
        ax.set_title(f"{kind} (mean {bits[..., i].double().mean():.2f} bits)", fontsize=9)
        ax.set_xlabel("kv-head")
        ax.set_xticks(range(heads))
        ax.set_ylabel("layer")
        if layers * heads <= 400:
            for (layer, head), b in zip(torch.cartesian_prod(torch.arange(layers), torch.arange(heads)).tolist(),
                                        bits[..., i].reshape(-1).tolist()):
                ax.text(head, layer, str(b), ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=axes[0].tolist(), ticks=range(lo, hi + 1), label="bits")
    fig.suptitle(title or f"{config.quantizer}, {config.average_bits:g} average bits ({config.method})", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)
