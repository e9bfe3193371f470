"""The `openai` teacher's `mode: batch` (synth/teachers/batch.py) through the CLI, on a real pipeline
file, a real DuckDB store and the official openai client, against tests/fake_batch_api.py: a local
fake of the Batch API's files and batches endpoints (the one fake here: no real Batch API server can
run on this machine) whose lines are answered by the scripted teacher's own logic.

What a user with a long batch job relies on: the rows are the teacher's answers; every batch is
recorded in synth.batches the moment it exists; a run killed while batches are in flight (or while
one is being created) resumes them and never submits a request twice; failed and expired lines are
error rows that the next run, and only it, sends again; a budget stop cancels what is still queued;
a bad key or model is one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import duckdb
import pytest

from conftest import cli_env, query, synth, write
from fake_batch_api import FakeBatchAPI
from scripted_teacher import ScriptedTeacher

ROWS, SAMPLES = 30, 2
TOTAL = ROWS * SAMPLES
KEY = "sk-test"


def pipeline_text(base_url: str, mode: str = "batch", store: str = "out/run.duckdb", teacher_extra: str = "",
                  stage_extra: str = "", params: str = "temperature: 1.0, max_tokens: 16, seed: 0") -> str:
    return f"""\
store: {store}
teachers:
  bulk: {{backend: openai, model: scripted, base_url: "{base_url}", api_key_env: BATCH_KEY, mode: {mode},
         poll_interval_s: 0.2, batch_max_requests: 25, max_retries: 1, timeout_s: 20{teacher_extra}}}
stages:
  problems: {{kind: load, path: questions.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: bulk, prompt: solve, samples: {SAMPLES},
              params: {{{params}}}{stage_extra}}}
