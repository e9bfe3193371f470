"""What every teacher backend shares: requests and completions, sampling parameters, capabilities, the
Teacher protocol and TeacherBase, the backends' config models, token estimates and model paths.

A module of its own, below the backends: each backend imports from here, and synth.teachers (the
package) re-exports it and dispatches to the backends (load_teacher), so the imports point one way.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal, Protocol, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synth.ids import sample_seed
from synth.secrets import register_env, scrub
from synth.teachers.echo_rules import compile_reply


class SamplingParams(BaseModel):
    """Sampling parameters; exactly these (minus unset ones) are hashed into the request id."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int = Field(256, ge=1)
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = Field(None, ge=0, description="store the log-probability of each generated token and "
                                 "its top k alternatives in synth.token_logprobs (k = this; OpenAI-compatible "
                                 "APIs allow at most 20)")


@dataclass(frozen=True)
class Request:
    id: str
    messages: list[dict]
    params: dict  # SamplingParams.model_dump(exclude_none=True): what was hashed
    sample: int

    @property
    def seed(self) -> int | None:
        """The seed actually sent for this sample (derived from params.seed and the sample index)."""
        return sample_seed(self.params.get("seed"), self.sample)


@dataclass(frozen=True)
class ScoreRequest:
    """A sequence for a teacher to score (a score stage): the prompt, rendered by the teacher's chat template
    with the generation prompt, followed by `tokens` exactly as given (token ids, never re-tokenised). The
    answer is a Completion with `logprobs` = token_logprobs over those tokens: the teacher's log-prob of each
    and its k best at each position (text None; prompt_tokens, completion_tokens = len(tokens))."""
    id: str
    messages: list[dict]
    tokens: list[int]
    k: int


@dataclass
class Completion:
    request_id: str
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    error: str | None = None  # cause code: rate_limit, server_error, timeout, bad_request, connection, ...
    error_message: str | None = None
    # when the request asked for logprobs: the compact per-completion form of `token_logprobs` (below)
    logprobs: dict | None = None
    retry_max_tokens: int | None = None  # generated with this max_tokens, not the request's (on_length retry)
    reasoning: str | None = None  # a reasoning model's trace: the server's reasoning_content, or <think>...</think>
    reasoning_tokens: int | None = None  # of completion_tokens, those the trace took (when the server says)

    def __post_init__(self) -> None:
        # a server's or an exception's text may echo the API key (an Authorization header): never stored
        if self.error_message:
            self.error_message = scrub(self.error_message)

    @property
    def ok(self) -> bool:
        return self.error is None

    def rejected(self, cause: str, message: str) -> "Completion":
        """This answer as an error row with `cause` (a policy rejected it), keeping its token counts:
        it was paid for, so it counts toward the stage's spend."""
        return Completion(self.request_id, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                          latency_s=self.latency_s, error=cause, error_message=message)


def split_reasoning(c: Completion, tags: list[str]) -> Completion:
    """A completion whose text holds its reasoning trace (`<think>...</think>answer`, or `...</think>answer`
    when the chat template opened the tag in the prompt) with the trace moved to `reasoning` and the
    answer left in `text`. An open trace that never closed (cut at max_tokens) is all reasoning. A
    completion whose server gave the trace apart (reasoning_content) is left as it is."""
    if not c.ok or c.reasoning is not None or len(tags) != 2 or not c.text:
        return c
    start, end = tags
    body = c.text.lstrip()
    if body.startswith(start):
        body = body[len(start):]
    elif end not in body:
        return c
    trace, closed, answer = body.partition(end)
    c.reasoning, c.text = trace.strip(), answer.lstrip() if closed else ""
    return c


