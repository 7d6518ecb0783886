"""TRL's ``DPOTrainer`` (and ``KTOTrainer``: :class:`FusedKTOTrainer` / :func:`apply_fused_kto`, from
:mod:`dpo_kernels.integrations.trl_kto`; the experimental ``ORPOTrainer`` and ``CPOTrainer``:
``FusedORPOTrainer`` / ``apply_fused_orpo`` and ``FusedCPOTrainer`` / ``apply_fused_cpo``, from
:mod:`dpo_kernels.integrations.trl_orpo_cpo`) with its loss computed by dpo_kernels: one line to adopt.

```python
from dpo_kernels.integrations.trl import FusedDPOTrainer, apply_fused_dpo

trainer = FusedDPOTrainer(model, ref_model=ref, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
# or, on a trainer already built:
trainer = apply_fused_dpo(DPOTrainer(...))
```

Everything but the loss computation is TRL's: datasets, collation, PEFT set-up, precomputed reference
log-probs, optimizer, logging, evaluation. The loss step runs the model's backbone (through PEFT, DDP
and the like, as TRL's own fused head does), hands the last hidden states and the LM head's weight to
the fused op ``dpo_kernels::fused_linear_token_logps`` (per-token log-probs plus the statistics behind
TRL's metrics, no (B, T, V) logits), scores the reference the same way (a reference model, the PEFT
base with its adapter disabled or TRL's "ref" adapter, or precomputed ``ref_chosen_logps`` /
``ref_rejected_logps``), and applies :func:`dpo_kernels.preference.dpo_from_tokens` with the
``DPOConfig`` options. The metrics go into ``self._metrics[mode]`` under the names and with the values
the stock trainer logs.

Distributed: DDP, FSDP2, FSDP1 and DeepSpeed ZeRO-1/2/3 as the stock trainer runs them. The fused head
runs inside the model's forward (where FSDP has the root unit's head unsharded) as the LM head module's
own forward, so that ZeRO-3's hooks on the head gather its weight for the call and release it after
(see ``docs/distributed.md``).

Every TRL trainer's shared fused LM head (SFT, DPO, KTO, GRPO, RLOO through ``add_fused_lm_head``) on this
library's op instead of TRL's ``ChunkedLogProbFunction``: :func:`patch_fused_lm_head` (see
:mod:`dpo_kernels.integrations.trl_head`).

Supported TRL: ``>=1.16.0,<1.17.0`` (:data:`SUPPORTED_TRL`), checked at construction; set
``DPO_KERNELS_ANY_TRL=1`` to try another version at your own risk. Refused at construction, naming the
option: ``use_liger_kernel``, vision-language models / image datasets.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING

import torch

from .. import packing, preference
from ..reference import STATS
from . import hf
from ._trl_support import ANY_TRL_ENV, SUPPORTED_TRL, apply_fused, check_trl_version, raise_unsupported, store_options
from ._trl_support import unsupported as _unsupported
from .collate import PackedPreferenceCollator
from .trl_head import FusedHeadPatch, patch_fused_lm_head
from .trl_kto import FusedKTOTrainer, apply_fused_kto

if TYPE_CHECKING:  # imported on first use instead, by __getattr__ below
    from .trl_orpo_cpo import FusedCPOTrainer, FusedORPOTrainer, apply_fused_cpo, apply_fused_orpo

try:
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL (and transformers): pip install 'dpo-kernels[trl]'"
    ) from e

_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
# The metrics the stock trainer logs each step (besides aux_loss and num_tokens), in its order.
_TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
_PAIR_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip


# Attention implementations of transformers that keep packed sequences apart from position_ids alone.
_PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# The loss types TRL 1.16's DPOTrainer applies label_smoothing to; the others ignore it.
_TRL_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")


def _raise_unsupported(found: list[str]) -> None:
    raise_unsupported("FusedDPOTrainer", found)


class _FusedLoss:
    """The loss step of :class:`FusedDPOTrainer`, mixed in front of a ``DPOTrainer`` class."""

    _dpo_kernels_backend = "auto"
    _dpo_kernels_memory_budget = None
    _dpo_kernels_gradient_filter = None
    _dpo_kernels_route = "auto"

    def _dpo_kernels_configure(self, backend: str, memory_budget, gradient_filter=None) -> None:
        store_options(self, backend, memory_budget, gradient_filter)
        found = _unsupported(self.args)
        if getattr(self, "_is_vlm", False) or getattr(self, "_is_vision_dataset", False):
            found.append("vision-language models and image datasets (untested with the backbone call)")
        _raise_unsupported(found)
        self._dpo_kernels_check_loss_options()
        self._dpo_kernels_setup_packing()
        hf.install_hidden_forward(self.model)
        if getattr(self, "ref_model", None) is not None:
            hf.install_hidden_forward(self.ref_model)

    def _dpo_kernels_setup_packing(self) -> None:
        """``DPOConfig(padding_free=True)``: collate every batch into one row (TRL 1.16's trainer turns the
        option off); the model keeps the sequences apart from ``position_ids`` (no attention mask)."""
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self._dpo_kernels_packed = bool(getattr(self.args, "padding_free", False))
        if not self._dpo_kernels_packed:
            return
        self.padding_free = True
        for model in (self.model, getattr(self, "ref_model", None)):
            if model is None:
                continue
            impl = getattr(hf._transformers_model(model).config, "_attn_implementation", None)
            if impl not in _PACKING_ATTENTION:
                raise ValueError(
                    f"padding_free=True needs an attention implementation that keeps packed sequences apart from "
                    f"position_ids ({', '.join(_PACKING_ATTENTION)}); the model uses {impl!r}"
                )
        if isinstance(self.data_collator, DataCollatorForPreference):
            self.data_collator = PackedPreferenceCollator(self.args.max_length, self.args.truncation_mode)
        elif not isinstance(self.data_collator, PackedPreferenceCollator):
            raise ValueError(
                f"padding_free=True packs batches with dpo_kernels.integrations.collate.PackedPreferenceCollator; "
                f"the trainer was given another data_collator ({type(self.data_collator).__name__})"
            )

    def _dpo_kernels_packing(self, inputs):
        """The packed batch's sequence starts (cu_seqlens), or None for a padded batch."""
        if not (getattr(self, "_dpo_kernels_packed", False) and "position_ids" in inputs):
            return None
        labels = inputs["input_ids"]
        return packing.resolve(labels, position_ids=inputs["position_ids"].to(labels.device), tokens_name="input_ids")

    def _dpo_kernels_loss_options(self) -> dict:
        """The DPOConfig options, as :func:`dpo_kernels.preference.dpo_from_tokens` takes them."""
        return dict(
            beta=self.beta, loss_type=list(self.loss_types), loss_weights=list(self.loss_weights), average=False,
            ld_alpha=self.ld_alpha, use_weighting=self.use_weighting, label_smoothing=self.label_smoothing,
            label_smoothing_types=[t for t in self.loss_types if t in _TRL_SMOOTHED],
            f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau,
        )  # fmt: skip

    def _dpo_kernels_check_loss_options(self) -> None:
        """Refuse at construction what the loss step would refuse (or compute differently) later."""
        ignored = [t for t in self.loss_types if t not in _TRL_SMOOTHED]
        if self.label_smoothing and ignored:
            warnings.warn(
                f"label_smoothing={self.label_smoothing} is ignored for loss types {ignored}, as TRL 1.16's "
                "DPOTrainer ignores it there (dpo_kernels.fused_dpo_loss would apply it to 'sigmoid' as "
                "conservative DPO)",
                UserWarning,
                stacklevel=3,
            )
        # One tiny evaluation of the loss family: every option check it makes, up front.
        tokens = torch.full((2, 2), -1.0)
        mask = torch.ones(2, 2, dtype=torch.bool)
        stats = torch.zeros(2, 2, len(STATS))
        try:
            preference.dpo_from_tokens(
                tokens, mask, torch.full((2,), -2.0), stats=stats, lse=torch.zeros(2, 2), vocab_size=2,
                **self._dpo_kernels_loss_options(),
            )  # fmt: skip
        except (ValueError, TypeError) as e:
            raise ValueError(f"FusedDPOTrainer cannot compute this DPOConfig's loss: {e}") from e

    # ---------------------------------------------------------------------------------- per-token pass

    def _dpo_kernels_tokens(self, model, model_kwargs, labels, *, with_stats: bool, pk=None, one_pass=None):
        """(Tokens, aux_loss, carrier) of ``model`` on the batch: backbone through every wrapper, fused head; for a
        packed batch (``pk``) laid out one sequence per row. The tokens' vocab_size comes from inside the
        forward: outside it a ZeRO-3 or FSDP1 weight is a shard. ``one_pass``: the loss family's token_grad,
        for the one-pass head (``hf.one_pass_from_hidden``; carrier None where it fell back)."""
        hf.install_hidden_forward(model)  # idempotent; the precompute may run before configure
        options = dict(labels=labels, with_stats=with_stats, backend=self._dpo_kernels_backend,
                       memory_budget=self._dpo_kernels_memory_budget,
                       gradient_filter=self._dpo_kernels_gradient_filter if torch.is_grad_enabled() else None,
                       cu_seqlens=None if pk is None else pk.cu_seqlens, one_pass=one_pass)  # fmt: skip
        out = model(**model_kwargs, **{hf.TOKENS_FLAG: options})  # the head runs inside the model's forward
        return out.tokens, out.aux_loss, out.one_pass_carrier

    def _dpo_kernels_ref_context(self):
        """The PEFT base (adapter disabled) or TRL's "ref" adapter, when there is no reference model."""
        from trl.trainer.utils import use_adapter

        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _dpo_kernels_reference(self, model_kwargs, labels, pk=None) -> torch.Tensor:
        """(2B,) reference log-probs, reduced like the policy's (sum, or LD-DPO's weighting)."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing

        model_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        use_base = is_peft_model(self.model) and self.ref_model is None
        context = self._dpo_kernels_ref_context() if use_base else contextlib.nullcontext()
        model = self.model if use_base else self.ref_model
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with context:
                tokens = self._dpo_kernels_tokens(model, model_kwargs, labels, with_stats=False, pk=pk)[0]
        return preference.reduce_sequences(tokens.logps, tokens.mask, average=False, ld_alpha=self.ld_alpha)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL's precompute calls this), by the fused head."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing

        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        pk = self._dpo_kernels_packing(inputs)
        context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            context = self._dpo_kernels_ref_context()
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            context,
            self.accelerator.autocast(),
        ):
            tokens = self._dpo_kernels_tokens(model, model_kwargs, labels, with_stats=False, pk=pk)[0]
        ref = preference.reduce_sequences(tokens.logps, tokens.mask, average=False, ld_alpha=self.ld_alpha)
        return ref.chunk(2, dim=0)

    # -------------------------------------------------------------------------------------- the loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE: the backbone returns router logits, the patch the aux loss
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)

        pk = self._dpo_kernels_packing(inputs)
        # The reference first: the one-pass head takes the loss's gradient inside the policy's forward.
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(labels.device)
        else:
            ref = self._dpo_kernels_reference(model_kwargs, labels, pk)
        # ipo and sigmoid_norm divide by TRL's unshifted completion-mask count (one more than the scored
        # tokens when the prompt is empty)
        norm_lengths = packing.layout(completion_mask.to(labels.device), pk).sum(-1)
        loss_options = self._dpo_kernels_loss_options()

        def loss_of(toks):
            return preference.dpo_from_tokens(
                toks.logps, toks.mask, ref, stats=toks.stats, lse=toks.lse, vocab_size=toks.vocab_size,
                norm_lengths=norm_lengths, **loss_options,
            )  # fmt: skip

        one_pass = None
        if self._dpo_kernels_route != "recompute":
            reasons = preference.one_pass_refusals(
                loss_options["loss_type"], loss_options, needs_grad=True, labels=labels,
                gradient_filter=self._dpo_kernels_gradient_filter,
            )  # fmt: skip
            # an evaluation step (no gradient) takes the recompute route whatever the route asked for
            route = self._dpo_kernels_route if torch.is_grad_enabled() else "auto"
            one_pass = preference.one_pass_token_grad(loss_of) if preference.one_pass_applies(route, reasons) else None
        tokens, aux_loss, carrier = self._dpo_kernels_tokens(model, model_kwargs, labels, with_stats=True, pk=pk,
                                                             one_pass=one_pass)  # fmt: skip
        if carrier is None:
            loss, metrics = loss_of(tokens)
        else:
            with torch.no_grad():
                loss, metrics = loss_of(tokens)
            loss = loss + carrier  # the value plus an exact zero that carries the one-pass head's gradients

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._dpo_kernels_log(mode, metrics, tokens.mask, inputs)

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` is deprecated in TRL; the fused LM head forms no logits, so they are "
                "recomputed with an extra forward pass.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _dpo_kernels_log(self, mode, metrics, mask, inputs) -> None:
        """``metrics`` (local means) into ``self._metrics[mode]`` as the stock trainer logs them: over all
        processes, token metrics weighted by their token counts and pair metrics by the pair counts."""
        acc = self.accelerator
        chosen_mask, _ = mask.chunk(2, dim=0)
        n_tokens, n_chosen = mask.sum().float(), chosen_mask.sum().float()
        n_pairs = torch.tensor(float(chosen_mask.shape[0]), device=mask.device)
        weights = {
            "entropy": n_tokens, "logits/chosen": n_chosen, "logits/rejected": mask.chunk(2, dim=0)[1].sum().float(),
            "mean_token_accuracy": n_chosen,
        }  # fmt: skip

        def global_mean(value, weight):
            if acc.num_processes == 1:
                return value.item()
            total = acc.gather_for_metrics((value * weight).reshape(1)).sum()
            count = acc.gather_for_metrics(weight.reshape(1)).sum()
            return (total / count).item() if count > 0 else 0.0

        logged = self._metrics[mode]
        logged["entropy"].append(global_mean(metrics["entropy"], weights["entropy"]))
        if mode == "train":
            # a packed batch has no attention mask: all its tokens are real
            real = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].new_tensor(
                inputs["input_ids"].numel())  # fmt: skip
            batch_tokens = acc.gather_for_metrics(real).sum().item()
            self._total_train_tokens += batch_tokens // self._tp_size
        logged["num_tokens"] = [self._total_train_tokens]
        for name in _TOKEN_METRICS[1:]:
            logged[name].append(global_mean(metrics[name], weights[name]))
        for name in _PAIR_METRICS:
            logged[name].append(global_mean(metrics[name], n_pairs))


class FusedDPOTrainer(_FusedLoss, DPOTrainer):
    """``trl.DPOTrainer`` whose loss runs on dpo_kernels' fused LM head: the same arguments, loss,
    metrics and gradients, without the (B, T, V) logits.

    Extra keyword arguments: ``backend`` (``"auto"``, ``"native"``, ``"triton"``, ``"torch"``: the
    fused op's backend), ``memory_budget`` (bytes of fp32 logits the head forms at a time), ``gradient_filter``
    (None, "auto" or a float: the Triton backward's gradient filter, see
    :func:`dpo_kernels.fused_linear_sequence_logps`) and ``route`` ("auto", "one_pass", "recompute": how the
    policy's head is differentiated, as in :func:`dpo_kernels.fused_linear_dpo_loss`; "auto" takes the
    one-pass route in training steps where it applies).
    Raises at construction outside :data:`SUPPORTED_TRL` and for the options listed in the module's
    documentation.
    """

    def __init__(self, *args, backend: str = "auto", memory_budget: int | None = None, gradient_filter=None,
                 route: str = "auto", **kwargs):  # fmt: skip
        check_trl_version()
        self._dpo_kernels_route = preference.check_route(route)
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        _raise_unsupported(_unsupported(config))
        # The precompute of reference log-probs runs inside DPOTrainer.__init__ and calls our
        # compute_ref_log_probs, which reads these.
        store_options(self, backend, memory_budget, gradient_filter)
        # TRL 1.16 turns padding_free off with a warning that does not apply here: keep it from seeing it
        padding_free = getattr(config, "padding_free", False)
        if padding_free:
            config.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            if padding_free:
                config.padding_free = True
        self._dpo_kernels_configure(backend, memory_budget, gradient_filter)


# Names of trl_orpo_cpo, imported on first use: it imports trl.experimental, which warns on import, and a
# DPO user should not see that warning.
_EXPERIMENTAL = ("FusedCPOTrainer", "FusedORPOTrainer", "apply_fused_cpo", "apply_fused_orpo")


def __getattr__(name):
    if name in _EXPERIMENTAL:
        from . import trl_orpo_cpo

        return getattr(trl_orpo_cpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply_fused_dpo(trainer, *, backend: str = "auto", memory_budget: int | None = None, gradient_filter=None,
                    route: str = "auto"):  # fmt: skip
    """Turn a constructed ``DPOTrainer`` (or subclass) into its fused version, in place; returns it.

    Reference log-probs that TRL already precomputed are kept (they are the same numbers). Raises like
    :class:`FusedDPOTrainer` for an unsupported TRL version or option.
    """
    route = preference.check_route(route)
    trainer = apply_fused(trainer, DPOTrainer, FusedDPOTrainer, _FusedLoss, "apply_fused_dpo", backend, memory_budget,
                          gradient_filter)  # fmt: skip
    trainer._dpo_kernels_route = route
    return trainer


__all__ = [
    "ANY_TRL_ENV", "SUPPORTED_TRL", "FusedCPOTrainer", "FusedDPOTrainer", "FusedHeadPatch", "FusedKTOTrainer",
    "FusedORPOTrainer", "apply_fused_cpo", "apply_fused_dpo", "apply_fused_kto", "apply_fused_orpo",
    "check_trl_version", "patch_fused_lm_head",
]  # fmt: skip
