"""The answers journal: every teacher answer is durable the moment it arrives, before its batched commit.

Completions are committed to DuckDB in batches (SYNTH_FLUSH_ROWS / SYNTH_FLUSH_SECONDS), because a
DuckDB transaction per answer would cost more than the answer. Between commits the answers would live
only in memory, so a `kill -9`, an out-of-memory kill, a lock timeout or a full disk would throw away
answers that were already paid for. So each answer is first appended, as one JSON line, to a journal
segment next to the store (`<store>.journal/<stage>.<run id>.<n>.jsonl`) with a single unbuffered
write(2): once that returns, the answer survives the process (not a power cut: there is no fsync per
answer; the batched commit is where durability against the machine going down starts).

Lifecycle: a generate stage opens a Journal; `append` runs in whichever thread receives the answer (the
openai teacher's workers call it before handing the answer over). `rotate()` after every commit starts a
new segment and deletes the closed segments all of whose answers are now committed. A stage that ends
cleanly leaves no segment behind. The next run of the stage reads the segments a killed run left
(`replay`): the answers whose request is still missing are recorded as if the teacher had just sent them
(through the same answer policies), and are never sent again; the segments are deleted once those
answers are committed.

Contract: the journal is an optimisation of *where* an answer waits, never a second source of truth. The
store stays the cache (a request with a committed completion is never replayed or re-sent), a torn or
foreign line is skipped, and deleting the journal directory by hand only costs re-sending its answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from pathlib import Path

from synth.errors import SynthError
from synth.teachers import Completion, logprobs_from_entries

_SEGMENT = re.compile(r"^(?P<stage>\w+)\.(?P<run>[\w-]+)\.(?P<n>\d+)\.jsonl$")


def journal_dir(store_path: Path) -> Path:
    return Path(store_path).with_name(Path(store_path).name + ".journal")


class Journal:
    """Append-only segments of one generate stage in one run. Thread-safe."""

    def __init__(self, store_path: Path, stage: str, run_id: str):
        self.dir, self.stage, self.run_id = journal_dir(store_path), stage, run_id
        self._lock = threading.Lock()
        self._n = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._open_ids: set[str] = set()  # answers written to the open segment
        self._closed: dict[Path, set[str]] = {}  # closed segment -> its answers not committed yet

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._n += 1
        self._path = self.dir / f"{self.stage}.{self.run_id}.{self._n}.jsonl"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, completion: Completion) -> None:
        """Make one answer durable (one write(2) of one line). Answers that carry no paid-for content (a
        transport error) are not journaled: a re-run sends them again anyway."""
        if not completion.ok:
            return
        # vars(), not dataclasses.asdict: no deep copy (this runs in the client's event loop, per answer)
        line = (json.dumps(vars(completion), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                self._open()
            view = memoryview(line)
            try:
                while view:  # a regular file takes it in one call; the loop only guards a partial write
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                raise SynthError(f"{self._path}: cannot save an answer the teacher sent ({exc.strerror}); free some "
                                 "space and re-run: answers already saved are kept") from None
            self._open_ids.add(completion.request_id)

    def rotate(self, committed: set[str]) -> None:
        """After a commit of `committed` request ids: close the open segment, and delete every closed
        segment whose answers are all committed (an answer still on its way from a worker to the
        commit keeps its segment alive until the commit that carries it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._closed[self._path] = self._open_ids
                self._fd, self._path, self._open_ids = None, None, set()
            for path in list(self._closed):
                self._closed[path] -= committed
                if not self._closed[path]:
                    path.unlink(missing_ok=True)
                    del self._closed[path]

    def close(self) -> None:
        """Close the open segment; segments with uncommitted answers stay for the next run to replay."""
        self.rotate(set())
        try:
            self.dir.rmdir()  # only when empty
        except OSError:
            pass


def leftover_segments(store_path: Path, stage: str, exclude_run: str | None = None) -> list[Path]:
    """The segments earlier runs of `stage` left behind (killed, or stopped by an error)."""
    d = journal_dir(store_path)
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.iterdir()):
        m = _SEGMENT.match(path.name)
        if m and m["stage"] == stage and m["run"] != exclude_run:
            out.append(path)
    return out


def replay(segments: list[Path], wanted: set[str]) -> list[Completion]:
    """The journaled answers of the requests in `wanted` (each once; the first one journaled wins, as the
    first committed would). Torn lines (a kill in the middle of a write) and lines of another shape are
    skipped."""
    fields = {f.name for f in dataclasses.fields(Completion)}
    found: dict[str, Completion] = {}
    for path in segments:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for raw in data.splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict) or not fields.issuperset(record) or "request_id" not in record:
                continue
            rid = record["request_id"]
            if rid in wanted and rid not in found:
                if isinstance(record.get("logprobs"), list):  # one dict per token: a journal of synth before 12
                    entries = record["logprobs"]
                    record["logprobs"] = logprobs_from_entries(entries, max((len(e.get("top") or ()) for e in entries),
                                                                            default=0))
                found[rid] = Completion(**record)
    return list(found.values())


def remove_segments(segments: list[Path]) -> None:
    for path in segments:
        path.unlink(missing_ok=True)
    if segments:
        try:
            segments[0].parent.rmdir()
        except OSError:
            pass
