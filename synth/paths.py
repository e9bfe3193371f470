"""Where built-in prompts and filters live: the repository root in a checkout (DESIGN.md's prompts/
and filters/), or <prefix>/share/synth in an installed wheel. A workspace's own folders come first."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def builtin_dir(kind: str) -> Path:
    in_checkout = _CHECKOUT / kind
    if in_checkout.is_dir() and (_CHECKOUT / "pyproject.toml").exists():
        return in_checkout
    return Path(sys.prefix) / "share" / "synth" / kind
