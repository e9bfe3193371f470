"""synth/kd_loss.py: the chunked sparse KD loss against its plain full-logits oracle and against torch.

Proven here, in float64 on small random shapes unless said otherwise:
- kd_loss (chunked; analytic logit gradient for forward_kl, autograd per chunk for the others) equals
  reference_kd_loss (full log_softmax, explicit bucket sums, differentiated by torch) in value and in
  the gradients of hidden and weight, to ~1e-10 relative, for every divergence, several alpha and T,
  chunk sizes that do and do not divide the valid positions (1, and more than N);
- with K = V the forward and reverse KL are torch's exact KL between softmax(t / T) and softmax(z / T)
  (F.kl_div), at T = 1 and T != 1: this pins the temperature convention; alpha mixes torch's
  cross-entropy with T^2 times that KL, and alpha = 1 is F.cross_entropy(ignore_index=-100);
- the tail bucket: the analytic forward-KL gradient equals torch's at teacher tails of 0, tiny and
  large, and the bucket formulas give the numbers worked by hand on V = 4, K = 2 (at T = 1 and 2);
  in float32 a student tail of ~1e-7 still gives the float64 figures (the tail's log-sum-exp is
  taken directly, not as a difference);
- ignored positions (label -100) change nothing and get a zero gradient; all ignored: a zero loss
  that backpropagates; -inf padding entries (any id, duplicates) equal the same targets without them;
- the jsd ends: D / beta -> forward KL as beta -> 0, D / (1 - beta) -> reverse KL as beta -> 1;
- bf16 inputs run, match float32 (stated tolerances) and give bf16 gradients; gradcheck passes for
  each divergence; the autograd node stores only the two gradients (no N x V tensor); bad inputs
  raise ValueError; bench/kd_loss.py --quick runs and ends with its JSON line.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_quick
from synth.kd_loss import DIVERGENCES, SparseTargets, kd_loss, reference_kd_loss

INF = math.inf


def make_case(seed: int, n: int, h: int, v: int, k: int, *, dtype=torch.float64, pad: bool = True):
    """hidden, weight (requiring grad), teacher top-K targets from random teacher logits; ~1/4 of the
    labels ignored; with pad, some rows lose trailing alternatives to -inf padding (duplicate or
    out-of-range ids) and every row's entries are shuffled, so padding sits anywhere."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=dtype) * 0.6).requires_grad_()
    teacher = torch.randn(n, v, generator=gen, dtype=dtype) * 2
    lp, ids = torch.log_softmax(teacher, dim=-1).topk(k, dim=-1)
    if pad and k > 1:
        for row in range(0, n, 3):
            keep = int(torch.randint(0, k, (), generator=gen))  # 0..k-1 kept (0: a row of padding only)
            lp[row, keep:] = -INF
            ids[row, keep:] = torch.tensor([ids[row, 0], v + 3, -1, 0] * k)[: k - keep]
        order = torch.argsort(torch.rand(n, k, generator=gen), dim=1)
        lp, ids = lp.gather(1, order), ids.gather(1, order)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.25] = -100
    return hidden, weight, SparseTargets(labels, ids, lp), teacher


def chunked(hidden, weight, targets, **kw):
    loss = kd_loss(hidden, weight, targets, **kw)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


def oracle(hidden, weight, targets, **kw):
    loss = reference_kd_loss(hidden @ weight.T, targets, **kw)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


def assert_close(got, want, rel):
    """Every tensor within rel of the largest magnitude of its counterpart."""
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        err = (g - w).abs().max().item()
        assert err <= rel * max(w.abs().max().item(), 1e-300), (err, w.abs().max().item())


# (seed, N, H, V, K, chunk_size): chunk sizes that divide the valid positions and that do not, 1, > N
SHAPES = [(0, 7, 8, 50, 1, 1), (1, 23, 12, 97, 5, 4), (2, 40, 16, 300, 17, 7), (3, 31, 9, 64, 64, 1000),
          (4, 12, 8, 60, 59, 5)]
MIXES = [(0.0, 1.0), (0.0, 2.5), (0.4, 0.6), (1.0, 1.0)]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{1}-V{3}-K{4}-c{5}".format(*s))
def test_chunked_equals_reference(divergence, shape):
    seed, n, h, v, k, chunk = shape
    hidden, weight, targets, _ = make_case(seed, n, h, v, k)
    for alpha, t in MIXES:
        kw = {"alpha": alpha, "temperature": t, "divergence": divergence, "beta": 0.3 + 0.1 * seed}
        assert_close(chunked(hidden, weight, targets, chunk_size=chunk, **kw),
                     oracle(hidden, weight, targets, **kw), 1e-10)


