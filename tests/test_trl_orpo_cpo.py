"""FusedORPOTrainer and FusedCPOTrainer against TRL's stock experimental ORPOTrainer and CPOTrainer, single
process.

The tiny Llama, tokenizer and preference dataset of tests/test_integrations_trl.py: for the same batch, the
fused trainer's loss, every metric it logs and the gradient of every trainable parameter match the stock
trainer's (fp32, rtol 1e-5), for ORPO and for every CPO loss type with its options; one evaluation step too.
"""

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from test_integrations_trl import ATOL, RTOL, llama, make_dataset, make_tokenizer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from dpo_kernels.integrations.trl import (  # noqa: E402
    FusedCPOTrainer,
    FusedORPOTrainer,
    apply_fused_cpo,
    apply_fused_orpo,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'"),
    pytest.mark.cpu_only("TRL / HF integration on tiny CPU fp32 models"),
]

CONFIGS = {"orpo": ORPOConfig, "cpo": CPOConfig}


def build(cls, tmp_path, kind, **overrides):
    kw = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0, bf16=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", disable_dropout=True, max_length=64,
        learning_rate=1e-3, max_steps=5,
    )  # fmt: skip
    kw.update(overrides)
    return cls(
        model=llama(0), args=CONFIGS[kind](**kw), train_dataset=make_dataset(), processing_class=make_tokenizer()
    )


def first_batch(trainer, n=4):
    examples = [trainer.train_dataset[i] for i in range(n)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def one_step(trainer, batch):
    """(loss, the metrics this step stored, gradients of the trainable parameters)."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._stored_metrics.clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    return loss.detach(), metrics, grads


def assert_same_step(stock, fused):
    (loss_s, metrics_s, grads_s), (loss_f, metrics_f, grads_f) = stock, fused
    torch.testing.assert_close(loss_f, loss_s, rtol=RTOL, atol=ATOL)
    assert list(metrics_f) == list(metrics_s)
    for name in metrics_s:
        assert metrics_f[name] == pytest.approx(metrics_s[name], rel=RTOL, abs=ATOL), name
    assert grads_f.keys() == grads_s.keys()
    assert any(g.abs().max() > 0 for g in grads_s.values())
    for name, g in grads_s.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_f[name], g, rtol=RTOL, atol=max(ATOL * scale, 1e-10), msg=name)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """(stock, fused) per kind, built once; each case sets the options the trainers read."""
    tmp = tmp_path_factory.mktemp("orpo_cpo")
    pairs = {
        "orpo": (build(ORPOTrainer, tmp, "orpo"), build(FusedORPOTrainer, tmp, "orpo")),
        "cpo": (build(CPOTrainer, tmp, "cpo"), build(FusedCPOTrainer, tmp, "cpo")),
    }
    for _, fused in pairs.values():  # the stock forward forms the (2B, T, V) logits: the fused one never calls it
        fused.concatenated_forward = lambda *a, **k: pytest.fail("the stock concatenated_forward ran")
    return pairs


# CPO's options as CPOTrainer holds them after construction (alphapo: loss_type simpo, cpo_alpha 0, alpha set).
CASES = {
    "orpo": ("orpo", dict(beta=0.1)),
    "orpo_beta": ("orpo", dict(beta=0.7)),
    "cpo_sigmoid": ("cpo", dict(loss_type="sigmoid")),
    "cpo_sigmoid_smoothed": ("cpo", dict(loss_type="sigmoid", label_smoothing=0.2, cpo_alpha=0.5)),
    "cpo_hinge": ("cpo", dict(loss_type="hinge", beta=0.5, label_smoothing=0.1)),
    "cpo_ipo": ("cpo", dict(loss_type="ipo", beta=0.5, cpo_alpha=0.0)),
    "cpo_simpo": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5)),
    "cpo_simpo_smoothed": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.3)),
    "cpo_alphapo": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0, alpha=0.25)),
    "cpo_sigmoid_alpha": ("cpo", dict(loss_type="sigmoid", alpha=-0.05)),
}
CPO_DEFAULTS = dict(beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_metrics_and_gradients_match_stock(trainers, case):
    kind, options = CASES[case]
    stock, fused = trainers[kind]
    for trainer in (stock, fused):
        for name, value in ({**CPO_DEFAULTS, **options} if kind == "cpo" else options).items():
            setattr(trainer, name, value)
    batch = first_batch(stock)
    assert_same_step(one_step(stock, batch), one_step(fused, batch))


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_evaluation_step_matches_stock(trainers, kind):
    stock, fused = trainers[kind]
    batch = first_batch(stock)
    out = {}
    for name, trainer in (("stock", stock), ("fused", fused)):
        trainer.model.eval()
        trainer._stored_metrics.clear()
        loss, logits, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
        out[name] = (loss, logits, {k: v[-1] for k, v in trainer._stored_metrics["eval"].items()})
    torch.testing.assert_close(out["fused"][0], out["stock"][0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out["fused"][1], out["stock"][1], rtol=RTOL, atol=ATOL)
    assert list(out["fused"][2]) == list(out["stock"][2]) and "eval_logits/chosen" in out["stock"][2]
    for name, value in out["stock"][2].items():
        assert out["fused"][2][name] == pytest.approx(value, rel=RTOL, abs=ATOL), name


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_apply_on_a_built_trainer_and_refusals(tmp_path, kind):
    stock_cls, apply = {"orpo": (ORPOTrainer, apply_fused_orpo), "cpo": (CPOTrainer, apply_fused_cpo)}[kind]
    trainer = build(stock_cls, tmp_path, kind)
    reference = one_step(trainer, first_batch(trainer))
    assert apply(trainer) is trainer and type(trainer).__name__ == f"Fused{stock_cls.__name__}"
    assert_same_step(reference, one_step(trainer, first_batch(trainer)))
    with pytest.raises(TypeError, match=stock_cls.__name__):
        apply(object())
    trainer.is_encoder_decoder = True
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        apply(trainer)


def test_cpo_option_the_loss_family_cannot_compute_raises_at_construction(trainers):
    _, fused = trainers["cpo"]
    fused.loss_type, fused.beta, fused.label_smoothing = "simpo", 2.0, 0.7  # smoothing past 0.5
    try:
        with pytest.raises(ValueError, match="FusedCPOTrainer cannot compute this CPOConfig's loss.*label_smoothing"):
            apply_fused_cpo(fused)
    finally:
        fused.label_smoothing = 0.0
