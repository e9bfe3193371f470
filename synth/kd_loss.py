"""Token-level knowledge distillation from a teacher's top-K log-probs, chunked over tokens.

Contract. `kd_loss(hidden, weight, targets)` takes the student's final hidden states (N, H) and its
lm_head weight (V, H) (student logits z = hidden @ weight.T) and returns the scalar

    loss = alpha * CE + (1 - alpha) * T^2 * D

CE is the mean over valid positions of -log softmax(z)[label] (temperature 1); D is the mean over valid
positions of a divergence between teacher and student over K+1 buckets: the teacher's top-K tokens and
one tail bucket holding every other token. Valid positions: labels != -100; the others (prompt,
padding) contribute nothing, their hidden-state gradient is exactly 0 and their targets are not read
beyond their shape. With no valid position the loss is a zero that still backpropagates (zeros).
It never holds the N x V logits: a torch.autograd.Function computes, chunk_size rows at a time, the
chunk's logits (in float32, or float64 for float64 inputs), its share of the loss and right away its
gradient with respect to those logits, turned into grad_hidden[chunk] = G @ weight and
grad_weight += G.T @ hidden[chunk]; backward only scales the stored gradients (the Liger "fused linear
cross-entropy" pattern). The loss comes back in that compute dtype, gradients in the inputs' dtypes.
Memory: the inputs, the two gradients (grad_weight in the compute dtype while accumulating) and, for
forward_kl, three chunk x V buffers at a time.
`reference_kd_loss(logits, targets)` is the same loss from full (N, V) logits written the plain way:
the test oracle and the benchmark's full-logits baseline. A fused kernel is to implement kd_loss's
signature and math as stated here.

Targets (SparseTargets): labels (N,), top_ids (N, K), top_logprobs (N, K) = the teacher's raw
log-softmax (temperature 1) at top_ids. An entry of -inf is padding: no mass, not a bucket, its id
is never read (anything, even a duplicate or out of range). The valid ids of a position are distinct.

Math, per position, u = z / T:
- Student: s = softmax(u) over the whole vocabulary; bucket i in top-K: log s_i = u_i - lse(u);
  tail: log s_tail = lse(u over the tokens not in top-K) - lse(u), that log-sum-exp taken directly
  over the logits with the top-K masked (a kernel: in the same pass as lse(u), masking the row's K
  ids). Not as log1mexp(lse_K - lse(u)): that difference cancels, in float32 its error is ~ulp(lse)
  ~ 1e-7 |lse|, all of s_tail for a confident student (logits ~20 above the rest: -inf at every row,
  an infinite loss, tests/test_kd_loss.py); the direct form is exact and finite whenever the tail
  holds a token.
- Teacher: p_i = exp(top_logprobs_i), p_tail = max(0, 1 - sum_K p). T reshapes the top-K among
  themselves while their total mass and the tail stay as captured (the tail's shape is unknown):
      q_i = (1 - q_tail) * softmax_K(top_logprobs / T)_i,   q_tail = p_tail,
  so at T = 1, q = p (when sum_K p <= 1; a sum over 1 from rounding is renormalised to 1), and with
  K = V, q is exactly softmax(teacher_logits / T). When the valid ids cover the whole vocabulary the
  tail bucket does not exist (q_tail = 0 whatever the rounding of sum_K p).
- Divergences (`DIVERGENCES`), over the buckets b that exist, with 0 * log 0 = 0:
  forward_kl  D = sum_b q_b (log q_b - log s_b)   (a teacher tail of 0 adds nothing and no gradient);
  reverse_kl  D = sum_b s_b (log s_b - log max(q_b, Q_FLOOR)), Q_FLOOR = 1e-20: a bucket the teacher
              gives 0 (in practice only the tail, when sum_K p >= 1) would be infinite; the floor makes
              it a finite, strong push (log 1e-20 = -46) to empty it;
  jsd         generalised Jensen-Shannon, m = beta q + (1 - beta) s,
              D = beta KL(q || m) + (1 - beta) KL(s || m), beta in (0, 1) open. Both ends vanish:
              as beta -> 0, D / beta -> KL(q || s) (forward KL), as beta -> 1, D / (1 - beta) ->
              KL(s || q) (reverse KL); use those divergences for the ends. beta = 0.5 is the
              symmetric JSD.
- Gradient of forward_kl with respect to u (analytic, the fused kernel's form; sum_b q_b = 1):
      dD/du_j = s_j - q_j                             for j in top-K,
      dD/du_j = s_j (1 - q_tail / s_tail)             for j in the tail
              = s_j - q_tail * softmax(u over the tail)_j,
  times 1/T for z, times (1 - alpha) T^2 / n_valid. CE: dCE/dz = softmax(z) - onehot(label), times
  alpha / n_valid. reverse_kl and jsd take the chunk's logit gradient from torch.autograd.grad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100
Q_FLOOR = 1e-20  # reverse_kl's floor on a teacher bucket's mass (module docstring)
_LOG_Q_FLOOR = math.log(Q_FLOOR)


@dataclass(frozen=True)
class SparseTargets:
    labels: torch.Tensor        # (N,) int64: the next token (CE target); -100 = ignore this position
    top_ids: torch.Tensor       # (N, K) int64: the teacher's top-K token ids
    top_logprobs: torch.Tensor  # (N, K) float: the teacher's log-probs at temperature 1; -inf = padding


def kd_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: SparseTargets, *, alpha: float = 0.0,
            temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
            chunk_size: int = 1024) -> torch.Tensor:
    """hidden (N, H): the student's final hidden states (after the final norm) at each position;
    weight (V, H): the lm_head weight (student logits = hidden @ weight.T). Returns the scalar loss
       alpha * CE + (1 - alpha) * T^2 * D
    with CE = mean over valid positions of -log softmax(logits)[label] (temperature 1) and D = mean over valid
    positions of the divergence between teacher and student over K+1 buckets (the teacher's top-K tokens, plus one
    tail bucket holding all other tokens). Valid positions: labels != -100. Gradients flow to hidden and weight
    (weight may be a tied embedding; it may have requires_grad False)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H) with the same H, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check(targets, hidden.shape[0], weight.shape[0], alpha, temperature, divergence, beta)
    return _ChunkedKD.apply(hidden, weight, targets.labels, targets.top_ids, targets.top_logprobs,
                            float(alpha), float(temperature), divergence, float(beta), chunk_size)


