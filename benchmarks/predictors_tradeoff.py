"""Recall target against predicted sparsity and quality, from one trained predictor set.

    .venv/bin/python benchmarks/predictors_tradeoff.py runs/frontier/prosparse-1.5/final \
        runs/predictors/smollm2_prosparse1.5/gate runs/predictors/smollm2_prosparse1.5/pairs \
        --recalls 0.9,0.95,0.98,0.99,0.995 \
        --json benchmarks/results/predictors_smollm2_prosparse1.5_tradeoff.json

For each recall target the thresholds are re-tuned on the collection's validation split
(``prosparse predictors calibrate``), then the model runs held-out wiki text with the predictors
attached: perplexity against the model's own (no predictors), the share of teacher-forced
argmax tokens that change, and the sparsity the predictors give on that text. Results:
docs/results/predictors.md.
"""

from __future__ import annotations

import argparse
import platform

import torch

from prosparse.core.io import write_json
from prosparse.core.tables import format_table
from prosparse.data import load_texts, pack_blocks
from prosparse.inference import attach_predictors_, mean_predicted_sparsity
from prosparse.measure.heldout import evaluate_blocks
from prosparse.models import load_model
from prosparse.predictors import PairData, load_predictors
from prosparse.predictors.train import calibrate_predictors, evaluate_predictors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("predictors")
    ap.add_argument("pairs")
    ap.add_argument("--recalls", default="0.9,0.95,0.98,0.99")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    model.eval()
    blocks = pack_blocks(tok, load_texts("wiki", "heldout"), args.seq_len, args.eval_tokens)
    dense = evaluate_blocks(model, blocks, argmax=True)
    base = {"perplexity": dense.perplexity, "eval_tokens": dense.nll_count}
    pset, data = load_predictors(args.predictors), PairData(args.pairs)
    rows, out = [], []
    for recall in [float(r) for r in args.recalls.split(",")]:
        calibrate_predictors(pset, data, recall, progress=False)
        val = evaluate_predictors(pset, data, progress=False)
        restore = attach_predictors_(model, pset)
        try:
            pred = evaluate_blocks(model, blocks, argmax=True)
            held = mean_predicted_sparsity(model)
        finally:
            restore()
        r = {"target_recall": recall, "val_recall": val["average_recall"],
             "val_predicted_sparsity": val["average_predicted_sparsity"],
             "val_true_sparsity": val["average_true_sparsity"],
             "val_mass_missed": val["average_mass_missed"],
             "heldout_predicted_sparsity": held, "perplexity": pred.perplexity,
             "teacher_forced_differ": float((pred.argmax != dense.argmax).float().mean())}
        out.append(r)
        rows.append([f"{recall:g}", f"{100 * r['val_recall']:.2f}",
                     f"{100 * r['val_predicted_sparsity']:.2f}",
                     f"{100 * r['val_true_sparsity']:.2f}", f"{100 * r['val_mass_missed']:.2f}",
                     f"{r['perplexity']:.2f}", f"{100 * r['teacher_forced_differ']:.2f}"])
    print(f"without predictors: held-out perplexity {base['perplexity']:.2f} "
          f"({base['eval_tokens']} tokens)")
    print(format_table(["recall target", "recall %", "pred. sparsity %", "true sparsity %",
                        "abs(x1) missed %", "ppl", "argmax changed %"], rows))
    if args.json:
        write_json(args.json, {"model": args.model, "predictors": args.predictors,
                               "pairs": args.pairs, "without_predictors": base, "recalls": out,
                               "machine": platform.machine(),
                               "threads": torch.get_num_threads()})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
