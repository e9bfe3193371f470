"""The mix stage: several teachers' samples on one prompt set, combined into one training set by a rule.

    mixed: {kind: mix, inputs: [kept_a, kept_b], rule: weights, weights: {kept_a: 3, kept_b: 1}}
    data:  {kind: export, input: mixed, format: sft, path: out/mixed.parquet}

Each input is generated rows (a generate stage, or a keep/filter of one: a teacher and its filters); all
of them are samples on the same input stage (one prompt set). The output is a view of the rows taken,
with the columns the inputs share plus `source` (the input each row came from). Rules:
- union: every row of every input;
- quota: at most quota[input] rows of each (which ones: a seeded md5 order of input row, sample and
  text: reproducible across fresh runs);
- weights: shares in the given proportions: N = `size`, else the largest total the inputs allow
  (min over inputs of available / share), and round(share x N) rows of each, in the same order;
- best: per input row (input_id), the `per_input` rows with the highest verdict score over all inputs,
  each input ranked by its own `by` stage (a verify or judge stage on its rows); ties by md5 order.
The counts a rule takes are computed when the stage runs and recorded (`taken` per input); the stage
re-runs when an input re-runs (staleness), so they never go stale. `synth stats` shows per input (per
teacher) rows sampled, kept, taken and the cost per kept and per taken row.
"""

from __future__ import annotations

from synth.config import MixStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import ROWS, Graph, Kind, Ref
from synth.store import Store, fetch_one, quote_ident, sql_str

SCORED_BY = ("verify", "judge")  # the filter kinds whose verdict score ranks rows for rule best


def references(stage: MixStage, stages) -> list[Ref]:
    return [Ref("inputs", tuple(stage.inputs), ROWS),
            Ref("by", tuple((stage.by or {}).values()), SCORED_BY, hint=" whose verdict scores rank the rows")]


def check(graph: Graph, name: str) -> list[str]:
    """Generated rows of one prompt set; the rule's keys present, naming the inputs; the columns they share."""
    stage: MixStage = graph.stage(name)
    if len(set(stage.inputs)) != len(stage.inputs):
        raise SynthError(f"{graph.where(name, 'inputs')}: key 'inputs': an input is listed twice")
    prompt_sets = {}
    for inp in stage.inputs:
        root = graph.root(inp)
        if graph.stage(root).kind != "generate":
            raise SynthError(f"{graph.where(name, 'inputs')}: key 'inputs': {inp!r} carries {root!r}'s rows; a mix "
                             "combines generated samples (a generate stage, or a keep/filter of one)")
        prompt_sets[inp] = graph.stage(root).input
    if len(set(prompt_sets.values())) > 1:
        listed = ", ".join(f"{i} on {p!r}" for i, p in prompt_sets.items())
        raise SynthError(f"{graph.where(name, 'inputs')}: key 'inputs': a mix combines teachers on one prompt set, "
                         f"these sample different ones ({listed})")
    needed = {"quota": stage.quota, "weights": stage.weights, "best": stage.by}.get(stage.rule, {})
    key = {"quota": "quota", "weights": "weights", "best": "by"}.get(stage.rule)
    if key and needed is None:
        raise SynthError(f"{graph.where(name)}: rule {stage.rule} needs key {key!r} ({key}: {{input: ...}} for each "
                         "input)")
    for other in ("quota", "weights", "by", "size"):
        if other != key and getattr(stage, other) is not None and not (other == "size" and stage.rule == "weights"):
            raise SynthError(f"{graph.where(name, other)}: key {other!r} is not used by rule {stage.rule}; drop it")
    if key:
        if set(needed) != set(stage.inputs):
            raise SynthError(f"{graph.where(name, key)}: key {key!r}: give one entry per input ({', '.join(stage.inputs)});"
                             f" got {', '.join(needed) or 'none'}")
        if key == "quota" and any(v < 0 for v in needed.values()):
            raise SynthError(f"{graph.where(name, key)}: key 'quota': a quota is a number of rows, 0 or more")
        if key == "weights" and (any(v < 0 for v in needed.values()) or not sum(needed.values()) > 0):
            raise SynthError(f"{graph.where(name, key)}: key 'weights': shares are 0 or more, and not all 0")
        if key == "by":
            for inp, judge in needed.items():
                if graph.root(graph.stage(judge).input) != graph.root(inp):
                    raise SynthError(f"{graph.where(name, 'by')}: key 'by': {judge!r} judges the rows of "
                                     f"{graph.root(graph.stage(judge).input)!r}, not those of {inp!r}")
    shared = [c for c in graph.columns[stage.inputs[0]] if all(c in graph.columns[i] for i in stage.inputs[1:])]
    return shared + (["source"] if "source" not in shared else [])


