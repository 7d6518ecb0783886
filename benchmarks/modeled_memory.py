"""Modeled GPU memory at real sizes, with no allocation: FakeTensorMode + MemTracker.

The fused ops have fake implementations that allocate exactly what the Triton kernels allocate (their
outputs; the kernels keep everything else in registers), so the tracker's peak is the GPU path's peak.
Tensors are fake CPU tensors because the autograd engine wants a real CUDA context for CUDA ones;
the shapes, dtypes and lifetimes, which are all the model depends on, are the same.

    python benchmarks/modeled_memory.py [--n 8 --t 4096 --v 128256 --dtype bf16]
"""

import argparse
import os
import sys

import torch

GiB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def modeled_peak_bytes(make_inputs, loss_fn) -> int:
    """Modeled peak bytes of ``loss_fn(*make_inputs()).backward()``, its tensor inputs included.

    ``make_inputs`` runs under FakeTensorMode: it allocates nothing.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        inputs = make_inputs()
        tracker = MemTracker()
        tracker.track_external(*(x for x in inputs if isinstance(x, torch.Tensor)))
        with tracker:
            loss_fn(*inputs).backward()
        snapshot = tracker.get_tracker_snapshot("peak")
    return next(stats["Total"] for device, stats in snapshot.items() if str(device) == "cpu")


def logits_inputs(n: int, t: int, v: int, dtype: torch.dtype, with_ref: bool):
    """(logits, ref_logits or None, labels) for the log-prob workloads."""
    return lambda: (
        torch.empty(n, t, v, dtype=dtype, requires_grad=True),
        torch.empty(n, t, v, dtype=dtype) if with_ref else None,
        torch.zeros(n, t, dtype=torch.long),
    )


def lm_head_inputs(n: int, t: int, h: int, v: int, dtype: torch.dtype):
    """(hidden, weight, labels) for the fused LM head workloads."""
    return lambda: (
        torch.empty(n, t, h, dtype=dtype, requires_grad=True),
        torch.empty(v, h, dtype=dtype, requires_grad=True),
        torch.zeros(n, t, dtype=torch.long),
    )


def workloads():
    """(name, loss_fn, with_ref) for the naive reference and the fused path."""
    import dpo_kernels
    from dpo_kernels import reference

    return [
        ("sequence_logps  reference", lambda x, r, y: reference.sequence_logps(x, y).sum(), False),
        ("sequence_logps  fused", lambda x, r, y: dpo_kernels.sequence_logps(x, y).sum(), False),
        ("dpo_loss        reference", lambda x, r, y: reference.dpo_loss(x, r, y)[0], True),
        ("fused_dpo_loss  fused", lambda x, r, y: dpo_kernels.fused_dpo_loss(x, r, y)[0], True),
    ]


def report(n: int, t: int, v: int, dtype_name: str) -> list[dict]:
    dtype = DTYPES[dtype_name]
    logits_bytes = n * t * v * dtype.itemsize
    print(f"modeled GPU peak memory (FakeTensorMode, no allocation): N={n} T={t} V={v} {dtype_name}")
    print(f"  logits {logits_bytes / GiB:.2f} GiB; 'extra' = peak beyond the inputs and the logits' gradient")
    rows = []
    for name, fn, with_ref in workloads():
        peak = modeled_peak_bytes(logits_inputs(n, t, v, dtype, with_ref), fn)
        extra = peak - logits_bytes * (3 if with_ref else 2)
        rows.append({"name": name, "peak_bytes": peak, "extra_bytes": extra})
        print(f"  {name:<28} peak {peak / GiB:7.2f} GiB   extra {extra / GiB:7.2f} GiB (modeled)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--t", type=int, default=4096)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    args = p.parse_args(argv)
    report(args.n, args.t, args.v, args.dtype)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
