"""A task of one's own, end to end through the CLI as a new user runs it: a non-arithmetic world (the colour
of a fruit, asked three ways), `synth models` builds random-init models with a tokenizer trained on its
files, `synth new` writes the workspace (teacher trained on gold solutions, samples, verify, keep, SFT
export, student, evaluate), and the reduced pipeline runs: teacher → samples → filter → student, with
`synth report` comparing the student with the teacher it learned from. Real tiny models and TRL steps."""

from __future__ import annotations

import json
import random
import re

import pytest
import yaml

from conftest import query, synth, write

pytestmark = pytest.mark.slow

COLOURS = {"banana": "yellow", "lemon": "yellow", "apple": "red", "cherry": "red", "strawberry": "red",
           "lime": "green", "kiwi": "green", "plum": "purple", "grape": "purple", "orange": "orange",
           "blueberry": "blue", "coconut": "brown"}
ASK = ["What colour is a {f}?", "Which colour does a ripe {f} have?", "Name the colour of a {f}."]


def world() -> dict[str, list[dict]]:
    """Seed and held-out rows: distinct questions (12 each, disjoint); gold: 240 rows with solutions."""
    rng = random.Random(0)
    combos = [(fruit, ask) for fruit in sorted(COLOURS) for ask in ASK]
    rng.shuffle(combos)

    def row(i: int, fruit: str, ask: str, solution: bool) -> dict:
        out = {"id": f"r{i}", "question": ask.format(f=fruit), "answer": COLOURS[fruit]}
        if solution:
            out["solution"] = f"A ripe {fruit} is {COLOURS[fruit]}.\nThe answer is \\boxed{{{COLOURS[fruit]}}}."
        return out
    return {"seeds": [row(i, *c, False) for i, c in enumerate(combos[:12])],
            "heldout": [row(i, *c, False) for i, c in enumerate(combos[12:24])],
            "gold": [row(i, *rng.choice(combos), True) for i in range(240)]}


