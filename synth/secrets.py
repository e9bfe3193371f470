"""Secrets never reach the store, a log or the screen: scrub() replaces them with [REDACTED].

What is scrubbed:
- by value: every key synth resolved (synth/teachers/openai.py `resolve_api_key` registers each one
  with register_secret), the values of the environment variables that teachers' configs name
  (`api_key_env`, registered with register_env when a config is parsed, and OPENAI_API_KEY), and of
  any variable whose name says it holds a secret (`*_API_KEY`, `*_TOKEN`, `*_SECRET`, ...); each also
  in its URL-encoded and JSON-escaped forms, and a registered value cut at the start or end of the
  text (an error message truncated in the middle of a key). Values shorter than MIN_LEN characters
  are not scrubbed by value (a 3-letter placeholder would mangle every message containing it);
- by shape, whatever the value: `Bearer <token>`, the value of an `Authorization:` header,
  `api_key=...` / `"api_key": "..."` (and api-key, x-api-key, access_token, client_secret, password),
  OpenAI-style `sk-...` / `sk-proj-...` keys and Hugging Face `hf_...` tokens.

It runs on every error message, log record and verdict: one compiled regex, rebuilt only when the
registry changes. Replacements never contain a quote or a backslash, and the shapes never consume
one, so scrubbing JSON text leaves valid JSON.
"""

from __future__ import annotations

import json
import os
import re
import threading
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"
MIN_LEN = 8  # shorter registered values are scrubbed by shape only

# environment variables whose values are secrets by their name (HF_TOKEN, WANDB_API_KEY, ...)
SECRET_ENV_NAME = re.compile(r"(?:API_?KEY|_TOKEN|_SECRET|_SECRET_KEY|_ACCESS_KEY|_PASSWORD)$", re.IGNORECASE)
DEFAULT_ENV = ("OPENAI_API_KEY",)

# characters a secret value found by shape may contain: not whitespace, quotes, backslashes, brackets
# or separators (so that JSON text and `[REDACTED]` itself are left intact)
_VALUE = r"""[^\s"'\\,;}&\[\]<>\x00]+"""
_SHAPES = (
    # Authorization / Proxy-Authorization header values, with their scheme: `Authorization: Bearer x`,
    # `"authorization": "Basic x"`, `'Authorization': 'x'`
    r"""(?P<hdr>\b(?i:(?:proxy-)?authorization)(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?)"""
    r"""(?>(?:(?i:bearer|basic|token|digest|apikey)\s+)?)""" + _VALUE,
    # a bearer token anywhere
    r"""(?P<bearer>\b(?i:bearer)\s+)[A-Za-z0-9._~+/=-]+""",
    # key=value and "key": "value" pairs whose key names a secret (OPENAI_API_KEY=..., api-key: ...)
    r"""(?P<kv>(?=[AaCcPpRrSs])(?i:api[_-]?key|a(?:ccess|uth)[_-]?token|refresh[_-]?token|client[_-]?secret|"""
    r"""secret[_-]?key|passw(?:or)?d)(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?)""" + _VALUE,
    # OpenAI-style keys (sk-..., sk-proj-..., sk-ant-...) and Hugging Face tokens
    r"""(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{16,}""",
    r"""(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}""",
)

_lock = threading.Lock()
_values: set[str] = set()
_env_names: set[str] = set(DEFAULT_ENV)
_state: tuple | None = None  # (the regex, the value forms it has, the values for cut-off fragments)


def register_secret(value: str | None) -> None:
    """Scrub this value (and its encoded forms) from everything from now on."""
    _register(_values, value)


def register_env(name: str | None) -> None:
    """Scrub the value of this environment variable (a teacher's `api_key_env`)."""
    _register(_env_names, name)


def _register(registry: set[str], item: str | None) -> None:
    """Add to a registry; the regex is rebuilt at the next scrub."""
    global _state
    if not item or item in registry:
        return
    with _lock:
        registry.add(item)
        _state = None


