"""Exact counts of what Triton kernels load, store and multiply, by running them under the interpreter.

    with traffic.count() as c:      # TRITON_INTERPRET=1 must be set before triton is imported
        ...launch kernels on CPU tensors...
    c.totals["fused_linear_logps_fwd_kernel"]  # {"ld": bytes, "st": bytes, "dot_flops": FLOPs, "launches": n}

Every masked-in element of a ``tl.load`` / ``tl.store`` counts its element size, every ``tl.dot`` 2·M·N·K:
the program as written, with no cache (a tile a GPU serves from L2 counts at each load). The cost model
(benchmarks/modeled.py) is checked against these counts at small shapes, then its formulas are scaled.
The idea is that of the session's shared counter (tools/triton_traffic.py), reduced to per-kernel totals.
"""

import collections
import contextlib

import numpy as np


class Counts:
    def __init__(self):
        self.totals = collections.defaultdict(lambda: {"ld": 0, "st": 0, "dot_flops": 0, "launches": 0})


@contextlib.contextmanager
def count():
    """Patch the interpreter's loads, stores, dots and launches for the duration; yields a Counts."""
    import triton.runtime.interpreter as interpreter

    counts = Counts()
    current = [None]
    builder = interpreter.InterpreterBuilder
    orig_call = interpreter.GridExecutor.__call__
    orig_load, orig_store, orig_dot = builder.create_masked_load, builder.create_masked_store, builder.create_dot

    def call(self, *args, **kwargs):
        current[0] = getattr(self.fn, "__name__", str(self.fn))
        counts.totals[current[0]]["launches"] += 1
        return orig_call(self, *args, **kwargs)

    def selected(ptrs, mask):
        return int(np.broadcast_to(np.asarray(mask.data, dtype=bool), np.asarray(ptrs.data).shape).sum())

    def load(self, ptrs, mask, other, *rest):
        itemsize = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        counts.totals[current[0]]["ld"] += selected(ptrs, mask) * itemsize
        return orig_load(self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        counts.totals[current[0]]["st"] += selected(ptrs, mask) * value.data.dtype.itemsize
        return orig_store(self, ptrs, value, mask, *rest)

    def dot(self, a, b, d, *rest):
        m, k = a.data.shape[-2:]
        counts.totals[current[0]]["dot_flops"] += 2 * m * k * b.data.shape[-1] * int(np.prod(a.data.shape[:-2]))
        return orig_dot(self, a, b, d, *rest)

    interpreter.GridExecutor.__call__ = call
    builder.create_masked_load, builder.create_masked_store, builder.create_dot = load, store, dot
    try:
        yield counts
    finally:
        interpreter.GridExecutor.__call__ = orig_call
        builder.create_masked_load, builder.create_masked_store, builder.create_dot = orig_load, orig_store, orig_dot
