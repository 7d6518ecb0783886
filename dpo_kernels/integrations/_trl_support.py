"""What the TRL trainers of :mod:`dpo_kernels.integrations.trl` share: the supported TRL versions and the
options their fused loss steps refuse. Imports no TRL, so that both trainers' modules can use it."""

from __future__ import annotations

import os
from importlib import metadata

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
