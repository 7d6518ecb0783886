"""CI's ahead-of-time compile step: run ``python -m dpo_kernels.triton.aot`` and check its table.

    python .ci/aot_check.py                          # every variant for sm_80 and sm_90 (CI's step)
    python .ci/aot_check.py --arch 80 --kernels X    # only the kernels whose names contain X
    python .ci/aot_check.py --parse OUTPUT.txt       # check an output already recorded (no compile)

The compile of every Triton variant takes minutes on 2 cores, so it is a step of ``.ci/run`` of its own rather
than a pytest case; ``tests/test_aot_check.py`` proves this checker (on a recorded table and on a real compile of
a few variants). The checks, on top of aot's own (exit status 0, its last line "N variants compiled ...; 0
failures"):
- no "FAIL:" or "COMPILE ERROR" line;
- one table row per variant the launchers can pick (``aot.variants`` + ``aot.linear_variants``), each once: a
  variant the table lost or gained fails;
- every row: no local memory (spills), at least one CTA per SM;
- the log-prob forward/backward kernels read 16-byte vectors ("vec" yes) on aligned and odd rows, with and
  without statistics (not on a strided vocabulary);
- the fused LM-head kernels but the merge and the one-pass dz kernel multiply on tensor cores ("mma") in
  bf16/fp16 and in IEEE fp32 ("fma") in fp32; the one-pass dz kernel (no products) reads 16-byte vectors ("vec"
  yes) where aligned.
Exit status 0 when all hold, else 1 with each problem printed.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
# One table row per variant: name, regs, smem, local, vec, CTA/SM, seconds (aot.main's format).
ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<regs>\d+)\s+(?P<smem>\d+)\s+(?P<local>\d+)\s+(?P<vec>\S+)\s+(?P<ctas>\d+)\s+[\d.]+$"
)


def expected_variants(archs, kernels=None) -> list:
    """The names of the variants aot compiles for ``archs`` (only those ``--kernels`` selects, as aot does)."""
    sys.path.insert(0, ROOT)
    from dpo_kernels.triton import aot

    todo = [*aot.variants(archs), *aot.linear_variants(archs)]
    if kernels:
        todo = [v for v in todo if any(k in v.kernel for k in kernels)]
    return [v.name for v in todo]


def check_output(stdout: str, expected: list, archs, returncode: int = 0) -> list:
    """The problems with aot's output (empty when it passes); ``expected``: the variant names it must list."""
    problems = []
    if returncode != 0:
        problems.append(f"aot exited with status {returncode}")
    lines = stdout.splitlines()
    summary = f"{len(expected)} variants compiled for sm_{', sm_'.join(map(str, archs))}; 0 failures"
    if not lines or lines[-1] != summary:
        problems.append(f"last line {lines[-1] if lines else ''!r}, expected {summary!r}")
    problems += [f"aot reports: {line.strip()}" for line in lines if "FAIL:" in line or "COMPILE ERROR" in line]
    rows = {}
    for m in map(ROW.match, lines):
        if m:
            if m["name"] in rows:
                problems.append(f"listed twice: {m['name']}")
            rows[m["name"]] = m
    missing, extra = sorted(set(expected) - set(rows)), sorted(set(rows) - set(expected))
    problems += [f"not compiled: {name}" for name in missing] + [f"not a launcher's variant: {name}" for name in extra]
    for name, row in rows.items():
        if row["local"] != "0":
            problems.append(f"{name}: local memory {row['local']} (register spills)")
        if int(row["ctas"]) < 1:
            problems.append(f"{name}: no CTA fits on an SM")
        logps = name.startswith(("token_logps_fwd_kernel", "token_logps_bwd_kernel")) and "strided_vocab" not in name
        if logps and row["vec"] != "yes":  # 16-byte loads on odd rows (V = 50257) too, the forward with statistics
            problems.append(f"{name}: vec {row['vec']}, expected yes (16-byte loads)")
        if name.startswith("fused_linear_logits_dz_kernel"):  # elementwise: no products, vector loads
            if " aligned " in name and row["vec"] != "yes":
                problems.append(f"{name}: vec {row['vec']}, expected yes (16-byte loads)")
        elif "fused_linear" in name and "merge" not in name:
            want = "fma" if " fp32/" in name else "mma"
            if row["vec"] != want:
                problems.append(f"{name}: vec {row['vec']}, expected {want}")
    return problems


def run_aot(archs, kernels=None, jobs=None) -> subprocess.CompletedProcess:
    """``python -m dpo_kernels.triton.aot`` without the interpreter, into an empty Triton cache (compiled for
    real, not read back from an earlier run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ROOT
    cmd = [sys.executable, "-m", "dpo_kernels.triton.aot", "--arch", *map(str, archs)]
    if kernels:
        cmd += ["--kernels", *kernels]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--kernels", nargs="+", help="only the kernels whose names contain one of these (aot's --kernels)")
    p.add_argument("--jobs", type=int, help="aot's --jobs (default: every core)")
    p.add_argument("--parse", metavar="FILE", help="check this recorded aot output instead of compiling")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.parse:
        with open(args.parse) as f:
            stdout, stderr, rc = f.read(), "", 0
    else:
        proc = run_aot(args.arch, args.kernels, args.jobs)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        print(stdout, end="")  # the register / shared-memory table
        if stderr.strip():
            print(stderr[-3000:], file=sys.stderr)
    problems = check_output(stdout, expected_variants(args.arch, args.kernels), args.arch, rc)
    for problem in problems:
        print(f"aot_check: {problem}")
    took = time.perf_counter() - start
    print(f"aot_check: {'FAILED, ' + str(len(problems)) + ' problems' if problems else 'ok'} in {took:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
