"""The train stage in a pipeline: resolve the data file, the base model and the recipe, call
synth.train.train (TRL), and record the result in the store.

- data: the export stage's file (format sft for method sft, dpo for dpo);
- base model: `init`'s trained model when given, else `student` (a teacher's name, or a path/hub id);
- output: <store folder>/models/<stage>-<run id>/model, recorded in the stage's state
  (context.trained_models), so that a retrained model is a new model id for request hashing;
- the training log (one row per logging step) goes to synth.train_logs, the summary to the stage's
  state; the model is then a teacher named after the stage.

Checkpoints go to the stage's attempt directory, <store folder>/models/<stage>-attempt/ (one per stage:
stage names have no '-', so it cannot be another stage's), whose attempt.json holds the key of the
training it belongs to: the stage's fingerprint (config, recipe, student, inputs) plus the content hash
of the data file and the base model's path. A run that finds an attempt with its own key (a run that
was killed) resumes from its newest complete checkpoint; any other attempt is stale and is removed
before training starts over. A finished run removes the attempt, so only the model stays on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Mapping

import pyarrow as pa

from synth import student_fit, train, train_launch
from synth.config import TrainStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import Graph, Kind, Ref
from synth.ids import content_hash, file_sha256
from synth.paths import export_sidecar
from synth.store import Store, now, sql_str
from synth.teachers import HFTeacherConfig, VLLMTeacherConfig, model_signature, resolve_model_path, vocabulary_of
from synth.vocab import vocabulary_mismatch

RUN_DIR = re.compile(r"^(?P<stage>[A-Za-z_][A-Za-z0-9_]*)-\d{8}-\d{6}-[0-9a-f]{6}$")  # <stage>-<run id>


def base_model(graph: Graph, name: str, trained: Mapping[str, str] | None) -> str | None:
    """The model train stage `name` starts from: `init`'s trained model (from `trained`: train stage ->
    model dir), else `student` (a teacher's model or a path/hub id). trained=None: for an `init` stage,
    the student at the root of the init chain (same tokenizer and chat template; its trained model need
    not exist yet)."""
    stage: TrainStage = graph.stage(name)
    if stage.init:
        if trained is None:
            return base_model(graph, stage.init, None)
        base = trained.get(stage.init)
        if base is None:
            raise SynthError(f"{graph.where(name, 'init')}: key 'init': stage '{stage.init}' has no trained model yet")
        return base
    if not stage.student:
        return None
    if stage.student in graph.spec.teachers:
        return resolve_model_path(graph.spec.teachers[stage.student].model, graph.base_dir)
    return resolve_model_path(stage.student, graph.base_dir)


def references(stage: TrainStage, stages) -> list[Ref]:
    return [Ref("data", (stage.data,), ("export",)), Ref("init", (stage.init,) if stage.init else (), ("train",))]


def check(graph: Graph, name: str) -> None:
    """Data of the method's format, a base model (student or init), and a recipe that TRL would accept
    (synth.train.check_recipe, without importing TRL), before anything runs or is written."""
    stage: TrainStage = graph.stage(name)
    data = graph.stage(stage.data)
    if data.format != stage.method:
        raise SynthError(f"{graph.where(name, 'data')}: key 'data': method {stage.method} trains on an export stage "
                         f"with format {stage.method}; {stage.data!r} has format {data.format}")
    if stage.student in graph.stage_teachers:
        raise SynthError(f"{graph.where(name, 'student')}: key 'student': {stage.student!r} is a train stage; to start "
                         "from its model use init: " + stage.student)
    if stage.init is None and stage.student is None:
        raise SynthError(f"{graph.where(name)}: give 'student' (the base model) or 'init' (a train stage to start "
                         "from)")
    recipe = graph.resolve(stage.recipe)
    if not recipe.is_file():
        raise SynthError(f"{graph.where(name, 'recipe')}: key 'recipe': no such file {recipe}")
    try:
        keys = train.check_recipe(recipe, stage.method, base_model(graph, name, None))
    except SynthError as exc:
        raise SynthError(f"{graph.where(name, 'recipe')}: key 'recipe': {exc}") from None
    problem = train.unsupported_key(stage.method, keys)  # a key TRL has but would not honour for this method
    if problem:
        raise SynthError(f"{graph.where(name, 'recipe')}: key 'recipe': {recipe}: {problem}")


def kd_teacher(graph: Graph, name: str) -> str:
    """The teacher whose log-probs a kd train stage's data carries: its export's score stage's teacher, else the
    teacher of the generate stage its rows come from."""
    export = graph.stage(graph.stage(name).data)
    source = graph.stage(export.input)
    return source.teacher if source.kind == "score" else graph.stage(graph.root(export.input)).teacher


def vocabulary_problem(graph: Graph, name: str, trained, vocabulary: str | None = None) -> str | None:
    """Why a kd train stage's student cannot learn from its teacher's token ids (None: one vocabulary), from the
    teacher's config (`vocabulary`: the export's recorded one, at run time). None also when it cannot be told
    before the teacher exists (a student trained earlier in this run as the teacher)."""
    teacher = kd_teacher(graph, name)
    config = graph.teacher_config(teacher, trained or {})
    if vocabulary is None:
        if teacher in graph.stage_teachers and not (Path(config.model) / "config.json").exists():
            return None
        vocabulary = vocabulary_of(config, graph.base_dir)
    if vocabulary is None:
        return (f"teacher '{teacher}' (backend {config.backend}) gives token strings with no tokenizer to read them "
                "by; declare `tokenizer:` on it (the student's), or use a teacher that returns ids (hf, vllm)")
    student = base_model(graph, name, trained if trained and graph.stage(name).init in (trained or {}) else None)
    return vocabulary_mismatch(vocabulary, str(student)) if student else None


def preflight(graph: Graph, name: str, trained, console, will_run: bool) -> None:
    """Before anything is written: the data will fit the student (student_fit: prompt lengths against
    max_length, think tags its template keeps; a refusal is one line, a doubt a warning), and for method
    kd, teacher and student share a vocabulary (one line naming both tokenizers otherwise)."""
    if will_run:
        fit = data_fit(graph, name)
        if fit.errors:
            raise SynthError(f"{graph.where(name)}: {fit.errors[0]}")
        for warning in fit.warnings:
            console.print(f"[yellow]{graph.where(name)}: warning: {warning}[/yellow]", highlight=False)
        train_launch.check_gpus(graph, name)  # gpus: N needs N visible CUDA GPUs (or the CPU test path)
    if graph.stage(name).method != "kd":
        return
    problem = vocabulary_problem(graph, name, trained)
    if problem:
        raise SynthError(f"{graph.where(name, 'student')}: method kd: {problem}")


_FITS: dict[tuple, tuple[Graph, student_fit.Fit]] = {}  # replicas of one arm share their data and student


def data_fit(graph: Graph, name: str) -> student_fit.Fit:
    """student_fit.fit for this stage: its student (the root of an init chain), its recipe's max_length
    (TRL's default when unset) and max_truncated_share."""
    stage: TrainStage = graph.stage(name)
    student = base_model(graph, name, None)
    key = (id(graph), stage.data, str(student), stage.recipe, stage.method)
    if key in _FITS and _FITS[key][0] is graph:
        return _FITS[key][1]
    recipe = train.check_recipe(graph.resolve(stage.recipe), stage.method)
    max_length = recipe.get("max_length", train.config_default(stage.method, "max_length"))
    share = recipe.get("max_truncated_share", train.DEFAULT_MAX_TRUNCATED_SHARE)
    fit = student_fit.fit(graph, name, str(student) if student else None, max_length, share)
    _FITS[key] = (graph, fit)
    return fit


@functools.lru_cache(maxsize=64)  # the arms' replicas train on one file
def _data_readiness(data: str, mtime_ns: int, student: str, method: str, max_length: int) -> dict:
    return train.readiness(Path(data), student, method, max_length)


def data_file(graph: Graph, name: str) -> Path:
    """The file a train stage reads: its export's path, or a saved HF dataset directory's data.parquet (the
    same rows)."""
    data = graph.resolve(graph.stage(graph.stage(name).data).path)
    return data / "data.parquet" if data.suffix == "" else data


def estimate(graph: Graph, name: str, statuses, trained) -> dict:
    """For `synth plan`: how the data fits the student (student_fit), and once the export's file is written
    and fresh, its measured lengths (synth.train.readiness)."""
    stage: TrainStage = graph.stage(name)
    fit = data_fit(graph, name)
    note = fit.note()
    data = data_file(graph, name)
    student = base_model(graph, name, None)
    if stage.method != "kd" and not statuses[stage.data].stale and data.is_file() and fit.max_length \
            and student and (Path(student) / "config.json").is_file():
        try:
            ready = _data_readiness(str(data), data.stat().st_mtime_ns, str(student), stage.method, fit.max_length)
            measured = (f"data: {ready['rows']:,} rows, p99 {ready['p99']:,} / longest {ready['max']:,} tokens of "
                        f"max_length {fit.max_length:,}, {ready['truncated']:,} over")
        except SynthError as exc:  # what training would refuse with: the plan says it, it does not stop
            measured = f"will fail: {exc}"
        note = measured + (f"; {note}" if note else "")
    return {"note": f"{statuses[name].reason} · {note}" if note else statuses[name].reason,
            "fit": {"max_length": fit.max_length, "prompts": fit.prompts, "longest_prompt": fit.longest_prompt,
                    "prompts_over": fit.over, "max_tokens": fit.max_tokens, "think_dropped": fit.think_dropped,
                    "errors": fit.errors, "warnings": fit.warnings}}


def fingerprint(graph: Graph, name: str, trained) -> dict[str, str]:
    """The recipe's text, and a local base model's files (rebuilt with another config or tokenizer, the
    stage retrains)."""
    stage: TrainStage = graph.stage(name)
    parts = {"recipe": content_hash(graph.resolve(stage.recipe).read_text(encoding="utf-8"))}
    if stage.student:
        model = graph.spec.teachers[stage.student].model if stage.student in graph.spec.teachers else stage.student
        parts["student"] = content_hash({"model": model, "files": model_signature(model, graph.base_dir)})
    return parts


def missing_output(graph: Graph, name: str, state: dict) -> str | None:
    model_dir = state["detail"].get("model_dir") if state["status"] == "done" else None
    return None if (Path(model_dir or "/nonexistent") / "config.json").exists() else "its trained model is missing"


def _file_hash(path: Path) -> str:
    try:
        return file_sha256(path).hexdigest()[:16]
    except OSError:
        return "missing"


@contextlib.contextmanager
def _attempt_lock(attempt: Path, where: str):
    """Holds attempt/lock for the duration of a training (flock: the kernel releases it when the
    process dies, kill -9 included), so two runs of one stage never share an attempt."""
    attempt.mkdir(parents=True, exist_ok=True)
    fh = open(attempt / "lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SynthError(f"{where}: another process is training this stage now ({attempt} is locked); "
                             "wait for it to finish") from None
        yield
    finally:
        fh.close()


def _remove_leftovers(models: Path, name: str, keep: Path) -> None:
    """What earlier runs of this stage left that no model needs: checkpoints inside run directories
    (synth before attempt directories) and run directories without a finished model (a run killed
    while saving it). Finished models stay: cached completions name them."""
    if not models.is_dir():
        return
    for d in models.iterdir():
        match = RUN_DIR.match(d.name)
        if not match or match.group("stage") != name or d == keep or not d.is_dir():
            continue
        if not (d / "model" / "config.json").is_file():
            shutil.rmtree(d, ignore_errors=True)
        elif (d / "checkpoints").exists():
            shutil.rmtree(d / "checkpoints", ignore_errors=True)


def run(ctx: RunContext, name: str) -> dict:
    graph, run_id, console = ctx.graph, ctx.run_id, ctx.console
    stage: TrainStage = graph.stage(name)
    if importlib.util.find_spec("trl") is None:
        raise SynthError(f"{graph.where(name)}: train stages need TRL: pip install 'synth-distill[train]'")
    train_launch.check_gpus(graph, name)  # the preflight's check, again: never N processes on CPU unasked
    recipe = train.load_recipe(graph.resolve(stage.recipe), stage.method)
    if stage.seed is not None:  # a replica of `seeds`, or the stage's own override
        recipe["seed"] = stage.seed
    data = data_file(graph, name)
    base = base_model(graph, name, ctx.trained)
    if stage.method == "kd":  # the ids in the file are its teacher's: the student must read them alike
        try:
            recorded = json.loads(export_sidecar(graph.resolve(graph.stage(stage.data).path)).read_text())
        except (OSError, ValueError):
            recorded = {}
        problem = vocabulary_problem(graph, name, ctx.trained, recorded.get("tokenizer"))
        if problem:
            raise SynthError(f"{graph.where(name, 'student')}: method kd: {problem}")
    models = ctx.store.path.parent / "models"
    out = models / f"{name}-{run_id}"  # a new model id for every training run
    model_dir = out / "model"
    attempt = models / f"{name}-attempt"
    key = content_hash({"fingerprint": ctx.fingerprint(name), "data": _file_hash(data), "base": str(base),
                        "method": stage.method})
    live = LiveLog(ctx, name)

    def on_log(step: int, logs: dict) -> None:
        live.add({"step": step, **logs})
        if "loss" in logs:
            console.print(f"  {name}: step {step} loss {logs['loss']:.4f}", highlight=False)

    def on_resume(step: int, checkpoint: Path) -> None:
        console.print(f"  {name}: resuming from step {step} ({checkpoint}), left by run {previous.get('run_id')}",
                      highlight=False)

    with _attempt_lock(attempt, graph.where(name)):
        try:
            previous = json.loads((attempt / "attempt.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        resume = previous.get("key") == key
        if not resume:
            if (attempt / "checkpoints").exists():
                console.print(f"  {name}: removing the checkpoints of run {previous.get('run_id', '?')}, which "
                              "trained on another recipe, data or model", highlight=False)
            shutil.rmtree(attempt / "checkpoints", ignore_errors=True)
            (attempt / "attempt.json").write_text(json.dumps({"key": key, "run_id": run_id, "started_at": str(now()),
                                                              "pid": os.getpid()}))
        if out.exists():
            shutil.rmtree(out)  # a half-written attempt of this very run
        _remove_leftovers(models, name, out)
        processes = train_launch.process_count(stage.gpus)
        on = "" if processes == 1 else f" in {processes} CPU processes ({train_launch.CPU_SWITCH})" \
            if train_launch.cpu_processes() else f" on {processes} GPUs (DDP)"
        console.print(f"  {name}: {stage.method} on {data.name} from {base}{on}")
        live.start()
        if processes > 1:  # DDP through torchrun; this process still writes the store (synth/train_launch.py)
            result = train_launch.train(stage.method, data, base, recipe, out, init=None, on_log=on_log,
                                        processes=processes, checkpoint_dir=attempt / "checkpoints", resume=resume,
                                        on_resume=on_resume, where=graph.where(name))
        else:
            result = train.train(stage.method, data, base, recipe, out, init=None, on_log=on_log,
                                 checkpoint_dir=attempt / "checkpoints", resume=resume, on_resume=on_resume)
        summary = {k: result.get(k) for k in ("steps", "resumed_from", "train_loss", "seconds", "tokens_per_s",
                                              "peak_memory_mb", "readiness", "loss_mask")}
        rows = live.finish(result.get("log") or [])
        with ctx.store.write() as con:
            live.flush(con)  # what is left: the last steps, and a resumed run's earlier steps under this run
            ctx.record(con, name, "done", rows, model_dir=str(model_dir), **summary)
        ctx.set_trained(name, str(model_dir))  # the stage's model is the teacher under its name from now on
        shutil.rmtree(attempt, ignore_errors=True)  # the model is recorded: nothing left to resume
    resumed = f" (resumed from step {result['resumed_from']})" if result.get("resumed_from") is not None else ""
    last = next((r["loss"] for r in reversed(result.get("log") or []) if r.get("loss") is not None), None)
    console.print(f"  {name}: {result.get('steps')} steps{resumed} · mean train loss over the run "
                  f"{_number(result.get('train_loss'))} · last logged loss {_number(last)} · model {model_dir}",
                  highlight=False)
    return {"rows": rows, "model_dir": str(model_dir), **summary}


def trained_teacher(name: str, stage: TrainStage):
    """The teacher config of a train stage's model (its directory filled in once trained: Graph.teacher_config):
    `as_teacher` says the backend (hf in process, or a vLLM engine) and where and how it runs; by default hf on
    a CUDA GPU when torch sees one, else the CPU, in the dtype the model was saved in."""
    t = stage.as_teacher
    model = f"<trained by stage {name}>"
    if t.backend == "vllm":
        return VLLMTeacherConfig(backend="vllm", model=model, dtype=t.dtype, max_model_len=t.max_model_len,
                                 engine=t.engine)
    return HFTeacherConfig(backend="hf", model=model, batch_size=stage.batch_size, device=t.device, dtype=t.dtype)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


# a running train stage writes its log rows to the store at most this often (seconds)
LOG_FLUSH_S = float(os.environ.get("SYNTH_TRAIN_LOG_FLUSH_S", "10"))


class LiveLog:
    """A train stage's log rows in the store while it trains: at the start the stage is recorded as
    running and its view is created (`select step, loss from <stage>` answers from the first flush on,
    `synth status` says running); rows are appended to synth.train_log_history under this run as they
    come, at most every LOG_FLUSH_S seconds (a write is a DuckDB connection: not one per step); at the
    end the rest are written in the transaction that records the stage done. A resumed run's earlier
    steps (restored from the checkpoint, not logged again) are written under this run too, so that the
    stage's view shows the whole curve."""

    def __init__(self, ctx: RunContext, name: str) -> None:
        self.ctx, self.name = ctx, name
        self.pending: list[dict] = []
        self.live = 0  # rows that came through add() (the tail of the trainer's full log)
        self.last_flush = 0.0

    def start(self) -> None:
        with self.ctx.store.write(threads=1) as con:
            Store.replace_view(con, self.name, f"SELECT step, loss, logs FROM synth.train_logs WHERE stage = "
                                               f"{sql_str(self.name)} ORDER BY step")
            self.ctx.record(con, self.name, "running", 0)
        self.last_flush = time.monotonic()

    def add(self, row: dict) -> None:
        self.pending.append(row)
        self.live += 1
        if time.monotonic() - self.last_flush >= LOG_FLUSH_S:
            with self.ctx.store.write(threads=1) as con:
                self.flush(con)

    def finish(self, full_log: list[dict]) -> int:
        """The rows not written live (a resumed run's restored steps) join the pending ones; the total."""
        restored = [r for r in full_log[: max(len(full_log) - self.live, 0)] if "step" in r]
        self.pending = restored + self.pending
        return len(restored) + self.live

    def flush(self, con) -> None:
        rows, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        Store.insert_arrow(con, "synth.train_log_history", pa.table({
            "stage": [self.name] * len(rows), "run_id": [self.ctx.run_id] * len(rows),
            "step": pa.array([int(r["step"]) for r in rows], pa.int32()),
            "loss": pa.array([r.get("loss") for r in rows], pa.float64()),
            "logs": [json.dumps(r, default=str) for r in rows], "created_at": [now()] * len(rows)}), mode="")


KIND = Kind(
    name="train", run=run, references=references, check=check, fingerprint=fingerprint, preflight=preflight,
    missing_output=missing_output,
    estimate=estimate,
    provides_teacher=lambda name, stage: trained_teacher(name, stage),
    reads=lambda graph, name: {graph.resolve(graph.stage(name).recipe): f"the recipe of stage '{name}'"},
    not_fingerprinted=frozenset({"batch_size", "as_teacher"}),  # how its model generates later, not what it trains
    later_keys={"seeds": None, "seed": None, "gpus": None, "as_teacher": None},
)
