"""Fused LM head + log-probs against ``hidden @ weight.T`` + the reference: values, gradients w.r.t.
hidden, weight and bias, the logit transform, chunking, the DPO loss, torch.library contract, errors."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import assert_fp32_close, assert_low_precision_grad, make_batch
from dpo_kernels import fused_linear_dpo_loss, fused_linear_sequence_logps, reference
from dpo_kernels.portable import linear as portable_linear

ROOT = Path(__file__).resolve().parents[1]
LINEAR_BACKENDS = ["torch", "triton"]
TRANSFORMS = {
    "plain": dict(),
    "softcap": dict(softcap=4.0),
    "scale_temperature": dict(logit_scale=0.7, temperature=1.3),
    "all": dict(softcap=4.0, logit_scale=1.5, temperature=0.8),
}


def lm_head(n, t, h, v, dtype, bias, device):
    hidden = torch.randn(n, t, h).to(dtype).to(device)
    weight = (torch.randn(v, h) / h**0.5 * 3).to(dtype).to(device)
    return hidden, weight, (torch.randn(v) * 0.5).to(dtype).to(device) if bias else None


def run(fn, hidden, weight, bias, labels, upstream, **kwargs):
    """fn(...) and the gradients w.r.t. hidden, weight, bias (None where there is no bias)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(*leaves, labels, **kwargs)
    out.backward(upstream)
    return out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


def fused(hidden, weight, bias, labels, **kwargs):
    return fused_linear_sequence_logps(hidden, weight, labels, bias, **kwargs)


