"""A verdict: what a filter says about one row. Filters never delete; they write one verdict per row
they judge into synth.verdicts, and `keep` stages select by them.

Contract: `passed` is a bool; `score` a float or None; `reason` a short code, None when passed
(for example `wrong_answer`, `unparseable_answer`, `minority_answer`, `duplicate_of:<id>`,
`contaminated:<file>`); `details` optional JSON-able facts behind the verdict (kept in the store).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float | None = None
    reason: str | None = None
    details: dict | None = None

    @staticmethod
    def ok(score: float | None = None, details: dict | None = None) -> "Verdict":
        return Verdict(True, score, None, details)

    @staticmethod
    def fail(reason: str, score: float | None = None, details: dict | None = None) -> "Verdict":
        return Verdict(False, score, reason, details)
