"""`synth run --jobs 2`: independent train stages train at once in worker processes (synth/stage_worker.py),
through the CLI on a real pipeline: the tiny real model, real TRL steps, real DuckDB. Both workers are seen
alive together; what they record is what an in-process run records; a kill -9 of `synth run` leaves no
worker behind, and the re-run finishes the trainings; a failing worker is one line naming its stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, bench_quick, cli_env, live_processes, query, synth, write

pytestmark = pytest.mark.slow


def workspace_with_two_students(root: Path, tiny_model: Path, steps: int = 40) -> Path:
    root.mkdir(exist_ok=True)
    write(root / "rows.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?",
                                                   "answer_gold": f"The answer is {i}."}) + "\n" for i in range(16)))
    (root / "prompts").mkdir(exist_ok=True)
    write(root / "prompts" / "solve.yaml", 'user: "{{ question }}"\n')
    write(root / "sft.yaml", (REPO / "train" / "sft-tiny.yaml").read_text().replace("max_steps: 30", f"max_steps: {steps}"))
    return write(root / "pipeline.yaml", f"""\
store: out/run.duckdb
teachers:
  base: {{backend: hf, model: {tiny_model}}}
stages:
  rows: {{kind: load, path: rows.jsonl}}
  data: {{kind: export, input: rows, format: sft, prompt: solve, response: answer_gold, path: out/sft.parquet}}
  one: {{kind: train, method: sft, data: data, student: base, recipe: sft.yaml, seeds: [0, 1]}}
  later: {{kind: train, method: sft, data: data, init: one, recipe: sft.yaml}}
