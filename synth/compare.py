"""Comparing evaluated models: replicas aggregated over seeds, paired differences with exact tests.

A train stage with `seeds` has one model per seed (graph.replicas). An evaluate stage's rows (one per
model and planned output: synth.evaluations) are compared on the same items:
- within one seed, models A and B are paired per output (input_id, sample): McNemar's exact test on the
  discordant pairs (A right, B wrong vs A wrong, B right), a two-sided binomial test at 1/2;
- over seeds, replica s of A is paired with replica s of B: the difference of accuracies per seed, its
  mean and range, and a paired t-test over the seeds (scipy.stats.ttest_rel; needs 2 or more seeds, and
  says little with 3 — the per-seed McNemar p-values are beside it).
scipy is imported inside the functions (~0.3 s).
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence


def outcomes(con, stage: str) -> dict[str, dict[tuple[str, int], bool]]:
    """model -> {(input_id, sample): passed} of an evaluate stage's current rows."""
    out: dict[str, dict[tuple[str, int], bool]] = {}
    for model, input_id, sample, passed in con.execute(
            "SELECT model, input_id, sample, passed FROM synth.evaluations WHERE stage = ?", [stage]).fetchall():
        out.setdefault(model, {})[(input_id, sample)] = bool(passed)
    return out


def mcnemar(a: Mapping, b: Mapping) -> dict:
    """A vs B on the items both were scored on: accuracies, the difference (points), the discordant counts
    and McNemar's exact two-sided p-value."""
    from scipy.stats import binomtest

    items = sorted(set(a) & set(b))
    a_only = sum(1 for i in items if a[i] and not b[i])
    b_only = sum(1 for i in items if b[i] and not a[i])
    n = len(items)
    p = binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    acc_a = sum(a[i] for i in items) / n if n else 0.0
    acc_b = sum(b[i] for i in items) / n if n else 0.0
    return {"n": n, "a_accuracy": acc_a, "b_accuracy": acc_b, "diff_points": 100 * (acc_a - acc_b),
            "a_only": a_only, "b_only": b_only, "p_mcnemar": float(p)}


def group(models: Sequence[str], replicas: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The evaluated models as arms: a replicated model's replicas under its name (seed order), any other
    model alone."""
    of = {r: name for name, rs in replicas.items() for r in rs}
    arms: dict[str, list[str]] = {}
    for m in models:
        arms.setdefault(of.get(m, m), []).append(m)
    return arms


def arm_summary(results: Mapping[str, Mapping], arm: Sequence[str]) -> dict:
    """An arm's accuracy over its replicas: mean, min, max and each replica's value."""
    values = [sum(results[m].values()) / len(results[m]) if results.get(m) else 0.0 for m in arm]
    low, high = min(values, default=0.0), max(values, default=0.0)
    mean = statistics.fmean(values) if values else 0.0
    # clamped: the float mean of equal values can fall an ulp outside them
    return {"models": list(arm), "values": values, "mean": min(max(mean, low), high), "min": low, "max": high}


def compare_arms(results: Mapping[str, Mapping], a: Sequence[str], b: Sequence[str]) -> dict:
    """Arm A vs arm B, replica by replica (seed order; an arm of one model is compared with each of the
    other's): the per-seed McNemar results, the mean and range of the differences, and the paired t-test's
    p-value over seeds (None with fewer than 2 pairs or no variation)."""
    from scipy.stats import ttest_rel

    if len(a) == 1 and len(b) > 1:
        a = list(a) * len(b)
    elif len(b) == 1 and len(a) > 1:
        b = list(b) * len(a)
    pairs = [mcnemar(results.get(x, {}), results.get(y, {})) for x, y in zip(a, b)]
    diffs = [p["diff_points"] for p in pairs]
    p_seeds = None
    if len(pairs) >= 2 and len(set(a)) > 1 and len(set(b)) > 1:
        accs_a, accs_b = [p["a_accuracy"] for p in pairs], [p["b_accuracy"] for p in pairs]
        if any(x != y for x, y in zip(accs_a, accs_b)) and len({x - y for x, y in zip(accs_a, accs_b)}) > 1:
            p_seeds = float(ttest_rel(accs_a, accs_b).pvalue)
    return {"diff_points": statistics.fmean(diffs) if diffs else 0.0, "min_points": min(diffs, default=0.0),
            "max_points": max(diffs, default=0.0), "per_seed": pairs, "p_paired_t": p_seeds,
            "seeds": len(pairs)}
