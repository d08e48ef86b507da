"""Does the training data matter for recovery from the swap? Wiki alone against a mixture of
offline English text, and KD+LM against KD only, at equal tokens.

Every variant is configs/smollm2-full.yaml's training setup (FFN only, KD temperature 2, lr 3e-4,
2 x 128 tokens a step) cut to a lambda-0 recovery of --steps steps with no threshold, so the
comparison is about recovery alone; each report carries lm-eval on the recipe's 5 tasks:

    make extra-data      # austen and pydoc, once
    .venv/bin/python benchmarks/data_study.py                          # ~65 min on 2 cores
    .venv/bin/python benchmarks/data_study.py --report RUN_DIR...      # table from finished runs

Held-out perplexity is on wiki's held-out split, which no variant trains on. Writes
benchmarks/results/data_study.{json,md}; the table and its findings: docs/results/long-recipe.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "wiki-kd+lm": [],
    "wiki-kd": ["distill.lm_weight=0"],
    "mix-kd+lm": ["data.sources=[wiki, austen, pydoc]", "data.weights=[0.5, 0.3, 0.2]"],
    # Does a lower learning rate keep the knowledge lm-eval measures?
    "wiki-kd+lm-lr1e-4": ["optim.lr=1.0e-4"],
}


def base_overrides(steps: int) -> list[str]:
    return [f"stages=[{{lambda: 0.0, steps: {steps}}}]", "threshold.value=0", "threshold.train=0",
            "checkpoint.every=0", f"log.eval_every={max(1, steps // 3)}"]


def summarize(run: Path) -> dict:
    """One row of the study from a finished ``prosparse train`` run directory."""
    import yaml

    from prosparse.training import read_metrics

    r = json.loads((run / "report.json").read_text())
    bench = r.get("benchmarks", {})

    # Older reports scored their final lm-eval under bf16 autocast; a
    # `prosparse eval RUN/final --json RUN/eval_fp32.json` next to it takes precedence.
    rescored = run / "eval_fp32.json"
    if rescored.is_file():
        bench = {**bench, "final": json.loads(rescored.read_text())}

    def lm(which: str) -> dict | None:
        b = bench.get(which)
        if not b:
            return None
        tasks = {t: v["value"] for t, v in b["tasks"].items()}
        return {"average": b["average"], "task_mean": statistics.fmean(tasks.values()),
                "tasks": tasks, "limit": b.get("limit")}

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    data = recipe["data"]
    evals = [{"step": m["step"], "tokens": m["tokens"], "perplexity": m["heldout_perplexity"],
              "sparsity": m["heldout_sparsity"]}
             for m in read_metrics(run) if "heldout_perplexity" in m]
    return {"run": str(run), "sources": data["sources"], "weights": data.get("weights"),
            "distill": recipe["distill"], "tokens": r["tokens_trained"],
            "wall_seconds": r["wall_seconds"],
            "original_perplexity": r["original"]["perplexity"],
            "perplexity": r["final"]["perplexity"], "sparsity": r["final"]["average_sparsity"],
            "lm_eval_original": lm("original"), "lm_eval": lm("final"),
            "lm_eval_rescored_fp32": rescored.is_file(), "evals": evals}


def tables(rows: dict[str, dict]) -> str:
    from prosparse.core.tables import format_table

    first = next(iter(rows.values()))
    orig = first["lm_eval_original"]
    tasks = list(orig["tasks"]) if orig else []
    head = ["variant", "data", "objective", "tokens", "wiki ppl", "x original", "sparsity",
            "lm-eval avg", "task mean"] + tasks
    body = []
    if orig:
        body.append(["original", "", "", "", f"{first['original_perplexity']:.2f}", "1.000", "",
                     f"{100 * orig['average']:.2f}", f"{100 * orig['task_mean']:.2f}"]
                    + [f"{100 * orig['tasks'][t]:.1f}" for t in tasks])
    for name, r in rows.items():
        w = r["weights"] or [1.0] * len(r["sources"])
        data = " ".join(f"{s} {x:g}" for s, x in zip(r["sources"], w))
        obj = "kd" if not r["distill"].get("lm_weight", 1.0) else "kd+lm"
        e = r["lm_eval"]
        scores = ([f"{100 * e['average']:.2f}", f"{100 * e['task_mean']:.2f}"]
                  + [f"{100 * e['tasks'][t]:.1f}" for t in tasks]) if e else [""] * (2 + len(tasks))
        body.append([name, data, obj, r["tokens"], f"{r['perplexity']:.2f}",
                     f"{r['perplexity'] / r['original_perplexity']:.3f}",
                     f"{100 * r['sparsity']:.2f}%", *scores])
    return format_table(head, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/smollm2-full.yaml")
    p.add_argument("--steps", type=int, default=600, help="steps per variant")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--runs", default="runs/data_study", help="where the runs go")
    p.add_argument("--report", nargs="*", metavar="RUN_DIR", default=None,
                   help="build the table from these finished runs instead of training (each row "
                        "is named by its run's folder)")
    p.add_argument("--out", default="benchmarks/results/data_study")
    p.add_argument("--prosparse", default=str(Path(sys.executable).parent / "prosparse"))
    args = p.parse_args()

    from prosparse.core.io import atomic_write, write_json

    if args.report is not None:
        runs = {Path(d).name: Path(d) for d in args.report}
    else:
        unknown = [n for n in args.variants if n not in VARIANTS]
        if unknown:  # before any variant trains, not after the first ones have
            p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        runs = {}
        for name in args.variants:
            out = Path(args.runs) / name
            cmd = [args.prosparse, "train", args.recipe, *base_overrides(args.steps),
                   *VARIANTS[name], "--out", str(out), "--overwrite"]
            start = time.time()
            subprocess.run(cmd, check=True)
            print(f"{name}: {time.time() - start:.0f} s", flush=True)
            runs[name] = out
    rows = {name: summarize(run) for name, run in runs.items()}
    table = tables(rows)
    print(table)
    cmd = (f"{args.recipe} + {' '.join(base_overrides(args.steps))} "
           "(+ each variant's overrides)")
    write_json(args.out + ".json", {"recipe": cmd, "variants": VARIANTS, "results": rows})
    atomic_write(args.out + ".md", lambda tmp: tmp.write_text(
        f"# Data study (and one learning-rate point)\n\nrecipe {cmd}\n\n{table}\n"))


if __name__ == "__main__":
    main()
