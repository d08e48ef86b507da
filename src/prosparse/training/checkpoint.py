"""Checkpoints: a Hugging Face-loadable model, plus what ``--resume`` needs to continue exactly.

``<run>/checkpoints/step-000120/``
  ``model/``        ``save_pretrained`` output + tokenizer (loads with ``prosparse.load_model``)
  ``state/``        ``accelerator.save_state``: optimizer, RNG states of every process
  ``trainer.json``  step, data position (micro-batches and tokens consumed), lambda, LR
Written under a temporary name and renamed once complete; the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"

log = logging.getLogger(__name__)


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "trainer.json").is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The optimiser step a checkpoint folder (``step-000004``) was written at."""
    return int(Path(path).name.split("-")[1])


def latest_checkpoint(run: str | Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def full_state_dict(accelerator, model) -> dict:
    """The whole model's state dict on every process (a collective: call it on all of them).

    Under FSDP2 on CPU, ``accelerator.get_state_dict`` hands back the sharded DTensors, which
    ``save_pretrained`` cannot write (safetensors reads each tensor's storage): gather them."""
    state_dict = accelerator.get_state_dict(model)
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state_dict.items()}


def save_checkpoint(accelerator, model, tokenizer, run: str | Path, step: int, trainer: dict,
                    keep: int) -> Path:
    """Save on every process (state is per rank), publish atomically on the main one."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        # The run folder is reserved for this process: any half checkpoint is a killed run's.
        for stale in final.parent.glob(".step-*.tmp"):
            log.info("removing %s, left by an interrupted checkpoint", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        state_dict = full_state_dict(accelerator, model)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp / "model", state_dict=state_dict,
                                  is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save, safe_serialization=True)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tmp / "model")
        accelerator.save_state(str(tmp / "state"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
    except BaseException as e:
        # A full disk (or an interruption) leaves no half checkpoint holding the space.
        shutil.rmtree(tmp, ignore_errors=True)
        from prosparse.core.io import _translate

        err = _translate(e, final, run)
        if err is e:
            raise
        last = latest_checkpoint(run)
        raise type(err)(f"{err}; the checkpoint of step {step} was not kept"
                        + (f"; --resume continues from {last}" if last else "")) from e
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore optimizer, model and RNG states into the prepared objects; return trainer.json."""
    path = Path(path)
    accelerator.load_state(str(path / "state"))
    return json.loads((path / "trainer.json").read_text())
