"""Per-token statistics (token_logps with with_stats=True) on every backend against reference.token_stats.

Columns: reference.STATS = (sum_logits, entropy, top1, lse2). Expected values come from the reference
on the same logits (upcast exactly from their dtype), so the tolerances are those of fp32 arithmetic
on identical inputs, whatever the logits dtype.
"""

import math

import pytest
import torch

import dpo_kernels  # noqa: F401  (registers the ops)
from conftest import BACKENDS, DTYPES, assert_fp32_close, make_batch
from dpo_kernels import ops, reference
from dpo_kernels.triton import logprobs
from test_sequence_logps import LAYOUTS

SUM, ENTROPY, TOP1, LSE2 = range(4)
assert reference.STATS == ("sum_logits", "entropy", "top1", "lse2")


def token_logps(logits, labels, backend, *, ignore_index=-100, shift=True, with_stats=True):
    return torch.ops.dpo_kernels.token_logps(logits, labels, ignore_index, shift, backend, False, with_stats)


def scored_logits(logits, labels, shift):
    """The fp32 (fp64) logits rows that are scored, as the reference sees them, and their labels."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits.to(torch.promote_types(logits.dtype, torch.float32)), labels


def assert_stats_close(stats, logits, labels, *, ignore_index=-100, shift=True, expected=None):
    """stats against reference.token_stats column by column; top1 exactly, zeros on ignored tokens.

    Every column is held to rtol 1e-5 (fp32; 1e-12 for fp64) plus an atol per token set by the
    magnitude of the terms behind it, in units of the dtype's eps:
    - sum_logits = Σ_v z_v: any two summation orders of V terms differ by up to (V - 1)·eps·Σ_v|z_v|,
      and by about eps·Σ_v|z_v| for the blocked / pairwise orders used here; the sum itself may be far
      smaller than Σ|z| (random signs cancel), so a relative tolerance alone would be meaningless.
    - entropy = Σ_v p_v·(lse − z_v): the reference forms each log p_v = z_v − lse with an absolute
      error of order eps·(|z_v| + |lse|); weighted by p_v that sums to eps·(max|z| + |lse|).
    - lse2 = log Σ exp(2 z): rounding of 2·max z and of log(Σ) over V terms: eps·(2 max|z| + log V).
    """
    z, y = scored_logits(logits, labels, shift)
    if expected is None:
        expected = reference.token_stats(logits, labels, ignore_index=ignore_index, shift=shift)
    assert stats.shape == expected.shape and stats.dtype == expected.dtype, (stats.shape, stats.dtype)
    mask = y != ignore_index
    assert (stats[~mask] == 0).all(), "ignored tokens must hold zeros"
    finite = z.isfinite()
    z0 = torch.where(finite, z, 0.0)
    eps = torch.finfo(stats.dtype).eps
    rtol = 1e-5 if stats.dtype == torch.float32 else 1e-12
    max_abs = z0.abs().amax(-1)
    lse = torch.logsumexp(z, dim=-1).nan_to_num(0.0, 0.0, 0.0).abs()
    atol = {
        SUM: 2 * eps * z0.abs().sum(-1),
        ENTROPY: 4 * eps * (max_abs + lse),
        LSE2: 4 * eps * (2 * max_abs + math.log(z.shape[-1])),
    }
    for column, tol in atol.items():
        actual, wanted = stats[..., column][mask], expected[..., column][mask]
        same_inf = (actual == wanted) & wanted.isinf()  # sum_logits of a row with -inf logits
        bound = rtol * wanted.abs().nan_to_num(0.0) + tol[mask]
        err = (actual - wanted).abs()
        ok = same_inf | (err <= bound)
        assert ok.all(), f"{reference.STATS[column]}: max err {err[~ok].max()} over bound at {(~ok).nonzero()[:5]}"
    torch.testing.assert_close(stats[..., TOP1], expected[..., TOP1], rtol=0, atol=0)


def check(backend, logits, labels, **kwargs):
    """Stats against the reference; logp and lse identical with and without stats, and right."""
    logp, lse, stats = token_logps(logits, labels, backend, **kwargs)
    assert_stats_close(stats, logits, labels, **kwargs)
    logp0, lse0, empty = token_logps(logits, labels, backend, with_stats=False, **kwargs)
    assert empty.shape == (*logp.shape, 0) and empty.dtype == logp.dtype
    torch.testing.assert_close(logp0, logp, rtol=0, atol=0)
    torch.testing.assert_close(lse0, lse, rtol=0, atol=0)
    assert_fp32_close(logp, reference.token_logps(logits, labels, **kwargs))
    return stats


# fp64 logits are the portable backend's (Triton takes fp32 / bf16 / fp16). The native backend's value grid is
# tests/test_native_stats.py's test_stats_match_the_reference: the same dtypes, vocabularies and shifts (and
# V = 50257), held to an error model against fp64 as well as to the reference, with the same check of logp and lse
# with and without the statistics.
BACKEND_DTYPES = [
    (b, d) for b in ("torch", "triton") for d in [*DTYPES, torch.float64] if (b, d) != ("triton", torch.float64)
]


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("V", [123, 5000])  # one tile, off every vector width; more than one 4096 tile
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference(backend, dtype, V, shift):
    logits, labels = make_batch(2, 5, V, dtype=dtype)
    check(backend, logits, labels, shift=shift)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary(backend):
    logits, labels = make_batch(2, 3, 50257, dtype=torch.bfloat16, prompt=0)
    check(backend, logits, labels)


@pytest.mark.parametrize("V", [1, 3, 7, 9, 4103])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_odd_rows_at_every_phase(dtype, V, device):
    """Odd rows (ALIGN > 1 in the Triton kernels) at every address modulo 16 bytes: every head length,
    heads cut to V (V < ALIGN - 1), a head and a ragged end in the narrow tile together, and a ragged end
    past the first 4096 tile; logp and lse bitwise those without statistics (check)."""
    # One sequence of 9: its 8 scored rows start at 8 consecutive multiples of an odd V, every phase modulo ALIGN
    # (8 for fp16, 4 for fp32).
    logits, labels = make_batch(1, 9, V, dtype=dtype, prompt=0, device=device)
    assert logprobs.row_align(logits) == 16 // logits.element_size()
    labels[0, 5] = logits[0, 4].float().argmax()  # a certain top-1 hit
    stats = check("triton", logits, labels)
    assert stats[0, 4, TOP1] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_scored_rows_and_empty_outputs(backend):
    logits, labels = make_batch(2, 1, 123)  # T = 1 with a shift: nothing to score
    logp, lse, stats = token_logps(logits, labels, backend)
    assert logp.shape == (2, 0) and stats.shape == (2, 0, 4)
    assert token_logps(logits, labels, backend, with_stats=False)[2].shape == (2, 0, 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits_and_labels(backend, layout, device):
    n, t, v = 3, 4, 507
    leaf_shape, view = LAYOUTS[layout]
    logits = view((torch.randn(leaf_shape(n, t, v)) * 3).to(torch.bfloat16).to(device))
    _, labels = make_batch(n, t, v)
    labels = labels.t().contiguous().t()  # column-major labels
    assert not logits.is_contiguous() and not labels.is_contiguous()
    check(backend, logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels(backend):
    logits, labels = make_batch(2, 5, 123, label_dtype=torch.int32)
    check(backend, logits, labels)


@pytest.mark.parametrize("ignore_index", [-1, 0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend, ignore_index):
    logits, labels = make_batch(2, 5, 123)
    labels[labels == -100] = ignore_index
    check(backend, logits, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_sequence_is_zero_and_never_read(backend):
    logits, labels = make_batch(3, 5, 123)
    labels[1] = -100
    check(backend, logits, labels)
    logits[1] = float("nan")  # a masked row's logits are never read
    _, _, stats = token_logps(logits, labels, backend)
    assert (stats[1] == 0).all() and torch.isfinite(stats).all()


def expected_without(logits, labels, banned):
    """reference.token_stats for logits whose columns ``banned`` are -inf (no label among them): the
    reference's entropy is NaN there (0 · -inf), so entropy, top1 and lse2 come from the reference on
    the remaining columns, whose distribution is the same; sum_logits is -inf on every scored row."""
    keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[banned] = False
    new_index = keep.cumsum(0) - 1
    mask = labels != -100
    assert keep[labels[mask]].all()
    narrow_labels = torch.where(mask, new_index[labels.clamp(min=0)], -100)
    expected = reference.token_stats(logits[..., keep], narrow_labels)
    expected[..., SUM] = torch.where(mask[:, 1:], float("-inf"), 0.0)
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_infinity_logits_a_whole_tile_long(backend, dtype):
    """Banned tokens at -inf over more than one Triton tile (4096): the online max starts at -inf."""
    logits, labels = make_batch(2, 4, 5000, dtype=dtype)
    banned = torch.arange(4500)
    logits[..., banned] = float("-inf")
    labels[labels >= 0] = labels[labels >= 0] % 500 + 4500
    labels[0, 2] = logits[0, 1, 4500:].float().argmax() + 4500  # one certain top-1 hit
    stats = token_logps(logits, labels, backend)[2]
    assert_stats_close(stats, logits, labels, expected=expected_without(logits, labels, banned))
    assert stats[0, 1, TOP1] == 1 and not stats[..., ENTROPY].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scattered_minus_infinity_logits(backend, device):
    """-inf at the first and last columns of the tile and in between; a row that is -inf but for two."""
    logits, labels = make_batch(3, 5, 507, prompt=0)
    banned = torch.cat([torch.tensor([0, 506]), torch.randperm(505)[:60] + 1])
    logits[..., banned] = float("-inf")
    allowed = torch.ones(507, dtype=torch.bool)
    allowed[banned] = False
    choices = allowed.nonzero().squeeze(1)
    labels = choices[torch.randint(0, choices.numel(), labels.shape)].to(device)
    labels[2, -1] = -100
    logits[1, 2, allowed] = float("-inf")
    logits[1, 2, choices[:2]] = torch.tensor([1.0, 2.0], device=device)
    labels[1, 3] = choices[1]  # the row's maximum
    expected = expected_without(logits, labels, banned)
    p = torch.tensor([1.0, 2.0], device=device).softmax(0)
    assert expected[1, 2, ENTROPY].isnan()  # the reference's 0 · -inf again, on the narrowed row
    expected[1, 2, ENTROPY] = -(p * p.log()).sum()
    stats = token_logps(logits, labels, backend)[2]
    assert_stats_close(stats, logits, labels, expected=expected)
    assert stats[1, 2, TOP1] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_ties(backend, dtype, device):
    """Repeated maxima: top1 only where the label is the FIRST index of the maximum."""
    V = 123
    logits = torch.randint(-3, 4, (2, 6, V)).to(dtype).to(device)  # small integers: ties everywhere, exact in any dtype
    labels = torch.randint(0, V, (2, 6)).to(device)
    row = logits[0]
    row[:, 40], row[:, 90] = 9, 9  # two maxima in every row of sequence 0
    labels[0, 1], labels[0, 2], labels[0, 3] = 40, 90, 41  # first max, later max, not a max
    top = logits[1].float().amax(-1, keepdim=True)
    first_max = (logits[1].float() == top).int().argmax(-1)  # first True
    labels[1, 1:] = first_max[:-1]  # rows with many tied maxima, label the first of them
    labels[1, 3] = (logits[1, 2].float() == top[2]).nonzero()[-1, 0]  # ... the last of them
    stats = check(backend, logits, labels)
    assert stats[0, :3, TOP1].tolist() == [1.0, 0.0, 0.0]
    assert stats[1, 0, TOP1] == 1 and stats[1, 3, TOP1] == 1
    assert stats[1, 2, TOP1] == float((logits[1, 2].float() == top[2]).sum() == 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_ties_across_tiles(backend, device):
    """Equal maxima in different Triton tiles (4096 wide) of a 5000-token vocabulary."""
    logits = torch.randn(1, 4, 5000).to(device)
    logits[0, :, [100, 4500]] = 10.0
    labels = torch.tensor([[0, 100, 4500, 7]], device=device)
    stats = check(backend, logits, labels)
    assert stats[0, :, TOP1].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_2_pow_31(backend, device):
    """Rows starting past 2^31 elements: the label logit is read with int64 offsets."""
    n, t, v = 3, 3, 1000
    stride = 2**30 + 12345
    # 4.3 GB; on the CPU the untouched pages stay unallocated
    storage = torch.empty((n - 1) * stride + t * v, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((n, t, v), (stride, v, 1))
    dense = (torch.randn(n, t, v) * 3).to(torch.bfloat16).to(device)
    logits.copy_(dense)
    _, labels = make_batch(n, t, v, prompt=0)
    labels[2, 1] = dense[2, 0].float().argmax()
    stats = token_logps(logits, labels, backend)[2]
    assert_stats_close(stats, dense, labels)
    assert stats[2, 0, TOP1] == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_with_stats(backend, device):
    # Two samples between them: fp32 and bf16, int64 and int32 labels, ignore_index -100 and 0, shift and not,
    # contiguous and a transposed batch (each opcheck calls the op a dozen times, under the interpreter for Triton).
    logits, labels = make_batch(2, 5, 123)
    low, labels32 = make_batch(2, 4, 123, dtype=torch.bfloat16, label_dtype=torch.int32)
    samples = [
        (logits, labels, -100, True),
        (low.transpose(0, 1).contiguous().transpose(0, 1), labels32.masked_fill(labels32 == -100, 0), 0, False),
    ]
    for logits, labels, ignore_index, shift in samples:
        args = (logits.requires_grad_(), labels, ignore_index, shift, backend, False, True)
        torch.library.opcheck(torch.ops.dpo_kernels.token_logps.default, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stats_carry_no_gradient(backend):
    logits, labels = make_batch(2, 5, 123)
    leaf = logits.clone().requires_grad_()
    logp, lse, stats = token_logps(leaf, labels, backend)
    assert logp.requires_grad and not stats.requires_grad
    logp.sum().backward()
    expected = logits.clone().requires_grad_()
    reference.token_logps(expected, labels).sum().backward()
    assert_fp32_close(leaf.grad, expected.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_with_stats(backend):
    torch._dynamo.reset()
    logits, labels = make_batch(2, 6, 507)

    def step(x):
        logp, lse, stats = torch.ops.dpo_kernels.token_logps(x, labels, -100, True, backend, False, True)
        mask = labels[:, 1:] != -100
        metrics = {  # TRL's token metrics, and WPO's log Σ p² = lse2 − 2·lse
            "entropy": stats[..., ENTROPY].sum() / mask.sum(),
            "accuracy": stats[..., TOP1].sum() / mask.sum(),
            "log_sum_sq": torch.where(mask, stats[..., LSE2] - 2 * ops.lse_value(lse), 0.0).sum(),
        }
        return -logp.sum(), metrics

    leaf = logits.clone().requires_grad_()
    loss, metrics = torch.compile(step, fullgraph=True, backend="aot_eager")(leaf)
    loss.backward()
    eager_leaf = logits.clone().requires_grad_()
    eager_loss, eager_metrics = step(eager_leaf)
    eager_loss.backward()
    assert_fp32_close(loss.detach(), eager_loss.detach())
    for name in eager_metrics:
        assert_fp32_close(metrics[name], eager_metrics[name])
    assert_fp32_close(leaf.grad, eager_leaf.grad)
    ref = reference.token_stats(logits, labels)
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(metrics["accuracy"], ref[..., TOP1].sum() / mask.sum(), rtol=0, atol=0)
    assert_fp32_close(metrics["entropy"], ref[..., ENTROPY].sum() / mask.sum())


@pytest.mark.parametrize("layout", ["contiguous", "transposed_batch"])
def test_portable_many_chunks(monkeypatch, layout):
    """The portable backend's chunks (here 3 rows each, its buffer reused) on row views and gathers."""
    from dpo_kernels.portable import logprobs

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 507)
    logits, labels = make_batch(3, 8, 507)
    if layout == "transposed_batch":
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
    check("torch", logits, labels)
