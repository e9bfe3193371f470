"""`synth demo`: the whole distillation loop, offline, on a CPU, in one folder.

The demo's files live in examples/demo (installed under <prefix>/share/synth/examples/demo): a world
(world.yaml), a pipeline (pipeline.yaml), a template (prompts/solve.yaml) and training recipes
(recipes/*.yaml). `synth demo --dir DIR`
  1. copies those files into DIR, keeping any that are already there (DIR is yours to edit);
  2. writes DIR/data/*.jsonl from world.yaml (synth.demo.world: seeded word problems) and builds the
     random-weight starting models DIR/models/{teacher,student}-init with a tokenizer trained on the
     world's text — each only when world.yaml asks for something different from what is there;
  3. runs DIR/pipeline.yaml like `synth run --jobs 2` (only what is stale: a second run trains and sends
     nothing; independent trainings two at a time);
  4. computes the report from the store (synth.demo.report), prints it and writes DIR/report.json and
     DIR/report.png.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml
from rich.console import Console

from synth.demo.report import demo_report, print_report, write_png
from synth.demo.world import corpus, make_splits, write_splits
from synth.errors import SynthError, one_line
from synth.paths import builtin_dir
from synth.pipeline import load_pipeline, run
from synth.tiny import build_models

PROMPTS = "prompts"  # world.yaml's `prompts: N`: data/prompts.jsonl, N problems after the splits


def demo_files() -> Path:
    return builtin_dir("examples") / "demo"


def copy_files(target: Path) -> list[str]:
    """Copy the demo's files into target, keeping the ones already there. Returns what was copied."""
    source = demo_files()
    if not (source / "pipeline.yaml").is_file():
        raise SynthError(f"the demo's files are missing from {source}; reinstall synth")
    copied = []
    for f in sorted(source.rglob("*")):
        rel = f.relative_to(source)
        if not f.is_file() or rel.parts[0] in ("data", "models", "out") or rel.name.startswith("report."):
            continue
        dest = target / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
            copied.append(str(rel))
    return copied


def read_world(target: Path) -> dict:
    path = target / "world.yaml"
    try:
        world = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SynthError(f"{path}: cannot read the demo world: {one_line(exc)}") from None
    try:
        splits = {str(k): int(v) for k, v in world["splits"].items()}
        models = {str(k): {"hidden": int(v["hidden"]), "layers": int(v["layers"]), "heads": int(v["heads"])}
                  for k, v in world["models"].items()}
        low, high = (int(x) for x in world.get("ops", [2, 4]))
        spec = {"seed": int(world.get("seed", 0)), "splits": splits, "vocab_size": int(world.get("vocab_size", 600)),
                "ops": [low, high], "models": models, "prompts": int(world.get("prompts", 0))}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SynthError(f"{path}: expected seed, splits {{name: size}}, ops [min, max], vocab_size and models "
                         f"{{name: {{hidden, layers, heads}}}} ({type(exc).__name__}: {exc})") from None
    sizes = {**{f"splits.{k}": v for k, v in splits.items()}, "prompts": spec["prompts"]}
    if negative := next((key for key, size in sizes.items() if size < 0), None):
        raise SynthError(f"{path}: {negative}: a number of problems, 0 or more")
    if PROMPTS in splits and spec["prompts"]:
        raise SynthError(f"{path}: splits: a split named {PROMPTS!r} would be overwritten by `prompts: "
                         f"{spec['prompts']}` (data/{PROMPTS}.jsonl); rename the split")
    if not 1 <= spec["ops"][0] <= spec["ops"][1]:
        raise SynthError(f"{path}: ops: [min, max] steps per problem, 1 <= min <= max (got {spec['ops']})")
    for name, m in models.items():
        if m["hidden"] % m["heads"]:
            raise SynthError(f"{path}: models.{name}: hidden ({m['hidden']}) must be a multiple of heads ({m['heads']})")
    return spec


def build_world(target: Path, console: Console | None = None) -> dict:
    """Write DIR/data/*.jsonl and the starting models from DIR/world.yaml, skipping what is up to date."""

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    console = console or Console(stderr=True)
    spec = read_world(target)
    sizes = {**spec["splits"], **({PROMPTS: spec["prompts"]} if spec["prompts"] else {})}
    problems = make_splits(sizes, spec["seed"], tuple(spec["ops"]))  # the prompts come after the splits
    splits = {name: rows for name, rows in problems.items() if name in spec["splits"]}
    data_dir = target / "data"
    for split, rows in problems.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path = data_dir / f"{split}.jsonl"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_splits(data_dir, {split: rows})
            console.print(f"world: wrote {len(rows)} problems to {path}")
    # the starting models: `synth models`' builder (synth.tiny.build_models), on the splits' text; the prompts
    # are not in the tokenizer's corpus (new prompts reach a student after its tokenizer was made)
    build_models(target / "models", corpus(splits), spec["models"], vocab_size=spec["vocab_size"],
                 split_digits=True, max_positions=256, seed=spec["seed"],
                 key_extra={"splits": spec["splits"], "ops": spec["ops"]}, console=console)
    return spec


def run_demo(target: Path, console: Console | None = None) -> dict:
    """Prepare DIR, run its pipeline, and write the report; returns the report."""

    import importlib.util

    missing = [m for m in ("torch", "transformers", "trl") if importlib.util.find_spec(m) is None]
    if missing:
        raise SynthError(f"synth demo trains models and needs {', '.join(missing)}: pip install "
                         "'synth-distill[hf,train]' (./scripts/setup does it)")
    console = console or Console(stderr=True)
    began = time.monotonic()
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    copied = copy_files(target)
    if copied:
        console.print(f"demo: copied {len(copied)} files into {target} (pipeline.yaml, world.yaml, prompts/, "
                      "recipes/) — edit them and re-run; only what changed runs again")
    build_world(target, console)
    pipeline = load_pipeline(target / "pipeline.yaml")
    # the student arms and their seeds are independent trainings: two at a time on two cores or more
    jobs = min(2, os.cpu_count() or 1)
    counts = run(pipeline, console=console, argv=["demo", str(target)], jobs=jobs)
    pipeline = load_pipeline(target / "pipeline.yaml")  # re-read: the trained models' dirs
    report = demo_report(pipeline)
    report["this_run"] = {"seconds": round(time.monotonic() - began, 1), "stages_run": len(counts["stages_run"]),
                          "requests_sent": counts["sent"], "requests_cached": counts["cached"],
                          "errors": counts["errors"]}
    (target / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_png(report, target / "report.png")
    print_report(report, Console(width=None if console.is_terminal else 120))
    return report
