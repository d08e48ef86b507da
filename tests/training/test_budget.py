"""``time_budget``: the schedule compresses as a whole, the estimate picks the steps that fit,
and a budgeted run trains, finishes and resumes on the schedule it started with."""

import json

import pytest

from prosparse.core.errors import UsageError
from prosparse.training import read_metrics, train
from prosparse.training.loop import budget_steps
from prosparse.training.recipe import BUDGET_PROBE_STEPS, load_recipe, scale_schedule
from tests.training.test_loop import _reset_accelerate, tiny_recipe

DEMO = "configs/demo.yaml"


def test_scale_schedule_compresses_every_step_count():
    recipe = load_recipe(DEMO, ["distill.steps=200"])
    small = scale_schedule(recipe, 300)
    assert [st.steps for st in small.stages] == [120, 170, 250, 300]
    assert [st.lam for st in small.stages] == [st.lam for st in recipe.stages]
    th = small.threshold
    assert (th.train_start, th.train_ramp, th.train) == (230, 30, recipe.threshold.train)
    assert small.distill.steps == 100
    assert small.optim.lr == recipe.optim.lr and small.log.eval_every == recipe.log.eval_every
    assert [st.steps for st in recipe.stages] == [240, 340, 500, 600]  # the input is untouched


def test_scale_schedule_keeps_stages_and_ramp_valid_when_tiny():
    recipe = load_recipe(DEMO)
    tiny = scale_schedule(recipe, 4)  # one step per stage
    assert [st.steps for st in tiny.stages] == [1, 2, 3, 4]
    assert tiny.threshold.train_start + tiny.threshold.train_ramp <= 4
    with pytest.raises(UsageError, match="fewer than the recipe's 4 stages"):
        scale_schedule(recipe, 3)


def test_budget_steps_is_the_last_step_that_fits():
    # no evaluations, a fixed threshold: minutes(n) = (elapsed + (n - done) * step) / 60
    recipe = load_recipe(DEMO, ["time_budget=10", "log.eval_every=0", "threshold.value=0.35",
                                "eval.tasks=[]"])
    kw = dict(elapsed=60.0, done=10, heldout_seconds=0.0, eval_fraction=0.25)
    steps, full = budget_steps(recipe, step_seconds=2.0, **kw)
    assert steps == 10 + (600 - 60) // 2 == 280
    assert full == pytest.approx((60 + 590 * 2.0) / 60)
    assert budget_steps(recipe, step_seconds=0.5, **kw)[0] == 600  # fits: the recipe as written
    # evaluations and the end of the run count: 8 s an evaluation of the held-out set
    recipe.log.eval_every = 100
    steps, _ = budget_steps(recipe, step_seconds=2.0, **{**kw, "heldout_seconds": 8.0})
    end = 4 * 8.0  # trained + final + saving (two evaluations' worth)
    periodic = (steps // 100 + (steps % 100 != 0)) * 0.25 * 8.0
    assert 60 + (steps - 10) * 2.0 + periodic + end <= 600
    nxt = steps + 1
    assert 60 + (nxt - 10) * 2.0 + (nxt // 100 + (nxt % 100 != 0)) * 2.0 + end > 600
    # a budget nothing fits: still one more step than done (never zero)
    recipe.time_budget = 0.01
    assert budget_steps(recipe, step_seconds=2.0, **kw)[0] == 11


def test_budget_counts_each_sweep_threshold_but_the_trained_one():
    recipe = load_recipe(DEMO, ["time_budget=10", "log.eval_every=0", "eval.tasks=[]",
                                "threshold.sweep=[0.3, 0.35, 0.4]", "threshold.train=0.35"])
    kw = dict(elapsed=60.0, done=10, step_seconds=2.0, eval_fraction=0.25)
    # trained + 0.3 + 0.4 + saving: 5 evaluations at the end, and the last step's (a quarter)
    steps, _ = budget_steps(recipe, heldout_seconds=8.0, **kw)
    assert steps == 10 + (600 - 60 - 5 * 8 - 0.25 * 8) // 2


def test_negative_budget_is_refused():
    with pytest.raises(UsageError, match="time_budget"):
        load_recipe(DEMO, ["time_budget=-1"])


def _budgeted(tiny_dir, text_file, *extra):
    return tiny_recipe(tiny_dir, text_file, "time_budget=0.0001", "log.eval_every=0",
                       "stages=[{lambda: 0, steps: 14}, {lambda: 0.5, steps: 20}, "
                       "{lambda: 1.0, steps: 24}]", *extra)


def test_budgeted_run_trains_the_steps_that_fit(tiny_dir, text_file, tmp_path):
    _reset_accelerate()
    result = train(_budgeted(tiny_dir, text_file), tmp_path / "run", progress=False)
    tb = result.report["time_budget"]
    # far too small a budget: one step after the probe, the schedule compressed around it
    assert tb["planned_steps"] == 24 and tb["steps"] == BUDGET_PROBE_STEPS + 2 == result.step
    assert [s["steps"] for s in tb["stages"]] == [7, 10, 12]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 13))
    assert result.report["tokens_trained"] == 12 * 4 * 32
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["time_budget"]["steps"] == 12


def test_budgeted_run_resumes_on_its_own_schedule(tiny_dir, text_file, tmp_path):
    recipe = _budgeted(tiny_dir, text_file)
    _reset_accelerate()
    first = train(recipe, tmp_path / "run", stop_after=BUDGET_PROBE_STEPS + 1, progress=False)
    assert first.step == BUDGET_PROBE_STEPS + 1 and not first.report  # stopped, checkpointed
    _reset_accelerate()
    done = train(_budgeted(tiny_dir, text_file), tmp_path / "run", resume=True, progress=False)
    assert done.step == 12 and done.report["time_budget"]["steps"] == 12
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 12


def test_time_budget_flag_wins_over_the_recipe_and_bad_values_exit_2(capsys):
    from prosparse.cli.args import budget_overrides
    from prosparse.cli.main import build_parser, main

    args = build_parser().parse_args(["train", DEMO, "time_budget=30", "--time-budget", "14"])
    assert budget_overrides(args) == ["time_budget=30", "time_budget=14"]
    assert load_recipe(DEMO, budget_overrides(args)).time_budget == 14
    args = build_parser().parse_args(["demo"])
    assert budget_overrides(args) == []  # the recipe's own
    with pytest.raises(SystemExit) as e:
        main(["demo", "--time-budget", "-5"])
    assert e.value.code == 2 and "--time-budget" in capsys.readouterr().err
