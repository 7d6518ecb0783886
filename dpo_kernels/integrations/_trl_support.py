"""What the TRL trainers of :mod:`dpo_kernels.integrations.trl` share: the supported TRL versions and the
options their fused loss steps refuse. Imports no TRL, so that both trainers' modules can use it."""

from __future__ import annotations

import functools
import os
from importlib import metadata

import torch

from .._validation import check_memory_budget, gradient_filter_eps

SUPPORTED_TRL = (">=1.16.0", "<1.17.0")
_MIN_TRL, _MAX_TRL = "1.16.0", "1.17.0"
ANY_TRL_ENV = "DPO_KERNELS_ANY_TRL"


def check_trl_version(installed: str | None = None) -> str:
    """Raise a clear error unless the installed TRL is in :data:`SUPPORTED_TRL`; returns the version."""
    from packaging.version import Version

    installed = installed or metadata.version("trl")
    if os.environ.get(ANY_TRL_ENV, "") not in ("", "0"):
        return installed
    if not Version(_MIN_TRL) <= Version(installed) < Version(_MAX_TRL):
        raise RuntimeError(
            f"dpo_kernels.integrations.trl supports trl{','.join(SUPPORTED_TRL)}, but trl {installed} is installed: "
            f"it overrides trainer internals that change between releases. Install a supported version "
            f"(pip install 'trl{','.join(SUPPORTED_TRL)}'), or set {ANY_TRL_ENV}=1 to try anyway."
        )
    return installed


def unsupported(args) -> list[str]:
    """The trainer config's options the fused loss steps do not support, each with its reason."""
    found = []
    if getattr(args, "use_liger_kernel", False):
        found.append("use_liger_kernel=True (Liger patches the model; the LM head is already fused here)")
    return found


def raise_unsupported(trainer: str, found: list[str]) -> None:
    if found:
        raise NotImplementedError(f"{trainer} does not support: " + "; ".join(found))


def store_options(trainer, backend: str, memory_budget, gradient_filter) -> None:
    """Check a fused trainer's options (a bad value raises at construction, before the model is set up) and
    keep them on the trainer, where its loss step and TRL's reference precompute read them."""
    check_memory_budget(memory_budget)
    gradient_filter_eps(gradient_filter, torch.float32)
    trainer._dpo_kernels_backend = backend
    trainer._dpo_kernels_memory_budget = memory_budget
    trainer._dpo_kernels_gradient_filter = gradient_filter


@functools.lru_cache(maxsize=None)
def fused_class(cls: type, stock: type, fused: type, loss: type) -> type:
    """The fused version of ``cls``, a subclass of the stock trainer ``stock``: ``fused`` itself for the stock
    class, else ``cls`` with the loss step ``loss`` mixed in front."""
    if cls is stock:
        return fused
    return type(f"Fused{cls.__name__}", (loss, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def apply_fused(trainer, stock: type, fused: type, loss: type, name: str, backend, memory_budget, gradient_filter):
    """``apply_fused_*``: ``trainer`` (a ``stock`` trainer, constructed) turned into its fused version in place."""
    check_trl_version()
    if not isinstance(trainer, stock):
        raise TypeError(f"{name} expects a {stock.__module__.split('.')[0]}.{stock.__name__}, "
                        f"got {type(trainer).__name__}")  # fmt: skip
    if not isinstance(trainer, loss):
        trainer.__class__ = fused_class(type(trainer), stock, fused, loss)
    trainer._dpo_kernels_configure(backend, memory_budget, gradient_filter)
    return trainer
