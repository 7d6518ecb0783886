"""Train a tiny causal LM with DPO on CPU through :class:`~dpo_kernels.integrations.trl.FusedDPOTrainer`.

    python -m dpo_kernels.demo            # a few hundred steps, a few minutes on CPU
    python -m dpo_kernels.demo --quick    # a smoke run, seconds

Everything is made here: a Llama-style model from a config (random weights), a word-level tokenizer,
and a synthetic preference dataset of additions ("7 + 5 =") whose chosen answer is the right sum and
whose rejected answer is a wrong one. Training prints the reward accuracy and margins as they rise.
Then the same short run goes through TRL's stock ``DPOTrainer`` and the fused one, side by side:
loss agreement, median optimizer-step time, and peak memory of one forward+backward step, measured
as the growth of the process's peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before the step) — whole-process memory, so allocator caching and
everything else in the step counts too.

Needs the ``trl`` extra: ``pip install 'dpo-kernels[trl]'``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings

from ._peak_rss import reset_peak_rss, status_bytes


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m dpo_kernels.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of the main run (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="preference pairs per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--loss-type", default="sigmoid", help="DPOConfig.loss_type, comma-separated for several")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size, padded with filler words (default 32000)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--examples", type=int, default=2000, help="synthetic preference pairs (default 2000)")
    p.add_argument("--log-every", type=int, default=25, help="print metrics every N steps (default 25)")
    p.add_argument("--compare-steps", type=int, default=20, help="steps of the stock-vs-fused comparison (default 20)")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with the stock DPOTrainer")
    p.add_argument("--backend", default="auto", help="dpo_kernels backend: auto, native, torch, triton")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 steps, 1 layer, vocab 256, 3 compare steps")
    args = p.parse_args(argv)
    if args.quick:  # every part of the demo runs, on the least that still trains and compares
        args.steps, args.batch_size, args.examples, args.log_every, args.compare_steps = 8, 8, 64, 4, 3
        args.vocab, args.hidden, args.layers = 256, 64, 1
    return args


# ------------------------------------------------------------------------------------ data and model

MAX_OPERAND = 10
NUMBERS = [str(i) for i in range(2 * MAX_OPERAND)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + NUMBERS + ["+", "=", "answer", ":"]
    words += [f"w{i}" for i in range(max(vocab_size - len(words), 0))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_dataset(n: int, seed: int):
    """Additions: the chosen completion is the right sum, the rejected one a near miss."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
        wrong = (a + b + rng.choice([-3, -2, -1, 1, 2, 3])) % (2 * MAX_OPERAND)
        rows["prompt"].append(f"{a} + {b} =")
        rows["chosen"].append(f" answer : {a + b}")
        rows["rejected"].append(f" answer : {wrong}")
    return Dataset.from_dict(rows)


def make_model(args, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def make_trainer(cls, args, steps: int, tokenizer, dataset, output_dir: str, progress: bool, **extra):
    from trl import DPOConfig

    config = DPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", beta=args.beta, loss_type=args.loss_type.split(","),
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False, seed=args.seed, disable_tqdm=not progress, dataloader_num_workers=0,
    )  # fmt: skip
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, *args, **kwargs):  # the bar only; the metrics are printed as a table afterwards
            pass

    model, ref = make_model(args, args.seed), make_model(args, args.seed)
    trainer = cls(model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=tokenizer, **extra)
    trainer.remove_callback(PrinterCallback)  # Trainer prints every log dict without a progress bar
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress)
    return trainer


# ------------------------------------------------------------------------------------------ measuring


def _make_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def peak_tensor_bytes(trainer, batch):
    """Peak bytes held by tensors during one forward+backward step, beyond the parameters of the policy
    and the reference (torch's MemTracker: every tensor allocation, exact, unlike RSS); None where this
    torch has no MemTracker."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # pragma: no cover - torch without it
        return None
    models = [m for m in (trainer.model, trainer.ref_model) if m is not None]
    params = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    tracker = MemTracker()
    tracker.track_external(*models)
    with tracker:
        trainer.training_step(trainer.model, batch)
    trainer.model.zero_grad(set_to_none=True)
    peak = max(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())
    return peak - params


def peak_step_memory(trainer):
    """(peak tensor bytes of one forward+backward step on the first batch beyond the parameters, growth
    of the process's peak RSS over such a step (None off Linux))."""
    import gc

    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch)
    trainer.model.train()
    trainer.training_step(trainer.model, batch)  # warm-up: first-call allocations, kernel caches
    trainer.model.zero_grad(set_to_none=True)
    tensors = peak_tensor_bytes(trainer, batch)
    gc.collect()
    if not reset_peak_rss():
        return tensors, None
    base = status_bytes("VmRSS")
    trainer.training_step(trainer.model, batch)
    peak = status_bytes("VmHWM")
    trainer.model.zero_grad(set_to_none=True)
    return tensors, (None if base is None or peak is None else max(peak - base, 0))


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ run


