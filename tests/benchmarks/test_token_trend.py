"""benchmarks/token_trend.py: sparsity at a fixed perplexity cost read off a run's curve, the
power-law fit of the dense fraction, and the committed runs it reads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trend():
    with benchmark_script("token_trend") as mod:
        yield mod


def test_sparsity_at_interpolates_where_the_curve_leaves_the_limit(trend):
    pts = [(0.80, 20.0), (0.70, 19.0), (0.90, 30.0)]
    assert trend.sparsity_at(pts, 19.5) == pytest.approx(0.75)
    assert trend.sparsity_at(pts, 25.0) == pytest.approx(0.85)
    assert trend.sparsity_at(pts, 30.0) == pytest.approx(0.90)
    assert trend.sparsity_at(pts, 18.0) is None


def test_sparsity_at_keeps_a_sparser_point_back_under_the_limit(trend):
    # a sweep whose perplexity dips again at higher sparsity: the later point counts
    pts = [(0.70, 21.0), (0.75, 23.0), (0.80, 21.5)]
    assert trend.sparsity_at(pts, 22.0) == pytest.approx(0.80)


def test_power_law_fit_recovers_its_parameters(trend):
    xs = [1e5, 3e5, 1e6, 3e6]
    ys = [2.0 * x ** -0.4 for x in xs]
    a, b = trend.fit_power_law(xs, ys)
    assert a == pytest.approx(2.0, rel=1e-9) and b == pytest.approx(0.4, rel=1e-9)


def test_every_committed_run_loads(trend):
    for _, rel in trend.RUNS:
        tokens, base, pts = trend.load_points(trend.RESULTS / rel)
        assert tokens > 0 and 15 < base < 25 and len(pts) >= 1
        assert all(0 < s < 1 and math.isfinite(p) for s, p in pts)


def test_the_prepared_run_is_the_trend_budget_within_90_minutes(trend):
    """benchmarks/paper_sparsity.yaml: the tokens the trend gives, the quality bar's lm-eval
    (500 documents a task, 5 tasks) and a 90-minute budget that compresses it where steps are
    slower; its report lands where the trend reads it."""
    from prosparse.training.recipe import load_recipe

    r = load_recipe(ROOT / "benchmarks" / "paper_sparsity.yaml")
    tokens = r.stages[-1].steps * r.batch_size * r.grad_accum * r.data.seq_len
    assert tokens == 5000 * trend.TOKENS_PER_STEP
    assert r.time_budget == 90 and r.eval.limit >= 500 and len(r.eval.tasks) == 5
    assert r.threshold.per_layer and r.threshold.train > 0
    assert r.threshold.reference == "original" and r.threshold.tolerance == 0.15
    assert trend.EXTRA.name == "paper_sparsity_report.json"
