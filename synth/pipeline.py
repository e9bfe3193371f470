"""Pipeline file -> validated DAG of stages; fingerprints; staleness; plan and run.

    pipeline = load_pipeline(Path("pipeline.yaml"))   # every check that needs no teacher
    plan(pipeline)                                    # what would run, cached vs new requests
    run(pipeline, targets=["solutions"])              # run stale stages in DAG order

A stage's fingerprint covers its config, the bytes of the files it reads (seed file, prompt
template), the teacher's backend and model, and its inputs' fingerprints. A stage is stale when it
never ran, its fingerprint changed, its last run did not finish cleanly, an input re-ran after it,
or (export) its output file is gone.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from synth.config import (FILTER_KINDS, EvaluateStage, ExportStage, GenerateStage, JudgeStage, KeepStage, LoadStage,
                          PairsStage, PipelineFile, TrainStage, line_of, read_pipeline_file)
from synth.errors import SynthError, one_line
from synth.references import (add_companion_stages, add_student_teachers, check_before_writing, check_filter,
                              check_references)
from synth.ids import content_hash
from synth.seeds import Seeds, read_seeds
from synth.parsers import PARSER_COLUMNS
from synth.prompts import Template, load_template
from synth.store import fetch_one, Store

# Keys a stage kind gained after it first shipped, with their defaults: at the default they stay out of
# the stage's fingerprint, so that upgrading synth does not make finished stages (and every train stage
# after them) stale. A key set to anything else is part of the fingerprint like any other.
LATER_KEYS: dict[str, dict[str, object]] = {"export": {"rejected": "whole"}}

GENERATION_COLUMNS = ["id", "input_id", "sample", "teacher", "model", "text", "finish_reason",
                      "prompt_tokens", "completion_tokens"]


@dataclass
class Pipeline:
    path: Path
    spec: PipelineFile
    store: Store
    order: list[str]  # every stage, inputs before the stages that read them
    templates: dict[str, Template] = field(default_factory=dict)  # generate stage -> its template
    seeds: dict[str, Seeds] = field(default_factory=dict)  # load stage -> its rows
    columns: dict[str, list[str]] = field(default_factory=dict)  # row-producing stage -> its columns
    trained: dict[str, str] = field(default_factory=dict)  # train stage -> the model dir of its last finished run
    run_budget: object = None  # generate.RunBudget while a `synth run --max-cost` runs

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def stage(self, name: str):
        return self.spec.stages[name]

    def resolve(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else (self.base_dir / p)

    def where(self, name: str) -> str:
        return f"{self.path}: stage '{name}'"

    def upstream(self, targets: list[str]) -> list[str]:
        """The targets and every stage they read, in DAG order."""
        needed: set[str] = set()
        stack = list(targets)
        while stack:
            name = stack.pop()
            if name not in needed:
                needed.add(name)
                stack += _inputs(self.stage(name))
        return [n for n in self.order if n in needed]

    # ---- fingerprints --------------------------------------------------------------------------

    def fingerprint_parts(self, name: str) -> dict[str, str]:
        stage = self.stage(name)
        # budgets are not part of what a stage computes: raising one only lets an incomplete stage go on;
        # nor is a train stage's batch_size, which is how its model generates later, nor where a generate
        # stage's requests run (ray): the request ids, hence the cache, do not depend on it
        config = stage.model_dump(mode="json", exclude={"description", "max_cost", "max_tokens_total", "batch_size",
                                                         "ray"})
        for key, default in LATER_KEYS.get(stage.kind, {}).items():
            if config.get(key) == default:
                del config[key]
        parts = {"config": content_hash(config)}
        if isinstance(stage, LoadStage):
            parts["file"] = self.seeds[name].file_hash
        if isinstance(stage, ExportStage) and stage.prompt:
            parts["prompt"] = self.templates[name].file_hash
        if isinstance(stage, GenerateStage):
            parts["prompt"] = self.templates[name].file_hash
            teacher = self.teacher_config(stage.teacher)
            parts["teacher"] = content_hash({"backend": teacher.backend, "model": teacher.model})
        if stage.kind in FILTER_KINDS:
            from synth.filters import filter_version
            parts["filter"] = filter_version(self, name)
        if isinstance(stage, TrainStage):
            parts["recipe"] = content_hash(self.resolve(stage.recipe).read_text(encoding="utf-8"))
            if stage.student:
                from synth.teachers import model_signature
                model = (self.spec.teachers[stage.student].model if stage.student in self.spec.teachers
                         else stage.student)
                # a local base model rebuilt with another config or tokenizer retrains the stage
                parts["student"] = content_hash({"model": model, "files": model_signature(model, self.base_dir)})
        for inp in _inputs(stage):
            parts[f"input:{inp}"] = self.fingerprint(inp)
        return parts

    def root(self, name: str) -> str:
        """The stage whose rows a filter/keep chain carries (follows `input` through filters and keeps)."""
        while self.stage(name).kind in (*FILTER_KINDS, "keep"):
            name = self.stage(name).input
        return name

    def fingerprint(self, name: str) -> str:
        return content_hash(self.fingerprint_parts(name))

    def prices(self, stage_name: str):
        """The prices of the teacher a stage generates with, or None (no teacher, or no prices)."""
        teacher = getattr(self.spec.stages.get(stage_name), "teacher", None)
        return self.spec.teachers[teacher].prices if teacher in self.spec.teachers else None

    def teacher_config(self, name: str):
        """A teacher's config; for a train stage's model, with the directory its last finished run wrote
        (read from the store when the pipeline is loaded, updated when a train stage finishes)."""
        config = self.spec.teachers[name]
        if not isinstance(self.spec.stages.get(name), TrainStage):
            return config
        return config.model_copy(update={"model": trained_model_dir(self, name) or f"<{name}: not trained yet>"})


def _inputs(stage) -> list[str]:
    """The stages a stage reads: its input, a keep's filters, a judge's critic calls."""
    if isinstance(stage, KeepStage):
        return [stage.input, *stage.pass_]
    if isinstance(stage, JudgeStage):
        from synth.judge import critic_stage_name
        return [stage.input, critic_stage_name(stage._name)]
    if isinstance(stage, PairsStage):
        return [stage.input] + [s for s in (stage.by, stage.versus) if s]
    if isinstance(stage, EvaluateStage):
        from synth.evaluate import model_stage_name
        return [stage.input] + [model_stage_name(stage._name, m) for m in stage.models]
    if isinstance(stage, TrainStage):
        return [stage.data] + ([stage.init] if stage.init else [])
    if isinstance(stage, GenerateStage):
        return [stage.input, *stage._after]
    return [stage.input] if hasattr(stage, "input") else []


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
        store = default_store_path(path)
    else:
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


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate a pipeline file completely; raise SynthError (one line) on the first problem.
    Reads seed files and templates, never the store's contents and never a teacher."""
    path = Path(path).resolve()
    spec = read_pipeline_file(path)
    add_student_teachers(path, spec)
    add_companion_stages(path, spec)
    store_path = store_path_of(path, spec)
    text = path.read_text(encoding="utf-8")

    def where(name: str, key: str | None = None) -> str:
        line = line_of(text, ["stages", name] + ([key] if key else []))
        return f"{path}{f':{line}' if line else ''}: stage '{name}'"

    check_references(path, spec, where)

    pipeline = Pipeline(path=path, spec=spec, store=Store(store_path), order=_topological(path, spec))
    for name in pipeline.order:
        stage = spec.stages[name]
        if isinstance(stage, LoadStage):
            seeds = read_seeds(pipeline.resolve(stage.path), where(name, 'path'), stage.limit)
            pipeline.seeds[name] = seeds
            pipeline.columns[name] = seeds.columns
        elif isinstance(stage, GenerateStage):
            template = load_template(stage.prompt, path.parent, f"{where(name, 'prompt')}: key 'prompt'")
            columns = pipeline.columns[stage.input]
            if stage._pairs_for:
                from synth.judge import PAIR_COLUMNS
                columns = [c for c in columns if c not in PAIR_COLUMNS] + PAIR_COLUMNS
            template.check_columns(columns, where(stage._pairs_for or name, 'prompt'))
            pipeline.templates[name] = template
            pipeline.columns[name] = generation_columns(template, pipeline.columns[stage.input])
        elif stage.kind in FILTER_KINDS:
            from synth.filters import VERDICT_COLUMNS, validate
            validate(pipeline, name, pipeline.columns[stage.input])
            check_filter(pipeline, name)
            pipeline.columns[name] = pipeline.columns[stage.input] + VERDICT_COLUMNS
        elif isinstance(stage, KeepStage):
            pipeline.columns[name] = pipeline.columns[stage.input]
        elif isinstance(stage, PairsStage):
            for source in [stage.input] + ([stage.versus] if stage.versus else []):
                if stage.group_by not in pipeline.columns[source]:
                    raise SynthError(f"{where(name, 'group_by')}: key 'group_by': {source!r} has no column "
                                     f"{stage.group_by!r}")
            pipeline.columns[name] = ["id", "input_id", "rule", "margin", "chosen_id", "rejected_id",
                                      "chosen_text", "rejected_text"]
        elif isinstance(stage, EvaluateStage):
            from synth.evaluate import model_stage_name
            v = stage.verify
            if len(set(stage.models)) != len(stage.models):
                raise SynthError(f"{where(name, 'models')}: key 'models': a model is listed twice")
            from synth.filters import check_extract
            check_extract(where(name, "verify"), v.extract, v.pattern, v.field, prefix="verify.")
            if v.reference not in pipeline.columns[stage.input]:
                raise SynthError(f"{where(name, 'verify')}: key 'verify.reference': the input has no column "
                                 f"{v.reference!r} (its columns: {', '.join(pipeline.columns[stage.input])})")
            produced = pipeline.columns[model_stage_name(name, stage.models[0])]
            if v.answer not in produced:
                raise SynthError(f"{where(name, 'verify')}: key 'verify.answer': the outputs have no column "
                                 f"{v.answer!r} (they have: {', '.join(produced)}); parse it in the template "
                                 "or extract it from `text`")
            pipeline.columns[name] = ["model", "id", "input_id", "sample", "passed", "reason", "answer",
                                      "completion_tokens"]
        elif isinstance(stage, ExportStage):
            _check_export_source(pipeline, name, where)
            out = pipeline.resolve(stage.path)
            if out.suffix == "":
                import importlib.util
                if importlib.util.find_spec("datasets") is None:
                    raise SynthError(f"{where(name, 'path')}: key 'path': a directory export is a Hugging Face "
                                     "dataset and needs `datasets`: pip install 'synth-distill[train]'")
                if out.resolve() in (store_path.resolve(), *store_path.resolve().parents) or \
                        out.resolve() in path.parents:
                    raise SynthError(f"{where(name, 'path')}: key 'path': {out} holds the store or the pipeline; "
                                     "an export replaces its directory, so point it at a new one")
            if out.suffix not in (".parquet", ".jsonl", ""):
                raise SynthError(f"{where(name, 'path')}: key 'path': write .parquet, .jsonl or a directory (a "
                                 f"saved Hugging Face dataset), not {out.name!r}")
            if stage.target != "text" and stage.answer not in pipeline.columns[stage.input]:
                raise SynthError(f"{where(name, 'answer')}: key 'answer': target {stage.target} needs the answer "
                                 f"column; the input has no column {stage.answer!r}")
        elif isinstance(stage, TrainStage):
            from synth.train_stage import check_recipe
            check_recipe(pipeline, name, where(name, "recipe"))
    check_outputs(pipeline, where)
    if any(isinstance(st, TrainStage) for st in spec.stages.values()) and pipeline.store.exists():
        pipeline.trained = {n: st["detail"]["model_dir"] for n, st in pipeline.store.stage_states().items()
                            if st["kind"] == "train" and st["status"] == "done" and st["detail"].get("model_dir")}
    return pipeline


