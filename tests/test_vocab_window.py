"""The kernels' vocabulary window: every backend scores a slice [vocab_start, vocab_start + V_r) of the
vocabulary with GLOBAL labels, and its outputs merge into the whole vocabulary's.

The contract, for a scored row whose label y is global:
- forward: lse = (c, log s) with c the row max of the slice and s = Σ_v exp(z_v − c) over the slice;
  logp = z_{y − vocab_start} − (c + log s) when the slice owns y, else 0 − (c + log s) (label logit 0: a
  legal row, never NaN, never a range error); stats as ``reference.STATS`` over the slice, top1 = 1 only
  where the slice owns y and y is its first maximum;
- backward, handed the GLOBAL two-part lse (C, log S): g·(onehot_owned − exp((z − C) − log S)), the slice's
  columns of the whole vocabulary's gradient.
Unscored rows stay exact zeros. The truth is fp64 over the whole vocabulary.
"""

import pytest
import torch

from conftest import make_batch
from dpo_kernels import reference
from dpo_kernels.ops import native
from dpo_kernels.portable import linear as portable_linear
from dpo_kernels.portable import logprobs as portable_logprobs
from dpo_kernels.triton import linear as triton_linear
from dpo_kernels.triton import logprobs as triton_logprobs

SUM, ENTROPY, TOP1, LSE2 = range(4)
LOGITS_BACKENDS = {"torch": portable_logprobs, "triton": triton_logprobs, "native": native}


def _logits_backend(name, device):
    if name == "native" and not native.has_kernel(device.type):
        pytest.skip("dpo_kernels._C is not built")
    return LOGITS_BACKENDS[name]


def _slice_truth(z, y, start, stop, scored):
    """fp64 per-row truth over the slice [start, stop) of fp64 logits z (rows, V) with global labels y."""
    zs = z[:, start:stop]
    c = zs.amax(-1)
    log_s = torch.logsumexp(zs - c[:, None], -1)
    owned = scored & (y >= start) & (y < stop)
    local = (y - start).clamp(0, stop - start - 1)
    label_logit = torch.where(owned, zs.gather(1, local[:, None]).squeeze(1), 0.0)
    p = torch.softmax(zs, -1)
    stats = torch.stack(
        [
            zs.sum(-1),
            -(p * torch.log_softmax(zs, -1)).sum(-1),
            (owned & (zs.argmax(-1) == local)).double(),
            torch.logsumexp(2 * zs, -1),
        ],
        -1,
    )
    return label_logit - (c + log_s), c, c + log_s, stats


def _global_lse(z):
    C = z.amax(-1)
    return torch.stack([C, torch.logsumexp(z - C[:, None], -1)], -1)


def _full_grad(z, y, scored, g):
    """g·(onehot(y) − softmax(z)) over the whole vocabulary, zeros on unscored rows (fp64)."""
    grad = -torch.softmax(z, -1) * g[:, None]
    rows = scored.nonzero().squeeze(1)
    grad[rows, y[rows]] += g[rows]
    return torch.where(scored[:, None], grad, 0.0)


# uneven slices, one narrower than any tile, one off the block grid
SPLITS = [(0, 13), (13, 20), (20, 67)]


