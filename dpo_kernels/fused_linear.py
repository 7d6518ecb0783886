"""The public entry points on hidden states: the fused LM head's per-sequence log-probs, DPO and KTO losses,
the (N, T, V) logits never formed (the ops: ``dpo_kernels.ops.linear``)."""

from typing import Optional

import torch

from . import losses, packing, preference, sharding, tokens
from ._validation import (
    check_beta,
    check_labels,
    check_lm_head,
    check_memory_budget,
    check_pairs,
    check_ref_head,
    check_transform,
    gradient_filter_eps,
)


def _hidden_call(hidden_name, hidden, labels, weight, bias, cu_seqlens, position_ids, labels_name="labels"):
    """(hidden, labels, packed) of one batch of hidden states scored by the (local) head, checked."""
    hidden, labels = sharding.local(hidden), sharding.local(labels)
    check_lm_head(hidden_name, hidden, "weight", weight, "bias", bias)
    check_labels(labels, hidden, hidden_name, labels_name)
    packed = None
    if packing.wanted(cu_seqlens, position_ids):
        packed = packing.resolve(labels, sharding.local(cu_seqlens), sharding.local(position_ids),
                                 tokens_name=hidden_name)  # fmt: skip
    return hidden, labels, packed


def _head_call(process_group, vocab_start, hidden_name, hidden, labels, heads: dict, cu_seqlens, position_ids):
    """(shard, local heads, hidden, labels, packed) of an entry point's arguments, checked."""
    shard, local = sharding.resolve(process_group, vocab_start, {name: (t, 0) for name, t in heads.items()})
    hidden, labels, packed = _hidden_call(hidden_name, hidden, labels, local["weight"], local["bias"], cu_seqlens,
                                          position_ids)  # fmt: skip
    return shard, local, hidden, labels, packed


def _one_pass_plan(route, hidden, weight, bias, labels, *, backend, memory_budget, ignore_index, shift, loss_type,
                   loss_options, gradient_filter, packed, shard):  # fmt: skip
    """(groups, scored) of the one-pass route, or None for the recompute route (see fused_linear_dpo_loss)."""
    if preference.check_route(route) == "recompute":
        return None
    needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    reasons = preference.one_pass_refusals(loss_type, loss_options, needs_grad=needs_grad, labels=labels,
                                           gradient_filter=gradient_filter)  # fmt: skip
    if not preference.one_pass_applies(route, reasons):
        return None
    groups, scored, budget = preference.one_pass_groups(
        labels, weight.shape[0], hidden.dtype, hidden.device, backend=backend, memory_budget=memory_budget,
        ignore_index=ignore_index, shift=shift, packed=packed, shard=shard,
    )  # fmt: skip
    if groups is None:
        if route == "one_pass":
            counts, B = scored.counts, len(scored.counts) // 2
            rows = max(counts[i] + counts[B + i] for i in range(B))
            raise ValueError(f"route='one_pass': a pair's {rows} scored rows need more fp32 logits than "
                             f"memory_budget={budget} bytes hold")  # fmt: skip
        return None
    return groups, scored


def _n_sequences(hidden, packed) -> int:
    return hidden.shape[0] if packed is None else len(packed.bounds) - 1


def _check_ref_logps(name: str, ref_logps, n_sequences: int) -> torch.Tensor:
    ref_logps = sharding.local(ref_logps)
    if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) != (n_sequences,):
        shape = tuple(ref_logps.shape) if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__
        raise ValueError(f"{name} must have shape ({n_sequences},), got {shape}")
    return ref_logps.detach()


