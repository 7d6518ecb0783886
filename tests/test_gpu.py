"""What only a GPU can check (the CUDA test mode, ``DPO_KERNELS_TEST_DEVICE=cuda``): the launch
configurations the launchers pick there (vocabulary splits > 1, every Triton config), real vocabularies
in bf16 / fp16, bitwise determinism, CUDA graph capture of training steps, offsets past 2^31 elements in
the fused LM head, and the memory the in-place backward saves. The kernel tests of the other files run
on CUDA tensors in this mode too (the native CUDA kernels among them, through backend="native").

References and tolerances are the ones of the files the helpers come from (test_sequence_logps,
test_triton_linear, test_fused_linear_stats): fp64 truth on the device; bf16 / fp16 gradients may err from
it by the naive same-dtype reference's own error plus one ulp (conftest.assert_low_precision_grad).
"""

import pytest
import torch

from conftest import assert_low_precision_grad, make_batch
from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss, reference, sequence_logps
from dpo_kernels.ops import native
from dpo_kernels.triton import linear as triton_linear
from dpo_kernels.triton import logprobs as triton_logprobs
from test_fused_linear_stats import NEAR_TIE
from test_sequence_logps import check_against_reference
from test_triton_linear import close, make_inputs, reference_logps, run_kernels

pytestmark = pytest.mark.cuda_only

LOW_PRECISION = [torch.bfloat16, torch.float16]
VOCABS = [123, 50257, 128256]  # a toy vocabulary (one 1024 tile), GPT-2's, Llama 3's


def test_native_cuda_kernels_are_built_and_registered():
    assert native.load_error() is None, native.load_error()
    assert native.has_kernel("cuda")


def spy(monkeypatch, module, name):
    """Record every return value of ``module.name`` (the launchers look it up at call time)."""
    calls = []
    real = getattr(module, name)

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(module, name, recording)
    return calls


# ----------------------------------------------------------------------------- logits path at real sizes


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_logits_path_at_real_vocabularies(backend, dtype, V, monkeypatch):
    """Both Triton configs (a 1024 tile for V <= 1024, 4096 tiles beyond) and the native CUDA kernels."""
    configs = spy(monkeypatch, triton_logprobs, "launch_config")
    logits, labels = make_batch(4, 32, V, dtype=dtype)
    check_against_reference(backend, logits, labels)
    if backend == "triton":  # forward and backward
        assert configs == [triton_logprobs.LAUNCH_CONFIGS[0 if V <= 1024 else 1]] * 2


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_inplace_backward_saves_a_logits_sized_buffer(backend, device):
    """The in-place backward writes the gradient into the logits: bitwise the same gradient, and a peak
    memory lower by at least the logits' size than the backward into a fresh tensor."""
    n, t, h, v = 4, 128, 64, 128256
    hidden = torch.randn(n, t, h, device=device).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(torch.bfloat16)
    _, labels = make_batch(n, t, v)
    results = {}
    for inplace in (False, True):
        leaf = hidden.detach().clone().requires_grad_()
        logits = leaf @ weight.T  # bf16, as a model's LM head makes them
        out = sequence_logps(logits, labels, backend=backend, inplace_backward=inplace)
        del logits  # what autograd saved stays alive
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.sum().backward()
        torch.cuda.synchronize()
        results[inplace] = (out.detach(), leaf.grad, torch.cuda.max_memory_allocated() - base)
    logits_bytes = n * t * v * 2
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    assert results[False][2] - results[True][2] >= 0.9 * logits_bytes, (results[False][2], results[True][2])


# ------------------------------------------------------------------------- fused LM head launch configs


