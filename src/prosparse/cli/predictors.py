"""``prosparse predictors collect | train | eval | export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from prosparse.cli import args as a
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


def _collect(args) -> int:
    from prosparse.models.loading import load_model
    from prosparse.predictors.collect import collect_from_data

    specs = args.data or [DEFAULT_DATA]
    check_data(specs)
    checks.check_output_dir(args.out, args.overwrite)
    a.activation_from_args(args)  # conflicting flags fail before the model loads
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    a.apply_activation_args(model, args)
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


# `predictors train` flags -> TrainConfig fields; a flag given on the command line wins over
# --config and KEY=VALUE overrides, which win over the dataclass defaults.
_TRAIN_FLAGS = {"hidden": "hidden", "epochs": "epochs", "patience": "patience",
                "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
                "target_recall": "target_recall", "max_tokens": "max_train_tokens",
                "init": "init", "seed": "seed", "device": "device"}


def train_config(args):
    """TrainConfig from --config FILE, then KEY=VALUE overrides, then the flags given."""
    from prosparse.core.config import apply_overrides, build, read_yaml
    from prosparse.predictors.train import TrainConfig

    what = "predictor training config"
    data = read_yaml(args.config, what, "prosparse.predictors.TrainConfig") if args.config else {}
    data = apply_overrides(data, args.overrides)
    for dest, key in _TRAIN_FLAGS.items():
        if getattr(args, dest) is not None:
            data[key] = getattr(args, dest)
    return build(TrainConfig, data, what=what)


def _train(args) -> int:
    from prosparse.predictors.collect import PairData
    from prosparse.predictors.export import save_predictors
    from prosparse.predictors.train import train_predictors

    cfg = train_config(args)
    checks.check_output_dir(args.out, args.overwrite)
    data = PairData(args.data_dir)
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
    pset = load_predictors(a.check_predictor_dir(args.predictors))
    result = evaluate_predictors(pset, data)
    _report(result, args, f"Predictors {args.predictors}")
    return 0


def _calibrate(args) -> int:
    from prosparse.predictors.collect import PairData
    from prosparse.predictors.train import recalibrate_saved

    checks.check_output_dir(args.out, args.overwrite)
    a.check_predictor_dir(args.predictors)
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
    pset = load_predictors(a.check_predictor_dir(args.predictors))
    if args.powerinfer:
        t = export_powerinfer(pset, args.powerinfer, overwrite=args.overwrite)
        print(f"wrote {args.powerinfer} ({len(pset)} x model_{{layer}}.pt, "
              f"sparse_threshold {t:g})")
    if args.out:
        save_predictors(pset, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    top = sub.add_parser("predictors", help="activation predictors: collect, train, eval, "
                                            "calibrate, export",
                         description="Per-layer activation predictors for approximate sparse "
                                     "inference (paper Sec. 3.3, App. C and F).")
    s = top.add_subparsers(dest="predictors", metavar="STEP")
    s.required = True

    p = s.add_parser("collect", help="collect (residual stream, x1 != 0) pairs per layer",
                     description="Stream each layer's predictor input (the residual stream "
                                 "before the post-attention norm) and label (x1 != 0) to disk: "
                                 "fp16 inputs, bit-packed labels, memory bounded by one batch.")
    a.add_model_args(p)
    a.add_activation_args(p, default=None)
    a.add_data_args(p, tokens=400_000, seq_len_=512)
    p.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                   help="document split of the data (default train)")
    p.add_argument("--clip-top", type=checks.open_fraction, default=None, metavar="FRAC",
                   help="positives are only each token's largest FRAC of |x1| (e.g. 0.15)")
    p.add_argument("--shard-tokens", type=checks.positive_int, default=65536,
                   help="rows per shard file")
    p.add_argument("--mass-tokens", type=checks.nonneg_int, default=2048,
                   help="validation tokens whose full |x1| is kept for the mass-missed metric")
    a.add_seed(p, 0, "block shuffling")
    a.add_out(p, "the collected pairs")
    p.set_defaults(func=_collect)

    p = s.add_parser("train", help="train one predictor per layer",
                     description="BCE with down-weighted negatives, AdamW, early stopping on "
                                 "validation recall, best checkpoint kept (paper App. F). "
                                 "Settings come from the flags given, then KEY=VALUE overrides, "
                                 "then --config, then the defaults (TrainConfig).")
    p.add_argument("data_dir", metavar="DIR", help="the --out of `predictors collect`")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings onto --config, e.g. hidden=512 negative_offset=0.01")
    p.add_argument("--config", metavar="FILE",
                   help="YAML of TrainConfig settings (hidden, epochs, lr, ...); flags win")
    a.add_out(p, "the trained predictors")
    p.add_argument("--hidden", type=checks.positive_int, default=None,
                   help="predictor hidden width (default 1024)")
    p.add_argument("--epochs", type=checks.nonneg_int, default=None,
                   help="most epochs per layer; 0 keeps the gate's truncation untrained (only "
                        "the threshold is tuned): predictors in seconds (default 20)")
    p.add_argument("--patience", type=checks.positive_int, default=None,
                   help="stop after this many epochs without improvement (default 3)")
    a.add_batch_size(p, None, "tokens per step (default 1024)")
    p.add_argument("--lr", type=checks.positive_float, default=None,
                   help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=checks.nonneg_float, default=None,
                   help="AdamW weight decay (default 0.01)")
    p.add_argument("--target-recall", type=checks.open_fraction, default=None, metavar="R",
                   help="tune each layer's threshold to validation recall R (e.g. 0.95); "
                        "default: probability 0.5")
    p.add_argument("--max-tokens", type=checks.positive_int, default=None,
                   help="train on at most this many tokens per layer (default: all)")
    p.add_argument("--init", choices=("auto", "gate", "random"), default=None,
                   help="start from the rank-hidden/2 truncation of each layer's gate (gate), "
                        "from random weights as the paper (random), or gate where the "
                        "collection holds it (auto, default)")
    p.add_argument("--layers", type=_layers, default=None, help="only these layers, e.g. 0-3")
    a.add_device(p, None, "where to train; auto: CUDA when available (default auto)", auto=True)
    a.add_seed(p, None, "initialisation and shuffling (default 0)")
    a.add_json(p, "per-layer metrics")
    a.add_plot(p, "per-layer metrics")
    p.set_defaults(func=_train)

    p = s.add_parser("eval", help="recall, predicted sparsity, precision, |x1| mass missed",
                     description="Per-layer and average metrics of saved predictors (ours or "
                                 "PowerInfer's folder) on the validation split of a collection.")
    p.add_argument("predictors", metavar="PRED", help="predictor folder (ours or PowerInfer's)")
    p.add_argument("data_dir", metavar="DIR", help="the --out of `predictors collect`")
    p.add_argument("--target-recall", type=float, default=None, help=argparse.SUPPRESS)
    a.add_json(p, "per-layer metrics")
    a.add_plot(p, "per-layer metrics")
    p.set_defaults(func=_eval)

    p = s.add_parser("calibrate", help="re-tune thresholds to a target recall, no retraining",
                     description="Set every layer's threshold to the largest logit that keeps "
                                 "validation recall >= R, and write the predictors anew: one "
                                 "trained set gives the whole recall / sparsity trade-off.")
    p.add_argument("predictors", metavar="PRED", help="predictor folder (ours or PowerInfer's)")
    p.add_argument("data_dir", metavar="DIR", help="the --out of `predictors collect`")
    p.add_argument("--target-recall", type=checks.open_fraction, required=True, metavar="R",
                   help="validation recall each layer keeps, e.g. 0.99")
    a.add_out(p, "the recalibrated predictors")
    a.add_json(p, "per-layer metrics")
    a.add_plot(p, "per-layer metrics")
    p.set_defaults(func=_calibrate)

    p = s.add_parser("export", help="write predictors in PowerInfer's layout (or ours)",
                     description="PowerInfer: model_{layer}.pt with fc1.weight [D, d_model], "
                                 "fc2.weight [d_ff, D], and config.json with sparse_threshold.")
    p.add_argument("predictors", metavar="PRED", help="predictor folder (ours or PowerInfer's)")
    p.add_argument("--powerinfer", metavar="DIR", help="write PowerInfer's folder here")
    a.add_out(p, "our format", required=False, overwrite_role="and --powerinfer")
    p.set_defaults(func=_export)
