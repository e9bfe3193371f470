"""Token logprobs (params.logprobs = k) land in synth.token_logprobs, one row per completion with flat
arrays (token ids, float32 log-probs, the k best alternatives per position) and the tokenizer named;
synth.logprobs is a per-token view of it. A backend that cannot give them, or k above an API's limit,
fails before sending anything. The hf backend runs a real tiny model and its numbers are checked
against a forward pass; the openai backend talks to the scripted server (tests/scripted_teacher.py),
whose logprobs are scripted (one token per word), on both client paths, and as vLLM's server does
with return_tokens_as_token_ids. A store written with the per-token table of migration 7 is migrated
without losing a row."""

from __future__ import annotations

import json
import math

import pytest

from conftest import bench_quick, synth_run, query, synth, write
from scripted_teacher import ScriptedTeacher


def _pipeline(workspace, teacher_yaml: str, k: int = 3, max_tokens: int = 16):
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is {i} + {i}?"} for i in range(6)]
    write(workspace / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return write(workspace / "pipeline.yaml", f"""\
        store: out/run.duckdb
        teachers:
          t: {teacher_yaml}
        stages:
          problems: {{kind: load, path: questions.jsonl}}
          solutions: {{kind: generate, input: problems, teacher: t, prompt: solve, samples: 2,
                      params: {{temperature: 1.0, max_tokens: {max_tokens}, seed: 0, logprobs: {k}}}}}
        """)


@pytest.mark.parametrize("client", ["http", "openai"])
def test_openai_logprobs_are_stored_per_token(workspace, client):
    store = workspace / "out" / "run.duckdb"
    with ScriptedTeacher(p=1.0) as teacher:
        synth("run", _pipeline(workspace, f'{{backend: openai, model: m, base_url: "{teacher.base_url}", '
                                          f'client: {client}}}'), check=True)
    words = {rid: len(text.split(" ")) for rid, text in query(store, "SELECT id, text FROM synth.completions")}
    assert len(words) == 12
    rows = query(store, "SELECT request_id, position, token, token_id, logprob, top, tokenizer FROM synth.logprobs "
                        "ORDER BY request_id, position")
    assert len(rows) == sum(words.values())
    for rid, position, token, token_id, logprob, top, tokenizer in rows:
        assert position < words[rid] and token_id is None and tokenizer is None  # strings: no vocabulary known
        assert logprob == pytest.approx(-0.1 * (position + 1))
        assert [a["token"] for a in top] == [token, "alt1", "alt2"]  # k = 3, best first


def test_a_server_without_logprobs_stops_the_stage_with_one_line(workspace):
    """The teacher's config says it has logprobs (the default) but the server ignores the request: the
    first answer says so, the run stops with one line, and no answer without its logprobs is stored."""
    store = workspace / "out" / "run.duckdb"
    with ScriptedTeacher(p=1.0, logprobs=False) as teacher:
        run = synth("run", _pipeline(workspace, f'{{backend: openai, model: m, base_url: "{teacher.base_url}"}}'))
    assert run.returncode == 2, run.stderr
    assert "answered without logprobs" in run.stderr and "Traceback" not in run.stderr
    assert query(store, "SELECT count(*) FROM synth.completions") == [(0,)]


def test_asking_a_backend_without_logprobs_fails_before_sending(workspace):
    with ScriptedTeacher(p=1.0) as teacher:
        run = synth("run", _pipeline(workspace, f'{{backend: openai, model: m, base_url: "{teacher.base_url}", '
                                                f'logprobs: false}}'))
    assert run.returncode == 2 and teacher.requests == 0
    assert "stage 'solutions'" in run.stderr and "cannot return logprobs" in run.stderr
    assert not (workspace / "out" / "run.duckdb").exists()  # nothing written


def test_more_alternatives_than_an_api_returns_fails_before_sending(workspace):
    with ScriptedTeacher(p=1.0) as teacher:
        run = synth("run", _pipeline(workspace, f'{{backend: openai, model: m, base_url: "{teacher.base_url}"}}',
                                     k=21))
    assert run.returncode == 2 and teacher.requests == 0, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "params.logprobs" in line and "at most 20" in line and "Traceback" not in run.stderr
    assert not (workspace / "out" / "run.duckdb").exists()


def test_a_vllm_server_gives_token_ids(workspace, tiny_model):
    """`vllm_server: true`: the request asks for return_tokens_as_token_ids, and `token_id:N` tokens are
    stored as ids under the teacher's declared tokenizer."""
    store = workspace / "out" / "run.duckdb"
    with ScriptedTeacher(p=1.0, token_ids=True) as teacher:
        synth("run", _pipeline(workspace, f'{{backend: openai, model: m, base_url: "{teacher.base_url}", '
                                          f'vllm_server: true, tokenizer: "{tiny_model}"}}', k=2), check=True)
    assert teacher.bodies and all(b.get("return_tokens_as_token_ids") is True for b in teacher.bodies)
    rows = query(store, "SELECT tokenizer, k, token_ids, tokens, top_ids, top_tokens, len(top_logprobs), "
                        "len(logprobs) FROM synth.token_logprobs")
    assert len(rows) == 12
    for tokenizer, k, ids, tokens, top_ids, top_tokens, n_top, n in rows:
        assert tokenizer == str(tiny_model) and k == 2 and tokens is None and top_tokens is None
        assert len(ids) == n and len(top_ids) == n_top == 2 * n and all(isinstance(i, int) for i in ids)


def test_compact_storage_and_the_per_token_view(workspace, tiny_model):
    """One row per completion: n token ids and log-probs, n*k alternatives (position-major), no strings for
    an id backend; synth.logprobs unfolds it into one row per token with its k alternatives."""
    store = workspace / "out" / "run.duckdb"
    synth_run(_pipeline(workspace, f"{{backend: hf, model: '{tiny_model}', batch_size: 4}}", k=4, max_tokens=8))
    rows = query(store, "SELECT id, k, token_ids, tokens, logprobs, top_ids, top_tokens, top_logprobs "
                        "FROM synth.token_logprobs")
    assert len(rows) == 12
    for rid, k, ids, tokens, lps, top_ids, top_tokens, top_lps in rows:
        assert k == 4 and tokens is None and top_tokens is None and len(ids) == len(lps) == len(top_ids) // 4
        per_token = query(store, f"SELECT position, token_id, logprob, top FROM synth.logprobs WHERE request_id = "
                                 f"'{rid}' ORDER BY position")
        assert [r[1] for r in per_token] == ids
        for position, _, logprob, top in per_token:
            assert logprob == pytest.approx(lps[position])
            assert [a["token_id"] for a in top] == top_ids[position * 4:(position + 1) * 4]
            assert [a["logprob"] for a in top] == pytest.approx(top_lps[position * 4:(position + 1) * 4])


def test_a_store_with_the_per_token_table_is_migrated(tmp_path):
    """Migration 12 folds migration 7's rows (one per token) into one row per completion: every token and
    alternative kept, ids or strings as they were, ragged alternatives padded (id -1, log-prob -inf)."""
    import duckdb

    from synth.store import MIGRATIONS, Store

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))  # a store as synth left it at migration 11
    con.execute("CREATE SCHEMA synth")
    con.execute("CREATE TABLE synth.migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMP)")
    for version, sql in enumerate(MIGRATIONS[:11], start=1):
        con.execute(sql)
        con.execute("INSERT INTO synth.migrations VALUES (?, now())", [version])
    con.execute("""INSERT INTO synth.logprobs VALUES
        ('a', 1, 'y', 5, -0.2, [{'token': 'y', 'token_id': 5, 'logprob': -0.2}], 'tok'),
        ('a', 0, 'x', 4, -0.1, [{'token': 'x', 'token_id': 4, 'logprob': -0.1},
                                {'token': 'w', 'token_id': 3, 'logprob': -2.0}], 'tok'),
        ('b', 0, ' hi', NULL, -0.3, [{'token': ' hi', 'token_id': NULL, 'logprob': -0.3}], NULL)""")
    con.close()
    with Store(path).write() as con:  # applies migration 12
        rows = con.execute("SELECT id, tokenizer, k, token_ids, tokens, top_ids, top_tokens, top_logprobs "
                           "FROM synth.token_logprobs ORDER BY id").fetchall()
        per_token = con.execute("SELECT count(*) FROM synth.logprobs").fetchall()
    assert rows[0][:7] == ("a", "tok", 2, [4, 5], None, [4, 3, 5, -1], None)
    assert rows[0][7][:3] == pytest.approx([-0.1, -2.0, -0.2]) and rows[0][7][3] == float("-inf")
    assert rows[1][:7] == ("b", None, 1, None, [" hi"], None, [" hi"])
    assert per_token == [(3,)]