def full_support(seed, n=20, h=10, v=40):
    """K = V: the teacher's whole distribution as targets, its ids in a shuffled order."""
    hidden, weight, _, teacher = make_case(seed, n, h, v, 1, pad=False)
    order = torch.argsort(torch.rand(n, v, generator=torch.Generator().manual_seed(seed)), dim=1)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    labels[::4] = -100
    return hidden, weight, SparseTargets(labels, order, torch.log_softmax(teacher, -1).gather(1, order)), teacher


@pytest.mark.parametrize("t", [1.0, 0.5, 2.5])
def test_full_support_is_exact_kl(t):
    hidden, weight, targets, teacher = full_support(5)
    valid = targets.labels != -100

    def exact(direction, h, w):
        log_s = torch.log_softmax((h @ w.T)[valid] / t, -1)
        log_q = torch.log_softmax(teacher[valid] / t, -1)
        if direction == "forward_kl":  # kl_div(input, target) = KL(target || input)
            return F.kl_div(log_s, log_q, reduction="batchmean", log_target=True)
        return F.kl_div(log_q, log_s, reduction="batchmean", log_target=True)

    for divergence in ("forward_kl", "reverse_kl"):
        got = chunked(hidden, weight, targets, temperature=t, divergence=divergence, chunk_size=6)
        want = exact(divergence, hidden, weight) * t * t
        assert_close(got, (want, *torch.autograd.grad(want, (hidden, weight))), 1e-10)


def test_alpha_mixes_cross_entropy_and_t_squared_kl():
    hidden, weight, targets, teacher = full_support(6)
    valid = targets.labels != -100
    ce = F.cross_entropy(hidden @ weight.T, targets.labels, ignore_index=-100)
    assert_close(chunked(hidden, weight, targets, alpha=1.0, temperature=3.0, chunk_size=5),
                 (ce, *torch.autograd.grad(ce, (hidden, weight))), 1e-12)
    for alpha, t in [(0.3, 1.0), (0.7, 2.0), (0.5, 0.5)]:
        ce = F.cross_entropy(hidden @ weight.T, targets.labels, ignore_index=-100)
        kl = F.kl_div(torch.log_softmax((hidden @ weight.T)[valid] / t, -1),
                      torch.log_softmax(teacher[valid] / t, -1), reduction="batchmean", log_target=True)
        want = alpha * ce + (1 - alpha) * t * t * kl
        assert_close(chunked(hidden, weight, targets, alpha=alpha, temperature=t, chunk_size=5),
                     (want, *torch.autograd.grad(want, (hidden, weight))), 1e-10)


def test_forward_kl_gradient_at_small_and_large_teacher_tails():
    """The analytic gradient (kd_loss) vs torch's gradient of the oracle, by teacher tail: exactly 0
    (probabilities summing to 1 exactly), ~1e-13, 0.95, and one token of tail (K = V - 1)."""
    n, h, v, k = 16, 8, 30, 4
    hidden, weight, targets, _ = make_case(7, n, h, v, k, pad=False)
    lp = targets.top_logprobs.clone()
    ids = targets.top_ids.clone()
    lp[0:4] = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64).log()  # tail exactly 0
    lp[4:8] = torch.log_softmax(lp[4:8], -1) - 1e-13                                # tail ~1e-13
    lp[8:12] = torch.log_softmax(lp[8:12], -1) + math.log(0.05)                     # tail 0.95
    tail = 1 - lp.exp().sum(-1)
    assert (tail[0:4] == 0).all() and (tail[8:12] - 0.95).abs().max() < 1e-12 and (tail[4:8] > 0).all()
    one_left = SparseTargets(targets.labels, torch.arange(v - 1).expand(n, v - 1),  # K = V - 1
                             torch.log_softmax(torch.randn(n, v, dtype=torch.float64), -1)[:, : v - 1])
    for tg in (SparseTargets(targets.labels, ids, lp), one_left):
        for alpha, t in [(0.0, 1.0), (0.4, 1.7), (0.0, 0.4)]:
            kw = {"alpha": alpha, "temperature": t}
            assert_close(chunked(hidden, weight, tg, chunk_size=3, **kw), oracle(hidden, weight, tg, **kw), 1e-10)


