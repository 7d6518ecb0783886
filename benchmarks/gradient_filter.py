"""The gradient filter's accuracy and kept-tile density, measured on the CPU under the Triton interpreter,
with the modeled backward time at Llama-3-8B scale at each measured density.

    python -m benchmarks.gradient_filter [--rows 128] [--hidden 64] [--vocab 8192] [--json out.json]

The fused LM head's backward (``dpo_kernels.triton.linear.fused_linear_logps_bwd``) with ``filter_eps``
drops the (BLOCK_M, BLOCK_V) tiles of the logits' gradient whose softmax entries are all below it and that
hold no label, and its Triton products skip them. This script runs the real bf16 launch configs (64 x 128
tiles) on CPU tensors and reports, per case and threshold: the kept-tile density ρ, the max relative error
(max |error| / max |truth|) of d_hidden and d_weight against the fp64 reference (autograd through
``reference.lm_head_logits``), the unfiltered bf16 kernel's own error beside it, and the modeled Llama-3-8B
backward time (benchmarks.modeled.filtered_backward_ms) at ρ.

Cases, bias-free like Llama, labels drawn from the model's own softmax (a model that fits its data):
- "peaked-sorted" / "peaked-shuffled": LM-like logits, a Zipf prior over the vocabulary (through a constant
  hidden feature, the way a trained head encodes unigram frequency) plus a context term, scaled to a mean
  entropy of about 2 nats; token ids in frequency order, or shuffled;
- "flat": an untrained head, logits of small spread (entropy near log V), every p near 1 / V.
"""

import argparse
import json
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: the kernels run under the interpreter

import torch  # noqa: E402

TARGET_ENTROPY = 2.0  # nats, the peaked case's mean softmax entropy