def reference_kd_loss(logits: torch.Tensor, targets: SparseTargets, *, alpha: float = 0.0,
                      temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                      chunk_size: int | None = None) -> torch.Tensor:
    """The same loss from full logits (N, V), written the plain way (full log_softmax, explicit bucket sums):
    the test oracle and the benchmark's "full-logits" baseline. chunk_size is accepted and ignored, so one
    dict of keyword arguments serves both functions."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (N, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    n_all, vocab = logits.shape
    _check(targets, n_all, vocab, alpha, temperature, divergence, beta)
    t = temperature
    valid = targets.labels != IGNORE_INDEX
    z = logits[valid].to(torch.promote_types(logits.dtype, torch.float32))
    if z.shape[0] == 0:
        return logits.sum() * 0.0
    labels, lp = targets.labels[valid], targets.top_logprobs[valid].to(z.dtype)
    in_k = torch.isfinite(lp)
    ids = torch.where(in_k, targets.top_ids[valid], 0)

    ce = -torch.log_softmax(z, dim=-1).gather(1, labels[:, None]).squeeze(1)

    s = torch.softmax(z / t, dim=-1)
    member = torch.zeros_like(s).scatter_add_(1, ids, in_k.to(s.dtype)) > 0
    tail_exists = ~member.all(dim=1)
    s_k = torch.where(in_k, s.gather(1, ids), 0)
    s_tail = (s * ~member).sum(dim=1)  # the explicit sum over the tokens outside the top-K

    p = lp.exp()
    q_tail = torch.where(tail_exists, (1 - p.sum(dim=1)).clamp(min=0), 0)
    w = (lp / t).exp()
    q_k = (1 - q_tail)[:, None] * w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)

    q = torch.cat([q_k, q_tail[:, None]], dim=1)
    s_b = torch.cat([s_k, s_tail[:, None]], dim=1)
    exists = torch.cat([in_k, tail_exists[:, None]], dim=1)
    # log of 1 where a bucket does not exist, so neither the value nor the gradient sees log 0
    log_s = torch.where(exists, s_b, 1).log()
    if divergence == "forward_kl":
        d = torch.where(q > 0, q * (torch.where(q > 0, q, 1).log() - log_s), 0).sum(dim=1)
    elif divergence == "reverse_kl":
        d = torch.where(exists, s_b * (log_s - q.clamp(min=Q_FLOOR).log()), 0).sum(dim=1)
    else:
        m = torch.where(exists, beta * q + (1 - beta) * s_b, 1)
        kl_qm = torch.where(q > 0, q * (torch.where(q > 0, q, 1) / m).log(), 0).sum(dim=1)
        kl_sm = torch.where(exists, s_b * (log_s - m.log()), 0).sum(dim=1)
        d = beta * kl_qm + (1 - beta) * kl_sm
    return alpha * ce.mean() + (1 - alpha) * t * t * d.mean()


def _check(targets: SparseTargets, n: int, vocab: int, alpha: float, temperature: float, divergence: str,
           beta: float) -> None:
    labels, ids, lp = targets.labels, targets.top_ids, targets.top_logprobs
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs beta in (0, 1) (the ends vanish: use forward_kl or reverse_kl), got {beta}")
    if labels.shape != (n,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 1 or ids.dtype != torch.int64:
        raise ValueError(f"top_ids must be int64 of shape ({n}, K) with K >= 1, got {ids.dtype} {tuple(ids.shape)}")
    if lp.shape != ids.shape or not lp.is_floating_point():
        raise ValueError(f"top_logprobs must be floating with top_ids' shape {tuple(ids.shape)}, "
                         f"got {lp.dtype} {tuple(lp.shape)}")
    # the values below are read at valid positions only (a few device syncs per call)
    valid = labels != IGNORE_INDEX
    y, ids, lp = labels[valid], ids[valid], lp[valid]
    if ((y < 0) | (y >= vocab)).any():
        raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX}")
    if torch.isnan(lp).any() or (lp == math.inf).any():
        raise ValueError("top_logprobs must be finite log-probs or -inf (padding)")
    in_k = torch.isfinite(lp)
    if (in_k & ((ids < 0) | (ids >= vocab))).any():
        raise ValueError(f"top_ids of non-padding entries must be in [0, {vocab})")
    # distinct per position: a padding entry gets its own negative key
    keys = torch.where(in_k, ids, -1 - torch.arange(ids.shape[1], device=ids.device)).sort(dim=1).values
    if (keys[:, 1:] == keys[:, :-1]).any():
        raise ValueError("top_ids repeat a token at a position (only -inf padding entries may)")


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, top_ids, top_logprobs, alpha, temperature, divergence, beta,
                chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdtype = torch.promote_types(hidden.dtype, torch.float32)
        vocab = weight.shape[0]
        w = weight.to(cdtype)  # one V x H copy for low-precision weights; the logits must not be bf16
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # the valid positions, in chunks
        n = rows.numel()
        loss = torch.zeros((), dtype=cdtype, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=cdtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=cdtype, device=w.device) if need_w else None
        a_ce = alpha / max(n, 1)
        a_kd = (1 - alpha) * temperature * temperature / max(n, 1)
        for start in range(0, n, chunk_size):
            idx = rows[start:start + chunk_size]
            h = hidden.index_select(0, idx).to(cdtype)
            z = h @ w.T
            part, g = _chunk(z, labels[idx], top_ids[idx], top_logprobs[idx].to(cdtype), vocab, a_ce, a_kd,
                             temperature, divergence, beta)
            loss += part
            if need_h:
                grad_h.index_copy_(0, idx, g @ w)
            if need_w:
                grad_w.addmm_(g.T, h)
            del z, g  # free the chunk before the next one is computed
        ctx.save_for_backward(None if grad_h is None else grad_h.to(hidden.dtype),
                              None if grad_w is None else grad_w.to(weight.dtype))
        return loss

    @staticmethod
    @once_differentiable  # the stored gradients are constants: a second derivative would be silently wrong
    def backward(ctx, grad_out):
        return (*stored_gradients(ctx, grad_out), None, None, None, None, None, None, None, None)


def stored_gradients(ctx, grad_out) -> tuple:
    """The backward of a loss whose forward stored the gradients of hidden and weight (this module's and
    kd_kernel.py's): those gradients scaled by the loss's incoming gradient (None where not needed)."""
    grad_h, grad_w = ctx.saved_tensors
    return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_out.to(grad_w.dtype))


def _chunk(z, labels, ids, lp, vocab, a_ce, a_kd, t, divergence, beta):
    """One chunk of valid rows: (its weighted share of the loss, d loss / d z). Overwrites z."""
    loss, grad = z.new_zeros(()), None
    if a_ce:
        lse = torch.logsumexp(z, dim=1)
        loss += a_ce * (lse - z.gather(1, labels[:, None]).squeeze(1)).sum()
        grad = (z - lse[:, None]).exp_().mul_(a_ce)  # alpha/n * softmax(z) ...
        grad.scatter_add_(1, labels[:, None], z.new_full((z.shape[0], 1), -a_ce))  # ... - alpha/n * onehot
    if not a_kd:
        return loss, grad
    in_k = torch.isfinite(lp)
    ids = torch.where(in_k, ids, 0)  # a padding id is never read: column 0 with a zero or masked value
    log_q_k, q_tail, tail_exists = _teacher(lp, in_k, vocab, t)
    # -inf on the top-K where a tail exists; a row without one stays unmasked, so its (unused) tail
    # log-sum-exp is finite and its gradient is not NaN
    tail_mask = torch.where(in_k & tail_exists[:, None], -math.inf, 0.0).to(z.dtype)
    if divergence == "forward_kl":
        u = z.div_(t) if t != 1 else z
        lse_all = torch.logsumexp(u, dim=1)
        log_s_k = u.gather(1, ids) - lse_all[:, None]
        s = (u - lse_all[:, None]).exp_().mul_(a_kd / t)  # s_j for every j, then corrected below
        grad = s if grad is None else grad.add_(s)
        del s
        # the tail's log-sum-exp over the logits with the top-K masked (in place: u is not needed after)
        lse_tail = torch.logsumexp(u.scatter_add_(1, ids, tail_mask), dim=1)
        log_s_tail = lse_tail - lse_all
        # tail tokens: - q_tail * softmax(u over the tail)_j (0 on the top-K; q_tail = 0 without a tail)
        grad.sub_(u.sub_(lse_tail[:, None]).exp_().mul_((q_tail * (a_kd / t))[:, None]))
        # top-K tokens: - q_j
        grad.scatter_add_(1, ids, torch.where(in_k, -log_q_k.exp() * (a_kd / t), 0))
        d = _divergence(log_s_k, log_s_tail, log_q_k, q_tail, in_k, tail_exists, divergence, beta)
        return loss + a_kd * d.sum(), grad
    # reverse_kl, jsd: the chunk's logit gradient by autograd (memory: a few chunk x V buffers)
    with torch.enable_grad():
        z.requires_grad_(True)
        u = z / t
        lse_all = torch.logsumexp(u, dim=1)
        log_s_k = u.gather(1, ids) - lse_all[:, None]
        log_s_tail = torch.logsumexp(u.scatter_add(1, ids, tail_mask), dim=1) - lse_all
        kd = a_kd * _divergence(log_s_k, log_s_tail, log_q_k, q_tail, in_k, tail_exists, divergence, beta).sum()
        (g,) = torch.autograd.grad(kd, z)
    return loss + kd.detach(), g if grad is None else grad.add_(g)


def _teacher(lp, in_k, vocab, t):
    """The teacher's buckets at temperature t: (log q over the top-K (-inf at padding), q_tail, tail_exists)."""
    tail_exists = in_k.sum(dim=1) < vocab  # the valid ids are distinct
    q_tail = torch.where(tail_exists, (1 - lp.exp().sum(dim=1)).clamp(min=0), 0)
    log_soft_k = torch.log_softmax(lp / t, dim=1)  # NaN on a row of padding only: masked below
    log_q_k = torch.where(in_k, log_soft_k + torch.log1p(-q_tail)[:, None], -math.inf)
    return log_q_k, q_tail, tail_exists


def _divergence(log_s_k, log_s_tail, log_q_k, q_tail, in_k, tail_exists, divergence, beta):
    """Per-row D over the K+1 buckets, in log space; buckets that do not exist (padding, an empty tail)
    are masked out of the value and, by the safe operands of torch.where, out of the gradient."""
    exists = torch.cat([in_k, tail_exists[:, None]], dim=1)
    log_s = torch.where(exists, torch.cat([log_s_k, log_s_tail[:, None]], dim=1), 0)
    log_q = torch.cat([log_q_k, q_tail.log()[:, None]], dim=1)
    q = torch.where(exists, log_q.exp(), 0)
    has_q = q > 0
    log_q_safe = torch.where(has_q, log_q, 0)
    if divergence == "forward_kl":
        terms = torch.where(has_q, q * (log_q_safe - log_s), 0)
    elif divergence == "reverse_kl":
        terms = torch.where(exists, log_s.exp() * (log_s - log_q.clamp(min=_LOG_Q_FLOOR)), 0)
    else:
        # log m = log(beta q + (1 - beta) s), finite wherever the bucket exists (its log s is finite)
        log_m = torch.logaddexp(log_q + math.log(beta), log_s + math.log1p(-beta))
        log_m = torch.where(exists, log_m, 0)
        terms = beta * torch.where(has_q, q * (log_q_safe - log_m), 0) \
            + (1 - beta) * torch.where(exists, log_s.exp() * (log_s - log_m), 0)
    return terms.sum(dim=1)
