"""A table of bad inputs, each run through `synth run` in a workspace that already holds a valid
previous run (its store, an export and the export's sidecar): every one must end with exit code 2,
exactly one line on stderr that names the file (and the stage / key where there is one), no
traceback, and nothing written — every file in the workspace byte for byte as it was.

Most cases call the CLI in-process (click's runner: the same command, the same error printing);
SUBPROCESS_CASES also run as a real `python -m synth.cli run` process, as a user would."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SEEDS, synth

# The pipeline each case edits. Its teacher is an OpenAI-compatible server that is not there (port 9,
# no retries): a case that wrongly passes validation would reach it, write error rows and exit 1.
VALID = """\
store: out/run.duckdb
teachers:
  tutor: {backend: openai, model: m, base_url: 'http://127.0.0.1:9/v1', max_retries: 0, timeout_s: 1}
stages:
  problems: {kind: load, path: seeds.jsonl}
  solutions:
    kind: generate
    input: problems
    teacher: tutor
    prompt: solve
    samples: 2
    params: {temperature: 0.8, max_tokens: 8, seed: 0}
  stopped: {kind: filter, input: solutions, where: "finish_reason = 'stop'"}
  kept: {kind: keep, input: solutions, pass: [stopped]}
  sft: {kind: export, input: problems, format: sft, prompt: solve, response: answer_gold, path: out/sft.jsonl}
"""

# The previous run: the same store and export, with stages that need no teacher.
PREVIOUS = """\
store: out/run.duckdb
stages:
  problems: {kind: load, path: seeds.jsonl}
  sft: {kind: export, input: problems, format: sft, prompt: solve, response: answer_gold, path: out/sft.jsonl}
