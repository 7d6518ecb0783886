"""Every Triton kernel compiles to cubin for sm_80 and sm_90 without a GPU: no errors, no spills,
vectorized loads where the rows are aligned (the check itself is dpo_kernels.triton.aot)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only("proves the kernels compile for sm_80/sm_90 for want of a GPU")


@pytest.mark.slow
def test_all_kernels_compile_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    result = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.triton.aot", "--arch", "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(result.stdout[-6000:], result.stderr[-3000:])  # the register/shared-memory table, shown with -s or -rA
    assert result.returncode == 0
    assert " 0 failures" in result.stdout
    for arch in ("sm_80", "sm_90"):
        for kernel in ("token_logps_fwd_kernel", "token_logps_bwd_kernel"):
            for dtype in ("fp32", "bf16", "fp16"):
                assert f"{kernel} {dtype}/i64 BLOCK_V=4096 warps=8 aligned {arch}" in result.stdout
