"""Rejects degenerate repetition, the usual failure of sampled text: a word n-gram repeated too often.
`args: {n: 4, max_repeats: 4, column: text}` — fails when any n-word sequence occurs more than
max_repeats times; score = the share of n-grams that are repeats."""

from collections import Counter


def judge(row, n: int = 4, max_repeats: int = 4, column: str = "text"):
    words = (row.get(column) or "").split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return True
    counts = Counter(grams)
    repeated = sum(c - 1 for c in counts.values())
    if max(counts.values()) > max_repeats:
        return False, "repetition", repeated / len(grams)
    return True, None, 1.0 - repeated / len(grams)