def fused_linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    cu_seqlens=None,
    position_ids=None,
    gradient_filter=None,
) -> torch.Tensor:
    """Per-sequence log-probs of ``labels`` under the LM head ``weight`` applied to ``hidden``.

    The same numbers as ``reference.sequence_logps(reference.lm_head_logits(hidden, weight, bias, ...),
    labels)`` without ever forming the (N, T, V) logits. hidden: (N, T, H); weight: (V, H); bias:
    (V,) or None; labels: (N, T). Logits are ``(hidden·weightᵀ + bias)·logit_scale``, softcapped as
    ``softcap·tanh(z / softcap)`` when ``softcap`` is set (Gemma), divided by ``temperature``.
    Returns (N,) fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight and bias.

    ``memory_budget``: bytes of fp32 logits the portable path forms at a time (default 16 MiB);
    smaller saves memory, larger streams the weight fewer times. On the Triton backend: bytes of the
    forward's fp32 logits of a chunk of rows, and of the backward's dz buffer, one vocabulary chunk of the
    scored rows' logit gradients in the inputs' dtype (default 1 GiB each, one at a time; beside the dz
    buffer an fp32 (rows, H) d_hidden accumulator); larger means fewer, larger GEMMs.

    ``gradient_filter`` (Triton backend; default None, off): the backward drops each (64-row, 128-column)
    tile of the logits' gradient whose softmax entries are all below the threshold and that holds no label,
    and its products skip those tiles (Cut Cross-Entropy's gradient filter, deterministic here). "auto":
    ``torch.finfo(dtype).eps / 32`` of the inputs' dtype (bf16 2^-12); a float: that threshold. Each
    dropped entry p moves a gradient by at most g · p · |logit_scale / temperature| times |W_v| (hidden)
    or |h| (weight); the forward is untouched. It saves time only where few tiles are kept, see
    docs/gradient_filter.md; the other backends compute exact gradients (with a warning).

    Vocabulary parallelism: with ``process_group`` (or ``vocab_start``, or ``weight`` a DTensor sharded on
    dim 0 over a 1-D mesh, e.g. ``ColwiseParallel``) ``weight``/``bias`` are this rank's rows
    [vocab_start, vocab_start + V_r) of the head and every rank passes the same ``hidden`` and global
    ``labels``; ``hidden``'s gradient is summed over the group (``dpo_kernels.sharding``).

    Packed batches (hidden (1, total, H), ``cu_seqlens`` or ``position_ids``) as in
    :func:`dpo_kernels.sequence_logps`: returns the (S,) per-sequence values.
    """
    shard, head, hidden, labels, packed = _head_call(
        process_group, vocab_start, "hidden", hidden, labels, {"weight": weight, "bias": bias}, cu_seqlens, position_ids
    )
    check_transform(logit_scale, softcap, temperature)
    check_memory_budget(memory_budget)
    toks = tokens.from_hidden(
        hidden, head["weight"], head["bias"], labels, ignore_index=ignore_index, shift=shift, logit_scale=logit_scale,
        softcap=softcap, temperature=temperature, memory_budget=memory_budget, backend=backend,
        gradient_filter=gradient_filter, packed=packed, shard=shard, with_mask=average,
    )  # fmt: skip
    return tokens.per_sequence(toks, average)


