"""The one config loader: YAML files and ``a.b.c=VALUE`` overrides into typed dataclasses.

Every config (the training recipe, the pruning config, predictor training) is a dataclass with
one docstring line per field; a YAML file mirrors it, and any key can be overridden on the
command line as ``a.b.c=VALUE`` (list items by index: ``stages.4.lambda=0.1``). Values are
parsed as YAML (``1e-4`` is a float, ``true`` a bool, ``[wiki, qa]`` a list). Unknown keys and
wrong types are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from prosparse.core.errors import UnknownNameError, UsageError

# dataclass field -> YAML key: ``lambda`` (Algorithm 1's factor, ProxSparse's regulariser) is
# reserved in Python, so the fields are named ``lam``.
_YAML_NAMES = {"lam": "lambda"}


def _yaml_key(name: str) -> str:
    return _YAML_NAMES.get(name, name)


def to_dict(obj) -> dict:
    """A config as plain YAML-ready data (fields named ``lam`` written as ``lambda``)."""
    if dataclasses.is_dataclass(obj):
        return {_yaml_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def build(cls, data, where: str = "", what: str = "recipe"):
    """A ``cls`` dataclass from YAML data: every key known (an unknown one lists the valid
    ones), every value of its field's type (nested dataclasses and lists too)."""
    if not isinstance(data, dict):
        raise UsageError(f"{where or what} must be a mapping of keys to values, got "
                         f"{type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f.name): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UnknownNameError(f"unknown {what} key {(where + '.' if where else '') + key!r}; "
                                   f"choose one of {', '.join(fields)}")
        name = fields[key]
        kwargs[name] = _coerce(hints[name], value, f"{where}.{key}" if where else key, what)
    missing = [_yaml_key(f.name) for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"{where or what} has no {', '.join(missing)}; every entry needs it "
                         f"(e.g. {where or what}: {{{missing[0]}: 100, ...}})")
    return cls(**kwargs)


def _coerce(tp, value, where: str, what: str = "recipe"):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where, what)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, what)
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}.{i}", what) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UsageError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp in (int, float, str, bool) and isinstance(value, dict):  # e.g. optim.lr.foo=1
        raise UsageError(f"{where} is a single value ({tp.__name__}), it has no keys "
                         f"{', '.join(map(str, value))}; set {where}=VALUE instead")
    # bool is an int in Python; `batch_size: true` is a mistake, not 1
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (
            tp is not bool and isinstance(value, bool))):
        what = {"int": "an integer", "float": "a number", "str": "a string",
                "bool": "true or false"}[tp.__name__]
        raise UsageError(f"{where} must be {what}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=VALUE`` overrides to raw config data (list items by index)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} must look like KEY=VALUE (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise UsageError(f"override {item!r}: the value is not YAML "
                             f"({getattr(e, 'problem', None) or e}); quote it or fix it") from None
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise UnknownNameError(f"override {key!r}: {here} is not an index of a "
                                   f"{len(node)}-item list")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                parent = ".".join(parts[:depth])
                raise UsageError(f"override {item!r}: {parent} is a single value ({node!r}), "
                                 f"it has no key {part!r}; set {parent}=VALUE instead")
    return data


def read_yaml(path: str | Path, what: str = "recipe", examples: str = "configs/") -> dict:
    """A YAML file's mapping; a missing file, non-UTF-8 text, invalid YAML or a non-mapping is
    a one-line :class:`UsageError` naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no {what} at {str(path)!r}; see {examples} for examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text; give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{what} {path} is not valid YAML{where}: {problem}; fix that line "
                         f"({examples} has examples)") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} must be a mapping of settings (KEY: VALUE lines), got "
                         f"{type(data).__name__}")
    return data


def load_config(cls, path: str | Path | None, overrides: list[str] = (), what: str = "recipe"):
    """Read a YAML config (the dataclass defaults when ``path`` is None), apply ``a.b=VALUE``
    overrides, build ``cls`` and run its ``validate()`` when it has one."""
    data = read_yaml(path, what) if path is not None else {}
    obj = build(cls, apply_overrides(data, list(overrides)), what=what)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj
