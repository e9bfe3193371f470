"""Prompt templates (synth/prompts.py): loading, validation, discovery, rendering, sandboxing.

Contract: every problem with a template is a SynthError whose message is one line naming the file
(and the key or variable at fault); rendering is strict (a missing variable is an error) and
sandboxed (a template cannot reach Python internals).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from synth.errors import SynthError
from synth.ids import content_hash
from synth.parsers import PARSERS
from synth.paths import builtin_dir
from synth.prompts import builtin_names, find_template, load_template

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ws(tmp_path: Path) -> Path:
    """A workspace with an empty prompts/ folder."""
    (tmp_path / "ws" / "prompts").mkdir(parents=True)
    return tmp_path / "ws"


@pytest.fixture()
def builtins(tmp_path: Path, monkeypatch) -> Path:
    """A private built-in prompts folder, so discovery tests do not depend on the repo's prompts/."""
    folder = tmp_path / "builtin" / "prompts"
    folder.mkdir(parents=True)
    monkeypatch.setattr("synth.prompts.builtin_dir", lambda kind: folder.parent / kind)
    return folder


def put(ws: Path, name: str, yaml_text: str) -> Path:
    path = ws / "prompts" / f"{name}.yaml"
    path.write_text(textwrap.dedent(yaml_text), encoding="utf-8")
    return path


def load(ws: Path, name: str, yaml_text: str):
    put(ws, name, yaml_text)
    return load_template(name, ws, where="pipeline.yaml: stage 'gen'")


def error_of(ws: Path, name: str, yaml_text: str) -> str:
    put(ws, name, yaml_text)
    with pytest.raises(SynthError) as info:
        load_template(name, ws, where="pipeline.yaml: stage 'gen'")
    return str(info.value)


def assert_one_line(message: str) -> None:
    assert "\n" not in message, f"error message is not one line: {message!r}"


# ---- rendering --------------------------------------------------------------------------------------

def test_render_messages_in_order(ws):
    """render gives system, then each few-shot example as a user/assistant pair, then the user turn,
    each part rendered with the row's columns."""
    t = load(ws, "t", """\
        system: "You tutor {{ topic }}."
        user: "Solve: {{ question }}"
        examples:
          - {user: "2+2?", assistant: "\\\\boxed{4}"}
          - {user: "{{ topic }}: 3+3?", assistant: "\\\\boxed{6}"}
        parse: boxed
        """)
    assert t.render({"question": "1+1?", "topic": "sums"}) == [
        {"role": "system", "content": "You tutor sums."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "\\boxed{4}"},
        {"role": "user", "content": "sums: 3+3?"},
        {"role": "assistant", "content": "\\boxed{6}"},
        {"role": "user", "content": "Solve: 1+1?"},
    ]


def test_render_without_system_or_examples(ws):
    """A template with only `user` renders to a single user message."""
    t = load(ws, "t", 'user: "{{ question }}"\n')
    assert t.render({"question": "Q"}) == [{"role": "user", "content": "Q"}]


def test_render_ignores_extra_columns(ws):
    """Columns the template does not use are allowed and ignored."""
    t = load(ws, "t", 'user: "{{ question }}"\n')
    assert t.render({"id": "7", "question": "Q", "answer_gold": "3"}) == [{"role": "user", "content": "Q"}]


def test_render_does_not_autoescape(ws):
    """Prompts are plain text, not HTML: <, > and & are sent as is."""
    t = load(ws, "t", 'user: "{{ question }}"\n')
    assert t.render({"question": "Is 1 < 2 & 3 > 2?"})[0]["content"] == "Is 1 < 2 & 3 > 2?"


def test_render_keeps_trailing_newline(ws):
    """A YAML block scalar's trailing newline is part of the prompt (keep_trailing_newline)."""
    t = load(ws, "t", """\
        user: |
          Q: {{ question }}
        """)
    assert t.render({"question": "x"})[0]["content"] == "Q: x\n"


def test_render_missing_variable_is_synth_error(ws):
    """Rendering is strict: a variable missing from the row raises SynthError naming it and `where`."""
    t = load(ws, "t", 'user: "{{ question }} {{ hint }}"\n')
    with pytest.raises(SynthError) as info:
        t.render({"question": "Q"}, where="stage 'gen': input row id '3'")
    message = str(info.value)
    assert "hint" in message and "row id '3'" in message
    assert_one_line(message)


def test_render_is_stable_across_calls(ws):
    """Rendering the same row twice gives equal messages (compiled templates are reused)."""
    t = load(ws, "t", 'system: "s"\nuser: "{{ question }}"\n')
    assert t.render({"question": "Q"}) == t.render({"question": "Q"})


