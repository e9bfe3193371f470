"""The train stage: fine-tune a student on exported data with TRL (SFT, then DPO; KD from teacher log-probs).

A recipe is a YAML file of TRL's own config fields (`SFTConfig` / `DPOConfig` names, unchanged, so
TRL's documentation is the reference), plus two synth-only keys:

    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}   # LoRA via peft, merged on save
    max_truncated_share: 0.05   # refuse to train when more rows than this would be cut at max_length

    from synth.train import load_recipe, train
    result = train("sft", Path("data/sft.parquet"), "models/student", load_recipe(Path("train/sft-tiny.yaml"), "sft"),
                   Path("runs/sft"))      # -> runs/sft/model loads with AutoModelForCausalLM

Data: SFT rows carry `messages` (a list of {role, content}); DPO rows carry `prompt`, `chosen`,
`rejected`, either conversational (lists of messages) or plain strings. The file is .parquet or .jsonl.
An SFT recipe's `assistant_only_loss: true` works with any chat template: by TRL's {% generation %}
markers where the template has them, else on prompt-completion rows (loss_mask, below).
torch, transformers, trl and peft are imported inside the functions that need them (seconds of start-up).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import re
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from synth import kd_train, sft_train
from synth.errors import SynthError, one_line
from synth.ids import file_sha256
from synth.paths import export_sidecar

METHODS = ("sft", "dpo", "kd")
DEFAULT_MAX_TRUNCATED_SHARE = 0.05
LORA_KEYS = {"r": int, "alpha": float, "dropout": float, "target_modules": (str, list)}
SYNTH_KEYS = ("lora", "max_truncated_share", "kd")
# keys of TRL's SFTConfig that method kd does not take: it pads its batches itself (teacher targets with them)
KD_REFUSED = {"packing": "packs sequences", "padding_free": "flattens the batch",
              "assistant_only_loss": "masks by chat turns", "completion_only_loss": "masks the prompt"}
# Fields synth sets itself: the recipe describes how to train, not where the files go.
OWNED_KEYS = {"output_dir": "synth puts the checkpoints and the model under <store folder>/models/"}
# Checkpoints, unless the recipe sets save_strategy/save_steps/save_total_limit: every tenth of the run
# (transformers reads a save_steps below 1 as a share of max_steps). transformers' own default, every
# 500 steps, never fires in most distillation runs (a few hundred steps), so a killed run would lose
# everything; a tenth bounds both what a kill loses (at most 10% of the steps) and what saving costs
# (10 saves a run, whatever its length: for a 7B model each is ~15 GB of weights plus ~60 GB of Adam
# state, so saving every few steps would dominate). Two kept: the newest to resume from and one spare
# (transformers deletes the older ones only once a new save is complete, so a run killed mid-save
# still has a complete one); disk holds at most two checkpoints, and none once the run finishes.
DEFAULT_SAVE_STEPS = 0.1
DEFAULT_SAVE_TOTAL_LIMIT = 2


# --------------------------------------------------------------------------------------------------
# Recipes

def _config_class(method: str):
    if method in ("sft", "kd"):  # kd: SFTConfig plus the recipe's `kd:` keys (synth/kd_train.py)
        from trl import SFTConfig
        return SFTConfig
    if method == "dpo":
        from trl import DPOConfig
        return DPOConfig
    raise SynthError(f"unknown training method {method!r}; expected one of: {', '.join(METHODS)}")


def load_recipe(path: Path, method: str) -> dict:
    """Read and validate a recipe: every key must be a field of TRL's config for `method` (or a synth
    key), with a value of the field's type. Returns the recipe as a dict (numbers normalised).
    Imports TRL (the config class itself checks the values); check_recipe does the same without it."""
    path = Path(path)
    cls = _config_class(method)
    data, lines = _read_recipe(path, cls.__name__)
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    recipe = _check_keys(path, method, data, lines, fields, cls.__name__)
    # Values TRL itself rejects (an unknown scheduler, loss_weights of the wrong length, ...).
    try:
        build_config(method, recipe, Path("/nonexistent/synth-recipe-check"))
    except SynthError:
        raise
    except (ValueError, TypeError) as exc:
        raise SynthError(f"{path}: {cls.__name__} rejects the recipe: {_clipped_line(exc)}") from None
    return recipe


def check_recipe(path: Path, method: str, student: str | Path | None = None) -> dict:
    """Validate a recipe before anything runs, without importing torch or TRL: the file reads as a
    YAML mapping; every key is a field of TRL's config for `method` (read from TRL's source, see
    config_fields) or a synth key, with a value of the field's type (an enum field: one of its
    values); and `assistant_only_loss: true` has a chat template to tell the assistant's turns by
    (when `student` is a local model directory; with or without {% generation %} markers: see
    loss_mask). Raises SynthError with one line:
    `recipe:line: key 'k': what is wrong; what to do`. Returns the recipe (numbers normalised).
    What only TRL's __post_init__ knows (combinations of values) is checked by load_recipe at training."""
    if method not in METHODS:
        raise SynthError(f"unknown training method {method!r}; expected one of: {', '.join(METHODS)}")
    path = Path(path)
    name = CONFIG_CLASSES[method][2]
    data, lines = _read_recipe(path, name)
    fields = config_fields(method)
    recipe = _check_keys(path, method, data, lines, fields, name)
    if recipe.get("assistant_only_loss") is True and not recipe.get("chat_template_path") and student:
        problem = _template_problem(Path(student))
        if problem:
            raise SynthError(f"{_at(path, lines, 'assistant_only_loss')}: key 'assistant_only_loss': {problem}; "
                             "start from an instruct model, add a chat_template.jinja to the student, point "
                             "chat_template_path at one, or remove assistant_only_loss")
    return recipe


def _at(path: Path, lines: dict[str, int], key: str | None = None) -> str:
    line = lines.get(key) if key else None
    return f"{path}:{line}" if line else str(path)


def _read_recipe(path: Path, class_name: str) -> tuple[dict, dict[str, int]]:
    """The recipe's mapping and the line of each key (lora's keys as lora.<key>)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        what = "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        raise SynthError(f"{path}: cannot read the recipe: {what}; create it (train/sft-tiny.yaml is an example) "
                         "or fix the train stage's `recipe` path") from None
    except UnicodeDecodeError:
        raise SynthError(f"{path}: the recipe is not UTF-8 text; a recipe is a YAML file of {class_name} fields") \
            from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SynthError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or _clipped_line(exc)}; fix the "
                         "syntax (a recipe is a mapping of `key: value` lines)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SynthError(f"{path}: a recipe must be a mapping of {class_name} fields, got {type(data).__name__}")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in lines:
                raise SynthError(f"{path}:{key_node.start_mark.line + 1}: key {key!r} is set twice (also at line "
                                 f"{lines[key]}); keep one")
            lines[key] = key_node.start_mark.line + 1
            if key == "lora" and isinstance(value_node, yaml.MappingNode):
                for sub, _ in value_node.value:
                    lines[f"lora.{sub.value}"] = sub.start_mark.line + 1
    return data, lines


def _check_keys(path: Path, method: str, data: dict, lines: dict[str, int], fields: dict[str, Any] | None,
                class_name: str) -> dict:
    """Each key a synth key or a field in `fields` (name -> type; None: unknown, only synth's own keys
    are checked), with a value of its type. The recipe, values normalised."""
    recipe: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        at = _at(path, lines, key)
        if key in OWNED_KEYS:
            raise SynthError(f"{at}: key {key!r} cannot be set in a recipe: {OWNED_KEYS[key]}; remove it")
        if key == "lora":
            recipe[key] = _check_lora(path, value, lines)
        elif key == "kd":
            if method != "kd":
                raise SynthError(f"{at}: key 'kd' sets a token-level distillation loss; it needs method kd "
                                 f"(this recipe is for {method})")
            recipe[key] = kd_train.check_kd(value, at)
        elif method == "kd" and key in KD_REFUSED and value not in (False, None):
            raise SynthError(f"{at}: key {key!r} {KD_REFUSED[key]}; method kd builds its own batches (the teacher's "
                             "targets padded with them, the loss on completion tokens only): remove it")
        elif key == "max_truncated_share":
            share = _coerce(value, float)
            if share is _BAD or not 0 <= share <= 1:
                raise SynthError(f"{at}: key 'max_truncated_share' must be a number between 0 and 1, got {value!r}")
            recipe[key] = share
        elif fields is None:
            recipe[key] = value
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(set(fields) | set(SYNTH_KEYS)), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                f"; a recipe takes {class_name} fields (see TRL's docs) plus {', '.join(SYNTH_KEYS)}"
            raise SynthError(f"{at}: unknown key {key!r} for a {method} recipe{hint}")
        else:
            coerced = _coerce(value, fields[key])
            if coerced is _BAD:
                raise SynthError(f"{at}: key {key!r} must be {_type_name(fields[key])}, got {value!r}")
            recipe[key] = coerced
    return recipe


def _check_lora(path: Path, value: Any, lines: dict[str, int] | None = None) -> dict:
    lines = lines or {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SynthError(f"{_at(path, lines, 'lora')}: key 'lora' must be a mapping with keys "
                         f"{', '.join(LORA_KEYS)}, got {value!r}")
    out = {}
    for key, v in value.items():
        at = _at(path, lines, f"lora.{key}")
        if key not in LORA_KEYS:
            close = difflib.get_close_matches(str(key), list(LORA_KEYS), n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                f"; lora takes {', '.join(LORA_KEYS)}"
            raise SynthError(f"{at}: unknown key 'lora.{key}'{hint}")
        want = LORA_KEYS[key]
        if key == "target_modules":
            ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            if not ok:
                raise SynthError(f"{at}: key 'lora.target_modules' must be a module name pattern or a list of names "
                                 f"(e.g. all-linear or [q_proj, v_proj]), got {v!r}")
            out[key] = v
            continue
        coerced = _coerce(v, want)
        ok = coerced is not _BAD and (0 <= coerced < 1 if key == "dropout" else coerced > 0)
        if not ok:
            rule = "a number in [0, 1)" if key == "dropout" else ("a positive integer" if want is int else "a positive number")
            raise SynthError(f"{at}: key 'lora.{key}' must be {rule}, got {v!r}")
        out[key] = coerced
    return out


GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # TRL's has_generation_markers


def _chat_template(model_dir: Path) -> str | None:
    """The chat template a local model directory ships (chat_template.jinja, or tokenizer_config.json's
    chat_template: a string, or named variants whose `default` is the one used)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8", errors="replace")
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            template = json.loads((model_dir / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def _template_problem(model_dir: Path) -> str | None:
    """Why assistant_only_loss cannot work with this student, or None (fine, or not knowable here: a hub
    id, a directory without tokenizer files). Any chat template will do: with {% generation %} markers
    (or one TRL ships a training version of) TRL masks by them, without them synth trains on
    prompt-completion rows (loss_mask); only a student without a chat template has no turns to mask by."""
    if not model_dir.is_dir() or not (model_dir / "tokenizer_config.json").is_file():
        return None
    if _chat_template(model_dir) is None:
        return f"the student ({model_dir}) has no chat template, so no turn can be told apart as the assistant's"
    return None


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
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
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


def _clipped_line(exc: BaseException) -> str:
    text = one_line(exc)
    return text if len(text) <= 300 else text[:297] + "..."


# Keys TRL's config for a method has but its trainer does not honour: TRL 1.16's DPOTrainer warns about
# padding_free and trains padded (dpo_trainer.py: "temporarily unavailable after a refactor"). A recipe
# asking for them is refused (unsupported_key) rather than trained otherwise than it says.
UNSUPPORTED = {"dpo": {"padding_free": "TRL's DPOTrainer (1.16) ignores it and pads (it is disabled there until a "
                                      "later TRL)"}}


def unsupported_key(method: str, recipe: dict) -> str | None:
    """The first key of `recipe` that TRL's trainer for `method` would silently not honour, as
    "key 'k': why; remove it", or None."""
    for key, why in UNSUPPORTED.get(method, {}).items():
        if recipe.get(key) not in (None, False):
            return f"key {key!r}: {why}; remove it (a {method} recipe cannot use it)"
    return None


def load_dtype(recipe: dict, cuda: bool) -> str | None:
    """The dtype the student's weights are loaded in (TRL's model_init_kwargs dtype), when synth chooses it:
    "bfloat16" on a CUDA GPU when the recipe does not say otherwise, so that the weights are bf16 and
    the optimizer and activations follow (TRL would load float32 and run bf16 only under autocast: twice
    the weight and optimizer memory, and method kd's loss, computed outside autocast, in float32). None
    (TRL's float32) on CPU (no native bf16 here), when the recipe sets model_init_kwargs' dtype itself,
    asks for fp16 (mixed precision needs float32 master weights: the grad scaler refuses fp16 gradients)
    or turns bf16 off (it asks for float32)."""
    init = _init_kwargs(recipe)
    if not cuda or "dtype" in init or "torch_dtype" in init:
        return None
    if recipe.get("fp16") or recipe.get("bf16") is False:
        return None
    return "bfloat16"


def _init_kwargs(recipe: dict) -> dict:
    """The recipe's model_init_kwargs as a dict (TRL takes a mapping or its JSON text)."""
    init = recipe.get("model_init_kwargs")
    if isinstance(init, str):
        with contextlib.suppress(ValueError):
            init = json.loads(init)
    return dict(init) if isinstance(init, dict) else {}


def build_config(method: str, recipe: dict, out_dir: Path, checkpoint_dir: Path | None = None):
    """TRL's config from a recipe plus synth's defaults: checkpoints under checkpoint_dir (default
    out_dir/checkpoints) every DEFAULT_SAVE_STEPS of the run, at most DEFAULT_SAVE_TOTAL_LIMIT kept,
    no reporting, quiet progress; on CPU float32 without gradient checkpointing, on GPU bf16 (the
    weights loaded in bf16: load_dtype). A key the method's trainer would ignore: SynthError (unsupported_key)."""
    import torch

    cls = _config_class(method)
    problem = unsupported_key(method, recipe)
    if problem:
        raise SynthError(f"the {method} recipe: {problem}")
    kwargs = {k: v for k, v in recipe.items() if k not in SYNTH_KEYS}
    kwargs["output_dir"] = str(checkpoint_dir or Path(out_dir) / "checkpoints")
    kwargs.setdefault("report_to", [])
    kwargs.setdefault("save_strategy", "steps")
    if kwargs["save_strategy"] == "steps" and "save_steps" not in kwargs:
        max_steps = kwargs.get("max_steps", -1)
        # as a step count when the run's length is known: a resumed run then matches its checkpoint's
        # trainer_state (transformers warns when save_steps differ, and it stores the count, not the share)
        kwargs["save_steps"] = max(1, math.ceil(max_steps * DEFAULT_SAVE_STEPS)) if max_steps > 0 else DEFAULT_SAVE_STEPS
    kwargs.setdefault("save_total_limit", DEFAULT_SAVE_TOTAL_LIMIT)
    kwargs.setdefault("disable_tqdm", True)
    kwargs.setdefault("seed", 0)
    if method == "kd":  # the examples arrive tokenised with their teacher targets (synth/kd_train.py)
        kwargs["dataset_kwargs"] = {**(kwargs.get("dataset_kwargs") or {}), "skip_prepare_dataset": True}
        kwargs["remove_unused_columns"] = False
    if torch.cuda.is_available():
        kwargs.setdefault("bf16", not kwargs.get("fp16", False))
        dtype = load_dtype(recipe, cuda=True)
        if dtype:
            kwargs["model_init_kwargs"] = {**_init_kwargs(recipe), "dtype": dtype}
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
# Recipe fields without importing TRL: TRL's config classes read from their source with `ast`
#
# Importing trl (and with it torch) takes ~10 s, too long for `synth plan`/`status`, which check a
# pipeline completely before anything runs. The fields of SFTConfig/DPOConfig and of the
# transformers.TrainingArguments they extend are read from the installed packages' source instead
# (~0.1 s): each dataclass field's name and annotation, following the base classes through imports.
# When the source is not laid out as expected, the check falls back to what needs no fields; the
# real classes check the recipe again (load_recipe) before training.

CONFIG_CLASSES = {"sft": ("trl", "trainer/sft_config.py", "SFTConfig"),
                  "dpo": ("trl", "trainer/dpo_config.py", "DPOConfig"),
                  "kd": ("trl", "trainer/sft_config.py", "SFTConfig")}


class _Source:
    """The module files of installed packages, parsed once, found without importing the packages."""

    def __init__(self) -> None:
        self.trees: dict[Path, ast.Module | None] = {}

    def tree(self, path: Path) -> ast.Module | None:
        if path not in self.trees:
            try:
                self.trees[path] = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, ValueError):
                self.trees[path] = None
        return self.trees[path]

    @staticmethod
    def package_dir(name: str) -> Path | None:
        spec = importlib.util.find_spec(name)  # a top-level name: finds the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec else []
        return Path(locations[0]) if locations else None

    def module_file(self, module: str, level: int, here: Path) -> Path | None:
        """The file of `from <.. module> import ...` written in file `here`."""
        if level:
            base = here.parent
            for _ in range(level - 1):
                base = base.parent
            parts = module.split(".") if module else []
        else:
            top, *parts = module.split(".")
            base = self.package_dir(top)
            if base is None:
                return None
        target = base.joinpath(*parts) if parts else base
        for candidate in (target.with_suffix(".py") if parts else None, target / "__init__.py"):
            if candidate is not None and candidate.is_file():
                return candidate
        return None

    def find_class(self, name: str, path: Path, depth: int = 0) -> tuple[ast.ClassDef, Path] | None:
        """Class `name` as defined in `path`, or where `path` imports it from."""
        tree = self.tree(path)
        if tree is None or depth > 4:
            return None
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node, path
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = self.module_file(node.module or "", node.level, path)
                        found = source and self.find_class(alias.name, source, depth + 1)
                        if found:
                            return found
        return None


_PLAIN_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "Dict": dict, "list": list,
                "List": list, "tuple": list, "Tuple": list, "Any": Any, "object": Any}


class _Annotations:
    """A field's annotation (ast) -> a typing object _coerce understands. Classes it cannot read are
    Any, so that nothing it does not know is refused. An enum of transformers' (SchedulerType, ...)
    becomes a Literal of its values: `SchedulerType | str` takes only those strings (__post_init__
    converts the string with SchedulerType(value), which refuses any other)."""

    def __init__(self, source: _Source, path: Path) -> None:
        self.source, self.path = source, path
        self.enums: list = []  # the Literals made from enums

    def enum_values(self, name: str) -> tuple | None:
        found = self.source.find_class(name, self.path)
        if not found:
            return None
        node, _ = found
        bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
        if not bases & {"Enum", "ExplicitEnum", "StrEnum"}:
            return None
        values = tuple(s.value.value for s in node.body if isinstance(s, ast.Assign)
                       and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str))
        return values or None

    def type_of(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            if node.value is None:
                return type(None)
            if isinstance(node.value, str):  # a forward reference
                try:
                    return self.type_of(ast.parse(node.value, mode="eval").body)
                except SyntaxError:
                    return Any
            return Any
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in _PLAIN_TYPES:
                return _PLAIN_TYPES[name]
            values = self.enum_values(name)
            if not values:
                return Any
            self.enums.append(typing.Literal[values])
            return self.enums[-1]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.union([self.type_of(node.left), self.type_of(node.right)])
        if isinstance(node, ast.Subscript):
            head = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", "")
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if head == "Literal":
                values = tuple(a.value for a in args if isinstance(a, ast.Constant))
                return typing.Literal[values] if len(values) == len(args) else Any
            if head == "Optional":
                return self.union([self.type_of(args[0]), type(None)])
            if head == "Union":
                return self.union([self.type_of(a) for a in args])
            if head in ("list", "List", "tuple", "Tuple"):
                return list[self.type_of(args[0])] if head in ("list", "List") else list
            if head in ("dict", "Dict"):
                return dict
            return Any
        return Any

    def union(self, members: list) -> Any:
        flat = []
        for m in members:
            flat += typing.get_args(m) if typing.get_origin(m) in (typing.Union, types.UnionType) else [m]
        if any(m in self.enums for m in flat):
            flat = [m for m in flat if m is not str]  # Enum | str: one of the enum's values
        if Any in flat:
            return Any
        unique = list(dict.fromkeys(flat))
        return unique[0] if len(unique) == 1 else typing.Union[tuple(unique)]


@functools.lru_cache(maxsize=None)
def _config_chain(method: str) -> tuple[_Source, list[tuple[ast.ClassDef, Path]]] | None:
    """TRL's config class for `method` and its bases down to TrainingArguments (class node, its file), read
    from the installed source; None when TRL is not installed or laid out otherwise."""
    if method not in CONFIG_CLASSES:
        return None
    package, relative, name = CONFIG_CLASSES[method]
    source = _Source()
    root = source.package_dir(package)
    if root is None or not (root / relative).is_file():
        return None
    found = source.find_class(name, root / relative)
    chain: list[tuple[ast.ClassDef, Path]] = []
    while found:
        chain.append(found)
        node, path = found
        bases = [b for b in node.bases if isinstance(b, ast.Name)]
        found = source.find_class(bases[0].id, path) if bases else None
        if len(chain) > 8:
            return None
    if not chain or chain[-1][0].name != "TrainingArguments":
        return None  # a layout this reader does not know
    return source, chain


def config_default(method: str, name: str) -> Any:
    """The default of field `name` of TRL's config for `method` when it is a literal (`x: int = 1024` or
    `field(default=1024)`), read from the source like config_fields; None when not known."""
    found = _config_chain(method)
    for node, _ in found[1] if found else []:  # the subclass first: its default wins
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                value = stmt.value
                if isinstance(value, ast.Call):
                    value = next((k.value for k in value.keywords if k.arg == "default"), None)
                try:
                    return ast.literal_eval(value) if value is not None else None
                except ValueError:
                    return None
    return None


@functools.lru_cache(maxsize=None)
def config_fields(method: str) -> dict[str, Any] | None:
    """The init fields of TRL's config class for `method` with their types, read from the installed
    source without importing it; None when TRL is not installed or its source cannot be read."""
    found = _config_chain(method)
    if found is None:
        return None
    source, chain = found
    fields: dict[str, Any] = {}
    for node, path in reversed(chain):  # base first: a subclass's field replaces its base's
        annotations = _Annotations(source, path)
        for stmt in node.body:
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            if "ClassVar" in ast.dump(stmt.annotation):
                continue
            value = stmt.value
            init = not (isinstance(value, ast.Call) and any(
                k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in value.keywords))
            if init:
                fields[stmt.target.id] = annotations.type_of(stmt.annotation)
            else:
                fields.pop(stmt.target.id, None)
    return fields or None


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
            table = pq.read_table(data_path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise SynthError(f"{data_path}: cannot read Parquet: {_clipped_line(exc)}") from None
        if table.num_rows == 0:
            raise SynthError(f"{data_path}: no rows to train on")
        if method == "kd":  # the teacher's arrays as numpy views, not millions of Python numbers
            return kd_train.read_parquet(data_path, table)
        rows = table.to_pylist()
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
    columns = {"sft": ("messages",), "dpo": ("prompt", "chosen", "rejected"),
               "kd": ("prompt", "completion_ids", "teacher_ids", "teacher_logprobs")}[method]
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
            raise SynthError(f"row {n}: the student's chat template cannot render it: {_clipped_line(exc)}") from None

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


DEFAULT_THINK_TAGS = ("<think>", "</think>")


def export_think_tags(data_path: Path) -> tuple[str, str]:
    """The think tags an export put its traces in (its sidecar's `think_tags`), else <think>…</think>."""
    path = Path(data_path)
    out = path.parent if path.name == "data.parquet" and (path.parent / "synth.json").is_file() else path
    try:
        tags = json.loads(export_sidecar(out).read_text(encoding="utf-8")).get("think_tags")
    except (OSError, ValueError, AttributeError):
        tags = None
    return tuple(tags) if isinstance(tags, list) and len(tags) == 2 else DEFAULT_THINK_TAGS


def _think(rows: list[dict], texts: list[str], method: str, tokenizer, tags: tuple[str, str]) -> dict:
    """Think tags per the student's template: rows carrying the tags; rows whose trace (between the tags in
    the last assistant turn) the chat template drops when it renders them (DeepSeek-R1's keeps only what
    follows </think>); how many tokens each tag is in the student's vocabulary (1: a token of its own)."""
    start, end = tags
    carrying = [i for i, r in enumerate(rows) if start in (t := json.dumps(r, ensure_ascii=False)) or end in t]
    dropped = 0
    if method == "sft":
        for i in carrying:
            content = str((rows[i]["messages"][-1] or {}).get("content") or "")
            trace = content.split(start, 1)[-1].split(end, 1)[0].strip() if end in content else ""
            if trace and trace not in texts[i]:
                dropped += 1
    return {"think_tags": len(carrying), "think_dropped": dropped,
            "think_tag_tokens": {t: len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in tags}
            if carrying else {}}


def readiness(data_path: Path, model_dir: str, method: str, max_length: int | None) -> dict:
    """How the data fits the student: token lengths under its tokenizer and chat template, how many
    rows max_length would truncate, and the rows with think tags (the export's) and what the student's
    template does with them (_think)."""
    from transformers import AutoTokenizer

    rows = load_rows(data_path, method)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return _readiness(rows, tokenizer, method, max_length, export_think_tags(data_path))


def _readiness(rows: list[dict], tokenizer, method: str, max_length: int | None,
               think_tags: tuple[str, str] = DEFAULT_THINK_TAGS) -> dict:
    """readiness() on rows already read; raises SynthError when the student's template would drop traces."""
    texts = _texts(rows, method, tokenizer)
    think = _think(rows, texts, method, tokenizer, think_tags)
    if think["think_dropped"]:
        raise SynthError(
            f"the student's chat template drops the {think_tags[0]}…{think_tags[1]} trace of {think['think_dropped']} "
            f"of {think['think_tags']} rows when it renders them, so training would never see those traces: export "
            "with reasoning: drop, or train a student whose template keeps the trace")
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
            **think}


# --------------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR-<global step>


def checkpoint_complete(path: Path) -> bool:
    """Whether transformers finished writing checkpoint dir `path`. Its _save_checkpoint writes the
    weights, then optimizer.pt, scheduler.pt and the RNG state, and trainer_state.json last; so a
    checkpoint is complete when trainer_state.json parses and names the directory's step, and the
    weights, optimizer and scheduler files it needs to resume are there. (transformers itself only
    looks for the highest checkpoint-N directory, complete or not: get_last_checkpoint.)"""
    match = CHECKPOINT_DIR.match(path.name)
    if not match or not path.is_dir():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != int(match.group(1)):
        return False
    has = {p.name for p in path.iterdir()}
    weights = any(n.startswith(("model", "adapter_model", "pytorch_model")) for n in has)
    deepspeed = any(n.startswith("global_step") for n in has)  # DeepSpeed keeps optimizer and scheduler there
    optimizer = deepspeed or any(n.startswith("optimizer") or "-optimizer" in n for n in has)
    return weights and optimizer and (deepspeed or "scheduler.pt" in has)

def latest_checkpoint(checkpoint_dir: Path, *, prune: bool = True) -> Path | None:
    """The complete checkpoint of the highest step under checkpoint_dir, or None; prune: remove the
    incomplete ones (a save the run died in)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for path in checkpoint_dir.iterdir():
        match = CHECKPOINT_DIR.match(path.name)
        if not match:
            continue
        if checkpoint_complete(path):
            found.append((int(match.group(1)), path))
        elif prune:
            shutil.rmtree(path, ignore_errors=True)
    return max(found)[1] if found else None


# --------------------------------------------------------------------------------------------------
# Assistant-only loss on any chat template
#
# TRL's assistant_only_loss takes the assistant's tokens from {% generation %} markers in the chat
# template (or from a training version of the template that TRL ships for a few model families). Most
# real models' templates have neither. For those, each SFT conversation becomes a conversational
# prompt-completion row (prompt: every turn before the final assistant turn; completion: that turn)
# and TRL's completion_only_loss masks the prompt: TRL renders the prompt with the generation prompt
# and the whole conversation with the same template, and only the tokens after their common prefix
# (the assistant's text and its end-of-turn token) count in the loss. What differs from the marker
# path: an assistant turn before the last one (a multi-turn row, a few-shot example) is context, not
# trained on.

def loss_mask(tokenizer, recipe: dict) -> str | None:
    """How an SFT recipe's assistant_only_loss is carried out with this student's tokenizer: None (the
    recipe does not ask for it), "markers" (TRL's assistant mask: the template has {% generation %}
    markers, TRL ships a training version of it, or the recipe's chat_template_path names a model whose
    template TRL clones), or "completion" (prompt-completion rows and TRL's completion_only_loss)."""
    if recipe.get("assistant_only_loss") is not True:
        return None
    path = recipe.get("chat_template_path")
    if path and not (Path(path).is_file() and str(path).endswith((".jinja", ".j2"))):
        return "markers"  # TRL copies another model's template (clone_chat_template); its own checks apply
    template = Path(path).read_text(encoding="utf-8") if path else tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise SynthError(f"the student's tokenizer ({tokenizer.name_or_path}) has no chat template, so no turn can "
                         "be told apart as the assistant's: start from an instruct model, add a chat_template.jinja, "
                         "or remove assistant_only_loss from the recipe")
    if GENERATION_MARKER.search(template):
        return "markers"
    from trl.chat_template_utils import get_training_chat_template  # TRL: seconds to import; train imports it anyway

    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        get_training_chat_template(tokenizer)  # a training template TRL ships for this one, or ValueError
        return "markers"
    except ValueError:
        return "completion"
    finally:
        tokenizer.chat_template = saved


def prompt_completion_rows(rows: list[dict], data_path: Path | None = None) -> list[dict]:
    """SFT `messages` rows as TRL's conversational prompt-completion rows: prompt = the turns before the
    final assistant turn, completion = [that turn]."""
    out = []
    for n, row in enumerate(rows, 1):
        messages = list(row["messages"])
        last = messages[-1] if messages else None
        if not isinstance(last, dict) or last.get("role") != "assistant" or len(messages) < 2:
            where = f"{data_path}: row {n}" if data_path else f"row {n}"
            what = "has nothing before it" if len(messages) == 1 and isinstance(last, dict) and \
                last.get("role") == "assistant" else "does not end with one"
            raise SynthError(f"{where}: assistant_only_loss trains on the final assistant turn, and this row {what}; "
                             "export rows that end with the assistant's answer, or remove assistant_only_loss")
        out.append({"prompt": messages[:-1], "completion": [last]})
    return out


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


@dataclasses.dataclass
class Prepared:
    """A trainer ready to train (what `train` runs; tests inspect its batches)."""
    trainer: Any
    tokenizer: Any
    ready: dict
    loss_mask: str | None      # see loss_mask
    checkpoint: Path | None    # the checkpoint training resumes from
    resumed_from: int | None
    log: list[dict]            # every logging step, the resumed-from run's first
    lora: bool
    began: float               # time.perf_counter() when the trainer was being built
    data_reused: bool = False  # the data tokenised by this process's training before (_data_key)


# This process's last training data, tokenised: {_data_key: (readiness, the trainer's train_dataset, kd's
# examples or None)}, one entry at most.
_TOKENISED: dict[str, tuple] = {}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def _data_key(method: str, data_path: Path, start: Path, recipe: dict) -> str | None:
    """What a training's tokenised data depends on, as one hash; None where it is not reused (dpo).

    Seed replicas of a train stage (`seeds: [0, 1, 2]`) read one file with one student and one recipe, and a
    worker process of `synth run --jobs N` (or `synth run` itself) trains stage after stage: the second of
    them in a process tokenises nothing (TRL's SFT preparation took ~4 s of a demo student, kd's ~2 s).
    The key holds the data file's bytes and the think tags its export declares (export_think_tags, which
    the readiness check reads), the starting model's files other than weights (tokenizer, chat template,
    config: name, size, mtime), and the recipe, whose seed is left out where the preparation does not read
    it: TRL's SFT preparation shuffles with it only under packing or shuffle_dataset; kd's never reads it."""
    if method not in ("sft", "kd") or not data_path.is_file():  # no file: load_rows says so, in one line
        return None
    digest = file_sha256(data_path)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in start.iterdir()
                   if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)) if start.is_dir() else []
    seeded = method == "sft" and bool(recipe.get("packing") or recipe.get("shuffle_dataset"))
    settings = {k: v for k, v in recipe.items() if k != "seed" or seeded}
    digest.update(json.dumps([method, str(start.resolve()), files, settings, export_think_tags(data_path)],
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache  # once per process: the setting lasts
def keep_freed_memory() -> None:
    """Make glibc keep the memory a training step frees for the next step, for the rest of this process.

    A step allocates and frees the same buffers (activations, logits chunks, the batch): by default glibc
    returns a freed top of the heap to the OS (trim threshold) and serves blocks above its mmap threshold
    with fresh mappings, so the next step faults the same pages back in. Measured on the demo's KD student:
    2.5x the page faults and ~10% slower steps when little else had grown the heap. The process then keeps
    up to its peak memory, which a training holds anyway. No-op where libc is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: trim only above 1 GiB of free top
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's 64-bit maximum (larger blocks still mmap)
    except (OSError, AttributeError):  # another libc (musl: no libc.so.6 or no mallopt)
        pass


def prepare(method: str, data_path: Path, model: str, recipe: dict, out_dir: Path, init: str | None = None,
            on_log: Callable[[int, dict], None] | None = None, *, checkpoint_dir: Path | None = None,
            resume: bool = False, on_resume: Callable[[int, Path], None] | None = None) -> Prepared:
    """Everything `train` does before trainer.train(): data read and checked against max_length, the
    recipe turned into TRL's config, the checkpoint to resume from chosen (or the old ones removed),
    assistant_only_loss mapped onto the student's chat template (loss_mask), and TRL's trainer built.

    In one of several DDP processes (gpus: N, synth/train_launch.py) each rank prepares its own trainer
    (TRL's config joins the process group); only rank 0 removes checkpoints. The launching parent has
    already chosen the checkpoint and removed the stale and incomplete ones before any rank started, so
    every rank finds the same one."""
    import torch

    cls = _config_class(method)
    start = str(init or model)
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    if not Path(start).exists():
        raise SynthError(f"no student model at {start}: build one (python -m synth.tiny DIR) or pass a model directory")

    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    keep_freed_memory()
    if torch.cuda.is_available():  # peak_memory_mb covers loading the model too
        torch.cuda.reset_peak_memory_stats()
    recipe = dict(recipe)
    lora = recipe.get("lora") or None
    max_share = recipe.get("max_truncated_share", DEFAULT_MAX_TRUNCATED_SHARE)
    max_length = recipe.get("max_length", next(f.default for f in dataclasses.fields(cls) if f.name == "max_length"))

    tokenizer = AutoTokenizer.from_pretrained(start)
    key = _data_key(method, Path(data_path), Path(start), recipe)
    reused = _TOKENISED.pop(key, None) if key else None
    _TOKENISED.clear()  # at most one training's data held: the one this training reuses, or none
    rows = None if reused else load_rows(data_path, method)
    if method == "kd":
        examples, ready, collator, kd = kd_train.kd_setup(rows, tokenizer, recipe, max_length, data_path,
                                                          tokenised=(reused[2], reused[0]) if reused else None)
    else:
        ready = reused[0] if reused else _readiness(rows, tokenizer, method, max_length, export_think_tags(data_path))
        collator = kd = None
    if ready["truncated_share"] > max_share:
        raise SynthError(
            f"{data_path}: {ready['truncated']} of {ready['rows']} rows ({ready['truncated_share']:.1%}) exceed "
            f"max_length {max_length} (longest {ready['max']} tokens, p99 {ready['p99']}); raise max_length in "
            f"the recipe or filter long rows (or raise max_truncated_share, now {max_share:g})")
    mask = loss_mask(tokenizer, recipe) if method == "sft" else None
    if mask == "completion":
        if rows is not None:  # None: the data is reused, already in prompt-completion form
            rows = prompt_completion_rows(rows, data_path)
        recipe["assistant_only_loss"] = False
        recipe["completion_only_loss"] = True

    if recipe.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        print("synth: warning: the recipe asks for use_liger_kernel but liger_kernel is not installed; "
              "training without it (pip install liger-kernel)", file=sys.stderr)
    seed = recipe.get("seed", 0)
    transformers.set_seed(seed)
    config = build_config(method, recipe, out_dir, checkpoint_dir)
    main = config.process_index == 0  # the process that saves (the only one outside DDP)
    checkpoint = latest_checkpoint(checkpoint_dir, prune=main) if resume else None
    if checkpoint is None and checkpoint_dir.exists() and main:
        shutil.rmtree(checkpoint_dir)

    peft_config = None
    if lora is not None:
        if importlib.util.find_spec("peft") is None:
            raise SynthError("the recipe asks for LoRA but peft is not installed: pip install peft")
        from peft import LoraConfig
        r = int(lora.get("r", 16))
        peft_config = LoraConfig(r=r, lora_alpha=lora.get("alpha", 2 * r), lora_dropout=lora.get("dropout", 0.0),
                                 target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")

    log: list[dict] = []
    resumed_from = None
    if checkpoint is not None:
        # the logging steps up to the checkpoint, from its trainer state: the run goes on after them
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        resumed_from = int(state["global_step"])
        log += [{"step": e["step"], **{k: v for k, v in e.items() if k != "step"}}
                for e in state.get("log_history", []) if isinstance(e, dict) and e.get("step", 0) <= resumed_from]
        if on_resume is not None:
            on_resume(resumed_from, checkpoint)

    class _Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            entry = {"step": state.global_step, **{k: v for k, v in (logs or {}).items()}}
            log.append(entry)
            if on_log is not None:
                on_log(state.global_step, dict(logs or {}))

    if reused:  # TRL's own preparation of this data, done by the training before (sft); kd's: below
        dataset = reused[1]
        if method == "sft":
            config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
    elif method == "kd":  # the collator holds the examples; the dataset their indices (kd_train.Collator)
        dataset = Dataset.from_dict({"row": list(range(len(examples)))})
    else:
        dataset = Dataset.from_list(rows)
    extra = {}
    if method == "sft":  # TRL's SFTTrainer; its loss by synth's chunked CE on CPU (synth/sft_train.py)
        Trainer = sft_train.sft_trainer_class()
    elif method == "kd":
        Trainer, extra = kd_train.kd_trainer_class(), {"kd": kd, "data_collator": collator}
    else:
        from trl import DPOTrainer as Trainer

    began = time.perf_counter()
    with _quiet():
        # The model goes in as a path: TRL loads it (float32 unless model_init_kwargs says otherwise)
        # and, for DPO, loads a second frozen copy as the reference model.
        try:
            trainer = Trainer(model=start, args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[_Log()], peft_config=peft_config, **extra)
        except ValueError as exc:  # a combination of settings TRL refuses (padding_free without packing, ...)
            raise SynthError(f"{Trainer.__name__} rejects the recipe: {_clipped_line(exc)}") from None
    # With disable_tqdm, transformers prints every log dict to stdout; on_log is the channel.
    trainer.remove_callback(PrinterCallback)
    if key:  # for the next training of this process with the same data (a replica under another seed)
        _TOKENISED[key] = (ready, trainer.train_dataset, examples if method == "kd" else None)
    return Prepared(trainer=trainer, tokenizer=tokenizer, ready=ready, loss_mask=mask, checkpoint=checkpoint,
                    resumed_from=resumed_from, log=log, lora=peft_config is not None, began=began,
                    data_reused=bool(reused))


def train(method: str, data_path: Path, model: str, recipe: dict, out_dir: Path, init: str | None = None,
          on_log: Callable[[int, dict], None] | None = None, *, checkpoint_dir: Path | None = None,
          resume: bool = False, on_resume: Callable[[int, Path], None] | None = None) -> dict:
    """Train `init` (or else `model`) on `data_path` with TRL and save the result to out_dir/model.
    DPO's reference model is the starting model, frozen (TRL's default). on_log(step, logs) is called
    at every logging event. An SFT recipe's assistant_only_loss works with any chat template (loss_mask:
    result["loss_mask"] says how).

    Checkpoints go to checkpoint_dir (default out_dir/checkpoints). resume: continue from the newest
    complete checkpoint there (the caller vouches that it was written by this same training: same
    recipe, data and model); incomplete ones are removed, and on_resume(step, checkpoint) is called.
    Without resume, checkpoints already there are removed and training starts at step 0. After the
    model is saved the checkpoints are deleted. result["resumed_from"] is the step resumed from or None;
    result["log"] holds every logging step of the whole training, the resumed-from run's included.
    This process trains alone; several (DDP) run this same function each (synth/train_launch.py)."""
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    prepared = prepare(method, data_path, model, recipe, out_dir, init, on_log, checkpoint_dir=checkpoint_dir,
                       resume=resume, on_resume=on_resume)
    return fit(prepared, out_dir, checkpoint_dir)


def fit(prepared: Prepared, out_dir: Path, checkpoint_dir: Path) -> dict:
    """trainer.train() on a prepared trainer (from its checkpoint when it has one), the model saved to
    out_dir/model (a LoRA adapter merged into it), the checkpoints removed: train's result. Under DDP
    every rank trains; only the main process (rank 0) saves the model and removes the checkpoints, and
    its result is the one a stage records (the loss and num_tokens in the log are gathered over the
    ranks; peak_memory_mb is rank 0's GPU's)."""
    import torch

    trainer, tokenizer, log, checkpoint = prepared.trainer, prepared.tokenizer, prepared.log, prepared.checkpoint
    model_dir = Path(out_dir) / "model"
    main = trainer.is_world_process_zero()
    with _quiet():
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        seconds = time.perf_counter() - prepared.began
        if main:
            final = trainer.model  # the model itself, not its DDP wrapper (trainer.model_wrapped)
            if prepared.lora:
                final = final.merge_and_unload()
            final.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
    if main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is saved: the checkpoints are spent

    # TRL logs num_tokens (non-padding tokens so far, all ranks together) at each logging step
    tokens = next((e["num_tokens"] for e in reversed(log) if "num_tokens" in e), None)
    runtime = output.metrics.get("train_runtime") or seconds
    cuda = torch.cuda.is_available()
    return {
        "model_dir": str(model_dir),
        "steps": int(output.global_step),
        "resumed_from": prepared.resumed_from,
        "train_loss": float(output.training_loss),
        "log": log,
        "readiness": prepared.ready,
        "loss_mask": prepared.loss_mask,
        "seconds": seconds,
        "tokens_per_s": float(tokens) / runtime if tokens else None,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
