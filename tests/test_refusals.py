"""Answer policies of the generate stage. A content-filtered output (finish_reason `content_filter`) is
an error with its cause, not a sample: counted by `synth status`, absent from the stage's rows, asked
again by a re-run. That one runs through the CLI against the scripted OpenAI-compatible server
(tests/scripted_teacher.py, which filters questions containing FILTERME): the openai backend's both
client paths read the finish reason. The refusal and length policies are the stage's own logic: they run
in process (synth.run) with the echo teacher running the same script (conftest.scripted_answers)."""

from __future__ import annotations

import json

import pytest

from conftest import echo_teacher, make_pipeline, query, scripted_answers, synth, synth_run, write
from scripted_teacher import ScriptedTeacher


@pytest.mark.parametrize("client", ["http", "openai"])
def test_content_filter_is_an_error_row_with_its_cause(workspace, client):
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is it?" + (" FILTERME" if i in (2, 5) else "")}
            for i in range(8)]
    write(workspace / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    store = workspace / "out" / "run.duckdb"
    with ScriptedTeacher(p=1.0) as teacher:
        pipeline = write(workspace / "pipeline.yaml", f"""\
            store: out/run.duckdb
            teachers:
              hosted: {{backend: openai, model: m, base_url: "{teacher.base_url}", client: {client}}}
            stages:
              problems: {{kind: load, path: questions.jsonl}}
              solutions: {{kind: generate, input: problems, teacher: hosted, prompt: solve,
                          params: {{temperature: 0.0, max_tokens: 16, seed: 0}}}}
            """)
        first = synth("run", pipeline)
        assert first.returncode == 1 and "2 errors" in first.stderr, first.stderr
        assert sorted(r[0] for r in query(store, "SELECT input_id FROM solutions")) == \
            [f"q{i}" for i in range(8) if i not in (2, 5)]
        errors = query(store, "SELECT cause, message FROM synth.errors")
        assert [e[0] for e in errors] == ["content_filter", "content_filter"]
        assert "content filter" in errors[0][1]
        status = synth("status", pipeline, check=True).stdout
        assert "content_filter" in status
        second = synth("run", pipeline)  # asked again: the scripted filter still refuses
        assert second.returncode == 1 and "2 requests sent" in second.stderr, second.stderr
    assert teacher.requests == 8 + 2


def _questions(marked: dict[int, str], n: int = 8) -> list[dict]:
    return [{"id": f"q{i}", "question": f"Q{i}: what is it?" + (" " + marked[i] if i in marked else "")}
            for i in range(n)]


def _pipeline(workspace, questions: list[dict], extra: str, max_tokens: int = 8):
    return make_pipeline(workspace, files={"questions.jsonl": questions},
                         teachers={"hosted": echo_teacher(scripted_answers(p=1.0), model="m")}, stages={
        "problems": "kind: load, path: questions.jsonl",
        "solutions": "kind: generate, input: problems, teacher: hosted, prompt: solve, "
                     f"params: {{temperature: 0.0, max_tokens: {max_tokens}, seed: 0}}, {extra}"})


def test_refusal_is_an_error_row_when_asked(workspace):
    """on_refusal: error — an answer that reads as a refusal (the no_refusal filter's patterns) is an
    error row with cause `refusal`; by default it stays a sample, for a no_refusal filter to judge."""
    questions = _questions({3: "REFUSE"})
    store = workspace / "out" / "run.duckdb"
    keep = synth_run(_pipeline(workspace, questions, "on_refusal: keep", max_tokens=16))
    assert keep["errors"] == 0
    assert query(store, "SELECT text FROM solutions WHERE input_id = 'q3'")[0][0].startswith("I'm sorry")
    first = synth_run(_pipeline(workspace, questions, "on_refusal: error", max_tokens=16))
    # a policy change re-judges nothing already cached: the refusal was cached under the same request id
    assert (first["errors"], first["sent"]) == (0, 0), first
    (store.parent / "run.duckdb").unlink()
    again = synth_run(_pipeline(workspace, questions, "on_refusal: error", max_tokens=16))
    assert again["errors"] == 1, again
    assert query(store, "SELECT cause FROM synth.errors") == [("refusal",)]
    assert "reads as a refusal" in query(store, "SELECT message FROM synth.errors")[0][0]
    assert sorted(r[0] for r in query(store, "SELECT input_id FROM solutions")) == \
        [f"q{i}" for i in range(8) if i != 3]


def test_length_retry_once_with_more_tokens(workspace):
    """on_length: retry — an answer cut at max_tokens is asked once more with retry_max_tokens, under the
    same request id; the completion records the max_tokens it was made with. A re-run sends nothing."""
    store = workspace / "out" / "run.duckdb"
    pipeline = _pipeline(workspace, _questions({1: "LONG", 4: "LONG"}), "on_length: retry, retry_max_tokens: 16")
    first = synth_run(pipeline)
    assert first["errors"] == 0 and first["sent"] == 8 + 2  # a retry is a request of its own
    rows = query(store, "SELECT g.input_id, c.finish_reason, c.retry_max_tokens, c.text FROM synth.generations g "
                        "JOIN synth.completions c USING (id) ORDER BY g.input_id")
    assert len(rows) == 8 and all(r[1] == "stop" for r in rows)
    retried = {r[0]: r for r in rows if r[2] is not None}
    assert set(retried) == {"q1", "q4"} and all(r[2] == 16 for r in retried.values())
    assert retried["q1"][3].endswith("\\boxed{1}")  # the whole answer, not its first 8 words
    assert synth_run(pipeline)["sent"] == 0  # nothing sent again


def test_length_after_its_retry_is_an_error_with_its_cause(workspace):
    """A retry that is cut again, and on_length: error, leave an error row with cause `length` that
    `synth status` counts; default on_length (keep) keeps the cut sample with finish_reason length."""
    questions = _questions({2: "LONG"})
    store = workspace / "out" / "run.duckdb"
    run = synth_run(_pipeline(workspace, questions, "on_length: retry, retry_max_tokens: 10"))
    assert run["errors"] == 1 and run["sent"] == 8 + 1
    (cause, message, tokens), = query(store, "SELECT cause, message, completion_tokens FROM synth.errors")
    assert cause == "length" and "max_tokens=10 after its retry" in message
    assert tokens == 10  # the rejected answer was paid for: its tokens count toward the stage's spend
    assert "length" in synth("status", workspace / "pipeline.yaml", check=True).stdout  # the CLI counts it
    store.unlink()
    run = synth_run(_pipeline(workspace, questions, "on_length: error"))
    assert run["errors"] == 1 and run["sent"] == 8
    assert query(store, "SELECT cause FROM synth.errors") == [("length",)]
    store.unlink()
    assert synth_run(_pipeline(workspace, questions, "on_length: keep"))["errors"] == 0
    assert query(store, "SELECT finish_reason FROM solutions WHERE input_id = 'q2'") == [("length",)]
