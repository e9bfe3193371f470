"""Answer extraction and verifiers: pure functions from text to a Verdict (no store, no pipeline).

    extract_answer(text, how, pattern=None, field=None) -> str | None   how: none|boxed|final_number|regex|json
    compare(answer, reference, method, tolerance=1e-6) -> Verdict      method: exact|numeric|math
    canonical(answer, method) -> str | None                             a voting key; None when unparseable
    equivalent(a, b, method) -> bool

The code verifier (method `code`) lives in synth/sandbox.py.

Everything FAILS CLOSED: an answer or reference that cannot be extracted or parsed is a failure with
reason `unparseable_answer` / `unparseable_reference`, never a pass (METHODS.md: a widely used recipe
once scored unparseable gold answers as correct). Extraction never raises on a model's text; a bad
*configuration* (unknown `how`/`method`, missing regex pattern) raises ValueError, so that a pipeline
fails at validation instead of silently rejecting every row.

Methods, and the decisions behind them:
- exact: strings equal after `exact_form` (strip, drop surrounding $...$, drop one trailing period,
  collapse whitespace, casefold).
- numeric: both sides must be a *whole* number, `parse_number`: signs (+, -, U+2212), thousands
  separators "1,234", decimals, exponents "1e-3", simple fractions "3/4", and a trailing percent sign
  which is dropped: "50%" reads as 50, not 0.5, because gold answers for "what percent…" questions are
  written "50" (GSM8K and friends); the cost is that "50%" does not match a gold "0.5". Equal when
  exactly equal or math.isclose(rel_tol=tolerance, abs_tol=tolerance).
- math: math-verify (`math_verify.parse` / `verify`, gold first). A string that already holds LaTeX
  delimiters ($, \\(, \\[, \\boxed) is parsed as is; a bare answer is wrapped in $...$ so that
  "\\frac{1}{2}", "0.5", "x+1" and "\\sqrt{8}" all parse (bare, math-verify reads only a leading
  number out of "2\\sqrt{2}" and nothing out of "\\sqrt{8}"). A parse that yields no sympy object
  (only math-verify's string fallback) is unparseable. math-verify's own timeouts use SIGALRM, which
  works only in the main thread, so they are on in the main thread and off in worker threads.
- In every method a reference (and an answer) that normalises to a "no answer" marker such as "n/a",
  "none", "unknown", "?" or "-" is unparseable: wrapped in $...$ math-verify would happily read "n/a"
  as the expression n/a.
"""

from __future__ import annotations

import json
import math
import threading
import re
from fractions import Fraction

from synth.errors import SynthError
from synth.parsers import final_number, last_boxed, parse_json
from synth.verdicts import Verdict

EXTRACTORS = ("none", "boxed", "final_number", "regex", "json")
METHODS = ("exact", "numeric", "math")

# After `exact_form`, these mean "there is no answer" and never count as one.
NO_ANSWER = frozenset({"", "n/a", "na", "none", "null", "nan", "unknown", "?", "-", "--", "\u2013", "\u2014"})

MATH_TIMEOUT_S = 5  # per math-verify parse / comparison, main thread only (SIGALRM)


# ---- extraction ------------------------------------------------------------------------------------

def extract_answer(text: str | None, how: str, pattern: str | None = None, field: str | None = None) -> str | None:
    """The answer in a completion, or None. regex: group 1 when the pattern has groups, else the whole
    match; the LAST match wins. json: `field` (dotted path "a.b", list indices allowed) of the first
    JSON object in the text; strings as they are, other values as JSON text ("3", "true", "[1, 2]"),
    null as None. Results are stripped; an empty result is None."""
    if how not in EXTRACTORS:
        raise ValueError(f"unknown answer extractor {how!r}; expected one of {', '.join(EXTRACTORS)}")
    if how == "regex" and not pattern:
        raise ValueError("extractor 'regex' needs a pattern")
    if how == "json" and not field:
        raise ValueError("extractor 'json' needs a field")
    if not isinstance(text, str):
        return None
    if how == "none":
        found = text
    elif how == "boxed":
        found = last_boxed(text)
    elif how == "final_number":
        found = final_number(text)
    elif how == "regex":
        found = _last_regex_match(text, pattern)
    else:
        found = _json_field(text, field)
    if found is None:
        return None
    return found.strip() or None


