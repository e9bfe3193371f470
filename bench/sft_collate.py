"""Collating an SFT batch on CPU: synth's PaddedBatches (numpy) vs TRL's DataCollatorForLanguageModeling.

    .venv/bin/python bench/sft_collate.py [--hidden 64] [--vocab 600] [--batch 16] [--batches 200] [--rounds 3]
        [--quick]
    .venv/bin/python bench/sft_collate.py --data DEMO/out/filtered_sft.parquet --model DEMO/models/student-init

One trainer, built by synth.train.prepare exactly as a train stage builds it (ChunkedSFTTrainer: PaddedBatches
in place of TRL's collator), on bench/sft_step.py's demo-like rows and student (or --data, an SFT export, and --model, a student dir:
a demo folder's). Each round collates the same
--batches batches of the trainer's own tokenised examples (drawn at random, --batch rows each) with each
collator, alternating which goes first; the figure is each one's median seconds per batch, ratio =
PaddedBatches / TRL (goal < 1: faster). Every batch's tensors are checked equal (keys, dtypes, values) first,
so a speed-up never comes from building something else. For scale it also times full training steps
(collate, forward, backward, optimizer) and prints the share of a step that each collator takes. The last line
is the usual JSON object. `--quick`: tiny shapes, one round (the test suite's smoke test).
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
sys.path.insert(0, str(REPO / "bench"))

GOAL = 1.0  # PaddedBatches / TRL seconds per batch: below 1 is faster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=200, help="batches collated per collator per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", type=Path, help="an SFT export (.parquet/.jsonl); default: demo-like rows")
    ap.add_argument("--model", type=Path, help="the student dir for --data (its tokenizer tokenises the rows)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke test)")
    args = ap.parse_args()
    if (args.data is None) != (args.model is None):
        sys.exit("sft_collate: --data and --model go together")
    if args.quick:
        args.hidden, args.vocab, args.batch, args.batches, args.rounds = 32, 300, 4, 10, 1

    import torch

    from sft_step import demo_like
    from synth.sft_train import PaddedBatches
    from synth.train import prepare

    torch.set_num_threads(1)  # a train stage's worker under --jobs on 2 cores
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, student = args.data, args.model
        if data is None:
            data, student = demo_like(root, max(64, args.batch * 8), args.hidden, args.vocab)
        recipe = {"max_steps": 1, "per_device_train_batch_size": args.batch, "max_length": 256,
                  "assistant_only_loss": True, "seed": 0}
        trainer = prepare("sft", data, str(student), recipe, root / "out").trainer
        ours = trainer.data_collator
        if not isinstance(ours, PaddedBatches):
            sys.exit(f"sft_collate: the trainer does not use PaddedBatches ({type(ours).__name__})")
        theirs = ours.trl_collator
        examples = trainer.train_dataset.to_list()
        rng = random.Random(0)
        batches = [rng.sample(examples, args.batch) for _ in range(args.batches)]
        for batch in batches:
            a, b = ours(batch), theirs(batch)
            if a.keys() != b.keys() or any(a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]) for k in b):
                sys.exit("sft_collate: PaddedBatches and TRL's collator built different batches")

        def timed(collate) -> float:
            started = time.perf_counter()
            for batch in batches:
                collate(batch)
            return (time.perf_counter() - started) / len(batches)

        timed(ours), timed(theirs)  # warm-up
        runs = {"padded_batches": [], "trl": []}
        for r in range(args.rounds):
            order = ("padded_batches", "trl") if r % 2 == 0 else ("trl", "padded_batches")
            for name in order:
                runs[name].append(timed(ours if name == "padded_batches" else theirs))

        # a whole step for scale: collate, forward + backward, optimizer (the trainer's own)
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        trainer.create_optimizer()
        steps = batches[:min(len(batches), 10 if args.quick else 60)]
        started = time.perf_counter()
        for batch in steps:
            trainer.training_step(model, ours(batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        step = (time.perf_counter() - started) / len(steps)
    med = {name: statistics.median(t) for name, t in runs.items()}
    ratio = med["padded_batches"] / med["trl"]
    shape = f"{args.data}" if args.data else f"hidden {args.hidden}"
    print(f"sft_collate: batch {args.batch}, {shape}, 1 thread; per batch: TRL's collator "
          f"{med['trl'] * 1000:.2f} ms ({med['trl'] / step:.1%} of a {step * 1000:.1f} ms step), PaddedBatches "
          f"{med['padded_batches'] * 1000:.2f} ms ({med['padded_batches'] / step:.1%}); PaddedBatches / TRL "
          f"{ratio:.2f} (goal < {GOAL:g})", flush=True)
    print(json.dumps({"bench": "sft_collate", "value": med["padded_batches"], "baseline": med["trl"],
                      "unit": "s/batch", "ratio": ratio, "goal": GOAL, "step_s": step, "rounds": runs}))


if __name__ == "__main__":
    main()
