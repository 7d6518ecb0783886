"""FusedDPOTrainer under FSDP2, FSDP1 and DeepSpeed ZeRO-2/3 (and FusedKTOTrainer under DDP, FSDP2 and ZeRO-3),
against TRL's stock trainer under the same setting, on 2 CPU ranks with gloo.

One spawn of 2 processes runs the settings one after the other (spawning, importing and building the first
trainers take most of the time). Under each, each rank builds a stock and a fused trainer on the same tiny
models, lets the Trainer wrap them (``_prepare_for_training``: FSDP's sharding, DeepSpeed's engine), and for
several loss configurations compares, on the same per-rank batch, the loss, every logged metric and the full
(gathered) gradient of every trainable parameter (fp32, rtol 1e-5); then one real optimizer step through
``train()``. The LM head's cost is checked on the way: FSDP2 all-gathers, ZeRO-3's release of the head.
"""

import contextlib
import functools
import os
import sys
import time

import pytest
import torch
from _spawn import leave, run_check, spawn

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

pytestmark = [
    pytest.mark.cpu_only("gloo ranks on CPU"),
    pytest.mark.slow,  # one 2-rank spawn with TRL, FSDP and DeepSpeed in each rank
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

WORLD = 2
RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------------------------------ launching


def _patch_accelerate_fsdp_on_cpu():
    """accelerate promotes only GPU-like multi-device types to FSDP (``AcceleratorState.__init__``, the
    ``MULTI_GPU, MULTI_XPU, ...`` branch); on CPU ranks (``MULTI_CPU``) it silently falls back to DDP.
    ``fully_shard`` / ``FullyShardedDataParallel`` themselves run on gloo, so for these tests only, an FSDP
    plugin on MULTI_CPU is promoted the same way the GPU branch would."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState, "_dpo_kernels_cpu_fsdp", False):
        return
    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            # FSDP1 compares its compute device (torch.cpu.current_device(): "cpu") with accelerate's device_id
            # (a "cpu:<index>" device on CPU ranks) and refuses the difference; they are the same device
            self.device = PartialState._shared_state["device"] = torch.device("cpu")

    AcceleratorState.__init__ = __init__
    AcceleratorState._dpo_kernels_cpu_fsdp = True


def _fresh_state():
    """Forget the accelerate / DeepSpeed set-up of the previous setting (the process group stays)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):  # set by TrainingArguments
        os.environ.pop(name, None)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()


def _entry(rank, world, port, settings, checks, tmp):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TQDM_DISABLE="1")  # fmt: skip
    torch.set_num_threads(1)
    for setting in settings.split(","):
        _fresh_state()
        _run_setting(rank, world, setting, checks, os.path.join(tmp, setting))
    leave()


def _run_setting(rank, world, setting, checks, tmp):
    if setting.startswith("fsdp"):
        _patch_accelerate_fsdp_on_cpu()
    elif setting.startswith("zero"):
        import deepspeed.comm.torch  # noqa: F401  (deepspeed.comm.torch is the torch module: reach it by name)

        # DeepSpeed's CPU shared-memory all-reduce is a C++ extension built on first use (minutes where no
        # build is cached); gloo does the same collectives
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    for name in checks:
        if setting not in CHECK_SETTINGS.get(name, DPO_SETTINGS):
            continue
        run_check(globals()[name], f"{setting} {name}", rank, world, setting, os.path.join(tmp, f"{name}-{rank}"))


def _spawn(settings, *checks, tmp):
    """Run ``checks`` under each of the comma-separated ``settings`` in turn, in one pair of processes."""
    spawn(_entry, WORLD, settings, checks, str(tmp))


# ---------------------------------------------------------------------------------- settings and models


