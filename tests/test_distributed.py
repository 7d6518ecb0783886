"""Vocabulary-parallel log-probs, DTensor heads, FSDP2 and DDP on CPU with gloo.

Every check runs in one real 2-rank spawn (slow: one spawn runs the whole batch); the vocabulary-parallel ones
also run on 4 ranks simulated in this process (``_spawn.simulate``: threads on a threaded process group, uneven
and empty shards). Each rank builds the same data from the same seed and compares its results with the
single-process reference it computes itself (fp32, rtol 1e-5).
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from _spawn import leave, run_check, simulate, spawn
from torch import nn

pytestmark = pytest.mark.cpu_only("gloo process groups on CPU tensors")

RTOL, ATOL = 1e-5, 1e-6


def _entry(rank, world, port, checks):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name in checks:
            torch.manual_seed(1234)
            run_check(globals()[name], f"{name} (world {world})", rank, world)
    finally:
        dist.destroy_process_group()
    leave()


def _spawn(world, *checks):
    spawn(_entry, world, checks)


# ------------------------------------------------------------------------------------------ helpers


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def _backends(world=None):
    """torch, native where built, and (world size 2 only, it is slow) Triton under its CPU interpreter."""
    import importlib.util

    from dpo_kernels import ops
    from dpo_kernels.ops import native

    backends = ["torch", "native"] if native.has_kernel("cpu") else ["torch"]
    if world == 2 and ops.triton_interpreting() and importlib.util.find_spec("triton") is not None:
        backends.append("triton")
    return backends


def _batch(n, t, v, *, scale=3.0):
    """Logits and labels like a DPO batch: masked prompt, ragged padding, one all-masked sequence."""
    logits = torch.randn(n, t, v) * scale
    labels = torch.randint(0, v, (n, t))
    labels[:, : t // 4] = -100
    for i in range(n):
        if i % 3:
            labels[i, t - i % 3 :] = -100
    labels[1] = -100  # a sequence without any scored token
    labels[n // 2 :, -1] = v - 1  # the last vocabulary entry (owned by the last non-empty shard)
    return logits, labels


def _shard(x, dim, rank, world):
    from dpo_kernels.distributed import vocab_shard_range

    start, stop = vocab_shard_range(x.shape[dim], world, rank)
    return x.narrow(dim, start, stop - start).detach().clone(), start


def _token_logps(logits, labels):
    """Per-token reference log-probs (shifted, zeros where ignored), from a plain fp32 log_softmax."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    y = labels[:, 1:]
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != -100, picked, 0.0)


def close_stats(actual, logits, labels):
    """Statistics against ``reference.token_stats``. Σ z is a sum of terms of both signs whose rounding
    depends on the order (per rank, then over ranks): it is held to 1e-5 of Σ |z|, its condition."""
    from dpo_kernels import reference

    expected = reference.token_stats(logits, labels)
    close(actual[..., 1:], expected[..., 1:])
    scale = logits[:, :-1].abs().sum(-1).max()
    torch.testing.assert_close(actual[..., 0], expected[..., 0], rtol=RTOL, atol=RTOL * float(scale))


def _weights(n):
    return torch.linspace(0.5, 1.5, n)  # distinct per-sequence upstream gradients


# -------------------------------------------------------------------------------------- logits path


