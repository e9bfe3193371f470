"""The score stage: a teacher scores sequences it did not write (on-policy distillation).

Real tiny models (built here, shared tokenizer): the teacher's scores of its own samples equal the
log-probs captured when it generated them (hf, within 1e-4); a second model scores the first's samples
by token id, or by its text when no ids were stored; the cache (identity: teacher, prompt, exact token
ids, k) makes a re-run score nothing; a teacher that cannot score, k above what a server returns, and a
generator whose vocabulary differs are one line each with exit 2 and nothing written; kill -9 during a
score stage loses nothing and duplicates nothing (tests/test_kill_loop.py kills every kind; here one
kill with the answers journaled)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli_env, echo_teacher, journaled, make_pipeline, query, synth, synth_run
from synth import load as synth_load


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """Another random model with the same tokenizer (synth.tiny trains it on the same corpus)."""
    from synth.tiny import build_model

    return build_model(tmp_path_factory.mktemp("models") / "other", seed=7)


def pipeline(workspace, tiny_model, other, *, k=4, sample_logprobs: int | None = 3, extra_teachers=None,
             score_teacher="teacher", samples=2, max_tokens=10):
    params = {"temperature": 1.0, "max_tokens": max_tokens, "seed": 0}
    if sample_logprobs is not None:
        params["logprobs"] = sample_logprobs
    return make_pipeline(workspace, teachers={
        "teacher": {"backend": "hf", "model": str(tiny_model), "batch_size": 8},
        "student": {"backend": "hf", "model": str(other), "batch_size": 8}, **(extra_teachers or {})}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "samples": {"kind": "generate", "input": "problems", "teacher": "student", "prompt": "solve",
                    "samples": samples, "params": params},
        "scored": {"kind": "score", "input": "samples", "teacher": score_teacher, "logprobs": k}})


def test_the_teacher_scores_its_own_samples_as_it_generated_them(workspace, tiny_model):
    """Teacher consistency: scoring the teacher's own samples gives back the log-probs (of each token and of
    the k best) captured when it generated them, within 1e-4."""
    p = pipeline(workspace, tiny_model, tiny_model, k=4, sample_logprobs=4)
    synth_run(p)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT g.token_ids, g.logprobs, g.top_ids, g.top_logprobs, t.token_ids, t.logprobs, "
                        "t.top_ids, t.top_logprobs, s.tokens_from FROM synth.scores s "
                        "JOIN synth.token_logprobs g ON g.id = s.id JOIN synth.token_logprobs t ON t.id = s.score_id "
                        "WHERE s.stage = 'scored'")
    assert len(rows) == 12 * 2
    for g_ids, g_lp, g_top, g_top_lp, t_ids, t_lp, t_top, t_top_lp, how in rows:
        assert how == "ids" and t_ids == g_ids
        assert t_lp == pytest.approx(g_lp, abs=1e-4)
        assert t_top_lp == pytest.approx(g_top_lp, abs=1e-4)
        assert sum(a != b for a, b in zip(t_top, g_top)) <= 2  # the same top-k (a near-tie may swap)


def test_another_teacher_scores_by_ids_or_by_text_and_the_cache_holds(workspace, tiny_model, second_model):
    p = pipeline(workspace, tiny_model, second_model, k=3, sample_logprobs=0)  # ids stored, no alternatives
    counts = synth_run(p)
    store = workspace / "out" / "run.duckdb"
    view = query(store, "SELECT id, score_id, scored_tokens, teacher_logprob, completion_tokens FROM scored")
    assert len(view) == 24 and all(n == c and lp < 0 for _, _, n, lp, c in view)
    k = query(store, "SELECT DISTINCT t.k, t.tokenizer FROM synth.scores s JOIN synth.token_logprobs t "
                     "ON t.id = s.score_id")
    assert k == [(3, str(tiny_model))]
    assert counts["stages_run"][-1] == "scored"
    assert synth_run(p)["stages_run"] == []  # nothing stale: nothing scored again

    # without stored ids the text is tokenised (plus the end of sequence when it stopped): same sequences
    (workspace / "out").rename(workspace / "first")
    synth_run(pipeline(workspace, tiny_model, second_model, k=3, sample_logprobs=None))
    sql = ("SELECT g.input_id || ':' || g.sample, t.token_ids FROM synth.scores s JOIN synth.token_logprobs t "
           "ON t.id = s.score_id JOIN samples g ON g.id = s.id")
    by_text, by_ids = dict(query(store, sql)), dict(query(workspace / "first" / "run.duckdb", sql))
    froms = {r[0] for r in query(store, "SELECT DISTINCT tokens_from FROM synth.scores")}
    assert froms == {"text"} and by_text.keys() == by_ids.keys() and len(by_ids) == 24
    # the text's own tokenisation, plus the end of sequence where it stopped; a random model's sampled ids are
    # mostly not the canonical tokenisation of their text (here most rows differ): that is why stored ids win
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = dict(query(store, "SELECT input_id || ':' || sample, text || '|' || finish_reason FROM samples"))
    for key, ids in by_text.items():
        text, _, finish = texts[key].rpartition("|")
        assert ids == tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if finish == "stop" else [])
    assert sum(by_text[i] != by_ids[i] for i in by_ids) > 0


def test_plan_counts_the_sequences_to_score(workspace, tiny_model, second_model):
    """`synth plan`: before the samples exist the score stage waits for them; once they do, it counts the rows
    and the distinct sequences still to score; after the run, all cached."""
    import json

    p = pipeline(workspace, tiny_model, second_model, k=3, sample_logprobs=0)

    def planned():
        return next(r for r in json.loads(synth("plan", p, "--format", "json", check=True).stdout)
                    if r["stage"] == "scored")

    assert "once 'samples' has run" in planned()["note"]
    synth_run(p, ["samples"])
    before = planned()
    assert before["requests"] == 24 and before["cached"] == 0 and 0 < before["to_send"] <= 24
    synth_run(p)
    after = planned()
    assert (after["requests"], after["cached"], after["to_send"]) == (24, before["to_send"], 0)


def test_a_backend_that_cannot_score_is_one_line_and_writes_nothing(workspace, tiny_model):
    p = pipeline(workspace, tiny_model, tiny_model, score_teacher="echo",
                 extra_teachers={"echo": echo_teacher()})
    run = synth("run", p)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "stage 'scored'" in line and "cannot score" in line
    assert not (workspace / "out").exists()


def test_a_server_that_cannot_score_and_k_above_the_limit(workspace, tiny_model):
    server = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    p = pipeline(workspace, tiny_model, tiny_model, score_teacher="server", extra_teachers={"server": server})
    run = synth("run", p)
    assert run.returncode == 2 and "cannot score" in run.stderr and "vllm_server: true" in run.stderr
    p = pipeline(workspace, tiny_model, tiny_model, score_teacher="server", k=32, extra_teachers={
        "server": {**server, "vllm_server": True, "tokenizer": str(tiny_model)}})
    run = synth("run", p)
    assert run.returncode == 2 and "key 'logprobs'" in run.stderr and "at most 20" in run.stderr
    assert not (workspace / "out").exists()


def test_a_generator_of_another_vocabulary_is_refused(workspace, tiny_model, tmp_path):
    from synth.tiny import build_model

    other = build_model(tmp_path / "othervocab", corpus=["a completely different corpus " * 20], vocab_size=300)
    p = pipeline(workspace, tiny_model, other, sample_logprobs=0)
    run = synth("run", p)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "tokenizers differ" in line and str(other) in line and str(tiny_model) in line
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM synth.token_logprobs t JOIN synth.scores s "
                                                   "ON s.score_id = t.id") == [(0,)]


def test_kill_during_scoring_then_rerun(workspace, tiny_model, second_model):
    """SIGKILL once scores are arriving: the re-run replays or skips what arrived, scores the rest once."""
    p = pipeline(workspace, tiny_model, second_model, samples=6, max_tokens=24)
    synth_run(p, ["samples"])
    store = workspace / "out" / "run.duckdb"
    env = cli_env(SYNTH_FLUSH_ROWS="1")
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(p)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    journal = store.parent / (store.name + ".journal")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journaled(journal, "scored.*", nonempty=True):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    counts = synth_run(p)
    assert counts["sent"] + counts["recovered"] + counts["cached"] == 72 and counts["sent"] < 72
    total = query(store, "SELECT count(*), count(DISTINCT score_id) FROM synth.scores WHERE stage = 'scored'")[0]
    assert total == (72, 72)
    stored = query(store, "SELECT count(*) FROM synth.token_logprobs t JOIN synth.scores s ON s.score_id = t.id")
    assert stored == [(72,)]
    from synth.inspection import status_rows

    row = next(r for r in status_rows(synth_load(p)) if r["stage"] == "scored")
    assert (row["state"], row["requests"], row["done"], row["failed"], row["pending"]) == ("done", 72, 72, 0, 0)
    assert "scored" in synth("status", p, check=True).stdout
