"""A fault-injecting HTTP proxy for OpenAI-compatible servers, on loopback, for tests.

It forwards requests to a real upstream server (e.g. `transformers serve`) and, by rule, answers
some of them with errors instead: 429 with Retry-After, 500, or a permanent failure for requests whose
body contains a marker. It records every attempt (time, body hash, status) so a test can check
retries and their spacing. Runs its own event loop in a background thread.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from aiohttp import ClientSession, web

from loopback import LoopbackServer


@dataclass
class Rules:
    first_attempt_status: int | None = None  # answer the first attempt of each distinct request with this
    retry_after_s: float | None = None  # Retry-After header sent with first_attempt_status
    fail_marker: str | None = None  # requests whose body contains it always get 500
    attempts: list[tuple[float, str, int]] = field(default_factory=list)  # (time, body hash, status)


class FaultProxy(LoopbackServer):
    def __init__(self, upstream: str, rules: Rules):
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.rules = rules

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def startup(self) -> None:
        self._session = ClientSession()  # must be created inside the running loop

    async def cleanup(self) -> None:
        await self._session.close()

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

