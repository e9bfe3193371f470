"""Admission control for the `openai` teacher: how many requests may be in flight, and when.

Three mechanisms, all shared by one teacher's workers (one asyncio loop):
- AIMD concurrency (`adaptive: true`, the default): the window starts at `max_concurrency`, grows by
  about one request per window of successes (additive increase, capped at `max_concurrency`) and is
  halved on a 429, a 5xx or a timeout (multiplicative decrease, at most once per `cooldown_s` so that
  one burst of failures counts once; never below 1).
- Hard limits `rpm` / `tpm` (requests and tokens per minute), as leaky buckets (aiolimiter). A
  request's tokens are estimated before it is sent: prompt characters / 4 plus its max_tokens.
- What the server says: Retry-After pauses every worker until then; x-ratelimit-remaining-requests
  and x-ratelimit-reset-requests (OpenAI's headers, also sent by many gateways) let the limiter stop
  before the server's budget runs out instead of after, and resume when it resets.

Nothing is dropped here: a worker waits for admission; a 429 that still happens is retried by the
client with backoff (synth/teachers/http.py). AIMD is a few lines of arithmetic; no library offers it
on its own, so it is written here; the buckets come from aiolimiter.
"""

from __future__ import annotations

import asyncio
import re
import time

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def parse_reset(value: str | None) -> float | None:
    """x-ratelimit-reset-* values: "1s", "6m0s", "250ms", "1h2m3.5s", or plain seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    m = _DURATION.match(value)
    if not m or not any(m.groups()):
        return None
    h, mins, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mins * 60 + s + ms / 1000


class Limiter:
    def __init__(self, max_concurrency: int, *, adaptive: bool = True, rpm: int | None = None,
                 tpm: int | None = None, cooldown_s: float = 1.0):
        from aiolimiter import AsyncLimiter

        self.max = max_concurrency
        self.adaptive = adaptive
        self.window = float(max_concurrency)
        self.in_flight = 0
        self.cooldown_s = cooldown_s
        self._last_cut = 0.0
        self._paused_until = 0.0
        self._budget: int | None = None  # requests the server still allows, minus those sent since it said so
        self._budget_reset_at = 0.0
        self._changed = asyncio.Condition()
        self._waiting = 0  # workers inside acquire's wait loop
        # leaky buckets with a one-second burst: rpm/60 requests (tpm/60 tokens) may go at once
        self._rpm = AsyncLimiter(max(rpm / 60, 1), 1) if rpm else None
        self._tpm = AsyncLimiter(max(tpm / 60, 1), 1) if tpm else None
        self.stats = {"cuts": 0, "paused_s": 0.0, "min_window": self.window}

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one more request may go out. One asyncio loop runs every worker, so the check and
        the admission (no await between them) cannot interleave; the condition is entered only to wait."""
        if self._wait_s(time.monotonic()) is not None:
            async with self._changed:
                self._waiting += 1
                try:
                    while (wait := self._wait_s(time.monotonic())) is not None:
                        if wait > 0:
                            self.stats["paused_s"] += wait
                        try:
                            await asyncio.wait_for(self._changed.wait(), timeout=wait or None)
                        except asyncio.TimeoutError:
                            pass
                finally:
                    self._waiting -= 1
        self.in_flight += 1
        if self._budget is not None:
            self._budget -= 1
        if self._rpm is not None:
            await self._rpm.acquire()
        if self._tpm is not None and tokens:
            await self._tpm.acquire(min(tokens, self._tpm.max_rate))

    def _wait_s(self, now: float) -> float | None:
        """None: a request may go now; else how long to wait (0: until a request finishes)."""
        if self._budget is not None and now >= self._budget_reset_at:
            self._budget = None  # the server's window has reset
        wait = self._paused_until - now
        if self._budget is not None and self._budget <= 0:
            wait = max(wait, self._budget_reset_at - now)
        if wait > 0:
            return wait
        return None if self.in_flight < max(int(self.window), 1) else 0.0

    async def release(self, outcome: str, *, retry_after: float | None = None, headers=None) -> None:
        """After an attempt: outcome is "ok", or a cause ("rate_limit", "server_error", "timeout", ...)."""
        self.in_flight -= 1
        now = time.monotonic()
        if headers is not None:
            self._read_headers(headers, now)
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
        if self.adaptive:
            if outcome == "ok":
                if self.window < self.max:
                    self.window = min(self.window + 1.0 / max(self.window, 1.0), float(self.max))
            elif outcome in ("rate_limit", "server_error", "timeout") and now - self._last_cut >= self.cooldown_s:
                self.window = max(self.window / 2, 1.0)
                self._last_cut = now
                self.stats["cuts"] += 1
                self.stats["min_window"] = min(self.stats["min_window"], self.window)
        if self._waiting:
            async with self._changed:
                self._changed.notify_all()

    def _read_headers(self, headers, now: float) -> None:
        remaining = headers.get("x-ratelimit-remaining-requests")
        reset = parse_reset(headers.get("x-ratelimit-reset-requests"))
        if remaining is None or reset is None:
            return
        try:
            remaining = int(float(remaining))
        except ValueError:
            return
        # Requests already in flight were admitted against the old figure; they count against this one.
        self._budget = remaining - self.in_flight
        self._budget_reset_at = now + reset
