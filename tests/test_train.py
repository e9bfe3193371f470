"""synth.train on a real tiny student: SFT then DPO with TRL, recipe validation, readiness, LoRA.

    .venv/bin/python -m pytest -q tests/test_train.py      (~20 s on 2 cores, most of it imports)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from synth.errors import SynthError
from synth.tiny import build_model
from synth.train import load_recipe, readiness, train

REPO = Path(__file__).resolve().parent.parent
THINK_ROWS = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def student(work) -> Path:
    return build_model(work / "student")


def _sums(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return a, b, f"What is {a}+{b}?"


@pytest.fixture(scope="module")
def sft_data(work) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(64):
        a, b, question = _sums(rng)
        think = "<think>add the numbers</think> " if i < THINK_ROWS else ""
        answer = f"{think}{a}+{b}={a + b}. \\boxed{{{a + b}}}"
        rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]})
    path = work / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def dpo_data(work) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    rows = []
    for _ in range(32):
        a, b, question = _sums(rng)
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": f"{a}+{b}={a + b}. \\boxed{{{a + b}}}"}],
                     "rejected": [{"role": "assistant", "content": f"{a}+{b}={a + b + 1}. \\boxed{{{a + b + 1}}}"}]})
    path = work / "dpo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def _changed(before: dict, after: dict) -> list[str]:
    import torch

    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def _losses(result) -> list[float]:
    return [e["loss"] for e in result["log"] if "loss" in e]


@pytest.fixture(scope="module")
def sft_result(work, student, sft_data):
    calls = []
    result = train("sft", sft_data, str(student), load_recipe(REPO / "train/sft-tiny.yaml", "sft"), work / "sft",
                   on_log=lambda step, logs: calls.append((step, logs)))
    result["calls"] = calls
    return result


def test_sft_changes_parameters_and_loss_goes_down(student, sft_result):
    result = sft_result
    assert result["steps"] == 30 and Path(result["model_dir"]).is_dir()
    before, after = _weights(student), _weights(result["model_dir"])
    changed = _changed(before, after)
    # Every weight matrix moves (embedding rows of unseen tokens may not, so check the layers).
    layers = [k for k in before if ".layers." in k]
    assert layers and all(k in changed for k in layers), sorted(set(layers) - set(changed))
    losses = _losses(result)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    # on_log saw every logging event, with its step
    assert [s for s, logs in result["calls"] if "loss" in logs] == list(range(1, 31))
    assert result["train_loss"] > 0 and result["seconds"] > 0 and result["tokens_per_s"] > 0
    assert result["peak_memory_mb"] is None  # CPU
    ready = result["readiness"]
    assert ready["rows"] == 64 and ready["truncated"] == 0 and ready["think_tags"] == THINK_ROWS
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(result["model_dir"]).chat_template  # saved with the model


def test_dpo_from_sft_changes_parameters_and_logs_loss(work, student, dpo_data, sft_result):
    recipe = load_recipe(REPO / "train/dpo-tiny.yaml", "dpo")
    result = train("dpo", dpo_data, str(student), recipe, work / "dpo", init=sft_result["model_dir"])
    assert result["steps"] == 20
    before, after = _weights(sft_result["model_dir"]), _weights(result["model_dir"])
    assert [k for k in _changed(before, after) if ".layers." in k]
    losses = _losses(result)
    assert len(losses) == 20 and all(loss == loss for loss in losses)  # logged, not NaN
    assert abs(losses[0] - 0.6931) < 0.01  # step 1: policy == reference, so the loss is log 2
    assert any("rewards/margins" in e for e in result["log"])
    assert result["readiness"]["rows"] == 32


def test_same_seed_same_run(work, student, sft_data):
    recipe = dict(load_recipe(REPO / "train/sft-tiny.yaml", "sft"), max_steps=4)
    a = train("sft", sft_data, str(student), recipe, work / "seed-a")
    b = train("sft", sft_data, str(student), recipe, work / "seed-b")
    assert _losses(a) == _losses(b)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_recipe_rejects_unknown_and_mistyped_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("learning_rat: 1e-4\nmax_steps: 3\n")
    with pytest.raises(SynthError) as exc:
        load_recipe(path, "sft")
    message = _one_line_error(exc)
    assert str(path) in message and "'learning_rat'" in message and "'learning_rate'" in message

    path.write_text("beta: 0.1\n")  # a DPO field is not an SFT field
    with pytest.raises(SynthError, match="unknown key 'beta'"):
        load_recipe(path, "sft")

    path.write_text("max_steps: ten\n")
    with pytest.raises(SynthError, match="'max_steps' must be an integer") as exc:
        load_recipe(path, "sft")
    _one_line_error(exc)

    path.write_text("lora: {r: 8, alpha: 16, dropuot: 0.1}\n")
    with pytest.raises(SynthError, match="'lora.dropuot'.*'dropout'"):
        load_recipe(path, "sft")

    path.write_text("lr_scheduler_type: sideways\n")  # TRL's own value check, as one line
    with pytest.raises(SynthError, match="sideways") as exc:
        load_recipe(path, "sft")
    _one_line_error(exc)

    path.write_text("output_dir: elsewhere\n")
    with pytest.raises(SynthError, match="output_dir"):
        load_recipe(path, "sft")

    # YAML 1.1 reads 5e-4 as a string; a float field takes it as the number it means
    path.write_text("learning_rate: 5e-4\nloss_type: sigmoid\nbeta: 0.2\n")
    assert load_recipe(path, "dpo") == {"learning_rate": 5e-4, "loss_type": ["sigmoid"], "beta": 0.2}


def test_readiness_counts_truncation_and_train_refuses(work, student, sft_data):
    full = readiness(sft_data, str(student), "sft", 256)
    assert full["truncated"] == 0 and full["rows"] == 64 and full["p50"] <= full["p90"] <= full["max"]
    # rows with <think> are the longest; cut between the plain rows and them
    short = readiness(sft_data, str(student), "sft", full["p50"])
    assert 0 < short["truncated"] < 64 and short["truncated_share"] == short["truncated"] / 64
    assert short["think_tags"] == THINK_ROWS

    recipe = dict(load_recipe(REPO / "train/sft-tiny.yaml", "sft"), max_length=8)
    with pytest.raises(SynthError) as exc:
        train("sft", sft_data, str(student), recipe, work / "refused")
    message = _one_line_error(exc)
    assert "64 of 64 rows" in message and "max_length 8" in message and "raise max_length" in message
    assert not (work / "refused" / "model").exists()


def test_lora_merges_into_a_loadable_model(work, student, sft_data):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    recipe = dict(load_recipe(REPO / "train/sft-tiny.yaml", "sft"), max_steps=10,
                  lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})
    result = train("sft", sft_data, str(student), recipe, work / "lora")
    weights = _weights(result["model_dir"])
    assert not [k for k in weights if "lora" in k]
    assert [k for k in _changed(_weights(student), weights) if "q_proj" in k]
    model = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    assert type(model).__name__ == "LlamaForCausalLM"


# --------------------------------------------------------------------------------------------------
# assistant_only_loss on a chat template without {% generation %} markers (synth.train.loss_mask)

MASK_ROWS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3=5. \\boxed{5}"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 4+4?"},
     {"role": "assistant", "content": "\\boxed{8}"}],
    [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "EARLIER TURN 2"},
     {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "2+2=4. \\boxed{4}"}],
]


@pytest.fixture(scope="module")
def plain_student(work, student) -> Path:
    """The tiny student with its {% generation %} markers taken out of the chat template."""
    import shutil

    out = work / "plain-student"
    shutil.copytree(student, out)
    template = (out / "chat_template.jinja").read_text()
    assert "{% generation %}" in template
    plain = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (out / "chat_template.jinja").write_text(plain)
    return out


def _mask_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in MASK_ROWS))
    return path


def _labelled(model_dir: Path, data: Path, out: Path) -> tuple[str | None, list[tuple[list[int], list[int]]]]:
    """synth.train.prepare's trainer on `data` with assistant_only_loss: its loss mask mode and, per row in
    data order, the collated batch's (input_ids, labels) without padding."""
    from synth.train import prepare

    recipe = {"assistant_only_loss": True, "max_steps": 1, "max_length": 512, "per_device_train_batch_size": 4,
              "logging_steps": 1}
    prepared = prepare("sft", data, str(model_dir), recipe, out)
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    rows = []
    for ids, labels, attention in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                      batch["attention_mask"].tolist()):
        keep = [i for i, a in enumerate(attention) if a]
        rows.append(([ids[i] for i in keep], [labels[i] for i in keep]))
    return prepared.loss_mask, rows


