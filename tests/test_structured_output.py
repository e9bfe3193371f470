"""Structured output (synth/schemas.py): a stage's JSON schema is checked at load time, sent to the
backends that enforce it (OpenAI-compatible `response_format`, xgrammar for hf), checked on every
answer (cause `schema_violation`), and its properties become columns; a judge's critic asks for a
score schema where the backend can enforce one."""

from __future__ import annotations

import json

import pytest

from conftest import echo_teacher, make_pipeline, query, synth_run, write
from scripted_teacher import ScriptedTeacher
from synth.errors import SynthError
from synth.pipeline import load_pipeline

VERDICT = {"type": "object", "properties": {"verdict": {"type": "string", "enum": ["yes", "no"]}},
           "required": ["verdict"], "additionalProperties": False}


class JSONServer(ScriptedTeacher):
    """The scripted OpenAI-compatible server, recording each request body; asked for a schema it answers
    JSON (a critic's score, else a verdict)."""

    def reply(self, body: dict) -> str:  # ScriptedTeacher records each body in self.bodies
        schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema")
        if schema is None:
            return super().reply(body)
        return json.dumps({"score": 8} if "score" in schema["properties"] else {"verdict": "yes"})


def test_answers_are_checked_against_the_schema_and_its_properties_are_columns(workspace):
    """The echo teacher cannot enforce a schema, so synth checks each answer: the valid ones give the
    `verdict` column, the others are error rows with cause schema_violation (asked again by a re-run)."""
    rules = [{"match": r"Q(\d*[02468]):", "reply": '{"verdict": "yes"}'},
             {"match": r"Q(\d*[13579]):", "reply": "I think yes."}]
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": {"kind": "generate", "input": "problems", "teacher": "t", "prompt": "solve", "schema": VERDICT}})
    counts = synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    assert counts["errors"] == 6 and counts["stages"]["solutions"]["rows"] == 6
    assert query(store, "SELECT DISTINCT verdict FROM solutions") == [("yes",)]
    causes = query(store, "SELECT cause, message FROM synth.errors")
    assert {c for c, _ in causes} == {"schema_violation"} and len(causes) == 6
    assert "not a JSON object: 'I think yes.'" in causes[0][1]
    params = json.loads(query(store, "SELECT params FROM synth.requests LIMIT 1")[0][0])
    assert params["json_schema"] == VERDICT  # the schema is part of what is sent, hence of the request id


def test_a_property_named_like_a_generation_column_is_its_own_column(workspace):
    """{reasoning, answer} is the usual schema for a small model: its `reasoning` property must not be lost
    to (nor overwrite) the teacher's trace column: it is answer_reasoning; so for `text`, `id`."""
    schema = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"},
                                               "text": {"type": "string"}}, "required": ["reasoning", "answer"]}
    rules = [{"match": r"Q(\d+):", "reply": '<think>the trace</think>{"reasoning": "add them", '
                                            '"answer": {{ match[1] }}, "text": "t", "id": "x"}'}]
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, files={
        "prompts/j.yaml": 'user: "{{ question }}"\nparse: json\n'}, stages={
        "problems": "kind: load, path: seeds.jsonl, limit: 2",
        "solutions": {"kind": "generate", "input": "problems", "teacher": "t", "prompt": "solve", "schema": schema},
        "free": {"kind": "generate", "input": "problems", "teacher": "t", "prompt": "j"}})
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    assert query(store, "SELECT reasoning, answer_reasoning, answer, answer_text FROM solutions ORDER BY input_id") == \
        [("the trace", "add them", "0", "t"), ("the trace", "add them", "1", "t")]
    # parse: json without a schema: every key of the answers, the taken names renamed alike
    row = query(store, "SELECT reasoning, answer_reasoning, answer_id, answer_text, answer FROM free ORDER BY input_id")
    assert row[0] == ("the trace", "add them", "x", "t", "0")


def test_a_valid_object_that_breaks_the_schema_fails_with_the_path(workspace):
    rules = [{"match": "Q", "reply": '{"verdict": "maybe"}'}]
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": {"kind": "generate", "input": "problems", "teacher": "t", "prompt": "solve", "schema": VERDICT}})
    synth_run(pipeline)
    message = query(workspace / "out" / "run.duckdb", "SELECT message FROM synth.errors LIMIT 1")[0][0]
    assert message.startswith("the answer does not follow the stage's schema: verdict: 'maybe' is not one of")


