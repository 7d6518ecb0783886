"""Triton kernels: per-token log-probs of the labels and their gradient w.r.t. the logits.

One program handles one token row of the logits, so nothing of size (N, T, V) is stored besides
the logits and their gradient. The next-token shift is index arithmetic: logits row ``t`` is scored
against label ``t + SHIFT``; with a shift the last logits row predicts nothing and gets a zero gradient.
All offsets are formed in int64 because N·T·V passes 2^31 at real sizes.
"""

import torch
import triton
import triton.language as tl


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
    BLOCK_V: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    """logp = (x[label] - m) - log s, m = max_v x_v, s = sum_v exp(x_v - m), online over V tiles.

    The log-sum-exp m + log s is stored as its two parts, never rounded to one fp32 value: the backward
    forms exp((x - m) - log s) as the reference's log_softmax does, where exp(x - fl(m + log s)) would
    carry the rounding of the sum (|lse| · 2^-24, 6e-5 relative at logits of size 1000).

    Rows whose label is ``ignore_index`` write zeros and never read their logits. A label outside
    [0, V) writes NaN instead of reading out of bounds (the Python side rejects it first).
    Special values come out as in the reference: a NaN or +inf logit makes s NaN (exp(NaN), exp(inf -
    inf)), so log s, the log-prob and the backward's whole row are NaN; an all -inf row has m = -inf and
    s = 0, so x[label] - m is NaN.

    With ``WITH_STATS`` the same tile loop also keeps, rescaled with the running max m like the sum
    s = sum_v exp(x_v - m):
      sum_x = sum_v x_v;
      s1 = sum_v exp(x_v - m) * (x_v - m), so entropy = lse - sum_v p_v x_v = log(s) - s1 / s: both
        terms are >= 0, nothing cancels (unlike lse - sum_v p_v x_v when the logits are large);
      s2 = sum_v exp(2 (x_v - m)), so lse2 = log sum_v exp(2 x_v) = 2 m + log(s2);
      top-1 without an argmax: the label is the first index of the maximum iff x_label equals the
        running max m and the first v with x_v == x_label is the label (exact on the stored values).
    Logits at -inf (banned tokens) add -inf to sum_x and nothing to s1 or s2. A row with a NaN or +inf
    logit (s is NaN) is read once more for the reference's top-1 and lse2, which ``torch.argmax`` and
    ``torch.logsumexp`` give as: NaN ranks above every value; lse2 is NaN with a NaN, else +inf.
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
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        cols = tl.arange(0, BLOCK_V)
        m = float("-inf")  # running max
        s = 0.0  # running sum of exp(x - m)
        x_label = 0.0
        if WITH_STATS:
            # The label's logit, read once before the loop (the top-1 test needs it in every tile).
            x_label = tl.load(row_ptr + label * stride_lv, mask=(label >= 0) & (label < V), other=0.0)
            x_label = x_label.to(tl.float32)
            sum_x = 0.0
            s1 = 0.0  # running sum of exp(x - m) * (x - m)
            s2 = 0.0  # running sum of exp(2 (x - m))
            first_tie = V  # the first index v with x_v == x_label (V: none seen yet)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs.to(tl.int64) * stride_lv, mask=offs < V, other=float("-inf"))
            x = x.to(tl.float32)
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
                sum_x += tl.sum(tl.where(offs < V, x, 0.0), axis=0)
                # Masked lanes are -inf at offs >= V > label: even when x_label is -inf they cannot
                # move the first tie below the label.
                first_tie = tl.minimum(first_tie, tl.min(tl.where(x == x_label, offs, V), axis=0))
                m = m_new
            else:
                s = s * tl.exp(m - pivot) + tl.sum(tl.exp(x - pivot), axis=0)
                m = m_new
                x_label += tl.sum(tl.where(offs == label, x, 0.0), axis=0)
        log_s = tl.log(s)
        in_range = (label >= 0) & (label < V)
        tl.store(logp_ptr + row, tl.where(in_range, (x_label - m) - log_s, float("nan")))
        tl.store(lse_ptr + row.to(tl.int64) * 2, m)
        tl.store(lse_ptr + row.to(tl.int64) * 2 + 1, log_s)
        if WITH_STATS:
            # The label is the first index of the maximum iff its logit is the (exact) running max
            # and no earlier logit equals it.
            top1 = in_range & (m == x_label) & (first_tie == label)
            lse2 = 2.0 * m + tl.log(s2)
            if s != s:  # a NaN or +inf logit: rare, so found by a second read rather than in the loop
                first_nan = V
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    x = tl.load(row_ptr + offs.to(tl.int64) * stride_lv, mask=offs < V, other=0.0)
                    first_nan = tl.minimum(first_nan, tl.min(tl.where(x != x, offs, V), axis=0))
                top1 = tl.where(first_nan < V, first_nan == label, top1)
                lse2 = tl.where(first_nan < V, float("nan"), float("inf"))
            stats_row = stats_ptr + row.to(tl.int64) * 4
            tl.store(stats_row + 0, sum_x)
            tl.store(stats_row + 1, log_s - s1 / s)
            tl.store(stats_row + 2, tl.where(top1, 1.0, 0.0))
            tl.store(stats_row + 3, lse2)


@triton.jit
def token_logps_bwd_kernel(
    grad_logits_ptr,  # (N, T, V) dtype of the logits, strides (stride_gn, stride_gt, stride_gv); may alias logits
    logits_ptr,  # (N, T, V) fp32 | bf16 | fp16, strides (stride_ln, stride_lt, stride_lv)
    labels_ptr,  # (N, T) int32 | int64, strides (stride_yn, stride_yt)
    grad_tok_ptr,  # (N, T_OUT) fp32, strides (stride_dn, stride_dt); 0-strides of an expand are fine
    lse_ptr,  # (N, T_OUT, 2) fp32, contiguous, from the forward: (m, log s) per row
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
    BLOCK_V: tl.constexpr,
):
    """grad_logits[n, t, v] = g[n, t] * (onehot(label)_v - exp((x_v - m) - log s)): one read, one write per
    logit, the softmax formed as the reference's log_softmax backward forms it (m and log s kept apart).

    Masked rows and the unscored last row (with a shift) are written as zeros without reading the
    logits. Each program reads a tile before writing it, so the gradient may overwrite the logits.
    """
    row = tl.program_id(0)  # over N * T: every logits row gets a gradient row
    n = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    scored = t < T_OUT
    label = tl.load(labels_ptr + n * stride_yn + (t + shift) * stride_yt, mask=scored, other=ignore_index)
    label = label.to(tl.int64)
    out_ptr = grad_logits_ptr + n * stride_gn + t * stride_gt
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        zeros = tl.zeros([BLOCK_V], dtype=grad_logits_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(out_ptr + offs.to(tl.int64) * stride_gv, zeros, mask=offs < V)
    else:
        g = tl.load(grad_tok_ptr + n * stride_dn + t * stride_dt)
        m = tl.load(lse_ptr + (n * T_OUT + t) * 2)
        log_s = tl.load(lse_ptr + (n * T_OUT + t) * 2 + 1)
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs.to(tl.int64) * stride_lv, mask=offs < V, other=0.0)
            gp = g * tl.exp((x.to(tl.float32) - m) - log_s)
            grad = tl.where(offs == label, g - gp, -gp)
            tl.store(out_ptr + offs.to(tl.int64) * stride_gv, grad.to(grad_logits_ptr.dtype.element_ty), mask=offs < V)


# --------------------------------------------------------------------------------------------- launchers

# Real vocabularies (32k-256k) take 4096-element tiles over 8 warps: 16 elements per thread (two
# 128-bit loads of a 16-bit type), enough in flight to saturate HBM without spilling. Toy vocabularies
# take one 1024 tile; two choices keep the set of compiled (and ahead-of-time checked) variants small.
LAUNCH_CONFIGS = ((1024, 4), (4096, 8))  # (BLOCK_V, num_warps)


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) the launchers use for a vocabulary of size V."""
    return LAUNCH_CONFIGS[0] if V <= LAUNCH_CONFIGS[0][0] else LAUNCH_CONFIGS[1]


def token_logps_fwd(logits, labels, ignore_index: int, shift: bool, with_stats: bool = False):
    """(logp, lse, stats): logp (N, T - shift) fp32; lse (N, T - shift, 2) fp32, the log-sum-exp as
    (row max, log of the sum); stats (N, T - shift, 4) fp32 with ``with_stats`` (columns of
    reference.STATS, from the same pass over the logits), else (N, T - shift, 0)."""
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
        ignore_index, int(shift),
        BLOCK_V=block, WITH_STATS=bool(with_stats), num_warps=warps,
    )  # fmt: skip
    return logp, lse, stats


def token_logps_bwd(grad_tok, logits, labels, lse, ignore_index: int, shift: bool, out=None):
    """The gradient w.r.t. the logits, in a new tensor or, with ``out=logits``, in the logits' storage."""
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
        ignore_index, int(shift),
        BLOCK_V=block, num_warps=warps,
    )  # fmt: skip
    return out
