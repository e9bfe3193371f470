"""A train stage's `gpus: N`: one training in N DDP processes, started by torchrun (not a user command).

    result = train_launch.train("sft", data, base, recipe, out_dir, processes=2, on_log=..., checkpoint_dir=...,
                                resume=..., on_resume=..., where="pipeline.yaml:12: stage 'sft'")

returns what synth.train.train returns, and takes its arguments: the stage calls one or the other. The
launcher is torchrun (`python -m torch.distributed.run --standalone --nproc_per_node N`), not `accelerate
launch`: torchrun ships with torch, so it is there wherever training is; it reads no config file of its
own (accelerate launch would read the user's ~/.cache/huggingface/accelerate/default_config.yaml, whose
mixed precision and process count would override the recipe's and the stage's); and it only sets the
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) that transformers' Trainer reads to run DDP
itself. --standalone: a rendezvous on a free localhost port, so two trainings at once never collide.

The processes, and what each may do:
- the parent: the synth process that runs the stage (`synth run`, or its stage worker under --jobs). It
  alone writes the store. It chooses the checkpoint to resume from (and removes stale or incomplete ones)
  before any rank starts, writes the ranks' arguments to <out_dir>/launch/spec.json, starts the agent,
  tails <out_dir>/launch/events.jsonl (rank 0's log rows: on_log, on_resume) and, once the agent exits,
  reads rank 0's result.json, or turns the first rank's error into one SynthError line.
- the agent: torchrun, started through `python -m synth.train_launch agent PARENT -- ARGS` (that process
  asks the kernel for SIGKILL when the parent dies, PR_SET_PDEATHSIG, then execs torchrun: the request
  survives the exec). Its output and the ranks' go to <out_dir>/launch/launch.log, never to the terminal.
- rank r: `python -m synth.train_launch rank SPEC`, SIGKILLed when the agent dies (the same prctl), runs
  synth.train.prepare and fit like a plain process; the Trainer wraps the model in DDP and shards the
  batches (each rank a disjoint part of every step's rows: the recipe's batch size is per process). Rank 0
  alone writes events, checkpoints, the model (LoRA merged) and result.json; a rank that fails writes
  error-<r>.json (its one line; the traceback is in launch.log).

So a `synth run` killed with kill -9 takes the agent with it and the agent its ranks: nothing trains on;
the next run resumes from rank 0's newest complete checkpoint like any killed training.

A test path on CPU: with SYNTH_TRAIN_CPU_PROCESSES=1 in the environment, `gpus: N` starts N CPU processes
(the gloo backend, no GPU needed or used: CUDA_VISIBLE_DEVICES is emptied for them) and the preflight
asks for no GPU. It exists so that the multi-process path runs where no GPUs are
(tests/test_multi_process_train.py): a test of the path, not a way to train faster on CPUs.
With SYNTH_TRAIN_TRACE=DIR as well, each rank writes DIR/rank<r>.json: a digest of every row it
trained on and of its final weights (what the tests compare across ranks).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from synth import train as trainer
from synth.errors import SynthError, one_line
from synth.ids import content_hash
from synth.secrets import scrub

CPU_SWITCH = "SYNTH_TRAIN_CPU_PROCESSES"
TRACE = "SYNTH_TRAIN_TRACE"
POLL_S = 0.2  # how often the parent reads the events file while the ranks train


def cpu_processes() -> bool:
    """Whether `gpus: N` means N CPU processes here (the test path: SYNTH_TRAIN_CPU_PROCESSES=1)."""
    return os.environ.get(CPU_SWITCH, "").strip().lower() in ("1", "true", "yes")


def process_count(gpus: int | None) -> int:
    """How many training processes a stage's `gpus` asks for: 1 (a plain process) unless gpus > 1."""
    return gpus if gpus and gpus > 1 else 1


