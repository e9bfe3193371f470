"""The evaluate stage (in process, synth.run) and `synth report` (the CLI) with two echo teachers running
tests/scripted_teacher.py's script at known accuracies (conftest.scripted_answers). The summary's
numbers are recomputed here from the per-row results."""

from __future__ import annotations

import json
import math

import pytest

from conftest import echo_teacher, make_pipeline, query, scripted_answers, synth, synth_run, weak_strong_evaluation
from synth.errors import SynthError

QUESTIONS = 60


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_evaluate_summary_is_recomputable_and_report_is_written(workspace):
    path = weak_strong_evaluation(workspace, QUESTIONS)
    synth_run(path)
    store = workspace / "out" / "run.duckdb"
    per_row = query(store, "SELECT model, passed, completion_tokens FROM report")
    assert len(per_row) == 2 * QUESTIONS
    out = json.loads(synth("report", path, "--format", "json", check=True).stdout)
    rows = out["evaluations"]["report"]
    assert [r["model"] for r in rows] == ["weak", "strong"]
    for r in rows:
        mine = [p for m, p, _ in per_row if m == r["model"]]
        k, n = sum(mine), len(mine)
        assert (r["n"], r["correct"]) == (n, k)
        assert r["accuracy"] == pytest.approx(k / n)
        low, high = wilson(k, n)
        assert (r["ci_low"], r["ci_high"]) == (pytest.approx(low), pytest.approx(high))
        tokens = [t for m, _, t in per_row if m == r["model"]]
        assert r["mean_output_tokens"] == pytest.approx(sum(tokens) / len(tokens)) == pytest.approx(4.0)  # 4 words
    weak_acc, strong_acc = rows[0]["accuracy"], rows[1]["accuracy"]
    assert weak_acc == pytest.approx(0.3, abs=0.15) and strong_acc == pytest.approx(0.8, abs=0.15)
    assert (workspace / "out" / "report.png").stat().st_size > 1000
    table = synth("report", path, check=True).stdout
    assert "weak" in table and "strong" in table and "95% interval" in table
    again = synth_run(path)
    assert (again["sent"], again["stages_run"]) == (0, [])


def test_evaluate_config_errors(workspace):
    for models, answer, ref, must in (("nope", "answer", "answer_gold", "no teacher named 'nope'"),
                                      ("t", "answer", "gold", "no column 'gold'"),
                                      ("t", "result", "answer_gold", "no column 'result'")):
        path = make_pipeline(workspace, files={"heldout.jsonl": [{"id": "h", "question": "Q1?", "answer_gold": "1"}]},
                             teachers={"t": echo_teacher()}, stages={
            "heldout": "kind: load, path: heldout.jsonl",
            "report": f"kind: evaluate, input: heldout, models: [{models}], prompt: solve, "
                      f"verify: {{answer: {answer}, reference: {ref}}}"})
        with pytest.raises(SynthError) as exc:
            synth_run(path)
        assert must in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
        assert not (workspace / "out").exists()


