"""Scale-out: vocabulary-parallel log-probs over a ``torch.distributed`` process group, and an LM-head
loss module that FSDP2 / DDP / ZeRO-3 can wrap.

Vocabulary parallelism (a Megatron-style tensor-parallel LM head): every rank of ``process_group`` holds a
contiguous slice ``[vocab_start, vocab_start + V_r)`` of the vocabulary, slices in rank order covering
``[0, V)``, either as a logits shard (N, T, V_r) or as a weight shard (V_r, H) (+ bias shard (V_r,)).
All ranks are given the SAME hidden states / labels (global token ids). Each rank runs the existing fused
kernels on its slice; the global log-sum-exp is ``M + log Σ_r exp(lse_r − M)`` with ``M = max_r lse_r``
(one MAX and one SUM all-reduce of (N, T) floats), and the label logit comes from its owner (the same
SUM all-reduce). Nothing of size V crosses the network.

How the kernels are reused unchanged: on a rank that does not own a row's label, the label is mapped to
a valid local stand-in index (row position mod V_r), so the row is still scored (its local lse is
computed) and the picked logit is discarded. The label logit is gathered directly on its owner
(``z[row, y − vocab_start]`` for logits, ``transform(h·W[y] + b[y])`` for the fused head), which is
exact, instead of being recovered as ``logp_r + lse_r``.

The backward is local. Logits: the backward kernel gets the rank's own lse_r and the upstream gradient
scaled by w_r = exp(lse_r − lse) (the portable kernel recomputes the local softmax and ignores the lse
it is handed, so the global lse cannot be passed to it), which yields ``g·(w_r·onehot − exp(z − lse))``
on every backend; the picked element of each scored row (the label, or the stand-in where the rank
does not own it) is then overwritten with its exact value ``g·([owned] − exp(z − lse))``, computed in
fp32. Fused head: the backward op uses the lse it is handed, so it gets the GLOBAL lse and computes
``g·(onehot − exp(z − lse))``, the exact slice of the full gradient except for the spurious one-hot
term at the stand-in index j of non-owned rows, which is removed: ``g·c·W[j]`` is subtracted from
d_hidden and ``g·c·h`` (``g·c``) from d_weight[j] (d_bias[j]), with ``c`` the transform's
derivative at that logit (logit_scale · (1 − tanh²) for softcap · 1/temperature). The hidden states are
replicated, so their gradient is all-reduced (summed, in fp32) over the group inside the backward.

DTensor: a weight (or logits) that is a ``DTensor`` sharded on the vocabulary dimension over a 1-D
mesh (``Shard(0)`` weight, ``Shard(-1)`` logits; e.g. ``ColwiseParallel`` on the LM head) is handled
transparently: its local shard, the mesh's group, and the rank's offset (``torch.chunk`` layout, so
uneven and even empty shards are fine) are taken from it; gradients flow back into the DTensor.

Statistics (``with_stats=True``; the per-token columns of ``reference.STATS``: Σ z, entropy, top-1,
log Σ exp(2z)) are combined exactly across ranks: entropy = Σ_r w_r·(H_r − log w_r) with
w_r = exp(lse_r − lse) the rank's share of the probability mass and H_r its local entropy,
top-1 from the global first argmax (MAX then MIN all-reduce), lse2 by a log-sum-exp over ranks. The
local statistics come from one extra chunked pass over the local logits (the fused head recomputes
them: one more forward matmul over the scored rows), so ask for them only when logging.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from ._validation import FLOAT_DTYPES, check_beta, check_labels, check_logits, check_pairs, check_ref

__all__ = [
    "FusedLMHeadLoss",
    "is_vocab_sharded",
    "sharded_weight_message",
    "vocab_parallel_dpo_loss",
    "vocab_parallel_fused_linear_dpo_loss",
    "vocab_parallel_fused_linear_sequence_logps",
    "vocab_parallel_fused_linear_token_logps",
    "vocab_parallel_sequence_logps",
    "vocab_parallel_token_logps",
    "vocab_shard_range",
]

# fp32 elements per chunk of the statistics pass (16 MiB), like the portable kernels.
_STATS_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------- op arity adapter


def _n_args(op) -> int:
    return len(op.default._schema.arguments)


def _token_logps_op(logits, labels, ignore_index, shift, backend):
    """(logp, lse) of ``dpo_kernels::token_logps`` whatever its arity (6 args, or 7 with ``with_stats``)."""
    op = torch.ops.dpo_kernels.token_logps
    args = [logits, labels, ignore_index, shift, backend, False]
    if _n_args(op) > 6:
        args.append(False)  # with_stats
    out = op(*args)
    return out[0], out[1]


def _fused_linear_op(hidden, weight, bias, labels, ignore_index, shift, scale, softcap, temperature, chunk, backend):
    """(logp, lse) of ``dpo_kernels::fused_linear_token_logps`` (11 args, or 12 with ``with_stats``), lse
    as one value (the op gives its two parts)."""
    op = torch.ops.dpo_kernels.fused_linear_token_logps
    args = [hidden, weight, bias, labels, ignore_index, shift, scale, softcap, temperature, chunk, backend]
    if _n_args(op) > 11:
        args.append(False)  # with_stats
    out = op(*args)
    return out[0], ops.lse_value(out[1])


# ------------------------------------------------------------------------------------ shard geometry


def vocab_shard_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s slice of a vocabulary of ``vocab_size`` split over
    ``world_size`` ranks like ``torch.chunk`` and DTensor's ``Shard``: ceil(V / W) rows per rank, the
    last ranks shorter (possibly empty) when V is not divisible by W."""
    per_rank = -(-vocab_size // world_size)
    start = min(rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _unwrap_sharded(name: str, t, dim: int, process_group, vocab_start):
    """(local tensor, group, vocab_start or None, global V or None) for a plain tensor or a DTensor
    sharded on ``dim`` over a 1-D mesh."""
    if process_group is not None and process_group is not _LOCAL:
        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got {process_group!r}")
    if vocab_start is not None:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start must be None or this rank's first vocabulary row (an int >= 0), got {vocab_start!r}")
    if not _is_dtensor(t):
        return t, process_group, vocab_start, None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, t.placements
    dim = dim % t.dim()
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"{name} is a DTensor over a {mesh.ndim}-D mesh {tuple(placements)}; vocabulary parallelism takes a "
            f"1-D mesh with a Shard({dim}) placement (slice a multi-dimensional mesh to its vocabulary dimension)"
        )
    placement = placements[0]
    if isinstance(placement, Replicate):
        return t.to_local(), _LOCAL, 0, t.shape[dim]  # the whole vocabulary on every rank: nothing to combine
    if not (isinstance(placement, Shard) and placement.dim % t.dim() == dim):
        raise ValueError(f"{name} must be sharded on dimension {dim} (the vocabulary), got placement {placement}")
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError(f"process_group differs from the group of {name}'s device mesh")
    local = t.to_local()
    start, stop = vocab_shard_range(t.shape[dim], mesh.size(), mesh.get_local_rank())
    if local.shape[dim] != stop - start:
        raise ValueError(
            f"{name}'s local shard has {local.shape[dim]} rows on dimension {dim}, expected {stop - start} "
            f"(torch.chunk layout of {t.shape[dim]} over {mesh.size()} ranks)"
        )
    if vocab_start is not None and vocab_start != start:
        raise ValueError(f"vocab_start={vocab_start} contradicts {name}'s DTensor layout (offset {start})")
    return local, group, start, t.shape[dim]


def is_vocab_sharded(t) -> bool:
    """Whether ``t`` is a DTensor with a non-replicated placement (a vocabulary-parallel weight or logits):
    what the single-device entry points route to this module."""
    return _is_dtensor(t) and any(not p.is_replicate() for p in t.placements)


def wanted(process_group, vocab_start, *tensors) -> bool:
    """Whether a public entry point takes the vocabulary-parallel path: asked for, or handed a DTensor
    sharded over the vocabulary."""
    return process_group is not None or vocab_start is not None or any(is_vocab_sharded(t) for t in tensors)


def _local(t):
    """A replicated DTensor (hidden states, labels, precomputed log-probs) as its local tensor."""
    return t.to_local() if _is_dtensor(t) else t


class _Local:
    """A 'group' of this rank alone: a replicated head, where the collectives are no-ops."""

    def __repr__(self):
        return "<local>"


_LOCAL = _Local()


def _all_reduce(t, op, group):
    if group is not _LOCAL:
        dist.all_reduce(t, op=op, group=group)


def _resolve_group(process_group):
    if process_group is _LOCAL:
        return _LOCAL
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocabulary-parallel log-probs need an initialized torch.distributed process group")
    return process_group if process_group is not None else dist.group.WORLD


def _check_same_tokens(labels, group, name: str) -> None:
    """Vocabulary parallelism needs the same tokens on every rank of the group. A DTensor weight sharded on
    dim 0 looks the same under tensor parallelism (same tokens everywhere: correct) and as an FSDP2 shard
    used outside its module's forward (different batches per rank: garbage), so compare a checksum of the
    labels (one 32-byte all-reduce) instead of trusting the placement."""
    if group is _LOCAL:
        return
    flat = labels.reshape(-1).long()
    position = torch.arange(flat.numel(), device=flat.device) % 1_000_003 + 1  # keeps the sum below 2^63
    digest = (flat * position).sum()
    n = torch.tensor(flat.numel(), dtype=torch.int64, device=flat.device)
    packed = torch.stack([digest, -digest, n, -n])
    _all_reduce(packed, dist.ReduceOp.MAX, group)
    if packed[0] != -packed[1] or packed[2] != -packed[3]:
        raise ValueError(
            f"labels differ across the ranks of {name}'s vocabulary-parallel group: every rank must see the same "
            "tokens. A DTensor sharded on the vocabulary that is an FSDP2 shard (each rank with its own batch) "
            "must be used inside the forward of its fully_shard-ed module (e.g. "
            "dpo_kernels.distributed.FusedLMHeadLoss), where the weight is whole"
        )


def _vocab_start(local_vocab: int, group, device) -> int:
    """Exclusive prefix sum of the ranks' local vocabulary sizes, in rank order (one tiny all-gather)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return int(sum(int(s) for s in sizes[:rank]))


def _localize(labels, vocab_start: int, local_vocab: int, ignore_index: int, shift: bool, T_out: int):
    """Labels for the local kernels (owned: ``y − vocab_start``; ignored: ignore_index; not owned: a valid
    stand-in index, spread over the slice as (row position mod V_r) so that the one-hot terms the fused
    head's backward must take back out do not all pile up, and cancel, in one row of d_weight), and the
    (N, T_out) masks ``scored`` and ``owned`` in output coordinates."""
    labels = labels.long()
    local = labels - vocab_start
    owned_full = (labels != ignore_index) & (local >= 0) & (local < local_vocab)
    stand_in = torch.arange(labels.numel(), device=labels.device).view_as(labels) % max(local_vocab, 1)
    local = torch.where(owned_full, local, stand_in)
    local = torch.where(labels == ignore_index, labels, local)
    used = slice(int(shift), int(shift) + T_out)
    scored = labels[:, used] != ignore_index
    return local, scored, owned_full[:, used]


def _combine(lse_r, label_logit, owned, scored, group, dtype):
    """Global lse and the label logit from the per-rank lse and the owners' label logits; checks that every
    scored label has exactly one owner (bad vocab_start, overlapping shards, labels out of [0, V))."""
    lse_r = torch.where(scored, lse_r.to(dtype), torch.zeros((), dtype=dtype, device=lse_r.device))
    M = lse_r.clone()
    _all_reduce(M, dist.ReduceOp.MAX, group)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    packed = torch.stack([torch.exp(lse_r - M), label_logit.to(dtype), owned.to(dtype)])
    _all_reduce(packed, dist.ReduceOp.SUM, group)
    total, picked, owners = packed.unbind(0)
    bad = scored & (owners != 1)
    if bool(bad.any()):
        count = int(owners[bad][0].item())
        raise ValueError(
            f"a scored label is owned by {count} ranks instead of 1: labels must lie in [0, V) of the whole "
            "vocabulary and the ranks' slices [vocab_start, vocab_start + V_r) must tile it in rank order"
        )
    lse = torch.where(scored, M + total.log(), torch.zeros((), dtype=dtype, device=M.device))
    logp = torch.where(scored, picked - lse, torch.zeros((), dtype=dtype, device=M.device))
    return logp, lse


def _check_backend(backend: str, device, dtype) -> str:
    return ops.resolve_backend(backend, device, dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ statistics


def _local_stats(z: torch.Tensor, vocab_start: int):
    """(M, V_r) fp32 logits of this rank -> (M, 6): Σ z, max, global index of the first max, lse_r,
    local entropy H_r, log Σ exp(2z). Empty slices give neutral values."""
    M, V = z.shape
    out = z.new_zeros((M, 6))
    if V == 0:
        out[:, 1] = -math.inf
        out[:, 2] = math.inf
        out[:, 3] = -math.inf
        out[:, 5] = -math.inf
        return out
    mx, arg = z.max(dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse.unsqueeze(-1)
    out[:, 0] = z.sum(-1)
    out[:, 1] = mx
    out[:, 2] = (arg + vocab_start).to(z.dtype)
    out[:, 3] = lse
    out[:, 4] = -(logp.exp() * logp).sum(-1)
    out[:, 5] = torch.logsumexp(2 * z, dim=-1)
    return out


def _global_stats(local, lse, labels_scored, group):
    """Combine (M, 6) per-rank statistics of the scored rows into (M, 4) ``reference.STATS`` columns."""
    dtype = local.dtype
    maxes = torch.stack([local[:, 1], local[:, 5]])
    _all_reduce(maxes, dist.ReduceOp.MAX, group)
    gmax, l2max = maxes.unbind(0)
    # H = −Σ_v p_v·log p_v = Σ_r w_r·(H_r − log w_r), w_r = exp(lse_r − lse) the rank's probability mass:
    # no cancellation between lse and E[z], unlike H = lse − Σ_r w_r·E_r[z].
    log_w = local[:, 3] - lse
    weight = torch.exp(log_w)
    entropy = torch.where(weight > 0, weight * (local[:, 4] - log_w), torch.zeros_like(weight))
    sums = torch.stack([local[:, 0], entropy, torch.exp(local[:, 5] - l2max)])
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    first = torch.where(local[:, 1] == gmax, local[:, 2], torch.full_like(local[:, 2], math.inf))
    _all_reduce(first, dist.ReduceOp.MIN, group)
    top1 = (first == labels_scored.to(dtype)).to(dtype)
    return torch.stack([sums[0], sums[1], top1, l2max + sums[2].log()], dim=-1)


def _row_chunks(M: int, V: int):
    rows = max(1, _STATS_CHUNK_ELEMENTS // max(V, 1))
    for r in range(0, M, rows):
        yield slice(r, min(r + rows, M))


def _transform(a, logit_scale, softcap, temperature):
    a = a * logit_scale
    if softcap is not None:
        a = softcap * torch.tanh(a / softcap)
    return a / temperature


@torch.no_grad()
def _stats_logits(logits, labels, lse, scored, vocab_start, shift, group):
    N, T_out = scored.shape
    n, t = scored.nonzero(as_tuple=True)
    acc = lse.dtype
    local = torch.empty((n.numel(), 6), dtype=acc, device=lse.device)
    for rows in _row_chunks(n.numel(), logits.shape[-1]):
        local[rows] = _local_stats(logits[n[rows], t[rows]].to(acc), vocab_start)
    y = labels[:, int(shift) : int(shift) + T_out][n, t]
    stats = torch.zeros((N, T_out, 4), dtype=acc, device=lse.device)
    stats[n, t] = _global_stats(local, lse[n, t], y, group)
    return stats


@torch.no_grad()
def _stats_linear(hidden, weight, bias, labels, lse, scored, vocab_start, shift, transform, group):
    N, T_out = scored.shape
    n, t = scored.nonzero(as_tuple=True)
    acc = lse.dtype
    local = torch.empty((n.numel(), 6), dtype=acc, device=lse.device)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    for rows in _row_chunks(n.numel(), weight.shape[0]):
        a = hidden[n[rows], t[rows]].to(acc) @ w.T
        if b is not None:
            a += b
        local[rows] = _local_stats(_transform(a, *transform), vocab_start)
    y = labels[:, int(shift) : int(shift) + T_out][n, t]
    stats = torch.zeros((N, T_out, 4), dtype=acc, device=lse.device)
    stats[n, t] = _global_stats(local, lse[n, t], y, group)
    return stats


# ------------------------------------------------------------------------------------- autograd


class _VocabParallelLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, ignore_index, shift, backend, group):
        N, T, V_r = logits.shape
        T_out = max(T - int(shift), 0)
        acc = _acc(logits.dtype)
        local, scored, owned = _localize(labels, vocab_start, V_r, ignore_index, shift, T_out)
        if V_r > 0:
            _, parts_r = _token_logps_op(logits, local, ignore_index, shift, backend)  # (m_r, log s_r)
            lse_r = ops.lse_value(parts_r)
            lab = local[:, int(shift) : int(shift) + T_out]
            picked = logits[:, :T_out].gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1).to(acc)
            label_logit = torch.where(owned, picked, torch.zeros((), dtype=acc, device=logits.device))
        else:
            lse_r = torch.full((N, T_out), -math.inf, dtype=acc, device=logits.device)
            parts_r = None  # the backward never calls a kernel on an empty slice
            label_logit = torch.zeros((N, T_out), dtype=acc, device=logits.device)
        logp, lse = _combine(lse_r, label_logit, owned, scored, group, acc)
        ctx.save_for_backward(logits, local, lse, torch.where(scored, lse_r, lse), parts_r, scored, owned)
        ctx.args = (ignore_index, shift, backend)
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        logits, local, lse, lse_r, parts_r, scored, owned = ctx.saved_tensors
        ignore_index, shift, backend = ctx.args
        if grad_logp is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        g = grad_logp.to(lse.dtype)
        if logits.shape[-1] == 0:
            return torch.zeros_like(logits), *(None,) * 6
        # The kernels give g'·(onehot − exp(z − lse')) with lse' the lse they are handed, here the rank's own
        # two-part lse_r (the portable one recomputes the local softmax, whatever it is handed). With g' = g·w_r,
        # w_r = exp(lse_r − lse), that is g·(w_r·onehot − exp(z − lse)) on every backend: the global
        # softmax term is exact, and only the picked element (the label, or the stand-in where the rank
        # does not own the label) needs its one-hot term rewritten, which is done exactly, from z, in fp32.
        w = torch.where(scored, torch.exp(lse_r - lse), torch.zeros_like(lse))
        grad = torch.ops.dpo_kernels.token_logps_backward(g * w, logits, local, parts_r, ignore_index, shift, backend)
        n, t = scored.nonzero(as_tuple=True)
        if n.numel():
            c = local[n, t + int(shift)]
            zc = logits[n, t, c].to(lse.dtype)
            grad[n, t, c] = (g[n, t] * (owned[n, t].to(lse.dtype) - torch.exp(zc - lse[n, t]))).to(grad.dtype)
        return grad, *(None,) * 6


class _VocabParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_start, ignore_index, shift, transform, chunk, backend, group,
                filter_eps=0.0):  # fmt: skip
        N, T, _ = hidden.shape
        V_r = weight.shape[0]
        T_out = max(T - int(shift), 0)
        acc = _acc(hidden.dtype)
        local, scored, owned = _localize(labels, vocab_start, V_r, ignore_index, shift, T_out)
        label_logit = torch.zeros((N, T_out), dtype=acc, device=hidden.device)
        if V_r > 0:
            _, lse_r = _fused_linear_op(hidden, weight, bias, local, ignore_index, shift, *transform, chunk, backend)
            n, t = owned.nonzero(as_tuple=True)
            if n.numel():
                y = local[n, t + int(shift)]
                a = (hidden[n, t].to(acc) * weight[y].to(acc)).sum(-1)
                if bias is not None:
                    a = a + bias[y].to(acc)
                label_logit[n, t] = _transform(a, *transform)
        else:
            lse_r = torch.full((N, T_out), -math.inf, dtype=acc, device=hidden.device)
        logp, lse = _combine(lse_r, label_logit, owned, scored, group, acc)
        ctx.save_for_backward(hidden, weight, bias, local, lse, scored & ~owned)
        ctx.args = (ignore_index, shift, transform, chunk, backend, group, filter_eps)
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, bias, local, lse, not_owned = ctx.saved_tensors
        ignore_index, shift, transform, chunk, backend, group, filter_eps = ctx.args
        nones = (None,) * 9
        if grad_logp is None:
            return None, None, None, *nones
        acc = lse.dtype
        g = grad_logp.to(acc)
        if weight.shape[0] == 0:
            d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
            d_weight, d_bias = torch.zeros_like(weight), (torch.zeros_like(bias) if bias is not None else None)
        else:
            lse_parts = torch.stack([lse, torch.zeros_like(lse)], dim=-1)  # the op takes (m, log s): (lse, 0)
            d_hidden, d_weight, d_bias = torch.ops.dpo_kernels.fused_linear_token_logps_backward(
                g, hidden, weight, bias, local, lse_parts, ignore_index, shift, *transform, chunk, backend, filter_eps
            )
            d_hidden = d_hidden.to(acc)
            d_bias = d_bias if bias is not None else None
            n, t = not_owned.nonzero(as_tuple=True)
            if n.numel():  # take back the stand-in labels' one-hot terms, chained through the transform
                logit_scale, softcap, temperature = transform
                c = local[n, t + int(shift)]
                h = hidden[n, t].to(acc)
                w_c = weight[c].to(acc)
                coef = g[n, t] * (logit_scale / temperature)
                if softcap is not None:
                    a = (h * w_c).sum(-1)
                    if bias is not None:
                        a = a + bias[c].to(acc)
                    coef = coef * (1 - torch.tanh(a * logit_scale / softcap).square())
                d_hidden[n, t] -= coef.unsqueeze(-1) * w_c
                d_weight.index_add_(0, c, (-coef.unsqueeze(-1) * h).to(d_weight.dtype))
                if d_bias is not None:
                    d_bias.index_add_(0, c, (-coef).to(d_bias.dtype))
        if ctx.needs_input_grad[0]:
            _all_reduce(d_hidden, dist.ReduceOp.SUM, group)  # hidden is replicated over the group
            d_hidden = d_hidden.to(hidden.dtype)
        else:
            d_hidden = None
        return d_hidden, d_weight, d_bias, *nones


# ------------------------------------------------------------------------------------------ API


def vocab_parallel_token_logps(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    shift: bool = True,
    backend: str = "auto",
    with_stats: bool = False,
):
    """Per-token ``(token_logp, lse)`` (+ ``stats`` with ``with_stats``) of the whole vocabulary from this
    rank's logits slice.

    logits_shard: (N, T, V_r), this rank's columns ``[vocab_start, vocab_start + V_r)`` of the logits (or a
    DTensor sharded on its last dimension over a 1-D mesh); labels: (N, T) GLOBAL token ids, the same on
    every rank of ``process_group`` (default: the DTensor's mesh group, else the world). ``vocab_start``
    defaults to the sum of the lower ranks' V_r (one small all-gather). Returns (N, T − shift) fp32 tensors
    equal on all ranks: token_logp (differentiable w.r.t. the shard; the gradient is the shard's slice of
    the full gradient), lse (not differentiable), and stats (N, T − shift, 4) as ``reference.STATS``.
    Zeros on tokens labelled ``ignore_index``.
    """
    local, group, start, _ = _unwrap_sharded("logits_shard", logits_shard, -1, process_group, vocab_start)
    labels = _local(labels)
    if local.shape[-1]:  # an empty slice (more ranks than vocabulary rows per chunk) is legitimate
        check_logits("logits_shard", local)
    check_labels(labels, local, "logits_shard")
    group = _resolve_group(group)
    _check_same_tokens(labels, group, "logits_shard")
    start = _vocab_start(local.shape[-1], group, local.device) if start is None else int(start)
    backend = _check_backend(backend, local.device, local.dtype)
    logp, lse = _VocabParallelLogits.apply(local, labels, start, ignore_index, shift, backend, group)
    if not with_stats:
        return logp, lse
    scored = labels[:, int(shift) : int(shift) + lse.shape[1]] != ignore_index
    return logp, lse, _stats_logits(local.detach(), labels, lse, scored, start, shift, group)


def vocab_parallel_sequence_logps(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`dpo_kernels.sequence_logps` over a vocabulary split across ``process_group``; see
    :func:`vocab_parallel_token_logps`. Returns (N,) fp32, the same on every rank."""
    logp, _ = vocab_parallel_token_logps(
        logits_shard, labels, process_group=process_group, vocab_start=vocab_start,
        ignore_index=ignore_index, shift=shift, backend=backend,
    )  # fmt: skip
    return _reduce(logp, _local(labels), ignore_index, shift, average)


def _reduce(token_logp, labels, ignore_index, shift, average):
    total = token_logp.sum(-1)
    if average:
        scored = labels[:, int(shift) : int(shift) + token_logp.shape[1]] != ignore_index
        return total / scored.sum(-1).clamp(min=1)
    return total


def _check_head(hidden, weight, bias):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a floating (N, T, H) tensor, got {getattr(hidden, 'shape', hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight_shard must have shape (V_r, H) with H = {hidden.shape[2]}, got {tuple(weight.shape)}")
    for name, t in (("weight_shard", weight), ("bias_shard", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"{name} must have hidden's dtype and device ({hidden.dtype}, {hidden.device})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias_shard must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def vocab_parallel_fused_linear_token_logps(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    bias_shard: Optional[torch.Tensor] = None,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    shift: bool = True,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    with_stats: bool = False,
    gradient_filter=None,
):
    """Per-token ``(token_logp, lse)`` (+ ``stats``) of the fused LM head with the vocabulary split over
    ``process_group``: rank r holds ``weight_shard`` (V_r, H) = rows ``[vocab_start, vocab_start + V_r)``
    of the LM head (and ``bias_shard`` (V_r,)), or a DTensor weight sharded on dim 0 over a 1-D mesh.
    hidden (N, T, H) and labels (N, T, global ids) are the same on every rank. Differentiable w.r.t.
    hidden (gradient all-reduced over the group, so every rank gets the full gradient of its replica),
    the weight shard and the bias shard (their slices of the full gradient, no communication).
    The transform is that of :func:`dpo_kernels.fused_linear_sequence_logps` (logit_scale, softcap,
    temperature), and so is ``gradient_filter`` (each rank filters its shard's tiles against the global
    log-sum-exp)."""
    from .fused_linear import _check_transform, resolve_gradient_filter

    weight, group, start, _ = _unwrap_sharded("weight_shard", weight_shard, 0, process_group, vocab_start)
    bias = None
    if bias_shard is not None:
        bias, _, bias_start, _ = _unwrap_sharded("bias_shard", bias_shard, 0, group, start)
        start = bias_start if start is None else start
    hidden, labels = _local(hidden), _local(labels)
    _check_head(hidden, weight, bias)
    check_labels(labels, hidden, "hidden")
    _check_transform(logit_scale, softcap, temperature)
    if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget >= 4):
        raise ValueError(f"memory_budget must be None or a number of bytes >= 4, got {memory_budget!r}")
    chunk = 0 if memory_budget is None else memory_budget // 4
    group = _resolve_group(group)
    _check_same_tokens(labels, group, "weight_shard")
    start = _vocab_start(weight.shape[0], group, weight.device) if start is None else int(start)
    backend = _check_backend(backend, hidden.device, hidden.dtype)
    filter_eps = resolve_gradient_filter(gradient_filter, hidden.dtype, backend)
    transform = (float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    logp, lse = _VocabParallelLinear.apply(
        hidden, weight, bias, labels, start, ignore_index, shift, transform, chunk, backend, group, filter_eps
    )
    if not with_stats:
        return logp, lse
    scored = labels[:, int(shift) : int(shift) + lse.shape[1]] != ignore_index
    b = bias.detach() if bias is not None else None
    stats = _stats_linear(hidden.detach(), weight.detach(), b, labels, lse, scored, start, shift, transform, group)
    return logp, lse, stats


def vocab_parallel_fused_linear_sequence_logps(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    bias_shard: Optional[torch.Tensor] = None,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    gradient_filter=None,
) -> torch.Tensor:
    """:func:`dpo_kernels.fused_linear_sequence_logps` with the LM head split over the vocabulary; see
    :func:`vocab_parallel_fused_linear_token_logps`. Returns (N,) fp32, the same on every rank."""
    logp, _ = vocab_parallel_fused_linear_token_logps(
        hidden, weight_shard, labels, bias_shard, process_group=process_group, vocab_start=vocab_start,
        ignore_index=ignore_index, shift=shift, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, memory_budget=memory_budget, backend=backend, gradient_filter=gradient_filter,
    )  # fmt: skip
    return _reduce(logp, _local(labels), ignore_index, shift, average)


# ------------------------------------------------------------------------------------------ losses


def _loss_from_tokens(policy_tokens, mask, ref, *, stats, lse, vocab_size, beta, average, **options):
    from . import preference

    return preference.dpo_from_tokens(
        policy_tokens, mask, ref, stats=stats, lse=lse, vocab_size=vocab_size, beta=beta, average=average,
        **options,
    )  # fmt: skip


def _reduce_ref(ref_tokens, mask, average, options):
    from . import preference

    return preference.reduce_sequences(ref_tokens, mask, average=average, ld_alpha=options.get("ld_alpha"))


def _global_vocab(local_vocab: int, group, device) -> int:
    size = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    _all_reduce(size, dist.ReduceOp.SUM, group)
    return int(size.item())


def vocab_parallel_dpo_loss(
    policy_logits_shard: torch.Tensor,
    ref_logits,
    labels: torch.Tensor,
    beta: float = 0.1,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    average: bool = False,
    backend: str = "auto",
    token_metrics: bool = False,
    **loss_options,
):
    """:func:`dpo_kernels.fused_dpo_loss` on vocabulary-sharded logits. ``ref_logits``: this rank's shard
    of the reference logits (same layout as the policy's), (2B,) precomputed reference log-probs, or None.
    ``token_metrics`` adds TRL's token metrics (``logits/*``, ``entropy``, ``mean_token_accuracy``),
    combined across ranks (one extra pass over the local logits). Loss and metrics equal on all ranks."""
    from . import preference

    check_beta(beta)
    check_pairs("policy_logits_shard", policy_logits_shard.shape[0])
    preference.check_options(
        average=average, ld_alpha=loss_options.get("ld_alpha"), use_weighting=loss_options.get("use_weighting", False)
    )
    kw = dict(process_group=process_group, vocab_start=vocab_start, ignore_index=ignore_index, backend=backend)
    wants_stats = token_metrics or bool(loss_options.get("use_weighting"))
    out = vocab_parallel_token_logps(policy_logits_shard, labels, with_stats=wants_stats, **kw)
    tokens, lse = out[0], out[1]
    stats = out[2] if wants_stats else None
    labels = _local(labels)
    mask = labels[:, 1:] != ignore_index
    if ref_logits is not None:
        check_ref(_local(ref_logits), _local(policy_logits_shard))
    if ref_logits is None:
        ref = None
    elif _local(ref_logits).dim() == 1:
        ref = _local(ref_logits).detach()
    else:
        with torch.no_grad():
            ref_tokens, _ = vocab_parallel_token_logps(ref_logits, labels, **kw)
        ref = _reduce_ref(ref_tokens, mask, average, loss_options)
    vocab = None
    if stats is not None:
        local, group, _, V = _unwrap_sharded("policy_logits_shard", policy_logits_shard, -1, process_group, None)
        V = V or _global_vocab(local.shape[-1], _resolve_group(group), local.device)
        vocab = V
    return _loss_from_tokens(
        tokens, mask, ref, stats=stats, lse=lse, vocab_size=vocab or 1, beta=beta, average=average, **loss_options
    )


def vocab_parallel_fused_linear_dpo_loss(
    policy_hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight_shard: Optional[torch.Tensor] = None,
    bias_shard: Optional[torch.Tensor] = None,
    ref_bias_shard: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    ignore_index: int = -100,
    average: bool = False,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    token_metrics: bool = False,
    gradient_filter=None,
    **loss_options,
):
    """:func:`dpo_kernels.fused_linear_dpo_loss` with the LM head split over the vocabulary across
    ``process_group`` (see :func:`vocab_parallel_fused_linear_token_logps`). The reference side is
    ``ref_logps`` (2B,), or ``ref_hidden`` scored under ``ref_weight_shard`` (default: this rank's
    ``weight_shard``) without autograd, or neither (reference-free). Loss and metrics equal on all ranks."""
    from . import preference

    check_beta(beta)
    check_pairs("policy_hidden", policy_hidden.shape[0])
    preference.check_options(
        average=average, ld_alpha=loss_options.get("ld_alpha"), use_weighting=loss_options.get("use_weighting", False)
    )
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("give the reference as ref_logps or as ref_hidden, not both")
    kw = dict(
        process_group=process_group, vocab_start=vocab_start, ignore_index=ignore_index, logit_scale=logit_scale,
        softcap=softcap, temperature=temperature, memory_budget=memory_budget, backend=backend,
    )  # fmt: skip
    wants_stats = token_metrics or bool(loss_options.get("use_weighting"))
    out = vocab_parallel_fused_linear_token_logps(
        policy_hidden, weight_shard, labels, bias_shard, with_stats=wants_stats, gradient_filter=gradient_filter, **kw
    )
    tokens, lse = out[0], out[1]
    stats = out[2] if wants_stats else None
    labels = _local(labels)
    mask = labels[:, 1:] != ignore_index
    if ref_logps is not None:
        ref = _local(ref_logps)
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != (labels.shape[0],):
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(f"ref_logps must have shape ({labels.shape[0]},), got {shape}")
        ref = ref.detach()
    elif ref_hidden is not None:
        head = weight_shard if ref_weight_shard is None else ref_weight_shard
        if _local(head).shape[0] != _local(weight_shard).shape[0]:
            raise ValueError(
                f"ref_weight_shard must hold this rank's rows of the policy's vocabulary: weight_shard has shape "
                f"{tuple(_local(weight_shard).shape)}, ref_weight_shard {tuple(_local(head).shape)}"
            )
        with torch.no_grad():
            ref_tokens, _ = vocab_parallel_fused_linear_token_logps(ref_hidden, head, labels, ref_bias_shard, **kw)
        ref = _reduce_ref(ref_tokens, mask, average, loss_options)
    else:
        ref = None
    vocab = 1
    if stats is not None:
        local, group, _, V = _unwrap_sharded("weight_shard", weight_shard, 0, process_group, None)
        vocab = V or _global_vocab(local.shape[0], _resolve_group(group), local.device)
    return _loss_from_tokens(
        tokens, mask, ref, stats=stats, lse=lse, vocab_size=vocab, beta=beta, average=average, **loss_options
    )


# ------------------------------------------------------------------------------------------ module


class FusedLMHeadLoss(nn.Module):
    """The LM head and the fused DPO loss as one module, so that wrappers which manage parameters around a
    module's ``forward`` (FSDP2 ``fully_shard``, FSDP1, DeepSpeed ZeRO-3, DDP) see the head being used.

    ``loss, metrics = head_loss(hidden, labels, ref_logps=..., beta=...)`` calls
    :func:`dpo_kernels.fused_linear_dpo_loss` on ``lm_head.weight`` / ``lm_head.bias``. Under
    ``fully_shard(head_loss)`` (or ``fully_shard`` of a parent whose forward calls it) the weight is
    unsharded (all-gathered) for the forward and again for the backward, and its gradient
    reduce-scattered, exactly as for ``lm_head(hidden)``; the logits are never formed.

    ``vocab_parallel=True``: the head is a tensor-parallel head, a DTensor sharded on the vocabulary
    (``ColwiseParallel``) whose mesh ranks all see the same tokens; the vocabulary-parallel path then runs
    on the local shard over the mesh's group. Without it a vocabulary-sharded DTensor weight is refused:
    an FSDP2 shard has the same placement, and its ranks hold different batches.

    ``lm_head``: an ``nn.Linear``-like module with ``weight`` (V, H) and ``bias`` (V,) or None.
    Keyword arguments given at construction (``beta``, ``logit_scale``, ``softcap``, ``backend``, ...)
    are defaults that call-time keywords override.
    """

    def __init__(self, lm_head: nn.Module, *, vocab_parallel: bool = False, **defaults):
        super().__init__()
        self.lm_head = lm_head
        self.vocab_parallel = vocab_parallel
        self.defaults = defaults

    def forward(self, hidden, labels, **kwargs):
        from .fused_linear import fused_linear_dpo_loss

        options = {**self.defaults, **kwargs}
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if self.vocab_parallel:
            if "ref_weight" in options:
                options["ref_weight_shard"] = options.pop("ref_weight")
            if "ref_bias" in options:
                options["ref_bias_shard"] = options.pop("ref_bias")
            return vocab_parallel_fused_linear_dpo_loss(hidden, weight, labels, bias_shard=bias, **options)
        if is_vocab_sharded(weight):
            raise ValueError(sharded_weight_message("lm_head.weight", weight))
        return fused_linear_dpo_loss(hidden, weight, labels, bias=bias, **options)


def sharded_weight_message(name: str, weight) -> str:
    """The error for a vocabulary-sharded DTensor handed to a single-device entry point."""
    return (
        f"{name} is a DTensor sharded as {tuple(weight.placements)}; the fused LM head needs the whole head. "
        "Under FSDP2, call the loss inside the forward of the fully_shard-ed module that owns the head (e.g. "
        "dpo_kernels.distributed.FusedLMHeadLoss), where the weight is unsharded; for a tensor-parallel head "
        "whose ranks all see the same tokens, pass process_group= (vocabulary-parallel path)"
    )
