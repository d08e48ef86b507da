"""Algorithm 1 schedule: Table 6 reproduced at the first step, end of warm-up, mid-ramp, last."""

import math

import pytest

from prosparse.sparsity.schedule import Stage, l1_factor, schedule_curve, validate_stages
from prosparse.training.recipe import load_recipe

TABLE6_7B = [Stage(5000, 0.0), Stage(6000, 5e-3), Stage(10000, 5e-2), Stage(12000, 5e-2),
             Stage(16000, 2e-1), Stage(16500, 2e-1)]


def eta(t, t0, t1):
    return (math.sin(-math.pi / 2 + math.pi * (t - t0) / (t1 - t0)) + 1) / 2


def test_table6_points():
    s = TABLE6_7B
    assert l1_factor(1, s) == 0.0  # first step: stage 0
    assert l1_factor(5000, s) == 0.0  # last step of stage 0
    assert l1_factor(5001, s) == 5e-3  # stage 1 flat from its first step
    assert l1_factor(6000, s) == 5e-3  # end of warm-up
    assert l1_factor(8000, s) == pytest.approx(5e-3 + 0.5 * (5e-2 - 5e-3))  # mid-ramp: eta=1/2
    assert l1_factor(7000, s) == pytest.approx(5e-3 + eta(7000, 6000, 10000) * 4.5e-2)
    assert l1_factor(10000, s) == pytest.approx(5e-2)
    assert l1_factor(11000, s) == 5e-2  # equal peaks: flat
    assert l1_factor(14000, s) == pytest.approx(0.125)
    assert l1_factor(16500, s) == pytest.approx(0.2)  # last step
    assert l1_factor(20000, s) == pytest.approx(0.2)  # past the end: stays


def test_ramp_is_monotone_and_smooth_at_ends():
    lams = [l1_factor(t, TABLE6_7B) for t in range(6000, 10001)]
    assert all(b >= a for a, b in zip(lams, lams[1:]))
    # the sine has small derivatives near trough and peak (paper 3.2), large in the middle
    assert lams[1] - lams[0] < (lams[2001] - lams[2000]) / 100


def test_fixed_stages_hold_smaller_lambda():
    s = [Stage(10, 0.0), Stage(20, 1e-3), Stage(30, 5e-2), Stage(40, 5e-2, fixed=True),
         Stage(50, 1e-2, fixed=True)]
    validate_stages(s)
    assert l1_factor(35, s) == 5e-2 and l1_factor(45, s) == 1e-2


def test_curve_json_covers_every_step_or_every_kth():
    c = schedule_curve(TABLE6_7B)
    assert c["steps"] == list(range(1, 16501)) and len(c["lambda"]) == 16500
    c = schedule_curve(TABLE6_7B, every=1000)
    assert c["steps"][:2] == [1, 1001] and c["steps"][-1] == 16500


def test_recipe_file_matches_table6():
    recipe = load_recipe("configs/llama2-7b.yaml")
    assert [(s.lam, s.steps) for s in recipe.stages] == [(s.lam, s.steps) for s in TABLE6_7B]
    assert recipe.optim.lr == 3e-5 and recipe.data.seq_len == 4096


@pytest.mark.parametrize("stages, message", [
    ([Stage(10, 0.0), Stage(10, 1e-3)], r"stages\[1\].steps \(10\) must be greater than "
                                         r"stages\[0\].steps \(10\)"),
    ([Stage(10, 0.0), Stage(20, 5e-2), Stage(30, 1e-2)], r"stages\[2\].lambda \(0.01\) must be "
                                                          r">= stages\[1\].lambda.*fixed: true"),
    ([Stage(10, -1.0)], r"stages\[0\].lambda \(-1.0\) must be a finite number >= 0"),
    ([Stage(0, 0.0)], r"stages\[0\].steps \(0\) must be greater than 0"),
    ([], "stages is empty"),
])
def test_validation_names_stage_and_fix(stages, message):
    with pytest.raises(ValueError, match=message):
        validate_stages(stages)
