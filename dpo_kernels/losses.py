"""Preference losses on per-sequence log-probs: what every entry point applies after the kernels."""

import torch
import torch.nn.functional as F


def dpo_sigmoid(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Sigmoid DPO, Rafailov et al. (2023), arXiv:2305.18290:
    ``loss = -mean log σ(β·[(π_c − ref_c) − (π_r − ref_r)])``.

    All arguments are (B,) per-sequence log-probs. Returns ``(loss, metrics)`` with detached 0-dim
    metrics: ``reward_chosen``, ``reward_rejected`` (mean β·(π − ref)) and ``accuracy`` (share of pairs
    whose chosen reward exceeds the rejected one).
    """
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    margin = reward_chosen - reward_rejected
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "reward_chosen": reward_chosen.detach().mean(),
        "reward_rejected": reward_rejected.detach().mean(),
        "accuracy": (margin.detach() > 0).to(margin.dtype).mean(),
    }
    return loss, metrics
