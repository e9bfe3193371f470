"""Stage references, checked and wired when a pipeline is loaded (before anything runs):

- companion stages: a judge stage J gets the generate stage J_critic for its critic calls
  (synth/judge.py), an evaluate stage E gets E_<model> per model (synth/evaluate.py);
- trained students: a train stage's model is a teacher under the stage's name, and a generate stage
  that uses it runs after the train stage;
- every reference (input, pass, by, versus, data, init, teacher, models) must name an existing
  stage of a kind that can be read there: one line naming the file, line, stage and key otherwise.
"""

from __future__ import annotations

from pathlib import Path

from synth.config import (FILTER_KINDS, EvaluateStage, ExportStage, GenerateStage, JudgeStage, KeepStage,
                          PairsStage, PipelineFile, TrainStage)
from synth.errors import SynthError, decode_utf8, one_line

ROWS = ("load", "generate", "keep")  # stages whose output is rows with ids


def add_student_teachers(path: Path, spec: PipelineFile) -> None:
    """A train stage's model is a teacher under the stage's name (an hf teacher; its directory is set
    once fingerprints are known: pipeline.trained_model_dir)."""
    from synth.teachers import HFTeacherConfig

    for name, stage in spec.stages.items():
        if isinstance(stage, TrainStage):
            if name in spec.teachers:
                raise SynthError(f"{path}: stage '{name}': a teacher has the same name; a trained model is a "
                                 "teacher under its stage's name, so rename one of them")
            spec.teachers[name] = HFTeacherConfig(backend="hf", model=f"<trained by stage {name}>",
                                                  batch_size=stage.batch_size)


def add_companion_stages(path: Path, spec: PipelineFile) -> None:
    from synth.evaluate import model_stages
    from synth.judge import critic_stage, critic_stage_name

    for name, stage in list(spec.stages.items()):
        if isinstance(stage, JudgeStage):
            companions = {critic_stage_name(name): critic_stage(stage, name)}
        elif isinstance(stage, EvaluateStage):
            companions = model_stages(stage, name)
        else:
            continue
        stage._name = name
        for extra, generate_stage in companions.items():
            if extra in spec.stages:
                raise SynthError(f"{path}: stage '{extra}': the name is taken by {stage.kind} stage '{name}' for "
                                 "its model calls; rename one of them")
            spec.stages[extra] = generate_stage


