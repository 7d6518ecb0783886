"""TRL's experimental ``ORPOTrainer`` and ``CPOTrainer`` with their loss computed by dpo_kernels: one line to adopt.

```python
from dpo_kernels.integrations.trl import FusedCPOTrainer, FusedORPOTrainer, apply_fused_cpo, apply_fused_orpo

trainer = FusedORPOTrainer(model, args=ORPOConfig(...), train_dataset=ds, processing_class=tok)
trainer = FusedCPOTrainer(model, args=CPOConfig(loss_type="simpo", ...), train_dataset=ds, processing_class=tok)
# or, on a trainer already built:
trainer = apply_fused_orpo(ORPOTrainer(...))
```

Both trainers are reference-free, so only the policy runs. Everything but the loss step is TRL's (tokenization,
collation, PEFT set-up, logging, evaluation); the loss step (``get_batch_loss_metrics``, which TRL's
``compute_loss`` and ``prediction_step`` call) runs the model's backbone with the fused head inside the
model's forward (:data:`dpo_kernels.integrations.hf.TOKENS_FLAG`), so that no (2B, T, V) logits are formed,
and applies :func:`dpo_kernels.preference.dpo_from_tokens`:

- ORPO: ``loss_type="orpo"`` on the per-token average log-probs of the completions; the NLL over the prompt
  and the completion of the chosen sequences, as TRL's trainer takes it (``nll_mask``: the pass scores every
  attended token, the odds read the completion tokens only).
- CPO: the reference-free DPO family plus ``cpo_alpha`` times the chosen completions' NLL (``rpo_alpha``):
  ``sigmoid`` (smoothed with ``label_smoothing``), ``hinge`` and ``ipo`` (which ignore it, as TRL does),
  ``simpo`` (``sigmoid_norm`` with ``simpo_gamma`` and ``label_smoothing``) and, through ``alpha``,
  AlphaPO's reward shape for any of them (``loss_type="alphapo"`` is TRL's ``simpo`` with ``cpo_alpha=0``).
  ipo and simpo read per-token averages, as TRL's trainer feeds them.

The logged metrics are the stock trainers' names and values: ``rewards/*``, ``logps/*``, ``nll_loss``, ORPO's
``log_odds_ratio`` / ``log_odds_chosen``, and ``logits/chosen`` / ``logits/rejected``, which TRL takes as the
mean of the full logits over every position (padding included; ORPO drops the last position): here from
:func:`dpo_kernels.integrations.hf.position_logit_sums`, the logits' sum over the vocabulary per position,
computed where the head's weight is whole. Over processes they are averaged as the stock trainers gather them
(pair metrics over all pairs, the others a mean of the processes' means).

Refused at construction, naming the reason: encoder-decoder models (the fused head scores a causal LM's
shifted labels), ``use_liger_kernel``, and a loss option the loss family cannot compute. Supported TRL: as
for ``FusedDPOTrainer``.
"""

from __future__ import annotations


import torch

from .. import preference
from . import hf
from ._trl_support import apply_fused, check_trl_version, raise_unsupported, store_options, unsupported

try:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL (and transformers): pip install 'dpo-kernels[trl]'"
    ) from e

# The metrics the stock trainers log, in their order: means over all pairs, then means of each process's mean.
_PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
                 "logps/chosen")  # fmt: skip
_PROCESS_METRICS = ("logits/rejected", "logits/chosen", "nll_loss")
_ORPO_METRICS = ("log_odds_ratio", "log_odds_chosen")
# CPO's loss types that label_smoothing applies to; TRL's CPOTrainer ignores it for hinge and ipo.
_CPO_SMOOTHED = ("sigmoid", "sigmoid_norm")
_CPO_LOSS_TYPES = {"sigmoid": "sigmoid", "hinge": "hinge", "ipo": "ipo", "simpo": "sigmoid_norm"}
# CPO's ipo and simpo read per-token average log-probs (TRL's average_log_prob).
_CPO_AVERAGED = ("ipo", "simpo")