"""

SOLVE = 'system: "Solve step by step and end with \\\\boxed{ANSWER}."\nuser: "{{ question }}"\nparse: boxed\n'


def R(*pairs: str):
    """Edit VALID: replace each old text (which must be there) with the new one, once."""
    assert len(pairs) % 2 == 0

    def edit(text: str) -> str:
        for old, new in zip(pairs[::2], pairs[1::2]):
            assert old in text, old
            text = text.replace(old, new, 1)
        return text
    return edit


def T(text: str):
    """Replace VALID with this text (dedented)."""
    return lambda _: textwrap.dedent(text)


def prompt(name: str):
    return R("prompt: solve\n    samples", f"prompt: {name}\n    samples")


def seeds(name: str):
    return R("path: seeds.jsonl}", f"path: {name}}}", "sft: {kind: export, input: problems, format: sft, prompt: solve, "
             "response: answer_gold, path: out/sft.jsonl}", "")


def nested_loops(depth: int) -> str:
    return "".join("{% for i" + str(k) + " in range(100000) %}" for k in range(depth)) + "x" + \
        "{% endfor %}" * depth


BIG_LINE = json.dumps({"question": "Q1: " + "x" * (2 * 2 ** 20), "answer_gold": "3"}) + "\n"
ALIAS_BOMB = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"{c}: &{c} [{', '.join('*' + p for _ in range(10))}]\n" for p, c in zip("abcdef", "bcdefg")) + \
    "stages: {x: {kind: load, path: seeds.jsonl}}\n"

# (id, edit of VALID, {extra file: content}, substrings of the error line; "{p}" is the pipeline file)
CASES = [
    # ---- the pipeline file: YAML ----------------------------------------------------------------------
    ("yaml syntax", R("samples: 2", "samples: [2"), {}, ["{p}:", "not valid YAML"]),
    ("yaml tab indent", R("  problems:", "\tproblems:"), {}, ["{p}:", "YAML"]),
    ("yaml unclosed quote", R("finish_reason = 'stop'\"", "finish_reason = 'stop'"), {}, ["{p}:", "YAML"]),
    ("duplicate stages key", lambda t: t + "stages:\n  other: {kind: load, path: seeds.jsonl}\n", {},
     ["{p}:16", "'stages'", "given twice", "lines 4 and 16"]),
    ("duplicate stage name", R("  kept:", "  problems: {kind: load, path: seeds.jsonl}\n  kept:"), {},
     ["{p}:14", "'problems'", "lines 5 and 14"]),
    ("duplicate key in a stage", R("samples: 2", "samples: 2\n    samples: 3"), {}, ["{p}:12", "'samples'", "twice"]),
    ("duplicate key in a flow mapping", R("seed: 0}", "seed: 0, seed: 1}"), {}, ["{p}:12", "'seed'", "twice"]),
    ("duplicate teacher", R("stages:", "  tutor: {backend: hf, model: x}\nstages:"), {}, ["{p}:4", "'tutor'", "twice"]),
    ("duplicate top-level store", R("store: out/run.duckdb", "store: out/run.duckdb\nstore: out/b.duckdb"), {},
     ["{p}:2", "'store'", "twice"]),
    ("alias bomb", T(ALIAS_BOMB), {}, ["{p}", "aliases"]),
    ("deeply nested", T("stages: " + "[" * 3000), {}, ["{p}"]),
    ("empty file", T(""), {}, ["{p}", "mapping"]),
    ("only a comment", T("# nothing\n"), {}, ["{p}", "mapping"]),
    ("a list, not a mapping", T("- problems\n- solutions\n"), {}, ["{p}", "mapping"]),
    ("a scalar", T("hello\n"), {}, ["{p}", "mapping"]),
    ("stages is a list", T("stages:\n  - {kind: load, path: seeds.jsonl}\n"), {}, ["{p}", "stages"]),
    ("stages is empty", T("stages: {}\n"), {}, ["{p}", "stages"]),
    ("stages missing", T("store: out/run.duckdb\n"), {}, ["{p}", "missing required key 'stages'"]),
    ("a stage is a string", R("  kept: {kind: keep, input: solutions, pass: [stopped]}", "  kept: keep"), {},
     ["{p}:14", "stage 'kept'"]),
    ("teachers is a list", R("  tutor: {backend", "  - {backend"), {}, ["{p}", "teachers"]),
    # ---- the pipeline file: keys and kinds ---------------------------------------------------------------
    ("unknown top-level key", R("store: out", "stor: out"), {}, ["{p}:1", "unknown key 'stor'"]),
    ("unknown stage key", R("samples: 2", "sampels: 2"), {}, ["{p}:11", "stage 'solutions'", "unknown key 'sampels'"]),
    ("unknown params key", R("seed: 0}", "seed: 0, temp: 1}"), {}, ["{p}:12", "unknown key 'temp'"]),
    ("unknown teacher key", R("timeout_s: 1}", "timeout_s: 1, speed: 3}"), {}, ["{p}:3", "teacher 'tutor'", "'speed'"]),
    ("unknown kind", R("kind: keep", "kind: kep"), {}, ["{p}:14", "stage 'kept'", "unknown kind 'kep'"]),
    ("missing kind", R("{kind: keep, input", "{input"), {}, ["{p}:14", "stage 'kept'", "'kind'"]),
    ("unknown backend", R("backend: openai", "backend: opnai"), {}, ["{p}:3", "teacher 'tutor'", "'opnai'"]),
    ("missing load path", R("{kind: load, path: seeds.jsonl}", "{kind: load}"), {}, ["{p}:5", "stage 'problems'", "'path'"]),
    ("empty load path", R("path: seeds.jsonl", "path: ''"), {}, ["{p}:5", "stage 'problems'", "'path'"]),
    ("stage name with a dash", R("  kept:", "  my-kept:"), {}, ["{p}:14", "'my-kept'"]),
    ("stage name is a SQL keyword", R("  kept:", "  order:"), {}, ["{p}:14", "'order'", "SQL"]),
    ("stage name is reserved", R("  kept:", "  synth:"), {}, ["{p}:14", "'synth'"]),
    ("stage name is a number", R("  kept:", "  123:"), {}, ["{p}:14", "123"]),
    ("on_length policy", R("samples: 2", "samples: 2\n    on_length: trim"), {}, ["{p}:12", "stage 'solutions'", "on_length"]),
    ("ray workers 0", R("samples: 2", "samples: 2\n    ray: {workers: 0}"), {}, ["{p}:12", "stage 'solutions'", "workers"]),
    # ---- the pipeline file: numbers ------------------------------------------------------------------------
    ("samples true", R("samples: 2", "samples: true"), {}, ["{p}:11", "stage 'solutions'", "'samples'"]),
    ("samples 1e20", R("samples: 2", "samples: 1e20"), {}, ["{p}:11", "'samples'"]),
    ("samples huge int", R("samples: 2", "samples: 100000000000000000000"), {}, ["{p}:11", "64 bits"]),
    ("samples over the bound", R("samples: 2", "samples: 10001"), {}, ["{p}:11", "'samples'", "10000"]),
    ("samples 0", R("samples: 2", "samples: 0"), {}, ["{p}:11", "'samples'"]),
    ("samples negative", R("samples: 2", "samples: -1"), {}, ["{p}:11", "'samples'"]),
    ("samples a string", R("samples: 2", "samples: '2'"), {}, ["{p}:11", "'samples'"]),
    ("samples a float", R("samples: 2", "samples: 2.5"), {}, ["{p}:11", "'samples'"]),
    ("temperature nan", R("temperature: 0.8", "temperature: .nan"), {}, ["{p}:12", "not a finite number"]),
    ("temperature inf", R("temperature: 0.8", "temperature: .inf"), {}, ["{p}:12", "not a finite number"]),
    ("temperature -inf", R("temperature: 0.8", "temperature: -.inf"), {}, ["{p}:12", "not a finite number"]),
    ("temperature 'nan' string", R("temperature: 0.8", "temperature: 'nan'"), {}, ["{p}:12", "'temperature'"]),
    ("temperature negative", R("temperature: 0.8", "temperature: -5"), {}, ["{p}:12", "'temperature'"]),
    ("temperature over 2", R("temperature: 0.8", "temperature: 2.5"), {}, ["{p}:12", "'temperature'"]),
    ("temperature true", R("temperature: 0.8", "temperature: true"), {}, ["{p}:12", "'temperature'"]),
    ("top_p 2", R("seed: 0}", "seed: 0, top_p: 2}"), {}, ["{p}:12", "'top_p'"]),
    ("top_p 0", R("seed: 0}", "seed: 0, top_p: 0}"), {}, ["{p}:12", "'top_p'"]),
    ("max_tokens 1e30", R("max_tokens: 8", "max_tokens: 1e30"), {}, ["{p}:12", "'max_tokens'"]),
    ("max_tokens 1.0e30", R("max_tokens: 8", "max_tokens: 1.0e30"), {}, ["{p}:12", "'max_tokens'"]),
    ("max_tokens over the bound", R("max_tokens: 8", "max_tokens: 2097152"), {}, ["{p}:12", "'max_tokens'"]),
    ("max_tokens 0", R("max_tokens: 8", "max_tokens: 0"), {}, ["{p}:12", "'max_tokens'"]),
    ("max_tokens true", R("max_tokens: 8", "max_tokens: true"), {}, ["{p}:12", "'max_tokens'"]),
    ("seed 2**70", R("seed: 0}", "seed: 1180591620717411303424}"), {}, ["{p}:12", "64 bits"]),
    ("seed a string", R("seed: 0}", "seed: '0'}"), {}, ["{p}:12", "'seed'"]),
    ("seed a float", R("seed: 0}", "seed: 0.5}"), {}, ["{p}:12", "'seed'"]),
    ("stop a string", R("seed: 0}", "seed: 0, stop: 'x'}"), {}, ["{p}:12", "'stop'"]),
    ("limit 0", R("{kind: load, path: seeds.jsonl}", "{kind: load, path: seeds.jsonl, limit: 0}"), {},
     ["{p}:5", "stage 'problems'", "'limit'"]),
    ("limit true", R("{kind: load, path: seeds.jsonl}", "{kind: load, path: seeds.jsonl, limit: true}"), {},
     ["{p}:5", "'limit'"]),
    ("timeout_s nan", R("timeout_s: 1}", "timeout_s: .nan}"), {}, ["{p}:3", "not a finite number"]),
    ("max_retries true", R("max_retries: 0", "max_retries: true"), {}, ["{p}:3", "teacher 'tutor'", "max_retries"]),
    ("strict a string", R("pass: [stopped]}", "pass: [stopped], strict: 'no'}"), {}, ["{p}:14", "'strict'"]),
    # ---- the pipeline file: references ------------------------------------------------------------------------
    ("cycle", R("input: problems\n", "input: kept\n"), {}, ["{p}", "cycle"]),
    ("self input", R("input: problems\n", "input: solutions\n"), {}, ["{p}", "cycle"]),
    ("unknown teacher", R("teacher: tutor", "teacher: tooter"), {}, ["{p}:9", "stage 'solutions'", "'tooter'"]),
    ("unknown input", R("input: problems\n", "input: problem\n"), {}, ["{p}:8", "key 'input'", "'problem'"]),
    ("unknown prompt", prompt("nope"), {}, ["{p}:10", "key 'prompt'", "nope"]),
    ("keep over a filter of other rows", R("pass: [stopped]}", "pass: [stopped, short]}\n  short: {kind: filter, "
                                           "input: problems, where: 'length(question) < 100'}"), {},
     ["{p}:14", "stage 'kept'", "key 'pass'", "'short'", "'problems'"]),
    ("keep passes a generate stage", R("pass: [stopped]", "pass: [solutions]"), {}, ["{p}:14", "key 'pass'"]),
    ("export dpo from a load stage", R("format: sft, prompt: solve", "format: dpo, prompt: solve"), {}, ["{p}:15", "stage 'sft'"]),
    ("export to .csv", R("out/sft.jsonl", "out/sft.csv"), {}, ["{p}:15", "stage 'sft'", "'path'"]),
    ("export response column missing", R("response: answer_gold", "response: answr"), {}, ["{p}:15", "'response'", "answr"]),
    ("max_cost without prices", R("samples: 2", "samples: 2\n    max_cost: 5"), {}, ["{p}:12", "max_cost", "prices"]),
    ("template variable not in the input", prompt("typo"), {"prompts/typo.yaml": 'user: "{{ questoin }}"\n'},
     ["{p}:10", "stage 'solutions'", "questoin"]),
    ("decontaminate against a missing file", R("  kept:", "  clean: {kind: decontaminate, input: solutions, "
                                               "against: [nope.jsonl]}\n  kept:"), {}, ["{p}", "stage 'clean'", "nope.jsonl"]),
    ("train recipe missing", R("  kept:", "  tr: {kind: train, method: sft, data: sft, student: tutor, "
                                 "recipe: train/nope.yaml}\n  kept:"), {}, ["{p}", "stage 'tr'", "nope.yaml"]),
    # ---- filters ------------------------------------------------------------------------------------------
    ("where: bad SQL", R("finish_reason = 'stop'", "finish_reason = = 'stop'"), {}, ["{p}", "stage 'stopped'", "'where'"]),
    ("where: unknown column", R("finish_reason = 'stop'", "finish_reasn = 'stop'"), {},
     ["{p}", "stage 'stopped'", "'where'", "finish_reasn"]),
    ("where: empty", R("where: \"finish_reason = 'stop'\"", "where: ' '"), {}, ["{p}", "stage 'stopped'", "'where'"]),
    ("where and use", R("where: \"finish_reason", "use: finish_stop, where: \"finish_reason"), {}, ["{p}", "stage 'stopped'"]),
    ("unknown filter file", R("where: \"finish_reason = 'stop'\"", "use: nope"), {}, ["{p}", "stage 'stopped'", "nope"]),
    ("filter .py syntax error", R("where: \"finish_reason = 'stop'\"", "use: broken"),
     {"filters/broken.py": "def judge(row:\n    return True\n"}, ["broken.py", "SyntaxError"]),
    ("filter .py without judge", R("where: \"finish_reason = 'stop'\"", "use: nojudge"),
     {"filters/nojudge.py": "def check(row):\n    return True\n"}, ["nojudge.py", "judge"]),
    ("filter .py raises on import", R("where: \"finish_reason = 'stop'\"", "use: boom"),
     {"filters/boom.py": "raise RuntimeError('boom')\n"}, ["boom.py", "boom"]),
    ("filter .sql bad SQL", R("where: \"finish_reason = 'stop'\"", "use: badsql"),
     {"filters/badsql.sql": "finish_reason = = 'stop'\n"}, ["{p}", "stage 'stopped'", "SQL"]),
    ("filter .sql not UTF-8", R("where: \"finish_reason = 'stop'\"", "use: latin"),
     {"filters/latin.sql": b"-- caf\xe9\nfinish_reason = 'stop'\n"}, ["latin.sql:1", "UTF-8"]),
    ("filter .sql args", R("where: \"finish_reason = 'stop'\"", "use: finish_stop, args: {n: 1}"), {},
     ["{p}", "stage 'stopped'", "'args'"]),
    # ---- templates ----------------------------------------------------------------------------------------
    ("template syntax error", prompt("t_syntax"), {"prompts/t_syntax.yaml": 'user: "{{ question "\n'}, ["t_syntax.yaml"]),
    ("template unknown tag", prompt("t_tag"), {"prompts/t_tag.yaml": 'user: "{% frobnicate %}"\n'}, ["t_tag.yaml"]),
    ("template bad call", prompt("t_call"), {"prompts/t_call.yaml": 'user: "{{ question.upper(1, 2, 3) }}"\n'},
     ["{p}", "stage 'solutions'", "input row id", "t_call.yaml", "TypeError"]),
    ("template division by zero", prompt("t_div"), {"prompts/t_div.yaml": 'user: "{{ question }} {{ 1 / 0 }}"\n'},
     ["{p}", "stage 'solutions'", "t_div.yaml", "ZeroDivisionError"]),
    ("template nested loops", prompt("t_loops"), {"prompts/t_loops.yaml": f'user: "{nested_loops(3)}"\n'},
     ["{p}", "stage 'solutions'", "input row id", "t_loops.yaml", "limit"]),
    ("template huge output", prompt("t_huge"), {"prompts/t_huge.yaml": 'user: "{{ question * 10000000 }}"\n'},
     ["{p}", "stage 'solutions'", "t_huge.yaml", "limit"]),
    ("template huge replace", prompt("t_repl"), {"prompts/t_repl.yaml": 'user: "{{ (question * 1000)|replace(\'\', question * 1000) }}"\n'},
     ["t_repl.yaml", "limit"]),
    ("template include", prompt("t_inc"), {"prompts/t_inc.yaml": 'user: "{% include \'other.txt\' %}"\n'},
     ["t_inc.yaml", "include"]),
    ("template bad parse name", prompt("t_parse"), {"prompts/t_parse.yaml": 'user: "{{ question }}"\nparse: boxxed\n'},
     ["t_parse.yaml", "'parse'", "boxxed"]),
    ("template duplicate key", prompt("t_dup"), {"prompts/t_dup.yaml": 'user: "{{ question }}"\nuser: "again"\n'},
     ["t_dup.yaml:2", "'user'", "twice"]),
    ("template unknown key", prompt("t_key"), {"prompts/t_key.yaml": 'user: "{{ question }}"\nsytem: "x"\n'},
     ["t_key.yaml:2", "'sytem'"]),
    ("template a list", prompt("t_list"), {"prompts/t_list.yaml": '- user: "{{ question }}"\n'}, ["t_list.yaml", "mapping"]),
    ("template empty", prompt("t_empty"), {"prompts/t_empty.yaml": ""}, ["t_empty.yaml", "mapping"]),
    ("template without user", prompt("t_nouser"), {"prompts/t_nouser.yaml": 'system: "x"\n'}, ["t_nouser.yaml", "'user'"]),
    ("template user a number", prompt("t_num"), {"prompts/t_num.yaml": "user: 12\n"}, ["t_num.yaml", "'user'"]),
    ("template not UTF-8", prompt("t_latin"), {"prompts/t_latin.yaml": b'user: "caf\xe9 {{ question }}"\n'},
     ["t_latin.yaml:1", "UTF-8"]),
    ("template YAML syntax", prompt("t_yaml"), {"prompts/t_yaml.yaml": 'user: "{{ question }}\n'}, ["t_yaml.yaml", "YAML"]),
    ("dataset export render error", R("prompt: solve, response", "prompt: t_exp, response"),
     {"prompts/t_exp.yaml": 'user: "{{ question.nope }}"\n'}, ["{p}", "stage 'sft'", "t_exp.yaml"]),
    # ---- seed files ---------------------------------------------------------------------------------------
    ("seeds jsonl not UTF-8", seeds("s_latin.jsonl"), {"s_latin.jsonl": b'{"question": "Q1: caf\xe9"}\n'},
     ["s_latin.jsonl:1", "UTF-8"]),
    ("seeds csv not UTF-8", seeds("s_latin.csv"), {"s_latin.csv": b"question,answer_gold\nQ1: caf\xe9,3\n"},
     ["s_latin.csv:2", "UTF-8"]),
    ("seeds broken JSON line", seeds("s_broken.jsonl"),
     {"s_broken.jsonl": '{"question": "Q1"}\n{"question": "Q2"}\n{"question": "Q3", oops}\n'}, ["s_broken.jsonl:3", "JSON"]),
    ("seeds a non-object line", seeds("s_list.jsonl"), {"s_list.jsonl": '{"question": "Q1"}\n[1, 2]\n'},
     ["s_list.jsonl:2", "object"]),
    ("seeds empty", seeds("s_empty.jsonl"), {"s_empty.jsonl": ""}, ["s_empty.jsonl", "no rows"]),
    ("seeds blank lines only", seeds("s_blank.jsonl"), {"s_blank.jsonl": "\n\n  \n"}, ["s_blank.jsonl", "no rows"]),
    ("seeds huge line", seeds("s_big.jsonl"), {"s_big.jsonl": '{"question": "Q0"}\n' + BIG_LINE}, ["s_big.jsonl", "line 2", "bytes"]),
    ("seeds csv huge field", seeds("s_big.csv"), {"s_big.csv": "question,answer_gold\n" + "x" * (2 * 2 ** 20) + ",3\n"},
     ["s_big.csv"]),
    ("seeds unsupported extension", seeds("s.txt"), {"s.txt": "Q1\n"}, ["s.txt", ".txt"]),
    ("seeds missing", seeds("s_nope.jsonl"), {}, ["{p}:5", "stage 'problems'", "s_nope.jsonl"]),
    ("seeds duplicate key in a row", seeds("s_dupkey.jsonl"), {"s_dupkey.jsonl": '{"question": "Q1", "question": "Q2"}\n'},
     ["s_dupkey.jsonl:1", "'question'", "twice"]),
    ("seeds column of empty objects", seeds("s_obj.jsonl"), {"s_obj.jsonl": '{"question": "Q1", "meta": {}}\n'},
     ["s_obj.jsonl", "'meta'"]),
    ("seeds integer beyond 64 bits", seeds("s_int.jsonl"), {"s_int.jsonl": '{"question": "Q1", "n": 1' + "0" * 25 + "}\n"},
     ["s_int.jsonl"]),
    ("seeds mixed column types", seeds("s_mixed.jsonl"), {"s_mixed.jsonl": '{"question": "Q1"}\n{"question": {"a": 1}}\n'},
     ["s_mixed.jsonl", "types"]),
    ("seeds duplicate ids", seeds("s_ids.jsonl"), {"s_ids.jsonl": '{"id": 1, "question": "Q1"}\n{"id": 1, "question": "Q2"}\n'},
     ["s_ids.jsonl", "share id"]),
    ("seeds csv ragged", seeds("s_ragged.csv"), {"s_ragged.csv": "question,answer_gold\nQ1,3,extra\n"}, ["s_ragged.csv:2"]),
    ("seeds csv header twice", seeds("s_hdr.csv"), {"s_hdr.csv": "question,question\nQ1,Q2\n"}, ["s_hdr.csv", "'question'"]),
    ("seeds .json not a list", seeds("s_obj.json"), {"s_obj.json": '{"question": "Q1"}'}, ["s_obj.json", "list"]),
    ("seeds .json not UTF-8", seeds("s_latin.json"), {"s_latin.json": b'[{"question": "caf\xe9"}]'}, ["s_latin.json:1", "UTF-8"]),
    ("seeds not parquet", seeds("s_fake.parquet"), {"s_fake.parquet": "question\nQ1\n"}, ["s_fake.parquet", "Parquet"]),
    ("seeds a plain directory", seeds("s_dir"), {"s_dir/readme.txt": "x"}, ["s_dir", "save_to_disk"]),
    ("seeds empty column name", seeds("s_noname.jsonl"), {"s_noname.jsonl": '{"": "Q1"}\n'}, ["s_noname.jsonl", "column name"]),
    # ---- store and exports (the store / export path checks) -------------------------------------------------
    ("store empty", R("store: out/run.duckdb", "store: ''"), {}, ["{p}:1", "'store'"]),
    ("store is a seed file", R("store: out/run.duckdb", "store: seeds.jsonl"), {}, ["{p}:1", "'store'", "seeds.jsonl"]),
    ("store named synth.duckdb", R("store: out/run.duckdb", "store: out/synth.duckdb"), {}, ["{p}:1", "'store'", "synth"]),
    ("export onto a seed file", R("path: out/sft.jsonl", "path: seeds.jsonl"), {}, ["{p}", "stage 'sft'", "'path'"]),
    ("two exports to one path", R("  kept:", "  sft2: {kind: export, input: problems, format: sft, prompt: solve, "
                                  "response: answer_gold, path: out/sft.jsonl}\n  kept:"), {}, ["{p}", "'path'", "sft.jsonl"]),
]

# the store / export path checks belong to the store's own validation (synth/graph.py store_path_of and
# the export checks), made elsewhere; reported, not hidden, when they fail
LEAD_CASES = {"store empty", "store is a seed file", "store named synth.duckdb", "export onto a seed file",
              "two exports to one path"}

SUBPROCESS_CASES = ["yaml syntax", "duplicate stages key", "samples true", "samples 1e20", "temperature nan",
                    "seed 2**70", "top_p 2", "keep over a filter of other rows", "where: bad SQL",
                    "filter .py syntax error", "template nested loops", "template bad call",
                    "seeds jsonl not UTF-8", "seeds huge line", "seeds broken JSON line", "empty file",
                    "stages is empty"]


def test_the_table_is_large_and_its_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 80
    assert set(SUBPROCESS_CASES) <= set(ids) and LEAD_CASES <= set(ids)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace after a valid run: its store, an export and the export's sidecar."""
    root = tmp_path_factory.mktemp("bad_input_table")
    (root / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEEDS))
    (root / "prompts").mkdir()
    (root / "prompts" / "solve.yaml").write_text(SOLVE)
    (root / "previous.yaml").write_text(PREVIOUS)
    synth("run", root / "previous.yaml", check=True)
    assert (root / "out" / "run.duckdb").is_file() and (root / "out" / "sft.jsonl").is_file()
    assert (root / "out" / "sft.jsonl.synth.json").is_file()
    shutil.copytree(root, root.with_name(root.name + "_pristine"))
    return root