def visible_gpus() -> int:
    """CUDA GPUs this process can use (CUDA_VISIBLE_DEVICES applied); 0 without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_problem(gpus: int | None, visible: int, cpu: bool) -> str | None:
    """Why `gpus` cannot run here (None: it can): N > 1 processes need N visible CUDA GPUs, unless the CPU
    test path is on."""
    n = process_count(gpus)
    if n == 1 or cpu or visible >= n:
        return None
    seen = "no CUDA GPU is visible" if visible == 0 else \
        f"only {visible} CUDA GPU{' is' if visible == 1 else 's are'} visible"
    return (f"key 'gpus': {n} training processes need {n} CUDA GPUs, but {seen} here (CUDA_VISIBLE_DEVICES "
            f"and torch.cuda.device_count() decide); set gpus: {max(visible, 1)} or remove the key, or run on a "
            f"machine with {n} GPUs ({CPU_SWITCH}=1 runs the processes on CPU: a test path)")


def check_gpus(graph, name: str) -> None:
    """For the train stage's preflight (before anything is written): a stage's `gpus: N` with fewer than N
    visible CUDA GPUs is one SynthError line naming the stage and the key. Imports torch (seconds) only
    for a stage with gpus > 1."""
    gpus = graph.stage(name).gpus
    if process_count(gpus) == 1 or cpu_processes():
        return
    problem = gpus_problem(gpus, visible_gpus(), cpu=False)
    if problem:
        raise SynthError(f"{graph.where(name, 'gpus')}: {problem}")


# --------------------------------------------------------------------------------------------------
# The parent

def train(method: str, data_path: Path, model: str, recipe: dict, out_dir: Path, init: str | None = None,
          on_log: Callable[[int, dict], None] | None = None, *, processes: int, checkpoint_dir: Path,
          resume: bool = False, on_resume: Callable[[int, Path], None] | None = None,
          where: str = "the train stage") -> dict:
    """synth.train.train in `processes` DDP processes (see the module docstring); the same result. `where`
    starts the one line a failed rank becomes."""
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    work = out_dir / "launch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # The checkpoint is chosen here, once: ranks that pruned and removed checkpoints themselves would race.
    checkpoint = trainer.latest_checkpoint(checkpoint_dir) if resume else None
    if checkpoint is None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    spec = {"method": method, "data": str(data_path), "model": str(model), "init": init, "recipe": recipe,
            "out_dir": str(out_dir), "checkpoint_dir": str(checkpoint_dir), "resume": checkpoint is not None,
            "work": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    # torchrun would set 1 thread per process (and warn); the cores are divided among the ranks instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    if cpu_processes():
        env["CUDA_VISIBLE_DEVICES"] = ""  # the test path: CPU processes (gloo) even where GPUs are
    cmd = [sys.executable, "-m", "synth.train_launch", "agent", str(os.getpid()), "--",
           "--standalone", "--nproc_per_node", str(processes), "--max_restarts", "0",
           "-m", "synth.train_launch", "rank", str(work / "spec.json")]
    log = open(work / "launch.log", "wb")
    events = _Tail(work / "events.jsonl")

    def handle(event: dict) -> None:
        if event.get("event") == "log" and on_log is not None:
            on_log(int(event["step"]), event["logs"])
        elif event.get("event") == "resume" and on_resume is not None:
            on_resume(int(event["step"]), Path(event["checkpoint"]))

    try:
        # its own session: a Ctrl-C reaches this process only, which then stops the agent (below), and the
        # agent its ranks (torchrun forwards SIGTERM, then SIGKILLs after 30 s)
        agent = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    finally:
        log.close()
    try:
        while agent.poll() is None:
            for event in events.read():
                handle(event)
            time.sleep(POLL_S)
        for event in events.read():
            handle(event)
    except BaseException:
        _stop(agent)
        raise
    result_file = work / "result.json"
    if agent.returncode == 0 and result_file.is_file():
        result = json.loads(result_file.read_text(encoding="utf-8"))
        shutil.rmtree(work, ignore_errors=True)  # the model is saved: only it stays
        return result
    error = _synth_error(work)
    if error:  # the user's mistake: the very line a plain process raises
        raise SynthError(error)
    raise SynthError(f"{where}: {_failure(work, agent.returncode, processes)}")


class _Tail:
    """The complete lines appended to a JSON-lines file since the last read (rank 0 writes one line per
    event with one write; a line still being written waits for the next read)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def _stop(agent: subprocess.Popen) -> None:
    """The agent stopped (SIGTERM: torchrun stops its ranks first), killed if it takes longer than 40 s."""
    if agent.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout=40)
    except subprocess.TimeoutExpired:
        agent.kill()  # its ranks die with it (PR_SET_PDEATHSIG)
        agent.wait()


def _errors(work: Path) -> list[dict]:
    """The ranks' error-<rank>.json, their SynthErrors first, then by time (the first failure is the cause;
    the other ranks then fail on the lost connection)."""
    errors = []
    for path in work.glob("error-*.json"):
        with contextlib.suppress(OSError, ValueError):
            errors.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(errors, key=lambda e: (not e.get("synth"), e.get("at", 0)))


def _synth_error(work: Path) -> str | None:
    errors = _errors(work)
    return errors[0]["message"] if errors and errors[0].get("synth") else None


