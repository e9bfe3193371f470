"""Tokens/s of a real pretrained model (SmolLM2-135M-Instruct, tests/pretrained.py) through synth vs
each backend's own raw loop: same prompts, same chat template, same sampling, same batch size or
concurrency.

    .venv/bin/python bench/real_model.py [--backends hf,vllm,serve] [--prompts 8] [--max-tokens 32]
        [--rounds 3] [--batch-size 4] [--concurrency 4] [--threads 1] [--model DIR]

- hf: synth's in-process transformers teacher (`backend: hf`, batch_size B) vs a plain
  `model.generate` loop over the same batches of B (the tokenizer's chat template, left padding, the
  same per-batch torch seed, do_sample/temperature/top_p/top_k as the teacher sets them).
- vllm: synth's offline vLLM teacher vs a raw `vllm.LLM.chat` over the same conversations with the
  same per-request seeds and engine arguments (float32, eager, prefix caching, max_model_len).
  Each side runs in a fresh process (one engine per process). Skipped, with the reason printed, when
  vllm is not importable.
- serve: `transformers serve` on a free loopback port for the model dir; synth's `openai` backend
  (client auto = the aiohttp fast path for a self-hosted server, max_concurrency C) vs a raw loop of
  C asyncio workers on one aiohttp session posting the same JSON bodies.

synth runs through its public seam: a pipeline file in a fresh temp workspace (a new store, so nothing
is cached) with a load stage over a seeds .jsonl and a generate stage, and `synth.run(path)` in
process. Its figure is the generate stage's own `seconds` from the run counts (loading the teacher,
building and recording the requests, generating, committing to DuckDB) and its `completion_tokens`.
The raw loop is timed the same way: from just before it loads the model (hf, vllm) or opens its
session (serve) to its last answer (vllm: and its engine shut down, as the teacher's close() does;
~5 s on either side). Both sides count a stop token as generated, as synth does. The texts of the
two sides are compared (same seeds, same batches: they should be equal).
Second figure, `gen_ratio`, "generating only": both without loading and releasing the model (synth:
the stage seconds less the time spent in `stage_teacher` and in the teacher's `close`, measured by
wrapping them in this process; raw: from after its load to its last answer), so synth's own
bookkeeping (requests, DuckDB commits) is all that differs. For vllm on CPU the engine start-up
(~20 s) and shutdown (~5 s) dominate small runs, so `ratio` there is near 1 by construction.

Rounds are interleaved (raw first in odd rounds, synth first in even ones); medians per backend and
their ratio are printed (goal >= 0.95); the last line is one JSON object whose top-level
value/baseline/ratio are those of the worst backend, with every backend under "backends".
"""

from __future__ import annotations

import argparse
import io
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
sys.path.append(str(REPO / "tests"))  # tests/conftest.py's server helpers, tests/pretrained.py (appended: this
# folder's modules keep their names)
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

GOAL = 0.95
TEMPLATE = 'user: "{{ question }}"\n'
STAGE = "solutions"


# ---- shared helpers (bench/real_model_figures.py uses them too) ---------------------------------

def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    from pretrained import real_model_dir  # tests/pretrained.py: converts the GGUF model once, cached

    return real_model_dir()


def seed_rows(n: int) -> list[dict]:
    return [{"id": f"q{i:04d}", "question": f"Q{i}: Ann has {i} apples and buys {i + 7} more. "
             "How many apples does she have? Think step by step."} for i in range(n)]


def messages_of(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["question"]}]  # what TEMPLATE renders


def workspace(work: Path, rows: list[dict], teacher: dict, stage: str, prompts: dict[str, str] | None = None) -> Path:
    """A fresh workspace (new store) with `problems` (load) and one generate stage `solutions` = `stage`
    (a YAML flow-mapping body); returns the pipeline path."""
    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=work))
    (ws / "prompts").mkdir()
    for name, text in (prompts or {"q": TEMPLATE}).items():
        (ws / "prompts" / f"{name}.yaml").write_text(text)
    (ws / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "p.yaml").write_text("store: out/run.duckdb\nteachers:\n"
                               f"  t: {json.dumps(teacher)}\n"
                               "stages:\n  problems: {kind: load, path: seeds.jsonl}\n"
                               f"  {STAGE}: {{kind: generate, input: problems, teacher: t, {stage}}}\n")
    return ws / "p.yaml"


