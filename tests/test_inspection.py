"""The inspection commands a user reads a store with (`synth why`, `synth sql`, `synth sample`, `synth grep`,
`synth diff`) and the read-only `synth.open`, through the CLI as a user runs them, on pipelines of the echo
teacher's scripted answers (conftest.graded_pipeline): no model, each answer known."""

from __future__ import annotations

import json

import pytest

from conftest import graded_pipeline, query, synth, synth_run
from synth.errors import SynthError


def test_why_names_any_row_id(workspace):
    """`synth why` takes any id a user meets and says what it is: an input row (its requests with their
    verdicts, its pairs), a request (or a unique prefix of one), a pair; an unknown id is one line, exit 2;
    and nothing prints a warning."""
    pipeline = graded_pipeline(workspace, questions=4, p=0.5, samples=4,
                               prefs="kind: pairs, input: solutions, by: graded, max_per_input: 1")
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    input_id, pair_id, chosen = query(store, "SELECT input_id, id, chosen_id FROM prefs ORDER BY id LIMIT 1")[0]

    row = synth("why", pipeline, input_id, check=True)
    assert row.stdout.startswith(f"input row {input_id} (a row of problems)")
    requests = query(store, f"SELECT id FROM solutions WHERE input_id = '{input_id}'")
    assert len(requests) == 4 and all(r[0] in row.stdout for r in requests)
    assert "graded: passed" in row.stdout and "graded: failed (wrong_answer)" in row.stdout
    assert "prefs: 1 preference pair from its samples" in row.stdout

    pair = synth("why", pipeline, pair_id, check=True)
    assert pair.stdout.startswith(f"pair {pair_id} (a pairs stage's row)") and "rule verified" in pair.stdout
    assert f"chosen · request {chosen}" in pair.stdout

    request = synth("why", pipeline, chosen[:8], check=True)
    assert request.stdout.startswith(f"request {chosen} (a generate stage's row)") and "input row (problems)" in request.stdout
    for out in (row, pair, request):
        assert "Warning" not in out.stderr, out.stderr

    missing = synth("why", pipeline, "nothing-here")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "no request, pair, scored sequence or input row with id 'nothing-here'" in missing.stderr


def test_synth_open_is_read_only(workspace):
    """synth.open: a stage's table, a query with parameters, Arrow, the relations; no write method, and a
    writing statement fails with one line saying the reader is read-only (the store is unchanged)."""
    import synth as synth_lib

    pipeline = graded_pipeline(workspace, questions=3, p=0.5, samples=2)
    synth_run(pipeline)
    store = synth_lib.open(pipeline)
    assert "read-only" in repr(store)
    assert len(store.table("solutions")) == 6 and len(store.table("synth.runs")) == 1
    assert store.sql("SELECT count(*) AS n FROM solutions WHERE input_id = ?", ["q1"]).n[0] == 2
    assert store.arrow("SELECT id FROM problems ORDER BY id").column("id").to_pylist() == ["q0", "q1", "q2"]
    assert {"problems", "solutions", "graded"} <= set(store.relations())
    for method in ("write", "writer", "start_run", "finish_run", "set_stage", "replace_table", "insert_arrow"):
        assert not hasattr(store, method), method
    with pytest.raises(SynthError, match="read-only"):
        store.sql("DELETE FROM synth.completions")
    assert len(store.table("synth.completions")) == 6
    with pytest.raises(SynthError, match="query failed"):
        store.table("no_such_stage")


def test_sql_json_writes_json_columns_as_json(workspace):
    """`synth sql --format json`: a DuckDB JSON column (params, parsed, ...) is a JSON value in the output,
    not a string holding JSON; text stays text; a statement without rows prints nothing."""
    pipeline = graded_pipeline(workspace, questions=2, p=1.0, samples=1)
    synth_run(pipeline)
    out = synth("sql", pipeline, "SELECT r.params, g.parsed, g.id, NULL::JSON AS nothing FROM synth.requests r "
                "JOIN synth.generations g USING (id) ORDER BY g.id LIMIT 1", "--format", "json", check=True).stdout
    row = json.loads(out)
    assert row["params"] == {"temperature": 1.0, "max_tokens": 16, "seed": 0}
    assert isinstance(row["parsed"], dict) and "answer" in row["parsed"]
    assert isinstance(row["id"], str) and row["nothing"] is None
    assert synth("sql", pipeline, "SET threads = 1", "--format", "json", check=True).stdout == ""
