"""The command stage: a tool synth does not wrap (an external evaluation harness, a custom trainer), run
as a stage of the DAG.

    harness:
      kind: command
      run: python eval.py --model {student} --data {heldout} --out {output}
      inputs: [student, heldout]          # stages it reads (edges of the DAG: it runs after them)
      files: [eval.py]                    # files it reads: their bytes are part of its fingerprint
      outputs: [out/harness.jsonl]        # files it writes; the first is its rows (a view), if tabular
      columns: [id, score]                # what later stages may read from those rows

Placeholders in `run`, each replaced by a shell-quoted path or value: an input's name (a train stage:
its model directory; an export stage: its file; any other stage: its rows, written by synth to a parquet
file under <store folder>/commands/<stage>/ first), `output` (the first output), `outputs_dir` (that
folder), `store`, `pipeline_dir`, `run_id`; `{{` and `}}` are literal braces, and `{...}` that is not an
identifier (awk's `{print $1}`) is left alone. An unknown placeholder is refused when the pipeline loads.
The same values are in the environment (SYNTH_INPUT_<NAME>, SYNTH_OUTPUT, SYNTH_STORE, SYNTH_RUN_ID).

It runs with bash in the pipeline's folder, its output streamed to synth's console, in its own process
group (a timeout or Ctrl-C stops all of it). Fingerprint: its config (the command text), its inputs'
fingerprints and its files' bytes: it re-runs when one of them changes, or when an output is gone.
Recorded as done only when it exits 0 and every output exists; otherwise one line (its exit code and the
last line it printed), nothing recorded, and a re-run runs it again: the command must tolerate being
re-run over its own partial outputs (synth cannot make an external tool atomic).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
from collections import deque
from pathlib import Path

import pyarrow.parquet as pq

from synth.config import STAGE_KINDS, CommandStage
from synth.context import RunContext
from synth.errors import SynthError
from synth.graph import Graph, Kind, Ref
from synth.seeds import file_fingerprint
from synth.store import Store, fetch_one, quote_ident, sql_str

PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
BUILTIN = ("output", "outputs_dir", "store", "pipeline_dir", "run_id")
READERS = {".jsonl": "read_json_auto", ".json": "read_json_auto", ".csv": "read_csv_auto", ".parquet": "read_parquet"}


def references(stage: CommandStage, stages) -> list[Ref]:
    return [Ref("inputs", tuple(stage.inputs), STAGE_KINDS)]  # any stage: a model, a file, or rows


def check(graph: Graph, name: str) -> list[str] | None:
    """Every placeholder known; its files exist; the first output tabular when `columns` says it has rows."""
    stage: CommandStage = graph.stage(name)
    known = set(stage.inputs) | set(BUILTIN)
    for m in PLACEHOLDER.finditer(stage.run):
        if m.group(1) and m.group(1) not in known:
            raise SynthError(f"{graph.where(name, 'run')}: key 'run': unknown placeholder {{{m.group(1)}}} (known: "
                             f"{', '.join(sorted(known))}; write {{{{ and }}}} for a literal brace)")
    for f in stage.files:
        if not graph.resolve(f).exists():
            raise SynthError(f"{graph.where(name, 'files')}: key 'files': {graph.resolve(f)}: no such file")
    first = graph.resolve(stage.outputs[0])
    if stage.columns is not None and first.suffix not in READERS:
        raise SynthError(f"{graph.where(name, 'columns')}: key 'columns': the first output {stage.outputs[0]!r} is "
                         f"read as the stage's rows, so it must be {', '.join(READERS)}")
    return list(stage.columns or [])  # none declared: a stage that reads its rows sees no column


def fingerprint(graph: Graph, name: str, trained) -> dict[str, str]:
    stage: CommandStage = graph.stage(name)
    return {f"file:{f}": file_fingerprint(graph.resolve(f)) for f in stage.files}


def missing_output(graph: Graph, name: str, state: dict) -> str | None:
    gone = [o for o in graph.stage(name).outputs if not graph.resolve(o).exists()]
    return f"its output {gone[0]} is gone" if gone else None


def _values(ctx: RunContext, name: str, workdir: Path) -> dict[str, str]:
    """Each placeholder's value: inputs as paths (rows written to parquet here first), then the built-ins."""
    graph, stage = ctx.graph, ctx.graph.stage(name)
    values: dict[str, str] = {}
    for inp in stage.inputs:
        kind = graph.stage(inp).kind
        if kind == "train":
            values[inp] = ctx.trained[inp]
        elif kind == "export":
            values[inp] = str(graph.resolve(graph.stage(inp).path))
        else:
            path = workdir / f"{inp}.parquet"
            with ctx.store.read() as con:
                table = con.sql(f"SELECT * FROM {quote_ident(inp)}").to_arrow_table()
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(table, tmp)
            tmp.replace(path)
            values[inp] = str(path)
    values.update(output=str(graph.resolve(stage.outputs[0])), outputs_dir=str(workdir), store=str(ctx.store.path),
                  pipeline_dir=str(graph.base_dir), run_id=ctx.run_id)
    return values


