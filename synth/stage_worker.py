"""Train stages in a worker process of `synth run --jobs N` (not a user command).

    python -m synth.stage_worker PIPELINE RUN_ID

The parent `synth run` holds the store's writer lock for the whole run and starts at most N workers for a
batch of train stages whose inputs are done (pipeline._run_parallel). A worker takes stages one at a
time: a JSON line {"stage": NAME, "trained": {...}} on stdin, answered with a JSON line
{"stage": NAME, "rc": RC} on its stdout once the stage is over (everything else it or a library prints
goes to stderr). It reads the pipeline afresh and runs the stage as the parent would (the same
RunContext: run id, trained models so far), writing its state, log rows and model exactly as an
in-process run does (short DuckDB transactions, which wait for each other's). One process trains several
stages so that torch, transformers and TRL are imported once per worker, not once per stage (~6 s each
on 2 cores). RC 0: done (the parent reads the stage's state); 2: a user's mistake or a failed training,
its one line on stderr, and the worker exits (the parent starts a fresh one for what is left); 130:
interrupted (no answer line). End of stdin: exit 0.

A worker never outlives its parent: it asks the kernel for SIGKILL when the parent dies (prctl
PR_SET_PDEATHSIG, Linux), so a `synth run` killed with kill -9 leaves no training behind; the killed
training resumes from its checkpoint on the next run, as any killed training does. Torch uses
OMP_NUM_THREADS threads (the parent divides the cores among its workers).
"""

from __future__ import annotations

import gc
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
    pipeline_path, run_id = argv
    die_with_parent(int(os.environ.get("SYNTH_WORKER_PARENT", os.getppid())))
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the parent's channel; fd 1 becomes stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    try:
        for line in iter(sys.stdin.readline, ""):  # one stage per line, until the parent closes stdin
            task = json.loads(line)
            name, rc = task["stage"], 0
            try:
                graph = load_pipeline(Path(pipeline_path))  # afresh per stage, as a worker per stage did (~0.5 s)
                kind_of(graph.stage(name).kind).run(RunContext(graph, run_id, console, task["trained"]), name)
            except SynthError as exc:
                print(f"synth: error: {scrub(str(exc))}", file=sys.stderr, flush=True)
                rc = 2
            finally:
                gc.collect()  # the finished trainer and its model, before the next stage loads its own
            answers.write(json.dumps({"stage": name, "rc": rc}) + "\n")
            answers.flush()
            if rc:
                return rc
    except KeyboardInterrupt:  # no answer line: the parent reads a worker gone without one as a failed stage
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
