"""A kd training's data path: synth's (a kd export read as numpy views, the collator holding the examples and
the dataset their indices) vs the plain datasets path (the file's rows as Python lists, Dataset.from_list,
each batch's rows fetched back out of Arrow), on the same file, student and batches.

    .venv/bin/python bench/kd_data.py [--rows 5373] [--prompts 800] [--k 8] [--batches 200] [--rounds 3]
        [--data EXPORT --model DIR] [--quick]

By default the data are demo-like kd rows written by the export's own writer (--rows rows over --prompts
distinct prompts, 30-60 completion tokens, the teacher's top --k per token) and the student a random-init
Llama of the demo's shape; `--data` takes a real export (a demo's out/kept_kd.parquet with its
models/student-init). Each round times, alternating which path goes first: reading the file into rows
(`train.load_rows` vs `pyarrow ... to_pylist`), building the training dataset, and --batches batches of 16
collated by `kd_train.Collator` (the same random indices for both). Both paths' batches are checked equal
first. Tokenising (kd_train.tokenize, the same for both: each distinct prompt rendered once) is timed once
and reported. The figure is each path's median over rounds; value = synth's seconds for a demo student's
data (read + dataset + 1,600 batches) / the plain path's (goal < 1). The last line is the usual JSON object.
`--quick`: a small file, one round (the test suite's smoke test).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS = 1600  # a demo student's steps: one batch each


def kd_file(path: Path, rows: int, prompts: int, k: int, vocab: int) -> Path:
    """Demo-like kd rows through the export's own Parquet writer."""
    import numpy as np

    from synth.stages.export import _write_atomic

    rng = np.random.default_rng(0)
    records = []
    for i in range(rows):
        n = int(rng.integers(30, 61))
        lps = np.sort(np.log(rng.dirichlet(np.ones(k + 1), size=n))[:, :k], axis=1)[:, ::-1]
        records.append({"id": f"r{i}", "prompt": [{"role": "user", "content": f"What is {i % prompts} + 7?"}],
                        "completion": "", "completion_ids": rng.integers(5, vocab, n),
                        "logprobs": lps[:, 0].copy(), "teacher_ids": rng.integers(5, vocab, (n, k)),
                        "teacher_logprobs": lps.copy(), "tokenizer": "student"})
    _write_atomic(path, records, "kd")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5373, help="the demo's kept_kd: 5,373")
    ap.add_argument("--prompts", type=int, default=800, help="distinct prompts (the demo's: 800, 8 samples each)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, default=200, help="timed batches per path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", type=Path, help="a real format: kd export (with --model)")
    ap.add_argument("--model", type=Path, help="the student whose tokenizer renders the prompts (with --data)")
    ap.add_argument("--quick", action="store_true", help="a small file, one round (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.prompts, args.batches, args.rounds = 200, 40, 10, 1
    if (args.data is None) != (args.model is None):
        ap.error("--data and --model go together")

    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from synth.kd_train import KD_COLUMNS, Collator, tokenize
    from synth.tiny import build_model
    from synth.train import load_rows

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, student = args.data, args.model
        if data is None:
            student = build_model(root / "student", hidden=64, layers=2, heads=4, vocab_size=600)
            data = kd_file(root / "kd.parquet", args.rows, args.prompts, args.k, 600)
        tok = AutoTokenizer.from_pretrained(student)
        pad = tok.pad_token_id

        def plain_read():
            return [{c: r[c] for c in KD_COLUMNS} for r in pq.read_table(data).to_pylist()]

        started = time.perf_counter()
        examples, ready = tokenize(load_rows(data, "kd"), tok, 160)
        tokenise_s = time.perf_counter() - started
        plain_examples, _ = tokenize(plain_read(), tok, 160)
        rng = random.Random(0)
        picks = [rng.sample(range(len(examples)), min(16, len(examples))) for _ in range(args.batches)]

        def synth_path():
            t0 = time.perf_counter()
            load_rows(data, "kd")
            t1 = time.perf_counter()
            dataset = Dataset.from_dict({"row": list(range(len(examples)))})
            collate = Collator(pad, examples)
            t2 = time.perf_counter()
            for idx in picks:
                batch = collate(dataset.__getitems__(idx))
            return t1 - t0, t2 - t1, (time.perf_counter() - t2) / len(picks), batch

        def plain_path():
            t0 = time.perf_counter()
            plain_read()
            t1 = time.perf_counter()
            dataset = Dataset.from_list(plain_examples)
            collate = Collator(pad)
            t2 = time.perf_counter()
            for idx in picks:
                batch = collate(dataset.__getitems__(idx))
            return t1 - t0, t2 - t1, (time.perf_counter() - t2) / len(picks), batch

        ours, theirs = synth_path()[3], plain_path()[3]
        for key in theirs:
            if not (ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key])):
                sys.exit(f"kd_data: the two paths' batches differ in {key}; nothing timed")
        timed = {"synth": [], "plain": []}
        for r in range(args.rounds):
            for name in (("synth", "plain") if r % 2 == 0 else ("plain", "synth")):
                timed[name].append((synth_path if name == "synth" else plain_path)()[:3])
        figures = {}
        for name, runs in timed.items():
            read, build, batch = (statistics.median(x[i] for x in runs) for i in range(3))
            figures[name] = {"read_s": read, "dataset_s": build, "batch_ms": batch * 1e3,
                             "student_s": read + build + STEPS * batch}
            print(f"{name:5}: read {read:6.2f} s · dataset {build:5.2f} s · a batch of 16 {batch * 1e3:6.2f} ms · "
                  f"a {STEPS:,}-step student's data {figures[name]['student_s']:6.1f} s")
        prompts = len({json.dumps(r["prompt"]) for r in load_rows(data, "kd")})
        print(f"tokenising (the same for both): {tokenise_s:.2f} s for {ready['rows']:,} rows, {prompts:,} distinct "
              "prompts rendered once each")
        value, baseline = figures["synth"]["student_s"], figures["plain"]["student_s"]
        print(json.dumps({"bench": "kd_data", "value": round(value, 3), "baseline": round(baseline, 3),
                          "ratio": round(value / baseline, 3), "goal": "< 1",
                          "batch_ratio": round(figures["synth"]["batch_ms"] / figures["plain"]["batch_ms"], 3),
                          "read_ratio": round(figures["synth"]["read_s"] / figures["plain"]["read_s"], 3),
                          "rows": ready["rows"], "rounds": args.rounds}))


if __name__ == "__main__":
    main()
