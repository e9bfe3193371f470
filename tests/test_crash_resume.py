"""Crash safety and concurrent reads, against a real generation with the `hf` teacher.

`synth run` is killed with SIGKILL in the middle of a generation; the re-run must lose no committed
completion, duplicate none, and send exactly the requests that had not been committed. While the
generation runs, `synth status` and `synth sql` from other processes must answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb

from conftest import SEEDS, cli_env, query, synth, write

SAMPLES = 8
TOTAL = len(SEEDS) * SAMPLES

PIPELINE = f"""\
store: out/run.duckdb
teachers:
  tutor: {{backend: hf, model: MODEL, batch_size: 2}}
stages:
  problems: {{kind: load, path: seeds.jsonl}}
  solutions:
    kind: generate
    input: problems
    teacher: tutor
    prompt: solve
    samples: {SAMPLES}
    params: {{temperature: 1.0, max_tokens: 48, seed: 7}}
"""


def committed(store) -> int:
    """Completions committed so far, read the way a user would while the run holds the store."""
    for _ in range(200):
        try:
            con = duckdb.connect(str(store), read_only=True)
        except duckdb.IOException:  # the writer holds the file for one batch
            time.sleep(0.02)
            continue
        except duckdb.Error:  # not created yet
            return 0
        try:
            return con.execute("SELECT count(*) FROM synth.completions").fetchall()[0][0]
        except duckdb.CatalogException:
            return 0
        finally:
            con.close()
    raise AssertionError("store stayed locked")


def test_kill_9_then_rerun_loses_nothing_and_resends_nothing(workspace, tiny_model):
    pipeline = write(workspace / "pipeline.yaml", PIPELINE.replace("MODEL", str(tiny_model)))
    store = workspace / "out" / "run.duckdb"
    env = cli_env(SYNTH_FLUSH_ROWS="2", SYNTH_FLUSH_SECONDS="0")
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while committed(store) < 10:
            assert proc.poll() is None, f"run ended before the kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "generation made no progress"
            time.sleep(0.1)

        # Readable while running: other processes get answers, not lock errors.
        status = synth("status", pipeline, env=env, timeout=120)
        assert status.returncode == 0, status.stderr
        assert "solutions" in status.stdout
        partial = synth("sql", pipeline, "select count(*) as n from solutions", "--format", "json", env=env)
        assert partial.returncode == 0, partial.stderr
        assert 0 < json.loads(partial.stdout)["n"] <= TOTAL
        assert proc.poll() is None, "the run finished before the kill; make the generation longer"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    kept = dict(query(store, "SELECT id, text FROM synth.completions"))
    assert 0 < len(kept) < TOTAL
    state = query(store, "SELECT status FROM synth.stages WHERE name = 'solutions'")[0][0]
    assert state == "running"  # the stage knows it did not finish...
    plan = json.loads(synth("plan", pipeline, "--format", "json", check=True).stdout)
    solutions = next(r for r in plan if r["stage"] == "solutions")
    assert solutions["stale"] and "did not finish" in solutions["reason"]  # ...and plan says so
    assert solutions["cached"] == len(kept) and solutions["to_send"] == TOTAL - len(kept)

    synth("run", pipeline, env=env, check=True)
    counts = json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])
    # nothing committed was sent again, and nothing received: answers that arrived after the last commit
    # were in the journal and are recorded without asking the teacher
    assert counts["sent"] + counts["recovered"] == TOTAL - len(kept)
    assert not (store.parent / "run.duckdb.journal").exists()  # the journal is gone once it is folded in
    after = dict(query(store, "SELECT id, text FROM synth.completions"))
    assert len(after) == TOTAL
    assert all(after[i] == t for i, t in kept.items())  # committed completions untouched
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (TOTAL, TOTAL)
    assert query(store, "SELECT status FROM synth.stages WHERE name = 'solutions'")[0][0] == "done"
    runs = query(store, "SELECT status FROM synth.runs ORDER BY started_at")
    assert [r[0] for r in runs] == ["running", "ok"]  # the killed run's row stays, unfinished


def uncommitted_run(workspace, tiny_model):
    """A longer generation (16 samples per seed) whose batched commit never comes due, with progress lines
    every 0.2 s: (pipeline, store, total requests, env). The tests stop it once 6 answers have arrived,
    so its length only needs to outlast that by far; the re-run generates the rest."""
    longer = PIPELINE.replace("MODEL", str(tiny_model)).replace(f"samples: {SAMPLES}", "samples: 16")
    env = cli_env(SYNTH_FLUSH_ROWS="100000", SYNTH_FLUSH_SECONDS="100000", SYNTH_PROGRESS_SECONDS="0.2")
    return (write(workspace / "pipeline.yaml", longer), workspace / "out" / "run.duckdb", len(SEEDS) * 16, env)


def test_kill_9_loses_no_answer_that_arrived(workspace, tiny_model):
    """Nothing committed yet (the batched commit is hours away) and kill -9: every answer that had come
    back is in the journal, and the re-run records it without sending it again (DESIGN: nothing paid for
    is lost; synth/journal.py)."""
    pipeline, store, total, env = uncommitted_run(workspace, tiny_model)
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:  # progress lines: wait until some answers have arrived
            lines.append(line)
            if "solutions:" in line and " sent " in line and int(line.split(" sent ")[1].split()[0]) >= 6:
                break
        else:
            raise AssertionError("".join(lines))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed(store) == 0
    journal = store.parent / "run.duckdb.journal"
    received = sum(len(p.read_bytes().splitlines()) for p in journal.iterdir())
    assert received >= 6
    synth("run", pipeline, env=env, check=True)
    counts = json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])
    assert counts["recovered"] == received and counts["sent"] == total - received
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (total, total)
    assert not journal.exists()


def test_ctrl_c_saves_what_arrived(workspace, tiny_model):
    """SIGINT (Ctrl-C) with nothing flushed yet: the completions held in memory are committed before
    exit, the run row says 'interrupted', and the re-run sends only the rest."""
    pipeline, store, total, env = uncommitted_run(workspace, tiny_model)
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default. A shell's background job
    # (`cmd &` in a script, as CI launchers may do) starts with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: restore the default in the child, as a terminal has it.
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    for line in proc.stderr:  # progress lines: wait until some completions are in memory
        lines.append(line)
        if "solutions:" in line and " sent " in line and int(line.split(" sent ")[1].split()[0]) >= 6:
            break
    else:
        raise AssertionError("".join(lines))
    assert committed(store) == 0  # nothing flushed so far
    proc.send_signal(signal.SIGINT)
    err = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    saved = committed(store)
    assert 6 <= saved < total
    assert query(store, "SELECT status FROM synth.runs")[0][0] == "interrupted"
    synth("run", pipeline, env=env, check=True)
    counts = json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])
    assert counts["sent"] == total - saved
