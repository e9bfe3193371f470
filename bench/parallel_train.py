"""`synth run --jobs 2` vs `synth run` (one at a time) on the same independent train stages.

    .venv/bin/python bench/parallel_train.py [--stages 4] [--steps 300] [--hidden 64] [--rounds 2] [--quick]

A workspace with one SFT export and `--stages` independent train stages (one recipe under as many seeds:
the demo's student arms in small), a random-init student of the demo's shape built here (synth.tiny), the
demo's batch and length. Each round runs the whole pipeline twice in fresh stores, once with --jobs 1
(the baseline) and once with --jobs 2, alternating which goes first; the figure is the wall time of
`synth run` (a subprocess, as a user runs it). Medians over rounds, their ratio (goal < 1: faster), and
the usual closing JSON line. The trained models are checked equal between the two (the same bytes:
the thread count does not change the training here) so a speed-up never comes from doing less.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 1.0


def workspace(root: Path, stages: int, steps: int, hidden: int) -> Path:
    from synth.tiny import build_model

    root.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": f"Ann has {i} pens and buys {i % 7 + 1} more. How many pens?",
             "solution": f"{i} + {i % 7 + 1} = {2 * i % 97}\nThe answer is \\boxed{{{i + i % 7 + 1}}}."}
            for i in range(400)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts").mkdir()
    (root / "prompts" / "solve.yaml").write_text('user: "{{ question }}"\n')
    (root / "recipe.yaml").write_text(f"max_steps: {steps}\nlearning_rate: 2.0e-3\nper_device_train_batch_size: 16\n"
                                      "max_length: 160\nlogging_steps: 50\nseed: 0\n")
    build_model(root / "student", [r["question"] + "\n" + r["solution"] for r in rows], hidden=hidden, layers=2,
                heads=4, intermediate=4 * hidden, vocab_size=600, max_positions=256, split_digits=True)
    seeds = ", ".join(str(s) for s in range(stages))
    (root / "pipeline.yaml").write_text(f"""\
store: out/run.duckdb
stages:
  rows: {{kind: load, path: rows.jsonl}}
  data: {{kind: export, input: rows, format: sft, prompt: solve, response: solution, path: out/sft.parquet}}
  student: {{kind: train, method: sft, data: data, student: student, recipe: recipe.yaml, seeds: [{seeds}]}}
""")
    return root / "pipeline.yaml"


def timed_run(pipeline: Path, jobs: int) -> tuple[float, dict[str, str]]:
    out = pipeline.parent / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "synth.cli", "run", str(pipeline), "--jobs", str(jobs)], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    weights = {p.parent.parent.name.split("-")[0]: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in out.glob("models/*/model/model.safetensors")}
    return seconds, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 stages, 20 steps, 1 round (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.stages, args.steps, args.rounds = 2, 20, 1
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = workspace(Path(tmp) / "ws", args.stages, args.steps, args.hidden)
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            got = {}
            for jobs in order:
                seconds, weights = timed_run(pipeline, jobs)
                times[jobs].append(seconds)
                got[jobs] = weights
            if got[1] != got[2]:
                raise SystemExit("the models trained with --jobs 1 and --jobs 2 differ; the comparison is void")
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"{args.stages} train stages of {args.steps} steps (hidden {args.hidden}), {os.cpu_count()} cores")
    print(f"--jobs 1: {one:.1f} s   --jobs 2: {two:.1f} s   ratio {two / one:.2f} (goal < {GOAL})")
    print(json.dumps({"bench": "parallel_train", "value": round(two, 2), "baseline": round(one, 2), "unit": "s wall",
                      "ratio": round(two / one, 3), "goal": GOAL, "goal_is": "max", "stages": args.stages,
                      "steps": args.steps, "hidden": args.hidden, "cores": os.cpu_count(), "rounds": args.rounds,
                      "jobs1_s": [round(t, 2) for t in times[1]], "jobs2_s": [round(t, 2) for t in times[2]]}))


if __name__ == "__main__":
    main()
