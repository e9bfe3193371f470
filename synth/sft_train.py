"""`method: sft` on TRL's SFTTrainer, with the cross-entropy computed by synth's chunked loss on CPU.

Why: TRL's SFTTrainer computes its loss with a fused LM head (trl's ChunkedLogProbFunction). On a Triton
device it scores the target positions only; everywhere else it scores every position of the batch,
prompt and padding included, and computes each one's entropy and top-1 for its metrics. On the demo's
CPU student that was ~43 ms of a 132 ms step (py-spy). kd_loss with alpha 1 is the same loss (the mean
negative log-likelihood of the next token, chunked, never the batch x length x vocabulary logits) over
the target positions only: ~0.66x TRL's forward + backward on a student of the demo's shape, one CPU
thread (bench/sft_step.py).

Contract: `ChunkedSFTTrainer` is TRL's SFTTrainer. Its compute_loss is TRL's own unless
`chunked_ce_reason` finds nothing that makes the two losses differ (`trl_loss_reason` says what kept
TRL's, None when the chunked CE is used). Where used, it returns what TRL's would, to float rounding:
sum of -log p(target) over the batch's target positions / num_items_in_batch (the Trainer's count of
target tokens over the accumulated batches and ranks; the batch's own count without it), times the
number of processes when average_tokens_across_devices (as TRL does), and it keeps TRL's `num_tokens`
bookkeeping. It does not log TRL's per-token `entropy` and `mean_token_accuracy` (their computation is
what it saves). Off CPU TRL's loss stays: its Triton head is the fast path there, unmeasured against ours.
torch/trl are imported inside (seconds).
"""

from __future__ import annotations

from synth.errors import SynthError
from synth.kd_train import completion_hidden, student_parts


def chunked_ce_reason(trainer) -> str | None:
    """Why `trainer` (an SFTTrainer, built) must keep TRL's compute_loss, or None when synth's chunked CE
    computes the same loss. Anything TRL's loss does beyond plain next-token NLL keeps TRL's."""
    args = trainer.args
    model = trainer.model
    if args.device.type != "cpu":
        return f"the student trains on {args.device.type}: TRL's fused LM head"
    if args.loss_type != "nll":
        return f"loss_type {args.loss_type}"
    if getattr(trainer, "label_smoother", None) is not None:
        return "label smoothing"
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "a compute_loss_func"
    if getattr(trainer, "aux_loss_enabled", False):
        return "a mixture-of-experts auxiliary loss"
    if getattr(trainer, "padding_free", False):
        return "padding-free batches"
    if getattr(trainer, "_is_vision_dataset", False):
        return "a vision dataset"
    if getattr(args, "use_liger_kernel", False):
        return "use_liger_kernel"
    if trainer.accelerator.parallelism_config is not None:
        return "a parallelism config (context, sequence or tensor parallel)"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "PEFT prompt learning (virtual tokens)"
    try:
        student_parts(model)  # logits = hidden @ lm_head.weight, no bias, no scaling
    except SynthError as exc:
        return str(exc)
    return None


class PaddedBatches:
    """TRL's DataCollatorForLanguageModeling in its plain form (right padding, an attention mask, no
    padding_free, position ids or pad_to_multiple_of), the same tensors (int64 input_ids padded with the pad
    id, labels with -100, attention_mask 1 on real tokens), filled in numpy: TRL's builds one tensor per
    example and field, 1.26 ms of a 56 ms step of the demo's CPU student where this takes 0.15 ms
    (bench/sft_collate.py). A batch of packed sequences (`seq_lengths`) goes to TRL's collator, as it is."""

    def __init__(self, trl_collator):
        self.trl_collator = trl_collator
        self.pad = trl_collator.pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import numpy as np
        import torch

        if "seq_lengths" in examples[0]:
            return self.trl_collator(examples)
        width = max(len(e["input_ids"]) for e in examples)
        ids = np.full((len(examples), width), self.pad, dtype=np.int64)
        labels = np.full((len(examples), width), -100, dtype=np.int64)
        mask = np.zeros((len(examples), width), dtype=np.int64)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e.get("labels", e["input_ids"]), 1
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(mask)}


def padded_batches(collator):
    """`collator`, or PaddedBatches in its place when it is TRL's language-modeling collator in the plain form
    PaddedBatches reproduces (a user's collator, or TRL's for vision or padding-free batches, is kept)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    plain = (type(collator) is DataCollatorForLanguageModeling and not collator.padding_free
             and not collator.return_position_ids and collator.pad_to_multiple_of is None
             and collator.return_tensors == "pt" and collator.pad_token_id is not None)
    return PaddedBatches(collator) if plain else collator


def sft_trainer_class():
    """ChunkedSFTTrainer, built on first use (importing TRL takes seconds)."""
    import torch
    from trl import SFTTrainer

    from synth.kd_loss import SparseTargets, kd_loss

    class ChunkedSFTTrainer(SFTTrainer):
        """SFTTrainer whose compute_loss is synth's chunked CE where chunked_ce_reason allows (module doc)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trl_loss_reason = chunked_ce_reason(self)
            self.data_collator = padded_batches(self.data_collator)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.trl_loss_reason is not None or return_outputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            h, weight, labels, kept = completion_hidden(model, inputs, self.accelerator.unwrap_model(model))
            targets = labels[kept]
            # CE alone (alpha 1): the teacher targets are one padding entry per position, never read
            sparse = SparseTargets(labels=targets, top_ids=targets[:, None],
                                   top_logprobs=torch.full((targets.shape[0], 1), -torch.inf, device=h.device))
            mean = kd_loss(h, weight, sparse, alpha=1.0)
            n = targets.shape[0]
            count = n if num_items_in_batch is None else num_items_in_batch
            loss = mean * n / torch.as_tensor(count, device=mean.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if mode == "train":  # TRL's token count: every non-padding token, all ranks together
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return ChunkedSFTTrainer
