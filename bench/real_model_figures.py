"""The figures of README's "Real models" section, measured on a real pretrained model
(SmolLM2-135M-Instruct, tests/pretrained.py), printed as a small table and one JSON line.

    .venv/bin/python bench/real_model_figures.py [--task1 OUT] [--max-tokens 96] [--threads 1] [--model DIR]

(i) Parse rate of an `hf` teacher on 12 arithmetic questions ("Q{i}: what is {i} + {i+1}?", as
    tests/conftest.py SEEDS), greedy, max_tokens 96:
    - without a schema: a template asking to end with \\boxed{ANSWER}, `parse: boxed`; the stage's own
      `parsed` {readable, answers} from synth.stages.detail (what synth prints as "parser boxed read N/M").
    - with a schema: a template asking for JSON, `parse: json`, and the stage key
      `schema: {type: object, properties: {answer: {type: integer}}, required: [answer]}` (enforced by
      xgrammar in the hf teacher): rows of the stage's view whose `answer` is not null, of the 12 asked,
      and synth.errors rows with cause schema_violation.
(ii) Sample diversity through `transformers serve` as it ships: 4 questions x `samples: 4` at temperature
    0.8 with synth's `openai` backend pointed at the server: the stage detail's `identical` {inputs, of}
    (inputs whose samples are all the same text); then again with a copy of the model dir whose
    generation_config.json sets `do_sample: true`, served the same way.
(iii) hf tokens/s through synth vs a plain model.generate loop (bench/real_model.py): read from that
    script's saved output (`--task1 FILE`, its last JSON line), else measured here (8 prompts,
    max_tokens 32, 2 rounds).

Every stage runs on a fresh store through `synth.run(path)` in process. ~3-4 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model as rm  # noqa: E402  (bench/real_model.py: workspaces, synth.run, transformers serve)

QUESTIONS = [{"id": f"q{i:02d}", "question": f"Q{i}: what is {i} + {i + 1}?", "answer_gold": str(2 * i + 1)}
             for i in range(12)]
BOXED = 'system: "Solve step by step and end with \\\\boxed{ANSWER}."\nuser: "{{ question }}"\nparse: boxed\n'
JSON_TEMPLATE = ('system: "Solve the problem. Reply with only a JSON object of the form {\\"answer\\": INTEGER}."\n'
                 'user: "{{ question }}"\nparse: json\n')
SCHEMA = "{type: object, properties: {answer: {type: integer}}, required: [answer]}"
# the fixes README's "When answers do not parse" names, each measured: two worked examples of the format
# (few-shot turns), and a schema with room to reason before the answer (bounded: a small model rambles
# inside an unbounded string until max_tokens, and the cut JSON is a schema_violation)
FEW_SHOT = BOXED.replace("parse: boxed\n", "") + (
    'examples:\n'
    '  - {user: "Q20: what is 20 + 21?", assistant: "20 + 21 = 41. \\\\boxed{41}"}\n'
    '  - {user: "Q30: what is 30 + 31?", assistant: "30 + 31 = 61. \\\\boxed{61}"}\n'
    'parse: boxed\n')
REASONING_TEMPLATE = ('system: "Solve the problem. Reply with only a JSON object of the form '
                      '{\\"reasoning\\": \\"ONE SHORT SENTENCE\\", \\"answer\\": INTEGER}."\n'
                      'user: "{{ question }}"\nparse: json\n')
REASONING_SCHEMA = ("{type: object, properties: {reasoning: {type: string, maxLength: 160}, answer: {type: integer}}, "
                    "required: [reasoning, answer]}")


def stage_lines(log: str) -> list[str]:
    """synth's end-of-stage lines about the answers (parse rate, identical samples, warnings)."""
    return [line.strip() for line in log.splitlines()
            if "parser " in line or "identical" in line or "warning" in line]


