"""The demo's report, computed from the store: what the teacher gets right, what the filters kept,
how the students trained on unfiltered vs filtered data (and after DPO) do on held-out problems,
and the tokens and wall time of every stage.

It reads the stage names of examples/demo/pipeline.yaml (below); a pipeline without them gets one
line saying which is missing. Accuracies:
- teacher_accuracy: single samples of the teacher (stage `solutions`, sampled at the pipeline's
  temperature) that the verifier (`correct`) accepts, over every planned sample — on the seed
  problems, which the teacher never trained on. Its interval treats samples as independent; samples
  of one problem are correlated, so it is narrower than it should be.
- teacher_vote_accuracy: seed problems whose vote winner (stage `voted`: the plurality answer, with
  at least min_agreement of the samples, no tie) is correct.
- teacher_greedy_accuracy and student_*: the evaluate stage `eval` on the held-out problems (greedy).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from synth.errors import SynthError
from synth.inspection import stats_rows
from synth.stages.evaluate import summary, wilson
from synth.store import fetch_one, quote_ident

SAMPLES, VERIFIED, VOTED, EVAL = "solutions", "correct", "voted", "eval"
EVAL_MODELS = {"teacher": "teacher_greedy_accuracy", "student_a": "student_unfiltered_accuracy",
               "student_b": "student_filtered_accuracy", "student_b_dpo": "student_dpo_accuracy"}
LABELS = {
    "teacher_accuracy": "teacher, one sample",
    "teacher_vote_accuracy": "teacher, vote over samples",
    "teacher_greedy_accuracy": "teacher, greedy",
    "student_unfiltered_accuracy": "student A (all samples)",
    "student_filtered_accuracy": "student B (verified samples)",
    "student_dpo_accuracy": "student B + DPO",
}


def _check(pipeline) -> None:
    expected = {SAMPLES: "generate", VERIFIED: "verify", VOTED: "vote", EVAL: "evaluate"}
    for name, kind in expected.items():
        stage = pipeline.spec.stages.get(name)
        if stage is None or stage.kind != kind:
            raise SynthError(f"{pipeline.path}: the demo report reads a {kind} stage named {name!r}; "
                             "keep the demo pipeline's stage names (or use `synth report` for any pipeline)")
    missing = [m for m in EVAL_MODELS if m not in pipeline.stage(EVAL).models]
    if missing:
        raise SynthError(f"{pipeline.path}: stage 'eval': the demo report compares {', '.join(EVAL_MODELS)}; "
                         f"models lacks {', '.join(missing)}")


def demo_report(pipeline) -> dict:
    """Every figure of the demo's report, from the store (nothing is carried over from the run)."""

    _check(pipeline)
    samples = pipeline.stage(SAMPLES)
    with pipeline.store.read() as con:
        problems = fetch_one(con, f"SELECT count(*) FROM {quote_ident(samples.input)}")[0]
        planned = problems * samples.samples
        correct = fetch_one(con, "SELECT count(*) FILTER (WHERE passed) FROM synth.verdicts WHERE stage = ?",
                            [VERIFIED])[0]
        voted_right = fetch_one(con, f"""
            SELECT count(*) FILTER (WHERE ok) FROM (
                SELECT v.input_id, bool_or(v.passed AND c.passed) AS ok
                FROM {quote_ident(VOTED)} v JOIN {quote_ident(VERIFIED)} c USING (id) GROUP BY v.input_id)""")[0]
        evals = {r["model"]: r for r in summary(con, EVAL, list(EVAL_MODELS))}
        stages = _stage_rows(con, pipeline)
    accuracy = {"teacher_accuracy": (correct, planned), "teacher_vote_accuracy": (voted_right, problems)}
    for model, key in EVAL_MODELS.items():
        r = evals.get(model)
        accuracy[key] = (r["correct"], r["n"]) if r else (0, 0)
    report: dict = {k: (c / n if n else 0.0) for k, (c, n) in accuracy.items()}
    report["n_heldout"] = accuracy["student_filtered_accuracy"][1]
    report["n_seed_problems"] = problems
    report["samples_per_problem"] = samples.samples
    report["temperature"] = samples.params.temperature
    report["intervals"] = {k: list(wilson(c, n)) for k, (c, n) in accuracy.items()}
    report["counts"] = {k: {"correct": c, "n": n} for k, (c, n) in accuracy.items()}
    report["mean_output_tokens"] = {EVAL_MODELS[m]: r["mean_output_tokens"] for m, r in evals.items()
                                    if m in EVAL_MODELS}
    report["filtering_gain_points"] = round(100 * (report["student_filtered_accuracy"]
                                                   - report["student_unfiltered_accuracy"]), 1)
    report["dpo_gain_points"] = round(100 * (report["student_dpo_accuracy"] - report["student_filtered_accuracy"]), 1)
    report["funnel"] = [{k: r.get(k) for k in ("stage", "kind", "input", "judged", "passed", "reasons")}
                        for r in stats_rows(pipeline)]
    report["stages"] = stages
    return report