def token_logprobs(k: int, logprobs: list[float], *, token_ids: list[int] | None = None,
                   tokens: list[str] | None = None, top_ids: list[int] | None = None,
                   top_tokens: list[str | None] | None = None, top_logprobs: list[float]) -> dict:
    """Completion.logprobs: a sequence's n tokens with their log-probabilities and the k best alternatives
    at each position, as flat lists (position-major: position t's alternatives are [t*k, (t+1)*k)), the
    layout of synth.token_logprobs (one row per completion). Token ids where the backend has them (hf,
    vllm, a vLLM server asked for ids); else token strings (OpenAI-compatible servers). A position with
    fewer than k alternatives is padded with id -1 / token None and log-prob -inf (no mass). A plain
    dict of lists: it goes into the answers journal as JSON as it is."""
    n = len(logprobs)
    assert len(top_logprobs) == n * k, (len(top_logprobs), n, k)
    return {"k": k, "token_ids": token_ids, "tokens": None if token_ids is not None else tokens,
            "logprobs": logprobs, "top_ids": top_ids,
            "top_tokens": None if top_ids is not None else top_tokens, "top_logprobs": top_logprobs}


def logprobs_from_entries(entries: list[dict], k: int) -> dict:
    """token_logprobs from one dict per token ({"token", "token_id", "logprob", "top": [{"token",
    "token_id", "logprob"}, ...]}: OpenAI's shape, and what synth's journal held before the compact form),
    each position's alternatives cut or padded to exactly k."""
    ids_known = all(e.get("token_id") is not None for e in entries) and all(
        a.get("token_id") is not None for e in entries for a in e.get("top") or ())
    top_ids, top_tokens, top_lps = [], [], []
    for e in entries:
        top = list(e.get("top") or ())[:k]
        top += [{"token": None, "token_id": -1, "logprob": float("-inf")}] * (k - len(top))
        top_ids += [a.get("token_id") for a in top]
        top_tokens += [a.get("token") for a in top]
        top_lps += [float(a["logprob"]) for a in top]
    return token_logprobs(k, [float(e["logprob"]) for e in entries],
                          token_ids=[e["token_id"] for e in entries] if ids_known else None,
                          tokens=[e.get("token") for e in entries], top_ids=top_ids if ids_known else None,
                          top_tokens=top_tokens, top_logprobs=top_lps)


CHARS_PER_TOKEN = 4.0  # token estimate without a tokenizer: ~4 characters per token for English text


def approx_prompt_tokens(messages: list[dict]) -> int:
    """A prompt's tokens without a tokenizer: its characters / CHARS_PER_TOKEN."""
    return int(sum(len(m.get("content") or "") for m in messages) / CHARS_PER_TOKEN)


def estimated_tokens(request: Request) -> int:
    """Tokens a request may use, before it is sent: its approximate prompt tokens plus its max_tokens
    (the openai teacher's tokens-per-minute bucket)."""
    return approx_prompt_tokens(request.messages) + int(request.params.get("max_tokens") or 0)


def prompt_token_counter(config, base_dir: Path):
    """(count(messages) -> prompt tokens, how) for `synth plan`: the tokenizer and chat template of the
    teacher's model (hf, vllm) or of its `tokenizer` key (openai), when one can be loaded here (a local
    dir, or a hub id in the local cache); else prompt characters / CHARS_PER_TOKEN."""
    if config.backend == "echo":  # no tokenizer: its prompt tokens are counted as characters / 4
        return approx_prompt_tokens, "chars/4"
    source = getattr(config, "tokenizer", None) if config.backend == "openai" else config.model
    if source:
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            tok = AutoTokenizer.from_pretrained(resolve_model_path(source, base_dir), local_files_only=True)
            if tok.chat_template:
                def count(messages: list[dict]) -> int:
                    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5: a BatchEncoding
                        ids = ids["input_ids"]
                    return len(ids)
                return count, "tokenizer"
        except Exception:  # noqa: BLE001 - no transformers, not cached offline, not a tokenizer: approximate
            pass
    return approx_prompt_tokens, "chars/4"


