"""Property-based fuzzing of what a user writes: pipeline files (mappings built from the schema's own
keys with values of random types), templates (random Jinja-ish strings) and seed rows (random JSON
values). The property: the input is accepted, or it is a SynthError of one line — never another
exception, never a hang (each example has a deadline; the test a timeout) — and through the CLI, an
error writes nothing. Derandomized: the same examples on every run, so CI is reproducible."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

from synth.config import STAGE_MODELS, PipelineFile  # noqa: E402
from synth.errors import SynthError  # noqa: E402

SETTINGS = dict(derandomize=True, deadline=15_000, suppress_health_check=list(HealthCheck), database=None)

SEED_ROWS = [{"question": f"Q{i}: what is {i} + 1?", "answer_gold": str(i + 1)} for i in range(4)]
NAMES = ["problems", "solutions", "kept", "sft", "graded", "tutor", "solve", "cot", "seeds.jsonl", "out/sft.jsonl",
         "question", "answer_gold", "text", "answer", "finish_stop", "length_bounds", "nope", ""]


@pytest.fixture(scope="module")
def ws() -> Path:
    root = Path(tempfile.mkdtemp(prefix="synth_fuzz_"))
    (root / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEED_ROWS))
    (root / "prompts").mkdir()
    (root / "prompts" / "solve.yaml").write_text('system: "Be brief."\nuser: "{{ question }}"\nparse: boxed\n')
    yield root
    shutil.rmtree(root, ignore_errors=True)


def one_line_error(exc: SynthError) -> None:
    text = str(exc)
    assert text.strip() and "\n" not in text and "Traceback" not in text, text


def load_and_check(path: Path) -> None:
    """What `synth run` does before it writes anything."""
    from rich.console import Console

    from synth.pipeline import load_pipeline
    from synth.pipeline import preflight

    try:
        pipeline = load_pipeline(path)
        preflight(pipeline, pipeline.order, Console(stderr=True, quiet=True))
        event("accepted")
    except SynthError as exc:
        event("refused")
        one_line_error(exc)


# ---- (a) pipeline files ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2 ** 80, max_value=2 ** 80),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NAMES), st.text(max_size=20),
    st.sampled_from(["1e20", "nan", ".inf", "true", "2**70", "0x10", "-1"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8),
                                                                        inner, max_size=4)), max_leaves=12)
PARAM_KEYS = ["temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "presence_penalty", "logprobs"]


@st.composite
def stages(draw):
    kind = draw(st.sampled_from(list(STAGE_MODELS) + ["nope"]))
    fields = list(STAGE_MODELS[kind].model_fields) if kind in STAGE_MODELS else ["input"]
    fields = [("pass" if f == "pass_" else f) for f in fields]
    stage = {"kind": kind}
    for key in draw(st.lists(st.sampled_from(fields + ["bogus"]), max_size=6)):
        if key == "params":
            stage[key] = draw(st.dictionaries(st.sampled_from(PARAM_KEYS), scalars, max_size=3))
        else:
            stage[key] = draw(st.one_of(st.sampled_from(NAMES), values))
    return stage


BASE = {"teachers": {"tutor": {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}},
        "stages": {"problems": {"kind": "load", "path": "seeds.jsonl"},
                   "solutions": {"kind": "generate", "input": "problems", "teacher": "tutor", "prompt": "solve"}}}


@st.composite
def pipelines(draw):
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["problems", "solutions", "kept", "sft", "graded", "x"]))
        data["stages"][name] = draw(stages())
    if draw(st.booleans()):
        data["stages"]["solutions"]["params"] = draw(st.dictionaries(st.sampled_from(PARAM_KEYS), scalars,
                                                                     max_size=4))
    if draw(st.booleans()):
        data[draw(st.sampled_from(["store", "teachers", "bogus"]))] = draw(values)
    text = yaml.safe_dump(data, sort_keys=False)
    if draw(st.booleans()):  # a textual mutation: a line dropped, doubled, or a fragment inserted
        lines = text.splitlines()
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "double", "insert"]))
        if op == "drop":
            del lines[i]
        elif op == "double":
            lines.insert(i, lines[i])
        else:
            lines.insert(i, draw(st.sampled_from(["  samples: 1e20", "stages:", "\t", "  - x", "[", "&a x", "*a",
                                                  "  kept: {kind: keep, input: problems, pass: [solutions]}"])))
        text = "\n".join(lines) + "\n"
    return text


@pytest.mark.timeout(180)
@settings(max_examples=400, **SETTINGS)
@given(text=pipelines())
def test_fuzz_pipeline_files(ws, text):
    path = ws / "fuzz.yaml"
    path.write_text(text)
    load_and_check(path)


def test_the_fuzzed_schema_keys_are_the_real_ones():
    assert set(PARAM_KEYS) <= set(STAGE_MODELS["generate"].model_fields["params"].annotation.model_fields)
    assert "stages" in PipelineFile.model_fields


# ---- (b) templates --------------------------------------------------------------------------------------

TOKENS = ["{{", "}}", "{%", "%}", "{#", "#}", " ", "for ", " in ", "range(", "100000", ")", "endfor", "if ", "endif",
          "set ", "x", "=", "question", "answer_gold", "nope", ".", "|", "join", "upper", "replace(", "''", "'a'",
          ",", "*", "**", "~", "+", "10", "9", "loop.index", "(", "[", "]", "macro m()", "endmacro", "m()",
          "include 'x'", "center(", "lipsum(", "%", "'%s'", "format", "default('')", "\n", "é", "\\"]


@pytest.mark.timeout(180)
@settings(max_examples=400, **SETTINGS)
@given(parts=st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=40),
       system=st.booleans())
def test_fuzz_templates(ws, parts, system):
    from synth.prompts import load_template

    source = "".join(parts)
    spec = {"user": source}
    if system:
        spec["system"] = source[::-1]
    (ws / "prompts" / "fuzz.yaml").write_text(yaml.safe_dump(spec))
    try:
        template = load_template("fuzz", ws, "where")
        template.check_columns(["id", "question", "answer_gold"], "where")
        for row in SEED_ROWS:
            messages = template.render({"id": "r", **row}, where="where")
            assert sum(len(m["content"]) for m in messages) <= 2 * 2 ** 20
        event("rendered")
    except SynthError as exc:
        event("refused")
        one_line_error(exc)


# ---- (c) seed rows, through the CLI ------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                         st.sampled_from(["", "x" * 100_000, "é" * 1000, "\x00", "\ud7ff"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
rows = st.fixed_dictionaries({"q": json_values, "a": json_values},
                             optional={"extra": json_values, "id": st.one_of(st.integers(0, 3), st.text(max_size=3))})

PIPELINE = """\
store: out/run.duckdb
stages:
  problems: {kind: load, path: seeds.jsonl}
  sft: {kind: export, input: problems, format: sft, prompt: ask, response: a, path: out/sft.jsonl}
