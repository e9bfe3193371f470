"""A training run killed with SIGKILL resumes from its newest complete checkpoint when re-run, and a
re-run with another recipe starts over and removes the stale checkpoints. Real `synth run`
subprocesses (load -> export sft -> train a tiny local student with TRL), real kill -9, real DuckDB.

    .venv/bin/python -m pytest -q -n 0 tests/test_train_resume.py      (~60 s on 2 cores)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli_env, query, synth, write
from synth.train import checkpoint_complete, latest_checkpoint

MAX_STEPS = 40  # checkpoints every 4 steps (synth's default save_steps: a tenth of the run)

RECIPE = """\
max_steps: {max_steps}
learning_rate: {lr}
per_device_train_batch_size: 4
max_length: 64
logging_steps: 1
seed: 0
"""


def _pipeline(workspace: Path, tiny_model: Path) -> Path:
    (workspace / "train").mkdir(exist_ok=True)
    return write(workspace / "pipeline.yaml", f"""\
store: out/run.duckdb
teachers:
  base: {{backend: hf, model: "{tiny_model}"}}
stages:
  problems: {{kind: load, path: seeds.jsonl}}
  sft_data: {{kind: export, input: problems, format: sft, prompt: solve, response: answer_gold,
             path: out/sft.parquet}}
  sft: {{kind: train, method: sft, data: sft_data, student: base, recipe: train/sft.yaml}}
""")


def _recipe(workspace: Path, lr: str, max_steps: int = MAX_STEPS) -> None:
    write(workspace / "train" / "sft.yaml", RECIPE.format(max_steps=max_steps, lr=lr))


def _run_and_kill(pipeline: Path, attempt: Path, timeout: float = 180, while_running=None) -> tuple[int, str]:
    """`synth run` until it has written a complete checkpoint, then SIGKILL it (after calling
    while_running(), if given: the run is training). Returns the step of the newest complete checkpoint at
    the kill and the run's stderr. The train stage writes its log rows at every logging step here."""
    err = pipeline.parent / f"stderr-{time.monotonic_ns()}.txt"
    started = time.time()
    with open(err, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], stdout=subprocess.DEVNULL,
                                stderr=fh, env=cli_env(OMP_NUM_THREADS="1", SYNTH_TRAIN_LOG_FLUSH_S="0"),
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _written_since(attempt, started):
                if while_running is not None:
                    while_running()
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"no checkpoint before the run ended (exit {proc.poll()}):\n{err.read_text()}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = latest_checkpoint(attempt / "checkpoints", prune=False)
    return int(latest.name.split("-")[1]), err.read_text()


def _written_since(attempt: Path, started: float) -> bool:
    try:
        latest = latest_checkpoint(attempt / "checkpoints", prune=False)
        return latest is not None and (latest / "trainer_state.json").stat().st_mtime > started
    except FileNotFoundError:  # rotated away (or the old attempt removed) while we looked
        return False


def _train_state(store: Path) -> dict:
    return json.loads(query(store, "SELECT detail FROM synth.stages WHERE name = 'sft'")[0][0])


