"""Scale-out, public side: the LM head and the loss as one module for FSDP2 / FSDP1 / DDP / ZeRO-3, and the
``vocab_parallel_*`` names of the vocabulary-parallel path.

Vocabulary parallelism itself is a keyword of every entry point (``process_group=``, ``vocab_start=``, or
a DTensor sharded over the vocabulary): :func:`dpo_kernels.sequence_logps`,
:func:`dpo_kernels.fused_dpo_loss`, :func:`dpo_kernels.fused_linear_sequence_logps`,
:func:`dpo_kernels.fused_linear_dpo_loss`; how the ranks combine is in :mod:`dpo_kernels.sharding`. The
``vocab_parallel_*`` functions below are those entry points with the group defaulting to the world, and the
per-token outputs of the two passes.
"""

from typing import Optional

from torch import nn

from . import sharding, tokens
from ._validation import check_labels, check_lm_head, check_logits, check_memory_budget, check_transform
from .functional import fused_dpo_loss, sequence_logps
from .fused_linear import fused_linear_dpo_loss, fused_linear_sequence_logps
from .sharding import is_vocab_sharded, vocab_shard_range

__all__ = [
    "FusedLMHeadLoss",
    "is_vocab_sharded",
    "vocab_parallel_dpo_loss",
    "vocab_parallel_fused_linear_dpo_loss",
    "vocab_parallel_fused_linear_sequence_logps",
    "vocab_parallel_fused_linear_token_logps",
    "vocab_parallel_sequence_logps",
    "vocab_parallel_token_logps",
    "vocab_shard_range",
]


def vocab_parallel_token_logps(logits_shard, labels, *, process_group=None, vocab_start: Optional[int] = None,
                               ignore_index: int = -100, shift: bool = True, backend: str = "auto",
                               with_stats: bool = False):  # fmt: skip
    """Per-token ``(token_logp, lse)`` (+ ``stats``) of the whole vocabulary from this rank's logits slice
    (N, T, V_r) (or a DTensor sharded on its last dimension) and the global labels; equal on every rank."""
    group = _group(process_group, logits_shard)
    shard, local = sharding.resolve(group, vocab_start, {"logits_shard": (logits_shard, -1)})
    logits, labels = local["logits_shard"], sharding.local(labels)
    check_logits("logits_shard", logits, slice_of_vocabulary=True)
    check_labels(labels, logits, "logits_shard")
    out = tokens.from_logits(logits, labels, ignore_index=ignore_index, shift=shift, backend=backend,
                             with_stats=with_stats, shard=shard)  # fmt: skip
    return (out.logps, out.lse, out.stats) if with_stats else (out.logps, out.lse)


def vocab_parallel_fused_linear_token_logps(hidden, weight_shard, labels, bias_shard=None, *, process_group=None,
                                            vocab_start: Optional[int] = None, ignore_index: int = -100,
                                            shift: bool = True, logit_scale: float = 1.0, softcap=None,
                                            temperature: float = 1.0, memory_budget: Optional[int] = None,
                                            backend: str = "auto", with_stats: bool = False,
                                            gradient_filter=None):  # fmt: skip
    """Per-token ``(token_logp, lse)`` (+ ``stats``) of the fused LM head with this rank's rows
    ``weight_shard`` (V_r, H) (+ ``bias_shard``) of the head (or a DTensor sharded on dim 0); hidden and the
    global labels the same on every rank. Differentiable w.r.t. hidden (summed over the group) and the shards."""
    heads = {"weight_shard": (weight_shard, 0), "bias_shard": (bias_shard, 0)}
    shard, local = sharding.resolve(_group(process_group, weight_shard), vocab_start, heads)
    hidden, labels = sharding.local(hidden), sharding.local(labels)
    check_lm_head("hidden", hidden, "weight_shard", local["weight_shard"], "bias_shard", local["bias_shard"])
    check_labels(labels, hidden, "hidden")
    check_transform(logit_scale, softcap, temperature)
    check_memory_budget(memory_budget)
    out = tokens.from_hidden(
        hidden, local["weight_shard"], local["bias_shard"], labels, ignore_index=ignore_index, shift=shift,
        logit_scale=logit_scale, softcap=softcap, temperature=temperature, memory_budget=memory_budget,
        backend=backend, with_stats=with_stats, gradient_filter=gradient_filter, shard=shard,
    )  # fmt: skip
    return (out.logps, out.lse, out.stats) if with_stats else (out.logps, out.lse)


