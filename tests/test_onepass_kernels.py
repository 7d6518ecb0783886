"""The one-pass LM-head launchers (logits formed once into an fp32 buffer, scored, then overwritten in place by
dz and consumed by two GEMMs) against each backend's recompute launchers.

Backends: "triton" (``triton.linear.fused_linear_logits_fwd`` / ``_bwd_`` vs ``fused_linear_logps_fwd_cublas``
/ ``fused_linear_logps_bwd``), "torch" and "native" (``portable.linear.fused_linear_logits_fwd`` / ``_bwd_``
with the portable or the native log-prob scorer vs ``portable.linear.fused_linear_logps_fwd`` / ``_bwd``), and
"native+widened": the portable launchers' fp32 products on widened weight chunks (CPUs without 16-bit GEMMs).

- forward: logp, the two-part lse and the statistics equal the recompute forward's (the same logits, in fp32
  for Triton, rounded to the inputs' dtype for the portable launchers, as each recompute route forms them);
- backward: d_hidden, d_weight and d_bias equal the recompute backward's: fp32 within 1e-5 of the largest
  entry; bf16 judged against the fp64 truth (autograd of the window's log-probs from the same rounded inputs):
  the one-pass error at most twice the recompute's plus a quarter of a bf16 ulp at the largest entry;
- accumulation: d_weight and d_bias are added to, not overwritten: two calls on two row groups (their rows
  of the buffer) equal one call on all the rows.

Cases cover bias, logit_scale, softcap, temperature, a vocabulary window (vocab_start > 0, some labels
owned by no column of it), a buffer with a row stride > V, odd and aligned V, and small dz tiles (several
row blocks and V tiles, ragged both ways) beside the launch config. Under the interpreter (CPU mode) each
Triton case's forwards and backwards run once, shared by the forward and backward checks.
"""

import functools
from unittest import mock

import pytest
import torch
from conftest import DEVICE

from dpo_kernels import reference
from dpo_kernels.ops import native
from dpo_kernels.portable import linear as portable_linear
from dpo_kernels.portable import logprobs as portable_logprobs
from dpo_kernels.triton import linear as triton_linear

SMALL_DZ = triton_linear.LogitsDzConfig(BLOCK_M=4, BLOCK_V=32, num_warps=4)

# id -> (dtype, M, H, V, bias, logit_scale, softcap, temperature, vocab_start, row stride pad, with_stats, dz config)
CASES = {
    "fp32-bias-scale-temp-window-strided": (torch.float32, 37, 48, 301, True, 2.0, None, 0.8, 30, 5, False, SMALL_DZ),
    "fp32-softcap-aligned-stats": (torch.float32, 21, 48, 256, False, 1.0, 5.0, 1.0, 0, 0, True, None),
    "bf16-all-window-strided": (torch.bfloat16, 21, 48, 301, True, 0.5, 4.0, 1.7, 30, 3, False, SMALL_DZ),
    "bf16-window-aligned-stats": (torch.bfloat16, 21, 48, 256, False, 1.0, None, 1.0, 30, 0, True, None),
    # a plain 16-bit head (no bias, no transform): the portable launchers' 16-bit buffer (ops.linear_logits_dtype)
    "bf16-plain-window-strided-stats-16bit-buffer": (torch.bfloat16, 21, 48, 301, False, 1.0, None, 1.0, 30, 3, True,
                                                     None),  # fmt: skip
}
BACKENDS = ("triton", "torch", "native")
# "+widened": the portable one-pass launchers' 16-bit products as fp32 GEMMs on widened weight chunks (the CPU
# path without native 16-bit GEMMs); the plain portable backends run the 16-bit GEMMs, whatever this CPU has.
WIDENED = "native+widened"
BACKEND_CASES = [(b, c) for b in BACKENDS for c in CASES if not (b == "triton" and c.endswith("16bit-buffer"))] + [
    (WIDENED, c) for c in CASES if c.startswith("bf16")
]


