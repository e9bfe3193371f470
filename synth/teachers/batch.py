"""The `openai` teacher's `mode: batch`: the OpenAI Batch API (about half the price of online calls;
results within `completion_window`), through the official `openai` client.

How a generate stage's requests travel:
1. Requests are grouped by sampling params and cut into JSONL files of at most `batch_max_requests`
   lines and MAX_FILE_BYTES (the API takes up to 50,000 lines and 200 MB per file). Each line is
   {custom_id: request id, method: POST, url: /v1/chat/completions, body: the online body}.
2. Each file is uploaded; its row in synth.batches is written (status 'uploaded') BEFORE the batch
   is created; the batch is then created (metadata: synth_stage / synth_teacher / synth_run) and the
   row gets its batch id. Every record is its own short write transaction.
3. Every `poll_interval_s` all open batches are retrieved; status changes and request counts go to
   synth.batches. When a batch ends, its output and error files are downloaded and every request it
   carried becomes exactly one Completion: its answer, or the line's error (cause rate_limit,
   server_error, context_length, bad_request, batch_expired, batch_cancelled, ...), or, with no line
   at all, `batch_<status>` (a batch that failed validation: `batch_failed` with the server's
   message). Errors are not cached, so the next run sends exactly those again.

Restart rule (kill -9, Ctrl-C, a crash, or simply the next `synth run`): the completions table is
the cache, and synth.batches records only facts about the server's batches, never "ingested". A
request passed to generate() has no completion yet; it is taken by the first recorded batch (same
model and endpoint, any stage, same params) that can still answer it:
- an ended batch whose results were read answers it iff the request is not in its unanswered_ids:
  its output file is downloaded again and the answer yielded (the run that read it died before the
  completion was committed; the cache's insert-or-ignore makes a double delivery harmless);
- an ended batch not read yet (the run died between the status change and the download) is read now;
- an open batch (validating, in_progress, finalizing, cancelling) is polled again, never resubmitted;
- a row still 'uploaded' (the run died while creating the batch): the batches list is searched for
  one made from that input file and adopted; if there is none, the batch was never created, the row
  becomes 'abandoned' and its requests are submitted afresh.
Answers already in the cache are never asked for, so a batch whose results are all committed is
simply not open any more. An "ingested" flag could not be written in the same transaction as the
completions (stages/generate.py commits those), so it could only be wrong in one direction or the other;
the cache is never wrong. What is read again from an ended batch yields only answers: its failed
and expired requests are submitted afresh in the same run.

stop() (a budget was reached): no new batch is submitted, and the open ones are cancelled (the Batch
API charges only the requests it completed; a cancelled batch returns those, which are kept, and its
unfinished requests come back as `batch_cancelled` errors that a re-run with a larger budget sends
again). close() (end of stage, Ctrl-C) cancels nothing: a re-run resumes polling.

401/403 anywhere, or a model the server does not know (checked before anything is uploaded), is a
SynthError: no request can succeed. Progress is logged (logger "synth", INFO: batch ids, status
changes); nothing is printed.

Use: a teacher `{backend: openai, model: gpt-4o-mini, mode: batch, api_key_env: OPENAI_API_KEY}` in the
pipeline file, then `synth run pipeline.yaml` (again after an interruption); `synth sql pipeline.yaml
"select * from synth.batches"` shows each batch. Tests: tests/test_batch_api.py (a local fake server).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from synth.errors import SynthError
from synth.secrets import scrub
from synth.teachers.base import POLICY_CAUSES, Completion, OpenAITeacherConfig, Request, TeacherBase
from synth.teachers.http import http_cause, parse_logprobs, reasoning_of, request_body
from synth.teachers.openai import _short, error_cause, resolve_api_key

log = logging.getLogger("synth")

ENDPOINT = "/v1/chat/completions"
MAX_FILE_BYTES = 190_000_000  # the Batch API takes input files up to 200 MB; a margin for multipart framing
OPEN = {"validating", "in_progress", "finalizing", "cancelling"}
ENDED = {"completed", "failed", "expired", "cancelled"}
# synth's own states of a row: file uploaded, batch not created yet; never created (its requests were
# submitted again); creation refused by the server; not found at the endpoint any more
UPLOADED, ABANDONED, REFUSED, LOST = "uploaded", "abandoned", "refused", "lost"
QUEUE_RETRIES = 3  # submissions of requests refused for a full queue while none of ours runs
TRANSFER_TIMEOUT_S = 600.0  # uploads and downloads of files up to 200 MB


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


@dataclass
class _Batch:
    """One row of synth.batches, and the requests of this generate() call it answers (`assigned`)."""
    input_file_id: str
    batch_id: str | None
    status: str
    params: str  # params_key of every request in it
    request_ids: list[str]
    unanswered: set[str] | None = None  # None: its results were not read yet
    output_file_id: str | None = None
    error_file_id: str | None = None
    recorded_at: datetime | None = None
    submitted_at: datetime | None = None
    counts: dict | None = None
    assigned: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return self.batch_id or self.input_file_id


class BatchTeacher(TeacherBase):
    def __init__(self, name: str, config: OpenAITeacherConfig, base_dir: Path):
        self.name, self.config, self.model = name, config, config.model
        self.capabilities = config.capabilities()
        self.api_key = resolve_api_key(name, config)
        self.store = self.stage = self.run_id = None
        self._stop = threading.Event()
        self._client = None
        self._todo: dict[str, Request] = {}
        # on_idle (assigned by the generate stage) is called before each wait between polls, which can last
        # hours: the caller commits what it holds then, instead of when the next batch's results arrive

    def bind(self, store, stage_name: str, run_id: str) -> None:
        """The store records the batches (resume after a crash); without it nothing is recorded."""
        self.store, self.stage, self.run_id = store, stage_name, run_id

    def stop(self) -> None:
        self._stop.set()  # checked between submissions and at each poll: no new batch, open ones cancelled

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self):
        if self._client is None:
            import openai
            self._client = openai.OpenAI(base_url=self.config.base_url, api_key=self.api_key,
                                         max_retries=self.config.max_retries, timeout=self.config.timeout_s)
        return self._client

    @property
    def endpoint(self) -> str:
        return str(self.client.base_url).rstrip("/")

    # ---- the Teacher protocol ------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        self._todo = {r.id: r for r in requests}
        if not self._todo:
            return
        self._stop.clear()
        batches = self._adopt()
        taken = set().union(*(b.assigned for b in batches)) if batches else set()
        # 1. batches that ended before this call: their answers (already paid for) are yielded now;
        #    what they did not answer is submitted again below
        open_batches = [b for b in batches if b.status not in ENDED]
        for b in [b for b in batches if b.status in ENDED]:
            before = set(b.assigned)
            completions = self._read(b, final=False)
            if completions is None:  # its file could not be downloaded now: read it while polling
                open_batches.append(b)
                continue
            taken -= before - b.assigned
            yield from completions
        # 2. the rest, in new batches
        fresh = [r for r in self._todo.values() if r.id not in taken]
        if fresh and not self._stop.is_set():
            open_batches += self._submit(fresh)
        # 3. poll until every open batch has ended and been read
        yield from self._poll(open_batches)

    # ---- adopting what earlier runs submitted ----------------------------------------------------

    def _adopt(self) -> list[_Batch]:
        """The recorded batches that answer some of the requests, each with its `assigned` share."""
        batches = [b for b in self._load() if not self._todo.keys().isdisjoint(b.request_ids)]
        uploaded = [b for b in batches if b.status == UPLOADED]
        if uploaded:
            self._resolve_uploaded(uploaded)
        batches = [b for b in batches if b.status in OPEN | ENDED]
        rejected = self._rejected()
        taken: set[str] = set()
        # ended batches first (answers already paid for), then open ones; oldest first within each
        for b in sorted(batches, key=lambda b: (b.status not in ENDED, b.recorded_at or datetime.min)):
            can = set(b.request_ids) - (b.unanswered or set()) - taken
            # an answer of this batch that the stage rejected by a policy (refusal, cut at max_tokens,
            # content filter) is asked again in a new batch, not read again from this one
            can = {i for i in can if not (i in rejected and b.submitted_at and rejected[i] >= b.submitted_at)}
            b.assigned = {i for i in can if i in self._todo and params_key(self._todo[i].params) == b.params}
            taken |= b.assigned
        adopted = [b for b in batches if b.assigned]
        for b in adopted:
            log.info("teacher %s: batch %s (%s) from an earlier run answers %d requests", self.name, b.label,
                     b.status, len(b.assigned))
        return adopted

    def _rejected(self) -> dict[str, datetime]:
        """Request id -> when the stage last recorded an answer of it as rejected by a policy."""
        if self.store is None or not self.store.exists():
            return {}
        with self.store.read() as con:
            return dict(con.execute(
                f"SELECT request_id, max(created_at) FROM synth.errors WHERE stage = ? AND cause IN "
                f"({', '.join('?' * len(POLICY_CAUSES))}) GROUP BY 1", [self.stage, *POLICY_CAUSES]).fetchall())

    def _load(self) -> list[_Batch]:
        if self.store is None or not self.store.exists():
            return []
        with self.store.read() as con:
            rows = con.execute(
                "SELECT input_file_id, batch_id, status, params, request_ids, unanswered_ids, output_file_id, "
                "error_file_id, updated_at, submitted_at FROM synth.batches WHERE model = ? AND endpoint = ? AND "
                "status NOT IN (?, ?, ?) ORDER BY updated_at",
                [self.model, self.endpoint, ABANDONED, REFUSED, LOST]).fetchall()
        return [_Batch(fid, bid, status, params_key(json.loads(params)), json.loads(ids),
                       set(json.loads(unanswered)) if unanswered is not None else None, out, err, at, submitted)
                for fid, bid, status, params, ids, unanswered, out, err, at, submitted in rows]

    def _resolve_uploaded(self, uploaded: list[_Batch]) -> None:
        """Rows whose batch creation was cut short: adopt the batch made from their file, if any."""
        wanted = {b.input_file_id: b for b in uploaded}
        oldest = min(b.recorded_at or datetime.min for b in uploaded)
        for server in self._batches_since(oldest):
            b = wanted.pop(server.input_file_id, None)
            if b is not None:
                log.info("teacher %s: found batch %s, created from %s before the last run stopped", self.name,
                         server.id, b.input_file_id)
                self._created(b, server)
            if not wanted:
                return
        for b in wanted.values():  # never created: its requests go into new batches
            b.status = ABANDONED
            self._update(b, status=ABANDONED)
            try:
                with self._fatal_errors():
                    self.client.files.delete(b.input_file_id)
            except Exception:  # noqa: BLE001 - an orphan file costs nothing and expires on its own
                pass

    def _batches_since(self, oldest: datetime) -> Iterator:
        """The server's batches, newest first, down to an hour before `oldest` (clock skew). Without
        this list synth cannot know whether a recorded file already has its batch: it stops rather
        than risk submitting the same requests twice."""
        import openai

        limit = oldest.replace(tzinfo=timezone.utc).timestamp() - 3600 if oldest != datetime.min else 0
        try:
            with self._fatal_errors():
                for server in self.client.batches.list(limit=100):  # the client follows `after` pages
                    if server.created_at < limit:
                        return
                    yield server
        except openai.APIError as exc:
            raise SynthError(f"teacher '{self.name}': could not list the server's batches ({error_cause(exc)}: "
                             f"{_short(exc)}); re-run to continue") from None

    # ---- submitting --------------------------------------------------------------------------------

    def _submit(self, requests: list[Request]) -> list[_Batch]:
        self._check_model()
        groups: dict[str, list[Request]] = {}
        for r in requests:  # one params set per batch, so that adoption can compare them exactly
            groups.setdefault(params_key(r.params), []).append(r)
        submitted = []
        with tempfile.TemporaryDirectory(prefix="synth-batch-") as tmp:
            for g, (key, group) in enumerate(groups.items()):
                for chunk, path in self._files(group, Path(tmp), prefix=f"{g}-"):
                    if self._stop.is_set():
                        return submitted
                    submitted.append(self._upload_and_create(key, chunk, path))
        return submitted

    def _files(self, requests: list[Request], tmp: Path, prefix: str = "") -> Iterator[tuple[list[Request], Path]]:
        """JSONL files of at most batch_max_requests lines and MAX_FILE_BYTES bytes."""
        chunk: list[Request] = []
        size, n = 0, 0
        out = None
        for r in requests:
            body = request_body(self.model, r, self.config)  # the online body, logprobs / top_logprobs included
            line = (json.dumps({"custom_id": r.id, "method": "POST", "url": ENDPOINT, "body": body},
                               ensure_ascii=False) + "\n").encode()
            if chunk and (len(chunk) >= self.config.batch_max_requests or size + len(line) > MAX_FILE_BYTES):
                out.close()
                yield chunk, tmp / f"{prefix}{n}.jsonl"
                chunk, size, n = [], 0, n + 1
            if not chunk:
                out = open(tmp / f"{prefix}{n}.jsonl", "wb")
            out.write(line)
            chunk.append(r)
            size += len(line)
        if chunk:
            out.close()
            yield chunk, tmp / f"{prefix}{n}.jsonl"

    def _upload_and_create(self, key: str, chunk: list[Request], path: Path) -> _Batch:
        import openai

        name = f"synth-{self.stage or self.name}-{path.stem}.jsonl"
        client = self.client.with_options(timeout=max(TRANSFER_TIMEOUT_S, self.config.timeout_s))
        try:
            with self._fatal_errors(), open(path, "rb") as fh:
                uploaded = client.files.create(file=(name, fh, "application/jsonl"), purpose="batch")
        except openai.APIError as exc:  # nothing of this file was recorded; what was submitted before is
            raise SynthError(f"teacher '{self.name}': uploading a batch file failed ({error_cause(exc)}: "
                             f"{_short(exc)}); re-run to continue") from None
        finally:
            path.unlink(missing_ok=True)  # up to 200 MB each: not kept until every file is uploaded
        b = _Batch(uploaded.id, None, UPLOADED, key, [r.id for r in chunk], recorded_at=_now())
        self._insert(b)  # before the batch exists: a restart finds the batch made from this file
        server = self._create_batch(b)
        self._created(b, server)
        log.info("teacher %s: batch %s submitted (%d requests, file %s)", self.name, server.id, len(chunk),
                 b.input_file_id)
        b.assigned = set(b.request_ids)
        return b

    def _create_batch(self, b: _Batch):
        """POST /batches, without the client's blind retries: after a timeout or a 5xx the batch may
        exist, so it is looked for (by input file) before asking again, never created twice."""
        import openai

        metadata = {"synth_stage": str(self.stage or ""), "synth_teacher": self.name,
                    "synth_run": str(self.run_id or ""), "synth_requests": str(len(b.request_ids))}
        client = self.client.with_options(max_retries=0)
        for attempt in range(self.config.max_retries + 1):
            try:
                with self._fatal_errors():
                    return client.batches.create(input_file_id=b.input_file_id, endpoint=ENDPOINT,
                                                 completion_window=self.config.completion_window, metadata=metadata)
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
                found = next((s for s in self._batches_since(b.recorded_at) if s.input_file_id == b.input_file_id),
                             None)
                if found is not None:
                    return found
                if attempt == self.config.max_retries:
                    raise SynthError(f"teacher '{self.name}': could not create a batch ({error_cause(exc)}: "
                                     f"{_short(exc)}); re-run to continue (file {b.input_file_id} is "
                                     "recorded)") from None
                time.sleep(min(0.5 * 2 ** attempt, 8.0) * (0.75 + random.random() * 0.5))
            except openai.APIStatusError as exc:  # refused: nothing was created
                b.status = REFUSED
                self._update(b, status=REFUSED, detail=json.dumps({"error": _short(exc)}))
                raise SynthError(f"teacher '{self.name}': the Batch API refused to create a batch "
                                 f"({_short(exc)}); check completion_window and the teacher's settings") from None

    def _created(self, b: _Batch, server) -> None:
        b.batch_id = server.id
        self._refresh(b, server, batch_id=server.id, submitted_at=_now())

    def _refresh(self, b: _Batch, server, **columns) -> None:
        """Record what the server says about b (status, result files, request counts)."""
        b.status, b.counts = server.status, _counts(server)
        b.output_file_id, b.error_file_id = server.output_file_id, server.error_file_id
        self._update(b, status=server.status, output_file_id=server.output_file_id,
                     error_file_id=server.error_file_id, detail=json.dumps(_detail(server)), **columns)

    def _check_model(self) -> None:
        """A model the server does not know fails every request: say so before uploading anything.
        A 404 from GET /models/{model} is confirmed against GET /models, since some compatible
        servers only implement the list; without either, the batch's own validation will tell."""
        import openai

        try:
            with self._fatal_errors():
                self.client.models.retrieve(self.model)
            return
        except openai.NotFoundError as exc:
            missing = _short(exc)
        except openai.APIError:
            return
        try:
            with self._fatal_errors():
                known = [m.id for m in self.client.models.list()]
        except openai.APIError:
            return
        if known and self.model not in known:
            raise SynthError(f"teacher '{self.name}': model {self.model!r} not found at {self.endpoint} ({missing}); "
                             f"check the teacher's model") from None

    # ---- polling and reading results -----------------------------------------------------------------

    def _poll(self, batches: list[_Batch]) -> Iterator[Completion]:
        """Poll until every batch has ended and been read. A batch refused because the server's queue
        for the model is full (token_limit_exceeded: "try again once some in_progress batches have
        been completed") waits, and its requests are submitted again each time another batch ends,
        so a job larger than the account's enqueued-token limit runs through in one `synth run`. With
        none of ours running (the queue is full of other work) they are tried QUEUE_RETRIES more
        times, one poll apart, and then become batch_failed errors for the next run."""
        import openai

        cancelled = False
        waiting: dict[str, str] = {}  # request id -> why it waits for the queue
        retries = 0
        while batches or waiting:
            ended = False  # a batch of ours ended and was read in this round: its place in the queue is free
            if self._stop.is_set() and not cancelled:
                cancelled = True
                for b in batches:
                    self._cancel(b)
            for b in list(batches):
                try:
                    with self._fatal_errors():
                        server = self.client.batches.retrieve(b.batch_id)
                except openai.NotFoundError as exc:  # another project's key, or deleted: it cannot be read here
                    log.warning("teacher %s: batch %s is not found at %s (%s); its requests are sent again by "
                                "the next run", self.name, b.label, self.endpoint, _short(exc))
                    b.status = LOST
                    self._update(b, status=LOST)
                    batches.remove(b)
                    yield from (Completion(i, error="batch_not_found", error_message=f"batch {b.label}: {_short(exc)}")
                                for i in b.assigned)
                    continue
                except openai.APIError as exc:  # the client retried already; a blip must not end a day's wait
                    log.warning("teacher %s: batch %s: status check failed (%s: %s); trying again in %gs",
                                self.name, b.label, error_cause(exc), _short(exc), self.config.poll_interval_s)
                    continue
                counts = _counts(server)
                if server.status != b.status or counts != b.counts:
                    log.info("teacher %s: batch %s %s (%s)", self.name, b.label, server.status,
                             ", ".join(f"{k} {v}" for k, v in counts.items()))
                    self._refresh(b, server)
                if server.status not in ENDED:
                    continue
                if _queue_full(server) and not self._stop.is_set():
                    log.info("teacher %s: batch %s: the server's queue for the model is full; its %d requests "
                             "wait for a running batch to end", self.name, b.label, len(b.assigned))
                    b.unanswered = set(b.request_ids)
                    self._update(b, unanswered_ids=json.dumps(sorted(b.unanswered)))
                    waiting.update(dict.fromkeys(b.assigned, _batch_error(b, server)[1]))
                    batches.remove(b)
                    continue
                completions = self._read(b, final=True, server=server)
                if completions is None:
                    continue  # a download failed: the batch stays open here and is read at the next poll
                batches.remove(b)
                ended = True
                yield from completions
            if waiting and not self._stop.is_set() and (ended or not any(b.status in OPEN for b in batches)):
                retries = 0 if ended else retries + 1
                if retries <= QUEUE_RETRIES:
                    if retries:
                        time.sleep(self.config.poll_interval_s)
                    batches += self._submit([self._todo[i] for i in waiting])
                    waiting.clear()
            if waiting and (self._stop.is_set() or retries > QUEUE_RETRIES):
                # the queue never freed, or the stage was stopped: errors, which the next run sends again
                yield from (Completion(i, error="batch_failed", error_message=m) for i, m in waiting.items())
                waiting.clear()
            if batches:
                self.on_idle()
                time.sleep(self.config.poll_interval_s)

    def _cancel(self, b: _Batch) -> None:
        import openai

        if b.status == "cancelling" or b.status in ENDED:
            return
        try:
            with self._fatal_errors():
                self.client.batches.cancel(b.batch_id)
            log.info("teacher %s: batch %s cancelled (the stage was stopped)", self.name, b.label)
        except openai.APIError as exc:  # it ended meanwhile: its results are read as usual
            log.info("teacher %s: batch %s could not be cancelled (%s)", self.name, b.label, _short(exc))

    def _read(self, b: _Batch, final: bool, server=None) -> list[Completion] | None:
        """The Completions of b's assigned requests. final: the batch ended during this call, so each
        assigned request gets one (its answer, its error line, or batch_<status>); otherwise only
        answers, and `b.assigned` shrinks to them (the rest are submitted again). None when a file
        could not be downloaded (try again later)."""
        found: dict[str, Completion] = {}
        answered: set[str] = set()
        for file_id in (b.output_file_id, b.error_file_id if final else None):
            if not file_id:
                continue
            lines = self._download(file_id)
            if lines is None:
                return None
            for line in lines:
                rid = line.get("custom_id")
                if rid not in b.assigned:  # another stage's, or already cached: only whether it was answered
                    if _answered(line):
                        answered.add(rid)
                    continue
                c = self._completion(line, self._todo[rid])
                if c.ok:
                    answered.add(rid)
                if c.ok or rid not in found:
                    found[rid] = c
        if b.unanswered is None or final:
            b.unanswered = set(b.request_ids) - answered
            # a fact about the server's output, independent of what stages/generate.py has committed yet
            self._update(b, unanswered_ids=json.dumps(sorted(b.unanswered)))
        if not final:
            b.assigned = {i for i in b.assigned if i in found and found[i].ok}
            return [found[i] for i in b.assigned]
        missing = _batch_error(b, server)
        return [found.get(i) or Completion(i, error=missing[0], error_message=missing[1]) for i in b.assigned]

    def _download(self, file_id: str) -> Iterator[dict] | None:
        """The lines of a result file, streamed through a temporary file (results can be 200 MB+)."""
        import openai

        tmp = tempfile.NamedTemporaryFile(prefix="synth-batch-", suffix=".jsonl", delete=False)
        tmp.close()
        path = Path(tmp.name)
        try:
            with self._fatal_errors():
                client = self.client.with_options(timeout=max(TRANSFER_TIMEOUT_S, self.config.timeout_s))
                with client.files.with_streaming_response.content(file_id) as response:
                    response.stream_to_file(path)
        except openai.NotFoundError:  # expired (batch files live 30 days): its requests count as unanswered
            log.warning("teacher %s: result file %s is gone from the server", self.name, file_id)
            path.unlink(missing_ok=True)
            return []
        except openai.APIError as exc:
            log.warning("teacher %s: downloading %s failed (%s: %s); trying again later", self.name, file_id,
                        error_cause(exc), _short(exc))
            path.unlink(missing_ok=True)
            return None
        return _lines(path)

    def _completion(self, line: dict, request: Request) -> Completion:
        """One result line of `request` as a Completion: its answer or its error."""
        rid = request.id
        response = line.get("response") or {}
        status = response.get("status_code")
        body = response.get("body")
        if line.get("error") or status != 200:
            error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
            message = (scrub(str(error["message"])) if error.get("message")
                       else scrub(json.dumps(body))[:300] if body else "no response")
            cause = _line_cause(status, error.get("code"), message)
            return Completion(rid, error=cause, error_message=(f"HTTP {status}: " if status else "") + message[:500])
        try:
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            reasoning, reasoning_tokens = reasoning_of(choice["message"], usage)
            return Completion(rid, text=choice["message"].get("content") or "",
                              finish_reason=choice.get("finish_reason"), prompt_tokens=usage.get("prompt_tokens"),
                              completion_tokens=usage.get("completion_tokens"), reasoning=reasoning,
                              reasoning_tokens=reasoning_tokens,
                              logprobs=parse_logprobs(self.name, request, choice))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            return Completion(rid, error="malformed_response", error_message=scrub(f"{type(exc).__name__}: {exc}"))

    # ---- the store ---------------------------------------------------------------------------------

    def _insert(self, b: _Batch) -> None:
        if self.store is None:
            return
        with self.store.write(threads=1) as con:
            con.execute("INSERT INTO synth.batches (input_file_id, batch_id, stage, teacher, model, endpoint, params, "
                        "request_ids, requests, status, run_id, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [b.input_file_id, b.batch_id, self.stage, self.name, self.model, self.endpoint, b.params,
                         json.dumps(b.request_ids), len(b.request_ids), b.status, self.run_id, b.recorded_at])

    def _update(self, b: _Batch, **columns) -> None:
        if self.store is None:
            return
        columns["updated_at"] = _now()
        with self.store.write(threads=1) as con:
            con.execute(f"UPDATE synth.batches SET {', '.join(f'{k} = ?' for k in columns)} WHERE input_file_id = ?",
                        [*columns.values(), b.input_file_id])

    @contextlib.contextmanager
    def _fatal_errors(self):
        """401/403 from any Batch API call: no request can succeed; one line for the user."""
        import openai

        try:
            yield
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise SynthError(f"teacher '{self.name}': the server refused the API key ({_short(exc)}); check "
                             f"{self.config.api_key_env or 'OPENAI_API_KEY'}") from None


