"""Per-token passes: the one place that turns an entry point's options (backend, memory budget, gradient
filter, packed batch, vocabulary shard) into per-token outputs in the padded layout.

Both passes return :class:`Tokens`; the entry points (``dpo_kernels.functional``,
``dpo_kernels.fused_linear``) and ``dpo_kernels.integrations.hf`` reduce them to sequences and losses.
"""

import warnings
from typing import NamedTuple, Optional

import torch

from . import ops, packing, sharding
from ._validation import gradient_filter_eps


class Tokens(NamedTuple):
    """Per-token outputs over the scored positions, (N, T') each (a packed batch's as its (S, L) padded
    layout): ``logps`` log p(label) (fp32, zero where unscored, differentiable), ``lse`` the log-sum-exp of
    the logits, ``stats`` (N, T', 4) with the columns of ``reference.STATS`` when asked for, else
    (N, T', 0), ``mask`` (bool) the scored tokens (None when not asked for: a byte per token that a plain
    sum does not need), and ``vocab_size`` the whole vocabulary's size (an int,
    or a 0-dim tensor on the sharded path, where the host does not know it without a synchronization)."""

    logps: torch.Tensor
    lse: torch.Tensor
    stats: torch.Tensor
    mask: torch.Tensor
    vocab_size: object


def _laid_out(out, vocab_size, labels, shift, packed, ignore_index, with_mask) -> Tokens:
    logp, lse, stats = out
    lay = lambda t: packing.layout(t, packed)  # noqa: E731
    mask = packing.scored(labels, shift, packed, ignore_index) if with_mask else None
    return Tokens(lay(logp), lay(ops.lse_value(lse)), lay(stats), mask, vocab_size)


def from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    backend: str,
    inplace_backward: bool = False,
    with_stats: bool = False,
    with_mask: bool = True,
    packed: Optional[packing.Packing] = None,
    shard: Optional[sharding.VocabShard] = None,
) -> Tokens:
    """The logits path: ``logits`` (N, T, V) (this rank's slice with ``shard``), ``backend`` as given."""
    backend = ops.resolve_backend(backend, logits.device, logits.dtype)
    labels, shift = packing.kernel_labels(labels, packed, ignore_index, shift)
    if shard is None:
        out = ops.token_logps(logits, labels, ignore_index=ignore_index, shift=shift, backend=backend,
                              inplace_backward=inplace_backward, with_stats=with_stats)  # fmt: skip
        vocab_size = logits.shape[-1]
    else:
        *out, vocab_size = sharding.token_logps(logits, labels, shard, ignore_index=ignore_index, shift=shift,
                                                backend=backend, with_stats=with_stats)  # fmt: skip
    return _laid_out(out, vocab_size, labels, shift, packed, ignore_index, with_mask)


_FILTER_WARNED = []  # the portable / native backends' one warning that gradient_filter does not apply


def _filter_eps(gradient_filter, dtype: torch.dtype, backend: str) -> float:
    """``gradient_filter`` (None | "auto" | float) as the ops' float (0.0 = off); warns once when it is set on
    a backend without tiles to skip (the gradients there stay exact), and is off where no backward runs."""
    eps = gradient_filter_eps(gradient_filter, dtype)
    if not torch.is_grad_enabled():
        return 0.0
    if eps > 0 and backend != "triton" and not _FILTER_WARNED:
        _FILTER_WARNED.append(True)
        warnings.warn(
            f"gradient_filter applies to the Triton backend only; the {backend!r} backend computes exact "
            "gradients", UserWarning, stacklevel=4,
        )  # fmt: skip
    return eps if backend == "triton" else 0.0


def from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    with_stats: bool = False,
    gradient_filter=None,
    with_mask: bool = True,
    packed: Optional[packing.Packing] = None,
    shard: Optional[sharding.VocabShard] = None,
) -> Tokens:
    """The fused LM head: ``weight`` (V, H) (this rank's rows with ``shard``) on ``hidden`` (N, T, H)."""
    backend = ops.resolve_backend(backend, hidden.device, hidden.dtype)
    labels, shift = packing.kernel_labels(labels, packed, ignore_index, shift)
    options = dict(
        ignore_index=ignore_index, shift=shift, logit_scale=float(logit_scale),
        softcap=None if softcap is None else float(softcap), temperature=float(temperature),
        chunk_elements=0 if memory_budget is None else memory_budget // 4, backend=backend,
        gradient_filter=_filter_eps(gradient_filter, hidden.dtype, backend),
    )  # fmt: skip
    if shard is None:
        out = ops.linear_token_logps(hidden, weight, bias, labels, with_stats=with_stats, **options)
        vocab_size = weight.shape[0]
    else:
        *out, vocab_size = sharding.linear_token_logps(hidden, weight, bias, labels, shard, with_stats=with_stats,
                                                       **options)  # fmt: skip
    return _laid_out(out, vocab_size, labels, shift, packed, ignore_index, with_mask)


