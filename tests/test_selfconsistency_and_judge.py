"""Self-consistency voting and the LLM judge end to end, in process (synth.run), with the echo teacher
running tests/scripted_teacher.py's script (conftest.scripted_answers: the answers are scripted because
the tests need a teacher whose accuracy is known exactly; the store, cache, judge and vote are real)."""

from __future__ import annotations

import itertools
import math

import pytest

from conftest import echo_teacher, make_pipeline, query, scripted_answers, synth, synth_run

P, WRONG, N, TAU, QUESTIONS = 0.6, 2, 5, 0.6, 300


def analytic_precision(p: float, wrong: int, n: int, tau: float) -> float:
    """E[correct kept] / E[kept] over the multinomial of N samples: correct w.p. p, else one of
    `wrong` distractors uniformly. A class is kept when it is the unique plurality with share >= tau."""
    probs = [p] + [(1 - p) / wrong] * wrong
    kept_correct = kept = 0.0
    for counts in itertools.product(range(n + 1), repeat=len(probs)):
        if sum(counts) != n:
            continue
        prob = math.factorial(n) * math.prod(q ** c / math.factorial(c) for q, c in zip(probs, counts))
        top = max(counts)
        if counts.count(top) == 1 and top / n >= tau:
            kept += prob * top
            kept_correct += prob * top * (counts.index(top) == 0)
    return kept_correct / kept


def pipeline(workspace, questions: list[dict], p: float, wrong: int = 2, extra: dict | None = None):
    return make_pipeline(workspace, files={"questions.jsonl": questions},
                         teachers={"scripted": echo_teacher(scripted_answers(p, wrong), model="scripted")}, stages={
        "problems": "kind: load, path: questions.jsonl",
        "solutions": f"kind: generate, input: problems, teacher: scripted, prompt: solve, samples: {N}, "
                     "params: {temperature: 1.0, max_tokens: 16, seed: 0}",
        "voted": f"kind: vote, input: solutions, answer: answer, min_agreement: {TAU}",
        "graded": "kind: verify, input: solutions, method: math, answer: answer, reference: gold",
        **(extra or {})})


def test_vote_precision_matches_the_binomial(workspace):
    questions = [{"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)} for i in range(QUESTIONS)]
    synth_run(pipeline(workspace, questions, P, WRONG))
    store = workspace / "out" / "run.duckdb"
    single = query(store, "SELECT avg(passed::INT) FROM graded")[0][0]
    kept, correct = query(store, "SELECT count(*), count(*) FILTER (WHERE g.passed) FROM voted v "
                                 "JOIN graded g USING (id) WHERE v.passed")[0]
    expected = analytic_precision(P, WRONG, N, TAU)
    sigma = math.sqrt(expected * (1 - expected) / kept)
    assert single == pytest.approx(P, abs=0.05)
    assert correct / kept == pytest.approx(expected, abs=4 * sigma + 0.01), (correct, kept, expected)
    assert correct / kept > single + 0.15  # voting buys precision: the point of self-consistency


def test_judge_pointwise_scores_and_fails_closed(workspace):
    questions = [{"id": f"q{i}", "question": f"Q{i}: what is it?" + (" NOSCORE" if i == 0 else ""), "gold": str(i)}
                 for i in range(20)]
    path = pipeline(workspace, questions, 0.5, extra={"judged": "kind: judge, input: solutions, teacher: scripted, "
                                                                "min_score: 7",
                                                      "kept": "kind: keep, input: solutions, pass: [judged]"})
    synth_run(path)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT j.id, j.passed, j.reason, j.score, g.passed, j.question FROM judged j "
                        "JOIN graded g USING (id)")
    assert len(rows) == 20 * N
    for rid, passed, reason, score, correct, question in rows:
        if "NOSCORE" in question:
            assert (passed, reason, score) == (False, "unparseable_judgment", None)
        elif correct:
            assert (passed, reason, score) == (True, None, 9.0)
        else:
            assert (passed, reason, score) == (False, "low_score", 2.0)
    # the raw judgment is kept, and the critic calls are ordinary cached generations
    assert query(store, "SELECT count(*) FROM synth.verdicts WHERE stage = 'judged' "
                        "AND details->>'judgment' = 'I cannot decide.'")[0][0] == N
    # one critic call per distinct rendered critic prompt: identical solutions share a judgment
    assert query(store, "SELECT count(*) FROM judged_critic")[0][0] == \
        query(store, "SELECT count(DISTINCT (question, text)) FROM solutions")[0][0]
    why = synth("why", path, rows[0][0], check=True).stdout  # the CLI's lineage view
    assert "judged" in why and "graded" in why and "voted" in why
    again = synth_run(path)
    assert (again["sent"], again["stages_run"]) == (0, [])  # a finished pipeline sends nothing, critic calls included


def test_judge_pairwise_both_orders_cancel_position_bias(workspace):
    """Every ordered pair within a group is judged. A correct sample beats every wrong one, and
    between two samples the critic cannot separate, the position bias ("always A") gives each one
    win out of two, so ties land at 0.5 instead of favouring whichever came first."""
    questions = [{"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)} for i in range(6)]
    synth_run(pipeline(workspace, questions, 0.5, extra={
        "ranked": "kind: judge, mode: pairwise, input: solutions, teacher: scripted, min_score: 0.75"}))
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT r.id, r.input_id, r.passed, r.reason, r.score, g.passed, r.text "
                        "FROM ranked r JOIN graded g USING (id)")
    assert len(rows) == 6 * N
    assert query(store, "SELECT count(*) FROM ranked_critic")[0][0] <= 6 * N * (N - 1)
    for rid, input_id, passed, reason, score, correct, text in rows:
        group = [r for r in rows if r[1] == input_id]
        n_correct = sum(r[5] for r in group)
        same_text = sum(r[6] == text for r in group) - 1
        if correct and n_correct < len(group):  # beats every wrong sample, ties with other correct ones
            expected = ((len(group) - n_correct) * 2 + (n_correct - 1)) / (2 * (len(group) - 1))
        elif correct or n_correct == 0:  # all correct, or all wrong: only ties
            expected = 0.5
        else:
            expected = (len(group) - n_correct - 1) / (2 * (len(group) - 1))
        assert score == pytest.approx(expected), (rid, score, expected, n_correct, same_text)
        assert passed == (score >= 0.75) and reason == (None if passed else "low_win_rate")
