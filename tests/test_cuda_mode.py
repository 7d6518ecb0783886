"""The CUDA test mode (DPO_KERNELS_TEST_DEVICE=cuda), checked from the default one: it collects without a GPU,
runs at least half as many tests as the CPU mode, the GPU-only tests among them, and its guard on the kernel
launchers refuses tensors that a test made without the device fixture."""

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
import test_gpu

ROOT = Path(__file__).resolve().parents[1]
REPORT = re.compile(r"of (\d+) collected, the cpu mode runs (\d+), the cuda mode (\d+) \((\d+) cpu_only, (\d+) cuda_only\)")
SELECTED = re.compile(r"(\d+)/(\d+) tests collected \((\d+) deselected\)")


@pytest.mark.slow
@pytest.mark.cpu_only("checks the CUDA mode from the default one")
def test_cuda_mode_collects_without_a_gpu_and_runs_at_least_half_the_tests():
    # CUDA_VISIBLE_DEVICES="" hides any GPU: collection must not need one. -m "not cpu_only" lets pytest's own
    # marker selection count what the CUDA mode runs, next to the count the conftest reports.
    env = dict(os.environ, DPO_KERNELS_TEST_DEVICE="cuda", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not cpu_only"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    total, cpu_runs, cuda_runs, cpu_only, cuda_only = map(int, REPORT.search(out).groups())
    selected, collected, deselected = map(int, SELECTED.search(out).groups())
    assert (collected, selected, deselected) == (total, cuda_runs, cpu_only)
    assert cpu_runs == total - cuda_only and cuda_only > 0
    assert cuda_runs >= 0.5 * cpu_runs, (cuda_runs, cpu_runs)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) == selected
    collected_gpu = {line.split("::")[1].split("[")[0] for line in ids if line.startswith("tests/test_gpu.py::")}
    defined_gpu = {name for name, fn in inspect.getmembers(test_gpu, inspect.isfunction) if name.startswith("test_")}
    assert defined_gpu and collected_gpu == defined_gpu


def test_the_guard_refuses_tensors_off_the_mode_device():
    seen = []
    guarded = conftest.require_device(lambda *a, **k: seen.append((a, k)) or "ran", "backend.fwd", "cuda")
    with pytest.raises(AssertionError, match="backend.fwd got a tensor on cpu in the CUDA test mode"):
        guarded(torch.zeros(2), 3)
    with pytest.raises(AssertionError, match="device fixture"):
        guarded(None, out=torch.zeros(1))
    assert seen == []
    assert guarded(None, 1, flag=True) == "ran"  # no tensors: nothing to refuse
    on_cpu = conftest.require_device(lambda x: x + 1, "backend.fwd", "cpu")
    assert on_cpu(torch.ones(1)).item() == 2


def test_the_guard_covers_every_backend_launcher():
    """Every module the ops layer dispatches to is listed, with launchers that exist."""
    from dpo_kernels.ops import backends

    dispatched = {backends.logits_kernels(b).__name__ for b in ("triton", "native", "torch")}
    dispatched |= {backends.linear_kernels(b).__name__ for b in ("triton", "torch")}
    assert dispatched == set(conftest.KERNEL_ENTRY_POINTS)
    for module_name, names in conftest.KERNEL_ENTRY_POINTS.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert callable(getattr(module, name)), f"{module_name}.{name}"
        # the head's recompute launchers and its one-pass ones (fused_linear_logits_fwd / _bwd_)
        uses = ("fused_linear_logps", "fused_linear_logits") if "linear" in module_name else ("token_logps",)
        ends = ("_fwd", "_bwd", "_bwd_", "_fwd_cublas")
        assert {n for n in vars(module) if n.startswith(uses) and n.endswith(ends)} == set(names)
