"""A causal LM's forward on a right-padded training batch without computing the padding (CPU).

Why: a collated batch pads every row to its longest; the demo's student batches are ~20-25% padding (16
rows of 55-105 tokens), and every token-wise op (projections, MLP, norms, their gradients) computed it. On
CPU nothing else removes it (TRL's padding_free needs a flash-attention kernel; transformers' packed-sequence
masks make one sequence of the whole batch, attention over T x T). Here the batch's real tokens go through
the model as one row (position ids restart per sequence), and each attention layer re-pads its q, k, v into
the batch's rows, runs SDPA (causal) and packs the result again: every token-wise op runs on the real tokens
only, attention costs what it did. Measured: bench/packed_forward.py.

Contract: `packed_hidden(model, lm, inputs, run_padded, capture, extra)` (kd_train.completion_hidden's
forward, its decoder hook's list and its extra model arguments) returns the final hidden states laid out as
the padded batch, [B, L, H], equal to the padded forward's at every real position (bit-equal on the demo's
student; padding positions are zeros, never targets) — or None where packing does not apply, and the caller
runs the padded forward. (A model with dropout, LoRA's say, draws its masks on the packed tensor: other
draws, the same law.) It applies when all hold:
- the student is on CPU (elsewhere it is unmeasured) and its attention implementation is `sdpa` (the
  default: the user's explicit choice of another is left alone);
- every layer attends causally over the whole sequence: no sliding window, no logit softcapping;
- the batch is right-padded (each row's attention mask is ones, then zeros), with some padding to save;
- `verify`: on the model's first batch both forwards run (in eval mode: dropout off, no random draws, so the
  training's random stream is unchanged) and their hidden states must agree at every real position (float32
  tolerance). A model they disagree on (its attention does not go through transformers' attention
  interface, say) trains on padded batches for the rest of the run, with one warning line on stderr.
The caller vouches that targets lie on real tokens (labels are -100 at padding, as TRL's and synth's
collators make them). torch and transformers are imported inside (seconds).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

ATTENTION = "synth_packed_sdpa"  # the name this module registers in transformers' AttentionInterface
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # packed vs padded hidden states on the first batch (float32)
_STATE = "_synth_packing"  # attribute on the model: None (not yet verified), True or False


@dataclass(frozen=True)
class Segments:
    """Where each packed token sits in the padded batch: index[i] = row * length + position."""
    index: object  # LongTensor [T]
    rows: int
    length: int


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature on a packed row: q, k, v [1, heads, T, head_dim] → re-padded
    to [B, heads, L, head_dim], SDPA with a causal mask (exact for right padding: a real token sees only real
    tokens before it), packed back to [1, T, heads, head_dim] (what attention functions return)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments: Segments = kwargs.pop("synth_segments")

    def pad(x):
        flat = x[0].transpose(0, 1)  # [T, heads, dim]
        out = flat.new_zeros(segments.rows * segments.length, *flat.shape[1:]).index_copy(0, segments.index, flat)
        return out.view(segments.rows, segments.length, *flat.shape[1:]).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, pad(query), pad(key), pad(value), None, dropout=dropout,
                                    scaling=scaling, is_causal=True)
    out = out.reshape(segments.rows * segments.length, *out.shape[2:]).index_select(0, segments.index)
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)  # idempotent: a dict entry


def static_reason(lm, inputs: dict) -> str | None:
    """Why this model or batch does not pack (None: it may). `lm` is the unwrapped causal LM."""
    config = lm.config
    if lm.device.type != "cpu":
        return f"the student is on {lm.device.type}"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r}"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "a layer attends through a sliding window or chunks"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "a sliding window"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit softcapping"
    mask = inputs.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return "no 2-D attention mask"
    return None


def _segments(mask) -> Segments | None:
    """The packing of a right-padded batch, or None when it is not right-padded or has no padding."""
    import torch

    rows, length = mask.shape
    lengths = mask.sum(1)
    prefix = torch.arange(length, device=mask.device)[None, :] < lengths[:, None]
    if not bool((mask.bool() == prefix).all()) or bool((lengths == length).all()) or bool((lengths == 0).any()):
        return None
    index = (torch.arange(rows, device=mask.device)[:, None] * length
             + torch.arange(length, device=mask.device)[None, :])[prefix]
    return Segments(index=index, rows=rows, length=length)


def _forward(model, lm, inputs: dict, segments: Segments, capture: list, extra: dict):
    """One forward of `model` (the Trainer's, maybe DDP-wrapped) on the packed row; the decoder's output
    arrives in `capture` (completion_hidden's hook)."""
    import torch

    keep = segments.index
    ids = inputs["input_ids"].reshape(-1).index_select(0, keep)[None]
    positions = torch.arange(segments.length, device=keep.device).repeat(segments.rows).index_select(0, keep)[None]
    config = lm.config
    before = config._attn_implementation
    # read by every attention module at call time; restored below. The {"": name} form sets this config's
    # own and leaves any sub-config's (a vision tower's, say) as it is
    config._attn_implementation = {"": ATTENTION}
    try:
        model(input_ids=ids, position_ids=positions, use_cache=False, synth_segments=segments, **extra)
    finally:
        config._attn_implementation = {"": before}
    packed = capture[-1][0]  # [T, H]
    out = packed.new_zeros(segments.rows * segments.length, packed.shape[-1]).index_copy(0, keep, packed)
    return out.view(segments.rows, segments.length, -1)


def packed_hidden(model, lm, inputs: dict, run_padded, capture: list, extra: dict):
    """The decoder's final hidden states for a padded batch, [B, L, H], computed on its real tokens only;
    None when packing does not apply (module doc). `run_padded()` runs the padded forward (appending the
    decoder's output to `capture`): used once per model, to verify."""
    state = getattr(lm, _STATE, None)
    if state is False or static_reason(lm, inputs) is not None:
        return None
    segments = _segments(inputs["attention_mask"])
    if segments is None:
        return None
    _register()
    if state is None:
        setattr(lm, _STATE, _verify(model, lm, inputs, segments, run_padded, capture, extra))
        if not getattr(lm, _STATE):
            return None
    return _forward(model, lm, inputs, segments, capture, extra)


def _verify(model, lm, inputs: dict, segments: Segments, run_padded, capture: list, extra: dict) -> bool:
    """Whether the packed forward gives the padded forward's hidden states on this batch (eval mode, no
    gradients; the model's training mode restored); a warning line on stderr when not."""
    import torch

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_padded()
            padded = capture.pop()
            packed = _forward(model, lm, inputs, segments, capture, extra)
            capture.pop()
        real = inputs["attention_mask"].bool()
        same = padded.shape == packed.shape and torch.allclose(padded[real].float(), packed[real].float(),
                                                               **TOLERANCE)
        why = "its hidden states differ from the padded forward's"
    except Exception as exc:  # noqa: BLE001 — any failure of the packed path means: do not pack this model
        same, why = False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    finally:
        model.train(training)
    if not same:
        print(f"synth: warning: training {lm.config.model_type} on padded batches: the packed forward "
              f"(no padding computed) does not apply ({why})", file=sys.stderr)
    return same