def test_hf_logprobs_match_a_forward_pass(workspace, tiny_model):
    """The hf backend's stored logprobs are log_softmax of the model's logits at each generated position:
    recomputed here with one forward pass over prompt + completion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = workspace / "out" / "run.duckdb"
    synth("run", _pipeline(workspace, f"{{backend: hf, model: '{tiny_model}', batch_size: 4}}", k=5,
                           max_tokens=12), check=True)
    counts = dict(query(store, "SELECT id, completion_tokens FROM synth.completions"))
    per_request = dict(query(store, "SELECT id, len(token_ids) FROM synth.token_logprobs"))
    assert per_request == counts  # one row per generated token, the end-of-sequence token included
    rid = sorted(counts)[0]
    rows = query(store, f"SELECT token_id, logprob, top, tokenizer FROM synth.logprobs WHERE request_id = '{rid}' "
                        "ORDER BY position")
    assert all(r[3] == str(tiny_model) for r in rows)
    for token_id, logprob, top, _ in rows:
        assert len(top) == 5 and logprob <= 0
        assert [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
        assert logprob <= top[0]["logprob"] + 1e-6 and sum(math.exp(a["logprob"]) for a in top) <= 1 + 1e-6
        if token_id in [a["token_id"] for a in top]:
            assert next(a["logprob"] for a in top if a["token_id"] == token_id) == pytest.approx(logprob)

    messages = json.loads(query(store, "SELECT p.messages FROM synth.requests r JOIN synth.prompts p "
                                       f"ON p.id = r.prompt_id WHERE r.id = '{rid}'")[0][0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    generated = [r[0] for r in rows]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0].float().log_softmax(-1)
    expected = [logits[len(prompt) - 1 + t, token].item() for t, token in enumerate(generated)]
    assert [r[1] for r in rows] == pytest.approx(expected, abs=1e-3)


def test_hf_batch_logprobs_equal_each_rows_own_computation(tiny_model):
    """synth/teachers/hf.py takes a generated batch's log-probs one step at a time over all rows; each row's
    values must be exactly those of that row's positions alone (its logits stacked, log_softmax, its token
    gathered, top-k): bit for bit, on a real model's sampled batch whose rows end at different lengths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synth.teachers.hf import _step_logprobs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    messages = [[{"role": "user", "content": f"Q{i}: what is {i} + {i}?" * (1 + i % 3)}] for i in range(6)]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, padding=True, return_tensors="pt",
                                        return_dict=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    taken = out.sequences[:, enc["input_ids"].shape[1]:]
    k = 5
    steps = _step_logprobs(out.logits, taken, k)
    for i in range(len(messages)):
        for n in (1, len(out.logits) // 2, len(out.logits)):  # any row length: a row that ended early too
            tokens = taken[i, :n].tolist()
            rows = torch.stack([out.logits[t][i] for t in range(n)]).float().log_softmax(-1)
            top_values, top_ids = rows.topk(k, dim=-1)
            got = steps.row(i, tokens)
            assert got["token_ids"] == tokens
            assert got["logprobs"] == rows.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
            assert got["top_ids"] == top_ids.flatten().tolist()
            assert got["top_logprobs"] == top_values.flatten().tolist()


def test_hf_logprobs_bench_quick():
    """bench/hf_logprobs.py --quick: both extraction paths build the same log-probs, and its JSON line closes
    the output."""
    result = bench_quick("hf_logprobs.py")
    assert result["bench"] == "hf_logprobs" and result["value"] > 0 and result["baseline"] > 0


def test_the_stored_tokenizer_is_an_absolute_path(workspace, tiny_model):
    """A model given relative to the pipeline file is stored under its absolute path, the same whatever
    directory synth ran from (token ids are only meaningful with the tokenizer they came from)."""
    import shutil

    shutil.copytree(tiny_model, workspace / "models" / "tiny")
    synth_run(_pipeline(workspace, "{backend: hf, model: models/tiny, batch_size: 4}", k=2, max_tokens=4))
    tokenizers = {r[0] for r in query(workspace / "out" / "run.duckdb", "SELECT DISTINCT tokenizer FROM synth.logprobs")}
    assert tokenizers == {str((workspace / "models" / "tiny").resolve())}
