"""The orchestrator: load a pipeline file into a graph, say what is stale, plan, run.

    graph = load_pipeline(Path("pipeline.yaml"))   # every check that needs no teacher (synth/graph.py)
    plan(graph)                                    # what would run, cached vs new requests
    run(graph, targets=["solutions"])              # run stale stages in DAG order

A stage's fingerprint covers its config, the bytes of the files it reads (seed file, prompt
template, filter file, recipe), the teacher's backend and model, and its inputs' fingerprints. A
stage is stale when it never ran, its fingerprint changed, its last run did not finish cleanly, an
input re-ran after it, or its output outside the store (an export's file, a trained model) is gone.

Each stage runs through one lookup in synth/stages' KINDS table: `kind_of(kind).run(ctx, name)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from synth.context import RunBudget, RunContext, trained_models
from synth.errors import SynthError, one_line
from synth.graph import Graph, build, round_name
from synth.ids import content_hash
from synth.stages import KINDS, kind_of

def load_pipeline(path: Path) -> Graph:
    """Read and validate a pipeline file completely; raise SynthError (one line) on the first problem.
    Reads seed files and templates, never the store's contents and never a teacher."""
    return build(Path(path), KINDS)


# ---- staleness -----------------------------------------------------------------------------------

@dataclass
class StageStatus:
    name: str
    kind: str
    stale: bool
    reason: str


REASONS = {"config": "its config changed", "file": "its seed file changed", "prompt": "its prompt template changed",
           "teacher": "its teacher's model changed", "filter": "its filter's config or files changed",
           "recipe": "its training recipe changed", "student": "its student model changed",
           "schema": "its schema changed"}


def staleness(graph: Graph, states: dict[str, dict] | None = None) -> dict[str, StageStatus]:
    """Fresh or stale, and why, for every stage (reads stage states; calls no teacher)."""
    states = graph.store.stage_states() if states is None else states
    trained = trained_models(states)
    out: dict[str, StageStatus] = {}
    for name in graph.order:
        out[name] = StageStatus(name, graph.stage(name).kind, *_why_stale(graph, name, states, trained, out))
    stopped = rounds_stop(graph) if graph.round_of else None
    if stopped:  # stale, and `synth run` will not run them: say why
        for name, st in out.items():
            if st.stale and graph.round_number(name) >= stopped[0]:
                out[name] = StageStatus(name, st.kind, True, f"not run: the rounds stopped before round {stopped[0]}: "
                                                             f"{stopped[1]}")
    return out


def _why_stale(graph: Graph, name: str, states: dict, trained: dict, upstream: dict[str, StageStatus]) \
        -> tuple[bool, str]:
    state = states.get(name)
    if state is None:
        return True, "never run"
    if state["status"] == "running":
        return True, "its last run did not finish"
    if state["status"] == "incomplete" and state["detail"].get("stopped") == "budget":
        return True, f"its last run stopped at its budget ({state['detail'].get('budget')}); raise it to go on"
    if state["status"] == "incomplete":
        return True, f"its last run left {state['detail'].get('errors', '?')} requests failed or unsent"
    stale_inputs = [i for i in graph.inputs[name] if upstream[i].stale]
    if stale_inputs:
        return True, f"input '{stale_inputs[0]}' is stale"
    old = state["detail"].get("fingerprint_parts", {})
    new = graph.fingerprint_parts(name, trained)
    if state["fingerprint"] != content_hash(new):
        changed = [k for k in new if old.get(k) != new[k]] or ["config"]
        return True, REASONS.get(changed[0], f"input '{changed[0].split(':', 1)[-1]}' changed")
    for inp in graph.inputs[name]:
        if states.get(inp, {}).get("run_id") != state["detail"].get("input_runs", {}).get(inp):
            return True, f"input '{inp}' ran again since"
    missing = graph.kind(name).missing_output(graph, name, state)
    if missing:
        return True, missing
    return False, "up to date"


# ---- plan and run ------------------------------------------------------------------------------------