def restore(ws: Path) -> None:
    """Put the workspace back as the previous run left it (after a case that wrote: it failed, and must
    not spoil the cases after it)."""
    shutil.rmtree(ws)
    shutil.copytree(ws.with_name(ws.name + "_pristine"), ws)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the workspace (bytecode caches aside) and the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def prepare(ws: Path, case: tuple) -> tuple[Path, list[str]]:
    name, edit, files, must = case
    slug = "".join(c if c.isalnum() else "_" for c in name)
    for rel, content in files.items():
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    pipeline = ws / f"case_{slug}.yaml"
    text = edit(VALID)
    if name == "pipeline not UTF-8":
        pipeline.write_bytes(text.encode() + b"# caf\xe9\n")
    else:
        pipeline.write_text(text)
    return pipeline, [m.replace("{p}", pipeline.name) for m in must]


def check_line(code: int, stderr: str, must: list[str]) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stderr[-3000:])
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("synth: error: "), lines[0]
    for part in must:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


def run_in_process(*args: str) -> tuple[int, str]:
    from synth.cli import main

    result = CliRunner().invoke(main, ["run", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        return 1, "".join(traceback.format_exception(result.exception)) + result.stderr
    return result.exit_code, result.stderr


def _params(cases):
    return [pytest.param(c, id=c[0]) for c in cases]


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_in_process(ws, case):
    pipeline, must = prepare(ws, case)
    before = snapshot(ws)
    code, stderr = run_in_process(pipeline)
    after = snapshot(ws)
    if after != before:
        restore(ws)
    check_line(code, stderr, must)
    assert after == before, {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


@pytest.mark.parametrize("case", _params([c for c in CASES if c[0] in SUBPROCESS_CASES]))
def test_bad_input_through_the_real_cli(ws, case):
    pipeline, must = prepare(ws, case)
    before = snapshot(ws)
    proc = synth("run", pipeline, timeout=120)
    after = snapshot(ws)
    if after != before:
        restore(ws)
    check_line(proc.returncode, proc.stderr, must)
    assert after == before


def test_the_pipeline_file_itself(ws):
    """Not UTF-8, a directory, a missing file: one line each, nothing written."""
    before = snapshot(ws)
    latin = ws / "latin.yaml"
    latin.write_bytes(VALID.encode() + b"# caf\xe9\n")
    folder = ws / "a_folder.yaml"
    folder.mkdir(exist_ok=True)
    before = snapshot(ws)
    for path, must in ((latin, ["latin.yaml:16", "UTF-8"]), (folder, ["a_folder.yaml", "directory"]),
                       (ws / "nope.yaml", ["nope.yaml", "no such pipeline file"])):
        code, stderr = run_in_process(path)
        check_line(code, stderr, must)
    assert snapshot(ws) == before


def test_the_valid_pipeline_is_valid(ws):
    """The base of every case loads and passes the pre-run checks: each case's error is its own edit."""
    from rich.console import Console

    from synth.pipeline import load_pipeline
    from synth.pipeline import preflight

    pipeline = ws / "valid.yaml"
    pipeline.write_text(VALID)
    loaded = load_pipeline(pipeline)
    preflight(loaded, loaded.order, Console(stderr=True))


def test_identical_seed_rows_are_counted_not_silent(workspace):
    """Three identical seed lines are one row: a warning line says how many collapsed (not an error)."""
    (workspace / "same.jsonl").write_text('{"question": "Q1", "answer_gold": "3"}\n' * 3 +
                                          '{"question": "Q2", "answer_gold": "5"}\n')
    pipeline = workspace / "p.yaml"
    pipeline.write_text("store: out/run.duckdb\nstages:\n  problems: {kind: load, path: same.jsonl}\n")
    proc = synth("run", pipeline)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "same.jsonl" in warnings[0] and "2 rows" in warnings[0], proc.stderr
