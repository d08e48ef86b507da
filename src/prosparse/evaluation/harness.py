"""The lm-eval bridge: run ``lm_eval.simple_evaluate`` on a model object we already hold.

The model is wrapped in lm-eval's ``HFLM`` (model instance + tokenizer), so ReLUfied or
thresholded models, FATReLU checkpoints and the embedded GGUF default are scored exactly as
loaded. Local tasks (``tasks.TASKS``) read the offline data; any other name is handed to lm-eval
as a standard task (needs the Hub unless its data is cached).

Which metric is reported. The paper (Appendix K) ranks candidates by perplexity. lm-eval gives
two rankings of the same log-likelihoods: ``acc`` (highest total log-likelihood of the answer)
and ``acc_norm`` (highest log-likelihood per byte of the answer). We report lm-eval's
conventional headline: ``acc_norm`` where the standard task defines it (PIQA, HellaSwag, ARC,
OpenBookQA; the length-normalised ranking, nearest to "lowest perplexity"), ``acc`` elsewhere
(SIQA, WinoGrande, COPA, BoolQ, LAMBADA, MMLU), GSM8K ``exact_match`` (strict). ``metric="acc"``
forces the unnormalised ranking everywhere; every metric lm-eval computed stays in the JSON.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

from prosparse.core.errors import UnknownNameError, UsageError
from prosparse.evaluation.tasks import (
    GROUPS,
    OTHER_GROUP,
    TASKS,
    available_tasks,
    group_of,
    task_configs,
)

log = logging.getLogger(__name__)

OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval logs a hint about ``--metadata`` for every task with a ``custom_dataset``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in OFFLINE_ENV)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UsageError("--tasks is empty; name at least one task, e.g. piqa,hellaswag")
    return list(dict.fromkeys(names))


def _standard_task_names() -> set[str]:
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks)


def resolve_tasks(names: Sequence[str], num_fewshot: int | None = None,
                  data_root=None) -> tuple[list, dict[str, list[str]]]:
    """lm-eval task specs for ``names`` and which lm-eval task names each of ours expands to.

    Unknown names raise :class:`UnknownNameError` (a ``KeyError``) listing the local tasks (with data present) and, online,
    whether lm-eval knows the name.
    """
    specs: list = []
    members: dict[str, list[str]] = {}
    online = [n for n in names if n not in TASKS]
    if online:
        local = ", ".join(available_tasks(data_root)) or "none (data package missing)"
        if _offline():
            raise UnknownNameError(
                f"unknown local task(s) {', '.join(online)}; offline ({'/'.join(OFFLINE_ENV)} "
                f"set) only local tasks run: {local}"
            )
        known = _standard_task_names()
        missing = [n for n in online if n not in known]
        if missing:
            raise UnknownNameError(
                f"unknown task(s) {', '.join(missing)}: neither local ({local}) nor a standard "
                f"lm-eval task (`lm-eval ls tasks` lists those)"
            )
    for name in names:
        if name in TASKS:
            cfgs = task_configs(name, num_fewshot=num_fewshot, root=data_root)
            specs.extend(cfgs)
            members[name] = [c["task"] for c in cfgs]
        else:
            specs.append(name)
            members[name] = [name]
    return specs, members


def _metric_key(entry: dict, preferred: str) -> str:
    """lm-eval result key (``acc_norm,none``) for ``preferred``, falling back sensibly."""
    keys = [k for k in entry if "," in k and "_stderr" not in k]
    for want in (preferred, "acc_norm", "acc", "exact_match"):
        for k in keys:
            if k == want or k.split(",")[0] == want:
                return k
    numeric = [k for k in keys if isinstance(entry[k], (int, float))]
    if not numeric:
        raise ValueError(f"lm-eval returned no metric for a task: {sorted(entry)}")
    return numeric[0]


def _metric_name(key: str) -> str:
    return key[: -len(",none")] if key.endswith(",none") else key


def summarize(raw: dict, members: dict[str, list[str]], metric: str | None = None) -> dict:
    """Our JSON from lm-eval's ``simple_evaluate`` output (fractions, stable keys)."""
    results, counts = raw["results"], raw.get("n-samples", {})
    tasks = {}
    for name, subtasks in members.items():
        preferred = metric or (TASKS[name].metric if name in TASKS else "acc_norm")
        total, weighted, key, metrics = 0, 0.0, None, {}
        for sub in subtasks:
            entry = results[sub]
            key = _metric_key(entry, preferred)
            n = int(counts.get(sub, {}).get("effective", 0))
            total += n
            weighted += float(entry[key]) * n
            if len(subtasks) == 1:
                metrics = {_metric_name(k): v for k, v in entry.items()
                           if "," in k and isinstance(v, (int, float))}
        # Several subtasks (MMLU subjects): lm-eval's group score, weighted by size.
        value = weighted / total if total else float("nan")
        tasks[name] = {"metric": _metric_name(key), "value": value, "n": total,
                       "group": group_of(name), "num_fewshot": _shots(raw, subtasks[0])}
        if metrics:
            tasks[name]["metrics"] = metrics
        if len(subtasks) > 1:
            tasks[name]["subtasks"] = {
                s: {"value": float(results[s][key]),
                    "n": int(counts.get(s, {}).get("effective", 0))} for s in subtasks}
    groups = group_scores(tasks)
    return {"tasks": tasks, "groups": groups,
            "average": sum(groups.values()) / len(groups) if groups else float("nan")}


