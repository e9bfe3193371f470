"""The command stage: a shell command synth does not wrap, run as a stage of the DAG, through the CLI as a
user runs it: its inputs handed over as paths (an export's file, a stage's rows as parquet), its output read
back as rows a later generate stage reads, fingerprinted by its command, inputs and files (an edited script
re-runs it, a deleted output too), and a failing or hanging command is one line, nothing recorded."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from conftest import graded_pipeline, query, synth, write
from synth import load as synth_load
from synth.errors import SynthError

SCRIPT = """\
import json, sys
import pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()        # the samples, as synth wrote them
sft = pq.read_table(sys.argv[2]).num_rows             # the export's file
with open(sys.argv[3], "w") as out:
    for i, r in enumerate(rows):
        out.write(json.dumps({"id": r["id"], "question": f"Q{i}: again?", "sft_rows": sft}) + "\\n")
print(f"scored {len(rows)} rows")
"""


PYTHON = shlex.quote(sys.executable)


def pipeline(workspace, run: str = f"{PYTHON} score.py {{solutions}} {{sft}} {{output}}", extra: str = ""):
    write(workspace / "score.py", SCRIPT)
    return graded_pipeline(
        workspace, questions=4, p=1.0, samples=2,
        sft="kind: export, input: solutions, format: sft, path: out/sft.parquet",
        harness={"kind": "command", "run": run, "inputs": ["solutions", "sft"], "files": ["score.py"],
                 "outputs": ["out/harness.jsonl"], "columns": ["id", "question", "sft_rows"]},
        again="kind: generate, input: harness, teacher: scripted, prompt: solve, "
              "params: {temperature: 1.0, max_tokens: 16, seed: 0}" + extra)


def test_a_command_runs_in_the_dag_and_its_rows_are_read_by_later_stages(workspace):
    path = pipeline(workspace)
    graph = synth_load(path)
    assert set(graph.inputs["harness"]) == {"solutions", "sft"} and graph.inputs["again"] == ("harness",)
    ran = synth("run", path, check=True)
    assert "harness| scored 8 rows" in ran.stderr and "harness: done, 8 rows in harness.jsonl" in ran.stderr
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT id, sft_rows FROM harness ORDER BY id")
    assert len(rows) == 8 and {r[1] for r in rows} == {8}
    assert {r[0] for r in rows} == {r[0] for r in query(store, "SELECT id FROM solutions")}
    assert query(store, "SELECT count(*) FROM again")[0][0] == 8  # a generate stage read its rows

    again = synth("run", path, check=True)
    assert "0 stages run" in again.stderr and "scored" not in again.stderr  # fresh: not run again
    write(workspace / "score.py", SCRIPT + "print('edited')\n")
    edited = synth("run", path, check=True)
    assert "harness| edited" in edited.stderr  # its file changed: it runs again
    (workspace / "out" / "harness.jsonl").unlink()
    status = synth("status", path, check=True).stdout
    assert "its output out/harness.jsonl is gone" in status
    synth("run", path, check=True)
    assert (workspace / "out" / "harness.jsonl").exists()


@pytest.mark.parametrize("run, must", [
    (f"{PYTHON} -c 'import sys; print(\"bad input\"); sys.exit(3)'", "the command exited 3: bad input; nothing recorded"),
    ("true", "the command exited 0 but did not write out/harness.jsonl"),
    ("echo '{\"id\": 1}' > {output}", "has no column 'question'"),
])
def test_a_failing_command_is_one_line_and_records_nothing(workspace, run, must):
    path = pipeline(workspace, run=run)
    out = synth("run", path)
    assert out.returncode == 2 and must in out.stderr, out.stderr
    assert out.stderr.count("synth: error:") == 1 and "Traceback" not in out.stderr
    states = dict(query(workspace / "out" / "run.duckdb", "SELECT name, status FROM synth.stages"))
    assert "harness" not in states and "again" not in states


def test_a_hanging_command_is_stopped_at_its_timeout(workspace):
    path = pipeline(workspace, run="sleep 60 & wait")
    text = path.read_text().replace('"outputs":', '"timeout_s": 1.5, "outputs":')
    path.write_text(text)
    out = synth("run", path)
    assert out.returncode == 2 and "ran past timeout_s (1.5 s) and was stopped" in out.stderr, out.stderr


@pytest.mark.parametrize("run, files, outputs, must", [
    ("python x.py {nope}", [], ["out/a.jsonl"], "unknown placeholder {nope}"),
    ("python x.py", ["missing.py"], ["out/a.jsonl"], "missing.py: no such file"),
    ("true", [], ["questions.jsonl"], "key 'outputs': questions.jsonl would overwrite the seed file"),
])
def test_command_mistakes_are_one_line(workspace, run, files, outputs, must):
    path = graded_pipeline(workspace, questions=2, p=1.0, samples=1,
                           harness={"kind": "command", "run": run, "files": files, "outputs": outputs})
    with pytest.raises(SynthError) as exc:
        synth_load(path)
    assert must in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_literal_braces_and_awk(workspace):
    """`{{`/`}}` are literal braces; `{print $1}` (not an identifier) is left alone."""
    run = "echo '{{\"id\": \"x\"}}' > {output} && echo a b | awk '{print $1}'"
    path = graded_pipeline(workspace, questions=2, p=1.0, samples=1,
                           harness={"kind": "command", "run": run, "outputs": ["out/h.jsonl"]})
    out = synth("run", path, check=True)
    assert "harness| a" in out.stderr
    assert json.loads((workspace / "out" / "h.jsonl").read_text()) == {"id": "x"}
