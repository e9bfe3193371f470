"""Answer extraction and comparison (synth/verify.py), table-driven on literal strings.

Every comparison row pins `passed` AND `reason`: fail-closed behaviour (an unparseable reference or
answer is never a pass) is the contract, so the reason matters as much as the outcome.
"""

from __future__ import annotations

import threading

import pytest

from synth.verify import canonical, compare, equivalent, extract_answer, parse_number

# ---- extract_answer ------------------------------------------------------------------------------------

EXTRACT = [
    # (text, how, pattern, field, expected)
    ("  42 \n", "none", None, None, "42"),
    ("   ", "none", None, None, None),
    (None, "none", None, None, None),
    ("so \\boxed{1} then \\boxed{\\frac{1}{2}}.", "boxed", None, None, "\\frac{1}{2}"),
    ("\\boxed{}", "boxed", None, None, None),  # empty box is no answer
    ("no box here: 42", "boxed", None, None, None),
    ("\\boxed{unclosed", "boxed", None, None, None),
    ("from 10 to 1,234.5 apples", "final_number", None, None, "1234.5"),
    ("x = \u22125", "final_number", None, None, "-5"),
    ("no digits", "final_number", None, None, None),
    ("Answer: 3 ... Answer: 7", "regex", r"Answer:\s*(\d+)", None, "7"),  # last match wins
    ("Answer: 3 ... Answer: 7", "regex", r"Answer:\s*\d+", None, "Answer: 7"),  # no group: whole match
    ("nothing", "regex", r"Answer:\s*(\d+)", None, None),
    ("Answer: x", "regex", r"Answer: (\d)?", None, None),  # group 1 did not take part
    ('```json\n{"answer": "B", "n": 3}\n```', "json", None, "answer", "B"),
    ('{"answer": 3}', "json", None, "answer", "3"),  # numbers as JSON text
    ('{"answer": 2.50}', "json", None, "answer", "2.5"),
    ('{"answer": true}', "json", None, "answer", "true"),
    ('{"a": {"b": {"c": "deep"}}}', "json", None, "a.b.c", "deep"),  # dotted path
    ('{"a": [10, 20]}', "json", None, "a.1", "20"),
    ('{"a.b": "dotted key"}', "json", None, "a.b", "dotted key"),
    ('{"answer": null}', "json", None, "answer", None),
    ('{"other": 1}', "json", None, "answer", None),
    ('{"a": 1}', "json", None, "a.b", None),
    ("not json at all", "json", None, "answer", None),
    ('{"answer": ', "json", None, "answer", None),
]


@pytest.mark.parametrize("text,how,pattern,field,expected", EXTRACT)
def test_extract_answer(text, how, pattern, field, expected):
    assert extract_answer(text, how, pattern=pattern, field=field) == expected


@pytest.mark.parametrize("how", ["none", "boxed", "final_number", "regex", "json"])
@pytest.mark.parametrize("text", ["", "{", "\\boxed{", "```json\n{", "\x00", "é ✓ 🙂", "null", "[]"])
def test_extract_never_raises_on_model_text(how, text):
    extract_answer(text, how, pattern=r"(\d+)", field="a.b")


@pytest.mark.parametrize("how,pattern,field", [("magic", None, None), ("regex", None, None), ("json", None, None)])
def test_extract_bad_configuration_raises(how, pattern, field):
    """A configuration mistake is loud, unlike a model's text."""
    with pytest.raises(ValueError):
        extract_answer("text", how, pattern=pattern, field=field)


# ---- compare -------------------------------------------------------------------------------------------

COMPARE = [
    # (answer, reference, method, passed, reason)
    # exact
    (" The  Cat. ", "the cat", "exact", True, None),
    ("$x$", "x", "exact", True, None),
    ("dog", "cat", "exact", False, "wrong_answer"),
    ("dog", "n/a", "exact", False, "unparseable_reference"),
    ("dog", "", "exact", False, "unparseable_reference"),
    ("dog", None, "exact", False, "unparseable_reference"),
    ("", "cat", "exact", False, "unparseable_answer"),
    (None, "cat", "exact", False, "unparseable_answer"),
    ("   ", "cat", "exact", False, "unparseable_answer"),
    (None, None, "exact", False, "unparseable_reference"),  # the reference is checked first
    # numeric
    ("1,000", "1000", "numeric", True, None),
    ("+5", "5", "numeric", True, None),
    ("\u22123", "-3", "numeric", True, None),
    ("3/4", "0.75", "numeric", True, None),
    ("0.50", "1/2", "numeric", True, None),
    ("50%", "50", "numeric", True, None),  # a percent sign is dropped: 50% is 50 ...
    ("50\\%", "50", "numeric", True, None),
    ("50%", "0.5", "numeric", False, "wrong_answer"),  # ... not 0.5
    ("1e-3", "0.001", "numeric", True, None),
    ("5.", "5", "numeric", True, None),
    ("1.0000005", "1", "numeric", True, None),  # inside 1e-6
    ("1.000002", "1", "numeric", False, "wrong_answer"),  # outside
    ("1000000500", "1000000000", "numeric", True, None),  # relative: 5e-7
    ("1000005000", "1000000000", "numeric", False, "wrong_answer"),  # relative: 5e-6
    ("0.0000005", "0", "numeric", True, None),  # absolute tolerance near zero
    ("42", "41", "numeric", False, "wrong_answer"),
    ("42", "n/a", "numeric", False, "unparseable_reference"),
    ("42", "", "numeric", False, "unparseable_reference"),
    ("42", "forty-two", "numeric", False, "unparseable_reference"),
    ("42 apples", "42", "numeric", False, "unparseable_answer"),  # a whole number only
    ("1,00", "100", "numeric", False, "unparseable_answer"),  # bad thousands grouping
    ("1/0", "1", "numeric", False, "unparseable_answer"),
    ("1e999999", "1", "numeric", False, "unparseable_answer"),  # exponent too long to be honest
    ("nan", "nan", "numeric", False, "unparseable_reference"),
    ("inf", "1", "numeric", False, "unparseable_answer"),
    (None, "1", "numeric", False, "unparseable_answer"),
    # math
    ("0.5", "\\frac{1}{2}", "math", True, None),
    ("\\frac{1}{2}", "0.5", "math", True, None),
    ("\\sqrt{8}", "2\\sqrt{2}", "math", True, None),
    ("1+x", "x+1", "math", True, None),
    ("The answer is $\\boxed{42}$.", "42", "math", True, None),  # delimited text is parsed as is
    ("42", "\\boxed{42}", "math", True, None),
    ("\\dfrac12", "\\frac{1}{2}", "math", True, None),
    ("\\{2,1\\}", "\\{1,2\\}", "math", True, None),
    ("1e-3", "0.001", "math", True, None),
    ("\u22123", "-3", "math", True, None),
    ("3", "4", "math", False, "wrong_answer"),
    ("x+2", "x+1", "math", False, "wrong_answer"),
    ("\\sqrt{2}", "2\\sqrt{2}", "math", False, "wrong_answer"),
    ("5", "n/a", "math", False, "unparseable_reference"),  # math-verify alone would read n/a as n÷a
    ("5", "N/A", "math", False, "unparseable_reference"),
    ("5", "", "math", False, "unparseable_reference"),
    ("5", None, "math", False, "unparseable_reference"),
    ("5", "\\frac{}{}", "math", False, "unparseable_reference"),
    ("", "5", "math", False, "unparseable_answer"),
    (None, "5", "math", False, "unparseable_answer"),
    ("?", "5", "math", False, "unparseable_answer"),
    ("\\sqrt{}", "5", "math", False, "unparseable_answer"),
    ("{", "5", "math", False, "unparseable_answer"),
]


