"""The inspection commands a user reads a store with (`synth why`, `synth sql`, `synth sample`, `synth grep`,
`synth diff`) and the read-only `synth.open`, through the CLI as a user runs them, on pipelines of the echo
teacher's scripted answers (conftest.graded_pipeline): no model, each answer known."""

from __future__ import annotations

import json
import re

import pytest

from conftest import echo_teacher, graded_pipeline, make_pipeline, query, scripted_answers, synth, synth_run
from synth.errors import SynthError


def test_why_names_any_row_id(workspace):
    """`synth why` takes any id a user meets and says what it is: an input row (its requests with their
    verdicts, its pairs), a request (or a unique prefix of one), a pair; an unknown id is one line, exit 2;
    and nothing prints a warning."""
    pipeline = graded_pipeline(workspace, questions=4, p=0.5, samples=4,
                               prefs="kind: pairs, input: solutions, by: graded, max_per_input: 1")
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    input_id, pair_id, chosen = query(store, "SELECT input_id, id, chosen_id FROM prefs ORDER BY id LIMIT 1")[0]

    row = synth("why", pipeline, input_id, check=True)
    assert row.stdout.startswith(f"input row {input_id} (a row of problems)")
    requests = query(store, f"SELECT id FROM solutions WHERE input_id = '{input_id}'")
    assert len(requests) == 4 and all(r[0] in row.stdout for r in requests)
    assert "graded: passed" in row.stdout and "graded: failed (wrong_answer)" in row.stdout
    assert "prefs: 1 preference pair from its samples" in row.stdout

    pair = synth("why", pipeline, pair_id, check=True)
    assert pair.stdout.startswith(f"pair {pair_id} (a pairs stage's row)") and "rule verified" in pair.stdout
    assert f"chosen · request {chosen}" in pair.stdout

    request = synth("why", pipeline, chosen[:8], check=True)
    assert request.stdout.startswith(f"request {chosen} (a generate stage's row)") and "input row (problems)" in request.stdout
    for out in (row, pair, request):
        assert "Warning" not in out.stderr, out.stderr

    missing = synth("why", pipeline, "nothing-here")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "no request, pair, scored sequence or input row with id 'nothing-here'" in missing.stderr


def test_synth_open_is_read_only(workspace):
    """synth.open: a stage's table, a query with parameters, Arrow, the relations; no write method, and a
    writing statement fails with one line saying the reader is read-only (the store is unchanged)."""
    import synth as synth_lib

    pipeline = graded_pipeline(workspace, questions=3, p=0.5, samples=2)
    synth_run(pipeline)
    store = synth_lib.open(pipeline)
    assert "read-only" in repr(store)
    assert len(store.table("solutions")) == 6 and len(store.table("synth.runs")) == 1
    assert store.sql("SELECT count(*) AS n FROM solutions WHERE input_id = ?", ["q1"]).n[0] == 2
    assert store.arrow("SELECT id FROM problems ORDER BY id").column("id").to_pylist() == ["q0", "q1", "q2"]
    assert {"problems", "solutions", "graded"} <= set(store.relations())
    for method in ("write", "writer", "start_run", "finish_run", "set_stage", "replace_table", "insert_arrow"):
        assert not hasattr(store, method), method
    with pytest.raises(SynthError, match="read-only"):
        store.sql("DELETE FROM synth.completions")
    assert len(store.table("synth.completions")) == 6
    with pytest.raises(SynthError, match="query failed"):
        store.table("no_such_stage")


def test_sql_json_writes_json_columns_as_json(workspace):
    """`synth sql --format json`: a DuckDB JSON column (params, parsed, ...) is a JSON value in the output,
    not a string holding JSON; text stays text; a statement without rows prints nothing."""
    pipeline = graded_pipeline(workspace, questions=2, p=1.0, samples=1)
    synth_run(pipeline)
    out = synth("sql", pipeline, "SELECT r.params, g.parsed, g.id, NULL::JSON AS nothing FROM synth.requests r "
                "JOIN synth.generations g USING (id) ORDER BY g.id LIMIT 1", "--format", "json", check=True).stdout
    row = json.loads(out)
    assert row["params"] == {"temperature": 1.0, "max_tokens": 16, "seed": 0}
    assert isinstance(row["parsed"], dict) and "answer" in row["parsed"]
    assert isinstance(row["id"], str) and row["nothing"] is None
    assert synth("sql", pipeline, "SET threads = 1", "--format", "json", check=True).stdout == ""


