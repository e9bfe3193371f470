"""The keep stage: a view of the input's rows that passed every filter in `pass` (with `strict: false`,
a row a filter has not judged counts as passed for that filter). Nothing is deleted: the rejected rows
stay in the input and their verdicts in synth.verdicts."""

from __future__ import annotations

from synth.config import KeepStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import ROWS, Graph, Kind, Ref
from synth.store import Store, fetch_one, quote_ident, sql_str
from synth.verdict_store import top_rejections


def references(stage: KeepStage, stages) -> list[Ref]:
    return [Ref("input", (stage.input,), ROWS), Ref("pass", tuple(stage.pass_), filters=True)]


def check(graph: Graph, name: str) -> list[str]:
    """A keep selects its input's rows by the verdicts of its filters, matched on row id: a filter that
    judges other rows (another stage's) would match none, and the keep would silently keep nothing."""
    stage: KeepStage = graph.stage(name)
    rows = graph.root(stage.input)
    for f in stage.pass_:
        judged = graph.root(graph.stage(f).input)
        if judged != rows:
            raise SynthError(f"{graph.where(name, 'pass')}: key 'pass': filter {f!r} judges the rows of {judged!r}, "
                             f"but this keep selects rows of {rows!r} (input {stage.input!r}); a keep's filters must "
                             f"judge its input's rows: point {f!r}'s input at {rows!r} or drop it from 'pass'")
    return graph.columns[stage.input]


def run(ctx: RunContext, name: str) -> dict:
    stage: KeepStage = ctx.graph.stage(name)
    src = quote_ident(stage.input)
    stages = ", ".join(sql_str(s) for s in stage.pass_)
    if stage.strict:
        cond = (f"(SELECT count(*) FROM synth.verdicts v WHERE v.row_id = CAST(i.id AS VARCHAR) AND v.stage IN "
                f"({stages}) AND v.passed) = {len(set(stage.pass_))}")
    else:
        cond = (f"NOT EXISTS (SELECT 1 FROM synth.verdicts v WHERE v.row_id = CAST(i.id AS VARCHAR) AND "
                f"v.stage IN ({stages}) AND NOT v.passed)")
    with ctx.store.write() as con:
        Store.replace_view(con, name, f"SELECT i.* FROM {src} i WHERE {cond}")
        rows = fetch_one(con, f"SELECT count(*) FROM {quote_ident(name)}")[0]
        total = fetch_one(con, f"SELECT count(*) FROM {src}")[0]
        ctx.record(con, name, "done", rows, of=total)
        reasons = top_rejections(con, list(stage.pass_)) if total and not rows else ""
    ctx.console.print(f"  {name}: kept {rows} of {total} rows")
    if total and not rows:
        ctx.console.print(f"  [bold yellow]{name}: warning: kept none of {total} rows; the filters rejected them all "
                          f"(most often: {reasons or 'no verdicts'}). `synth stats` shows the funnel, "
                          f"`synth why <id>` one row[/bold yellow]", highlight=False)
    return {"rows": rows, "of": total}


KIND = Kind(name="keep", run=run, references=references, check=check, same_rows=True)