def _setting_args(setting):
    """The DPOConfig / KTOConfig keywords of a distributed setting."""
    if setting == "ddp":
        return {}  # several CPU processes: accelerate wraps the model in DDP
    if setting.startswith("fsdp"):
        version = 2 if setting == "fsdp2" else 1
        fsdp_config = {"version": version}  # auto-wrap: the model's _no_split_modules (its decoder layers)
        if version == 1:
            # sync_module_states asks accelerate for a GPU-like device; every rank builds the same model anyway
            fsdp_config.update(use_orig_params=setting == "fsdp1_orig", sync_module_states=False)
        return dict(fsdp="full_shard auto_wrap", fsdp_config=fsdp_config)
    zero = {"stage": {"zero2": 2, "zero3": 3}[setting]}
    if setting == "zero3":
        # Release every parameter as soon as its module is done (the defaults keep small parameters, and
        # those reused soon, gathered): what is left gathered after the forward is then ours to answer for
        zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    return dict(deepspeed={
        "zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": False}, "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True,
    })  # fmt: skip


def _whole(model_fn, seed):
    """A model with whole parameters, for the Trainer's DeepSpeed set-up to partition: a ZeRO-3 DPOConfig
    alive from an earlier build would make transformers build it under zero.Init instead."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return model_fn(seed)


def _shared_dataset(directory):
    """The test dataset from files in ``directory``, which every rank reads: TRL's precompute writes the
    reference log-probs on the main process to a cache file next to the dataset's files, which the other
    ranks then read (an in-memory dataset would put it in a per-process temporary directory)."""
    import datasets
    import test_integrations_trl as T

    path = os.path.join(directory, "dataset")
    if os.environ["RANK"] == "0" and not os.path.exists(path):
        T.make_dataset().save_to_disk(path + ".tmp")
        os.rename(path + ".tmp", path)
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return datasets.load_from_disk(path)


def _build(cls, setting, tmp, *, ref=True, model_fn="llama", peft=False, dataset=None, **overrides):
    import test_integrations_trl as T

    kwargs = dict(_setting_args(setting), **overrides)
    trainer_kwargs = {}
    if peft:
        from peft import LoraConfig

        trainer_kwargs["peft_config"] = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
            task_type="CAUSAL_LM",
        )  # fmt: skip
    fn = getattr(T, model_fn)
    model, ref_model = _whole(fn, 0), _whole(fn, 1) if ref else None
    return cls(
        model=model, ref_model=ref_model, args=T.config(tmp, **kwargs), train_dataset=dataset or T.make_dataset(),
        processing_class=T.make_tokenizer(), **trainer_kwargs,
    )  # fmt: skip


def _log(*what):
    if os.environ.get("DPO_KERNELS_TEST_TIMING") and os.environ.get("RANK") == "0":
        print(f"  {time.perf_counter() - _T0:7.2f} s", *what, file=sys.stderr, flush=True)


_T0 = time.perf_counter()


def _wrap(trainer):
    """The Trainer's own wrapping (FSDP sharding / DeepSpeed engine, optimizer), as ``train()`` does it."""
    trainer.model_wrapped, _ = trainer._prepare_for_training(trainer.args.max_steps, None, None)
    return trainer


def _rank_batch(trainer, rank, n=2):
    import test_integrations_trl as T

    rows = range(rank * n, rank * n + n)
    examples = [{k: trainer.train_dataset[i][k] for k in T.BATCH_KEYS if k in trainer.train_dataset.column_names}
                for i in rows]  # fmt: skip
    return trainer._prepare_inputs(trainer.data_collator(examples))


def _full_grads(trainer, setting):
    model = trainer.model_wrapped
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    if setting.startswith("zero"):
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).detach().clone() for n, p in named}
    if setting == "fsdp2":
        return {n: p.grad.full_tensor().detach().clone() for n, p in named}
    if setting == "ddp":  # all-reduced by DDP's hooks: whole on every rank
        return {n: p.grad.detach().clone() for n, p in named}
    # FSDP1: each unit's flat parameter holds this rank's shard of the unit's (padded) flat gradient; the
    # stock and the fused model have the same units, so the gathered flat gradients compare one to one
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    grads = {}
    for i, unit in enumerate(FSDP.fsdp_modules(model)):
        flat = unit._handle.flat_param if unit._handle is not None else None
        if flat is None or flat.grad is None:
            continue
        shards = [torch.empty_like(flat.grad) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, flat.grad.contiguous())
        grads[f"unit{i}"] = torch.cat(shards)
    return grads