def _failure(work: Path, code: int, n: int) -> str:
    """Why the ranks failed without a SynthError, in one line: the first error a rank wrote, else the
    agent's exit."""
    errors = _errors(work)
    log = work / "launch.log"
    if errors:
        first = errors[0]
        return (f"training process {first.get('rank')} of {n} failed: {first.get('message')}; its traceback is in "
                f"{log}")
    died = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
    return (f"the {n} training processes (torchrun) stopped without a result: torchrun {died}; see {log}; "
            "a re-run resumes from the last checkpoint")


# --------------------------------------------------------------------------------------------------
# The agent and the ranks (python -m synth.train_launch ...)

def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux: prctl PR_SET_PDEATHSIG, which an exec keeps); if
    the parent is already gone, exit now. (synth/stage_worker.py's contract, for the processes here.)"""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's own cleanup is all there is
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def agent_main(parent: int, args: list[str]) -> None:
    """torchrun, in this process (exec), SIGKILLed when `parent` dies; its ranks learn its pid from the
    environment (it stays the same across the exec)."""
    die_with_parent(parent)
    os.environ["SYNTH_TRAIN_AGENT"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *args])


def rank_main(spec_path: Path) -> int:
    """One rank: the training as synth.train.train runs it; rank 0 reports to the parent through the
    launch directory. Exit 0 done, 2 a SynthError, 1 anything else (both with error-<rank>.json)."""
    die_with_parent(int(os.environ.get("SYNTH_TRAIN_AGENT", os.getppid())))
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    work = Path(spec["work"])
    events = open(work / "events.jsonl", "a", encoding="utf-8") if rank == 0 else None

    def emit(event: str, **fields) -> None:
        if events is not None:  # one write per line: the parent never reads half a line as a whole one
            events.write(json.dumps({"event": event, **fields}, default=str) + "\n")
            events.flush()

    try:
        out_dir, checkpoint_dir = Path(spec["out_dir"]), Path(spec["checkpoint_dir"])
        prepared = trainer.prepare(
            spec["method"], Path(spec["data"]), spec["model"], spec["recipe"], out_dir, spec["init"],
            lambda step, logs: emit("log", step=step, logs=logs), checkpoint_dir=checkpoint_dir,
            resume=spec["resume"], on_resume=lambda step, path: emit("resume", step=step, checkpoint=str(path)))
        trace = os.environ.get(TRACE)
        seen = _trace_rows(prepared.trainer) if trace else None
        result = trainer.fit(prepared, out_dir, checkpoint_dir)
        if trace:
            _write_trace(Path(trace), rank, seen, prepared.trainer)
        if rank == 0:
            target = work / "result.json"
            target.with_suffix(".tmp").write_text(json.dumps(result, default=str))
            target.with_suffix(".tmp").replace(target)
        return 0
    except SynthError as exc:
        _error(work, rank, str(exc), synth=True)
        return 2
    except Exception as exc:  # a bug, or a peer's failure seen as a lost connection: the traceback to launch.log
        traceback.print_exc()
        _error(work, rank, f"{type(exc).__name__}: {one_line(exc)[:300]}", synth=False)
        return 1
    finally:
        if events is not None:
            events.close()


def _error(work: Path, rank: int, message: str, synth: bool) -> None:
    (work / f"error-{rank}.json").write_text(json.dumps({"rank": rank, "message": scrub(message), "synth": synth,
                                                         "at": time.time()}))


def _trace_rows(trainer) -> list[str]:
    """SYNTH_TRAIN_TRACE: the digests of the rows this rank's batches hold (the collator sees each; accelerate
    fetches one batch ahead, so a run of max_steps also lists the batch after its last)."""
    seen: list[str] = []
    collate = trainer.data_collator
    held = getattr(collate, "examples", None)  # kd's collator holds the examples; the batch their indices

    def traced(items):
        examples = [held[item["row"]] for item in items] if held is not None else items
        # the token ids of each example, whatever the trainer names them (input_ids; DPO: prompt_ids, chosen_ids...)
        seen.extend(content_hash({k: v.tolist() if hasattr(v, "tolist") else v for k, v in e.items()
                                  if k.endswith("ids")}) for e in examples)
        return collate(items)

    trainer.data_collator = traced
    return seen


def _write_trace(folder: Path, rank: int, seen: list[str], trainer) -> None:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "rows": seen,
                                                         "weights": digest.hexdigest()}))


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "agent" and argv[2] == "--":
        agent_main(int(argv[1]), argv[3:])  # does not return
    if len(argv) == 2 and argv[0] == "rank":
        return rank_main(Path(argv[1]))
    print("usage: python -m synth.train_launch agent PARENT -- TORCHRUN_ARGS | rank SPEC (started by a train "
          "stage with gpus: N, not by hand)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
