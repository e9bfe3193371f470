"""Dedup and decontamination (synth/dedup.py): pure functions, one Verdict per row, in input order.

Contract: the first row (in the given order) of a group passes; later ones fail with
`duplicate_of:<first id>`; a row sharing a word n-gram with an eval set fails with
`contaminated:<label>`; empty texts pass. The tables pin `passed` and `reason` of every row.
"""

from __future__ import annotations

import json

import pytest

from synth.dedup import (
    decontaminate,
    dedup_form,
    exact_duplicates,
    near_duplicates,
    read_eval_texts,
)
from synth.errors import SynthError
from synth.verdicts import Verdict

OK = (True, None)


def dup(first: str) -> tuple[bool, str]:
    return (False, f"duplicate_of:{first}")


def cont(label: str) -> tuple[bool, str]:
    return (False, f"contaminated:{label}")


def outcome(verdicts: list[Verdict]) -> list[tuple[bool, str | None]]:
    return [(v.passed, v.reason) for v in verdicts]


def ids_for(texts: list) -> list[str]:
    return [chr(ord("a") + i) for i in range(len(texts))]


# ---- dedup_form ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (None, ""),
    ("", ""),
    ("   \n\t ", ""),
    ("Hello,   WORLD!!", "hello world"),
    ("  tabs\tand\nnewlines  ", "tabs and newlines"),
    ("“Quoted” (parens) [brackets] «guillemets»", "quoted parens brackets guillemets"),
    ("a — b ... c", "a b c"),                       # a token of only punctuation disappears
    ("pi is 3.14, isn't it?", "pi is 3.14 isn't it"),  # inner punctuation stays
    ("e.g. etc.", "e.g etc"),
    ("2+2=4 costs $5 <br>", "2+2=4 costs $5 <br>"),   # symbols (S*) are not punctuation
    ("Straße", "strasse"),                          # casefold, not lower
    ("ＦＵＬＬ　ｗｉｄｔｈ", "full width"),           # NFKC: full-width letters and ideographic space
    ("ﬁne", "fine"),                                # NFKC: ligature
    ("non\u00a0breaking", "non breaking"),          # NFKC: NBSP is a space
])
def test_dedup_form(text, expected):
    assert dedup_form(text) == expected


# ---- exact duplicates -----------------------------------------------------------------------------

EXACT_CASES = [
    # (texts, expected outcome per row)
    (["Hello World", "hello   world", "HELLO world!", "Hello there"],
     [OK, dup("a"), dup("a"), OK]),
    # order matters: the first in the given order wins
    (["hello   world", "Hello World"], [OK, dup("a")]),
    (["x y", "Hello World", "hello world"], [OK, OK, dup("b")]),
    # empty texts are not duplicates of anything (nor of each other)
    (["", None, "  ", "...", ""], [OK, OK, OK, OK, OK]),
    # NFKC + casefold variants collapse; inner punctuation does not
    (["ＡＢＣ def", "abc DEF", "3.14", "314", "3.14."], [OK, dup("a"), OK, OK, dup("c")]),
    ([], []),
]


@pytest.mark.parametrize("texts, expected", EXACT_CASES)
def test_exact_duplicates(texts, expected):
    verdicts = exact_duplicates(ids_for(texts), texts)
    assert outcome(verdicts) == expected
    assert all(v.score == 1.0 for v in verdicts if not v.passed)


def test_exact_duplicates_names_the_caller_ids():
    verdicts = exact_duplicates(["row-7", "row-3"], ["Same text", "same text."])
    assert outcome(verdicts) == [OK, dup("row-7")]


def test_parallel_lists_are_checked():
    with pytest.raises(ValueError):
        exact_duplicates(["a"], ["x", "y"])
    with pytest.raises(ValueError):
        near_duplicates(["a", "b"], ["x"])
    with pytest.raises(ValueError):
        decontaminate(["a"], [], {})


# ---- near duplicates ------------------------------------------------------------------------------

# 60 words.
BASE = ("The committee met on a rainy Tuesday morning to review the budget for the new library wing. "
        "After a long discussion about shelving, lighting and the children's reading corner, the members "
        "agreed to postpone the vote until the architect could present revised drawings with cheaper "
        "materials and a clearer schedule for the construction work planned for next spring in town.")
