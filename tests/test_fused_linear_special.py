"""Special values on the Triton fused LM head: -inf vocabulary splits and inf / NaN inputs.

The truth is ``reference.sequence_logps(reference.lm_head_logits(...))`` (and its autograd gradients)
on the same inputs: NaN where it gives NaN, the same finite numbers where it is finite. The online
log-sum-exp runs per vocabulary split and the splits are merged afterwards; a split (or a tile) whose
logits are all -inf (here: -inf bias entries, a masked vocabulary) must add nothing, not NaN. The
interpreter launchers pick one split and the GPU ones several, so the tests force the split count.
"""

import math

import pytest
import torch

from conftest import assert_fp32_close
from dpo_kernels import fused_linear_sequence_logps, reference
from dpo_kernels.triton.linear import LinearConfig, fused_linear_logps_bwd, fused_linear_logps_fwd

SMALL = LinearConfig(BLOCK_M=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=1)
INF, NAN = math.inf, math.nan


def head(M, H, V, device, bias=True):
    hidden = torch.randn(M, H, device=device)
    weight = torch.randn(V, H, device=device) / H**0.5 * 3
    b = torch.randn(V, device=device) if bias else None
    return hidden, weight, b


def reference_rows(hidden, weight, bias, labels, grad=None, **transform):
    """(logp, d_hidden, d_weight, d_bias) of the fp32 reference for rows (M, H) -> (M,)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    z = reference.lm_head_logits(*leaves, **transform)
    logp = reference.token_logps(z[None], labels[None], shift=False)[0]
    if grad is None:
        return (logp.detach(),)
    logp.backward(grad)
    return (logp.detach(), *(t.grad if t is not None else None for t in leaves))


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_masked_vocabulary_splits(device, splits, softcap):
    """-inf bias over the first half of V and a stretch in the middle: with 4 splits of 3 tiles, whole
    splits and tiles hold nothing but -inf. Values and gradients as the reference, finite."""
    M, H, V = 21, 24, 384
    hidden, weight, b = head(M, H, V, device)
    b[: V // 2] = -INF
    b[V // 2 + 40 : V // 2 + 100] = -INF
    labels = torch.randint(V // 2, V // 2 + 40, (M,), device=device)
    grad = torch.randn(M, device=device)
    transform = dict(logit_scale=1.0, softcap=softcap, temperature=1.0)
    logp, lse, _ = fused_linear_logps_fwd(hidden, weight, b, labels, **transform, splits=splits, config=SMALL)
    chunk = dict(chunk_elements=M * 32) if splits > 1 else {}  # dz chunks of one 32-column tile (fp32)
    grads = fused_linear_logps_bwd(grad, hidden, weight, b, labels, lse, **transform, config=SMALL, **chunk)
    expected = reference_rows(hidden, weight, b, labels, grad, **transform)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    if softcap is None:  # the softcap maps -inf to -softcap: finite logits, nothing masked
        assert_fp32_close(logp, expected[0])
    else:
        torch.testing.assert_close(logp, expected[0], rtol=1e-5, atol=1e-5)
    for actual, ref in zip(grads, expected[1:]):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, ref, rtol=1e-5, atol=1e-5)
    if softcap is None:
        assert (grads[1][: V // 2] == 0).all() and (grads[2][: V // 2] == 0).all()  # masked rows of W: exact 0


@pytest.mark.parametrize("splits", [1, 4])
def test_all_masked_row_is_nan(device, splits):
    """A row whose logits are all -inf: the reference's log_softmax is NaN there, and so is the kernel's."""
    M, H, V = 5, 16, 256
    hidden, weight, b = head(M, H, V, device)
    b[:] = -INF
    labels = torch.randint(0, V, (M,), device=device)
    logp, lse, _ = fused_linear_logps_fwd(hidden, weight, b, labels, splits=splits, config=SMALL)
    assert torch.isnan(reference_rows(hidden, weight, b, labels)[0]).all()
    assert torch.isnan(logp).all() and (lse == -INF).all()


def special_cases(M, H, V):
    """name -> (tensor to poison, index, value): one special value per case."""
    return {
        "hidden_nan": ("hidden", (3, 5), NAN),
        "hidden_inf": ("hidden", (3, 5), INF),
        "hidden_-inf": ("hidden", (7, 0), -INF),
        "weight_nan": ("weight", (100, 2), NAN),
        "weight_inf": ("weight", (100, 2), INF),
        "weight_-inf": ("weight", (V - 1, H - 1), -INF),
        "bias_nan": ("bias", (17,), NAN),
        "bias_inf": ("bias", (17,), INF),
        "bias_-inf": ("bias", (17,), -INF),
    }


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", list(special_cases(11, 16, 160)))
def test_special_values_match_reference(device, case, splits):
    """inf / NaN in hidden, weight or bias: NaN exactly where the reference is NaN (and -inf / +inf where it
    is), the reference's finite values elsewhere; kernels directly and through the public op."""
    M, H, V = 11, 16, 160
    hidden, weight, b = head(M, H, V, device)
    name, index, value = special_cases(M, H, V)[case]
    {"hidden": hidden, "weight": weight, "bias": b}[name][index] = value
    labels = torch.randint(0, V, (M,), device=device)
    labels[0] = 17  # the poisoned bias column is some row's label
    expected = reference_rows(hidden, weight, b, labels)[0]
    logp, _, _ = fused_linear_logps_fwd(hidden, weight, b, labels, splits=splits, config=SMALL)
    assert torch.equal(torch.isnan(logp), torch.isnan(expected)), (logp, expected)
    assert torch.isnan(expected).any() or torch.isinf(expected).any() or case == "bias_-inf"
    finite = torch.isfinite(expected)
    assert torch.equal(logp[~finite].nan_to_num(), expected[~finite].nan_to_num())  # same inf signs
    torch.testing.assert_close(logp[finite], expected[finite], rtol=1e-5, atol=1e-5)

    # the public op: sequences of the rows, with a prompt token that is not scored
    labels2 = torch.cat([torch.full((M, 1), -100, device=device), labels[:, None]], dim=1)
    hidden2 = torch.stack([hidden, torch.zeros_like(hidden)], dim=1)
    seq = fused_linear_sequence_logps(hidden2, weight, labels2, b, backend="triton")
    torch.testing.assert_close(seq, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
