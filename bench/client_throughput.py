"""Client throughput of the `openai` teacher's two paths against the same loopback server.

    .venv/bin/python bench/client_throughput.py [--requests 3000] [--concurrency 32] [--rounds 3] [--latency-ms 5]

Each round runs, in fresh processes, over the same requests to bench/_stub_server.py (which answers
after `--latency-ms`, so the client is what gets measured):
- openai: synth's OpenAITeacher with `client: openai` (the official AsyncOpenAI client);
- http:   synth's OpenAITeacher with `client: http` (the raw aiohttp fast path);
- bare:   a bare aiohttp loop posting the same bodies (the ceiling for a Python client).
Each is timed from the teacher's construction (imports included) to the last completion. Printed:
requests/s of each, medians, fast path / openai client (goal >= 3) and both against the bare loop.
Last line: one JSON object {"bench", "value", "baseline", "unit", "ratio", "goal", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generate_overhead import cli_env, seed_rows, start_server, stop_server  # noqa: E402

GOAL = 3.0
PARAMS = {"temperature": 0.8, "max_tokens": 32, "seed": 0}


def teacher_worker(spec: dict) -> dict:
    """In a fresh process: synth's openai teacher over the requests, in memory."""
    started = time.perf_counter()
    from synth.teachers import OpenAITeacherConfig, Request
    from synth.teachers.openai import OpenAITeacher

    config = OpenAITeacherConfig(backend="openai", model=spec["model"], base_url=spec["base_url"],
                                 max_concurrency=spec["concurrency"], client=spec["client"])
    teacher = OpenAITeacher("bench", config, Path("."))
    requests = [Request(id=f"r{i}", messages=r["messages"], params=PARAMS, sample=r["sample"])
                for i, r in enumerate(spec["requests"])]
    done = sum(1 for c in teacher.generate(requests) if c.ok)
    return {"seconds": time.perf_counter() - started, "done": done}


def bare_worker(spec: dict) -> dict:
    import asyncio

    started = time.perf_counter()
    import aiohttp

    from synth.ids import sample_seed

    async def main() -> int:
        todo = iter(spec["requests"])
        done = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=spec["concurrency"])) as session:
            async def worker() -> None:
                nonlocal done
                for r in todo:
                    body = {"messages": r["messages"], "model": spec["model"], "max_tokens": PARAMS["max_tokens"],
                            "seed": sample_seed(PARAMS["seed"], r["sample"]), "temperature": PARAMS["temperature"]}
                    async with session.post(spec["base_url"] + "/chat/completions", json=body,
                                            headers={"Authorization": "Bearer EMPTY"}) as resp:
                        await resp.json()
                        done += resp.status == 200

            await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        return done

    done = asyncio.run(main())
    return {"seconds": time.perf_counter() - started, "done": done}


def run_side(side: str, spec_path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", side, str(spec_path)], capture_output=True,
                          text=True, env=cli_env(), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, path = args.worker
        spec = json.loads(Path(path).read_text())
        spec["client"] = side
        print(json.dumps(bare_worker(spec) if side == "bare" else teacher_worker(spec)))
        return
    work = Path(tempfile.mkdtemp(prefix="synth-client-bench-"))
    args.server = "stub"
    proc, base_url, model = start_server(args, work / "server.log")
    try:
        rows = seed_rows(args.requests)
        spec = {"base_url": base_url, "model": model, "concurrency": args.concurrency,
                "requests": [{"messages": [{"role": "user", "content": r["question"]}], "sample": 0} for r in rows]}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"client_throughput: {args.requests} requests, concurrency {args.concurrency}, stub server latency "
              f"{args.latency_ms:g} ms, {args.rounds} rounds", flush=True)
        rates: dict[str, list[float]] = {"openai": [], "http": [], "bare": []}
        for i in range(1, args.rounds + 1):
            for side in rates:
                out = run_side(side, spec_path)
                if out["done"] != args.requests:
                    raise SystemExit(f"{side}: {out['done']}/{args.requests} requests succeeded")
                rates[side].append(args.requests / out["seconds"])
            print(f"round {i}  " + "  ".join(f"{side} {r[-1]:8.1f} req/s" for side, r in rates.items()), flush=True)
        med = {side: statistics.median(r) for side, r in rates.items()}
        ratio = med["http"] / med["openai"]
        print(f"median  openai client {med['openai']:.1f} · fast path {med['http']:.1f} · bare aiohttp {med['bare']:.1f} "
              f"req/s · fast path / openai client {ratio:.2f} (goal >= {GOAL}) · fast path / bare "
              f"{med['http'] / med['bare']:.2f} · openai client / bare {med['openai'] / med['bare']:.2f}", flush=True)
        print(json.dumps({"bench": "client_throughput", "value": round(med["http"], 1),
                          "baseline": round(med["openai"], 1), "unit": "requests/s", "ratio": round(ratio, 3),
                          "goal": GOAL, "bare": round(med["bare"], 1)}))
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