def test_models_and_new_make_a_working_workspace_for_another_world(workspace):
    data = workspace / "data"
    data.mkdir()
    for name, rows in world().items():
        write(data / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    ws = workspace / "fruit"

    made = synth("new", ws, "--seeds", data / "seeds.jsonl", "--heldout", data / "heldout.jsonl",
                 "--gold", data / "gold.jsonl", check=True)
    assert f"synth models {ws / 'models.yaml'}" in made.stderr
    spec = yaml.safe_load((ws / "pipeline.yaml").read_text())
    stages = spec["stages"]
    assert stages["teacher"]["kind"] == "train" and stages["teacher"]["student"] == "models/teacher-init"
    assert stages["correct"] == {"kind": "verify", "input": "samples", "method": "exact", "answer": "answer",
                                 "reference": "input_answer"}  # the seed row's `answer`, renamed in the samples' rows
    assert stages["eval"]["models"] == ["teacher", "student"] and stages["problems"]["path"] == "../data/seeds.jsonl"
    again = synth("new", ws, "--seeds", data / "seeds.jsonl")
    assert again.returncode == 2 and "already there; pick another directory or pass --force" in again.stderr

    # the models: a tokenizer trained on this world's files; built once
    built = synth("models", ws / "models.yaml", check=True)
    assert "2 of 2 models built" in built.stderr
    assert "0 of 2 models built" in synth("models", ws / "models.yaml", check=True).stderr
    from transformers import AutoTokenizer

    from synth.tiny import DEFAULT_CORPUS, build_tokenizer
    question = "Which colour does a ripe strawberry have?"
    own = len(AutoTokenizer.from_pretrained(ws / "models" / "student-init")(question)["input_ids"])
    builtin = len(build_tokenizer(DEFAULT_CORPUS)(question)["input_ids"])  # python -m synth.tiny's corpus
    assert own <= 12 and own * 2 < builtin, (own, builtin)  # this world's words are tokens, not letters

    # reduced for the test: fewer steps, fewer samples
    for recipe, steps in (("teacher", 150), ("student", 40)):
        path = ws / "recipes" / f"{recipe}.yaml"
        path.write_text(re.sub(r"max_steps: \d+", f"max_steps: {steps}", path.read_text())
                        .replace("logging_steps: 50", "logging_steps: 10"))
    text = (ws / "pipeline.yaml").read_text().replace("max_tokens: 256", "max_tokens: 32")
    (ws / "pipeline.yaml").write_text(text)

    synth("run", ws / "pipeline.yaml", timeout=1200, check=True)
    store = ws / "out" / "run.duckdb"
    samples, kept = query(store, "SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM kept)")[0]
    assert samples == 12 * 4 and 0 < kept <= samples
    assert query(store, "SELECT count(*) FROM student WHERE loss IS NOT NULL")[0][0] >= 3
    models = dict(query(store, "SELECT model, count(*) FROM eval GROUP BY model"))
    assert models == {"teacher": 12, "student": 12}
    report = json.loads(synth("report", ws / "pipeline.yaml", "--format", "json", check=True).stdout)
    pairs = [(c["a"], c["b"], c["why"]) for c in report["comparisons"]["eval"]]
    assert pairs == [("student", "teacher", "distilled from")]
    t = report["teachers"][0]
    assert (t["samples"], t["teacher"], t["one_sample"]["n"]) == ("samples", "teacher", 12 * 4)
    assert t["one_sample"]["correct"] == kept


def test_new_and_models_mistakes_are_one_line(workspace):
    write(workspace / "rows.jsonl", json.dumps({"id": "a", "query": "q?", "gold": "x"}) + "\n")
    cases = [
        (["new", workspace / "ws", "--seeds", workspace / "nope.jsonl"], "--seeds"),
        (["new", workspace / "ws", "--seeds", workspace / "rows.jsonl"], "which column is the question? Pass "
                                                                          "--question COLUMN (columns: id, query, gold)"),
        (["new", workspace / "ws", "--seeds", workspace / "rows.jsonl", "--question", "query", "--answer", "nope"],
         "--answer nope: no such column"),
        (["new", workspace / "ws", "--seeds", workspace / "rows.jsonl", "--question", "query", "--teacher", "gpt"],
         "--teacher gpt: expected hf:PATH, vllm:PATH, openai:MODEL or echo"),
        (["models"], "give a SPEC file (models.yaml) or --text FILE"),
        (["models", "--text", workspace / "rows.jsonl", "--hidden", "30", "--heads", "4"],
         "hidden (30) must be a multiple of heads (4)"),
    ]
    write(workspace / "bad.yaml", "text: [rows.jsonl]\nmodels: {m: {hidden: 64, layrs: 2}}\n")
    cases.append((["models", workspace / "bad.yaml"], "key 'models.m.layrs'"))
    for args, must in cases:
        out = synth(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and must in out.stderr, (args, out.stderr)
    assert not (workspace / "ws").exists() and not (workspace / "models").exists()
    ok = synth("new", workspace / "ws", "--seeds", workspace / "rows.jsonl", "--question", "query", check=True)
    spec = yaml.safe_load((workspace / "ws" / "pipeline.yaml").read_text())
    assert spec["teachers"]["teacher"] == {"backend": "openai", "model": "gpt-4o-mini"}
    assert spec["stages"]["correct"]["kind"] == "verify" and spec["stages"]["correct"]["reference"] == "gold"
    assert "wrote" in ok.stderr


def test_new_with_a_pretrained_student_writes_a_recipe_trl_accepts(workspace, tiny_model):
    """A student that `synth models` did not build is fine-tuned (LoRA recipe); that recipe must pass the
    recipe check the pipeline's load runs (it once named warmup_ratio, which TRL's SFTConfig no longer has)."""
    from synth import load as synth_load

    write(workspace / "rows.jsonl", json.dumps({"id": "a", "question": "q?", "answer": "x"}) + "\n")
    synth("new", workspace / "ws", "--seeds", workspace / "rows.jsonl", "--teacher", f"hf:{tiny_model}",
          "--student", str(tiny_model), check=True)
    assert "lora:" in (workspace / "ws" / "recipes" / "student.yaml").read_text()
    graph = synth_load(workspace / "ws" / "pipeline.yaml")
    assert graph.stage("student").student == str(tiny_model)
    assert synth("plan", workspace / "ws" / "pipeline.yaml").returncode == 0
