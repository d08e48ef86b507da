"""Collect (predictor input, activation label) pairs per layer, streamed to disk in shards.

The input is the residual stream *before* the post-attention norm, the vector PowerInfer feeds
its predictors (``docs/conventions.md``); the label is ``x1 != 0`` with x1 the input of ``down_proj`` (paper
App. F), or, with ``clip_top``, only each token's largest ``clip_top * d_ff`` values of |x1|.

Layout of ``DIR`` (everything a program needs is in ``meta.json``)::

    meta.json                      d_model, d_ff, n_layers, tokens, n_val, shards, ...
    layer_00/x_0000.bin            fp16 inputs, (shard_tokens, d_model), row-major
    layer_00/y_0000.bin            uint8 labels, numpy.packbits along d_ff: (shard_tokens, d_ff/8)
    layer_00/mass.bin              fp16 |x1| of the first ``mass_tokens`` validation tokens
    layer_00/gate.safetensors      "weight": the gate as a linear map of the predictor input
                                   (see :func:`effective_gate`), when the layer allows one

Memory is bounded by one forward batch: every batch is appended to the open shard files and
dropped, and a shard is closed after ``shard_tokens`` rows, so nothing grows with ``tokens``.
The last ``val_fraction`` of the tokens (blocks are shuffled by ``pack_blocks``) is the
validation split of training (App. F: 95/5); the fraction of |x1| mass missed is measured on
its first ``mass_tokens`` tokens, the only place full x1 values are kept.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from prosparse.core.errors import UsageError
from prosparse.models.activations import activation_params
from prosparse.models.relufy import find_gated_ffns

# Children of a decoder layer that normalise the residual stream right before its FFN, in the
# order they are tried: Gemma 2/3 name it pre_feedforward_layernorm (their
# post_attention_layernorm normalises the attention *output*); Llama, Mistral, Qwen, Phi-3 and
# most others call it post_attention_layernorm.
FFN_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm", "ln_2")


@dataclass
class PredictorSite:
    """Where one layer's predictor reads its input and its label."""

    layer: int
    """Index among the model's gated FFNs (layer order)."""
    mlp_name: str
    """Qualified name of the gated FFN module."""
    norm_name: str | None
    """Qualified name of the norm whose *input* is the predictor input; None in post-norm
    layers (OLMo 2), whose FFN reads the residual stream itself."""
    norm: nn.Module | None
    mlp: nn.Module

    @property
    def input_module(self) -> nn.Module:
        """The module whose forward input is the predictor input (hook it with a pre-hook)."""
        return self.mlp if self.norm is None else self.norm

    @property
    def input_name(self) -> str:
        return f"{self.mlp_name} (input)" if self.norm_name is None else self.norm_name


def find_predictor_sites(model: nn.Module) -> list[PredictorSite]:
    """For every gated FFN, the sibling norm that feeds it (its input is the predictor's), or
    none in post-norm layers (a ``post_feedforward_layernorm`` without a
    ``pre_feedforward_layernorm``, as in OLMo 2), where the FFN's own input is the residual.

    Raises ``ValueError`` naming the FFN and the names looked for when a decoder layer has none.
    """
    sites = []
    for i, ffn in enumerate(find_gated_ffns(model)):
        parent_name, _, _ = ffn.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if (isinstance(getattr(parent, "post_feedforward_layernorm", None), nn.Module)
                and getattr(parent, "pre_feedforward_layernorm", None) is None):
            sites.append(PredictorSite(i, ffn.name, None, None, ffn.module))
            continue
        norm_attr = next((n for n in FFN_NORM_NAMES if isinstance(getattr(parent, n, None),
                                                                   nn.Module)), None)
        if norm_attr is None:
            raise ValueError(
                f"no norm feeding the FFN {ffn.name!r}: looked for "
                f"{', '.join(FFN_NORM_NAMES)} beside it in {type(parent).__name__}; predictors "
                "read the residual stream before that norm"
            )
        qual = f"{parent_name}.{norm_attr}" if parent_name else norm_attr
        sites.append(PredictorSite(i, ffn.name, qual, getattr(parent, norm_attr), ffn.module))
    return sites


