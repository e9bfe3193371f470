"""Filter stages: verify, vote, judge, dedup, decontaminate, filter — and keep, which selects by them.

Contract (DESIGN.md, "Nothing is deleted"):
- a filter stage reads its input stage's rows and writes exactly one verdict per row into
  synth.verdicts (passed, score, reason, details, and the filter's version: the hash of its config
  and of the filter file's bytes); re-running the stage replaces its verdicts in one transaction;
- the stage's view is the input's rows plus `passed`, `score`, `reason`;
- a keep stage is a view: the input's rows that passed every listed filter (with `strict: false`,
  a row a filter has not judged counts as passed for that filter).
Filters fail closed: what cannot be checked is `passed = false` with a reason, never a pass.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from synth.config import DecontaminateStage, DedupStage, FilterStage, JudgeStage, KeepStage, VerifyStage, VoteStage
from synth.errors import SynthError, one_line
from synth.ids import content_hash
from synth.paths import builtin_dir
from synth.seeds import file_fingerprint
from synth.store import Store, fetch_one, now, quote_ident, sql_str
from synth.verdicts import Verdict

VERDICT_COLUMNS = ["passed", "score", "reason"]


# ---- filter files: filters/NAME.sql (a boolean SQL expression) or filters/NAME.py (judge(row)) ------

def find_filter(name: str, workspace: Path) -> Path | None:
    """The workspace's filters/ first, then the built-ins."""
    for folder in (workspace / "filters", builtin_dir("filters")):
        for suffix in (".sql", ".py"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def builtin_filters() -> list[str]:
    folder = builtin_dir("filters")
    return sorted({p.stem for p in folder.glob("*") if p.suffix in (".sql", ".py")}) if folder.is_dir() else []


def filter_version(pipeline, name: str) -> str:
    """Hash of the stage's config and of the bytes of any file it reads (filter file, eval files)."""
    stage = pipeline.stage(name)
    parts = {"config": stage.model_dump(mode="json", exclude={"description"})}
    if isinstance(stage, FilterStage) and stage.use:
        parts["file"] = content_hash(filter_path(pipeline, name).read_text(encoding="utf-8"))
    if isinstance(stage, DecontaminateStage):
        parts["against"] = {f: file_fingerprint(pipeline.resolve(f)) for f in stage.against}
    return content_hash(parts)


def filter_path(pipeline, name: str) -> Path:
    stage: FilterStage = pipeline.stage(name)
    path = find_filter(stage.use, pipeline.base_dir)
    if path is None:
        raise SynthError(f"{pipeline.where(name)}: key 'use': no filter {stage.use!r}: looked for "
                         f"{pipeline.base_dir / 'filters' / stage.use}.sql|.py and the built-ins "
                         f"({', '.join(builtin_filters()) or 'none'})")
    return path


def validate(pipeline, name: str, input_columns: list[str]) -> None:
    """Checks that need no store: referenced columns exist, files exist. Raises SynthError (one line)."""
    stage = pipeline.stage(name)
    where = pipeline.where(name)

    def need(key: str, column: str | None) -> None:
        if column is not None and column not in input_columns:
            raise SynthError(f"{where}: key '{key}': the input has no column {column!r} "
                             f"(its columns: {', '.join(input_columns)})")

    taken = [c for c in VERDICT_COLUMNS if c in input_columns]
    if taken and not isinstance(stage, KeepStage):
        raise SynthError(f"{where}: key 'input': the input already has a column {taken[0]!r}, which a filter's "
                         "view adds (passed, score, reason); rename that column in the input")
    if isinstance(stage, VerifyStage):
        need("answer", stage.answer)
        if stage.reference == stage.answer:
            raise SynthError(f"{where}: key 'reference': it names the same column as 'answer' ({stage.answer!r}), "
                             "so every row would match itself; in a generate stage's rows the input's own column "
                             f"is 'input_{stage.answer}'")
        if stage.method == "code":
            if not stage.tests:
                raise SynthError(f"{where}: key 'tests': method code needs the column with the tests")
            need("tests", stage.tests)
        else:
            if not stage.reference:
                raise SynthError(f"{where}: key 'reference': method {stage.method} needs the column with "
                                 "the reference answer")
            need("reference", stage.reference)
        check_extract(where, stage.extract, stage.pattern, stage.field)
    elif isinstance(stage, JudgeStage):
        if stage.mode == "pairwise":
            need("group_by", stage.group_by)
            need("mode", "text")
    elif isinstance(stage, VoteStage):
        need("answer", stage.answer)
        need("group_by", stage.group_by)
    elif isinstance(stage, DedupStage):
        need("column", stage.column)
    elif isinstance(stage, DecontaminateStage):
        for c in stage.columns:
            need("columns", c)
        for f in stage.against:
            if not pipeline.resolve(f).is_file():
                raise SynthError(f"{where}: key 'against': no such file {pipeline.resolve(f)}")
    elif isinstance(stage, FilterStage):
        if (stage.where is None) == (stage.use is None):
            raise SynthError(f"{where}: give exactly one of 'where' (a SQL expression) or 'use' (a filter file)")
        if stage.use:
            path = filter_path(pipeline, name)
            if path.suffix == ".sql" and stage.args:
                raise SynthError(f"{where}: key 'args': {path.name} is a SQL filter; args are for .py filters")


def check_extract(where: str, extract: str, pattern: str | None, field: str | None, prefix: str = "") -> None:
    """The answer-extraction keys of a verify stage (or of an evaluate stage's `verify:`, prefix
    "verify."): regex needs a valid pattern, json a field."""
    if extract == "regex" and not pattern:
        raise SynthError(f"{where}: key '{prefix}pattern': extract regex needs a pattern")
    if extract == "json" and not field:
        raise SynthError(f"{where}: key '{prefix}field': extract json needs the field to read")
    if pattern:
        import re
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SynthError(f"{where}: key '{prefix}pattern': not a valid regular expression ({exc})") from None


# ---- running a filter stage ------------------------------------------------------------------------

def run_stage(pipeline, name: str, run_id: str, console: Console) -> dict:
    from synth import vote

    stage = pipeline.stage(name)
    store = pipeline.store
    source = quote_ident(stage.input)
    if isinstance(stage, VoteStage):
        with store.read() as con:
            table = vote.vote(con, source, stage.answer, stage.group_by, stage.method, stage.min_agreement)
    elif isinstance(stage, FilterStage) and (stage.where or filter_path(pipeline, name).suffix == ".sql"):
        expr = stage.where if stage.where else "\n".join(
            ln for ln in filter_path(pipeline, name).read_text(encoding="utf-8").splitlines()
            if not ln.strip().startswith("--"))
        label = "where" if stage.where else stage.use
        table = _sql_filter(pipeline, name, source, expr, label)
    else:
        rows = _rows(store, source, getattr(stage, "order_by", None) or _default_order(pipeline, stage.input))
        ids = [str(r["id"]) for r in rows]
        verdicts = _judge_rows(pipeline, name, rows, console)
        assert len(verdicts) == len(rows), f"{name}: {len(verdicts)} verdicts for {len(rows)} rows"
        table = verdict_table(ids, verdicts)
    return write_verdicts(pipeline, name, table, run_id, console)


def verdict_table(ids: list[str], verdicts: list[Verdict]) -> pa.Table:
    from synth.secrets import scrub

    def details(v: Verdict) -> str | None:
        # a verifier's or critic's details (a program's output, a server's message) may hold an API key
        if v.details is None:
            return None
        text = json.dumps(v.details, ensure_ascii=False, default=str)
        clean = scrub(text)
        if clean != text:
            try:
                json.loads(clean)
            except ValueError:  # a key with quotes or backslashes in it: keep the scrubbed text as a JSON string
                clean = json.dumps(clean, ensure_ascii=False)
        return clean

    return pa.table({
        "row_id": pa.array(ids, pa.string()),
        "passed": pa.array([v.passed for v in verdicts], pa.bool_()),
        "score": pa.array([None if v.score is None else float(v.score) for v in verdicts], pa.float64()),
        "reason": pa.array([scrub(v.reason) for v in verdicts], pa.string()),
        "details": pa.array([details(v) for v in verdicts], pa.string())})


def write_verdicts(pipeline, name: str, table: pa.Table, run_id: str, console: Console) -> dict:
    from synth.pipeline import record_stage

    version = filter_version(pipeline, name)
    n = table.num_rows
    table = table.append_column("stage", pa.array([name] * n, pa.string())) \
                 .append_column("version", pa.array([version] * n, pa.string())) \
                 .append_column("run_id", pa.array([run_id] * n, pa.string())) \
                 .append_column("created_at", pa.array([now()] * n, pa.timestamp("us")))
    passed = int(pc.sum(table["passed"]).as_py() or 0)
    with pipeline.store.write() as con:
        # history: earlier runs' verdicts stay; synth.verdicts shows this run's once the stage is recorded
        Store.insert_arrow(con, "synth.verdict_history", table, mode="")
        create_view(con, pipeline, name)
        record_stage(con, pipeline, name, "done", n, run_id, judged=n, passed=passed, version=version)
    console.print(f"  {name}: {n} rows judged · {passed} passed · {n - passed} rejected")
    return {"rows": n, "judged": n, "passed": passed}


def create_view(con, pipeline, name: str) -> None:
    stage = pipeline.stage(name)
    src = quote_ident(stage.input)
    if isinstance(stage, KeepStage):
        stages = ", ".join(sql_str(s) for s in stage.pass_)
        if stage.strict:
            cond = (f"(SELECT count(*) FROM synth.verdicts v WHERE v.row_id = CAST(i.id AS VARCHAR) AND v.stage IN "
                    f"({stages}) AND v.passed) = {len(set(stage.pass_))}")
        else:
            cond = (f"NOT EXISTS (SELECT 1 FROM synth.verdicts v WHERE v.row_id = CAST(i.id AS VARCHAR) AND "
                    f"v.stage IN ({stages}) AND NOT v.passed)")
        Store.replace_view(con, name, f"SELECT i.* FROM {src} i WHERE {cond}")
        return
    Store.replace_view(con, name, (
        f"SELECT i.*, v.passed, v.score, v.reason FROM {src} i JOIN synth.verdicts v "
        f"ON v.row_id = CAST(i.id AS VARCHAR) AND v.stage = {sql_str(name)}"))


def run_keep(pipeline, name: str, run_id: str, console: Console) -> dict:
    from synth.pipeline import record_stage

    with pipeline.store.write() as con:
        create_view(con, pipeline, name)
        rows = fetch_one(con, f"SELECT count(*) FROM {quote_ident(name)}")[0]
        total = fetch_one(con, f"SELECT count(*) FROM {quote_ident(pipeline.stage(name).input)}")[0]
        record_stage(con, pipeline, name, "done", rows, run_id, of=total)
    console.print(f"  {name}: kept {rows} of {total} rows")
    return {"rows": rows, "of": total}


# ---- the kinds -----------------------------------------------------------------------------------------

def _rows(store: Store, source: str, order_by: str) -> list[dict]:
    with store.read() as con:
        try:
            return con.sql(f"SELECT * FROM {source} ORDER BY {order_by}").to_arrow_table().to_pylist()
        except Exception as exc:  # noqa: BLE001 - duckdb raises several types for a bad ORDER BY
            raise SynthError(f"reading {source} ordered by {order_by!r}: {one_line(exc)[:300]}") from None


def _default_order(pipeline, input_name: str) -> str:
    """A stable order: generation rows by (input row, sample), other rows by id."""
    cols = pipeline.columns.get(input_name, [])
    return "input_id, sample, id" if "input_id" in cols and "sample" in cols else "id"


def _judge_rows(pipeline, name: str, rows: list[dict], console: Console) -> list[Verdict]:
    stage = pipeline.stage(name)
    if isinstance(stage, VerifyStage):
        return _verify(stage, rows)
    if isinstance(stage, DedupStage):
        from synth import dedup

        ids = [str(r["id"]) for r in rows]
        texts = [r.get(stage.column) for r in rows]
        if stage.near is None:
            return dedup.exact_duplicates(ids, texts)
        return dedup.near_duplicates(ids, texts, threshold=stage.near, num_perm=stage.num_perm, shingle=stage.shingle)
    if isinstance(stage, DecontaminateStage):
        from synth import dedup

        against = {f: dedup.read_eval_texts(pipeline.resolve(f), stage.eval_columns) for f in stage.against}
        texts = ["\n".join(str(r.get(c) or "") for c in stage.columns) for r in rows]
        return dedup.decontaminate([str(r["id"]) for r in rows], texts, against, n=stage.ngram)
    if isinstance(stage, FilterStage):
        return _python_filter(pipeline, name, rows)
    if isinstance(stage, JudgeStage):
        from synth import judge

        return judge.verdicts(pipeline, name, rows)
    raise AssertionError(f"not a filter kind: {stage.kind}")


def _verify(stage: VerifyStage, rows: list[dict]) -> list[Verdict]:
    from synth import sandbox, verify

    if stage.method == "code":  # run_code extracts the code (a fenced block) from the answer itself
        items = [(r.get(stage.answer), r.get(stage.tests)) for r in rows]
        return sandbox.run_code_many(items, timeout_s=stage.timeout_s, memory_mb=stage.memory_mb, workers=stage.workers)
    out = []
    for r in rows:
        raw = r.get(stage.answer)
        answer = verify.extract_answer(None if raw is None else str(raw), stage.extract, stage.pattern, stage.field)
        ref = r.get(stage.reference)
        out.append(verify.compare(answer, None if ref is None else str(ref), stage.method, stage.tolerance))
    return out


def _sql_filter(pipeline, name: str, source: str, expr: str, label: str) -> pa.Table:
    """A boolean SQL expression over the input's columns; NULL fails closed (reason `<label>:null`)."""
    expr = expr.strip().rstrip(";")
    sql = (f"SELECT CAST(id AS VARCHAR) AS row_id, coalesce(ok, false) AS passed, "
           f"CASE WHEN ok THEN 1.0 ELSE 0.0 END AS score, "
           f"CASE WHEN ok THEN NULL WHEN ok IS NULL THEN {sql_str(label + ':null')} ELSE {sql_str(label)} END AS reason, "
           f"NULL::VARCHAR AS details FROM (SELECT id, CAST((\n{expr}\n) AS BOOLEAN) AS ok FROM {source})")
    with pipeline.store.read() as con:
        try:
            return con.sql(sql).to_arrow_table()
        except Exception as exc:  # noqa: BLE001 - any DuckDB error here is the user's expression
            key = "where" if label == "where" else "use"
            raise SynthError(f"{pipeline.where(name)}: key '{key}': the SQL expression failed: "
                             f"{one_line(exc)[:300]}") from None


def _python_filter(pipeline, name: str, rows: list[dict]) -> list[Verdict]:
    """filters/NAME.py defines judge(row, **args) -> bool | (bool, reason) [| (bool, reason, score)],
    or judge_batch(rows, **args) -> list of those. A False without a reason gets the filter's name."""
    stage: FilterStage = pipeline.stage(name)
    path = filter_path(pipeline, name)
    module = load_filter_module(path)
    batch, single = getattr(module, "judge_batch", None), getattr(module, "judge", None)
    try:
        results = batch(rows, **stage.args) if callable(batch) else [single(r, **stage.args) for r in rows]
        results = list(results)
    except TypeError as exc:
        raise SynthError(f"{path}: {exc} (check the stage's 'args')") from None
    except Exception as exc:  # noqa: BLE001
        raise SynthError(f"{path}: the filter raised {type(exc).__name__}: {exc}") from None
    if len(results) != len(rows):
        raise SynthError(f"{path}: judge_batch returned {len(results)} results for {len(rows)} rows; return one per row")
    return [as_verdict(r, stage.use, path) for r in results]


def load_filter_module(path: Path):
    """Import a filters/NAME.py file; it must define judge(row) or judge_batch(rows)."""
    spec = importlib.util.spec_from_file_location(f"synth_filter_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the filter file is the user's code
        raise SynthError(f"{path}: cannot load the filter: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(module, "judge_batch", None)) and not callable(getattr(module, "judge", None)):
        raise SynthError(f"{path}: define judge(row) or judge_batch(rows)")
    return module


def as_verdict(result, label: str, path: Path) -> Verdict:
    """A filter's answer as a Verdict; anything else is the filter's bug, reported in one line (never a
    NULL `passed`, which a lenient keep would count as a pass)."""
    if isinstance(result, Verdict) and isinstance(result.passed, bool):
        return result
    if isinstance(result, bool):
        return Verdict.ok(1.0) if result else Verdict.fail(label, 0.0)
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        ok, reason = result[0], (result[1] if len(result) > 1 else None)
        try:
            score = float(result[2]) if len(result) > 2 and result[2] is not None else (1.0 if ok else 0.0)
        except (TypeError, ValueError):
            raise SynthError(f"{path}: judge returned score {result[2]!r}; a score is a number") from None
        return Verdict.ok(score) if ok else Verdict.fail(str(reason or label), score)
    raise SynthError(f"{path}: judge returned {result!r}; return a bool, (bool, reason) or (bool, reason, score)")
