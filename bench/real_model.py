"""Generation throughput of a real pretrained model (SmolLM2-135M-Instruct, tests/pretrained.py) through synth
vs each backend's own raw loop: same prompts, same chat template, same sampling and per-request seeds, same
batch size or concurrency, and the same engine or server. Start-up (loading the model, starting the engine)
is measured and reported apart: it is the same work on both sides and not what the ratio is about.

    .venv/bin/python bench/real_model.py [--backends hf,vllm,serve,vllm-server] [--prompts 8[,64]]
        [--max-tokens 32] [--rounds 3] [--batch-size 4] [--concurrency 4] [--server-concurrency 64]
        [--startup-rounds 1] [--threads 1] [--max-model-len 512] [--model DIR]

Backends (each skipped, with the reason printed, when what it needs is missing):
- hf: synth's in-process transformers teacher (`backend: hf`, batch_size B) vs a plain `model.generate` loop
  over the same batches of B (the tokenizer's chat template, left padding, the same per-batch torch seed,
  do_sample/temperature/top_p/top_k as the teacher sets them). Each measurement loads the model (~1 s).
- vllm: synth's offline vLLM teacher vs `LLM.chat` on THE SAME ENGINE, in one worker process: the engine is
  the one synth's teacher started (its own engine arguments), kept between measurements; the prefix cache is
  reset before each measurement, so both sides prefill the same prompts. Start-up apart, in fresh processes
  (`--startup-rounds` per side): raw `vllm.LLM(...)` (with the engine arguments synth passes) vs a cold
  `synth.run` (its stage's teacher load), each also timing its generation and the engine's shutdown (`cold`).
- serve: `transformers serve` on a loopback port; synth's `openai` backend (client auto = the aiohttp fast
  path, max_concurrency C) vs C asyncio workers on one aiohttp session posting the same JSON bodies.
- vllm-server: vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`, float32, eager,
  --no-enable-chunked-prefill: on CPU, vLLM 0.32 kills the engine when it chunks a seeded request's prompt),
  the same two sides as serve at `--server-concurrency` (default 64: every request in flight, as the offline
  engine takes them). Each prompt set is sent once before the rounds (1 token), so every measurement finds
  the same prompts in the server's prefix cache.

synth runs through its public seam: a pipeline file in a fresh temp workspace (a new store: nothing cached)
with a load stage over a seeds .jsonl and a generate stage, `synth.run(path)` in process. Its generation time
is the generate stage's own `seconds` (building and recording the requests, generating, committing to DuckDB,
the stage's closing statistics) less the time spent creating its teacher (`stage_teacher`) and in the teacher's
`close` (both measured by wrapping them); raw: from after its model/engine/session is ready to its last
answer. `bookkeeping` is synth's stage time outside the teacher's generate() iteration (before the first
request and after the last answer): a fixed cost per stage (a few DuckDB transactions of ~30 ms each here).
Both sides count a stop token as generated, as synth does; the texts of the two sides are compared (same seeds,
same batches: equal).

Rounds are interleaved (raw first in odd rounds, synth first in even ones); per backend and prompt count the
medians of tokens/s and their ratio (goal >= 0.95); the last line is one JSON object whose top-level
value/baseline/ratio are those of the worst row, with every row under "backends" (keyed by backend for the
first prompt count, `backend@N` for the others; bench/real_model_figures.py reads "hf").
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
SERVED_NAME = "smol"  # the name vLLM's server answers to


# ---- shared helpers (bench/real_model_figures.py uses them too) ---------------------------------

def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    from pretrained import real_model_dir  # tests/pretrained.py: converts the GGUF model once, cached

    return real_model_dir()


def seed_rows(n: int, offset: int = 0) -> list[dict]:
    """n questions; another offset gives other questions of the same shape (prompts the engine has not seen)."""
    return [{"id": f"q{i:04d}", "question": f"Q{i}: Ann has {i} apples and buys {i + 7} more. "
             "How many apples does she have? Think step by step."} for i in range(offset, offset + n)]


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


class KeptTeacher:
    """Hands run_synth's generate stage one teacher for every run (built by the first, through synth's own
    stage_teacher) and defers its close() to close_now(): synth's stage on a warm engine."""

    def __init__(self):
        self.teacher, self.close = None, None

    def close_now(self) -> float:
        if self.close is None:
            return 0.0
        t = time.perf_counter()
        self.close()
        self.close = None
        return time.perf_counter() - t


