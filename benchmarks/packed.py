"""Padded vs padding-free packed DPO steps on a length-spread preference set.

    python -m benchmarks.packed                  # a Llama-style model from a config, on CPU (about a minute)
    python -m benchmarks.packed --quick          # a smoke run
    python -m benchmarks.packed --device cuda    # on a GPU

Real preference data has long-tailed completion lengths, so a padded (2B, T) batch spends much of the
model's forward and backward on padding. Each step here is the same DPO loss on the same examples, run
two ways: padded (input_ids (2B, T) with an attention mask, ``fused_linear_dpo_loss`` on the (2B, T, H)
hidden states) and packed (every sequence in one row with ``position_ids`` restarting at 0, which keeps
the sequences apart in the model's attention, and ``fused_linear_dpo_loss(..., position_ids=)``). A
frozen reference model scores both. The two losses are checked to agree before anything is timed.

Reported per layout: the padding share of the token slots the model processes, the median step time
(forward + backward of the policy, the reference under no_grad), real tokens per second, and the peak
tensor memory of one step beyond the parameters (torch's MemTracker on CPU, max_memory_allocated on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import torch


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.packed", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per batch (2B = 2 x pairs sequences)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, each timed --reps times")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--median-completion", type=float, default=48.0, help="median completion length (tokens)")
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal spread of the completion lengths")
    p.add_argument("--max-completion", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.batches, args.reps, args.hidden, args.layers, args.vocab = 4, 1, 1, 64, 2, 1000
        args.median_completion, args.max_completion = 16.0, 64
    return args


def length_spread_pairs(n: int, args, rng: random.Random) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths: prompts uniform in [8, 64], completions log-normal (long tail)."""

    def completion():
        length = rng.lognormvariate(math.log(args.median_completion), args.sigma)
        return int(min(max(round(length), 2), args.max_completion))

    return [(rng.randint(8, 64), completion(), completion()) for _ in range(n)]


def make_batch(pairs, vocab: int, gen: torch.Generator):
    """Token ids and labels (prompt masked with -100) of the 2B sequences, chosen first, as lists."""
    prompts = [torch.randint(0, vocab, (p,), generator=gen) for p, _, _ in pairs]
    seqs, labels = [], []
    for side in (1, 2):
        for prompt, lengths in zip(prompts, pairs):
            completion = torch.randint(0, vocab, (lengths[side],), generator=gen)
            seqs.append(torch.cat([prompt, completion]))
            labels.append(torch.cat([torch.full_like(prompt, -100), completion]))
    return seqs, labels


def padded_inputs(seqs, labels, device):
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = s, y, 1
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device)), lab.to(device)


def packed_inputs(seqs, labels, device):
    ids = torch.cat(seqs).unsqueeze(0)
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    return dict(input_ids=ids.to(device), position_ids=positions.to(device)), torch.cat(labels).unsqueeze(0).to(device)


def make_model(args, seed: int, dtype):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=4096,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(args.device, dtype)


def dpo_step(policy, ref, inputs, labels, packed: bool):
    """Loss of one DPO step (forward only); the caller runs backward."""
    from dpo_kernels import fused_linear_dpo_loss

    kw = {"position_ids": inputs["position_ids"]} if packed else {}
    hidden = policy.get_decoder()(**inputs, use_cache=False).last_hidden_state
    with torch.no_grad():
        ref_hidden = ref.get_decoder()(**inputs, use_cache=False).last_hidden_state
    loss, _ = fused_linear_dpo_loss(
        hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight, beta=0.1, **kw
    )
    return loss


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_step_bytes(policy, ref, inputs, labels, packed: bool, device) -> int:
    """Peak tensor bytes during one step beyond the parameters (MemTracker on CPU: exact)."""
    params = sum(p.numel() * p.element_size() for m in (policy, ref) for p in m.parameters())
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        dpo_step(policy, ref, inputs, labels, packed).backward()
        torch.cuda.synchronize()
        policy.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - base
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(policy, ref)
    with tracker:
        dpo_step(policy, ref, inputs, labels, packed).backward()
    policy.zero_grad(set_to_none=True)
    return max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values()) - params


def run(args) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    policy, ref = make_model(args, 0, dtype), make_model(args, 1, dtype).eval()
    policy.train()
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    batches = [make_batch(length_spread_pairs(args.pairs, args, rng), args.vocab, gen) for _ in range(args.batches)]
    layouts = {"padded": padded_inputs, "packed": packed_inputs}
    built = {name: [fn(s, y, args.device) for s, y in batches] for name, fn in layouts.items()}

    real = sum(len(s) for seqs, _ in batches for s in seqs)
    slots = {
        "padded": sum(len(seqs) * max(len(s) for s in seqs) for seqs, _ in batches),
        "packed": real,
    }
    # the same loss both ways, before timing
    for (pi, pl), (qi, ql) in zip(built["padded"], built["packed"]):
        with torch.no_grad():
            a, b = dpo_step(policy, ref, pi, pl, False), dpo_step(policy, ref, qi, ql, True)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        if not math.isclose(a.item(), b.item(), rel_tol=tol, abs_tol=tol):
            raise RuntimeError(f"padded and packed losses disagree: {a.item()} vs {b.item()}")

    times = {name: [] for name in layouts}
    for name in layouts:  # warm-up
        inputs, labels = built[name][0]
        dpo_step(policy, ref, inputs, labels, name == "packed").backward()
        policy.zero_grad(set_to_none=True)
    for _ in range(args.reps):
        for name in layouts:
            start = time.perf_counter()
            for inputs, labels in built[name]:
                dpo_step(policy, ref, inputs, labels, name == "packed").backward()
                policy.zero_grad(set_to_none=True)
            _sync(args.device)
            times[name].append((time.perf_counter() - start) / len(batches))

    rows = {}
    for name in layouts:
        step = statistics.median(times[name])
        inputs, labels = built[name][0]
        rows[name] = dict(
            padding_share=1 - real / slots[name],
            step_ms=step * 1e3,
            tokens_per_s=real / len(batches) / step,
            peak_mib=peak_step_bytes(policy, ref, inputs, labels, name == "packed", args.device) / 2**20,
        )
    return dict(config=vars(args), real_tokens_per_batch=real / len(batches), layouts=rows)


def table(result: dict) -> str:
    rows = result["layouts"]
    lines = [
        "| layout | padding in the model's token slots | step (median) | real tokens / s | peak tensors (1st batch) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {100 * r['padding_share']:.1f}% | {r['step_ms']:.1f} ms | {r['tokens_per_s']:.0f} | "
            f"{r['peak_mib']:.1f} MiB |"
        )
    speedup = rows["padded"]["step_ms"] / rows["packed"]["step_ms"]
    memory = rows["packed"]["peak_mib"] / rows["padded"]["peak_mib"]
    lines.append(f"\npacked: {speedup:.2f}x the padded step's speed, {memory:.2f}x its peak tensor memory")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _parse(argv)
    result = run(args)
    c = result["config"]
    print(
        f"{c['pairs']} pairs/batch x {c['batches']} batches, completions log-normal (median {c['median_completion']:g}, "
        f"sigma {c['sigma']:g}, max {c['max_completion']}), Llama hidden {c['hidden']} x {c['layers']} layers, "
        f"V {c['vocab']}, {c['dtype']} on {c['device']}; {result['real_tokens_per_batch']:.0f} real tokens per batch"
    )
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
