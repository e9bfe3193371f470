"""The evaluate stage: models on held-out rows, scored by a verifier, summarised per model.

An evaluate stage `E` over models [m1, m2, ...] gets one companion generate stage `E_m1`, `E_m2`, ...
(declared here, added to the graph when the pipeline is loaded, like a judge's critic stage): each renders `prompt` over the
input rows and asks that model `samples` times with `params` — ordinary cached generations, so a
re-run asks nothing and an interrupted evaluation resumes. `E` then scores every output with the
`verify` settings (synth/verify.py: fail closed; the reference is the input row's own column) and
writes one row per (model, planned output) into synth.evaluations — an output that never came back
(an error, a timeout) counts as wrong with reason `no_output`, so models are compared on the same
items; its view is those rows. The summary — per model: outputs, correct, accuracy with
a 95% Wilson interval, mean output tokens — is computed from those rows by `summary()`, which
`synth report` prints and plots.
"""

from __future__ import annotations

import pyarrow as pa

from synth.config import EvaluateStage, GenerateStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import Companion, Graph, Kind
from synth.requests import build_requests, input_rows
from synth.store import Store, now, quote_ident, sql_str
from synth.verdicts import Verdict
from synth.verify import check_extract, compare, extract_answer

COLUMNS = ["model", "id", "input_id", "sample", "passed", "reason", "answer", "completion_tokens"]


def model_stage_name(name: str, model: str) -> str:
    return f"{name}_{model}"


def companions(name: str, stage: EvaluateStage) -> dict[str, Companion]:
    return {model_stage_name(name, m): Companion(GenerateStage(
        kind="generate", input=stage.input, teacher=m, prompt=stage.prompt, samples=stage.samples,
        params=stage.params, description=f"outputs of model '{m}' for evaluate stage '{name}'"))
        for m in stage.models}


def check(graph: Graph, name: str) -> list[str]:
    stage: EvaluateStage = graph.stage(name)
    v = stage.verify
    if len(set(stage.models)) != len(stage.models):
        raise SynthError(f"{graph.where(name, 'models')}: key 'models': a model is listed twice")
    check_extract(graph.where(name, "verify"), v.extract, v.pattern, v.field, prefix="verify.")
    if v.reference not in graph.columns[stage.input]:
        raise SynthError(f"{graph.where(name, 'verify')}: key 'verify.reference': the input has no column "
                         f"{v.reference!r} (its columns: {', '.join(graph.columns[stage.input])})")
    produced = graph.columns[model_stage_name(name, stage.models[0])]
    if v.answer not in produced:
        raise SynthError(f"{graph.where(name, 'verify')}: key 'verify.answer': the outputs have no column "
                         f"{v.answer!r} (they have: {', '.join(produced)}); parse it in the template "
                         "or extract it from `text`")
    return COLUMNS


def run(ctx: RunContext, name: str) -> dict:
    graph, run_id, console = ctx.graph, ctx.run_id, ctx.console
    stage: EvaluateStage = graph.stage(name)
    v = stage.verify
    rows = {k: [] for k in ("stage", "model", "id", "input_id", "sample", "passed", "reason", "answer",
                            "completion_tokens", "run_id", "created_at")}
    inputs = input_rows(graph, model_stage_name(name, stage.models[0]), from_store=True)
    references = {str(r["id"]): r.get(v.reference) for r in inputs}  # the input's own column, by row id
    with ctx.store.read() as con:
        for model in stage.models:
            gen_name = model_stage_name(name, model)
            outputs = {r[0]: r[1:] for r in con.execute(
                f"SELECT id, CAST({quote_ident(v.answer)} AS VARCHAR), completion_tokens FROM {quote_ident(gen_name)}"
            ).fetchall()}
            # Score every planned output: one that never came back (an error, a timeout) is a failure,
            # so that models are compared on the same items.
            planned = build_requests(graph, gen_name, inputs, ctx.teacher_config(model).model)
            for request in planned.requests:
                input_id = planned.input_of[request.id]
                reference = references.get(input_id)
                reference = None if reference is None else str(reference)
                if request.id not in outputs:
                    extracted, tokens = None, None
                    verdict = Verdict.fail("no_output")
                else:
                    answer, tokens = outputs[request.id]
                    extracted = extract_answer(answer, v.extract, v.pattern, v.field)
                    verdict = compare(extracted, reference, v.method, v.tolerance)
                rid, sample = request.id, request.sample
                for key, value in (("stage", name), ("model", model), ("id", rid), ("input_id", input_id),
                                   ("sample", sample), ("passed", verdict.passed), ("reason", verdict.reason),
                                   ("answer", extracted), ("completion_tokens", tokens), ("run_id", run_id),
                                   ("created_at", now())):
                    rows[key].append(value)
    table = pa.table(rows, schema=pa.schema([
        ("stage", pa.string()), ("model", pa.string()), ("id", pa.string()), ("input_id", pa.string()),
        ("sample", pa.int32()), ("passed", pa.bool_()), ("reason", pa.string()), ("answer", pa.string()),
        ("completion_tokens", pa.int32()), ("run_id", pa.string()), ("created_at", pa.timestamp("us"))]))
    with ctx.store.write() as con:
        # history: earlier runs' results stay; synth.evaluations shows this run's once the stage is recorded
        Store.insert_arrow(con, "synth.evaluation_history", table, mode="")
        ctx.record(con, name, "running", table.num_rows)
        Store.replace_view(con, name, "SELECT model, id, input_id, sample, passed, reason, answer, completion_tokens "
                                      f"FROM synth.evaluations WHERE stage = {sql_str(name)}")
        result = summary(con, name, stage.models)
        ctx.record(con, name, "done", table.num_rows, summary=result)
    for s in result:
        console.print(f"  {name}: {s['model']}: accuracy {s['accuracy']:.3f} "
                      f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}] over {s['n']} outputs")
    return {"rows": table.num_rows, "summary": result}


def summary(con, name: str, models: list[str] | None = None) -> list[dict]:
    """Per model (in `models` order, else by name): n, correct, accuracy, 95% Wilson interval, mean
    completion tokens — computed from the per-row results in synth.evaluations."""
    out = []
    found = con.execute("SELECT model, count(*), count(*) FILTER (WHERE passed), avg(completion_tokens) "
                        "FROM synth.evaluations WHERE stage = ? GROUP BY model ORDER BY model", [name]).fetchall()
    order = {m: i for i, m in enumerate(models or [])}
    for model, n, correct, tokens in sorted(found, key=lambda r: (order.get(r[0], len(order)), r[0])):
        low, high = wilson(correct, n)
        out.append({"model": model, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
                    "ci_low": low, "ci_high": high,
                    "mean_output_tokens": float(tokens) if tokens is not None else None})
    return out


def wilson(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of correct/n (scipy); (0, 0) when n is 0."""
    from scipy.stats import binomtest  # scipy takes ~0.3 s to import: only when a summary is made

    if not n:
        return 0.0, 0.0
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


KIND = Kind(name="evaluate", run=run, check=check, companions=companions,
            teachers=lambda stage: [("models", list(stage.models))])
