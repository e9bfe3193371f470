"""Shared fixtures: a tiny real transformers model, a workspace with seed data, and the CLI as a user
runs it (a subprocess of `python -m synth.cli`, so exit codes and stderr are the real ones)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SEEDS = [
    {"question": f"Q{i}: what is {i} + {i + 1}?", "answer_gold": str(2 * i + 1),
     "topic": "geometry" if i % 3 == 0 else "arithmetic"}
    for i in range(12)
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised Llama-shaped model (hidden 128, 2 heads of 64) with a locally trained
    tokenizer and chat template: real weights, real tokenizer, no download."""
    from synth.tiny import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A folder with seeds.jsonl and a prompts/ folder, as a user's project would have."""
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEEDS))
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "solve.yaml").write_text(textwrap.dedent("""\
        system: "Solve step by step and end with \\\\boxed{ANSWER}."
        user: "{{ question }}"
        parse: boxed
        """))
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


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