def _shots(raw: dict, task: str) -> int | None:
    shots = raw.get("n-shot", {}).get(task)
    return int(shots) if shots is not None else None


def group_scores(tasks: dict) -> dict[str, float]:
    """Unweighted mean of each group's task scores, in the paper's group order (Table 1).

    The overall ``average`` is the unweighted mean of the groups present, as the paper's
    "Average Performance" averages its categories.
    """
    out = {}
    for group in [*GROUPS, OTHER_GROUP]:
        vals = [t["value"] for name, t in tasks.items() if group_of(name) == group]
        if vals:
            out[group] = sum(vals) / len(vals)
    return out


def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str] = ("piqa", "hellaswag", "arc_easy", "boolq", "winogrande"),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    metric: str | None = None,
    model_name: str | None = None,
    data_root=None,
    max_length: int | None = None,
) -> dict:
    """Score ``model`` on ``tasks`` through lm-eval; returns the JSON of ``prosparse eval``.

    ``{"model", "tasks": {NAME: {"metric", "value", "n", "group", "num_fewshot", "metrics"}},
    "groups": {GROUP: value}, "average": value, "limit", "lm_eval_version", "seconds"}``, values
    as fractions. ``limit`` takes the first N documents of each task's evaluation split (per
    subject for MMLU). A demo within a time budget: ``evaluate(m, tok, ["piqa", "boolq"],
    limit=50)``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit <= 0:
        raise UsageError(f"limit ({limit}) must be a positive number of documents")
    names = parse_tasks(tasks)
    specs, members = resolve_tasks(names, num_fewshot=num_fewshot, data_root=data_root)
    all_local = all(n in TASKS for n in names)
    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=max_length)
    # Local tasks are built here as configs; lm-eval's full index (a ~15 s scan of its YAML
    # tree) is only needed for standard task names.
    manager = TaskManager(include_defaults=False) if all_local else TaskManager()
    quiet = _DropCustomDatasetNotice()
    task_log = logging.getLogger("lm_eval.api.task")
    task_log.addFilter(quiet)
    try:
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, task_manager=manager,
            num_fewshot=num_fewshot if not all_local else None,
            bootstrap_iters=0, log_samples=False,
        )
    finally:
        task_log.removeFilter(quiet)
    out = summarize(raw, members, metric=metric)
    return {"model": model_name or getattr(getattr(model, "config", None), "_name_or_path", ""),
            **out, "limit": limit, "num_fewshot": num_fewshot, "metric": metric or "default",
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "seconds": round(time.perf_counter() - start, 1)}
