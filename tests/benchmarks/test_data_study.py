"""benchmarks/data_study.py: every variant is a valid recipe differing from the others only in
its knob, and the table reads finished runs the way `prosparse train` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prosparse.training.recipe import load_recipe
from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    with benchmark_script("data_study") as mod:
        yield mod


def test_variants_are_equal_token_recovery_runs(study):
    recipe = ROOT / "configs" / "smollm2-full.yaml"
    base = load_recipe(recipe, study.base_overrides(600))
    assert [(s.lam, s.steps) for s in base.stages] == [(0.0, 600)]
    assert base.threshold.value == 0 and base.threshold.train == 0
    for name, extra in study.VARIANTS.items():
        r = load_recipe(recipe, study.base_overrides(600) + extra)
        assert r.stages == base.stages and r.batch_size == base.batch_size, name
        assert r.data.seq_len == base.data.seq_len, name
        # Held out on wiki, which every variant's training data keeps apart.
        assert r.data.heldout == ["wiki"], name
    mix = load_recipe(recipe, study.base_overrides(600) + study.VARIANTS["mix-kd+lm"])
    assert mix.data.sources == ["wiki", "austen", "pydoc"]
    assert "qa" not in mix.data.sources  # holds PIQA's scored split
    kd = load_recipe(recipe, study.base_overrides(600) + study.VARIANTS["wiki-kd"])
    assert kd.distill.lm_weight == 0 and kd.distill.weight > 0


def _fake_run(path: Path, sources, weights, lm_weight, ppl, tasks) -> Path:
    path.mkdir(parents=True)
    bench = {"tasks": {t: {"value": v} for t, v in tasks.items()}, "limit": 200,
             "average": sum(tasks.values()) / len(tasks) - 0.01}
    orig = {"tasks": {t: {"value": 0.5} for t in tasks}, "limit": 200, "average": 0.5}
    (path / "report.json").write_text(json.dumps({
        "original": {"perplexity": 20.0}, "final": {"perplexity": ppl, "average_sparsity": 0.66},
        "tokens_trained": 1024, "wall_seconds": 10.0,
        "benchmarks": {"original": orig, "final": bench}}))
    (path / "recipe.yaml").write_text(yaml.safe_dump({
        "data": {"sources": sources, "weights": weights},
        "distill": {"weight": 1.0, "lm_weight": lm_weight}}))
    (path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 256, "loss": 3.0}) + "\n"
        + json.dumps({"step": 2, "tokens": 512, "heldout_perplexity": 30.0,
                      "heldout_sparsity": 0.6}) + "\n")
    return path


def test_table_from_finished_runs(study, tmp_path):
    a = study.summarize(_fake_run(tmp_path / "wiki", ["wiki"], None, 1.0, 22.0,
                                  {"piqa": 0.6, "boolq": 0.4}))
    b = study.summarize(_fake_run(tmp_path / "mix", ["wiki", "austen"], [0.5, 0.5], 0.0, 25.0,
                                  {"piqa": 0.55, "boolq": 0.45}))
    assert a["lm_eval"]["task_mean"] == pytest.approx(0.5)
    assert a["lm_eval"]["average"] == pytest.approx(0.49)
    assert a["evals"] == [{"step": 2, "tokens": 512, "perplexity": 30.0, "sparsity": 0.6}]
    table = study.tables({"wiki": a, "mix": b}).splitlines()
    assert "piqa" in table[0] and "boolq" in table[0]
    orig, wiki, mix = table[2], table[3], table[4]
    assert orig.split("|")[1].strip() == "original" and "20.00" in orig
    assert "| wiki 1 " in wiki and "| kd+lm " in wiki and "1.100" in wiki and "49.00" in wiki
    assert "wiki 0.5 austen 0.5" in mix and "| kd " in mix and "1.250" in mix


def test_fp32_rescore_next_to_a_run_takes_precedence(study, tmp_path):
    run = _fake_run(tmp_path / "wiki", ["wiki"], None, 1.0, 22.0, {"piqa": 0.6, "boolq": 0.4})
    (run / "eval_fp32.json").write_text(json.dumps(
        {"tasks": {"piqa": {"value": 0.7}, "boolq": {"value": 0.5}}, "average": 0.6, "limit": 200}))
    r = study.summarize(run)
    assert r["lm_eval_rescored_fp32"] is True
    assert r["lm_eval"]["average"] == 0.6 and r["lm_eval"]["tasks"] == {"piqa": 0.7, "boolq": 0.5}
    assert r["lm_eval_original"]["average"] == 0.5  # the original stays the report's


def test_a_run_without_lm_eval_keeps_its_row_with_empty_scores(study, tmp_path):
    a = study.summarize(_fake_run(tmp_path / "wiki", ["wiki"], None, 1.0, 22.0,
                                  {"piqa": 0.6, "boolq": 0.4}))
    run = _fake_run(tmp_path / "bare", ["wiki"], None, 1.0, 24.0, {"piqa": 0.6})
    report = json.loads((run / "report.json").read_text())
    del report["benchmarks"]
    (run / "report.json").write_text(json.dumps(report))
    b = study.summarize(run)
    assert b["lm_eval"] is None and b["lm_eval_original"] is None
    cells = [c.strip() for c in study.tables({"wiki": a, "bare": b}).splitlines()[4].split("|")]
    assert cells[1] == "bare" and "1.200" in cells
    # avg, task mean, piqa, boolq empty, and the sparsity still in its own column
    assert cells[-6:-1] == ["66.00%", "", "", "", ""]
