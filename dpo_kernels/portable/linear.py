"""Portable fused LM head + log-probs: chunked torch matmuls, never an (M, V) logits buffer.

Rows are the compacted scored rows (every row has a label). Logits are formed a (rows × vocabulary)
chunk at a time, at most ``CHUNK_ELEMENTS`` fp32 values, folded into an online log-sum-exp in the
forward and recomputed in the backward, where each chunk's ``dz`` is consumed at once by the three
gradient matmuls. Accumulation is fp32 (fp64 for fp64 inputs); gradients are cast at the end.

Transform (see ``dpo_kernels.reference.lm_head_logits``):
    z = (h·Wᵀ + b)·logit_scale;  z = softcap·tanh(z / softcap) if softcap;  z = z / temperature
"""

import torch

# 2^22 fp32 logits = 16 MiB per chunk. Row chunks stay tall enough (131 rows at V = 32000) that the
# matmuls stay compute-bound although every row chunk streams the whole weight matrix once.
CHUNK_ELEMENTS = 1 << 22
# A vocabulary chunk of at most this many columns keeps row chunks tall when V is 128k-256k.
MAX_VOCAB_CHUNK = 32768


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(M: int, V: int, chunk_elements: int):
    """(row slice, vocabulary slice) pairs covering (M, V), row chunks outermost."""
    cols = max(1, min(V, MAX_VOCAB_CHUNK, chunk_elements))
    rows = max(1, chunk_elements // cols)
    for r in range(0, M, rows):
        for c in range(0, V, cols):
            yield slice(r, min(r + rows, M)), slice(c, min(c + cols, V))


def _logits(h, weight, bias, vocab, logit_scale, softcap, temperature, acc):
    """z for one chunk, and tanh(·) of the pre-cap values when softcapping (the backward needs it)."""
    z = h @ weight[vocab].to(acc).T
    if bias is not None:
        z += bias[vocab].to(acc)
    if logit_scale != 1.0:
        z *= logit_scale
    capped = None
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    if temperature != 1.0:
        z /= temperature
    return z, capped


def fused_linear_logps_fwd(hidden, weight, bias, labels, logit_scale, softcap, temperature, chunk_elements=None):
    """hidden (M, H), weight (V, H), bias (V,) | None, labels (M,) in [0, V) -> (logp, lse), (M,) fp32."""
    M, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    h = hidden.to(acc)
    m = torch.full((M,), float("-inf"), dtype=acc, device=hidden.device)
    s = torch.zeros(M, dtype=acc, device=hidden.device)
    label_logit = torch.zeros(M, dtype=acc, device=hidden.device)
    for rows, vocab in _chunks(M, V, chunk_elements or CHUNK_ELEMENTS):
        z, _ = _logits(h[rows], weight, bias, vocab, logit_scale, softcap, temperature, acc)
        y = labels[rows] - vocab.start
        hit = (y >= 0) & (y < z.shape[1])
        picked = z.gather(1, y.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
        label_logit[rows] += torch.where(hit, picked, 0.0)
        m_new = torch.maximum(m[rows], z.amax(dim=1))
        pivot = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows of -inf so far: exp(-inf) = 0, not NaN
        s[rows] = s[rows] * torch.exp(m[rows] - pivot) + z.sub_(pivot.unsqueeze(1)).exp_().sum(dim=1)
        m[rows] = m_new
    lse = torch.where(torch.isinf(m), m, m + s.log())
    return label_logit - lse, lse


def fused_linear_logps_bwd(
    grad, hidden, weight, bias, labels, lse, logit_scale, softcap, temperature, chunk_elements=None
):
    """-> (d_hidden (M, H) in hidden's dtype, d_weight (V, H) in weight's dtype, d_bias (V,) | None).

    dz = g·(onehot(label) − softmax(z)), chained back through the transform; d_hidden = dz·W,
    d_weight = dzᵀ·h, d_bias = Σ_rows dz, chunk by chunk.
    """
    M, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    h = hidden.to(acc)
    g = grad.to(acc)
    d_hidden = torch.zeros(M, hidden.shape[1], dtype=acc, device=hidden.device)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = torch.zeros(V, dtype=acc, device=weight.device) if bias is not None else None
    for rows, vocab in _chunks(M, V, chunk_elements or CHUNK_ELEMENTS):
        z, capped = _logits(h[rows], weight, bias, vocab, logit_scale, softcap, temperature, acc)
        dz = z.sub_(lse[rows].to(acc).unsqueeze(1)).exp_().mul_(-g[rows].unsqueeze(1))
        y = labels[rows] - vocab.start
        hit = ((y >= 0) & (y < dz.shape[1])).nonzero().squeeze(1)
        dz[hit, y[hit]] += g[rows][hit]
        if temperature != 1.0:
            dz /= temperature
        if capped is not None:
            dz *= 1 - capped.square_()
        if logit_scale != 1.0:
            dz *= logit_scale
        d_hidden[rows].addmm_(dz, weight[vocab].to(acc))  # accumulate in place: no (rows, H) or
        d_weight[vocab].addmm_(dz.T, h[rows])  # (V_chunk, H) temporaries
        if d_bias is not None:
            d_bias[vocab] += dz.sum(dim=0)
    return (
        d_hidden.to(hidden.dtype),
        d_weight.to(weight.dtype),
        d_bias.to(bias.dtype) if d_bias is not None else None,
    )
