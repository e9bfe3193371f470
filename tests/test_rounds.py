"""The failure-mining loop: a `failures` stage (the rows an evaluate stage's model got wrong, readable by a
generate stage, so the dependency is in the DAG) and `rounds:` (a block of stages repeated N times, round
r+1 generating on the inputs round r's student failed, with a stop rule). The in-process tests use the echo
teacher's scripted answers; the rounds runs use the scripted OpenAI-compatible server on loopback (real
HTTP, counted requests) as the teacher and the tiny real model as the student, trained with real TRL steps,
through the CLI, killed with SIGKILL in round 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, echo_teacher, graded_pipeline, journaled, make_pipeline, query, scripted_answers, \
    synth, synth_run, write
from synth import load as synth_load
from synth.errors import SynthError

ROWS = 16


def test_failures_are_the_rows_the_model_got_wrong_and_a_generate_stage_reads_them(workspace):
    pipeline = graded_pipeline(
        workspace, questions=ROWS, p=0.5, samples=1,
        probe="kind: evaluate, input: problems, models: [weak], prompt: solve, samples: 2, "
              "params: {temperature: 1.0, max_tokens: 16, seed: 3}, verify: {answer: answer, reference: gold, "
              "method: math}",
        failed="kind: failures, input: probe, model: weak",
        anyfail="kind: failures, input: probe, model: weak, failed: any",
        more="kind: generate, input: failed, teacher: scripted, prompt: solve, samples: 2, "
             "params: {temperature: 1.0, max_tokens: 16, seed: 0}")
    text = pipeline.read_text().replace("teachers:\n", "teachers:\n  weak: " + json.dumps(
        echo_teacher(scripted_answers(p=0.4), model="weak")) + "\n")
    pipeline.write_text(text)
    graph = synth_load(pipeline)
    assert graph.inputs["more"] == ("failed",) and graph.inputs["failed"] == ("probe",)  # in the DAG: runs after
    assert graph.order.index("probe") < graph.order.index("failed") < graph.order.index("more")
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    outcomes: dict[str, list[bool]] = {}
    for input_id, passed in query(store, "SELECT input_id, passed FROM probe WHERE model = 'weak'"):
        outcomes.setdefault(input_id, []).append(passed)
    all_failed = {i for i, p in outcomes.items() if not any(p)}
    any_failed = {i for i, p in outcomes.items() if not all(p)}
    assert 0 < len(all_failed) < len(any_failed) < ROWS  # the draw gives a real subset each way
    assert {r[0] for r in query(store, "SELECT id FROM failed")} == all_failed
    assert {r[0] for r in query(store, "SELECT id FROM anyfail")} == any_failed
    assert {r[0] for r in query(store, "SELECT DISTINCT input_id FROM more")} == all_failed
    assert set(query(store, "SELECT question FROM failed")[0][0].split(":")[:1]) <= {f"Q{i}" for i in range(ROWS)}


@pytest.mark.parametrize("stages, must", [
    ({"failed": "kind: failures, input: problems, model: t"}, "key 'input': 'problems' is a load stage"),
    ({"ev": "kind: evaluate, input: problems, models: [t], prompt: solve, verify: {answer: answer, reference: gold}",
      "failed": "kind: failures, input: ev, model: other"}, "evaluate stage 'ev' does not evaluate 'other'"),
])
def test_failures_mistakes_are_one_line(workspace, stages, must):
    rows = [{"id": "q1", "question": "Q1?", "gold": "1"}]
    path = make_pipeline(workspace, files={"q.jsonl": rows}, teachers={"t": echo_teacher(), "other": echo_teacher()},
                         stages={"problems": "kind: load, path: q.jsonl", **stages})
    with pytest.raises(SynthError) as exc:
        synth_load(path)
    assert must in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def rounds_pipeline(root: Path, base_url: str, tiny_model: Path, count: int = 2, stop: str = "") -> Path:
    """Round 0: the teacher's samples on a pool, verified, kept, an SFT student, probed on the pool. Each
    round: the rows the last student failed, the teacher's samples on them, verified, kept, exported, a
    student trained from the last one, probed."""
    root.mkdir(exist_ok=True)
    write(root / "pool.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?",
                                                   "answer_gold": str(i)}) + "\n" for i in range(ROWS)))
    (root / "prompts").mkdir(exist_ok=True)
    write(root / "prompts" / "solve.yaml", 'system: "Solve it and end with \\\\boxed{ANSWER}."\n'
                                           'user: "{{ question }}"\nparse: boxed\n')
    write(root / "sft.yaml", (REPO / "train" / "sft-tiny.yaml").read_text().replace("max_steps: 30", "max_steps: 6"))
    verify = "{answer: answer, reference: answer_gold, method: numeric}"
    return write(root / "pipeline.yaml", f"""\
