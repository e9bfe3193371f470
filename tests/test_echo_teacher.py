"""The echo teacher (synth/teachers/echo.py): deterministic answers without a model or a server, the
in-process seam the stage tests run on. Its answers, tokens, length cut, logprobs and scripted rules,
then the same through `synth run` (the CLI, once) and `synth.run` (in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import echo_teacher, make_pipeline, query, scripted_answers, synth, synth_run
from synth.errors import SynthError
from synth.ids import request_id
from synth.teachers import EchoTeacherConfig, Request, load_teacher

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q3: what is it?"}]


def teacher(**config):
    return load_teacher("e", EchoTeacherConfig(backend="echo", **config), Path("."))


def request(sample: int = 0, messages=MESSAGES, **params) -> Request:
    params = {"temperature": 1.0, "max_tokens": 256, "seed": 0, **params}
    return Request(request_id("echo", messages, params, sample), messages, params, sample)


def test_default_answer_echoes_the_request_and_is_deterministic():
    t = teacher()
    first = [teacher().answer(request(k)) for k in range(4)]
    again = list(t.generate([request(k) for k in range(4)]))
    assert [c.text for c in first] == [c.text for c in again]
    assert first[0].text == f"Q3: what is it? [sample 0, seed {request(0).seed}]"
    assert len({c.text for c in first}) == 4  # each sample its own seed, its own answer
    c = first[0]
    assert (c.finish_reason, c.error, c.completion_tokens) == ("stop", None, len(c.text.split()))
    assert c.prompt_tokens == len("Be brief." + "Q3: what is it?") // 4  # characters / 4
    assert teacher().answer(request(0, seed=None)).text.endswith("[sample 0, seed none]")
    assert t.capabilities.logprobs and t.capabilities.n_samples and not t.calls_on_result_in_worker


def test_max_tokens_cuts_words_and_stop_strings_cut_text():
    c = teacher().answer(request(0, max_tokens=3))
    assert (c.text, c.finish_reason, c.completion_tokens) == ("Q3: what is", "length", 3)
    c = teacher().answer(request(0, stop=["what"]))
    assert (c.text, c.finish_reason) == ("Q3: ", "stop")
    four = teacher(answers=[{"reply": "one two  three four"}])
    assert (four.answer(request(0, max_tokens=4)).finish_reason, four.answer(request(0, max_tokens=4)).text) == \
        ("stop", "one two  three four")  # exactly max_tokens words: not cut
    assert four.answer(request(0, max_tokens=3)).text == "one two  three"


def test_logprobs_shape():
    c = teacher().answer(request(0, logprobs=3, max_tokens=4))
    words = c.text.split()
    lp = c.logprobs  # the compact form (teachers.token_logprobs): strings, no ids
    assert lp["k"] == 3 and lp["token_ids"] is None and lp["top_ids"] is None
    assert len(lp["tokens"]) == len(words) == c.completion_tokens == 4 == len(lp["top_tokens"]) // 3
    for t, token in enumerate(lp["tokens"]):
        assert token == (" " if t else "") + words[t]
        assert lp["logprobs"][t] == pytest.approx(-0.1 * (t + 1))
        assert lp["top_tokens"][3 * t:3 * t + 3] == [token, "alt1", "alt2"]
        assert lp["top_logprobs"][3 * t] == lp["logprobs"][t] > lp["top_logprobs"][3 * t + 1]
    assert teacher().answer(request(0)).logprobs is None  # not asked
    assert teacher(logprobs=False).capabilities.logprobs is False


def test_rules_first_match_wins_with_errors_and_content_filter():
    t = teacher(answers=[{"match": "FAIL", "error": "rate_limit"},
                         {"match": "FILTER", "reply": "cut", "finish_reason": "content_filter"},
                         {"system": "grader", "match": r"Q(\d+)", "reply": "Score: {{ match[1] }} s{{ sample }}"},
                         {"match": r"Q(\d+)", "reply": "{{ box(match[1] | int * 2) }}"},
                         {"match": "BAD", "reply": "{{ match[5] }}"}])
    assert t.answer(request(0)).text == "\\boxed{6}"
    graded = [{"role": "system", "content": "You are a grader."}, MESSAGES[1]]
    assert t.answer(request(2, messages=graded)).text == "Score: 3 s2"
    failed = t.answer(request(0, messages=[{"role": "user", "content": "FAIL now"}]))
    assert (failed.error, failed.text) == ("rate_limit", None)
    filtered = t.answer(request(0, messages=[{"role": "user", "content": "FILTER me"}]))
    assert (filtered.text, filtered.finish_reason) == ("cut", "content_filter")
    unmatched = t.answer(request(0, messages=[{"role": "user", "content": "hello"}]))
    assert unmatched.text.startswith("hello [sample 0")
    broken = t.answer(request(0, messages=[{"role": "user", "content": "BAD"}]))
    assert (broken.error, broken.text) == ("backend_error", None) and "BAD" in broken.error_message


def test_bad_rules_are_refused_when_the_config_is_read():
    with pytest.raises(ValueError, match="not a regular expression"):
        EchoTeacherConfig(backend="echo", answers=[{"match": "(", "reply": "x"}])
    with pytest.raises(ValueError, match="reply template does not parse"):
        EchoTeacherConfig(backend="echo", answers=[{"reply": "{{ oops"}])


@pytest.mark.parametrize("p,wrong", [(0.5, 2), (0.9, 3)])
def test_scripted_answers_match_the_scripted_server(p, wrong):
    """The echo rules of conftest.scripted_answers answer as tests/scripted_teacher.py's server does
    (text and finish reason; the server's usage is fixed at 5 tokens, the echo teacher counts words)."""
    from scripted_teacher import ScriptedTeacher

    server, echo = ScriptedTeacher(p=p, wrong=wrong), teacher(answers=scripted_answers(p, wrong))
    solve = "Solve step by step and end with \\boxed{ANSWER}."
    grader = "You are a strict grader of step-by-step solutions."
    compare = "You compare two step-by-step solutions to the same problem."
    cases = [[{"role": "system", "content": solve}, {"role": "user", "content": f"Q{i}: what is it?{extra}"}]
             for i in range(30) for extra in ("", " LONG", " REFUSE", " FILTERME")]
    cases += [[{"role": "system", "content": grader},
               {"role": "user", "content": f"Problem:\nQ{i}: what is it?\n\nSolution:\nso \\boxed{{{a}}}{extra}"}]
              for i in range(5) for a in (i, i + 1) for extra in ("", " NOSCORE")]
    cases += [[{"role": "system", "content": compare},
               {"role": "user", "content": f"Problem:\nQ{i}: x\n\nSolution A:\n\\boxed{{{a}}}\n\nSolution B:\n"
                                           f"\\boxed{{{b}}}"}]
              for i in range(3) for a in (i, i + 1) for b in (i, i + 2)]
    for messages in cases:
        for k in range(3):
            r = request(k, messages=messages, max_tokens=8)
            mine = echo.answer(r)
            theirs = server.response({"messages": messages, "seed": r.seed, "max_tokens": 8, "model": "m"})
            choice = theirs["choices"][0]
            assert (mine.text, mine.finish_reason) == (choice["message"]["content"], choice["finish_reason"]), messages


def test_echo_through_the_cli_and_in_process(workspace):
    """`synth run` (the real CLI, once) with an echo teacher: no server; re-running sends nothing, in
    process too; logprobs land in synth.logprobs."""
    pipeline = make_pipeline(workspace, teachers={"dry": echo_teacher()}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": {"kind": "generate", "input": "problems", "teacher": "dry", "prompt": "solve", "samples": 2,
                      "params": {"max_tokens": 6, "seed": 1, "logprobs": 2}}})
    proc = synth("run", pipeline, check=True)
    assert "24 requests sent" in proc.stderr
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT text, finish_reason, completion_tokens, model FROM solutions")
    assert len(rows) == 24 and all(r[1] == "length" and r[2] == 6 and r[3] == "echo" for r in rows)
    assert query(store, "SELECT count(*) FROM synth.logprobs")[0][0] == 24 * 6
    counts = synth_run(pipeline)
    assert (counts["sent"], counts["stages_run"]) == (0, [])
    counts = synth_run(pipeline, ["solutions"], force=True)
    assert (counts["sent"], counts["cached"], counts["stages_run"]) == (0, 24, ["solutions"])
    argv = json.loads(query(store, "SELECT argv FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])
    assert argv == ["run", str(pipeline), "solutions", "--force"]


def test_in_process_errors_raise_synth_error(workspace):
    import synth as synth_api

    pipeline = make_pipeline(workspace, teachers={"dry": echo_teacher()}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: dry, prompt: solve"})
    with pytest.raises(SynthError, match="no stage named 'nope'"):
        synth_run(pipeline, ["nope"])
    assert list(synth_api.load(pipeline).order) == ["problems", "solutions"]
    write_bad = make_pipeline(workspace, teachers={"dry": echo_teacher(answers=[{"match": "(", "reply": "x"}])},
                              stages={"problems": "kind: load, path: seeds.jsonl"}, name="bad.yaml")
    with pytest.raises(SynthError, match="not a regular expression"):
        synth_api.load(write_bad)
