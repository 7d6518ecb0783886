"""The benchmark harness runs end to end on a tiny config, its correctness gate works, and the modeled GPU
memory shows what the kernels are for."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import measure, modeled, providers, report

pytestmark = pytest.mark.cpu_only("the harness on a tiny CPU config; benchmarks/gpu_check.sh runs it on the GPU")

ROOT = Path(__file__).resolve().parents[1]
TINY_PROVIDERS = "reference,dpo_kernels[torch],dpo_kernels[torch]+inplace,dpo_kernels.fused_linear[torch]"


@pytest.mark.slow
def test_harness_smoke_on_a_tiny_config(tmp_path):
    cmd = [
        sys.executable, "-m", "benchmarks", "--n", "2", "--t", "16", "--v", "64", "--h", "16", "--dtypes", "fp32",
        "--providers", TINY_PROVIDERS, "--reps", "2", "--warmup", "0", "--out-dir", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # The Markdown table: one row per (case, provider), every provider checked and agreeing.
    rows = [line for line in out.splitlines() if line.startswith("| logits") or line.startswith("| lm_head")]
    for case, name in [("logits", "reference"), ("logits", "dpo_kernels[torch]"), ("logits", "dpo_kernels[torch]+inplace"),
                       ("lm_head", "reference"), ("lm_head", "dpo_kernels.fused_linear[torch]")]:  # fmt: skip
        assert any(r.startswith(f"| {case} fp32") and f"| {name} | ok " in r for r in rows), out
    assert "all providers agree with the reference" in out
    assert "Modeled" in out and "Llama-3-8B" in out and "Gemma-2-9B" in out and "BW bound" in out
    # The files.
    for name in ("results.md", "results.csv", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    if report.can_plot():
        assert (tmp_path / "results.png").stat().st_size > 0
    else:
        assert "plots skipped: matplotlib is not installed" in out
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and all(r["check_ok"] == "True" for r in table)
    assert all(float(r["total_median_s"]) > 0 for r in table)
    data = json.loads((tmp_path / "results.json").read_text())
    timed = [r for r in data["results"] if r["kind"] != "skipped"]
    assert all(r["check"]["ok"] and r["time"]["fwd"]["n"] == 2 for r in timed)
    assert all("extra_bytes" in r for r in timed)  # memory measured (None only where /proc refuses)
    # gpu_check's report reads this file (tests/test_gpu_check.py feeds it one recorded from a dry run, in
    # tests/data/gpu_check): every row set against its floor, and the recording holds no field the harness has
    # stopped writing.
    from benchmarks import gpu_check

    (tmp_path / "bench-logits").mkdir()
    (tmp_path / "bench-logits" / "results.json").write_text(json.dumps(data))
    rows = gpu_check.bench_rows(str(tmp_path), {"bandwidth_Bps": 1e11, "rate_flops": 1e12})
    assert len(rows) == len(timed) and all(r["x_floor"] > 0 for r in rows)
    fields = set().union(*map(set, data["results"]))
    for workload in ("logits", "lm_head"):
        recorded = json.loads((ROOT / "tests" / "data" / "gpu_check" / f"bench-{workload}.json").read_text())
        assert set(recorded) <= set(data), workload
        assert all(set(r) <= fields for r in recorded["results"]), workload
    assert {m["model"] for m in data["modeled"]["memory"]} == set(modeled.MODELS)
    times = data["modeled"]["modeled_time"]
    assert {r["model"] for r in times} == set(modeled.MODELS) and {r["gpu"] for r in times} == set(modeled.GPUS)
    assert all(set(r) == {"model", "workload", "path", "gpu", "ms", "floor_ms"} and r["ms"] > 0 for r in times)


@pytest.mark.slow
def test_sweep_writes_its_table_and_plots(tmp_path):
    cmd = [
        sys.executable, "-m", "benchmarks", "--n", "2", "--t", "16", "--v", "64", "--h", "16", "--dtypes", "fp32",
        "--providers", "reference,dpo_kernels[torch],dpo_kernels.fused_linear[torch]", "--reps", "1", "--warmup", "0",
        "--sweep", "--no-memory", "--no-modeled", "--no-progress", "--out-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = proc.stdout.split("## Sweep (measured)")[1]
    rows = [line for line in sweep.splitlines() if line.startswith("| logits") or line.startswith("| lm_head")]
    labels = [line.split("|")[1:3] for line in rows]
    assert len(labels) == len({tuple(x) for x in labels}) > 0  # each sweep point measured once
    if report.can_plot():
        for workload in ("logits", "lm_head"):
            for axis in ("V", "tokens"):
                assert (tmp_path / f"sweep_{workload}_fp32_vs_{axis}.png").stat().st_size > 0


def test_a_disagreeing_provider_is_reported_and_not_timed():
    case = measure.Case("logits", "fp32", n=2, t=8, v=32, h=0, prompt_frac=0.25)
    inputs = measure.Inputs(case, torch.device("cpu"))
    ref = providers.get("logits", "reference").build()

    def wrong(logits, labels):
        return providers.dpo_from_logps(ref(logits, labels).logps * 1.01)

    checks = measure.check({"reference": ref, "wrong": wrong}, inputs)
    assert checks["reference"]["ok"] and checks["reference"]["max_err"] == 0
    assert not checks["wrong"]["ok"] and checks["wrong"]["max_err"] > 1e-3


def test_trl_head_on_dpo_kernels_provider_agrees_with_trls_and_leaves_no_patch():
    """The "TRL head on dpo_kernels" row: TRL's call under patch_fused_lm_head(), checked like any provider
    against the reference, with the patch gone after each call (the other TRL provider stays TRL's own)."""
    pytest.importorskip("trl")
    from trl.trainer import utils as trl_utils

    original = trl_utils._ChunkedLogProbFunction
    case = measure.Case("lm_head", "fp32", n=2, t=8, v=32, h=8, prompt_frac=0.25)
    inputs = measure.Inputs(case, torch.device("cpu"))
    fns = {name: providers.get("lm_head", name).build()
           for name in ("reference", "trl.ChunkedLogProbFunction", "trl_head[dpo_kernels]")}  # fmt: skip
    checks = measure.check(fns, inputs)
    assert all(c["ok"] for c in checks.values()), checks
    assert trl_utils._ChunkedLogProbFunction is original


def test_modeled_gpu_memory_at_llama3_8b_scale():
    rows = {(r["workload"], r["path"]): r for r in modeled.modeled_memory(["Llama-3-8B"])}
    logits_bytes = 8 * 4096 * 128256 * 2
    # per token: the log-prob, the two-part lse (row max and log of the sum, kept apart for precision) and
    # the label masks and sums around them; 24 bytes modeled, six floats bound it
    per_token_floats = 8 * 4096 * 6 * 4
    # Fused: nothing beyond the logits and their gradient (or the logits alone, in place) but per-token floats.
    assert rows["logits", "fused: sequence_logps"]["beyond_io_bytes"] <= per_token_floats
    assert rows["logits", "fused: sequence_logps, in-place"]["beyond_io_bytes"] <= per_token_floats
    # The naive reference holds fp32 log-softmax activations and temporaries of several logits' sizes.
    assert rows["logits", "naive: reference.sequence_logps"]["beyond_io_bytes"] >= 4 * logits_bytes
    # Fused linear: no logits at all; under a tenth of the naive LM head's peak.
    fused = rows["lm_head", "fused-linear: fused_linear_sequence_logps"]["peak_bytes"]
    assert fused < 0.1 * rows["lm_head", "naive: matmul + reference"]["peak_bytes"]
    bw = {r["kernel"]: r for r in modeled.bandwidth_table(["Llama-3-8B"])}
    assert bw["logits: dpo_kernels fused (Triton)"]["logits_io"] * 7 == bw["logits: naive reference (eager)"]["logits_io"]


def test_packed_benchmark_runs_and_removes_the_padding():
    """python -m benchmarks.packed: the padded and packed steps agree (it raises otherwise), the packed layout
    processes no padding while the long-tailed lengths leave plenty in the padded one."""
    pytest.importorskip("transformers")
    from benchmarks import packed

    result = packed.main(["--quick", "--pairs", "3", "--vocab", "200"])
    padded, packed_row = result["layouts"]["padded"], result["layouts"]["packed"]
    assert packed_row["padding_share"] == 0.0 and padded["padding_share"] > 0.2
    assert packed_row["peak_mib"] < padded["peak_mib"]


@pytest.mark.slow
def test_gradient_filter_benchmark_runs_on_a_tiny_config():
    """python -m benchmarks.gradient_filter at a tiny size: one row per case and threshold, the unfiltered
    row dense, a large threshold dropping tiles of the flat case, finite errors, a table that renders."""
    from benchmarks import gradient_filter

    rows = gradient_filter.run(M=32, H=16, V=512, cases=("peaked-sorted", "flat"), thresholds=[None, 1e-2],
                               big_rows=16)  # fmt: skip
    assert [(r["case"], r["filter"]) for r in rows] == [
        ("peaked-sorted", "off"), ("peaked-sorted", "0.01"), ("flat", "off"), ("flat", "0.01")]
    assert rows[0]["density"] is None and rows[0]["d_hidden_vs_unfiltered"] == 1.0
    assert rows[3]["llama_v_density"] < 1.0
    assert all(math.isfinite(r["d_hidden_rel_err"]) and math.isfinite(r["d_weight_rel_err"]) for r in rows)
    assert gradient_filter.markdown(rows).count("\n| ") == len(rows)


def test_portable_ab_times_the_old_and_the_current_code():
    """python -m benchmarks.portable_ab against HEAD (always in the clone): three timed entries per pass."""
    from benchmarks import portable_ab

    times = portable_ab.main(["--old", "HEAD", "--t", "8", "--v", "300", "--h", "32", "--reps", "2"])
    assert list(times) == ["reference", "old (HEAD)", "now"] and all(len(v) == 2 for v in times.values())
