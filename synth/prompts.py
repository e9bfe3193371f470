"""Prompt templates: discovery (workspace prompts/ over built-ins), validation, rendering.

A template is `prompts/NAME.yaml`:

    system: "You are a careful tutor."        # optional, Jinja2
    user: "Solve: {{ question }}"             # required, Jinja2 over the input row's columns
    examples:                                 # optional few-shot turns, each Jinja2 too
      - {user: "2+2?", assistant: "\\boxed{4}"}
    parse: boxed                              # optional: text | json | boxed | final_number

Rendering is strict: a variable missing from a row is an error, and `check_columns` finds such
variables before any teacher is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml
from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, ValidationError

from synth.errors import SynthError
from synth.ids import content_hash
from synth.parsers import PARSERS
from synth.paths import builtin_dir

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


class FewShot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str
    assistant: str


class TemplateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    system: str | None = None
    user: str
    examples: list[FewShot] = []
    parse: str = "text"


@dataclass
class Template:
    name: str
    path: Path
    spec: TemplateSpec
    file_hash: str  # hash of the file's bytes: part of a stage's fingerprint

    @cached_property
    def _compiled(self) -> list[tuple[str, object]]:
        parts = []
        if self.spec.system is not None:
            parts.append(("system", self.spec.system))
        for ex in self.spec.examples:
            parts += [("user", ex.user), ("assistant", ex.assistant)]
        parts.append(("user", self.spec.user))
        out = []
        for role, source in parts:
            try:
                out.append((role, _ENV.from_string(source)))
            except TemplateError as exc:
                raise SynthError(f"{self.path}: {role} template does not parse: {exc}") from None
        return out

    @cached_property
    def variables(self) -> set[str]:
        """Every top-level variable any part of the template reads."""
        names: set[str] = set()
        sources = ([self.spec.system] if self.spec.system else []) + [self.spec.user]
        for ex in self.spec.examples:
            sources += [ex.user, ex.assistant]
        for source in sources:
            try:
                names |= meta.find_undeclared_variables(_ENV.parse(source))
            except TemplateError as exc:
                raise SynthError(f"{self.path}: template does not parse: {exc}") from None
        return names

    def check_columns(self, columns: list[str], where: str) -> None:
        missing = sorted(self.variables - set(columns))
        if missing:
            raise SynthError(f"{where}: template {self.path.name} uses {', '.join(missing)}, which the input "
                             f"does not have (its columns: {', '.join(columns)}); rename the variable or the column")

    def render(self, row: dict, where: str = "") -> list[dict]:
        messages = []
        for role, template in self._compiled:
            try:
                messages.append({"role": role, "content": template.render(row)})
            except Exception as exc:  # noqa: BLE001 - a template is the user's code: any error in it is theirs
                kind = "" if isinstance(exc, TemplateError) else f"{type(exc).__name__}: "
                raise SynthError(f"{where or self.path}: rendering {self.path.name} failed: {kind}{exc}") from None
        return messages


def find_template(name: str, workspace: Path) -> Path | None:
    for folder in (workspace / "prompts", builtin_dir("prompts")):
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def load_template(name: str, workspace: Path, where: str) -> Template:
    path = find_template(name, workspace)
    if path is None:
        raise SynthError(f"{where}: no prompt template {name!r}: looked for {workspace / 'prompts' / (name + '.yaml')} "
                         f"and the built-ins ({', '.join(builtin_names()) or 'none'})")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise SynthError(f"{path}: not valid YAML: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise SynthError(f"{path}: a template is a mapping with at least a `user` key")
    try:
        spec = TemplateSpec.model_validate(data)
    except ValidationError as exc:
        from synth.config import line_of

        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        line = line_of(raw.decode("utf-8", "replace"), [str(p) for p in err["loc"]])
        at = f"{path}:{line}" if line else str(path)
        allowed = "allowed: system, user, examples, parse"
        if err["type"] == "extra_forbidden":
            raise SynthError(f"{at}: unknown key '{key}' ({allowed})") from None
        if err["type"] == "missing":
            raise SynthError(f"{at}: missing required key '{key}' ({allowed})") from None
        raise SynthError(f"{at}: key '{key}': {err['msg'].lower()}") from None
    if spec.parse not in PARSERS:
        raise SynthError(f"{path}: key 'parse': unknown parser {spec.parse!r} (choose from {', '.join(PARSERS)})")
    template = Template(name=name, path=path, spec=spec, file_hash=content_hash(raw.decode("utf-8", "replace")))
    template.variables  # noqa: B018 - parse now so that syntax errors surface during validation
    return template


def builtin_names() -> list[str]:
    folder = builtin_dir("prompts")
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
