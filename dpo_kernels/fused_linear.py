"""Fused LM head + per-sequence log-probs: the (N, T, V) logits are never materialized.

``dpo_kernels::fused_linear_token_logps(hidden, weight, bias, labels, ..., with_stats)`` -> (logp, lse,
stats): logp (N, T - shift); lse (N, T - shift, 2), the log-sum-exp in the two parts of
``dpo_kernels::token_logps`` (``ops.lse_value`` sums them); stats (N, T - shift, 4) per-token statistics of
the logits from the same pass (``reference.token_stats``) with ``with_stats``, else (N, T - shift, 0). It is a
torch.library custom op with a fake implementation and registered autograd (gradients of logp w.r.t.
hidden, weight and bias; stats are not differentiable). Only scored rows reach the kernels (a
compacted row list), so prompt and padding tokens cost no FLOPs; their hidden gradient is an exact zero.
While a CUDA graph is being captured every row runs instead (``_scored_rows``: no host synchronization).
"""

import math
import warnings
from typing import Optional

import torch

from . import distributed, ops, packing
from ._validation import FLOAT_DTYPES, check_beta, check_labels, check_pairs, gradient_filter_eps
from .functional import _per_sequence
from .reference import STATS


def _kernels(backend: str):
    if backend == "triton":
        from .triton import linear
    else:  # "torch", and "native": the native library has no matmul kernels; ATen's matmuls serve both
        from .portable import linear
    return linear


def _forward(backend: str, softcap: Optional[float]):
    """The forward's launcher. Triton without a softcap: the logits of row chunks as cuBLAS products, scored
    by the logits path's kernel (``fused_linear_logps_fwd_cublas``), which the cost model puts ahead of the
    fused tensor-core kernel (``benchmarks.modeled``: 40 against 50 ms at Llama-3-8B scale on an H100, as
    long as a Triton tl.dot loop runs below 0.87 of the GEMM rate; the GPU check times both). With a softcap
    the fused kernel, whose tanh costs nothing in registers and three passes over the fp32 logits there."""
    if backend == "triton":
        from .triton import linear

        return linear.fused_linear_logps_fwd if softcap is not None else linear.fused_linear_logps_fwd_cublas
    return _kernels(backend).fused_linear_logps_fwd


def _budget(backend: str, chunk_elements: int) -> dict:
    """The chunk size (0: the default): the portable path's fp32 logits per chunk, the Triton backward's
    dz chunk buffer (``chunk_elements`` · 4 bytes)."""
    return {} if chunk_elements == 0 else {"chunk_elements": chunk_elements}


def _static_rows(labels: torch.Tensor) -> bool:
    """Whether the op must run with shapes known on the host, without reading the labels: while a CUDA
    graph is being captured (``torch.cuda.graph``, torch.compile's "reduce-overhead" mode) nothing may wait
    for the device, and a replay reuses the captured grids whatever the next batch's labels are."""
    return labels.is_cuda and torch.cuda.is_current_stream_capturing()


def _filter(backend: str, gradient_filter: float) -> dict:
    """The Triton backward's ``filter_eps`` (only a Triton kernel has tiles to skip; elsewhere: exact)."""
    return {"filter_eps": gradient_filter} if backend == "triton" and gradient_filter > 0 else {}


_FILTER_WARNED = []  # the portable / native backends' one warning that gradient_filter does not apply


def resolve_gradient_filter(gradient_filter, dtype: torch.dtype, backend: str) -> float:
    """``gradient_filter`` (None | "auto" | float) as the ops' float (0.0 = off), ValueError on a bad value;
    warns once when it is set on a backend without tiles to skip (the gradients there stay exact)."""
    eps = gradient_filter_eps(gradient_filter, dtype)
    if eps > 0 and backend != "triton" and not _FILTER_WARNED:
        _FILTER_WARNED.append(True)
        warnings.warn(
            f"gradient_filter applies to the Triton backend only; the {backend!r} backend computes exact "
            "gradients", UserWarning, stacklevel=3,
        )  # fmt: skip
    return eps if backend == "triton" else 0.0


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


N_STATS = len(STATS)  # columns of the optional per-token statistics


def _out_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ops._check_label_range(labels, ignore_index, shift, weight.shape[0])
    N, T, _ = hidden.shape
    T_out = max(T - int(shift), 0)
    logp = hidden.new_zeros((N, T_out), dtype=_out_dtype(hidden))
    lse = hidden.new_zeros((N, T_out, 2), dtype=logp.dtype)  # the kernels' two parts (m, log s)
    stats = hidden.new_zeros((N, T_out, N_STATS if with_stats else 0), dtype=logp.dtype)
    n, t, y, keep = _scored_rows(labels, ignore_index, shift, T_out)
    if n.numel():
        out_logp, out_lse, out_stats = _forward(backend, softcap)(
            _zeroed(hidden[n, t], keep), weight, bias, y, logit_scale, softcap, temperature,
            **_budget(backend, chunk_elements), with_stats=with_stats,
        )  # fmt: skip
        logp[n, t], lse[n, t] = _zeroed(out_logp, keep).to(logp.dtype), _zeroed(out_lse, keep).to(logp.dtype)
        if with_stats:
            stats[n, t] = _zeroed(out_stats, keep).to(stats.dtype)
    return logp, lse, stats


