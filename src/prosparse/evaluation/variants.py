"""Benchmark a model as it is, or several activation variants of it side by side (paper
Table 1), with held-out sparsity beside the lm-eval scores."""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

from torch import nn

from prosparse.core import checks
from prosparse.core.errors import UnknownNameError, UsageError
from prosparse.evaluation.harness import evaluate
from prosparse.evaluation.report import compare, sparsity_value

log = logging.getLogger(__name__)


def parse_variant(text: str) -> tuple[str, str | None, float, float]:
    """``original`` | ``relu`` | ``fatrelu:T`` | ``shifted_relu:B`` -> (label, act, t, shift)."""
    name, _, value = text.strip().partition(":")
    if name == "original" and not value:
        return "original", None, 0.0, 0.0
    if name == "relu" and not value:
        return "relu", "relu", 0.0, 0.0
    if name in ("fatrelu", "shifted_relu") and value:
        try:
            x = checks.act_scalar(value)
            if name == "fatrelu":
                x = checks.threshold(value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"variant {text!r}: {e}") from None
        if name == "fatrelu":
            return f"fatrelu t={x:g}", "fatrelu", x, 0.0
        return f"shifted_relu b={x:g}", "shifted_relu", 0.0, x
    raise UnknownNameError(f"unknown variant {text!r}; use original, relu, fatrelu:T or shifted_relu:B "
                     f"(e.g. original,relu,fatrelu:0.01)")


def evaluate_with_sparsity(model: nn.Module, tokenizer, tasks, *, model_name: str,
                           sparsity_data: list[str] | None = None, sparsity_tokens: int = 8192,
                           **kwargs) -> dict:
    """:func:`~prosparse.evaluation.harness.evaluate` (``kwargs`` go to it), plus held-out
    sparsity on ``sparsity_data`` when given (``average_sparsity`` and ``sparsity``)."""
    result = evaluate(model, tokenizer, tasks, model_name=model_name, **kwargs)
    if sparsity_data:
        from prosparse.measure.sparsity import measure_sparsity

        sp = measure_sparsity(model, tokenizer, sparsity_data, tokens=sparsity_tokens,
                              model_name=model_name)
        result["average_sparsity"] = sp["average_sparsity"]
        result["sparsity"] = sp
    return result


def evaluate_variants(model: nn.Module, tokenizer, variants: list[str], tasks, *,
                      model_name: str, **kwargs) -> dict:
    """Each of ``variants`` (``original``, ``relu``, ``fatrelu:T``, ``shifted_relu:B``) of
    ``model`` through :func:`evaluate_with_sparsity`; returns :func:`compare`'s table plus
    ``results`` (label -> result). ``model`` itself is used, unchanged, for ``original``."""
    from prosparse.models.relufy import relufy_

    parsed = [parse_variant(v) for v in variants]
    results = {}
    for label, act, t, shift in parsed:
        m = copy.deepcopy(model) if act is not None else model
        if act is not None:
            relufy_(m, act, t if act == "fatrelu" else shift)
        log.info("eval: %s", label)
        results[label] = evaluate_with_sparsity(m, tokenizer, tasks,
                                                model_name=f"{model_name} {label}", **kwargs)
        del m
    return {**compare(results), "results": results}


def _labelled(text: str) -> tuple[str | None, str]:
    label, sep, value = text.partition("=")
    return (label, value) if sep else (None, text)


def compare_files(result_files: list[str], sparsity: list[str] | None = None) -> dict:
    """``prosparse eval-table``: :func:`compare` over saved ``prosparse eval --json`` files
    (``LABEL=PATH`` or ``PATH``), with ``LABEL=SPARSITY`` entries for the sparsity column."""
    results = {}
    for item in result_files:
        label, path = _labelled(item)
        if not Path(path).is_file():
            raise UsageError(f"result file {path} not found (write one with "
                                    f"`prosparse eval MODEL --json {path}`)")
        try:
            r = json.loads(Path(path).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not JSON ({e}); give a `prosparse eval --json` "
                             "result") from None
        if not isinstance(r, dict) or "tasks" not in r or "groups" not in r:
            raise UsageError(f"{path} is not a `prosparse eval --json` result (no tasks/groups)")
        results[label or r.get("model") or Path(path).stem] = r
    sparsity_of = {}
    for item in sparsity or []:
        label, value = _labelled(item)
        if label not in results:
            raise UnknownNameError(f"--label-sparsity {item!r}: unknown setting {label!r}; settings: "
                           f"{', '.join(results)}")
        try:
            sparsity_of[label] = sparsity_value(value)
        except UsageError as e:
            raise UsageError(f"--label-sparsity {item!r}: {e}") from None
    return compare(results, sparsity_of)
