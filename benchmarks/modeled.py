"""Modeled GPU figures at real scale, with no GPU and no allocation. Every number here is *modeled*.

1. Peak memory of the loss computation (forward + backward) under FakeTensorMode + MemTracker: the
   tensors' shapes, dtypes and lifetimes are real, their storage is not. The fused ops are
   torch.library custom ops whose fake implementations allocate what the kernels return; in-kernel
   scratch is not seen by the tracker, so the Triton fused-linear backward's scratch is added
   analytically (fp32 d_hidden slabs, vocab splits x rows x H, and one fp32 BLOCK_V x H slot per
   persistent program; 132 SMs of an H100 SXM).
2. Bytes moved per token by each kernel (analytic) and the resulting H100 SXM memory-bandwidth time
   bound at 3.35 TB/s, with the dense bf16 tensor-core compute bound (989 TFLOP/s) beside it for the
   matmul paths. Assumptions are in ``ASSUMPTIONS`` and printed with the table.
"""

import torch

GiB = 2**30
H100_BW = 3.35e12  # bytes/s, H100 SXM HBM3
H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak, H100 SXM
H100_SMS = 132
MODELS = {  # name -> (V, H)
    "Llama-3-8B": (128256, 4096),
    "Qwen2.5-7B": (152064, 3584),
    "Gemma-2-9B": (256000, 3584),
}
N_SEQ, SEQ_LEN = 8, 4096  # 2B = 8 sequences (4 pairs) of 4096 tokens
BLOCK_M, BLOCK_V = 64, 128  # the Triton bf16 fused-linear tiles (dpo_kernels.triton.linear.LAUNCH_CONFIGS)
ASSUMPTIONS = [
    "bf16 logits/hidden/weight (2 bytes), fp32 per-token log-probs; every token scored (an upper bound: prompt rows cost the fused paths nothing)",
    "each kernel reads each operand once and writes each output once from HBM, no cache reuse across kernels",
    "eager reference = slice, cast to fp32, log_softmax, gather; backward: gather's zero-filled scatter, log_softmax backward, cast back, the slice's zero-padded copy (42·V bytes/token)",
    "fused log-prob kernel (Triton): one online log-sum-exp pass over the logits in the forward, one read + one gradient write in the backward (6·V bytes/token; in-place writes over the logits, same traffic)",
    f"GEMMs (cuBLAS in the naive LM head, Triton fused-linear): the weight is streamed once per {BLOCK_M}-row block "
    f"(forward and d_hidden products), the hidden rows once per {BLOCK_V}-wide vocabulary block (d_weight); no L2 "
    "reuse across concurrently running blocks, so this part is an upper bound (blocks running at the same time share "
    "weight tiles through the 50 MB L2, so real HBM traffic is far lower; the FLOP bound is the better guide there)",
    "FLOPs: naive LM head 6·M·V·H (forward, d_hidden, d_weight); fused-linear 10·M·V·H (the logits tile is recomputed in both backward kernels)",
]


# ----------------------------------------------------------------------------------------------------
# Modeled peak memory


