"""TRL's shared fused LM head on dpo_kernels' op: one call for every TRL trainer that uses it.

```python
from dpo_kernels.integrations.trl import patch_fused_lm_head

patch_fused_lm_head()            # from here on; .undo() on the handle it returns restores TRL's function
with patch_fused_lm_head():      # or for a block
    trainer.train()
```

TRL 1.16's trainers (SFT, DPO, KTO, GRPO, RLOO) score their tokens through ``add_fused_lm_head`` in
``trl.trainer.utils``, which calls ``_ChunkedLogProbFunction.apply`` (``trl.kernels.ChunkedLogProbFunction``)
on the scored rows. The patch replaces that one name with :class:`FusedHead`, whose ``apply`` takes the same
arguments and returns the same five per-token outputs, computed by the per-token pass
:func:`dpo_kernels.tokens.from_hidden` (the op ``dpo_kernels::fused_linear_token_logps``):

- ``log_probs``: the op's log-probs, differentiable w.r.t. the hidden states, the weight and the bias;
- ``entropy``: the op's entropy statistic; differentiable (see below);
- ``mean_logits``: Σ_v z_v / V; ``is_top1``: the label is the first index of the maximum logit;
  ``log_sum_sq_probs``: log Σ_v p_v² = log Σ_v exp(2 z_v) − 2·lse. These three carry no gradient, as in TRL.

The logits are TRL's: ``z = (h·Wᵀ + b)·logit_scale``, softcapped, divided by the temperature, in the
autocast dtype under autocast (else the hidden states' dtype); the outputs are fp32 (``is_top1`` bool).

The entropy's gradient (GRPO's entropy bonus, ``entropy_coef != 0``, is the one loss that uses it): the op's
statistics carry none, and a second kernel family for it is not worth its cost here, so the entropy's
gradient is handed to TRL's own function: only when the loss actually depends on the entropy (autograd
then calls :class:`_EntropyGrad`'s backward), TRL's function recomputes the entropy of the same rows and
backpropagates it; the log-probs' gradient stays the op's. A step with an entropy bonus thus also pays one
TRL forward and backward over the head; a step without one pays nothing.

Handed to TRL's function whole: a call under DeepSpeed ZeRO-3 (its head's weight is gathered only around
the forward and re-gathered by TRL's backward; the op saves the weight it was given). ``chunk_size`` (TRL's
vocabulary tile) is unused by the op, whose chunking follows ``memory_budget``. A target outside
``[0, V)`` raises (TRL's callers never pass one: they score the valid rows, or clamp the ignored ones).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .. import tokens
from .._validation import check_memory_budget

# The signature the patch replaces: ChunkedLogProbFunction.forward's parameters after ctx, and its outputs.
_EXPECTED_PARAMS = (
    "hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping", "logit_scale",
    "outputs",
)  # fmt: skip
_EXPECTED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# TRL's callers never pass this (they compact or clamp the ignored labels); the op needs some ignore index.
_IGNORE = -100


def _trl_utils():
    try:
        from trl.trainer import utils
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("patch_fused_lm_head needs TRL: pip install 'dpo-kernels[trl]'") from e
    return utils


def check_signature(function) -> None:
    """Raise a clear error unless ``function`` is called like TRL 1.16's ``ChunkedLogProbFunction``."""
    forward = getattr(function, "forward", None)
    if forward is None or not hasattr(function, "apply"):
        raise TypeError(f"trl.trainer.utils._ChunkedLogProbFunction is {function!r}, not an autograd Function")
    params = tuple(inspect.signature(forward).parameters)
    params = params[1:] if params[:1] == ("ctx",) else params
    if params != _EXPECTED_PARAMS:
        raise TypeError(
            f"patch_fused_lm_head expects trl's ChunkedLogProbFunction.forward(ctx, {', '.join(_EXPECTED_PARAMS)}), "
            f"but the installed trl's takes (ctx, {', '.join(params)}): this trl's fused head is not supported"
        )
    optional = getattr(inspect.getmodule(function), "OPTIONAL_OUTPUTS", _EXPECTED_OUTPUTS)
    if tuple(optional) != _EXPECTED_OUTPUTS:
        raise TypeError(
            f"patch_fused_lm_head expects trl's optional outputs {_EXPECTED_OUTPUTS}, but the installed trl's are "
            f"{tuple(optional)}: this trl's fused head is not supported"
        )


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return is_deepspeed_zero3_enabled()


class _EntropyGrad(torch.autograd.Function):
    """The op's entropy as the forward value; its gradient from TRL's function, recomputed on the same rows.

    Autograd calls the backward only when the loss depends on the entropy, so a logged-only entropy costs
    nothing."""

    @staticmethod
    def forward(ctx, entropy, original, hidden, weight, bias, targets, temperature, chunk_size, softcap, scale):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.call = (original, temperature, chunk_size, softcap, scale)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        original, temperature, chunk_size, softcap, scale = ctx.call
        wanted = ctx.needs_input_grad[2:5]
        inputs = [None if x is None else x.detach().requires_grad_(w) for x, w in zip((hidden, weight, bias), wanted)]
        # The inputs are already in the compute dtype; TRL's function must not recast them under autocast.
        with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
            _, entropy, *_ = original.apply(*inputs, targets, temperature, chunk_size, softcap, scale, ("entropy",))
            differentiable = [x for x in inputs if x is not None and x.requires_grad]
            grads = iter(torch.autograd.grad(entropy, differentiable, grad_entropy))
        out = [next(grads) if x is not None and x.requires_grad else None for x in inputs]
        return (None, None, *out) + (None,) * 5


