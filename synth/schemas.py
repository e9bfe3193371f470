"""Structured output: a stage's JSON schema (`schema:` inline, or a .json/.yaml file), checked when the
pipeline is loaded, sent to the backend that can enforce it (OpenAI-compatible `response_format`,
vLLM's structured outputs, xgrammar for hf), and checked again on every answer: an answer that is not
a JSON object valid under the schema is an error row with cause `schema_violation` (fail closed, a
re-run asks again). The schema's top-level properties become the stage's columns.

`schema: auto` (what a judge's critic calls use) is the schema of the template's parser where there is
one — `score` -> {"score": 1..10}, `winner` -> {"winner": "A"|"B"} — when the backend can enforce it,
and no schema otherwise (an unenforced schema would only turn a critic's prose into errors). An `auto`
schema is a request to the backend, not a contract: its answers are not checked (a server that ignores
`response_format` still has its `Score: N` read by the parser).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from synth.config import load_yaml_file
from synth.errors import SynthError, one_line
from synth.parsers import parse_json

AUTO = {
    "score": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
              "required": ["score"], "additionalProperties": False},
    "winner": {"type": "object", "properties": {"winner": {"type": "string", "enum": ["A", "B"]}},
               "required": ["winner"], "additionalProperties": False},
}
MAX_SCHEMA_BYTES = 256 * 1024


def resolve(value, parse: str, enforced: bool, base_dir: Path, where: str) -> dict | None:
    """The schema a stage's `schema:` names: a mapping as is, a file (relative to the pipeline), `auto`
    (see the module docstring), None. Checked: a valid JSON Schema describing an object."""
    if value is None or value == "none":
        return None
    if value == "auto":
        return AUTO.get(parse) if enforced else None
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            raise SynthError(f"{where}: key 'schema': no such file {path} (a JSON schema: inline, a .json or .yaml "
                             "file, or auto)")
        if path.stat().st_size > MAX_SCHEMA_BYTES:
            raise SynthError(f"{where}: key 'schema': {path} is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
        _, value = load_yaml_file(path, "a JSON schema")  # YAML reads JSON too
    if not isinstance(value, dict):
        raise SynthError(f"{where}: key 'schema': a JSON schema is a mapping, not {type(value).__name__}")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        raise SynthError(f"{where}: key 'schema': not a valid JSON schema: {one_line(exc.message)[:300]}") from None
    if value.get("type") != "object":
        raise SynthError(f"{where}: key 'schema': the answer is a JSON object: give `type: object` and its "
                         "`properties` (they become the stage's columns)")
    return value


def properties(schema: dict | None) -> list[str]:
    """The schema's top-level properties, in order: the stage's extra columns."""
    return [str(k) for k in (schema or {}).get("properties", {})]


class Checker:
    """Validates answers against one schema (compiled once per stage)."""

    def __init__(self, schema: dict):
        self.validator = jsonschema.validators.validator_for(schema)(schema)

    def problem(self, text: str | None) -> str | None:
        """Why `text` is not a valid answer, or None."""
        value = parse_json(text or "")
        if "parse_error" in value:
            return f"not a JSON object: {(text or '')[:200]!r}"
        error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        if error is None:
            return None
        at = "/".join(str(p) for p in error.absolute_path) or "the answer"
        return f"{at}: {one_line(error.message)[:300]} (answer {json.dumps(value)[:200]})"