def fused_linear_dpo_loss(
    policy_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    loss_type="sigmoid",
    ld_alpha=None,
    use_weighting: bool = False,
    token_metrics: bool = True,
    process_group=None,
    vocab_start: Optional[int] = None,
    cu_seqlens=None,
    position_ids=None,
    gradient_filter=None,
    route: str = "auto",
    **loss_options,
):
    """The DPO loss of :func:`dpo_kernels.fused_dpo_loss` straight from the last hidden states.

    policy_hidden: (2B, T, H), chosen first; weight: (V, H). The reference side is either
    ``ref_logps`` (2B,) precomputed log-probs, or ``ref_hidden`` (2B, T, H) scored under ``ref_weight``
    (default: ``weight``, the shared head of a PEFT run) and ``ref_bias`` without autograd, storing
    nothing; neither means reference-free. Returns ``(loss, metrics)`` like ``fused_dpo_loss``.

    Vocabulary parallelism as in :func:`fused_linear_sequence_logps`: ``weight``, ``bias``, ``ref_weight``
    and ``ref_bias`` are then this rank's rows.

    Packed batches (``cu_seqlens`` / ``position_ids``) as in :func:`dpo_kernels.fused_dpo_loss`:
    ``ref_hidden`` packed like ``policy_hidden``, or ``ref_logps`` (S,).

    ``gradient_filter`` (None | "auto" | float) as in :func:`fused_linear_sequence_logps`: the policy
    head's backward only (the reference side has none).

    ``route``: how the policy's head is differentiated. "one_pass": pairs are scored in groups whose scored
    rows' fp32 logits fit ``memory_budget`` (default 1 GiB on the Triton backend, 64 MiB on the CPU); each
    group's logits are formed once, its loss terms' gradient taken while they are live (the loss family's
    own code), dz written over them and the two gradient products run in the forward; the backward only
    scales the saved gradients by the incoming one (6·M·H·V FLOPs instead of 8; the saved d_weight and
    d_hidden are held from the forward to the backward). 16-bit d_weight is rounded once per group.
    A packed batch is grouped by its sequences' pairs; a vocabulary-parallel head combines each group's rows
    over the ranks (one all-gather per group) and sizes the groups by the widest rank's slice.
    "recompute": the logits are dropped in the forward and recomputed in the backward. "auto" (default):
    one-pass where it applies, else recompute: it needs a gradient, eager mode (no torch.compile trace, no
    CUDA graph capture: the grouping reads the scored counts on the host), no ``gradient_filter``, a loss
    that does not couple pairs (not "aot" / "aot_unpaired", no ``bco_state``) and every pair fitting the
    budget. "one_pass" where it does not apply raises, naming why.
    """
    heads = {"weight": weight, "bias": bias, "ref_weight": ref_weight, "ref_bias": ref_bias}
    shard, head, policy_hidden, labels, packed = _head_call(
        process_group, vocab_start, "policy_hidden", policy_hidden, labels, heads, cu_seqlens, position_ids
    )
    check_beta(beta)
    preference.check_options(average=average, ld_alpha=ld_alpha, use_weighting=use_weighting)
    check_pairs(*(("policy_hidden", policy_hidden.shape[0]) if packed is None else
                  ("the packed batch (cu_seqlens / position_ids)", len(packed.bounds) - 1)))  # fmt: skip
    check_transform(logit_scale, softcap, temperature)
    check_memory_budget(memory_budget)
    gradient_filter_eps(gradient_filter, policy_hidden.dtype)  # a bad value raises before any kernel runs
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("give the reference as ref_logps or as ref_hidden, not both")
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias score ref_hidden: give ref_hidden too, or leave them out")
    ref = None
    if ref_logps is not None:
        ref = _check_ref_logps("ref_logps", ref_logps, _n_sequences(policy_hidden, packed))
    with_stats = preference.needs_stats(token_metrics, use_weighting)
    plan = _one_pass_plan(
        route, policy_hidden, head["weight"], head["bias"], labels, backend=backend, shard=shard, packed=packed,
        memory_budget=memory_budget, gradient_filter=gradient_filter, ignore_index=ignore_index, shift=shift,
        loss_type=loss_type, loss_options=loss_options,
    )  # fmt: skip
    common = dict(ignore_index=ignore_index, shift=shift, logit_scale=logit_scale, softcap=softcap,
                  temperature=temperature, memory_budget=memory_budget, backend=backend, packed=packed,
                  shard=shard)  # fmt: skip
    policy = None
    if plan is None:
        policy = tokens.from_hidden(policy_hidden, head["weight"], head["bias"], labels, with_stats=with_stats,
                                    gradient_filter=gradient_filter, **common)  # fmt: skip
    if ref_hidden is not None:
        ref_hidden = sharding.local(ref_hidden)
        check_ref_head(policy_hidden, head["weight"], ref_hidden, head["ref_weight"], head["ref_bias"])
        ref_head = head["weight"] if head["ref_weight"] is None else head["ref_weight"]
        with torch.no_grad():
            ref = tokens.from_hidden(ref_hidden, ref_head, head["ref_bias"], labels, **common)
    options = dict(beta=beta, loss_type=loss_type, ld_alpha=ld_alpha, use_weighting=use_weighting, **loss_options)
    if plan is not None:
        groups, scored = plan

        def run(token_grad):
            return tokens.one_pass(
                policy_hidden, head["weight"], head["bias"], labels, groups, scored, token_grad,
                ignore_index=ignore_index, shift=shift, logit_scale=logit_scale, softcap=softcap,
                temperature=temperature, backend=backend, with_stats=with_stats, packed=packed, shard=shard,
            )  # fmt: skip

        return preference.dpo_one_pass(run, ref, with_stats=with_stats, average=average, **options)
    return preference.dpo_from_passes(policy, ref, with_stats=with_stats, average=average, **options)


