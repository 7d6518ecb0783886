"""Preference losses on per-sequence log-probs: what every entry point applies after the kernels.

The kernels reduce (N, T, V) logits to per-sequence log-probs; everything below works on those, so
it is cheap, pure (no module state; BCO's running mean is an explicit :class:`BCOState` owned by
the caller), differentiable, and meant for fp32/fp64 inputs.

Layout
------
- :func:`preference_loss` — the paired family of TRL's ``DPOTrainer`` (``loss_type`` in
  :data:`LOSS_TYPES`, a sequence of them weighted = MPO) plus ORPO, on four (B,) tensors: policy and
  reference log-probs of the chosen and rejected completions. Its steps:

  1. validate every option against the chosen loss types (:func:`_check_options`);
  2. log-ratios ``π − ref`` and their f-divergence *scores* (:func:`_f_divergence_scores`);
  3. one (B,) per-pair loss per loss type, from the registry :data:`_PAIR_LOSSES` (one small
     function per paper, each citing it);
  4. the weighted sum over loss types, + RPO's NLL term, × WPO pair weights, mean over pairs.

- Helpers that turn per-token tensors into the inputs above: :func:`ld_dpo_logps` (LD-DPO's
  length-desensitised sums), :func:`wpo_weights` / :func:`wpo_pair_weights` (WPO).
- :func:`kto_loss` — KTO and unpaired APO on unpaired data.
- :func:`listwise_loss` — Plackett–Luce DPO on K ranked completions per prompt.
- :func:`dpo_sigmoid` — the legacy ``(loss, metrics)`` entry point, now a thin wrapper.

Per-token tensors are (2B, T'), chosen sequences first, rejected second, with a bool ``mask`` of the
scored tokens. Gradients flow into every log-prob that requires them, the reference's included:
entry points pass a detached reference (the KL estimate of KTO, WPO weights and BCO's mean are
detached here because their definitions treat them as constants). Rewards returned by every loss
are detached ``β·(π − ref)`` per sequence (ORPO: ``β·`` mean per-token log-prob, as TRL's ORPO
trainer logs them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# The f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in a chosen − rejected
# difference of scores, so only losses built on that difference accept a non-default divergence
# (the set TRL's DPOTrainer accepts; "sft" ignores the scores altogether).
_F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})

# label_smoothing range per loss type: (low, high, low_inclusive, high_inclusive). Types not listed
# do not use it, and a non-zero value there is rejected rather than silently ignored.
_LABEL_SMOOTHING_RANGES = {
    "sigmoid": (0.0, 0.5, True, True),  # cDPO; 0.5 is the (useless but well-defined) flat loss
    "aot": (0.0, 0.5, True, True),
    "aot_unpaired": (0.0, 0.5, True, True),
    "robust": (0.0, 0.5, True, False),  # the loss divides by 1 − 2ε
    "exo_pair": (0.0, 1.0, False, False),  # the loss takes log ε and log(1 − ε)
    "sigmoid_norm": (0.0, 0.5, True, True),  # SimPO's smoothed form, as CPO's "simpo" (TRL's CPOTrainer)
}

# AlphaPO's reward shape applies to the losses built on a chosen − rejected difference of rewards.
_ALPHAPO_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo"})

# Loss types that need the number of scored tokens per sequence.
_NEEDS_CHOSEN_LENGTHS = frozenset({"ipo", "sigmoid_norm", "sft", "orpo"})
_NEEDS_REJECTED_LENGTHS = frozenset({"ipo", "sigmoid_norm", "orpo"})

# Above these, exp() of the alpha-divergence argument would overflow once cast back to the dtype.
_ALPHA_CLAMP = {torch.float16: 11.0}
_ALPHA_CLAMP_DEFAULT = 80.0


class LossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


class KTOOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable
    chosen_rewards: torch.Tensor  # (n_desirable,) detached β·(π − ref) of the desirable examples
    rejected_rewards: torch.Tensor  # (n_undesirable,) detached, of the undesirable examples
    kl: torch.Tensor  # 0-dim detached KL estimate (0 for "apo_zero_unpaired")


@dataclass
class BCOState:
    """Running reward mean δ of BCO (Jung et al. 2024, arXiv:2404.04656), carried across steps.

    ``mean`` is the average of the per-batch reward means seen so far (every batch counts once),
    which is what older TRL's ``RunningMoments`` produced when fed one batch mean per step; ``count``
    is the number of batches. :func:`preference_loss` updates it *before* using it, so the first
    batch is centred on its own mean. Under data parallelism, feed it the mean across ranks (or keep
    one state per rank knowingly): this module does no communication. Plain floats, so the state
    can be checkpointed with ``dataclasses.asdict``; the update costs one host sync per step.
    """

    mean: Optional[float] = None
    count: int = 0

    def update(self, batch_mean: float) -> float:
        self.count += 1
        if self.mean is None:
            self.mean = float(batch_mean)
        else:
            self.mean += (float(batch_mean) - self.mean) / self.count
        return self.mean


@dataclass
class _Pairs:
    """Everything a per-pair loss may read; built once per :func:`preference_loss` call."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_lengths: Optional[torch.Tensor]  # clamped to >= 1, in the log-probs' dtype
    rejected_lengths: Optional[torch.Tensor]
    chosen_token_counts: Optional[torch.Tensor]  # unclamped: the NLL's token mean is over the batch total
    chosen_norm_lengths: Optional[torch.Tensor]  # what ipo / sigmoid_norm divide by, clamped to >= 1
    rejected_norm_lengths: Optional[torch.Tensor]
    chosen_sums: torch.Tensor  # summed log-probs for the NLL and ORPO's odds (= chosen_logps by default)
    rejected_sums: torch.Tensor
    chosen_norm_scores: torch.Tensor  # per-token average scores of ipo / sigmoid_norm
    rejected_norm_scores: torch.Tensor
    nll_sums: torch.Tensor  # summed chosen log-probs over the NLL's tokens (= chosen_sums by default)
    nll_counts: torch.Tensor  # unclamped: the NLL's token mean is over the batch total
    beta: float
    label_smoothing: float
    discopop_tau: float
    gamma: float
    bco_delta: Optional[float]

    @property
    def delta_score(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores


# ----------------------------------------------------------------------------------------------
# Per-pair losses: (B,) from _Pairs. The registry order is the order of LOSS_TYPES.
# ----------------------------------------------------------------------------------------------


def _smoothed_logistic(margin: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1−ε)·log σ(m) − ε·log σ(−m): the logistic loss against a label flipped with probability ε."""
    loss = -F.logsigmoid(margin)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-margin)
    return loss


def _sigmoid(p: _Pairs) -> torch.Tensor:
    """DPO, Rafailov et al. 2023, arXiv:2305.18290: ``−log σ(β·Δ)``, Δ = chosen − rejected score.

    With ``label_smoothing`` ε > 0 it is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with
    noisy preferences", the note referenced from arXiv:2305.18290's code): the label is trusted with
    probability 1 − ε. TRL 1.16's "sigmoid" dropped ε; older TRL and this module keep it."""
    return _smoothed_logistic(p.beta * p.delta_score, p.label_smoothing)


def _robust(p: _Pairs) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024, arXiv:2403.00409: the unbiased loss under labels flipped
    with probability ε: ``[−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)``."""
    margin = p.beta * p.delta_score
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)


def _exo_pair(p: _Pairs) -> torch.Tensor:
    """EXO, Ji et al. 2024, arXiv:2402.00856 (Eq. 16, K = 2): KL(q ‖ p_ε) with q = softmax of the
    scaled scores over {chosen, rejected} and target p_ε = (1 − ε, ε), ε = ``label_smoothing``."""
    margin = p.beta * p.delta_score
    eps = p.label_smoothing
    log_qw, log_ql = F.logsigmoid(margin), F.logsigmoid(-margin)
    return log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))


def _hinge(p: _Pairs) -> torch.Tensor:
    """SLiC-HF's calibration hinge, Zhao et al. 2023, arXiv:2305.10425: ``max(0, 1 − β·Δ)``."""
    return torch.relu(1 - p.beta * p.delta_score)


def _ipo(p: _Pairs) -> torch.Tensor:
    """IPO, Azar et al. 2023, arXiv:2310.12036 (Eq. 17, β = τ): ``(Δ̄ − 1/(2β))²``.

    Δ̄ uses per-token *average* scores (score / scored tokens): summed log-probs would make the
    squared target scale with length; TRL normalises the same way, confirmed with the IPO authors."""
    delta = p.chosen_norm_scores - p.rejected_norm_scores
    return (delta - 1 / (2 * p.beta)) ** 2


def _bco_pair(p: _Pairs) -> torch.Tensor:
    """BCO, Jung et al. 2024, arXiv:2404.04656: chosen and rejected classified separately,
    ``−log σ(r_c − δ) − log σ(−(r_r − δ))``, r = β·(π − ref).

    Without a :class:`BCOState`, δ = 0 (TRL 1.16's pairwise form); with one, δ is the running reward
    mean the paper uses to centre the classifier."""
    delta = p.bco_delta or 0.0
    chosen = p.beta * p.chosen_logratios - delta
    rejected = p.beta * p.rejected_logratios - delta
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


def _sppo_hard(p: _Pairs) -> torch.Tensor:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected), Wu et al. 2024,
    arXiv:2405.00675, Eq. 4.7: ``(log-ratio_c − 1/(2β))² + (log-ratio_r + 1/(2β))²``."""
    half = 0.5 / p.beta
    return (p.chosen_logratios - half) ** 2 + (p.rejected_logratios + half) ** 2


def _nca_pair(p: _Pairs) -> torch.Tensor:
    """NCA, Chen et al. 2024, arXiv:2402.05369: absolute (not relative) rewards,
    ``−log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)``."""
    chosen = p.beta * p.chosen_logratios
    rejected = p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _aot(p: _Pairs) -> torch.Tensor:
    """AOT (paired), Melnyk et al. 2024, arXiv:2406.05882: first-order stochastic dominance through
    sorting — the batch's policy margins π_c − π_r and reference margins are sorted separately and
    matched by rank before the (optionally smoothed) logistic loss. Couples the pairs of a batch."""
    policy, _ = torch.sort(p.chosen_logps - p.rejected_logps, dim=0)
    ref, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0)
    return _smoothed_logistic(p.beta * (policy - ref), p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> torch.Tensor:
    """AOT (unpaired), Melnyk et al. 2024, arXiv:2406.05882: chosen and rejected log-ratios sorted
    separately and matched by rank, then the (optionally smoothed) logistic loss."""
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing)


def _apo_zero(p: _Pairs) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7: raise chosen, lower rejected
    likelihood, ``1 − σ(r_c) + σ(r_r)`` — for chosen outputs better than the model's own."""
    return 1 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> torch.Tensor:
    """APO-down, D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8: lower both, rejected more,
    ``σ(r_c) + 1 − σ(r_c − r_r)`` — for chosen outputs worse than the model's own."""
    chosen = p.beta * p.chosen_logratios
    return torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - p.beta * p.rejected_logratios)


