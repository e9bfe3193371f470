"""A minimal OpenAI-compatible chat server for benchmarks: answers every request with a fixed short
completion after an artificial latency, so that the client, not the server, is what gets measured.

    python bench/_stub_server.py --port 8000 [--latency-ms 20]

Endpoints:
- POST /v1/chat/completions  a chat.completion with realistic `usage` (prompt tokens ~ chars / 4);
- GET  /v1/models, GET /health;
- GET  /stats   {"requests": count, "digest": order-independent hash of the request bodies} since the
  last POST /reset, so a benchmark can check that two clients sent exactly the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time

from aiohttp import web

COMPLETION = "Add the two numbers: the sum is 42. The answer is \\boxed{42}."
COMPLETION_TOKENS = 16


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.digest = 0  # sum of the bodies' hashes mod 2**128: independent of arrival order

    def add(self, body: dict) -> None:
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        self.digest = (self.digest + int.from_bytes(hashlib.sha256(canon).digest()[:16], "big")) % (1 << 128)
        self.requests += 1


def make_app(latency_s: float) -> web.Application:
    stats = Stats()
    counter = iter(range(1, 1 << 62))

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        stats.add(body)
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        prompt_chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
        max_tokens = body.get("max_tokens") or COMPLETION_TOKENS
        tokens = min(COMPLETION_TOKENS, max_tokens)
        return web.json_response({
            "id": f"chatcmpl-stub-{next(counter)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "stub"), "system_fingerprint": "stub",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": COMPLETION},
                         "logprobs": None, "finish_reason": "stop" if tokens == COMPLETION_TOKENS else "length"}],
            "usage": {"prompt_tokens": max(1, prompt_chars // 4), "completion_tokens": tokens,
                      "total_tokens": max(1, prompt_chars // 4) + tokens}})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "bench"}]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": stats.requests, "digest": f"{stats.digest:032x}"})

    async def reset(request: web.Request) -> web.Response:
        stats.__init__()
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models),
                    web.get("/health", health), web.get("/stats", get_stats), web.post("/reset", reset)])
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    web.run_app(make_app(args.latency_ms / 1000), host=args.host, port=args.port, access_log=None,
                print=lambda *a: None, backlog=1024)


if __name__ == "__main__":
    main()
