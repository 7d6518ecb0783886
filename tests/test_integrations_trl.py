"""FusedDPOTrainer against TRL's stock DPOTrainer, and the HF helpers against full logits.

Tiny randomly initialised models built from configs (Llama, GPT-2 with tied embeddings), a word-level
tokenizer and a preference dataset made here, CPU fp32: for the same batch, the fused trainer's loss,
every metric it logs and the gradient of every trainable parameter match the stock trainer's.
"""

import random

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpo_kernels import reference  # noqa: E402
from dpo_kernels.integrations import hf  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOTrainer, apply_fused_dpo, check_trl_version  # noqa: E402

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.cpu_only("TRL / HF integration on tiny CPU fp32 models"),
]

VOCAB = 128
RTOL, ATOL = 1e-5, 1e-6
BATCH_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")


# ------------------------------------------------------------------------------------------- fixtures


def make_tokenizer():
    words = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(40)] + ["+", "=", "is", "the", "answer"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["<pad>", "<eos>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_dataset(n=16, seed=0):
    """Arithmetic prompts with ragged prompts and completions (chosen and rejected lengths differ)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        a, b = rng.randrange(20), rng.randrange(20)
        noise = [f"w{rng.randrange(60)}" for _ in range(rng.randrange(3))]
        rows["prompt"].append(" ".join([*noise, str(a), "+", str(b), "="]))
        rows["chosen"].append(f" {a + b}" + " is the answer" * rng.randrange(2))
        rows["rejected"].append(f" {(a + b + 1 + rng.randrange(5)) % 40}" + " w1" * rng.randrange(3))
    return datasets.Dataset.from_dict(rows)


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1,
        pad_token_id=0,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def config(tmp_path, **overrides):
    kw = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0, bf16=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", disable_dropout=True,
        learning_rate=1e-3, max_steps=5,
    )  # fmt: skip
    kw.update(overrides)
    return DPOConfig(**kw)


def build(cls, tmp_path, model_fn=llama, ref=True, tokenizer=None, dataset=None, **kwargs):
    trainer_kwargs = {k: kwargs.pop(k) for k in ("peft_config",) if k in kwargs}
    return cls(
        model=model_fn(0), ref_model=model_fn(1) if ref else None, args=config(tmp_path, **kwargs),
        train_dataset=dataset or make_dataset(), processing_class=tokenizer or make_tokenizer(), **trainer_kwargs,
    )  # fmt: skip


def first_batch(trainer, n=4):
    examples = [{k: trainer.train_dataset[i][k] for k in BATCH_KEYS if k in trainer.train_dataset.column_names}
                for i in range(n)]  # fmt: skip
    return trainer._prepare_inputs(trainer.data_collator(examples))


def one_step(trainer, batch):
    """(loss, the metrics this step logged, gradients of the trainable parameters)."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, grads


def assert_same_step(stock, fused):
    (loss_s, metrics_s, grads_s), (loss_f, metrics_f, grads_f) = stock, fused
    torch.testing.assert_close(loss_f, loss_s, rtol=RTOL, atol=ATOL)
    assert metrics_f.keys() == metrics_s.keys()
    for name in metrics_s:
        assert metrics_f[name] == pytest.approx(metrics_s[name], rel=RTOL, abs=ATOL), name
    assert grads_f.keys() == grads_s.keys()
    assert any(g.abs().max() > 0 for g in grads_s.values())
    for name, g in grads_s.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_f[name], g, rtol=RTOL, atol=max(ATOL * scale, 1e-10), msg=name)


# ------------------------------------------------------------------------------- loss types, one batch

LOSS_CASES = {
    "sigmoid": {},
    "ipo": dict(loss_types=["ipo"], beta=0.5),
    "hinge": dict(loss_types=["hinge"], beta=0.5),
    "robust_smoothing": dict(loss_types=["robust"], label_smoothing=0.1),
    "mpo_sigmoid_bco_sft": dict(loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "sigmoid_wpo": dict(use_weighting=True),
    "sigmoid_ld_alpha": dict(ld_alpha=0.5),
    "ipo_ld_alpha": dict(loss_types=["ipo"], ld_alpha=0.3),
    "exo_pair": dict(loss_types=["exo_pair"], label_smoothing=1e-3),
    "nca_pair": dict(loss_types=["nca_pair"]),
    "sppo_hard": dict(loss_types=["sppo_hard"]),
    "aot": dict(loss_types=["aot"], label_smoothing=0.1),
    # TRL 1.16 ignores label_smoothing for sigmoid (and the types that never use it), applies it to robust
    "sigmoid_smoothing_ignored": dict(label_smoothing=0.2),
    "sigmoid_robust_hinge_smoothing": dict(loss_types=["sigmoid", "robust", "hinge"], label_smoothing=0.1),
    "aot_unpaired": dict(loss_types=["aot_unpaired"]),
    "apo_zero": dict(loss_types=["apo_zero"]),
    "apo_down": dict(loss_types=["apo_down"]),
    "discopop": dict(loss_types=["discopop"], discopop_tau=0.2),
    "sigmoid_norm": dict(loss_types=["sigmoid_norm"]),
    "sft": dict(loss_types=["sft"]),
    "sigmoid_sft_ld_alpha": dict(loss_types=["sigmoid", "sft"], ld_alpha=0.5),  # sft's NLL ignores ld_alpha
    "alpha_divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    "js_divergence_hinge": dict(loss_types=["hinge"], f_divergence_type="js_divergence"),
    "forward_kl": dict(f_divergence_type="forward_kl"),
    # (TRL 1.16 cannot backpropagate "hinge" with use_weighting: it scales relu's output in place.)
    "ipo_sigmoid_wpo_weights": dict(loss_types=["ipo", "sigmoid"], loss_weights=[0.3, 0.7], use_weighting=True),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A stock and a fused trainer on identical Llama models (policy seed 0, reference seed 1)."""
    stock = build(DPOTrainer, tmp_path_factory.mktemp("stock"))
    fused = build(FusedDPOTrainer, tmp_path_factory.mktemp("fused"))
    return stock, fused, first_batch(stock)


def set_options(trainer, beta=0.1, loss_types=("sigmoid",), loss_weights=None, label_smoothing=0.0, ld_alpha=None,
                use_weighting=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, discopop_tau=0.05):
    """The attributes DPOTrainer reads its options from (set from DPOConfig at construction)."""
    trainer.beta, trainer.loss_types = beta, list(loss_types)
    trainer.loss_weights = list(loss_weights or [1.0] * len(loss_types))
    trainer.label_smoothing, trainer.ld_alpha, trainer.use_weighting = label_smoothing, ld_alpha, use_weighting
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = f_divergence_type, f_alpha_divergence_coef
    trainer.args.discopop_tau = discopop_tau


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_metrics_and_gradients_match_stock(pair, case, monkeypatch):
    """Every loss type, on the one-pass head where it applies (the default route; not for AOT's sorting)."""
    from dpo_kernels.integrations import hf

    stock, fused, batch = pair
    one_pass_calls = []
    real_one_pass = hf.one_pass
    monkeypatch.setattr(hf, "one_pass", lambda *a, **k: one_pass_calls.append(1) or real_one_pass(*a, **k))
    if LOSS_CASES[case].get("use_weighting"):  # TRL computes the WPO statistics only when configured to
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(stock.model, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    for trainer in (stock, fused):
        set_options(trainer, **LOSS_CASES[case])
    assert_same_step(one_step(stock, batch), one_step(fused, batch))
    assert bool(one_pass_calls) == (not case.startswith("aot")), one_pass_calls


def test_options_from_dpo_config(tmp_path):
    opts = dict(loss_type=["robust", "aot"], loss_weights=[1.0, 0.5], label_smoothing=0.1, beta=0.2, ld_alpha=0.7)
    stock = build(DPOTrainer, tmp_path / "s", model_fn=gpt2, **opts)
    fused = build(FusedDPOTrainer, tmp_path / "f", model_fn=gpt2, **opts)
    batch = first_batch(stock)
    assert_same_step(one_step(stock, batch), one_step(fused, batch))


def test_apply_fused_dpo_on_a_built_trainer(tmp_path):
    trainer = build(DPOTrainer, tmp_path, model_fn=gpt2)  # tied embeddings
    batch = first_batch(trainer)
    stock = one_step(trainer, batch)
    assert apply_fused_dpo(trainer) is trainer and isinstance(trainer, DPOTrainer)
    assert type(trainer) is FusedDPOTrainer
    assert_same_step(stock, one_step(trainer, batch))

    class MyDPOTrainer(DPOTrainer):
        pass

    other = build(MyDPOTrainer, tmp_path / "sub", model_fn=gpt2)
    apply_fused_dpo(other)
    assert type(other).__name__ == "FusedMyDPOTrainer" and isinstance(other, MyDPOTrainer)
    assert_same_step(stock, one_step(other, batch))


def test_gradient_filter_is_a_constructor_option(tmp_path, monkeypatch):
    """FusedDPOTrainer(gradient_filter=...) reaches the fused head of the policy pass (the reference pass,
    without autograd, gets none); a bad value raises at construction, naming it."""
    from dpo_kernels import tokens

    with pytest.raises(ValueError, match="gradient_filter"):
        FusedDPOTrainer(model=gpt2(0), args=config(tmp_path / "bad"), train_dataset=make_dataset(),
                        processing_class=make_tokenizer(), gradient_filter="high")  # fmt: skip
    seen, real = [], tokens._filter_eps
    monkeypatch.setattr(tokens, "_filter_eps", lambda f, *a: seen.append(f) or real(f, *a))
    trainer = FusedDPOTrainer(model=gpt2(0), ref_model=gpt2(1), args=config(tmp_path), train_dataset=make_dataset(),
                              processing_class=make_tokenizer(), gradient_filter="auto")  # fmt: skip
    seen.clear()
    with pytest.warns(UserWarning, match="Triton backend only"):  # CPU: exact gradients, one warning
        monkeypatch.setattr(tokens, "_FILTER_WARNED", [])
        one_step(trainer, first_batch(trainer))
    assert len(seen) == 2 and seen.count("auto") == 1 and seen.count(None) == 1, seen


# ------------------------------------------------------------------------------- reference variants


def test_precomputed_reference_logps(tmp_path):
    stock = build(DPOTrainer, tmp_path / "s", ref=False, precompute_ref_log_probs=True)
    fused = build(FusedDPOTrainer, tmp_path / "f", ref=False, precompute_ref_log_probs=True)
    assert fused.ref_model is None and "ref_chosen_logps" in fused.train_dataset.column_names
    batch = first_batch(stock)
    # The fused precompute itself: the same reference log-probs as TRL's, batch by batch.
    for a, b in zip(fused.compute_ref_log_probs(fused.model, batch), stock.compute_ref_log_probs(stock.model, batch)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(batch["ref_chosen_logps"], stock.compute_ref_log_probs(stock.model, batch)[0])
    # Perturb the policy so that it differs from the precomputed reference.
    for trainer in (stock, fused):
        with torch.no_grad():
            torch.manual_seed(3)
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    step_s, step_f = one_step(stock, batch), one_step(fused, batch)
    assert step_s[1]["rewards/margins"] != 0
    assert_same_step(step_s, step_f)


def test_peft_lora_reference_is_the_base_model(tmp_path):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip

    stock = build(DPOTrainer, tmp_path / "s", ref=False, peft_config=lora())
    fused = build(FusedDPOTrainer, tmp_path / "f", ref=False, peft_config=lora())
    assert fused.ref_model is None
    batch = first_batch(stock)
    step_s, step_f = one_step(stock, batch), one_step(fused, batch)
    assert step_s[1]["rewards/margins"] != 0  # the adapter (random B) moves the policy off the base
    assert all("lora_" in name for name in step_s[2])
    assert_same_step(step_s, step_f)


# ------------------------------------------------------------------------------------ a short run


def test_bf16_model_is_as_close_to_fp64_as_the_stock_trainer(tmp_path):
    """A bf16 model: the fused step's loss, metrics and gradients are no farther from the fp64 step of
    the stock trainer than the stock trainer's own bf16 step is (plus one bf16 ulp of each scale)."""
    runs = {}
    for name, cls, dtype in [("truth", DPOTrainer, torch.float64), ("stock", DPOTrainer, torch.bfloat16),
                             ("fused", FusedDPOTrainer, torch.bfloat16)]:  # fmt: skip
        trainer = build(cls, tmp_path / name, model_fn=lambda seed, dtype=dtype: llama(seed).to(dtype))
        runs[name] = one_step(trainer, first_batch(trainer))
    (loss_t, metrics_t, grads_t), (loss_s, metrics_s, grads_s), (loss_f, metrics_f, grads_f) = runs.values()
    ulp = torch.finfo(torch.bfloat16).eps

    def within(fused, stock, truth):
        truth = torch.as_tensor(truth, dtype=torch.float64)
        fused_err = (torch.as_tensor(fused).double() - truth).abs().max()
        stock_err = (torch.as_tensor(stock).double() - truth).abs().max()
        return fused_err <= stock_err + ulp * truth.abs().max()

    assert within(loss_f, loss_s, loss_t)
    assert metrics_f.keys() == metrics_s.keys()
    for name in metrics_s:
        assert within(metrics_f[name], metrics_s[name], metrics_t[name]), name
    for name in grads_s:
        assert grads_f[name].dtype == torch.bfloat16
        assert within(grads_f[name], grads_s[name], grads_t[name]), name


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no_accumulation", "accumulate_2"])
def test_training_run_matches_step_by_step(tmp_path, accumulation):
    """GPT-2 (tied embeddings), 5 optimizer steps; with gradient accumulation each step sums two
    micro-batches' losses, scaled as the stock trainer scales them."""
    kw = dict(model_fn=gpt2, max_steps=5, learning_rate=5e-3, gradient_accumulation_steps=accumulation,
              per_device_train_batch_size=4 // accumulation)  # fmt: skip
    stock = build(DPOTrainer, tmp_path / "s", **kw)
    fused = build(FusedDPOTrainer, tmp_path / "f", **kw)
    stock.train()
    fused.train()
    logs_s = [h for h in stock.state.log_history if "loss" in h]
    logs_f = [h for h in fused.state.log_history if "loss" in h]
    assert len(logs_s) == len(logs_f) == 5
    assert logs_s[-1]["loss"] != logs_s[0]["loss"]  # it trains
    for h_s, h_f in zip(logs_s, logs_f):
        assert h_f.keys() == h_s.keys()
        for name, value in h_s.items():
            # Parameters drift apart by rounding over the steps; 1e-4 bounds it with a wide margin.
            assert h_f[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (h_s["step"], name)


# ------------------------------------------------------------------------------- checks and refusals


def test_version_check_names_the_installed_version(monkeypatch):
    monkeypatch.delenv("DPO_KERNELS_ANY_TRL", raising=False)
    assert check_trl_version("1.16.0") == "1.16.0"
    assert check_trl_version("1.16.7") == "1.16.7"
    for bad in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(RuntimeError, match=rf"trl {bad} is installed.*>=1\.16\.0,<1\.17\.0"):
            check_trl_version(bad)
    monkeypatch.setenv("DPO_KERNELS_ANY_TRL", "1")
    assert check_trl_version("1.15.2") == "1.15.2"


def test_unsupported_options_raise_at_construction(tmp_path):
    with pytest.raises(NotImplementedError, match="use_liger_kernel"):
        build(FusedDPOTrainer, tmp_path / "a", use_liger_kernel=True)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["hinge"], ["sigmoid", "aot"]])
def test_label_smoothing_ignored_as_stock_does_with_one_warning(tmp_path, loss_type):
    """A config stock TRL 1.16 accepts (it drops label_smoothing for sigmoid and hinge) keeps working,
    with stock's numbers and one warning naming the types that ignore it."""
    opts = dict(loss_type=loss_type, label_smoothing=0.1)
    stock = build(DPOTrainer, tmp_path / "s", **opts)
    with pytest.warns(UserWarning, match=r"label_smoothing=0.1 is ignored for loss types \[.(sigmoid|hinge).\]") as w:
        fused = build(FusedDPOTrainer, tmp_path / "f", **opts)
    assert sum("label_smoothing" in str(x.message) for x in w) == 1
    batch = first_batch(stock)
    assert_same_step(one_step(stock, batch), one_step(fused, batch))


# ------------------------------------------------------------------------------------ the HF helpers


def _hf_models():
    cfgs = {
        "llama": lambda: llama(0),
        "gpt2_tied": lambda: gpt2(0),
        "gemma2_softcap": lambda: AutoModelForCausalLM.from_config(transformers.Gemma2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0, pad_token_id=0)),
        "cohere_logit_scale": lambda: AutoModelForCausalLM.from_config(transformers.CohereConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, logit_scale=0.37, pad_token_id=0)),
    }  # fmt: skip
    return cfgs


def _batch(n=4, t=9):
    ids = torch.randint(3, VOCAB, (n, t))
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :3] = -100
    return ids, attention, labels


@pytest.mark.parametrize("name", list(_hf_models()))
def test_sequence_logps_from_model_matches_full_logits(name):
    model = _hf_models()[name]().float().eval()
    ids, attention, labels = _batch()
    logps, tokens = hf.sequence_logps_from_model(model, ids, attention, labels, with_stats=True)
    logps.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention).logits
    expected = reference.sequence_logps(logits, labels)
    expected.sum().backward()
    torch.testing.assert_close(logps, expected, rtol=RTOL, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item() + 1e-9)
    torch.testing.assert_close(tokens.stats, reference.token_stats(logits.detach(), labels), rtol=RTOL, atol=1e-5)
    hidden = hf.backbone_hidden_states(model, ids, attention).detach()
    sums = hf.position_logit_sums(hidden, hf.lm_head_of(model))  # every position, padding and last included
    torch.testing.assert_close(sums, logits.detach().sum(-1), rtol=RTOL, atol=1e-5)
    mean = hf.sequence_logps_from_model(model, ids, attention, labels, average=True)
    torch.testing.assert_close(mean, expected.detach() / (labels[:, 1:] != -100).sum(-1), rtol=RTOL, atol=1e-6)


def test_backbone_hidden_states_are_the_last_hidden_states():
    """The hidden states the fused head scores: the model's own last hidden states (after the final norm),
    and the patched forward without the flag is the model's forward."""
    model = llama(0).eval()
    ids, attention, _ = _batch()
    hidden = hf.backbone_hidden_states(model, ids, attention)
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.hidden_states[-1])
    torch.testing.assert_close(model.lm_head(hidden), out.logits)


def test_sequence_logps_through_peft_prompt_tuning():
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(llama(0), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    ids, attention, labels = _batch()
    logps = hf.sequence_logps_from_model(model, ids, attention, labels)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -ids.shape[1] :]
    torch.testing.assert_close(logps, reference.sequence_logps(logits, labels), rtol=RTOL, atol=1e-5)
    assert model.get_base_model().forward(input_ids=ids).logits.shape == (4, 9, VOCAB)  # unflagged: unchanged


def mixtral(seed=0):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.02, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def test_moe_aux_loss(tmp_path):
    stock = build(DPOTrainer, tmp_path / "s", model_fn=mixtral)
    fused = build(FusedDPOTrainer, tmp_path / "f", model_fn=mixtral)
    assert fused.aux_loss_enabled
    batch = first_batch(stock)
    step_s, step_f = one_step(stock, batch), one_step(fused, batch)
    assert step_s[1]["aux_loss"] > 0
    assert_same_step(step_s, step_f)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_empty_prompt_length_normalisation(tmp_path, loss_type):
    """TRL divides ipo / sigmoid_norm scores by the unshifted completion-mask count: with an empty prompt
    the first completion token is counted though no position predicts it."""
    ds = datasets.Dataset.from_dict({"prompt": [""] * 4, "chosen": [" 1 2 3", " 4 5", " 6", " 7 8 9 10"],
                                     "rejected": [" 3", " 5 5 5", " 6 6", " 9"]})  # fmt: skip
    stock = build(DPOTrainer, tmp_path / "s", dataset=ds, loss_type=loss_type)
    fused = build(FusedDPOTrainer, tmp_path / "f", dataset=ds, loss_type=loss_type)
    batch = first_batch(stock)
    assert batch["completion_mask"][:, 0].all()
    assert_same_step(one_step(stock, batch), one_step(fused, batch))


# --------------------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_quick(capsys):
    from dpo_kernels import demo

    demo.main(["--quick"])
    out = capsys.readouterr().out
    assert "reward accuracy" in out and "FusedDPOTrainer" in out and "loss curves agree" in out
