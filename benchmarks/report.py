"""Output: the Markdown table, CSV and JSON files, and the PNG plots."""

import csv
import json
import os

MiB = 2**20


def _ms(s):
    return f"{1e3 * s:.1f}"


def _time_cell(stat):
    if stat is None:
        return "-"
    return f"{_ms(stat['median'])} [{_ms(stat['q1'])}–{_ms(stat['q3'])}]"


def markdown_table(rows) -> str:
    """One row per (case, provider). Times: median [IQR] in ms; ratios: provider / reference, same run."""
    head = (
        "| case | provider | check: max rel err | fwd ms | bwd ms | fwd+bwd ms | time vs ref | peak extra MiB | mem vs ref |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        if r["check"]["error"]:
            status = f"FAILED: {r['check']['error'][:80]}"
        elif r["check"]["ok"]:
            status = f"ok {r['check']['max_err']:.1e}"
        else:
            status = f"**DISAGREES** {r['check']['max_err']:.1e} (not timed)"
        t = r.get("time") or {}
        ratio = f"{r['time_ratio']:.2f}×" if r.get("time_ratio") is not None else "-"
        mem = r.get("extra_bytes")
        mem_cell = f"{mem / MiB:.1f}" if mem is not None else "n/a"
        mem_ratio = f"{r['mem_ratio']:.3f}×" if r.get("mem_ratio") is not None else "-"
        lines.append(
            f"| {r['case_label']} | {r['provider']} | {status} | {_time_cell(t.get('fwd'))} | {_time_cell(t.get('bwd'))} "
            f"| {_time_cell(t.get('total'))} | {ratio} | {mem_cell} | {mem_ratio} |"
        )
    return "\n".join(lines)


CSV_FIELDS = [
    "workload", "dtype", "N", "T", "V", "H", "prompt_frac", "provider", "kind", "check_ok", "max_rel_err",
    "fwd_median_s", "fwd_q1_s", "fwd_q3_s", "fwd_min_s", "fwd_max_s",
    "bwd_median_s", "bwd_q1_s", "bwd_q3_s", "bwd_min_s", "bwd_max_s",
    "total_median_s", "total_q1_s", "total_q3_s", "total_min_s", "total_max_s",
    "time_ratio", "extra_bytes", "mem_ratio", "memory_method", "sweep",
]  # fmt: skip


def flat(r) -> dict:
    c = r["case"]
    out = {
        "workload": c["workload"], "dtype": c["dtype"], "N": c["n"], "T": c["t"], "V": c["v"],
        "H": c["h"] if c["workload"] == "lm_head" else "", "prompt_frac": c["prompt_frac"],
        "provider": r["provider"], "kind": r["kind"], "check_ok": r["check"]["ok"], "max_rel_err": r["check"]["max_err"],
        "time_ratio": r.get("time_ratio"), "extra_bytes": r.get("extra_bytes"), "mem_ratio": r.get("mem_ratio"),
        "memory_method": r.get("memory_method"), "sweep": r.get("sweep", ""),
    }  # fmt: skip
    for phase in ("fwd", "bwd", "total"):
        stat = (r.get("time") or {}).get(phase) or {}
        for k in ("median", "q1", "q3", "min", "max"):
            out[f"{phase}_{k}_s"] = stat.get(k)
    return out


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(flat(r))


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def can_plot() -> bool:
    """Plots are optional (the `bench` extra): the tables and files never depend on them."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_main(path, rows):
    """Bar chart of fwd+bwd time and peak extra memory per provider, one panel pair per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case_label"] for r in rows))
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 2.2 + 1.6 * len(cases)), squeeze=False)
    for i, label in enumerate(cases):
        sub = [r for r in rows if r["case_label"] == label]
        names = [r["provider"] for r in sub]
        times = [1e3 * r["time"]["total"]["median"] if r.get("time") else 0 for r in sub]
        mems = [(r.get("extra_bytes") or 0) / MiB for r in sub]
        axes[i][0].barh(names, times)
        axes[i][0].set_title(f"{label}: fwd+bwd ms (median)", fontsize=8)
        axes[i][1].barh(names, mems, color="tab:orange")
        axes[i][1].set_title(f"{label}: peak extra MiB", fontsize=8)
        for ax in axes[i]:
            ax.tick_params(labelsize=7)
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(out_dir, rows) -> list[str]:
    """time and memory vs V and vs tokens, one line per provider, per (workload, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = {}
    for r in rows:
        if r.get("sweep") and r.get("time"):
            groups.setdefault((r["case"]["workload"], r["case"]["dtype"], r["sweep"]), []).append(r)
    for (workload, dtype, axis), sub in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r["provider"] for r in sub):
            # one point per x: the main case can coincide with a sweep point
            by_x = {}
            for r in sub:
                if r["provider"] == name:
                    by_x.setdefault(r["case"]["v"] if axis == "V" else r["case"]["n"] * r["case"]["t"], r)
            pts = sorted(by_x.items(), key=lambda p: p[0])
            xs = [x for x, _ in pts]
            ax_t.plot(xs, [1e3 * r["time"]["total"]["median"] for _, r in pts], marker="o", label=name)
            mem = [(x, r["extra_bytes"] / MiB) for x, r in pts if r.get("extra_bytes") is not None]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=name)
        xlabel = "vocabulary V" if axis == "V" else "tokens N·T"
        ax_t.set(xlabel=xlabel, ylabel="fwd+bwd ms (median)", title=f"{workload} {dtype}: time vs {axis}")
        ax_m.set(xlabel=xlabel, ylabel="peak extra MiB", title=f"{workload} {dtype}: memory vs {axis}")
        for ax in (ax_t, ax_m):
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"sweep_{workload}_{dtype}_vs_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
