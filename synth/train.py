"""The train stage: fine-tune a student on exported data with TRL (SFT, then DPO).

A recipe is a YAML file of TRL's own config fields (`SFTConfig` / `DPOConfig` names, unchanged, so
TRL's documentation is the reference), plus two synth-only keys:

    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}   # LoRA via peft, merged on save
    max_truncated_share: 0.05   # refuse to train when more rows than this would be cut at max_length

    from synth.train import load_recipe, train
    result = train("sft", Path("data/sft.parquet"), "models/student", load_recipe(Path("train/sft-tiny.yaml"), "sft"),
                   Path("runs/sft"))      # -> runs/sft/model loads with AutoModelForCausalLM

Data: SFT rows carry `messages` (a list of {role, content}); DPO rows carry `prompt`, `chosen`,
`rejected`, either conversational (lists of messages) or plain strings. The file is .parquet or .jsonl.
torch, transformers, trl and peft are imported inside the functions that need them (seconds of start-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import math
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from synth.errors import SynthError

METHODS = ("sft", "dpo")
DEFAULT_MAX_TRUNCATED_SHARE = 0.05
LORA_KEYS = {"r": int, "alpha": float, "dropout": float, "target_modules": (str, list)}
SYNTH_KEYS = ("lora", "max_truncated_share")
# Fields synth sets itself: the recipe describes how to train, not where the files go.
OWNED_KEYS = {"output_dir": "synth writes checkpoints to OUT/checkpoints and the model to OUT/model"}


# --------------------------------------------------------------------------------------------------
# Recipes

def _config_class(method: str):
    if method == "sft":
        from trl import SFTConfig
        return SFTConfig
    if method == "dpo":
        from trl import DPOConfig
        return DPOConfig
    raise SynthError(f"unknown training method {method!r}; expected one of: {', '.join(METHODS)}")


def load_recipe(path: Path, method: str) -> dict:
    """Read and validate a recipe: every key must be a field of TRL's config for `method` (or a synth
    key), with a value of the field's type. Returns the recipe as a dict (numbers normalised)."""
    path = Path(path)
    cls = _config_class(method)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SynthError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SynthError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SynthError(f"{path}: a recipe must be a mapping of {cls.__name__} fields, got {type(data).__name__}")

    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    recipe: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in OWNED_KEYS:
            raise SynthError(f"{path}: key {key!r} cannot be set in a recipe: {OWNED_KEYS[key]}")
        if key == "lora":
            recipe[key] = _check_lora(path, value)
        elif key == "max_truncated_share":
            share = _coerce(value, float)
            if share is _BAD or not 0 <= share <= 1:
                raise SynthError(f"{path}: key 'max_truncated_share' must be a number between 0 and 1, got {value!r}")
            recipe[key] = share
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields | set(SYNTH_KEYS)), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                f"; a recipe takes {cls.__name__} fields (see TRL's docs) plus {', '.join(SYNTH_KEYS)}"
            raise SynthError(f"{path}: unknown key {key!r} for a {method} recipe{hint}")
        else:
            coerced = _coerce(value, hints.get(key, Any))
            if coerced is _BAD:
                raise SynthError(f"{path}: key {key!r} must be {_type_name(hints.get(key, Any))}, got {value!r}")
            recipe[key] = coerced
    # Values TRL itself rejects (an unknown scheduler, loss_weights of the wrong length, ...).
    try:
        build_config(method, recipe, Path("/nonexistent/synth-recipe-check"))
    except SynthError:
        raise
    except (ValueError, TypeError) as exc:
        raise SynthError(f"{path}: {cls.__name__} rejects the recipe: {_one_line(exc)}") from None
    return recipe


def _check_lora(path: Path, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SynthError(f"{path}: key 'lora' must be a mapping with keys {', '.join(LORA_KEYS)}, got {value!r}")
    out = {}
    for key, v in value.items():
        if key not in LORA_KEYS:
            close = difflib.get_close_matches(str(key), list(LORA_KEYS), n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                f"; lora takes {', '.join(LORA_KEYS)}"
            raise SynthError(f"{path}: unknown key 'lora.{key}'{hint}")
        want = LORA_KEYS[key]
        if key == "target_modules":
            ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            if not ok:
                raise SynthError(f"{path}: key 'lora.target_modules' must be a module name pattern or a list of names "
                                 f"(e.g. all-linear or [q_proj, v_proj]), got {v!r}")
            out[key] = v
            continue
        coerced = _coerce(v, want)
        ok = coerced is not _BAD and (0 <= coerced < 1 if key == "dropout" else coerced > 0)
        if not ok:
            rule = "a number in [0, 1)" if key == "dropout" else ("a positive integer" if want is int else "a positive number")
            raise SynthError(f"{path}: key 'lora.{key}' must be {rule}, got {v!r}")
        out[key] = coerced
    return out


_BAD = object()


def _coerce(value: Any, tp: Any) -> Any:
    """`value` checked against the type annotation `tp` (normalised: "5e-4" -> 5e-4 for a float,
    a single item -> [item] for list fields), or _BAD. Types it does not know are accepted as is."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return None if type(None) in args else _BAD
        # Exact matches first, so that 5 stays an int in `int | float` and "x" stays a str.
        for arg in sorted(args, key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1):
            if arg is type(None):
                continue
            out = _coerce(value, arg)
            if out is not _BAD:
                return out
        return _BAD
    if origin is typing.Literal:
        return value if value in typing.get_args(tp) else _BAD
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = value if isinstance(value, list) else [value]
        out = [_coerce(v, item) for v in items]
        return _BAD if any(o is _BAD for o in out) else out
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _BAD
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if tp is float:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, (int, float)):
            return value  # an int is a valid float; kept as written
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _BAD
        return _BAD
    if tp is str:
        return value if isinstance(value, str) else _BAD
    if isinstance(tp, type) and issubclass(tp, (list, tuple)):
        return value if isinstance(value, list) else _BAD
    return value  # enums, classes: TRL's own __post_init__ checks the value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def build_config(method: str, recipe: dict, out_dir: Path):
    """TRL's config from a recipe plus synth's defaults: checkpoints under out_dir, no reporting, no
    saving unless asked, quiet progress; on CPU float32 without gradient checkpointing, on GPU bf16."""
    import torch

    cls = _config_class(method)
    kwargs = {k: v for k, v in recipe.items() if k not in SYNTH_KEYS}
    kwargs["output_dir"] = str(Path(out_dir) / "checkpoints")
    kwargs.setdefault("report_to", [])
    kwargs.setdefault("save_strategy", "no")
    kwargs.setdefault("disable_tqdm", True)
    kwargs.setdefault("seed", 0)
    if torch.cuda.is_available():
        kwargs.setdefault("bf16", not kwargs.get("fp16", False))
    else:
        # TRL's configs default to bf16 and gradient checkpointing; this CPU has no native bf16 and
        # checkpointing only slows small models down. transformers >= 5.2x renamed gradient_checkpointing
        # to activation_checkpointing (the old name warns); set whichever this version has.
        names = {f.name for f in dataclasses.fields(cls)}
        checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        kwargs.pop("gradient_checkpointing", None)
        kwargs.update({"use_cpu": True, "bf16": False, "fp16": False, checkpointing: False})
    if kwargs.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        kwargs["use_liger_kernel"] = False
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Data and readiness

def load_rows(data_path: Path, method: str) -> list[dict]:
    """The training rows of a .parquet or .jsonl file, checked for the columns `method` needs."""
    data_path = Path(data_path)
    if not data_path.is_file():
        raise SynthError(f"{data_path}: no such training data file")
    if data_path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(data_path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise SynthError(f"{data_path}: cannot read Parquet: {_one_line(exc)}") from None
    elif data_path.suffix in (".jsonl", ".json"):
        rows = []
        with open(data_path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise SynthError(f"{data_path}:{n}: not valid JSON: {exc.msg}") from None
    else:
        raise SynthError(f"{data_path}: training data must be a .parquet or .jsonl file")
    if not rows:
        raise SynthError(f"{data_path}: no rows to train on")
    columns = ("messages",) if method == "sft" else ("prompt", "chosen", "rejected")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or any(row.get(c) in (None, "", []) for c in columns):
            missing = [c for c in columns if not isinstance(row, dict) or row.get(c) in (None, "", [])]
            raise SynthError(f"{data_path}: row {n} has no {', '.join(missing)}: {method} data needs columns "
                             f"{', '.join(columns)}")
    return [{c: row[c] for c in columns} for row in rows]


def _texts(rows: list[dict], method: str, tokenizer) -> list[str]:
    """Each row as the text the trainer tokenizes (DPO: two texts per row, prompt+chosen and prompt+rejected)."""
    if getattr(tokenizer, "chat_template", None) is None and any(
            isinstance(r.get("messages", r.get("prompt")), list) for r in rows[:1]):
        raise SynthError(f"the student's tokenizer ({tokenizer.name_or_path}) has no chat template, and the data "
                         "is conversational: start from an instruct model or add a chat_template.jinja")

    def chat(n, messages):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja2 errors, a message without role/content, ...
            raise SynthError(f"row {n}: the student's chat template cannot render it: {_one_line(exc)}") from None

    out = []
    for n, row in enumerate(rows, 1):
        if method == "sft":
            out.append(chat(n, row["messages"]))
            continue
        for side in ("chosen", "rejected"):
            if isinstance(row["prompt"], list):
                out.append(chat(n, list(row["prompt"]) + list(row[side])))
            else:
                out.append(str(row["prompt"]) + str(row[side]))
    return out


def _has_think(row: dict) -> bool:
    return "<think>" in (text := json.dumps(row, ensure_ascii=False)) or "</think>" in text


def readiness(data_path: Path, model_dir: str, method: str, max_length: int | None) -> dict:
    """How the data fits the student: token lengths under its tokenizer and chat template, how many
    rows max_length would truncate, and how many rows carry <think> tags."""
    from transformers import AutoTokenizer

    rows = load_rows(data_path, method)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return _readiness(rows, tokenizer, method, max_length)


def _readiness(rows: list[dict], tokenizer, method: str, max_length: int | None) -> dict:
    texts = _texts(rows, method, tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = [len(x) for x in ids]
    if method == "dpo":  # a row is as long as its longer side
        lengths = [max(a, b) for a, b in zip(lengths[::2], lengths[1::2])]
    ordered = sorted(lengths)

    def pct(p):
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    truncated = sum(1 for n in lengths if max_length is not None and n > max_length)
    return {"rows": len(rows), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1],
            "max_length": max_length, "truncated": truncated, "truncated_share": truncated / len(rows),
            "think_tags": sum(1 for r in rows if _has_think(r))}


# --------------------------------------------------------------------------------------------------
# Training

@contextlib.contextmanager
def _quiet():
    """No progress bars from transformers (weights loading/writing) or datasets (TRL's map passes)."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_on, ds_on = hf_logging.is_progress_bar_enabled(), not datasets.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hf_on:
            hf_logging.enable_progress_bar()
        if ds_on:
            datasets.enable_progress_bars()


def train(method: str, data_path: Path, model: str, recipe: dict, out_dir: Path, init: str | None = None,
          on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Train `init` (or else `model`) on `data_path` with TRL and save the result to out_dir/model.
    DPO's reference model is the starting model, frozen (TRL's default). on_log(step, logs) is called
    at every logging event."""
    cls = _config_class(method)
    start = str(init or model)
    out_dir = Path(out_dir)
    if not Path(start).exists():
        raise SynthError(f"no student model at {start}: build one (python -m synth.tiny DIR) or pass a model directory")

    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    recipe = dict(recipe)
    lora = recipe.get("lora") or None
    max_share = recipe.get("max_truncated_share", DEFAULT_MAX_TRUNCATED_SHARE)
    max_length = recipe.get("max_length", next(f.default for f in dataclasses.fields(cls) if f.name == "max_length"))

    rows = load_rows(data_path, method)
    tokenizer = AutoTokenizer.from_pretrained(start)
    ready = _readiness(rows, tokenizer, method, max_length)
    if ready["truncated_share"] > max_share:
        raise SynthError(
            f"{data_path}: {ready['truncated']} of {ready['rows']} rows ({ready['truncated_share']:.1%}) exceed "
            f"max_length {max_length} (longest {ready['max']} tokens, p99 {ready['p99']}); raise max_length in "
            f"the recipe or filter long rows (or raise max_truncated_share, now {max_share:g})")

    if recipe.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        print("synth: warning: the recipe asks for use_liger_kernel but liger_kernel is not installed; "
              "training without it (pip install liger-kernel)", file=sys.stderr)
    seed = recipe.get("seed", 0)
    transformers.set_seed(seed)
    config = build_config(method, recipe, out_dir)

    peft_config = None
    if lora is not None:
        if importlib.util.find_spec("peft") is None:
            raise SynthError("the recipe asks for LoRA but peft is not installed: pip install peft")
        from peft import LoraConfig
        r = int(lora.get("r", 16))
        peft_config = LoraConfig(r=r, lora_alpha=lora.get("alpha", 2 * r), lora_dropout=lora.get("dropout", 0.0),
                                 target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")

    log: list[dict] = []

    class _Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            entry = {"step": state.global_step, **{k: v for k, v in (logs or {}).items()}}
            log.append(entry)
            if on_log is not None:
                on_log(state.global_step, dict(logs or {}))

    dataset = Dataset.from_list(rows)
    if method == "sft":
        from trl import SFTTrainer as Trainer
    else:
        from trl import DPOTrainer as Trainer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model_dir = out_dir / "model"
    with _quiet():
        began = time.perf_counter()
        # The model goes in as a path: TRL loads it (float32 unless model_init_kwargs says otherwise)
        # and, for DPO, loads a second frozen copy as the reference model.
        try:
            trainer = Trainer(model=start, args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[_Log()], peft_config=peft_config)
        except ValueError as exc:  # a combination of settings TRL refuses (padding_free without packing, ...)
            raise SynthError(f"{Trainer.__name__} rejects the recipe: {_one_line(exc)}") from None
        # With disable_tqdm, transformers prints every log dict to stdout; on_log is the channel.
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        seconds = time.perf_counter() - began

        final = trainer.model
        if peft_config is not None:
            final = final.merge_and_unload()
        final.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)

    # TRL logs num_tokens (non-padding tokens so far) at each logging step
    tokens = next((e["num_tokens"] for e in reversed(log) if "num_tokens" in e), None)
    runtime = output.metrics.get("train_runtime") or seconds
    return {
        "model_dir": str(model_dir),
        "steps": int(output.global_step),
        "train_loss": float(output.training_loss),
        "log": log,
        "readiness": ready,
        "seconds": seconds,
        "tokens_per_s": float(tokens) / runtime if tokens else None,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
