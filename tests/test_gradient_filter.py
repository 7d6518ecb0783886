"""The public gradient filter (``gradient_filter=None | "auto" | float``) of the fused LM head: its
validation, the "auto" threshold, its plumbing to the Triton backward through both custom ops and the
vocabulary-parallel path, and the exact gradients (with one warning) of the backends without tiles to skip.
The kernels' filtered products themselves are tested in test_triton_linear.py."""

import warnings

import pytest
import torch

from conftest import make_batch
from dpo_kernels import fused_linear_dpo_loss, fused_linear_sequence_logps, tokens
from dpo_kernels._validation import gradient_filter_eps
from dpo_kernels.triton import linear as triton_linear


def inputs(device, dtype=torch.float32, n=4, t=6, h=16, v=70):
    hidden = torch.randn(n, t, h).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h) / h**0.5 * 3).to(dtype).to(device).requires_grad_()
    _, labels = make_batch(n, t, v, device=device)
    return hidden, weight, labels


def test_auto_is_eps_over_32_of_the_inputs_dtype():
    assert gradient_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert gradient_filter_eps("auto", torch.float16) == 2.0**-15
    assert gradient_filter_eps("auto", torch.float32) == torch.finfo(torch.float32).eps / 32
    assert gradient_filter_eps(None, torch.bfloat16) == 0.0 and gradient_filter_eps(1e-4, torch.float32) == 1e-4


@pytest.mark.parametrize("bad", ["high", -1e-3, 1.0, float("nan"), True, [1e-3]], ids=repr)
def test_bad_values_raise_naming_the_argument(bad, device):
    hidden, weight, labels = inputs(device)
    with pytest.raises(ValueError, match="gradient_filter"):
        fused_linear_sequence_logps(hidden, weight, labels, gradient_filter=bad)
    with pytest.raises(ValueError, match="gradient_filter"):
        fused_linear_dpo_loss(hidden, weight, labels, gradient_filter=bad)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_backends_without_tiles_compute_exact_gradients_and_warn_once(backend, device, monkeypatch):
    from dpo_kernels.ops import native

    if backend == "native" and not native.has_kernel(device.type):
        pytest.skip("native kernels not built for this device")
    monkeypatch.setattr(tokens, "_FILTER_WARNED", [])
    hidden, weight, labels = inputs(device)
    grads = []
    for setting in (None, "auto", 1e-2):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused_linear_sequence_logps(h, w, labels, backend=backend, gradient_filter=setting).sum().backward()
        grads.append((h.grad, w.grad, [str(c.message) for c in caught if "gradient_filter" in str(c.message)]))
    assert grads[0][2] == [] and len(grads[1][2]) == 1 and grads[2][2] == []  # once, at the first filtered call
    assert "Triton backend only" in grads[1][2][0]
    for h_grad, w_grad, _ in grads[1:]:
        assert torch.equal(h_grad, grads[0][0]) and torch.equal(w_grad, grads[0][1])


def test_triton_backend_gets_the_threshold_in_the_backward_only(device, monkeypatch):
    """"auto" on bf16 reaches the Triton backward as filter_eps = 2^-12 through both ops (and the loss);
    off, the backward gets no filter_eps at all (the dense path); the forward never sees one."""
    seen = []
    real = triton_linear.fused_linear_logps_bwd

    def spy(*args, **kwargs):
        seen.append(kwargs.get("filter_eps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_linear, "fused_linear_logps_bwd", spy)
    hidden, weight, labels = inputs(device, torch.bfloat16)
    fused_linear_sequence_logps(hidden, weight, labels, backend="triton", gradient_filter="auto").sum().backward()
    fused_linear_sequence_logps(hidden, weight, labels, backend="triton").sum().backward()
    loss, _ = fused_linear_dpo_loss(hidden, weight, labels, backend="triton", gradient_filter=1e-3, ref_hidden=hidden)
    loss.backward()
    assert seen == [2.0**-12, None, 1e-3]


def test_opcheck_with_a_filter(device):
    hidden, weight, labels = inputs(device, n=2, t=5, v=40)
    args = (hidden, weight, None, labels, -100, True, 1.0, None, 1.0, 0, "torch", False, 1e-3)
    torch.library.opcheck(torch.ops.dpo_kernels.fused_linear_token_logps.default, args)
