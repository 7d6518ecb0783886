"""The ops layer: the only code that registers or calls ``torch.ops.dpo_kernels``.

Two op families, each a ``torch.library`` custom op with a fake implementation (torch.compile and
FakeTensorMode see shapes without running a kernel) and registered autograd:

- the logits path, :func:`token_logps` (``dpo_kernels::token_logps``, :mod:`.logits`);
- the fused LM head, :func:`linear_token_logps` (``dpo_kernels::fused_linear_token_logps``, :mod:`.linear`).

Both return ``(logp, lse, stats)`` per token in one layout: logp (N, T - shift) fp32 (fp64 for fp64
inputs), lse (N, T - shift, 2) the log-sum-exp as (row max, log Σ exp(z − max)) (:func:`lse_value` sums
it), stats (N, T - shift, 4) with the columns of ``reference.STATS`` or (N, T - shift, 0). Both take a
vocabulary window (``vocab_start``: the first global id of the slice they are given, labels global), and
their backwards (:func:`token_logps_backward`, :func:`linear_token_logps_backward`) take the lse to use,
which is how the sharded path (``dpo_kernels.sharding``) runs them with a global lse. Backends:
:func:`resolve_backend`; the native library: :mod:`.native`.
"""

from typing import Optional

import torch

from . import linear, logits, native  # importing linear and logits registers their ops
from .backends import BACKENDS, resolve_backend, triton_interpreting
from .logits import N_STATS, lse_value, out_dtype

__all__ = [
    "BACKENDS",
    "N_STATS",
    "linear",
    "linear_logits",
    "linear_logits_backward_",
    "linear_token_logps",
    "linear_token_logps_backward",
    "logits",
    "lse_value",
    "native",
    "out_dtype",
    "resolve_backend",
    "token_logps",
    "token_logps_backward",
    "triton_interpreting",
]


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    backend: str,
    inplace_backward: bool = False,
    with_stats: bool = False,
    vocab_start: int = 0,
    vocab_size: int = -1,
):
    """(logp, lse, stats) of ``logits`` (N, T, V_r) at ``labels`` (N, T); ``backend`` resolved."""
    return torch.ops.dpo_kernels.token_logps(
        logits, labels, ignore_index, shift, backend, inplace_backward, with_stats, vocab_start, vocab_size
    )


def token_logps_backward(grad_logp, logits, labels, lse, *, ignore_index: int, shift: bool, backend: str,
                         vocab_start: int = 0) -> torch.Tensor:  # fmt: skip
    """g·(onehot − exp((z − lse[0]) − lse[1])) as a new tensor of the logits' shape and dtype."""
    return torch.ops.dpo_kernels.token_logps_backward(
        grad_logp, logits, labels, lse, ignore_index, shift, backend, vocab_start
    )


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    chunk_elements: int,
    backend: str,
    with_stats: bool = False,
    gradient_filter: float = 0.0,
    vocab_start: int = 0,
    vocab_size: int = -1,
):
    """(logp, lse, stats) of the LM head ``weight`` (V_r, H) (+ ``bias``) on ``hidden`` (N, T, H)."""
    return torch.ops.dpo_kernels.fused_linear_token_logps(
        hidden, weight, bias, labels, ignore_index, shift, float(logit_scale),
        None if softcap is None else float(softcap), float(temperature), int(chunk_elements), backend,
        with_stats, float(gradient_filter), vocab_start, vocab_size,
    )  # fmt: skip


def linear_token_logps_backward(grad_logp, hidden, weight, bias, labels, lse, *, ignore_index: int, shift: bool,
                                logit_scale: float, softcap: Optional[float], temperature: float, chunk_elements: int,
                                backend: str, gradient_filter: float = 0.0, vocab_start: int = 0):  # fmt: skip
    """(d_hidden, d_weight, d_bias or None) of Σ grad_logp · logp from the two-part ``lse`` given."""
    d_hidden, d_weight, d_bias = torch.ops.dpo_kernels.fused_linear_token_logps_backward(
        grad_logp, hidden, weight, bias, labels, lse, ignore_index, shift, float(logit_scale),
        None if softcap is None else float(softcap), float(temperature), int(chunk_elements), backend,
        float(gradient_filter), vocab_start,
    )  # fmt: skip
    return d_hidden, d_weight, d_bias if bias is not None else None


def linear_logits_dtype(backend: str, hidden: torch.Tensor, bias, logit_scale: float, softcap: Optional[float],
                        temperature: float) -> torch.dtype:  # fmt: skip
    """The dtype of the one-pass head's logits buffer: fp32 (fp64 for fp64 inputs), or on the portable and
    native backends a 16-bit head's own dtype when it has no bias and no transform: its logits are the 16-bit
    products, exact in 16 bits, and dz is rounded to 16 bits before its products anyway, so half the buffer
    holds the same numbers."""
    plain = bias is None and logit_scale == 1.0 and softcap is None and temperature == 1.0
    if plain and backend != "triton" and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return out_dtype(hidden)


def linear_logits(logits, hidden, weight, bias, labels, *, logit_scale: float, softcap: Optional[float],
                  temperature: float, backend: str, with_stats: bool = False, vocab_start: int = 0):  # fmt: skip
    """The one-pass head's forward over compacted rows: (logp, lse, stats) of ``hidden`` (M, H), the rows'
    transformed logits left in ``logits`` (M, V; its dtype :func:`linear_logits_dtype`) for
    :func:`linear_logits_backward_`."""
    return torch.ops.dpo_kernels.fused_linear_logits(
        logits, hidden, weight, bias, labels, float(logit_scale), None if softcap is None else float(softcap),
        float(temperature), backend, with_stats, vocab_start,
    )  # fmt: skip


def linear_logits_backward_(logits, grad, hidden, weight, bias, labels, lse, *, logit_scale: float,
                            softcap: Optional[float], temperature: float, backend: str, d_weight, d_bias,
                            vocab_start: int = 0) -> torch.Tensor:  # fmt: skip
    """d_hidden (M, H) from the logits :func:`linear_logits` left (overwritten by dz), accumulating the head's
    gradient into ``d_weight`` and ``d_bias`` (fp32, or None)."""
    return torch.ops.dpo_kernels.fused_linear_logits_backward_(
        logits, grad, hidden, weight, bias, labels, lse, float(logit_scale),
        None if softcap is None else float(softcap), float(temperature), backend, d_weight, d_bias, vocab_start,
    )  # fmt: skip
