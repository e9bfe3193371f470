"""The score stage: a teacher scores sequences it did not write (on-policy distillation, GKD).

For each generated row of its input (typically the student's own samples), the teacher gets the row's
prompt and its completion's token ids and returns, at every position of the completion, its log-prob
of the token there and its `logprobs` best alternatives. `hf`: one forward pass per batch; `vllm`:
prompt log-probs; vLLM's OpenAI-compatible server (`vllm_server: true`): prompt_logprobs on
/completions. Other backends refuse before anything is written.

- The tokens are the completion's own: the ids its generator stored (params.logprobs, any k, 0 included)
  when there are any, else its text tokenised with the teacher's tokenizer (plus the end-of-sequence
  token when it stopped on its own); `tokens_from` in synth.scores says which. Either way they must be in
  the teacher's vocabulary: a generator whose tokenizer differs is refused with one line.
- Identity (the cache): score id = hash(teacher model, prompt messages, the exact token ids, k). The
  scores are synth.token_logprobs rows under that id; synth.scores maps the stage's rows (the input's
  ids) to score ids. A re-run scores only ids not stored yet.
- Durability as generate: each answer is journaled on arrival and committed in batches, so kill -9
  loses at most the batch in flight and the next run replays the journal instead of scoring again.

Output: a view named after the stage: the input's columns plus score_id, scored_tokens and
teacher_logprob (the sum of the teacher's log-probs of the completion's tokens).
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from synth.config import ScoreStage
from synth.context import RunContext
from synth.errors import StoreLocked, SynthError
from synth.graph import ROWS, Graph, Kind, Ref
from synth.ids import content_hash
from synth.journal import Journal, leftover_segments, remove_segments, replay
from synth.store import Store, error_rows, fetch_one, logprob_rows, quote_ident, sql_str
from synth.teachers import ScoreRequest, load_teacher, vocabulary_of
from synth.vocab import load_tokenizer, vocabulary_mismatch

SCORE_COLUMNS = ["score_id", "scored_tokens", "teacher_logprob"]
MAX_API_LOGPROBS = 20  # prompt_logprobs above this: vLLM's server refuses (its max_logprobs default)
FLUSH_ROWS, FLUSH_SECONDS = 256, 2.0


def sequences(graph: Graph, name: str, config) -> tuple[list[ScoreRequest], list[tuple[str, str, str]]]:
    """What the stage scores, from the store: per input row a ScoreRequest (its score id: the teacher, the prompt,
    the exact token ids, k; identical sequences share one) and (row id, score id, where its tokens came from).
    A row whose stored ids are in another vocabulary than the teacher's: SynthError, one line."""
    stage: ScoreStage = graph.stage(name)
    vocabulary = vocabulary_of(config, graph.base_dir)
    with graph.store.read() as con:
        rows = con.execute(
            f"SELECT s.id, p.messages, c.text, c.finish_reason, t.token_ids, t.tokenizer "
            f"FROM {quote_ident(stage.input)} s JOIN synth.requests r ON r.id = s.id "
            "JOIN synth.prompts p ON p.id = r.prompt_id JOIN synth.completions c ON c.id = s.id "
            "LEFT JOIN synth.token_logprobs t ON t.id = s.id ORDER BY s.id").fetchall()
    requests, membership = [], []
    problems: dict[str | None, str | None] = {}  # generator's tokenizer -> why its ids are not the teacher's
    for rid, messages, text, finish, ids, source in rows:
        if ids is not None:
            if source not in problems:  # once per tokenizer: comparing vocabularies reads both whole
                problems[source] = vocabulary_mismatch(source, vocabulary) if source else \
                    "the generator's vocabulary is unknown"
            problem = problems[source]
            if problem:
                raise SynthError(f"{graph.where(name, 'teacher')}: row {rid!r} of '{stage.input}' has token ids that "
                                 f"are not teacher '{stage.teacher}''s: {problem}")
            tokens, how = list(ids), "ids"
        else:
            tokenizer = load_tokenizer(vocabulary)
            tokens = tokenizer.encode(text or "", add_special_tokens=False)
            if finish == "stop" and tokenizer.eos_token_id is not None:
                tokens.append(tokenizer.eos_token_id)  # it ended on its own: the student learns to stop there
            how = "text"
        prompt = json.loads(messages)
        score_id = content_hash({"teacher": config.model, "messages": prompt, "tokens": tokens, "k": stage.logprobs})
        requests.append(ScoreRequest(score_id, prompt, tokens, stage.logprobs))
        membership.append((rid, score_id, how))
    return requests, membership


