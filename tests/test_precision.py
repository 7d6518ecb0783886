"""Precision at large logits: every backend as close to fp64 as the fp32 reference.

N(0, σ²) fp32 logits with V = 8193 at σ ∈ {1, 30, 300} (σ = 30 is typical of LM logits): the kernels'
per-token log-probs and gradient are held to kernel error ≤ 2 × the fp32 reference's own error + 1e-7,
both errors measured from the fp64 reference on the same fp32 inputs. Forming the softmax as
exp(z − fl(m + log s)) from one rounded fp32 lse fails this at σ ≥ 30 (the rounding of lse is
|lse|·2^-24: 6e-5 relative at σ = 300, against the reference's exp((z − m) − log s)).
"""

import pytest
import torch

from conftest import BACKENDS
from dpo_kernels import reference, sequence_logps
from dpo_kernels.ops import native

V = 8193


def errors(backend, sigma, device):
    torch.manual_seed(int(sigma))
    logits = (torch.randn(2, 4, V) * sigma).to(device)
    labels = torch.randint(0, V, (2, 4), device=device)
    labels[0, 1] = -100
    # Labels at the row max too: there p ≈ 1 and the gradient is largest.
    labels[1, 1:] = logits[1, :-1].argmax(-1)
    upstream = torch.randn(2, device=device)

    def run(fn, x):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, labels)
        (grad,) = torch.autograd.grad(out, leaf, upstream.to(out.dtype)[:, None].expand_as(out))
        return out.detach().double(), grad.double()

    def kernel(x, y):
        return torch.ops.dpo_kernels.token_logps(x, y, -100, True, backend, False, False)[0]

    truth = run(reference.token_logps, logits.double())
    ref = run(reference.token_logps, logits)
    got = run(kernel, logits)
    err = [(g - t).abs().max().item() for g, t in zip(got, truth)]
    ref_err = [(r - t).abs().max().item() for r, t in zip(ref, truth)]
    return err, ref_err


@pytest.mark.parametrize("sigma", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_and_gradient_as_close_to_fp64_as_the_fp32_reference(backend, sigma, device):
    if backend == "native" and not native.has_kernel(device.type):
        pytest.skip(f"dpo_kernels._C has no {device.type} kernels")
    (logp_err, grad_err), (ref_logp_err, ref_grad_err) = errors(backend, sigma, device)
    assert logp_err <= 2 * ref_logp_err + 1e-7, ("log-probs", logp_err, ref_logp_err)
    assert grad_err <= 2 * ref_grad_err + 1e-7, ("gradient", grad_err, ref_grad_err)


def test_the_sequence_sum_keeps_that_precision(device):
    """sequence_logps (the per-sequence sum the losses use) on the default backend at σ = 300."""
    torch.manual_seed(5)
    logits = (torch.randn(3, 4, V) * 300).to(device)
    labels = torch.randint(0, V, (3, 4), device=device)
    out = sequence_logps(logits, labels)
    truth = reference.sequence_logps(logits.double(), labels)
    ref = reference.sequence_logps(logits, labels)
    assert (out.double() - truth).abs().max() <= 2 * (ref.double() - truth).abs().max() + 1e-7
