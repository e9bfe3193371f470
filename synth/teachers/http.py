"""The raw-HTTP fast path of the `openai` teacher, for self-hosted OpenAI-compatible servers (vLLM,
SGLang, llama.cpp, `transformers serve`): one pooled aiohttp session, a plain JSON body, no
per-request client objects or response models — a small teacher on a local server answers hundreds
of requests per second, and the client must not be the bottleneck.

Same contract as the openai-client path (synth/teachers/openai.py): the same request body, the same
cause codes, retries with exponential backoff and jitter on 408/409/429/5xx, timeouts and connection
errors, honouring Retry-After / retry-after-ms (tenacity), up to `max_retries`; what still fails is
a Completion with its cause; a refused key or an unknown model is a SynthError (no request can
succeed).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

from synth.errors import SynthError
from synth.secrets import scrub
from synth.teachers.base import (Completion, Request, ScoreRequest, estimated_tokens, logprobs_from_entries,
                                 token_logprobs)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
VLLM_MAX_LOGPROBS = 20  # vLLM's server refuses top_logprobs above its --max-logprobs (default 20)


class _Retryable(Exception):
    def __init__(self, cause: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.cause, self.retry_after = cause, retry_after


class _Final(Exception):
    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


def is_context_length(text: str) -> bool:
    """A 400's message says the prompt (plus max_tokens) exceeds the model's context."""
    text = text.lower()
    return "context" in text and ("length" in text or "window" in text) or "maximum" in text and "token" in text


def http_cause(status: int, text: str) -> str:
    """The cause code of a failed HTTP answer: the fast path's and the Batch API's error lines'."""
    if status == 429:
        return "rate_limit"
    if status == 408:
        return "timeout"
    if status >= 500:
        return "server_error"
    if status == 400 and is_context_length(text):
        return "context_length"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    return "bad_request" if 400 <= status < 500 else "api_error"


def request_body(model: str, request: Request, config=None) -> dict:
    """The chat-completions body: the keys the openai client sends for the same call, None omitted, and
    those the teacher's config leaves out (OpenAITeacherConfig.left_out: `omit`, a reasoning model's
    refusals) dropped; a reasoning model gets max_completion_tokens and reasoning_effort."""
    p = request.params
    omit = config.left_out() if config is not None else set()
    reasoning = config is not None and config.is_reasoning()
    body = {"messages": request.messages, "model": model, "frequency_penalty": p.get("frequency_penalty"),
            "max_completion_tokens" if reasoning else "max_tokens": p.get("max_tokens"),
            "presence_penalty": p.get("presence_penalty"), "seed": request.seed,
            "stop": p.get("stop"), "temperature": p.get("temperature"), "top_p": p.get("top_p")}
    if "top_k" in p:
        body["top_k"] = p["top_k"]
    if p.get("logprobs") is not None and "logprobs" not in omit:
        body["logprobs"], body["top_logprobs"] = True, p["logprobs"]
        if config is not None and config.vllm_server:
            body["return_tokens_as_token_ids"] = True  # ids, not strings: the positions of KD need them
            # vLLM's server (0.32) returns the first top_logprobs entries of {sampled token, k best}, the sampled
            # one first: asked for k, a sample outside the k best pushes the k-th best out. Asked for k + 1, the
            # k best are always there (parse_logprobs sorts and keeps k). Not past the server's default
            # --max-logprobs (20), which would refuse every request: at k = 20 the 20th may be the sample.
            if 0 < p["logprobs"] < VLLM_MAX_LOGPROBS:
                body["top_logprobs"] = p["logprobs"] + 1
    if p.get("json_schema") is not None:
        body["response_format"] = response_format(p["json_schema"])
    if config is not None and config.reasoning_effort:
        body["reasoning_effort"] = config.reasoning_effort
    for key in omit:
        body.pop("max_completion_tokens" if key == "max_tokens" and reasoning else key, None)
    return {k: v for k, v in body.items() if v is not None}


def reasoning_of(message: dict, usage: dict) -> tuple[str | None, int | None]:
    """A reasoning model's trace (vLLM's reasoning parsers and DeepSeek's API: `reasoning_content`; others:
    `reasoning`) and its token count (usage.completion_tokens_details.reasoning_tokens)."""
    trace = message.get("reasoning_content") or message.get("reasoning")
    details = usage.get("completion_tokens_details") or {}
    return (trace if isinstance(trace, str) and trace else None), details.get("reasoning_tokens")


def refused_parameter(teacher_name: str, status: int | None, body, text: str) -> SynthError | None:
    """A 400 that says the server refuses a request parameter (OpenAI: code unsupported_parameter /
    unsupported_value, with `param`): one line naming it, since every request would fail the same way.
    `body`: the error response's JSON ({"error": {...}} or the error object itself), `text` its text."""
    error = body.get("error", body) if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or text)
    param = error.get("param")
    if status != 400 or not (error.get("code") in ("unsupported_parameter", "unsupported_value") or
                             "nsupported parameter" in message):
        return None
    if not param:
        match = re.search(r"parameter:? '?\"?([A-Za-z_]+)", message)
        param = match.group(1) if match else "?"
    key = "max_tokens" if param == "max_completion_tokens" else param
    return SynthError(f"teacher '{teacher_name}': the server refuses the parameter '{param}' "
                      f"({' '.join(message.split())[:200]}); leave it out with `omit: [{key}]` on the teacher"
                      + ("" if key == "max_tokens" else ", or set `reasoning: true` for a reasoning model"))


