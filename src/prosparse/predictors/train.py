"""Train one predictor per layer on collected pairs (paper App. F; ``docs/conventions.md``).

Per layer: BCE on logits with negatives down-weighted to ``positive rate + 0.005`` (active
neurons are the minority and a missed one costs accuracy, a false alarm only time), AdamW
(lr 1e-3, weight decay 0.01), batches of 1024 tokens, up to 20 epochs on the 95% split, early
stopping on the 5% validation split, and the best checkpoint kept.

"Best" is the paper's: the highest validation recall at the fixed threshold (logit 0,
probability 0.5). With ``target_recall`` the threshold is instead tuned each epoch to the
largest logit that keeps validation recall >= target, and the best checkpoint is the one with
the highest predicted sparsity at that recall: recall is then fixed, so sparsity is what is left
to choose on (recall alone would favour a predictor that calls everything active).

Initialisation. The paper starts from random weights. We start, by default, from the layer's
own gate: with ReLU-family activations a neuron is active exactly when its gate pre-activation
passes the cutoff, and behind an RMS-type norm that pre-activation is a linear map ``W_eff`` of
the predictor input up to a positive per-token factor (``collect.effective_gate``). The rank-k
truncation ``U_k S_k V_k^T`` of ``W_eff`` fits the predictor's shape exactly with
``k = hidden / 2``: ``fc1 = [A; -A]`` and ``fc2 = [B, -B]`` with ``A = sqrt(S_k) V_k^T`` and
``B = U_k sqrt(S_k)`` give ``fc2 relu(fc1 h) = B A h`` since ``relu(z) - relu(-z) = z``. Training
then only refines a predictor that already ranks neurons the way the gate does (recorded as
epoch 0 of the history, and kept if no epoch beats it).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prosparse.core.errors import UsageError
from prosparse.predictors.collect import PairData
from prosparse.predictors.metrics import LayerCounts, summarize
from prosparse.predictors.model import Predictor, PredictorSet


@dataclass
class TrainConfig:
    """Predictor training settings; the defaults are the paper's (App. F)."""

    hidden: int = 1024
    """Width of the predictor's hidden layer."""
    epochs: int = 20
    """Most passes over the training split."""
    patience: int = 3
    """Stop after this many epochs without a better validation score."""
    batch_size: int = 1024
    """Tokens per optimiser step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    negative_offset: float = 0.005
    """Weight of a negative label = layer positive rate + this."""
    target_recall: float | None = None
    """Tune each layer's threshold to this validation recall (None: logit 0, the paper's)."""
    init: str = "auto"
    """``gate`` (rank-k truncation of the layer's gate, see above), ``random`` (the paper's) or
    ``auto`` (gate where the collection holds one, else random)."""
    max_train_tokens: int | None = None
    """Use at most this many training tokens per layer (None: all)."""
    seed: int = 0
    """Seed of initialisation and shuffling."""
    device: str = "auto"
    """Where the predictors train: ``cuda``, ``cpu`` or ``auto`` (CUDA when there is one). The
    collected pairs stay on disk and in host memory; batches move to the device."""

    def __post_init__(self):
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise UsageError(f"target_recall ({self.target_recall}) must be in (0, 1], "
                             "e.g. 0.95")
        if self.init not in ("auto", "gate", "random"):
            raise UsageError(f"init ({self.init!r}) must be 'auto', 'gate' or 'random'")
        for name in ("hidden", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.epochs < 0 or (self.epochs == 0 and self.init == "random"):
            raise UsageError(f"epochs ({self.epochs}) must be at least 1, or 0 to keep the "
                             "gate's truncation untrained (init 'gate' or 'auto')")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device asked for by name must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available here; use "
                         "--device cpu (or auto)")
    return dev


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)
"""Set bits of every byte value: counts packed labels without unpacking them (8x the memory)."""


def _labels(packed: np.ndarray, d_ff: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, axis=-1, count=d_ff).view(np.bool_))


def _dev(pred: Predictor) -> torch.device:
    return pred.fc1.weight.device


@torch.no_grad()
def _logits(pred: Predictor, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Logits of CPU rows ``x`` on ``pred``'s device, returned on the CPU."""
    return torch.cat([pred(x[i:i + chunk].to(_dev(pred)).float()).cpu()
                      for i in range(0, len(x), chunk)])


