"""``prosparse schedule`` and ``prosparse fit-lambda`` through the CLI."""

import json

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
