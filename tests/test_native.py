"""The native extension (csrc/): built and registered for CPU and CUDA, every CPU kernel copy
correct, clear errors from the C++ checks, and the policy when it cannot be built."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dpo_kernels
from conftest import make_batch
from dpo_kernels import reference, sequence_logps
from dpo_kernels.ops import native

ROOT = Path(__file__).resolve().parents[1]


def cuda_build_expected() -> bool:
    """What setup.py does: CUDA sources are built when torch has CUDA and nvcc is found."""
    sys.path.insert(0, str(ROOT))
    try:
        from setup import find_cuda_home
    finally:
        sys.path.pop(0)
    return bool(torch.version.cuda and find_cuda_home()) and os.environ.get("DPO_KERNELS_NO_CUDA", "0") == "0"


def test_extension_is_built_and_registered_for_cpu():
    assert native.load_error() is None, native.load_error()
    assert native.has_kernel("cpu")


@pytest.mark.cpu_only("proves the CUDA kernels by their sm_80/sm_90 code, for want of a GPU (test_gpu.py runs them)")
def test_cuda_fallback_is_compiled_linked_and_registered():
    """No GPU here: the CUDA kernels are proven by compiling them for sm_80 and sm_90, linking them into
    the extension, and finding the ops' CUDA kernels registered. CI (CI=true) never skips this."""
    if not cuda_build_expected() and not os.environ.get("CI"):
        pytest.skip("torch without CUDA or no nvcc: the CUDA sources are not built on this machine")
    assert native.has_kernel("cuda")
    import triton  # its NVIDIA backend ships cuobjdump; the CUDA 13 toolkit here does not

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    library = Path(dpo_kernels._C.__file__)
    listing = subprocess.run([str(cuobjdump), "--list-elf", str(library)], capture_output=True, text=True, check=True)
    archs = set(re.findall(r"sm_(\d+)", listing.stdout))
    assert {"80", "90"} <= archs, listing.stdout


def cpu_flags() -> set:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return set(re.findall(r"^flags\s*:(.*)$", text, re.M)[0].split()) if "flags" in text else set()


