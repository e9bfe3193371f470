"""The evaluate stage (in process, synth.run) and `synth report` (the CLI) with two echo teachers running
tests/scripted_teacher.py's script at known accuracies (conftest.scripted_answers). The summary's
numbers are recomputed here from the per-row results."""

from __future__ import annotations

import json
import math

import pytest

from conftest import echo_teacher, make_pipeline, query, scripted_answers, synth, synth_run
from synth.errors import SynthError

QUESTIONS = 60


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_evaluate_summary_is_recomputable_and_report_is_written(workspace):
    heldout = [{"id": f"h{i}", "question": f"Q{i}: what is it?", "answer_gold": str(i)} for i in range(QUESTIONS)]
    path = make_pipeline(workspace, files={"heldout.jsonl": heldout}, teachers={
        "weak": echo_teacher(scripted_answers(p=0.3), model="weak"),
        "strong": echo_teacher(scripted_answers(p=0.8), model="strong")}, stages={
        "heldout": "kind: load, path: heldout.jsonl",
        "report": "kind: evaluate, input: heldout, models: [weak, strong], prompt: solve, "
                  "params: {temperature: 1.0, max_tokens: 16, seed: 0}, "
                  "verify: {answer: answer, reference: answer_gold, method: math}"})
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