# ---- synth sample / grep / diff (synth/explore.py) ---------------------------------------------------------

def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _one_error_line(proc, *fragments: str) -> None:
    """A user's mistake: exit 2, one line on stderr naming it, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("synth: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


def test_sample_is_reproducible_and_selects_by_verdict(workspace):
    """`synth sample`: N rows in the documented order (md5 of id and seed), the same under the same seed,
    others under another; --reason picks the rows a filter rejected with it (duplicate_of matches its
    duplicate_of:<id> reasons), --filter F --passed/--failed those F passed/failed; each count is the
    store's; a row's verdicts are printed beneath it; mistakes are one line."""
    pipeline = graded_pipeline(workspace, questions=6, p=0.5, samples=3,
                               dups="kind: dedup, input: solutions, column: text")
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    total = query(store, "SELECT count(*) FROM solutions")[0][0]

    first = synth("sample", pipeline, "solutions", "-n", "4", "--seed", "7", "--format", "json", check=True)
    rows = _json_lines(first.stdout)
    expected = [r[0] for r in query(store, "SELECT id FROM solutions ORDER BY md5(id || ':7') LIMIT 4")]
    assert [r["id"] for r in rows] == expected
    assert first.stderr.strip() == f"4 of {total} rows of solutions (seed 7)"
    assert {v["stage"] for r in rows for v in r["verdicts"]} == {"graded", "dups"}
    again = synth("sample", pipeline, "solutions", "-n", "4", "--seed", "7", "--format", "json", check=True)
    assert again.stdout == first.stdout
    other = synth("sample", pipeline, "solutions", "-n", "4", "--seed", "8", "--format", "json", check=True)
    assert [r["id"] for r in _json_lines(other.stdout)] == [
        r[0] for r in query(store, "SELECT id FROM solutions ORDER BY md5(id || ':8') LIMIT 4")] != expected

    wrong = {r[0] for r in query(store, "SELECT row_id FROM synth.verdicts WHERE stage = 'graded' AND NOT passed "
                                        "AND reason = 'wrong_answer'")}
    assert 0 < len(wrong) < total
    out = synth("sample", pipeline, "solutions", "--reason", "wrong_answer", "-n", "100", "--format", "json",
                check=True)
    assert {r["id"] for r in _json_lines(out.stdout)} == wrong
    assert out.stderr.strip() == f"{len(wrong)} of {len(wrong)} rows of solutions matching reason wrong_answer (seed 0)"

    dup = query(store, "SELECT row_id, reason FROM synth.verdicts WHERE stage = 'dups' AND NOT passed ORDER BY row_id")
    assert dup and all(reason.startswith("duplicate_of:") for _, reason in dup)
    by_prefix = synth("sample", pipeline, "solutions", "--reason", "duplicate_of", "-n", "100", "--format", "json",
                      check=True)
    assert {r["id"] for r in _json_lines(by_prefix.stdout)} == {row_id for row_id, _ in dup}
    exact = synth("sample", pipeline, "solutions", "--reason", dup[0][1], "--format", "json", check=True)
    assert {r["id"] for r in _json_lines(exact.stdout)} == {row_id for row_id, reason in dup if reason == dup[0][1]}

    passed = {r[0] for r in query(store, "SELECT row_id FROM synth.verdicts WHERE stage = 'graded' AND passed")}
    out = synth("sample", pipeline, "solutions", "--filter", "graded", "--passed", "-n", "100", "--format", "json",
                check=True)
    assert {r["id"] for r in _json_lines(out.stdout)} == passed
    out = synth("sample", pipeline, "solutions", "--filter", "graded", "--failed", "-n", "2", check=True)
    assert f"2 of {total - len(passed)} rows of solutions that failed graded (seed 0)" in out.stdout
    assert out.stdout.count("verdict graded: failed") == 2 and "solutions #2 · " in out.stdout

    _one_error_line(synth("sample", pipeline, "nothing"), "no stage output named 'nothing' (have: ")
    _one_error_line(synth("sample", pipeline, "solutions", "--reason", "nope"),
                    "rejected no row of 'solutions' with reason 'nope' (reasons: ", "wrong_answer")
    _one_error_line(synth("sample", pipeline, "solutions", "--filter", "dups", "--reason", "wrong_answer"),
                    "'dups' rejected no row of 'solutions' with reason 'wrong_answer' (reasons: duplicate_of")
    _one_error_line(synth("sample", pipeline, "problems", "--reason", "wrong_answer"), "judged no row of 'problems'")
    _one_error_line(synth("sample", pipeline, "solutions", "--failed"), "--failed needs --filter F")
    _one_error_line(synth("sample", pipeline, "solutions", "--filter", "solutions"),
                    "'solutions' is not a filter stage with verdicts (filters: dups, graded)")


def test_grep_substring_regex_and_case(workspace):
    """`synth grep` counts its hits the way a direct look at the store does: completions (one hit per request),
    the rendered prompts (one per stage, input row and role) and load stages' text columns; case-insensitive
    substring by default (no wildcards: `_` is a character), --case-sensitive, --regex (RE2); -n caps what is
    printed; each JSON hit's span is the match in its snippet; mistakes are one line."""
    pipeline = graded_pipeline(workspace, questions=6, p=0.5, samples=3)
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    completions = [t for (t,) in query(store, "SELECT c.text FROM synth.generations g JOIN synth.completions c "
                                              "USING (id)")]
    prompts = {(stage, input_id, m["role"], m["content"]) for stage, input_id, messages in query(
        store, "SELECT g.stage, g.input_id, p.messages FROM synth.generations g JOIN synth.requests r USING (id) "
               "JOIN synth.prompts p ON p.id = r.prompt_id") for m in json.loads(messages)}
    questions = [q for (q,) in query(store, "SELECT question FROM problems")]
    texts = completions + [content for *_, content in prompts] + questions

    def hits(proc) -> list[dict]:
        return _json_lines(proc.stdout)

    answer = "boxed{3}"
    expected = sum(answer in t for t in texts)
    assert expected == sum(answer in t for t in completions) > 0
    out = synth("grep", pipeline, "BOXED{3}", "--format", "json", check=True)
    assert len(hits(out)) == expected
    assert all(h["where"] == "completion" and h["stage"] == "solutions" for h in hits(out))
    for h in hits(out):
        a, b = h["match"]
        assert h["snippet"][a:b] == "boxed{3}"
    assert out.stderr.startswith(f"showing {expected} of {expected} hits of 'BOXED{{3}}'")
    assert synth("grep", pipeline, "BOXED{3}", "--case-sensitive", check=True).stdout.strip() == \
        "showing 0 of 0 hits of 'BOXED{3}'"

    everywhere = sum("q1:" in t.lower() for t in texts)
    assert everywhere == 2  # the question in problems and the user message it was rendered into (3 samples: 1 prompt)
    table = synth("grep", pipeline, "q1:", check=True).stdout
    assert "problems" in table and "question" in table and "prompt:user" in table
    assert "showing 2 of 2 hits of 'q1:' (problems: question 1; solutions: prompt:user 1)" in table

    pattern = r"boxed\{[13]\}"
    expected = sum(bool(re.search(pattern, t)) for t in texts)
    out = synth("grep", pipeline, pattern, "--regex", "-n", "2", "--format", "json", check=True)
    assert len(hits(out)) == 2 and out.stderr.startswith(f"showing 2 of {expected} hits")
    assert all(re.fullmatch(pattern, h["snippet"][h["match"][0]:h["match"][1]]) for h in hits(out))
    assert synth("grep", pipeline, "q[0-2]:", "--regex", "--case-sensitive", check=True).stdout.strip().endswith(
        "showing 0 of 0 hits of 'q[0-2]:'")
    out = synth("grep", pipeline, "q[0-2]:", "--regex", "--stage", "problems", "--format", "json", check=True)
    assert sorted(h["id"] for h in hits(out)) == ["q0", "q1", "q2"]
    assert synth("grep", pipeline, "it_", check=True).stdout.strip() == "showing 0 of 0 hits of 'it_'"  # not LIKE

    _one_error_line(synth("grep", pipeline, "(", "--regex"), "--regex '(': not a valid regular expression")
    _one_error_line(synth("grep", pipeline, "x", "--stage", "graded"),
                    "'graded' (a verify stage) has no text of its own")
    _one_error_line(synth("grep", pipeline, "x", "--stage", "nothing"), "no stage output named 'nothing'")