def response_format(schema: dict) -> dict:
    """Structured output as OpenAI's chat API (and vLLM's, SGLang's servers) take it."""
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")  # vLLM's server with return_tokens_as_token_ids


def parse_logprobs(teacher_name: str, request: Request, choice: dict) -> dict | None:
    """Completion.logprobs (base.token_logprobs) from an OpenAI-shaped choice (`logprobs.content`: token,
    logprob, top_logprobs); None when the request did not ask. Tokens written `token_id:N` (vLLM's server
    asked for return_tokens_as_token_ids: the teacher's `vllm_server: true`) become ids; others stay
    strings. A server that answers without logprobs cannot give them to any request: SynthError, before
    more requests are spent."""
    k = request.params.get("logprobs")
    if k is None:
        return None
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise SynthError(f"teacher '{teacher_name}': the server answered without logprobs though the stage asks "
                         "for them (params.logprobs); this server cannot give them: set `logprobs: false` on the "
                         "teacher and remove params.logprobs, or use a server that returns them (vLLM, OpenAI)")

    def entry(t: dict) -> dict:
        match = TOKEN_ID.match(t.get("token") or "")
        return {"token": t.get("token"), "token_id": int(match.group(1)) if match else None,
                "logprob": float(t["logprob"])}

    # Best first before the cut to k: vLLM's server (0.32) lists the SAMPLED token first in `top_logprobs`, then
    # the k best by rank (k+1 entries when the sampled token is not among them), where OpenAI sends the k best
    # sorted. Cut unsorted, a sample outside the top k displaced the k-th best and `top` was out of order (the KD
    # targets of a vllm_server teacher were wrong; tests/test_real_model_server.py compares them with its scores).
    # A stable sort: OpenAI's order is kept as is.
    return logprobs_from_entries([{**entry(t), "top": sorted((entry(a) for a in (t.get("top_logprobs") or [])),
                                                             key=lambda a: -a["logprob"])}
                                  for t in content], k)