def check_outputs(pipeline: Pipeline, where) -> None:
    """No export may write over a file the pipeline reads (a seed file, an evaluation file, a template,
    a filter, a recipe, the pipeline itself), over the store and its companions, or over another export
    (its file or its sidecar): an export replaces its path, so any of these would be lost or, worse, read
    back as input by the next run."""
    from synth.export import sidecar_path
    from synth.filters import filter_path
    from synth.journal import journal_dir

    def key(p: Path) -> Path:
        return Path(p).resolve()

    store = pipeline.store
    inputs: dict[Path, str] = {key(pipeline.path): "the pipeline file"}
    for p in (store.path, store.path.with_name(store.path.name + ".wal"), store.lock_path, journal_dir(store.path)):
        inputs[key(p)] = "the store"
    for name in pipeline.order:
        stage = pipeline.stage(name)
        if isinstance(stage, LoadStage):
            inputs[key(pipeline.resolve(stage.path))] = f"the seed file of stage '{name}'"
        for f in getattr(stage, "against", None) or []:
            inputs[key(pipeline.resolve(f))] = f"an evaluation file of stage '{name}'"
        if isinstance(stage, TrainStage):
            inputs[key(pipeline.resolve(stage.recipe))] = f"the recipe of stage '{name}'"
        if stage.kind in FILTER_KINDS and getattr(stage, "use", None):
            try:
                inputs[key(filter_path(pipeline, name))] = f"the filter file of stage '{name}'"
            except SynthError:
                pass
    for name, template in pipeline.templates.items():
        inputs[key(template.path)] = f"the template of stage '{name}'"
    written: dict[Path, str] = {}  # every path an export writes (its file or directory, its sidecar) -> export
    for name in pipeline.order:
        stage = pipeline.stage(name)
        if not isinstance(stage, ExportStage):
            continue
        out = key(pipeline.resolve(stage.path))
        for target in (out, key(sidecar_path(out))):
            clash = inputs.get(target) or (f"the output of export '{written[target]}'" if target in written else None)
            if clash is None and out.suffix == "":  # a directory export replaces the whole directory
                clash = next((what for p, what in inputs.items() if out in p.parents), None) or \
                    next((f"the output of export '{n}'" for p, n in written.items() if out in p.parents
                          and n != name), None)
            if clash is None:  # inside an earlier directory export
                clash = next((f"the output of export '{n}'" for p, n in written.items()
                              if p.suffix == "" and p in target.parents and n != name), None)
            if clash:
                raise SynthError(f"{where(name, 'path')}: key 'path': {stage.path} would overwrite {clash}; an "
                                 "export replaces its path, so write it somewhere new")
            written[target] = name


