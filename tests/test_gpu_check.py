"""benchmarks/gpu_check.sh, the one command for a GPU machine, through its CPU dry run; and its floors."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


FIXTURES = ROOT / "tests" / "data" / "gpu_check"  # recorded from a dry run: the harness's results.json, a junit xml


def run_script(tmp_path, *args, **env):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=env.pop("PYTHON", sys.executable), **env)
    env.pop("DPO_KERNELS_TEST_DEVICE", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def recording_python(folder):
    """A $PYTHON for gpu_check.sh: the real interpreter for the env, ceilings and routes steps, the providers'
    selection and the report, but for the two long commands that other tests prove (the tests step's pytest:
    tests/test_errors.py itself; the benchmark harness: tests/test_benchmarks.py) a recorded output from
    FIXTURES, written where the script reads it. Every command line goes to ``folder/calls.log``."""
    script = folder / "python"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >>{folder}/calls.log
if [ "$1 $2" = "-m pytest" ]; then  # the junit xml the report reads
  for arg; do case $arg in --junitxml=*) cp {FIXTURES}/tests.xml "${{arg#--junitxml=}}" ;; esac; done
  echo "3 passed, 1 skipped (recorded)"
  exit 0
fi
if [ "$1 $2" = "-m benchmarks" ]; then  # the harness's results.json, for the workload asked
  prev=
  for arg; do
    case $prev in --workloads) workload=$arg ;; --out-dir) out=$arg ;; esac
    prev=$arg
  done
  mkdir -p "$out" && cp "{FIXTURES}/bench-$workload.json" "$out/results.json"
  exit
fi
exec {sys.executable} "$@"
""")
    script.chmod(0o755)
    return script