def _assert_only_the_final_answer_counts(tokenizer, rows, end: str) -> None:
    for messages, (ids, labels) in zip(MASK_ROWS, rows):
        counted = [i for i, label in enumerate(labels) if label != -100]
        assert counted, messages
        # one run of positions at the end of the sequence (give or take the template's trailing newline)
        assert counted == list(range(counted[0], counted[-1] + 1))
        assert tokenizer.decode(ids[counted[-1] + 1:]).strip() == ""
        assert all(labels[i] == ids[i] for i in counted)
        text = tokenizer.decode([ids[i] for i in counted])
        assert text.strip() == messages[-1]["content"] + end, text
        prompt = tokenizer.decode(ids[:counted[0]])
        assert messages[-2]["content"] in prompt and "EARLIER TURN" not in text


def test_assistant_only_loss_without_markers_counts_only_the_final_assistant_turn(work, student, plain_student):
    """A student whose chat template has no {% generation %} markers trains on prompt-completion rows:
    in the collated batch every prompt position (system, user, earlier turns, the assistant header) is
    -100 and exactly the final assistant turn and its end-of-turn token count; the same tokens the marker
    template counts on the same data."""
    from transformers import AutoTokenizer

    from synth.train import check_recipe

    data = _mask_data(work / "mask.jsonl")
    mode, rows = _labelled(plain_student, data, work / "mask-plain")
    assert mode == "completion"
    tokenizer = AutoTokenizer.from_pretrained(plain_student)
    _assert_only_the_final_answer_counts(tokenizer, rows, "<|end|>")

    marked_mode, marked = _labelled(student, data, work / "mask-marked")
    assert marked_mode == "markers"
    for (ids, labels), (marked_ids, marked_labels) in zip(rows[:2], marked[:2]):  # single-turn rows: the same loss
        plain = [t for t, label in zip(ids, labels) if label != -100]
        marks = [t for t, label in zip(marked_ids, marked_labels) if label != -100]
        # the prompt-completion split also counts the template's newline after <|end|>
        assert plain[:len(marks)] == marks and tokenizer.decode(plain[len(marks):]).strip() == ""

    recipe = work / "aol.yaml"
    recipe.write_text("assistant_only_loss: true\n")
    assert check_recipe(recipe, "sft", plain_student) == {"assistant_only_loss": True}  # no longer refused


