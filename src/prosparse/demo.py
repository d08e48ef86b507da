"""``prosparse demo``: the main job on the embedded default model and corpus.

Measures the embedded SmolLM2-135M as shipped (SiLU), after a bare ReLU swap, and after a
FATReLU swap: held-out sparsity and perplexity on ``wiki`` and ``qa`` in one table, plus the
layer-wise plot, written to a report folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from prosparse.tables import format_table, pct


def run_demo(out: str = "runs/demo", tokens: int = 8192, seq_len: int = 256,
             threshold: float = 0.01) -> dict:
    from prosparse.io import write_json
    from prosparse.models.loading import DEFAULT_MODEL, load_model
    from prosparse.models.relufy import activation_state, relufy_
    from prosparse.sparsity.measure import measure_sparsity

    start = time.time()
    model, tok = load_model(DEFAULT_MODEL)
    restore = activation_state(model)
    settings = {
        "original": lambda: None,
        "relu_swap": lambda: relufy_(model, act="relu"),
        f"fatrelu_{threshold:g}": lambda: relufy_(model, act="fatrelu", threshold=threshold),
    }
    report = {"model": DEFAULT_MODEL, "tokens": tokens, "seq_len": seq_len, "settings": {}}
    for name, apply in settings.items():
        restore()
        apply()
        report["settings"][name] = measure_sparsity(model, tok, ["wiki", "qa"], tokens=tokens,
                                                    seq_len=seq_len, model_name=name)
    restore()
    report["wall_seconds"] = time.time() - start
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "report.json", report)
    rows = []
    for name, r in report["settings"].items():
        d = r["datasets"]
        rows.append([name, pct(r["average_sparsity"]), f"{d['wiki']['perplexity']:.2f}",
                     pct(d["wiki"]["average_sparsity"]), f"{d['qa']['perplexity']:.2f}",
                     pct(d["qa"]["average_sparsity"])])
    table = format_table(["setting", "sparsity %", "wiki ppl", "wiki sp. %", "qa ppl",
                          "qa sp. %"], rows)
    (folder / "table.md").write_text(table + "\n")
    print(table)
    try:
        from prosparse.plots import plot_layer_sparsity

        series = {f"{n} / {ds}": r["datasets"][ds]["layer_sparsity"]
                  for n, r in report["settings"].items() if n != "original" for ds in ("wiki", "qa")}
        plot_layer_sparsity(series, folder / "layer_sparsity.png",
                            title=f"{DEFAULT_MODEL}: layer-wise sparsity (held-out)")
    except ImportError as e:
        print(f"(no plot: {e})")
    print(f"report: {folder}/report.json, {folder}/table.md, {folder}/layer_sparsity.png "
          f"({report['wall_seconds']:.0f} s)")
    return report


def _demo(args) -> int:
    run_demo(out=args.out, tokens=args.tokens, seq_len=args.seq_len, threshold=args.threshold)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default model and corpus")
    p.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens per data source")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block")
    p.add_argument("--threshold", type=float, default=0.01, help="FATReLU threshold")
    p.set_defaults(func=_demo)