def plan(graph: Graph, targets: list[str] | None = None) -> list[dict]:
    """One row per stage: status, reason, and for stages that ask a model the requests cached vs to
    send and the estimated tokens. Calls no teacher and writes nothing."""
    names = graph.upstream(targets) if targets else graph.order
    states = graph.store.stage_states()
    statuses = staleness(graph, states)
    trained = trained_models(states)
    rows = []
    for name in names:
        st = statuses[name]
        row = {"stage": name, "kind": st.kind, "stale": st.stale, "reason": st.reason}
        estimate = graph.kind(name).estimate
        if estimate is not None:
            row.update(estimate(graph, name, statuses, trained))
        rows.append(row)
    return rows


def run(graph: Graph, targets: list[str] | None = None, *, force: bool = False, argv: list[str] | None = None,
        console: Console | None = None, max_cost: float | None = None, only: bool = False, jobs: int = 1) -> dict:
    """Run every stale stage among the targets (default: all) and their upstream, in DAG order; with
    `only`, the targets alone (with their companions), refusing when an input they read is stale; with
    `jobs` > 1, independent train stages in that many worker processes at a time (_run_parallel).
    Records one run row. Returns the run's counts. Holds the store's writer lock throughout (one run per
    store at a time). Everything checkable is checked before anything is written."""
    console = console or Console(stderr=True)
    for t in targets or []:
        if t not in graph.spec.stages:
            raise SynthError(f"{graph.path}: no stage named {t!r} (stages: {', '.join(graph.order)})")
    if only:
        names = only_stages(graph, targets or [])
    else:
        names = graph.upstream(targets) if targets else graph.order
    preflight(graph, names, console, targets, force)
    run_budget = None
    if max_cost is not None:
        unpriced = sorted({graph.stage(n).teacher for n in names if graph.stage(n).kind == "generate"
                           and graph.prices(n) is None})
        if unpriced:
            raise SynthError(f"--max-cost: teacher {unpriced[0]!r} has no prices; add prices: {{input: USD per 1M "
                             "tokens, output: USD per 1M tokens}} to it, or run without --max-cost")
        run_budget = RunBudget(max_cost)
    with graph.store.writer(f"synth run {graph.path}"):
        run_id = graph.store.start_run("run", argv or sys.argv[1:], str(graph.path),
                                       graph.spec.model_dump(mode="json"))
        ctx = RunContext(graph, run_id, console, trained_models(graph.store.stage_states()), run_budget)
        return _run_stages(ctx, names, targets, force, jobs)


def only_stages(graph: Graph, targets: list[str]) -> list[str]:
    """`synth run p.yaml STAGE --only`: the targets and their companions (an evaluate stage's model
    generations, a judge's critic calls: part of the stage), in DAG order — provided every other stage
    they read is fresh; else one line naming the first stale input and why."""
    if not targets:
        raise SynthError(f"{graph.path}: --only runs the named stages alone; name them (synth run {graph.path.name} "
                         "STAGE --only)")
    own = {n for t in targets for n in (t, *graph.companions.get(t, ()))}
    statuses = staleness(graph)
    for name in [n for n in graph.order if n in own]:
        for inp in graph.inputs[name]:
            if inp not in own and statuses[inp].stale:
                owner = graph.owner_of.get(name, name)
                raise SynthError(f"{graph.where(owner)}: --only: its input '{inp}' is stale ({statuses[inp].reason}); "
                                 f"run it first (synth run {graph.path.name} {inp}) or drop --only")
    return [n for n in graph.order if n in own]


def preflight(graph: Graph, names: list[str], console: Console, targets: list[str] | None = None,
              force: bool = False) -> None:
    """What `synth run` checks once it knows which stages it runs, before it writes anything (each kind's
    `preflight`): API keys and backend capabilities, every row whose prompt is known now renders within
    the limits, every Python filter file loads; warnings for what is about to run (collapsed seed rows)."""
    states = graph.store.stage_states()
    statuses = staleness(graph, states)
    trained = trained_models(states)
    for name in names:
        will_run = statuses[name].stale or (force and (not targets or name in targets))
        graph.kind(name).preflight(graph, name, trained, console, will_run)


