"""The command surface. Each command parses its arguments and calls one function.

A user's mistake (SynthError) is printed as one line, `synth: error: ...`, with exit code 2.
Heavy modules are imported inside the commands, so `synth --help` starts fast.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import click

FORMATS = click.Choice(["table", "csv", "json"])


def _console(stderr: bool = False):
    """Rich console; when piped (scripts, tests, `| less`) it is wide enough not to fold tables."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def _err_console():
    return _console(stderr=True)


class SynthGroup(click.Group):
    """Turns SynthError into one line and exit code 2 for every command; any other exception (a bug in
    synth) is its traceback and exit code 1, as Python would print it, but with API keys scrubbed."""

    def invoke(self, ctx):
        from synth.errors import SynthError
        from synth.secrets import scrub
        threading.excepthook = _thread_excepthook
        try:
            return super().invoke(ctx)
        except SynthError as exc:
            click.echo(f"synth: error: {scrub(str(exc))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("synth: interrupted; everything received so far is saved, re-run to continue", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors, --help, --version
        except Exception:  # noqa: BLE001 - a bug: its traceback, which may quote a key from a server's answer
            import traceback

            sys.stderr.write(scrub(traceback.format_exc()))
            sys.stderr.flush()
            sys.exit(1)


def _thread_excepthook(args) -> None:
    """An exception that ends a background thread: its traceback on stderr, as Python prints it, with API
    keys scrubbed."""
    import traceback

    from synth.secrets import scrub

    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    sys.stderr.write(scrub(f"Exception in thread {name}:\n"
                           + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))))
    sys.stderr.flush()


def _show_progress_logs() -> None:
    """Messages a backend logs to the `synth` logger at INFO and above (the Batch API teacher: batches
    submitted, their status and counts, which can take hours) go to stderr as indented lines."""
    import logging

    logger = logging.getLogger("synth")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for handler in logger.handlers:
        if not any(isinstance(f, _ScrubSecrets) for f in handler.filters):
            handler.addFilter(_ScrubSecrets())


class _ScrubSecrets:
    """A logging filter: a record's message (with its arguments) and exception text, API keys scrubbed."""

    def filter(self, record) -> bool:
        from synth.secrets import scrub

        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - arguments that do not fit the format: show both, scrubbed
            message = f"{record.msg} {record.args}"
        record.msg, record.args = scrub(message), None
        if record.exc_info:
            import logging

            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def _sigterm_as_interrupt() -> None:
    """SIGTERM (`kill`, `timeout`, a scheduler ending a job) stops a run the way Ctrl-C does: what arrived is
    committed, the run row says interrupted. (The journal keeps answers even without this: kill -9.)"""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


