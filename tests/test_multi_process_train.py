"""`gpus: N`: one train stage trained by N DDP processes started by torchrun (synth/train_launch.py), tested
here on CPU: SYNTH_TRAIN_CPU_PROCESSES=1 makes `gpus: 2` two gloo processes. Through the CLI on real
pipelines (the tiny real model, real TRL steps, real DuckDB): each rank trains on a disjoint half of every
step's rows (SYNTH_TRAIN_TRACE: per rank the rows it saw and its final weights), so an epoch of 16 rows at 2
per process is 4 steps; the ranks end with identical weights (DDP all-reduced the gradients: KD too,
whose loss runs its own forward); the parent records the log rows and the model; a kill -9 of `synth run`
leaves no rank or torchrun behind and the re-run resumes from rank 0's checkpoint; a rank's SynthError is
the run's one line. Without the switch and without 2 GPUs, `gpus: 2` is one line before anything is
written. Plus the pure parts: the load dtype on a GPU, the gpus check's line, an unsupported DPO key.

    .venv/bin/python -m pytest -q -n 0 tests/test_multi_process_train.py      (~4 min on 2 cores; -m 'not slow': ~5 s)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, fill_workspace, graded_pipeline, live_processes, make_pipeline, query, synth
from synth.errors import SynthError
from synth.train import latest_checkpoint

ROWS = 16

SFT_RECIPE = """\
{length}
learning_rate: 5.0e-4
per_device_train_batch_size: 2
max_length: {max_length}
logging_steps: 1
seed: 0
"""


def env(tmp_path: Path, **extra: str) -> dict:
    """The CLI's environment with the CPU test path on; SYNTH_TRAIN_TRACE in tmp_path/trace."""
    return cli_env(SYNTH_TRAIN_CPU_PROCESSES="1", SYNTH_TRAIN_TRACE=str(tmp_path / "trace"), OMP_NUM_THREADS="1",
                   SYNTH_TRAIN_LOG_FLUSH_S="0", **extra)


def sft_pipeline(root: Path, student: Path, *, length: str = "num_train_epochs: 1", max_length: int = 256,
                 gpus: int = 2) -> Path:
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is {i} plus {i}?", "answer_gold": f"The answer is {2 * i}."}
            for i in range(ROWS)]
    return make_pipeline(root, files={"rows.jsonl": rows, "prompts/ask.yaml": 'user: "{{ question }}"\n',
                                      "train/sft.yaml": SFT_RECIPE.format(length=length, max_length=max_length)},
                         stages={
        "rows": "kind: load, path: rows.jsonl",
        "data": "kind: export, input: rows, format: sft, prompt: ask, response: answer_gold, path: out/sft.parquet",
        "sft": {"kind": "train", "method": "sft", "data": "data", "student": str(student), "recipe": "train/sft.yaml",
                "gpus": gpus}})


def launched(root: Path) -> list[int]:
    """Live processes of a multi-process training in this workspace: torchrun (started through
    synth.train_launch agent) and its ranks (their command lines name the spec under root)."""
    return live_processes(b"synth.train_launch", root)


def state_of(store: Path, name: str) -> tuple[str, dict]:
    status, detail = query(store, f"SELECT status, detail FROM synth.stages WHERE name = '{name}'")[0]
    return status, json.loads(detail)