def _zero_grads(trainer, setting):
    if setting.startswith("zero"):
        trainer.model_wrapped.optimizer.zero_grad()
    else:
        trainer.model_wrapped.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _head_traffic(trainer, setting):
    """What the LM head costs beyond the loss: under FSDP2 the elements all-gathered by FSDP and by
    ``DTensor.full_tensor`` calls (an all-gather of its own); under ZeRO-3 the head's shape and its
    parameter's size once the forward is over (0: released), for :func:`_step` to look for (V, H) tensors
    among those autograd saved."""
    record = {"all_gathers": 0, "elements": 0, "full_tensor": 0}
    if setting == "fsdp2":
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
        from torch.distributed.tensor import DTensor

        all_gather, full_tensor = group.foreach_all_gather, DTensor.full_tensor

        def counting_all_gather(fsdp_params, *args, **kwargs):
            record["all_gathers"] += 1
            record["elements"] += sum(p.sharded_param.numel() for p in fsdp_params)
            return all_gather(fsdp_params, *args, **kwargs)

        def counting_full_tensor(self, *args, **kwargs):
            record["full_tensor"] += 1
            record["elements"] += self.to_local().numel()
            return full_tensor(self, *args, **kwargs)

        group.foreach_all_gather, DTensor.full_tensor = counting_all_gather, counting_full_tensor
        try:
            yield record
        finally:
            group.foreach_all_gather, DTensor.full_tensor = all_gather, full_tensor
    elif setting == "zero3":
        head = trainer.accelerator.unwrap_model(trainer.model_wrapped).get_output_embeddings().weight
        yield record
        record["head_shape"], record["head_numel"] = tuple(head.ds_shape), head.numel()
    else:
        yield record


def _saved_tensors(loss, gradients=False):
    """The tensors autograd holds for the backward of ``loss``: every node's saved tensors but the gradients the
    one-pass head formed in the forward (its carrier's), or with ``gradients`` those alone."""
    found, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
        if (type(node).__name__ == "_PrecomputedBackward") != gradients:
            continue
        values = [getattr(node, name, None) for name in dir(node) if name.startswith("_saved_")]
        try:
            values += list(getattr(node, "saved_tensors", ()))  # autograd.Function (and custom op) nodes
        except RuntimeError:
            pass
        for v in values:
            found += [t for t in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(t, torch.Tensor)]
    return found


def _step(trainer, setting, batch):
    """(loss, metrics, full gradients) of one forward/backward through the wrapped model, and the LM head's
    traffic (:func:`_head_traffic`) in it."""
    model = trainer.model_wrapped
    model.train()
    _zero_grads(trainer, setting)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    with _head_traffic(trainer, setting) as traffic:
        loss = trainer.compute_loss(model, batch)
    if "head_shape" in traffic:
        traffic["saved_heads"] = [t for t in _saved_tensors(loss) if tuple(t.shape) == traffic["head_shape"]]
        traffic["saved_head_grads"] = [t for t in _saved_tensors(loss, gradients=True)
                                       if tuple(t.shape) == traffic["head_shape"]]  # fmt: skip
    if setting.startswith("zero"):
        model.backward(loss)  # the engine's backward: accelerator.backward would also step
    else:
        loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return (loss.detach(), metrics, _full_grads(trainer, setting)), traffic


def _same(stock, fused, what):
    import test_integrations_trl as T

    (step_s, traffic_s), (step_f, traffic_f) = stock, fused
    try:
        T.assert_same_step(step_s, step_f)
        # FSDP2: the fused head reads the weight where FSDP unsharded it (the root's forward, or the head's own
        # unit when it is one, as with PEFT), never by an all-gather of its own (stock TRL calls full_tensor()
        # on a head in a unit of its own, once per pass)
        assert traffic_f["full_tensor"] == 0
        elements = [t["elements"] for t in (traffic_s, traffic_f)]
        assert elements[1] <= elements[0], f"elements all-gathered in the forward, stock vs fused: {elements}"
        # ZeRO-3: the head gathered for the fused call is released after it, and autograd kept no copy; the
        # one-pass head holds its gradient (whole, as the recompute route's backward forms it) for the backward
        if "head_shape" in traffic_f:
            assert traffic_f["head_numel"] == 0 and traffic_f["saved_heads"] == [], traffic_f
            assert len(traffic_f["saved_head_grads"]) <= 1, traffic_f
            assert traffic_s["head_numel"] == 0
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from e


