"""`method: kd`: token-level distillation on TRL's trainer machinery.

Data: a `format: kd` export (synth/stages/export.py, kd_records): per row the prompt turns, the
completion's token ids (exactly as the teacher wrote or scored them: never re-tokenised) and, per
completion position, the teacher's top-k token ids and log-probs. The prompt is rendered with the
student's chat template (the generation prompt added), then the completion ids follow; the student must
share the teacher's vocabulary (synth.vocab; checked by the train stage before anything runs).

Recipe: TRL's SFTConfig fields (learning rate, steps, batch size, max_length, lora, ...) plus one synth key,

    kd: {alpha: 0.0, temperature: 1.0, divergence: forward_kl, beta: 0.5, chunk_size: 1024, kernel: auto}

loss = alpha * CE + (1 - alpha) * T^2 * D(teacher || student) on completion tokens only (synth/kd_loss.py
states the math: forward KL on the top-k with a tail bucket by default, reverse KL, generalised JSD).
kernel says which implementation computes it (`kernel_choice`): `auto` the fused Triton kernel
(synth/kd_kernel.py) when the student's tensors are on CUDA and triton is installed, else the chunked
PyTorch loss; `triton` that kernel or one SynthError line (at the recipe check when triton is missing,
at train start when there is no CUDA); `torch` the chunked loss (chunk_size applies to it only).

How it sits on TRL: `KDTrainer` is an SFTTrainer whose dataset arrives tokenised (dataset_kwargs
skip_prepare_dataset: this module builds input_ids, labels and the teacher arrays, and truncates to
max_length itself, keeping positions and targets aligned), whose collator pads the teacher arrays with
the batch, and whose compute_loss takes the student's final hidden states (the decoder's output, the
lm_head not applied) and the lm_head weight to `kd_loss`, which computes logits chunk by chunk: the
batch x length x vocabulary logits never exist. Everything else (optimizer, scheduler, checkpoints,
resume, LoRA, logging) is TRL's and transformers' own. torch/trl are imported inside (seconds).

Under DDP (a train stage's `gpus: N`: synth/train_launch.py) the hidden states come from a forward of the
model as the Trainer hands it to compute_loss, i.e. through DistributedDataParallel's own forward (a hook
on the decoder keeps its output; the lm_head runs on the last position only): a call of the unwrapped
decoder skips DDP's forward bookkeeping, and the ranks step on unsynchronised gradients (measured: two
gloo ranks' weights differed after 4 steps). Through the wrapped forward DDP all-reduces the gradients and
the ranks end identical (tests/test_multi_process_train.py).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Any

from synth.errors import SynthError
from synth.packed_forward import packed_hidden

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
KD_DEFAULTS = {"alpha": 0.0, "temperature": 1.0, "divergence": "forward_kl", "beta": 0.5, "chunk_size": 1024,
               "kernel": "auto"}
KERNELS = ("auto", "triton", "torch")
KD_COLUMNS = ("prompt", "completion_ids", "teacher_ids", "teacher_logprobs")


def check_kd(value: Any, at: str) -> dict:
    """The recipe's `kd:` mapping, each key checked (`at`: file:line for the message); defaults filled in."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise SynthError(f"{at}: key 'kd' must be a mapping with keys {', '.join(KD_DEFAULTS)}, got {value!r}")
    out = dict(KD_DEFAULTS)
    for key, v in value.items():
        if key not in KD_DEFAULTS:
            raise SynthError(f"{at}: unknown key 'kd.{key}'; kd takes {', '.join(KD_DEFAULTS)}")
        if key == "divergence":
            if v not in DIVERGENCES:
                raise SynthError(f"{at}: key 'kd.divergence' must be one of {', '.join(DIVERGENCES)}, got {v!r}")
        elif key == "kernel":
            if v not in KERNELS:
                raise SynthError(f"{at}: key 'kd.kernel' must be one of {', '.join(KERNELS)}, got {v!r}")
            if v == "triton" and not triton_installed():  # CUDA is known only with torch imported: at train start
                kernel_choice(v, cuda=True, triton=False, at=at)
        elif key == "chunk_size":
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SynthError(f"{at}: key 'kd.chunk_size' must be a positive integer (tokens per chunk), got {v!r}")
        else:
            try:
                v = float(v) if not isinstance(v, bool) else None
            except (TypeError, ValueError):
                v = None
            ranges = {"alpha": (0.0, 1.0, True), "beta": (0.0, 1.0, False), "temperature": (0.0, math.inf, False)}
            low, high, closed = ranges[key]
            ok = v is not None and (low <= v <= high if closed else low < v < high)
            if not ok:
                rule = "a number in [0, 1]" if key == "alpha" else "a number in (0, 1)" if key == "beta" \
                    else "a positive number"
                raise SynthError(f"{at}: key 'kd.{key}' must be {rule}, got {value[key]!r}")
        out[key] = v
    return out


