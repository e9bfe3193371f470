"""Preference pair rules on literal rows and literal verdicts: the samples are a load stage, the
verdicts are written straight into synth.verdict_history (as the current run of stage f), and the pairs stage runs through the library API,
so each rule's output is known exactly. Whole pipelines (samples -> verify -> pairs -> export) run in
process (synth.run) with the echo teacher's scripted answers (conftest.scripted_answers)."""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pytest
from rich.console import Console

from conftest import echo_teacher, graded_pipeline, make_pipeline, query, synth_run, write
from synth.context import RunContext
from synth.stages import pairs
from synth.errors import SynthError
from synth.pipeline import load_pipeline
from synth.store import Store

SAMPLES = [  # two groups; ids say what each sample is
    ("a_ok1", "a"), ("a_ok2", "a"), ("a_bad1", "a"), ("a_bad2", "a"),
    ("b_ok1", "b"), ("b_bad1", "b"),
    ("c_ok1", "c"),  # nothing to pair with
]


def project(workspace, stage: str, verdicts: dict[str, tuple] | None, by_kind: str | None, prefix: str = ""):
    """`prefix` renames every sample id (not its text): a fresh run's request ids differ from the last's."""
    write(workspace / "samples.jsonl", "".join(json.dumps({"id": prefix + i, "input_id": g, "text": f"text of {i}"})
                                               + "\n" for i, g in SAMPLES))
    verdicts = {prefix + k: v for k, v in verdicts.items()} if verdicts else verdicts
    write(workspace / "student.jsonl", "".join(json.dumps({"id": f"s_{g}{k}", "input_id": g, "text": f"student {g}{k}"}) + "\n"
                                               for g in "ab" for k in range(2)))
    by = {"verify": "kind: verify, input: samples, method: exact, answer: text, reference: input_id",
          "vote": "kind: vote, input: samples, answer: text",
          "judge": "kind: judge, input: samples, teacher: t, prompt: crit"}.get(by_kind)
    write(workspace / "prompts" / "crit.yaml", 'user: "Grade: {{ text }}"\nparse: score\n')
    pipeline = load_pipeline(make_pipeline(workspace, teachers={"t": echo_teacher()}, stages={
        "samples": "kind: load, path: samples.jsonl", "student": "kind: load, path: student.jsonl",
        **({"f": by} if by else {}), "p": f"kind: pairs, input: samples, {stage}"}))
    with pipeline.store.write() as con:
        for name in ("samples", "student"):
            Store.replace_table(con, name, pipeline.seeds[name].table)
        run_id = f"test-run-{uuid.uuid4().hex[:8]}"  # each call a run of its own: history keeps the earlier ones
        if verdicts:
            Store.insert_arrow(con, "synth.verdict_history", pa.table({
                "stage": ["f"] * len(verdicts), "row_id": list(verdicts), "run_id": [run_id] * len(verdicts),
                "passed": [v[0] for v in verdicts.values()], "score": [v[1] for v in verdicts.values()],
                "reason": [v[2] for v in verdicts.values()]}), mode="")
        Store.set_stage(con, "f", by_kind or "verify", None, "done", len(verdicts or {}), run_id)  # current: these
    result = pairs.run(RunContext(pipeline, run_id, Console(quiet=True)), "p")
    with pipeline.store.read() as con:
        got = con.execute("SELECT chosen_id, rejected_id, rule, margin FROM p ORDER BY 1, 2").fetchall()
    return result, got


VERIFIED = {"a_ok1": (True, 1.0, None), "a_ok2": (True, 1.0, None), "a_bad1": (False, 0.0, "wrong_answer"),
            "a_bad2": (False, 0.0, "unparseable_answer"), "b_ok1": (True, 1.0, None),
            "b_bad1": (False, 0.0, "wrong_answer"), "c_ok1": (True, 1.0, None)}


def test_verified_beats_failed(workspace):
    result, got = project(workspace, "by: f, max_per_input: 10", VERIFIED, "verify")
    assert {(c, r) for c, r, _, _ in got} == {("a_ok1", "a_bad1"), ("a_ok1", "a_bad2"), ("a_ok2", "a_bad1"),
                                              ("a_ok2", "a_bad2"), ("b_ok1", "b_bad1")}
    assert {rule for _, _, rule, _ in got} == {"verified"} and result["inputs"] == 2