def test_diff_two_verify_stages(workspace):
    """`synth diff A B` of two verify stages (math on the parsed answer vs exact on the whole text): each one's
    rows, pass rate and top reason, rows paired by id, the verdicts that changed (both sides shown), as the
    store has them; a generate stage and a filter cannot be compared (one line)."""
    pipeline = graded_pipeline(workspace, questions=6, p=0.5, samples=3,
                               strict="kind: verify, input: solutions, method: exact, answer: text, reference: gold")
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    out = _json_lines(synth("diff", pipeline, "graded", "strict", "-n", "3", "--format", "json", check=True).stdout)
    summary, examples = out[0], out[1:]
    assert summary["type"] == "summary" and summary["sort"] == "filter"
    for side, stage in (("a", "graded"), ("b", "strict")):
        judged, passed = query(store, f"SELECT count(*), count(*) FILTER (WHERE passed) FROM synth.verdicts "
                                      f"WHERE stage = '{stage}'")[0]
        assert (summary[side]["rows"], summary[side]["passed"]) == (judged, passed)
        assert summary[side]["pass_rate"] == pytest.approx(passed / judged)
    assert summary["b"]["passed"] == 0 < summary["a"]["passed"]  # the whole text is never just the number
    assert summary["b"]["top_reasons"] == [{"reason": "wrong_answer", "rows": summary["b"]["rows"]}]
    changed = query(store, "SELECT a.row_id, a.passed, b.passed FROM synth.verdicts a JOIN synth.verdicts b USING "
                           "(row_id) WHERE a.stage = 'graded' AND b.stage = 'strict' AND (a.passed IS DISTINCT FROM "
                           "b.passed OR a.reason IS DISTINCT FROM b.reason) ORDER BY a.row_id")
    assert summary["changed"] == len(changed) == summary["a"]["passed"]
    assert summary["in_both"] == summary["a"]["rows"] and summary["only_in_a"] == summary["only_in_b"] == 0
    assert summary["transitions"] == {"passed_to_failed": len(changed), "failed_to_passed": 0, "reason_only": 0}
    assert [(e["key"]["id"], e["a"]["passed"], e["b"]["passed"]) for e in examples] == changed[:3]
    assert all(e["b"]["reason"] == "wrong_answer" and e["preview"] is not None for e in examples)

    table = synth("diff", pipeline, "graded", "strict", check=True).stdout
    assert table.startswith("diff graded vs strict (two filter stages)")
    assert f"changed (passed, reason): {len(changed)}" in table
    assert f"changed rows (showing 5 of {len(changed)})" in table
    assert "failed (wrong_answer)" in table
    _one_error_line(synth("diff", pipeline, "solutions", "graded"),
                    "cannot diff 'solutions' (a generate stage) with 'graded' (a filter stage)")
    _one_error_line(synth("diff", pipeline, "graded", "nothing"), "no stage output named 'nothing'")
    _one_error_line(synth("diff", pipeline, "graded"), "give two stages")


