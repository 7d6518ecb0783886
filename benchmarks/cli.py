"""dpo_kernels benchmark harness: every provider of per-sequence log-probs + sigmoid DPO, fwd + bwd.

    python -m benchmarks                      # the built-in default config (a few minutes on 2 CPU cores)
    python -m benchmarks --sweep              # + a small sweep over V and tokens, with plots
    python -m benchmarks --list-providers     # what can run here, and why the others cannot
    python -m benchmarks --workloads lm_head --n 4 --t 128 --h 512 --v 8000 --dtypes bf16 --reps 3

For every case (workload x dtype x shape): each provider's output (loss, per-sequence log-probs where
it returns them) and gradients are checked against the naive reference on the same inputs; a provider
that disagrees is reported and not timed. Then forward, backward and forward+backward times (median
and IQR of --reps passes after --warmup, reps interleaved across providers in a rotating order;
perf_counter on CPU, CUDA events on GPU), and the peak memory beyond the inputs and their gradients,
measured in a fresh child process per (provider, case): peak RSS on CPU, max_memory_allocated on GPU.
Ratios are to the reference of the same run. Then modeled GPU figures at real scale (see
benchmarks/modeled.py). Tables go to stdout; CSV, JSON, Markdown and PNG files to --out-dir.
Exit status 1 when a dpo_kernels provider disagrees with the reference or fails; a peer that does is
reported only.
"""

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from benchmarks import measure, providers, report

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
# The default config: the README's workloads, sized so that the whole run (all providers, both dtypes,
# memory children, modeled section) takes a few minutes on a 2-core CPU.
DEFAULT_SHAPES = {
    "logits": dict(n=8, t=512, v=32000, h=0),
    "lm_head": dict(n=8, t=256, v=32000, h=1024),
}
DEFAULT_DTYPES = {"logits": "fp32,bf16", "lm_head": "fp32,bf16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default shapes: " + "; ".join(f"{w}: " + " ".join(f"{k.upper()}={v}" for k, v in s.items() if v)
                                              for w, s in DEFAULT_SHAPES.items()),
    )  # fmt: skip
    p.add_argument("--workloads", default="logits,lm_head", help="comma list of: logits, lm_head (default both)")
    p.add_argument("--n", type=int, help="sequences, 2B (even; default per workload)")
    p.add_argument("--t", type=int, help="tokens per sequence (default per workload)")
    p.add_argument("--v", type=int, help="vocabulary size (default 32000)")
    p.add_argument("--h", type=int, help="hidden size, lm_head workload (default 1024)")
    p.add_argument("--prompt-frac", type=float, default=0.25, help="share of each sequence masked as prompt (0.25)")
    p.add_argument("--dtypes", help="comma list of fp32, bf16, fp16 (default fp32,bf16)")
    p.add_argument("--providers", help="comma list of provider names (default: every default provider that can "
                   "run here; the reference always runs); see --list-providers")  # fmt: skip
    p.add_argument("--list-providers", action="store_true", help="list the providers and exit")
    p.add_argument("--reps", type=int, default=5, help="timed passes per provider (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("--out-dir", default=DEFAULT_OUT, help="where CSV/JSON/Markdown/PNG go (default benchmarks/out)")
    p.add_argument("--sweep", action="store_true", help="also sweep V and tokens (x1/4, x1/2, x1) and plot them")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--no-modeled", action="store_true", help="skip the modeled GPU section")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 <= args.prompt_frac < 1:
        p.error("--prompt-frac must be in [0, 1)")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    if args.n is not None and (args.n < 2 or args.n % 2):
        p.error("--n must be even (chosen and rejected halves) and >= 2")
    for w in args.workloads.split(","):
        if w not in providers.WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(providers.WORKLOADS)}")
    for d in (args.dtypes or "fp32").split(","):
        if d not in measure.DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(measure.DTYPES)}")
    return args


# ----------------------------------------------------------------------------------------------------
# Machine