def triton_installed() -> bool:
    """Whether triton can be imported here (found, not imported: the recipe checks stay cheap)."""
    return importlib.util.find_spec("triton") is not None


def kernel_choice(setting: str, *, cuda: bool, triton: bool, at: str = "the recipe") -> str:
    """Which implementation computes the KD loss: 'triton' (synth/kd_kernel.py) or 'torch' (synth/kd_loss.py's
    chunked loss), for the recipe's kd.kernel (KERNELS) when the student's tensors are on CUDA (`cuda`) and
    triton is importable (`triton`). `triton` where it cannot run: one SynthError line (`at`: where it is set)."""
    if setting == "torch":
        return "torch"
    if setting == "auto":
        return "triton" if cuda and triton else "torch"
    if setting != "triton":
        raise SynthError(f"{at}: key 'kd.kernel' must be one of {', '.join(KERNELS)}, got {setting!r}")
    if not triton:
        raise SynthError(f"{at}: key 'kd.kernel' is triton, but triton is not installed here (pip install triton; "
                         "it runs on CUDA GPUs): set kernel auto (the kernel where it can run) or torch")
    if not cuda:
        raise SynthError(f"{at}: key 'kd.kernel' is triton, but the student is not on a CUDA GPU (the Triton kernel "
                         "runs on CUDA only): set kernel auto (the chunked PyTorch loss here) or torch")
    return "triton"


