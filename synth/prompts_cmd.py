"""`synth prompts`: the prompt templates a pipeline sees, and one stage's prompt rendered on one row.

    synth prompts PIPELINE                         every template the pipeline can use (its workspace's
                                                   prompts/ folder over the built-ins): where it comes from,
                                                   whether it shadows a built-in, its parser, its variables
                                                   and the stages that render it
    synth prompts PIPELINE STAGE [--row ID | --index N]
                                                   STAGE's prompt on one of its input rows, as `synth run`
                                                   would send it: the messages, the request ids, cached or not

A preview: it reads the pipeline, its seed files and templates and (when it exists) the store, read-only;
it calls no teacher and writes nothing (no store is created). The rendering is the run's own:
`requests.build_requests` over the rows `requests.input_rows` gives (a generate stage, a judge's critic
calls, an evaluate stage's model calls), or the template's `render` as an export renders a dataset's rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from synth.context import trained_models
from synth.errors import MissingValue, SynthError
from synth.graph import Graph
from synth.ids import prompt_id
from synth.paths import builtin_dir
from synth.pipeline import StageStatus, load_pipeline, staleness
from synth.prompts import Template, builtin_names, load_template
from synth.requests import build_requests, cached_ids, input_rows, stage_rows


# ---- the listing --------------------------------------------------------------------------------------

def template_rows(graph: Graph) -> list[dict]:
    """Every template the pipeline can use, by name: the workspace's prompts/*.yaml, then the built-ins no
    workspace file shadows (and any template a stage names elsewhere, prompts/sub/x say). Each with
    source (workspace | built-in), path, shadows_builtin, parse, variables, the stages that render it
    (a judge or evaluate stage through its companion generate stages: `via`), and error (a file that does
    not load, which no stage uses: a stage's template was loaded with the pipeline)."""
    users = _users(graph)
    folder, builtin_folder = graph.base_dir / "prompts", builtin_dir("prompts")
    builtins = set(builtin_names())
    found: dict[Path, tuple[str, str]] = {}  # resolved path -> (name, source)
    if folder.is_dir():
        for path in sorted(folder.glob("*.yaml")):
            if path.is_file():
                found.setdefault(path.resolve(), (path.stem, "workspace"))
    for name in sorted(builtins):
        path = builtin_folder / f"{name}.yaml"
        if not (folder / f"{name}.yaml").is_file():
            found.setdefault(path.resolve(), (name, "built-in"))
    loaded = {t.path.resolve(): t for t in graph.templates.values()}
    for key, template in loaded.items():
        if key not in found:
            source = "built-in" if key.is_relative_to(builtin_folder.resolve()) else "workspace"
            found[key] = (template.name, source)
    rows = []
    for key, (name, source) in found.items():
        template, error = loaded.get(key), None
        if template is None:
            try:
                template = load_template(name, graph.base_dir, str(key))
            except SynthError as exc:
                error = str(exc)
        path = template.path if template is not None else (folder if source == "workspace" else builtin_folder) \
            / f"{name}.yaml"
        rows.append({
            "name": name, "source": source, "path": str(path),
            "shadows_builtin": source == "workspace" and name in builtins,
            "parse": template.spec.parse if template is not None else None,
            "variables": sorted(template.variables) if template is not None else [],
            "stages": users.get(key, []), "error": error})
    return sorted(rows, key=lambda r: (r["name"], r["source"] != "workspace"))


def _users(graph: Graph) -> dict[Path, list[dict]]:
    """Template file -> the stages that render it, in DAG order: {stage, kind, via: [companion stages]}
    (a judge's critic, an evaluate stage's model calls are its companions' renders)."""
    users: dict[Path, list[dict]] = {}
    for name in graph.order:
        if name not in graph.templates:
            continue
        owner = graph.owner_of.get(name)
        entries = users.setdefault(graph.templates[name].path.resolve(), [])
        stage = owner or name
        entry = next((e for e in entries if e["stage"] == stage), None)
        if entry is None:
            entry = {"stage": stage, "kind": graph.stage(stage).kind, "via": []}
            entries.append(entry)
        if owner:
            entry["via"].append(name)
    return users


def _describe_users(entries: list[dict]) -> str:
    return ", ".join(e["stage"] if e["kind"] == "generate" and not e["via"] else
                     f"{e['stage']} ({e['kind']}{' via ' + ', '.join(e['via']) if e['via'] else ''})"
                     for e in entries)


def print_templates(rows: list[dict], fmt: str, console) -> None:
    if fmt == "json":
        for r in rows:
            click.echo(json.dumps(r, ensure_ascii=False))
        return
    table = Table(title="prompt templates (workspace prompts/ over the built-ins)")
    for col in ("template", "source", "shadows built-in", "parse", "variables", "used by"):
        table.add_column(col)
    for r in rows:
        source = r["path"] if r["source"] == "workspace" else "built-in"
        table.add_row(r["name"], source, "yes" if r["shadows_builtin"] else "",
                      r["parse"] or f"error: {r['error']}", ", ".join(r["variables"]),
                      _describe_users(r["stages"]) or "-")
    console.print(table, markup=False, highlight=False)


# ---- one stage's prompt on one row ----------------------------------------------------------------------

def render_stage(graph: Graph, name: str, row_id: str | None = None, index: int | None = None) -> list[dict]:
    """STAGE's prompt on one input row, as `synth run` renders it: one dict per generate stage that makes
    its calls (itself; a judge's critic; each model of an evaluate stage) or, for an export of a dataset's
    rows, its prompt turns. Each: stage, calls (the generate stage, or the export), kind, input, row_id,
    index, rows, teacher, model, template, path, parse, prompt_id, messages, requests [{id, sample,
    cached}], notes. Reads only; calls no teacher."""
    if row_id is not None and index is not None:
        raise SynthError("synth prompts: give --row ID or --index N, not both")
    if name not in graph.spec.stages:
        copies = graph.rounds.get(name) or graph.replicas.get(name)
        if copies:
            raise SynthError(f"{graph.path}: stage '{name}' is copied as {', '.join(copies)}; name one of them")
        raise SynthError(f"{graph.path}: no stage '{name}' (stages: {', '.join(graph.order)})")
    kind = graph.stage(name).kind
    if name in graph.templates:
        calls = [name]
    else:
        calls = [c for c in graph.companions.get(name, ()) if c in graph.templates]
    if not calls:
        raise SynthError(f"{graph.where(name)}: a {kind} stage renders no prompt template (templates are rendered "
                         "by generate, judge and evaluate stages and by an export with `prompt:`)")
    states = graph.store.stage_states()
    statuses = staleness(graph, states)
    trained = trained_models(states)
    if kind == "export":
        return [_render_export(graph, name, statuses, row_id, index)]
    return [_render_calls(graph, name, call, statuses, trained, row_id, index) for call in calls]


def _rows(graph: Graph, name: str, statuses: dict[str, StageStatus]) -> tuple[list[dict], list[str]]:
    """The rows generate stage `name` renders, as `synth run` would get them (requests.input_rows): a load
    input's seeds when the store has no fresh copy of them (the run loads them first), else the input's rows
    in the store; a SynthError when the input has not run and its rows cannot be known without running it."""
    stage = graph.stage(name)
    inp = stage.input
    stored = input_rows(graph, name, from_store=True)
    if inp in graph.seeds and (stored is None or statuses[inp].stale):
        return input_rows(graph, name, from_store=False), []
    if stored is None:
        raise SynthError(f"{graph.where(graph.owner_of.get(name, name))}: input '{inp}' has not run; run "
                         f"`synth run {graph.path} {inp}` first")
    notes = []
    if statuses[inp].stale:
        notes.append(f"input '{inp}' is stale ({statuses[inp].reason}): `synth run` runs it again first, so its rows "
                     "may change; these are its rows in the store now")
    return stored, notes


def _pick(graph: Graph, name: str, inp: str, rows: list[dict], row_id: str | None, index: int | None,
          pairs: bool) -> tuple[int, dict]:
    where = graph.where(name)
    if not rows:
        raise SynthError(f"{where}: input '{inp}' has no rows to render")
    if index is not None:
        if not 0 <= index < len(rows):
            raise SynthError(f"{where}: --index {index} is out of range: the stage renders {len(rows)} rows "
                             f"(--index 0 to {len(rows) - 1})")
        return index, rows[index]
    if row_id is None:
        return 0, rows[0]
    for i, row in enumerate(rows):
        if str(row.get("id")) == row_id:
            return i, row
    if pairs:  # a pairwise critic renders pairs: a judged row's id picks its first pair
        for i, row in enumerate(rows):
            if row.get("a_id") == row_id:
                return i, row
    raise SynthError(f"{where}: --row {row_id!r}: input '{inp}' has no row with that id")


def _render_calls(graph: Graph, owner: str, name: str, statuses, trained, row_id, index) -> dict:
    """The requests generate stage `name` (owner's own, or its companion) makes for one row: through
    requests.build_requests, the run's own rendering and ids."""
    stage = graph.stage(name)
    rows, notes = _rows(graph, name, statuses)
    i, row = _pick(graph, owner, stage.input, rows, row_id, index, pairs=name in graph.pairs_by)
    config = graph.teacher_config(stage.teacher, trained)
    if stage.teacher in graph.stage_teachers:
        if stage.teacher not in trained:
            notes.append(f"teacher '{stage.teacher}' is a train stage's model that has not been trained yet: the "
                         "request ids are placeholders until it is")
        elif statuses[stage.teacher].stale:
            notes.append(f"teacher '{stage.teacher}' is a train stage's model and is stale: `synth run` trains it "
                         "again first, and its new model gives new request ids")
    planned = build_requests(graph, name, [row], config.model)
    if planned.unrendered:
        _, exc = planned.unrendered[0]
        raise MissingValue(f"{exc}; `synth run` sends nothing for this row and records it in synth.errors (cause "
                           "missing_value)", exc.column)
    cached = cached_ids(graph.store, [r.id for r in planned.requests])
    template = graph.templates[name]
    messages = planned.requests[0].messages
    return {"stage": owner, "calls": name, "kind": graph.stage(owner).kind, "input": stage.input,
            "row_id": str(row.get("id")), "index": i, "rows": len(rows), "teacher": stage.teacher,
            "model": config.model, **_template_info(template), "prompt_id": prompt_id(messages),
            "messages": messages,
            "requests": [{"id": r.id, "sample": r.sample, "cached": r.id in cached} for r in planned.requests],
            "notes": notes}


def _render_export(graph: Graph, name: str, statuses, row_id, index) -> dict:
    """An export of a dataset's own rows renders its template on each row of its input, ordered by id
    (stages/export.py); nothing is sent."""
    stage = graph.stage(name)
    inp = stage.input
    notes = []
    if inp in graph.seeds and (statuses[inp].stale or stage_rows(graph, inp, from_store=True) is None):
        rows = stage_rows(graph, inp, from_store=False)
    else:
        rows = stage_rows(graph, inp, from_store=True)
        if rows is None:
            raise SynthError(f"{graph.where(name)}: input '{inp}' has not run; run `synth run {graph.path} {inp}` "
                             "first")
        if statuses[inp].stale:
            notes.append(f"input '{inp}' is stale ({statuses[inp].reason}): `synth run` runs it again first, so its "
                         "rows may change; these are its rows in the store now")
    rows = sorted(rows, key=lambda r: str(r["id"]))  # the export's `ORDER BY id`
    i, row = _pick(graph, name, inp, rows, row_id, index, pairs=False)
    template = graph.templates[name]
    messages = template.render(row, graph.where(name))
    notes.append("an export writes these prompt turns (with the row's "
                 f"'{stage.response}' as the assistant turn); it sends no request")
    return {"stage": name, "calls": name, "kind": "export", "input": inp, "row_id": str(row.get("id")), "index": i,
            "rows": len(rows), "teacher": None, "model": None, **_template_info(template), "prompt_id": None,
            "messages": messages, "requests": [], "notes": notes}


def _template_info(template: Template) -> dict:
    return {"template": template.name, "path": str(template.path), "parse": template.spec.parse}


def print_render(calls: list[dict], fmt: str) -> None:
    if fmt == "json":
        for c in calls:
            click.echo(json.dumps(c, ensure_ascii=False))
        return
    first = calls[0]
    click.echo(f"stage {first['stage']} ({first['kind']}) · input {first['input']}, row {first['row_id']!r} "
               f"(index {first['index']} of {first['rows']}) · nothing sent, nothing written")
    for note in dict.fromkeys(n for c in calls for n in c["notes"]):
        click.echo(f"note: {note}")
    shown: dict[str, str] = {}  # prompt id -> the call that printed those messages
    for c in calls:
        who = f"teacher {c['teacher']} (model {c['model']})" if c["teacher"] else "no teacher"
        click.echo(f"\n=== {c['calls']} · {who} · template {c['template']} ({c['path']}) · parse {c['parse']}")
        if c["prompt_id"] is not None and c["prompt_id"] in shown:
            click.echo(f"(the same messages as {shown[c['prompt_id']]})")
        else:
            for m in c["messages"]:
                click.echo(f"--- {m['role']}")
                click.echo(m["content"])
            if c["prompt_id"] is not None:
                shown[c["prompt_id"]] = c["calls"]
        for r in c["requests"]:
            click.echo(f"request {r['id']} (sample {r['sample']}): {'cached' if r['cached'] else 'not cached'}")


def run_prompts(pipeline: Path, stage: str | None, row_id: str | None, index: int | None, fmt: str, console) -> None:
    """The `synth prompts` command: the listing without STAGE, else STAGE's render on one row."""
    if stage is None and (row_id is not None or index is not None):
        raise SynthError("synth prompts: --row and --index pick a row of a stage; name the STAGE "
                         "(synth prompts PIPELINE STAGE --row ID)")
    graph = load_pipeline(pipeline)
    if stage is None:
        print_templates(template_rows(graph), fmt, console)
    else:
        print_render(render_stage(graph, stage, row_id, index), fmt)
