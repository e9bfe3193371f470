"""The load stage: a seed file -> a table named after the stage, one row per seed row, plus `id`.

Formats: .jsonl, .json (a list of objects), .csv, .parquet, or a directory written by
`datasets.Dataset.save_to_disk`. A row's `id` is the seed's own `id` column when it has one (it must
be unique and non-empty), else the content hash of the row. A malformed row is reported with its
line number before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from synth.errors import SynthError
from synth.ids import content_hash

FORMATS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Seeds:
    table: pa.Table  # `id` first, then the seed's own columns
    file_hash: str

    @property
    def columns(self) -> list[str]:
        return self.table.column_names


def file_fingerprint(path: Path) -> str:
    """Hash of a file's bytes, or of every file under a directory (names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def read_seeds(path: Path, where: str, limit: int | None = None) -> Seeds:
    if not path.exists():
        raise SynthError(f"{where}: key 'path': no such file {path}")
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise SynthError(f"{path}: no rows; a load stage needs at least one")
    rows = _with_ids(rows, path)
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SynthError(f"{path}: a column mixes incompatible types ({' '.join(str(exc).split())}); "
                         "make each column one type") from None
    return Seeds(table=table, file_hash=file_fingerprint(path))


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl .json .csv .parquet file or saved HF dataset directory; one-line errors."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_hf_dataset(path)
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SynthError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                     "fix or remove that line") from None
                if not isinstance(row, dict):
                    raise SynthError(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SynthError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SynthError(f"{path}: a .json file of rows must hold a list of objects")
        return data
    if suffix == ".csv":
        import csv
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise SynthError(f"{path}:{reader.line_num}: this row has a different number of fields "
                                     "than the header")
                rows.append(dict(row))
            return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise SynthError(f"{path}: not a readable Parquet file ({exc})") from None
    raise SynthError(f"{path}: cannot read {path.suffix or 'extension-less'} files; use one of "
                     f"{', '.join(FORMATS)} or a saved Hugging Face dataset directory")


def _read_hf_dataset(path: Path) -> list[dict]:
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise SynthError(f"{path}: a directory seed must be written by datasets' save_to_disk "
                         "(no dataset_info.json found)")
    from datasets import load_from_disk  # heavy: imported only for this format

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take its only split, or insist on one
        splits = list(ds.keys())
        if len(splits) != 1:
            raise SynthError(f"{path}: holds splits {', '.join(splits)}; point `path` at one split's directory")
        ds = ds[splits[0]]
    return ds.to_list()


def _with_ids(rows: list[dict], path: Path) -> list[dict]:
    """Put `id` first: the seed's own id (unique, non-empty) or the content hash of the row."""
    has_id = any("id" in r for r in rows)
    seen: dict[str, int] = {}
    out = []
    for n, row in enumerate(rows, start=1):
        if has_id:
            raw = row.get("id")
            if raw is None or str(raw) == "":
                raise SynthError(f"{path}: row {n} has no `id` while other rows do; give every row an id "
                                 "or none (then ids are content hashes)")
            rid = str(raw)
            if rid in seen:
                raise SynthError(f"{path}: rows {seen[rid]} and {n} share id {rid!r}; ids must be unique")
        else:
            rid = content_hash(row)
            if rid in seen:
                continue  # an exact duplicate row: one input, one set of requests
        seen[rid] = n
        out.append({"id": rid, **{k: v for k, v in row.items() if k != "id"}})
    return out
