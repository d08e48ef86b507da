"""Weight sparsity (2:4) composed with activation sparsity (ProSparse) on the embedded model,
both orders, through the ``prosparse`` commands a user would run.

    .venv/bin/python benchmarks/pruning_compose.py                         # every row
    .venv/bin/python benchmarks/pruning_compose.py --only prosparse-then                  # a family
    .venv/bin/python benchmarks/pruning_compose.py --report                               # the table

Rows: the original; each half alone (ProSparse: ``prosparse train configs/demo.yaml``, the
demo's recipe; 2:4: ``prosparse prune smollm2-135m`` with each method's defaults); then
ProSparse -> 2:4 (that trained ReLU model pruned one-shot; its FATReLU threshold kept) and 2:4 ->
ProSparse (the pruned original trained with the same ``configs/demo.yaml``, its masks kept by
``weights.keep_mask``, on by default for a pruned model), so both orders spend the same
training. Every row is measured by one
``prosparse sparsity`` on the same 8,192 held-out ``wiki`` tokens: activation sparsity (x1
zeros), weight 2:4 compliance and perplexity; then perplexity on 8,192 tokens of each source in
``--heldout`` (default ``austen,pydoc`` from ``make extra-data``: domains the calibration and the
training never saw). A 2:4 -> ProSparse row starts from its method's own pruned model (the
one-method row's folder, pruned once). Each row's JSON (``benchmarks/results/compose/NAME.json``)
keeps its commands and figures; a row whose JSON exists is not rerun. Results:
docs/results/pruning.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prosparse.core.io import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import selected  # noqa: E402  (--only: exact names, then family prefixes)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compose"
RUNS = Path("runs") / "compose"  # relative to ROOT: commands run there
MODEL = "smollm2-135m"
METHODS = ("magnitude", "wanda", "sparsegpt", "proxsparse")
HELDOUT = "austen,pydoc"
PROSPARSE_RUN = str(RUNS / "prosparse")
PROSPARSE_MODEL = PROSPARSE_RUN + "/final"


@dataclass
class Row:
    name: str
    order: str
    """``-`` (one kind of sparsity), ``ProSparse -> 2:4`` or ``2:4 -> ProSparse``."""
    steps: list[list[str]] = field(default_factory=list)
    """``prosparse`` argument lists run in order (without the ``prosparse``)."""
    measure: str = MODEL
    """The model ``prosparse sparsity`` measures."""


def _prune(model: str, method: str, out: str) -> list[str]:
    return ["prune", model, "--method", method, "--pattern", "2:4", "--data", "wiki",
            "--out", out, "--overwrite", "--json", out + ".prune.json"]


def _train(model: str, out: str) -> list[str]:
    # the whole recipe on every machine (the demo's time budget would shorten it on slow ones)
    return ["train", "configs/demo.yaml", f"model={model}", "eval.tasks=[]", "time_budget=0",
            "--out", out, "--overwrite"]


def rows() -> list[Row]:
    prosparse = _train(MODEL, PROSPARSE_RUN)
    r = [Row("original", "-"), Row("prosparse", "-", [prosparse], PROSPARSE_MODEL)]
    for m in METHODS:
        out = str(RUNS / m)
        r.append(Row(m, "-", [_prune(MODEL, m, out)], out))
    for m in ("wanda", "sparsegpt", "proxsparse"):
        out = str(RUNS / f"prosparse-then-{m}")
        r.append(Row(f"prosparse-then-{m}", "ProSparse -> 2:4",
                     [prosparse, _prune(PROSPARSE_MODEL, m, out)], out))
    for m in ("sparsegpt", "proxsparse", "wanda"):
        pruned, out = str(RUNS / m), str(RUNS / f"{m}-then-prosparse")
        r.append(Row(f"{m}-then-prosparse", "2:4 -> ProSparse", [
            _prune(MODEL, m, pruned), _train(pruned, out)], out + "/final"))
    return r


def _done(args: list[str]) -> bool:
    """A prune or train step whose results are already there (another row ran the same
    command): the row starts from them."""
    out = args[args.index("--out") + 1] if "--out" in args else None
    if args[0] == "prune":
        return (ROOT / out / "config.json").is_file() and (ROOT / (out + ".prune.json")).is_file()
    return args[0] == "train" and (ROOT / out / "final" / "config.json").is_file()


def run_row(row: Row, prosparse: str, heldout: list[str]) -> dict:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = ROOT / RUNS / f"{row.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sp_json = RUNS / f"{row.name}.sparsity.json"
    measure = ["sparsity", row.measure, "--data", "wiki", "--tokens", "8192",
               "--json", str(sp_json), "--overwrite"]
    other = {src: ["sparsity", row.measure, "--data", src, "--tokens", "8192", "--json",
                   str(RUNS / f"{row.name}.{src}.json"), "--overwrite"] for src in heldout}
    t0 = time.time()
    with log.open("w") as f:
        for args in [*row.steps, measure, *other.values()]:
            if _done(args):
                f.write("# reused: prosparse " + shlex.join(args) + "\n")
                continue
            f.write("$ prosparse " + shlex.join(args) + "\n")
            f.flush()
            subprocess.run([prosparse, *args], check=True, stdout=f, stderr=subprocess.STDOUT,
                           cwd=ROOT)
    sp = json.loads((ROOT / sp_json).read_text())
    held = {src: json.loads((ROOT / a[a.index("--json") + 1]).read_text())["perplexity"]
            for src, a in other.items()}
    prune = [json.loads((ROOT / (a[a.index("--out") + 1] + ".prune.json")).read_text())
             for a in row.steps if a[0] == "prune"]
    ws = sp.get("weight_sparsity") or {}  # absent when no weight is exactly zero
    return {"name": row.name, "order": row.order, "model": row.measure,
            "commands": ["prosparse " + shlex.join(a)
                         for a in [*row.steps, measure, *other.values()]],
            "wall_seconds": time.time() - t0, "perplexity": sp["perplexity"],
            "heldout_perplexity": held,
            "activation_sparsity": sp["average_sparsity"],
            "weight_sparsity": ws.get("zeros"), "compliance_2of4": ws.get("compliance"),
            "prune_seconds": sum(p["prune_seconds"] for p in prune) if prune else None,
            "sparsity_json": sp}


def report(results: list[dict]) -> str:
    from prosparse.core.tables import format_table

    order = {r.name: i for i, r in enumerate(rows())}
    srcs = sorted({s for r in results for s in r.get("heldout_perplexity", {})})
    table = []
    for r in sorted(results, key=lambda r: order.get(r["name"], 99)):
        ws, comp = r.get("weight_sparsity"), r.get("compliance_2of4")
        held = r.get("heldout_perplexity", {})
        table.append([r["name"], r["order"], f"{100 * r['activation_sparsity']:.2f}",
                      "-" if not ws else f"{100 * ws:.1f}",
                      "-" if comp is None else f"{100 * comp:.0f}",
                      f"{r['perplexity']:.2f}",
                      *("-" if s not in held else f"{held[s]:.2f}" for s in srcs),
                      "-" if r.get("prune_seconds") is None else f"{r['prune_seconds']:.0f}",
                      f"{r['wall_seconds'] / 60:.1f}",
                      "<br>".join(f"`{c}`" for c in r["commands"])])
    return format_table(["row", "order", "activation sparsity %", "weight zeros %",
                         "2:4 groups %", "held-out ppl", *(f"{s} ppl" for s in srcs), "prune s",
                         "wall min", "commands"], table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated row names, or family prefixes (cats)")
    ap.add_argument("--report", action="store_true", help="only rebuild the table")
    ap.add_argument("--heldout", default=HELDOUT,
                    help=f"comma-separated sources measured beside wiki (default {HELDOUT}; "
                    "empty for none)")
    ap.add_argument("--prosparse", default=str(Path(sys.executable).parent / "prosparse"))
    args = ap.parse_args()
    if not args.report:
        wanted = args.only.split(",") if args.only else None
        names = [r.name for r in rows()]
        for row in rows():
            if wanted and not selected(row.name, wanted, names):
                continue
            path = RESULTS / f"{row.name}.json"
            if path.exists():
                continue
            print(f"compose: {row.name}", flush=True)
            write_json(path, run_row(row, args.prosparse,
                                     [h for h in args.heldout.split(",") if h]))
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if results:
        md = report(results)
        (RESULTS / "compose.md").write_text(md + "\n")
        print(md)


if __name__ == "__main__":
    main()
