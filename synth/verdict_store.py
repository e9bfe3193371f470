"""What every filter kind shares (verify, vote, judge, dedup, decontaminate, filter): verdicts in the
store, the filter's view, its load-time column checks, and `filter_kind`, which builds a filter's
Kind declaration.

Contract (DESIGN.md, "Nothing is deleted"):
- a filter stage reads its input stage's rows and writes exactly one verdict per row (passed, score,
  reason, details, and the filter's version: the hash of its config and of the files it reads) into
  synth.verdict_history; synth.verdicts shows the rows of the stage's current run;
- the stage's view is the input's rows plus `passed`, `score`, `reason`.
Filters fail closed: what cannot be checked is `passed = false` with a reason, never a pass.
"""

from __future__ import annotations

import json
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from synth.context import RunContext
from synth.errors import SynthError, one_line
from synth.graph import Graph, Kind, without_later_keys
from synth.ids import content_hash
from synth.secrets import scrub
from synth.store import Store, now, quote_ident, rejection_reasons, sql_str
from synth.verdicts import Verdict

VERDICT_COLUMNS = ["passed", "score", "reason"]


def version(graph: Graph, name: str, files: dict | None = None) -> str:
    """A filter's version: the hash of its config and of what it reads from files (`files`)."""
    config = without_later_keys(graph.kind(name), graph.stage(name).model_dump(mode="json", exclude={"description"}))
    return content_hash({"config": config, **(files or {})})


def need_column(graph: Graph, name: str, key: str, column: str | None) -> None:
    """Load-time check: the stage's input has `column` (named by key `key`)."""
    columns = graph.columns[graph.stage(name).input]
    if column is not None and column not in columns:
        raise SynthError(f"{graph.where(name, key)}: key '{key}': the input has no column {column!r} "
                         f"(its columns: {', '.join(columns)})")


def filter_kind(name: str, *, judge_rows: Callable[[RunContext, str, list[dict]], list[Verdict]] | None = None,
                table: Callable[[RunContext, str], pa.Table | None] | None = None,
                check: Callable[[Graph, str], None] = lambda graph, name: None,
                files: Callable[[Graph, str], dict] = lambda graph, name: {},
                **declared) -> Kind:
    """A filter's Kind: it reads its input's rows (in `order_by` when the config has one, else a stable
    order) and judges them with `judge_rows` (one Verdict per row, same order), or builds the verdict
    table itself with `table` (SQL filters, voting; a `table` that returns None leaves it to
    `judge_rows`). `check` adds the kind's own load-time checks;
    `files` the parts of its version that come from files."""
    def run(ctx: RunContext, stage_name: str) -> dict:
        verdicts = table(ctx, stage_name) if table is not None else None
        if verdicts is None:
            stage = ctx.graph.stage(stage_name)
            rows = read_rows(ctx, quote_ident(stage.input),
                             getattr(stage, "order_by", None) or default_order(ctx.graph, stage.input))
            judged = judge_rows(ctx, stage_name, rows)
            assert len(judged) == len(rows), f"{stage_name}: {len(judged)} verdicts for {len(rows)} rows"
            verdicts = verdict_table([str(r["id"]) for r in rows], judged)
        return write_verdicts(ctx, stage_name, verdicts, version(ctx.graph, stage_name, files(ctx.graph, stage_name)))

    def check_filter(graph: Graph, stage_name: str) -> list[str]:
        columns = graph.columns[graph.stage(stage_name).input]
        taken = [c for c in VERDICT_COLUMNS if c in columns]
        if taken:
            raise SynthError(f"{graph.where(stage_name, 'input')}: key 'input': the input already has a column "
                             f"{taken[0]!r}, which a filter's view adds (passed, score, reason); rename that column "
                             "in the input")
        check(graph, stage_name)
        return columns + VERDICT_COLUMNS

    return Kind(name=name, run=run, check=check_filter, same_rows=True, verdicts=True,
                fingerprint=lambda graph, stage_name, trained: {
                    "filter": version(graph, stage_name, files(graph, stage_name))},
                **declared)


def read_rows(ctx: RunContext, source: str, order_by: str) -> list[dict]:
    with ctx.store.read() as con:
        try:
            return con.sql(f"SELECT * FROM {source} ORDER BY {order_by}").to_arrow_table().to_pylist()
        except Exception as exc:  # noqa: BLE001 - duckdb raises several types for a bad ORDER BY
            raise SynthError(f"reading {source} ordered by {order_by!r}: {one_line(exc)[:300]}") from None


def default_order(graph: Graph, input_name: str) -> str:
    """A stable order: generation rows by (input row, sample), other rows by id."""
    cols = graph.columns.get(input_name, [])
    return "input_id, sample, id" if "input_id" in cols and "sample" in cols else "id"


def verdict_table(ids: list[str], verdicts: list[Verdict]) -> pa.Table:
    """Verdict rows (row_id, passed, score, reason, details), API keys scrubbed from reasons and details."""
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


def write_verdicts(ctx: RunContext, name: str, table: pa.Table, filter_version: str) -> dict:
    """Append a run's verdicts to synth.verdict_history, (re)create the stage's view and record the
    stage, in one transaction."""
    n = table.num_rows
    table = table.append_column("stage", pa.array([name] * n, pa.string())) \
                 .append_column("version", pa.array([filter_version] * n, pa.string())) \
                 .append_column("run_id", pa.array([ctx.run_id] * n, pa.string())) \
                 .append_column("created_at", pa.array([now()] * n, pa.timestamp("us")))
    passed = int(pc.sum(table["passed"]).as_py() or 0)
    with ctx.store.write() as con:
        # history: earlier runs' verdicts stay; synth.verdicts shows this run's once the stage is recorded
        Store.insert_arrow(con, "synth.verdict_history", table, mode="")
        Store.replace_view(con, name, (
            f"SELECT i.*, v.passed, v.score, v.reason FROM {quote_ident(ctx.graph.stage(name).input)} i "
            f"JOIN synth.verdicts v ON v.row_id = CAST(i.id AS VARCHAR) AND v.stage = {sql_str(name)}"))
        ctx.record(con, name, "done", n, judged=n, passed=passed, version=filter_version)
    ctx.console.print(f"  {name}: {n} rows judged · {passed} passed · {n - passed} rejected")
    return {"rows": n, "judged": n, "passed": passed}


def top_rejections(con, stages: list[str], limit: int = 3) -> str:
    """The most frequent rejection reasons, for a warning: "judge: low_score 12, verify: wrong_answer 3"
    ('' when none)."""
    return ", ".join(f"{stage}: {reason} {n}" for stage, reason, n in rejection_reasons(con, stages, limit))
