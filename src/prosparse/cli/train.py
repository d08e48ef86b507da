"""``prosparse train RECIPE [overrides]`` and ``prosparse schedule RECIPE`` (check lambda before
spending GPU days)."""

from __future__ import annotations

import json
from pathlib import Path

from prosparse.cli import args as a
from prosparse.core import checks
from prosparse.core.errors import UsageError


def _schedule(args) -> int:
    from prosparse.core.io import write_json
    from prosparse.core.tables import format_table
    from prosparse.sparsity.schedule import schedule_curve
    from prosparse.training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    curve = schedule_curve(recipe.stages, every=args.every)
    rows, prev = [], 0
    for i, s in enumerate(recipe.stages):
        kind = "fixed" if s.fixed else "zero" if s.lam == 0 else "flat" if (
            i == 0 or recipe.stages[i - 1].lam in (0, s.lam) or recipe.stages[i - 1].fixed
        ) else "sine"
        rows.append([s.name or str(i), f"{prev + 1}-{s.steps}", f"{s.lam:g}", kind])
        prev = s.steps
    print(format_table(["stage", "steps", "lambda (end)", "shape"], rows))
    print(f"normalisation: {recipe.penalty.normalization}"
          + (f" (scale {recipe.penalty.scale:g})" if recipe.penalty.normalization == "sum_scaled"
             else ""))
    if args.json:
        write_json(args.json, curve)
        print(f"wrote {args.json} ({len(curve['steps'])} points)")
    if args.plot:
        from prosparse.core.plots import plot_curves

        plot_curves(curve["steps"], {"lambda": curve["lambda"]}, args.plot,
                    title=f"L1 factor schedule: {Path(args.recipe).name}")
        print(f"wrote {args.plot}")
    return 0


def _train(args) -> int:
    from prosparse.training.loop import train
    from prosparse.training.recipe import load_recipe

    recipe = load_recipe(args.recipe, a.budget_overrides(args))
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    result = train(recipe, out, resume=args.resume, overwrite=args.overwrite)
    if result.report:
        print(result.report["table"])
        print(json.dumps({k: result.report[k] for k in ("threshold", "tokens_trained",
                                                        "wall_seconds", "time_budget")
                          if k in result.report}))
    print(f"run folder: {result.run}")
    return 0


def run_point(run: str | Path) -> tuple[float, float]:
    """``(lambda_S, sparsity %)`` of one trained model, for the fit of paper Fig. 3.

    ``run`` is the folder a finished ``prosparse train`` wrote: the last stage's lambda from
    its ``recipe.yaml``, the held-out sparsity of the trained model before any threshold shift
    from its ``report.json`` (``trained.average_sparsity``). Or it is a JSON file read by
    :func:`point_file`, for trained points kept without their run folders.
    """
    from prosparse.training.recipe import load_recipe

    run = Path(run)
    if run.is_file():
        return point_file(run)
    report, recipe = run / "report.json", run / "recipe.yaml"
    if not report.is_file() or not recipe.is_file():
        raise UsageError(f"--run {run}: no report.json and recipe.yaml there; give the folder of "
                         "a finished `prosparse train` run (or a point JSON file)")
    try:
        trained = json.loads(report.read_text()).get("trained")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UsageError(f"--run {run}: report.json is not a `prosparse train` report") from None
    if not trained:
        raise UsageError(f"--run {run}: report.json has no 'trained' measurement")
    return load_recipe(recipe).stages[-1].lam, 100 * trained["average_sparsity"]


def point_file(path: str | Path) -> tuple[float, float]:
    """``(lambda_S, sparsity %)`` from a JSON object holding ``"recipe"`` (the recipe, as YAML
    text or a mapping: its last stage's lambda is lambda_S) and the trained model's sparsity
    before any threshold shift, as a run's report has it, ``"trained": {"average_sparsity":
    F}``, or as the ``t = 0`` entry of a threshold sweep, ``"points": [{"t": 0, "sparsity":
    F}, ...]`` (fractions)."""
    import yaml

    from prosparse.training.recipe import recipe_from_dict

    path = Path(path)
    try:
        row = json.loads(path.read_text())
        recipe = row["recipe"]
        lam = recipe_from_dict(yaml.safe_load(recipe) if isinstance(recipe, str) else recipe
                               ).stages[-1].lam
        if row.get("trained"):
            sparsity = row["trained"]["average_sparsity"]
        else:
            sparsity = next(p for p in row["points"] if not p.get("t"))["sparsity"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, StopIteration,
            UnicodeDecodeError, yaml.YAMLError):
        raise UsageError(f"--run {path}: not a trained point (a JSON object with 'recipe' and "
                         "'trained': {'average_sparsity': F} or a t = 0 entry in 'points'); "
                         "give a run folder or such a file") from None
    return lam, 100 * sparsity


def _point(item: str) -> tuple[float, float]:
    try:
        lam, sp = (float(v) for v in item.split(":"))
    except ValueError:
        raise UsageError(f"--point {item!r} must look like LAMBDA:SPARSITY_PERCENT "
                         "(e.g. 0.05:85.9)") from None
    return lam, sp


def _fit_lambda(args) -> int:
    from prosparse.sparsity.fit import PAPER_7B, fit_points

    fit = PAPER_7B
    pairs = [_point(p) for p in args.point] + [run_point(r) for r in args.run]
    if pairs:
        fit = fit_points([p[0] for p in pairs], [p[1] for p in pairs])
        for lam, sp in pairs:
            print(f"  lambda_S {lam:g}: sparsity {sp:.2f}%")
    source = "your points" if pairs else "the paper's ProSparse-7B fit"
    print(f"sparsity(%) = 100 - exp(-{fit.a:.4g} * lambda^{fit.alpha:.3g} + {fit.b:.4g})  "
          f"({source})")
    for target in args.target:
        print(f"target {target:g}% -> lambda_S = {fit.lam(target):.4g}")
    for lam in args.predict:
        print(f"lambda_S {lam:g} -> predicted sparsity {fit.sparsity(lam):.2f}%")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="ProSparse training from a recipe (configs/*.yaml)")
    p.add_argument("recipe", help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.4.lambda=0.1")
    a.add_out(p, "the run folder (default runs/<recipe name>)", required=False)
    a.add_time_budget(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run folder (refused when "
                        "the model or recipe changed, beyond logging and checkpoint cadence)")
    p.set_defaults(func=_train)

    p = sub.add_parser("schedule", help="print / save / plot a recipe's lambda curve")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.4.lambda=0.1")
    a.add_json(p, '{"steps": [...], "lambda": [...]}')
    a.add_plot(p, "the lambda curve")
    p.add_argument("--every", type=checks.positive_int, default=1,
                   help="keep every k-th step (last kept)")
    p.set_defaults(func=_schedule)

    p = sub.add_parser("fit-lambda", help="lambda_S for a target sparsity (paper fit or yours)")
    p.add_argument("--target", type=float, nargs="*", default=[], help="target sparsity in %%")
    p.add_argument("--predict", type=float, nargs="*", default=[], help="lambda_S to predict")
    p.add_argument("--point", action="append", default=[],
                   help="a measured LAMBDA:SPARSITY_PERCENT of your model (repeat; >= 2)")
    p.add_argument("--run", action="append", default=[], metavar="RUN",
                   help="a finished `prosparse train` run folder (its recipe.yaml and "
                        "report.json), or a JSON file with 'recipe' and the trained point: its "
                        "last-stage lambda and trained sparsity are one point (repeat; mixes "
                        "with --point)")
    p.set_defaults(func=_fit_lambda)