"""


@pytest.mark.timeout(240)
@settings(max_examples=80, **SETTINGS)
@given(lines=st.lists(st.one_of(rows.map(lambda r: json.dumps(r, ensure_ascii=False)),
                                st.sampled_from(["", "{", "[1]", "null", '{"q": 1, "q": 2}', "\ufeff{}"])),
                      max_size=5),
       huge=st.booleans())
def test_fuzz_seed_rows_through_the_cli(lines, huge):
    from click.testing import CliRunner

    from synth.cli import main

    root = Path(tempfile.mkdtemp(prefix="synth_fuzz_seeds_"))
    try:
        (root / "prompts").mkdir()
        (root / "prompts" / "ask.yaml").write_text('user: "{{ q }}"\n')
        body = "\n".join(lines) + "\n"
        if huge:
            body += json.dumps({"q": "x" * (2 ** 20 + 10), "a": "1"}) + "\n"
        (root / "seeds.jsonl").write_text(body, encoding="utf-8", errors="surrogatepass")
        (root / "p.yaml").write_text(PIPELINE)
        result = CliRunner().invoke(main, ["run", str(root / "p.yaml")])
        event(f"exit code {result.exit_code}")
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code == 0:  # accepted: the export reads back
            from conftest import query
            n = query(root / "out" / "run.duckdb", "SELECT count(*) FROM sft")[0][0]
            assert n >= 0
        else:
            assert result.exit_code == 2, result.stderr
            error_lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            assert len(error_lines) == 1 and "Traceback" not in result.stderr, result.stderr
            assert not (root / "out").exists(), "an error wrote something"
    finally:
        shutil.rmtree(root, ignore_errors=True)
