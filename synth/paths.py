"""Where things live: built-in prompts and filters (the repository root in a checkout, DESIGN.md's prompts/
and filters/, or <prefix>/share/synth in an installed wheel; a workspace's own folders come first), and an
export's provenance sidecar."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def builtin_dir(kind: str) -> Path:
    in_checkout = _CHECKOUT / kind
    if in_checkout.is_dir() and (_CHECKOUT / "pyproject.toml").exists():
        return in_checkout
    return Path(sys.prefix) / "share" / "synth" / kind


def export_sidecar(out: Path) -> Path:
    """Where an export's provenance goes: <file>.synth.json, or synth.json inside a directory export."""
    return out / "synth.json" if out.suffix == "" else out.with_name(out.name + ".synth.json")
