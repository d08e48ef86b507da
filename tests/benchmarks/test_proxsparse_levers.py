"""benchmarks/proxsparse_levers.py: every row is a valid prune config, the levers start from the
paper's scores, and the lm-eval table's means are the tasks' own."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def levers():
    with benchmark_script("proxsparse_levers") as mod:
        yield mod


def test_every_row_is_a_valid_config_and_one_lever_from_the_base(levers):
    from prosparse.pruning.run import config_from_mapping

    base = config_from_mapping(levers.BASE)
    assert (base.prox.mask_score, base.prox.reg_score) == ("magnitude", "magnitude")
    for name, overrides in levers.ROWS.items():
        cfg = config_from_mapping({**levers.BASE, **overrides})
        cfg.check()
        assert cfg.samples * cfg.seq_len in (64 * 256, 128 * 256), name  # equal tokens
    both = config_from_mapping({**levers.BASE, **levers.ROWS["wanda-both"]})
    assert (both.prox.mask_score, both.prox.reg_score) == ("wanda", "wanda")


def test_lm_eval_table_means(levers):
    tasks = dict(zip(levers.TASKS, [0.6, 0.4, 0.3, 0.9, 0.5]))
    text = levers.lm_eval_table({"x": {"limit": 500, "tasks": tasks, "average": 0.55}})
    row = [c.strip() for c in text.splitlines()[-1].strip("|").split("|")]
    assert row[-3:] == ["55.0", "54.0", "45.0"]  # groups' avg, mean of 5, mean without BoolQ
