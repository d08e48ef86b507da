"""Save a (ReLUfied) model with its tokenizer as a safetensors Hugging Face checkpoint, and
``prosparse convert``: load, swap the activation, save."""

from __future__ import annotations

import os
from pathlib import Path

from prosparse.core.io import atomic_dir
from prosparse.kernels.activations import ACTS
from prosparse.models.relufy import current_activation, relufy_, set_activation_config


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


def convert(model: str, act: str, param: float, out: str | os.PathLike, dtype: str = "float32",
            overwrite: bool = False) -> tuple[Path, str, float]:
    """``prosparse convert``: load ``model``, swap every gated FFN's activation to ``act`` with
    its ``param``, save to ``out``. Returns the folder and the activation the checkpoint names."""
    from prosparse.models.loading import load_model

    m, tok = load_model(model, dtype=dtype, device="cpu")
    relufy_(m, act, param)
    path = save_model(m, tok, out, overwrite=overwrite)
    return (path, *current_activation(m))
