"""Argument checks shared by the public entry points: a clear error naming the argument, up front."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape (N, T, V), got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")


def check_labels(labels, logits, logits_name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape (N, T) = {tuple(logits.shape[:2])} to match {logits_name} "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but {logits_name} is on {logits.device}")


def check_pairs(name: str, n: int) -> None:
    if n == 0 or n % 2:
        raise ValueError(
            f"{name} must hold 2B sequences, chosen first then rejected; got a batch of {n}, which is "
            f"{'empty' if n == 0 else 'odd'}"
        )


def check_ref(ref, policy_logits: torch.Tensor, n_sequences=None) -> None:
    """ref_logits: None, (2B,) precomputed reference log-probs, or (2B, T, V) reference logits (of a
    packed batch: ``n_sequences`` = S per-sequence log-probs, or logits of the policy's shape)."""
    if ref is None:
        return
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"ref_logits must be a torch.Tensor or None, got {type(ref).__name__}")
    if ref.device != policy_logits.device:
        raise ValueError(f"ref_logits are on {ref.device} but policy_logits is on {policy_logits.device}")
    if not ref.is_floating_point():
        raise TypeError(f"ref_logits must be floating point, got {ref.dtype}")
    n = policy_logits.shape[0] if n_sequences is None else n_sequences
    if ref.dim() == 1:
        if ref.shape[0] != n:
            raise ValueError(f"ref_logits as precomputed log-probs must have shape ({n},), got {tuple(ref.shape)}")
    elif ref.shape != policy_logits.shape:
        # a different V would score the labels against another vocabulary: never broadcast or truncate
        raise ValueError(
            f"ref_logits must be None, ({n},) reference log-probs or logits of policy_logits' shape "
            f"{tuple(policy_logits.shape)} (2B, T, V), got {tuple(ref.shape)}"
        )


def check_beta(beta) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")


# The gradient filter's "auto" threshold: finfo(dtype).eps / 32 (bf16 2^-12, fp16 2^-15, fp32 2^-28).
AUTO_FILTER_DIVISOR = 32


def gradient_filter_eps(gradient_filter, dtype: torch.dtype) -> float:
    """The fused LM head's ``gradient_filter`` as the kernels' float threshold (0.0 = off).

    None: off. "auto": ``torch.finfo(dtype).eps / 32`` of the inputs' dtype, the threshold below which a
    softmax entry's gradient g · p is under 1/32 of an ulp of a gradient of magnitude g in that dtype
    (Cut Cross-Entropy's choice). A float in [0, 1): that threshold (0 = off)."""
    if gradient_filter is None:
        return 0.0
    if isinstance(gradient_filter, str):
        if gradient_filter != "auto":
            raise ValueError(f"gradient_filter must be None, 'auto' or a float in [0, 1), got {gradient_filter!r}")
        return torch.finfo(dtype).eps / AUTO_FILTER_DIVISOR
    valid = isinstance(gradient_filter, (int, float)) and not isinstance(gradient_filter, bool)
    if not valid or not 0 <= gradient_filter < 1:
        raise ValueError(f"gradient_filter must be None, 'auto' or a float in [0, 1), got {gradient_filter!r}")
    return float(gradient_filter)
