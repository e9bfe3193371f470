"""Replication: a train stage with `seeds` trains its recipe once per seed (replicas <name>_s<seed>, each a model and
a teacher); the stages that read it are replicated with it (replica s reads replica s); an evaluate stage
evaluates every replica; synth.compare aggregates arms over seeds and compares them with exact tests.
Real tiny models and TRL steps for the run; the expansion and the statistics in process."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import echo_teacher, make_pipeline, query, synth, synth_run
from synth import compare
from synth import load as synth_load
from synth.errors import SynthError

RECIPE = "max_steps: 3\nlearning_rate: 1.0e-3\nper_device_train_batch_size: 4\nmax_length: 128\nseed: 0\n"


def replicated(workspace, student, seeds=(0, 1), extra=None):
    return make_pipeline(workspace, teachers={"t": echo_teacher()}, files={"r.yaml": RECIPE}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "sft_data": {"kind": "export", "input": "problems", "format": "sft", "prompt": "solve",
                     "response": "answer_gold", "path": "out/sft.parquet"},
        "stu": {"kind": "train", "method": "sft", "data": "sft_data", "student": str(student), "recipe": "r.yaml",
                "seeds": list(seeds)},
        "own": {"kind": "generate", "input": "problems", "teacher": "stu", "prompt": "solve",
                "params": {"max_tokens": 8, "temperature": 0.0}},
        "graded": {"kind": "verify", "input": "own", "method": "numeric", "answer": "answer",
                   "reference": "answer_gold"},
        "ev": {"kind": "evaluate", "input": "problems", "models": ["t", "stu"], "prompt": "solve",
               "params": {"max_tokens": 8, "temperature": 0.0},
               "verify": {"answer": "answer", "reference": "answer_gold", "method": "numeric"}},
        **(extra or {})})


def test_replicas_and_what_reads_them_are_expanded(workspace, tiny_model):
    graph = synth_load(replicated(workspace, tiny_model, seeds=(0, 1, 2)))
    assert dict(graph.replicas) == {"stu": ("stu_s0", "stu_s1", "stu_s2"), "own": ("own_s0", "own_s1", "own_s2"),
                                    "graded": ("graded_s0", "graded_s1", "graded_s2")}
    assert graph.spec.stages["ev"].models == ["t", "stu_s0", "stu_s1", "stu_s2"]
    assert graph.inputs["graded_s1"] == ("own_s1",) and "stu_s1" in graph.inputs["own_s1"]
    assert [graph.spec.stages[f"stu_s{s}"].seed for s in range(3)] == [0, 1, 2]
    assert graph.where("graded_s2", "input").endswith("stage 'graded_s2'") and ":" in graph.where("graded_s2")
    assert {"stu_s0", "stu_s1", "stu_s2"} <= graph.stage_teachers
    assert "stu" not in graph.spec.stages and "own" not in graph.spec.stages


@pytest.mark.parametrize("extra, expected", [
    ({"stu_s1": "kind: load, path: seeds.jsonl"}, "the name is taken by a replica of 'stu'"),
    ({"other": {"kind": "train", "method": "sft", "data": "sft_data", "student": "x", "recipe": "r.yaml",
                "seeds": [5, 6]},
      "mixed": {"kind": "pairs", "input": "own", "versus": "other_own"},
      "other_own": {"kind": "generate", "input": "problems", "teacher": "other", "prompt": "solve"}},
     "must be replicated with the same seeds"),
])
def test_replication_mistakes_are_one_line(workspace, tiny_model, extra, expected):
    with pytest.raises(SynthError) as exc:
        synth_load(replicated(workspace, tiny_model, extra=extra))
    assert expected in str(exc.value) and "pipeline.yaml:" in str(exc.value)


def test_a_seed_listed_twice(workspace, tiny_model):
    with pytest.raises(SynthError, match="a seed is listed twice"):
        synth_load(replicated(workspace, tiny_model, seeds=(1, 1)))


def test_each_replica_trains_with_its_seed_and_is_evaluated(workspace, tiny_model):
    p = replicated(workspace, tiny_model)
    counts = synth_run(p)
    assert {"stu_s0", "stu_s1", "own_s0", "own_s1", "graded_s0", "graded_s1"} <= set(counts["stages_run"])
    store = workspace / "out" / "run.duckdb"
    dirs = dict(query(store, "SELECT name, json_extract_string(detail, '$.model_dir') FROM synth.stages "
                             "WHERE kind = 'train'"))
    weights = {n: hashlib.sha256(open(f"{d}/model.safetensors", "rb").read()).hexdigest() for n, d in dirs.items()}
    assert weights["stu_s0"] != weights["stu_s1"]  # another seed, another model
    models = {r[0] for r in query(store, "SELECT DISTINCT model FROM synth.evaluations WHERE stage = 'ev'")}
    assert models == {"t", "stu_s0", "stu_s1"}
    graph = synth_load(p)
    with graph.store.read() as con:
        results = compare.outcomes(con, "ev")
    arms = compare.group(graph.spec.stages["ev"].models, graph.replicas)
    assert arms == {"t": ["t"], "stu": ["stu_s0", "stu_s1"]}
    summary = compare.arm_summary(results, arms["stu"])
    assert len(summary["values"]) == 2 and summary["min"] <= summary["mean"] <= summary["max"]
    vs = compare.compare_arms(results, arms["stu"], arms["t"])
    assert vs["seeds"] == 2 and len(vs["per_seed"]) == 2
    assert synth_run(p)["stages_run"] == []  # replicas are ordinary stages: nothing stale on a re-run
    report = json.loads(synth("report", p, "--format", "json", check=True).stdout)
    arm = report["arms"]["ev"]["stu"]
    assert arm["models"] == ["stu_s0", "stu_s1"] and arm["mean"] == pytest.approx(summary["mean"])
    assert "models over seeds" in synth("report", p, check=True).stdout


def test_workers_keep_to_the_replicas_of_one_stage(workspace, tiny_model):
    """`synth run --jobs 2` hands an idle worker the next replica of the stage it trained last (same data and
    recipe but the seed: train.prepare reuses the tokenised data that worker holds), and otherwise a stage the
    other worker is not on. Simulated with trainings of equal length, as the demo's students are."""
    from synth.pipeline import _next_for

    stages = {f"{arm}_stu": {"kind": "train", "method": "sft", "data": "sft_data", "student": str(tiny_model),
                             "recipe": "r.yaml", "seeds": [0, 1, 2]} for arm in ("a", "b", "c")}
    graph = synth_load(replicated(workspace, tiny_model, extra=stages))
    queue = [(f"{arm}_stu_s{s}", None) for arm in ("a", "b", "c") for s in range(3)]
    last, busy, took = {}, {}, {0: [], 1: []}  # busy: worker -> when its stage ends
    clock = 0
    while queue:
        for worker in sorted((w for w in (0, 1) if busy.get(w, 0) <= clock), key=lambda w: busy.get(w, 0)):
            if not queue:
                break
            name = queue.pop(_next_for(graph, queue, last.get(worker),
                                       {last[w] for w in busy if busy[w] > clock and w in last}))[0]
            last[worker] = graph.replica_of[name]
            took[worker].append(name)
            busy[worker] = clock + 10
        clock = min(busy.values())
    assert took == {0: ["a_stu_s0", "a_stu_s1", "a_stu_s2", "c_stu_s0", "c_stu_s2"],
                    1: ["b_stu_s0", "b_stu_s1", "b_stu_s2", "c_stu_s1"]}
    reused = sum(graph.replica_of[x] == graph.replica_of[y] for names in took.values() for x, y in zip(names, names[1:]))
    assert reused == 5  # of nine; three in file order
    # a stage that is no replica is its own family, and a worker with nothing of its own takes the first
    assert _next_for(graph, [("problems", None), ("a_stu_s1", None)], "b_stu", {"problems"}) == 1
    assert _next_for(graph, [("problems", None)], None, {"problems"}) == 0


def test_mcnemar_and_the_paired_test_by_hand():
    items = [(f"q{i}", 0) for i in range(20)]
    a = {i: True for i in items}
    b = {i: n >= 8 for n, i in enumerate(items)}  # A right on 8 that B misses
    b[items[0]], a[items[19]] = True, False       # and B right on one A misses... (q0 both now; q19 B only)
    r = compare.mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (7, 1, 20)
    assert r["p_mcnemar"] == pytest.approx(0.0703125)  # 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * 9/256
    assert r["diff_points"] == pytest.approx(100 * (19 / 20 - 13 / 20))
    results = {"a0": a, "a1": a, "b0": b, "b1": {i: True for i in items}}
    vs = compare.compare_arms(results, ["a0", "a1"], ["b0", "b1"])
    assert vs["per_seed"][1]["diff_points"] == pytest.approx(-5.0) and vs["p_paired_t"] is not None
    assert vs["diff_points"] == pytest.approx((30.0 - 5.0) / 2)
