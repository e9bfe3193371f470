"""The dedup filter: exact (normalised text) and, with `near`, MinHash-LSH near-duplicates
(synth/dedup.py); the first row in `order_by` order wins, the others fail `duplicate_of:<id>`."""

from __future__ import annotations

from synth.config import DedupStage
from synth.context import RunContext
from synth.dedup import exact_duplicates, near_duplicates
from synth.graph import Graph
from synth.verdict_store import filter_kind, need_column
from synth.verdicts import Verdict


def check(graph: Graph, name: str) -> None:
    need_column(graph, name, "column", graph.stage(name).column)


def verdicts(ctx: RunContext, name: str, rows: list[dict]) -> list[Verdict]:
    stage: DedupStage = ctx.graph.stage(name)
    ids = [str(r["id"]) for r in rows]
    texts = [r.get(stage.column) for r in rows]
    if stage.near is None:
        return exact_duplicates(ids, texts)
    return near_duplicates(ids, texts, threshold=stage.near, num_perm=stage.num_perm, shingle=stage.shingle)


KIND = filter_kind("dedup", judge_rows=verdicts, check=check)
