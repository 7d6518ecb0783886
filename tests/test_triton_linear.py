"""Fused LM head + log-prob Triton kernels (dpo_kernels.triton.linear) against the fp64 reference.

The truth is ``reference.lm_head_logits`` + log_softmax / gather in fp64, differentiated by autograd.
Tolerances: fp32 inputs multiply in IEEE fp32 with an fp32 accumulator, in BLOCK_H slices of H and
BLOCK_V tiles of V (a different summation order than the BLAS reference), and the exp / log of the
online log-sum-exp run in fp32; the per-element error is a few fp32 ulps of the largest term
(|z| ≲ 20 here), so rtol 1e-4 / atol 1e-5 holds with margin and still catches any indexing or mask
error, which would be O(1). bf16 / fp16 log-probs are fp32 and are held to the same tolerance
against the fp32 reference computed from the same (rounded) inputs; their gradients, rounded to
the input dtype, are judged by conftest.assert_low_precision_grad: the kernel's error from the fp64
truth may exceed the error of the same-dtype reference (computed in fp32 from the same inputs, cast
once) by one ulp of the dtype at the largest gradient magnitude.

Under the interpreter ``tl.dot`` is slow, so the shapes are small and most cases run at small blocks
(``config``) so that M, V and H each span several tiles with ragged ends; one case runs at the real
launch config of its dtype. The whole file takes ~20 s on two cores.
"""

from functools import partial

import pytest
import torch

from conftest import assert_low_precision_grad
from dpo_kernels import reference
from dpo_kernels.triton.linear import (
    LinearConfig,
    ProductConfig,
    fused_linear_logps_bwd,
    fused_linear_logps_fwd,
    fused_linear_logps_fwd_cublas,
    launch_config,
)

RTOL, ATOL = 1e-4, 1e-5
SMALL = LinearConfig(BLOCK_M=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=2)
SMALL_PRODUCTS = ProductConfig(BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)  # the filtered products

# id -> (M, H, V, bias, logit_scale, softcap, temperature, config, fwd splits, bwd dz chunk columns)
CASES = {
    "bias-strided-splits": (37, 40, 300, True, 1.0, None, 1.0, SMALL, 3, 64),
    "softcap-scale-temp-launchcfg": (5, 72, 123, False, 0.5, 4.0, 1.7, None, None, None),
    "all-transforms": (23, 16, 123, True, 2.0, 30.0, 0.8, SMALL, 2, 32),
    "aligned-launchcfg": (70, 64, 300, True, 1.0, 15.0, 1.0, None, 2, 128),
}


def make_inputs(M, H, V, bias, dtype, device, strided=False):
    """hidden (optionally a row-strided view), weight, bias, labels, upstream grad, made on the CPU and
    moved to ``device``."""
    hidden = torch.randn(M, H + 8 if strided else H).to(device)[:, :H].to(dtype)
    weight = (torch.randn(V, H) / H**0.5 * 3).to(dtype).to(device)
    b = torch.randn(V).to(dtype).to(device) if bias else None
    labels = torch.randint(0, V, (M,)).to(device)
    grad = torch.randn(M).to(device)
    return hidden, weight, b, labels, grad