# -------------------------------------------------------------------------------------------- checks

LOSS_CASES = {
    "sigmoid": {},
    "ipo": dict(loss_types=["ipo"], beta=0.5),
    "rpo_sigmoid_sft": dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "wpo": dict(use_weighting=True),
    "robust_smoothing_ld_alpha": dict(loss_types=["robust"], label_smoothing=0.1, ld_alpha=0.5),
}


def _pair(setting, tmp, **kwargs):
    import test_integrations_trl as T

    stock = _wrap(_build(T.DPOTrainer, setting, tmp + "s", **kwargs))
    fused = _wrap(_build(T.FusedDPOTrainer, setting, tmp + "f", **kwargs))
    return stock, fused


# GPT-2's head is the input embeddings' weight (one parameter, two modules). Under FSDP2 and ZeRO-3 the head is
# then read in a unit shared with the embeddings / gathered through a module that does not own the parameter
# alone, so there the loss family runs on GPT-2 (its own pair of trainers would cost a DeepSpeed build more); the
# untied Llama head keeps its full-gradient comparison there in check_kto and its update in
# check_precomputed_reference_and_train, and the loss family under every other setting.
TIED_SETTINGS = ("fsdp2", "zero3")


def check_loss_family_with_a_reference_model(rank, world, setting, tmp):
    """A separate reference model (prepared by TRL for the setting), several loss types, WPO, RPO, LD-DPO; under
    FSDP2 and ZeRO-3 on GPT-2, whose head is tied to the input embeddings (TIED_SETTINGS)."""
    import test_integrations_trl as T

    model_fn = "gpt2" if setting in TIED_SETTINGS else "llama"
    # the stock trainer computes WPO's statistics
    stock, fused = _pair(setting, tmp, use_weighting=True, model_fn=model_fn)
    batch = _rank_batch(stock, rank)
    assert fused.ref_model is not None
    for case, options in LOSS_CASES.items():
        for trainer in (stock, fused):
            T.set_options(trainer, **options)
        _same(_step(stock, setting, batch), _step(fused, setting, batch), f"{model_fn} {case}")
        _log(case)


def check_peft_base_as_reference(rank, world, setting, tmp):
    """LoRA adapters trained, the base model (adapter disabled) as the reference."""
    import test_integrations_trl as T

    stock, fused = _pair(setting, tmp, ref=False, peft=True)
    assert fused.ref_model is None
    batch = _rank_batch(stock, rank)
    for case in ("sigmoid", "ipo"):
        for trainer in (stock, fused):
            T.set_options(trainer, **LOSS_CASES[case])
        step_s, step_f = _step(stock, setting, batch), _step(fused, setting, batch)
        assert step_s[0][1]["rewards/margins"] != 0  # the adapter (random B) moves the policy off the base
        _same(step_s, step_f, f"peft {case}")


