"""The demo's report, computed from the store: what the teacher gets right, what the filters kept,
how the students trained on unfiltered vs filtered data, by token-level distillation, after DPO and after
an on-policy KD round do on held-out problems (each student arm under several seeds), and the tokens
and wall time of every stage.

It reads the stage names of examples/demo/pipeline.yaml (below); a pipeline without them gets one
line saying which is missing. Accuracies:
- teacher_accuracy: single samples of the teacher (stage `solutions`, sampled at the pipeline's
  temperature) that the verifier (`correct`) accepts, over every planned sample — on the seed
  problems, which the teacher never trained on. Its interval treats samples as independent; samples
  of one problem are correlated, so it is narrower than it should be.
- teacher_vote_accuracy: seed problems whose vote winner (stage `voted`: the plurality answer, with
  at least min_agreement of the samples, no tie) is correct.
- teacher_greedy_accuracy and student_*: the evaluate stage `eval` on the held-out problems (greedy).
  A student arm trained under several seeds (`seeds:`) reports the mean over its seeds (the key), each
  seed's value (`per_seed`) and their range; a single model its 95% Wilson interval.
- comparisons (synth/compare.py): each method's arm against its baseline arm, seed by seed on the same
  problems: the mean difference in points (the `*_gain_points` keys), its range, a paired t-test over
  seeds and McNemar's exact test within each seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from synth import compare
from synth.errors import SynthError
from synth.inspection import stats_rows
from synth.stages.evaluate import summary, wilson
from synth.store import fetch_one, quote_ident

SAMPLES, VERIFIED, VOTED, EVAL = "solutions", "correct", "voted", "eval"
EVAL_MODELS = {"teacher": "teacher_greedy_accuracy", "student_a": "student_unfiltered_accuracy",
               "student_b": "student_filtered_accuracy", "student_c": "student_kd_accuracy",
               "student_b_dpo": "student_dpo_accuracy", "student_d": "student_onpolicy_accuracy"}
LABELS = {
    "teacher_accuracy": "teacher, one sample",
    "teacher_vote_accuracy": "teacher, vote over samples",
    "teacher_greedy_accuracy": "teacher, greedy",
    "student_unfiltered_accuracy": "A: SFT, all samples",
    "student_filtered_accuracy": "B: SFT, verified samples",
    "student_kd_accuracy": "C: KD, verified samples' top-8",
    "student_dpo_accuracy": "B + DPO",
    "student_onpolicy_accuracy": "D: B + on-policy KD",
}
# section 7 of the pipeline (answer formats): stage -> what it is; read when the pipeline has them
FORMATS = {"as_json": "asked for JSON (parse: json)",
           "as_json_schema": "asked for JSON, with a schema (xgrammar)",
           "as_json_final_number": "asked for JSON, parse: final_number"}
FORMAT_INPUT = "format_problems"
# name -> (method's arm, baseline arm): report key `<name>_gain_points` = mean over seeds of method - baseline
COMPARISONS = {"filtering": ("student_b", "student_a"), "kd": ("student_c", "student_b"),
               "dpo": ("student_b_dpo", "student_b"), "onpolicy": ("student_d", "student_b")}


def _arms(pipeline) -> dict[str, list[str]]:
    return compare.group(pipeline.stage(EVAL).models, pipeline.replicas)


def _check(pipeline) -> None:
    expected = {SAMPLES: "generate", VERIFIED: "verify", VOTED: "vote", EVAL: "evaluate"}
    for name, kind in expected.items():
        stage = pipeline.spec.stages.get(name)
        if stage is None or stage.kind != kind:
            raise SynthError(f"{pipeline.path}: the demo report reads a {kind} stage named {name!r}; "
                             "keep the demo pipeline's stage names (or use `synth report` for any pipeline)")
    missing = [m for m in EVAL_MODELS if m not in _arms(pipeline)]
    if missing:
        raise SynthError(f"{pipeline.path}: stage 'eval': the demo report compares {', '.join(EVAL_MODELS)}; "
                         f"models lacks {', '.join(missing)}")


def demo_report(pipeline) -> dict:
    """Every figure of the demo's report, from the store (nothing is carried over from the run)."""

    _check(pipeline)
    samples = pipeline.stage(SAMPLES)
    arms = _arms(pipeline)
    with pipeline.store.read() as con:
        problems = fetch_one(con, f"SELECT count(*) FROM {quote_ident(samples.input)}")[0]
        planned = problems * samples.samples
        correct = fetch_one(con, "SELECT count(*) FILTER (WHERE passed) FROM synth.verdicts WHERE stage = ?",
                            [VERIFIED])[0]
        voted_right = fetch_one(con, f"""
            SELECT count(*) FILTER (WHERE ok) FROM (
                SELECT v.input_id, bool_or(v.passed AND c.passed) AS ok
                FROM {quote_ident(VOTED)} v JOIN {quote_ident(VERIFIED)} c USING (id) GROUP BY v.input_id)""")[0]
        evals = {r["model"]: r for r in summary(con, EVAL, pipeline.stage(EVAL).models)}
        results = compare.outcomes(con, EVAL)
        stages = _stage_rows(con, pipeline)
    accuracy = {"teacher_accuracy": (correct, planned), "teacher_vote_accuracy": (voted_right, problems)}
    report: dict = {}
    per_seed, ranges, tokens = {}, {}, {}
    for arm, key in EVAL_MODELS.items():
        rows = [evals[m] for m in arms[arm] if m in evals]
        accuracy[key] = (sum(r["correct"] for r in rows), sum(r["n"] for r in rows))
        a = compare.arm_summary(results, arms[arm])
        report[key] = a["mean"]
        if len(arms[arm]) > 1:
            per_seed[key], ranges[key] = a["values"], [a["min"], a["max"]]
        tokens[key] = (sum(r["mean_output_tokens"] or 0 for r in rows) / len(rows)) if rows else None
    for key in ("teacher_accuracy", "teacher_vote_accuracy"):
        c, n = accuracy[key]
        report[key] = c / n if n else 0.0
    report = {k: report[k] for k in LABELS}  # the table's order
    report["n_heldout"] = evals[arms["student_b"][0]]["n"] if arms["student_b"][0] in evals else 0
    report["n_seed_problems"] = problems
    report["samples_per_problem"] = samples.samples
    report["temperature"] = samples.params.temperature
    report["seeds"] = max(len(m) for m in arms.values())
    report["intervals"] = {k: (ranges[k] if k in ranges else list(wilson(c, n))) for k, (c, n) in accuracy.items()}
    report["interval_kind"] = {k: "range over seeds" if k in ranges else "95% Wilson" for k in accuracy}
    report["per_seed"] = per_seed
    report["counts"] = {k: {"correct": c, "n": n} for k, (c, n) in accuracy.items()}
    report["mean_output_tokens"] = tokens
    report["comparisons"] = {}
    for name, (method, baseline) in COMPARISONS.items():
        c = compare.compare_arms(results, arms[method], arms[baseline])
        report["comparisons"][name] = {"method": method, "baseline": baseline, **c}
        report[f"{name}_gain_points"] = round(c["diff_points"], 1)
    report["funnel"] = [{k: r.get(k) for k in ("stage", "kind", "input", "judged", "passed", "reasons")}
                        for r in stats_rows(pipeline)]
    report["stages"] = stages
    report["formats"] = _formats(pipeline)
    return report


