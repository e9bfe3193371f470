"""kill -9 at random moments across every stage kind, then the invariants, in SQL.

One pipeline holds a stage of every kind (load, generate, verify, vote, judge with its critic calls,
dedup, decontaminate, filter, keep, pairs, score, export sft, dpo and kd, evaluate, train sft and kd). It runs once
uninterrupted in a reference workspace, which also measures how long a run takes. In a second
workspace `synth run` is killed with SIGKILL at seeded random moments within that duration, again and
again, checking after each kill that the store is consistent; then it runs to the end. The result must
equal the reference: nothing lost (the same completions, verdicts, pairs, evaluations and exports),
nothing duplicated, nothing left half-written, and nothing re-sent but the requests in flight at each
kill. The teacher is the scripted OpenAI-compatible server on loopback (real HTTP, known answers); the
student is the tiny real model, trained with real TRL steps."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, cli_env, query, synth, write
from test_reliability import SlowTeacher

pytestmark = pytest.mark.slow

CONCURRENCY = 4
ROWS, SAMPLES, HELDOUT = 24, 4, 8


def make_workspace(root: Path, base_url: str, tiny_model: Path) -> Path:
    root.mkdir()
    write(root / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?",
                                                        "answer_gold": str(i)}) + "\n" for i in range(ROWS)))
    write(root / "heldout.jsonl", "".join(json.dumps({"id": f"h{i}", "question": f"Q{100 + i}: and this?",
                                                      "answer_gold": str(100 + i)}) + "\n" for i in range(HELDOUT)))
    (root / "prompts").mkdir()
    write(root / "prompts" / "solve.yaml", 'system: "Solve it and end with \\\\boxed{ANSWER}."\n'
                                           'user: "{{ question }}"\nparse: boxed\n')
    recipe = (REPO / "train" / "sft-tiny.yaml").read_text().replace("max_steps: 30", "max_steps: 12")
    write(root / "sft.yaml", recipe.replace("assistant_only_loss: true", "assistant_only_loss: false"))
    write(root / "kd.yaml", "max_steps: 12\nlearning_rate: 1.0e-3\nper_device_train_batch_size: 8\nmax_length: 128\n"
                            "logging_steps: 1\nseed: 0\nkd: {alpha: 0.5, chunk_size: 64}\n")
    return write(root / "pipeline.yaml", f"""\
store: out/run.duckdb
teachers:
  t: {{backend: openai, model: m, base_url: "{base_url}", max_concurrency: {CONCURRENCY}}}
  base: {{backend: hf, model: {tiny_model}}}
stages:
  problems: {{kind: load, path: questions.jsonl}}
  heldout: {{kind: load, path: heldout.jsonl}}
  solutions: {{kind: generate, input: problems, teacher: t, prompt: solve, samples: {SAMPLES},
              params: {{temperature: 1.0, max_tokens: 16, seed: 0}}}}
  graded: {{kind: verify, input: solutions, method: numeric, answer: answer, reference: answer_gold}}
  voted: {{kind: vote, input: solutions, answer: answer}}
  judged: {{kind: judge, input: solutions, teacher: t, min_score: 7}}
  deduped: {{kind: dedup, input: solutions, column: text}}
  clean: {{kind: decontaminate, input: solutions, against: [heldout.jsonl], ngram: 4}}
  sane: {{kind: filter, input: solutions, where: "finish_reason = 'stop'"}}
  kept: {{kind: keep, input: solutions, pass: [graded, voted, judged, deduped, clean, sane]}}
  sft_data: {{kind: export, input: kept, format: sft, path: out/sft.jsonl}}
  prefs: {{kind: pairs, input: solutions, by: graded, max_per_input: 2}}
  dpo_data: {{kind: export, input: prefs, format: dpo, path: out/dpo.jsonl}}
  student: {{kind: train, method: sft, data: sft_data, student: base, recipe: sft.yaml}}
  scored: {{kind: score, input: kept, teacher: base, logprobs: 4}}
  kd_data: {{kind: export, input: scored, format: kd, path: out/kd.parquet}}
  student_kd: {{kind: train, method: kd, data: kd_data, student: base, recipe: kd.yaml}}
  report: {{kind: evaluate, input: heldout, models: [t], prompt: solve,
           verify: {{answer: answer, reference: answer_gold, method: numeric}}}}