def traces(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / "trace" / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_model_loads(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        out = model(**tokenizer("Q1: what is 1 plus 1?", return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_sft_in_two_processes_each_rank_a_disjoint_shard(tmp_path, tiny_model):
    root = tmp_path / "ws"
    root.mkdir()
    pipeline = sft_pipeline(root, tiny_model)
    started = time.monotonic()
    out = synth("run", pipeline, env=env(tmp_path), timeout=600, check=True)
    print(f"2 gloo processes, one epoch: {time.monotonic() - started:.1f} s")
    assert "sft: sft on sft.parquet" in out.stderr and "in 2 CPU processes (SYNTH_TRAIN_CPU_PROCESSES)" in out.stderr
    store = root / "out" / "run.duckdb"
    status, detail = state_of(store, "sft")
    # one epoch: 16 rows / (2 per process x 2 processes) = 4 steps (one process would take 8)
    assert status == "done" and detail["steps"] == ROWS // (2 * 2) and detail["resumed_from"] is None
    assert detail["train_loss"] > 0 and detail["readiness"]["rows"] == ROWS
    rank0, rank1 = traces(tmp_path)
    assert len(rank0["rows"]) == len(rank1["rows"]) == ROWS // 2
    assert not set(rank0["rows"]) & set(rank1["rows"]) and len(set(rank0["rows"]) | set(rank1["rows"])) == ROWS
    assert rank0["weights"] == rank1["weights"]  # DDP: one model
    # the parent wrote rank 0's log rows to the store, every step once
    assert [r[0] for r in query(store, "SELECT step FROM sft WHERE loss IS NOT NULL ORDER BY step")] == [1, 2, 3, 4]
    model_dir = Path(detail["model_dir"])
    assert_model_loads(model_dir)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]  # the launch folder is gone
    assert not (root / "out" / "models" / "sft-attempt").exists()
    assert not launched(root)


@pytest.mark.slow
def test_kd_in_two_processes_keeps_the_ranks_identical(tmp_path, tiny_model):
    """KD's loss runs its own forward (hidden states, no full logits): through DDP's wrapper, so the gradients
    are all-reduced and both ranks end with the same weights (a call of the unwrapped decoder left them apart)."""
    root = tmp_path / "ws"
    root.mkdir()
    kd = "max_steps: 3\nlearning_rate: 1.0e-3\nper_device_train_batch_size: 2\nmax_length: 128\nlogging_steps: 1\n" \
         "seed: 0\nkd: {alpha: 0.0, temperature: 1.0, divergence: forward_kl, chunk_size: 16, kernel: torch}\n"
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is {i} plus {i}?"} for i in range(12)]
    pipeline = make_pipeline(root, teachers={"teacher": {"backend": "hf", "model": str(tiny_model), "batch_size": 12}},
                             files={"rows.jsonl": rows, "prompts/ask.yaml": 'user: "{{ question }}"\n',
                                    "train/kd.yaml": kd}, stages={
        "rows": "kind: load, path: rows.jsonl",
        "samples": {"kind": "generate", "input": "rows", "teacher": "teacher", "prompt": "ask",
                    "params": {"temperature": 1.0, "max_tokens": 12, "seed": 0, "logprobs": 4}},
        "kd_data": {"kind": "export", "input": "samples", "format": "kd", "path": "out/kd.parquet"},
        "student": {"kind": "train", "method": "kd", "data": "kd_data", "student": str(tiny_model),
                    "recipe": "train/kd.yaml", "gpus": 2}})
    out = synth("run", pipeline, env=env(tmp_path), timeout=600, check=True)
    assert "in 2 CPU processes" in out.stderr
    store = root / "out" / "run.duckdb"
    status, detail = state_of(store, "student")
    assert status == "done" and detail["steps"] == 3
    rank0, rank1 = traces(tmp_path)
    assert len(rank0["rows"]) == len(rank1["rows"]) == 3 * 2 and not set(rank0["rows"]) & set(rank1["rows"])
    assert rank0["weights"] == rank1["weights"]
    losses = [r[0] for r in query(store, "SELECT loss FROM student WHERE loss IS NOT NULL ORDER BY step")]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert_model_loads(Path(detail["model_dir"]))


def dpo_pipeline(root: Path, student: Path, recipe: str, gpus: int | None = None) -> Path:
    """Scripted answers to 16 questions, 4 samples each, graded; a pair per question with a right and a wrong
    answer (half of them right: most questions have both) -> a dpo export -> dpo."""
    (root / "train").mkdir(exist_ok=True)
    (root / "train" / "dpo.yaml").write_text(recipe)
    return graded_pipeline(root, 16, 0.5, 4, **{
        "prefs": "kind: pairs, input: solutions, by: graded, max_per_input: 1",
        "dpo_data": "kind: export, input: prefs, format: dpo, path: out/dpo.parquet",
        "dpo": {"kind": "train", "method": "dpo", "data": "dpo_data", "student": str(student),
                "recipe": "train/dpo.yaml", **({"gpus": gpus} if gpus else {})}})


@pytest.mark.slow
def test_dpo_in_two_processes(tmp_path, tiny_model):
    root = tmp_path / "ws"
    root.mkdir()
    fill_workspace(root)
    pipeline = dpo_pipeline(root, tiny_model, "max_steps: 2\nlearning_rate: 5.0e-4\nper_device_train_batch_size: 2\n"
                            "max_length: 128\nbeta: 0.1\nlogging_steps: 1\nseed: 0\n", gpus=2)
    synth("run", pipeline, env=env(tmp_path), timeout=600, check=True)
    status, detail = state_of(root / "out" / "run.duckdb", "dpo")
    assert status == "done" and detail["steps"] == 2
    rank0, rank1 = traces(tmp_path)
    # 2 steps x 2 pairs per rank, and the batch accelerate fetched ahead: other pairs on each rank
    assert len(set(rank0["rows"])) >= 2 * 2 and len(set(rank1["rows"])) >= 2 * 2
    assert not set(rank0["rows"]) & set(rank1["rows"]) and rank0["weights"] == rank1["weights"]
    assert query(root / "out" / "run.duckdb", "SELECT count(*) FROM dpo WHERE loss IS NOT NULL") == [(2,)]
    assert_model_loads(Path(detail["model_dir"]))


@pytest.mark.slow
def test_a_kill_of_synth_run_leaves_no_process_and_the_rerun_resumes(tmp_path, tiny_model):
    root = tmp_path / "ws"
    root.mkdir()
    steps = 40  # a checkpoint every 4 steps (synth's default: a tenth of the run)
    pipeline = sft_pipeline(root, tiny_model, length=f"max_steps: {steps}")
    attempt = root / "out" / "models" / "sft-attempt"
    err = tmp_path / "stderr.txt"
    with open(err, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 300, 0
        while time.monotonic() < deadline and proc.poll() is None:
            seen = max(seen, len(launched(root)))
            try:
                if latest_checkpoint(attempt / "checkpoints", prune=False) is not None:
                    break
            except FileNotFoundError:  # rotated away while we looked
                pass
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before a checkpoint (exit {proc.poll()}):\n{err.read_text()}"
        assert seen == 3, seen  # torchrun and its two ranks
        proc.send_signal(signal.SIGKILL)  # the parent alone: torchrun is in a session of its own, so are the ranks
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while launched(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not launched(root), "a training process outlived its killed synth run"
    step = int(latest_checkpoint(attempt / "checkpoints", prune=False).name.split("-")[1])
    assert 0 < step < steps

    out = synth("run", pipeline, env=env(tmp_path), timeout=600, check=True)
    assert f"resuming from step {step}" in out.stderr, out.stderr
    store = root / "out" / "run.duckdb"
    status, detail = state_of(store, "sft")
    assert status == "done" and detail["steps"] == steps and detail["resumed_from"] == step
    assert [r[0] for r in query(store, "SELECT step FROM sft WHERE loss IS NOT NULL ORDER BY step")] == \
        list(range(1, steps + 1))
    assert_model_loads(Path(detail["model_dir"]))
    assert not attempt.exists() and not launched(root)


@pytest.mark.slow
def test_a_ranks_error_is_the_runs_one_line(tmp_path, tiny_model):
    """Rows longer than max_length: each rank refuses in its readiness check (SynthError); the run prints that
    line once, as a single process would, and exits 2 — no traceback, no rank left."""
    root = tmp_path / "ws"
    root.mkdir()
    pipeline = sft_pipeline(root, tiny_model, max_length=12)
    write_share = (root / "train" / "sft.yaml").read_text() + "max_truncated_share: 0.0\n"
    (root / "train" / "sft.yaml").write_text(write_share)
    out = synth("run", pipeline, env=env(tmp_path), timeout=600)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("synth: error:")]
    assert len(errors) == 1 and "exceed max_length 12" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert state_of(root / "out" / "run.duckdb", "sft")[0] != "done"
    assert not launched(root)


def test_two_gpus_without_two_is_one_line_before_anything_is_written(tmp_path, tiny_model):
    """No CUDA here (and no CPU switch): `gpus: 2` is refused by the stage's preflight, exit 2, no store."""
    root = tmp_path / "ws"
    root.mkdir()
    pipeline = sft_pipeline(root, tiny_model)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = synth("run", pipeline, env=cli_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"synth: error: {pipeline}:") and "stage 'sft': key 'gpus': 2 training processes " \
        "need 2 CUDA GPUs, but no CUDA GPU is visible here" in lines[0], lines[0]
    assert "SYNTH_TRAIN_CPU_PROCESSES=1" in lines[0]
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before and not (root / "out").exists()


def test_the_gpus_check():
    from synth.train_launch import gpus_problem, process_count

    assert [process_count(g) for g in (None, 1, 2, 8)] == [1, 1, 2, 8]
    assert gpus_problem(None, 0, cpu=False) is None and gpus_problem(1, 0, cpu=False) is None
    assert gpus_problem(2, 2, cpu=False) is None and gpus_problem(2, 8, cpu=False) is None
    assert gpus_problem(4, 0, cpu=True) is None  # the CPU test path needs no GPU
    one = gpus_problem(4, 1, cpu=False)
    assert one.startswith("key 'gpus': 4 training processes need 4 CUDA GPUs, but only 1 CUDA GPU is visible here")
    assert "set gpus: 1 or remove the key" in one
    assert "only 3 CUDA GPUs are visible" in gpus_problem(4, 3, cpu=False)


def test_the_load_dtype_on_a_gpu():
    """bf16 weights on a CUDA GPU unless the recipe says otherwise; TRL's float32 on CPU."""
    from synth.train import load_dtype

    assert load_dtype({}, cuda=True) == "bfloat16"
    assert load_dtype({"bf16": True, "model_init_kwargs": {"attn_implementation": "sdpa"}}, cuda=True) == "bfloat16"
    assert load_dtype({}, cuda=False) is None
    assert load_dtype({"fp16": True}, cuda=True) is None  # fp16 mixed precision keeps float32 master weights
    assert load_dtype({"bf16": False}, cuda=True) is None  # the recipe asks for float32
    assert load_dtype({"model_init_kwargs": {"dtype": "float32"}}, cuda=True) is None
    assert load_dtype({"model_init_kwargs": '{"dtype": "float16"}'}, cuda=True) is None  # TRL takes JSON text too


def test_the_config_on_cpu_leaves_the_dtype_to_trl():
    from synth.train import build_config

    config = build_config("sft", {"max_steps": 1}, Path("/nonexistent/x"))
    assert not (config.model_init_kwargs or {}).get("dtype") and config.bf16 is False


def test_a_dpo_recipe_with_padding_free_is_refused_at_load(tmp_path, tiny_model):
    """TRL 1.16's DPOTrainer warns and trains padded; synth refuses rather than train otherwise than asked."""
    import synth as synth_api

    fill_workspace(tmp_path)
    pipeline = dpo_pipeline(tmp_path, tiny_model, "max_steps: 2\npadding_free: true\n")
    with pytest.raises(SynthError) as caught:
        synth_api.load(pipeline)
    message = str(caught.value)
    assert "stage 'dpo': key 'recipe'" in message and "key 'padding_free'" in message and "remove it" in message
    assert "\n" not in message


def test_a_failed_launch_is_one_line(tmp_path):
    """The parent's reading of the ranks' error files: a rank's SynthError verbatim; else the first error
    (a peer's lost connection comes later), naming the log; else torchrun's exit."""
    from synth.train_launch import _failure, _synth_error

    work = tmp_path / "launch"
    work.mkdir()
    assert "torchrun was killed by signal 9" in _failure(work, -9, 2)
    (work / "error-1.json").write_text(json.dumps({"rank": 1, "message": "RuntimeError: Connection closed by peer",
                                                   "synth": False, "at": 2.0}))
    (work / "error-0.json").write_text(json.dumps({"rank": 0, "message": "ValueError: bad shape", "synth": False,
                                                   "at": 1.0}))
    assert _synth_error(work) is None
    line = _failure(work, 1, 2)
    assert line.startswith("training process 0 of 2 failed: ValueError: bad shape") and str(work / "launch.log") in line
    (work / "error-1.json").write_text(json.dumps({"rank": 1, "message": "data.parquet: 3 rows exceed max_length",
                                                   "synth": True, "at": 3.0}))
    assert _synth_error(work) == "data.parquet: 3 rows exceed max_length"
