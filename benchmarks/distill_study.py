"""Does distillation from the original model reach a given held-out loss at a given sparsity in
fewer tokens? Same recipe (configs/demo.yaml shortened), three objectives:

    lm      loss = lm + lambda * penalty                    (the paper)
    kd      loss = kl(teacher || student) + lambda * penalty
    kd+lm   loss = lm + kl + lambda * penalty

    .venv/bin/python benchmarks/distill_study.py [--steps 40] [--recipe benchmarks/frontier_base.yaml]

Prints held-out perplexity and sparsity along training for each, and the tokens each needed to
first reach a perplexity; writes benchmarks/results/distill_study.{json,md}. Results:
docs/results/demo.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "lm": ["distill.weight=0", "distill.lm_weight=1"],
    "kd": ["distill.weight=1", "distill.lm_weight=0"],
    "kd+lm": ["distill.weight=1", "distill.lm_weight=1"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=40, help="steps per variant")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/distill_study")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for every variant")
    args = p.parse_args()

    from accelerate.state import AcceleratorState, GradientState

    from prosparse.core.tables import format_table
    from prosparse.training import read_metrics, train
    from prosparse.training.recipe import load_recipe

    s = args.steps
    # A compressed demo schedule: stage 0 (lambda 0), flat warm-up, sine ramp, flat.
    base = [f"stages=[{{lambda: 0, steps: {s // 4}}}, {{lambda: 0.5, steps: {s // 2}}}, "
            f"{{lambda: 2.0, steps: {s * 7 // 8}}}, {{lambda: 2.0, steps: {s}}}]",
            f"log.eval_every={args.eval_every}", "log.measure_before=false",
            "threshold.value=0", "checkpoint.every=0", "log.tensorboard=false",
            "data.heldout_tokens=2048", "log.eval_tokens=2048"]
    results = {}
    for name in args.variants:
        recipe = load_recipe(args.recipe, base + VARIANTS[name] + args.overrides)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        start = time.time()
        res = train(recipe, f"runs/distill_study/{name}", progress=False)
        metrics = read_metrics(res.run)
        evals = [{"step": m["step"], "tokens": m["tokens"], "perplexity": m["heldout_perplexity"],
                  "sparsity": m["heldout_sparsity"]} for m in metrics if "heldout_perplexity" in m]
        results[name] = {"overrides": VARIANTS[name], "evals": evals,
                         "final": {k: res.report["trained"][k]
                                   for k in ("perplexity", "average_sparsity")},
                         "wall_seconds": time.time() - start}
        print(name, json.dumps(results[name]["final"]), f"{results[name]['wall_seconds']:.0f} s",
              flush=True)
    steps = sorted({e["step"] for r in results.values() for e in r["evals"]})
    rows = []
    for st in steps:
        row = [st, next(e["tokens"] for r in results.values() for e in r["evals"]
                        if e["step"] == st)]
        for r in results.values():
            e = next((e for e in r["evals"] if e["step"] == st), None)
            row.append(f"{e['perplexity']:.1f} / {100 * e['sparsity']:.1f}%" if e else "")
        rows.append(row)
    table = format_table(["step", "tokens"] + [f"{n}: ppl / sparsity" for n in results], rows)
    targets = [60, 40, 30]
    reach = []
    for n, r in results.items():
        row = [n]
        for t in targets:
            hit = next((e["tokens"] for e in r["evals"] if e["perplexity"] <= t), None)
            row.append(str(hit) if hit is not None else "not reached")
        row.append(f"{r['wall_seconds']:.0f}")
        reach.append(row)
    table2 = format_table(["objective"] + [f"tokens to ppl <= {t}" for t in targets]
                          + ["wall s"], reach)
    print(table)
    print(table2)
    recipe_note = f"recipe {args.recipe} + {' '.join(base + args.overrides)}"
    Path(args.out + ".json").write_text(json.dumps({"recipe": recipe_note, "results": results},
                                                   indent=2) + "\n")
    Path(args.out + ".md").write_text(
        f"# Distillation study\n\n{recipe_note}\n\nHeld-out wiki perplexity / average sparsity "
        f"(before threshold shift) along training:\n\n{table}\n\n{table2}\n")


if __name__ == "__main__":
    main()