def naive(hidden, weight, bias, labels, shift=True, average=False, backend=None, **transform):
    logits = reference.lm_head_logits(hidden, weight, bias, **transform)
    return reference.sequence_logps(logits, labels, shift=shift, average=average)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_matches_matmul_plus_reference(backend, dtype, bias, transform, device):
    n, t, h, v = 4, 6, 40, 123
    hidden, weight, b = lm_head(n, t, h, v, dtype, bias, device)
    _, labels = make_batch(n, t, v)
    labels[3] = -100  # an all-masked sequence
    upstream = torch.randn(n).to(device)
    kwargs = dict(TRANSFORMS[transform], backend=backend)
    out, grads = run(fused, hidden, weight, b, labels, upstream, **kwargs)
    assert out[3] == 0 and (grads[0][3] == 0).all()
    if dtype == torch.float32:
        ref_out, ref_grads = run(naive, hidden, weight, b, labels, upstream, **kwargs)
        assert_fp32_close(out, ref_out)
        for grad, ref_grad in zip(grads, ref_grads):
            if grad is not None:
                torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
        return
    # bf16: the naive path rounds its logits to bf16 after the matmul and after each step of the
    # transform. Triton keeps them in fp32: strictly more accurate. The portable path rounds the matmul's
    # output only (a bf16 GEMM, for speed), so its error is of the reference's order, not below it
    # element by element: it is held to the exact model of what it computes instead.
    ref_out, ref_grads = run(naive, hidden, weight, b, labels, upstream, **kwargs)
    b64 = b.double() if b is not None else None
    truth_out, truth_grads = run(naive, hidden.double(), weight.double(), b64, labels, upstream.double(), **kwargs)
    if backend == "torch":
        product = (hidden @ weight.T).float()
        bias32 = b.float() if b is not None else None
        model = reference.sequence_logps(
            reference.lm_head_logits(product, torch.eye(v, device=device), bias32, **TRANSFORMS[transform]), labels
        )
        assert_fp32_close(out, model)
    else:
        assert (out.double() - truth_out).abs().max() <= (ref_out.double() - truth_out).abs().max() + 1e-5
    for grad, ref_grad, truth in zip(grads, ref_grads, truth_grads):
        if grad is not None:
            assert_low_precision_grad(grad, ref_grad, truth)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_portable_bf16_error_is_within_the_reference_error(transform, device):
    """At a size where rounding errors add up (1 024 tokens): the portable bf16 path, which rounds only its
    matmul's output, is on average at least as close to fp64 as the naive bf16 path. (Per sequence the two
    errors are sums of similar roundings of either sign, so their maxima over a batch trade places.)"""
    n, t, h, v = 16, 64, 64, 1000
    hidden, weight, b = lm_head(n, t, h, v, torch.bfloat16, True, device)
    _, labels = make_batch(n, t, v)
    kwargs = TRANSFORMS[transform]
    truth = naive(hidden.double(), weight.double(), b.double(), labels, **kwargs)
    ref_err = (naive(hidden, weight, b, labels, **kwargs).double() - truth).abs()
    err = (fused(hidden, weight, b, labels, backend="torch", **kwargs).double() - truth).abs()
    assert err.mean() <= ref_err.mean() + 1e-5, (err.mean(), ref_err.mean())


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("average", [False, True])
def test_chunking_over_rows_and_vocabulary(monkeypatch, shift, average, device):
    """Chunks far smaller than the problem: online log-sum-exp across vocabulary chunks, ragged last
    chunks in both directions."""
    monkeypatch.setattr(portable_linear, "MAX_VOCAB_CHUNK", 50)
    hidden, weight, b = lm_head(3, 9, 24, 307, torch.float32, True, device)
    _, labels = make_batch(3, 9, 307)
    upstream = torch.randn(3).to(device)
    kwargs = dict(shift=shift, average=average, softcap=6.0)
    out, grads = run(fused, hidden, weight, b, labels, upstream, backend="torch", memory_budget=7 * 50 * 4, **kwargs)
    ref_out, ref_grads = run(naive, hidden, weight, b, labels, upstream, **kwargs)
    assert_fp32_close(out, ref_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_row_tiles(monkeypatch, dtype, device):
    """The portable backward with several row tiles per vocabulary tile (d_weight through its fp32 tile
    accumulator) and ragged tiles both ways."""
    monkeypatch.setattr(portable_linear, "BACKWARD_ROW_TILE", 5)
    n, t, h, v = 4, 6, 40, 123
    hidden, weight, b = lm_head(n, t, h, v, dtype, True, device)
    _, labels = make_batch(n, t, v)
    upstream = torch.randn(n).to(device)
    kwargs = dict(softcap=4.0, logit_scale=1.5)
    out, grads = run(fused, hidden, weight, b, labels, upstream, backend="torch", memory_budget=5 * 50 * 4, **kwargs)
    ref_out, ref_grads = run(naive, hidden, weight, b, labels, upstream, **kwargs)
    if dtype == torch.float32:
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
        return
    _, truth_grads = run(naive, hidden.double(), weight.double(), b.double(), labels, upstream.double(), **kwargs)
    for grad, ref_grad, truth in zip(grads, ref_grads, truth_grads):
        assert_low_precision_grad(grad, ref_grad, truth)


def test_gradcheck_fp64(device):
    hidden, weight, b = lm_head(2, 4, 6, 11, torch.float64, True, device)
    labels = torch.tensor([[-100, 3, 7, 10], [-100, -100, 0, 5]], device=device)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, b))
    fn = lambda h, w, bb: fused_linear_sequence_logps(h, w, labels, bb, softcap=2.0, logit_scale=1.3, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("ref_mode", ["hidden", "hidden_own_head", "logps", "none"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_dpo_loss_matches_reference(backend, ref_mode, device):
    n, t, h, v = 4, 7, 32, 211
    hidden, weight, bias = lm_head(n, t, h, v, torch.float32, True, device)
    _, labels = make_batch(n, t, v)
    ref_hidden, ref_weight, _ = lm_head(n, t, h, v, torch.float32, False, device)
    kwargs = dict(beta=0.3, bias=bias, backend=backend)
    ref_logits = None
    if ref_mode == "hidden":
        kwargs["ref_hidden"] = ref_hidden
        ref_logits = reference.lm_head_logits(ref_hidden, weight)
    elif ref_mode == "hidden_own_head":
        kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight)
        ref_logits = reference.lm_head_logits(ref_hidden, ref_weight)
    elif ref_mode == "logps":
        kwargs["ref_logps"] = ref_logits = (-torch.rand(n) * 30).to(device)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fused_linear_dpo_loss(h1, w1, labels, **kwargs)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss, ref_metrics = reference.dpo_loss(reference.lm_head_logits(h2, w2, bias), ref_logits, labels, beta=0.3)
    ref_loss.backward()
    assert_fp32_close(loss.detach(), ref_loss.detach())
    for name in ref_metrics:
        assert_fp32_close(metrics[name], ref_metrics[name])
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_static_rows_match_the_compacted_rows(monkeypatch, backend, dtype, device):
    """The path taken under CUDA-graph capture (every row runs, no nonzero()) gives the compacted path's
    numbers: the same per-row log-probs, statistics and lse, zeros in unscored rows, and gradients equal up
    to the GEMMs' summation order over more (zeroed) rows. A NaN in an unscored row's hidden state, which
    compaction never reads, must not leak into the weight's gradient, nor a large bias overflow there."""
    from dpo_kernels.ops import linear as linear_ops

    n, t, h, v = 4, 9, 40, 123
    hidden, weight, b = lm_head(n, t, h, v, dtype, True, device)
    b[5] = 95.0  # exp(95) overflows fp32: a zeroed row's softmax must not be formed against lse = 0
    _, labels = make_batch(n, t, v)
    labels[3] = -100
    hidden[0, 0] = float("nan")  # a prompt row (make_batch masks each sequence's first tokens)
    assert labels[0, 1] == -100
    upstream = torch.randn(n, t - 1).to(device)

    def step():
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, b)]
        out = torch.ops.dpo_kernels.fused_linear_token_logps(
            *leaves, labels, -100, True, 1.0, None, 1.0, 0, backend, True
        )
        out[0].backward(upstream)
        return [x.detach() for x in out] + [leaf.grad for leaf in leaves]

    compacted = step()
    monkeypatch.setattr(linear_ops, "_static_rows", lambda labels: True)
    static = step()
    scored = labels[:, 1:] != -100
    assert static[1].shape == compacted[1].shape == (n, t - 1, 2)  # the lse's two parts (m, log s)
    for name, x, y in zip(["logp", "lse", "stats", "d_hidden", "d_weight", "d_bias"], static, compacted):
        assert torch.isfinite(x).all(), name
        if name in ("logp", "lse", "stats"):
            assert torch.equal(x[~scored], torch.zeros_like(x[~scored])), name
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:  # other GEMM shapes, another summation order: a few ulps of the largest entry
            tol = (1e-5 if dtype == torch.float32 else 1e-2) * y.abs().max().item()
            torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_opcheck_and_compile(backend, device):
    hidden, weight, bias = lm_head(4, 5, 16, 123, torch.float32, True, device)
    _, labels = make_batch(4, 5, 123)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, -100, True, 1.0, 3.0, 1.0, 0, backend, False)
    torch.library.opcheck(torch.ops.dpo_kernels.fused_linear_token_logps.default, args)
    torch._dynamo.reset()
    step = torch.compile(fused_linear_dpo_loss, fullgraph=True, backend="aot_eager")
    h = hidden.detach().clone().requires_grad_()
    loss, _ = step(h, weight.detach(), labels, bias=bias.detach(), backend=backend)
    loss.backward()
    h_eager = hidden.detach().clone().requires_grad_()
    eager_loss, _ = fused_linear_dpo_loss(h_eager, weight.detach(), labels, bias=bias.detach(), backend=backend)
    eager_loss.backward()
    assert_fp32_close(loss.detach(), eager_loss.detach())
    assert_fp32_close(h.grad, h_eager.grad)


