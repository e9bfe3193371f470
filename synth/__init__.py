"""synth: black-box distillation of LLMs through data.

    import synth
    store = synth.open("out/run.duckdb")
    df = store.table("solutions")          # a stage's output as a pandas DataFrame
    df = store.sql("select * from synth.runs")

Importing synth is cheap: heavy libraries load only where they are used.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def open(path: str | Path):  # noqa: A001 - `synth.open(...)` reads like `duckdb.connect(...)`
    """Open a store (a .duckdb file, or the store named by a pipeline file) for reading."""
    from synth.inspect import store_for

    return store_for(Path(path))
