"""Throughput of synth's filters, one section per filter, against plain reference implementations.

    .venv/bin/python bench/filter_throughput.py [--vote-rows 1000000] [--vote-samples 8]
        [--docs 20000] [--words 200] [--rounds 3] [--ref-docs 2000] [--threshold 0.8] [--subst 0.01]
        [--sections vote,near-dedup]

Section "vote": synth.vote.vote (self-consistency, method exact) over a table of `--vote-rows`
synthetic samples (`--vote-samples` per input; correct with p = 0.6, else one of 3 distractors, 5 %
without an answer) against a hand-written single DuckDB query computing the same verdicts on the
same table, both on 2 DuckDB threads, both materialised as Arrow; the verdicts are checked equal.
Goals: ratio >= 0.8 and >= 4M rows/s.

The near-dedup section then pins the process to one CPU core (where the OS allows) and runs
single-threaded, so its figures are per core.

Section "near-dedup": synth.dedup.near_duplicates against a plain datasketch loop.

- Corpus (deterministic, seed 0): a vocabulary of 5,000 made-up words drawn with Zipf-like
  frequencies, `--docs` documents of about `--words` words (uniformly 80-120 %), written as
  capitalised sentences with commas and full stops. 5 % of the documents (1,000 of the default
  20,000) are planted near-duplicates: copies of another document, placed after it, with `--subst`
  of their words (at least one) replaced by other vocabulary words. The default 1 % keeps planted
  pairs at a true 5-word-shingle Jaccard of about 0.9 (each substituted word breaks up to 5
  shingles); the true similarities are printed. 3 % would put them near 0.75, inside the MinHash
  estimate's noise for any threshold that low (`--subst 0.03 --threshold 0.7`: recall about 0.89).
  Planted sources are distinct, and no copy is a source.
- candidate, synth: `near_duplicates(ids, texts, threshold=--threshold)` on the whole corpus
  (`dedup_form`, bulk shingle hashing, MinHash via update_batch, LSH tuned for recall, greedy keep).
- baseline, "reference loop", written inline below: the datasketch README way, for each document a
  MinHash with per-shingle `update(shingle.encode())` (default SHA1 hash), `MinHashLSH.query`, a
  Jaccard check of the candidates, `insert` when kept; default MinHashLSH parameters for the
  threshold. It uses the same normalised words and shingles (synth.dedup.dedup_form), so the two
  differ only in how sketches are made and indexed. It is too slow for the whole corpus in a short
  run, so it runs on a second corpus of the same kind with `--ref-docs` documents (seed 1, its own
  5 % planted copies); synth runs on that one too, so the same-docs ratio is printed beside the
  headline one (synth on the full corpus, with its larger index, over the reference loop).
- Rounds are interleaved (reference, synth small, synth full, ...); medians and their ratio are
  printed. Quality from synth's verdicts (identical every round, checked): recall = planted copies
  flagged `duplicate_of:<their source>` / planted copies; precision = flagged rows that are planted
  copies / flagged rows. The reference loop's recall and precision on its corpus are printed too.

Goals: >= 1,000 docs/s per core and recall >= 0.95.

The last line is one JSON object: {"bench", "value", "baseline", "unit", "ratio", "goal", ...}: the
headline figures of the first section that ran (near-dedup: value = synth docs/s, baseline =
reference loop docs/s, plus "recall", "precision", "recall_goal"), "cores", "sections" (the
sections that ran, in order) and "results" (every section's figures by name).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: one core, one thread

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synth.dedup import dedup_form, near_duplicates  # noqa: E402

GOAL_DOCS_PER_S = 1000.0
GOAL_RECALL = 0.95


def pin_one_core() -> str:
    """Pin this process to one CPU (the first it may use); say which, or why not."""
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        return f"not pinned ({exc.__class__.__name__}); single-threaded"


# ---- the synthetic corpus --------------------------------------------------------------------------

@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    source_of: dict[str, str]  # planted copy id -> id of the document it copies


def make_vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choices(letters, k=rng.randint(2, 10))))
    return sorted(words)


def render(words: list[str], breaks: list[int]) -> str:
    """Words -> sentences: breaks[i] is 0 (space), 1 (comma) or 2 (full stop) after word i."""
    out, capital = [], True
    for w, b in zip(words, breaks):
        out.append((w.capitalize() if capital else w) + ("", ",", ".")[b])
        capital = b == 2
    return " ".join(out)


def make_corpus(n_docs: int, words_per_doc: int, subst: float, seed: int = 0) -> Corpus:
    rng = random.Random(seed)
    vocab = make_vocabulary(rng)
    cum = list(_cumulative(1.0 / (r + 1) for r in range(len(vocab))))  # Zipf-like frequencies
    n_planted = n_docs // 20
    n_orig = n_docs - n_planted
    docs: list[tuple[list[str], list[int]]] = []
    for _ in range(n_orig):
        n = rng.randint(int(words_per_doc * 0.8), int(words_per_doc * 1.2))
        words = rng.choices(vocab, cum_weights=cum, k=n)
        breaks = rng.choices((0, 1, 2), weights=(84, 6, 10), k=n)
        breaks[-1] = 2
        docs.append((words, breaks))
    sources = rng.sample(range(n_orig), n_planted)
    for s in sources:
        words, breaks = docs[s]
        copy = list(words)
        for pos in rng.sample(range(len(copy)), max(1, round(subst * len(copy)))):
            new = copy[pos]
            while new == copy[pos]:
                new = rng.choice(vocab)
            copy[pos] = new
        docs.append((copy, breaks))
    # A random order in which every copy comes after its source.
    keys = [rng.random() for _ in docs]
    for k, s in enumerate(sources):
        c = n_orig + k
        if keys[c] < keys[s]:
            keys[c], keys[s] = keys[s], keys[c]
    order = sorted(range(len(docs)), key=keys.__getitem__)
    id_of = {d: f"d{pos:06d}" for pos, d in enumerate(order)}
    return Corpus(ids=[id_of[d] for d in order], texts=[render(*docs[d]) for d in order],
                  source_of={id_of[n_orig + k]: id_of[s] for k, s in enumerate(sources)})


def _cumulative(xs):
    total = 0.0
    for x in xs:
        total += x
        yield total


def shingle_set(text: str, k: int) -> set[tuple[str, ...]]:
    w = dedup_form(text).split()
    return {tuple(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}


# ---- section: near-dedup -------------------------------------------------------------------------

def reference_loop(ids: list[str], texts: list[str], threshold: float, num_perm: int, shingle: int,
                   seed: int) -> dict[str, str]:
    """The plain datasketch loop: per-shingle update, query, verify, insert. Returns {dup id: kept id}."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[str, MinHash] = {}
    flagged: dict[str, str] = {}
    for rid, text in zip(ids, texts):
        words = dedup_form(text).split()
        if not words:
            continue
        m = MinHash(num_perm=num_perm, seed=seed)
        for i in range(max(1, len(words) - shingle + 1)):
            m.update(" ".join(words[i:i + shingle]).encode("utf-8"))
        best, best_id = -1.0, None
        for key in lsh.query(m):
            j = kept[key].jaccard(m)
            if j > best:
                best, best_id = j, key
        if best >= threshold:
            flagged[rid] = best_id
        else:
            lsh.insert(rid, m)
            kept[rid] = m
    return flagged