def test_a_schema_file_is_read_and_a_bad_schema_is_one_line(workspace):
    write(workspace / "verdict.yaml", "type: object\nproperties:\n  verdict: {type: string}\nrequired: [verdict]\n")
    good = make_pipeline(workspace, teachers={"t": echo_teacher()}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve, schema: verdict.yaml"})
    graph = load_pipeline(good)
    assert graph.schemas["solutions"]["required"] == ["verdict"] and "verdict" in graph.columns["solutions"]
    assert "schema" in graph.fingerprint_parts("solutions", {})
    for schema, message in [("nope.json", "no such file"), ({"type": "object", "properties": 3}, "not a valid JSON "
                                                                                                 "schema"),
                            ({"type": "string"}, "the answer is a JSON object")]:
        path = make_pipeline(workspace, teachers={"t": echo_teacher()}, stages={
            "problems": "kind: load, path: seeds.jsonl",
            "solutions": {"kind": "generate", "input": "problems", "teacher": "t", "prompt": "solve",
                          "schema": schema}})
        with pytest.raises(SynthError, match=f"stage 'solutions': key 'schema': .*{message}") as info:
            load_pipeline(path)
        assert "\n" not in str(info.value)


def test_an_openai_compatible_server_is_sent_response_format(workspace):
    with JSONServer(p=1.0) as server:
        pipeline = make_pipeline(workspace, teachers={
            "t": {"backend": "openai", "model": "m", "base_url": server.base_url}}, stages={
            "problems": "kind: load, path: seeds.jsonl",
            "solutions": {"kind": "generate", "input": "problems", "teacher": "t", "prompt": "solve",
                          "schema": VERDICT}})
        counts = synth_run(pipeline)
    assert counts["errors"] == 0 and counts["sent"] == 12
    formats = [b["response_format"] for b in server.bodies]
    assert formats[0] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": VERDICT, "strict": True}}
    assert len(formats) == 12


def test_a_critic_asks_for_a_score_where_the_backend_can_enforce_it(workspace):
    """`schema: auto` (a judge's default): an OpenAI-compatible critic is sent the score schema and its
    JSON scores are read; the echo backend cannot enforce one, so its critic calls carry no schema (their
    request ids, and cache, are those of a judge without the key)."""
    rules = [{"system": "grader", "reply": "Score: 9"}, {"match": r"Q(\d+)", "reply": "\\boxed{ {{ match[1] }} }"}]
    with JSONServer(p=1.0) as server:
        pipeline = make_pipeline(workspace, teachers={
            "t": echo_teacher(rules), "critic": {"backend": "openai", "model": "m", "base_url": server.base_url}},
            stages={"problems": "kind: load, path: seeds.jsonl",
                    "solutions": "kind: generate, input: problems, teacher: t, prompt: solve",
                    "graded": "kind: judge, input: solutions, teacher: critic",
                    "echo_graded": "kind: judge, input: solutions, teacher: t"})
        synth_run(pipeline)
    assert server.bodies[0]["response_format"]["json_schema"]["schema"]["properties"]["score"]["maximum"] == 10
    store = workspace / "out" / "run.duckdb"
    assert query(store, "SELECT DISTINCT score, passed FROM synth.verdicts WHERE stage = 'graded'") == [(8.0, True)]
    assert query(store, "SELECT DISTINCT score FROM synth.verdicts WHERE stage = 'echo_graded'") == [(9.0,)]
    graph = load_pipeline(pipeline)
    assert "graded_critic" in graph.schemas and "echo_graded_critic" not in graph.schemas


def test_hf_enforces_the_schema_with_xgrammar(workspace, tiny_model):
    """A random-weight model writes noise; constrained by the schema's grammar every answer is valid."""
    pytest.importorskip("xgrammar")
    pipeline = make_pipeline(workspace, teachers={"t": {"backend": "hf", "model": str(tiny_model), "batch_size": 4}},
                             stages={"problems": "kind: load, path: seeds.jsonl, limit: 4",
                                     "solutions": {"kind": "generate", "input": "problems", "teacher": "t",
                                                   "prompt": "solve", "samples": 2, "schema": VERDICT,
                                                   "params": {"max_tokens": 24, "temperature": 1.0, "seed": 1}}})
    counts = synth_run(pipeline)
    assert counts["errors"] == 0, query(workspace / "out" / "run.duckdb", "SELECT message FROM synth.errors")
    verdicts = query(workspace / "out" / "run.duckdb", "SELECT verdict, text FROM solutions")
    assert len(verdicts) == 8 and all(v in ("yes", "no") and json.loads(t) == {"verdict": v} for v, t in verdicts)
