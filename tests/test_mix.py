"""Teacher mixtures: two teachers (the echo teacher's scripted answers, right with probability 0.5 and 0.9,
each with prices) sample one prompt set, each verified and kept; a mix stage combines them by a rule. The
composition of the mix and of its SFT export, and the per-teacher funnel and price in `synth stats`, are
checked against counts made here by hand."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from conftest import echo_teacher, fill_workspace, make_pipeline, query, scripted_answers, synth, synth_run
from synth import load as synth_load
from synth.errors import SynthError

QUESTIONS, SAMPLES = 20, 3
PRICES = {"cheap": {"input": 0.1, "output": 0.4}, "dear": {"input": 2.5, "output": 10.0}}


def mixture(workspace, mix: str, **extra: str):
    rows = [{"id": f"q{i}", "question": f"Q{i}: what is it?", "gold": str(i)} for i in range(QUESTIONS)]
    stages = {"problems": "kind: load, path: questions.jsonl"}
    for t in ("cheap", "dear"):
        stages[f"{t}_samples"] = (f"kind: generate, input: problems, teacher: {t}, prompt: solve, samples: {SAMPLES}, "
                                  "params: {temperature: 1.0, max_tokens: 16, seed: 0}")
        stages[f"{t}_graded"] = f"kind: verify, input: {t}_samples, method: math, answer: answer, reference: gold"
        stages[f"{t}_kept"] = f"kind: keep, input: {t}_samples, pass: [{t}_graded]"
    stages["mixed"] = f"kind: mix, inputs: [cheap_kept, dear_kept], {mix}"
    stages["data"] = "kind: export, input: mixed, format: sft, path: out/mixed.parquet"
    stages.update(extra)
    teachers = {t: {**echo_teacher(scripted_answers(p=p), model=t), "prices": PRICES[t]}
                for t, p in (("cheap", 0.5), ("dear", 0.9))}
    return make_pipeline(workspace, files={"questions.jsonl": rows}, teachers=teachers, stages=stages)


def md5_order(store, stage: str, seed: int = 0) -> list[str]:
    """The ids of a stage's rows in the mix's order: md5 of seed|input_id|sample|text, ties by md5 of id:seed."""
    rows = query(store, f"SELECT id, input_id, sample, text FROM {stage}")
    return [r[0] for r in sorted(rows, key=lambda r: (hashlib.md5(f"{seed}|{r[1]}|{r[2]}|{r[3]}".encode()).hexdigest(),
                                                      hashlib.md5(f"{r[0]}:{seed}".encode()).hexdigest()))]


def kept_ids(store, teacher: str) -> list[str]:
    return [r[0] for r in query(store, f"SELECT id FROM {teacher}_kept")]


def taken(store) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"cheap_kept": set(), "dear_kept": set()}
    for rid, source in query(store, "SELECT id, source FROM mixed"):
        out[source].add(rid)
    return out


def exported(workspace) -> int:
    return pq.read_table(workspace / "out" / "mixed.parquet").num_rows


@pytest.mark.parametrize("rule", ["union", "quota", "weights"])
def test_mix_rules_take_what_they_say(workspace, rule):
    mix = {"union": "rule: union", "quota": "rule: quota, quota: {cheap_kept: 5, dear_kept: 40}, seed: 3",
           "weights": "rule: weights, weights: {cheap_kept: 1, dear_kept: 3}"}[rule]
    synth_run(mixture(workspace, mix))
    store = workspace / "out" / "run.duckdb"
    cheap, dear = kept_ids(store, "cheap"), kept_ids(store, "dear")
    assert 0 < len(cheap) < len(dear) < QUESTIONS * SAMPLES  # p 0.5 vs 0.9: the dear teacher keeps more
    got = taken(store)
    if rule == "union":
        want = {"cheap_kept": set(cheap), "dear_kept": set(dear)}
    elif rule == "quota":  # at most 5 of cheap's, 40 of dear's, the first in the seeded md5 order of their texts
        want = {"cheap_kept": set(md5_order(store, "cheap_kept", 3)[:5]),
                "dear_kept": set(md5_order(store, "dear_kept", 3)[:40])}
    else:  # shares 1:3; the largest total that fits: min(cheap / 0.25, dear / 0.75)
        total = int(min(len(cheap) / 0.25, len(dear) / 0.75))
        n_cheap, n_dear = round(0.25 * total), round(0.75 * total)
        want = {"cheap_kept": set(md5_order(store, "cheap_kept")[:n_cheap]),
                "dear_kept": set(md5_order(store, "dear_kept")[:n_dear])}
        assert abs(len(got["dear_kept"]) - 3 * len(got["cheap_kept"])) <= 2
    assert got == want
    assert exported(workspace) == sum(len(v) for v in want.values())
    state = json.loads(query(store, "SELECT detail FROM synth.stages WHERE name = 'mixed'")[0][0])
    assert state["taken"] == {k: len(v) for k, v in want.items()}


def test_a_quota_takes_the_same_rows_when_only_the_request_ids_change(workspace, tmp_path):
    """A trained teacher's request ids name its run's model directory, so a fresh run of the same pipeline has
    other ids for the same texts: the rows a quota takes must not depend on them (they did: md5(id) order)."""
    def texts_taken(folder, dear_model):
        pipeline = mixture(folder, "rule: quota, quota: {cheap_kept: 5, dear_kept: 7}, seed: 1")
        pipeline.write_text(pipeline.read_text().replace('"model": "dear"', f'"model": "{dear_model}"'))
        synth_run(pipeline)
        return sorted(query(folder / "out" / "run.duckdb", "SELECT source, input_id, sample, text FROM mixed"))

    other = tmp_path / "other"
    other.mkdir()
    fill_workspace(other)
    first, second = texts_taken(workspace, "dear"), texts_taken(other, "dear-run-2")
    ids = [query(f / "out" / "run.duckdb", "SELECT id FROM dear_kept ORDER BY input_id, sample") for f in (workspace, other)]
    assert ids[0] != ids[1]  # other request ids ...
    assert first == second and len(first) == 12  # ... the same rows taken


def test_mix_best_takes_each_inputs_best_sample_and_stats_price_each_teacher(workspace):
    """rule best by the judge-like verify scores: one row per input row, a verified one wherever either teacher
    has one; `synth stats` gives each teacher's samples, kept rows, taken rows and cost per kept/taken row."""
    synth_run(mixture(workspace, "rule: best, by: {cheap_kept: cheap_graded, dear_kept: dear_graded}"))
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT input_id, id, source FROM mixed")
    assert len(rows) == len({r[0] for r in rows})  # one per input row
    have_kept = {r[0] for r in query(store, "SELECT input_id FROM cheap_kept UNION SELECT input_id FROM dear_kept")}
    assert {r[0] for r in rows} == have_kept  # the keeps hold only verified rows: each input with one is taken

    stats = json.loads(synth("stats", workspace / "pipeline.yaml", "--format", "json", check=True).stdout)
    mix = next(r for r in stats if r["stage"] == "mixed")
    by_teacher = {x["teacher"]: x for x in mix["sources"]}
    for t in ("cheap", "dear"):
        x = by_teacher[t]
        tokens_in, tokens_out = query(store, "SELECT sum(c.prompt_tokens), sum(c.completion_tokens) FROM "
                                             f"synth.generations g JOIN synth.completions c USING (id) WHERE "
                                             f"g.stage = '{t}_samples'")[0]
        cost = (tokens_in * PRICES[t]["input"] + tokens_out * PRICES[t]["output"]) / 1e6
        kept = len(kept_ids(store, t))
        assert (x["samples"], x["kept"]) == (QUESTIONS * SAMPLES, kept)
        assert x["taken"] == sum(1 for r in rows if r[2] == f"{t}_kept")
        assert x["cost"] == pytest.approx(cost) and x["cost_per_kept"] == pytest.approx(cost / kept)
    table = synth("stats", workspace / "pipeline.yaml", check=True).stdout
    assert "mix 'mixed': per teacher" in table and "per kept row" in table


@pytest.mark.parametrize("mix, extra, must", [
    ("rule: quota", {}, "rule quota needs key 'quota'"),
    ("rule: quota, quota: {cheap_kept: 3}", {}, "give one entry per input (cheap_kept, dear_kept)"),
    ("rule: union, weights: {cheap_kept: 1, dear_kept: 1}", {}, "key 'weights' is not used by rule union"),
    ("rule: best, by: {cheap_kept: dear_graded, dear_kept: dear_graded}", {},
     "'dear_graded' judges the rows of 'dear_samples', not those of 'cheap_kept'"),
    ("rule: union", {"others": "kind: load, path: questions.jsonl",
                     "other_samples": "kind: generate, input: others, teacher: dear, prompt: solve"},
     None),
])
def test_mix_mistakes_are_one_line(workspace, mix, extra, must):
    path = mixture(workspace, mix, **extra)
    if must is None:  # two prompt sets: point the mix at the other one
        text = path.read_text().replace("inputs: [cheap_kept, dear_kept]", "inputs: [cheap_kept, other_samples]")
        path.write_text(text)
        must = "a mix combines teachers on one prompt set"
    with pytest.raises(SynthError) as exc:
        synth_load(path)
    assert must in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
