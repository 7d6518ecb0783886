"""The logits path's custom ops: per-token log-probs of given logits, and their backward.

- ``dpo_kernels::token_logps(logits, labels, ignore_index, shift, backend, inplace_backward, with_stats,
  vocab_start=0, vocab_size=-1)`` -> (logp, lse, stats): logp (N, T - shift) fp32 (fp64 for fp64 logits),
  differentiable w.r.t. logits; lse (N, T - shift, 2) in the same dtype, the log-sum-exp in two parts
  (c, log Σ_v exp(z_v − c)), c the row max, which the backward consumes as exp((z − c) − log s): one
  rounded fp32 lse would cost exp(z − lse)·|lse|·2^-24 of relative error (``lse_value`` sums the parts);
  stats (N, T - shift, 4) in that dtype with ``with_stats`` (the columns of ``reference.STATS``, computed
  in the same pass over the logits), else an empty (N, T - shift, 0). lse and stats are not
  differentiable.
- ``dpo_kernels::token_logps_backward`` -> a fresh gradient of the logits' shape and dtype, from the lse
  it is given; ``dpo_kernels::token_logps_backward_`` writes it into the logits' own storage.

The vocabulary window: ``logits`` may be the columns [vocab_start, vocab_start + V_r) of a larger
vocabulary, the labels global ids; a label outside the window is scored with a label logit of 0 (the
sharded path combines the windows, ``dpo_kernels.sharding``). ``vocab_size``: labels must lie in
[0, vocab_size) or equal ignore_index; -1 means vocab_start + V_r, 0 that the caller has checked them.

``custom_op`` rather than ``triton_op``: triton_op traces the kernel body under fake tensors, which
fails under ``TRITON_INTERPRET=1`` on CPU tensors, and that is how this project tests its kernels.
"""

import torch

from .backends import logits_kernels

# Columns of the per-token statistics: reference.STATS = (sum_logits, entropy, top1, lse2).
N_STATS = 4


def lse_value(lse: torch.Tensor) -> torch.Tensor:
    """(..., ) log-sum-exp from a two-part (..., 2) ``lse`` of the ops."""
    return lse[..., 0] + lse[..., 1]


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the per-token outputs: fp64 inputs are scored in fp64, everything else in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_label_range(labels: torch.Tensor, ignore_index: int, shift: bool, vocab_size: int) -> None:
    """A label outside [0, vocab_size) that is not ignore_index is an error, never a silent number.

    Runs inside the ops (eagerly, even under torch.compile). On CPU the clear error costs nothing more
    than the reduction; on CUDA reading the flag would block the host on the GPU (and break graph capture),
    so the check is a device-side assert: a bad label stops the stream with this message at the next
    synchronization (the kernels meanwhile score such a label as one outside their window)."""
    used = labels[:, int(shift) :]
    bad = (used != ignore_index) & ((used < 0) | (used >= vocab_size))
    if labels.is_cuda:
        torch._assert_async(~bad.any(), f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        value = used[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) (the vocabulary size) or equal ignore_index={ignore_index}; "
            f"found {value}"
        )


def _checked_vocab(vocab_size: int, vocab_start: int, local_vocab: int) -> int:
    return vocab_start + local_vocab if vocab_size < 0 else vocab_size


def _out_shape(logits: torch.Tensor, shift: bool):
    N, T, _ = logits.shape
    return (N, max(T - int(shift), 0))


@torch.library.custom_op("dpo_kernels::token_logps", mutates_args=())
def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    shift: bool,
    backend: str,
    inplace_backward: bool,
    with_stats: bool,
    vocab_start: int = 0,
    vocab_size: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    checked = _checked_vocab(vocab_size, vocab_start, logits.shape[-1])
    if checked:
        check_label_range(labels, ignore_index, shift, checked)
    return logits_kernels(backend).token_logps_fwd(logits, labels, ignore_index, shift, with_stats,
                                                   vocab_start=vocab_start)  # fmt: skip


@token_logps.register_fake
def _(logits, labels, ignore_index, shift, backend, inplace_backward, with_stats, vocab_start=0, vocab_size=-1):
    shape, dtype = _out_shape(logits, shift), out_dtype(logits)
    return (
        logits.new_empty(shape, dtype=dtype),
        logits.new_empty((*shape, 2), dtype=dtype),
        logits.new_empty((*shape, N_STATS if with_stats else 0), dtype=dtype),
    )


@torch.library.custom_op("dpo_kernels::token_logps_backward", mutates_args=())
def token_logps_backward(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: bool,
    backend: str,
    vocab_start: int = 0,
) -> torch.Tensor:
    return logits_kernels(backend).token_logps_bwd(grad_logp, logits, labels, lse, ignore_index, shift,
                                                   vocab_start=vocab_start)  # fmt: skip


@token_logps_backward.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, shift, backend, vocab_start=0):
    return torch.empty_like(logits)


@torch.library.custom_op("dpo_kernels::token_logps_backward_", mutates_args=("logits",))
def token_logps_backward_(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: bool,
    backend: str,
    vocab_start: int = 0,
) -> None:
    logits_kernels(backend).token_logps_bwd(grad_logp, logits, labels, lse, ignore_index, shift, logits,
                                            vocab_start=vocab_start)  # fmt: skip


@token_logps_backward_.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, shift, backend, vocab_start=0):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, shift, backend, inplace_backward, with_stats, vocab_start, _ = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.args = (ignore_index, shift, backend, vocab_start)
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(output[1], output[2])  # lse and the stats: no gradient flows through them


def _backward(ctx, grad_logp, grad_lse, grad_stats):
    logits, labels, lse = ctx.saved_tensors
    nones = (None,) * 8
    if grad_logp is None:
        return None, *nones
    # The kernels read the upstream gradient in the output's dtype (expand 0-strides are fine).
    grad_logp = grad_logp.to(lse.dtype)
    if ctx.inplace_backward and not torch.compiler.is_compiling():
        torch.ops.dpo_kernels.token_logps_backward_(grad_logp, logits, labels, lse, *ctx.args)
        grad = logits.detach()  # the gradient is data, not a node of the graph
    else:
        grad = torch.ops.dpo_kernels.token_logps_backward(grad_logp, logits, labels, lse, *ctx.args)
    return grad, *nones


token_logps.register_autograd(_backward, setup_context=_setup_context)