@pytest.mark.slow  # a process per copy
@pytest.mark.cpu_only("the CPU kernel copies per instruction set")
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_kernel_copy_matches_the_reference(capability):
    """The kernel file is compiled once per instruction set; ATen's ATEN_CPU_CAPABILITY picks the copy."""
    if capability == "avx512" and "avx512f" not in cpu_flags():
        pytest.skip("this CPU has no AVX-512: that copy is compiled and linked but cannot run here")
    script = textwrap.dedent(
        """
        import torch, dpo_kernels
        from dpo_kernels import reference
        print(torch.backends.cpu.get_cpu_capability())
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for v in (123, 5000):  # a vector tail, and more than one tile
                x = (torch.randn(3, 7, v) * 3).to(dtype).requires_grad_()
                y = torch.randint(0, v, (3, 7)); y[:, :2] = -100
                out = dpo_kernels.sequence_logps(x, y, backend="native")
                (grad,) = torch.autograd.grad(out.sum(), x)
                x_ref = x.detach().requires_grad_()
                ref = reference.sequence_logps(x_ref, y)
                (ref_grad,) = torch.autograd.grad(ref.sum(), x_ref)
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
                ulp = torch.finfo(dtype).eps
                torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=0, atol=max(1e-6, ulp))
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    chosen, status = result.stdout.split()
    assert chosen == capability.upper() and status == "ok"


def test_native_ops_opcheck_and_cpp_errors(device):
    logits, labels = make_batch(4, 6, 123)
    args = (logits, labels, -100, True)
    torch.library.opcheck(torch.ops.dpo_kernels.native_token_logps.default, args)
    logp, lse, stats = torch.ops.dpo_kernels.native_token_logps(*args)
    assert stats.shape == (4, 5, 0)  # with_stats defaults to False
    grad = torch.randn(4, 1).to(device).expand(4, 5)  # what the backward of a per-sequence sum passes
    torch.library.opcheck(torch.ops.dpo_kernels.native_token_logps_backward.default, (grad, logits, labels, lse, -100, True))
    torch.library.opcheck(
        torch.ops.dpo_kernels.native_token_logps_backward_.default, (grad, logits.clone(), labels, lse, -100, True)
    )
    with pytest.raises(ValueError, match=r"logits must have shape \(N, T, V\)"):
        torch.ops.dpo_kernels.native_token_logps(logits[0], labels, -100, True)
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        torch.ops.dpo_kernels.native_token_logps(logits, labels.float(), -100, True)
    with pytest.raises(ValueError, match=r"lse must have shape \(N, T - shift, 2\)"):
        torch.ops.dpo_kernels.native_token_logps_backward(grad, logits, labels, lse[:, :-1], -100, True)
    with pytest.raises(ValueError, match=r"lse must have shape \(N, T - shift, 2\)"):  # one rounded lse
        torch.ops.dpo_kernels.native_token_logps_backward(grad, logits, labels, lse.sum(-1), -100, True)


def test_auto_on_cuda_tensors_prefers_triton_then_the_native_cuda_kernels(monkeypatch):
    import importlib.util

    from dpo_kernels import ops

    assert ops.backends._resolve("auto", "cuda", torch.bfloat16, False) == "triton"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    if native.has_kernel("cuda"):
        assert ops.backends._resolve("auto", "cuda", torch.bfloat16, False) == "native"
    else:
        with pytest.warns(UserWarning, match="native kernels unavailable"):
            assert ops.backends._resolve("auto", "cuda", torch.bfloat16, False) == "torch"


@pytest.mark.cpu_only("'auto' asks for the native kernels on CPU tensors only (Triton serves CUDA tensors)")
def test_without_the_extension_auto_falls_back_with_one_warning_and_native_refuses(monkeypatch):
    logits, labels = make_batch(2, 5, 123)
    monkeypatch.setattr(native, "load_error", lambda: "ImportError: no module named dpo_kernels._C")
    native._warn_once.cache_clear()
    with pytest.warns(UserWarning, match=r"native kernels unavailable \(ImportError") as record:
        out = sequence_logps(logits, labels)
        sequence_logps(logits, labels)
    assert len(record) == 1
    torch.testing.assert_close(out, reference.sequence_logps(logits, labels), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"backend='native' needs the compiled extension dpo_kernels._C"):
        sequence_logps(logits, labels, backend="native")


def run_setup(tmp_path, args, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "DPO_KERNELS_STRICT_BUILD"}  # CI sets it
    full_env.update(DPO_KERNELS_NO_CUDA="1", **env)
    return subprocess.run([sys.executable, str(ROOT / "setup.py"), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.cpu_only("the native build policy")
def test_install_goes_on_without_torch_unless_strict(tmp_path):
    """pip's isolated build has no torch: setup.py must not fail, only leave the extension out."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    pythonpath = str(tmp_path / "fake")
    result = run_setup(ROOT, ["--version"], PYTHONPATH=pythonpath)
    assert result.returncode == 0 and "0.1.0" in result.stdout, result.stderr
    assert "no native kernels" in result.stderr
    strict = run_setup(ROOT, ["--version"], PYTHONPATH=pythonpath, DPO_KERNELS_STRICT_BUILD="1")
    assert strict.returncode != 0 and "no torch in this build environment" in strict.stderr


@pytest.mark.slow
@pytest.mark.cpu_only("the native build policy")
def test_failed_compile_is_a_warning_unless_strict(tmp_path):
    build = ["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")]
    result = run_setup(ROOT, build, CC="false", CXX="false")
    assert result.returncode == 0, result.stderr
    assert "native build failed, installing without it" in result.stdout + result.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))
    strict = run_setup(ROOT, build, CC="false", CXX="false", DPO_KERNELS_STRICT_BUILD="1")
    assert strict.returncode != 0


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_vocab_window_is_the_local_labels_with_the_rest_unowned(dtype, layout, device):
    """With vocab_start = s, a global label y is the column y - s where the window owns it, and any other
    id (negative, past the window, near the int64 limits, int32 labels against an s past 2^31) is
    unowned: the same outputs, bit for bit, as vocab_start = 0 with the local label (or -1, unowned).
    Over more than one CPU tile (V > 4096) with the vectorized and the strided paths, with stats, and
    the backward new and in place."""
    assert native.has_kernel(device.type)  # loads the extension, which registers the ops
    V = 4500
    full = (torch.randn(2, 5, 2 * V if layout == "strided" else V) * 3).to(dtype).to(device)
    logits = full[..., ::2] if layout == "strided" else full
    for start, index_dtype in [(0, torch.long), (7, torch.int32), (2**31 + 5, torch.long), (2**40, torch.long)]:
        local = torch.tensor([[-100, 0, V - 1, V, 17], [-1, 3000, -100, 4095, 4096]], device=device)
        # ids just outside the window on both sides, and the extremes of the label dtype
        extremes = [-(2**31), 2**31 - 1] if index_dtype == torch.int32 else [INT64_MIN, INT64_MAX]
        unowned_ids = [start - 1, start + V, -1, *extremes]
        labels = local.clone()
        owned = (local >= 0) & (local < V)
        labels[owned] += start
        # every unowned slot (local -1 and V) gets another kind of id outside the window
        slots = ((~owned) & (local != -100)).nonzero().tolist()
        for k, (n, t) in enumerate(slots):
            labels[n, t] = unowned_ids[k % len(unowned_ids)]
        if index_dtype == torch.int32:
            assert start + V < 2**31, "int32 labels cannot name ids past 2^31 - 1"
            labels = labels.to(torch.int32)
        want_labels = torch.where(owned | (local == -100), local, -1)
        for shift in (True, False):
            got = native.token_logps_fwd(logits, labels, -100, shift, True, vocab_start=start)
            want = native.token_logps_fwd(logits, want_labels, -100, shift, True)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            logp, lse, stats = got
            T_out = logits.shape[1] - int(shift)
            unowned = ~owned[:, int(shift) : int(shift) + T_out] & (local[:, int(shift) : int(shift) + T_out] != -100)
            assert torch.equal(logp[unowned], -(lse[unowned][:, 0] + lse[unowned][:, 1]))
            assert (stats[unowned][:, 2] == 0).all() and not logp.isnan().any()
            g = torch.randn(logp.shape, dtype=logp.dtype, device=device)
            grad = native.token_logps_bwd(g, logits, labels, lse, -100, shift, vocab_start=start)
            assert torch.equal(grad, native.token_logps_bwd(g, logits, want_labels, lse, -100, shift))
            inplace = full.clone()[..., ::2] if layout == "strided" else full.clone()  # the same kernel path
            native.token_logps_bwd(g, inplace, labels, lse, -100, shift, out=inplace, vocab_start=start)
            assert torch.equal(inplace, grad)