class HTTPClient:
    def __init__(self, teacher_name: str, config, api_key: str, limiter):
        import aiohttp

        self.name, self.config, self.limiter = teacher_name, config, limiter
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.completions_url = config.base_url.rstrip("/") + "/completions"  # score: vLLM's prompt_logprobs
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_concurrency, limit_per_host=config.max_concurrency),
            timeout=aiohttp.ClientTimeout(total=config.timeout_s), json_serialize=json.dumps)

    async def close(self) -> None:
        await self.session.close()

    async def complete(self, model: str, request: Request) -> Completion:
        body = json.dumps(request_body(model, request, self.config), ensure_ascii=False).encode()
        started = time.monotonic()
        try:
            data = await self._post_retrying(body, estimated_tokens(request), self.url)
        except (_Retryable, _Final) as exc:
            return Completion(request.id, error=exc.cause, error_message=scrub(str(exc))[:500],
                              latency_s=time.monotonic() - started)
        latency = time.monotonic() - started
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            reasoning, reasoning_tokens = reasoning_of(choice["message"], usage)
            return Completion(request.id, text=choice["message"].get("content") or "",
                              finish_reason=choice.get("finish_reason"), prompt_tokens=usage.get("prompt_tokens"),
                              completion_tokens=usage.get("completion_tokens"), latency_s=latency,
                              logprobs=parse_logprobs(self.name, request, choice), reasoning=reasoning,
                              reasoning_tokens=reasoning_tokens)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            return Completion(request.id, error="malformed_response",
                              error_message=scrub(f"{type(exc).__name__}: {exc}")[:500],
                              latency_s=latency)

    async def score(self, model: str, request: ScoreRequest, prompt: list[int]) -> Completion:
        """A sequence scored by vLLM's server: POST /completions with the prompt's and the sequence's token ids
        as the prompt, prompt_logprobs k and one token to generate; its choice's prompt_logprobs (one
        {"<id>": {"logprob", "rank", "decoded_token"}} per position, None for the first) give each token's
        log-prob and the k best. A server that answers without prompt_logprobs cannot score: SynthError."""
        body = json.dumps({"model": model, "prompt": prompt + list(request.tokens), "max_tokens": 1,
                           "temperature": 0, "prompt_logprobs": request.k}).encode()
        started = time.monotonic()
        try:
            data = await self._post_retrying(body, len(prompt) + len(request.tokens), self.completions_url)
        except (_Retryable, _Final) as exc:
            return Completion(request.id, error=exc.cause, error_message=scrub(str(exc))[:500],
                              latency_s=time.monotonic() - started)
        latency = time.monotonic() - started
        choice = (data.get("choices") or [{}])[0]
        positions = choice.get("prompt_logprobs")
        if not isinstance(positions, list):
            raise SynthError(f"teacher '{self.name}': the server answered without prompt_logprobs, so it cannot score "
                             "sequences; only vLLM's server can (`vllm_server: true` says it is one), or use an hf or "
                             "vllm teacher")
        try:
            positions = positions[len(prompt):]
            lps, top_ids, top_lps = [], [], []
            for token_id, position in zip(request.tokens, positions):
                ranked = sorted(((int(t), float(v["logprob"]), v.get("rank") or 0) for t, v in position.items()),
                                key=lambda e: (-e[1], e[2]))[:request.k]
                lps.append(float(position[str(token_id)]["logprob"]))
                top_ids += [t for t, _, _ in ranked] + [-1] * (request.k - len(ranked))
                top_lps += [v for _, v, _ in ranked] + [float("-inf")] * (request.k - len(ranked))
            if len(lps) != len(request.tokens):
                raise ValueError(f"{len(lps)} positions scored of {len(request.tokens)}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return Completion(request.id, error="malformed_response",
                              error_message=scrub(f"{type(exc).__name__}: {exc}")[:500], latency_s=latency)
        return Completion(request.id, prompt_tokens=len(prompt), completion_tokens=len(request.tokens), latency_s=latency,
                          logprobs=token_logprobs(request.k, lps, token_ids=list(request.tokens), top_ids=top_ids,
                                                  top_logprobs=top_lps))

    async def _post_retrying(self, body: bytes, tokens: int, url: str) -> dict:
        """POST with retries: _Retryable failures again (Retry-After, else backoff), up to max_retries."""
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

        try:
            return await self._post(body, tokens, url)  # the common case, without the retry machinery's per-call cost
        except _Retryable as first:
            if self.config.max_retries == 0:
                raise
            await asyncio.sleep(_wait_after(first, 1))
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(_Retryable), wait=_wait,
                                           stop=stop_after_attempt(self.config.max_retries), reraise=True):
            with attempt:
                return await self._post(body, tokens, url)

    async def _post(self, body: bytes, tokens: int, url: str) -> dict:
        """One attempt, admitted by the limiter and reported back to it (outcome, Retry-After, headers)."""
        await self.limiter.acquire(tokens)
        outcome, retry_after, headers = "ok", None, None
        try:
            data, headers = await self._attempt(body, url)
            return data
        except (_Retryable, _Final) as exc:
            outcome, retry_after, headers = exc.cause, getattr(exc, "retry_after", None), getattr(exc, "headers", None)
            raise
        finally:
            await self.limiter.release(outcome, retry_after=retry_after, headers=headers)

    async def _attempt(self, body: bytes, url: str) -> tuple[dict, object]:
        """POST once: (the JSON body, the response headers), or _Retryable / _Final."""
        import aiohttp

        try:
            async with self.session.post(url, data=body, headers=self.headers) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
                retry_after = None if status == 200 else _retry_after(resp.headers)
        except asyncio.TimeoutError:
            raise _Retryable("timeout", f"no response within {self.config.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise _Retryable("connection", scrub(f"{type(exc).__name__}: {exc}")) from None
        text = raw.decode("utf-8", "replace")
        if status != 200:  # an error body may echo the request's Authorization header: scrubbed before any cut
            text = scrub(text)
        if status == 200:
            try:
                return json.loads(text), headers
            except json.JSONDecodeError:
                raise _Retryable("malformed_response", f"invalid JSON: {scrub(text)[:200]!r}") from None
        message = f"HTTP {status}: {' '.join(text.split())[:300]}"
        if status in (401, 403):
            raise SynthError(f"teacher '{self.name}': the server refused the API key ({message}); check "
                             f"{self.config.api_key_env or 'the key'}")
        if status == 404:
            raise SynthError(scrub(f"teacher '{self.name}': {url} answered 404 ({message}); check base_url "
                                   "and model"))
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        refused = refused_parameter(self.name, status, body, text)
        if refused is not None:
            raise refused
        if status in RETRY_STATUS:
            exc = _Retryable("server_error" if status == 409 else http_cause(status, text), message, retry_after)
            exc.headers = headers  # a 429's x-ratelimit-* tell the limiter when the budget resets
            raise exc
        raise _Final(http_cause(status, text), message)


def _retry_after(headers) -> float | None:
    """Seconds the server asked to wait: retry-after-ms, else Retry-After in seconds (capped at 60)."""
    for key, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(key)
        if value:
            try:
                return min(float(value) * scale, 60.0)
            except ValueError:
                continue
    return None


def _wait(state) -> float:
    """tenacity's wait for retry k (the first retry was attempt 1's, in complete())."""
    exc = state.outcome.exception() if state.outcome else None
    return _wait_after(exc, state.attempt_number + 1)


def _wait_after(exc, failed_attempts: int) -> float:
    """Retry-After when the server sent one, else exponential backoff with jitter (0.5 s, 1 s, 2 s ... 8 s)."""
    if isinstance(exc, _Retryable) and exc.retry_after is not None:
        return exc.retry_after
    base = min(0.5 * 2 ** (failed_attempts - 1), 8.0)
    return base * (0.75 + random.random() * 0.5)