def lm_like_inputs(M, H, V, kind, seed=0):
    """(hidden, weight, labels, grad) in fp32: ``kind`` "peaked" (mean entropy ≈ TARGET_ENTROPY) or "flat"."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    if kind == "flat":
        weight *= 0.3
    else:
        hidden[:, 0] = 1.0  # a constant feature: weight[:, 0] carries a Zipf log-prior over the vocabulary
        prior = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
        # "sorted": token ids in frequency order (the frequent tokens share the first tiles, as after Cut
        # Cross-Entropy's vocabulary sort); "shuffled": frequent tokens spread over the whole vocabulary
        weight[:, 0] = prior if kind == "peaked-sorted" else prior[torch.randperm(V, generator=g)]
        lo, hi = 0.05, 20.0  # bisect the context term's scale (in log space) for the target entropy
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            w = weight.clone()
            w[:, 1:] *= mid
            if _entropy(hidden, w) > TARGET_ENTROPY:
                lo = mid
            else:
                hi = mid
        weight[:, 1:] *= math.sqrt(lo * hi)
    probs = torch.softmax(hidden @ weight.T, dim=-1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    grad = torch.randn(M, generator=g)
    return hidden, weight, labels, grad


def _entropy(hidden, weight):
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean().item()


def truth_grads(hidden, weight, labels, grad):
    """(d_hidden, d_weight) in fp64 of sum_m grad_m · logp_m (the reference)."""
    from dpo_kernels import reference

    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    z = reference.lm_head_logits(h, w)
    logp = torch.log_softmax(z, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    logp.backward(grad.double())
    return h.grad, w.grad


def kernel_grads(hidden, weight, labels, grad, eps):
    """(d_hidden, d_weight, kept-tile density or None) of the Triton kernels at the launch config."""
    from dpo_kernels.triton.linear import fused_linear_logps_bwd, fused_linear_logps_fwd

    _, lse, _ = fused_linear_logps_fwd(hidden, weight, None, labels)
    keep = []
    d_hidden, d_weight, _ = fused_linear_logps_bwd(grad, hidden, weight, None, labels, lse, filter_eps=eps,
                                                   keep_out=keep)  # fmt: skip
    density = sum(k.float().sum().item() for k in keep) / sum(k.numel() for k in keep) if keep else None
    return d_hidden, d_weight, density


def tile_density(hidden, weight, labels, eps, block_m=64, block_v=128):
    """The kept share of (block_m, block_v) tiles by the kernels' rule (some p >= eps, or a label in the
    tile), from the fp32 softmax in torch: the density at sizes the interpreter cannot run."""
    M, V = hidden.shape[0], weight.shape[0]
    kept = torch.zeros(-(-M // block_m), -(-V // block_v), dtype=torch.bool)
    for r0 in range(0, M, block_m):
        p = torch.softmax(hidden[r0 : r0 + block_m].float() @ weight.float().T, dim=-1)
        big = torch.nn.functional.pad(p >= eps, (0, -V % block_v)).view(p.shape[0], -1, block_v).any(-1).any(0)
        has_label = torch.zeros_like(big)
        has_label[labels[r0 : r0 + block_m] // block_v] = True
        kept[r0 // block_m] = big | has_label
    return kept.float().mean().item()


def rel_err(actual, truth):
    return ((actual.double() - truth).abs().max() / truth.abs().max()).item()


CASES = ("peaked-sorted", "peaked-shuffled", "flat")
LLAMA_V = 128256


def run(M=128, H=64, V=8192, dtype=torch.bfloat16, cases=CASES, thresholds=None, big_rows=512):
    """Rows of the table: per case and threshold the kernels' measured density and errors at (M, H, V), the
    tile density of the same construction at Llama-3-8B's vocabulary (``big_rows`` rows, torch), and the
    modeled Llama-3-8B backward at that density."""
    from benchmarks import modeled
    from dpo_kernels._validation import gradient_filter_eps

    thresholds = thresholds or [None, "auto", 1e-3, 1e-2]
    rows = []
    for kind in cases:
        hidden, weight, labels, grad = lm_like_inputs(M, H, V, kind)
        big = lm_like_inputs(big_rows, H, LLAMA_V, kind)
        entropy, big_entropy = _entropy(hidden, weight), _entropy(big[0], big[1])
        h, w = hidden.to(dtype), weight.to(dtype)
        t_dh, t_dw = truth_grads(h, w, labels, grad)
        base = None
        for setting in thresholds:
            eps = gradient_filter_eps(setting, dtype)
            d_hidden, d_weight, density = kernel_grads(h, w, labels, grad, eps)
            if density is not None:  # the torch rule reproduces the kernels' flags at the small size
                assert abs(tile_density(h, w, labels, eps) - density) < 0.02, (tile_density(h, w, labels, eps), density)
            errs = rel_err(d_hidden, t_dh), rel_err(d_weight, t_dw)
            base = base or errs
            # the rows of d_weight of tokens no row has as its label: -Σ_m g_m p_mv h_m, small, and exactly
            # what the filter drops (their Frobenius-norm relative error; Adam rescales small gradients)
            tail = torch.ones(weight.shape[0], dtype=torch.bool)
            tail[labels] = False
            tail_err = ((d_weight[tail].double() - t_dw[tail]).norm() / t_dw[tail].norm()).item()
            big_density = tile_density(big[0].to(dtype), big[1].to(dtype), big[2], eps) if eps else None
            times = {gpu: modeled.filtered_backward_ms("Llama-3-8B", gpu, big_density or 1.0) for gpu in modeled.GPUS}
            rows.append({
                "case": kind, "entropy_nats": entropy, "llama_v_entropy_nats": big_entropy, "M": M, "H": H, "V": V,
                "dtype": str(dtype).split(".")[-1], "filter": "off" if setting is None else str(setting),
                "filter_eps": eps, "density": density, "llama_v_density": big_density,
                "d_hidden_rel_err": errs[0], "d_weight_rel_err": errs[1], "d_weight_tail_rel_err": tail_err,
                "d_hidden_vs_unfiltered": errs[0] / base[0], "d_weight_vs_unfiltered": errs[1] / base[1],
                "modeled_bwd_ms": {g: (t["bwd_filtered_ms"] if eps else t["bwd_dense_ms"]) for g, t in times.items()},
            })  # fmt: skip
    return rows


def markdown(rows) -> str:
    gpu = "H100 SXM (datasheet)"
    r = rows[0]
    out = [
        f"| case (mean entropy at V {r['V']} / {LLAMA_V}) | filter | eps | ρ kernels, V {r['V']} (measured) "
        f"| d_hidden max rel err (measured) | d_weight max rel err (measured) | × unfiltered bf16 err "
        f"| d_weight non-label rows rel err (measured) | ρ at V {LLAMA_V} (torch) "
        f"| Llama-3-8B bwd ms, {gpu} (modeled) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rho = "1 (dense)" if r["density"] is None else f"{r['density']:.3f}"
        big = "-" if r["llama_v_density"] is None else f"{r['llama_v_density']:.3f}"
        ratio = f"{r['d_hidden_vs_unfiltered']:.2f} / {r['d_weight_vs_unfiltered']:.2f}"
        out.append(
            f"| {r['case']} ({r['entropy_nats']:.2f} / {r['llama_v_entropy_nats']:.2f} nats) | {r['filter']} "
            f"| {r['filter_eps']:.3g} | {rho} | {r['d_hidden_rel_err']:.2e} | {r['d_weight_rel_err']:.2e} | {ratio} "
            f"| {r['d_weight_tail_rel_err']:.2e} | {big} | {r['modeled_bwd_ms'][gpu]:.1f} |"
        )
    r = rows[0]
    out += ["", f"Measured on the CPU under the Triton interpreter: M = {r['M']} rows, H = {r['H']}, V = {r['V']}, "
            f"{r['dtype']}, the bf16 launch config's 64 x 128 tiles; errors are max |error| / max |fp64 truth|, "
            "the non-label rows' a Frobenius-norm ratio over the d_weight rows of tokens that are no row's label. "
            f"ρ at V {LLAMA_V}: the kernels' tile rule applied in torch to the same construction at Llama-3-8B's "
            "vocabulary. Modeled: benchmarks.modeled at Llama-3-8B scale (8 x 4096 rows, H 4096) at that ρ; "
            "the forward (not filtered) is the same in every row."]  # fmt: skip
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.rows, args.hidden, args.vocab)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
