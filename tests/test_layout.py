"""The house's floors, read from the source: a forbidden import fails here, not in review.

Every folder of ``src/prosparse`` has a floor; a folder imports only folders on lower floors
(imports inside functions included), so the folder graph has no loop. ``cli/`` is the top
floor and nothing imports it; the package ``__init__`` re-exports lazily and nothing imports
it either. Within a folder, no two files import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "prosparse"
FLOORS = {
    "core": 1,  # errors, io, checks, tables, plots, assets, config loader
    "kernels": 1,  # activation math, reference, CPU / Triton kernels, dispatch
    "models": 2,  # activation modules, relufy_, TEAL linears, loading, saving
    "data": 2,  # text sources, chat data, packing
    "measure": 3,  # held-out evaluator, x1 hooks, weight sparsity, threshold sweep
    "sparsity": 4,  # L1 penalty, Algorithm 1, lambda fit, CATS / TEAL calibration
    "pruning": 4,  # N:M masks, magnitude / Wanda / SparseGPT, ProxSparse
    "predictors": 4,  # collect, the predictor MLP, train, metrics
    "evaluation": 4,  # the lm-eval bridge
    "training": 5,  # the recipe, setup, the loop, checkpoints, run folders, the report
    "inference": 5,  # sparse FFN modules, generate, decode timing
    "export": 6,  # PowerInfer
    "cli": 7,  # the command line
    "": 8,  # the package's public API (lazy re-exports)
}


def module_name(path: Path, root: Path) -> str:
    name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every prosparse module ``path`` imports, at any depth (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, Path]]:
    mods = {module_name(p, root): p for p in root.rglob("*.py")}
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}, mods


def folder_graph(g: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """``{folder: {folder it imports: [the module imports that do it]}}``."""
    out: dict[str, dict[str, list[str]]] = {}
    for m, targets in g.items():
        for t in targets:
            a, b = folder(m), folder(t)
            if a != b:
                out.setdefault(a, {}).setdefault(b, []).append(f"{m} imports {t}")
    return out


def floor_violations(g: dict[str, set[str]], floors: dict[str, int] = FLOORS) -> list[str]:
    bad = []
    for a, targets in folder_graph(g).items():
        for b, why in targets.items():
            if a not in floors or b not in floors:
                bad.append(f"{a or '(package)'} or {b or '(package)'} has no floor: add it to "
                           f"FLOORS ({why[0]})")
            elif floors[b] >= floors[a]:
                bad += [f"{w} (floor {floors[a]} -> {floors[b]})" for w in why]
    return sorted(bad)


def folder_loops(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of the folder graph, found by depth-first search (each reported once)."""
    fg = {a: set(ts) for a, ts in folder_graph(g).items()}
    loops, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(fg.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    loops.append(cycle + [nxt])
            elif len(path) < len(fg) + 1:
                visit(nxt, path + [nxt])

    for start in sorted(fg):
        visit(start, [start])
    return loops


def import_loops(g: dict[str, set[str]], mods: dict[str, Path]) -> list[str]:
    return sorted(f"{a} <-> {b}" for a, ts in g.items() for b in ts
                  if a < b and a in g.get(b, ()) and mods[a].name != "__init__.py"
                  and mods[b].name != "__init__.py")


def test_the_source_tree_is_found():
    g, _ = graph()
    assert "prosparse.kernels.dispatch" in g and "prosparse.inference.predicted" in g
    assert "prosparse.kernels.activations" in g["prosparse.kernels.dispatch"]
    assert set(folder(m) for m in g) <= set(FLOORS), "a folder without a floor"


def test_floors_hold():
    bad = floor_violations(graph()[0])
    assert not bad, "imports that break a floor:\n" + "\n".join(bad)


def test_no_loop_between_folders():
    loops = folder_loops(graph()[0])
    assert not loops, "folder import loops:\n" + "\n".join(" -> ".join(c) for c in loops)


def test_no_two_files_import_each_other():
    loops = import_loops(*graph())
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_the_rules_catch_what_they_forbid(tmp_path):
    # the checker itself can fail: a function-level loop between two files, a three-folder
    # loop, and a ground-floor folder importing one above it are all reported
    root = tmp_path / "prosparse"
    for sub in ("x", "kernels", "models", "data", "measure"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "x" / "a.py").write_text("def f():\n    from prosparse.x.b import g\n")
    (root / "x" / "b.py").write_text("from prosparse.x import a\n")
    (root / "models" / "m.py").write_text("def f():\n    import prosparse.data.d\n")
    (root / "data" / "d.py").write_text("import prosparse.measure.e\n")
    (root / "measure" / "e.py").write_text("from prosparse.models import m\n")
    (root / "kernels" / "k.py").write_text("import prosparse.models.m\n")
    g, mods = graph(root)
    assert import_loops(g, mods) == ["prosparse.x.a <-> prosparse.x.b"]
    assert folder_loops(g) == [["data", "measure", "models", "data"]]
    floors = {"kernels": 1, "models": 2, "data": 2, "measure": 3, "x": 1}
    assert floor_violations(g, floors) == [
        "prosparse.data.d imports prosparse.measure.e (floor 2 -> 3)",
        "prosparse.kernels.k imports prosparse.models.m (floor 1 -> 2)",
        "prosparse.models.m imports prosparse.data.d (floor 2 -> 2)",
    ]