def _discopop(p: _Pairs) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024, arXiv:2406.08414, Eq. 5: with
    z = β·Δ and m = σ(z/τ), ``(1 − m)·(−log σ(z)) + m·exp(−z)``."""
    z = p.beta * p.delta_score
    modulation = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


def _sigmoid_norm(p: _Pairs) -> torch.Tensor:
    """Length-normalised DPO with SimPO's target margin γ (Meng et al. 2024, arXiv:2405.14734):
    ``−log σ(β·Δ̄ − γ)``, Δ̄ from per-token average scores. γ = 0 is TRL's "sigmoid_norm"; with
    reference log-probs of 0 it is SimPO.

    With ``label_smoothing`` ε > 0, the logistic loss against a label flipped with probability ε,
    ``−(1−ε)·log σ(β·Δ̄ − γ) − ε·log σ(−(β·Δ̄ − γ))``: CPO's "simpo" (Xu et al. 2024, arXiv:2401.08417,
    Eq. 3 smoothed as cDPO; TRL's CPOTrainer writes the margin as β·(Δ̄ − γ/β), the same number)."""
    delta = p.chosen_norm_scores - p.rejected_norm_scores
    return _smoothed_logistic(p.beta * delta - p.gamma, p.label_smoothing)


def _chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    # Token mean over the whole batch (not a mean of per-sequence means), as a cross-entropy over
    # all chosen tokens computes it. Lengths here are unclamped counts; an empty batch counts as 1.
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def _sft(p: _Pairs) -> torch.Tensor:
    """NLL of the chosen completions, token mean over the batch — the SFT term of MPO
    (Wang et al. 2024, arXiv:2411.10442), TRL's "sft". One batch-level value broadcast to (B,) so
    it combines with per-pair losses and weights like they do."""
    return _chosen_nll(p.nll_sums, p.nll_counts).expand_as(p.chosen_logps)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    # log(1 − eˣ) for x < 0; switching at −log 2 keeps both branches away from cancellation.
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio (Hong et al. 2024, arXiv:2403.07691, Eq. 5) from (B,) per-token average
    log-probs a: ``(a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))``."""
    return (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))


def _orpo(p: _Pairs) -> torch.Tensor:
    """ORPO, Hong et al. 2024, arXiv:2403.07691 (Eqs. 4–7), reference-free, as TRL's ORPO trainer:

    with a = π / length the per-token average log-prob of each completion,
    ``log_odds = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))`` and the per-pair loss is
    ``NLL − β·log σ(log_odds)``, β playing the paper's λ; NLL is the chosen token-mean NLL of
    :func:`_sft`. Reference log-probs are ignored. By default the NLL covers the scored (completion)
    tokens only; TRL's ORPO trainer takes it over the prompt too (``chosen_nll_logps`` /
    ``chosen_nll_lengths`` of :func:`preference_loss`). A completion with average log-prob 0 gives
    log(0) = −inf, as in TRL."""
    log_odds = orpo_log_odds(p.chosen_sums / p.chosen_lengths, p.rejected_sums / p.rejected_lengths)
    return _sft(p) - p.beta * F.logsigmoid(log_odds)


_PAIR_LOSSES: dict[str, Callable[[_Pairs], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "hinge": _hinge,
    "ipo": _ipo,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "nca_pair": _nca_pair,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
    "sft": _sft,
    "orpo": _orpo,
}
LOSS_TYPES: tuple[str, ...] = tuple(_PAIR_LOSSES)


# ----------------------------------------------------------------------------------------------
# f-divergence scores
# ----------------------------------------------------------------------------------------------


def _f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """f'(t) at t = π/ref, from log t: the implicit reward of f-DPO (Wang et al. 2023,
    arXiv:2309.16240). reverse KL: log t; forward KL: 1 − 1/t; JS: log 2 + log σ(log t);
    α-divergence: (t^(α−1) − 1)/(α − 1), which tends to log t as α → 1 and falls back to it there."""
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    # alpha_divergence
    t = (alpha - 1.0) * logratios
    dtype = t.dtype
    clamp_max = _ALPHA_CLAMP.get(dtype, _ALPHA_CLAMP_DEFAULT)
    # Same clamp for fp32 and fp64 (TRL only lists 16/32-bit) so both precisions compute one function.
    t = torch.clamp(t.to(torch.promote_types(dtype, torch.float32)), max=clamp_max)
    return (torch.exp(t) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))


def _alphapo_reward(logratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (Gupta et al. 2025, arXiv:2501.03884): ``(1 − e^{−α·u})/α`` for a log-ratio u,
    which tends to u as α → 0. It is f-DPO's α-divergence score with coefficient 1 − α; written with expm1
    (no clamp) so that it stays accurate for small α·u and overflows where TRL's ``(1 − p^{−α})/α`` does."""
    return -torch.expm1(-alpha * logratios) / alpha


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _as_loss_types(loss_type) -> tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in _PAIR_LOSSES:
            raise ValueError(f"Unknown loss_type {t!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    return types


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_logps(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    shapes = [tuple(t.shape) for t in tensors]
    if tensors[0].dim() != 1 or len(set(shapes)) != 1:
        described = ", ".join(f"{n}={s}" for n, s in zip(names, shapes))
        raise ValueError(f"{', '.join(names)} must all have the same (B,) shape; got {described}")


def _check_per_pair(name: str, value, batch: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({batch},), got {type(value).__name__}")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) like the log-probs, got {tuple(value.shape)}")


def _check_label_smoothing(types: Sequence[str], eps: float, applies_to: Optional[Sequence[str]]) -> None:
    for t in types:
        if applies_to is not None and t not in applies_to:
            continue  # ignored for this type, as the caller asked
        bounds = _LABEL_SMOOTHING_RANGES.get(t)
        if bounds is None:
            if eps != 0.0:
                raise ValueError(f"label_smoothing must be 0 for loss_type {t!r} (it does not use it), got {eps}")
            continue
        lo, hi, lo_in, hi_in = bounds
        ok = (lo <= eps if lo_in else lo < eps) and (eps <= hi if hi_in else eps < hi)
        if not ok:
            interval = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            raise ValueError(f"label_smoothing must lie in {interval} for loss_type {t!r}, got {eps}")


# ----------------------------------------------------------------------------------------------
# Paired entry point
# ----------------------------------------------------------------------------------------------


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    label_smoothing_types: Optional[Sequence[str]] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    gamma: float = 0.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    chosen_norm_lengths: Optional[torch.Tensor] = None,
    rejected_norm_lengths: Optional[torch.Tensor] = None,
    chosen_sum_logps: Optional[torch.Tensor] = None,
    rejected_sum_logps: Optional[torch.Tensor] = None,
    rpo_alpha: Optional[float] = None,
    pair_weights: Optional[torch.Tensor] = None,
    bco_state: Optional[BCOState] = None,
    alphapo_alpha: float = 0.0,
    chosen_nll_logps: Optional[torch.Tensor] = None,
    chosen_nll_lengths: Optional[torch.Tensor] = None,
) -> LossOutput:
    """A loss of the DPO family (or a weighted combination of several, MPO, Wang et al. 2024,
    arXiv:2411.10442) from (B,) per-sequence log-probs of the policy and the frozen reference.

    ``loss = mean_b( w_b · [Σ_k loss_weights[k] · ℓ_k(b) + rpo_alpha · NLL] )`` where ℓ_k is the
    per-pair loss of ``loss_type[k]`` (see :data:`LOSS_TYPES` and the ``_<name>`` functions of this
    module), w_b the optional ``pair_weights`` (WPO, Zhou et al. 2024, arXiv:2406.11827; detached
    here) and NLL the chosen token-mean NLL of RPO (Pang et al. 2024, arXiv:2404.19733). Like older
    TRL, the RPO term is added per pair before the WPO weights apply. This equals TRL's
    ``Σ_k loss_weights[k] · mean(w · ℓ_k)``.

    Options follow TRL 1.16's ``DPOConfig``: ``f_divergence_type`` turns log-ratios into scores for
    the score-based losses (a non-default value with another loss type is an error);
    ``label_smoothing`` is ε of cDPO/AOT and of SimPO's "sigmoid_norm" (as TRL's CPOTrainer smooths it)
    ([0, 0.5]), robust ([0, 0.5)) and EXO ((0, 1)) and must be 0 otherwise; ``label_smoothing_types``,
    when given, names the loss types ε applies to and the others ignore it (TRL 1.16's DPOTrainer:
    robust, exo_pair, aot, aot_unpaired; its "sigmoid" and "sigmoid_norm" ignore ε); ``gamma`` is
    SimPO's margin for "sigmoid_norm" only. ``chosen_lengths`` /
    ``rejected_lengths`` are the scored-token counts of each sequence, needed by ipo, sigmoid_norm,
    sft, orpo and RPO; ``chosen_norm_lengths`` / ``rejected_norm_lengths``, when given, replace them
    as the divisors of ipo and sigmoid_norm only (TRL 1.16 divides there by the unshifted
    completion-mask count, one more than the scored tokens when the prompt is empty).
    ``chosen_sum_logps`` / ``rejected_sum_logps``: the summed log-probs that sft, orpo and rpo_alpha
    need, when the log-probs given are reduced otherwise (a mean, LD-DPO's weighted sum); by default
    those are the sums. ``chosen_nll_logps`` / ``chosen_nll_lengths`` (given together): the summed
    chosen log-probs and token counts of the NLL (sft, orpo's NLL, rpo_alpha) when it covers other
    tokens than the scored ones (TRL's ORPO trainer: prompt and completion); ORPO's odds keep the
    scored tokens. ``bco_state`` makes "bco_pair" centre rewards on a running mean and is
    updated in place with this batch's mean reward.

    ``alphapo_alpha`` α ≠ 0: AlphaPO's reward shape (Gupta et al. 2025, arXiv:2501.03884), as TRL's
    CPOTrainer ``alpha``: each reward u = π − ref becomes ``(1 − e^{−α·u})/α`` before sigmoid, hinge,
    ipo and sigmoid_norm (for the last two, u is the per-token average, shaped after the division);
    only with ``f_divergence_type="reverse_kl"`` (the shape is itself an f-divergence score).

    Rewards are detached β·(π − ref) (shaped with ``alphapo_alpha``); if every loss type is "orpo",
    β · average per-token log-prob.
    """
    types = _as_loss_types(loss_type)
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    _check_logps(names, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    batch = chosen_logps.shape[0]

    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [_check_number("loss_weights", w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights must have one weight per loss type: got {len(weights)} for {len(types)} ({types})"
            )

    beta = _check_number("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    label_smoothing = _check_number("label_smoothing", label_smoothing)
    if label_smoothing_types is not None:
        unknown = [t for t in label_smoothing_types if t not in _PAIR_LOSSES]
        if isinstance(label_smoothing_types, str) or unknown:
            raise ValueError(f"label_smoothing_types must be a list of loss types, got {label_smoothing_types!r}")
    _check_label_smoothing(types, label_smoothing, label_smoothing_types)

    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")
    if f_divergence_type != "reverse_kl":
        unsupported = [t for t in types if t not in _F_DIVERGENCE_LOSSES]
        if unsupported:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is not supported for loss types {unsupported}; "
                f"it needs one of {sorted(_F_DIVERGENCE_LOSSES)} (use 'reverse_kl' with the others)"
            )
    f_alpha_divergence_coef = _check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    discopop_tau = _check_number("discopop_tau", discopop_tau)
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    gamma = _check_number("gamma", gamma)
    if gamma != 0.0 and "sigmoid_norm" not in types:
        raise ValueError(f"gamma (SimPO's margin) only applies to loss_type 'sigmoid_norm', got {types}")
    alphapo_alpha = _check_number("alphapo_alpha", alphapo_alpha)
    if alphapo_alpha != 0.0:
        unsupported = [t for t in types if t not in _ALPHAPO_LOSSES]
        if unsupported:
            raise ValueError(
                f"alphapo_alpha (AlphaPO's reward shape) applies to loss types {sorted(_ALPHAPO_LOSSES)}, got "
                f"{unsupported}"
            )
        if f_divergence_type != "reverse_kl":
            raise ValueError(
                f"alphapo_alpha cannot be combined with f_divergence_type={f_divergence_type!r}: it is itself a "
                "reward transform (f-DPO's alpha_divergence score with coefficient 1 - alpha)"
            )
    if (chosen_nll_logps is None) != (chosen_nll_lengths is None):
        raise ValueError("chosen_nll_logps and chosen_nll_lengths must be given together")

    if rpo_alpha is not None:
        rpo_alpha = _check_number("rpo_alpha", rpo_alpha)
    needs_chosen = [t for t in types if t in _NEEDS_CHOSEN_LENGTHS] + (["rpo_alpha"] if rpo_alpha is not None else [])
    needs_rejected = [t for t in types if t in _NEEDS_REJECTED_LENGTHS]
    for name, value, needers in (
        ("chosen_lengths", chosen_lengths, needs_chosen),
        ("rejected_lengths", rejected_lengths, needs_rejected),
    ):
        if value is None:
            if needers:
                raise ValueError(f"{name} (scored tokens per sequence) is required by {needers}")
        else:
            _check_per_pair(name, value, batch)
    per_pair_options = (
        ("chosen_norm_lengths", chosen_norm_lengths), ("rejected_norm_lengths", rejected_norm_lengths),
        ("chosen_sum_logps", chosen_sum_logps), ("rejected_sum_logps", rejected_sum_logps),
        ("chosen_nll_logps", chosen_nll_logps), ("chosen_nll_lengths", chosen_nll_lengths),
    )  # fmt: skip
    for name, value in per_pair_options:
        if value is not None:
            _check_per_pair(name, value, batch)

    if pair_weights is not None:
        _check_per_pair("pair_weights", pair_weights, batch)
        sorting = [t for t in types if t in ("aot", "aot_unpaired")]
        if sorting:
            raise ValueError(
                f"pair_weights cannot be used with {sorting}: they sort the batch, so pairs lose their weights"
            )
    if bco_state is not None:
        if not isinstance(bco_state, BCOState):
            raise TypeError(f"bco_state must be a BCOState, got {type(bco_state).__name__}")
        if "bco_pair" not in types:
            raise ValueError(f"bco_state only applies to loss_type 'bco_pair', got {types}")

    dtype = torch.promote_types(chosen_logps.dtype, ref_chosen_logps.dtype)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps

    bco_delta = None
    if bco_state is not None:
        # The paper's δ: the reward mean over both sides of the batch, folded into the running mean.
        batch_mean = beta * torch.cat([chosen_logratios, rejected_logratios]).detach().mean()
        bco_delta = bco_state.update(batch_mean.item())

    def lengths(value):
        return None if value is None else value.detach().to(dtype)

    def clamped(value, default):
        value = lengths(default if value is None else value)
        return None if value is None else value.clamp(min=1)

    chosen_scores = _f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = _f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    chosen_norm = clamped(chosen_norm_lengths, chosen_lengths)
    rejected_norm = clamped(rejected_norm_lengths, rejected_lengths)

    def normalised(scores, logratios, norm):
        if norm is None:
            return None
        # AlphaPO shapes the per-token average reward; f-DPO averages the score of the whole sequence
        return _alphapo_reward(logratios / norm, alphapo_alpha) if alphapo_alpha else scores / norm

    if alphapo_alpha:
        chosen_scores = _alphapo_reward(chosen_logratios, alphapo_alpha)
        rejected_scores = _alphapo_reward(rejected_logratios, alphapo_alpha)
    chosen_sums = chosen_logps if chosen_sum_logps is None else chosen_sum_logps
    pairs = _Pairs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        chosen_lengths=clamped(chosen_lengths, None),
        rejected_lengths=clamped(rejected_lengths, None),
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        gamma=gamma,
        chosen_token_counts=lengths(chosen_lengths),
        chosen_norm_lengths=chosen_norm,
        rejected_norm_lengths=rejected_norm,
        chosen_sums=chosen_sums,
        rejected_sums=rejected_logps if rejected_sum_logps is None else rejected_sum_logps,
        chosen_norm_scores=normalised(chosen_scores, chosen_logratios, chosen_norm),
        rejected_norm_scores=normalised(rejected_scores, rejected_logratios, rejected_norm),
        nll_sums=chosen_sums if chosen_nll_logps is None else chosen_nll_logps,
        nll_counts=lengths(chosen_lengths if chosen_nll_lengths is None else chosen_nll_lengths),
        bco_delta=bco_delta,
    )

    unsmoothed = replace(pairs, label_smoothing=0.0)
    per_pair = sum(
        w * _PAIR_LOSSES[t](pairs if label_smoothing_types is None or t in label_smoothing_types else unsmoothed)
        for t, w in zip(types, weights)
    )
    if rpo_alpha is not None:
        per_pair = per_pair + rpo_alpha * _chosen_nll(pairs.nll_sums, pairs.nll_counts)
    if pair_weights is not None:
        per_pair = per_pair * pair_weights.detach().to(dtype)
    loss = per_pair.mean()

    if all(t == "orpo" for t in types):
        chosen_rewards = beta * (pairs.chosen_sums / pairs.chosen_lengths).detach()
        rejected_rewards = beta * (pairs.rejected_sums / pairs.rejected_lengths).detach()
    elif alphapo_alpha:
        chosen_rewards = beta * pairs.chosen_scores.detach()
        rejected_rewards = beta * pairs.rejected_scores.detach()
    else:
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
    return LossOutput(loss, chosen_rewards, rejected_rewards)


# ----------------------------------------------------------------------------------------------
# Per-token helpers
# ----------------------------------------------------------------------------------------------


def _check_tokens(token_logps: torch.Tensor, mask: torch.Tensor, paired: bool) -> None:
    if not isinstance(token_logps, torch.Tensor) or token_logps.dim() != 2:
        raise ValueError(f"token_logps must be a 2-D (N, T') tensor, got {getattr(token_logps, 'shape', token_logps)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != token_logps.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal token_logps shape {tuple(token_logps.shape)}")
    if paired and token_logps.shape[0] % 2:
        raise ValueError(f"token_logps must hold 2B rows (chosen then rejected), got {token_logps.shape[0]}")


def ld_dpo_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's per-sequence log-probs, Liu et al. 2024, arXiv:2409.06411, as TRL computes them.

    token_logps, mask: (2B, T'), chosen rows first. Per pair, the shared length is
    min(chosen scored tokens, rejected scored tokens); each sequence sums its first ``shared``
    scored tokens fully and the rest ("verbose" tail) times ``ld_alpha`` ∈ [0, 1]. Returns (2B,).
    Unscored positions never contribute, whatever token_logps holds there.
    """
    _check_tokens(token_logps, mask, paired=True)
    ld_alpha = _check_number("ld_alpha", ld_alpha)
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    position = mask.cumsum(dim=1)  # 1-based rank of each scored token in its sequence
    chosen_len, rejected_len = position[:, -1].chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    zero = token_logps.new_zeros(())
    shared_sum = torch.where(mask & (position <= shared), token_logps, zero).sum(1)
    tail_sum = torch.where(mask & (position > shared), token_logps, zero).sum(1)
    return shared_sum + ld_alpha * tail_sum


def wpo_weights(token_logps: torch.Tensor, token_log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence WPO weights, Zhou et al. 2024, arXiv:2406.11827 (Eq. 2, TRL's ``use_weighting``):
    ``exp(mean over scored tokens of [log p(y_t) − log Σ_v p(v)²])``, detached (N,).

    Subtracting log Σ p² aligns each token's probability with the model's own sampling, so a
    sequence the policy would plausibly generate weighs ~1. Sequences with no scored token get
    exp(0) = 1."""
    _check_tokens(token_logps, mask, paired=False)
    if token_log_sum_sq_probs.shape != token_logps.shape:
        raise ValueError(
            f"token_log_sum_sq_probs shape {tuple(token_log_sum_sq_probs.shape)} must equal token_logps shape "
            f"{tuple(token_logps.shape)}"
        )
    with torch.no_grad():
        aligned = torch.where(mask, token_logps - token_log_sum_sq_probs, token_logps.new_zeros(()))
        return torch.exp(aligned.sum(1) / mask.sum(1).clamp(min=1))


def wpo_pair_weights(seq_weights: torch.Tensor) -> torch.Tensor:
    """(2B,) per-sequence WPO weights (chosen first) -> (B,) pair weights chosen_w · rejected_w,
    the ``pair_weights`` of :func:`preference_loss`."""
    if seq_weights.dim() != 1 or seq_weights.shape[0] % 2:
        raise ValueError(f"seq_weights must be (2B,) with chosen first, got {tuple(seq_weights.shape)}")
    chosen, rejected = seq_weights.detach().chunk(2)
    return chosen * rejected


# ----------------------------------------------------------------------------------------------
# Unpaired (KTO) and listwise entry points
# ----------------------------------------------------------------------------------------------

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def check_kto_options(beta, desirable_weight, undesirable_weight, loss_type: str) -> tuple[float, float, float]:
    """The scalar options of :func:`kto_loss`, checked (an entry point checks them before its kernels run);
    returns (beta, desirable_weight, undesirable_weight) as floats."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r} for kto_loss; valid: {', '.join(KTO_LOSS_TYPES)}")
    beta = _check_number("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    desirable_weight = _check_number("desirable_weight", desirable_weight)
    return beta, desirable_weight, _check_number("undesirable_weight", undesirable_weight)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    policy_kl_logps: Optional[torch.Tensor],
    ref_kl_logps: Optional[torch.Tensor],
    desirable: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    kl_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> KTOOutput:
    """KTO, Ethayarajh et al. 2024, arXiv:2402.01306 (Eq. 7), on unpaired (B,) log-probs, as TRL's
    ``KTOTrainer``; ``desirable`` (B,) bool marks the desirable examples.

    z₀ = max(0, mean(policy_kl_logps − ref_kl_logps)), detached: the KL reference point estimated
    on mismatched (prompt, completion) pairs. With r = β·(π − ref):
    desirable ``λ_D·(1 − σ(r − β·z₀))``, undesirable ``λ_U·(1 − σ(β·z₀ − r))``; loss = mean over
    all B examples (TRL's mean over the concatenated desirable and undesirable losses).

    ``loss_type="apo_zero_unpaired"``: unpaired APO-zero (D'Oosterlinck et al. 2024,
    arXiv:2408.06266): desirable ``1 − σ(r)``, undesirable ``σ(r)``, no KL term (the KL log-probs
    may be None). The KL mean is over this call's examples only unless ``kl_reduce`` is given: a
    function applied to that 0-dim detached mean before the clamp, e.g. the mean over data-parallel
    ranks, which is what TRL's ``KTOTrainer`` clamps (its per-rank means gathered and averaged).
    """
    beta, desirable_weight, undesirable_weight = check_kto_options(
        beta, desirable_weight, undesirable_weight, loss_type
    )
    _check_logps(("policy_logps", "ref_logps"), (policy_logps, ref_logps))
    batch = policy_logps.shape[0]
    if batch == 0:
        raise ValueError("policy_logps must hold at least one example")
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {getattr(desirable, 'dtype', type(desirable).__name__)}")
    if tuple(desirable.shape) != (batch,):
        raise ValueError(f"desirable must have shape ({batch},) like policy_logps, got {tuple(desirable.shape)}")

    logratios = policy_logps - ref_logps
    if loss_type == "kto":
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("policy_kl_logps and ref_kl_logps are required by loss_type 'kto'")
        _check_logps(("policy_kl_logps", "ref_kl_logps"), (policy_kl_logps, ref_kl_logps))
        if policy_kl_logps.shape[0] == 0:
            raise ValueError("policy_kl_logps must hold at least one example")
        kl = (policy_kl_logps - ref_kl_logps).detach().mean()
        if kl_reduce is not None:
            kl = kl_reduce(kl).detach().reshape(())
        kl = kl.clamp(min=0).to(logratios.dtype)
        desirable_losses = 1 - torch.sigmoid(beta * (logratios - kl))
        undesirable_losses = 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        kl = logratios.new_zeros(())
        desirable_losses = 1 - torch.sigmoid(beta * logratios)
        undesirable_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)
    rewards = beta * logratios.detach()
    return KTOOutput(losses.mean(), rewards[desirable], rewards[~desirable], kl)


def listwise_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1):
    """Plackett–Luce DPO on ranked lists, Rafailov et al. 2023, arXiv:2305.18290 (Appendix A.3).

    policy_logps, ref_logps: (B, K), K ≥ 2, column 0 ranked best and K−1 worst. With r = β·(π − ref),
    ``loss = mean_b −Σ_{k<K−1} [r_k − logsumexp(r_k, …, r_{K−1})]`` (the k = K−1 term is log 1 = 0).
    For K = 2 this is sigmoid DPO. Returns ``(loss, rewards)`` with rewards (B, K) detached.
    """
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if policy_logps.dim() != 2 or policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"policy_logps and ref_logps must both be (B, K); got {tuple(policy_logps.shape)} and "
            f"{tuple(ref_logps.shape)}"
        )
    if policy_logps.shape[1] < 2:
        raise ValueError(f"policy_logps needs K >= 2 ranked completions per row, got K={policy_logps.shape[1]}")
    beta = _check_number("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rewards = beta * (policy_logps - ref_logps)
    # logsumexp over each suffix {r_k, …, r_{K−1}}: a cumulative logsumexp of the reversed list.
    suffix_lse = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)
    log_probs = rewards[:, :-1] - suffix_lse[:, :-1]
    return -log_probs.sum(-1).mean(), rewards.detach()


# ----------------------------------------------------------------------------------------------
# Legacy entry point
# ----------------------------------------------------------------------------------------------


def dpo_sigmoid(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Sigmoid DPO, Rafailov et al. (2023), arXiv:2305.18290:
    ``loss = -mean log σ(β·[(π_c − ref_c) − (π_r − ref_r)])``.

    All arguments are (B,) per-sequence log-probs. Returns ``(loss, metrics)`` with detached 0-dim
    metrics: ``reward_chosen``, ``reward_rejected`` (mean β·(π − ref)) and ``accuracy`` (share of pairs
    whose chosen reward exceeds the rejected one). Kept for existing callers; new code should use
    :func:`preference_loss`.
    """
    out = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    return out.loss, lesson_metrics(beta, policy_chosen - ref_chosen, policy_rejected - ref_rejected)


def lesson_metrics(beta: float, chosen_logratios, rejected_logratios) -> dict:
    """The keys of the hand-rolled ``dpo_loss`` that users port from (the seed lesson), whatever the loss
    type: ``reward_chosen`` / ``reward_rejected`` = mean β·(π − π_ref) over the chosen / rejected
    sequences, ``accuracy`` = share of pairs with β·[(π_c − ref_c) − (π_r − ref_r)] > 0. Detached 0-dim
    tensors like the others (the lesson's are Python floats: ``float()`` them)."""
    chosen_logratios, rejected_logratios = chosen_logratios.detach(), rejected_logratios.detach()
    return {
        "reward_chosen": (beta * chosen_logratios).mean(),
        "reward_rejected": (beta * rejected_logratios).mean(),
        "accuracy": (beta * (chosen_logratios - rejected_logratios) > 0).to(chosen_logratios.dtype).mean(),
    }