def render(command: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        return shlex.quote(values[m.group(1)])
    return PLACEHOLDER.sub(one, command)


def run(ctx: RunContext, name: str) -> dict:
    graph, stage = ctx.graph, ctx.graph.stage(name)
    workdir = ctx.store.path.parent / "commands" / name
    workdir.mkdir(parents=True, exist_ok=True)
    values = _values(ctx, name, workdir)
    for out in stage.outputs:
        graph.resolve(out).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SYNTH_OUTPUT": values["output"], "SYNTH_STORE": values["store"], "SYNTH_RUN_ID": ctx.run_id,
           **{f"SYNTH_INPUT_{inp.upper()}": values[inp] for inp in stage.inputs}}
    command = render(stage.run, values)
    ctx.console.print(f"  {name}: $ {command}", highlight=False, markup=False)
    proc = subprocess.Popen(["bash", "-c", command], cwd=graph.base_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    tail: deque[str] = deque(maxlen=20)

    def relay() -> None:  # its output to the console as it comes, the last lines kept for an error
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            ctx.console.print(f"  {name}| {line.rstrip()}", highlight=False, markup=False)
    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=stage.timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise SynthError(f"{graph.where(name, 'run')}: the command ran past timeout_s ({stage.timeout_s:g} s) and was "
                         "stopped; nothing recorded, a re-run runs it again") from None
    except BaseException:  # Ctrl-C, SIGTERM: the command's whole process group goes with synth
        _stop(proc)
        raise
    finally:
        reader.join(timeout=5)
    if code != 0:
        last = next((line for line in reversed(tail) if line.strip()), "no output")
        raise SynthError(f"{graph.where(name, 'run')}: the command exited {code}: {last.strip()[:300]}; nothing "
                         "recorded, a re-run runs it again")
    missing = [o for o in stage.outputs if not graph.resolve(o).exists()]
    if missing:
        raise SynthError(f"{graph.where(name, 'outputs')}: the command exited 0 but did not write {missing[0]}; "
                         "nothing recorded")
    first = graph.resolve(stage.outputs[0])
    rows = None
    with ctx.store.write() as con:
        if first.suffix in READERS:
            Store.replace_view(con, name, f"SELECT * FROM {READERS[first.suffix]}({sql_str(str(first))})")
            try:
                rows = fetch_one(con, f"SELECT count(*) FROM {quote_ident(name)}")[0]
                have = [r[0] for r in con.execute(f"DESCRIBE {quote_ident(name)}").fetchall()]
            except Exception as exc:  # noqa: BLE001 - DuckDB cannot read what the tool wrote: the user's to fix
                raise SynthError(f"{graph.where(name, 'outputs')}: {first} cannot be read as rows: {exc}"[:500]) from None
            lacking = [c for c in (stage.columns or []) if c not in have]
            if lacking:
                raise SynthError(f"{graph.where(name, 'columns')}: key 'columns': {first} has no column {lacking[0]!r} "
                                 f"(it has: {', '.join(have)}); nothing recorded")
        ctx.record(con, name, "done", rows or 0, outputs=[str(graph.resolve(o)) for o in stage.outputs])
    ctx.console.print(f"  {name}: done" + (f", {rows} rows in {first.name}" if rows is not None else ""))
    return {"rows": rows or 0}


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


KIND = Kind(
    name="command", run=run, references=references, check=check, fingerprint=fingerprint,
    missing_output=missing_output,
    reads=lambda graph, name: {graph.resolve(f): f"a file of command stage '{name}'" for f in graph.stage(name).files},
    writes=lambda graph, name: [graph.resolve(o) for o in graph.stage(name).outputs],
    not_fingerprinted=frozenset({"timeout_s"}),
)
