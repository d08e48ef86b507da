"""lambda <-> sparsity: the paper's 7B fit, inversion, and fitting measured points."""

import math

import pytest

from prosparse.sparsity.fit import SparsityFit, fit_points, lambda_for_sparsity, sparsity_for_lambda


def test_paper_fit_values_and_inverse():
    # Direct evaluation of 100 - exp(-1.76 * lam^0.30 + 3.49)
    assert sparsity_for_lambda(0.2) == pytest.approx(100 - math.exp(-1.76 * 0.2 ** 0.3 + 3.49))
    for target in (75.0, 85.0, 89.32, 93.0):
        lam = lambda_for_sparsity(target)
        assert sparsity_for_lambda(lam) == pytest.approx(target, abs=1e-9)


def test_target_outside_range_says_why():
    with pytest.raises(ValueError, match=r"outside this fit's range \[67.2"):
        lambda_for_sparsity(50.0)
    with pytest.raises(ValueError, match="Pass percent"):
        lambda_for_sparsity(0.9)


def test_fit_recovers_known_curve():
    true = SparsityFit(a=2.0, alpha=0.5, b=3.0)
    lams = [0.01, 0.05, 0.1, 0.3, 1.0]
    fit = fit_points(lams, [true.sparsity(x) for x in lams])
    assert fit.alpha == pytest.approx(0.5) and fit.a == pytest.approx(2.0, rel=1e-6)
    assert fit.b == pytest.approx(3.0, rel=1e-6)


def test_two_points_fix_alpha():
    fit = fit_points([0.05, 0.2], [80.0, 88.0])
    assert fit.alpha == 0.30
    assert fit.sparsity(0.05) == pytest.approx(80.0) and fit.sparsity(0.2) == pytest.approx(88.0)
