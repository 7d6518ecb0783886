"""Integrations with the Hugging Face stack.

- :mod:`dpo_kernels.integrations.hf`: per-sequence log-probs of a ``transformers`` causal LM through the
  fused LM head (``sequence_logps_from_model``), no logits formed;
- :mod:`dpo_kernels.integrations.trl`: ``FusedDPOTrainer`` / ``apply_fused_dpo``, TRL's ``DPOTrainer``
  with its loss computed by the fused LM head and :func:`dpo_kernels.preference.dpo_from_tokens`,
  ``FusedKTOTrainer`` / ``apply_fused_kto`` for TRL's ``KTOTrainer`` (:mod:`dpo_kernels.integrations.trl_kto`),
  and ``patch_fused_lm_head``: every TRL trainer's shared fused LM head on this library's op
  (:mod:`dpo_kernels.integrations.trl_head`) (needs ``pip install dpo-kernels[trl]``).

The submodules are imported on demand, so ``import dpo_kernels.integrations`` needs no extra package.
"""

__all__ = ["hf", "trl"]


def __getattr__(name):
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
