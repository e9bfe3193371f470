"""GPU check of the fused Triton KD loss (synth/kd_kernel.py) against the chunked PyTorch loss (kd_loss).

    .venv/bin/python bench/gpu_check.py          # a CUDA GPU (H100/H200): all sections, under 10 minutes
    .venv/bin/python bench/gpu_check.py --cpu    # Triton's CPU interpreter, tiny shapes: a smoke test (< 1 min)
    .venv/bin/python bench/gpu_check.py --sections loss --tokens 8192 --hidden 896

Needs triton (and, on the GPU, CUDA torch); liger_kernel is optional. Sections (`--sections`):
- checks: the kernel against kd_loss at one moderate shape, float32 (TF32 off) and bfloat16, the three
  divergences: the largest relative difference (loss, and each gradient over its largest magnitude).
  Exits 1 when float32 differs by more than 1e-4 or bf16 by more than 3e-2 (gradients) / 1e-4 (loss).
- loss: forward + backward of the loss alone, bf16 hidden (N x H) and lm_head weight (V x H) requiring
  grad, V = 151,936 (Qwen2's vocabulary), K = 20 teacher ids per position (1/8 of the positions
  ignored), forward KL with the tail, alpha 0.5, T 2, at H in {896, 2048} x N in {8192, 32768}:
  kernel (kd_loss_triton) vs chunked (kd_loss, chunk_size 1024: logits in float32, 1024 rows at a time)
  vs full (hidden @ weight.T, reference_kd_loss, autograd: skipped where its estimated N x V buffers do
  not fit the GPU's free memory, or when it runs out) vs Liger's LigerFusedLinearJSD when liger_kernel is
  importable (a different loss: a dense teacher given as its own hidden states and weight, generalised
  JSD beta 0.5; a reference point for a fused-linear distillation loss at the same shape, not the same
  maths). Time: CUDA events around forward + backward, --warmup runs first (Triton compiles there),
  median of --reps. Memory: torch.cuda.max_memory_allocated during one forward + backward minus what was
  allocated before it (inputs and targets), gradients included. Ratios are against chunked.
- step: one training step (forward + backward; no optimizer step) of a Qwen2-shaped ~0.5B student
  built from a config with random weights (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
  4864, V 151,936, tied embeddings) in bf16 (as a recipe with `model_init_kwargs: {dtype: bfloat16}`
  loads it; TRL's default is float32, and KDTrainer's decoder call is not under accelerate's autocast,
  so the loss then gets float32 operands: `--dtype float32 [--tf32]` measures that) on a batch of
  --batch x --length tokens whose first quarter is prompt: SFT (the model's own loss over full logits:
  what SFTTrainer computes) vs KD through synth.kd_train.batch_loss (what KDTrainer.compute_loss runs;
  not through TRL's trainer) with kd.kernel torch (chunked) and triton (the kernel). Same timing and
  memory rules, ratios against SFT.
Prints markdown tables; the last line is one JSON object (bench/README.md): value / baseline = kernel /
chunked milliseconds at the first loss case (goal <= 1.0), with memory_ratio, every case, step and check.
`--cpu`: TRITON_INTERPRET=1, CPU tensors, tiny shapes (the loss and step sections shrink, liger skipped),
one rep: proves the script runs (tests/test_kd_kernel.py runs it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 151_936
GOAL = 1.0  # kernel / chunked forward + backward time at the first loss case, at most
FULL_BUFFERS = 10  # full logits: ~this many N x V float32 buffers live at its peak (estimate for skipping)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="Triton's interpreter on CPU, tiny shapes (smoke test)")
    ap.add_argument("--sections", default="checks,loss,step")
    ap.add_argument("--hidden", default="896,2048", help="loss: hidden sizes, comma-separated")
    ap.add_argument("--tokens", default="8192,32768", help="loss: positions N, comma-separated")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--divergence", default="forward_kl")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="loss and step: the inputs' and the student's dtype")
    ap.add_argument("--tf32", action="store_true", help="torch.backends.cuda.matmul.allow_tf32 (both losses follow it)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="step: sequences")
    ap.add_argument("--length", type=int, default=1024, help="step: tokens per sequence")
    ap.add_argument("--budget-s", type=float, default=540, help="skip what would start after this many seconds")
    args = ap.parse_args()
    if args.cpu:
        args.hidden, args.tokens, args.vocab, args.top_k, args.chunk_size = "32", "48", 300, 8, 16
        args.reps, args.warmup, args.batch, args.length = 1, 0, 2, 24
    return args


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def measure(torch, fn, reps: int, warmup: int, reset) -> dict:
    """fn() runs one forward + backward. Median milliseconds of reps (after warmup) and, on CUDA, the peak
    memory one more call allocates above what was allocated before it, after reset() dropped the gradients."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
    peak = None
    if cuda:
        reset()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"ms": statistics.median(times), "peak_gib": peak}


