"""``prune``: one N:M pruning run from a model to a checkpoint folder, checked before any work.

The folder (written atomically) holds a checkpoint that loads in plain transformers (zeros in
the weights; ``config.json`` gains ``prosparse_pruning`` with the method, pattern, lambda and
samples), ``masks.safetensors`` and ``pruning.json`` (the result below).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from prosparse.core.errors import UsageError
from prosparse.pruning.masks import (
    MASKS_FILE,
    parse_pattern,
    prunable_linears,
    save_masks,
    split_divisible,
    weight_sparsity,
)
from prosparse.pruning.proxsparse import ProxConfig

METHODS = ("magnitude", "wanda", "sparsegpt", "proxsparse")
RESULT_FILE = "pruning.json"


@dataclass
class PruneConfig:
    """One ``prosparse prune`` run."""

    model: str = "smollm2-135m"
    """HF directory, .gguf file or embedded name."""
    method: str = "wanda"
    """magnitude, wanda, sparsegpt or proxsparse."""
    pattern: str = "2:4"
    """N:M: keep N of every M weights along the input dimension."""
    data: str = "wiki"
    """Calibration source (its train split)."""
    samples: int = 128
    """Calibration blocks (not used by magnitude)."""
    seq_len: int = 256
    """Tokens per calibration block."""
    batch_size: int = 8
    """Blocks per forward pass of the layer-by-layer baselines."""
    blocksize: int = 128
    """SparseGPT: columns per lazy-update block."""
    damp: float = 0.01
    """SparseGPT: dampening, a share of the mean Hessian diagonal."""
    eval_data: str = "wiki"
    """Held-out perplexity sources, comma-separated (their heldout splits), reported beside the
    calibration source's own held-out split (in-domain): text from another domain shows a mask
    that overfits its calibration data."""
    eval_tokens: int = 8192
    """Held-out tokens for perplexity before and after (0: skip)."""
    eval_seq_len: int = 256
    """Tokens per held-out block."""
    dtype: str = "float32"
    """Weights dtype."""
    device: str = "cpu"
    """Torch device for the one-shot baselines (ProxSparse uses Accelerate's)."""
    seed: int = 0
    """Calibration packing and shuffling seed."""
    prox: ProxConfig = field(default_factory=ProxConfig)
    """ProxSparse settings."""

    def check(self) -> tuple[int, int]:
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        n, m = parse_pattern(self.pattern)
        if self.method == "proxsparse" and (n, m) != (2, 4):
            raise UsageError(f"--pattern {self.pattern}: proxsparse learns 2:4 masks only; "
                             "use --pattern 2:4 or another method")
        if self.method == "sparsegpt" and self.blocksize % m:
            raise UsageError(f"--blocksize ({self.blocksize}) must be a multiple of M={m}")
        if self.method != "magnitude" and self.samples < 1:
            raise UsageError(f"--samples ({self.samples}) must be at least 1")
        if self.eval_tokens < 0:
            raise UsageError(f"--eval-tokens ({self.eval_tokens}) must be >= 0")
        if self.method == "proxsparse":
            self.prox.check()
        return n, m


def config_from_mapping(values: dict) -> PruneConfig:
    """A :class:`PruneConfig` from flat keys (a config YAML, ``KEY=VALUE`` overrides, CLI flags),
    typed by the one config loader (:func:`prosparse.core.config.build`): ProxSparse keys
    (``lambda``, ``lr``, ...) go to ``prox`` (a nested ``prox:`` mapping works too), and
    ``batch_size`` to the method that uses it. An unknown key lists the valid ones, a value of
    the wrong type names its key; ``dtype`` is stored as bf16, fp16 or fp32."""
    from prosparse.core.config import build
    from prosparse.core.errors import UnknownNameError
    from prosparse.models.loading import resolve_dtype

    top = {f.name for f in fields(PruneConfig)} - {"prox"}
    prox_keys = {"lambda" if f.name == "lam" else f.name for f in fields(ProxConfig)}
    nested = values.get("prox") or {}
    if not isinstance(nested, dict):
        raise UsageError(f"prox must be a mapping of ProxSparse settings, got {nested!r}")
    cfg, prox = {}, dict(nested)
    for key, value in values.items():
        k = str(key).replace("-", "_")
        k = "lambda" if k == "lam" else k
        if k in ("prox", "batch_size"):
            continue
        if k == "pattern" and isinstance(value, int) and not isinstance(value, bool):
            n, m = divmod(value, 60)
            raise UsageError(f"pattern is the number {value}: YAML reads an unquoted {n}:{m} as "
                             f"a base-60 number; quote it (pattern: \"{n}:{m}\")")
        if k in top:
            cfg[k] = value
        elif k in prox_keys:
            prox[k] = value
        else:
            valid = sorted((top | prox_keys) - {"prox"})
            raise UnknownNameError(f"unknown setting {key!r}; choose one of {', '.join(valid)}")
    batch = values.get("batch_size", values.get("batch-size"))
    if batch is not None:  # blocks per forward of the baselines, per optimiser step of ProxSparse
        (prox if cfg.get("method", PruneConfig.method) == "proxsparse" else cfg)["batch_size"] = batch
    config = build(PruneConfig, {**cfg, "prox": prox}, what="pruning config")
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    config.dtype = names[resolve_dtype(config.dtype)]
    return config


def prune(cfg: PruneConfig, out: str | Path, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Prune ``cfg.model`` to ``cfg.pattern`` with ``cfg.method``; write ``out``; return the
    result (also ``out/pruning.json``)."""
    from prosparse.data import load_texts, pack_blocks
    from prosparse.data.sources import check_data
    from prosparse.models.loading import load_model
    from prosparse.pruning.calibration import calibration_blocks

    n, m = cfg.check()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.method != "proxsparse":
        raise UsageError(f"--method {cfg.method} runs in one process; drop accelerate launch "
                         "(only proxsparse trains data-parallel)")
    from prosparse.core.io import check_output

    out = Path(out)
    check_output(out, kind="dir", overwrite=overwrite)  # before any work, as atomic_dir will
    evals = eval_sources(cfg)
    check_data([cfg.data, *evals])
    wall = time.perf_counter()
    device = "cpu" if cfg.method == "proxsparse" else cfg.device
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device)
    linears = prunable_linears(model)
    if not linears:
        raise UsageError(f"{cfg.model} has no linear layers to prune inside its decoder blocks")
    linears, skipped = split_divisible(linears, m)
    if not linears:
        raise UsageError(f"no linear of {cfg.model} has in_features divisible by M={m}; "
                         "choose another --pattern")
    blocks = val_blocks = None
    if cfg.method != "magnitude":
        val = cfg.prox.val_samples if cfg.method == "proxsparse" else 0
        blocks = calibration_blocks(tok, cfg.data, cfg.samples + val, cfg.seq_len, seed=cfg.seed)
        if val:  # held back from the same source, disjoint from the calibration blocks
            blocks, val_blocks = blocks[:cfg.samples], blocks[cfg.samples:]
    heldout: dict[str, torch.Tensor] = {}
    if cfg.eval_tokens:  # the calibration source's own held-out text first (in-domain)
        for src in dict.fromkeys([cfg.data, *evals]):
            heldout[src] = pack_blocks(tok, load_texts(src, "heldout"), cfg.eval_seq_len,
                                       cfg.eval_tokens)

    result = {"method": cfg.method, "pattern": f"{n}:{m}", "model": cfg.model,
              "data": cfg.data, "samples": 0 if blocks is None else len(blocks),
              "seq_len": cfg.seq_len,
              "lambda": cfg.prox.lam if cfg.method == "proxsparse" else None}
    accelerator = None
    if cfg.method == "proxsparse":
        from accelerate import Accelerator

        # cpu=True without CUDA: under accelerate launch that is MULTI_CPU (gloo), not N copies.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        model.to(accelerator.device)  # perplexity before, too, on the training device
    main = accelerator is None or accelerator.is_main_process
    result["heldout"] = {src: {"before": _perplexity(model, b) if main else None, "after": None,
                               "in_domain": src == cfg.data} for src, b in heldout.items()}
    start = time.perf_counter()
    masks, extra = run_method(model, linears, blocks, cfg, n, m, progress, accelerator,
                              val_blocks)
    result["prune_seconds"] = time.perf_counter() - start
    if not main:  # under accelerate launch, the main process evaluates and writes
        accelerator.wait_for_everyone()
        return result
    for src, b in heldout.items():
        result["heldout"][src]["after"] = _perplexity(model, b)
    # ``perplexity``: the (first) --eval-data source, as it always was; ``heldout``: every
    # source, the calibration data's own held-out split marked in_domain.
    first = evals[0] if evals else cfg.data
    result["perplexity"] = {k: v for k, v in result["heldout"].get(
        first, {"before": None, "after": None}).items() if k != "in_domain"}
    result["eval"] = {"data": cfg.eval_data, "in_domain": cfg.data,
                      "tokens": sum(b.numel() for b in heldout.values()) // max(len(heldout), 1),
                      "seq_len": cfg.eval_seq_len}
    sparsity = weight_sparsity(model, f"{n}:{m}")
    result.update({"zeros": sparsity["zeros"], "compliance": sparsity["compliance"],
                   "layers": sparsity["layers"], "skipped": skipped})
    result.update(extra)
    result["config"] = _plain(cfg)
    _save(model, tok, masks, result, out, overwrite)
    result["wall_seconds"] = time.perf_counter() - wall
    from prosparse.core.io import write_json

    write_json(out / RESULT_FILE, result)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result


def eval_sources(cfg: PruneConfig) -> list[str]:
    """The ``eval_data`` sources (comma-separated), in order, without repeats."""
    return list(dict.fromkeys(s.strip() for s in str(cfg.eval_data).split(",") if s.strip()))


def run_method(model, linears, blocks, cfg: PruneConfig, n: int, m: int, progress: bool,
               accelerator=None, val_blocks: torch.Tensor | None = None
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune ``linears`` in place by ``cfg.method``: (keep-masks, method-specific result)."""
    from prosparse.pruning import baselines

    if cfg.method == "magnitude":
        return baselines.magnitude_prune_(linears, n, m), {}
    if cfg.method == "wanda":
        return baselines.wanda_prune_(model, linears, blocks, n, m, cfg.batch_size,
                                      progress), {}
    if cfg.method == "sparsegpt":
        return baselines.sparsegpt_prune_(model, linears, blocks, n, m, cfg.blocksize,
                                          cfg.damp, cfg.batch_size, progress), {}
    from prosparse.pruning.proxsparse import learn_masks

    masks, log = learn_masks(model, linears, blocks, cfg.prox, accelerator, progress=progress,
                             val_blocks=val_blocks)
    return masks, {"lambda_scale": cfg.prox.lambda_scale,
                   "lambda_enters": log.pop("lambda_enters"), "proxsparse": log}


def _perplexity(model, blocks) -> float | None:
    if blocks is None:
        return None
    from prosparse.measure.heldout import evaluate_blocks

    return evaluate_blocks(model, blocks).perplexity


def _plain(cfg: PruneConfig) -> dict:
    d = asdict(cfg)
    d["prox"] = asdict(cfg.prox)
    return d


def _save(model, tok, masks, result: dict, out: Path, overwrite: bool) -> None:
    from prosparse.core.io import atomic_dir, write_json
    from prosparse.models.saving import save_model

    model.config.prosparse_pruning = {k: result[k] for k in
                                      ("method", "pattern", "lambda", "samples", "seq_len",
                                       "data")}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # save_model writes atomically itself: into our temporary folder, replaced whole.
        save_model(model, tok, tmp, overwrite=True)
        save_masks(masks, tmp / MASKS_FILE)
        write_json(tmp / RESULT_FILE, result)
