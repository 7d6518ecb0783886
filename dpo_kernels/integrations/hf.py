"""Per-sequence log-probs of a Hugging Face causal LM without forming its (N, T, V) logits.

The model's backbone runs as usual; its last hidden states and the LM head's weight (tied to the input
embeddings or not) go to the fused LM head's per-token pass (:func:`dpo_kernels.tokens.from_hidden`),
which scores only the tokens whose label is not ``ignore_index``. Logit transforms declared in the model's config
(Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale`` and its relatives) are applied inside
the op, as the model's own forward would apply them to its logits.

Public API:

- :func:`sequence_logps_from_model`: (N,) per-sequence log-probs (sum, or mean with ``average``);
- :func:`token_logps_from_model`: the per-token outputs behind it (:class:`dpo_kernels.tokens.Tokens`:
  log-probs, log-sum-exp and, with ``with_stats``, the per-token statistics of
  :data:`dpo_kernels.reference.STATS`);
- :func:`lm_head_of`: the (weight, bias, logit_scale, softcap) a model's logits are made of;
- :func:`backbone_hidden_states`: the last hidden states, through PEFT and distributed wrappers;
- :func:`token_logps_from_hidden`: the op on given hidden states and head.
- :func:`position_logit_sums`: Σ_v z_v at every position, for a mean of the full logits.

Needs ``transformers`` only for the models it is given; importing this module imports no Hugging Face
package.
"""

from __future__ import annotations

import collections
import functools
import math
import types
from typing import NamedTuple, Optional

import torch

from .. import packing, preference, sharding
from ..tokens import Tokens, from_hidden, one_pass

# The keyword our forward patch answers to; any other call goes to the model's own forward.
HIDDEN_FLAG = "dpo_kernels_hidden_states"
# model(..., dpo_kernels_token_logps=dict(labels=..., **token_logps_from_hidden options)): the fused head
# runs inside the model's forward, where FSDP2 has the root unit's parameters (the LM head) whole. With
# logit_sums=True in the options the output also holds position_logit_sums of every position.
TOKENS_FLAG = "dpo_kernels_token_logps"
_PATCHED = "_dpo_kernels_hidden_forward"


class LMHead(NamedTuple):
    """What a causal LM's logits are made of: ``z = (h·weightᵀ + bias)·logit_scale``, then
    ``softcap·tanh(z / softcap)`` when ``softcap`` is set."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]


class HiddenStatesOutput(collections.OrderedDict):
    """What the patched forward returns when called with ``dpo_kernels_hidden_states=True`` (or
    ``dpo_kernels_token_logps=...``): the backbone's ``last_hidden_state``, when router logits were
    requested the MoE ``aux_loss``, and with ``dpo_kernels_token_logps`` the fused head's ``tokens``
    (:class:`dpo_kernels.tokens.Tokens`, its ``vocab_size`` read where the weight is whole) and, when its
    options ask for ``logit_sums``, ``logit_sums`` (:func:`position_logit_sums`). An
    ``OrderedDict`` with attribute access (None for a missing key), so that distributed wrappers can walk it
    and rebuild it as its own class (FSDP1 does ``type(out)()``, then sets the items)."""

    def __getattr__(self, name):
        if name.startswith("__"):  # no dataclass / pickling protocol: FSDP1 probes __dataclass_fields__
            raise AttributeError(name)
        return self.get(name)


# ------------------------------------------------------------------------------------- the LM head


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def logit_transform(config) -> tuple[float, Optional[float]]:
    """(logit_scale, softcap) from a model config, as the model's forward applies them to its logits.

    ``final_logit_softcapping`` (Gemma 2/3) caps; the scale is the first of ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) that is set, else ``logits_scaling``,
    which Granite and MiniCPM3 divide the logits by and HyperCLOVA X multiplies them by; 1.0 when none.
    """
    text = _text_config(config)
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    if scale is None:
        divisor = getattr(text, "logits_scaling", None)
        if divisor is not None:
            scale = divisor if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / divisor
    scale = 1.0 if scale is None else float(scale)
    return scale, None if softcap is None else float(softcap)


def _transformers_model(model):
    """The transformers ``PreTrainedModel`` under DDP / DeepSpeed / torch.compile / PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
            model = model.module
    return model