def run_synth(pipeline: Path, n: int | None = None, check: bool = True, keep: KeptTeacher | None = None) -> dict:
    """`synth.run(pipeline)` in this process on its fresh store: the generate stage's own seconds and
    completion_tokens, the time spent loading its teacher and closing it, the time in the teacher's generate()
    iteration, its texts (keyed input_id, sample), its detail from synth.stages and the run's console output.
    `keep`: the teacher is built once and kept open (the caller closes it with keep.close_now())."""
    import duckdb
    from rich.console import Console

    import synth
    import synth.stages.generate as generate

    loading, closing, iterating = [], [], []
    original = generate.stage_teacher

    def timed(ctx, name):
        t = time.perf_counter()
        try:
            if keep is not None and keep.teacher is not None:
                teacher = keep.teacher
            else:
                teacher = original(ctx, name)
                teacher._bench_generate = teacher.generate  # noqa: SLF001 - wrapped below, once per run
                if keep is not None:
                    keep.teacher, keep.close = teacher, teacher.close
        finally:
            loading.append(time.perf_counter() - t)
        inner = teacher._bench_generate

        def timed_generate(requests):
            t = time.perf_counter()
            try:
                yield from inner(requests)
            finally:
                iterating.append(time.perf_counter() - t)

        def timed_close():
            t = time.perf_counter()
            try:
                if keep is None:
                    inner_close()
            finally:
                closing.append(time.perf_counter() - t)

        inner_close = keep.close if keep is not None else teacher.close
        teacher.generate, teacher.close = timed_generate, timed_close
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
    gen_s = stage["seconds"] - load_s - close_s
    return {"seconds": stage["seconds"], "gen_s": gen_s, "load_s": load_s, "close_s": close_s,
            "teacher_s": sum(iterating), "bookkeeping_s": gen_s - sum(iterating),
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


def start_vllm_server(model: Path, log: Path, threads: int, max_model_len: int, timeout: float = 400):
    """vLLM's OpenAI-compatible server for `model` (float32, eager, as synth's vllm teacher runs the engine on
    CPU): (process, base_url, served model name, seconds it took to answer /health)."""
    import importlib.util

    from conftest import cli_env, free_port, start_server

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("vllm is not installed")
    port = free_port()
    env = cli_env(OMP_NUM_THREADS=str(threads), **vllm_env(threads))
    t = time.perf_counter()
    proc = start_server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                         "--served-model-name", SERVED_NAME, "--dtype", "float32", "--enforce-eager",
                         # vLLM 0.32 on CPU: a seeded request whose prompt is chunked kills the engine (more than
                         # 2048 prompt tokens in flight: ~35 of these prompts); synth's teacher turns chunking off
                         "--no-enable-chunked-prefill",
                         "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(port)],
                        f"http://127.0.0.1:{port}/health", log, timeout=timeout, env=env)
    return proc, f"http://127.0.0.1:{port}/v1", SERVED_NAME, time.perf_counter() - t


def stop_serve(proc) -> None:
    from conftest import stop_server

    stop_server(proc)


def vllm_env(threads: int) -> dict:
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, threads) - 1}"),
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}


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
    """The engine arguments synth's vllm teacher passes on CPU (synth/teachers/vllm.py), structured output
    configuration included (it changes nothing for requests without a schema, but the engines are the same)."""
    return {"dtype": "float32", "enable_prefix_caching": True, "seed": 0, "enforce_eager": True,
            "enable_chunked_prefill": False, "max_model_len": max_model_len,
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}