def per_sequence(tokens: Tokens, average: bool) -> torch.Tensor:
    """(N,) sum of the per-token log-probs, or their mean over scored tokens (0 where there are none)."""
    total = tokens.logps.sum(-1)
    return total / tokens.mask.sum(-1).clamp(min=1) if average else total


# The one-pass route's default budget for a group's fp32 logits: about 1 GiB on the GPU (Triton), as the
# recompute route's chunks; on the CPU small enough that the buffer stays a few percent of what the naive
# head holds, large enough for a pair of a few hundred scored tokens each at V = 32k.
ONE_PASS_BUDGET = {"triton": 1 << 30}
ONE_PASS_CPU_BUDGET = 64 << 20


def one_pass_budget(backend: str, memory_budget: Optional[int]) -> int:
    """Bytes of fp32 logits a one-pass group may hold: ``memory_budget``, or the resolved backend's default."""
    return memory_budget or ONE_PASS_BUDGET.get(backend, ONE_PASS_CPU_BUDGET)


class Scored(NamedTuple):
    """What the one-pass route groups a batch by, read on the host at once: ``counts`` the scored tokens of
    each sequence, ``vocab_rows`` a buffer row's length (this head's rows, or with a vocabulary shard the
    widest rank's slice: every rank must form the same groups) and ``vocab_size`` the whole vocabulary's."""

    counts: list
    vocab_rows: int
    vocab_size: int


def scored_counts(labels: torch.Tensor, vocab_rows: int, *, ignore_index: int, shift: bool,
                  packed: Optional[packing.Packing] = None, shard: Optional[sharding.VocabShard] = None) -> Scored:
    """:class:`Scored` of (N, T) ``labels`` (a packed batch's (1, total) with ``packed``) under a head of
    ``vocab_rows`` rows (this rank's with ``shard``): one host read; with ``shard`` one all-gather too, which
    checks the ranks' windows and labels for every later exchange of the one-pass head."""
    labels, shift = packing.kernel_labels(labels, packed, ignore_index, shift)
    y = labels[:, int(shift) :]
    scored = y != ignore_index
    counts = packing.layout(scored, packed).sum(1)
    if shard is None:
        return Scored(counts.tolist(), vocab_rows, vocab_rows)
    return Scored(*sharding.agree_rows(counts, y, scored, shard, vocab_rows))