def lm_head_of(model) -> LMHead:
    """The LM head of a causal LM (PEFT-wrapped or not): its weight (the input embeddings' when tied),
    bias, and the logit transform of its config. Raises when the output embeddings are not a plain
    linear layer or when a PEFT adapter sits on them (the op reads ``weight`` directly, so the adapter
    would be ignored)."""
    base = _transformers_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (get_output_embeddings() is None)")
    if hasattr(head, "base_layer"):  # a PEFT tuner layer
        raise ValueError(
            "a PEFT adapter on the LM head is not supported: the fused op reads lm_head.weight directly, so the "
            "adapter would be ignored; remove 'lm_head' from target_modules"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the LM head {type(head).__name__} has no 2-D weight; a linear LM head is required")
    bias = getattr(head, "bias", None)
    # A DTensor weight stays one: gathering it here (full_tensor()) would give an FSDP2 shard a gradient
    # that is sliced, never reduced over the data-parallel ranks. token_logps_from_hidden takes it to
    # the vocabulary-parallel path instead, which is right for a tensor-parallel head and refuses ranks
    # that hold different tokens.
    scale, softcap = logit_transform(base.config)
    return LMHead(weight, bias, scale, softcap)


# --------------------------------------------------------------------------------------- the backbone


def install_hidden_forward(model) -> None:
    """Let ``model(..., dpo_kernels_hidden_states=True)`` return the backbone's last hidden states.

    The transformers model under any wrappers gets a forward that, given the flag, runs only its
    backbone (``model.base_model``: the decoder stack and final norm, no LM head) and returns a
    :class:`HiddenStatesOutput`; without the flag it is the forward it had before (TRL's own patch
    included). Calling through the outermost wrapper keeps what wrappers do: PEFT's LoRA layers and
    prompt-learning virtual tokens, DDP's gradient hooks. Idempotent.
    """
    base = _transformers_model(model)
    if getattr(base, _PATCHED, False):
        return
    previous_forward = base.forward
    text = _text_config(base.config)

    @functools.wraps(type(base).forward)  # keep the signature: generate() validates kwargs against it
    def forward(self, *args, **kwargs):
        token_options = kwargs.pop(TOKENS_FLAG, None)
        if not kwargs.pop(HIDDEN_FLAG, False) and token_options is None:
            return previous_forward(*args, **kwargs)
        # Keywords meant for the LM head or the loss; PEFT passes some of them explicitly as None.
        for name in ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head", "logits_to_keep"):
            kwargs.pop(name, None)
        for name in ("output_attentions", "output_hidden_states", "return_dict"):
            if kwargs.get(name, 0) is None:
                kwargs.pop(name)
        kwargs["use_cache"] = False
        if getattr(text, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        out = self.base_model(*args, **kwargs)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(text, out.router_logits, kwargs.get("attention_mask"))
        hidden, tokens = out.last_hidden_state, None
        if token_options is not None:
            options = dict(token_options)
            labels = options.pop("labels")
            logit_sums = options.pop("logit_sums", False)
            hidden_scored = hidden[:, -labels.shape[1] :]  # prompt learning prepends virtual tokens
            tokens, sums, carrier = _fused_head_call(self, hidden_scored, labels, options, logit_sums)
            return HiddenStatesOutput(last_hidden_state=hidden, aux_loss=aux_loss, tokens=tokens, logit_sums=sums,
                                      one_pass_carrier=carrier)  # fmt: skip
        return HiddenStatesOutput(last_hidden_state=hidden, aux_loss=aux_loss)

    base.forward = types.MethodType(forward, base)
    setattr(base, _PATCHED, True)


def _fused_head_call(base, hidden, labels, options, logit_sums=False):
    """The fused head's :class:`Tokens` on ``hidden`` (and with ``logit_sums`` its
    :func:`position_logit_sums`, else None), run as the LM head module's own forward.

    Wrappers that manage a module's parameters around its forward see the head used as ``lm_head(hidden)``
    would use it: DeepSpeed ZeRO-3's hooks on ``lm_head`` gather its partitioned weight for the call and
    release it after, register the backward hooks that gather it again for the op's backward (which
    recomputes the logits from the saved weight) and reduce-scatter its gradient into the partition; an FSDP
    unit on the head unshards it the same way. Without such wrappers the call is a plain function call.
    """
    module = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(module, torch.nn.Module):
        lm_head_of(base)  # raises, naming what is missing
    had_own_forward = "forward" in module.__dict__
    previous = module.__dict__.get("forward")

    def fused_forward(_module, hidden, labels):
        head = lm_head_of(base)  # read here, where the weight is whole
        rest = {k: v for k, v in options.items() if k != "one_pass"}
        if options.get("one_pass") is not None:  # the loss family's token_grad: the one-pass route
            tokens, carrier = one_pass_from_hidden(hidden, head, labels, options["one_pass"], **rest)
            return tuple(tokens), None, carrier
        tokens = tuple(token_logps_from_hidden(hidden, head, labels, **rest))  # a plain tuple: wrappers walk it
        if not logit_sums:
            return tokens, None, None
        pass_options = {k: options[k] for k in ("backend", "memory_budget") if k in options}
        return tokens, position_logit_sums(hidden, head, **pass_options), None

    module.forward = types.MethodType(fused_forward, module)
    try:
        tokens, sums, carrier = module(hidden, labels)
    finally:
        if had_own_forward:
            module.forward = previous
        else:
            del module.forward
    return Tokens(*tokens), sums, carrier


def _load_balancing_loss(text_config, router_logits, attention_mask):
    """The MoE load-balancing loss the model's own forward adds (Switch-Transformer style, as every MoE
    family in transformers computes it), from the backbone's router logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts")
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


def backbone_hidden_states(model, input_ids, attention_mask=None, **model_kwargs) -> torch.Tensor:
    """(N, T, H) last hidden states of ``model`` for ``input_ids`` (N, T), without the LM head.

    Goes through ``model`` itself (PEFT, DDP, DeepSpeed wrappers included) with the forward of
    :func:`install_hidden_forward`; prompt-learning PEFT's virtual tokens are cut off the front.
    """
    install_hidden_forward(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs, **{HIDDEN_FLAG: True})
    return out.last_hidden_state[:, -input_ids.shape[1] :]


# ------------------------------------------------------------------------------------------- the op


def token_logps_from_hidden(
    hidden: torch.Tensor,
    head: LMHead,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    with_stats: bool = False,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    cu_seqlens: Optional[torch.Tensor] = None,
    gradient_filter=None,
    shift: bool = True,
) -> Tokens:
    """The fused head's per-token pass on (N, T, H) hidden states: position t scores ``labels[:, t + 1]``
    (``labels[:, t]`` with ``shift=False``).

    Under autocast the head runs in the autocast dtype, as ``nn.Linear`` would; otherwise the weight
    and bias are cast to the hidden states' dtype when they differ (differentiably). A head that is a
    DTensor sharded over the vocabulary (tensor parallelism) runs the vocabulary-parallel path.

    ``cu_seqlens``: the (1, total, H) hidden states of a packed batch (:mod:`dpo_kernels.packing`); the
    outputs are then laid out as (S, L) rows, one per sequence, with the shift inside each sequence.
    ``gradient_filter``: as in :func:`dpo_kernels.fused_linear_sequence_logps` (None: off).
    """
    hidden, local, shard, labels = _head_inputs(hidden, head, labels, temperature)
    packed = None if cu_seqlens is None else packing.resolve(labels, cu_seqlens.to(labels.device), tokens_name="hidden")
    with torch.autocast(hidden.device.type, enabled=False):
        return from_hidden(
            hidden, local["weight"], local["bias"], labels, ignore_index=int(ignore_index), shift=shift,
            logit_scale=float(head.logit_scale), softcap=head.softcap, temperature=float(temperature),
            memory_budget=memory_budget, backend=backend, with_stats=with_stats, gradient_filter=gradient_filter,
            packed=packed, shard=shard,
        )  # fmt: skip


def _head_inputs(hidden, head: LMHead, labels, temperature):
    """(hidden, {weight, bias}, shard, labels) as the head's kernels take them (see token_logps_from_hidden)."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    hidden = hidden.to(dtype)
    weight = head.weight.to(device=hidden.device, dtype=dtype)
    bias = None if head.bias is None else head.bias.to(device=hidden.device, dtype=dtype)
    # A DTensor weight stays one: gathering it (full_tensor()) would give an FSDP2 shard a gradient that is
    # sliced, never reduced over the data-parallel ranks; the sharded path refuses ranks with other tokens.
    shard, local = sharding.resolve(None, None, {"weight": (weight, 0), "bias": (bias, 0)})
    return hidden, local, shard, labels.to(hidden.device)


def one_pass_from_hidden(hidden, head: LMHead, labels, token_grad, *, ignore_index: int = -100, temperature=1.0,
                         with_stats: bool = False, memory_budget=None, backend: str = "auto", shift: bool = True,
                         cu_seqlens=None, **options):  # fmt: skip
    """(Tokens, carrier): the one-pass head (:func:`dpo_kernels.tokens.one_pass`) on (2B, T, H) hidden states of
    preference pairs (a packed batch's (1, total, H) with ``cu_seqlens``), ``token_grad`` the loss family's
    gradient w.r.t. the per-token log-probs (:func:`dpo_kernels.preference.one_pass_token_grad`); the carrier,
    a 0-dim zero to add to the loss, holds the gradients formed. Where a pair's scored rows exceed the budget:
    the recompute route's differentiable Tokens and a None carrier."""
    common = dict(ignore_index=ignore_index, temperature=temperature, with_stats=with_stats,
                  memory_budget=memory_budget, backend=backend, shift=shift, cu_seqlens=cu_seqlens)  # fmt: skip
    inputs, local, shard, labels = _head_inputs(hidden, head, labels, temperature)
    packed = None if cu_seqlens is None else packing.resolve(labels, cu_seqlens.to(labels.device), tokens_name="hidden")
    groups, scored, _ = preference.one_pass_groups(
        labels, local["weight"].shape[0], inputs.dtype, inputs.device, backend=backend, memory_budget=memory_budget,
        ignore_index=ignore_index, shift=shift, packed=packed, shard=shard,
    )  # fmt: skip
    if groups is None:
        return token_logps_from_hidden(hidden, head, labels, **common, **options), None
    with torch.autocast(inputs.device.type, enabled=False):
        return one_pass(
            inputs, local["weight"], local["bias"], labels, groups, scored, token_grad, ignore_index=int(ignore_index),
            shift=shift, logit_scale=float(head.logit_scale), softcap=head.softcap, temperature=float(temperature),
            backend=backend, with_stats=with_stats, packed=packed, shard=shard,
        )  # fmt: skip


# Rows of hidden states cast to fp32 at a time by position_logit_sums: a bf16 batch is never copied whole.
_LOGIT_SUM_ROWS = 4096


def position_logit_sums(hidden: torch.Tensor, head: LMHead, *, backend: str = "auto", memory_budget=None):
    """(N, T) fp32 Σ_v z_v, the sum of the logits over the vocabulary at every position of ``hidden``
    (N, T, H), padding and last position included, detached: what a mean of the full logits needs (TRL's
    ORPO / CPO trainers log ``logits.mean()`` over all positions), without the (N, T, V) logits.

    Without a softcap the logits are linear in the head, so Σ_v z_v = scale·(h·Σ_v W_v + Σ_v b_v): one
    vector, no pass over the vocabulary. With a softcap (Gemma 2) it is the per-token statistic of a
    no-autograd pass of the fused head scoring every position (``shift=False``, any label).
    """
    with torch.no_grad():
        if head.softcap is not None:
            labels = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            tokens = token_logps_from_hidden(hidden, head, labels, with_stats=True, shift=False, backend=backend,
                                             memory_budget=memory_budget)  # fmt: skip
            return tokens.stats[..., 0].float()
        column = head.weight.sum(0, dtype=torch.float32)
        offset = 0.0 if head.bias is None else head.bias.sum(dtype=torch.float32)
        if hasattr(column, "full_tensor"):  # a vocabulary-sharded DTensor head: the ranks' partial sums
            column = column.full_tensor()
            offset = offset.full_tensor() if hasattr(offset, "full_tensor") else offset
        column = column.to(hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1])
        sums = torch.cat([chunk.float() @ column for chunk in rows.split(_LOGIT_SUM_ROWS)])
        return ((sums + offset) * head.logit_scale).reshape(hidden.shape[:2])


# ------------------------------------------------------------------------------------ from a model


def token_logps_from_model(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    with_stats: bool = False,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    gradient_filter=None,
    **model_kwargs,
) -> Tokens:
    """Per-token outputs (:class:`dpo_kernels.tokens.Tokens`) for a causal LM: backbone, then the fused head.

    labels: (N, T), ``ignore_index`` on prompt and padding; position t of the outputs scores
    ``labels[:, t + 1]`` (the usual causal shift). Extra keywords go to the backbone. The head runs
    inside the model's forward, so that FSDP2 (``fully_shard`` of the model, the head in its root unit)
    has unsharded it, as for ``lm_head(hidden)``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be an (N, T) tensor of token ids")
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    install_hidden_forward(model)
    options = dict(labels=labels, ignore_index=ignore_index, temperature=temperature, with_stats=with_stats,
                   memory_budget=memory_budget, backend=backend, gradient_filter=gradient_filter)  # fmt: skip
    out = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs, **{TOKENS_FLAG: options})
    return out.tokens


def sequence_logps_from_model(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    average: bool = False,
    ignore_index: int = -100,
    with_stats: bool = False,
    backend: str = "auto",
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
    gradient_filter=None,
    **model_kwargs,
):
    """(N,) fp32 per-sequence log-probs of ``labels`` under a causal LM, never forming its logits.

    The same numbers as summing ``log_softmax(model(input_ids).logits)[:, :-1]`` gathered at
    ``labels[:, 1:]`` over the tokens not labelled ``ignore_index`` (their mean with ``average``; 0 for a
    sequence with none), differentiable w.r.t. the model's parameters. Works for any
    ``AutoModelForCausalLM`` with a linear LM head (tied or not), PEFT-wrapped or not, honouring the
    config's ``final_logit_softcapping`` and logit scale.

    With ``with_stats=True`` returns ``(logps, tokens)``, ``tokens`` being the :class:`dpo_kernels.tokens.Tokens` of
    :func:`token_logps_from_model` with its per-token statistics.
    """
    tokens = token_logps_from_model(
        model, input_ids, attention_mask, labels, ignore_index=ignore_index, temperature=temperature,
        with_stats=with_stats, memory_budget=memory_budget, backend=backend, gradient_filter=gradient_filter,
        **model_kwargs,
    )  # fmt: skip
    total = tokens.logps.sum(-1)
    if average:
        total = total / tokens.mask.sum(-1).clamp(min=1)
    return (total, tokens) if with_stats else total
