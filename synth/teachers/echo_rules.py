"""The echo teacher's reply templates: a sandboxed Jinja2 environment (with `box(x)` and `last_boxed(text)`)
and `compile_reply`. A module of its own so that the config model (synth.teachers.base) can check a rule's
template when the pipeline is loaded without importing the backend.
"""

from __future__ import annotations

from synth.errors import one_line
from synth.parsers import last_boxed


def _box(value) -> str:
    return "\\boxed{" + str(value) + "}"


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment


    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.globals.update(box=_box, last_boxed=last_boxed)
    return env


_ENV = None


def compile_reply(source: str):
    """The compiled Jinja2 template of a rule's reply; ValueError (one line) when it does not parse."""
    global _ENV
    from jinja2 import TemplateError

    if _ENV is None:
        _ENV = _environment()
    try:
        return _ENV.from_string(source)
    except TemplateError as exc:
        raise ValueError(f"reply template does not parse: {one_line(exc)}") from None
