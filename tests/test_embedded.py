"""The embedded default model and corpus: the README's promise, on the real SmolLM2-135M."""

from __future__ import annotations

import json

import pytest

from prosparse import load_model, relufy_
from prosparse.cli import main
from prosparse.data import load_texts, pack_blocks
from prosparse.measure.heldout import evaluate_blocks

pytestmark = pytest.mark.slow  # loads the real SmolLM2-135M (about 40 s the first time)


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_embedded_model_loads_and_answers(smol):
    model, tok = smol
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_embedded_sparsity_silu_vs_relu_swap(smol):
    model, tok = smol
    blocks = pack_blocks(tok, load_texts("wiki", "heldout"), seq_len=128, max_tokens=512)
    silu = evaluate_blocks(model, blocks)
    assert silu.average_sparsity < 1e-3 and 10 < silu.perplexity < 40
    relufy_(model)
    relu = evaluate_blocks(model, blocks)
    assert 0.55 < relu.average_sparsity < 0.72 and relu.perplexity > 10 * silu.perplexity


def test_sparsity_command_on_the_default(tmp_path):
    js = tmp_path / "s.json"
    assert main(["sparsity", "--act", "relu", "--tokens", "256", "--seq-len", "128",
                 "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert result["model"] == "smollm2-135m" and set(result["datasets"]) == {"wiki"}
    assert len(result["datasets"]["wiki"]["layer_sparsity"]) == 30
