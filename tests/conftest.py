"""Shared fixtures: a tiny real transformers model, a workspace with seed data, and the CLI as a user
runs it (a subprocess of `python -m synth.cli`, so exit codes and stderr are the real ones).

The in-process seam, for tests of a stage's logic: `make_pipeline` writes a pipeline file from dicts,
`echo_teacher` / `scripted_answers` give a teacher without a server (the echo backend), and
`synth_run` runs it with `synth.run` in this process (a mistake raises SynthError: assert its message;
the CLI prints it as its one line). Tests of the CLI itself, exit codes, kills and servers keep `synth`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrained import real_model  # noqa: F401 - the session fixture: SmolLM2-135M-Instruct, converted once

REPO = Path(__file__).resolve().parent.parent

# One OpenMP thread per process (torch in this process, and every `synth`, server and engine process
# the tests start: they inherit this environment). ./scripts/test runs two test files at once on two
# cores; a tiny model gains nothing from a second thread, and two spinning OpenMP threads per process
# slow down 10-30x as soon as the other worker is busy (measured: 20 batched generations 0.56 s with
# one thread, 10-16 s with two). Set before torch is imported; an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SEEDS = [
    {"question": f"Q{i}: what is {i} + {i + 1}?", "answer_gold": str(2 * i + 1),
     "topic": "geometry" if i % 3 == 0 else "arithmetic"}
    for i in range(12)
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (its modules ask for it: pytestmark usefixtures): a tiny model
    gains nothing from two, results stay deterministic, and two OpenMP threads slow down by 10-30x when
    another process is busy on this 2-core machine (the suite runs two workers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised Llama-shaped model (hidden 128, 2 heads of 64) with a locally trained
    tokenizer and chat template: real weights, real tokenizer, no download."""
    from synth.tiny import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A folder with seeds.jsonl and a prompts/ folder, as a user's project would have."""
    return fill_workspace(tmp_path)


def fill_workspace(folder: Path) -> Path:
    """The `workspace` fixture's files (seeds.jsonl, prompts/solve.yaml), written into folder."""
    (folder / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEEDS))
    (folder / "prompts").mkdir()
    (folder / "prompts" / "solve.yaml").write_text(textwrap.dedent("""\
        system: "Solve step by step and end with \\\\boxed{ANSWER}."
        user: "{{ question }}"
        parse: boxed
        """))
    return folder


def journaled(journal: Path, pattern: str, nonempty: bool = False) -> bool:
    """Whether a run's journal folder holds a file matching `pattern` now (with `nonempty`, one with bytes in
    it). The run creates and removes that folder and its files while a test polls them: one that goes
    between listing and looking is "not yet", not an error."""
    try:
        return any(not nonempty or f.stat().st_size > 0 for f in journal.glob(pattern))
    except FileNotFoundError:
        return False


def arithmetic_sft(path: Path, rows: int, most_checks: int) -> Path:
    """SFT rows (id, messages) written to `path` as JSON lines: "What is a+b?" answered "a+b=c." plus 0 to
    most_checks " Check: yes." — uneven lengths, so that a batch of them is padded."""
    import random

    rng = random.Random(0)
    lines = []
    for i in range(rows):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        answer = f"{a}+{b}={a + b}." + " Check: yes." * rng.randint(0, most_checks)
        lines.append(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                                             {"role": "assistant", "content": answer}]}) + "\n")
    path.write_text("".join(lines))
    return path


