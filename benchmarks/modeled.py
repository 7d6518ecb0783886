"""Modeled GPU figures at real scale, with no GPU and no allocation. Every number here is *modeled*.

1. Peak memory of the loss computation (forward + backward) under FakeTensorMode + MemTracker: the
   tensors' shapes, dtypes and lifetimes are real, their storage is not. The fused ops are
   torch.library custom ops whose fake implementations allocate what the kernels return; in-kernel
   scratch is not seen by the tracker, so the Triton fused-linear backward's scratch is added
   analytically (its dz chunk buffer and its fp32 (rows, H) d_hidden accumulator).
2. Bytes moved per token by each kernel (analytic) and the resulting H100 SXM memory-bandwidth time
   bound at 3.35 TB/s, with the dense bf16 tensor-core compute bound (989 TFLOP/s) beside it for the
   matmul paths. Assumptions are in ``ASSUMPTIONS`` and printed with the table.
3. Modeled time per kernel launch (``modeled_times``): FLOPs and HBM bytes as formulas in the launch's
   tile parameters, an L2 working-set rule for re-read operands, max(bytes / bandwidth, FLOPs / rate) on
   an H100 (datasheet) and an H200 (ceilings measured here); the exact Triton counts are checked
   against the interpreter (tests/test_cost_model.py, benchmarks/traffic.py).
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
SOFTCAP_MODELS = ("Gemma-2-9B",)  # final-logit softcapping: the op keeps the fused forward (tanh in registers)
N_SEQ, SEQ_LEN = 8, 4096  # 2B = 8 sequences (4 pairs) of 4096 tokens
BLOCK_M, BLOCK_V = 64, 128  # the Triton bf16 fused-linear tiles (dpo_kernels.triton.linear.LAUNCH_CONFIGS)
ASSUMPTIONS = [
    "bf16 logits/hidden/weight (2 bytes), fp32 per-token log-probs; every token scored (an upper bound: prompt rows cost the fused paths nothing)",
    "each kernel reads each operand once and writes each output once from HBM, no cache reuse across kernels",
    "eager reference = slice, cast to fp32, log_softmax, gather; backward: gather's zero-filled scatter, log_softmax backward, cast back, the slice's zero-padded copy (42·V bytes/token)",
    "fused log-prob kernel (Triton): one online log-sum-exp pass over the logits in the forward, one read + one gradient write in the backward (6·V bytes/token; in-place writes over the logits, same traffic)",
    (
        f"GEMMs (cuBLAS in the naive LM head, Triton fused-linear): the weight is streamed once per {BLOCK_M}-row block "
        f"(forward and d_hidden products), the hidden rows once per {BLOCK_V}-wide vocabulary block (d_weight); no L2 "
        "reuse across concurrently running blocks, so this part is an upper bound (blocks running at the same time share "
        "weight tiles through the 50 MB L2, so real HBM traffic is far lower; the FLOP bound is the better guide there)"
    ),
    "FLOPs: naive LM head 6·M·V·H (forward, d_hidden, d_weight); fused-linear 8·M·V·H (the logits are recomputed once, in the backward's dz kernel)",
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


def triton_linear_scratch_bytes(m: int, h: int, v: int, e: int = 2) -> int:
    """The Triton fused-linear backward's scratch (not seen by the tracker), per its launcher: the dz chunk
    buffer (at most DZ_CHUNK_BYTES, whole BLOCK_V tiles) and the fp32 (M, H) d_hidden accumulator."""
    from dpo_kernels.triton.linear import DZ_CHUNK_BYTES, dz_chunk_columns

    vc = min(dz_chunk_columns(m, v, e, BLOCK_V, DZ_CHUNK_BYTES), v)
    return m * vc * e + m * h * 4


def modeled_memory(models=None, n=N_SEQ, t=SEQ_LEN, dtype=torch.bfloat16) -> list[dict]:
    import dpo_kernels
    from benchmarks.providers import dpo_from_logps
    from dpo_kernels import reference

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
        # fwd reads hidden; backward: the fp32 d_hidden accumulator written + read (once per dz chunk, one
        # chunk here), d_hidden written
        # backward: dz written once in bf16 and read by the two cuBLAS products and the d_bias sum
        {"kernel": "lm_head: dpo_kernels fused-linear (Triton + cuBLAS)", "logits_io": 4 * e * v,
         "gemm_stream": 2 * stream_w + stream_h, "other": e * h + 8 * h + e * h, "flops": 8 * v * h},
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


# ----------------------------------------------------------------------------------------------------
# Cost model per kernel launch: exact counts (checked against the interpreter), HBM bytes with L2, time


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


GPUS = {  # name -> (HBM bytes/s, dense bf16 GEMM FLOP/s (cuBLAS), SMs, L2 bytes)
    "H100 SXM (datasheet)": (3.35e12, 989e12, 132, 50 * 2**20),
    "H200 (measured)": (4.3e12, 790e12, 132, 60 * 2**20),
}
# A Triton tl.dot loop on Hopper (wgmma, 64 x 128 tiles, a softmax epilogue per tile): 0.7 of the datasheet
# dense rate, i.e. 0.875 of what cuBLAS reached on the H200 here (788 of 989 TFLOP/s). Triton's products
# lower to the same wgmma as cuBLAS; the factor charges our smaller tiles (fewer operand reuses per byte
# of shared memory) and the exp / max epilogue, amortized over H / BLOCK_H = 64 k-steps. An assumption
# to check on the first GPU run (issue 14.8), on both GPUs the same (the same SMs and clocks).
TRITON_DOT_RATE = 0.7 * 989e12
L2_SHARE = 0.5  # the share of L2 a re-read working set may fill and still be served from it


def triton_linear_counts(M, H, V, e, cfg, splits, chunk_cols, bias=False, eb=None):
    """Exact loads / stores (bytes) and tl.dot FLOPs of the Triton fused-LM-head kernels as launched by
    ``dpo_kernels.triton.linear`` (no stats), without any cache: what the interpreter counts.

    cfg: LinearConfig; splits: the forward's vocabulary splits (after ``_vocab_splits``); chunk_cols: the
    backward's dz chunk width VC. Rows of every block load their H once per V tile they meet, weight rows
    once per row block; dot FLOPs count padded tiles (2 · BLOCK_M · BLOCK_V · BLOCK_H per k-step).
    """
    eb = e if eb is None else eb
    BM, BV, BH = cfg.BLOCK_M, cfg.BLOCK_V, cfg.BLOCK_H
    R, T, Hp = cdiv(M, BM), cdiv(V, BV), cdiv(H, BH) * BH
    fwd = {
        "ld": 8 * M * splits + M * H * e * T + V * H * e * R + (V * eb * R if bias else 0),
        "st": 3 * 4 * M * splits,
        "dot_flops": 2 * R * BM * T * BV * Hp,
    }
    # the merge reads no labels without stats (an unowned label's z[label] is already 0); it writes logp and
    # both lse parts
    merge = {"ld": 4 * 4 * M * splits, "st": 3 * 4 * M, "dot_flops": 0}
    tiles = sum(cdiv(min(chunk_cols, V - c), BV) for c in range(0, V, chunk_cols))
    dz = {
        "ld": (8 + 4 + 8) * M * tiles + M * H * e * tiles + V * H * e * R + (V * eb * R if bias else 0),
        "st": M * V * e,
        "dot_flops": 2 * R * BM * tiles * BV * Hp,
    }
    return {"fused_linear_logps_fwd_kernel": fwd, "fused_linear_logps_merge_kernel": merge,
            "fused_linear_logps_bwd_dz_kernel": dz}  # fmt: skip


def cublas_forward_counts(M, V, with_stats=False):
    """Exact loads / stores (bytes) of the Triton kernels of the op's forward (``fused_linear_logps_fwd_cublas``)
    on fp32 logits chunks: per row V logits, the label's logit again and the int64 label read, logp and the
    two-part lse written (+ 16 bytes of statistics, and the special-statistics pass's 4-byte check)."""
    out = {"token_logps_fwd_kernel": {"ld": M * (4 * V + 12), "st": M * (28 if with_stats else 12), "dot_flops": 0}}
    if with_stats:
        out["token_logps_special_stats_kernel"] = {"ld": 4 * M, "st": 0, "dot_flops": 0}
    return out


def _kept_tiles(M, V, BM, BV, chunk_cols, keep):
    """Per chunk (cols, R, T, n, area, width, height): its width, row blocks, V tiles and, over its kept
    (BLOCK_M, BLOCK_V) tiles, their number, Σ rows · columns, Σ columns and Σ rows (ragged edge tiles are
    smaller). ``keep``: the launcher's per-chunk flag arrays (``keep_out``), exact; or a kept-tile density
    ρ in [0, 1], every tile counted at weight ρ (the expectation for kept tiles spread evenly)."""
    out = []
    for n, c0 in enumerate(range(0, V, chunk_cols)):
        cols = min(chunk_cols, V - c0)
        R, T = cdiv(M, BM), cdiv(cols, BV)
        if isinstance(keep, (int, float)):
            out.append((cols, R, T, keep * R * T, keep * M * cols, keep * cols * R, keep * M * T))
            continue
        flags = keep[n]
        tiles = [(min(BM, M - i * BM), min(BV, cols - j * BV)) for i in range(R) for j in range(T) if int(flags[i][j])]
        out.append((cols, R, T, len(tiles), sum(r * c for r, c in tiles), sum(c for _, c in tiles),
                    sum(r for r, _ in tiles)))  # fmt: skip
    return out


def triton_filtered_counts(M, H, V, e, cfg, prod, chunk_cols, keep, bias=False):
    """Exact loads / stores (bytes) and tl.dot FLOPs of the gradient-filtered backward (filter_eps > 0): the
    dz kernel with FILTER (kept tiles stored, a flag byte per tile) and the Triton d_hidden / d_weight
    products that skip dropped tiles, without any cache, as the interpreter counts them.

    cfg: LinearConfig (the flag tiles BLOCK_M x BLOCK_V); prod: ProductConfig (BLOCK_N); keep: the per-chunk
    flags or a kept-tile density ρ (``_kept_tiles``). Per chunk of T tiles per row block, R row blocks,
    HB = cdiv(H, BLOCK_N) H blocks and kept tiles (rows_i, cols_j): d_hidden reads every flag once per H
    block, a kept dz tile once per H block (HB · Σ rows_i · cols_j · e) and its W rows once (Σ cols_j · H ·
    e), the fp32 accumulator once (and writes it once); d_weight the same with h rows (Σ rows_i · H · e)
    for W rows, writing the chunk's d_weight (and d_bias) once; each kept tile costs HB · 2 · BLOCK_M ·
    BLOCK_V · BLOCK_N FLOPs (padded) in each product. At density ρ the products' FLOPs and dz reads are ρ
    times the dense ones; the recompute (the dz kernel's loads and dots) does not change."""
    BM, BV, BH = cfg.BLOCK_M, cfg.BLOCK_V, cfg.BLOCK_H
    HB, Hp = cdiv(H, prod.BLOCK_N), cdiv(H, BH) * BH
    tile_flops = HB * 2 * BM * BV * prod.BLOCK_N
    dz, dh, dw = ({"ld": 0, "st": 0, "dot_flops": 0} for _ in range(3))
    for cols, R, T, n, area, width, height in _kept_tiles(M, V, BM, BV, chunk_cols, keep):
        dz["ld"] += (8 + 4 + 8) * M * T + M * H * e * T + cols * H * e * R + (cols * e * R if bias else 0)
        dz["st"] += area * e + R * T
        dz["dot_flops"] += 2 * R * BM * T * BV * Hp
        dh["ld"] += HB * R * T + HB * area * e + width * H * e + 4 * M * H
        dh["st"] += 4 * M * H
        dh["dot_flops"] += n * tile_flops
        dw["ld"] += HB * R * T + HB * area * e + height * H * e
        dw["st"] += cols * H * e + (4 * cols if bias else 0)
        dw["dot_flops"] += n * tile_flops
    return {"fused_linear_logps_bwd_dz_kernel": dz, "fused_linear_logps_bwd_dh_kernel": dh,
            "fused_linear_logps_bwd_dw_kernel": dw}  # fmt: skip


def aten_linear_flops(M, H, V) -> int:
    """FLOPs of the backward's cuBLAS products: d_weight = dzᵀ · h and d_hidden += dz · W per chunk."""
    return 4 * M * H * V


def _kernel(name, flops, hbm, rate, note=""):
    return {"kernel": name, "flops": flops, "hbm_bytes": hbm, "rate": rate, "note": note}


def fused_linear_kernels(N, H, V, gpu, e=2, group_m=None, chunk_bytes=None, forward="cublas", density=None):
    """The launches of the fused LM head fwd + bwd at N scored rows (bf16, launch configs of the GPU
    path), each with FLOPs, modeled HBM bytes (L2 reuse where the working set of the programs in flight
    fits in L2_SHARE of it) and the rate its products run at. ``forward``: "cublas", the op's forward
    without a softcap (row chunks of fp32 logits from cuBLAS, scored by the logits path's kernel), or
    "fused", the fused Triton kernel (``fused_linear_logps_fwd``), the op's forward with a softcap, whose
    tanh would cost the cuBLAS route three more passes over the fp32 logits (24 bytes per logit).

    ``density``: the gradient filter's kept-tile density ρ (filter_eps > 0): the dz kernel stores ρ of the
    tiles (and a flag each), and the two Triton products that skip dropped tiles replace the cuBLAS ones:
    ρ · 2·N·H·V FLOPs each at the Triton dot rate; their kept dz tiles are re-read once per group of H
    blocks in flight (sms / GROUP_M of them), their W / h rows once per group of GROUP_M row blocks / V
    tiles (the K-step working set of the programs in flight is a few MB, in L2)."""
    from dpo_kernels.triton.linear import (
        DZ_CHUNK_BYTES,
        GROUP_M,
        LAUNCH_CONFIGS,
        PRODUCT_LAUNCH_CONFIGS,
        _vocab_splits,
        dz_chunk_columns,
        forward_chunk_rows,
        forward_splits,
    )  # fmt: skip

    bw, gemm_rate, sms, l2 = GPUS[gpu]
    cfg = LAUNCH_CONFIGS[(torch.bfloat16, True)]
    BM, BV = cfg.BLOCK_M, cfg.BLOCK_V
    R, T = cdiv(N, BM), cdiv(V, BV)
    budget = L2_SHARE * l2
    slab = BM * H * e
    if forward == "cublas":
        rows = min(N, forward_chunk_rows(V, chunk_bytes or DZ_CHUNK_BYTES))
        chunks = cdiv(N, rows)
        out = [_kernel("cuBLAS logits chunk = h·Wᵀ (fp32 out)", 2 * N * H * V, 4 * N * V + N * H * e + chunks * V * H * e,
                       gemm_rate, f"{chunks} chunks of {rows} rows"),
               _kernel("Triton log-prob + stats over the chunk", 0, 4 * N * V + 44 * N, gemm_rate)]  # fmt: skip
    else:
        splits, _ = _vocab_splits(V, BV, forward_splits(V, H, e, cfg, R, sms, l2))
        # splits fastest, so sms / splits row blocks are in flight, each re-reading its h rows per V tile
        rows_in_flight = max(1, min(R, sms // splits))
        h_reads = splits if rows_in_flight * slab + splits * BV * H * e <= budget else T
        fwd_bytes = h_reads * N * H * e + cdiv(R, rows_in_flight) * V * H * e + 12 * N * splits
        out = [_kernel("Triton fwd (logits tiles + online lse)", 2 * N * H * V, fwd_bytes, TRITON_DOT_RATE,
                       f"{splits} splits, {rows_in_flight} row blocks in flight, h read {h_reads}x"),
               _kernel("Triton merge", 0, 16 * N * splits + 12 * N, gemm_rate)]  # fmt: skip
    # backward: dz chunks; GROUP_M row blocks x (sms / GROUP_M) V tiles in flight
    g = group_m or GROUP_M
    vc = dz_chunk_columns(N, V, e, BV, chunk_bytes or DZ_CHUNK_BYTES)
    chunks = cdiv(V, vc)
    v_in_flight = max(1, sms // g)
    fits = g * slab + v_in_flight * BV * H * e <= budget
    w_reads = cdiv(R, g) if fits else R
    dz_bytes = chunks * N * H * e + w_reads * V * H * e + N * V * e + 20 * N * chunks
    if density is not None:
        flags = R * T
        rho = float(density)
        dz_bytes += flags - (1 - rho) * N * V * e
        out.append(_kernel("Triton bwd dz (recompute + softmax grad, filter flags)", 2 * N * H * V, dz_bytes,
                           TRITON_DOT_RATE, f"{chunks} chunks of {vc} columns, W read {w_reads}x, "
                           f"kept-tile density {rho:.3f}"))  # fmt: skip
        HB = cdiv(H, PRODUCT_LAUNCH_CONFIGS[(torch.bfloat16, True)].BLOCK_N)
        dz_reads = cdiv(HB, max(1, sms // g))
        dh = rho * (dz_reads * N * V * e + cdiv(R, g) * V * H * e) + HB * flags + chunks * 8 * N * H
        dw = rho * (dz_reads * N * V * e + cdiv(T, g) * N * H * e) + HB * flags + V * H * e
        out.append(_kernel("Triton d_hidden += dz·W (kept tiles)", rho * 2 * N * H * V, dh, TRITON_DOT_RATE,
                           f"dz re-read {dz_reads}x"))  # fmt: skip
        out.append(_kernel("Triton d_weight = dzᵀ·h (kept tiles)", rho * 2 * N * H * V, dw, TRITON_DOT_RATE))
        out.append(_kernel("d_hidden cast fp32 -> bf16", 0, N * H * (4 + e), gemm_rate))
        return out, bw
    out.append(_kernel("Triton bwd dz (recompute + softmax grad)", 2 * N * H * V, dz_bytes, TRITON_DOT_RATE,
                       f"{chunks} chunks of {vc} columns, W read {w_reads}x"))  # fmt: skip
    out.append(_kernel("cuBLAS d_weight = dzᵀ·h", 2 * N * H * V, N * V * e + chunks * N * H * e + V * H * e,
                       gemm_rate))  # fmt: skip
    out.append(_kernel("cuBLAS d_hidden += dz·W (fp32 out)", 2 * N * H * V,
                       N * V * e + V * H * e + chunks * 8 * N * H, gemm_rate))  # fmt: skip
    out.append(_kernel("d_hidden cast fp32 -> bf16", 0, N * H * (4 + e), gemm_rate))
    return out, bw


def filtered_backward_ms(model: str, gpu: str, density: float, n=N_SEQ, t=SEQ_LEN) -> dict:
    """Modeled ms of the fused LM head at ``model`` scale: forward, backward without the filter (cuBLAS
    products) and with it at kept-tile density ``density`` (Triton products over the kept tiles)."""
    V, H = MODELS[model]
    dense, bw = fused_linear_kernels(n * t, H, V, gpu)
    filtered, _ = fused_linear_kernels(n * t, H, V, gpu, density=density)
    fwd = sum(kernel_ms(k, bw) for k in dense[:2])
    return {"fwd_ms": fwd, "bwd_dense_ms": sum(kernel_ms(k, bw) for k in dense[2:]),
            "bwd_filtered_ms": sum(kernel_ms(k, bw) for k in filtered[2:]), "density": density}  # fmt: skip


def naive_lm_head_kernels(N, H, V, gpu, e=2):
    """cuBLAS logits + the eager reference (42 bytes per logit, ``ASSUMPTIONS``) + two cuBLAS products."""
    bw, gemm_rate, _, _ = GPUS[gpu]
    logits = N * V
    return [
        _kernel("cuBLAS logits = h·Wᵀ", 2 * N * H * V, logits * e + (N + V) * H * e, gemm_rate),
        _kernel("eager log-softmax fwd + bwd", 0, 42 * logits, gemm_rate),
        _kernel("cuBLAS d_hidden = dz·W", 2 * N * H * V, logits * e + (N + V) * H * e, gemm_rate),
        _kernel("cuBLAS d_weight = dzᵀ·h", 2 * N * H * V, logits * e + (N + V) * H * e, gemm_rate),
    ], bw


PAIR_ROWS = 1024  # the one-pass route's scale in the issue: scored rows per DPO pair (32 pairs at 32768 rows)
ONEPASS_BUDGET = 1 << 30  # the one-pass route's default memory_budget on a GPU: bytes of fp32 logits per group


def onepass_group_rows(N: int, V: int, pair_rows: int = PAIR_ROWS, budget_bytes: int = ONEPASS_BUDGET) -> int:
    """Scored rows per group of the one-pass route: as many whole pairs as the fp32 logits (4·V bytes per row)
    of fit in ``budget_bytes`` (at least one pair: a pair beyond the budget does not take this route)."""
    pairs = budget_bytes // (4 * V * pair_rows)
    if pairs < 1:
        raise ValueError(f"a pair's fp32 logits ({4 * V * pair_rows} bytes) exceed the budget ({budget_bytes})")
    return min(N, pairs * pair_rows)


def onepass_linear_kernels(N, H, V, gpu, e=2, pair_rows=PAIR_ROWS, budget_bytes=ONEPASS_BUDGET, softcap=False,
                           tanh_passes=3):  # fmt: skip
    """The launches of the one-pass fused LM head (fwd + bwd, 6·N·H·V FLOPs) at N scored rows in pairs of
    ``pair_rows``, counted per group of whole pairs whose fp32 logits fit ``budget_bytes`` and summed. Per
    group of M rows: a cuBLAS GEMM writes the fp32 logits (4 bytes per logit, h and W read); with a softcap,
    its tanh in place as ``fused_linear_logps_fwd_cublas`` applies it (``tanh_passes`` elementwise passes,
    each reading and writing 4 bytes per logit: div_, tanh_, mul_); the logits path's kernel reads them
    once (``cublas_forward_counts``, with statistics); the loss's per-row gradient (M floats, not counted);
    an elementwise Triton kernel reads the (capped) logits and writes dz in place in the inputs' dtype (its
    softcap factor 1 − t² from the capped logit, in registers), with the row's g, the two-part lse and the
    label; cuBLAS d_weight += dzᵀ·h (beta = 1: the (V, H) d_weight read and written in weight's dtype every
    group; the first group's read stands for the zero fill) and d_hidden = dz·W (the group's own rows: one
    product over the whole vocabulary, written once in the inputs' dtype). cuBLAS at the GPU's GEMM rate,
    as in ``fused_linear_kernels``. Groups of equal size are identical, so each kind of launch is one entry
    with their summed counts (a ragged last group gets its own), which keeps the sum of per-group times."""
    bw, gemm_rate, _, _ = GPUS[gpu]
    rows = onepass_group_rows(N, V, pair_rows, budget_bytes)
    full, rest = divmod(N, rows)
    sizes = [(full, rows)] + ([(1, rest)] if rest else [])
    out = []
    for n, M in sizes:
        logits = M * V
        tag = f"{n} groups of {M} rows" if n > 1 else f"1 group of {M} rows"
        fwd_io = sum(c["ld"] + c["st"] for c in cublas_forward_counts(M, V, with_stats=True).values())
        out.append(_kernel("cuBLAS logits = h·Wᵀ (fp32 out, kept)", n * 2 * M * H * V,
                           n * (4 * logits + M * H * e + V * H * e), gemm_rate, tag))  # fmt: skip
        if softcap:
            out.append(_kernel("softcap tanh in place (elementwise)", 0, n * tanh_passes * 8 * logits, gemm_rate,
                               f"{tanh_passes} passes, 8 bytes per logit each"))  # fmt: skip
        out.append(_kernel("Triton log-prob + stats over the kept logits", 0, n * fwd_io, gemm_rate))
        out.append(_kernel("Triton dz in place (fp32 logits -> dz)", 0, n * (logits * (4 + e) + 20 * M), gemm_rate))
        out.append(_kernel("cuBLAS d_weight += dzᵀ·h (beta 1)", n * 2 * M * H * V,
                           n * (logits * e + M * H * e + 2 * V * H * e), gemm_rate, "d_weight read + written per group"))  # fmt: skip
        out.append(_kernel("cuBLAS d_hidden = dz·W", n * 2 * M * H * V, n * (logits * e + V * H * e + M * H * e),
                           gemm_rate))  # fmt: skip
    return out, bw


def previous_fused_linear_kernels(N, H, V, gpu, e=2, BM=64, BV=128):
    """The fused head before issue 14, by its count: 10·N·H·V on Triton, fp32 scratch slabs re-read and
    re-written per tile (8·N·H·V / BLOCK_V for d_hidden, 8·N·H·V / BLOCK_M for d_weight), above L2."""
    bw, _, _, _ = GPUS[gpu]
    return [
        _kernel("Triton fwd", 2 * N * H * V, N * H * e + cdiv(N, BM) * V * H * e, TRITON_DOT_RATE),
        _kernel("Triton bwd d_hidden (slab per V tile)", 4 * N * H * V, 8 * N * H * V // BV, TRITON_DOT_RATE),
        _kernel("Triton bwd d_weight (slot per row block)", 4 * N * H * V, 8 * N * H * V // BM, TRITON_DOT_RATE),
    ], bw


def logits_kernels(N, V, gpu, e=2):
    """The logits path: the naive eager reference (42 bytes per logit) against the fused Triton log-prob
    kernels (read the logits in the forward, read them and write the gradient in the backward)."""
    bw = GPUS[gpu][0]
    return {
        "naive: reference.sequence_logps": [_kernel("eager log-softmax fwd + bwd", 0, 42 * N * V, 1.0)],
        "fused: sequence_logps (Triton)": [
            _kernel("Triton fwd", 0, N * V * e, 1.0),
            _kernel("Triton bwd", 0, 2 * N * V * e, 1.0),
        ],
    }, bw


def kernel_ms(k, bw) -> float:
    """max(bytes / bandwidth, FLOPs / rate): each launch is bound by the slower of the two."""
    return 1e3 * max(k["hbm_bytes"] / bw, k["flops"] / k["rate"] if k["flops"] else 0.0)


def modeled_times(models=None, n=N_SEQ, t=SEQ_LEN) -> list[dict]:
    """``modeled_time`` rows (model, workload, path, gpu, ms, floor_ms, kernels) at N = n·t scored rows.
    Floors: lm_head 8·N·H·V at the GPU's GEMM rate (forward, one recompute, two products), the one-pass
    route's own 6·N·H·V (no recompute; pairs of ``PAIR_ROWS`` rows, groups within ``ONEPASS_BUDGET``), logits
    the bytes of reading the logits twice and writing their gradient once."""
    rows = []
    N = n * t
    for model in models or MODELS:
        V, H = MODELS[model]
        for gpu, (bw, rate, _, _) in GPUS.items():
            lm_floor = 1e3 * 8 * N * H * V / rate
            route, other = ("fused", "cublas") if model in SOFTCAP_MODELS else ("cublas", "fused")
            paths = [
                ("lm_head", "naive: matmul + reference", *naive_lm_head_kernels(N, H, V, gpu), lm_floor),
                ("lm_head", "fused-linear (Triton + cuBLAS)", *fused_linear_kernels(N, H, V, gpu, forward=route),
                 lm_floor),
                ("lm_head", "fused-linear one-pass", *onepass_linear_kernels(N, H, V, gpu, softcap=model in SOFTCAP_MODELS),
                 1e3 * 6 * N * H * V / rate),
                ("lm_head", f"fused-linear, the {other} forward instead (the route weighed)",
                 *fused_linear_kernels(N, H, V, gpu, forward=other), lm_floor),
                ("lm_head", "fused-linear, previous design (by count)", *previous_fused_linear_kernels(N, H, V, gpu),
                 lm_floor),
            ]  # fmt: skip
            per_logits, _ = logits_kernels(N, V, gpu)
            paths += [("logits", name, ks, bw, 1e3 * 6 * N * V / bw) for name, ks in per_logits.items()]
            for workload, path, kernels, kbw, floor in paths:
                times = [dict(k, ms=kernel_ms(k, kbw)) for k in kernels]
                rows.append({"model": model, "workload": workload, "path": path, "gpu": gpu,
                             "ms": sum(k["ms"] for k in times), "floor_ms": floor, "kernels": times})  # fmt: skip
    return rows


PEERS = [  # their own published numbers, not ours and not modeled
    (
        "Liger-Kernel CuTe fused linear cross-entropy: 18.3 ms fwd+bwd at 4096 x 4096 x 128256 on an H200 "
        "(about 147 ms per 32768 rows), as published by Liger-Kernel"
    ),
    (
        "Liger-Kernel's published figure, not ours: 50.4 ms forward+backward at 8192 × 4096 × 131072 (rows × H × V), "
        "bf16, on an H100 (its README; about 202 ms per 32768 rows if linear in the rows)"
    ),
    (
        "Cut Cross-Entropy: 145 ms for Gemma-2-2B (8192 tokens, V 256000, H 2304) on an A100 with its gradient "
        "filter, 357 ms without, as published by its authors"
    ),
]


def time_markdown(rows) -> str:
    out = [f"### Modeled time per launch: max(bytes / bandwidth, FLOPs / rate) ({N_SEQ}×{SEQ_LEN} scored rows, bf16)",
           "", "| model | workload | path | GPU | modeled ms | floor ms | vs floor |", "|---|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['model']} | {r['workload']} | {r['path']} | {r['gpu']} | {r['ms']:.1f} | {r['floor_ms']:.1f} "
                   f"| {r['ms'] / r['floor_ms']:.2f}× |")  # fmt: skip
    heads = ("fused-linear (Triton + cuBLAS)", "fused-linear one-pass")
    llama = [r for p in heads for r in rows if r["model"] == "Llama-3-8B" and r["path"] == p]
    for r in llama:
        out += ["", f"{r['path']} at Llama-3-8B, {r['gpu']}, per launch:", "",
                "| launch | GFLOP | HBM GB | ms | note |", "|---|---:|---:|---:|---|"]  # fmt: skip
        out += [f"| {k['kernel']} | {k['flops'] / 1e9:.0f} | {k['hbm_bytes'] / 1e9:.2f} | {k['ms']:.1f} | {k['note']} |"
                for k in r["kernels"]]  # fmt: skip
    out += ["", (f"Rates: cuBLAS at the GPU's GEMM ceiling, Triton tl.dot loops at {TRITON_DOT_RATE / 1e12:.0f} TFLOP/s "
            "(0.7 of the datasheet dense bf16 rate; an assumption until measured). An operand re-read by the programs "
            f"in flight counts once when their working set fits in {L2_SHARE:.0%} of L2, else at every re-read."), "",
            (f"One-pass: pairs of {PAIR_ROWS} scored rows, grouped by whole pairs whose fp32 logits fit "
             f"{ONEPASS_BUDGET / GiB:g} GiB; per group one logits GEMM kept in fp32, the log-prob pass, dz written in "
             "place, d_weight += dzᵀ·h (d_weight read and written every group) and d_hidden = dz·W; its floor is its "
             "own 6·N·H·V, the other lm_head rows' 8·N·H·V. A softcap costs it the forward's tanh passes over the fp32 "
             "logits (three, 24 bytes per logit, as the cuBLAS forward applies it)."), "",
            "Peers, by their own published numbers (not modeled here):"] + [f"- {p}" for p in PEERS]  # fmt: skip
    return "\n".join(out)


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
    out += ["", ("Logits workload: inputs = the logits (plus their gradient unless in-place); lm_head workload: inputs = "
            "hidden + weight and their gradients."), ""]  # fmt: skip
    out += [(f"### Modeled bytes moved per token and H100 SXM bound (analytic, {H100_BW / 1e12:.2f} TB/s, "
            f"{H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 dense; {N_SEQ}×{SEQ_LEN} tokens)"), ""]  # fmt: skip
    out += [("| model | kernel (fwd+bwd) | logits-sized MB/token | GEMM streaming MB/token (no L2 reuse) | modeled BW bound ms "
            "| of which logits-sized ms | modeled FLOP bound ms |"), "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in bw_rows:
        flop = f"{r['flop_bound_ms']:.1f}" if r["flop_bound_ms"] else "-"
        out.append(
            f"| {r['model']} | {r['kernel']} | {r['logits_io'] / 1e6:.2f} | {r['gemm_stream'] / 1e6:.2f} "
            f"| {r['bw_bound_ms']:.1f} | {r['bw_bound_logits_only_ms']:.1f} | {flop} |"
        )
    out += ["", "Assumptions (modeled):"] + [f"- {a}" for a in ASSUMPTIONS]
    return "\n".join(out)


def run(models=None) -> dict:
    mem, bw, times = modeled_memory(models), bandwidth_table(models), modeled_times(models)
    text = markdown(mem, bw) + "\n\n" + time_markdown(times)
    rows = [{k: r[k] for k in ("model", "workload", "path", "gpu", "ms", "floor_ms")} for r in times]
    return {
        "memory": mem,
        "bandwidth": bw,
        "modeled_time": rows,
        "modeled_time_kernels": times,
        "assumptions": ASSUMPTIONS,
        "markdown": text,
    }
