"""Benchmark harness: time and peak extra memory of per-sequence log-probs, fused vs the naive reference.

Run ``python benchmarks/run.py`` (or ``python -m benchmarks.run``) for the default workload of the
issue: 8 x 512 tokens, V = 32000, a 128-token prompt prefix masked out, forward + backward of
``sequence_logps(...).sum()`` in fp32 and bf16. ``--help`` lists the knobs.

Time is the median wall clock of ``--reps`` forward + backward passes after ``--warmup`` untimed ones
(first passes pay one-time costs a training loop pays once: lazy initialization, and the kernel finding
huge pages for the first logits-sized gradients), all
implementations measured in this process. Memory is measured once per (impl, dtype) in a fresh child
process, so one measurement's allocator state cannot leak into the next: on CPU from the kernel's
peak-RSS counter (VmHWM, reset through /proc/self/clear_refs), on CUDA from the caching allocator.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_IMPLS = ("reference", "native", "native-inplace", "torch", "torch-inplace")
CUDA_IMPLS = CPU_IMPLS + ("triton",)
# The issues' acceptance targets, per backend: time as a fraction of the reference's, extra memory as a
# share of the logits' size.
TARGET_TIME_RATIO = {"torch": 0.5, "native": 0.15, "triton": 0.5}
TARGET_EXTRA_PCT = 5.0
# glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS would stay high after
# a temporary is freed and the peak of a later step would be hidden or overstated. A fixed low
# threshold sends every large buffer through mmap, which returns it to the OS on free.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ----------------------------------------------------------------------------------------------------
# Workload


def make_inputs(args, dtype, device):
    """(source, logits, labels): logits are a non-leaf view of the leaf ``source``, labels have the first
    ``prompt_len`` positions masked out.

    The in-place backward refuses leaf logits (it would overwrite a parameter-like tensor); real logits
    come out of an LM head. A view is the non-leaf that costs no second logits-sized buffer.
    """
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(args.n, args.t, args.v, generator=gen).to(device=device, dtype=dtype)
    source.requires_grad_(True)
    labels = torch.randint(0, args.v, (args.n, args.t), generator=gen).to(device)
    # A prompt prefix, as in DPO data: the kernels skip unscored rows, so their position matters less
    # than their count, but a prefix is what real batches look like.
    labels[:, : prompt_len(args)] = -100
    return source, source.view_as(source), labels


def prompt_len(args) -> int:
    return round(args.t * args.prompt_frac)


def impl_fn(name: str):
    """A callable (logits, labels) -> (N,) log-probs for one implementation name."""
    import dpo_kernels

    if name == "reference":
        return dpo_kernels.reference.sequence_logps
    backend, _, mode = name.partition("-")
    inplace = mode == "inplace"

    def run(logits, labels):
        return dpo_kernels.sequence_logps(logits, labels, backend=backend, inplace_backward=inplace)

    return run


def fwd_bwd(fn, logits, labels):
    """One forward + backward; returns the gradient w.r.t. the logits.

    ``autograd.grad`` rather than ``.backward()``: accumulating into a leaf's ``.grad`` clones a gradient
    that aliases the logits (the in-place mode), a logits-sized copy a real LM head never makes.
    """
    (grad,) = torch.autograd.grad(fn(logits, labels).sum(), logits)
    return grad


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Timing (this process)


def time_once(fn, source, logits, labels, pristine, device) -> float:
    # The in-place mode overwrites the logits with their gradient; every pass starts from the same
    # values so all implementations do identical work. The restore is outside the timed region.
    with torch.no_grad():
        source.copy_(pristine)
    sync(device)
    start = time.perf_counter()
    grad = fwd_bwd(fn, logits, labels)
    sync(device)
    elapsed = time.perf_counter() - start
    del grad
    return elapsed


def time_all(args, impls, dtype, device):
    """Seconds of every forward + backward pass per impl, after one warm-up pass each.

    The reps are interleaved across impls (round-robin) rather than run back to back, so a slow spell of
    a shared machine lands on all impls alike instead of skewing one impl's ratio to the reference.
    """
    source, logits, labels = make_inputs(args, dtype, device)
    pristine = source.detach().clone()
    fns = {name: impl_fn(name) for name in impls}
    times = {name: [] for name in impls}
    for rep in range(args.warmup + args.reps):
        for name, fn in fns.items():
            elapsed = time_once(fn, source, logits, labels, pristine, device)
            if rep >= args.warmup:
                times[name].append(elapsed)
    return times


# ----------------------------------------------------------------------------------------------------
# Memory (one fresh child process per measurement)


def read_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not let us (old kernel, sandbox)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def grad_bytes(grad, logits) -> int:
    """Bytes of the gradient that are new memory: none when it is the logits' own storage (in-place)."""
    if grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        return 0
    return grad.numel() * grad.element_size()