def _check_export_source(pipeline: Pipeline, name: str, where) -> None:
    """sft exports generated rows, or a load stage's own rows rendered with `prompt` (+ `response`)."""
    stage: ExportStage = pipeline.stage(name)
    root_kind = pipeline.spec.stages[pipeline.root(stage.input)].kind
    if stage.format == "dpo":
        if stage.prompt or stage.response:
            raise SynthError(f"{where(name, 'prompt')}: keys 'prompt'/'response' export a dataset's own rows "
                             "(format sft); a dpo export takes its prompts from the pairs")
        return
    if root_kind == "load":
        if not stage.prompt or not stage.response:
            raise SynthError(f"{where(name, 'input')}: key 'input': {stage.input!r} is a dataset, not generated "
                             "rows; give `prompt:` (a template for the prompt turns) and `response:` (the column "
                             "that is the assistant turn) to export its own rows")
        template = load_template(stage.prompt, pipeline.path.parent, f"{where(name, 'prompt')}: key 'prompt'")
        template.check_columns(pipeline.columns[stage.input], where(name, 'prompt'))
        if stage.response not in pipeline.columns[stage.input]:
            raise SynthError(f"{where(name, 'response')}: key 'response': the input has no column "
                             f"{stage.response!r} (its columns: {', '.join(pipeline.columns[stage.input])})")
        pipeline.templates[name] = template
    elif root_kind != "generate":
        raise SynthError(f"{where(name, 'input')}: key 'input': format 'sft' exports generated rows; "
                         f"{stage.input!r} carries {pipeline.root(stage.input)!r}'s rows")
    elif stage.prompt or stage.response:
        raise SynthError(f"{where(name, 'prompt')}: keys 'prompt'/'response' are for exporting a dataset's own "
                         f"rows; {stage.input!r} holds generated rows, whose prompts are the ones sent")


