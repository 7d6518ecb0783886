"""Every Triton kernel compiles to cubin for sm_80 and sm_90 without a GPU: no errors, no spills,
vectorized loads where the rows are aligned, tensor cores for bf16/fp16 and IEEE fp32 (no TF32) in the
fused LM head, barriers for its cross-warp reductions (the check itself is dpo_kernels.triton.aot)."""

import os
import re
import subprocess
import sys

import pytest

from dpo_kernels.triton import aot

ARCHS = (80, 90)
# One table row per variant: name, regs, smem, local, vec, CTA/SM, seconds (aot.main's format).
ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<regs>\d+)\s+(?P<smem>\d+)\s+(?P<local>\d+)\s+(?P<vec>\S+)\s+(?P<ctas>\d+)\s+[\d.]+$"
)

pytestmark = pytest.mark.cpu_only("proves the kernels compile for sm_80/sm_90 for want of a GPU")


@pytest.mark.slow
def test_all_kernels_compile_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    result = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.triton.aot", "--arch", *map(str, ARCHS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(result.stdout[-6000:], result.stderr[-3000:])  # the register/shared-memory table, shown with -s or -rA
    assert result.returncode == 0
    expected = [v.name for v in (*aot.variants(ARCHS), *aot.linear_variants(ARCHS))]
    lines = result.stdout.splitlines()
    assert lines[-1] == f"{len(expected)} variants compiled for sm_80, sm_90; 0 failures"
    assert not [line for line in lines if "FAIL:" in line or "COMPILE ERROR" in line]
    rows = {m["name"]: m for m in map(ROW.match, lines) if m}
    assert sorted(rows) == sorted(expected)  # every variant the launchers can pick, each once
    for name, row in rows.items():
        assert row["local"] == "0" and int(row["ctas"]) >= 1, name
        if name.startswith(("token_logps_fwd_kernel", "token_logps_bwd_kernel")) and "strided_vocab" not in name:
            # 16-byte loads on odd rows (V = 50257) too, the forward with statistics included.
            assert row["vec"] == "yes", name
        if "fused_linear" in name and "merge" not in name:
            assert row["vec"] == ("fma" if " fp32/" in name else "mma"), name
