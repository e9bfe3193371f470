"""`synth new DIR --seeds FILE`: a starter workspace for a task of your own.

It writes, into DIR (refusing to overwrite a file unless `force`):
- pipeline.yaml — seed rows → teacher samples → verify against the reference column (or, without
  one, a self-consistency vote) → keep → SFT export → a student trained on it; with `heldout`, an
  evaluate stage of teacher and student; with `gold` (rows with full solutions), the teacher is first
  trained by synth from a starting model on them (as the demo's is), else it is a declared teacher;
- prompts/task.yaml — the question column as the user turn, answers in \\boxed{} (the boxed parser);
- recipes/student.yaml (recipes/teacher.yaml with `gold`) — TRL SFTConfig fields: from-scratch
  settings for a random-init model (`synth models`), fine-tuning settings (LoRA) for a pretrained one;
- models.yaml — for `synth models DIR/models.yaml`: random-init starting models with a tokenizer
  trained on the seed files, when the student (or the gold-trained teacher) is one of them.

Column names are read from the seed file's rows (`question`, `answer` guessed from common names, or
given); the verify method is `numeric` when every reference is a number, else `exact`. Every path in the
files is relative to DIR. The files are a start, commented, meant to be edited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from synth.errors import SynthError
from synth.seeds import read_rows
from synth.stages.generate import GENERATION_COLUMNS, input_alias
from synth.tiny import SPEC_FILE
from synth.verify import parse_number

QUESTION_COLUMNS = ("question", "prompt", "input", "instruction", "problem", "text")
ANSWER_COLUMNS = ("answer", "gold", "reference", "label", "target", "output")
BACKENDS = ("hf", "vllm", "openai", "echo")


@dataclass(frozen=True)
class Teacher:
    backend: str
    model: str | None

    @staticmethod
    def parse(spec: str) -> "Teacher":
        """`hf:PATH`, `vllm:PATH`, `openai:MODEL`, or `echo`."""
        backend, _, model = spec.partition(":")
        if backend not in BACKENDS or (backend != "echo" and not model):
            raise SynthError(f"--teacher {spec}: expected hf:PATH, vllm:PATH, openai:MODEL or echo")
        return Teacher(backend, model or None)


def new_workspace(target: Path, seeds: Path, *, heldout: Path | None = None, question: str | None = None,
                  answer: str | None = None, teacher: str | None = None, student: str | None = None,
                  gold: Path | None = None, solution: str = "solution", force: bool = False) -> list[Path]:
    """Write the starter files (module docstring) and return them."""
    target = Path(target).resolve()
    seeds = _existing(seeds, "--seeds")
    heldout = _existing(heldout, "--heldout") if heldout else None
    gold = _existing(gold, "--gold") if gold else None
    rows = read_rows(seeds)
    if not rows:
        raise SynthError(f"{seeds}: no rows; the teacher needs seed rows to answer")
    columns = list(rows[0])
    question = _column(seeds, columns, question, QUESTION_COLUMNS, "--question", required=True)
    answer = _column(seeds, columns, answer, ANSWER_COLUMNS, "--answer", required=False)
    if gold is not None:
        gold_columns = list(read_rows(gold)[0])
        for col in (question, solution):
            if col not in gold_columns:
                raise SynthError(f"{gold}: --gold rows need the columns {question!r} and {solution!r} (the question "
                                 f"and its full solution, ending in \\boxed{{answer}}); they have: {', '.join(gold_columns)}")
    method = "numeric" if answer and all(parse_number(str(r.get(answer))) is not None for r in rows) else "exact"

    rel = lambda p: os.path.relpath(p, target)  # noqa: E731 - every path in the files is relative to DIR
    default_models = {}
    if student is None:
        student = "models/student-init"
        default_models["student-init"] = {"hidden": 64, "layers": 2, "heads": 4}
    t = Teacher.parse(teacher) if teacher else None
    if gold is not None:
        if t is None:
            t = Teacher("hf", "models/teacher-init")
            default_models["teacher-init"] = {"hidden": 128, "layers": 2, "heads": 4}
        elif t.backend != "hf":
            raise SynthError(f"--teacher {teacher}: with --gold the teacher is trained by synth from a local model: "
                             "give hf:PATH (e.g. a model `synth models` built), or leave --teacher out")
    elif t is None:
        t = Teacher("openai", "gpt-4o-mini")

    files = {
        "pipeline.yaml": _pipeline(seeds=rel(seeds), heldout=rel(heldout) if heldout else None,
                                   gold=rel(gold) if gold else None, solution=solution, answer=answer, method=method,
                                   teacher=t, student=student),
        "prompts/task.yaml": _template(question, system=gold is None),
        "recipes/student.yaml": _recipe(from_scratch=student in [f"models/{n}" for n in default_models]
                                        or _is_random_init(target, student)),
    }
    if gold is not None:
        files["recipes/teacher.yaml"] = _recipe(from_scratch=True, teacher=True)
    if default_models:
        files["models.yaml"] = _models_spec([rel(p) for p in (seeds, gold, heldout) if p], default_models)
    existing = [name for name in files if (target / name).exists()]
    if existing and not force:
        raise SynthError(f"{target}: {', '.join(existing)} already there; pick another directory or pass --force "
                         "to overwrite them")
    written = []
    for name, text in files.items():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


def _existing(path: Path, option: str) -> Path:
    path = Path(path).resolve()
    if not path.exists():
        raise SynthError(f"{option} {path}: no such file")
    return path


def _column(path: Path, columns: list[str], given: str | None, guesses: tuple[str, ...], option: str,
            required: bool) -> str | None:
    if given is not None:
        if given not in columns:
            raise SynthError(f"{path}: {option} {given}: no such column (columns: {', '.join(columns)})")
        return given
    found = next((c for c in guesses if c in columns), None)
    if found is None and required:
        raise SynthError(f"{path}: which column is the question? Pass {option} COLUMN (columns: {', '.join(columns)})")
    return found


def _is_random_init(target: Path, student: str) -> bool:
    """A student built by `synth models` (its marker file) trains from scratch; anything else is fine-tuned."""
    path = Path(student) if Path(student).is_absolute() else target / student
    return (path / SPEC_FILE).is_file()


def _flow(mapping: dict) -> str:
    return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=10_000).strip()


def _pipeline(*, seeds: str, heldout: str | None, gold: str | None, solution: str, answer: str | None,
              method: str, teacher: Teacher, student: str) -> str:
    lines = ["# Written by `synth new`. Edit freely: `synth plan pipeline.yaml` shows what would run, `synth run",
             "# pipeline.yaml` runs what is stale, `synth report pipeline.yaml` compares the models.",
             "store: out/run.duckdb"]
    stages: list[tuple[str, dict, str]] = []
    if gold is None:
        config = {"backend": teacher.backend, **({"model": teacher.model} if teacher.model else {})}
        note = {"openai": "  # OPENAI_API_KEY; base_url: for another OpenAI-compatible server",
                "hf": "  # transformers in this process", "vllm": "  # vLLM offline", "echo": "  # no model: a dry run"}
        lines += ["teachers:", f"  teacher: {_flow(config)}{note[teacher.backend]}"]
    else:
        stages += [
            ("gold", {"kind": "load", "path": gold}, "rows with full solutions: the teacher's training data"),
            ("gold_sft", {"kind": "export", "input": "gold", "prompt": "task", "response": solution,
                          "path": "out/gold_sft.parquet"}, "a dataset's own answers as SFT data"),
            ("teacher", {"kind": "train", "method": "sft", "data": "gold_sft", "student": teacher.model,
                         "recipe": "recipes/teacher.yaml"}, "synth trains the teacher; its model is a teacher by this name")]
    stages += [
        ("problems", {"kind": "load", "path": seeds}, "the seed rows the teacher answers"),
        ("samples", {"kind": "generate", "input": "problems", "teacher": "teacher", "prompt": "task", "samples": 4,
                     "params": {"temperature": 0.7, "max_tokens": 256, "seed": 0}},
         "4 samples per row; answers parsed from \\boxed{}")]
    if answer:  # the seed row's column, as the samples' rows name it (input_answer where the parser took 'answer')
        reference = input_alias(answer, GENERATION_COLUMNS + ["answer"])
        stages.append(("correct", {"kind": "verify", "input": "samples", "method": method, "answer": "answer",
                                   "reference": reference}, f"the parsed answer against the seed row's {answer!r}"))
    else:
        stages.append(("correct", {"kind": "vote", "input": "samples", "method": method, "min_agreement": 0.5},
                       "no reference column: keep answers at least half the samples agree on"))
    stages += [
        ("kept", {"kind": "keep", "input": "samples", "pass": ["correct"]}, "what passed; nothing is deleted"),
        ("sft_data", {"kind": "export", "input": "kept", "format": "sft", "path": "out/sft.parquet"},
         "TRL's conversational SFT format"),
        ("student", {"kind": "train", "method": "sft", "data": "sft_data", "student": student,
                     "recipe": "recipes/student.yaml"}, "seeds: [0, 1, 2] trains it under three seeds")]
    if heldout:
        verify = {"answer": "answer", "reference": answer or "answer", "method": method}
        stages += [("heldout", {"kind": "load", "path": heldout}, "rows nobody trains on"),
                   ("eval", {"kind": "evaluate", "input": "heldout", "models": ["teacher", "student"], "prompt": "task",
                             "verify": verify}, "greedy; `synth report` compares them")]
    lines.append("stages:")
    for name, config, note in stages:
        lines.append(f"  {name}: {_flow(config)}  # {note}")
    return "\n".join(lines) + "\n"


def _template(question: str, system: bool) -> str:
    head = ("# The task's prompt (Jinja2): the seed row's columns are variables. The answer goes in \\boxed{}: the\n"
            "# boxed parser puts it in the `answer` column, which the verify stage checks.\n")
    body = {}
    if system:
        body["system"] = "Think step by step, then give the final answer as \\boxed{ANSWER}."
    body["user"] = "{{ " + question + " }}"
    body["parse"] = "boxed"
    return head + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=10_000)


def _recipe(from_scratch: bool, teacher: bool = False) -> str:
    if from_scratch:
        return ("# TRL SFTConfig fields (TRL's docs are the reference), plus synth's max_truncated_share. From\n"
                "# random weights: many steps at a high learning rate. Watch `synth sql pipeline.yaml \"select step,\n"
                f"# loss from {'teacher' if teacher else 'student'}\"` while it trains.\n"
                f"max_steps: {1000 if teacher else 700}\nlearning_rate: {'3.0e-3' if teacher else '2.0e-3'}\n"
                "lr_scheduler_type: cosine\nwarmup_steps: 30\nweight_decay: 0.0\nper_device_train_batch_size: 16\n"
                "max_length: 256\nassistant_only_loss: true\nlogging_steps: 50\nseed: 0\n"
                "max_truncated_share: 0.02\n")
    return ("# TRL SFTConfig fields (TRL's docs are the reference), plus synth's keys. A pretrained student:\n"
            "# a low learning rate, LoRA (merged on save), a couple of epochs.\n"
            "num_train_epochs: 2\nlearning_rate: 1.0e-4\nlr_scheduler_type: cosine\nwarmup_steps: 10\n"
            "per_device_train_batch_size: 8\nmax_length: 1024\nassistant_only_loss: true\nlogging_steps: 10\n"
            "seed: 0\nlora: {r: 16, alpha: 32, dropout: 0.05}\n")


def _models_spec(texts: list[str], models: dict) -> str:
    return ("# `synth models models.yaml`: random-init starting models with a tokenizer trained on your files.\n"
            "# Rebuilt only when this file or the text changes; a rebuilt model retrains what starts from it.\n"
            + yaml.safe_dump({"text": texts, "out": "models", "vocab_size": 800, "split_digits": False,
                              "max_positions": 512, "seed": 0}, sort_keys=False)
            + "models:\n" + "".join(f"  {n}: {_flow(m)}\n" for n, m in models.items()))
