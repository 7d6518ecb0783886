"""Which kernels run: the backend names, their resolution for a device and dtype, and the kernel modules
behind each (the launchers of ``dpo_kernels.triton``, ``dpo_kernels.portable`` and the native library)."""

import functools
import importlib.util
import os

import torch

from ..portable import linear as portable_linear
from ..portable import logprobs as portable_logprobs
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


def logits_kernels(backend: str):
    """The logits path's launchers (``token_logps_fwd``, ``token_logps_bwd``) of a resolved backend (Triton
    imported here: it may be missing)."""
    if backend == "triton":
        from ..triton import logprobs

        return logprobs
    if backend == "native":
        native.load_error()  # imports dpo_kernels._C (registering its ops) when no resolve_backend has yet
        return native
    if backend == "torch":
        return portable_logprobs
    raise ValueError(f"unknown resolved backend {backend!r}")


def linear_forward(backend: str, softcap):
    """The fused head's forward launcher. Triton without a softcap: the logits of row chunks as cuBLAS
    products, scored by the logits path's kernel (``fused_linear_logps_fwd_cublas``), which the cost model
    puts ahead of the fused tensor-core kernel as long as a Triton tl.dot loop runs below 0.87 of the GEMM
    rate (``benchmarks.modeled``; the GPU check times both). With a softcap the fused kernel, whose tanh
    costs nothing in registers and three passes over the fp32 logits there."""
    if backend == "triton":
        from ..triton import linear

        return linear.fused_linear_logps_fwd if softcap is not None else linear.fused_linear_logps_fwd_cublas
    return linear_kernels(backend).fused_linear_logps_fwd


def onepass_kernels(backend: str):
    """The one-pass head's launchers ``(fused_linear_logits_fwd, fused_linear_logits_bwd_)``: Triton's own, or
    the portable head's products around the logits path's kernels of the backend (the native library's
    log-sum-exp and in-place gradient on the "native" backend)."""
    if backend == "triton":
        from ..triton import linear

        return linear.fused_linear_logits_fwd, linear.fused_linear_logits_bwd_
    scorer = logits_kernels(backend)
    return (
        functools.partial(portable_linear.fused_linear_logits_fwd, scorer=scorer),
        functools.partial(portable_linear.fused_linear_logits_bwd_, scorer=scorer),
    )


def linear_kernels(backend: str):
    """The fused head's launchers. The native library has no matmul kernels: ATen's matmuls (the portable
    head) serve the "native" and "torch" backends."""
    if backend == "triton":
        from ..triton import linear

        return linear
    return portable_linear
