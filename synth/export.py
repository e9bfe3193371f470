"""The export stage: training data in TRL's conversational formats.

`format: dpo` writes one row per preference pair of a pairs stage:
    {"id": <chosen id>:<rejected id>, "prompt": [turns], "chosen": [assistant turn], "rejected": [...]}
with the chosen sample's prompt turns (trimmed like sft's).

`format: sft` writes TRL's conversational format, one row per completion:
    {"id": <request id>, "messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
The prompt turns are the rendered messages that were sent (system kept unless `system: false`,
few-shot turns dropped unless `few_shot: true`), and the assistant turn is the teacher's text.
The file (.parquet or .jsonl) is written to a temporary name and renamed, so it is never half
written; a view named after the stage reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

from synth.config import ExportStage
from synth.store import Store, quote_ident


def sft_messages(prompt: list[dict], text: str, *, system: bool, few_shot: bool) -> list[dict]:
    head = [m for m in prompt[:1] if m["role"] == "system" and system]
    body = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    turns = body if few_shot else body[-1:]
    return head + [{"role": m["role"], "content": m["content"]} for m in turns] + \
        [{"role": "assistant", "content": text}]


def dpo_record(pair_id: str, prompt: list[dict], chosen: str, rejected: str, *, system: bool,
               few_shot: bool) -> dict:
    """TRL's conversational preference format: prompt turns, then one assistant turn each."""
    turns = sft_messages(prompt, "", system=system, few_shot=few_shot)[:-1]
    return {"id": pair_id, "prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def run_stage(pipeline, name: str, run_id: str) -> dict:
    from synth.pipeline import record_stage

    stage: ExportStage = pipeline.stage(name)
    out = pipeline.resolve(stage.path)
    if stage.format == "dpo":
        with pipeline.store.read() as con:
            rows = con.execute(
                f"SELECT s.id, p.messages, s.chosen_text, s.rejected_text FROM {quote_ident(stage.input)} s "
                "JOIN synth.requests r ON r.id = s.chosen_id JOIN synth.prompts p ON p.id = r.prompt_id "
                "WHERE s.chosen_text IS NOT NULL AND s.rejected_text IS NOT NULL ORDER BY s.input_id, s.id").fetchall()
        records = [dpo_record(rid, json.loads(msgs), chosen, rejected, system=stage.system, few_shot=stage.few_shot)
                   for rid, msgs, chosen, rejected in rows]
    else:
        with pipeline.store.read() as con:
            rows = con.execute(
                f"SELECT s.id, p.messages, s.text FROM {quote_ident(stage.input)} s "
                "JOIN synth.requests r ON r.id = s.id JOIN synth.prompts p ON p.id = r.prompt_id "
                "ORDER BY s.input_id, s.sample, s.id").fetchall()
        records = [{"id": rid, "messages": sft_messages(json.loads(msgs), text, system=stage.system,
                                                         few_shot=stage.few_shot)} for rid, msgs, text in rows]
    _write_atomic(out, records, stage.format)
    with pipeline.store.write() as con:
        reader = "read_parquet" if out.suffix == ".parquet" else "read_json_auto"
        Store.replace_view(con, name, f"SELECT * FROM {reader}('{str(out).replace(chr(39), chr(39) * 2)}')")
        record_stage(con, pipeline, name, "done", len(records), run_id, path=str(out))
    return {"rows": len(records), "path": str(out)}


def _write_atomic(out: Path, records: list[dict], fmt: str = "sft") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.suffix == ".parquet":
            import pyarrow.parquet as pq
            turns = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
            columns = ["messages"] if fmt == "sft" else ["prompt", "chosen", "rejected"]
            table = pa.table({"id": [r["id"] for r in records], **{c: [r[c] for r in records] for c in columns}},
                             schema=pa.schema([("id", pa.string())] + [(c, turns) for c in columns]))
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in records:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