assert len(BASE.split()) == 60


def change_word(text: str, pos: int, new: str) -> str:
    words = text.split()
    assert words[pos].lower() != new.lower()
    words[pos] = new
    return " ".join(words)


# A word near the end touches 2 of the 56 five-word shingles: true Jaccard 54/58 = 0.93, far above
# 0.8 compared with the estimate's standard error (~0.023 at 128 permutations).
NEAR_END = change_word(BASE, 57, "then")
# A word in the middle touches 5 shingles: true Jaccard 51/61 = 0.84, within 2 standard errors of
# 0.8, so whether it is flagged at 0.8 depends on the hash seed; at 0.7 it is flagged robustly.
MIDDLE = change_word(BASE, 30, "delegates")
UNRELATED = ("Photosynthesis converts light energy into chemical energy stored in glucose, releasing "
             "oxygen as a by-product; it takes place mainly in the chloroplasts of leaf cells, where "
             "chlorophyll absorbs red and blue light while reflecting green, which is why most plants "
             "look green to our eyes on a sunny afternoon in the middle of summer.")

NEAR_CASES = [
    # (texts, threshold, expected)
    ([BASE, NEAR_END, UNRELATED], 0.8, [OK, dup("a"), OK]),
    ([UNRELATED, BASE, NEAR_END], 0.8, [OK, OK, dup("b")]),
    # order matters: the paraphrase first makes the original the duplicate
    ([NEAR_END, BASE], 0.8, [OK, dup("a")]),
    ([BASE, MIDDLE, UNRELATED], 0.7, [OK, dup("a"), OK]),
    # exact duplicates (after normalisation) are caught, with estimate 1.0
    ([BASE, BASE.upper(), " ".join(BASE.split()[::-1]), BASE + "!!"], 0.9, [OK, dup("a"), OK, dup("a")]),
    # a copy of a flagged row gets that row's verdict (flagged rows are not in the index)
    ([BASE, NEAR_END, NEAR_END.lower()], 0.8, [OK, dup("a"), dup("a")]),
    # texts shorter than a shingle are one shingle of all their words
    (["Yes.", "yes", "no", "Yes, indeed", "yes indeed!"], 0.9, [OK, dup("a"), OK, OK, dup("d")]),
    # empty texts pass and are not indexed
    (["", None, "...", ""], 0.9, [OK, OK, OK, OK]),
    ([], 0.9, []),
]


@pytest.mark.parametrize("texts, threshold, expected", NEAR_CASES)
def test_near_duplicates(texts, threshold, expected):
    verdicts = near_duplicates(ids_for(texts), texts, threshold=threshold)
    assert outcome(verdicts) == expected
    for v in verdicts:
        if v.passed:
            assert v.score is None
        else:
            assert threshold <= v.score <= 1.0


def test_near_duplicates_scores():
    texts = [BASE, BASE.lower(), NEAR_END]
    verdicts = near_duplicates(ids_for(texts), texts, threshold=0.8)
    assert verdicts[1].score == 1.0
    assert 0.85 < verdicts[2].score < 1.0


def test_near_duplicates_names_the_matching_kept_row():
    # b is a distant variant of a (both kept at 0.9); c is b with one word changed at the end, so the
    # kept row it duplicates is b, not the first row.
    b = change_word(change_word(change_word(BASE, 10, "ZZ1"), 30, "ZZ2"), 45, "ZZ3")
    c = change_word(b, 58, "later")
    texts = [BASE, b, c]
    assert outcome(near_duplicates(ids_for(texts), texts, threshold=0.9)) == [OK, OK, dup("b")]


def test_near_duplicates_prefers_the_most_similar_kept_row():
    # With shingle=1 the sets are word sets, so the Jaccard similarities are exact by construction:
    # J(a, b) = 50/150 = 0.33 (both kept at 0.42), J(c, a) = 75/150 = 0.5, J(c, b) = 100/125 = 0.8.
    # c qualifies against both kept rows and names the more similar one, b.
    words = [f"w{i}" for i in range(150)]
    a = " ".join(words[:100])
    b = " ".join(words[:50] + words[100:])
    c = " ".join(words[:75] + words[100:])
    verdicts = near_duplicates(["a", "b", "c"], [a, b, c], threshold=0.42, num_perm=256, shingle=1)
    assert outcome(verdicts) == [OK, OK, dup("b")]
    assert verdicts[2].score > 0.7


