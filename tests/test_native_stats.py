"""The native kernels' optional per-token statistics (``with_stats``): the columns of
``reference.STATS`` from the same pass over the logits as the log-probs, on every layout, dtype and
edge case the CPU kernels take. The CUDA kernels share the algorithm (see csrc/cuda/logprobs.cu); with
no GPU here they are compiled and checked for register spills, not run.

Tolerances. The truth is ``reference.token_stats`` on the same stored values widened to fp64 (exact
inputs, fp64 arithmetic). Per row, with eps = 2^-23 for fp32 results:
- sum_logits: a float sum's rounding error is a few ulps of the sum of magnitudes (the kernel sums in
  vector lanes, then tiles), so |err| <= 2 eps sum_v |z_v|.
- entropy = log s - s1 / s: the CPU kernel's vectorized exp (at::vec exp_u20) is good to 20 ulps, a
  relative error delta = 20 eps per term; it moves log s by <= delta and s1 / s = E_p[z - m] by
  <= 2 delta E_p|z - m|, so |err| <= 3 delta (1 + E_p|z - m|) (summation rounding included).
- lse2 = 2 m + log s2, s2 = sum e^2: each e^2 is off by <= 2 delta, so |err| <= 3 delta + 2 eps |lse2|.
- top1: exactly equal (comparisons of the stored values).
fp64 results use eps = 2^-52 and delta = sqrt(V) eps: libm's exp is good to an ulp, and what is left
is the rounding of the V-term sums, of the kernel and of the fp64 truth alike (~sqrt(V) eps each).
On CUDA tensors (the CUDA test mode) e^x is ex2.approx of x·log2(e): a few ulps plus |x|·eps for
x = z - m, which moves log s by about eps·E_p|z - m|, inside the same bounds.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_batch
from dpo_kernels import reference
from dpo_kernels.ops import native

pytestmark = pytest.mark.skipif(native.load_error() is not None, reason="dpo_kernels._C is not built")

SUM, ENTROPY, TOP1, LSE2 = range(4)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def native_op(logits, labels, ignore_index=-100, shift=True, with_stats=True):
    return torch.ops.dpo_kernels.native_token_logps(logits, labels, ignore_index, shift, with_stats)


def truth(logits, labels, ignore_index=-100, shift=True):
    """(stats, sum_v |z_v|, E_p|z - m|) in fp64. The entropy takes 0 log 0 = 0 where a logit is -inf
    (the reference forms 0 * -inf = NaN there)."""
    z = logits.double()
    stats = reference.token_stats(z, labels, ignore_index=ignore_index, shift=shift)
    if shift:
        z, labels = z[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    stats[..., ENTROPY] = torch.where(labels != ignore_index, entropy, 0.0)
    m = z.amax(-1, keepdim=True)
    spread = torch.where(p > 0, p * (z - m).abs(), 0.0).sum(-1)
    return stats, z.abs().sum(-1), spread


def assert_stats_close(stats, logits, labels, ignore_index=-100, shift=True):
    want, abs_sum, spread = truth(logits, labels, ignore_index, shift)
    n, t = labels.shape
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert stats.shape == (n, max(t - int(shift), 0), 4) and stats.dtype == out_dtype
    assert stats.is_contiguous()
    eps = torch.finfo(out_dtype).eps
    delta = 20 * eps if out_dtype == torch.float32 else logits.shape[-1] ** 0.5 * eps
    got = stats.double()
    tol = torch.stack(
        [2 * eps * abs_sum, 3 * delta * (1 + spread), torch.zeros_like(spread), 3 * delta + 2 * eps * want[..., LSE2].abs()],
        dim=-1,
    )
    finite = torch.isfinite(want)
    # Non-finite truths (a -inf sum, an all -inf row) must come out the same.
    assert torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num()), (got[~finite], want[~finite])
    err = torch.where(finite, (got - want).abs(), 0.0)
    bad = err > torch.where(finite, tol, 0.0)
    assert not bad.any(), f"columns {bad.nonzero()[:, -1].unique().tolist()}: err {err[bad][:4]} tol {tol[bad][:4]}"
    assert torch.equal(got[..., TOP1], want[..., TOP1])
    masked = (labels[:, int(shift) :] == ignore_index)
    assert (stats[masked] == 0).all()  # unscored rows: exact zeros


def check(logits, labels, ignore_index=-100, shift=True):
    """Both entry points with stats; logp and lse unchanged by with_stats; stats against the truth."""
    logp, lse, stats = native_op(logits, labels, ignore_index, shift)
    logp2, lse2, stats2 = native.token_logps_fwd(logits, labels, ignore_index, shift, with_stats=True)
    plain_logp, plain_lse, empty = native.token_logps_fwd(logits, labels, ignore_index, shift)
    assert empty.shape == (*plain_logp.shape, 0) and empty.dtype == plain_logp.dtype
    torch.testing.assert_close(stats2, stats, rtol=0, atol=0, equal_nan=True)
    # The same s summed in the same order: bitwise equal with and without the statistics.
    torch.testing.assert_close(logp, plain_logp, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0, equal_nan=True)
    assert logp2.shape == plain_logp.shape and lse2.shape == (*plain_logp.shape, 2)  # lse: (m, log s)
    assert_stats_close(stats, logits, labels, ignore_index, shift)
    return stats


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("v", [123, 507, 5000, 50257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_match_the_reference(dtype, v, shift):
    n, t = (2, 3) if v > 10000 else (3, 6)
    logits, labels = make_batch(n, t, v, dtype=dtype)
    stats = check(logits, labels, shift=shift)
    # Against the reference in the output dtype too (its own fp32 rounding included): loose, but the
    # label's top-1 must agree exactly.
    ref = reference.token_stats(logits, labels, shift=shift)
    torch.testing.assert_close(stats, ref, rtol=2e-5, atol=2e-5 * (1 + v / 500))  # the sum: ~eps32·Σ|z|
    assert torch.equal(stats[..., TOP1], ref[..., TOP1])


def test_without_stats_the_outputs_are_unchanged():
    logits, labels = make_batch(3, 7, 507)
    logp, lse, stats = native_op(logits, labels, with_stats=False)
    assert stats.shape == (3, 6, 0) and stats.dtype == torch.float32
    torch.testing.assert_close(logp, reference.token_logps(logits, labels), rtol=1e-5, atol=1e-5)
    logp3, lse3, stats3 = torch.ops.dpo_kernels.native_token_logps(logits, labels, -100, True)  # the default
    assert stats3.shape == (3, 6, 0) and torch.equal(logp3, logp) and torch.equal(lse3, lse)
    logits64 = logits.double()
    assert native_op(logits64, labels, shift=False, with_stats=False)[2].shape == (3, 7, 0)
    assert native_op(logits64, labels, shift=False, with_stats=False)[2].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_strided_layouts(dtype, device):
    _, labels = make_batch(3, 5, 507)
    wide = (torch.randn(3, 5, 520) * 3).to(dtype).to(device)
    check(wide[..., 3:510], labels)  # unit vocab stride, rows that start off any vector boundary
    by_vocab = (torch.randn(3, 507, 5) * 3).to(dtype).to(device)
    check(by_vocab.transpose(1, 2), labels)  # vocab stride 5: the scalar strided path
    every_other = (torch.randn(3, 10, 507) * 3).to(dtype).to(device)
    check(every_other[:, ::2], labels)  # time stride 2 V
    check(every_other[:1, :5].expand(3, 5, 507), labels)  # batch stride 0
    check((torch.randn(5, 3, 507) * 3).to(dtype).to(device).transpose(0, 1), labels)  # batch stride V, time 3 V
    labels_t = labels.t().contiguous().t()  # strided labels
    check(wide[..., 3:510], labels_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_int32_labels_custom_ignore_index_and_masked_rows(dtype):
    logits, labels = make_batch(4, 6, 5000, dtype=dtype, label_dtype=torch.int32)
    labels[labels == -100] = -1
    labels[2] = -1  # a sequence with no scored token
    stats = check(logits, labels, ignore_index=-1)
    assert (stats[2] == 0).all()
    # An ignore_index that is a real token id: those tokens are unscored, not counted.
    labels0 = labels.clamp(min=0)
    labels0[:, ::2] = 0
    check(logits, labels0, ignore_index=0, shift=False)
    # Nothing scored at all, and nothing to score.
    check(logits, torch.full_like(labels, -100))
    assert native_op(logits[:, :1], labels[:, :1])[2].shape == (4, 0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_minus_infinity_logits(dtype):
    """Banned tokens at -inf: scattered, a whole CPU tile (4096) of them before any finite logit, and
    labels inside the -inf stretch. The sum is -inf; the entropy takes 0 log 0 = 0; no NaN anywhere."""
    logits, labels = make_batch(3, 6, 5000, dtype=dtype, prompt=0)
    logits[0, :, :4500] = float("-inf")  # whole leading tile(s)
    logits[1, :, 4096:4300] = float("-inf")  # a stretch inside the second tile
    logits[2, :, ::7] = float("-inf")  # scattered, vector lanes and scalar tail
    labels[0, ::2] = labels[0, ::2] % 500 + 4500
    labels[0, 1::2] = labels[0, 1::2] % 4500  # a -inf label: not the top-1
    stats = check(logits, labels)
    assert torch.isfinite(stats[..., [ENTROPY, TOP1, LSE2]]).all()
    assert (stats[..., SUM] == float("-inf")).all()
    assert (stats[0, 0::2, TOP1] >= 0).all() and (stats[0, 1::2, TOP1] == 0).all()
    # The strided path with the same rows.
    transposed = logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert transposed.stride(2) != 1
    check(transposed, labels)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_top1_ties(dtype, layout, device):
    """The label is the top-1 only as the FIRST index of the maximum (argmax's tie rule), wherever the
    equal maxima sit: one vector, neighbouring vectors, two CPU tiles (4096), the scalar tail."""
    v = 5000
    logits = (torch.randn(1, 10, v) * 3).clamp(max=8).to(dtype)  # the clamp makes ~20 maxima tie at 8
    peaks = [(0, 1), (5, 6), (100, 4500), (4095, 4096), (4990, 4999), (13, 14), (3, 9, 4999)]
    for row, idx in enumerate(peaks):
        logits[0, row, list(idx)] = 10.0
    logits[0, 7] = 1.5  # a constant row: every entry ties
    last_max = (logits[0, 9] == logits[0, 9].max()).nonzero().max().item()
    labels = torch.tensor([[1, 5, 4500, 4095, 4999, 13, 9, 0, 0, last_max]])
    labels[0, 8] = logits[0, 8].double().argmax()  # the first of the clamped maxima
    logits, labels = logits.to(device), labels.to(device)
    if layout == "strided":
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        assert logits.stride(2) == 10
    stats = check(logits, labels, shift=False)
    n_max9 = (logits[0, 9] == logits[0, 9].max()).sum().item()
    expected = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, float(n_max9 == 1)]
    assert stats[0, :, TOP1].tolist() == expected


def test_top1_when_the_label_is_the_first_max(device):
    logits = (torch.randn(2, 6, 507) * 3).to(torch.bfloat16).to(device)  # bf16: ties among the largest values happen
    labels = logits.float().argmax(-1)  # shift=False: the label is each row's first max
    stats = check(logits, labels, shift=False)
    assert (stats[..., TOP1] == 1).all()
    logits[..., 0] = logits.float().amax(-1).to(torch.bfloat16)  # now an equal max comes first
    stats = check(logits, labels, shift=False)
    assert torch.equal(stats[..., TOP1], (labels == 0).float())


def test_out_of_range_labels_are_not_the_top1(device):
    """The native op does not check the label range (the Python op does): a label outside [0, V) is one
    the vocabulary window does not own, scored as a label logit of 0: logp = -lse, never NaN, top1 0."""
    logits = torch.randn(1, 3, 123).to(device)
    logits[0, :, 0] = 50.0
    labels = torch.tensor([[0, 123, -5]], device=device)
    logp, lse, stats = native_op(logits, labels, shift=False)
    assert torch.equal(logp[0, 1:], -(lse[0, 1:, 0] + lse[0, 1:, 1])) and stats[0, :, TOP1].tolist() == [1.0, 0.0, 0.0]
    ok = labels.clamp(0, 122)
    _, _, want = native_op(logits, ok, shift=False)
    torch.testing.assert_close(stats[..., [SUM, ENTROPY, LSE2]], want[..., [SUM, ENTROPY, LSE2]], rtol=0, atol=0)


def test_offsets_past_2_pow_31(device):
    """A row that starts past 2^31 elements although every stride fits in int32: int64 offsets."""
    n, t, v = 3, 3, 1000
    stride = 2**30 + 12345  # sequence n = 2 starts at 2^31 + 24690 elements
    # 4.3 GB; on the CPU the untouched pages stay unallocated
    storage = torch.empty((n - 1) * stride + t * v, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((n, t, v), (stride, v, 1))
    dense = (torch.randn(n, t, v) * 3).to(torch.bfloat16).to(device)
    logits.copy_(dense)
    _, labels = make_batch(n, t, v, prompt=0)
    labels[2, 1] = dense[2, 0].float().argmax()
    _, _, stats = native_op(logits, labels)
    _, _, dense_stats = native_op(dense, labels)
    assert torch.equal(stats, dense_stats)
    assert_stats_close(stats, dense, labels)
    assert stats[2, 0, TOP1] == 1


def test_opcheck_with_stats(device):
    logits, labels = make_batch(2, 5, 123)
    low, labels32 = make_batch(2, 4, 123, dtype=torch.bfloat16, label_dtype=torch.int32)
    samples = [
        (logits, labels, -100, True, True),
        (low, labels32.masked_fill(labels32 == -100, 0), 0, False, True),
        ((torch.randn(5, 2, 507) * 3).to(device).transpose(0, 1), make_batch(2, 5, 507)[1], -100, True, True),
        (logits.double(), labels, -100, False, True),
        (logits, labels, -100, True, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.dpo_kernels.native_token_logps.default, args)


def check_every_path_of_a_kernel_copy():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for v in (123, 5000):  # a vector tail; more than one tile
            logits, labels = make_batch(3, 7, v, dtype=dtype)
            logits[0, :, : min(v, 4200)] = float("-inf")
            logits[1, :, [3, 60, v - 1]] = 9.0  # ties: in a vector, another vector, the tail
            labels[1, 1:4] = torch.tensor([3, 60, v - 1], device=labels.device)
            check(logits, labels)


@pytest.mark.cpu_only("the CPU kernel copies per instruction set")
@pytest.mark.parametrize(  # the copies other than this process's run in a process each: slow
    "capability",
    [c if c.upper() == torch.backends.cpu.get_cpu_capability() else pytest.param(c, marks=pytest.mark.slow)
     for c in ("default", "avx2", "avx512")],  # fmt: skip
)
def test_every_cpu_kernel_copy_computes_the_stats(capability):
    """The stats loops are vectorized per instruction set: run each compiled copy (the copy this
    process runs in place, the others in a process with ATEN_CPU_CAPABILITY set)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if capability == "avx512" and "avx512f" not in flags:
        pytest.skip("this CPU has no AVX-512: that copy is compiled and linked but cannot run here")
    if torch.backends.cpu.get_cpu_capability() == capability.upper():
        check_every_path_of_a_kernel_copy()
        return
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import test_native_stats
        print(torch.backends.cpu.get_cpu_capability())
        torch.manual_seed(0)
        test_native_stats.check_every_path_of_a_kernel_copy()
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", script, tests_dir], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    chosen, status = result.stdout.split()[-2:]
    assert chosen == capability.upper() and status == "ok"
