"""The graph layer: a pipeline file, loaded into an immutable, validated graph of stages.

    graph = build(Path("pipeline.yaml"), KINDS)   # synth/pipeline.py passes synth/stages' kind table

`build` reads and checks everything that needs no store contents and no teacher, and raises a
SynthError of one line ("file:line: stage 'name': key 'k': what is wrong; what to do") on the first
problem. What a Graph holds is fixed once `build` returns:

- `spec`: the file's configuration (config.PipelineFile, with the companion stages and the trained
  students' teacher entries added); config models hold configuration only;
- `order` (every stage, inputs first) and `inputs[name]` (the stages it reads: its wiring);
- `companions[owner]`: the generate stages added for an owner's model calls (a judge's critic, an
  evaluate stage's models), `owner_of` the reverse, `pairs_by[critic]` the group column of the pairs
  a pairwise critic renders;
- `columns[name]`, `templates[name]`, `seeds[name]`: each stage's output columns, its template, a load
  stage's rows; `store`: the Store at the resolved store path;
- `where(name, key)` for errors; `fingerprint_parts(name, trained)`, memoised.

Run state is not in the graph: which model each train stage last wrote (`trained`: train stage ->
model dir, read from the store) is handed to the methods that depend on it (fingerprints, teacher
configs) by the run context (synth/context.py) or by the orchestrator (synth/pipeline.py).

What each stage kind declares (its references, columns, checks, companions, run) is a `Kind`, built
in its module under synth/stages/; this module never imports them: `build` is given the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from synth.config import GenerateStage, PipelineFile, line_of, read_pipeline_file
from synth.errors import SynthError
from synth.ids import content_hash
from synth.journal import journal_dir
from synth.prompts import Template
from synth.seeds import Seeds
from synth.store import Store

# kinds whose output is rows with ids (what `input` reads); a command stage's when it declares `columns`
ROWS = ("load", "generate", "keep", "failures", "mix", "command")


@dataclass(frozen=True)
class Ref:
    """A key of a stage's config that names other stages, and the kinds those may be."""
    key: str
    names: tuple[str, ...]
    kinds: tuple[str, ...] = ()
    hint: str = ""  # appended to the "is a <kind> stage; use a ... stage" error
    filters: bool = False  # any filter kind may be named here too (the kinds that declare verdicts=True)


@dataclass(frozen=True)
class Companion:
    """A generate stage a stage adds for its model calls (named by the owner's kind module)."""
    config: GenerateStage
    pairs_by: str | None = None  # render ordered pairs of the input's rows grouped by this column


def _no_columns(graph: "Graph", name: str) -> list[str] | None:
    return None


def _input_rows(config, stages: Mapping) -> list[Ref]:
    return [Ref("input", (config.input,), ROWS)]


@dataclass(frozen=True)
class Kind:
    """What a stage kind declares, next to its config model (config.py). Each synth/stages/<kind>.py
    builds one (`KIND = Kind(...)`) and synth/stages/__init__.py lists them in `KINDS`.

    run(ctx, name) -> counts: runs the stage (synth/context.py: the run context) and records it with
        `ctx.record(...)` in the transaction that writes its output; counts `sent/cached/errors/unsent/
        recovered` are summed into the run's, `stopped: "budget"` is collected.
    references(config, stages) -> [Ref]: the stages it reads, and which kinds they may be.
    check(graph, name) -> columns | None: validates the stage at load time, in DAG order (its inputs'
        columns are known), may `graph.add_template/add_seeds`; returns its output columns.
    The rest have no-op defaults: the teachers it names; the companion generate stages it adds; a
    teacher it provides (a train stage's model); extra fingerprint parts (files it reads); why its
    output is missing though recorded; files it reads and writes (check_outputs); checks made by
    `synth run` before anything is written (`preflight`); `estimate` for `synth plan`.
    """
    name: str
    run: Callable[..., dict]
    references: Callable[[Any, Mapping], list[Ref]] = _input_rows
    check: Callable[["Graph", str], list[str] | None] = _no_columns
    teachers: Callable[[Any], list[tuple[str, list[str]]]] = lambda config: []
    companions: Callable[[str, Any], dict[str, Companion]] = lambda name, config: {}
    provides_teacher: Callable[[str, Any], Any] = lambda name, config: None
    fingerprint: Callable[["Graph", str, Mapping], dict[str, str]] = lambda graph, name, trained: {}
    missing_output: Callable[["Graph", str, dict], str | None] = lambda graph, name, state: None
    reads: Callable[["Graph", str], dict[Path, str]] = lambda graph, name: {}
    writes: Callable[["Graph", str], list[Path]] = lambda graph, name: []
    preflight: Callable[..., None] = lambda graph, name, trained, console, will_run: None
    estimate: Callable[..., dict] | None = None
    same_rows: bool = False   # its rows are its input's rows (filters, keep): `root` follows it
    verdicts: bool = False    # a filter: one verdict per input row into synth.verdict_history
    not_fingerprinted: frozenset[str] = frozenset()  # config keys that do not change what it computes
    # Keys the kind gained after it first shipped, with their defaults: at the default they stay out of the
    # fingerprint, so that upgrading synth does not make finished stages (and all after them) stale.
    later_keys: Mapping[str, Any] = field(default_factory=dict)