def _order(seed: int) -> str:
    """A reproducible shuffle by what a row is (its input row, sample number and text), not by its request id:
    a trained teacher's ids carry its run-named model directory, so an id order picked other rows on every
    fresh run of the same pipeline (as pairs did; see pairs.py). The id only breaks ties."""
    content = f"md5(concat_ws('|', {int(seed)}, CAST(input_id AS VARCHAR), CAST(sample AS VARCHAR), text))"
    return f"{content}, md5(CAST(id AS VARCHAR) || ':' || {int(seed)})"


def taken_counts(stage: MixStage, available: dict[str, int]) -> dict[str, int] | None:
    """Rows taken from each input under rule quota or weights (None: the rule takes by rows, not counts)."""
    if stage.rule == "quota":
        return {i: min(stage.quota[i], available[i]) for i in stage.inputs}
    if stage.rule != "weights":
        return None
    total = sum(stage.weights.values())
    shares = {i: stage.weights[i] / total for i in stage.inputs}
    fits = min(available[i] / s for i, s in shares.items() if s > 0)
    size = stage.size if stage.size is not None else int(fits)
    return {i: min(available[i], round(shares[i] * size)) for i in stage.inputs}


def select_sql(graph: Graph, name: str, counts: dict[str, int] | None) -> str:
    stage: MixStage = graph.stage(name)
    columns = [c for c in graph.columns[name] if c != "source"]
    cols = ", ".join(quote_ident(c) for c in columns)
    parts = []
    for inp in stage.inputs:
        score = "NULL::DOUBLE"
        if stage.rule == "best":
            score = (f"(SELECT v.score FROM synth.verdicts v WHERE v.stage = {sql_str(stage.by[inp])} AND "
                     "v.row_id = CAST(i.id AS VARCHAR))")
        parts.append(f"SELECT {', '.join('i.' + quote_ident(c) for c in columns)}, {sql_str(inp)} AS source, "
                     f"{score} AS _score FROM {quote_ident(inp)} i")
    rows = " UNION ALL ".join(parts)
    if stage.rule == "union":
        return f"SELECT {cols}, source FROM ({rows})"
    if stage.rule == "best":
        rank = f"row_number() OVER (PARTITION BY input_id ORDER BY _score DESC NULLS LAST, {_order(stage.seed)})"
        return f"SELECT {cols}, source FROM (SELECT *, {rank} AS _rank FROM ({rows})) WHERE _rank <= {stage.per_input}"
    limit = "CASE source " + " ".join(f"WHEN {sql_str(i)} THEN {int(n)}" for i, n in counts.items()) + " END"
    rank = f"row_number() OVER (PARTITION BY source ORDER BY {_order(stage.seed)})"
    return f"SELECT {cols}, source FROM (SELECT *, {rank} AS _rank FROM ({rows})) WHERE _rank <= {limit}"


def run(ctx: RunContext, name: str) -> dict:
    stage: MixStage = ctx.graph.stage(name)
    with ctx.store.write() as con:
        available = {i: fetch_one(con, f"SELECT count(*) FROM {quote_ident(i)}")[0] for i in stage.inputs}
        Store.replace_view(con, name, select_sql(ctx.graph, name, taken_counts(stage, available)))
        taken = dict(con.execute(f"SELECT source, count(*) FROM {quote_ident(name)} GROUP BY source").fetchall())
        taken = {i: taken.get(i, 0) for i in stage.inputs}
        rows = sum(taken.values())
        ctx.record(con, name, "done", rows, available=available, taken=taken)
    ctx.console.print(f"  {name}: {stage.rule} of {len(stage.inputs)} inputs: "
                      + ", ".join(f"{taken[i]} of {available[i]} from {i}" for i in stage.inputs), highlight=False)
    if stage.rule == "weights" and stage.size is not None and rows < stage.size:
        ctx.console.print(f"  [bold yellow]{name}: warning: size {stage.size} asked, {rows} taken: an input has too "
                          "few rows for its share[/bold yellow]", highlight=False)
    return {"rows": rows, "taken": taken, "available": available}


KIND = Kind(name="mix", run=run, references=references, check=check)
