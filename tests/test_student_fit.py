"""Will the data fit the student, known before anything runs (synth/student_fit.py), and what the train
stage's readiness says about think tags once the data exists (synth.train._think). Real tiny models with
real chat templates: synth's own, and a DeepSeek-R1-style one that keeps only what follows </think> in an
assistant turn (a copy of the tiny model with that template written in). The teacher is the echo
backend (no model: what is checked here happens before a teacher is asked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import echo_teacher, make_pipeline, query, synth, synth_run
from synth.errors import SynthError

# DeepSeek-R1's template does this to every assistant turn: {% set content = content.split('</think>')[-1] %}
STRIPPING_TEMPLATE = """\
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
<|im_start|>assistant
{{ message['content'].split('</think>')[-1] | trim }}<|im_end|>
{% else -%}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""

RECIPE = "max_steps: 2\nlearning_rate: 0.001\nper_device_train_batch_size: 2\nmax_length: {max_length}\n"


@pytest.fixture(scope="module")
def stripping_student(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a chat template that drops the think block of assistant turns."""
    target = tmp_path_factory.mktemp("r1") / "student"
    shutil.copytree(tiny_model, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "chat_template.jinja").write_text(STRIPPING_TEMPLATE)
    return target


def pipeline_with_student(workspace: Path, student: Path, max_length: int = 512, reasoning: str = "think",
                          max_tokens: int = 64) -> Path:
    rules = [{"match": r"Q(\d+)", "reply": "<think>add them up</think>\\boxed{ {{ match[1] }} }"}]
    return make_pipeline(
        workspace, teachers={"t": echo_teacher(rules), "student": {"backend": "hf", "model": str(student)}},
        files={"train/sft.yaml": RECIPE.format(max_length=max_length)},
        stages={"problems": "kind: load, path: seeds.jsonl",
                "solutions": f"kind: generate, input: problems, teacher: t, prompt: solve, "
                             f"params: {{max_tokens: {max_tokens}}}",
                "sft_data": f"kind: export, input: solutions, path: out/sft.jsonl, reasoning: {reasoning}",
                "sft": "kind: train, method: sft, data: sft_data, student: student, recipe: train/sft.yaml"})


def plan_rows(pipeline: Path) -> dict[str, dict]:
    """`synth plan --format json`'s rows, in process (the CLI prints exactly these; tests/test_pipeline.py
    runs the command itself)."""
    from synth.pipeline import load_pipeline, plan

    return {r["stage"]: json.loads(json.dumps(r)) for r in plan(load_pipeline(pipeline))}


def test_a_template_that_drops_traces_is_refused_before_the_teacher_is_asked(workspace, stripping_student):
    pipeline = pipeline_with_student(workspace, stripping_student)
    fit = plan_rows(pipeline)["sft"]["fit"]
    assert fit["think_dropped"] is True and "drops the <think>…</think> block" in fit["errors"][0]
    run = synth("run", pipeline)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "stage 'sft'" in line and "drops the <think>…</think> block" in line and "reasoning: drop" in line
    # refused before anything was written: no request, no sample
    store = workspace / "out" / "run.duckdb"
    assert not store.exists() or query(store, "SELECT count(*) FROM synth.requests")[0][0] == 0
    # the same student with answers only is fine: nothing to drop
    assert plan_rows(pipeline_with_student(workspace, stripping_student, reasoning="drop"))["sft"]["fit"]["errors"] == []


def test_synths_own_template_keeps_traces_and_the_plan_says_so(workspace, tiny_model):
    ran = synth("plan", pipeline_with_student(workspace, tiny_model), "--format", "json", check=True)
    row = {r["stage"]: r for r in json.loads(ran.stdout)}["sft"]  # through the CLI once
    assert row["fit"]["think_dropped"] is False and row["fit"]["errors"] == []
    assert "keeps <think>…</think>" in row["note"]
    assert row["fit"]["prompts"] == 12 and 0 < row["fit"]["longest_prompt"] < 512 and row["fit"]["max_tokens"] == 64


def test_prompts_longer_than_max_length_are_refused_before_the_teacher_is_paid(workspace, tiny_model):
    pipeline = pipeline_with_student(workspace, tiny_model, max_length=8)
    fit = plan_rows(pipeline)["sft"]["fit"]
    assert fit["prompts_over"] == 12 and fit["longest_prompt"] >= 8
    run = synth("run", pipeline)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "stage 'sft'" in line and "12 of 12 prompts of 'solutions'" in line and "max_length 8" in line
    assert "train/sft.yaml" in line
    store = workspace / "out" / "run.duckdb"
    assert not store.exists() or query(store, "SELECT count(*) FROM synth.requests")[0][0] == 0


def test_answers_that_may_not_fit_are_a_warning(workspace, tiny_model):
    longest = plan_rows(pipeline_with_student(workspace, tiny_model))["sft"]["fit"]["longest_prompt"]
    pipeline = pipeline_with_student(workspace, tiny_model, max_length=longest + 10, max_tokens=64)
    fit = plan_rows(pipeline)["sft"]["fit"]
    assert fit["errors"] == [] and "answers longer than 10 tokens will be cut" in fit["warnings"][0]
    # a run prints it and goes on (up to the generate stage here: the train stage is not a target, so its
    # preflight does not run; run the whole pipeline and the warning comes before training)
    synth_run(pipeline, ["sft_data"])


def test_readiness_reports_think_tags_per_the_students_template(tmp_path, tiny_model, stripping_student):
    from synth.train import readiness

    rows = [{"messages": [{"role": "user", "content": f"Q{i}"},
                          {"role": "assistant", "content": f"[t]\nstep {i}\n[/t]\n\n\\boxed{{{i}}}"}]}
            for i in range(3)] + [{"messages": [{"role": "user", "content": "Q9"},
                                                {"role": "assistant", "content": "\\boxed{9}"}]}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the export's sidecar names its tags; without it readiness looks for <think>…</think>
    assert readiness(data, str(tiny_model), "sft", 512)["think_tags"] == 0
    (tmp_path / "sft.jsonl.synth.json").write_text(json.dumps({"reasoning": "think", "think_tags": ["[t]", "[/t]"]}))
    ready = readiness(data, str(tiny_model), "sft", 512)
    assert ready["think_tags"] == 3 and ready["think_dropped"] == 0
    assert set(ready["think_tag_tokens"]) == {"[t]", "[/t]"} and all(n >= 1 for n in ready["think_tag_tokens"].values())
    # a template that keeps only what follows the end tag: R1's, with these tags
    template = (stripping_student / "chat_template.jinja").read_text().replace("</think>", "[/t]")
    (stripping_student / "chat_template.jinja").write_text(template)
    try:
        with pytest.raises(SynthError, match=r"drops the \[t\]…\[/t\] trace of 3 of 3 rows"):
            readiness(data, str(stripping_student), "sft", 512)
    finally:
        (stripping_student / "chat_template.jinja").write_text(STRIPPING_TEMPLATE)
