"""The vote filter: self-consistency. The samples of one group (default: one input row's) agree on an
answer by plurality (synth/vote.py, one DuckDB query); no reference is needed. When half the groups or
more are all one text (the teacher did not sample), those groups fail `identical_samples`."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

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
    """The verdicts; when the teacher did not sample (synth/vote.py: half the groups all one text), those
    groups fail `identical_samples` (said in a warning): copies of one answer are no votes."""
    stage: VoteStage = ctx.graph.stage(name)
    text = "text" if "text" in ctx.graph.columns[stage.input] else None
    with ctx.store.read() as con:
        verdicts = vote(con, quote_ident(stage.input), stage.answer, stage.group_by, stage.method,
                        stage.min_agreement, text)
    copies = verdicts.filter(pc.equal(verdicts["reason"], "identical_samples")).num_rows
    if copies:
        ctx.console.print(f"  [yellow]{name}: warning: {copies} of {verdicts.num_rows} samples are in groups whose "
                          "samples are all the same text, so their agreement is no evidence (reason "
                          "identical_samples); the teacher did not sample: check temperature > 0 and that the "
                          "server honours it (`synth status` shows the generate stage's identical-sample share)"
                          "[/yellow]")
    return verdicts


KIND = filter_kind("vote", table=table, check=check)
