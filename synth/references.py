"""Stage references, checked and wired when a pipeline is loaded (before anything runs):

- companion stages: a judge stage J gets the generate stage J_critic for its critic calls
  (synth/judge.py), an evaluate stage E gets E_<model> per model (synth/evaluate.py);
- trained students: a train stage's model is a teacher under the stage's name, and a generate stage
  that uses it runs after the train stage;
- every reference (input, pass, by, versus, data, init, teacher, models) must name an existing
  stage of a kind that can be read there: one line naming the file, line, stage and key otherwise.
"""

from __future__ import annotations

from pathlib import Path

from synth.config import (FILTER_KINDS, EvaluateStage, ExportStage, GenerateStage, JudgeStage, KeepStage,
                          PairsStage, PipelineFile, TrainStage)
from synth.errors import SynthError

ROWS = ("load", "generate", "keep")  # stages whose output is rows with ids


def add_student_teachers(path: Path, spec: PipelineFile) -> None:
    """A train stage's model is a teacher under the stage's name (an hf teacher; its directory is set
    once fingerprints are known: pipeline.trained_model_dir)."""
    from synth.teachers import HFTeacherConfig

    for name, stage in spec.stages.items():
        if isinstance(stage, TrainStage):
            if name in spec.teachers:
                raise SynthError(f"{path}: stage '{name}': a teacher has the same name; a trained model is a "
                                 "teacher under its stage's name, so rename one of them")
            spec.teachers[name] = HFTeacherConfig(backend="hf", model=f"<trained by stage {name}>",
                                                  batch_size=stage.batch_size)


def add_companion_stages(path: Path, spec: PipelineFile) -> None:
    from synth.evaluate import model_stages
    from synth.judge import critic_stage, critic_stage_name

    for name, stage in list(spec.stages.items()):
        if isinstance(stage, JudgeStage):
            companions = {critic_stage_name(name): critic_stage(stage, name)}
        elif isinstance(stage, EvaluateStage):
            companions = model_stages(stage, name)
        else:
            continue
        stage._name = name
        for extra, generate_stage in companions.items():
            if extra in spec.stages:
                raise SynthError(f"{path}: stage '{extra}': the name is taken by {stage.kind} stage '{name}' for "
                                 "its model calls; rename one of them")
            spec.stages[extra] = generate_stage


def stage_references(stage) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(key, the stage names it references, the kinds allowed there) for each reference of a stage."""
    if isinstance(stage, KeepStage):
        return [("input", [stage.input], ROWS), ("pass", stage.pass_, FILTER_KINDS)]
    if isinstance(stage, PairsStage):
        return [("input", [stage.input], ROWS), ("by", [stage.by] if stage.by else [], ("verify", "vote", "judge")),
                ("versus", [stage.versus] if stage.versus else [], ROWS)]
    if isinstance(stage, ExportStage):
        sources = ("pairs",) if stage.format == "dpo" else ("generate", "keep", "load") if stage.prompt else \
            ("generate", "keep")
        return [("input", [stage.input], sources)]
    if isinstance(stage, TrainStage):
        return [("data", [stage.data], ("export",)), ("init", [stage.init] if stage.init else [], ("train",))]
    if hasattr(stage, "input"):  # generate, evaluate and the filters read rows
        return [("input", [stage.input], ROWS)]
    return []


def check_references(path: Path, spec: PipelineFile, where) -> None:
    """Every reference names an existing stage of an allowed kind; every teacher exists. `where(name,
    key)` gives the "file:line: stage 'name'" prefix of an error."""
    for name, stage in spec.stages.items():
        for key, refs, kinds in stage_references(stage):
            for ref in refs:
                if ref not in spec.stages:
                    raise SynthError(f"{where(name, key)}: key '{key}': no stage named {ref!r} "
                                     f"(stages: {', '.join(spec.stages)})")
                kind = spec.stages[ref].kind
                if kind not in kinds:
                    hint = "; point at the stage it exports" if kind == "export" and key == "input" else \
                        f" for format {stage.format}" if isinstance(stage, ExportStage) else ""
                    raise SynthError(f"{where(name, key)}: key '{key}': {ref!r} is a {kind} stage; use a "
                                     f"{' or '.join(kinds)} stage{hint}")
        if isinstance(stage, PairsStage) and (stage.by is None) == (stage.versus is None):
            raise SynthError(f"{where(name)}: give exactly one of 'by' (a verify, vote or judge stage) or "
                             "'versus' (a stage of student samples)")
        if isinstance(stage, ExportStage) and stage.format != "dpo" and stage.rejected != "whole":
            raise SynthError(f"{where(name, 'rejected')}: key 'rejected' cuts the rejected answers of DPO pairs; "
                             f"it needs format: dpo (this export is format: {stage.format})")
        if isinstance(stage, TrainStage):
            _check_train(spec, name, stage, where, path)
        if isinstance(stage, GenerateStage) and isinstance(spec.stages.get(stage.teacher), TrainStage):
            stage._after = [stage.teacher]
        if isinstance(stage, GenerateStage) and stage.max_cost and stage.teacher in spec.teachers and \
                spec.teachers[stage.teacher].prices is None:
            raise SynthError(f"{where(name, 'max_cost')}: key 'max_cost': teacher {stage.teacher!r} has no prices; "
                             "add prices: {input: USD per 1M tokens, output: USD per 1M tokens} to it")
        teachers = stage.models if isinstance(stage, EvaluateStage) else \
            [stage.teacher] if isinstance(stage, (GenerateStage, JudgeStage)) else []
        key = "models" if isinstance(stage, EvaluateStage) else "teacher"
        for t in teachers:
            if t not in spec.teachers:
                raise SynthError(f"{where(name, key)}: key '{key}': no teacher named {t!r} "
                                 f"(teachers: {', '.join(spec.teachers) or 'none defined'})")


def _check_train(spec: PipelineFile, name: str, stage: TrainStage, where, path: Path) -> None:
    data = spec.stages[stage.data]
    if data.format != stage.method:
        raise SynthError(f"{where(name, 'data')}: key 'data': method {stage.method} trains on an export stage "
                         f"with format {stage.method}; {stage.data!r} has format {data.format}")
    if isinstance(spec.stages.get(stage.student), TrainStage):
        raise SynthError(f"{where(name, 'student')}: key 'student': {stage.student!r} is a train stage; to start "
                         "from its model use init: " + stage.student)
    if stage.init is None and stage.student is None:
        raise SynthError(f"{where(name)}: give 'student' (the base model) or 'init' (a train stage to start from)")
    recipe = path.parent / stage.recipe
    if not recipe.is_file():
        raise SynthError(f"{where(name, 'recipe')}: key 'recipe': no such file {recipe}")
