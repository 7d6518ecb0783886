"""Inputs, the correctness check, timing, and the peak-memory child process."""

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks import providers
from dpo_kernels._peak_rss import reset_peak_rss, status_bytes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max error of a provider vs the reference on the same inputs, relative to the reference's largest
# magnitude (per tensor: output, then each gradient). Half precision: a few ulps of the output dtype.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
# glibc keeps freed blocks below its adaptive mmap threshold in the heap, which would hide or overstate
# a later peak; a fixed low threshold returns every large buffer to the OS on free.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass(frozen=True)
class Case:
    workload: str
    dtype: str
    n: int
    t: int
    v: int
    h: int
    prompt_frac: float

    @property
    def prompt_len(self) -> int:
        return round(self.t * self.prompt_frac)

    @property
    def scored_tokens(self) -> int:
        return self.n * (self.t - max(self.prompt_len, 1))

    @property
    def logits_bytes(self) -> int:
        return self.n * self.t * self.v * DTYPES[self.dtype].itemsize

    def label(self) -> str:
        shape = f"N={self.n} T={self.t} V={self.v}" + (f" H={self.h}" if self.workload == "lm_head" else "")
        return f"{self.workload} {self.dtype} {shape}"


# ----------------------------------------------------------------------------------------------------
# Inputs


class Inputs:
    """The tensors of one case, built from a fixed seed: every provider sees the same values.

    logits: a non-leaf view of a leaf ``source`` (the in-place backward refuses leaf logits, and real
    logits come out of an LM head); ``restore()`` rewrites the pristine values before each pass, since
    the in-place variant overwrites the logits with their gradient.
    """

    def __init__(self, case: Case, device, keep_pristine: bool = True):
        device = torch.device(device)
        # On a GPU the values are drawn there, in the case's dtype: drawing real-scale logits (4 G elements)
        # on the CPU takes longer than the whole benchmark. Same seed, same device: the same values.
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        gen = torch.Generator(gen_device).manual_seed(0)
        dtype = DTYPES[case.dtype]
        self.case = case
        labels = torch.randint(0, case.v, (case.n, case.t), generator=gen, device=gen_device)
        labels[:, : case.prompt_len] = providers.IGNORE
        self.labels = labels.to(device)
        if case.workload == "logits":
            draw_dtype = dtype if gen_device.type == "cuda" else torch.float32
            logits = torch.randn(case.n, case.t, case.v, generator=gen, device=gen_device, dtype=draw_dtype)
            self.source = logits.to(device=device, dtype=dtype)
            self.source.requires_grad_(True)
            self.pristine = self.source.detach().clone() if keep_pristine else None
            self.leaves = (self.source,)
        else:
            hidden = torch.randn(case.n, case.t, case.h, generator=gen, device=gen_device)
            weight = torch.randn(case.v, case.h, generator=gen, device=gen_device) / case.h**0.5
            self.leaves = tuple(x.to(device=device, dtype=dtype).requires_grad_(True) for x in (hidden, weight))
            self.pristine = None

    def restore(self):
        if self.pristine is not None:
            with torch.no_grad():
                self.source.copy_(self.pristine)

    def args(self):
        if self.case.workload == "logits":
            return (self.source.view_as(self.source), self.labels)
        return (*self.leaves, self.labels)

    def input_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.leaves)


def forward_backward(fn, inputs: Inputs):
    """(Out, grads): one forward and one backward. ``autograd.grad`` w.r.t. the tensors fed to the
    provider (the logits view itself, so the in-place gradient is returned as is, no accumulation copy)."""
    args = inputs.args()
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args)
    grads = torch.autograd.grad(out.loss, diff)
    return out, grads


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Correctness


def max_rel_err(x, ref, chunk: int = 2**26) -> float:
    """max |x − ref| / max |ref| in fp64, a slice at a time: at real scale a gradient is 8 GB in bf16 and
    a whole fp64 copy of it (and of the reference's) would not fit beside the rest. NaN propagates."""
    x, ref = x.detach().reshape(-1), ref.detach().reshape(-1)
    if x.numel() != ref.numel():
        raise ValueError(f"shape mismatch: {x.numel()} vs {ref.numel()} elements")
    err = ref.new_zeros((), dtype=torch.float64)
    scale = ref.new_zeros((), dtype=torch.float64)
    for start in range(0, ref.numel(), chunk):
        xs, rs = x[start : start + chunk].double(), ref[start : start + chunk].double()
        err = torch.maximum(err, (xs - rs).abs().max())
        scale = torch.maximum(scale, rs.abs().max())
    return err.item() / (scale.item() or 1.0)


def check(fns: dict, inputs: Inputs, ref_name: str = "reference"):
    """{name: {"errors": {...}, "max_err": float, "ok": bool, "error": str|None}} vs the reference on
    these inputs: loss, per-sequence log-probs where the provider returns them, every gradient."""
    tol = TOLERANCE[inputs.case.dtype]
    results = {}
    inputs.restore()
    ref_out, ref_grads = forward_backward(fns[ref_name], inputs)
    ref_grads = [g.detach().clone() for g in ref_grads]
    ref_loss, ref_logps = ref_out.loss.detach(), ref_out.logps.detach()
    del ref_out
    for name, fn in fns.items():
        inputs.restore()
        try:
            out, grads = forward_backward(fn, inputs)
        except Exception as error:  # a provider that fails is reported, not timed
            results[name] = {"errors": {}, "max_err": None, "ok": False, "error": f"{type(error).__name__}: {error}"}
            continue
        errs = {"loss": max_rel_err(out.loss.reshape(()), ref_loss)}
        if out.logps is not None:
            errs["logps"] = max_rel_err(out.logps, ref_logps)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            key = "grad_logits" if inputs.case.workload == "logits" else ("grad_hidden", "grad_weight")[i]
            errs[key] = max_rel_err(g, r)
        worst = max(errs.values())
        ok = worst <= tol and all(v == v for v in errs.values())  # NaN never passes
        results[name] = {"errors": errs, "max_err": worst, "ok": ok, "error": None}
        del out, grads
    inputs.restore()
    return results


