"""The Python half of ``benchmarks/gpu_check.sh``: environment facts, the two ceilings, the floors, the report.

    python -m benchmarks.gpu_check env      --work DIR [--dry-run]   # -> DIR/env.json, text on stdout
    python -m benchmarks.gpu_check ceilings --work DIR [--dry-run]   # -> DIR/ceilings.json
    python -m benchmarks.gpu_check routes   --work DIR [--dry-run]   # -> DIR/routes.json
    python -m benchmarks.gpu_check report   --work DIR --out OUT     # -> OUT/report.md, results.csv, results.json

Ceilings (measured once, on the card as found): a device-to-device copy of 4 GiB, counting the bytes read plus
the bytes written, gives the memory bandwidth BW; an 8192³ bf16 matmul (2·8192³ FLOPs) gives the matrix rate R.
Both on random data (zeros run faster and would flatter the ceiling), median of 10 after 3 warm-ups (the dry run:
one call each).

Routes (the fused LM head's choices the cost model made without a GPU, timed at real scale): the forward as the
fused Triton kernel against the op's cuBLAS products + log-prob kernel, with and without statistics; and a
training step through ``fused_linear_dpo_loss`` with the scored rows compacted (the eager default: a nonzero()
host synchronization in the forward and one in the backward) against every row run (the CUDA-graph path, no
synchronization), all rows scored (the difference is the synchronizations' cost) and half of them a prompt
(what compaction saves); and the same step on the one-pass route (the loss's gradient formed while each
group's logits are live, 6·M·H·V) against the recompute route (8·M·H·V).

Floors, per case (the least any implementation must do, over the measured ceilings):
- logits: read the (N, T, V) logits once in the forward, read them and write their gradient once in the
  backward: fwd = L / BW, bwd = 2·L / BW with L = N·T·V·itemsize. The arithmetic (a few FLOPs per element)
  is far under the matrix rate and not counted.
- lm_head: the matmul FLOPs over the S scored tokens (the prompt rows need no logits), as the naive path
  does them: 2·S·H·V in the forward (the logits), 4·S·H·V in the backward (grad hidden and grad weight),
  6·S·H·V in all; a fused head that recomputes the logits in its backward does 8·S·H·V, so its own best
  is 8/6 of this floor. Each phase's floor is max(FLOPs / R, bytes / BW) with the bytes of hidden and weight
  read (and their gradients written in the backward) once.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from benchmarks import report

GiB = 2**30
# The steps of gpu_check.sh, in order; the report names each one with its status.
STEPS = ("env", "peers", "build", "tests", "ceilings", "routes", "bench-logits", "bench-lm_head", "bench-peers",
         "report")
BENCH_STEPS = ("bench-logits", "bench-lm_head", "bench-peers")
REAL_SCALE = dict(n=8, t=4096, v=128256, h=4096, dtype="bf16")
# The versions the env step records: what the checks use, and what the peers' wheels rely on being there.
PACKAGES = ("triton", "transformers", "accelerate", "peft", "numpy", "pytest", "pytest-xdist", "pytest-timeout",
            "trl", "datasets", "liger-kernel", "cut-cross-entropy", "pyarrow", "fsspec", "huggingface-hub")
FILES = ("report.md", "results.csv", "results.json", "env.log", "build.log", "tests.log", "tests.xml", "bench.log")


# ----------------------------------------------------------------------------------------------------
# Environment


def _run(cmd) -> str:
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]} not found"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{type(error).__name__}: {error}"
    return (proc.stdout or proc.stderr).strip()


def _version(dist: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def env_facts() -> dict:
    import torch

    facts = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "packages": {d: _version(d) for d in PACKAGES},
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                            "temperature.gpu,power.draw", "--format=csv,noheader"]),
        "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:],
    }  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        facts["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                        "multiprocessors": props.multi_processor_count, "memory_free_gib": round(free / GiB, 1),
                        "memory_total_gib": round(total / GiB, 1)}  # fmt: skip
    from dpo_kernels.ops import native

    facts["native"] = {"cpu": native.has_kernel("cpu"), "cuda": native.has_kernel("cuda")}
    return facts


def _env_text(facts: dict) -> str:
    lines = [f"{k}: {v}" for k, v in facts.items() if k != "packages"]
    lines += [f"package {k}: {v or 'not installed'}" for k, v in facts["packages"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Ceilings


# The dry run (``--dry-run``) times each call once, without warm-up: its figures are no GPU figures, it proves the
# code paths (under the interpreter, the fused head's kernels take seconds a call).
ONCE = False


def _time(fn, device, warmup=3, reps=10) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU (one sync after the timed call), perf_counter on CPU."""
    import torch

    if ONCE:
        warmup, reps = 0, 1
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _copy_seconds(device, nbytes: int) -> float:
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return _time(lambda: dst.copy_(src), device)


