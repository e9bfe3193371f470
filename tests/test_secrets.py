"""No API key ever reaches the store, a log or the screen (synth/secrets.py).

Unit tests of scrub(), and real `synth run`s against a scripted OpenAI-compatible server on loopback
whose error answers (400, 500, 401) echo the request's Authorization header and the key itself, through
both clients (the raw-HTTP fast path and the official openai client). After them a key scan: every
column of every table and view of the store cast to text, every file under the workspace as bytes,
and everything the CLI printed must hold no trace of the key. A key the HTTP header cannot carry (a
line break, surrounding whitespace, non-ASCII) is one error line, exit code 2, and no store."""

from __future__ import annotations

import json
import secrets as pysecrets
import sys
import traceback
from pathlib import Path

import click
import pytest
from aiohttp import web
from click.testing import CliRunner

from conftest import cli_env, query, synth, write
from scripted_teacher import ScriptedTeacher

from synth import secrets as S
from synth.errors import SynthError

ENV = "SYNTH_TEST_TEACHER_KEY"


@pytest.fixture()
def key() -> str:
    value = f"sk-test-SECRETKEY-{pysecrets.token_hex(8)}"
    S.register_secret(value)
    return value


# ---- scrub() --------------------------------------------------------------------------------------

def test_scrub_a_registered_value_and_its_encoded_forms(key):
    from urllib.parse import quote

    odd = "k3y/with+odd=chars&more"  # a key whose URL-encoded and JSON-escaped forms differ from it
    S.register_secret(odd)
    text = (f"bad key {key}; again: {key}. url ?key={quote(odd, safe='')} json {json.dumps(odd)[1:-1]} "
            f"raw {odd}")
    out = S.scrub(text)
    assert key not in out and odd not in out and quote(odd, safe="") not in out
    assert out.count(S.REDACTED) == 5 and out.startswith("bad key [REDACTED]; again: [REDACTED].")
    assert S.scrub(out) == out  # idempotent
    # a message cut in the middle of the key (truncated for storage): the fragment goes too
    assert S.scrub(f"HTTP 500: echo {key[:12]}") == "HTTP 500: echo [REDACTED]"
    assert S.scrub(f"{key[-10:]} was the tail") == "[REDACTED] was the tail"


@pytest.mark.parametrize("text, expected", [
    ("Authorization: Bearer abc.def-123", "Authorization: [REDACTED]"),
    ('{"authorization": "Basic dXNlcjpwYXNz", "x": 1}', '{"authorization": "[REDACTED]", "x": 1}'),
    ("{'Authorization': 'Bearer tok'}", "{'Authorization': '[REDACTED]'}"),
    ("sent Bearer eyJhbGciOi.x.y to the server", "sent Bearer [REDACTED] to the server"),
    ("OPENAI_API_KEY=sk-abcdefghijklmnopqrst ok", "OPENAI_API_KEY=[REDACTED] ok"),
    ('{"api_key": "whatever", "api_key_env": "MY_KEY"}', '{"api_key": "[REDACTED]", "api_key_env": "MY_KEY"}'),
    ("GET /v1?api-key=abc123&model=m", "GET /v1?api-key=[REDACTED]&model=m"),
    ("x-api-key: abcdef", "x-api-key: [REDACTED]"),
    ("Incorrect API key provided: sk-proj-AbC123_dEf456-GhI789.", "Incorrect API key provided: [REDACTED]."),
    ("token hf_abcdefghijklmnopqrstuvwxyzABCDEF1234", "token [REDACTED]"),
    # not secrets: left alone
    ("key 'api_key_env': the environment variable MY_KEY is not set", None),
    ("scikit's sk-learn; a task-runner; max_tokens=64", None),
    ("Authorization: [REDACTED]", None),
    ("Authorization: Bearer [REDACTED]", None),
])
def test_scrub_shapes(text, expected):
    out = S.scrub(text)
    assert out == (text if expected is None else expected)
    assert S.scrub(out) == out


