"""The provider registry: every implementation the harness can time, per workload.

Each provider computes the same thing on the same inputs: the per-sequence log-probs of the labels
(shift by one, prompt tokens labelled -100 skipped, summed over the scored tokens) and, on top, the
reference-free sigmoid DPO loss ``-mean log σ(β·(logp_chosen − logp_rejected))`` with β = 0.1 (the
first half of the batch is "chosen", the second "rejected"). Reference-free because every provider
accepts it (Liger's fused DPO loss takes no precomputed reference log-probs); a frozen reference's
log-probs would enter as constants and change no kernel.

Workloads:

- ``logits``: the logits (N, T, V) are given; fn(logits, labels) -> Out. Gradient: d loss / d logits.
- ``lm_head``: the last hidden states (N, T, H) and the LM-head weight (V, H) are given; the matmul is
  part of the work; fn(hidden, weight, labels) -> Out. Gradients w.r.t. hidden and weight.

A provider returns ``Out(loss, logps)``; ``logps`` is None where the provider only exposes the loss
(its correctness check then compares the loss and the gradients). Peers are imported lazily: a peer
that is not installed is listed as unavailable and skipped.
"""

import importlib.util
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

BETA = 0.1
IGNORE = -100
WORKLOADS = ("logits", "lm_head")


class Out(NamedTuple):
    loss: torch.Tensor
    logps: Optional[torch.Tensor]


def dpo_from_logps(logps: torch.Tensor) -> Out:
    """The harness's one sigmoid DPO loss on (2B,) per-sequence log-probs, reference-free."""
    chosen, rejected = logps.float().chunk(2)
    return Out(-F.logsigmoid(BETA * (chosen - rejected)).mean(), logps)


@dataclass
class Provider:
    name: str
    workload: str
    build: Callable[[], Callable]  # -> fn(*inputs) -> Out; runs the lazy imports
    available: Callable[[torch.device], Optional[str]]  # None when it can run here, else why not
    kind: str = "library"  # "reference" | "library" | "peer"
    inplace: bool = False  # overwrites the logits with their gradient
    compiles: bool = False  # torch.compile inside: warm up at full size before measuring memory
    default: bool = True
    note: str = ""
    imports: tuple = ()  # modules the memory probe's forkserver imports up front


def _have(module: str) -> Optional[str]:
    return None if importlib.util.find_spec(module) is not None else f"{module} not installed"


def _always(device):
    return None


def _backend_available(backend: str):
    def check(device):
        from dpo_kernels.ops import native

        if backend == "torch":
            return None
        if backend == "native":
            return None if native.has_kernel(device.type) else f"dpo_kernels._C has no {device.type} kernels"
        if backend == "triton":
            from dpo_kernels.ops import triton_interpreting

            # On CPU tensors only under the interpreter: how the GPU check's dry run exercises these providers.
            if device.type != "cuda" and not triton_interpreting():
                return "Triton runs on CUDA only (or on CPU tensors under TRITON_INTERPRET=1)"
            return _have("triton")
        return f"unknown backend {backend}"

    return check


def _cuda_only_and(module):
    def check(device):
        return _have(module) if device.type == "cuda" else "GPU only"

    return check


# ----------------------------------------------------------------------------------------------------
# logits workload


def _reference_logits():
    from dpo_kernels import reference

    return lambda logits, labels: dpo_from_logps(reference.sequence_logps(logits, labels))


def _reference_dpo_loss():
    from dpo_kernels import reference

    return lambda logits, labels: Out(reference.dpo_loss(logits, None, labels, BETA)[0], None)


def _library_logits(backend: str, inplace: bool):
    def build():
        import dpo_kernels

        def fn(logits, labels):
            return dpo_from_logps(dpo_kernels.sequence_logps(logits, labels, backend=backend, inplace_backward=inplace))

        return fn

    return build


def _fused_dpo_loss():
    import dpo_kernels

    return lambda logits, labels: Out(dpo_kernels.fused_dpo_loss(logits, None, labels, BETA)[0], None)