def _matmul_seconds(device, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    return _time(lambda: torch.matmul(a, b, out=c), device)


def ceilings(device, copy_bytes: int, matmul_n: int) -> dict:
    copy_s = _copy_seconds(device, copy_bytes)  # its buffers are freed before the matmul's are made
    mm_s = _matmul_seconds(device, matmul_n)
    return {
        "device": str(device),
        "copy_bytes": copy_bytes,
        "copy_s": copy_s,
        "bandwidth_Bps": 2 * copy_bytes / copy_s,  # read + written
        "matmul_n": matmul_n,
        "matmul_dtype": "bf16",
        "matmul_s": mm_s,
        "matmul_flops": 2 * matmul_n**3,
        "rate_flops": 2 * matmul_n**3 / mm_s,
    }


# ----------------------------------------------------------------------------------------------------
# Routes


def routes(device, n: int, t: int, h: int, v: int) -> dict:
    """Seconds (median, CUDA events) of the fused head's forward routes and of training steps with the rows
    compacted or all run (see the module docstring), bf16."""
    import torch

    from dpo_kernels import fused_linear_dpo_loss
    from dpo_kernels.ops import linear as linear_ops
    from dpo_kernels.triton import linear

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n * t, h, generator=gen).to(device, torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, torch.bfloat16)
    labels = torch.randint(0, v, (n * t,), generator=gen).to(device)
    out = {"n": n, "t": t, "h": h, "v": v, "dtype": "bf16"}
    for stats in (False, True):
        tag = "_stats" if stats else ""
        out[f"fwd_fused{tag}_s"] = _time(lambda: linear.fused_linear_logps_fwd(hidden, weight, None, labels,
                                                                               with_stats=stats), device)  # fmt: skip
        out[f"fwd_cublas{tag}_s"] = _time(lambda: linear.fused_linear_logps_fwd_cublas(hidden, weight, None, labels,
                                                                                       with_stats=stats), device)  # fmt: skip
    leaf_h = hidden.view(n, t, h).detach().requires_grad_()
    leaf_w = weight.detach().requires_grad_()

    def step(y, route="recompute"):
        leaf_h.grad = leaf_w.grad = None
        loss, _ = fused_linear_dpo_loss(leaf_h, leaf_w, y, beta=0.1, backend="triton", token_metrics=False,
                                        route=route)  # fmt: skip
        loss.backward()

    every_row = linear_ops._static_rows
    for share in (0.0, 0.5):
        y = labels.view(n, t).clone()
        y[:, : int(t * share)] = -100
        tag = f"prompt{int(100 * share)}"
        out[f"step_compacted_{tag}_s"] = _time(lambda: step(y), device, warmup=2, reps=5)
        out[f"step_one_pass_{tag}_s"] = _time(lambda: step(y, "one_pass"), device, warmup=2, reps=5)
        linear_ops._static_rows = lambda labels: True  # the path taken under graph capture
        try:
            out[f"step_all_rows_{tag}_s"] = _time(lambda: step(y), device, warmup=2, reps=5)
        finally:
            linear_ops._static_rows = every_row
    return out


