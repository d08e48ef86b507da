"""benchmarks/pruning_compose.py: both orders spend the same training and start from the same
pruned or trained model, steps another row already ran are reused, and the table shows every
held-out source."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def compose():
    with benchmark_script("pruning_compose") as mod:
        yield mod


def test_orders_share_their_starting_models_and_recipe(compose):
    rows = {r.name: r for r in compose.rows()}
    train = rows["prosparse"].steps[0]
    assert train[:2] == ["train", "configs/demo.yaml"]
    for m in ("wanda", "sparsegpt", "proxsparse"):
        then_2of4 = rows[f"prosparse-then-{m}"]
        assert then_2of4.steps[0] == train  # the ProSparse model of the "prosparse" row
        assert then_2of4.steps[1][1] == compose.PROSPARSE_MODEL
        first = rows[f"{m}-then-prosparse"]
        assert first.steps[0] == rows[m].steps[0]  # pruned once, by the method's own row
        # the same recipe on the pruned model: only the model and the folder differ
        assert [a for a in first.steps[1] if not a.startswith("model=")][:-3] == \
            [a for a in train if not a.startswith("model=")][:-3]
        assert f"model={rows[m].measure}" in first.steps[1]


def test_done_steps_are_reused(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(compose, "ROOT", tmp_path)
    prune = compose._prune("smollm2-135m", "wanda", "runs/x")
    train = compose._train("runs/x", "runs/y")
    assert not compose._done(prune) and not compose._done(train)
    (tmp_path / "runs/x").mkdir(parents=True)
    (tmp_path / "runs/x/config.json").write_text("{}")
    assert not compose._done(prune)  # no report: the prune did not finish
    (tmp_path / "runs/x.prune.json").write_text("{}")
    assert compose._done(prune)
    (tmp_path / "runs/y/final").mkdir(parents=True)
    assert not compose._done(train)
    (tmp_path / "runs/y/final/config.json").write_text("{}")
    assert compose._done(train)
    assert not compose._done(["sparsity", "runs/x", "--json", "runs/x.json"])


def test_report_has_a_column_per_heldout_source(compose):
    row = {"name": "wanda", "order": "-", "activation_sparsity": 0.0, "weight_sparsity": 0.5,
           "compliance_2of4": 1.0, "perplexity": 170.0, "prune_seconds": 80.0,
           "wall_seconds": 120.0, "commands": ["prosparse prune"],
           "heldout_perplexity": {"austen": 225.6, "pydoc": 158.6}}
    old = {**row, "name": "original", "heldout_perplexity": {}}
    lines = compose.report([row, old]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[5:8] == ["held-out ppl", "austen ppl", "pydoc ppl"]
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")]
             for ln in lines[2:]}
    assert cells["wanda"][5:8] == ["170.00", "225.60", "158.60"]
    assert cells["original"][6:8] == ["-", "-"]  # a row measured before the column existed