store: out/run.duckdb
teachers:
  t: {{backend: openai, model: m, base_url: "{base_url}", max_concurrency: 4}}
  base: {{backend: hf, model: {tiny_model}}}
stages:
  pool: {{kind: load, path: pool.jsonl}}
  samples: {{kind: generate, input: pool, teacher: t, prompt: solve, samples: 2, params: {{temperature: 1.0,
            max_tokens: 16, seed: 0}}}}
  graded: {{kind: verify, input: samples, method: numeric, answer: answer, reference: answer_gold}}
  kept: {{kind: keep, input: samples, pass: [graded]}}
  data: {{kind: export, input: kept, format: sft, path: out/sft.jsonl}}
  student: {{kind: train, method: sft, data: data, student: base, recipe: sft.yaml}}
  probe: {{kind: evaluate, input: pool, models: [student], prompt: solve, samples: 2,
          params: {{temperature: 1.0, max_tokens: 8, seed: 0}}, verify: {verify}}}
rounds:
  count: {count}
{stop}  stages:
    failed: {{kind: failures, input: prev.probe, model: prev.student, failed: any}}
    more: {{kind: generate, input: failed, teacher: t, prompt: solve, samples: 2, params: {{temperature: 1.0,
           max_tokens: 16, seed: 1}}}}
    more_graded: {{kind: verify, input: more, method: numeric, answer: answer, reference: answer_gold}}
    more_kept: {{kind: keep, input: more, pass: [more_graded]}}
    data: {{kind: export, input: more_kept, format: sft, path: out/sft.jsonl}}
    student: {{kind: train, method: sft, data: data, init: prev.student, recipe: sft.yaml}}
    probe: {{kind: evaluate, input: pool, models: [student], prompt: solve, samples: 2,
            params: {{temperature: 1.0, max_tokens: 8, seed: 0}}, verify: {verify}}}
