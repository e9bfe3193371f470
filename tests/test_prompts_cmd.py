"""`synth prompts` (synth/prompts_cmd.py), through the CLI: the templates a pipeline sees (workspace over
built-in, the stages that render each), and one stage's prompt on one row as `synth run` would send it:
the messages and request ids are the ones a real run stores, cached or not; nothing is sent or written."""

from __future__ import annotations

import json

from conftest import (echo_teacher, graded_pipeline, make_pipeline, query, synth, synth_run, weak_strong_evaluation,
                      write)


def lines(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("synth: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_listing_shows_workspace_over_builtin_and_the_stages_using_each(workspace):
    write(workspace / "prompts" / "cot.yaml", """\
        system: "My own chain of thought."
        user: "{{ question }} ({{ topic }})"
        """)
    rows = [{"id": f"h{i}", "question": f"Q{i}: what is it?", "gold": str(i), "response": str(i)} for i in range(3)]
    path = make_pipeline(workspace, files={"heldout.jsonl": rows}, teachers={"t": echo_teacher(), "u": echo_teacher()},
                         stages={
        "seeds": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: seeds, teacher: t, prompt: cot",
        "graded": "kind: judge, input: solutions, teacher: t",
        "heldout": "kind: load, path: heldout.jsonl",
        "ev": "kind: evaluate, input: heldout, models: [t, u], prompt: solve, "
              "verify: {answer: answer, reference: gold}",
        "sft": "kind: export, input: heldout, prompt: answer, response: response, path: out/sft.jsonl"})
    found = {r["name"]: r for r in lines(synth("prompts", path, "--format", "json"))}
    assert set(found) == {"answer", "cot", "critic_pairwise", "critic_score", "solve"}
    cot = found["cot"]
    assert (cot["source"], cot["shadows_builtin"], cot["parse"]) == ("workspace", True, "text")
    assert cot["path"].endswith("prompts/cot.yaml") and cot["variables"] == ["question", "topic"]
    assert cot["stages"] == [{"stage": "solutions", "kind": "generate", "via": []}]
    assert (found["solve"]["source"], found["solve"]["shadows_builtin"]) == ("workspace", False)
    assert found["solve"]["stages"] == [{"stage": "ev", "kind": "evaluate", "via": ["ev_t", "ev_u"]}]
    assert found["critic_score"]["source"] == "built-in" and found["critic_score"]["parse"] == "score"
    assert found["critic_score"]["variables"] == ["question", "text"]
    assert found["critic_score"]["stages"] == [{"stage": "graded", "kind": "judge", "via": ["graded_critic"]}]
    assert found["answer"]["stages"] == [{"stage": "sft", "kind": "export", "via": []}]
    assert found["critic_pairwise"]["stages"] == [] and found["critic_pairwise"]["variables"] == ["a", "b", "question"]

    table = synth("prompts", path, check=True).stdout
    cot_line = next(line for line in table.splitlines() if " cot " in line)
    assert "yes" in cot_line and "prompts/cot.yaml" in cot_line and "solutions" in cot_line
    assert "graded (judge via graded_critic)" in table and "ev (evaluate via ev_t, ev_u)" in table
    # an export of a dataset's rows renders its template too (its prompt turns; it sends nothing)
    sft = lines(synth("prompts", path, "sft", "--row", "h2", "--format", "json"))
    assert [(c["calls"], c["requests"], c["row_id"]) for c in sft] == [("sft", [], "h2")]
    assert sft[0]["messages"][-1] == {"role": "user", "content": "Q2: what is it?"}
    assert not (workspace / "out").exists()  # nothing written: not even the store


def stored(store, stage: str, input_id: str) -> tuple[list[str], str, str]:
    """(request ids by sample, prompt id, messages as stored) of a generate stage's requests for one input row."""
    got = query(store, "SELECT r.id, r.prompt_id, p.messages FROM synth.generations g JOIN synth.requests r "
                       "USING (id) JOIN synth.prompts p ON p.id = r.prompt_id "
                       f"WHERE g.stage = '{stage}' AND g.input_id = '{input_id}' ORDER BY g.sample")
    assert got and len({(p, m) for _, p, m in got}) == 1
    return [r[0] for r in got], got[0][1], got[0][2]


def test_render_is_what_a_run_sends_before_and_after_it(workspace):
    path = graded_pipeline(workspace, questions=4, p=0.7, samples=2,
                           critic="kind: judge, input: solutions, teacher: scripted")
    store = workspace / "out" / "run.duckdb"
    # before any run: a load input's rows are its seeds; nothing cached, no store created
    before = lines(synth("prompts", path, "solutions", "--row", "q2", "--format", "json"))
    assert len(before) == 1 and before[0]["row_id"] == "q2" and before[0]["index"] == 2
    assert [r["cached"] for r in before[0]["requests"]] == [False, False]
    first = lines(synth("prompts", path, "solutions", "--format", "json"))[0]
    assert (first["row_id"], first["index"], first["rows"]) == ("q0", 0, 4)  # the default: the first row
    # the critic's rows are the generated ones: unknown until solutions has run
    assert "input 'solutions' has not run; run `synth run " in error_line(synth("prompts", path, "critic"))
    assert not store.exists() and not (workspace / "out").exists()

    synth_run(path)
    after = lines(synth("prompts", path, "solutions", "--row", "q2", "--format", "json"))[0]
    ids, pid, messages = stored(store, "solutions", "q2")
    assert [r["id"] for r in after["requests"]] == ids == [r["id"] for r in before[0]["requests"]]
    assert [r["sample"] for r in after["requests"]] == [0, 1]
    assert [r["cached"] for r in after["requests"]] == [True, True]
    assert after["prompt_id"] == pid
    assert json.dumps(after["messages"], ensure_ascii=False) == messages  # byte for byte what was stored
    assert after["messages"] == before[0]["messages"]

    # a judge renders through its critic: on a generated row, the critic call the run made
    critic = lines(synth("prompts", path, "critic", "--index", "3", "--format", "json"))[0]
    assert critic["calls"] == "critic_critic" and critic["template"] == "critic_score"
    ids, pid, messages = stored(store, "critic_critic", critic["row_id"])
    assert [r["id"] for r in critic["requests"]] == ids and critic["prompt_id"] == pid
    assert json.dumps(critic["messages"], ensure_ascii=False) == messages
    assert critic["requests"][0]["cached"] is True

    # the template changes: new messages, new ids, not cached (the store exists); nothing is written
    write(workspace / "prompts" / "solve.yaml", """\
        system: "Think, then end with \\\\boxed{ANSWER}."
        user: "{{ question }}"
        parse: boxed
        """)
    size = store.stat().st_size, store.stat().st_mtime_ns
    edited = synth("prompts", path, "solutions", "--row", "q2")
    assert edited.returncode == 0, edited.stderr
    assert "Think, then end with \\boxed{ANSWER}." in edited.stdout and "Q2: what is it?" in edited.stdout
    assert edited.stdout.count(": not cached") == 2 and ": cached" not in edited.stdout
    assert (store.stat().st_size, store.stat().st_mtime_ns) == size


def test_evaluate_renders_each_models_calls(workspace):
    path = weak_strong_evaluation(workspace, 3)
    synth_run(path)
    calls = lines(synth("prompts", path, "report", "--row", "h1", "--format", "json"))
    assert [(c["calls"], c["teacher"], c["model"]) for c in calls] == [("report_weak", "weak", "weak"),
                                                                         ("report_strong", "strong", "strong")]
    store = workspace / "out" / "run.duckdb"
    for c in calls:
        ids, pid, messages = stored(store, c["calls"], "h1")
        assert [r["id"] for r in c["requests"]] == ids and [r["cached"] for r in c["requests"]] == [True]
        assert (c["prompt_id"], json.dumps(c["messages"], ensure_ascii=False)) == (pid, messages)
    assert calls[0]["messages"] == calls[1]["messages"] and calls[0]["requests"] != calls[1]["requests"]
    table = synth("prompts", path, "report", "--row", "h1", check=True).stdout
    assert "=== report_weak" in table and "=== report_strong" in table
    assert "(the same messages as report_weak)" in table and table.count("Q1: what is it?") == 1


def test_errors_are_one_line(workspace):
    path = graded_pipeline(workspace, questions=3, p=0.7, samples=1)
    assert "no stage 'nope' (stages: " in error_line(synth("prompts", path, "nope"))
    assert "stage 'graded': a verify stage renders no prompt template" in error_line(synth("prompts", path, "graded"))
    assert "--row 'q9': input 'problems' has no row with that id" in \
        error_line(synth("prompts", path, "solutions", "--row", "q9"))
    assert "--index 3 is out of range: the stage renders 3 rows (--index 0 to 2)" in \
        error_line(synth("prompts", path, "solutions", "--index", "3"))
    assert "give --row ID or --index N, not both" in \
        error_line(synth("prompts", path, "solutions", "--row", "q0", "--index", "0"))
    assert not (workspace / "out").exists()