def _last_regex_match(text: str, pattern: str) -> str | None:
    compiled = re.compile(pattern)  # an invalid pattern is a configuration error: let re.error out
    last = None
    for last in compiled.finditer(text):
        pass
    if last is None:
        return None
    return last.group(1) if compiled.groups else last.group(0)  # group 1 may be None (did not take part)


def _json_field(text: str, field: str) -> str | None:
    value: object = parse_json(text)
    if value == {"parse_error": "invalid_json"}:  # parse_json's marker for "no JSON object"
        return None
    if field in value:  # a top-level key that itself contains dots
        value = value[field]
    else:
        for part in field.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
                value = value[int(part)]
            else:
                return None
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# ---- normalisation and numbers -------------------------------------------------------------------------

def exact_form(text: str | None) -> str | None:
    """The `exact` form: stripped, surrounding $...$ (or $$...$$) removed, one trailing period removed,
    whitespace collapsed, casefolded. None for None."""
    if text is None:
        return None
    s = text.strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    if s.endswith("."):
        s = s[:-1]
    return " ".join(s.split()).casefold()


def _no_answer(text: str | None) -> bool:
    n = exact_form(text)
    return n is None or n in NO_ANSWER


# A whole number: sign, digits (with correct thousands grouping, or none), decimals, a short exponent
# (longer exponents would make Fraction build enormous integers), or a simple fraction of integers.
_DECIMAL = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?")
_RATIO = re.compile(r"[+-]?\d+\s*/\s*[+-]?\d+")


def parse_number(text: str | None) -> Fraction | None:
    """`text` as an exact number, or None when it is not one number (see the module docstring)."""
    if not isinstance(text, str):
        return None
    s = text.strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    s = s.replace("\u2212", "-")
    if s.endswith("%"):
        s = s[:-1].removesuffix("\\").strip()  # "50%" and LaTeX "50\%"
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s.replace(",", ""))
        if _RATIO.fullmatch(s):
            num, den = (int(part) for part in s.split("/"))
            return Fraction(num, den) if den else None
    except (ValueError, ZeroDivisionError, OverflowError):  # e.g. more digits than int() accepts
        return None
    return None


def _number_key(value: Fraction) -> str:
    """A canonical spelling: "0.5" for 1/2, 1/2 and 0.50; "-3" for -3.0; "1/3" when the decimal does not end."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = max(twos, fives)
    scaled = abs(value.numerator) * 10**digits // value.denominator
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled // 10**digits}.{scaled % 10**digits:0{digits}d}"


def _numbers_close(a: Fraction, b: Fraction, tolerance: float) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance)
    except OverflowError:  # beyond float range and not exactly equal
        return False


# ---- math-verify ---------------------------------------------------------------------------------------

_LATEX_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed\b|\\fbox\b")
_SCIENTIFIC = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))[eE]([+-]?\d+)")


def _math_timeout() -> int | None:
    # math-verify times out with SIGALRM, which raises ValueError outside the main thread.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_parse(text: str | None) -> list | None:
    """math-verify's parse of `text` (a list with at least one sympy object), or None when unparseable."""
    if _no_answer(text):
        return None
    from math_verify import parse  # imported here: math-verify pulls in sympy (about a second)
    from sympy import Basic, MatrixBase

    s = text.strip()
    scientific = _SCIENTIFIC.fullmatch(s)
    if scientific:  # math-verify has no e-notation: "1e-3" would read as 1*e - 3
        s = f"{scientific.group(1)} \\times 10^{{{scientific.group(2)}}}"
    if not _LATEX_DELIMITED.search(s):
        s = f"${s}$"
    try:
        parsed = parse(s, parsing_timeout=_math_timeout())
    except BaseException as error:  # math-verify's TimeoutException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    if not any(isinstance(p, (Basic, MatrixBase)) for p in parsed):
        return None
    return parsed


