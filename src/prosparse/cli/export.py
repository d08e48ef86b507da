"""``prosparse export powerinfer``."""

from __future__ import annotations

import argparse

from prosparse.cli import args as a
from prosparse.core.tables import format_table, pct
from prosparse.data import DEFAULT_DATA


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
    a.add_model(p, role="a ReLU or FATReLU LLaMA checkpoint", required=True)
    a.add_predictors(p, "trained on MODEL; required: PowerInfer runs a ReLU model only through "
                        "them")
    a.add_out(p, "model/, predictors/ and the report")
    a.add_data(p, "the held-out text measured", default=DEFAULT_DATA, repeatable=False)
    p.add_argument("--split", default="heldout", choices=("train", "heldout", "all"),
                   help="document split of --data (default heldout)")
    a.add_tokens(p, 8192, "held-out tokens measured", type=_count)
    a.add_seq_len(p, 256, "the chunk length, PowerInfer's perplexity -c", type=_n_ctx)
    a.add_batch_size(p, 4, "chunks per forward pass", type=_count)
    a.add_dtype(p, role="what the model is measured in")
    a.add_json(p, "the report")
    p.set_defaults(func=_powerinfer)
