"""The filter-file contract: filters/NAME.sql (one boolean SQL expression over the input's columns)
or filters/NAME.py (`judge(row, **args)` or `judge_batch(rows, **args)`), looked up in the
workspace's filters/ first, then the built-ins.

A judge returns bool | (bool, reason) | (bool, reason, score) | Verdict; anything else is the filter's
bug, reported in one line — never a NULL `passed`, which a lenient keep would count as a pass.
Used by the filter stage (synth/stages/filter.py) and by generate's `on_refusal` (the no_refusal
filter decides what a refusal is, so that both agree).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import duckdb

from synth.errors import SynthError, decode_utf8, one_line
from synth.paths import builtin_dir
from synth.store import quote_ident
from synth.verdicts import Verdict


def find_filter(name: str, workspace: Path) -> Path | None:
    """The workspace's filters/ first, then the built-ins."""
    for folder in (workspace / "filters", builtin_dir("filters")):
        for suffix in (".sql", ".py"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def builtin_filters() -> list[str]:
    folder = builtin_dir("filters")
    return sorted({p.stem for p in folder.glob("*") if p.suffix in (".sql", ".py")}) if folder.is_dir() else []


def filter_file(name: str, workspace: Path, where: str) -> Path:
    """The file of filter `name` (a stage's `use:`), or one line naming where synth looked."""
    path = find_filter(name, workspace)
    if path is None:
        raise SynthError(f"{where}: key 'use': no filter {name!r}: looked for {workspace / 'filters' / name}.sql|.py "
                         f"and the built-ins ({', '.join(builtin_filters()) or 'none'})")
    return path


def sql_expression(path: Path) -> str:
    """A .sql filter file's expression: its text without `--` comment lines (UTF-8 checked)."""
    text = decode_utf8(path.read_bytes(), path)
    return "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("--"))


def check_sql(expr: str, columns: list[str], where: str, key: str, open_columns: bool = False) -> None:
    """A filter's SQL expression parses and names only columns the input has. Bound against an empty
    in-memory table of the columns, so that a typo is one line at load time rather than a failed run
    after earlier stages wrote. Type errors are left to the run (the columns' types are not all known
    yet). open_columns: the input's columns are only known once it ran (json-parsed answers)."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"CREATE TABLE t ({', '.join(quote_ident(c) + ' VARCHAR' for c in columns)})")
        con.execute(f"SELECT CAST((\n{expr.strip().rstrip(';')}\n) AS BOOLEAN) FROM t LIMIT 0")
    except duckdb.ParserException as exc:
        raise SynthError(f"{where}: key '{key}': not a valid SQL expression: {one_line(exc)[:300]}") from None
    except duckdb.BinderException as exc:
        if "Referenced column" in str(exc) and not open_columns:
            raise SynthError(f"{where}: key '{key}': {one_line(exc)[:300]} (the input's columns: "
                             f"{', '.join(columns)})") from None
    except duckdb.Error:
        pass  # a type the run will know: checked then
    finally:
        con.close()


def load_filter_module(path: Path):
    """Import a filters/NAME.py file; it must define judge(row) or judge_batch(rows)."""
    spec = importlib.util.spec_from_file_location(f"synth_filter_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the filter file is the user's code
        raise SynthError(f"{path}: cannot load the filter: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(module, "judge_batch", None)) and not callable(getattr(module, "judge", None)):
        raise SynthError(f"{path}: define judge(row) or judge_batch(rows)")
    return module


def as_verdict(result, label: str, path: Path) -> Verdict:
    """A filter's answer as a Verdict; anything else is the filter's bug, reported in one line."""
    if isinstance(result, Verdict) and isinstance(result.passed, bool):
        return result
    if isinstance(result, bool):
        return Verdict.ok(1.0) if result else Verdict.fail(label, 0.0)
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        ok, reason = result[0], (result[1] if len(result) > 1 else None)
        try:
            score = float(result[2]) if len(result) > 2 and result[2] is not None else (1.0 if ok else 0.0)
        except (TypeError, ValueError):
            raise SynthError(f"{path}: judge returned score {result[2]!r}; a score is a number") from None
        return Verdict.ok(score) if ok else Verdict.fail(str(reason or label), score)
    raise SynthError(f"{path}: judge returned {result!r}; return a bool, (bool, reason) or (bool, reason, score)")


def refusal_judge(workspace: Path) -> Callable[[str], bool]:
    """refused(text) from judge(row) of the no_refusal filter: the workspace's filters/no_refusal.py if it
    has one, else the built-in, so that generate's on_refusal and a no_refusal filter stage (without
    `args`) agree on what a refusal is."""
    path = workspace / "filters" / "no_refusal.py"
    if not path.is_file():
        path = builtin_dir("filters") / "no_refusal.py"
    module = load_filter_module(path)
    if not callable(getattr(module, "judge", None)):
        raise SynthError(f"{path}: on_refusal needs judge(row) in this file")

    def refused(text: str) -> bool:
        try:
            return not as_verdict(module.judge({"text": text}), "refusal", path).passed
        except SynthError:
            raise
        except Exception as exc:  # noqa: BLE001 - the workspace's filter file is the user's code
            raise SynthError(f"{path}: judge raised {type(exc).__name__}: {exc} (on_refusal calls judge(row) with "
                             "row = {'text': the answer})") from None
    return refused
