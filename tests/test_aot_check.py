"""The ahead-of-time compile check's checker (``.ci/aot_check.py``): every Triton kernel compiles to cubin for
sm_80 and sm_90 without a GPU, with no errors, no spills, vectorized loads where the rows are aligned or odd,
tensor cores for bf16/fp16 and IEEE fp32 (no TF32) in the fused LM head (the compile and its own checks:
dpo_kernels.triton.aot).

Compiling all the variants takes minutes on 2 cores: CI runs it as a step of its own (``.ci/run``:
``python .ci/aot_check.py``). Here, quickly, the checker is proven: on a table in aot's format for every variant
(clean: it passes; each kind of fault: it fails, naming it) and on a real compile of the smallest kernel.
"""

import importlib.util
import os
import re
from pathlib import Path

import pytest

from dpo_kernels.triton import aot

pytestmark = pytest.mark.cpu_only("proves the kernels compile for sm_80/sm_90 for want of a GPU")

ARCHS = (80, 90)
_spec = importlib.util.spec_from_file_location("aot_check", Path(__file__).resolve().parents[1] / ".ci/aot_check.py")
aot_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot_check)


def vec(name):
    """What a passing variant's "vec" column reads (aot.main's values)."""
    if "fused_linear_logits_dz" in name:  # elementwise, no products: 16-byte loads where aligned
        return "yes" if " aligned " in name else "no"
    if "fused_linear" in name and "merge" not in name:
        return "fma" if " fp32/" in name else "mma"
    return "no" if "strided_vocab" in name or "special_stats" in name or "merge" in name else "yes"


def table(names, **override):
    """aot.main's output for ``names``, every variant passing; ``override``: name -> (local, vec, ctas)."""
    width = max([80] + [len(n) for n in names])
    lines = [f"{'variant':<{width}} {'regs':>4} {'smem':>6} {'local':>5} {'vec':>3} {'CTA/SM':>6} {'s':>5}"]
    for name in names:
        local, v, ctas = override.get(name, (0, vec(name), 2))
        lines.append(f"{name:<{width}} {128:>4} {16384:>6} {local:>5} {v:>3} {ctas:>6} {3.2:>5.1f}")
    lines.append(f"{len(names)} variants compiled for sm_80, sm_90; 0 failures")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def names():
    names = aot_check.expected_variants(ARCHS)
    assert names == [v.name for v in (*aot.variants(ARCHS), *aot.linear_variants(ARCHS))]
    return names


def first(names, *parts):
    return next(n for n in names if all(p in n for p in parts))


def test_checker_passes_every_variant_once(names):
    assert aot_check.check_output(table(names), names, ARCHS) == []


def test_checker_flags_each_fault(names):
    def problems(text, rc=0):
        return aot_check.check_output(text, names, ARCHS, rc)

    odd_stats_fwd = first(names, "token_logps_fwd_kernel stats", " unaligned ")
    aligned_bwd = first(names, "token_logps_bwd_kernel", " aligned ")
    bf16_head = first(names, "fused_linear_logps_fwd_kernel bf16/")
    fp32_dz = first(names, "fused_linear_logps_bwd_dz_kernel fp32/", "filter")
    spilled = first(names, "fused_linear_logps_bwd_dw_kernel")
    onepass_dz = first(names, "fused_linear_logits_dz_kernel bf16/", " aligned ")
    faults = {  # a fault -> the problem the checker names
        "exit status": (table(names), 1, "exited with status 1"),
        "summary": (table(names).replace("; 0 failures", "; 1 failures"), 0, "last line"),
        "FAIL line": (table(names) + "  FAIL: register spills: local=8 stack=0\n", 0, "aot reports: FAIL"),
        "compile error": (table(names) + f"{names[0]} COMPILE ERROR x\n", 0, "aot reports:"),
        "lost": (table(names[1:]), 0, f"not compiled: {names[0]}"),
        "twice": (table(names + names[:1]), 0, f"listed twice: {names[0]}"),
        "unknown": (table(names + ["some_kernel fp32 sm_80"]), 0, "not a launcher's variant: some_kernel"),
        "spills": (table(names, **{spilled: (8, vec(spilled), 2)}), 0, "local memory 8"),
        "no CTA": (table(names, **{spilled: (0, vec(spilled), 0)}), 0, "no CTA fits"),
        "odd rows unvectorized": (table(names, **{odd_stats_fwd: (0, "no", 2)}), 0, f"{odd_stats_fwd}: vec no"),
        "aligned unvectorized": (table(names, **{aligned_bwd: (0, "no", 2)}), 0, f"{aligned_bwd}: vec no"),
        "bf16 off the tensor cores": (table(names, **{bf16_head: (0, "fma", 2)}), 0, "expected mma"),
        "fp32 on the tensor cores (TF32)": (table(names, **{fp32_dz: (0, "mma", 2)}), 0, "expected fma"),
        "one-pass dz unvectorized": (table(names, **{onepass_dz: (0, "no", 2)}), 0, f"{onepass_dz}: vec no"),
    }
    for fault, (text, rc, want) in faults.items():
        found = problems(text, rc)
        assert any(want in p for p in found), (fault, found)
        assert fault != "summary" or len(found) == 1, found  # a correct table otherwise: nothing else flagged