def same_dtype_reference(hidden, weight, bias, labels, grad, **transform):
    """Gradients of the naive path in the inputs' dtype (matmul and logits in bf16 / fp16, log_softmax in
    fp32 as reference.token_logps does it), the same-dtype reference of the fused LM head's gradients."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    z = reference.lm_head_logits(*leaves, **transform)
    reference.token_logps(z[None], labels[None], shift=False)[0].backward(grad)
    return [x.grad if x is not None else None for x in leaves]


LINEAR_CASES = [(d, a, s) for d in triton_linear.DTYPES for a in (True, False) for s in (False, True)]


@pytest.mark.parametrize("dtype", triton_linear.DTYPES, ids=str)
@pytest.mark.parametrize("V", [50257, 128256])
def test_cublas_forward_on_the_gpu(V, dtype, device):
    """The op's forward (cuBLAS GEMM with an fp32 output + the logits path's kernel) at real vocabularies,
    odd and aligned, in row chunks: the fp64 truth's log-probs and the fused forward's statistics."""
    M, H = 300, 256
    hidden, weight, b, labels, grad = make_inputs(M, H, V, True, dtype, device)
    transform = dict(logit_scale=0.8, softcap=None, temperature=1.2)
    logp, lse, stats = triton_linear.fused_linear_logps_fwd_cublas(hidden, weight, b, labels, **transform,
                                                                   with_stats=True, chunk_elements=100 * V)  # fmt: skip
    _, _, fused_stats = triton_linear.fused_linear_logps_fwd(hidden, weight, b, labels, **transform, with_stats=True)
    truth = reference_logps(hidden, weight, b, labels, grad, torch.float64, **transform)
    close(logp, truth[0])
    close(lse, truth[1])
    torch.testing.assert_close(stats, fused_stats, rtol=1e-5, atol=1e-3)


def test_the_cases_cover_every_fused_linear_launch_config():
    assert set(triton_linear.LAUNCH_CONFIGS) <= {(d, a) for d, a, _ in LINEAR_CASES}
    assert set(triton_linear.STATS_LAUNCH_CONFIGS) <= {(d, a) for d, a, s in LINEAR_CASES if s}


@pytest.mark.parametrize("dtype,aligned,with_stats", LINEAR_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_every_fused_linear_launch_config(dtype, aligned, with_stats, device, monkeypatch):
    """Each (dtype, alignment, stats) config as the launchers pick it, over ragged tiles in M, V and H,
    with the vocabulary split across programs (the GPU default: enough programs to fill the device)."""
    M, V = 300, 5000
    H = 256 if aligned else 264  # 264: rows not 16-element aligned, element-wise loads
    hidden, weight, b, labels, grad = make_inputs(M, H, V, True, dtype, device)
    assert triton_linear._aligned(hidden, weight) == aligned
    want_configs = [triton_linear.launch_config(dtype, aligned, with_stats), triton_linear.launch_config(dtype, aligned)]
    configs = spy(monkeypatch, triton_linear, "launch_config")
    splits = spy(monkeypatch, triton_linear, "_vocab_splits")
    transform = dict(logit_scale=1.0, softcap=20.0, temperature=1.0)
    logp, lse, stats = triton_linear.fused_linear_logps_fwd(hidden, weight, b, labels, **transform,
                                                            with_stats=with_stats)  # fmt: skip
    grads = triton_linear.fused_linear_logps_bwd(grad, hidden, weight, b, labels, lse, **transform)
    assert configs == want_configs
    assert len(splits) == 1 and splits[0][0] > 1, splits  # the forward's (splits, columns per split)

    truth = reference_logps(hidden, weight, b, labels, grad, torch.float64, **transform)
    close(logp, truth[0])
    close(lse, truth[1])
    if dtype == torch.float32:
        for actual, expected in zip(grads, truth[2:]):
            close(actual, expected)
    else:
        same_dtype = same_dtype_reference(hidden, weight, b, labels, grad, **transform)
        for actual, ref, expected in zip(grads, same_dtype, truth[2:]):
            assert_low_precision_grad(actual, ref, expected)
    if with_stats:
        # sum_logits: fp32 summation over V within 2 eps · sum_v |z_v| (test_stats); entropy and lse2 move
        # by about max |dz| ~ 1e-6 from the matmul's fp32 rounding, well inside 1e-4.
        z = reference.lm_head_logits(hidden.double(), weight.double(), b.double(), **transform)
        expected = reference.token_stats(z[None], labels[None], shift=False)[0]
        torch.testing.assert_close(stats[:, [1, 3]].double(), expected[:, [1, 3]], rtol=1e-5, atol=1e-4)
        sum_bound = 1e-4 + 2 * torch.finfo(torch.float32).eps * z.abs().sum(-1)
        assert ((stats[:, 0].double() - expected[:, 0]).abs() <= sum_bound).all()
        top2 = z.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > NEAR_TIE  # top1 compared where rounding cannot swap the first two
        assert torch.equal(stats[clear, 2].double(), expected[clear, 2])


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_fused_linear_at_real_vocabularies(dtype, V, device, monkeypatch):
    """64 rows (one row block): the forward splits V over many programs (merged in a fixed order)."""
    M, H = 64, 256
    hidden, weight, b, labels, grad = make_inputs(M, H, V, False, dtype, device)
    splits = spy(monkeypatch, triton_linear, "_vocab_splits")
    logp, lse, d_hidden, d_weight, _ = run_kernels(hidden, weight, None, labels, grad)
    if V > 1000:
        assert splits[0][0] > 16, splits
    truth = reference_logps(hidden, weight, None, labels, grad, torch.float64)
    close(logp, truth[0])
    close(lse, truth[1])
    if dtype == torch.float32:
        close(d_hidden, truth[2])
        close(d_weight, truth[3])
    else:
        same_dtype = same_dtype_reference(hidden, weight, None, labels, grad)
        assert_low_precision_grad(d_hidden, same_dtype[0], truth[2])
        assert_low_precision_grad(d_weight, same_dtype[1], truth[3])
    # One split: the same numbers up to the order in which the splits' sums are merged.
    one = run_kernels(hidden, weight, None, labels, grad, splits=1)
    torch.testing.assert_close(one[0], logp, rtol=1e-6, atol=1e-5)


def test_fused_linear_weight_offsets_past_2_pow_31(device):
    """A bf16 head of V · H > 2^31 elements (4.3 GB): weight rows and d_weight rows past 2^31 elements
    are addressed with int64 offsets. Against the fp32 reference on the same bf16 values (exact products),
    the gradients within their one rounding to bf16."""
    V, H, M = 133_000, 16384, 64
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs about 40 GB of free GPU memory")
    first_far_row = 2**31 // H + 1
    assert V * H > 2**31 and first_far_row * H > 2**31
    weight = torch.randn(V, H, device=device).mul_(3 / H**0.5).to(torch.bfloat16)
    hidden = torch.randn(M, H, device=device).to(torch.bfloat16)
    labels = torch.randint(0, V, (M,), device=device)
    labels[: M // 2] = torch.randint(first_far_row, V, (M // 2,), device=device)
    grad = torch.randn(M, device=device)
    logp, lse, d_hidden, d_weight, _ = run_kernels(hidden, weight, None, labels, grad)
    ref = reference_logps(hidden, weight, None, labels, grad, torch.float32)
    close(logp, ref[0])
    close(lse, ref[1])
    bf16_rounding = torch.finfo(torch.bfloat16).eps / 2
    for actual, expected in ((d_hidden, ref[2]), (d_weight, ref[3])):
        atol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected, rtol=bf16_rounding, atol=atol)
    assert (d_weight[labels[: M // 2]].float().abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------ determinism


def logits_step(policy, ref, labels, backend):
    leaf = policy.detach().clone().requires_grad_()
    loss, metrics = fused_dpo_loss(leaf, ref, labels, beta=0.1, backend=backend)
    loss.backward()
    return [loss.detach(), *metrics.values(), leaf.grad]


def linear_step(hidden, weight, ref_logps, labels, backend):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, metrics = fused_linear_dpo_loss(h, w, labels, ref_logps=ref_logps, beta=0.1, backend=backend)
    loss.backward()
    return [loss.detach(), *metrics.values(), h.grad, w.grad]


def assert_bitwise_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_logits_path_is_bitwise_deterministic(backend, device):
    policy, labels = make_batch(4, 256, 50257, dtype=torch.bfloat16)
    ref = torch.randn(4, device=device) * 10 - 300
    assert_bitwise_equal(logits_step(policy, ref, labels, backend), logits_step(policy, ref, labels, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_is_bitwise_deterministic(dtype, device):
    """~770 scored rows: the forward and backward split V over programs and merge in a fixed order."""
    _, labels = make_batch(4, 256, 50257)
    hidden = torch.randn(4, 256, 1024, device=device).to(dtype)
    weight = (torch.randn(50257, 1024, device=device) / 32).to(dtype)
    ref = torch.randn(4, device=device) * 10 - 300
    first = linear_step(hidden, weight, ref, labels, "triton")
    assert_bitwise_equal(first, linear_step(hidden, weight, ref, labels, "triton"))


# ------------------------------------------------------------------------------------ CUDA graph capture


def capture(step):
    """A CUDA graph of ``step`` (forward + backward into static buffers), warmed up on a side stream first
    (Triton compiles, cuBLAS initializes) as torch.cuda.graph requires; returns (graph, static outputs).
    One eager run under torch.cuda.set_sync_debug_mode("error") first: a host synchronization fails there,
    naming the operation, rather than invalidating the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_cuda_graph_of_a_fused_dpo_loss_step(backend, device):
    """Captured once, replayed on new inputs copied into the static ones: the eager step's numbers, bitwise.
    Needs the hot path free of host synchronization (the label-range check's sync is issue 14's item 5)."""
    policy, labels = make_batch(4, 64, 32000, dtype=torch.bfloat16)
    ref = torch.randn(4, device=device) * 10 - 100
    leaf = policy.clone().requires_grad_()

    def step():
        leaf.grad = None
        loss, metrics = fused_dpo_loss(leaf, ref, labels, beta=0.1, backend=backend)
        loss.backward()
        return [loss.detach(), *metrics.values(), leaf.grad]

    graph, static = capture(step)
    for seed in (1, 2):
        torch.manual_seed(seed)
        new_policy, new_labels = make_batch(4, 64, 32000, dtype=torch.bfloat16)
        new_ref = torch.randn(4, device=device) * 10 - 100
        with torch.no_grad():
            leaf.copy_(new_policy)
            labels.copy_(new_labels)
            ref.copy_(new_ref)
        graph.replay()
        assert_bitwise_equal(static, logits_step(new_policy, new_ref, new_labels, backend))


