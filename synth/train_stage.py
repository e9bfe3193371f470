"""The train stage in a pipeline: resolve the data file, the base model and the recipe, call
synth.train.train (TRL), and record the result in the store.

- data: the export stage's file (format sft for method sft, dpo for dpo);
- base model: `init`'s trained model when given, else `student` (a teacher's name, or a path/hub id);
- output: <store folder>/models/<stage>-<run id>/model, recorded in the stage's state
  (pipeline.trained_model_dir), so that a retrained model is a new model id for request hashing;
- the training log (one row per logging step) goes to synth.train_logs, the summary to the stage's
  state; the model is then a teacher named after the stage.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pyarrow as pa
from rich.console import Console

from synth.config import TrainStage
from synth.errors import SynthError
from synth.store import Store, now
from synth.teachers import resolve_model_path


def run_stage(pipeline, name: str, run_id: str, console: Console) -> dict:
    from synth import train
    from synth.pipeline import record_stage, trained_model_dir

    stage: TrainStage = pipeline.stage(name)
    if importlib.util.find_spec("trl") is None:
        raise SynthError(f"{pipeline.where(name)}: train stages need TRL: pip install 'synth-distill[train]'")
    recipe = train.load_recipe(pipeline.resolve(stage.recipe), stage.method)
    data = pipeline.resolve(pipeline.stage(stage.data).path)
    if data.suffix == "":  # a saved HF dataset directory: its data.parquet holds the same rows
        data = data / "data.parquet"
    if stage.init:
        base = trained_model_dir(pipeline, stage.init)
        if base is None:
            raise SynthError(f"{pipeline.where(name)}: key 'init': stage '{stage.init}' has no trained model yet")
    elif stage.student in pipeline.spec.teachers:
        base = resolve_model_path(pipeline.spec.teachers[stage.student].model, pipeline.base_dir)
    else:
        base = resolve_model_path(stage.student, pipeline.base_dir)
    out = pipeline.store.path.parent / "models" / f"{name}-{run_id}"  # a new model id for every training run
    model_dir = out / "model"
    if out.exists():
        shutil.rmtree(out)  # a half-written attempt of this very run
    log: list[dict] = []

    def on_log(step: int, logs: dict) -> None:
        log.append({"step": step, **logs})
        if "loss" in logs:
            console.print(f"  {name}: step {step} loss {logs['loss']:.4f}", highlight=False)

    console.print(f"  {name}: {stage.method} on {data.name} from {base}")
    result = train.train(stage.method, data, base, recipe, out, init=None, on_log=on_log)
    rows = [r for r in (result.get("log") or log) if "step" in r]
    table = pa.table({
        "stage": [name] * len(rows), "run_id": [run_id] * len(rows),
        "step": pa.array([int(r["step"]) for r in rows], pa.int32()),
        "loss": pa.array([r.get("loss") for r in rows], pa.float64()),
        "logs": [json.dumps(r, default=str) for r in rows], "created_at": [now()] * len(rows)})
    summary = {k: result.get(k) for k in ("steps", "train_loss", "seconds", "tokens_per_s", "peak_memory_mb",
                                          "readiness")}
    with pipeline.store.write() as con:
        con.execute("DELETE FROM synth.train_logs WHERE stage = ?", [name])
        Store.insert_arrow(con, "synth.train_logs", table, mode="")
        Store.replace_view(con, name, f"SELECT step, loss, logs FROM synth.train_logs WHERE stage = '{name}' "
                                      "ORDER BY step")
        pipeline.trained[name] = str(model_dir)  # before record_stage: the fingerprint names this model
        record_stage(con, pipeline, name, "done", len(rows), run_id, model_dir=str(model_dir), **summary)
    console.print(f"  {name}: {result.get('steps')} steps · train loss {result.get('train_loss')} · model {model_dir}")
    return {"rows": len(rows), "model_dir": str(model_dir), **summary}