class _FusedPreferenceLoss:
    """The loss step shared by :class:`FusedORPOTrainer` and :class:`FusedCPOTrainer`, mixed in front of the
    trainer class; subclasses say what the pass scores and which loss options apply."""

    _dpo_kernels_trainer = ""
    _dpo_kernels_backend = "auto"
    _dpo_kernels_memory_budget = None
    _dpo_kernels_gradient_filter = None

    def __init__(self, *args, backend: str = "auto", memory_budget: int | None = None, gradient_filter=None, **kwargs):
        """The stock trainer's construction, with dpo_kernels' options checked before the model is set up and
        the loss step configured after."""
        check_trl_version()
        store_options(self, backend, memory_budget, gradient_filter)
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        raise_unsupported(self._dpo_kernels_trainer, unsupported(config))
        super().__init__(*args, **kwargs)
        self._dpo_kernels_configure(backend, memory_budget, gradient_filter)

    def _dpo_kernels_configure(self, backend: str, memory_budget, gradient_filter=None) -> None:
        store_options(self, backend, memory_budget, gradient_filter)
        found = unsupported(self.args)
        if self.is_encoder_decoder:
            found.append("encoder-decoder models (the fused head scores a causal LM's shifted labels)")
        raise_unsupported(self._dpo_kernels_trainer, found)
        # One tiny evaluation of the loss family: every option check it makes, up front.
        tokens = torch.full((2, 2), -1.0)
        mask = torch.ones(2, 2, dtype=torch.bool)
        try:
            preference.dpo_from_tokens(tokens, mask, None, vocab_size=2, **self._dpo_kernels_loss_options(mask, mask))
        except (ValueError, TypeError) as e:
            config = type(self.args).__name__
            raise ValueError(f"{self._dpo_kernels_trainer} cannot compute this {config}'s loss: {e}") from e
        hf.install_hidden_forward(self.model)

    # The subclasses say: _dpo_kernels_padding_value() (the input ids' padding), _dpo_kernels_loss_options(mask,
    # nll_mask) (the trainer's options for dpo_from_tokens, from the (2B, T') completion tokens and the tokens
    # the pass scored), and these:
    _dpo_kernels_logits_last = True  # the logits metric's last position: ORPO's drops it, CPO's keeps it
    _dpo_kernels_extra_metrics: tuple[str, ...] = ()

    def _dpo_kernels_pass_labels(self, input_ids, attention_mask, labels):
        """The labels the fused pass scores: the completions' (CPO), or every attended token (ORPO)."""
        return labels

    # -------------------------------------------------------------------------------------- the loss

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """(loss, metrics) of a batch as the stock trainer returns them, the log-probs and the logits' sums
        from the fused head inside the model's forward."""
        concatenated = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self._dpo_kernels_padding_value(),
            device=self.accelerator.device,
        )  # fmt: skip
        input_ids = concatenated["concatenated_input_ids"]
        attention_mask = concatenated["concatenated_attention_mask"]
        labels = concatenated["concatenated_labels"]
        gradient_filter = self._dpo_kernels_gradient_filter if torch.is_grad_enabled() else None
        pass_labels = self._dpo_kernels_pass_labels(input_ids, attention_mask, labels)
        options = dict(
            labels=pass_labels, with_stats=False,
            backend=self._dpo_kernels_backend, memory_budget=self._dpo_kernels_memory_budget,
            gradient_filter=gradient_filter, logit_sums=True,
        )  # fmt: skip
        model_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if self.aux_loss_enabled:  # MoE: the backbone returns router logits, the patch the aux loss
            model_kwargs["output_router_logits"] = True
        hf.install_hidden_forward(model)  # idempotent
        out = model(**model_kwargs, **{hf.TOKENS_FLAG: options})
        tokens = out.tokens
        mask = (labels[:, 1:] != -100).to(tokens.logps.device)  # the completion tokens, shifted like the pass
        scored = (pass_labels[:, 1:] != -100).to(tokens.logps.device)
        loss, metrics = preference.dpo_from_tokens(
            tokens.logps, mask, None, vocab_size=tokens.vocab_size, **self._dpo_kernels_loss_options(mask, scored)
        )
        if "nll_loss" not in metrics:  # the stock trainer logs a zero NLL when it has none
            metrics["nll_loss"] = loss.new_zeros(())
        sums = out.logit_sums if self._dpo_kernels_logits_last else out.logit_sums[:, :-1]
        chosen_sums, rejected_sums = sums.chunk(2)
        metrics["logits/chosen"] = chosen_sums.mean() / tokens.vocab_size
        metrics["logits/rejected"] = rejected_sums.mean() / tokens.vocab_size
        if self.aux_loss_enabled:
            loss = loss + self.aux_loss_coef * out.aux_loss
        prefix = "eval_" if train_eval == "eval" else ""
        return loss, {prefix + name: value for name, value in self._dpo_kernels_logged(metrics, mask).items()}

    def _dpo_kernels_logged(self, metrics, mask) -> dict:
        """The metrics as floats, averaged over processes as the stock trainer gathers them: pair metrics over
        all pairs (a gather of the per-pair values), the others a mean of the processes' means. One gather."""
        acc = self.accelerator
        pairs = torch.tensor(float(mask.shape[0] // 2), device=mask.device)
        process_names = _PROCESS_METRICS + self._dpo_kernels_extra_metrics
        local = torch.stack([metrics[n].detach().float() * pairs for n in _PAIR_METRICS]
                            + [metrics[n].detach().float() for n in process_names] + [pairs])  # fmt: skip
        if acc.num_processes == 1:
            totals, processes = local, 1
        else:
            rows = acc.gather_for_metrics(local[None])
            totals, processes = rows.sum(0), rows.shape[0]
        totals = totals.tolist()
        n_pairs = totals[-1]
        logged = {n: v / n_pairs for n, v in zip(_PAIR_METRICS, totals)}
        logged.update({n: v / processes for n, v in zip(process_names, totals[len(_PAIR_METRICS) :])})
        order = _PAIR_METRICS + ("logits/rejected", "logits/chosen", "nll_loss") + self._dpo_kernels_extra_metrics
        return {n: logged[n] for n in order}


# ------------------------------------------------------------------------------------------------- ORPO


class _FusedORPOLoss(_FusedPreferenceLoss):
    _dpo_kernels_trainer = "FusedORPOTrainer"
    _dpo_kernels_logits_last = False
    _dpo_kernels_extra_metrics = _ORPO_METRICS

    def _dpo_kernels_padding_value(self) -> int:
        return self.padding_value

    def _dpo_kernels_pass_labels(self, input_ids, attention_mask, labels):
        # ORPO's NLL covers every attended token (prompt included) against its input id; the completion
        # tokens keep their labels
        return torch.where(labels != -100, labels, input_ids.masked_fill(attention_mask == 0, -100))

    def _dpo_kernels_loss_options(self, mask, nll_mask):
        return dict(loss_type="orpo", beta=self.beta, average=True, nll_mask=nll_mask)


class FusedORPOTrainer(_FusedORPOLoss, ORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` whose loss runs on dpo_kernels' fused LM head: the same arguments,
    loss, metrics and gradients, without the (2B, T, V) logits.

    Extra keyword arguments, as for :class:`dpo_kernels.integrations.trl.FusedDPOTrainer`: ``backend``,
    ``memory_budget`` and ``gradient_filter``. Raises at construction outside the supported TRL versions, for
    encoder-decoder models and ``use_liger_kernel``.
    """


# -------------------------------------------------------------------------------------------------- CPO


class _FusedCPOLoss(_FusedPreferenceLoss):
    _dpo_kernels_trainer = "FusedCPOTrainer"

    def _dpo_kernels_padding_value(self) -> int:
        return self.pad_token_id

    def _dpo_kernels_loss_options(self, mask, nll_mask):
        if self.loss_type not in _CPO_LOSS_TYPES:
            raise ValueError(f"unknown CPO loss_type {self.loss_type!r}; valid: {', '.join(_CPO_LOSS_TYPES)}")
        loss_type = _CPO_LOSS_TYPES[self.loss_type]
        options = dict(
            loss_type=loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
            label_smoothing_types=[loss_type] if loss_type in _CPO_SMOOTHED else [], alphapo_alpha=self.alpha,
            rpo_alpha=self.cpo_alpha if self.cpo_alpha != 0 else None,
        )  # fmt: skip
        if self.loss_type == "simpo":
            options["gamma"] = self.simpo_gamma
        if self.loss_type in _CPO_AVERAGED:
            # the averages are the scores: the length-normalised losses divide them by one
            options.update(average=True, norm_lengths=torch.ones(mask.shape[0], device=mask.device))
        return options


class FusedCPOTrainer(_FusedCPOLoss, CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` whose loss runs on dpo_kernels' fused LM head: the same arguments,
    loss, metrics and gradients, without the (2B, T, V) logits, for every ``loss_type`` (sigmoid, hinge, ipo,
    simpo, alphapo) with ``label_smoothing``, ``cpo_alpha``, ``simpo_gamma`` and ``alpha``.

    Extra keyword arguments, as for :class:`dpo_kernels.integrations.trl.FusedDPOTrainer`: ``backend``,
    ``memory_budget`` and ``gradient_filter``. Raises at construction outside the supported TRL versions, for
    encoder-decoder models and ``use_liger_kernel``.
    """


# ------------------------------------------------------------------------------------------ on a trainer

_STOCK = {ORPOTrainer: (FusedORPOTrainer, _FusedORPOLoss), CPOTrainer: (FusedCPOTrainer, _FusedCPOLoss)}


def _apply(trainer, stock, name, backend, memory_budget, gradient_filter):
    return apply_fused(trainer, stock, *_STOCK[stock], name, backend, memory_budget, gradient_filter)


def apply_fused_orpo(trainer, *, backend: str = "auto", memory_budget: int | None = None, gradient_filter=None):
    """Turn a constructed ``ORPOTrainer`` (or subclass) into its fused version, in place; returns it. Raises
    like :class:`FusedORPOTrainer` for an unsupported TRL version, model or option."""
    return _apply(trainer, ORPOTrainer, "apply_fused_orpo", backend, memory_budget, gradient_filter)


def apply_fused_cpo(trainer, *, backend: str = "auto", memory_budget: int | None = None, gradient_filter=None):
    """Turn a constructed ``CPOTrainer`` (or subclass) into its fused version, in place; returns it. Raises
    like :class:`FusedCPOTrainer` for an unsupported TRL version, model or option."""
    return _apply(trainer, CPOTrainer, "apply_fused_cpo", backend, memory_budget, gradient_filter)


__all__ = ["FusedCPOTrainer", "FusedORPOTrainer", "apply_fused_cpo", "apply_fused_orpo"]