def modeled_peak_bytes(make_inputs, loss_fn) -> int:
    """Modeled peak bytes of ``loss_fn(*inputs)`` and the gradients w.r.t. its differentiable tensor
    arguments, the inputs included. ``make_inputs`` runs under FakeTensorMode: nothing is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        leaves, args = make_inputs()
        tracker = MemTracker()
        tracker.track_external(*leaves)
        with tracker:
            diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = torch.autograd.grad(loss_fn(*args), diff)
            del grads
        snapshot = tracker.get_tracker_snapshot("peak")
    return max(stats["Total"] for stats in snapshot.values())


def _logits_inputs(n, t, v, dtype):
    def make():
        source = torch.empty(n, t, v, dtype=dtype, requires_grad=True)
        labels = torch.zeros(n, t, dtype=torch.long)
        return (source, labels), (source.view_as(source), labels)  # a non-leaf view, as an LM head's output

    return make


def _lm_head_inputs(n, t, h, v, dtype):
    def make():
        hidden = torch.empty(n, t, h, dtype=dtype, requires_grad=True)
        weight = torch.empty(v, h, dtype=dtype, requires_grad=True)
        labels = torch.zeros(n, t, dtype=torch.long)
        return (hidden, weight, labels), (hidden, weight, labels)

    return make


def triton_linear_scratch_bytes(m: int, h: int, v: int) -> int:
    """The Triton fused-linear backward's fp32 scratch (not seen by the tracker), per its launcher."""
    row_blocks = -(-m // BLOCK_M)
    v_tiles = -(-v // BLOCK_V)
    splits = max(1, min(-(-2 * H100_SMS // row_blocks), 16, v_tiles))
    h_pad = -(-h // 64) * 64
    return splits * row_blocks * BLOCK_M * h_pad * 4 + min(H100_SMS, v_tiles) * BLOCK_V * h_pad * 4


def modeled_memory(models=None, n=N_SEQ, t=SEQ_LEN, dtype=torch.bfloat16) -> list[dict]:
    import dpo_kernels
    from dpo_kernels import reference

    from benchmarks.providers import dpo_from_logps

    rows = []
    for model in models or MODELS:
        v, h = MODELS[model]
        esize = dtype.itemsize
        logits_b, hidden_b, weight_b = n * t * v * esize, n * t * h * esize, v * h * esize
        paths = [
            ("logits", "naive: reference.sequence_logps", _logits_inputs(n, t, v, dtype),
             lambda x, y: dpo_from_logps(reference.sequence_logps(x, y)).loss, 2 * logits_b, 0),
            ("logits", "fused: sequence_logps", _logits_inputs(n, t, v, dtype),
             lambda x, y: dpo_from_logps(dpo_kernels.sequence_logps(x, y)).loss, 2 * logits_b, 0),
            ("logits", "fused: sequence_logps, in-place", _logits_inputs(n, t, v, dtype),
             lambda x, y: dpo_from_logps(dpo_kernels.sequence_logps(x, y, inplace_backward=True)).loss, logits_b, 0),
            ("lm_head", "naive: matmul + reference", _lm_head_inputs(n, t, h, v, dtype),
             lambda a, w, y: dpo_from_logps(reference.sequence_logps(reference.lm_head_logits(a, w), y)).loss,
             2 * (hidden_b + weight_b), 0),
            ("lm_head", "fused-linear: fused_linear_sequence_logps", _lm_head_inputs(n, t, h, v, dtype),
             lambda a, w, y: dpo_from_logps(dpo_kernels.fused_linear_sequence_logps(a, w, y)).loss,
             2 * (hidden_b + weight_b), triton_linear_scratch_bytes(n * t, h, v)),
        ]  # fmt: skip
        for workload, name, make, fn, io_bytes, scratch in paths:
            peak = modeled_peak_bytes(make, fn) + scratch
            rows.append({
                "model": model, "V": v, "H": h, "N": n, "T": t, "workload": workload, "path": name,
                "peak_bytes": peak, "beyond_io_bytes": peak - io_bytes, "scratch_bytes": scratch,
                "logits_bytes": logits_b,
            })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------
# Bytes moved per token and the bandwidth bound (analytic)


def bytes_per_token(v: int, h: int, e: int = 2) -> list[dict]:
    """Per scored token: V-sized (logits) traffic, GEMM operand streaming, small per-row traffic, FLOPs."""
    stream_w = e * v * h / BLOCK_M  # the weight once per BLOCK_M-row block
    stream_h = e * h * v / BLOCK_V  # the hidden rows once per BLOCK_V-wide vocabulary block
    return [
        {"kernel": "logits: naive reference (eager)", "logits_io": 42 * v, "gemm_stream": 0, "other": 0, "flops": 0},
        {"kernel": "logits: dpo_kernels fused (Triton)", "logits_io": 3 * e * v, "gemm_stream": 0, "other": 0, "flops": 0},
        # matmul writes the logits, the two backward GEMMs read their gradient; plus the eager reference
        {"kernel": "lm_head: naive (cuBLAS + eager reference)", "logits_io": 42 * v + 3 * e * v,
         "gemm_stream": 2 * stream_w + stream_h, "other": 2 * e * h, "flops": 6 * v * h},
        # fwd reads hidden; backward: fp32 d_hidden slab written + read, d_hidden written
        {"kernel": "lm_head: dpo_kernels fused-linear (Triton)", "logits_io": 0,
         "gemm_stream": 2 * stream_w + stream_h, "other": e * h + 8 * h + e * h, "flops": 10 * v * h},
    ]  # fmt: skip


def bandwidth_table(models=None, n=N_SEQ, t=SEQ_LEN) -> list[dict]:
    rows = []
    tokens = n * t
    for model in models or MODELS:
        v, h = MODELS[model]
        for r in bytes_per_token(v, h):
            total = r["logits_io"] + r["gemm_stream"] + r["other"]
            rows.append({
                "model": model, "V": v, "H": h, "tokens": tokens, **r, "bytes_per_token": total,
                "bw_bound_ms": 1e3 * total * tokens / H100_BW,
                "bw_bound_logits_only_ms": 1e3 * r["logits_io"] * tokens / H100_BW,
                "flop_bound_ms": 1e3 * r["flops"] * tokens / H100_BF16_FLOPS if r["flops"] else None,
            })  # fmt: skip
    return rows


def markdown(mem_rows, bw_rows) -> str:
    out = [f"### Modeled GPU memory (FakeTensorMode + MemTracker; 2B = {N_SEQ}, T = {SEQ_LEN}, bf16)", ""]
    out += ["| model | workload | path | modeled peak GiB | modeled beyond inputs + grads GiB | vs naive |",
            "|---|---|---|---:|---:|---:|"]  # fmt: skip
    naive = {}
    for r in mem_rows:
        key = (r["model"], r["workload"])
        naive.setdefault(key, r["peak_bytes"])
        note = " (+ analytic Triton scratch)" if r["scratch_bytes"] else ""
        out.append(
            f"| {r['model']} (V {r['V']}, H {r['H']}) | {r['workload']} | {r['path']}{note} | {r['peak_bytes'] / GiB:.2f} "
            f"| {r['beyond_io_bytes'] / GiB:.2f} | {r['peak_bytes'] / naive[key]:.2f}× |"
        )
    out += ["", "Logits workload: inputs = the logits (plus their gradient unless in-place); lm_head workload: inputs = "
            "hidden + weight and their gradients.", ""]  # fmt: skip
    out += [f"### Modeled bytes moved per token and H100 SXM bound (analytic, {H100_BW / 1e12:.2f} TB/s, "
            f"{H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 dense; {N_SEQ}×{SEQ_LEN} tokens)", ""]  # fmt: skip
    out += ["| model | kernel (fwd+bwd) | logits-sized MB/token | GEMM streaming MB/token (no L2 reuse) | modeled BW bound ms "
            "| of which logits-sized ms | modeled FLOP bound ms |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in bw_rows:
        flop = f"{r['flop_bound_ms']:.1f}" if r["flop_bound_ms"] else "-"
        out.append(
            f"| {r['model']} | {r['kernel']} | {r['logits_io'] / 1e6:.2f} | {r['gemm_stream'] / 1e6:.2f} "
            f"| {r['bw_bound_ms']:.1f} | {r['bw_bound_logits_only_ms']:.1f} | {flop} |"
        )
    out += ["", "Assumptions (modeled):"] + [f"- {a}" for a in ASSUMPTIONS]
    return "\n".join(out)


def run(models=None) -> dict:
    mem, bw = modeled_memory(models), bandwidth_table(models)
    return {"memory": mem, "bandwidth": bw, "assumptions": ASSUMPTIONS, "markdown": markdown(mem, bw)}
