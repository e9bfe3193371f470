"""Parsers (synth/parsers.py): completion text -> extra columns.

Contract: a parser never raises on a model's text; what cannot be extracted is None (boxed,
final_number) or {"parse_error": "invalid_json"} (json). The tables below pin what each parser
returns; the "quirks" tables pin behaviour that is questionable but current, so that changing it
is a deliberate decision (see the comments on each row).
"""

from __future__ import annotations

import pytest

from synth.parsers import (
    PARSER_COLUMNS,
    PARSERS,
    final_number,
    last_boxed,
    parse_boxed,
    parse_final_number,
    parse_json,
    parse_text,
)

# Texts that every parser must survive without raising.
NASTY = ["", " ", "{", "}", "\\boxed{", "\\boxed{}", "```", "```json", "```json\n{", "-", ",", ".",
         "1,", "\\fbox{{{", "{\"a\": ", "null", "[]", "é ✓ 🙂", "\x00", "\\boxed{\\boxed{1}"]


# ---- registry ---------------------------------------------------------------------------------------

def test_parser_names():
    """Templates can name exactly these parsers; each has a declared column list."""
    assert set(PARSERS) == {"text", "json", "boxed", "final_number", "score", "winner"}
    assert set(PARSER_COLUMNS) == set(PARSERS)


@pytest.mark.parametrize("name", ["text", "boxed", "final_number"])
@pytest.mark.parametrize("text", ["The answer is \\boxed{42}, i.e. 42.", "nothing to see", ""])
def test_fixed_parser_keys_match_parser_columns(name, text):
    """For parsers with fixed columns, the output keys are exactly PARSER_COLUMNS[name], found or not
    (a missing answer is a None value, never a missing key)."""
    assert list(PARSERS[name](text)) == PARSER_COLUMNS[name]


def test_json_declares_no_fixed_columns():
    """json's columns are whatever keys it finds, so it declares none up front."""
    assert PARSER_COLUMNS["json"] == []
    assert set(PARSERS["json"]('{"x": 1, "y": 2}')) == {"x", "y"}


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize("text", NASTY)
def test_parsers_never_raise(name, text):
    """No completion text makes a parser raise; the result is always a dict with str keys."""
    result = PARSERS[name](text)
    assert isinstance(result, dict)
    assert all(isinstance(k, str) for k in result)


# ---- text -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["anything", "", "\\boxed{1}", '{"a": 1}'])
def test_text_adds_no_columns(text):
    """The text parser adds nothing: the completion itself is the column."""
    assert parse_text(text) == {}


# ---- boxed ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "answer"), [
    ("so \\boxed{42}", "42"),
    ("\\boxed{1} wait, no: \\boxed{2}", "2"),                 # the LAST box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),               # nested braces are matched
    ("$\\boxed{x^{2}+\\sqrt{y_{1}}}$.", "x^{2}+\\sqrt{y_{1}}"),
    ("\\boxed{ 4 }", "4"),                                     # surrounding whitespace stripped
    ("\\fbox{3}", "3"),                                        # \fbox counts as a box
    ("\\boxed{1} then \\fbox{2}", "2"),
    ("\\fbox{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                     # escaped braces balance out
    ("\\boxed{a\nb}", "a\nb"),                                 # multi-line content
])
def test_boxed_extracts_last_box(text, answer):
    """boxed returns the content of the last \\boxed{...}/\\fbox{...}, braces matched."""
    assert parse_boxed(text) == {"answer": answer}
    assert last_boxed(text) == answer


@pytest.mark.parametrize("text", [
    "The answer is 4.",
    "",
    "\\boxed 4",                   # TeX allows a brace-less argument; not recognised
    "\\boxed{4",                   # unclosed
    "\\boxed{1} and \\boxed{2",    # last box unclosed: no fallback to the earlier one
    "boxed{4}",                    # no backslash
])
def test_boxed_none_when_no_closed_box(text):
    """No (closed) last box -> answer None."""
    assert parse_boxed(text) == {"answer": None}


def test_boxed_empty_box_is_no_answer():
    """\\boxed{} (or only spaces) is no answer: None, so that verifiers fail closed."""
    assert parse_boxed("\\boxed{}") == {"answer": None}
    assert parse_boxed("\\boxed{  }") == {"answer": None}