def fused_linear_kto_loss(
    policy_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_hidden: Optional[torch.Tensor] = None,
    kl_labels: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    ref_kl_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_kl_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    ignore_index: int = -100,
    shift: bool = True,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    token_metrics: bool = True,
    kl_group=None,
    process_group=None,
    vocab_start: Optional[int] = None,
    cu_seqlens=None,
    position_ids=None,
    kl_cu_seqlens=None,
    kl_position_ids=None,
    gradient_filter=None,
):
    """KTO (or unpaired APO-zero) of TRL's ``KTOTrainer`` straight from the last hidden states, through the
    fused LM head: :func:`dpo_kernels.losses.kto_loss` on summed completion log-probs.

    policy_hidden: (B, T, H) of unpaired completions, labels (B, T) (``ignore_index`` on prompt and padding),
    desirable: (B,) bool, True for a desirable completion; weight: (V, H). ``loss_type="kto"`` also takes the
    mismatched (prompt, completion) pairs that estimate the KL reference point: ``kl_hidden`` (B', T', H) and
    ``kl_labels`` (B', T'), scored by the policy without autograd (TRL's KL term is a constant of the loss:
    max(0, mean(policy − reference)) over them, detached); ``"apo_zero_unpaired"`` has no KL term and
    refuses them.

    The reference: ``ref_logps`` (B,) and, for ``kto``, ``ref_kl_logps`` (B',) precomputed; or ``ref_hidden``
    and ``ref_kl_hidden`` (shaped like ``policy_hidden`` and ``kl_hidden``) scored under ``ref_weight``
    (default: ``weight``, the shared head of a PEFT run) and ``ref_bias`` without autograd; neither means
    reference-free (zeros).

    ``kl_group``: a process group of data-parallel ranks (each with its own batch) over which the per-rank KL
    means are averaged before the clamp, as ``KTOTrainer`` does over all processes (one all-reduce); None:
    this batch's mean. ``process_group`` / ``vocab_start`` / a DTensor ``weight``: vocabulary parallelism as in
    :func:`fused_linear_sequence_logps` (every head argument is then this rank's rows). Packed batches:
    ``cu_seqlens`` / ``position_ids`` for ``policy_hidden`` (and ``ref_hidden``), ``kl_cu_seqlens`` /
    ``kl_position_ids`` for ``kl_hidden`` (and ``ref_kl_hidden``); ``desirable`` and ``ref_logps`` then have
    one entry per packed sequence. ``gradient_filter``: the policy head's backward, as in
    :func:`fused_linear_sequence_logps`.

    Returns ``(loss, metrics)``: the 0-dim loss (mean over the B examples, differentiable w.r.t.
    ``policy_hidden``, ``weight`` and ``bias``) and detached 0-dim metrics named as ``KTOTrainer`` logs them
    for one process: ``kl``, ``rewards/chosen|rejected|margins``, ``logps/chosen|rejected`` and, with
    ``token_metrics``, ``entropy`` and ``logits/chosen|rejected``; a side with no example (no token for
    ``logits/*``) is left out, as TRL leaves it out (one host synchronization).
    """
    heads = {"weight": weight, "bias": bias, "ref_weight": ref_weight, "ref_bias": ref_bias}
    shard, head, policy_hidden, labels, packed = _head_call(
        process_group, vocab_start, "policy_hidden", policy_hidden, labels, heads, cu_seqlens, position_ids
    )
    losses.check_kto_options(beta, desirable_weight, undesirable_weight, loss_type)
    with_kl = loss_type == "kto"
    check_transform(logit_scale, softcap, temperature)
    check_memory_budget(memory_budget)
    gradient_filter_eps(gradient_filter, policy_hidden.dtype)  # a bad value raises before any kernel runs
    if kl_group is not None and not with_kl:
        raise ValueError(f"kl_group averages the KL term, which loss_type {loss_type!r} does not have")
    kl_args = {"kl_hidden": kl_hidden, "kl_labels": kl_labels, "ref_kl_logps": ref_kl_logps,
               "ref_kl_hidden": ref_kl_hidden}  # fmt: skip
    kl_given = [name for name, value in kl_args.items() if value is not None]
    if not with_kl and kl_given:
        raise ValueError(f"loss_type {loss_type!r} has no KL term: leave out {', '.join(kl_given)}")
    if with_kl and (kl_hidden is None or kl_labels is None):
        raise ValueError("loss_type 'kto' needs the mismatched completions: give kl_hidden and kl_labels")
    if (ref_logps is not None or ref_kl_logps is not None) and (ref_hidden is not None or ref_kl_hidden is not None):
        raise ValueError("give the reference as ref_logps / ref_kl_logps or as ref_hidden / ref_kl_hidden, not both")
    if ref_hidden is None and ref_kl_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias score ref_hidden: give ref_hidden too, or leave them out")
    if with_kl:
        refs = {"ref_logps": ref_logps, "ref_kl_logps": ref_kl_logps, "ref_hidden": ref_hidden,
                "ref_kl_hidden": ref_kl_hidden}  # fmt: skip
        for a, b in (("ref_logps", "ref_kl_logps"), ("ref_hidden", "ref_kl_hidden")):
            if (refs[a] is None) != (refs[b] is None):
                have, lack = (a, b) if refs[a] is not None else (b, a)
                raise ValueError(f"{have} needs {lack}: the reference scores both the completions and the KL ones")
    desirable = sharding.local(desirable)
    n_sequences = _n_sequences(policy_hidden, packed)
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {getattr(desirable, 'dtype', type(desirable).__name__)}")
    if tuple(desirable.shape) != (n_sequences,) or desirable.device != policy_hidden.device:
        raise ValueError(f"desirable must have shape ({n_sequences},) (one flag per completion) on "
                         f"{policy_hidden.device}, got {tuple(desirable.shape)} on {desirable.device}")  # fmt: skip
    kl_packed = None
    if with_kl:
        kl_hidden, kl_labels, kl_packed = _hidden_call(
            "kl_hidden", kl_hidden, kl_labels, head["weight"], head["bias"], kl_cu_seqlens, kl_position_ids, "kl_labels"
        )
    ref = ref_kl = None
    if ref_logps is not None:
        ref = _check_ref_logps("ref_logps", ref_logps, n_sequences)
        if with_kl:
            ref_kl = _check_ref_logps("ref_kl_logps", ref_kl_logps, _n_sequences(kl_hidden, kl_packed))
    ref_head = head["weight"] if head["ref_weight"] is None else head["ref_weight"]
    if ref_hidden is not None:
        ref_hidden = sharding.local(ref_hidden)
        check_ref_head(policy_hidden, head["weight"], ref_hidden, head["ref_weight"], head["ref_bias"])
    if ref_kl_hidden is not None:
        ref_kl_hidden = sharding.local(ref_kl_hidden)
        check_ref_head(kl_hidden, head["weight"], ref_kl_hidden, head["ref_weight"], head["ref_bias"],
                       names=("kl_hidden", "ref_kl_hidden"))  # fmt: skip

    common = dict(ignore_index=ignore_index, shift=shift, logit_scale=logit_scale, softcap=softcap,
                  temperature=temperature, memory_budget=memory_budget, backend=backend, shard=shard)  # fmt: skip
    policy = tokens.from_hidden(policy_hidden, head["weight"], head["bias"], labels, with_stats=token_metrics,
                                gradient_filter=gradient_filter, with_mask=token_metrics, packed=packed,
                                **common)  # fmt: skip

    def summed(hidden, head_weight, head_bias, labels, packed):
        toks = tokens.from_hidden(hidden, head_weight, head_bias, labels, with_mask=False, packed=packed, **common)
        return tokens.per_sequence(toks, average=False)

    policy_kl = None
    # The KL estimate and the reference are constants of the loss: scored without autograd, storing nothing.
    with torch.no_grad():
        if with_kl:
            policy_kl = summed(kl_hidden, head["weight"], head["bias"], kl_labels, kl_packed)
        if ref_hidden is not None:
            ref = summed(ref_hidden, ref_head, head["ref_bias"], labels, packed)
        if ref_kl_hidden is not None:
            ref_kl = summed(ref_kl_hidden, ref_head, head["ref_bias"], kl_labels, kl_packed)
    kl_reduce = None if kl_group is None else (lambda kl: sharding.group_mean(kl, kl_group))
    loss, metrics, counts = preference.kto_from_tokens(
        policy.logps, policy.mask, ref, policy_kl, ref_kl, desirable, stats=policy.stats if token_metrics else None,
        vocab_size=policy.vocab_size, kl_reduce=kl_reduce, beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, loss_type=loss_type,
    )  # fmt: skip
    return loss, preference.kto_logged(metrics, counts)
