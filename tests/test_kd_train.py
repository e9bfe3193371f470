"""Token-level distillation end to end on real tiny models (built here; one tokenizer): a teacher's samples
with their log-probs captured -> `format: kd` export -> `method: kd` train (TRL's trainer, synth's chunked
loss); the on-policy round (a student trained by SFT samples, the teacher scores its samples, KD from
`init:` that student); what the export holds (token ids as generated, never re-tokenised; top-k per
position); a student of another vocabulary, a kd recipe key in the wrong place, and a teacher without
token ids are one line each with exit 2 and nothing written; kill -9 during a kd train stage resumes
from its checkpoint. The KD loss's own maths: tests/test_kd_loss.py."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import bench_quick, cli_env, echo_teacher, make_pipeline, query, synth, synth_run, write
from synth.train import latest_checkpoint

pytest.importorskip("trl")

KD_RECIPE = """\
max_steps: {steps}
learning_rate: 1.0e-3
per_device_train_batch_size: 4
max_length: 128
logging_steps: 1
seed: 0
kd: {{alpha: {alpha}, temperature: 1.0, divergence: {divergence}, chunk_size: 16}}
"""
SFT_RECIPE = "max_steps: 4\nlearning_rate: 1.0e-3\nper_device_train_batch_size: 4\nmax_length: 128\nseed: 0\n"


@pytest.fixture(scope="module")
def student_model(tmp_path_factory):
    from synth.tiny import build_model

    return build_model(tmp_path_factory.mktemp("models") / "student", hidden=64, seed=3)


def off_policy(workspace, teacher, student, *, steps=6, alpha=0.0, divergence="forward_kl", k=4):
    return make_pipeline(workspace, teachers={"teacher": {"backend": "hf", "model": str(teacher), "batch_size": 12}},
                         files={"train/kd.yaml": KD_RECIPE.format(steps=steps, alpha=alpha, divergence=divergence)},
                         stages={
        "problems": "kind: load, path: seeds.jsonl",
        "samples": {"kind": "generate", "input": "problems", "teacher": "teacher", "prompt": "solve", "samples": 2,
                    "params": {"temperature": 1.0, "max_tokens": 12, "seed": 0, "logprobs": k}},
        "kd_data": {"kind": "export", "input": "samples", "format": "kd", "path": "out/kd.parquet"},
        "student_kd": {"kind": "train", "method": "kd", "data": "kd_data", "student": str(student),
                       "recipe": "train/kd.yaml"}})


def test_off_policy_kd_trains_from_the_stored_log_probs(workspace, tiny_model, student_model):
    from rich.console import Console

    console = Console(record=True, width=300, file=io.StringIO())
    counts = synth_run(off_policy(workspace, tiny_model, student_model), console=console)
    said = " ".join(console.export_text().split())
    assert "kd_data: the teacher's top-1 token holds ≥ 90% of its probability at" in said
    assert "completion positions and differs from the token taken at" in said
    assert counts["stages_run"] == ["problems", "samples", "kd_data", "student_kd"]
    store = workspace / "out" / "run.duckdb"
    rows = pq.read_table(workspace / "out" / "kd.parquet").to_pylist()
    stored = dict(query(store, "SELECT id, token_ids FROM synth.token_logprobs"))
    assert len(rows) == 24
    for row in rows:  # the teacher's own ids, one top-4 per position, the prompt as turns
        assert row["completion_ids"] == stored[row["id"]]
        assert len(row["teacher_ids"]) == len(row["teacher_logprobs"]) == len(row["completion_ids"])
        assert all(len(t) == 4 for t in row["teacher_ids"]) and row["tokenizer"] == str(tiny_model)
        assert row["prompt"][-1]["role"] == "user"
    sidecar = json.loads((workspace / "out" / "kd.parquet.synth.json").read_text())
    assert sidecar["format"] == "kd" and sidecar["tokenizer"] == str(tiny_model)
    losses = [r[0] for r in query(store, "SELECT loss FROM synth.train_logs WHERE stage = 'student_kd' "
                                         "AND loss IS NOT NULL ORDER BY step")]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    export = json.loads(query(store, "SELECT detail FROM synth.stages WHERE name = 'kd_data'")[0][0])
    assert export["teacher_positions"] == sum(len(r["completion_ids"]) for r in rows) and export["teacher_k"] == 4
    state = json.loads(query(store, "SELECT detail FROM synth.stages WHERE name = 'student_kd'")[0][0])
    assert (workspace / state["model_dir"] / "config.json").exists() or os.path.exists(
        os.path.join(state["model_dir"], "config.json"))


def test_the_soft_target_summary_counts_confident_positions_and_the_tail_as_an_outcome():
    """Hand-worked: a near one-hot position (0.95, 0.05), a spread one (0.5, 0.3 and a 0.2 tail), a padded
    entry (-inf) that holds nothing, rows of different k, and one position where the teacher's top-1 is not
    the token taken."""
    import math

    from synth.stages.export import soft_target_summary

    records = [{"completion_ids": [7], "teacher_ids": [[7, 3, -1]],
                "teacher_logprobs": [[math.log(0.95), math.log(0.05), float("-inf")]]},
               {"completion_ids": [3], "teacher_ids": [[5, 3]],  # another k: padded; the teacher prefers 5
                "teacher_logprobs": [[math.log(0.5), math.log(0.3)]]}]
    summary = soft_target_summary(records)
    assert summary["teacher_differs_share"] == 0.5
    h = lambda *ps: -sum(p * math.log(p) for p in ps)  # noqa: E731
    assert summary["teacher_positions"] == 2 and summary["teacher_k"] == 3
    assert summary["teacher_confident_share"] == 0.5
    assert summary["teacher_entropy_nats"] == pytest.approx((h(0.95, 0.05) + h(0.5, 0.3, 0.2)) / 2, abs=1e-4)
    assert soft_target_summary([{"completion_ids": [], "teacher_ids": [], "teacher_logprobs": []}]) == {}


def test_the_kd_loss_goes_down_on_the_teachers_own_distribution(workspace, tiny_model, student_model):
    """More steps on the same data: forward KL (alpha 0) falls — the student moves toward the teacher."""
    synth_run(off_policy(workspace, tiny_model, student_model, steps=24))
    losses = [r[0] for r in query(workspace / "out" / "run.duckdb",
                                  "SELECT loss FROM synth.train_logs WHERE stage = 'student_kd' AND loss IS NOT NULL ORDER BY step")]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first * 0.9, losses


def test_on_policy_round(workspace, tiny_model, student_model):
    """SFT student -> its own samples (token ids kept) -> the teacher scores them -> KD from init: the SFT student."""
    p = make_pipeline(workspace, teachers={"teacher": {"backend": "hf", "model": str(tiny_model)}},
                      files={"train/kd.yaml": KD_RECIPE.format(steps=4, alpha=0.0, divergence="reverse_kl"),
                             "train/sft.yaml": SFT_RECIPE},
                      stages={
        "problems": "kind: load, path: seeds.jsonl",
        "sft_data": {"kind": "export", "input": "problems", "format": "sft", "prompt": "solve",
                     "response": "answer_gold", "path": "out/sft.parquet"},
        "sft": {"kind": "train", "method": "sft", "data": "sft_data", "student": str(student_model),
                "recipe": "train/sft.yaml"},
        "own": {"kind": "generate", "input": "problems", "teacher": "sft", "prompt": "solve", "samples": 2,
                "params": {"temperature": 1.0, "max_tokens": 12, "seed": 0, "logprobs": 0}},
        "scored": {"kind": "score", "input": "own", "teacher": "teacher", "logprobs": 4},
        "onpolicy_data": {"kind": "export", "input": "scored", "format": "kd", "path": "out/onpolicy.parquet"},
        "onpolicy": {"kind": "train", "method": "kd", "data": "onpolicy_data", "init": "sft",
                     "recipe": "train/kd.yaml"}})
    counts = synth_run(p)
    assert counts["stages_run"][-1] == "onpolicy"
    store = workspace / "out" / "run.duckdb"
    rows = pq.read_table(workspace / "out" / "onpolicy.parquet").to_pylist()
    scored = dict(query(store, "SELECT s.id, t.token_ids FROM synth.scores s JOIN synth.token_logprobs t "
                               "ON t.id = s.score_id"))
    own = dict(query(store, "SELECT id, token_ids FROM synth.token_logprobs WHERE id IN (SELECT id FROM own)"))
    assert len(rows) == 24 and all(r["completion_ids"] == scored[r["id"]] == own[r["id"]] for r in rows)
    assert all(len(t) == 4 for r in rows for t in r["teacher_ids"])
    assert query(store, "SELECT count(*) FROM synth.train_logs WHERE stage = 'onpolicy' AND loss IS NOT NULL") == [(4,)]


def test_a_student_of_another_vocabulary_is_refused_before_anything_runs(workspace, tiny_model, tmp_path):
    from synth.tiny import build_model

    other = build_model(tmp_path / "other", corpus=["an entirely different corpus " * 30], vocab_size=300)
    run = synth("run", off_policy(workspace, tiny_model, other))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "stage 'student_kd'" in line and "tokenizers differ" in line and str(other) in line \
        and str(tiny_model) in line
    assert not (workspace / "out").exists()  # refused in preflight: nothing written


def test_a_teacher_without_token_ids_is_refused(workspace, student_model):
    p = make_pipeline(workspace, teachers={"t": echo_teacher()}, files={
        "train/kd.yaml": KD_RECIPE.format(steps=2, alpha=0.0, divergence="forward_kl")}, stages={
        "problems": "kind: load, path: seeds.jsonl",
        "samples": {"kind": "generate", "input": "problems", "teacher": "t", "prompt": "solve",
                    "params": {"max_tokens": 6, "logprobs": 2}},
        "kd_data": {"kind": "export", "input": "samples", "format": "kd", "path": "out/kd.parquet"},
        "student_kd": {"kind": "train", "method": "kd", "data": "kd_data", "student": str(student_model),
                       "recipe": "train/kd.yaml"}})
    run = synth("run", p)
    assert run.returncode == 2 and "token strings" in run.stderr and "tokenizer" in run.stderr
    assert not (workspace / "out").exists()
    run = synth("run", p, "kd_data")  # the export alone: the same refusal, naming the row, nothing written
    assert run.returncode == 2 and "token strings" in run.stderr and not (workspace / "out" / "kd.parquet").exists()


@pytest.mark.parametrize("recipe, method, expected", [
    ("kd: {alpha: 0.5}\n", "sft", "needs method kd"),
    ("packing: true\n", "kd", "method kd builds its own batches"),
    ("kd: {divergence: kl}\n", "kd", "kd.divergence"),
    ("kd: {alpha: 2}\n", "kd", "kd.alpha"),
    ("kd: {tempreature: 2}\n", "kd", "unknown key 'kd.tempreature'"),
])
def test_kd_recipe_mistakes_are_one_line(tmp_path, recipe, method, expected):
    from synth.errors import SynthError
    from synth.train import check_recipe

    path = write(tmp_path / "r.yaml", "max_steps: 2\n" + recipe)
    with pytest.raises(SynthError) as exc:
        check_recipe(path, method)
    assert expected in str(exc.value) and f"{path}:2" in str(exc.value)


def test_kill_during_kd_training_then_rerun_resumes(workspace, tiny_model, student_model):
    p = off_policy(workspace, tiny_model, student_model, steps=40)
    synth_run(p, ["kd_data"])
    attempt = workspace / "out" / "models" / "student_kd-attempt"
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "synth.cli", "run", str(p)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env(), start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            latest = latest_checkpoint(attempt / "checkpoints", prune=False) if attempt.exists() else None
            if latest is not None and (latest / "trainer_state.json").stat().st_mtime > started:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    step = int(latest_checkpoint(attempt / "checkpoints", prune=False).name.split("-")[1])
    assert 0 < step < 40
    synth_run(p)
    state = json.loads(query(workspace / "out" / "run.duckdb",
                             "SELECT detail FROM synth.stages WHERE name = 'student_kd'")[0][0])
    assert state["resumed_from"] == step and state["steps"] == 40
    steps = [r[0] for r in query(workspace / "out" / "run.duckdb",
                                 "SELECT step FROM synth.train_logs WHERE stage = 'student_kd' AND loss IS NOT NULL "
                                                               "ORDER BY step")]
    assert steps == list(range(1, 41))  # each step once: the resumed run's log continues the killed one's


def test_the_recipe_check_knows_the_losses_divergences():
    from synth import kd_loss, kd_train

    assert kd_train.DIVERGENCES == kd_loss.DIVERGENCES  # kd_train cannot import kd_loss (torch) for synth plan


def test_the_batch_loss_puts_each_teacher_target_on_the_position_that_predicts_its_token(tiny_model):
    """Alignment: tokenize + Collator + batch_loss equals the reference loss computed by hand from the model's
    full logits, where the logits at position prompt + t - 1 meet completion token t and its teacher top-k;
    prompt and padding positions take no part (two rows of different lengths, one row's alternatives padded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synth.kd_loss import SparseTargets, reference_kd_loss
    from synth.kd_train import KD_DEFAULTS, Collator, batch_loss, tokenize

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, question in ((5, "what is 2 + 3?"), (9, "and 4 + 4?")):
        ids = torch.randint(5, len(tok), (n,), generator=gen).tolist()
        top = [torch.randint(5, len(tok), (3,), generator=gen).tolist() for _ in range(n)]
        lps = [sorted(torch.log_softmax(torch.randn(4, generator=gen), -1)[:3].tolist(), reverse=True) for _ in range(n)]
        rows.append({"prompt": [{"role": "user", "content": question}], "completion_ids": ids,
                     "teacher_ids": top, "teacher_logprobs": lps})
    rows[1]["teacher_ids"][2][2], rows[1]["teacher_logprobs"][2][2] = -1, float("-inf")  # a padded alternative
    examples, ready = tokenize(rows, tok, max_length=128)
    assert ready["truncated"] == 0
    batch = Collator(tok.pad_token_id)(examples)
    kd = {**KD_DEFAULTS, "alpha": 0.3, "temperature": 2.0, "chunk_size": 4}
    got = batch_loss(model, batch, kd)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows_logits, labels, top_ids, top_lps = [], [], [], []
    for i, (e, row) in enumerate(zip(examples, rows)):
        p = e["prompt_length"]
        for t, token in enumerate(row["completion_ids"]):
            rows_logits.append(logits[i, p + t - 1])
            labels.append(token)
            top_ids.append([max(x, 0) for x in row["teacher_ids"][t]])
            top_lps.append(row["teacher_logprobs"][t])
    expected = reference_kd_loss(torch.stack(rows_logits), SparseTargets(
        torch.tensor(labels), torch.tensor(top_ids), torch.tensor(top_lps, dtype=torch.float32)),
        alpha=0.3, temperature=2.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def _kd_records(tok, lengths=(5, 9, 7, 6, 8, 5), k=3, seed=0) -> list[dict]:
    """Rows as a `format: kd` export writes them: prompt turns, completion ids, the teacher's top-k per
    position (one alternative padded with id -1 and log-prob -inf), and the prompts repeating (samples)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    records = []
    for i, n in enumerate(lengths):
        lps = [sorted(torch.log_softmax(torch.randn(k + 1, generator=gen), -1)[:k].tolist(), reverse=True)
               for _ in range(n)]
        top = [torch.randint(5, len(tok), (k,), generator=gen).tolist() for _ in range(n)]
        top[n // 2][-1], lps[n // 2][-1] = -1, float("-inf")
        records.append({"id": f"r{i}", "prompt": [{"role": "user", "content": f"what is {i % 3} + 2?"}],
                        "completion": "", "completion_ids": torch.randint(5, len(tok), (n,), generator=gen).tolist(),
                        "logprobs": [p[0] for p in lps], "teacher_ids": top, "teacher_logprobs": lps,
                        "tokenizer": "student"})
    return records


def test_kd_parquet_rows_read_as_arrays_collate_exactly_as_the_rows_as_lists(tiny_model, tmp_path):
    """A kd Parquet file is read as numpy views (train.load_rows -> kd_train.read_parquet) and the collator
    takes the dataset's row indices: every batch equals the one collated from the same rows as Python lists
    (as a .jsonl file gives them), and each distinct prompt is rendered once with the same ids."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from synth.kd_train import Collator, tokenize
    from synth.stages.export import _write_atomic
    from synth.train import load_rows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    records = _kd_records(tok)
    _write_atomic(tmp_path / "kd.parquet", records, "kd")
    rows = load_rows(tmp_path / "kd.parquet", "kd")
    assert isinstance(rows[0]["teacher_ids"], np.ndarray) and rows[0]["teacher_ids"].shape == (5, 3)
    as_lists = [{c: r[c] for c in ("prompt", "completion_ids", "teacher_ids", "teacher_logprobs")} for r in records]
    for max_length in (128, 20):  # 20: some completions cut
        arrays, ready = tokenize(rows, tok, max_length)
        lists, ready_lists = tokenize(as_lists, tok, max_length)
        assert ready == ready_lists and (max_length == 128) == (ready["truncated"] == 0)
        by_index = Collator(tok.pad_token_id, arrays)([{"row": i} for i in range(len(arrays))])
        by_example = Collator(tok.pad_token_id)(lists)
        assert by_index.keys() == by_example.keys()
        for key in by_index:
            assert by_index[key].dtype == by_example[key].dtype and torch.equal(by_index[key], by_example[key]), key
    prompt = tok.apply_chat_template(records[4]["prompt"], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert arrays[4]["input_ids"][:arrays[4]["prompt_length"]].tolist() == list(prompt)


@pytest.mark.parametrize("damage, expected", [
    ("ragged", r"kd\.parquet: row 2: its positions carry different numbers of teacher_ids; a kd row has the same k"),
    ("empty", r"kd\.parquet: row 3 has no completion_ids: kd data needs columns prompt, completion_ids"),
    ("column", r"kd\.parquet: no column teacher_logprobs: kd data needs columns"),
])
def test_a_damaged_kd_parquet_file_is_one_line_naming_the_row(tiny_model, tmp_path, damage, expected):
    """A row whose positions carry different k, a row without completion ids, a file without a column: one
    SynthError line naming the file and the row (before anything is tokenised)."""
    from transformers import AutoTokenizer

    from synth.errors import SynthError
    from synth.stages.export import _write_atomic
    from synth.train import load_rows

    records = _kd_records(AutoTokenizer.from_pretrained(tiny_model))
    if damage == "ragged":
        records[1]["teacher_ids"][2] = records[1]["teacher_ids"][2][:2]
    elif damage == "empty":
        records[2]["completion_ids"] = []
    _write_atomic(tmp_path / "kd.parquet", records, "kd")
    if damage == "column":
        table = pq.read_table(tmp_path / "kd.parquet")
        pq.write_table(table.drop_columns(["teacher_logprobs"]), tmp_path / "kd.parquet")
    with pytest.raises(SynthError, match=expected) as caught:
        load_rows(tmp_path / "kd.parquet", "kd")
    assert "\n" not in str(caught.value)


def test_a_kd_seed_replica_reuses_the_examples_and_trains_exactly_alike(tiny_model, tmp_path):
    """Two kd trainings of one file in one process: the second reuses the first's examples (nothing read or
    tokenised) and its batches and logged losses are those of a fresh preparation."""
    from transformers import AutoTokenizer

    from synth import train as train_module
    from synth.stages.export import _write_atomic
    from synth.train import fit, prepare

    _write_atomic(tmp_path / "kd.parquet", _kd_records(AutoTokenizer.from_pretrained(tiny_model), lengths=(5, 9) * 6),
                  "kd")
    recipe = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
              "max_length": 64, "seed": 0, "kd": {"alpha": 0.5}}
    train_module._TOKENISED.clear()
    first = prepare("kd", tmp_path / "kd.parquet", str(tiny_model), recipe, tmp_path / "r0")
    again = prepare("kd", tmp_path / "kd.parquet", str(tiny_model), {**recipe, "seed": 1}, tmp_path / "r1")
    train_module._TOKENISED.clear()
    fresh = prepare("kd", tmp_path / "kd.parquet", str(tiny_model), {**recipe, "seed": 1}, tmp_path / "r2")
    assert (first.data_reused, again.data_reused, fresh.data_reused) == (False, True, False)
    batches = [[{k: v.tolist() for k, v in b.items()} for b in p.trainer.get_train_dataloader()] for p in (again, fresh)]
    assert batches[0] == batches[1] and len(batches[0]) == 3
    logs = [[e["loss"] for e in fit(p, tmp_path / n, tmp_path / n / "ckpt")["log"] if "loss" in e]
            for p, n in ((again, "r1"), (fresh, "r2"))]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_kd_data_bench_quick():
    """bench/kd_data.py --quick: both data paths give the same batches, and its JSON line closes the output."""
    result = bench_quick("kd_data.py")
    assert result["bench"] == "kd_data" and result["value"] > 0 and result["baseline"] > 0 and result["rows"] == 200


def test_a_kd_export_writes_the_same_files_from_arrays_as_from_lists(tiny_model, tmp_path):
    """kd_records hands the writers numpy arrays; Parquet, JSON lines and a saved dataset directory hold
    exactly what the same rows as Python lists give (the float log-probs as float32 in Parquet, as before)."""
    import numpy as np
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from synth.stages.export import _write_atomic, _write_dataset_dir

    lists = _kd_records(AutoTokenizer.from_pretrained(tiny_model))
    arrays = [{**r, **{c: np.asarray(r[c], dtype=np.float64 if "logprobs" in c else np.int64)
                       for c in ("completion_ids", "logprobs", "teacher_ids", "teacher_logprobs")}} for r in lists]
    for name, records in (("lists", lists), ("arrays", arrays)):
        _write_atomic(tmp_path / name / "kd.parquet", records, "kd")
        _write_atomic(tmp_path / name / "kd.jsonl", records, "kd")
        _write_dataset_dir(tmp_path / name / "kd", records, "kd", "card")
    assert pq.read_table(tmp_path / "arrays" / "kd.parquet").equals(pq.read_table(tmp_path / "lists" / "kd.parquet"))
    assert (tmp_path / "arrays" / "kd.jsonl").read_text() == (tmp_path / "lists" / "kd.jsonl").read_text()
    assert load_from_disk(str(tmp_path / "arrays" / "kd")).to_list() == load_from_disk(str(tmp_path / "lists" / "kd")).to_list()
