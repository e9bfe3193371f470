"""synth/kd_kernel.py: the fused Triton KD loss against synth/kd_loss.py (its oracle and its chunked loss),
and the train stage's choice between them (synth/kd_train.py's kd.kernel).

Without a GPU the kernels run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET=1 when @triton.jit
decorates a kernel (so it is set before synth.kd_kernel is imported) and again while an interpreted kernel
runs (parts of triton imported on first launch assert it), so it is set for this module's tests
(`interpreter`) and put back as it was after each: other test files in the process keep their setting.
On a CUDA machine the same tests run on the GPU. Without triton the kernel tests skip with that reason;
the choice tests (kernel_choice, check_kd, kd_setup) are pure and always run. Shapes are tiny: the
interpreter runs each program's tile ops in numpy (the file takes ~35 s on one core).

Tolerances (|got - want| <= tol * max |want|, each tensor; the loss relative):
- float32 inputs vs reference_kd_loss on float64 copies (full logits, torch autograd): 1e-5 for forward KL
  and the JSD, 5e-5 for reverse KL (its log 1e-20 floor on an empty teacher tail multiplies float32
  rounding; kd_loss's chunked loss shows the same ~2e-5);
- float32 vs kd_loss (chunked) in float32: the same figures;
- bfloat16 (float16) inputs vs kd_loss on the same inputs: loss 1e-5 relative (the kernel's products of
  bf16/fp16 operands are exact in its float32 sums), gradients 2e-2 (4e-3) (the kernel rounds each logit
  gradient G to the inputs' dtype for the tensor-core products, kd_loss keeps it float32 until the final
  gradient: 2^-8 (2^-11) per element).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synth.errors import SynthError
from synth.kd_loss import DIVERGENCES, SparseTargets, kd_loss, reference_kd_loss
from synth.kd_train import KD_DEFAULTS, check_kd, kernel_choice

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INF = math.inf


def _import_kernel():
    """synth.kd_kernel with its kernels interpreted on CPU (no GPU), else None and why."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (it is in the dev extra: ./scripts/setup)"
    previous = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module("synth.kd_kernel")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    if not CUDA and not module.INTERPRETED:
        return None, "synth.kd_kernel was imported in this process before TRITON_INTERPRET=1 was set (no GPU here)"
    return module, None


kd_kernel, WHY = _import_kernel()
needs_kernel = pytest.mark.skipif(kd_kernel is None, reason=f"Triton KD kernel not runnable: {WHY}")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 while a test runs the interpreted kernels (no GPU), restored afterwards."""
    if kd_kernel is not None and kd_kernel.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
TOL = {"forward_kl": 1e-5, "reverse_kl": 5e-5, "jsd": 1e-5}


def make_case(seed, n, h, v, k, *, pad=True, ignored=0.25, dtype=torch.float32):
    """hidden, weight (requiring grad) on DEVICE; teacher top-K from random teacher logits; ~ignored of the
    labels -100; with pad, every third row loses trailing alternatives to -inf padding (out-of-range,
    negative or duplicate ids) and each row's entries are shuffled."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.6
    lp, ids = torch.log_softmax(torch.randn(n, v, generator=gen, dtype=torch.float64) * 2, -1).topk(k, dim=-1)
    if pad and k > 1:
        for row in range(0, n, 3):
            keep = int(torch.randint(0, k, (), generator=gen))
            lp[row, keep:] = -INF
            ids[row, keep:] = torch.tensor([ids[row, 0], v + 3, -1, 0] * k)[: k - keep]
        order = torch.argsort(torch.rand(n, k, generator=gen), dim=1)
        lp, ids = lp.gather(1, order), ids.gather(1, order)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored] = -100
    leaf = [x.to(dtype).to(DEVICE).requires_grad_() for x in (hidden, weight)]
    targets = SparseTargets(labels.to(DEVICE), ids.to(DEVICE), lp.float().to(DEVICE))
    return leaf[0], leaf[1], targets


def run(fn, hidden, weight, targets, **kw):
    loss = fn(hidden, weight, targets, **kw)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


def kernel(hidden, weight, targets, **kw):
    return run(kd_kernel.kd_loss_triton, hidden, weight, targets, **kw)


