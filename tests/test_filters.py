"""Filter stages on literal rows, run in process (synth.run): a load stage reads the rows below from a
seed file, each filter judges them, and the test reads `passed` and `reason` back from the stage's view.
No teacher is involved (filters read any load, generate or keep stage), so each verdict is exact. A
mistake raises SynthError, whose message is the CLI's one line (one test goes through the CLI, for its
exit code)."""

from __future__ import annotations

import json

import pytest

from conftest import make_pipeline, query, synth, synth_run, write
from synth.errors import SynthError


def run_filter(workspace, rows: list[dict], stage: str, extra_files: dict | None = None,
               more: dict | None = None) -> dict:
    """Load `rows`, run one filter stage `f` configured by `stage` (YAML flow mapping body) and the stages
    `more` (make_pipeline's form), return {row id: (passed, reason, score)} from its view."""
    pipeline = make_pipeline(workspace, {"rows": "kind: load, path: rows.jsonl", "f": f"input: rows, {stage}",
                                         **(more or {})}, files={"rows.jsonl": rows, **(extra_files or {})})
    synth_run(pipeline)
    got = query(workspace / "out" / "run.duckdb", "SELECT id, passed, reason, score FROM f")
    assert len(got) == len(rows)
    return {r[0]: (r[1], r[2], r[3]) for r in got}


def check(verdicts: dict, expected: dict) -> None:
    for rid, (passed, reason) in expected.items():
        assert verdicts[rid][:2] == (passed, reason), f"row {rid}: got {verdicts[rid]}, want {(passed, reason)}"


# ---- verify -------------------------------------------------------------------------------------

VERIFY_ROWS = [
    # id, text, gold, expected (passed, reason) for method math with extract boxed
    ("ok", "so \\boxed{\\frac{1}{2}}", "0.5", (True, None)),
    ("ok2", "2+2 \\boxed{4}", "4", (True, None)),
    ("wrong", "\\boxed{5}", "4", (False, "wrong_answer")),
    ("empty_box", "the answer is \\boxed{}", "4", (False, "unparseable_answer")),
    ("no_box", "the answer is 4", "4", (False, "unparseable_answer")),
    ("bad_ref", "\\boxed{4}", "", (False, "unparseable_reference")),
    ("null_ref", "\\boxed{4}", None, (False, "unparseable_reference")),
]


def test_verify_math_fails_closed(workspace):
    rows = [{"id": i, "text": t, "gold": g} for i, t, g, _ in VERIFY_ROWS]
    v = run_filter(workspace, rows, "kind: verify, method: math, answer: text, extract: boxed, reference: gold")
    check(v, {i: e for i, _, _, e in VERIFY_ROWS})


@pytest.mark.parametrize("method,extract,text,gold,expected", [
    ("exact", "final_number", "so 12 apples", "12", (True, None)),
    ("exact", "final_number", "so 13 apples", "12", (False, "wrong_answer")),
    ("numeric", "final_number", "total 1,234.0", "1234", (True, None)),
    ("numeric", "final_number", "no digits", "1", (False, "unparseable_answer")),
    ("exact", "regex", "ANSWER: Paris.", "paris", (True, None)),
])
def test_verify_methods_and_extraction(workspace, method, extract, text, gold, expected):
    pattern = ", pattern: 'ANSWER: (\\w+)'" if extract == "regex" else ""
    v = run_filter(workspace, [{"id": "r", "text": text, "gold": gold}],
                   f"kind: verify, method: {method}, answer: text, extract: {extract}, reference: gold{pattern}")
    check(v, {"r": expected})


# ---- vote ------------------------------------------------------------------------------------------

