"""The native backend: the C++ CPU and CUDA kernels of csrc/, built into ``dpo_kernels._C``.

The extension is built at install time (setup.py). Where it could not be built, asking for these
kernels falls back to the other backends with a one-line warning (``backend="auto"``) or raises
(``backend="native"``); nothing is compiled at run time.
"""

import functools
import warnings

import torch

OPS = ("native_token_logps", "native_token_logps_backward", "native_token_logps_backward_")
# Columns of the optional per-token statistics, in the order of reference.STATS.
N_STATS = 4


@functools.cache
def load_error():
    """None once the extension is loaded (its ops registered), else why it could not be."""
    try:
        from .. import _C  # noqa: F401  (loading the library registers the dpo_kernels::native_* ops)
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    _register_fakes()
    return None


def warn_unavailable(device_type: str) -> None:
    _warn_once(load_error() or f"dpo_kernels._C was built without {device_type.upper()} kernels")


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"dpo_kernels: native kernels unavailable ({reason}); using the other backends", stacklevel=4)


def has_kernel(device_type: str) -> bool:
    """Whether the extension is loaded and has kernels for tensors of this device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None or load_error() is not None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dpo_kernels::{op}", key) for op in OPS)


def _register_fakes() -> None:
    def fwd_fake(logits, labels, ignore_index, shift, with_stats=False, vocab_start=0):
        n, t, _ = logits.shape
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        shape = (n, max(t - int(shift), 0))
        stats_shape = (*shape, N_STATS if with_stats else 0)
        return (
            logits.new_empty(shape, dtype=dtype),
            logits.new_empty((*shape, 2), dtype=dtype),  # the lse as (row max, log of the sum)
            logits.new_empty(stats_shape, dtype=dtype),
        )

    torch.library.register_fake("dpo_kernels::native_token_logps", fwd_fake)
    torch.library.register_fake(
        "dpo_kernels::native_token_logps_backward", lambda grad, logits, *rest: torch.empty_like(logits)
    )
    torch.library.register_fake("dpo_kernels::native_token_logps_backward_", lambda *args: None)


# The backend interface shared with dpo_kernels.triton.logprobs and dpo_kernels.portable.logprobs.


def token_logps_fwd(logits, labels, ignore_index: int, shift: bool, with_stats: bool = False, *, vocab_start=0):
    """-> (logp, lse, stats): stats is (N, T - shift, 4) with ``with_stats`` (the columns of
    ``reference.STATS``, from the same pass over the logits), else (N, T - shift, 0).

    ``vocab_start``: the logits' columns are the vocabulary ids [vocab_start, vocab_start + V) and the
    labels are global ids; a label outside that window scores as a label logit of 0 (csrc/common.h)."""
    return torch.ops.dpo_kernels.native_token_logps(logits, labels, ignore_index, shift, with_stats, vocab_start)


def token_logps_bwd(grad_tok, logits, labels, lse, ignore_index: int, shift: bool, out=None, *, vocab_start=0):
    """The gradient w.r.t. logits from the given lse: for a window (``vocab_start``), the whole
    vocabulary's, so the result is the window's columns of the whole gradient."""
    args = (grad_tok, logits, labels, lse, ignore_index, shift, vocab_start)
    if out is None:
        return torch.ops.dpo_kernels.native_token_logps_backward(*args)
    if out is not logits:
        raise ValueError("the native backward writes either a new tensor or the logits themselves")
    torch.ops.dpo_kernels.native_token_logps_backward_(*args)
    return logits