def test_render_column_named_self(ws):
    """A row may have any column names, including 'self'; rendering must not crash on them."""
    t = load(ws, "t", 'user: "{{ question }}"\n')
    assert t.render({"question": "Q", "self": "x"}) == [{"role": "user", "content": "Q"}]


def test_render_python_error_is_synth_error(ws):
    """Any failure while rendering a row is a SynthError naming the template, not a traceback."""
    t = load(ws, "t", 'user: "{{ question + 1 }}"\n')
    with pytest.raises(SynthError, match="t.yaml"):
        t.render({"question": "Q"})


# ---- validation at load -----------------------------------------------------------------------------

def test_unknown_top_level_key_rejected(ws):
    """An unknown key is a one-line SynthError naming the file and the key."""
    message = error_of(ws, "bad", 'user: "q"\nbogus: 1\n')
    assert "bad.yaml" in message and "bogus" in message
    assert_one_line(message)


def test_unknown_key_in_example_rejected(ws):
    """An unknown key inside a few-shot example is rejected, naming the example's path."""
    message = error_of(ws, "bad", 'user: "q"\nexamples:\n  - {user: "a", assistant: "b", extra: 1}\n')
    assert "bad.yaml" in message and "examples.0.extra" in message
    assert_one_line(message)


def test_missing_user_rejected(ws):
    """`user` is required."""
    message = error_of(ws, "bad", 'system: "s"\n')
    assert "bad.yaml" in message and "user" in message
    assert_one_line(message)


def test_example_without_assistant_rejected(ws):
    """A few-shot example needs both `user` and `assistant`."""
    message = error_of(ws, "bad", 'user: "q"\nexamples:\n  - {user: "a"}\n')
    assert "bad.yaml" in message and "assistant" in message
    assert_one_line(message)


def test_unknown_parser_rejected(ws):
    """`parse:` must name a known parser; the error names the file, the bad name and the choices."""
    message = error_of(ws, "bad", 'user: "q"\nparse: xml\n')
    assert "bad.yaml" in message and "'xml'" in message and "boxed" in message
    assert_one_line(message)


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_every_known_parser_accepted(ws, parser):
    """Every parser in PARSERS can be named by a template."""
    assert load(ws, "t", f'user: "q"\nparse: {parser}\n').spec.parse == parser


def test_parse_defaults_to_text(ws):
    """Without `parse:`, the text parser is used."""
    assert load(ws, "t", 'user: "q"\n').spec.parse == "text"


@pytest.mark.parametrize("yaml_text", ["", "- user: q\n", "just a string\n"])
def test_non_mapping_rejected(ws, yaml_text):
    """A file that is not a YAML mapping (empty, a list, a scalar) is rejected naming the file."""
    message = error_of(ws, "bad", yaml_text)
    assert "bad.yaml" in message
    assert_one_line(message)


def test_invalid_yaml_rejected(ws):
    """YAML syntax errors become a one-line SynthError naming the file."""
    message = error_of(ws, "bad", 'user: "unterminated\nparse: [boxed\n')
    assert "bad.yaml" in message
    assert_one_line(message)


def test_jinja_syntax_error_rejected_at_load(ws):
    """A Jinja syntax error is found when loading (before any teacher is called), naming the file."""
    message = error_of(ws, "bad", 'user: |\n  line one\n  {{ question\n  three\n')
    assert "bad.yaml" in message
    assert_one_line(message)


def test_jinja_syntax_error_in_example_rejected_at_load(ws):
    """Few-shot examples are templates too and are checked at load."""
    message = error_of(ws, "bad", 'user: "q"\nexamples:\n  - {user: "{% if %}", assistant: "b"}\n')
    assert "bad.yaml" in message
    assert_one_line(message)


def test_file_hash_covers_the_whole_file(ws):
    """file_hash is the hash of the file's text, so even a comment change changes a stage's fingerprint."""
    a = load(ws, "t", 'user: "{{ question }}"\n')
    b = load(ws, "t", '# reworded\nuser: "{{ question }}"\n')
    assert a.file_hash == content_hash('user: "{{ question }}"\n')
    assert a.file_hash != b.file_hash


# ---- variables and check_columns --------------------------------------------------------------------

def test_variables_cover_all_parts(ws):
    """variables lists every top-level variable read by system, user and the examples."""
    t = load(ws, "t", """\
        system: "{{ persona }}"
        user: "{{ question }} {{ meta.source }}"
        examples:
          - {user: "{{ ex_q }}", assistant: "{{ ex_a }}"}
        """)
    assert t.variables == {"persona", "question", "meta", "ex_q", "ex_a"}