def vocab_parallel_sequence_logps(logits_shard, labels, *, process_group=None, **options):
    """:func:`dpo_kernels.sequence_logps` over this rank's vocabulary slice, the group defaulting to the world."""
    return sequence_logps(logits_shard, labels, process_group=_group(process_group, logits_shard), **options)


def vocab_parallel_dpo_loss(policy_logits_shard, ref_logits, labels, beta: float = 0.1, *, process_group=None,
                            token_metrics: bool = False, **options):  # fmt: skip
    """:func:`dpo_kernels.fused_dpo_loss` on this rank's slices of the policy's (and reference's) logits."""
    return fused_dpo_loss(policy_logits_shard, ref_logits, labels, beta, token_metrics=token_metrics,
                          process_group=_group(process_group, policy_logits_shard), **options)  # fmt: skip


def vocab_parallel_fused_linear_sequence_logps(hidden, weight_shard, labels, bias_shard=None, *, process_group=None,
                                               **options):  # fmt: skip
    """:func:`dpo_kernels.fused_linear_sequence_logps` with this rank's rows of the LM head."""
    return fused_linear_sequence_logps(hidden, weight_shard, labels, bias_shard,
                                       process_group=_group(process_group, weight_shard), **options)  # fmt: skip


def vocab_parallel_fused_linear_dpo_loss(policy_hidden, weight_shard, labels, *, process_group=None,
                                         ref_weight_shard=None, bias_shard=None, ref_bias_shard=None,
                                         token_metrics: bool = False, **options):  # fmt: skip
    """:func:`dpo_kernels.fused_linear_dpo_loss` with this rank's rows of the policy's (and reference's) head."""
    return fused_linear_dpo_loss(
        policy_hidden, weight_shard, labels, ref_weight=ref_weight_shard, bias=bias_shard, ref_bias=ref_bias_shard,
        token_metrics=token_metrics, process_group=_group(process_group, weight_shard), **options,
    )  # fmt: skip


def _group(process_group, tensor):
    """The group of a ``vocab_parallel_*`` call: as given; None for a DTensor (its mesh's, or none when it is
    replicated), else the world's."""
    if process_group is not None or sharding.is_dtensor(tensor):
        return process_group
    return sharding.world()


class FusedLMHeadLoss(nn.Module):
    """The LM head and the fused DPO loss as one module, so that wrappers which manage parameters around a
    module's ``forward`` (FSDP2 ``fully_shard``, FSDP1, DeepSpeed ZeRO-3, DDP) see the head being used.

    ``loss, metrics = head_loss(hidden, labels, ref_logps=..., beta=...)`` calls
    :func:`dpo_kernels.fused_linear_dpo_loss` on ``lm_head.weight`` / ``lm_head.bias``. Under
    ``fully_shard(head_loss)`` (or ``fully_shard`` of a parent whose forward calls it) the weight is
    unsharded (all-gathered) for the forward and again for the backward, and its gradient
    reduce-scattered, exactly as for ``lm_head(hidden)``; the logits are never formed. A tensor-parallel
    head (a DTensor sharded on the vocabulary, ``ColwiseParallel``) runs the vocabulary-parallel path, as
    ``fused_linear_dpo_loss`` does with it; its ranks must see the same tokens (checked).

    ``lm_head``: an ``nn.Linear``-like module with ``weight`` (V, H) and ``bias`` (V,) or None.
    Keyword arguments given at construction (``beta``, ``logit_scale``, ``softcap``, ``backend``, ...)
    are defaults that call-time keywords override.
    """

    def __init__(self, lm_head: nn.Module, **defaults):
        super().__init__()
        self.lm_head = lm_head
        self.defaults = defaults

    def forward(self, hidden, labels, **kwargs):
        options = {**self.defaults, **kwargs}
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        return fused_linear_dpo_loss(hidden, weight, labels, bias=bias, **options)