"""


@pytest.fixture()
def api():
    with FakeBatchAPI(api_key=KEY) as fake:
        yield fake


@pytest.fixture()
def env():
    return cli_env(BATCH_KEY=KEY)


@pytest.fixture()
def questions(workspace):
    write(workspace / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?"})
                                                  + "\n" for i in range(ROWS)))
    return workspace


def read_store(store, sql: str) -> list[tuple]:
    """A query from another process while `synth run` holds the store for its short writes."""
    for _ in range(500):
        try:
            con = duckdb.connect(str(store), read_only=True)
        except duckdb.IOException:  # a write in progress
            time.sleep(0.02)
            continue
        except duckdb.Error:
            return []
        try:
            return con.execute(sql).fetchall()
        except duckdb.CatalogException:
            return []
        finally:
            con.close()
    raise AssertionError("the store stayed locked")


def start_run(pipeline, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(proc: subprocess.Popen, condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def submitted(api: FakeBatchAPI) -> Counter:
    """custom_id -> how many batches it was submitted in."""
    return Counter(cid for b in api.batches for cid in b["custom_ids"])


def test_batch_run_gives_the_online_answers_and_records_its_batches(questions, api, env):
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    store = questions / "out" / "run.duckdb"
    run = synth("run", pipeline, env=env, check=True)
    assert run.stderr.count("submitted (") == 3 and "completed" in run.stderr  # progress while batches run

    rows = dict(query(store, "SELECT id, text FROM solutions"))
    assert len(rows) == TOTAL
    assert [len(b["custom_ids"]) for b in api.batches] == [25, 25, 10]  # batch_max_requests: 25
    assert set(submitted(api)) == set(rows) and max(submitted(api).values()) == 1
    assert all(b["metadata"]["synth_stage"] == "solutions" for b in api.batches)
    recorded = query(store, "SELECT batch_id, stage, teacher, status, requests, unanswered_ids FROM synth.batches "
                            "ORDER BY batch_id")
    assert [r[0] for r in recorded] == [b["id"] for b in api.batches]
    assert all(r[1:4] == ("solutions", "bulk", "completed") and json.loads(r[5]) == [] for r in recorded)
    assert sum(r[4] for r in recorded) == TOTAL
    tokens = query(store, "SELECT sum(prompt_tokens), sum(completion_tokens) FROM solutions")[0]
    assert tokens == (10 * TOTAL, 5 * TOTAL)  # the scripted usage, line by line

    # the same requests sent online to the scripted server get the same answers: same ids, same bodies
    with ScriptedTeacher() as online:
        online_pipeline = write(questions / "online.yaml", pipeline_text(online.base_url, mode="online",
                                                                         store="out/online.duckdb"))
        synth("run", online_pipeline, env=env, check=True)
    assert dict(query(questions / "out" / "online.duckdb", "SELECT id, text FROM solutions")) == rows

    status = synth("status", pipeline, env=env, check=True).stdout
    assert "solutions" in status
    again = synth("run", pipeline, env=env, check=True)
    assert "0 requests sent" in again.stderr and len(api.batches) == 3  # the cache answers everything


def test_killed_while_batches_are_in_flight_resumes_them_without_resubmitting(questions, api, env):
    """A finished batch's answers are committed before the teacher waits on the others (on_idle), so
    `synth status` shows them during a long wait. Then kill -9 with two batches still in progress, and
    the first batch's commit deleted from the store (a fault injected here: as if the process had died
    between reading the batch's results and committing them): the re-run reads the first batch's file
    again and polls the other two; no request is submitted twice."""
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    store = questions / "out" / "run.duckdb"
    api.hold = True  # batches stay in_progress until released
    proc = start_run(pipeline, env)
    try:
        wait_until(proc, lambda: read_store(store, "SELECT count(*) FROM synth.batches WHERE status = 'in_progress'")
                   == [(3,)], "three batches in progress")
        status = synth("status", pipeline, env=env, check=True).stdout  # answers while the run waits
        assert sum(f"batch {b['id']} of solutions: in_progress" in status for b in api.batches) == 3, status
        first = api.batches[0]["id"]
        api.release(first)
        wait_until(proc, lambda: read_store(store, "SELECT count(*) FROM synth.completions") == [(25,)],
                   "the first batch's answers committed while the run waits on the others")
        assert proc.poll() is None
    finally:
        kill_9(proc)
    assert len(api.batches) == 3
    with duckdb.connect(str(store)) as con:  # the injected fault: the first batch's commit is lost
        con.execute("DELETE FROM synth.completions")
        con.execute("DELETE FROM synth.generations WHERE parsed IS NOT NULL")

    api.release()  # the other two finish while no synth process runs
    synth("run", pipeline, env=env, check=True)
    assert len(api.batches) == 3  # no new batch: the recorded ones were adopted, the first one read again
    assert max(submitted(api).values()) == 1 and sum(api.answered.values()) == TOTAL
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (TOTAL, TOTAL)
    assert query(store, "SELECT count(*) FROM synth.completions")[0][0] == TOTAL
    assert query(store, "SELECT status FROM synth.stages WHERE name = 'solutions'")[0][0] == "done"


def test_ctrl_c_keeps_what_arrived_and_cancels_nothing(questions, api, env):
    """SIGINT while batches run, just after the first batch's results were read: one line, exit 130,
    the batches are not cancelled (paid work in progress); the answers the stage had taken are
    committed, the rest of the read batch is read again by the re-run, which submits nothing new."""
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    store = questions / "out" / "run.duckdb"
    api.hold = True
    # SIGINT at its default in the child, as in a terminal (see tests/test_crash_resume.py)
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until(proc, lambda: read_store(store, "SELECT count(*) FROM synth.batches WHERE status = 'in_progress'")
                   == [(3,)], "three batches in progress")
        api.release(api.batches[0]["id"])
        wait_until(proc, lambda: read_store(store, "SELECT count(*) FROM synth.batches WHERE unanswered_ids = '[]'")
                   == [(1,)], "the first batch's results read")
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_9(proc)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert query(store, "SELECT count(*) FROM synth.completions")[0][0] <= 25
    assert [b["status"] for b in api.batches] == ["completed", "in_progress", "in_progress"]

    api.release()
    synth("run", pipeline, env=env, check=True)
    assert len(api.batches) == 3 and max(api.answered.values()) == 1 and sum(api.answered.values()) == TOTAL
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (TOTAL, TOTAL)


def test_killed_while_creating_a_batch_adopts_the_batch_it_created(questions, api, env):
    """The crash window between "the server created the batch" and "synth recorded its id": the
    input file was recorded first, so the re-run finds the batch made from it instead of making another."""
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    store = questions / "out" / "run.duckdb"
    api.stall_create = True  # the first batch is created, its creator never hears back
    proc = start_run(pipeline, env)
    try:
        wait_until(proc, lambda: len(api.batches) == 1 and read_store(
            store, "SELECT status, batch_id FROM synth.batches") == [("uploaded", None)], "the stalled create")
    finally:
        kill_9(proc)
    api.stall_create = False

    synth("run", pipeline, env=env, check=True)
    assert len(api.batches) == 3  # the stalled one adopted, two more for the other 35 requests
    assert max(submitted(api).values()) == 1 and sum(api.answered.values()) == TOTAL
    first = api.batches[0]
    assert query(store, f"SELECT batch_id, status FROM synth.batches WHERE input_file_id = "
                        f"'{first['input_file_id']}'") == [(first["id"], "completed")]
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (TOTAL, TOTAL)


def test_failed_and_expired_lines_are_errors_and_only_they_are_sent_again(questions, api, env):
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    store = questions / "out" / "run.duckdb"
    api.fail_rate = 0.2  # lines answered 500
    api.expire_lines = 20  # batches of 25 expire after 20 lines; the batch of 10 completes
    first = synth("run", pipeline, env=env)
    assert first.returncode == 1 and "re-run retries" in first.stderr, first.stderr
    errors = dict(query(store, "SELECT request_id, cause FROM synth.errors"))
    assert set(errors.values()) == {"server_error", "batch_expired"}
    assert Counter(errors.values())["batch_expired"] == 10
    assert errors == api.errored  # each error row is the line the server wrote
    assert query(store, "SELECT count(*) FROM solutions")[0][0] == TOTAL - len(errors)
    assert sorted(r[0] for r in query(store, "SELECT status FROM synth.batches")) == ["completed", "expired", "expired"]
    assert "solutions" in synth("status", pipeline, env=env, check=True).stdout

    api.fail_rate, api.expire_lines = 0.0, None
    synth("run", pipeline, env=env, check=True)
    resent = {cid for b in api.batches[3:] for cid in b["custom_ids"]}
    assert resent == set(errors)  # exactly the failed and expired requests, nothing answered before
    assert max(api.answered.values()) == 1 and sum(api.answered.values()) == TOTAL
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (TOTAL, TOTAL)


def test_a_batch_that_fails_validation_gives_the_servers_message(questions, api, env):
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    store = questions / "out" / "run.duckdb"
    api.fail_validation = "Invalid value for 'temperature' on line 1."  # the first batch only
    first = synth("run", pipeline, env=env)
    assert first.returncode == 1, first.stderr
    errors = query(store, "SELECT DISTINCT cause, message FROM synth.errors")
    assert len(errors) == 1 and errors[0][0] == "batch_failed" and "Invalid value for 'temperature'" in errors[0][1]
    assert query(store, "SELECT count(*) FROM synth.errors")[0][0] == 25
    synth("run", pipeline, env=env, check=True)
    assert set(api.batches[3]["custom_ids"]) == set(api.batches[0]["custom_ids"]) and len(api.batches) == 4
    assert query(store, "SELECT count(*) FROM solutions")[0][0] == TOTAL


def test_a_full_queue_is_waited_out_in_one_run(questions, api, env):
    """OpenAI fails a batch that would pass the account's enqueued-token limit (token_limit_exceeded,
    "try again once some in_progress batches have been completed"): its requests wait, are submitted
    again when a running batch ends, and the run finishes with no error row and no request answered twice."""
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    store = questions / "out" / "run.duckdb"
    api.max_enqueued, api.hold = 30, True  # room for one batch of 25 at a time
    proc = start_run(pipeline, env)
    try:
        wait_until(proc, lambda: sorted(b["status"] for b in api.batches) == ["failed", "failed", "in_progress"],
                   "two batches refused for the full queue")
        api.release()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_9(proc)
    assert proc.returncode == 0, stderr
    assert len(api.batches) > 3
    assert all(b["errors"]["data"][0]["code"] == "token_limit_exceeded" for b in api.batches if b["status"] == "failed")
    assert max(api.answered.values()) == 1 and sum(api.answered.values()) == TOTAL
    assert query(store, "SELECT count(*) FROM synth.errors")[0][0] == 0
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (TOTAL, TOTAL)


def test_budget_stop_cancels_queued_batches_and_a_larger_budget_finishes(questions, api, env):
    """Each answer costs $0.02 (10 + 5 tokens at the prices below). The first batch's 25 answers cross
    max_cost $0.30: the two batches still queued are cancelled (the Batch API charges completed
    requests only), the 25 answers are kept, and a re-run with a larger budget sends only the other 35."""
    prices = ", prices: {input: 1000, output: 2000}"
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url, teacher_extra=prices,
                                                                stage_extra=", max_cost: 0.3"))
    store = questions / "out" / "run.duckdb"
    api.hold = True
    proc = start_run(pipeline, env)
    try:
        wait_until(proc, lambda: read_store(store, "SELECT count(*) FROM synth.batches WHERE status = 'in_progress'")
                   == [(3,)], "three batches in progress")
        api.release(api.batches[0]["id"])
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_9(proc)
    assert proc.returncode == 1 and "stopped at the budget of solutions" in stderr, stderr
    assert [b["status"] for b in api.batches] == ["completed", "cancelled", "cancelled"]
    assert query(store, "SELECT count(*) FROM solutions")[0][0] == 25  # everything paid for is kept
    assert dict(query(store, "SELECT cause, count(*) FROM synth.errors GROUP BY cause")) == {"batch_cancelled": 35}

    api.hold = False
    write(questions / "pipeline.yaml", pipeline_text(api.base_url, teacher_extra=prices, stage_extra=", max_cost: 100"))
    synth("run", pipeline, env=env, check=True)
    assert {cid for b in api.batches[3:] for cid in b["custom_ids"]} == set(api.batches[1]["custom_ids"]) | set(
        api.batches[2]["custom_ids"])
    assert max(api.answered.values()) == 1 and sum(api.answered.values()) == TOTAL
    assert query(store, "SELECT count(*) FROM solutions")[0][0] == TOTAL


def test_on_length_retries_go_in_a_batch_of_their_own(questions, api, env):
    """An answer cut at max_tokens (on_length: retry) is asked once more with retry_max_tokens: the
    retries share request ids with the first pass but not its params, so they form a new batch that
    carries only them, and the first batch is not taken for their answer."""
    write(questions / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?"
                                                            + (" LONG" if i % 2 else "")}) + "\n" for i in range(10)))
    pipeline = write(questions / "pipeline.yaml", pipeline_text(
        api.base_url, params="temperature: 1.0, max_tokens: 8, seed: 0",
        stage_extra=", on_length: retry, retry_max_tokens: 32"))
    store = questions / "out" / "run.duckdb"
    synth("run", pipeline, env=env, check=True)
    long_ids = {r[0] for r in query(store, "SELECT id FROM solutions WHERE question LIKE '%LONG%'")}
    assert len(api.batches) == 2 and set(api.batches[1]["custom_ids"]) == long_ids and len(long_ids) == 10
    rows = query(store, "SELECT id, finish_reason, retry_max_tokens FROM synth.completions")
    assert len(rows) == 20 and all((r[1], r[2]) == (("stop", 32) if r[0] in long_ids else ("stop", None)) for r in rows)
    synth("run", pipeline, env=env, check=True)
    assert len(api.batches) == 2


def test_logprobs_come_back_from_batches(questions, api, env):
    pipeline = write(questions / "pipeline.yaml", pipeline_text(
        api.base_url, params="temperature: 1.0, max_tokens: 16, seed: 0, logprobs: 2"))
    store = questions / "out" / "run.duckdb"
    synth("run", pipeline, env=env, check=True)
    rows = query(store, "SELECT l.request_id, l.position, l.token, l.token_id, l.logprob, len(l.top) "
                        "FROM synth.logprobs l JOIN solutions s ON s.id = l.request_id ORDER BY 1, 2")
    assert len({r[0] for r in rows}) == TOTAL
    assert all(r[3] is None and r[5] == 2 for r in rows)  # the API gives token strings, not ids
    assert rows[0][1:3] == (0, "Working") and rows[0][4] == pytest.approx(-0.1)


def test_a_refused_key_is_one_line(questions, api, env):
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    proc = synth("run", pipeline, env=cli_env(BATCH_KEY="sk-wrong"))
    assert proc.returncode == 2, proc.stderr
    assert "refused the API key" in proc.stderr and "BATCH_KEY" in proc.stderr and "Traceback" not in proc.stderr
    assert not api.files and not api.batches


def test_an_unknown_model_is_one_line_before_anything_is_uploaded(questions, api, env):
    api.models = {"another-model"}
    pipeline = write(questions / "pipeline.yaml", pipeline_text(api.base_url))
    proc = synth("run", pipeline, env=env)
    assert proc.returncode == 2 and "model 'scripted' not found" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not api.files


def test_input_files_stay_under_the_size_and_count_limits(tmp_path, monkeypatch):
    """The JSONL cut (in-process: a 200 MB file is not made in a test): each file holds one params
    set, at most batch_max_requests lines and at most MAX_FILE_BYTES bytes."""
    from synth.teachers import OpenAITeacherConfig, Request
    from synth.teachers import batch

    monkeypatch.setenv("BATCH_KEY", KEY)
    config = OpenAITeacherConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="BATCH_KEY",
                                 mode="batch", batch_max_requests=7)
    teacher = batch.BatchTeacher("t", config, tmp_path)
    monkeypatch.setattr(batch, "MAX_FILE_BYTES", 1200)
    requests = [Request(f"r{i:03d}", [{"role": "user", "content": "x" * (i % 5) * 40}], {"max_tokens": 8}, 0)
                for i in range(40)]
    files = list(teacher._files(requests, tmp_path))
    seen = []
    for chunk, path in files:
        data = path.read_bytes()
        assert len(data) <= 1200 and 0 < len(chunk) <= 7
        assert [json.loads(x)["custom_id"] for x in data.splitlines()] == [r.id for r in chunk]
        seen += [r.id for r in chunk]
    assert seen == [r.id for r in requests] and len(files) > 40 // 7


def test_the_teacher_in_process_without_a_store(api, monkeypatch, tmp_path):
    """Library use: load_teacher gives the batch teacher for `mode: batch`; without bind() nothing is
    recorded, every request still gets exactly one Completion with the scripted answer, and the caller
    hears of each wait between polls (on_idle, where it commits what it holds)."""
    import threading

    from synth.teachers import OpenAITeacherConfig, Request, load_teacher
    from synth.teachers.http import request_body

    monkeypatch.setenv("BATCH_KEY", KEY)
    config = OpenAITeacherConfig(backend="openai", model="scripted", base_url=api.base_url, api_key_env="BATCH_KEY",
                                 mode="batch", poll_interval_s=0.05, batch_max_requests=4)
    teacher = load_teacher("t", config, tmp_path)
    requests = [Request(f"r{i}", [{"role": "user", "content": f"Q{i}: what is it?"}], {"max_tokens": 16, "seed": 0}, 0)
                for i in range(10)]
    idle = []
    teacher.on_idle = lambda: idle.append(time.monotonic())
    api.hold = True

    def release_later() -> None:  # once all three run, let them finish a few polls later
        while [b["status"] for b in api.batches] != ["in_progress"] * 3:
            time.sleep(0.01)
        time.sleep(0.3)
        api.release()
    threading.Thread(target=release_later, daemon=True).start()
    try:
        out = {c.request_id: c for c in teacher.generate(requests)}
    finally:
        teacher.close()
    assert type(teacher).__name__ == "BatchTeacher" and len(api.batches) == 3 and len(idle) >= 3
    assert out.keys() == {r.id for r in requests} and all(c.ok for c in out.values())
    assert all(out[r.id].text == api.scripted.response(request_body("scripted", r))["choices"][0]["message"]["content"]
               for r in requests)


def test_answers_rejected_by_a_policy_are_asked_again_in_a_new_batch(workspace, api, env):
    """A refusal (on_refusal: error) or an answer cut at max_tokens (on_length: error) that came back in a
    batch is an error row, and the next run submits it again in a new batch rather than re-reading the
    same answer from the old batch's file (which would repeat the error forever)."""
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is it?" + {2: " REFUSE", 5: " LONG"}.get(i, "")}
            for i in range(8)]
    write(workspace / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pipeline = write(workspace / "pipeline.yaml", pipeline_text(
        api.base_url, stage_extra=", on_refusal: error, on_length: error", params="temperature: 0, max_tokens: 8, seed: 0"))
    store = workspace / "out" / "run.duckdb"
    first = synth("run", pipeline, env=env)
    assert first.returncode == 1 and len(api.batches) == 1
    errors = sorted(r[0] for r in query(store, "SELECT cause FROM synth.errors"))
    assert errors == ["length"] * SAMPLES + ["refusal"] * SAMPLES
    again = synth("run", pipeline, env=env)
    assert again.returncode == 1 and len(api.batches) == 2  # asked again, in a batch of their own
    assert sorted(api.batches[1]["custom_ids"]) == sorted(r[0] for r in query(
        store, "SELECT DISTINCT request_id FROM synth.errors"))
    assert query(store, "SELECT count(*) FROM synth.completions") == [(6 * SAMPLES,)]