""")


def workers(root: Path) -> list[int]:
    """Live worker processes of synth runs in this workspace (from /proc)."""
    return live_processes(b"synth.stage_worker", root)


def test_jobs_train_independent_stages_at_once_and_a_kill_leaves_no_worker(tmp_path, tiny_model):
    root = tmp_path / "ws"
    pipeline = workspace_with_two_students(root, tiny_model, steps=400)
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline), "--jobs", "2"], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, together = time.monotonic() + 300, False
    while time.monotonic() < deadline and proc.poll() is None and not together:
        together = len(workers(root)) == 2
        time.sleep(0.05)
    assert together, "two workers never ran at once"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 30
    while workers(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not workers(root), "a worker outlived its killed parent"

    # the re-run, with shorter trainings (a new recipe: they start over), finishes everything
    write(root / "sft.yaml", (REPO / "train" / "sft-tiny.yaml").read_text().replace("max_steps: 30", "max_steps: 6"))
    out = synth("run", pipeline, "--jobs", "2", timeout=600, check=True)
    assert "one_s0 (train)" in out.stderr and "in a worker process" in out.stderr
    store = root / "out" / "run.duckdb"
    states = {n: (s, json.loads(d)) for n, s, d in query(store, "SELECT name, status, detail FROM synth.stages "
                                                                  "WHERE kind = 'train'")}
    assert {n: s for n, (s, _) in states.items()} == {"one_s0": "done", "one_s1": "done", "later_s0": "done",
                                                     "later_s1": "done"}
    for name, (_, detail) in states.items():
        assert (Path(detail["model_dir"]) / "config.json").exists() and detail["steps"] == 6
        assert [r[0] for r in query(store, f"SELECT step FROM {name} WHERE loss IS NOT NULL")] == list(range(1, 7))
    run_id = query(store, "SELECT id FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0]
    assert {r[0] for r in query(store, "SELECT DISTINCT run_id FROM synth.stages WHERE kind = 'train'")} == {run_id}
    # each later_s<seed> started from its own one_s<seed>
    assert states["later_s1"][1]["model_dir"] != states["later_s0"][1]["model_dir"]
    again = synth("run", pipeline, "--jobs", "2", check=True)
    assert "0 stages run" in again.stderr


def test_a_failing_worker_is_one_line_and_the_others_finish(tmp_path, tiny_model):
    root = tmp_path / "ws"
    pipeline = workspace_with_two_students(root, tiny_model, steps=4)
    text = pipeline.read_text().replace("seeds: [0, 1]}", "seeds: [0, 1]}\n  bad: {kind: train, method: sft, data: data, "
                                                         "student: base, recipe: bad.yaml}")
    pipeline.write_text(text)
    write(root / "bad.yaml", "max_steps: 4\nlearning_rate: 1.0e-3\nmax_length: 8\nmax_truncated_share: 0.0\n")
    out = synth("run", pipeline, "--jobs", "2", timeout=600)
    assert out.returncode == 2, out.stderr
    assert "train stage bad failed in its worker process (the error is above)" in out.stderr
    assert out.stderr.count("synth: error:") == 2  # the worker's own line, then the run's
    states = dict(query(root / "out" / "run.duckdb", "SELECT name, status FROM synth.stages WHERE kind = 'train'"))
    assert states.get("one_s0") == "done" and states.get("one_s1") == "done" and states.get("bad") != "done"


def test_a_worker_trains_one_stage_after_another(tmp_path, tiny_model):
    """Three trainings under --jobs 2 take two worker processes, not three: a worker that is done with one
    stage takes the next (torch, transformers and TRL imported once per worker)."""
    root = tmp_path / "ws"
    pipeline = workspace_with_two_students(root, tiny_model, steps=4)
    pipeline.write_text(pipeline.read_text().replace("seeds: [0, 1]}", "seeds: [0, 1, 2]}"))
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline), "one_s0", "one_s1", "one_s2",
                             "--jobs", "2"], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen: set[int] = set()
    while proc.poll() is None:
        seen.update(workers(root))
        time.sleep(0.05)
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr[-3000:]
    states = dict(query(root / "out" / "run.duckdb", "SELECT name, status FROM synth.stages WHERE kind = 'train'"))
    assert states == {"one_s0": "done", "one_s1": "done", "one_s2": "done"}
    assert len(seen) == 2, seen


def test_a_stage_between_two_trainings_runs_first_so_they_train_together(tmp_path, tiny_model):
    """In file order an export sits between two independent trainings (as a score stage sits between DPO
    and an on-policy round from one student): under --jobs 2 it runs first, and both train at once."""
    root = tmp_path / "ws"
    pipeline = workspace_with_two_students(root, tiny_model, steps=4)
    text = pipeline.read_text()
    text = text[:text.index("  one:")] + """\
  one: {kind: train, method: sft, data: data, student: base, recipe: sft.yaml}
  data2: {kind: export, input: rows, format: sft, prompt: solve, response: answer_gold, path: out/sft2.parquet}
  two: {kind: train, method: sft, data: data2, student: base, recipe: sft.yaml}
"""
    pipeline.write_text(text)
    out = synth("run", pipeline, "--jobs", "2", timeout=600, check=True)
    log = " ".join(out.stderr.split())  # rich wraps long lines at the console's width
    assert "one (train): never run · in a worker process" in log, log[-3000:]
    assert "two (train): never run · in a worker process" in log
    assert log.index("data2 (export)") < log.index("one (train)")
    states = dict(query(root / "out" / "run.duckdb", "SELECT name, status FROM synth.stages"))
    assert states["one"] == states["two"] == states["data2"] == "done"


def workspace_with_a_long_training(root: Path, tiny_model: Path) -> Path:
    """`long` trains many steps while `short` trains few; `after` starts from `short` and `gen` samples from
    it; `tail` reads `gen`. Only `long` and `short` are ready when the batch starts."""
    pipeline = workspace_with_two_students(root, tiny_model, steps=4)
    write(root / "long.yaml", (REPO / "train" / "sft-tiny.yaml").read_text().replace("max_steps: 30", "max_steps: 1500")
          .replace("logging_steps: 1 ", "logging_steps: 100 "))
    text = pipeline.read_text()
    return write(pipeline, text[:text.index("  one:")] + """\
  long: {kind: train, method: sft, data: data, student: base, recipe: long.yaml}
  short: {kind: train, method: sft, data: data, student: base, recipe: sft.yaml}
  after: {kind: train, method: sft, data: data, init: short, recipe: sft.yaml}
  gen: {kind: generate, input: rows, teacher: short, prompt: solve, params: {temperature: 0.0, max_tokens: 8}}
  tail: {kind: export, input: gen, format: sft, path: out/tail.parquet}
