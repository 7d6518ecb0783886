"""Shared fixtures, tolerances and data for the test suite.

Two modes, picked by ``$DPO_KERNELS_TEST_DEVICE``:
- ``cpu`` (the default): tensors on the CPU, the Triton kernels run under the interpreter;
- ``cuda``: the kernel tests run on CUDA tensors, Triton compiled for the GPU and the native CUDA
  kernels, against the same references (``benchmarks/gpu_check.sh`` runs this mode on a GPU machine).

``triton.jit`` reads TRITON_INTERPRET when a kernel is decorated, so it is set (or cleared) here,
before any test imports dpo_kernels.triton. Tests take the ``device`` fixture (or ``DEVICE``) for the
tensors they make; ``@pytest.mark.cpu_only("why")`` and ``@pytest.mark.cuda_only`` mark the tests that
only make sense in one mode.

In the CUDA mode every kernel entry point (the backends' launchers, see ``KERNEL_ENTRY_POINTS``) refuses
tensors that are not on the GPU, so a test that forgot the ``device`` fixture fails instead of quietly
checking the CPU again. ``--collect-only`` works without a GPU in either mode (it lists what the CUDA
mode would run), and the collection report says how many tests each mode runs.
"""

import functools
import importlib
import os

DEVICE = os.environ.get("DPO_KERNELS_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"$DPO_KERNELS_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

BACKENDS = ["torch", "triton", "native"]
LOW_PRECISION = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *LOW_PRECISION]

# fp32: results within 1e-5 relative of the reference. The per-sequence log-probs and the loss are
# computed in fp32 from the same input values in every dtype, so this holds for bf16/fp16 too.
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6
# bf16/fp16 gradients: the kernel's error from the fp64 truth may exceed the same-dtype reference's own
# error by at most this many ulps of the dtype at the largest gradient magnitude.
LOW_PRECISION_ULPS = 1.0


# The launchers every backend's kernels go through (module -> functions), guarded in the CUDA mode.
KERNEL_ENTRY_POINTS = {
    "dpo_kernels.triton.logprobs": ("token_logps_fwd", "token_logps_bwd"),
    "dpo_kernels.triton.linear": (
        "fused_linear_logps_fwd",
        "fused_linear_logps_fwd_cublas",
        "fused_linear_logps_bwd",
        "fused_linear_logits_fwd",
        "fused_linear_logits_bwd_",
    ),
    "dpo_kernels.portable.logprobs": ("token_logps_fwd", "token_logps_bwd"),
    "dpo_kernels.portable.linear": (
        "fused_linear_logps_fwd",
        "fused_linear_logps_bwd",
        "fused_linear_logits_fwd",
        "fused_linear_logits_bwd_",
    ),
    "dpo_kernels.ops.native": ("token_logps_fwd", "token_logps_bwd"),
}