def trained_model_dir(pipeline, name: str) -> str | None:
    """The model train stage `name` wrote in its last finished run, or None. Each training run writes
    a new directory named by its run id (synth/train_stage.py), so a retrained model is a different
    model id and never reuses the old model's cached completions."""
    return pipeline.trained.get(name)


def generation_columns(template: Template, input_columns: list[str]) -> list[str]:
    """A generate stage's columns: its own, the parser's, then the input row's (minus its id, which is
    `input_id`); an input column whose name is taken is renamed input_<name>."""
    own = GENERATION_COLUMNS + PARSER_COLUMNS[template.spec.parse]
    return own + [input_alias(c, own) for c in input_columns if c != "id"]


def input_alias(column: str, taken: list[str]) -> str:
    return f"input_{column}" if column in taken else column


def _topological(path: Path, spec: PipelineFile) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            raise SynthError(f"{path}: stage '{name}': key 'input': the stages form a cycle "
                             f"({' -> '.join(cycle)}); a stage cannot read its own output")
        state[name] = 1
        for inp in _inputs(spec.stages[name]):
            visit(inp, trail + [name])
        state[name] = 2
        order.append(name)

    for name in spec.stages:
        visit(name, [])
    return order


# ---- staleness -----------------------------------------------------------------------------------

