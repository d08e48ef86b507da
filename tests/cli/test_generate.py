"""``prosparse generate`` end to end on tiny saved models: streamed text, the stats line, JSON
keys, and the note when the model's FFN is not ReLU-family."""

from __future__ import annotations

import json

import pytest
import torch

from prosparse import save_model
from prosparse.cli import main
from prosparse.models.relufy import relufy_


@pytest.fixture
def relu_dir(llama, tokenizer, tmp_path):
    relufy_(llama, "relu")
    return save_model(llama, tokenizer, tmp_path / "relu")


def _greedy(folder, tokenizer, prompt: str, n: int) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_streams_and_writes_json(relu_dir, tokenizer, tmp_path, capsys):
    js = tmp_path / "g.json"
    assert main(["generate", str(relu_dir), "--prompt", "gamma delta", "--max-new-tokens", "12",
                 "--threads", "1", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    r = json.loads(js.read_text())
    assert r["text"] == _greedy(relu_dir, tokenizer, "gamma delta", 12)  # fp32: exact
    assert {"text", "new_tokens", "tokens_per_s", "average_sparsity", "layer_sparsity",
            "prompt", "model", "path"} <= set(r)
    assert r["path"] == "exact" and r["new_tokens"] == 12 and r["prompt"] == "gamma delta"
    assert r["tokens_per_s"] > 0 and len(r["layer_sparsity"]) == 2 and r["threads"] == 1
    assert r["dtype"] == "fp32" and r["sampling"] is None and "note" not in r
    assert out.startswith("gamma delta" + r["text"])  # the prompt, then the streamed text
    assert "12 new tokens" in out and "tokens/s (exact sparse FFN)" in out
    assert f"activation sparsity {100 * r['average_sparsity']:.2f}%" in out

    dense = tmp_path / "d.json"
    assert main(["generate", str(relu_dir), "--prompt", "gamma delta", "--max-new-tokens", "12",
                 "--dense", "--dtype", "float32", "--json", str(dense)]) == 0
    d = json.loads(dense.read_text())
    assert d["path"] == "dense" and d["dtype"] == "fp32"
    assert (d["text"], d["average_sparsity"]) == (r["text"], r["average_sparsity"])


def test_sampled_text_follows_the_seed(relu_dir, tmp_path):
    texts = []
    for seed in ("1", "1", "2"):
        js = tmp_path / f"s{len(texts)}.json"
        assert main(["generate", str(relu_dir), "--prompt", "alpha", "--max-new-tokens", "16",
                     "--temperature", "1.5", "--top-p", "0.95", "--seed", seed,
                     "--json", str(js)]) == 0
        r = json.loads(js.read_text())
        assert r["sampling"] == {"temperature": 1.5, "top_p": 0.95, "seed": int(seed)}
        texts.append(r["text"])
    assert texts[0] == texts[1] != texts[2]


def test_a_silu_model_runs_dense_with_a_note(llama, tokenizer, tmp_path, capsys):
    """The sparse path is the default, not a demand: a SiLU model (the embedded default, a
    pruned one) generates dense and says why and how to convert it; --predictors, which asks
    for a sparse path by name, refuses."""
    silu = save_model(llama, tokenizer, tmp_path / "silu")
    js = tmp_path / "g.json"
    assert main(["generate", str(silu), "--prompt", "beta", "--max-new-tokens", "4",
                 "--json", str(js)]) == 0
    err = capsys.readouterr().err
    assert "note: " in err and "SiLU" in err and "prosparse convert" in err
    r = json.loads(js.read_text())
    assert r["path"] == "dense" and "SiLU" in r["note"]
    assert r["text"] == _greedy(silu, tokenizer, "beta", 4)
    # --act relu swaps it on load: the exact path runs
    assert main(["generate", str(silu), "--prompt", "beta", "--max-new-tokens", "4", "--act",
                 "relu", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["path"] == "exact"


def test_predicted_path_through_the_cli(relu_dir, tokenizer, tmp_path, capsys):
    from prosparse.predictors.export import save_predictors
    from prosparse.predictors.model import PredictorSet

    pset = PredictorSet(64, 176, 2, hidden=8)
    pset.thresholds.fill_(-1e30)  # every neuron predicted active: the exact text
    pred = save_predictors(pset, tmp_path / "pred")
    js = tmp_path / "p.json"
    assert main(["generate", str(relu_dir), "--prompt", "gamma", "--max-new-tokens", "8",
                 "--predictors", str(pred), "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["path"] == "predicted" and r["predicted_sparsity"] == 0.0
    assert r["text"] == _greedy(relu_dir, tokenizer, "gamma", 8)
    assert "predictor-driven sparse FFN, predicted sparsity 0.00%" in capsys.readouterr().out


def test_a_pruned_relu_checkpoint_generates_exactly(relu_dir, tokenizer, tmp_path):
    pruned, js = tmp_path / "pruned", tmp_path / "g.json"
    assert main(["prune", str(relu_dir), "--method", "magnitude", "--eval-tokens", "0",
                 "--out", str(pruned)]) == 0
    assert main(["generate", str(pruned), "--prompt", "delta", "--max-new-tokens", "8",
                 "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["path"] == "exact" and r["text"] == _greedy(pruned, tokenizer, "delta", 8)
