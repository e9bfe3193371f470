"""Reliability through the CLI, each test one defect class a user meets on day one: the default store,
stores and exports that would overwrite what the pipeline reads, one writing run per store, a lock held
by a reader in the middle of a run, a full disk, null template values, and verdict history (nothing is
deleted). The teacher is the scripted OpenAI-compatible server on loopback (tests/scripted_teacher.py):
real HTTP, real store, known answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
from aiohttp import web

from conftest import cli_env, query, synth, write
from scripted_teacher import ScriptedTeacher

QUESTIONS = [{"id": f"q{i}", "question": f"Q{i}: what is it?", "answer_gold": str(i)} for i in range(20)]


class SlowTeacher(ScriptedTeacher):
    """The scripted teacher, answering each request after `delay` seconds (a real API's latency)."""

    def __init__(self, delay: float, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    async def _chat(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        return await super()._chat(request)


class GatedTeacher(ScriptedTeacher):
    """The scripted teacher, holding every answer until `release()`: a run that has sent its first
    requests is certainly still running (and writing) until the test lets it finish."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = threading.Event()

    def release(self) -> None:
        self.gate.set()

    async def _chat(self, request: web.Request) -> web.Response:
        response = await super()._chat(request)  # counted on arrival
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        return response


def seeds(workspace: Path, rows=QUESTIONS) -> Path:
    return write(workspace / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def generate_pipeline(base_url: str, samples: int = 2, store: str = "store: out/run.duckdb", extra: str = "") -> str:
    return f"""\
{store}
teachers:
  t: {{backend: openai, model: m, base_url: "{base_url}", max_concurrency: 4}}
stages:
  problems: {{kind: load, path: questions.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: t, prompt: solve, samples: {samples},
              params: {{temperature: 1.0, max_tokens: 16, seed: 0}}}}
{extra}"""


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder -> its sha256: 'nothing written' is checked byte for byte."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("synth: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- the store -------------------------------------------------------------------------------------------

def test_the_default_store_works(workspace):
    """No `store:` key: the README's documented default runs (it once crashed: a file named synth.duckdb
    makes DuckDB's catalog `synth` clash with synth's schema)."""
    seeds(workspace)
    pipeline = write(workspace / "pipeline.yaml", """\
        stages:
          problems: {kind: load, path: questions.jsonl}
          small: {kind: filter, input: problems, where: "length(question) < 16"}
        """)
    synth("run", pipeline, check=True)
    assert (workspace / "data" / "store.duckdb").is_file()
    out = synth("sql", pipeline, "select count(*) as n from small where passed", "--format", "json", check=True)
    assert json.loads(out.stdout)["n"] == 10  # Q0..Q9 are short enough
    assert "small" in synth("status", pipeline, check=True).stdout


@pytest.mark.parametrize("store, needle", [
    ("store: ''", "empty"),
    ("store: out/synth.duckdb", "clashes"),
    ("store: out/MAIN.duckdb", "clashes"),
    ("store: questions.jsonl", "not a DuckDB database"),
    ("store: pipeline.yaml", "pipeline file"),
    ("store: prompts", "directory"),
])
def test_a_store_path_that_cannot_work_is_one_line_and_nothing_is_written(workspace, store, needle):
    seeds(workspace)
    write(workspace / "pipeline.yaml", generate_pipeline("http://127.0.0.1:9/v1", store=store))
    before = snapshot(workspace)
    one_line_error(synth("run", workspace / "pipeline.yaml"), "key 'store'", needle)
    assert snapshot(workspace) == before


# ---- exports never overwrite what the pipeline reads -----------------------------------------------------

@pytest.mark.parametrize("exports, needle", [
    ("  out: {kind: export, input: solutions, format: sft, path: questions.jsonl}\n", "seed file"),
    ("  clean: {kind: decontaminate, input: solutions, against: [heldout.jsonl]}\n"
     "  out: {kind: export, input: solutions, format: sft, path: heldout.jsonl}\n", "evaluation file"),
    ("  out: {kind: export, input: solutions, format: sft, path: .}\n", "holds the store or the pipeline"),
    ("  out: {kind: export, input: solutions, format: sft, path: out}\n", "holds the store or the pipeline"),
    ("  a: {kind: export, input: solutions, format: sft, path: out/sft.jsonl}\n"
     "  b: {kind: export, input: solutions, format: sft, path: out/sft.jsonl}\n", "export 'a'"),
    ("  a: {kind: export, input: solutions, format: sft, path: exports/sft.jsonl}\n"
     "  b: {kind: export, input: solutions, format: sft, path: exports}\n", "export 'a'"),
])
def test_an_export_cannot_overwrite_an_input_or_another_export(workspace, exports, needle):
    seeds(workspace)
    write(workspace / "heldout.jsonl", json.dumps({"text": "Q1: what is it?"}) + "\n")
    write(workspace / "pipeline.yaml", generate_pipeline("http://127.0.0.1:9/v1", extra=exports))
    before = snapshot(workspace)
    one_line_error(synth("run", workspace / "pipeline.yaml"), "key 'path'", needle)
    assert snapshot(workspace) == before


# ---- one writer ----------------------------------------------------------------------------------------------

def test_two_runs_on_one_store_never_send_twice(workspace):
    """A second `synth run` while one is writing refuses at once with one line naming the running one;
    every request is sent exactly once."""
    seeds(workspace)
    store = workspace / "out" / "run.duckdb"
    with GatedTeacher() as teacher:  # the first run's answers wait until the second run was refused
        pipeline = write(workspace / "pipeline.yaml", generate_pipeline(teacher.base_url))
        first = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=cli_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while teacher.requests == 0:
                assert first.poll() is None, first.communicate()
                assert time.monotonic() < deadline, "the first run sent nothing"
                time.sleep(0.05)
            second = synth("run", pipeline)
            line = one_line_error(second, "another synth run is writing", f"pid {first.pid}")
            assert str(store) in line
            # the other commands that never write go on working meanwhile
            assert synth("status", pipeline).returncode == 0
            assert first.poll() is None  # it was writing all along
            teacher.release()
            _, err = first.communicate(timeout=300)
            assert first.returncode == 0, err
        finally:
            teacher.release()
            if first.poll() is None:
                first.kill()
        assert teacher.requests == len(QUESTIONS) * 2
        assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (40, 40)
        again = synth("run", pipeline, check=True)  # the lock went with the first run
        assert teacher.requests == 40 and "0 requests sent" in again.stderr


def test_a_reader_holding_the_store_loses_no_paid_answer(workspace):
    """A reader holds the store for longer than SYNTH_LOCK_TIMEOUT in the middle of a run: the answers
    that arrive meanwhile wait in the journal; either the run commits them once the store is free, or it
    stops with one line and the re-run records them without buying them again."""
    seeds(workspace)
    store = workspace / "out" / "run.duckdb"
    with SlowTeacher(delay=0.1) as teacher:
        pipeline = write(workspace / "pipeline.yaml", generate_pipeline(teacher.base_url))
        env = cli_env(SYNTH_LOCK_TIMEOUT="0.5", SYNTH_FLUSH_ROWS="1", SYNTH_FLUSH_SECONDS="0")
        run = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while teacher.requests < 4:
                assert run.poll() is None and time.monotonic() < deadline, run.communicate()
                time.sleep(0.02)
            con = None
            while con is None:  # the writer holds the file for a moment at a time
                try:
                    con = duckdb.connect(str(store), read_only=True)
                except duckdb.IOException:
                    time.sleep(0.01)
            time.sleep(3)  # answers keep arriving; the run cannot write
            con.close()
            _, err = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
        assert "Traceback" not in err
        if run.returncode != 0:  # the store was still held when the run ended: one line, answers journaled
            assert run.returncode == 2 and "the next run records them" in err, err
            again = synth("run", pipeline, env=env, check=True)
            assert "recovered from the journal" in again.stderr
        assert teacher.requests == 40  # nothing bought twice
        assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (40, 40)
        assert not (store.parent / "run.duckdb.journal").exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line(workspace, tmp_path_factory):
    """The store's disk fills up in the middle of a generation: one line naming the store and what to do,
    no traceback; what was committed stays readable, and a re-run on a disk with room finishes."""
    disk = tmp_path_factory.mktemp("disk") / "small"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a small tmpfs needs root and mount(8); this machine refused")
    try:
        rows = [{"id": f"q{i}", "question": f"Q{i}: " + "what is it? " * 40} for i in range(400)]
        seeds(workspace, rows)
        with ScriptedTeacher(p=1.0) as teacher:
            pipeline = write(workspace / "pipeline.yaml", generate_pipeline(
                teacher.base_url, samples=4, store=f"store: {disk}/run.duckdb"))
            full = synth("run", pipeline, env=cli_env(SYNTH_FLUSH_ROWS="64"))
            assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
            last = [line for line in full.stderr.splitlines() if line.strip()][-1]
            assert last.startswith("synth: error: ") and "no space left" in last.lower(), full.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---- null template values ------------------------------------------------------------------------------------

def test_a_null_value_is_never_sent_as_none(workspace):
    rows = QUESTIONS[:4] + [{"id": "empty", "question": None, "answer_gold": "0"}, {"id": "absent", "answer_gold": "1"}]
    seeds(workspace, rows)
    with ScriptedTeacher(p=1.0) as teacher:
        pipeline = write(workspace / "pipeline.yaml", generate_pipeline(teacher.base_url, samples=1))
        run = synth("run", pipeline, check=True)
        assert "2 input rows not sent" in run.stderr and "'question'" in run.stderr
        assert teacher.requests == 4
        store = workspace / "out" / "run.duckdb"
        assert query(store, "SELECT count(*) FROM synth.prompts WHERE messages::VARCHAR LIKE '%None%'")[0][0] == 0
        errors = query(store, "SELECT cause, message FROM synth.errors ORDER BY message")
        assert [c for c, _ in errors] == ["missing_value", "missing_value"]
        assert "'absent'" in errors[0][1] and "'empty'" in errors[1][1] and "question" in errors[0][1]
        # a default the template declares is honoured
        write(workspace / "prompts" / "solve.yaml", 'user: "{{ question | default(\'Q99: (no question)\') }}"\n'
                                                    "parse: boxed\n")
        synth("run", pipeline, check=True)
        # every rendered text changed; the two null rows render one prompt, sent once
        assert teacher.requests == 4 + 4 + 1
        texts = [m[0] for m in query(store, "SELECT messages::VARCHAR FROM synth.prompts")]
        assert sum("(no question)" in t for t in texts) == 1


# ---- nothing is deleted: verdict history -----------------------------------------------------------------------

def test_verdicts_keep_their_history(workspace):
    rows = [{"id": f"r{i}", "answer": a, "answer_gold": "2"} for i, a in enumerate(["2", "2.0", "two", "3"])]
    seeds(workspace, rows)

    def pipeline(method: str, limit: str = "") -> Path:
        return write(workspace / "pipeline.yaml", f"""\
            store: out/run.duckdb
            stages:
              problems: {{kind: load, path: questions.jsonl{limit}}}
              graded: {{kind: verify, input: problems, method: {method}, answer: answer, reference: answer_gold}}
            """)

    store = workspace / "out" / "run.duckdb"
    synth("run", pipeline("exact"), check=True)
    assert query(store, "SELECT id FROM graded WHERE passed ORDER BY id") == [("r0",)]
    synth("run", pipeline("numeric"), check=True)  # an edited filter: new verdicts, the old ones stay
    assert query(store, "SELECT id FROM graded WHERE passed ORDER BY id") == [("r0",), ("r1",)]
    assert query(store, "SELECT count(*) FROM synth.verdicts")[0][0] == 4  # the current ones
    assert query(store, "SELECT count(*), count(DISTINCT version), count(DISTINCT run_id) "
                        "FROM synth.verdict_history")[0] == (8, 2, 2)
    why = synth("why", pipeline("numeric"), "r1", check=True).stdout
    assert "graded: passed" in why and "earlier" in why and "wrong_answer" in why
    synth("run", pipeline("numeric", ", limit: 2"), check=True)  # fewer rows: the dropped rows' verdicts stay
    assert query(store, "SELECT count(*) FROM synth.verdicts")[0][0] == 2
    assert query(store, "SELECT count(DISTINCT row_id) FROM synth.verdict_history")[0][0] == 4


def test_kill_9_buys_nothing_twice_but_what_was_in_flight(workspace):
    """The review's measurement: 80 requests at concurrency 8 against a local server, kill -9 after 30
    answers, re-run. Before the journal the re-run bought up to 2 s of answers again (110 sent in all);
    now at most the requests in flight at the kill are sent twice."""
    seeds(workspace, QUESTIONS)
    store = workspace / "out" / "run.duckdb"
    with SlowTeacher(delay=0.05) as teacher:
        text = generate_pipeline(teacher.base_url, samples=4).replace("max_concurrency: 4", "max_concurrency: 8")
        pipeline = write(workspace / "pipeline.yaml", text)
        env = cli_env(SYNTH_FLUSH_SECONDS="100000", SYNTH_FLUSH_ROWS="100000")  # nothing committed before the kill
        proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while teacher.requests < 30:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
        finally:
            proc.kill()
            proc.wait()
        synth("run", pipeline, env=env, check=True)
        assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (80, 80)
        assert 80 <= teacher.requests <= 80 + 8, teacher.requests


def test_sigterm_stops_like_ctrl_c(workspace):
    """`kill` (SIGTERM: a scheduler, `timeout`) commits what arrived and marks the run interrupted."""
    seeds(workspace, QUESTIONS)
    store = workspace / "out" / "run.duckdb"
    with SlowTeacher(delay=0.05) as teacher:
        pipeline = write(workspace / "pipeline.yaml", generate_pipeline(teacher.base_url, samples=4))
        env = cli_env(SYNTH_FLUSH_SECONDS="100000", SYNTH_FLUSH_ROWS="100000")
        proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while teacher.requests < 10:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.terminate()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        saved = query(store, "SELECT count(*) FROM synth.completions")[0][0]
        # what the stage had received is committed (answers still on their way sit in the journal)
        assert saved > 0 and query(store, "SELECT status FROM synth.runs")[0][0] == "interrupted"
        synth("run", pipeline, env=env, check=True)
        assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (80, 80)
        assert teacher.requests <= 80 + 4  # at most the requests in flight (max_concurrency 4) sent twice
