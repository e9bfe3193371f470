"""Request building, shared by the stages that ask models (generate, and through their companion
generate stages judge and evaluate): which rows a stage renders, and the requests they become.

Contract (DESIGN.md, "Data model"): a request's id is the hash of (model, rendered messages, sampling
params, sample index; and a teacher's reasoning_tags when not the default: answers are stored split by them), so the same row, template, model and params always give the same ids (the
cache), and rows that render the same messages share their requests (`collapsed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from synth.errors import MissingValue
from synth.graph import Graph
from synth.ids import content_hash, prompt_id, request_id
from synth.store import Store, fetch_one, quote_ident
from synth.teachers import DEFAULT_REASONING_TAGS, Request

PAIR_COLUMNS = ["a", "b", "a_id", "b_id"]  # what a pairwise critic's template gets besides the row's columns


@dataclass
class Planned:
    requests: list[Request]  # unique by id, in input order
    input_of: dict[str, str]  # request id -> input row id
    prompts: dict[str, list[dict]]  # prompt id -> messages
    prompt_of: dict[str, str]  # request id -> prompt id
    collapsed: int  # requests dropped because another input row rendered the same messages
    by_input: dict[str, list[str]]  # input row id -> its request ids, collapsed ones included
    unrendered: list[tuple[str, MissingValue]] = field(default_factory=list)  # (input row id, why): never sent


def build_requests(graph: Graph, name: str, rows: list[dict], model: str) -> Planned:
    """The requests of generate stage `name` (its template, samples and params) over `rows`, for
    `model`. A row whose template value is null is not sent (`unrendered`); the others go on."""
    stage = graph.stage(name)
    template = graph.templates[name]
    params = stage.params.model_dump(exclude_none=True)
    if name in graph.schemas:  # structured output: the schema is part of what is sent, hence of the ids
        params["json_schema"] = graph.schemas[name]
    # An answer is stored split by its teacher's reasoning_tags (trace apart from text), so other tags are
    # another stored result: part of the id when not the default (the ids of every default teacher stay
    # as they were). Not sent: the params the request carries stay as they are.
    id_params = params
    teacher = graph.spec.teachers.get(getattr(stage, "teacher", None) or "")
    tags = getattr(teacher, "reasoning_tags", DEFAULT_REASONING_TAGS)
    if tuple(tags) != DEFAULT_REASONING_TAGS:
        id_params = {**params, "reasoning_tags": list(tags)}
    planned = Planned([], {}, {}, {}, 0, {})
    for row in rows:
        try:
            messages = template.render(row, where=f"{graph.where(name)}: input row id {row.get('id')!r}")
        except MissingValue as exc:  # a null value: this row fails closed, the others go on
            planned.unrendered.append((str(row["id"]), exc))
            continue
        pid = prompt_id(messages)
        planned.prompts[pid] = messages
        for k in range(stage.samples):
            rid = request_id(model, messages, id_params, k)
            planned.by_input.setdefault(str(row["id"]), []).append(rid)
            if rid in planned.input_of:
                planned.collapsed += 1
                continue
            planned.input_of[rid] = str(row["id"])
            planned.prompt_of[rid] = pid
            planned.requests.append(Request(id=rid, messages=messages, params=params, sample=k))
    return planned


def input_rows(graph: Graph, name: str, from_store: bool) -> list[dict] | None:
    """The rows generate stage `name` renders: a load input's seeds, or the input's rows from the
    store (for a pairwise critic: the ordered pairs of those rows). None when they are not known yet
    (an upstream generate stage has not run)."""
    rows = stage_rows(graph, graph.stage(name).input, from_store)
    if rows is not None and name in graph.pairs_by:
        return pair_rows(rows, graph.pairs_by[name])
    return rows


def stage_rows(graph: Graph, name: str, from_store: bool) -> list[dict] | None:
    """A stage's rows: a load stage's seeds (from_store False), else its relation in the store; None
    when the store has none yet."""
    if name in graph.seeds and not from_store:
        return graph.seeds[name].table.to_pylist()
    if not graph.store.exists():
        return None
    with graph.store.read() as con:
        exists = fetch_one(con, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' "
                                "AND table_name = ?", [name])[0]
        if not exists:
            return None
        return con.sql(f"SELECT * FROM {quote_ident(name)}").to_arrow_table().to_pylist()


def pair_rows(rows: list[dict], group_by: str) -> list[dict]:
    """Every ordered pair (A, B) of distinct rows in the same group: A's columns plus a, b (the two
    texts) and a_id, b_id; the pair's id hashes the two row ids. Deterministic order: groups and members
    sorted by id. Seen in both orders, a critic's position bias cancels."""
    groups: dict = {}
    for r in sorted(rows, key=lambda r: str(r["id"])):
        groups.setdefault(r.get(group_by), []).append(r)
    out = []
    for _, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for first in members:
            for second in members:
                if first["id"] == second["id"]:
                    continue
                base = {k: v for k, v in first.items() if k not in ("id", *PAIR_COLUMNS)}
                out.append({**base, "id": content_hash([str(first["id"]), str(second["id"])]),
                            "a": first.get("text"), "b": second.get("text"),
                            "a_id": str(first["id"]), "b_id": str(second["id"])})
    return out


def cached_ids(store: Store, ids: list[str]) -> set[str]:
    """The ids among `ids` that have a completion (the cache)."""
    if not store.exists() or not ids:
        return set()
    with store.read() as con:
        con.register("_ids", pa.table({"id": ids}))
        return {r[0] for r in con.execute("SELECT c.id FROM synth.completions c JOIN _ids USING (id)").fetchall()}