def round_evaluations(graph: Graph, evaluate: str, model: str) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """Per round r = 0..count (`rounds:`): (round r's evaluate stage, round r's model, {replica of that model:
    (correct, outputs)} for those it has evaluated) — read by the stop rule and by `synth report`."""
    out = []
    with graph.store.read() as con:
        for r in range(graph.spec.rounds.count + 1):
            stage, name = round_name(evaluate, r), round_name(model, r)
            models = list(graph.replicas.get(name, (name,)))
            found = con.execute("SELECT model, count(*) FILTER (WHERE passed), count(*) FROM synth.evaluations WHERE "
                                f"stage = ? AND model IN ({', '.join('?' * len(models))}) GROUP BY model",
                                [stage, *models]).fetchall()
            out.append((stage, name, {m: (correct, n) for m, correct, n in found}))
    return out


def rounds_stop(graph: Graph) -> tuple[int, str] | None:
    """(r, why) when the rounds' stop rule ends the repetition before round r: round r-1's model gained
    less than `min_gain` points over round r-2's on the stop's evaluate stage (a replicated model: the mean
    over its replicas). None while no finished round says so (a round not evaluated yet decides nothing)."""
    rounds = graph.spec.rounds
    if rounds is None or rounds.stop is None or not graph.store.exists():
        return None
    stop = rounds.stop
    accuracy: dict[int, float] = {}
    for r, (_, model, found) in enumerate(round_evaluations(graph, stop.evaluate, stop.model)):
        if len(found) == len(graph.replicas.get(model, (model,))):  # every replica evaluated
            accuracy[r] = sum(correct / n for correct, n in found.values()) / len(found)
    for r in range(2, rounds.count + 1):
        if r - 1 in accuracy and r - 2 in accuracy:
            gain = 100 * (accuracy[r - 1] - accuracy[r - 2])
            if gain < stop.min_gain:
                return r, (f"round {r - 1} gained {gain:+.1f} points on {round_name(stop.evaluate, r - 1)!r} "
                           f"(rounds.stop.min_gain {stop.min_gain:g})")
    return None


