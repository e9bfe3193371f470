"""`synth report`: the comparison table of every evaluate stage (accuracy with a 95% interval, mean
output tokens, per model) and a PNG with accuracy per model and the filter funnel. A model trained
under several seeds (a train stage's `seeds`) is also one arm: its mean and range over the seeds, and
every pair of replicated arms compared replica by replica (synth/compare.py: the mean difference, a
paired t-test over seeds, McNemar within each seed).

Everything is computed from the store (synth.evaluations, synth.verdicts) at report time; matplotlib
is imported only here, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from synth import compare
from synth.config import EvaluateStage
from synth.inspection import stats_rows
from synth.stages.evaluate import summary


def report_data(pipeline) -> dict:

    evaluations, arms, comparisons = {}, {}, {}
    if pipeline.store.exists():
        with pipeline.store.read() as con:
            for name in pipeline.order:
                stage = pipeline.stage(name)
                if isinstance(stage, EvaluateStage):
                    evaluations[name] = summary(con, name, stage.models)
                    groups = compare.group(stage.models, pipeline.replicas)
                    if any(len(g) > 1 for g in groups.values()) and evaluations[name]:
                        results = compare.outcomes(con, name)
                        arms[name] = {arm: compare.arm_summary(results, models) for arm, models in groups.items()}
                        replicated = [a for a, models in groups.items() if len(models) > 1]
                        comparisons[name] = [{"a": b, "b": a, **compare.compare_arms(results, groups[b], groups[a])}
                                             for i, a in enumerate(replicated) for b in replicated[i + 1:]]
    return {"evaluations": evaluations, "arms": arms, "comparisons": comparisons, "funnel": stats_rows(pipeline)}


def print_report(data: dict, console: Console) -> None:
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
        for c in data.get("comparisons", {}).get(name, []):
            p_t = "-" if c["p_paired_t"] is None else f"{c['p_paired_t']:.3f}"
            per_seed = ", ".join(f"{x['diff_points']:+.1f} (McNemar p {x['p_mcnemar']:.3f})" for x in c["per_seed"])
            console.print(f"{c['a']} − {c['b']}: {c['diff_points']:+.1f} points on average over {c['seeds']} seeds "
                          f"[{c['min_points']:+.1f}, {c['max_points']:+.1f}], paired t-test p {p_t}; per seed: "
                          f"{per_seed}", highlight=False)


def write_png(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(name, rows) for name, rows in data["evaluations"].items() if rows]
    funnel = [r for r in data["funnel"] if r.get("judged")]
    panels = len(evals) + (1 if funnel else 0) or 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], evals):
        acc = [r["accuracy"] for r in rows]
        err = [[a - r["ci_low"] for a, r in zip(acc, rows)], [r["ci_high"] - a for a, r in zip(acc, rows)]]
        ax.bar([r["model"] for r in rows], acc, yerr=err, capsize=4, color="#4C72B0")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title(f"{name}: accuracy per model")
        for i, a in enumerate(acc):
            ax.text(i, min(a + 0.03, 0.97), f"{a:.2f}", ha="center")
    if funnel:
        ax = axes[0][len(evals)]
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
