"""``prosparse export powerinfer``: a folder that PowerInfer's own converter turns into its GGUF
with no hand step, and the held-out perplexity of the function PowerInfer will compute.

What PowerInfer computes for a LLaMA-architecture model (its llama.cpp fork, CPU path):

- sparse mode (a GGUF with predictors): per layer, the predictor's logits pick the neurons
  (kept when ``logit >= sparse_threshold``, one value for every layer), and every kept neuron
  gets ``relu(gate) * up``, whatever the checkpoint's ``hidden_act`` says;
- dense mode (a GGUF without predictors): ``silu(gate) * up``, the original SwiGLU model.

So a ReLU model with predictors runs in PowerInfer as prosparse's predictor-driven FFN
(:func:`~prosparse.inference.attach_predictors_`); a FATReLU model runs as a *ReLU* model on the
predicted neurons (a kept neuron with ``0 < g < t`` contributes, where FATReLU would zero it):
exported with predictors trained on its own labels, and the perplexity of that function
(:func:`powerinfer_function`) is measured and reported beside the model's own. A shifted ReLU
(``relu(g - b)`` on every neuron) and a model without predictors (dense mode is SiLU) have no
faithful PowerInfer form: refused, with the reason.

The folder holds ``model/`` (a Hugging Face checkpoint with what ``convert.py`` reads: a top-level
``rope_theta``, an untied ``lm_head.weight``, ``vocab.json`` and ``merges.txt`` beside
``tokenizer.json``, only tensors it can name, ``hidden_act: relu``), ``predictors/`` (``model_{i}.pt``
and ``config.json`` with ``sparse_threshold``, per-layer thresholds folded by
:func:`~prosparse.predictors.export.fold_thresholds`), ``heldout.txt`` (the text measured),
``export.json`` and a ``README.md`` with the exact commands.

Why PowerInfer's converter and not a GGUF written here with the ``gguf`` package: the GGUF it
loads is defined by that converter and its loader, not by a document: the q/k row permutation,
``ffn_down_t`` stored transposed for its axpy, ``blk.N.fc1/fc2`` names, the
``powerinfer.sparse_threshold`` key, the ``PWRI`` magic in place of ``GGUF``, and its vocabulary
handling. A copy of those here would be checked only against our own reading of them, and would
drift from the engine; the converter's input is a plain checkpoint that our tests can check.

Perplexity in PowerInfer's own terms: its strided mode (``perplexity -c c --ppl-stride s``)
widens the context to ``C = c + s // 2``, cuts chunks of ``C`` tokens starting ``s`` apart and
scores each chunk's last ``s`` predictions. With ``s = C - 1`` and ``c = C - s // 2``
(:func:`perplexity_args`) it scores every prediction of chunks of ``C`` tokens that overlap by
one; :func:`stride_blocks` cuts the same chunks, so
:func:`~prosparse.measure.heldout.evaluate_blocks` on them gives the same number on the same
tokens.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prosparse.core.errors import UsageError
from prosparse.core.io import atomic_dir
from prosparse.data import load_texts, parse_data_spec
from prosparse.inference.predicted import attach_predictors_
from prosparse.measure.heldout import evaluate_blocks
from prosparse.models.relufy import activation_state, current_activation, find_gated_ffns, relufy_
from prosparse.predictors.collect import find_predictor_sites
from prosparse.predictors.export import (
    ThresholdFold,
    fold_thresholds,
    load_predictors,
    write_powerinfer,
)
from prosparse.predictors.model import PredictorSet

# The tensors PowerInfer's convert.py maps for a LLaMA checkpoint (its TensorNameMap); any other
# name stops it with "Unexpected tensor name".
MODEL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight",
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight")


def converter_tensor_names(n_layers: int) -> set[str]:
    """Every tensor name a LLaMA checkpoint of ``n_layers`` layers must hold for PowerInfer."""
    return set(MODEL_TENSORS) | {f"model.layers.{i}.{n}" for i in range(n_layers)
                                 for n in LAYER_TENSORS}


@dataclass
class PowerInferExport:
    """What :func:`export_powerinfer_dir` wrote and measured."""

    out: Path
    report: dict


# --- what PowerInfer can run --------------------------------------------------------------------

def check_deployable(model: nn.Module) -> tuple[str, float]:
    """``(act, param)`` of a model PowerInfer can run faithfully (ReLU, or FATReLU through its
    predictors); raises :class:`UsageError` with the reason otherwise."""
    cfg = model.config
    arch = getattr(cfg, "model_type", None)
    if arch != "llama":
        raise UsageError(f"PowerInfer's convert.py converts LLaMA-architecture checkpoints "
                         f"(model_type llama); this one is {arch!r}")
    act, param = current_activation(model)
    if act == "shifted_relu":
        raise UsageError(f"the model uses shifted ReLU relu(g - {param:g}); PowerInfer computes "
                         "relu(g) on every neuron it keeps, so it would run another model: "
                         "ReLUfy with --act relu or fatrelu and train instead")
    if act == "drelu":
        raise UsageError("the model is dReLU (ReLU on the up projection too); PowerInfer's LLaMA "
                         "path computes relu(gate) * up, so it would run another model: export "
                         "a relu or fatrelu model")
    if act not in ("relu", "fatrelu"):
        raise UsageError(f"the model's FFN activation is {act.removeprefix('other:')}, not ReLU or "
                         "FATReLU; PowerInfer's sparse path computes ReLU: ReLUfy and train it "
                         "first (prosparse train)")
    if cfg.hidden_size % cfg.num_attention_heads or (
            getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // cfg.num_attention_heads)):
        raise UsageError(f"head_dim {cfg.head_dim} is not hidden_size / num_attention_heads "
                         f"({cfg.hidden_size} / {cfg.num_attention_heads}); PowerInfer's LLaMA "
                         "loader requires it")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UsageError("the model has attention or MLP biases; PowerInfer's LLaMA loader has "
                         "no tensors for them")
    rope_theta(cfg)
    return act, param


def rope_theta(cfg) -> float:
    """The RoPE base, wherever the config keeps it (transformers >= 5 writes only
    ``rope_parameters``; PowerInfer's converter reads the top-level ``rope_theta`` and silently
    uses 10000 without it). Raises for RoPE scaling its LLaMA path does not implement."""
    params = getattr(cfg, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", kind)) if scaling else kind
    if kind not in ("default", None):
        raise UsageError(f"RoPE type {kind!r}: PowerInfer's LLaMA conversion implements plain "
                         "RoPE only here; export a model with rope_type default")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def check_predictors(model: nn.Module, pset: PredictorSet) -> None:
    """The predictor set fits the model: one per gated FFN, the same d_model and d_ff."""
    ffns = find_gated_ffns(model)
    d_model, d_ff = ffns[0].down_proj.out_features, ffns[0].down_proj.in_features
    if (len(pset), pset.d_model, pset.d_ff) != (len(ffns), d_model, d_ff):
        raise UsageError(f"the predictors are {len(pset)} layers of d_model {pset.d_model} -> "
                         f"d_ff {pset.d_ff}; the model has {len(ffns)} layers of {d_model} -> "
                         f"{d_ff}: pass predictors trained on this model")


@contextmanager
def powerinfer_function(model: nn.Module, pset: PredictorSet,
                        fold: ThresholdFold | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes what PowerInfer computes from ``pset``'s export:
    ReLU (whatever its own activation) on the neurons whose logit passes the folded threshold
    (``fold.effective``, per layer). The model's own activation and FFNs come back afterwards."""
    fold = fold or fold_thresholds(pset)
    folded = copy.deepcopy(pset)
    folded.thresholds.copy_(torch.tensor(fold.effective, dtype=folded.thresholds.dtype))
    restore_act = activation_state(model)
    try:
        relufy_(model, "relu")
        restore = attach_predictors_(model, folded)
        try:
            yield model
        finally:
            restore()
    finally:
        restore_act()