def oracle64(hidden, weight, targets, **kw):
    """reference_kd_loss on float64 copies: full logits, torch's autograd."""
    h, w = (x.detach().double().requires_grad_() for x in (hidden, weight))
    t = SparseTargets(targets.labels, targets.top_ids, targets.top_logprobs.double())
    kw.pop("chunk_size", None)
    loss = reference_kd_loss(h @ w.T, t, **kw)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def assert_close(got, want, tol, loss_rel=None):
    """The loss within loss_rel (default tol) relative; each gradient within tol of its largest magnitude."""
    loss_g, *grads_g = got
    loss_w, *grads_w = want
    assert math.isfinite(loss_g.item())
    assert loss_g.item() == pytest.approx(loss_w.item(), rel=loss_rel or tol, abs=1e-7)
    for g, w in zip(grads_g, grads_w, strict=True):
        assert g.shape == w.shape and torch.isfinite(g).all()
        err = (g.double() - w.double()).abs().max().item()
        assert err <= tol * max(w.double().abs().max().item(), 1e-30), (err, w.abs().max().item())


# (seed, N, H, V, K): V never a multiple of the interpreter's 32-column tiles nor N of its 16-row blocks;
# K = 1, 8, 20; V = 300 spreads each row block's ids over 10 tiles (the tiles holding none are skipped).
# (alpha, T): alpha 0, 0.5 and 1, T 1 and 2 (at T = 1 CE and KD share one softmax term); fewer mixes for the
# slowest shape in the interpreter
SHAPES = [(0, 13, 16, 50, 1), (1, 37, 24, 97, 8), (2, 21, 16, 300, 20)]
ALL_MIXES = [(0.0, 1.0), (0.5, 1.0), (0.5, 2.0), (1.0, 2.0), (0.0, 2.0)]
MIXES = {1: ALL_MIXES, 8: ALL_MIXES, 20: [(0.0, 2.0), (0.5, 1.0)]}


@needs_kernel
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{1}-V{3}-K{4}".format(*s))
def test_kernel_equals_reference_and_chunked(divergence, shape):
    seed, n, h, v, k = shape
    hidden, weight, targets = make_case(seed, n, h, v, k)
    for alpha, t in MIXES[k]:
        kw = {"alpha": alpha, "temperature": t, "divergence": divergence, "beta": 0.3}
        got = kernel(hidden, weight, targets, **kw)
        assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
        assert_close(got, oracle64(hidden, weight, targets, **kw), TOL[divergence])
        assert_close(got, run(kd_loss, hidden, weight, targets, chunk_size=8, **kw), TOL[divergence])


@needs_kernel
def test_tilings_agree_and_repeat_exactly():
    """Other tile sizes and vocab splits give the same loss and gradients (float32 summation order only);
    the same call twice gives the same bits (no atomics: each output element has one owner)."""
    hidden, weight, targets = make_case(3, 40, 32, 130, 8)
    kw = {"alpha": 0.4, "temperature": 2.0}
    base = kernel(hidden, weight, targets, **kw)
    assert all(torch.equal(a, b) for a, b in zip(base, kernel(hidden, weight, targets, **kw)))
    for blocks, splits in (((16, 16, 16), 1), ((32, 64, 32), 3), ((16, 32, 16), 5)):
        assert_close(kernel(hidden, weight, targets, blocks=blocks, splits=splits, **kw), base, 1e-6)


@needs_kernel
def test_ignored_positions_change_nothing_and_get_zero_gradient():
    hidden, weight, targets = make_case(4, 30, 16, 70, 6, ignored=0.3)
    ignored = targets.labels == -100
    assert 0 < ignored.sum() < 30
    kw = {"alpha": 0.3, "temperature": 1.5, "divergence": "forward_kl"}
    base = kernel(hidden, weight, targets, **kw)
    assert (base[1][ignored] == 0).all() and (base[1][~ignored].abs().sum(dim=1) > 0).all()
    other_h = torch.where(ignored[:, None], torch.randn_like(hidden) * 50, hidden).detach().requires_grad_()
    garbage = SparseTargets(targets.labels, torch.where(ignored[:, None], -5, targets.top_ids),
                            torch.where(ignored[:, None], torch.nan, targets.top_logprobs))
    again = kernel(other_h, weight, garbage, **kw)
    assert all(torch.equal(a, b) for a, b in zip(base, again))


@needs_kernel
def test_no_valid_position_is_a_zero_that_backpropagates():
    hidden, weight, targets = make_case(5, 6, 16, 30, 3)
    targets = SparseTargets(torch.full_like(targets.labels, -100), targets.top_ids, targets.top_logprobs)
    loss = kd_kernel.kd_loss_triton(hidden, weight, targets, alpha=0.5, divergence="jsd")
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