# ---- result lines ----------------------------------------------------------------------------------

def _lines(path: Path) -> Iterator[dict]:
    """A result file's lines. A line that is not JSON (a corrupt or cut file) is skipped with a warning:
    its request then counts as unanswered by the batch, becomes an error row, and a re-run sends it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except ValueError:
                    log.warning("batch result file line %d is not JSON (%r...); its request counts as unanswered",
                                number, scrub(text)[:80])
                    continue
                if isinstance(line, dict):
                    yield line
    finally:
        path.unlink(missing_ok=True)


def _answered(line: dict) -> bool:
    return not line.get("error") and (line.get("response") or {}).get("status_code") == 200


def _line_cause(status: int | None, code: str | None, message: str) -> str:
    """The cause code of a failed line: the same codes as the online teacher (synth/teachers/http.py)."""
    if code in ("batch_expired", "batch_cancelled"):
        return code
    return http_cause(status, message) if status is not None else code or "api_error"


def _batch_error(b: _Batch, server) -> tuple[str, str]:
    """(cause, message) for a request an ended batch returned no line for."""
    status = server.status if server is not None else b.status
    errors = getattr(getattr(server, "errors", None), "data", None) or []
    detail = scrub("; ".join(f"{e.code or 'error'}: {e.message}" + (f" (line {e.line})" if e.line else "")
                             for e in errors[:3]))
    if status == "completed":
        return "missing_result", f"batch {b.label} completed without a line for this request"
    return f"batch_{status}", f"batch {b.label} {status}" + (f": {detail}" if detail else " before answering it")


def _queue_full(server) -> bool:
    """The batch failed only because the account's enqueued-token limit for the model was reached."""
    errors = (server.errors.data or []) if server.status == "failed" and server.errors else []
    return bool(errors) and all(e.code == "token_limit_exceeded" for e in errors)


def _counts(server) -> dict:
    rc = server.request_counts
    return {"completed": rc.completed, "failed": rc.failed, "total": rc.total} if rc else {}


def _detail(server) -> dict:
    errors = (server.errors.data or []) if server.errors else []
    return {"request_counts": _counts(server), "created_at": server.created_at, "expires_at": server.expires_at,
            "errors": [{"code": e.code, "message": scrub(e.message), "line": e.line} for e in errors[:20]]}


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
