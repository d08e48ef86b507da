"""lambda <-> target sparsity (paper Section 4.4, Fig. 3).

The final sparsity is governed mostly by the last-stage factor lambda_S and follows
``sparsity(%) = 100 - exp(-a * lambda_S^alpha + b)``; for ProSparse-7B the paper fits a = 1.76,
alpha = 0.30, b = 3.49. The fit only holds for the model, data, normalisation and token budget it
was measured on: for another setting, measure a few (lambda_S, sparsity) points and fit them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prosparse.core.errors import UsageError


@dataclass(frozen=True)
class SparsityFit:
    """``sparsity(%) = 100 - exp(-a * lambda^alpha + b)``."""

    a: float = 1.76
    """Slope on lambda^alpha (paper, 7B: 1.76)."""
    alpha: float = 0.30
    """Exponent of lambda (paper, 7B: 0.30)."""
    b: float = 3.49
    """Offset: sparsity at lambda -> 0 is 100 - exp(b) (paper, 7B: 3.49, i.e. 67.2%)."""

    def sparsity(self, lam: float) -> float:
        """Predicted average sparsity in % for the last-stage factor ``lam`` (>= 0)."""
        if not lam >= 0 or not math.isfinite(lam):
            raise UsageError(f"lambda ({lam}) must be a finite number >= 0")
        return 100.0 - math.exp(-self.a * lam ** self.alpha + self.b)

    def lam(self, sparsity: float) -> float:
        """lambda_S that the fit says reaches ``sparsity`` (%), e.g. 89.0."""
        lo = self.sparsity(0.0)
        if not lo <= sparsity < 100:
            raise UsageError(
                f"target sparsity {sparsity}% is outside this fit's range [{lo:.2f}, 100): below "
                f"{lo:.2f}% no L1 is needed; 100% is never reached. Is it a fraction? Pass percent"
            )
        return ((self.b - math.log(100.0 - sparsity)) / self.a) ** (1.0 / self.alpha)


PAPER_7B = SparsityFit()


def lambda_for_sparsity(target: float, fit: SparsityFit = PAPER_7B) -> float:
    """lambda_S for a target average sparsity in % (default: the paper's 7B fit)."""
    return fit.lam(target)


def sparsity_for_lambda(lam: float, fit: SparsityFit = PAPER_7B) -> float:
    """Predicted average sparsity in % for lambda_S (default: the paper's 7B fit)."""
    return fit.sparsity(lam)


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    icpt = my - slope * mx
    sse = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    return slope, icpt, sse


def fit_points(lams: Sequence[float], sparsities: Sequence[float],
               alpha: float | None = None) -> SparsityFit:
    """Fit a, b (and alpha when >= 3 points and ``alpha`` is None) to measured points.

    ``sparsities`` are in %. Linear least squares of ``log(100 - s) = b - a * lam^alpha`` for each
    alpha on a grid (0.05..1.50); with two points alpha is fixed (the paper's 0.30 by default).
    """
    if len(lams) != len(sparsities):
        raise UsageError(f"{len(lams)} lambdas for {len(sparsities)} sparsities; pair them up")
    if len(lams) < 2:
        raise UsageError("fitting needs at least 2 measured (lambda, sparsity) points")
    if any(not 0 <= s < 100 for s in sparsities):  # also refuses nan
        raise UsageError(f"sparsities must be percentages in [0, 100): got {list(sparsities)}")
    if any(not 0 <= lam < math.inf for lam in lams):
        raise UsageError(f"lambdas must be >= 0: got {list(lams)}")
    ys = [math.log(100.0 - s) for s in sparsities]
    if alpha is None and len(lams) == 2:
        alpha = PAPER_7B.alpha
    grid = [alpha] if alpha is not None else [k / 100 for k in range(5, 151)]
    best = None
    for al in grid:
        slope, icpt, sse = _linear_fit([lam ** al for lam in lams], ys)
        if best is None or sse < best[0]:
            best = (sse, SparsityFit(a=-slope, alpha=al, b=icpt))
    return best[1]