@pytest.mark.parametrize("answer,reference,method,passed,reason", COMPARE)
def test_compare(answer, reference, method, passed, reason):
    verdict = compare(answer, reference, method)
    assert (verdict.passed, verdict.reason) == (passed, reason)
    assert verdict.score == (1.0 if passed else 0.0)
    assert verdict.details["reference"] == reference


def test_compare_custom_tolerance():
    assert compare("3.14", "3.14159", "numeric", tolerance=0.01).passed
    assert compare("3.14", "3.14159", "numeric", tolerance=1e-6).reason == "wrong_answer"


def test_compare_unknown_method_raises():
    with pytest.raises(ValueError):
        compare("1", "1", "fuzzy")


def test_math_works_in_a_worker_thread():
    """math-verify's timeouts use SIGALRM (main thread only); off the main thread they are disabled
    instead of every comparison failing with ValueError."""
    results = []
    thread = threading.Thread(target=lambda: results.append(compare("0.5", "\\frac{1}{2}", "math")))
    thread.start()
    thread.join()
    assert results[0].passed


# ---- parse_number, canonical, equivalent ------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("1,234.5", "2469/2"), ("-3/4", "-3/4"), ("50%", "50"), (".5", "1/2"),
                                           ("x", None), ("", None), ("1.2.3", None), (None, None)])
def test_parse_number(text, expected):
    value = parse_number(text)
    assert (None if value is None else str(value)) == expected


CANONICAL = [
    # (answer, method, key)
    ("  The  Cat. ", "exact", "the cat"),
    ("n/a", "exact", None),
    ("", "exact", None),
    ("0.5", "numeric", "0.5"),
    ("1/2", "numeric", "0.5"),
    ("0.50", "numeric", "0.5"),
    ("-0.0", "numeric", "0"),
    ("3.000", "numeric", "3"),
    ("1e-3", "numeric", "0.001"),
    ("12,345.600", "numeric", "12345.6"),
    ("1/3", "numeric", "1/3"),
    ("abc", "numeric", None),
    ("\\frac{1}{2}", "math", "1/2"),
    ("0.5", "math", "1/2"),
    ("0.50", "math", "1/2"),
    ("2\\sqrt{2}", "math", "2*sqrt(2)"),
    ("\\sqrt{8}", "math", "2*sqrt(2)"),
    ("x+1", "math", "x + 1"),
    ("1+x", "math", "x + 1"),
    ("n/a", "math", None),
    ("?", "math", None),
    (None, "math", None),
]


@pytest.mark.parametrize("answer,method,key", CANONICAL)
def test_canonical(answer, method, key):
    assert canonical(answer, method) == key


EQUIVALENT = [
    ("The cat", "the cat.", "exact", True),
    ("cat", "dog", "exact", False),
    ("n/a", "n/a", "exact", False),  # no answer is never the same answer
    ("1/2", "0.5", "numeric", True),
    ("1.0000005", "1", "numeric", True),
    ("2", "3", "numeric", False),
    ("x", "x", "numeric", False),
    ("\\frac{1}{2}", "0.5", "math", True),
    ("2\\sqrt{2}", "\\sqrt{8}", "math", True),
    ("x+1", "1+x", "math", True),
    ("\\frac{1}{3}", "0.333333", "math", True),  # math-verify rounds floats; canonical keys differ here
    ("3", "4", "math", False),
    ("n/a", "n/a", "math", False),
    ("", "", "math", False),
]


@pytest.mark.parametrize("a,b,method,same", EQUIVALENT)
def test_equivalent(a, b, method, same):
    assert equivalent(a, b, method) is same
    assert equivalent(b, a, method) is same  # symmetric