def _routes_markdown(r) -> list[str]:
    md = [f"Shape: {r['n']}×{r['t']} rows, H {r['h']}, V {r['v']}, {r['dtype']}; median ms (CUDA events).", "",
          "| what | ms | against | ms | ratio |", "|---|---:|---|---:|---:|"]  # fmt: skip
    pairs = [("forward, cuBLAS + log-prob kernel (the op's)", "fwd_cublas_s", "fused Triton forward", "fwd_fused_s"),
             ("the same with statistics", "fwd_cublas_stats_s", "fused, with statistics", "fwd_fused_stats_s"),
             ("step, rows compacted (2 syncs), all scored", "step_compacted_prompt0_s",
              "all rows, no sync", "step_all_rows_prompt0_s"),
             ("step, rows compacted (2 syncs), half prompt", "step_compacted_prompt50_s",
              "all rows, no sync", "step_all_rows_prompt50_s"),
             ("step, one-pass route (6·M·H·V), all scored", "step_one_pass_prompt0_s",
              "recompute route (8·M·H·V)", "step_compacted_prompt0_s"),
             ("step, one-pass route, half prompt", "step_one_pass_prompt50_s",
              "recompute route", "step_compacted_prompt50_s")]  # fmt: skip
    for name, key, other, other_key in pairs:
        if key not in r:  # a report of an earlier version
            continue
        md.append(f"| {name} | {_ms(r[key])} | {other} | {_ms(r[other_key])} | {r[key] / r[other_key]:.3f} |")
    return md


# ----------------------------------------------------------------------------------------------------
# Floors


def floors(case: dict, ceil: dict) -> dict:
    """{"fwd", "bwd", "total"} floor seconds of one harness case (see the module docstring), and the basis."""
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[case["dtype"]]
    bw, rate = ceil["bandwidth_Bps"], ceil["rate_flops"]
    n, t, v, h = case["n"], case["t"], case["v"], case["h"]
    if case["workload"] == "logits":
        logits = n * t * v * itemsize
        fwd, bwd = logits / bw, 2 * logits / bw
        basis = "bytes: logits read once (fwd) + read and grad written once (bwd) = 3·N·T·V·itemsize, / BW"
    else:
        scored = n * (t - max(round(t * case["prompt_frac"]), 1))  # = measure.Case.scored_tokens
        operands = (n * t * h + v * h) * itemsize
        fwd = max(2 * scored * h * v / rate, operands / bw)
        bwd = max(4 * scored * h * v / rate, 2 * operands / bw)
        basis = ("FLOPs: 6·S·H·V (naive's products over the S scored tokens), / R; "
                 "a recomputing fused head does 8·S·H·V")
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd, "basis": basis}


# ----------------------------------------------------------------------------------------------------
# Report


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _steps(work: str) -> list[dict]:
    rows = {}
    try:
        with open(os.path.join(work, "steps.tsv")) as f:
            for line in f:
                name, status, rc, seconds, detail = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
                rows[name] = {"step": name, "status": status, "rc": rc, "seconds": float(seconds or 0),
                              "detail": detail}
    except OSError:
        pass
    rows.setdefault("report", {"step": "report", "status": "ok", "rc": "0", "seconds": 0.0, "detail": "this report"})
    return [rows.get(s, {"step": s, "status": "not run", "rc": "", "seconds": 0.0, "detail": ""}) for s in STEPS]