def targets_for(torch, SparseTargets, n: int, vocab: int, k: int, device, gen):
    """Random teacher top-k: distinct ids (a random start, then strides of V // k), log-probs of k random
    logits holding 50-99% of the mass; the first eighth of the positions ignored (-100)."""
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[: n // 8] = -100
    ids = (torch.randint(0, vocab, (n, 1), generator=gen) + torch.arange(k) * (vocab // k)) % vocab
    mass = 0.5 + 0.49 * torch.rand(n, 1, generator=gen)
    lps = torch.log_softmax(torch.randn(n, k, generator=gen) * 2, dim=-1) + mass.log()
    return SparseTargets(labels.to(device), ids.to(device), lps.to(device))


def rel_errors(got, want) -> float:
    """The largest of: the loss's relative difference, each gradient's max difference over its max magnitude."""
    errs = [abs(got[0].item() - want[0].item()) / max(abs(want[0].item()), 1e-30)]
    for g, w in zip(got[1:], want[1:]):
        errs.append((g.double() - w.double()).abs().max().item() / max(w.double().abs().max().item(), 1e-30))
    return errs


def checks_section(args, torch, mods, device) -> dict:
    kd_loss, kd_loss_triton, SparseTargets = mods["kd_loss"], mods["kd_loss_triton"], mods["SparseTargets"]
    n, h, v = (24, 32, 100) if args.cpu else (1024, 896, args.vocab)
    gen = torch.Generator().manual_seed(1)
    hidden0 = torch.randn(n, h, generator=gen)
    weight0 = torch.randn(v, h, generator=gen) / math.sqrt(h) * 4
    targets = targets_for(torch, SparseTargets, n, v, args.top_k, device, gen)
    out = {"shape": {"tokens": n, "hidden": h, "vocab": v, "top_k": args.top_k}}
    worst = {"float32": 0.0, "bfloat16_loss": 0.0, "bfloat16_grads": 0.0}
    for dtype in (torch.float32, torch.bfloat16):
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            kw = {"alpha": args.alpha, "temperature": args.temperature, "divergence": divergence}
            results = []
            for fn in (kd_loss_triton, kd_loss):
                hidden = hidden0.to(device, dtype).requires_grad_()
                weight = weight0.to(device, dtype).requires_grad_()
                loss = fn(hidden, weight, targets, **kw)
                results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
            errs = rel_errors(*results)
            name = "float32" if dtype == torch.float32 else "bfloat16"
            out[f"{name}_{divergence}"] = [round(e, 8) for e in errs]
            if dtype == torch.float32:
                worst["float32"] = max(worst["float32"], *errs)
            else:
                worst["bfloat16_loss"] = max(worst["bfloat16_loss"], errs[0])
                worst["bfloat16_grads"] = max(worst["bfloat16_grads"], *errs[1:])
    out.update(worst)
    out["max_rel_error"] = worst["float32"]
    out["passed"] = worst["float32"] <= 1e-4 and worst["bfloat16_loss"] <= 1e-4 and worst["bfloat16_grads"] <= 3e-2
    print(f"checks: kernel vs kd_loss at N={n} H={h} V={v}: float32 max rel {worst['float32']:.2e}, bf16 loss "
          f"{worst['bfloat16_loss']:.2e}, bf16 grads {worst['bfloat16_grads']:.2e} "
          f"({'passed' if out['passed'] else 'FAILED'})", flush=True)
    return out


def liger_loss(torch):
    """Liger's fused-linear generalised JSD (dense teacher), or why not."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as exc:  # not installed, or an import that fails on this stack
        return None, f"liger_kernel not importable ({type(exc).__name__})"
    return LigerFusedLinearJSD, None


def loss_section(args, torch, mods, device, clock) -> list[dict]:
    kd_loss, kd_loss_triton = mods["kd_loss"], mods["kd_loss_triton"]
    reference_kd_loss, SparseTargets = mods["reference_kd_loss"], mods["SparseTargets"]
    dtype = torch.float32 if args.cpu else getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    Liger, liger_why = (None, "no CUDA (--cpu)") if not cuda else liger_loss(torch)
    rows = []
    kw = {"alpha": args.alpha, "temperature": args.temperature, "divergence": args.divergence}
    for h in (int(x) for x in args.hidden.split(",")):
        for n in (int(x) for x in args.tokens.split(",")):
            v, k = args.vocab, args.top_k
            case = {"hidden": h, "tokens": n, "vocab": v, "top_k": k, "dtype": str(dtype).split(".")[-1]}
            gen = torch.Generator().manual_seed(0)
            hidden = (torch.randn(n, h, generator=gen) * 0.5).to(device, dtype).requires_grad_()
            weight = (torch.randn(v, h, generator=gen) / math.sqrt(h) * 4).to(device, dtype).requires_grad_()
            targets = targets_for(torch, SparseTargets, n, v, k, device, gen)

            def reset():
                hidden.grad = weight.grad = None

            def step(fn, **extra):
                def run():
                    hidden.grad = weight.grad = None
                    fn(hidden, weight, targets, **kw, **extra).backward()
                return run

            def full(hidden_, weight_, targets_, **kw_):
                return reference_kd_loss(hidden_ @ weight_.T, targets_, **kw_)

            variants = [("kernel", step(kd_loss_triton)), ("chunked", step(kd_loss, chunk_size=args.chunk_size))]
            if cuda:
                free = torch.cuda.mem_get_info(device)[0]
                need = FULL_BUFFERS * n * v * 4
                if need > 0.9 * free:
                    variants.append(("full", f"skipped: ~{need / 2**30:.0f} GiB of N x V buffers, "
                                             f"{free / 2**30:.0f} GiB free"))
                else:
                    variants.append(("full", step(full)))
            else:
                variants.append(("full", step(full)))
            if Liger is None:
                variants.append(("liger", f"skipped: {liger_why}"))
            else:
                teacher_h = (torch.randn(n, h, generator=gen) * 0.5).to(device, dtype)
                teacher_w = (torch.randn(v, h, generator=gen) / math.sqrt(h) * 4).to(device, dtype)
                liger = Liger(jsd_beta=0.5, temperature=args.temperature)

                def liger_run():
                    hidden.grad = weight.grad = None
                    liger(hidden, weight, teacher_h, teacher_w).backward()
                variants.append(("liger", liger_run))
            for name, fn in variants:
                row = {**case, "variant": name}
                if isinstance(fn, str):
                    row["note"] = fn
                elif clock.left() < 0:
                    row["note"] = "skipped: time budget (--budget-s)"
                else:
                    try:
                        row.update(measure(torch, fn, args.reps, args.warmup, reset))
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "skipped: out of GPU memory"
                    except Exception as exc:  # liger's API on another version, ...
                        if name != "liger":
                            raise
                        row["note"] = f"skipped: {type(exc).__name__}: {str(exc)[:120]}"
                    hidden.grad = weight.grad = None
                    if cuda:
                        torch.cuda.empty_cache()
                rows.append(row)
                shown = f"{row['ms']:.1f} ms" if "ms" in row else row["note"]
                print(f"loss H={h} N={n} {name:8} {shown}", flush=True)
            hidden = weight = targets = None  # free the case before the next one
            if cuda:
                torch.cuda.empty_cache()
    by_case: dict[tuple, dict] = {}
    for row in rows:
        by_case.setdefault((row["hidden"], row["tokens"]), {})[row["variant"]] = row
    for variants in by_case.values():
        base = variants.get("chunked", {})
        for row in variants.values():
            if "ms" in row and "ms" in base:
                row["time_ratio"] = row["ms"] / base["ms"]
            if row.get("peak_gib") is not None and base.get("peak_gib"):
                row["memory_ratio"] = row["peak_gib"] / base["peak_gib"]
    return rows


def step_section(args, torch, mods, device, clock) -> list[dict]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from synth.kd_train import KD_DEFAULTS, batch_loss

    if clock.left() < 0:
        print("step: skipped (time budget, --budget-s)", flush=True)
        return []
    if args.cpu:
        shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": args.vocab}
        dtype = torch.float32
    else:  # Qwen2.5-0.5B's shape
        shape = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2, "vocab_size": VOCAB}
        dtype = getattr(torch, args.dtype)
    config = Qwen2Config(**shape, max_position_embeddings=max(4096, args.length), tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).train()
    params = sum(p.numel() for p in model.parameters())
    b, n, v, k = args.batch, args.length, shape["vocab_size"], args.top_k
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, v, (b, n), generator=gen)
    labels = ids.clone()
    labels[:, : n // 4] = -100
    top_ids = (torch.randint(0, v, (b, n, 1), generator=gen) + torch.arange(k) * (v // k)) % v
    top_lps = torch.log_softmax(torch.randn(b, n, k, generator=gen) * 2, dim=-1) + math.log(0.8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "teacher_ids": top_ids,
              "teacher_logprobs": top_lps}
    inputs = {key: t.to(device) for key, t in inputs.items()}
    kd = {**KD_DEFAULTS, "alpha": args.alpha, "temperature": args.temperature, "divergence": args.divergence,
          "chunk_size": args.chunk_size}

    def sft():
        model.zero_grad(set_to_none=True)
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
              use_cache=False).loss.backward()

    def kd_step(kernel):
        def run():
            model.zero_grad(set_to_none=True)
            if kernel == "triton" and device.type == "cpu":
                # --cpu: kernel_choice sees no CUDA and would refuse; the interpreter stands in for it
                from synth import kd_train
                original, kd_train.kernel_choice = kd_train.kernel_choice, lambda setting, **_: "triton"
                try:
                    batch_loss(model, inputs, {**kd, "kernel": "triton"}).backward()
                finally:
                    kd_train.kernel_choice = original
            else:
                batch_loss(model, inputs, {**kd, "kernel": kernel}).backward()
        return run

    rows = []
    for name, fn in (("sft", sft), ("kd chunked", kd_step("torch")), ("kd kernel", kd_step("triton"))):
        row = {"step": name, "params_m": round(params / 1e6, 1), "batch": b, "length": n,
               "dtype": str(dtype).split(".")[-1]}
        if clock.left() < 0:
            row["note"] = "skipped: time budget (--budget-s)"
        else:
            try:
                row.update(measure(torch, fn, args.reps, args.warmup, lambda: model.zero_grad(set_to_none=True)))
            except torch.cuda.OutOfMemoryError:
                row["note"] = "skipped: out of GPU memory"
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"step {name:11} {row['ms']:.1f} ms" if "ms" in row else f"step {name:11} {row['note']}", flush=True)
    base = rows[0]
    for row in rows:
        if "ms" in row and "ms" in base:
            row["time_ratio"] = row["ms"] / base["ms"]
        if row.get("peak_gib") is not None and base.get("peak_gib"):
            row["memory_ratio"] = row["peak_gib"] / base["peak_gib"]
    return rows


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def main() -> None:
    args = parse()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates the kernels, and while they run
    import torch

    from synth.kd_kernel import kd_loss_triton
    from synth.kd_loss import SparseTargets, kd_loss, reference_kd_loss

    if args.cpu:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    else:
        raise SystemExit("gpu_check: no CUDA GPU here; run with --cpu for the interpreter smoke test")
    import triton

    mods = {"kd_loss": kd_loss, "kd_loss_triton": kd_loss_triton, "reference_kd_loss": reference_kd_loss,
            "SparseTargets": SparseTargets}
    clock = Clock(args.budget_s)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"gpu_check on {machine}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
    sections = args.sections.split(",")
    out = {"checks": None, "cases": [], "steps": []}
    if "checks" in sections:
        out["checks"] = checks_section(args, torch, mods, device)
    if "loss" in sections:
        out["cases"] = loss_section(args, torch, mods, device, clock)
    if "step" in sections:
        out["steps"] = step_section(args, torch, mods, device, clock)

    if out["cases"]:
        print("\n| H | N | variant | fwd+bwd ms | peak GiB above inputs | time / chunked | memory / chunked | note |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out["cases"]:
            print(f"| {r['hidden']} | {r['tokens']:,} | {r['variant']} | {fmt(r.get('ms'), '.1f')} | "
                  f"{fmt(r.get('peak_gib'), '.2f')} | {fmt(r.get('time_ratio'), '.2f')} | "
                  f"{fmt(r.get('memory_ratio'), '.2f')} | {r.get('note', '')} |")
    if out["steps"]:
        s0 = out["steps"][0]
        print(f"\nstep: Qwen2-shaped student, {s0['params_m']}M parameters, {s0['dtype']}, batch {s0['batch']} x "
              f"{s0['length']} tokens, forward + backward")
        print("\n| step | ms | peak GiB above model and batch | time / SFT | memory / SFT | note |")
        print("|---|---|---|---|---|---|")
        for r in out["steps"]:
            print(f"| {r['step']} | {fmt(r.get('ms'), '.1f')} | {fmt(r.get('peak_gib'), '.2f')} | "
                  f"{fmt(r.get('time_ratio'), '.2f')} | {fmt(r.get('memory_ratio'), '.2f')} | {r.get('note', '')} |")
    first = out["cases"][0] if out["cases"] else {}
    head = {r["variant"]: r for r in out["cases"] if (r["hidden"], r["tokens"]) == (first["hidden"], first["tokens"])}
    kernel, chunked = head.get("kernel", {}), head.get("chunked", {})
    summary = {"bench": "gpu_check", "mode": "cpu" if args.cpu else "gpu", "machine": machine,
               "value": round(kernel["ms"], 3) if "ms" in kernel else None,
               "baseline": round(chunked["ms"], 3) if "ms" in chunked else None,
               "unit": (f"ms forward+backward, kernel vs chunked kd_loss, {first.get('dtype')}, "
                        f"N={first.get('tokens')} H={first.get('hidden')} V={first.get('vocab')} "
                        f"K={first.get('top_k')}"),
               "ratio": round(kernel["ms"] / chunked["ms"], 3) if "ms" in kernel and "ms" in chunked else None,
               "goal": GOAL, "goal_is": "max",
               "memory_ratio": round(kernel["memory_ratio"], 3) if "memory_ratio" in kernel else None,
               "torch": torch.__version__, "triton": triton.__version__, "seconds": round(clock.elapsed(), 1),
               **out}
    print(json.dumps(summary, default=str))
    if out["checks"] is not None and not out["checks"]["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
