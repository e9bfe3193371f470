"""The export stage: training data in TRL's conversational formats, and token-level targets for KD.

`format: kd` writes one row per sequence with teacher log-probs (kd_records): prompt turns, the completion's
token ids as generated, and the teacher's top-k ids and log-probs per position (.parquet or a directory).
It also says how much those distributions hold beyond the sampled tokens (soft_target_summary): on
templated text a teacher can be near one-hot almost everywhere, and then KD trains much like SFT.

`format: dpo` writes one row per preference pair of a pairs stage:
    {"id": <chosen id>:<rejected id>, "prompt": [turns], "chosen": [assistant turn], "rejected": [...]}
with the chosen sample's prompt turns (trimmed like sft's). With `rejected: first_difference` the
rejected answer is cut after its first line that differs from the chosen one (see first_difference).

`format: sft` writes TRL's conversational format, one row per completion (or, from a load stage
with `prompt` and `response`, one per dataset row: the template renders the prompt turns and the
response column is the assistant turn — supervised data that no teacher wrote):
    {"id": <request id>, "messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
The prompt turns are the rendered messages that were sent (system kept unless `system: false`,
few-shot turns dropped unless `few_shot: true`), and the assistant turn is the teacher's text
(`target: text`), only its answer (`target: answer`), or both as two tasks (`target: both`).

`path` is a .parquet or .jsonl file, or a directory: a saved Hugging Face dataset (load_from_disk)
with a dataset card (README.md). Beside it, a sidecar (<file>.synth.json, or synth.json in the
directory) records the pipeline, teachers, templates, filters and the run that last wrote each
upstream stage. Everything is written to a temporary name and renamed, so it is never half written;
a view named after the stage reads the export back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synth.config import ExportStage
from synth.context import RunContext
from synth.errors import SynthError, one_line
from synth.graph import Graph, Kind, Ref
from synth.paths import export_sidecar
from synth.prompts import load_template
from synth.store import Store, quote_ident, sql_str
from synth.verdict_store import top_rejections
from synth.vocab import ids_of_strings


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


# rejected: first_difference warns when it cut fewer than this share of the rejected answers: the rest
# differ from their chosen answer on the first line, where a cut changes nothing (one-line answers)
CUT_WARNING_SHARE = 0.5


def first_difference(chosen: str, rejected: str) -> str:
    """The rejected answer up to and including its first line that differs from the chosen answer.

    For answers written a step per line (chain of thought), a failed answer is right up to one step and
    then goes on from a wrong value. Whole, DPO lowers every token after the shared prefix, the sound
    steps after the mistake too (copying the next number from the question, say), and a small model
    unlearns them. Cut, the pair says only "this step, not that one" (the idea of Step-DPO; here the
    chosen answer stays whole, so its later steps are still pushed up and it still ends as it should)."""
    chosen_lines, rejected_lines = chosen.splitlines(keepends=True), rejected.splitlines(keepends=True)
    for i, line in enumerate(rejected_lines):
        if i >= len(chosen_lines) or line.rstrip() != chosen_lines[i].rstrip():
            return "".join(rejected_lines[:i + 1]).rstrip()
    return rejected


def run(ctx: RunContext, name: str) -> dict:
    graph = ctx.graph
    stage: ExportStage = graph.stage(name)
    out = graph.resolve(stage.path)
    detail: dict = {}  # recorded with the stage (dpo with first_difference: how many rejected answers were cut)
    if stage.format == "dpo":
        with ctx.store.read() as con:
            rows = con.execute(
                f"SELECT s.id, p.messages, s.chosen_text, s.rejected_text FROM {quote_ident(stage.input)} s "
                "JOIN synth.requests r ON r.id = s.chosen_id JOIN synth.prompts p ON p.id = r.prompt_id "
                "WHERE s.chosen_text IS NOT NULL AND s.rejected_text IS NOT NULL "
                # by content, not by pair id: ids name the requests, whose model is a run-named directory when
                # a trained student wrote the samples, and TRL's seeded shuffle starts from this order
                "ORDER BY s.input_id, s.chosen_text, s.rejected_text, s.id").fetchall()
        cut = first_difference if stage.rejected == "first_difference" else (lambda _, rejected: rejected)
        records = [dpo_record(rid, json.loads(msgs), chosen, cut(chosen, rejected), system=stage.system,
                              few_shot=stage.few_shot) for rid, msgs, chosen, rejected in rows]
        if stage.rejected == "first_difference":
            detail["cut"] = sum(1 for (*_, rejected), rec in zip(rows, records)
                                if rec["rejected"][0]["content"] != rejected)
            if records and detail["cut"] < CUT_WARNING_SHARE * len(records):
                ctx.console.print(
                    f"  [bold yellow]{name}: warning: rejected: first_difference cut only {detail['cut']} of "
                    f"{len(records)} rejected answers: the others differ from their chosen answer on their first "
                    "line (one-line answers, say), so DPO sees them whole. Have the template ask for a step per "
                    "line, or set rejected: whole to say so[/bold yellow]", highlight=False)
    elif stage.format == "kd":
        records = kd_records(ctx, name)
        if summary := soft_target_summary(records):
            detail.update(summary)
            off_policy = not scored_input(graph, stage)  # the teacher's own samples, not another model's
            ctx.console.print(
                f"  {name}: the teacher's top-1 token holds ≥ {CONFIDENT:.0%} of its probability at "
                f"{summary['teacher_confident_share']:.1%} of {summary['teacher_positions']:,} completion positions "
                f"and differs from the token taken at {summary['teacher_differs_share']:.1%} (mean entropy "
                f"{summary['teacher_entropy_nats']:.3f} nats over its top-{summary['teacher_k']} and the tail)"
                + (": its distributions add little to the sampled tokens, so KD will train much like SFT on this "
                   "data" if off_policy and summary["teacher_confident_share"] >= CONFIDENT else ""),
                highlight=False)
    elif stage.prompt:  # a dataset's own rows: the template renders the prompt, a column is the response
        template = graph.templates[name]
        with ctx.store.read() as con:
            cur = con.execute(f"SELECT * FROM {quote_ident(stage.input)} ORDER BY id")
            columns = [d[0] for d in cur.description]
            rows = [dict(zip(columns, r)) for r in cur.fetchall()]
        records = [rec for row in rows for rec in sft_records(
            str(row["id"]), template.render(row, graph.where(name)), str(row[stage.response]),
            None if row.get(stage.answer) is None else str(row[stage.answer]), stage)]
    else:
        answer = quote_ident(stage.answer) if stage.target != "text" else "NULL"
        with ctx.store.read() as con:
            rows = con.execute(
                f"SELECT s.id, p.messages, s.text, CAST({answer} AS VARCHAR), s.reasoning "
                f"FROM {quote_ident(stage.input)} s "
                "JOIN synth.requests r ON r.id = s.id JOIN synth.prompts p ON p.id = r.prompt_id "
                "ORDER BY s.input_id, s.sample, s.id").fetchall()
        records = [rec for rid, msgs, text, ans, trace in rows for suffix, target in with_reasoning(text, trace, stage)
                   for rec in sft_records(rid + suffix, json.loads(msgs), target, ans, stage)]
        # samples with a trace and no answer after it (cut at max_tokens inside the trace): left out by
        # with_reasoning; counted so the export's row count is explained
        if unanswered := sum(1 for _, _, text, _, trace in rows if trace and not (text or "").strip()):
            detail["unanswered"] = unanswered
    vocabulary = records[0]["tokenizer"] if stage.format == "kd" and records else None
    try:
        if out.suffix == "":
            _write_dataset_dir(out, records, stage.format, dataset_card(ctx, name, len(records)))
        else:
            _write_atomic(out, records, stage.format)
        _write_atomic_text(export_sidecar(out), json.dumps(provenance(ctx, name, len(records), vocabulary), indent=2,
                                                         default=str))
    except OSError as exc:  # a folder that is a file, no permission, a full disk: the user's to fix
        raise SynthError(f"{graph.where(name, 'path')}: cannot write {out}: {one_line(exc)}; point `path` at a "
                         "writable place") from None
    with ctx.store.write() as con:
        if out.suffix == "":
            source = f"read_parquet({sql_str(str(out / 'data.parquet'))})"
        else:
            reader = "read_parquet" if out.suffix == ".parquet" else "read_json_auto"
            source = f"{reader}({sql_str(str(out))})"
        Store.replace_view(con, name, f"SELECT * FROM {source}")
        ctx.record(con, name, "done", len(records), path=str(out), **detail)
        filters = [n for n in graph.upstream([name]) if graph.kind(n).verdicts]
        reasons = top_rejections(con, filters) if not records else ""
    if not records:
        ctx.console.print(f"  [bold yellow]{name}: warning: wrote an empty {stage.format} file ({out}): "
                          + (f"the filters rejected every row (most often: {reasons}); " if reasons else
                             f"every sample's trace was cut at max_tokens before an answer ({detail['unanswered']} "
                             "unanswered: raise the generate stage's max_tokens); " if detail.get("unanswered") else
                             f"its input '{stage.input}' has no rows; ")
                          + "a train stage on it would fail. `synth stats` shows the funnel[/bold yellow]",
                          highlight=False)
    return {"rows": len(records), "path": str(out), **detail}


def scored_input(graph: Graph, stage: ExportStage) -> bool:
    """Whether the export reads a score stage: a teacher's scores of sequences another model wrote."""
    return graph.stage(stage.input).kind == "score"


