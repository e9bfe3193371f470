"""The run context: what synth/pipeline.py hands each stage's `run(ctx, name)`.

    ctx.graph, ctx.store, ctx.run_id, ctx.console     the loaded pipeline, its store, this run
    ctx.teacher_config(teacher)                        with a trained student's current model dir
    ctx.record(con, name, status, rows, **detail)      the stage's state, in the caller's transaction
    ctx.run_budget                                     `synth run --max-cost` (a RunBudget) or None

A stage records its state with `ctx.record` in the same write transaction as its output, so the
store never holds output without its state or the reverse. The context also holds the one piece of
run state the graph depends on: which model each train stage last wrote (`trained`), read from the
store when the run starts and updated by `set_trained` when a train stage finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from rich.console import Console

from synth.graph import Graph
from synth.ids import content_hash
from synth.store import Store, fetch_one


def trained_models(states: Mapping[str, dict]) -> dict[str, str]:
    """Train stage -> the model dir its last finished run wrote, from the store's stage states. Each
    training run writes a new directory named by its run id (synth/stages/train.py), so a retrained
    model is a different model id and never reuses the old model's cached completions."""
    return {n: st["detail"]["model_dir"] for n, st in states.items()
            if st["kind"] == "train" and st["status"] == "done" and st["detail"].get("model_dir")}


@dataclass
class RunBudget:
    """`synth run --max-cost`: what the generate stages of this run may spend together (USD)."""
    max_cost: float
    spent: float = 0.0


@dataclass
class RunContext:
    graph: Graph
    run_id: str
    console: Console
    trained: dict[str, str] = field(default_factory=dict)
    run_budget: RunBudget | None = None

    @property
    def store(self) -> Store:
        return self.graph.store

    def teacher_config(self, teacher: str):
        return self.graph.teacher_config(teacher, self.trained)

    def fingerprint_parts(self, name: str) -> dict[str, str]:
        return self.graph.fingerprint_parts(name, self.trained)

    def fingerprint(self, name: str) -> str:
        return self.graph.fingerprint(name, self.trained)

    def set_trained(self, name: str, model_dir: str) -> None:
        """A train stage finished: its model is the teacher under its name from now on."""
        self.trained[name] = model_dir

    def record(self, con, name: str, status: str, rows: int, **detail) -> None:
        """Write a stage's state with the fingerprint it ran under and the run ids of its inputs (for
        "input ran again since" staleness), in the caller's transaction."""
        states = {}
        for inp in self.graph.inputs[name]:
            r = fetch_one(con, "SELECT run_id FROM synth.stages WHERE name = ?", [inp])
            states[inp] = r[0] if r else None
        parts = self.fingerprint_parts(name)
        Store.set_stage(con, name, self.graph.stage(name).kind, content_hash(parts), status, rows, self.run_id,
                        {"fingerprint_parts": parts, "input_runs": states, **detail})
