"""Portable backend: the same two kernels as the Triton ones, in chunked PyTorch.

Only scored rows (label != ignore_index) are visited, a bounded chunk of them at a time, so the
temporaries never exceed ``CHUNK_ELEMENTS`` logits (times a small constant) whatever N, T and V are.
fp64 logits are computed in fp64 (that is what makes the fp64 gradcheck meaningful); every other
dtype in fp32.
"""

import torch

# 2^19 fp32 logits = 2 MiB per temporary: a chunk and its exponentials stay in this CPU's L2/L3 and the
# extra memory stays a few percent of any realistic logits tensor.
CHUNK_ELEMENTS = 1 << 19


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scored_rows(labels: torch.Tensor, ignore_index: int, shift: bool, T_out: int):
    """(n, t) indices of the logits rows that are scored, and the chunk length in rows."""
    y = labels[:, int(shift) : int(shift) + T_out]
    n_idx, t_idx = (y != ignore_index).nonzero(as_tuple=True)
    return n_idx, t_idx, y


def _row_chunks(n_rows: int, V: int):
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def token_logps_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    N, T, V = logits.shape
    T_out = max(T - int(shift), 0)
    acc = _acc_dtype(logits.dtype)
    logp = logits.new_zeros((N, T_out), dtype=acc)
    lse = logits.new_zeros((N, T_out), dtype=acc)
    n_idx, t_idx, y = _scored_rows(labels, ignore_index, shift, T_out)
    for rows in _row_chunks(n_idx.numel(), V):
        n, t = n_idx[rows], t_idx[rows]
        x = logits[n, t].to(acc)  # (rows, V): the only copy, bounded by the chunk
        row_lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(1, y[n, t].long().unsqueeze(1)).squeeze(1)
        logp[n, t] = picked - row_lse
        lse[n, t] = row_lse
    return logp, lse


def token_logps_bwd(grad_tok, logits, labels, lse, ignore_index: int, shift: bool, out: torch.Tensor):
    """grad = g * (onehot(label) - exp(x - lse)) on scored rows, zeros elsewhere, written into ``out``.

    Each chunk is copied out of the logits before its gradient is written back, so ``out`` may be
    ``logits`` itself (the in-place mode).
    """
    N, T, V = logits.shape
    T_out = max(T - int(shift), 0)
    acc = _acc_dtype(logits.dtype)
    n_idx, t_idx, y = _scored_rows(labels, ignore_index, shift, T_out)
    unscored = torch.ones((N, T), dtype=torch.bool, device=logits.device)
    unscored[n_idx, t_idx] = False
    out[unscored] = 0
    for rows in _row_chunks(n_idx.numel(), V):
        n, t = n_idx[rows], t_idx[rows]
        g = grad_tok[n, t].to(acc).unsqueeze(1)
        grad = torch.exp(logits[n, t].to(acc) - lse[n, t].unsqueeze(1))
        grad.mul_(-g)
        grad.scatter_add_(1, y[n, t].long().unsqueeze(1), g)
        out[n, t] = grad.to(out.dtype)
    return out
