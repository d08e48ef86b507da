"""Save a (ReLUfied) model with its tokenizer as a safetensors Hugging Face checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from prosparse.io import atomic_dir
from prosparse.kernels.activations import ACTS
from prosparse.models.relufy import current_activation, set_activation_config


def save_model(model, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out`` atomically (temporary folder, then rename).

    The config names the activation the model actually runs (``relu``, or ``fatrelu`` with
    ``hidden_act_param``), so the checkpoint loads back in ``prosparse`` and in transformers.
    """
    act, param = current_activation(model)
    if act in ACTS:
        set_activation_config(model.config, act, param)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
