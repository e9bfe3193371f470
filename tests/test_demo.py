"""`synth demo` end to end through the CLI, on a scaled-down world (the test writes its own world.yaml
and recipes into the demo folder before the first run; `synth demo` keeps files that are there).

Real components throughout: the world's files, a tokenizer trained here, Llama-shaped models trained
from random weights by TRL, the hf backend, DuckDB. The scale is what a test can afford on 2 cores,
so the accuracies are low; what is checked is the loop, the report's arithmetic, and the reuse.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import duckdb
import pytest

from conftest import REPO, cli_env

pytestmark = pytest.mark.slow

WORLD = """\
seed: 0
splits: {teacher_train: 2000, seeds: 40, heldout: 40}
prompts: 40
ops: [2, 2]
vocab_size: 500
models:
  teacher-init: {hidden: 128, layers: 2, heads: 4}
  student-init: {hidden: 96, layers: 2, heads: 4}
"""


def recipe(steps: int, lr: str = "3.0e-3") -> str:
    # batch 8 (not 16): half the compute per step; at these steps every accuracy in the report still has
    # correct answers to count (measured here: teacher 28/320 sampled, 3/40 greedy, students 1-2/40)
    return (f"max_steps: {steps}\nlearning_rate: {lr}\nlr_scheduler_type: cosine\nper_device_train_batch_size: 8\n"
            "max_length: 160\nassistant_only_loss: true\nlogging_steps: 10\nseed: 0\nmax_truncated_share: 0.05\n")


DPO = ("max_steps: 4\nlearning_rate: 5.0e-5\nper_device_train_batch_size: 8\nmax_length: 160\nbeta: 0.1\n"
       "loss_type: [sigmoid]\nlogging_steps: 1\nseed: 0\nmax_truncated_share: 0.05\n")


def kd_recipe(steps: int, lr: str = "3.0e-3") -> str:
    return (recipe(steps, lr).replace("assistant_only_loss: true\n", "")
            + "kd: {alpha: 0.0, temperature: 1.0, divergence: forward_kl}\n")


def demo(target, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "synth.cli", "demo", "--dir", str(target), *args],
                          capture_output=True, text=True, env=cli_env(), timeout=timeout, cwd=REPO)


def number(text: str):
    """The verifier's numeric comparison, restated: "07" and "7.0" are 7; anything else stays text."""
    try:
        return float(text)
    except ValueError:
        return text


def boxed(text: str | None) -> str | None:
    found = re.findall(r"\\boxed\{([^{}]*)\}", text or "")
    return found[-1].strip() if found else None


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    target = tmp_path_factory.mktemp("demo")
    (target / "recipes").mkdir()
    (target / "world.yaml").write_text(WORLD)
    (target / "recipes" / "teacher.yaml").write_text(recipe(TEACHER_STEPS))
    (target / "recipes" / "student.yaml").write_text(recipe(STUDENT_STEPS))
    (target / "recipes" / "dpo.yaml").write_text(DPO)
    (target / "recipes" / "student-kd.yaml").write_text(kd_recipe(STUDENT_STEPS))
    (target / "recipes" / "onpolicy.yaml").write_text(kd_recipe(4, "5.0e-4"))
    first = demo(target)
    assert first.returncode == 0, first.stderr[-3000:]
    return target, first


TEACHER_STEPS, STUDENT_STEPS = 400, 60


KEYS = {"teacher": "teacher_greedy_accuracy", "student_a": "student_unfiltered_accuracy",
        "student_b": "student_filtered_accuracy", "student_c": "student_kd_accuracy",
        "student_b_dpo": "student_dpo_accuracy", "student_d": "student_onpolicy_accuracy"}


def test_the_world_writes_new_prompts_for_b_disjoint_from_every_split(demo_dir):
    """world.yaml's `prompts: 40`: data/prompts.jsonl, problems no split holds, and what B samples."""
    target, _ = demo_dir
    rows = {split: [json.loads(line) for line in (target / "data" / f"{split}.jsonl").read_text().splitlines()]
            for split in ("teacher_train", "seeds", "heldout", "prompts")}
    assert len(rows["prompts"]) == 40 and all(r["id"].startswith("prompts-") for r in rows["prompts"])
    questions = {split: {r["question"] for r in split_rows} for split, split_rows in rows.items()}
    assert all(not questions["prompts"] & questions[s] for s in ("teacher_train", "seeds", "heldout"))
    con = duckdb.connect(str(target / "out" / "demo.duckdb"), read_only=True)
    try:
        sampled = {q for (q,) in con.execute("SELECT DISTINCT question FROM new_problems").fetchall()}
    finally:
        con.close()
    assert sampled == questions["prompts"]


def test_report_is_written_and_recomputes_from_per_row_results(demo_dir):
    target, first = demo_dir
    report = json.loads((target / "report.json").read_text())
    keys = ["teacher_accuracy", "teacher_vote_accuracy", "teacher_greedy_accuracy", "student_unfiltered_accuracy",
            "student_filtered_accuracy", "student_kd_accuracy", "student_dpo_accuracy", "student_onpolicy_accuracy"]
    for key in keys:
        assert 0.0 <= report[key] <= 1.0, key
        lo, hi = report["intervals"][key]
        assert lo <= report[key] <= hi
    assert report["n_heldout"] == 40 and report["n_seed_problems"] == 40 and report["samples_per_problem"] == 8
    assert (target / "report.png").stat().st_size > 10_000
    assert "B: SFT, verified samples" in first.stdout and "filter funnel" in first.stdout
    assert report["seeds"] == 3 and set(report["comparisons"]) == {"filtering", "kd", "dpo", "onpolicy"}
    for name, c in report["comparisons"].items():  # the means of per-seed differences, seed by seed
        assert len(c["per_seed"]) == 3 and report[f"{name}_gain_points"] == pytest.approx(c["diff_points"], abs=0.05)
        method, baseline = report["per_seed"][KEYS[c["method"]]], report["per_seed"][KEYS[c["baseline"]]]
        assert c["diff_points"] == pytest.approx(100 * sum(m - b for m, b in zip(method, baseline)) / 3)

    gold_heldout = {json.loads(line)["id"]: str(json.loads(line)["gold"])
                    for line in (target / "data" / "heldout.jsonl").read_text().splitlines()}
    gold_seeds = {json.loads(line)["id"]: str(json.loads(line)["gold"])
                  for line in (target / "data" / "seeds.jsonl").read_text().splitlines()}
    con = duckdb.connect(str(target / "out" / "demo.duckdb"), read_only=True)
    try:
        # held-out: every model's outputs, re-checked here from the raw completion text
        for model, key in KEYS.items():
            replicas = [model] if model == "teacher" else [f"{model}_s{s}" for s in range(3)]
            rights = []
            for replica in replicas:
                rows = con.execute(f"SELECT input_id, text FROM eval_{replica}").fetchall()
                assert len(rows) == 40
                rights.append(sum(boxed(text) is not None and number(boxed(text)) == number(gold_heldout[iid])
                                  for iid, text in rows))
            assert report["counts"][key] == {"correct": sum(rights), "n": 40 * len(replicas)}
            assert report[key] == pytest.approx(sum(rights) / 40 / len(replicas))
            if model != "teacher":
                assert report["per_seed"][key] == pytest.approx([r / 40 for r in rights])
        # the teacher's samples on the seed problems, and the plurality vote over them
        rows = con.execute("SELECT input_id, text FROM solutions").fetchall()
        assert len(rows) == 40 * 8
        right = sum(boxed(t) is not None and number(boxed(t)) == number(gold_seeds[i]) for i, t in rows)
        assert report["teacher_accuracy"] == pytest.approx(right / 320)
        by_problem: dict[str, list] = {}
        for iid, text in rows:
            by_problem.setdefault(iid, []).append(None if boxed(text) is None else number(boxed(text)))
        wins = 0
        for iid, answers in by_problem.items():
            counts = {a: answers.count(a) for a in set(answers) if a is not None}
            top = max(counts.values(), default=0)
            leaders = [a for a, n in counts.items() if n == top]
            wins += len(leaders) == 1 and top / len(answers) >= 0.5 and leaders[0] == number(gold_seeds[iid])
        assert report["teacher_vote_accuracy"] == pytest.approx(wins / 40)
        # the funnel is the verdicts' own count
        kept = con.execute("SELECT count(*) FROM kept").fetchone()[0]
        assert kept == right
        assert next(r for r in report["funnel"] if r["stage"] == "kept")["passed"] == kept
        # answer formats: the schema makes every reply the object; final_number's right answers, recounted
        formats = {r["stage"]: r for r in report["formats"]}
        assert formats["as_json_schema"]["parsed"] == formats["as_json_schema"]["n"] == 40
        rows = con.execute("SELECT input_id, text FROM as_json_final_number").fetchall()
        finals = [re.findall(r"-?\d+(?:\.\d+)?", t or "") for _, t in rows]
        assert formats["as_json_final_number"]["correct"] == sum(
            bool(f) and number(f[-1]) == number(gold_heldout[i]) for (i, _), f in zip(rows, finals))
        assert formats["eval"]["n"] == 40 and formats["eval"]["correct"] == report["counts"]["teacher_greedy_accuracy"]["correct"]
        assert "answer formats" in first.stdout
    finally:
        con.close()
    stages = {r["stage"]: r for r in report["stages"]}
    assert stages["teacher"]["tokens"] > 0 and stages["teacher"]["seconds"] > 0
    assert stages["solutions"]["tokens"] > 0 and stages["student_b_dpo_s0"]["rows"] > 0
    assert stages["student_d_s2"]["rows"] > 0 and stages["b_scored_s1"]["rows"] > 0


