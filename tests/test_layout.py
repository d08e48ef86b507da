"""The house's floors, read from the source: a forbidden import fails here, not in review.

- ``kernels/`` is the ground floor: it imports nothing of prosparse outside ``kernels/``;
- ``predictors/`` learn and ``inference/`` executes: predictors import neither inference nor
  training;
- ``models/`` import nothing of ``training/``;
- no two files import each other, imports inside functions included (package ``__init__``
  re-exports excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "prosparse"
FORBIDDEN = {  # capability -> capabilities it must not import
    "kernels": None,  # None: nothing outside itself
    "predictors": {"inference", "training"},
    "models": {"training"},
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


def capability(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, Path]]:
    mods = {module_name(p, root): p for p in root.rglob("*.py")}
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}, mods


def floor_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in g.items():
        floor = capability(m)
        if floor not in FORBIDDEN:
            continue
        banned = FORBIDDEN[floor]
        for t in targets:
            cap = capability(t)
            if (banned is None and cap != floor) or (banned is not None and cap in banned):
                bad.append(f"{m} imports {t}")
    return sorted(bad)


def import_loops(g: dict[str, set[str]], mods: dict[str, Path]) -> list[str]:
    return sorted(f"{a} <-> {b}" for a, ts in g.items() for b in ts
                  if a < b and a in g.get(b, ()) and mods[a].name != "__init__.py"
                  and mods[b].name != "__init__.py")


def test_the_source_tree_is_found():
    g, _ = graph()
    assert "prosparse.kernels.dispatch" in g and "prosparse.inference.predicted" in g
    assert "prosparse.kernels.activations" in g["prosparse.kernels.dispatch"]


def test_floors_hold():
    g, _ = graph()
    bad = floor_violations(g)
    assert not bad, "imports that break a floor:\n" + "\n".join(bad)


def test_no_two_files_import_each_other():
    loops = import_loops(*graph())
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_the_rules_catch_what_they_forbid(tmp_path):
    # the checker itself can fail: a function-level import loop and a kernel that imports
    # models are both reported
    root = tmp_path / "prosparse"
    for sub in ("x", "kernels", "models"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "x" / "a.py").write_text("def f():\n    from prosparse.x.b import g\n")
    (root / "x" / "b.py").write_text("from prosparse.x import a\n")
    (root / "models" / "m.py").write_text("")
    (root / "kernels" / "k.py").write_text("import prosparse.models.m\n")
    g, mods = graph(root)
    assert import_loops(g, mods) == ["prosparse.x.a <-> prosparse.x.b"]
    assert floor_violations(g) == ["prosparse.kernels.k imports prosparse.models.m"]
