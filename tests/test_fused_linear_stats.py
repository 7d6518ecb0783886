"""Per-token statistics from the fused LM head's forward pass (``with_stats``) against
``reference.token_stats(reference.lm_head_logits(...))``: both backends, the logit transform, ragged
tiles, vocabulary chunks (portable) and vocabulary splits (Triton), exact ties, masking, the op contract.

Tolerances. fp32 inputs: the kernels and the reference form the same fp32 logits up to the summation
order of the matmul (BLOCK_H slices or BLAS blocking), a few fp32 ulps of Σ_k |h_k·w_k| ≲ 20 here, so
every logit z agrees to ~1e-5 absolute; the statistics are then sums (Σ z: order-dependent, the error
grows with Σ_v |z_v|, hence the relative term), a softmax-weighted mean and two log-sum-exps, all
1-Lipschitz in max |δz| (ATOL 1e-4 holds with margin and still catches a mask or indexing error,
which is O(1)). bf16 inputs, Triton: the reference takes the same bf16 values upcast to fp32; bf16 ×
bf16 products are exact in fp32, so both sides again differ only by fp32 summation order: same
tolerance. bf16 inputs, portable: its matmul runs in bf16 and rounds the product to bf16 (as the naive
``hidden @ weight.T`` does), the rest in fp32; the reference rounds the product the same way.
top1 is compared exactly; the inputs are checked to hold no near-tie (top-2 gap < 1e-4) other than
the exact duplicates the tie tests build on purpose, whose logits are exact (dyadic) in any order.
"""

import pytest
import torch

from conftest import make_batch
from dpo_kernels import reference
from dpo_kernels.portable import linear as portable_linear
from dpo_kernels.triton import linear as triton_linear
from dpo_kernels.triton.linear import LinearConfig

BACKENDS = ["torch", "triton"]
RTOL, ATOL = 1e-5, 1e-4
SMALL = LinearConfig(BLOCK_M=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=2)
TRANSFORMS = {  # softcaps that do not flatten the top of the distribution into near-ties
    "plain": dict(),
    "softcap": dict(softcap=10.0),
    "scale_temperature": dict(logit_scale=0.7, temperature=1.3),
    "all": dict(softcap=10.0, logit_scale=1.5, temperature=0.8),
}
# Top-2 gaps below this count as near-ties: above the worst-case rounding of a logit, H · eps32 ·
# Σ_k |h_k·w_k| ≈ 40 · 6e-8 · 20 ≈ 5e-5 (the typical error is ~1e-6).
NEAR_TIE = 1e-4


def op(hidden, weight, bias, labels, *, shift=True, logit_scale=1.0, softcap=None, temperature=1.0,
       chunk_elements=0, backend="torch", with_stats=True):  # fmt: skip
    return torch.ops.dpo_kernels.fused_linear_token_logps(
        hidden, weight, bias, labels, -100, shift, float(logit_scale), softcap, float(temperature),
        chunk_elements, backend, with_stats,
    )  # fmt: skip


def lm_head(n, t, h, v, dtype, bias, device):
    hidden = torch.randn(n, t, h).to(dtype).to(device)
    weight = (torch.randn(v, h) / h**0.5 * 3).to(dtype).to(device)
    return hidden, weight, (torch.randn(v) * 0.5).to(dtype).to(device) if bias else None


def reference_stats(hidden, weight, bias, labels, shift=True, round_product=False, **transform):
    """token_stats of the logits of the same input values in fp32 (fp64 for fp64 inputs); with
    ``round_product`` the product ``hidden @ weight.T`` is rounded to the inputs' dtype first."""
    up = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    b = bias.to(up) if bias is not None else None
    if round_product:
        product = (hidden @ weight.T).to(up)
        eye = torch.eye(product.shape[-1], dtype=up, device=product.device)  # lm_head_logits' transform of products
        z = reference.lm_head_logits(product, eye, b, **transform)
    else:
        z = reference.lm_head_logits(hidden.to(up), weight.to(up), b, **transform)
    return reference.token_stats(z, labels, shift=shift), z


def label_argmax(labels, z, shift=True, share=0.5):
    """Labels of which about ``share`` of the scored tokens are the argmax (so top1 is not all zeros)."""
    target = z[:, :-1].argmax(-1) if shift else z.argmax(-1)
    y = labels[:, int(shift) :]
    pick = (torch.rand(y.shape) < share).to(y.device) & (y != -100)
    y.copy_(torch.where(pick, target, y))
    return labels


def assert_no_near_ties(z, labels, shift=True):
    """Every scored token's top-2 logits differ by more than rounding could move them."""
    zz, y = (z[:, :-1], labels[:, 1:]) if shift else (z, labels)
    top2 = zz[y != -100].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > NEAR_TIE


