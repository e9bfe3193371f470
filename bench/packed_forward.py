"""A training step on CPU with the packed forward (synth/packed_forward.py: the batch's real tokens only) vs
the padded forward, on the same trainer, weights and batches.

    .venv/bin/python bench/packed_forward.py [--hidden 64] [--vocab 600] [--batch 16] [--steps 20] [--rounds 3]
        [--threads 1] [--method sft|kd] [--data EXPORT --model DIR] [--quick]

One trainer, built by synth.train.prepare exactly as a train stage builds it (TRL's SFTTrainer with synth's
chunked CE, or the KD trainer; TRL's or synth's collator and batches). By default the data are demo-like rows
(bench/sft_step.py's: a short question, a 2-4 line answer, uneven lengths) and the student a random-init
Llama of the demo's shape (--hidden, 2 layers, a tokenizer of --vocab); `--data` takes a real export instead
(a demo's out/filtered_sft.parquet with its models/student-init, or out/kept_kd.parquet with --method kd).
Each round times --steps calls of trainer.training_step (forward + backward; the optimizer step is the
same for both and left out) packed and padded, alternating which goes first. The figure is each one's
median seconds per step; ratio = packed / padded (goal < 1: faster). The two losses and gradients are
checked equal on the first batch, so a speed-up never comes from computing something else. Prints the
share of padding in the timed batches. The last line is the usual JSON object.
`--quick`: tiny shapes, one round (the test suite's smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GOAL = 1.0  # packed / padded seconds per step: below 1 is faster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a train stage's default here: 1)")
    ap.add_argument("--method", choices=("sft", "kd"), default="sft", help="kd needs --data (a format: kd export)")
    ap.add_argument("--data", type=Path, help="a real export to train on (with --model)")
    ap.add_argument("--model", type=Path, help="the student to start from (with --data)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.vocab, args.batch, args.steps, args.rounds = 32, 300, 4, 2, 1
    if (args.data is None) != (args.model is None) or (args.method == "kd" and args.data is None):
        ap.error("--data and --model go together; --method kd needs them")

    import torch

    import synth.packed_forward as packed_forward
    from synth.train import prepare
    from sft_step import demo_like

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, student = args.data, args.model
        if data is None:
            data, student = demo_like(root, max(64, args.batch * 4), args.hidden, args.vocab)
        recipe = {"max_steps": 1, "per_device_train_batch_size": args.batch, "max_length": 256, "seed": 0,
                  **({"assistant_only_loss": True} if args.method == "sft" else {})}
        trainer = prepare(args.method, data, str(student), recipe, root / "out").trainer
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step divides by it
        loader = iter(trainer.get_train_dataloader())
        batches = [next(loader) for _ in range(min(8, len(trainer.get_train_dataloader())))]
        mask = torch.cat([b["attention_mask"].reshape(-1) for b in batches])
        padding = 1 - float(mask.float().mean())

        def loss_and_grads(packing: bool):
            setattr(model, packed_forward._STATE, None if packing else False)
            model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(model, dict(batches[0]))
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            return float(loss), grads, getattr(model, packed_forward._STATE)

        loss_packed, grads_packed, verified = loss_and_grads(True)
        loss_padded, grads_padded, _ = loss_and_grads(False)
        if verified is not True:
            sys.exit("packed_forward: the packed forward does not apply to this model or batch")
        if abs(loss_packed - loss_padded) > 1e-5 * abs(loss_padded):
            sys.exit(f"packed_forward: the losses differ: packed {loss_packed} vs padded {loss_padded}")
        for name, g in grads_padded.items():
            if not torch.allclose(grads_packed[name], g, rtol=1e-3, atol=1e-6 * float(g.abs().max()) + 1e-9):
                sys.exit(f"packed_forward: the gradients of {name} differ")

        def timed(packing: bool) -> float:
            setattr(model, packed_forward._STATE, True if packing else False)
            started = time.perf_counter()
            for i in range(args.steps):
                trainer.training_step(model, dict(batches[i % len(batches)]))
            model.zero_grad(set_to_none=True)
            return (time.perf_counter() - started) / args.steps

        timed(True), timed(False)  # warm-up
        runs = {"packed": [], "padded": []}
        for r in range(args.rounds):
            order = ("packed", "padded") if r % 2 == 0 else ("padded", "packed")
            for name in order:
                runs[name].append(timed(name == "packed"))
    med = {name: statistics.median(t) for name, t in runs.items()}
    ratio = med["packed"] / med["padded"]
    what = f"{args.data}" if args.data else f"hidden {args.hidden}, vocab {args.vocab}"
    print(f"packed_forward: {args.method}, {what}, batch {args.batch}, {args.threads} thread(s), "
          f"{padding:.1%} of the batches' positions padding; forward + backward per step: padded "
          f"{med['padded'] * 1000:.1f} ms, packed {med['packed'] * 1000:.1f} ms, packed / padded {ratio:.2f} "
          f"(goal < {GOAL:g})", flush=True)
    print(json.dumps({"bench": "packed_forward", "value": med["packed"], "baseline": med["padded"],
                      "unit": "s/step", "ratio": ratio, "goal": GOAL, "padding_share": padding,
                      "loss_packed": loss_packed, "loss_padded": loss_padded, "rounds": runs}))


if __name__ == "__main__":
    main()
