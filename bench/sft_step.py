"""An SFT training step on CPU: synth's chunked CE (synth/sft_train.py) vs TRL's own SFTTrainer loss.

    .venv/bin/python bench/sft_step.py [--hidden 64] [--vocab 600] [--batch 16] [--steps 20] [--rounds 3]
        [--threads 1] [--quick]

One trainer, built by synth.train.prepare exactly as a train stage builds it (ChunkedSFTTrainer, TRL's
batches), on a random-init student of the demo's shape (synth.tiny: Llama-shaped, --hidden,
2 layers, a tokenizer of --vocab trained on the rows) and demo-like rows (a short question, a ~60-120
token multi-line answer, assistant-only loss). The baseline is the same trainer with its loss switched to
TRL's (`trl_loss_reason` set), on the same batches and the same weights: each round times --steps calls of
trainer.training_step (forward + backward; the optimizer step is the same for both and left out) with each
loss, alternating which goes first. The figure is each loss's median seconds per step; ratio = chunked /
TRL (goal < 1: faster). The two losses are checked equal on the first batch so a speed-up never comes from
computing something else. The last line is the usual JSON object.
`--quick`: tiny shapes, one round (the test suite's smoke test).
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

GOAL = 1.0  # chunked / TRL seconds per step: below 1 is faster


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        total, lines = rng.randint(1, 50), []
        for _ in range(rng.randint(2, 4)):
            step = rng.randint(1, 30)
            lines.append(f"{total} + {step} = {total + step}")
            total += step
        out.append({"id": f"r{i}", "messages": [
            {"role": "user", "content": f"Ann has {i % 50} pens; she buys more {len(lines)} times. How many?"},
            {"role": "assistant", "content": "\n".join(lines) + f"\nThe answer is \\boxed{{{total}}}."}]})
    return out


def demo_like(root: Path, n: int, hidden: int, vocab: int) -> tuple[Path, Path]:
    """(an SFT jsonl of n demo-like rows, a random-init student of the demo's shape with a tokenizer of `vocab`
    trained on them) under root: the default data and student of the CPU training benches."""
    from synth.tiny import build_model

    data = rows(n)
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    corpus = [m["content"] for r in data for m in r["messages"]]
    return path, build_model(root / "student", corpus, hidden=hidden, layers=2, heads=4, vocab_size=vocab,
                             split_digits=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per loss per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a train stage's default here: 1)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.vocab, args.batch, args.steps, args.rounds = 32, 300, 4, 2, 1

    import torch
    from trl import SFTTrainer

    from synth.train import prepare

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, student = demo_like(root, max(64, args.batch * 4), args.hidden, args.vocab)
        recipe = {"max_steps": 1, "per_device_train_batch_size": args.batch, "max_length": 256,
                  "assistant_only_loss": True, "seed": 0}
        trainer = prepare("sft", data, str(student), recipe, root / "out").trainer
        if trainer.trl_loss_reason is not None:
            sys.exit(f"sft_step: the chunked CE is not used here ({trainer.trl_loss_reason})")
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step divides by it
        loader = iter(trainer.get_train_dataloader())
        batches = [next(loader) for _ in range(min(4, len(trainer.get_train_dataloader())))]
        with torch.no_grad():
            ours = float(trainer.compute_loss(model, dict(batches[0])))
            theirs = float(SFTTrainer.compute_loss(trainer, model, dict(batches[0])))
        if abs(ours - theirs) > 1e-4 * abs(theirs):
            sys.exit(f"sft_step: the losses differ: chunked {ours} vs TRL {theirs}")

        def timed(reason: str | None) -> float:
            trainer.trl_loss_reason = reason
            started = time.perf_counter()
            for i in range(args.steps):
                trainer.training_step(model, dict(batches[i % len(batches)]))
            model.zero_grad(set_to_none=True)
            return (time.perf_counter() - started) / args.steps

        timed(None), timed("baseline")  # warm-up
        runs = {"chunked": [], "trl": []}
        for r in range(args.rounds):
            order = ("chunked", "trl") if r % 2 == 0 else ("trl", "chunked")
            for name in order:
                runs[name].append(timed(None if name == "chunked" else "baseline: TRL's loss"))
    med = {name: statistics.median(t) for name, t in runs.items()}
    ratio = med["chunked"] / med["trl"]
    print(f"sft_step: hidden {args.hidden}, vocab {args.vocab}, batch {args.batch}, {args.threads} thread(s); "
          f"forward + backward per step: TRL {med['trl'] * 1000:.1f} ms, chunked {med['chunked'] * 1000:.1f} ms, "
          f"chunked / TRL {ratio:.2f} (goal < {GOAL:g})", flush=True)
    print(json.dumps({"bench": "sft_step", "value": med["chunked"], "baseline": med["trl"], "unit": "s/step",
                      "ratio": ratio, "goal": GOAL, "loss_chunked": ours, "loss_trl": theirs,
                      "rounds": runs}))


if __name__ == "__main__":
    main()