def bench_quick(script: str, timeout: int = 600, env: dict | None = None) -> dict:
    """Run `bench/<script> --quick` (each benchmark's smoke test) and return the JSON object its output ends
    with; a failed run fails the test with the end of its stderr."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def make_pipeline(workspace: Path, stages: dict[str, dict | str], teachers: dict[str, dict | str] | None = None,
                  store: str | None = "out/run.duckdb", files: dict[str, str | list[dict]] | None = None,
                  name: str = "pipeline.yaml") -> Path:
    """Write `workspace/name` and return its path. Each stage and teacher is one line: a dict (written as
    a JSON flow mapping, which is YAML) or the body of a YAML flow mapping as a string ("kind: load,
    path: rows.jsonl"). `files` are written first, relative to the workspace: a list of dicts as JSON
    lines, a string as text (dedented)."""
    for rel, content in (files or {}).items():
        target = workspace / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            write(target, content)
        else:
            target.write_text("".join(json.dumps(r) + "\n" for r in content))

    def line(key: str, value: dict | str) -> str:
        return f"  {key}: {json.dumps(value) if isinstance(value, dict) else '{' + value + '}'}\n"

    text = f"store: {store}\n" if store else ""
    if teachers:
        text += "teachers:\n" + "".join(line(k, v) for k, v in teachers.items())
    text += "stages:\n" + "".join(line(k, v) for k, v in stages.items())
    path = workspace / name
    path.write_text(text)
    return path


def echo_teacher(answers: list[dict] | None = None, **keys) -> dict:
    """An echo teacher's config (synth/teachers/echo.py): no server, no model."""
    return {"backend": "echo", **({"answers": answers} if answers else {}), **keys}


def scripted_answers(p: float = 0.7, wrong: int = 2) -> list[dict]:
    """tests/scripted_teacher.py's script as echo rules (without its HTTP server and its fixed usage):
    solver requests "Q<i>: ..." answer \\boxed{i} with probability p, else i + 1..wrong, drawn from the
    request's seed and question (the same draw as the server's); a pointwise critic ("grader") scores a
    correct boxed answer 9 and a wrong one 2, and gives no score to a solution containing NOSCORE; a
    pairwise critic ("compare two") picks the correct solution, else "Winner: A" (a pure position bias);
    LONG gets a 12-word answer, REFUSE a refusal, FILTERME a content-filter stop."""
    solve = "{% set q = match[1] | int %}{{ box(q if rng.random() < " + repr(p) + " else q + rng.randint(1, " + \
        str(wrong) + ")) }}"
    score = "{{ 'Checked.\\nScore: 9' if last_boxed(user) == match[1] else 'Wrong result.\\nScore: 2' }}"
    winner = ("{% set parts = user.split('Solution B:') %}{{ 'Winner: B' if last_boxed(parts[1]) == match[1] "
              "and last_boxed(parts[0]) != match[1] else 'Winner: A' }}")
    return [
        {"system": "compare two", "match": r"Q(\d+)", "reply": winner},
        {"system": "grader", "match": "NOSCORE", "reply": "I cannot decide."},
        {"system": "grader", "match": r"Q(\d+)", "reply": score},
        {"match": "REFUSE", "reply": "I'm sorry, but I can't help with that."},
        {"match": r"(?s)Q(\d+).*FILTERME", "reply": "Working it out. " + solve, "finish_reason": "content_filter"},
        {"match": r"(?s)Q(\d+).*LONG", "reply": "Let me work through this one slowly, step by step: so " + solve},
        {"match": r"Q(\d+)", "reply": "Working it out. " + solve},
    ]


def graded_pipeline(workspace, questions: int, p: float, samples: int, **stages: str):
    """`questions` rows "Q<i>: what is it?" (gold i), `samples` solutions each from the scripted teacher (right
    with probability p), graded by a verify stage; then `stages`."""
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)} for i in range(questions)]
    return make_pipeline(workspace, files={"questions.jsonl": rows},
                         teachers={"scripted": echo_teacher(scripted_answers(p=p), model="scripted")}, stages={
        "problems": "kind: load, path: questions.jsonl",
        "solutions": f"kind: generate, input: problems, teacher: scripted, prompt: solve, samples: {samples}, "
                     "params: {temperature: 1.0, max_tokens: 16, seed: 0}",
        "graded": "kind: verify, input: solutions, method: math, answer: answer, reference: gold", **stages})


