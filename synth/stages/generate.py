"""The generate stage: input rows x template x samples -> requests -> completions.

Contract (DESIGN.md, "Data model"):
- a request's id is the hash of (model, rendered messages, sampling params, sample index);
- the completions table is the cache: only ids without a completion are sent, so a finished stage
  re-run sends nothing and an edited template re-sends only the rows whose messages changed;
- completions are committed in short transactions as they arrive (every SYNTH_FLUSH_ROWS rows or
  SYNTH_FLUSH_SECONDS seconds), so `kill -9` loses at most the batch in flight and a re-run continues;
- a failed request is an error row with its cause; a re-run retries it;
- budgets (the stage's max_cost / max_tokens_total, `synth run --max-cost`) stop a stage cleanly:
  the teacher takes no new requests, the ones in flight are kept, and a re-run with a larger budget
  continues (Budget below; the run's budget is context.RunBudget).

The stage's output is a view named after the stage over synth.generations (membership and parsed
columns), synth.completions, synth.requests and the input stage's rows: it fills in live as
completions are committed.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from synth.config import GenerateStage
from synth.context import RunContext
from synth.errors import MissingValue, StoreLocked, SynthError
from synth.filterfiles import refusal_judge
from synth.graph import ROWS, Graph, Kind, Ref
from synth.ids import content_hash
from synth.journal import Journal, leftover_segments, remove_segments, replay
from synth import schemas
from synth.parsers import PARSER_COLUMNS, PARSERS, parse_json
from synth.prompts import load_template
from synth.requests import PAIR_COLUMNS, build_requests, cached_ids, input_rows
from synth.store import error_rows, fetch_one, logprob_rows, Store, now, quote_ident, sql_str
from synth.teachers import (Completion, OpenAITeacherConfig, Request, content_filtered, load_teacher,
                            prompt_token_counter, split_reasoning, vocabulary_of)
from synth.teachers.openai import resolve_api_key
from synth.vocab import load_tokenizer
from synth.vote import telling

MAX_API_LOGPROBS = 20  # top_logprobs: the most OpenAI's chat API (and vLLM's server, by default) return

GENERATION_COLUMNS = ["id", "input_id", "sample", "teacher", "model", "text", "finish_reason",
                      "prompt_tokens", "completion_tokens", "reasoning", "reasoning_tokens"]


def flush_batch_rows() -> int:
    return int(os.environ.get("SYNTH_FLUSH_ROWS", "2048"))


def flush_seconds() -> float:
    return float(os.environ.get("SYNTH_FLUSH_SECONDS", "2"))


def log_seconds() -> float:
    """When stderr is not a terminal (CI, nohup, a pipe) the live bar is replaced by a progress line
    every this many seconds."""
    return float(os.environ.get("SYNTH_PROGRESS_SECONDS", "10"))


def estimate(graph: Graph, name: str, statuses, trained) -> dict:
    """Requests cached vs to send and estimated tokens, for `synth plan` (no teacher, no writes)."""
    stage: GenerateStage = graph.stage(name)
    upstream_unknown = statuses[stage.input].stale and stage.input not in graph.seeds
    # a student teacher not (re)trained yet
    untrained = [t for t in graph.inputs[name] if t in graph.stage_teachers and statuses[t].stale]
    rows = None if upstream_unknown or untrained else input_rows(graph, name, from_store=False)
    if rows is None:
        return {"requests": None, "cached": None, "to_send": None,
                "note": f"requests known once '{(untrained or [stage.input])[0]}' has run"}
    config = graph.teacher_config(stage.teacher, trained)
    planned = build_requests(graph, name, rows, config.model)
    cached = cached_ids(graph.store, [r.id for r in planned.requests])
    to_send = [r for r in planned.requests if r.id not in cached]
    count, counted_by = prompt_token_counter(config, graph.base_dir)
    per_prompt: dict[str, int] = {}  # the samples of one prompt share its count
    est_prompt = 0
    for r in to_send:
        pid = planned.prompt_of[r.id]
        if pid not in per_prompt:
            per_prompt[pid] = count(r.messages)
        est_prompt += per_prompt[pid]
    max_completion = len(to_send) * stage.params.max_tokens
    prices = graph.prices(name)
    # at most: every request is assumed to use its whole max_tokens
    return {"requests": len(planned.requests), "cached": len(cached), "to_send": len(to_send),
            "est_prompt_tokens": est_prompt, "prompt_tokens_by": counted_by, "max_completion_tokens": max_completion,
            "max_cost": round(prices.cost(est_prompt, max_completion), 6) if prices else None}


# ---- running ----------------------------------------------------------------------------------------

def run(ctx: RunContext, name: str) -> dict:
    graph, run_id, console, store = ctx.graph, ctx.run_id, ctx.console, ctx.store
    stage: GenerateStage = graph.stage(name)
    parse = answer_parser(graph, name)
    config = ctx.teacher_config(stage.teacher)
    model = config.model
    tokenizer = vocabulary_of(config, graph.base_dir)
    rows = input_rows(graph, name, from_store=True)
    if rows is None:
        raise SynthError(f"{graph.where(name)}: input '{stage.input}' has no rows in the store; run it first")
    planned = build_requests(graph, name, rows, model)
    ids = [r.id for r in planned.requests]

    # One transaction records the stage's requests and re-derives its membership from the cache.
    with store.write() as con:
        Store.insert_arrow(con, "synth.prompts", pa.table({
            "id": list(planned.prompts), "messages": [json.dumps(m, ensure_ascii=False) for m in planned.prompts.values()]}))
        Store.insert_arrow(con, "synth.requests", pa.table({
            "id": ids, "prompt_id": [planned.prompt_of[i] for i in ids],
            "model": [model] * len(ids),
            "params": [json.dumps(r.params) for r in planned.requests], "sample": [r.sample for r in planned.requests]}))
        con.execute("DELETE FROM synth.generations WHERE stage = ?", [name])
        con.register("_ids", pa.table({"id": ids}))
        cached = dict(con.execute("SELECT c.id, c.text FROM synth.completions c JOIN _ids USING (id)").fetchall())
        con.unregister("_ids")
        Store.insert_arrow(con, "synth.generations", _membership(name, stage.teacher, planned.requests,
                                                                 planned.input_of, cached, parse))
        _create_view(con, graph, name)
        ctx.record(con, name, "running", len(cached), total=len(ids))
        bad = planned.unrendered
        Store.insert_arrow(con, "synth.errors", pa.table({  # no request exists for them: request_id NULL
            "request_id": pa.array([None] * len(bad), pa.string()), "stage": [name] * len(bad),
            "cause": ["missing_value"] * len(bad), "message": [f"input row id {rid!r}: {exc}"[:2000] for rid, exc in bad],
            "run_id": [run_id] * len(bad), "created_at": [now()] * len(bad)}), mode="")
        # what the stage has spent: its answers, and the answers it rejected by a policy (paid for too)
        spent_in, spent_out = fetch_one(con, "SELECT coalesce(sum(p), 0), coalesce(sum(c), 0) FROM ("
                                        "SELECT c.prompt_tokens AS p, c.completion_tokens AS c FROM synth.generations g "
                                        "JOIN synth.completions c USING (id) WHERE g.stage = ? UNION ALL "
                                        "SELECT prompt_tokens, completion_tokens FROM synth.errors WHERE stage = ?)",
                                        [name, name])

    budget = Budget(stage, graph.prices(name), spent_in, spent_out, ctx.run_budget)
    pending = [r for r in planned.requests if r.id not in cached]
    # answers an earlier run received but never committed (it was killed, or could not write): recorded
    # now, through the same policies, and never sent again (synth/journal.py)
    leftover = leftover_segments(store.path, name, exclude_run=run_id)
    recovered = replay(leftover, {r.id for r in pending})
    recovered_ids = {c.request_id for c in recovered}
    if pending and budget.reached():
        console.print(f"  {name}: at its budget before sending anything ({budget.describe()})")
        pending = [r for r in pending if r.id in recovered_ids]
    to_send = [r for r in pending if r.id not in recovered_ids]
    sent, errors, tokens, answered = 0, 0, 0, 0  # sent counts an on_length retry as a request of its own
    buffer: list[Completion] = []
    by_id = {r.id: r for r in pending}
    policies = Policies(graph, name, by_id, tokenizer)
    journal = Journal(store.path, name, run_id)
    unwritten: list[str] = []  # why the last commit failed, while answers wait in the journal

    def flush() -> bool:
        """Commit what arrived; False when the store could not be written (the answers stay in the buffer
        and in the journal, and the next flush tries again)."""
        if not buffer:
            return True
        good = [c for c in buffer if c.ok]
        bad = [c for c in buffer if not c.ok]
        try:
            with store.write(threads=1) as con:
                Store.insert_arrow(con, "synth.completions", _completion_rows(good, stage.teacher, run_id))
                with_lp = [c for c in good if c.logprobs is not None]
                Store.insert_arrow(con, "synth.token_logprobs", logprob_rows(
                    [c.request_id for c in with_lp], [c.logprobs for c in with_lp], tokenizer))
                Store.insert_arrow(con, "synth.generations", _membership(
                    name, stage.teacher, [by_id[c.request_id] for c in good], planned.input_of,
                    {c.request_id: c.text for c in good}, parse), mode="OR REPLACE")
                Store.insert_arrow(con, "synth.errors", error_rows(bad, name, run_id), mode="")
        except StoreLocked as exc:  # a reader held the store too long: keep going, the answers are journaled
            unwritten[:] = [str(exc)]
            return False
        unwritten.clear()
        journal.rotate({c.request_id for c in buffer})
        buffer.clear()
        return True

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("cached {task.fields[cached]} · sent {task.fields[sent]} · "
                                   "errors {task.fields[errors]} · {task.fields[tps]} tok/s"),
                        TimeElapsedColumn(), console=console, transient=False,
                        disable=not console.is_terminal)  # not a terminal: progress lines instead
    started = time.monotonic()
    oldest = last_log = last_update = started  # oldest: when the oldest answer not yet committed arrived
    flush_rows, flush_every, log_every = flush_batch_rows(), flush_seconds(), log_seconds()
    teacher = None

    def account(c: Completion) -> None:
        if c.ok:
            budget.add(c.prompt_tokens, c.completion_tokens)
            if budget.reached() and not budget.stopped:
                budget.stopped = True
                teacher.stop()  # no new requests; those in flight still arrive and are kept

    def receive(c: Completion) -> None:
        """Every answer from the teacher, in the thread that receives it: durable first, then counted."""
        journal.append(c)
        account(c)

    def get_teacher():
        nonlocal teacher
        if teacher is None:
            teacher = stage_teacher(ctx, name)
            # A teacher with concurrent workers (openai: calls_on_result_in_worker) hands each answer to
            # `receive` in its worker, before the next request is taken and before the answer waits in a queue
            # for this loop: the budget is then overshot by at most the requests in flight, and a kill loses
            # only those. Every other teacher's answers are received below, as this loop gets them.
            teacher.on_result = receive
            teacher.on_idle = flush  # a teacher that waits long between answers (the Batch API) calls it first
        return teacher

    try:
        with progress:
            task = progress.add_task(name, total=len(ids), completed=len(cached), cached=len(cached), sent=0,
                                     errors=0, tps=0)
            answers = _with_retries(get_teacher, to_send, policies, lambda: budget.stopped)
            for completion, fresh in _recovered_then(recovered, answers):
                if fresh:
                    sent += 1
                    if not teacher.calls_on_result_in_worker:
                        receive(completion)
                else:
                    budget.add(completion.prompt_tokens, completion.completion_tokens)
                completion = policies(completion)
                if completion is None:  # cut at max_tokens: queued for its retry, nothing to record yet
                    continue
                if completion.ok:
                    answered += 1
                    tokens += completion.completion_tokens or 0
                else:
                    errors += 1
                buffer.append(completion)
                t = time.monotonic()
                # The commit timer runs from the oldest uncommitted answer, not from the last commit (or the stage's
                # start): timed from the start, the first answer after 2 s of generating was committed alone, in a
                # DuckDB transaction of its own (~0.1 s here), while the answers that came with it waited.
                if len(buffer) == 1:
                    oldest = t
                if len(buffer) >= flush_rows or t - oldest >= flush_every:
                    flush()
                    oldest = time.monotonic()  # a commit that failed (the store locked) is tried again this long after
                if t - last_update < 0.1:  # the bar refreshes 10x/s; updating it per row costs the client CPU
                    continue
                last_update, elapsed = t, max(t - started, 1e-6)
                progress.update(task, completed=len(cached) + answered, sent=sent, errors=errors,
                                tps=f"{tokens / elapsed:,.0f}")
                if not console.is_terminal and t - last_log >= log_every:
                    last_log = t
                    console.print(f"  {name}: {len(cached) + answered}/{len(ids)} · sent {sent} · "
                                  f"errors {errors} · {tokens / elapsed:,.0f} tok/s", highlight=False)
            progress.update(task, completed=len(cached) + answered, sent=sent, errors=errors)
    finally:
        try:
            flushed = flush()  # an exception, Ctrl-C or a lock keeps everything that had arrived
        finally:
            journal.close()
            if teacher is not None:
                teacher.close()
    if not flushed:
        raise SynthError(f"{graph.where(name)}: could not record {len(buffer)} answers: {unwritten[0]}; they are "
                         f"saved in {journal.dir} and the next run records them without asking the teacher again")
    # every recovered answer went through the loop and is committed: an earlier run's segments can go (only
    # here, after a loop that ended normally; a kill before this replays them again, which is harmless)
    remove_segments(leftover)

    with store.write() as con:
        done = fetch_one(con, "SELECT count(*) FROM synth.generations g JOIN synth.completions c USING (id) "
                           "WHERE g.stage = ?", [name])[0]
        missing = len(ids) - done
        _create_view(con, graph, name)  # json parsers: columns for the keys seen
        stopped = {"stopped": "budget", "budget": budget.describe()} if missing and budget.reached() else {}
        quality = answer_stats(con, graph, name)
        ctx.record(con, name, "done" if missing == 0 else "incomplete", done,
                   total=len(ids), errors=missing, sent=sent, cached=len(cached), collapsed=planned.collapsed,
                   recovered=len(recovered), unrendered=len(planned.unrendered),
                   cost=budget.cost(), **quality, **stopped)
    elapsed = time.monotonic() - started
    console.print(f"  {name}: {done}/{len(ids)} rows · {len(cached)} cached · "
                  + (f"{len(recovered)} recovered from the journal · " if recovered else "")
                  + f"{sent} sent · {errors} errors · "
                  f"{tokens:,} tokens in {elapsed:.1f}s" + (f" · cost ${budget.cost():,.4f}" if budget.prices else ""))
    if planned.unrendered:
        rid, exc = planned.unrendered[0]
        console.print(f"  [yellow]{name}: {len(planned.unrendered)} input rows not sent: a template variable is null "
                      f"or missing (first: row {rid!r}, column {exc.column!r}); fix those rows or give the variable a "
                      "default in the template; they are in synth.errors with cause missing_value[/yellow]")
    for line in describe_answers(graph, name, quality):
        console.print(line, highlight=False)
    if stopped:
        console.print(f"  {name}: stopped at its budget ({budget.describe()}); {missing} requests unsent — raise "
                      "the budget and re-run to continue")
    return {"rows": done, "total": len(ids), "cached": len(cached), "sent": sent, "errors": errors,
            "recovered": len(recovered), "unrendered": len(planned.unrendered),
            "completion_tokens": tokens, "unsent": missing if stopped else 0, **quality, **stopped}


# Below these, the end of a generate stage warns (the answers are there, but most will not serve).
LOW_PARSE_RATE = 0.8  # share of answers the template's parser could read
HIGH_IDENTICAL = 0.5  # share of inputs whose samples are all the same text, at temperature > 0


def answer_stats(con, graph: Graph, name: str) -> dict:
    """What the stage's answers look like, from the store: `parsed` {readable, answers}: how many answers the
    template's parser could read (its answer contract: a \\boxed{}, a `Score: N`, a JSON object; absent for
    parse: text); `identical` {inputs, of}: of the inputs with two or more answers (leaving out those
    all of one text shorter than vote.MIN_TELLING_CHARS), how many got the same text every time (absent
    with one sample or temperature 0, where that is expected)."""
    stage: GenerateStage = graph.stage(name)
    parse = graph.templates[name].spec.parse
    out: dict = {}
    answers = "FROM synth.generations g JOIN synth.completions c USING (id) WHERE g.stage = ?"
    if parse != "text":
        readable = ("json_extract(g.parsed, '$.parse_error') IS NULL" if parse == "json" else
                    f"json_extract_string(g.parsed, {sql_str('$.' + json.dumps(PARSER_COLUMNS[parse][0]))}) IS NOT NULL")
        n, ok = fetch_one(con, f"SELECT count(*), count(*) FILTER (WHERE {readable}) {answers}", [name])
        out["parsed"] = {"readable": ok, "answers": n}
    if stage.samples > 1 and stage.params.temperature > 0:
        # only inputs that can tell (vote.telling: answers that differ, or one long enough; a bare answer repeats)
        of, same = fetch_one(con, "SELECT count(*), count(*) FILTER (WHERE texts = 1) FROM (SELECT g.input_id, "
                                  f"count(DISTINCT c.text) AS texts {answers} GROUP BY g.input_id HAVING count(*) >= 2 "
                                  f"AND {telling('c.text')})", [name])
        out["identical"] = {"inputs": same, "of": of}
    return out


def describe_answers(graph: Graph, name: str, quality: dict) -> list[str]:
    """The stats line of answer_stats, and a warning for each figure past its threshold."""
    stage: GenerateStage = graph.stage(name)
    lines = []
    parsed, identical = quality.get("parsed"), quality.get("identical")
    if parsed and parsed["answers"]:
        parse = graph.templates[name].spec.parse
        share = parsed["readable"] / parsed["answers"]
        lines.append(f"  {name}: parser {parse} read {parsed['readable']}/{parsed['answers']} answers ({share:.0%})")
        if share < LOW_PARSE_RATE:
            ask = "" if parse == "json" else ", ask for JSON (`parse: json`)"
            lines.append(f"  [yellow]{name}: warning: only {share:.0%} of the answers follow the template's answer "
                         f"format (parser {parse}), so filters that read the answer reject the rest; give the stage "
                         f"a `schema:` (structured output, enforced by hf, vllm and OpenAI-compatible servers), add "
                         f"few-shot examples to the template{ask}, or pick a parser for what the teacher does write "
                         "(then check that the parsed answers are right, not only readable) — README, \"When "
                         "answers do not parse\"[/yellow]")
    if identical and identical["of"]:
        share = identical["inputs"] / identical["of"]
        lines.append(f"  {name}: {identical['inputs']}/{identical['of']} inputs got {stage.samples} identical samples")
        if share >= HIGH_IDENTICAL:
            lines.append(f"  [yellow]{name}: warning: {share:.0%} of the inputs got the same text in every sample at "
                         f"temperature {stage.params.temperature:g}: the teacher did not sample. A server may ignore "
                         "temperature or seed (`transformers serve` decodes greedily unless the model's "
                         "generation_config sets do_sample: true); voting and pairs need samples that differ[/yellow]")
    return lines


def stage_teacher(ctx: RunContext, name: str):
    """The teacher a generate stage sends its requests to: its backend, on Ray workers when the stage
    says `ray:`. A backend that keeps state in the store (the Batch API's batch ids) is bound to it."""
    stage: GenerateStage = ctx.graph.stage(name)
    config = ctx.teacher_config(stage.teacher)
    if stage.ray is not None:
        from synth.teachers.ray import RayTeacher  # imports ray (heavy, optional): only for a `ray:` stage
        teacher = RayTeacher(stage.teacher, config, ctx.graph.base_dir, stage.ray)
    else:
        teacher = load_teacher(stage.teacher, config, ctx.graph.base_dir)
    teacher.bind(ctx.store, name, ctx.run_id)
    return teacher


def _with_retries(get_teacher, pending: list[Request], policies: "Policies", stopped):
    """The teacher's completions of `pending`, then those of the on_length retries queued meanwhile
    (the same request ids, with retry_max_tokens): one pass of retries, so each is asked once more.
    Not after a budget stop: an unanswered retry stays unsent, and a re-run asks it again. The teacher
    is only made (a model loaded, a client started) when there is something to send."""
    if pending:
        yield from get_teacher().generate(pending)
    if policies.queue and not stopped():
        queued, policies.queue = policies.queue, []
        yield from get_teacher().generate(queued)


def _recovered_then(recovered: list[Completion], answers):
    """(completion, fresh) pairs: the journal's recovered answers first (fresh False: not sent in this run),
    then the teacher's."""
    for c in recovered:
        yield c, False
    for c in answers:
        yield c, True


class Policies:
    """What a generate stage does with an answer before it is recorded (GenerateStage.on_length,
    on_refusal; the server's content filter always): a Completion to record, or None when the answer
    was queued for its one retry."""

    def __init__(self, graph: Graph, name: str, requests: dict[str, Request], tokenizer: str | None = None):
        self.stage: GenerateStage = graph.stage(name)
        self.tokenizer = tokenizer  # the teacher's (vocabulary_of): counts a trace the server did not count
        self.retry_tokens = self.stage.retry_max_tokens or 2 * self.stage.params.max_tokens
        self.retried: set[str] = set()
        self.queue: list[Request] = []  # on_length retries, sent after the first pass
        self.requests = requests  # request id -> Request: the ones this run sends
        self.refusal = refusal_judge(graph.base_dir) if self.stage.on_refusal == "error" else None
        # a schema the stage declares is a contract (checked); `auto` (a critic's) only asks the backend for it,
        # so a server that ignores response_format still gets its prose read by the parser
        self.schema = schemas.Checker(graph.schemas[name]) if name in graph.schemas and self.stage.schema_ != "auto" \
            else None
        self.reasoning_tags = graph.teacher_config(self.stage.teacher, {}).reasoning_tags

    def __call__(self, c: Completion) -> Completion | None:
        c = split_reasoning(content_filtered(c), self.reasoning_tags)
        if not c.ok:
            return c
        if c.reasoning and c.reasoning_tokens is None and self.tokenizer:
            c.reasoning_tokens = self.trace_tokens(c.reasoning)
        if c.request_id in self.retried:
            c.retry_max_tokens = self.retry_tokens
        if c.finish_reason == "length" and self.stage.on_length != "keep":
            if self.stage.on_length == "retry" and c.request_id not in self.retried:
                self.retried.add(c.request_id)
                r = self.requests[c.request_id]
                self.queue.append(Request(r.id, r.messages, {**r.params, "max_tokens": self.retry_tokens}, r.sample))
                return None
            tokens = self.retry_tokens if c.request_id in self.retried else self.stage.params.max_tokens
            return c.rejected("length", f"the output was cut at max_tokens={tokens}"
                              + (" after its retry" if c.request_id in self.retried else "")
                              + f"; raise params.max_tokens or retry_max_tokens: {(c.text or '')[-120:]!r}")
        if self.refusal is not None and self.refusal(c.text or ""):
            return c.rejected("refusal", f"the answer reads as a refusal: {(c.text or '')[:200]!r}")
        problem = self.schema.problem(c.text) if self.schema is not None else None
        if problem:
            return c.rejected("schema_violation", f"the answer does not follow the stage's schema: {problem}")
        return c


    def trace_tokens(self, trace: str) -> int | None:
        """The tokens a trace split from the text took, re-tokenised with its tags by the teacher's tokenizer
        (within a token or two of what was generated: the split strips the whitespace around the tags);
        None when the tokenizer cannot be loaded here."""
        tags = self.reasoning_tags if len(self.reasoning_tags) == 2 else ["", ""]
        try:
            tok = load_tokenizer(self.tokenizer)
        except SynthError:
            self.tokenizer = None  # not again for every answer
            return None
        return len(tok(f"{tags[0]}{trace}{tags[1]}", add_special_tokens=False)["input_ids"])


class Budget:
    """A generate stage's spend against its max_cost / max_tokens_total, counting every completion the
    stage has (earlier runs included), so raising the budget and re-running continues where it stopped."""

    def __init__(self, stage: GenerateStage, prices, prompt_tokens: int, completion_tokens: int, run=None):
        self.stage, self.prices, self.run = stage, prices, run  # run: the run's RunBudget (`synth run --max-cost`)
        self.prompt_tokens, self.completion_tokens = int(prompt_tokens), int(completion_tokens)
        self.stopped = False

    def add(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self.prompt_tokens += prompt_tokens or 0
        self.completion_tokens += completion_tokens or 0
        if self.run is not None and self.prices is not None:
            self.run.spent += self.prices.cost(prompt_tokens, completion_tokens)

    def cost(self) -> float | None:
        return self.prices.cost(self.prompt_tokens, self.completion_tokens) if self.prices else None

    def reached(self) -> bool:
        s = self.stage
        if s.max_cost is not None and self.prices is not None and self.cost() >= s.max_cost:
            return True
        if self.run is not None and self.run.spent >= self.run.max_cost:
            return True
        return s.max_tokens_total is not None and self.prompt_tokens + self.completion_tokens >= s.max_tokens_total

    def describe(self) -> str:
        parts = []
        if self.stage.max_cost is not None and self.prices is not None:
            parts.append(f"${self.cost():,.4f} of max_cost ${self.stage.max_cost:g}")
        if self.stage.max_tokens_total is not None:
            parts.append(f"{self.prompt_tokens + self.completion_tokens:,} of max_tokens_total "
                         f"{self.stage.max_tokens_total:,} tokens")
        if self.run is not None:
            parts.append(f"this run ${self.run.spent:,.4f} of --max-cost ${self.run.max_cost:g}")
        return ", ".join(parts) or "no budget"


def _membership(stage: str, teacher: str, requests: list[Request], input_of: dict[str, str],
                texts: dict[str, str], parse) -> pa.Table:
    return pa.table({
        "stage": [stage] * len(requests),
        "id": [r.id for r in requests],
        "input_id": [input_of[r.id] for r in requests],
        "sample": [r.sample for r in requests],
        "teacher": [teacher] * len(requests),
        "parsed": [json.dumps(parse(texts[r.id]), ensure_ascii=False) if r.id in texts else None for r in requests],
    }, schema=pa.schema([("stage", pa.string()), ("id", pa.string()), ("input_id", pa.string()),
                         ("sample", pa.int32()), ("teacher", pa.string()), ("parsed", pa.string())]))


def _completion_rows(completions: list[Completion], teacher: str, run_id: str) -> pa.Table:
    return pa.table({
        "id": [c.request_id for c in completions], "text": [c.text for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "prompt_tokens": pa.array([c.prompt_tokens for c in completions], pa.int32()),
        "completion_tokens": pa.array([c.completion_tokens for c in completions], pa.int32()),
        "latency_s": pa.array([c.latency_s for c in completions], pa.float64()),
        "retry_max_tokens": pa.array([c.retry_max_tokens for c in completions], pa.int32()),
        "reasoning": pa.array([c.reasoning for c in completions], pa.string()),
        "reasoning_tokens": pa.array([c.reasoning_tokens for c in completions], pa.int32()),
        "teacher": [teacher] * len(completions), "run_id": [run_id] * len(completions),
        "created_at": [now()] * len(completions)})


def _create_view(con, graph: Graph, name: str) -> None:
    stage: GenerateStage = graph.stage(name)
    parse = graph.templates[name].spec.parse
    keys = answer_keys(graph, name)
    if parse == "json":
        found = con.execute("SELECT DISTINCT unnest(json_keys(parsed)) AS k FROM synth.generations "
                            "WHERE stage = ? AND parsed IS NOT NULL ORDER BY k", [name]).fetchall()
        keys += [k[0] for k in found if k[0] not in keys and answer_alias(k[0]) not in map(answer_alias, keys)]
    own = GENERATION_COLUMNS + [answer_alias(k) for k in keys]
    select = ["g.id", "g.input_id", "g.sample", "g.teacher", "r.model", "c.text", "c.finish_reason",
              "c.prompt_tokens", "c.completion_tokens", "c.reasoning", "c.reasoning_tokens"]
    select += [f"json_extract_string(g.parsed, {sql_str('$.' + json.dumps(k))}) AS {quote_ident(answer_alias(k))}"
               for k in keys]
    select += [f"i.{quote_ident(c)} AS {quote_ident(input_alias(c, own))}"
               for c in graph.columns[stage.input] if c != "id"]
    Store.replace_view(con, name, (
        f"SELECT {', '.join(select)} FROM synth.generations g "
        "JOIN synth.completions c ON c.id = g.id JOIN synth.requests r ON r.id = g.id "
        f"LEFT JOIN {quote_ident(stage.input)} i ON i.id = g.input_id WHERE g.stage = {sql_str(name)}"))


# ---- load time ------------------------------------------------------------------------------------------

def answer_keys(graph: Graph, name: str) -> list[str]:
    """The keys a stage reads out of each answer: its template's parser's, then its schema's properties."""
    parsed = list(PARSER_COLUMNS[graph.templates[name].spec.parse])
    return parsed + [p for p in schemas.properties(graph.schemas.get(name)) if p not in parsed]


def answer_alias(key: str) -> str:
    """The column of an answer's key: the key, or answer_<key> where a generation column has its name (a
    schema's `reasoning` property beside the teacher's trace, an `id` or `text` key)."""
    return f"answer_{key}" if key in GENERATION_COLUMNS else key


def answer_columns(graph: Graph, name: str) -> list[str]:
    """The columns a stage reads out of each answer (answer_keys, named by answer_alias)."""
    return [answer_alias(k) for k in answer_keys(graph, name)]


def answer_parser(graph: Graph, name: str):
    """text -> the answer's columns: the template's parser's, then the schema's properties read from the
    answer's JSON object (a property the answer has wins over a parser column of the same name)."""
    parse = PARSERS[graph.templates[name].spec.parse]
    props = schemas.properties(graph.schemas.get(name))
    if not props:
        return parse

    def parse_answer(text: str) -> dict:
        value = parse_json(text)
        found = {} if "parse_error" in value else value
        parsed = parse(text)
        return {**parsed, **{p: found.get(p) for p in props if found.get(p) is not None or p not in parsed}}
    return parse_answer


def generation_columns(graph: Graph, name: str, input_columns: list[str]) -> list[str]:
    """A generate stage's columns: its own, the answer's (parser, schema), then the input row's (minus its
    id, which is `input_id`); an input column whose name is taken is renamed input_<name>."""
    own = GENERATION_COLUMNS + answer_columns(graph, name)
    return own + [input_alias(c, own) for c in input_columns if c != "id"]


def input_alias(column: str, taken: list[str]) -> str:
    return f"input_{column}" if column in taken else column


def references(stage: GenerateStage, stages) -> list[Ref]:
    """Its input's rows; and a train stage, when the teacher is that stage's trained model (it runs after)."""
    trained = [stage.teacher] if stages.get(stage.teacher) is not None and stages[stage.teacher].kind == "train" \
        else []
    return [Ref("input", (stage.input,), ROWS), Ref("teacher", tuple(trained), ("train",))]


def check(graph: Graph, name: str) -> list[str]:
    """The template exists and names only columns its rows have (a pairwise critic's rows are pairs:
    errors name the judge stage that owns it); a max_cost needs the teacher's prices."""
    stage: GenerateStage = graph.stage(name)
    if stage.max_cost and graph.prices(name) is None:
        raise SynthError(f"{graph.where(name, 'max_cost')}: key 'max_cost': teacher {stage.teacher!r} has no prices; "
                         "add prices: {input: USD per 1M tokens, output: USD per 1M tokens} to it")
    owner = graph.owner_of.get(name)
    template = load_template(stage.prompt, graph.base_dir, f"{graph.where(owner or name, 'prompt')}: key 'prompt'")
    columns = graph.columns[stage.input]
    if name in graph.pairs_by:
        columns = [c for c in columns if c not in PAIR_COLUMNS] + PAIR_COLUMNS
    template.check_columns(columns, graph.where(owner or name, "prompt"))
    graph.add_template(name, template)
    config = graph.teacher_config(stage.teacher, {})
    schema = schemas.resolve(stage.schema_, template.spec.parse, config.capabilities().structured_output,
                             graph.base_dir, graph.where(owner or name, "schema"))
    if schema is not None:
        graph.add_schema(name, schema)
    return generation_columns(graph, name, graph.columns[stage.input])


def fingerprint(graph: Graph, name: str, trained) -> dict[str, str]:
    """The template file's bytes and the teacher's backend and model (a trained student's model dir)."""
    teacher = graph.teacher_config(graph.stage(name).teacher, trained)
    parts = {"prompt": graph.templates[name].file_hash,
             "teacher": content_hash({"backend": teacher.backend, "model": teacher.model})}
    if name in graph.schemas:  # a schema file's content (an inline one is in the config too)
        parts["schema"] = content_hash(graph.schemas[name])
    return parts


def preflight(graph: Graph, name: str, trained, console, will_run: bool) -> None:
    """Before `synth run` writes anything: the teacher's API key is set and its backend can do what the
    stage asks (logprobs; ray with an online teacher), and every row of a load input renders within the
    template's limits (a row with a null value is not an error: it becomes an error row)."""
    stage: GenerateStage = graph.stage(name)
    config = graph.teacher_config(stage.teacher, trained)
    if will_run and config.backend == "hf" and config.device.startswith("cuda"):
        import torch  # an hf teacher imports it anyway; asked only of a teacher that names a GPU

        if not torch.cuda.is_available():
            key = "as_teacher.device" if stage.teacher in graph.stage_teachers else "device"
            raise SynthError(f"{graph.where(name, 'teacher')}: teacher '{stage.teacher}' asks for device "
                             f"{config.device!r} ({key}) and torch sees no CUDA GPU here; use device: auto (a GPU "
                             "when there is one, else the CPU) or cpu")
    if stage.params.logprobs is not None and not config.capabilities().logprobs:
        raise SynthError(f"{graph.where(name, 'params')}: key 'params.logprobs': teacher '{stage.teacher}' "
                         f"(backend {config.backend}) cannot return logprobs"
                         + (" (its config says logprobs: false)" if config.backend == "openai" else "")
                         + "; remove params.logprobs or use a backend that has them (hf, vllm, openai, echo)")
    if stage.params.logprobs is not None and stage.params.logprobs > MAX_API_LOGPROBS and config.backend == "openai":
        raise SynthError(f"{graph.where(name, 'params')}: key 'params.logprobs': {stage.params.logprobs} alternatives "
                         f"per token, but OpenAI-compatible APIs return at most {MAX_API_LOGPROBS} (top_logprobs); "
                         f"ask for {MAX_API_LOGPROBS} or fewer, or use an hf or vllm teacher (any k)")
    if stage.ray is not None and getattr(config, "mode", "online") == "batch":
        raise SynthError(f"{graph.where(name, 'ray')}: key 'ray': teacher '{stage.teacher}' uses mode batch, which "
                         "runs on the provider's side; remove `ray:` from the stage or use mode online")
    if isinstance(config, OpenAITeacherConfig):
        resolve_api_key(stage.teacher, config)
    if stage.input in graph.seeds and name not in graph.pairs_by:
        template = graph.templates[name]
        for row in graph.seeds[stage.input].table.to_pylist():
            try:
                template.render(row, where=f"{graph.where(name)}: input row id {row.get('id')!r}")
            except MissingValue:
                pass  # the stage sends the other rows and records this one as an error row


KIND = Kind(
    name="generate", run=run, references=references, check=check, fingerprint=fingerprint, preflight=preflight,
    estimate=estimate, teachers=lambda stage: [("teacher", [stage.teacher])],
    # budgets only let an incomplete stage go on; where requests run (ray) does not change their ids
    not_fingerprinted=frozenset({"max_cost", "max_tokens_total", "ray"}),
    later_keys={"schema_": "auto"},  # a judge's critic calls: unchanged where auto resolves to no schema
)