def query(pipeline: Path, sql: str) -> list[tuple]:
    import duckdb

    con = duckdb.connect(str(pipeline.parent / "out" / "run.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def parse_rates(model: Path, work: Path, max_tokens: int, batch_size: int) -> dict:
    teacher = {"backend": "hf", "model": str(model), "batch_size": batch_size}
    params = json.dumps({"temperature": 0.0, "max_tokens": max_tokens})
    out = {}

    for key, template, label in (("boxed", BOXED, "no schema"), ("few_shot", FEW_SHOT, "two few-shot turns")):
        t = time.perf_counter()
        p = rm.workspace(work, QUESTIONS, teacher, f"prompt: solve, params: {params}", {"solve": template})
        res = rm.run_synth(p, check=False)
        parsed = res["detail"]["parsed"]
        correct = query(p, f"SELECT count(*) FROM {rm.STAGE} s JOIN problems q ON s.input_id = q.id "
                           "WHERE trim(s.answer) = q.answer_gold")[0][0]
        out[key] = {**parsed, "rate": round(parsed["readable"] / max(parsed["answers"], 1), 3),
                    "correct": correct, "seconds": round(time.perf_counter() - t, 1), "lines": stage_lines(res["log"])}
        print(f"  (i) {label}, parse boxed: {parsed['readable']}/{parsed['answers']} readable, {correct} correct "
              f"({out[key]['seconds']} s)", flush=True)

    for key, template, schema in (("schema", JSON_TEMPLATE, SCHEMA),
                                  ("schema_reasoning", REASONING_TEMPLATE, REASONING_SCHEMA)):
        t = time.perf_counter()
        p = rm.workspace(work, QUESTIONS, teacher, f"prompt: solve, params: {params}, schema: {schema}",
                         {"solve": template})
        res = rm.run_synth(p, check=False)
        rows, answered = query(p, f"SELECT count(*), count(answer) FROM {rm.STAGE}")[0]
        violations = query(p, "SELECT count(*) FROM synth.errors WHERE cause = 'schema_violation'")[0][0]
        other = query(p, "SELECT count(*) FROM synth.errors WHERE cause <> 'schema_violation'")[0][0]
        correct = query(p, f"SELECT count(*) FROM {rm.STAGE} s JOIN problems q ON s.input_id = q.id "
                           "WHERE CAST(s.answer AS VARCHAR) = q.answer_gold")[0][0]
        out[key] = {"answered": answered, "asked": len(QUESTIONS), "rows": rows, "schema_violation": violations,
                    "other_errors": other, "rate": round(answered / len(QUESTIONS), 3), "correct": correct,
                    "parsed": res["detail"].get("parsed"), "seconds": round(time.perf_counter() - t, 1),
                    "lines": stage_lines(res["log"])}
        print(f"  (i) {key}, parse json: {answered}/{len(QUESTIONS)} with an answer, {violations} schema_violation, "
              f"{correct} correct ({out[key]['seconds']} s)", flush=True)
    return out


def diversity(model: Path, work: Path, threads: int, label: str) -> dict:
    t = time.perf_counter()
    proc, base_url, name = rm.start_serve(model, work / f"serve-{label}.log", threads)
    try:
        teacher = {"backend": "openai", "model": name, "base_url": base_url, "max_concurrency": 4}
        stage = "prompt: q, samples: 4, params: {temperature: 0.8, max_tokens: 32, seed: 0}"
        p = rm.workspace(work, QUESTIONS[:4], teacher, stage)
        res = rm.run_synth(p, 16)
    finally:
        rm.stop_serve(proc)
    identical = res["detail"]["identical"]
    out = {**identical, "seconds": round(time.perf_counter() - t, 1), "lines": stage_lines(res["log"])}
    print(f"  (ii) transformers serve, {label}: {identical['inputs']}/{identical['of']} inputs got 4 identical "
          f"samples ({out['seconds']} s)", flush=True)
    return out


def sampling_copy(model: Path, work: Path) -> Path:
    """A copy of the model dir whose generation_config.json sets do_sample: true (the other files are
    symlinks to the original's; generation_config.json is a new file, the original is left alone)."""
    copy = work / (model.name + "-do-sample")
    copy.mkdir()
    for f in model.iterdir():
        if f.name not in (".complete", "generation_config.json"):
            os.symlink(f, copy / f.name)
    source = model / "generation_config.json"
    config = json.loads(source.read_text()) if source.exists() else {}
    config["do_sample"] = True
    (copy / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


def hf_speed(args, model: Path, work: Path) -> dict:
    if args.task1:
        lines = [line for line in Path(args.task1).read_text().splitlines() if line.startswith("{")]
        hf = json.loads(lines[-1])["backends"]["hf"]
        return {"synth": hf["value"], "raw": hf["baseline"], "ratio": hf["ratio"], "from": args.task1}
    rows = rm.seed_rows(8)
    params = {"temperature": 0.8, "max_tokens": 32, "seed": 0}
    teacher = {"backend": "hf", "model": str(model), "batch_size": 4}
    stage = f"prompt: q, params: {json.dumps(params)}"
    section = rm.Section("hf", lambda: rm.raw_hf(model, rows, params, 4),
                         lambda: rm.run_synth(rm.workspace(work, rows, teacher, stage), len(rows)))
    for i in (1, 2):
        for side in (("raw", "synth") if i % 2 else ("synth", "raw")):
            section.measure(side, i)
    s = section.summary()
    return {"synth": s["value"], "raw": s["baseline"], "ratio": s["ratio"], "from": "measured (8 prompts, 2 rounds)"}


def main() -> None:
    ap = argparse.ArgumentParser(description="README 'Real models' figures on SmolLM2-135M-Instruct")
    ap.add_argument("--task1", help="saved output of bench/real_model.py: take the hf tokens/s from its JSON line")
    ap.add_argument("--max-tokens", type=int, default=96, help="(i): max_tokens of the hf teacher")
    ap.add_argument("--batch-size", type=int, default=12, help="(i): the hf teacher's batch_size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the server")
    ap.add_argument("--model", help="model directory (default: tests/pretrained.py's SmolLM2-135M-Instruct)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model = rm.model_dir(args.model)
    work = Path(tempfile.mkdtemp(prefix="synth-bench-figures-"))
    started = time.perf_counter()
    print(f"real_model_figures: {model.name}, torch threads {args.threads}", flush=True)
    try:
        parse = parse_rates(model, work, args.max_tokens, args.batch_size)
        shipped = diversity(model, work, args.threads, "as shipped")
        sampled = diversity(sampling_copy(model, work), work, args.threads, "do_sample: true")
        speed = hf_speed(args, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, s, f, r = parse["boxed"], parse["schema"], parse["few_shot"], parse["schema_reasoning"]
    table = [
        ("figure", "measured"),
        (f"parse rate, no schema (\\boxed{{}}, parse: boxed, {args.max_tokens} tokens, greedy)",
         f"{b['readable']}/{b['answers']} ({b['rate']:.0%}); correct {b['correct']}/{b['answers']}"),
        ("parse rate, stage schema {answer: integer} (parse: json)",
         f"{s['answered']}/{s['asked']} ({s['rate']:.0%}); schema_violation {s['schema_violation']}; "
         f"correct {s['correct']}/{s['asked']}"),
        ("parse rate, two few-shot turns ending in \\boxed{} (parse: boxed)",
         f"{f['readable']}/{f['answers']} ({f['rate']:.0%}); correct {f['correct']}/{f['answers']}"),
        ("parse rate, stage schema {reasoning: string ≤ 160, answer: integer} (parse: json)",
         f"{r['answered']}/{r['asked']} ({r['rate']:.0%}); schema_violation {r['schema_violation']}; "
         f"correct {r['correct']}/{r['asked']}"),
        ("transformers serve as shipped: inputs with 4 identical samples (t=0.8)",
         f"{shipped['inputs']}/{shipped['of']}"),
        ("transformers serve, generation_config do_sample: true", f"{sampled['inputs']}/{sampled['of']}"),
        ("hf teacher tokens/s (8 prompts x 32 tokens, batch 4, 1 thread): synth / raw loop",
         f"{speed['synth']:.1f} / {speed['raw']:.1f} (ratio {speed['ratio']:.2f})"),
    ]
    width = max(len(r[0]) for r in table)
    print()
    for i, (k, v) in enumerate(table):
        print(f"| {k.ljust(width)} | {v} |")
        if i == 0:
            print(f"|{'-' * (width + 2)}|{'-' * (max(len(r[1]) for r in table) + 2)}|")
    print(f"\nsynth's lines: {b['lines'] + f['lines'] + s['lines'] + r['lines'] + shipped['lines'] + sampled['lines']}")
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    for d in (b, f, s, r, shipped, sampled):
        d.pop("lines")
    print(json.dumps({"bench": "real_model_figures", "model": model.name,
                      "parse_no_schema": b, "parse_few_shot": f, "parse_schema": s, "parse_schema_reasoning": r,
                      "identical_serve_as_shipped": shipped, "identical_serve_do_sample": sampled,
                      "hf_tokens_per_s": speed}))


if __name__ == "__main__":
    main()