class FusedHead:
    """What the patch puts in place of ``trl.trainer.utils._ChunkedLogProbFunction``: ``apply`` with its
    arguments and outputs, computed by :func:`dpo_kernels.tokens.from_hidden`."""

    def __init__(self, original, backend: str = "auto", memory_budget: Optional[int] = None):
        self.original = original
        self.backend = backend
        self.memory_budget = memory_budget

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=_EXPECTED_OUTPUTS):  # fmt: skip
        args = (hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)
        if _zero3():
            return self.original.apply(*args)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(device=hidden.device, dtype=dtype)
        bias = None if bias is None else bias.to(device=hidden.device, dtype=dtype)
        # TRL reads a softcap of 0.0 as a softcap of 1.0 (`softcap or 1.0` once it is not None): kept as TRL has it.
        softcap = None if final_logit_softcapping is None else float(final_logit_softcapping or 1.0)
        with_stats = any(name in outputs for name in _EXPECTED_OUTPUTS)
        with torch.autocast(device, enabled=False):
            out = tokens.from_hidden(
                hidden.unsqueeze(0), weight, bias, targets.unsqueeze(0), ignore_index=_IGNORE, shift=False,
                logit_scale=float(logit_scale), softcap=softcap, temperature=float(temperature),
                memory_budget=self.memory_budget, backend=self.backend, with_stats=with_stats, with_mask=False,
            )  # fmt: skip
        logps, lse, stats = out.logps[0].float(), out.lse[0].float(), out.stats[0].float()
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = stats[:, 1]
            if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
                entropy = _EntropyGrad.apply(entropy, self.original, hidden, weight, bias, targets, temperature,
                                             chunk_size, final_logit_softcapping, logit_scale)  # fmt: skip
        if "log_sum_sq_probs" in outputs:
            log_sum_sq = stats[:, 3] - 2 * lse
        if "mean_logits" in outputs:
            mean_logits = stats[:, 0] / out.vocab_size
        if "is_top1" in outputs:
            is_top1 = stats[:, 2] > 0.5
        return logps, entropy, log_sum_sq, mean_logits, is_top1


class FusedHeadPatch:
    """The handle :func:`patch_fused_lm_head` returns: ``undo()`` restores TRL's function; as a context
    manager, leaving the block undoes the patch if this call installed it (a patch that was already in
    place stays)."""

    def __init__(self, head: FusedHead, installed: bool):
        self.head = head
        self.installed = installed

    @property
    def active(self) -> bool:
        return _trl_utils()._ChunkedLogProbFunction is self.head

    def undo(self) -> None:
        """Restore TRL's ``_ChunkedLogProbFunction`` (a no-op when it is already restored)."""
        utils = _trl_utils()
        if isinstance(utils._ChunkedLogProbFunction, FusedHead):
            utils._ChunkedLogProbFunction = utils._ChunkedLogProbFunction.original

    def __enter__(self) -> "FusedHeadPatch":
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            self.undo()


def patch_fused_lm_head(backend: str = "auto", memory_budget: Optional[int] = None) -> FusedHeadPatch:
    """Make TRL's shared fused LM head (``trl.trainer.utils.add_fused_lm_head``, used by SFT, DPO, KTO, GRPO
    and RLOO) run dpo_kernels' op instead of ``ChunkedLogProbFunction``; returns a :class:`FusedHeadPatch`.

    ``backend`` and ``memory_budget`` (bytes of fp32 logits the portable path forms at a time) go to
    :func:`dpo_kernels.tokens.from_hidden`. Patching twice is one patch (the second call sets the options
    and returns a handle that leaves it in place on leaving a ``with`` block); ``undo()`` restores TRL's
    function. Raises ``TypeError`` when the installed TRL's function has another signature. What runs where
    (the entropy's gradient, ZeRO-3): see :mod:`dpo_kernels.integrations.trl_head`.
    """
    check_memory_budget(memory_budget)
    utils = _trl_utils()
    current = getattr(utils, "_ChunkedLogProbFunction", None)
    if current is None:
        raise TypeError("trl.trainer.utils has no _ChunkedLogProbFunction: this trl's fused head is not supported")
    if isinstance(current, FusedHead):
        current.backend, current.memory_budget = backend, memory_budget
        return FusedHeadPatch(current, installed=False)
    check_signature(current)
    head = FusedHead(current, backend, memory_budget)
    utils._ChunkedLogProbFunction = head
    return FusedHeadPatch(head, installed=True)


__all__ = ["FusedHead", "FusedHeadPatch", "check_signature", "patch_fused_lm_head"]
