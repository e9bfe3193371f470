"""One train stage in a worker process of `synth run --jobs N` (not a user command).

    python -m synth.stage_worker PIPELINE RUN_ID STAGE TRAINED_JSON

The parent `synth run` holds the store's writer lock for the whole run and starts one worker per train
stage whose inputs are done, at most N at a time (pipeline._run_parallel). A worker loads the pipeline,
runs the stage as the parent would (the same RunContext: run id, trained models so far), and writes its
state, log rows and model exactly as an in-process run does (short DuckDB transactions, which wait for
each other's). Exit 0: done (the parent reads the stage's state); 2: a user's mistake or a failed
training, its one line on stderr; 130: interrupted.

A worker never outlives its parent: it asks the kernel for SIGKILL when the parent dies (prctl
PR_SET_PDEATHSIG, Linux), so a `synth run` killed with kill -9 leaves no training behind; the killed
training resumes from its checkpoint on the next run, as any killed training does. Torch uses
OMP_NUM_THREADS threads (the parent divides the cores among its workers).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.console import Console

from synth.context import RunContext
from synth.errors import SynthError
from synth.pipeline import load_pipeline
from synth.secrets import scrub
from synth.stages import kind_of
from synth.train_launch import die_with_parent  # one PR_SET_PDEATHSIG helper for every child process


def main(argv: list[str]) -> int:
    pipeline_path, run_id, name, trained = argv
    die_with_parent(int(os.environ.get("SYNTH_WORKER_PARENT", os.getppid())))
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    try:
        graph = load_pipeline(Path(pipeline_path))
        ctx = RunContext(graph, run_id, console, json.loads(trained))
        kind_of(graph.stage(name).kind).run(ctx, name)
    except SynthError as exc:
        print(f"synth: error: {scrub(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
