"""Text length within bounds, in characters: `args: {min_chars: 1, max_chars: 8000, column: text}`."""


def judge(row, min_chars: int = 1, max_chars: int = 8000, column: str = "text"):
    n = len(row.get(column) or "")
    if n < min_chars:
        return False, "too_short"
    if n > max_chars:
        return False, "too_long"
    return True
