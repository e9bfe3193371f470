"""The vllm teacher's streaming submission vs the chunk barrier it replaced, on one engine.

    .venv/bin/python bench/vllm_streaming.py [--model DIR] [--requests 384] [--slots 32]
        [--max-tokens 128] [--rounds 3]

Both sides run the same requests (same rendered prompts, same parameters, same per-sample seeds) on
the same `vllm.LLM` engine, in this process, with at most `--slots` requests in the engine:

- baseline, "chunk barrier": the previous VLLMTeacher: `LLM.chat` on chunks of `--slots` requests,
  the next chunk only after the whole chunk has finished (the engine runs the chunk's tail with
  fewer and fewer requests, and nothing is yielded until the chunk ends).
- candidate, "streaming": `VLLMTeacher.generate` with chunk_size = `--slots`: a slot is refilled as
  soon as its request finishes, and each completion is yielded when it finishes.

Answer lengths vary in real data; the tiny random model rarely stops on its own, so each request
gets its own max_tokens, drawn (fixed seed) from a long-tailed distribution between 4 and
`--max-tokens` (the spread is printed). Throughput = generated tokens / wall seconds. Both sides must
produce the same text for every request (checked: per-sample seeds make it independent of batching).
Rounds are interleaved (barrier, streaming, ...) with the prefix cache reset before each; the medians
and their ratio are printed, and the last line is one JSON object {"bench", "value", "baseline",
"unit", "ratio", "goal"}. Without --model a tiny model is built in a temp dir (synth.tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GOAL = 1.0  # streaming at least as fast as the barrier; the gain grows with the spread of lengths


def requests_for(n: int, max_tokens: int, seed: int):
    from synth.teachers import Request

    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens = min(max_tokens, 4 + int(rng.expovariate(1.0) * max_tokens / 4))  # long-tailed lengths
        messages = [{"role": "user", "content": f"Q{i}: what is {i} + {2 * i + 1}? Explain."}]
        out.append(Request(f"r{i}", messages, {"temperature": 0.8, "max_tokens": tokens, "seed": seed}, 0))
    return out


def run_barrier(teacher, requests, slots: int) -> tuple[float, dict]:
    """The pre-streaming VLLMTeacher loop: LLM.chat per chunk, results after the chunk ends."""
    started, texts = time.perf_counter(), {}
    for start in range(0, len(requests), slots):
        chunk = requests[start:start + slots]
        outputs = teacher.llm.chat([r.messages for r in chunk], [teacher._params(r) for r in chunk], use_tqdm=False)
        for r, out in zip(chunk, outputs):
            texts[r.id] = (out.outputs[0].text, len(out.outputs[0].token_ids))
    return time.perf_counter() - started, texts


def run_streaming(teacher, requests, slots: int) -> tuple[float, dict]:
    teacher.config = teacher.config.model_copy(update={"chunk_size": slots})
    started, texts = time.perf_counter(), {}
    for c in teacher.generate(requests):
        if not c.ok:
            raise SystemExit(f"request {c.request_id} failed: {c.error} {c.error_message}")
        texts[c.request_id] = (c.text, c.completion_tokens)
    return time.perf_counter() - started, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: build the tiny model)")
    ap.add_argument("--requests", type=int, default=384)
    ap.add_argument("--slots", type=int, default=32, help="requests in the engine at once (chunk_size)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)

    from synth.teachers import VLLMTeacherConfig
    from synth.teachers.vllm import VLLMTeacher

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from synth.tiny import build_model
            model = str(build_model(Path(tmp) / "tiny"))
        config = VLLMTeacherConfig(backend="vllm", model=model, chunk_size=args.slots, max_model_len=1024)
        teacher = VLLMTeacher("bench", config, Path("."))
        try:
            warm = requests_for(args.slots, 8, seed=10_000)
            run_streaming(teacher, warm, args.slots)  # first steps allocate; keep them out of the figures
            lengths = sorted(r.params["max_tokens"] for r in requests_for(args.requests, args.max_tokens, 0))
            print(f"vllm_streaming: {args.requests} requests, {args.slots} slots, max_tokens from {lengths[0]} to "
                  f"{lengths[-1]} (median {statistics.median(lengths):g}), {args.rounds} rounds", flush=True)
            barrier_tps, stream_tps = [], []
            for i in range(1, args.rounds + 1):
                requests = requests_for(args.requests, args.max_tokens, seed=i)
                teacher.llm.reset_prefix_cache()
                seconds, base = run_barrier(teacher, requests, args.slots)
                tokens = sum(n for _, n in base.values())
                barrier_tps.append(tokens / seconds)
                print(f"round {i}  chunk barrier {seconds:7.3f} s  {barrier_tps[-1]:8.1f} tok/s", flush=True)
                teacher.llm.reset_prefix_cache()
                seconds, streamed = run_streaming(teacher, requests, args.slots)
                stream_tps.append(sum(n for _, n in streamed.values()) / seconds)
                print(f"round {i}  streaming     {seconds:7.3f} s  {stream_tps[-1]:8.1f} tok/s", flush=True)
                if streamed != base:
                    differ = sum(streamed.get(k) != v for k, v in base.items())
                    raise SystemExit(f"the two sides generated different texts for {differ} requests")
        finally:
            teacher.close()
    baseline, value = statistics.median(barrier_tps), statistics.median(stream_tps)
    ratio = value / baseline
    print(f"median  chunk barrier {baseline:.1f} tok/s · streaming {value:.1f} tok/s · ratio {ratio:.3f} "
          f"(goal >= {GOAL}) · texts identical", flush=True)
    print(json.dumps({"bench": "vllm_streaming", "value": round(value, 2), "baseline": round(baseline, 2),
                      "unit": "tokens/s", "ratio": round(ratio, 4), "goal": GOAL}))


if __name__ == "__main__":
    main()