def threshold_for_recall(logits: torch.Tensor, labels: torch.Tensor, target: float) -> float:
    """The largest logit threshold whose recall (``logit >= t`` among positives) >= target."""
    pos = logits[labels]
    if pos.numel() == 0:
        return float("inf")
    k = math.floor((1 - target) * pos.numel() + 1e-9)  # positives allowed below t
    return float(pos.sort().values[min(k, pos.numel() - 1)])


@torch.no_grad()
def evaluate_layer(pred: Predictor, threshold: float, x: torch.Tensor, labels: torch.Tensor,
                   mass: torch.Tensor | None = None, chunk: int = 4096) -> LayerCounts:
    """Counts of ``pred`` at ``threshold`` on (x, labels); ``mass`` is |x1| of the first rows."""
    counts = LayerCounts()
    for i in range(0, len(x), chunk):
        predicted = (pred(x[i:i + chunk].to(_dev(pred)).float()) >= threshold).cpu()
        y = labels[i:i + chunk]
        m = None
        if mass is not None and i < len(mass):
            n = min(len(mass) - i, len(y))
            counts.add(predicted[:n], y[:n], mass[i:i + n])
            predicted, y = predicted[n:], y[n:]
        if len(y):
            counts.add(predicted, y, m)
    return counts


@torch.no_grad()
def init_from_gate(pred: Predictor, gate: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   neg_weight: float) -> dict:
    """Set ``pred`` to ``c * U_k S_k V_k^T`` of the effective gate (d_ff, d_model), k = hidden
    // 2 (at most the gate's rank); hidden units beyond 2k keep their random fc1 rows with zero
    fc2 columns. ``c`` > 0, the logit scale, minimises the weighted BCE on the sample (x fp32,
    y bool labels). Returns ``{"rank", "scale"}``."""
    hidden = pred.fc1.out_features
    k = min(hidden // 2, *gate.shape)
    if k < 1:
        raise ValueError(f"hidden ({hidden}) must be at least 2 to start from the gate")
    dev = _dev(pred)
    u, s, vh = torch.linalg.svd(gate.to(dev).float(), full_matrices=False)
    a = s[:k].sqrt()[:, None] * vh[:k]  # (k, d_model)
    b = u[:, :k] * s[:k].sqrt()  # (d_ff, k)
    z = (x.to(dev) @ a.T) @ b.T  # (tokens, d_ff) logits at scale 1
    y = y.to(dev)
    yf = y.float()
    w = torch.where(y, 1.0, neg_weight)
    base = 1.0 / float(z.std().clamp_min(1e-12))
    scales = [base * 10 ** (e / 4) for e in range(-8, 9)]
    losses = [float(F.binary_cross_entropy_with_logits(c * z, yf, weight=w)) for c in scales]
    c = scales[int(np.argmin(losses))]
    pred.fc1.weight[:k] = a * c**0.5
    pred.fc1.weight[k:2 * k] = -a * c**0.5
    pred.fc2.weight.zero_()
    pred.fc2.weight[:, :k] = b * c**0.5
    pred.fc2.weight[:, k:2 * k] = -b * c**0.5
    return {"rank": k, "scale": c}


def train_layer(
    x_train: torch.Tensor,
    y_train: np.ndarray,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    d_ff: int,
    cfg: TrainConfig,
    mass: torch.Tensor | None = None,
    desc: str | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[Predictor, float, dict]:
    """Train one layer's predictor. ``x_*`` fp16 (tokens, d_model); ``y_train`` packed labels
    (numpy, unpacked per batch); ``y_val`` bool (tokens, d_ff); ``gate`` the layer's effective
    gate to start from (None: random start). Returns the best predictor, its threshold and its
    validation metrics with the per-epoch history (epoch 0: the starting point)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if gate is None and cfg.epochs == 0:
        raise ValueError("epochs 0 keeps the gate's truncation untrained, but this layer has no "
                         "effective gate (see the collection's gate_init_notes)")
    pred = Predictor(x_train.shape[1], d_ff, cfg.hidden).to(device)
    pos_rate = int(_POPCOUNT[y_train].sum(dtype=np.int64)) / (len(y_train) * d_ff)
    neg_weight = pos_rate + cfg.negative_offset
    init = {"init": "random"}
    if gate is not None:
        sample = torch.randperm(len(x_train), generator=gen)[:2048]
        init = {"init": "gate", **init_from_gate(
            pred, gate, x_train[sample].float(), _labels(y_train[sample.numpy()], d_ff),
            neg_weight)}
    opt = torch.optim.AdamW(pred.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_score, stale, history = None, -math.inf, 0, []

    def checkpoint(epoch: int, loss: float | None) -> bool:
        """Score the current weights on validation; keep them if best. True: stop early."""
        nonlocal best, best_score, stale
        pred.eval()
        threshold = 0.0
        if cfg.target_recall is not None:
            threshold = threshold_for_recall(_logits(pred, x_val), y_val, cfg.target_recall)
        m = evaluate_layer(pred, threshold, x_val, y_val).metrics()
        score = m["recall"] if cfg.target_recall is None else m["predicted_sparsity"]
        history.append({"epoch": epoch, "loss": loss, "threshold": threshold,
                        "recall": m["recall"], "predicted_sparsity": m["predicted_sparsity"]})
        bar.set_postfix(recall=f"{m['recall']:.4f}", sparsity=f"{m['predicted_sparsity']:.4f}")
        if score > best_score:
            best, best_score, stale = (copy.deepcopy(pred.state_dict()), threshold, epoch), \
                score, 0
            return False
        stale += 1
        return stale >= cfg.patience

    bar = tqdm(range(cfg.epochs), desc=desc, leave=False, disable=desc is None)
    if gate is not None:
        checkpoint(0, None)  # the gate's truncation is a candidate too
    for epoch in bar:
        pred.train()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            xb = x_train[idx].to(device).float()  # (batch, d_model)
            yb = _labels(y_train[idx.numpy()], d_ff).to(device).float()  # (batch, d_ff)
            weight = torch.where(yb > 0, 1.0, neg_weight)
            loss = F.binary_cross_entropy_with_logits(pred(xb), yb, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
        if checkpoint(epoch + 1, loss_sum / len(order)):
            break
    pred.load_state_dict(best[0])
    threshold = best[1]
    metrics = evaluate_layer(pred, threshold, x_val, y_val, mass).metrics()
    pred = pred.cpu()
    metrics.update(threshold=threshold, best_epoch=best[2],
                   epochs_run=sum(h["epoch"] > 0 for h in history), positive_rate=pos_rate,
                   negative_weight=neg_weight, **init, history=history)
    return pred, threshold, metrics


def train_predictors(
    data: PairData, cfg: TrainConfig, layers: list[int] | None = None, progress: bool = True
) -> tuple[PredictorSet, dict]:
    """Train every layer's predictor (or only ``layers``; the others stay untrained with
    threshold +inf, i.e. predict nothing). Returns the set and the JSON of ``train --json``."""
    layers = list(range(data.n_layers)) if layers is None else layers
    outside = [i for i in layers if not 0 <= i < data.n_layers]
    if outside:
        raise UsageError(f"--layers {outside} are not in {data.folder}, which holds layers "
                         f"0-{data.n_layers - 1}")
    pset = PredictorSet(data.d_model, data.d_ff, data.n_layers, cfg.hidden)
    pset.thresholds.fill_(math.inf)
    n_train = data.n_train if cfg.max_train_tokens is None else min(cfg.max_train_tokens,
                                                                     data.n_train)
    if cfg.init == "gate":
        missing = [i for i in layers if not data.has_gate(i)]
        if missing:
            notes = data.meta.get("gate_init_notes") or []
            why = notes[missing[0]] if missing[0] < len(notes) and notes[missing[0]] else \
                "the folder predates gate initialisation"
            raise UsageError(f"init='gate' but {data.folder} holds no effective gate for "
                             f"layer(s) {missing} ({why}); re-collect, or use init 'random'")
    results = []
    for layer in tqdm(layers, desc="layers", disable=not progress):
        gate = None if cfg.init == "random" else data.gate(layer)
        x = data.inputs(layer)
        y = data.labels_packed(layer)
        x_train = torch.from_numpy(np.array(x[:n_train]))
        y_train = np.array(y[:n_train])
        x_val = torch.from_numpy(np.array(x[data.n_train:data.tokens]))
        y_val = _labels(np.array(y[data.n_train:data.tokens]), data.d_ff)
        mass = torch.from_numpy(data.mass(layer))
        pred, threshold, m = train_layer(x_train, y_train, x_val, y_val, data.d_ff, cfg, mass,
                                         desc=f"layer {layer}" if progress else None, gate=gate)
        pset.layers[layer].load_state_dict(pred.state_dict())
        pset.thresholds[layer] = threshold
        results.append({"layer": layer, **m})
    return pset, summarize(results, config=asdict(cfg), train_tokens=n_train,
                           val_tokens=data.n_val, data=str(data.folder))


def calibrate_predictors(pset: PredictorSet, data: PairData, target_recall: float,
                         progress: bool = True) -> list[float]:
    """Re-tune every layer's threshold of ``pset`` (in place) to ``target_recall`` on the
    validation split of ``data``, without retraining: one trained set gives the whole
    recall / predicted-sparsity trade-off. Returns the new thresholds."""
    TrainConfig(target_recall=target_recall)  # validates the value
    _check_match(pset, data)
    out = []
    for layer in tqdm(range(data.n_layers), desc="calibrate", disable=not progress):
        x_val = torch.from_numpy(np.array(data.inputs(layer)[data.n_train:data.tokens]))
        y_val = _labels(np.array(data.labels_packed(layer)[data.n_train:data.tokens]), data.d_ff)
        out.append(threshold_for_recall(_logits(pset.layers[layer], x_val), y_val,
                                        target_recall))
        pset.thresholds[layer] = out[-1]
    return out


def recalibrate_saved(predictors: str | Path, data_dir: str | Path, target_recall: float,
                      out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """``prosparse predictors calibrate``: load the predictors saved at ``predictors``, re-tune
    their thresholds to ``target_recall`` on ``data_dir``'s validation split (no retraining),
    save them to ``out`` with their metadata, and return :func:`evaluate_predictors`."""
    from prosparse.predictors.export import load_predictors, save_predictors

    pset = load_predictors(predictors)
    data = PairData(data_dir)
    calibrate_predictors(pset, data, target_recall, progress=progress)
    meta_file = Path(predictors) / "predictors.json"
    extra = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    extra = {k: v for k, v in extra.items()
             if k not in ("format", "d_model", "d_ff", "hidden", "n_layers", "thresholds")}
    save_predictors(pset, out, overwrite=overwrite,
                    extra={**extra, "calibrated_from": str(predictors),
                           "target_recall": target_recall})
    return evaluate_predictors(pset, data, progress=progress)


def _check_match(pset: PredictorSet, data: PairData) -> None:
    if (len(pset), pset.d_model, pset.d_ff) != (data.n_layers, data.d_model, data.d_ff):
        raise UsageError(
            f"predictors ({len(pset)} layers, d_model {pset.d_model}, d_ff {pset.d_ff}) do not "
            f"match the data ({data.n_layers} layers, d_model {data.d_model}, d_ff {data.d_ff}); "
            "give the collection they were trained on"
        )


def evaluate_predictors(pset: PredictorSet, data: PairData, progress: bool = True) -> dict:
    """Metrics of ``pset`` (its own thresholds) on the validation split of ``data``."""
    _check_match(pset, data)
    results = []
    for layer in tqdm(range(data.n_layers), desc="eval", disable=not progress):
        x_val = torch.from_numpy(np.array(data.inputs(layer)[data.n_train:data.tokens]))
        y_val = _labels(np.array(data.labels_packed(layer)[data.n_train:data.tokens]), data.d_ff)
        threshold = float(pset.thresholds[layer])
        counts = evaluate_layer(pset.layers[layer], threshold, x_val, y_val,
                                torch.from_numpy(data.mass(layer)))
        results.append({"layer": layer, **counts.metrics(), "threshold": threshold})
    return summarize(results, val_tokens=data.n_val, data=str(data.folder))
