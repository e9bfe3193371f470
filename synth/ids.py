"""Identity: canonical JSON and content hashes. Golden tests (tests/test_ids.py) pin this contract.

A request's id is the hash of what was actually sent: the model id, the fully rendered messages,
the sampling parameters and the sample index. Same request -> same id, in any run, pipeline or day.
Changing anything here changes every id ever stored, so it never changes without a migration.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ID_HEX_CHARS = 32  # 128 bits of sha256: collision-free for any realistic store, short enough to read


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace, UTF-8 kept as is. None-valued keys are dropped so that
    an explicit `null` and an absent key are the same request."""
    return json.dumps(_drop_none(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def content_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def file_sha256(path, digest=None):
    """`digest` (a new sha256 by default) updated with a file's bytes, read in 1 MiB blocks; returns it. OSError
    propagates (a caller decides what a missing file means)."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def request_id(model: str, messages: list[dict], params: dict, sample: int) -> str:
    return content_hash({"model": model, "messages": messages, "params": params, "sample": sample})


def prompt_id(messages: list[dict]) -> str:
    """Id of a rendered conversation alone; the samples of one prompt share it."""
    return content_hash({"messages": messages})


def sample_seed(seed: int | None, sample: int) -> int | None:
    """The seed sent for sample k of a request whose params carry `seed`.

    Derived by hashing rather than `seed + k`, so that stages run with seeds 0 and 1 do not share
    samples (seed 0 / sample 1 would otherwise equal seed 1 / sample 0)."""
    if seed is None:
        return None
    return int(content_hash({"seed": seed, "sample": sample})[:8], 16) & 0x7FFFFFFF


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value