@needs_kernel
def test_padding_entries_are_not_buckets():
    """Three -inf entries (a duplicate of a real id, an out-of-range id, id 0) interleaved with three real
    ones give the loss and gradients of the three alone."""
    hidden, weight, targets = make_case(6, 14, 16, 40, 3, pad=False)
    ids, lp = targets.top_ids, targets.top_logprobs
    wide_ids = torch.stack([ids[:, 1], ids[:, 0], torch.full_like(ids[:, 0], 999), ids[:, 1], ids[:, 2],
                            torch.zeros_like(ids[:, 0])], 1)
    pad = torch.full_like(lp[:, 0], -INF)
    wide_lp = torch.stack([pad, lp[:, 0], pad, lp[:, 1], lp[:, 2], pad], 1)
    for divergence in DIVERGENCES:
        kw = {"alpha": 0.3, "temperature": 2.0, "divergence": divergence}
        assert_close(kernel(hidden, weight, SparseTargets(targets.labels, wide_ids, wide_lp), **kw),
                     kernel(hidden, weight, targets, **kw), 1e-6)


@needs_kernel
def test_whole_vocabulary_as_targets_has_no_tail():
    """K = V (no tail bucket: every column masked, the tail's log-sum-exp empty) and K = V - 1 (one token)."""
    n, h, v = 12, 16, 24
    hidden, weight, _ = make_case(7, n, h, v, 1, pad=False)
    gen = torch.Generator().manual_seed(7)
    teacher = torch.log_softmax(torch.randn(n, v, generator=gen) * 2, -1)
    order = torch.argsort(torch.rand(n, v, generator=gen), dim=1)
    labels = torch.randint(0, v, (n,), generator=gen)
    for kk in (v, v - 1):
        targets = SparseTargets(labels.to(DEVICE), order[:, :kk].to(DEVICE),
                                teacher.gather(1, order)[:, :kk].to(DEVICE))
        for divergence in DIVERGENCES:
            kw = {"alpha": 0.2, "temperature": 2.0, "divergence": divergence}
            assert_close(kernel(hidden, weight, targets, **kw), oracle64(hidden, weight, targets, **kw),
                         TOL[divergence])


