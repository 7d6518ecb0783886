"""The benchmark harness runs end to end, and the modeled GPU memory shows what the kernels are for."""

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.modeled_memory import logits_inputs, modeled_peak_bytes
from dpo_kernels import fused_dpo_loss, reference, sequence_logps

LLAMA3_8B = dict(n=8, t=4096, v=128256, dtype=torch.bfloat16)


def test_modeled_gpu_memory_at_llama3_8b_scale():
    logits_bytes = 8 * 4096 * 128256 * 2

    def extra(fn, with_ref=False):
        peak = modeled_peak_bytes(logits_inputs(**LLAMA3_8B, with_ref=with_ref), fn)
        return peak - logits_bytes * (3 if with_ref else 2)

    # Fused: nothing beyond the logits and their gradient but O(N·T) per-token floats.
    assert extra(lambda x, r, y: sequence_logps(x, y).sum()) <= 8 * 4096 * 4 * 4
    assert extra(lambda x, r, y: fused_dpo_loss(x, r, y)[0], with_ref=True) <= 8 * 4096 * 4 * 4
    # The naive reference holds fp32 log-softmax activations and temporaries of several logits' sizes.
    assert extra(lambda x, r, y: reference.sequence_logps(x, y).sum()) >= 4 * logits_bytes


def test_harness_runs_on_a_tiny_workload():
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "run.py"), "--n", "2", "--t", "16", "--v", "64", "--reps", "1"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, check=True).stdout
    for dtype in ("fp32", "bf16"):
        for impl in ("reference", "torch", "torch-inplace"):
            assert any(line.split()[:2] == [dtype, impl] for line in out.splitlines()), out
        assert f"{dtype} [torch]: time" in out
    assert "fused_dpo_loss  fused" in out


def test_fused_linear_harness_runs_on_a_tiny_workload():
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "fused_linear.py"), "--n", "2", "--t", "8", "--h", "16", "--v", "64"]
    out = subprocess.run(cmd + ["--reps", "1"], cwd=root, capture_output=True, text=True, timeout=600, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["naive"], ["fused"])}
    assert "x" in lines["naive"] and "x" in lines["fused"], out
    assert "targets:" in out and "modeled GPU peak" in out