def test_diff_two_generate_stages(workspace):
    """`synth diff A B` of two generate stages (teachers right with p=0.5 and p=0.9): requests, completions,
    parsed answers and mean tokens per stage, rows paired by (input_id, sample), those whose answer differs."""
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)} for i in range(8)]
    params = "params: {temperature: 1.0, max_tokens: 16, seed: 0}"
    pipeline = make_pipeline(workspace, files={"questions.jsonl": rows}, teachers={
        "weak": echo_teacher(scripted_answers(p=0.5), model="weak"),
        "strong": echo_teacher(scripted_answers(p=0.9), model="strong")}, stages={
        "problems": "kind: load, path: questions.jsonl",
        "weak_solutions": f"kind: generate, input: problems, teacher: weak, prompt: solve, samples: 3, {params}",
        "strong_solutions": f"kind: generate, input: problems, teacher: strong, prompt: solve, samples: 3, {params}"})
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    out = _json_lines(synth("diff", pipeline, "weak_solutions", "strong_solutions", "-n", "50", "--format", "json",
                            check=True).stdout)
    summary, examples = out[0], out[1:]
    assert summary["sort"] == "generate" and summary["compared_on"] == ["answer"]
    for side, stage in (("a", "weak_solutions"), ("b", "strong_solutions")):
        requests, tokens = query(store, f"SELECT count(*), avg(completion_tokens) FROM {stage}")[0]
        assert summary[side]["requests"] == requests == 24
        assert summary[side]["with_completion"] == summary[side]["with_answer"] == 1.0
        assert summary[side]["mean_completion_tokens"] == pytest.approx(tokens)
    differ = query(store, "SELECT a.input_id, a.sample, a.answer, b.answer FROM weak_solutions a JOIN strong_solutions "
                          "b USING (input_id, sample) WHERE a.answer IS DISTINCT FROM b.answer ORDER BY 1, 2")
    assert 0 < len(differ) < 24
    assert summary["changed"] == len(differ) and summary["in_both"] == 24
    assert [(e["key"]["input_id"], e["key"]["sample"], e["a"]["answer"], e["b"]["answer"]) for e in examples] == differ
    assert all(e["a"]["id"] != e["b"]["id"] for e in examples)  # two stages, two requests each
    table = synth("diff", pipeline, "weak_solutions", "strong_solutions", "-n", "1", check=True).stdout
    assert "two generate stages" in table and f"changed (answer): {len(differ)}" in table
    assert f"changed rows (showing 1 of {len(differ)})" in table


