"""The filter stage: a SQL boolean expression over the input's columns (`where:`), or a filter file
(`use: NAME` -> filters/NAME.sql | filters/NAME.py, synth/filterfiles.py) with keyword `args`.
SQL that is NULL for a row fails closed with reason `<label>:null`. The file's bytes are part of the
filter's version (and fingerprint)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from synth.config import FilterStage
from synth.context import RunContext
from synth.errors import SynthError, decode_utf8, one_line
from synth.filterfiles import as_verdict, check_sql, filter_file, load_filter_module, sql_expression
from synth.graph import Graph
from synth.ids import content_hash
from synth.store import quote_ident, sql_str
from synth.verdict_store import filter_kind
from synth.verdicts import Verdict


def filter_path(graph: Graph, name: str) -> Path:
    return filter_file(graph.stage(name).use, graph.base_dir, graph.where(name, "use"))


def check(graph: Graph, name: str) -> None:
    """Exactly one of where/use; the file exists and is UTF-8; its SQL (`where:` or a .sql file) parses and
    names existing columns. A .py file is imported by `synth run` before it writes (preflight)."""
    stage: FilterStage = graph.stage(name)
    if (stage.where is None) == (stage.use is None):
        raise SynthError(f"{graph.where(name)}: give exactly one of 'where' (a SQL expression) or 'use' (a filter "
                         "file)")
    if stage.where is not None:
        if not stage.where.strip():
            raise SynthError(f"{graph.where(name, 'where')}: key 'where': the SQL expression is empty")
        _check_sql(graph, name, stage.where, "where")
        return
    path = filter_path(graph, name)
    if path.suffix == ".sql" and stage.args:
        raise SynthError(f"{graph.where(name, 'args')}: key 'args': {path.name} is a SQL filter; args are for .py "
                         "filters")
    if path.suffix != ".sql":
        decode_utf8(path.read_bytes(), path)  # a .py file is imported by `synth run` before it writes (preflight)
        return
    expr = sql_expression(path)  # UTF-8 checked
    if not expr.strip():
        raise SynthError(f"{path}: holds no SQL expression (one boolean expression over the input's columns)")
    _check_sql(graph, name, expr, "use")


def _check_sql(graph: Graph, name: str, expr: str, key: str) -> None:
    root = graph.root(graph.stage(name).input)
    template = graph.templates.get(root)
    open_columns = template is not None and template.spec.parse == "json"  # columns named by the answers
    check_sql(expr, graph.columns[graph.stage(name).input], graph.where(name, key), key, open_columns)


def preflight(graph: Graph, name: str, trained, console, will_run: bool) -> None:
    """A Python filter file loads and defines judge or judge_batch, before anything is written."""
    if graph.stage(name).use:
        path = filter_path(graph, name)
        if path.suffix == ".py":
            load_filter_module(path)


def _is_sql(graph: Graph, name: str) -> bool:
    stage: FilterStage = graph.stage(name)
    return stage.where is not None or filter_path(graph, name).suffix == ".sql"


def sql_table(ctx: RunContext, name: str) -> pa.Table | None:
    """A SQL filter's verdict table, evaluated in DuckDB; None for a Python filter (python_verdicts)."""
    stage: FilterStage = ctx.graph.stage(name)
    if _is_sql(ctx.graph, name):
        expr = stage.where if stage.where is not None else sql_expression(filter_path(ctx.graph, name))
        return _sql_filter(ctx, name, expr, "where" if stage.where is not None else stage.use)
    return None


def _sql_filter(ctx: RunContext, name: str, expr: str, label: str) -> pa.Table:
    """A boolean SQL expression over the input's columns; NULL fails closed (reason `<label>:null`)."""
    expr = expr.strip().rstrip(";")
    source = quote_ident(ctx.graph.stage(name).input)
    sql = (f"SELECT CAST(id AS VARCHAR) AS row_id, coalesce(ok, false) AS passed, "
           f"CASE WHEN ok THEN 1.0 ELSE 0.0 END AS score, "
           f"CASE WHEN ok THEN NULL WHEN ok IS NULL THEN {sql_str(label + ':null')} ELSE {sql_str(label)} END AS reason, "
           f"NULL::VARCHAR AS details FROM (SELECT id, CAST((\n{expr}\n) AS BOOLEAN) AS ok FROM {source})")
    with ctx.store.read() as con:
        try:
            return con.sql(sql).to_arrow_table()
        except Exception as exc:  # noqa: BLE001 - any DuckDB error here is the user's expression
            key = "where" if label == "where" else "use"
            raise SynthError(f"{ctx.graph.where(name, key)}: key '{key}': the SQL expression failed: "
                             f"{one_line(exc)[:300]}") from None


def python_verdicts(ctx: RunContext, name: str, rows: list[dict]) -> list[Verdict]:
    """filters/NAME.py defines judge(row, **args) -> bool | (bool, reason) [| (bool, reason, score)],
    or judge_batch(rows, **args) -> list of those. A False without a reason gets the filter's name."""
    stage: FilterStage = ctx.graph.stage(name)
    path = filter_path(ctx.graph, name)
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


def _files(graph: Graph, name: str) -> dict:
    if not graph.stage(name).use:
        return {}
    return {"file": content_hash(filter_path(graph, name).read_text(encoding="utf-8"))}


def _reads(graph: Graph, name: str) -> dict:
    if not graph.stage(name).use:
        return {}
    try:
        return {filter_path(graph, name): f"the filter file of stage '{name}'"}
    except SynthError:
        return {}


KIND = filter_kind("filter", judge_rows=python_verdicts, table=sql_table, check=check, files=_files, reads=_reads,
                   preflight=preflight)