def check(stats, expected):
    assert stats.shape == expected.shape and stats.dtype == expected.dtype
    torch.testing.assert_close(stats[..., [0, 1, 3]], expected[..., [0, 1, 3]], rtol=RTOL, atol=ATOL)
    assert torch.equal(stats[..., 2], expected[..., 2])  # top1: exact


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, bias, transform, device):
    """H = 40 and V = 123 are multiples of no block size; sequence 3 is all masked."""
    n, t, h, v = 4, 6, 40, 123
    hidden, weight, b = lm_head(n, t, h, v, dtype, bias, device)
    _, labels = make_batch(n, t, v)
    labels[3] = -100
    kw = TRANSFORMS[transform]
    _, z = reference_stats(hidden, weight, b, labels, **kw)
    labels = label_argmax(labels, z)
    assert_no_near_ties(z, labels)
    rounded = backend == "torch" and dtype == torch.bfloat16
    expected, _ = reference_stats(hidden, weight, b, labels, round_product=rounded, **kw)
    logp, lse, stats = op(hidden, weight, b, labels, backend=backend, **kw)
    check(stats, expected)
    assert (stats[3] == 0).all() and stats[..., 2].sum() > 0
    # with_stats=False: an empty stats tensor, the same log-probs
    logp0, lse0, stats0 = op(hidden, weight, b, labels, backend=backend, with_stats=False, **kw)
    assert stats0.shape == (n, t - 1, 0) and stats0.dtype == logp0.dtype
    assert torch.equal(logp, logp0) and torch.equal(lse, lse0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_shift(backend, device):
    hidden, weight, b = lm_head(3, 5, 24, 77, torch.float32, True, device)
    _, labels = make_batch(3, 5, 77)
    _, z = reference_stats(hidden, weight, b, labels, shift=False, softcap=6.0)
    labels = label_argmax(labels, z, shift=False)
    assert_no_near_ties(z, labels, shift=False)
    expected, _ = reference_stats(hidden, weight, b, labels, shift=False, softcap=6.0)
    _, _, stats = op(hidden, weight, b, labels, shift=False, softcap=6.0, backend=backend)
    assert stats.shape == (3, 5, 4)
    check(stats, expected)


def test_portable_fp64_and_vocabulary_chunks(monkeypatch, device):
    """Chunks of at most 50 vocabulary columns and 7 rows: every statistic is folded across chunks."""
    monkeypatch.setattr(portable_linear, "MAX_VOCAB_CHUNK", 50)
    for dtype in (torch.float64, torch.float32):
        hidden, weight, b = lm_head(3, 9, 24, 307, dtype, True, device)
        _, labels = make_batch(3, 9, 307)
        _, z = reference_stats(hidden, weight, b, labels, logit_scale=1.5, softcap=6.0)
        labels = label_argmax(labels, z)
        assert_no_near_ties(z, labels)
        expected, _ = reference_stats(hidden, weight, b, labels, logit_scale=1.5, softcap=6.0)
        _, _, stats = op(hidden, weight, b, labels, logit_scale=1.5, softcap=6.0, chunk_elements=7 * 50)
        if dtype == torch.float64:
            assert stats.dtype == torch.float64
            torch.testing.assert_close(stats, expected, rtol=1e-12, atol=1e-12)
        else:
            check(stats, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_vocabulary_splits(dtype, device):
    """Small blocks over M = 37, H = 40, V = 300 (10 V tiles, the last one ragged) in 1, 3 and 5
    vocabulary splits: the merge kernel combines every statistic across splits."""
    M, H, V = 37, 40, 300
    hidden = torch.randn(M, H).to(dtype).to(device)
    weight = (torch.randn(V, H) / H**0.5 * 3).to(dtype).to(device)
    b = torch.randn(V).to(dtype).to(device)
    z = reference.lm_head_logits(hidden.float(), weight.float(), b.float(), softcap=5.0, temperature=0.9)
    labels = torch.where((torch.rand(M) < 0.5).to(device), z.argmax(-1), torch.randint(0, V, (M,)).to(device))
    top2 = z.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > NEAR_TIE
    expected = reference.token_stats(z[None], labels[None], shift=False)[0]
    for splits in (1, 3, 5):
        logp, lse, stats = triton_linear.fused_linear_logps_fwd(
            hidden, weight, b, labels, softcap=5.0, temperature=0.9, splits=splits, config=SMALL, with_stats=True
        )
        assert stats.shape == (M, 4) and stats.dtype == torch.float32
        check(stats, expected)
        logp0, lse0, none = triton_linear.fused_linear_logps_fwd(
            hidden, weight, b, labels, softcap=5.0, temperature=0.9, splits=splits, config=SMALL
        )
        assert none is None and torch.equal(logp, logp0) and torch.equal(lse, lse0)


# ------------------------------------------------------------------------------------------------- ties


def tied_head(H, V, pairs, anchor=64.0):
    """Dyadic hidden / weight / bias (every logit exact in fp32 and bf16, whatever the summation order)
    with pair p's two weight rows identical and the row maximum, by a margin, in rows whose hidden
    state carries anchor coordinate p: h[p] = 1 and W[j, p] = anchor for j in pair p, 0 elsewhere."""
    weight = torch.randint(-4, 5, (V, H)).double() / 8
    weight[:, : len(pairs)] = 0.0
    bias = torch.randint(-4, 5, (V,)).double() / 8
    for p, (j1, j2) in enumerate(pairs):
        weight[j1, p] = anchor
        weight[j2] = weight[j1]
        bias[j2] = bias[j1]
    return weight, bias


def tied_rows(M, H, pairs, tied_labels_only=False):
    """Hidden rows cycling through the pairs; labels cycling through (first tied, second tied, other)."""
    hidden = torch.randint(-4, 5, (M, H)).double() / 4
    hidden[:, : len(pairs)] = 0.0
    others = [j for j in range(1, 100) if all(j not in pair for pair in pairs)]
    labels, expected_top1 = [], []
    for i in range(M):
        p = i % len(pairs)
        hidden[i, p] = 1.0
        kind = (i // len(pairs)) % (2 if tied_labels_only else 3)
        labels.append(pairs[p][0] if kind == 0 else pairs[p][1] if kind == 1 else others[i % len(others)])
        expected_top1.append(1.0 if kind == 0 else 0.0)
    return hidden, torch.tensor(labels), torch.tensor(expected_top1)


@pytest.mark.parametrize("transform", ["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_triton(dtype, transform, device):
    """Tied maxima in one V tile, in two tiles of one split and in two splits (SMALL: 32-wide tiles,
    3 splits of 4 tiles over V = 300): the first index wins everywhere."""
    M, H, V = 36, 24, 300
    pairs = [(3, 17), (40, 70), (10, 290)]  # same tile; tiles 1 and 2; splits 0 and 2
    weight, bias = tied_head(H, V, pairs)
    hidden, labels, top1 = tied_rows(M, H, pairs)
    weight, bias, hidden, labels, top1 = (x.to(device) for x in (weight, bias, hidden, labels, top1))
    kw = TRANSFORMS[transform]
    expected = reference.token_stats(reference.lm_head_logits(hidden, weight, bias, **kw)[None], labels[None],
                                     shift=False)[0]  # fmt: skip
    assert torch.equal(expected[:, 2], top1)  # the reference agrees with the construction
    _, _, stats = triton_linear.fused_linear_logps_fwd(
        hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, **kw, splits=3, config=SMALL, with_stats=True
    )
    assert torch.equal(stats[:, 2], top1)
    torch.testing.assert_close(stats.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_through_the_op(backend, monkeypatch, device):
    """Ties through the op (unshifted: row t's label is scored by hidden row t); on the portable path
    in one vocabulary chunk (64 columns) and across chunks, on Triton in one V tile and across tiles."""
    monkeypatch.setattr(portable_linear, "MAX_VOCAB_CHUNK", 64)
    N, T, H, V = 2, 13, 24, 200
    pairs = [(3, 17), (20, 150)]
    weight, bias = tied_head(H, V, pairs)
    hidden, labels, top1 = tied_rows(N * T, H, pairs, tied_labels_only=True)
    hidden, labels, top1 = hidden.view(N, T, H).float(), labels.view(N, T), top1.view(N, T)
    weight, bias, hidden, labels, top1 = (x.to(device) for x in (weight, bias, hidden, labels, top1))
    labels[1, 5] = -100
    chunk = 64 * 8 if backend == "torch" else 0
    _, _, stats = op(hidden, weight.float(), bias.float(), labels, shift=False, softcap=30.0, chunk_elements=chunk,
                     backend=backend)  # fmt: skip
    expected = top1.masked_fill(labels == -100, 0.0)
    assert expected.sum() > 0 and torch.equal(stats[..., 2], expected)


# --------------------------------------------------------------------------------------- op contract


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_autograd(backend, device):
    hidden, weight, bias = lm_head(4, 5, 16, 123, torch.float32, True, device)
    _, labels = make_batch(4, 5, 123)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, -100, True, 1.0, 3.0, 1.0,
            0, backend, True)  # fmt: skip
    torch.library.opcheck(torch.ops.dpo_kernels.fused_linear_token_logps.default, args)

    # stats are not differentiable; the log-prob gradients do not depend on with_stats
    grads = []
    for with_stats in (False, True):
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
        logp, _, stats = op(*leaves[:3], labels, softcap=3.0, backend=backend, with_stats=with_stats)
        assert not stats.requires_grad
        logp.sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_compile_with_stats(device):
    hidden, weight, bias = lm_head(2, 5, 16, 50, torch.float32, False, device)
    _, labels = make_batch(2, 5, 50)
    torch._dynamo.reset()
    fn = torch.compile(lambda h, w, y: op(h, w, None, y)[2].sum(-2), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(hidden, weight, labels), op(hidden, weight, None, labels)[2].sum(-2))


def test_stats_launch_config():
    """The stats forward's own fp32 unaligned config (see STATS_LAUNCH_CONFIGS); everything else shared."""
    assert triton_linear.launch_config(torch.float32, False, with_stats=True).BLOCK_M == 32
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert triton_linear.launch_config(dtype, True, True) == triton_linear.launch_config(dtype, True)