def test_near_duplicates_is_deterministic_and_seeded():
    texts = [BASE, MIDDLE, NEAR_END, UNRELATED] * 2
    first = near_duplicates(ids_for(texts), texts, threshold=0.8)
    assert near_duplicates(ids_for(texts), texts, threshold=0.8) == first
    other = near_duplicates(ids_for(texts), texts, threshold=0.8, seed=7, num_perm=64, shingle=3)
    assert [v.passed for v in other][4:] == [False] * 4  # exact copies whatever the parameters


def test_near_duplicates_rejects_bad_parameters():
    with pytest.raises(ValueError):
        near_duplicates(["a"], ["x"], threshold=0.0)
    with pytest.raises(ValueError):
        near_duplicates(["a"], ["x"], shingle=0)


# ---- decontamination ------------------------------------------------------------------------------

EVAL_A = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")
EVAL_B = ("Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of "
          "babysitting. How much did she earn?")
SPAN_13 = "sold clips to 48 of her friends in April, and then she sold"      # 13 words of EVAL_A
SPAN_12 = "sold clips to 48 of her friends in April, and then she"           # 12 words
assert len(SPAN_13.split()) == 13 and len(SPAN_12.split()) == 12
SPAN_B = "earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes"  # 13 of EVAL_B

DECON_CASES = [
    # (texts, against labels in order, expected)
    ([f"Let me think. {SPAN_13} and so on, the answer is 72.", f"Let me think. {SPAN_12} hmm."],
     ["gsm8k", "math"], [cont("gsm8k"), OK]),
    # normalisation: case and punctuation differences do not hide a copied span
    ([SPAN_13.upper().replace(",", " ;"), "Nothing to see here at all."], ["gsm8k", "math"],
     [cont("gsm8k"), OK]),
    # several files: each row is labelled with the first file (in dict order) it overlaps
    ([f"{SPAN_B} then more words follow.", SPAN_13, f"{SPAN_13} {SPAN_B}"], ["gsm8k", "math"],
     [cont("math"), cont("gsm8k"), cont("gsm8k")]),
    ([f"{SPAN_B} then more words follow.", SPAN_13, f"{SPAN_13} {SPAN_B}"], ["math", "gsm8k"],
     [cont("math"), cont("gsm8k"), cont("math")]),
    # empty rows pass
    (["", None], ["gsm8k", "math"], [OK, OK]),
    # an eval text shorter than n words is one n-gram: only a row that is exactly that text matches
    (["What is 2 + 2?", "what is 2 + 2", "Tell me: what is 2 + 2? It is 4."], ["short"],
     [cont("short"), cont("short"), OK]),
]

EVAL_SETS = {"gsm8k": [EVAL_A], "math": [EVAL_B, "unrelated text"], "short": ["What is 2 + 2?"]}


@pytest.mark.parametrize("texts, labels, expected", DECON_CASES)
def test_decontaminate(texts, labels, expected):
    verdicts = decontaminate(ids_for(texts), texts, {k: EVAL_SETS[k] for k in labels})
    assert outcome(verdicts) == expected
    for v in verdicts:
        assert v.score is None or 0.0 <= v.score <= 1.0
        if not v.passed:
            assert v.score > 0 and v.details["matched"] >= 1


def test_decontaminate_scores():
    texts = [EVAL_A, f"{SPAN_13} {' '.join(f'w{i}' for i in range(12))}", "A fresh question of our own."]
    verdicts = decontaminate(ids_for(texts), texts, {"gsm8k": [EVAL_A]})
    assert outcome(verdicts) == [cont("gsm8k"), cont("gsm8k"), OK]
    assert verdicts[0].score == 1.0
    # 25 words -> 13 n-grams, of which only the first is the copied span
    assert verdicts[1].score == pytest.approx(1 / 13)
    assert verdicts[1].details == {"label": "gsm8k", "matched": 1, "ngrams": 13}
    assert verdicts[2].score == 0.0


