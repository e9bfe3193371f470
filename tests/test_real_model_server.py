"""The real pretrained model (SmolLM2-135M-Instruct, tests/pretrained.py) behind vLLM's own OpenAI-compatible
server, through a pipeline file and the synth CLI: an `openai` teacher (`vllm_server: true`, the model's
tokenizer declared) pointed at `python -m vllm.entrypoints.openai.api_server` (one server for the module).

- it writes real text, and samples at temperature > 0 differ (synth's diversity figure is low; `transformers
  serve` as shipped decodes greedily, tests/test_real_model.py);
- a stage `schema:` (response_format json_schema) gives only schema-valid answers, where the same model asked
  for \\boxed{} rarely writes one (both figures printed);
- the model as a critic (a judge: its template's `schema: auto` asks the server for {"score": N}) scores every row;
- `params.logprobs: 4` stores each token's 4 best (synth.token_logprobs), and a score stage on the same server
  (prompt_logprobs on /completions) gives back the very same figures for those sequences.

The server is started as synth's offline vllm backend runs the engine: float32, eager, and structured output as
compact JSON (`--structured-outputs-config '{"disable_any_whitespace": true}'`). vLLM's default lets xgrammar put
whitespace anywhere, and this model pads with newlines: at 16 tokens 5 of 12 answers were cut off before the JSON
closed (schema_violation rows). And without chunked prefill (`--no-enable-chunked-prefill`): on CPU, vLLM 0.32
kills the engine ("CPU Generator does not use offset") when it splits the prompt of a seeded request over two
steps, which its server's default 2048-token step does once ~50 of these ~40-token prompts arrive together (synth
seeds every request; its offline vllm teacher turns chunking off on CPU).

    .venv/bin/python -m pytest -q -s -n 0 tests/test_real_model_server.py   (~1-1.5 min on 2 cores; -s: the figures)
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from conftest import SEEDS, VLLM_CPU_ENV, cli_env, fill_workspace, make_pipeline, query, start_vllm_server, synth

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
if importlib.util.find_spec("vllm") is None:  # not imported here: the server process imports it
    pytest.skip("vLLM is not installed (SYNTH_WITH_VLLM=0)", allow_module_level=True)

# as tests/test_vllm.py: the engine computes on OMP_NUM_THREADS (1, conftest.py) threads, unbound
CPU_ENV = VLLM_CPU_ENV
ROWS = SEEDS[:4]
SAMPLES = 3
K = 4
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


@pytest.fixture(scope="module")
def server(real_model, tmp_path_factory):
    """vLLM's OpenAI-compatible server for the real model on a free loopback port: its /v1 URL."""
    with start_vllm_server(real_model, "smol", tmp_path_factory.mktemp("vllm-server") / "server.log",
                           "--max-model-len", "512", "--no-enable-chunked-prefill", "--structured-outputs-config",
                           json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})) as url:
        yield url


@pytest.fixture(scope="module")
def run(server, real_model, tmp_path_factory):
    """One `synth run` of the module's pipeline (every stage): (the CLI's output, the store, the run's counts)."""
    root = tmp_path_factory.mktemp("served")
    fill_workspace(root)  # prompts/solve.yaml: step by step, ending in \\boxed{}
    teacher = {"backend": "openai", "model": "smol", "base_url": server, "vllm_server": True,
               "tokenizer": str(real_model), "max_concurrency": 12}
    pipeline = make_pipeline(root, teachers={"served": teacher}, files={"four.jsonl": ROWS}, stages={
        "problems": "kind: load, path: four.jsonl",
        "solutions": {"kind": "generate", "input": "problems", "teacher": "served", "prompt": "solve",
                      "samples": SAMPLES, "params": {"temperature": 0.8, "max_tokens": 24, "seed": 0, "logprobs": K}},
        "structured": {"kind": "generate", "input": "problems", "teacher": "served", "prompt": "solve",
                       "samples": SAMPLES, "schema": SCHEMA,
                       "params": {"temperature": 0.8, "max_tokens": 16, "seed": 0}},
        "critic": "kind: judge, input: solutions, teacher: served, mode: pointwise, "
                  "params: {temperature: 0.0, max_tokens: 16}",
        "scored": f"kind: score, input: solutions, teacher: served, logprobs: {K}",
    })
    proc = synth("run", pipeline, env=cli_env(**CPU_ENV), timeout=600, check=True)
    store = root / "out" / "run.duckdb"
    counts = json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])
    return proc.stdout + proc.stderr, store, counts


def test_real_text_and_samples_that_differ(run):
    out, store, counts = run
    rows = query(store, "SELECT input_id, text, model, finish_reason, prompt_tokens, completion_tokens FROM solutions")
    assert len(rows) == len(ROWS) * SAMPLES
    assert query(store, "SELECT count(*) FROM synth.errors WHERE stage = 'solutions'")[0][0] == 0
    for _, text, model, finish, prompt, tokens in rows:
        assert model == "smol" and finish in ("stop", "length") and prompt > 0 and 0 < tokens <= 24 and text.strip()
    worded = [t for _, t, *_ in rows if len(re.findall(r"[A-Za-z]{2,}", t)) >= 2]  # words, not a random model's noise
    assert len(worded) >= len(rows) - 2, [r[1] for r in rows]  # (one answered "2 + 3 = 5" outright)
    # vLLM's server samples with each request's seed: the diversity figure is low (transformers serve: 2 of 2)
    identical = counts["stages"]["solutions"]["identical"]
    print(f"\nvllm server, solutions: {identical['inputs']}/{identical['of']} inputs got {SAMPLES} identical samples "
          f"at t=0.8; texts: {[r[1] for r in rows[:3]]}")
    # `of`: the inputs that can tell (leaving out any all of one short text: vote.MIN_TELLING_CHARS)
    assert 1 <= identical["of"] <= len(ROWS) and identical["inputs"] <= 1
    assert re.search(rf"solutions: [01]/{identical['of']} inputs got 3 identical samples", out)
    assert not re.search(r"solutions: warning: \d+% of the inputs got the same text", out)  # no "did not sample"
    by_input: dict[str, set] = {}
    for input_id, text, *_ in rows:
        by_input.setdefault(input_id, set()).add(text)
    assert sum(len(texts) > 1 for texts in by_input.values()) >= len(ROWS) - 1


