"""The demo world: multi-step arithmetic word problems with integer answers, made by a seeded program.

Every problem starts with a quantity and applies 2-4 operations (world.yaml's `ops`) (buys more, gives away, gets k times
as many, shares equally among k friends and keeps one share); every intermediate value stays a whole
number in [1, 99]. Each problem has a gold answer and a gold step-by-step solution, one equation per
line, ending in "The answer is N.".

    python -m synth.demo.world DIR      # writes DIR/data/{teacher_train,seeds,heldout}.jsonl

Three splits, disjoint by question text, drawn from one seeded stream (the same seed gives the same
files on every machine):
- teacher_train: problems with gold solutions, the teacher's own training data;
- seeds: problems the teacher has never seen; the teacher writes solutions for them (the distillation
  data), and their gold answers are what the verify stage checks against;
- heldout: problems nobody trains on; every model is evaluated on them.
`synth demo` draws world.yaml's `prompts` after them from the same stream (data/prompts.jsonl): more problems
nobody trains on, which student B samples for DPO's pairs and the on-policy round.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo", "Mia", "Nora",
         "Omar", "Pia", "Raj", "Sue", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "cards", "pens", "shells", "coins", "books", "eggs", "stamps",
         "beads", "cookies"]
LOW, HIGH = 1, 99  # every value a problem passes through
MAX_OPERAND = 9     # added or taken away in one step


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int
    ops: int

    def row(self, pid: str) -> dict:
        return {"id": pid, "question": self.question, "solution": self.solution, "gold": self.answer,
                "ops": self.ops}


# One operation each; every verb appears at most once per problem, so that the number after a verb
# is unambiguous (the question reads naturally and a solution can quote each sentence).
ADD = ["buys {n} more", "finds {n}", "wins {n}", "picks {n} more"]
SUB = ["loses {n}", "sells {n}", "gives {n} to {friend}", "eats {n}"]


def _step(rng: random.Random, value: int, friend: str, used: set[str]) -> tuple[str, str, int] | None:
    """One operation on `value`: (sentence, equation, new value), or None when the draw does not fit."""
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "div"])
    if kind == "add" and value < HIGH:
        n = rng.randint(1, min(MAX_OPERAND, HIGH - value))
        phrase, equation, new = rng.choice(ADD), f"{value} + {n} = {value + n}", value + n
    elif kind == "sub" and value > LOW:
        n = rng.randint(1, min(MAX_OPERAND, value - LOW))
        phrase, equation, new = rng.choice(SUB), f"{value} - {n} = {value - n}", value - n
    elif kind == "mul" and value * 2 <= HIGH:
        n = rng.choice([k for k in (2, 3) if value * k <= HIGH])
        phrase = "doubles them" if n == 2 else "triples them"
        equation, new = f"{value} * {n} = {value * n}", value * n
    elif kind == "div" and any(value % k == 0 for k in (2, 3)):
        n = rng.choice([k for k in (2, 3) if value % k == 0])
        phrase = "splits them equally with " + ("1 friend" if n == 2 else "2 friends")
        equation, new = f"{value} / {n} = {value // n}", value // n
    else:
        return None
    if phrase in used:
        return None
    used.add(phrase)
    return phrase.format(n=n, friend=friend), equation, new


def make_problem(rng: random.Random, ops_range: tuple[int, int] = (2, 4)) -> Problem:
    who, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    ops = rng.randint(*ops_range)
    value = rng.randint(2, 20)
    start, phrases, lines, used = value, [], [], set()
    while len(lines) < ops:
        step = _step(rng, value, friend, used)
        if step is None:
            continue
        phrase, equation, value = step
        phrases.append(phrase)
        lines.append(f"- {phrase}: {equation}")
    actions = ", ".join(phrases[:-1]) + ", then " + phrases[-1]
    question = f"{who} has {start} {item}. {who} {actions}. How many {item} does {who} have?"
    solution = "\n".join(lines + [f"The answer is \\boxed{{{value}}}."])
    return Problem(question, solution, value, ops)


def make_splits(sizes: dict[str, int], seed: int = 0, ops: tuple[int, int] = (2, 4)) -> dict[str, list[dict]]:
    """Disjoint splits (by question text) of the sizes asked, in order, from one seeded stream; each
    problem takes between ops[0] and ops[1] steps."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rows: list[dict] = []
        while len(rows) < size:
            p = make_problem(rng, ops)
            if p.question in seen:
                continue
            seen.add(p.question)
            rows.append(p.row(f"{split}-{len(rows):05d}"))
        splits[split] = rows
    return splits


def corpus(splits: dict[str, list[dict]]) -> list[str]:
    """Text to train the tokenizer on: the words of the world (all splits; no answers leak, the
    tokenizer only learns which strings are common)."""
    return [r["question"] + "\n" + r["solution"] for rows in splits.values() for r in rows]


def write_splits(out_dir: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
        paths[split] = path
    return paths


if __name__ == "__main__":
    import sys

    from synth.demo import build_world  # noqa: F401  (the CLI entry lives in synth.demo)
    build_world(Path(sys.argv[1]))
