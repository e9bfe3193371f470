"""The `echo` teacher: answers without a model or a server, for tests, demos and dry runs.

Like the echo model of simonw/llm, it answers each request from the request itself, deterministically:
the same request always gets the same answer, and the samples of one prompt differ (their index and
seed are part of the answer). No network, no weights, no threads: `synth run` with it exercises the
whole pipeline (cache, journal, store, filters, exports) in a fraction of a second.

    teachers:
      dry: {backend: echo}                  # model defaults to "echo" (hashed into request ids)

Default answer: the last user message, then ` [sample K, seed S]` (S: the seed sent for that sample,
`none` without params.seed).

Scripted answers (`answers:`, a list of rules; the first that matches answers, none: the default):

    answers:
      - {system: grader, match: 'Q(\\d+)', reply: "Score: {{ 9 if last_boxed(user) == match[1] else 2 }}"}
      - {match: REFUSE, reply: "I'm sorry, but I can't help with that."}
      - {match: FILTERME, reply: "cut", finish_reason: content_filter}
      - {match: FAILME, error: rate_limit}
      - {match: 'Q(\\d+)', reply: "{{ box(match[1] if rng.random() < 0.7 else match[1] | int + 1) }}"}

- `match`: a regex searched in the last user message ('' matches every request); `system`: a regex the
  system message must match too.
- `reply`: a Jinja2 template (sandboxed) rendered with `user` (the last user message), `system` (the
  system message, '' without one), `messages`, `match` (match[0] the whole match, match[1] its first
  group, ...), `sample`, `seed`, `params`, `model`, `rng` (a random.Random seeded by the seed and the
  user message: a given request always draws the same numbers, so `rng.random() < p` is an answer right
  with probability p), `box(x)` ("\\boxed{x}") and `last_boxed(text)` (the content of text's last
  \\boxed{...}, or None).
- `finish_reason: content_filter`: the answer is stopped as a server's content filter would;
  `error: CAUSE`: the request fails with that cause (an error row, retried by a re-run). A reply whose
  template fails for a request (a bad int(), ...) is an error row with cause `backend_error`.

Tokens: a word (whitespace-separated) is one token of the echo model. An answer longer than
params.max_tokens words is cut there (finish_reason `length`), a stop string cuts it (`stop`);
completion_tokens is its word count, prompt_tokens the prompt's characters / 4 (what `synth plan`
estimates without a tokenizer). Logprobs (params.logprobs = k, capability `logprobs`, on unless the
config says `logprobs: false`): one entry per word, token " word" (no space before the first), logprob
-0.1 x (position + 1), and k alternatives: the word itself, then "alt1".."alt{k-1}", each 1 less likely.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Iterator, Sequence

from synth.errors import one_line
from synth.teachers.base import (Completion, EchoTeacherConfig, Request, TeacherBase, approx_prompt_tokens,
                                 logprobs_from_entries)
from synth.teachers.echo_rules import compile_reply


class EchoTeacher(TeacherBase):
    def __init__(self, name: str, config: EchoTeacherConfig, base_dir: Path):
        self.name, self.config, self.model = name, config, config.model
        self.capabilities = config.capabilities()
        self.rules = [(re.compile(r.match), re.compile(r.system) if r.system is not None else None,
                       compile_reply(r.reply), r) for r in config.answers]
        self._stopped = False

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        self._stopped = False
        for request in requests:
            if self._stopped:
                return
            yield self.answer(request)

    def stop(self) -> None:
        self._stopped = True  # checked between requests

    def answer(self, request: Request) -> Completion:
        """The one Completion of a request (a pure function of it and the config)."""
        started = time.monotonic()
        messages = request.messages
        user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
        seed = request.seed
        text, finish = None, "stop"
        for pattern, system_pattern, template, rule in self.rules:
            found = pattern.search(user)
            if found is None or (system_pattern is not None and system_pattern.search(system) is None):
                continue
            if rule.error:
                return Completion(request.id, error=rule.error, error_message=f"echo teacher: scripted {rule.error}",
                                  latency_s=time.monotonic() - started)
            try:
                text = template.render(user=user, system=system, messages=messages, sample=request.sample, seed=seed,
                                       params=request.params, model=self.model, match=(found.group(0), *found.groups()),
                                       rng=random.Random(f"{seed}:{user}"))
            except Exception as exc:  # noqa: BLE001 - the rule is the pipeline author's code
                return Completion(request.id, error="backend_error", latency_s=time.monotonic() - started,
                                  error_message=f"echo teacher: reply of rule {rule.match!r} failed: "
                                                f"{type(exc).__name__}: {one_line(exc)[:300]}")
            finish = rule.finish_reason
            break
        if text is None:
            text = f"{user} [sample {request.sample}, seed {'none' if seed is None else seed}]"
        text, finish = _cut(text, finish, request.params)
        k = request.params.get("logprobs")
        words = text.split()
        return Completion(request.id, text=text, finish_reason=finish,
                          prompt_tokens=approx_prompt_tokens(messages), completion_tokens=len(words),
                          latency_s=time.monotonic() - started,
                          logprobs=None if k is None or not self.capabilities.logprobs else _logprobs(words, k))


def _cut(text: str, finish: str, params: dict) -> tuple[str, str]:
    """Cut at the first stop string (finish `stop`), then at max_tokens words (finish `length`)."""
    cuts = [text.find(s) for s in params.get("stop") or () if s and s in text]
    if cuts:
        text, finish = text[:min(cuts)], "stop"
    max_tokens = params.get("max_tokens")
    if max_tokens is not None:
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        if len(spans) > max_tokens:
            text, finish = text[:spans[max_tokens - 1][1]], "length"
    return text, finish


def _logprobs(words: list[str], k: int) -> dict:
    """One entry per word (token " word", no space before the first; no token ids), the word first among its
    k alternatives `alt1`, `alt2`, ... each one nat less likely."""
    entries = []
    for t, w in enumerate(words):
        token, logprob = (" " if t else "") + w, -0.1 * (t + 1)
        top = [{"token": token, "token_id": None, "logprob": logprob}][:k]
        top += [{"token": f"alt{j}", "token_id": None, "logprob": logprob - j} for j in range(1, k)]
        entries.append({"token": token, "token_id": None, "logprob": logprob, "top": top})
    return logprobs_from_entries(entries, k)