def test_a_schema_gives_valid_answers_where_boxed_rarely_parses(run):
    _, store, counts = run
    structured = query(store, "SELECT answer, text, finish_reason FROM structured")
    errors = query(store, "SELECT cause, message FROM synth.errors WHERE stage = 'structured'")
    boxed = counts["stages"]["solutions"]["parsed"]
    print(f"\nvllm server: schema {{answer: integer}} -> {len(structured)}/{len(ROWS) * SAMPLES} schema-valid "
          f"({len(errors)} schema_violation); asked for \\boxed{{}} without a schema -> parser boxed read "
          f"{boxed['readable']}/{boxed['answers']}")
    assert errors == [] and len(structured) == len(ROWS) * SAMPLES
    for answer, text, finish in structured:  # compact JSON (the server's disable_any_whitespace), closed
        assert finish == "stop" and re.fullmatch(r"-?\d+", answer) and json.loads(text) == {"answer": int(answer)}
    assert boxed["answers"] == len(ROWS) * SAMPLES and boxed["readable"] < boxed["answers"]


def test_the_real_model_as_critic_scores_every_row(run):
    _, store, _ = run
    verdicts = query(store, "SELECT row_id, passed, score, reason FROM synth.verdicts WHERE stage = 'critic'")
    ids = {r[0] for r in query(store, "SELECT CAST(id AS VARCHAR) FROM solutions")}
    assert {v[0] for v in verdicts} == ids and len(ids) == len(ROWS) * SAMPLES
    assert all(v[3] in (None, "low_score") and 1 <= v[2] <= 10 for v in verdicts), verdicts
    # schema: auto -> the server was asked for {"score": 1..10} and every judgment is that object
    judgments = [json.loads(t) for (t,) in query(store, "SELECT text FROM critic_critic")]
    assert judgments and all(set(j) == {"score"} and 1 <= j["score"] <= 10 for j in judgments)
    print(f"\nvllm server critic scores: {sorted(v[2] for v in verdicts)}")


def test_logprobs_captured_and_the_server_scores_the_same_sequences(run, real_model):
    """params.logprobs 4: per completion its token ids (return_tokens_as_token_ids), each token's log-prob and
    the 4 best, best first, under the declared tokenizer. The score stage sends the same sequences to
    /completions with prompt_logprobs 4: another code path in vLLM, the same model, the same numbers."""
    _, store, _ = run
    captured = query(store, "SELECT t.id, t.tokenizer, t.k, t.token_ids, t.logprobs, t.top_ids, t.top_logprobs, "
                            "c.completion_tokens FROM synth.token_logprobs t JOIN synth.completions c USING (id) "
                            "JOIN synth.generations g USING (id) WHERE g.stage = 'solutions'")
    assert len(captured) == len(ROWS) * SAMPLES
    for _, tokenizer, k, ids, lps, top_ids, top_lps, n in captured:
        assert tokenizer == str(real_model) and k == K and len(ids) == len(lps) == n > 0
        assert len(top_ids) == len(top_lps) == K * n and all(0 <= i < 49152 for i in ids + top_ids)
        for t in range(n):
            best, best_lps = top_ids[t * K:(t + 1) * K], top_lps[t * K:(t + 1) * K]
            assert best_lps == sorted(best_lps, reverse=True) and len(set(best)) == K
            # the sampled token is among the 4 best with its own log-prob, or below the 4th (vLLM lists the sample
            # first: before synth asked for k + 1 and sorted, a sample outside the 4 best took the 4th's place)
            assert lps[t] == pytest.approx(best_lps[best.index(ids[t])]) if ids[t] in best \
                else lps[t] <= best_lps[-1] + 1e-6
    scored = query(store, "SELECT s.id, g.token_ids, t.token_ids, g.logprobs, t.logprobs, g.top_ids, t.top_ids, "
                          "g.top_logprobs, t.top_logprobs, t.k, t.tokenizer FROM synth.scores s "
                          "JOIN synth.token_logprobs g ON g.id = s.id JOIN synth.token_logprobs t ON t.id = s.score_id "
                          "WHERE s.stage = 'scored'")
    assert len(scored) == len(ROWS) * SAMPLES
    swapped = 0
    for _, g_ids, t_ids, g_lp, t_lp, g_top, t_top, g_top_lp, t_top_lp, k, tokenizer in scored:
        assert t_ids == g_ids and k == K and tokenizer == str(real_model)
        assert t_lp == pytest.approx(g_lp, abs=2e-3) and t_top_lp == pytest.approx(g_top_lp, abs=2e-3)
        swapped += sum(a != b for a, b in zip(g_top, t_top))  # a near-tie may swap two neighbours
    assert swapped <= 2
    view = query(store, "SELECT count(*), count(*) FILTER (WHERE teacher_logprob < 0 AND scored_tokens = "
                        "completion_tokens) FROM scored")
    assert view == [(len(ROWS) * SAMPLES, len(ROWS) * SAMPLES)]
