"""Benchmark of the fused LM head: time and peak extra memory, fused vs the naive matmul + reference.

    python benchmarks/fused_linear.py [--n 8 --t 256 --h 1024 --v 32000 --dtype fp32]

Forward + backward of the per-sequence log-probs *including the LM-head matmul*, gradients w.r.t. the
hidden states and the weight. Time: median of ``--reps`` interleaved passes after ``--warmup``. Memory:
peak RSS beyond the inputs and their gradients, one fresh child process per implementation (see
benchmarks/run.py). Then the modeled GPU peak at Llama-3-8B scale under FakeTensorMode.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("naive", "fused")
TARGET_TIME_RATIO, TARGET_MEMORY_SHARE = 0.5, 0.10  # the targets vs the naive path


def impl_fn(name):
    import dpo_kernels
    from dpo_kernels import reference

    if name == "naive":
        return lambda h, w, y: reference.sequence_logps(h @ w.T, y)
    return lambda h, w, y: dpo_kernels.fused_linear_sequence_logps(h, w, y)


def make_inputs(args, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.n, args.t, args.h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=gen) / args.h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, args.v, (args.n, args.t), generator=gen)
    labels[:, : round(args.t * args.prompt_frac)] = -100  # a prompt prefix
    return hidden, weight, labels


def fwd_bwd(fn, hidden, weight, labels):
    return torch.autograd.grad(fn(hidden, weight, labels).sum(), (hidden, weight))


def child_main(args):
    from benchmarks.run import read_status_kb, reset_peak_rss

    fn = impl_fn(args.impl)
    tiny = argparse.Namespace(n=2, t=8, h=16, v=64, dtype=args.dtype, prompt_frac=args.prompt_frac)
    fwd_bwd(fn, *make_inputs(tiny))  # one-time costs are not the measured pass's
    inputs = make_inputs(args)
    if not reset_peak_rss():
        print(json.dumps({"extra_bytes": None}))
        return
    baseline = read_status_kb("VmRSS")
    grads = fwd_bwd(fn, *inputs)
    peak = read_status_kb("VmHWM")
    print(json.dumps({"extra_bytes": peak - baseline - sum(g.numel() * g.element_size() for g in grads)}))


def measure_in_child(args, impl):
    from benchmarks.run import CHILD_ENV

    cmd = [sys.executable, "-m", "benchmarks.fused_linear", "--child", "--impl", impl]
    for key in ("n", "t", "h", "v", "dtype", "prompt_frac"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, **CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


def time_all(args):
    hidden, weight, labels = make_inputs(args)
    fns = {name: impl_fn(name) for name in IMPLS}
    times = {name: [] for name in IMPLS}
    for rep in range(args.warmup + args.reps):
        for name, fn in fns.items():  # interleaved: a slow spell of the machine hits both alike
            start = time.perf_counter()
            grads = fwd_bwd(fn, hidden, weight, labels)
            elapsed = time.perf_counter() - start
            del grads
            if rep >= args.warmup:
                times[name].append(elapsed)
    return times


def modeled_llama3_8b():
    from benchmarks.modeled_memory import GiB, lm_head_inputs, modeled_peak_bytes

    n, t, h, v = 8, 4096, 4096, 128256
    inputs_bytes = (n * t * h + v * h) * 2 * 2  # bf16 hidden and weight, and their gradients
    print(f"\nmodeled GPU peak (FakeTensorMode): 2B={n} T={t} H={h} V={v} bf16, beyond inputs and their gradients")
    for name in IMPLS:
        fn = impl_fn(name)
        peak = modeled_peak_bytes(lm_head_inputs(n, t, h, v, torch.bfloat16), lambda *a, fn=fn: fn(*a).sum())
        print(f"  {name:<6} peak {peak / GiB:7.2f} GiB   extra {(peak - inputs_bytes) / GiB:7.2f} GiB (modeled)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--t", type=int, default=256)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--prompt-frac", type=float, default=0.25)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    print("dpo_kernels benchmark: fused LM head + log-probs, forward + backward incl. the matmul")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.n} T={args.t} H={args.h} "
          f"V={args.v} {args.dtype}, {args.prompt_frac:.0%} prompt; median of {args.reps} after {args.warmup} warm-up")
    times = time_all(args)
    extra = {name: measure_in_child(args, name) for name in IMPLS}
    naive_time = statistics.median(times["naive"])
    print(f"\n{'impl':<7} {'time s':>8} {'vs naive':>9} {'extra MB':>10} {'vs naive':>9}")
    for name in IMPLS:
        t_med = statistics.median(times[name])
        mem = extra[name]
        mem_share = f"{mem / extra['naive']:.0%}" if mem is not None and extra["naive"] else "n/a"
        mem_mb = f"{mem / 2**20:.1f}" if mem is not None else "n/a"
        print(f"{name:<7} {t_med:>8.3f} {t_med / naive_time:>8.2f}x {mem_mb:>10} {mem_share:>9}")
    ratio = statistics.median(times["fused"]) / naive_time
    share = extra["fused"] / extra["naive"] if extra["fused"] is not None and extra["naive"] else None
    verdict = ratio <= TARGET_TIME_RATIO and share is not None and share <= TARGET_MEMORY_SHARE
    print(f"targets: time <= {TARGET_TIME_RATIO}x and extra memory <= {TARGET_MEMORY_SHARE:.0%} of the naive "
          f"path's -> {'MEETS' if verdict else 'MISSES'}")
    modeled_llama3_8b()


if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    main()
