"""The public entry points on logits: fused per-sequence log-probs and the drop-in DPO loss."""

import torch

from . import packing, preference, sharding, tokens
from ._validation import check_beta, check_labels, check_logits, check_pairs, check_ref


def _check_inplace(inplace_backward: bool, logits, name: str, shard) -> None:
    if not inplace_backward:
        return
    if shard is not None:
        raise ValueError("inplace_backward=True is not supported on the vocabulary-parallel path (process_group=)")
    if logits.is_leaf and logits.requires_grad:
        raise ValueError(
            f"inplace_backward=True would overwrite the leaf tensor `{name}` with its own gradient; "
            "use it on logits produced by a model (a non-leaf tensor)"
        )


def _packed(labels, cu_seqlens, position_ids, tokens_name="logits"):
    if not packing.wanted(cu_seqlens, position_ids):
        return None
    return packing.resolve(labels, sharding.local(cu_seqlens), sharding.local(position_ids), tokens_name=tokens_name)


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
    its last dimension over a 1-D mesh) ``logits`` is this rank's slice [vocab_start, vocab_start + V_r) of
    the vocabulary, every rank of the group passing the same global ``labels``; ``vocab_start`` defaults to
    the sum of the lower ranks' V_r (one small all-gather). Same result on every rank; the gradient is the
    slice's part of the whole (``dpo_kernels.sharding``).

    Padding-free packed batches: logits (1, total, V), labels (1, total) and ``cu_seqlens`` ((S + 1,)
    sequence starts) or ``position_ids`` ((1, total), restarting at 0 per sequence) give the (S,)
    per-sequence values of the padded layout; with ``shift`` no sequence predicts its successor's first
    token (:mod:`dpo_kernels.packing`).
    """
    shard, local = sharding.resolve(process_group, vocab_start, {"logits": (logits, -1)})
    logits, labels = local["logits"], sharding.local(labels)
    check_logits("logits", logits, slice_of_vocabulary=shard is not None)
    check_labels(labels, logits, "logits")
    _check_inplace(inplace_backward, logits, "logits", shard)
    toks = tokens.from_logits(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend, inplace_backward=inplace_backward,
        packed=_packed(labels, cu_seqlens, position_ids), shard=shard, with_mask=average,
    )  # fmt: skip
    return tokens.per_sequence(toks, average)


def fused_dpo_loss(
    policy_logits: torch.Tensor,
    ref_logits,
    labels: torch.Tensor,
    beta: float = 0.1,
    *,
    ignore_index: int = -100,
    shift: bool = True,
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
    ref_is_logits = isinstance(ref_logits, torch.Tensor) and ref_logits.dim() == 3
    shard, local = sharding.resolve(process_group, vocab_start, {
        "policy_logits": (policy_logits, -1), "ref_logits": (ref_logits if ref_is_logits else None, -1)})  # fmt: skip
    policy_logits, labels = local["policy_logits"], sharding.local(labels)
    ref_logits = local["ref_logits"] if ref_is_logits else sharding.local(ref_logits)
    check_beta(beta)
    preference.check_options(average=average, ld_alpha=ld_alpha, use_weighting=use_weighting)
    check_logits("policy_logits", policy_logits, slice_of_vocabulary=shard is not None)
    check_labels(labels, policy_logits, "policy_logits")
    packed = _packed(labels, cu_seqlens, position_ids)
    if packed is None:
        check_pairs("policy_logits", policy_logits.shape[0])
    else:
        check_pairs("the packed batch (cu_seqlens / position_ids)", len(packed.bounds) - 1)
    check_ref(ref_logits, policy_logits, n_sequences=None if packed is None else len(packed.bounds) - 1)
    _check_inplace(inplace_backward, policy_logits, "policy_logits", shard)
    with_stats = preference.needs_stats(token_metrics, use_weighting)
    common = dict(ignore_index=ignore_index, shift=shift, backend=backend, packed=packed, shard=shard)
    policy = tokens.from_logits(policy_logits, labels, inplace_backward=inplace_backward, with_stats=with_stats,
                                **common)  # fmt: skip
    ref = ref_logits
    if ref_is_logits:
        with torch.no_grad():
            ref = tokens.from_logits(ref_logits, labels, **common)
    return preference.dpo_from_passes(
        policy, ref, with_stats=with_stats, beta=beta, loss_type=loss_type, average=average, ld_alpha=ld_alpha,
        use_weighting=use_weighting, **loss_options,
    )  # fmt: skip