def section_near_dedup(args) -> dict:
    print(f"near-dedup: {pin_one_core()}", flush=True)  # per-core figures; runs after the 2-thread vote
    started = time.perf_counter()
    corpus = make_corpus(args.docs, args.words, args.subst)
    small = make_corpus(min(args.ref_docs, args.docs), args.words, args.subst, seed=1)
    built = time.perf_counter() - started
    n, n_small = len(corpus.texts), len(small.texts)
    text_of = dict(zip(corpus.ids, corpus.texts))
    true_j = sorted(len(a & b) / len(a | b) for a, b in (
        (shingle_set(text_of[s], 5), shingle_set(text_of[c], 5)) for c, s in list(corpus.source_of.items())[:300]))
    mean_words = sum(len(t.split()) for t in corpus.texts) / n
    print(f"near-dedup: {n} docs (~{mean_words:.0f} words each, {len(corpus.source_of)} planted copies with "
          f"{args.subst:.1%} of words substituted; true 5-shingle Jaccard of planted pairs: min "
          f"{true_j[0]:.3f}, median {statistics.median(true_j):.3f}), threshold {args.threshold}, num_perm 128, "
          f"shingle 5; reference loop on a {n_small}-doc corpus of the same kind ({len(small.source_of)} planted "
          f"copies), synth on both; corpora built in {built:.1f} s", flush=True)
    ref_rate, synth_small_rate, synth_rate = [], [], []
    seen = None
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        ref_flagged = reference_loop(small.ids, small.texts, args.threshold, 128, 5, 1)
        ref_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        small_verdicts = near_duplicates(small.ids, small.texts, threshold=args.threshold)
        small_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        verdicts = near_duplicates(corpus.ids, corpus.texts, threshold=args.threshold)
        synth_s = time.perf_counter() - t0
        ref_rate.append(n_small / ref_s)
        synth_small_rate.append(n_small / small_s)
        synth_rate.append(n / synth_s)
        print(f"round {r}  reference loop  {n_small:6d} docs {ref_s:7.2f} s {ref_rate[-1]:8.1f} docs/s · "
              f"synth {n_small:6d} docs {small_s:6.2f} s {synth_small_rate[-1]:8.1f} docs/s · "
              f"synth {n:6d} docs {synth_s:6.2f} s {synth_rate[-1]:8.1f} docs/s", flush=True)
        if seen is not None and (verdicts, small_verdicts) != seen:
            raise SystemExit("near_duplicates gave different verdicts in two rounds on the same input")
        seen = (verdicts, small_verdicts)
    flagged = {rid: v.reason.removeprefix("duplicate_of:") for rid, v in zip(corpus.ids, verdicts)
               if not v.passed}
    small_flagged = {rid: v.reason.removeprefix("duplicate_of:") for rid, v in zip(small.ids, small_verdicts)
                     if not v.passed}
    recall, precision = quality(flagged, corpus.source_of)
    small_recall, _ = quality(small_flagged, small.source_of)
    ref_recall, ref_precision = quality(ref_flagged, small.source_of)
    baseline, value = statistics.median(ref_rate), statistics.median(synth_rate)
    same_docs = statistics.median(synth_small_rate)
    ratio = value / baseline
    met = value >= GOAL_DOCS_PER_S and recall >= GOAL_RECALL
    print(f"median  reference loop {baseline:.1f} docs/s · synth near_duplicates {value:.1f} docs/s on {n} docs "
          f"({same_docs:.1f} on the reference's {n_small}) · ratio {ratio:.2f} ({same_docs / baseline:.2f} on the "
          f"same docs)", flush=True)
    print(f"quality synth recall {recall:.4f} precision {precision:.4f} ({len(flagged)} flagged of {n}) · on the "
          f"{n_small}-doc corpus: synth recall {small_recall:.4f}, reference loop recall {ref_recall:.4f} "
          f"precision {ref_precision:.4f} · goals >= {GOAL_DOCS_PER_S:.0f} docs/s/core and recall >= "
          f"{GOAL_RECALL}: {'met' if met else 'NOT MET'}", flush=True)
    return {"value": round(value, 1), "baseline": round(baseline, 1), "unit": "docs/s/core",
            "ratio": round(ratio, 3), "goal": GOAL_DOCS_PER_S, "recall": round(recall, 4),
            "precision": round(precision, 4), "recall_goal": GOAL_RECALL, "docs": n,
            "value_same_docs": round(same_docs, 1), "reference_docs": n_small,
            "reference_recall": round(ref_recall, 4), "threshold": args.threshold, "subst": args.subst}