def test_hand_worked_buckets():
    """V = 4, K = 2. Student logits ln[4, 2, 1, 1]: s = [1/2, 1/4, 1/8, 1/8]. Teacher top ids [1, 0]
    with p = [0.5, 0.3], so p_tail = 0.2. Buckets (id 1, id 0, tail): q = [0.5, 0.3, 0.2], s = [0.25,
    0.5, 0.25]. hidden = the logits and weight = I, so the logit gradient is hidden's gradient."""
    hidden = torch.tensor([[4.0, 2.0, 1.0, 1.0]], dtype=torch.float64).log().requires_grad_()
    weight = torch.eye(4, dtype=torch.float64).requires_grad_()
    targets = SparseTargets(torch.tensor([0]), torch.tensor([[1, 0]]),
                            torch.tensor([[0.5, 0.3]], dtype=torch.float64).log())
    ln = math.log
    forward = 0.5 * ln(0.5 / 0.25) + 0.3 * ln(0.3 / 0.5) + 0.2 * ln(0.2 / 0.25)  # 0.1486971928873...
    reverse = 0.25 * ln(0.25 / 0.5) + 0.5 * ln(0.5 / 0.3) + 0.25 * ln(0.25 / 0.2)  # 0.1379119045715...
    m = [0.375, 0.4, 0.225]  # (q + s) / 2
    jsd = 0.5 * (0.5 * ln(0.5 / m[0]) + 0.3 * ln(0.3 / m[1]) + 0.2 * ln(0.2 / m[2])) \
        + 0.5 * (0.25 * ln(0.25 / m[0]) + 0.5 * ln(0.5 / m[1]) + 0.25 * ln(0.25 / m[2]))  # 0.0352627174517...
    for divergence, want in (("forward_kl", forward), ("reverse_kl", reverse), ("jsd", jsd)):
        for fn in (chunked, oracle):
            assert fn(hidden, weight, targets, divergence=divergence)[0].item() == pytest.approx(want, rel=1e-14)
    # forward KL's logit gradient: s - q on the top-K, s_j (1 - q_tail / s_tail) = 1/8 * (1 - 0.8) on the tail
    _, grad_h, _ = chunked(hidden, weight, targets)
    assert grad_h[0].tolist() == pytest.approx([0.5 - 0.3, 0.25 - 0.5, 0.025, 0.025], abs=1e-15)
    # a teacher with no tail (p = [0.5, 0.5]): forward KL gives the tail nothing; reverse KL floors q_tail at 1e-20
    no_tail = SparseTargets(targets.labels, targets.top_ids, torch.tensor([[0.5, 0.5]], dtype=torch.float64).log())
    assert chunked(hidden, weight, no_tail)[0].item() == pytest.approx(0.5 * ln(0.5 / 0.25), rel=1e-14)
    want = 0.25 * ln(0.25 / 0.5) + 0.5 * ln(0.5 / 0.5) + 0.25 * ln(0.25 / 1e-20)
    for fn in (chunked, oracle):
        assert fn(hidden, weight, no_tail, divergence="reverse_kl")[0].item() == pytest.approx(want, rel=1e-14)
    # T = 2: s ~ [2, sqrt 2, 1, 1]; the teacher's two share their 0.8 as sqrt(p), the tail stays 0.2
    r2, r3, r5 = math.sqrt(2), math.sqrt(0.3), math.sqrt(0.5)
    s = [r2 / (4 + r2), 2 / (4 + r2), 2 / (4 + r2)]
    q = [0.8 * r5 / (r5 + r3), 0.8 * r3 / (r5 + r3), 0.2]
    want = 4 * sum(qb * ln(qb / sb) for qb, sb in zip(q, s))
    assert chunked(hidden, weight, targets, temperature=2.0)[0].item() == pytest.approx(want, rel=1e-14)


def test_float32_small_student_tail():
    """A confident float32 student (its top-4 hold all but ~1e-8 of the mass: logits ~20 above the rest)
    against a teacher tail of 1e-2: the tail's log-mass is taken directly, so loss and gradients keep
    float64's figures. (As log1mexp(lse_K - lse_all) it would be -inf at every row here, and the loss
    infinite: in float32, lse_K and lse_all ~20 are equal to their ulp of 2e-6.)"""
    n, v, k = 12, 64, 4
    gen = torch.Generator().manual_seed(8)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64).scatter_add(1, ids, torch.full((n, k), 20.0,
                                                                                                  dtype=torch.float64))
    hidden, weight = logits.requires_grad_(), torch.eye(v, dtype=torch.float64).requires_grad_()  # logits = hidden
    lp = torch.log_softmax(torch.randn(n, k, generator=gen, dtype=torch.float64), -1) + math.log(0.99)
    targets = SparseTargets(torch.randint(0, v, (n,), generator=gen), ids, lp)
    s_tail = 1 - torch.softmax(logits, -1).gather(1, ids).sum(-1)
    assert s_tail.max() < 2e-7
    want = oracle(hidden, weight, targets, alpha=0.2)
    h32, w32 = (x.detach().float().requires_grad_() for x in (hidden, weight))
    got = chunked(h32, w32, SparseTargets(targets.labels, ids, lp.float()), alpha=0.2, chunk_size=5)
    assert_close([g.double() for g in got], want, 1e-5)


