"""Special values on every backend of the logits path and in the portable fused LM head: what the reference
gives. NaN anywhere in a scored row, or +inf, gives a NaN log-prob and a NaN gradient row; an all -inf row
gives NaN; a NaN in a pair makes the DPO loss NaN; unscored rows stay exact zeros whatever their logits
hold. The per-token statistics follow reference.token_stats (its argmax ranks NaN first; its lse2 is NaN
with a NaN, else +inf with a +inf), except where a finite row has -inf logits: there the reference's
entropy is 0 · -inf = NaN and the kernels take 0 log 0 = 0 (tests/test_stats.py holds that case).
"""

import math

import pytest
import torch

from conftest import BACKENDS, DTYPES
from dpo_kernels import fused_dpo_loss, reference, sequence_logps
from dpo_kernels.ops import native
from dpo_kernels.fused_linear import fused_linear_sequence_logps

NAN, INF = math.nan, math.inf
SUM, ENTROPY, TOP1, LSE2 = range(4)


def need(backend, device):
    if backend == "native" and not native.has_kernel(device.type):
        pytest.skip(f"dpo_kernels._C has no {device.type} kernels")


def special_batch(v, dtype, device):
    """(N, T, V) logits whose scored rows hold every special case, at the label and away from it, at the
    first, the last and a middle column (V > 4096 puts some past the first tile of every backend);
    row t of sequence n is scored by labels[n, t + 1]."""
    torch.manual_seed(1)
    x = torch.randn(3, 7, v) * 3
    labels = torch.randint(0, v, (3, 7))
    far = v - 1
    mid = v // 2
    cases = [
        (0, 0, lambda r: r.__setitem__(mid, NAN), mid),  # NaN at the label
        (0, 1, lambda r: r.__setitem__(far, NAN), 0),  # NaN away from it, the label before it
        (0, 2, lambda r: r.__setitem__(0, INF), far),  # +inf away from the label
        (0, 3, lambda r: r.__setitem__(mid, INF), mid),  # +inf at the label
        (0, 4, lambda r: r.fill_(-INF), 0),  # all -inf, label 0 (the reference's top-1 is index 0)
        (0, 5, lambda r: r.fill_(-INF), mid),  # all -inf
        (1, 0, lambda r: (r.__setitem__(1, NAN), r.__setitem__(far, NAN)), far),  # two NaN, label the later
        (1, 1, lambda r: (r.__setitem__(0, INF), r.__setitem__(far, NAN)), 0),  # +inf then NaN
        (1, 2, lambda r: (r.__setitem__(1, -INF), r.__setitem__(mid, INF)), mid),  # -inf and +inf
        (1, 3, lambda r: (r.__setitem__(2, INF), r.__setitem__(far, INF)), far),  # two +inf, label the later
        (1, 4, lambda r: r.fill_(INF), 0),  # all +inf
        (1, 5, lambda r: r.fill_(NAN), mid),  # all NaN
    ]
    for n, t, fill, label in cases:
        fill(x[n, t])
        labels[n, t + 1] = label
    # Unscored rows full of special values: a masked prompt row, and the last row (no next label).
    labels[2, 1] = -100
    x[2, 0, :] = NAN
    x[2, 6, :3] = torch.tensor([NAN, INF, -INF])
    x[0, 6, :] = INF
    return x.to(dtype).to(device), labels.to(device)


def grads(fn, x, labels, upstream, **kw):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf, labels, **kw)
    out.backward(upstream)
    return out.detach(), leaf.grad


def assert_same(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, equal_nan=True, **kw)


