"""`synth report`: what the pipeline's models get right, and whether the differences between them are real.

- **Teachers' samples**: per generate stage with a verify stage on its samples, the share of single
  samples the verifier accepts (`one sample`), and with a vote stage too, the share of inputs whose
  vote winner is correct (`vote`); 95% Wilson intervals (samples of one input are correlated: the
  single-sample interval is narrower than it should be).
- **Evaluations**: per evaluate stage, each model's accuracy with its 95% Wilson interval and mean
  output tokens; a model trained under several seeds (a train stage's `seeds`) is one arm: its mean and
  range over the seeds.
- **Paired differences**: pairs of models (arms) evaluated on the same rows, compared output by output
  (synth/compare.py): the difference in points, the discordant counts and McNemar's exact p-value (per
  seed for replicated arms, with a paired t-test over seeds). `--compare a,b` names the pairs; by
  default the report pairs a trained model with its `init` (what that step gained), trained models
  that start from the same `student` (what their data or method changed), a trained model with the
  teacher whose samples it learned from, and each trained model with each declared teacher evaluated
  beside it (the gap left); with no trained models among them, every pair (up to ALL_PAIRS_UP_TO models).

Everything is computed from the store (synth.evaluations, synth.verdicts, synth.generations) at report
time; matplotlib is imported only in write_png, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from synth import compare
from synth.config import EvaluateStage, TrainStage
from synth.errors import SynthError
from synth.inspection import stats_rows
from synth.pipeline import round_evaluations, rounds_stop
from synth.stages.evaluate import summary, wilson

ALL_PAIRS_UP_TO = 6  # models in an evaluate stage without trained ones: every pair up to this many


def report_data(pipeline, pairs: list[tuple[str, str]] | None = None) -> dict:
    """The report as plain data (`synth report --format json`). `pairs`: the comparisons asked for (model or
    arm names, a - b), else the default ones (module docstring)."""
    evaluations, arms, comparisons, teachers = {}, {}, {}, []
    evaluate_stages = [n for n in pipeline.order if isinstance(pipeline.stage(n), EvaluateStage)]
    if pairs:
        _check_pairs(pipeline, evaluate_stages, pairs)
    if pipeline.store.exists():
        with pipeline.store.read() as con:
            teachers = teacher_rows(con, pipeline)
            for name in evaluate_stages:
                models = pipeline.stage(name).models
                evaluations[name] = summary(con, name, models)
                if not evaluations[name]:
                    continue
                groups = compare.group(models, pipeline.replicas)
                results = compare.outcomes(con, name)
                if any(len(g) > 1 for g in groups.values()):
                    arms[name] = {arm: compare.arm_summary(results, ms) for arm, ms in groups.items()}
                chosen = [(a, b, "asked") for a, b in pairs if a in groups and b in groups] if pairs \
                    else default_pairs(pipeline, list(groups))
                comparisons[name] = [{"a": a, "b": b, "why": why, **_flat(compare.compare_arms(results, groups[a],
                                                                                               groups[b]))}
                                     for a, b, why in chosen]
        rounds = round_rows(pipeline)
    else:
        rounds = []
    return {"teachers": teachers, "evaluations": evaluations, "arms": arms, "comparisons": comparisons,
            "rounds": rounds, "funnel": stats_rows(pipeline)}


def round_rows(pipeline) -> list[dict]:
    """`rounds:`: per round (0: the stages outside the block), the accuracy of the round's model on the
    round's evaluate stage (the stop rule's, else the block's first evaluate stage and the first block train
    stage it evaluates), its gain over the round before, and whether the round ran or the stop rule ended it."""
    rounds = pipeline.spec.rounds
    if rounds is None:
        return []
    if rounds.stop is not None:
        evaluate, model = rounds.stop.evaluate, rounds.stop.model
    else:
        block = rounds.stages
        evaluate = next((n for n, c in block.items() if c.kind == "evaluate"), None)
        model = next((m for m in (block[evaluate].models if evaluate else []) if m in block and block[m].kind == "train"),
                     None)
        if evaluate is None or model is None:
            return []
    stopped = rounds_stop(pipeline)
    out, previous = [], None
    for r, (stage, name, found) in enumerate(round_evaluations(pipeline, evaluate, model)):
        correct, n = sum(c for c, _ in found.values()), sum(k for _, k in found.values())
        accuracy = correct / n if n else None
        status = "done" if n else "stopped" if stopped and r >= stopped[0] else "not run"
        out.append({"round": r, "evaluate": stage, "model": name, "n": n, "correct": correct, "accuracy": accuracy,
                    "gain_points": None if accuracy is None or previous is None else 100 * (accuracy - previous),
                    "status": status, **({"why": stopped[1]} if status == "stopped" else {})})
        previous = accuracy if accuracy is not None else previous
    return out


def _flat(c: dict) -> dict:
    """A comparison of two single models carries its one McNemar result at the top level too."""
    if c["seeds"] == 1:
        one = c["per_seed"][0]
        return {**c, **{k: one[k] for k in ("n", "a_accuracy", "b_accuracy", "a_only", "b_only", "p_mcnemar")}}
    return c


def _check_pairs(pipeline, evaluate_stages: list[str], pairs: list[tuple[str, str]]) -> None:
    known = {arm for n in evaluate_stages for arm in compare.group(pipeline.stage(n).models, pipeline.replicas)}
    for a, b in pairs:
        for m in (a, b):
            if m not in known:
                raise SynthError(f"{pipeline.path}: --compare {a},{b}: no evaluate stage evaluates {m!r} (models: "
                                 f"{', '.join(sorted(known)) or 'none'})")
        if not any({a, b} <= set(compare.group(pipeline.stage(n).models, pipeline.replicas))
                   for n in evaluate_stages):
            raise SynthError(f"{pipeline.path}: --compare {a},{b}: no evaluate stage evaluates both on the same "
                             "rows; a paired comparison needs one")


def default_pairs(pipeline, arms: list[str]) -> list[tuple[str, str, str]]:
    """(a, b, why) in the evaluate stage's order: a trained model against its `init` ("init"), trained
    models from the same `student` against each other ("same student"), a trained model against the
    teacher whose samples it learned from ("distilled from"), a trained model against each declared
    teacher (not trained by the pipeline) evaluated beside it ("vs teacher"); with no trained models,
    every pair of up to ALL_PAIRS_UP_TO models ("all pairs"). One comparison per pair, its first reason."""
    stages = {arm: pipeline.spec.stages.get(_first(pipeline, arm)) for arm in arms}  # None: a declared teacher
    trained = {arm: stage for arm, stage in stages.items() if isinstance(stage, TrainStage)}
    out: list[tuple[str, str, str]] = []
    for arm, stage in trained.items():
        init = pipeline.replica_of.get(stage.init, stage.init) if stage.init else None
        if init in arms:
            out.append((arm, init, "init"))
    names = list(trained)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = trained[a], trained[b]
            if not sa.init and not sb.init and sa.student == sb.student:
                out.append((b, a, "same student"))
    for arm in trained:
        source = _distilled_from(pipeline, _first(pipeline, arm))
        if source in arms and source != arm:
            out.append((arm, source, "distilled from"))
    out += [(arm, other, "vs teacher") for arm in trained for other in arms if other not in trained]
    if not trained and len(arms) <= ALL_PAIRS_UP_TO:
        out = [(b, a, "all pairs") for i, a in enumerate(arms) for b in arms[i + 1:]]
    seen: set[frozenset] = set()
    unique = []
    for a, b, why in out:  # one comparison per pair: the first reason found
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            unique.append((a, b, why))
    return unique


def _distilled_from(pipeline, train_stage: str) -> str | None:
    """The model whose samples a train stage learned from: its data's export → the rows' generate stage
    (through filters and keeps) → that stage's teacher (a replica's teacher as its arm's name)."""
    export = pipeline.spec.stages.get(pipeline.stage(train_stage).data)
    source = pipeline.spec.stages.get(pipeline.root(export.input)) if export is not None else None
    if source is None or source.kind != "generate":
        return None
    return pipeline.replica_of.get(source.teacher, source.teacher)