""")


def invariants(store: Path) -> None:
    """What must hold after any kill: one completion per request id, one membership per (stage, id),
    every membership's request recorded, no verdict/pair/evaluation twice within one run."""
    if not store.exists():
        return
    checks = {
        "completions unique": "SELECT count(*) - count(DISTINCT id) FROM synth.completions",
        "generations unique": "SELECT count(*) - count(DISTINCT (stage, id)) FROM synth.generations",
        "requests of generations": "SELECT count(*) FROM synth.generations g ANTI JOIN synth.requests r USING (id)",
        "completions have requests": "SELECT count(*) FROM synth.completions c ANTI JOIN synth.requests r USING (id)",
        "verdicts once per run": "SELECT count(*) - count(DISTINCT (stage, run_id, row_id)) FROM synth.verdict_history",
        "pairs once per run": "SELECT count(*) - count(DISTINCT (stage, run_id, chosen_id, rejected_id)) "
                              "FROM synth.pair_history",
        "current verdicts unique": "SELECT count(*) - count(DISTINCT (stage, row_id)) FROM synth.verdicts",
        "scores unique": "SELECT count(*) - count(DISTINCT (stage, id)) FROM synth.scores",
        "token log-probs unique": "SELECT count(*) - count(DISTINCT id) FROM synth.token_logprobs",
    }
    for name, sql in checks.items():
        try:
            got = query(store, sql)[0][0]
        except Exception as exc:  # noqa: BLE001 - a store killed before its first migration has no tables yet
            if "does not exist" in str(exc):
                continue
            raise
        assert got == 0, f"{name}: {got}"


def exports_whole(root: Path) -> None:
    """An export is either absent or whole: every line of it parses (written to a temporary file, renamed)."""
    for name in ("sft.jsonl", "dpo.jsonl"):
        path = root / "out" / name
        if path.exists():
            for line in path.read_text().splitlines():
                json.loads(line)


def outcome(root: Path) -> dict:
    store = root / "out" / "run.duckdb"
    return {
        "completions": sorted(query(store, "SELECT id, text FROM synth.completions")),
        "verdicts": sorted(query(store, "SELECT stage, row_id, passed, reason FROM synth.verdicts")),
        "pairs": sorted(query(store, "SELECT chosen_id, rejected_id FROM synth.pairs")),
        "evaluations": sorted(query(store, "SELECT model, id, passed FROM synth.evaluations")),
        "kept": sorted(query(store, "SELECT id FROM kept")),
        "sft": sorted((root / "out" / "sft.jsonl").read_text().splitlines()),
        "dpo": sorted((root / "out" / "dpo.jsonl").read_text().splitlines()),
        # the scored tokens (their log-probs: batches may differ after a kill, so only to float noise; below)
        "scores": sorted(query(store, "SELECT s.id, t.token_ids FROM synth.scores s JOIN synth.token_logprobs t "
                                      "ON t.id = s.score_id")),
        "kd": sorted((r["id"], tuple(r["completion_ids"])) for r in
                     pq.read_table(root / "out" / "kd.parquet").to_pylist()),
        "stages": sorted(query(store, "SELECT name, status FROM synth.stages")),
    }


@pytest.mark.parametrize("seed", [13, 29])
def test_random_kills_lose_duplicate_and_resend_nothing(tmp_path, tiny_model, seed):
    rng = random.Random(seed)
    with SlowTeacher(delay=0.03, p=0.6) as teacher:
        reference = make_workspace(tmp_path / "reference", teacher.base_url, tiny_model)
        started = time.monotonic()
        synth("run", reference, check=True)
        duration = time.monotonic() - started
        reference_requests = teacher.requests
        expected = outcome(reference.parent)

        teacher.requests = 0
        pipeline = make_workspace(tmp_path / "killed", teacher.base_url, tiny_model)
        store = pipeline.parent / "out" / "run.duckdb"
        kills = 0
        for attempt in range(12):
            proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(pipeline)], env=cli_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            # the first three lives are shorter than the training stage alone, so they always end in a kill
            # (whatever the machine's load); then random lives up to a whole run's length
            delay = rng.uniform(1.0, 3.0) if attempt < 3 else rng.uniform(0.5, duration)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                err = proc.stderr.read()
                assert proc.returncode == 0, err
                break
            finally:
                proc.stderr.close()
            invariants(store)
            exports_whole(pipeline.parent)
        final = synth("run", pipeline, check=True)
        assert "0 stages run" in final.stderr or "up to date" in final.stderr, final.stderr
        invariants(store)

        got = outcome(pipeline.parent)
        for key in expected:
            assert got[key] == expected[key], key  # nothing lost, nothing duplicated
        scores = "SELECT s.id, t.logprobs FROM synth.scores s JOIN synth.token_logprobs t ON t.id = s.score_id"
        reference_scores = dict(query(reference.parent / "out" / "run.duckdb", scores))
        for rid, logprobs in query(store, scores):
            assert logprobs == pytest.approx(reference_scores[rid], abs=1e-4)
        resent = teacher.requests - reference_requests
        # only requests in flight at a kill are sent again: at most the teacher's concurrency per kill
        assert 0 <= resent <= kills * CONCURRENCY, (resent, kills)
        assert kills >= 3, "the kills all missed the run; the run is too short for this test"
        leftovers = [p.name for p in pipeline.parent.rglob("*") if ".tmp-" in p.name or p.name.endswith(".journal")]
        assert not leftovers, leftovers
        print(f"kill loop: {kills} kills over a {duration:.1f}s run, {resent} requests re-sent, "
              f"{len(got['completions'])} completions, nothing lost or duplicated")
