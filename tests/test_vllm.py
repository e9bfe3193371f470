"""The `vllm` backend for real, on CPU through the `vllm-cpu` package, with the tiny local model:
offline vLLM through the CLI, the VLLMTeacher itself on one engine shared by this module (streaming
submission, stop(), logprobs, per-sample seeds, prefix caching, rejected requests), and the `openai`
backend against vLLM's own OpenAI-compatible server. Skipped where vLLM is not installed
(SYNTH_WITH_VLLM=0 ./scripts/setup)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import SEEDS, VLLM_CPU_ENV, cli_env, query, start_vllm_server, synth, write

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# nobind: vLLM leaves OpenMP alone and the engine computes with OMP_NUM_THREADS (1, tests/conftest.py), like
# every other process here; bound to both cores ("0-1") its two spinning threads slowed down whenever the
# other test worker was busy (measured: the engine's generations 3-4x slower next to one busy process).
CPU_ENV = VLLM_CPU_ENV

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
    params: {{temperature: 0.8, max_tokens: 12, seed: 0{extra}}}
  sft: {{kind: export, input: solutions, format: sft, path: out/sft.parquet}}
"""


def last_counts(store):
    return json.loads(query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0][0])


def test_offline_vllm_through_the_cli(workspace, tiny_model):
    """`backend: vllm`: every (row, sample) is generated once with its own seed, the rows carry the
    usual columns, a re-run sends nothing, and all 36 requests land through 8 engine slots
    (chunk_size 8). params.logprobs 3: synth.logprobs has one row per generated token of each
    completion (positions 0..n-1), each with its 3 best alternatives and the tokenizer named."""
    teacher = json.dumps({"backend": "vllm", "model": str(tiny_model), "chunk_size": 8, "max_model_len": 256})
    pipeline = write(workspace / "pipeline.yaml", PIPELINE.format(teacher=teacher, extra=", logprobs: 3"))
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
    tokens = dict(query(store, "SELECT id, completion_tokens FROM synth.completions"))
    assert len(tokens) == len(SEEDS) * 3
    lp = query(store, "SELECT request_id, position, token, token_id, logprob, top, tokenizer FROM synth.logprobs "
                      "ORDER BY request_id, position")
    positions: dict[str, list[int]] = {}
    for request_id, position, token, token_id, logprob, top, tokenizer in lp:
        positions.setdefault(request_id, []).append(position)
        assert token is None and token_id is not None and logprob <= 0 and tokenizer == str(tiny_model)
        assert len(top) == 3 and [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
        assert all(a["token_id"] is not None and a["logprob"] <= 0 for a in top)
        assert logprob <= top[0]["logprob"] + 1e-6
    assert {rid: len(p) for rid, p in positions.items()} == tokens  # every completion, every token
    assert all(p == list(range(len(p))) for p in positions.values())
    plan = synth("plan", pipeline, "--format", "json", check=True)
    assert all(not s["stale"] for s in json.loads(plan.stdout))
    synth("run", pipeline, env=cli_env(**CPU_ENV), timeout=600, check=True)
    assert last_counts(store)["sent"] == 0


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    with start_vllm_server(tiny_model, "tiny", tmp_path_factory.mktemp("vllm") / "server.log",
                           "--max-model-len", "256") as url:
        yield url


def test_openai_backend_against_vllm_server(workspace, vllm_server):
    teacher = json.dumps({"backend": "openai", "model": "tiny", "base_url": vllm_server, "max_concurrency": 8})
    pipeline = write(workspace / "pipeline.yaml", PIPELINE.format(teacher=teacher, extra=""))
    synth("run", pipeline, check=True)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT model, finish_reason, prompt_tokens, completion_tokens FROM solutions")
    assert len(rows) == len(SEEDS) * 3
    assert all(r[0] == "tiny" and r[1] in ("stop", "length") and r[2] > 0 and 0 < r[3] <= 12 for r in rows)
    assert query(store, "SELECT count(*) FROM read_parquet('" + str(workspace / "out" / "sft.parquet") + "')")[0][0] \
        == len(SEEDS) * 3
    synth("run", pipeline, check=True)
    assert last_counts(store)["sent"] == 0


# ---- the VLLMTeacher itself, on one engine for the module (vLLM's start-up takes 25-40 s here) ----

@pytest.fixture(scope="module")
def teacher(tiny_model):
    from synth.teachers import VLLMTeacherConfig
    from synth.teachers.vllm import VLLMTeacher

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**CPU_ENV, "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(key, value)
        config = VLLMTeacherConfig(backend="vllm", model=str(tiny_model), chunk_size=4, max_model_len=512)
        t = VLLMTeacher("tutor", config, tiny_model.parent)
        try:
            yield t
        finally:
            t.close()


@pytest.fixture()
def engine_slots(teacher):
    """Sets the teacher's chunk_size (its engine slots) for one test, restored afterwards."""
    original = teacher.config

    def set_slots(n: int) -> None:
        teacher.config = original.model_copy(update={"chunk_size": n})

    yield set_slots
    teacher.config = original
    assert teacher.llm.llm_engine.get_num_unfinished_requests() == 0  # no test leaves work in the engine


def make_requests(n_prompts: int, samples: int = 1, system: str | None = None, **params) -> list:
    from synth.teachers import Request

    out = []
    for i in range(n_prompts):
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": f"Q{i}: what is {i} + {i + 1}?"}]
        p = {"temperature": 0.8, "max_tokens": 16, "seed": 0, **params}
        p = {k: (v(i) if callable(v) else v) for k, v in p.items()}
        out.extend(Request(f"r{i}-{k}", messages, p, k) for k in range(samples))
    return out


def test_streaming_refills_slots_without_a_chunk_barrier(teacher, engine_slots):
    """4 slots, 12 requests of different lengths (max_tokens 1 for every fourth, 24 for the others),
    read lazily: the first completion arrives after only the first 4 requests were taken, request 5
    goes in as soon as a slot frees, before the first 4 have all finished (no barrier at the end of a
    chunk), no more than 4 are ever in the engine, and each request is answered exactly once."""
    engine_slots(4)
    requests = make_requests(12, max_tokens=lambda i: 1 if i % 4 == 0 else 24)
    events: list[tuple[str, str]] = []

    def lazily():
        for r in requests:
            events.append(("take", r.id))
            yield r

    for c in teacher.generate(lazily()):
        assert c.ok, c
        events.append(("done", c.request_id))
        taken = sum(e == "take" for e, _ in events)
        done = sum(e == "done" for e, _ in events)
        assert taken - (done - 1) <= 4  # in the engine when this one finished
    order = [rid for _, rid in events]
    assert sorted(rid for e, rid in events if e == "done") == sorted(r.id for r in requests)
    first_done = next(i for i, (e, _) in enumerate(events) if e == "done")
    assert sum(e == "take" for e, _ in events[:first_done]) == 4  # streamed: not all 12 taken first
    last_of_first_chunk = max(order.index(r.id, first_done) for r in requests[:4])
    assert order.index(requests[4].id) < last_of_first_chunk  # refilled before the chunk's tail finished


def test_stop_lets_in_flight_requests_finish_and_sends_no_more(teacher, engine_slots):
    """stop() at the first completion: the 3 requests still in the engine finish and are yielded, no
    further request is taken from the input; a later generate() runs again; and a generator the
    caller closes early leaves nothing running in the engine."""
    engine_slots(4)
    requests = make_requests(12, max_tokens=8)
    taken: list[str] = []

    def lazily():
        for r in requests:
            taken.append(r.id)
            yield r

    submitted = teacher.stats["submitted"]
    got = []
    for c in teacher.generate(lazily()):
        got.append(c.request_id)
        teacher.stop()
    assert len(got) == 4 and sorted(got) == sorted(taken) == [r.id for r in requests[:4]]
    assert teacher.stats["submitted"] - submitted == 4

    rest = list(teacher.generate(requests[4:]))  # stop() held for that generate() call only
    assert sorted(c.request_id for c in rest) == sorted(r.id for r in requests[4:])

    stream = teacher.generate(requests)
    next(stream)
    stream.close()  # the caller broke off: the in-flight requests are aborted, not left running
    assert teacher.llm.llm_engine.get_num_unfinished_requests() == 0


def test_same_texts_whatever_the_chunk_size(teacher, engine_slots):
    """Per-sample seeds: each request's text is the same with 1, 5 or 16 engine slots (other
    requests in the batch, other order), and the same as LLM.chat gives for the same prompts and
    parameters (the pre-streaming path) with the same prompt token ids; and the samples of a prompt
    are not copies of one another."""
    requests = make_requests(4, samples=3, max_tokens=12)
    texts = {}
    for slots in (1, 5, 16):
        engine_slots(slots)
        texts[slots] = {c.request_id: (c.text, c.prompt_tokens) for c in teacher.generate(requests)}
    assert texts[1] == texts[5] == texts[16]
    outputs = teacher.llm.chat([r.messages for r in requests], [teacher._params(r) for r in requests],
                               use_tqdm=False)
    assert {r.id: (o.outputs[0].text, len(o.prompt_token_ids)) for r, o in zip(requests, outputs)} == texts[1]
    assert all(teacher._prompt_ids(r.messages) == o.prompt_token_ids for r, o in zip(requests, outputs))
    for i in range(4):
        assert len({texts[1][f"r{i}-{k}"][0] for k in range(3)}) > 1


def test_prefix_caching_shares_a_prompt_between_its_samples(teacher, engine_slots):
    """3 samples of one long prompt, in flight together: the 2nd and 3rd are served the prompt's
    whole KV-cache blocks from the prefix cache (vLLM's num_cached_tokens), which is what one n=3
    request would have shared, while each keeps its own seed."""
    engine_slots(4)
    teacher.llm.reset_prefix_cache()
    requests = make_requests(1, samples=3, system="Solve the problem step by step and explain. " * 25,
                             max_tokens=4)
    prompt = len(teacher._prompt_ids(requests[0].messages))
    block = teacher.llm.llm_engine.vllm_config.cache_config.block_size
    assert 2 * block < prompt < teacher.max_model_len - 4
    before = teacher.stats["cached_prompt_tokens"]
    completions = list(teacher.generate(requests))
    assert all(c.ok for c in completions), completions
    assert teacher.stats["cached_prompt_tokens"] - before == 2 * ((prompt - 1) // block) * block


def test_logprobs_k_best_per_token(teacher, engine_slots, tiny_model):
    """params.logprobs k: one entry per generated token, the sampled token with its logprob and exactly
    the k best alternatives, best first; the token ids decode to the text; the sampled token's logprob
    equals its entry in `top` when it is there and is below the k-th otherwise; the values are the
    model's own log-softmax (checked against a transformers forward pass in float32); k = 0 gives an
    empty `top`, and no logprobs asked gives None."""
    import torch
    from transformers import AutoModelForCausalLM

    engine_slots(8)
    from synth.teachers import Request

    requests = make_requests(4, max_tokens=10, logprobs=lambda i: 0 if i == 3 else 3)
    requests.append(Request("plain", requests[0].messages, {"temperature": 0.8, "max_tokens": 4, "seed": 0}, 0))
    by_id = {r.id: r for r in requests}
    completions = {c.request_id: c for c in teacher.generate(requests)}
    assert completions["plain"].logprobs is None
    for c in completions.values():  # the compact form as one entry per token (ids only: no strings)
        if c.logprobs is not None:
            lp = c.logprobs
            k = lp["k"]
            c.logprobs = [{"token_id": i, "logprob": v, "top": [
                {"token_id": a, "logprob": w} for a, w in zip(lp["top_ids"][t * k:(t + 1) * k],
                                                               lp["top_logprobs"][t * k:(t + 1) * k])]}
                for t, (i, v) in enumerate(zip(lp["token_ids"], lp["logprobs"]))]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = teacher.tokenizer
    for rid, c in completions.items():
        if rid == "plain":
            continue
        k = by_id[rid].params["logprobs"]
        assert c.ok and len(c.logprobs) == c.completion_tokens > 0
        ids = [t["token_id"] for t in c.logprobs]
        decoded = tok.decode(ids, skip_special_tokens=True)
        # vLLM's detokenizer leaves out a trailing, unfinished multi-byte character ("\ufffd" here)
        assert decoded == c.text or (decoded.startswith(c.text) and set(decoded[len(c.text):]) == {"\ufffd"})
        for t in c.logprobs:
            top = t["top"]
            assert len(top) == k and t["logprob"] <= 0 and all(a["logprob"] <= 0 for a in top)
            assert [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
            assert sum(math.exp(a["logprob"]) for a in top) <= 1 + 1e-5
            match = [a for a in top if a["token_id"] == t["token_id"]]
            if match:
                assert match[0]["logprob"] == t["logprob"]
            elif top:
                assert t["logprob"] <= top[-1]["logprob"]
        prompt = teacher._prompt_ids(by_id[rid].messages)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for position, t in enumerate(c.logprobs):
            row = expected[position]
            for a in [t, *t["top"]]:
                assert a["logprob"] == pytest.approx(row[a["token_id"]].item(), abs=2e-3)
            if k:  # the best alternative is the model's most likely token (up to float noise)
                assert t["top"][0]["logprob"] == pytest.approx(row.max().item(), abs=2e-3)


def test_a_rejected_request_does_not_fail_its_neighbours(teacher, engine_slots):
    """A prompt longer than the context is a `context_length` error before the engine sees it; a
    request the engine rejects in add_request (logprobs above vLLM's maximum of 20) is a
    `bad_request` error; the requests around them are answered."""
    from synth.teachers import Request

    engine_slots(4)
    requests = make_requests(6, max_tokens=6)
    requests.insert(2, Request("long", [{"role": "user", "content": "seven " * 600}], {"max_tokens": 6}, 0))
    requests.insert(4, Request("bad", requests[0].messages, {"max_tokens": 6, "logprobs": 30}, 0))
    got = {c.request_id: c for c in teacher.generate(requests)}
    assert set(got) == {r.id for r in requests}
    assert got["long"].error == "context_length" and got["long"].prompt_tokens >= 512
    assert got["bad"].error == "bad_request" and "logprobs" in got["bad"].error_message
    assert all(c.ok and c.text is not None for rid, c in got.items() if rid not in ("long", "bad"))


def test_structured_output_is_enforced_by_the_engine(teacher, engine_slots):
    """params.json_schema (a stage's `schema`): vLLM's structured outputs constrain the random-weight
    model's noise to the schema, on every sample."""
    engine_slots(4)
    schema = {"type": "object", "properties": {"verdict": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["verdict"], "additionalProperties": False}
    done = list(teacher.generate(make_requests(3, samples=2, max_tokens=32, json_schema=schema)))
    assert len(done) == 6 and all(c.ok for c in done), [c.error_message for c in done]
    assert all(json.loads(c.text)["verdict"] in ("yes", "no") for c in done), [c.text for c in done]


# ---- scoring sequences (the score stage): prompt log-probs ----------------------------------------------

def test_the_engine_scores_its_own_samples_as_it_generated_them(teacher, engine_slots):
    """VLLMTeacher.score (prompt_logprobs) of the engine's own samples gives back the log-probs captured when
    it generated them; k alternatives per position; a sequence past the context is a context_length row."""
    from synth.teachers import ScoreRequest

    engine_slots(4)
    requests = make_requests(3, max_tokens=10, logprobs=3)
    generated = {c.request_id: c for c in teacher.generate(requests)}
    by_id = {r.id: r for r in requests}
    asks = [ScoreRequest(rid, by_id[rid].messages, c.logprobs["token_ids"], 3) for rid, c in generated.items()]
    asks.append(ScoreRequest("long", requests[0].messages, [5] * 600, 3))
    scored = {c.request_id: c for c in teacher.score(asks)}
    assert scored["long"].error == "context_length"
    for rid, c in generated.items():
        s = scored[rid]
        assert s.ok and s.logprobs["token_ids"] == c.logprobs["token_ids"] and s.logprobs["k"] == 3
        assert s.logprobs["logprobs"] == pytest.approx(c.logprobs["logprobs"], abs=2e-3)
        assert s.logprobs["top_logprobs"] == pytest.approx(c.logprobs["top_logprobs"], abs=2e-3)


def test_scoring_through_vllm_server(workspace, vllm_server, tiny_model):
    """A score stage on vLLM's own server (`vllm_server: true`, the model's tokenizer declared): prompt_logprobs
    on /completions; the scores agree with the offline hf teacher's forward pass on the same tokens."""
    server = json.dumps({"backend": "openai", "model": "tiny", "base_url": vllm_server, "vllm_server": True,
                         "tokenizer": str(tiny_model), "max_concurrency": 4})
    local = json.dumps({"backend": "hf", "model": str(tiny_model)})
    pipeline = write(workspace / "pipeline.yaml", f"""\
        store: out/run.duckdb
        teachers:
          served: {server}
          local: {local}
        stages:
          problems: {{kind: load, path: seeds.jsonl}}
          samples: {{kind: generate, input: problems, teacher: local, prompt: solve, samples: 1,
                     params: {{temperature: 1.0, max_tokens: 8, seed: 0, logprobs: 2}}}}
          by_server: {{kind: score, input: samples, teacher: served, logprobs: 2}}
        """)
    synth("run", pipeline, check=True)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT g.logprobs, t.logprobs, t.token_ids, g.token_ids, t.k FROM synth.scores s "
                        "JOIN synth.token_logprobs g ON g.id = s.id JOIN synth.token_logprobs t ON t.id = s.score_id")
    assert len(rows) == len(SEEDS)
    for captured, served, ids, generated, k in rows:
        assert ids == generated and k == 2 and served == pytest.approx(captured, abs=2e-3)


def test_more_prompt_tokens_in_flight_than_one_engine_step_takes(teacher, engine_slots):
    """On CPU, vLLM 0.32 kills the engine ("CPU Generator does not use offset") when it splits the prompt of a
    seeded request over two steps, and every request synth sends has its seed: more prompt tokens in flight than
    one step's max_num_batched_tokens (4096 on CPU) ended the stage. The teacher turns chunked prefill off on
    CPU: every request is answered."""
    from synth.teachers import Request

    engine_slots(64)
    budget = teacher.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    requests = [Request(f"long{i}", [{"role": "user", "content": f"Q{i}: " + " ".join(
        f"what is {i * 97 + j} + {j}?" for j in range(20))}], {"temperature": 0.8, "max_tokens": 2, "seed": 0}, 0)
        for i in range(64)]
    assert sum(len(teacher._prompt_ids(r.messages)) for r in requests) > budget
    completions = list(teacher.generate(requests))
    assert sorted(c.request_id for c in completions) == sorted(r.id for r in requests)
    assert all(c.ok for c in completions), [c.error_message for c in completions if not c.ok][:2]