def main(argv=None) -> dict:
    args = _parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import datasets
    import torch
    import transformers
    from trl import DPOTrainer

    from .integrations.trl import FusedDPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.manual_seed(args.seed)

    tokenizer = make_tokenizer(args.vocab)
    dataset = make_dataset(args.examples, args.seed)
    print(
        f"dpo_kernels demo: Llama-style LM (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}) from a "
        f"config, {args.examples} synthetic addition pairs (chosen = right sum, rejected = a near miss), "
        f"loss {args.loss_type}, beta {args.beta}, {args.batch_size} pairs/step, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        # ---- the main run, fused
        trainer = make_trainer(FusedDPOTrainer, args, args.steps, tokenizer, dataset, os.path.join(tmp, "fused"),
                               progress=True, backend=args.backend)  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
        logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
        print(f"\nFusedDPOTrainer: {args.steps} steps in {elapsed:.1f} s")
        print(f"{'steps':>11} {'loss':>8} {'reward accuracy':>16} {'reward margin':>14}")
        window = max(args.log_every, 1)
        for lo in range(0, len(logs), window):
            chunk = logs[lo : lo + window]

            def mean(key, chunk=chunk):
                return statistics.fmean(h[key] for h in chunk)

            steps = f"{chunk[0]['step']}-{chunk[-1]['step']}"
            print(f"{steps:>11} {mean('loss'):8.4f} {mean('rewards/accuracies'):16.3f} {mean('rewards/margins'):14.4f}")
        first, last = logs[: min(window, len(logs))], logs[-min(window, len(logs)) :]
        result["accuracy_first"] = statistics.fmean(h["rewards/accuracies"] for h in first)
        result["accuracy_last"] = statistics.fmean(h["rewards/accuracies"] for h in last)
        result["margin_first"] = statistics.fmean(h["rewards/margins"] for h in first)
        result["margin_last"] = statistics.fmean(h["rewards/margins"] for h in last)
        print(
            f"reward accuracy {result['accuracy_first']:.3f} -> {result['accuracy_last']:.3f}, reward margin "
            f"{result['margin_first']:.4f} -> {result['margin_last']:.4f} (first vs last {window} steps)"
        )
        del trainer

        # ---- the same short run, stock vs fused
        if not args.no_compare and args.compare_steps > 0:
            print(f"\nSide by side, {args.compare_steps} steps from the same initialisation and data:")
            rows = {}
            for name, cls, extra in (("DPOTrainer", DPOTrainer, {}),
                                     ("FusedDPOTrainer", FusedDPOTrainer, {"backend": args.backend})):  # fmt: skip
                t = make_trainer(cls, args, args.compare_steps, tokenizer, dataset, os.path.join(tmp, name),
                                 progress=False, **extra)  # fmt: skip
                timer = _make_timer_callback()
                t.add_callback(timer)
                t.train()
                losses = [h["loss"] for h in t.state.log_history if "loss" in h]
                times = timer.times[1:] or timer.times  # the first step pays one-time costs
                tensors, rss = peak_step_memory(t)
                rows[name] = dict(losses=losses, step=statistics.median(times), best=min(times), tensors=tensors,
                                  rss=rss)  # fmt: skip
                del t
            stock, fused = rows["DPOTrainer"], rows["FusedDPOTrainer"]
            diff = max(abs(a - b) for a, b in zip(stock["losses"], fused["losses"]))
            header = f"{'trainer':>16} {'step: median (best)':>22} {'peak tensors':>13} {'peak RSS growth':>16}"
            print(f"{header} {'final loss':>11}")
            for name, row in rows.items():
                timing = f"{row['step'] * 1e3:.1f} ms ({row['best'] * 1e3:.1f})"
                print(
                    f"{name:>16} {timing:>22} {_mib(row['tensors']):>13} {_mib(row['rss']):>16} "
                    f"{row['losses'][-1]:11.6f}"
                )
            print(f"loss curves agree to {diff:.2e} (max abs difference over {len(stock['losses'])} steps)")
            print(
                "memory of one forward+backward step: 'peak tensors' = the most bytes held by tensors at once "
                "beyond the two models' parameters (torch's MemTracker: exact; includes the gradients); 'peak "
                "RSS growth' = rise of the process's peak resident set size (Linux VmHWM, reset just before), "
                "which the allocator's reuse of freed memory blurs at this toy scale."
            )
            result.update(compare=rows, loss_diff=diff)
    return result


if __name__ == "__main__":
    main()
