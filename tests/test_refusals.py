"""A content-filtered output (finish_reason `content_filter`) is an error with its cause, not a
sample: counted by `synth status`, absent from the stage's rows, asked again by a re-run. The teacher
is the scripted OpenAI-compatible server (tests/scripted_teacher.py), which filters questions
containing FILTERME; the openai backend, both client paths and the store are real."""

from __future__ import annotations

import json

import pytest

from conftest import query, synth, write
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