def _trl_selective_log_softmax():
    from trl.trainer.utils import selective_log_softmax

    def fn(logits, labels):
        # As TRL's trainers call it: shifted logits, ignored labels clamped to a valid index, then masked.
        y = labels[:, 1:]
        mask = y != IGNORE
        per_token = selective_log_softmax(logits[:, :-1], y.masked_fill(~mask, 0))
        return dpo_from_logps(torch.where(mask, per_token, 0.0).sum(-1))

    return fn


# ----------------------------------------------------------------------------------------------------
# lm_head workload


def _reference_lm_head():
    from dpo_kernels import reference

    return lambda h, w, labels: dpo_from_logps(reference.sequence_logps(reference.lm_head_logits(h, w), labels))


def _library_lm_head(backend: str):
    def build():
        import dpo_kernels

        return lambda h, w, labels: dpo_from_logps(dpo_kernels.fused_linear_sequence_logps(h, w, labels, backend=backend))

    return build


def _library_lm_head_loss(backend: str):
    def build():
        import dpo_kernels

        def fn(h, w, labels):
            return Out(dpo_kernels.fused_linear_dpo_loss(h, w, labels, backend=backend, token_metrics=False)[0], None)

        return fn

    return build


def _trl_chunked():
    """TRL's chunked LM-head log-prob autograd function (``trl.kernels.ChunkedLogProbFunction``, imported
    by ``trl.trainer.utils`` as ``_ChunkedLogProbFunction``), called the way TRL's fused LM-head forward
    calls it: scored rows only, TRL's own vocabulary chunk size, no optional outputs."""
    try:
        from trl.trainer.utils import _ChunkedLogProbFunction as chunked
    except ImportError:
        from trl.kernels import ChunkedLogProbFunction as chunked
    from trl.trainer import utils as trl_utils

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return lambda h, w, labels: _trl_head_call(chunked, chunk, h, w, labels)


def _trl_head_call(chunked, chunk, h, w, labels):
    """TRL's fused LM-head forward's call of its chunked function: scored rows only, no optional outputs."""
    y = labels[:, 1:]
    mask = y != IGNORE
    per_token, *_ = chunked.apply(h[:, :-1][mask], w, None, y[mask], 1.0, chunk, None, 1.0, ())
    logps = per_token.new_zeros(mask.shape).masked_scatter(mask, per_token)
    return dpo_from_logps(logps.sum(-1))


def _trl_head_patched():
    """The same call as ``trl.ChunkedLogProbFunction``'s, under ``patch_fused_lm_head()``: what every TRL trainer's
    fused head runs once patched. The patch is entered per call, so that it never leaks into the other providers."""
    from trl.trainer import utils as trl_utils

    from dpo_kernels.integrations.trl import patch_fused_lm_head

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)

    def fn(h, w, labels):
        with patch_fused_lm_head():
            return _trl_head_call(trl_utils._ChunkedLogProbFunction, chunk, h, w, labels)

    return fn


def _liger_dpo():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, use_ref_model=False)

    def fn(h, w, labels):
        # Liger takes pre-shifted inputs and targets, chosen first (its documented layout).
        out = loss_fn(w, h[:, :-1].contiguous(), labels[:, 1:].contiguous())
        return Out(out[0] if isinstance(out, tuple) else out, None)

    return fn


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    def fn(h, w, labels):
        ce = linear_cross_entropy(h, w, labels, ignore_index=IGNORE, reduction="none", shift=True, impl="torch_compile")
        return dpo_from_logps(-ce.float().sum(-1))

    return fn


# ----------------------------------------------------------------------------------------------------
# The registry