# causes of answers that came back and that the generate stage rejected by a policy (content_filtered
# below, GenerateStage.on_length / on_refusal): a re-run asks them again rather than re-reading them
POLICY_CAUSES = ("content_filter", "length", "refusal", "schema_violation")  # answers a stage rejected


def content_filtered(c: Completion) -> Completion:
    """An output the server stopped for its content policy (finish_reason `content_filter`) is not
    data: it becomes an error with cause `content_filter`, counted by `synth status` and asked again
    by a re-run, instead of a truncated sample in the table."""
    if c.ok and c.finish_reason == "content_filter":
        return c.rejected("content_filter", f"the server's content filter stopped the output: {(c.text or '')[:200]!r}")
    return c


@dataclass(frozen=True)
class Capabilities:
    n_samples: bool = True  # can produce several independent samples of one prompt
    logprobs: bool = False
    structured_output: bool = False
    scoring: bool = False  # can score given token sequences (Teacher.score)


class Teacher(Protocol):
    name: str
    model: str  # the model id hashed into request ids
    capabilities: Capabilities
    # True when the backend's own workers call `on_result` with each answer (before it is queued for the
    # caller); False when the caller receives each answer only from `generate` (stages/generate.py then journals
    # and counts it there)
    calls_on_result_in_worker: bool

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        """Yield one Completion per request, in completion order. Never raises for a single
        request's failure; raises SynthError only for a condition no request can survive."""
        ...

    def score(self, requests: Sequence[ScoreRequest]) -> Iterator[Completion]:
        """Yield one Completion per ScoreRequest (its logprobs over the given tokens), as `generate` does;
        only for a backend with capabilities.scoring."""
        ...

    def stop(self) -> None:
        """Start no new requests; the iterator still yields the ones in flight, then ends."""
        ...

    def close(self) -> None: ...

    # Hooks. The generate stage assigns `on_result` and `on_idle` (callables replacing these methods on
    # the instance) and calls `bind` once, before `generate`; a backend calls the ones it has a use for.

    def on_result(self, completion: Completion) -> None:
        """Called with each answer, in the worker that received it, when calls_on_result_in_worker."""
        ...

    def on_idle(self) -> None:
        """Called before a long wait between answers (the Batch API's polls): commit what arrived."""
        ...

    def bind(self, store, stage: str, run_id: str) -> None:
        """The store, stage and run the teacher answers for (a backend that keeps state in the store)."""
        ...


class TeacherBase:
    """What every backend inherits: the Teacher protocol's hooks, doing nothing, and `stop`/`close` that
    do nothing either. A backend overrides what it uses; the generate stage calls or assigns each hook
    unconditionally."""

    name: str
    model: str
    capabilities: Capabilities
    calls_on_result_in_worker: bool = False

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        raise NotImplementedError

    def score(self, requests: Sequence[ScoreRequest]) -> Iterator[Completion]:
        raise NotImplementedError  # the score stage checks capabilities.scoring before it gets here

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass

    def on_result(self, completion: Completion) -> None:
        pass

    def on_idle(self) -> None:
        pass

    def bind(self, store, stage: str, run_id: str) -> None:
        pass


# ---- teacher configuration (the `teachers:` section of a pipeline file) ------------------------

class Prices(BaseModel):
    """USD per million tokens, for cost estimates, budgets and `synth status` spend."""
    model_config = ConfigDict(extra="forbid")
    input: float = Field(ge=0)
    output: float = Field(ge=0)

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        return ((prompt_tokens or 0) * self.input + (completion_tokens or 0) * self.output) / 1e6


DEFAULT_REASONING_TAGS = ("<think>", "</think>")  # what a teacher's reasoning_tags are unless it says


class _TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="hub id or local directory (relative to the pipeline file)")
    prices: Prices | None = Field(None, description="USD per million input/output tokens")
    reasoning_tags: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: list(DEFAULT_REASONING_TAGS), min_length=0, max_length=2,
        description="the tags around a reasoning trace written in the text: it is moved to the `reasoning` column "
                    "and the text keeps the answer; [] keeps the text whole")


