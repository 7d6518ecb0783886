"""torch.library registration of the log-prob kernels, their autograd, and backend dispatch.

Three custom ops, each with a fake implementation so torch.compile and FakeTensorMode see shapes
without running a kernel:

- ``dpo_kernels::token_logps(logits, labels, ignore_index, shift, backend, inplace_backward, with_stats)``
  -> (logp, lse, stats): logp (N, T - shift) fp32 (fp64 for fp64 logits), differentiable w.r.t. logits;
  lse (N, T - shift, 2) in the same dtype, the log-sum-exp in two parts (c, log Σ_v exp(z_v − c)), c the
  row max on the native and Triton kernels, which the backward consumes as exp((z − c) − log s): one
  rounded fp32 lse would cost exp(z − lse) |lse|·2^-24 of relative error (``lse_value`` sums the parts);
  stats (N, T - shift, 4) in that dtype with ``with_stats`` (the columns of ``reference.STATS``, computed
  in the same pass over the logits), else an empty (N, T - shift, 0). lse and stats are not
  differentiable.
- ``dpo_kernels::token_logps_backward`` -> a fresh gradient of the logits' shape and dtype.
- ``dpo_kernels::token_logps_backward_`` writes that gradient into the logits' own storage.

``custom_op`` rather than ``triton_op``: triton_op traces the kernel body under fake tensors, which
fails under ``TRITON_INTERPRET=1`` on CPU tensors, and that is how this project tests its kernels.
"""

import importlib.util
import os

import torch

from . import native

BACKENDS = ("auto", "triton", "native", "torch")
BACKEND_ENV = "DPO_KERNELS_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend for tensors of ``dtype`` on ``device``.

    An explicit ``backend`` wins; ``"auto"`` defers to ``$DPO_KERNELS_BACKEND`` and then picks, for CUDA
    tensors, Triton (else the native CUDA kernels), and for CPU tensors the native C++ kernels; the
    portable PyTorch kernels serve whatever is left (with a one-line warning when native kernels were
    wanted but are not built).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    return _resolve(backend, device.type, dtype, triton_interpreting())


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, dtype: torch.dtype, interpreting: bool) -> str:
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        if device_type == "cuda" and has_triton:
            return "triton"
        if device_type in ("cpu", "cuda"):
            if native.has_kernel(device_type):
                return "native"
            native.warn_unavailable(device_type)
        return "torch"
    if backend == "triton":
        if not has_triton:
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if device_type != "cuda" and not interpreting:
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); "
                f"got tensors on {device_type}"
            )
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes float32, bfloat16 or float16 logits, got float64")
    if backend == "native" and not native.has_kernel(device_type):
        reason = native.load_error() or f"it has no kernels for {device_type} tensors"
        raise ValueError(f"backend='native' needs the compiled extension dpo_kernels._C: {reason}")
    return backend


def _kernels(backend: str):
    if backend == "triton":
        from .triton import logprobs
    elif backend == "native":
        native.load_error()  # imports dpo_kernels._C (registering its ops) when no resolve_backend has yet
        logprobs = native
    elif backend == "torch":
        from .portable import logprobs
    else:
        raise ValueError(f"unknown resolved backend {backend!r}")
    return logprobs


def _check_label_range(labels: torch.Tensor, ignore_index: int, shift: bool, V: int) -> None:
    # Runs inside the op (eagerly, even under torch.compile), so a bad label is an error, never an
    # out-of-bounds read or a silent number. On CPU the clear error below costs nothing more than the
    # reduction; on CUDA reading the flag would block the host on the GPU (and break graph capture), so
    # the check is a device-side assert instead: a bad label stops the stream with this message at the
    # next synchronization (the kernels themselves give NaN for such a label meanwhile, never a read
    # out of bounds).
    used = labels[:, int(shift) :]
    bad = (used != ignore_index) & ((used < 0) | (used >= V))
    if labels.is_cuda:
        torch._assert_async(~bad.any(), f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        value = used[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {V}) (the vocabulary size of logits) or equal ignore_index="
            f"{ignore_index}; found {value}"
        )


def _out_shape(logits: torch.Tensor, shift: bool):
    N, T, _ = logits.shape
    return (N, max(T - int(shift), 0))


# Columns of the per-token statistics: reference.STATS = (sum_logits, entropy, top1, lse2).
N_STATS = 4


def lse_value(lse: torch.Tensor) -> torch.Tensor:
    """(N, T - shift) log-sum-exp from the two-part (N, T - shift, 2) ``lse`` of ``token_logps``."""
    return lse[..., 0] + lse[..., 1]


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("dpo_kernels::token_logps", mutates_args=())
def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    shift: bool,
    backend: str,
    inplace_backward: bool,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_label_range(labels, ignore_index, shift, logits.shape[-1])
    return _kernels(backend).token_logps_fwd(logits, labels, ignore_index, shift, with_stats)


@token_logps.register_fake
def _(logits, labels, ignore_index, shift, backend, inplace_backward, with_stats):
    shape, dtype = _out_shape(logits, shift), _out_dtype(logits)
    stats_shape = (*shape, N_STATS if with_stats else 0)
    return (
        logits.new_empty(shape, dtype=dtype),
        logits.new_empty((*shape, 2), dtype=dtype),
        logits.new_empty(stats_shape, dtype=dtype),
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
) -> torch.Tensor:
    return _kernels(backend).token_logps_bwd(grad_logp, logits, labels, lse, ignore_index, shift)


@token_logps_backward.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, shift, backend):
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
) -> None:
    _kernels(backend).token_logps_bwd(grad_logp, logits, labels, lse, ignore_index, shift, logits)


@token_logps_backward_.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, shift, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, shift, backend, inplace_backward, with_stats = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.args = (ignore_index, shift, backend)
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(output[2])  # the stats are metrics: no gradient flows through them


def _backward(ctx, grad_logp, grad_lse, grad_stats):
    logits, labels, lse = ctx.saved_tensors
    if grad_logp is None:
        return None, None, None, None, None, None, None
    # The kernels read the upstream gradient in the output's dtype (expand 0-strides are fine).
    grad_logp = grad_logp.to(lse.dtype)
    if ctx.inplace_backward and not torch.compiler.is_compiling():
        torch.ops.dpo_kernels.token_logps_backward_(grad_logp, logits, labels, lse, *ctx.args)
        grad = logits.detach()  # the gradient is data, not a node of the graph
    else:
        grad = torch.ops.dpo_kernels.token_logps_backward(grad_logp, logits, labels, lse, *ctx.args)
    return grad, None, None, None, None, None, None


token_logps.register_autograd(_backward, setup_context=_setup_context)