@needs_kernel
def test_confident_float32_student_keeps_a_finite_tail():
    """kd_loss's warning case: the student's top-4 hold all but ~1e-8 of the mass (logits ~20 above the
    rest) against a teacher tail of 1e-2. The tail's log-mass is the masked log-sum-exp of the tile pass,
    so loss and gradients keep float64's figures (as log1mexp(lse_K - lse) the loss would be infinite)."""
    n, v, k = 12, 64, 4
    gen = torch.Generator().manual_seed(8)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    logits = torch.randn(n, v, generator=gen).scatter_add(1, ids, torch.full((n, k), 20.0))
    assert (1 - torch.softmax(logits.double(), -1).gather(1, ids).sum(-1)).max() < 2e-7
    # hidden = the logits, weight = identity (H = V): the tile's z is the logits themselves
    hidden = logits.to(DEVICE).requires_grad_()
    weight = torch.eye(v).to(DEVICE).requires_grad_()
    lp = torch.log_softmax(torch.randn(n, k, generator=gen), -1) + math.log(0.99)
    targets = SparseTargets(torch.randint(0, v, (n,), generator=gen).to(DEVICE), ids.to(DEVICE), lp.to(DEVICE))
    for divergence in DIVERGENCES:
        kw = {"alpha": 0.2, "divergence": divergence}
        assert_close(kernel(hidden, weight, targets, **kw), oracle64(hidden, weight, targets, **kw), 1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    hidden, weight, targets = make_case(9, 33, 32, 200, 8, dtype=dtype)
    for divergence in DIVERGENCES:
        kw = {"alpha": 0.3, "temperature": 2.0, "divergence": divergence}
        got = kernel(hidden, weight, targets, **kw)
        assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
        assert_close(got, run(kd_loss, hidden, weight, targets, **kw), 2e-2 if dtype == torch.bfloat16 else 4e-3,
                     loss_rel=1e-5)


@needs_kernel
def test_frozen_weight_and_no_grad():
    """A weight without requires_grad gets no gradient (the dW kernel does not run); under no_grad the loss
    alone is computed (the gradient kernels do not run) and equals the training loss."""
    hidden, weight, targets = make_case(10, 9, 16, 30, 4)
    frozen = weight.detach()
    loss = kd_kernel.kd_loss_triton(hidden, frozen, targets, alpha=0.2)
    loss.backward()
    assert frozen.grad is None
    want = oracle64(hidden, frozen, targets, alpha=0.2)
    assert_close((loss, hidden.grad), want[:2], 1e-5)
    with torch.no_grad():
        assert kd_kernel.kd_loss_triton(hidden, weight, targets, alpha=0.2).item() == pytest.approx(loss.item(),
                                                                                                     rel=1e-6)


@needs_kernel
def test_stores_only_the_gradients():
    hidden, weight, targets = make_case(11, 20, 16, 90, 4)
    loss = kd_kernel.kd_loss_triton(hidden, weight, targets)
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [(20, 16), (90, 16)]


@needs_kernel
def test_bad_inputs():
    hidden, weight, targets = make_case(12, 6, 16, 20, 3, pad=False)
    with pytest.raises(ValueError, match="float64"):
        kd_kernel.kd_loss_triton(hidden.double(), weight.double(), targets)
    with pytest.raises(ValueError, match="divergence"):  # kd_loss's own checks
        kd_kernel.kd_loss_triton(hidden, weight, targets, divergence="kl")
    with pytest.raises(ValueError, match="repeat"):
        kd_kernel.kd_loss_triton(hidden, weight, SparseTargets(targets.labels, targets.top_ids[:, [0, 1, 0]],
                                                               targets.top_logprobs))


@needs_kernel
def test_gpu_check_cpu_mode():
    """bench/gpu_check.py --cpu (interpreter, tiny shapes) runs and ends with its JSON line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bench"] == "gpu_check" and out["mode"] == "cpu"
    assert out["value"] > 0 and out["baseline"] > 0 and out["ratio"] == pytest.approx(out["value"] / out["baseline"],
                                                                                        rel=1e-2)
    assert out["checks"]["max_rel_error"] < 1e-4


# ---- the train stage's choice (kd.kernel): pure, no GPU and no triton needed ----

@pytest.mark.parametrize("cuda, triton, want", [(True, True, "triton"), (True, False, "torch"),
                                                (False, True, "torch"), (False, False, "torch")])
def test_auto_takes_the_kernel_only_on_cuda_with_triton(cuda, triton, want):
    assert kernel_choice("auto", cuda=cuda, triton=triton) == want
    assert kernel_choice("torch", cuda=cuda, triton=triton) == "torch"


def test_triton_where_it_cannot_run_is_one_line():
    assert kernel_choice("triton", cuda=True, triton=True) == "triton"
    with pytest.raises(SynthError, match=r"^recipe.yaml:3: key 'kd.kernel' is triton, but triton is not installed"):
        kernel_choice("triton", cuda=True, triton=False, at="recipe.yaml:3")
    with pytest.raises(SynthError, match="not on a CUDA GPU") as caught:
        kernel_choice("triton", cuda=False, triton=True)
    assert "\n" not in str(caught.value) and "auto" in str(caught.value) and "torch" in str(caught.value)


def test_check_kd_kernel_key(monkeypatch):
    import synth.kd_train as kd_train

    assert KD_DEFAULTS["kernel"] == "auto" and check_kd({}, "r.yaml:2")["kernel"] == "auto"
    assert check_kd({"kernel": "torch"}, "r.yaml:2")["kernel"] == "torch"
    with pytest.raises(SynthError, match=r"r.yaml:2: key 'kd.kernel' must be one of auto, triton, torch, got 'cuda'"):
        check_kd({"kernel": "cuda"}, "r.yaml:2")
    monkeypatch.setattr(kd_train, "triton_installed", lambda: False)
    with pytest.raises(SynthError, match=r"r.yaml:2: key 'kd.kernel' is triton, but triton is not installed"):
        check_kd({"kernel": "triton"}, "r.yaml:2")
    monkeypatch.setattr(kd_train, "triton_installed", lambda: True)
    assert check_kd({"kernel": "triton"}, "r.yaml:2")["kernel"] == "triton"  # CUDA: checked at train start


class _StubTokenizer:
    """Enough of a tokenizer for kd_train.kd_setup: a chat template that renders any prompt as two ids."""
    chat_template = "stub"
    name_or_path = "stub"
    pad_token_id = eos_token_id = 0

    def apply_chat_template(self, messages, **_):
        return {"input_ids": [1, 2]}


@pytest.mark.skipif(CUDA, reason="a CUDA GPU is here: kernel triton can run")
def test_triton_without_cuda_stops_at_train_start(monkeypatch):
    """The recipe check cannot see CUDA (no torch there); the train stage's setup refuses before the trainer
    is built, in one line; auto goes on (the chunked loss)."""
    import synth.kd_train as kd_train

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion_ids": [3, 4], "teacher_ids": [[3], [4]],
             "teacher_logprobs": [[-0.1], [-0.2]]}]
    monkeypatch.setattr(kd_train, "triton_installed", lambda: True)
    with pytest.raises(SynthError, match="the kd recipe: key 'kd.kernel' is triton, but the student is not on a "
                                         "CUDA GPU") as caught:
        kd_train.kd_setup(rows, _StubTokenizer(), {"kd": {"kernel": "triton"}}, 64, Path("kd.parquet"))
    assert "\n" not in str(caught.value)
    examples, _, _, kd = kd_train.kd_setup(rows, _StubTokenizer(), {"kd": {"kernel": "auto"}}, 64, Path("kd.parquet"))
    assert kd["kernel"] == "auto" and len(examples) == 1