class HFTeacherConfig(_TeacherConfig):
    backend: Literal["hf"]
    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto (a CUDA GPU when torch sees one, else cpu)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(16, ge=1)

    def capabilities(self) -> Capabilities:
        # structured output through xgrammar (synth/teachers/hf.py), when it is installed (the hf extra)
        return Capabilities(n_samples=True, logprobs=True, structured_output=importlib.util.find_spec("xgrammar")
                            is not None, scoring=True)


# OpenAI's reasoning families (a provider prefix like "openai/" allowed), and what they refuse
REASONING_MODELS = re.compile(r"^(?:[\w.-]+/)?(?:o1|o3|o4|gpt-5)(?:\b|[-_.])")
REASONING_REFUSES = {"temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs"}


class OpenAITeacherConfig(_TeacherConfig):
    backend: Literal["openai"]
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="NAME of the environment variable with the key")
    max_concurrency: int = Field(16, ge=1, description="most requests in flight at once")
    adaptive: bool = Field(True, description="AIMD: halve the requests in flight on 429/5xx/timeouts, grow back "
                                             "while healthy (never above max_concurrency)")
    rpm: int | None = Field(None, ge=1, description="hard limit: requests per minute")
    tpm: int | None = Field(None, ge=1, description="hard limit: tokens per minute (prompt chars / 4 + max_tokens)")
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    client: Literal["auto", "openai", "http"] = Field(
        "auto", description="http: the raw aiohttp fast path; openai: the official client; auto: http when "
                            "base_url is set (a self-hosted server), else openai")
    tokenizer: str | None = Field(None, description="a local dir or hub id whose tokenizer (and chat template) "
                                                    "`synth plan` counts prompt tokens with; unset: ~4 characters "
                                                    "per token")
    logprobs: bool = Field(True, description="the server returns logprobs when asked (OpenAI, vLLM and SGLang do); "
                                             "false: a stage that asks for them fails before sending anything")
    mode: Literal["online", "batch"] = Field(
        "online", description="batch: the OpenAI Batch API (a JSONL file per batch, about half the price, "
                              "results within completion_window); online: one request per call")
    completion_window: str = Field("24h", description="mode batch: the Batch API's completion window")
    batch_max_requests: int = Field(50_000, ge=1, le=50_000, description="mode batch: most requests in one batch "
                                                                         "(the Batch API's limit is 50,000)")
    poll_interval_s: float = Field(30.0, gt=0, description="mode batch: seconds between status checks")
    structured_output: bool = Field(True, description="the server enforces `response_format: json_schema` (OpenAI, "
                                                      "vLLM and SGLang do); false: a stage's schema is only checked "
                                                      "on the answers")
    reasoning: bool | None = Field(None, description="a reasoning model (OpenAI's o-series, gpt-5): max_tokens is sent "
                                   "as max_completion_tokens (it covers the hidden reasoning too) and temperature, "
                                   "top_p, the penalties and logprobs, which such models refuse, are left out; unset: "
                                   "by the model's name (o1, o3, o4, gpt-5...)")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None, description="sent as reasoning_effort (reasoning models)")
    vllm_server: bool = Field(False, description="the server is vLLM's OpenAI-compatible server: logprobs come back "
                              "as token ids (return_tokens_as_token_ids), and a score stage can have it score "
                              "sequences (prompt_logprobs)")
    omit: list[Literal["temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty",
                       "max_tokens", "logprobs"]] = Field(
        default_factory=list, description="request parameters never sent to this server (one it refuses)")

    def model_post_init(self, __context) -> None:
        register_env(self.api_key_env)  # its value is scrubbed from every message, log and stored string

    def capabilities(self) -> Capabilities:
        return Capabilities(n_samples=True, logprobs=self.logprobs and not self.is_reasoning(),
                            structured_output=self.structured_output, scoring=self.vllm_server)

    def is_reasoning(self) -> bool:
        return self.reasoning if self.reasoning is not None else bool(REASONING_MODELS.match(self.model))

    def left_out(self) -> set[str]:
        """The request parameters this teacher never sends."""
        return set(self.omit) | (REASONING_REFUSES if self.is_reasoning() else set())


