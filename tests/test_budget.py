"""Budgets: a generate stage stops cleanly at `max_cost`, keeps every completion that arrived (the
requests in flight included), `synth status` shows it stopped for budget and what it cost, and
raising the budget finishes it with no request sent twice. The teacher is the scripted
OpenAI-compatible server (tests/scripted_teacher.py), which reports 10 prompt + 5 completion tokens
per request: at the prices below every request costs exactly $0.02."""

from __future__ import annotations

import json

import pytest

from conftest import query, synth, write
from scripted_teacher import ScriptedTeacher

ROWS, SAMPLES = 30, 2


def pipeline_text(base_url: str, max_cost: float) -> str:
    return f"""\
store: out/run.duckdb
teachers:
  paid: {{backend: openai, model: paid, base_url: "{base_url}", max_concurrency: 4,
         prices: {{input: 1000, output: 2000}}}}
stages:
  problems: {{kind: load, path: questions.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: paid, prompt: solve, samples: {SAMPLES},
              params: {{temperature: 1.0, max_tokens: 16, seed: 0}}, max_cost: {max_cost}}}
"""


def test_stage_stops_at_max_cost_and_resumes_when_raised(workspace):
    write(workspace / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?"})
                                                  + "\n" for i in range(ROWS)))
    store = workspace / "out" / "run.duckdb"
    with ScriptedTeacher(p=1.0) as teacher:
        pipeline = write(workspace / "pipeline.yaml", pipeline_text(teacher.base_url, 0.5))
        plan = json.loads(synth("plan", pipeline, "--format", "json", check=True).stdout)
        solutions = next(r for r in plan if r["stage"] == "solutions")
        assert solutions["max_cost"] > 0  # estimated from the rendered prompts before anything is sent

        first = synth("run", pipeline)
        assert first.returncode == 1 and "stopped at the budget of solutions" in first.stderr, first.stderr
        saved = query(store, "SELECT count(*) FROM solutions")[0][0]
        # $0.50 / $0.02 = 25, plus what was in flight when a worker saw the budget reached (the openai
        # teacher accounts each answer in its worker before taking the next request): at most 3 of 4 workers
        assert 25 <= saved <= 25 + 3
        assert teacher.requests == saved  # nothing sent was lost
        state = json.loads(query(store, "SELECT detail FROM synth.stages WHERE name = 'solutions'")[0][0])
        assert state["stopped"] == "budget" and state["cost"] >= 0.5
        status = synth("status", pipeline, check=True).stdout
        assert "stopped at its budget" in status and f"${saved * 0.02:,.4f}" in status

        write(workspace / "pipeline.yaml", pipeline_text(teacher.base_url, 100))
        synth("run", pipeline, check=True)
        assert query(store, "SELECT count(*) FROM solutions")[0][0] == ROWS * SAMPLES
        assert teacher.requests == ROWS * SAMPLES  # no request sent twice
        # cost per kept example: all 60 samples cost $1.20; keep the even questions' samples
        write(workspace / "pipeline.yaml", pipeline_text(teacher.base_url, 100) +
              "  even: {kind: filter, input: solutions, where: \"question LIKE 'Q%0:%' OR question LIKE 'Q%2:%'\"}\n"
              "  kept: {kind: keep, input: solutions, pass: [even]}\n")
        synth("run", pipeline, check=True)
        stats = {s["stage"]: s for s in json.loads(synth("stats", pipeline, "--format", "json", check=True).stdout)}
        kept = stats["kept"]["passed"]
        assert kept > 0 and stats["kept"]["cost_per_kept"] == pytest.approx(ROWS * SAMPLES * 0.02 / kept)
    assert query(store, "SELECT status FROM synth.stages WHERE name = 'solutions'")[0][0] == "done"


def test_max_cost_needs_prices(workspace):
    write(workspace / "questions.jsonl", json.dumps({"id": "q0", "question": "Q0?"}) + "\n")
    text = pipeline_text("http://127.0.0.1:9/v1", 1).replace(",\n         prices: {input: 1000, output: 2000}", "")
    proc = synth("run", write(workspace / "pipeline.yaml", text))
    assert proc.returncode == 2 and "has no prices" in proc.stderr and "Traceback" not in proc.stderr


def test_run_level_max_cost(workspace):
    """`synth run --max-cost` caps what the whole run spends; a later run without it finishes."""
    write(workspace / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?"})
                                                  + "\n" for i in range(ROWS)))
    store = workspace / "out" / "run.duckdb"
    with ScriptedTeacher(p=1.0) as teacher:
        pipeline = write(workspace / "pipeline.yaml", pipeline_text(teacher.base_url, 100))
        first = synth("run", pipeline, "--max-cost", "0.3")
        assert first.returncode == 1 and "--max-cost" in first.stderr, first.stderr
        saved = query(store, "SELECT count(*) FROM solutions")[0][0]
        assert 15 <= saved <= 15 + 3 and teacher.requests == saved
        synth("run", pipeline, check=True)
        assert teacher.requests == ROWS * SAMPLES


def test_plan_counts_prompt_tokens_with_the_teachers_tokenizer(workspace, tiny_model):
    """`synth plan` counts prompt tokens with the tokenizer and chat template when it can load them (an
    openai teacher's `tokenizer` key here, pointing at a local tiny model), else ~4 characters per token."""
    from transformers import AutoTokenizer

    write(workspace / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?"})
                                                  + "\n" for i in range(ROWS)))
    text = pipeline_text("http://127.0.0.1:9/v1", 1.0)  # plan calls no teacher
    counted = write(workspace / "pipeline.yaml", text.replace("backend: openai,", f"backend: openai, tokenizer: "
                                                                                  f"'{tiny_model}',"))
    solutions = next(r for r in json.loads(synth("plan", counted, "--format", "json", check=True).stdout)
                     if r["stage"] == "solutions")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    system = "Solve step by step and end with \\boxed{ANSWER}."
    expected = sum(len(tok.apply_chat_template([{"role": "system", "content": system},
                                                {"role": "user", "content": f"Q{i}: what is it?"}],
                                               add_generation_prompt=True, tokenize=True)["input_ids"])
                   for i in range(ROWS)) * SAMPLES
    assert solutions["prompt_tokens_by"] == "tokenizer" and solutions["est_prompt_tokens"] == expected
    approx = write(workspace / "pipeline.yaml", text)
    solutions = next(r for r in json.loads(synth("plan", approx, "--format", "json", check=True).stdout)
                     if r["stage"] == "solutions")
    assert solutions["prompt_tokens_by"] == "chars/4" and solutions["est_prompt_tokens"] != expected
    assert "≈" in synth("plan", approx, check=True).stdout