def _full_params(trainer, setting):
    model = trainer.model_wrapped
    if setting == "zero3":
        import deepspeed

        params = list(model.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    if setting == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if setting.startswith("fsdp"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(model).named_parameters()}


def check_precomputed_reference_and_train(rank, world, setting, tmp):
    """Reference log-probs precomputed (by the reference model under FSDP, where TRL needs one, else by the
    policy's inference engine), then one SGD step through ``train()``: the same logs and parameters."""
    import test_integrations_trl as T

    kw = dict(ref=setting.startswith("fsdp"), precompute_ref_log_probs=True, max_steps=1, optim="sgd",
              learning_rate=0.5, per_device_train_batch_size=2)  # fmt: skip
    kw["dataset"] = _shared_dataset(os.path.dirname(tmp))
    with torch.no_grad():
        initial = dict(_whole(T.llama, 0).named_parameters())
    stock = _build(T.DPOTrainer, setting, tmp + "s", **kw)
    fused = _build(T.FusedDPOTrainer, setting, tmp + "f", **kw)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(fused.train_dataset[column]), torch.tensor(stock.train_dataset[column]),
                                   rtol=RTOL, atol=ATOL)  # fmt: skip
    updates = []
    for trainer in (stock, fused):
        trainer.train()
        updates.append({n: p - initial[n] for n, p in _full_params(trainer, setting).items()})
    logs_s, logs_f = ([h for h in t.state.log_history if "loss" in h] for t in (stock, fused))
    assert len(logs_s) == len(logs_f) == 1 and logs_f[0].keys() == logs_s[0].keys()
    for name, value in logs_s[0].items():
        assert logs_f[0][name] == pytest.approx(value, rel=RTOL, abs=ATOL), name
    assert updates[0].keys() == updates[1].keys() == initial.keys()
    eps = torch.finfo(torch.float32).eps
    for name, u in updates[0].items():
        # the parameter's own rounding (a few ulps of it) bounds what the subtraction can tell apart
        atol = 4 * eps * initial[name].abs().max().item() + ATOL * u.abs().max().item()
        torch.testing.assert_close(updates[1][name], u, rtol=RTOL, atol=atol, msg=name)
    assert any(u.abs().max() > 0 for u in updates[0].values())


