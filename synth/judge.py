"""The judge filter: an LLM critic through any teacher backend.

A judge stage `J` (pointwise) gets a companion generate stage `J_critic`, added to the pipeline when
it is loaded: it renders the critic template (default `critic_score`) over each judged row and asks
the judge's teacher once per row. Critic calls are therefore ordinary cached generations — same
request ids, crash safety, error rows and lineage (their input_id is the judged row's id) — and
`J_critic` is queryable like any generate stage. `J` then reads each judgment's score (JSON
{"score": N} or a `Score: N` line) and writes the verdicts:
- score >= min_score                   -> passed, score = the critic's score;
- score < min_score                    -> failed, reason `low_score`;
- a judgment without a parseable score -> failed, reason `unparseable_judgment` (raw judgment kept
  in details);
- no judgment (the critic call failed) -> failed, reason `no_judgment`; a re-run retries the call.
"""

from __future__ import annotations

from synth.config import GenerateStage, JudgeStage
from synth.parsers import parse_score
from synth.store import quote_ident
from synth.verdicts import Verdict

DEFAULT_PROMPT = {"pointwise": "critic_score", "pairwise": "critic_pairwise"}


def critic_stage_name(name: str) -> str:
    return f"{name}_critic"


def critic_stage(stage: JudgeStage, name: str) -> GenerateStage:
    """The generate stage that makes a judge's critic calls."""
    return GenerateStage(kind="generate", input=stage.input, teacher=stage.teacher,
                         prompt=stage.prompt or DEFAULT_PROMPT[stage.mode], samples=1, params=stage.params,
                         description=f"critic calls of judge stage '{name}'")


def verdicts(pipeline, name: str, rows: list[dict]) -> list[Verdict]:
    from synth.generate import build_requests

    stage: JudgeStage = pipeline.stage(name)
    # Rows whose critic prompts render identically share one critic call (one request id), so map
    # rows to judgments through the request ids, not the critic stage's input_id.
    planned = build_requests(pipeline, critic_stage_name(name), rows)
    with pipeline.store.read() as con:
        judged = dict(con.execute(f"SELECT id, text FROM {quote_ident(critic_stage_name(name))}").fetchall())
    out = []
    for row in rows:
        text = judged.get(planned.by_input[str(row["id"])][0])
        if text is None:
            out.append(Verdict.fail("no_judgment"))
            continue
        score = parse_score(text)["score"]
        details = {"judgment": text}
        if score is None:
            out.append(Verdict.fail("unparseable_judgment", None, details))
        elif score >= stage.min_score:
            out.append(Verdict.ok(score, details))
        else:
            out.append(Verdict.fail("low_score", score, details))
    return out
