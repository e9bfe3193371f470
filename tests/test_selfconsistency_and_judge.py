"""Self-consistency voting and the LLM judge end to end, with a scripted OpenAI-compatible teacher
(tests/scripted_teacher.py: real HTTP, real openai backend and store; the answers are scripted
because the tests need a teacher whose accuracy is known exactly)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from conftest import query, synth, write
from scripted_teacher import ScriptedTeacher

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


def pipeline_text(base_url: str, extra: str = "") -> str:
    return f"""\
store: out/run.duckdb
teachers:
  scripted: {{backend: openai, model: scripted, base_url: "{base_url}", max_concurrency: 16}}
stages:
  problems: {{kind: load, path: questions.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: scripted, prompt: solve, samples: {N},
              params: {{temperature: 1.0, max_tokens: 16, seed: 0}}}}
  voted: {{kind: vote, input: solutions, answer: answer, min_agreement: {TAU}}}
  graded: {{kind: verify, input: solutions, method: math, answer: answer, reference: gold}}
{extra}"""


def test_vote_precision_matches_the_binomial(workspace):
    write(workspace / "questions.jsonl",
          "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)}) + "\n"
                  for i in range(QUESTIONS)))
    with ScriptedTeacher(p=P, wrong=WRONG) as teacher:
        write(workspace / "pipeline.yaml", pipeline_text(teacher.base_url))
        synth("run", workspace / "pipeline.yaml", check=True)
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
    write(workspace / "questions.jsonl",
          "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?" + (" NOSCORE" if i == 0 else ""),
                              "gold": str(i)}) + "\n" for i in range(20)))
    extra = ("  judged: {kind: judge, input: solutions, teacher: scripted, min_score: 7}\n"
             "  kept: {kind: keep, input: solutions, pass: [judged]}\n")
    with ScriptedTeacher(p=0.5) as teacher:
        write(workspace / "pipeline.yaml", pipeline_text(teacher.base_url, extra))
        synth("run", workspace / "pipeline.yaml", check=True)
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
        why = synth("why", workspace / "pipeline.yaml", rows[0][0], check=True).stdout
        assert "judged" in why and "graded" in why and "voted" in why
        before = teacher.requests
        synth("run", workspace / "pipeline.yaml", check=True)
        assert teacher.requests == before  # a finished pipeline sends nothing, critic calls included


def test_judge_pairwise_both_orders_cancel_position_bias(workspace):
    """Every ordered pair within a group is judged. A correct sample beats every wrong one, and
    between two samples the critic cannot separate, the position bias ("always A") gives each one
    win out of two, so ties land at 0.5 instead of favouring whichever came first."""
    write(workspace / "questions.jsonl",
          "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)}) + "\n"
                  for i in range(6)))
    extra = "  ranked: {kind: judge, mode: pairwise, input: solutions, teacher: scripted, min_score: 0.75}\n"
    with ScriptedTeacher(p=0.5) as teacher:
        write(workspace / "pipeline.yaml", pipeline_text(teacher.base_url, extra))
        synth("run", workspace / "pipeline.yaml", check=True)
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
