"""Triton kernels: a fused LM head scored by per-token log-probs, without a logits tensor.

For compacted rows (every row is scored) the forward computes, per row m,

    z = (h_m · W_vᵀ + b_v) · logit_scale;  z = softcap · tanh(z / softcap) if softcap;  z = z / temperature
    logp_m = (z[label_m] − c_m) − log Σ_v exp(z_v − c_m),  c_m = max_v z_v,

the transform of ``reference.lm_head_logits``, on one of two routes. ``fused_linear_logps_fwd``: each
program forms a (BLOCK_M, BLOCK_V) logits tile in registers with ``tl.dot`` (fp32 accumulator) over
BLOCK_H slices of the hidden size, folds it into an online log-sum-exp and picks the label logit in the
same loop; no logits tile is ever written to global memory. ``fused_linear_logps_fwd_cublas`` (the op's
forward unless the head is softcapped: ``dpo_kernels.fused_linear._forward``): the fp32 logits of a chunk
of rows from one cuBLAS GEMM, scored by the logits path's kernel. The backward recomputes each logits tile once, per vocabulary chunk: a kernel writes the
chunk's dz = g · (onehot − softmax) (chained through the transform) in the inputs' dtype, and two
cuBLAS GEMMs consume it (d_weight rows of the chunk written once, d_hidden accumulated in fp32):
8 · M · H · V FLOPs for forward + backward, no float atomics, deterministic.

The one-pass route (``fused_linear_logits_fwd``, ``fused_linear_logits_bwd_``) forms a group's logits once,
into an (M, V) fp32 buffer the caller keeps while it turns the log-probs into the loss's per-row gradient;
``fused_linear_logits_dz_kernel`` then overwrites the buffer in place with dz (bf16/fp16: in the first half of
each fp32 row) and two cuBLAS GEMMs consume it: 6 · M · H · V FLOPs for forward + backward, for 4 bytes of
buffer per logit of the group.

Vocabulary window: W_v, b_v are the rows v in [vocab_start, vocab_start + V) of a head (the whole head by
default) and the labels are global ids; a label outside the window is not owned and scores z[label] = 0
(logp = −(c + log s), never NaN or an out-of-bounds read). The log-sum-exp stays in the two parts (c, log s)
of ``dpo_kernels.ops``: slices merge from them exactly, and the backward, handed the whole vocabulary's two
parts, forms exp((z − c) − log s), the slice's columns of the whole head's gradient.

With a gradient filter (``filter_eps`` > 0, Cut Cross-Entropy's idea) the dz kernel also stores one keep
flag per (BLOCK_M, BLOCK_V) tile, false where every softmax entry is below filter_eps and no label lies in
it, and two Triton kernels replace the cuBLAS products: d_hidden (a program per row block and H block,
looping over the chunk's V tiles) and d_weight (a program per V tile and H block, looping over the row
blocks), each skipping the unkept tiles and owning its output tile outright, so the products cost ρ ·
4 · M · H · V FLOPs at a kept-tile density ρ, still without atomics and deterministic.

fp32 inputs multiply in IEEE fp32 (FMA, no TF32: the exact path); bf16/fp16 inputs go to tensor cores
with fp32 accumulation, and the backward rounds dz to the input dtype before the second product, as a
bf16 autograd graph would. The bases of row blocks, V tiles, the forward's per-split partials and the
rows of dz are int64 (M·H and V·H pass 2^31 at real sizes, M·VC with a large memory budget); offsets
inside a tile (r · stride_hm, c · stride_wv) are int32.

The interpreter (TRITON_INTERPRET=1) runs these same kernels; it multiplies bf16 ``tl.dot`` operands as
their raw uint16 bit patterns (triton-lang/triton#11584), so under it the launchers set UPCAST_DOT and
the operands are widened to fp32 first. bf16 × bf16 products are exact in fp32, so only the
summation order differs from the tensor-core path. Its fp32 -> bf16 cast truncates where the GPU's
rounds to nearest; the filtered d_weight kernel, whose output is such a cast, rounds by hand there
(RNE_BF16); the dz tiles, stored the same way in both paths, keep the interpreter's cast.
"""

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with an fp32 accumulator; IEEE (not TF32) for fp32 operands."""
    if UPCAST_DOT:  # interpreter only: it cannot multiply bf16
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even, from the bits: the interpreter's cast truncates (the GPU's
    rounds), which would double a bf16 output's rounding error in the CPU tests; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def _tanh(x):
    """tanh from one exp, exact at ±inf: sign(x) · (1 − e) / (1 + e), e = exp(−2|x|).

    The absolute error stays at a few fp32 ulps of 1 near 0 (so a softcapped logit is off by about
    softcap · 1e-7); libdevice's tanh is not available to the interpreter.
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    h_base,  # pointer to hidden[row0, 0]; hidden is (M, H) fp32 | bf16 | fp16, strides (stride_hm, 1)
    w_base,  # pointer to weight[col0, 0]; weight is (V, H) dtype of hidden, strides (stride_wv, 1)
    b_base,  # pointer to bias[col0]; bias is (V,) fp32 | bf16 | fp16, contiguous; not read without HAS_BIAS
    h_offs,  # (BLOCK_M, BLOCK_H) int32: r * stride_hm + ks, the tile's rows and its first H slice
    w_offs,  # (BLOCK_V, BLOCK_H) int32: c * stride_wv + ks
    row_mask,  # (BLOCK_M,) rows < M
    col_mask,  # (BLOCK_V,) columns < V
    H,
    logit_scale,
    softcap,
    temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """(z, t): the (BLOCK_M, BLOCK_V) logits tile z (−inf in masked columns) and tanh(x / softcap)
    (x itself without HAS_SOFTCAP), for the backward's 1 − t², where x = (h · Wᵀ + b) · logit_scale
    and z = (softcap · tanh(x / softcap) if HAS_SOFTCAP else x) / temperature."""
    ks = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        k_mask = ks < H - k
        h = tl.load(h_base + k + h_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + k + w_offs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(b_base + tl.arange(0, BLOCK_V), mask=col_mask, other=0.0).to(tl.float32)[None, :]
    x = acc * logit_scale
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    else:
        t = x
    z = tl.where(col_mask[None, :], x / temperature, float("-inf"))
    return z, t


@triton.jit
def _pivot(m):
    """The running max as the reference point of exp(z − m): 0 where it is -inf (nothing but -inf logits
    so far), so that exp(-inf − pivot) = 0 instead of exp(-inf + inf) = NaN; +inf and NaN stay (NaN out)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _label_column(labels, col0, width, BLOCK_V: tl.constexpr):
    """(BLOCK_M,) int32: each row's label as a column of the tile starting at col0, or -1; only the tile's
    first ``width`` columns count (the rest lie past the slice or chunk, where a label is not owned)."""
    local = labels - col0
    return tl.where((local >= 0) & (local < BLOCK_V) & (local < width), local, -1).to(tl.int32)


@triton.jit
def _dlogits_tile(
    z,  # (BLOCK_M, BLOCK_V) fp32 logits tile from _logits_tile
    t,  # (BLOCK_M, BLOCK_V) fp32 tanh(x / softcap) from _logits_tile
    label_col,  # (BLOCK_M,) int32 from _label_column
    row_mask,  # (BLOCK_M,) rows < M
    g,  # (BLOCK_M,) fp32, d loss / d logp (0 in masked rows)
    lse_m,  # (BLOCK_M,) fp32, the lse's part 0 (a row max); +inf in a row that must get a zero softmax
    log_s,  # (BLOCK_M,) fp32, the lse's part 1: log Σ exp(z − lse_m)
    logit_scale,
    temperature,
    filter_eps,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(dacc, keep): d loss / d(h · Wᵀ) of the tile and whether it contributes.

    dz = g · (onehot(label) − exp((z − lse_m) − log_s)), then back through / temperature, softcap · tanh
    (× (1 − t²)) and · logit_scale. The two parts are subtracted one at a time: z − lse_m is exact near the
    row max, where one rounded fp32 lse would cost exp(z − lse) · |lse| · 2^-24 of relative error. ``keep``
    is false when every softmax entry of the tile is below filter_eps and no label falls in it (never with
    filter_eps = 0; a NaN keeps the tile).
    """
    p = tl.where(row_mask[:, None], tl.exp((z - lse_m[:, None]) - log_s[:, None]), 0.0)  # 0 in masked columns
    is_label = tl.arange(0, BLOCK_V)[None, :] == label_col[:, None]
    dz = g[:, None] * (tl.where(is_label, 1.0, 0.0) - p)
    if HAS_SOFTCAP:
        dacc = dz * (1.0 - t * t) * (logit_scale / temperature)
    else:
        dacc = dz * (logit_scale / temperature)
    p_max = tl.max(tl.max(p, axis=1), axis=0)
    has_label = tl.max(label_col, axis=0) >= 0
    keep = (p_max >= filter_eps) | (p_max != p_max) | has_label
    return dacc, keep


@triton.jit
def fused_linear_logps_fwd_kernel(
    hidden_ptr,  # (M, H) fp32 | bf16 | fp16, strides (stride_hm, 1)
    weight_ptr,  # (V, H) dtype of hidden, strides (stride_wv, 1)
    bias_ptr,  # (V,) fp32 | bf16 | fp16, contiguous; not read without HAS_BIAS
    labels_ptr,  # (M,) int64, stride stride_y: global ids, owned where in [vocab_start, vocab_start + V)
    m_part_ptr,  # (SPLITS, M) fp32, contiguous: max_v z over the split's vocabulary range
    s_part_ptr,  # (SPLITS, M) fp32, contiguous: sum_v exp(z - m_part) over the range
    zl_part_ptr,  # (SPLITS, M) fp32, contiguous: z[label] if the label is in the split's range, else 0
    s1_part_ptr,  # (SPLITS, M) fp32, contiguous: sum_v exp(z - m_part) · (z - m_part); WITH_STATS only
    s2_part_ptr,  # (SPLITS, M) fp32, contiguous: sum_v exp(2 (z - m_part)); WITH_STATS only
    sz_part_ptr,  # (SPLITS, M) fp32, contiguous: sum_v z; WITH_STATS only
    am_part_ptr,  # (SPLITS, M) int32, contiguous: the first v of the range with z_v = m_part; WITH_STATS only
    M,
    V,
    H,
    stride_hm,
    stride_wv,
    stride_y,
    v_per_split,  # a multiple of BLOCK_V
    vocab_start,  # weight's first row as a global vocabulary id
    logit_scale,
    softcap,
    temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    WITH_STATS: tl.constexpr = False,
):
    """Per (row block, vocabulary split): m = max_v z, s = sum_v exp(z − m), online over V tiles
    (s ← s · exp(m_old − m_new) + sum exp(z − m_new)), and z[label], with z from _logits_tile.

    WITH_STATS also folds, per tile with α = exp(m_old − m_new): s1 ← α · (s1 + (m_old − m_new) · s)
    + sum e · (z − m_new) (the shift of s1's reference point from m_old to m_new), s2 ← α² · s2 + sum e²
    with e = exp(z − m_new), sum z, and the first argmax: the tile's first column holding its max,
    taken only when that max is strictly above every earlier tile's (the earliest maximum wins).
    Masked columns (≥ V) count in none of them. Without it the kernel is the plain one.

    Per program: 2 · BLOCK_M · BLOCK_V · H FLOPs per V tile (padded to whole tiles); the row block's h
    (BLOCK_M · H elements) read once per V tile, each W tile (BLOCK_V · H) once, and 3 fp32 per row stored
    (7 with stats). Per launch, with b bytes per hidden element: M · H · b · cdiv(V, BLOCK_V) + V · H · b
    · cdiv(M, BLOCK_M) bytes read without a cache (the L2 serves most h re-reads: ``forward_splits``),
    12 · M · SPLITS stored (``benchmarks.modeled.triton_linear_counts``)."""
    # splits fastest: the programs in flight share few row blocks, whose h rows (re-read for every V
    # tile) then stay in L2; every split's W tiles are shared by those row blocks
    n_splits = tl.cdiv(V, v_per_split)
    split = tl.program_id(0) % n_splits
    row0 = (tl.program_id(0) // n_splits) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    row_mask = r < M - row0
    rows = (row0 + r).to(tl.int64)
    # the labels as columns of the slice (int64: a global id minus the window's start); an unowned one
    # matches no column (``_label_column`` bounds it by V), so its z[label] stays 0
    labels = tl.load(labels_ptr + rows * stride_y, mask=row_mask, other=-1).to(tl.int64) - vocab_start
    h_base = hidden_ptr + tl.cast(row0, tl.int64) * stride_hm
    h_offs = r[:, None] * stride_hm + ks[None, :]
    w_offs = c[:, None] * stride_wv + ks[None, :]
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    z_label = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WITH_STATS:
        s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        sum_z = tl.zeros([BLOCK_M], dtype=tl.float32)
        arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for col0 in range(v_begin, v_end, BLOCK_V):
        col_mask = c < V - col0
        z, _ = _logits_tile(
            h_base, weight_ptr + tl.cast(col0, tl.int64) * stride_wv, bias_ptr + col0, h_offs, w_offs,
            row_mask, col_mask, H, logit_scale, softcap, temperature,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_H, UPCAST_DOT,
        )  # fmt: skip
        if WITH_STATS:  # the tile's max and the first column holding it
            tile_max, first = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        else:
            tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)  # -inf while every logit so far is -inf (a -inf bias entry)
        pivot = _pivot(m_new)
        if WITH_STATS:
            alpha = tl.exp(m - pivot)
            e = tl.exp(z - pivot[:, None])  # 0 in masked columns (z = -inf)
            z0 = tl.where(col_mask[None, :], z, 0.0)  # finite there, so e · (z0 − m_new) = 0, not 0 · -inf
            moved = tl.maximum(m - pivot, -3.0e38) * s  # (m_old − m_new) · s; 0, not -inf · 0, at first
            s1 = (s1 + moved) * alpha + tl.sum(e * (z0 - pivot[:, None]), axis=1)
            s2 = s2 * (alpha * alpha) + tl.sum(e * e, axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            sum_z += tl.sum(z0, axis=1)
            arg = tl.where(tile_max > m, col0 + first, arg)
        else:
            s = s * tl.exp(m - pivot) + tl.sum(tl.exp(z - pivot[:, None]), axis=1)
        m = m_new
        is_label = c[None, :] == _label_column(labels, col0, V - col0, BLOCK_V)[:, None]
        z_label += tl.sum(tl.where(is_label, z, 0.0), axis=1)
    out = tl.cast(split, tl.int64) * M + rows
    tl.store(m_part_ptr + out, m, mask=row_mask)
    tl.store(s_part_ptr + out, s, mask=row_mask)
    tl.store(zl_part_ptr + out, z_label, mask=row_mask)
    if WITH_STATS:
        tl.store(s1_part_ptr + out, s1, mask=row_mask)
        tl.store(s2_part_ptr + out, s2, mask=row_mask)
        tl.store(sz_part_ptr + out, sum_z, mask=row_mask)
        tl.store(am_part_ptr + out, arg, mask=row_mask)


@triton.jit
def fused_linear_logps_merge_kernel(
    m_part_ptr,  # (SPLITS, M) fp32, contiguous, from the forward kernel
    s_part_ptr,  # (SPLITS, M) fp32, contiguous
    zl_part_ptr,  # (SPLITS, M) fp32, contiguous
    s1_part_ptr,  # (SPLITS, M) fp32, contiguous; WITH_STATS only
    s2_part_ptr,  # (SPLITS, M) fp32, contiguous; WITH_STATS only
    sz_part_ptr,  # (SPLITS, M) fp32, contiguous; WITH_STATS only
    am_part_ptr,  # (SPLITS, M) int32, contiguous; WITH_STATS only
    labels_ptr,  # (M,) int64, stride stride_y: global ids
    logp_ptr,  # (M,) fp32, contiguous: (z[label] − m) − log s, z[label] = 0 where the slice does not own it
    lse_ptr,  # (M, 2) fp32, contiguous: (m, log s), the log-sum-exp in two parts, saved for the backward
    stats_ptr,  # (M, 4) fp32, contiguous: sum z, entropy, top1, lse2 (reference.STATS); WITH_STATS only
    M,
    stride_y,
    splits,
    vocab_start,  # weight's first row as a global vocabulary id
    BLOCK: tl.constexpr,
    WITH_STATS: tl.constexpr = False,
):
    """lse = (m, log s), m = max_s m_s, s = sum_s s_s · exp(m_s − m); logp = (sum_s zl_s − m) − log s.

    The two parts are stored, not their rounded sum (see ``_dlogits_tile``); slices of a vocabulary merge
    from them exactly. The splits are merged in a fixed order, so the result does not depend on scheduling.
    A label outside [vocab_start, vocab_start + V) is not owned: its zl_s are 0, so logp = −(m + log s),
    finite, and top1 = 0. Reads 16 · M · SPLITS bytes (m twice, s, z[label]; 16 more per split and the
    labels with stats), writes 12 · M (+ 16 · M with stats); no FLOPs to speak of.

    WITH_STATS, with α_s = exp(m_s − m): s1 = sum_s α_s · (s1_s + (m_s − m) · s_s), s2 = sum_s α_s² · s2_s,
    sum z = sum_s sz_s, argmax = the split's argmax with the larger max (the smaller index on equal
    maxima); entropy = log s − s1 / s, lse2 = 2m + log s2, top1 = (argmax == label − vocab_start).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < M
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for split in range(0, splits):
        m = tl.maximum(m, tl.load(m_part_ptr + tl.cast(split, tl.int64) * M + rows, mask=mask, other=0.0))
    s = tl.zeros([BLOCK], dtype=tl.float32)
    z_label = tl.zeros([BLOCK], dtype=tl.float32)
    if WITH_STATS:
        s1 = tl.zeros([BLOCK], dtype=tl.float32)
        s2 = tl.zeros([BLOCK], dtype=tl.float32)
        sum_z = tl.zeros([BLOCK], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        arg = tl.zeros([BLOCK], dtype=tl.int32)
    pivot = _pivot(m)
    for split in range(0, splits):
        part = tl.cast(split, tl.int64) * M + rows
        m_split = tl.load(m_part_ptr + part, mask=mask, other=0.0)
        s_split = tl.load(s_part_ptr + part, mask=mask, other=1.0)
        alpha = tl.exp(m_split - pivot)  # 0 for a split whose logits are all -inf (its s is 0)
        s += s_split * alpha
        z_label += tl.load(zl_part_ptr + part, mask=mask, other=0.0)
        if WITH_STATS:
            s1_split = tl.load(s1_part_ptr + part, mask=mask, other=0.0)
            s1 += (s1_split + tl.maximum(m_split - pivot, -3.0e38) * s_split) * alpha
            s2 += tl.load(s2_part_ptr + part, mask=mask, other=1.0) * (alpha * alpha)
            sum_z += tl.load(sz_part_ptr + part, mask=mask, other=0.0)
            arg_split = tl.load(am_part_ptr + part, mask=mask, other=0)
            wins = (m_split > best) | ((m_split == best) & (arg_split < arg))
            arg = tl.where(wins, arg_split, arg)
            best = tl.where(wins, m_split, best)
    log_s = tl.log(s)
    tl.store(logp_ptr + rows, (z_label - m) - log_s, mask=mask)
    tl.store(lse_ptr + rows * 2, m, mask=mask)
    tl.store(lse_ptr + rows * 2 + 1, log_s, mask=mask)
    if WITH_STATS:
        # arg is a column of the slice, in [0, V): it never equals an unowned label's column
        label = tl.load(labels_ptr + rows * stride_y, mask=mask, other=0).to(tl.int64) - vocab_start
        stats = stats_ptr + rows * 4
        tl.store(stats, sum_z, mask=mask)
        tl.store(stats + 1, log_s - s1 / s, mask=mask)
        tl.store(stats + 2, tl.where(arg == label, 1.0, 0.0), mask=mask)
        tl.store(stats + 3, 2.0 * m + tl.log(s2), mask=mask)


@triton.jit
def _grouped(pid, row_tiles, col_tiles, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in groups of GROUP_M row tiles (the matmul tutorial's
    L2 swizzle): consecutive programs walk a group's row tiles first, then its column tiles."""
    group = pid // (GROUP_M * col_tiles)
    first = group * GROUP_M
    group_rows = tl.minimum(row_tiles - first, GROUP_M)
    in_group = pid % (GROUP_M * col_tiles)
    return first + in_group % group_rows, in_group // group_rows


@triton.jit
def fused_linear_logps_bwd_dz_kernel(
    dz_ptr,  # (M, VC) dtype of hidden, strides (stride_dz, 1): d loss / d(h · Wᵀ) of the chunk's logits
    grad_ptr,  # (M,) fp32, stride stride_g (0 for an expand): d loss / d logp
    hidden_ptr,  # (M, H) fp32 | bf16 | fp16, strides (stride_hm, 1)
    weight_ptr,  # (VC, H) the chunk's rows of weight (dtype of hidden), strides (stride_wv, 1)
    bias_ptr,  # (VC,) the chunk's bias entries, contiguous; not read without HAS_BIAS
    labels_ptr,  # (M,) int64, stride stride_y: global vocabulary ids (owned or not)
    lse_ptr,  # (M, 2) fp32, contiguous: the two-part (m, log s) of the forward, or the whole vocabulary's
    keep_ptr,  # (cdiv(M, BLOCK_M), cdiv(VC, BLOCK_V)) int8, contiguous: 1 where the tile is kept; FILTER only
    M,
    VC,
    H,
    stride_dz,
    stride_hm,
    stride_wv,
    stride_y,
    stride_g,
    stride_keep,  # keep_ptr's row stride, cdiv(VC, BLOCK_V); FILTER only (0 without: one JIT specialization)
    chunk_start,  # the chunk's first column as a global id: vocab_start + its offset in the slice
    logit_scale,
    softcap,
    temperature,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    FILTER: tl.constexpr = False,
):
    """dz[rows, cols] = dacc of _dlogits_tile, rounded to the inputs' dtype: one (BLOCK_M, BLOCK_V) tile
    per program, its logits recomputed from h and W (2 · BLOCK_M · BLOCK_V · H FLOPs, the tile's h rows
    and W rows read once, its labels, g and both lse parts (20 bytes per row), the tile stored once: 2
    bytes per bf16 logit). Per chunk of VC columns, with b bytes per hidden element: (20 + H · b) · M · cdiv(VC,
    BLOCK_V) + VC · H · b · cdiv(M, BLOCK_M) bytes read without a cache, M · VC · b stored
    (``benchmarks.modeled.triton_linear_counts``).

    The two gradient products that consume dz run on cuBLAS (``fused_linear_logps_bwd``). Programs are
    ordered in groups of GROUP_M row blocks (the matmul tutorial's swizzle): the programs in flight
    cover GROUP_M row blocks × (programs / GROUP_M) V tiles, whose h and W rows stay in L2 while they
    are re-read, so each W chunk comes from HBM once per group of row blocks, not once per row block.
    Without FILTER a tile dropped by filter_eps is stored as zeros (the dense cuBLAS products read every
    tile). With FILTER the kernel stores the tile's keep flag (1 byte) and writes dz only in kept tiles:
    the filtered products (``fused_linear_logps_bwd_dh_kernel``, ``..._dw_kernel``) read the flag and
    never touch a dropped tile, so the stores fall to ρ · M · VC · b for a kept-tile density ρ.
    """
    v_tiles = tl.cdiv(VC, BLOCK_V)
    row_tile, col_tile = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), v_tiles, GROUP_M)
    row0 = row_tile * BLOCK_M
    col0 = col_tile * BLOCK_V
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    row_mask = r < M - row0
    col_mask = c < VC - col0
    rows = (row0 + r).to(tl.int64)
    h_base = hidden_ptr + tl.cast(row0, tl.int64) * stride_hm
    w_base = weight_ptr + tl.cast(col0, tl.int64) * stride_wv
    z, t = _logits_tile(
        h_base, w_base, bias_ptr + col0, r[:, None] * stride_hm + ks[None, :], c[:, None] * stride_wv + ks[None, :],
        row_mask, col_mask, H, logit_scale, softcap, temperature,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_H, UPCAST_DOT,
    )  # fmt: skip
    # the row vectors only after the H loop: loaded before it, they (and their masks) stay live across the
    # pipelined loop, and the bf16/fp16 sm_80 builds with bias and softcap spilled (an 8-byte stack frame)
    # columns of the chunk (int64: a global id minus the chunk's global start); a label past the chunk's VC
    # columns (another chunk's, another slice's) or before them gets no one-hot here
    labels = tl.load(labels_ptr + rows * stride_y, mask=row_mask, other=-1).to(tl.int64) - chunk_start
    g = tl.load(grad_ptr + rows * stride_g, mask=row_mask, other=0.0)
    lse_m = tl.load(lse_ptr + rows * 2, mask=row_mask, other=0.0)
    log_s = tl.load(lse_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    dacc, keep = _dlogits_tile(
        z, t, _label_column(labels, col0, VC - col0, BLOCK_V), row_mask, g, lse_m, log_s,
        logit_scale, temperature, filter_eps, HAS_SOFTCAP, BLOCK_V,
    )  # fmt: skip
    out = dz_ptr + rows[:, None] * stride_dz + (col0 + c)[None, :]
    if FILTER:
        # the row stride is an argument rather than v_tiles: v_tiles, row_tile and an offset kept live across the
        # H loop for this store spilled fp32 sm_90 FILTER builds under Triton 3.6's ptxas (a 16-byte stack frame
        # at 80 registers); read from the constant bank, the stride holds no register
        tl.store(keep_ptr + tl.cast(row_tile, tl.int64) * stride_keep + col_tile, keep.to(tl.int8))
        in_tile = row_mask[:, None] & col_mask[None, :]
        tl.store(out, dacc.to(dz_ptr.dtype.element_ty), mask=tl.where(keep, in_tile, False))
    else:
        dacc = tl.where(keep, dacc, 0.0)
        tl.store(out, dacc.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def fused_linear_logps_bwd_dh_kernel(
    dh_ptr,  # (M, H) fp32, contiguous: the d_hidden accumulator; += this chunk's dz · W[chunk]
    dz_ptr,  # (M, VC) dtype of hidden, strides (stride_dz, 1): the chunk's dz, valid in kept tiles only
    weight_ptr,  # (VC, H) the chunk's rows of weight (dtype of hidden), strides (stride_wv, 1)
    keep_ptr,  # (cdiv(M, BLOCK_M), cdiv(VC, BLOCK_V)) int8, contiguous: the dz kernel's keep flags
    M,
    VC,
    H,
    stride_dz,
    stride_wv,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """d_hidden[rows, h0 : h0 + BLOCK_N] += Σ_{kept V tiles j} dz[rows, j] · W[j, h0 : h0 + BLOCK_N]: one
    program per (row block, H block) of the filtered backward, its V tiles in a fixed order, the tiles the
    dz kernel dropped (flag 0) skipped, the products summed in an fp32 accumulator (tensor cores for bf16 /
    fp16, IEEE fp32 for fp32: ``_dot``) and added once into the fp32 accumulator tile this program alone
    owns for the chunk: no atomics, the same bits run to run.

    Per chunk of VC columns with k kept tiles of T = cdiv(M, BLOCK_M) · cdiv(VC, BLOCK_V) (density ρ = k / T)
    and b bytes per element: 2 · BLOCK_M · BLOCK_V · BLOCK_N FLOPs per kept tile and H block, i.e. ρ · 2 ·
    M · VC · H padded to whole tiles; reads the flags (T bytes per H block), each kept dz tile once per H
    block (ρ · M · VC · b · cdiv(H, BLOCK_N)) and its W rows once per row block (ρ · VC · H · b · T_rows),
    without a cache; reads and writes the fp32 accumulator once (8 · M · H)
    (``benchmarks.modeled.triton_filtered_counts``). Programs are grouped by GROUP_M row blocks so that the
    programs in flight share their W columns (``_grouped``).
    """
    v_tiles = tl.cdiv(VC, BLOCK_V)
    row_tile, h_tile = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(H, BLOCK_N), GROUP_M)
    row0 = row_tile * BLOCK_M
    h0 = h_tile * BLOCK_N
    r = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    n = tl.arange(0, BLOCK_N)
    row_mask = r < M - row0
    n_mask = n < H - h0
    dz_base = dz_ptr + tl.cast(row0, tl.int64) * stride_dz
    dz_offs = r[:, None] * stride_dz + ks[None, :]
    w_offs = ks[:, None] * stride_wv + n[None, :]
    keep_row = keep_ptr + tl.cast(row_tile, tl.int64) * v_tiles
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in range(0, v_tiles):
        if tl.load(keep_row + j) != 0:
            for k in tl.static_range(0, BLOCK_V, BLOCK_K):  # the tile's columns in BLOCK_K slices
                col0 = j * BLOCK_V + k
                k_mask = ks < VC - col0
                dz = tl.load(dz_base + col0 + dz_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w_base = weight_ptr + tl.cast(col0, tl.int64) * stride_wv + h0
                w = tl.load(w_base + w_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = _dot(dz, w, acc, UPCAST_DOT)
    rows = (row0 + r).to(tl.int64)
    out = dh_ptr + rows[:, None] * H + (h0 + n)[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def fused_linear_logps_bwd_dw_kernel(
    dw_ptr,  # (VC, H) the chunk's rows of d_weight (dtype of weight), strides (stride_dw, 1): written once
    db_ptr,  # (VC,) fp32, contiguous: the chunk's d_bias entries; not written without HAS_BIAS
    dz_ptr,  # (M, VC) dtype of hidden, strides (stride_dz, 1): the chunk's dz, valid in kept tiles only
    hidden_ptr,  # (M, H) fp32 | bf16 | fp16, strides (stride_hm, 1)
    keep_ptr,  # (cdiv(M, BLOCK_M), cdiv(VC, BLOCK_V)) int8, contiguous: the dz kernel's keep flags
    M,
    VC,
    H,
    stride_dz,
    stride_hm,
    stride_dw,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    RNE_BF16: tl.constexpr = False,
):
    """d_weight[cols, h0 : h0 + BLOCK_N] = Σ_{row blocks i kept at this V tile} dz[i, cols]ᵀ · h[i, h0 :
    h0 + BLOCK_N]: one program per (V tile, H block) of the filtered backward, its row blocks in a fixed
    order, dropped tiles skipped, an fp32 accumulator (``_dot``), the rows of d_weight written once in
    weight's dtype (zeros where no tile is kept). HAS_BIAS: the H block 0 programs also write d_bias[cols]
    = Σ_rows dz in fp32, summed in the same order.

    Per chunk, with ρ and b as in ``fused_linear_logps_bwd_dh_kernel``: ρ · 2 · M · VC · H FLOPs (padded
    tiles); reads the flags (T bytes per H block), each kept dz tile once per H block and its h rows once
    per V tile (ρ · M · H · b · cdiv(VC, BLOCK_V)) without a cache; writes VC · H · b (+ 4 · VC with a
    bias). Programs are grouped by GROUP_M V tiles so that the programs in flight share their h columns.
    """
    row_tiles = tl.cdiv(M, BLOCK_M)
    v_tiles = tl.cdiv(VC, BLOCK_V)
    v_tile, h_tile = _grouped(tl.program_id(0), v_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
    col0 = v_tile * BLOCK_V
    h0 = h_tile * BLOCK_N
    ks = tl.arange(0, BLOCK_K)
    c = tl.arange(0, BLOCK_V)
    n = tl.arange(0, BLOCK_N)
    col_mask = c < VC - col0
    n_mask = n < H - h0
    dz_offs = ks[:, None] * stride_dz + c[None, :]
    h_offs = ks[:, None] * stride_hm + n[None, :]
    acc = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i in range(0, row_tiles):
        if tl.load(keep_ptr + tl.cast(i, tl.int64) * v_tiles + v_tile) != 0:
            for k in tl.static_range(0, BLOCK_M, BLOCK_K):  # the tile's rows in BLOCK_K slices
                row0 = i * BLOCK_M + k
                k_mask = ks < M - row0
                dz_base = dz_ptr + tl.cast(row0, tl.int64) * stride_dz + col0
                dz = tl.load(dz_base + dz_offs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                h_base = hidden_ptr + tl.cast(row0, tl.int64) * stride_hm + h0
                h = tl.load(h_base + h_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = _dot(tl.trans(dz), h, acc, UPCAST_DOT)
                if HAS_BIAS:
                    db += tl.sum(dz.to(tl.float32), axis=0)
    cols = (col0 + c).to(tl.int64)
    out = dw_ptr + cols[:, None] * stride_dw + (h0 + n)[None, :]
    if RNE_BF16:  # interpreter only (``_bf16_rne``)
        tl.store(out, _bf16_rne(acc), mask=col_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=col_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=col_mask & (h_tile == 0))


@triton.jit
def _logits_dz_tile(
    z_rows,  # (BLOCK_M, 1) pointers to logits[rows, 0]: fp32, unit column stride
    dz_rows,  # (BLOCK_M, 1) pointers to dz[rows, 0]: dtype of hidden, unit column stride, over logits' storage
    col0,
    cols,  # (BLOCK_V,) int32: 0 .. BLOCK_V − 1
    mask,  # (BLOCK_M, BLOCK_V) or (BLOCK_M, 1): the rows < M (and, in the tail tile, the columns < V)
    label,  # (BLOCK_M,) int64: each row's label as a column of the window (no column where not owned)
    g,  # (BLOCK_M,) fp32, d loss / d logp
    lse_m,  # (BLOCK_M,) fp32, the lse's part 0 (a row max)
    log_s,  # (BLOCK_M,) fp32, the lse's part 1
    logit_scale,
    softcap,
    temperature,
    HAS_SOFTCAP: tl.constexpr,
):
    """Load the fp32 logits tile at col0, store its dz at the same columns of dz: _dlogits_tile's formula and
    order of operations, the softcap's t = tanh(x / softcap) read back off the stored z = softcap · t /
    temperature as t = z · (temperature / softcap)."""
    c = col0 + cols
    z = tl.load(z_rows + c[None, :], mask=mask, other=0.0)
    p = tl.exp((z - lse_m[:, None]) - log_s[:, None])
    dz = g[:, None] * (tl.where(c[None, :] == label[:, None], 1.0, 0.0) - p)
    if HAS_SOFTCAP:
        t = z * (temperature / softcap)
        dz = dz * (1.0 - t * t) * (logit_scale / temperature)
    else:
        dz = dz * (logit_scale / temperature)
    if dz_rows.dtype.element_ty != tl.float32:
        # a 16-bit dz of columns [col0, col0 + BLOCK_V) lands on the fp32 columns [col0 / 2, (col0 + BLOCK_V) / 2):
        # the program has loaded them (in this tile or an earlier one), but a tile's columns are spread over
        # the warps, and without a barrier a warp could store over bytes another warp has yet to load (this
        # tile's first half at col0 = 0, or an earlier tile's when the warps drift); fp32 dz overwrites each
        # logit with its own gradient, in the thread that loaded it, so it needs none
        tl.debug_barrier()
    tl.store(dz_rows + c[None, :], dz.to(dz_rows.dtype.element_ty), mask=mask)


@triton.jit
def fused_linear_logits_dz_kernel(
    logits_ptr,  # (M, V) fp32, strides (stride_lm, 1): the transformed logits z of fused_linear_logits_fwd
    dz_ptr,  # (M, V) dtype of hidden, strides (stride_dz, 1), over logits' storage: fp32, the logits themselves
    # (stride_dz = stride_lm); bf16/fp16, row r in the first half of logits row r's bytes (stride_dz = 2 · stride_lm)
    grad_ptr,  # (M,) fp32, stride stride_g: d loss / d logp
    labels_ptr,  # (M,) int64, stride stride_y: global ids, owned where in [vocab_start, vocab_start + V)
    lse_ptr,  # (M, 2) fp32, contiguous: the two-part (m, log s) of the forward, or the whole vocabulary's
    M,
    V,
    stride_lm,
    stride_dz,
    stride_y,
    stride_g,
    vocab_start,  # logits column 0 as a global vocabulary id
    logit_scale,
    softcap,
    temperature,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dz = d loss / d(h · Wᵀ + b) of the one-pass route, over the logits it is formed from, in place:
    dz = g · (onehot(label) − exp((z − m) − log s)) · logit_scale / temperature (× (1 − t²), t = z ·
    temperature / softcap, with HAS_SOFTCAP), the one-hot only where the window owns the label, rounded to
    dz's dtype: ``_dlogits_tile`` on a stored logits tile instead of a recomputed one, no FLOPs but the
    elementwise ones (an exp and about 6 more per logit).

    One program per BLOCK_M rows walks their V tiles left to right, each loaded, turned into dz and stored
    before the next: a 16-bit dz row is the first half of its fp32 logits row, and its tile at col0 covers
    fp32 columns below col0 + BLOCK_V, which the program has read by then (a barrier between the load and
    the store keeps its warps in step, ``_logits_dz_tile``); no other program touches the row. Whole
    tiles load without a column mask (16-byte vectors where the row stride allows), then one masked tail.

    Traffic: 4 bytes read and 4 (fp32) or 2 (bf16/fp16) written per logit, 20 bytes read per row (label,
    g, both lse parts): M · V · (4 + b) + 20 · M bytes with b bytes per dz element.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_V)
    # int64 columns of the window: a label outside it (another slice's) matches no column < V
    label = tl.load(labels_ptr + rows * stride_y, mask=row_mask, other=-1).to(tl.int64) - vocab_start
    g = tl.load(grad_ptr + rows * stride_g, mask=row_mask, other=0.0)
    lse_m = tl.load(lse_ptr + rows * 2, mask=row_mask, other=0.0)
    log_s = tl.load(lse_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    z_rows = logits_ptr + rows[:, None] * stride_lm
    dz_rows = dz_ptr + rows[:, None] * stride_dz
    n_full = V // BLOCK_V * BLOCK_V
    for col0 in range(0, n_full, BLOCK_V):
        _logits_dz_tile(
            z_rows, dz_rows, col0, cols, row_mask[:, None], label, g, lse_m, log_s,
            logit_scale, softcap, temperature, HAS_SOFTCAP,
        )  # fmt: skip
    if n_full < V:
        _logits_dz_tile(
            z_rows, dz_rows, n_full, cols, row_mask[:, None] & (cols < V - n_full)[None, :], label, g, lse_m, log_s,
            logit_scale, softcap, temperature, HAS_SOFTCAP,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- launchers


class LinearConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int
    num_stages: int


# The forward and the backward's dz kernel share these (both form the same logits tiles). bf16/fp16:
# 64 x 128 logits tiles over 64-wide slices of H on tensor cores (mma.sync on sm_80, wgmma on sm_90),
# 3-stage cp.async pipeline; 8 warps keep the fp32 tile and its softmax temporaries (the forward's online
# log-sum-exp, the dz kernel's softmax gradient) in registers without spilling (the AOT check). Rows that
# are not 16-byte aligned load element by element, which costs an address register per element: they
# take 32-wide slices and 2 stages. fp32 multiplies in IEEE fp32 on FMA units: 64 x 64 tiles over
# 16-wide slices, unpipelined. The interpreter tests run these same kernels, mostly at smaller blocks
# (``config``) so that every dimension spans several tiles.
LAUNCH_CONFIGS = {  # (dtype, aligned) -> config
    (torch.float32, True): LinearConfig(64, 64, 16, 8, 1),
    (torch.float32, False): LinearConfig(64, 64, 16, 8, 1),
    (torch.bfloat16, True): LinearConfig(64, 128, 64, 8, 3),
    (torch.bfloat16, False): LinearConfig(64, 128, 32, 8, 2),
    (torch.float16, True): LinearConfig(64, 128, 64, 8, 3),
    (torch.float16, False): LinearConfig(64, 128, 32, 8, 2),
}
# The forward WITH_STATS carries four more row vectors through its vocabulary loop; fp32 with element-wise
# (unaligned) loads then spills at 64-row blocks (sm_80), so it takes 32-row ones.
STATS_LAUNCH_CONFIGS = {
    (torch.float32, False): LinearConfig(32, 64, 16, 8, 1),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ProductConfig(NamedTuple):
    BLOCK_N: int  # H columns per program of the filtered products
    BLOCK_K: int  # their reduction step: a slice of a keep-flag tile's BLOCK_V columns / BLOCK_M rows
    num_warps: int
    num_stages: int


# The filtered backward's two products (gradient_filter > 0): their tiles are the dz kernel's (BLOCK_M,
# BLOCK_V) keep-flag tiles, so only the H block is free. bf16/fp16: 64-wide H blocks, i.e. 64 x 64 (d_hidden)
# and 128 x 64 (d_weight) fp32 accumulators over 8 warps on tensor cores, 3 stages of (64 x 128 dz + 128 x 64
# operand) tiles = 96 KiB of shared memory, within sm_80's 163 KiB; 2 stages where rows load element-wise.
# fp32 (FMA, 64 x 64 flag tiles): 64-wide H blocks, unpipelined, as the dz kernel.
PRODUCT_LAUNCH_CONFIGS = {  # (dtype, aligned) -> config
    (torch.float32, True): ProductConfig(64, 16, 8, 1),
    (torch.float32, False): ProductConfig(64, 16, 8, 1),
    (torch.bfloat16, True): ProductConfig(64, 64, 8, 3),
    (torch.bfloat16, False): ProductConfig(64, 32, 8, 2),
    (torch.float16, True): ProductConfig(64, 64, 8, 3),
    (torch.float16, False): ProductConfig(64, 32, 8, 2),
}
MERGE_BLOCK = 1024
GROUP_M = 16  # row blocks per program group of the backward's dz kernel (its L2 swizzle)
# The backward's dz chunk buffer: (M, VC) in the inputs' dtype, VC a multiple of BLOCK_V. The default
# 1 GiB holds 16384 vocabulary columns of 32768 bf16 rows; with the fp32 d_hidden accumulator (M x H x 4
# bytes, 0.5 GiB there) the backward's scratch stays under 2 GiB. ``memory_budget`` sets it: more means
# fewer, larger GEMMs (fewer launches), less means less memory. The FLOPs do not change; each chunk
# re-reads hidden twice (the dz kernel, d_weight) and the fp32 d_hidden accumulator once, writing it
# back: 12 · M · H bytes per chunk in bf16.
DZ_CHUNK_BYTES = 1 << 30


class LogitsDzConfig(NamedTuple):
    BLOCK_M: int  # rows per program of the one-pass dz kernel
    BLOCK_V: int
    num_warps: int
    num_stages: int = 1


# The one-pass backward's dz kernel (``fused_linear_logits_dz_kernel``): elementwise, memory-bound, and a row
# can never be split across programs (the 16-bit dz overwrites its own row's logits), so a group of M rows is
# at most M programs: one row each, for the most programs in flight. 2048-column tiles over 4 warps: 16 logits
# per thread, four 16-byte fp32 loads in flight, no reductions, a few dozen registers. One config for every
# dtype and vocabulary: the kernel has one variant per (dtype, softcap) for the AOT check to compile.
LOGITS_DZ_CONFIG = LogitsDzConfig(BLOCK_M=1, BLOCK_V=2048, num_warps=4)


def launch_config(dtype: torch.dtype, aligned: bool = True, with_stats: bool = False) -> LinearConfig:
    """Block sizes, warps and pipeline stages the launchers use for hidden/weight of ``dtype``;
    ``aligned``: H, both row strides and both data pointers are multiples of 16 (elements / bytes),
    as the JIT specializes them, so that tiles load as 16-byte vectors; ``with_stats``: the forward
    computing the per-token statistics."""
    key = (dtype, bool(aligned))
    if with_stats and key in STATS_LAUNCH_CONFIGS:
        return STATS_LAUNCH_CONFIGS[key]
    return LAUNCH_CONFIGS[key]


def product_config(dtype: torch.dtype, aligned: bool = True) -> ProductConfig:
    """H block, warps and stages of the filtered backward's d_hidden / d_weight kernels (``aligned`` as in
    ``launch_config``)."""
    return PRODUCT_LAUNCH_CONFIGS[(dtype, bool(aligned))]


def _aligned(hidden, weight) -> bool:
    H = hidden.shape[1]
    return (
        H % 16 == 0 and hidden.stride(0) % 16 == 0 and weight.stride(0) % 16 == 0
        and hidden.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    )  # fmt: skip


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_shape(device: torch.device) -> tuple[int, int]:
    """(streaming multiprocessors, L2 bytes) of the device; (1, 0) under the interpreter (CPU tensors)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, props.L2_cache_size
    return 1, 0


def forward_splits(V: int, H: int, itemsize: int, cfg: LinearConfig, row_blocks: int, sms: int, l2_bytes: int) -> int:
    """Default vocabulary splits of the forward: enough programs for two waves of one per SM, and enough
    splits that the row blocks in flight (sms / splits of them, splits fastest in the grid) keep their
    h rows (BLOCK_M · H each, re-read for every V tile) in half the L2; never more than the V tiles."""
    v_tiles = triton.cdiv(V, cfg.BLOCK_V)
    fill = triton.cdiv(2 * sms, row_blocks)
    slab = cfg.BLOCK_M * H * itemsize
    in_flight = min(sms, row_blocks)
    l2 = triton.cdiv(in_flight * slab, l2_bytes // 2) if l2_bytes else 1
    return max(1, min(max(fill, l2), v_tiles))


def _vocab_splits(V: int, block_v: int, splits: int) -> tuple[int, int]:
    """(splits, v_per_split) for at most ``splits`` ranges of whole V tiles."""
    v_tiles = triton.cdiv(V, block_v)
    splits = max(1, min(int(splits), v_tiles))
    per_split = triton.cdiv(v_tiles, splits) * block_v
    return triton.cdiv(V, per_split), per_split


def dz_chunk_columns(M: int, V: int, itemsize: int, block_v: int, chunk_bytes: int) -> int:
    """Vocabulary columns per backward chunk: the (M, VC) dz buffer within chunk_bytes, VC a multiple of
    BLOCK_V (at least one tile) and at most V rounded up to a whole tile."""
    cols = chunk_bytes // max(1, M * itemsize) // block_v * block_v
    return max(block_v, min(cols, triton.cdiv(V, block_v) * block_v))


def _check(hidden, weight, bias, labels):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (M, H) and weight (V, H) expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if hidden.dtype not in DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one of fp32/bf16/fp16, got {hidden.dtype}, {weight.dtype}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden and weight need a unit stride along H (call .contiguous())")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float (V,) tensor, got {bias.dtype} {tuple(bias.shape)}")
    if labels.shape != (hidden.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be (M,) int64, got {labels.dtype} {tuple(labels.shape)}")


def _check_offsets(hidden, weight, cfg):
    """In-tile offsets are int32 (r · stride_hm, c · stride_wv); everything that scales with M or V is int64."""
    if hidden.stride(0) * cfg.BLOCK_M >= 2**31 or weight.stride(0) * cfg.BLOCK_V >= 2**31:
        raise ValueError("row strides of hidden / weight too large for int32 in-tile offsets")


def _transform_args(bias, weight, logit_scale, softcap, temperature):
    bias_arg = (bias.contiguous() if bias is not None else weight)  # a dummy pointer without bias
    return bias_arg, float(logit_scale), float(softcap) if softcap is not None else 1.0, float(temperature)


def fused_linear_logps_fwd(hidden, weight, bias, labels, logit_scale=1.0, softcap=None, temperature=1.0, *,
                           splits=None, config=None, with_stats=False, chunk_elements=None,
                           vocab_start=0):  # fmt: skip
    """(logp, lse, stats): logp (M,) fp32, log_softmax(z)[label] of the LM-head logits z; lse (M, 2) fp32,
    logsumexp(z) in two parts (max_v z, log Σ_v exp(z − max_v z)); stats (M, 4) fp32 with ``with_stats``
    (columns ``reference.STATS``: sum_v z, the entropy, 1.0 where the label is the first argmax of z,
    logsumexp(2z)), computed in the same pass, else None.

    hidden: (M, H) fp32 | bf16 | fp16 with any row stride but a unit stride along H (required); weight:
    (V, H) same dtype, unit stride along H, the rows [vocab_start, vocab_start + V) of the head; bias: (V,)
    or None; labels: (M,) int64 global ids (one outside the window is not owned: label logit 0, top1 0,
    finite). z = (hidden · weightᵀ + bias) · logit_scale, softcapped if ``softcap``, divided by
    ``temperature`` (``reference.lm_head_logits``). ``splits`` divides V across that many programs per row
    block (default ``forward_splits``: enough to fill the GPU and to keep the h rows in flight in L2; under
    the interpreter, which reports one SM, cdiv(2, row blocks)), merged deterministically by a second kernel. ``config`` overrides
    ``launch_config(hidden.dtype, aligned, with_stats)``. ``chunk_elements`` is the backward's knob (unused).
    """
    _check(hidden, weight, bias, labels)
    M, H = hidden.shape
    V = weight.shape[0]
    logp = torch.empty(M, dtype=torch.float32, device=hidden.device)
    lse = torch.empty((M, 2), dtype=torch.float32, device=hidden.device)
    stats = torch.empty((M, 4), dtype=torch.float32, device=hidden.device) if with_stats else None
    if M == 0:
        return logp, lse, stats
    cfg = config or launch_config(hidden.dtype, _aligned(hidden, weight), with_stats)
    _check_offsets(hidden, weight, cfg)
    row_blocks = triton.cdiv(M, cfg.BLOCK_M)
    if splits is None:
        splits = forward_splits(V, H, hidden.element_size(), cfg, row_blocks, *_device_shape(hidden.device))
    n_splits, per_split = _vocab_splits(V, cfg.BLOCK_V, splits)
    # m, s, z[label] (and s1, s2, sum z with stats) per split; the stats' argmax in its own int32 slab
    parts = torch.empty((6 if with_stats else 3, n_splits, M), dtype=torch.float32, device=hidden.device)
    argmax = torch.empty((n_splits, M), dtype=torch.int32, device=hidden.device) if with_stats else None
    stat_parts = (parts[3], parts[4], parts[5], argmax) if with_stats else (parts[0],) * 4  # dummies: unread
    bias_arg, scale, cap, temp = _transform_args(bias, weight, logit_scale, softcap, temperature)
    fused_linear_logps_fwd_kernel[(row_blocks * n_splits,)](
        hidden, weight, bias_arg, labels, parts[0], parts[1], parts[2], *stat_parts,
        M, V, H, hidden.stride(0), weight.stride(0), labels.stride(0), per_split, int(vocab_start),
        scale, cap, temp,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
        UPCAST_DOT=_interpreting() and hidden.dtype == torch.bfloat16, WITH_STATS=with_stats,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    fused_linear_logps_merge_kernel[(triton.cdiv(M, MERGE_BLOCK),)](
        parts[0], parts[1], parts[2], *stat_parts, labels, logp, lse, stats if with_stats else logp,
        M, labels.stride(0), n_splits, int(vocab_start),
        BLOCK=MERGE_BLOCK, WITH_STATS=with_stats, num_warps=4,
    )  # fmt: skip
    return logp, lse, stats


@contextlib.contextmanager
def _ieee_fp32_matmuls(dtype: torch.dtype, device: torch.device):
    """cuBLAS fp32 GEMMs in IEEE fp32 for the duration (fp32 is the exact path: no TF32), restoring the
    caller's setting after, through whichever of torch's two flag APIs it uses (mixing them raises)."""
    flags = torch.backends.cuda.matmul
    if dtype != torch.float32 or device.type != "cuda" or flags.fp32_precision != "tf32":
        yield
        return
    try:
        legacy = torch.get_float32_matmul_precision()  # raises when the caller set the new API
    except RuntimeError:
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    else:
        flags.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        else:
            flags.fp32_precision = "tf32"


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0, alpha: float = 1.0) -> None:
    """acc (fp32) = beta · acc + alpha · a @ b with a, b in the inputs' dtype and an fp32 accumulator (beta = 0:
    acc's old content, NaN included, is ignored): one cuBLAS GEMM with an fp32 output on CUDA (``out_dtype``);
    on CPU (interpreter tests) the operands are widened, which gives the same exact bf16 products, summed in fp32."""
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, beta=beta, alpha=alpha, out=acc)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=acc)
    else:
        torch.addmm(acc, a.float(), b.float(), beta=beta, alpha=alpha, out=acc)


def forward_chunk_rows(V: int, chunk_bytes: int) -> int:
    """Rows per chunk of the cuBLAS forward: its (rows, V) fp32 logits buffer within chunk_bytes."""
    return max(1, chunk_bytes // (4 * V))


def fused_linear_logps_fwd_cublas(hidden, weight, bias, labels, logit_scale=1.0, softcap=None, temperature=1.0, *,
                                  with_stats=False, chunk_elements=None, vocab_start=0):  # fmt: skip
    """``fused_linear_logps_fwd`` as cuBLAS products plus the logits path's log-prob kernel, per chunk of rows:
    the chunk's fp32 logits z = h · Wᵀ (one GEMM with an fp32 output and the scale as its alpha), the rest of
    the transform in place (a bias add, softcap's tanh: elementwise passes, none for a plain or scaled head;
    the op takes the fused kernel for a softcapped head), then ``logprobs.token_logps_fwd``
    over them (its online log-sum-exp, label gather and statistics). Same outputs, the lse in the logits
    kernel's own two parts; the logits are the same fp32 sums of exact products in cuBLAS's order. Labels go
    to that kernel as columns of the slice, an unowned one as -1 (no column: NaN there, never a read), and
    such a row's log-prob is then −(m + log s), its label logit 0: elementwise, no host synchronization.

    The route the issue weighs against the fused kernel: 2·M·H·V FLOPs at the cuBLAS rate instead of a Triton
    tl.dot loop's, for 8 bytes of HBM per logit (the fp32 chunk written, then read) and a (rows, V) fp32
    buffer of ``chunk_elements`` · 4 bytes (default ``DZ_CHUNK_BYTES``). ``benchmarks.modeled`` models both:
    this route wins unless a Triton tl.dot loop reaches 0.87 of cuBLAS's rate, so it is the op's forward
    (``dpo_kernels.fused_linear``); the GPU check times both.
    """
    from . import logprobs

    _check(hidden, weight, bias, labels)
    M, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    logp = torch.empty(M, dtype=torch.float32, device=device)
    lse = torch.empty((M, 2), dtype=torch.float32, device=device)
    stats = torch.empty((M, 4), dtype=torch.float32, device=device) if with_stats else None
    if M == 0:
        return logp, lse, stats
    chunk_bytes = DZ_CHUNK_BYTES if not chunk_elements else 4 * int(chunk_elements)
    rows = min(M, forward_chunk_rows(V, chunk_bytes))
    buf = torch.empty((rows, V), dtype=torch.float32, device=device)
    # the scale rides on the GEMM (its alpha), so a plain or scaled head makes no elementwise pass
    scale = float(logit_scale) if softcap is not None else float(logit_scale) / float(temperature)
    no_label = -(2**31)  # compacted rows: every label is scored, an int32 argument
    local = labels - vocab_start
    owned = (local >= 0) & (local < V)
    local = torch.where(owned, local, -1)
    with _ieee_fp32_matmuls(hidden.dtype, device):
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            z = buf[: r1 - r0]
            _add_product(z, hidden[r0:r1], weight.T, beta=0, alpha=scale)
            if bias is not None:
                z.add_(bias, alpha=scale)
            if softcap is not None:
                z.div_(float(softcap)).tanh_().mul_(float(softcap) / float(temperature))
            out = logprobs.token_logps_fwd(z[None], local[None, r0:r1], no_label, False, with_stats)
            parts = out[1][0]
            torch.where(owned[r0:r1], out[0][0], -parts[:, 0] - parts[:, 1], out=logp[r0:r1])
            lse[r0:r1] = parts
            if with_stats:
                stats[r0:r1] = out[2][0]
    return logp, lse, stats


def fused_linear_logps_bwd(grad, hidden, weight, bias, labels, lse, logit_scale=1.0, softcap=None, temperature=1.0,
                           *, filter_eps=0.0, chunk_elements=None, config=None, products=None,
                           keep_out=None, vocab_start=0):  # fmt: skip
    """(d_hidden, d_weight, d_bias) of sum_m grad[m] · logp[m], recomputing the logits once.

    grad: (M,) fp32 (any stride); lse: (M, 2) fp32, the two parts (m, log s) from ``fused_linear_logps_fwd``,
    or the whole vocabulary's when weight is a slice: dz = g · (onehot − exp((z − m) − log s)) is then the
    slice's columns of the whole head's gradient, the one-hot only where the slice [vocab_start, vocab_start
    + V) owns the global label; the other arguments as there (unit stride along H required). d_hidden is
    (M, H) in hidden's dtype, d_weight (V, H) in weight's dtype, d_bias (V,) in bias's dtype or None.

    Per vocabulary chunk of VC columns (``dz_chunk_columns``; the (M, VC) buffer takes ``chunk_elements``
    · 4 bytes, default ``DZ_CHUNK_BYTES``): ``fused_linear_logps_bwd_dz_kernel`` recomputes the chunk's
    logits and writes dz = d loss / d(h · Wᵀ) in the inputs' dtype (as a bf16 autograd graph rounds its
    logits' gradient), then two cuBLAS GEMMs consume it: d_weight[chunk] = dzᵀ · h, written once in
    weight's dtype, and d_hidden += dz · W[chunk] into an fp32 (M, H) accumulator, cast once at the end;
    d_bias[chunk] = Σ_rows dz in fp32. FLOPs: 2·M·H·V (recompute) + 4·M·H·V (products); extra memory:
    the dz buffer + M·H fp32 (+ V fp32 with a bias). Deterministic: no atomics, fixed chunk order. fp32
    inputs stay IEEE fp32 throughout (the kernel's products and the GEMMs, ``_ieee_fp32_matmuls``).

    ``filter_eps`` > 0 (the gradient filter) drops every (BLOCK_M, BLOCK_V) tile whose softmax entries are
    all below filter_eps and that holds no label, at a gradient error of at most g · p · |logit_scale /
    temperature| per dropped entry p < filter_eps, times |W_v| for d_hidden and |h_m| for d_weight (times
    1 for d_bias). The dz kernel then also stores a keep flag per tile, and two Triton kernels replace the
    cuBLAS products, skipping dropped tiles (``fused_linear_logps_bwd_dh_kernel``, ``..._dw_kernel``, at
    ``products`` or ``product_config``): the products' 4·M·H·V FLOPs and their dz reads scale with the
    kept-tile density ρ, the recompute does not. Still deterministic (fixed loop orders, no atomics).
    0 (default) drops nothing and runs the dense cuBLAS path above. ``keep_out``: a list that receives
    each chunk's (row blocks, V tiles) int8 keep flags (filtered path only; tests and benchmarks).
    """
    _check(hidden, weight, bias, labels)
    M, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    if M == 0:
        d_weight.zero_()
        return torch.empty_like(hidden), d_weight, torch.zeros_like(bias) if bias is not None else None
    aligned = _aligned(hidden, weight)
    cfg = config or launch_config(hidden.dtype, aligned)
    _check_offsets(hidden, weight, cfg)
    grad = grad.to(torch.float32)
    lse = lse.to(torch.float32).contiguous()  # (M, 2): the kernel reads both parts of row m at 2m, 2m + 1
    bias_arg, scale, cap, temp = _transform_args(bias, weight, logit_scale, softcap, temperature)
    chunk_bytes = DZ_CHUNK_BYTES if not chunk_elements else 4 * int(chunk_elements)
    vc = dz_chunk_columns(M, V, hidden.element_size(), cfg.BLOCK_V, chunk_bytes)
    dz_buf = torch.empty((M, min(vc, V)), dtype=hidden.dtype, device=device)
    d_hidden = torch.zeros((M, H), dtype=torch.float32, device=device)
    d_bias = torch.empty(V, dtype=torch.float32, device=device) if bias is not None else None
    row_blocks = triton.cdiv(M, cfg.BLOCK_M)
    filtered = float(filter_eps) > 0
    upcast = _interpreting() and hidden.dtype == torch.bfloat16
    if filtered:
        prod = products or product_config(hidden.dtype, aligned)
        keep = torch.empty((row_blocks, triton.cdiv(min(vc, V), cfg.BLOCK_V)), dtype=torch.int8, device=device)
        h_blocks = triton.cdiv(H, prod.BLOCK_N)
    with _ieee_fp32_matmuls(hidden.dtype, device):
        for c0 in range(0, V, vc):
            cols = min(vc, V - c0)
            dz = dz_buf[:, :cols]
            v_tiles = triton.cdiv(cols, cfg.BLOCK_V)
            # the chunk's flags, contiguous (row blocks, v_tiles); a dummy pointer, never touched, without a filter
            chunk_keep = keep.view(-1)[: row_blocks * v_tiles].view(row_blocks, v_tiles) if filtered else lse
            fused_linear_logps_bwd_dz_kernel[(row_blocks * v_tiles,)](
                dz, grad, hidden, weight[c0:], bias_arg[c0:] if bias is not None else bias_arg, labels, lse,
                chunk_keep, M, cols, H, dz_buf.stride(0), hidden.stride(0), weight.stride(0), labels.stride(0),
                grad.stride(0), v_tiles if filtered else 0, int(vocab_start) + c0, scale, cap, temp, float(filter_eps),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                BLOCK_M=cfg.BLOCK_M, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, GROUP_M=GROUP_M,
                UPCAST_DOT=upcast, FILTER=filtered, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            if filtered:
                if keep_out is not None:
                    keep_out.append(chunk_keep.clone())
                blocks = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_V=cfg.BLOCK_V, BLOCK_N=prod.BLOCK_N, BLOCK_K=prod.BLOCK_K)
                launch = dict(GROUP_M=GROUP_M, UPCAST_DOT=upcast, num_warps=prod.num_warps, num_stages=prod.num_stages)
                fused_linear_logps_bwd_dh_kernel[(row_blocks * h_blocks,)](
                    d_hidden, dz, weight[c0:], chunk_keep, M, cols, H, dz_buf.stride(0), weight.stride(0),
                    **blocks, **launch,
                )  # fmt: skip
                fused_linear_logps_bwd_dw_kernel[(v_tiles * h_blocks,)](
                    d_weight[c0:], d_bias[c0:] if bias is not None else d_hidden, dz, hidden, chunk_keep,
                    M, cols, H, dz_buf.stride(0), hidden.stride(0), d_weight.stride(0),
                    HAS_BIAS=bias is not None, RNE_BF16=upcast, **blocks, **launch,
                )  # fmt: skip
                continue
            torch.mm(dz.T, hidden, out=d_weight[c0 : c0 + cols])
            _add_product(d_hidden, dz, weight[c0 : c0 + cols])
            if d_bias is not None:
                torch.sum(dz, dim=0, dtype=torch.float32, out=d_bias[c0 : c0 + cols])
    d_hidden = d_hidden if hidden.dtype == torch.float32 else d_hidden.to(hidden.dtype)
    return d_hidden, d_weight, d_bias.to(bias.dtype) if bias is not None else None


# ------------------------------------------------------------------------------------------- one pass
# The one-pass route: the logits of a group of rows are formed once into an fp32 buffer the caller owns,
# scored, kept while the caller turns the log-probs into the loss's per-row gradient g, then overwritten in
# place by dz and consumed by the two gradient GEMMs: 6·M·H·V FLOPs for forward + backward instead of the
# recompute's 8, for a (M, V) fp32 buffer. ``dpo_kernels.portable.linear`` has the portable launchers of the
# same contract.


def _check_logits_buffer(logits, M: int, V: int, device) -> None:
    if logits.dtype != torch.float32 or tuple(logits.shape) != (M, V) or logits.device != device:
        raise ValueError(f"logits must be an (M, V) = ({M}, {V}) fp32 buffer on {device}, got "
                         f"{logits.dtype} {tuple(logits.shape)} on {logits.device}")  # fmt: skip
    if M and V and (logits.stride(1) != 1 or (M > 1 and logits.stride(0) < V)):
        raise ValueError(f"logits need a unit column stride and a row stride >= V, got strides {logits.stride()}")


def _dz_view(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dz over the logits' storage: the buffer itself for fp32; for bf16/fp16 the (M, V) view whose row r is
    the first half of logits row r's bytes (row stride 2 · logits.stride(0), unit column stride, a GEMM
    operand with lda = 2 · logits.stride(0) as it stands)."""
    if dtype == torch.float32:
        return logits
    return logits.view(dtype)[:, : logits.shape[1]]


def _accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b with an fp32 accumulator, rounded into out's dtype once: one cuBLAS GEMM with beta = 1 on
    CUDA (``addmm_``; ``_add_product`` for an fp32 out of 16-bit operands); on CPU (interpreter tests) a
    16-bit out takes the widened operands' fp32 product plus its own widened values, rounded once."""
    if out.dtype == torch.float32:
        _add_product(out, a, b)
    elif out.device.type == "cuda" and a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.copy_(torch.addmm(out.float(), a.float(), b.float()))


def fused_linear_logits_fwd(logits, hidden, weight, bias, labels, logit_scale=1.0, softcap=None, temperature=1.0, *,
                            with_stats=False, vocab_start=0):  # fmt: skip
    """(logp (M,), lse (M, 2), stats (M, 4) | None) as ``fused_linear_logps_fwd_cublas`` gives them, leaving the
    rows' transformed logits z in ``logits`` for ``fused_linear_logits_bwd_``.

    logits: an (M, V) fp32 buffer with a unit column stride and any row stride >= V, overwritten; hidden (M, H)
    the compacted scored rows; weight (V, H), bias (V,) | None the rows [vocab_start, vocab_start + V) of a
    head; labels (M,) int64 global ids. z = ((h · Wᵀ + b) · logit_scale, softcapped as softcap · tanh(z /
    softcap), / temperature): one GEMM for all M rows straight into the buffer (an fp32 output, the scale as
    its alpha: for fp32 inputs IEEE fp32, for bf16/fp16 the exact products summed in fp32), the bias and the
    softcap in place (elementwise passes only for those), then ``logprobs.token_logps_fwd`` scores the buffer
    with the window's start (an unowned label scores a label logit of 0: logp = −(m + log s), top1 = 0).

    2·M·H·V FLOPs; bytes: the GEMM's operands and 4 · M · V written, then 4 · M · V read by the scorer (and
    8 · M · V read and written per elementwise pass with a bias or a softcap).
    """
    from . import logprobs

    _check(hidden, weight, bias, labels)
    M, V = hidden.shape[0], weight.shape[0]
    _check_logits_buffer(logits, M, V, hidden.device)
    if M == 0:
        empty = torch.empty((0, 2), dtype=torch.float32, device=hidden.device)
        return empty[:, 0], empty, empty.new_empty((0, 4)) if with_stats else None
    # the scale rides on the GEMM (its alpha), so a plain or scaled head makes no elementwise pass
    scale = float(logit_scale) if softcap is not None else float(logit_scale) / float(temperature)
    with _ieee_fp32_matmuls(hidden.dtype, hidden.device):
        _add_product(logits, hidden, weight.T, beta=0, alpha=scale)
    if bias is not None:
        logits.add_(bias, alpha=scale)
    if softcap is not None:
        logits.div_(float(softcap)).tanh_().mul_(float(softcap) / float(temperature))
    # compacted rows: every label is scored (an ignore_index no int64 label takes, an int32 argument)
    logp, lse, stats = logprobs.token_logps_fwd(logits[None], labels[None], -(2**31), False, with_stats,
                                                vocab_start=vocab_start)  # fmt: skip
    return logp[0], lse[0], stats[0] if with_stats else None


def fused_linear_logits_bwd_(logits, grad, hidden, weight, bias, labels, lse, logit_scale=1.0, softcap=None,
                             temperature=1.0, *, d_weight, d_bias=None, vocab_start=0, config=None):  # fmt: skip
    """d_hidden (M, H) in hidden's dtype from the logits ``fused_linear_logits_fwd`` left in ``logits``,
    accumulating d_weight (V, H, its dtype; None: a frozen head, no product) and d_bias ((V,) fp32, or None) in
    place; the buffer ends up holding dz (fp32 inputs: the buffer itself; bf16/fp16: each row's first half, ``_dz_view``).

    grad (M,) d loss / d logp (any stride); lse (M, 2) the forward's two parts, or the whole vocabulary's when
    weight is a window (then dz is the window's columns of the whole head's gradient); the other arguments as
    in the forward. ``fused_linear_logits_dz_kernel`` overwrites the logits with dz = g · (onehot(owned label)
    − exp((z − m) − log s)) · logit_scale / temperature (× (1 − t²), t = z · temperature / softcap, with a
    softcap), rounded to the inputs' dtype; then d_bias += Σ_rows dz (fp32, of the rounded dz as the recompute
    route sums it), d_weight += dzᵀ · h (one GEMM, beta = 1, one rounding) and d_hidden = dz · W (one GEMM into
    an fp32 accumulator, cast once): IEEE fp32 for fp32 inputs (``_ieee_fp32_matmuls``). ``config``
    overrides ``LOGITS_DZ_CONFIG``.

    4·M·H·V FLOPs (the GEMMs); bytes: the kernel's M · V · (4 + b) + 20 · M (b bytes per dz element), the
    GEMMs' operands (dz twice), 4 · M · H for the accumulator and b · V · H read and written for d_weight.
    Deterministic: no atomics.
    """
    _check(hidden, weight, bias, labels)
    M, H = hidden.shape
    V = weight.shape[0]
    _check_logits_buffer(logits, M, V, hidden.device)
    if (d_weight is not None and d_weight.shape != weight.shape) or (d_bias is not None and d_bias.shape != (V,)):
        raise ValueError(f"d_weight {tuple(d_weight.shape)} / d_bias must match weight {tuple(weight.shape)} / (V,)")
    if M == 0:
        return torch.empty_like(hidden)
    cfg = config or LOGITS_DZ_CONFIG
    grad = grad.to(torch.float32)
    lse = lse.to(torch.float32).contiguous()  # (M, 2): the kernel reads both parts of row m at 2m, 2m + 1
    dz = _dz_view(logits, hidden.dtype)
    fused_linear_logits_dz_kernel[(triton.cdiv(M, cfg.BLOCK_M),)](
        logits, dz, grad, labels, lse, M, V, logits.stride(0), dz.stride(0), labels.stride(0), grad.stride(0),
        int(vocab_start), float(logit_scale), float(softcap) if softcap is not None else 1.0, float(temperature),
        HAS_SOFTCAP=softcap is not None, BLOCK_M=cfg.BLOCK_M, BLOCK_V=cfg.BLOCK_V,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if d_bias is not None:
        d_bias += torch.sum(dz, dim=0, dtype=torch.float32)
    d_hidden = torch.empty((M, H), dtype=torch.float32, device=hidden.device)
    with _ieee_fp32_matmuls(hidden.dtype, hidden.device):
        if d_weight is not None:  # None: a frozen head, no product
            _accumulate_product(d_weight, dz.T, hidden)
        _add_product(d_hidden, dz, weight, beta=0)
    return d_hidden if hidden.dtype == torch.float32 else d_hidden.to(hidden.dtype)