class Launchers:
    """One backend's one-pass and recompute launchers behind one calling convention."""

    def __init__(self, name):
        self.name = name
        name, _, mode = name.partition("+")
        if name == "native" and not native.has_kernel(DEVICE):
            pytest.skip("dpo_kernels._C is not built")
        self.scorer = {"torch": portable_logprobs, "native": native}.get(name)
        self.widened = mode == "widened"

    def _portable(self):
        return mock.patch.object(portable_linear, "_widened_products", lambda hidden: self.widened)

    def onepass_fwd(self, logits, hidden, weight, bias, labels, transform, with_stats, vocab_start):
        if self.scorer is None:
            return triton_linear.fused_linear_logits_fwd(logits, hidden, weight, bias, labels, *transform,
                                                         with_stats=with_stats, vocab_start=vocab_start)  # fmt: skip
        with self._portable():
            return portable_linear.fused_linear_logits_fwd(logits, hidden, weight, bias, labels, *transform,
                                                           scorer=self.scorer, with_stats=with_stats,
                                                           vocab_start=vocab_start)  # fmt: skip

    def onepass_bwd_(self, logits, grad, hidden, weight, bias, labels, lse, transform, d_weight, d_bias, vocab_start,
                     config):  # fmt: skip
        if self.scorer is None:
            return triton_linear.fused_linear_logits_bwd_(logits, grad, hidden, weight, bias, labels, lse, *transform,
                                                          d_weight=d_weight, d_bias=d_bias, vocab_start=vocab_start,
                                                          config=config)  # fmt: skip
        with self._portable():
            return portable_linear.fused_linear_logits_bwd_(logits, grad, hidden, weight, bias, labels, lse,
                                                            *transform, scorer=self.scorer, d_weight=d_weight,
                                                            d_bias=d_bias, vocab_start=vocab_start)  # fmt: skip

    def recompute(self, hidden, weight, bias, labels, grad, transform, with_stats, vocab_start):
        """((logp, lse, stats), (d_hidden, d_weight, d_bias)) of the recompute route."""
        if self.scorer is None:
            fwd = triton_linear.fused_linear_logps_fwd_cublas(hidden, weight, bias, labels, *transform,
                                                              with_stats=with_stats, vocab_start=vocab_start)  # fmt: skip
            bwd = triton_linear.fused_linear_logps_bwd(grad, hidden, weight, bias, labels, fwd[1], *transform,
                                                       vocab_start=vocab_start)  # fmt: skip
        else:
            fwd = portable_linear.fused_linear_logps_fwd(hidden, weight, bias, labels, *transform,
                                                         with_stats=with_stats, vocab_start=vocab_start)  # fmt: skip
            bwd = portable_linear.fused_linear_logps_bwd(grad, hidden, weight, bias, labels, fwd[1], *transform,
                                                         vocab_start=vocab_start)  # fmt: skip
        return fwd, bwd