@click.group(cls=SynthGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synth-distill")
def main() -> None:
    """synth: distil large language models through data.

    A pipeline file names a store (one DuckDB file), teachers and stages. `synth run` runs the
    stale stages; every stage's output is a table you can query by the stage's name.
    """


PIPELINE = click.argument("pipeline", type=click.Path(path_type=Path))


@main.command()
@PIPELINE
@click.argument("stages", nargs=-1)
@click.option("--force", is_flag=True, help="Run the named stages even if they are up to date.")
@click.option("--only", is_flag=True, help="Run the named stages alone, not the stale stages they read: refused "
                                           "(naming it) when one of those is stale.")
@click.option("--max-cost", type=click.FloatRange(min=0, min_open=True), default=None, metavar="USD",
              help="Stop generating (resumably) once this run has spent this much at the teachers' prices.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train up to this many independent train stages at once (worker processes sharing the cores).")
def run(pipeline: Path, stages: tuple[str, ...], force: bool, only: bool, max_cost: float | None, jobs: int) -> None:
    """Run the stale stages of PIPELINE (or the named STAGES and what they read), in DAG order."""
    from synth.pipeline import load_pipeline, run as run_pipeline

    p = load_pipeline(pipeline)
    _show_progress_logs()
    _sigterm_as_interrupt()
    counts = run_pipeline(p, list(stages) or None, force=force, argv=sys.argv[1:], console=_err_console(),
                          max_cost=max_cost, only=only, jobs=jobs)
    click.echo(f"run {counts['run_id']}: {len(counts['stages_run'])} stages run, {counts['sent']} requests sent, "
               f"{counts['cached']} cached, {counts['errors']} errors", err=True)
    if counts.get("stopped_at_budget"):
        click.echo(f"stopped at the budget of {', '.join(counts['stopped_at_budget'])}: {counts['unsent']} requests "
                   "unsent; raise max_cost / max_tokens_total and re-run to continue", err=True)
    if counts["errors"]:
        click.echo("some requests failed; `synth status` counts them and a re-run retries them", err=True)
    if counts["errors"] or counts.get("unsent"):
        sys.exit(1)


@main.command()
@click.option("--dir", "target", type=click.Path(path_type=Path, file_okay=False), default=Path("synth-demo"),
              show_default=True, help="Where the demo's files, data, models, store and report go.")
def demo(target: Path) -> None:
    """The whole distillation loop, offline, on a CPU, in under 10 minutes.

    \b
    The world: arithmetic word problems with integer answers ("Ann has 7 pens. Ann buys 3 more,
    then doubles them. How many pens does Ann have?"), 2-4 steps, made by a seeded program with
    gold answers and gold step-by-step solutions, in disjoint train / seed / held-out splits,
    and new problems (prompts) that nobody trains on.
    The teacher: a small transformer trained from scratch on the gold solutions (synth's own
    train stage); sampled at temperature 0.7 it is right often, not always.
    The loop: the teacher writes 8 solutions per seed problem, keeping its top-8 log-probs;
    verify, vote and keep judge them; a smaller student is trained, under three seeds, on all
    samples (A), on the verified ones (B), and by KD on their top-8 (C); B samples the new
    problems, for DPO on pairs of its verified vs failed samples and for one on-policy KD round
    on its samples scored by the teacher (D); all are evaluated on held-out problems.

    Prints the report and writes DIR/report.json and DIR/report.png. DIR keeps the pipeline,
    world, template and recipes: edit them and re-run; only what changed runs again (a second
    run trains nothing and sends no request).
    """
    from synth.demo import run_demo

    report = run_demo(target, _err_console())
    if report["this_run"]["errors"]:
        click.echo("some requests failed; `synth status DIR/pipeline.yaml` counts them and a re-run retries them",
                   err=True)
        sys.exit(1)


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, type=click.Path(path_type=Path),
              help="A file the tokenizer learns from (rows: every string value; .txt: lines). Repeatable.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("models"), show_default=True,
              help="Where the model dir goes (without a SPEC).")
@click.option("--name", default="student-init", show_default=True, help="The model dir's name (without a SPEC).")
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--vocab-size", type=int, default=800, show_default=True)
@click.option("--split-digits", is_flag=True, help="Every digit its own token (arithmetic tasks).")
@click.option("--seed", type=int, default=0, show_default=True)
def models(spec: Path | None, texts: tuple[Path, ...], out: Path, name: str, hidden: int, layers: int, heads: int,
           vocab_size: int, split_digits: bool, seed: int) -> None:
    """Build small random-init models (Llama-shaped) with a tokenizer trained on your own files: the models a
    SPEC file (models.yaml: text, models {name: {hidden, layers, heads}}, ...) names, or one from the flags.
    A model already built from the same spec and text is kept (nothing to do the second time)."""
    from synth.errors import SynthError
    from synth.tiny import ModelShape, build_from_spec, build_models, corpus_of

    console = _err_console()
    if spec is not None:
        if texts:
            raise SynthError("synth models: give a SPEC file or --text files with the flags, not both")
        loaded, built = build_from_spec(spec, console)
        names = list(loaded.models)
    else:
        if not texts:
            raise SynthError("synth models: give a SPEC file (models.yaml) or --text FILE (the text the tokenizer "
                             "learns) with the model's flags")
        try:
            shape = ModelShape(hidden=hidden, layers=layers, heads=heads).model_dump()
        except ValueError as exc:
            raise SynthError(f"synth models: {exc.errors()[0]['msg']}") from None
        built = build_models(out, corpus_of(texts), {name: shape}, vocab_size=vocab_size, split_digits=split_digits,
                             seed=seed, console=console)
        names = [name]
    click.echo(f"{len(built)} of {len(names)} models built ({', '.join(names)}); the others were up to date",
               err=True)