""")


def failed_inputs(store: Path, probe: str, model: str) -> set[str]:
    return {r[0] for r in query(store, f"SELECT input_id FROM synth.evaluations WHERE stage = '{probe}' AND "
                                       f"model = '{model}' GROUP BY input_id HAVING NOT bool_and(passed)")}


def test_rounds_expand_name_and_read_the_round_before(workspace, tiny_model):
    graph = synth_load(rounds_pipeline(workspace, "http://127.0.0.1:9", tiny_model))
    assert graph.rounds["student"] == ("student_r1", "student_r2")
    assert graph.stage("failed_r1").input == "probe" and graph.stage("failed_r1").model == "student"
    assert graph.stage("failed_r2").input == "probe_r1" and graph.stage("failed_r2").model == "student_r1"
    assert graph.stage("student_r2").init == "student_r1" and graph.stage("student_r2").data == "data_r2"
    assert graph.stage("probe_r2").models == ["student_r2"] and graph.stage("data_r1").path == "out/sft_r1.jsonl"
    assert graph.where("more_r2", "teacher").startswith(f"{graph.path}:") and "stage 'more_r2'" in graph.where("more_r2")
    assert graph.round_number("more_r2") == 2 and graph.round_number("samples") == 0
    assert graph.round_number(graph.companions["probe_r2"][0]) == 2  # an evaluate stage's model calls
    text = graph.path.read_text()
    for broken, must in ((text.replace("init: prev.student", "init: prev.nothing"),
                          "'prev.nothing': 'nothing' is not a stage of the rounds block"),
                         (text.replace("  probe: {kind: evaluate", "  probe_x: {kind: evaluate", 1),
                          "round 1 reads round 0's 'probe', a stage outside the block, and there is none")):
        graph.path.write_text(broken)
        with pytest.raises(SynthError) as exc:
            synth_load(graph.path)
        assert must in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_rounds_run_resume_after_kill_and_stop(tmp_path, tiny_model):
    """Round 2's generate stage receives exactly the rows round 1's student failed; a finished rounds pipeline
    re-run sends nothing; a run killed in round 2 loses and duplicates nothing (the same outcome as an
    uninterrupted run); the stop rule ends the repetition, and status and report show the rounds."""
    from test_kill_loop import invariants
    from test_reliability import SlowTeacher

    with SlowTeacher(delay=0.05, p=0.6) as teacher:
        reference = rounds_pipeline(tmp_path / "reference", teacher.base_url, tiny_model)
        synth("run", reference, timeout=900, check=True)
        store = reference.parent / "out" / "run.duckdb"
        for r, (probe, model) in ((1, ("probe", "student")), (2, ("probe_r1", "student_r1"))):
            failed = failed_inputs(store, probe, model)
            got = {x[0] for x in query(store, f"SELECT DISTINCT input_id FROM more_r{r}")}
            assert failed and got == failed, (r, failed, got)
        sent = teacher.requests
        again = synth("run", reference, timeout=900, check=True)
        assert teacher.requests == sent and "0 stages run, 0 requests sent" in again.stderr, again.stderr
        expected = snapshot(store)

        # killed in round 2 (its generate stage's first answers are in the journal), then re-run
        killed = rounds_pipeline(tmp_path / "killed", teacher.base_url, tiny_model)
        journal = killed.parent / "out" / "run.duckdb.journal"
        proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(killed)], env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not journaled(journal, "more_r2.*"):
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before round 2's samples: nothing was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        invariants(killed.parent / "out" / "run.duckdb")
        before = teacher.requests
        synth("run", killed, timeout=900, check=True)
        assert snapshot(killed.parent / "out" / "run.duckdb") == expected  # nothing lost, nothing duplicated
        more_r2 = len(query(store, "SELECT id FROM more_r2"))
        assert teacher.requests - before <= more_r2  # the re-run sends round 2's missing answers at most

        # the stop rule: a gain no round can reach ends the rounds before round 2; raising the count adds a
        # round 3 that is never run, and says why
        stop = "  stop: {evaluate: probe, model: student, min_gain: 1000}\n"
        rounds_pipeline(tmp_path / "reference", teacher.base_url, tiny_model, count=3, stop=stop)
        ran = synth("run", reference, timeout=900, check=True)
        assert "not run: the rounds stopped before round 2: round 1 gained" in ran.stderr, ran.stderr
        assert not query(store, "SELECT name FROM synth.stages WHERE name LIKE '%_r3'")
        status = synth("status", reference, check=True).stdout
        assert "round 3 stopped" in status and "round 1 done" in status, status
        report = json.loads(synth("report", reference, "--format", "json", check=True).stdout)
        assert [(r["round"], r["model"], r["status"]) for r in report["rounds"]] == [
            (0, "student", "done"), (1, "student_r1", "done"), (2, "student_r2", "done"), (3, "student_r3", "stopped")]
        assert report["rounds"][1]["gain_points"] == pytest.approx(
            100 * (report["rounds"][1]["accuracy"] - report["rounds"][0]["accuracy"]))


def snapshot(store: Path) -> dict:
    """What a run produced, comparable across workspaces: the teacher's answers by stage, input and sample
    (their request ids are content hashes, equal everywhere), verdicts, evaluations by input and sample (a
    trained model's requests carry its model dir, which differs per workspace), stage states."""
    return {
        "answers": sorted(query(store, "SELECT g.stage, g.input_id, r.sample, g.id, c.text FROM synth.generations g "
                                       "JOIN synth.requests r USING (id) JOIN synth.completions c USING (id) "
                                       "WHERE g.teacher = 't'")),
        "completions": query(store, "SELECT count(*) - count(DISTINCT id) FROM synth.completions"),
        "verdicts": sorted(query(store, "SELECT stage, row_id, passed FROM synth.verdicts")),
        "evaluations": sorted(query(store, "SELECT stage, model, input_id, sample, passed FROM synth.evaluations")),
        "stages": sorted(query(store, "SELECT name, status FROM synth.stages")),
    }
