"""Deduplication and decontamination: pure functions over parallel lists of ids and texts.

Every function takes `ids` and `texts` as two lists of the same length, in the order the caller wants
"first" to mean (the caller passes a stable order, so verdicts are reproducible), and returns one
`Verdict` per row in that order. Nothing here knows about DuckDB, stages or pipelines; nothing is
deleted; a row that loses is only marked.

Text normalisation (`dedup_form`), used by everything below:

1. None becomes "".
2. Unicode NFKC (full-width letters, ligatures, non-breaking spaces ... become their plain forms),
   then `str.casefold()` ("Straße" -> "strasse").
3. Split on any run of Unicode whitespace.
4. Strip Unicode punctuation (general category P*: .,;:!?'"()[]{}-–—…«» and the like) from both ends
   of every token; a token that was only punctuation disappears. Punctuation inside a token stays
   ("3.14", "don't", "e.g" from "e.g."), and symbols (category S*: + = $ % < > ^ ...) are never stripped,
   so "2+2=4" survives intact.
5. Join the tokens with single spaces.

Words are the tokens of the normalised text. Shingles and n-grams are runs of consecutive words.
Each word is hashed once with BLAKE2b (8 bytes), and a run of k words is hashed in bulk with numpy
from its word hashes (a position-weighted sum modulo 2**64, then the MurmurHash3 64-bit finaliser),
so hashes are stable across processes and Python versions (unlike `hash()`), and nothing is done in
Python per shingle.

Empty texts (None, "", or only punctuation/whitespace) are never duplicates or contaminated: they pass
with score None. Empty answers are a different filter's business.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np

from synth.errors import SynthError
from synth.seeds import read_rows
from synth.verdicts import Verdict

EVAL_FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".txt")

# LSH banding is tuned for recall (false positives cost one Jaccard estimate each, false negatives are
# missed duplicates): weights (false positive, false negative) for datasketch's parameter search.
LSH_WEIGHTS = (0.05, 0.95)

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


# ---- normalisation --------------------------------------------------------------------------------

@functools.cache
def _punctuation() -> str:
    """Every Unicode character of general category P* (about 800), for str.strip (built on first use)."""
    return "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c)[0] == "P")


# The ASCII characters of category P*: !"#%&'()*,-./:;?@[\]_{} (not the symbols $+<=>^`|~).
_ASCII_PUNCTUATION = "".join(c for c in map(chr, range(128)) if unicodedata.category(c)[0] == "P")


def _words(text: str | None) -> list[str]:
    """The tokens of the normalised text. An ASCII token is stripped with the 23 ASCII punctuation
    characters (the same result as with all of P*, and much faster); others with all of P*."""
    if not text:
        return []
    asc = _ASCII_PUNCTUATION
    if text.isascii():  # NFKC is the identity on ASCII, and casefold is lower
        return [t for t in (tok.strip(asc) for tok in text.lower().split()) if t]
    punct = _punctuation()
    text = unicodedata.normalize("NFKC", text).casefold()
    return [t for t in (tok.strip(asc) if tok.isascii() else tok.strip(punct) for tok in text.split()) if t]


def dedup_form(text: str | None) -> str:
    """`text` as dedup and decontamination compare it (see the module docstring): NFKC, casefold,
    whitespace collapsed to single spaces, punctuation stripped from the edges of each token."""
    return " ".join(_words(text))


# ---- stable hashing of words and word n-grams ------------------------------------------------------

class _WordHashes(dict):
    """word -> 64-bit BLAKE2b hash, computed once per distinct word (per call of a public function)."""

    def __missing__(self, word: str) -> int:
        h = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        self[word] = h
        return h

    def of(self, words: list[str]) -> np.ndarray:
        return np.array(list(map(self.__getitem__, words)), dtype=_U64)


@functools.cache
def _coefficients(k: int) -> np.ndarray:
    """k fixed odd 64-bit multipliers, one per position in a run (derived from BLAKE2b: stable)."""
    return np.array([int.from_bytes(hashlib.blake2b(b"synth.dedup/%d" % j, digest_size=8).digest(), "little") | 1
                     for j in range(k)], dtype=_U64)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit over the output)."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def _run_hashes(word_hashes: np.ndarray, k: int) -> np.ndarray:
    """64-bit hashes of every run of k consecutive words; a text of fewer than k words is one run of
    all its words; no words, no runs. Runs of different lengths hash differently (the length is mixed in)."""
    n = len(word_hashes)
    if n == 0:
        return np.empty(0, dtype=_U64)
    k = min(k, n)
    coef = _coefficients(k)
    m = n - k + 1
    with np.errstate(over="ignore"):
        h = word_hashes[:m] * coef[0] + _U64(k)
        for j in range(1, k):  # k vectorised steps, rather than a Python step per run
            h += word_hashes[j:j + m] * coef[j]
        return _fmix64(h)


def _check_parallel(ids: list[str], texts: list) -> None:
    if len(ids) != len(texts):
        raise ValueError(f"ids and texts must be parallel lists: {len(ids)} ids, {len(texts)} texts")


# ---- exact duplicates ------------------------------------------------------------------------------

def exact_duplicates(ids: list[str], texts: list[str | None]) -> list[Verdict]:
    """One verdict per row: the first row (in the given order) with a given normalised text passes;
    each later row with the same normalised text fails with reason `duplicate_of:<first id>` and
    score 1.0. Empty texts pass (score None): an empty text is not a duplicate of anything."""
    _check_parallel(ids, texts)
    first: dict[str, str] = {}
    out = []
    for rid, text in zip(ids, texts):
        key = dedup_form(text)
        if not key:
            out.append(Verdict.ok())
        elif key in first:
            out.append(Verdict.fail(f"duplicate_of:{first[key]}", 1.0))
        else:
            first[key] = rid
            out.append(Verdict.ok())
    return out


# ---- near duplicates -------------------------------------------------------------------------------

def near_duplicates(ids: list[str], texts: list[str | None], threshold: float = 0.9, num_perm: int = 128,
                    shingle: int = 5, seed: int = 1) -> list[Verdict]:
    """One verdict per row, by MinHash LSH over word shingles, greedily in the given order.

    A row's shingles are the distinct runs of `shingle` consecutive words of its normalised text (a
    text of fewer words is one shingle of all its words). Each row gets a MinHash (datasketch,
    `num_perm` permutations, `seed`) and is looked up in a MinHashLSH index built at `threshold` that
    holds only the rows kept so far. Among the candidates, the kept row with the highest estimated
    Jaccard similarity (ties: the earliest) decides: if that estimate is >= threshold the row fails
    with reason `duplicate_of:<kept id>` and score = the estimate; otherwise the row passes (score
    None) and joins the index. The first row of each group therefore always passes, and exact
    duplicates are caught (their MinHashes are identical, estimate 1.0). A row whose normalised text is
    identical to an earlier row's gets the same outcome as that row without recomputation: score 1.0
    against it if it was kept, else the same verdict. Empty texts pass (score None) and are not indexed.

    The LSH banding favours recall (see LSH_WEIGHTS): candidates are cheap to verify, misses are not.
    Estimates have a standard error of about sqrt(J(1-J)/num_perm) (0.026 at J=0.9 with 128), so pairs
    whose true similarity is within that of the threshold can land on either side.
    """
    _check_parallel(ids, texts)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if shingle < 1:
        raise ValueError(f"shingle must be >= 1, got {shingle}")
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    # One template; copy() shares its permutation arrays. hashfunc=int: the shingle hashes are already
    # 32-bit integers computed in bulk, so datasketch only applies its permutations (vectorised).
    template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
    words = _WordHashes()
    kept: dict[int, LeanMinHash] = {}  # row position -> sketch, for the rows in the index
    by_text: dict[str, int] = {}  # normalised text -> position of its first row
    out: list[Verdict] = []
    for i, text in enumerate(texts):
        toks = _words(text)
        if not toks:
            out.append(Verdict.ok())
            continue
        key = " ".join(toks)
        j = by_text.get(key)
        if j is not None:
            out.append(Verdict.fail(f"duplicate_of:{ids[j]}", 1.0) if j in kept else out[j])
            continue
        by_text[key] = i
        shingles = (_run_hashes(words.of(toks), shingle) >> _U64(32)).tolist()
        m = template.copy()
        m.update_batch(shingles)
        best, best_j = -1.0, -1
        for c in lsh.query(m):
            est = kept[c].jaccard(m)
            if est > best or (est == best and c < best_j):
                best, best_j = est, c
        if best >= threshold:
            out.append(Verdict.fail(f"duplicate_of:{ids[best_j]}", best))
        else:
            lean = LeanMinHash(m)
            lsh.insert(i, lean, check_duplication=False)
            kept[i] = lean
            out.append(Verdict.ok())
    return out


# ---- decontamination -------------------------------------------------------------------------------

def _ngram_sets(texts: list[str | None], n: int, words: _WordHashes) -> list[np.ndarray]:
    """Per text: the sorted distinct 64-bit hashes of its word n-grams (a text of fewer than n words is
    one n-gram of all its words; an empty text has none)."""
    return [np.unique(_run_hashes(words.of(_words(t)), n)) for t in texts]


def decontaminate(ids: list[str], texts: list[str | None], against: dict[str, list[str]],
                  n: int = 13) -> list[Verdict]:
    """One verdict per row: does the row share a word n-gram with an evaluation set?

    `against` maps a label (usually the eval file's name) to that file's texts. Each label's texts
    become one set of n-gram hashes (the distinct runs of n consecutive normalised words; a text of
    fewer than n words counts as one n-gram of all its words, so a short eval text only matches a row
    whose whole normalised text is that same short text). A row fails with reason
    `contaminated:<label>` for the first label, in dict order, whose set holds any of the row's
    n-grams; its score is the fraction of the row's distinct n-grams found in that set, and details
    give {"label", "matched", "ngrams"}. Other rows pass with score 0.0; empty rows pass with score None.

    The sets are held as sorted numpy arrays of 64-bit hashes (8 bytes per distinct n-gram); two
    different n-grams share a hash with probability about 2**-64.
    """
    _check_parallel(ids, texts)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = _WordHashes()
    rows = _ngram_sets(texts, n, words)
    sizes = np.array([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate(rows) if rows else np.empty(0, dtype=_U64)
    owner = np.repeat(np.arange(len(rows)), sizes)
    matched: dict[str, np.ndarray] = {}
    for label, eval_texts in against.items():
        sets = _ngram_sets(eval_texts, n, words)
        ref = np.unique(np.concatenate(sets)) if sets else np.empty(0, dtype=_U64)
        if len(ref) == 0 or len(flat) == 0:
            matched[label] = np.zeros(len(rows), dtype=np.int64)
            continue
        pos = np.minimum(np.searchsorted(ref, flat), len(ref) - 1)
        hit = ref[pos] == flat
        matched[label] = np.bincount(owner[hit], minlength=len(rows))
    out = []
    for i in range(len(rows)):
        total = int(sizes[i])
        if total == 0:
            out.append(Verdict.ok())
            continue
        for label, counts in matched.items():
            k = int(counts[i])
            if k:
                out.append(Verdict.fail(f"contaminated:{label}", k / total,
                                        {"label": label, "matched": k, "ngrams": total}))
                break
        else:
            out.append(Verdict.ok(0.0))
    return out


# ---- evaluation files ------------------------------------------------------------------------------

def _row_text(row: dict, columns: list[str] | None) -> str:
    if columns is None:
        parts = [v for v in row.values() if isinstance(v, str)]
    else:
        parts = [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                 for v in (row.get(c) for c in columns) if v is not None]
    return "\n".join(p for p in parts if p.strip())


def _check_columns(path: Path, columns: list[str] | None, present: set[str]) -> None:
    missing = [c for c in columns or [] if c not in present]
    if missing:
        raise SynthError(f"{path}: no column {', '.join(map(repr, missing))}; its columns are "
                         f"{', '.join(sorted(present)) or '(none)'}: name existing ones")


def read_eval_texts(path: Path, columns: list[str] | None = None) -> list[str]:
    """The texts of an evaluation file, one per row (rows without any text are skipped).

    - .txt: one text per line (blank lines skipped; `columns` does not apply).
    - .jsonl .json .csv .parquet or a saved HF dataset directory, read like seed files (synth/seeds.py,
      with its line-numbered errors): a row's text is its values joined with newlines: the named
      `columns` in that order (a named column must exist; non-string values are written as JSON), or
      by default every string-valued column (in a CSV every column is a string).

    Raises SynthError (one line: the file, what is wrong, what to do) for a missing file, an unknown
    format, malformed content or a named column that does not exist.
    """

    path = Path(path)
    if not path.exists():
        raise SynthError(f"{path}: no such file; point the evaluation set at an existing "
                         f"{', '.join(EVAL_FORMATS)} file")
    if path.suffix.lower() == ".txt":
        try:
            with open(path, encoding="utf-8") as fh:
                return [line.rstrip("\r\n") for line in fh if line.strip()]
        except UnicodeDecodeError as exc:
            raise SynthError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    rows = read_rows(path)
    _check_columns(path, columns, set().union(*rows) if rows else set())
    texts = [_row_text(r, columns) for r in rows]
    return [t for t in texts if t.strip()]