def test_max_per_input_and_seed_are_deterministic(workspace):
    _, first = project(workspace, "by: f, max_per_input: 2, seed: 0", VERIFIED, "verify")
    _, again = project(workspace, "by: f, max_per_input: 2, seed: 0", VERIFIED, "verify")
    assert first == again
    assert sum(1 for c, *_ in first if c.startswith("a")) == 2 and sum(1 for c, *_ in first if c.startswith("b")) == 1
    picks = {tuple(project(workspace, f"by: f, max_per_input: 1, seed: {s}", VERIFIED, "verify")[1][0][:2])
             for s in range(8)}
    assert len(picks) > 1  # the seed changes which of group a's four candidates is picked


def test_the_pairs_taken_depend_on_the_texts_not_the_ids(workspace):
    """A trained student's request ids carry its model directory, named by run id: a fresh run of the same
    pipeline has other ids for the same samples. The pairs taken must be the same texts."""
    texts = {}
    for prefix in ("", "run2-"):
        _, got = project(workspace, "by: f, max_per_input: 1, seed: 5", VERIFIED, "verify", prefix=prefix)
        texts[prefix] = sorted((c.removeprefix(prefix), r.removeprefix(prefix)) for c, r, _, _ in got)
    assert texts[""] == texts["run2-"] and len(texts[""]) == 2


def test_plurality_beats_minority_only(workspace):
    verdicts = {"a_ok1": (True, 0.5, None), "a_ok2": (True, 0.5, None), "a_bad1": (False, 0.25, "minority_answer"),
                "a_bad2": (False, None, "no_answer"), "b_ok1": (False, 0.5, "low_agreement"),
                "b_bad1": (False, 0.5, "low_agreement")}
    _, got = project(workspace, "by: f, max_per_input: 10", verdicts, "vote")
    assert [(c, r, rule) for c, r, rule, _ in got] == [("a_ok1", "a_bad1", "plurality"), ("a_ok2", "a_bad1", "plurality")]
    assert all(m == pytest.approx(0.25) for *_, m in got)


def test_judge_high_beats_low_with_margin(workspace):
    verdicts = {"a_ok1": (True, 9.0, None), "a_ok2": (True, 8.0, None), "a_bad1": (False, 6.0, "low_score"),
                "a_bad2": (False, None, "unparseable_judgment"), "b_ok1": (True, 7.0, None),
                "b_bad1": (False, 6.5, "low_score")}
    _, got = project(workspace, "by: f, min_margin: 2, max_per_input: 10", verdicts, "judge")
    assert [(c, r, m) for c, r, _, m in got] == [("a_ok1", "a_bad1", 3.0), ("a_ok2", "a_bad1", 2.0)]


def test_teacher_beats_student(workspace):
    _, got = project(workspace, "versus: student, max_per_input: 10", None, None)
    assert {(c, r) for c, r, _, _ in got} == {(t, f"s_{t[0]}{k}") for t, g in SAMPLES if g in "ab" for k in range(2)}
    assert {rule for _, _, rule, _ in got} == {"teacher_student"}


def error_on_one_row(workspace, row: dict, stages: dict) -> str:
    """The SynthError's message (the CLI's one line) of running a pipeline whose stage `samples` loads the
    one row, followed by `stages` (make_pipeline's form)."""
    pipeline = make_pipeline(workspace, {"samples": "kind: load, path: samples.jsonl", **stages},
                             files={"samples.jsonl": [row]})
    with pytest.raises(SynthError) as exc:
        synth_run(pipeline)
    assert "\n" not in str(exc.value), str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("stage,must", [
    ("by: samples", "'samples' is a load stage; use a verify or vote or judge stage"),
    ("by: nope", "no stage named 'nope'"),
    ("max_per_input: 2", "exactly one of 'by'"),
])
def test_pairs_config_errors(workspace, stage, must):
    message = error_on_one_row(workspace, {"id": "x", "input_id": "a", "text": "t"},
                               {"p": f"kind: pairs, input: samples, {stage}"})
    assert must in message, message


