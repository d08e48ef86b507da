"""``prosparse predictors collect | train | eval | export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from prosparse.cli.convert import (
    activation_from_args,
    add_activation_args,
    add_model_args,
    apply_activation_args,
)
from prosparse.cli.sparsity import add_data_args
from prosparse.core import checks
from prosparse.core.errors import UsageError
from prosparse.core.tables import pct
from prosparse.data import DEFAULT_DATA, check_data


def _layers(text: str) -> list[int]:
    """``0-9,12`` -> [0, ..., 9, 12]."""
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi or lo)
            if lo < 0 or hi < lo:
                raise ValueError
            out.extend(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer list such as 0-9,12 "
                                         "(layers count from 0, ranges go up)") from None
    return sorted(set(out))


def check_predictor_dir(path: str) -> Path:
    """A predictor folder to read: ours (``predictors.json``) or PowerInfer's (``model_0.pt``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"no predictor folder at {path!r}; write one with `prosparse predictors "
                         "train` (or give PowerInfer's)")
    if not (folder / "predictors.json").is_file() and not (folder / "model_0.pt").is_file():
        raise UsageError(f"{folder} holds neither predictors.json (prosparse) nor model_0.pt "
                         "(PowerInfer); give the --out of `prosparse predictors train`")
    return folder


def _train_device(text: str) -> str:
    return text if text == "auto" else checks.device(text)


def _collect(args) -> int:
    from prosparse.models.loading import load_model
    from prosparse.predictors.collect import collect_from_data

    specs = args.data or [DEFAULT_DATA]
    check_data(specs)
    checks.check_output_dir(args.out, args.overwrite)
    activation_from_args(args)  # conflicting flags fail before the model loads
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    apply_activation_args(model, args)
    info = collect_from_data(model, tok, specs, args.out, tokens=args.tokens,
                             seq_len=args.seq_len, split=args.split, seed=args.seed,
                             overwrite=args.overwrite, clip_top=args.clip_top,
                             batch_size=args.batch_size, shard_tokens=args.shard_tokens,
                             mass_tokens=args.mass_tokens,
                             meta={"model": args.model, "data": specs, "split": args.split,
                                   "act": args.act, "threshold": args.threshold})
    print(f"collected {info['tokens']} tokens x {info['n_layers']} layers "
          f"(d_model {info['d_model']}, d_ff {info['d_ff']}) in {info['seconds']:.1f} s: "
          f"{info['bytes'] / 2**20:.1f} MiB in {len(info['shards'])} shard(s) per layer, "
          f"{info['n_val']} validation tokens")
    rates = info["positive_rate"]
    print(f"label sparsity: average {pct(1 - sum(rates) / len(rates))}% "
          f"(layers {pct(1 - max(rates))}..{pct(1 - min(rates))}%)")
    print(f"wrote {args.out}")
    return 0


def _report(result: dict, args, title: str) -> None:
    from prosparse.core.io import write_json
    from prosparse.predictors.metrics import metrics_table

    print(metrics_table(result))
    print(f"average recall {pct(result['average_recall'])}%, predicted sparsity "
          f"{pct(result['average_predicted_sparsity'])}% (true "
          f"{pct(result['average_true_sparsity'])}%)")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if getattr(args, "plot", None):
        from prosparse.core.plots import plot_predictor_layers

        plot_predictor_layers(result["layers"], args.plot, title=title)
        print(f"wrote {args.plot}")


def _train(args) -> int:
    from prosparse.predictors.collect import PairData
    from prosparse.predictors.export import save_predictors
    from prosparse.predictors.train import TrainConfig, train_predictors

    checks.check_output_dir(args.out, args.overwrite)
    data = PairData(args.data_dir)
    cfg = TrainConfig(hidden=args.hidden, epochs=args.epochs, patience=args.patience,
                      batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      target_recall=args.target_recall, max_train_tokens=args.max_tokens,
                      init=args.init, seed=args.seed, device=args.device)
    pset, result = train_predictors(data, cfg, layers=args.layers)
    starts = [m.get("init", "random") for m in result["layers"]]
    ranks = sorted({m["rank"] for m in result["layers"] if "rank" in m})
    print(f"start: the gate's rank-{'/'.join(map(str, ranks))} truncation in "
          f"{starts.count('gate')} layer(s), random weights in {starts.count('random')}"
          if ranks else f"start: random weights in {len(starts)} layer(s)")
    save_predictors(pset, args.out, overwrite=args.overwrite,
                    extra={"data": str(args.data_dir), "model": data.meta.get("model"),
                           "config": result["config"]})
    print(f"wrote {args.out}")
    _report(result, args, f"Predictors: {data.meta.get('model', args.data_dir)}")
    return 0


