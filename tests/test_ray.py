"""`ray:` on a generate stage (synth/teachers/ray.py): the stage's backend runs in Ray actors and the
driver writes what they return. Real Ray clusters on this machine, the real CLI, a real store:
- a pipeline with `ray:` (its own local cluster, address unset) writes the same completions (ids and
  texts) as the same pipeline without it; the scripted OpenAI-compatible server (tests/scripted_teacher.py)
  answers deterministically per request seed, so texts must match exactly;
- the `hf` backend on the tiny model, on a shared cluster: the same ids and texts as in-process, because
  chunk_size is a multiple of batch_size (an hf batch is seeded from its first request, so equal texts
  need equal batches);
- a worker killed with SIGKILL mid-run: its chunks are resubmitted, nothing is lost or duplicated;
  every worker killed: the stage stops with one error line, each request has at most one row, and a
  re-run sends exactly what was missing;
- a budget stops dispatch and keeps what was in flight; bad settings and errors raised in a worker are
  one line each.
Each `synth run` without `address:` starts its own local cluster (~8-10 s here), so the other tests share
one cluster started by this module (ray.init in the pytest process) and pass its address. The whole file
took 100-155 s here (2 cores, shared with other jobs: load average 3-8).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from conftest import SEEDS, cli_env, free_port, query, synth, write  # noqa: E402
from scripted_teacher import ScriptedTeacher  # noqa: E402

pytestmark = pytest.mark.slow

SAMPLES = 2
TOTAL = len(SEEDS) * SAMPLES  # 24 requests
# conftest's `workspace` prompt, for the module's reference workspace
PROMPT = 'system: "Solve step by step and end with \\\\boxed{ANSWER}."\nuser: "{{ question }}"\nparse: boxed\n'


def pipeline_text(teacher: str, ray_options: str | None) -> str:
    ray_line = f", ray: {ray_options}" if ray_options else ""
    return f"""\
store: out/run.duckdb
teachers:
  t: {teacher}
stages:
  problems: {{kind: load, path: seeds.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: t, prompt: solve, samples: {SAMPLES},
              params: {{temperature: 1.0, max_tokens: 16, seed: 0}}{ray_line}}}
"""


def scripted(base_url: str) -> str:
    return f'{{backend: openai, model: scripted, base_url: "{base_url}", max_concurrency: 4}}'


def rows(workspace: Path) -> dict[str, str]:
    return dict(query(workspace / "out" / "run.duckdb", "SELECT id, text FROM solutions"))


def copy_workspace(workspace: Path, name: str) -> Path:
    """A second workspace with the same seeds and prompts (its own store)."""
    other = workspace / name
    (other / "prompts").mkdir(parents=True)
    (other / "seeds.jsonl").write_text((workspace / "seeds.jsonl").read_text())
    (other / "prompts" / "solve.yaml").write_text((workspace / "prompts" / "solve.yaml").read_text())
    return other


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module, owned by this process: its raylet and workers are our
    descendants (so a test can find and kill a worker process), and ray.shutdown() stops all of it."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def stray_ray_processes() -> set[int]:
    """Live Ray processes on this machine other than this module's cluster (our descendants); exited
    ones that nobody reaped yet are not counted."""
    ours = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    found = set()
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.pid in ours:
            continue
        cmd = " ".join(p.info["cmdline"] or ())
        if p.info["status"] != psutil.STATUS_ZOMBIE and (
                cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd or "site-packages/ray/" in cmd):
            found.add(p.pid)
    return found


def settle(check, timeout: float = 15) -> bool:
    """Poll `check` until it holds (processes take a moment to exit after a kill)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def worker_processes() -> list[psutil.Process]:
    """This module's cluster's TeacherWorker actor processes (Ray titles them ray::TeacherWorker...)."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::TeacherWorker"):
                found.append(p)
        except psutil.Error:
            pass
    return found


class SlowTeacher(ScriptedTeacher):
    """The scripted server, answering after a delay so that a run lasts long enough to be interrupted."""

    def __init__(self, delay: float):
        super().__init__(p=0.5)
        self.delay = delay

    async def _chat(self, request):
        await request.read()  # the body first: a client killed during the delay is then no server error
        await asyncio.sleep(self.delay)
        return await super()._chat(request)


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> dict[str, str]:
    """The stage's completions (id -> text) from a run without Ray, in a workspace of its own; every test
    here compares against them (the scripted server's answers depend only on the request)."""
    ws = tmp_path_factory.mktemp("reference")
    (ws / "prompts").mkdir()
    (ws / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEEDS))
    (ws / "prompts" / "solve.yaml").write_text(PROMPT)
    with ScriptedTeacher(p=0.5) as teacher:
        synth("run", write(ws / "pipeline.yaml", pipeline_text(scripted(teacher.base_url), None)), check=True)
        assert teacher.requests == TOTAL
    found = rows(ws)
    assert len(found) == TOTAL
    return found


