"""The export stage: a generate stage's rows as training data in TRL's formats.

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


def run_stage(pipeline, name: str, run_id: str) -> dict:
    from synth.pipeline import record_stage

    stage: ExportStage = pipeline.stage(name)
    out = pipeline.resolve(stage.path)
    with pipeline.store.read() as con:
        rows = con.execute(
            f"SELECT s.id, p.messages, s.text FROM {quote_ident(stage.input)} s "
            "JOIN synth.requests r ON r.id = s.id JOIN synth.prompts p ON p.id = r.prompt_id "
            "ORDER BY s.input_id, s.sample, s.id").fetchall()
    records = [{"id": rid, "messages": sft_messages(json.loads(msgs), text, system=stage.system,
                                                     few_shot=stage.few_shot)} for rid, msgs, text in rows]
    _write_atomic(out, records)
    with pipeline.store.write() as con:
        reader = "read_parquet" if out.suffix == ".parquet" else "read_json_auto"
        Store.replace_view(con, name, f"SELECT * FROM {reader}('{str(out).replace(chr(39), chr(39) * 2)}')")
        record_stage(con, pipeline, name, "done", len(records), run_id, path=str(out))
    return {"rows": len(records), "path": str(out)}


def _write_atomic(out: Path, records: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.suffix == ".parquet":
            import pyarrow.parquet as pq
            message = pa.struct([("role", pa.string()), ("content", pa.string())])
            table = pa.table({"id": [r["id"] for r in records], "messages": [r["messages"] for r in records]},
                             schema=pa.schema([("id", pa.string()), ("messages", pa.list_(message))]))
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in records:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