def test_variables_exclude_locals_and_globals(ws):
    """Loop variables, {% set %} names and Jinja globals (range, loop) are not input columns."""
    t = load(ws, "t", 'user: "{% set n = 2 %}{% for i in range(n) %}{{ loop.index }}{{ question }}{% endfor %}"\n')
    assert t.variables == {"question"}


def test_check_columns_passes_when_all_present(ws):
    """No error when every variable is an input column (extra columns are fine)."""
    t = load(ws, "t", 'system: "{{ topic }}"\nuser: "{{ question }}"\n')
    t.check_columns(["id", "question", "topic", "answer_gold"], where="stage 'gen'")


def test_check_columns_names_missing_variable(ws):
    """A variable that is not an input column is reported naming the variable, the template and `where`."""
    t = load(ws, "t", 'user: "{{ question }} {{ hint }}"\n')
    with pytest.raises(SynthError) as info:
        t.check_columns(["id", "question"], where="stage 'gen'")
    message = str(info.value)
    assert "hint" in message and "t.yaml" in message and "stage 'gen'" in message
    assert_one_line(message)


def test_check_columns_finds_variable_used_only_in_an_example(ws):
    """Variables in few-shot examples are checked too."""
    t = load(ws, "t", 'user: "{{ question }}"\nexamples:\n  - {user: "{{ shot }}", assistant: "a"}\n')
    with pytest.raises(SynthError, match="shot"):
        t.check_columns(["question"], where="stage 'gen'")


# ---- discovery: workspace over built-ins ------------------------------------------------------------

def test_workspace_template_shadows_builtin(ws, builtins):
    """prompts/NAME.yaml in the workspace wins over a built-in of the same name."""
    (builtins / "cot.yaml").write_text('user: "builtin {{ question }}"\n')
    put(ws, "cot", 'user: "mine {{ question }}"\n')
    t = load_template("cot", ws, where="w")
    assert t.path == ws / "prompts" / "cot.yaml"
    assert t.render({"question": "Q"}) == [{"role": "user", "content": "mine Q"}]


def test_builtin_used_when_workspace_has_none(ws, builtins):
    """Without a workspace file of that name, the built-in is loaded."""
    (builtins / "cot.yaml").write_text('user: "builtin {{ question }}"\n')
    t = load_template("cot", ws, where="w")
    assert t.path == builtins / "cot.yaml"
    assert t.render({"question": "Q"}) == [{"role": "user", "content": "builtin Q"}]


def test_builtin_used_when_workspace_has_no_prompts_folder(tmp_path, builtins):
    """A workspace without a prompts/ folder still finds built-ins."""
    (builtins / "cot.yaml").write_text('user: "{{ question }}"\n')
    assert find_template("cot", tmp_path) == builtins / "cot.yaml"


def test_unknown_template_names_where_it_looked(ws, builtins):
    """A missing template is a one-line SynthError naming the template, the workspace path and the
    built-ins available."""
    (builtins / "answer.yaml").write_text('user: "q"\n')
    with pytest.raises(SynthError) as info:
        load_template("nope", ws, where="pipeline.yaml: stage 'gen'")
    message = str(info.value)
    assert "'nope'" in message and str(ws / "prompts" / "nope.yaml") in message and "answer" in message
    assert "stage 'gen'" in message
    assert_one_line(message)


def test_repo_builtins_are_found_in_a_checkout():
    """In a checkout, built-ins are the repository root's prompts/ and each one loads."""
    assert builtin_dir("prompts") == REPO / "prompts"
    names = builtin_names()
    assert names, "no built-in templates found"
    for name in names:
        t = load_template(name, REPO / "nonexistent-workspace", where="w")
        assert t.path == REPO / "prompts" / f"{name}.yaml"


# ---- sandbox ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ question.__class__ }}",
    "{{ question|attr('__class__') }}",
    "{{ '{0.__class__}'.format(question) }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ question.upper.__self__ }}",
    "{% set c = question.__class__ %}{{ c }}",
])
def test_sandbox_blocks_python_internals(ws, expr):
    """A template cannot reach Python internals: rendering fails with a one-line SynthError and
    never leaks a class or module into the prompt."""
    put(ws, "evil", f"user: \"{expr}\"\n")
    t = load_template("evil", ws, where="w")
    with pytest.raises(SynthError) as info:
        t.render({"question": "Q"})
    message = str(info.value)
    assert "evil.yaml" in message and "<class" not in message and "<module" not in message
    assert_one_line(message)


def test_sandbox_allows_ordinary_string_methods(ws):
    """The sandbox still allows normal, safe templating: filters and string methods."""
    t = load(ws, "t", "user: \"{{ question.strip().upper() }} {{ items|join(', ') }} {{ n * 2 }}\"\n")
    assert t.render({"question": " q ", "items": ["a", "b"], "n": 3})[0]["content"] == "Q a, b 6"