def test_ignored_positions_change_nothing():
    hidden, weight, targets, _ = make_case(9, 25, 8, 70, 6)
    ignored = targets.labels == -100
    assert 0 < ignored.sum() < 25
    base = chunked(hidden, weight, targets, alpha=0.3, temperature=1.5, chunk_size=4)
    assert (base[1][ignored] == 0).all()
    other_h = torch.where(ignored[:, None], torch.randn_like(hidden) * 50, hidden).detach().requires_grad_()
    other_t = SparseTargets(targets.labels, torch.where(ignored[:, None], -5, targets.top_ids),  # garbage ids
                            torch.where(ignored[:, None], torch.nan, targets.top_logprobs))
    for divergence in DIVERGENCES:
        kw = {"alpha": 0.3, "temperature": 1.5, "divergence": divergence, "chunk_size": 4}
        a, b = chunked(hidden, weight, targets, **kw), chunked(other_h, weight, other_t, **kw)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_all_ignored_is_a_zero_that_backpropagates():
    hidden, weight, targets, _ = make_case(10, 6, 8, 30, 3)
    targets = SparseTargets(torch.full((6,), -100), targets.top_ids, targets.top_logprobs)
    for divergence in DIVERGENCES:
        loss = kd_loss(hidden, weight, targets, alpha=0.5, divergence=divergence)
        assert loss.item() == 0 and loss.grad_fn is not None
        loss.backward()
        assert (hidden.grad == 0).all() and (weight.grad == 0).all()
        hidden.grad = weight.grad = None
    assert reference_kd_loss(hidden @ weight.T, targets).item() == 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_entries_are_not_buckets(divergence):
    hidden, weight, targets, _ = make_case(11, 14, 8, 40, 3, pad=False)
    ids, lp = targets.top_ids, targets.top_logprobs
    # interleave three padding entries: a duplicate of a real id, an out-of-range id, id 0
    pad_ids = torch.stack([ids[:, 1], torch.full_like(ids[:, 0], 999), torch.zeros_like(ids[:, 0])], 1)
    wide_ids = torch.stack([pad_ids[:, 0], ids[:, 0], pad_ids[:, 1], ids[:, 1], ids[:, 2], pad_ids[:, 2]], 1)
    wide_lp = torch.stack([torch.full_like(lp[:, 0], -INF), lp[:, 0], torch.full_like(lp[:, 0], -INF),
                           lp[:, 1], lp[:, 2], torch.full_like(lp[:, 0], -INF)], 1)
    padded = SparseTargets(targets.labels, wide_ids, wide_lp)
    for alpha, t in [(0.0, 1.0), (0.3, 2.0)]:
        kw = {"alpha": alpha, "temperature": t, "divergence": divergence, "chunk_size": 4}
        assert_close(chunked(hidden, weight, padded, **kw), chunked(hidden, weight, targets, **kw), 1e-13)
        assert_close(oracle(hidden, weight, padded, **kw), oracle(hidden, weight, targets, **kw), 1e-13)


def test_jsd_ends_are_the_two_kls():
    hidden, weight, targets, _ = make_case(12, 10, 8, 40, 5)
    fwd, rev = (kd_loss(hidden, weight, targets, divergence=d).item() for d in ("forward_kl", "reverse_kl"))
    eps = 1e-5
    assert kd_loss(hidden, weight, targets, divergence="jsd", beta=eps).item() / eps == pytest.approx(fwd, rel=1e-3)
    assert kd_loss(hidden, weight, targets, divergence="jsd", beta=1 - eps).item() / eps == \
        pytest.approx(rev, rel=1e-3)


def test_frozen_tied_weight():
    hidden, weight, targets, _ = make_case(13, 9, 8, 30, 4)
    frozen = weight.detach()
    loss = kd_loss(hidden, frozen, targets, alpha=0.2)
    loss.backward()
    want = torch.autograd.grad(reference_kd_loss(hidden @ frozen.T, targets, alpha=0.2), hidden)[0]
    assert frozen.grad is None
    assert_close([hidden.grad], [want], 1e-10)


