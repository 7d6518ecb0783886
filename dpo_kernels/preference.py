"""From per-token kernel outputs to a preference loss and TRL's logged metrics.

Every DPO entry point — the naive reference, ``fused_dpo_loss`` on logits and ``fused_linear_dpo_loss``
on hidden states — ends here, so their numbers cannot drift apart: the per-sequence reduction (sum,
mean, or LD-DPO's weighting), the reference side, the loss family of :mod:`dpo_kernels.losses`, WPO
weights, and the metrics under the names TRL's ``DPOTrainer`` logs.

Layout: (2B, T') per-token tensors, chosen sequences first, rejected second; ``mask`` marks scored
tokens. ``stats`` are the per-token statistics of ``reference.STATS`` from the same kernel pass.
"""

from typing import Optional

import torch

from . import losses, ops, tokens

# Loss types that need the number of scored tokens per sequence, or the chosen NLL.
_NEEDS_NLL = ("sft", "orpo")
# Loss types that divide the sequence scores by their length themselves.
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")


def loss_types(loss_type) -> tuple[str, ...]:
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def needs_stats(token_metrics: bool, use_weighting: bool) -> bool:
    """Whether the policy's kernel pass must return per-token statistics."""
    return token_metrics or use_weighting


def check_options(*, average: bool, ld_alpha: Optional[float], use_weighting: bool) -> None:
    if ld_alpha is not None:
        if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be None or a number in [0, 1], got {ld_alpha!r}")
        if average:
            raise ValueError("ld_alpha (LD-DPO's weighted sum) cannot be combined with average=True")
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting must be a bool, got {type(use_weighting).__name__}")