@main.command()
@click.argument("target", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seeds", required=True, type=click.Path(path_type=Path), help="The rows the teacher answers.")
@click.option("--heldout", type=click.Path(path_type=Path), default=None,
              help="Rows nobody trains on: adds an evaluate stage of teacher and student.")
@click.option("--question", default=None, help="The column that is the question (default: guessed).")
@click.option("--answer", default=None, help="The column with the reference answer (default: guessed; none: a vote).")
@click.option("--teacher", default=None, metavar="hf:PATH|vllm:PATH|openai:MODEL|echo",
              help="The teacher (default: openai:gpt-4o-mini; with --gold, a model built by `synth models`).")
@click.option("--student", default=None, help="The student's starting model: a dir or a hub id (default: "
                                              "models/student-init, built by `synth models DIR/models.yaml`).")
@click.option("--gold", type=click.Path(path_type=Path), default=None,
              help="Rows with full solutions: synth first trains the teacher on them, as the demo does.")
@click.option("--solution", default="solution", show_default=True, help="The --gold rows' solution column.")
@click.option("--force", is_flag=True, help="Overwrite files already in TARGET.")
def new(target: Path, seeds: Path, heldout: Path | None, question: str | None, answer: str | None,
        teacher: str | None, student: str | None, gold: Path | None, solution: str, force: bool) -> None:
    """Start a workspace for your own task in TARGET: a pipeline (seed rows → teacher samples → verify or vote →
    keep → SFT export → student; evaluate with --heldout), a prompt template, training recipes and, for
    random-init models, a models.yaml for `synth models`. Then: synth models TARGET/models.yaml (if written),
    synth plan / run / report TARGET/pipeline.yaml."""
    from synth.scaffold import new_workspace

    written = new_workspace(target, seeds, heldout=heldout, question=question, answer=answer, teacher=teacher,
                            student=student, gold=gold, solution=solution, force=force)
    for path in written:
        click.echo(f"wrote {path}", err=True)
    steps = ([f"synth models {target / 'models.yaml'}"] if any(p.name == "models.yaml" for p in written) else []) + \
        [f"synth plan {target / 'pipeline.yaml'}", f"synth run {target / 'pipeline.yaml'}"]
    click.echo("next: " + " && ".join(steps), err=True)


@main.command()
@PIPELINE
@click.argument("stages", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def plan(pipeline: Path, stages: tuple[str, ...], fmt: str) -> None:
    """Show what `synth run` would do, without calling any teacher: each stage, stale or fresh and
    why, requests cached vs to send, and a token estimate: counted with the teacher's tokenizer and chat
    template when synth can load it (hf, vllm, an openai teacher's `tokenizer`), else ~4 characters
    per token (marked ≈)."""
    from rich.table import Table

    from synth.pipeline import load_pipeline, plan as make_plan

    p = load_pipeline(pipeline)
    rows = make_plan(p, list(stages) or None)
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    table = Table(title=f"plan for {p.path.name}")
    for col in ("stage", "kind", "status", "requests", "cached", "to send", "est. prompt tokens",
                "max completion tokens", "max cost", "why"):
        table.add_column(col)
    fmt = lambda v: "" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))  # noqa: E731
    for r in rows:
        cost = "" if r.get("max_cost") is None else f"${r['max_cost']:,.4f}"
        table.add_row(r["stage"], r["kind"], "stale" if r["stale"] else "fresh", fmt(r.get("requests")),
                      fmt(r.get("cached")), fmt(r.get("to_send")),
                      ("≈" if r.get("prompt_tokens_by") == "chars/4" else "") + fmt(r.get("est_prompt_tokens")),
                      fmt(r.get("max_completion_tokens")), cost, r.get("note") or r["reason"])
    _console().print(table)


@main.command()
@PIPELINE
def status(pipeline: Path) -> None:
    """Per-stage counts (rows, requests done / failed / pending, tokens) and the last runs.
    Answers while a run is writing."""
    from synth.inspection import print_status
    from synth.pipeline import load_pipeline

    print_status(load_pipeline(pipeline), _console())


@main.command()
@PIPELINE
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def stats(pipeline: Path, fmt: str) -> None:
    """The filter funnel: per filter stage rows judged, passed, rejected and the top rejection reasons;
    per keep stage rows kept."""
    from synth.inspection import print_stats, stats_rows
    from synth.pipeline import load_pipeline

    loaded = load_pipeline(pipeline)
    if fmt == "json":
        click.echo(json.dumps(stats_rows(loaded), indent=2))
    else:
        print_stats(loaded, _console())


@main.command()
@PIPELINE
@click.option("--png", type=click.Path(path_type=Path), default=None,
              help="Where to write the chart (default: report.png next to the store).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--compare", "pairs", multiple=True, metavar="A,B",
              help="Compare model A with model B on the rows both were evaluated on (repeatable). Default: each "
                   "trained model with its init, and trained models from the same student with each other.")
def report(pipeline: Path, png: Path | None, fmt: str, pairs: tuple[str, ...]) -> None:
    """Compare models: the teachers' single-sample and vote accuracy (verify/vote stages), per evaluate
    stage each model's accuracy with a 95% interval and mean output tokens, and paired differences with
    McNemar's exact p-value; writes a PNG of the accuracies, the differences and the filter funnel."""
    from synth.pipeline import load_pipeline
    from synth.report import print_report, report_data, write_png

    asked = []
    for pair in pairs:
        a, sep, b = pair.partition(",")
        if not sep or not a.strip() or not b.strip() or "," in b:
            from synth.errors import SynthError

            raise SynthError(f"--compare {pair}: give two model names separated by a comma (--compare student_b,student_a)")
        asked.append((a.strip(), b.strip()))
    loaded = load_pipeline(pipeline)
    data = report_data(loaded, asked or None)
    out = write_png(data, png or loaded.store.path.with_name("report.png"))
    if fmt == "json":
        click.echo(json.dumps({**data, "png": str(out)}, indent=2, default=str))
    else:
        print_report(data, _console())
        _console().print(f"chart: {out}")


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("query")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def sql(target: Path, query: str, fmt: str) -> None:
    """Run a SQL QUERY on the store of TARGET (a pipeline file or a .duckdb file). Stage outputs are
    tables named after their stages; internals live in the `synth` schema (synth.runs, ...)."""
    from synth.inspection import format_rows, run_query, store_for

    format_rows(run_query(store_for(target), query), fmt, _console())


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("stage")
@click.option("-n", "n", default=5, show_default=True, help="How many rows.")
def show(target: Path, stage: str, n: int) -> None:
    """Pretty-print the first N rows of STAGE's output."""
    from synth.inspection import show as show_rows, store_for

    show_rows(store_for(target), stage, n, _console())


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("row_id")
def why(target: Path, row_id: str) -> None:
    """The lineage of a row (a request id, or a unique prefix of one): input row, rendered messages,
    teacher, params, completion, errors and the run that wrote it."""
    from synth.inspection import store_for, why as show_why

    show_why(store_for(target), row_id, _console())


# ---- exploring a store, read-only (synth/explore.py): sample, grep, diff -----------------------------

@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("stage")
@click.option("-n", "n", type=click.IntRange(min=0), default=5, show_default=True, help="How many rows.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Another seed, other rows; the same seed, the same rows (ordered by md5 of id and seed).")
@click.option("--reason", default=None, metavar="R",
              help="Only rows a filter rejected with reason R (duplicate_of also matches duplicate_of:<id>).")
@click.option("--filter", "filter_stage", default=None, metavar="F",
              help="Only rows the filter stage F judged (with --reason: that F rejected).")
@click.option("--failed", is_flag=True, help="Only rows that failed --filter F.")
@click.option("--passed", is_flag=True, help="Only rows that passed --filter F.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def sample(target: Path, stage: str, n: int, seed: int, reason: str | None, filter_stage: str | None,
           failed: bool, passed: bool, fmt: str) -> None:
    """N random rows of STAGE's output, each with its verdicts, reproducibly (--seed); optionally only the
    rows a filter rejected with a reason, or that failed or passed a filter. Says how many rows matched."""
    from synth.explore import print_sample, sample_rows
    from synth.inspection import store_for

    result = sample_rows(store_for(target), stage, n=n, seed=seed, reason=reason, filter_stage=filter_stage,
                         failed=failed, passed=passed)
    print_sample(result, _console(), fmt, err=_err_console())


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("pattern")
@click.option("--stage", default=None, help="Search only this stage (a generate or load stage).")
@click.option("-n", "n", type=click.IntRange(min=0), default=20, show_default=True, help="How many hits to print.")
@click.option("--regex", is_flag=True, help="PATTERN is a regular expression (DuckDB's RE2 syntax).")
@click.option("--case-sensitive", is_flag=True, help="Match case (by default case is ignored).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def grep(target: Path, pattern: str, stage: str | None, n: int, regex: bool, case_sensitive: bool, fmt: str) -> None:
    """Search the store's texts for PATTERN: generate stages' completions (and reasoning), the prompts they
    rendered, and load stages' text columns. Per hit: stage, id, where, and a snippet around the match."""
    from synth.explore import grep_hits, print_grep
    from synth.inspection import store_for

    result = grep_hits(store_for(target), pattern, stage=stage, n=n, regex=regex, case_sensitive=case_sensitive)
    print_grep(result, _console(), fmt, err=_err_console())


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("a")
@click.argument("b", required=False)
@click.option("--runs", default=None, metavar="R1,R2",
              help="Compare stage A across two runs (ids from synth.runs, or unique prefixes) instead of two stages.")
@click.option("-n", "n", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many changed rows to show.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def diff(target: Path, a: str, b: str | None, runs: str | None, n: int, fmt: str) -> None:
    """Compare two stages A and B (two filter stages: pass rates, rejection reasons; two generate stages:
    completions, parsed answers, tokens), or one stage A across two runs (--runs R1,R2: a filter, evaluate
    or pairs stage); then rows only in one, in both, and the rows that changed, both sides shown."""
    from synth.errors import SynthError
    from synth.explore import diff_runs, diff_stages, print_diff
    from synth.inspection import store_for

    if (b is None) == (runs is None):
        raise SynthError("synth diff: give two stages (synth diff TARGET A B) or one stage and two runs "
                         "(synth diff TARGET STAGE --runs R1,R2)")
    store = store_for(target)
    result = diff_runs(store, a, runs, n) if runs is not None else diff_stages(store, a, b, n)
    print_diff(result, _console(), fmt)


# ---- prompt templates, read-only (synth/prompts_cmd.py): list them, preview one stage's render --------------

@main.command()
@PIPELINE
@click.argument("stage", required=False)
@click.option("--row", "row_id", default=None, metavar="ID", help="Render STAGE on the input row with this id.")
@click.option("--index", type=int, default=None, metavar="N",
              help="Render STAGE on its N-th input row (from 0, in the order the stage reads them).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def prompts(pipeline: Path, stage: str | None, row_id: str | None, index: int | None, fmt: str) -> None:
    """List the prompt templates PIPELINE can use (its prompts/ folder over the built-ins): source, built-ins
    shadowed, parser, variables, the stages that render each. With STAGE (generate, judge, evaluate, or an
    export with `prompt:`): its prompt rendered on one input row (default: the first) exactly as `synth run`
    would send it, with the request ids and whether each is cached. Calls no teacher, writes nothing."""
    from synth.prompts_cmd import run_prompts

    run_prompts(pipeline, stage, row_id, index, fmt, _console())


if __name__ == "__main__":
    main()
