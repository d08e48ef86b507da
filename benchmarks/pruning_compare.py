"""Dense / magnitude / Wanda / SparseGPT / ProxSparse at 2:4 on one model, equal calibration data.

    .venv/bin/python benchmarks/pruning_compare.py --limit 200 \
        --json benchmarks/results/pruning_compare.json

Held-out ``wiki`` perplexity, the small lm-eval set and wall time per method; every method sees
the same calibration blocks (``--samples`` x ``--seq-len`` from the train split). The JSON is
rewritten after each method, so an interrupted run keeps what it measured. Results:
docs/results/pruning.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from prosparse.core.tables import format_table

TASKS = ["piqa", "hellaswag", "arc_easy", "boolq", "winogrande"]
METHODS = ["dense", "magnitude", "wanda", "proxsparse", "sparsegpt"]


def run(args) -> dict:
    from prosparse.core.io import write_json
    from prosparse.data import load_texts, pack_blocks
    from prosparse.evaluation import evaluate
    from prosparse.measure.heldout import evaluate_blocks
    from prosparse.models.loading import load_model
    from prosparse.pruning import prunable_linears, weight_sparsity
    from prosparse.pruning.calibration import calibration_blocks
    from prosparse.pruning.proxsparse import ProxConfig
    from prosparse.pruning.run import PruneConfig, run_method

    prox = ProxConfig(lam=args.lam, lr=args.lr, epochs=args.epochs, log_every=args.log_every,
                      mask_score=args.mask_score, reg_score=args.reg_score)
    cfg = PruneConfig(model=args.model, samples=args.samples, seq_len=args.seq_len, prox=prox)
    _, tok = load_model(args.model)
    blocks = calibration_blocks(tok, "wiki", args.samples, args.seq_len)
    heldout = pack_blocks(tok, load_texts("wiki", "heldout"), args.eval_seq_len,
                          args.eval_tokens)
    result = {"model": args.model, "pattern": "2:4", "calibration": {
        "data": "wiki (train split)", "samples": args.samples, "seq_len": args.seq_len},
        "heldout": {"data": "wiki (heldout split)", "tokens": int(heldout.numel()),
                    "seq_len": args.eval_seq_len},
        "lm_eval": {"tasks": TASKS, "limit": args.limit}, "proxsparse": {
            "lambda": args.lam, "lambda_enters": "raw: prox(w, lambda)", "lr": args.lr,
            "epochs": args.epochs, "mask_score": args.mask_score,
            "reg_score": args.reg_score}, "methods": {}}
    # Pass 1: prune and measure perplexity for every method (the JSON is complete after each);
    # pass 2: the lm-eval set on the pruned weights kept in memory.
    pruned = {}
    for method in args.methods:
        model, tok = load_model(args.model)
        start = time.perf_counter()
        extra = {}
        if method != "dense":
            cfg.method = method
            _, extra = run_method(model, prunable_linears(model), blocks, cfg, 2, 4,
                                  progress=True)
        seconds = time.perf_counter() - start
        ws = weight_sparsity(model)
        entry = {"prune_seconds": seconds,
                 "perplexity": evaluate_blocks(model, heldout, desc=f"ppl {method}").perplexity,
                 "compliance": ws["compliance"], "zeros": ws["zeros"]}
        if "proxsparse" in extra:
            log = extra["proxsparse"]
            entry["proxsparse"] = {k: log[k] for k in ("steps", "loss", "nonzero_shares",
                                                       "optimizer_steps")}
        result["methods"][method] = entry
        pruned[method] = {k: v.weight.detach().clone()
                          for k, v in prunable_linears(model).items()}
        print(f"{method}: ppl {entry['perplexity']:.2f}, {seconds:.0f} s", flush=True)
        if args.json:
            write_json(args.json, result)
    if args.limit:
        model, tok = load_model(args.model)
        linears = prunable_linears(model)
        for method, weights in pruned.items():
            with torch.no_grad():
                for k, w in weights.items():
                    linears[k].weight.copy_(w)
            ev = evaluate(model, tok, TASKS, limit=args.limit)
            entry = result["methods"][method]
            entry["lm_eval"] = {t: ev["tasks"][t]["value"] for t in TASKS}
            # The paper's "Average Performance": the mean of its task groups, as `prosparse
            # eval` and the frontier report it (not the mean of the five tasks).
            entry["lm_eval_groups"] = ev["groups"]
            entry["lm_eval_average"] = ev["average"]
            entry["lm_eval_seconds"] = ev["seconds"]
            print(f"{method}: lm-eval average {100 * entry['lm_eval_average']:.1f}", flush=True)
            if args.json:
                write_json(args.json, result)
    return result


def table(result: dict) -> str:
    rows = []
    for method, e in result["methods"].items():
        ev = e.get("lm_eval", {})
        rows.append([method, f"{e['perplexity']:.2f}",
                     *[f"{100 * ev[t]:.1f}" if t in ev else "-" for t in TASKS],
                     f"{100 * e['lm_eval_average']:.1f}" if ev else "-",
                     f"{100 * (e['compliance'] or 0):.0f}", f"{e['prune_seconds']:.0f}"])
    return format_table(["method", "held-out ppl", "PIQA", "HellaSwag", "ARC-e", "BoolQ",
                         "WinoGrande", "avg", "2:4 %", "prune s"], rows)


def markdown(result: dict) -> str:
    """The ``--md`` file: the setting, the command, the table."""
    c, x = result["calibration"], result["proxsparse"]
    return (
        f"# 2:4 weight pruning on {result['model']}\n\n"
        f"Calibration: {c['samples']} x {c['seq_len']} tokens of {c['data']} for every method; "
        f"held-out perplexity on {result['heldout']['tokens']} tokens; lm-eval first "
        f"{result['lm_eval']['limit']} documents per task (acc_norm for PIQA, HellaSwag, ARC-e; "
        f"acc for BoolQ, WinoGrande); avg = the mean of the task groups (Commonsense Reasoning, "
        f"Reading Comprehension, Other), as `prosparse eval`. ProxSparse: lambda {x['lambda']} "
        f"raw in the prox step, AdamW lr {x['lr']}, {x['epochs']} epoch(s) at batch 1, 10% "
        f"warm-up (the `prosparse prune` defaults).\n\nMade by:\n\n    .venv/bin/python "
        f"benchmarks/pruning_compare.py --limit {result['lm_eval']['limit']} --json "
        f"benchmarks/results/pruning_compare.json --md benchmarks/results/pruning_compare.md"
        f"\n\n{table(result)}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=",".join(METHODS),
                   type=lambda s: [m for m in s.split(",") if m])
    # Calibration and ProxSparse's settings default to `prosparse prune`'s (PruneConfig,
    # ProxConfig), so the table's row is the CLI's default run.
    from prosparse.pruning.proxsparse import ProxConfig
    from prosparse.pruning.run import PruneConfig

    p.add_argument("--samples", type=int, default=PruneConfig().samples)
    p.add_argument("--seq-len", type=int, default=256)

    d = ProxConfig()
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--mask-score", default=d.mask_score, choices=("magnitude", "wanda"))
    p.add_argument("--reg-score", default=d.reg_score, choices=("magnitude", "wanda"))
    p.add_argument("--log-every", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--limit", type=int, default=200,
                   help="lm-eval documents per task (0: skip; 200 in docs/results/pruning.md)")
    p.add_argument("--json", help="write the results here (after each method)")
    p.add_argument("--md", help="write the table as markdown here")
    args = p.parse_args()
    result = run(args)
    text = table(result)
    print(text)
    if args.md:
        from pathlib import Path

        Path(args.md).write_text(markdown(result))


if __name__ == "__main__":
    main()
