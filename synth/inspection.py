"""Read-only views of a store for people: status, sql, show, why. Nothing here writes.

Every function opens short read-only connections (see store.py), so all of them answer while a
`synth run` is writing in another process, waiting at most one batch write for the lock.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from synth.errors import SynthError, one_line
from synth.explore import cell, row_panel
from synth.ids import sample_seed
from synth.store import fetch_one, has_table, Store, quote_ident, rejection_reasons


def store_for(path: Path) -> Store:
    """A .duckdb file is the store itself; a pipeline file names its store."""
    # the pipeline file's schema and the store-path rules only when a pipeline file is given: `synth sql
    # out/run.duckdb` and synth.open on a store skip their ~0.2 s of imports
    from synth.config import read_pipeline_file
    from synth.graph import store_path_of

    path = Path(path).resolve()
    if path.suffix in (".duckdb", ".db"):
        return Store(path)
    spec = read_pipeline_file(path)
    return Store(store_path_of(path, spec))


JSON_FIELD = {b"synth.type": b"json"}  # Arrow field metadata: the column is DuckDB JSON (Arrow sees a string)


def run_query(store: Store, query: str):
    """The query's rows as an Arrow table; a DuckDB JSON column is marked (JSON_FIELD), so that
    `--format json` writes its value as JSON, not as a string of JSON."""
    import duckdb
    import pyarrow as pa

    try:
        with store.read() as con:
            rel = con.sql(query)
            if rel is None:  # a statement without rows (SET, PRAGMA, ...)
                return pa.table({})
            types = [str(t) for t in rel.types]
            table = rel.to_arrow_table()
    except duckdb.Error as exc:
        raise SynthError(f"{store.path}: query failed: {one_line(exc)}") from None
    fields = [f.with_metadata(JSON_FIELD) if t == "JSON" else f for f, t in zip(table.schema, types)]
    return table.cast(pa.schema(fields)) if fields else table


def format_rows(table, fmt: str, console: Console, max_width: int = 60) -> None:
    """Print an Arrow table as a rich table, CSV or JSON lines."""
    rows = table.to_pylist()
    if fmt == "json":
        json_columns = [f.name for f in table.schema if (f.metadata or {}).get(b"synth.type") == b"json"]
        for row in rows:
            for name in json_columns:
                if row[name] is not None:
                    row[name] = json.loads(row[name])
            console.print_json(json.dumps(row, default=str, ensure_ascii=False)) if console.is_terminal else \
                print(json.dumps(row, default=str, ensure_ascii=False))
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")  # not the csv module's \r\n: ids piped into `synth why`
        writer.writerow(table.column_names)
        for row in rows:
            writer.writerow([cell(v) for v in row.values()])
        print(buf.getvalue(), end="")
        return
    out = Table(show_lines=False)
    for name in table.column_names:
        out.add_column(name, overflow="fold", max_width=max_width)
    for row in rows:
        out.add_row(*[Text(cell(v, max_width * 3)) for v in row.values()])
    console.print(out)
    console.print(f"[dim]{len(rows)} row{'' if len(rows) == 1 else 's'}[/dim]")


def status_rows(pipeline) -> list[dict]:
    """Per stage: kind, fresh/stale and why, rows, and for generate stages requests done, failed,
    pending and tokens (score stages: sequences scored, failed, pending and tokens scored), counted live
    from the store."""
    # the orchestrator imports every stage kind (~0.8 s): only `synth status` needs it, not sql/show/why
    from synth.pipeline import staleness

    store = pipeline.store
    states = store.stage_states()
    statuses = staleness(pipeline, states)
    counts: dict[str, dict] = {}
    if store.exists() and states:
        with store.read() as con:
            for r in con.execute(
                    "SELECT g.stage, count(*) AS total, count(c.id) AS done, "
                    "count(*) FILTER (WHERE c.id IS NULL AND g.id IN (SELECT request_id FROM synth.errors e "
                    "WHERE e.stage = g.stage)) AS failed, coalesce(sum(c.completion_tokens), 0) AS tokens, "
                    "coalesce(sum(c.prompt_tokens), 0) AS prompt_tokens "
                    "FROM synth.generations g LEFT JOIN synth.completions c USING (id) GROUP BY g.stage").fetchall():
                counts[r[0]] = {"requests": r[1], "done": r[2], "failed": r[3], "pending": r[1] - r[2] - r[3],
                                "completion_tokens": int(r[4]), "prompt_tokens": int(r[5])}
            if has_table(con, "synth", "scores"):  # a store from before migration 13 has none
                for r in con.execute(  # score stages: sequences to score, scored, failed; tokens scored
                        "SELECT s.stage, count(*), count(t.id), count(*) FILTER (WHERE t.id IS NULL AND s.score_id IN "
                        "(SELECT request_id FROM synth.errors e WHERE e.stage = s.stage)), "
                        "coalesce(sum(len(t.token_ids)), 0) FROM synth.scores s "
                        "LEFT JOIN synth.token_logprobs t ON t.id = s.score_id GROUP BY s.stage").fetchall():
                    counts[r[0]] = {"requests": r[1], "done": r[2], "failed": r[3], "pending": r[1] - r[2] - r[3],
                                    "completion_tokens": int(r[4]), "prompt_tokens": 0}
    for name, c in counts.items():  # spend: the stage's tokens at its teacher's prices, when it has them
        prices = pipeline.prices(name)
        c["cost"] = prices.cost(c["prompt_tokens"], c["completion_tokens"]) if prices else None
    rows = []
    for name in pipeline.order:
        st, state = statuses[name], states.get(name, {})
        row = {"stage": name, "kind": st.kind, "state": state.get("status", "-"),
               "fresh": "stale" if st.stale else "fresh", "why": st.reason, "rows": state.get("rows")}
        row.update(counts.get(name, {}))
        rows.append(row)
    return rows


def rounds_line(pipeline, rows: list[dict]) -> str:
    """`rounds:` in one line: per round whether its stages are all done, some, none, or stopped by the rule."""
    by_round: dict[int, list[dict]] = {}
    for r in rows:
        by_round.setdefault(pipeline.round_number(r["stage"]), []).append(r)
    parts = []
    for number in sorted(n for n in by_round if n):
        stages = by_round[number]
        done = sum(1 for r in stages if r["state"] == "done" and r["fresh"] == "fresh")
        stopped = any(r["why"].startswith("not run: the rounds stopped") for r in stages)
        state = "stopped" if stopped and not done else "done" if done == len(stages) else \
            "running" if any(r["state"] == "running" for r in stages) else f"{done}/{len(stages)} stages done"
        parts.append(f"round {number} {state}")
    why = next((r["why"] for r in rows if r["why"].startswith("not run: the rounds stopped")), "")
    return f"rounds ({pipeline.spec.rounds.count}): " + ", ".join(parts) + (f" — {why[len('not run: '):]}" if why else "")


def last_runs(store: Store, n: int = 5) -> list[dict]:
    if not store.exists():
        return []
    with store.read() as con:
        cur = con.execute("SELECT id, command, status, started_at, ended_at, counts FROM synth.runs "
                          "ORDER BY started_at DESC LIMIT ?", [n])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def print_status(pipeline, console: Console) -> None:
    rows = status_rows(pipeline)
    table = Table(title=f"{pipeline.path.name} → {pipeline.store.path}")
    for col in ("stage", "kind", "fresh", "rows", "requests", "done", "failed", "pending", "tokens", "cost", "why"):
        table.add_column(col, justify="right" if col in ("rows", "requests", "done", "failed", "pending",
                                                          "tokens", "cost") else "left")
    for r in rows:
        cost = "" if r.get("cost") is None else f"${r['cost']:,.4f}"
        table.add_row(r["stage"], r["kind"], r["fresh"] if r["state"] != "running" else "running",
                      *[cell(r.get(k)) for k in ("rows", "requests", "done", "failed", "pending")],
                      cell(r.get("completion_tokens")), cost, r["why"])
    console.print(table)
    if pipeline.round_of:
        console.print(rounds_line(pipeline, rows), highlight=False)
    for line in open_batches(pipeline.store):
        console.print(line, highlight=False)
    for run in last_runs(pipeline.store, 3):
        counts = json.loads(run["counts"]) if run["counts"] else {}
        console.print(f"[dim]run {run['id']} {run['command']} {run['status']} started {run['started_at']:%Y-%m-%d %H:%M:%S} "
                      f"sent {counts.get('sent', '-')} errors {counts.get('errors', '-')}[/dim]")


def open_batches(store: Store) -> list[str]:
    """One line per Batch API batch that has not ended (mode: batch), with its server-side counts, as
    last polled: a job that takes hours shows where it stands."""
    if not store.exists():
        return []
    with store.read() as con:
        if not has_table(con, "synth", "batches"):
            return []
        rows = con.execute("SELECT stage, batch_id, status, requests, detail, updated_at FROM synth.batches WHERE "
                           "status IN ('uploaded', 'validating', 'in_progress', 'finalizing', 'cancelling') "
                           "ORDER BY submitted_at").fetchall()
    lines = []
    for stage, batch_id, status, requests, detail, updated in rows:
        counts = (json.loads(detail) if detail else {}).get("request_counts") or {}
        done = f"{counts.get('completed', 0)} done, {counts.get('failed', 0)} failed of " if counts else ""
        lines.append(f"batch {batch_id or '(being created)'} of {stage}: {status}, {done}{requests} requests "
                     f"(checked {updated:%Y-%m-%d %H:%M:%S})")
    return lines


def show(store: Store, stage: str, n: int, console: Console) -> None:
    table = run_query(store, f"SELECT * FROM {quote_ident(stage)} LIMIT {int(n)}") \
        if stage in _relations(store) else None
    if table is None:
        raise SynthError(f"{store.path}: no stage output named {stage!r} (have: {', '.join(_relations(store)) or 'none'})")
    for i, row in enumerate(table.to_pylist(), start=1):
        console.print(row_panel(row, f"{stage} #{i}"))


def _relations(store: Store) -> list[str]:
    return store.relations()


def why(store: Store, row_id: str, console: Console) -> None:
    """What an id names, and where it came from. Any row id a user meets:
    - a request id (a generate stage's row; or a unique prefix of one): the request (teacher, model,
      params, sample), the rendered messages, the input row, the completion, errors, verdicts, the run;
    - a pair id (`chosen_id:rejected_id`, a pairs stage's row): the rule, margin and both samples;
    - a scored sequence (a score stage's `score_id`): what was scored, by which teacher, its tokens;
    - an input row id (a load stage's row, or any row a filter judged): the row, the requests made from
      it per stage with their verdicts, its pairs and its evaluations.
    The first line says which of these it is."""
    with store.read() as con:
        if fetch_one(con, "SELECT 1 FROM synth.requests WHERE id = ?", [row_id]):
            parts = _request_lineage(con, row_id)
        elif (found := _pair_lineage(con, row_id) or _score_lineage(con, row_id) or _row_lineage(con, row_id)):
            parts = found
        else:
            matches = [r[0] for r in con.execute("SELECT id FROM synth.requests WHERE starts_with(id, ?) LIMIT 2",
                                                 [row_id]).fetchall()]
            if len(matches) != 1:
                raise SynthError(f"{store.path}: no request, pair, scored sequence or input row with id {row_id!r}"
                                 + (" (the prefix is ambiguous: give more of it)" if matches else
                                    "; `synth sql` on a stage's table shows its ids"))
            parts = _request_lineage(con, matches[0])
    console.print(Group(*parts))


def _request_lineage(con, rid: str) -> list:
    """A request: teacher, params, input row, messages, completion, errors, verdicts, run."""
    import duckdb

    _, model, params, sample, messages = fetch_one(
        con, "SELECT r.id, r.model, r.params, r.sample, p.messages FROM synth.requests r "
             "JOIN synth.prompts p ON p.id = r.prompt_id WHERE r.id = ?", [rid])
    members = con.execute("SELECT stage, input_id, teacher, parsed FROM synth.generations WHERE id = ?",
                          [rid]).fetchall()
    comp = fetch_one(con, "SELECT text, finish_reason, prompt_tokens, completion_tokens, latency_s, run_id, "
                          "created_at FROM synth.completions WHERE id = ?", [rid])
    errors = con.execute("SELECT stage, cause, message, run_id, created_at FROM synth.errors "
                         "WHERE request_id = ? ORDER BY created_at", [rid]).fetchall()
    verdicts = _verdicts(con, rid)
    earlier = _earlier_verdicts(con, rid)
    run = fetch_one(con, "SELECT id, command, argv, started_at, status FROM synth.runs WHERE id = ?",
                    [comp[5]]) if comp else None
    inputs = []
    for stage, input_id, _, _ in members:
        src = fetch_one(con, "SELECT json_extract_string(detail, '$.input_runs') FROM synth.stages WHERE name = ?",
                        [stage])
        for inp in (json.loads(src[0]) if src and src[0] else {}):
            try:
                found = _rows_where(con, f"SELECT * FROM {quote_ident(inp)} WHERE id = ?", [input_id])
            except duckdb.Error:  # the input stage's output is gone (renamed or dropped)
                continue
            inputs.append((inp, found[0] if found else {"id": input_id, "note": "no longer in the input"}))

    p = json.loads(params)
    parts = [Text.assemble(("request ", "bold"), rid, (" (a generate stage's row)", "dim"))]
    for stage, input_id, teacher, parsed in members:
        parts.append(Text(f"stage {stage} · teacher {teacher} · input_id {input_id} · parsed {parsed}"))
    parts.append(Text(f"model {model} · sample {sample} · sent seed {sample_seed(p.get('seed'), sample)} · "
                      f"params {json.dumps(p)}"))
    for inp, row in inputs:
        parts.append(Panel(cell(row), title=f"input row ({inp})", title_align="left"))
    for m in json.loads(messages):
        parts.append(Panel(m["content"], title=m["role"], title_align="left"))
    if comp:
        parts.append(Panel(comp[0] or "", title=f"completion · {comp[1]} · {comp[2]}+{comp[3]} tokens · "
                                               f"{(comp[4] or 0):.2f}s", title_align="left"))
    else:
        parts.append(Text("no completion yet", style="yellow"))
    for e in errors:
        parts.append(Text(f"error in {e[0]}: {e[1]}: {e[2]} (run {e[3]})", style="red"))
    parts += _verdict_lines(verdicts)
    parts += _earlier_lines(earlier)
    if run:
        parts.append(Text(f"written by run {run[0]} ({run[1]} {' '.join(json.loads(run[2]))}, "
                          f"started {run[3]:%Y-%m-%d %H:%M:%S}, {run[4]})"))
    return parts


def _pair_lineage(con, pair_id: str) -> list | None:
    """A preference pair (`chosen_id:rejected_id`): its stages, rule, margin and both samples."""
    chosen_id, _, rejected_id = pair_id.partition(":")
    rows = con.execute("SELECT h.stage, h.input_id, h.rule, h.margin, h.run_id, s.name IS NOT NULL "
                       "FROM synth.pair_history h LEFT JOIN synth.stages s ON s.name = h.stage AND s.run_id = h.run_id "
                       "WHERE h.chosen_id = ? AND h.rejected_id = ? ORDER BY h.created_at", [chosen_id, rejected_id]
                       ).fetchall() if rejected_id else []
    if not rows:
        return None
    parts = [Text.assemble(("pair ", "bold"), pair_id, (" (a pairs stage's row)", "dim"))]
    for stage, input_id, rule, margin, run_id, current in rows:
        parts.append(Text(f"stage {stage} · input_id {input_id} · rule {rule}"
                          + ("" if margin is None else f" · margin {margin:g}") + f" · run {run_id}"
                          + ("" if current else " (an earlier run's pair)")))
    for label, rid in (("chosen", chosen_id), ("rejected", rejected_id)):
        text = fetch_one(con, "SELECT text FROM synth.completions WHERE id = ?", [rid])
        parts.append(Panel(text[0] if text and text[0] is not None else "(no completion)",
                           title=f"{label} · request {rid}", title_align="left"))
        parts += _verdict_lines(_verdicts(con, rid))
    parts.append(Text(f"each sample's lineage: synth why <store> {chosen_id} (or {rejected_id})", style="dim"))
    return parts


def _score_lineage(con, score_id: str) -> list | None:
    """A sequence a score stage had its teacher score: which row, which stage, how many tokens, top-k."""
    if not has_table(con, "synth", "scores"):  # a store from before migration 13
        return None
    rows = con.execute("SELECT s.stage, s.id, s.tokens_from, len(t.token_ids), t.tokenizer "
                       "FROM synth.scores s LEFT JOIN synth.token_logprobs t ON t.id = s.score_id "
                       "WHERE s.score_id = ? ORDER BY s.stage", [score_id]).fetchall()
    if not rows:
        return None
    parts = [Text.assemble(("scored sequence ", "bold"), score_id, (" (a score stage's score_id)", "dim"))]
    for stage, row_id, tokens_from, tokens, tokenizer in rows:
        state = f"{tokens} tokens scored (tokenizer {tokenizer})" if tokens is not None else "not scored yet"
        parts.append(Text(f"stage {stage} · the completion of {row_id} · its tokens from {tokens_from} · {state}"))
    parts.append(Text(f"the sequence's own lineage: synth why <store> {rows[0][1]}", style="dim"))
    return parts


def _row_lineage(con, row_id: str) -> list | None:
    """An input row (a load stage's table, or any row a filter judged): the row, the requests made from
    it per stage with their verdicts, its pairs and evaluations."""
    found = []
    for (table,) in con.execute(
            "SELECT t.table_name FROM information_schema.tables t JOIN information_schema.columns c ON "
            "c.table_schema = t.table_schema AND c.table_name = t.table_name WHERE t.table_schema = 'main' AND "
            "t.table_type = 'BASE TABLE' AND c.column_name = 'id' ORDER BY 1").fetchall():
        found += [(table, r) for r in _rows_where(con, f"SELECT * FROM {quote_ident(table)} "
                                                       "WHERE CAST(id AS VARCHAR) = ?", [row_id])]
    verdicts, earlier = _verdicts(con, row_id), _earlier_verdicts(con, row_id)
    requests = con.execute(
        "SELECT g.stage, g.id, g.sample, g.parsed, c.id IS NOT NULL, "
        "(SELECT string_agg(v.stage || ': ' || CASE WHEN v.passed THEN 'passed' ELSE 'failed' || "
        "coalesce(' (' || v.reason || ')', '') END, ' · ' ORDER BY v.stage) FROM synth.verdicts v WHERE v.row_id = g.id) "
        "FROM synth.generations g LEFT JOIN synth.completions c ON c.id = g.id WHERE g.input_id = ? "
        "ORDER BY g.stage, g.sample, g.id", [row_id]).fetchall()
    if not (found or verdicts or earlier or requests):
        return None
    where = ", ".join(sorted({t for t, _ in found})) or "no stage table (the rows it was judged in)"
    parts = [Text.assemble(("input row ", "bold"), row_id, (f" (a row of {where})", "dim"))]
    for table, row in found:
        parts.append(Panel(cell(row), title=f"row of {table}", title_align="left"))
    parts += _verdict_lines(verdicts)
    parts += _earlier_lines(earlier)
    shown: dict[str, int] = {}
    for stage, rid, sample, parsed, done, judged in requests:
        shown[stage] = shown.get(stage, 0) + 1
        if shown[stage] > ROW_REQUESTS_SHOWN:
            continue
        parts.append(Text(f"{stage} sample {sample} · request {rid} · "
                          + (f"parsed {parsed}" if done else "no completion yet") + (f" · {judged}" if judged else "")))
    for stage, n in shown.items():
        if n > ROW_REQUESTS_SHOWN:
            parts.append(Text(f"{stage}: and {n - ROW_REQUESTS_SHOWN} more requests", style="dim"))
    for stage, n in con.execute("SELECT stage, count(*) FROM synth.pairs WHERE input_id = ? GROUP BY stage "
                                "ORDER BY stage", [row_id]).fetchall():
        parts.append(Text(f"{stage}: {n} preference pair{'' if n == 1 else 's'} from its samples"))
    for stage, model, n, passed in con.execute(
            "SELECT stage, model, count(*), count(*) FILTER (WHERE passed) FROM synth.evaluations "
            "WHERE input_id = ? GROUP BY stage, model ORDER BY stage, model", [row_id]).fetchall():
        parts.append(Text(f"evaluated in {stage}: {model} right {passed} of {n}"))
    return parts


ROW_REQUESTS_SHOWN = 12  # per stage, in `synth why` of an input row


def _rows_where(con, sql: str, params: list) -> list[dict]:
    cur = con.execute(sql, params)
    columns = [d[0] for d in cur.description]
    return [dict(zip(columns, r)) for r in cur.fetchall()]


def _verdicts(con, row_id: str) -> list[tuple]:
    return con.execute("SELECT stage, passed, score, reason, details FROM synth.verdicts WHERE row_id = ? "
                       "ORDER BY stage", [row_id]).fetchall()


def _verdict_lines(verdicts: list[tuple]) -> list[Text]:
    lines = []
    for stage, passed, score, reason, details in verdicts:
        mark = ("passed", "green") if passed else ("failed", "red")
        lines.append(Text.assemble(("verdict ", "bold"), f"{stage}: ", mark, "" if score is None else f" · score {score:g}",
                                   f" · {reason}" if reason else "", f" · {_short_details(details)}" if details else ""))
    return lines


def _earlier_verdicts(con, row_id: str) -> list[tuple]:
    """The row's verdicts from earlier runs of its filter stages (another filter version, or before a
    re-run): nothing is deleted, the current ones are in synth.verdicts."""
    import duckdb

    try:
        return con.execute("SELECT h.stage, h.passed, h.score, h.reason, h.details, h.version, h.run_id "
                           "FROM synth.verdict_history h LEFT JOIN synth.stages s ON s.name = h.stage AND "
                           "s.run_id = h.run_id WHERE h.row_id = ? AND s.name IS NULL ORDER BY h.stage, h.created_at",
                           [row_id]).fetchall()
    except duckdb.CatalogException:  # a store from before migration 10 that no run has opened for writing yet
        return []


def _earlier_lines(earlier: list[tuple]) -> list[Text]:
    lines = []
    for stage, passed, score, reason, details, version, run_id in earlier:
        mark = ("passed", "green") if passed else ("failed", "red")
        lines.append(Text.assemble(("earlier ", "dim bold"), f"{stage} (run {run_id}, version {version[:12]}): ", mark,
                                   "" if score is None else f" · score {score:g}", f" · {reason}" if reason else "",
                                   f" · {_short_details(details)}" if details else "", style="dim"))
    return lines


def _short_details(details: str, limit: int = 160) -> str:
    text = one_line(details)
    return text if len(text) <= limit else text[:limit] + "…"


# ---- the filter funnel ----------------------------------------------------------------------------

def stats_rows(pipeline) -> list[dict]:
    """Per filter stage: rows judged, passed, rejected and the top rejection reasons; per keep stage:
    rows kept of its input; per mix stage: rows available and taken, and per input (a teacher and its
    filters) its funnel and price (`sources`, mix_sources). Reasons that carry a row id or file
    (duplicate_of:<id>) are grouped."""
    names = [n for n in pipeline.order if pipeline.kind(n).same_rows or pipeline.stage(n).kind == "mix"]
    if not names or not pipeline.store.exists():
        return []
    out = []
    with pipeline.store.read() as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                          "WHERE table_schema = 'main'").fetchall()}
        for name in names:
            stage = pipeline.stage(name)
            row = {"stage": name, "kind": stage.kind,
                   "input": ", ".join(stage.inputs) if stage.kind == "mix" else stage.input}
            if name not in have:
                out.append({**row, "judged": None})
                continue
            if stage.kind == "mix":
                sources = mix_sources(con, pipeline, name)
                available, taken = sum(x["kept"] for x in sources), sum(x["taken"] for x in sources)
                out.append({**row, "judged": available, "passed": taken, "rejected": available - taken, "reasons": [],
                            "sources": sources})
                continue
            if stage.kind == "keep":
                kept = fetch_one(con, f"SELECT count(*) FROM {quote_ident(name)}")[0]
                total = fetch_one(con, f"SELECT count(*) FROM {quote_ident(stage.input)}")[0]
                out.append({**row, "judged": total, "passed": kept, "rejected": total - kept, "reasons": [],
                            "cost_per_kept": _cost_per_kept(con, pipeline, name, kept)})
                continue
            judged, passed = fetch_one(con, "SELECT count(*), count(*) FILTER (WHERE passed) FROM synth.verdicts "
                                            "WHERE stage = ?", [name])
            out.append({**row, "judged": judged, "passed": passed, "rejected": judged - passed,
                        "reasons": [{"reason": r, "rows": n} for _, r, n in rejection_reasons(con, [name], 5)]})
    return out


def mix_sources(con, pipeline, name: str) -> list[dict]:
    """Per input of a mix stage (a teacher and its filters): the teacher, its samples, the rows its filters
    kept, the rows the mix took, and what its generation cost per kept and per taken row (with prices)."""
    stage = pipeline.stage(name)
    taken = dict(con.execute(f"SELECT source, count(*) FROM {quote_ident(name)} GROUP BY source").fetchall())
    out = []
    for inp in stage.inputs:
        root = pipeline.root(inp)
        samples = fetch_one(con, "SELECT count(*) FROM synth.generations WHERE stage = ?", [root])[0]
        kept = fetch_one(con, f"SELECT count(*) FROM {quote_ident(inp)}")[0]
        row = {"input": inp, "teacher": pipeline.stage(root).teacher, "samples": samples, "kept": kept,
               "taken": taken.get(inp, 0), "cost": None, "cost_per_kept": None, "cost_per_taken": None}
        row["cost"] = generation_cost(con, pipeline, root)
        if row["cost"] is not None:
            row["cost_per_kept"] = row["cost"] / kept if kept else None
            row["cost_per_taken"] = row["cost"] / row["taken"] if row["taken"] else None
        out.append(row)
    return out


def _cost_per_kept(con, pipeline, name: str, kept: int) -> float | None:
    """What the generation behind a keep stage cost (all its samples, kept or not) per kept row."""
    cost = generation_cost(con, pipeline, pipeline.root(name))
    return None if cost is None or not kept else cost / kept


def generation_cost(con, pipeline, stage: str) -> float | None:
    """What a generate stage's answers cost at its teacher's prices (None: the teacher has none)."""
    prices = pipeline.prices(stage)
    if prices is None:
        return None
    tokens_in, tokens_out = fetch_one(con, "SELECT coalesce(sum(c.prompt_tokens), 0), coalesce(sum(c.completion_tokens), 0) "
                                           "FROM synth.generations g JOIN synth.completions c USING (id) "
                                           "WHERE g.stage = ?", [stage])
    return prices.cost(tokens_in, tokens_out)


def print_stats(pipeline, console: Console) -> None:
    rows = stats_rows(pipeline)
    if not rows:
        console.print("no filter or keep stages have run yet")
        return
    table = Table(title=f"filter funnel · {pipeline.path.name}")
    for col in ("stage", "kind", "input", "judged", "passed", "rejected", "pass rate", "top rejection reasons"):
        table.add_column(col, justify="right" if col in ("judged", "passed", "rejected", "pass rate") else "left")
    for r in rows:
        if r["judged"] is None:
            table.add_row(r["stage"], r["kind"], r["input"], "not run", "", "", "", "")
            continue
        rate = f"{r['passed'] / r['judged']:.1%}" if r["judged"] else "-"
        reasons = ", ".join(f"{x['reason']} {x['rows']}" for x in r["reasons"])
        if r.get("cost_per_kept") is not None:
            reasons = f"cost per kept row ${r['cost_per_kept']:,.4f}"
        table.add_row(r["stage"], r["kind"], r["input"], str(r["judged"]), str(r["passed"]), str(r["rejected"]),
                      rate, reasons)
    console.print(table)
    money = lambda v: "-" if v is None else f"${v:,.4f}"  # noqa: E731
    for r in rows:
        if r.get("sources"):
            per = Table(title=f"mix '{r['stage']}': per teacher (its samples, kept by its filters, taken by the mix)")
            for col in ("input", "teacher", "samples", "kept", "kept rate", "taken", "cost", "per kept row",
                        "per taken row"):
                per.add_column(col, justify="left" if col in ("input", "teacher") else "right")
            for x in r["sources"]:
                per.add_row(x["input"], x["teacher"], str(x["samples"]), str(x["kept"]),
                            f"{x['kept'] / x['samples']:.1%}" if x["samples"] else "-", str(x["taken"]),
                            money(x["cost"]), money(x["cost_per_kept"]), money(x["cost_per_taken"]))
            console.print(per)
