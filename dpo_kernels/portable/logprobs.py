"""Portable backend: the same two kernels as the Triton ones, in chunked PyTorch.

Only scored rows (label != ignore_index) are visited, a bounded chunk at a time, so temporaries never
exceed ``CHUNK_ELEMENTS`` values whatever N, T and V are. Each chunk goes through ATen's fused,
vectorized ``log_softmax`` / ``softmax`` kernels, which read 16-bit logits directly and accumulate in
fp32 (fp64 for fp64 logits, which is what makes the fp64 gradcheck meaningful).

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


def _scored(labels: torch.Tensor, ignore_index: int, shift: bool, T: int):
    """Boolean (N, T) mask of the logits rows that are scored, and the label of each logits row."""
    N = labels.shape[0]
    scored = torch.zeros((N, T), dtype=torch.bool, device=labels.device)
    target = torch.zeros((N, T), dtype=torch.long, device=labels.device)
    T_out = max(T - int(shift), 0)
    y = labels[:, int(shift) : int(shift) + T_out]
    scored[:, :T_out] = y != ignore_index
    target[:, :T_out] = y.masked_fill(y == ignore_index, 0)
    return scored, target


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
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool, with_stats: bool = False
):
    """logp[n, t] = log_softmax(logits[n, t])[label] and the log-sum-exp in the two-part form of the other
    backends, lse[n, t] = (c, log Σ exp(z − c)), here with c = logits[n, t, label] − logp[n, t] itself and
    0 (this backend's backward recomputes the softmax and reads no lse); with ``with_stats`` also
    stats[n, t] = the columns of ``reference.STATS`` (else a (N, T_out, 0) tensor).

    The statistics come from the same chunk: Σ z and the first maximum (``max``, which ranks NaN first
    as the reference's argmax does) from the logits, then, with p the softmax written over the
    log-softmax buffer, lse2 = 2·lse + log Σ p² and the entropy Σ −p·log p (``special.entr``, 0 at p = 0,
    so banned tokens at −inf add nothing). All in the accumulation dtype. Where the row max is not
    finite (a NaN or +inf logit, an all −inf row) lse2 is that max, as ``torch.logsumexp`` gives it.
    """
    N, T, V = logits.shape
    T_out = max(T - int(shift), 0)
    acc = _acc_dtype(logits.dtype)
    scored, target = _scored(labels, ignore_index, shift, T)
    logp = logits.new_zeros((N, T), dtype=acc)
    lse = logits.new_zeros((N, T, 2), dtype=acc)
    stats = logits.new_zeros((N, T, 4 if with_stats else 0), dtype=acc)
    buffer = logits.new_empty((min(_chunk_rows(V), N * T), V), dtype=acc)

    def score(x, y):  # x: (rows, V) logits, y: (rows,) labels -> (logp, lse[, stats]) of those rows
        x_label = x.gather(1, y.unsqueeze(1)).squeeze(1).to(acc)
        log_probs = torch.log_softmax(x, dim=-1, dtype=acc, out=buffer[: x.shape[0]])
        row_logp = log_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        row_lse = x_label - row_logp
        parts = torch.stack([row_lse, torch.zeros_like(row_lse)], dim=-1)
        if not with_stats:
            return row_logp, parts
        sum_logits = x.sum(-1, dtype=acc)
        row_max, first_max = x.max(-1)  # the first index of the maximum, a NaN's if there is one
        top1 = (first_max == y).to(acc)
        p = log_probs.exp_()
        lse2 = 2 * row_lse + torch.linalg.vecdot(p, p).log()
        row_max = row_max.to(acc)
        lse2 = torch.where(row_max.isfinite(), lse2, row_max)
        entropy = torch.special.entr(p, out=p).sum(-1)
        return row_logp, parts, torch.stack([sum_logits, entropy, top1, lse2], dim=-1)

    rows = _row_view(logits)
    if rows is not None:
        flat_logp, flat_lse, flat_target = logp.view(-1), lse.view(N * T, 2), target.view(-1)
        flat_stats = stats.view(N * T, stats.shape[-1])
        for a, b in _chunks(scored, V):
            flat_logp[a:b], flat_lse[a:b], *rest = score(rows[a:b], flat_target[a:b])
            if with_stats:
                flat_stats[a:b] = rest[0]
    else:
        for n, t in _gather_chunks(scored, V):
            logp[n, t], lse[n, t], *rest = score(logits[n, t], target[n, t])
            if with_stats:
                stats[n, t] = rest[0]
    return logp[:, :T_out].contiguous(), lse[:, :T_out].contiguous(), stats[:, :T_out].contiguous()


def token_logps_bwd(grad_tok, logits, labels, lse, ignore_index: int, shift: bool, out=None):
    """grad = g · (onehot(label) − softmax(logits)) on scored rows, zeros elsewhere, in a new tensor or,
    with ``out=logits``, in the logits' storage.

    The softmax is recomputed by ATen's fused kernel rather than as exp(x − lse): one vectorized pass
    instead of three. Each chunk's gradient is formed in a separate buffer before it is stored, so
    ``out`` may be ``logits`` itself (the in-place mode).
    """
    out = torch.empty_like(logits) if out is None else out
    N, T, V = logits.shape
    T_out = max(T - int(shift), 0)
    acc = _acc_dtype(logits.dtype)
    scored, target = _scored(labels, ignore_index, shift, T)
    g = grad_tok.new_zeros((N, T), dtype=acc)
    g[:, :T_out] = grad_tok
    buffer = logits.new_empty((min(_chunk_rows(V), N * T), V), dtype=acc)

    def gradient(x, y, g_rows):
        grad = torch.softmax(x, dim=-1, dtype=acc, out=buffer[: x.shape[0]])
        grad.mul_(-g_rows.unsqueeze(1))
        return grad.scatter_add_(1, y.unsqueeze(1), g_rows.unsqueeze(1))

    rows, out_rows = _row_view(logits), _row_view(out)
    if rows is not None and out_rows is not None:
        flat_g, flat_target = g.view(-1), target.view(-1)
        for a, b in _runs(~scored):
            out_rows[a:b].zero_()
        for a, b in _chunks(scored, V):
            out_rows[a:b].copy_(gradient(rows[a:b], flat_target[a:b], flat_g[a:b]))
    else:
        out[~scored] = 0
        for n, t in _gather_chunks(scored, V):
            out[n, t] = gradient(logits[n, t], target[n, t], g[n, t]).to(out.dtype)
    return out
