"""A fault-injecting HTTP proxy for OpenAI-compatible servers, on loopback, for tests.

It forwards requests to a real upstream server (e.g. `transformers serve`) and, by rule, answers
some of them with errors instead: 429 with Retry-After, 500, or a permanent failure for requests whose
body contains a marker. It records every attempt (time, body hash, status) so a test can check
retries and their spacing. Runs its own event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import dataclass, field

from aiohttp import ClientSession, web


@dataclass
class Rules:
    first_attempt_status: int | None = None  # answer the first attempt of each distinct request with this
    retry_after_s: float | None = None  # Retry-After header sent with first_attempt_status
    fail_marker: str | None = None  # requests whose body contains it always get 500
    attempts: list[tuple[float, str, int]] = field(default_factory=list)  # (time, body hash, status)


class FaultProxy:
    def __init__(self, upstream: str, rules: Rules):
        self.upstream = upstream.rstrip("/")
        self.rules = rules
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        assert self._ready.wait(30), "proxy did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._session = self._loop.run_until_complete(_make_session())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._session.close())
        self._loop.run_until_complete(runner.cleanup())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        digest = hashlib.sha256(body).hexdigest()[:16]
        rules = self.rules
        seen = any(h == digest for _, h, _ in rules.attempts)
        status = None
        if rules.fail_marker and rules.fail_marker.encode() in body:
            status = 500
        elif rules.first_attempt_status and not seen:
            status = rules.first_attempt_status
        rules.attempts.append((time.monotonic(), digest, status or 200))
        if status:
            headers = {"Retry-After": f"{rules.retry_after_s:g}"} if rules.retry_after_s and status == 429 else {}
            return web.json_response({"error": {"message": f"injected {status}", "type": "injected"}},
                                     status=status, headers=headers)
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers={"Content-Type": request.headers.get("Content-Type",
                                                                                      "application/json")}) as up:
            return web.Response(body=await up.read(), status=up.status, content_type="application/json")


async def _make_session() -> ClientSession:
    return ClientSession()  # must be created inside the running loop
