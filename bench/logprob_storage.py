"""Bytes per generated token of stored teacher log-probs: synth.token_logprobs (one row per completion, flat
int32/float32 arrays; migration 12) vs the per-token layout it replaced (one DuckDB row per token with its
top-k as a list of {token, token_id, logprob} structs and the tokenizer repeated; migration 7), at k = 8
and k = 20.

    .venv/bin/python bench/logprob_storage.py [--completions 2000] [--tokens 200] [--vocab 49152] [--quick]

Each layout is written into its own fresh DuckDB file through synth's own writers (store.logprob_rows for
the compact one), checkpointed, and measured as the file's size minus the size of the same file with the
table empty; bytes per token = that / (completions x tokens). The data: token ids drawn Zipf-like from
--vocab (as text is), the top-k the sampled token and k-1 others, log-probs from a random softmax, token
strings of 3-8 characters (the old layout stored them; the compact one stores ids only). Goal: compact
<= 10 k bytes per token. Last line: one JSON object {"bench", "value", "baseline", "unit", "ratio",
"goal", ...}: value/baseline are bytes per token at k = 20 (compact, per-token), per-k figures in
`by_k`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OLD_TABLE = """CREATE TABLE logprobs (
    request_id VARCHAR, position INTEGER, token VARCHAR, token_id INTEGER, logprob DOUBLE,
    top STRUCT(token VARCHAR, token_id INTEGER, logprob DOUBLE)[], tokenizer VARCHAR,
    PRIMARY KEY (request_id, position))"""


def completions(n: int, length: int, k: int, vocab: int, seed: int) -> list[dict]:
    """n synthetic completions as teachers.token_logprobs dicts, plus their token strings."""
    import math

    rng = random.Random(seed)
    words = {}
    out = []
    for _ in range(n):
        ids = [min(vocab - 1, int(vocab ** rng.random()) - 1) for _ in range(length)]  # Zipf-like
        top_ids, top_lps, lps = [], [], []
        for token in ids:
            others = [rng.randrange(vocab) for _ in range(k - 1)]
            logits = [rng.gauss(0, 2) for _ in range(k)]
            z = math.log(sum(math.exp(x) for x in logits)) + 0.1
            ranked = sorted(zip([token] + others, [x - z for x in logits]), key=lambda e: -e[1])
            top_ids += [i for i, _ in ranked]
            top_lps += [v for _, v in ranked]
            lps.append(next(v for i, v in ranked if i == token))
        for i in ids + top_ids:
            if i not in words:
                words[i] = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(3, 8)))
        out.append({"k": k, "token_ids": ids, "tokens": None, "logprobs": lps, "top_ids": top_ids,
                    "top_tokens": None, "top_logprobs": top_lps, "_words": words})
    return out


def file_bytes(path: Path, fill) -> int:
    import duckdb

    con = duckdb.connect(str(path))
    fill(con)
    con.execute("CHECKPOINT")
    con.close()
    return path.stat().st_size


def measure(rows: list[dict], tmp: Path, tag: str) -> dict[str, float]:
    import duckdb

    from synth.store import MIGRATIONS, logprob_rows

    ddl = next(m for m in MIGRATIONS if "CREATE TABLE synth.token_logprobs" in m).split(";")[0]
    ddl = ddl.replace("synth.token_logprobs", "token_logprobs")
    ids = [f"req-{i:08d}" for i in range(len(rows))]
    tokens = sum(len(r["token_ids"]) for r in rows)

    def compact(con, data=True):
        con.execute(ddl)
        if data:
            con.register("t", logprob_rows(ids, rows, "/models/teacher"))
            con.execute("INSERT INTO token_logprobs SELECT * FROM t")

    def per_token(con, data=True):
        import pyarrow as pa

        con.execute(OLD_TABLE)
        if not data:
            return
        cols = {"request_id": [], "position": [], "token": [], "token_id": [], "logprob": [], "top": []}
        words = rows[0]["_words"]
        for rid, r in zip(ids, rows):
            k = r["k"]
            for t, (i, lp) in enumerate(zip(r["token_ids"], r["logprobs"])):
                cols["request_id"].append(rid)
                cols["position"].append(t)
                cols["token"].append(words[i])
                cols["token_id"].append(i)
                cols["logprob"].append(lp)
                cols["top"].append([{"token": words[a], "token_id": a, "logprob": b} for a, b in
                                    zip(r["top_ids"][t * k:(t + 1) * k], r["top_logprobs"][t * k:(t + 1) * k])])
        table = pa.table({**cols, "tokenizer": ["/models/teacher"] * len(cols["request_id"])})
        con.register("t", table)
        con.execute("INSERT INTO logprobs SELECT * FROM t")

    out = {}
    for name, fill in (("compact", compact), ("per_token", per_token)):
        empty = file_bytes(tmp / f"{tag}-{name}-empty.duckdb", lambda con: fill(con, data=False))
        full = file_bytes(tmp / f"{tag}-{name}.duckdb", fill)
        out[name] = (full - empty) / tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--completions", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=200, help="generated tokens per completion")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.completions, args.tokens = 100, 50
    by_k = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (8, 20):
            rows = completions(args.completions, args.tokens, k, args.vocab, seed=k)
            by_k[k] = measure(rows, Path(tmp), f"k{k}")
            c, p = by_k[k]["compact"], by_k[k]["per_token"]
            print(f"k={k:2d}  compact {c:7.1f} B/token (goal <= {10 * k})   per-token rows {p:7.1f} B/token   "
                  f"ratio {c / p:.3f}", flush=True)
    c20, p20 = by_k[20]["compact"], by_k[20]["per_token"]
    print(json.dumps({"bench": "logprob_storage", "value": round(c20, 1), "baseline": round(p20, 1),
                      "unit": "bytes per generated token at k=20", "ratio": round(c20 / p20, 3), "goal": 200,
                      "goal_is": "value max", "by_k": {str(k): {n: round(v, 1) for n, v in f.items()}
                                                        for k, f in by_k.items()},
                      "completions": args.completions, "tokens": args.tokens}))


if __name__ == "__main__":
    main()
