"""Vocabulary parallelism: the only module that touches a ``ProcessGroup`` or a ``DTensor``.

Every rank of a group holds a contiguous slice [start, start + V_r) of the vocabulary (the columns of the
logits, or the rows of the LM head and its bias), slices in rank order tiling [0, V), and the same tokens:
the same hidden states and GLOBAL labels. Each rank runs the ordinary kernels on its slice with
``vocab_start`` (a label it does not own scores a label logit of 0) and gets per-row partials: the slice's
two-part log-sum-exp (c_r = row max, log s_r), its log-prob (owned rows) and its statistics. One
all-gather of one tensor per forward (partials of every row, plus a header with the rank's window and a
checksum of its labels) lets every rank combine them itself:

    C = max_r c_r,  log S = log Σ_r exp((c_r − C) + log s_r),  lse = (C, log S)
    logp = logp_owner + ((c_owner − C) + (log s_owner − log S))
    Σz = Σ_r Σz_r,  lse2 = log Σ_r exp(lse2_r),  entropy = Σ_r w_r·(H_r − log w_r),  w_r = exp(lse_r − lse)
    top1 = top1_r of the first rank whose row max is C (the global first maximum lies in it)

The backward is the kernels' own, handed the global lse: g·(onehot_owned − exp((z − C) − log S)) is the
rank's slice of the whole gradient; the fused head's d_hidden, a partial sum over the vocabulary, is
all-reduced once. Collectives per forward + backward: one all-gather per scored pass, plus one all-reduce
for a head's backward. The one-pass head (``dpo_kernels.tokens.one_pass``) checks the windows and labels
once for the batch with its scored counts (:func:`agree_rows`, one all-gather), combines each group's rows
with one unchecked all-gather (:func:`combine_rows`) and all-reduces d_hidden once. Host synchronizations:
the same as on one device (the label checks of a pass are one flag, read once; a device-side assert on
CUDA; the one-pass head's ride on its one read of the scored counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import ops

# Columns of the gathered per-row partials: the lse's two parts, the owned rows' log-prob, the owned flag,
# then the statistics (reference.STATS) when asked for.
_C, _LOG_S, _LOGP, _OWNED = range(4)
_SUM, _ENTROPY, _TOP1, _LSE2 = range(4, 8)


@dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary window: its first global id and the group whose ranks hold the others."""

    start: int
    group: object


def vocab_shard_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s slice of a vocabulary split over ``world_size`` ranks like
    ``torch.chunk`` and DTensor's ``Shard``: ceil(V / W) rows per rank, the last ranks shorter (possibly
    empty) when V is not divisible by W."""
    per_rank = -(-vocab_size // world_size)
    start = min(rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_vocab_sharded(t) -> bool:
    """Whether ``t`` is a DTensor with a non-replicated placement (a vocabulary-parallel weight or logits)."""
    return is_dtensor(t) and any(not p.is_replicate() for p in t.placements)


def world():
    """The default group (every rank)."""
    return dist.group.WORLD


def group_mean(value: torch.Tensor, group) -> torch.Tensor:
    """The mean of a tensor over the ranks of ``group`` (each rank's own value in, the same mean out on every
    rank): one all-reduce, no autograd. For statistics of data-parallel ranks (KTO's KL estimate), not for
    the vocabulary."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"the group must be a torch.distributed ProcessGroup, got {group!r}")
    total = value.detach().clone()
    dist.all_reduce(total, group=group)
    return total / dist.get_world_size(group)


def local(t):
    """A DTensor as this rank's local tensor (anything else as it is)."""
    return t.to_local() if is_dtensor(t) else t


def resolve(process_group, vocab_start, sharded: dict):
    """``(shard, locals)``: the vocabulary window of this rank (None on one device) and ``sharded``'s tensors
    ({name: (tensor or None, vocabulary dim)}) as local tensors. Sharded when asked for (``process_group``,
    ``vocab_start``) or handed a DTensor sharded over the vocabulary; a replicated DTensor is the one-device
    case. Without ``vocab_start`` or a DTensor, the window comes from one all-gather of the
    ranks' slice sizes (and a host read of it)."""
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got {process_group!r}")
    bad_start = isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
    if vocab_start is not None and bad_start:
        raise ValueError(f"vocab_start must be None or this rank's first vocabulary id (an int >= 0), "
                         f"got {vocab_start!r}")  # fmt: skip
    explicit = process_group is not None or vocab_start is not None
    group, start, out, dtensor = process_group, vocab_start, {}, None
    for name, (t, dim) in sharded.items():
        out[name] = local(t)
        if not is_dtensor(t):
            continue
        dtensor = dtensor or "replicated"
        if not is_vocab_sharded(t):
            continue
        dtensor = "sharded"
        mesh, placement, vdim = t.device_mesh, t.placements[0], dim % t.dim()
        if mesh.ndim != 1 or len(t.placements) != 1 or not placement.is_shard() or placement.dim % t.dim() != vdim:
            raise ValueError(
                f"{name} is a DTensor {tuple(t.placements)} over a {mesh.ndim}-D mesh; vocabulary parallelism takes "
                f"a 1-D mesh with a Shard({vdim}) placement (slice a multi-dimensional mesh to its vocabulary "
                "dimension)"
            )
        mine, stop = vocab_shard_range(t.shape[vdim], mesh.size(), mesh.get_local_rank())
        if out[name].shape[vdim] != stop - mine:
            raise ValueError(f"{name}'s local shard has {out[name].shape[vdim]} rows, expected {stop - mine} "
                             f"(torch.chunk layout of {t.shape[vdim]} over {mesh.size()} ranks)")  # fmt: skip
        if group is not None and group != mesh.get_group():
            raise ValueError(f"process_group differs from the group of {name}'s device mesh")
        if start is not None and start != mine:
            raise ValueError(f"vocab_start={start} contradicts {name}'s DTensor layout (offset {mine})")
        group, start = mesh.get_group(), mine
    # a replicated DTensor holds the whole vocabulary on every rank: the one-device case
    if dtensor != "sharded" and not explicit:
        return None, out
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocabulary-parallel log-probs need an initialized torch.distributed process group")
    group = world() if group is None else group
    if start is None:  # the lower ranks' slice sizes, summed
        name, (_, dim) = next((n, v) for n, v in sharded.items() if v[0] is not None)
        mine = torch.tensor([out[name].shape[dim]], dtype=torch.int64, device=out[name].device)
        sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, mine, group=group)
        start = int(torch.cat(sizes)[: dist.get_rank(group)].sum())
    return VocabShard(int(start), group), out


