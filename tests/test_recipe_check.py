"""A bad training recipe is reported when the pipeline is loaded, before any stage runs or the store
is created: one line naming the stage, the recipe file and line, the key, what is wrong and what to do.
The check reads TRL's config fields from its source (synth.train.config_fields), so loading a pipeline
does not import torch or TRL; a consistency test holds those fields against the real classes.

    .venv/bin/python -m pytest -q -n 0 tests/test_recipe_check.py      (~25 s on 2 cores)
"""

from __future__ import annotations

import re

import dataclasses
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import REPO, synth, write
from synth.errors import SynthError
from synth.train import check_recipe, config_fields

GOOD = """\
max_steps: 4
learning_rate: 5e-4
per_device_train_batch_size: 4
logging_steps: 1
"""

BAD = {  # recipe text -> what the one line must say
    "unknown": (GOOD + "learning_rat: 0.1\n", ["sft.yaml:5:", "unknown key 'learning_rat'", "'learning_rate'"]),
    "type": ("max_steps: ten\n", ["sft.yaml:1:", "'max_steps' must be an integer", "'ten'"]),
    "enum": ("lr_scheduler_type: sideways\n", ["sft.yaml:1:", "'lr_scheduler_type' must be one of", "cosine"]),
    "dpo_key": ("beta: 0.1\n", ["unknown key 'beta' for a sft recipe"]),
    "yaml": ("max_steps: 4\n  learning_rate: [1\n", ["sft.yaml:2:", "not valid YAML"]),
    "twice": ("max_steps: 4\nmax_steps: 5\n", ["sft.yaml:2:", "'max_steps' is set twice (also at line 1)"]),
    "owned": ("output_dir: elsewhere\n", ["sft.yaml:1:", "'output_dir' cannot be set"]),
    "lora": ("lora: {r: 8, dropuot: 0.1}\n", ["sft.yaml:1:", "'lora.dropuot'", "'dropout'"]),
    "missing": (None, ["no such file", "sft.yaml"]),  # check_references finds this one first
}


@pytest.fixture(scope="module")
def plain_student(tmp_path_factory, tiny_model) -> Path:
    """The tiny model's tokenizer files, with a chat template that has no {% generation %} markers."""
    out = tmp_path_factory.mktemp("plain") / "student"
    shutil.copytree(tiny_model, out)
    template = (out / "chat_template.jinja").read_text()
    (out / "chat_template.jinja").write_text(
        template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    return out


def _pipeline(workspace: Path, student: Path, recipe: str | None) -> Path:
    (workspace / "train").mkdir(exist_ok=True)
    if recipe is not None:
        write(workspace / "train" / "sft.yaml", recipe)
    return write(workspace / "pipeline.yaml", f"""\
store: out/run.duckdb
teachers:
  base: {{backend: hf, model: "{student}"}}
stages:
  problems: {{kind: load, path: seeds.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: base, prompt: solve, samples: 2,
              params: {{max_tokens: 8}}}}
  sft_data: {{kind: export, input: solutions, format: sft, path: out/sft.parquet}}
  sft: {{kind: train, method: sft, data: sft_data, student: base, recipe: train/sft.yaml}}
""")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_fails_before_anything_is_written(case, workspace, plain_student):
    recipe, expected = BAD[case]
    pipeline = _pipeline(workspace, plain_student, recipe)
    before = sorted(p.relative_to(workspace) for p in workspace.rglob("*"))
    proc = synth("run", pipeline)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"synth: error: {pipeline}:"), lines[0]
    assert "stage 'sft': key 'recipe':" in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    # nothing written: no store, no output folder, not a byte
    assert not (workspace / "out").exists()
    assert sorted(p.relative_to(workspace) for p in workspace.rglob("*")) == before
    assert synth("plan", pipeline).returncode == 2


def test_good_recipe_passes_and_loading_imports_no_trl(workspace, tiny_model):
    """The tiny model's template has markers, so assistant_only_loss is fine; the check reads TRL's
    source, imports neither TRL nor torch, and writes nothing."""
    pipeline = _pipeline(workspace, tiny_model, GOOD + "assistant_only_loss: true\nlr_scheduler_type: cosine\n")
    code = ("import sys, json\nfrom pathlib import Path\nfrom synth.pipeline import load_pipeline\n"
            f"load_pipeline(Path({str(pipeline)!r}))\n"
            "print(json.dumps(sorted(m for m in ('trl', 'torch', 'transformers') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert not (workspace / "out").exists()


def test_shipped_recipes_pass(tiny_model):
    for path in [*sorted((REPO / "train").glob("*.yaml")), *sorted((REPO / "examples").rglob("recipes/*.yaml"))]:
        method = "dpo" if "dpo" in path.name else "kd" if re.search(r"^kd:", path.read_text(), re.M) else "sft"
        assert isinstance(check_recipe(path, method, tiny_model), dict), path


def test_template_check_knows_trl_s_patchable_templates(tmp_path, plain_student):
    """TRL swaps in a training template for the chat templates it ships (Qwen 3, Llama 3, ...): a
    student with one of those needs no markers of its own."""
    import importlib.util

    shipped = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "chat_templates" / "qwen3.jinja"
    student = tmp_path / "qwen-like"
    shutil.copytree(plain_student, student)
    (student / "chat_template.jinja").write_text(shipped.read_text())
    recipe = write(tmp_path / "r.yaml", "assistant_only_loss: true\n")
    assert check_recipe(recipe, "sft", student) == {"assistant_only_loss": True}
    assert check_recipe(recipe, "sft", plain_student) == {"assistant_only_loss": True}  # prompt-completion rows
    no_template = tmp_path / "no-template"
    shutil.copytree(plain_student, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(SynthError, match="has no chat template"):
        check_recipe(recipe, "sft", no_template)
    assert check_recipe(recipe, "sft", "some-org/some-hub-model") == {"assistant_only_loss": True}  # not knowable


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_source_fields_match_trl_classes(method):
    """config_fields (read from the source) has exactly the real dataclass's init fields, and every
    field it reads as an enum's values is one the real class refuses any other string for."""
    from trl import DPOConfig, SFTConfig

    cls = {"sft": SFTConfig, "dpo": DPOConfig}[method]
    fields = config_fields(method)
    assert set(fields) == {f.name for f in dataclasses.fields(cls) if f.init}
    enums = [k for k, tp in fields.items() if typing.get_origin(tp) is typing.Literal]
    assert {"lr_scheduler_type", "optim", "save_strategy", "eval_strategy"} <= set(enums)
    for key in enums:
        with pytest.raises((ValueError, TypeError, KeyError)):
            cls(output_dir="/nonexistent/synth-check", use_cpu=True, bf16=False, **{key: "no-such-value"})
        value = typing.get_args(fields[key])[0]
        assert check_recipe(write_recipe(key, value), method) == {key: value}


def write_recipe(key: str, value) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "r.yaml"
    path.write_text(f"{key}: {json.dumps(value)}\n")
    return path
