"""TRL's ``KTOTrainer`` with its loss computed by dpo_kernels: one line to adopt.

```python
from dpo_kernels.integrations.trl import FusedKTOTrainer, apply_fused_kto

trainer = FusedKTOTrainer(model, ref_model=ref, args=KTOConfig(...), train_dataset=ds, processing_class=tok)
# or, on a trainer already built:
trainer = apply_fused_kto(KTOTrainer(...))
```

As :class:`dpo_kernels.integrations.trl.FusedDPOTrainer` is for DPO: everything but the loss step is TRL's
(datasets, the mismatched KL completions, collation, PEFT set-up, precomputed reference log-probs, logging).
The loss step runs the model's backbone with the fused head inside the model's forward
(:data:`dpo_kernels.integrations.hf.TOKENS_FLAG`, so that FSDP and ZeRO-3 see the head used by its own
module) on the completions, and without autograd on the KL completions; scores the reference the same way
(a reference model, the PEFT base with its adapter disabled or TRL's "ref" adapter, or the precomputed
``ref_logps`` / ``ref_KL_logps``), and applies :func:`dpo_kernels.preference.kto_from_tokens` with the
``KTOConfig`` options (``loss_type`` ``kto`` or ``apo_zero_unpaired``, ``beta``, ``desirable_weight``,
``undesirable_weight``). As the stock trainer, the KL estimate is the mean over all processes of each
process's mean, clamped at 0 after the average. Metrics go into ``self._metrics[mode]`` under the stock
trainer's names with its values (sums and counts gathered over processes, in one gather).

Supported TRL and refused options: as for ``FusedDPOTrainer``.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .. import losses, preference
from . import hf
from ._trl_support import apply_fused, check_trl_version, raise_unsupported, store_options, unsupported

try:
    from trl import KTOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL (and transformers): pip install 'dpo-kernels[trl]'"
    ) from e

# Batch keys that are not the model's inputs, for the completions' forward and for the KL completions'.
_NON_MODEL_KEYS = ("completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
                   "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps")  # fmt: skip
_NON_KL_MODEL_KEYS = ("input_ids", "attention_mask", "completion_mask", "KL_completion_mask", "KL_token_type_ids",
                      "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps")  # fmt: skip
# The metrics that are means over tokens or examples, in the stock trainer's order.
_MEANS = ("entropy", "logits/chosen", "logits/rejected", "rewards/chosen", "logps/chosen", "rewards/rejected",
          "logps/rejected")  # fmt: skip


class _FusedKTOLoss:
    """The loss step of :class:`FusedKTOTrainer`, mixed in front of a ``KTOTrainer`` class."""

    _dpo_kernels_backend = "auto"
    _dpo_kernels_memory_budget = None
    _dpo_kernels_gradient_filter = None

    def _dpo_kernels_configure(self, backend: str, memory_budget, gradient_filter=None) -> None:
        store_options(self, backend, memory_budget, gradient_filter)
        found = unsupported(self.args)
        if getattr(self, "_is_vlm", False) or getattr(self, "_is_vision_dataset", False):
            found.append("vision-language models and image datasets (untested with the backbone call)")
        raise_unsupported("FusedKTOTrainer", found)
        try:
            losses.check_kto_options(self.beta, self.desirable_weight, self.undesirable_weight, self.loss_type)
        except (ValueError, TypeError) as e:
            raise ValueError(f"FusedKTOTrainer cannot compute this KTOConfig's loss: {e}") from e
        hf.install_hidden_forward(self.model)
        if getattr(self, "ref_model", None) is not None:
            hf.install_hidden_forward(self.ref_model)

    # ---------------------------------------------------------------------------------- per-token pass

    def _dpo_kernels_tokens(self, model, model_kwargs, labels, *, with_stats: bool):
        """(Tokens, aux_loss) of ``model`` on a batch: backbone through every wrapper, the fused head inside the
        model's forward (its vocab_size read there: outside it a ZeRO-3 or FSDP1 weight is a shard)."""
        hf.install_hidden_forward(model)  # idempotent; the precompute may run before configure
        gradient_filter = self._dpo_kernels_gradient_filter if torch.is_grad_enabled() else None
        options = dict(labels=labels, with_stats=with_stats, backend=self._dpo_kernels_backend,
                       memory_budget=self._dpo_kernels_memory_budget, gradient_filter=gradient_filter)  # fmt: skip
        out = model(**model_kwargs, **{hf.TOKENS_FLAG: options})
        return out.tokens, out.aux_loss

    def _dpo_kernels_summed(self, model, model_kwargs, labels) -> torch.Tensor:
        """(B,) summed completion log-probs, no statistics (the KL completions, the reference)."""
        return self._dpo_kernels_tokens(model, model_kwargs, labels, with_stats=False)[0].logps.sum(-1)

    @staticmethod
    def _dpo_kernels_main_inputs(batch):
        """(model kwargs, labels) of the completions."""
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        return model_kwargs, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    @staticmethod
    def _dpo_kernels_kl_inputs(batch):
        """(model kwargs, labels) of the mismatched KL completions, as the stock trainer builds them."""
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_KL_MODEL_KEYS}
        model_kwargs["input_ids"] = model_kwargs.pop("KL_input_ids")
        model_kwargs["attention_mask"] = model_kwargs.pop("KL_attention_mask")
        model_kwargs["use_cache"] = False
        # the KL sequences have their own widths: their token-type tensors replace the completions'
        for name in ("token_type_ids", "mm_token_type_ids"):
            if f"KL_{name}" in batch:
                model_kwargs[name] = batch[f"KL_{name}"]
        return model_kwargs, batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, -100)

    def _dpo_kernels_ref_context(self):
        """The PEFT base (adapter disabled) or TRL's "ref" adapter, when there is no reference model."""
        from trl.trainer.utils import use_adapter

        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _dpo_kernels_reference(self, batch, model_kwargs, labels):
        """(B,) reference log-probs of the completions and, for ``kto``, (B,) of the KL completions."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing

        model_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        use_base = is_peft_model(self.model) and self.ref_model is None
        context = self._dpo_kernels_ref_context() if use_base else contextlib.nullcontext()
        model = self.model if use_base else self.ref_model
        ref_kl = None
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with context:
                if self.calculate_KL:
                    ref_kl = self._dpo_kernels_summed(model, *self._dpo_kernels_kl_inputs(batch))
                ref = self._dpo_kernels_summed(model, model_kwargs, labels)
        return ref, ref_kl

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL's precompute calls this), by the fused head:
        (completions, KL completions or None)."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing

        context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            context = self._dpo_kernels_ref_context()
        # the stock precompute passes only the ids and the attention mask
        inputs_of = {
            "": ("input_ids", "attention_mask", "completion_mask"),
            "KL_": ("KL_input_ids", "KL_attention_mask", "KL_completion_mask"),
        }
        out = []
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            context,
            self.accelerator.autocast(),
        ):
            for prefix in ("", "KL_") if self.calculate_KL else ("",):
                ids, attention, completion = (inputs[k] for k in inputs_of[prefix])
                kwargs = {"input_ids": ids, "attention_mask": attention, "use_cache": False}
                out.append(self._dpo_kernels_summed(model, kwargs, ids.masked_fill(completion == 0, -100)))
        return out[0], out[1] if self.calculate_KL else None

    # -------------------------------------------------------------------------------------- the loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        model_kwargs, labels = self._dpo_kernels_main_inputs(batch)
        if self.aux_loss_enabled:  # MoE: the backbone returns router logits, the patch the aux loss
            model_kwargs["output_router_logits"] = True

        policy_kl = None
        if self.calculate_KL:  # the KL term is a constant of the loss: no autograd
            with torch.no_grad():
                policy_kl = self._dpo_kernels_summed(model, *self._dpo_kernels_kl_inputs(batch))
        tokens, aux_loss = self._dpo_kernels_tokens(model, model_kwargs, labels, with_stats=True)
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=tokens.logps.device)
        if self.precompute_ref_logps:
            ref = batch["ref_logps"]
            ref_kl = batch["ref_KL_logps"] if self.calculate_KL else None
        else:
            ref, ref_kl = self._dpo_kernels_reference(batch, model_kwargs, labels)

        acc = self.accelerator
        loss, metrics, counts = preference.kto_from_tokens(
            tokens.logps, tokens.mask, ref, policy_kl, ref_kl, desirable, stats=tokens.stats,
            vocab_size=tokens.vocab_size, kl_reduce=lambda kl: acc.gather_for_metrics(kl).mean(),
            beta=self.beta, desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )  # fmt: skip
        self._dpo_kernels_log(mode, metrics, counts, batch)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(acc.gather_for_metrics(aux_loss).mean().item())

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` is deprecated in TRL; the fused LM head forms no logits, so they are "
                "recomputed with an extra forward pass.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**{k: v for k, v in model_kwargs.items() if k != "output_router_logits"})
            return loss, outputs
        return loss

    def _dpo_kernels_log(self, mode, metrics, counts, batch) -> None:
        """``metrics`` (this process's means) into ``self._metrics[mode]`` as the stock trainer logs them:
        each mean over all processes (sums of value · count over sums of counts, one gather), left out where
        its count is 0 (entropy: 0.0), the margin the difference of the logged reward means."""
        acc = self.accelerator
        logged = self._metrics[mode]
        logged["kl"].append(metrics["kl"].item())
        local = torch.stack([metrics[name].float() * counts[name].float() for name in _MEANS]
                            + [counts[name].float() for name in _MEANS])  # fmt: skip
        if mode == "train":
            local = torch.cat([local, batch["attention_mask"].sum().float().reshape(1)])
        # one row per process, as the stock trainer's scalars gather (and truncate, at an uneven evaluation end)
        totals = local if acc.num_processes == 1 else acc.gather_for_metrics(local[None]).sum(0)
        totals = totals.tolist()
        sums, n = dict(zip(_MEANS, totals)), dict(zip(_MEANS, totals[len(_MEANS) :]))
        logged["entropy"].append(sums["entropy"] / n["entropy"] if n["entropy"] > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(totals[-1]) // self._tp_size
        logged["num_tokens"] = [self._total_train_tokens]
        for name in _MEANS[1:]:
            if n[name] > 0:
                logged[name].append(sums[name] / n[name])
        if n["rewards/chosen"] > 0 and n["rewards/rejected"] > 0:
            logged["rewards/margins"].append(logged["rewards/chosen"][-1] - logged["rewards/rejected"][-1])


class FusedKTOTrainer(_FusedKTOLoss, KTOTrainer):
    """``trl.KTOTrainer`` whose loss runs on dpo_kernels' fused LM head: the same arguments, loss, metrics and
    gradients, without the (B, T, V) logits.

    Extra keyword arguments, as for :class:`dpo_kernels.integrations.trl.FusedDPOTrainer`: ``backend``,
    ``memory_budget`` and ``gradient_filter``. Raises at construction outside the supported TRL versions and
    for ``use_liger_kernel`` and vision-language models.
    """

    def __init__(self, *args, backend: str = "auto", memory_budget: int | None = None, gradient_filter=None, **kwargs):
        check_trl_version()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        raise_unsupported("FusedKTOTrainer", unsupported(config))
        # The precompute of reference log-probs runs inside KTOTrainer.__init__ and calls our
        # compute_ref_log_probs, which reads these.
        store_options(self, backend, memory_budget, gradient_filter)
        super().__init__(*args, **kwargs)
        self._dpo_kernels_configure(backend, memory_budget, gradient_filter)


def apply_fused_kto(trainer, *, backend: str = "auto", memory_budget: int | None = None, gradient_filter=None):
    """Turn a constructed ``KTOTrainer`` (or subclass) into its fused version, in place; returns it.

    Reference log-probs that TRL already precomputed are kept (they are the same numbers). Raises like
    :class:`FusedKTOTrainer` for an unsupported TRL version or option.
    """
    return apply_fused(trainer, KTOTrainer, FusedKTOTrainer, _FusedKTOLoss, "apply_fused_kto", backend,
                       memory_budget, gradient_filter)  # fmt: skip


__all__ = ["FusedKTOTrainer", "apply_fused_kto"]