def test_killed_training_resumes_and_a_new_recipe_starts_over(workspace, tiny_model):
    pipeline = _pipeline(workspace, tiny_model)
    store = workspace / "out" / "run.duckdb"
    models = workspace / "out" / "models"
    attempt = models / "sft-attempt"

    # 1. killed mid-training: the checkpoints stay in the stage's attempt directory. Long enough that the
    # CLI calls made while it trains finish before it does
    _recipe(workspace, "0.001", max_steps=10 * MAX_STEPS)
    seen = {}

    def while_running() -> None:
        """While it trains, a user sees it running and can query its loss so far."""
        seen["status"] = synth("status", pipeline, check=True).stdout
        out = synth("sql", pipeline, "SELECT step, loss FROM sft WHERE loss IS NOT NULL ORDER BY step", "--format",
                    "json", check=True).stdout  # the CLI (its reads wait out the run's short writes)
        seen["losses"] = [(r["step"], r["loss"]) for r in map(json.loads, out.splitlines())]

    step1, _ = _run_and_kill(pipeline, attempt, while_running=while_running)
    assert re.search(r"\bsft\s*│\s*train\s*│\s*running\b", seen["status"]), seen["status"]
    steps = [s for s, _ in seen["losses"]]  # read while it trained: every step so far, from 1 (it went on after)
    assert steps and steps == list(range(1, len(steps) + 1)), steps
    assert 0 < step1 < 10 * MAX_STEPS
    first = json.loads((attempt / "attempt.json").read_text())
    marker = attempt / "checkpoints" / f"checkpoint-{step1}" / "marker"
    marker.write_text("from the first recipe")

    # 2. another recipe: the stale attempt goes, training starts at step 0; killed again
    _recipe(workspace, "0.002")
    step2, err2 = _run_and_kill(pipeline, attempt)
    second = json.loads((attempt / "attempt.json").read_text())
    assert "resuming" not in err2 and "removing the checkpoints of run" in err2, err2
    assert second["key"] != first["key"] and second["run_id"] != first["run_id"]
    assert not marker.exists()
    assert 0 < step2 < MAX_STEPS

    # a save the kill interrupted: a checkpoint dir without trainer_state.json is ignored and removed
    partial = attempt / "checkpoints" / f"checkpoint-{MAX_STEPS - 1}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert not checkpoint_complete(partial)

    # 3. same recipe, same data, same student: resumes from the newest complete checkpoint
    out = synth("run", pipeline, env=cli_env(OMP_NUM_THREADS="1"), timeout=300, check=True)
    assert f"resuming from step {step2}" in out.stderr, out.stderr
    print(f"killed at checkpoints {step1} (recipe 1) and {step2} (recipe 2); resumed from {step2} of {MAX_STEPS}")
    state = _train_state(store)
    assert state["steps"] == MAX_STEPS and state["resumed_from"] == step2
    # the log continues the killed run's: every step once, 1..MAX_STEPS
    loss_steps = [r[0] for r in query(store, "SELECT step FROM sft WHERE loss IS NOT NULL ORDER BY step")]
    assert loss_steps == list(range(1, MAX_STEPS + 1))
    # the model exists, the checkpoints and the attempt are gone; only the final model is on disk
    model_dir = Path(state["model_dir"])
    assert (model_dir / "config.json").is_file() and model_dir.parent.parent == models
    assert not attempt.exists()
    assert sorted(p.name for p in models.iterdir()) == [model_dir.parent.name]
    assert not list(models.rglob("checkpoint-*"))
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]

    # 4. up to date now: nothing trains again
    again = synth("run", pipeline, env=cli_env(OMP_NUM_THREADS="1"), timeout=300, check=True)
    assert "sft: up to date" in again.stderr


def test_latest_checkpoint_skips_and_prunes_incomplete(tmp_path):
    def checkpoint(step: int, files: dict[str, str]) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        for name, text in files.items():
            (path / name).write_text(text)
        return path

    full = {"model.safetensors": "w", "optimizer.pt": "o", "scheduler.pt": "s", "rng_state.pth": "r"}
    good = checkpoint(4, {**full, "trainer_state.json": json.dumps({"global_step": 4})})
    checkpoint(8, {**full, "trainer_state.json": '{"global_step": 8, "log_hi'})  # cut while writing
    checkpoint(12, {"model.safetensors": "w"})  # died before the optimizer
    checkpoint(16, {**full, "trainer_state.json": json.dumps({"global_step": 15})})  # not this dir's state
    checkpoint(20, {"model.safetensors": "w", "trainer_state.json": json.dumps({"global_step": 20})})
    (tmp_path / "runs").mkdir()  # not a checkpoint: left alone
    assert latest_checkpoint(tmp_path, prune=False) == good
    assert len(list(tmp_path.glob("checkpoint-*"))) == 5
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "runs"]
    assert latest_checkpoint(tmp_path / "missing") is None