def refresh() -> None:
    """Read the environment again at the next scrub (it is read once per registry change)."""
    global _state
    with _lock:
        _state = None


def _known_values() -> set[str]:
    values = set(_values)
    for name, value in os.environ.items():
        if name in _env_names or SECRET_ENV_NAME.search(name):
            values.add(value)
    return {v for v in values if len(v.strip()) >= MIN_LEN}


def _forms(value: str) -> set[str]:
    """The value as it may appear in a message: raw, URL-encoded, JSON-escaped."""
    forms = {value, quote(value, safe=""), quote_plus(value, safe=""), json.dumps(value)[1:-1],
             json.dumps(value, ensure_ascii=False)[1:-1]}
    stripped = value.strip()
    if stripped != value:
        forms |= _forms(stripped)
    return {f for f in forms if len(f) >= MIN_LEN}


def _build() -> tuple[re.Pattern, tuple[str, ...], tuple[str, ...]]:
    values = _known_values()
    forms = set().union(*(_forms(v) for v in values)) if values else set()
    alternatives = []
    if forms:  # longest first: a value that contains another is replaced whole
        alternatives.append("(?P<val>" + "|".join(re.escape(f) for f in sorted(forms, key=lambda f: (-len(f), f)))
                            + ")")
    alternatives += _SHAPES
    return (re.compile("|".join(alternatives)), tuple(sorted(forms)),
            tuple(sorted(values, key=len, reverse=True)))


def _state_now() -> tuple[re.Pattern, tuple[str, ...], tuple[str, ...]]:
    global _state
    state = _state
    if state is None:
        with _lock:
            if _state is None:
                _state = _build()
            state = _state
    return state


# lower-case substrings without which no shape can match: most texts have none, and a substring test
# is far cheaper than the regex
_TRIGGERS = ("bearer", "authorization", "key", "token", "secret", "passw", "sk-", "hf_")


def _replace(m: re.Match) -> str:
    prefix = m.group("hdr") or m.group("bearer") or m.group("kv")
    return (prefix or "") + REDACTED


def scrub(text: str | None) -> str | None:
    """`text` with every secret synth knows, and everything shaped like one, replaced by [REDACTED]."""
    if not text:
        return text
    if not isinstance(text, str):
        text = str(text)
    pattern, forms, values = _state_now()
    lower = text.lower()
    if any(t in lower for t in _TRIGGERS) or any(f in text for f in forms):
        text = pattern.sub(_replace, text)
    return _cut_fragments(text, values) if values else text


def _cut_fragments(text: str, values: tuple[str, ...]) -> str:
    """A value cut by truncation at the end (or the start) of the text: MIN_LEN or more of its
    characters are still a secret's."""
    for v in values:
        n = len(text)
        if n < MIN_LEN:
            return text
        head = v[:MIN_LEN]  # the text ends with a prefix of v
        start = text.find(head, max(0, n - len(v) + 1))
        while start != -1:
            if v.startswith(text[start:]):
                text = text[:start] + REDACTED
                break
            start = text.find(head, start + 1)
        lead = text[:MIN_LEN]  # the text starts with a suffix of v
        pos = v.find(lead, 1)
        while pos != -1:
            if text.startswith(v[pos:]):
                text = REDACTED + text[len(v) - pos:]
                break
            pos = v.find(lead, pos + 1)
    return text


def key_problem(value: str) -> str | None:
    """Why `value` cannot be an API key (it would break the HTTP header, or is a copy-paste accident),
    without quoting it; None when it is fine."""
    if value != value.strip():
        return "leading or trailing whitespace"
    if "\n" in value or "\r" in value:
        return "a line break"
    if "\x00" in value:
        return "a NUL character"
    if any(ord(c) > 126 for c in value):
        return "a non-ASCII character"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "a control character"
    if any(c.isspace() for c in value):
        return "whitespace inside it"
    return None
