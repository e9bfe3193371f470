"""Parsers: completion text -> a dict of extra columns. One function per parser, named by templates.

A template's `parse:` names one of PARSERS. Parsers never raise on a model's text: what cannot be
extracted is None (the verifiers in issue 3 treat None as a failure, never a pass).
"""

from __future__ import annotations

import json
import re
from typing import Callable

# A sign counts only where it cannot be a hyphen or an operator between operands ("10-20" -> 20,
# "x = -5" -> -5); U+2212 is a minus sign too; ".5" is a number.
_NUMBER = re.compile(r"(?:(?<![\w).])[-+\u2212])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def parse_text(text: str) -> dict:
    return {}


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None when absent or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip() or None  # \boxed{} is no answer
        i += 1
    return None


def parse_boxed(text: str) -> dict:
    return {"answer": last_boxed(text)}


def final_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed ("1,234.5" -> "1234.5")."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").replace("\u2212", "-").lstrip("+")


def parse_final_number(text: str) -> dict:
    return {"answer": final_number(text)}


def parse_json(text: str) -> dict:
    """The first JSON object in the text (``` fences allowed); its top-level keys become columns.
    Anything else gives {"parse_error": "invalid_json"}."""
    body = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1).strip()
    start = body.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(body[start:])
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    return {"parse_error": "invalid_json"}


_SCORE_LINE = re.compile(r"(?im)^\W*(?:score|rating)\W*[:=]\s*\**\s*([-+]?\d+(?:\.\d+)?)")


def parse_score(text: str) -> dict:
    """A critic's score: {"score": N} in a JSON object, else the last `Score: N` line; None otherwise."""
    obj = parse_json(text)
    value = obj.get("score") if "parse_error" not in obj else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"score": float(value)}
    if isinstance(value, str):
        try:
            return {"score": float(value.strip())}
        except ValueError:
            pass
    lines = _SCORE_LINE.findall(text or "")
    return {"score": float(lines[-1]) if lines else None}


_WINNER = re.compile(r"(?im)^\W*(?:winner|better|answer)\W*[:=]\s*\**\s*\[?\s*([AB])\b")


def parse_winner(text: str) -> dict:
    """A pairwise critic's choice: {"winner": "A"|"B"} in JSON, else the last `Winner: A|B` line."""
    obj = parse_json(text)
    value = obj.get("winner") if "parse_error" not in obj else None
    if isinstance(value, str) and value.strip().upper() in ("A", "B"):
        return {"winner": value.strip().upper()}
    lines = _WINNER.findall(text or "")
    return {"winner": lines[-1].upper() if lines else None}


PARSERS: dict[str, Callable[[str], dict]] = {
    "text": parse_text,
    "json": parse_json,
    "boxed": parse_boxed,
    "final_number": parse_final_number,
    "score": parse_score,
    "winner": parse_winner,
}

# Columns a parser is known to produce (json's columns are the keys it finds).
PARSER_COLUMNS: dict[str, list[str]] = {"text": [], "json": [], "boxed": ["answer"], "final_number": ["answer"],
                                        "score": ["score"], "winner": ["winner"]}
