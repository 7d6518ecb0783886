"""Bad input: a clear ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

from conftest import BACKENDS, DEVICE, make_batch
from dpo_kernels import fused_dpo_loss, sequence_logps


def batch(n=4, t=5, v=123):
    return make_batch(n, t, v)


def with_label(labels, value):
    labels = labels.clone()
    labels[1, 3] = value  # a scored position
    return labels


CASES = {
    "logits_not_a_tensor": (lambda p, r, y: (p.tolist(), r, y), TypeError, "policy_logits|logits must be a torch.Tensor"),
    "integer_logits": (lambda p, r, y: (p.long(), r, y), TypeError, "logits must be float"),
    "logits_2d": (lambda p, r, y: (p[0], r, y), ValueError, r"logits must have shape \(N, T, V\)"),
    "labels_shape": (lambda p, r, y: (p, r, y[:, :-1]), ValueError, r"labels must have shape \(N, T\)"),
    "float_labels": (lambda p, r, y: (p, r, y.float()), TypeError, "labels must be int64 or int32"),
    "int16_labels": (lambda p, r, y: (p, r, y.short()), TypeError, "labels must be int64 or int32"),
    "label_too_large": (lambda p, r, y: (p, r, with_label(y, 123)), ValueError, r"labels must lie in \[0, 123\).*found 123"),
    "negative_label": (lambda p, r, y: (p, r, with_label(y, -5)), ValueError, r"labels must lie in \[0, 123\).*found -5"),
    "odd_batch": (lambda p, r, y: (p[:3], r[:3], y[:3]), ValueError, "policy_logits must hold 2B sequences.*odd"),
    "ref_shape": (lambda p, r, y: (p, r[:, :-1], y), ValueError, r"ref_logits must be None.*policy_logits' shape \(4, 5, 123\) \(2B, T, V\), got \(4, 4, 123\)"),
    "ref_vocabulary": (lambda p, r, y: (p, r[..., :-1], y), ValueError, r"policy_logits' shape \(4, 5, 123\) \(2B, T, V\), got \(4, 5, 122\)"),
    "ref_logps_shape": (lambda p, r, y: (p, r[:2, 0, 0], y), ValueError, r"ref_logits as precomputed log-probs must have shape \(4,\)"),
    "ref_integer": (lambda p, r, y: (p, r.long(), y), TypeError, "ref_logits must be floating point"),
    "labels_on_meta": (lambda p, r, y: (p, r, y.to("meta")), ValueError, f"labels are on meta but policy_logits is on {DEVICE}"),
    "ref_on_meta": (lambda p, r, y: (p, r.to("meta"), y), ValueError, f"ref_logits are on meta but policy_logits is on {DEVICE}"),
}
# Only where the logits are on the GPU: CPU tensors next to them.
CUDA_CASES = {
    "labels_on_cpu": (lambda p, r, y: (p, r, y.cpu()), ValueError, "labels are on cpu but policy_logits is on cuda"),
    "ref_on_cpu": (lambda p, r, y: (p, r.cpu(), y), ValueError, "ref_logits are on cpu but policy_logits is on cuda"),
    "ref_logps_on_cpu": (lambda p, r, y: (p, r[:, 0, 0].cpu(), y), ValueError, "ref_logits are on cpu but policy"),
}


# On CUDA a bad label is a device-side assert (no host sync), which leaves the process's CUDA context
# unusable: test_fused_linear.py checks it in a subprocess.
ASSERTED_ON_CUDA = ("label_too_large", "negative_label")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.cpu_only("a device-side assert on CUDA")) if c in ASSERTED_ON_CUDA
             else c for c in CASES],
)  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_loss_rejects(backend, case):
    policy, labels = batch()
    make_args, error, message = CASES[case]
    with pytest.raises(error, match=message):
        fused_dpo_loss(*make_args(policy, torch.randn_like(policy), labels), backend=backend)


@pytest.mark.cuda_only
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_tensors_next_to_cuda_logits_are_named(backend, case):
    policy, labels = batch()
    make_args, error, message = CUDA_CASES[case]
    with pytest.raises(error, match=message):
        fused_dpo_loss(*make_args(policy, torch.randn_like(policy), labels), backend=backend)
    if case == "labels_on_cpu":
        with pytest.raises(error, match="labels are on cpu but logits is on cuda"):
            sequence_logps(policy, labels.cpu(), backend=backend)


@pytest.mark.cuda_only
def test_fused_linear_names_the_cpu_tensor(device):
    from dpo_kernels import fused_linear_dpo_loss

    hidden, weight, bias = torch.randn(4, 5, 8, device=device), torch.randn(123, 8, device=device), torch.zeros(123)
    _, labels = batch()
    cases = {"weight": "weight is on cpu", "bias": "bias is on cpu", "labels": "labels are on cpu"}
    for name, message in cases.items():
        args = dict(policy_hidden=hidden, weight=weight, labels=labels)
        args[name] = bias if name == "bias" else args[name].cpu()
        with pytest.raises(ValueError, match=f"{message} but policy_hidden is on cuda"):
            fused_linear_dpo_loss(**args)


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_beta(beta):
    policy, labels = batch()
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        fused_dpo_loss(policy, None, labels, beta=beta)


def test_unknown_backend_and_environment_override(monkeypatch):
    logits, labels = batch()
    with pytest.raises(ValueError, match="backend must be one of"):
        sequence_logps(logits, labels, backend="cuda")
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="DPO_KERNELS_BACKEND must be one of"):
        sequence_logps(logits, labels)


def test_environment_selects_the_backend(monkeypatch, device):
    from dpo_kernels.ops import native
    from dpo_kernels.triton import logprobs

    logits, labels = batch()
    calls = []
    for module, name in ((logprobs, "triton"), (native, "native")):
        real = module.token_logps_fwd
        counted = lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(module, "token_logps_fwd", counted)
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "triton")
    out = sequence_logps(logits, labels)
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "torch")
    torch.testing.assert_close(sequence_logps(logits, labels), out, rtol=1e-6, atol=1e-6)
    assert calls == ["triton"]
    monkeypatch.delenv("DPO_KERNELS_BACKEND")
    sequence_logps(logits, labels)
    auto = "native" if device.type == "cpu" else "triton"  # "auto": the native C++ kernels on CPU tensors
    assert calls == ["triton", auto]
    sequence_logps(logits, labels, backend="torch")
    assert calls == ["triton", auto]


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    logits, labels = make_batch(4, 5, 123, device="cpu")  # CPU tensors in either mode
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        sequence_logps(logits, labels, backend="triton")


def test_triton_rejects_float64():
    logits, labels = batch()
    with pytest.raises(TypeError, match="float64"):
        sequence_logps(logits.double(), labels, backend="triton")


@pytest.mark.cpu_only("the second call is a device-side assert on CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_check_ignores_the_unscored_first_position(backend):
    """With a shift, labels[:, 0] is never scored, so whatever it holds is not an error."""
    logits, labels = batch()
    labels[:, 0] = 10**6
    sequence_logps(logits, labels, backend=backend)
    with pytest.raises(ValueError, match="labels must lie in"):
        sequence_logps(logits, labels, backend=backend, shift=False)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(process_group="world"), TypeError, "process_group must be a torch.distributed ProcessGroup"),
        (dict(vocab_start=-1), ValueError, "vocab_start must be None or"),
        (dict(vocab_start=1.5), ValueError, "vocab_start must be None or"),
        (dict(vocab_start=0), RuntimeError, "initialized torch.distributed process group"),
    ],
)
def test_vocabulary_parallel_arguments(kwargs, exc, match, device):
    """process_group= / vocab_start= on the public entry points: checked before any collective."""
    from dpo_kernels import fused_linear_dpo_loss

    policy, labels = batch()
    with pytest.raises(exc, match=match):
        sequence_logps(policy, labels, backend="torch", **kwargs)
    with pytest.raises(exc, match=match):
        fused_dpo_loss(policy, None, labels, backend="torch", **kwargs)
    with pytest.raises(exc, match=match):
        hidden, weight = torch.randn(4, 5, 8).to(device), torch.randn(123, 8).to(device)
        fused_linear_dpo_loss(hidden, weight, labels, backend="torch", **kwargs)