def test_diff_one_verify_stage_across_two_runs(workspace):
    """`synth diff STAGE --runs R1,R2` of a verify stage whose method changed between the runs: each run's pass
    rate (from synth.verdict_history), the current run marked, the rows whose verdict changed; run id prefixes;
    an unknown or ambiguous run, a generate stage (no history) and a malformed --runs are one line each."""
    pipeline = graded_pipeline(workspace, questions=6, p=0.5, samples=3)
    synth_run(pipeline)
    text = pipeline.read_text()
    pipeline.write_text(text.replace("method: math, answer: answer", "method: exact, answer: text"))
    assert pipeline.read_text() != text
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    r1, r2 = [r[0] for r in query(store, "SELECT id FROM synth.runs ORDER BY started_at")]
    per_run = {run: (n, p) for run, n, p in query(
        store, "SELECT run_id, count(*), count(*) FILTER (WHERE passed) FROM synth.verdict_history "
               "WHERE stage = 'graded' GROUP BY run_id")}
    changed = query(store, "SELECT a.row_id FROM synth.verdict_history a JOIN synth.verdict_history b "
                           f"USING (stage, row_id) WHERE a.stage = 'graded' AND a.run_id = '{r1}' AND "
                           f"b.run_id = '{r2}' AND (a.passed IS DISTINCT FROM b.passed OR "
                           "a.reason IS DISTINCT FROM b.reason) ORDER BY 1")
    assert changed and per_run[r2][1] == 0 < per_run[r1][1]

    out = _json_lines(synth("diff", pipeline, "graded", "--runs", f"{r1},{r2}", "--format", "json", "-n", "2",
                            check=True).stdout)
    summary, examples = out[0], out[1:]
    assert summary["mode"] == "runs" and summary["a"]["name"] == r1 and summary["b"]["name"] == r2
    assert not summary["a"]["current"] and summary["b"]["current"]
    for side, run in (("a", r1), ("b", r2)):
        assert (summary[side]["rows"], summary[side]["passed"]) == per_run[run]
    assert summary["a"]["version"] != summary["b"]["version"]  # the filter's config changed
    assert summary["changed"] == len(changed) == summary["transitions"]["passed_to_failed"]
    assert [e["key"]["id"] for e in examples] == [r[0] for r in changed[:2]]
    prefix = r1[:-1]  # a unique prefix of the first run's id
    table = synth("diff", pipeline, "graded", "--runs", f"{prefix},{r2}", check=True).stdout
    assert table.startswith(f"diff graded (a filter stage): run {r1} vs run {r2}") and f"{r2} (current)" in table
    assert f"changed (passed, reason): {len(changed)}" in table

    common = next(i for i in range(len(r1)) if r1[i] != r2[i])
    _one_error_line(synth("diff", pipeline, "graded", "--runs", f"{r1[:common]},{r2}"), "is ambiguous")
    _one_error_line(synth("diff", pipeline, "graded", "--runs", f"nope,{r2}"), "no run 'nope' (last runs: ")
    _one_error_line(synth("diff", pipeline, "graded", "--runs", r1), "--runs", "two run ids separated by a comma")
    _one_error_line(synth("diff", pipeline, "solutions", "--runs", f"{r1},{r2}"),
                    "'solutions' is a generate stage: its requests are cached by content")