def _first(pipeline, arm: str) -> str:
    """The stage behind an arm: itself, or its first replica (a replicated train stage's name is not a stage)."""
    return pipeline.replicas.get(arm, [arm])[0] if arm in pipeline.replicas else arm


def teacher_rows(con, pipeline) -> list[dict]:
    """Per generate stage with a verify stage on its samples: its teacher's single-sample accuracy and,
    with a vote stage on the same samples, its vote accuracy (inputs whose plurality answer is correct)."""
    out = []
    for name in pipeline.order:
        stage = pipeline.stage(name)
        if stage.kind != "verify" or pipeline.stage(pipeline.root(name)).kind != "generate":
            continue
        samples = pipeline.root(name)
        judged, passed = con.execute("SELECT count(*), count(*) FILTER (WHERE passed) FROM synth.verdicts "
                                     "WHERE stage = ?", [name]).fetchone()
        if not judged:
            continue
        row = {"samples": samples, "teacher": pipeline.stage(samples).teacher, "verify": name,
               "one_sample": _rate(passed, judged), "votes": []}
        for vote in pipeline.order:
            if pipeline.stage(vote).kind == "vote" and pipeline.root(vote) == samples:
                right, inputs = con.execute(
                    "SELECT count(*) FILTER (WHERE ok), count(*) FROM (SELECT g.input_id, "
                    "coalesce(bool_or(w.passed AND c.passed), false) AS ok FROM synth.generations g "
                    "LEFT JOIN synth.verdicts w ON w.stage = ? AND w.row_id = g.id "
                    "LEFT JOIN synth.verdicts c ON c.stage = ? AND c.row_id = g.id "
                    "WHERE g.stage = ? GROUP BY g.input_id)", [vote, name, samples]).fetchone()
                if inputs:
                    row["votes"].append({"vote": vote, **_rate(right, inputs)})
        out.append(row)
    return out


