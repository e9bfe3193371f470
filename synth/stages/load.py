"""The load stage: seed rows from a file (.jsonl .json .csv .parquet or a saved HF dataset directory)
into a table named after the stage. The rows are read (and checked) when the pipeline is loaded;
their bytes are the stage's fingerprint (synth/seeds.py)."""

from __future__ import annotations

from synth.context import RunContext
from synth.graph import Graph, Kind
from synth.seeds import read_seeds
from synth.store import Store


def check(graph: Graph, name: str) -> list[str]:
    stage = graph.stage(name)
    seeds = read_seeds(graph.resolve(stage.path), graph.where(name, "path"), stage.limit)
    graph.add_seeds(name, seeds)
    return seeds.columns


def preflight(graph: Graph, name: str, trained, console, will_run: bool) -> None:
    """Warn (one line) when identical rows collapse into one, if the stage is about to run."""
    n = graph.seeds[name].collapsed
    if n and will_run:
        console.print(f"warning: {graph.resolve(graph.stage(name).path)}: {n} row{'s are' if n > 1 else ' is'} "
                      f"identical to an earlier row and collapsed into it (stage '{name}' keeps one row per distinct "
                      "content); give each row an `id` to keep them apart", markup=False, highlight=False,
                      soft_wrap=True)


def run(ctx: RunContext, name: str) -> dict:
    seeds = ctx.graph.seeds[name]
    with ctx.store.write() as con:
        Store.replace_table(con, name, seeds.table)
        ctx.record(con, name, "done", seeds.table.num_rows, collapsed=seeds.collapsed)
    return {"rows": seeds.table.num_rows}


KIND = Kind(
    name="load", run=run, check=check, preflight=preflight,
    references=lambda config, stages: [],
    fingerprint=lambda graph, name, trained: {"file": graph.seeds[name].file_hash},
    reads=lambda graph, name: {graph.resolve(graph.stage(name).path): f"the seed file of stage '{name}'"},
)