def _formats(pipeline) -> list[dict]:
    """Per answer-format stage (FORMATS): replies, how many its parser read (the stage's own `parsed`), how
    many are right (the answer equals gold as numbers); then the teacher in its own format (prompt solve,
    the evaluate stage's greedy rows) on the same problems. [] when the pipeline has no such stages."""
    names = [n for n in FORMATS if n in pipeline.spec.stages]
    if not names or FORMAT_INPUT not in pipeline.spec.stages:
        return []
    states = pipeline.store.stage_states()
    out = []
    with pipeline.store.read() as con:
        for name in names:
            parsed = ((states.get(name) or {}).get("detail") or {}).get("parsed") or {}
            columns = {r[0] for r in con.execute(f"DESCRIBE {quote_ident(name)}").fetchall()}
            right = fetch_one(con, f"SELECT count(*) FILTER (WHERE try_cast(answer AS DOUBLE) = try_cast(gold AS "
                                   f"DOUBLE)) FROM {quote_ident(name)}")[0] if {"answer", "gold"} <= columns else 0
            out.append({"stage": name, "label": FORMATS[name], "n": parsed.get("answers", 0),
                        "parsed": parsed.get("readable", 0), "correct": right})
        own = con.execute(f"SELECT count(*), count(*) FILTER (WHERE passed) FROM {quote_ident(EVAL)} "
                          f"WHERE model = 'teacher' AND input_id IN (SELECT id FROM {quote_ident(FORMAT_INPUT)})"
                          ).fetchone()
    out.append({"stage": EVAL, "label": "its own format (prompt solve, parse: boxed)", "n": own[0],
                "parsed": None, "correct": own[1]})
    return out


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
        rows.append({"stage": name, "in_file": pipeline.replica_of.get(name, pipeline.owner_of.get(name, name)),
                     "kind": st["kind"], "rows": st["rows"],
                     "tokens": int(tokens) if tokens is not None else None, "seconds": seconds})
    return rows


