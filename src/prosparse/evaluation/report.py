"""Tables for people: one model's scores, and several models side by side (paper Table 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from prosparse.core.errors import UsageError
from prosparse.core.tables import format_table, pct
from prosparse.evaluation.tasks import GROUPS, OTHER_GROUP


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else pct(x)


def results_table(result: dict) -> str:
    """Per task (group, metric, shots, n, %), then each group and the average."""
    rows = [[name, t["group"], t["metric"], t.get("num_fewshot", "-"), t["n"], _pct(t["value"])]
            for name, t in result["tasks"].items()]
    rows += [[f"**{g}**", "", "", "", "", _pct(v)] for g, v in result["groups"].items()]
    rows.append(["**Average**", "", "", "", "", _pct(result["average"])])
    return format_table(["task", "group", "metric", "shots", "n", "score %"], rows)


def sparsity_value(value) -> float | None:
    """A sparsity fraction from a number, a ``prosparse sparsity --json`` file, or its dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "average_sparsity" not in value:
            raise UsageError("the sparsity JSON has no average_sparsity; give a `prosparse "
                             "sparsity --json` file")
        return sparsity_value(value["average_sparsity"])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 1:  # also refuses nan
            raise UsageError(f"sparsity {value!r} must be a fraction in [0, 1]"
                             + (f" (percent? use {value / 100:g})" if 1 < value <= 100 else ""))
        return float(value)
    path = Path(value)
    if path.is_file():
        try:
            return sparsity_value(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError) as e:
            if isinstance(e, UsageError):
                raise UsageError(f"{path}: {e}") from None
            raise UsageError(f"sparsity file {path} is not JSON ({e})") from None
    try:
        number = float(value)
    except ValueError:
        raise UsageError(
            f"sparsity {value!r} is neither a number nor a `prosparse sparsity --json` file"
        ) from None
    return sparsity_value(number)


def compare(results: dict[str, dict], sparsity: dict[str, object] | None = None) -> dict:
    """Side-by-side JSON: ``{"columns", "rows": [{"setting", "groups", "average",
    "average_sparsity", "tasks"}]}``; the sparsity of a row comes from ``sparsity[label]``
    (a fraction or a ``prosparse sparsity`` JSON) or else the result's own ``average_sparsity``.
    """
    sparsity = sparsity or {}
    present = {g for r in results.values() for g in r["groups"]}
    columns = [g for g in [*GROUPS, OTHER_GROUP] if g in present]
    rows = []
    for label, r in results.items():
        s = sparsity_value(sparsity.get(label, r.get("average_sparsity")))
        rows.append({"setting": label, "groups": {g: r["groups"].get(g) for g in columns},
                     "average": r["average"], "average_sparsity": s,
                     "tasks": {n: t["value"] for n, t in r["tasks"].items()}})
    return {"columns": columns, "rows": rows}


def compare_table(table: dict, tasks: bool = False) -> str:
    """Markdown in the layout of paper Table 1: groups, average performance, average sparsity.
    ``tasks=True`` gives the per-benchmark layout of Table 3 instead (sparsity kept last)."""
    if tasks:
        names = list(dict.fromkeys(n for r in table["rows"] for n in r["tasks"]))
        headers = ["Setting", *names, "Average Sparsity"]
        rows = [[r["setting"], *(_pct(r["tasks"].get(n)) for n in names),
                 _pct(r["average_sparsity"])] for r in table["rows"]]
        return format_table(headers, rows)
    headers = ["Setting", *table["columns"], "Average Performance", "Average Sparsity"]
    rows = [[r["setting"], *(_pct(r["groups"][g]) for g in table["columns"]), _pct(r["average"]),
             _pct(r["average_sparsity"])] for r in table["rows"]]
    return format_table(headers, rows)
