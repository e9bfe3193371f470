"""synth: black-box distillation of LLMs through data.

    import synth
    counts = synth.run("pipeline.yaml")    # `synth run pipeline.yaml`, in this process
    pipeline = synth.load("pipeline.yaml") # the validated pipeline (every check that needs no teacher)
    store = synth.open("out/run.duckdb")   # read-only (synth.store.StoreReader)
    df = store.table("solutions")          # a stage's output as a pandas DataFrame
    df = store.sql("select * from synth.runs where status = ?", ["ok"])

Importing synth is cheap: heavy libraries load only where they are used.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def open(path: str | Path):  # noqa: A001 - `synth.open(...)` reads like `duckdb.connect(...)`
    """Open a store (a .duckdb file, or the store named by a pipeline file) for reading only: a
    synth.store.StoreReader with .table(name), .sql(query, params), .arrow(query, params), .relations()."""
    from synth.inspection import store_for
    from synth.store import StoreReader

    return StoreReader(store_for(Path(path)))


def load(path: str | Path):
    """The pipeline file at `path`, loaded and validated (synth.pipeline.load_pipeline): an immutable
    synth.graph.Graph (stages in order, wiring, columns, templates, seeds, fingerprints).
    A mistake in it raises SynthError with the one line `synth run` would print."""
    from synth.pipeline import load_pipeline

    return load_pipeline(Path(path))


def run(pipeline, targets: list[str] | None = None, force: bool = False, max_cost: float | None = None,
        console=None, only: bool = False, jobs: int = 1) -> dict:
    """`synth run` in this process: run the stale stages of `pipeline` (a path, or a Graph from
    synth.load) or of `targets` and what they read, in DAG order (`only`: the targets alone, refused while
    a stage they read is stale; `jobs`: independent train stages in that many worker processes at a time); returns the run's counts (`run_id`,
    `stages_run`, `sent`, `cached`, `errors`, `unsent`, `stages`: each stage's own counts). A user's
    mistake raises SynthError (the CLI's one line); failed requests do not raise: they are in
    counts["errors"] (the CLI's exit code 1). `console`: a rich Console for the progress (default: stderr).
    The run is recorded with the equivalent command line."""
    from synth.graph import Graph
    from synth.pipeline import load_pipeline, run as run_pipeline

    if not isinstance(pipeline, Graph):
        pipeline = load_pipeline(Path(pipeline))
    argv = ["run", str(pipeline.path), *(targets or []), *(["--force"] if force else []),
            *(["--max-cost", str(max_cost)] if max_cost is not None else []), *(["--only"] if only else []),
            *(["--jobs", str(jobs)] if jobs > 1 else [])]
    return run_pipeline(pipeline, list(targets) if targets else None, force=force, argv=argv, console=console,
                        max_cost=max_cost, only=only, jobs=jobs)