def kd_records(ctx: RunContext, name: str) -> list[dict]:
    """format kd: one row per sequence with teacher log-probs: the prompt turns (trimmed as sft's), the
    completion's token ids exactly as the teacher wrote or scored them (never re-tokenised: the positions
    would drift), and at each position the teacher's k best ids and log-probs (padding: id -1, log-prob -inf)
    and the log-prob of the token taken. From a generate/keep stage: the log-probs captured when the teacher
    generated (params.logprobs); from a score stage: the teacher's scores of another model's sequences.
    Token strings (an OpenAI-compatible teacher) are mapped to ids with its declared tokenizer; without one
    the export refuses. Rows without log-probs (captured without them, or not scored yet) are left out and
    counted in a warning."""
    graph, stage = ctx.graph, ctx.graph.stage(name)
    scored = scored_input(graph, stage)
    join = (f"JOIN synth.scores m ON m.id = s.id AND m.stage = {sql_str(stage.input)} "
            "JOIN synth.token_logprobs t ON t.id = m.score_id") if scored else "JOIN synth.token_logprobs t ON t.id = s.id"
    with ctx.store.read() as con:
        total = con.execute(f"SELECT count(*) FROM {quote_ident(stage.input)}").fetchall()[0][0]
        rows = con.execute(
            f"SELECT s.id, p.messages, c.text, t.tokenizer, t.k, t.token_ids, t.tokens, t.logprobs, t.top_ids, "
            f"t.top_tokens, t.top_logprobs FROM {quote_ident(stage.input)} s "
            "JOIN synth.requests r ON r.id = s.id JOIN synth.prompts p ON p.id = r.prompt_id "
            f"JOIN synth.completions c ON c.id = s.id {join} ORDER BY s.input_id, s.sample, s.id").fetchall()
    vocabularies = {r[3] for r in rows}
    if len(vocabularies) > 1:
        raise SynthError(f"{graph.where(name, 'input')}: key 'input': the rows of {stage.input!r} carry log-probs in "
                         f"{len(vocabularies)} vocabularies ({', '.join(sorted(map(str, vocabularies)))}); a kd export "
                         "needs one: export each teacher's rows apart")
    records = []
    for rid, msgs, text, vocabulary, k, ids, tokens, lps, top_ids, top_tokens, top_lps in rows:
        if ids is None or top_ids is None:
            if vocabulary is None:
                raise SynthError(f"{graph.where(name, 'input')}: row {rid!r}: the teacher returned token strings, not "
                                 "ids, and declares no tokenizer to map them with; set `tokenizer:` on the teacher (it "
                                 "must be the student's), or use a teacher that returns ids (hf, vllm, vllm_server)")
            try:
                ids = ids if ids is not None else ids_of_strings(vocabulary, tokens)
                top_ids = top_ids if top_ids is not None else ids_of_strings(vocabulary, top_tokens)
            except SynthError as exc:
                raise SynthError(f"{graph.where(name)}: row {rid!r}: {exc}") from None
        n = len(ids)
        records.append({
            "id": rid, "prompt": sft_messages(json.loads(msgs), "", system=stage.system, few_shot=stage.few_shot)[:-1],
            "completion": text or "", "completion_ids": np.asarray(ids, dtype=np.int64),
            "logprobs": np.asarray(lps, dtype=np.float64),
            # (n, k) arrays, not n Python lists: ~236,000 positions x 8 in the demo's export
            "teacher_ids": np.asarray(top_ids, dtype=np.int64).reshape(n, k),
            "teacher_logprobs": np.asarray(top_lps, dtype=np.float64).reshape(n, k), "tokenizer": vocabulary})
    if len(records) < total:
        ctx.console.print(f"  [yellow]{name}: {total - len(records)} of the {total} rows of '{stage.input}' have no "
                          "teacher log-probs " + ("(not scored: see `synth status`)" if scored else
                                                  "(generated without params.logprobs)") + "; left out[/yellow]",
                          highlight=False)
    return records


