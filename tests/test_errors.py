"""Bad input: a clear ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

from conftest import BACKENDS, make_batch
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
    "labels_on_meta": (lambda p, r, y: (p, r, y.to("meta")), ValueError, "labels are on meta but policy_logits is on cpu"),
    "ref_on_meta": (lambda p, r, y: (p, r.to("meta"), y), ValueError, "ref_logits are on meta but policy_logits is on cpu"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_loss_rejects(backend, case):
    policy, labels = batch()
    make_args, error, message = CASES[case]
    with pytest.raises(error, match=message):
        fused_dpo_loss(*make_args(policy, torch.randn_like(policy), labels), backend=backend)


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


def test_environment_selects_the_backend(monkeypatch):
    from dpo_kernels import native
    from dpo_kernels.triton import logprobs

    logits, labels = batch()
    calls = []
    for module, name in ((logprobs, "triton"), (native, "native")):
        real = module.token_logps_fwd
        monkeypatch.setattr(module, "token_logps_fwd", lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "triton")
    out = sequence_logps(logits, labels)
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "torch")
    torch.testing.assert_close(sequence_logps(logits, labels), out, rtol=1e-6, atol=1e-6)
    assert calls == ["triton"]
    monkeypatch.delenv("DPO_KERNELS_BACKEND")
    sequence_logps(logits, labels)
    assert calls == ["triton", "native"]  # "auto" on CPU tensors: the native C++ kernels
    sequence_logps(logits, labels, backend="torch")
    assert calls == ["triton", "native"]


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    logits, labels = batch()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        sequence_logps(logits, labels, backend="triton")


def test_triton_rejects_float64():
    logits, labels = batch()
    with pytest.raises(TypeError, match="float64"):
        sequence_logps(logits.double(), labels, backend="triton")


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
def test_vocabulary_parallel_arguments(kwargs, exc, match):
    """process_group= / vocab_start= on the public entry points: checked before any collective."""
    from dpo_kernels import fused_linear_dpo_loss

    policy, labels = batch()
    with pytest.raises(exc, match=match):
        sequence_logps(policy, labels, backend="torch", **kwargs)
    with pytest.raises(exc, match=match):
        fused_dpo_loss(policy, None, labels, backend="torch", **kwargs)
    with pytest.raises(exc, match=match):
        fused_linear_dpo_loss(torch.randn(4, 5, 8), torch.randn(123, 8), labels, backend="torch", **kwargs)
