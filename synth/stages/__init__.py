"""The stage kinds: one module per kind, each declaring its `KIND` (synth/graph.py: `Kind`) next to
its config model (synth/config.py), and this table, which synth/pipeline.py dispatches through.

A stage module imports only downward (graph, context, requests, filterfiles, verdict_store, store,
teachers, libraries), never synth.pipeline and never another stage module (tests/test_imports.py).
Adding a kind: its config model in config.py (in the `Stage` union), its module here, one line in
KINDS (ARCHITECTURE.md, "Adding a stage kind").
"""

from __future__ import annotations

from synth.config import STAGE_MODELS
from synth.errors import SynthError
from synth.graph import Kind
from synth.stages import (command, decontaminate, dedup, evaluate, export, failures, filter as filter_, generate,
                          judge, keep, load, mix, pairs, score, train, verify, vote)

# Literal, in the order `synth stats` and error messages list them.
KINDS: dict[str, Kind] = {
    "load": load.KIND,
    "generate": generate.KIND,
    "score": score.KIND,
    "export": export.KIND,
    "verify": verify.KIND,
    "vote": vote.KIND,
    "judge": judge.KIND,
    "dedup": dedup.KIND,
    "decontaminate": decontaminate.KIND,
    "filter": filter_.KIND,
    "keep": keep.KIND,
    "mix": mix.KIND,
    "pairs": pairs.KIND,
    "evaluate": evaluate.KIND,
    "failures": failures.KIND,
    "train": train.KIND,
    "command": command.KIND,
}

# every config model has a module and every module a config model, each declared under its own kind
assert set(KINDS) == set(STAGE_MODELS) and all(k == v.name for k, v in KINDS.items()), \
    f"synth/stages: KINDS {sorted(KINDS)} and config.STAGE_MODELS {sorted(STAGE_MODELS)} differ"

FILTER_KINDS = tuple(k for k, v in KINDS.items() if v.verdicts)  # one verdict per input row


def kind_of(kind: str) -> Kind:
    """The declaration of a stage kind; an unknown kind fails loudly (never runs as some other kind)."""
    try:
        return KINDS[kind]
    except KeyError:
        raise SynthError(f"unknown stage kind {kind!r} (synth knows: {', '.join(KINDS)})") from None