def test_vocab_window_opcheck_and_errors(device):
    assert native.has_kernel(device.type)
    logits, labels = make_batch(2, 6, 40)
    logits, labels = logits.to(device), labels.to(device) + 1000 * (labels >= 0)  # global ids from 1000
    fwd = torch.ops.dpo_kernels.native_token_logps.default
    torch.library.opcheck(fwd, (logits, labels, -100, True, True, 1000))
    _, lse, _ = fwd(logits, labels, -100, True, False, 1000)
    grad = torch.randn(2, 5, device=device)
    torch.library.opcheck(
        torch.ops.dpo_kernels.native_token_logps_backward.default, (grad, logits, labels, lse, -100, True, 1000)
    )
    torch.library.opcheck(
        torch.ops.dpo_kernels.native_token_logps_backward_.default,
        (grad, logits.clone(), labels, lse, -100, True, 1000),
    )
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        native.token_logps_fwd(logits, labels, -100, True, vocab_start=-1)
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        native.token_logps_bwd(grad, logits, labels, lse, -100, True, vocab_start=-1)
    # the window's last id must fit in int64: V = 40 columns up to 2^63 - 1, not one more
    native.token_logps_fwd(logits, labels, -100, True, vocab_start=INT64_MAX - 40)
    with pytest.raises(ValueError, match=r"vocab_start \+ V <= 2\^63 - 1"):
        native.token_logps_fwd(logits, labels, -100, True, vocab_start=INT64_MAX - 39)
