"""``prosparse prune``: N:M weight sparsity by magnitude, Wanda, SparseGPT or ProxSparse."""

from __future__ import annotations

import argparse

from prosparse.cli import args as a
from prosparse.core.tables import format_table

# Flags that map onto PruneConfig / ProxConfig keys (the flat keys of configs/proxsparse-*.yaml),
# all defaulting to None so that a value is "given" exactly when it is on the command line:
# (flag, config key, type, help, old spellings kept as hidden aliases).
_FLAGS = [
    ("--method", "method", str, "magnitude, wanda, sparsegpt or proxsparse (default wanda)", ()),
    ("--pattern", "pattern", str, "N:M, keep N of every M along the input dim (default 2:4)",
     ()),
    ("--samples", "samples", int, "calibration blocks (default 128)", ()),
    ("--prox-lambda", "lambda", float, "ProxSparse: weight of the 2:4 regulariser (default "
                                       "0.05)", ("--lambda",)),
    ("--prox-lambda-scale", "lambda_scale", str, "ProxSparse: raw (prox(w, lambda), the "
                                                 "authors') or lr (prox(w, lr * lambda)) "
                                                 "(default raw)", ("--lambda-scale",)),
    ("--prox-mask-score", "mask_score", str, "ProxSparse: pick each group's top 2 of the "
                                             "learned weights by magnitude (the paper's) or "
                                             "wanda (|w| times input norm) (default "
                                             "wanda)", ()),
    ("--prox-reg-score", "reg_score", str, "ProxSparse: the regulariser acts on the weights "
                                           "(magnitude, the paper's) or on them times their "
                                           "input norm (wanda) (default wanda)", ()),
    ("--prox-lambda-warmup", "lambda_warmup", float, "ProxSparse: share of steps over which "
                                                     "lambda ramps up from 0 (default 0)", ()),
    ("--lr", "lr", float, "ProxSparse: peak AdamW learning rate (default 1e-3)", ()),
    ("--epochs", "epochs", int, "ProxSparse: passes over the calibration blocks (default 1)", ()),
    ("--warmup", "warmup", float, "ProxSparse: share of steps warming up (default 0.1)", ()),
    ("--prox-lambda2", "lambda2", float, "ProxSparse: frozen-weight term weight, 0 = off "
                                         "(default 0)", ("--lambda2",)),
    ("--prox-epsilon", "epsilon", float, "ProxSparse: frozen-weight term epsilon (default 0.1)",
     ("--epsilon",)),
    ("--log-every", "log_every", int, "ProxSparse: steps between group non-zero log entries "
                                      "(default 10)", ()),
    ("--val-samples", "val_samples", int, "ProxSparse: calibration blocks held back to choose "
                                          "the masks by the deployed model's perplexity "
                                          "(early stopping); 0 = the last step's (default 0)", ()),
    ("--val-every", "val_every", int, "ProxSparse: steps between those validations "
                                      "(default 16)", ()),
    ("--blocksize", "blocksize", int, "SparseGPT: columns per block (default 128)", ()),
    ("--damp", "damp", float, "SparseGPT: dampening, share of mean diag(H) (default 0.01)", ()),
    ("--eval-data", "eval_data", str, "held-out perplexity sources, comma-separated, reported "
                                      "beside the calibration data's own held-out split "
                                      "(in-domain); another domain shows overfitting "
                                      "(default wiki)", ()),
    ("--eval-tokens", "eval_tokens", int, "held-out tokens for perplexity before/after, 0 = "
                                          "skip (default 8192)", ()),
    ("--eval-seq-len", "eval_seq_len", int, "tokens per held-out block (default 256)", ()),
]
# The shared flags (cli/args.py) that map onto config keys too.
_SHARED = ("data", "seq_len", "batch_size", "dtype", "device", "seed")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def resolve_config(args: argparse.Namespace):
    """PruneConfig from --config FILE, then KEY=VALUE overrides, then the flags given, then
    MODEL: each later one wins. A MODEL with ``=`` in it is an override."""
    from prosparse.core.config import apply_overrides, read_yaml
    from prosparse.pruning.run import config_from_mapping

    overrides = list(args.overrides)
    model = args.model
    if model is not None and "=" in model:
        model, overrides = None, [model, *overrides]
    values = read_yaml(args.config, "pruning config", "configs/proxsparse-*.yaml") \
        if args.config else {}
    values = apply_overrides(values, overrides)
    given = [(key, key) for key in _SHARED] + [(_dest(flag), key) for flag, key, *_ in _FLAGS]
    for dest, key in given:
        if getattr(args, dest) is not None:
            values[key] = getattr(args, dest)
    if model is not None:
        values["model"] = model
    return config_from_mapping(values)


def result_table(result: dict) -> str:
    """One row per held-out source: perplexity before and after (the calibration source's own
    held-out split marked in-domain), then zeros, N:M compliance and wall time."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    held = result.get("heldout") or {result.get("data", "?"): {**result["perplexity"],
                                                                "in_domain": True}}
    rows = []
    for src, ppl in held.items():
        rows.append([result["method"], result["pattern"], result["samples"],
                     f"{src.split('=', 1)[0]}{' (in-domain)' if ppl.get('in_domain') else ''}",
                     f(ppl["before"]), f(ppl["after"]), f"{100 * result['zeros']:.2f}",
                     f"{100 * result['compliance']:.2f}", f"{result['wall_seconds']:.0f}"])
    return format_table(["method", "pattern", "samples", "held-out", "ppl before", "ppl after",
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
                                   "after, N:M compliance per layer, wall time). Settings come "
                                   "from MODEL and the flags given, then KEY=VALUE overrides, "
                                   "then --config, then the defaults.")
    a.add_model(p, default=None, role="default: --config's model, else smollm2-135m")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings onto --config, e.g. lambda=0.1 samples=16 (flat keys as in "
                        "configs/proxsparse-*.yaml)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML of settings (configs/proxsparse-*.yaml); flags override it")
    a.add_data(p, "calibration text, its train split (default wiki)", repeatable=False)
    a.add_seq_len(p, None, "calibration blocks (default 256)")
    a.add_batch_size(p, None, "blocks per forward (baselines, default 8) or per optimiser step "
                              "(proxsparse, default 1)")
    a.add_dtype(p, None, "default fp32")
    a.add_device(p, None, "the one-shot baselines' (default cpu; proxsparse uses Accelerate's)")
    a.add_seed(p, None, "calibration packing and shuffling (default 0)")
    for flag, _, typ, help_, old in _FLAGS:
        a.add_renamed(p, flag, old, type=typ, default=None, help=help_)
    a.add_out(p, "the pruned checkpoint, its masks and pruning.json")
    a.add_json(p, "the result (as pruning.json)")
    p.set_defaults(func=_prune)
