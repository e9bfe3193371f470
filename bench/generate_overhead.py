"""Overhead of synth's generate stage over a raw loop calling the same OpenAI-compatible server.

    .venv/bin/python bench/generate_overhead.py [--requests 2000] [--concurrency 32] [--rounds 3]
        [--latency-ms 20] [--samples 4] [--server stub | --server transformers --model DIR]

Both sides send the same N requests (same rendered messages, same sampling parameters, same
per-sample seeds) to the same local server with the same concurrency:

- baseline, "raw loop": a fresh Python process running C asyncio workers over the requests, keeping
  the completions in memory (no store), on the same client path as synth: `--client http` (default,
  synth's fast path for a self-hosted server) a bare aiohttp session posting the same JSON bodies;
  `--client openai` an `openai.AsyncOpenAI` client with the same keyword arguments as synth's. Timed
  from just before the client library's import to the last response, because the stage's own timer
  includes the same lazy import.
- candidate, synth: `synth run p.yaml solutions` on a pipeline in a fresh temp workspace (a new store,
  so nothing is cached), after `synth run p.yaml problems` has loaded the seeds. Its throughput uses
  the stage's own `seconds` from the run row (synth.runs.counts), which covers building and hashing
  the requests, recording them, calling the teacher, committing completions to DuckDB in batches as
  they arrive (SYNTH_FLUSH_ROWS / SYNTH_FLUSH_SECONDS), and the final bookkeeping; interpreter
  start-up and CLI imports are excluded. The end-to-end wall time of the subprocess is printed too.

The default server (bench/_stub_server.py) answers instantly after `--latency-ms`, so the server is
not the bottleneck and the ratio shows synth's own cost. With the stub, the server also checks that
both sides sent byte-for-byte the same request bodies (an order-independent digest).

Rounds are interleaved (raw, synth, raw, synth, ...); the medians and their ratio are printed, and
the last line is one JSON object: {"bench", "value", "baseline", "unit", "ratio", "goal"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.95
PARAMS = {"temperature": 0.8, "max_tokens": 32, "seed": 0}
TEMPLATE = 'user: "{{ question }}"\n'


# ---- the raw loop (runs in its own process: `--raw-worker SPEC.json`) ---------------------------

def raw_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["client"] == "http":
        return raw_http_worker(spec)
    requests, p, concurrency = spec["requests"], spec["params"], spec["concurrency"]
    started = time.perf_counter()
    import asyncio

    import openai
    imported = time.perf_counter()

    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=spec["base_url"], api_key="EMPTY", max_retries=6, timeout=120.0)
        todo = iter(requests)
        results: list = []

        async def worker() -> None:
            for r in todo:
                try:
                    # The same keyword arguments synth's openai teacher passes, so the bodies match.
                    resp = await client.chat.completions.create(
                        model=spec["model"], messages=r["messages"], temperature=p.get("temperature"),
                        top_p=p.get("top_p"), max_tokens=p.get("max_tokens"), seed=r["seed"], stop=p.get("stop"),
                        presence_penalty=p.get("presence_penalty"), frequency_penalty=p.get("frequency_penalty"),
                        extra_body=None)
                    results.append((resp.choices[0].message.content, resp.usage.completion_tokens))
                except openai.APIError as exc:
                    results.append(exc)

        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        finally:
            await client.close()
        return results

    report(started, imported, asyncio.run(main()))


def report(started: float, imported: float, results: list) -> None:
    """A raw worker's result line: seconds from before the client import to the last answer."""
    seconds = time.perf_counter() - started
    errors = sum(isinstance(r, BaseException) for r in results)
    print(json.dumps({"seconds": seconds, "import_s": imported - started, "done": len(results) - errors,
                      "errors": errors}))


def raw_http_worker(spec: dict) -> None:
    """The bare aiohttp loop: one pooled session, C workers, the same JSON bodies as synth's fast path."""
    requests, p, concurrency = spec["requests"], spec["params"], spec["concurrency"]
    started = time.perf_counter()
    import asyncio

    import aiohttp
    imported = time.perf_counter()

    async def main() -> list:
        url = spec["base_url"] + "/chat/completions"
        todo = iter(requests)
        results: list = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def worker() -> None:
                for r in todo:
                    body = {k: v for k, v in {
                        "messages": r["messages"], "model": spec["model"], "max_tokens": p.get("max_tokens"),
                        "seed": r["seed"], "temperature": p.get("temperature"), "top_p": p.get("top_p")}.items()
                        if v is not None}
                    async with session.post(url, json=body, headers={"Authorization": "Bearer EMPTY"}) as resp:
                        data = await resp.json()
                        results.append(data["choices"][0]["message"]["content"] if resp.status == 200 else
                                       RuntimeError(resp.status))

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        return results

    report(started, imported, asyncio.run(main()))