def stage_references(stage) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(key, the stage names it references, the kinds allowed there) for each reference of a stage."""
    if isinstance(stage, KeepStage):
        return [("input", [stage.input], ROWS), ("pass", stage.pass_, FILTER_KINDS)]
    if isinstance(stage, PairsStage):
        return [("input", [stage.input], ROWS), ("by", [stage.by] if stage.by else [], ("verify", "vote", "judge")),
                ("versus", [stage.versus] if stage.versus else [], ROWS)]
    if isinstance(stage, ExportStage):
        sources = ("pairs",) if stage.format == "dpo" else ("generate", "keep", "load") if stage.prompt else \
            ("generate", "keep")
        return [("input", [stage.input], sources)]
    if isinstance(stage, TrainStage):
        return [("data", [stage.data], ("export",)), ("init", [stage.init] if stage.init else [], ("train",))]
    if hasattr(stage, "input"):  # generate, evaluate and the filters read rows
        return [("input", [stage.input], ROWS)]
    return []


def check_references(path: Path, spec: PipelineFile, where) -> None:
    """Every reference names an existing stage of an allowed kind; every teacher exists. `where(name,
    key)` gives the "file:line: stage 'name'" prefix of an error."""
    for name, stage in spec.stages.items():
        for key, refs, kinds in stage_references(stage):
            for ref in refs:
                if ref not in spec.stages:
                    raise SynthError(f"{where(name, key)}: key '{key}': no stage named {ref!r} "
                                     f"(stages: {', '.join(spec.stages)})")
                kind = spec.stages[ref].kind
                if kind not in kinds:
                    hint = "; point at the stage it exports" if kind == "export" and key == "input" else \
                        f" for format {stage.format}" if isinstance(stage, ExportStage) else ""
                    raise SynthError(f"{where(name, key)}: key '{key}': {ref!r} is a {kind} stage; use a "
                                     f"{' or '.join(kinds)} stage{hint}")
        if isinstance(stage, PairsStage) and (stage.by is None) == (stage.versus is None):
            raise SynthError(f"{where(name)}: give exactly one of 'by' (a verify, vote or judge stage) or "
                             "'versus' (a stage of student samples)")
        if isinstance(stage, ExportStage) and stage.format != "dpo" and stage.rejected != "whole":
            raise SynthError(f"{where(name, 'rejected')}: key 'rejected' cuts the rejected answers of DPO pairs; "
                             f"it needs format: dpo (this export is format: {stage.format})")
        if isinstance(stage, TrainStage):
            _check_train(spec, name, stage, where, path)
        if isinstance(stage, GenerateStage) and isinstance(spec.stages.get(stage.teacher), TrainStage):
            stage._after = [stage.teacher]
        if isinstance(stage, GenerateStage) and stage.max_cost and stage.teacher in spec.teachers and \
                spec.teachers[stage.teacher].prices is None:
            raise SynthError(f"{where(name, 'max_cost')}: key 'max_cost': teacher {stage.teacher!r} has no prices; "
                             "add prices: {input: USD per 1M tokens, output: USD per 1M tokens} to it")
        teachers = stage.models if isinstance(stage, EvaluateStage) else \
            [stage.teacher] if isinstance(stage, (GenerateStage, JudgeStage)) else []
        key = "models" if isinstance(stage, EvaluateStage) else "teacher"
        for t in teachers:
            if t not in spec.teachers:
                raise SynthError(f"{where(name, key)}: key '{key}': no teacher named {t!r} "
                                 f"(teachers: {', '.join(spec.teachers) or 'none defined'})")
    for name, stage in spec.stages.items():  # once every reference is known to exist
        if isinstance(stage, KeepStage):
            _check_keep(spec, name, stage, where)


def rows_of(spec: PipelineFile, name: str) -> str:
    """The stage whose rows `name` carries: a filter's or keep's rows are its input's (followed down)."""
    seen = set()
    while spec.stages[name].kind in (*FILTER_KINDS, "keep") and name not in seen:
        seen.add(name)
        name = spec.stages[name].input
        if name not in spec.stages:
            break
    return name


def _check_keep(spec: PipelineFile, name: str, stage: KeepStage, where) -> None:
    """A keep selects its input's rows by the verdicts of its filters, matched on row id: a filter that
    judges other rows (another stage's) would match none, and the keep would silently keep nothing."""
    rows = rows_of(spec, stage.input)
    for f in stage.pass_:
        judged = rows_of(spec, spec.stages[f].input)
        if judged != rows:
            raise SynthError(f"{where(name, 'pass')}: key 'pass': filter {f!r} judges the rows of {judged!r}, but "
                             f"this keep selects rows of {rows!r} (input {stage.input!r}); a keep's filters must "
                             f"judge its input's rows: point {f!r}'s input at {rows!r} or drop it from 'pass'")


def _check_train(spec: PipelineFile, name: str, stage: TrainStage, where, path: Path) -> None:
    data = spec.stages[stage.data]
    if data.format != stage.method:
        raise SynthError(f"{where(name, 'data')}: key 'data': method {stage.method} trains on an export stage "
                         f"with format {stage.method}; {stage.data!r} has format {data.format}")
    if isinstance(spec.stages.get(stage.student), TrainStage):
        raise SynthError(f"{where(name, 'student')}: key 'student': {stage.student!r} is a train stage; to start "
                         "from its model use init: " + stage.student)
    if stage.init is None and stage.student is None:
        raise SynthError(f"{where(name)}: give 'student' (the base model) or 'init' (a train stage to start from)")
    recipe = path.parent / stage.recipe
    if not recipe.is_file():
        raise SynthError(f"{where(name, 'recipe')}: key 'recipe': no such file {recipe}")


# ---- checks that read more than the pipeline file, made before anything is written -----------------

