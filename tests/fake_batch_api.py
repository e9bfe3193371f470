"""A local fake of the OpenAI Batch API (files + batches endpoints) on loopback, for tests of the
`openai` teacher's `mode: batch` (synth/teachers/batch.py). A fake is the only option here: no
real Batch API server runs on this machine. Everything on synth's side is real (the official
openai client, the CLI, DuckDB); each line of a batch is answered by the scripted teacher's own
logic (tests/scripted_teacher.py ScriptedTeacher.response), so batch results equal what the online
scripted server would answer for the same body.

Endpoints, shaped as the openai client (3.x) expects them:
  POST /v1/files (multipart: file, purpose=batch)        GET /v1/files/{id}/content
  DELETE /v1/files/{id}                   GET /v1/models   GET /v1/models/{model}
  POST /v1/batches   GET /v1/batches/{id}   GET /v1/batches?after=&limit= (newest first)
  POST /v1/batches/{id}/cancel

A batch goes validating -> in_progress (after `delay_s`) -> finalizing -> completed once it is
released (`hold` False, or its id in `released`), answering every line at once. Knobs (plain
attributes, change them between runs): `api_key` (anything else is a 401), `models` (None: any model;
else others are 404), `fail_rate` (share of lines answered 500, written to the error file; the draw is
seeded by batch id and custom_id), `expire_lines` (answer at most this many lines of each batch, then
expire it: the rest go to the error file as `batch_expired`), `fail_validation` (the next batch fails
validation with this message), `max_enqueued` (a batch whose lines plus those of the batches in
progress exceed this fails validation with token_limit_exceeded, as OpenAI's enqueued-token limit
does), `stall_create` (POST /v1/batches creates the batch but does not answer
until `stall_create` is cleared: a client killed in that window never learns the batch id).
Counters for "no request sent twice": `batches` (every batch created, in order, with its custom_ids)
and `answered` (custom_id -> times a line was answered 200).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter

from aiohttp import web
from loopback import LoopbackServer
from scripted_teacher import ScriptedTeacher

TERMINAL = {"completed", "failed", "expired", "cancelled"}


class FakeBatchAPI(LoopbackServer):
    def __init__(self, api_key: str = "sk-test", delay_s: float = 0.05, p: float = 0.7, logprobs: bool = True):
        super().__init__()
        self.api_key, self.delay_s = api_key, delay_s
        self.models: set[str] | None = None
        self.fail_rate = 0.0
        self.expire_lines: int | None = None
        self.fail_validation: str | None = None
        self.max_enqueued: int | None = None
        self.stall_create = False
        self.hold = False
        self.released: set[str] = set()
        self.scripted = ScriptedTeacher(p=p, logprobs=logprobs)  # its reply logic only; never started
        self.files: dict[str, dict] = {}  # id -> file object + "content" bytes
        self.batches: list[dict] = []  # every batch created, oldest first; "custom_ids" added for tests
        self.answered: Counter = Counter()  # custom_id -> lines answered 200
        self.errored: dict[str, str] = {}  # custom_id -> the error code of its last error line
        self._ids = itertools.count(1)

    # ---- test helpers -------------------------------------------------------------------------

    def release(self, *batch_ids: str) -> None:
        """Let held batches finish: the named ones, or every one when none is named."""
        if batch_ids:
            self.released.update(batch_ids)
        else:
            self.hold = False

    def batch(self, batch_id: str) -> dict:
        return next(b for b in self.batches if b["id"] == batch_id)

    # ---- HTTP ---------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app._client_max_size = 256 * 2**20  # batch input files are large (aiohttp's default is 1 MiB)
        app.middlewares.append(self._auth)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_delete("/v1/files/{id}", self._delete_file)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return await handler(request)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("purpose") != "batch":
            return _error(400, f"purpose must be batch, got {form.get('purpose')!r}")
        upload = form["file"]
        content = upload.file.read()
        return web.json_response(self._add_file(content, upload.filename, "batch"))

    def _add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        fid = self._new_id("file")
        obj = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[fid] = {**obj, "content": content}
        return obj

    async def _content(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["id"])
        if f is None:
            return _error(404, "No such File object", code="not_found")
        return web.Response(body=f["content"], content_type="application/octet-stream")

    async def _delete_file(self, request: web.Request) -> web.Response:
        fid = request.match_info["id"]
        self.files.pop(fid, None)
        return web.json_response({"id": fid, "object": "file", "deleted": True})

    async def _models(self, request: web.Request) -> web.Response:
        models = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in sorted(self.models or ())]
        return web.json_response({"object": "list", "data": models})

    async def _model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if self.models is not None and model not in self.models:
            return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                          code="model_not_found")
        return web.json_response({"id": model, "object": "model", "created": 0, "owned_by": "fake"})

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        f = self.files.get(body.get("input_file_id"))
        if f is None:
            return _error(400, f"input_file_id {body.get('input_file_id')!r} does not exist")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        lines = [json.loads(x) for x in f["content"].decode().splitlines() if x.strip()]
        now = int(time.time())
        batch = {"id": self._new_id("batch"), "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": f["id"], "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                 "metadata": body.get("metadata")}
        self.batches.append({**batch, "custom_ids": [x["custom_id"] for x in lines]})
        asyncio.get_running_loop().create_task(self._process(batch["id"], lines))
        while self.stall_create:  # the batch exists; its creator does not hear about it yet
            await asyncio.sleep(0.05)
        return web.json_response(self._public(batch["id"]))

    async def _list(self, request: web.Request) -> web.Response:
        limit = min(int(request.query.get("limit", 20)), 100)
        newest_first = [b["id"] for b in reversed(self.batches)]
        after = request.query.get("after")
        start = newest_first.index(after) + 1 if after in newest_first else 0
        page = newest_first[start:start + limit]
        return web.json_response({"object": "list", "data": [self._public(i) for i in page],
                                  "first_id": page[0] if page else None, "last_id": page[-1] if page else None,
                                  "has_more": start + limit < len(newest_first)})

    async def _retrieve(self, request: web.Request) -> web.Response:
        if not any(b["id"] == request.match_info["id"] for b in self.batches):
            return _error(404, "No such batch", code="not_found")
        return web.json_response(self._public(request.match_info["id"]))

    async def _cancel(self, request: web.Request) -> web.Response:
        b = self.batch(request.match_info["id"])
        if b["status"] in TERMINAL:
            return _error(409, f"Cannot cancel a batch with status {b['status']}.")
        b["status"], b["cancelling_at"] = "cancelling", int(time.time())
        return web.json_response(self._public(b["id"]))

    def _public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batch(batch_id).items() if k != "custom_ids"}

    # ---- the batch's life ---------------------------------------------------------------------

    async def _process(self, batch_id: str, lines: list[dict]) -> None:
        b = self.batch(batch_id)
        await asyncio.sleep(self.delay_s)
        if self.fail_validation:
            message, self.fail_validation = self.fail_validation, None
            b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "invalid_request", "message": message, "param": None, "line": 1}]})
            return
        running = sum(len(o["custom_ids"]) for o in self.batches if o["status"] in ("in_progress", "finalizing"))
        if self.max_enqueued is not None and b["status"] == "validating" and running + len(lines) > self.max_enqueued:
            b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "token_limit_exceeded", "param": None, "line": None, "message": (
                    f"Enqueued token limit reached for {lines[0]['body']['model']}. Limit: {self.max_enqueued} "
                    "enqueued requests. Please try again once some in_progress batches have been completed.")}]})
            return
        if b["status"] == "validating":
            b.update(status="in_progress", in_progress_at=int(time.time()))
        while self.hold and batch_id not in self.released and b["status"] == "in_progress":
            await asyncio.sleep(0.02)
        expire_after = self.expire_lines
        out, err = [], []
        for n, line in enumerate(lines):
            cid = line["custom_id"]
            if b["status"] == "cancelling" or expire_after is not None and n >= expire_after:
                code = "batch_cancelled" if b["status"] == "cancelling" else "batch_expired"
                err.append(self._line(cid, None, {"code": code, "message": "This request could not be executed "
                                                  "before the batch ended."}))
                self.errored[cid] = code
            elif random.Random(f"{batch_id}:{cid}").random() < self.fail_rate:
                err.append(self._line(cid, {"status_code": 500, "request_id": f"req-{n}", "body": {"error": {
                    "message": "The server had an error processing your request.", "type": "server_error",
                    "param": None, "code": None}}}, None))
                self.errored[cid] = "server_error"
            else:
                body = self.scripted.response(line["body"])
                out.append(self._line(cid, {"status_code": 200, "request_id": f"req-{n}", "body": body}, None))
                self.answered[cid] += 1
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        if out:
            b["output_file_id"] = self._add_file(_jsonl(out), f"{batch_id}_output.jsonl", "batch_output")["id"]
        if err:
            b["error_file_id"] = self._add_file(_jsonl(err), f"{batch_id}_error.jsonl", "batch_output")["id"]
        now = int(time.time())
        if b["status"] == "cancelling":
            b.update(status="cancelled", cancelled_at=now)
        elif expire_after is not None and expire_after < len(lines):
            b.update(status="expired", expired_at=now)
        else:
            b.update(status="completed", finalizing_at=now, completed_at=now)

    def _line(self, custom_id: str, response: dict | None, error: dict | None) -> dict:
        return {"id": self._new_id("batch_req"), "custom_id": custom_id, "response": response, "error": error}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": code}},
                             status=status)
