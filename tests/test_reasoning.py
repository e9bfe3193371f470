"""Reasoning teachers: the trace kept apart from the answer (a server's `reasoning_content`, or
`<think>...</think>` split from the text), a reasoning model's request keys (max_completion_tokens,
reasoning_effort, refused parameters left out), and a server that refuses a parameter said in one line.
Servers here are scripted (tests/scripted_teacher.py, a real HTTP server); answers in the text through the
echo teacher."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from conftest import echo_teacher, make_pipeline, query, synth, synth_run
from scripted_teacher import ScriptedTeacher
from synth.errors import SynthError
from synth.teachers import Completion, OpenAITeacherConfig, split_reasoning

TAGS = ["<think>", "</think>"]


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>2 + 3 is 5.</think>\nThe answer is 5.", "2 + 3 is 5.", "The answer is 5."),
    ("  <think>\nhmm\n</think>\n\n\\boxed{5}", "hmm", "\\boxed{5}"),
    ("2 + 3 is 5.</think>5", "2 + 3 is 5.", "5"),  # the chat template opened the tag in the prompt
    ("<think>still thinking when max_tokens came", "still thinking when max_tokens came", ""),
    ("No trace here: \\boxed{5}", None, "No trace here: \\boxed{5}"),
])
def test_a_trace_in_the_text_is_split_from_the_answer(text, reasoning, answer):
    c = split_reasoning(Completion("r", text=text, finish_reason="stop"), TAGS)
    assert (c.reasoning, c.text) == (reasoning, answer)


def test_a_trace_the_server_gave_apart_and_disabled_tags_are_left_alone():
    given = Completion("r", text="<think>x</think>y", reasoning="from the server")
    assert split_reasoning(given, TAGS).text == "<think>x</think>y"
    assert split_reasoning(Completion("r", text="<think>x</think>y"), []).reasoning is None


def test_think_tags_from_an_in_process_teacher_become_the_reasoning_column(workspace):
    """An hf/vllm reasoning model writes its trace in the text; the parser then reads the answer only."""
    rules = [{"match": r"Q(\d+)", "reply": "<think>Let me add: the sum is {{ match[1] }}.</think>\n"
                                           "\\boxed{ {{ match[1] }} }"}]
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve"})
    synth_run(pipeline)
    rows = query(workspace / "out" / "run.duckdb", "SELECT text, reasoning, answer FROM solutions ORDER BY input_id")
    assert len(rows) == 12
    assert all(r[0].startswith("\\boxed{") and r[1].startswith("Let me add: the sum is") and r[2] for r in rows)


def test_reasoning_tags_are_part_of_what_is_cached(workspace):
    """Answers are stored split by the teacher's reasoning_tags: two teachers on one model with other tags
    are two results (not the first one's split read back from the cache), and a changed reasoning_tags
    asks again. The default tags leave the ids as they always were."""
    rules = [{"match": r"Q(\d+)", "reply": "<think>sum {{ match[1] }}</think>\\boxed{ {{ match[1] }} }"}]
    split, whole = echo_teacher(rules, model="m"), echo_teacher(rules, model="m", reasoning_tags=[])
    pipeline = make_pipeline(workspace, teachers={"split": split, "whole": whole}, stages={
        "problems": "kind: load, path: seeds.jsonl, limit: 2",
        "a": "kind: generate, input: problems, teacher: split, prompt: solve",
        "b": "kind: generate, input: problems, teacher: whole, prompt: solve"})
    counts = synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    assert counts["stages"]["b"]["sent"] == 2  # not cached from a's
    assert query(store, "SELECT reasoning, text FROM a ORDER BY input_id")[0] == ("sum 0", "\\boxed{ 0 }")
    assert query(store, "SELECT reasoning, text FROM b ORDER BY input_id")[0] == \
        (None, "<think>sum 0</think>\\boxed{ 0 }")
    # the default tags, spelled out: the same ids as before
    pipeline.write_text(pipeline.read_text().replace('"model": "m"}', '"model": "m", "reasoning_tags": ["<think>", "</think>"]}', 1))
    assert synth_run(pipeline, ["a"], force=True)["stages"]["a"]["sent"] == 0


class ReasoningServer(ScriptedTeacher):
    """An OpenAI-compatible reasoning model: `reasoning_content` beside the answer, reasoning tokens in the
    usage, and (as OpenAI's o-series) a 400 unsupported_parameter for temperature."""

    def __init__(self, refuse: str | None = None, **kw):
        super().__init__(**kw)
        self.refuse, self.bodies = refuse, []

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.refuse and self.refuse in body:
            return web.json_response({"error": {
                "message": f"Unsupported parameter: '{self.refuse}' is not supported with this model.",
                "type": "invalid_request_error", "param": self.refuse, "code": "unsupported_parameter"}}, status=400)
        out = self.response(body)
        out["choices"][0]["message"]["reasoning_content"] = "First I add the two numbers."
        out["usage"]["completion_tokens_details"] = {"reasoning_tokens": 3}
        return web.json_response(out)


def reasoning_pipeline(workspace, base_url: str, **teacher):
    return make_pipeline(workspace, teachers={
        "t": {"backend": "openai", "base_url": base_url, "model": "o3-mini", **teacher}}, stages={
        "problems": "kind: load, path: seeds.jsonl, limit: 3",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve, "
                     "params: {temperature: 0.7, max_tokens: 64, seed: 1}"})


@pytest.mark.parametrize("client", ["http", "openai"])
def test_a_reasoning_model_gets_its_keys_and_its_trace_is_kept(workspace, client):
    with ReasoningServer(p=1.0) as server:
        counts = synth_run(reasoning_pipeline(workspace, server.base_url, client=client, reasoning_effort="low"))
    assert counts["errors"] == 0
    body = server.bodies[0]
    assert body["max_completion_tokens"] == 64 and body["reasoning_effort"] == "low" and body["seed"] is not None
    assert not {"max_tokens", "temperature", "top_p"} & set(body)  # what o-series models refuse: left out
    rows = query(workspace / "out" / "run.duckdb", "SELECT reasoning, reasoning_tokens, answer FROM solutions")
    assert rows and all(r[0] == "First I add the two numbers." and r[1] == 3 and r[2] is not None for r in rows)


def test_a_refused_parameter_is_one_line_naming_it(workspace):
    """A server that refuses a parameter refuses every request: the run stops at the first with one line
    that says which and how to leave it out (here a model not recognised as a reasoning model by name)."""
    with ReasoningServer(refuse="temperature", p=1.0) as server:
        pipeline = reasoning_pipeline(workspace, server.base_url, reasoning=False)
        with pytest.raises(SynthError, match="refuses the parameter 'temperature' .*`omit: \\[temperature\\]`"):
            synth_run(pipeline)
        run = synth("run", pipeline)
        assert run.returncode == 2 and "omit: [temperature]" in run.stderr and "Traceback" not in run.stderr
        run = synth("run", reasoning_pipeline(workspace, server.base_url, reasoning=False, omit=["temperature"]))
    assert run.returncode == 0, run.stderr
    assert "temperature" not in server.bodies[-1]


def test_reasoning_models_are_known_by_name():
    def config(model, **kw):
        return OpenAITeacherConfig(backend="openai", model=model, **kw)
    assert all(config(m).is_reasoning() for m in ("o1", "o3-mini", "o4-mini-2025-04-16", "gpt-5", "openai/gpt-5-mini"))
    assert not any(config(m).is_reasoning() for m in ("gpt-4o", "gpt-4.1-mini", "llama-o3", "tiny"))
    assert config("gpt-4o", reasoning=True).is_reasoning() and not config("o3", reasoning=False).is_reasoning()
    assert config("o3").left_out() >= {"temperature", "top_p"} and config("m", omit=["seed"]).left_out() == {"seed"}
    assert not config("o3").capabilities().logprobs  # a stage asking o3 for logprobs fails before sending
    json.dumps(config("o3").model_dump())


@pytest.mark.parametrize("mode, contents", [
    ("drop", [["\\boxed{ 1 }"]]),
    ("think", [["<think>\nadd 0 and 1\n</think>\n\n\\boxed{ 1 }"]]),
    ("both", [["[t]\nadd 0 and 1\n[/t]\n\n\\boxed{ 1 }"], ["\\boxed{ 1 }"]]),
])
def test_an_export_writes_the_trace_in_the_students_think_format(workspace, mode, contents):
    rules = [{"match": r"Q(\d+): what is (\d+) \+ (\d+)", "reply": "<think>add {{ match[2] }} and {{ match[3] }}</think>"
                                                                  "\\boxed{ {{ match[1] | int * 2 + 1 }} }"}]
    tags = ', think_tags: ["[t]", "[/t]"]' if mode == "both" else ""
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, stages={
        "problems": "kind: load, path: seeds.jsonl, limit: 1",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve",
        "sft": f"kind: export, input: solutions, path: out/sft.jsonl, reasoning: {mode}{tags}"})
    synth_run(pipeline)
    rows = [json.loads(line) for line in (workspace / "out" / "sft.jsonl").read_text().splitlines()]
    assert [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in rows] == contents
    if mode == "both":
        assert [r["id"].rsplit(":", 1)[1] for r in rows] == ["think", "answer"]


def test_reasoning_on_an_export_of_dataset_rows_is_one_line(workspace):
    pipeline = make_pipeline(workspace, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "sft": "kind: export, input: problems, path: out/sft.jsonl, prompt: solve, response: answer_gold, "
               "reasoning: think"})
    with pytest.raises(SynthError, match="stage 'sft': key 'reasoning' .* format: sft of generated rows"):
        synth_run(pipeline)