def quality(flagged: dict[str, str], source_of: dict[str, str]) -> tuple[float, float]:
    """(recall, precision): planted copies flagged as duplicates of their own source / planted copies;
    flagged rows that are planted copies / flagged rows."""
    nan = float("nan")
    recall = sum(flagged.get(c) == s for c, s in source_of.items()) / len(source_of) if source_of else nan
    precision = sum(rid in source_of for rid in flagged) / len(flagged) if flagged else nan
    return recall, precision


# ---- sections ------------------------------------------------------------------------------------
# Each section is a function(args) -> dict of its figures (value, baseline, unit, ratio, goal, ...),
# registered here in run order. Add new sections (e.g. "vote") below this line.

VOTE_GOAL_RATIO = 0.8
VOTE_GOAL_ROWS_PER_S = 4_000_000


def make_samples(con, n_inputs: int, samples: int, seed: int = 0) -> int:
    """samples(id, input_id, answer): per input, each sample is its correct answer with p = 0.6, else
    one of 3 distractors; 5 % have no answer. Answers are integers below 1,000 written as text."""
    con.execute(f"""
        CREATE OR REPLACE TABLE samples AS
        SELECT printf('s%08d', i * {samples} + k) AS id, printf('q%07d', i) AS input_id,
               CASE WHEN r < 0.05 THEN NULL
                    WHEN r < 0.65 THEN CAST((i * 37) % 1000 AS VARCHAR)
                    ELSE CAST((i * 37 + 1 + CAST(floor((r - 0.65) / 0.35 * 3) AS INT)) % 1000 AS VARCHAR) END AS answer
        FROM (SELECT i, k, hash(i, k, {seed}) / 18446744073709551616.0 AS r
              FROM range({n_inputs}) t(i), range({samples}) u(k))""")
    return con.execute("SELECT count(*) FROM samples").fetchall()[0][0]