BAD_CASES = ["weight_H", "weight_dtype", "bias_shape", "hidden_2d", "label_range", "softcap", "temperature",
             "odd_batch", "memory_budget", "two_refs", "ref_logps_shape", "ref_hidden_shape", "ref_hidden_H",
             "ref_weight_V", "ref_bias_shape", "ref_weight_alone"]  # fmt: skip


def bad_cases(device):
    h, w, b = lm_head(4, 5, 8, 50, torch.float32, True, device)
    _, y = make_batch(4, 5, 50, device=device)
    y_bad = y.clone()
    y_bad[0, 3] = 50
    return {
        "weight_H": (dict(policy_hidden=h, weight=w[:, :-1], labels=y), ValueError, r"weight must have shape \(V, H\) with H = 8"),
        "weight_dtype": (dict(policy_hidden=h, weight=w.double(), labels=y), TypeError, "weight must have policy_hidden's dtype"),
        "bias_shape": (dict(policy_hidden=h, weight=w, labels=y, bias=b[:-1]), ValueError, r"bias must have shape \(50,\)"),
        "hidden_2d": (dict(policy_hidden=h[0], weight=w, labels=y), ValueError, r"policy_hidden must have shape \(N, T, H\)"),
        "label_range": (dict(policy_hidden=h, weight=w, labels=y_bad), ValueError, r"labels must lie in \[0, 50\)"),
        "softcap": (dict(policy_hidden=h, weight=w, labels=y, softcap=0.0), ValueError, "softcap must be None or a positive"),
        "temperature": (dict(policy_hidden=h, weight=w, labels=y, temperature=0), ValueError, "temperature must be a positive"),
        "odd_batch": (dict(policy_hidden=h[:3], weight=w, labels=y[:3]), ValueError, "policy_hidden must hold 2B sequences"),
        "memory_budget": (dict(policy_hidden=h, weight=w, labels=y, memory_budget=2), ValueError, "memory_budget must be None or a number of bytes"),
        "two_refs": (dict(policy_hidden=h, weight=w, labels=y, ref_logps=torch.zeros(4, device=device), ref_hidden=h), ValueError, "not both"),
        "ref_logps_shape": (dict(policy_hidden=h, weight=w, labels=y, ref_logps=torch.zeros(3, device=device)), ValueError, r"ref_logps must have shape \(4,\)"),
        "ref_hidden_shape": (dict(policy_hidden=h, weight=w, labels=y, ref_hidden=h[:, :-1]), ValueError, r"ref_hidden must have shape \(N, T, H\) with the \(N, T\) of policy_hidden \(4, 5, 8\), got \(4, 4, 8\)"),
        "ref_hidden_H": (dict(policy_hidden=h, weight=w, labels=y, ref_hidden=h[..., :-1]), ValueError, r"weight \(scoring ref_hidden\) must have shape \(V, H\) with H = 7, got \(50, 8\)"),
        "ref_weight_V": (dict(policy_hidden=h, weight=w, labels=y, ref_hidden=h, ref_weight=w[:-1]), ValueError, r"ref_weight must cover the policy's vocabulary: weight has shape \(50, 8\), ref_weight \(49, 8\)"),
        "ref_bias_shape": (dict(policy_hidden=h, weight=w, labels=y, ref_hidden=h, ref_bias=b[:-1]), ValueError, r"ref_bias must have shape \(50,\), got \(49,\)"),
        "ref_weight_alone": (dict(policy_hidden=h, weight=w, labels=y, ref_weight=w), ValueError, "give ref_hidden too"),
    }


