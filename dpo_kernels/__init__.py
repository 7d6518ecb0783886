"""Fused kernels for preference optimization (DPO and its family).

Public API:
- :func:`sequence_logps`: per-sequence log-probs of the labels, no (N, T, V) intermediate;
- :func:`fused_dpo_loss`: drop-in for :func:`dpo_kernels.reference.dpo_loss`, every loss type of the
  DPO family (``loss_type=``) with TRL's metrics;
- :func:`fused_linear_sequence_logps`, :func:`fused_linear_dpo_loss`: the same from the last hidden
  states and the LM head weight, without ever forming the logits; :func:`fused_linear_kto_loss`: KTO
  and unpaired APO-zero on unpaired completions, the same way;
- :mod:`dpo_kernels.losses`: the loss family on per-sequence log-probs (``preference_loss``,
  ``kto_loss``, ``listwise_loss``);
- vocabulary parallelism: ``process_group=`` (or a DTensor sharded over the vocabulary) on every entry
  point above (:mod:`dpo_kernels.sharding`); :mod:`dpo_kernels.distributed`: ``FusedLMHeadLoss`` and the
  ``vocab_parallel_*`` names;
- :mod:`dpo_kernels.integrations`: TRL's ``DPOTrainer`` drop-in and Hugging Face helpers (imported
  on demand: they need the ``trl`` extra);
- :mod:`dpo_kernels.reference`: the naive reference everything is tested against.
"""

from . import distributed, losses, ops, reference
from .functional import fused_dpo_loss, sequence_logps
from .fused_linear import fused_linear_dpo_loss, fused_linear_kto_loss, fused_linear_sequence_logps

__all__ = [
    "distributed",
    "fused_dpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_sequence_logps",
    "losses",
    "ops",
    "reference",
    "sequence_logps",
]
__version__ = "0.1.0"