def _stage_rows(con, pipeline) -> list[dict]:
    """Per stage: kind, rows, tokens (generated: prompt + completion; trained: tokens seen) and the wall
    time of the run that last wrote it (synth.runs' counts)."""
    states = pipeline.store.stage_states()
    runs = {rid: json.loads(counts) if isinstance(counts, str) else (counts or {})
            for rid, counts in con.execute("SELECT id, counts FROM synth.runs").fetchall()}
    gen_tokens = dict(con.execute(
        "SELECT g.stage, sum(c.prompt_tokens + c.completion_tokens) FROM synth.generations g "
        "JOIN synth.completions c ON c.id = g.id GROUP BY g.stage").fetchall())
    train_tokens = dict(con.execute(
        "SELECT stage, max(CAST(json_extract(logs, '$.num_tokens') AS DOUBLE)) FROM synth.train_logs "
        "GROUP BY stage").fetchall())
    rows = []
    for name in pipeline.order:
        st = states.get(name)
        if st is None:
            rows.append({"stage": name, "kind": pipeline.stage(name).kind, "rows": None, "tokens": None,
                         "seconds": None})
            continue
        seconds = ((runs.get(st["run_id"]) or {}).get("stages") or {}).get(name, {}).get("seconds")
        tokens = gen_tokens.get(name) if st["kind"] == "generate" else train_tokens.get(name)
        rows.append({"stage": name, "kind": st["kind"], "rows": st["rows"],
                     "tokens": int(tokens) if tokens is not None else None, "seconds": seconds})
    return rows


def print_report(report: dict, console: Console) -> None:
    table = Table(title="synth demo: accuracy (95% Wilson interval)")
    for col in ("model", "measured on", "correct / n", "accuracy", "95% interval"):
        table.add_column(col, justify="left" if col in ("model", "measured on") else "right")
    on = {"teacher_accuracy": f"seed problems × {report['samples_per_problem']} samples, T={report['temperature']}",
          "teacher_vote_accuracy": "seed problems"}
    for key, label in LABELS.items():
        c = report["counts"][key]
        lo, hi = report["intervals"][key]
        table.add_row(label, on.get(key, "held-out problems, greedy"), f"{c['correct']} / {c['n']}",
                      f"{report[key]:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    console.print(table)
    console.print(f"filtering: student B − student A = {report['filtering_gain_points']:+.1f} points; "
                  f"DPO: B+DPO − B = {report['dpo_gain_points']:+.1f} points "
                  f"(held-out n = {report['n_heldout']})")
    funnel = Table(title="filter funnel")
    for col in ("stage", "kind", "judged", "passed", "rejected: reasons"):
        funnel.add_column(col, justify="right" if col in ("judged", "passed") else "left")
    for r in report["funnel"]:
        if r.get("judged") is None:
            continue
        reasons = ", ".join(f"{x['reason']} {x['rows']}" for x in r.get("reasons") or [])
        funnel.add_row(r["stage"], r["kind"], str(r["judged"]), str(r["passed"]), reasons)
    console.print(funnel)
    stages = Table(title="stages (wall time of the run that built each)")
    for col in ("stage", "kind", "rows", "tokens", "seconds"):
        stages.add_column(col, justify="left" if col in ("stage", "kind") else "right")
    for r in report["stages"]:
        stages.add_row(r["stage"], r["kind"], _n(r["rows"]), _n(r["tokens"]),
                       "-" if r["seconds"] is None else f"{r['seconds']:.1f}")
    console.print(stages)
    if "this_run" in report:
        t = report["this_run"]
        console.print(f"this run: {t['seconds']:.0f} s, {t['stages_run']} stages run, {t['requests_sent']} requests "
                      f"sent, {t['requests_cached']} cached, {t['errors']} errors")


def _n(value) -> str:
    return "-" if value is None else f"{value:,}"


def write_png(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, funnel_ax, time_ax) = plt.subplots(1, 3, figsize=(17, 4.8),
                                                     gridspec_kw={"width_ratios": [1.4, 1, 1]})
    keys = list(LABELS)
    values = [report[k] for k in keys]
    errors = [[v - report["intervals"][k][0] for k, v in zip(keys, values)],
              [report["intervals"][k][1] - v for k, v in zip(keys, values)]]
    colors = ["#8172B2"] * 3 + ["#C44E52", "#55A868", "#4C72B0"]
    acc_ax.bar(range(len(keys)), values, yerr=errors, capsize=4, color=colors)
    acc_ax.set_xticks(range(len(keys)), [LABELS[k].replace(" (", "\n(").replace(", ", ",\n") for k in keys],
                      fontsize=8)
    acc_ax.set_ylim(0, 1)
    acc_ax.set_ylabel("accuracy (95% Wilson interval)")
    acc_ax.set_title(f"accuracy (held-out n = {report['n_heldout']})")
    for i, v in enumerate(values):
        acc_ax.text(i, min(v + 0.04, 0.96), f"{v:.2f}", ha="center")
    funnel = [r for r in report["funnel"] if r.get("judged")]
    names = [r["stage"] for r in funnel]
    funnel_ax.barh(names, [r["judged"] for r in funnel], color="#DDDDDD", label="judged")
    funnel_ax.barh(names, [r["passed"] for r in funnel], color="#55A868", label="passed")
    for i, r in enumerate(funnel):
        reasons = ", ".join(f"{x['reason']} {x['rows']}" for x in (r.get("reasons") or [])[:2])
        funnel_ax.text(r["judged"] * 0.02, i + 0.3, reasons, fontsize=7, va="center")
    funnel_ax.invert_yaxis()
    funnel_ax.set_title("filter funnel (rows)")
    funnel_ax.legend(loc="lower right", fontsize=8)
    timed = [r for r in report["stages"] if r.get("seconds")]
    time_ax.barh([r["stage"] for r in timed], [r["seconds"] for r in timed], color="#4C72B0")
    time_ax.invert_yaxis()
    time_ax.tick_params(axis="y", labelsize=7)
    time_ax.set_xlabel("seconds")
    time_ax.set_title("wall time per stage")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