# V = 5000: past the first tile of every backend, and every special case at the first, middle and last column.
# Special values in vocabularies of one tile (V up to 300 and next to the block sizes) are among
# tests/test_differential.py's seeded cases, on every backend and dtype against fp64.
@pytest.mark.parametrize("v", [5000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logps_and_gradient_follow_the_reference(backend, dtype, v, device):
    need(backend, device)
    x, labels = special_batch(v, dtype, device)
    up = torch.randn(3, device=device)
    out, grad = grads(lambda a, y: reference.token_logps(a, y), x, labels, up[:, None].expand(3, 6))
    # Per token, then per sequence: a NaN token makes its sequence NaN.
    tok, _, _ = torch.ops.dpo_kernels.token_logps(x, labels, -100, True, backend, False, False)
    nonfinite = ~out.isfinite()
    assert torch.equal(tok.isnan(), out.isnan()) and tok[nonfinite].isnan().all(), (tok, out)
    assert_same(tok[~nonfinite], out[~nonfinite], rtol=1e-5, atol=1e-5)
    seq, kernel_grad = grads(lambda a, y: sequence_logps(a, y, backend=backend), x, labels, up)
    ref_seq, ref_grad = grads(reference.sequence_logps, x, labels, up)
    assert seq[:2].isnan().all() and torch.isfinite(seq[2])
    assert_same(seq, ref_seq, rtol=1e-5, atol=1e-5)
    # The gradient of scored rows: NaN exactly where the reference has NaN (whole rows), the same numbers
    # elsewhere. Unscored rows (the masked row 2, 0 and each sequence's last row) are exact zeros although
    # their logits are special, where the reference's log_softmax backward forms 0 - NaN · 0 = NaN.
    scored = torch.zeros(3, 7, dtype=torch.bool, device=device)
    scored[:, :6] = labels[:, 1:] != -100
    assert torch.equal(kernel_grad[scored].isnan(), ref_grad[scored].isnan())
    assert kernel_grad[:2, :6].isnan().all()
    assert (kernel_grad[~scored] == 0).all() and not scored[2, 0] and not scored[:, 6].any()
    atol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert_same(kernel_grad[scored].float(), ref_grad[scored].float(), rtol=0, atol=atol)


@pytest.mark.parametrize("v", [37, 5000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_follow_the_reference(backend, v, device):
    need(backend, device)
    x, labels = special_batch(v, torch.float32, device)
    _, lse, stats = torch.ops.dpo_kernels.token_logps(x, labels, -100, True, backend, False, True)
    expected = reference.token_stats(x, labels)
    # A finite row with -inf logits (1, 2) has the reference's 0 · -inf entropy; every other special row's
    # entropy is NaN in both.
    expected[1, 2, ENTROPY] = NAN
    special = ~x[:, :6].isfinite().all(-1) & (labels[:, 1:] != -100)
    assert_same(stats[special], expected[special], rtol=0, atol=0)
    assert_same(stats[~special], expected[~special], rtol=1e-5, atol=1e-4)
    assert (stats[labels[:, 1:] == -100] == 0).all() and (lse[labels[:, 1:] == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_a_pair_makes_the_dpo_loss_nan(backend, device):
    need(backend, device)
    torch.manual_seed(2)
    policy = torch.randn(4, 6, 53, device=device)
    ref = torch.randn(4, 6, 53, device=device)
    labels = torch.randint(0, 53, (4, 6), device=device)
    labels[:, :2] = -100
    for where, value in (((0, 3, 7), NAN), ((3, 4, 0), INF), ((1, 2), -INF)):
        bad = policy.clone()
        bad[where] = value
        for pol, rf in ((bad, ref), (policy, bad)):  # in the policy, then in the reference logits
            loss, metrics = fused_dpo_loss(pol.clone().requires_grad_(), rf, labels, backend=backend)
            ref_loss, ref_metrics = reference.dpo_loss(pol, rf, labels)
            assert loss.isnan() and ref_loss.isnan(), (where, value, loss, ref_loss)
            for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
                assert_same(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5)
    # A masked token's special logits change nothing.
    masked = policy.clone()
    masked[0, 0] = NAN  # row 0 is scored by label 1: masked
    loss, _ = fused_dpo_loss(masked, ref, labels, backend=backend)
    assert_same(loss, reference.dpo_loss(policy, ref, labels)[0], rtol=1e-5, atol=1e-6)


def lm_head_case(kind, device):
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, 16, device=device)
    weight = torch.randn(41, 16, device=device) * 0.3
    bias = torch.randn(41, device=device) * 0.1
    labels = torch.randint(0, 41, (2, 6), device=device)
    labels[:, :2] = -100
    if kind == "nan_hidden":
        hidden[0, 3, 5] = NAN
    elif kind == "inf_hidden":
        hidden[1, 2, 0] = INF
    elif kind == "inf_weight":
        weight[7, 3] = INF
    elif kind == "neg_inf_weight_row":
        weight[9] = 0.0
        weight[9, 0] = -INF  # a whole logits column at ±inf (sign of hidden[..., 0])
    elif kind == "nan_weight":
        weight[4, 4] = NAN
    elif kind == "inf_bias":
        bias[5] = INF
    elif kind == "neg_inf_bias":
        bias[:20] = -INF  # banned tokens: finite rows, a whole -inf stretch of the vocabulary
        labels[labels >= 0] = labels[labels >= 0].clamp(min=20)
    elif kind == "all_neg_inf_bias":
        bias[:] = -INF
    elif kind == "nan_bias":
        bias[40] = NAN
    # A masked row holding NaN in hidden stays out of every result.
    hidden[1, 0] = NAN
    return hidden, weight, bias, labels


LM_HEAD_CASES = ["nan_hidden", "inf_hidden", "inf_weight", "neg_inf_weight_row", "nan_weight", "inf_bias",
                 "neg_inf_bias", "all_neg_inf_bias", "nan_bias"]  # fmt: skip


@pytest.mark.parametrize("kind", LM_HEAD_CASES)
def test_portable_fused_lm_head_follows_the_reference(kind, device):
    hidden, weight, bias, labels = lm_head_case(kind, device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_sequence_logps(leaves[0], leaves[1], labels, leaves[2], backend="torch")
    # The reference on the same inputs but the masked row's NaN hidden state, which its log_softmax
    # backward would spread over every weight gradient (0 - NaN · 0); the fused head never reads it.
    clean = hidden.clone()
    clean[1, 0] = 0.0
    ref_leaves = [t.clone().requires_grad_() for t in (clean, weight, bias)]
    ref = reference.sequence_logps(reference.lm_head_logits(*ref_leaves), labels)
    assert_same(out, ref, rtol=1e-5, atol=1e-5)
    assert_same(out, reference.sequence_logps(reference.lm_head_logits(hidden, weight, bias), labels))
    upstream = torch.tensor([1.0, -0.5], device=device)
    out.backward(upstream)
    ref.backward(upstream)
    # Unscored rows (the masked prompt, each last row) get exact zero d_hidden; the reference's are NaN
    # wherever their logits are (0 - NaN · 0), so the hidden gradients are compared on scored rows.
    scored = torch.zeros(2, 6, dtype=torch.bool, device=device)
    scored[:, :-1] = labels[:, 1:] != -100
    assert (leaves[0].grad[~scored] == 0).all()
    pairs = [(leaves[0].grad[scored], ref_leaves[0].grad[scored])]
    pairs += [(got.grad, want.grad) for got, want in zip(leaves[1:], ref_leaves[1:])]
    for got, want in pairs:
        assert torch.equal(got.isnan(), want.isnan()), (kind, got, want)
        assert_same(got, want, rtol=1e-4, atol=1e-5)


def test_portable_fused_lm_head_minus_inf_tiles_stay_finite(device):
    """A vocabulary chunk entirely at -inf (banned by the bias) before any finite logit: the online
    log-sum-exp must not form -inf - (-inf)."""
    torch.manual_seed(4)
    hidden = torch.randn(1, 5, 8, device=device)
    weight = torch.randn(64, 8, device=device)
    bias = torch.zeros(64, device=device)
    bias[:48] = -INF
    labels = torch.randint(48, 64, (1, 5), device=device)
    out = fused_linear_sequence_logps(hidden, weight, labels, bias, backend="torch", memory_budget=4 * 16)
    ref = reference.sequence_logps(reference.lm_head_logits(hidden, weight, bias), labels)
    assert out.isfinite().all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
