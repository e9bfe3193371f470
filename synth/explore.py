"""Exploring a store, read-only, like `llm logs`: `synth sample` (random rows of a stage, by verdict),
`synth grep` (full text over completions, prompts and load tables), `synth diff` (two stages, or one stage
across two runs). Nothing here writes: every query runs on a short `Store.read()` connection.

Each command has a function that computes plain data (`sample_rows`, `grep_hits`, `diff_stages`,
`diff_runs`: dicts and lists, what `--format json` prints) and one that prints it (`print_sample`,
`print_grep`, `print_diff`). A user's mistake (an unknown stage, reason or run, a bad regex, a stage with
no text) is one SynthError line naming what was wrong and what to do.

This module imports only the layer below the commands (store, errors), so that inspection.py can use its
`row_panel` (the panel of one row, `synth show`'s layout) without a circle.
"""

from __future__ import annotations

import json
import re

import duckdb
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from synth.errors import SynthError, one_line
from synth.store import fetch_one, quote_ident, rejection_reasons, Store

# ---- shared --------------------------------------------------------------------------------------


def row_panel(row: dict, title: str, below: list | None = None) -> Panel:
    """One row as a panel: a column name and its value per line (`synth show`'s layout), then `below`
    (verdict lines, ...). Values are Text, never rich markup: a completion holding "[bold]" prints as is."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in row.items():
        grid.add_row(key, Text(cell(value)))
    return Panel(Group(grid, *below) if below else grid, title=Text(title), title_align="left")


def cell(value, limit: int | None = None) -> str:
    """A value as one printable string: text as is, anything else as JSON; cut at `limit` characters."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _say(console: Console, line: str) -> None:
    """A line as plain text: a stage name, reason or pattern holding "[...]" is not rich markup."""
    console.print(Text(line))


def _json_line(obj) -> None:
    """One JSON object on one line of stdout (`--format json`: pipe it into jq)."""
    print(json.dumps(obj, default=str, ensure_ascii=False), flush=True)


def _relations(con) -> dict[str, str]:
    """The main schema's relations: name -> 'BASE TABLE' (a load stage's rows) or 'VIEW'."""
    return dict(con.execute("SELECT table_name, table_type FROM information_schema.tables "
                            "WHERE table_schema = 'main' ORDER BY table_name").fetchall())


def _columns(con, name: str) -> dict[str, str]:
    """A main-schema relation's columns: name -> DuckDB type."""
    return dict(con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = "
                            "'main' AND table_name = ? ORDER BY ordinal_position", [name]).fetchall())


def _need_stage(store: Store, con, stage: str) -> None:
    have = _relations(con)
    if stage not in have:
        raise SynthError(f"{store.path}: no stage output named {stage!r} (have: {', '.join(have) or 'none'})")


def _kind(con, stage: str) -> str | None:
    """The stage's kind as its last run recorded it (synth.stages), None for a relation no stage made."""
    row = fetch_one(con, "SELECT kind FROM synth.stages WHERE name = ?", [stage])
    return row[0] if row else None


def _has_column(con, schema: str, table: str, column: str) -> bool:
    return bool(fetch_one(con, "SELECT count(*) FROM information_schema.columns WHERE table_schema = ? AND "
                               "table_name = ? AND column_name = ?", [schema, table, column])[0])


def _filters(con) -> list[str]:
    """Stages with current verdicts (the filter stages that ran)."""
    return [r[0] for r in con.execute("SELECT DISTINCT stage FROM synth.verdicts ORDER BY 1").fetchall()]


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


# ---- synth sample ----------------------------------------------------------------------------------