def check_logits_path(rank, world):
    from dpo_kernels import distributed as D
    from dpo_kernels import reference

    for backend in _backends(world):
        for V in (41, 2 * world - 3):  # not divisible by the world size; the second leaves an empty shard
            logits, labels = _batch(6, 9, V)
            full = logits.clone().requires_grad_()
            ref_tokens = _token_logps(full, labels)
            (reference.sequence_logps(full, labels) * _weights(6)).sum().backward()
            shard, start = _shard(logits, 2, rank, world)
            shard.requires_grad_()
            vs = None if V % 2 else start  # both the all-gathered and the given vocab_start
            logp, lse, stats = D.vocab_parallel_token_logps(
                shard, labels, vocab_start=vs, backend=backend, with_stats=True
            )
            scored = labels[:, 1:] != -100
            close(logp, ref_tokens.detach())
            close(lse, torch.where(scored, torch.logsumexp(logits[:, :-1], -1), 0.0))
            close_stats(stats, logits, labels)
            seq = D.vocab_parallel_sequence_logps(shard, labels, backend=backend)
            close(seq, reference.sequence_logps(logits, labels))
            (seq * _weights(6)).sum().backward()
            close(shard.grad, full.grad[..., start : start + shard.shape[-1]])
            avg = D.vocab_parallel_sequence_logps(shard.detach(), labels, average=True, backend=backend)
            close(avg, reference.sequence_logps(logits, labels, average=True))


def check_logits_dpo_loss(rank, world):
    import dpo_kernels
    from dpo_kernels import distributed as D
    from dpo_kernels import reference

    logits, labels = _batch(6, 9, 29)
    ref_logits = logits + 0.3 * torch.randn_like(logits)
    full = logits.clone().requires_grad_()
    loss, metrics = dpo_kernels.fused_dpo_loss(full, ref_logits, labels, beta=0.2, backend="torch")
    loss.backward()
    shard, start = _shard(logits, 2, rank, world)
    shard.requires_grad_()
    ref_shard, _ = _shard(ref_logits, 2, rank, world)
    vp_loss, vp_metrics = D.vocab_parallel_dpo_loss(shard, ref_shard, labels, beta=0.2, backend="torch")
    close(vp_loss, loss.detach())
    for key in metrics.keys() & vp_metrics.keys():
        close(vp_metrics[key], metrics[key])
    vp_loss.backward()
    close(shard.grad, full.grad[..., start : start + shard.shape[-1]])
    # token metrics: the per-rank statistics combined equal the single-device ones
    _, with_tokens = D.vocab_parallel_dpo_loss(shard.detach(), None, labels, token_metrics=True, backend="torch")
    expected_tokens = _token_logps(logits, labels)
    mask = labels[:, 1:] != -100
    from dpo_kernels import preference

    _, expected = preference.dpo_from_tokens(
        expected_tokens, mask, None, stats=reference.token_stats(logits, labels),
        lse=torch.logsumexp(logits[:, :-1], -1), vocab_size=29, beta=0.1, average=False,
    )  # fmt: skip
    assert expected.keys() == with_tokens.keys()
    for key in expected:
        close(with_tokens[key], expected[key])


# -------------------------------------------------------------------------------- fused-linear path

TRANSFORMS = [
    dict(logit_scale=1.0, softcap=None, temperature=1.0),
    dict(logit_scale=0.7, softcap=4.0, temperature=1.3),
]


def check_fused_linear_path(rank, world):
    from dpo_kernels import distributed as D
    from dpo_kernels import reference

    N, T, H, V = 6, 7, 16, 37
    for backend in _backends(world):
        for transform in TRANSFORMS:
            hidden = torch.randn(N, T, H)
            weight = torch.randn(V, H) * 0.5
            bias = torch.randn(V)
            _, labels = _batch(N, T, V)
            h_full, w_full, b_full = (x.clone().requires_grad_() for x in (hidden, weight, bias))
            z = reference.lm_head_logits(h_full, w_full, b_full, **transform)
            ref_seq = reference.sequence_logps(z, labels)
            (ref_seq * _weights(N)).sum().backward()

            w_shard, start = _shard(weight, 0, rank, world)
            b_shard, _ = _shard(bias, 0, rank, world)
            h = hidden.clone().requires_grad_()
            w_shard.requires_grad_(), b_shard.requires_grad_()
            logp, lse, stats = D.vocab_parallel_fused_linear_token_logps(
                h, w_shard, labels, b_shard, backend=backend, with_stats=True, memory_budget=4 * 64, **transform
            )
            close(logp, _token_logps(z, labels).detach())
            close_stats(stats, z.detach(), labels)
            seq = D.vocab_parallel_fused_linear_sequence_logps(
                h, w_shard, labels, b_shard, backend=backend, **transform
            )
            close(seq, ref_seq.detach())
            (seq * _weights(N)).sum().backward()
            close(h.grad, h_full.grad)
            close(w_shard.grad, w_full.grad[start : start + w_shard.shape[0]])
            close(b_shard.grad, b_full.grad[start : start + b_shard.shape[0]])