def weak_strong_evaluation(workspace, questions: int):
    """`questions` held-out rows "Q<i>: what is it?" (gold i) and an evaluate stage `report` of two echo teachers,
    weak (right with probability 0.3) and strong (0.8)."""
    heldout = [{"id": f"h{i}", "question": f"Q{i}: what is it?", "answer_gold": str(i)} for i in range(questions)]
    return make_pipeline(workspace, files={"heldout.jsonl": heldout}, teachers={
        "weak": echo_teacher(scripted_answers(p=0.3), model="weak"),
        "strong": echo_teacher(scripted_answers(p=0.8), model="strong")}, stages={
        "heldout": "kind: load, path: heldout.jsonl",
        "report": "kind: evaluate, input: heldout, models: [weak, strong], prompt: solve, "
                  "params: {temperature: 1.0, max_tokens: 16, seed: 0}, "
                  "verify: {answer: answer, reference: answer_gold, method: math}"})


def synth_run(pipeline: Path, targets: list[str] | None = None, **kwargs) -> dict:
    """`synth run` in this process (synth.run), quiet unless a console is given: the run's counts."""
    import synth as synth_api
    from rich.console import Console

    kwargs.setdefault("console", Console(quiet=True))
    return synth_api.run(pipeline, targets, **kwargs)


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def synth(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
          check: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI exactly as a user would, and return the finished process (text mode)."""
    proc = subprocess.run([sys.executable, "-m", "synth.cli", *map(str, args)], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"synth {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def query(store: Path, sql: str) -> list[tuple]:
    import duckdb

    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}


@contextlib.contextmanager
def start_vllm_server(model: Path, name: str, log: Path, *args: str):
    """vLLM's OpenAI-compatible server for `model` (served as `name`, float32, eager: CPU) on a free loopback
    port, with extra command-line `args`: yields its /v1 URL; stopped on exit."""
    port = free_port()
    proc = start_server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                         "--served-model-name", name, "--dtype", "float32", "--enforce-eager", *args,
                         "--host", "127.0.0.1", "--port", str(port)],
                        f"http://127.0.0.1:{port}/health", log, timeout=300, env=cli_env(**VLLM_CPU_ENV))
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(proc)


def live_processes(marker: bytes, root: Path) -> list[int]:
    """Pids of live (not zombie) processes whose command line has `marker` and names a path under `root` (from
    /proc): a test's child processes, to check that none outlives a kill."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
            state = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[0]  # after "(comm)"
        except OSError:
            continue
        if marker in cmd and str(root).encode() in b" ".join(cmd) and state != "Z":
            found.append(int(pid))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def start_server(cmd: list[str], health_url: str, log: Path, timeout: float = 180, env: dict | None = None):
    """Start a real server process on loopback; returns the Popen (caller terminates it)."""
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or cli_env(), start_new_session=True)
    try:
        wait_for_http(health_url, proc, timeout, log)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- scheduling: the longest test files first ---------------------------------------------------------
# ./scripts/test runs `-n 2 --dist loadfile`: xdist hands out whole files, in collection order, to whichever
# worker is free. By default it first re-sorts the files by their number of tests, which puts the files
# of a few long tests (the demo, kill -9 loops, engines and servers) last, where one of them can keep a
# worker busy long after the other has run out of files. Longest first instead (measured wall time per
# file on 2 cores, heaviest first; files not listed follow in their usual order): the short files then
# fill the gaps at the end. Only the order changes; every test runs as before.
LONGEST_FIRST = [
    "test_vllm.py", "test_demo.py", "test_real_model.py", "test_think_teacher.py", "test_openai_backend.py",
    "test_kill_loop.py", "test_multi_process_train.py", "test_trained_teacher.py", "test_real_model_server.py",
    "test_student_fit.py",
    "test_kd_train.py", "test_batch_api.py", "test_ray.py", "test_crash_resume.py", "test_score.py",
    "test_pipeline.py", "test_reliability.py", "test_replication.py", "test_parallel_train.py", "test_rounds.py",
    "test_kd_kernel.py", "test_own_task.py", "test_command_stage.py", "test_mix.py",
    "test_bad_input.py", "test_train_resume.py", "test_logprobs.py", "test_train_pipeline.py", "test_filters.py",
    "test_budget.py", "test_bad_input_table.py", "test_recipe_check.py", "test_refusals.py", "test_rate_limit.py",
    "test_secrets.py", "test_verifier_escapes.py", "test_fuzz_inputs.py", "test_train.py", "test_code_sandbox.py",
]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