def _rate(correct: int, n: int) -> dict:
    low, high = wilson(correct, n)
    return {"correct": correct, "n": n, "accuracy": correct / n if n else 0.0, "ci_low": low, "ci_high": high}


def print_report(data: dict, console: Console) -> None:
    if data.get("teachers"):
        table = Table(title="teachers' samples (verify: one sample right; vote: the plurality answer right)")
        for col in ("samples", "teacher", "one sample", "95% interval", "vote", "95% interval "):
            table.add_column(col, justify="left" if col in ("samples", "teacher") else "right")
        for t in data["teachers"]:
            one = t["one_sample"]
            vote = t["votes"][0] if t["votes"] else None
            table.add_row(t["samples"], t["teacher"], f"{one['accuracy']:.3f} ({one['correct']}/{one['n']})",
                          f"[{one['ci_low']:.3f}, {one['ci_high']:.3f}]",
                          f"{vote['accuracy']:.3f} ({vote['correct']}/{vote['n']})" if vote else "-",
                          f"[{vote['ci_low']:.3f}, {vote['ci_high']:.3f}]" if vote else "")
        console.print(table)
    if data.get("rounds"):
        table = Table(title="rounds (round 0: the stages before the block)")
        for col in ("round", "model", "evaluated by", "accuracy", "gain", "status"):
            table.add_column(col, justify="right" if col in ("round", "accuracy", "gain") else "left")
        for r in data["rounds"]:
            table.add_row(str(r["round"]), r["model"], r["evaluate"],
                          "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} ({r['correct']}/{r['n']})",
                          "" if r["gain_points"] is None else f"{r['gain_points']:+.1f} points",
                          r["status"] + (f": {r['why']}" if r.get("why") else ""))
        console.print(table)
    if not any(data["evaluations"].values()):
        console.print("no evaluate stage has run yet")
    for name, rows in data["evaluations"].items():
        table = Table(title=f"evaluate stage '{name}'")
        for col in ("model", "outputs", "correct", "accuracy", "95% interval", "mean output tokens"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in rows:
            tokens = "-" if r["mean_output_tokens"] is None else f"{r['mean_output_tokens']:.1f}"
            table.add_row(r["model"], str(r["n"]), str(r["correct"]), f"{r['accuracy']:.3f}",
                          f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", tokens)
        console.print(table)
        if name in data.get("arms", {}):
            arms = Table(title=f"evaluate stage '{name}': models over seeds")
            for col in ("model", "seeds", "mean accuracy", "range", "per seed"):
                arms.add_column(col, justify="left" if col in ("model", "per seed") else "right")
            for arm, a in data["arms"][name].items():
                arms.add_row(arm, str(len(a["values"])), f"{a['mean']:.3f}", f"[{a['min']:.3f}, {a['max']:.3f}]",
                             " ".join(f"{v:.3f}" for v in a["values"]))
            console.print(arms)
        if data.get("comparisons", {}).get(name):
            console.print(comparison_table(name, data["comparisons"][name]))


def comparison_table(name: str, comparisons: list[dict]) -> Table:
    table = Table(title=f"evaluate stage '{name}': paired differences (same rows; exact McNemar test)")
    replicated = any(c["seeds"] > 1 for c in comparisons)
    for col in ("a − b", "pairing", "difference", "a right only", "b right only", "McNemar p") + \
            (("over seeds",) if replicated else ()):
        table.add_column(col, justify="left" if col in ("a − b", "pairing", "over seeds") else "right")
    for c in comparisons:
        if c["seeds"] == 1:
            only_a, only_b, p, seeds = str(c["a_only"]), str(c["b_only"]), f"{c['p_mcnemar']:.3g}", ""
        else:
            only_a = " ".join(str(x["a_only"]) for x in c["per_seed"])
            only_b = " ".join(str(x["b_only"]) for x in c["per_seed"])
            p = " ".join(f"{x['p_mcnemar']:.3g}" for x in c["per_seed"])
            p_t = "-" if c["p_paired_t"] is None else f"{c['p_paired_t']:.3g}"
            seeds = f"{c['seeds']} seeds, range [{c['min_points']:+.1f}, {c['max_points']:+.1f}], paired t p {p_t}"
        table.add_row(f"{c['a']} − {c['b']}", c["why"], f"{c['diff_points']:+.1f} points", only_a, only_b, p,
                      *((seeds,) if replicated else ()))
    return table


def write_png(data: dict, path: Path) -> Path:
    """Per evaluate stage: accuracy per model (bars with their 95% interval, the value above the interval)
    and, where there are comparisons, the paired differences (points; the McNemar p beside each); the
    filter funnel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(name, rows) for name, rows in data["evaluations"].items() if rows]
    diffs = [(name, data.get("comparisons", {}).get(name)) for name, _ in evals if data.get("comparisons", {}).get(name)]
    funnel = [r for r in data["funnel"] if r.get("judged")]
    panels = len(evals) + len(diffs) + (1 if funnel else 0) or 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    at = iter(axes[0])
    for name, rows in evals:
        ax = next(at)
        acc = [r["accuracy"] for r in rows]
        err = [[a - r["ci_low"] for a, r in zip(acc, rows)], [r["ci_high"] - a for a, r in zip(acc, rows)]]
        ax.bar(range(len(rows)), acc, yerr=err, capsize=4, color="#4C72B0")
        ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30 if len(rows) > 4 else 0, ha="right"
                      if len(rows) > 4 else "center")
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title(f"{name}: accuracy per model")
        for i, r in enumerate(rows):  # above the interval's top, never on the error bar
            ax.text(i, r["ci_high"] + 0.02, f"{r['accuracy']:.2f}", ha="center", va="bottom", fontsize=9)
    for name, comparisons in diffs:
        ax = next(at)
        labels = [f"{c['a']} − {c['b']}" for c in comparisons]
        values = [c["diff_points"] for c in comparisons]
        ax.barh(range(len(values)), values, color=["#55A868" if v >= 0 else "#C44E52" for v in values])
        ax.set_yticks(range(len(values)), labels)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        span = max([abs(v) for v in values] + [1.0])
        ax.set_xlim(-1.6 * span, 1.6 * span)
        for i, c in enumerate(comparisons):
            p = c["p_mcnemar"] if c["seeds"] == 1 else c["p_paired_t"]
            note = f"{c['diff_points']:+.1f}" + ("" if p is None else f" (p {p:.2g})")
            v = c["diff_points"]
            ax.text(v + (0.05 if v >= 0 else -0.05) * span, i, note, va="center", ha="left" if v >= 0 else "right",
                    fontsize=9)
        ax.set_xlabel("difference in accuracy (points)")
        ax.set_title(f"{name}: paired differences (p: McNemar; over seeds: paired t)")
    if funnel:
        ax = next(at)
        names = [r["stage"] for r in funnel]
        ax.barh(names, [r["judged"] for r in funnel], color="#DDDDDD", label="judged")
        ax.barh(names, [r["passed"] for r in funnel], color="#55A868", label="passed")
        ax.invert_yaxis()
        ax.set_title("filter funnel (rows)")
        ax.legend(loc="lower right")
    if not evals and not funnel:
        axes[0][0].text(0.5, 0.5, "nothing to report yet", ha="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