def test_dpo_export_from_verified_pairs(workspace):
    """Scripted teacher samples -> verify -> pairs -> export dpo in TRL's conversational preference
    format; the chosen answer is right and the rejected one wrong."""
    synth_run(graded_pipeline(workspace, questions=10, p=0.5, samples=4,
                              prefs="kind: pairs, input: solutions, by: graded, max_per_input: 2",
                              dpo="kind: export, input: prefs, format: dpo, path: out/dpo.parquet"))
    import pyarrow.parquet as pq

    rows = pq.read_table(workspace / "out" / "dpo.parquet").to_pylist()
    assert rows and len(rows) <= 2 * 10
    for r in rows:
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        q = r["prompt"][1]["content"].split(":")[0][1:]
        assert f"\\boxed{{{q}}}" in r["chosen"][0]["content"]
        assert f"\\boxed{{{q}}}" not in r["rejected"][0]["content"]
    # within a problem, pairs come in the order of their texts, not of their ids (which name the requests'
    # model: a run-named directory when a trained student wrote them), so TRL's seeded shuffle sees one order
    ids = [r["id"] for r in rows]
    order = [(r["prompt"][1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    problems = [p for p, _, _ in order]
    assert len(set(problems)) < len(rows), "no problem with two pairs: the order within one is untested"
    by_problem = {}
    for p, chosen, rejected in order:
        by_problem.setdefault(p, []).append((chosen, rejected))
    assert all(pairs == sorted(pairs) for pairs in by_problem.values()) and len(set(ids)) == len(ids)


def test_first_difference_on_one_line_answers_warns(workspace):
    """The scripted teacher answers in one line: rejected: first_difference cannot cut anything there, and
    a user must hear that DPO ran on whole answers (the stage records how many it cut)."""
    import io

    from rich.console import Console

    out = io.StringIO()
    synth_run(graded_pipeline(workspace, questions=10, p=0.5, samples=4,
                              prefs="kind: pairs, input: solutions, by: graded, max_per_input: 2",
                              dpo="kind: export, input: prefs, format: dpo, path: out/dpo.parquet, "
                                  "rejected: first_difference"),
              console=Console(file=out, width=400))
    pairs_made = query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM prefs")[0][0]
    detail = json.loads(query(workspace / "out" / "run.duckdb",
                              "SELECT detail FROM synth.stages WHERE name = 'dpo'")[0][0])
    assert pairs_made > 0 and detail["cut"] == 0
    assert f"rejected: first_difference cut only 0 of {pairs_made} rejected answers" in out.getvalue()


def test_export_targets_hf_dataset_card_and_sidecar(workspace):
    """target both ("Distilling Step-by-Step"): two tasks per sample; a directory path is a saved HF
    dataset with a dataset card; every export has a sidecar naming the runs behind it."""
    from datasets import load_from_disk

    synth_run(graded_pipeline(
        workspace, questions=5, p=1.0, samples=2, kept="kind: keep, input: solutions, pass: [graded]",
        steps="kind: export, input: kept, format: sft, target: both, path: out/both_ds",
        answers="kind: export, input: kept, format: sft, target: answer, path: out/answers.jsonl"))
    ds = load_from_disk(str(workspace / "out" / "both_ds"))
    assert len(ds) == 2 * 5 * 2
    by_id = {r["id"]: r["messages"] for r in ds}
    some = next(i for i in by_id if i.endswith(":answer")).removesuffix(":answer")
    ans, rat = by_id[some + ":answer"], by_id[some + ":rationale"]
    assert ans[-2]["content"].startswith("[answer] ") and rat[-2]["content"].startswith("[rationale] ")
    assert rat[-1]["content"].startswith("Working it out") and "\\boxed" not in ans[-1]["content"]
    card = (workspace / "out" / "both_ds" / "README.md").read_text()
    assert "scripted" in card and "graded" in card and "solve" in card
    side = json.loads((workspace / "out" / "both_ds" / "synth.json").read_text())
    assert side["rows"] == 20 and set(side["stages"]) >= {"problems", "solutions", "graded", "kept"}
    assert all(s["run_id"] for s in side["stages"].values())
    answers = [json.loads(line) for line in (workspace / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 10 and all(a["messages"][-1]["content"].isdigit() for a in answers)
    assert json.loads((workspace / "out" / "answers.jsonl.synth.json").read_text())["format"] == "sft"
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM steps")[0][0] == 20


def test_pairs_are_distinct_by_text(workspace):
    """Samples that repeat a text make one candidate per distinct (chosen, rejected) texts, and a
    candidate whose two texts are equal (a judge can score one text twice, differently) is dropped."""
    texts = {"a_ok1": "right", "a_ok2": "right", "a_bad1": "wrong", "a_bad2": "wrong", "b_ok1": "same",
             "b_bad1": "same", "c_ok1": "alone"}
    project(workspace, "by: f, max_per_input: 10", VERIFIED, "verify")  # writes the files
    write(workspace / "samples.jsonl", "".join(json.dumps({"id": i, "input_id": g, "text": texts[i]}) + "\n"
                                               for i, g in SAMPLES))
    pipeline = load_pipeline(workspace / "pipeline.yaml")
    with pipeline.store.write() as con:
        Store.replace_table(con, "samples", pipeline.seeds["samples"].table)
    result = pairs.run(RunContext(pipeline, "test-run", Console(quiet=True)), "p")
    with pipeline.store.read() as con:
        got = con.execute("SELECT input_id, chosen_id, rejected_id FROM synth.pairs WHERE stage = 'p'").fetchall()
    assert len(got) == 1 and got[0][0] == "a" and got[0][1].startswith("a_ok") and got[0][2].startswith("a_bad")
    assert result["rows"] == 1 and result["inputs"] == 1


def test_pairs_of_rows_without_text_is_one_line(workspace):
    message = error_on_one_row(workspace, {"id": "x", "input_id": "a", "answer": "t"}, {
        "f": "kind: verify, input: samples, method: exact, answer: answer, reference: input_id",
        "p": "kind: pairs, input: samples, by: f"})
    assert message == ("stage 'p': its samples 'samples' have no 'text' column; pair the samples of "
                       "a generate stage (or a keep stage of one)")


@pytest.mark.parametrize("chosen,rejected,cut", [
    ("- a: 3 - 1 = 2\n- b: 2 + 4 = 6\nThe answer is 6.", "- a: 3 - 1 = 2\n- b: 2 + 4 = 5\nThe answer is 5.",
     "- a: 3 - 1 = 2\n- b: 2 + 4 = 5"),                                    # cut after the wrong step
    ("x = 1\nThe answer is 1.", "y = 2\nz = 3\nThe answer is 3.", "y = 2"),  # wrong from the first line
    ("one\ntwo", "one\ntwo\nthree", "one\ntwo\nthree"),                       # runs on: the extra line is the difference
    ("one line", "another line", "another line"),
])
def test_rejected_first_difference(chosen, rejected, cut):
    from synth.stages.export import first_difference

    assert first_difference(chosen, rejected) == cut


def test_rejected_on_an_sft_export_is_one_line(workspace):
    message = error_on_one_row(workspace, {"id": "x", "input_id": "a", "text": "t"}, {
        "out": "kind: export, input: samples, prompt: p, response: text, rejected: first_difference, "
               "path: out/x.jsonl"})
    assert "key 'rejected' cuts the rejected answers of DPO pairs; it needs format: dpo" in message


def test_a_later_key_at_its_default_leaves_the_fingerprint_alone(workspace):
    """`rejected` came after export stages had run: at its default it is not in the fingerprint (an
    upgrade must not retrain what follows every export), and set to anything else it is."""
    from synth.ids import content_hash

    write(workspace / "samples.jsonl", json.dumps({"id": "x", "input_id": "a", "text": "t"}) + "\n")
    base = "store: out/run.duckdb\nstages:\n  samples: {kind: load, path: samples.jsonl}\n"
    fingerprints = {}
    for value in (None, "whole", "first_difference"):
        key = "" if value is None else f", rejected: {value}"
        write(workspace / "pipeline.yaml", base + "  f: {kind: verify, input: samples, method: exact, answer: text, "
              "reference: input_id}\n  p: {kind: pairs, input: samples, by: f}\n"
              f"  out: {{kind: export, input: p, format: dpo, path: out/x.parquet{key}}}\n")
        pipeline = load_pipeline(workspace / "pipeline.yaml")
        fingerprints[value] = pipeline.fingerprint_parts("out", {})["config"]
        if value is None:
            dump = pipeline.stage("out").model_dump(mode="json", exclude={"description", "max_cost", "max_tokens_total",
                                                                           "batch_size", "ray", "rejected",
                                                                           "reasoning", "think_tags"})
            # what synth before `rejected` (and the later `reasoning`, `think_tags`) computed
            assert fingerprints[None] == content_hash(dump)
    assert fingerprints[None] == fingerprints["whole"] != fingerprints["first_difference"]