def registry() -> list[Provider]:
    P = Provider
    out = [
        P("reference", "logits", _reference_logits, _always, kind="reference",
          note="dpo_kernels.reference.sequence_logps (fp32 log_softmax over (N, T, V)) + sigmoid DPO"),
        P("reference.dpo_loss", "logits", _reference_dpo_loss, _always, kind="reference", default=False,
          note="dpo_kernels.reference.dpo_loss, loss only (computes its logged metrics too)"),
    ]  # fmt: skip
    for backend in ("native", "torch", "triton"):
        for inplace in (False, True):
            suffix = "+inplace" if inplace else ""
            out.append(
                P(f"dpo_kernels[{backend}]{suffix}", "logits", _library_logits(backend, inplace),
                  _backend_available(backend), inplace=inplace,
                  note=f"dpo_kernels.sequence_logps(backend={backend!r}, inplace_backward={inplace})")
            )  # fmt: skip
    out += [
        P("fused_dpo_loss", "logits", _fused_dpo_loss, _always, default=False,
          note="dpo_kernels.fused_dpo_loss, loss only (auto backend; computes its metrics too)"),
        P("trl.selective_log_softmax", "logits", _trl_selective_log_softmax, lambda d: _have("trl"), kind="peer",
          imports=("trl.trainer.utils",), note="trl.trainer.utils.selective_log_softmax + mask + sum"),
        P("reference", "lm_head", _reference_lm_head, _always, kind="reference",
          note="hidden @ weight.T (reference.lm_head_logits) + reference.sequence_logps + sigmoid DPO"),
    ]  # fmt: skip
    for backend in ("torch", "triton"):  # backend="native" has no matmul kernels: it runs the torch path
        out.append(
            P(f"dpo_kernels.fused_linear[{backend}]", "lm_head", _library_lm_head(backend), _backend_available(backend),
              note=f"dpo_kernels.fused_linear_sequence_logps(backend={backend!r}), default memory budget")
        )  # fmt: skip
    for backend in ("native", "triton"):
        out.append(
            P(f"dpo_kernels.fused_linear_dpo_loss[{backend}]", "lm_head", _library_lm_head_loss(backend),
              _backend_available(backend),
              note=f"dpo_kernels.fused_linear_dpo_loss(backend={backend!r}), reference-free sigmoid, no token metrics: "
              "the one-pass route (default memory budget)")
        )  # fmt: skip
    out += [
        P("trl.ChunkedLogProbFunction", "lm_head", _trl_chunked, lambda d: _have("trl"), kind="peer",
          imports=("trl.trainer.utils",), note="trl.kernels.ChunkedLogProbFunction (trl.trainer.utils._ChunkedLogProbFunction), scored rows"),
        P("trl_head[dpo_kernels]", "lm_head", _trl_head_patched, lambda d: _have("trl"),
          imports=("trl.trainer.utils", "dpo_kernels.integrations.trl"),
          note="TRL head on dpo_kernels: the trl.ChunkedLogProbFunction call under "
          "dpo_kernels.integrations.trl.patch_fused_lm_head() (auto backend)"),
        P("liger.LigerFusedLinearDPOLoss", "lm_head", _liger_dpo, lambda d: _have("liger_kernel"), kind="peer",
          compiles=True, imports=("liger_kernel.chunked_loss",),
          note="liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(use_ref_model=False), loss only; it computes "
          "the gradients inside its forward (torch.func.grad_and_value per chunk), so its 'bwd' is ~0 and "
          "only fwd+bwd compares"),
        P("cce.linear_cross_entropy", "lm_head", _cce, lambda d: _have("cut_cross_entropy"), kind="peer",
          compiles=True, imports=("cut_cross_entropy",), note='cut_cross_entropy.linear_cross_entropy(impl="torch_compile", reduction="none")'),
    ]  # fmt: skip
    return out


def get(workload: str, name: str) -> Provider:
    for p in registry():
        if p.workload == workload and p.name == name:
            return p
    raise KeyError(f"no provider {name!r} for workload {workload!r}")


def select(workload: str, names, device: torch.device):
    """(runnable providers, {name: why skipped}) for a workload; ``names`` None means the defaults.
    The reference always comes first: it is what the others are checked and compared against."""
    chosen, skipped = [], {}
    candidates = [p for p in registry() if p.workload == workload]
    if names is None:
        wanted = [p for p in candidates if p.default]
    else:
        known = {p.name for p in candidates}
        wanted = [p for p in candidates if p.name in names or p.kind == "reference" and p.name == "reference"]
        for n in names:
            if n not in known and not any(n == p.name for p in registry()):
                raise KeyError(n)
    for p in wanted:
        why = p.available(device)
        if why is None:
            chosen.append(p)
        else:
            skipped[p.name] = why
    chosen.sort(key=lambda p: p.name != "reference")
    return chosen, skipped