def reduce_sequences(token_logps, mask, *, average: bool, ld_alpha: Optional[float]) -> torch.Tensor:
    """(2B, T') per-token log-probs (zeros where unscored) -> (2B,) per-sequence log-probs."""
    if ld_alpha is not None:
        return losses.ld_dpo_logps(token_logps, mask, ld_alpha)
    total = token_logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def dpo_from_tokens(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: Optional[torch.Tensor],
    *,
    stats: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    vocab_size: int,
    beta: float,
    loss_type="sigmoid",
    average: bool = False,
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    norm_lengths: Optional[torch.Tensor] = None,
    nll_mask: Optional[torch.Tensor] = None,
    **loss_options,
):
    """(loss, metrics) from the policy's (2B, T') per-token log-probs and the (2B,) reference log-probs
    (already reduced like the policy's; None: reference-free).

    ``stats`` (2B, T', 4) and ``lse`` (2B, T') come from the policy's kernel pass: ``stats`` feeds the
    token metrics (``logits/*``, ``entropy``, ``mean_token_accuracy``) and, with ``lse``, WPO's weights.
    ``norm_lengths`` (2B,): what the length-normalised losses (ipo, sigmoid_norm) divide by instead of
    the scored-token counts (see :func:`dpo_kernels.losses.preference_loss`); with ``average=True`` they
    must be given (ones: the averages are already per-token scores).

    ``nll_mask`` (2B, T') bool: the tokens the chosen NLL (sft, orpo, ``rpo_alpha`` and the ``nll_loss``
    metric) covers when they are not the scored ones (TRL's ORPO trainer: prompt and completion).
    ``token_logps`` (and ``stats``) then hold the pass's values on ``mask | nll_mask``; the preference terms
    and the token metrics read ``mask`` only.
    """
    nll_terms = any(t in _NEEDS_NLL for t in loss_types(loss_type)) or loss_options.get("rpo_alpha") is not None
    normalised = [t for t in loss_types(loss_type) if t in _LENGTH_NORMALISED]
    if average and normalised and norm_lengths is None:
        raise ValueError(
            f"loss types {normalised} normalise by length themselves: average=True would divide the scores by the "
            "length twice; leave average=False (or give norm_lengths: ones when the averages are the scores)"
        )
    nll_logps = None
    if nll_mask is not None:
        if not isinstance(nll_mask, torch.Tensor) or nll_mask.dtype != torch.bool or nll_mask.shape != mask.shape:
            raise ValueError(f"nll_mask must be a bool tensor of shape {tuple(mask.shape)} like mask")
        zero = token_logps.new_zeros(())
        nll_logps = torch.where(nll_mask, token_logps, zero).chunk(2)[0]
        loss_options["chosen_nll_logps"] = nll_logps.sum(-1)
        loss_options["chosen_nll_lengths"] = nll_mask.chunk(2)[0].sum(-1).to(token_logps.dtype)
        token_logps = torch.where(mask, token_logps, zero)
        if stats is not None:
            stats = torch.where(mask[..., None], stats, stats.new_zeros(()))
    policy = reduce_sequences(token_logps, mask, average=average, ld_alpha=ld_alpha)
    if nll_terms and (average or ld_alpha is not None):
        # The NLL and ORPO's odds are defined on summed token log-probs, whatever the DPO terms use.
        loss_options["chosen_sum_logps"], loss_options["rejected_sum_logps"] = token_logps.sum(-1).chunk(2)
    ref = torch.zeros_like(policy) if ref_logps is None else ref_logps.detach().to(policy.dtype)
    lengths = mask.sum(-1).to(policy.dtype)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    if norm_lengths is not None:
        if not isinstance(norm_lengths, torch.Tensor) or tuple(norm_lengths.shape) != tuple(lengths.shape):
            got = tuple(norm_lengths.shape) if isinstance(norm_lengths, torch.Tensor) else type(norm_lengths).__name__
            raise ValueError(f"norm_lengths must have shape {tuple(lengths.shape)}, got {got}")
        loss_options["chosen_norm_lengths"], loss_options["rejected_norm_lengths"] = norm_lengths.chunk(2)
    pair_weights = None
    if use_weighting:
        if stats is None or lse is None:
            raise ValueError("use_weighting=True needs the per-token statistics of the policy pass")
        log_sum_sq_probs = stats[..., 3] - 2 * lse  # log Σ p² = lse(2z) − 2·lse(z)
        weights = losses.wpo_weights(token_logps, torch.where(mask, log_sum_sq_probs, 0.0), mask)
        pair_weights = losses.wpo_pair_weights(weights)
    policy_chosen, policy_rejected = policy.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    out = losses.preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        loss_type=loss_type, beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        pair_weights=pair_weights, **loss_options,
    )  # fmt: skip
    metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, policy_chosen, policy_rejected)
    metrics.update(losses.lesson_metrics(beta, policy_chosen - ref_chosen, policy_rejected - ref_rejected))
    if stats is not None:
        metrics.update(token_metrics(stats, mask, vocab_size))
    if nll_terms:
        if nll_logps is None:
            nll_logps, nll_tokens = token_logps.chunk(2)[0], mask.chunk(2)[0]
        else:
            nll_tokens = nll_mask.chunk(2)[0]
        metrics["nll_loss"] = -nll_logps.detach().sum() / nll_tokens.sum().clamp(min=1)
    if "orpo" in loss_types(loss_type):
        # ORPO's odds are on the average per-token log-probs of the summed ones
        sums = token_logps.detach().sum(-1) if average or ld_alpha is not None else policy.detach()
        chosen_avg, rejected_avg = (sums / lengths.clamp(min=1)).chunk(2)
        log_odds = losses.orpo_log_odds(chosen_avg, rejected_avg)
        metrics["log_odds_ratio"] = torch.nn.functional.logsigmoid(log_odds).mean()
        metrics["log_odds_chosen"] = log_odds.mean()
    return out.loss, metrics