def make_inputs(dtype, M, H, V, bias, vocab_start, seed=0):
    """hidden, weight, bias, labels (global ids; with a window, some owned by no column of it), grad: made
    on the CPU from ``seed`` and moved to the test device."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5 * 3).to(dtype)
    b = torch.randn(V, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, vocab_start + V + (20 if vocab_start else 0), (M,), generator=gen)
    owned = (labels >= vocab_start) & (labels < vocab_start + V)
    assert owned.any() and (owned.all() or vocab_start > 0)
    assert vocab_start == 0 or not owned.all(), "a window case needs unowned labels"
    grad = torch.randn(M, generator=gen)
    return [x.to(DEVICE) if x is not None else None for x in (hidden, weight, b, labels, grad)]


def logits_buffer(M, V, pad, dtype=torch.float32):
    """An (M, V) buffer, its row stride V + pad, filled with garbage (NaN): every column gets written."""
    return torch.full((M, V + pad), float("nan"), dtype=dtype, device=DEVICE)[:, :V]


@functools.cache
def run(backend, case):
    """(one-pass (logp, lse, stats), one-pass (d_hidden, d_weight, d_bias), the recompute's (fwd, bwd), inputs)."""
    dtype, M, H, V, bias, scale, softcap, temp, vocab_start, pad, with_stats, config = CASES[case]
    kernels = Launchers(backend)
    hidden, weight, b, labels, grad = make_inputs(dtype, M, H, V, bias, vocab_start)
    transform = (scale, softcap, temp)
    buf = logits_buffer(M, V, pad, dtype if case.endswith("16bit-buffer") else torch.float32)
    fwd = kernels.onepass_fwd(buf, hidden, weight, b, labels, transform, with_stats, vocab_start)
    d_weight = torch.zeros_like(weight)
    d_bias = torch.zeros(V, device=DEVICE) if bias else None
    d_hidden = kernels.onepass_bwd_(buf, grad, hidden, weight, b, labels, fwd[1], transform, d_weight, d_bias,
                                    vocab_start, config)  # fmt: skip
    recompute = kernels.recompute(hidden, weight, b, labels, grad, transform, with_stats, vocab_start)
    return fwd, (d_hidden, d_weight, d_bias), recompute, (hidden, weight, b, labels, grad)


def truth_grads(case, hidden, weight, bias, labels, grad):
    """fp64 (d_hidden, d_weight, d_bias) of Σ g · logp over the window, from the same (rounded) inputs."""
    _, _, _, V, _, scale, softcap, temp, vocab_start, *_ = CASES[case]
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    z = reference.lm_head_logits(*leaves, logit_scale=scale, softcap=softcap, temperature=temp)
    local = labels - vocab_start
    owned = (local >= 0) & (local < V)
    label_logit = torch.where(owned, z.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1), 0.0)
    (label_logit - z.logsumexp(-1)).backward(grad.double())
    return [x.grad if x is not None else None for x in leaves]


def assert_fp32_match(actual, expected, rtol=1e-5):
    """Within rtol of each entry plus rtol of the largest: summation orders differ, indexing errors are O(1)."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def assert_as_good(onepass, recompute, truth):
    """bf16: the one-pass error from the fp64 truth at most 2x the recompute route's + 1/4 ulp at the largest entry."""
    onepass_err = (onepass.double() - truth).abs().max().item()
    recompute_err = (recompute.double() - truth).abs().max().item()
    floor = 0.25 * torch.finfo(torch.bfloat16).eps * truth.abs().max().item()
    assert onepass_err <= 2 * recompute_err + floor, (onepass_err, recompute_err, floor)


@pytest.mark.parametrize(("backend", "case"), BACKEND_CASES)
def test_forward_matches_recompute(backend, case):
    (logp, lse, stats), _, ((logp_r, lse_r, stats_r), _), (hidden, *_) = run(backend, case)
    M = hidden.shape[0]
    assert logp.shape == (M,) and lse.shape == (M, 2)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    assert_fp32_match(logp, logp_r)
    assert_fp32_match(lse, lse_r)
    with_stats = CASES[case][10]
    assert (stats is None) == (not with_stats)
    if with_stats:
        assert stats.shape == (M, 4)
        assert_fp32_match(stats, stats_r)


@pytest.mark.parametrize(("backend", "case"), BACKEND_CASES)
def test_backward_matches_recompute(backend, case):
    _, onepass, (_, recompute), inputs = run(backend, case)
    hidden, weight, bias = inputs[:3]
    d_hidden, d_weight, d_bias = onepass
    assert d_hidden.dtype == hidden.dtype and d_hidden.shape == hidden.shape
    assert d_weight.dtype == weight.dtype and (d_bias is None) == (bias is None)
    if hidden.dtype == torch.float32:
        for got, want in zip(onepass, recompute, strict=True):
            if want is not None:
                assert_fp32_match(got, want)
        return
    truth = truth_grads(case, *inputs)
    for got, want, true in zip(onepass, recompute, truth, strict=True):
        if want is not None:
            assert_as_good(got, want, true)