def test_assistant_only_loss_without_markers_trains(work, plain_student, sft_data):
    recipe = dict(load_recipe(REPO / "train/sft-tiny.yaml", "sft"), max_steps=3)
    assert recipe["assistant_only_loss"] is True
    result = train("sft", sft_data, str(plain_student), recipe, work / "plain-sft")
    assert result["loss_mask"] == "completion" and result["steps"] == 3
    assert len(_losses(result)) == 3 and all(loss > 0 for loss in _losses(result))
    assert _changed(_weights(plain_student), _weights(result["model_dir"]))


def test_assistant_only_loss_refuses_rows_without_a_final_assistant_turn(work, plain_student):
    data = work / "no-answer.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                                             {"role": "user", "content": "and?"}]}) + "\n")
    with pytest.raises(SynthError, match="row 1: assistant_only_loss trains on the final assistant turn") as exc:
        train("sft", data, str(plain_student), {"assistant_only_loss": True, "max_steps": 1}, work / "no-answer")
    _one_line_error(exc)


@pytest.mark.slow
def test_assistant_only_loss_on_the_real_model_s_template(work, real_model):
    """SmolLM2-135M-Instruct's ChatML template has no markers: only the final answer and <|im_end|> count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    assert "generation" not in tokenizer.chat_template.replace("add_generation_prompt", "")
    mode, rows = _labelled(real_model, _mask_data(work / "mask-real.jsonl"), work / "mask-real")
    assert mode == "completion"
    _assert_only_the_final_answer_counts(tokenizer, rows, "<|im_end|>")