def test_vote_plurality_minority_low_agreement_no_answer(workspace):
    rows = [
        # group a: 3 x "4", 1 x "5", 1 without an answer -> share of "4" is 3/5 = 0.6
        *[{"id": f"a{i}", "g": "a", "answer": "4"} for i in range(3)],
        {"id": "a3", "g": "a", "answer": "5"}, {"id": "a4", "g": "a", "answer": None},
        # group b: 2 x "7", 2 x "8": a tie -> nobody wins
        {"id": "b0", "g": "b", "answer": "7"}, {"id": "b1", "g": "b", "answer": "7"},
        {"id": "b2", "g": "b", "answer": "8"}, {"id": "b3", "g": "b", "answer": "8"},
        # group c: 2 x "1", 1 x "2", 2 x "3" with... plurality "1" and "3" tie again; d: 2 of 5 agree
        *[{"id": f"d{i}", "g": "d", "answer": a} for i, a in enumerate(["1", "1", "2", "3", "4"])],
        # rows without a group still get their verdict (one verdict per row): they form the NULL group
        {"id": "n0", "g": None, "answer": "9"}, {"id": "n1", "g": None, "answer": "9"},
    ]
    v = run_filter(workspace, rows, "kind: vote, answer: answer, group_by: g, min_agreement: 0.5")
    check(v, {"a0": (True, None), "a2": (True, None), "a3": (False, "minority_answer"),
              "a4": (False, "no_answer"), "b0": (False, "low_agreement"), "b2": (False, "low_agreement"),
              "d0": (False, "low_agreement"), "d2": (False, "minority_answer"), "n0": (True, None)})
    assert v["a0"][2] == pytest.approx(0.6) and v["a3"][2] == pytest.approx(0.2) and v["d0"][2] == pytest.approx(0.4)


def test_vote_numeric_equivalence_classes(workspace):
    rows = [{"id": "x0", "g": "x", "answer": "0.5"}, {"id": "x1", "g": "x", "answer": "1/2"},
            {"id": "x2", "g": "x", "answer": "0.50"}, {"id": "x3", "g": "x", "answer": "2"}]
    v = run_filter(workspace, rows, "kind: vote, answer: answer, group_by: g, method: numeric, min_agreement: 0.7")
    check(v, {"x0": (True, None), "x1": (True, None), "x2": (True, None), "x3": (False, "minority_answer")})


# ---- dedup and decontaminate -----------------------------------------------------------------------

def test_dedup_exact_first_occurrence_wins(workspace):
    rows = [{"id": "1", "text": "The cat sat."}, {"id": "2", "text": "the  CAT sat."}, {"id": "3", "text": "A dog."}]
    v = run_filter(workspace, rows, "kind: dedup, column: text")
    check(v, {"1": (True, None), "2": (False, "duplicate_of:1"), "3": (True, None)})


def test_dedup_near_with_minhash(workspace):
    base = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
            "upsilon phi chi psi omega one two three four five six seven eight nine ten eleven twelve").split()
    near = list(base)
    near[10] = "LAMBDA2"
    rows = [{"id": "a", "text": " ".join(base)}, {"id": "b", "text": " ".join(near)},
            {"id": "c", "text": "completely different words about cooking pasta with garlic and olive oil tonight"}]
    v = run_filter(workspace, rows, "kind: dedup, column: text, near: 0.7")
    check(v, {"a": (True, None), "b": (False, "duplicate_of:a"), "c": (True, None)})


def test_decontaminate_against_eval_files(workspace):
    leaked = "one two three four five six seven eight nine ten eleven twelve thirteen"
    rows = [{"id": "dirty", "text": f"intro words then {leaked} and more"},
            {"id": "clean", "text": "one two three four five six seven eight nine ten eleven twelve other"}]
    v = run_filter(workspace, rows, "kind: decontaminate, against: [eval/test.jsonl], ngram: 13",
                   extra_files={"eval/test.jsonl": json.dumps({"question": f"Q: {leaked}?"}) + "\n"})
    check(v, {"dirty": (False, "contaminated:eval/test.jsonl"), "clean": (True, None)})


# ---- filter: SQL and Python -------------------------------------------------------------------------