# ----------------------------------------------------------------------------------------------------
# Timing


def _timed_pass(fn, inputs: Inputs, device):
    """(forward s, backward s) of one pass; the restore of in-place-overwritten logits is not timed."""
    inputs.restore()
    args = inputs.args()
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if device.type == "cuda":
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        sync(device)
        start.record()
        out = fn(*args)
        mid.record()
        grads = torch.autograd.grad(out.loss, diff)
        end.record()
        end.synchronize()
        fwd, bwd = start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        grads = torch.autograd.grad(out.loss, diff)
        t2 = time.perf_counter()
        fwd, bwd = t1 - t0, t2 - t1
    del out, grads
    return fwd, bwd


def time_all(fns: dict, inputs: Inputs, device, reps: int, warmup: int, progress=None):
    """{name: {"fwd": [...], "bwd": [...], "total": [...]}} seconds per timed pass.

    Reps are interleaved across providers, and the order rotates every rep, so a slow spell of a shared
    machine (or the position in the round) lands on all providers alike.
    """
    names = list(fns)
    times = {n: {"fwd": [], "bwd": [], "total": []} for n in names}
    for rep in range(warmup + reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            fwd, bwd = _timed_pass(fns[name], inputs, device)
            if rep >= warmup:
                times[name]["fwd"].append(fwd)
                times[name]["bwd"].append(bwd)
                times[name]["total"].append(fwd + bwd)
        if progress is not None:
            progress(rep)
    return times


def summarize(samples):
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "q1": q[0], "q3": q[2], "min": s[0], "max": s[-1], "n": len(s)}


# ----------------------------------------------------------------------------------------------------
# Peak memory: one fresh child process per (provider, case)


def _status_bytes(field: str) -> int:
    value = status_bytes(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value


def _new_bytes(grads, inputs: Inputs) -> int:
    """Bytes of the gradients that are new memory: an in-place gradient reuses the logits' storage."""
    own = {x.untyped_storage().data_ptr() for x in inputs.leaves}
    return sum(g.numel() * g.element_size() for g in grads if g.untyped_storage().data_ptr() not in own)


def _limit_malloc_mmap_threshold():
    """glibc keeps freed blocks below its adaptive mmap threshold in the heap, which would hide or
    overstate a later peak; a fixed low threshold returns every large buffer to the OS on free (the
    same as MALLOC_MMAP_THRESHOLD_=65536 in the environment)."""
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536)
    except (OSError, AttributeError):
        pass


def child_measure(spec: dict) -> dict:
    """Measure one (provider, case) in this fresh process."""
    _limit_malloc_mmap_threshold()
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    provider = providers.get(case.workload, spec["provider"])
    fn = provider.build()
    # One-time costs (lazy imports, thread pools, kernel caches, torch.compile) are not the measured
    # pass's: a tiny pass first, or a full-size one for providers that compile for the shapes they see.
    warm_case = case if provider.compiles else Case(case.workload, case.dtype, 2, 8, 64, 16, case.prompt_frac)
    warm = Inputs(warm_case, device, keep_pristine=False)
    forward_backward(fn, warm)
    del warm
    gc.collect()
    inputs = Inputs(case, device, keep_pristine=False)  # randn wrote every page: all of it is resident
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        out, grads = forward_backward(fn, inputs)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        if not reset_peak_rss():
            return {"extra_bytes": None, "method": "unavailable (/proc/self/clear_refs refused)"}
        baseline = _status_bytes("VmRSS")
        out, grads = forward_backward(fn, inputs)
        peak = _status_bytes("VmHWM")
        method = "peak RSS (VmHWM after clear_refs), fresh child process"
    return {"extra_bytes": peak - baseline - _new_bytes(grads, inputs), "method": method}


def child_main(spec: dict):
    """``python -m benchmarks --child-spec JSON``: one measurement, printed as one JSON line."""
    print(json.dumps(child_measure(spec)))


def _child_entry(spec, conn):
    try:
        conn.send(child_measure(spec))
    except BaseException as error:  # report, do not hang the parent
        conn.send({"extra_bytes": None, "method": f"child failed: {type(error).__name__}: {error}"})
    finally:
        conn.close()


class MemoryProbe:
    """Runs each measurement in a fresh process. On Linux the processes fork from a forkserver that
    has imported torch, dpo_kernels and the peers in use but run nothing (no threads, no allocator
    history), so a measurement costs no interpreter start-up and imports; elsewhere (or with
    ``subprocess=True``) each is a new ``python -m benchmarks --child-spec`` interpreter."""

    def __init__(self, preload=(), subprocess: bool = False):
        import multiprocessing as mp

        self.ctx = None
        if not subprocess and "forkserver" in mp.get_all_start_methods():
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(["torch", "dpo_kernels", "benchmarks.measure", *preload])

    def measure(self, case: Case, provider: str, device, threads: int) -> dict:
        spec = {"case": asdict(case), "provider": provider, "device": str(device), "threads": threads}
        if self.ctx is None:
            return _measure_in_subprocess(spec)
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child_entry, args=(spec, child))
        proc.start()
        child.close()
        try:
            result = parent.recv()
        except EOFError:
            result = {"extra_bytes": None, "method": f"child died (exit code {proc.exitcode})"}
        proc.join()
        return result


def _measure_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "--child-spec", json.dumps(spec)]
    env = dict(os.environ, **CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"extra_bytes": None, "method": f"child failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