def dpo_from_passes(policy, ref, *, with_stats: bool, average: bool, ld_alpha: Optional[float], **options):
    """(loss, metrics) from the policy's :class:`dpo_kernels.tokens.Tokens` and the reference: None
    (reference-free), (2B,) precomputed log-probs, or the reference's Tokens (reduced like the policy's)."""
    if isinstance(ref, torch.Tensor) or ref is None:
        ref_logps = ref
    else:
        ref_logps = reduce_sequences(ref.logps, policy.mask, average=average, ld_alpha=ld_alpha)
    return dpo_from_tokens(
        policy.logps, policy.mask, ref_logps, stats=policy.stats if with_stats else None, lse=policy.lse,
        vocab_size=policy.vocab_size, average=average, ld_alpha=ld_alpha, **options,
    )  # fmt: skip


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """TRL's ``rewards/*`` and ``logps/*``: means over the pairs of the batch, detached 0-dim tensors."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def token_metrics(stats: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> dict:
    """TRL's token-level metrics from the kernels' per-token statistics (zeros on unscored tokens):
    ``logits/chosen|rejected`` = mean logit over completion tokens and vocabulary, ``entropy`` = mean
    over all completion tokens, ``mean_token_accuracy`` = share of chosen completion tokens whose
    label is the first argmax. A side with no completion token reports 0, as TRL does."""
    stats = stats.detach()
    counts = mask.sum(-1).to(stats.dtype)
    per_seq = stats.sum(1)  # unscored tokens hold zeros
    chosen, rejected = per_seq.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)

    def mean_over(total, n):
        return total / n.sum().clamp(min=1)

    return {
        "logits/chosen": mean_over(chosen[:, 0].sum(), n_chosen) / vocab_size,
        "logits/rejected": mean_over(rejected[:, 0].sum(), n_rejected) / vocab_size,
        "entropy": mean_over(per_seq[:, 1].sum(), counts),
        "mean_token_accuracy": mean_over(chosen[:, 2].sum(), n_chosen),
    }


# ------------------------------------------------------------------------------------------------ KTO


def kto_from_tokens(
    token_logps: torch.Tensor,
    mask: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    policy_kl_logps: Optional[torch.Tensor],
    ref_kl_logps: Optional[torch.Tensor],
    desirable: torch.Tensor,
    *,
    stats: Optional[torch.Tensor] = None,
    vocab_size=None,
    kl_reduce=None,
    **kto_options,
):
    """(loss, metrics, counts) of KTO (:func:`dpo_kernels.losses.kto_loss`) from the policy's (B, T')
    per-token log-probs of unpaired completions, ``desirable`` (B,) bool marking the desirable ones.

    ``ref_logps`` (B,): the reference's per-sequence log-probs (None: reference-free, zeros);
    ``policy_kl_logps`` / ``ref_kl_logps``: the per-sequence log-probs of the mismatched completions
    (None for ``apo_zero_unpaired``; None ``ref_kl_logps`` with a policy's: reference-free).
    ``stats`` (B, T', 4) from the policy's pass (with ``mask`` and ``vocab_size``) adds the token metrics.

    ``metrics``: the values TRL's ``KTOTrainer`` logs on one process, under its names (``kl``, ``entropy``,
    ``logits/*``, ``rewards/*``, ``logps/*``), as detached 0-dim tensors; a side with no example in the
    batch reports 0 there. ``counts``: for each metric but ``kl`` (already global) and ``rewards/margins``
    (a difference of means), the number of tokens or examples it is a mean over, so that a caller can
    average it over processes as the trainer does (a sum of ``value · count`` over a sum of counts).
    """
    policy = token_logps.sum(-1)
    ref = torch.zeros_like(policy) if ref_logps is None else ref_logps.detach().to(policy.dtype)
    ref_kl = ref_kl_logps
    if policy_kl_logps is not None and ref_kl is None:
        ref_kl = torch.zeros_like(policy_kl_logps)
    out = losses.kto_loss(policy, ref, policy_kl_logps, ref_kl, desirable, kl_reduce=kl_reduce, **kto_options)
    policy = policy.detach()
    n_chosen = desirable.sum().to(policy.dtype)
    n_rejected = desirable.numel() - n_chosen

    def mean_over(total, n):
        return total / n.clamp(min=1)

    metrics = {"kl": out.kl.detach()}
    counts = {}
    if stats is not None:
        stats = stats.detach()
        per_seq = stats.sum(1)  # unscored tokens hold zeros
        tokens = mask.sum(-1).to(stats.dtype)
        chosen_tokens, rejected_tokens = tokens[desirable].sum(), tokens[~desirable].sum()
        counts.update({"entropy": tokens.sum(), "logits/chosen": chosen_tokens, "logits/rejected": rejected_tokens})
        metrics["entropy"] = mean_over(per_seq[:, 1].sum(), counts["entropy"])
        metrics["logits/chosen"] = mean_over(per_seq[desirable, 0].sum(), chosen_tokens) / vocab_size
        metrics["logits/rejected"] = mean_over(per_seq[~desirable, 0].sum(), rejected_tokens) / vocab_size
    counts.update({"rewards/chosen": n_chosen, "logps/chosen": n_chosen, "rewards/rejected": n_rejected,
                   "logps/rejected": n_rejected})  # fmt: skip
    metrics["rewards/chosen"] = mean_over(out.chosen_rewards.sum(), n_chosen)
    metrics["logps/chosen"] = mean_over(policy[desirable].sum(), n_chosen)
    metrics["rewards/rejected"] = mean_over(out.rejected_rewards.sum(), n_rejected)
    metrics["logps/rejected"] = mean_over(policy[~desirable].sum(), n_rejected)
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return out.loss, metrics, counts


def kto_logged(metrics: dict, counts: dict) -> dict:
    """The metrics TRL's ``KTOTrainer`` logs for a batch: it leaves out ``logits/*``, ``rewards/*`` and
    ``logps/*`` of a side with no token or example, and ``rewards/margins`` unless both sides have examples
    (one host synchronization for the counts)."""
    names = [name for name in counts if name != "entropy"]
    present = dict(zip(names, (c > 0 for c in torch.stack([counts[n] for n in names]).tolist())))
    logged = {name: value for name, value in metrics.items() if present.get(name, True)}
    if not (present["rewards/chosen"] and present["rewards/rejected"]):
        logged.pop("rewards/margins")
    return logged


# ------------------------------------------------------------------------------------------- one pass


ROUTES = ("auto", "one_pass", "recompute")


def check_route(route: str) -> str:
    """``route`` of the policy head's differentiation (see ``dpo_kernels.fused_linear_dpo_loss``), checked."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    return route


def one_pass_applies(route: str, reasons: list) -> bool:
    """Whether ``route`` takes the one-pass route given :func:`one_pass_refusals`' ``reasons``; "one_pass" where
    there are reasons raises, naming them."""
    if route == "one_pass" and reasons:
        raise ValueError(f"route='one_pass' cannot run here: {'; '.join(reasons)}")
    return route != "recompute" and not reasons


def one_pass_refusals(loss_type, loss_options: dict, *, needs_grad: bool, labels: torch.Tensor,
                      gradient_filter=None) -> list:  # fmt: skip
    """Why the one-pass route (:func:`dpo_one_pass`) cannot run a loss step; empty when it can."""
    reasons = []
    if not (needs_grad and torch.is_grad_enabled()):
        reasons.append("no gradient is needed (the recompute route's forward is the one pass)")
    if torch.compiler.is_compiling():
        reasons.append("it reads the labels on the host, which torch.compile does not trace")
    if labels.is_cuda and torch.cuda.is_current_stream_capturing():
        reasons.append("it reads the labels on the host, which a CUDA graph capture cannot")
    if gradient_filter is not None:
        reasons.append("gradient_filter is a recompute-route option")
    sorting = [t for t in loss_types(loss_type) if t in ("aot", "aot_unpaired")]
    if sorting:
        reasons.append(f"loss types {sorting} sort the batch's margins, coupling the pairs' gradients")
    if loss_options.get("bco_state") is not None:
        reasons.append("bco_state centres the rewards on the batch's mean, coupling the pairs' gradients")
    return reasons


def pair_groups(counts: list, row_bytes: int, budget: int) -> Optional[list]:
    """Consecutive groups of whole pairs (sequences i and i + B of the 2B ``counts`` of scored tokens) whose
    rows take at most ``budget`` bytes at ``row_bytes`` each; None when a pair alone does not fit."""
    B = len(counts) // 2
    groups, group, used = [], [], 0
    for i in range(B):
        size = (counts[i] + counts[B + i]) * row_bytes
        if size > budget:
            return None
        if group and used + size > budget:
            groups.append(group)
            group, used = [], 0
        group += [i, B + i]
        used += size
    return groups + [group] if group else groups


def one_pass_groups(labels, vocab_size: int, dtype: torch.dtype, device, *, backend: str, memory_budget, ignore_index,
                    shift, packed=None, shard=None) -> tuple:  # fmt: skip
    """(groups, scored, budget) of the one-pass route for (2B, T) ``labels`` (a packed batch's (1, total) with
    ``packed``) under a head of ``vocab_size`` rows (this rank's, with ``shard``): ``scored`` the batch's
    :func:`dpo_kernels.tokens.scored_counts` (one host synchronization), groups None when a pair's scored rows'
    fp32 logits exceed the budget."""
    budget = tokens.one_pass_budget(ops.resolve_backend(backend, device, dtype), memory_budget)
    scored = tokens.scored_counts(labels, vocab_size, ignore_index=ignore_index, shift=shift, packed=packed,
                                  shard=shard)  # fmt: skip
    row_bytes = scored.vocab_rows * (8 if dtype == torch.float64 else 4)
    return pair_groups(scored.counts, row_bytes, budget), scored, budget


def one_pass_token_grad(loss_of):
    """``token_grad`` of :func:`dpo_kernels.tokens.one_pass` for ``loss_of(tokens) -> (loss, metrics)``: the
    loss family's own gradient w.r.t. the (2B, T') per-token log-probs (autograd on per-token tensors). Read at
    one group's tokens, where the groups not yet scored hold zeros, it is exact for a loss that does not couple
    pairs (:func:`one_pass_refusals`)."""

    def token_grad(toks):
        logps = toks.logps.detach().requires_grad_()
        with torch.enable_grad():
            loss, _ = loss_of(toks._replace(logps=logps))
        return torch.autograd.grad(loss, logps, allow_unused=True, materialize_grads=True)[0]

    return token_grad


def dpo_one_pass(run, ref, *, with_stats: bool, average: bool, ld_alpha: Optional[float], **options):
    """(loss, metrics) as :func:`dpo_from_passes`, the policy scored by ``run(token_grad)`` (the one-pass head,
    :func:`dpo_kernels.tokens.one_pass`: the policy's Tokens and a carrier of the gradients it formed while
    each group's logits were live). The loss's value is computed again from the scored tokens; the carrier
    adds the gradient."""
    if isinstance(ref, torch.Tensor) or ref is None:
        ref_logps = ref
    else:
        ref_logps = reduce_sequences(ref.logps, ref.mask, average=average, ld_alpha=ld_alpha)

    def loss_of(toks):
        return dpo_from_tokens(
            toks.logps, toks.mask, ref_logps, stats=toks.stats if with_stats else None, lse=toks.lse,
            vocab_size=toks.vocab_size, average=average, ld_alpha=ld_alpha, **options,
        )  # fmt: skip

    with torch.no_grad():
        policy, carrier = run(one_pass_token_grad(loss_of))
        loss, metrics = loss_of(policy)
    return loss + carrier, metrics  # the value plus an exact zero that carries the gradient
