"""The fused LM head's custom ops: per-token log-probs from hidden states and the head's weight, without
ever forming the (N, T, V) logits, and their backward.

``dpo_kernels::fused_linear_token_logps(hidden, weight, bias, labels, ignore_index, shift, logit_scale,
softcap, temperature, chunk_elements, backend, with_stats, gradient_filter=0.0, vocab_start=0,
vocab_size=-1)`` -> (logp, lse, stats) in the layout of ``dpo_kernels::token_logps`` (lse two-part
(N, T - shift, 2)); differentiable w.r.t. hidden, weight and bias through logp. The logits are
``(hidden·weightᵀ + bias)·logit_scale``, softcapped when ``softcap`` is set, divided by ``temperature``.
``weight`` may be the rows [vocab_start, vocab_start + V_r) of a larger head (labels global), with
``vocab_size`` as in ``dpo_kernels.ops.logits``.

Only scored rows reach the kernels (a compacted row list), so prompt and padding tokens cost no FLOPs;
their hidden gradient is an exact zero. While a CUDA graph is being captured every row runs instead
(``_scored_rows``: no host synchronization).
"""

from typing import Optional

import torch

from .backends import linear_forward, linear_kernels, onepass_kernels
from .logits import N_STATS, check_label_range, out_dtype


def _static_rows(labels: torch.Tensor) -> bool:
    """Whether the op must run with shapes known on the host, without reading the labels: while a CUDA
    graph is being captured (``torch.cuda.graph``, torch.compile's "reduce-overhead" mode) nothing may wait
    for the device, and a replay reuses the captured grids whatever the next batch's labels are."""
    return labels.is_cuda and torch.cuda.is_current_stream_capturing()


def _scored_rows(labels: torch.Tensor, ignore_index: int, shift: bool, T_out: int):
    """(n, t, y, keep): the rows the kernels score, their labels, and None, or a (rows,) bool mask of the
    scored ones among them when every row runs (``_static_rows``).

    Compaction (the eager default) makes prompt and padding rows cost nothing, which at DPO's 30-60 %
    prompt share is worth far more than its nonzero()'s host synchronization (one in the forward, one in
    the backward): the CPU waits for the stream to drain up to the labels' mask, and the GPU then idles
    for the time the host takes to enqueue the next kernels (index gathers and a Triton launch, tens of
    µs; modeled in docs/fused_head.md, timed by the GPU check's routes step). Under graph capture
    every row runs instead, an unscored one with its hidden state zeroed and label 0, so that it adds
    exact zeros to the weight's gradient; it costs the unscored rows' FLOPs."""
    y = labels[:, int(shift) : int(shift) + T_out]
    if not _static_rows(labels):
        n_idx, t_idx = (y != ignore_index).nonzero(as_tuple=True)
        return n_idx, t_idx, y[n_idx, t_idx].long(), None
    N = y.shape[0]
    n_idx = torch.arange(N, device=y.device).repeat_interleave(T_out)
    t_idx = torch.arange(T_out, device=y.device).repeat(N)
    keep = (y != ignore_index).flatten()
    return n_idx, t_idx, torch.where(keep, y.flatten(), 0).long(), keep