def sample_rows(store: Store, stage: str, n: int = 5, seed: int = 0, reason: str | None = None,
                filter_stage: str | None = None, failed: bool = False, passed: bool = False) -> dict:
    """N random rows of STAGE's output (any relation of the main schema), reproducibly.

    The order is md5(id || ':' || seed) (ties, rows sharing an id, by the row's hash): the same seed gives
    the same rows on any machine, a row's place does not depend on the other rows, so a narrower selection
    under the same seed keeps the wider one's order; a stage without an `id` column is ordered by md5 of
    the whole row.
    - `reason`: only rows that a filter stage (or `filter_stage` only) rejected with that reason in its
      current run (synth.verdicts); `duplicate_of` also matches `duplicate_of:<id>` (the part before ':');
    - `failed` / `passed`: only rows `filter_stage` rejected / passed; `filter_stage` alone: rows it judged.
    Returns {stage, seed, total (rows matching), matching (what was asked, in words), rows: [{..., verdicts:
    [{stage, passed, reason}]}]}."""
    if failed and passed:
        raise SynthError("--failed and --passed exclude each other: give one (or neither, for every row judged)")
    if (failed or passed) and not filter_stage:
        raise SynthError(f"--{'failed' if failed else 'passed'} needs --filter F: the filter stage whose verdicts "
                         "select the rows")
    if reason is not None and passed:
        raise SynthError("--reason selects rejected rows and --passed passed ones: give one of them")
    with store.read() as con:
        _need_stage(store, con, stage)
        columns = _columns(con, stage)
        ident = quote_ident(stage)
        has_id = "id" in columns
        where, params, matching = [], [], []
        if reason is not None or filter_stage is not None:
            if not has_id:
                raise SynthError(f"{store.path}: {stage!r} has no id column, so no verdicts name its rows; "
                                 "--reason and --filter select rows by their verdicts")
            filters = _filters(con)
            if filter_stage is not None and filter_stage not in filters:
                raise SynthError(f"{store.path}: {filter_stage!r} is not a filter stage with verdicts "
                                 f"(filters: {', '.join(filters) or 'none has run'})")
            scope, scope_params = ("AND v.stage = ?", [filter_stage]) if filter_stage else ("", [])
            row_ids = "CAST(_synth_row.id AS VARCHAR)"
            if reason is not None:
                _check_reason(store, con, stage, reason, filter_stage)
                where.append(f"{row_ids} IN (SELECT v.row_id FROM synth.verdicts v WHERE NOT v.passed {scope} AND "
                             "(v.reason = ? OR split_part(v.reason, ':', 1) = ?))")
                params += scope_params + [reason, reason]
                matching.append(f"matching reason {reason}" + (f" ({filter_stage})" if filter_stage else ""))
            elif filter_stage is not None:
                verdict = "" if not (failed or passed) else ("AND v.passed" if passed else "AND NOT v.passed")
                where.append(f"{row_ids} IN (SELECT v.row_id FROM synth.verdicts v WHERE v.stage = ? {verdict})")
                params.append(filter_stage)
                matching.append(("that passed " if passed else "that failed " if failed else "judged by ")
                                + filter_stage)
        cond = " AND ".join(where) or "true"
        key = "CAST(_synth_row.id AS VARCHAR)" if has_id else "CAST(_synth_row AS VARCHAR)"
        total = fetch_one(con, f"SELECT count(*) FROM {ident} _synth_row WHERE {cond}", params)[0]
        rel = con.sql(f"SELECT _synth_row.* FROM {ident} _synth_row WHERE {cond} "
                      f"ORDER BY md5({key} || ':' || ?), hash(_synth_row) LIMIT ?", params=params + [str(seed), n])
        names, types = rel.columns, [str(t) for t in rel.types]
        rows = []
        for values in rel.fetchall():
            row = {}
            for name, kind, value in zip(names, types, values):
                row[name] = json.loads(value) if kind == "JSON" and value is not None else value
            rows.append(row)
        verdicts: dict[str, list] = {}
        if has_id and rows:
            ids = [str(r["id"]) for r in rows]
            for row_id, vstage, ok, why in con.execute(
                    "SELECT row_id, stage, passed, reason FROM synth.verdicts WHERE row_id IN (SELECT unnest(?)) "
                    "ORDER BY stage", [ids]).fetchall():
                verdicts.setdefault(row_id, []).append({"stage": vstage, "passed": ok, "reason": why})
        for row in rows:
            row["verdicts"] = verdicts.get(str(row.get("id")), [])
    return {"stage": stage, "seed": seed, "total": total, "matching": ", ".join(matching), "rows": rows}


def _check_reason(store: Store, con, stage: str, reason: str, filter_stage: str | None) -> None:
    """A reason no filter gave any of the stage's rows is a mistake (a typo, the wrong stage): one line
    listing the reasons its rows have (those carrying an id or file grouped by what precedes ':')."""
    scope, params = ("AND v.stage = ?", [filter_stage]) if filter_stage else ("", [])
    found = con.execute(
        "SELECT split_part(v.reason, ':', 1) AS r, count(*) AS n, bool_or(v.reason = ? OR split_part(v.reason, ':', 1) "
        f"= ?) FROM synth.verdicts v WHERE NOT v.passed {scope} AND v.row_id IN (SELECT CAST(id AS VARCHAR) FROM "
        f"{quote_ident(stage)}) GROUP BY r ORDER BY n DESC, r", [reason, reason] + params).fetchall()
    if any(hit for _, _, hit in found):
        return
    by = f"{filter_stage!r}" if filter_stage else "a filter"
    if found:
        have = ", ".join(f"{r} {n}" for r, n, _ in found[:10])
        raise SynthError(f"{store.path}: {by} rejected no row of {stage!r} with reason {reason!r} (reasons: {have})")
    judged = fetch_one(con, f"SELECT count(*) FROM synth.verdicts v WHERE v.row_id IN (SELECT CAST(id AS VARCHAR) "
                            f"FROM {quote_ident(stage)}) {scope}", params)[0]
    if judged:
        raise SynthError(f"{store.path}: {by} rejected no row of {stage!r}: every verdict on its rows passed")
    raise SynthError(f"{store.path}: {by} judged no row of {stage!r} (filters with verdicts: "
                     f"{', '.join(_filters(con)) or 'none has run'}); sample the stage a filter reads (its input)")


def print_sample(result: dict, console: Console, fmt: str = "table", err: Console | None = None) -> None:
    """Each row as a panel (its verdicts beneath), and how many rows matched; json: one object per row
    on stdout and the count on `err`."""
    shown, total = len(result["rows"]), result["total"]
    what = f" {result['matching']}" if result["matching"] else ""
    line = f"{shown} of {total} row{'' if total == 1 else 's'} of {result['stage']}{what} (seed {result['seed']})"
    if fmt == "json":
        for row in result["rows"]:
            _json_line(row)
        _say(err or console, line)
        return
    for i, row in enumerate(result["rows"], start=1):
        row = dict(row)
        verdicts = row.pop("verdicts")
        title = f"{result['stage']} #{i}" + (f" · {row['id']}" if row.get("id") is not None else "")
        console.print(row_panel(row, title, [_verdict_text(v) for v in verdicts]))
    _say(console, line)


def _verdict_text(v: dict) -> Text:
    mark = ("passed", "green") if v["passed"] else ("failed", "red")
    return Text.assemble(("verdict ", "bold"), f"{v['stage']}: ", mark, f" · {v['reason']}" if v["reason"] else "")


