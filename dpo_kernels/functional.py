"""The public entry points: fused per-sequence log-probs and the drop-in DPO loss."""

import torch

from . import losses, ops
from ._validation import check_beta, check_labels, check_logits, check_pairs, check_ref


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Per-sequence log-probs of ``labels`` under ``logits``, without a (N, T, V) intermediate.

    Same semantics as :func:`dpo_kernels.reference.sequence_logps`: with ``shift``, logits[:, :-1]
    predict labels[:, 1:] (by index arithmetic, no copy); tokens labelled ``ignore_index`` are skipped;
    the sum over scored tokens, or their mean with ``average`` (0 for a sequence with none).

    logits: (N, T, V) float32/bfloat16/float16 (float64 on the torch backend), any strides.
    labels: (N, T) int64/int32. Returns (N,) float32 (float64 for float64 logits), differentiable
    w.r.t. ``logits``; the gradient has the logits' dtype.

    ``inplace_backward=True`` writes the gradient into the logits' own storage instead of a new
    tensor, saving one logits-sized buffer. It is safe when nothing else needs these logits after this
    loss's backward: the usual case of an LM head whose output feeds only this loss. Autograd raises
    if another op saved the same logits for its backward; you must not read the logits after backward.
    Under torch.compile the gradient is written out of place.
    """
    check_logits("logits", logits)
    backend = ops.resolve_backend(backend, logits.device, logits.dtype)
    check_labels(labels, logits, "logits")
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "inplace_backward=True would overwrite the leaf tensor `logits` with its own gradient; "
            "use it on logits produced by a model (a non-leaf tensor)"
        )
    token_logp, _, _ = torch.ops.dpo_kernels.token_logps(
        logits, labels, ignore_index, shift, backend, inplace_backward, False
    )
    return _per_sequence(token_logp, labels, ignore_index, shift, average)


def _per_sequence(token_logp, labels, ignore_index: int, shift: bool, average: bool) -> torch.Tensor:
    """Sum (or mean over scored tokens, 0 where there are none) of (N, T - shift) per-token log-probs."""
    total = token_logp.sum(-1)
    if average:
        scored = labels[:, int(shift) :] != ignore_index
        return total / scored.sum(-1).clamp(min=1)
    return total


def fused_dpo_loss(
    policy_logits: torch.Tensor,
    ref_logits,
    labels: torch.Tensor,
    beta: float = 0.1,
    *,
    ignore_index: int = -100,
    average: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
):
    """Drop-in replacement for :func:`dpo_kernels.reference.dpo_loss`: same arguments, layout and metrics.

    policy_logits: (2B, T, V), chosen sequences first, rejected second; labels: (2B, T) with
    ``ignore_index`` on prompt and padding. ``ref_logits``: (2B, T, V) reference logits (scored without
    autograd, nothing saved), a (2B,) tensor of precomputed reference log-probs, or None for
    reference-free DPO. Returns ``(loss, metrics)``; metrics are detached 0-dim tensors
    ``reward_chosen``, ``reward_rejected``, ``accuracy``.
    """
    check_beta(beta)
    kwargs = dict(ignore_index=ignore_index, average=average, backend=backend)
    if isinstance(policy_logits, torch.Tensor) and policy_logits.dim() == 3:
        check_pairs("policy_logits", policy_logits.shape[0])
    policy = sequence_logps(policy_logits, labels, inplace_backward=inplace_backward, **kwargs)
    check_ref(ref_logits, policy_logits)
    if ref_logits is None:
        ref = torch.zeros_like(policy)
    elif ref_logits.dim() == 1:
        ref = ref_logits.detach().to(policy.dtype)
    else:
        with torch.no_grad():
            ref = sequence_logps(ref_logits, labels, **kwargs)
    policy_chosen, policy_rejected = policy.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    return losses.dpo_sigmoid(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