# ------------------------------------------------------------------------------------------ combine


def combine(parts: torch.Tensor, with_stats: bool):
    """(logp, lse (·, 2), stats (·, 4 or 0)) of the whole vocabulary from the ranks' per-row partials
    ``parts`` (W, rows, 4 [+ 4]), ranks in vocabulary order; pure, so tests can feed it simulated ranks."""
    c, log_s, logp, owned = parts[..., _C], parts[..., _LOG_S], parts[..., _LOGP], parts[..., _OWNED] > 0
    C = c.amax(0)
    # A slice whose row is all -inf (banned tokens, an empty slice) holds no mass, whatever its log s is.
    no_mass = c == -torch.inf
    rel = torch.where(no_mass, -torch.inf, c - C)
    log_S = torch.logsumexp(torch.where(no_mass, -torch.inf, rel + log_s), 0)
    log_w = torch.where(no_mass, -torch.inf, rel + (log_s - log_S))  # each rank's share of the probability mass
    zero = parts.new_zeros(())
    logp = torch.where(owned, logp + log_w, zero).sum(0)
    lse = torch.stack([C, log_S], -1)
    if not with_stats:
        return logp, lse, parts.new_zeros((*logp.shape, 0))
    w = log_w.exp()
    entropy = torch.where(w > 0, w * (parts[..., _ENTROPY] - log_w), zero).sum(0)
    is_max = (c == C) | (c.isnan() & C.isnan())
    first = is_max.to(torch.uint8).argmax(0, keepdim=True)  # the lowest rank holding the global maximum
    top1 = parts[..., _TOP1].gather(0, first).squeeze(0)
    stats = torch.stack([parts[..., _SUM].sum(0), entropy, top1, torch.logsumexp(parts[..., _LSE2], 0)], -1)
    return logp, lse, stats


def _partials(logp, lse, stats, y, scored, start, local_vocab):
    """(rows, k) partials of this rank from its kernels' outputs; y: the (N, T') labels scored."""
    owned = scored & (y >= start) & (y < start + local_vocab)
    cols = [lse[..., 0], lse[..., 1], torch.where(owned, logp, 0.0), owned.to(logp.dtype), *stats.unbind(-1)]
    return torch.stack(cols, -1).reshape(-1, len(cols))


def _empty_partials(y, with_stats, dtype):
    """The partials of an empty slice: no mass (c = −inf), nothing owned."""
    parts = torch.zeros((y.numel(), 8 if with_stats else 4), dtype=dtype, device=y.device)
    parts[:, _C] = -torch.inf
    if with_stats:
        parts[:, _LSE2] = -torch.inf
    return parts


def _header(labels, shard, local_vocab) -> torch.Tensor:
    """(4,) int64: the rank's window (start, size), a checksum of its labels and their number."""
    flat = labels.reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device) % 1_000_003 + 1  # keeps the sum below 2^63
    return torch.stack([torch.tensor(shard.start, device=flat.device), torch.tensor(local_vocab, device=flat.device),
                        (flat * weights).sum(), torch.tensor(flat.numel(), device=flat.device)])  # fmt: skip