""")


def test_the_batch_grows_and_the_run_works_beside_its_workers(tmp_path, tiny_model):
    """Under --jobs 2, while `long` trains: `after` (its input `short` done) joins the batch in the free
    worker, and then the run itself samples from `short` and exports (no training waits for a worker),
    all before `long` is done, instead of after it. Everything ends as an in-process run would."""
    root = tmp_path / "ws"
    pipeline = workspace_with_a_long_training(root, tiny_model)
    out = synth("run", pipeline, "--jobs", "2", timeout=900, check=True)
    log = " ".join(out.stderr.split())
    assert "after (train): never run · in a worker process" in log, log[-3000:]
    assert "gen (generate): never run" in log and "gen (generate): never run · in a worker" not in log
    store = root / "out" / "run.duckdb"
    states = {n: (s, t) for n, s, t in query(store, "SELECT name, status, updated_at FROM synth.stages")}
    assert {n: s for n, (s, _) in states.items()} == dict.fromkeys(
        ["rows", "data", "long", "short", "after", "gen", "tail"], "done")
    for name in ("short", "after", "gen", "tail"):
        assert states[name][1] < states["long"][1], (name, states)
    assert query(store, "SELECT count(*) FROM gen")[0][0] == 16
    assert "7 stages run" in out.stderr
    again = synth("run", pipeline, "--jobs", "2", check=True)
    assert "0 stages run" in again.stderr


def test_a_failure_beside_the_workers_lets_them_finish_then_is_one_line(tmp_path, tiny_model):
    """A stage the run does beside its workers fails (here an export whose folder is a file): `long` still
    trains to the end and is recorded, then the run exits 2 with that stage's one line; nothing reads it."""
    root = tmp_path / "ws"
    pipeline = workspace_with_a_long_training(root, tiny_model)
    pipeline.write_text(pipeline.read_text().replace("path: out/tail.parquet", "path: rows.jsonl/tail.parquet"))
    out = synth("run", pipeline, "--jobs", "2", timeout=900)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("synth: error:")]
    assert len(errors) == 1 and "tail" in errors[0], out.stderr[-3000:]
    states = dict(query(root / "out" / "run.duckdb", "SELECT name, status FROM synth.stages"))
    assert states["long"] == states["after"] == states["gen"] == "done" and states.get("tail") != "done"


def test_a_training_that_can_have_no_company_gets_every_core(tmp_path, tiny_model):
    """Two trainings are ready, but one is up to date (a re-run after it finished): the other trains in a
    worker with all the cores, since nothing pending could train beside it."""
    root = tmp_path / "ws"
    pipeline = workspace_with_two_students(root, tiny_model, steps=4)
    synth("run", pipeline, "one_s0", timeout=600, check=True)
    out = synth("run", pipeline, "one_s0", "one_s1", "--jobs", "2", timeout=600, check=True)
    log = " ".join(out.stderr.split())
    cores = os.cpu_count() or 1
    assert f"one_s1 (train): never run · in a worker process ({cores} threads)" in log, log[-3000:]
    assert "one_s0: up to date" in log


def test_bench_quick():
    """bench/parallel_train.py --quick runs both ways, finds the same models, and ends with its JSON line."""
    result = bench_quick("parallel_train.py", timeout=900, env=cli_env())
    assert result["bench"] == "parallel_train" and result["baseline"] > 0 and result["value"] > 0
