"""Figures for papers. The only package that imports matplotlib (lazily, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

from prosparse.core.io import atomic_write


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


def plot_frontier(series: dict[str, list[tuple[float, float]]], out: str | os.PathLike,
                  baseline: float | None = None,
                  title: str = "Held-out perplexity against activation sparsity",
                  zoom: tuple[float, float] | None = None) -> Path:
    """One series per method of (sparsity %, perplexity) points, lowest sparsity first, with
    the original model's perplexity as a dashed line (paper Tables 4, 9; CATS, TEAL).

    ``zoom=(lo, hi)`` adds a second panel on a linear perplexity axis between ``lo`` and
    ``hi``, where trained rows (1.2-2.5x the original) sit apart instead of in one band of the
    log axis that the training-free peers' hundreds stretch."""
    plt = _pyplot()
    panels = 2 if zoom else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    markers = "osD^v<>phX*"
    # ten distinct colours first, then tab20's lighter halves
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2]
    for k, ax in enumerate(axes[0]):
        for i, (name, points) in enumerate(series.items()):
            pts = sorted(points)
            if k == 1:
                pts = [p for p in pts if zoom[0] <= p[1] <= zoom[1]]
                if not pts:
                    continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                    ms=4, color=colours[i % len(colours)], label=name if k == 0 else None)
        if baseline is not None:
            ax.axhline(baseline, color="grey", ls="--", lw=1,
                       label="original (dense)" if k == 0 else None)
        ax.set_xlabel("activation sparsity (%)")
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3, which="both")
        if k == 0:
            ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
        else:
            ax.set_ylim(*zoom)
            ax.set_title(f"zoom: perplexity {zoom[0]:.3g} to {zoom[1]:.3g} (linear)", fontsize=10)
    if zoom:  # one legend for both panels, beside them
        fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    else:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plot_lambda_fit(points: list[tuple[float, float]], fit, out: str | os.PathLike,
                    title: str = "Final sparsity against lambda_S (paper Fig. 3)") -> Path:
    """Measured (lambda_S, sparsity %) points and the negative-exponential fit
    ``100 - exp(-a lambda^alpha + b)`` drawn through them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    lo, hi = min(p[0] for p in points), max(p[0] for p in points)
    xs = [lo * 0.8 + (hi * 1.2 - lo * 0.8) * k / 100 for k in range(101)]
    ax.plot(xs, [fit.sparsity(x) for x in xs], "-",
            label=f"100 - exp(-{fit.a:.3g} lambda^{fit.alpha:.2g} + {fit.b:.3g})")
    ax.plot([p[0] for p in points], [p[1] for p in points], "o", label="measured")
    ax.set_xlabel("lambda_S (last stage)")
    ax.set_ylabel("final sparsity (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)
