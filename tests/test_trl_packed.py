"""FusedDPOTrainer with DPOConfig(padding_free=True) against the stock padded trainer on the same examples.

The fused trainer packs every batch into one row (position_ids restarting at 0, no attention mask); the
model keeps the sequences apart, and the loss, every logged metric and every gradient equal the stock
padded trainer's, with a reference model and with precomputed reference log-probs, for Llama and GPT-2.
"""

import pytest
import torch

pytest.importorskip("trl")
from test_integrations_trl import assert_same_step, build, first_batch, gpt2, llama, one_step  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from dpo_kernels.integrations import hf  # noqa: E402
from dpo_kernels.integrations import trl as fused_trl  # noqa: E402
from dpo_kernels.integrations.collate import PackedPreferenceCollator  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402

pytestmark = [pytest.mark.cpu_only("TRL trainer tests run on CPU models"), pytest.mark.filterwarnings("ignore::FutureWarning")]
MODELS = {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("reference", ["ref_model", "precomputed"])
@pytest.mark.parametrize("model", list(MODELS))
def test_padding_free_step_matches_the_stock_padded_step(tmp_path, model, reference, monkeypatch):
    """The packed batch's step (on the one-pass head, the default route) equals the stock padded step."""
    one_pass_calls = []
    real_one_pass = hf.one_pass
    monkeypatch.setattr(hf, "one_pass", lambda *a, **k: one_pass_calls.append(k["packed"]) or real_one_pass(*a, **k))
    kw = dict(model_fn=MODELS[model], loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], use_weighting=True)
    if reference == "precomputed":
        kw.update(ref=False, precompute_ref_log_probs=True)
    stock = build(DPOTrainer, tmp_path / "s", **kw)
    fused = build(FusedDPOTrainer, tmp_path / "f", padding_free=True, **kw)
    assert isinstance(fused.data_collator, PackedPreferenceCollator)
    packed, padded = first_batch(fused), first_batch(stock)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].numel() == padded["attention_mask"].sum() < padded["input_ids"].numel()
    if reference == "precomputed":  # perturb the policy so that it differs from the precomputed reference
        for trainer in (stock, fused):
            torch.manual_seed(3)
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    assert_same_step(one_step(stock, padded), one_step(fused, packed))
    assert one_pass_calls and all(pk is not None for pk in one_pass_calls)


@pytest.mark.parametrize("model", list(MODELS))
def test_the_packed_forward_keeps_the_sequences_apart(tmp_path, model):
    """Each packed sequence's per-token log-probs equal a separate forward of that sequence alone."""
    fused = build(FusedDPOTrainer, tmp_path, model_fn=MODELS[model], padding_free=True)
    batch = first_batch(fused)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    pk = fused._dpo_kernels_packing(batch)
    model_kwargs = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        tokens = fused._dpo_kernels_tokens(fused.model, dict(model_kwargs, use_cache=False), labels, with_stats=False,
                                           pk=pk)[0]  # fmt: skip
        for s, (start, end) in enumerate(zip(pk.bounds[:-1], pk.bounds[1:])):
            alone = hf.token_logps_from_model(
                fused.model, batch["input_ids"][:, start:end], None, labels[:, start:end]
            )
            n = end - start - 1
            torch.testing.assert_close(tokens.logps[s, :n], alone.logps[0], rtol=1e-5, atol=1e-6)
            assert (tokens.logps[s, n:] == 0).all()


def test_padding_free_training_run_matches_the_padded_run(tmp_path):
    kw = dict(model_fn=gpt2, max_steps=3, learning_rate=5e-3)
    stock = build(DPOTrainer, tmp_path / "s", **kw)
    fused = build(FusedDPOTrainer, tmp_path / "f", padding_free=True, **kw)
    stock.train()
    fused.train()
    logs_s = [h for h in stock.state.log_history if "loss" in h]
    logs_f = [h for h in fused.state.log_history if "loss" in h]
    assert len(logs_s) == len(logs_f) == 3
    for h_s, h_f in zip(logs_s, logs_f):
        for name in ("loss", "rewards/margins", "logps/chosen", "entropy", "num_tokens"):
            assert h_f[name] == pytest.approx(h_s[name], rel=1e-4, abs=1e-5), name


def test_padding_free_refuses_what_cannot_pack(tmp_path, monkeypatch):
    monkeypatch.setattr(fused_trl, "_PACKING_ATTENTION", ("flash_attention_2",))
    with pytest.raises(ValueError, match=r"padding_free=True needs an attention implementation .* uses 'sdpa'"):
        build(FusedDPOTrainer, tmp_path / "a", padding_free=True)
    monkeypatch.undo()
    stock = build(DPOTrainer, tmp_path / "b")
    stock.args.padding_free = True
    with pytest.raises(ValueError, match="another data_collator"):
        stock.data_collator = lambda examples: examples
        fused_trl.apply_fused_dpo(stock)