def check_fused_linear_gradient_filter(rank, world):
    """gradient_filter on the vocabulary-parallel path reaches each rank's Triton backward (filtering its
    shard's tiles against the global lse); a threshold below every probability keeps them all: the
    reference's gradients. World 2 only (Triton under the interpreter is slow)."""
    if world != 2 or "triton" not in _backends(world):
        return
    from dpo_kernels import distributed as D
    from dpo_kernels import reference
    from dpo_kernels.triton import linear as triton_linear

    seen, real = [], triton_linear.fused_linear_logps_bwd
    triton_linear.fused_linear_logps_bwd = lambda *a, **k: seen.append(k.get("filter_eps")) or real(*a, **k)
    try:
        N, T, H, V = 4, 5, 16, 37
        hidden, weight = torch.randn(N, T, H), torch.randn(V, H) * 0.5
        _, labels = _batch(N, T, V)
        h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref_seq = reference.sequence_logps(reference.lm_head_logits(h_full, w_full), labels)
        (ref_seq * _weights(N)).sum().backward()
        w_shard, start = _shard(weight, 0, rank, world)
        h = hidden.clone().requires_grad_()
        w_shard.requires_grad_()
        seq = D.vocab_parallel_fused_linear_sequence_logps(h, w_shard, labels, backend="triton", gradient_filter=1e-30)
        (seq * _weights(N)).sum().backward()
        close(h.grad, h_full.grad)
        close(w_shard.grad, w_full.grad[start : start + w_shard.shape[0]])
        assert seen == [1e-30], seen
    finally:
        triton_linear.fused_linear_logps_bwd = real