# Checked on the host only on the CPU; on CUDA see test_label_range_on_cuda_is_a_device_side_assert.
CPU_ONLY_CASES = {"label_range": "on CUDA a bad label is a device-side assert, not a ValueError (no host sync)"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.cpu_only(CPU_ONLY_CASES[c])) if c in CPU_ONLY_CASES else c
             for c in BAD_CASES],
)  # fmt: skip
def test_bad_input(case, device):
    cases = bad_cases(device)
    assert list(cases) == BAD_CASES
    kwargs, error, message = cases[case]
    with pytest.raises(error, match=message):
        fused_linear_dpo_loss(**kwargs)


LABEL_RANGE_ON_CUDA = textwrap.dedent(
    """
    import sys
    import torch
    from dpo_kernels import fused_linear_dpo_loss

    backend = sys.argv[1]
    h = torch.randn(4, 5, 8, device="cuda")
    w = torch.randn(50, 8, device="cuda")
    y = torch.randint(0, 50, (4, 5), device="cuda")
    fused_linear_dpo_loss(h, w, y, backend=backend)[0].item()
    print("good labels: ok", flush=True)
    y[0, 3] = 50  # a scored position (after the shift)
    fused_linear_dpo_loss(h, w, y, backend=backend)
    torch.cuda.synchronize()
    print("bad label: no error", flush=True)
    """
)


@pytest.mark.cuda_only
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_label_range_on_cuda_is_a_device_side_assert(backend):
    """The CUDA twin of the label_range case: the check reads no flag on the host (no sync, capturable),
    so a label outside [0, V) stops the stream with a device-side assert at the next synchronization.
    That leaves the process's CUDA context unusable, hence the subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", LABEL_RANGE_ON_CUDA, backend], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert "good labels: ok" in result.stdout, result.stderr[-3000:]
    assert "bad label: no error" not in result.stdout
    assert result.returncode != 0
    assert "device-side assert" in result.stderr, result.stderr[-3000:]