@pytest.mark.slow
@pytest.mark.cpu_only("runs the GPU check's CPU dry run")
def test_dry_run_writes_the_report_of_every_step(tmp_path):
    # The script and every step's report, from the steps' outputs; the env, ceilings, routes and report steps run
    # for real (timing each call once in a dry run), the pytest run and the harness are recorded (see
    # recording_python). Half a minute on an idle 2-core CPU; the budget is raised so that a loaded machine cuts
    # no step.
    out, bin_dir = tmp_path / "out", tmp_path / "bin"
    out.mkdir(), bin_dir.mkdir()
    proc = run_script(out, "--dry-run", GPU_CHECK_BUDGET="1500", PYTHON=str(recording_python(bin_dir)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.FILES)  # eight at most, as the device tool brings back
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    calls = (bin_dir / "calls.log").read_text().splitlines()
    # The tests step: tests/test_errors.py in the CPU mode, the not-slow cases, its junit xml into $OUT.
    (pytest_call,) = [c for c in calls if c.startswith("-m pytest ")]
    assert f"--junitxml={out}/tests.xml" in pytest_call and "-m not slow" in pytest_call
    assert pytest_call.endswith(" tests/test_errors.py"), pytest_call
    # The benchmark steps: the providers that run here on the tiny dry-run case, one harness run per workload.
    # (bench-peers, which runs where Liger-Kernel or Cut Cross-Entropy is installed, is another lm_head call)
    harness = {c.split("--workloads ")[1].split()[0]: c for c in calls
               if c.startswith("-m benchmarks ") and "/bench-peers" not in c}  # fmt: skip
    assert sorted(harness) == ["lm_head", "logits"], calls
    assert "dpo_kernels[triton]" in harness["logits"] and "dpo_kernels.fused_linear[triton]" in harness["lm_head"]
    assert all("--device cpu --n 2 --t 16 --v 64 --h 16 --reps 1" in c for c in harness.values())
    report = (out / "report.md").read_text()
    for name in gpu_check.STEPS:
        assert re.search(rf"^\| {re.escape(name)} \| (ok|skipped) \|", report, re.M), (name, report)
    assert "3 passed, 0 failed, 0 errors, 1 skipped" in report
    assert "### Harness table: bench-logits" in report and "### Harness table: bench-lm_head" in report
    data = json.loads((out / "results.json").read_text())
    assert data["dry_run"] and [s["step"] for s in data["steps"]] == list(gpu_check.STEPS)
    assert data["tests"]["passed"] > 0 and data["tests"]["failures"] == data["tests"]["errors"] == 0
    assert data["ceilings"]["bandwidth_Bps"] > 0 and data["ceilings"]["rate_flops"] > 0
    # The routes step ran the fused head's forward routes and both training steps (under the interpreter).
    routes = data["routes"]
    assert all(routes[f"{k}_s"] > 0 for k in ("fwd_fused", "fwd_cublas", "fwd_fused_stats", "fwd_cublas_stats",
                                               "step_compacted_prompt0", "step_all_rows_prompt50"))  # fmt: skip
    assert "| forward, cuBLAS + log-prob kernel (the op's) |" in report
    rows = data["results"]
    providers = {(r["case"]["workload"], r["provider"]) for r in rows}
    expected = [("logits", "reference"), ("logits", "dpo_kernels[triton]"), ("logits", "dpo_kernels[torch]+inplace"),
                ("lm_head", "reference"), ("lm_head", "dpo_kernels.fused_linear[triton]")]
    assert set(expected) <= providers, providers
    for r in rows:  # every provider checked against the reference, timed, and set against its floor
        assert r["check"]["ok"], r
        floor = r["floor_s"]["total"]
        assert floor > 0 and r["x_floor"] == pytest.approx(r["time"]["total"]["median"] / floor)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert "x_floor" in csv_lines[0] and len(csv_lines) == len(rows) + 1
    # The summary table comes last, one line per provider.
    tail = proc.stdout[proc.stdout.index("== gpu_check summary ==") :].splitlines()
    assert sum(line.startswith(("logits ", "lm_head ")) for line in tail) == len(rows)


@pytest.mark.cpu_only("runs the GPU check's CPU dry run")
def test_a_failing_step_is_reported_and_the_next_still_runs(tmp_path):
    # Every Python step fails at once (an interpreter that exits 1): each is reported failed, the later
    # steps still run, the script still writes its report and exits 1.
    proc = run_script(tmp_path, "--dry-run", PYTHON="false")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name in ("env", "tests", "ceilings", "bench-logits", "bench-lm_head", "bench-peers"):
        assert f"-- {name}: failed" in proc.stdout, proc.stdout
    assert "the report step failed" in (tmp_path / "report.md").read_text()


def test_floors_count_the_least_traffic_and_flops():
    ceil = {"bandwidth_Bps": 4e12, "rate_flops": 8e14}
    case = dict(workload="logits", dtype="bf16", n=8, t=4096, v=128256, h=4096, prompt_frac=0.25)
    logits_bytes = 8 * 4096 * 128256 * 2
    f = gpu_check.floors(case, ceil)
    assert f["fwd"] == pytest.approx(logits_bytes / 4e12) and f["bwd"] == pytest.approx(2 * logits_bytes / 4e12)
    f = gpu_check.floors(dict(case, workload="lm_head"), ceil)
    scored = 8 * (4096 - 1024)
    assert f["total"] == pytest.approx(6 * scored * 4096 * 128256 / 8e14)
    # Bandwidth-bound when the matmul is thin: then the bytes of hidden and weight set the floor.
    f = gpu_check.floors(dict(case, workload="lm_head", n=2, t=4), ceil)
    assert f["fwd"] == pytest.approx((2 * 4 * 4096 + 128256 * 4096) * 2 / 4e12)


def test_error_check_in_slices_matches_the_whole_and_keeps_nan():
    # At real scale the harness compares 8 GB gradients a slice at a time, in fp64 per slice.
    from benchmarks import measure

    ref = torch.randn(1000, dtype=torch.bfloat16)
    x = ref + 1e-2 * torch.randn(1000, dtype=torch.bfloat16)
    whole = (x.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()
    assert measure.max_rel_err(x, ref, chunk=7) == whole == measure.max_rel_err(x, ref)
    x[500] = float("nan")
    assert math.isnan(measure.max_rel_err(x, ref, chunk=7))