def read_parquet(data_path: Path, table) -> list[dict]:
    """The kd rows of a `format: kd` Parquet file (a pyarrow table) with the completion ids and the teacher's
    arrays as numpy views into the file's buffers: completion_ids (n,) and teacher_ids / teacher_logprobs (n, k)
    per row. Arrow's nested lists turned into Python lists cost ~1.3 s per 5,000 demo rows, and back into
    arrays at every batch; these views cost neither. A row missing a column, or whose positions carry
    different numbers of teacher targets: one SynthError line naming the row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [c for c in KD_COLUMNS if c not in table.column_names]
    if missing:
        raise SynthError(f"{data_path}: no column {', '.join(missing)}: kd data needs columns {', '.join(KD_COLUMNS)}")
    empty = np.zeros(table.num_rows, dtype=bool)
    for c in KD_COLUMNS:
        column = table.column(c)
        if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
            raise SynthError(f"{data_path}: column {c} is {column.type}, not a list (export it again with format: kd)")
        empty |= pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False) == 0
    if empty.any():
        n = int(empty.argmax())
        gone = [c for c in KD_COLUMNS if not table.column(c)[n].is_valid or len(table.column(c)[n]) == 0]
        raise SynthError(f"{data_path}: row {n + 1} has no {', '.join(gone)}: kd data needs columns "
                         f"{', '.join(KD_COLUMNS)}")

    def flat(name: str, depth: int):
        """(values, offsets per level) of a list column, its chunks combined: each level's offsets index its
        child array (`values`, which a sliced array shares whole), the innermost values as numpy."""
        array = table.column(name).combine_chunks()
        offsets = []
        for _ in range(depth):
            offsets.append(array.offsets.to_numpy())
            array = array.values
        return array.to_numpy(zero_copy_only=False), offsets

    completion, (c_off,) = flat("completion_ids", 1)
    targets = {name: (values, *offsets) for name in ("teacher_ids", "teacher_logprobs")
               for values, offsets in [flat(name, 2)]}
    out = []
    for n, prompt in enumerate(table.column("prompt").to_pylist()):
        row = {"prompt": prompt, "completion_ids": completion[c_off[n]:c_off[n + 1]]}
        for name, (values, outer, inner) in targets.items():
            first, last = inner[outer[n]], inner[outer[n + 1]]
            positions = outer[n + 1] - outer[n]
            if positions and (last - first) % positions == 0 and \
                    (np.diff(inner[outer[n]:outer[n + 1] + 1]) == (last - first) // positions).all():
                row[name] = values[first:last].reshape(positions, (last - first) // positions)
            else:
                raise SynthError(f"{data_path}: row {n + 1}: its positions carry different numbers of {name}; a kd "
                                 "row has the same k at every position (padding: id -1, log-prob -inf): export it "
                                 "again")
        out.append(row)
    return out


def tokenize(rows: list[dict], tokenizer, max_length: int | None) -> tuple[list[dict], dict]:
    """KD rows -> the trainer's examples (input_ids, labels, prompt_length, and teacher_ids/teacher_logprobs:
    arrays (n, k), one row of k per completion token from position prompt_length on) and the readiness
    figures. A row longer than max_length keeps its start (its completion is cut, targets with it); one whose
    prompt alone fills max_length is left out. Both count as truncated. The rows' arrays may be lists
    (.jsonl) or numpy (read_parquet). Each distinct prompt is rendered once (the demo's 5,373 rows have 800)."""
    import numpy as np

    if getattr(tokenizer, "chat_template", None) is None:
        raise SynthError(f"the student's tokenizer ({tokenizer.name_or_path}) has no chat template to render the "
                         "prompts with: start from an instruct model or add a chat_template.jinja")
    examples, lengths, truncated = [], [], 0
    rendered: dict[str, list[int]] = {}  # a prompt's JSON (its turns in their own key order) -> its ids
    for n, row in enumerate(rows, 1):
        key = json.dumps(row["prompt"], ensure_ascii=False, default=str)
        prompt = rendered.get(key)
        if prompt is None:
            try:
                prompt = list(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"])
            except Exception as exc:  # jinja2 errors, a message without role/content, ...
                raise SynthError(f"row {n}: the student's chat template cannot render its prompt: "
                                 f"{' '.join(str(exc).split())[:200]}") from None
            rendered[key] = prompt
        try:
            completion = np.asarray(row["completion_ids"], dtype=np.int64).reshape(-1)
            top_ids = np.asarray(row["teacher_ids"], dtype=np.int64)
            top_lps = np.asarray(row["teacher_logprobs"], dtype=np.float32)
        except (TypeError, ValueError):  # ragged lists, strings
            raise SynthError(f"row {n}: its teacher targets are not one list of k ids and k log-probs per completion "
                             "token (export it again)") from None
        if not (len(completion) == len(top_ids) == len(top_lps)) or not len(completion) \
                or top_ids.ndim != 2 or top_lps.shape != top_ids.shape:
            raise SynthError(f"row {n}: {len(completion)} completion ids but teacher targets for {len(top_ids)} "
                             "positions; a kd row needs one target list per completion token (export it again)")
        total = len(prompt) + len(completion)
        lengths.append(total)
        if max_length is not None and total > max_length:
            truncated += 1
            keep = max_length - len(prompt)
            if keep <= 0:
                continue
            completion, top_ids, top_lps = completion[:keep], top_ids[:keep], top_lps[:keep]
        start = np.asarray(prompt, dtype=np.int64)
        examples.append({"input_ids": np.concatenate([start, completion]),
                         "labels": np.concatenate([np.full(len(start), -100, dtype=np.int64), completion]),
                         "prompt_length": len(prompt),  # teacher targets start here: one row per completion token
                         "teacher_ids": top_ids, "teacher_logprobs": top_lps})
    ordered = sorted(lengths)

    def pct(p):
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    ready = {"rows": len(rows), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1],
             "max_length": max_length, "truncated": truncated, "truncated_share": truncated / len(rows),
             "think_tags": 0}
    return examples, ready


class Collator:
    """Pads a batch: input_ids with the pad id, labels with -100, teacher ids/log-probs to (batch, length, k)
    with id 0 and log-prob -inf (no mass: kd_loss ignores them; a -1 from the export is padding too),
    attention_mask. The batch's items are examples (tokenize) or, when the collator holds the examples,
    {"row": i} indices into them: the training dataset holds only the indices (TRL takes a datasets.Dataset,
    and reading the teacher arrays back out of Arrow at every batch cost ~3 ms of a ~45 ms demo step). One
    numpy array per example and field (not one tensor per position: collation ran ~1,000 small tensor copies
    a step and made a KD step 1.3x an SFT step on the demo's student)."""

    def __init__(self, pad_token_id: int, examples: list[dict] | None = None):
        self.pad = pad_token_id
        self.examples = examples

    def __call__(self, batch: list[dict]) -> dict:
        import numpy as np
        import torch

        examples = batch if self.examples is None else [self.examples[item["row"]] for item in batch]
        width = max(len(e["input_ids"]) for e in examples)
        k = max((len(t) for e in examples for t in e["teacher_ids"][:1]), default=1) or 1
        size = len(examples)
        ids = np.full((size, width), self.pad, dtype=np.int64)
        mask = np.zeros((size, width), dtype=np.int64)
        labels = np.full((size, width), -100, dtype=np.int64)
        top_ids = np.zeros((size, width, k), dtype=np.int64)
        top_lps = np.full((size, width, k), -np.inf, dtype=np.float32)
        for i, e in enumerate(examples):
            n, start = len(e["input_ids"]), e["prompt_length"]
            ids[i, :n], mask[i, :n], labels[i, :n] = e["input_ids"], 1, e["labels"]
            targets = np.asarray(e["teacher_ids"], dtype=np.int64)
            if targets.size:
                end = start + targets.shape[0]
                top_ids[i, start:end, :targets.shape[1]] = np.maximum(targets, 0)
                top_lps[i, start:end, :targets.shape[1]] = np.asarray(e["teacher_logprobs"], dtype=np.float32)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels), "teacher_ids": torch.from_numpy(top_ids),
                "teacher_logprobs": torch.from_numpy(top_lps)}