def test_scrub_short_values_by_shape_only_and_none():
    S.register_secret("abc12")  # shorter than MIN_LEN: would mangle every text that contains it
    assert S.scrub("abc12 is in this abc12 sentence") == "abc12 is in this abc12 sentence"
    assert S.scrub("Authorization: Bearer abc12") == "Authorization: [REDACTED]"
    assert S.scrub("api_key=abc12") == "api_key=[REDACTED]"
    assert S.scrub(None) is None
    assert S.scrub("") == ""


def test_scrub_keeps_json_valid(key):
    details = {"stdout": f"Authorization: Bearer {key}", "msg": f'"api_key": "{key}"', "n": 3,
               "nested": [{"authorization": f"Bearer {key}"}]}
    out = S.scrub(json.dumps(details))
    assert key not in out and "SECRETKEY" not in out
    assert json.loads(out)["n"] == 3


def test_the_environment_variables_teachers_name_are_scrubbed(monkeypatch):
    from synth.teachers import OpenAITeacherConfig

    value = f"plainvalue-{pysecrets.token_hex(6)}"  # no shape gives it away: only its variable's name
    monkeypatch.setenv("SYNTH_TEST_NAMED_VAR", value)
    S.refresh()
    assert S.scrub(f"echo {value}") == f"echo {value}"
    OpenAITeacherConfig(backend="openai", model="m", api_key_env="SYNTH_TEST_NAMED_VAR")
    assert S.scrub(f"echo {value}") == "echo [REDACTED]"


@pytest.mark.parametrize("bad, what", [("sk-abc\ndef", "line break"), ("sk-abc\x00def", "NUL"),
                                       (" sk-abcdef", "whitespace"), ("sk-abcdef\n", "whitespace"),
                                       ("sk-abcdéf", "non-ASCII"), ("sk-abc def", "whitespace")])
def test_resolve_api_key_refuses_a_key_the_header_cannot_carry(monkeypatch, bad, what):
    from synth.teachers import OpenAITeacherConfig
    from synth.teachers import openai as openai_teacher

    config = OpenAITeacherConfig(backend="openai", model="m", api_key_env=ENV)
    # os.environ cannot hold a NUL: the lookup itself is replaced
    monkeypatch.setattr(openai_teacher.os, "environ", {ENV: bad})
    with pytest.raises(SynthError) as err:
        openai_teacher.resolve_api_key("tutor", config)
    message = str(err.value)
    assert what in message and "'tutor'" in message and ENV in message
    assert "\n" not in message and bad.strip() not in message and "abc" not in message


def test_verdict_table_and_finish_run_scrub(tmp_path, key):
    from synth.verdict_store import verdict_table
    from synth.store import Store
    from synth.verdicts import Verdict

    table = verdict_table(["a", "b"], [Verdict.fail(f"server said Bearer {key}", details={"echo": key}),
                                       Verdict.ok(details={"stdout": "fine"})])
    assert key not in str(table.to_pylist())
    assert json.loads(table.column("details")[0].as_py()) == {"echo": "[REDACTED]"}
    assert table.column("reason")[0].as_py() == "server said Bearer [REDACTED]"

    store = Store(tmp_path / "s.duckdb")
    run_id = store.start_run("run", [], "p.yaml", {})
    store.finish_run(run_id, "failed", {}, error=f"teacher 'x': the server refused the API key ({key})")
    assert query(tmp_path / "s.duckdb", "SELECT error FROM synth.runs")[0][0] == \
        "teacher 'x': the server refused the API key ([REDACTED])"


