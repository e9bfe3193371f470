"""The KD loss of synth/kd_loss.py as fused Triton kernels: logits only ever as one tile in registers.

Contract: `kd_loss_triton(hidden, weight, targets, *, alpha, temperature, divergence, beta, chunk_size)`
has kd_loss's signature and semantics (synth/kd_loss.py's docstring: the loss, the K+1 buckets, the
tail's log-mass taken directly, -inf padding, ignored positions with exactly zero gradient, a zero
loss that backpropagates when no position is valid, gradients stored in the forward and only scaled
in the backward, the loss in float32, gradients in the inputs' dtypes). It validates its inputs with
kd_loss's own checks and takes the teacher's buckets and the divergence (`_teacher`, `_divergence`)
from kd_loss.py, so the two cannot drift apart. chunk_size is checked and unused (no chunks here).
Inputs: float32, bfloat16 or float16, on CUDA (or CPU tensors under Triton's interpreter:
TRITON_INTERPRET=1 set before this module is imported and while it runs, `INTERPRETED`); float64 is
refused (the kernels accumulate in float32: use kd_loss). Under torch.no_grad only the loss is computed.

All three divergences run in the same passes. Every divergence here is a function of the K+1 bucket
log-masses only, log s_i = u_i - lse(u) (top-K) and log s_tail = lse_tail(u) - lse(u), so with
g_b = dD/d(log s_b) (per row, K+1 numbers) the chain rule gives, for u = z / T,

    dD/du_j = A * softmax(u)_j + B * [j in tail] * softmax(u over the tail)_j + sum_i g_i [j = id_i],
    A = -(sum_i g_i + g_tail),   B = g_tail

(forward KL: g = -q, so A = 1 and B = -q_tail: kd_loss.py's analytic form). The per-row numbers
(lse's, g, A, B) come from three log-sum-exps per row; D and g are computed in PyTorch on (N, K+1)
tensors by autograd through kd_loss's `_divergence`: cheap, exact, and one definition of the maths.

Passes (grids over tiles of BLOCK_M rows x BLOCK_V vocabulary columns; each tile's logits are the
dot of BLOCK_H-wide slices of hidden and weight, accumulated in float32):
1. `_stats_kernel`, grid (row blocks, vocab splits): per row, online over the vocab tiles of its
   split, lse(z) (CE, T = 1; only when T != 1), lse(z / T) and lse(z / T over the tail): the tile's
   columns less the row's valid top-K ids, each id compared with the tile's columns (a k none of
   whose row-block ids falls in the tile is skipped: at V = 152k most are). It also gathers z at the
   top-K ids and the label (each id lies in one tile: a plain store). The splits' partial lse's are
   combined in PyTorch.
2. PyTorch: per-row CE and D, the loss, and the per-row coefficients of the logit gradient
   G = a_ce (softmax(z) - onehot(label)) + a_kd / T * dD/du   (a_ce = alpha / n, a_kd = (1 - alpha) T^2 / n).
3. `_dh_kernel`, grid (row blocks, vocab splits): recomputes each tile's z, forms G (dense terms,
   tail mask, and the sparse top-K and label terms added inside the tile: no gather of weight rows in
   PyTorch) and accumulates G @ W_tile into its own rows of a float32 dH (one buffer per split, summed
   in PyTorch). `_dw_kernel`, grid (vocab tiles): recomputes z and G for its tile and every row
   block and accumulates G^T @ H_rows into its own rows of a float32 dW.
Two gradient kernels and no atomics: every output element has one owner program that adds its parts
in a fixed order, so the gradients are deterministic (synth compares seeded replicas; fp32 atomics
would make two runs of one seed differ) and no two programs contend for an address. The price is one
more recompute of the logits (forward: 1 matmul-unit of N x V x H; backward: 2 recomputes + 2
gradient products, against 1 + 2 with atomics); dW is skipped when the weight needs no gradient
(a frozen or LoRA-wrapped lm_head), dH when hidden needs none. The accumulators are float32 in
global memory, read and written once per tile (their rows do not fit a program's registers at
H = 896..2048); that traffic (dH: N V H / BLOCK_V, dW: V N H / BLOCK_M elements, each way) rather than
the tensor-core work may bound the time on a GPU: bench/gpu_check.py measures it.
The tensor-core inputs are the inputs' dtype (G is rounded to it for the two gradient products, as
fused-linear losses do; n G for bf16/fp16, so that float16 keeps its small entries); float32 inputs use
TF32 only when torch.backends.cuda.matmul.allow_tf32 is on, as torch's own matmul does (the
interpreter's bf16 dot is wrong in triton 3.7 to 3.9, so under it the operands are widened to float32
first: `DOT_F32`, the same exact products). Memory besides inputs and
gradients: dW in float32 while accumulating (as kd_loss), dH in float32 per split (splits only when
the row blocks are fewer than twice the GPU's SMs), and O(N K) per-row numbers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from synth.kd_loss import IGNORE_INDEX, SparseTargets, _check, _divergence, _teacher, stored_gradients

# tile sizes on a GPU (rows, vocabulary columns, hidden slice) and warps; the interpreter runs smaller ones
GPU_BLOCKS = (64, 128, 64)
GPU_WARPS = 8
GPU_STAGES = 3
INTERPRETER_BLOCKS = (16, 32, 16)
MAX_SPLITS = 8  # vocab splits of the row-block kernels (a dH buffer each)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """z = hidden[rows] @ weight[cols].T for one tile, float32 (zero outside the rows/cols in range)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * H + hh[None, :], mask=row_ok[:, None] & h_ok[None, :],
                    other=0.0)
        b = tl.load(w_ptr + cols[:, None].to(tl.int64) * H + hh[None, :], mask=col_ok[:, None] & h_ok[None, :],
                    other=0.0)
        if DOT_F32:  # the interpreter's bf16 dot is wrong (triton 3.7-3.9): exact products in float32 instead
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_update(m, s, x):
    """Online log-sum-exp: the running (max, sum of exp(x - max)) of each row after the tile x (-inf: no mass)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no mass yet: no -inf - -inf
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, s


@triton.jit
def _stats_kernel(h_ptr, w_ptr, ids_ptr, lab_ptr, part_ptr, zk_ptr, zlab_ptr,
                  n, V, H, K, inv_t, tiles_per_split, n_tiles,
                  DO_Z: tl.constexpr, DO_KD: tl.constexpr, DO_LABEL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """Per row, over this program's vocab split: partial lse(z), lse(z/T), lse(z/T over the tail) into
    part[0..2, split, row]; z at the top-K ids and at the label (where they fall in this split)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    labels = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    neg = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    m_z, s_z, m_u, s_u, m_t, s_t = neg, zero, neg, zero, neg, zero
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        v0 = t * BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, BLOCK_M, BLOCK_V, BLOCK_H, PRECISION, DOT_F32)
        if DO_Z:
            m_z, s_z = _lse_update(m_z, s_z, tl.where(col_ok[None, :], z, -float("inf")))
        if DO_LABEL:
            hit = cols[None, :] == labels[:, None]
            inside = (labels >= v0) & (labels < v0 + BLOCK_V)
            tl.store(zlab_ptr + rows, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=inside)
        if DO_KD:
            u = tl.where(col_ok[None, :], z * inv_t, -float("inf"))
            m_u, s_u = _lse_update(m_u, s_u, u)
            member = (rows[:, None] < 0) & (cols[None, :] < 0)  # all False, (BLOCK_M, BLOCK_V)
            for k in range(K):
                idk = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)  # -1: padding, never a column
                inside = (idk >= v0) & (idk < v0 + BLOCK_V)
                if tl.max(inside.to(tl.int32), axis=0) > 0:  # most tiles hold none of the k-th ids
                    hit = cols[None, :] == idk[:, None]
                    member = member | hit
                    tl.store(zk_ptr + rows * K + k, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=inside)
            m_t, s_t = _lse_update(m_t, s_t, tl.where(member, -float("inf"), u))
    out = part_ptr + pid_s * n + rows
    plane = n_splits * n
    if DO_Z:
        tl.store(out, m_z + tl.log(tl.maximum(s_z, 1.0)), mask=row_ok)
    if DO_KD:
        # s >= 1 wherever m is finite (the max's own term); s = 0 only with m = -inf (no mass): no log(0)
        tl.store(out + plane, m_u + tl.log(tl.maximum(s_u, 1.0)), mask=row_ok)
        tl.store(out + 2 * plane, m_t + tl.log(tl.maximum(s_t, 1.0)), mask=row_ok)