class VLLMTeacherConfig(_TeacherConfig):
    backend: Literal["vllm"]
    dtype: str = "auto"
    max_model_len: int | None = None
    chunk_size: int = Field(256, ge=1, description="most requests in the engine at once (a finished one is replaced "
                                                   "at once); a crash loses at most these")
    engine: dict = Field(default_factory=dict, description="extra keyword arguments for vllm.LLM")

    def capabilities(self) -> Capabilities:
        return Capabilities(n_samples=True, logprobs=True, structured_output=True, scoring=True)


class EchoRule(BaseModel):
    """One scripted answer of the echo teacher: the first rule whose patterns match a request answers it."""
    model_config = ConfigDict(extra="forbid")
    match: str = Field("", description="regex searched in the last user message ('' matches every request)")
    system: str | None = Field(None, description="regex the system message must match too")
    reply: str = Field("", description="Jinja2 template of the answer (see synth/teachers/echo.py for its variables)")
    finish_reason: Literal["stop", "content_filter"] = "stop"
    error: str | None = Field(None, description="answer with an error row of this cause instead (rate_limit, ...)")

    @field_validator("match", "system")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("reply")
    @classmethod
    def _template(cls, value: str) -> str:
        compile_reply(value)  # raises ValueError with the template's mistake
        return value


class EchoTeacherConfig(_TeacherConfig):
    """A teacher without a model or a server, for tests, demos and dry runs: it answers each request
    deterministically from the request itself (synth/teachers/echo.py)."""
    backend: Literal["echo"]
    model: str = Field("echo", description="the model id hashed into request ids")
    answers: list[EchoRule] = Field(default_factory=list, description="scripted answers: the first rule that "
                                    "matches answers; no match: the last user message echoed with the sample "
                                    "index and its seed")
    logprobs: bool = Field(True, description="return logprobs when a stage asks (one entry per word)")

    def capabilities(self) -> Capabilities:
        return Capabilities(n_samples=True, logprobs=self.logprobs)


TeacherConfig = Annotated[Union[HFTeacherConfig, OpenAITeacherConfig, VLLMTeacherConfig, EchoTeacherConfig],
                          Field(discriminator="backend")]


def resolve_model_path(model: str, base_dir: Path) -> str:
    """A model given as a relative path that exists next to the pipeline file resolves there;
    anything else (a hub id, an absolute path) passes through unchanged."""
    candidate = base_dir / model
    if not os.path.isabs(model) and candidate.exists():
        return str(candidate.resolve())
    return model


def vocabulary_of(config, base_dir) -> str | None:
    """Whose vocabulary a teacher's logprobs are in: a local model by its absolute path (a relative one would
    depend on the directory synth ran from), a hub model by its id; an OpenAI-compatible teacher's declared
    `tokenizer` (its model name says nothing about token ids); None when unknown (echo, an API without one)."""
    if config.backend in ("hf", "vllm"):
        return resolve_model_path(config.model, base_dir)
    source = getattr(config, "tokenizer", None)
    return resolve_model_path(source, base_dir) if source else None


def model_signature(model: str, base_dir: Path) -> dict | None:
    """What identifies a local model directory cheaply, for fingerprints: the content hash of its small
    files (config, tokenizer, chat template) and the size of every other file (weights are not read:
    they can be gigabytes). None for a hub id or a path that does not exist (yet)."""
    import hashlib

    path = Path(resolve_model_path(model, base_dir))
    if not path.is_dir():
        return None
    signature = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        key = str(f.relative_to(path))
        small = f.suffix in (".json", ".jinja", ".txt", ".model") and f.stat().st_size < 16 * 2**20
        signature[key] = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if small else f.stat().st_size
    return signature