GATE_FILE = "gate.safetensors"


@torch.no_grad()
def effective_gate(site: PredictorSite, gate_weight: torch.Tensor,
                   gate_bias: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
    """The gate pre-activation as a linear map of the predictor input ``h``.

    Without a norm between them (post-norm layers) that is ``W_gate`` itself. For an RMS-type
    norm ``n(h) = g * h / rms(h)`` (Llama, Mistral, Qwen, Gemma's ``1 + w``
    included), ``W_gate n(h) = (W_gate diag(g)) h / rms(h)``: up to a positive per-token factor
    the gate is the linear map ``W_eff = W_gate diag(g)`` of the predictor input, so its rank-k
    truncation is a natural starting point for a predictor (see ``train.init_from_gate``).
    Returns ``(W_eff, "")`` in fp32, or ``(None, why)`` when the layer does not fit that form.
    """
    if gate_bias is not None:
        return None, "the gate projection has a bias"
    if gate_weight.device.type == "meta" or not gate_weight.dtype.is_floating_point:
        return None, f"the gate weight is {gate_weight.dtype} on {gate_weight.device}"
    if site.norm is None:  # post-norm layer: the gate reads the predictor input itself
        return gate_weight.float(), ""
    ref = next(site.norm.parameters(), gate_weight)
    d = gate_weight.shape[1]
    g = site.norm(torch.ones(1, d, dtype=ref.dtype, device=ref.device)).float()[0]
    probe = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    want = site.norm(probe.to(device=ref.device, dtype=ref.dtype)).float().cpu()
    got = (g.cpu() * probe / probe.pow(2).mean(-1, keepdim=True).sqrt())
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
        return None, f"{site.norm_name} ({type(site.norm).__name__}) is not an RMS-type norm"
    return gate_weight.float() * g, ""


def labels_from_x1(x1: torch.Tensor, clip_top: float | None = None) -> torch.Tensor:
    """Boolean labels (tokens, d_ff): ``x1 != 0``, or with ``clip_top`` only the
    ``ceil(clip_top * d_ff)`` largest |x1| of each token that are also nonzero."""
    active = x1 != 0
    if clip_top is None:
        return active
    if not 0 < clip_top <= 1:
        raise UsageError(f"clip_top ({clip_top}) must be in (0, 1], e.g. 0.15")
    k = max(1, math.ceil(clip_top * x1.shape[-1]))
    top = torch.zeros_like(active)
    top.scatter_(-1, x1.abs().topk(k, dim=-1).indices, True)
    return active & top


def pack_labels(labels: torch.Tensor) -> np.ndarray:
    """(tokens, d_ff) bool -> (tokens, ceil(d_ff / 8)) uint8, numpy.packbits order."""
    return np.packbits(labels.cpu().numpy().astype(bool), axis=-1)


def unpack_labels(packed: np.ndarray, d_ff: int) -> np.ndarray:
    """Inverse of :func:`pack_labels`: (tokens, d_ff) bool."""
    return np.unpackbits(packed, axis=-1, count=d_ff).astype(bool)


class _ShardWriter:
    """Appends rows to ``{prefix}_{shard:04d}.bin`` files, a new file every ``shard_tokens``."""

    def __init__(self, folder: Path, prefix: str, shard_tokens: int):
        self.folder, self.prefix, self.shard_tokens = folder, prefix, shard_tokens
        self.rows: list[int] = []  # rows written to each shard
        self._f = None

    def write(self, arr: np.ndarray) -> None:
        start = 0
        while start < len(arr):
            if self._f is None or self.rows[-1] == self.shard_tokens:
                if self._f is not None:
                    self._f.close()
                self._f = open(self.folder / f"{self.prefix}_{len(self.rows):04d}.bin", "wb")
                self.rows.append(0)
            n = min(len(arr) - start, self.shard_tokens - self.rows[-1])
            self._f.write(np.ascontiguousarray(arr[start:start + n]).tobytes())
            self.rows[-1] += n
            start += n

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _LayerSink:
    """Receives one layer's predictor inputs (pre-hook on the norm) and x1 (pre-hook on
    down_proj) for the current batch and streams them to disk."""

    def __init__(self, folder: Path, d_ff: int, shard_tokens: int, clip_top: float | None,
                 val_start: int, mass_tokens: int, gate: torch.Tensor | None = None,
                 cutoff: float = 0.0, normed: bool = True, gate_note: str = ""):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.gate, self.cutoff = gate, cutoff  # effective gate, checked on the first batch
        self.normed = normed  # an RMS-type norm sits between the input and the gate
        self.gate_note = gate_note  # why there is no effective gate ("" when there is one)
        self.x = _ShardWriter(folder, "x", shard_tokens)
        self.y = _ShardWriter(folder, "y", shard_tokens)
        self.mass = open(folder / "mass.bin", "wb")
        self.d_ff, self.clip_top = d_ff, clip_top
        self.val_start, self.mass_end = val_start, val_start + mass_tokens
        self.written = 0  # tokens written so far
        self.positives = 0
        self.pending_x: torch.Tensor | None = None
        self.max_rows_held = 0  # the most rows ever held in memory at once (tests check it)

    def take_input(self, x: torch.Tensor) -> None:
        self.pending_x = x.detach().reshape(-1, x.shape[-1])  # (tokens, d_model)

    def take_x1(self, x1: torch.Tensor) -> None:
        x1 = x1.detach().reshape(-1, x1.shape[-1]).float()  # (tokens, d_ff)
        if self.pending_x is None or self.pending_x.shape[0] != x1.shape[0]:
            raise RuntimeError("the FFN ran without its norm's input: cannot pair predictor "
                               "inputs with labels in this model")
        n = x1.shape[0]
        self.max_rows_held = max(self.max_rows_held, n)
        labels = labels_from_x1(x1, self.clip_top)
        if self.written == 0 and self.gate is not None:
            self._check_gate(labels)
        self.positives += int(labels.sum())
        self.x.write(self.pending_x.to(torch.float16).cpu().numpy())
        self.y.write(pack_labels(labels))
        lo, hi = max(self.written, self.val_start), min(self.written + n, self.mass_end)
        if lo < hi:
            chunk = x1[lo - self.written:hi - self.written].abs().to(torch.float16)
            self.mass.write(chunk.cpu().numpy().tobytes())
        self.written += n
        self.pending_x = None

    def _check_gate(self, labels: torch.Tensor) -> None:
        """Keep the effective gate only if it reproduces this batch's labels: it must, unless
        the input found is not the one feeding the gate (a layout find_predictor_sites does
        not know)."""
        h = self.pending_x.float()
        w = self.gate.to(h.device)
        z = h @ w.T
        if self.normed:
            z = z / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        active = z > self.cutoff
        if self.clip_top is None:
            agree = float((active == labels).float().mean())
        else:  # clipped labels are a subset of the gate's actives
            agree = float((active & labels).sum()) / max(int(labels.sum()), 1)
        if agree < 0.99:
            self.gate, self.gate_note = None, f"matches only {agree:.1%} of the labels"

    def close(self) -> None:
        self.x.close()
        self.y.close()
        self.mass.close()
        if self.gate is not None:
            w = self.gate.cpu()
            fits = bool(w.abs().max() < 6e4)
            save_file({"weight": (w.half() if fits else w).contiguous()},
                      str(self.folder / GATE_FILE))


@torch.no_grad()
def collect_pairs(
    model: nn.Module,
    blocks: torch.Tensor,
    out: str | Path,
    clip_top: float | None = None,
    batch_size: int = 4,
    shard_tokens: int = 65536,
    val_fraction: float = 0.05,
    mass_tokens: int = 2048,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run ``blocks`` (n, seq_len) through ``model`` and write every layer's pairs under ``out``
    (an existing, empty folder). Returns the ``meta.json`` dict.

    The model's FFNs must use a ReLU-family activation (exact zeros are the labels).
    """
    out = Path(out)
    sites = find_predictor_sites(model)
    ffns = find_gated_ffns(model)
    for ffn in ffns:
        if activation_params(ffn.act) is None:
            raise UsageError(
                f"{ffn.name} uses {type(ffn.act).__name__}, not a ReLU-family activation, so "
                "x1 has no exact zeros to predict; pass --act relu (or --threshold T) or a "
                "ReLUfied checkpoint"
            )
    d_ff = ffns[0].down_proj.in_features
    d_model = ffns[0].down_proj.out_features
    total = int(blocks.numel())
    n_val = max(1, round(total * val_fraction))
    if n_val >= total:
        raise UsageError(f"{total} tokens leave nothing to train on after a "
                         f"{val_fraction:g} validation split; collect more --tokens")
    mass_tokens = min(mass_tokens, n_val)
    sinks = []
    for site in sites:
        ffn = ffns[site.layer]
        gate, note = effective_gate(site, *ffn.gate)
        sinks.append(_LayerSink(out / f"layer_{site.layer:02d}", d_ff, shard_tokens, clip_top,
                                total - n_val, mass_tokens, gate, activation_params(ffn.act)[1],
                                normed=site.norm is not None, gate_note=note))
    handles = []
    for site, sink in zip(sites, sinks):
        handles.append(site.input_module.register_forward_pre_hook(
            lambda _m, args, _s=sink: _s.take_input(args[0])))
        handles.append(ffns[site.layer].down_proj.register_forward_pre_hook(
            lambda _m, args, _s=sink: _s.take_x1(args[0])))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc="collect", leave=False,
                          disable=not progress):
            model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for sink in sinks:
            sink.close()
        model.train(was_training)
    info = {
        **(meta or {}),
        "d_model": d_model,
        "d_ff": d_ff,
        "n_layers": len(sites),
        "tokens": total,
        "n_val": n_val,
        "mass_tokens": mass_tokens,
        "clip_top": clip_top,
        "shard_tokens": shard_tokens,
        "shards": sinks[0].x.rows,
        "positive_rate": [s.positives / (total * d_ff) for s in sinks],
        "inputs": [s.input_name for s in sites],
        "gate_init": [s.gate is not None for s in sinks],
        "gate_init_notes": [s.gate_note for s in sinks],
        "max_rows_held": max(s.max_rows_held for s in sinks),
        "seconds": time.perf_counter() - t0,
        "bytes": sum(p.stat().st_size for p in out.rglob("*.bin")),
    }
    (out / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def collect_from_data(
    model: nn.Module,
    tokenizer,
    data: list[str],
    out: str | Path,
    tokens: int = 400_000,
    seq_len: int = 512,
    split: str = "train",
    seed: int = 0,
    overwrite: bool = False,
    **kwargs,
) -> dict:
    """``prosparse predictors collect``: ``tokens`` tokens split evenly over the data specs
    ``data``, packed into blocks of ``seq_len``, shuffled so the validation tail holds every
    source, then :func:`collect_pairs` into ``out`` written atomically. ``kwargs`` go to
    :func:`collect_pairs` (``clip_top``, ``batch_size``, ``shard_tokens``, ``mass_tokens``,
    ``meta``)."""
    from prosparse.core.io import atomic_dir
    from prosparse.data import load_texts, pack_blocks, parse_data_spec

    per_source = tokens // len(data)
    blocks = torch.cat([pack_blocks(tokenizer, load_texts(parse_data_spec(s), split), seq_len,
                                    per_source, seed=seed) for s in data])
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        return collect_pairs(model, blocks, tmp, **kwargs)


class PairData:
    """Read-only view of a collection folder: memory-mapped shards of one layer at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = self.folder / "meta.json"
        if not meta.is_file():
            raise UsageError(f"{meta} not found: is {self.folder} the --out of "
                             "`prosparse predictors collect`?")
        try:
            self.meta = json.loads(meta.read_text())
            self.d_model, self.d_ff = self.meta["d_model"], self.meta["d_ff"]
            self.n_layers, self.tokens = self.meta["n_layers"], self.meta["tokens"]
            self.n_val = self.meta["n_val"]
            shards = list(self.meta["shards"])
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UsageError(f"{meta} is corrupt ({type(e).__name__}: {e}); collect again with "
                             "`prosparse predictors collect`") from None
        self.n_train = self.tokens - self.n_val
        widths = {"x": (np.float16, self.d_model), "y": (np.uint8, (self.d_ff + 7) // 8)}
        for layer in range(self.n_layers):
            for prefix, (dtype, width) in widths.items():
                for s, rows in enumerate(shards):
                    f = self.folder / f"layer_{layer:02d}" / f"{prefix}_{s:04d}.bin"
                    want = rows * width * np.dtype(dtype).itemsize
                    size = f.stat().st_size if f.is_file() else None
                    if size != want:
                        raise UsageError(
                            f"{f} is {'missing' if size is None else f'{size} bytes'}, "
                            f"expected {want}: the collection is incomplete or corrupt; collect "
                            "again with `prosparse predictors collect`")

    def _concat(self, layer: int, prefix: str, dtype, width: int) -> np.ndarray:
        parts = [np.memmap(self.folder / f"layer_{layer:02d}" / f"{prefix}_{s:04d}.bin",
                           dtype=dtype, mode="r", shape=(rows, width))
                 for s, rows in enumerate(self.meta["shards"])]
        return parts[0] if len(parts) == 1 else _Rows(parts)

    def inputs(self, layer: int):
        """(tokens, d_model) fp16, row-indexable by slices (memory-mapped)."""
        return self._concat(layer, "x", np.float16, self.d_model)

    def labels_packed(self, layer: int):
        """(tokens, ceil(d_ff / 8)) uint8, row-indexable by slices (memory-mapped)."""
        return self._concat(layer, "y", np.uint8, (self.d_ff + 7) // 8)

    def gate(self, layer: int) -> torch.Tensor | None:
        """The layer's effective gate (d_ff, d_model) fp32 (:func:`effective_gate`), or None
        when collection could not derive one (older folders, non-RMS norms, gate biases)."""
        return load_file(str(self._gate_path(layer)))["weight"].float() \
            if self.has_gate(layer) else None

    def has_gate(self, layer: int) -> bool:
        return self._gate_path(layer).is_file()

    def _gate_path(self, layer: int) -> Path:
        return self.folder / f"layer_{layer:02d}" / GATE_FILE

    def mass(self, layer: int) -> np.ndarray:
        """|x1| (mass_tokens, d_ff) fp16 of the first validation tokens."""
        return np.fromfile(self.folder / f"layer_{layer:02d}" / "mass.bin",
                           dtype=np.float16).reshape(-1, self.d_ff)


class _Rows:
    """Row slicing across consecutive shard arrays, without concatenating them in memory."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), parts[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.shape[0])
        chunks = []
        for p, s0 in zip(self.parts, self.starts[:-1]):
            lo, hi = max(start, s0), min(stop, s0 + len(p))
            if lo < hi:
                chunks.append(p[lo - s0:hi - s0])
        if not chunks:
            return np.empty((0, self.shape[1]), dtype=self.parts[0].dtype)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