@pytest.mark.parametrize("case", ["fp32-bias-scale-temp-window-strided", "bf16-window-aligned-stats"])
@pytest.mark.parametrize("backend", [*BACKENDS, WIDENED])
def test_d_weight_accumulates(backend, case):
    """bwd_ on rows [0, 16) then [16, M) of the buffer (into d_weight, d_bias already holding values) equals one
    call on all M rows: the same d_hidden rows, the same sums added once."""
    dtype, M, H, V, bias, scale, softcap, temp, vocab_start, pad, _, config = CASES[case]
    kernels = Launchers(backend)
    M = 24  # two row groups, one of them ragged against the small dz blocks
    hidden, weight, b, labels, grad = make_inputs(dtype, M, H, V, bias, vocab_start, seed=1)
    transform = (scale, softcap, temp)
    buf = logits_buffer(M, V, pad)
    _, lse, _ = kernels.onepass_fwd(buf, hidden, weight, b, labels, transform, False, vocab_start)
    whole = buf.clone()  # the same logits for the one call over all the rows
    gen = torch.Generator().manual_seed(2)
    start_w = torch.randn(weight.shape, generator=gen).to(dtype).to(DEVICE)
    start_b = torch.randn(V, generator=gen).to(DEVICE) if bias else None
    d_weight, d_bias = start_w.clone(), start_b.clone() if bias else None
    parts = []
    for rows in (slice(0, 16), slice(16, M)):
        parts.append(kernels.onepass_bwd_(buf[rows], grad[rows], hidden[rows], weight, b, labels[rows], lse[rows],
                                          transform, d_weight, d_bias, vocab_start, config))  # fmt: skip
    once_w, once_b = start_w.clone(), start_b.clone() if bias else None
    d_hidden = kernels.onepass_bwd_(whole, grad, hidden, weight, b, labels, lse, transform, once_w, once_b,
                                    vocab_start, config)  # fmt: skip
    assert_fp32_match(torch.cat(parts), d_hidden)
    if dtype == torch.float32:
        assert_fp32_match(d_weight, once_w)
    else:  # d_weight rounded to bf16 after each call: one rounding more than the single call
        err = (d_weight.double() - once_w.double()).abs().max().item()
        assert err <= torch.finfo(dtype).eps * once_w.abs().max().item(), err
    assert not torch.equal(once_w, start_w)
    if bias:
        assert_fp32_match(d_bias, once_b)
        assert not torch.equal(once_b, start_b)


def test_a_16bit_buffer_needs_a_plain_head():
    """The portable launchers take a 16-bit buffer only where its numbers are the fp32 buffer's: no bias and no
    transform (ops.linear_logits_dtype picks it there); anything else raises instead of rounding the logits."""
    from dpo_kernels import ops

    hidden, weight, b, labels, _ = make_inputs(torch.bfloat16, 8, 16, 40, True, 0)
    assert ops.linear_logits_dtype("native", hidden, None, 1.0, None, 1.0) == torch.bfloat16
    assert ops.linear_logits_dtype("triton", hidden, None, 1.0, None, 1.0) == torch.float32
    assert ops.linear_logits_dtype("native", hidden, b, 1.0, None, 1.0) == torch.float32
    assert ops.linear_logits_dtype("native", hidden, None, 1.0, 30.0, 1.0) == torch.float32
    with pytest.raises(ValueError, match="plain"):
        portable_linear.fused_linear_logits_fwd(logits_buffer(8, 40, 0, torch.bfloat16), hidden, weight, b, labels,
                                                1.0, None, 1.0, scorer=portable_logprobs)  # fmt: skip
