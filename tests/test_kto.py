"""fused_linear_kto_loss against the naive path: ``reference.lm_head_logits`` + ``reference.sequence_logps``
+ ``losses.kto_loss``, with TRL's KTO metrics computed here from the full logits. Loss, metrics and the
gradients w.r.t. hidden, weight and bias, on every backend (Triton under its CPU interpreter), both loss
types, unequal desirable / undesirable weights, each way of giving the reference, a packed batch, errors."""

import pytest
import torch

from conftest import BACKENDS, FP32_ATOL, FP32_RTOL
from dpo_kernels import fused_linear_kto_loss, losses, reference
from dpo_kernels.ops import native

B, T, H, V = 5, 7, 16, 37
DESIRABLE = [True, False, True, True, False]


def _backend(name, device):
    if name == "native" and not native.has_kernel(device.type):
        pytest.skip("dpo_kernels._C is not built")
    return name


def _labels(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (n, t), generator=g)
    for i in range(n):
        labels[i, : 1 + i % 3] = -100  # ragged prompts
        if i % 2:
            labels[i, t - i % 3 - 1 :] = -100  # ragged padding
    return labels


def _data(device, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = {
        "hidden": torch.randn(B, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g) / H**0.5 * 3,
        "bias": torch.randn(V, generator=g) * 0.5 if bias else None,
        "labels": _labels(B, T, seed + 1),
        "kl_hidden": torch.randn(B, T - 1, H, generator=g),
        "kl_labels": _labels(B, T - 1, seed + 2),
        "ref_hidden": torch.randn(B, T, H, generator=g),
        "ref_kl_hidden": torch.randn(B, T - 1, H, generator=g),
        "ref_weight": torch.randn(V, H, generator=g) / H**0.5 * 3,
    }
    d = {k: None if v is None else v.to(device) for k, v in d.items()}
    d["desirable"] = torch.tensor(DESIRABLE, device=device)
    return d


def _trl_metrics(logits, labels, logps, rewards, kl, desirable):
    """The metrics TRL's KTOTrainer logs on one process, from the full logits (its own formulas)."""
    mask = labels[:, 1:] != -100
    z = logits[:, :-1].detach().double()
    entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    mean_logits = z.mean(-1)
    chosen_mask, rejected_mask = mask & desirable[:, None], mask & ~desirable[:, None]
    chosen, rejected = rewards[desirable], rewards[~desirable]
    out = {
        "kl": kl,
        "entropy": entropy[mask].sum() / mask.sum(),
        "logits/chosen": mean_logits[chosen_mask].sum() / chosen_mask.sum(),
        "logits/rejected": mean_logits[rejected_mask].sum() / rejected_mask.sum(),
        "rewards/chosen": chosen.mean(),
        "logps/chosen": logps[desirable].mean(),
        "rewards/rejected": rejected.mean(),
        "logps/rejected": logps[~desirable].mean(),
    }
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return {k: v.double() for k, v in out.items()}


def _naive(d, hidden, weight, bias, *, ref, loss_type, transform, **options):
    """(loss, metrics) of the naive path: full logits, sequence log-probs, kto_loss."""
    logits = reference.lm_head_logits(hidden, weight, bias, **transform)
    logps = reference.sequence_logps(logits, d["labels"])
    kl_logps = ref_logps = ref_kl = None
    if loss_type == "kto":
        with torch.no_grad():
            kl_logps = reference.sequence_logps(reference.lm_head_logits(d["kl_hidden"], weight, bias, **transform),
                                                d["kl_labels"])  # fmt: skip
    if ref == "hidden":
        with torch.no_grad():
            ref_head = d["ref_weight"]
            ref_logps = reference.sequence_logps(reference.lm_head_logits(d["ref_hidden"], ref_head, None, **transform),
                                                 d["labels"])  # fmt: skip
            if loss_type == "kto":
                ref_kl = reference.sequence_logps(
                    reference.lm_head_logits(d["ref_kl_hidden"], ref_head, None, **transform), d["kl_labels"]
                )
    elif ref == "logps":
        ref_logps, ref_kl = d["ref_logps"], d["ref_kl_logps"] if loss_type == "kto" else None
    else:
        ref_logps = torch.zeros_like(logps)
        ref_kl = None if kl_logps is None else torch.zeros_like(kl_logps)
    out = losses.kto_loss(logps, ref_logps, kl_logps, ref_kl, d["desirable"], loss_type=loss_type, **options)
    rewards = options.get("beta", 0.1) * (logps - ref_logps).detach()
    metrics = _trl_metrics(logits, d["labels"], logps.detach(), rewards, out.kl, d["desirable"])
    return out.loss, metrics


def _fused(d, hidden, weight, bias, *, ref, loss_type, transform, backend, **options):
    kw = dict(transform, **options)
    if loss_type == "kto":
        kw.update(kl_hidden=d["kl_hidden"], kl_labels=d["kl_labels"])
    if ref == "hidden":
        kw.update(ref_hidden=d["ref_hidden"], ref_weight=d["ref_weight"])
        if loss_type == "kto":
            kw["ref_kl_hidden"] = d["ref_kl_hidden"]
    elif ref == "logps":
        kw["ref_logps"] = d["ref_logps"]
        if loss_type == "kto":
            kw["ref_kl_logps"] = d["ref_kl_logps"]
    return fused_linear_kto_loss(hidden, weight, d["labels"], d["desirable"], bias=bias, backend=backend,
                                 loss_type=loss_type, **kw)  # fmt: skip


def _run(fn, d, bias, **kwargs):
    """(loss, metrics, gradients w.r.t. hidden, weight and bias)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (d["hidden"], d["weight"], d["bias"] if bias else None)]  # fmt: skip
    loss, metrics = fn(d, *leaves, **kwargs)
    loss.backward()
    return loss.detach(), metrics, [leaf.grad if leaf is not None else None for leaf in leaves]


def _assert_same(fused, naive):
    (loss_f, metrics_f, grads_f), (loss_n, metrics_n, grads_n) = fused, naive
    torch.testing.assert_close(loss_f, loss_n, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert metrics_f.keys() == metrics_n.keys()
    for name, value in metrics_n.items():
        assert metrics_f[name].dim() == 0 and not metrics_f[name].requires_grad, name
        torch.testing.assert_close(metrics_f[name].double(), value, rtol=FP32_RTOL, atol=FP32_ATOL, msg=name)
    assert any(g.abs().max() > 0 for g in grads_n if g is not None)
    for g_f, g_n in zip(grads_f, grads_n):
        if g_n is None:
            assert g_f is None
            continue
        torch.testing.assert_close(g_f, g_n, rtol=FP32_RTOL, atol=FP32_ATOL * g_n.abs().max().item())


CASES = {
    "kto_ref_hidden": dict(loss_type="kto", ref="hidden"),
    "kto_ref_logps_weights": dict(loss_type="kto", ref="logps", desirable_weight=1.33, undesirable_weight=0.7),
    "kto_reference_free": dict(loss_type="kto", ref="free", beta=0.5),
    "apo_ref_hidden_weights": dict(loss_type="apo_zero_unpaired", ref="hidden", undesirable_weight=2.0),
    "apo_ref_logps": dict(loss_type="apo_zero_unpaired", ref="logps", beta=0.3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_naive_logits_plus_kto_loss(backend, case, device):
    backend = _backend(backend, device)
    d = _data(device, bias=True)
    # A reference near the policy, so that the KL estimate is positive in some cases and clamped in others
    d["ref_logps"] = (torch.randn(B, device=device) - 15.0) * 2
    d["ref_kl_logps"] = (torch.randn(B, device=device) - 18.0) * 2
    kw = dict(CASES[case], transform={})
    naive = _run(_naive, d, True, **kw)
    fused = _run(_fused, d, True, backend=backend, **kw)
    _assert_same(fused, naive)


@pytest.mark.parametrize("clamped", [False, True], ids=["kl_positive", "kl_clamped"])
def test_kl_term_detached_and_clamped(clamped, device):
    """The KL estimate enters the loss as a constant, max(0, mean(π_KL − ref_KL)); a transform (softcap,
    scale, temperature) and no bias."""
    d = _data(device)
    with torch.no_grad():
        policy_kl = reference.sequence_logps(reference.lm_head_logits(d["kl_hidden"], d["weight"]), d["kl_labels"])
    d["ref_logps"] = torch.full((B,), -40.0, device=device)
    d["ref_kl_logps"] = policy_kl + (1.0 if clamped else -0.5)
    transform = dict(softcap=4.0, logit_scale=0.8, temperature=1.2)
    kw = dict(loss_type="kto", ref="logps", transform=transform)
    naive = _run(_naive, d, False, **kw)
    fused = _run(_fused, d, False, backend="torch", **kw)
    _assert_same(fused, naive)
    # the transform applies to the KL completions as well; only clamped when the mean is negative
    d["ref_kl_logps"] = reference.sequence_logps(
        reference.lm_head_logits(d["kl_hidden"], d["weight"], **transform), d["kl_labels"]
    ) + (1.0 if clamped else -0.5)
    loss, metrics = _fused(d, d["hidden"], d["weight"], None, backend="torch", **kw)
    assert metrics["kl"].item() == pytest.approx(0.0 if clamped else 0.5, abs=1e-5)


def test_one_sided_batches_leave_out_what_trl_leaves_out(device):
    d = _data(device)
    d["desirable"] = torch.ones(B, dtype=torch.bool, device=device)
    _, metrics = fused_linear_kto_loss(d["hidden"], d["weight"], d["labels"], d["desirable"],
                                       loss_type="apo_zero_unpaired", backend="torch")  # fmt: skip
    assert set(metrics) == {"kl", "entropy", "logits/chosen", "rewards/chosen", "logps/chosen"}
    _, metrics = fused_linear_kto_loss(d["hidden"], d["weight"], d["labels"], ~d["desirable"],
                                       loss_type="apo_zero_unpaired", token_metrics=False, backend="torch")  # fmt: skip
    assert set(metrics) == {"kl", "rewards/rejected", "logps/rejected"}
    assert metrics["kl"].item() == 0.0


def test_packed_batch_equals_padded(device):
    """The completions and the KL completions as two packed batches (cu_seqlens / kl_position_ids)."""
    from dpo_kernels import packing

    d = _data(device)
    lengths, kl_lengths = [7, 5, 6, 3, 7], [6, 4, 6, 5, 2]

    def pack(hidden, labels, lens):
        h = torch.cat([hidden[i, :n] for i, n in enumerate(lens)])[None]
        y = torch.cat([labels[i, :n] for i, n in enumerate(lens)])[None]
        return h, y

    def padded_labels(labels, lens):
        return torch.stack([labels[i].masked_fill(torch.arange(labels.shape[1], device=device) >= n, -100)
                            for i, n in enumerate(lens)])  # fmt: skip

    h, y = pack(d["hidden"], d["labels"], lengths)
    kh, ky = pack(d["kl_hidden"], d["kl_labels"], kl_lengths)
    rh, _ = pack(d["ref_hidden"], d["labels"], lengths)
    rkh, _ = pack(d["ref_kl_hidden"], d["kl_labels"], kl_lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    kl_pos = torch.cat([torch.arange(n) for n in kl_lengths])[None].to(device)
    weight = d["weight"].clone().requires_grad_()
    loss, metrics = fused_linear_kto_loss(
        h, weight, y, d["desirable"], kl_hidden=kh, kl_labels=ky, ref_hidden=rh, ref_kl_hidden=rkh, cu_seqlens=cu,
        kl_position_ids=kl_pos, backend="torch",
    )  # fmt: skip
    loss.backward()
    weight_p = d["weight"].clone().requires_grad_()
    loss_p, metrics_p = fused_linear_kto_loss(
        d["hidden"], weight_p, padded_labels(d["labels"], lengths), d["desirable"], kl_hidden=d["kl_hidden"],
        kl_labels=padded_labels(d["kl_labels"], kl_lengths), ref_hidden=d["ref_hidden"],
        ref_kl_hidden=d["ref_kl_hidden"], backend="torch",
    )  # fmt: skip
    loss_p.backward()
    assert packing.wanted(cu, None)
    torch.testing.assert_close(loss, loss_p, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert metrics.keys() == metrics_p.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_p[name], rtol=FP32_RTOL, atol=FP32_ATOL, msg=name)
    torch.testing.assert_close(weight.grad, weight_p.grad, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_the_kl_pass_and_the_reference_store_nothing_for_autograd(device):
    """Only the policy's completions are differentiated: the KL completions' and the reference's hidden
    states get no gradient, whatever their requires_grad."""
    d = _data(device)
    kl_hidden = d["kl_hidden"].clone().requires_grad_()
    ref_hidden = d["ref_hidden"].clone().requires_grad_()
    hidden = d["hidden"].clone().requires_grad_()
    loss, _ = fused_linear_kto_loss(hidden, d["weight"], d["labels"], d["desirable"], kl_hidden=kl_hidden,
                                    kl_labels=d["kl_labels"], ref_hidden=ref_hidden, ref_kl_hidden=d["ref_kl_hidden"],
                                    backend="torch")  # fmt: skip
    assert loss.requires_grad
    loss.backward()
    assert hidden.grad is not None and kl_hidden.grad is None and ref_hidden.grad is None


ERRORS = [
    (dict(loss_type="sigmoid"), ValueError, "Unknown loss_type 'sigmoid' for kto_loss"),
    (dict(kl_hidden=None), ValueError, "needs the mismatched completions: give kl_hidden and kl_labels"),
    (dict(loss_type="apo_zero_unpaired"), ValueError, "has no KL term: leave out kl_hidden, kl_labels"),
    (dict(ref_logps="ok"), ValueError, "ref_logps needs ref_kl_logps"),
    (dict(ref_hidden="ok", ref_logps="ok"), ValueError, "not both"),
    (dict(ref_hidden="ok"), ValueError, "ref_hidden needs ref_kl_hidden"),
    (dict(ref_weight="ok"), ValueError, "ref_weight / ref_bias score ref_hidden"),
    (dict(ref_logps="ok", ref_kl_logps="short"), ValueError, r"ref_kl_logps must have shape \(5,\)"),
    (dict(desirable="long"), TypeError, "desirable must be a bool tensor"),
    (dict(desirable="short"), ValueError, r"desirable must have shape \(5,\)"),
    (dict(kl_labels="short"), ValueError, r"kl_labels must have shape \(N, T\) = \(5, 6\) to match kl_hidden"),
    (dict(ref_hidden="ok", ref_kl_hidden="short"), ValueError, "ref_kl_hidden must have shape .* of kl_hidden"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(kl_group="x", loss_type="apo_zero_unpaired", kl_hidden=None, kl_labels=None), ValueError, "kl_group"),
    (dict(desirable_weight="a"), ValueError, "desirable_weight must be a finite number"),
]


@pytest.mark.parametrize("options,error,match", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_errors_name_the_argument(options, error, match, device):
    d = _data(device)
    kw = dict(kl_hidden=d["kl_hidden"], kl_labels=d["kl_labels"], backend="torch")
    values = {
        "ok": lambda name: d[name] if name in d else torch.zeros(B, device=device),
        "short": lambda name: d[name][:-1] if name in d else torch.zeros(B - 1, device=device),
        "long": lambda name: torch.ones(B, dtype=torch.long, device=device),
    }
    desirable = d["desirable"]
    for name, value in options.items():
        value = values[value](name) if isinstance(value, str) and value in values else value
        if name == "desirable":
            desirable = value
        else:
            kw[name] = value
    with pytest.raises(error, match=match):
        fused_linear_kto_loss(d["hidden"], d["weight"], d["labels"], desirable, **kw)
