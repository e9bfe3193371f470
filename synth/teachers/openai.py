"""The `openai` teacher: any OpenAI-compatible chat endpoint (OpenAI, vLLM serve, SGLang, llama.cpp,
Ollama, `transformers serve`), through the official `openai` client, or for a self-hosted server
(`base_url` set; `client: auto`) through the raw-HTTP fast path in synth/teachers/http.py.

- Bounded concurrency: `max_concurrency` workers on one asyncio loop in a background thread; the
  caller iterates completions synchronously, in the order they finish.
- Retries: the openai client's own (exponential backoff with jitter on connection errors, 408, 409,
  429 and 5xx, honouring Retry-After / retry-after-ms), up to `max_retries`; `timeout_s` per attempt.
  A request that still fails becomes a Completion with a cause code, which the stage records as an
  error row and a re-run retries.
- Keys: read from the environment variable NAMED by `api_key_env`, never from the pipeline file,
  and never stored. A local server (base_url set, no api_key_env) gets a placeholder key.
- Each sample is its own request with its own seed (sample_seed), so servers that ignore `n` work.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from synth.errors import SynthError, one_line
from synth.secrets import key_problem, register_secret, scrub
from synth.teachers.base import (Completion, OpenAITeacherConfig, Request, ScoreRequest, TeacherBase,
                                 estimated_tokens, resolve_model_path)
from synth.teachers.http import (HTTPClient, is_context_length, parse_logprobs, reasoning_of, refused_parameter,
                                request_body)
from synth.teachers.limiter import Limiter
from synth.vocab import load_tokenizer

_DONE = object()


class OpenAITeacher(TeacherBase):
    # on_result (assigned by the generate stage) is called in the worker thread with each completion
    # before the next request is taken (budgets) and before the completion is queued for the caller
    calls_on_result_in_worker = True

    def __init__(self, name: str, config: OpenAITeacherConfig, base_dir: Path):
        self.name, self.config, self.model, self.base_dir = name, config, config.model, base_dir
        self.capabilities = config.capabilities()
        self.api_key = resolve_api_key(name, config)
        self._stop = threading.Event()

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        return self._answers(list(requests), None)

    def score(self, requests: Sequence[ScoreRequest]) -> Iterator[Completion]:
        """Sequences scored by vLLM's server (`vllm_server: true`; HTTPClient.score), through the same workers,
        limiter and retries as generate. The prompt's token ids come from the teacher's declared `tokenizer`
        (the chat template with the generation prompt, as the server would render it)."""
        if not self.config.tokenizer or not self.config.base_url:
            raise SynthError(f"teacher '{self.name}': scoring through a server needs its `base_url` and the model's "
                             "`tokenizer` (a local dir or hub id) on the teacher, to send the prompt as token ids")
        try:  # the score stage loaded this one already (its vocabulary check): cached
            tokenizer = load_tokenizer(resolve_model_path(self.config.tokenizer, self.base_dir))
        except SynthError as exc:
            raise SynthError(f"teacher '{self.name}': key 'tokenizer': {exc}") from None
        prompts = {}
        for r in requests:
            ids = tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            prompts[r.id] = list(ids["input_ids"])
        return self._answers(list(requests), prompts)

    def _answers(self, requests: list, prompts: dict | None) -> Iterator[Completion]:
        """The workers' completions in the order they finish: of chat requests, or (prompts given: score id ->
        prompt token ids) of score requests."""
        results: queue.Queue = queue.Queue()
        self._stop.clear()
        thread = threading.Thread(target=self._thread_main, args=(requests, results, prompts), daemon=True,
                                  name=f"synth-openai-{self.name}")
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()  # the caller stopped early (error, Ctrl-C): start no new requests
            thread.join(timeout=self.config.timeout_s)

    def stop(self) -> None:
        self._stop.set()  # workers take no new request; those in flight still arrive

    def close(self) -> None:
        self._stop.set()

    # ---- inside the background thread ------------------------------------------------------------

    def _thread_main(self, requests: list, results: queue.Queue, prompts: dict | None) -> None:
        try:
            asyncio.run(self._run_all(requests, results, prompts))
        except BaseException as exc:  # surfaced to the caller's thread
            results.put(exc)
        finally:
            results.put(_DONE)

    async def _run_all(self, requests: list, results: queue.Queue, prompts: dict | None) -> None:
        c = self.config
        limiter = Limiter(c.max_concurrency, adaptive=c.adaptive, rpm=c.rpm, tpm=c.tpm)
        self.limiter = limiter
        if prompts is not None:  # scoring: vLLM's /completions, which the official client has no argument for
            client = HTTPClient(self.name, c, self.api_key, limiter)
            one = lambda request: client.score(self.model, request, prompts[request.id])  # noqa: E731
        elif self.uses_http:
            client = HTTPClient(self.name, c, self.api_key, limiter)
            one = lambda request: client.complete(self.model, request)  # noqa: E731
        else:
            import openai  # the official SDK takes ~0.5 s to import: only for a teacher that uses it
            client = openai.AsyncOpenAI(base_url=c.base_url, api_key=self.api_key,
                                        max_retries=c.max_retries, timeout=c.timeout_s)

            async def one(request: Request) -> Completion:
                # The official client retries inside one call and hides the headers: the limiter sees
                # the call's final outcome only (AIMD and rpm/tpm; no x-ratelimit-* reading).
                await limiter.acquire(estimated_tokens(request))
                completion = None
                try:
                    completion = await self._one(client, request)
                    return completion
                finally:
                    await limiter.release(completion.error or "ok" if completion else "client_error")
        todo = iter(requests)

        async def worker() -> None:
            for request in todo:  # one shared iterator: each request is taken by exactly one worker
                if self._stop.is_set():
                    return
                completion = await one(request)
                self.on_result(completion)
                results.put(completion)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(self.config.max_concurrency, len(requests) or 1))]
        try:
            await asyncio.gather(*tasks)
        finally:
            # a condition no request survives (a refused key) ends the stage: the requests still in flight
            # are cancelled, not failed by the client's close into `connection` error rows
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    @property
    def uses_http(self) -> bool:
        return self.config.client == "http" or (self.config.client == "auto" and bool(self.config.base_url))

    async def _one(self, client, request: Request) -> Completion:
        import openai

        # the same keys as the raw HTTP path (request_body: omit, a reasoning model's keys, response_format);
        # what the SDK has no argument for goes in extra_body
        body = request_body(self.model, request, self.config)
        # (return_tokens_as_token_ids, a vllm_server teacher's: passed as a keyword, the SDK raised TypeError and
        # every request asking for logprobs was a client_error row)
        extra_body = {k: body.pop(k) for k in ("top_k", "return_tokens_as_token_ids") if k in body} or None
        started = time.monotonic()
        try:
            response = await client.chat.completions.create(**body, extra_body=extra_body)
        except openai.AuthenticationError as exc:
            raise SynthError(f"teacher '{self.name}': the server refused the API key "
                             f"({_short(exc)}); check {self.config.api_key_env or 'the key'}") from None
        except openai.NotFoundError as exc:
            raise SynthError(f"teacher '{self.name}': model {self.model!r} not found at "
                             f"{self.config.base_url or 'the OpenAI API'} ({_short(exc)})") from None
        except openai.APIError as exc:
            refused = refused_parameter(self.name, getattr(exc, "status_code", None), exc.body, str(exc))
            if refused is not None:
                raise refused from None
            return Completion(request.id, error=error_cause(exc), error_message=_short(exc),
                              latency_s=time.monotonic() - started)
        except ValueError as exc:  # a 200 whose body is not the JSON it claims (json.JSONDecodeError)
            return Completion(request.id, error="malformed_response", error_message=_short(exc),
                              latency_s=time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the stage
            return Completion(request.id, error="client_error", error_message=f"{type(exc).__name__}: {_short(exc)}",
                              latency_s=time.monotonic() - started)
        latency = time.monotonic() - started
        try:
            choice = response.choices[0]
            usage = response.usage
            reasoning, reasoning_tokens = reasoning_of(choice.message.model_dump(), usage.model_dump() if usage else {})
            return Completion(request.id, text=choice.message.content or "", finish_reason=choice.finish_reason,
                              prompt_tokens=usage.prompt_tokens if usage else None,
                              completion_tokens=usage.completion_tokens if usage else None, latency_s=latency,
                              logprobs=parse_logprobs(self.name, request, choice.model_dump()), reasoning=reasoning,
                              reasoning_tokens=reasoning_tokens)
        except (AttributeError, IndexError, TypeError) as exc:
            return Completion(request.id, error="malformed_response", error_message=_short(exc), latency_s=latency)


def resolve_api_key(name: str, config: OpenAITeacherConfig) -> str:
    """The teacher's API key, from the environment only. Every key resolved is registered with
    synth.secrets, so that it is scrubbed from every message, log and stored string; a key that cannot
    be sent in a header (a line break, a NUL, surrounding whitespace, non-ASCII: a copy-paste accident)
    is refused with one line that names the variable, never the key."""
    if config.api_key_env:
        variable = config.api_key_env
        key = os.environ.get(variable)
        if not key:
            raise SynthError(f"teacher '{name}': key 'api_key_env': the environment variable "
                             f"{variable} is not set; export it with the API key")
    else:
        variable = "OPENAI_API_KEY"
        key = os.environ.get(variable)
        if not key:
            if config.base_url:
                return "EMPTY"  # local servers ignore it
            raise SynthError(f"teacher '{name}': no API key: set api_key_env to the name of the variable that "
                             "holds it, or export OPENAI_API_KEY")
    register_secret(key)
    problem = key_problem(key)
    if problem:
        raise SynthError(f"teacher '{name}': the API key in the environment variable {variable} contains "
                         f"{problem}; set it again to the key alone, on one line")
    return key


def error_cause(exc: Exception) -> str:
    """A short, stable cause code for an openai client exception."""
    import openai

    if isinstance(exc, openai.RateLimitError):
        return "rate_limit"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.InternalServerError) or getattr(exc, "status_code", 0) >= 500:
        return "server_error"
    if isinstance(exc, openai.BadRequestError):
        return "context_length" if is_context_length(str(exc)) else "bad_request"
    if isinstance(exc, openai.APIResponseValidationError):
        return "malformed_response"
    return "api_error"


def _short(exc: Exception) -> str:
    """An exception's text on one line, API keys scrubbed (before the cut, so no fragment survives)."""
    return scrub(one_line(exc))[:500]