def run_synth(pipeline: Path, n: int | None = None, check: bool = True) -> dict:
    """`synth.run(pipeline)` in this process on its fresh store: the generate stage's own seconds and
    completion_tokens, the time spent loading its teacher, its texts (keyed input_id, sample), its detail
    from synth.stages and the run's console output."""
    import duckdb
    from rich.console import Console

    import synth
    import synth.stages.generate as generate

    loading, closing = [], []
    original = generate.stage_teacher

    def timed(ctx, name):
        t = time.perf_counter()
        try:
            teacher = original(ctx, name)
        finally:
            loading.append(time.perf_counter() - t)
        close = teacher.close

        def timed_close():
            t = time.perf_counter()
            try:
                close()
            finally:
                closing.append(time.perf_counter() - t)

        teacher.close = timed_close
        return teacher

    out = io.StringIO()
    generate.stage_teacher = timed
    try:
        counts = synth.run(pipeline, console=Console(file=out, width=200, highlight=False))
    finally:
        generate.stage_teacher = original
    stage = counts["stages"][STAGE]
    if check and (stage["errors"] or (n is not None and stage["sent"] != n)):
        raise SystemExit(f"synth: sent {stage['sent']}/{n}, {stage['errors']} errors\n{out.getvalue()[-3000:]}")
    con = duckdb.connect(str(pipeline.parent / "out" / "run.duckdb"), read_only=True)
    try:
        texts = {(i, s): t for i, s, t in con.execute(f"SELECT input_id, sample, text FROM {STAGE}").fetchall()}
        detail = json.loads(con.execute("SELECT detail FROM synth.stages WHERE name = ?", [STAGE]).fetchall()[0][0])
    finally:
        con.close()
    load_s, close_s = sum(loading), sum(closing)
    return {"seconds": stage["seconds"], "gen_s": stage["seconds"] - load_s - close_s, "load_s": load_s,
            "close_s": close_s,
            "tokens": stage["completion_tokens"], "texts": texts, "detail": detail, "counts": stage,
            "log": out.getvalue()}


def start_serve(model: Path, log: Path, threads: int | None = None, timeout: float = 300):
    """`transformers serve` for `model` on a free loopback port, started by tests/conftest.py's own helper;
    returns (process, base_url, model name it answers to: the path it was given)."""
    from conftest import cli_env, free_port, start_server

    exe = Path(sys.executable).parent / "transformers"
    if not exe.exists():
        raise RuntimeError("transformers serve is not installed (transformers[serving])")
    port = free_port()
    env = cli_env(**({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = start_server([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", str(model)],
                        f"http://127.0.0.1:{port}/health", log, timeout=timeout, env=env)
    return proc, f"http://127.0.0.1:{port}/v1", str(model)


def stop_serve(proc) -> None:
    from conftest import stop_server

    stop_server(proc)


# ---- raw loops -----------------------------------------------------------------------------------------

def raw_hf(model: Path, rows: list[dict], params: dict, batch_size: int) -> dict:
    """A plain transformers loop: the tokenizer's chat template over batches of `batch_size`, left padded,
    torch seeded per batch with the first request's per-sample seed, model.generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from synth.ids import sample_seed

    hf_logging.disable_progress_bar()  # as synth's teacher does
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to("cpu").eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos = lm.generation_config.eos_token_id
    eos_ids = sorted((set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}) - {None})
    loaded = time.perf_counter()
    temperature = params["temperature"]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    texts, tokens = {}, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        torch.manual_seed(sample_seed(params.get("seed"), 0))
        enc = tok.apply_chat_template([messages_of(r) for r in batch], add_generation_prompt=True, padding=True,
                                      return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = lm.generate(**enc, max_new_tokens=params["max_tokens"], pad_token_id=tok.pad_token_id,
                              eos_token_id=eos_ids, **sampling)
        width = enc["input_ids"].shape[1]
        for i, r in enumerate(batch):
            new = out[i, width:].tolist()
            stop = next((j for j, t in enumerate(new) if t in eos_ids), None)
            kept = new if stop is None else new[:stop]
            tokens += len(kept) + (stop is not None)
            texts[(r["id"], 0)] = tok.decode(kept, skip_special_tokens=True)
    end = time.perf_counter()
    return {"seconds": end - started, "gen_s": end - loaded, "tokens": tokens, "texts": texts,
            "load_s": loaded - started}


def vllm_engine_args(max_model_len: int) -> dict:
    """The engine arguments synth's vllm teacher passes on CPU (synth/teachers/vllm.py)."""
    return {"dtype": "float32", "enable_prefix_caching": True, "seed": 0, "enforce_eager": True,
            "max_model_len": max_model_len}


def raw_vllm(model: Path, rows: list[dict], params: dict, max_model_len: int) -> dict:
    """vllm.LLM.chat over every conversation at once, one SamplingParams per request with its seed."""
    started = time.perf_counter()
    import vllm

    from synth.ids import sample_seed

    llm = vllm.LLM(model=str(model), **vllm_engine_args(max_model_len))
    loaded = time.perf_counter()
    sps = [vllm.SamplingParams(n=1, seed=sample_seed(params.get("seed"), 0), temperature=params["temperature"],
                               top_p=1.0, max_tokens=params["max_tokens"]) for _ in rows]
    outs = llm.chat([messages_of(r) for r in rows], sampling_params=sps, use_tqdm=False)
    generated = time.perf_counter()
    texts = {(r["id"], 0): o.outputs[0].text for r, o in zip(rows, outs)}
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    # release the engine (its core process) as a program that goes on after generating must, and as synth's
    # teacher does in close(): the same shutdown call
    engine = llm.llm_engine
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
    end = time.perf_counter()
    return {"seconds": end - started, "gen_s": generated - loaded, "tokens": tokens, "texts": texts,
            "load_s": loaded - started, "close_s": end - generated}


def raw_serve(base_url: str, model: str, rows: list[dict], params: dict, concurrency: int) -> dict:
    """C asyncio workers on one aiohttp session posting the bodies synth's fast path posts."""
    import asyncio

    import aiohttp

    from synth.ids import sample_seed

    async def main() -> dict:
        todo = iter(rows)
        texts, tokens = {}, [0]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def worker() -> None:
                for r in todo:
                    body = {"messages": messages_of(r), "model": model, "max_tokens": params["max_tokens"],
                            "seed": sample_seed(params.get("seed"), 0), "temperature": params["temperature"]}
                    async with session.post(base_url + "/chat/completions", json=body,
                                            headers={"Authorization": "Bearer EMPTY"}) as resp:
                        data = await resp.json()
                        if resp.status != 200:
                            raise SystemExit(f"raw serve loop: HTTP {resp.status}: {str(data)[:300]}")
                    texts[(r["id"], 0)] = data["choices"][0]["message"]["content"]
                    tokens[0] += data["usage"]["completion_tokens"]

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(rows)))))
        return {"texts": texts, "tokens": tokens[0]}

    started = time.perf_counter()
    out = asyncio.run(main())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "gen_s": seconds, **out}


