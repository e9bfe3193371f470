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
from synth.ids import sample_seed
from synth.store import fetch_one, Store, quote_ident, rejection_reasons


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


def run_query(store: Store, query: str):
    import duckdb

    try:
        with store.read() as con:
            return con.sql(query).to_arrow_table()
    except duckdb.Error as exc:
        raise SynthError(f"{store.path}: query failed: {one_line(exc)}") from None


def format_rows(table, fmt: str, console: Console, max_width: int = 60) -> None:
    """Print an Arrow table as a rich table, CSV or JSON lines."""
    rows = table.to_pylist()
    if fmt == "json":
        for row in rows:
            console.print_json(json.dumps(row, default=str, ensure_ascii=False)) if console.is_terminal else \
                print(json.dumps(row, default=str, ensure_ascii=False))
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")  # not the csv module's \r\n: ids piped into `synth why`
        writer.writerow(table.column_names)
        for row in rows:
            writer.writerow([_cell(v) for v in row.values()])
        print(buf.getvalue(), end="")
        return
    out = Table(show_lines=False)
    for name in table.column_names:
        out.add_column(name, overflow="fold", max_width=max_width)
    for row in rows:
        out.add_row(*[Text(_cell(v, max_width * 3)) for v in row.values()])
    console.print(out)
    console.print(f"[dim]{len(rows)} rows[/dim]")


def _cell(value, limit: int | None = None) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


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
            if fetch_one(con, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'synth' "
                              "AND table_name = 'scores'")[0]:  # a store from before migration 13 has none
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
                      *[_cell(r.get(k)) for k in ("rows", "requests", "done", "failed", "pending")],
                      _cell(r.get("completion_tokens")), cost, r["why"])
    console.print(table)
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
        if not fetch_one(con, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'synth' "
                              "AND table_name = 'batches'")[0]:
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
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column(overflow="fold")
        for key, value in row.items():
            grid.add_row(key, _cell(value))
        console.print(Panel(grid, title=f"{stage} #{i}", title_align="left"))


def _relations(store: Store) -> list[str]:
    return store.relations()


def why(store: Store, row_id: str, console: Console) -> None:
    """Lineage of a row: its request (teacher, model, params, sample), the rendered messages, the input
    row it came from, the completion and the run that wrote it, and any errors on the way."""
    import duckdb

    with store.read() as con:
        req = fetch_one(con, "SELECT r.id, r.model, r.params, r.sample, p.messages FROM synth.requests r "
                          "JOIN synth.prompts p ON p.id = r.prompt_id WHERE r.id = ?", [row_id])
        if req is None:
            matches = con.execute("SELECT id FROM synth.requests WHERE starts_with(id, ?) LIMIT 2", [row_id]).fetchall()
            if len(matches) == 1:
                return why(store, matches[0][0], console)
            verdicts = con.execute("SELECT stage, passed, score, reason, details FROM synth.verdicts "
                                   "WHERE row_id = ? ORDER BY stage", [row_id]).fetchall()
            earlier = _earlier_verdicts(con, row_id)
            if (verdicts or earlier) and not matches:  # a row that is not a generation (a seed row): its verdicts
                console.print(Group(Text.assemble(("row ", "bold"), row_id), *_verdict_lines(verdicts),
                                    *_earlier_lines(earlier)))
                return
            raise SynthError(f"{store.path}: no request with id {row_id!r}" +
                             (" (the prefix is ambiguous)" if matches else ""))
        rid, model, params, sample, messages = req
        members = con.execute("SELECT stage, input_id, teacher, parsed FROM synth.generations WHERE id = ?",
                              [rid]).fetchall()
        comp = fetch_one(con, "SELECT text, finish_reason, prompt_tokens, completion_tokens, latency_s, run_id, "
                           "created_at FROM synth.completions WHERE id = ?", [rid])
        errors = con.execute("SELECT stage, cause, message, run_id, created_at FROM synth.errors "
                             "WHERE request_id = ? ORDER BY created_at", [rid]).fetchall()
        verdicts = con.execute("SELECT stage, passed, score, reason, details FROM synth.verdicts WHERE row_id = ? "
                               "ORDER BY stage", [rid]).fetchall()
        earlier = _earlier_verdicts(con, rid)
        run = fetch_one(con, "SELECT id, command, argv, started_at, status FROM synth.runs WHERE id = ?",
                          [comp[5]]) if comp else None
        inputs = []
        for stage, input_id, _, _ in members:
            src = fetch_one(con, "SELECT json_extract_string(detail, '$.input_runs') FROM synth.stages WHERE name = ?",
                              [stage])
            for inp in (json.loads(src[0]) if src and src[0] else {}):
                try:
                    row = con.execute(f"SELECT * FROM {quote_ident(inp)} WHERE id = ?", [input_id]).to_arrow_table()
                except duckdb.Error:  # the input stage's output is gone (renamed or dropped)
                    continue
                inputs.append((inp, row.to_pylist()[0] if row.num_rows else {"id": input_id, "note": "no longer in the input"}))

    p = json.loads(params)
    parts = [Text.assemble(("request ", "bold"), rid)]
    for stage, input_id, teacher, parsed in members:
        parts.append(Text(f"stage {stage} · teacher {teacher} · input_id {input_id} · parsed {parsed}"))
    parts.append(Text(f"model {model} · sample {sample} · sent seed {sample_seed(p.get('seed'), sample)} · "
                      f"params {json.dumps(p)}"))
    for inp, row in inputs:
        parts.append(Panel(_cell(row), title=f"input row ({inp})", title_align="left"))
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
    console.print(Group(*parts))


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
    rows kept of its input. Reasons that carry a row id or file (duplicate_of:<id>) are grouped."""
    names = [n for n in pipeline.order if pipeline.kind(n).same_rows]  # the filters and keeps
    if not names or not pipeline.store.exists():
        return []
    out = []
    with pipeline.store.read() as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                          "WHERE table_schema = 'main'").fetchall()}
        for name in names:
            stage = pipeline.stage(name)
            row = {"stage": name, "kind": stage.kind, "input": stage.input}
            if name not in have:
                out.append({**row, "judged": None})
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


def _cost_per_kept(con, pipeline, name: str, kept: int) -> float | None:
    """What the generation behind a keep stage cost (all its samples, kept or not) per kept row."""
    root = pipeline.root(name)
    prices = pipeline.prices(root)
    if prices is None or not kept:
        return None
    tokens_in, tokens_out = fetch_one(con, "SELECT coalesce(sum(c.prompt_tokens), 0), coalesce(sum(c.completion_tokens), 0) "
                                           "FROM synth.generations g JOIN synth.completions c USING (id) "
                                           "WHERE g.stage = ?", [root])
    return prices.cost(tokens_in, tokens_out) / kept


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
