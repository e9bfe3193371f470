"""The hf teacher's log-prob extraction after generate: one log_softmax / gather / top-k per step over the
whole batch (synth/teachers/hf.py: _step_logprobs, then each row sliced) vs the per-row path it replaced
(each row's logits stacked over its own positions, then log_softmax, gather and top-k per row).

    .venv/bin/python bench/hf_logprobs.py [--batch 256] [--tokens 96] [--vocab 600] [--k 8] [--rounds 5]
        [--threads 1] [--quick]

The input is what generate returns for a batch: --tokens raw-logit tensors [--batch, --vocab] (random,
float32) and the tokens taken; row i generated a length drawn between a third of --tokens and all of it (rows
end at different lengths, as a sampled batch's do). Both sides build the same Completion.logprobs dicts
(teachers.token_logprobs: Python lists) for every row; the first round checks them equal, bit for bit.
Rounds alternate which side goes first; the medians and ratio = batch path / per-row path (goal < 1: faster)
are printed, and the last line is the usual JSON object. The demo's teacher batch is the default shape
(256 rows, 96 steps, its vocabulary of ~600, k = 8); a real model's vocabulary (~150k) can be given.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 1.0  # batch path / per-row path seconds: below 1 is faster


def per_row(logits, taken, lengths: list[int], k: int) -> list[dict]:
    """The path before: for each row, its positions' logits stacked, then log_softmax, gather and top-k."""
    import torch

    from synth.teachers.base import token_logprobs

    out = []
    for i, n in enumerate(lengths):
        tokens = taken[i, :n].tolist()
        steps = torch.stack([logits[t][i] for t in range(n)]).float().log_softmax(-1)
        chosen = steps.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = steps.topk(min(k, steps.shape[-1]), dim=-1)
        out.append(token_logprobs(k, chosen, token_ids=tokens, top_ids=top_ids.flatten().tolist(),
                                  top_logprobs=top_values.flatten().tolist()))
    return out


def batched(logits, taken, lengths: list[int], k: int) -> list[dict]:
    """synth's path: one pass per step over the batch, then each row sliced."""
    from synth.teachers.hf import _step_logprobs

    steps = _step_logprobs(logits, taken, k)
    return [steps.row(i, taken[i, :n].tolist()) for i, n in enumerate(lengths)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=96, help="generate steps (the batch's longest row)")
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.tokens, args.vocab, args.rounds = 8, 12, 50, 1

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    logits = tuple(torch.randn(args.batch, args.vocab) * 3 for _ in range(args.tokens))
    taken = torch.randint(0, args.vocab, (args.batch, args.tokens))
    lengths = [rng.randint(max(1, args.tokens // 3), args.tokens) for _ in range(args.batch)]

    times: dict[str, list[float]] = {"per_row": [], "batched": []}
    for r in range(args.rounds):
        order = [("per_row", per_row), ("batched", batched)]
        results = {}
        for name, fn in order if r % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            results[name] = fn(logits, taken, lengths, args.k)
            times[name].append(time.perf_counter() - started)
        if r == 0 and results["per_row"] != results["batched"]:
            sys.exit("hf_logprobs: the two paths built different log-probs")
    baseline, value = statistics.median(times["per_row"]), statistics.median(times["batched"])
    tokens = sum(lengths)
    print(f"{args.batch} rows x {args.tokens} steps (generated tokens {tokens:,}), vocabulary {args.vocab}, k {args.k}, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    print(f"per-row path: {baseline * 1000:8.1f} ms per batch")
    print(f"batch path:   {value * 1000:8.1f} ms per batch   ratio {value / baseline:.3f} (goal < {GOAL})")
    print(json.dumps({"bench": "hf_logprobs", "value": round(value, 5), "baseline": round(baseline, 5),
                      "unit": "s per batch", "ratio": round(value / baseline, 3), "goal": GOAL,
                      "batch": args.batch, "tokens": args.tokens, "vocab": args.vocab, "k": args.k}))


if __name__ == "__main__":
    main()