def junit_summary(path: str):
    """{tests, failures, errors, skipped, time_s, failed: [ids]} from a pytest junit xml, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    out["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None][:50]  # fmt: skip
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def _ms(s):
    return "-" if s is None else f"{1e3 * s:.4g}"


def bench_rows(work: str, ceil) -> list[dict]:
    rows, seen = [], set()
    for step in BENCH_STEPS:
        data = _read_json(os.path.join(work, step, "results.json"))
        for r in (data or {}).get("results", []):
            # The reference runs in every step (each checks against it): its first timing stands.
            if r.get("kind") == "skipped" or r.get("sweep") or (r["case_label"], r["provider"]) in seen:
                continue
            seen.add((r["case_label"], r["provider"]))
            if ceil and r.get("time"):
                f = floors(r["case"], ceil)
                r["floor_s"] = {k: f[k] for k in ("fwd", "bwd", "total")}
                r["floor_basis"] = f["basis"]
                r["x_floor"] = r["time"]["total"]["median"] / f["total"]
            rows.append(r)
    return rows


def write_report(work: str, out: str, dry_run: bool) -> str:
    env = _read_json(os.path.join(work, "env.json")) or {}
    ceil = _read_json(os.path.join(work, "ceilings.json"))
    steps = _steps(work)
    tests = junit_summary(os.path.join(out, "tests.xml"))
    rows = bench_rows(work, ceil)
    title = "GPU check"
    if dry_run:
        title += " (dry run on the CPU: interpreter, tiny shapes; no figure here is a GPU figure)"
    md = [f"# dpo_kernels {title}", "", f"- date: {env.get('date_utc', '?')}"]
    gpu = env.get("gpu")
    md.append(f"- card: {gpu['name']} (sm {gpu['capability']}, {gpu['multiprocessors']} SMs, "
              f"{gpu['memory_total_gib']} GiB)" if gpu else "- card: none (CPU)")  # fmt: skip
    md.append(f"- nvidia-smi: {env.get('nvidia_smi', '?')}")
    pk = env.get("packages", {})
    md.append(f"- python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), "
              f"triton {pk.get('triton')}, nvcc: {' '.join(env.get('nvcc', [])) or '?'}")  # fmt: skip
    peers = {k: pk.get(k) for k in ("trl", "datasets", "liger-kernel", "cut-cross-entropy")}
    md.append("- peers: " + ", ".join(f"{k} {v or 'missing'}" for k, v in peers.items()))
    md.append(f"- native extension: {env.get('native', '?')} (at the env step, before the build step)")
    md += ["", "## Steps", "", "| step | status | s | detail |", "|---|---|---:|---|"]
    for s in steps:
        rc = f" (rc {s['rc']})" if s["status"] not in ("ok", "skipped", "not run") else ""
        md.append(f"| {s['step']} | {s['status']}{rc} | {s['seconds']:.0f} | {s['detail']} |")
    md += ["", "## Tests", ""]
    if tests:
        md.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped in {tests['time_s']} s (tests.xml, tests.log)")  # fmt: skip
        md += [f"- FAILED {t}" for t in tests["failed"]]
    else:
        md.append("no junit xml (see tests.log)")
    md += ["", "## Ceilings", ""]
    if ceil:
        md.append(f"- copy: {ceil['copy_bytes'] / GiB:.2f} GiB device-to-device in {_ms(ceil['copy_s'])} ms "
                  f"-> BW = {ceil['bandwidth_Bps'] / 1e9:.0f} GB/s (read + written)")  # fmt: skip
        md.append(f"- matmul: {ceil['matmul_n']}³ {ceil['matmul_dtype']} in {_ms(ceil['matmul_s'])} ms "
                  f"-> R = {ceil['rate_flops'] / 1e12:.1f} TFLOP/s")  # fmt: skip
    else:
        md.append("not measured (see the ceilings step); no floors below")
    md += ["", "## Fused LM head: forward routes, the compaction's sync", ""]
    routed = _read_json(os.path.join(work, "routes.json"))
    md += _routes_markdown(routed) if routed else ["not measured (see the routes step)"]
    md += ["", "## Benchmark against the floors", ""]
    if rows:
        md += [_floor_table(rows), ""]
        md += sorted({f"- {r['case']['workload']} floor: {r['floor_basis']}" for r in rows if r.get("floor_basis")})
    else:
        md.append("no benchmark results (see bench.log)")
    for step in BENCH_STEPS:
        data = _read_json(os.path.join(work, step, "results.json"))
        if data:
            measured = [r for r in data["results"] if r.get("kind") != "skipped"]
            md += ["", f"### Harness table: {step}", "", f"`{data.get('command')}`", ""]
            md.append(report.markdown_table(measured))
            skipped = sorted({f"{r['provider']} ({r['skipped']})" for r in data["results"] if "skipped" in r})
            if skipped:
                md += ["", "Not run: " + "; ".join(skipped)]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    _write_csv(os.path.join(out, "results.csv"), rows)
    payload = {"dry_run": dry_run, "env": env, "steps": steps, "tests": tests, "ceilings": ceil, "routes": routed,
               "results": rows}  # fmt: skip
    report.write_json(os.path.join(out, "results.json"), payload)
    return _summary(steps, tests, ceil, routed, rows)


def _floor_table(rows) -> str:
    lines = ["| case | provider | check | fwd ms | bwd ms | fwd+bwd ms | floor ms | × floor | peak extra GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        t = r.get("time") or {}
        ok = "ok" if r["check"]["ok"] else ("FAILED" if r["check"].get("error") else "DISAGREES")
        med = {k: (t.get(k) or {}).get("median") for k in ("fwd", "bwd", "total")}
        floor = (r.get("floor_s") or {}).get("total")
        x = f"{r['x_floor']:.2f}" if r.get("x_floor") is not None else "-"
        mem = f"{r['extra_bytes'] / GiB:.3f}" if r.get("extra_bytes") is not None else "-"
        lines.append(f"| {r['case_label']} | {r['provider']} | {ok} | {_ms(med['fwd'])} | {_ms(med['bwd'])} "
                     f"| {_ms(med['total'])} | {_ms(floor)} | {x} | {mem} |")  # fmt: skip
    return "\n".join(lines)


def _write_csv(path, rows):
    fields = report.CSV_FIELDS + ["floor_fwd_s", "floor_bwd_s", "floor_total_s", "x_floor"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            row = report.flat(r)
            for k in ("fwd", "bwd", "total"):
                row[f"floor_{k}_s"] = (r.get("floor_s") or {}).get(k)
            row["x_floor"] = r.get("x_floor")
            w.writerow(row)


def _summary(steps, tests, ceil, routed, rows) -> str:
    """The short table printed last (the device tool's reply carries the end of the output)."""
    out = ["", "== gpu_check summary =="]
    out.append("steps: " + ", ".join(f"{s['step']} {s['status']} {s['seconds']:.0f}s" for s in steps))
    if tests:
        out.append(f"tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                   f"{tests['skipped']} skipped ({tests['time_s']} s)")  # fmt: skip
    if ceil:
        out.append(f"ceilings: BW {ceil['bandwidth_Bps'] / 1e9:.0f} GB/s, R {ceil['rate_flops'] / 1e12:.1f} TFLOP/s")
    if routed:
        out.append(f"routes ms: fwd cublas {_ms(routed['fwd_cublas_s'])} / fused {_ms(routed['fwd_fused_s'])}; "
                   f"step compacted {_ms(routed['step_compacted_prompt0_s'])} / all rows "
                   f"{_ms(routed['step_all_rows_prompt0_s'])} (all scored), {_ms(routed['step_compacted_prompt50_s'])} "
                   f"/ {_ms(routed['step_all_rows_prompt50_s'])} (half prompt)")  # fmt: skip
        if "step_one_pass_prompt0_s" in routed:
            out.append(f"one-pass step ms: {_ms(routed['step_one_pass_prompt0_s'])} (all scored), "
                       f"{_ms(routed['step_one_pass_prompt50_s'])} (half prompt) against the recompute route above")
    out.append(f"{'case':<40} {'provider':<32} {'check':<6} {'fwd+bwd ms':>11} {'floor ms':>9} {'x floor':>8}")
    for r in rows:
        t = ((r.get("time") or {}).get("total") or {}).get("median")
        ok = "ok" if r["check"]["ok"] else "FAIL"
        x = f"{r['x_floor']:.2f}" if r.get("x_floor") is not None else "-"
        out.append(f"{r['case_label']:<40} {r['provider']:<32} {ok:<6} {_ms(t):>11} "
                   f"{_ms((r.get('floor_s') or {}).get('total')):>9} {x:>8}")  # fmt: skip
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# Entry point


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("env", "ceilings", "routes", "report"))
    p.add_argument("--work", required=True, help="gpu_check.sh's scratch folder")
    p.add_argument("--out", help="the folder the report goes to (report)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    args = p.parse_args(argv)
    global ONCE
    ONCE = args.dry_run
    os.makedirs(args.work, exist_ok=True)
    if args.what == "env":
        facts = env_facts()
        report.write_json(os.path.join(args.work, "env.json"), facts)
        print(_env_text(facts))
    elif args.what in ("ceilings", "routes"):
        import torch

        device = torch.device("cpu" if args.dry_run else "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 1
        if args.what == "ceilings":
            result = ceilings(device, *((64 * 2**20, 512) if args.dry_run else (4 * GiB, 8192)))
        else:
            shape = dict(n=2, t=16, h=16, v=64) if args.dry_run else dict(n=8, t=4096, h=4096, v=128256)
            result = routes(device, **shape)
        report.write_json(os.path.join(args.work, f"{args.what}.json"), result)
        print(json.dumps(result, indent=1))
    else:
        if not args.out:
            p.error("report needs --out")
        print(write_report(args.work, args.out, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