# ---- one measurement per side; vllm in a fresh process --------------------------------------------------

def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    rows = spec["rows"]
    if spec["side"] == "raw":
        res = raw_vllm(Path(spec["model"]), rows, spec["params"], spec["max_model_len"])
    else:
        res = run_synth(Path(spec["pipeline"]), len(rows))
    res["texts"] = [[k[0], k[1], v] for k, v in res["texts"].items()]
    for key in ("detail", "counts", "log"):
        res.pop(key, None)
    print("RESULT " + json.dumps(res))


def in_worker(spec: dict, work: Path) -> dict:
    path = Path(tempfile.mkstemp(prefix="spec-", suffix=".json", dir=work)[1])
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True,
                          timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vllm {spec['side']} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["texts"] = {(i, s): t for i, s, t in res["texts"]}
    return res


class Section:
    """One backend's rounds: raw and synth measurements, interleaved by the caller."""

    def __init__(self, name: str, raw, synth):
        self.name, self.raw, self.synth = name, raw, synth
        self.results: dict[str, list[dict]] = {"raw": [], "synth": []}

    def measure(self, side: str, i: int) -> None:
        res = (self.raw if side == "raw" else self.synth)()
        self.results[side].append(res)
        print(f"  round {i}  {self.name:5s} {side:5s}  {res['tokens']:5d} tokens  {res['seconds']:7.2f} s  "
              f"{res['tokens'] / res['seconds']:7.2f} tok/s   (generating only {res['gen_s']:6.2f} s, "
              f"{res['tokens'] / res['gen_s']:7.2f} tok/s; load {res.get('load_s', 0):.2f} s, close "
              f"{res.get('close_s', 0):.2f} s)", flush=True)

    def summary(self) -> dict:
        def med(side: str, key: str) -> float:
            return statistics.median(r["tokens"] / r[key] for r in self.results[side])

        base, value = med("raw", "seconds"), med("synth", "seconds")
        gbase, gvalue = med("raw", "gen_s"), med("synth", "gen_s")
        same = sum(a["texts"] == b["texts"] for a, b in zip(self.results["raw"], self.results["synth"]))
        rounds = [round((s["tokens"] / s["seconds"]) / (r["tokens"] / r["seconds"]), 3)
                  for r, s in zip(self.results["raw"], self.results["synth"])]
        return {"value": round(value, 2), "baseline": round(base, 2), "ratio": round(value / base, 4),
                "gen_value": round(gvalue, 2), "gen_baseline": round(gbase, 2), "gen_ratio": round(gvalue / gbase, 4),
                "round_ratios": rounds, "same_texts_rounds": f"{same}/{len(rounds)}",
                "tokens": [r["tokens"] for r in self.results["synth"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description="a real model's tokens/s through synth vs each backend's raw loop")
    ap.add_argument("--backends", default="hf,vllm,serve", help="comma-separated: hf, vllm, serve")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4, help="hf: the teacher's batch_size and the raw batches")
    ap.add_argument("--concurrency", type=int, default=4, help="serve: requests in flight on both sides")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (bench process, vllm workers, server)")
    ap.add_argument("--max-model-len", type=int, default=512, help="vllm: max_model_len on both sides")
    ap.add_argument("--model", help="model directory (default: tests/pretrained.py's SmolLM2-135M-Instruct)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)

    import torch

    torch.set_num_threads(args.threads)
    model = model_dir(args.model)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = seed_rows(args.prompts)
    params = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": 0}
    stage = f"prompt: q, params: {json.dumps(params)}"
    work = Path(tempfile.mkdtemp(prefix="synth-bench-real-"))
    print(f"real_model: {model.name}, {len(rows)} prompts, max_tokens {args.max_tokens}, temperature "
          f"{args.temperature}, {args.rounds} rounds, torch threads {args.threads}, backends {backends}", flush=True)
    sections, skipped, server = [], {}, None
    started = time.perf_counter()
    try:
        if "hf" in backends:
            raw_hf(model, rows[:1], {**params, "max_tokens": 2}, 1)  # warm-up: imports, first read of the weights
            teacher = {"backend": "hf", "model": str(model), "batch_size": args.batch_size}
            sections.append(Section("hf", lambda: raw_hf(model, rows, params, args.batch_size),
                                    lambda t=teacher: run_synth(workspace(work, rows, t, stage), len(rows))))
        if "vllm" in backends:
            try:
                import vllm  # noqa: F401
            except Exception as exc:  # ImportError, or a broken install
                skipped["vllm"] = f"vllm is not importable: {type(exc).__name__}: {str(exc)[:200]}"
                print(f"  vllm: skipped: {skipped['vllm']}", flush=True)
            else:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, args.threads) - 1}")
                os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
                teacher = {"backend": "vllm", "model": str(model), "max_model_len": args.max_model_len}
                base = {"model": str(model), "rows": rows, "params": params, "threads": args.threads,
                        "max_model_len": args.max_model_len}
                sections.append(Section(
                    "vllm", lambda: in_worker({**base, "side": "raw"}, work),
                    lambda t=teacher: in_worker({**base, "side": "synth",
                                                 "pipeline": str(workspace(work, rows, t, stage))}, work)))
        if "serve" in backends:
            try:
                server, base_url, name = start_serve(model, work / "serve.log", args.threads)
            except RuntimeError as exc:
                skipped["serve"] = str(exc).splitlines()[0]
                print(f"  serve: skipped: {skipped['serve']}", flush=True)
            else:
                teacher = {"backend": "openai", "model": name, "base_url": base_url,
                           "max_concurrency": args.concurrency}
                raw_serve(base_url, name, rows[:1], {**params, "max_tokens": 2}, 1)  # warm-up: the server's first request
                sections.append(Section("serve", lambda: raw_serve(base_url, name, rows, params, args.concurrency),
                                        lambda t=teacher: run_synth(workspace(work, rows, t, stage), len(rows))))
        for i in range(1, args.rounds + 1):
            for section in sections:
                for side in (("raw", "synth") if i % 2 else ("synth", "raw")):
                    section.measure(side, i)
    finally:
        if server is not None:
            stop_serve(server)
        shutil.rmtree(work, ignore_errors=True)
    results = {}
    for section in sections:
        s = results[section.name] = section.summary()
        print(f"median  {section.name:5s} raw {s['baseline']:.2f} tok/s · synth {s['value']:.2f} tok/s · ratio "
              f"{s['ratio']:.3f} (rounds {s['round_ratios']}) · generating only {s['gen_baseline']:.2f} vs "
              f"{s['gen_value']:.2f} tok/s, ratio {s['gen_ratio']:.3f} · same texts in {s['same_texts_rounds']} rounds",
              flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    worst = min(results, key=lambda b: results[b]["ratio"]) if results else None
    head = results.get(worst, {})
    print(json.dumps({"bench": "real_model", "value": head.get("value"), "baseline": head.get("baseline"),
                      "unit": "tokens/s", "ratio": head.get("ratio"), "goal": GOAL, "backend": worst,
                      "model": model.name, "prompts": len(rows), "max_tokens": args.max_tokens,
                      "rounds": args.rounds, "threads": args.threads,
                      "backends": {**results, **{b: {"skipped": why} for b, why in skipped.items()}}}))


if __name__ == "__main__":
    main()