def _unscored_lse(lse: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """The backward's two-part (rows, 2) lse with (+inf, 0) in unscored rows: their softmax is then
    exp((z − inf) − 0) = 0 whatever the bias makes of their zeroed hidden state, so their dz is an exact 0
    (not 0 · an overflowed exp). Built from scalars: no host-to-device copy under graph capture."""
    if keep is None:
        return lse
    return torch.stack([torch.where(keep, lse[:, 0], torch.inf), torch.where(keep, lse[:, 1], 0.0)], dim=-1)


def _zeroed(rows: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """rows with the unscored ones (``keep`` false) zeroed."""
    return rows if keep is None else torch.where(keep.view(-1, *(1,) * (rows.dim() - 1)), rows, 0)


def _budget(chunk_elements: int) -> dict:
    """The chunk size (0: the launchers' default): the portable path's fp32 logits per chunk, the Triton
    forward's logits chunk and backward's dz chunk buffer (``chunk_elements`` · 4 bytes)."""
    return {} if chunk_elements == 0 else {"chunk_elements": chunk_elements}


def _filter(backend: str, gradient_filter: float) -> dict:
    """The Triton backward's ``filter_eps`` (only a Triton kernel has tiles to skip; elsewhere: exact)."""
    return {"filter_eps": gradient_filter} if backend == "triton" and gradient_filter > 0 else {}


@torch.library.custom_op("dpo_kernels::fused_linear_token_logps", mutates_args=())
def fused_linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    shift: bool,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    chunk_elements: int,
    backend: str,
    with_stats: bool,
    gradient_filter: float = 0.0,
    vocab_start: int = 0,
    vocab_size: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    checked = vocab_start + weight.shape[0] if vocab_size < 0 else vocab_size
    if checked:
        check_label_range(labels, ignore_index, shift, checked)
    N, T, _ = hidden.shape
    T_out = max(T - int(shift), 0)
    logp = hidden.new_zeros((N, T_out), dtype=out_dtype(hidden))
    lse = hidden.new_zeros((N, T_out, 2), dtype=logp.dtype)
    stats = hidden.new_zeros((N, T_out, N_STATS if with_stats else 0), dtype=logp.dtype)
    n, t, y, keep = _scored_rows(labels, ignore_index, shift, T_out)
    if n.numel():
        out_logp, out_lse, out_stats = linear_forward(backend, softcap)(
            _zeroed(hidden[n, t], keep), weight, bias, y, logit_scale, softcap, temperature,
            **_budget(chunk_elements), with_stats=with_stats, vocab_start=vocab_start,
        )  # fmt: skip
        logp[n, t], lse[n, t] = _zeroed(out_logp, keep).to(logp.dtype), _zeroed(out_lse, keep).to(lse.dtype)
        if with_stats:
            stats[n, t] = _zeroed(out_stats, keep).to(stats.dtype)
    return logp, lse, stats


@fused_linear_token_logps.register_fake
def _(hidden, weight, bias, labels, ignore_index, shift, logit_scale, softcap, temperature, chunk_elements, backend,
      with_stats, gradient_filter=0.0, vocab_start=0, vocab_size=-1):  # fmt: skip
    N, T, _ = hidden.shape
    shape = (N, max(T - int(shift), 0))
    dtype = out_dtype(hidden)
    stats = hidden.new_empty((*shape, N_STATS if with_stats else 0), dtype=dtype)
    return hidden.new_empty(shape, dtype=dtype), hidden.new_empty((*shape, 2), dtype=dtype), stats


@torch.library.custom_op("dpo_kernels::fused_linear_token_logps_backward", mutates_args=())
def fused_linear_token_logps_backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: bool,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    chunk_elements: int,
    backend: str,
    gradient_filter: float = 0.0,
    vocab_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d_hidden, d_weight, d_bias) from the two-part ``lse`` it is given; d_bias is empty when there is
    no bias. ``gradient_filter``: the Triton backward's filter_eps (0.0 = off; other backends compute exact
    gradients)."""
    T_out = lse.shape[1]
    n, t, y, keep = _scored_rows(labels, ignore_index, shift, T_out)
    d_hidden = torch.zeros_like(hidden)
    if n.numel() == 0:
        d_bias = torch.zeros_like(bias) if bias is not None else weight.new_empty(0)
        return d_hidden, torch.zeros_like(weight), d_bias
    dh, d_weight, d_bias = linear_kernels(backend).fused_linear_logps_bwd(
        _zeroed(grad_logp[n, t], keep), _zeroed(hidden[n, t], keep), weight, bias, y, _unscored_lse(lse[n, t], keep),
        logit_scale, softcap, temperature, **_budget(chunk_elements), **_filter(backend, gradient_filter),
        vocab_start=vocab_start,
    )  # fmt: skip
    d_hidden[n, t] = _zeroed(dh, keep)
    return d_hidden, d_weight, d_bias if d_bias is not None else weight.new_empty(0)


@fused_linear_token_logps_backward.register_fake
def _(grad_logp, hidden, weight, bias, labels, lse, *args):
    d_bias = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), d_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *args, with_stats, gradient_filter, vocab_start, vocab_size = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.args = (*args, gradient_filter, vocab_start)  # the backward op's scalar arguments
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_logp, grad_lse, grad_stats):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    d_hidden, d_weight, d_bias = torch.ops.dpo_kernels.fused_linear_token_logps_backward(
        grad_logp.to(lse.dtype), hidden, weight, bias, labels, lse, *ctx.args
    )
    return (d_hidden, d_weight, d_bias if bias is not None else None) + (None,) * 12


fused_linear_token_logps.register_autograd(_backward, setup_context=_setup_context)


# The one-pass head: a group's logits formed once into a caller's buffer and scored, then, once the
# caller has the loss's per-row gradient, overwritten in place by dz and consumed by the two products.
# Rows are compacted by the caller (every row scored): these ops take (M, H) rows, not (N, T, H).


@torch.library.custom_op("dpo_kernels::fused_linear_logits", mutates_args=("logits",))
def fused_linear_logits(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    backend: str,
    with_stats: bool,
    vocab_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp (M,), lse (M, 2), stats (M, 4 | 0)) of the rows ``hidden`` (M, H) at global ``labels`` (M,),
    their transformed logits left in ``logits`` (M, V) (fp32, fp64 for fp64 inputs; or a plain 16-bit head's
    dtype on the portable backends: ``ops.linear_logits_dtype``)."""
    logp, lse, stats = onepass_kernels(backend)[0](
        logits, hidden, weight, bias, labels, logit_scale, softcap, temperature, with_stats=with_stats,
        vocab_start=vocab_start,
    )  # fmt: skip
    return logp, lse, stats if with_stats else logp.new_empty((hidden.shape[0], 0))


@fused_linear_logits.register_fake
def _(logits, hidden, weight, bias, labels, logit_scale, softcap, temperature, backend, with_stats, vocab_start=0):
    M = hidden.shape[0]
    dtype = out_dtype(hidden)
    return (hidden.new_empty((M,), dtype=dtype), hidden.new_empty((M, 2), dtype=dtype),
            hidden.new_empty((M, N_STATS if with_stats else 0), dtype=dtype))  # fmt: skip


@torch.library.custom_op("dpo_kernels::fused_linear_logits_backward_", mutates_args=("logits", "d_weight", "d_bias"))
def fused_linear_logits_backward_(
    logits: torch.Tensor,
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    logit_scale: float,
    softcap: Optional[float],
    temperature: float,
    backend: str,
    d_weight: Optional[torch.Tensor],
    d_bias: Optional[torch.Tensor],
    vocab_start: int = 0,
) -> torch.Tensor:
    """-> d_hidden (M, H) of Σ grad · logp over the rows, from the logits :func:`fused_linear_logits` left;
    accumulates into ``d_weight`` (V, H; None: not wanted) and ``d_bias`` ((V,) fp32, or None); ``logits`` ends
    up holding dz."""
    return onepass_kernels(backend)[1](
        logits, grad, hidden, weight, bias, labels, lse, logit_scale, softcap, temperature, d_weight=d_weight,
        d_bias=d_bias, vocab_start=vocab_start,
    )  # fmt: skip


@fused_linear_logits_backward_.register_fake
def _(logits, grad, hidden, *args):
    return torch.empty_like(hidden)
