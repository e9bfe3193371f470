"""synth/sft_train.py: SFT's loss by synth's chunked CE on CPU equals TRL's own loss, on a real tiny student
built by prepare() exactly as a train stage builds it (TRL's SFTTrainer, its collator, its batches).

    .venv/bin/python -m pytest -q tests/test_sft_train.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import arithmetic_sft, bench_quick
from synth.train import prepare, train

RECIPE = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
          "max_length": 64, "seed": 0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft_train")


@pytest.fixture(scope="module")
def data(work) -> Path:
    return arithmetic_sft(work / "sft.jsonl", 24, most_checks=3)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe_extra", [{}, {"assistant_only_loss": True}], ids=["all_tokens", "assistant_only"])
def test_chunked_loss_and_gradients_equal_trls(work, tiny_model, data, recipe_extra):
    """The same trainer, the same batch: synth's compute_loss and TRL's give the same loss and the same
    gradient for every parameter, with the Trainer's num_items_in_batch (tokens over accumulated batches)
    and without it (the batch's own count). Prompt and padding positions are in the batch: TRL's head masks
    them, ours never scores them."""
    import torch
    from trl import SFTTrainer

    prepared = prepare("sft", data, str(tiny_model), {**RECIPE, **recipe_extra}, work / f"out-{len(recipe_extra)}")
    trainer = prepared.trainer
    assert trainer.trl_loss_reason is None
    batch = next(iter(trainer.get_train_dataloader()))
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < targets < batch["labels"][:, 1:].numel()  # some positions are masked: the test means something
    model = trainer.model.train()
    for count in (None, torch.tensor(3 * targets)):
        model.zero_grad(set_to_none=True)
        ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
        ours.backward()
        ours_grads = _grads(model)
        model.zero_grad(set_to_none=True)
        theirs = SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=count)
        theirs.backward()
        theirs_grads = _grads(model)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
        assert ours_grads.keys() == theirs_grads.keys() and ours_grads
        for name, g in theirs_grads.items():
            torch.testing.assert_close(ours_grads[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-9,
                                       msg=lambda m: f"{name}: {m}")


def test_training_with_the_chunked_loss_logs_what_trl_does(work, tiny_model, data, monkeypatch):
    """Three steps with each loss from the same seed: the same train_loss (to float rounding) and the same
    num_tokens log (TRL's count of non-padding tokens), so a stage's tokens_per_s is unchanged."""
    import synth.sft_train as sft_train

    ours = train("sft", data, str(tiny_model), RECIPE, work / "fit-ours")
    monkeypatch.setattr(sft_train, "chunked_ce_reason", lambda trainer: "forced by the test")
    theirs = train("sft", data, str(tiny_model), RECIPE, work / "fit-trl")
    assert ours["steps"] == theirs["steps"] == 3
    assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    tokens = [[e["num_tokens"] for e in r["log"] if "num_tokens" in e] for r in (ours, theirs)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 3 and tokens[0][-1] > 0
    # TRL's per-token metrics are TRL's loss's own; the chunked loss does not compute them
    assert any("mean_token_accuracy" in e for e in theirs["log"])
    assert not any("mean_token_accuracy" in e for e in ours["log"])


@pytest.mark.parametrize("recipe_extra, reason", [({"label_smoothing_factor": 0.1}, "label smoothing"),
                                                  ({"loss_type": "dft"}, "loss_type dft")],
                         ids=["label_smoothing", "dft"])
def test_losses_other_than_plain_nll_keep_trls(work, tiny_model, data, recipe_extra, reason):
    """A recipe whose loss is not next-token NLL trains with TRL's compute_loss, untouched."""
    prepared = prepare("sft", data, str(tiny_model), {**RECIPE, **recipe_extra}, work / f"keep-{reason[:5]}")
    assert prepared.trainer.trl_loss_reason == reason


def _fresh_prepare(*args, **kwargs):
    """prepare() with nothing tokenised before in this process."""
    from synth import train as train_module

    train_module._TOKENISED.clear()
    return prepare(*args, **kwargs)


@pytest.mark.parametrize("recipe_extra", [{}, {"assistant_only_loss": True}], ids=["all_tokens", "assistant_only"])
def test_a_seed_replica_reuses_the_tokenised_data_and_trains_exactly_alike(work, tiny_model, data, recipe_extra):
    """Seed replicas in one process (a worker of `synth run --jobs N`): the second prepare() reuses the
    first's tokenised data (TRL's preparation skipped) and its trainer is the one a fresh preparation builds:
    the same dataset, the same batches, the same logged losses over a short training; with the assistant-only
    loss too (loss_mask: the same mask, the same recipe keys)."""
    from synth.train import fit

    recipe, tag = {**RECIPE, **recipe_extra}, f"replica-{len(recipe_extra)}"
    first = _fresh_prepare("sft", data, str(tiny_model), {**recipe, "seed": 0}, work / f"{tag}-0")
    again = prepare("sft", data, str(tiny_model), {**recipe, "seed": 1}, work / f"{tag}-1")
    fresh = _fresh_prepare("sft", data, str(tiny_model), {**recipe, "seed": 1}, work / f"{tag}-1-fresh")
    assert (first.data_reused, again.data_reused, fresh.data_reused) == (False, True, False)
    assert again.ready == fresh.ready and again.loss_mask == fresh.loss_mask
    assert again.trainer.train_dataset.to_list() == fresh.trainer.train_dataset.to_list()
    batches = [[{k: v.tolist() for k, v in b.items()} for b in p.trainer.get_train_dataloader()] for p in (again, fresh)]
    assert batches[0] == batches[1] and len(batches[0]) > 1
    logs = [[e["loss"] for e in fit(p, work / name, work / name / "ckpt")["log"] if "loss" in e]
            for p, name in ((again, f"{tag}-1"), (fresh, f"{tag}-1-fresh"))]
    assert logs[0] == logs[1] and len(logs[0]) == 3


@pytest.mark.parametrize("change", ["data", "max_length", "student", "seed_with_shuffle"])
def test_data_tokenised_under_other_inputs_is_never_reused(work, tiny_model, data, change):
    """What the tokenised data depends on, changed between two trainings of one process, makes the second
    tokenise afresh: the data file's bytes, a recipe key (max_length), the student (another directory with
    the same weights), the seed where TRL's preparation reads it (shuffle_dataset)."""
    import shutil

    path, student, recipe = work / f"changed-{change}.jsonl", work / f"student-{change}", dict(RECIPE)
    path.write_text(data.read_text())
    if change == "seed_with_shuffle":
        recipe["shuffle_dataset"] = True
    _fresh_prepare("sft", path, str(tiny_model), recipe, work / f"change-{change}-0")
    model = tiny_model
    if change == "data":
        path.write_text(data.read_text().replace("What is", "What's", 1))
    elif change == "max_length":
        recipe["max_length"] = 60
    elif change == "student":
        model = shutil.copytree(tiny_model, student)
    else:
        recipe["seed"] = 1
    assert not prepare("sft", path, str(model), recipe, work / f"change-{change}-1").data_reused


def test_bench_quick():
    """bench/sft_step.py --quick times both losses on one trainer and ends with its JSON line."""
    result = bench_quick("sft_step.py")
    assert result["bench"] == "sft_step" and result["value"] > 0 and result["baseline"] > 0
    assert result["loss_chunked"] == pytest.approx(result["loss_trl"], rel=1e-4)


def test_padded_batches_are_trls_batches_and_train_bit_identically(work, tiny_model, data, monkeypatch):
    """PaddedBatches (numpy) gives TRL's collator's tensors exactly (keys, dtypes, values) on the trainer's own
    examples, with labels and without (labels default to input_ids); a collator it does not reproduce is kept;
    and a short training with each collator ends in bit-identical weights."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import synth.sft_train as sft_train

    prepared = prepare("sft", data, str(tiny_model), {**RECIPE, "assistant_only_loss": True}, work / "padded")
    trainer = prepared.trainer
    assert isinstance(trainer.data_collator, sft_train.PaddedBatches)
    trl_collator = trainer.data_collator.trl_collator
    examples = trainer.train_dataset.to_list()
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of several lengths: padding happens
    for batch in (examples[:5], examples[3:4], [{"input_ids": e["input_ids"]} for e in examples[:6]]):
        ours, theirs = trainer.data_collator(batch), trl_collator(batch)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    for kept in (DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True),
                 DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=8), lambda batch: batch):
        assert sft_train.padded_batches(kept) is kept

    def weights(name: str) -> dict:
        result = train("sft", data, str(tiny_model), {**RECIPE, "max_steps": 4}, work / name)
        from safetensors.torch import load_file
        return load_file(str(Path(result["model_dir"]) / "model.safetensors"))

    ours = weights("padded-ours")
    monkeypatch.setattr(sft_train, "padded_batches", lambda collator: collator)
    theirs = weights("padded-trl")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_collate_bench_quick():
    """bench/sft_collate.py --quick checks both collators build the same batches and ends with its JSON line."""
    result = bench_quick("sft_collate.py")
    assert result["bench"] == "sft_collate" and result["value"] > 0 and result["baseline"] > 0 and result["step_s"] > 0
