"""The naive reference: the hand-rolled PyTorch DPO loss every tutorial shows.

It materializes fp32 ``log_softmax`` over the whole (N, T, V) logits. It is the single source of truth
that the tests and the benchmarks compare the fused kernels against, so it stays plain on purpose.
"""

import torch
import torch.nn.functional as F

from . import packing, preference


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True):
    """(N, T - shift) log p(label) per token, fp32 (fp64 for fp64 logits), 0 where the label is ignored.
    With ``shift``, logits[:, :-1] predict labels[:, 1:]."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    mask = labels != ignore_index
    token_logp = logp.gather(-1, labels.masked_fill(~mask, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token_logp, 0.0)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    cu_seqlens=None,
    position_ids=None,
) -> torch.Tensor:
    """Per-sequence sum (or mean with ``average``) of log p(label) over tokens whose label is not ignored.

    logits: (N, T, V); labels: (N, T). With ``shift``, logits[:, :-1] predict labels[:, 1:].
    Returns (N,) fp32 (fp64 for fp64 logits). A sequence with no scored token gets 0.

    A packed batch (logits (1, total, V), labels (1, total), ``cu_seqlens`` or ``position_ids``, see
    :mod:`dpo_kernels.packing`) is scored as its padded layout (:func:`padded`): returns (S,).
    """
    if packing.wanted(cu_seqlens, position_ids):
        pk = packing.resolve(labels, cu_seqlens, position_ids)
        logits, labels = padded(logits, pk), padded(labels, pk, fill=ignore_index)
    total = token_logps(logits, labels, ignore_index=ignore_index, shift=shift).sum(-1)
    if average:
        mask = labels[:, int(shift) :] != ignore_index
        return total / mask.sum(-1).clamp(min=1)
    return total


# Columns of the per-token statistics the kernels return when asked (``with_stats``), on the fp32
# logits z of each scored token; unscored tokens hold zeros. TRL's logged metrics derive from them:
# logits/* = sum_logits / V, entropy, mean_token_accuracy = top1, and WPO's log Σ p² = lse2 − 2·lse.
STATS = ("sum_logits", "entropy", "top1", "lse2")


def token_stats(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True):
    """(N, T - shift, 4) fp32 (fp64 for fp64 logits) per-token statistics, columns named by ``STATS``:
    Σ_v z_v; the entropy −Σ_v p_v·log p_v; 1.0 where the label is the first index of the maximum logit,
    else 0.0; log Σ_v exp(2·z_v). Zeros on tokens labelled ``ignore_index``."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = F.log_softmax(z, dim=-1)
    mask = labels != ignore_index
    stats = torch.stack(
        [
            z.sum(-1),
            -(logp.exp() * logp).sum(-1),
            (z.argmax(-1) == labels).to(z.dtype),
            torch.logsumexp(2 * z, dim=-1),
        ],
        dim=-1,
    )
    return torch.where(mask.unsqueeze(-1), stats, 0.0)


def dpo_loss(
    policy_logits,
    ref_logits,
    labels,
    beta: float = 0.1,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    loss_type="sigmoid",
    ld_alpha=None,
    use_weighting: bool = False,
    token_metrics: bool = True,
    cu_seqlens=None,
    position_ids=None,
    **loss_options,
):
    """The DPO family's loss from full logits: DPO (Rafailov et al. 2023, arXiv:2305.18290) and every
    ``loss_type`` of :func:`dpo_kernels.losses.preference_loss`.

    policy_logits: (2B, T, V), chosen sequences first, rejected second; labels: (2B, T) with
    ``ignore_index`` on prompt and padding; with ``shift``, logits position t predicts label t + 1.
    ``ref_logits`` is (2B, T, V) logits of the frozen reference,
    a (2B,) tensor of precomputed reference log-probs, or None (reference-free: ref log-probs are 0).

    Returns ``(loss, metrics)``; the metrics are detached 0-dim tensors (``float()`` them to log) under
    TRL's names: ``rewards/chosen|rejected|accuracies|margins``, ``logps/chosen|rejected`` and, with
    ``token_metrics``, ``logits/chosen|rejected``, ``entropy``, ``mean_token_accuracy`` (plus
    ``nll_loss`` where an NLL term is used), and the hand-rolled loss's ``reward_chosen``,
    ``reward_rejected`` and ``accuracy`` (:func:`dpo_kernels.losses.lesson_metrics`).
    """
    if packing.wanted(cu_seqlens, position_ids):  # sequences 0..B-1 chosen, B..2B-1 rejected
        pk = packing.resolve(labels, cu_seqlens, position_ids)
        policy_logits, labels = padded(policy_logits, pk), padded(labels, pk, fill=ignore_index)
        if ref_logits is not None and ref_logits.dim() == 3:
            ref_logits = padded(ref_logits, pk)
    preference.check_options(average=average, ld_alpha=ld_alpha, use_weighting=use_weighting)
    kw = dict(ignore_index=ignore_index, shift=shift)
    mask = labels[:, int(shift) :] != ignore_index
    policy_tokens = token_logps(policy_logits, labels, **kw)
    stats = lse = None
    if preference.needs_stats(token_metrics, use_weighting):
        stats = token_stats(policy_logits, labels, **kw)
        scored_logits = policy_logits[:, : policy_logits.shape[1] - int(shift)]
        lse = torch.logsumexp(scored_logits.to(policy_tokens.dtype), dim=-1)
    if ref_logits is None:
        ref = None
    elif ref_logits.dim() == 1:
        ref = ref_logits
    else:
        with torch.no_grad():
            ref_tokens = token_logps(ref_logits, labels, **kw)
            ref = preference.reduce_sequences(ref_tokens, mask, average=average, ld_alpha=ld_alpha)
    return preference.dpo_from_tokens(
        policy_tokens, mask, ref, stats=stats, lse=lse, vocab_size=policy_logits.shape[-1], beta=beta,
        loss_type=loss_type, average=average, ld_alpha=ld_alpha, use_weighting=use_weighting, **loss_options,
    )  # fmt: skip


def padded(packed: torch.Tensor, pk: "packing.Packing", fill=0) -> torch.Tensor:
    """A packed (1, total, ...) tensor as the padded batch it came from: (S, L, ...), each sequence
    right-padded with ``fill`` to the longest one, L."""
    rows = []
    for start, end in zip(pk.bounds[:-1], pk.bounds[1:]):
        row = packed[0, start:end]
        pad = row.new_full((pk.max_length - (end - start), *row.shape[1:]), fill)
        rows.append(torch.cat([row, pad]))
    return torch.stack(rows)


def lm_head_logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """The logits a fused LM head scores: ``z = (hidden @ weightᵀ + bias) · logit_scale`` (Cohere's
    logit scale), then ``softcap · tanh(z / softcap)`` when ``softcap`` is set (Gemma's final-logit
    softcapping), then ``/ temperature``. hidden: (..., H), weight: (V, H), bias: (V,) or None."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature
