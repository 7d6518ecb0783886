"""FusedKTOTrainer against TRL's stock KTOTrainer, single process.

The tiny models, tokenizer and step helpers of tests/test_integrations_trl.py, on an unpaired dataset with
desirable and undesirable completions mixed in every batch: for the same batch, the fused trainer's loss,
every metric it logs and the gradient of every trainable parameter match the stock trainer's (fp32, rtol
1e-5), for both loss types, unequal weights, a reference model, the PEFT base as the reference and
precomputed reference log-probs.
"""

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from test_integrations_trl import (  # noqa: E402
    assert_same_step,
    gpt2,
    llama,
    make_dataset,
    make_tokenizer,
    one_step,
)
from trl import KTOConfig, KTOTrainer  # noqa: E402

from dpo_kernels.integrations.trl import FusedKTOTrainer, apply_fused_kto  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.cpu_only("TRL / HF integration on tiny CPU fp32 models"),
]

BATCH_KEYS = ("prompt_ids", "completion_ids", "KL_completion_ids", "label", "ref_logps", "ref_KL_logps")


def unpaired_dataset(n=16, seed=0):
    """The preference dataset of test_integrations_trl, unpaired so that labels alternate (TRL's own
    unpairing puts all desirable rows first, and a batch would hold one side only)."""
    paired = make_dataset(n, seed)
    rows = {"prompt": [], "completion": [], "label": []}
    for i, row in enumerate(paired):
        good = i % 3 != 1  # more desirable than undesirable: unequal sides within a batch
        rows["prompt"].append(row["prompt"])
        rows["completion"].append(row["chosen"] if good else row["rejected"])
        rows["label"].append(good)
    return datasets.Dataset.from_dict(rows)


def kto_config(tmp_path, **overrides):
    kw = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0, bf16=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", disable_dropout=True,
        learning_rate=1e-3, max_steps=5,
    )  # fmt: skip
    kw.update(overrides)
    return KTOConfig(**kw)


def build(cls, tmp_path, model_fn=llama, ref=True, **kwargs):
    trainer_kwargs = {k: kwargs.pop(k) for k in ("peft_config", "gradient_filter", "memory_budget") if k in kwargs}
    return cls(
        model=model_fn(0), ref_model=model_fn(1) if ref else None, args=kto_config(tmp_path, **kwargs),
        train_dataset=unpaired_dataset(), processing_class=make_tokenizer(), **trainer_kwargs,
    )  # fmt: skip


def first_batch(trainer, start=0, n=4):
    columns = trainer.train_dataset.column_names
    examples = [{k: trainer.train_dataset[i][k] for k in BATCH_KEYS if k in columns} for i in range(start, start + n)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def set_options(trainer, loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """The attributes KTOTrainer reads its options from (set from KTOConfig at construction)."""
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    trainer.calculate_KL = loss_type == "kto"


CASES = {
    "kto": {},
    "kto_weights_beta": dict(desirable_weight=1.33, undesirable_weight=0.75, beta=0.5),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired"),
    "apo_zero_unpaired_weights": dict(loss_type="apo_zero_unpaired", desirable_weight=0.6, undesirable_weight=1.7),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A stock and a fused trainer on identical Llama models (policy seed 0, reference seed 1)."""
    stock = build(KTOTrainer, tmp_path_factory.mktemp("stock"))
    fused = build(FusedKTOTrainer, tmp_path_factory.mktemp("fused"))
    return stock, fused, first_batch(stock)


@pytest.mark.parametrize("case", CASES)
def test_loss_metrics_and_gradients_match_stock(pair, case):
    stock, fused, batch = pair
    assert 0 < batch["label"].sum() < len(batch["label"])
    for trainer in (stock, fused):
        set_options(trainer, **CASES[case])
    step_s, step_f = one_step(stock, batch), one_step(fused, batch)
    assert {"kl", "rewards/margins", "logits/rejected", "logps/chosen", "entropy"} <= step_s[1].keys()
    assert_same_step(step_s, step_f)


def test_kl_estimate_positive_and_clamped(pair):
    """The KL term where it matters: a batch whose KL estimate is above 0 (policy moved away from the
    reference on the KL completions), and one where it is clamped."""
    stock, fused, batch = pair
    for trainer in (stock, fused):
        set_options(trainer)
    kls = []
    for start in (0, 4, 8, 12):
        batch = first_batch(stock, start)
        step_s = one_step(stock, batch)
        assert_same_step(step_s, one_step(fused, batch))
        kls.append(step_s[1]["kl"])
    assert min(kls) == 0.0 and max(kls) > 0.0, kls


def test_one_sided_batch(pair):
    """A batch with desirable completions only: the stock trainer leaves the rejected metrics out."""
    stock, fused, _ = pair
    batch = first_batch(stock, 2, 2)
    assert batch["label"].all()
    for trainer in (stock, fused):
        set_options(trainer)
    step_s, step_f = one_step(stock, batch), one_step(fused, batch)
    assert "rewards/rejected" not in step_s[1] and "rewards/margins" not in step_s[1]
    assert_same_step(step_s, step_f)


def test_apply_fused_kto_on_a_built_trainer(tmp_path):
    trainer = build(KTOTrainer, tmp_path, model_fn=gpt2, loss_type="apo_zero_unpaired")  # tied embeddings
    batch = first_batch(trainer)
    stock = one_step(trainer, batch)
    assert apply_fused_kto(trainer) is trainer and type(trainer) is FusedKTOTrainer
    assert_same_step(stock, one_step(trainer, batch))

    class MyKTOTrainer(KTOTrainer):
        pass

    other = build(MyKTOTrainer, tmp_path / "sub", model_fn=gpt2, loss_type="apo_zero_unpaired")
    apply_fused_kto(other)
    assert type(other).__name__ == "FusedMyKTOTrainer" and isinstance(other, MyKTOTrainer)
    assert_same_step(stock, one_step(other, batch))
    with pytest.raises(TypeError, match="apply_fused_kto expects a trl.KTOTrainer"):
        apply_fused_kto(object())


def test_precomputed_reference_logps(tmp_path):
    stock = build(KTOTrainer, tmp_path / "s", ref=False, precompute_ref_log_probs=True)
    fused = build(FusedKTOTrainer, tmp_path / "f", ref=False, precompute_ref_log_probs=True)
    assert fused.ref_model is None and "ref_KL_logps" in fused.train_dataset.column_names
    for column in ("ref_logps", "ref_KL_logps"):
        torch.testing.assert_close(torch.tensor(fused.train_dataset[column]), torch.tensor(stock.train_dataset[column]),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    batch = first_batch(stock)
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

    stock = build(KTOTrainer, tmp_path / "s", ref=False, peft_config=lora(), desirable_weight=1.2)
    fused = build(FusedKTOTrainer, tmp_path / "f", ref=False, peft_config=lora(), desirable_weight=1.2)
    assert fused.ref_model is None
    batch = first_batch(stock)
    step_s, step_f = one_step(stock, batch), one_step(fused, batch)
    assert step_s[1]["rewards/margins"] != 0  # the adapter (random B) moves the policy off the base
    assert all("lora_" in name for name in step_s[2])
    assert_same_step(step_s, step_f)


def test_training_run_matches(tmp_path):
    """Three optimizer steps through train(): the same logs (TRL's averaging of the logged metrics included)."""
    kw = dict(model_fn=gpt2, max_steps=3, learning_rate=5e-3)
    stock = build(KTOTrainer, tmp_path / "s", **kw)
    fused = build(FusedKTOTrainer, tmp_path / "f", **kw)
    stock.train()
    fused.train()
    logs_s = [h for h in stock.state.log_history if "loss" in h]
    logs_f = [h for h in fused.state.log_history if "loss" in h]
    assert len(logs_s) == len(logs_f) == 3
    for h_s, h_f in zip(logs_s, logs_f):
        assert h_f.keys() == h_s.keys()
        for name, value in h_s.items():
            # parameters drift apart by rounding over the steps; 1e-4 bounds it with a wide margin
            assert h_f[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (h_s["step"], name)


def test_refusals_at_construction(tmp_path):
    with pytest.raises(NotImplementedError, match="FusedKTOTrainer does not support: use_liger_kernel"):
        build(FusedKTOTrainer, tmp_path / "a", use_liger_kernel=True)
    with pytest.raises(ValueError, match="gradient_filter"):
        build(FusedKTOTrainer, tmp_path / "b", gradient_filter="high")
    with pytest.raises(ValueError, match="memory_budget"):
        build(FusedKTOTrainer, tmp_path / "c", memory_budget=2)