# ---- the server --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: bytes | None = None, timeout: float = 10) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST" if data is not None
                                                       else "GET"), timeout=timeout) as r:
        return json.loads(r.read())


def start_server(args, log: Path) -> tuple[subprocess.Popen, str, str]:
    """Start the server on a free loopback port; return (process, base_url, model name to send)."""
    port = free_port()
    if args.server == "stub":
        cmd = [sys.executable, str(REPO / "bench" / "_stub_server.py"), "--port", str(port),
               "--latency-ms", str(args.latency_ms)]
        model, timeout = "stub", 30
    else:
        model = str(Path(args.model).resolve())  # `transformers serve DIR` answers to the path it was given
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1",
               "--port", str(port), model]
        timeout = 300
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_json(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_server(proc)
                raise SystemExit(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}/v1", model


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cli_env() -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


# ---- one measurement of each side ----------------------------------------------------------------

def seed_rows(n_rows: int) -> list[dict]:
    return [{"id": f"q{i:06d}", "question": f"Q{i}: Ann has {i} apples and buys {i + 7} more. "
             "How many apples does she have? Think step by step."} for i in range(n_rows)]


def server_stats(args, base_url: str) -> dict | None:
    if args.server != "stub":
        return None
    return http_json(base_url.removesuffix("/v1") + "/stats")


def server_reset(args, base_url: str) -> None:
    if args.server == "stub":
        http_json(base_url.removesuffix("/v1") + "/reset", data=b"")


def run_raw(args, spec_path: Path, base_url: str, n: int) -> dict:
    server_reset(args, base_url)
    proc = subprocess.run([sys.executable, __file__, "--raw-worker", str(spec_path)], capture_output=True,
                          text=True, env=cli_env(), timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"raw loop failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["done"] != n:
        raise SystemExit(f"raw loop: {out['done']}/{n} requests succeeded ({out['errors']} errors)")
    out["server"] = server_stats(args, base_url)
    return out


def run_synth(args, rows: list[dict], base_url: str, model: str, n: int, work: Path, keep: bool) -> dict:
    import duckdb

    ws = Path(tempfile.mkdtemp(prefix="synth-bench-", dir=work))
    (ws / "prompts").mkdir()
    (ws / "prompts" / "q.yaml").write_text(TEMPLATE)
    (ws / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "p.yaml").write_text(
        "store: out/run.duckdb\n"
        "teachers:\n"
        f"  srv: {{backend: openai, model: {json.dumps(model)}, base_url: {json.dumps(base_url)}, "
        f"max_concurrency: {args.concurrency}, client: {args.client}}}\n"
        "stages:\n"
        "  problems: {kind: load, path: seeds.jsonl}\n"
        f"  solutions: {{kind: generate, input: problems, teacher: srv, prompt: q, samples: {args.samples}, "
        f"params: {json.dumps(PARAMS)}}}\n")
    cmd = [sys.executable, "-m", "synth.cli", "run", "p.yaml"]
    load = subprocess.run([*cmd, "problems"], cwd=ws, capture_output=True, text=True, env=cli_env())
    if load.returncode != 0:
        raise SystemExit(f"synth run problems failed:\n{load.stderr[-3000:]}")
    server_reset(args, base_url)
    started = time.perf_counter()
    gen = subprocess.run([*cmd, "solutions"], cwd=ws, capture_output=True, text=True, env=cli_env(), timeout=3600)
    wall = time.perf_counter() - started
    if gen.returncode != 0:
        raise SystemExit(f"synth run solutions failed ({gen.returncode}):\n{gen.stderr[-3000:]}")
    con = duckdb.connect(str(ws / "out" / "run.duckdb"), read_only=True)
    try:
        counts = json.loads(con.execute("SELECT counts FROM synth.runs ORDER BY started_at DESC LIMIT 1").fetchall()[0][0])
        stored = con.execute("SELECT count(*) FROM solutions").fetchall()[0][0]
    finally:
        con.close()
    stage = counts["stages"]["solutions"]
    if stage["sent"] != n or stage["errors"] or stored != n:
        raise SystemExit(f"synth: sent {stage['sent']}/{n}, {stage['errors']} errors, {stored} rows stored")
    if not keep:
        import shutil
        shutil.rmtree(ws, ignore_errors=True)
    return {"seconds": stage["seconds"], "wall": wall, "server": server_stats(args, base_url)}


# ---- main --------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description="synth generate stage vs a raw openai loop on the same server")
    ap.add_argument("--requests", type=int, default=2000, help="requests per round (rounded up to a multiple of --samples)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="stub server's artificial latency per request")
    ap.add_argument("--samples", type=int, default=4, help="samples per seed row (the stage's `samples:`)")
    ap.add_argument("--server", choices=["stub", "transformers"], default="stub")
    ap.add_argument("--model", help="model directory for --server transformers")
    ap.add_argument("--client", choices=["http", "openai"], default="http",
                    help="synth's client path, and the matching raw loop: http = synth's fast path vs a bare "
                         "aiohttp loop (the default for a self-hosted server); openai = both on the openai client")
    ap.add_argument("--keep", action="store_true", help="keep the temp workspaces (their stores) for inspection")
    ap.add_argument("--raw-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_worker:
        return raw_worker(args.raw_worker)
    if args.server == "transformers" and not args.model:
        ap.error("--server transformers needs --model DIR")

    from synth.ids import sample_seed

    n_rows = math.ceil(args.requests / args.samples)
    n = n_rows * args.samples
    rows = seed_rows(n_rows)
    work = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    proc, base_url, model = start_server(args, work / "server.log")
    try:
        spec = {"base_url": base_url, "model": model, "concurrency": args.concurrency, "params": PARAMS,
                "client": args.client,
                "requests": [{"messages": [{"role": "user", "content": r["question"]}],
                              "seed": sample_seed(PARAMS.get("seed"), k)}
                             for r in rows for k in range(args.samples)]}
        spec_path = work / "raw.json"
        spec_path.write_text(json.dumps(spec))
        where = f"{args.server} server" + (f", latency {args.latency_ms:g} ms" if args.server == "stub" else "") \
            + f", client {args.client}"
        print(f"generate_overhead: {n} requests ({n_rows} rows x {args.samples} samples), concurrency "
              f"{args.concurrency}, {where}, {args.rounds} rounds", flush=True)
        raw_rps, synth_rps, synth_e2e_rps = [], [], []
        for i in range(1, args.rounds + 1):
            raw = run_raw(args, spec_path, base_url, n)
            raw_rps.append(n / raw["seconds"])
            print(f"round {i}  raw loop  {raw['seconds']:7.3f} s  {raw_rps[-1]:8.1f} req/s   "
                  f"(import {raw['import_s']:.2f} s)", flush=True)
            cand = run_synth(args, rows, base_url, model, n, work, args.keep)
            synth_rps.append(n / cand["seconds"])
            synth_e2e_rps.append(n / cand["wall"])
            print(f"round {i}  synth     {cand['seconds']:7.3f} s  {synth_rps[-1]:8.1f} req/s   "
                  f"(end to end {cand['wall']:.2f} s, {synth_e2e_rps[-1]:.1f} req/s)", flush=True)
            if raw["server"] and cand["server"]:
                if raw["server"] != cand["server"] or raw["server"]["requests"] != n:
                    raise SystemExit(f"the two sides sent different requests: raw {raw['server']}, "
                                     f"synth {cand['server']}")
        baseline, value = statistics.median(raw_rps), statistics.median(synth_rps)
        ratio = value / baseline
        print(f"median  raw loop {baseline:.1f} req/s · synth generate stage {value:.1f} req/s "
              f"(end to end {statistics.median(synth_e2e_rps):.1f} req/s) · ratio {ratio:.3f} "
              f"(goal >= {GOAL})" + ("" if args.server != "stub" else " · request bodies identical"), flush=True)
        print(json.dumps({"bench": "generate_overhead", "value": round(value, 2), "baseline": round(baseline, 2),
                          "unit": "requests/s", "ratio": round(ratio, 4), "goal": GOAL}))
    finally:
        stop_server(proc)
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