# ---- synth grep -----------------------------------------------------------------------------------

SNIPPET = 80  # characters of context printed around a match


def grep_hits(store: Store, pattern: str, stage: str | None = None, n: int = 20, regex: bool = False,
              case_sensitive: bool = False) -> dict:
    """Where PATTERN occurs in the store's texts:
    - generate stages' completions (synth.completions.text: where `completion`; `reasoning`: the trace of a
      reasoning teacher), one hit per request id;
    - the prompts they rendered (synth.prompts.messages through synth.requests/generations), one hit per
      (stage, input row, message role) — `prompt:system`, `prompt:user`, ... — with the input row's id
      (samples share their prompt);
    - load stages' text columns (VARCHAR, JSON), one hit per (row id, column): where is the column.
    Default: a case-insensitive substring (DuckDB `contains`, no wildcards); `regex`: a DuckDB (RE2) regular
    expression, case-insensitive too unless `case_sensitive`. Hits are ordered by stage, where, id.
    Returns {pattern, total, by_stage: {stage: {where: hits}}, hits: [{stage, id, where, snippet, match: [start,
    end] in the snippet}] (the first n)}."""
    if pattern == "":
        raise SynthError("give a non-empty PATTERN to search for")
    with store.read() as con:
        if regex:
            try:
                con.execute("SELECT regexp_matches('', ?)", [pattern]).fetchall()
            except duckdb.Error as exc:
                raise SynthError(f"--regex {pattern!r}: not a valid regular expression (RE2 syntax): "
                                 f"{one_line(exc).removeprefix('Invalid Input Error: ')}") from None
        sources, params = _text_sources(store, con, stage)
        if not sources:
            return {"pattern": pattern, "total": 0, "by_stage": {}, "hits": []}
        if regex:
            match, match_params = "regexp_matches(text, ?, ?)", [pattern, "c" if case_sensitive else "i"]
        elif case_sensitive:
            match, match_params = "contains(text, ?)", [pattern]
        else:
            match, match_params = "contains(lower(text), lower(?))", [pattern]
        union = " UNION ALL ".join(sources)
        hits_sql = f"SELECT stage, id, \"where\", text FROM ({union}) WHERE text IS NOT NULL AND {match}"
        # regex: the match as DuckDB's RE2 found it (its first occurrence in the text locates it for the snippet)
        matched, matched_params = ("regexp_extract(text, ?, 0, ?)", [pattern, "c" if case_sensitive else "i"]) \
            if regex else ("NULL", [])
        by_stage: dict[str, dict[str, int]] = {}
        try:
            for s, w, k in con.execute(f"SELECT stage, \"where\", count(*) FROM ({hits_sql}) GROUP BY ALL "
                                       "ORDER BY stage, \"where\"", params + match_params).fetchall():
                by_stage.setdefault(s, {})[w] = k
            found = con.execute(f"SELECT *, {matched} FROM ({hits_sql}) ORDER BY stage, \"where\", id LIMIT ?",
                                matched_params + params + match_params + [n]).fetchall() if n else []
        except duckdb.Error as exc:
            raise SynthError(f"{store.path}: search failed: {one_line(exc)}") from None
    located = []
    for s, row_id, where, text, found_text in found:
        if regex:
            start = text.find(found_text) if found_text else -1
            span = (start, start + len(found_text)) if start >= 0 else (0, 0)
        else:
            m = re.search(re.escape(pattern), text, 0 if case_sensitive else re.IGNORECASE)
            span = m.span() if m else (0, 0)
        located.append((s, row_id, where, text, span))
    hits = []
    for s, row_id, where, text, (start, end) in located:
        snippet, a, b = _snippet(text, start, end)
        hits.append({"stage": s, "id": row_id, "where": where, "snippet": snippet, "match": [a, b]})
    total = sum(k for per in by_stage.values() for k in per.values())
    return {"pattern": pattern, "total": total, "by_stage": by_stage, "hits": hits}


def _text_sources(store: Store, con, stage: str | None) -> tuple[list[str], list]:
    """SELECTs of (stage, id, where, text) over what grep searches, restricted to `stage` when given."""
    relations = _relations(con)
    generate = [r[0] for r in con.execute("SELECT DISTINCT stage FROM synth.generations ORDER BY 1").fetchall()]
    loads = [name for name, kind in relations.items() if kind == "BASE TABLE"]
    if stage is not None:
        if stage not in relations and stage not in generate:
            raise SynthError(f"{store.path}: no stage output named {stage!r} (have: {', '.join(relations) or 'none'})")
        if stage not in generate and stage not in loads:
            kind = _kind(con, stage)
            raise SynthError(f"{store.path}: {stage!r} ({f'a {kind} stage' if kind else 'a view'}) has no text of its "
                             "own: grep searches generate stages' completions and prompts and load stages' text "
                             f"columns (here: {', '.join(sorted(set(generate + loads))) or 'none'})")
        generate = [stage] if stage in generate else []
        loads = [stage] if stage in loads else []
    sources, params = [], []
    if generate:
        marks = ", ".join("?" for _ in generate)
        members = f"SELECT stage, id, input_id FROM synth.generations WHERE stage IN ({marks})"
        sources.append(f"SELECT g.stage AS stage, g.id AS id, 'completion' AS \"where\", c.text AS text "
                       f"FROM ({members}) g JOIN synth.completions c ON c.id = g.id")
        params += generate
        if _has_column(con, "synth", "completions", "reasoning"):  # migration 11
            sources.append(f"SELECT g.stage, g.id, 'reasoning', c.reasoning FROM ({members}) g "
                           "JOIN synth.completions c ON c.id = g.id")
            params += generate
        sources.append(
            "SELECT DISTINCT g.stage, g.input_id, 'prompt:' || coalesce(json_extract_string(m.msg, '$.role'), '?'), "
            f"json_extract_string(m.msg, '$.content') FROM ({members}) g JOIN synth.requests r ON r.id = g.id "
            "JOIN synth.prompts p ON p.id = r.prompt_id, unnest(from_json(p.messages, '[\"JSON\"]')) AS m(msg)")
        params += generate
    for table in loads:
        columns = _columns(con, table)
        row_id = "CAST(id AS VARCHAR)" if "id" in columns else "NULL::VARCHAR"
        for column, kind in columns.items():
            if column != "id" and kind in ("VARCHAR", "JSON"):
                sources.append(f"SELECT ? AS stage, {row_id} AS id, ? AS \"where\", "
                               f"CAST({quote_ident(column)} AS VARCHAR) AS text FROM {quote_ident(table)}")
                params += [table, column]
    return sources, params