CONFIDENT = 0.9  # a position whose top-1 token holds this share of the probability teaches KD little more than it


def soft_target_summary(records: list[dict]) -> dict:
    """How much a kd export's teacher distributions say beyond the tokens taken, over every completion
    position: the share whose top-1 token holds >= CONFIDENT of the probability; the share where the
    teacher's top-1 is not the token taken (on-policy data: where the teacher would correct the student);
    and the mean entropy (nats) of the top-k plus the tail bucket (1 - the top-k's sum, one outcome: the
    KD loss's view, synth/kd_loss.py). Padding entries (id -1, log-prob -inf) hold nothing; rows captured
    with different k (a cache from an earlier run) are padded to the largest. {} when there are no
    positions."""
    from scipy.special import entr  # -x log x, 0 at 0

    lps = [_positions(r["teacher_logprobs"], -np.inf, np.float64) for r in records]
    k = max((a.shape[1] for a in lps if a.size), default=0)
    if not k:
        return {}
    p = np.exp(np.concatenate([_widened(a, k, -np.inf) for a in lps]))
    ids = np.concatenate([_widened(_positions(r["teacher_ids"], -1, np.int64), k, -1) for r in records])
    taken = np.concatenate([np.asarray(r["completion_ids"], dtype=np.int64).reshape(-1) for r in records])
    top1 = ids[np.arange(len(ids)), p.argmax(axis=1)]
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    entropy = entr(p).sum(axis=1) + entr(tail)
    return {"teacher_positions": len(p), "teacher_k": int(k),
            "teacher_confident_share": round(float((p.max(axis=1) >= CONFIDENT).mean()), 4),
            "teacher_differs_share": round(float((top1 != taken).mean()), 4),
            "teacher_entropy_nats": round(float(entropy.mean()), 4)}


