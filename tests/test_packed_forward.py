"""synth/packed_forward.py: a right-padded training batch runs through the student on its real tokens only,
with the same hidden states and gradients as the padded forward — on real transformers models (Llama, a
grouped-query Llama, Qwen3), random weights, and through a real TRL training (SFT and KD); batches and models
it must not pack are left to the padded forward; a model it gets wrong is caught on its first batch.

    .venv/bin/python -m pytest -q tests/test_packed_forward.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

import synth.packed_forward as packed_forward
from conftest import arithmetic_sft, bench_quick
from synth.kd_train import completion_hidden

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def _model(kind: str):
    """A random-weight causal LM from a config: no tokenizer needed (the ids are random)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

    torch.manual_seed(0)
    shape = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 128, "pad_token_id": 0}
    config = {"llama": lambda: LlamaConfig(**shape, num_key_value_heads=4),
              "llama_gqa": lambda: LlamaConfig(**shape, num_key_value_heads=2),
              "qwen3": lambda: Qwen3Config(**shape, num_key_value_heads=2, head_dim=8),
              "mistral_window": lambda: MistralConfig(**shape, num_key_value_heads=2, sliding_window=16)}[kind]()
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()


def _batch(lengths: list[int], length: int, *, left: bool = False, vocab: int = 97, seed: int = 0) -> dict:
    """Right-padded (or left-padded) ids, mask and labels: every real position after the first is a target."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(length - n, length) if left else slice(0, n)
        ids[i, cols] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, cols] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    import torch

    model.zero_grad(set_to_none=True)
    h, weight, labels, kept = completion_hidden(model, batch)
    loss = torch.nn.functional.cross_entropy(h @ weight.T, labels[kept])
    loss.backward()
    return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "llama_gqa", "qwen3"])
def test_the_packed_forward_gives_the_padded_forwards_hidden_states_and_gradients(kind):
    """Rows of 3 to 23 tokens padded to 23: the hidden states of every target position and the gradient of
    every parameter are the padded forward's (float32 rounding). The model is verified on its first batch
    and packs from then on; the padded run is the same model with packing switched off."""
    import torch

    model = _model(kind)
    batch = _batch([23, 7, 3, 15, 11], 23)
    packed_h, packed_g = _loss_and_grads(model, batch)
    assert getattr(model, packed_forward._STATE) is True
    setattr(model, packed_forward._STATE, False)
    padded_h, padded_g = _loss_and_grads(model, batch)
    torch.testing.assert_close(packed_h, padded_h, rtol=1e-5, atol=1e-6)
    assert packed_g.keys() == padded_g.keys() and packed_g
    for name, g in padded_g.items():
        torch.testing.assert_close(packed_g[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_the_packed_forward_runs_on_the_real_tokens_only(monkeypatch):
    """What makes it faster: the decoder sees one row of the batch's real tokens (44 of 5 x 23), positions
    restarting at 0 for each sequence, and each attention call re-pads to the batch's rows."""
    model = _model("llama")
    batch = _batch([23, 7, 3, 4, 7], 23)
    seen, attention_shapes = [], []
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (tuple(kwargs["input_ids"].shape), kwargs.get("position_ids"))), with_kwargs=True)
    real_attention = packed_forward._attention

    def spy(module, query, key, value, mask, **kw):
        out = real_attention(module, query, key, value, mask, **kw)
        attention_shapes.append((tuple(query.shape), tuple(out[0].shape)))
        return out

    monkeypatch.setattr(packed_forward, "_attention", spy)
    completion_hidden(model, batch)  # the first batch: verified (padded, then packed, in eval mode), then packed
    shapes = [s for s, _ in seen]
    assert shapes == [(5, 23), (1, 44), (1, 44)]
    positions = seen[-1][1][0].tolist()
    assert positions == list(range(23)) + list(range(7)) + list(range(3)) + list(range(4)) + list(range(7))
    assert attention_shapes[-1] == ((1, 4, 44, 8), (1, 44, 4, 8))
    assert model.training  # the verification put it back in training mode