def test_sql_filter_null_fails_closed(workspace):
    rows = [{"id": "s", "text": "short", "finish_reason": "stop"}, {"id": "l", "text": "x" * 50, "finish_reason": "stop"},
            {"id": "n", "text": None, "finish_reason": "length"}]
    v = run_filter(workspace, rows, "kind: filter, where: \"length(text) < 20\"")
    check(v, {"s": (True, None), "l": (False, "where"), "n": (False, "where:null")})


def test_builtin_filters(workspace):
    rows = [{"id": "ok", "text": "Add 3 and 4 to get 7.", "finish_reason": "stop"},
            {"id": "cut", "text": "Add 3 and", "finish_reason": "length"},
            {"id": "refuse", "text": "I'm sorry, but I can't help with that.", "finish_reason": "stop"},
            {"id": "loop", "text": "and then " * 30, "finish_reason": "stop"}]
    stages = {"finish_stop": {"cut": (False, "finish_stop")},
              "no_refusal": {"refuse": (False, "refusal")},
              "no_repetition": {"loop": (False, "repetition")},
              "length_bounds": {"ok": (True, None)}}
    for name, expected in stages.items():
        v = run_filter(workspace, rows, f"kind: filter, use: {name}")
        check(v, {"ok": (True, None), **expected})


def test_reasoning_length_bounds_a_trace_by_its_counted_or_estimated_tokens(workspace):
    rows = [{"id": "ok", "text": "7", "reasoning": "3 + 4 is 7", "reasoning_tokens": 6},
            {"id": "long", "text": "7", "reasoning": "short text", "reasoning_tokens": 900},  # the count wins
            {"id": "guessed", "text": "7", "reasoning": "x" * 4000, "reasoning_tokens": None},  # ~1,000 tokens
            {"id": "none", "text": "7", "reasoning": None, "reasoning_tokens": None},
            {"id": "blank", "text": "7", "reasoning": "  ", "reasoning_tokens": 0}]
    v = run_filter(workspace, rows, "kind: filter, use: reasoning_length, args: {max_tokens: 500}")
    check(v, {"ok": (True, None), "long": (False, "trace_too_long"), "guessed": (False, "trace_too_long"),
              "none": (False, "no_trace"), "blank": (False, "no_trace")})
    assert v["guessed"][2] == 1000.0
    v = run_filter(workspace, rows, "kind: filter, use: reasoning_length, args: {min_tokens: 0, min_chars: 20}")
    check(v, {"ok": (False, "trace_too_short"), "long": (False, "trace_too_short"), "guessed": (True, None),
              "none": (False, "no_trace")})
    v = run_filter(workspace, rows, "kind: filter, use: reasoning_length, args: {min_tokens: 0}")  # a trace optional
    check(v, {"ok": (True, None), "none": (True, None), "blank": (True, None)})


def test_workspace_python_filter_with_args(workspace):
    rows = [{"id": "a", "text": "apples"}, {"id": "b", "text": "bananas"}]
    v = run_filter(workspace, rows, "kind: filter, use: startswith, args: {prefix: a}", extra_files={
        "filters/startswith.py": "def judge(row, prefix):\n    return row['text'].startswith(prefix) or (False, 'wrong_letter')\n"})
    check(v, {"a": (True, None), "b": (False, "wrong_letter")})


# ---- keep, stats, why -------------------------------------------------------------------------------

