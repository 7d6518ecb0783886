"""A/B of the portable fused LM head against its own past: has the code become slower on this machine?

    python -m benchmarks.portable_ab --old 397bcb4 --dtype fp32 --t 256 --reps 5

Times, interleaved in one process (the two versions swapping places every pass), forward + backward of the per-token log-probs on the same compacted
scored rows (8 sequences of ``--t`` tokens, H 1024, V 32000, a 25 % prompt) with ``dpo_kernels/portable/
linear.py`` as it is at ``--old`` (read with ``git show``) and as it is now, beside the naive reference
(``reference.lm_head_logits`` + ``reference.sequence_logps``, autograd). A ratio between two runs on
different machines says little (the GEMMs' speed differs by CPU); this compares like with like.
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _old_module(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:dpo_kernels/portable/linear.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "old_portable_linear.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_portable_linear", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    from dpo_kernels import reference
    from dpo_kernels.portable import linear as current

    p = argparse.ArgumentParser(prog="python -m benchmarks.portable_ab", description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="the commit to compare against")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--t", type=int, default=256, help="tokens per sequence (8 sequences)")
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    n, t = 8, args.t
    hidden = torch.randn(n, t, args.h).to(dtype)
    weight = (torch.randn(args.v, args.h) / args.h**0.5).to(dtype)
    labels = torch.randint(0, args.v, (n, t))
    labels[:, : t // 4] = -100
    y = labels[:, 1:]
    rows_n, rows_t = (y != -100).nonzero(as_tuple=True)
    h_rows, y_rows = hidden[:, :-1][rows_n, rows_t], y[rows_n, rows_t]

    def fused(module):
        def step():
            with torch.no_grad():
                logp, lse, _ = module.fused_linear_logps_fwd(h_rows, weight, None, y_rows, 1.0, None, 1.0)
                module.fused_linear_logps_bwd(torch.ones_like(logp), h_rows, weight, None, y_rows, lse, 1.0, None, 1.0)

        return step

    def naive():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        reference.sequence_logps(reference.lm_head_logits(h, w), labels).sum().backward()

    steps = {"reference": naive, f"old ({args.old})": fused(_old_module(args.old)), "now": fused(current)}
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    names = list(steps)
    for rep in range(args.reps):
        # the two versions swap places every pass: neither always runs right after the reference's frees
        order = names if rep % 2 == 0 else [names[0], names[2], names[1]]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["reference"])
    print(f"{args.dtype}, 8 x {t} tokens, H {args.h}, V {args.v}, median of {args.reps} interleaved passes [min-max]:")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"  {name:>16}: {1e3 * med:9.1f} ms [{1e3 * min(samples):.1f}-{1e3 * max(samples):.1f}]  "
              f"{med / ref:.3f}x of the reference")  # fmt: skip
    return times


if __name__ == "__main__":
    main(sys.argv[1:])
