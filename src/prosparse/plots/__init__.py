"""Figures for papers. The only package that imports matplotlib (lazily, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

from prosparse.io import atomic_write


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install 'prosparse[plots]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | os.PathLike) -> Path:
    plt = _pyplot()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=Path(out).suffix.lstrip(".") or "png")

    try:
        return atomic_write(out, write)
    finally:
        plt.close(fig)


def plot_layer_sparsity(
    series: dict[str, list[float]], out: str | os.PathLike, title: str = "Layer-wise sparsity"
) -> Path:
    """One line per dataset/model of per-layer sparsity in % (paper Fig. 4)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), [100 * v for v in values], marker="o", ms=3, label=name)
    ax.set_xlabel("layer (1 = first)")
    ax.set_ylabel("sparsity (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_curves(
    x: list[float],
    curves: dict[str, list[float]],
    out: str | os.PathLike,
    xlabel: str = "step",
    title: str = "",
) -> Path:
    """Stacked panels sharing x, one per named curve (lambda, loss, sparsity: paper Fig. 2)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(curves), 1, figsize=(6.4, 2.0 * len(curves)), sharex=True,
                             squeeze=False)
    for ax, (name, ys) in zip(axes[:, 0], curves.items()):
        ax.plot(x[: len(ys)], ys)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    if title:
        axes[0, 0].set_title(title)
    return _save(fig, out)


def plot_predictor_layers(
    layers: list[dict], out: str | os.PathLike, title: str = "Activation predictors"
) -> Path:
    """Per-layer recall, predicted sparsity and true sparsity in % (paper Table 2, by layer)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = [m.get("layer", i) + 1 for i, m in enumerate(layers)]
    for key, label, style in (("recall", "recall", "o-"),
                              ("predicted_sparsity", "predicted sparsity", "s-"),
                              ("true_sparsity", "true sparsity", "^--")):
        ax.plot(x, [100 * m[key] for m in layers], style, ms=3, label=label)
    ax.set_xlabel("layer (1 = first; tables and JSON count from 0)")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)
