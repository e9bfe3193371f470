"""The judge filter: an LLM critic through any teacher backend, pointwise or pairwise.

A judge stage `J` gets a companion generate stage `J_critic` (declared here, added to the graph when
the pipeline is loaded) that makes the critic calls. Critic calls are therefore ordinary cached generations — same
request ids, crash safety, error rows, lineage — and `J_critic` is queryable like any generate
stage. Rows whose critic prompts render identically share one call.

Pointwise (template `critic_score`, over the judged row's columns): one call per row; the score is
{"score": N} or the last `Score: N` line.
- score >= min_score (default 7) -> passed, score = the critic's score;
- score < min_score              -> failed, `low_score`;
- no parseable score             -> failed, `unparseable_judgment` (the raw judgment kept in details);
- no judgment (the call failed)  -> failed, `no_judgment`; a re-run retries the call.

Pairwise (template `critic_pairwise`, over the row's columns plus `a`, `b`): within each group
(default: the samples of one input row) every ordered pair of distinct samples is judged, so each
pair is seen in both orders and position bias cancels. A sample's score is its win rate over the
comparisons with a parseable `Winner: A|B`.
- win rate >= min_score (default 0.5) -> passed;  below -> failed, `low_win_rate`;
- a group with a single sample        -> failed, `no_pair` (nothing to rank it against);
- comparisons made, none parseable    -> failed, `unparseable_judgment`;
- comparisons not made yet            -> failed, `no_judgment`.
details: wins, comparisons, how many pairs the critic judged the same way in both orders, and the
request ids of the critic calls that judged the row (pointwise: `request_id`), for `synth why`.
"""

from __future__ import annotations

from synth.config import GenerateStage, JudgeStage
from synth.context import RunContext
from synth.graph import Companion, Graph
from synth.parsers import parse_score, parse_winner
from synth.requests import build_requests, pair_rows
from synth.store import quote_ident
from synth.verdict_store import filter_kind, need_column
from synth.verdicts import Verdict

DEFAULT_PROMPT = {"pointwise": "critic_score", "pairwise": "critic_pairwise"}
DEFAULT_MIN_SCORE = {"pointwise": 7.0, "pairwise": 0.5}


def critic_stage_name(name: str) -> str:
    return f"{name}_critic"


def companions(name: str, stage: JudgeStage) -> dict[str, Companion]:
    """The generate stage that makes a judge's critic calls (pairwise: over ordered pairs of samples)."""
    critic = GenerateStage(kind="generate", input=stage.input, teacher=stage.teacher,
                           prompt=stage.prompt or DEFAULT_PROMPT[stage.mode], samples=1, params=stage.params,
                           schema=stage.schema_, description=f"critic calls of judge stage '{name}' ({stage.mode})")
    return {critic_stage_name(name): Companion(critic, pairs_by=stage.group_by if stage.mode == "pairwise" else None)}


def check(graph: Graph, name: str) -> None:
    stage: JudgeStage = graph.stage(name)
    if stage.mode == "pairwise":
        need_column(graph, name, "group_by", stage.group_by)
        need_column(graph, name, "mode", "text")


def verdicts(ctx: RunContext, name: str, rows: list[dict]) -> list[Verdict]:
    stage: JudgeStage = ctx.graph.stage(name)
    min_score = stage.min_score if stage.min_score is not None else DEFAULT_MIN_SCORE[stage.mode]
    critic = critic_stage_name(name)
    model = ctx.teacher_config(stage.teacher).model
    with ctx.store.read() as con:
        judged = dict(con.execute(f"SELECT id, text FROM {quote_ident(critic)}").fetchall())
    if stage.mode == "pairwise":
        return _pairwise(ctx.graph, stage, critic, rows, judged, min_score, model)
    # Map rows to judgments through request ids: rows with identical critic prompts share a call.
    planned = build_requests(ctx.graph, critic, rows, model)
    out = []
    for row in rows:
        call = planned.by_input[str(row["id"])][0]
        text = judged.get(call)
        if text is None:
            out.append(Verdict.fail("no_judgment", None, {"request_id": call}))
            continue
        score = parse_score(text)["score"]
        details = {"judgment": text, "request_id": call}  # lineage: `synth why <request_id>`
        if score is None:
            out.append(Verdict.fail("unparseable_judgment", None, details))
        elif score >= min_score:
            out.append(Verdict.ok(score, details))
        else:
            out.append(Verdict.fail("low_score", score, details))
    return out


def _pairwise(graph: Graph, stage: JudgeStage, critic: str, rows: list[dict], judged: dict,
              min_score: float, model: str) -> list[Verdict]:
    pairs = pair_rows(rows, stage.group_by)
    planned = build_requests(graph, critic, pairs, model)
    wins = {str(r["id"]): 0 for r in rows}
    made = dict.fromkeys(wins, 0)
    parsed = dict.fromkeys(wins, 0)
    choice: dict[tuple[str, str], str | None] = {}  # (a_id, b_id) -> id of the sample the critic preferred
    calls: dict[str, list[str]] = {rid: [] for rid in wins}  # lineage: the critic calls that judged a row
    for pair in pairs:
        call = planned.by_input[pair["id"]][0]
        a, b = pair["a_id"], pair["b_id"]
        calls[a].append(call)
        calls[b].append(call)
        text = judged.get(call)
        if text is None:
            continue
        made[a] += 1
        made[b] += 1
        winner = parse_winner(text)["winner"]
        choice[(a, b)] = {"A": a, "B": b}.get(winner)
        if winner is None:
            continue
        parsed[a] += 1
        parsed[b] += 1
        wins[a if winner == "A" else b] += 1
    partners: dict[str, int] = {}
    for pair in pairs:
        partners[pair["a_id"]] = partners.get(pair["a_id"], 0) + 1
    out = []
    for row in rows:
        rid = str(row["id"])
        consistent = sum(1 for (a, b), w in choice.items() if a == rid and w is not None and choice.get((b, a)) == w)
        details = {"wins": wins[rid], "comparisons": parsed[rid], "consistent_pairs": consistent,
                   "calls": calls[rid]}
        if not partners.get(rid):
            out.append(Verdict.fail("no_pair"))
        elif not made[rid]:
            out.append(Verdict.fail("no_judgment"))
        elif not parsed[rid]:
            out.append(Verdict.fail("unparseable_judgment", None, details))
        else:
            rate = wins[rid] / parsed[rid]
            out.append(Verdict.ok(rate, details) if rate >= min_score else Verdict.fail("low_win_rate", rate, details))
    return out


KIND = filter_kind("judge", judge_rows=verdicts, check=check, companions=companions,
                   teachers=lambda stage: [("teacher", [stage.teacher])], later_keys={"schema_": "auto"})