def print_report(report: dict, console: Console) -> None:
    seeds = report.get("seeds", 1)
    table = Table(title=f"synth demo: accuracy (students: mean over {seeds} seeds, and their range)")
    for col in ("model", "measured on", "correct / n", "accuracy", "interval", "per seed"):
        table.add_column(col, justify="left" if col in ("model", "measured on", "per seed") else "right",
                         no_wrap=col in ("model", "correct / n", "interval"))
    on = {"teacher_accuracy": f"seeds × {report['samples_per_problem']}, T={report['temperature']}",
          "teacher_vote_accuracy": "seed problems"}
    for key, label in LABELS.items():
        c = report["counts"][key]
        lo, hi = report["intervals"][key]
        kind = "seeds" if report["interval_kind"][key] == "range over seeds" else "95%"
        table.add_row(label, on.get(key, "held-out, greedy"), f"{c['correct']} / {c['n']}",
                      f"{report[key]:.3f}", f"{kind} [{lo:.3f}, {hi:.3f}]",
                      " ".join(f"{v:.3f}" for v in report.get("per_seed", {}).get(key, [])))
    console.print(table)
    for name, c in report["comparisons"].items():
        p_t = "-" if c["p_paired_t"] is None else f"{c['p_paired_t']:.3f}"
        mcnemar = ", ".join(f"{x['p_mcnemar']:.3f}" for x in c["per_seed"])
        console.print(f"{name}: {c['method']} − {c['baseline']} = {c['diff_points']:+.1f} points (mean of "
                      f"{c['seeds']} seeds; range {c['min_points']:+.1f} to {c['max_points']:+.1f}; paired t-test p "
                      f"{p_t}; McNemar p per seed {mcnemar}; held-out n = {report['n_heldout']})", highlight=False)
    funnel = Table(title="filter funnel")
    for col in ("stage", "kind", "judged", "passed", "rejected: reasons"):
        funnel.add_column(col, justify="right" if col in ("judged", "passed") else "left")
    for r in report["funnel"]:
        if r.get("judged") is None:
            continue
        reasons = ", ".join(f"{x['reason']} {x['rows']}" for x in r.get("reasons") or [])
        funnel.add_row(r["stage"], r["kind"], str(r["judged"]), str(r["passed"]), reasons)
    console.print(funnel)
    if report.get("formats"):
        formats = Table(title="answer formats: the teacher on the same held-out problems, greedy")
        for col in ("asked", "stage", "parsed / n", "right / n"):
            formats.add_column(col, justify="right" if "/" in col else "left")
        for r in report["formats"]:
            formats.add_row(r["label"], r["stage"], "-" if r["parsed"] is None else f"{r['parsed']} / {r['n']}",
                            f"{r['correct']} / {r['n']}")
        console.print(formats)
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
    # max(0, ...): the mean of equal per-seed values can exceed their max by a float ulp
    errors = [[max(0.0, v - report["intervals"][k][0]) for k, v in zip(keys, values)],
              [max(0.0, report["intervals"][k][1] - v) for k, v in zip(keys, values)]]
    colors = ["#8172B2"] * 3 + ["#C44E52", "#55A868", "#DD8452", "#4C72B0", "#937860"]
    acc_ax.bar(range(len(keys)), values, yerr=errors, capsize=4, color=colors[:len(keys)])
    for i, k in enumerate(keys):  # each seed's value as a dot on its arm's bar
        seeds = report.get("per_seed", {}).get(k, [])
        acc_ax.scatter([i] * len(seeds), seeds, color="black", s=8, zorder=3)
    acc_ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys], fontsize=7, rotation=30, ha="right")
    acc_ax.set_ylim(0, 1.08)
    acc_ax.set_ylabel("accuracy (students: mean, seed range, seeds as dots)")
    acc_ax.set_title(f"accuracy (held-out n = {report['n_heldout']})")
    for i, k in enumerate(keys):  # the label above the interval's top, never on the bar
        acc_ax.text(i, min(report["intervals"][k][1] + 0.02, 1.03), f"{values[i]:.2f}", ha="center", fontsize=8)
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
    timed: dict[str, list[float]] = {}  # the stages of the file: a replicated one's replicas summed
    for r in report["stages"]:
        if r.get("seconds"):
            timed.setdefault(r.get("in_file") or r["stage"], []).append(r["seconds"])
    slow = {n: t for n, t in timed.items() if sum(t) >= 1.0}
    labels = [f"{n} (×{len(t)})" if len(t) > 1 else n for n, t in slow.items()]
    time_ax.barh(labels, [sum(t) for t in slow.values()], color="#4C72B0")
    time_ax.invert_yaxis()
    time_ax.tick_params(axis="y", labelsize=7)
    time_ax.set_xlabel("seconds (stages of 1 s or more; replicas summed)")
    time_ax.set_title("wall time per stage")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