def student_parts(model):
    """(decoder, lm_head) of a causal LM (a PEFT-wrapped one too): the decoder's output is the final hidden
    states, normed; the lm_head's weight maps them to logits. Refuses heads kd_loss does not model."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    config = lm.config
    for attribute in ("final_logit_softcapping", "logit_scale", "output_logit_scale"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise SynthError(f"the student ({config.model_type}) scales its logits ({attribute}); method kd computes "
                             "logits as hidden @ lm_head.weight and does not support it")
    if head is None or getattr(head, "bias", None) is not None:
        raise SynthError(f"the student ({config.model_type}) has no bias-free lm_head; method kd needs one")
    return lm.get_decoder(), head


@functools.lru_cache(maxsize=None)  # asked at every training step: the signature is read once per model class
def _takes_logits_to_keep(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def completion_hidden(model, inputs: dict, student=None):
    """(hidden, weight, labels, kept) of one collated batch: the student's final hidden states (the decoder's
    output, no lm_head) at every position whose next token is a target, in the lm_head weight's dtype
    (n_kept, H); that weight (V, H); the labels shifted so position t predicts token t+1, flattened
    (batch * (length - 1),); and kept = those labels != -100 (the rows of `hidden`).

    `model` runs the forward: the Trainer's model as compute_loss gets it (wrapped by DDP, and by
    accelerate's autocast, where they apply), so that DDP all-reduces the gradients; `student` is the same
    model unwrapped (default: `model`), where the decoder and the lm_head are found. The forward asks for
    the logits of the last position only (logits_to_keep, where the model takes it): the batch's full
    logits are never computed. On CPU it runs on the batch's real tokens only (synth/packed_forward.py: the
    padding is not computed; the same hidden states) where every target follows a real token. Shared by
    method kd (batch_loss) and SFT's chunked CE (synth/sft_train.py)."""
    student = model if student is None else student
    decoder, head = student_parts(student)
    labels = inputs["labels"][:, 1:].reshape(-1)
    kept = labels != -100
    captured = []

    def keep(module, args, output):  # the decoder's output: the final hidden states, normed
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    def padded():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, **extra)

    lm = student.get_base_model() if hasattr(student, "get_base_model") else student
    extra = {"logits_to_keep": 1} if _takes_logits_to_keep(type(lm)) else {}
    on_real = bool(inputs["attention_mask"][:, :-1].reshape(-1)[kept].all())  # no target's hidden state is padding
    handle = decoder.register_forward_hook(keep)
    try:
        hidden = packed_hidden(model, lm, inputs, padded, captured, extra) if on_real else None
        if hidden is None:
            padded()
            hidden = captured[-1]
    finally:
        handle.remove()
    # under autocast (float32 weights, bf16/fp16 mixed precision) the hidden states arrive in the autocast
    # dtype; kd_loss takes one dtype (and computes the logits in float32 at least)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[kept].to(head.weight.dtype)
    return h, head.weight, labels, kept


