"""Prompt templates: discovery (workspace prompts/ over built-ins), validation, rendering.

A template is `prompts/NAME.yaml`:

    system: "You are a careful tutor."        # optional, Jinja2
    user: "Solve: {{ question }}"             # required, Jinja2 over the input row's columns
    examples:                                 # optional few-shot turns, each Jinja2 too
      - {user: "2+2?", assistant: "\\boxed{4}"}
    parse: boxed                              # optional: text | json | boxed | final_number

Rendering is strict: a variable missing from a row is an error, and `check_columns` finds such
variables before any teacher is called.

Rendering is bounded, so that a template cannot hang a run or fill the memory: at most
MAX_RENDER_CHARS characters per rendered prompt (2 Mi: ~500k tokens, beyond any model's context),
MAX_RENDER_STEPS steps of template code per row (loops included) and MAX_RENDER_SECONDS; the
operations that grow a string or list at once (`*`, `**`, `+`, `~`, `center`, `indent`, `replace`,
`join`, `batch`, `ljust`, `lipsum`, ...) are refused beyond the same size. A template cannot include,
import or extend another file.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from jinja2 import StrictUndefined, TemplateError, UndefinedError, meta, nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, ValidationError

from synth.config import line_of, load_yaml_file
from synth.errors import MissingValue, SynthError, one_line
from synth.ids import content_hash
from synth.parsers import PARSERS
from synth.paths import builtin_dir

MAX_RENDER_CHARS = 2 * 2 ** 20  # one rendered prompt (all its messages)
MAX_RENDER_STEPS = 1_000_000  # lines of template code run for one row (a loop's body counts each time)
MAX_RENDER_SECONDS = 10.0
MAX_WIDTH = 100_000  # a width or count given to a filter or method that widens a string (as Jinja's range)


class RenderLimit(Exception):
    """A template went over a render limit (see the module docstring)."""


def _refuse(what: str) -> None:
    raise RenderLimit(what)


def _size(value) -> int:
    try:
        return len(value) if isinstance(value, (str, list, tuple, dict)) else 0
    except TypeError:
        return 0


def _check_size(value, what: str):
    if _size(value) > MAX_RENDER_CHARS:
        _refuse(f"{what} would make a value of {_size(value):,} items (the limit is {MAX_RENDER_CHARS:,})")
    return value


def _check_format(fmt, args) -> None:
    """A format string's widths (`%0999999999d`, `{:>999999999}`, `%*d` with a huge argument)."""
    if isinstance(fmt, str) and (re.search(r"\d{7,}", fmt) or ("*" in fmt and any(
            isinstance(a, int) and abs(a) > MAX_WIDTH for a in (args if isinstance(args, (list, tuple)) else [args])))):
        _refuse(f"a format width over {MAX_WIDTH:,}")