@pytest.mark.parametrize("case", ["left_padded", "no_padding", "eager_attention", "sliding_window",
                                  "target_on_padding"])
def test_batches_and_models_it_must_not_pack_take_the_padded_forward(case):
    """Left padding (the real tokens do not start each row), no padding at all (nothing to save), an
    attention implementation the user chose, a sliding window (re-padded causal attention would see past it),
    and a target after a padding position: the padded forward runs, and no verification is spent."""
    import torch

    model = _model("mistral_window" if case == "sliding_window" else "llama")
    batch = _batch([9, 5, 7], 9, left=case == "left_padded") if case != "no_padding" else _batch([9, 9], 9)
    if case == "eager_attention":
        model.set_attn_implementation("eager")
    if case == "target_on_padding":
        batch["labels"][1, 6] = 3  # row 1 has 5 real tokens: position 5's hidden state would predict it
    h, _, labels, kept = completion_hidden(model, batch)
    assert getattr(model, packed_forward._STATE, None) is None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert h.shape[0] == int(kept.sum())
    torch.testing.assert_close(h @ model.lm_head.weight.T, logits[:, :-1].reshape(-1, logits.shape[-1])[kept])


def test_a_model_the_packed_forward_gets_wrong_trains_padded_with_one_warning(monkeypatch, capsys):
    """A packed attention that let sequences see each other (as a model whose attention ignores transformers'
    attention interface would): the first batch's check finds the hidden states differ, one warning line
    says the model trains on padded batches, and every batch after takes the padded forward unchecked."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def leaky(module, query, key, value, mask, dropout=0.0, scaling=None, **kw):
        kw.pop("synth_segments")
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True)

    monkeypatch.setattr(packed_forward, "_attention", leaky)
    model = _model("llama")
    batch = _batch([12, 5, 9], 12)
    h, _, _, kept = completion_hidden(model, batch)
    assert getattr(model, packed_forward._STATE) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training llama on padded batches" in err and "differ" in err
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(h @ model.lm_head.weight.T, logits[:, :-1].reshape(-1, logits.shape[-1])[kept])
    completion_hidden(model, _batch([4, 9], 9, seed=1))
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return arithmetic_sft(tmp_path_factory.mktemp("packed") / "sft.jsonl", 32, most_checks=4)


def test_an_sft_training_packs_and_logs_what_the_padded_training_does(tiny_model, sft_data, tmp_path):
    """Four TRL SFT steps (synth's chunked CE, assistant-only loss) from the same seed, packed and padded: the
    student packed (its check passed on the first batch) and every logged loss is the padded run's."""
    from synth.train import fit, prepare

    recipe = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
              "max_length": 64, "seed": 0, "assistant_only_loss": True}
    logs = {}
    for mode in ("packed", "padded"):
        prepared = prepare("sft", sft_data, str(tiny_model), recipe, tmp_path / mode)
        if mode == "padded":
            setattr(prepared.trainer.model, packed_forward._STATE, False)
        fit(prepared, tmp_path / mode, tmp_path / mode / "checkpoints")
        assert getattr(prepared.trainer.model, packed_forward._STATE) is (mode == "packed")
        logs[mode] = [e["loss"] for e in prepared.log if "loss" in e]
    assert len(logs["packed"]) == 4
    assert logs["packed"] == pytest.approx(logs["padded"], rel=1e-5)


def test_bench_quick():
    """bench/packed_forward.py --quick times both forwards on one trainer and ends with its JSON line."""
    result = bench_quick("packed_forward.py")
    assert result["bench"] == "packed_forward" and result["value"] > 0 and result["baseline"] > 0
    assert 0 < result["padding_share"] < 1
    assert result["loss_packed"] == pytest.approx(result["loss_padded"], rel=1e-5)