def test_decontaminate_n_and_empty_against():
    texts = [SPAN_12]
    assert outcome(decontaminate(["a"], texts, {"gsm8k": [EVAL_A]}, n=12)) == [cont("gsm8k")]
    assert outcome(decontaminate(["a"], texts, {})) == [OK]
    assert outcome(decontaminate(["a"], texts, {"empty": []})) == [OK]


# ---- reading eval files ---------------------------------------------------------------------------

ROWS = [{"id": 1, "question": "What is 1 + 1?", "answer": "2"},
        {"id": 2, "question": "Name a prime.", "answer": "7"},
        {"id": 3, "question": "", "answer": ""}]


def write(path, fmt):
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    elif fmt == ".json":
        path.write_text(json.dumps(ROWS))
    elif fmt == ".csv":
        path.write_text("id,question,answer\n" + "".join(f'{r["id"]},"{r["question"]}",{r["answer"]}\n' for r in ROWS))
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt == ".txt":
        path.write_text("What is 1 + 1?\n\n  \nName a prime.\r\n")
    return path


@pytest.mark.parametrize("fmt, columns, expected", [
    (".jsonl", None, ["What is 1 + 1?\n2", "Name a prime.\n7"]),         # string columns; id is an int
    (".jsonl", ["question"], ["What is 1 + 1?", "Name a prime."]),
    (".jsonl", ["answer", "id"], ["2\n1", "7\n2", "3"]),                  # named non-string: as JSON
    (".json", None, ["What is 1 + 1?\n2", "Name a prime.\n7"]),
    (".json", ["question"], ["What is 1 + 1?", "Name a prime."]),
    (".csv", None, ["1\nWhat is 1 + 1?\n2", "2\nName a prime.\n7", "3"]),  # in a CSV every column is a string
    (".csv", ["question"], ["What is 1 + 1?", "Name a prime."]),
    (".parquet", None, ["What is 1 + 1?\n2", "Name a prime.\n7"]),
    (".parquet", ["question", "answer"], ["What is 1 + 1?\n2", "Name a prime.\n7"]),
    (".txt", None, ["What is 1 + 1?", "Name a prime."]),
])
def test_read_eval_texts(tmp_path, fmt, columns, expected):
    path = write(tmp_path / f"eval{fmt}", fmt)
    assert read_eval_texts(path, columns) == expected


def test_read_eval_texts_rows_must_be_objects(tmp_path):
    """Eval files are read like seed files: rows are objects (a list of bare strings goes in a .txt)."""
    (tmp_path / "a.jsonl").write_text('{"q": "first"}\n"second"\n')
    msg = one_line_error(tmp_path / "a.jsonl")
    assert "a.jsonl:2" in msg and "JSON object" in msg


def one_line_error(path, columns=None) -> str:
    with pytest.raises(SynthError) as info:
        read_eval_texts(path, columns)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_read_eval_texts_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert one_line_error(missing) == (f"{missing}: no such file; point the evaluation set at an existing "
                                       ".jsonl, .json, .csv, .parquet, .txt file")
    assert "save_to_disk" in one_line_error(tmp_path)
    (tmp_path / "e.xlsx").write_text("x")
    assert one_line_error(tmp_path / "e.xlsx").startswith(f"{tmp_path / 'e.xlsx'}: cannot read .xlsx")
    (tmp_path / "bad.jsonl").write_text('{"q": "ok"}\n{"q": \n')
    assert one_line_error(tmp_path / "bad.jsonl").startswith(f"{tmp_path / 'bad.jsonl'}:2: not valid JSON")
    (tmp_path / "bad.json").write_text('{"q": "not a list"}')
    assert "list of objects" in one_line_error(tmp_path / "bad.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in one_line_error(tmp_path / "bad.parquet")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in one_line_error(tmp_path / "latin1.txt")
    path = write(tmp_path / "eval.parquet", ".parquet")
    assert one_line_error(path, ["question", "solution"]) == (
        f"{path}: no column 'solution'; its columns are answer, id, question: name existing ones")
    path = write(tmp_path / "eval.csv", ".csv")
    assert "no column 'prompt'" in one_line_error(path, ["prompt"])