def test_local_cluster_gives_the_same_completions(workspace, expected):
    with ScriptedTeacher(p=0.5) as teacher:
        pipeline = write(workspace / "pipeline.yaml", pipeline_text(
            scripted(teacher.base_url), "{workers: 2, num_cpus: 0.5, chunk_size: 5}"))
        before = stray_ray_processes()
        started = time.monotonic()
        proc = synth("run", pipeline, check=True)
        elapsed = time.monotonic() - started
        assert settle(lambda: stray_ray_processes() <= before)  # the run's local cluster went with it
        assert rows(workspace) == expected, proc.stderr
        assert teacher.requests == TOTAL  # each request sent once
        assert "Traceback" not in proc.stderr, proc.stderr
        print(f"synth run with a local Ray cluster: {elapsed:.1f}s")
        # a finished stage re-run sends nothing (and starts no cluster)
        synth("run", pipeline, check=True)
        assert teacher.requests == TOTAL
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM synth.errors")[0][0] == 0


def test_hf_backend_on_ray_matches_in_process(workspace, tiny_model, cluster):
    """Same ids and same texts: chunk_size 8 is a multiple of batch_size 4, so every hf batch holds the same
    requests as in the in-process run. The model is given relative to the pipeline file (a symlink in
    the workspace): the driver resolves it, the workers load it by its absolute path."""
    teacher = "{backend: hf, model: models/tiny, batch_size: 4}"
    ref = copy_workspace(workspace, "reference")
    for ws in (workspace, ref):
        (ws / "models").mkdir()
        (ws / "models" / "tiny").symlink_to(tiny_model, target_is_directory=True)
    # Ray runs each worker with OMP_NUM_THREADS=1 (its num_cpus, at least 1): the reference too, so that
    # both compute with the same float reductions
    synth("run", write(ref / "pipeline.yaml", pipeline_text(teacher, None)), env=cli_env(OMP_NUM_THREADS="1"),
          check=True)
    expected = rows(ref)
    assert len(expected) == TOTAL
    proc = synth("run", write(workspace / "pipeline.yaml", pipeline_text(
        teacher, f'{{address: "{cluster}", workers: 2, num_cpus: 0.5, chunk_size: 8}}')), check=True)
    assert rows(workspace) == expected, proc.stderr
    assert settle(lambda: worker_processes() == [])  # close() killed its actors


def run_and_kill(pipeline: Path, teacher: SlowTeacher, after: int, kill: int) -> subprocess.CompletedProcess:
    """`synth run` in the background; once the server has seen `after` requests, SIGKILL `kill` of the
    stage's worker processes (as an OOM killer or a lost node would)."""
    assert settle(lambda: worker_processes() == [])
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], cwd=pipeline.parent,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while teacher.requests < after or len(victims := worker_processes()) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.02)
    for p in victims[:kill]:
        p.send_signal(signal.SIGKILL)
    assert teacher.requests < TOTAL, "the run finished before a worker could be killed"
    out, err = proc.communicate(timeout=120)
    time.sleep(2 * teacher.delay)  # requests received before the kill are counted once their delay is over
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_worker_killed_mid_run_loses_and_duplicates_nothing(workspace, cluster, expected):
    with SlowTeacher(delay=0.6) as teacher:  # ~2.4 s of work: time to kill
        pipeline = write(workspace / "pipeline.yaml", pipeline_text(
            scripted(teacher.base_url), f'{{address: "{cluster}", workers: 2, num_cpus: 0.5, chunk_size: 3}}'))
        proc = run_and_kill(pipeline, teacher, after=6, kill=1)
        assert proc.returncode == 0, proc.stderr
        assert "Ray worker" in proc.stderr and "lost" in proc.stderr and "resubmitted" in proc.stderr
        # the lost chunks were answered again by the other worker: every request once, same texts
        assert rows(workspace) == expected
        assert teacher.requests >= TOTAL  # the lost chunks' requests were sent twice, recorded once
        assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM synth.errors")[0][0] == 0


def test_every_worker_killed_stops_cleanly_and_rerun_completes(workspace, cluster, expected):
    store = workspace / "out" / "run.duckdb"
    with SlowTeacher(delay=0.6) as teacher:  # ~2.4 s of work: time to kill
        pipeline = write(workspace / "pipeline.yaml", pipeline_text(
            scripted(teacher.base_url), f'{{address: "{cluster}", workers: 2, num_cpus: 0.5, chunk_size: 3}}'))
        proc = run_and_kill(pipeline, teacher, after=6, kill=2)
        assert proc.returncode == 2, proc.stderr
        assert "Ray workers were lost" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        done = rows(workspace)
        assert done.items() <= expected.items() and len(done) < TOTAL
        # each request has at most one row: a completion or a worker_lost error, never both
        errors = query(store, "SELECT request_id, cause FROM synth.errors")
        assert {cause for _, cause in errors} <= {"worker_lost"}
        assert len({rid for rid, _ in errors}) == len(errors) and not {rid for rid, _ in errors} & set(done)

        before = teacher.requests
        synth("run", pipeline, check=True)
        assert rows(workspace) == expected
        assert teacher.requests - before == TOTAL - len(done)  # the re-run sent exactly what was missing


