"""``prosparse export powerinfer``."""

from __future__ import annotations

import argparse

from prosparse.core.tables import format_table, pct
from prosparse.data import DEFAULT_DATA
from prosparse.models.loading import DTYPES


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _n_ctx(text: str) -> int:
    value = _count(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"{text!r} is too short a context; use >= 3 tokens")
    return value


def _powerinfer(args) -> int:
    from prosparse.core.io import write_json
    from prosparse.export.powerinfer import export_powerinfer_dir

    result = export_powerinfer_dir(args.model, args.predictors, args.out,
                                   overwrite=args.overwrite, data=args.data, split=args.split,
                                   tokens=args.tokens, n_ctx=args.seq_len, dtype=args.dtype,
                                   batch_size=args.batch_size)
    r = result.report
    p, e = r["perplexity"], r["eval"]
    rows = [[f"the model as trained ({r['activation']})", f"{p['model']:.3f}"],
            ["the model with its predictors", f"{p['model_predicted']:.3f}"]]
    if r["activation"] == "fatrelu":
        rows.append(["ReLU in place of FATReLU, every neuron", f"{p['relu_all_neurons']:.3f}"])
    rows.append(["PowerInfer: ReLU on the predicted neurons", f"{p['powerinfer']:.3f}"])
    print(f"held-out perplexity on {e['scored_tokens']} tokens of {e['data']} "
          f"(n_ctx {e['n_ctx']}, {e['chunks']} chunks):")
    print(format_table(["function", "perplexity"], rows))
    a = r["average"]
    if r["folded_layers"]:
        print(format_table(
            ["layer", "threshold", "effective", "recall %", "effective recall %",
             "predicted sparsity %", "effective %"],
            [[m["layer"], f"{m['threshold']:.4g}", f"{m['effective_threshold']:.3g}",
              pct(m["recall"]), pct(m["effective_recall"]), pct(m["predicted_sparsity"]),
              pct(m["effective_predicted_sparsity"])]
             for m in r["layers"] if not m["exact"]]))
        print(f"sparse_threshold {r['sparse_threshold']:g}: layers {r['folded_layers']} keep "
              "neurons from a logit just below 0 (PowerInfer has one threshold)")
    print(f"average recall {pct(a['effective_recall'])}% at predicted sparsity "
          f"{pct(a['effective_predicted_sparsity'])}% in PowerInfer (as trained "
          f"{pct(a['recall'])}% at {pct(a['predicted_sparsity'])}%)")
    print(f"wrote {result.out}; convert with:\n  {r['commands']['convert']}")
    if args.json:
        write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    top = sub.add_parser("export", help="make a model ready for an inference engine (PowerInfer)",
                         description="Write a model and its predictors in the form an inference "
                                     "engine converts with no hand step.")
    s = top.add_subparsers(dest="engine", metavar="ENGINE")
    s.required = True
    p = s.add_parser(
        "powerinfer", help="a folder PowerInfer's convert.py takes, and its perplexity",
        description="Write model/ (for PowerInfer's convert.py), predictors/ (model_{i}.pt, "
                    "config.json with sparse_threshold), heldout.txt, export.json and a README "
                    "with the commands; measure the held-out perplexity of what PowerInfer will "
                    "compute (ReLU on the predicted neurons) beside the model's own.")
    p.add_argument("model", metavar="CKPT", help="a ReLU or FATReLU LLaMA checkpoint folder")
    p.add_argument("--predictors", metavar="PRED",
                   help="predictors trained on this model (ours or PowerInfer's folder); "
                        "required: PowerInfer runs a ReLU model only through them")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"held-out text to measure: wiki, qa, or a .txt/.jsonl path (default "
                        f"{DEFAULT_DATA})")
    p.add_argument("--split", default="heldout", choices=("train", "heldout", "all"),
                   help="document split of --data (default heldout)")
    p.add_argument("--tokens", type=_count, default=8192, help="held-out tokens to measure")
    p.add_argument("--seq-len", type=_n_ctx, default=256,
                   help="chunk length, PowerInfer's perplexity -c (default 256)")
    p.add_argument("--batch-size", type=_count, default=4, help="chunks per forward pass")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype the model is measured in")
    p.add_argument("--json", help="write the report as JSON here")
    p.set_defaults(func=_powerinfer)