def _run_parallel(ctx: RunContext, batch: list[tuple[str, "StageStatus"]], jobs: int, pending: list[str],
                  to_run: Callable[[str], "StageStatus | None"], run_here: Callable[[str], None]) -> dict[str, dict]:
    """Train stages whose inputs are done, in at most `jobs` worker processes (synth/stage_worker.py), the
    cores divided among them (OMP_NUM_THREADS); each worker takes the next stage of the batch when it is
    done with one, so torch, transformers and TRL are imported once per worker. Each stage records itself
    in the store as in process; here its state is read back (its model becomes a teacher for what follows).

    The batch grows while it runs, so that no core waits while there is work: a training of `pending`
    whose inputs become done (one that starts from a student of the batch, or reads a stage run here)
    joins it; and while fewer than `jobs` workers are busy and no training waits for one, this process
    runs the first pending stage that is no training and whose inputs are done (`run_here`, on the cores
    the busy workers leave; it counts as one of the `jobs`), in file order and never ahead of an earlier
    round (the stop rule must see its rounds first). Those stages are removed from `pending`.

    A failed stage's line is on stderr and its worker exits; a fresh worker takes what is left, the others
    finish (nothing new joins), then one SynthError names the failed ones (a re-run resumes them). A stage
    run here that fails (a SynthError) lets the batch finish (nothing new joins), then its error is raised.
    Any other exception (Ctrl-C, SIGTERM) stops every worker first; a kill -9 of this process kills them
    too (PR_SET_PDEATHSIG)."""
    graph, console = ctx.graph, ctx.console
    cores = os.cpu_count() or 1
    # every worker's threads, fixed when it starts: the cores divided among as many workers as could ever be
    # busy at once (the batch and every pending training that may join it), at most `jobs`
    could_train = len(batch) + sum(1 for n in pending if graph.stage(n).kind == "train")
    threads = max(1, cores // min(jobs, could_train or 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SYNTH_WORKER_PARENT": str(os.getpid())}
    queue, results, failed = list(batch), {}, []
    workers: list[subprocess.Popen] = []
    current: dict[subprocess.Popen, tuple[str, float]] = {}  # a worker's stage and when it was sent
    last: dict[subprocess.Popen, str] = {}  # the stage in the file (replica_of) a worker trained last
    here_error: SynthError | None = None

    def done(name: str) -> bool:  # (a stage of this run that failed is not done; nothing joins after one)
        return name not in pending and name not in queued() and name not in busy() and name not in failed

    def queued() -> set[str]:
        return {n for n, _ in queue}

    def busy() -> set[str]:
        return {n for n, _ in current.values()}

    def join_ready() -> None:
        """Trainings of `pending` whose inputs are all done join the queue (up-to-date ones leave `pending`)."""
        for name in [n for n in pending if graph.stage(n).kind == "train"]:
            if all(done(i) for i in graph.inputs[name]):
                pending.remove(name)
                if (st := to_run(name)) is not None:
                    queue.append((name, st))

    def beside() -> str | None:
        """The stage to run in this process now, beside the busy workers: see the docstring."""
        rounds = [graph.round_number(n) for n in [*pending, *queued(), *busy()]]
        return next((n for n in pending if graph.stage(n).kind != "train" and graph.round_number(n) <= min(rounds)
                     and all(done(i) for i in graph.inputs[n])), None)

    try:
        while queue or current:
            idle = [w for w in workers if w not in current]
            while queue and len(workers) < min(jobs, len(queue) + len(current)):
                worker = subprocess.Popen([sys.executable, "-m", "synth.stage_worker", str(graph.path), ctx.run_id],
                                          env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                workers.append(worker)
                idle.append(worker)
            for worker in idle:
                if not queue:
                    break
                name, st = queue.pop(_next_for(graph, queue, last.get(worker), {last[w] for w in current}))
                last[worker] = graph.replica_of.get(name, name)
                console.print(f"[bold]{name}[/bold] ({st.kind}): {st.reason} · in a worker process ({threads} threads)")
                current[worker] = (name, time.monotonic())
                worker.stdin.write(json.dumps({"stage": name, "trained": ctx.trained}) + "\n")
                worker.stdin.flush()
            name = beside() if not queue and current and len(current) < jobs and not failed and not here_error \
                else None
            if name is not None:
                pending.remove(name)
                try:
                    with _torch_threads(max(1, cores - threads * len(current))):
                        run_here(name)
                except SynthError as exc:  # the batch finishes first; then it is raised
                    here_error = exc
                else:
                    join_ready()
            # after a stage here, the workers that finished meanwhile are read at once (no wait)
            readable, _, _ = select.select([w.stdout for w in current], [], [], 0 if name else 0.5)
            for worker in list(current):
                line = worker.stdout.readline() if worker.stdout in readable else None
                if line is None and worker.poll() is None:
                    continue  # still training
                name, sent = current.pop(worker)
                state = graph.store.stage_states().get(name, {})
                rc = json.loads(line)["rc"] if line else (worker.poll() or 1)
                if rc != 0 or state.get("status") != "done" or state.get("run_id") != ctx.run_id:
                    failed.append(name)
                    _stop([worker])
                    workers.remove(worker)
                    continue
                detail = state["detail"]
                ctx.set_trained(name, detail["model_dir"])
                results[name] = {"rows": state["rows"], "model_dir": detail["model_dir"],
                                 "seconds": round(time.monotonic() - sent, 3)}
                if not failed and here_error is None:
                    join_ready()
        for worker in workers:  # end of their input: each exits 0
            worker.stdin.close()
        for worker in workers:
            worker.wait()
    except BaseException:
        _stop(workers)
        raise
    if here_error is not None:
        raise here_error
    if failed:
        raise SynthError(f"train stage{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed in "
                         f"{'their worker processes' if len(failed) > 1 else 'its worker process'} (the error is "
                         "above); a re-run resumes from the last checkpoint")
    return results


def _next_for(graph: Graph, queue: list[tuple[str, "StageStatus"]], own: str | None, others: set[str]) -> int:
    """The index in `queue` of the stage an idle worker takes: the next replica of the stage in the file it
    trained last (`own`; the same data and recipe but the seed, so train.prepare reuses the tokenised data
    that worker holds), else the first of a stage no busy worker is on (`others`: the workers then keep to
    their own stages' replicas), else the first. Seeds [0, 1, 2] of A, B and C on two workers: A0 A1 A2
    C0 C2 and B0 B1 B2 C1, five reuses of nine instead of three in file order."""
    family = [graph.replica_of.get(name, name) for name, _ in queue]
    if own in family:
        return family.index(own)
    return next((i for i, f in enumerate(family) if f not in others), 0)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads in this process set to n for the block, then back (a stage run here beside
    busy workers gets the cores they leave, not all of them)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _stop(workers: list[subprocess.Popen]) -> None:
    """Terminate the worker processes and wait for them (kill one that takes over 30 s)."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _feeder(graph: Graph, pending: list[str]) -> str | None:
    """Under --jobs, before a batch of trainings starts: a pending stage that is no training, whose inputs
    are all done, and that a pending training waits on (directly or through other pending stages), in the
    first pending stage's round or an earlier one (a later round's stop rule must see its rounds first).
    Running it first lets that training join the batch: in file order, a score or export stage between two
    trainings (DPO and an on-policy round, both from one student) would otherwise split them into batches
    that each end with one training alone on a core. None when there is none. Stages other than trainings
    run one at a time either way, so running one earlier costs nothing."""
    waiting = [n for n in pending if graph.stage(n).kind == "train" and any(i in pending for i in graph.inputs[n])]
    if not waiting:
        return None
    needed, first_round = set(graph.upstream(waiting)), graph.round_number(pending[0])
    return next((n for n in pending if n in needed and graph.stage(n).kind != "train"
                 and not any(i in pending for i in graph.inputs[n]) and graph.round_number(n) <= first_round), None)


def _run_stages(ctx: RunContext, names: list[str], targets: list[str] | None, force: bool, jobs: int = 1) -> dict:
    graph, store, console = ctx.graph, ctx.store, ctx.console
    counts: dict = {"stages_run": [], "sent": 0, "cached": 0, "errors": 0, "unsent": 0, "recovered": 0}
    def to_run(name: str) -> StageStatus | None:
        """Its status when it is to run now; None (said why) when it is up to date or the rounds stopped."""
        st = staleness(graph)[name]
        if not st.stale and not (force and (not targets or name in targets)):
            console.print(f"[dim]{name}: up to date[/dim]")
            return None
        r = graph.round_number(name)
        stopped = rounds_stop(graph) if r >= 2 else None
        if stopped and r >= stopped[0]:  # the stop rule: a later round is not run (and not an error)
            console.print(f"[dim]{name}: not run: the rounds stopped before round {stopped[0]}: {stopped[1]}[/dim]")
            counts.setdefault("rounds_stopped", stopped[0])
            return None
        return st

    def add(name: str, result: dict) -> None:
        counts["stages_run"].append(name)
        if result.get("stopped") == "budget":
            counts.setdefault("stopped_at_budget", []).append(name)
        for key in ("sent", "cached", "errors", "unsent", "recovered"):
            counts[key] += result.get(key, 0)
        counts.setdefault("stages", {})[name] = result

    def run_here(name: str) -> None:
        """One stage in this process, if it is to run."""
        st = to_run(name)
        if st is None:
            return
        console.print(f"[bold]{name}[/bold] ({st.kind}): {st.reason}")
        started = time.monotonic()
        result = kind_of(st.kind).run(ctx, name)
        result["seconds"] = round(time.monotonic() - started, 3)
        add(name, result)

    pending = list(names)
    try:
        while pending:
            if jobs > 1 and graph.stage(pending[0]).kind == "train":
                feeder = _feeder(graph, pending)
                if feeder is not None:  # it runs first, so that the training waiting on it joins the batch
                    pending.remove(feeder)
                    pending.insert(0, feeder)
                    continue
                ready = [n for n in pending if graph.stage(n).kind == "train"
                         and not any(i in pending for i in graph.inputs[n])]
                if len(ready) > 1:  # independent trainings: in worker processes, `jobs` at a time
                    for name in ready:
                        pending.remove(name)
                    batch = [(n, st) for n in ready if (st := to_run(n)) is not None]
                    for name, result in _run_parallel(ctx, batch, jobs, pending, to_run, run_here).items():
                        add(name, result)
                    continue
            run_here(pending.pop(0))
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            store.finish_run(ctx.run_id, status, counts, error=one_line(exc)[:2000])
        except SynthError:  # the store itself failed (a full disk, a lock): the first error is the one to show
            pass
        raise
    store.finish_run(ctx.run_id, "incomplete" if counts["errors"] or counts["unsent"] else "ok", counts)
    counts["run_id"] = ctx.run_id
    return counts