def test_keep_strict_and_lenient_and_funnel(workspace):
    rows = [{"id": "1", "text": "good answer", "finish_reason": "stop"},
            {"id": "2", "text": "good answer", "finish_reason": "stop"},
            {"id": "3", "text": "cut off", "finish_reason": "length"},
            {"id": "4", "text": "another fine one", "finish_reason": "stop"}]
    more = {"uniq": "kind: dedup, input: rows, column: text",
            "kept": "kind: keep, input: rows, pass: [f, uniq]",
            "lenient": "kind: keep, input: rows, pass: [f, uniq], strict: false"}
    run_filter(workspace, rows, "kind: filter, use: finish_stop", more=more)
    store = workspace / "out" / "run.duckdb"
    assert sorted(r[0] for r in query(store, "SELECT id FROM kept")) == ["1", "4"]
    assert sorted(r[0] for r in query(store, "SELECT id FROM lenient")) == ["1", "4"]
    # nothing deleted: every row keeps its verdicts
    assert query(store, "SELECT count(*) FROM synth.verdicts")[0][0] == 8
    stats = json.loads(synth("stats", workspace / "pipeline.yaml", "--format", "json", check=True).stdout)
    by = {s["stage"]: s for s in stats}
    assert (by["f"]["judged"], by["f"]["passed"]) == (4, 3)
    assert by["f"]["reasons"] == [{"reason": "finish_stop", "rows": 1}]
    assert by["uniq"]["reasons"] == [{"reason": "duplicate_of", "rows": 1}]
    assert (by["kept"]["passed"], by["kept"]["judged"]) == (2, 4)
    table = synth("stats", workspace / "pipeline.yaml", check=True).stdout
    assert "finish_stop 1" in table and "duplicate_of 1" in table
    why = synth("why", workspace / "pipeline.yaml", "2", check=True).stdout  # a seed row: its verdicts
    assert "f: passed" in why and "uniq: failed" in why and "duplicate_of:1" in why
    # re-run: nothing stale, verdicts unchanged
    assert synth_run(workspace / "pipeline.yaml")["stages_run"] == []
    assert query(store, "SELECT count(*) FROM synth.verdicts")[0][0] == 8


def test_lenient_keep_counts_unjudged_rows_as_passed(workspace):
    rows = [{"id": "1", "text": "a", "finish_reason": "stop"}, {"id": "2", "text": "b", "finish_reason": "length"}]
    # `g` judges only the rows of a keep stage (row 1), so row 2 has no verdict from it
    more = {"firsts": "kind: keep, input: rows, pass: [f]",
            "g": "kind: filter, input: firsts, where: 'true'",
            "strict_keep": "kind: keep, input: rows, pass: [g]",
            "lenient_keep": "kind: keep, input: rows, pass: [g], strict: false"}
    run_filter(workspace, rows, "kind: filter, use: finish_stop", more=more)
    store = workspace / "out" / "run.duckdb"
    assert [r[0] for r in query(store, "SELECT id FROM strict_keep")] == ["1"]
    assert sorted(r[0] for r in query(store, "SELECT id FROM lenient_keep")) == ["1", "2"]


def test_filter_config_change_rejudges(workspace):
    rows = [{"id": "a", "text": "xx"}, {"id": "b", "text": "xxxxxx"}]
    v = run_filter(workspace, rows, "kind: filter, where: 'length(text) < 3'")
    check(v, {"a": (True, None), "b": (False, "where")})
    v = run_filter(workspace, rows, "kind: filter, where: 'length(text) < 10'")
    check(v, {"a": (True, None), "b": (True, None)})
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM synth.verdicts")[0][0] == 2


@pytest.mark.parametrize("stage,must", [
    ("kind: verify, method: math, answer: nope, reference: gold", "no column 'nope'"),
    ("kind: verify, method: math, answer: text", "key 'reference'"),
    ("kind: filter, use: no_such_filter", "no filter 'no_such_filter'"),
    ("kind: filter, where: 'x', use: finish_stop", "exactly one of"),
    ("kind: decontaminate, against: [missing.jsonl]", "missing.jsonl"),
    ("kind: vote, answer: answer, group_by: nope", "no column 'nope'"),
])
def test_filter_config_errors_are_one_line(workspace, stage, must):
    pipeline = make_pipeline(workspace, {"rows": "kind: load, path: rows.jsonl", "f": f"input: rows, {stage}"},
                             files={"rows.jsonl": [{"id": "a", "text": "x", "gold": "1", "answer": "1"}]})
    with pytest.raises(SynthError) as exc:
        synth_run(pipeline)
    assert must in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert not (workspace / "out").exists()


