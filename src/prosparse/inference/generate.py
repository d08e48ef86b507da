"""Generate text through the exact sparse FFN (or the dense one, or predictor-driven), with its
speed and the activation sparsity of the tokens it wrote.

:func:`generate` swaps the FFNs for the path asked (``exact``: :func:`sparsify_`, the FFN
computes only the neurons whose activation is not zero, so its text is the dense model's;
``predicted``: :func:`attach_predictors_`, approximate; ``dense``: the model as loaded), runs
``model.generate`` unchanged (greedy, or sampled with temperature and top-p), streams the text,
puts the dense modules back, and measures x1 = act(gate) * up at the generated tokens in one
dense forward of prompt + new tokens.

Tokens/s counts decode steps, as ``prosparse bench decode`` does: a logits processor stamps
the clock when each token's logits are ready, so the prefill is left out and the rate is
``(n - 1) / (t_last - t_first)`` (one new token: ``1 / (prefill + that step)``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from prosparse.core.errors import UsageError
from prosparse.inference.predicted import (
    attach_predictors_,
    mean_predicted_sparsity,
    reset_predicted_counts,
)
from prosparse.inference.sparse_mlp import sparsify_with_restore_
from prosparse.measure.hooks import ZeroCounter, capture_x1
from prosparse.models.activations import activation_params
from prosparse.models.relufy import find_gated_ffns
from prosparse.models.teal import teal_linears

PATHS = ("exact", "dense", "predicted")
"""How the FFNs run: the exact sparse FFN, the dense one, or predictor-driven (approximate)."""


@dataclass
class Generation:
    """One generated continuation, its speed and its activation sparsity."""

    prompt: str
    """The prompt text."""
    text: str
    """The new text only (special tokens dropped)."""
    new_tokens: int
    """Tokens generated (an end-of-text token included when the model wrote one)."""
    tokens_per_s: float
    """Decode steps per second (prefill excluded; see the module docstring)."""
    seconds: float
    """Wall time of the whole ``generate`` call, prefill included."""
    path: str
    """``exact``, ``dense`` or ``predicted``."""
    average_sparsity: float
    """Mean over layers of the fraction of exact zeros of x1 at the generated tokens."""
    layer_sparsity: list[float] = field(default_factory=list)
    """Per layer, that fraction, bottom layer first."""
    token_ids: list[int] = field(default_factory=list)
    """The generated token ids."""
    sampling: dict | None = None
    """``{"temperature", "top_p", "seed"}`` when sampled, None when greedy."""
    predicted_sparsity: float | None = None
    """Predicted path: the share of neurons the predictors skipped (prompt and new tokens)."""

    def public(self) -> dict:
        """The JSON keys of ``prosparse generate --json``."""
        d = asdict(self)
        if d["predicted_sparsity"] is None:
            d.pop("predicted_sparsity")
        return d


def sparse_unready(model: nn.Module) -> str | None:
    """Why the exact sparse FFN cannot run ``model`` (None when it can): it skips exact zeros,
    which only ReLU-family activations (or TEAL's thresholded linears) make."""
    if teal_linears(model):
        return None
    other = sorted({type(f.act).__name__ for f in find_gated_ffns(model)
                    if activation_params(f.act) is None})
    if other:
        return (f"its FFN activation is {', '.join(other)}, not ReLU-family, so x1 has no exact "
                "zeros to skip")
    return None


def _config(spec: str) -> dict | None:
    """A checkpoint folder's ``config.json`` (its text part), or None when ``spec`` is not
    such a folder."""
    try:
        cfg = json.loads((Path(spec).expanduser() / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (cfg.get("text_config") or cfg) if isinstance(cfg, dict) else None


def model_shape(spec: str) -> tuple[int, int, int] | None:
    """``(layers, d_model, d_ff)`` from a checkpoint folder's ``config.json``, without loading
    the weights; None when ``spec`` is not such a folder or the config does not say."""
    cfg = _config(spec) or {}
    try:
        return (int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]),
                int(cfg["intermediate_size"]))
    except (KeyError, TypeError, ValueError):
        return None


def sparse_unready_config(spec: str) -> str | None:
    """:func:`sparse_unready` read from a checkpoint folder's ``config.json``, before loading
    it; None when the config names a ReLU-family activation or TEAL thresholds, or when
    ``spec`` is not such a folder (then only the loaded model tells)."""
    from prosparse.models.activations import parse_hidden_act
    from prosparse.models.teal import CONFIG_KEY

    cfg = _config(spec)
    if not cfg or cfg.get(CONFIG_KEY):
        return None
    name = cfg.get("hidden_act") or cfg.get("hidden_activation")
    try:
        if not isinstance(name, str) or parse_hidden_act(name, cfg.get("hidden_act_param")):
            return None
    except ValueError:
        return None
    return f"its FFN activation is {name}, not ReLU-family, so x1 has no exact zeros to skip"


def predictor_shape(folder: str | Path) -> tuple[int, int, int]:
    """``(layers, d_model, d_ff)`` of a predictor folder (ours or PowerInfer's), from its
    metadata or one layer's shapes: no predictor is loaded."""
    folder = Path(folder)
    meta = folder / "predictors.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return int(m["n_layers"]), int(m["d_model"]), int(m["d_ff"])
    layers = len(list(folder.glob("model_*.pt")))
    sd = torch.load(folder / "model_0.pt", map_location="cpu", weights_only=True, mmap=True)
    return layers, int(sd["fc1.weight"].shape[1]), int(sd["fc2.weight"].shape[0])


def check_predictors_fit(model_spec: str, folder: str | Path) -> None:
    """Raise :class:`UsageError` when the predictors in ``folder`` were trained for another
    model shape than ``model_spec``'s (when its config can be read without loading it)."""
    have = model_shape(model_spec)
    if have is None:
        return
    want = predictor_shape(folder)
    if want != have:
        raise UsageError(f"--predictors {folder} are for {want[0]} layers, d_model {want[1]}, "
                         f"d_ff {want[2]}; {model_spec} has {have[0]} layers, d_model {have[1]}, "
                         f"d_ff {have[2]}: train predictors on this model (prosparse "
                         "predictors collect, then train)")


class _Clock:
    """A logits processor that records when each token's logits are ready."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    path: str = "exact",
    predictors=None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    backend: str | None = None,
    streamer=None,
) -> Generation:
    """Continue ``prompt`` by at most ``max_new_tokens`` tokens through the FFN ``path``.

    Greedy when ``temperature`` is 0, else sampled at ``temperature`` from the smallest set of
    tokens holding ``top_p`` of the probability (torch's global generator seeded with
    ``seed``). ``predictors`` (a :class:`~prosparse.predictors.PredictorSet`) drive the
    ``predicted`` path. ``streamer`` (e.g. ``transformers.TextStreamer``) receives the tokens
    as they come. The model is left as it was given.
    """
    from transformers import LogitsProcessorList

    if not prompt.strip():
        raise UsageError("the prompt is empty; give the text to continue")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens ({max_new_tokens}) must be at least 1")
    if path not in PATHS:
        raise UsageError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    if (path == "predicted") != (predictors is not None):
        raise UsageError("the predicted path needs predictors, and only it takes them")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UsageError(f"temperature ({temperature:g}) must be >= 0 and top_p ({top_p:g}) in "
                         "(0, 1]")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # (1, prompt tokens)
    if ids.numel() == 0:
        raise UsageError(f"the prompt {prompt!r} gives no tokens; give some text")
    if path != "dense":
        why = sparse_unready(model)
        if why is not None:
            raise UsageError(f"the {path} sparse FFN cannot run this model: {why}; convert it "
                             "first (prosparse convert MODEL --act relu --out DIR)")
    restore = None  # () -> None that puts the dense modules back; dense: nothing swapped
    if path == "exact":
        _, restore = sparsify_with_restore_(model, backend=backend)
    elif path == "predicted":
        try:
            restore = attach_predictors_(model, predictors, backend=backend)
        except ValueError as e:
            raise UsageError(f"the predictors do not fit this model: {e}") from None
        reset_predicted_counts(model)
    sampling = None
    kwargs: dict = {"do_sample": False}
    if temperature > 0:
        sampling = {"temperature": temperature, "top_p": top_p, "seed": seed}
        # top_k=0: only temperature and nucleus shape the distribution
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    clock = _Clock()
    predicted = None
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 logits_processor=LogitsProcessorList([clock]),
                                 streamer=streamer, **kwargs)
            seconds = time.perf_counter() - start
        if path == "predicted":
            predicted = mean_predicted_sparsity(model)
    finally:
        if restore is not None:
            restore()
    new = out[0, ids.shape[1]:]  # (new tokens,)
    n = new.numel()
    steps = clock.stamps
    if n >= 2 and len(steps) >= 2 and steps[-1] > steps[0]:
        rate = (len(steps) - 1) / (steps[-1] - steps[0])
    else:
        rate = n / max((steps[0] if steps else start + seconds) - start, 1e-9)
    counter = x1_zeros(model, out, start=ids.shape[1])
    return Generation(
        prompt=prompt,
        text=tokenizer.decode(new, skip_special_tokens=True),
        new_tokens=n,
        tokens_per_s=rate,
        seconds=seconds,
        path=path,
        average_sparsity=counter.average_sparsity(),
        layer_sparsity=counter.layer_sparsity(),
        token_ids=new.tolist(),
        sampling=sampling,
        predicted_sparsity=predicted,
    )


@torch.no_grad()
def x1_zeros(model: nn.Module, ids: torch.Tensor, start: int) -> ZeroCounter:
    """Exact zeros of x1 per layer at positions ``start`` onwards of ``ids`` (1, seq): one
    forward of the whole sequence, so each token sees the context it was generated in."""
    keep = torch.zeros(ids.shape, dtype=torch.bool)  # (1, seq)
    keep[:, start:] = True
    counter = None
    with capture_x1(model, lambda i, x1: counter(i, x1)) as n_layers:
        counter = ZeroCounter(n_layers)
        counter.set_mask(keep)
        model(input_ids=ids, use_cache=False)
    return counter