@torch.no_grad()
def predictor_quality(model: nn.Module, pset: PredictorSet, blocks: torch.Tensor,
                      thresholds: dict[str, list[float]], batch_size: int = 4) -> dict:
    """Per-layer recall and predicted sparsity of ``pset`` under each named set of per-layer
    thresholds, against the model's own labels (``x1 != 0``, its own activation), on ``blocks``.

    Returns ``{name: {"recall": [...], "predicted_sparsity": [...]}, "true_sparsity": [...]}``.
    """
    from prosparse.measure.hooks import capture_x1

    sites = find_predictor_sites(model)
    names = list(thresholds)
    th = torch.tensor([thresholds[n] for n in names], dtype=torch.float32)  # (sets, layers)
    n = len(sites)
    tp = torch.zeros(len(names), n, dtype=torch.float64)
    kept = torch.zeros(len(names), n, dtype=torch.float64)
    pos = torch.zeros(n, dtype=torch.float64)
    cells = torch.zeros(n, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [s.input_module.register_forward_pre_hook(
        lambda _m, args, _i=s.layer: inputs.__setitem__(_i, args[0])) for s in sites]

    def take(layer: int, x1: torch.Tensor) -> None:
        p = pset.layers[layer]
        r = inputs.pop(layer)
        z = p(r.reshape(-1, r.shape[-1]).to(p.fc1.weight.dtype)).float()  # (tokens, d_ff)
        label = x1.reshape(-1, x1.shape[-1]) != 0  # (tokens, d_ff)
        pos[layer] += label.sum().item()
        cells[layer] += label.numel()
        for k in range(len(names)):
            pred = z >= th[k, layer]
            tp[k, layer] += (pred & label).sum().item()
            kept[k, layer] += pred.sum().item()

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with capture_x1(model, take):
            for start in range(0, len(blocks), batch_size):
                model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out: dict = {name: {"recall": (tp[k] / pos.clamp(min=1)).tolist(),
                        "predicted_sparsity": (1 - kept[k] / cells.clamp(min=1)).tolist()}
                 for k, name in enumerate(names)}
    out["true_sparsity"] = (1 - pos / cells.clamp(min=1)).tolist()
    return out


# --- the checkpoint the converter reads -----------------------------------------------------------

def converter_config(model: nn.Module) -> dict:
    """``config.json`` for the converter: the model's config with a top-level ``rope_theta``,
    ``tie_word_embeddings: false`` (an ``lm_head.weight`` is written) and ``hidden_act: relu``
    (what PowerInfer computes on kept neurons; transformers loads the folder as that model)."""
    cfg = model.config.to_dict()
    cfg["rope_theta"] = rope_theta(model.config)
    cfg["tie_word_embeddings"] = False
    cfg["hidden_act"] = "relu"
    cfg.pop("hidden_act_param", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.pop("quantization_config", None)
    return cfg


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the converter's names: activation buffers (FATReLU's
    ``threshold``) dropped, a tied LM head written out as its own tensor."""
    acts = tuple(f"{f.name}.{f.act_attr}." for f in find_gated_ffns(model))
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(acts)}
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = model.get_output_embeddings().weight
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}  # no shared storage
    expected = converter_tensor_names(model.config.num_hidden_layers)
    extra = sorted(set(sd) - expected)
    if extra:
        raise UsageError(f"the checkpoint holds tensors PowerInfer's converter cannot name "
                         f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); it "
                         "converts plain LLaMA checkpoints")
    missing = sorted(expected - set(sd))
    if missing:
        raise UsageError(f"the checkpoint lacks {', '.join(missing[:3])}; PowerInfer's converter "
                         "needs every LLaMA tensor")
    return sd


def _byte_level(tok_json: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(c) for c in node.get("pretokenizers", []) or node.get("decoders", []))

    return (tok_json.get("model", {}).get("type") == "BPE" and has(tok_json.get("pre_tokenizer"))
            and has(tok_json.get("decoder")))


def write_vocab_files(folder: Path, vocab_size: int) -> str:
    """Beside ``folder/tokenizer.json``, write what the converter reads for a byte-level BPE
    vocabulary: ``vocab.json`` (every id ``0 .. vocab_size - 1``; added tokens included, ids the
    tokenizer does not use as ``[PAD{id}]``, as PowerInfer's HF converter pads) and
    ``merges.txt``. Returns the converter's ``--vocabtype`` (``bpe``, or ``spm`` where a
    SentencePiece ``tokenizer.model`` is there)."""
    if (folder / "tokenizer.model").is_file():
        return "spm"
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise UsageError("the tokenizer has no tokenizer.json (nor a SentencePiece "
                         "tokenizer.model); PowerInfer's converter needs one of them")
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    if not _byte_level(tok):
        raise UsageError(f"the tokenizer is {tok.get('model', {}).get('type')} without byte-level "
                         "pre-tokenization and no tokenizer.model; PowerInfer's converter reads "
                         "byte-level BPE (vocab.json + merges.txt) or SentencePiece")
    by_id: dict[int, str] = {}
    for text, i in tok["model"]["vocab"].items():
        by_id[int(i)] = text
    for added in tok.get("added_tokens", []):
        by_id.setdefault(int(added["id"]), added["content"])
    if by_id and max(by_id) >= vocab_size:
        raise UsageError(f"the tokenizer uses id {max(by_id)}, beyond the model's vocab_size "
                         f"{vocab_size}")
    vocab = {}
    for i in range(vocab_size):
        text = by_id.get(i, f"[PAD{i}]")
        if text in vocab:
            raise UsageError(f"token {text!r} has two ids ({vocab[text]}, {i}); vocab.json "
                             "cannot hold both")
        vocab[text] = i
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"]
    for m in tok["model"].get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if any(c.isspace() for c in a + b):
            raise UsageError(f"merge {a!r} + {b!r} holds whitespace; merges.txt cannot write it")
        lines.append(f"{a} {b}")
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return "bpe"


def write_checkpoint(model: nn.Module, tokenizer, folder: str | os.PathLike,
                     source: str | os.PathLike | None = None) -> str:
    """Write ``model`` and ``tokenizer`` into the new folder ``folder`` as the checkpoint
    PowerInfer's ``convert.py`` reads with no hand edit. ``source`` (the checkpoint folder) lends
    a SentencePiece ``tokenizer.model`` if it has one. Returns the converter's ``--vocabtype``."""
    from safetensors.torch import save_file

    check_deployable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    save_file(_tensors(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(converter_config(model), indent=2) + "\n")
    tokenizer.save_pretrained(folder)
    spm = Path(source) / "tokenizer.model" if source is not None else None
    if spm is not None and spm.is_file() and not (folder / "tokenizer.model").is_file():
        (folder / "tokenizer.model").write_bytes(spm.read_bytes())
    return write_vocab_files(folder, model.config.vocab_size)


# --- held-out text in PowerInfer's perplexity terms ---------------------------------------------

def heldout_text(tokenizer, data: str, split: str, tokens: int, n_ctx: int,
                 bos: bool = False) -> tuple[str, list[int]]:
    """Documents of ``data`` joined by blank lines until about ``tokens + n_ctx`` tokens (at
    least ``2 * n_ctx``, PowerInfer's minimum), and their ids as PowerInfer tokenizes the file:
    no special tokens, a BOS first only for SentencePiece vocabularies (``bos``)."""
    need = max(tokens, n_ctx) + n_ctx
    pieces, count = [], 0
    for text in load_texts(parse_data_spec(data), split):
        text = text.strip()
        if not text:
            continue
        pieces.append(text)
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if count >= need:
            break
    text = "\n\n".join(pieces)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2 * n_ctx:
        raise UsageError(f"{data} ({split}) holds {len(ids)} tokens; PowerInfer's perplexity "
                         f"needs at least 2 x --seq-len = {2 * n_ctx}")
    return text, ids


def perplexity_args(n_ctx: int) -> list[str]:
    """PowerInfer ``perplexity`` flags that score every prediction of chunks of ``n_ctx`` tokens
    starting ``n_ctx - 1`` apart: it adds ``stride // 2`` to ``-c``, and scores the last
    ``stride`` predictions of each chunk (its ``perplexity_v2``)."""
    stride = n_ctx - 1
    c = n_ctx - stride // 2
    return ["-c", str(c), "-b", str(c), "--ppl-stride", str(stride)]


def stride_blocks(ids: list[int] | torch.Tensor, n_ctx: int) -> torch.Tensor:
    """The chunks PowerInfer's ``perplexity`` with :func:`perplexity_args` scores, as
    ``(chunks, n_ctx)``: starts ``n_ctx - 1`` apart, every next-token prediction scored once.

    PowerInfer counts ``ceil((N - n_ctx) / stride)`` chunks, one fewer than fit when
    ``N - n_ctx`` is a multiple of the stride: the same count is taken here."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    stride = n_ctx - 1
    if n_ctx < 3 or len(ids) <= n_ctx:
        raise UsageError(f"{len(ids)} tokens and n_ctx {n_ctx}: need n_ctx >= 3 and more tokens "
                         "than n_ctx")
    chunks = min(math.ceil((len(ids) - n_ctx) / stride), (len(ids) - n_ctx) // stride + 1)
    return torch.stack([ids[i * stride:i * stride + n_ctx] for i in range(chunks)])


# --- the command ---------------------------------------------------------------------------------

def commands(out: Path, n_ctx: int, chunks: int, vocabtype: str) -> dict[str, str]:
    """The exact PowerInfer commands for an export in ``out`` (``$POWERINFER``: its checkout)."""
    gguf = out / "model.powerinfer.gguf"
    return {
        "convert": f"python $POWERINFER/convert.py --vocabtype {vocabtype} --outtype f16 "
                   f"--outfile {gguf} {out / 'model'} {out / 'predictors'}",
        "run": f"$POWERINFER/build/bin/main -m {gguf} -t 2 -n 64 --temp 0 "
               "-p 'The history of'",
        "perplexity": f"$POWERINFER/build/bin/perplexity -m {gguf} -f {out / 'heldout.txt'} "
                      f"{' '.join(perplexity_args(n_ctx))} --chunks {chunks} -t 1",
        "convert_dense": f"python $POWERINFER/convert-dense.py --vocabtype {vocabtype} "
                         f"--outtype f16 --outfile {out / 'model.dense.gguf'} {out / 'model'}",
    }


def export_powerinfer_dir(
    ckpt: str,
    predictors: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    data: str = "wiki",
    split: str = "heldout",
    tokens: int = 8192,
    n_ctx: int = 256,
    dtype: str = "float32",
    batch_size: int = 4,
) -> PowerInferExport:
    """Write ``out`` (atomically) for PowerInfer and measure, on ``tokens`` held-out tokens of
    ``data`` cut as PowerInfer's perplexity cuts them, the perplexity of the model as it is, with
    its predictors (prosparse's predicted decoding), and of what PowerInfer computes."""
    from prosparse.models.loading import load_model

    if predictors is None:
        raise UsageError("PowerInfer runs a ReLU model only through its predictors (its dense "
                         "mode computes SiLU, whatever hidden_act says): pass --predictors PRED "
                         "trained on this model (prosparse predictors collect, then train)")
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model, tok = load_model(ckpt, dtype=dtype)
        act, param = check_deployable(model)
        pset = load_predictors(predictors)
        check_predictors(model, pset)
        fold = fold_thresholds(pset)
        vocabtype = write_checkpoint(model, tok, tmp / "model", source=ckpt)
        (tmp / "predictors").mkdir()
        write_powerinfer(pset, tmp / "predictors")
        text, ids = heldout_text(tok, data, split, tokens, n_ctx, bos=vocabtype == "spm")
        (tmp / "heldout.txt").write_text(text, encoding="utf-8")
        blocks = stride_blocks(ids, n_ctx)

        def ppl() -> float:
            return evaluate_blocks(model, blocks, batch_size).perplexity

        own = evaluate_blocks(model, blocks, batch_size)
        restore = attach_predictors_(model, pset)
        try:
            own_predicted = ppl()
        finally:
            restore()
        with powerinfer_function(model, pset, fold):
            powerinfer = ppl()
        restore_act = activation_state(model)
        relufy_(model, "relu")
        relu_dense = ppl() if act != "relu" else own.perplexity
        restore_act()
        quality = predictor_quality(model, pset, blocks,
                                    {"requested": fold.requested, "effective": fold.effective},
                                    batch_size)
        cmds = commands(out, n_ctx, len(blocks), vocabtype)
        layers = [{"layer": i, "threshold": fold.requested[i],
                   "effective_threshold": fold.effective[i], "fc2_scale": fold.scales[i],
                   "exact": fold.exact[i],
                   "recall": quality["requested"]["recall"][i],
                   "effective_recall": quality["effective"]["recall"][i],
                   "predicted_sparsity": quality["requested"]["predicted_sparsity"][i],
                   "effective_predicted_sparsity": quality["effective"]["predicted_sparsity"][i],
                   "true_sparsity": quality["true_sparsity"][i]}
                  for i in range(len(pset))]

        def mean(key: str) -> float:
            return sum(row[key] for row in layers) / len(layers)

        report = {
            "checkpoint": str(ckpt), "predictors": str(predictors),
            "activation": act, "activation_param": param,
            "powerinfer_computes": ("ReLU on the predicted-active neurons" +
                                    (f" (the model's own FATReLU keeps g >= {threshold_text(param)})"
                                     if act == "fatrelu" else "")),
            "sparse_threshold": fold.sparse_threshold,
            "folded_layers": [i for i, e in enumerate(fold.exact) if not e],
            "eval": {"data": data, "split": split, "text": "heldout.txt", "tokens": len(ids),
                     "n_ctx": n_ctx, "chunks": len(blocks),
                     "scored_tokens": own.nll_count},
            "perplexity": {"model": own.perplexity, "model_predicted": own_predicted,
                           "relu_all_neurons": relu_dense, "powerinfer": powerinfer},
            "average": {k: mean(k) for k in ("recall", "effective_recall", "predicted_sparsity",
                                              "effective_predicted_sparsity", "true_sparsity")},
            "layers": layers,
            "vocabtype": vocabtype,
            "commands": cmds,
        }
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(report))
    return PowerInferExport(out, report)


def threshold_text(t: float | list[float]) -> str:
    """One threshold as ``0.35``; per-layer thresholds as ``per layer, 0.21..0.48``."""
    if isinstance(t, (list, tuple)):
        return f"per layer, {min(t):g}..{max(t):g}"
    return f"{t:g}"


def readme(report: dict) -> str:
    """The folder's README: what is there, what PowerInfer computes, the exact commands."""
    p, c, e = report["perplexity"], report["commands"], report["eval"]
    fat = report["activation"] == "fatrelu"
    lines = [
        "# PowerInfer export",
        "",
        f"Written by `prosparse export powerinfer` from `{report['checkpoint']}` "
        f"({report['activation']}"
        + (f", t = {threshold_text(report['activation_param'])}" if fat else "")
        + f") with predictors `{report['predictors']}`.",
        "",
        "- `model/`: the checkpoint for PowerInfer's `convert.py` (top-level `rope_theta`, an "
        "untied `lm_head.weight`, `vocab.json` + `merges.txt`, no activation buffers, "
        "`hidden_act: relu`: what PowerInfer computes on the neurons it keeps)",
        f"- `predictors/`: `model_{{layer}}.pt` (fc1, fc2) and `config.json` with "
        f"`sparse_threshold` {report['sparse_threshold']:g}",
        f"- `heldout.txt`: {e['tokens']} tokens of `{e['data']}` ({e['split']}), the text measured "
        "below",
        "- `export.json`: these figures, per layer",
        "",
        "## Convert and run",
        "",
        "With a CPU build of PowerInfer in `$POWERINFER` (`cmake -S . -B build && cmake --build "
        "build --config Release`) and its converter's needs installed (`pip install -r "
        "$POWERINFER/requirements.txt`, with `numpy<2`: its `convert.py` calls a NumPy 1 API):",
        "",
        "```bash",
        c["convert"],
        c["run"],
        c["perplexity"],
        "```",
        "",
        "Run the perplexity with one thread (`-t 1`): PowerInfer's multi-threaded sparse down "
        "projection adds the threads' partial sums without a lock, so its result varies from run "
        "to run above one thread. With `--ppl-stride` it widens `-c` by half the stride and "
        f"scores the last stride predictions of each chunk: these flags make it score every "
        f"prediction of the {e['chunks']} chunks of {e['n_ctx']} tokens measured here.",
        "",
        "## What PowerInfer computes",
        "",
        "Its sparse path keeps the neurons whose predictor logit is at least `sparse_threshold` "
        "and computes ReLU(gate) * up on each of them, whatever `hidden_act` says; its dense mode "
        "(a GGUF without predictors, `convert-dense.py`) computes SiLU, the original model, so it "
        "is a speed baseline only.",
        "",
        f"Held-out perplexity, {e['scored_tokens']} scored tokens (n_ctx {e['n_ctx']}, "
        f"{e['chunks']} chunks):",
        "",
        "| function | perplexity |",
        "|---|---|",
        f"| the model as trained ({report['activation']}, every neuron) | {p['model']:.3f} |",
        f"| the model with its predictors (prosparse predicted decoding) | "
        f"{p['model_predicted']:.3f} |",
    ]
    if fat:
        lines.append(f"| ReLU in place of FATReLU, every neuron | {p['relu_all_neurons']:.3f} |")
    lines += [
        f"| **PowerInfer: ReLU on the predicted neurons** | **{p['powerinfer']:.3f}** |",
        "",
    ]
    if fat:
        lines += ["A kept neuron gets ReLU, not FATReLU: a neuron with 0 < g < t that the "
                  "predictor keeps contributes in PowerInfer. Predictors trained on this FATReLU "
                  "model's own labels (`prosparse predictors collect CKPT` with no `--act`) keep "
                  "mostly neurons whose gate passed t, which is why the last row stays near the "
                  "second.", ""]
    folded = report["folded_layers"]
    a = report["average"]
    if folded:
        lines += [f"PowerInfer has one `sparse_threshold`; layers {folded} have thresholds it "
                  "cannot fold exactly, so they keep neurons from a logit just below 0 "
                  "(more neurons than asked for, never fewer):", "",
                  "| layer | threshold | effective | recall % | effective recall % | "
                  "predicted sparsity % | effective % |", "|---|---|---|---|---|---|---|"]
        for r in report["layers"]:
            if not r["exact"]:
                lines.append(f"| {r['layer']} | {r['threshold']:.4g} | "
                             f"{r['effective_threshold']:.3g} | {100 * r['recall']:.2f} | "
                             f"{100 * r['effective_recall']:.2f} | "
                             f"{100 * r['predicted_sparsity']:.2f} | "
                             f"{100 * r['effective_predicted_sparsity']:.2f} |")
        lines.append("")
    lines += [f"Average recall {100 * a['effective_recall']:.2f}% at predicted sparsity "
              f"{100 * a['effective_predicted_sparsity']:.2f}% in PowerInfer (as trained: "
              f"{100 * a['recall']:.2f}% at {100 * a['predicted_sparsity']:.2f}%; true sparsity "
              f"{100 * a['true_sparsity']:.2f}%), labels from the model's own activation.", ""]
    return "\n".join(lines)