@triton.jit
def _grad_tile(z, rows, cols, row_ok, col_ok, v0, ids_ptr, lab_ptr, rowc_ptr, ck_ptr, n, K, inv_t, a_label,
               DO_Z: tl.constexpr, DO_KD: tl.constexpr, DO_LABEL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """d loss / d z on one tile: cZ softmax(z) + cU softmax(z/T) + cT softmax(z/T over the tail)
    + ck at the top-K ids + a_label at the label; zero outside the rows and columns in range.
    rowc = [lse_z, lse_u, lse_tail, cZ, cU, cT] per row (6 planes of n)."""
    g = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    if DO_Z:
        lse_z = tl.load(rowc_ptr + rows, mask=row_ok, other=0.0)
        c_z = tl.load(rowc_ptr + 3 * n + rows, mask=row_ok, other=0.0)
        g += c_z[:, None] * tl.exp(z - lse_z[:, None])
    if DO_KD:
        lse_u = tl.load(rowc_ptr + n + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(rowc_ptr + 2 * n + rows, mask=row_ok, other=0.0)
        c_u = tl.load(rowc_ptr + 4 * n + rows, mask=row_ok, other=0.0)
        c_t = tl.load(rowc_ptr + 5 * n + rows, mask=row_ok, other=0.0)
        u = z * inv_t
        g += c_u[:, None] * tl.exp(u - lse_u[:, None])
        member = (rows[:, None] < 0) & (cols[None, :] < 0)
        for k in range(K):
            idk = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)
            inside = (idk >= v0) & (idk < v0 + BLOCK_V)
            if tl.max(inside.to(tl.int32), axis=0) > 0:
                hit = cols[None, :] == idk[:, None]
                member = member | hit
                ck = tl.load(ck_ptr + rows * K + k, mask=row_ok, other=0.0)
                g += tl.where(hit, ck[:, None], 0.0)
        # exp(-inf) = 0 on the top-K: the tail's softmax never sees them (and never overflows there)
        g += c_t[:, None] * tl.exp(tl.where(member, -float("inf"), u - lse_t[:, None]))
    if DO_LABEL:
        labels = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
        g += tl.where(cols[None, :] == labels[:, None], a_label, 0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)


@triton.jit
def _dh_kernel(h_ptr, w_ptr, ids_ptr, lab_ptr, rowc_ptr, ck_ptr, dh_ptr,
               n, V, H, K, inv_t, a_label, g_scale, tiles_per_split, n_tiles,
               DO_Z: tl.constexpr, DO_KD: tl.constexpr, DO_LABEL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
               DOT_F32: tl.constexpr):
    """dh[split, rows] += (g_scale G_tile) @ W_tile over this program's vocab split (its own rows of its own
    buffer)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    out = dh_ptr + pid_s.to(tl.int64) * n * H
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        v0 = t * BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, BLOCK_M, BLOCK_V, BLOCK_H, PRECISION, DOT_F32)
        g = _grad_tile(z, rows, cols, row_ok, col_ok, v0, ids_ptr, lab_ptr, rowc_ptr, ck_ptr, n, K, inv_t, a_label,
                       DO_Z, DO_KD, DO_LABEL, BLOCK_M, BLOCK_V)
        g = (g * g_scale).to(w_ptr.dtype.element_ty)
        if DOT_F32:
            g = g.to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < H
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * H + hh[None, :],
                        mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            if DOT_F32:
                w = w.to(tl.float32)
            ptrs = out + rows[:, None].to(tl.int64) * H + hh[None, :]
            mask = row_ok[:, None] & h_ok[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.dot(g, w, acc, input_precision=PRECISION), mask=mask)


@triton.jit
def _dw_kernel(h_ptr, w_ptr, ids_ptr, lab_ptr, rowc_ptr, ck_ptr, dw_ptr,
               n, V, H, K, inv_t, a_label, g_scale,
               DO_Z: tl.constexpr, DO_KD: tl.constexpr, DO_LABEL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
               DOT_F32: tl.constexpr):
    """dw[cols] += (g_scale G_tile)^T @ hidden[rows] over every row block (its own rows of dw)."""
    pid_v = tl.program_id(0)
    v0 = pid_v * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, BLOCK_M, BLOCK_V, BLOCK_H, PRECISION, DOT_F32)
        g = _grad_tile(z, rows, cols, row_ok, col_ok, v0, ids_ptr, lab_ptr, rowc_ptr, ck_ptr, n, K, inv_t, a_label,
                       DO_Z, DO_KD, DO_LABEL, BLOCK_M, BLOCK_V)
        gt = tl.trans((g * g_scale).to(h_ptr.dtype.element_ty))
        if DOT_F32:
            gt = gt.to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < H
            hv = tl.load(h_ptr + rows[:, None].to(tl.int64) * H + hh[None, :],
                         mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            if DOT_F32:
                hv = hv.to(tl.float32)
            ptrs = dw_ptr + cols[:, None].to(tl.int64) * H + hh[None, :]
            mask = col_ok[:, None] & h_ok[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.dot(gt, hv, acc, input_precision=PRECISION), mask=mask)


# the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)
INTERPRETED = type(_stats_kernel).__name__ == "InterpretedFunction"


def kd_loss_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: SparseTargets, *, alpha: float = 0.0,
                   temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                   chunk_size: int = 1024, blocks: tuple[int, int, int] | None = None,
                   splits: int | None = None) -> torch.Tensor:
    """synth.kd_loss.kd_loss computed by the fused kernels (module docstring): same arguments, same loss and
    gradients (to float32 rounding), the N x V logits never stored. chunk_size is checked and unused.
    blocks (BLOCK_M, BLOCK_V, BLOCK_H) and splits (vocab splits of the row-block kernels) override the tiling."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H) with the same H, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton KD kernel computes in float32 from float32, bfloat16 or float16 inputs, got "
                         f"{hidden.dtype}: use synth.kd_loss.kd_loss (kd.kernel: torch)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if hidden.device != weight.device or not (hidden.is_cuda or (INTERPRETED and hidden.device.type == "cpu")):
        raise ValueError(f"the Triton KD kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                         f"synth.kd_kernel is imported), got {hidden.device} and {weight.device}")
    _check(targets, hidden.shape[0], weight.shape[0], alpha, temperature, divergence, beta)
    # under no_grad (evaluation) the gradient kernels do not run (4 of the 5 logit products)
    return _FusedKD.apply(hidden, weight, targets.labels, targets.top_ids, targets.top_logprobs, float(alpha),
                          float(temperature), divergence, float(beta), blocks, splits, torch.is_grad_enabled())


def _tiling(n: int, vocab: int, device: torch.device, blocks, splits):
    if blocks is None:
        blocks = INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS
    block_m, block_v, _ = blocks
    n_tiles = triton.cdiv(vocab, block_v)
    if splits is None:
        if device.type == "cuda":  # enough programs for every SM twice over, when the row blocks alone are not
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = min(MAX_SPLITS, max(1, triton.cdiv(2 * sms, triton.cdiv(n, block_m))))
        else:
            splits = 2
    per_split = triton.cdiv(n_tiles, max(1, min(splits, n_tiles)))
    return blocks, n_tiles, per_split, triton.cdiv(n_tiles, per_split)


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, top_ids, top_logprobs, alpha, temperature, divergence, beta, blocks,
                splits, grad_enabled):
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        device, f32 = hidden.device, torch.float32
        vocab, width = weight.shape
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        n = rows.numel()
        grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if need_h else None
        grad_w = None
        if n == 0:
            grad_w = torch.zeros_like(weight) if need_w else None
            ctx.save_for_backward(grad_h, grad_w)
            return torch.zeros((), dtype=f32, device=device)
        t = temperature
        a_ce = alpha / n
        a_kd = (1 - alpha) * t * t / n
        do_kd = a_kd != 0
        do_label = a_ce != 0
        do_z = do_label and not (do_kd and t == 1.0)  # at T = 1 softmax(z) is softmax(u): one term
        h = hidden.index_select(0, rows).contiguous()
        w = weight.contiguous()
        y = labels.index_select(0, rows)
        lp = top_logprobs.index_select(0, rows).to(f32)
        in_k = torch.isfinite(lp)
        k = lp.shape[1]
        ids = torch.where(in_k, top_ids.index_select(0, rows), -1).to(torch.int32).contiguous()
        y32 = y.to(torch.int32).contiguous()
        blocks, n_tiles, per_split, n_splits = _tiling(n, vocab, device, blocks, splits)
        block_m, block_v, block_h = blocks
        # tl.dot reads input_precision for float32 operands only: TF32 exactly where torch's matmul would use it
        tf32 = hidden.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if device.type == "cuda" and tf32 else "ieee"
        launch = {} if INTERPRETED else {"num_warps": GPU_WARPS, "num_stages": GPU_STAGES}
        consts = {"BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_H": block_h, "PRECISION": precision,
                  "DOT_F32": INTERPRETED, **launch}
        flags = {"DO_Z": do_z, "DO_KD": do_kd, "DO_LABEL": do_label}

        # 1. per-row log-sum-exps (per split, combined here) and the logits at the top-K ids and label
        part = torch.full((3, n_splits, n), -math.inf, dtype=f32, device=device)
        zk = torch.zeros((n, k), dtype=f32, device=device)
        zlab = torch.zeros((n,), dtype=f32, device=device)
        _stats_kernel[(triton.cdiv(n, block_m), n_splits)](
            h, w, ids, y32, part, zk, zlab, n, vocab, width, k, 1.0 / t, per_split, n_tiles, **flags, **consts)
        lse = torch.logsumexp(part, dim=1)
        lse_u, lse_tail = lse[1], lse[2]
        lse_z = lse[0] if do_z else lse_u

        # 2. the loss and the per-row coefficients of d loss / d z (module docstring)
        loss = torch.zeros((), dtype=f32, device=device)
        c_z = torch.zeros_like(lse_u)
        c_u = torch.zeros_like(lse_u)
        c_t = torch.zeros_like(lse_u)
        ck = torch.zeros_like(zk)
        if do_label:
            loss = loss + a_ce * (lse_z - zlab).sum()
            if do_z:
                c_z += a_ce
            else:
                c_u += a_ce
        if do_kd:
            log_q_k, q_tail, tail_exists = _teacher(lp, in_k, vocab, t)
            # a row whose ids cover the vocabulary has no tail: a finite stand-in, its bucket is masked
            lse_tail = torch.where(tail_exists, lse_tail, lse_u)
            log_s_k = torch.where(in_k, zk * (1.0 / t) - lse_u[:, None], 0).requires_grad_()  # u as the tiles
            log_s_tail = torch.where(tail_exists, lse_tail - lse_u, 0).requires_grad_()
            with torch.enable_grad():
                d = _divergence(log_s_k, log_s_tail, log_q_k, q_tail, in_k, tail_exists, divergence, beta).sum()
                g_k, g_tail = torch.autograd.grad(d, (log_s_k, log_s_tail))
            loss = loss + a_kd * d.detach()
            scale = a_kd / t
            g_k = torch.where(in_k, g_k, 0)
            c_u += -(g_k.sum(dim=1) + g_tail) * scale
            c_t = g_tail * scale
            ck = g_k * scale
        if not (need_h or need_w):
            ctx.save_for_backward(None, None)
            return loss

        # 3. the gradients, tile by tile
        rowc = torch.stack([lse_z, lse_u, lse_tail, c_z, c_u, c_t]).contiguous()
        ck = ck.contiguous()
        args = (ids, y32, rowc, ck)
        # G carries the 1/n of the mean: float16 would flush much of it to zero (its smallest step is 6e-8),
        # so low-precision operands get n G, and the float32 sums are divided by n again
        g_scale = 1.0 if hidden.dtype == torch.float32 else float(n)
        scalars = (n, vocab, width, k, 1.0 / t, -a_ce, g_scale)
        if need_h:
            dh = torch.zeros((n_splits, n, width), dtype=f32, device=device)
            _dh_kernel[(triton.cdiv(n, block_m), n_splits)](h, w, *args, dh, *scalars, per_split, n_tiles,
                                                            **flags, **consts)
            grad_h.index_copy_(0, rows, (dh.sum(dim=0) / g_scale).to(hidden.dtype))
            del dh
        if need_w:
            dw = torch.zeros((vocab, width), dtype=f32, device=device)
            _dw_kernel[(n_tiles,)](h, w, *args, dw, *scalars, **flags, **consts)
            grad_w = (dw / g_scale if g_scale != 1.0 else dw).to(weight.dtype)
            del dw
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @once_differentiable  # the stored gradients are constants: a second derivative would be silently wrong
    def backward(ctx, grad_out):
        return (*stored_gradients(ctx, grad_out), None, None, None, None, None, None, None, None, None, None)
