"""Sparsity at a fixed quality cost against training tokens, over the committed training runs of
the embedded SmolLM2-135M, and the token budget the trend gives for a target sparsity.

    .venv/bin/python benchmarks/token_trend.py                      # table + JSON
    .venv/bin/python benchmarks/token_trend.py --target 0.89 --ratio 1.15

For each run (a ``prosparse train`` report, or a frontier row's JSON) the trained model and every
point of its threshold sweep are (sparsity, held-out perplexity) pairs on the same 8,192 ``wiki``
tokens. A run's sparsity at ``ratio`` is the largest sparsity on the piecewise-linear curve
through those points (sorted by sparsity) whose perplexity stays within ``ratio`` times the
original's: the same quality cost for every run, whichever threshold its sweep kept. The trend is
a power law in the dense fraction, ``1 - s = a * tokens^-b`` (a straight line in log-log), fitted
by least squares over the runs that reach the ratio at all; it gives the tokens at which the
fitted line crosses the target. Results: docs/results/long-recipe.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from prosparse.core.io import write_json
from prosparse.core.tables import format_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOKENS_PER_STEP = 2 * 128  # every run below: batch 2 x 128 tokens, one process
# (label, JSON): the recipe family of configs/demo.yaml and configs/smollm2-full.yaml (ReLU swap,
# LM + KL distillation, Algorithm 1's L1 on the mean-normalised penalty), at growing budgets.
RUNS = (
    ("frontier row, FFN only + KD T 2, trained at t 0.3",
     "frontier/gentle-ffn-kd-t2-tat.json"),
    ("configs/demo.yaml", "demo/demo_report.json"),
    ("lambda_S 0.25, 1,000 steps", "smollm2_full/lambda0.25_1000_steps_report.json"),
    ("lambda_S 1.0, 2,400 steps", "smollm2_full/lambda1.0_2400_steps_report.json"),
    ("configs/smollm2-full.yaml, 3,000 steps", "smollm2_full/long_recipe_report.json"),
)
EXTRA = RESULTS / "smollm2_full" / "paper_sparsity_report.json"  # the 90-minute recipe


def load_points(path: Path) -> tuple[int, float, list[tuple[float, float]]]:
    """``(tokens, original perplexity, [(sparsity, perplexity), ...])`` of one run's JSON."""
    r = json.loads(path.read_text())
    if "points" in r:  # a frontier row: steps from its recipe, the original from its sibling
        original = json.loads((path.parent / "original.json").read_text())
        base = original["points"][0]["perplexity"]
        steps = yaml.safe_load(r["recipe"])["stages"][-1]["steps"]
        pts = [(p["sparsity"], p["perplexity"]) for p in r["points"]]
        return steps * TOKENS_PER_STEP, base, pts
    pts = [(r["trained"]["average_sparsity"], r["trained"]["perplexity"])]
    pts += [(p["average_sparsity"], p["perplexity"])
            for p in r.get("threshold_sweep", {}).get("thresholds", [])]
    if "final" in r:
        pts.append((r["final"]["average_sparsity"], r["final"]["perplexity"]))
    return int(r["tokens_trained"]), float(r["original"]["perplexity"]), pts


def sparsity_at(points: list[tuple[float, float]], limit: float) -> float | None:
    """The largest sparsity on the curve through ``points`` whose perplexity is <= ``limit``
    (linear between neighbours in sparsity); None where no point is within it."""
    pts = sorted(points)
    best = None
    for s, p in pts:
        if p <= limit:
            best = s if best is None else max(best, s)
    for (s0, p0), (s1, p1) in zip(pts, pts[1:]):
        if p0 <= limit < p1:  # the crossing inside a segment that leaves the limit
            best = max(best or 0.0, s0 + (s1 - s0) * (limit - p0) / (p1 - p0))
    return best


def fit_power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """``y = a * x^-b`` by least squares on ``log y`` against ``log x``: ``(a, b)``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = (sum((u - mx) * (v - my) for u, v in zip(lx, ly))
             / sum((u - mx) ** 2 for u in lx))
    return math.exp(my - slope * mx), -slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=1.15,
                    help="quality cost: perplexity within this many times the original's")
    ap.add_argument("--target", type=float, default=0.89, help="target average sparsity")
    ap.add_argument("--json", default=str(RESULTS / "token_trend.json"))
    args = ap.parse_args()
    runs = [(label, RESULTS / rel) for label, rel in RUNS]
    if EXTRA.exists():
        runs.append(("the 90-minute recipe", EXTRA))
    rows, fit_x, fit_y = [], [], []
    for label, path in runs:
        tokens, base, pts = load_points(path)
        s = sparsity_at(pts, args.ratio * base)
        s125 = sparsity_at(pts, 1.25 * base)
        rows.append({"run": label, "json": str(path.relative_to(ROOT)), "tokens": tokens,
                     "original_perplexity": base, "sparsity_at_ratio": s,
                     "sparsity_at_1.25": s125})
        if s is not None:
            fit_x.append(tokens)
            fit_y.append(1 - s)
    out = {"ratio": args.ratio, "target": args.target, "runs": rows}
    if len(fit_x) >= 2:
        a, b = fit_power_law(fit_x, fit_y)
        out["fit"] = {"a": a, "b": b, "runs": len(fit_x),
                      "tokens_for_target": ((1 - args.target) / a) ** (-1 / b)}
    table = format_table(
        ["run", "tokens", f"sparsity % at {args.ratio:g}x ppl", "sparsity % at 1.25x ppl"],
        [[r["run"], f"{r['tokens']:,}",
          "-" if r["sparsity_at_ratio"] is None else f"{100 * r['sparsity_at_ratio']:.2f}",
          "-" if r["sparsity_at_1.25"] is None else f"{100 * r['sparsity_at_1.25']:.2f}"]
         for r in rows])
    print(table)
    if "fit" in out:
        f = out["fit"]
        print(f"\ndense fraction = {f['a']:.3g} * tokens^-{f['b']:.3f} over {f['runs']} runs: "
              f"{100 * args.target:g}% at {args.ratio:g}x at about {f['tokens_for_target']:,.0f} "
              f"tokens ({f['tokens_for_target'] / TOKENS_PER_STEP:,.0f} steps of 2 x 128)")
    write_json(args.json, out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
