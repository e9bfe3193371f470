"""The direction of imports inside synth/, walked with ast (imports inside functions included).

Intended (ARCHITECTURE.md): cli -> pipeline -> stage modules -> {store, teachers, prompts, pure
libraries}; no circle anywhere. Today's code still has circles, listed below as KNOWN_CYCLES: the stage
modules reach up into synth.pipeline (record_stage, ...) and generate <-> judge. This test is a ratchet: it fails on any new circle,
on a known circle that grows, and on a known circle that is gone (so that the list only ever shrinks,
and is emptied by issue 14's stage contract). The pure libraries must never import upward at all."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "synth"

# Each a strongly connected component of the import graph today, with why it is still there.
KNOWN_CYCLES = [
    # the stage modules import helpers from synth.pipeline (record_stage, GENERATION_COLUMNS, ...) inside
    # functions, and pipeline dispatches to their run_stage: issue 14's stage contract removes this
    {"synth.evaluate", "synth.export", "synth.filters", "synth.generate", "synth.judge", "synth.pipeline",
     "synth.references", "synth.train_stage"},
]

# Libraries at the bottom: they may import each other, never a stage, the pipeline or the CLI.
PURE = {"synth.ids", "synth.errors", "synth.verdicts", "synth.parsers", "synth.paths", "synth.verify",
        "synth.sandbox", "synth.sandbox_children", "synth.dedup", "synth.secrets", "synth.journal", "synth.vote"}
UPPER = {"synth.cli", "synth.pipeline", "synth.generate", "synth.filters", "synth.judge", "synth.pairs",
         "synth.export", "synth.evaluate", "synth.train_stage", "synth.references", "synth.inspection",
         "synth.report", "synth.demo"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # a module's `if __name__ == "__main__":` block runs it as a script: not an import of the module
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("synth"):
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("synth")]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name and target != "synth":
                    edges[name].add(target)
                    break
    return edges


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_new_import_cycle():
    edges = import_graph()
    assert "synth.pipeline" in edges and len(edges) > 30  # the walk found the package
    known = [frozenset(c & set(edges)) for c in KNOWN_CYCLES]
    for component in cycles(edges):
        assert any(component <= k for k in known), (
            f"a new import cycle: {sorted(component)}; import downward only (ARCHITECTURE.md)")
    for k in known:
        assert any(k <= c for c in cycles(edges)), (
            f"the known cycle {sorted(k)} is (partly) gone: shrink KNOWN_CYCLES in {__file__}")


def test_pure_libraries_never_import_upward():
    edges = import_graph()
    for module in PURE & set(edges):
        upward = edges[module] & UPPER
        assert not upward, f"{module} imports {sorted(upward)}: a library at the bottom must not"
