"""The vote filter: self-consistency. The samples of one group (default: one input row's) agree on an
answer by plurality (synth/vote.py, one DuckDB query); no reference is needed."""

from __future__ import annotations

import pyarrow as pa

from synth.config import VoteStage
from synth.context import RunContext
from synth.graph import Graph
from synth.store import quote_ident
from synth.verdict_store import filter_kind, need_column
from synth.vote import vote


def check(graph: Graph, name: str) -> None:
    stage: VoteStage = graph.stage(name)
    need_column(graph, name, "answer", stage.answer)
    need_column(graph, name, "group_by", stage.group_by)


def table(ctx: RunContext, name: str) -> pa.Table:
    stage: VoteStage = ctx.graph.stage(name)
    with ctx.store.read() as con:
        return vote(con, quote_ident(stage.input), stage.answer, stage.group_by, stage.method, stage.min_agreement)


KIND = filter_kind("vote", table=table, check=check)
