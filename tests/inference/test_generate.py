"""``generate``: the exact sparse FFN writes transformers' own greedy text (fp32), sampling is
seeded, the predicted path with every neuron kept is exact too, and the sparsity it reports is
the fraction of exact zeros of relu(gate) * up at the generated tokens, counted by hand."""

from __future__ import annotations

import pytest
import torch

from prosparse import save_model
from prosparse.core.errors import UsageError
from prosparse.inference.generate import (
    check_predictors_fit,
    generate,
    model_shape,
    predictor_shape,
    sparse_unready_config,
)
from prosparse.models.loading import load_model
from prosparse.models.relufy import relufy_
from tests.conftest import char_tokenizer, tiny_llama

PROMPT = "alpha beta"


@pytest.fixture
def relu_dir(llama, tokenizer, tmp_path):
    relufy_(llama, "relu")
    return save_model(llama, tokenizer, tmp_path / "relu")


def _transformers_greedy(folder, tokenizer, n: int, **kwargs) -> list[int]:
    """transformers' own generate on the saved checkpoint: no prosparse module anywhere."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _x1_sparsity_by_hand(folder, ids: list[int], start: int) -> list[float]:
    """Per layer, zeros of relu(gate_proj(x)) * up_proj(x) at positions >= start."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    seen: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("gate_proj", "up_proj"):
            hooks.append(getattr(layer.mlp, name).register_forward_hook(
                lambda m, a, out, i=i, name=name: seen.setdefault(i, {}).__setitem__(name, out)))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    x1 = [(torch.relu(seen[i]["gate_proj"]) * seen[i]["up_proj"])[0, start:] for i in sorted(seen)]
    return [int(x.eq(0).sum()) / x.numel() for x in x1]


@pytest.mark.parametrize("path", ["exact", "dense"])
def test_greedy_text_is_transformers_own(path, relu_dir, tokenizer):
    want = _transformers_greedy(relu_dir, tokenizer, 16, do_sample=False)
    model, tok = load_model(str(relu_dir))
    g = generate(model, tok, PROMPT, 16, path=path)
    assert g.token_ids == want, f"{path}: {g.token_ids} != transformers' {want}"
    assert g.text == tokenizer.decode(want, skip_special_tokens=True)
    assert g.new_tokens == len(want) and g.path == path and g.sampling is None
    assert g.tokens_per_s > 0 and g.seconds > 0
    start = len(tokenizer(PROMPT).input_ids)
    by_hand = _x1_sparsity_by_hand(relu_dir, tokenizer(PROMPT).input_ids + want, start)
    assert g.layer_sparsity == pytest.approx(by_hand, abs=1e-9)
    assert g.average_sparsity == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-9)
    assert 0.2 < g.average_sparsity < 0.8  # random ReLU gates: about half
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"  # dense modules put back


def test_sampling_is_seeded_and_is_transformers_own(relu_dir, tokenizer):
    model, tok = load_model(str(relu_dir))
    kw = dict(temperature=0.9, top_p=0.8, seed=3)
    a = generate(model, tok, PROMPT, 12, path="dense", **kw)
    b = generate(model, tok, PROMPT, 12, path="dense", **kw)
    assert a.token_ids == b.token_ids and a.sampling == kw
    torch.manual_seed(3)
    assert a.token_ids == _transformers_greedy(relu_dir, tokenizer, 12, do_sample=True,
                                               temperature=0.9, top_p=0.8, top_k=0)
    c = generate(model, tok, PROMPT, 12, path="dense", temperature=0.9, top_p=0.8, seed=4)
    greedy = generate(model, tok, PROMPT, 12, path="dense")
    assert a.token_ids != c.token_ids or a.token_ids != greedy.token_ids
    exact = generate(model, tok, PROMPT, 12, path="exact", **kw)
    assert exact.token_ids == generate(model, tok, PROMPT, 12, path="exact", **kw).token_ids


def test_predicted_path_keeping_every_neuron_is_exact(relu_dir, tokenizer):
    from prosparse.predictors.model import PredictorSet

    model, tok = load_model(str(relu_dir))
    pset = PredictorSet(64, 176, 2, hidden=8)
    pset.thresholds.fill_(-1e30)  # every neuron predicted active
    g = generate(model, tok, PROMPT, 10, path="predicted", predictors=pset)
    assert g.token_ids == _transformers_greedy(relu_dir, tokenizer, 10, do_sample=False)
    assert g.predicted_sparsity == 0.0 and g.public()["predicted_sparsity"] == 0.0
    assert "predicted_sparsity" not in generate(model, tok, PROMPT, 2, path="dense").public()
    with pytest.raises(UsageError, match="do not fit this model"):
        generate(model, tok, PROMPT, 4, path="predicted", predictors=PredictorSet(64, 99, 2, 8))


def test_silu_model_and_bad_arguments(llama, tokenizer):
    with pytest.raises(UsageError, match="SiLU.*not ReLU-family.*prosparse convert"):
        generate(llama, tokenizer, PROMPT, 4, path="exact")
    assert generate(llama, tokenizer, PROMPT, 3, path="dense").new_tokens == 3
    for kwargs, message in [(dict(prompt="  "), "prompt is empty"),
                            (dict(max_new_tokens=0), "must be at least 1"),
                            (dict(path="fast"), "unknown path 'fast'"),
                            (dict(path="predicted"), "needs predictors"),
                            (dict(temperature=-1.0), "temperature")]:
        args = {"prompt": PROMPT, "max_new_tokens": 4, "path": "dense", **kwargs}
        with pytest.raises(UsageError, match=message):
            generate(llama, tokenizer, args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_shapes_are_read_without_loading(relu_dir, tmp_path):
    from prosparse.predictors.export import save_predictors
    from prosparse.predictors.model import PredictorSet

    assert model_shape(str(relu_dir)) == (2, 64, 176)
    assert sparse_unready_config(str(relu_dir)) is None
    assert sparse_unready_config("smollm2-135m") is None  # not a folder: the loaded model tells
    silu = save_model(tiny_llama(), char_tokenizer(), tmp_path / "silu")
    assert "activation is silu, not ReLU-family" in sparse_unready_config(str(silu))
    assert model_shape("smollm2-135m") is None and model_shape(str(tmp_path / "no")) is None
    ours = save_predictors(PredictorSet(64, 176, 2, hidden=8), tmp_path / "ours")
    assert predictor_shape(ours) == (2, 64, 176)
    check_predictors_fit(str(relu_dir), ours)
    other = save_predictors(PredictorSet(64, 256, 3, hidden=8), tmp_path / "other")
    with pytest.raises(UsageError, match="are for 3 layers, d_model 64, d_ff 256; .* has 2 "
                                         "layers, d_model 64, d_ff 176"):
        check_predictors_fit(str(relu_dir), other)
    pi = tmp_path / "pi"
    pi.mkdir()
    for i in range(2):  # PowerInfer's layout: fc1 [D, d_model], fc2 [d_ff, D]
        torch.save({"fc1.weight": torch.zeros(8, 64), "fc2.weight": torch.zeros(176, 8)},
                   pi / f"model_{i}.pt")
    assert predictor_shape(pi) == (2, 64, 176)
