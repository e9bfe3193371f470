"""Self-consistency voting, as one DuckDB query over the input stage.

For each group (default: the samples of one input row): answers fall into equivalence classes (the
method's canonical key: normalised string, canonical number, or math-verify canonical form, computed
once per DISTINCT answer in Python); a sample's agreement share is |its class| / |samples in the
group| (samples without an answer count in the denominator). Verdicts:
- no answer                                 -> failed, reason `no_answer`, score NULL;
- not in the plurality class                -> failed, `minority_answer`, score = its share;
- plurality class but share < min_agreement -> failed, `low_agreement`;
- a tie for the plurality                   -> failed, `low_agreement` (no class wins);
- every sample of the group the same text (of MIN_TELLING_CHARS or more: a bare answer repeats under any
  sampling), when at least UNSAMPLED_SHARE of such groups (of 2 or more samples) are so
                                            -> failed, `identical_samples`: the teacher did not sample (a
  server that ignores temperature, greedy decoding), so copies are not independent votes. Below that
  share, identical groups are a confident model's (at temperature 0.7 a well-trained teacher writes the
  same solution 8 times for a third of the demo's problems) and vote as usual;
- otherwise                                 -> passed, score = share.
"""

from __future__ import annotations

import pyarrow as pa

from synth import verify
from synth.store import quote_ident

UNSAMPLED_SHARE = 0.5  # groups all one text, of those with 2+ samples, from which the teacher "did not sample"
# Texts shorter than this say nothing about sampling: a bare answer (`{"answer": 7}`, a structured-output
# stage's whole text, or "Paris") repeats under any temperature when the model is sure. Groups all of one such
# text are left out of the unsampled share, and never fail `identical_samples` (groups whose texts differ
# count, whatever their length: they show sampling).
MIN_TELLING_CHARS = 64


def telling(text: str) -> str:
    """SQL, an aggregate over one group's samples: whether the group can tell a teacher that did not sample
    from one that did: its texts differ, or they are long enough (MIN_TELLING_CHARS; a null text counts as
    empty). Read by vote below and by the generate stage's `identical` figure."""
    return f"(count(DISTINCT {text}) > 1 OR min(length(coalesce({text}, ''))) >= {MIN_TELLING_CHARS})"


def vote(con, source: str, answer: str, group_by: str, method: str, min_agreement: float,
         text: str | None = None) -> pa.Table:
    """Verdict table (row_id, passed, score, reason, details) for every row of `source`. `text`: the
    column of the samples' whole texts, when the rows have one (a group of identical texts fails)."""

    a, g = quote_ident(answer), quote_ident(group_by)
    distinct = [r[0] for r in con.execute(f"SELECT DISTINCT CAST({a} AS VARCHAR) FROM {source} "
                                          f"WHERE {a} IS NOT NULL").fetchall()]
    keys = pa.table({"answer": pa.array(distinct, pa.string()),
                     "class": pa.array([verify.canonical(x, method) for x in distinct], pa.string())})
    con.register("_synth_vote_keys", keys)
    try:
        return con.sql(vote_sql(source, a, g, "_synth_vote_keys", min_agreement,
                                quote_ident(text) if text else None)).to_arrow_table()
    finally:
        con.unregister("_synth_vote_keys")


def vote_sql(source: str, answer: str, group: str, keys: str, min_agreement: float, text: str | None = None) -> str:
    sample_text = f"CAST(i.{text} AS VARCHAR)" if text else "NULL::VARCHAR"
    return f"""
    WITH s AS (
        SELECT CAST(i.id AS VARCHAR) AS row_id, i.{group} AS grp, k.class, {sample_text} AS sample_text
        FROM {source} i LEFT JOIN {keys} k ON k.answer = CAST(i.{answer} AS VARCHAR)),
    sizes AS (SELECT grp, class, count(*) AS n FROM s WHERE class IS NOT NULL GROUP BY ALL),
    totals AS (SELECT grp, count(*) AS total,
                      {telling("sample_text")} AS telling,
                      count(*) >= 2 AND count(sample_text) = count(*) AND count(DISTINCT sample_text) = 1
                          AND {telling("sample_text")} AS identical
               FROM s GROUP BY ALL),
    top AS (SELECT grp, top_n, count(*) FILTER (WHERE n = top_n) AS tied FROM (
              SELECT grp, n, max(n) OVER (PARTITION BY grp) AS top_n FROM sizes) GROUP BY grp, top_n),
    unsampled AS (SELECT coalesce(count(*) FILTER (WHERE identical)
                                  >= {UNSAMPLED_SHARE} * count(*) FILTER (WHERE total >= 2 AND telling)
                                  AND count(*) FILTER (WHERE total >= 2 AND telling) > 0, false) AS yes FROM totals)
    SELECT s.row_id,
           (s.class IS NOT NULL AND NOT (o.identical AND u.yes) AND z.n = t.top_n AND t.tied = 1
            AND z.n / o.total >= {min_agreement}) AS passed,
           z.n / o.total AS score,
           CASE WHEN s.class IS NULL THEN 'no_answer'
                WHEN o.identical AND u.yes THEN 'identical_samples'
                WHEN z.n < t.top_n THEN 'minority_answer'
                WHEN t.tied > 1 OR z.n / o.total < {min_agreement} THEN 'low_agreement'
           END AS reason,
           NULL::VARCHAR AS details  -- score is the share; the class is the answer's canonical key
    FROM s JOIN totals o ON o.grp IS NOT DISTINCT FROM s.grp CROSS JOIN unsampled u
    LEFT JOIN sizes z ON z.grp IS NOT DISTINCT FROM s.grp AND z.class = s.class
    LEFT JOIN top t ON t.grp IS NOT DISTINCT FROM s.grp
    """
