"""The pairs stage: preference pairs (chosen, rejected) for DPO, mined from the store.

Rules, each within a group (default: the samples of one input row):
- `by: <verify stage>`  verified > failed: a sample that passed against one that failed;
- `by: <vote stage>`    plurality > minority: a passing sample against a `minority_answer` one;
- `by: <judge stage>`   judge-high > judge-low: critic scores differ by at least `min_margin` (> 0);
- `versus: <generate stage>`  teacher > student: an input stage sample against a student sample of
  the same group (PLaD / SODA style; put the teacher samples through a keep stage first to pair
  only verified ones).
A pair stores the two row ids, the rule and the margin (synth.pairs) — never text copies; the
stage's view joins the texts for reading. Pairs are distinct by text: a candidate whose two texts are
the same is no preference and is dropped, and samples that repeat the same two texts make one
candidate, not several (else a repeated pair would be trained on, and weighted, once per repeat).
Selection is deterministic under `seed`: candidates are ordered by md5(seed, group, chosen text,
rejected text) within their group and the first `max_per_input` are kept — by texts, so that a fresh run
of the same pipeline picks the same pairs even where the samples' request ids differ (a trained
student's carry its model directory, named by run id).
"""

from __future__ import annotations

from synth.config import PairsStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import ROWS, Graph, Kind, Ref
from synth.store import Store, fetch_one, now, quote_ident, sql_str

RULES = {"verify": "verified", "vote": "plurality", "judge": "judge"}


COLUMNS = ["id", "input_id", "rule", "margin", "chosen_id", "rejected_id", "chosen_text", "rejected_text"]


def references(stage: PairsStage, stages) -> list[Ref]:
    return [Ref("input", (stage.input,), ROWS), Ref("by", (stage.by,) if stage.by else (), tuple(RULES)),
            Ref("versus", (stage.versus,) if stage.versus else (), ROWS)]


def check(graph: Graph, name: str) -> list[str]:
    stage: PairsStage = graph.stage(name)
    if (stage.by is None) == (stage.versus is None):
        raise SynthError(f"{graph.where(name)}: give exactly one of 'by' (a verify, vote or judge stage) or "
                         "'versus' (a stage of student samples)")
    for source in [stage.input] + ([stage.versus] if stage.versus else []):
        if stage.group_by not in graph.columns[source]:
            raise SynthError(f"{graph.where(name, 'group_by')}: key 'group_by': {source!r} has no column "
                             f"{stage.group_by!r}")
    return COLUMNS


def rule_of(graph: Graph, name: str) -> str:
    stage: PairsStage = graph.stage(name)
    return "teacher_student" if stage.versus else RULES[graph.stage(stage.by).kind]


def candidates_sql(graph: Graph, name: str) -> str:
    """SELECT grp, chosen_id, rejected_id, margin, chosen_text, rejected_text: every candidate pair of
    the rule (texts for the distinct-by-text selection in run)."""
    stage: PairsStage = graph.stage(name)
    src, g = quote_ident(stage.input), quote_ident(stage.group_by)
    rule = rule_of(graph, name)
    if rule == "teacher_student":
        other = quote_ident(stage.versus)
        return (f"SELECT t.{g} AS grp, t.id AS chosen_id, s.id AS rejected_id, NULL::DOUBLE AS margin, "
                f"t.text AS chosen_text, s.text AS rejected_text FROM {src} t JOIN {other} s ON s.{g} = t.{g}")
    by = stage.by
    rows = (f"SELECT i.id, i.{g} AS grp, i.text, v.passed, v.score, v.reason FROM {src} i JOIN synth.verdicts v "
            f"ON v.row_id = CAST(i.id AS VARCHAR) AND v.stage = {sql_str(by)}")
    if rule == "verified":
        cond, margin = "c.passed AND NOT r.passed", "NULL::DOUBLE"
    elif rule == "plurality":
        cond, margin = "c.passed AND r.reason = 'minority_answer'", "c.score - r.score"
    else:
        cond = f"c.score IS NOT NULL AND r.score IS NOT NULL AND c.score - r.score >= {max(stage.min_margin, 1e-9)}"
        margin = "c.score - r.score"
    return (f"WITH x AS ({rows}) SELECT c.grp, c.id AS chosen_id, r.id AS rejected_id, {margin} AS margin, "
            f"c.text AS chosen_text, r.text AS rejected_text "
            f"FROM x c JOIN x r ON c.grp = r.grp AND c.id <> r.id WHERE {cond}")


def run(ctx: RunContext, name: str) -> dict:
    graph, run_id = ctx.graph, ctx.run_id
    stage: PairsStage = graph.stage(name)
    rule = rule_of(graph, name)
    # which candidates are taken: by their texts, not their row ids. A trained student's request ids carry
    # its model directory (named by run id), so an order by ids would pick other pairs on every fresh run
    # of the same pipeline; the texts are what the student wrote, the same every time.
    by_ids = f"md5(concat_ws('|', {int(stage.seed)}, chosen_id, rejected_id))"  # which of equal texts: any
    by_texts = f"md5(concat_ws('|', {int(stage.seed)}, CAST(grp AS VARCHAR), chosen_text, rejected_text))"
    distinct = (f"SELECT * FROM ({candidates_sql(graph, name)}) WHERE chosen_text IS DISTINCT FROM rejected_text "
                f"QUALIFY row_number() OVER (PARTITION BY grp, chosen_text, rejected_text ORDER BY {by_ids}) = 1")
    select = (f"SELECT {sql_str(name)} AS stage, CAST(chosen_id AS VARCHAR) AS chosen_id, "
              f"CAST(rejected_id AS VARCHAR) AS rejected_id, CAST(grp AS VARCHAR) AS input_id, {sql_str(rule)} AS rule, "
              f"margin, ? AS run_id, ? AS created_at FROM (SELECT *, row_number() OVER (PARTITION BY grp ORDER BY "
              f"{by_texts}) AS k FROM ({distinct})) WHERE k <= {int(stage.max_per_input)}")
    with ctx.store.write() as con:
        for source in filter(None, (stage.input, stage.versus)):
            cols = {c[0] for c in con.execute(f"SELECT * FROM {quote_ident(source)} LIMIT 0").description}
            if "text" not in cols:
                raise SynthError(f"stage '{name}': its samples '{source}' have no 'text' column; pair the samples "
                                 "of a generate stage (or a keep stage of one)")
        # history: earlier runs' pairs stay; synth.pairs shows this run's once the stage is recorded
        con.execute(f"INSERT INTO synth.pair_history BY NAME {select}", [run_id, now()])
        n, groups = fetch_one(con, "SELECT count(*), count(DISTINCT input_id) FROM synth.pair_history "
                                   "WHERE stage = ? AND run_id = ?", [name, run_id])
        create_view(con, name)
        ctx.record(con, name, "done", n, rule=rule, inputs=groups)
    ctx.console.print(f"  {name}: {n} pairs ({rule}) over {groups} inputs")
    return {"rows": n, "rule": rule, "inputs": groups}


def create_view(con, name: str) -> None:
    Store.replace_view(con, name, (
        "SELECT p.chosen_id || ':' || p.rejected_id AS id, p.input_id, p.rule, p.margin, p.chosen_id, "
        "p.rejected_id, c.text AS chosen_text, r.text AS rejected_text "
        "FROM synth.pairs p LEFT JOIN synth.completions c ON c.id = p.chosen_id "
        f"LEFT JOIN synth.completions r ON r.id = p.rejected_id WHERE p.stage = {sql_str(name)}"))


KIND = Kind(name="pairs", run=run, references=references, check=check)
