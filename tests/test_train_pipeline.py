"""The training loop through the CLI, as a user runs it: scripted-teacher samples (tests/
scripted_teacher.py: real HTTP and openai backend; the answers are scripted so that verified and
failed samples both exist) -> verify -> keep -> export sft -> train a tiny local student with TRL SFT
-> pairs -> export dpo -> DPO from the SFT model -> the trained students are teachers by name in a
generate stage and an evaluate stage. Real TRL steps on CPU, real DuckDB store."""

from __future__ import annotations

import json

import pytest

from conftest import query, synth, write
from scripted_teacher import ScriptedTeacher

pytestmark = pytest.mark.slow

SFT_RECIPE = """\
max_steps: 12
learning_rate: 0.002
per_device_train_batch_size: 8
max_length: 128
logging_steps: 1
seed: 0
"""
DPO_RECIPE = """\
max_steps: 4
learning_rate: 0.0005
per_device_train_batch_size: 4
max_length: 128
beta: 0.1
logging_steps: 1
seed: 0
"""


def test_sft_dpo_students_become_teachers(workspace, tiny_model):
    write(workspace / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?",
                                                              "gold": str(i)}) + "\n" for i in range(16)))
    (workspace / "train").mkdir()
    write(workspace / "train" / "sft.yaml", SFT_RECIPE)
    write(workspace / "train" / "dpo.yaml", DPO_RECIPE)
    with ScriptedTeacher(p=0.6) as teacher:
        pipeline = write(workspace / "pipeline.yaml", f"""\
store: out/run.duckdb
teachers:
  scripted: {{backend: openai, model: scripted, base_url: "{teacher.base_url}"}}
  base: {{backend: hf, model: "{tiny_model}"}}
stages:
  problems: {{kind: load, path: questions.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: scripted, prompt: solve, samples: 4,
              params: {{temperature: 1.0, max_tokens: 16, seed: 0}}}}
  graded: {{kind: verify, input: solutions, method: math, answer: answer, reference: gold}}
  kept: {{kind: keep, input: solutions, pass: [graded]}}
  sft_data: {{kind: export, input: kept, format: sft, path: out/sft.parquet}}
  prefs: {{kind: pairs, input: solutions, by: graded, max_per_input: 2}}
  dpo_data: {{kind: export, input: prefs, format: dpo, path: out/dpo.parquet}}
  sft: {{kind: train, method: sft, data: sft_data, student: base, recipe: train/sft.yaml}}
  dpo: {{kind: train, method: dpo, data: dpo_data, init: sft, recipe: train/dpo.yaml}}
  mine: {{kind: generate, input: problems, teacher: sft, prompt: solve, samples: 2,
         params: {{temperature: 0.8, max_tokens: 8, seed: 0}}}}
  report: {{kind: evaluate, input: problems, models: [scripted, dpo], prompt: solve,
           params: {{temperature: 0.0, max_tokens: 8}},
           verify: {{answer: answer, reference: gold, method: math}}}}
""")
        ran = synth("run", pipeline, timeout=900, check=True)
        # a user reads this: no library's FutureWarning/UserWarning (a DPO run printed one under newer,
        # unlocked packages; the lock file pins versions that do not)
        assert "Warning" not in ran.stderr, ran.stderr
        store = workspace / "out" / "run.duckdb"
        states = dict(query(store, "SELECT name, detail FROM synth.stages WHERE kind = 'train'"))
        sft, dpo = json.loads(states["sft"]), json.loads(states["dpo"])
        assert sft["steps"] == 12 and dpo["steps"] == 4
        losses = [r[0] for r in query(store, "SELECT loss FROM sft ORDER BY step") if r[0] is not None]
        assert len(losses) >= 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
        assert query(store, "SELECT count(*) FROM dpo WHERE loss IS NOT NULL")[0][0] >= 1
        # the students are teachers: `mine` sampled from the SFT model, the evaluation ran the DPO model
        mine = query(store, "SELECT DISTINCT teacher, model FROM mine")
        assert mine == [("sft", sft["model_dir"])]
        assert query(store, "SELECT count(*) FROM mine")[0][0] == 16 * 2
        assert {r[0] for r in query(store, "SELECT DISTINCT model FROM report")} == {"scripted", "dpo"}
        # everything is cached: a re-run trains nothing and sends nothing
        before = teacher.requests
        out = synth("run", pipeline, timeout=900, check=True)
        assert teacher.requests == before and "up to date" in out.stderr
        counts = json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])
        assert counts["stages_run"] == []
