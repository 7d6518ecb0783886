"""The public entry points: fused per-sequence log-probs and the drop-in DPO loss."""

import torch

from . import distributed, ops, packing
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
    process_group=None,
    vocab_start=None,
    cu_seqlens=None,
    position_ids=None,
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

    Vocabulary parallelism: with ``process_group`` (or ``vocab_start``, or ``logits`` a DTensor sharded on
    its last dimension) each rank passes its slice of the vocabulary and the global labels; see
    :func:`dpo_kernels.distributed.vocab_parallel_sequence_logps`.

    Padding-free packed batches: logits (1, total, V), labels (1, total) and ``cu_seqlens`` ((S + 1,)
    sequence starts) or ``position_ids`` ((1, total), restarting at 0 per sequence) give the (S,)
    per-sequence values of the padded layout; with ``shift`` no sequence predicts its successor's first
    token (:mod:`dpo_kernels.packing`).
    """
    if distributed.wanted(process_group, vocab_start, logits):
        _no_inplace(inplace_backward)
        packing.refuse_vocab_parallel(cu_seqlens, position_ids)
        return distributed.vocab_parallel_sequence_logps(
            logits, labels, process_group=process_group, vocab_start=vocab_start, ignore_index=ignore_index,
            shift=shift, average=average, backend=backend,
        )  # fmt: skip
    check_logits("logits", logits)
    backend = ops.resolve_backend(backend, logits.device, logits.dtype)
    check_labels(labels, logits, "logits")
    pk = packing.resolve(labels, cu_seqlens, position_ids) if packing.wanted(cu_seqlens, position_ids) else None
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "inplace_backward=True would overwrite the leaf tensor `logits` with its own gradient; "
            "use it on logits produced by a model (a non-leaf tensor)"
        )
    labels, shift = packing.kernel_labels(labels, pk, ignore_index, shift)
    token_logp, _, _ = torch.ops.dpo_kernels.token_logps(
        logits, labels, ignore_index, shift, backend, inplace_backward, False
    )
    scored = lambda: packing.scored(labels, shift, pk, ignore_index)  # noqa: E731  (only average needs it)
    return _per_sequence(packing.layout(token_logp, pk), scored, average)


def _no_inplace(inplace_backward: bool) -> None:
    if inplace_backward:
        raise ValueError("inplace_backward=True is not supported on the vocabulary-parallel path (process_group=)")


def _per_sequence(token_logp, scored, average: bool) -> torch.Tensor:
    """Sum (or mean over the tokens of the mask ``scored()`` gives, 0 where there are none) of (N, T')
    per-token log-probs."""
    total = token_logp.sum(-1)
    if average:
        return total / scored().sum(-1).clamp(min=1)
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
    loss_type="sigmoid",
    ld_alpha=None,
    use_weighting: bool = False,
    token_metrics: bool = True,
    process_group=None,
    vocab_start=None,
    cu_seqlens=None,
    position_ids=None,
    **loss_options,
):
    """Drop-in replacement for :func:`dpo_kernels.reference.dpo_loss`: same arguments, layout and metrics.

    policy_logits: (2B, T, V), chosen sequences first, rejected second; labels: (2B, T) with
    ``ignore_index`` on prompt and padding. ``ref_logits``: (2B, T, V) reference logits (scored without
    autograd, nothing saved), a (2B,) tensor of precomputed reference log-probs, or None for
    reference-free DPO. ``loss_type`` and ``loss_options`` select the loss of
    :func:`dpo_kernels.losses.preference_loss`. Returns ``(loss, metrics)``; metrics are detached 0-dim
    tensors under TRL's names (see :func:`dpo_kernels.reference.dpo_loss`), the token metrics computed
    in the same kernel pass as the log-probs.

    Vocabulary parallelism: ``process_group`` (or ``vocab_start``, or DTensor logits sharded on the
    vocabulary) as in :func:`sequence_logps`; the reference logits are then this rank's slice too.

    Packed batches as in :func:`sequence_logps` (``cu_seqlens`` / ``position_ids``): sequences 0..B-1
    are the chosen and B..2B-1 the rejected; ``ref_logits`` is then packed the same way, or (2B,).
    """
    from . import preference

    if distributed.wanted(process_group, vocab_start, policy_logits, ref_logits):
        _no_inplace(inplace_backward)
        packing.refuse_vocab_parallel(cu_seqlens, position_ids)
        return distributed.vocab_parallel_dpo_loss(
            policy_logits, ref_logits, labels, beta, process_group=process_group, vocab_start=vocab_start,
            ignore_index=ignore_index, average=average, backend=backend, token_metrics=token_metrics,
            loss_type=loss_type, ld_alpha=ld_alpha, use_weighting=use_weighting, **loss_options,
        )  # fmt: skip
    check_beta(beta)
    preference.check_options(average=average, ld_alpha=ld_alpha, use_weighting=use_weighting)
    check_logits("policy_logits", policy_logits)
    backend = ops.resolve_backend(backend, policy_logits.device, policy_logits.dtype)
    check_labels(labels, policy_logits, "policy_logits")
    pk = packing.resolve(labels, cu_seqlens, position_ids) if packing.wanted(cu_seqlens, position_ids) else None
    if pk is None:
        check_pairs("policy_logits", policy_logits.shape[0])
    else:
        check_pairs("the packed batch (cu_seqlens / position_ids)", len(pk.bounds) - 1)
    check_ref(ref_logits, policy_logits, n_sequences=None if pk is None else len(pk.bounds) - 1)
    if inplace_backward and policy_logits.is_leaf and policy_logits.requires_grad:
        raise ValueError(
            "inplace_backward=True would overwrite the leaf tensor `policy_logits` with its own gradient; "
            "use it on logits produced by a model (a non-leaf tensor)"
        )
    with_stats = preference.needs_stats(token_metrics, use_weighting)
    labels, shift = packing.kernel_labels(labels, pk, ignore_index, True)
    token_logp, lse, stats = torch.ops.dpo_kernels.token_logps(
        policy_logits, labels, ignore_index, shift, backend, inplace_backward, with_stats
    )
    token_logp, lse, stats = (packing.layout(t, pk) for t in (token_logp, lse, stats))
    mask = packing.scored(labels, shift, pk, ignore_index)
    if ref_logits is None or ref_logits.dim() == 1:
        ref = ref_logits
    else:
        with torch.no_grad():
            ref_tokens, _, _ = torch.ops.dpo_kernels.token_logps(
                ref_logits, labels, ignore_index, shift, backend, False, False
            )
            ref_tokens = packing.layout(ref_tokens, pk)
            ref = preference.reduce_sequences(ref_tokens, mask, average=average, ld_alpha=ld_alpha)
    return preference.dpo_from_tokens(
        token_logp, mask, ref, stats=stats if with_stats else None, lse=ops.lse_value(lse),
        vocab_size=policy_logits.shape[-1],
        beta=beta, loss_type=loss_type, average=average, ld_alpha=ld_alpha, use_weighting=use_weighting,
        **loss_options,
    )  # fmt: skip