def _math_verify(gold: list, target: list) -> bool:
    from math_verify import verify

    try:
        return bool(verify(gold, target, timeout_seconds=_math_timeout()))
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def _math_key(parsed: list) -> str | None:
    """sympy's string of the simplified expression, floats made exact rationals first (so that 0.50
    and \\frac{1}{2} share a key); the unsimplified string when simplification fails or is too costly."""
    import sympy

    expr = next(p for p in parsed if isinstance(p, (sympy.Basic, sympy.MatrixBase)))

    def simplified():
        return sympy.simplify(sympy.nsimplify(expr, rational=True))

    try:
        if _math_timeout() is not None:
            from math_verify.utils import timeout

            expr = timeout(MATH_TIMEOUT_S)(simplified)()
        elif sympy.count_ops(expr) <= 40:  # no timeout in worker threads: simplify only small things
            expr = simplified()
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
    try:
        return str(expr)
    except Exception:
        return None


# ---- comparing -----------------------------------------------------------------------------------------

def compare(answer: str | None, reference: str | None, method: str, tolerance: float = 1e-6) -> Verdict:
    """Does `answer` match the gold `reference`? Pass: Verdict(True, 1.0). Fail: score 0.0 and reason
    unparseable_reference (checked first), unparseable_answer or wrong_answer. `tolerance` is for numeric."""
    if method not in METHODS:
        raise ValueError(f"unknown verify method {method!r}; expected one of {', '.join(METHODS)}")
    details = {"answer": _clip(answer), "reference": _clip(reference)}
    if method == "exact":
        ref, ans = exact_form(reference), exact_form(answer)
        ok_ref, ok_ans = not _no_answer(reference), not _no_answer(answer)
        same = ok_ref and ok_ans and ref == ans
    elif method == "numeric":
        ref = None if _no_answer(reference) else parse_number(reference)
        ans = None if _no_answer(answer) else parse_number(answer)
        ok_ref, ok_ans = ref is not None, ans is not None
        same = ok_ref and ok_ans and _numbers_close(ans, ref, tolerance)
    else:
        ref = _math_parse(reference)
        ans = _math_parse(answer) if ref is not None else None  # parse only what will be compared
        ok_ref, ok_ans = ref is not None, ans is not None
        same = ok_ref and ok_ans and _math_verify(ref, ans)
    if not ok_ref:
        return Verdict.fail("unparseable_reference", 0.0, details)
    if not ok_ans:
        return Verdict.fail("unparseable_answer", 0.0, details)
    return Verdict.ok(1.0, details) if same else Verdict.fail("wrong_answer", 0.0, details)


def canonical(answer: str | None, method: str) -> str | None:
    """The equivalence-class key for self-consistency voting; None when unparseable. exact: the
    normalised string; numeric: `_number_key` ("0.5" for 0.5, 1/2, 0.50, 50%→"50"); math: the sympy
    string of the simplified parse (see `_math_key`). Keys ignore tolerance: 0.333333 and 1/3 get
    different keys although `equivalent` says they match under math."""
    if method not in METHODS:
        raise ValueError(f"unknown verify method {method!r}; expected one of {', '.join(METHODS)}")
    if _no_answer(answer):
        return None
    if method == "exact":
        return exact_form(answer)
    if method == "numeric":
        value = parse_number(answer)
        return None if value is None else _number_key(value)
    parsed = _math_parse(answer)
    return None if parsed is None else _math_key(parsed)


def equivalent(a: str | None, b: str | None, method: str) -> bool:
    """Are two answers the same (both parseable)? Symmetric by construction: numeric uses the default
    tolerance (isclose is symmetric); math needs math-verify to agree in BOTH directions, since its
    verify(gold, target) is not symmetric and a false merge would inflate a majority."""
    if method not in METHODS:
        raise ValueError(f"unknown verify method {method!r}; expected one of {', '.join(METHODS)}")
    if method != "math":
        return compare(a, b, method).passed
    pa, pb = _math_parse(a), _math_parse(b)
    return pa is not None and pb is not None and _math_verify(pa, pb) and _math_verify(pb, pa)


def _clip(text: str | None, limit: int = 200) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "…"


def check_extract(where: str, extract: str, pattern: str | None, field: str | None, prefix: str = "") -> None:
    """The answer-extraction keys of a verify stage (or of an evaluate stage's `verify:`, prefix
    "verify."), checked at load time: regex needs a valid pattern, json a field."""
    if extract == "regex" and not pattern:
        raise SynthError(f"{where}: key '{prefix}pattern': extract regex needs a pattern")
    if extract == "json" and not field:
        raise SynthError(f"{where}: key '{prefix}field': extract json needs the field to read")
    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SynthError(f"{where}: key '{prefix}pattern': not a valid regular expression ({exc})") from None