def reference_logps(hidden, weight, bias, labels, grad, dtype, **transform):
    """(logp, lse, d_hidden, d_weight, d_bias) of the reference in ``dtype`` (fp64 truth or fp32), lse in the
    kernels' two parts (row max c, log Σ exp(z − c))."""
    leaves = [x.detach().to(dtype).requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    z = reference.lm_head_logits(*leaves, **transform)
    logp = torch.log_softmax(z, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    c = z.detach().amax(-1)
    lse = torch.stack([c, torch.logsumexp(z.detach() - c[:, None], dim=-1)], dim=-1)
    logp.backward(grad.to(dtype))
    return logp.detach(), lse.detach(), *(x.grad if x is not None else None for x in leaves)


def run_kernels(hidden, weight, bias, labels, grad, config=None, splits=None, chunk_columns=None,
                filter_eps=0.0, keep_out=None, **transform):  # fmt: skip
    """chunk_columns: the backward's dz chunk width (a chunk_elements budget for that many columns)."""
    logp, lse, _ = fused_linear_logps_fwd(hidden, weight, bias, labels, **transform, splits=splits, config=config)
    chunk = None if chunk_columns is None else hidden.shape[0] * chunk_columns * hidden.element_size() // 4
    products = SMALL_PRODUCTS if config is SMALL else None
    grads = fused_linear_logps_bwd(
        grad, hidden, weight, bias, labels, lse, **transform,
        filter_eps=filter_eps, chunk_elements=chunk, config=config, products=products, keep_out=keep_out,
    )  # fmt: skip
    return logp, lse, *grads


def close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_fp64_reference(case, dtype, device):
    M, H, V, bias, scale, softcap, temperature, config, fwd_splits, chunk_columns = CASES[case]
    transform = dict(logit_scale=scale, softcap=softcap, temperature=temperature)
    # config None: the real launch config of the dtype, aligned (H = 64) or not (H = 72)
    hidden, weight, b, labels, grad = make_inputs(M, H, V, bias, dtype, device, strided=config is not None)
    if case == "all-transforms":
        grad = torch.randn(1).to(device).expand(M)  # a stride-0 upstream gradient
        labels = torch.randint(0, V, (2 * M,)).to(device)[::2]  # strided labels
    out = run_kernels(hidden, weight, b, labels, grad, config, fwd_splits, chunk_columns, **transform)
    truth = reference_logps(hidden, weight, b, labels, grad, torch.float64, **transform)

    logp, lse, d_hidden, d_weight, d_bias = out
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == (M,) and lse.shape == (M, 2)
    assert d_hidden.dtype == dtype and d_hidden.shape == (M, H) and d_hidden.is_contiguous()
    assert d_weight.dtype == dtype and d_weight.shape == (V, H)
    assert (d_bias is None) == (b is None)
    if b is not None:
        assert d_bias.dtype == dtype and d_bias.shape == (V,)

    close(logp, truth[0])
    close(lse, truth[1])
    if dtype == torch.float32:
        for actual, expected in zip(out[2:], truth[2:]):
            if expected is not None:
                close(actual, expected)
    else:
        # bf16 operands are widened to fp32 under the interpreter (exact products); fp16 ones are not
        same_dtype = reference_logps(hidden, weight, b, labels, grad, torch.float32, **transform)
        for actual, ref, expected in zip(out[2:], same_dtype[2:], truth[2:]):
            if expected is not None:
                assert_low_precision_grad(actual, ref.to(dtype), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cublas_forward_matches_the_fused_forward(case, dtype, device):
    """The forward as cuBLAS products + the logits path's kernel (the route weighed against the fused
    kernel): the fp64 truth's log-probs and lse, the fused forward's statistics, NaN where a row's hidden
    state is NaN, over several row chunks with a ragged last one."""
    M, H, V, bias, scale, softcap, temperature, config, _, _ = CASES[case]
    transform = dict(logit_scale=scale, softcap=softcap, temperature=temperature)
    hidden, weight, b, labels, grad = make_inputs(M, H, V, bias, dtype, device, strided=config is not None)
    hidden[1, 3] = float("nan")
    chunk = dict(chunk_elements=V * max(1, M // 3))  # three row chunks and a partial one
    logp, lse, stats = fused_linear_logps_fwd_cublas(hidden, weight, b, labels, **transform, with_stats=True, **chunk)
    assert logp[1].isnan() and lse[1].sum().isnan() and stats[1].isnan().any()
    finite = torch.arange(M, device=device) != 1
    h, y = hidden[finite], labels[finite]
    _, _, fused_stats = fused_linear_logps_fwd(h, weight, b, y, **transform, with_stats=True, config=config)
    truth = reference_logps(h, weight, b, y, grad[finite], torch.float64, **transform)
    close(logp[finite], truth[0])
    close(lse[finite], truth[1])
    torch.testing.assert_close(stats[finite], fused_stats, rtol=1e-5, atol=1e-4)


def test_gradient_filter(device):
    """filter_eps = 0 keeps every tile; filter_eps > 0 drops tiles of negligible probability, within the
    documented bound: each dropped entry moves a gradient by at most g · p · |logit_scale / T| · |W|."""
    M, H, V, eps, scale, temperature = 32, 16, 300, 1e-3, 1.0, 1.0
    hidden, weight, _, _, grad = make_inputs(M, H, V, False, torch.float32, device)
    b = torch.full((V,), -4.0, device=device)
    b[:20] = 8.0  # a peaked distribution: p < 1e-5 outside the first 20 tokens
    labels = torch.randint(0, 20, (M,)).to(device)
    transform = dict(logit_scale=scale, softcap=None, temperature=temperature)
    truth = reference_logps(hidden, weight, b, labels, grad, torch.float64, **transform)

    exact = run_kernels(hidden, weight, b, labels, grad, SMALL, 1, 64, filter_eps=0.0, **transform)
    filtered = run_kernels(hidden, weight, b, labels, grad, SMALL, 1, 64, filter_eps=eps, **transform)
    for actual, expected in zip(exact, truth):
        close(actual, expected)
    assert torch.equal(exact[0], filtered[0]) and torch.equal(exact[1], filtered[1])  # the forward is untouched
    assert not torch.equal(exact[2], filtered[2])  # some tiles were dropped

    z = reference.lm_head_logits(hidden.double(), weight.double(), b.double(), **transform)
    p = torch.softmax(z, dim=-1)
    small = torch.where(p < eps, p, 0.0) * grad.double().abs()[:, None] * abs(scale / temperature)
    bound_dh = small @ weight.double().abs()  # (M, H)
    bound_dw = small.T @ hidden.double().abs()  # (V, H)
    bound_db = small.sum(0)
    for actual, expected, bound in zip(filtered[2:], truth[2:], (bound_dh, bound_dw, bound_db)):
        assert ((actual.double() - expected).abs() <= bound + ATOL + RTOL * expected.abs()).all()


def peaked_inputs(M, H, V, dtype, device):
    """A peaked softmax: the first 20 tokens hold nearly all the mass (p < 1e-5 elsewhere), the labels lie
    among them but for row 0, whose label (100) keeps one tail tile of its row block."""
    hidden, weight, _, _, grad = make_inputs(M, H, V, False, dtype, device)
    b = torch.full((V,), -4.0)
    b[:20] = 8.0
    labels = torch.randint(0, 20, (M,))
    labels[0] = 100
    return hidden, weight, b.to(dtype).to(device), labels.to(device), grad


def filter_bounds(hidden, weight, b, grad, eps, **transform):
    """Per-element bounds of the filtered gradients' extra error: g · p · |scale / T| per dropped entry p <
    eps (an upper bound: every entry below eps counts, dropped or not), times |W| / |h| / 1."""
    z = reference.lm_head_logits(hidden.double(), weight.double(), b.double(), **transform)
    p = torch.softmax(z, dim=-1)
    factor = abs(transform["logit_scale"] / transform["temperature"])
    small = torch.where(p < eps, p, 0.0) * grad.double().abs()[:, None] * factor
    return small @ weight.double().abs(), small.T @ hidden.double().abs(), small.sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filtered_products_skip_dropped_tiles(dtype, device):
    """With a filter the products run on Triton over the kept tiles only: M = 37, H = 40, V = 123 are ragged
    in row blocks (16), H blocks (16), V tiles (32) and dz chunks (64 columns). The flags drop the tail tiles
    but the one holding row 0's label; the gradients stay within the analytic bound of the same-dtype
    unfiltered error; two runs give the same bits."""
    M, H, V, eps = 37, 40, 123, 1e-3
    transform = dict(logit_scale=1.0, softcap=None, temperature=1.0)
    hidden, weight, b, labels, grad = peaked_inputs(M, H, V, dtype, device)
    keep = []
    filtered = run_kernels(hidden, weight, b, labels, grad, SMALL, 1, 64, filter_eps=eps, keep_out=keep, **transform)
    again = run_kernels(hidden, weight, b, labels, grad, SMALL, 1, 64, filter_eps=eps, **transform)
    for x, y in zip(filtered, again):
        assert torch.equal(x, y)  # deterministic: no atomics, fixed loop orders

    # chunks of 2 and 2 V tiles (the second ragged: 59 columns) over 3 row blocks; tile 0 holds the mass,
    # tile 3 (columns 96-122, chunk 1's second) row 0's label: kept in row block 0 only
    assert [tuple(k.shape) for k in keep] == [(3, 2), (3, 2)]
    expected = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.int8)
    assert torch.equal(torch.cat(keep, dim=1).cpu(), expected)

    truth = reference_logps(hidden, weight, b, labels, grad, torch.float64, **transform)
    bounds = filter_bounds(hidden, weight, b, grad, eps, **transform)
    if dtype == torch.float32:
        for actual, expected, bound in zip(filtered[2:], truth[2:], bounds):
            assert ((actual.double() - expected).abs() <= bound + ATOL + RTOL * expected.abs()).all()
    else:  # the same-dtype reference's own error, plus the dropped mass (small here: p < 1e-5)
        same_dtype = reference_logps(hidden, weight, b, labels, grad, torch.float32, **transform)
        for actual, ref, expected, bound in zip(filtered[2:], same_dtype[2:], truth[2:], bounds):
            kernel_err = (actual.double() - expected).abs().max().item()
            reference_err = (ref.to(dtype).double() - expected).abs().max().item()
            margin = torch.finfo(dtype).eps * expected.abs().max().item() + bound.max().item()
            assert kernel_err <= reference_err + margin, (kernel_err, reference_err, margin)
    # d_weight rows whose every tile was dropped are written (as zeros), not left uninitialized
    assert (filtered[3][32:96] == 0).all() and (filtered[3][20:32] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filtered_products_keeping_every_tile_match_the_dense_path(dtype, device):
    """A filter below every probability keeps every tile: the Triton products then compute what cuBLAS
    does (fp32: to rounding; bf16: both within an ulp of the fp64 truth beyond the reference's error),
    and filter 0 is the dense path itself (no flags)."""
    M, H, V = 21, 24, 70
    hidden, weight, b, labels, grad = make_inputs(M, H, V, True, dtype, device)
    transform = dict(logit_scale=0.7, softcap=10.0, temperature=1.3)
    keep = []
    dense = run_kernels(hidden, weight, b, labels, grad, SMALL, 1, 64, filter_eps=0.0, keep_out=keep, **transform)
    assert keep == []  # the dense cuBLAS path: no flags
    every = run_kernels(hidden, weight, b, labels, grad, SMALL, 1, 64, filter_eps=1e-30, keep_out=keep, **transform)
    assert all(bool((k == 1).all()) for k in keep) and len(keep) == 2
    if dtype == torch.float32:
        for x, y in zip(every[2:], dense[2:]):
            close(x, y)
    else:
        truth = reference_logps(hidden, weight, b, labels, grad, torch.float64, **transform)
        same_dtype = reference_logps(hidden, weight, b, labels, grad, torch.float32, **transform)
        for actual, ref, expected in zip(every[2:], same_dtype[2:], truth[2:]):
            assert_low_precision_grad(actual, ref.to(dtype), expected)


@pytest.mark.parametrize("forward", ["fused", "cublas"])
def test_label_outside_the_head_is_not_owned_and_empty_batch(forward, device):
    """A label past the head (or before its window) is not owned: label logit 0, logp = −(m + log s),
    top1 0, finite; the backward gives it no one-hot term."""
    hidden, weight, b, labels, grad = make_inputs(6, 16, 123, True, torch.float32, device)
    labels[2], labels[4] = 123, 10**9
    fwd = partial(fused_linear_logps_fwd, config=SMALL) if forward == "fused" else fused_linear_logps_fwd_cublas
    logp, lse, stats = fwd(hidden, weight, b, labels, with_stats=True)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(logp[[2, 4]], -lse[[2, 4]].sum(-1))
    assert (stats[[2, 4], 2] == 0).all()
    truth = reference_logps(hidden, weight, b, labels.clamp(max=122), grad, torch.float64)
    owned = torch.ones(6, dtype=torch.bool, device=device)
    owned[[2, 4]] = False
    close(logp[owned], truth[0][owned])
    # the backward: the fp64 softmax gradient, with no one-hot in the unowned rows
    z = reference.lm_head_logits(hidden.double(), weight.double(), b.double())
    dz = -torch.softmax(z, -1) * grad.double()[:, None]
    rows = owned.nonzero().squeeze(1)
    dz[rows, labels[rows]] += grad.double()[rows]
    _, d_weight, d_bias = fused_linear_logps_bwd(grad, hidden, weight, b, labels, lse, config=SMALL)
    close(d_bias, dz.sum(0))
    close(d_weight, dz.T @ hidden.double())

    empty = hidden[:0]
    logp, lse, stats = fused_linear_logps_fwd(empty, weight, b, labels[:0])
    assert logp.shape == (0,) and lse.shape == (0, 2) and stats is None
    assert fused_linear_logps_fwd(empty, weight, b, labels[:0], with_stats=True)[2].shape == (0, 4)
    d_hidden, d_weight, d_bias = fused_linear_logps_bwd(torch.ones(0, device=device), empty, weight, b, labels[:0], lse)
    assert d_hidden.shape == (0, 16) and (d_weight == 0).all() and (d_bias == 0).all()


def test_rejects_non_unit_inner_stride_and_mixed_dtypes(device):
    hidden, weight, b, labels, _ = make_inputs(6, 16, 123, True, torch.float32, device)
    with pytest.raises(ValueError, match="unit stride"):
        fused_linear_logps_fwd(hidden.t().contiguous().t(), weight, b, labels)
    with pytest.raises(ValueError, match="share"):
        fused_linear_logps_fwd(hidden.bfloat16(), weight, b, labels)


def test_launch_configs():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for aligned in (True, False):
            cfg = launch_config(dtype, aligned)
            assert min(cfg.BLOCK_M, cfg.BLOCK_V, cfg.BLOCK_H) >= 16 and cfg.num_warps in (4, 8)
    assert launch_config(torch.bfloat16) == LinearConfig(64, 128, 64, 8, 3)


@pytest.mark.cpu_only("the interpreter's launch-config pick (test_gpu.py checks the GPU's: splits > 1)")
def test_the_forward_splits_under_the_interpreter(monkeypatch, device):
    """CPU tensors count as one SM without L2 (``_device_shape``): the forward's default is two programs
    in all, so one row block takes 2 vocabulary splits and several row blocks take 1."""
    from dpo_kernels.triton import linear

    picked = []
    real = linear._vocab_splits
    monkeypatch.setattr(linear, "_vocab_splits", lambda *a, **k: picked.append(real(*a, **k)) or picked[-1])
    for M in (5, 37):  # 1 and 3 row blocks of SMALL.BLOCK_M = 16
        hidden, weight, b, labels, grad = make_inputs(M, 16, 300, False, torch.float32, device)
        run_kernels(hidden, weight, b, labels, grad, SMALL)
    assert linear._device_shape(hidden.device) == (1, 0)
    assert [splits for splits, _ in picked] == [2, 1]