def _snippet(text: str, start: int, end: int) -> tuple[str, int, int]:
    """About SNIPPET characters of `text` around [start, end), on one line (each whitespace character shown
    as a space, so positions hold), '…' where cut; and the match's span in the snippet."""
    end = min(end, start + SNIPPET)  # a very long match: its start
    context = max(0, (SNIPPET - (end - start)) // 2)
    lo, hi = max(0, start - context), min(len(text), end + context)
    flat = "".join(" " if ch.isspace() else ch for ch in text[lo:hi])
    head = "…" if lo > 0 else ""
    tail = "…" if hi < len(text) else ""
    return head + flat + tail, len(head) + start - lo, len(head) + end - lo


def print_grep(result: dict, console: Console, fmt: str = "table", err: Console | None = None) -> None:
    """Per hit: stage, id, where and the snippet (the match highlighted); then the count ("showing 20 of
    57"), per stage. json: one object per hit on stdout, the count on `err`."""
    shown, total = len(result["hits"]), result["total"]
    per = "; ".join(f"{s}: " + ", ".join(f"{w} {k}" for w, k in ws.items()) for s, ws in result["by_stage"].items())
    line = (f"showing {shown} of {total} hit{'' if total == 1 else 's'} of '{result['pattern']}'"
            + (f" ({per})" if per else ""))
    if fmt == "json":
        for hit in result["hits"]:
            _json_line(hit)
        _say(err or console, line)
        return
    if result["hits"]:
        table = Table(show_lines=False)
        for col in ("stage", "id", "where", "snippet"):
            table.add_column(col, overflow="fold", no_wrap=col != "snippet")
        for hit in result["hits"]:
            text = Text(hit["snippet"])
            a, b = hit["match"]
            if b > a:
                text.stylize("bold reverse yellow", a, b)
            table.add_row(Text(hit["stage"]), Text(str(hit["id"] or "")), Text(hit["where"]), text)
        console.print(table)
    _say(console, line)


# ---- synth diff -----------------------------------------------------------------------------------

FILTER, GENERATE, EVALUATE, PAIRS = "filter", "generate", "evaluate", "pairs"


def _category(con, stage: str) -> str:
    """What a stage's rows are, for diff: `generate` (requests of synth.generations), `evaluate`, `pairs`,
    `filter` (a stage with verdicts: verify, vote, judge, dedup, decontaminate, filter), else its kind
    (load, keep, export, score, ...: compared row by row)."""
    kind = _kind(con, stage)
    if kind in (GENERATE, EVALUATE, PAIRS):
        return kind
    if fetch_one(con, "SELECT count(*) FROM synth.verdict_history WHERE stage = ?", [stage])[0]:
        return FILTER
    if kind is None and fetch_one(con, "SELECT count(*) FROM synth.generations WHERE stage = ?", [stage])[0]:
        return GENERATE
    return kind or "rows"


def _preview_column(con, stage: str) -> str | None:
    """The column that says most about a row in one line: its parsed answer, else its text, else its first
    text column."""
    if stage not in _relations(con):
        return None
    columns = _columns(con, stage)
    for name in ("answer", "text"):
        if name in columns:
            return name
    return next((c for c, t in columns.items() if c != "id" and t == "VARCHAR"), None)


def _add_previews(con, stage: str | None, out: dict) -> None:
    """Each changed filter row's preview (`preview`: its answer, text or first text column, read from the
    stage's view, the input rows with their verdicts) and which column that is (`preview_column`)."""
    column = _preview_column(con, stage) if stage else None
    ids = [e["key"]["id"] for e in out["examples"]]
    found = {r[0]: r[1] for r in con.execute(
        f"SELECT CAST(id AS VARCHAR), CAST({quote_ident(column)} AS VARCHAR) FROM {quote_ident(stage)} "
        "WHERE CAST(id AS VARCHAR) IN (SELECT unnest(?))", [ids]).fetchall()} if column and ids else {}
    out["preview_column"] = column
    for e in out["examples"]:
        e["preview"] = found.get(e["key"]["id"])


def _compare(con, a_sql: str, a_params: list, b_sql: str, b_params: list, key: list[str], fields: list[str],
             carry: list[str], n: int) -> dict:
    """Rows of two SELECTs paired on `key` (NULL equal to NULL): how many only in A, only in B, in both, and
    changed (in both with any of `fields` distinct); up to n changed rows ordered by key, with `fields` and
    `carry` (shown, not compared) of each side."""
    q = quote_ident
    on = " AND ".join(f"a.{q(k)} IS NOT DISTINCT FROM b.{q(k)}" for k in key)
    differs = " OR ".join(f"a.{q(f)} IS DISTINCT FROM b.{q(f)}" for f in fields) or "false"
    side = fields + [c for c in carry if c not in fields]
    select = ", ".join([f"coalesce(a.{q(k)}, b.{q(k)}) AS k{i}" for i, k in enumerate(key)]
                       + [f"a.{q(c)} AS a{i}" for i, c in enumerate(side)]
                       + [f"b.{q(c)} AS b{i}" for i, c in enumerate(side)])
    joined = (f"WITH a AS (SELECT *, true AS _in FROM ({a_sql})), b AS (SELECT *, true AS _in FROM ({b_sql})) "
              f"SELECT {select}, a._in AS in_a, b._in AS in_b, coalesce(({differs}), false) AS changed "
              f"FROM a FULL OUTER JOIN b ON {on}")
    params = a_params + b_params
    only_a, only_b, both, changed = fetch_one(con, (
        f"SELECT count(*) FILTER (WHERE in_b IS NULL), count(*) FILTER (WHERE in_a IS NULL), "
        f"count(*) FILTER (WHERE in_a AND in_b), count(*) FILTER (WHERE in_a AND in_b AND changed) FROM ({joined})"),
        params)
    order = ", ".join(f"k{i}" for i in range(len(key)))
    examples = []
    if n:
        for r in con.execute(f"SELECT * FROM ({joined}) WHERE in_a AND in_b AND changed ORDER BY {order} LIMIT ?",
                             params + [n]).fetchall():
            k, rest = r[:len(key)], r[len(key):]
            examples.append({"key": dict(zip(key, k)), "a": dict(zip(side, rest[:len(side)])),
                             "b": dict(zip(side, rest[len(side):2 * len(side)]))})
    return {"only_in_a": only_a, "only_in_b": only_b, "in_both": both, "changed": changed,
            "compared_on": fields, "examples": examples}


def _filter_stats(con, table: str, cond: str, params: list) -> dict:
    """Rows judged, passed, the pass rate and the top rejection reasons of verdict rows `cond`."""
    judged, passed = fetch_one(con, f"SELECT count(*), count(*) FILTER (WHERE passed) FROM {table} WHERE {cond}",
                               params)
    reasons = con.execute(
        "SELECT CASE WHEN reason LIKE 'duplicate_of:%' THEN 'duplicate_of' ELSE reason END AS r, count(*) AS n "
        f"FROM {table} WHERE NOT passed AND {cond} GROUP BY ALL ORDER BY n DESC, r LIMIT 3", params).fetchall()
    return {"rows": judged, "passed": passed, "pass_rate": _rate(passed, judged),
            "top_reasons": [{"reason": r, "rows": k} for r, k in reasons]}


def _transitions(con, a_sql: str, a_params: list, b_sql: str, b_params: list) -> dict:
    """Of the filter rows judged on both sides: passed→failed, failed→passed, and same verdict, other reason."""
    row = fetch_one(con, (
        f"SELECT count(*) FILTER (WHERE a.passed AND NOT b.passed), count(*) FILTER (WHERE NOT a.passed AND b.passed), "
        "count(*) FILTER (WHERE a.passed = b.passed AND a.reason IS DISTINCT FROM b.reason) "
        f"FROM ({a_sql}) a JOIN ({b_sql}) b ON a.id = b.id"), a_params + b_params)
    return {"passed_to_failed": row[0], "failed_to_passed": row[1], "reason_only": row[2]}


def _generate_side(con, stage: str) -> tuple[str, list, dict, bool]:
    """A generate stage's rows for diff (one per request: input_id, sample, id, text, answer) and its stats."""
    has_answer = stage in _relations(con) and "answer" in _columns(con, stage)
    answer = "CAST(v.answer AS VARCHAR)" if has_answer else "NULL::VARCHAR"
    view = f"LEFT JOIN {quote_ident(stage)} v ON v.id = g.id" if has_answer else ""
    sql = (f"SELECT g.input_id, g.sample, g.id, c.text, {answer} AS answer, c.completion_tokens, g.teacher "
           f"FROM synth.generations g LEFT JOIN synth.completions c ON c.id = g.id {view} WHERE g.stage = ?")
    rows, done, answered, tokens, teachers = fetch_one(con, (
        "SELECT count(*), count(text), count(answer), avg(completion_tokens), string_agg(DISTINCT teacher, ', ' "
        f"ORDER BY teacher) FROM ({sql})"), [stage])
    stats = {"teacher": teachers, "requests": rows, "with_completion": _rate(done, rows),
             "with_answer": _rate(answered, rows) if has_answer else None,
             "mean_completion_tokens": None if tokens is None else round(tokens, 2)}
    return sql, [stage], stats, has_answer


def _evaluate_stats(con, table: str, cond: str, params: list) -> dict:
    per_model = con.execute(f"SELECT model, count(*), count(*) FILTER (WHERE passed) FROM {table} WHERE {cond} "
                            "GROUP BY model ORDER BY model", params).fetchall()
    rows = sum(r[1] for r in per_model)
    passed = sum(r[2] for r in per_model)
    return {"rows": rows, "passed": passed, "pass_rate": _rate(passed, rows),
            "models": {m: {"rows": k, "passed": p, "pass_rate": _rate(p, k)} for m, k, p in per_model}}


def _pairs_stats(con, table: str, cond: str, params: list) -> dict:
    rows, inputs, rules = fetch_one(con, f"SELECT count(*), count(DISTINCT input_id), string_agg(DISTINCT rule, ', ' "
                                         f"ORDER BY rule) FROM {table} WHERE {cond}", params)
    return {"rows": rows, "inputs": inputs, "rules": rules}


def diff_stages(store: Store, a: str, b: str, n: int = 5) -> dict:
    """Two stages of the same sort, compared:
    - filter stages (verdicts): per stage rows judged, pass rate, top rejection reasons (store.rejection_reasons);
      rows paired by id, changed = passed or reason differs (with the passed→failed / failed→passed counts);
    - generate stages: per stage requests, the share with a completion and with a parsed answer (the view's
      `answer` column), mean completion tokens; rows paired by (input_id, sample) — two generate stages make
      different request ids — changed = the answer differs (the text, when either has no `answer` column);
    - evaluate stages: per model pass rates; rows paired by (model, input_id, sample), changed = passed/answer;
    - pairs stages: pairs and inputs; paired by (chosen_id, rejected_id), changed = rule or margin;
    - two stages of another same kind (load, keep, ...): rows paired by id, changed = any common column.
    Stages of different sorts cannot be compared: one line says so."""
    if a == b:
        raise SynthError(f"diff {a} {b}: the same stage twice; compare two stages, or one stage across two runs "
                         "(--runs R1,R2)")
    with store.read() as con:
        for stage in (a, b):
            _need_stage(store, con, stage)
        cat_a, cat_b = _category(con, a), _category(con, b)
        if cat_a != cat_b:
            raise SynthError(f"{store.path}: cannot diff {a!r} ({_sort(cat_a)}) with {b!r} ({_sort(cat_b)}): diff "
                             "compares two filter stages, two generate stages, or two stages of the same kind")
        out = {"mode": "stages", "sort": cat_a, "a": {"name": a}, "b": {"name": b}}
        if cat_a == FILTER:
            sql = "SELECT row_id AS id, passed, reason, score FROM synth.verdicts WHERE stage = ?"
            for side, stage in (("a", a), ("b", b)):
                stats = _filter_stats(con, "synth.verdicts", "stage = ?", [stage])
                stats["top_reasons"] = [{"reason": r, "rows": k} for _, r, k in rejection_reasons(con, [stage], 3)]
                out[side].update(stats)
            out.update(_compare(con, sql, [a], sql, [b], ["id"], ["passed", "reason"], ["score"], n))
            out["transitions"] = _transitions(con, sql, [a], sql, [b])
            _add_previews(con, a, out)
        elif cat_a == GENERATE:
            sql_a, p_a, stats_a, ans_a = _generate_side(con, a)
            sql_b, p_b, stats_b, ans_b = _generate_side(con, b)
            out["a"].update(stats_a)
            out["b"].update(stats_b)
            on_answer = ans_a and ans_b
            out.update(_compare(con, sql_a, p_a, sql_b, p_b, ["input_id", "sample"],
                                ["answer"] if on_answer else ["text"], ["id", "text"] if on_answer else ["id"], n))
        elif cat_a == EVALUATE:
            sql = ("SELECT model, input_id, sample, id, passed, reason, answer FROM synth.evaluations "
                   "WHERE stage = ?")
            for side, stage in (("a", a), ("b", b)):
                out[side].update(_evaluate_stats(con, "synth.evaluations", "stage = ?", [stage]))
            out.update(_compare(con, sql, [a], sql, [b], ["model", "input_id", "sample"], ["passed", "answer"],
                                ["reason", "id"], n))
        elif cat_a == PAIRS:
            sql = "SELECT chosen_id, rejected_id, input_id, rule, margin FROM synth.pairs WHERE stage = ?"
            for side, stage in (("a", a), ("b", b)):
                out[side].update(_pairs_stats(con, "synth.pairs", "stage = ?", [stage]))
            out.update(_compare(con, sql, [a], sql, [b], ["chosen_id", "rejected_id"], ["rule", "margin"],
                                ["input_id"], n))
        else:
            cols_a, cols_b = _columns(con, a), _columns(con, b)
            if "id" not in cols_a or "id" not in cols_b:
                raise SynthError(f"{store.path}: cannot diff {a!r} with {b!r}: "
                                 f"{(a if 'id' not in cols_a else b)!r} has no id column to pair rows by")
            common = [c for c in cols_a if c in cols_b and c != "id"]
            side_sql = ("SELECT CAST(id AS VARCHAR) AS id, "
                        + ", ".join([f"CAST({quote_ident(c)} AS VARCHAR) AS {quote_ident(c)}" for c in common]
                                    or ["NULL AS _none"]) + " FROM ")
            for side, stage in (("a", a), ("b", b)):
                ids, unique = fetch_one(con, f"SELECT count(*), count(DISTINCT id) FROM {quote_ident(stage)}")
                if ids != unique:
                    raise SynthError(f"{store.path}: cannot diff {a!r} with {b!r}: the ids of {stage!r} are not "
                                     "unique, so its rows cannot be paired")
                out[side]["rows"] = ids
            out.update(_compare(con, side_sql + quote_ident(a), [], side_sql + quote_ident(b), [],
                                ["id"], common, [], n))
    return out


def _sort(category: str) -> str:
    return {FILTER: "a filter stage", GENERATE: "a generate stage", EVALUATE: "an evaluate stage",
            PAIRS: "a pairs stage", "rows": "no stage's output"}.get(category, f"a {category} stage")


def diff_runs(store: Store, stage: str, runs: str, n: int = 5) -> dict:
    """One stage across two runs (`runs`: "R1,R2", run ids of synth.runs or unique prefixes), from the
    history kept per run: a filter stage's synth.verdict_history (pass rate per run, rows whose verdict
    changed), an evaluate stage's synth.evaluation_history, a pairs stage's synth.pair_history.

    A generate stage keeps no history: a request's id is the hash of what was sent, so a changed template,
    teacher or params makes new requests, and synth.generations holds the stage's current membership only
    (which run answered a request, synth.completions.run_id, does not say which requests the stage had in an
    earlier run: a cached answer keeps its first run). Two runs of it cannot be told apart soundly: one line
    says to diff two generate stages instead. Load, keep and export stages are replaced by each run: the same."""
    parts = [p.strip() for p in runs.split(",")]
    if len(parts) != 2 or not all(parts):
        raise SynthError(f"--runs {runs}: give two run ids separated by a comma (--runs R1,R2; `synth status` "
                         "lists the last runs, synth.runs all of them)")
    with store.read() as con:
        kind = _kind(con, stage)
        history = {FILTER: "synth.verdict_history", EVALUATE: "synth.evaluation_history", PAIRS: "synth.pair_history"}
        if kind in (EVALUATE, PAIRS):
            sort = kind
        elif fetch_one(con, "SELECT count(*) FROM synth.verdict_history WHERE stage = ?", [stage])[0]:
            sort = FILTER
        else:
            if stage not in _relations(con) and kind is None:
                _need_stage(store, con, stage)
            if kind == GENERATE:
                raise SynthError(f"{store.path}: {stage!r} is a generate stage: its requests are cached by content "
                                 "(a changed template, teacher or params makes new requests) and only its current "
                                 "ones are kept, so two runs cannot be compared; diff two generate stages instead "
                                 "(synth diff TARGET A B)")
            raise SynthError(f"{store.path}: {stage!r} is {_sort(kind or 'rows')}: its output is replaced by each run; "
                             "--runs compares filter, evaluate and pairs stages, whose rows are kept per run")
        r1, r2 = (_resolve_run(store, con, p) for p in parts)
        if r1 == r2:
            raise SynthError(f"--runs {runs}: both name run {r1}; give two different runs")
        table = history[sort]
        have = [r[0] for r in con.execute(f"SELECT run_id FROM {table} WHERE stage = ? GROUP BY run_id "
                                          "ORDER BY min(created_at)", [stage]).fetchall()]
        for run in (r1, r2):  # a run that ran the stage and wrote no rows (no pairs this time) is a side of 0
            if run not in have and not _ran(con, run, stage):
                raise SynthError(f"{store.path}: {stage!r} did not run in run {run} (the runs it wrote rows in: "
                                 f"{', '.join(have)})")
        current = fetch_one(con, "SELECT run_id FROM synth.stages WHERE name = ?", [stage])
        out = {"mode": "runs", "sort": sort, "stage": stage}
        for side, run in (("a", r1), ("b", r2)):
            started = fetch_one(con, "SELECT started_at FROM synth.runs WHERE id = ?", [run])
            out[side] = {"name": run, "started_at": started[0] if started else None,
                         "current": bool(current and current[0] == run)}
        cond = "stage = ? AND run_id = ?"
        if sort == FILTER:
            sql = f"SELECT row_id AS id, passed, reason, score FROM {table} WHERE {cond}"
            for side, run in (("a", r1), ("b", r2)):
                out[side].update(_filter_stats(con, table, cond, [stage, run]))
                out[side]["version"] = ", ".join(r[0] for r in con.execute(
                    f"SELECT DISTINCT version FROM {table} WHERE {cond} ORDER BY 1", [stage, run]).fetchall())
            out.update(_compare(con, sql, [stage, r1], sql, [stage, r2], ["id"], ["passed", "reason"], ["score"], n))
            out["transitions"] = _transitions(con, sql, [stage, r1], sql, [stage, r2])
            _add_previews(con, stage if stage in _relations(con) else None, out)
        elif sort == EVALUATE:
            sql = f"SELECT model, input_id, sample, id, passed, reason, answer FROM {table} WHERE {cond}"
            for side, run in (("a", r1), ("b", r2)):
                out[side].update(_evaluate_stats(con, table, cond, [stage, run]))
            out.update(_compare(con, sql, [stage, r1], sql, [stage, r2], ["model", "input_id", "sample"],
                                ["passed", "answer"], ["reason", "id"], n))
        else:
            sql = f"SELECT chosen_id, rejected_id, input_id, rule, margin FROM {table} WHERE {cond}"
            for side, run in (("a", r1), ("b", r2)):
                out[side].update(_pairs_stats(con, table, cond, [stage, run]))
            out.update(_compare(con, sql, [stage, r1], sql, [stage, r2], ["chosen_id", "rejected_id"],
                                ["rule", "margin"], ["input_id"], n))
    return out


def _ran(con, run: str, stage: str) -> bool:
    """Whether a finished run ran the stage (synth.runs.counts' stages_run)."""
    row = fetch_one(con, "SELECT counts FROM synth.runs WHERE id = ?", [run])
    return bool(row and row[0]) and stage in (json.loads(row[0]).get("stages_run") or [])


def _resolve_run(store: Store, con, given: str) -> str:
    found = [r[0] for r in con.execute("SELECT id FROM synth.runs WHERE starts_with(id, ?) ORDER BY started_at",
                                       [given]).fetchall()]
    if given in found:
        return given
    if len(found) == 1:
        return found[0]
    if found:
        raise SynthError(f"{store.path}: run id prefix {given!r} is ambiguous ({', '.join(found[:5])}"
                         f"{', ...' if len(found) > 5 else ''}); give more of it")
    last = [r[0] for r in con.execute("SELECT id FROM synth.runs ORDER BY started_at DESC LIMIT 5").fetchall()]
    raise SynthError(f"{store.path}: no run {given!r} (last runs: {', '.join(last) or 'none'})")


def print_diff(result: dict, console: Console, fmt: str = "table") -> None:
    """The two sides' figures, the counts (only in A, only in B, in both, changed) and the changed rows
    with both sides. json: a summary object, then one object per changed row shown."""
    a, b = result["a"]["name"], result["b"]["name"]
    if fmt == "json":
        summary = {k: v for k, v in result.items() if k != "examples"}
        _json_line({"type": "summary", **summary})
        for e in result["examples"]:
            _json_line({"type": "changed", **e})
        return
    sort = {FILTER: "filter", GENERATE: "generate", EVALUATE: "evaluate", PAIRS: "pairs"}.get(result["sort"])
    if result["mode"] == "runs":
        _say(console, f"diff {result['stage']} ({_sort(result['sort'])}): run {a} vs run {b}")
    else:
        _say(console, f"diff {a} vs {b} (" + (f"two {sort} stages" if sort else _sort(result["sort"]) + " each") + ")")
    stats = Table()
    skip = {"name", "models", "current"}
    keys = [k for k in result["a"] if k not in skip]
    stats.add_column("run" if result["mode"] == "runs" else "stage")
    for k in keys:
        stats.add_column(k.replace("_", " "), justify="left" if k in ("teacher", "top_reasons", "version", "rules")
                         else "right")
    for side in ("a", "b"):
        s = result[side]
        label = s["name"] + (" (current)" if s.get("current") else "")
        stats.add_row(Text(label), *[Text(_stat(k, s.get(k))) for k in keys])
    console.print(stats)
    for side in ("a", "b"):
        for model, m in (result[side].get("models") or {}).items():
            _say(console, f"  {result[side]['name']} · {model}: {m['passed']} of {m['rows']} passed "
                          f"({_percent(m['pass_rate'])})")
    fields = result["compared_on"]
    on = ", ".join(fields) if len(fields) <= 4 else f"any of {len(fields)} common columns"
    _say(console, f"only in {a}: {result['only_in_a']} · only in {b}: {result['only_in_b']} · in both: "
                  f"{result['in_both']} · changed ({on}): {result['changed']}")
    if t := result.get("transitions"):
        _say(console, f"  passed→failed {t['passed_to_failed']} · failed→passed {t['failed_to_passed']} · "
                      f"same verdict, other reason {t['reason_only']}")
    if not result["examples"]:
        return
    _say(console, f"changed rows (showing {len(result['examples'])} of {result['changed']}):")
    table = Table()
    key = list(result["examples"][0]["key"])
    for k in key:
        table.add_column(k, overflow="fold")
    generic = result["sort"] not in (FILTER, GENERATE, EVALUATE, PAIRS)
    if generic:
        table.add_column("what changed", overflow="fold")
    else:
        table.add_column(Text(a), overflow="fold")
        table.add_column(Text(b), overflow="fold")
    if any(e.get("preview") for e in result["examples"]):
        table.add_column(Text(result.get("preview_column") or "row"), overflow="fold")
    for e in result["examples"]:
        cells = [Text(cell(e["key"][k])) for k in key]
        if generic:
            cells.append(Text("\n".join(f"{f}: {cell(e['a'][f], 60)!s} → {cell(e['b'][f], 60)!s}"
                                        for f in fields if e["a"][f] != e["b"][f])))
        else:
            cells += [Text(_side_text(result["sort"], e[s], fields)) for s in ("a", "b")]
        if len(table.columns) > len(cells):
            cells.append(Text(cell(e.get("preview"), 80)))
        table.add_row(*cells)
    console.print(table)


def _stat(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("pass_rate", "with_completion", "with_answer"):
        return _percent(value)
    if key == "top_reasons":
        return ", ".join(f"{r['reason']} {r['rows']}" for r in value) or "-"
    if hasattr(value, "strftime"):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return cell(value)


def _side_text(sort: str, side: dict, fields: list[str]) -> str:
    """One side of a changed row, compactly: a verdict as `passed` / `failed (reason)`, an answer with its
    request id, an evaluation as right/wrong with the answer."""
    if sort == FILTER:
        return "passed" if side["passed"] else f"failed ({side['reason']})" if side["reason"] else "failed"
    if sort == EVALUATE:
        verdict = "right" if side["passed"] else f"wrong ({side['reason']})" if side["reason"] else "wrong"
        return f"{verdict} · answer {cell(side['answer'], 40)}"
    if sort == GENERATE:
        shown = fields[0]
        lead = f"answer {cell(side['answer'], 40)}" if shown == "answer" else cell(one_line(side["text"] or ""), 80)
        more = f"\n{cell(one_line(side['text']), 80)}" if shown == "answer" and side.get("text") else ""
        return f"{lead}{more}\n{side['id'] or '(no request)'}"
    return " · ".join(f"{f} {cell(side[f])}" for f in fields)
