"""``prosparse demo`` (``make demo``): the main job on the embedded default model and corpus.

Runs ``configs/demo.yaml``: the embedded SmolLM2-135M is measured as shipped (SiLU) and after a
bare ReLU swap, trained with progressive L1 (Algorithm 1) and distillation from the original on
the bundled ``wiki`` corpus, threshold-shifted, and measured again; the before/after table is
printed and the run folder (report.json, table.md, plots, final/) written to ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path

from prosparse.cli import args as a
from prosparse.core.errors import UsageError

DEMO_RECIPE = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"


def run_demo(out: str = "runs/demo", recipe: str | Path | None = None,
             overrides: list[str] = (), resume: bool = False, overwrite: bool = False) -> dict:
    """Train the demo recipe into ``out`` (``resume`` it, or ``overwrite`` a finished one);
    returns the report (report.json)."""
    from prosparse.training.loop import train
    from prosparse.training.recipe import load_recipe

    path = Path(recipe) if recipe else DEMO_RECIPE
    if not path.is_file():
        raise UsageError(f"demo recipe {str(path)!r} not found; pass --recipe "
                         "configs/demo.yaml from a checkout of prosparse")
    start = time.time()
    result = train(load_recipe(path, list(overrides)), out, resume=resume, overwrite=overwrite)
    report = result.report
    print(report["table"])
    if "benchmark_table" in report:
        print(f"\nlm-eval, first {report['benchmarks']['final'].get('limit')} documents per task:")
        print(report["benchmark_table"])
    t = report["threshold"]
    t = f"per layer {min(t):g}..{max(t):g}" if isinstance(t, list) else f"{t:g}"
    print(f"threshold t = {t}, trained on {report['tokens_trained']} tokens, "
          f"wall {time.time() - start:.0f} s")
    tb = report.get("time_budget")
    if tb and tb["steps"] < tb["planned_steps"]:
        print(f"time budget {tb['minutes']:g} min: trained {tb['steps']} of the recipe's "
              f"{tb['planned_steps']} steps ({tb['step_seconds']:.2f} s a step here; the full "
              f"recipe would take about {tb['estimated_minutes']:.0f} min: "
              "--time-budget 0 runs it)")
    print(f"run folder: {out} (report.json, table.md, training.png, layer_sparsity.png, final/)")
    return report


def _demo(args) -> int:
    run_demo(out=args.out, recipe=args.recipe, overrides=a.budget_overrides(args),
             resume=args.resume, overwrite=args.overwrite)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="ReLUfy the embedded default model (configs/demo.yaml) and "
                                    "print the before/after table")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. stages.2.lambda=4")
    a.add_out(p, "the run folder", required=False, default="runs/demo")
    p.add_argument("--recipe", default=None, help="recipe (default configs/demo.yaml)")
    a.add_time_budget(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted demo from its latest checkpoint")
    p.set_defaults(func=_demo)