def require_device(fn, name, device_type):
    """``fn`` that raises AssertionError when any tensor argument is not on ``device_type``."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.device.type != device_type:
                raise AssertionError(
                    f"{name} got a tensor on {value.device} in the {device_type.upper()} test mode: "
                    "the test made it without the device fixture"
                )
        return fn(*args, **kwargs)

    guarded.__wrapped_for_device__ = device_type
    return guarded


def _guard_kernel_entry_points(device_type):
    # Runs before the test modules are imported, so their ``from module import fn`` bind the guard too.
    for module_name, names in KERNEL_ENTRY_POINTS.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, require_device(getattr(module, name), f"{module_name}.{name}", device_type))


def _patch_the_language_once_per_launch():
    """Triton's interpreter patches ``triton.language`` (a walk over every builtin, a millisecond or more) at
    each launch, and again at each call of a ``@triton.jit`` helper inside it, though the launch's patch is
    still in force: the kernels here call helpers per tile, so those walks took 40 % of an interpreted test.
    A helper that sees only language modules the launch patched now skips its walk; the launch's own patch and
    its restore are Triton's. Nothing changes where the interpreter lacks ``_patch_lang``."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None or getattr(patch, "once_per_launch", False):
        return
    import inspect

    import triton.language as tl

    patched = []  # the language modules the running launch patched (launches do not nest)
    seen = {}  # function -> the language modules it sees

    def patch_once(fn):
        langs = seen.get(fn)
        if langs is None:
            langs = seen[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched and langs <= patched[0]:
            return None  # a helper's call: Triton ignores the scope
        scope = patch(fn)
        if patched:
            patched[0] |= langs
            return scope
        patched.append(set(langs))
        restore = scope.restore

        def restore_and_forget():
            patched.clear()
            restore()

        scope.restore = restore_and_forget
        return scope

    patch_once.once_per_launch = True
    interpreter._patch_lang = patch_once


def pytest_configure(config):
    if DEVICE == "cpu":
        _patch_the_language_once_per_launch()
    if DEVICE == "cuda":
        if not torch.cuda.is_available() and not config.option.collectonly:
            raise pytest.UsageError("DPO_KERNELS_TEST_DEVICE=cuda, but torch sees no CUDA device")
        _guard_kernel_entry_points("cuda")


def pytest_collection_modifyitems(config, items):
    counts = {"cpu_only": 0, "cuda_only": 0}
    for item in items:
        cpu_only = item.get_closest_marker("cpu_only")
        if cpu_only is not None:
            counts["cpu_only"] += 1
        if DEVICE != "cpu" and cpu_only is not None:
            why = cpu_only.args[0] if cpu_only.args else "checks the CPU path"
            item.add_marker(pytest.mark.skip(reason=f"CPU mode only: {why}"))
        if item.get_closest_marker("cuda_only") is not None:
            counts["cuda_only"] += 1
            if DEVICE != "cuda":
                item.add_marker(pytest.mark.skip(reason="needs a GPU: run with DPO_KERNELS_TEST_DEVICE=cuda"))
    config.stash[MODE_COUNTS] = (len(items), counts["cpu_only"], counts["cuda_only"])


MODE_COUNTS = pytest.StashKey[tuple]()


def pytest_report_collectionfinish(config, start_path, items):
    total, cpu_only, cuda_only = config.stash.get(MODE_COUNTS, (len(items), 0, 0))
    return (
        f"dpo-kernels test modes: {DEVICE} mode now; of {total} collected, the cpu mode runs {total - cuda_only}, "
        f"the cuda mode {total - cpu_only} ({cpu_only} cpu_only, {cuda_only} cuda_only)"
    )


@pytest.fixture
def device():
    """The device the kernel tests put their tensors on (see the module docstring)."""
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def slow_beyond(cases, keep=()):
    """``cases`` (backends, or ``(backend, case, ...)`` tuples) as pytest params, those on Triton (the interpreter:
    a second or more a case) marked slow unless their case is in ``keep``. For grids of loss options, computed
    above the kernels: the kept cases reach every kernel path, so ``-m "not slow"`` stays quick and the full run
    still checks the whole grid."""
    params = []
    for c in cases:
        values = (c,) if isinstance(c, str) else tuple(c)
        slow = values[0] == "triton" and (len(values) == 1 or values[1] not in keep)
        params.append(pytest.param(*values, marks=pytest.mark.slow) if slow else c)
    return params


# The backends, Triton's case (seconds for an opcheck or a compile under the interpreter) in the full run only.
BACKENDS_TRITON_SLOW = slow_beyond(BACKENDS)


def make_batch(n, t, v, dtype=torch.float32, prompt=0.25, scale=3.0, label_dtype=torch.int64, device=DEVICE):
    """Logits and labels like a DPO batch: a masked prompt prefix and a ragged masked padding tail,
    made on the CPU (the same numbers in both modes) and moved to ``device``."""
    logits = (torch.randn(n, t, v) * scale).to(dtype)
    labels = torch.randint(0, v, (n, t), dtype=label_dtype)
    prompt_len = int(t * prompt)
    labels[:, :prompt_len] = -100
    for i in range(n):
        pad = i % max(t // 4, 1)
        if pad:
            labels[i, t - pad :] = -100
    return logits.to(device), labels.to(device)


def assert_fp32_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL)


def assert_low_precision_grad(kernel_grad, reference_grad, truth):
    """Kernel error from the fp64 truth <= the same-dtype reference's own error + a small margin."""
    assert kernel_grad.dtype == reference_grad.dtype
    kernel_err = (kernel_grad.double() - truth).abs().max().item()
    reference_err = (reference_grad.double() - truth).abs().max().item()
    margin = LOW_PRECISION_ULPS * torch.finfo(kernel_grad.dtype).eps * truth.abs().max().item()
    assert kernel_err <= reference_err + margin, (kernel_err, reference_err, margin)
