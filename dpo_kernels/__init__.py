"""Fused kernels for preference optimization (DPO and its family).

Public API:
- :func:`sequence_logps`: per-sequence log-probs of the labels, no (N, T, V) intermediate;
- :func:`fused_dpo_loss`: drop-in for :func:`dpo_kernels.reference.dpo_loss`;
- :func:`fused_linear_sequence_logps`, :func:`fused_linear_dpo_loss`: the same from the last hidden
  states and the LM head weight, without ever forming the logits;
- :mod:`dpo_kernels.reference`: the naive reference both are tested against.
"""

from . import ops, reference
from .functional import fused_dpo_loss, sequence_logps
from .fused_linear import fused_linear_dpo_loss, fused_linear_sequence_logps

__all__ = [
    "fused_dpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_sequence_logps",
    "ops",
    "reference",
    "sequence_logps",
]
__version__ = "0.1.0"