@fused_linear_token_logps.register_fake
def _(hidden, weight, bias, labels, ignore_index, shift, logit_scale, softcap, temperature, chunk_elements, backend,
      with_stats, gradient_filter=0.0):  # fmt: skip
    N, T, _ = hidden.shape
    shape = (N, max(T - int(shift), 0))
    dtype = _out_dtype(hidden)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d_hidden, d_weight, d_bias); d_bias is empty when there is no bias. ``gradient_filter``: the
    Triton backward's filter_eps (0.0 = off; other backends compute exact gradients)."""
    T_out = lse.shape[1]
    n, t, y, keep = _scored_rows(labels, ignore_index, shift, T_out)
    d_hidden = torch.zeros_like(hidden)
    if n.numel() == 0:
        d_bias = torch.zeros_like(bias) if bias is not None else weight.new_empty(0)
        return d_hidden, torch.zeros_like(weight), d_bias
    dh, d_weight, d_bias = _kernels(backend).fused_linear_logps_bwd(
        _zeroed(grad_logp[n, t], keep), _zeroed(hidden[n, t], keep), weight, bias, y, _unscored_lse(lse[n, t], keep),
        logit_scale, softcap, temperature, **_budget(backend, chunk_elements), **_filter(backend, gradient_filter),
    )  # fmt: skip
    d_hidden[n, t] = _zeroed(dh, keep)
    return d_hidden, d_weight, d_bias if d_bias is not None else weight.new_empty(0)


@fused_linear_token_logps_backward.register_fake
def _(grad_logp, hidden, weight, bias, labels, lse, *args):
    d_bias = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), d_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *args, _with_stats, gradient_filter = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.args = (*args, gradient_filter)  # the backward op's scalar arguments: everything but with_stats
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_logp, grad_lse, grad_stats):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    grads = torch.ops.dpo_kernels.fused_linear_token_logps_backward(
        grad_logp.to(lse.dtype), hidden, weight, bias, labels, lse, *ctx.args
    )
    d_hidden, d_weight, d_bias = grads
    return (d_hidden, d_weight, d_bias if bias is not None else None) + (None,) * 10


fused_linear_token_logps.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ API


def _check_lm_head(hidden_name, hidden, weight_name, weight, bias_name, bias) -> None:
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


def _check_ref_head(policy_hidden, weight, ref_hidden, ref_weight, ref_bias) -> None:
    """The reference head must score the policy's tokens: the same (N, T) and vocabulary size V."""
    head_name = "weight (scoring ref_hidden)" if ref_weight is None else "ref_weight"
    _check_lm_head("ref_hidden", ref_hidden, head_name, weight if ref_weight is None else ref_weight, "ref_bias", ref_bias)
    if ref_hidden.shape[:2] != policy_hidden.shape[:2]:
        raise ValueError(
            f"ref_hidden must have shape (N, T, H) with the (N, T) of policy_hidden {tuple(policy_hidden.shape)}, "
            f"got {tuple(ref_hidden.shape)}"
        )
    if ref_weight is not None and ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight must cover the policy's vocabulary: weight has shape {tuple(weight.shape)}, "
            f"ref_weight {tuple(ref_weight.shape)}"
        )