def vllm_chat(llm, rows: list[dict], params: dict) -> dict:
    """LLM.chat over every conversation at once, one SamplingParams per request with its seed: (texts, tokens)."""
    import vllm

    from synth.ids import sample_seed

    sps = [vllm.SamplingParams(n=1, seed=sample_seed(params.get("seed"), 0), temperature=params["temperature"],
                               top_p=1.0, max_tokens=params["max_tokens"]) for _ in rows]
    outs = llm.chat([messages_of(r) for r in rows], sampling_params=sps, use_tqdm=False)
    return {"texts": {(r["id"], 0): o.outputs[0].text for r, o in zip(rows, outs)},
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def shutdown_engine(llm) -> None:
    """Release the engine (its core process) as synth's teacher does in close(): the same shutdown call."""
    engine = llm.llm_engine
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()


def raw_vllm(model: Path, rows: list[dict], params: dict, max_model_len: int) -> dict:
    """Cold: import vLLM, start an engine with synth's engine arguments, LLM.chat, shut it down."""
    started = time.perf_counter()
    import vllm

    llm = vllm.LLM(model=str(model), **vllm_engine_args(max_model_len))
    loaded = time.perf_counter()
    res = vllm_chat(llm, rows, params)
    generated = time.perf_counter()
    shutdown_engine(llm)
    end = time.perf_counter()
    return {"seconds": end - started, "gen_s": generated - loaded, **res, "load_s": loaded - started,
            "close_s": end - generated}


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


# ---- vllm: worker processes (one engine per process; vLLM's spawned workers need __main__) --------------

def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "warm":
        results = warm_vllm(spec)
    elif spec["side"] == "raw":
        results = [raw_vllm(Path(spec["model"]), spec["rows"], spec["params"], spec["max_model_len"])]
    else:
        results = [run_synth(Path(spec["pipeline"]), len(spec["rows"]))]
    for res in results:
        res["texts"] = [[k[0], k[1], v] for k, v in res["texts"].items()]
        for key in ("detail", "counts", "log"):
            res.pop(key, None)
    print("RESULT " + json.dumps(results))


def warm_vllm(spec: dict) -> list[dict]:
    """One engine, started by synth's teacher in a first (warm-up) synth.run; then per round and prompt count
    LLM.chat on that engine and synth.run with that teacher, interleaved, the prefix cache reset before each."""
    keep = KeptTeacher()
    work = Path(spec["work"])
    teacher = {"backend": "vllm", "model": spec["model"], "max_model_len": spec["max_model_len"]}
    stage = f"prompt: q, params: {json.dumps(spec['params'])}"
    warm_rows = seed_rows(4, offset=10_000)
    first = run_synth(workspace(work, warm_rows, teacher, stage), len(warm_rows), keep=keep)
    llm = keep.teacher.llm
    vllm_chat(llm, warm_rows, spec["params"])  # the raw path's first call too
    results = []
    for i in range(1, spec["rounds"] + 1):
        for n in spec["counts"]:
            rows = seed_rows(n)
            for side in (("raw", "synth") if i % 2 else ("synth", "raw")):
                llm.reset_prefix_cache()
                if side == "raw":
                    t = time.perf_counter()
                    res = vllm_chat(llm, rows, spec["params"])
                    res["gen_s"] = res["seconds"] = time.perf_counter() - t
                else:
                    res = run_synth(workspace(work, rows, teacher, stage), n, keep=keep)
                results.append({**res, "side": side, "round": i, "prompts": n})
    close_s = keep.close_now()
    results.append({"side": "startup", "load_s": first["load_s"], "close_s": close_s, "texts": {}})
    return results


def in_worker(spec: dict, work: Path) -> list[dict]:
    path = Path(tempfile.mkstemp(prefix="spec-", suffix=".json", dir=work)[1])
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True,
                          timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vllm {spec.get('side', spec['mode'])} worker failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    results = json.loads(lines[-1][len("RESULT "):])
    for res in results:
        res["texts"] = {(i, s): t for i, s, t in res["texts"]}
    return results


# ---- measurements and summaries ---------------------------------------------------------------------------

class Section:
    """One backend's rounds at one prompt count: raw and synth measurements (made here, interleaved by the
    caller, or recorded from a worker), plus start-up figures measured apart."""

    def __init__(self, name: str, raw=None, synth=None, prompts: int | None = None):
        self.name, self.raw, self.synth, self.prompts = name, raw, synth, prompts
        self.results: dict[str, list[dict]] = {"raw": [], "synth": []}
        self.startup: dict[str, list[dict]] = {"raw": [], "synth": []}  # cold runs: load_s, close_s, tokens, seconds

    @property
    def label(self) -> str:
        return f"{self.name}@{self.prompts}" if self.prompts else self.name

    def measure(self, side: str, i: int) -> None:
        self.record(side, i, (self.raw if side == "raw" else self.synth)())

    def record(self, side: str, i: int, res: dict) -> None:
        self.results[side].append(res)
        extra = f"; synth outside the teacher {res['bookkeeping_s']:.2f} s" if "bookkeeping_s" in res else ""
        load = f"; load {res['load_s']:.2f} s" if res.get("load_s") else ""
        print(f"  round {i}  {self.label:16s} {side:5s} {res['tokens']:5d} tokens  generating {res['gen_s']:6.2f} s "
              f"{res['tokens'] / res['gen_s']:7.2f} tok/s{load}{extra}", flush=True)

    def summary(self) -> dict:
        def med(rows: list[dict], key: str) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else None

        def speed(side: str) -> float:
            return statistics.median(r["tokens"] / r["gen_s"] for r in self.results[side])

        base, value = speed("raw"), speed("synth")
        pairs = list(zip(self.results["raw"], self.results["synth"]))
        same = sum(a["texts"] == b["texts"] for a, b in pairs)
        rounds = [round((s["tokens"] / s["gen_s"]) / (r["tokens"] / r["gen_s"]), 3) for r, s in pairs]
        out = {"value": round(value, 2), "baseline": round(base, 2), "ratio": round(value / base, 4),
               "round_ratios": rounds, "same_texts_rounds": f"{same}/{len(rounds)}",
               "tokens": [r["tokens"] for r in self.results["synth"]],
               # the teacher's generate() iteration alone (synth's client or engine loop, and the stage's work per
               # answer as it arrives) vs the raw loop: what is left when the fixed per-stage cost is taken out
               "teacher_ratio": _round(statistics.median(r["tokens"] / r["teacher_s"] for r in self.results["synth"])
                                       / base, 4) if all(r.get("teacher_s") for r in self.results["synth"]) else None,
               "synth_bookkeeping_s": _round(med(self.results["synth"], "bookkeeping_s"), 3),
               "synth_gen_s": _round(med(self.results["synth"], "gen_s"), 3),
               "raw_gen_s": _round(med(self.results["raw"], "gen_s"), 3)}
        cold = self.startup if self.startup["raw"] or self.startup["synth"] else \
            {side: [r for r in self.results[side] if r.get("load_s")] for side in ("raw", "synth")}
        for side in ("raw", "synth"):
            out[f"startup_{side}_s"] = _round(med(cold[side], "load_s"), 2)
            out[f"close_{side}_s"] = _round(med(cold[side], "close_s"), 2)
        if cold["raw"] and cold["synth"] and all(r.get("seconds") for r in cold["raw"] + cold["synth"]):
            # whole runs, start-up and shutdown included: what a user waits for at this size
            whole = {side: statistics.median(r["tokens"] / r["seconds"] for r in cold[side]) for side in cold}
            out.update(cold_value=round(whole["synth"], 2), cold_baseline=round(whole["raw"], 2),
                       cold_ratio=round(whole["synth"] / whole["raw"], 4))
        return out


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def main() -> None:
    ap = argparse.ArgumentParser(description="a real model's generation tokens/s through synth vs each backend's "
                                             "raw loop")
    ap.add_argument("--backends", default="hf,vllm,serve,vllm-server",
                    help="comma-separated: hf, vllm, serve, vllm-server")
    ap.add_argument("--prompts", default="8", help="prompt counts, comma-separated (e.g. 8,64)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--startup-rounds", type=int, default=1,
                    help="vllm: cold processes per side for the start-up figures (0: none)")
    ap.add_argument("--batch-size", type=int, default=4, help="hf: the teacher's batch_size and the raw batches")
    ap.add_argument("--concurrency", type=int, default=4, help="serve: requests in flight on both sides")
    ap.add_argument("--server-concurrency", type=int, default=64,
                    help="vllm-server: requests in flight on both sides")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (bench process, vllm workers, servers)")
    ap.add_argument("--max-model-len", type=int, default=512, help="vllm, vllm-server: max_model_len")
    ap.add_argument("--model", help="model directory (default: tests/pretrained.py's SmolLM2-135M-Instruct)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)

    import torch

    torch.set_num_threads(args.threads)
    model = model_dir(args.model)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"hf", "vllm", "serve", "vllm-server"}
    if unknown:
        raise SystemExit(f"unknown backends: {sorted(unknown)}")
    counts = [int(n) for n in args.prompts.split(",") if n.strip()]
    params = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": 0}
    stage = f"prompt: q, params: {json.dumps(params)}"
    work = Path(tempfile.mkdtemp(prefix="synth-bench-real-"))
    print(f"real_model: {model.name}, prompts {counts}, max_tokens {args.max_tokens}, temperature "
          f"{args.temperature}, {args.rounds} rounds, torch threads {args.threads}, backends {backends}", flush=True)
    sections: list[Section] = []
    skipped: dict[str, str] = {}
    info: dict[str, float] = {}
    servers = []
    started = time.perf_counter()

    def interleave(own: list[Section]) -> None:
        for i in range(1, args.rounds + 1):
            for section in own:
                for side in (("raw", "synth") if i % 2 else ("synth", "raw")):
                    section.measure(side, i)

    def synth_side(rows: list[dict], teacher: dict) -> dict:
        return run_synth(workspace(work, rows, teacher, stage), len(rows))

    def skip(name: str, why: str) -> None:
        skipped[name] = why.splitlines()[0][:300]
        print(f"  {name}: skipped: {skipped[name]}", flush=True)

    try:
        if "hf" in backends:
            raw_hf(model, seed_rows(1), {**params, "max_tokens": 2}, 1)  # warm-up: imports, first read of the weights
            teacher = {"backend": "hf", "model": str(model), "batch_size": args.batch_size}
            own = [Section("hf", lambda rows=seed_rows(n): raw_hf(model, rows, params, args.batch_size),
                           lambda rows=seed_rows(n), t=teacher: synth_side(rows, t), prompts=n) for n in counts]
            interleave(own)
            sections += own
        if "vllm" in backends:
            try:
                import vllm  # noqa: F401
            except Exception as exc:  # ImportError, or a broken install
                skip("vllm", f"vllm is not importable: {type(exc).__name__}: {str(exc)[:200]}")
            else:
                os.environ.update(vllm_env(args.threads))
                own = {n: Section("vllm", prompts=n) for n in counts}
                teacher = {"backend": "vllm", "model": str(model), "max_model_len": args.max_model_len}
                base = {"model": str(model), "params": params, "threads": args.threads,
                        "max_model_len": args.max_model_len, "work": str(work)}
                for i in range(1, args.startup_rounds + 1):  # cold processes: start-up, at the first prompt count
                    rows = seed_rows(counts[0])
                    for side in (("raw", "synth") if i % 2 else ("synth", "raw")):
                        spec = {**base, "mode": "cold", "side": side, "rows": rows,
                                "pipeline": str(workspace(work, rows, teacher, stage))}
                        res = in_worker(spec, work)[0]
                        own[counts[0]].startup[side].append(res)
                        print(f"  cold {i}  vllm@{counts[0]} {side:5s} start-up {res['load_s']:6.2f} s · generating "
                              f"{res['gen_s']:5.2f} s · shutdown {res['close_s']:5.2f} s · whole "
                              f"{res['seconds']:6.2f} s",
                              flush=True)
                results = in_worker({**base, "mode": "warm", "rounds": args.rounds, "counts": counts}, work)
                for res in results:
                    if res["side"] == "startup":
                        info["vllm_warm_worker_startup_s"] = round(res["load_s"], 2)
                        info["vllm_warm_worker_close_s"] = round(res["close_s"], 2)
                    else:
                        res.pop("load_s", None), res.pop("close_s", None)  # the warm engine: ~0, not start-up
                        own[res["prompts"]].record(res["side"], res["round"], res)
                sections += own.values()
        if "serve" in backends:
            try:
                server, base_url, name = start_serve(model, work / "serve.log", args.threads)
            except RuntimeError as exc:
                skip("serve", str(exc))
            else:
                servers.append(server)
                c = args.concurrency
                teacher = {"backend": "openai", "model": name, "base_url": base_url, "max_concurrency": c}
                raw_serve(base_url, name, seed_rows(1), {**params, "max_tokens": 2}, 1)  # warm-up: its first request
                own = [Section("serve", lambda rows=seed_rows(n): raw_serve(base_url, name, rows, params, c),
                               lambda rows=seed_rows(n), t=teacher: synth_side(rows, t), prompts=n) for n in counts]
                interleave(own)
                sections += own
                stop_serve(servers.pop())
        if "vllm-server" in backends:
            try:
                server, base_url, name, up = start_vllm_server(model, work / "vllm-server.log", args.threads,
                                                               args.max_model_len)
            except RuntimeError as exc:
                skip("vllm-server", str(exc))
            else:
                servers.append(server)
                info["vllm_server_startup_s"] = round(up, 1)
                c = args.server_concurrency
                teacher = {"backend": "openai", "model": name, "base_url": base_url, "max_concurrency": c}
                for n in counts:  # every prompt once (1 token): the same prefix cache for every measurement
                    raw_serve(base_url, name, seed_rows(n), {**params, "max_tokens": 1}, c)
                own = [Section("vllm-server", lambda rows=seed_rows(n): raw_serve(base_url, name, rows, params, c),
                               lambda rows=seed_rows(n), t=teacher: synth_side(rows, t), prompts=n) for n in counts]
                interleave(own)
                sections += own
                stop_serve(servers.pop())
    finally:
        for server in servers:
            stop_serve(server)
        shutil.rmtree(work, ignore_errors=True)
    results = {}
    for section in sections:
        key = section.name if section.prompts == counts[0] else section.label
        s = results[key] = {"prompts": section.prompts, **section.summary()}
        line = (f"median  {section.label:16s} raw {s['baseline']:8.2f} tok/s · synth {s['value']:8.2f} tok/s · ratio "
                f"{s['ratio']:.3f} (rounds {s['round_ratios']}) · same texts {s['same_texts_rounds']} · synth "
                f"outside the teacher {s['synth_bookkeeping_s']} s of {s['synth_gen_s']} s (teacher alone: ratio "
                f"{s['teacher_ratio']})")
        if s.get("startup_raw_s") is not None and s.get("startup_synth_s") is not None:
            line += f" · start-up raw {s['startup_raw_s']} s, synth {s['startup_synth_s']} s"
        if "cold_ratio" in s:
            line += f" · cold (start-up + generating + shutdown) ratio {s['cold_ratio']:.3f}"
        print(line, flush=True)
    if info:
        print(f"info {json.dumps(info)}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    worst = min(results, key=lambda b: results[b]["ratio"]) if results else None
    head = results.get(worst, {})
    print(json.dumps({"bench": "real_model", "value": head.get("value"), "baseline": head.get("baseline"),
                      "unit": "tokens/s", "ratio": head.get("ratio"), "goal": GOAL, "backend": worst,
                      "model": model.name, "prompts": counts, "max_tokens": args.max_tokens,
                      "rounds": args.rounds, "threads": args.threads, **info,
                      "backends": {**results, **{b: {"skipped": why} for b, why in skipped.items()}}}))


if __name__ == "__main__":
    main()