def estimate(graph: Graph, name: str, statuses, trained) -> dict:
    """Sequences to score, cached vs to send, for `synth plan` (no teacher, no writes)."""
    stage: ScoreStage = graph.stage(name)
    waiting = [n for n in (stage.input, *([stage.teacher] if stage.teacher in graph.stage_teachers else []))
               if statuses[n].stale]
    if waiting or not graph.store.exists():
        return {"requests": None, "cached": None, "to_send": None,
                "note": f"sequences known once '{(waiting or [stage.input])[0]}' has run"}
    requests, _ = sequences(graph, name, graph.teacher_config(stage.teacher, trained))
    ids = sorted({r.id for r in requests})
    with graph.store.read() as con:
        con.register("_ids", pa.table({"id": ids}))
        cached = con.execute("SELECT count(*) FROM synth.token_logprobs JOIN _ids USING (id)").fetchall()[0][0]
    return {"requests": len(requests), "cached": cached, "to_send": len(ids) - cached,
            "max_completion_tokens": 0, "note": None}


def run(ctx: RunContext, name: str) -> dict:
    graph, store, console = ctx.graph, ctx.store, ctx.console
    stage: ScoreStage = graph.stage(name)
    config = ctx.teacher_config(stage.teacher)
    vocabulary = vocabulary_of(config, graph.base_dir)
    requests, membership = sequences(graph, name, config)

    with store.write() as con:
        con.execute("DELETE FROM synth.scores WHERE stage = ?", [name])
        Store.insert_arrow(con, "synth.scores", pa.table({
            "stage": [name] * len(membership), "id": [m[0] for m in membership],
            "score_id": [m[1] for m in membership], "tokens_from": [m[2] for m in membership]}))
        con.register("_ids", pa.table({"id": [r.id for r in requests]}))
        cached = {r[0] for r in con.execute("SELECT t.id FROM synth.token_logprobs t JOIN _ids USING (id)").fetchall()}
        con.unregister("_ids")
        _create_view(con, graph, name)
        ctx.record(con, name, "running", len(cached), total=len(requests))

    pending = {r.id: r for r in requests if r.id not in cached}
    leftover = leftover_segments(store.path, name, exclude_run=ctx.run_id)
    recovered = replay(leftover, set(pending))
    to_send = [r for r in pending.values() if r.id not in {c.request_id for c in recovered}]
    buffer, counts = list(recovered), {"sent": 0, "errors": 0}
    journal = Journal(store.path, name, ctx.run_id)
    unwritten: list[str] = []

    def flush() -> bool:
        if not buffer:
            return True
        good = [c for c in buffer if c.ok]
        bad = [c for c in buffer if not c.ok]
        try:
            with store.write(threads=1) as con:
                Store.insert_arrow(con, "synth.token_logprobs",
                                   logprob_rows([c.request_id for c in good], [c.logprobs for c in good], vocabulary))
                Store.insert_arrow(con, "synth.errors", error_rows(bad, name, ctx.run_id), mode="")
        except StoreLocked as exc:  # a reader held the store: the answers are journaled, the next flush retries
            unwritten[:] = [str(exc)]
            return False
        unwritten.clear()
        journal.rotate({c.request_id for c in buffer})
        buffer.clear()
        return True

    teacher = None
    started = last = time.monotonic()
    try:
        if to_send:
            teacher = load_teacher(stage.teacher, config, graph.base_dir)
            console.print(f"  {name}: scoring {len(to_send)} sequences with teacher '{stage.teacher}' "
                          f"({len(cached)} cached)", highlight=False)
            for c in teacher.score(to_send):
                counts["sent"] += 1
                journal.append(c)
                if not c.ok:
                    counts["errors"] += 1
                buffer.append(c)
                if len(buffer) >= FLUSH_ROWS or time.monotonic() - last >= FLUSH_SECONDS:
                    flush()
                    last = time.monotonic()
    finally:
        try:
            flushed = flush()
        finally:
            journal.close()
            if teacher is not None:
                teacher.close()
    if not flushed:
        raise SynthError(f"{graph.where(name)}: could not record {len(buffer)} scores: {unwritten[0]}; they are saved "
                         f"in {journal.dir} and the next run records them without asking the teacher again")
    remove_segments(leftover)
    with store.write() as con:
        done = fetch_one(con, "SELECT count(*) FROM synth.scores s JOIN synth.token_logprobs t ON t.id = s.score_id "
                              "WHERE s.stage = ?", [name])[0]
        missing = len(requests) - done
        ctx.record(con, name, "done" if missing == 0 else "incomplete", done, total=len(requests), errors=missing,
                   sent=counts["sent"], cached=len(cached), recovered=len(recovered))
    console.print(f"  {name}: {done}/{len(requests)} sequences scored · {len(cached)} cached · "
                  + (f"{len(recovered)} recovered from the journal · " if recovered else "")
                  + f"{counts['sent']} sent · {counts['errors']} errors in {time.monotonic() - started:.1f}s",
                  highlight=False)
    return {"rows": done, "total": len(requests), "cached": len(cached), "sent": counts["sent"],
            "errors": counts["errors"], "recovered": len(recovered)}