def check_fused_linear_dpo_loss(rank, world):
    """The vocabulary-parallel DPO loss equals one device's on both routes of the policy head: one-pass in
    groups sized by the widest rank's slice (one pair per group here) on every backend, and recompute; with
    statistics and WPO weights; and with a vocabulary smaller than the group, the last ranks' slices empty."""
    import dpo_kernels
    from dpo_kernels import distributed as D

    N, T, H = 4, 8, 12
    for V in (31, world - 1):
        hidden, ref_hidden = torch.randn(N, T, H), torch.randn(N, T, H)
        weight = torch.randn(V, H) * 0.5
        _, labels = _batch(N, T, V)
        options = dict(ref_hidden=ref_hidden, beta=0.3, use_weighting=True, token_metrics=True)
        h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = dpo_kernels.fused_linear_dpo_loss(h_full, w_full, labels, route="recompute", backend="torch",
                                                          **options)  # fmt: skip
        loss.backward()
        w_shard, start = _shard(weight, 0, rank, world)
        widest = -(-V // world)
        for route, backend in [("recompute", "torch"), *(("one_pass", b) for b in _backends(world))]:
            w_shard.grad = None
            w_shard.requires_grad_()
            h = hidden.clone().requires_grad_()
            vp_loss, vp_metrics = D.vocab_parallel_fused_linear_dpo_loss(
                h, w_shard, labels, route=route, backend=backend, memory_budget=2 * (T - 1) * widest * 4, **options
            )
            close(vp_loss, loss.detach())
            for key in metrics.keys() & vp_metrics.keys():
                close(vp_metrics[key], metrics[key])
            vp_loss.backward()
            close(h.grad, h_full.grad)
            close(w_shard.grad, w_full.grad[start : start + w_shard.shape[0]])


# ------------------------------------------------------------------------------------------ DTensor


def check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from dpo_kernels import distributed as D
    from dpo_kernels import reference

    mesh = init_device_mesh("cpu", (world,))
    N, T, H, V = 4, 6, 8, 2 * world + 3  # uneven: torch.chunk layout
    hidden = torch.randn(N, T, H)
    weight = torch.randn(V, H)
    _, labels = _batch(N, T, V)
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = reference.lm_head_logits(h_full, w_full)
    (reference.sequence_logps(z, labels) * _weights(N)).sum().backward()

    w_dt = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    h = hidden.clone().requires_grad_()
    seq = D.vocab_parallel_fused_linear_sequence_logps(h, w_dt, labels, backend="torch")
    close(seq, reference.sequence_logps(z.detach(), labels))
    (seq * _weights(N)).sum().backward()
    assert w_dt.grad.placements == (Shard(0),)
    close(w_dt.grad.full_tensor(), w_full.grad)
    close(h.grad, h_full.grad)

    # logits sharded on the vocabulary (what ColwiseParallel(use_local_output=False) hands out)
    logits = z.detach()
    l_dt = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
    D.vocab_parallel_sequence_logps(l_dt, labels, backend="torch").sum().backward()
    expected = logits.clone().requires_grad_()
    reference.sequence_logps(expected, labels).sum().backward()
    close(l_dt.grad.full_tensor(), expected.grad)

    # the module wrapper takes a vocabulary-sharded DTensor head as fused_linear_dpo_loss does: the
    # vocabulary-parallel path (whose label check refuses an FSDP2 shard used outside its forward)
    head = nn.Linear(H, V, bias=False)
    head.weight = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    ref_logps = torch.randn(N)
    loss, _ = D.FusedLMHeadLoss(head, beta=0.1, backend="torch")(hidden, labels, ref_logps=ref_logps)
    import dpo_kernels

    expected_loss, _ = dpo_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref_logps, backend="torch")
    close(loss, expected_loss)

    # a replicated DTensor is the plain single-device case; a bad vocab_start is caught
    rep = distribute_tensor(weight, mesh, [Replicate()])
    close(D.vocab_parallel_fused_linear_sequence_logps(hidden, rep, labels, backend="torch"), seq.detach())
    w_shard, start = _shard(weight, 0, rank, world)
    with pytest.raises(ValueError, match="owned by"):
        D.vocab_parallel_fused_linear_sequence_logps(hidden, w_shard, labels, vocab_start=0, backend="torch")


# ------------------------------------------------------------------------------------- entry points