class Graph:
    """A loaded pipeline. Immutable once `build` returns (`add_*` and attribute writes raise)."""

    def __init__(self, path: Path, text: str, spec: PipelineFile, store: Store, kinds: Mapping[str, Kind]):
        self.path, self.text, self.spec, self.store, self.kinds = path, text, spec, store, kinds
        self.order: list[str] = []
        self.inputs: dict[str, tuple[str, ...]] = {}
        self.companions: dict[str, tuple[str, ...]] = {}
        self.owner_of: dict[str, str] = {}
        self.pairs_by: dict[str, str] = {}
        self.columns: dict[str, list[str]] = {}
        self.templates: dict[str, Template] = {}
        self.seeds: dict[str, Seeds] = {}
        self.schemas: dict[str, dict] = {}  # a stage with structured output -> its JSON schema (synth/schemas.py)
        self.stage_teachers: set[str] = set()  # teachers that are a stage's model (a train stage's)
        # replication (a train stage's `seeds`): stage in the file -> its replicas <name>_s<seed>, in seed order;
        # and each replica -> the stage in the file it was made from (for lines and reports)
        self.replicas: dict[str, tuple[str, ...]] = {}
        self.replica_of: dict[str, str] = {}
        # rounds (`rounds:`): stage of the block -> its copies per round (round 1..count); each copy -> (stage of
        # the block, round)
        self.rounds: dict[str, tuple[str, ...]] = {}
        self.round_of: dict[str, tuple[str, int]] = {}
        self._fingerprints: dict[tuple, dict[str, str]] = {}  # memo: (name, trained) -> parts
        self._lines: dict[tuple, int | None] = {}  # memo: (name, key) -> line in the file (where)
        self._sealed = False

    def __setattr__(self, key, value):
        if getattr(self, "_sealed", False):
            raise AttributeError(f"a loaded pipeline graph is immutable (tried to set {key!r})")
        super().__setattr__(key, value)

    def _seal(self) -> None:
        for attr in ("inputs", "companions", "owner_of", "pairs_by", "columns", "templates", "seeds", "schemas",
                     "replicas", "replica_of", "rounds", "round_of"):
            setattr(self, attr, MappingProxyType(getattr(self, attr)))
        self.stage_teachers = frozenset(self.stage_teachers)
        self.order = tuple(self.order)
        self._sealed = True

    def add_template(self, name: str, template: Template) -> None:
        self._unsealed().templates[name] = template

    def add_seeds(self, name: str, seeds: Seeds) -> None:
        self._unsealed().seeds[name] = seeds

    def add_schema(self, name: str, schema: dict) -> None:
        self._unsealed().schemas[name] = schema

    def _unsealed(self) -> "Graph":
        if self._sealed:
            raise AttributeError("a loaded pipeline graph is immutable")
        return self

    # ---- reading -----------------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def stage(self, name: str):
        """A stage's config model."""
        return self.spec.stages[name]

    def kind(self, name: str) -> Kind:
        return self.kinds[self.stage(name).kind]

    def resolve(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else (self.base_dir / p)

    def where(self, name: str, key: str | None = None) -> str:
        """"<file>:<line>: stage '<name>'", the line of `key` in the stage (or of the stage) when found; a
        companion stage is not in the file: the line of its owner. Memoised: called per rendered row."""
        if (name, key) not in self._lines:
            owner = self.owner_of.get(name, name)
            in_file = self.replica_of.get(owner, owner)
            section = ["stages"]
            if in_file in self.round_of:  # a round's copy: the block's stage, under rounds.stages
                section, in_file = ["rounds", "stages"], self.round_of[in_file][0]
            self._lines[(name, key)] = line_of(self.text, section + [in_file] + ([key] if key and owner == name
                                                                                 else []))
        line = self._lines[(name, key)]
        return f"{self.path}{f':{line}' if line else ''}: stage '{name}'"

    def round_number(self, name: str) -> int:
        """The round a stage belongs to (rounds:), through its owner (a companion) and replica; 0 outside."""
        owner = self.owner_of.get(name, name)
        return self.round_of.get(self.replica_of.get(owner, owner), ("", 0))[1]

    def upstream(self, targets: list[str]) -> list[str]:
        """The targets and every stage they read, in DAG order."""
        needed: set[str] = set()
        stack = list(targets)
        while stack:
            name = stack.pop()
            if name not in needed:
                needed.add(name)
                stack += self.inputs[name]
        return [n for n in self.order if n in needed]

    def root(self, name: str) -> str:
        """The stage whose rows `name` carries (follows `input` through filters and keeps)."""
        seen: set[str] = set()
        while name in self.spec.stages and self.kind(name).same_rows and name not in seen:
            seen.add(name)
            name = self.stage(name).input
        return name

    def teacher_config(self, teacher: str, trained: Mapping[str, str]):
        """A teacher's config; for a train stage's model, with the directory its last finished run wrote
        (`trained`: train stage -> model dir, from the store)."""
        config = self.spec.teachers[teacher]
        if teacher not in self.stage_teachers:
            return config
        return config.model_copy(update={"model": trained.get(teacher) or f"<{teacher}: not trained yet>"})

    def prices(self, stage_name: str):
        """The prices of the teacher a stage generates with, or None (no teacher, or no prices)."""
        teacher = getattr(self.spec.stages.get(stage_name), "teacher", None)
        return self.spec.teachers[teacher].prices if teacher in self.spec.teachers else None

    # ---- fingerprints ------------------------------------------------------------------------------

    def fingerprint_parts(self, name: str, trained: Mapping[str, str]) -> dict[str, str]:
        """What a stage's output depends on: its config (budgets and the like excluded), the kind's own
        parts (files it reads, its teacher's model), and its inputs' fingerprints. Memoised."""
        memo = (name, tuple(sorted(trained.items())))
        if memo not in self._fingerprints:
            stage, kind = self.stage(name), self.kind(name)
            config = stage.model_dump(mode="json", exclude={"description", *kind.not_fingerprinted})
            config = without_later_keys(kind, config)
            parts = {"config": content_hash(config), **kind.fingerprint(self, name, trained)}
            for inp in self.inputs[name]:
                parts[f"input:{inp}"] = self.fingerprint(inp, trained)
            self._fingerprints[memo] = parts
        return dict(self._fingerprints[memo])

    def fingerprint(self, name: str, trained: Mapping[str, str]) -> str:
        return content_hash(self.fingerprint_parts(name, trained))


def without_later_keys(kind: Kind, config: dict) -> dict:
    """A stage's config dump without the keys its kind gained later that are still at their default."""
    return {k: v for k, v in config.items() if not (k in kind.later_keys and v == kind.later_keys[k])}


# ---- building -----------------------------------------------------------------------------------------

def build(path: Path, kinds: Mapping[str, Kind]) -> Graph:
    """Read and validate a pipeline file completely into a Graph; raise SynthError (one line) on the
    first problem. Reads seed files and templates, never the store's contents and never a teacher."""
    path = Path(path).resolve()
    spec = read_pipeline_file(path)
    missing = set(spec.stages[n].kind for n in spec.stages) - set(kinds)
    if missing:  # a config model without a kind module: synth's own bug, never the user's
        raise AssertionError(f"stage kinds without a module in synth/stages: {sorted(missing)}")
    text = path.read_text(encoding="utf-8")
    graph = Graph(path, text, spec, Store(store_path_of(path, spec)), kinds)
    _expand_rounds(graph)
    _expand_replicas(graph)
    _add_provided_teachers(graph)
    _add_companions(graph)
    _wire(graph)
    graph.order = _topological(graph)
    for name in graph.order:
        columns = graph.kind(name).check(graph, name)
        if columns is not None:
            graph.columns[name] = columns
    check_outputs(graph)
    graph._seal()
    return graph


def _named(graph: Graph, config) -> list[tuple[str, str]]:
    """(key, stage or teacher name) for every key of a stage's config that names a stage or a teacher."""
    kind = graph.kinds[config.kind]
    out = [(ref.key, n) for ref in kind.references(config, graph.spec.stages) for n in ref.names]
    return out + [(key, t) for key, teachers in kind.teachers(config) for t in teachers]


def _rename(data: dict, key: str, target: str, renamed: str) -> None:
    """In a stage's config dump, `target` named by `key` (a name or a list of names) becomes `renamed`: how a
    round's or a replica's copy reads the copies beside it."""
    value = data[key]
    data[key] = [renamed if v == target else v for v in value] if isinstance(value, list) \
        else renamed if value == target else value


def _suffixed(path: str, suffix: str) -> str:
    """<stem><suffix><extension>: the file of an export's copy (a round's, a replica's)."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}{suffix}{p.suffix}"))


ROUND_PREVIOUS = "prev."  # in a rounds block: `prev.X` is the round before's X


def round_name(name: str, r: int) -> str:
    """Round r's copy of a block stage (round 0: the stage of that name outside the block)."""
    return name if r == 0 else f"{name}_r{r}"


def _expand_rounds(graph: Graph) -> None:
    """Rounds: the `rounds.stages` block repeated `count` times after the pipeline's stages (round 0),
    round r's copy of X named X_r<r>. In the block, a key naming a block stage names this round's copy;
    `prev.X` names round r-1's X (round 1: the stage X outside the block, which must exist); any other
    name, the stage or teacher outside. An export's file gets `_r<r>`; a generate stage's `params.seed` is
    offset by r (unset: r), so that each round draws new samples (the same request would be the last
    round's cached answer for a row that failed again). The copies are ordinary stages
    (then replicated like any other, when they read a replicated one); `graph.rounds` / `round_of`
    remember the grouping for status, reports and the stop rule (pipeline.rounds_stop). Done on the
    config, first."""
    rounds = graph.spec.rounds
    if rounds is None:
        return
    stages, block = graph.spec.stages, rounds.stages
    where = lambda n: f"{graph.path}:{line_of(graph.text, ['rounds', 'stages', n]) or ''}: rounds stage '{n}'"  # noqa: E731
    if rounds.stop is not None:
        stop = rounds.stop
        if block.get(stop.evaluate) is None or block[stop.evaluate].kind != "evaluate":
            raise SynthError(f"{graph.path}: rounds.stop.evaluate: {stop.evaluate!r} is not an evaluate stage of the "
                             "rounds block")
        if stop.model not in block[stop.evaluate].models or block.get(stop.model) is None \
                or block[stop.model].kind != "train":
            raise SynthError(f"{graph.path}: rounds.stop.model: {stop.model!r} must be a train stage of the rounds "
                             f"block that {stop.evaluate!r} evaluates")
        for base in (stop.evaluate, stop.model):
            if base not in stages:
                raise SynthError(f"{graph.path}: rounds.stop: round 0 needs a stage {base!r} outside the block too "
                                 "(what round 1 is compared with)")
    expanded = dict(stages)
    for r in range(1, rounds.count + 1):
        for name, config in block.items():
            copy = round_name(name, r)
            if copy in stages or copy in block:
                raise SynthError(f"{where(name)}: round {r}'s copy is named {copy!r}, which is taken; rename one")
            data = config.model_dump(by_alias=True)
            for key, target in _named(graph, config):
                if target.startswith(ROUND_PREVIOUS):
                    base = target[len(ROUND_PREVIOUS):]
                    if base not in block:
                        raise SynthError(f"{where(name)}: key {key!r}: {target!r}: {base!r} is not a stage of the "
                                         "rounds block (prev.X names the round before's copy of a block stage)")
                    if r == 1 and base not in stages:
                        raise SynthError(f"{where(name)}: key {key!r}: {target!r}: round 1 reads round 0's "
                                         f"{base!r}, a stage outside the block, and there is none")
                    renamed = round_name(base, r - 1)
                elif target in block:
                    renamed = round_name(target, r)
                else:
                    continue
                _rename(data, key, target, renamed)
            if config.kind == "export":  # each round writes its own file: <stem>_r<r><suffix>
                data["path"] = _suffixed(data["path"], f"_r{r}")
            if config.kind == "generate":  # new samples each round: a row failed again must not get the
                data["params"]["seed"] = (data["params"].get("seed") or 0) + r  # cached answers of the last
            expanded[copy] = type(config).model_validate(data)
            graph.round_of[copy] = (name, r)
            graph.rounds.setdefault(name, ())
            graph.rounds[name] += (copy,)
    graph.spec.stages = expanded


def _expand_replicas(graph: Graph) -> None:
    """Replication: a train stage with `seeds: [s, ...]` becomes one train stage per seed, <name>_s<seed>
    (the recipe's seed set to s), each a model and a teacher under its own name. A stage that reads a
    replicated stage (its input, teacher, init, data, ...) is replicated with it, replica s reading replica
    s, so a block of stages downstream of a replicated student (its samples, their pairs or scores, the
    next training from `init:`) is repeated per seed (an export's file gets the suffix too:
    out/x_s0.parquet); an evaluate stage instead evaluates every replica of a model it lists. Replicas are
    ordinary stages (stored, fingerprinted, shown by `synth status` under their names); `graph.replicas`
    groups them for reports. Done on the config, before anything else."""
    stages = graph.spec.stages
    seeds_of: dict[str, tuple[int, ...]] = {}
    for name, config in stages.items():
        if config.kind == "train" and config.seeds:
            if len(set(config.seeds)) != len(config.seeds):
                raise SynthError(f"{graph.where(name, 'seeds')}: key 'seeds': a seed is listed twice")
            seeds_of[name] = tuple(config.seeds)
    if not seeds_of:
        return
    changed = True
    while changed:  # replication flows down the references until nothing new is reached
        changed = False
        for name, config in stages.items():
            if config.kind == "evaluate":
                continue
            found = {(n, seeds_of[n]) for _, n in _named(graph, config) if n in seeds_of and n != name}
            seed_sets = {s for _, s in found}
            if len(seed_sets) > 1:
                (a, sa), (b, sb) = sorted(found)[:2]
                raise SynthError(f"{graph.where(name)}: reads '{a}' (seeds {list(sa)}) and '{b}' (seeds {list(sb)}); "
                                 "stages read together must be replicated with the same seeds")
            if seed_sets and name not in seeds_of:
                seeds_of[name], changed = seed_sets.pop(), True
            elif seed_sets and seeds_of[name] != next(iter(seed_sets)):
                raise SynthError(f"{graph.where(name, 'seeds')}: key 'seeds': {list(seeds_of[name])} differs from the "
                                 f"seeds of the replicated stage it reads ({list(next(iter(seed_sets)))}); drop it "
                                 "(it follows them) or make them equal")
    expanded: dict[str, object] = {}
    for name, config in stages.items():
        if config.kind == "evaluate":
            models = [r for m in config.models for r in (
                [f"{m}_s{s}" for s in seeds_of[m]] if m in seeds_of else [m])]
            expanded[name] = config.model_copy(update={"models": models})
            continue
        if name not in seeds_of:
            expanded[name] = config
            continue
        replicas = []
        for seed in seeds_of[name]:
            replica = f"{name}_s{seed}"
            if replica in stages:
                raise SynthError(f"{graph.where(replica)}: the name is taken by a replica of '{name}' (seed {seed}); "
                                 "rename one of them")
            data = config.model_dump(by_alias=True)
            for key, target in _named(graph, config):
                if target in seeds_of:
                    _rename(data, key, target, f"{target}_s{seed}")
            if config.kind == "train":
                data.update(seeds=None, seed=seed)
            if config.kind == "export":  # each replica writes its own file: <stem>_s<seed><suffix>
                data["path"] = _suffixed(data["path"], f"_s{seed}")
            expanded[replica] = type(config).model_validate(data)
            graph.replica_of[replica] = name
            replicas.append(replica)
        graph.replicas[name] = tuple(replicas)
    graph.spec.stages = expanded


def _add_provided_teachers(graph: Graph) -> None:
    """A stage may provide a teacher under its own name (a train stage: its trained model)."""
    spec = graph.spec
    for name, stage in list(spec.stages.items()):
        teacher = graph.kinds[stage.kind].provides_teacher(name, stage)
        if teacher is None:
            continue
        if name in spec.teachers:
            raise SynthError(f"{graph.where(name)}: a teacher has the same name; a trained model is a teacher "
                             "under its stage's name, so rename one of them")
        spec.teachers[name] = teacher
        graph.stage_teachers.add(name)


def _add_companions(graph: Graph) -> None:
    spec = graph.spec
    for name, stage in list(spec.stages.items()):
        companions = graph.kinds[stage.kind].companions(name, stage)
        for extra, companion in companions.items():
            if extra in spec.stages:
                raise SynthError(f"{graph.where(extra)}: the name is taken by {stage.kind} stage '{name}' for its "
                                 "model calls; rename one of them")
            spec.stages[extra] = companion.config
            graph.owner_of[extra] = name
            if companion.pairs_by:
                graph.pairs_by[extra] = companion.pairs_by
        if companions:
            graph.companions[name] = tuple(companions)


def _wire(graph: Graph) -> None:
    """Every reference names an existing stage of an allowed kind, every teacher exists; the wiring
    (`inputs`) is each stage's references followed by its companions."""
    spec, where = graph.spec, graph.where
    for name, stage in spec.stages.items():
        kind = graph.kinds[stage.kind]
        refs = kind.references(stage, spec.stages)
        for ref in refs:
            allowed = ref.kinds + (tuple(k for k, v in graph.kinds.items() if v.verdicts) if ref.filters else ())
            for target in ref.names:
                if target not in spec.stages:
                    raise SynthError(f"{where(name, ref.key)}: key '{ref.key}': no stage named {target!r} "
                                     f"(stages: {', '.join(spec.stages)})")
                found = spec.stages[target].kind
                if found not in allowed:
                    hint = "; point at the stage it exports" if found == "export" and ref.key == "input" else ref.hint
                    raise SynthError(f"{where(name, ref.key)}: key '{ref.key}': {target!r} is a {found} stage; use a "
                                     f"{' or '.join(allowed)} stage{hint}")
        for key, teachers in kind.teachers(stage):
            for t in teachers:
                if t not in spec.teachers:
                    raise SynthError(f"{where(name, key)}: key '{key}': no teacher named {t!r} "
                                     f"(teachers: {', '.join(spec.teachers) or 'none defined'})")
        graph.inputs[name] = tuple(n for ref in refs for n in ref.names) + graph.companions.get(name, ())


def _topological(graph: Graph) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            raise SynthError(f"{graph.path}: stage '{name}': key 'input': the stages form a cycle "
                             f"({' -> '.join(cycle)}); a stage cannot read its own output")
        state[name] = 1
        for inp in graph.inputs[name]:
            visit(inp, trail + [name])
        state[name] = 2
        order.append(name)

    for name in graph.spec.stages:
        visit(name, [])
    return order


# ---- the store's path -----------------------------------------------------------------------------------

def default_store_path(pipeline_path: Path) -> Path:
    return pipeline_path.parent / "data" / "store.duckdb"


# DuckDB names a database's catalog after its file's stem; a stem equal to a schema synth uses (`synth`,
# `main`) or to a built-in catalog makes every `synth.<table>` reference ambiguous.
RESERVED_STORE_STEMS = frozenset({"synth", "main", "system", "temp", "memory", "information_schema", "pg_catalog"})
DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file


def store_path_of(path: Path, spec) -> Path:
    """The store a pipeline file names (`store:`, relative to the file), else the default; checked before
    anything is written: not empty, not a name DuckDB would confuse with synth's schema, not a
    directory, and not an existing file that is not a DuckDB database (a seed file, the pipeline)."""
    if spec.store is None:
        return default_store_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    line = line_of(text, ["store"])
    at = f"{path}{f':{line}' if line else ''}: key 'store'"
    if not spec.store.strip():
        raise SynthError(f"{at}: the store path is empty; remove the key for the default "
                         f"({default_store_path(path).relative_to(path.parent)}) or name a .duckdb file")
    store = path.parent / spec.store
    if store.stem.lower() in RESERVED_STORE_STEMS:
        raise SynthError(f"{at}: a store file named {store.name!r} clashes with DuckDB's catalog naming (the "
                         f"catalog would be called {store.stem!r}, like synth's own schema); "
                         f"name it e.g. {store.with_name('run' + store.suffix).name!r}")
    if store.is_dir():
        raise SynthError(f"{at}: {store} is a directory; name a .duckdb file")
    if store.resolve() == path.resolve():
        raise SynthError(f"{at}: the store cannot be the pipeline file itself")
    if store.is_file() and store.stat().st_size > 0:
        with open(store, "rb") as f:
            head = f.read(12)
        if head[8:12] != DUCKDB_MAGIC:
            raise SynthError(f"{at}: {store} exists and is not a DuckDB database (a seed file?); synth would "
                             "overwrite it — name a new .duckdb file")
    return store


# ---- outputs --------------------------------------------------------------------------------------------

def check_outputs(graph: Graph) -> None:
    """No stage may write over a file the pipeline reads (a seed file, an evaluation file, a template,
    a filter, a recipe, the pipeline itself), over the store and its companions, or over another
    stage's output: an export replaces its path, so any of these would be lost or, worse, read back
    as input by the next run. Each kind names the files it reads (`reads`) and writes (`writes`:
    the first path is its output, a directory when it has no suffix)."""
    def key(p: Path) -> Path:
        return Path(p).resolve()

    store = graph.store
    inputs: dict[Path, str] = {key(graph.path): "the pipeline file"}
    for p in (store.path, store.path.with_name(store.path.name + ".wal"), store.lock_path, journal_dir(store.path)):
        inputs[key(p)] = "the store"
    for name in graph.order:
        for p, what in graph.kind(name).reads(graph, name).items():
            inputs[key(p)] = what
    for name, template in graph.templates.items():
        inputs[key(template.path)] = f"the template of stage '{name}'"
    written: dict[Path, str] = {}  # every path a stage writes -> the stage
    for name in graph.order:
        paths = [key(p) for p in graph.kind(name).writes(graph, name)]
        if not paths:
            continue
        out, stage = paths[0], graph.stage(name)
        for target in paths:
            clash = inputs.get(target) or (f"the output of {graph.stage(written[target]).kind} '{written[target]}'" if target in written else None)
            if clash is None and out.suffix == "":  # a directory export replaces the whole directory
                clash = next((what for p, what in inputs.items() if out in p.parents), None) or \
                    next((f"the output of {graph.stage(n).kind} '{n}'" for p, n in written.items() if out in p.parents
                          and n != name), None)
            if clash is None:  # inside an earlier directory export
                clash = next((f"the output of {graph.stage(n).kind} '{n}'" for p, n in written.items()
                              if p.suffix == "" and p in target.parents and n != name), None)
            if clash:
                field = "outputs" if stage.kind == "command" else "path"
                shown = stage.path if field == "path" else \
                    next(o for o in stage.outputs if key(graph.resolve(o)) == target)
                what = "a command writes its outputs" if field == "outputs" else "an export replaces its path"
                raise SynthError(f"{graph.where(name, field)}: key {field!r}: {shown} would overwrite {clash}; "
                                 f"{what}, so write it somewhere new")
            written[target] = name

