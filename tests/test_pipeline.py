"""The spine end to end through the CLI, with the in-process `hf` teacher on a real tiny model:
load -> generate -> export, the columns a generation row carries, the zero-request re-run, the
template-edit partial re-run that `synth plan` predicts, and the inspection commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SEEDS, fill_workspace, query, synth, write

PIPELINE = """\
store: out/run.duckdb
teachers:
  tutor:
    backend: hf
    model: {model}
    batch_size: 8
stages:
  problems:
    kind: load
    path: seeds.jsonl
  solutions:
    kind: generate
    input: problems
    teacher: tutor
    prompt: solve
    samples: {samples}
    params: {{temperature: 0.8, max_tokens: 12, seed: 0}}
  sft:
    kind: export
    input: solutions
    format: sft
    path: out/sft.parquet
"""


def make_pipeline(workspace: Path, model: Path, samples: int = 2) -> Path:
    return write(workspace / "pipeline.yaml", PIPELINE.format(model=model, samples=samples))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model) -> Path:
    """A workspace after its first `synth run` (samples 2), made once for this module."""
    ws = fill_workspace(tmp_path_factory.mktemp("first_run"))
    synth("run", make_pipeline(ws, tiny_model, samples=2), check=True)
    return ws


@pytest.fixture()
def ran(first_run, tmp_path) -> Path:
    """A copy of `first_run` for one test to read and change: the same files and store as if this test had
    run `synth run` itself (a copied workspace is fresh: no path in it is absolute)."""
    return Path(shutil.copytree(first_run, tmp_path / "ws"))


def last_run(store: Path) -> dict:
    (counts,) = query(store, "SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1")[0]
    return json.loads(counts)


def test_run_writes_every_stage_and_rerun_sends_nothing(ran, tiny_model):
    workspace = ran  # after `synth run` of make_pipeline(workspace, tiny_model, samples=2)
    pipeline = workspace / "pipeline.yaml"
    store = workspace / "out" / "run.duckdb"

    rows = query(store, "SELECT id, input_id, sample, teacher, model, text, finish_reason, prompt_tokens, "
                        "completion_tokens, answer, question, answer_gold, topic FROM solutions")
    assert len(rows) == len(SEEDS) * 2
    assert len({r[0] for r in rows}) == len(rows)  # one row per request id
    assert {r[2] for r in rows} == {0, 1}
    assert all(r[3] == "tutor" and r[4] == str(tiny_model) for r in rows)
    assert all(isinstance(r[5], str) and r[6] in ("stop", "length") for r in rows)
    assert all(r[7] > 0 and r[8] > 0 for r in rows)
    assert {r[10] for r in rows} == {s["question"] for s in SEEDS}
    # input_id links each generation to its input row
    joined = query(store, "SELECT count(*) FROM solutions s JOIN problems p ON p.id = s.input_id "
                          "WHERE p.question = s.question")
    assert joined[0][0] == len(rows)
    assert last_run(store)["sent"] == len(rows)

    sft = pq.read_table(workspace / "out" / "sft.parquet").to_pylist()
    assert len(sft) == len(rows)
    roles = [m["role"] for m in sft[0]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert query(store, "SELECT count(*) FROM sft")[0][0] == len(rows)  # the export is queryable too

    second = synth("run", pipeline, check=True)
    counts = last_run(store)
    assert counts["sent"] == 0 and counts["stages_run"] == []
    assert "0 requests sent" in second.stderr
    assert query(store, "SELECT count(*) FROM synth.completions")[0][0] == len(rows)
    assert query(store, "SELECT count(*) FROM synth.runs WHERE status = 'ok'")[0][0] == 2


def test_template_edit_resends_only_changed_rows(ran, tiny_model):
    workspace = ran  # after `synth run` of make_pipeline(workspace, tiny_model, samples=2)
    pipeline = workspace / "pipeline.yaml"
    store = workspace / "out" / "run.duckdb"
    before = {r[0]: r[1] for r in query(store, "SELECT id, text FROM synth.completions")}

    template = workspace / "prompts" / "solve.yaml"
    template.write_text(template.read_text().replace(
        'user: "{{ question }}"', 'user: "{{ question }}{% if topic == \'geometry\' %} Draw a figure.{% endif %}"'))
    geometry = sum(1 for s in SEEDS if s["topic"] == "geometry")

    plan = json.loads(synth("plan", pipeline, "--format", "json", check=True).stdout)
    by_stage = {r["stage"]: r for r in plan}
    assert by_stage["problems"]["stale"] is False
    assert by_stage["solutions"]["stale"] is True and "prompt template changed" in by_stage["solutions"]["reason"]
    assert by_stage["solutions"]["to_send"] == geometry * 2
    assert by_stage["solutions"]["cached"] == (len(SEEDS) - geometry) * 2
    assert by_stage["sft"]["stale"] is True and "solutions" in by_stage["sft"]["reason"]

    synth("run", pipeline, check=True)
    assert last_run(store)["sent"] == geometry * 2
    rows = query(store, "SELECT id, text, topic FROM solutions")
    assert len(rows) == len(SEEDS) * 2
    for rid, text, topic in rows:
        assert (rid in before) == (topic != "geometry")  # unchanged rows kept their cached completion
        if rid in before:
            assert before[rid] == text
    # the old geometry completions are still in the store: nothing is deleted
    assert query(store, "SELECT count(*) FROM synth.completions")[0][0] == len(SEEDS) * 2 + geometry * 2


def test_run_one_stage_runs_its_upstream_only(workspace, tiny_model):
    pipeline = make_pipeline(workspace, tiny_model, samples=1)
    synth("run", pipeline, "problems", check=True)
    store = workspace / "out" / "run.duckdb"
    assert query(store, "SELECT count(*) FROM problems")[0][0] == len(SEEDS)
    assert query(store, "SELECT count(*) FROM synth.completions")[0][0] == 0
    synth("run", pipeline, "solutions", check=True)
    assert query(store, "SELECT count(*) FROM solutions")[0][0] == len(SEEDS)
    assert not (workspace / "out" / "sft.parquet").exists()
    assert last_run(store)["stages_run"] == ["solutions"]


def test_inspection_commands(ran, tiny_model):
    workspace = ran  # after `synth run` of make_pipeline(workspace, tiny_model, samples=2)
    pipeline = workspace / "pipeline.yaml"
    store = workspace / "out" / "run.duckdb"

    csv = synth("sql", pipeline, "select input_id, sample, answer from solutions order by input_id, sample",
                "--format", "csv", check=True).stdout
    assert "\r" not in csv  # lines end in \n: a value piped on (`| xargs synth why ...`) carries no \r
    out = csv.splitlines()
    assert out[0] == "input_id,sample,answer" and len(out) == 1 + len(SEEDS) * 2
    as_json = synth("sql", store, "select count(*) as n from solutions", "--format", "json", check=True).stdout
    assert json.loads(as_json.strip()) == {"n": len(SEEDS) * 2}
    assert "solutions" in synth("sql", pipeline, "select 1 as solutions", check=True).stdout

    status = synth("status", pipeline, check=True).stdout
    for stage in ("problems", "solutions", "sft"):
        assert stage in status
    assert "fresh" in status and str(len(SEEDS) * 2) in status

    shown = synth("show", pipeline, "solutions", "-n", "3", check=True).stdout
    assert shown.count("solutions #") == 3 and "finish_reason" in shown

    rid, question = query(store, "SELECT id, question FROM solutions LIMIT 1")[0]
    lineage = synth("why", pipeline, rid[:10], check=True).stdout
    for expected in (rid, question, "tutor", "sample", "seed", "system", "user", "completion", "run "):
        assert expected in lineage, expected
    missing = synth("why", pipeline, "ffffffffffff")
    assert missing.returncode == 2 and "no request" in missing.stderr

    import synth as synth_lib
    df = synth_lib.open(pipeline).table("solutions")
    assert len(df) == len(SEEDS) * 2 and {"id", "input_id", "sample", "text", "answer"} <= set(df.columns)
    assert len(synth_lib.open(store).sql("select * from synth.runs")) == 1


def test_run_row_records_config_versions_and_counts(workspace, tiny_model):
    pipeline = make_pipeline(workspace, tiny_model, samples=1)
    synth("run", pipeline, check=True)
    store = workspace / "out" / "run.duckdb"
    command, argv, config, versions, started, ended, status = query(
        store, "SELECT command, argv, config, versions, started_at, ended_at, status FROM synth.runs")[0]
    assert command == "run" and json.loads(argv)[0] == "run" and status == "ok" and ended >= started
    assert json.loads(config)["stages"]["solutions"]["params"]["temperature"] == 0.8
    assert {"python", "duckdb", "synth-distill"} <= set(json.loads(versions))
    counts = json.loads(query(store, "SELECT counts FROM synth.runs")[0][0])
    assert counts["stages"]["solutions"]["sent"] == len(SEEDS)
    # every completion points at the run that wrote it
    assert query(store, "SELECT count(DISTINCT run_id) FROM synth.completions")[0][0] == 1


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_load_formats(workspace, tiny_model, fmt):
    import pandas as pd

    df = pd.DataFrame(SEEDS)
    src = workspace / f"seeds.{fmt}"
    if fmt == "csv":
        df.to_csv(src, index=False)
    elif fmt == "parquet":
        df.to_parquet(src)
    else:
        src.write_text(json.dumps(SEEDS))
    pipeline = make_pipeline(workspace, tiny_model).read_text().replace("seeds.jsonl", src.name)
    path = write(workspace / "p.yaml", pipeline)
    synth("run", path, "problems", check=True)
    rows = query(workspace / "out" / "run.duckdb", "SELECT question, answer_gold FROM problems ORDER BY question")
    assert len(rows) == len(SEEDS) and rows[0][0].startswith("Q0")


def test_load_hf_dataset_dir(workspace, tiny_model):
    from datasets import Dataset

    Dataset.from_list(SEEDS).save_to_disk(str(workspace / "seeds_ds"))
    path = write(workspace / "p.yaml", make_pipeline(workspace, tiny_model).read_text().replace("seeds.jsonl", "seeds_ds"))
    synth("run", path, "problems", check=True)
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM problems")[0][0] == len(SEEDS)


def test_run_only_runs_the_named_stage_alone(workspace):
    """`synth run p.yaml STAGE --only`: refused (one line, exit 2, nothing written) while a stage it reads is
    stale; once its inputs are fresh it runs that stage alone — an evaluate stage with its model
    generations — and never the stale stages beside it."""
    from conftest import graded_pipeline

    pipeline = graded_pipeline(workspace, questions=4, p=0.5, samples=2,
                               voted="kind: vote, input: solutions, answer: answer",
                               ev="kind: evaluate, input: problems, models: [scripted], prompt: solve, "
                                  "verify: {answer: answer, reference: gold, method: math}")
    store = workspace / "out" / "run.duckdb"
    refused = synth("run", pipeline, "graded", "--only")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "stage 'graded': --only: its input 'solutions' is stale (never run); run it first (synth run " \
           "pipeline.yaml solutions) or drop --only" in refused.stderr
    assert not store.exists()
    nameless = synth("run", pipeline, "--only")
    assert nameless.returncode == 2 and "--only runs the named stages alone; name them" in nameless.stderr

    synth("run", pipeline, "solutions", check=True)
    synth("run", pipeline, "graded", "--only", check=True)
    assert last_run(store)["stages_run"] == ["graded"]
    synth("run", pipeline, "ev", "--only", check=True)
    ran = last_run(store)["stages_run"]
    assert ran[-1] == "ev" and len(ran) == 2 and ran[0].startswith("ev_")  # its model's generations, then it
    states = dict(query(store, "SELECT name, status FROM synth.stages"))
    assert "voted" not in states  # stale all along, never run
    again = synth("run", pipeline, "graded", "--only", check=True)
    assert "graded: up to date" in again.stderr