@pytest.mark.slow
def test_checker_on_a_real_compile(tmp_path, capsys):
    # The merge kernel, both WITH_STATS variants for sm_80: aot.py's real output, its table format included,
    # goes through the same checker CI runs (a few seconds).
    assert aot_check.main(["--arch", "80", "--kernels", "fused_linear_logps_merge_kernel", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("aot_check: ok in")
    rows = [line for line in out.splitlines() if aot_check.ROW.match(line)]
    assert len(rows) == 2 and all(re.search(r"merge_kernel .* sm_80\s", row) for row in rows), out
    (tmp_path / "aot.txt").write_text(out[: out.index("aot_check:")])  # the recorded output, checked again
    assert aot_check.main(["--arch", "80", "--kernels", "merge", "--parse", str(tmp_path / "aot.txt")]) == 0
    assert os.environ.get("TRITON_INTERPRET") == "1"  # the subprocess ran without it; this process is unchanged


WRITE_CUBINS = """
import os, sys, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, sys.argv[1])
from dpo_kernels.triton import aot

compiled = [aot._compile(v) for v in aot.linear_variants([90]) if "merge" in v.kernel]
assert len(compiled) == 2 and all("kernel" in c for c in compiled), compiled
for i, c in enumerate(compiled):
    with open(os.path.join(sys.argv[2], f"{i}.cubin"), "wb") as f:
        f.write(c["kernel"].asm["cubin"])
"""


@pytest.mark.slow
def test_batched_sass_reads_each_kernel_as_cuobjdump_does(tmp_path, monkeypatch):
    # aot reads the product kernels' SASS (tensor-core ops or not) from one nvdisasm start per batch of cubins
    # (sass_many), not one cuobjdump per cubin: on two sm_90 kernels (read as sm_90a, Triton's target there) in one
    # batch, the same instruction list each. (All 180 product variants of both architectures were compared so once,
    # opcode for opcode.) The cubins are compiled in a process without the interpreter; the reading runs here.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", WRITE_CUBINS, root, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cubins = [(tmp_path / f"{i}.cubin").read_bytes() for i in range(2)]
    want = [[m[2] for m in aot.SASS_INSTRUCTION.finditer(aot.sass(cubin))] for cubin in cubins]

    def refused(cubin):
        raise AssertionError("sass_many fell back to one disassembler start per cubin")

    monkeypatch.setattr(aot, "sass", refused)
    got = [text.splitlines() for text in aot.sass_many(cubins, 90)]
    assert [len(w) for w in want] == [len(g) for g in got] and all(want), [len(w) for w in want]
    for w, g in zip(want, got):
        # branch targets are absolute, so they move with the kernel's place in the batch
        assert [re.sub(r"0x[0-9a-f]+", "X", i) for i in w] == [re.sub(r"0x[0-9a-f]+", "X", i) for i in g]