def one_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    groups: list,
    scored: Scored,
    token_grad,
    *,
    ignore_index: int,
    shift: bool,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    with_stats: bool = False,
    packed: Optional[packing.Packing] = None,
    shard: Optional[sharding.VocabShard] = None,
):
    """The fused head in one pass: ``(tokens, carrier)``, ``carrier`` a 0-dim zero whose gradient w.r.t.
    ``hidden``, ``weight`` and ``bias`` is the loss's, formed here (add it to the loss's value).

    ``groups``: lists of sequence indices (rows of ``hidden`` (N, T, H), or a packed batch's sequences), each
    group's scored rows' logits formed at once into one buffer (sized for the largest group; fp32, or 16-bit
    where ``ops.linear_logits_dtype`` allows);
    ``scored``: the batch's :func:`scored_counts`. After a group is scored its outputs
    are written into the per-token tensors (the padded layout, as :func:`from_hidden`'s), and
    ``token_grad(tokens)`` returns d loss / d logps given the tokens scored so far (those of later groups are
    zeros): it is read at the group's tokens only, which is exact when the loss is a sum of terms of single
    groups. dz then overwrites the logits and the two products run: d_hidden's rows of the group, d_weight
    and d_bias accumulated over the groups. ``tokens`` (detached, with the scored mask) are the same as
    :func:`from_hidden`'s.

    With ``shard`` (this rank's rows of a vocabulary-parallel head) every group's rows are combined over the
    ranks by one all-gather before the loss's gradient is taken, dz is this rank's slice of the whole
    gradient, and d_hidden, a partial sum over the vocabulary, is all-reduced once at the end.
    """
    backend = ops.resolve_backend(backend, hidden.device, hidden.dtype)
    y, shift = packing.kernel_labels(labels, packed, ignore_index, shift)
    y = y[:, int(shift) : int(shift) + max(hidden.shape[1] - int(shift), 0)]  # the label each position scores
    mask = packing.layout(y != ignore_index, packed)  # (S, L): one row per sequence
    starts = None if packed is None else packed.cu_seqlens[:-1]
    acc = ops.out_dtype(hidden)
    logps = hidden.new_zeros(mask.shape, dtype=acc)
    lse = hidden.new_zeros((*mask.shape, 2), dtype=acc)
    stats = hidden.new_zeros((*mask.shape, ops.N_STATS if with_stats else 0), dtype=acc)
    d_hidden = torch.zeros_like(hidden, dtype=acc if shard is not None else hidden.dtype)
    # only the gradients autograd will ask for: a frozen head (PEFT) costs no d_weight product
    d_weight = torch.zeros_like(weight) if weight.requires_grad else None
    d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
    V_r, vocab_start = weight.shape[0], 0 if shard is None else shard.start
    with torch.no_grad():  # what autograd sees is the carrier: the ops run outside its graph
        rows_of = [sum(scored.counts[s] for s in group) for group in groups]
        buffer_dtype = ops.linear_logits_dtype(backend, hidden, bias, logit_scale, softcap, temperature)
        buffer = hidden.new_empty(max(rows_of, default=0) * V_r, dtype=buffer_dtype)
        options = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature, backend=backend,
                       vocab_start=vocab_start)  # fmt: skip
        for group, rows in zip(groups, rows_of):
            if rows == 0:
                continue
            index = torch.as_tensor(group, device=hidden.device)
            n_sub, t = torch.nonzero_static(mask[index], size=rows).unbind(1)  # the count is known: no synchronization
            n = index[n_sub]  # (sequence, position) in the padded layout; (row, column) of hidden:
            at = (n, t) if packed is None else (torch.zeros_like(n), starts[n] + t)
            h, y_rows = hidden[at], y[at].long()
            z = buffer[: rows * V_r].view(rows, V_r)
            out = ops.linear_logits(z, h, weight, bias, y_rows, with_stats=with_stats, **options) if V_r else None
            if shard is None:
                logp, row_lse, row_stats = out
            else:
                logp, row_lse, row_stats = sharding.combine_rows(out, y_rows, shard, V_r, with_stats, acc)
            logps[n, t], lse[n, t] = logp, row_lse
            if with_stats:
                stats[n, t] = row_stats
            g = token_grad(Tokens(logps, ops.lse_value(lse), stats, mask, scored.vocab_size))[n, t].to(acc)
            if V_r:
                d_hidden[at] = ops.linear_logits_backward_(z, g, h, weight, bias, y_rows, row_lse, d_weight=d_weight,
                                                           d_bias=d_bias, **options).to(d_hidden.dtype)  # fmt: skip
        if shard is not None and hidden.requires_grad:  # the hidden states are replicated over the ranks
            d_hidden = sharding.sum_over_ranks(d_hidden, shard).to(hidden.dtype)
    tokens = Tokens(logps, ops.lse_value(lse), stats, mask, scored.vocab_size)
    grads = (d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype))  # None where not asked for
    with torch.enable_grad():  # the caller scores under no_grad; the carrier is what autograd sees
        return tokens, with_gradients(logps.new_zeros(()), (hidden, weight, bias), grads)


class _Precomputed(torch.autograd.Function):
    """``value`` (detached) whose gradient w.r.t. ``inputs`` is ``grads`` (formed in the forward), scaled by the
    incoming gradient. A backward with a gradient of exactly 1 (read on the host only for a CPU tensor: no
    synchronization on the GPU) hands the saved tensors over, so that autograd can adopt them without a copy
    when the graph is not retained."""

    @staticmethod
    def forward(ctx, value, *inputs_and_grads):
        k = len(inputs_and_grads) // 2
        ctx.save_for_backward(*inputs_and_grads[k:])
        ctx.k = k
        return value.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        unit = grad.device.type == "cpu" and bool(grad == 1)
        scaled = [None if s is None else (s if unit else s * grad.to(s.dtype)) for s in saved]
        return (None, *scaled, *([None] * ctx.k))


def with_gradients(value: torch.Tensor, inputs: tuple, grads: tuple) -> torch.Tensor:
    """``value`` as a differentiable function of ``inputs`` whose gradient is ``grads`` (None where an input is
    None or needs none) times the incoming gradient: how the one-pass route hands back what it formed."""
    pairs = [(i, g) for i, g in zip(inputs, grads) if i is not None and i.requires_grad]
    return _Precomputed.apply(value, *(i for i, _ in pairs), *(g for _, g in pairs))
