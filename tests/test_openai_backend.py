"""The `openai` teacher against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1
serving the tiny local model. Retries and error rows are exercised through a fault-injecting proxy in
front of that same server (tests/fault_proxy.py)."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter

import pytest

from conftest import SEEDS, cli_env, free_port, query, start_server, stop_server, synth, write
from fault_proxy import FaultProxy, Rules

pytestmark = pytest.mark.slow

PIPELINE = """\
store: out/run.duckdb
teachers:
  served:
    backend: openai
    model: {model}
    base_url: {base_url}
    max_concurrency: 4
    max_retries: {retries}
    timeout_s: 60
    client: {client}
stages:
  problems: {{kind: load, path: seeds.jsonl}}
  solutions:
    kind: generate
    input: problems
    teacher: served
    prompt: solve
    samples: 2
    params: {{temperature: 0.8, max_tokens: 8, seed: 0}}
  sft: {{kind: export, input: solutions, format: sft, path: out/sft.jsonl}}
"""


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """`transformers serve` pinned to the tiny model; the model name it answers to is the path."""
    exe = shutil.which("transformers", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None:
        pytest.skip("transformers[serving] is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start_server([exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                         str(tiny_model)], f"http://127.0.0.1:{port}/health", log, timeout=180)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(proc)


def pipeline_file(workspace, tiny_model, base_url, retries=2, client="auto", samples=2):
    text = PIPELINE.format(model=tiny_model, base_url=base_url, retries=retries, client=client)
    return write(workspace / "pipeline.yaml", text.replace("samples: 2", f"samples: {samples}"))


CLIENTS = pytest.mark.parametrize("client", ["http", "openai"])  # the fast path and the official client


def last_counts(store):
    return json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])


@CLIENTS
def test_generate_through_transformers_serve(workspace, tiny_model, served, client):
    pipeline = pipeline_file(workspace, tiny_model, served, client=client)
    synth("run", pipeline, check=True)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT id, sample, teacher, model, text, finish_reason, prompt_tokens, completion_tokens "
                        "FROM solutions")
    assert len(rows) == len(SEEDS) * 2
    assert all(r[2] == "served" and r[3] == str(tiny_model) for r in rows)
    assert all(r[5] in ("stop", "length") and r[6] > 0 and r[7] > 0 for r in rows)
    assert len((workspace / "out" / "sft.jsonl").read_text().splitlines()) == len(rows)
    synth("run", pipeline, check=True)
    assert last_counts(store)["sent"] == 0


@CLIENTS
def test_retries_honour_retry_after(workspace, tiny_model, served, client):
    """Every request's first attempt is answered 429 with Retry-After: 1; all complete, no error rows,
    and no retry came sooner than the server asked. One sample per seed: 12 requests, three times
    max_concurrency, and each waits out its own Retry-After (the 429s shrink the fast path's window)."""
    rules = Rules(first_attempt_status=429, retry_after_s=1)
    with FaultProxy(served.removesuffix("/v1"), rules) as proxy:
        pipeline = pipeline_file(workspace, tiny_model, proxy.base_url, retries=3, client=client, samples=1)
        synth("run", pipeline, check=True)
    store = workspace / "out" / "run.duckdb"
    assert query(store, "SELECT count(*) FROM solutions")[0][0] == len(SEEDS)
    assert query(store, "SELECT count(*) FROM synth.errors")[0][0] == 0
    first: dict[str, float] = {}
    for t, digest, status in rules.attempts:
        if status == 429:
            first[digest] = t
        else:
            assert t - first[digest] >= 0.95, "retried before Retry-After elapsed"
    assert len(first) == len(SEEDS)


@CLIENTS
def test_failed_requests_become_error_rows_and_rerun_retries_them(workspace, tiny_model, served, client):
    """Requests for one input always get 500: after the retry budget they are error rows with their
    cause, the run exits 1, `synth status` counts them; once the server heals, a re-run sends only them."""
    rules = Rules(fail_marker="Q5:")
    store = workspace / "out" / "run.duckdb"
    with FaultProxy(served.removesuffix("/v1"), rules) as proxy:
        pipeline = pipeline_file(workspace, tiny_model, proxy.base_url, retries=1, client=client)
        first = synth("run", pipeline)
        assert first.returncode == 1, first.stderr
        assert "re-run retries" in first.stderr
        errors = query(store, "SELECT DISTINCT request_id, cause FROM synth.errors")
        assert len(errors) == 2 and {e[1] for e in errors} == {"server_error"}
        assert query(store, "SELECT count(*) FROM solutions")[0][0] == len(SEEDS) * 2 - 2
        status = synth("status", pipeline, check=True).stdout
        header = [h.strip() for h in next(ln for ln in status.splitlines() if ln.startswith("┃")).split("┃")]
        solutions = next(ln for ln in status.splitlines() if ln.startswith("│ solutions")).split("│")
        assert solutions[header.index("failed")].strip() == "2"
        assert query(store, "SELECT status FROM synth.stages WHERE name = 'solutions'")[0][0] == "incomplete"

        rules.fail_marker = None  # the server heals
        synth("run", pipeline, check=True)
    assert last_counts(store)["sent"] == 2
    assert query(store, "SELECT count(*) FROM solutions")[0][0] == len(SEEDS) * 2
    assert query(store, "SELECT status FROM synth.stages WHERE name = 'solutions'")[0][0] == "done"
    # the error rows stay as history; the stage view has exactly one row per request
    assert query(store, "SELECT count(*) FROM synth.errors")[0][0] == 2


def test_missing_api_key_env_is_one_line(workspace, tiny_model):
    pipeline = write(workspace / "pipeline.yaml", PIPELINE.format(
        model="gpt-x", base_url="http://127.0.0.1:9/v1", retries=0, client="auto").replace(
        "max_concurrency: 4", "max_concurrency: 4\n    api_key_env: SYNTH_TEST_NO_SUCH_KEY"))
    proc = synth("run", pipeline, env=cli_env())
    assert proc.returncode == 2
    assert not (workspace / "out" / "run.duckdb").exists()  # checked before anything is written
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("synth: error: ") and "SYNTH_TEST_NO_SUCH_KEY" in lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("client", ["http"])  # the default for a server like this; the openai client's
# handling of each fault kind is covered by the tests above and by its own malformed_response path
def test_thirty_percent_faults_lose_nothing(workspace, tiny_model, served, client):
    """>=500 requests through a proxy that answers 30% of attempts with 429 (Retry-After), 500, a
    response slower than the timeout, truncated JSON or a dropped connection. The run completes; in
    it every request ends as exactly one completion or one error row with its cause; a re-run with
    the faults gone turns the errors into completions; nothing is duplicated."""
    rows = 130
    write(workspace / "seeds.jsonl", "".join(json.dumps({"question": f"Q{i}: what is {i} + {i + 1}?"}) + "\n"
                                             for i in range(rows)))
    text = PIPELINE.replace("samples: 2", "samples: 4").replace("max_tokens: 8", "max_tokens: 2") \
                   .replace("max_concurrency: 4", "max_concurrency: 16").replace("timeout_s: 60", "timeout_s: 3")
    rules = Rules(fault_rate=0.3, retry_after_s=0.5, slow_s=4, seed=1)
    store = workspace / "out" / "run.duckdb"
    total = rows * 4
    with FaultProxy(served.removesuffix("/v1"), rules) as proxy:
        pipeline = write(workspace / "pipeline.yaml", text.format(model=tiny_model, base_url=proxy.base_url,
                                                                  retries=2, client=client))
        first = synth("run", pipeline, timeout=900)
        assert first.returncode in (0, 1) and "Traceback" not in first.stderr, first.stderr[-3000:]
        first_run = query(store, "SELECT id FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0]
        done = {r[0] for r in query(store, f"SELECT id FROM synth.completions WHERE run_id = '{first_run}'")}
        errors = query(store, f"SELECT request_id, cause FROM synth.errors WHERE run_id = '{first_run}'")
        failed = [r[0] for r in errors]
        print(f"\n{client}: {total} requests, {len(rules.attempts)} attempts, faults {rules.faults}; "
              f"{len(done)} completions, {len(failed)} errors {dict(Counter(c for _, c in errors))}")
        assert len(failed) == len(set(failed)) and not (set(failed) & done)
        assert len(done) + len(failed) == total
        assert {c for _, c in errors} <= {"rate_limit", "server_error", "timeout", "connection", "malformed_response"}, errors
        assert sum(rules.faults.values()) >= 0.2 * len(rules.attempts)
        rules.fault_rate = 0.0  # the faults go away
        synth("run", pipeline, timeout=900, check=True)
    assert query(store, "SELECT count(*), count(DISTINCT id) FROM solutions")[0] == (total, total)
    last = json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])
    assert last["sent"] == len(failed)