def _create_view(con, graph: Graph, name: str) -> None:
    stage: ScoreStage = graph.stage(name)
    Store.replace_view(con, name, (
        f"SELECT i.*, s.score_id, len(t.token_ids) AS scored_tokens, list_sum(t.logprobs)::DOUBLE AS teacher_logprob "
        f"FROM {quote_ident(stage.input)} i JOIN synth.scores s ON s.id = i.id AND s.stage = {sql_str(name)} "
        "JOIN synth.token_logprobs t ON t.id = s.score_id"))


# ---- load time ------------------------------------------------------------------------------------------

def references(stage: ScoreStage, stages) -> list[Ref]:
    trained = [stage.teacher] if stages.get(stage.teacher) is not None and stages[stage.teacher].kind == "train" \
        else []
    return [Ref("input", (stage.input,), ROWS), Ref("teacher", tuple(trained), ("train",))]


def check(graph: Graph, name: str) -> list[str]:
    """Its input is generated rows (the completions to score) whose columns leave room for its own."""
    stage: ScoreStage = graph.stage(name)
    if graph.stage(graph.root(stage.input)).kind != "generate":
        raise SynthError(f"{graph.where(name, 'input')}: key 'input': a score stage scores generated completions; "
                         f"{stage.input!r} carries {graph.root(stage.input)!r}'s rows, which no teacher wrote")
    taken = [c for c in SCORE_COLUMNS if c in graph.columns[stage.input]]
    if taken:
        raise SynthError(f"{graph.where(name, 'input')}: key 'input': {stage.input!r} already has a column "
                         f"{taken[0]!r}, which a score stage adds; score the generated rows, not another score stage")
    return list(graph.columns[stage.input]) + SCORE_COLUMNS


def preflight(graph: Graph, name: str, trained, console, will_run: bool) -> None:
    """The teacher can score (hf, vllm, vLLM's server declared with vllm_server and a tokenizer) and k fits it."""
    stage: ScoreStage = graph.stage(name)
    config = graph.teacher_config(stage.teacher, trained)
    where = graph.where(name, "teacher")
    if not config.capabilities().scoring:
        hint = ("only vLLM's server can (prompt_logprobs): set `vllm_server: true` on the teacher if it is one"
                if config.backend == "openai" else "use an hf or vllm teacher")
        raise SynthError(f"{where}: key 'teacher': teacher '{stage.teacher}' (backend {config.backend}) cannot score "
                         f"sequences it did not write; {hint}")
    if config.backend == "openai" and (not config.tokenizer or not config.base_url):
        raise SynthError(f"{where}: key 'teacher': scoring through vLLM's server sends the prompt as token ids: give "
                         f"teacher '{stage.teacher}' its `base_url` and `tokenizer` (the served model's dir or hub id)")
    limit = MAX_API_LOGPROBS if config.backend == "openai" else \
        config.engine.get("max_logprobs", MAX_API_LOGPROBS) if config.backend == "vllm" else None
    if limit is not None and limit >= 0 and stage.logprobs > limit:
        how = "start the server with a larger --max-logprobs" if config.backend == "openai" else \
            f"set engine: {{max_logprobs: {stage.logprobs}}} on the teacher"
        raise SynthError(f"{graph.where(name, 'logprobs')}: key 'logprobs': {stage.logprobs} alternatives per position, "
                         f"but teacher '{stage.teacher}' (backend {config.backend}) returns at most {limit}; ask for "
                         f"fewer, or {how}")


def fingerprint(graph: Graph, name: str, trained) -> dict[str, str]:
    teacher = graph.teacher_config(graph.stage(name).teacher, trained)
    return {"teacher": content_hash({"backend": teacher.backend, "model": teacher.model})}


KIND = Kind(
    name="score", run=run, references=references, check=check, fingerprint=fingerprint, preflight=preflight,
    estimate=estimate,
    teachers=lambda stage: [("teacher", [stage.teacher])],
)
