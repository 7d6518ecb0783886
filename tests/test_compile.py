"""torch.library contract: opcheck, torch.compile(fullgraph=True) with gradients, fp64 gradcheck."""

import pytest
import torch

import dpo_kernels  # noqa: F401  (registers the ops)
from conftest import BACKENDS, BACKENDS_TRITON_SLOW, assert_fp32_close, make_batch
from dpo_kernels import fused_dpo_loss, reference, sequence_logps


def op_samples(device):
    logits, labels = make_batch(4, 6, 123)
    yield logits, labels, -100, True
    yield logits.bfloat16(), labels.int(), -100, False
    yield (torch.randn(6, 4, 507) * 3).to(device).transpose(0, 1), make_batch(4, 6, 507)[1], -100, True


@pytest.mark.parametrize("backend", BACKENDS_TRITON_SLOW)
def test_opcheck(backend, device):
    for logits, labels, ignore_index, shift in op_samples(device):
        logits.requires_grad_()
        args = (logits, labels, ignore_index, shift, backend, False, False)
        torch.library.opcheck(torch.ops.dpo_kernels.token_logps.default, args)
        logp, lse, _ = (t.detach() for t in torch.ops.dpo_kernels.token_logps(*args))
        grad = torch.randn_like(logp)
        bwd_args = (grad, logits.detach(), labels, lse, ignore_index, shift, backend)
        torch.library.opcheck(torch.ops.dpo_kernels.token_logps_backward.default, bwd_args)
        bwd_args = (grad, logits.detach().clone(), labels, lse, ignore_index, shift, backend)
        torch.library.opcheck(torch.ops.dpo_kernels.token_logps_backward_.default, bwd_args)


def train_step(policy, ref, labels, backend, average):
    loss, metrics = fused_dpo_loss(policy, ref, labels, beta=0.2, backend=backend, average=average)
    loss.backward()
    return loss.detach(), metrics


@pytest.mark.parametrize("ref_mode", ["logits", "logps", "none"])
@pytest.mark.parametrize("backend", BACKENDS_TRITON_SLOW)
def test_compile_fullgraph_matches_eager(backend, ref_mode, device):
    torch._dynamo.reset()
    policy, labels = make_batch(4, 7, 507)
    ref = {"logits": torch.randn(4, 7, 507), "logps": -torch.rand(4) * 20, "none": None}[ref_mode]
    ref = ref.to(device) if ref is not None else None
    compiled = torch.compile(fused_dpo_loss, fullgraph=True, backend="aot_eager")
    leaf = policy.clone().requires_grad_()
    loss, metrics = compiled(leaf, ref, labels, beta=0.2, backend=backend, average=ref_mode == "logps")
    loss.backward()
    eager_leaf = policy.clone().requires_grad_()
    eager_loss, eager_metrics = reference.dpo_loss(eager_leaf, ref, labels, beta=0.2, average=ref_mode == "logps")
    eager_loss.backward()
    assert_fp32_close(loss, eager_loss)
    for name in eager_metrics:
        assert_fp32_close(metrics[name], eager_metrics[name])
    assert_fp32_close(leaf.grad, eager_leaf.grad)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_inductor_with_lm_head_and_inplace_request(backend, device):
    """A model-like graph through the default inductor backend (C++ code on the CPU, Triton on the GPU);
    the in-place request falls back to a fresh gradient under compile and still gives the eager gradient."""
    torch._dynamo.reset()
    _, labels = make_batch(4, 6, 123)
    hidden, weight = torch.randn(4, 6, 16).to(device), torch.randn(123, 16).to(device)

    def step(h, w):
        logits = h @ w.T
        loss, metrics = fused_dpo_loss(logits, None, labels, backend=backend, inplace_backward=True)
        return loss, metrics["rewards/accuracies"]

    h = hidden.clone().requires_grad_()
    loss, _ = torch.compile(step, fullgraph=True)(h, weight)
    loss.backward()
    h_eager = hidden.clone().requires_grad_()
    eager_loss, _ = step(h_eager, weight)
    eager_loss.backward()
    assert_fp32_close(loss.detach(), eager_loss.detach())
    assert_fp32_close(h.grad, h_eager.grad)


@pytest.mark.parametrize("n, t, v, fast_mode", [(2, 4, 3, False), (4, 5, 11, True)], ids=["full", "fast"])
def test_gradcheck_fp64_torch_backend(n, t, v, fast_mode, device):
    # The full Jacobian (one perturbed forward per input element) on a small batch, and gradcheck's fast mode
    # (random projections of the Jacobian, a wrong gradient still fails it) on a larger one: both with a fully
    # masked sequence and a prompt prefix. The full check of the larger batch took most of a minute.
    logits, labels = make_batch(n, t, v, dtype=torch.float64, scale=1.0)
    labels[n - 1] = -100
    logits.requires_grad_()
    ref = torch.randn(n, t, v, dtype=torch.float64).to(device)

    def fn(x):
        return sequence_logps(x, labels, backend="torch"), sequence_logps(x, labels, backend="torch", average=True)

    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=fast_mode)
    loss = lambda x: fused_dpo_loss(x, ref, labels, backend="torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(loss, (logits,), fast_mode=fast_mode)
