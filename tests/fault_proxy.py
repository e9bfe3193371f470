"""A fault-injecting HTTP proxy for OpenAI-compatible servers, on loopback, for tests.

It forwards requests to a real upstream server (e.g. `transformers serve`) and, by rule, answers
some of them with errors instead: 429 with Retry-After, 500, or a permanent failure for requests whose
body contains a marker; or, at a random fault rate, 429, 500, answers slower than the client's
timeout, truncated JSON and dropped connections. It records every attempt (time, body hash, status) so a test can check
retries and their spacing. Runs its own event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass, field

from aiohttp import ClientSession, web

from loopback import LoopbackServer


@dataclass
class Rules:
    first_attempt_status: int | None = None  # answer the first attempt of each distinct request with this
    retry_after_s: float | None = None  # Retry-After header sent with first_attempt_status
    fail_marker: str | None = None  # requests whose body contains it always get 500
    # Random faults: each attempt is faulty with probability fault_rate, of a kind drawn by weight:
    # "429" (with Retry-After: retry_after_s or 1), "500", "slow" (answers after slow_s: past the
    # client's timeout), "truncated" (a 200 whose JSON body is cut in half), "reset" (the connection
    # is dropped without an answer). Seeded, so a run is reproducible.
    fault_rate: float = 0.0
    fault_kinds: dict[str, float] = field(default_factory=lambda: {"429": 1, "500": 1, "slow": 1, "truncated": 1,
                                                                  "reset": 1})
    slow_s: float = 5.0
    # A server-side rate limit: at most limit_requests per fixed window of limit_window_s (OpenAI's
    # shape: every answer carries x-ratelimit-limit/remaining/reset-requests; over the limit, a 429
    # with Retry-After until the window resets).
    limit_requests: int | None = None
    limit_window_s: float = 60.0
    seed: int = 0
    attempts: list[tuple[float, str, int]] = field(default_factory=list)  # (time, body hash, status)
    faults: dict[str, int] = field(default_factory=dict)  # kind -> attempts given that fault


class FaultProxy(LoopbackServer):
    def __init__(self, upstream: str, rules: Rules):
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.rules = rules
        self._rng = random.Random(rules.seed)
        self._started = time.monotonic()
        self._window = (-1, 0)  # (window index, requests admitted in it)

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
        limit_headers = {}
        if rules.limit_requests is not None:
            elapsed = time.monotonic() - self._started
            index = int(elapsed // rules.limit_window_s)
            count = self._window[1] if self._window[0] == index else 0
            reset = (index + 1) * rules.limit_window_s - elapsed
            limited = count >= rules.limit_requests
            self._window = (index, count if limited else count + 1)
            remaining = rules.limit_requests - self._window[1]
            limit_headers = {"x-ratelimit-limit-requests": str(rules.limit_requests),
                             "x-ratelimit-remaining-requests": str(remaining),
                             "x-ratelimit-reset-requests": f"{reset:.3f}s"}
            if limited:
                rules.attempts.append((time.monotonic(), digest, 429))
                return web.json_response({"error": {"message": "rate limit reached", "type": "requests"}},
                                         status=429, headers={**limit_headers, "Retry-After": str(max(int(reset), 1)),
                                                              "retry-after-ms": str(int(reset * 1000) + 1)})
        fault = None
        if status is None and rules.fault_rate and self._rng.random() < rules.fault_rate:
            kinds, weights = zip(*rules.fault_kinds.items())
            fault = self._rng.choices(kinds, weights)[0]
            rules.faults[fault] = rules.faults.get(fault, 0) + 1
            if fault in ("429", "500"):
                status = int(fault)
        rules.attempts.append((time.monotonic(), digest, status or (599 if fault else 200)))
        if fault == "reset":
            request.transport.abort()  # no answer at all: the client sees the connection drop
            raise ConnectionResetError("injected reset")
        if fault == "slow":
            await asyncio.sleep(rules.slow_s)
        if status:
            if status == 429 and not rules.retry_after_s:
                rules.retry_after_s = 1
            headers = {"Retry-After": f"{rules.retry_after_s:g}"} if rules.retry_after_s and status == 429 else {}
            return web.json_response({"error": {"message": f"injected {status}", "type": "injected"}},
                                     status=status, headers=headers)
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers={"Content-Type": request.headers.get("Content-Type",
                                                                                      "application/json")}) as up:
            payload = await up.read()
            if fault == "truncated":
                payload = payload[: len(payload) // 2]
            return web.Response(body=payload, status=up.status, content_type="application/json",
                                headers=limit_headers)