def check_entry_points(rank, world):
    """The public entry points take ``process_group=`` (and vocabulary-sharded DTensors) to the
    vocabulary-parallel path, with every loss option and metric."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import dpo_kernels
    from dpo_kernels import distributed as D
    from dpo_kernels import reference

    group = dist.group.WORLD
    logits, labels = _batch(4, 6, 19)
    shard, _ = _shard(logits, 2, rank, world)
    close(dpo_kernels.sequence_logps(shard, labels, process_group=group, backend="torch"),
          reference.sequence_logps(logits, labels))  # fmt: skip
    ref_logps = torch.randn(4)
    options = dict(loss_type="ipo", use_weighting=True, rpo_alpha=0.5, beta=0.2, backend="torch")
    loss, metrics = dpo_kernels.fused_dpo_loss(shard, ref_logps, labels, process_group=group, **options)
    expected, expected_metrics = dpo_kernels.fused_dpo_loss(logits, ref_logps, labels, **options)
    close(loss, expected)
    assert metrics.keys() == expected_metrics.keys()
    for name in expected_metrics:
        close(metrics[name], expected_metrics[name])
    # every loss type of the family, loss and gradient of the shard
    from dpo_kernels.losses import LOSS_TYPES

    for loss_type in LOSS_TYPES:
        extra = {"label_smoothing": 0.1} if loss_type == "exo_pair" else {}
        mine, full = shard.clone().requires_grad_(), logits.clone().requires_grad_()
        loss, _ = dpo_kernels.fused_dpo_loss(mine, ref_logps, labels, process_group=group, loss_type=loss_type,
                                             backend="torch", **extra)  # fmt: skip
        expected, _ = dpo_kernels.fused_dpo_loss(full, ref_logps, labels, loss_type=loss_type, backend="torch", **extra)
        loss.backward()
        expected.backward()
        close(loss, expected)
        start = D.vocab_shard_range(19, world, rank)[0]
        close(mine.grad, full.grad[..., start : start + mine.shape[-1]])
    with pytest.raises(ValueError, match="inplace_backward"):
        dpo_kernels.fused_dpo_loss(shard.clone(), ref_logps, labels, process_group=group, inplace_backward=True)

    hidden, weight = torch.randn(4, 6, 8), torch.randn(19, 8)
    w_shard, _ = _shard(weight, 0, rank, world)
    close(dpo_kernels.fused_linear_sequence_logps(hidden, w_shard, labels, process_group=group, backend="torch"),
          dpo_kernels.fused_linear_sequence_logps(hidden, weight, labels, backend="torch"))  # fmt: skip
    options = dict(loss_type="apo_zero", ld_alpha=0.5, beta=0.3, backend="torch")
    ref_hidden = torch.randn(4, 6, 8)
    loss, metrics = dpo_kernels.fused_linear_dpo_loss(
        hidden, w_shard, labels, ref_hidden=ref_hidden, process_group=group, **options
    )
    expected, expected_metrics = dpo_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden,
                                                                   **options)  # fmt: skip
    close(loss, expected)
    for name in expected_metrics:
        close(metrics[name], expected_metrics[name])

    # a DTensor weight sharded on the vocabulary (tensor parallelism: same tokens on every rank) needs no
    # argument; gradients land on the shard
    mesh = init_device_mesh("cpu", (world,))
    w_dt = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    h = hidden.clone().requires_grad_()
    loss, _ = dpo_kernels.fused_linear_dpo_loss(h, w_dt, labels, ref_logps=ref_logps, backend="torch")
    loss.backward()
    w_full, h_full = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
    expected, _ = dpo_kernels.fused_linear_dpo_loss(h_full, w_full, labels, ref_logps=ref_logps, backend="torch")
    expected.backward()
    close(loss, expected)
    close(w_dt.grad.full_tensor(), w_full.grad)
    close(h.grad, h_full.grad)
    # DTensor logits sharded on the vocabulary: sequence_logps and fused_dpo_loss take them as they are
    l_dt = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
    close(dpo_kernels.sequence_logps(l_dt, labels, backend="torch"), reference.sequence_logps(logits, labels))
    loss, _ = dpo_kernels.fused_dpo_loss(l_dt, ref_logps, labels, backend="torch")
    loss.backward()
    full = logits.clone().requires_grad_()
    expected, _ = dpo_kernels.fused_dpo_loss(full, ref_logps, labels, backend="torch")
    expected.backward()
    close(loss, expected)
    close(l_dt.grad.full_tensor(), full.grad)
    # the Hugging Face helper keeps a DTensor head one (no full_tensor(): its gradient would not be reduced)
    from dpo_kernels.integrations import hf

    w_hf = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    tokens = hf.token_logps_from_hidden(hidden, hf.LMHead(w_hf, None, 1.0, None), labels, with_stats=True,
                                        backend="torch")  # fmt: skip
    single = hf.token_logps_from_hidden(hidden, hf.LMHead(weight, None, 1.0, None), labels, with_stats=True,
                                        backend="torch")  # fmt: skip
    for got, want in zip(tokens[:4], single[:4]):
        close(got, want)
    assert int(tokens.vocab_size) == single.vocab_size == 19
    tokens.logps.sum().backward()
    full_w = weight.clone().requires_grad_()
    full_head = hf.LMHead(full_w, None, 1.0, None)
    hf.token_logps_from_hidden(hidden, full_head, labels, backend="torch").logps.sum().backward()
    close(w_hf.grad.full_tensor(), full_w.grad)
    # ... but the ranks must see the same tokens (an FSDP2 shard used outside its forward does not)
    mine = labels.clone()
    mine[0, -1] = (int(mine[0, -1]) + rank) % 19
    with pytest.raises(ValueError, match="labels differ across the ranks"):
        dpo_kernels.fused_linear_sequence_logps(hidden, w_dt, mine, backend="torch")
    with pytest.raises(ValueError, match="labels differ across the ranks"):
        hf.token_logps_from_hidden(hidden, hf.LMHead(w_hf, None, 1.0, None), mine, backend="torch")


def check_collectives_and_syncs(rank, world):
    """One vocabulary-parallel fused_linear_dpo_loss with a reference hidden state and the default metrics,
    forward + backward: at most 4 collective calls per rank and no more host synchronizations than the same
    call on one device; the same numbers."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    import dpo_kernels

    syncing = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_numpy", "argwhere",
               "_assert_async"}  # fmt: skip

    class Syncs(TorchDispatchMode):
        """Counts the aten ops that make the host wait for the device, inside the library's custom ops too."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name.split("::")[-1] in syncing:
                self.seen.append(name)
            if name in OPDEFS:  # run the op's Python body under this mode, so that its aten ops are seen
                with self:
                    return OPDEFS[name]._init_fn(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    calls = []
    names = ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all")
    real = {name: getattr(dist, name) for name in names}

    def counted(name):
        return lambda *a, **k: calls.append(name) or real[name](*a, **k)

    N, T, H, V = 4, 8, 12, 31
    hidden, ref_hidden, weight = torch.randn(N, T, H), torch.randn(N, T, H), torch.randn(V, H) * 0.5
    _, labels = _batch(N, T, V)
    w_shard, start = _shard(weight, 0, rank, world)

    def run(w, **kw):
        h, w = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        with Syncs() as mode:
            loss, metrics = dpo_kernels.fused_linear_dpo_loss(h, w, labels, ref_hidden=ref_hidden, backend="torch",
                                                              **kw)  # fmt: skip
            loss.backward()
        return loss.detach(), metrics, h.grad, w.grad, mode.seen

    one = run(weight)
    for name in names:
        setattr(dist, name, counted(name))
    try:
        sharded = run(w_shard, process_group=dist.group.WORLD, vocab_start=start)
    finally:
        for name in names:
            setattr(dist, name, real[name])
    if os.environ.get("DPO_KERNELS_TEST_TIMING") and rank == 0:
        print(f"collectives {calls}; syncs sharded {sharded[-1]}, one device {one[-1]}", file=sys.stderr)
    assert len(calls) <= 4, calls
    assert len(sharded[-1]) <= len(one[-1]), (sharded[-1], one[-1])
    close(sharded[0], one[0])
    for key in one[1]:
        close(sharded[1][key], one[1][key])
    close(sharded[2], one[2])
    close(sharded[3], one[3][start : start + w_shard.shape[0]])


def check_packed(rank, world):
    """Packed batches (cu_seqlens / position_ids) on the vocabulary-parallel path equal the padded layout."""
    import dpo_kernels
    from dpo_kernels import reference

    group = dist.group.WORLD
    lengths = [5, 3, 6, 4]
    total, V, H = sum(lengths), 23, 8
    cu = torch.tensor([0, 5, 8, 14, 18])
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    hidden, weight = torch.randn(1, total, H), torch.randn(V, H)
    labels = torch.randint(0, V, (1, total))
    labels[0, cu[:-1]] = -100  # each sequence's first token is prompt
    w_shard, start = _shard(weight, 0, rank, world)
    logits = reference.lm_head_logits(hidden, weight)
    l_shard, _ = _shard(logits, 2, rank, world)
    padded = reference.sequence_logps(logits, labels, cu_seqlens=cu)
    close(dpo_kernels.sequence_logps(l_shard, labels, process_group=group, cu_seqlens=cu, backend="torch"), padded)
    close(dpo_kernels.fused_linear_sequence_logps(hidden, w_shard, labels, process_group=group,
                                                  position_ids=position_ids, backend="torch"), padded)  # fmt: skip
    # the one-pass head on a packed batch, one pair per group: loss, metrics and gradients
    ref_logps = torch.randn(4)
    h, w = hidden.clone().requires_grad_(), w_shard.requires_grad_()
    loss, metrics = dpo_kernels.fused_linear_dpo_loss(h, w, labels, ref_logps=ref_logps, cu_seqlens=cu,
                                                      process_group=group, backend="torch", route="one_pass",
                                                      memory_budget=11 * -(-V // world) * 4)  # fmt: skip
    loss.backward()
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want, want_metrics = reference.dpo_loss(reference.lm_head_logits(h_full, w_full), ref_logps, labels, cu_seqlens=cu)
    want.backward()
    close(loss, want.detach())
    for key in want_metrics:
        close(metrics[key], want_metrics[key])
    close(h.grad, h_full.grad)
    close(w.grad, w_full.grad[start : start + w.shape[0]])


# ----------------------------------------------------------------------------------- FSDP2 and DDP


class _Net(nn.Module):
    def __init__(self, H, V, backend):
        super().__init__()
        from dpo_kernels.distributed import FusedLMHeadLoss

        self.body = nn.Linear(H, H)
        self.head = FusedLMHeadLoss(nn.Linear(H, V, bias=True), beta=0.5, backend=backend)

    def forward(self, x, labels, ref_logps, head_outside=False):
        hidden = torch.tanh(self.body(x))
        if head_outside:  # the caller applies the loss to the head's weight itself
            return hidden
        return self.head(hidden, labels, ref_logps=ref_logps)


def _pairs_data(world, B=2, T=7, H=8, V=23):
    x = torch.randn(2 * B * world, T, H)
    _, labels = _batch(2 * B * world, T, V)
    ref_logps = torch.randn(2 * B * world) - 10
    return x, labels, ref_logps, (H, V)


def _rank_slice(t, rank, world):
    """This rank's pairs: its chosen block and its rejected block, chosen first."""
    chosen, rejected = t.chunk(2)
    per = chosen.shape[0] // world
    return torch.cat([chosen[rank * per : (rank + 1) * per], rejected[rank * per : (rank + 1) * per]])


