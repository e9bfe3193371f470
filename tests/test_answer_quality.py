"""Answers that will not serve are said, not silently kept (in process, echo teacher): the share of
answers the template's parser could read, samples that are all the same text (a teacher that does not
sample) and voting on them, and a keep or export left with nothing."""

from __future__ import annotations

import io

from rich.console import Console

from conftest import echo_teacher, make_pipeline, query, scripted_answers, synth_run

# a solution long enough that identical copies say the teacher did not sample (vote.MIN_TELLING_CHARS)
STEPS = "First add the two numbers, then check the sum once more before answering: "


def run_and_read(pipeline) -> tuple[dict, str]:
    out = io.StringIO()
    counts = synth_run(pipeline, console=Console(file=out, width=400, color_system=None))
    return counts, out.getvalue()


def test_a_low_parse_rate_is_reported_and_recorded(workspace):
    """An echo teacher repeats the question: no \\boxed{} anywhere, 0% parsed, and a warning that says what
    to do. The figures are in the stage's state."""
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher()}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve"})
    counts, out = run_and_read(pipeline)
    assert "parser boxed read 0/12 answers (0%)" in out
    assert "warning: only 0% of the answers follow the template's answer format" in out
    assert "When answers do not parse" in out
    assert counts["stages"]["solutions"]["parsed"] == {"readable": 0, "answers": 12}
    detail = query(workspace / "out" / "run.duckdb", "SELECT detail FROM synth.stages WHERE name = 'solutions'")[0][0]
    assert '"parsed": {"readable": 0, "answers": 12}' in detail


def test_answers_that_parse_give_no_warning(workspace):
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(scripted_answers(p=1.0))}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve"})
    counts, out = run_and_read(pipeline)
    assert "parser boxed read 12/12 answers (100%)" in out and "warning" not in out
    assert "identical" not in counts["stages"]["solutions"]  # one sample: nothing to compare


def sampled_vote(workspace, rules: list[dict], samples: int = 3, params: str = ", params: {temperature: 0.8}"):
    """Run seeds -> `samples` samples per seed from an echo teacher with `rules` -> a vote stage `agree`:
    run_and_read's (counts, console output)."""
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": f"kind: generate, input: problems, teacher: t, prompt: solve, samples: {samples}{params}",
        "agree": "kind: vote, input: solutions"})
    return run_and_read(pipeline)


def test_identical_samples_are_said_and_cannot_vote(workspace):
    """A teacher that does not sample (here: an echo rule that ignores the sample, as a greedy server
    would) gives every input the same text in all its samples at temperature 0.8: the generate stage warns
    with the likely cause, and vote fails those groups `identical_samples` instead of reporting 100%
    agreement."""
    greedy = [{"match": r"Q(\d+)", "reply": STEPS + "\\boxed{ {{ match[1] }} }"}]
    counts, out = sampled_vote(workspace, greedy)
    assert "12/12 inputs got 3 identical samples" in out
    assert "the teacher did not sample" in out and "transformers serve" in out
    assert counts["stages"]["solutions"]["identical"] == {"inputs": 12, "of": 12}
    reasons = query(workspace / "out" / "run.duckdb", "SELECT reason, count(*), bool_or(passed) FROM synth.verdicts "
                                                       "GROUP BY reason")
    assert reasons == [("identical_samples", 36, False)]
    assert "36 of 36 samples are in groups whose samples are all the same text" in out


def test_vote_still_counts_samples_that_differ(workspace):
    """Different texts with the same answer are votes: a group is `identical_samples` only when every
    text is the same (two texts of one answer pass)."""
    rules = [{"match": r"Q(\d+)", "reply": "Sample {{ sample }}: \\boxed{ {{ match[1] }} }"}]
    counts, out = sampled_vote(workspace, rules, samples=2, params="")
    assert query(workspace / "out" / "run.duckdb", "SELECT DISTINCT passed, reason FROM synth.verdicts") == \
        [(True, None)]
    assert "identical" not in out.split("agree", 1)[-1]


def test_a_confident_teacher_still_votes(workspace):
    """Identical groups below half of the groups are a confident model's (a sampling teacher writing the same
    solution every time on easy inputs), not a teacher that did not sample: they vote as usual."""
    rules = [{"match": r"Q([0-3])\b", "reply": STEPS + "\\boxed{ {{ match[1] }} }"},
             {"match": r"Q(\d+)", "reply": "Sample {{ sample }}: " + STEPS + "\\boxed{ {{ match[1] }} }"}]
    counts, out = sampled_vote(workspace, rules)
    assert counts["stages"]["solutions"]["identical"]["inputs"] == 4  # Q0..Q3 of 12
    assert query(workspace / "out" / "run.duckdb", "SELECT DISTINCT passed, reason FROM synth.verdicts") == \
        [(True, None)]


def test_short_answers_that_agree_are_votes_not_a_teacher_that_did_not_sample(workspace):
    """A bare answer (a structured-output stage's `{"answer": 7}`, a one-word reply) repeats under any
    temperature when the model is sure: identical short texts say nothing about sampling (vote.MIN_TELLING_CHARS),
    so no warning, and they vote as agreement."""
    rules = [{"match": r"Q(\d+)", "reply": "\\boxed{ {{ match[1] }} }"}]
    counts, out = sampled_vote(workspace, rules)
    assert counts["stages"]["solutions"]["identical"] == {"inputs": 0, "of": 0} and "did not sample" not in out
    assert query(workspace / "out" / "run.duckdb", "SELECT DISTINCT passed, reason FROM synth.verdicts") == \
        [(True, None)]


def test_a_keep_and_an_export_left_with_nothing_warn_with_the_reasons(workspace):
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher()}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve",
        "checked": "kind: verify, input: solutions, reference: answer_gold",
        "good": "kind: keep, input: solutions, pass: [checked]",
        "sft": "kind: export, input: good, path: out/sft.jsonl"})
    counts, out = run_and_read(pipeline)
    assert "good: warning: kept none of 12 rows" in out, out
    assert "checked: unparseable_answer 12" in out
    assert "sft: warning: wrote an empty sft file" in out and "the filters rejected every row" in out
    assert (workspace / "out" / "sft.jsonl").read_text() == ""
    assert counts["stages"]["sft"]["rows"] == 0
