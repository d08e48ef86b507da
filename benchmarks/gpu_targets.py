"""The GPU targets, read off a ``gpu_check.json``: each measured figure beside its target and
the gap (measured / target - 1 for "at least" targets, target - measured for "at most").

    python benchmarks/gpu_targets.py benchmarks/results/gpu/h200_check.json [--write]

``--write`` adds the list under ``"targets"`` in the file (gpu_check.sh does this at the end of
every run). Targets (LLaMA2-7B shapes, bf16, sparsity 0.8932, medians of the same run): step
(2) >= 2.5x and step (3) >= 2.0x cuBLAS, each at >= 70% of the device's copy bandwidth on the
rows it reads; 7B-shaped decode exact sparse >= 1.5x dense, predicted >= 1.8x; the L1 penalty
costs <= 5% of a training step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def targets(report: dict) -> list[dict]:
    out = []

    def at_least(name, measured, target):
        out.append({"target": name, "measured": measured, "goal": f">= {target}",
                    "met": measured is not None and measured >= target,
                    "gap": None if measured is None else measured / target - 1})

    def at_most(name, measured, target):
        out.append({"target": name, "measured": measured, "goal": f"<= {target}",
                    "met": measured is not None and measured <= target,
                    "gap": None if measured is None else target - measured})

    ops = report.get("ops_7b_bf16", {})
    for step, goal in ((2, 2.5), (3, 2.0)):
        row = next((r for r in ops.get("results", []) if r["step"] == step
                    and abs(r["sparsity"] - 0.8932) < 1e-9 and r["batch"] == 1), None)
        at_least(f"step ({step}) speedup over cuBLAS, 7B bf16, s=0.8932",
                 row and row["speedup"], goal)
        at_least(f"step ({step}) share of copy bandwidth on rows read",
                 row and row.get("peak_share"), 0.70)
    paths = report.get("decode", {}).get("paths", {})
    at_least("7B decode, exact sparse vs dense", paths.get("exact", {}).get("speedup"), 1.5)
    for name, path in paths.items():
        if name.startswith("predicted"):
            at_least(f"7B decode, {name} vs dense", path["speedup"], 1.8)
    for v in report.get("train", {}).get("variants", {}).values():
        if v["variant"] == "L1 on":
            at_most(f"L1 penalty's share of a training step ({v['model']})",
                    v["cost_vs_l1_off"], 0.05)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.report)
    report = json.loads(path.read_text())
    rows = targets(report)
    for r in rows:
        m = "-" if r["measured"] is None else f"{r['measured']:.3g}"
        gap = "" if r["gap"] is None else f" (gap {r['gap']:+.3g})"
        print(f"{'met ' if r['met'] else 'MISS'} {r['target']}: {m} {r['goal']}{gap}")
    if args.write:
        report["targets"] = rows
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
