"""The verify filter: an answer against a reference column (exact, numeric, math: synth/verify.py), or
code run against tests in the sandbox (synth/sandbox.py). Fails closed: an answer that cannot be
extracted or compared is a failure with its reason."""

from __future__ import annotations

from synth import sandbox
from synth.config import VerifyStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import Graph
from synth.verdict_store import filter_kind, need_column
from synth.verdicts import Verdict
from synth.verify import check_extract, compare, extract_answer


def check(graph: Graph, name: str) -> None:
    stage: VerifyStage = graph.stage(name)
    need_column(graph, name, "answer", stage.answer)
    if stage.reference == stage.answer:
        raise SynthError(f"{graph.where(name, 'reference')}: key 'reference': it names the same column as 'answer' "
                         f"({stage.answer!r}), so every row would match itself; in a generate stage's rows the input's "
                         f"own column is 'input_{stage.answer}'")
    if stage.method == "code":
        if not stage.tests:
            raise SynthError(f"{graph.where(name, 'tests')}: key 'tests': method code needs the column with the tests")
        need_column(graph, name, "tests", stage.tests)
    else:
        if not stage.reference:
            raise SynthError(f"{graph.where(name, 'reference')}: key 'reference': method {stage.method} needs the "
                             "column with the reference answer")
        need_column(graph, name, "reference", stage.reference)
    check_extract(graph.where(name, "extract"), stage.extract, stage.pattern, stage.field)


def verdicts(ctx: RunContext, name: str, rows: list[dict]) -> list[Verdict]:
    stage: VerifyStage = ctx.graph.stage(name)
    if stage.method == "code":  # run_code extracts the code (a fenced block) from the answer itself
        items = [(r.get(stage.answer), r.get(stage.tests)) for r in rows]
        return sandbox.run_code_many(items, timeout_s=stage.timeout_s, memory_mb=stage.memory_mb, workers=stage.workers)
    out = []
    for r in rows:
        raw = r.get(stage.answer)
        answer = extract_answer(None if raw is None else str(raw), stage.extract, stage.pattern, stage.field)
        ref = r.get(stage.reference)
        out.append(compare(answer, None if ref is None else str(ref), stage.method, stage.tolerance))
    return out


KIND = filter_kind("verify", judge_rows=verdicts, check=check)
