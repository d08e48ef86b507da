"""Benchmarks through lm-eval on the offline data (paper Tables 1 and 3).

``evaluate(model, tokenizer, tasks, limit)`` scores a model object with lm-eval's standard
prompts and metrics; ``compare`` and ``compare_table`` put several settings side by side with
their average sparsity (paper Table 1). lm-eval is imported only when a run starts.
"""

from prosparse.evaluation.harness import evaluate, group_scores
from prosparse.evaluation.report import compare, compare_table, results_table
from prosparse.evaluation.tasks import DEFAULT_TASKS, GROUPS, TASKS, available_tasks

# A small evaluation that fits the demo's time budget (about 1 min for the 135M model on 2 CPU
# cores): `evaluate(model, tok, DEMO_TASKS, limit=50)`.
DEMO_TASKS = ("piqa", "hellaswag", "boolq")

__all__ = [
    "DEFAULT_TASKS",
    "DEMO_TASKS",
    "GROUPS",
    "TASKS",
    "available_tasks",
    "compare",
    "compare_table",
    "evaluate",
    "group_scores",
    "results_table",
]