def _single_step(net, x, labels, ref_logps, lr=0.5):
    loss, _ = net(x, labels, ref_logps)
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= lr * p.grad
    return loss.detach()


def check_fsdp2_and_ddp_step(rank, world):
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    backend = _backends()[-1]  # native where built
    x, labels, ref_logps, (H, V) = _pairs_data(world)
    base = _Net(H, V, backend)
    single = copy.deepcopy(base)
    single_loss = _single_step(single, x, labels, ref_logps)
    mine = [_rank_slice(t, rank, world) for t in (x, labels, ref_logps)]

    # FSDP2: the head's weight is a DTensor Shard(0) outside forward; FusedLMHeadLoss unshards it in forward
    fsdp = copy.deepcopy(base)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(fsdp.head, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    assert fsdp.head.lm_head.weight.placements[0].is_shard(0)
    opt = torch.optim.SGD(fsdp.parameters(), lr=0.5)
    loss, _ = fsdp(*mine)
    loss.backward()
    opt.step()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    close(mean_loss / world, single_loss)
    for (name, p), q in zip(fsdp.named_parameters(), single.parameters()):
        close(p.full_tensor(), q.detach())

    # DDP, both with the loss inside the forward and called on the head's weight outside it: DDP's
    # gradient hooks sit on the parameters, so they fire either way
    import dpo_kernels

    for head_outside in (False, True):
        ddp_net = copy.deepcopy(base)
        ddp = DDP(ddp_net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        if head_outside:
            hidden = ddp(*mine, head_outside=True)
            lm_head = ddp.module.head.lm_head
            loss, _ = dpo_kernels.fused_linear_dpo_loss(
                hidden, lm_head.weight, mine[1], bias=lm_head.bias, ref_logps=mine[2], beta=0.5, backend=backend
            )
        else:
            loss, _ = ddp(*mine)
        loss.backward()
        opt.step()
        for p, q in zip(ddp_net.parameters(), single.parameters()):
            close(p.detach(), q.detach())

    # FSDP2, the loss called outside the module's forward on the sharded weight: refused (by DTensor's
    # dispatch, or by the entry point where it knows about vocabulary-sharded weights)
    with pytest.raises((RuntimeError, ValueError), match="DTensor"):
        dpo_kernels.fused_linear_dpo_loss(
            torch.randn(2, 7, H), fsdp.head.lm_head.weight, mine[1][:2], ref_logps=mine[2][:2], backend=backend
        )


def check_hf_model_under_fsdp2(rank, world):
    """sequence_logps_from_model on a Llama model under fully_shard (decoder layers and the root, whose unit
    holds the untied LM head): each rank scores its own batch, the head runs inside the root's forward
    where FSDP2 has it unsharded, and one SGD step equals the single-process step on the whole batch."""
    import copy

    try:
        import transformers
    except ImportError:
        return  # the test extra brings transformers; without it the HF helper is not usable anyway
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dpo_kernels.integrations import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    base = transformers.AutoModelForCausalLM.from_config(config)
    n = 2 * world
    input_ids = torch.randint(0, 53, (n, 9))
    labels = input_ids.clone()
    labels[:, :3] = -100

    def step(model, ids, y):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = -hf.sequence_logps_from_model(model, ids, None, y, backend="torch").mean()
        loss.backward()
        opt.step()
        return loss.detach()

    single = copy.deepcopy(base)
    single_loss = step(single, input_ids, labels)
    sharded = copy.deepcopy(base)
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    # resharding the root after its forward: a head read after the forward would be a shard again
    fully_shard(sharded, mesh=mesh, reshard_after_forward=True)
    assert sharded.lm_head.weight.placements[0].is_shard(0)
    mine = slice(2 * rank, 2 * rank + 2)
    loss = step(sharded, input_ids[mine], labels[mine])
    dist.all_reduce(loss)
    close(loss / world, single_loss)
    for (name, p), q in zip(sharded.named_parameters(), single.parameters()):
        close(p.full_tensor(), q.detach())


# ------------------------------------------------------------------------------------------- tests

_FAST = ("check_logits_path", "check_logits_dpo_loss", "check_fused_linear_path", "check_fused_linear_gradient_filter",
         "check_fused_linear_dpo_loss", "check_collectives_and_syncs", "check_packed",
         "check_dtensor", "check_entry_points", "check_fsdp2_and_ddp_step", "check_hf_model_under_fsdp2")  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_world_2():
    _spawn(2, *_FAST)


# The vocabulary-parallel checks whose collectives are the library's own (no DTensor, FSDP or patched collectives):
# these run on four ranks simulated in this process as well (uneven and empty shards, no process to spawn).
_SIMULATED = ("check_logits_path", "check_logits_dpo_loss", "check_fused_linear_path",
              "check_fused_linear_gradient_filter", "check_fused_linear_dpo_loss", "check_packed")  # fmt: skip


@pytest.mark.parametrize("check", _SIMULATED)
def test_simulated_world_4(check):
    simulate(globals()[check], 4)


if __name__ == "__main__":  # python tests/test_distributed.py [world]
    _spawn(int(sys.argv[1]) if len(sys.argv) > 1 else 2, *_FAST)
