"""Token vocabularies: whether two tokenizers share one, and token strings read back as ids.

Token-level distillation compares a teacher's and a student's distributions position by position, so
both must tokenise alike: same token -> id map, same special tokens. Cross-tokenizer distillation
(aligning two vocabularies, as the Universal Logit Distillation loss does) is out of scope: synth
refuses a mismatch with one line naming both tokenizers. transformers is imported inside the functions
(seconds of start-up).
"""

from __future__ import annotations

import functools

from synth.errors import SynthError, one_line


@functools.lru_cache(maxsize=16)
def load_tokenizer(source: str):
    """A tokenizer by local path or hub id (cached: a stage asks for the same one per row)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise SynthError(f"cannot load the tokenizer {source!r}: {one_line(exc)[:300]}") from None


def vocabulary_mismatch(a: str, b: str) -> str | None:
    """Why ids of tokenizer `a` are not ids of tokenizer `b` (a sentence naming both), or None when they share
    a vocabulary: the same token -> id map (added and special tokens included)."""
    if a == b:
        return None
    va, vb = load_tokenizer(a).get_vocab(), load_tokenizer(b).get_vocab()
    if va == vb:
        return None
    differ = sum(1 for t, i in va.items() if vb.get(t) != i) + sum(1 for t in vb if t not in va)
    return (f"the tokenizers differ: {a} ({len(va):,} tokens) and {b} ({len(vb):,} tokens), {differ:,} entries not "
            "the same; token-level distillation needs one vocabulary for teacher and student (cross-tokenizer "
            "distillation is not supported)")


def ids_of_strings(source: str, tokens: list[str | None]) -> list[int]:
    """Token strings as an OpenAI-compatible server returns them (each token decoded on its own) -> ids in
    tokenizer `source`, by decoding every id of its vocabulary once. None (padding) -> -1. A string no id
    decodes to, or that several ids decode to (byte fragments: "\\ufffd"), cannot be placed: SynthError."""
    table = _decoded(source)
    out = []
    for token in tokens:
        if token is None:
            out.append(-1)
            continue
        ids = table.get(token)
        if ids is None or len(ids) > 1:
            what = "no token of it decodes to" if ids is None else f"{len(ids)} of its tokens decode to"
            raise SynthError(f"tokenizer {source}: {what} the token {token!r} the teacher returned, so its position "
                             "cannot be placed; use a teacher that returns token ids (hf, vllm, or vLLM's server "
                             "with `vllm_server: true`), or declare the teacher's own tokenizer")
        out.append(ids[0])
    return out


@functools.lru_cache(maxsize=4)
def _decoded(source: str) -> dict[str, list[int]]:
    tokenizer = load_tokenizer(source)
    table: dict[str, list[int]] = {}
    for i in range(len(tokenizer)):
        table.setdefault(tokenizer.decode([i]), []).append(i)
    return table
