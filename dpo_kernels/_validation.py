"""Argument checks shared by the public entry points: a clear error naming the argument, up front."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def check_logits(name: str, logits, *, slice_of_vocabulary: bool = False) -> None:
    """``slice_of_vocabulary``: a rank's slice of a sharded vocabulary, which may be empty."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape (N, T, V), got {tuple(logits.shape)}")
    if logits.shape[-1] == 0 and not slice_of_vocabulary:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")


def check_labels(labels, logits, logits_name: str, labels_name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{labels_name} must be int64 or int32 token ids, got {labels.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"{labels_name} must have shape (N, T) = {tuple(logits.shape[:2])} to match {logits_name} "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{labels_name} are on {labels.device} but {logits_name} is on {logits.device}")


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


def check_lm_head(hidden_name, hidden, weight_name, weight, bias_name, bias) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{hidden_name} must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{hidden_name} must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"{hidden_name} must have shape (N, T, H), got {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{weight_name} must have shape (V, H) with H = {hidden.shape[2]}, got {shape}")
    for name, t in ((weight_name, weight), (bias_name, bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have {hidden_name}'s dtype {hidden.dtype}, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {hidden_name} is on {hidden.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_ref_head(
    policy_hidden, weight, ref_hidden, ref_weight, ref_bias, names=("policy_hidden", "ref_hidden")
) -> None:
    """The reference head must score the policy's tokens: the same (N, T) and vocabulary size V. ``names``: the
    arguments that hold ``policy_hidden`` and ``ref_hidden``, for the messages."""
    policy_name, ref_name = names
    head_name = f"weight (scoring {ref_name})" if ref_weight is None else "ref_weight"
    check_lm_head(ref_name, ref_hidden, head_name, weight if ref_weight is None else ref_weight, "ref_bias", ref_bias)
    if ref_hidden.shape[:2] != policy_hidden.shape[:2]:
        raise ValueError(
            f"{ref_name} must have shape (N, T, H) with the (N, T) of {policy_name} {tuple(policy_hidden.shape)}, "
            f"got {tuple(ref_hidden.shape)}"
        )
    if ref_weight is not None and ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight must cover the policy's vocabulary: weight has shape {tuple(weight.shape)}, "
            f"ref_weight {tuple(ref_weight.shape)}"
        )


def check_transform(logit_scale, softcap, temperature) -> None:
    if not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def check_memory_budget(memory_budget) -> None:
    valid = isinstance(memory_budget, int) and not isinstance(memory_budget, bool) and memory_budget >= 4
    if memory_budget is not None and not valid:
        raise ValueError(f"memory_budget must be None or a number of bytes >= 4, got {memory_budget!r}")