def test_a_filter_config_error_through_the_cli(workspace):
    """The CLI prints a SynthError as one line and exits 2 (tests/test_bad_input_table.py has many more)."""
    pipeline = make_pipeline(workspace, {"rows": "kind: load, path: rows.jsonl",
                                         "f": "input: rows, kind: filter, use: no_such_filter"},
                             files={"rows.jsonl": [{"id": "a", "text": "x"}]})
    proc = synth("run", pipeline)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synth: error: ") and "no filter 'no_such_filter'" in lines[0]
    assert not (workspace / "out").exists()


def test_bad_sql_expression_is_one_line(workspace):
    pipeline = make_pipeline(workspace, {"rows": "kind: load, path: rows.jsonl",
                                         "f": "kind: filter, input: rows, where: 'lenght(text) > 1'"},
                             files={"rows.jsonl": [{"id": "a", "text": "x"}]})
    with pytest.raises(SynthError) as exc:
        synth_run(pipeline)
    assert "key 'where'" in str(exc.value) and "lenght" in str(exc.value) and "\n" not in str(exc.value)
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM synth.verdicts")[0][0] == 0


def test_verify_code_through_the_pipeline(workspace):
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    rows = [{"id": "good", "text": "Here:\n```python\ndef add(a, b):\n    return a + b\n```", "tests": tests},
            {"id": "wrong", "text": "```python\ndef add(a, b):\n    return a - b\n```", "tests": tests},
            {"id": "loops", "text": "```python\ndef add(a, b):\n    while True:\n        pass\n```", "tests": tests},
            {"id": "prose", "text": "I would add them.", "tests": tests}]
    v = run_filter(workspace, rows, "kind: verify, method: code, answer: text, tests: tests, timeout_s: 2")
    check(v, {"good": (True, None), "wrong": (False, "wrong_output"), "loops": (False, "timeout")})
    assert v["prose"][0] is False


@pytest.mark.parametrize("body,must", [
    ("def judge_batch(rows):\n    return [True]\n", "returned 1 results for 2 rows"),
    ("def judge(row):\n    return None\n", "return a bool"),
    ("def judge(row):\n    return (True, None, 'high')\n", "a score is a number"),
])
def test_python_filter_mistakes_are_one_line(workspace, body, must):
    pipeline = make_pipeline(workspace, {"rows": "kind: load, path: rows.jsonl",
                                         "f": "kind: filter, input: rows, use: bad"},
                             files={"filters/bad.py": body,
                                    "rows.jsonl": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]})
    with pytest.raises(SynthError) as exc:
        synth_run(pipeline)
    assert must in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM synth.verdicts")[0][0] == 0


def test_export_directory_never_replaces_foreign_data(tmp_path):
    """A directory export replaces its directory only when synth wrote it (synth.json or a saved
    dataset); anything else there is left alone with one line."""
    from synth.errors import SynthError
    from synth.stages.export import _write_dataset_dir

    (tmp_path / "keep_me").mkdir()
    write(tmp_path / "keep_me" / "notes.txt", "mine")
    with pytest.raises(SynthError, match="not a dataset synth exported"):
        _write_dataset_dir(tmp_path / "keep_me", [{"id": "a", "messages": []}], "sft", "card")
    assert (tmp_path / "keep_me" / "notes.txt").read_text() == "mine"
    _write_dataset_dir(tmp_path / "fresh", [{"id": "a", "messages": [{"role": "user", "content": "x"}]}], "sft", "c")
    write(tmp_path / "fresh" / "synth.json", "{}")
    _write_dataset_dir(tmp_path / "fresh", [{"id": "b", "messages": [{"role": "user", "content": "y"}]}], "sft", "c")
    assert (tmp_path / "fresh" / "README.md").read_text() == "c"