def _verify(headers, y, scored):
    """(flags, V) of the ranks' gathered (W, 4) headers: flags (ok, tiles, same, starts, sizes) for
    :func:`_check`, V the whole vocabulary's size (0-dim)."""
    starts, sizes, digests, counts = headers.unbind(-1)
    vocab = starts[-1] + sizes[-1]
    tiles = (starts[0] == 0) & (starts[1:] == starts[:-1] + sizes[:-1]).all()
    same = (digests == digests[0]).all() & (counts == counts[0]).all()
    in_range = ~(scored & ((y < 0) | (y >= vocab))).any()
    return (tiles & same & in_range, tiles, same, starts, sizes), vocab


def _gather(mine: torch.Tensor, shard) -> torch.Tensor:
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(gathered, mine, group=shard.group)
    return torch.stack(gathered)


def _exchange(parts, labels, y, scored, shard, local_vocab, with_stats):
    """All-gather the partials with a header (the rank's window and a checksum of its labels), check the
    windows and labels, combine. -> (logp, lse, stats) in (N, T') layout, zeros where unscored, and the
    whole vocabulary's size V (a 0-dim tensor: reading it on the host would synchronize)."""
    header = _header(labels, shard, local_vocab).view(parts.dtype)
    k = parts.shape[1]
    head_rows = -(-header.numel() // k)
    mine = torch.cat([torch.cat([header, header.new_zeros(head_rows * k - header.numel())]).view(head_rows, k), parts])
    gathered = _gather(mine, shard)
    headers = gathered[:, :head_rows].reshape(gathered.shape[0], -1)[:, : header.numel()].contiguous()
    flags, vocab = _verify(headers.view(torch.int64), y, scored)
    _check(*flags)
    logp, lse, stats = combine(gathered[:, head_rows:], with_stats)
    shape = scored.shape
    keep = scored.reshape(-1, 1)
    return (torch.where(scored, logp.view(shape), 0.0), torch.where(keep, lse, 0.0).view(*shape, 2),
            torch.where(keep, stats, 0.0).view(*shape, stats.shape[-1]), vocab)  # fmt: skip


def _check(ok, tiles, same, starts, sizes):
    """One flag for every check of a pass: read once on the host on CPU, a device-side assert on CUDA."""
    if ok.is_cuda:
        torch._assert_async(ok, "vocabulary-parallel call: the ranks' windows, labels or label range are wrong")
        return
    if not bool(ok):
        _raise(tiles, same, starts, sizes)


def _raise(tiles, same, starts, sizes):
    if not bool(same):
        raise ValueError(
            "labels differ across the ranks of the vocabulary-parallel group: every rank must see the same tokens. "
            "A DTensor sharded on the vocabulary that is an FSDP2 shard (each rank with its own batch) must be used "
            "inside the forward of its fully_shard-ed module (e.g. dpo_kernels.distributed.FusedLMHeadLoss), where "
            "the weight is whole"
        )
    if not bool(tiles):
        raise ValueError(
            f"the ranks' vocabulary slices (starts {starts.tolist()}, sizes {sizes.tolist()}) must tile [0, V) in rank "
            "order, so that every label is owned by exactly one rank: check vocab_start"
        )
    vocab = int(starts[-1] + sizes[-1])
    raise ValueError(f"labels must lie in [0, {vocab}) (the whole vocabulary) or equal ignore_index")


# ------------------------------------------------------------------------------------- the one-pass head


def agree_rows(counts: torch.Tensor, y: torch.Tensor, scored: torch.Tensor, shard: VocabShard, local_vocab: int):
    """``(counts, widest, V)`` on the host for the one-pass head's grouping: the (S,) per-sequence scored
    ``counts``, the widest rank's slice (every rank must size its groups alike) and the whole vocabulary's size.
    The ranks' windows and labels (``y``, ``scored``: what the rows score) are checked here, once for every
    group's exchange: one all-gather and one host read; a failing check raises on every rank alike."""
    gathered = _gather(torch.cat([_header(y, shard, local_vocab), counts.long()]), shard)
    flags, vocab = _verify(gathered[:, :4], y, scored)
    ok, widest, vocab, *counts = torch.cat([flags[0].long()[None], gathered[:, 1].amax()[None], vocab[None],
                                            gathered[0, 4:]]).tolist()  # fmt: skip
    if not ok:
        _raise(*flags[1:])
    return counts, widest, vocab


def combine_rows(out, y: torch.Tensor, shard: VocabShard, local_vocab: int, with_stats: bool, dtype: torch.dtype):
    """(logp, lse, stats) of the whole vocabulary for ``y`` (M,), the labels of M scored rows (a one-pass
    group: every rank holds the same rows, checked by :func:`agree_rows`), from this rank's (logp, lse,
    stats) of its slice (None for an empty slice; ``dtype`` the outputs'): one all-gather."""
    if out is None:
        parts = _empty_partials(y, with_stats, dtype)
    else:
        parts = _partials(*out, y, torch.ones_like(y, dtype=torch.bool), shard.start, local_vocab)
    return combine(_gather(parts, shard), with_stats)


def sum_over_ranks(partial: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The sum of the ranks' partial sums over their vocabulary slices (d_hidden of the fused head), in fp32 or
    wider whatever ``partial``'s dtype; one all-reduce."""
    total = partial.to(ops.out_dtype(partial), copy=True)
    dist.all_reduce(total, group=shard.group)
    return total


# ------------------------------------------------------------------------------------------ passes


def _scored(labels, T: int, shift: bool, ignore_index: int):
    """The (N, T − shift) labels the rows score, and the mask of the scored ones."""
    y = labels[:, int(shift) : int(shift) + max(T - int(shift), 0)]
    return y, y != ignore_index


class _ShardedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, shard, ignore_index, shift, backend, with_stats):
        V_r = logits.shape[-1]
        y, scored = _scored(labels, logits.shape[1], shift, ignore_index)
        if V_r:
            out = ops.token_logps(logits, labels, ignore_index=ignore_index, shift=shift, backend=backend,
                                  with_stats=with_stats, vocab_start=shard.start, vocab_size=0)  # fmt: skip
            parts = _partials(*out, y, scored, shard.start, V_r)
        else:
            parts = _empty_partials(y, with_stats, ops.out_dtype(logits))
        logp, lse, stats, vocab = _exchange(parts, labels, y, scored, shard, V_r, with_stats)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = dict(ignore_index=ignore_index, shift=shift, backend=backend, vocab_start=shard.start)
        ctx.mark_non_differentiable(lse, stats, vocab)
        return logp, lse, stats, vocab

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_stats, grad_vocab):
        logits, labels, lse = ctx.saved_tensors
        if grad_logp is None or logits.shape[-1] == 0:
            return (None if grad_logp is None else torch.zeros_like(logits)), *(None,) * 6
        grad = ops.token_logps_backward(grad_logp.to(lse.dtype), logits, labels, lse, **ctx.args)
        return grad, *(None,) * 6