# ---- final_number -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "answer"), [
    ("42", "42"),
    ("a 1 b 2", "2"),                              # the LAST number
    ("The answer is 42.", "42"),                   # sentence period is not a decimal point
    ("#### 72", "72"),
    ("-5", "-5"),                                  # negatives
    ("x = -3.25.", "-3.25"),                       # negative decimal
    ("+7", "7"),                                   # explicit plus dropped
    ("0.5", "0.5"),
    ("1,234", "1234"),                             # thousands separators removed
    ("1,234.5", "1234.5"),
    ("1,000,000", "1000000"),
    ("$1,234.", "1234"),
    ("3 apples, 4 pears", "4"),                    # ", " between numbers is not a separator
    ("1,2,3", "3"),                                # not 3-digit groups: separate numbers
    ("12,34", "34"),
    ("10%", "10"),
    ("007", "007"),                                # leading zeros are kept verbatim
])
def test_final_number(text, answer):
    """final_number returns the last number, thousands separators removed, as a string."""
    assert parse_final_number(text) == {"answer": answer}
    assert final_number(text) == answer


@pytest.mark.parametrize("text", ["", "no digits here", "x - y", "one, two"])
def test_final_number_none_without_digits(text):
    """No number -> answer None."""
    assert parse_final_number(text) == {"answer": None}


# Ambiguous inputs: a sign counts only where it cannot be a hyphen ("10-20" is a range), the Unicode
# minus sign is a minus, ".5" keeps its point; exponents and fractions are not number semantics
# (the last run of digits wins) — verifiers with method: math handle those.
@pytest.mark.parametrize(("text", "answer"), [
    ("pages 10-20", "20"),
    ("on 2024-01-05", "05"),
    ("x = -5", "-5"),
    ("(3)-2", "2"),
    ("1.5e3", "3"),
    ("1/2", "2"),
    (".5", ".5"),
    ("\u22125", "-5"),
    ("1234,567", "567"),
])
def test_final_number_quirks(text, answer):
    """Current behaviour on ambiguous inputs (regex-based, no number semantics)."""
    assert final_number(text) == answer


# ---- json -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "columns"), [
    ('{"a": 1}', {"a": 1}),
    ('Here: {"a": {"b": 2}, "c": [1]} done', {"a": {"b": 2}, "c": [1]}),  # object inside prose
    ('```json\n{"a": 1}\n```', {"a": 1}),                                  # fenced json
    ('Sure!\n```json\n{"a": "x"}\n```\nHope this helps.', {"a": "x"}),
    ('```\n{"a": 1}\n```', {"a": 1}),                                      # fence without language
    ('```JSON\n{"a": 1}\n```', {"a": 1}),                                  # language tag case ignored
    ('{"a": 1} {"b": 2}', {"a": 1}),                                       # the FIRST object only
    ('{"a": null, "b": true}', {"a": None, "b": True}),
    ("{}", {}),                                                            # empty object: no columns
    ('{"é": "✓"}', {"é": "✓"}),
])
def test_json_object_keys_become_columns(text, columns):
    """json returns the top-level keys of the first JSON object in the text (fences allowed)."""
    assert parse_json(text) == columns


@pytest.mark.parametrize("text", [
    "not json",
    "",
    "{bad}",
    "{'a': 1}",               # Python dict literal, not JSON
    '{"a": 1,}',              # trailing comma
    '{"a": 1',                # truncated (e.g. finish_reason=length)
    "[1, 2]",                 # top-level array
    '"just a string"',
    "42",
    "```json\n```",
])
def test_json_invalid_gives_parse_error(text):
    """Anything without a decodable JSON object gives {"parse_error": "invalid_json"}; no exception."""
    assert parse_json(text) == {"parse_error": "invalid_json"}


# Questionable, pinned as-is (see the test report).
@pytest.mark.parametrize(("text", "result"), [
    # Decoding starts at the first '{' only: a brace in prose before the object hides the object.
    ('Use the {key: value} format: {"a": 1}', {"parse_error": "invalid_json"}),
    # Only the first ``` fence is looked at: a non-JSON fence before the JSON one hides it.
    ('```python\nx = 1\n```\n```json\n{"a": 1}\n```', {"parse_error": "invalid_json"}),
    # A top-level array is "anything else" per the docstring, but its first object is returned.
    ('[{"a": 1}, {"a": 2}]', {"a": 1}),
    # A model's own "parse_error" key is indistinguishable from the parser's failure marker.
    ('{"parse_error": "invalid_json"}', {"parse_error": "invalid_json"}),
])
def test_json_quirks(text, result):
    """Current behaviour on inputs where the 'first JSON object' rule is questionable."""
    assert parse_json(text) == result


def test_json_nan_is_accepted():
    """Python's decoder accepts NaN, which is not JSON; the value comes back as a float nan."""
    value = parse_json('{"a": NaN}')["a"]
    assert value != value