def _check_transform(logit_scale, softcap, temperature) -> None:
    if not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


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
    dim 0 over a 1-D mesh, e.g. ``ColwiseParallel``) ``weight``/``bias`` are this rank's rows of the head
    and every rank passes the same ``hidden`` and global ``labels``; see
    :func:`dpo_kernels.distributed.vocab_parallel_fused_linear_sequence_logps`.

    Packed batches (hidden (1, total, H), ``cu_seqlens`` or ``position_ids``) as in
    :func:`dpo_kernels.sequence_logps`: returns the (S,) per-sequence values.
    """
    if distributed.wanted(process_group, vocab_start, weight, bias):
        packing.refuse_vocab_parallel(cu_seqlens, position_ids)
        return distributed.vocab_parallel_fused_linear_sequence_logps(
            hidden, weight, labels, bias, process_group=process_group, vocab_start=vocab_start,
            ignore_index=ignore_index, shift=shift, average=average, logit_scale=logit_scale, softcap=softcap,
            temperature=temperature, memory_budget=memory_budget, backend=backend, gradient_filter=gradient_filter,
        )  # fmt: skip
    _check_lm_head("hidden", hidden, "weight", weight, "bias", bias)
    check_labels(labels, hidden, "hidden")
    _check_transform(logit_scale, softcap, temperature)
    valid_budget = isinstance(memory_budget, int) and not isinstance(memory_budget, bool) and memory_budget >= 4
    if memory_budget is not None and not valid_budget:
        raise ValueError(f"memory_budget must be None or a number of bytes >= 4, got {memory_budget!r}")
    chunk_elements = 0 if memory_budget is None else memory_budget // 4
    backend = ops.resolve_backend(backend, hidden.device, hidden.dtype)
    filter_eps = resolve_gradient_filter(gradient_filter, hidden.dtype, backend)
    pk = packing.resolve(labels, cu_seqlens, position_ids, tokens_name="hidden") if packing.wanted(
        cu_seqlens, position_ids) else None  # fmt: skip
    labels, shift = packing.kernel_labels(labels, pk, ignore_index, shift)
    token_logp, _, _ = torch.ops.dpo_kernels.fused_linear_token_logps(
        hidden, weight, bias, labels, ignore_index, shift, float(logit_scale),
        None if softcap is None else float(softcap), float(temperature), chunk_elements, backend, False, filter_eps,
    )  # fmt: skip
    scored = lambda: packing.scored(labels, shift, pk, ignore_index)  # noqa: E731  (only average needs it)
    return _per_sequence(packing.layout(token_logp, pk), scored, average)


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
    """
    if distributed.wanted(process_group, vocab_start, weight, bias, ref_weight, ref_bias):
        packing.refuse_vocab_parallel(cu_seqlens, position_ids)
        return distributed.vocab_parallel_fused_linear_dpo_loss(
            policy_hidden, weight, labels, process_group=process_group, vocab_start=vocab_start,
            ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight_shard=ref_weight, bias_shard=bias,
            ref_bias_shard=ref_bias, beta=beta, ignore_index=ignore_index, average=average,
            logit_scale=logit_scale, softcap=softcap, temperature=temperature, memory_budget=memory_budget,
            backend=backend, token_metrics=token_metrics, loss_type=loss_type, ld_alpha=ld_alpha,
            use_weighting=use_weighting, gradient_filter=gradient_filter, **loss_options,
        )  # fmt: skip
    check_beta(beta)
    _check_lm_head("policy_hidden", policy_hidden, "weight", weight, "bias", bias)
    from . import preference

    preference.check_options(average=average, ld_alpha=ld_alpha, use_weighting=use_weighting)
    check_labels(labels, policy_hidden, "policy_hidden")
    pk = packing.resolve(labels, cu_seqlens, position_ids, tokens_name="policy_hidden") if packing.wanted(
        cu_seqlens, position_ids) else None  # fmt: skip
    if pk is None:
        check_pairs("policy_hidden", policy_hidden.shape[0])
    else:
        check_pairs("the packed batch (cu_seqlens / position_ids)", len(pk.bounds) - 1)
    labels, shift = packing.kernel_labels(labels, pk, ignore_index, True)

    def tokens(hidden, head, head_bias, with_stats):
        chunk_elements = 0 if memory_budget is None else memory_budget // 4
        resolved = ops.resolve_backend(backend, hidden.device, hidden.dtype)
        grads = torch.is_grad_enabled()  # the reference side runs without autograd: no backward to filter
        filter_eps = resolve_gradient_filter(gradient_filter, hidden.dtype, resolved) if grads else 0.0
        out = torch.ops.dpo_kernels.fused_linear_token_logps(
            hidden, head, head_bias, labels, ignore_index, shift, float(logit_scale),
            None if softcap is None else float(softcap), float(temperature), chunk_elements, resolved, with_stats,
            filter_eps,
        )  # fmt: skip
        return tuple(packing.layout(t, pk) for t in out)

    _check_transform(logit_scale, softcap, temperature)
    valid_budget = isinstance(memory_budget, int) and not isinstance(memory_budget, bool) and memory_budget >= 4
    if memory_budget is not None and not valid_budget:
        raise ValueError(f"memory_budget must be None or a number of bytes >= 4, got {memory_budget!r}")
    gradient_filter_eps(gradient_filter, policy_hidden.dtype)  # a bad value raises before any kernel runs
    with_stats = preference.needs_stats(token_metrics, use_weighting)
    token_logp, lse, stats = tokens(policy_hidden, weight, bias, with_stats)
    mask = packing.scored(labels, shift, pk, ignore_index)
    policy = token_logp.sum(-1)
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("give the reference as ref_logps or as ref_hidden, not both")
    if ref_logps is not None:
        if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) != (policy.shape[0],):
            shape = tuple(ref_logps.shape) if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__
            raise ValueError(f"ref_logps must have shape ({policy.shape[0]},), got {shape}")
        ref = ref_logps.detach().to(policy.dtype)
    elif ref_hidden is not None:
        head = weight if ref_weight is None else ref_weight
        _check_ref_head(policy_hidden, weight, ref_hidden, ref_weight, ref_bias)
        with torch.no_grad():
            ref_tokens = tokens(ref_hidden, head, ref_bias, False)[0]
            ref = preference.reduce_sequences(ref_tokens, mask, average=average, ld_alpha=ld_alpha)
    else:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight / ref_bias score ref_hidden: give ref_hidden too, or leave them out")
        ref = None
    return preference.dpo_from_tokens(
        token_logp, mask, ref, stats=stats if with_stats else None, lse=ops.lse_value(lse), vocab_size=weight.shape[0],
        beta=beta, loss_type=loss_type, average=average, ld_alpha=ld_alpha, use_weighting=use_weighting,
        **loss_options,
    )  # fmt: skip
