"""The decontaminate filter: n-gram overlap of rows with evaluation files (synth/dedup.py). The files'
bytes are part of the filter's version, so an edited eval set re-runs the stage."""

from __future__ import annotations

from synth.config import DecontaminateStage
from synth.context import RunContext
from synth.dedup import decontaminate, read_eval_texts
from synth.errors import SynthError
from synth.graph import Graph
from synth.seeds import file_fingerprint
from synth.verdict_store import filter_kind, need_column
from synth.verdicts import Verdict


def check(graph: Graph, name: str) -> None:
    stage: DecontaminateStage = graph.stage(name)
    for c in stage.columns:
        need_column(graph, name, "columns", c)
    for f in stage.against:
        if not graph.resolve(f).is_file():
            raise SynthError(f"{graph.where(name, 'against')}: key 'against': no such file {graph.resolve(f)}")


def verdicts(ctx: RunContext, name: str, rows: list[dict]) -> list[Verdict]:
    stage: DecontaminateStage = ctx.graph.stage(name)
    against = {f: read_eval_texts(ctx.graph.resolve(f), stage.eval_columns) for f in stage.against}
    texts = ["\n".join(str(r.get(c) or "") for c in stage.columns) for r in rows]
    return decontaminate([str(r["id"]) for r in rows], texts, against, n=stage.ngram)


KIND = filter_kind(
    "decontaminate", judge_rows=verdicts, check=check,
    files=lambda graph, name: {"against": {f: file_fingerprint(graph.resolve(f)) for f in graph.stage(name).against}},
    reads=lambda graph, name: {graph.resolve(f): f"an evaluation file of stage '{name}'"
                               for f in graph.stage(name).against},
)
