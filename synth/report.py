"""`synth report`: the comparison table of every evaluate stage (accuracy with a 95% interval, mean
output tokens, per model) and a PNG with accuracy per model and the filter funnel.

Everything is computed from the store (synth.evaluations, synth.verdicts) at report time; matplotlib
is imported only here, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from synth.config import EvaluateStage
from synth.inspection import stats_rows
from synth.stages.evaluate import summary


def report_data(pipeline) -> dict:

    evaluations = {}
    if pipeline.store.exists():
        with pipeline.store.read() as con:
            for name in pipeline.order:
                stage = pipeline.stage(name)
                if isinstance(stage, EvaluateStage):
                    evaluations[name] = summary(con, name, stage.models)
    return {"evaluations": evaluations, "funnel": stats_rows(pipeline)}


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