def test_budget_stops_dispatch_and_keeps_what_was_in_flight(workspace, cluster):
    """max_cost with `ray:`: the driver accounts each completion (RayTeacher has no on_result), stop()
    dispatches no new chunk, the chunks in flight still land: every request sent is recorded, and the
    overshoot is at most workers x 2 chunks. Raising the budget finishes with nothing sent twice.
    The scripted server reports 10 + 5 tokens per request: $0.02 each at these prices."""
    with SlowTeacher(delay=0.1) as teacher:
        def pipeline(max_cost):
            text = pipeline_text(f'{{backend: openai, model: scripted, base_url: "{teacher.base_url}", '
                                 'max_concurrency: 4, prices: {input: 1000, output: 2000}}',
                                 f'{{address: "{cluster}", workers: 2, num_cpus: 0.5, chunk_size: 2}}')
            return write(workspace / "pipeline.yaml", text.replace("seed: 0}", f"seed: 0}}, max_cost: {max_cost}"))

        first = synth("run", pipeline(0.1))
        assert first.returncode == 1 and "stopped at the budget" in first.stderr, first.stderr
        saved = len(rows(workspace))
        assert 5 <= saved <= 5 + 2 * 2 * 2 and teacher.requests == saved
        synth("run", pipeline(100), check=True)
        assert len(rows(workspace)) == TOTAL and teacher.requests == TOTAL


def test_bad_ray_settings_are_one_line_errors(workspace, tmp_path):
    """Refused before any cluster starts: more workers than this machine's cores (no address), an address
    where no cluster listens, and Ray missing. Ray is installed here, so a `ray` package that fails to
    import stands in for its absence."""
    teacher = '{backend: openai, model: m, base_url: "http://127.0.0.1:9/v1"}'
    pipeline = write(workspace / "pipeline.yaml", pipeline_text(teacher, f"{{workers: {os.cpu_count() + 1}}}"))
    proc = synth("run", pipeline)
    assert proc.returncode == 2 and "workers x num_cpus" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # an address where no cluster listens: one line at once (ray.init alone would retry for minutes)
    pipeline = write(workspace / "pipeline.yaml", pipeline_text(teacher, f'{{address: "127.0.0.1:{free_port()}"}}'))
    proc = synth("run", pipeline)
    assert proc.returncode == 2 and "no Ray cluster answers there" in proc.stderr, proc.stderr
    stub = tmp_path / "no_ray" / "ray"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    proc = synth("run", pipeline, env=cli_env(PYTHONPATH=str(stub.parent)))
    assert proc.returncode == 2 and "pip install 'synth-distill[ray]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_error_raised_in_a_worker_is_one_line(workspace, cluster):
    """The workers of this module's cluster do not have the API key variable that `synth run` has (as on a
    real cluster whose nodes were started without it): the backend's own error, saying where it happened."""
    teacher = '{backend: openai, model: m, base_url: "http://127.0.0.1:9/v1", api_key_env: SYNTH_TEST_RAY_KEY}'
    assert "SYNTH_TEST_RAY_KEY" not in os.environ
    pipeline = write(workspace / "pipeline.yaml", pipeline_text(teacher, f'{{address: "{cluster}", num_cpus: 0.5}}'))
    proc = synth("run", pipeline, env=cli_env(SYNTH_TEST_RAY_KEY="sk-test"))
    assert proc.returncode == 2 and "SYNTH_TEST_RAY_KEY" in proc.stderr and "on Ray worker" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert settle(lambda: worker_processes() == [])


def test_a_returned_chunk_is_checked_against_its_requests():
    """The driver's guard on what a worker returns: one Completion per request of the chunk, whatever the
    backend did (a repeated or unknown id is dropped, a request left unanswered becomes a worker_error)."""
    from synth.teachers import Completion, Request
    from synth.teachers.ray import _exactly_once

    chunk = [Request(id=f"r{i}", messages=[], params={}, sample=0) for i in range(3)]
    got = [Completion("r1", text="a"), Completion("r1", text="again"), Completion("zz", text="?"),
           Completion("r0", error="timeout")]
    out = list(_exactly_once(chunk, got))
    assert [(c.request_id, c.text, c.error) for c in out] == [
        ("r1", "a", None), ("r0", None, "timeout"), ("r2", None, "worker_error")]