@pytest.mark.parametrize("backend", list(LOGITS_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [True, False])
def test_logits_window(backend, dtype, shift, device):
    kernels = _logits_backend(backend, device)
    V = SPLITS[-1][1]
    logits, labels = make_batch(3, 9, V, dtype, device=device)
    N, T, _ = logits.shape
    T_out = T - int(shift)
    y = labels[:, int(shift) : int(shift) + T_out].reshape(-1).long()
    scored = y != -100
    z = logits[:, :T_out].reshape(-1, V).double()
    g = torch.randn(N * T_out, dtype=torch.float64, device=device)
    lse_global = _global_lse(z).float().view(N, T_out, 2)
    full = _full_grad(z, y.clamp(min=0), scored, g)
    for start, stop in SPLITS:
        shard = logits[..., start:stop]
        logp, lse, stats = kernels.token_logps_fwd(shard, labels, -100, shift, True, vocab_start=start)
        want_logp, want_c, want_lse, want_stats = _slice_truth(z, y, start, stop, scored)
        logp, lse, stats = logp.reshape(-1).double(), lse.reshape(-1, 2).double(), stats.reshape(-1, 4).double()
        assert (logp[~scored] == 0).all() and (lse[~scored] == 0).all() and (stats[~scored] == 0).all()
        m = scored
        assert torch.equal(lse[m, 0], want_c[m]), "lse part 0 must be the slice's row max"
        torch.testing.assert_close(lse[m].sum(-1), want_lse[m], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(logp[m], want_logp[m], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(stats[m][:, [SUM, ENTROPY, LSE2]], want_stats[m][:, [SUM, ENTROPY, LSE2]],
                                   rtol=1e-5, atol=1e-4)  # fmt: skip
        assert torch.equal(stats[m, TOP1], want_stats[m, TOP1])
        grad = kernels.token_logps_bwd(g.float().view(N, T_out), shard, labels, lse_global, -100, shift,
                                       vocab_start=start)  # fmt: skip
        assert grad.dtype == dtype and grad.shape == shard.shape
        got = grad[:, :T_out].reshape(-1, stop - start).double()
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
        torch.testing.assert_close(got, full[:, start:stop], **tol)
        if shift:
            assert (grad[:, -1] == 0).all()


def _triton_fused(*args, **kwargs):
    return triton_linear.fused_linear_logps_fwd(*args, config=SMALL_CONFIG, splits=2, **kwargs)


SMALL_CONFIG = triton_linear.LinearConfig(BLOCK_M=16, BLOCK_V=32, BLOCK_H=16, num_warps=4, num_stages=2)
LINEAR_FORWARDS = {
    "torch": portable_linear.fused_linear_logps_fwd,
    "triton": _triton_fused,
    "triton-cublas": triton_linear.fused_linear_logps_fwd_cublas,
}
LINEAR_BACKWARDS = {"torch": portable_linear.fused_linear_logps_bwd, "triton": triton_linear.fused_linear_logps_bwd,
                    "triton-cublas": triton_linear.fused_linear_logps_bwd}  # fmt: skip


@pytest.mark.parametrize("backend", list(LINEAR_FORWARDS))
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_window(backend, softcap, device):
    M, H, V = 21, 24, SPLITS[-1][1]
    hidden = torch.randn(M, H, device=device)
    weight = torch.randn(V, H, device=device) * 0.5
    bias = torch.randn(V, device=device)
    labels = torch.randint(0, V, (M,), device=device)
    transform = dict(logit_scale=0.7, softcap=softcap, temperature=1.3)
    z = reference.lm_head_logits(hidden.double(), weight.double(), bias.double(), **transform)
    scored = torch.ones(M, dtype=torch.bool, device=device)
    lse_global = _global_lse(z).float()
    g = torch.randn(M, device=device)
    dz = _full_grad(z, labels, scored, g.double())
    # the truth's gradients through the transform, by autograd on the fp64 logits
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    reference.lm_head_logits(h64, w64, b64, **transform).backward(dz)
    d_hidden = torch.zeros(M, H, dtype=torch.float64, device=device)
    for start, stop in SPLITS:
        w, b = weight[start:stop], bias[start:stop]
        logp, lse, stats = LINEAR_FORWARDS[backend](hidden, w, b, labels, with_stats=True, vocab_start=start,
                                                    **transform)  # fmt: skip
        want_logp, want_c, want_lse, want_stats = _slice_truth(z, labels, start, stop, scored)
        assert lse.shape == (M, 2)
        torch.testing.assert_close(lse[:, 0].double(), want_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double().sum(-1), want_lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.double()[:, [SUM, ENTROPY, LSE2]], want_stats[:, [SUM, ENTROPY, LSE2]],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        assert torch.equal(stats[:, TOP1].double(), want_stats[:, TOP1])
        dh, dw, db = LINEAR_BACKWARDS[backend](g, hidden, w, b, labels, lse_global, vocab_start=start, **transform)
        d_hidden += dh.double()
        torch.testing.assert_close(dw.double(), w64.grad[start:stop], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(db.double(), b64.grad[start:stop], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d_hidden, h64.grad, rtol=1e-4, atol=1e-4)