def test_cuda_graph_of_a_fused_linear_dpo_loss_step(monkeypatch, device):
    """The fused LM head training step (gradients w.r.t. hidden and weight) captured and replayed on new
    hidden states, head and reference log-probs (the labels stay). Under capture the op runs every row
    (no compaction, whose nonzero() synchronizes: issue 14's item 5); the eager runs here take that path
    too, so that the sync check covers it and the replay matches it bitwise. The compacted eager step
    gives the same numbers up to the GEMMs' summation order."""
    from dpo_kernels.ops import linear as linear_ops

    n, t, h, v = 4, 64, 512, 32000
    _, labels = make_batch(n, t, v)
    hidden = torch.randn(n, t, h, device=device).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h**0.5).to(torch.bfloat16).requires_grad_()
    ref = torch.randn(n, device=device) * 10 - 100

    def step():
        hidden.grad = weight.grad = None
        loss, metrics = fused_linear_dpo_loss(hidden, weight, labels, ref_logps=ref, beta=0.1, backend="triton")
        loss.backward()
        return [loss.detach(), *metrics.values(), hidden.grad, weight.grad]

    monkeypatch.setattr(linear_ops, "_static_rows", lambda labels: labels.is_cuda)
    graph, static = capture(step)
    for seed in (1, 2):
        torch.manual_seed(seed)
        new_hidden = torch.randn(n, t, h, device=device).to(torch.bfloat16)
        new_weight = (torch.randn(v, h, device=device) / h**0.5).to(torch.bfloat16)
        new_ref = torch.randn(n, device=device) * 10 - 100
        with torch.no_grad():
            hidden.copy_(new_hidden)
            weight.copy_(new_weight)
            ref.copy_(new_ref)
        graph.replay()
        assert_bitwise_equal(static, linear_step(new_hidden, new_weight, new_ref, labels, "triton"))
        with monkeypatch.context() as m:
            m.setattr(linear_ops, "_static_rows", lambda labels: False)
            compacted = linear_step(new_hidden, new_weight, new_ref, labels, "triton")
        for a, b in zip(static, compacted):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