@dataclass
class StageStatus:
    name: str
    kind: str
    stale: bool
    reason: str


def staleness(pipeline: Pipeline, states: dict[str, dict] | None = None) -> dict[str, StageStatus]:
    """Fresh or stale, and why, for every stage (reads stage states; calls no teacher)."""
    states = pipeline.store.stage_states() if states is None else states
    out: dict[str, StageStatus] = {}
    for name in pipeline.order:
        stage = pipeline.stage(name)
        out[name] = StageStatus(name, stage.kind, *_why_stale(pipeline, name, states, out))
    return out


def _why_stale(pipeline: Pipeline, name: str, states: dict, upstream: dict[str, StageStatus]) -> tuple[bool, str]:
    state = states.get(name)
    if state is None:
        return True, "never run"
    if state["status"] == "running":
        return True, "its last run did not finish"
    if state["status"] == "incomplete" and state["detail"].get("stopped") == "budget":
        return True, f"its last run stopped at its budget ({state['detail'].get('budget')}); raise it to go on"
    if state["status"] == "incomplete":
        return True, f"its last run left {state['detail'].get('errors', '?')} requests failed or unsent"
    stale_inputs = [i for i in _inputs(pipeline.stage(name)) if upstream[i].stale]
    if stale_inputs:
        return True, f"input '{stale_inputs[0]}' is stale"
    old = state["detail"].get("fingerprint_parts", {})
    new = pipeline.fingerprint_parts(name)
    if state["fingerprint"] != content_hash(new):
        changed = [k for k in new if old.get(k) != new[k]] or ["config"]
        labels = {"config": "its config changed", "file": "its seed file changed",
                  "prompt": "its prompt template changed", "teacher": "its teacher's model changed",
                  "filter": "its filter's config or files changed", "recipe": "its training recipe changed",
                  "student": "its student model changed"}
        return True, labels.get(changed[0], f"input '{changed[0].split(':', 1)[-1]}' changed")
    for inp in _inputs(pipeline.stage(name)):
        if states.get(inp, {}).get("run_id") != state["detail"].get("input_runs", {}).get(inp):
            return True, f"input '{inp}' ran again since"
    stage = pipeline.stage(name)
    if isinstance(stage, ExportStage) and not pipeline.resolve(stage.path).exists():
        return True, "its output file is missing"
    if isinstance(stage, TrainStage) and not (Path(trained_model_dir(pipeline, name) or "/nonexistent")
                                              / "config.json").exists():
        return True, "its trained model is missing"
    return False, "up to date"


