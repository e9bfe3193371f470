"""Rejects refusals and assistant boilerplate ("I'm sorry, but I can't ...", "As an AI language model").
`args: {column: text, extra: ["..."]}` adds phrases (case-insensitive)."""

import re

PHRASES = [
    r"\bI(?:'m| am) (?:sorry|afraid)\b.{0,40}\b(?:can(?:'|no)t|unable|not able)\b",
    r"\bI can(?:'|no)t (?:help|assist|comply|provide)\b",
    r"\bI(?:'m| am) (?:unable|not able) to\b",
    r"\bas an AI(?: language)? model\b",
    r"\bI won't be able to\b",
]


def judge(row, column: str = "text", extra: list | None = None):
    text = row.get(column) or ""
    for pattern in PHRASES + [re.escape(p) for p in (extra or [])]:
        if re.search(pattern, text, re.IGNORECASE | re.DOTALL):
            return False, "refusal"
    return True
