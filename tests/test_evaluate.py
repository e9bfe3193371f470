"""The evaluate stage and `synth report` with two scripted OpenAI-compatible teachers of known
accuracy (tests/scripted_teacher.py: real HTTP, real openai backend; the answers are scripted so the
accuracies are known). The summary's numbers are recomputed here from the per-row results."""

from __future__ import annotations

import json
import math

import pytest

from conftest import query, synth, write
from scripted_teacher import ScriptedTeacher

QUESTIONS = 60


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_evaluate_summary_is_recomputable_and_report_is_written(workspace):
    write(workspace / "heldout.jsonl", "".join(json.dumps({"id": f"h{i}", "question": f"Q{i}: what is it?",
                                                            "answer_gold": str(i)}) + "\n" for i in range(QUESTIONS)))
    with ScriptedTeacher(p=0.3) as weak, ScriptedTeacher(p=0.8) as strong:
        write(workspace / "pipeline.yaml", f"""\
store: out/run.duckdb
teachers:
  weak: {{backend: openai, model: weak, base_url: "{weak.base_url}"}}
  strong: {{backend: openai, model: strong, base_url: "{strong.base_url}"}}
stages:
  heldout: {{kind: load, path: heldout.jsonl}}
  report: {{kind: evaluate, input: heldout, models: [weak, strong], prompt: solve,
           params: {{temperature: 1.0, max_tokens: 16, seed: 0}},
           verify: {{answer: answer, reference: answer_gold, method: math}}}}
""")
        synth("run", workspace / "pipeline.yaml", check=True)
        store = workspace / "out" / "run.duckdb"
        per_row = query(store, "SELECT model, passed, completion_tokens FROM report")
        assert len(per_row) == 2 * QUESTIONS
        out = json.loads(synth("report", workspace / "pipeline.yaml", "--format", "json", check=True).stdout)
        rows = out["evaluations"]["report"]
        assert [r["model"] for r in rows] == ["weak", "strong"]
        for r in rows:
            mine = [p for m, p, _ in per_row if m == r["model"]]
            k, n = sum(mine), len(mine)
            assert (r["n"], r["correct"]) == (n, k)
            assert r["accuracy"] == pytest.approx(k / n)
            low, high = wilson(k, n)
            assert (r["ci_low"], r["ci_high"]) == (pytest.approx(low), pytest.approx(high))
            assert r["mean_output_tokens"] == pytest.approx(5.0)  # the scripted server reports 5
        weak_acc, strong_acc = rows[0]["accuracy"], rows[1]["accuracy"]
        assert weak_acc == pytest.approx(0.3, abs=0.15) and strong_acc == pytest.approx(0.8, abs=0.15)
        assert (workspace / "out" / "report.png").stat().st_size > 1000
        table = synth("report", workspace / "pipeline.yaml", check=True).stdout
        assert "weak" in table and "strong" in table and "95% interval" in table
        before = weak.requests + strong.requests
        synth("run", workspace / "pipeline.yaml", check=True)
        assert weak.requests + strong.requests == before


def test_evaluate_config_errors(workspace):
    write(workspace / "heldout.jsonl", json.dumps({"id": "h", "question": "Q1?", "answer_gold": "1"}) + "\n")
    base = """\
store: out/run.duckdb
teachers:
  t: {{backend: openai, model: m, base_url: "http://127.0.0.1:9/v1"}}
stages:
  heldout: {{kind: load, path: heldout.jsonl}}
  report: {{kind: evaluate, input: heldout, models: [{models}], prompt: solve, verify: {{answer: {answer}, reference: {ref}}}}}
"""
    for models, answer, ref, must in (("nope", "answer", "answer_gold", "no teacher named 'nope'"),
                                      ("t", "answer", "gold", "no column 'gold'"),
                                      ("t", "result", "answer_gold", "no column 'result'")):
        write(workspace / "pipeline.yaml", base.format(models=models, answer=answer, ref=ref))
        proc = synth("run", workspace / "pipeline.yaml")
        assert proc.returncode == 2 and must in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
