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
