"""The graph layer and the stage contract (synth/graph.py, synth/stages/): what loading a pipeline
gives, and the kind table's guarantees. In process, with the echo teacher."""

from __future__ import annotations

import pytest

from conftest import echo_teacher, make_pipeline
from synth.config import STAGE_MODELS
from synth.errors import SynthError
from synth.pipeline import load_pipeline
from synth.stages import FILTER_KINDS, KINDS, kind_of


def judged_pipeline(workspace):
    return make_pipeline(workspace, teachers={"t": echo_teacher()}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve, samples: 2",
        "critic": "kind: judge, input: solutions, teacher: t, mode: pairwise",
        "good": "kind: keep, input: solutions, pass: [critic]",
        "out": "kind: export, input: good, path: out/sft.jsonl",
    })


def test_every_config_model_has_a_kind_and_an_unknown_kind_fails_loudly():
    assert list(KINDS) == list(STAGE_MODELS)
    assert FILTER_KINDS == ("verify", "vote", "judge", "dedup", "decontaminate", "filter")
    assert kind_of("generate") is KINDS["generate"]
    with pytest.raises(SynthError, match="unknown stage kind 'summarise'.*generate"):
        kind_of("summarise")


def test_the_graph_holds_the_wiring(workspace):
    graph = load_pipeline(judged_pipeline(workspace))
    assert list(graph.order) == ["problems", "solutions", "critic_critic", "critic", "good", "out"]
    assert graph.inputs["critic"] == ("solutions", "critic_critic")  # its references, then its companion
    assert graph.companions["critic"] == ("critic_critic",) and graph.owner_of["critic_critic"] == "critic"
    assert graph.pairs_by == {"critic_critic": "input_id"}
    assert graph.root("good") == "solutions" and graph.root("critic") == "solutions"
    assert graph.columns["critic"][-3:] == ["passed", "score", "reason"]
    assert graph.columns["good"] == graph.columns["solutions"]
    assert "out" not in graph.columns  # an export has no rows
    assert graph.upstream(["good"]) == ["problems", "solutions", "critic_critic", "critic", "good"]


def test_the_graph_is_immutable(workspace):
    graph = load_pipeline(judged_pipeline(workspace))
    with pytest.raises(AttributeError, match="immutable"):
        graph.order = ["problems"]
    with pytest.raises(TypeError):
        graph.columns["problems"] = []
    with pytest.raises(TypeError):
        graph.inputs["out"] = ()
    with pytest.raises(AttributeError, match="immutable"):
        graph.add_template("solutions", graph.templates["solutions"])


def test_where_names_the_file_line_stage_and_key(workspace):
    path = judged_pipeline(workspace)
    graph = load_pipeline(path)
    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.startswith("  critic:"))
    assert graph.where("critic") == f"{path}:{line}: stage 'critic'"
    assert graph.where("critic", "mode") == f"{path}:{line}: stage 'critic'"  # flow mapping: the key's line
    assert graph.where("critic_critic") == f"{path}:{line}: stage 'critic_critic'"  # a companion: its owner's line


def test_fingerprints_are_memoised_and_follow_a_trained_teacher(workspace, tiny_model):
    recipe = workspace / "sft.yaml"
    recipe.write_text("max_steps: 1\n")
    path = make_pipeline(workspace, teachers={"t": echo_teacher()}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve",
        "data": "kind: export, input: solutions, path: out/sft.jsonl",
        "sft": f"kind: train, method: sft, data: data, student: {tiny_model}, recipe: sft.yaml",
        "again": "kind: generate, input: problems, teacher: sft, prompt: solve",
    })
    graph = load_pipeline(path)
    assert graph.inputs["again"] == ("problems", "sft")  # a trained student runs after its train stage
    untrained = graph.fingerprint_parts("again", {})
    assert graph.fingerprint_parts("again", {}) == untrained  # memoised: the same parts
    trained = graph.fingerprint_parts("again", {"sft": "/models/sft-1"})
    assert trained["teacher"] != untrained["teacher"] and trained["config"] == untrained["config"]
    assert graph.fingerprint("solutions", {}) == graph.fingerprint("solutions", {"sft": "/models/sft-1"})
    assert graph.teacher_config("sft", {"sft": "/models/sft-1"}).model == "/models/sft-1"
    assert graph.teacher_config("sft", {}).model == "<sft: not trained yet>"