def _positions(cells, fill, dtype) -> np.ndarray:
    """One row's teacher arrays as (positions, k): an (n, k) array as it is, nested lists padded to their
    longest with `fill` (a hand-written row may vary k between positions)."""
    if isinstance(cells, np.ndarray) and cells.ndim == 2:
        return cells.astype(dtype, copy=False)
    k = max(map(len, cells), default=0)
    return np.asarray([list(pos) + [fill] * (k - len(pos)) for pos in cells], dtype=dtype).reshape(len(cells), k)


def _widened(a: np.ndarray, k: int, fill) -> np.ndarray:
    return a if a.shape[1] == k else np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=fill)


def _list_column(cells: list, kind: pa.ListType) -> pa.Array:
    """A list or list-of-lists column (`kind`) from per-row numpy arrays ((n,) or (n, k)), built from their
    concatenated values and offsets; rows of Python lists go through pa.array."""
    depth = 2 if pa.types.is_list(kind.value_type) else 1
    value_type = kind.value_type.value_type if depth == 2 else kind.value_type
    if not cells or not all(isinstance(c, np.ndarray) and c.ndim == depth for c in cells):
        return pa.array([c.tolist() if isinstance(c, np.ndarray) else c for c in cells], type=kind)
    values = pa.array(np.concatenate([c.reshape(-1) for c in cells]).astype(value_type.to_pandas_dtype()))
    rows = np.asarray([len(c) for c in cells], dtype=np.int64)
    if depth == 2:
        widths = np.repeat([c.shape[1] for c in cells], rows)
        values = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)), values)