def check_filter_sql(pipeline, name: str, expr: str, key: str) -> None:
    """A filter's SQL expression (`where:`, or a filters/NAME.sql file) parses and names only columns the
    input has. Bound against an empty in-memory table of the input's columns, so that a typo is one
    line now rather than a failed run after earlier stages wrote. Type errors are left to the run (the
    columns' types are not all known yet)."""
    import duckdb

    from synth.store import quote_ident

    columns = pipeline.columns[pipeline.stage(name).input]
    root = pipeline.root(pipeline.stage(name).input)
    template = pipeline.templates.get(root)
    open_columns = template is not None and template.spec.parse == "json"  # columns named by the answers
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"CREATE TABLE t ({', '.join(quote_ident(c) + ' VARCHAR' for c in columns)})")
        con.execute(f"SELECT CAST((\n{expr.strip().rstrip(';')}\n) AS BOOLEAN) FROM t LIMIT 0")
    except duckdb.ParserException as exc:
        raise SynthError(f"{pipeline.where(name)}: key '{key}': not a valid SQL expression: "
                         f"{one_line(exc)[:300]}") from None
    except duckdb.BinderException as exc:
        if "Referenced column" in str(exc) and not open_columns:
            raise SynthError(f"{pipeline.where(name)}: key '{key}': {one_line(exc)[:300]} (the input's "
                             f"columns: {', '.join(columns)})") from None
    except duckdb.Error:
        pass  # a type the run will know: checked then
    finally:
        con.close()


def check_before_writing(pipeline, names: list[str], console, force: bool = False) -> None:
    """What `synth run` checks once it knows which stages it runs, before it writes anything: every row
    whose prompt is known now (a generate stage or a dataset export reading a load stage) renders
    within the limits, and every Python filter file loads and defines judge. Warns (one line each)
    about load stages whose identical rows collapse into one."""
    from synth.config import ExportStage, FilterStage, GenerateStage, LoadStage
    from synth.pipeline import staleness

    stale = None
    for name in names:
        stage = pipeline.stage(name)
        if isinstance(stage, LoadStage) and pipeline.seeds[name].collapsed:
            stale = staleness(pipeline) if stale is None else stale
            if force or stale[name].stale:
                n = pipeline.seeds[name].collapsed
                console.print(f"warning: {pipeline.resolve(stage.path)}: {n} row{'s are' if n > 1 else ' is'} "
                              f"identical to an earlier row and collapsed into it (stage '{name}' keeps one row "
                              "per distinct content); give each row an `id` to keep them apart", markup=False,
                              highlight=False, soft_wrap=True)
        template = pipeline.templates.get(name)
        if template is not None and isinstance(stage, (GenerateStage, ExportStage)) and \
                isinstance(pipeline.stage(stage.input), LoadStage) and not getattr(stage, "_pairs_for", ""):
            from synth.errors import MissingValue

            for row in pipeline.seeds[stage.input].table.to_pylist():
                try:
                    template.render(row, where=f"{pipeline.where(name)}: input row id {row.get('id')!r}")
                except MissingValue:
                    if isinstance(stage, ExportStage):
                        raise
                    # a generate stage sends the other rows and records this one as an error row
        if isinstance(stage, FilterStage) and stage.use:
            from synth.filters import filter_path, load_filter_module

            path = filter_path(pipeline, name)
            if path.suffix == ".py":
                load_filter_module(path)


def check_filter(pipeline, name: str) -> None:
    """A filter stage's code, as far as it can be checked without running it: its file is UTF-8, its SQL
    (`where:` or a .sql file) parses and names existing columns (the .py file is imported by `synth run`
    before it writes: check_before_writing)."""
    from synth.config import FilterStage

    stage = pipeline.stage(name)
    if not isinstance(stage, FilterStage):
        return
    if stage.where is not None:
        if not stage.where.strip():
            raise SynthError(f"{pipeline.where(name)}: key 'where': the SQL expression is empty")
        check_filter_sql(pipeline, name, stage.where, "where")
        return
    from synth.filters import filter_path

    path = filter_path(pipeline, name)
    text = decode_utf8(path.read_bytes(), path)
    if path.suffix == ".sql":
        expr = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("--"))
        if not expr.strip():
            raise SynthError(f"{path}: holds no SQL expression (one boolean expression over the input's columns)")
        check_filter_sql(pipeline, name, expr, "use")