def _eval(args) -> int:
    from prosparse.predictors.collect import PairData
    from prosparse.predictors.export import load_predictors
    from prosparse.predictors.train import evaluate_predictors

    if args.target_recall is not None:
        raise UsageError("--target-recall belongs to `predictors train`; eval uses the saved "
                         "thresholds")
    data = PairData(args.data_dir)
    pset = load_predictors(check_predictor_dir(args.predictors))
    result = evaluate_predictors(pset, data)
    _report(result, args, f"Predictors {args.predictors}")
    return 0


def _calibrate(args) -> int:
    from prosparse.predictors.collect import PairData
    from prosparse.predictors.train import recalibrate_saved

    checks.check_output_dir(args.out, args.overwrite)
    check_predictor_dir(args.predictors)
    PairData(args.data_dir)
    result = recalibrate_saved(args.predictors, args.data_dir, args.target_recall, args.out,
                               overwrite=args.overwrite)
    print(f"wrote {args.out}")
    _report(result, args, f"Predictors {args.out} (recall target {args.target_recall:g})")
    return 0


def _export(args) -> int:
    from prosparse.predictors.export import export_powerinfer, load_predictors, save_predictors

    if args.powerinfer is None and args.out is None:
        raise UsageError("give --powerinfer DIR and/or --out DIR")
    if args.powerinfer is not None and args.out is not None and \
            Path(args.powerinfer).expanduser().resolve() == Path(args.out).expanduser().resolve():
        raise UsageError(f"--powerinfer and --out are both {args.out}; give two folders")
    for flag, out in (("--powerinfer", args.powerinfer), ("--out", args.out)):
        if out is not None:
            try:
                checks.check_output_dir(out, args.overwrite)
            except UsageError as e:
                raise UsageError(f"{flag}: {e}") from None
    pset = load_predictors(check_predictor_dir(args.predictors))
    if args.powerinfer:
        t = export_powerinfer(pset, args.powerinfer, overwrite=args.overwrite)
        print(f"wrote {args.powerinfer} ({len(pset)} x model_{{layer}}.pt, "
              f"sparse_threshold {t:g})")
    if args.out:
        save_predictors(pset, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    top = sub.add_parser("predictors", help="activation predictors: collect, train, eval, calibrate, export",
                         description="Per-layer activation predictors for approximate sparse "
                                     "inference (paper Sec. 3.3, App. C and F).")
    s = top.add_subparsers(dest="predictors", metavar="STEP")
    s.required = True

    p = s.add_parser("collect", help="collect (residual stream, x1 != 0) pairs per layer",
                     description="Stream each layer's predictor input (the residual stream "
                                 "before the post-attention norm) and label (x1 != 0) to disk: "
                                 "fp16 inputs, bit-packed labels, memory bounded by one batch.")
    add_model_args(p)
    add_activation_args(p, default=None)
    add_data_args(p, tokens=400_000, seq_len=512)
    p.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                   help="document split of the data (default train)")
    p.add_argument("--clip-top", type=checks.open_fraction, default=None, metavar="FRAC",
                   help="positives are only each token's largest FRAC of |x1| (e.g. 0.15)")
    p.add_argument("--shard-tokens", type=checks.positive_int, default=65536,
                   help="rows per shard file")
    p.add_argument("--mass-tokens", type=checks.nonneg_int, default=2048,
                   help="validation tokens whose full |x1| is kept for the mass-missed metric")
    p.add_argument("--seed", type=checks.nonneg_int, default=0, help="block shuffling seed")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_collect)

    p = s.add_parser("train", help="train one predictor per layer",
                     description="BCE with down-weighted negatives, AdamW, early stopping on "
                                 "validation recall, best checkpoint kept (paper App. F).")
    p.add_argument("data_dir", metavar="DIR", help="the --out of `predictors collect`")
    p.add_argument("--out", required=True, help="predictor folder to write (must not exist)")
    p.add_argument("--hidden", type=checks.positive_int, default=1024,
                   help="predictor hidden width")
    p.add_argument("--epochs", type=checks.nonneg_int, default=20,
                   help="most epochs per layer; 0 keeps the gate's truncation untrained (only "
                        "the threshold is tuned): predictors in seconds")
    p.add_argument("--patience", type=checks.positive_int, default=3,
                   help="stop after this many epochs without improvement")
    p.add_argument("--batch-size", type=checks.positive_int, default=1024,
                   help="tokens per step")
    p.add_argument("--lr", type=checks.positive_float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=checks.nonneg_float, default=0.01,
                   help="AdamW weight decay")
    p.add_argument("--target-recall", type=checks.open_fraction, default=None, metavar="R",
                   help="tune each layer's threshold to validation recall R (e.g. 0.95); "
                        "default: probability 0.5")
    p.add_argument("--max-tokens", type=checks.positive_int, default=None,
                   help="train on at most this many tokens per layer")
    p.add_argument("--init", choices=("auto", "gate", "random"), default="auto",
                   help="start from the rank-hidden/2 truncation of each layer's gate (gate), "
                        "from random weights as the paper (random), or gate where the "
                        "collection holds it (auto, default)")
    p.add_argument("--layers", type=_layers, default=None, help="only these layers, e.g. 0-3")
    p.add_argument("--device", default="auto", type=_train_device,
                   help="where to train: auto (CUDA when available, default), cuda or cpu")
    p.add_argument("--seed", type=checks.nonneg_int, default=0,
                   help="initialisation and shuffling seed")
    p.add_argument("--json", type=checks.output_file,
                   help="write per-layer metrics as JSON here")
    p.add_argument("--plot", type=checks.output_file, help="write the per-layer plot (PNG) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_train)

    p = s.add_parser("eval", help="recall, predicted sparsity, precision, |x1| mass missed",
                     description="Per-layer and average metrics of saved predictors (ours or "
                                 "PowerInfer's folder) on the validation split of a collection.")
    p.add_argument("predictors", metavar="PRED", help="predictor folder (ours or PowerInfer's)")
    p.add_argument("data_dir", metavar="DIR", help="the --out of `predictors collect`")
    p.add_argument("--target-recall", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=checks.output_file,
                   help="write per-layer metrics as JSON here")
    p.add_argument("--plot", type=checks.output_file, help="write the per-layer plot (PNG) here")
    p.set_defaults(func=_eval)

    p = s.add_parser("calibrate", help="re-tune thresholds to a target recall, no retraining",
                     description="Set every layer's threshold to the largest logit that keeps "
                                 "validation recall >= R, and write the predictors anew: one "
                                 "trained set gives the whole recall / sparsity trade-off.")
    p.add_argument("predictors", metavar="PRED", help="predictor folder (ours or PowerInfer's)")
    p.add_argument("data_dir", metavar="DIR", help="the --out of `predictors collect`")
    p.add_argument("--target-recall", type=checks.open_fraction, required=True, metavar="R",
                   help="validation recall each layer keeps, e.g. 0.99")
    p.add_argument("--out", required=True, help="predictor folder to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", type=checks.output_file,
                   help="write per-layer metrics as JSON here")
    p.add_argument("--plot", type=checks.output_file, help="write the per-layer plot (PNG) here")
    p.set_defaults(func=_calibrate)

    p = s.add_parser("export", help="write predictors in PowerInfer's layout (or ours)",
                     description="PowerInfer: model_{layer}.pt with fc1.weight [D, d_model], "
                                 "fc2.weight [d_ff, D], and config.json with sparse_threshold.")
    p.add_argument("predictors", metavar="PRED", help="predictor folder (ours or PowerInfer's)")
    p.add_argument("--powerinfer", metavar="DIR", help="write PowerInfer's folder here")
    p.add_argument("--out", metavar="DIR", help="write our format here")
    p.add_argument("--overwrite", action="store_true", help="replace existing folders")
    p.set_defaults(func=_export)