def measure_cpu(fn, logits, labels):
    if not reset_peak_rss():
        return None
    baseline = read_status_kb("VmRSS")
    grad = fwd_bwd(fn, logits, labels)
    peak = read_status_kb("VmHWM")
    return peak - baseline - grad_bytes(grad, logits)


def measure_cuda(fn, logits, labels, device):
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    grad = fwd_bwd(fn, logits, labels)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - baseline - grad_bytes(grad, logits)


def child_main(args):
    """Hidden ``--child`` mode: one memory measurement, printed as one JSON line."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtypes]
    fn = impl_fn(args.impls)
    # A tiny pass first, so one-time costs (lazy imports, thread pools, kernel caches) are not charged
    # to the measured pass.
    warm_args = argparse.Namespace(n=1, t=8, v=64, prompt_frac=args.prompt_frac)
    fwd_bwd(fn, *make_inputs(warm_args, dtype, device)[1:])
    _, logits, labels = make_inputs(args, dtype, device)  # randn writes every page: all of it is resident
    measure = measure_cpu if device.type == "cpu" else lambda *a: measure_cuda(*a, device)
    extra = measure(fn, logits, labels)
    print(json.dumps({"extra_bytes": extra}))


def measure_in_child(args, impl, dtype_name, device):
    """Extra bytes for one (impl, dtype), or None where peak RSS cannot be reset."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", "--device", str(device)]
    cmd += ["--impls", impl, "--dtypes", dtype_name, "--n", str(args.n), "--t", str(args.t), "--v", str(args.v)]
    cmd += ["--prompt-frac", str(args.prompt_frac), "--threads", str(torch.get_num_threads())]
    env = dict(os.environ, **CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {impl}/{dtype_name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


# ----------------------------------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device) -> dict:
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def print_header(args, env, impls):
    print("dpo_kernels benchmark: sequence_logps forward + backward")
    print(f"  torch {env['torch']}, {env['threads']} threads, CPU: {env['cpu']}")
    if "gpu" in env:
        print(f"  device: {env['device']} ({env['gpu']})")
    scored = args.n * (args.t - max(prompt_len(args), 1))
    print(
        f"  workload: N={args.n} T={args.t} V={args.v}, prompt prefix {prompt_len(args)} tokens "
        f"({args.prompt_frac:.0%}) masked, {scored} scored tokens; median of {args.reps} reps after {args.warmup} warm-up"
    )
    print(f"  impls: {', '.join(impls)}; extra memory = peak beyond logits and their gradient")
    print()


def fmt_mem(extra, logits_bytes):
    if extra is None:
        return f"{'n/a':>10} {'n/a':>9}"
    return f"{extra / 2**20:>10.1f} {100 * extra / logits_bytes:>8.1f}%"


COLUMNS = f"{'dtype':<6} {'impl':<14} {'time s':>8} {'vs ref':>7} {'extra MB':>10} {'% logits':>9}"


def print_rows(rows):
    print(COLUMNS)
    print("-" * len(COLUMNS))
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        mem = fmt_mem(r["extra_bytes"], r["logits_bytes"])
        print(f"{r['dtype']:<6} {r['impl']:<14} {r['time_s']:>8.3f} {ratio:>7} {mem}")


def verdict(rows, dtype_name, impl) -> str:
    """One line: does this backend meet its issue's time and memory targets for this dtype?"""
    row = next((r for r in rows if r["dtype"] == dtype_name and r["impl"] == impl), None)
    if row is None or row["ratio"] is None:
        return f"{dtype_name}: no verdict (needs both 'reference' and '{impl}' in --impls)"
    target = TARGET_TIME_RATIO[impl]
    time_ok = row["ratio"] <= target
    parts = [f"time {row['ratio']:.2f}x <= {target:.2f}x {'PASS' if time_ok else 'FAIL'}"]
    ok = time_ok
    if row["extra_bytes"] is None:
        parts.append("memory n/a")
    else:
        pct = 100 * row["extra_bytes"] / row["logits_bytes"]
        mem_ok = pct <= TARGET_EXTRA_PCT
        ok = ok and mem_ok
        parts.append(f"extra {pct:.1f}% <= {TARGET_EXTRA_PCT:.0f}% {'PASS' if mem_ok else 'FAIL'}")
    return f"{dtype_name} [{impl}]: {'; '.join(parts)} -> {'MEETS' if ok else 'MISSES'} targets"


# ----------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--t", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--prompt-frac", type=float, default=0.25, help="share of each sequence masked as prompt")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {','.join(DTYPES)}")
    p.add_argument("--impls", default=None, help=f"comma list of {','.join(CUDA_IMPLS)} (triton: CUDA only)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 <= args.prompt_frac < 1:
        p.error("--prompt-frac must be in [0, 1)")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def select(args, device):
    available = CUDA_IMPLS if device.type == "cuda" else CPU_IMPLS
    impls = args.impls.split(",") if args.impls else list(available)
    dtypes = args.dtypes.split(",")
    for name in impls:
        if name not in available:
            sys.exit(f"impl {name!r} not available on {device.type}; choose from {', '.join(available)}")
    for name in dtypes:
        if name not in DTYPES:
            sys.exit(f"dtype {name!r} unknown; choose from {', '.join(DTYPES)}")
    return impls, dtypes


def bench_dtype(args, impls, dtype_name, device):
    dtype = DTYPES[dtype_name]
    times = time_all(args, impls, dtype, device)
    medians = {name: statistics.median(reps) for name, reps in times.items()}
    logits_bytes = args.n * args.t * args.v * torch.finfo(dtype).bits // 8
    ref_time = medians.get("reference")
    rows = []
    for name in impls:
        rows.append(
            {
                "dtype": dtype_name,
                "impl": name,
                "time_s": medians[name],
                "rep_times_s": times[name],
                "ratio": medians[name] / ref_time if ref_time else None,
                "extra_bytes": measure_in_child(args, name, dtype_name, device),
                "logits_bytes": logits_bytes,
            }
        )
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls, dtypes = select(args, device)
    env = environment(device)
    print_header(args, env, impls)
    rows = []
    for dtype_name in dtypes:
        rows += bench_dtype(args, impls, dtype_name, device)
    print_rows(rows)
    print()
    print(f"targets: time <= {TARGET_TIME_RATIO} x reference (per backend), extra <= {TARGET_EXTRA_PCT:.0f}% of logits")
    for impl in (name for name in impls if name in TARGET_TIME_RATIO):
        for dtype_name in dtypes:
            print("  " + verdict(rows, dtype_name, impl))
    print()
    from benchmarks.modeled_memory import report

    # The GPU path at Llama-3-8B scale, whatever machine this is: the one memory figure for real sizes.
    modeled = report(n=8, t=4096, v=128256, dtype_name="bf16")
    if args.json:
        with open(args.json, "w") as f:
            config = {k: v for k, v in vars(args).items() if k not in ("child", "device", "json")}
            json.dump({"config": config, "env": env, "results": rows, "modeled_gpu_memory": modeled}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    # `python benchmarks/run.py` puts benchmarks/ on sys.path, not the repo root that holds dpo_kernels.
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    main()