HAND_WRITTEN_VOTE = """
    WITH sizes AS (SELECT input_id, answer, count(*) AS n FROM samples WHERE answer IS NOT NULL GROUP BY ALL),
    totals AS (SELECT input_id, count(*) AS total FROM samples GROUP BY ALL),
    top AS (SELECT input_id, max(n) AS top_n, count(*) FILTER (WHERE n = top_n) AS tied
            FROM (SELECT input_id, n, max(n) OVER (PARTITION BY input_id) AS top_n FROM sizes) GROUP BY ALL)
    SELECT s.id AS row_id,
           (s.answer IS NOT NULL AND z.n = t.top_n AND t.tied = 1 AND z.n / o.total >= {tau}) AS passed,
           z.n / o.total AS score
    FROM samples s JOIN totals o USING (input_id)
    LEFT JOIN sizes z ON z.input_id = s.input_id AND z.answer = s.answer
    LEFT JOIN top t ON t.input_id = s.input_id
"""


def section_vote(args) -> dict:
    """synth.vote.vote (method exact: Python canonical keys for the distinct answers, then one query)
    against a hand-written single DuckDB query computing the same pass/score on the same table. Both
    materialise their result as Arrow; DuckDB runs on 2 threads; the verdicts must agree."""
    import duckdb

    from synth.vote import vote

    con = duckdb.connect(":memory:", config={"threads": 2})
    n_inputs = math.ceil(args.vote_rows / args.vote_samples)
    n = make_samples(con, n_inputs, args.vote_samples)
    tau = 0.5
    print(f"vote: {n:,} samples ({n_inputs:,} inputs x {args.vote_samples}), min_agreement {tau}, "
          f"DuckDB threads 2", flush=True)
    ours, hand = [], []
    for i in range(1, args.rounds + 1):
        started = time.perf_counter()
        expected = con.sql(HAND_WRITTEN_VOTE.format(tau=tau)).to_arrow_table()
        hand.append(n / (time.perf_counter() - started))
        started = time.perf_counter()
        got = vote(con, "samples", "answer", "input_id", "exact", tau)
        ours.append(n / (time.perf_counter() - started))
        if i == 1:
            a = {r: (p, s) for r, p, s in zip(*(expected[c].to_pylist() for c in ("row_id", "passed", "score")))}
            b = {r: (p, s) for r, p, s in zip(*(got[c].to_pylist() for c in ("row_id", "passed", "score")))}
            if a != b:
                raise SystemExit("vote: synth's verdicts differ from the hand-written query's")
        print(f"round {i}  hand-written query {hand[-1]:>12,.0f} rows/s · synth vote {ours[-1]:>12,.0f} rows/s",
              flush=True)
    value, baseline = statistics.median(ours), statistics.median(hand)
    ratio = value / baseline
    met = ratio >= VOTE_GOAL_RATIO and value >= VOTE_GOAL_ROWS_PER_S
    print(f"median  hand-written {baseline:,.0f} rows/s · synth {value:,.0f} rows/s · ratio {ratio:.3f} "
          f"(goals >= {VOTE_GOAL_RATIO} and >= {VOTE_GOAL_ROWS_PER_S:,} rows/s: {'met' if met else 'NOT met'})",
          flush=True)
    return {"value": round(value), "baseline": round(baseline), "unit": "rows/s (2 threads)", "ratio": round(ratio, 4),
            "goal": VOTE_GOAL_RATIO, "rows_goal": VOTE_GOAL_ROWS_PER_S, "rows": n, "threads": 2}


SECTIONS = {
    "vote": section_vote,
    "near-dedup": section_near_dedup,
}

# ---- end of sections -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description="synth filter throughput per core, against plain reference loops")
    ap.add_argument("--docs", type=int, default=20000, help="documents in the near-dedup corpus")
    ap.add_argument("--words", type=int, default=200, help="mean words per document")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ref-docs", type=int, default=2000, help="documents the near-dedup reference loop runs on")
    ap.add_argument("--threshold", type=float, default=0.8, help="near-dedup Jaccard threshold")
    ap.add_argument("--subst", type=float, default=0.01, help="fraction of words substituted in planted copies")
    ap.add_argument("--vote-rows", type=int, default=1_000_000, help="samples in the vote table")
    ap.add_argument("--vote-samples", type=int, default=8, help="samples per input in the vote table")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, in order (default all: {', '.join(SECTIONS)})")
    args = ap.parse_args()
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        ap.error(f"unknown section(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}")
    print(f"filter_throughput: python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    results = {name: SECTIONS[name](args) for name in names}
    head = results[names[0]]
    headline = ("value", "baseline", "unit", "ratio", "goal", "recall", "precision", "recall_goal")
    print(json.dumps({"bench": "filter_throughput", **{k: head[k] for k in headline if k in head},
                      "sections": names, "results": results}))


if __name__ == "__main__":
    main()
