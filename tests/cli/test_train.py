"""``prosparse schedule`` and ``prosparse fit-lambda`` through the CLI."""

import json
from pathlib import Path

import pytest

from prosparse.cli import main


def test_schedule_json_reproduces_table6(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["schedule", "configs/llama2-7b.yaml", "--json", str(out)]) == 0
    curve = json.loads(out.read_text())
    lam = dict(zip(curve["steps"], curve["lambda"]))
    assert curve["steps"] == list(range(1, 16501))
    assert lam[5000] == 0 and lam[5001] == 5e-3 and lam[6000] == 5e-3
    assert lam[10000] == pytest.approx(5e-2) and lam[12000] == pytest.approx(5e-2)
    assert lam[16000] == pytest.approx(0.2) and lam[16500] == pytest.approx(0.2)
    assert "sum_scaled" in capsys.readouterr().out


def test_schedule_override_and_error(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["schedule", "configs/llama2-7b.yaml", "stages.5.lambda=0.3", "stages.4.lambda=0.3",
                 "--json", str(out), "--every", "500"]) == 0
    assert json.loads(out.read_text())["lambda"][-1] == pytest.approx(0.3)
    assert main(["schedule", "configs/llama2-7b.yaml", "stages.3.lambda=0.01"]) == 2
    assert "stages[3].lambda (0.01) must be >= stages[2].lambda" in capsys.readouterr().err


def test_fit_lambda(capsys):
    assert main(["fit-lambda", "--target", "89.32"]) == 0
    assert "lambda_S = 0.2227" in capsys.readouterr().out


def test_fit_lambda_reads_the_committed_frontier_rows(tmp_path, capsys):
    """Fig. 3's points come from the rows' JSON (runs/ is not committed): last-stage lambda
    from the kept recipe, sparsity of the t = 0 point."""
    from prosparse.cli.train import run_point

    rows = sorted((Path(__file__).parents[2] / "benchmarks/results/frontier").glob("prosparse-*.json"))
    rows = [r for r in rows if json.loads(r.read_text()).get("lambda_s") is not None]
    assert len(rows) >= 2
    for r in rows:
        row = json.loads(r.read_text())
        assert run_point(r) == pytest.approx((row["lambda_s"], 100 * row["points"][0]["sparsity"]))
    assert main(["fit-lambda", *(a for r in rows for a in ("--run", str(r))),
                 "--target", "80"]) == 0
    out = capsys.readouterr().out
    assert "(your points)" in out and "target 80% -> lambda_S" in out
    bad = tmp_path / "cats.json"
    bad.write_text(json.dumps({"name": "cats-0.5", "kind": "free", "points": [{"sparsity": 0.5}]}))
    assert main(["fit-lambda", "--run", str(bad)]) == 2
    assert "not a trained point" in capsys.readouterr().err


def test_fit_lambda_reads_a_run_folder_and_a_point_file(tmp_path, capsys):
    """--run takes what `prosparse train` writes (recipe.yaml, report.json) and the generic
    point file: "recipe" (YAML text or a mapping) and "trained": {"average_sparsity": F}."""
    from prosparse.cli.train import run_point

    stages = "stages:\n  - {lambda: 0, steps: 10}\n  - {lambda: 0.4, steps: 20}\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: m\n" + stages)
    (run / "report.json").write_text(json.dumps({"trained": {"average_sparsity": 0.8}}))
    assert run_point(run) == pytest.approx((0.4, 80.0))
    point = tmp_path / "point.json"
    point.write_text(json.dumps({"recipe": {"model": "m", "stages": [
        {"lambda": 0, "steps": 10}, {"lambda": 0.9, "steps": 20}]},
        "trained": {"average_sparsity": 0.9}}))
    assert run_point(point) == pytest.approx((0.9, 90.0))
    assert main(["fit-lambda", "--run", str(run), "--run", str(point), "--predict", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "lambda_S 0.4: sparsity 80.00%" in out and "lambda_S 0.9: sparsity 90.00%" in out
    (run / "report.json").write_text(json.dumps({"baseline": {}}))
    assert main(["fit-lambda", "--run", str(run)]) == 2
    assert "no 'trained' measurement" in capsys.readouterr().err
