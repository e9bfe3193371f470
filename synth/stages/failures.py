"""The failures stage: the rows an evaluate stage's model got wrong, as rows (a view).

    failed: {kind: failures, input: probe, model: student}      # probe: an evaluate stage
    more:   {kind: generate, input: failed, teacher: teacher, prompt: solve, samples: 8}

Its rows are the evaluate stage's input rows (same ids and columns) on which `model`'s outputs failed:
every output (`failed: all`, the default; with one greedy output, that output) or at least one (`any`).
Because the evaluate stage is its input, it runs after it and goes stale with it: a generate stage that
reads it is targeted at exactly the current failures (the round loop of ARCHITECTURE.md, `rounds:`),
with no hidden dependency (a SQL subquery on synth.evaluations in a filter would have none).
"""

from __future__ import annotations

from synth.config import FailuresStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import Graph, Kind, Ref
from synth.store import Store, fetch_one, quote_ident, sql_str


def references(stage: FailuresStage, stages) -> list[Ref]:
    return [Ref("input", (stage.input,), ("evaluate",), hint="the failures of an evaluate stage's model")]


def check(graph: Graph, name: str) -> list[str]:
    stage: FailuresStage = graph.stage(name)
    evaluate = graph.stage(stage.input)
    if stage.model not in evaluate.models:
        raise SynthError(f"{graph.where(name, 'model')}: key 'model': evaluate stage {stage.input!r} does not "
                         f"evaluate {stage.model!r} (its models: {', '.join(evaluate.models)})")
    return graph.columns[evaluate.input]


def select_sql(graph: Graph, name: str) -> str:
    stage: FailuresStage = graph.stage(name)
    rows = quote_ident(graph.stage(stage.input).input)
    outcome = "NOT bool_or(passed)" if stage.failed == "all" else "NOT bool_and(passed)"
    return (f"SELECT i.* FROM {rows} i WHERE CAST(i.id AS VARCHAR) IN (SELECT input_id FROM synth.evaluations "
            f"WHERE stage = {sql_str(stage.input)} AND model = {sql_str(stage.model)} GROUP BY input_id "
            f"HAVING {outcome})")


def run(ctx: RunContext, name: str) -> dict:
    stage: FailuresStage = ctx.graph.stage(name)
    evaluate = ctx.graph.stage(stage.input)
    with ctx.store.write() as con:
        Store.replace_view(con, name, select_sql(ctx.graph, name))
        rows = fetch_one(con, f"SELECT count(*) FROM {quote_ident(name)}")[0]
        total = fetch_one(con, f"SELECT count(*) FROM {quote_ident(evaluate.input)}")[0]
        ctx.record(con, name, "done", rows, of=total)
    ctx.console.print(f"  {name}: {stage.model} failed {rows} of {total} rows of {evaluate.input!r}")
    return {"rows": rows, "of": total}


# `model` names a model (a teacher, or a train stage by its name), like an evaluate stage's `models`
KIND = Kind(name="failures", run=run, references=references, check=check,
            teachers=lambda stage: [("model", [stage.model])])
