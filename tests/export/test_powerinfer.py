"""``prosparse export powerinfer`` without PowerInfer: the files against what its converter
reads (names, shapes, dtypes, config keys, vocabulary files), the function it computes, the
refusals, and atomic output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from prosparse.cli import main
from prosparse.core.errors import UsageError
from prosparse.export import powerinfer as pi
from prosparse.inference.predicted import attach_predictors_
from prosparse.measure.heldout import evaluate_blocks
from prosparse.models.loading import load_model
from prosparse.models.relufy import current_activation, relufy_
from prosparse.models.saving import save_model
from prosparse.predictors.export import load_predictors, save_predictors
from prosparse.predictors.model import PredictorSet

N_CTX = 32
PAD = 3  # the model's vocabulary is the tokenizer's plus PAD unused ids


def bpe_tokenizer(text_file):
    """A byte-level BPE tokenizer (SmolLM2's kind) trained on the test corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_file.read_text().split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tied_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def setup(tmp_path, text_file):
    """A FATReLU checkpoint with tied embeddings and mixed-sign predictors."""
    tok = bpe_tokenizer(text_file)
    model = tied_llama(len(tok) + PAD)
    relufy_(model, "fatrelu", 0.05)
    ckpt = save_model(model, tok, tmp_path / "ckpt")
    torch.manual_seed(1)
    pset = PredictorSet(64, 176, 2, 16)
    pset.thresholds.copy_(torch.tensor([-0.5, 0.3]))
    pred = save_predictors(pset, tmp_path / "pred")
    return tmp_path, ckpt, pred, tok


def export(setup, **kw):
    tmp_path, ckpt, pred, _ = setup
    kw = {"data": str(tmp_path / "corpus.txt"), "split": "all", "tokens": 400, "n_ctx": N_CTX,
          **kw}
    return pi.export_powerinfer_dir(str(ckpt), kw.pop("predictors", pred),
                                    kw.pop("out", tmp_path / "out"), **kw)


def listing(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_the_checkpoint_is_what_the_converter_reads(setup):
    tmp_path, ckpt, _, tok = setup
    result = export(setup)
    out = result.out
    assert listing(out) == ["README.md", "export.json", "heldout.txt", "model", "predictors"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    # convert.py: Params.loadHFTransformerJson reads these keys; rope_theta must be top level
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings",
                "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "rope_theta"):
        assert key in cfg, key
    assert cfg["rope_theta"] == 50000.0 and cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert cfg["hidden_act"] == "relu" and "hidden_act_param" not in cfg
    files = listing(out / "model")
    assert "model.safetensors" in files and {"vocab.json", "merges.txt", "tokenizer.json"} <= set(files)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    assert names == pi.converter_tensor_names(2)  # no act_fn.threshold, an lm_head
    v = len(tok) + PAD
    shapes = {"model.embed_tokens.weight": (v, 64), "lm_head.weight": (v, 64),
              "model.norm.weight": (64,), "model.layers.1.self_attn.q_proj.weight": (64, 64),
              "model.layers.1.self_attn.k_proj.weight": (32, 64),
              "model.layers.0.mlp.gate_proj.weight": (176, 64),
              "model.layers.0.mlp.down_proj.weight": (64, 176)}
    for k, shape in shapes.items():
        assert tuple(tensors[k].shape) == shape, k
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    # vocab.json: BpeVocab needs ids 0..vocab_size-1, unused ids padded as the HF converter pads
    vocab = json.loads((out / "model" / "vocab.json").read_text())
    assert sorted(vocab.values()) == list(range(v))
    assert vocab[f"[PAD{v - 1}]"] == v - 1 and vocab["<|endoftext|>"] == 0
    # merges.txt as gguf's SpecialVocab._try_load_merges_txt parses it
    lines = (out / "model" / "merges.txt").read_text().splitlines()
    assert lines[0].startswith("#") and all(len(line.split()) == 2 for line in lines[1:])
    merges = json.loads((out / "model" / "tokenizer.json").read_text())["model"]["merges"]
    assert len(lines) - 1 == len(merges) > 0
    assert result.report["vocabtype"] == "bpe"
    assert "--vocabtype bpe" in result.report["commands"]["convert"]
    # the predictor folder PowerInfer's converter reads
    assert listing(out / "predictors") == ["config.json", "model_0.pt", "model_1.pt"]
    t = json.loads((out / "predictors" / "config.json").read_text())
    assert set(t) == {"sparse_threshold"} and t["sparse_threshold"] == result.report["sparse_threshold"]


def test_the_export_reproduces_what_powerinfer_computes(setup):
    """DIR/model (ReLU) + DIR/predictors (one threshold) in prosparse give the perplexity the
    export reports for PowerInfer, on the chunks of heldout.txt its perplexity scores."""
    tmp_path, ckpt, _, _ = setup
    r = export(setup).report
    p = r["perplexity"]
    assert r["activation"] == "fatrelu" and r["activation_param"] == 0.05
    assert r["sparse_threshold"] < 0 and r["folded_layers"] == [1]  # 0.3 cannot be kept
    assert p["relu_all_neurons"] != p["model"] and p["powerinfer"] != p["model_predicted"]
    model, tok = load_model(str(tmp_path / "out" / "model"))
    assert current_activation(model) == ("relu", 0.0)
    text = (tmp_path / "out" / "heldout.txt").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == r["eval"]["tokens"]
    blocks = pi.stride_blocks(ids, N_CTX)
    assert len(blocks) == r["eval"]["chunks"]
    restore = attach_predictors_(model, load_predictors(tmp_path / "out" / "predictors"))
    got = evaluate_blocks(model, blocks).perplexity
    restore()
    assert got == pytest.approx(p["powerinfer"], rel=1e-4)
    # the ReLU model with every neuron: "relu_all_neurons"
    assert evaluate_blocks(model, blocks).perplexity == pytest.approx(p["relu_all_neurons"],
                                                                      rel=1e-5)
    layer1 = r["layers"][1]
    assert not layer1["exact"] and -1e-3 < layer1["effective_threshold"] < 0
    assert layer1["effective_recall"] >= layer1["recall"]
    assert layer1["effective_predicted_sparsity"] <= layer1["predicted_sparsity"]
    assert r["layers"][0]["recall"] == r["layers"][0]["effective_recall"]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert r["commands"]["perplexity"] in readme and "-t 1" in r["commands"]["perplexity"]
    assert f"-c 17 -b 17 --ppl-stride {N_CTX - 1}" in r["commands"]["perplexity"]
    assert f"{p['powerinfer']:.3f}" in readme and "not FATReLU" in readme


def test_a_relu_model_with_zero_thresholds_exports_exactly(setup):
    tmp_path, ckpt, _, tok = setup
    model, _ = load_model(str(ckpt))
    relufy_(model, "relu")
    save_model(model, tok, tmp_path / "relu")
    torch.manual_seed(2)
    pset = PredictorSet(64, 176, 2, 16)  # thresholds 0, 0: PowerInfer's default
    save_predictors(pset, tmp_path / "p0")
    r = pi.export_powerinfer_dir(str(tmp_path / "relu"), tmp_path / "p0", tmp_path / "o3",
                                 data=str(tmp_path / "corpus.txt"), split="all", tokens=400,
                                 n_ctx=N_CTX).report
    assert r["activation"] == "relu"
    assert r["sparse_threshold"] == 0.0 and r["folded_layers"] == []
    assert all(m["exact"] and m["effective_threshold"] == 0.0 for m in r["layers"])
    assert r["perplexity"]["relu_all_neurons"] == r["perplexity"]["model"]
    assert r["perplexity"]["powerinfer"] == pytest.approx(r["perplexity"]["model_predicted"],
                                                          rel=1e-6)


def test_refusals_say_why_and_write_nothing(setup, llama, tokenizer, capsys):
    tmp_path, ckpt, pred, tok = setup
    out = tmp_path / "never"
    with pytest.raises(UsageError, match="only through its predictors"):
        export(setup, predictors=None, out=out)
    model, _ = load_model(str(ckpt))
    relufy_(model, "shifted_relu", 0.1)
    save_model(model, tok, tmp_path / "shifted")
    relufy_(model, "relu")
    model.config.hidden_act = "silu"
    from transformers.activations import ACT2FN

    for ffn in model.model.layers:
        ffn.mlp.act_fn = ACT2FN["silu"]
    save_model(model, tok, tmp_path / "silu")
    for src, message in ((tmp_path / "shifted", "shifted ReLU"), (tmp_path / "silu", "not ReLU")):
        with pytest.raises(UsageError, match=message):
            pi.export_powerinfer_dir(str(src), pred, out)
    wrong = save_predictors(PredictorSet(64, 100, 2, 16), tmp_path / "wrong")
    with pytest.raises(UsageError, match="trained on this model"):
        export(setup, predictors=wrong, out=out)
    assert not out.exists() and not list(tmp_path.glob(".never.tmp-*"))
    capsys.readouterr()
    code = main(["export", "powerinfer", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--predictors" in err


def test_a_failure_midway_leaves_no_folder(setup, monkeypatch):
    tmp_path = setup[0]

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pi, "predictor_quality", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export(setup, out=tmp_path / "half")
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half.tmp-*"))


def powerinfer_scored(n: int, c: int, stride: int) -> list[tuple[int, int]]:
    """(context start, predicted token) pairs PowerInfer's perplexity_v2 scores on n tokens:
    main() widens n_ctx by stride / 2, chunk i starts at i * stride, and predictions j -> j + 1
    for j in [n_ctx - stride - 1, n_ctx - 1) are scored."""
    n_ctx = c + stride // 2
    n_chunk = (n - n_ctx + stride - 1) // stride
    return [(i * stride, i * stride + j + 1) for i in range(n_chunk)
            for j in range(n_ctx - stride - 1, n_ctx - 1)]


@pytest.mark.parametrize("n", [64, 65, 93, 94, 95, 200])
@pytest.mark.parametrize("n_ctx", [32, 33, 256])
def test_stride_blocks_are_the_chunks_powerinfer_scores(n, n_ctx):
    args = pi.perplexity_args(n_ctx)
    c, stride = int(args[args.index("-c") + 1]), int(args[args.index("--ppl-stride") + 1])
    ids = list(range(n + 4 * n_ctx))
    blocks = pi.stride_blocks(ids, n_ctx)
    ours = [(int(b[0]), int(b[j + 1])) for b in blocks for j in range(n_ctx - 1)]
    assert ours == powerinfer_scored(len(ids), c, stride)
    assert [t for _, t in ours] == list(range(1, len(ours) + 1))  # each token once, in order


def test_rope_theta_is_found_wherever_the_config_keeps_it(llama):
    assert pi.rope_theta(llama.config) == pytest.approx(
        llama.config.rope_parameters["rope_theta"])
    llama.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(UsageError, match="llama3"):
        pi.rope_theta(llama.config)
    assert math.isfinite(pi.rope_theta(type("C", (), {"rope_parameters": None})()))