def test_log_records_and_unexpected_tracebacks_are_scrubbed(key, capsys):
    import logging

    from synth.cli import SynthGroup, _show_progress_logs

    logger = logging.getLogger("synth")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers = []
    try:
        _show_progress_logs()  # its handler writes to this test's captured stderr
        logger.info("batch %s failed: %s", "b1", f"Authorization: Bearer {key}")
        try:
            raise RuntimeError(f"boom {key}")
        except RuntimeError:
            logger.warning("with a traceback", exc_info=True)
    finally:
        logger.handlers, logger.level, logger.propagate = saved
    err = capsys.readouterr().err
    assert "batch b1 failed: Authorization: [REDACTED]" in err and "boom [REDACTED]" in err
    assert key not in err and "SECRETKEY" not in err

    @click.group(cls=SynthGroup)
    def group():
        pass

    @group.command()
    def explode():
        raise ValueError(f"the server answered {{'headers': {{'Authorization': 'Bearer {key}'}}}} and {key}")

    result = CliRunner().invoke(group, ["explode"])
    output = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code == 1
    assert "Traceback" in output and "ValueError" in output and "[REDACTED]" in output
    assert key not in output and "SECRETKEY" not in output


# ---- through the CLI, against a server that echoes the key ----------------------------------------

class EchoingServer(ScriptedTeacher):
    """The scripted teacher, except that a question with ECHO400 / ECHO500 in it, and every request for
    the model `refuse-all` (401), get an error whose body repeats the request's Authorization header,
    the key on its own and all the request's headers."""

    def __init__(self):
        super().__init__(p=1.0)
        self.authorizations: list[str] = []

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        self.authorizations.append(auth)
        user = body["messages"][-1]["content"]
        status = 401 if body["model"] == "refuse-all" else 400 if "ECHO400" in user else 500 if "ECHO500" in user \
            else None
        if status is None:
            return await super()._chat(request)
        key = auth.removeprefix("Bearer ")
        return web.json_response({"error": {
            "message": f"Incorrect API key provided: {key}. You sent Authorization: {auth}",
            "type": "invalid_request_error", "code": "echo",
            "request_headers": dict(request.headers)}}, status=status)


PIPELINE = """\
store: out/run.duckdb
teachers:
  fast:
    backend: openai
    model: scripted
    base_url: {base_url}
    api_key_env: {env}
    client: http
    max_retries: 1
    timeout_s: 20
  official:
    backend: openai
    model: scripted
    base_url: {base_url}
    api_key_env: {env}
    client: openai
    max_retries: 1
    timeout_s: 20
  refused_http:
    backend: openai
    model: refuse-all
    base_url: {base_url}
    api_key_env: {env}
    client: http
    max_retries: 0
  refused_client:
    backend: openai
    model: refuse-all
    base_url: {base_url}
    api_key_env: {env}
    client: openai
    max_retries: 0
stages:
  problems: {{kind: load, path: seeds.jsonl}}
  by_http:
    kind: generate
    input: problems
    teacher: fast
    prompt: solve
    params: {{temperature: 0.7, max_tokens: 32, seed: 1}}
  by_client:
    kind: generate
    input: problems
    teacher: official
    prompt: solve
    params: {{temperature: 0.7, max_tokens: 32, seed: 2}}
  sft: {{kind: export, input: by_http, format: sft, path: out/sft.jsonl}}
  by_refused_http:
    kind: generate
    input: problems
    teacher: refused_http
    prompt: solve
    params: {{temperature: 0.7, max_tokens: 32, seed: 3}}
  by_refused_client:
    kind: generate
    input: problems
    teacher: refused_client
    prompt: solve
    params: {{temperature: 0.7, max_tokens: 32, seed: 4}}
"""

QUESTIONS = ["Q1: what is 1 + 2?", "Q2: what is 2 + 3?", "Q3: what is 3 + 4?",
             "Q4: ECHO400 what is 4 + 5?", "Q5: ECHO500 what is 5 + 6?"]


