"""The chunked KD loss (synth/kd_loss.py's kd_loss) vs the full-logits loss, forward + backward.

    .venv/bin/python bench/kd_loss.py [--vocab 32768] [--hidden 256] [--tokens 2048] [--top-k 8]
        [--chunk-size 1024] [--divergence forward_kl] [--alpha 0.5] [--temperature 2] [--rounds 3]
        [--repeats 2] [--threads N] [--quick]

Sections (each a function `NAME_section(args) -> dict`, listed in SECTIONS; add one there):
- step: a KD training step vs an SFT step on the same student and batch (step_section; goal <= 1.3).
- memory: peak memory and time of one training step's loss, forward + backward, float32 on CPU.
  chunked: kd_loss(hidden, weight, targets) (logits chunk_size rows at a time, gradients computed in
  the forward); full (baseline): logits = hidden @ weight.T, then reference_kd_loss(logits, targets)
  and autograd. Same inputs (same seed), hidden and weight requiring grad; the losses and gradient
  norms of the two are checked equal. Each variant runs in its own fresh process
  (`--_child chunked|full`, alternating which goes first per round): it builds its inputs (random
  hidden and weight, random teacher top-K targets: nothing of N x V comes before the measure), reads
  its current RSS, runs one forward + backward and reads the peak RSS
  (getrusage ru_maxrss); the figure is peak - RSS after the inputs, in MiB (the process's peak before
  the step must be below the step's, else the child fails: the figure would be hidden). Then
  --repeats more steps, timed; the figure is their median. Goal: chunked / full <= 0.5 in memory.
Medians over --rounds are printed per variant with their ratio; the last line is one JSON object
{"bench", "value", "baseline", "unit", "ratio", "goal", ...}: value/baseline/ratio are the memory
section's peak MiB (chunked, full); the step section's ratio is `step_ratio` (goal `step_goal`); time and
each section's figures are extra keys.
`--quick`: tiny shapes and one round (the test suite's smoke test).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 0.5  # chunked / full peak memory, at most
VARIANTS = ("chunked", "full")


def _rss_mib() -> float:
    """The process's current resident set (not its peak), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    """In a fresh process: one variant's peak memory and time for forward + backward."""
    import torch

    from synth.kd_loss import SparseTargets, kd_loss, reference_kd_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, h, v, k = args.tokens, args.hidden, args.vocab, args.top_k
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[: n // 8] = -100  # a prompt's worth of ignored positions
    # teacher top-K: distinct ids (a random start, then strides of V // K), log-probs of K random logits
    # holding 50-99% of the mass; all small tensors, so nothing large is allocated before the measure
    ids = (torch.randint(0, v, (n, 1), generator=gen) + torch.arange(k) * (v // k)) % v
    mass = 0.5 + 0.49 * torch.rand(n, 1, generator=gen)
    lps = torch.log_softmax(torch.randn(n, k, generator=gen) * 2, dim=-1) + mass.log()
    targets = SparseTargets(labels, ids, lps)
    kwargs = {"alpha": args.alpha, "temperature": args.temperature, "divergence": args.divergence}

    def step() -> torch.Tensor:
        hidden.grad = weight.grad = None
        if args._child == "chunked":
            loss = kd_loss(hidden, weight, targets, chunk_size=args.chunk_size, **kwargs)
        else:
            loss = reference_kd_loss(hidden @ weight.T, targets, **kwargs)
        loss.backward()
        return loss.detach()

    base, peak_before = _rss_mib(), _peak_mib()
    started = time.perf_counter()
    loss = step()
    first = time.perf_counter() - started
    peak = _peak_mib()
    if peak <= peak_before:
        raise SystemExit(f"{args._child}: the step's peak ({peak:.0f} MiB) is not above the process's earlier "
                         f"peak ({peak_before:.0f} MiB): no figure")
    out = {"variant": args._child, "peak_mib": peak - base, "inputs_rss_mib": base, "loss": float(loss),
           "grad_norm_hidden": float(hidden.grad.norm()), "grad_norm_weight": float(weight.grad.norm()),
           "first_s": first}
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    out["seconds"] = statistics.median(times) if times else first
    return out


def run_child(variant: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--_child", variant]
    for key in ("vocab", "hidden", "tokens", "top_k", "chunk_size", "divergence", "alpha", "temperature",
                "repeats", "threads"):
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_section(args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(args.rounds):
        for variant in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
            runs[variant].append(run_child(variant, args))
        c, f = runs["chunked"][-1], runs["full"][-1]
        print(f"round {i + 1}  chunked {c['peak_mib']:8.1f} MiB {c['seconds']:6.3f} s   "
              f"full {f['peak_mib']:8.1f} MiB {f['seconds']:6.3f} s", flush=True)
        for key, tol in (("loss", 1e-4), ("grad_norm_hidden", 1e-3), ("grad_norm_weight", 1e-3)):
            if abs(c[key] - f[key]) > tol * abs(f[key]):
                raise SystemExit(f"round {i + 1}: {key} differs: chunked {c[key]!r}, full {f[key]!r}")
    med = {v: {key: statistics.median(r[key] for r in runs[v]) for key in ("peak_mib", "seconds")}
           for v in VARIANTS}
    return {"chunked_mib": med["chunked"]["peak_mib"], "full_mib": med["full"]["peak_mib"],
            "ratio": med["chunked"]["peak_mib"] / med["full"]["peak_mib"],
            "chunked_s": med["chunked"]["seconds"], "full_s": med["full"]["seconds"],
            "time_ratio": med["chunked"]["seconds"] / med["full"]["seconds"],
            "inputs_rss_mib": statistics.median(r["inputs_rss_mib"] for r in runs["full"]),
            "loss": runs["full"][0]["loss"]}


def step_section(args: argparse.Namespace) -> dict:
    """One training step (forward + backward) of a student on one batch: KD (synth.kd_train.batch_loss, what
    KDTrainer.compute_loss runs: decoder, then kd_loss on the completion positions) vs SFT (the model's own
    forward with labels: transformers' cross-entropy over full logits, what an SFT step computes). A
    random Llama-shaped student built from a config (--hidden, 2 layers, --vocab), a batch of
    --batch x --length random token ids whose first quarter is prompt, random teacher top-K targets.
    Interleaved rounds, medians. Goal: KD / SFT <= 1.3."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from synth.kd_train import KD_DEFAULTS, batch_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(256, args.length))
    model = LlamaForCausalLM(config).train()
    b, n, v, k = args.batch, args.length, args.vocab, args.top_k
    ids = torch.randint(0, v, (b, n))
    labels = ids.clone()
    labels[:, : n // 4] = -100
    top_ids = (torch.randint(0, v, (b, n, 1)) + torch.arange(k) * (v // k)) % v
    top_lps = torch.log_softmax(torch.randn(b, n, k) * 2, dim=-1) + torch.full((b, n, 1), 0.8).log()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "teacher_ids": top_ids, "teacher_logprobs": top_lps}
    kd = {**KD_DEFAULTS, "chunk_size": args.chunk_size}

    def sft() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=inputs["attention_mask"], labels=labels, use_cache=False).loss.backward()

    def kd_step() -> None:
        model.zero_grad(set_to_none=True)
        batch_loss(model, inputs, kd).backward()

    runs = {"sft": [], "kd": []}
    sft(), kd_step()  # warm-up
    for i in range(max(3, args.rounds * 2)):
        for name, fn in ((("sft", sft), ("kd", kd_step)) if i % 2 == 0 else (("kd", kd_step), ("sft", sft))):
            started = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - started)
    med = {name: statistics.median(t) for name, t in runs.items()}
    print(f"step   sft {med['sft']:.3f} s   kd {med['kd']:.3f} s   kd / sft {med['kd'] / med['sft']:.2f} "
          f"(goal <= {STEP_GOAL})", flush=True)
    return {"sft_s": med["sft"], "kd_s": med["kd"], "ratio": med["kd"] / med["sft"], "goal": STEP_GOAL,
            "batch": b, "length": n}


STEP_GOAL = 1.3  # a KD step / an SFT step on the same student and batch, at most
SECTIONS = {"memory": memory_section, "step": step_section}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--divergence", default="forward_kl")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per process after the measured one")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=8, help="step: sequences per batch")
    ap.add_argument("--length", type=int, default=256, help="step: tokens per sequence")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke test)")
    ap.add_argument("--_child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.tokens, args.top_k, args.chunk_size = 4096, 32, 512, 4, 64
        args.rounds, args.repeats, args.batch, args.length = 1, 1, 2, 32
    if args._child:
        print(json.dumps(child(args)))
        return
    print(f"kd_loss: N={args.tokens} H={args.hidden} V={args.vocab} K={args.top_k} chunk={args.chunk_size} "
          f"{args.divergence} alpha={args.alpha} T={args.temperature}, float32 CPU, {args.rounds} rounds", flush=True)
    results = {name: SECTIONS[name](args) for name in args.sections.split(",")}
    mem = results["memory"]
    print(f"{'':8} {'peak MiB over inputs':>21} {'fwd+bwd s':>10}")
    print(f"{'chunked':8} {mem['chunked_mib']:21.1f} {mem['chunked_s']:10.3f}")
    print(f"{'full':8} {mem['full_mib']:21.1f} {mem['full_s']:10.3f}")
    print(f"memory chunked / full {mem['ratio']:.3f} (goal <= {GOAL}) · time chunked / full {mem['time_ratio']:.2f}",
          flush=True)
    print(json.dumps({"bench": "kd_loss", "value": round(mem["chunked_mib"], 1),
                      "baseline": round(mem["full_mib"], 1), "unit": "MiB peak RSS above inputs",
                      "ratio": round(mem["ratio"], 3), "goal": GOAL, "goal_is": "max",
                      "time_chunked_s": round(mem["chunked_s"], 4), "time_full_s": round(mem["full_s"], 4),
                      "time_ratio": round(mem["time_ratio"], 3),
                      **({"step_ratio": round(results["step"]["ratio"], 3), "step_goal": STEP_GOAL}
                         if "step" in results else {}),
                      "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
                                "top_k": args.top_k, "chunk_size": args.chunk_size},
                      "sections": results}))


if __name__ == "__main__":
    main()
