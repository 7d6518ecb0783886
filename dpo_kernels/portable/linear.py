"""Portable fused LM head + log-probs: chunked torch matmuls, never an (M, V) logits buffer.

Rows are the compacted scored rows (every row has a label). Logits are formed a (rows × vocabulary)
tile at a time, at most ``CHUNK_ELEMENTS`` fp32 values: folded into an online log-sum-exp in the
forward (row tiles outermost), recomputed in the backward (vocabulary tiles outermost), where each
tile's ``dz`` is consumed at once by the three gradient products. Accumulation is fp32 (fp64 for fp64
inputs).

bf16/fp16 inputs: the matmuls run in the input dtype (fp32 accumulation inside the GEMM), their
outputs rounded to it as the naive ``hidden @ weight.T`` rounds its logits and its gradients; an fp32
copy of a weight chunk per row chunk and an fp32 GEMM would cost 5-7x more on CPUs with bf16 GEMMs
and waste tensor cores on GPUs (the one-pass launchers below do widen them on CPUs whose 16-bit GEMMs are
emulated). Everything after the matmul (transform, log-sum-exp, dz) and every accumulation across chunks
stays in fp32.

Transform (see ``dpo_kernels.reference.lm_head_logits``):
    z = (h·Wᵀ + b)·logit_scale;  z = softcap·tanh(z / softcap) if softcap;  z = z / temperature
"""

import torch