class _ShardedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard, options, with_stats):
        V_r = weight.shape[0]
        y, scored = _scored(labels, hidden.shape[1], options["shift"], options["ignore_index"])
        if V_r:
            out = ops.linear_token_logps(hidden, weight, bias, labels, **options, with_stats=with_stats,
                                         vocab_start=shard.start, vocab_size=0)  # fmt: skip
            parts = _partials(*out, y, scored, shard.start, V_r)
        else:
            parts = _empty_partials(y, with_stats, ops.out_dtype(hidden))
        logp, lse, stats, vocab = _exchange(parts, labels, y, scored, shard, V_r, with_stats)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.shard, ctx.options = shard, options
        ctx.mark_non_differentiable(lse, stats, vocab)
        return logp, lse, stats, vocab

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_stats, grad_vocab):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        nones = (None,) * 4
        if grad_logp is None:
            return None, None, None, *nones
        if weight.shape[0] == 0:
            d_hidden, d_weight = torch.zeros_like(hidden), torch.zeros_like(weight)
            d_bias = None if bias is None else torch.zeros_like(bias)
        else:
            d_hidden, d_weight, d_bias = ops.linear_token_logps_backward(
                grad_logp.to(lse.dtype), hidden, weight, bias, labels, lse, **ctx.options, vocab_start=ctx.shard.start
            )
        if ctx.needs_input_grad[0]:  # the hidden states are replicated: their gradient sums every rank's slice
            d_hidden = sum_over_ranks(d_hidden, ctx.shard).to(hidden.dtype)
        else:
            d_hidden = None
        return d_hidden, d_weight, d_bias, *nones


def token_logps(logits, labels, shard: VocabShard, *, ignore_index: int, shift: bool, backend: str,
                with_stats: bool):  # fmt: skip
    """(logp, lse, stats, V) of the whole vocabulary from this rank's logits slice; differentiable w.r.t. it."""
    return _ShardedLogits.apply(logits, labels, shard, ignore_index, shift, backend, with_stats)


def linear_token_logps(hidden, weight, bias, labels, shard: VocabShard, *, with_stats: bool, **options):
    """(logp, lse, stats, V) of the whole vocabulary from this rank's rows of the LM head; differentiable
    w.r.t. hidden (all-reduced), this rank's weight and bias. ``options``: those of ``ops.linear_token_logps``."""
    return _ShardedLinear.apply(hidden, weight, bias, labels, shard, options, with_stats)
