"""The `vllm` backend for real, on CPU through the `vllm-cpu` package, with the tiny local model:
offline `vllm.LLM` through the CLI, and the `openai` backend against vLLM's own OpenAI-compatible
server. Skipped where vLLM is not installed (SYNTH_WITH_VLLM=0 ./scripts/setup)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import SEEDS, cli_env, free_port, query, start_server, stop_server, synth, write

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_LOGGING_LEVEL": "WARNING"}

PIPELINE = """\
store: out/run.duckdb
teachers:
  tutor: {teacher}
stages:
  problems: {{kind: load, path: seeds.jsonl}}
  solutions:
    kind: generate
    input: problems
    teacher: tutor
    prompt: solve
    samples: 3
    params: {{temperature: 0.8, max_tokens: 12, seed: 0}}
  sft: {{kind: export, input: solutions, format: sft, path: out/sft.parquet}}
"""


def last_counts(store):
    return json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])


def test_offline_vllm_through_the_cli(workspace, tiny_model):
    """`backend: vllm`: every (row, sample) is generated once with its own seed, the rows carry the
    usual columns, a re-run sends nothing, and the chunks (chunk_size 8 < 36 requests) all land."""
    teacher = json.dumps({"backend": "vllm", "model": str(tiny_model), "chunk_size": 8, "max_model_len": 256})
    pipeline = write(workspace / "pipeline.yaml", PIPELINE.format(teacher=teacher))
    synth("run", pipeline, env=cli_env(**CPU_ENV), timeout=600, check=True)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT input_id, sample, teacher, model, text, finish_reason, prompt_tokens, "
                        "completion_tokens, question FROM solutions")
    assert len(rows) == len(SEEDS) * 3
    assert {(r[0], r[1]) for r in rows} == {(r[0], k) for r in rows for k in range(3)}
    assert all(r[2] == "tutor" and r[3] == str(tiny_model) for r in rows)
    assert all(r[5] in ("stop", "length") and r[6] > 0 and 0 < r[7] <= 12 for r in rows)
    # per-sample seeds: the three samples of a row are not copies of one another
    by_input: dict[str, set] = {}
    for r in rows:
        by_input.setdefault(r[0], set()).add(r[4])
    assert sum(len(texts) > 1 for texts in by_input.values()) >= len(SEEDS) // 2
    assert query(store, "SELECT count(*) FROM synth.errors")[0][0] == 0
    plan = synth("plan", pipeline, "--format", "json", check=True)
    assert all(not s["stale"] for s in json.loads(plan.stdout))
    synth("run", pipeline, env=cli_env(**CPU_ENV), timeout=600, check=True)
    assert last_counts(store)["sent"] == 0


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    proc = start_server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
                         "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
                         "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port)],
                        f"http://127.0.0.1:{port}/health", log, timeout=300, env=cli_env(**CPU_ENV))
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(proc)


def test_openai_backend_against_vllm_server(workspace, vllm_server):
    teacher = json.dumps({"backend": "openai", "model": "tiny", "base_url": vllm_server, "max_concurrency": 8})
    pipeline = write(workspace / "pipeline.yaml", PIPELINE.format(teacher=teacher))
    synth("run", pipeline, check=True)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT model, finish_reason, prompt_tokens, completion_tokens FROM solutions")
    assert len(rows) == len(SEEDS) * 3
    assert all(r[0] == "tiny" and r[1] in ("stop", "length") and r[2] > 0 and 0 < r[3] <= 12 for r in rows)
    assert query(store, "SELECT count(*) FROM read_parquet('" + str(workspace / "out" / "sft.parquet") + "')")[0][0] \
        == len(SEEDS) * 3
    synth("run", pipeline, check=True)
    assert last_counts(store)["sent"] == 0