def batch_loss(model, inputs: dict, kd: dict, student=None):
    """The KD loss of one collated batch (Collator): the completion's hidden states (completion_hidden: one
    forward of `model`, see there for `model` and `student`), then kd_loss with the lm_head weight (logits
    chunk by chunk) or, as kd["kernel"] says (kernel_choice), the fused Triton kernel (logits tile by tile)."""
    from synth.kd_loss import SparseTargets, kd_loss

    h, weight, labels, kept = completion_hidden(model, inputs, student)
    k = inputs["teacher_ids"].shape[-1]
    targets = SparseTargets(labels=labels[kept], top_ids=inputs["teacher_ids"][:, 1:].reshape(-1, k)[kept],
                            top_logprobs=inputs["teacher_logprobs"][:, 1:].reshape(-1, k)[kept])
    loss = kd_loss
    if kernel_choice(kd.get("kernel", "auto"), cuda=h.is_cuda, triton=triton_installed()) == "triton":
        from synth.kd_kernel import kd_loss_triton as loss
    return loss(h, weight, targets, alpha=kd["alpha"], temperature=kd["temperature"],
                divergence=kd["divergence"], beta=kd["beta"], chunk_size=kd["chunk_size"])


def kd_trainer_class():
    """KDTrainer, built on first use (importing TRL takes seconds)."""
    import torch
    from trl import SFTTrainer

    class KDTrainer(SFTTrainer):
        """SFTTrainer with the KD loss: the dataset arrives tokenised with teacher targets (tokenize), the
        collator pads them (Collator), compute_loss is batch_loss."""

        def __init__(self, *args, kd: dict, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd = kd
            self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: the Trainer divides by GA steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # the forward through `model` as given (DDP's wrapper under gpus: N): see batch_loss
            loss = batch_loss(model, inputs, self.kd, student=self.accelerator.unwrap_model(model))
            return (loss, {"loss": loss}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return KDTrainer


def kd_setup(rows: list[dict] | None, tokenizer, recipe: dict, max_length: int | None, data_path: Path,
             tokenised: tuple[list[dict], dict] | None = None):
    """(examples, readiness, collator, kd settings) for train.prepare: the collator holds the examples, the
    training dataset their indices ({"row": i}: Collator). `tokenised`: (examples, readiness) of these very
    rows, tokenised before (train._data_key); rows is then not read."""
    examples, ready = tokenised if tokenised is not None else tokenize(rows, tokenizer, max_length)
    if not examples:
        raise SynthError(f"{data_path}: every row's prompt fills max_length {max_length}; raise max_length")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kd = check_kd(recipe.get("kd"), str(data_path))
    if kd["kernel"] == "triton":  # train start: no CUDA here is one line before the trainer is built
        import torch

        kernel_choice("triton", cuda=torch.cuda.is_available(), triton=triton_installed(), at="the kd recipe")
    return examples, ready, Collator(pad, examples), kd
