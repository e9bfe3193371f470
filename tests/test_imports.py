"""The direction of imports inside synth/, walked with ast (imports inside functions included).

The house (ARCHITECTURE.md): commands (cli, inspection, report, demo, the package's API) -> pipeline
(the orchestrator) -> stages (one module per kind, and the kind table) -> the layer below the stages
(graph, run context, request building, filter files, verdict storage) -> everything else (store,
journal, teachers, config, prompts, seeds and the pure libraries). Imports point down only:
- no circle anywhere in synth/;
- no module imports a module of a higher layer;
- a stage module imports no other stage module (only the kind table, synth/stages/__init__.py,
  imports them all);
- a synth import inside a function only where a reason is written below (cheap startup, a heavy
  optional library), so that no import hides a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "synth"

COMMANDS = 4
ORCHESTRATOR = 3
STAGES = 2
BELOW_STAGES = 1
LIBRARIES = 0


def layer(module: str) -> int:
    if module == "synth" or module in ("synth.cli", "synth.inspection", "synth.report", "synth.scaffold",
                                         "synth.stage_worker", "synth.explore", "synth.prompts_cmd") or \
            module.startswith("synth.demo"):
        return COMMANDS
    if module == "synth.pipeline":
        return ORCHESTRATOR
    if module == "synth.stages" or module.startswith("synth.stages."):
        return STAGES
    if module in ("synth.graph", "synth.context", "synth.requests", "synth.filterfiles", "synth.verdict_store",
                  "synth.student_fit"):
        return BELOW_STAGES
    return LIBRARIES


# (importing module, imported module) pairs allowed inside a function, each with its reason.
LAZY = {
    ("synth", "synth.inspection"): "`import synth` stays cheap: synth.open imports the store's reader on use",
    ("synth", "synth.store"): "`import synth` stays cheap: synth.open wraps the store in its reader on use",
    ("synth", "synth.pipeline"): "`import synth` stays cheap (synth.load / synth.run)",
    ("synth", "synth.graph"): "`import synth` stays cheap (synth.run)",
    ("synth.teachers", "synth.teachers.hf"): "a backend imports its heavy client (torch, transformers) on use",
    ("synth.teachers", "synth.teachers.vllm"): "a backend imports its heavy client (vllm) on use",
    ("synth.teachers", "synth.teachers.openai"): "a backend is imported only when a teacher uses it",
    ("synth.teachers", "synth.teachers.batch"): "a backend is imported only when a teacher uses it",
    ("synth.teachers", "synth.teachers.echo"): "a backend is imported only when a teacher uses it",
    ("synth.stages.generate", "synth.teachers.ray"): "ray (heavy, optional) only for a stage with `ray:`",
    ("synth.inspection", "synth.pipeline"): "staleness for `synth status` only: the stage kinds take ~0.8 s to "
                                            "import, which `synth sql/show/why` and synth.open do not need",
    ("synth.inspection", "synth.config"): "a pipeline file's schema, only when store_for is given one",
    ("synth.inspection", "synth.graph"): "the store-path rules, only when store_for is given a pipeline file",
    ("synth.kd_train", "synth.kd_loss"): "the loss imports torch; the kd recipe checks (synth plan) must not",
    ("synth.sft_train", "synth.kd_loss"): "the loss imports torch; synth.train's recipe checks must not",
    ("synth.kd_train", "synth.kd_kernel"): "the kernel imports torch and triton; only a batch that runs it imports it",
}
# the CLI imports each command's modules inside the command: `synth --help` loads no torch, duckdb,
# pyarrow (tests/test_startup.py)
LAZY_ANYTHING = {"synth.cli"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(target: str, modules) -> str | None:
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in modules else None


def _targets(node, modules) -> set[str]:
    """The synth modules an import statement imports: `from synth.stages import judge` imports the
    submodule synth.stages.judge; `from synth.store import Store` imports synth.store."""
    found: set[str] = set()
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("synth"):
        for alias in node.names:
            found.add(_resolve(f"{node.module}.{alias.name}", modules))
    elif isinstance(node, ast.Import):
        found = {_resolve(a.name, modules) for a in node.names if a.name.startswith("synth")}
    return found - {None, "synth"}


def import_graph(include_lazy: bool = True) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """module -> the synth modules it imports; and the (module, target) pairs imported inside a function."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy: set[tuple[str, str]] = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # a module's `if __name__ == "__main__":` block runs it as a script: not an import of the module
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        inside: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside |= {id(n) for n in ast.walk(fn)}
        for node in ast.walk(tree):
            for target in _targets(node, modules) - {name}:
                edges[name].add(target)
                if id(node) in inside:
                    lazy.add((name, target))
    return edges, lazy


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


def test_the_walk_finds_the_package():
    edges, _ = import_graph()
    assert {"synth.pipeline", "synth.graph", "synth.stages", "synth.stages.generate", "synth.cli"} <= set(edges)
    assert "synth.stages.generate" in edges["synth.stages"]  # the kind table imports every stage module
    assert "synth.graph" in edges["synth.stages.generate"]


def test_no_import_cycle():
    edges, _ = import_graph()
    assert cycles(edges) == [], "an import cycle in synth/: import downward only (ARCHITECTURE.md)"


def test_imports_point_down():
    edges, _ = import_graph()
    for module, targets in edges.items():
        for target in targets:
            assert layer(target) <= layer(module), (
                f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)}): imports point down "
                "only (ARCHITECTURE.md)")
            if layer(module) == STAGES and module != "synth.stages":
                assert layer(target) < STAGES, (
                    f"stage module {module} imports {target}: a stage never imports another stage module or the "
                    "kind table; move what they share below the stages (graph, requests, verdict_store, ...)")


def test_imports_inside_functions_have_a_reason():
    _, lazy = import_graph()
    unexplained = sorted((m, t) for m, t in lazy if m not in LAZY_ANYTHING and (m, t) not in LAZY)
    assert not unexplained, (f"imports inside functions without a reason: {unexplained}; import at module level, "
                             "or add the pair to LAZY with why (a heavy optional library, startup time)")
    stale = sorted(set(LAZY) - lazy)
    assert not stale, f"LAZY lists imports that are no longer inside a function: {stale}"


def test_the_layers_catch_an_upward_import(tmp_path):
    """The checks can fail: an edge from a stage up into the pipeline, or between two stage modules."""
    edges = {"synth.stages.pairs": {"synth.pipeline"}, "synth.pipeline": {"synth.stages.pairs"}}
    assert cycles(edges) == [{"synth.stages.pairs", "synth.pipeline"}]
    assert layer("synth.pipeline") > layer("synth.stages.pairs") > layer("synth.graph") > layer("synth.store")