class _Codegen(CodeGenerator):
    """`a ~ b` checked like `a + b` (Jinja compiles it to a join that no sandbox hook sees)."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.checked_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


def _limited_filter(name: str, f):
    """A Jinja filter that refuses widths/counts beyond MAX_WIDTH and results beyond MAX_RENDER_CHARS."""
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        value, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        extra = list(rest) + list(kwargs.values())
        if name in ("center", "indent", "wordwrap", "batch", "slice") and \
                any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_WIDTH for a in extra):
            _refuse(f"filter {name!r} was given a width or count over {MAX_WIDTH:,}")
        if name in ("join", "batch", "slice") and value is not None and not isinstance(value, (str, list, tuple)):
            value = list(value)
            args = (*args[:skip], value, *rest)
        if name == "format":
            _check_format(value, extra)
        n = _size(value) + 1
        if name == "replace" and isinstance(value, str) and len(rest) >= 2:
            old, new = str(rest[0]), str(rest[1])
            n = value.count(old) if old else len(value) + 1
            if len(value) + n * (len(new) - len(old)) > MAX_RENDER_CHARS:
                _refuse(f"filter 'replace' would make a string over {MAX_RENDER_CHARS:,} characters")
        elif name in ("join", "indent", "wordwrap"):
            lines = n if name == "join" else (str(value).count("\n") + 1 if name == "indent" else _size(value))
            longest = max((len(a) for a in extra if isinstance(a, str)), default=0)
            if _size(value) + lines * longest > MAX_RENDER_CHARS:
                _refuse(f"filter {name!r} would make a string over {MAX_RENDER_CHARS:,} characters")
        return _check_size(f(*args, **kwargs), f"filter {name!r}")
    return wrapper


_WIDENING_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs", "generate_lorem_ipsum", "replace", "join",
                     "format", "format_map"}


class _LimitedEnvironment(SandboxedEnvironment):
    """The sandbox, with the size limits of the module docstring (the step and time limits are applied
    by _render_bounded while a template runs)."""
    code_generator_class = _Codegen
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("center", "indent", "wordwrap", "batch", "slice", "replace", "join", "format", "xmlattr",
                     "urlize", "pprint", "tojson"):
            if name in self.filters:
                self.filters[name] = _limited_filter(name, self.filters[name])

    def checked_concat(self, value):
        return _check_size(value, "'~'")

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * max(abs(left), 2).bit_length() > 64 * MAX_WIDTH:
            _refuse(f"{left} ** {right} is too large a number")
        if operator == "%":
            _check_format(left, right)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    _refuse(f"'*' would make a value of {len(seq) * n:,} items (the limit is {MAX_RENDER_CHARS:,})")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) and \
                _size(left) + _size(right) > MAX_RENDER_CHARS:
            _refuse(f"'+' would make a value over {MAX_RENDER_CHARS:,} items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        name = getattr(__obj, "__name__", "")
        if name in _WIDENING_METHODS:
            if any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_WIDTH
                   for a in (*args, *kwargs.values())) and name not in ("format", "format_map"):
                _refuse(f"{name}() was given a width or count over {MAX_WIDTH:,}")
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if name in ("format", "format_map"):
                _check_format(owner, [*args, *kwargs.values()])
            if name == "replace" and isinstance(owner, str) and len(args) >= 2:
                old, new = str(args[0]), str(args[1])
                n = owner.count(old) if old else len(owner) + 1
                if len(owner) + n * (len(new) - len(old)) > MAX_RENDER_CHARS:
                    _refuse(f"replace() would make a string over {MAX_RENDER_CHARS:,} characters")
            if name == "join" and isinstance(owner, str) and args:
                items = list(args[0])
                if len(owner) * len(items) + sum(_size(i) for i in items) > MAX_RENDER_CHARS:
                    _refuse(f"join() would make a string over {MAX_RENDER_CHARS:,} characters")
                args = (items, *args[1:])
        return _check_size(super().call(__context, __obj, *args, **kwargs), f"{name or 'a call'}()")


_ENV = _LimitedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def _render_bounded(template, row: dict) -> str:
    """template.render(row) within the limits: output size, steps of template code and time."""
    steps = 0
    deadline = time.monotonic() + MAX_RENDER_SECONDS

    def local(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > MAX_RENDER_STEPS:
            raise RenderLimit(f"it ran more than {MAX_RENDER_STEPS:,} steps (a loop too long, or loops nested "
                              "too deep)")
        if steps % 4096 == 0 and time.monotonic() > deadline:
            raise RenderLimit(f"it ran longer than {MAX_RENDER_SECONDS:g} seconds")
        return local

    def trace(frame, event, arg):
        # only the template's own code is counted (Jinja compiles it under the file name "<template>")
        return local(frame, event, arg) if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        out, size = [], 0
        for chunk in template.generate(row):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise RenderLimit(f"its output is over {MAX_RENDER_CHARS:,} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        sys.settrace(previous)


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
                raise SynthError(f"{self.path}: {role} template does not parse: {one_line(exc)}") from None
            except (RecursionError, MemoryError, RenderLimit):
                raise SynthError(f"{self.path}: {role} template is nested too deeply or too large to "
                                 "compile") from None
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
                ast = _ENV.parse(source)
                names |= meta.find_undeclared_variables(ast)
            except TemplateError as exc:
                raise SynthError(f"{self.path}: template does not parse: {one_line(exc)}") from None
            except RecursionError:
                raise SynthError(f"{self.path}: template is nested too deeply to parse") from None
            for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
                raise SynthError(f"{self.path}:{node.lineno}: a template cannot extend, include or import another "
                                 "file; write it out (few-shot turns go under `examples:`)")
        return names

    def check_columns(self, columns: list[str], where: str) -> None:
        missing = sorted(self.variables - set(columns))
        if missing:
            raise SynthError(f"{where}: template {self.path.name} uses {', '.join(missing)}, which the input "
                             f"does not have (its columns: {', '.join(columns)}); rename the variable or the column")

    def render(self, row: dict, where: str = "") -> list[dict]:
        # A null value (None, NaN) is rendered as missing, never as the text "None": StrictUndefined then
        # raises MissingValue for this row, unless the template declares a default (`| default(...)`).
        row = {k: v for k, v in row.items() if not _is_null(v)}
        messages = []
        for role, template in self._compiled:
            try:
                messages.append({"role": role, "content": _render_bounded(template, row)})
            except UndefinedError as exc:
                m = re.fullmatch(r"'([^']+)' is undefined", str(exc))
                if m is None or m.group(1) in row:  # an attribute or key the template looks up: its own mistake
                    raise SynthError(f"{where or self.path}: rendering {self.path.name} failed: "
                                     f"{one_line(exc)[:500]}") from None
                column = m.group(1)  # a variable whose value is null or absent in this row: the row fails closed
                raise MissingValue(f"{where or self.path}: {self.path.name} uses column {column!r}, which is null or "
                                   "missing in this row; fix the row, or give the variable a default in the template "
                                   "({{ " + column + " | default('') }})", column) from None
            except RenderLimit as exc:
                raise SynthError(f"{where or self.path}: rendering {self.path.name} went over a limit: {exc}; "
                                 "simplify the template") from None
            except Exception as exc:  # noqa: BLE001 - a template is the user's code: any error in it is theirs
                kind = "" if isinstance(exc, TemplateError) else f"{type(exc).__name__}: "
                raise SynthError(f"{where or self.path}: rendering {self.path.name} failed: "
                                 f"{kind}{one_line(exc)[:500]}") from None
        if sum(len(m["content"]) for m in messages) > MAX_RENDER_CHARS:
            raise SynthError(f"{where or self.path}: rendering {self.path.name} went over a limit: the prompt is "
                             f"over {MAX_RENDER_CHARS:,} characters; simplify the template")
        return messages


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: a CSV's empty number


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

    _, data = load_yaml_file(path, "a template")  # strict: UTF-8, no key given twice
    raw = path.read_bytes()
    if not isinstance(data, dict):
        raise SynthError(f"{path}: a template is a mapping with at least a `user` key")
    try:
        spec = TemplateSpec.model_validate(data, strict=True)
    except ValidationError as exc:

        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        line = line_of(raw.decode("utf-8", "replace"), [str(p) for p in err["loc"]])
        at = f"{path}:{line}" if line else str(path)
        allowed = "allowed: system, user, examples, parse"
        if err["type"] == "extra_forbidden":
            raise SynthError(f"{at}: unknown key '{key}' ({allowed})") from None
        if err["type"] == "missing":
            raise SynthError(f"{at}: missing required key '{key}' ({allowed})") from None
        raise SynthError(f"{at}: key '{key}': {one_line(err['msg'].lower())}") from None
    if spec.parse not in PARSERS:
        raise SynthError(f"{path}: key 'parse': unknown parser {spec.parse!r} (choose from {', '.join(PARSERS)})")
    template = Template(name=name, path=path, spec=spec, file_hash=content_hash(raw.decode("utf-8", "replace")))
    template.variables  # noqa: B018 - parse now so that syntax errors surface during validation
    template._compiled  # noqa: B018 - and compile: some errors only show then
    return template


def builtin_names() -> list[str]:
    folder = builtin_dir("prompts")
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []

