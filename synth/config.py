"""The pipeline file's schema: strict pydantic models, and YAML errors turned into one line each.

Every key is declared here with its default; an unknown key anywhere is an error that names the
file, the line, the stage and the key. Cross-references (inputs, teachers, templates, cycles) are
checked by synth/pipeline.py once the file's shape is valid.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from synth.errors import SynthError
from synth.teachers import SamplingParams, TeacherConfig

STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_NAMES = {"synth", "main", "information_schema", "pg_catalog"}


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = None


class LoadStage(_Stage):
    """Seed rows from a file: .jsonl .json .csv .parquet or a saved HF dataset directory."""
    kind: Literal["load"]
    path: str
    limit: int | None = Field(None, ge=1)


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
    kind: Literal["generate"]
    input: str
    teacher: str
    prompt: str
    samples: int = Field(1, ge=1)
    params: SamplingParams = Field(default_factory=SamplingParams)
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
    _pairs_for: str = PrivateAttr("")  # set on a pairwise judge's critic stage: it reads that judge's pairs
    _after: list[str] = PrivateAttr(default_factory=list)  # train stages whose model is this stage's teacher


class ExportStage(_Stage):
    """Training data in TRL's conversational formats: sft (a generate or keep stage's rows, or a load
    stage's rows with `prompt` and `response`) or dpo (a pairs stage's pairs)."""
    kind: Literal["export"]
    input: str
    format: Literal["sft", "dpo"] = "sft"
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
    memory_mb: int = Field(512, ge=16)
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
    kind: Literal["judge"]
    input: str
    teacher: str
    prompt: str | None = Field(None, description="default: critic_score (pointwise), critic_pairwise")
    mode: Literal["pointwise", "pairwise"] = "pointwise"
    min_score: float | None = Field(None, description="pass at this score (pointwise, default 7) or win rate "
                                                       "(pairwise, default 0.5)")
    group_by: str = "input_id"
    params: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=256))
    _name: str = PrivateAttr("")  # the stage's own name, set when the pipeline is loaded


class DedupStage(_Stage):
    """Exact (normalised text) and, with `near`, MinHash-LSH near-duplicates; the first row wins."""
    kind: Literal["dedup"]
    input: str
    column: str = "text"
    near: float | None = Field(None, gt=0, le=1, description="Jaccard threshold for near-duplicates")
    num_perm: int = Field(128, ge=16)
    shingle: int = Field(5, ge=1, description="words per shingle")
    order_by: str | None = Field(None, description="SQL order that decides which copy is first")


class DecontaminateStage(_Stage):
    """n-gram overlap of rows with evaluation files."""
    kind: Literal["decontaminate"]
    input: str
    against: list[str] = Field(min_length=1)
    columns: list[str] = Field(default_factory=lambda: ["text"])
    ngram: int = Field(13, ge=1)
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
    samples: int = Field(1, ge=1)
    params: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=256))
    verify: EvalVerify
    _name: str = PrivateAttr("")


class TrainStage(_Stage):
    """Fine-tune a student with TRL on an export stage's file; the result is usable as a teacher by
    this stage's name (`teacher: sft`)."""
    kind: Literal["train"]
    method: Literal["sft", "dpo"]
    data: str = Field(description="an export stage: format sft for method sft, dpo for dpo")
    student: str | None = Field(None, description="the base model: a teacher's name, a local dir or a hub id")
    init: str | None = Field(None, description="a train stage to start from (dpo after sft)")
    recipe: str = Field(description="a YAML file of TRL config fields (train/*.yaml), relative to the pipeline")
    batch_size: int = Field(16, ge=1, description="when the trained model generates (as a teacher, or in an "
                                                   "evaluate stage): requests per batch")


FILTER_KINDS = ("verify", "vote", "judge", "dedup", "decontaminate", "filter")
Stage = Annotated[Union[LoadStage, GenerateStage, ExportStage, VerifyStage, VoteStage, JudgeStage, DedupStage,
                        DecontaminateStage, FilterStage, KeepStage, PairsStage, EvaluateStage, TrainStage],
                  Field(discriminator="kind")]
STAGE_KINDS = ("load", "generate", "export", *FILTER_KINDS, "keep", "pairs", "evaluate", "train")
STAGE_MODELS = {"load": LoadStage, "generate": GenerateStage, "export": ExportStage, "verify": VerifyStage,
                "vote": VoteStage, "judge": JudgeStage, "dedup": DedupStage, "decontaminate": DecontaminateStage,
                "filter": FilterStage, "keep": KeepStage, "pairs": PairsStage, "evaluate": EvaluateStage,
                "train": TrainStage}


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store: str | None = None
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict)
    stages: dict[str, Stage]


def read_pipeline_file(path: Path) -> PipelineFile:
    """Parse and validate the shape of a pipeline file; raise SynthError with one line on any problem."""
    if not path.is_file():
        raise SynthError(f"{path}: no such pipeline file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise SynthError(f"{path}{at}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise SynthError(f"{path}: a pipeline file is a mapping with a `stages:` key")
    for name in (data.get("stages") or {}) if isinstance(data.get("stages"), dict) else {}:
        if not isinstance(name, str) or not STAGE_NAME.match(name) or name.lower() in RESERVED_NAMES:
            raise SynthError(f"{path}:{line_of(text, ['stages', name])}: stage name {name!r} is not allowed; "
                             "use letters, digits and _ (it becomes a table name), and not "
                             + ", ".join(sorted(RESERVED_NAMES)))
        if name.lower() in sql_keywords():
            raise SynthError(f"{path}:{line_of(text, ['stages', name])}: stage name {name!r} is a reserved SQL "
                             "keyword, so every query would have to quote it; pick another name")
    try:
        return PipelineFile.model_validate(data)
    except ValidationError as exc:
        raise SynthError(_describe(path, text, data, exc)) from None


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
    tags = (*STAGE_KINDS, "hf", "openai", "vllm")
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
    from synth import config as me
    try:
        if loc[0] == "stages" and len(loc) == 3:
            model = me.STAGE_MODELS[data["stages"][loc[1]]["kind"]]
        elif loc[0] == "teachers" and len(loc) == 3:
            from synth.teachers import HFTeacherConfig, OpenAITeacherConfig, VLLMTeacherConfig
            backend = data["teachers"][loc[1]]["backend"]
            model = {"hf": HFTeacherConfig, "openai": OpenAITeacherConfig, "vllm": VLLMTeacherConfig}[backend]
        elif loc[0] == "stages" and len(loc) == 4 and loc[2] == "params":
            model = SamplingParams
        elif len(loc) == 1:
            model = PipelineFile
        else:
            return ""
    except (KeyError, TypeError):
        return ""
    return f" (allowed: {', '.join(f.alias or n for n, f in model.model_fields.items())})"


def line_of(text: str, keys: list[str]) -> int | None:
    """1-based line of the deepest mapping key along `keys` in the YAML text (best effort)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
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
