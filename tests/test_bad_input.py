"""Bad input gets one clear line: what was wrong and where (file:line, stage, key, row), exit code 2,
no traceback, and nothing written (no store is created). Each case edits one thing in a valid
pipeline and runs `synth run` through the CLI, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import cli_env, synth, write

VALID = """\
store: out/run.duckdb
teachers:
  tutor: {backend: hf, model: models/tiny}
stages:
  problems: {kind: load, path: seeds.jsonl}
  solutions:
    kind: generate
    input: problems
    teacher: tutor
    prompt: solve
    samples: 2
    params: {temperature: 0.8, max_tokens: 8, seed: 0}
  sft: {kind: export, input: solutions, format: sft, path: out/sft.parquet}
"""

# (case id, text replaced in VALID, replacement, substrings the error line must contain)
CASES = [
    ("unknown stage key", "samples: 2", "sampels: 2", ["pipeline.yaml:11", "stage 'solutions'", "unknown key 'sampels'", "allowed:"]),
    ("unknown sampling param", "seed: 0}", "seed: 0, temp: 1}", ["pipeline.yaml:12", "unknown key 'temp'", "temperature"]),
    ("unknown top-level key", "store: out", "stor: out", ["pipeline.yaml:1", "unknown key 'stor'"]),
    ("unknown kind", "kind: export", "kind: exprt", ["pipeline.yaml:13", "stage 'sft'", "unknown kind 'exprt'"]),
    ("unknown backend", "backend: hf", "backend: hff", ["pipeline.yaml:3", "teacher 'tutor'", "unknown backend 'hff'"]),
    ("unknown teacher reference", "teacher: tutor", "teacher: tooter", ["pipeline.yaml:9", "key 'teacher'", "'tooter'", "tutor"]),
    ("unknown stage reference", "input: problems", "input: problem", ["pipeline.yaml:8", "key 'input'", "'problem'", "problems"]),
    ("cycle", "  problems: {kind: load, path: seeds.jsonl}",
     "  problems: {kind: load, path: seeds.jsonl}\n  a: {kind: generate, input: b, teacher: tutor, prompt: solve}\n"
     "  b: {kind: generate, input: a, teacher: tutor, prompt: solve}", ["cycle", "a -> b -> a"]),
    ("wrong value", "samples: 2", "samples: -1", ["pipeline.yaml:11", "key 'samples'", "greater than or equal to 1"]),
    ("invalid YAML", "samples: 2", "samples: [2", ["pipeline.yaml:12", "not valid YAML"]),
    ("missing seed file", "path: seeds.jsonl", "path: nope.jsonl", ["pipeline.yaml:5", "stage 'problems'", "key 'path'", "nope.jsonl"]),
    ("missing template", "prompt: solve", "prompt: nope", ["pipeline.yaml:10", "key 'prompt'", "nope.yaml"]),
    ("template variable not in the input", "prompt: solve", "prompt: typo",
     ["pipeline.yaml:10", "stage 'solutions'", "questoin", "question"]),
    ("unknown key in a template", "prompt: solve", "prompt: badkey", ["badkey.yaml:2", "unknown key 'sytem'"]),
    ("malformed seed row", "path: seeds.jsonl", "path: broken.jsonl", ["broken.jsonl:3", "not valid JSON"]),
    ("stage name is a SQL keyword", "  sft: {kind", "  unique: {kind", ["pipeline.yaml:13", "'unique'", "reserved SQL keyword"]),
    ("unknown export format", "format: sft", "format: dpo", ["pipeline.yaml:13", "stage 'sft'", "format"]),
    ("unknown on_length policy", "samples: 2", "samples: 2\n    on_length: trim",
     ["pipeline.yaml:12", "stage 'solutions'", "key 'on_length'", "'keep', 'retry' or 'error'"]),
]


@pytest.fixture()
def project(workspace):
    write(workspace / "prompts" / "typo.yaml", 'user: "{{ questoin }}"\n')
    write(workspace / "prompts" / "badkey.yaml", 'user: "{{ question }}"\nsytem: "x"\n')
    write(workspace / "broken.jsonl", '{"question": "a"}\n{"question": "b"}\n{"question": "c", oops}\n')
    return workspace


def assert_one_line_error(proc: subprocess.CompletedProcess, must: list[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("synth: error: "), line
    for part in must:
        assert part in line, f"{part!r} not in {line!r}"
    return line


@pytest.mark.parametrize("case,old,new,must", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_input_is_one_line_and_writes_nothing(project, case, old, new, must, command):
    assert old in VALID
    pipeline = project / "pipeline.yaml"
    pipeline.write_text(VALID.replace(old, new, 1))
    assert_one_line_error(synth(command, pipeline), must)
    assert not (project / "out").exists()


def test_batch_api_teacher_on_ray_is_refused_before_anything_is_written(project):
    text = VALID.replace("backend: hf, model: models/tiny", "backend: openai, model: m, base_url: 'http://x/v1', "
                         "mode: batch").replace("samples: 2", "samples: 2\n    ray: {workers: 1}")
    pipeline = write(project / "pipeline.yaml", text)
    assert_one_line_error(synth("run", pipeline), ["stage 'solutions'", "key 'ray'", "mode batch"])
    assert not (project / "out").exists()


def test_missing_pipeline_file(project):
    assert_one_line_error(synth("run", project / "nope.yaml"), ["nope.yaml", "no such pipeline file"])


def test_unknown_stage_on_the_command_line(project, tiny_model):
    pipeline = write(project / "pipeline.yaml", VALID.replace("models/tiny", str(tiny_model)))
    assert_one_line_error(synth("run", pipeline, "solutons"), ["solutons", "solutions"])
    assert not (project / "out").exists()


def test_store_locked_beyond_the_timeout(project, tiny_model):
    """Another process holds the store open for writing; with SYNTH_LOCK_TIMEOUT=1 `synth run` and
    `synth status` give up after about a second with one line naming the store and the variable."""
    pipeline = write(project / "pipeline.yaml", VALID.replace("models/tiny", str(tiny_model)))
    synth("run", pipeline, "problems", check=True)
    store = project / "out" / "run.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys, time\n"
                               f"con = duckdb.connect({str(store)!r})\nprint('held', flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["run", pipeline], ["status", pipeline], ["sql", pipeline, "select 1"]):
            started = time.monotonic()
            proc = synth(*command, env=cli_env(SYNTH_LOCK_TIMEOUT="1"))
            line = assert_one_line_error(proc, [str(store), "locked", "SYNTH_LOCK_TIMEOUT"])
            assert time.monotonic() - started < 30, line
    finally:
        holder.kill()
        holder.wait()
    # once released, the same command works and nothing was half-written
    synth("run", pipeline, "problems", check=True)
    assert os.path.exists(store)