# 2^22 fp32 logits = 16 MiB per chunk. Row chunks stay tall enough (131 rows at V = 32000) that the
# matmuls stay compute-bound although every row chunk streams the whole weight matrix once.
CHUNK_ELEMENTS = 1 << 22
# A vocabulary chunk of at most this many columns keeps row chunks tall when V is 128k-256k.
MAX_VOCAB_CHUNK = 32768
# Weight rows widened to fp32 at a time where the one-pass launchers widen 16-bit products (4 MiB: with the
# d_weight rows widened beside them and the products' outputs, a few percent of a group's logits buffer).
WIDENED_ELEMENTS = 1 << 20
# Backward row tile: up to this many rows share one vocabulary tile (so a tile of the default chunk is
# 2048 × 2048 logits), which keeps the d_weight products' inner dimension long and, for M up to it,
# makes every d_weight row a single product.
BACKWARD_ROW_TILE = 2048


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(M: int, V: int, chunk_elements: int):
    """(row slice, vocabulary slice) pairs covering (M, V), row chunks outermost."""
    cols = max(1, min(V, MAX_VOCAB_CHUNK, chunk_elements))
    rows = max(1, chunk_elements // cols)
    for r in range(0, M, rows):
        for c in range(0, V, cols):
            yield slice(r, min(r + rows, M)), slice(c, min(c + cols, V))


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _logits(h, weight, bias, vocab, logit_scale, softcap, temperature, acc):
    """z for one chunk (fp32, from a matmul in h's dtype), and tanh(·) of the pre-cap values when
    softcapping (the backward needs it)."""
    z = (h @ weight[vocab].T).to(acc)
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


def fused_linear_logps_fwd(
    hidden, weight, bias, labels, logit_scale, softcap, temperature, chunk_elements=None, with_stats=False, *,
    vocab_start=0,
):
    """hidden (M, H), weight (V, H), bias (V,) | None, labels (M,) -> (logp, lse, stats): logp (M,) fp32 (fp64
    for fp64 inputs), lse (M, 2) in that dtype; stats (M, 4) in that dtype with ``with_stats``, else None.

    weight / bias are the rows [vocab_start, vocab_start + V) of a head (the whole head by default) and the
    labels are global ids: a label outside that window is not owned, scores a label logit of 0 (logp =
    −(m + log s), top1 = 0) and is never an error. lse is the slice's log-sum-exp in two parts (m, log s),
    m the row max and s = Σ exp(z − m): the backward forms exp((z − m) − log s) from them, where one
    rounded lse would cost exp(z − lse)·|lse|·2^-24 of relative error, and slices merge from them exactly.

    stats columns (``reference.STATS``): Σ_v z_v, the entropy, 1.0 where the label is the first index
    of the maximum logit, log Σ_v exp(2 z_v). Beside the online log-sum-exp (m = running max, s = Σ
    exp(z − m)) the vocabulary chunks fold, rescaled whenever m moves to m': s1 = Σ exp(z − m)·(z − m)
    (s1' = e^{m−m'}·(s1 + (m − m')·s)), entropy = log s − s1 / s (shifted by m: no cancellation against
    lse when the logits are large); s2 = Σ exp(2(z − m)) (× e^{2(m−m')}), lse2 = 2m + log s2; Σ z by
    addition; and the running (max, first argmax), replaced only by a chunk whose max is strictly larger,
    so the earliest maximum wins.
    """
    M, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    h = hidden
    m = torch.full((M,), float("-inf"), dtype=acc, device=hidden.device)
    s = torch.zeros(M, dtype=acc, device=hidden.device)
    label_logit = torch.zeros(M, dtype=acc, device=hidden.device)
    if with_stats:
        s1, s2, sum_z = (torch.zeros(M, dtype=acc, device=hidden.device) for _ in range(3))
        argmax = torch.zeros(M, dtype=torch.long, device=hidden.device)
    for rows, vocab in _chunks(M, V, chunk_elements or CHUNK_ELEMENTS):
        z, _ = _logits(h[rows], weight, bias, vocab, logit_scale, softcap, temperature, acc)
        y = labels[rows] - (vocab_start + vocab.start)
        hit = (y >= 0) & (y < z.shape[1])
        picked = z.gather(1, y.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
        label_logit[rows] += torch.where(hit, picked, 0.0)
        m_old = m[rows]
        chunk_max = z.amax(dim=1)
        m_new = torch.maximum(m_old, chunk_max)
        # Rows of -inf so far shift by 0: exp(-inf) = 0, not exp(-inf - -inf) = NaN. A +inf max shifts by
        # itself, so that its exp(inf - inf) makes s NaN, as the reference's log_softmax is NaN there.
        pivot = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m_old - pivot)
        if with_stats:
            sum_z[rows] += z.sum(dim=1)
            # argmax: the first index of the chunk's max (offset by the chunk start), taken only when
            # that max beats every earlier chunk's, so that ties resolve to the earliest index
            better = (chunk_max > m_old) | (chunk_max.isnan() & ~m_old.isnan())  # argmax ranks NaN first
            argmax[rows] = torch.where(better, z.argmax(dim=1) + vocab.start, argmax[rows])
            d = z.sub_(pivot.unsqueeze(1))  # z − m', in place: z is not needed any more
            e = d.exp()
            moved = torch.where(s[rows] > 0, m_old - pivot, 0.0) * s[rows]  # (m − m')·s; 0 before any chunk
            s1[rows] = (s1[rows] + moved) * alpha + (e * d).sum(dim=1)
            s2[rows] = s2[rows] * alpha.square() + e.square().sum(dim=1)
            s[rows] = s[rows] * alpha + e.sum(dim=1)
        else:
            s[rows] = s[rows] * alpha + z.sub_(pivot.unsqueeze(1)).exp_().sum(dim=1)
        m[rows] = m_new
    log_s = s.log()  # an all -inf row: m = log s = -inf, its log-prob NaN (-inf + inf)
    stats = None
    if with_stats:
        top1 = (argmax == labels - vocab_start).to(acc)  # argmax lies in [0, V): never an unowned label
        # A max that is not finite is lse2 itself, as torch.logsumexp gives it (NaN, +inf, -inf).
        lse2 = torch.where(m.isfinite(), 2 * m + s2.log(), m)
        stats = torch.stack([sum_z, log_s - s1 / s, top1, lse2], dim=1)
    return (label_logit - m) - log_s, torch.stack([m, log_s], dim=1), stats


def _backward_tiles(M: int, V: int, chunk_elements: int):
    """Vocabulary tiles outermost, each cut into row tiles of at most ``BACKWARD_ROW_TILE`` rows."""
    rows = max(1, min(M, BACKWARD_ROW_TILE, chunk_elements))
    cols = max(1, min(V, MAX_VOCAB_CHUNK, chunk_elements // rows))
    for c in range(0, V, cols):
        vocab = slice(c, min(c + cols, V))
        yield vocab, [slice(r, min(r + rows, M)) for r in range(0, M, rows)]


def fused_linear_logps_bwd(
    grad, hidden, weight, bias, labels, lse, logit_scale, softcap, temperature, chunk_elements=None, *,
    vocab_start=0,
):
    """-> (d_hidden (M, H) in hidden's dtype, d_weight (V, H) in weight's dtype, d_bias (V,) | None).

    lse: (M, 2), the two-part (m, log s) of the forward, or the whole vocabulary's when weight is a slice
    (rows [vocab_start, vocab_start + V) of the head; labels global, as in the forward). dz = g·(onehot(label)
    − exp((z − m) − log s)), the one-hot only where the slice owns the label, chained back through the
    transform (with the global lse: the slice's columns of the whole head's gradient); d_hidden = dz·W,
    d_weight = dzᵀ·h, d_bias = Σ_rows dz, tile by tile. Vocabulary tiles are outermost, so each tile's
    d_weight rows are complete when the tile is: one product over all rows (M ≤ BACKWARD_ROW_TILE)
    written straight into the result, or an fp32 (columns, H) accumulator over the row tiles, rounded
    once. No (V, H) accumulator, and the d_weight products run with the inner dimension M, not a
    sliver of rows; d_hidden accumulates in fp32 across vocabulary tiles.
    """
    M, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    low = _low_precision(hidden.dtype)
    g = grad.to(acc)
    lse = lse.to(acc)
    d_hidden = torch.zeros(M, hidden.shape[1], dtype=acc, device=hidden.device)
    d_weight = torch.empty_like(weight)
    d_bias = torch.zeros(V, dtype=acc, device=weight.device) if bias is not None else None
    for vocab, row_tiles in _backward_tiles(M, V, chunk_elements or CHUNK_ELEMENTS):
        w = weight[vocab]
        w_acc = None if len(row_tiles) == 1 else torch.zeros(w.shape, dtype=acc, device=weight.device)
        for rows in row_tiles:
            z, capped = _logits(hidden[rows], weight, bias, vocab, logit_scale, softcap, temperature, acc)
            dz = z.sub_(lse[rows, 0:1]).sub_(lse[rows, 1:2]).exp_().mul_(-g[rows].unsqueeze(1))
            y = labels[rows] - (vocab_start + vocab.start)
            hit = ((y >= 0) & (y < dz.shape[1])).nonzero().squeeze(1)
            dz[hit, y[hit]] += g[rows][hit]
            if temperature != 1.0:
                dz /= temperature
            if capped is not None:
                dz *= 1 - capped.square_()
            if logit_scale != 1.0:
                dz *= logit_scale
            if d_bias is not None:
                d_bias[vocab] += dz.sum(dim=0)
            dz = dz.to(hidden.dtype)  # the products run in the inputs' dtype (a no-op for fp32 / fp64)
            if low:
                d_hidden[rows] += dz @ w  # a (rows, H) temporary in the inputs' dtype
            else:
                d_hidden[rows].addmm_(dz, w)  # in place: no temporary
            if w_acc is None:
                torch.mm(dz.T, hidden[rows], out=d_weight[vocab])
            elif low:
                w_acc += dz.T @ hidden[rows]
            else:
                w_acc.addmm_(dz.T, hidden[rows])
        if w_acc is not None:
            d_weight[vocab] = w_acc
    return (
        d_hidden.to(hidden.dtype),
        d_weight,
        d_bias.to(bias.dtype) if d_bias is not None else None,
    )


# ------------------------------------------------------------------------------------------- one pass
# The one-pass route (``dpo_kernels.tokens.one_pass``): the logits of a group of rows are formed once, kept in an
# fp32 buffer while the caller turns their log-probs into the loss's per-row gradient, then overwritten
# in place by dz and consumed by the two gradient products: 6·M·H·V FLOPs instead of 8.


def _widened_products(hidden: torch.Tensor) -> bool:
    """Whether the one-pass route runs a 16-bit head's products as fp32 GEMMs on widened chunks of the weight:
    on a CPU without native bf16 / fp16 GEMMs (oneDNN's own check), where a 16-bit GEMM is emulated and
    several times slower than an fp32 one. The operands are exact in fp32 and the outputs are rounded to
    16 bits where the 16-bit GEMM rounds them, so only the summation order differs."""
    if hidden.device.type != "cpu" or not _low_precision(hidden.dtype):
        return False
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported if hidden.dtype == torch.bfloat16 else (
        torch.ops.mkldnn._is_mkldnn_fp16_supported)  # fmt: skip
    return not native()


def _weight_chunks(weight: torch.Tensor):
    """(vocabulary slice, those rows of ``weight`` widened to fp32), at most ``WIDENED_ELEMENTS`` values each."""
    V, H = weight.shape
    cols = max(1, min(V, WIDENED_ELEMENTS // max(1, H)))
    for c in range(0, V, cols):
        yield slice(c, min(c + cols, V)), weight[c : c + cols].float()


def _narrow_buffer(logits, hidden, bias, logit_scale, softcap, temperature) -> bool:
    """Whether ``logits`` is a 16-bit buffer (``ops.linear_logits_dtype``): the plain head's products are stored
    as they are, and dz is written over them in 16 bits."""
    if logits.dtype == _acc_dtype(hidden.dtype):
        return False
    if logits.dtype != hidden.dtype or bias is not None or (logit_scale, softcap, temperature) != (1.0, None, 1.0):
        raise ValueError(f"a {logits.dtype} logits buffer holds a plain {hidden.dtype} head's logits (no bias, no "
                         f"transform); this head needs a {_acc_dtype(hidden.dtype)} one")  # fmt: skip
    return True


def fused_linear_logits_fwd(
    logits, hidden, weight, bias, labels, logit_scale, softcap, temperature, *, scorer, with_stats=False,
    vocab_start=0,
):
    """(logp, lse, stats) as :func:`fused_linear_logps_fwd`, leaving the rows' transformed logits in ``logits``.

    logits: (M, V) fp32 (fp64 for fp64 inputs; or a plain 16-bit head's dtype, :func:`_narrow_buffer`) with a
    unit column stride, overwritten; hidden (M, H) compacted scored rows; weight (V, H), bias (V,) | None the
    rows [vocab_start, vocab_start + V) of a head, labels (M,) global ids. ``scorer``: the logits path's
    launchers (``token_logps_fwd``) that score the buffer, the native library's or
    :mod:`dpo_kernels.portable.logprobs`. The logits are those of :func:`_logits` (a
    bf16/fp16 product rounded to its dtype, as the recompute route and the naive head round them): one
    GEMM into the buffer for fp32, row chunks through a bounded temporary for 16-bit inputs (vocabulary
    chunks of fp32 products, rounded, where :func:`_widened_products`).
    """
    M = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    narrow = _narrow_buffer(logits, hidden, bias, logit_scale, softcap, temperature)
    if _widened_products(hidden):
        h = hidden.float()
        for vocab, w in _weight_chunks(weight):
            logits[:, vocab] = h @ w.T if narrow else (h @ w.T).to(hidden.dtype)
    elif narrow:
        torch.mm(hidden, weight.T, out=logits)
    elif _low_precision(hidden.dtype):
        step = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
        for r in range(0, M, step):
            logits[r : r + step].copy_(hidden[r : r + step] @ weight.T)
    else:
        torch.mm(hidden, weight.T, out=logits)
    if bias is not None:
        logits += bias.to(acc)
    if logit_scale != 1.0:
        logits *= logit_scale
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        logits /= temperature
    logp, lse, stats = scorer.token_logps_fwd(logits[None], labels[None], -1, False, with_stats,
                                              vocab_start=vocab_start)  # fmt: skip
    return logp[0], lse[0], stats[0] if with_stats else None


def fused_linear_logits_bwd_(
    logits, grad, hidden, weight, bias, labels, lse, logit_scale, softcap, temperature, *, scorer, d_weight,
    d_bias=None, vocab_start=0,
):
    """d_hidden (M, H) in hidden's dtype from the logits :func:`fused_linear_logits_fwd` left, accumulating
    d_weight (V, H, its dtype; None for a frozen head: no product) and d_bias ((V,) fp32, or None) in place;
    ``logits`` ends up holding dz.

    dz = g·(onehot − exp((z − m) − log s)) chained through the transform, written over the logits by the
    scorer's in-place backward (``token_logps_bwd(..., out=logits)``) with g · logit_scale / temperature as
    its per-row weight; a softcap's factor 1 − tanh², with tanh = z · temperature / softcap read off the
    capped logits, is taken per row chunk before they are overwritten. Then d_hidden = dz·W and
    d_weight += dzᵀ·h: two GEMMs over the whole buffer for fp32, or per vocabulary chunk through a bounded
    16-bit copy of dz (the products in the inputs' dtype, as the recompute route runs them; each d_weight
    row gets one product, so one rounding per call; fp32 products of the rounded dz on widened weight chunks
    where :func:`_widened_products`).
    """
    M, V = logits.shape
    acc = _acc_dtype(hidden.dtype)
    narrow = _narrow_buffer(logits, hidden, bias, logit_scale, softcap, temperature)
    g = grad.to(acc) * (logit_scale / temperature)
    lse = lse.to(acc)
    if softcap is None:
        z = logits[None]  # one view as both the input and ``out``: the in-place mode
        scorer.token_logps_bwd(g[None], z, labels[None], lse[None], -1, False, out=z, vocab_start=vocab_start)
    else:
        step = max(1, CHUNK_ELEMENTS // max(1, V))
        factor = logits.new_empty((min(step, M), V))
        for r in range(0, M, step):
            z, rows = logits[None, r : r + step], slice(r, min(r + step, M))
            f = torch.mul(z[0], temperature / softcap, out=factor[: z.shape[1]]).square_().neg_().add_(1)
            scorer.token_logps_bwd(g[None, rows], z, labels[None, rows], lse[None, rows], -1, False, out=z,
                                   vocab_start=vocab_start)  # fmt: skip
            z[0].mul_(f)
    if d_bias is not None:
        d_bias += logits.sum(0)
    if not _low_precision(hidden.dtype) or (narrow and not _widened_products(hidden)):
        if d_weight is not None:
            d_weight.addmm_(logits.T, hidden)
        return logits @ weight
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    if _widened_products(hidden):
        h = hidden.float()
        for vocab, w in _weight_chunks(weight):
            dz = logits[:, vocab].to(hidden.dtype).float()  # dz rounded as the 16-bit product's operand
            d_hidden.addmm_(dz, w)
            if d_weight is not None:  # one rounding of d_weight + dzᵀ·h, as a 16-bit addmm_
                d_weight[vocab] = d_weight[vocab].float().addmm_(dz.T, h)
        return d_hidden.to(hidden.dtype)
    cols = max(1, min(V, CHUNK_ELEMENTS // max(1, M)))
    for c in range(0, V, cols):
        dz = logits[:, c : c + cols].to(hidden.dtype)
        d_hidden += dz @ weight[c : c + cols]
        if d_weight is not None:
            d_weight[c : c + cols].addmm_(dz.T, hidden)
    return d_hidden.to(hidden.dtype)
