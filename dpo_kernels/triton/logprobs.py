"""Triton kernels: per-token log-probs of the labels and their gradient w.r.t. the logits.

One program handles one token row of the logits, so nothing of size (N, T, V) is stored besides
the logits and their gradient. The next-token shift is index arithmetic: logits row ``t`` is scored
against label ``t + SHIFT``; with a shift the last logits row predicts nothing and gets a zero gradient.
All offsets are formed in int64 because N·T·V passes 2^31 at real sizes.

The logits may be the columns [vocab_start, vocab_start + V) of a larger vocabulary, with global labels:
a row's label column is label − vocab_start (int64), and a row whose label lies outside the slice is
scored with label logit 0 (no load) and gets no one-hot in the backward.

Rows whose starts the JIT cannot prove 16-byte aligned (V = 50257 or 32001: odd row strides) take
``ALIGN`` > 1 (the logits per 16 bytes, chosen by ``row_align``); the head is the < ALIGN logits before
the row's first 16-byte boundary. The backward writes head ++ full tiles ++ tail: the full tiles start
on a boundary and their loads and stores are unmasked 16-byte vectors; the head and the tail (the last
partial tile) are one masked tile each. The forward (with or without statistics) reads the whole 16-byte
vectors after the head in one loop, masked per vector, so every tile's loads are 16-byte vectors, and
the head with the ragged end (< ALIGN logits) as one narrow tile of 2 ALIGN lanes. Aligned rows
(ALIGN = 1) and strided vocabularies take one masked loop, whose loads are vectors where the JIT sees V
and the strides divisible by 16.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _fold_tile(x, idx, valid, m, s, sum_x, s1, s2, first_tie, x_label, WITH_STATS: tl.constexpr):
    """The running state (m, s[, sum_x, s1, s2, first_tie]) after one tile x (BLOCK_V,) fp32, -inf where
    not ``valid``; idx: the vocabulary index of each lane. See token_logps_fwd_kernel."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # Shift by 0 while every logit so far is -inf (banned tokens): exp(-inf - -inf) is NaN.
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
    if WITH_STATS:
        alpha = tl.exp(m - pivot)
        e = tl.exp(x - pivot)
        # s1's terms were shifted by the old max: e (x - m) -> alpha e ((x - m) + (m - pivot)).
        # While m is -inf, s and s1 are 0 and the correction must be 0, not -inf * 0 = NaN.
        s1 = alpha * (s1 + tl.where(m == float("-inf"), 0.0, m - pivot) * s)
        # x = -inf (banned, or a masked lane) has e = 0 and must add 0, not 0 * -inf = NaN:
        # clamping x - pivot at -FLT_MAX changes no finite value (a max, not a per-lane select).
        s1 += tl.sum(e * tl.maximum(x - pivot, -3.4028234663852886e38), axis=0)
        s2 = s2 * (alpha * alpha) + tl.sum(e * e, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        sum_x += tl.sum(tl.where(valid, x, 0.0), axis=0)
        first_tie = tl.min(tl.where(valid & (x == x_label), idx, first_tie), axis=0)
    else:
        s = s * tl.exp(m - pivot) + tl.sum(tl.exp(x - pivot), axis=0)
    return m_new, s, sum_x, s1, s2, first_tie


@triton.jit
def _row_head(row_off, V, ALIGN: tl.constexpr):
    """How many logits of the row at element offset ``row_off`` precede its first 16-byte boundary."""
    head = 0
    if ALIGN > 1:
        head = tl.minimum(((ALIGN - row_off % ALIGN) % ALIGN).to(tl.int32), V)
    return head


@triton.jit
def token_logps_fwd_kernel(
    logits_ptr,  # (N, T, V) fp32 | bf16 | fp16, strides (stride_ln, stride_lt, stride_lv)
    labels_ptr,  # (N, T) int32 | int64, strides (stride_yn, stride_yt)
    logp_ptr,  # (N, T_OUT) fp32, contiguous: log_softmax(logits[n, t])[labels[n, t + shift]]
    lse_ptr,  # (N, T_OUT, 2) fp32, contiguous: (m, log s) of logits[n, t], saved for the backward
    stats_ptr,  # (N, T_OUT, 4) fp32, contiguous, with WITH_STATS (columns of reference.STATS); else unused
    T_OUT,
    V,
    stride_ln,
    stride_lt,
    stride_lv,
    stride_yn,
    stride_yt,
    ignore_index,
    shift,
    vocab_start,  # the global id of logits column 0: labels are global ids
    BLOCK_V: tl.constexpr,
    WITH_STATS: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """logp = (x[label - vocab_start] - m) - log s, m = max_v x_v, s = sum_v exp(x_v - m), online over V tiles;
    where the slice does not own the label (label - vocab_start outside [0, V)) its logit is taken as 0.

    The log-sum-exp m + log s is stored as its two parts, never rounded to one fp32 value: the backward
    forms exp((x - m) - log s) as the reference's log_softmax does, where exp(x - fl(m + log s)) would
    carry the rounding of the sum (|lse| · 2^-24, 6e-5 relative at logits of size 1000). The label's
    logit is one load before the loop, not a reduction per tile.

    Traffic per scored row: V logits read once (plus one for the label), 12 bytes written (28 with
    stats); per unscored row the label alone. FLOPs per logit: a max, a subtraction, an exp, an add
    (with stats about 8 more).

    Rows whose label is ``ignore_index`` write zeros and never read their logits. A label outside the
    slice reads nothing for it: logp = (0 - m) - log s, top1 = 0 (the slice's share of a row another
    slice owns; with vocab_start = 0, a label outside [0, V), which the Python op rejects first).
    Special values come out as in the reference: a NaN or +inf logit makes s NaN (exp(NaN), exp(inf -
    inf)), so log s, the log-prob and the backward's whole row are NaN; an all -inf row has m = -inf and
    s = 0, so x[label] - m is NaN (where the slice owns the label).

    With ``WITH_STATS`` the same tile loop also keeps, rescaled with the running max m like the sum
    s = sum_v exp(x_v - m):
      sum_x = sum_v x_v;
      s1 = sum_v exp(x_v - m) * (x_v - m), so entropy = lse - sum_v p_v x_v = log(s) - s1 / s: both
        terms are >= 0, nothing cancels (unlike lse - sum_v p_v x_v when the logits are large);
      s2 = sum_v exp(2 (x_v - m)), so lse2 = log sum_v exp(2 x_v) = 2 m + log(s2);
      top-1 without an argmax: the label is the first index of the maximum iff x_label equals the
        running max m and the first v with x_v == x_label is the label (exact on the stored values).
    Logits at -inf (banned tokens) add -inf to sum_x and nothing to s1 or s2. Rows with a NaN or +inf
    logit get their top-1 and lse2 from token_logps_special_stats_kernel.
    """
    row = tl.program_id(0)
    n = (row // T_OUT).to(tl.int64)
    t = (row % T_OUT).to(tl.int64)
    label = tl.load(labels_ptr + n * stride_yn + (t + shift) * stride_yt).to(tl.int64)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row.to(tl.int64) * 2, 0.0)
        tl.store(lse_ptr + row.to(tl.int64) * 2 + 1, 0.0)
        if WITH_STATS:
            stats_row = stats_ptr + row.to(tl.int64) * 4
            tl.store(stats_row + 0, 0.0)
            tl.store(stats_row + 1, 0.0)
            tl.store(stats_row + 2, 0.0)
            tl.store(stats_row + 3, 0.0)
    else:
        row_off = n * stride_ln + t * stride_lt
        row_ptr = logits_ptr + row_off
        cols = tl.arange(0, BLOCK_V)
        col = label - vocab_start  # int64: the label's column in this slice
        owned = (col >= 0) & (col < V)
        x_label = tl.load(row_ptr + col * stride_lv, mask=owned, other=0.0).to(tl.float32)
        m = float("-inf")  # running max
        s = 0.0  # running sum of exp(x - m)
        sum_x = 0.0
        s1 = 0.0  # running sum of exp(x - m) * (x - m)
        s2 = 0.0  # running sum of exp(2 (x - m))
        first_tie = V  # the first index v - head with x_v == x_label (V: none seen yet)
        # Vocabulary indices below are relative to the row's first 16-byte boundary (head = 0 with ALIGN = 1),
        # so that the loop's index vector is its offset vector; the label is compared as col - head.
        head = _row_head(row_off, V, ALIGN)
        if ALIGN > 1:
            # The head (< ALIGN logits before the boundary) and the ragged end (< ALIGN after the last whole
            # vector) are one narrow tile of 2 ALIGN lanes; the loop then covers whole 16-byte vectors only,
            # so its mask is constant over each vector and its loads are 16-byte vectors, full tiles or not.
            # One wide fold site: a separate scalar-masked tail tile (16 addresses a thread) beside the
            # statistics' state spilled on sm_90. Both variants take these tiles, so logp and lse with
            # WITH_STATS are bitwise those without.
            n_body = V - head
            n_vec = n_body // ALIGN * ALIGN  # written so that the compiler sees a multiple of ALIGN
            edge = tl.arange(0, 2 * ALIGN)
            edge_idx = tl.where(edge < ALIGN, edge - ALIGN, n_vec + edge - ALIGN)
            edge_valid = tl.where(edge < ALIGN, edge_idx >= -head, edge_idx < n_body)
            # From row_ptr: body_ptr is row_ptr + head only where head was not cut to V (V < ALIGN - 1).
            x_edge = tl.load(row_ptr + (head + edge_idx), mask=edge_valid, other=float("-inf")).to(tl.float32)
            m, s, sum_x, s1, s2, first_tie = _fold_tile(
                x_edge, edge_idx, edge_valid, m, s, sum_x, s1, s2, first_tie, x_label, WITH_STATS
            )
            # (row_off + head) // ALIGN * ALIGN is row_off + head (or head = V: nothing is read past it),
            # written so that the compiler sees a multiple of ALIGN.
            body_ptr = logits_ptr + (row_off + head) // ALIGN * ALIGN
            for start in range(0, n_vec, BLOCK_V):
                offs = start + cols
                valid = offs < n_vec
                x = tl.load(body_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
                m, s, sum_x, s1, s2, first_tie = _fold_tile(
                    x, offs, valid, m, s, sum_x, s1, s2, first_tie, x_label, WITH_STATS
                )
        else:  # a strided vocabulary or a misaligned tensor: no vector loads to win, one masked loop
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                valid = offs < V
                x = tl.load(row_ptr + offs.to(tl.int64) * stride_lv, mask=valid, other=float("-inf"))
                m, s, sum_x, s1, s2, first_tie = _fold_tile(
                    x.to(tl.float32), offs, valid, m, s, sum_x, s1, s2, first_tie, x_label, WITH_STATS
                )
        log_s = tl.log(s)
        tl.store(logp_ptr + row, (x_label - m) - log_s)
        tl.store(lse_ptr + row.to(tl.int64) * 2, m)
        tl.store(lse_ptr + row.to(tl.int64) * 2 + 1, log_s)
        if WITH_STATS:
            # The label is the first index of the maximum iff its logit is the (exact) running max
            # and no earlier logit equals it.
            top1 = owned & (m == x_label) & (first_tie == col - head)
            lse2 = 2.0 * m + tl.log(s2)
            stats_row = stats_ptr + row.to(tl.int64) * 4
            tl.store(stats_row + 0, sum_x)
            tl.store(stats_row + 1, log_s - s1 / s)
            tl.store(stats_row + 2, tl.where(top1, 1.0, 0.0))
            tl.store(stats_row + 3, lse2)


@triton.jit
def token_logps_special_stats_kernel(
    logits_ptr,  # (N, T, V), strides (stride_ln, stride_lt, stride_lv), as for token_logps_fwd_kernel
    lse_ptr,  # (N, T_OUT, 2) fp32 from token_logps_fwd_kernel
    stats_ptr,  # (N, T_OUT, 4) fp32 from token_logps_fwd_kernel: top1 and lse2 rewritten where special
    labels_ptr,  # (N, T) int32 | int64, strides (stride_yn, stride_yt)
    T_OUT,
    V,
    stride_ln,
    stride_lt,
    stride_lv,
    stride_yn,
    stride_yt,
    shift,
    vocab_start,  # the global id of logits column 0, as for token_logps_fwd_kernel
    BLOCK_V: tl.constexpr,
):
    """The statistics of rows with a NaN or +inf logit (log s is NaN; unscored rows hold 0), as
    ``torch.argmax`` and ``torch.logsumexp`` give them: NaN ranks above every value, so top1 is whether
    the label's column (label - vocab_start) is the first NaN; lse2 is NaN with a NaN, else +inf. Such rows
    are rare: a separate pass that reads 4 bytes of every row and the logits of these rows only, so that
    the forward carries no second loop (which cost it stack space on sm_90)."""
    row = tl.program_id(0)
    log_s = tl.load(lse_ptr + row.to(tl.int64) * 2 + 1)
    if log_s != log_s:
        n = (row // T_OUT).to(tl.int64)
        t = (row % T_OUT).to(tl.int64)
        label = tl.load(labels_ptr + n * stride_yn + (t + shift) * stride_yt).to(tl.int64)
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        first_nan = V
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + offs.to(tl.int64) * stride_lv, mask=offs < V, other=0.0)
            first_nan = tl.minimum(first_nan, tl.min(tl.where(z != z, offs, V), axis=0))
        stats_row = stats_ptr + row.to(tl.int64) * 4
        if first_nan < V:
            tl.store(stats_row + 2, tl.where(first_nan == label - vocab_start, 1.0, 0.0))
            tl.store(stats_row + 3, float("nan"))
        else:
            tl.store(stats_row + 3, float("inf"))


@triton.jit
def _grad_tile(x, idx, g, m, log_s, col):
    """g · (onehot(col) − exp((x − m) − log s)) of one tile, fp32 (col outside the slice: no one-hot)."""
    gp = g * tl.exp((x.to(tl.float32) - m) - log_s)
    return tl.where(idx == col, g - gp, -gp)


@triton.jit
def token_logps_bwd_kernel(
    grad_logits_ptr,  # (N, T, V) dtype of the logits, strides (stride_gn, stride_gt, stride_gv); may alias logits
    logits_ptr,  # (N, T, V) fp32 | bf16 | fp16, strides (stride_ln, stride_lt, stride_lv)
    labels_ptr,  # (N, T) int32 | int64, strides (stride_yn, stride_yt)
    grad_tok_ptr,  # (N, T_OUT) fp32, strides (stride_dn, stride_dt); 0-strides of an expand are fine
    lse_ptr,  # (N, T_OUT, 2) fp32, contiguous: (m, log s) per row, this slice's or the whole vocabulary's
    T,
    T_OUT,
    V,
    stride_gn,
    stride_gt,
    stride_gv,
    stride_ln,
    stride_lt,
    stride_lv,
    stride_yn,
    stride_yt,
    stride_dn,
    stride_dt,
    ignore_index,
    shift,
    vocab_start,  # the global id of logits column 0: labels are global ids
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """grad_logits[n, t, v] = g[n, t] * (onehot(label - vocab_start)_v - exp((x_v - m) - log s)), with (m, log s)
    the lse it is given (the one-hot only where the slice owns the label): one read, one write per
    logit (V reads and V writes of the logits' dtype per scored row, V writes per unscored row), the
    softmax formed as the reference's log_softmax backward forms it (m and log s kept apart).

    Masked rows and the unscored last row (with a shift) are written as zeros without reading the
    logits. Each program reads a tile before writing it, so the gradient may overwrite the logits. With
    ALIGN > 1 the launcher has checked that every logits row sits at its gradient row's address modulo
    16 bytes, so one head serves both.
    """
    row = tl.program_id(0)  # over N * T: every logits row gets a gradient row
    n = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    scored = t < T_OUT
    label = tl.load(labels_ptr + n * stride_yn + (t + shift) * stride_yt, mask=scored, other=ignore_index)
    label = label.to(tl.int64)
    out_off = n * stride_gn + t * stride_gt
    out_ptr = grad_logits_ptr + out_off
    cols = tl.arange(0, BLOCK_V)
    head = _row_head(out_off, V, ALIGN)
    out_body = grad_logits_ptr + (out_off + head) // ALIGN * ALIGN
    n_body = V - head
    n_full = n_body // BLOCK_V * BLOCK_V
    tail = n_full + cols < n_body
    dtype = grad_logits_ptr.dtype.element_ty
    if label == ignore_index:
        zeros = tl.zeros([BLOCK_V], dtype=dtype)
        if ALIGN > 1:
            tl.store(out_ptr + cols, zeros, mask=cols < head)
        for start in range(0, n_full, BLOCK_V):
            tl.store(out_body + (start + cols).to(tl.int64) * stride_gv, zeros)
        tl.store(out_body + (n_full + cols).to(tl.int64) * stride_gv, zeros, mask=tail)
    else:
        g = tl.load(grad_tok_ptr + n * stride_dn + t * stride_dt)
        m = tl.load(lse_ptr + (n * T_OUT + t) * 2)
        log_s = tl.load(lse_ptr + (n * T_OUT + t) * 2 + 1)
        col = label - vocab_start  # int64; outside [0, V) it matches no lane: no one-hot
        row_off = n * stride_ln + t * stride_lt
        row_ptr = logits_ptr + row_off
        if ALIGN > 1:
            x = tl.load(row_ptr + cols, mask=cols < head, other=0.0)
            tl.store(out_ptr + cols, _grad_tile(x, cols, g, m, log_s, col).to(dtype), mask=cols < head)
        body_ptr = logits_ptr + (row_off + head) // ALIGN * ALIGN
        for start in range(0, n_full, BLOCK_V):
            offs = start + cols
            x = tl.load(body_ptr + offs.to(tl.int64) * stride_lv)
            grad = _grad_tile(x, head + offs, g, m, log_s, col)
            tl.store(out_body + offs.to(tl.int64) * stride_gv, grad.to(dtype))
        offs = n_full + cols
        x = tl.load(body_ptr + offs.to(tl.int64) * stride_lv, mask=tail, other=0.0)
        grad = _grad_tile(x, head + offs, g, m, log_s, col)
        tl.store(out_body + offs.to(tl.int64) * stride_gv, grad.to(dtype), mask=tail)


# --------------------------------------------------------------------------------------------- launchers

# Real vocabularies (32k-256k) take 4096-element tiles over 8 warps: 16 elements per thread (two
# 128-bit loads of a 16-bit type), enough in flight to saturate HBM without spilling. Toy vocabularies
# take one 1024 tile; two choices keep the set of compiled (and ahead-of-time checked) variants small.
LAUNCH_CONFIGS = ((1024, 4), (4096, 8))  # (BLOCK_V, num_warps)
PACK_BYTES = 16


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) the launchers use for a vocabulary of size V."""
    return LAUNCH_CONFIGS[0] if V <= LAUNCH_CONFIGS[0][0] else LAUNCH_CONFIGS[1]


def row_align(*tensors) -> int:
    """ALIGN for rows of these (N, T, V) tensors. 1 where V and every row stride divide by 16 (the JIT then
    sees 16-byte aligned rows itself, and the plain loop's loads are vectors) or where there is no unit
    vocabulary stride and 16-byte aligned start; else (odd rows, V = 50257 or 32001) the logits per 16
    bytes, provided all their rows sit at the same address modulo 16 bytes (one head serves all)."""
    first = tensors[0]
    V = first.shape[-1]
    if any(x.stride(-1) != 1 or x.data_ptr() % PACK_BYTES for x in tensors):
        return 1
    if V % 16 == 0 and all(x.stride(d) % 16 == 0 for x in tensors for d in (0, 1)):
        return 1
    align = PACK_BYTES // first.element_size()
    for x in tensors:
        for dim in (0, 1):
            if x.shape[dim] > 1 and (x.stride(dim) - first.stride(dim)) % align:
                return 1
    return align


def token_logps_fwd(logits, labels, ignore_index: int, shift: bool, with_stats: bool = False, *, vocab_start: int = 0):
    """(logp, lse, stats): logp (N, T - shift) fp32; lse (N, T - shift, 2) fp32, the log-sum-exp as
    (row max, log of the sum); stats (N, T - shift, 4) fp32 with ``with_stats`` (columns of
    reference.STATS, from the same pass over the logits), else (N, T - shift, 0). The logits are the
    columns [vocab_start, vocab_start + V) of the vocabulary and the labels global ids; a row whose label
    the slice does not own is scored with label logit 0."""
    N, T, V = logits.shape
    t_out = max(T - int(shift), 0)
    logp = torch.empty((N, t_out), dtype=torch.float32, device=logits.device)
    lse = torch.empty((N, t_out, 2), dtype=torch.float32, device=logits.device)
    stats = torch.empty((N, t_out, 4 if with_stats else 0), dtype=torch.float32, device=logits.device)
    if N * t_out == 0:
        return logp, lse, stats
    block, warps = launch_config(V)
    token_logps_fwd_kernel[(N * t_out,)](
        logits, labels, logp, lse,
        stats if with_stats else lse,  # never touched without stats: any valid pointer will do
        t_out, V,
        *logits.stride(), *labels.stride(),
        ignore_index, int(shift), int(vocab_start),
        BLOCK_V=block, WITH_STATS=bool(with_stats), ALIGN=row_align(logits), num_warps=warps,
    )  # fmt: skip
    if with_stats:
        token_logps_special_stats_kernel[(N * t_out,)](
            logits, lse, stats, labels, t_out, V, *logits.stride(), *labels.stride(), int(shift), int(vocab_start),
            BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return logp, lse, stats


def token_logps_bwd(grad_tok, logits, labels, lse, ignore_index: int, shift: bool, out=None, *, vocab_start: int = 0):
    """g · (onehot − exp((z − C) − log S)) with (C, log S) = lse the two parts it is given, the one-hot only
    where the slice [vocab_start, vocab_start + V) owns the global label; zeros on unscored rows. In a new
    tensor or, with ``out=logits``, in the logits' storage."""
    out = torch.empty_like(logits) if out is None else out
    N, T, V = logits.shape
    t_out = max(T - int(shift), 0)
    if N * t_out == 0:  # nothing is scored; also keeps empty (null-pointer) tensors out of the launch
        return out.zero_()
    block, warps = launch_config(V)
    token_logps_bwd_kernel[(N * T,)](
        out, logits, labels, grad_tok, lse,
        T, t_out, V,
        *out.stride(), *logits.stride(), *labels.stride(), *grad_tok.stride(),
        ignore_index, int(shift), int(vocab_start),
        BLOCK_V=block, ALIGN=row_align(out, logits), num_warps=warps,
    )  # fmt: skip
    return out