def machine(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    info["cpu"], info["cores"] = _lscpu()
    info["device"] = str(device)
    try:
        info["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    versions = {}
    for mod in ("trl", "liger_kernel", "cut_cross_entropy", "triton"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
        except Exception:
            pass
    info["peers"] = versions
    return info


def _lscpu():
    model, cores = platform.processor() or "unknown", os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model, cores


# ----------------------------------------------------------------------------------------------------
# One case


def run_case(case: measure.Case, names, device, args, threads, probe) -> list[dict]:
    chosen, skipped = providers.select(case.workload, names, device)
    fns, rows, failed = {}, [], {}
    for p in chosen:
        try:
            fns[p.name] = p.build()
        except Exception as error:
            failed[p.name] = f"{type(error).__name__}: {error}"
    inputs = measure.Inputs(case, device)
    checks = measure.check(fns, inputs)
    good = {n: fn for n, fn in fns.items() if checks[n]["ok"]}
    times = measure.time_all(good, inputs, device, args.reps, args.warmup) if "reference" in good else {}
    del inputs
    if device.type == "cuda":  # hand the cached blocks back: the memory children share the card
        torch.cuda.empty_cache()
    kinds = {p.name: p.kind for p in chosen}
    for name in [p.name for p in chosen]:
        row = {
            "case": case.__dict__, "case_label": case.label(), "provider": name, "kind": kinds[name],
            "check": checks.get(name) or {"errors": {}, "max_err": None, "ok": False, "error": failed.get(name)},
        }  # fmt: skip
        if name in times:
            row["time"] = {ph: measure.summarize(v) for ph, v in times[name].items()}
            row["samples_s"] = times[name]
        if name in good and not args.no_memory:
            mem = probe.measure(case, name, device, threads)
            row["extra_bytes"], row["memory_method"] = mem["extra_bytes"], mem["method"]
        rows.append(row)
    ref = next((r for r in rows if r["provider"] == "reference"), None)
    for r in rows:
        if ref and r.get("time") and ref.get("time"):
            r["time_ratio"] = r["time"]["total"]["median"] / ref["time"]["total"]["median"]
        # Memory ratios only where the reference's figure is well above the measurement's resolution.
        if ref and r.get("extra_bytes") is not None and (ref.get("extra_bytes") or 0) >= 2**20:
            r["mem_ratio"] = r["extra_bytes"] / ref["extra_bytes"]
    for name, why in skipped.items():
        rows.append({"case": case.__dict__, "case_label": case.label(), "provider": name, "kind": "skipped",
                     "skipped": why, "check": {"errors": {}, "max_err": None, "ok": False, "error": f"skipped: {why}"}})  # fmt: skip
    return rows


def build_cases(args):
    cases, sweep_cases = [], []
    for workload in args.workloads.split(","):
        base = dict(DEFAULT_SHAPES[workload])
        for key in ("n", "t", "v", "h"):
            if getattr(args, key) is not None:
                base[key] = getattr(args, key)
        if workload == "lm_head" and not base["h"]:
            base["h"] = 1024
        for dtype in (args.dtypes or DEFAULT_DTYPES[workload]).split(","):
            main = measure.Case(workload, dtype, base["n"], base["t"], base["v"], base["h"], args.prompt_frac)
            cases.append(main)
            if args.sweep:
                seen = {main}  # small shapes clamp to the same point: measure it once
                for div in (4, 2):
                    v, t = max(8, base["v"] // div), max(8, base["t"] // div)
                    for axis, case in (
                        ("V", measure.Case(workload, dtype, base["n"], base["t"], v, base["h"], args.prompt_frac)),
                        ("tokens", measure.Case(workload, dtype, base["n"], t, base["v"], base["h"], args.prompt_frac)),
                    ):
                        if case not in seen:
                            seen.add(case)
                            sweep_cases.append((axis, case))
    return cases, sweep_cases


# ----------------------------------------------------------------------------------------------------
# Driver


def list_providers(device):
    print(f"providers on {device.type} (* = runs by default):")
    for p in providers.registry():
        why = p.available(device)
        state = "available" if why is None else f"unavailable: {why}"
        print(f"  {p.workload:<8} {'*' if p.default else ' '} {p.name:<32} [{p.kind}] {state}\n      {p.note}")


def main(argv=None):
    args = parse_args(argv)
    if args.child_spec:
        return measure.child_main(json.loads(args.child_spec))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.list_providers:
        return list_providers(device)
    names = args.providers.split(",") if args.providers else None
    if names:
        known = {p.name for p in providers.registry()}
        unknown = [n for n in names if n not in known]
        if unknown:
            sys.exit(f"unknown provider(s) {unknown}; see --list-providers")
    threads = torch.get_num_threads()
    info = machine(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    cases, sweep_cases = build_cases(args)
    command = "python -m benchmarks" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(argv if argv is not None else sys.argv[1:]))  # fmt: skip

    header = [
        f"# dpo_kernels benchmark ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, {info['threads']} threads; device {info['device']}; "
        f"load average at start {info.get('loadavg_1m_at_start', 'n/a')} (1 min)"
        + (f" ({info['gpu']})" if "gpu" in info else ""),
        f"- peers: {', '.join(f'{k} {v}' for k, v in info['peers'].items()) or 'none installed'}",
        "- work: per-sequence log-probs (shifted labels, prompt masked) + reference-free sigmoid DPO loss (β 0.1), "
        "forward + backward; lm_head includes the LM-head matmul",
        f"- time: median [IQR] of {args.reps} passes after {args.warmup} warm-up, interleaved across providers "
        f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'}); ratios are to the reference of the same run",
        "- memory: " + ("skipped" if args.no_memory else (
            "torch.cuda.max_memory_allocated" if device.type == "cuda" else
            "peak RSS (VmHWM, reset via /proc/self/clear_refs) of a fresh child process per (provider, case)")
            + ", beyond the inputs and their gradients (an in-place gradient is not new memory)"),
        f"- check: max |x − ref| / max |ref| over loss, log-probs and gradients; tolerance {measure.TOLERANCE}",
    ]  # fmt: skip
    print("\n".join(header), flush=True)

    progress = None
    todo = [("", c) for c in cases] + sweep_cases
    if not args.no_progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=len(todo), desc="cases", unit="case", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            progress = None
    imports = {m for w in args.workloads.split(",") for p in providers.select(w, names, device)[0] for m in p.imports}
    probe = None if args.no_memory else measure.MemoryProbe(sorted(imports))
    rows = []
    for sweep, case in todo:
        if progress is not None:
            progress.set_postfix_str(case.label() + (f" (sweep {sweep})" if sweep else ""))
        case_rows = run_case(case, names, device, args, threads, probe)
        for r in case_rows:
            r["sweep"] = sweep
        rows += case_rows
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()

    main_rows = [r for r in rows if not r["sweep"]]
    table = report.markdown_table([r for r in main_rows if r["kind"] != "skipped"])
    skipped = sorted({(r["provider"], r["skipped"]) for r in main_rows if r["kind"] == "skipped"})
    out = ["", "## Results (measured)", "", table, ""]
    if skipped:
        out += ["Not run here: " + "; ".join(f"{n} ({why})" for n, why in skipped), ""]
    disagreeing = [r for r in rows if not r["check"]["ok"] and r["kind"] != "skipped"]
    used = dict.fromkeys((r["case"]["workload"], r["provider"]) for r in main_rows if r["kind"] != "skipped")
    notes = {(p.workload, p.name): p.note for p in providers.registry()}
    out += ["Providers:"] + [f"- {w} `{n}`: {notes[w, n]}" for w, n in used] + [""]
    ours = [r for r in disagreeing if r["kind"] != "peer"]
    if not disagreeing:
        out.append("correctness check: all providers agree with the reference")
    else:
        names = ", ".join(sorted({f"{r['provider']} ({r['case_label']})" for r in disagreeing}))
        out.append(f"correctness check: {len(disagreeing)} provider(s) disagree or failed: {names}")
        if not ours:
            out.append("(peers only: reported, not an error; the exit status is 1 only when a dpo_kernels provider disagrees)")
    if args.sweep:
        sweep_rows = [r for r in rows if r["sweep"] and r["kind"] != "skipped"]
        out += ["", "## Sweep (measured)", "", report.markdown_table(sweep_rows)]
    modeled = None
    if not args.no_modeled:
        from benchmarks import modeled as modeled_mod

        modeled = modeled_mod.run()
        out += ["", "## Modeled (GPU, real scale; not measured)", "", modeled["markdown"]]
    text = "\n".join(out)
    print(text, flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    files = []
    md_path = os.path.join(args.out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write("\n".join(header) + "\n" + text + "\n")
    files.append(md_path)
    csv_path = os.path.join(args.out_dir, "results.csv")
    report.write_csv(csv_path, [r for r in rows if r["kind"] != "skipped"])
    files.append(csv_path)
    json_path = os.path.join(args.out_dir, "results.json")
    config = {k: v for k, v in vars(args).items() if k != "child_spec"}
    payload = {"started_utc": started.isoformat(), "command": command, "config": config, "machine": info,
               "tolerance": measure.TOLERANCE, "results": rows,
               "modeled": {k: v for k, v in modeled.items() if k != "markdown"} if modeled else None}  # fmt: skip
    report.write_json(json_path, payload)
    files.append(json_path)
    if not args.no_plots and not report.can_plot():
        print("\nplots skipped: matplotlib is not installed (pip install '.[bench]')")
    elif not args.no_plots:
        plot_path = os.path.join(args.out_dir, "results.png")
        report.plot_main(plot_path, [r for r in main_rows if r.get("time")])
        files.append(plot_path)
        if args.sweep:
            plot_rows = [r for r in rows if r["sweep"]]
            for r in main_rows:  # the main point belongs to both sweeps
                plot_rows += [dict(r, sweep="V"), dict(r, sweep="tokens")]
            files += report.plot_sweep(args.out_dir, plot_rows)
    print("\nwrote " + ", ".join(os.path.relpath(f) for f in files))
    return 1 if ours else 0