def test_second_run_reuses_everything_and_a_recipe_edit_reruns_only_downstream(demo_dir):
    target, _ = demo_dir
    models_before = sorted(p.name for p in (target / "out" / "models").iterdir())
    second = demo(target)
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((target / "report.json").read_text())
    assert report["this_run"]["requests_sent"] == 0 and report["this_run"]["stages_run"] == 0
    assert sorted(p.name for p in (target / "out" / "models").iterdir()) == models_before
    assert "models: built" not in second.stderr and "world: wrote" not in second.stderr

    # a DPO recipe edit: DPO and what reads it run again; the teacher, the students and the samples do not
    (target / "recipes" / "dpo.yaml").write_text(DPO.replace("max_steps: 4", "max_steps: 3"))
    third = demo(target)
    assert third.returncode == 0, third.stderr[-3000:]
    report = json.loads((target / "report.json").read_text())
    con = duckdb.connect(str(target / "out" / "demo.duckdb"), read_only=True)
    try:
        runs = con.execute("SELECT counts FROM synth.runs WHERE command = 'run' ORDER BY started_at").fetchall()
    finally:
        con.close()
    ran = set(json.loads(runs[-1][0])["stages_run"])
    assert ran == {f"{n}_s{s}" for n in ("student_b_dpo", "eval_student_b_dpo") for s in range(3)} | {"eval"}
    assert report["this_run"]["requests_sent"] == 3 * 40  # the new models' held-out outputs only


@pytest.mark.parametrize("world", ["seed: 0\nsplits: {seeds: many}\n",
                                   WORLD.replace("heldout: 40}", "heldout: 40, prompts: 10}"),
                                   WORLD.replace("prompts: 40", "prompts: -3")])
def test_bad_world_file_is_one_line(tmp_path, world):
    (tmp_path / "world.yaml").write_text(world)
    out = demo(tmp_path, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("synth: error:")]
    assert len(errors) == 1 and "world.yaml" in errors[0] and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_demo_help_explains_the_world():
    out = subprocess.run([sys.executable, "-m", "synth.cli", "demo", "--help"], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO)
    assert out.returncode == 0
    assert "word problems" in out.stdout and "teacher" in out.stdout and "--dir" in out.stdout