def _plain(value):
    """json.dumps' fallback and the dataset directory's: numpy arrays and numbers as Python lists and numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


KD_SCHEMA_FIELDS = [("completion", "string"), ("completion_ids", "ids"), ("logprobs", "floats"),
                    ("teacher_ids", "ids2"), ("teacher_logprobs", "floats2"), ("tokenizer", "string")]


def with_reasoning(text: str, trace: str | None, stage: ExportStage) -> list[tuple[str, str]]:
    """(id suffix, assistant text) per example of one sample: its answer text (reasoning: drop, or no
    trace), the trace in the student's think tags before it (think), or both as two examples. A sample
    whose trace has no answer after it (the trace was cut at max_tokens: split_reasoning leaves the text
    empty) gives none: `think` would close a tag the teacher never closed and train an empty answer, `drop`
    an empty answer."""
    if trace and not (text or "").strip():
        return []
    if stage.reasoning == "drop" or not trace:
        return [("", text)]
    start, end = stage.think_tags
    thought = f"{start}\n{trace}\n{end}\n\n{text}"
    return [("", thought)] if stage.reasoning == "think" else [(":think", thought), (":answer", text)]


def sft_records(rid: str, prompt: list[dict], text: str, answer: str | None, stage: ExportStage) -> list[dict]:
    """target text: the teacher's whole text; answer: only its answer (rows without one are left out);
    both: two tasks per sample, as in "Distilling Step-by-Step": the user turn prefixed "[answer]" with
    the answer as target, and prefixed "[rationale]" with the whole text as target."""
    def record(suffix: str, prefix: str, target: str) -> dict:
        turns = sft_messages(prompt, target, system=stage.system, few_shot=stage.few_shot)
        if prefix:
            turns[-2] = {**turns[-2], "content": f"{prefix} {turns[-2]['content']}"}
        return {"id": rid + suffix, "messages": turns}

    if stage.target == "text":
        return [record("", "", text)]
    if answer is None or not answer.strip():
        return []
    if stage.target == "answer":
        return [record("", "", answer)]
    return [record(":answer", "[answer]", answer), record(":rationale", "[rationale]", text)]


def provenance(ctx: RunContext, name: str, rows: int, vocabulary: str | None = None) -> dict:
    """What the export was made from: the pipeline, its teachers, templates and filters, the run that
    last wrote each upstream stage, and the row counts (kd: the tokenizer its ids are in). Written beside
    the export (the sidecar)."""
    graph = ctx.graph
    upstream = graph.upstream([name])
    with ctx.store.read() as con:
        states = {n: {"run_id": r, "rows": c, "kind": k} for n, r, c, k in con.execute(
            "SELECT name, run_id, rows, kind FROM synth.stages").fetchall() if n in upstream}
    stages = {n: graph.stage(n) for n in upstream}
    return {
        "pipeline": str(graph.path), "store": str(ctx.store.path), "stage": name, "rows": rows,
        "format": graph.stage(name).format,
        **({"tokenizer": vocabulary} if graph.stage(name).format == "kd" else {}),
        # the tags its traces are in: the train stage's readiness checks them against the student's template
        **({"reasoning": graph.stage(name).reasoning, "think_tags": list(graph.stage(name).think_tags)}
           if getattr(graph.stage(name), "reasoning", "drop") != "drop" else {}),
        "teachers": {t: ctx.teacher_config(t).model for t in sorted({getattr(s, "teacher", None)
                                                                            for s in stages.values()} - {None})},
        "templates": sorted({s.prompt for s in stages.values() if getattr(s, "prompt", None)}),
        "filters": [n for n in stages if graph.kind(n).same_rows],  # the filters and keeps it read through
        "stages": states,
    }


def dataset_card(ctx: RunContext, name: str, rows: int) -> str:
    p = provenance(ctx, name, rows)
    lines = [f"# {name}", "", f"Exported by synth from `{p['pipeline']}` ({p['format']} format, {rows} rows).", "",
             "## Teachers", *[f"- {t}: `{m}`" for t, m in p["teachers"].items()], "",
             "## Templates", *[f"- {t}" for t in p["templates"]], "",
             "## Filters and stages (rows, last run)",
             *[f"- {n} ({s['kind']}): {s['rows']} rows, run {s['run_id']}" for n, s in p["stages"].items()], ""]
    return "\n".join(lines)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_dataset_dir(out: Path, records: list[dict], fmt: str, card: str) -> None:
    """A saved Hugging Face dataset (datasets.load_from_disk works on it), plus data.parquet for the
    stage's view and README.md as its dataset card; built in a temporary directory, then renamed."""
    from datasets import Dataset  # the train extra; checked when the pipeline is loaded

    if out.exists() and not ((out / "synth.json").exists() or (out / "dataset_info.json").exists()):
        raise SynthError(f"{out}: exists and is not a dataset synth exported; an export replaces its "
                         "directory, so point `path` at a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rows = [{k: _plain(v) if isinstance(v, (np.ndarray, np.generic)) else v for k, v in r.items()}
                for r in records] if fmt == "kd" else records  # kd's arrays: the lists datasets typed before
        Dataset.from_list(rows).save_to_disk(str(tmp))
        _write_atomic(tmp / "data.parquet", records, fmt)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic(out: Path, records: list[dict], fmt: str = "sft") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.suffix == ".parquet":
            turns = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
            columns = {"sft": ["messages"], "dpo": ["prompt", "chosen", "rejected"], "kd": ["prompt"]}[fmt]
            types = {"string": pa.string(), "ids": pa.list_(pa.int32()), "floats": pa.list_(pa.float32()),
                     "ids2": pa.list_(pa.list_(pa.int32())), "floats2": pa.list_(pa.list_(pa.float32()))}
            extra = [(c, types[t]) for c, t in KD_SCHEMA_FIELDS] if fmt == "kd" else []
            table = pa.table({"id": [r["id"] for r in records], **{c: [r[c] for r in records] for c in columns},
                              **{c: _list_column([r[c] for r in records], kind) if pa.types.is_list(kind)
                                 else [r[c] for r in records] for c, kind in extra}},
                             schema=pa.schema([("id", pa.string())] + [(c, turns) for c in columns] + extra))
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in records:
                    fh.write(json.dumps(r, ensure_ascii=False, default=_plain) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---- load time ------------------------------------------------------------------------------------------

def references(stage: ExportStage, stages) -> list[Ref]:
    sources = ("pairs",) if stage.format == "dpo" else ("generate", "keep", "score") if stage.format == "kd" else \
        ("generate", "keep", "load") if stage.prompt else ("generate", "keep", "mix")
    return [Ref("input", (stage.input,), sources, hint=f" for format {stage.format}")]


def check(graph: Graph, name: str) -> None:
    """Its source fits its format (sft: generated rows, or a load stage's rows with prompt + response;
    dpo: pairs), its path is a .parquet/.jsonl file or a dataset directory (not one holding the store or
    the pipeline), and a target answer/both names an input column."""
    stage: ExportStage = graph.stage(name)
    if stage.reasoning != "drop" and (stage.format == "dpo" or graph.stage(graph.root(stage.input)).kind != "generate"):
        raise SynthError(f"{graph.where(name, 'reasoning')}: key 'reasoning' exports a reasoning teacher's traces; "
                         "it needs format: sft of generated rows")
    if stage.format == "kd":
        if stage.prompt or stage.response or stage.target != "text" or stage.reasoning != "drop":
            key = "prompt" if stage.prompt else "response" if stage.response else \
                "target" if stage.target != "text" else "reasoning"
            raise SynthError(f"{graph.where(name, key)}: key {key!r}: a kd export carries the tokens the teacher "
                             "wrote or scored, as they are; it takes no prompt/response/target/reasoning")
        if graph.resolve(stage.path).suffix == ".jsonl":
            raise SynthError(f"{graph.where(name, 'path')}: key 'path': a kd export is arrays of token ids and "
                             "log-probs: write .parquet (or a dataset directory), not .jsonl")
    if stage.format != "dpo" and stage.rejected != "whole":
        raise SynthError(f"{graph.where(name, 'rejected')}: key 'rejected' cuts the rejected answers of DPO pairs; "
                         f"it needs format: dpo (this export is format: {stage.format})")
    _check_source(graph, name)
    out = graph.resolve(stage.path)
    if out.suffix == "":
        if importlib.util.find_spec("datasets") is None:
            raise SynthError(f"{graph.where(name, 'path')}: key 'path': a directory export is a Hugging Face dataset "
                             "and needs `datasets`: pip install 'synth-distill[train]'")
        store = graph.store.path.resolve()
        if out.resolve() in (store, *store.parents) or out.resolve() in graph.path.parents:
            raise SynthError(f"{graph.where(name, 'path')}: key 'path': {out} holds the store or the pipeline; "
                             "an export replaces its directory, so point it at a new one")
    if out.suffix not in (".parquet", ".jsonl", ""):
        raise SynthError(f"{graph.where(name, 'path')}: key 'path': write .parquet, .jsonl or a directory (a "
                         f"saved Hugging Face dataset), not {out.name!r}")
    if stage.target != "text" and stage.answer not in graph.columns[stage.input]:
        raise SynthError(f"{graph.where(name, 'answer')}: key 'answer': target {stage.target} needs the answer "
                         f"column; the input has no column {stage.answer!r}")
    return None


def _check_source(graph: Graph, name: str) -> None:
    """sft exports generated rows, or a load stage's own rows rendered with `prompt` (+ `response`)."""
    stage: ExportStage = graph.stage(name)
    where = graph.where
    root_kind = graph.stage(graph.root(stage.input)).kind
    if stage.format == "kd":
        rows_of = graph.stage(stage.input).input if scored_input(graph, stage) else stage.input
        if graph.stage(graph.root(rows_of)).kind != "generate":
            raise SynthError(f"{where(name, 'input')}: key 'input': format 'kd' exports generated rows with the "
                             f"teacher's log-probs; {stage.input!r} carries {graph.root(stage.input)!r}'s rows")
        return
    if stage.format == "dpo":
        if stage.prompt or stage.response:
            raise SynthError(f"{where(name, 'prompt')}: keys 'prompt'/'response' export a dataset's own rows "
                             "(format sft); a dpo export takes its prompts from the pairs")
        return
    if root_kind == "load":
        if not stage.prompt or not stage.response:
            raise SynthError(f"{where(name, 'input')}: key 'input': {stage.input!r} is a dataset, not generated "
                             "rows; give `prompt:` (a template for the prompt turns) and `response:` (the column "
                             "that is the assistant turn) to export its own rows")
        template = load_template(stage.prompt, graph.base_dir, f"{where(name, 'prompt')}: key 'prompt'")
        template.check_columns(graph.columns[stage.input], where(name, 'prompt'))
        if stage.response not in graph.columns[stage.input]:
            raise SynthError(f"{where(name, 'response')}: key 'response': the input has no column "
                             f"{stage.response!r} (its columns: {', '.join(graph.columns[stage.input])})")
        graph.add_template(name, template)
    elif root_kind not in ("generate", "mix"):  # a mix's rows are generated rows of several teachers
        raise SynthError(f"{where(name, 'input')}: key 'input': format 'sft' exports generated rows; "
                         f"{stage.input!r} carries {graph.root(stage.input)!r}'s rows")
    elif stage.prompt or stage.response:
        raise SynthError(f"{where(name, 'prompt')}: keys 'prompt'/'response' are for exporting a dataset's own "
                         f"rows; {stage.input!r} holds generated rows, whose prompts are the ones sent")


def preflight(graph: Graph, name: str, trained, console, will_run: bool) -> None:
    """A dataset export's rows all render now (a null value is an error here: an export has no error rows)."""
    stage: ExportStage = graph.stage(name)
    if name in graph.templates and stage.input in graph.seeds:
        for row in graph.seeds[stage.input].table.to_pylist():
            graph.templates[name].render(row, where=f"{graph.where(name)}: input row id {row.get('id')!r}")


def _writes(graph: Graph, name: str) -> list[Path]:
    out = graph.resolve(graph.stage(name).path)
    return [out, export_sidecar(out)]


KIND = Kind(
    name="export", run=run, references=references, check=check, preflight=preflight, writes=_writes,
    fingerprint=lambda graph, name, trained: (
        {"prompt": graph.templates[name].file_hash} if graph.stage(name).prompt else {}),
    missing_output=lambda graph, name, state: (
        None if graph.resolve(graph.stage(name).path).exists() else "its output file is missing"),
    later_keys={"rejected": "whole", "reasoning": "drop", "think_tags": ["<think>", "</think>"]},
)