# ---- plan and run ------------------------------------------------------------------------------------

def plan(pipeline: Pipeline, targets: list[str] | None = None) -> list[dict]:
    """One row per stage: status, reason, and for generate stages the requests cached vs to send and
    the estimated tokens. Calls no teacher and writes nothing."""
    from synth.generate import estimate

    names = pipeline.upstream(targets) if targets else pipeline.order
    statuses = staleness(pipeline)
    rows = []
    for name in names:
        st = statuses[name]
        row = {"stage": name, "kind": st.kind, "stale": st.stale, "reason": st.reason}
        if isinstance(pipeline.stage(name), GenerateStage):
            row.update(estimate(pipeline, name, statuses))
        rows.append(row)
    return rows


def run(pipeline: Pipeline, targets: list[str] | None = None, *, force: bool = False, argv: list[str] | None = None,
        console: Console | None = None, max_cost: float | None = None) -> dict:
    """Run every stale stage among the targets (default: all) and their upstream, in DAG order.
    Records one run row. Returns the run's counts. Holds the store's writer lock throughout (one run per
    store at a time)."""
    console = console or Console(stderr=True)
    for t in targets or []:
        if t not in pipeline.spec.stages:
            raise SynthError(f"{pipeline.path}: no stage named {t!r} (stages: {', '.join(pipeline.order)})")
    names = pipeline.upstream(targets) if targets else pipeline.order
    check_teachers(pipeline, names)
    check_before_writing(pipeline, names, console, force)  # every prompt known now renders; filter files load
    if max_cost is not None:
        from synth.generate import RunBudget
        unpriced = sorted({pipeline.stage(n).teacher for n in names if isinstance(pipeline.stage(n), GenerateStage)
                           and pipeline.prices(n) is None})
        if unpriced:
            raise SynthError(f"--max-cost: teacher {unpriced[0]!r} has no prices; add prices: {{input: USD per 1M "
                             "tokens, output: USD per 1M tokens}} to it, or run without --max-cost")
        pipeline.run_budget = RunBudget(max_cost)
    store = pipeline.store
    with store.writer(f"synth run {pipeline.path}"):
        return _run_locked(pipeline, names, targets, force, argv, console)


