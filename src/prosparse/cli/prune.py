"""``prosparse prune``: N:M weight sparsity by magnitude, Wanda, SparseGPT or ProxSparse."""

from __future__ import annotations

import argparse

from prosparse.core.tables import format_table

# Flags that map onto PruneConfig / ProxConfig fields, all defaulting to None so that a value
# is "given" exactly when it is on the command line; then --config, then the dataclass default.
_FLAGS = [
    ("--method", str, "magnitude, wanda, sparsegpt or proxsparse (default wanda)"),
    ("--pattern", str, "N:M, keep N of every M along the input dim (default 2:4)"),
    ("--data", str, "calibration source, its train split (default wiki)"),
    ("--samples", int, "calibration blocks (default 64)"),
    ("--seq-len", int, "tokens per calibration block (default 256)"),
    ("--lambda", float, "ProxSparse: weight of the 2:4 regulariser (default 0.05)"),
    ("--lambda-scale", str, "ProxSparse: raw (prox(w, lambda), the authors') or lr "
                            "(prox(w, lr * lambda)) (default raw)"),
    ("--lr", float, "ProxSparse: peak AdamW learning rate (default 1e-3)"),
    ("--epochs", int, "ProxSparse: passes over the calibration blocks (default 1)"),
    ("--warmup", float, "ProxSparse: share of steps warming up (default 0.1)"),
    ("--lambda2", float, "ProxSparse: frozen-weight term weight, 0 = off (default 0)"),
    ("--epsilon", float, "ProxSparse: frozen-weight term epsilon (default 0.1)"),
    ("--log-every", int, "ProxSparse: steps between group non-zero log entries (default 10)"),
    ("--batch-size", int, "blocks per forward (baselines, default 8) / per step "
                          "(ProxSparse, default 1)"),
    ("--blocksize", int, "SparseGPT: columns per block (default 128)"),
    ("--damp", float, "SparseGPT: dampening, share of mean diag(H) (default 0.01)"),
    ("--eval-data", str, "held-out perplexity source, its heldout split (default wiki)"),
    ("--eval-tokens", int, "held-out tokens for perplexity before/after, 0 = skip "
                           "(default 8192)"),
    ("--eval-seq-len", int, "tokens per held-out block (default 256)"),
    ("--dtype", str, "weights dtype (default float32)"),
    ("--device", str, "torch device of the one-shot baselines (default cpu)"),
    ("--seed", int, "calibration seed (default 0)"),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def resolve_config(args: argparse.Namespace):
    """PruneConfig from --config (a recipe YAML of flat keys) overridden by the flags given."""
    from prosparse.pruning.run import config_from_mapping

    values: dict = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            from prosparse.core.errors import UsageError

            raise UsageError(f"--config {args.config} must be a mapping of settings")
        values.update(loaded)
    if args.model is not None:
        values["model"] = args.model
    for flag, _, _ in _FLAGS:
        v = getattr(args, _dest(flag))
        if v is not None:
            values[_dest(flag)] = v
    batch = values.pop("batch_size", None)
    cfg = config_from_mapping(values)
    if batch is not None:
        if cfg.method == "proxsparse":
            cfg.prox.batch_size = batch
        else:
            cfg.batch_size = batch
    return cfg


def result_table(result: dict) -> str:
    ppl = result["perplexity"]
    rows = [[result["method"], result["pattern"], result["samples"],
             "-" if ppl["before"] is None else f"{ppl['before']:.2f}",
             "-" if ppl["after"] is None else f"{ppl['after']:.2f}",
             f"{100 * result['zeros']:.2f}", f"{100 * result['compliance']:.2f}",
             f"{result['wall_seconds']:.0f}"]]
    return format_table(["method", "pattern", "samples", "ppl before", "ppl after",
                         "zeros %", "N:M groups %", "wall s"], rows)


def _prune(args) -> int:
    from prosparse.core.io import write_json
    from prosparse.pruning.run import prune

    cfg = resolve_config(args)
    result = prune(cfg, args.out, overwrite=args.overwrite)
    if "compliance" not in result:  # a non-main process under accelerate launch
        return 0
    print(result_table(result))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} linear(s) (in_features not divisible by M): "
              + ", ".join(result["skipped"]))
    if args.json:
        write_json(args.json, result)
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prune", help="N:M weight sparsity (magnitude, Wanda, SparseGPT, "
                                     "ProxSparse)",
                       description="Prune every linear inside the decoder blocks to an N:M "
                                   "pattern and write a checkpoint that loads in transformers, "
                                   "its masks and the result (held-out perplexity before and "
                                   "after, N:M compliance per layer, wall time).")
    p.add_argument("model", nargs="?", default=None,
                   help="HF directory, .gguf file or embedded name (default smollm2-135m)")
    p.add_argument("--config", help="recipe YAML of settings (configs/proxsparse-*.yaml); "
                                    "flags override it")
    for flag, typ, help_ in _FLAGS:
        p.add_argument(flag, type=typ, default=None, dest=_dest(flag), help=help_)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", help="also write the result as JSON here")
    p.set_defaults(func=_prune)
