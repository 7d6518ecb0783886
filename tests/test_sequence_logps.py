"""sequence_logps on every backend against the naive reference: values, gradients, layouts."""

import pytest
import torch

from conftest import BACKENDS, DTYPES, assert_fp32_close, assert_low_precision_grad, make_batch
from dpo_kernels import reference, sequence_logps

# (N, T, V): vocabularies that are not multiples of any block size, one tile and many tiles. The small shapes
# (T = 1 and 2, V up to 300 and next to each block size), and shift / average in all four combinations, are
# tests/test_differential.py's seeded cases, each on every backend against fp64 (its coverage test holds that).
SHAPES = [(4, 9, 507), (2, 3, 50257)]


def logps_and_grad(fn, leaf, labels, upstream, view=lambda x: x, **kwargs):
    """fn(view(leaf), labels) and the gradient it sends back to ``leaf``."""
    leaf = leaf.detach().clone().requires_grad_()
    out = fn(view(leaf), labels, **kwargs)
    out.backward(upstream)
    return out.detach(), leaf.grad


def check_against_reference(backend, logits, labels, view=lambda x: x, **kwargs):
    upstream = torch.randn(view(logits).shape[0], dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    upstream = upstream.to(logits.device)
    out, grad = logps_and_grad(sequence_logps, logits, labels, upstream, view, backend=backend, **kwargs)
    ref_out, ref_grad = logps_and_grad(reference.sequence_logps, logits, labels, upstream, view, **kwargs)
    assert out.dtype == ref_out.dtype and grad.dtype == logits.dtype
    assert_fp32_close(out, ref_out)
    if logits.dtype in (torch.float32, torch.float64):
        assert_fp32_close(grad, ref_grad)
    else:
        _, truth = logps_and_grad(reference.sequence_logps, logits.double(), labels, upstream.double(), view, **kwargs)
        assert_low_precision_grad(grad, ref_grad, truth)
    return out, grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, shape):
    logits, labels = make_batch(*shape, dtype=dtype)
    check_against_reference(backend, logits, labels)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_sequence_is_zero_with_zero_gradient(backend, average, device):
    logits, labels = make_batch(4, 6, 123)
    labels[1] = -100
    logits[1] = float("nan")  # a masked row's logits are never read
    out, grad = check_against_reference(backend, logits.nan_to_num(), labels, average=average)
    assert out[1] == 0
    out, grad = logps_and_grad(sequence_logps, logits, labels, torch.ones(4, device=device), backend=backend,
                               average=average)  # fmt: skip
    assert out[1] == 0 and torch.isfinite(out).all()
    assert (grad[1] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_and_unscored_rows_get_exact_zero_gradient(backend, device):
    logits, labels = make_batch(2, 6, 123)
    _, grad = logps_and_grad(sequence_logps, logits, labels, torch.ones(2, device=device), backend=backend)
    scored = torch.zeros(2, 6, dtype=torch.bool, device=device)
    scored[:, :-1] = labels[:, 1:] != -100  # logits row t is scored by label t + 1
    assert (grad[~scored] == 0).all()
    assert (grad[scored].abs().sum(-1) > 0).all()


# Views whose rows are not contiguous in memory; each maps the leaf tensor to the (N, T, V) logits.
LAYOUTS = {
    "slice_of_longer": (lambda n, t, v: (n, t + 1, v), lambda x: x[:, :-1]),
    "transposed_batch": (lambda n, t, v: (t, n, v), lambda x: x.transpose(0, 1)),
    "vocab_stride_2": (lambda n, t, v: (n, t, v, 2), lambda x: x[..., 0]),
    "vocab_major": (lambda n, t, v: (v, n, t), lambda x: x.permute(1, 2, 0)),
}


# Every layout in fp32; in bf16 the strided vocabularies (a time slice and a transposed batch in bf16 and fp16 are
# among tests/test_differential.py's cases).
LAYOUT_DTYPES = [(layout, torch.float32) for layout in LAYOUTS] + [
    ("vocab_stride_2", torch.bfloat16),
    ("vocab_major", torch.bfloat16),
]


@pytest.mark.parametrize("layout,dtype", LAYOUT_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits_and_labels(backend, dtype, layout, device):
    n, t, v = 4, 6, 507
    leaf_shape, view = LAYOUTS[layout]
    leaf = (torch.randn(leaf_shape(n, t, v)) * 3).to(dtype).to(device)
    _, labels = make_batch(n, t, v)
    labels = labels.t().contiguous().t()  # column-major labels
    assert not view(leaf).is_contiguous() and not labels.is_contiguous()
    check_against_reference(backend, leaf, labels, view=view)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels(backend):
    logits, labels = make_batch(2, 5, 123, label_dtype=torch.int32)
    check_against_reference(backend, logits, labels)


@pytest.mark.parametrize("ignore_index", [-1, 0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend, ignore_index):
    logits, labels = make_batch(2, 5, 123)
    labels[labels == -100] = ignore_index
    check_against_reference(backend, logits, labels, ignore_index=ignore_index)


def lm_head_logps(backend, inplace, hidden, weight, labels, dtype):
    """Logits from a matmul (a non-leaf, as in a model), scored with or without the in-place gradient."""
    h = hidden.detach().clone().requires_grad_()
    logits = (h @ weight.T).to(dtype)
    out = sequence_logps(logits, labels, backend=backend, inplace_backward=inplace)
    out.backward(torch.arange(1.0, 1.0 + out.shape[0], device=out.device))
    return out.detach(), h.grad, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_matches_and_reuses_logits_storage(backend, dtype, device):
    hidden, weight = torch.randn(4, 6, 16).to(device), torch.randn(507, 16).to(device)
    _, labels = make_batch(4, 6, 507)
    out, grad, _ = lm_head_logps(backend, False, hidden, weight, labels, dtype)
    out_inplace, grad_inplace, logits = lm_head_logps(backend, True, hidden, weight, labels, dtype)
    torch.testing.assert_close(out_inplace, out, rtol=0, atol=0)
    torch.testing.assert_close(grad_inplace, grad, rtol=0, atol=0)
    # The logits now hold their own gradient: exact zeros on the rows nothing scored.
    assert (logits[:, -1] == 0).all() and (logits[labels[:, 1:].eq(-100).nonzero(as_tuple=True)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_a_leaf(backend):
    logits, labels = make_batch(2, 4, 123)
    with pytest.raises(ValueError, match="inplace_backward"):
        sequence_logps(logits.requires_grad_(), labels, backend=backend, inplace_backward=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_detects_other_users_of_the_logits(backend, device):
    hidden, weight = torch.randn(2, 4, 8).to(device).requires_grad_(), torch.randn(123, 8).to(device)
    _, labels = make_batch(2, 4, 123)
    logits = hidden @ weight.T
    # pow saves the logits for its backward; created first, it runs after the in-place gradient.
    other = (logits**2).sum()
    loss = sequence_logps(logits, labels, backend=backend, inplace_backward=True).sum() + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_2_pow_31(backend, device):
    """A row that starts past 2^31 elements although every stride fits in int32, as in a contiguous
    (N, T, V) batch at real sizes: the kernels must form their offsets in int64."""
    n, t, v = 3, 3, 1000
    stride = 2**30 + 12345  # sequence n = 2 starts at 2^31 + 24690 elements
    # 4.3 GB; on the CPU the untouched pages stay unallocated
    storage = torch.empty((n - 1) * stride + t * v, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((n, t, v), (stride, v, 1))
    dense = (torch.randn(n, t, v) * 3).to(torch.bfloat16).to(device)
    logits.copy_(dense)
    _, labels = make_batch(n, t, v, prompt=0)
    out = sequence_logps(logits, labels, backend=backend)
    torch.testing.assert_close(out, reference.sequence_logps(dense, labels), rtol=1e-5, atol=1e-5)
    leaf = logits.detach().requires_grad_()
    sequence_logps(leaf, labels, backend=backend).sum().backward()
    dense.requires_grad_()
    reference.sequence_logps(dense, labels).sum().backward()
    torch.testing.assert_close(leaf.grad, dense.grad, rtol=0, atol=2**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_infinity_logits_a_whole_tile_long(backend, dtype):
    """Banned tokens at -inf, more of them than one vocabulary tile: the online max starts at -inf
    and must not turn the running sum into NaN."""
    logits, labels = make_batch(2, 4, 5000, dtype=dtype)
    logits[..., :4500] = float("-inf")
    labels[labels >= 0] = labels[labels >= 0] % 500 + 4500
    out, grad = check_against_reference(backend, logits, labels)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