def test_bf16_inputs():
    """bf16 hidden and weight: the chunk's logits are float32, so kd_loss equals the float32 loss on the
    same (rounded) inputs to float32 precision (1e-5), and the float32 loss on the unrounded inputs
    within 2e-2 relative (bf16's 8 bits of mantissa in hidden and weight); gradients come back bf16,
    within bf16's rounding (1e-2 of the largest) of the float32 ones."""
    hidden, weight, targets, _ = make_case(14, 33, 16, 200, 8, dtype=torch.float32)
    targets = SparseTargets(targets.labels, targets.top_ids, targets.top_logprobs)
    hb, wb = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    hr, wr = (x.detach().float().requires_grad_() for x in (hb, wb))
    for divergence in DIVERGENCES:
        kw = {"alpha": 0.3, "temperature": 2.0, "divergence": divergence, "chunk_size": 8}
        loss, gh, gw = chunked(hb, wb, targets, **kw)
        assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
        same = chunked(hr, wr, targets, **kw)
        assert loss.item() == pytest.approx(same[0].item(), rel=1e-5)
        assert_close([gh.float(), gw.float()], same[1:], 1e-2)
        unrounded = oracle(hidden, weight, targets, **kw)
        assert loss.item() == pytest.approx(unrounded[0].item(), rel=2e-2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence):
    hidden, weight, targets, _ = make_case(15, 5, 3, 7, 3)
    torch.autograd.gradcheck(
        lambda h, w: kd_loss(h, w, targets, alpha=0.3, temperature=1.5, divergence=divergence, chunk_size=2),
        (hidden, weight))


def test_stores_only_the_gradients():
    hidden, weight, targets, _ = make_case(16, 20, 8, 90, 4)
    loss = kd_loss(hidden, weight, targets, chunk_size=3)
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [(20, 8), (90, 8)]
    with pytest.raises(RuntimeError):  # the stored gradients are constants: no second derivative
        (g,) = torch.autograd.grad(loss, hidden, create_graph=True)
        g.sum().backward()


def bad(**change):
    hidden, weight, targets, _ = make_case(17, 6, 4, 20, 3, pad=False)
    fields = {"labels": targets.labels, "top_ids": targets.top_ids, "top_logprobs": targets.top_logprobs}
    kw = {k: change.pop(k) for k in list(change) if k not in fields and k not in ("hidden", "weight")}
    return change.get("hidden", hidden), change.get("weight", weight), \
        SparseTargets(**{k: change.get(k, v) for k, v in fields.items()}), kw


@pytest.mark.parametrize("case, match", [
    (dict(divergence="kl"), "divergence"),
    (dict(alpha=1.5), "alpha"),
    (dict(temperature=0.0), "temperature"),
    (dict(divergence="jsd", beta=1.0), "beta"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(weight=torch.randn(20, 5, dtype=torch.float64)), "same H"),
    (dict(weight=torch.randn(20, 4)), "dtype"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), "labels"),
    (dict(labels=torch.full((6,), 20)), r"labels must be in \[0, 20\)"),
    (dict(top_ids=torch.zeros(6, 0, dtype=torch.int64), top_logprobs=torch.zeros(6, 0)), "K >= 1"),
    (dict(top_ids=torch.zeros(6, 3, dtype=torch.int32)), "top_ids"),
    (dict(top_logprobs=torch.zeros(6, 2, dtype=torch.float64)), "top_logprobs"),
    (dict(top_logprobs=torch.full((6, 3), math.nan, dtype=torch.float64)), "top_logprobs"),
    (dict(top_ids=torch.full((6, 3), 20)), "top_ids"),
    (dict(top_ids=torch.tensor([[1, 2, 1]] * 6)), "repeat"),
])
def test_bad_inputs(case, match):
    hidden, weight, targets, kw = bad(**case)
    with pytest.raises(ValueError, match=match):
        kd_loss(hidden, weight, targets, **kw)
    if "hidden" not in case and "weight" not in case and "chunk_size" not in kw:
        with pytest.raises(ValueError, match=match):
            reference_kd_loss(hidden @ weight.T, targets, **kw)


def test_bench_quick():
    out = bench_quick("kd_loss.py", timeout=300)
    assert out["bench"] == "kd_loss" and out["unit"].startswith("MiB")
    assert out["value"] > 0 and out["baseline"] > 0 and out["ratio"] == pytest.approx(out["value"] / out["baseline"],
                                                                                        rel=1e-2)
