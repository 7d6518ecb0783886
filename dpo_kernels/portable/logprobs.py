"""Portable backend: the same two kernels as the Triton ones, in chunked PyTorch.

Only scored rows (label != ignore_index) are visited, a bounded chunk at a time, so temporaries never
exceed ``CHUNK_ELEMENTS`` values whatever N, T and V are. The forward puts each chunk through ATen's
fused, vectorized ``log_softmax``, the backward through in-place elementwise passes from the lse it is
given; both read 16-bit logits directly and compute in fp32 (fp64 for fp64 logits, which is what makes
the fp64 gradcheck meaningful).

The logits may be the columns [vocab_start, vocab_start + V) of a larger vocabulary, with global labels:
a row whose label lies outside the slice is scored with label logit 0 (and no one-hot in the backward).

When the (N, T) token grid of the logits can be viewed as one row dimension (any batch-major layout,
including ``logits[:, :-1]`` of a longer tensor) a chunk is a slice of consecutive rows and costs no
copy; otherwise (e.g. a time-major batch) the chunk's rows are gathered into a bounded buffer.
"""

import torch

# 2^19 fp32 values = 2 MiB: a chunk's softmax stays in this CPU's caches, and the extra memory stays a
# few percent of any realistic logits tensor. The buffer is allocated once per call and reused: a
# fresh multi-MiB tensor per chunk is a fresh mmap whose page faults cost more than the softmax.
CHUNK_ELEMENTS = 1 << 19


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_view(x: torch.Tensor):
    """x (N, T, V) as an (N·T, V) view whose row n·T + t is x[n, t], or None if no such view exists."""
    N, T, V = x.shape
    if N > 1 and x.stride(0) != T * x.stride(1):
        return None
    return x.as_strided((N * T, V), (x.stride(1), x.stride(2)))


def _scored(labels: torch.Tensor, ignore_index: int, shift: bool, T: int, V: int, vocab_start: int):
    """(N, T) per logits row: whether it is scored, its label as a column of the slice (clamped into [0, V),
    so that a gather never leaves the row) and whether the slice [vocab_start, vocab_start + V) owns it."""
    N = labels.shape[0]
    scored = torch.zeros((N, T), dtype=torch.bool, device=labels.device)
    column = torch.zeros((N, T), dtype=torch.long, device=labels.device)
    owned = torch.zeros((N, T), dtype=torch.bool, device=labels.device)
    T_out = max(T - int(shift), 0)
    y = labels[:, int(shift) : int(shift) + T_out]
    scored[:, :T_out] = y != ignore_index
    local = y.long() - vocab_start
    owned[:, :T_out] = scored[:, :T_out] & (local >= 0) & (local < V)
    column[:, :T_out] = local.clamp_(0, max(V - 1, 0))
    return scored, column, owned


def _runs(mask: torch.Tensor):
    """(start, stop) bounds of the runs of consecutive flat row ids where ``mask`` holds.

    In a DPO batch the completion rows of a sequence form one run, its prompt and padding another.
    """
    ids = mask.flatten().nonzero().squeeze(1)
    if ids.numel() == 0:
        return []
    breaks = (ids.diff() != 1).nonzero().squeeze(1) + 1
    bounds = torch.cat([ids.new_zeros(1), breaks, ids.new_full((1,), ids.numel())]).tolist()
    starts = ids[bounds[:-1]].tolist()
    return [(start, start + hi - lo) for start, lo, hi in zip(starts, bounds[:-1], bounds[1:])]


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _chunks(mask: torch.Tensor, V: int):
    """The runs of ``mask`` cut into slices of at most ``_chunk_rows(V)`` rows."""
    step = _chunk_rows(V)
    for first, stop in _runs(mask):
        for start in range(first, stop, step):
            yield start, min(start + step, stop)


def _gather_chunks(mask: torch.Tensor, V: int):
    """For layouts without a row view: (n, t) index tensors of at most CHUNK_ELEMENTS // V rows."""
    n_idx, t_idx = mask.nonzero(as_tuple=True)
    step = _chunk_rows(V)
    for start in range(0, n_idx.numel(), step):
        yield n_idx[start : start + step], t_idx[start : start + step]


def token_logps_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    shift: bool,
    with_stats: bool = False,
    *,
    vocab_start: int = 0,
):
    """Per scored row z = logits[n, t] (the columns [vocab_start, vocab_start + V) of a larger vocabulary)
    with global label y: lse[n, t] = (c, log s), c = max_v z_v and s = Σ_v exp(z_v − c) over the slice, and
    logp[n, t] = (z[y − vocab_start] − c) − log s where the slice owns y, else (0 − c) − log s (label logit
    0: the row is another slice's, finite, nothing read out of the row); with ``with_stats`` also
    stats[n, t] = the columns of ``reference.STATS`` over the slice (else a (N, T_out, 0) tensor), top1 = 1
    only where the slice owns y. Unscored rows are zeros.

    ATen's fused log_softmax forms (z − c) − log s with c the row max, so its value at the max is exactly
    −log s: c = amax z and log s = −amax log_softmax(z) are the exact parts, for two reductions rather than
    a second exp pass, and the owned log-probs are the gathered log_softmax, (z_y − c) − log s.

    The statistics come from the same chunk: Σ z and the first maximum (``max``, which ranks NaN first
    as the reference's argmax does) from the logits, then, with p the softmax written over the
    log-softmax buffer, lse2 = 2·(c + log s) + log Σ p² and the entropy Σ −p·log p (``special.entr``, 0 at
    p = 0, so banned tokens at −inf add nothing). All in the accumulation dtype. Where the row max is not
    finite (a NaN or +inf logit, an all −inf row) lse2 is that max, as ``torch.logsumexp`` gives it.
    """
    N, T, V = logits.shape
    T_out = max(T - int(shift), 0)
    acc = _acc_dtype(logits.dtype)
    scored, column, owned = _scored(labels, ignore_index, shift, T, V, vocab_start)
    logp = logits.new_zeros((N, T), dtype=acc)
    lse = logits.new_zeros((N, T, 2), dtype=acc)
    stats = logits.new_zeros((N, T, 4 if with_stats else 0), dtype=acc)
    buffer = logits.new_empty((min(_chunk_rows(V), N * T), V), dtype=acc)

    def score(x, y, mine):  # x: (rows, V) logits, y: label columns, mine: owned -> (logp, lse[, stats])
        log_probs = buffer[: x.shape[0]]
        # 16-bit logits are converted once into the buffer and reduced there in place: ATen's own
        # conversion would be a fresh tensor per chunk, and its reductions run faster on fp32.
        z = x if x.dtype == acc else log_probs.copy_(x)
        if with_stats:
            sum_logits = z.sum(-1)
            c, first_max = z.max(-1)  # the first index of the maximum, a NaN's if there is one
        else:
            c = z.amax(-1)
        torch.log_softmax(z, dim=-1, out=log_probs)
        log_s = log_probs.amax(-1).neg_()
        row_logp = torch.where(mine, log_probs.gather(1, y.unsqueeze(1)).squeeze(1), c.neg() - log_s)
        parts = torch.stack([c, log_s], dim=-1)
        if not with_stats:
            return row_logp, parts
        top1 = (mine & (first_max == y)).to(acc)
        p = log_probs.exp_()
        lse2 = 2 * (c + log_s) + torch.linalg.vecdot(p, p).log()
        lse2 = torch.where(c.isfinite(), lse2, c)
        entropy = torch.special.entr(p, out=p).sum(-1)
        return row_logp, parts, torch.stack([sum_logits, entropy, top1, lse2], dim=-1)

    rows = _row_view(logits)
    if rows is not None:
        flat_logp, flat_lse = logp.view(-1), lse.view(N * T, 2)
        flat_column, flat_owned = column.view(-1), owned.view(-1)
        flat_stats = stats.view(N * T, stats.shape[-1])
        for a, b in _chunks(scored, V):
            flat_logp[a:b], flat_lse[a:b], *rest = score(rows[a:b], flat_column[a:b], flat_owned[a:b])
            if with_stats:
                flat_stats[a:b] = rest[0]
    else:
        for n, t in _gather_chunks(scored, V):
            logp[n, t], lse[n, t], *rest = score(logits[n, t], column[n, t], owned[n, t])
            if with_stats:
                stats[n, t] = rest[0]
    return logp[:, :T_out].contiguous(), lse[:, :T_out].contiguous(), stats[:, :T_out].contiguous()


def token_logps_bwd(grad_tok, logits, labels, lse, ignore_index: int, shift: bool, out=None, *, vocab_start: int = 0):
    """grad = g · (onehot(y) − exp((z − C) − log S)) on scored rows, zeros elsewhere, in a new tensor or, with
    ``out=logits``, in the logits' storage. (C, log S) = lse[n, t] are the two parts it is given (this
    slice's own from the forward, or the whole vocabulary's when the logits are a slice of it), and the
    one-hot is there only where the slice [vocab_start, vocab_start + V) owns the global label y.

    The parts are subtracted one at a time, as the reference's log_softmax forms them: exp(z − fl(C + log S))
    would carry the rounding of the sum (|lse| · 2^-24 relative). Each chunk's gradient is formed in place
    in a separate fp32 (fp64) buffer, one pass per operation over a chunk that stays in cache, before it is
    stored, so ``out`` may be ``logits`` itself (the in-place mode).
    """
    out = torch.empty_like(logits) if out is None else out
    N, T, V = logits.shape
    T_out = max(T - int(shift), 0)
    acc = _acc_dtype(logits.dtype)
    scored, column, owned = _scored(labels, ignore_index, shift, T, V, vocab_start)
    g = grad_tok.new_zeros((N, T), dtype=acc)
    g[:, :T_out] = grad_tok
    parts = lse.new_zeros((N, T, 2), dtype=acc)
    parts[:, :T_out] = lse
    g_owned = torch.where(owned, g, 0.0)  # the one-hot's weight: 0 where another slice holds the label
    buffer = logits.new_empty((min(_chunk_rows(V), N * T), V), dtype=acc)

    def gradient(x, y, g_rows, g_hot, c_log_s):
        grad = buffer[: x.shape[0]]
        if x.dtype == acc:
            torch.sub(x, c_log_s[:, :1], out=grad)
        else:  # a plain conversion and an fp32 subtraction run faster than one mixed-dtype subtraction
            grad.copy_(x).sub_(c_log_s[:, :1])
        grad.sub_(c_log_s[:, 1:]).exp_().mul_(-g_rows.unsqueeze(1))
        return grad.scatter_add_(1, y.unsqueeze(1), g_hot.unsqueeze(1))

    rows, out_rows = _row_view(logits), _row_view(out)
    if rows is not None and out_rows is not None:
        flat_g, flat_hot, flat_column, flat_parts = g.view(-1), g_owned.view(-1), column.view(-1), parts.view(-1, 2)
        for a, b in _runs(~scored):
            out_rows[a:b].zero_()
        for a, b in _chunks(scored, V):
            out_rows[a:b].copy_(gradient(rows[a:b], flat_column[a:b], flat_g[a:b], flat_hot[a:b], flat_parts[a:b]))
    else:
        out[~scored] = 0
        for n, t in _gather_chunks(scored, V):
            out[n, t] = gradient(logits[n, t], column[n, t], g[n, t], g_owned[n, t], parts[n, t]).to(out.dtype)
    return out