def key_scan(workspace: Path, needles: list[str], printed: list[str]) -> list[str]:
    """Every place a needle occurs: store columns (all tables and views of all schemas, each row cast
    to text), files under the workspace (as bytes), and what the CLI printed."""
    import duckdb

    hits = []
    store = workspace / "out" / "run.duckdb"
    con = duckdb.connect(str(store), read_only=True)
    try:
        relations = con.execute("SELECT table_schema, table_name FROM information_schema.tables "
                                "WHERE table_catalog = current_database()").fetchall()
        assert ("synth", "errors") in relations and ("synth", "runs") in relations and ("main", "by_http") in relations
        for schema, name in relations:
            rel = f'"{schema}"."{name}"'
            for needle in needles:
                n = con.execute(f"SELECT count(*) FROM {rel} AS t WHERE CAST(t AS VARCHAR) LIKE ?",
                                [f"%{needle}%"]).fetchone()[0]
                if n:
                    hits.append(f"store {schema}.{name}: {n} rows hold {needle!r}")
    finally:
        con.close()
    files = [p for p in workspace.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".synth.json") for p in files) and store in files
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            if needle.encode() in data:
                hits.append(f"file {path.relative_to(workspace)} holds {needle!r}")
    for i, text in enumerate(printed):
        for needle in needles:
            if needle in text:
                hits.append(f"output #{i} holds {needle!r}: {text[max(0, text.index(needle) - 200):][:400]}")
    return hits


def test_no_key_in_store_files_or_output(workspace, key):
    (workspace / "seeds.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    env = cli_env(**{ENV: key})
    with EchoingServer() as server:
        pipeline = write(workspace / "pipeline.yaml", PIPELINE.format(base_url=server.base_url, env=ENV))
        first = synth("run", pipeline, "sft", "by_client", cwd=workspace, env=env, timeout=120)
        refused = [synth("run", pipeline, stage, cwd=workspace, env=env, timeout=120)
                   for stage in ("by_refused_http", "by_refused_client")]
        status = synth("status", pipeline, cwd=workspace, env=env, timeout=120)
        errors = synth("sql", pipeline, "select stage, cause, message from synth.errors", "--format", "json",
                       cwd=workspace, env=env, timeout=120)
    # the runs did what they should: the key was sent, the echoing errors were recorded
    assert server.authorizations and set(server.authorizations) == {f"Bearer {key}"}, first.stderr
    assert first.returncode == 1, first.stderr
    rows = query(workspace / "out" / "run.duckdb", "SELECT stage, cause, message FROM synth.errors")
    causes = sorted((stage, cause) for stage, cause, _ in rows)
    assert causes == [("by_client", "bad_request"), ("by_client", "server_error"),
                      ("by_http", "bad_request"), ("by_http", "server_error")], rows
    assert all("[REDACTED]" in message for _, _, message in rows), rows
    assert len(query(workspace / "out" / "run.duckdb", "SELECT * FROM by_http")) == 3
    for proc in refused:  # a 401 stops the stage with one line, from either client
        assert proc.returncode == 2 and "refused the API key" in proc.stderr and "[REDACTED]" in proc.stderr
    assert "Traceback" not in "".join(p.stderr for p in [first, *refused])
    failed = query(workspace / "out" / "run.duckdb", "SELECT error FROM synth.runs WHERE status = 'failed'")
    assert len(failed) == 2 and all("[REDACTED]" in error for error, in failed)
    # the key scan
    printed = [text for p in (first, *refused, status, errors) for text in (p.stdout, p.stderr)]
    hits = key_scan(workspace, [key, "SECRETKEY", key.rsplit("-", 1)[1]], printed)
    assert hits == []


@pytest.mark.parametrize("bad", ["sk-test-SECRETKEY-abc\ndef", "sk-test-SECRETKEY-abcdef\n", " sk-test-SECRETKEY-ab",
                                 "sk-test-SECRETKEY-abcdé"])
def test_a_key_the_header_cannot_carry_is_one_line(workspace, bad):
    (workspace / "seeds.jsonl").write_text(json.dumps({"question": QUESTIONS[0]}) + "\n")
    pipeline = write(workspace / "pipeline.yaml", PIPELINE.format(base_url="http://127.0.0.1:9/v1", env=ENV))
    proc = synth("run", pipeline, cwd=workspace, env=cli_env(**{ENV: bad}), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("synth: error: teacher '"), proc.stderr
    assert ENV in lines[0] and "Traceback" not in proc.stderr
    assert "SECRETKEY" not in proc.stderr + proc.stdout
    assert not (workspace / "out").exists()  # nothing written: no store, no lock, no export