def test_report_compares_pairs_with_mcnemar_by_hand(workspace):
    """Two declared teachers evaluated on the same rows: the report pairs them by default ("all pairs"), and
    --compare picks a pair; the difference, the discordant counts and McNemar's exact p-value match a count
    by hand from the per-row results (two-sided binomial test at 1/2 on the discordant pairs)."""
    path = weak_strong_evaluation(workspace, QUESTIONS)
    heldout = [{"id": f"h{i}"} for i in range(QUESTIONS)]
    synth_run(path)
    passed = {(m, i): p for m, i, p in query(workspace / "out" / "run.duckdb",
                                            "SELECT model, input_id, passed FROM report")}
    strong_only = sum(1 for h in heldout if passed[("strong", h["id"])] and not passed[("weak", h["id"])])
    weak_only = sum(1 for h in heldout if passed[("weak", h["id"])] and not passed[("strong", h["id"])])
    d = strong_only + weak_only
    tail = sum(math.comb(d, k) for k in range(min(strong_only, weak_only) + 1)) / 2 ** d
    p_by_hand = min(1.0, 2 * tail)
    diff = 100 * (sum(passed[("strong", h["id"])] for h in heldout) - sum(passed[("weak", h["id"])] for h in heldout)) \
        / len(heldout)

    default = json.loads(synth("report", path, "--format", "json", check=True).stdout)["comparisons"]["report"]
    asked = json.loads(synth("report", path, "--format", "json", "--compare", "strong,weak",
                             check=True).stdout)["comparisons"]["report"]
    for got in (default, asked):
        assert len(got) == 1 and (got[0]["a"], got[0]["b"]) == ("strong", "weak")
        c = got[0]
        assert (c["a_only"], c["b_only"], c["n"]) == (strong_only, weak_only, QUESTIONS)
        assert c["diff_points"] == pytest.approx(diff) and c["p_mcnemar"] == pytest.approx(p_by_hand)
    assert default[0]["why"] == "all pairs" and asked[0]["why"] == "asked"
    table = synth("report", path, "--compare", "strong,weak", check=True).stdout
    assert "paired differences" in table and "strong − weak" in table and f"{diff:+.1f} points" in table

    for bad, must in ((["--compare", "strong,nobody"], f"{path}: --compare strong,nobody: no evaluate stage "
                                                       "evaluates 'nobody' (models: strong, weak)"),
                      (["--compare", "strong"], "--compare strong: give two model names separated by a comma "
                                                "(--compare student_b,student_a)")):
        out = synth("report", path, *bad)
        assert out.returncode == 2 and out.stderr == f"synth: error: {must}\n", out.stderr


def test_report_shows_the_teachers_single_sample_and_vote_accuracy(workspace):
    """A generate stage with a verify and a vote stage on its samples: the report's teacher row is the share
    of samples verified and the share of inputs whose vote winner is verified, both counted here by hand."""
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)} for i in range(QUESTIONS)]
    path = make_pipeline(workspace, files={"questions.jsonl": rows},
                         teachers={"scripted": echo_teacher(scripted_answers(p=0.5), model="scripted")}, stages={
        "problems": "kind: load, path: questions.jsonl",
        "solutions": "kind: generate, input: problems, teacher: scripted, prompt: solve, samples: 5, "
                     "params: {temperature: 1.0, max_tokens: 16, seed: 0}",
        "graded": "kind: verify, input: solutions, method: math, answer: answer, reference: gold",
        "voted": "kind: vote, input: solutions, answer: answer"})
    synth_run(path)
    store = workspace / "out" / "run.duckdb"
    samples = query(store, "SELECT s.input_id, s.answer, s.input_id = 'q' || s.answer FROM solutions s")
    right = sum(ok for *_, ok in samples)
    by_input: dict[str, list[str]] = {}
    for input_id, answer, _ in samples:
        by_input.setdefault(input_id, []).append(answer)
    vote_right = 0
    for input_id, answers in by_input.items():
        counts = sorted(((answers.count(a), a) for a in set(answers)), reverse=True)
        winner = (len(counts) == 1 or counts[0][0] > counts[1][0]) and counts[0][0] / len(answers) >= 0.5
        vote_right += winner and counts[0][1] == input_id[1:]  # a unique plurality of half or more, and right
    teachers = json.loads(synth("report", path, "--format", "json", check=True).stdout)["teachers"]
    assert len(teachers) == 1
    t = teachers[0]
    assert (t["samples"], t["teacher"], t["verify"]) == ("solutions", "scripted", "graded")
    assert (t["one_sample"]["correct"], t["one_sample"]["n"]) == (right, QUESTIONS * 5)
    assert [(v["vote"], v["correct"], v["n"]) for v in t["votes"]] == [("voted", vote_right, QUESTIONS)]
    assert "teachers' samples" in synth("report", path, check=True).stdout
