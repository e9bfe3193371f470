"""The load stage: a seed file -> a table named after the stage, one row per seed row, plus `id`.

Formats: .jsonl, .json (a list of objects), .csv, .parquet, or a directory written by
`datasets.Dataset.save_to_disk`. A row's `id` is the seed's own `id` column when it has one (it must
be unique and non-empty), else the content hash of the row. A malformed row is reported with its
line number before anything is written.

Limits: a seed row is at most MAX_ROW_BYTES (1 MiB) as JSON (a .jsonl line, a .csv record, a row of
the other formats): a longer one is refused with its line or row number. A row is rendered into a
prompt, stored, and exported as one line that DuckDB reads back (its JSON reader stops at 16 MB), so
a limit well under that keeps every step working; 1 MiB is ~250k tokens, beyond any prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from synth.errors import SynthError, decode_utf8, one_line
from synth.ids import content_hash, file_sha256

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
MAX_ROW_BYTES = 2 ** 20


@dataclass
class Seeds:
    table: pa.Table  # `id` first, then the seed's own columns
    file_hash: str
    collapsed: int = 0  # rows identical to an earlier row (no `id` column): one row each, reported at run time

    @property
    def columns(self) -> list[str]:
        return self.table.column_names


def file_fingerprint(path: Path) -> str:
    """Hash of a file's bytes, or of every file under a directory (names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        file_sha256(f, h)
    return h.hexdigest()[:32]


def read_seeds(path: Path, where: str, limit: int | None = None) -> Seeds:
    if not path.exists():
        raise SynthError(f"{where}: key 'path': no such file {path}")
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise SynthError(f"{path}: no rows; a load stage needs at least one")
    _check_rows(rows, path)
    n = len(rows)
    rows = _with_ids(rows, path)
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
        raise SynthError(f"{path}: a column mixes incompatible types or holds a value Arrow cannot store "
                         f"({one_line(exc)[:300]}); make each column one type") from None
    _check_types(table.schema, path)
    return Seeds(table=table, file_hash=file_fingerprint(path), collapsed=n - len(rows))


def _check_rows(rows: list[dict], path: Path) -> None:
    """Every row: string column names, not empty, and at most MAX_ROW_BYTES as JSON."""
    for n, row in enumerate(rows, start=1):
        for key in row:
            if not isinstance(key, str) or not key.strip():
                raise SynthError(f"{path}: row {n}: column name {key!r} is empty; name every column")
        try:
            size = len(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8"))
        except (TypeError, ValueError, RecursionError) as exc:
            raise SynthError(f"{path}: row {n}: cannot be read as JSON ({exc})") from None
        if size > MAX_ROW_BYTES:
            raise SynthError(_too_long(path, f"row {n}", size))


def _too_long(path: Path, where: str, size: int | None) -> str:
    size_text = f"{size:,} bytes" if size else f"longer than {MAX_ROW_BYTES:,} bytes"
    return (f"{path}: {where} is {size_text}; a seed row is at most {MAX_ROW_BYTES:,} bytes (1 MiB) as JSON: "
            "split or shorten it")


def _check_types(schema: pa.Schema, path: Path) -> None:
    """Columns DuckDB cannot store: a struct without fields ({} in every row), a column of nulls only is fine."""
    def bad(t: pa.DataType) -> bool:
        if pa.types.is_struct(t):
            return t.num_fields == 0 or any(bad(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return bad(t.value_type)
        return False
    for field in schema:
        if bad(field.type):
            raise SynthError(f"{path}: column {field.name!r} holds empty objects ({{}}) only; give them keys "
                             "or leave the column out")


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl .json .csv .parquet file or saved HF dataset directory; one-line errors."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_hf_dataset(path)
    if not path.is_file():
        raise SynthError(f"{path}: not a file")
    if suffix == ".jsonl":
        rows = []
        with open(path, "rb") as fh:
            lineno = 0
            while True:
                raw = fh.readline(MAX_ROW_BYTES + 2)
                if not raw:
                    break
                lineno += 1
                if len(raw.rstrip(b"\r\n")) > MAX_ROW_BYTES:
                    raise SynthError(_too_long(path, f"line {lineno}", None))
                line = decode_utf8(raw, path, lineno)
                if not line.strip():
                    continue
                try:
                    row = _json_loads(line)
                except json.JSONDecodeError as exc:
                    raise SynthError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                     "fix or remove that line") from None
                except _DuplicateKey as exc:
                    raise SynthError(f"{path}:{lineno}: key {exc.args[0]!r} is given twice in this row") from None
                except RecursionError:
                    raise SynthError(f"{path}:{lineno}: nested too deeply") from None
                if not isinstance(row, dict):
                    raise SynthError(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".json":
        raw = path.read_bytes()
        text = decode_utf8(raw, path)
        try:
            data = _json_loads(text)
        except json.JSONDecodeError as exc:
            raise SynthError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        except _DuplicateKey as exc:
            raise SynthError(f"{path}: key {exc.args[0]!r} is given twice in one row") from None
        except RecursionError:
            raise SynthError(f"{path}: nested too deeply") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SynthError(f"{path}: a .json file of rows must hold a list of objects")
        return data
    if suffix == ".csv":
        import csv
        import io
        text = decode_utf8(path.read_bytes(), path)
        csv.field_size_limit(MAX_ROW_BYTES + 1)  # a longer field is refused below, with its line
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            if reader.fieldnames and len(set(reader.fieldnames)) != len(reader.fieldnames):
                dup = next(f for f in reader.fieldnames if reader.fieldnames.count(f) > 1)
                raise SynthError(f"{path}:1: column {dup!r} is named twice in the header")
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise SynthError(f"{path}:{reader.line_num}: this row has a different number of fields "
                                     "than the header")
                size = sum(len(k.encode()) + len(v.encode()) for k, v in row.items())
                if size > MAX_ROW_BYTES:
                    raise SynthError(_too_long(path, f"line {reader.line_num}", size))
                rows.append(dict(row))
        except csv.Error as exc:
            raise SynthError(f"{path}:{reader.line_num}: not valid CSV ({exc}); a field is at most "
                             f"{MAX_ROW_BYTES:,} bytes") from None
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise SynthError(f"{path}: not a readable Parquet file ({one_line(exc)[:300]})") from None
    raise SynthError(f"{path}: cannot read {path.suffix or 'extension-less'} files; use one of "
                     f"{', '.join(FORMATS)} or a saved Hugging Face dataset directory")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_loads(text: str):
    return json.loads(text, object_pairs_hook=_no_duplicates)


def _read_hf_dataset(path: Path) -> list[dict]:
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise SynthError(f"{path}: a directory seed must be written by datasets' save_to_disk "
                         "(no dataset_info.json found)")
    from datasets import load_from_disk  # heavy: imported only for this format

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a damaged directory
        raise SynthError(f"{path}: not a readable saved dataset ({type(exc).__name__}: "
                         f"{one_line(exc)[:300]})") from None
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