def _kto_entry_point_over_groups(rank, world):
    """fused_linear_kto_loss with the collectives it takes: ``kl_group`` (each rank its own batch; the KL means
    averaged over the ranks, then clamped: rank 0's mean is positive, rank 1's negative) and a vocabulary split
    over the ranks (``process_group``), each against the one-device naive computation."""
    import torch.distributed as dist

    from dpo_kernels import fused_linear_kto_loss, losses, reference, sharding

    g = torch.Generator().manual_seed(7)  # the same numbers on every rank
    B, T, H, V = 4, 6, 8, 23
    hidden, kl_hidden = torch.randn(world, B, T, H, generator=g), torch.randn(world, B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    labels, kl_labels = torch.randint(0, V, (world, B, T), generator=g), torch.randint(0, V, (world, B, T), generator=g)
    labels[..., :2] = kl_labels[..., :2] = -100
    desirable = torch.tensor([True, False, True, False])
    ref = torch.randn(world, B, generator=g) - 20
    policy_kl = torch.stack([reference.sequence_logps(reference.lm_head_logits(kl_hidden[r], weight), kl_labels[r])
                             for r in range(world)])  # fmt: skip
    offsets = torch.tensor([1.0, -0.4] + [0.0] * (world - 2))
    ref_kl = policy_kl - offsets[:, None]
    kl = float(offsets.mean().clamp(min=0))
    assert kl > 0 and offsets.clamp(min=0).mean() != kl  # clamping each rank's mean would differ

    h = hidden[rank].clone().requires_grad_()
    loss, metrics = fused_linear_kto_loss(h, weight, labels[rank], desirable, kl_hidden=kl_hidden[rank],
                                          kl_labels=kl_labels[rank], ref_logps=ref[rank], ref_kl_logps=ref_kl[rank],
                                          kl_group=dist.group.WORLD, backend="torch")  # fmt: skip
    loss.backward()
    h_naive = hidden[rank].clone().requires_grad_()
    logps = reference.sequence_logps(reference.lm_head_logits(h_naive, weight), labels[rank])
    expected = losses.kto_loss(logps, ref[rank], policy_kl[rank], ref_kl[rank], desirable,
                               kl_reduce=lambda mine: torch.tensor(offsets.mean().item()))  # fmt: skip
    expected.loss.backward()
    assert metrics["kl"].item() == pytest.approx(kl, rel=RTOL)
    torch.testing.assert_close(loss, expected.loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.grad, h_naive.grad, rtol=RTOL, atol=ATOL)

    # the vocabulary split over the ranks, every rank with rank 0's batch
    start, stop = sharding.vocab_shard_range(V, world, rank)
    common = dict(kl_hidden=kl_hidden[0], kl_labels=kl_labels[0], ref_hidden=hidden[1], ref_kl_hidden=kl_hidden[1],
                  backend="torch")  # fmt: skip
    h_vp, h_one = hidden[0].clone().requires_grad_(), hidden[0].clone().requires_grad_()
    loss_vp, metrics_vp = fused_linear_kto_loss(h_vp, weight[start:stop], labels[0], desirable,
                                                process_group=dist.group.WORLD, **common)  # fmt: skip
    loss_one, metrics_one = fused_linear_kto_loss(h_one, weight, labels[0], desirable, **common)
    loss_vp.backward()
    loss_one.backward()
    torch.testing.assert_close(loss_vp, loss_one, rtol=RTOL, atol=ATOL)
    assert metrics_vp.keys() == metrics_one.keys()
    for name, value in metrics_one.items():
        torch.testing.assert_close(metrics_vp[name], value, rtol=RTOL, atol=ATOL, msg=name)
    torch.testing.assert_close(h_vp.grad, h_one.grad, rtol=RTOL, atol=ATOL)


def check_kto(rank, world, setting, tmp):
    """FusedKTOTrainer against KTOTrainer, one loss type per setting, a reference model, unequal weights, each
    rank its own batch (its own KL mean: the estimate is gathered over the ranks); under DDP also the entry
    point's collectives (:func:`_kto_entry_point_over_groups`)."""
    import test_integrations_trl as T
    import test_trl_kto as K

    loss_type = "apo_zero_unpaired" if setting == "fsdp2" else "kto"
    kw = dict(_setting_args(setting), loss_type=loss_type, desirable_weight=1.3, undesirable_weight=0.8)
    model_fn = functools.partial(_whole, T.llama)
    stock = _wrap(K.build(K.KTOTrainer, tmp + "s", model_fn=model_fn, **kw))
    fused = _wrap(K.build(K.FusedKTOTrainer, tmp + "f", model_fn=model_fn, **kw))
    assert fused.ref_model is not None
    if setting == "ddp":
        assert isinstance(fused.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    batch = K.first_batch(stock, start=4 * rank)
    step_s, step_f = _step(stock, setting, batch), _step(fused, setting, batch)
    assert step_s[0][1]["rewards/margins"] != 0
    _same(step_s, step_f, f"kto {loss_type}")
    if setting == "ddp":
        _kto_entry_point_over_groups(rank, world)


# --------------------------------------------------------------------------------------------- tests

CHECKS = ("check_loss_family_with_a_reference_model", "check_peft_base_as_reference",
          "check_precomputed_reference_and_train", "check_kto")  # fmt: skip
# The settings each check runs under (default: the DPO settings, DDP left to the other tests).
DPO_SETTINGS = ("fsdp2", "fsdp1", "fsdp1_orig", "zero2", "zero3")
CHECK_SETTINGS = {"check_kto": ("ddp", "fsdp2", "zero3")}


def test_fused_trainer_equals_stock_under_fsdp_and_zero(tmp_path):
    """FSDP2, FSDP1 (use_orig_params False and True), with DeepSpeed installed ZeRO-2 and ZeRO-3, and DDP (the
    KTO check only), one after the other in the same two processes (the imports and the first trainers cost more
    than a setting's checks)."""
    import importlib.util

    settings = ["fsdp2", "fsdp1", "fsdp1_orig"]
    if importlib.util.find_spec("deepspeed") is not None:
        settings += ["zero2", "zero3"]
    settings.append("ddp")  # FusedKTOTrainer's check only
    _spawn(",".join(settings), *CHECKS, tmp=tmp_path)


if __name__ == "__main__":  # python tests/test_trl_distributed.py fsdp2,fsdp1,zero2,zero3,ddp CHECK...
    import tempfile

    sys.path.insert(0, os.path.dirname(__file__))
    with tempfile.TemporaryDirectory() as d:
        _spawn(sys.argv[1], *sys.argv[2:], tmp=d)