def _run_locked(pipeline: Pipeline, names: list[str], targets: list[str] | None, force: bool,
                argv: list[str] | None, console: Console) -> dict:
    from synth import evaluate, export, filters, generate, pairs

    store = pipeline.store
    run_id = store.start_run("run", argv or sys.argv[1:], str(pipeline.path),
                             pipeline.spec.model_dump(mode="json"))
    counts: dict = {"stages_run": [], "sent": 0, "cached": 0, "errors": 0, "unsent": 0, "recovered": 0}
    try:
        for name in names:
            statuses = staleness(pipeline)
            st = statuses[name]
            if not st.stale and not (force and (not targets or name in targets)):
                console.print(f"[dim]{name}: up to date[/dim]")
                continue
            console.print(f"[bold]{name}[/bold] ({st.kind}): {st.reason}")
            started = time.monotonic()
            stage = pipeline.stage(name)
            if isinstance(stage, LoadStage):
                result = _run_load(pipeline, name, run_id)
            elif isinstance(stage, GenerateStage):
                result = generate.run_stage(pipeline, name, run_id, console)
            elif stage.kind in FILTER_KINDS:
                result = filters.run_stage(pipeline, name, run_id, console)
            elif isinstance(stage, KeepStage):
                result = filters.run_keep(pipeline, name, run_id, console)
            elif isinstance(stage, PairsStage):
                result = pairs.run_stage(pipeline, name, run_id, console)
            elif isinstance(stage, EvaluateStage):
                result = evaluate.run_stage(pipeline, name, run_id, console)
            elif isinstance(stage, TrainStage):
                from synth import train_stage
                result = train_stage.run_stage(pipeline, name, run_id, console)
            else:
                result = export.run_stage(pipeline, name, run_id)
            result["seconds"] = round(time.monotonic() - started, 3)
            counts["stages_run"].append(name)
            if result.get("stopped") == "budget":
                counts.setdefault("stopped_at_budget", []).append(name)
            for key in ("sent", "cached", "errors", "unsent", "recovered"):
                counts[key] += result.get(key, 0)
            counts.setdefault("stages", {})[name] = result
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            store.finish_run(run_id, status, counts, error=one_line(exc)[:2000])
        except SynthError:  # the store itself failed (a full disk, a lock): the first error is the one to show
            pass
        raise
    store.finish_run(run_id, "incomplete" if counts["errors"] or counts["unsent"] else "ok", counts)
    counts["run_id"] = run_id
    return counts


def check_teachers(pipeline: Pipeline, names: list[str]) -> None:
    """What can be checked about the teachers without calling them, before anything is written:
    API keys present in the environment, and the capabilities a stage asks of its backend."""
    from synth.teachers import OpenAITeacherConfig
    from synth.teachers.openai import resolve_api_key

    for name in names:
        stage = pipeline.stage(name)
        if isinstance(stage, GenerateStage):
            config = pipeline.teacher_config(stage.teacher)
            if stage.params.logprobs is not None and not config.capabilities().logprobs:
                raise SynthError(f"{pipeline.where(name)}: key 'params.logprobs': teacher '{stage.teacher}' "
                                 f"(backend {config.backend}) cannot return logprobs"
                                 + (" (its config says logprobs: false)" if config.backend == "openai" else "")
                                 + "; remove params.logprobs or use a backend that has them (hf, vllm, openai, echo)")
            if stage.ray is not None and getattr(config, "mode", "online") == "batch":
                raise SynthError(f"{pipeline.where(name)}: key 'ray': teacher '{stage.teacher}' uses mode batch, which "
                                 "runs on the provider's side; remove `ray:` from the stage or use mode online")
            if isinstance(config, OpenAITeacherConfig):
                resolve_api_key(stage.teacher, config)


def record_stage(con, pipeline: Pipeline, name: str, status: str, rows: int, run_id: str, **detail) -> None:
    """Write a stage's state with the fingerprint it ran under and the run ids of its inputs."""
    states = {}
    for inp in _inputs(pipeline.stage(name)):
        r = fetch_one(con, "SELECT run_id FROM synth.stages WHERE name = ?", [inp])
        states[inp] = r[0] if r else None
    parts = pipeline.fingerprint_parts(name)
    Store.set_stage(con, name, pipeline.stage(name).kind, content_hash(parts), status, rows, run_id,
                    {"fingerprint_parts": parts, "input_runs": states, **detail})


def _run_load(pipeline: Pipeline, name: str, run_id: str) -> dict:
    seeds = pipeline.seeds[name]
    with pipeline.store.write() as con:
        Store.replace_table(con, name, seeds.table)
        record_stage(con, pipeline, name, "done", seeds.table.num_rows, run_id, collapsed=seeds.collapsed)
    return {"rows": seeds.table.num_rows}
