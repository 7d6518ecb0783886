"""patch_fused_lm_head: TRL's shared fused LM head on dpo_kernels' op.

Against ``trl.kernels.ChunkedLogProbFunction`` itself on random inputs (every output, the gradients), the
patch's life cycle, and stock SFT, DPO, KTO and GRPO trainers on a tiny Llama (CPU fp32): one step each with
and without the patch gives the same loss, logged metrics and gradients, and the op runs.
"""

import inspect

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from trl.kernels import ChunkedLogProbFunction  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

from dpo_kernels import ops  # noqa: E402
from dpo_kernels.integrations import trl_head  # noqa: E402
from dpo_kernels.integrations.trl import patch_fused_lm_head  # noqa: E402

from test_integrations_trl import assert_same_step, build, first_batch, llama, make_dataset  # noqa: E402
from test_integrations_trl import make_tokenizer  # noqa: E402
from test_integrations_trl import one_step as dpo_step  # noqa: E402

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.cpu_only("TRL's fused head on tiny CPU fp32 models"),
]

OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
CHUNK = 48  # TRL's vocabulary tile: smaller than V, so that TRL's function folds several tiles


@pytest.fixture
def op_calls(monkeypatch):
    """The number of calls of the fused head's op (``ops.linear_token_logps``, which the per-token pass calls)."""
    calls, real = [], ops.linear_token_logps
    monkeypatch.setattr(ops, "linear_token_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture(autouse=True)
def _restore():
    yield
    if isinstance(trl_utils._ChunkedLogProbFunction, trl_head.FusedHead):
        trl_utils._ChunkedLogProbFunction = trl_utils._ChunkedLogProbFunction.original


# ------------------------------------------------------------------------- against TRL's function


def _inputs(seed, bias, n=37, h=16, v=101):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(v, h, generator=g)).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():  # some targets are the argmax, so that is_top1 has both values
        targets[::3] = (hidden[::3] @ weight.T).argmax(-1)
    return hidden, weight, b, targets


CASES = {
    "plain": dict(temperature=1.0, softcap=None, scale=1.0, bias=False),
    "temperature_bias": dict(temperature=0.7, softcap=None, scale=1.0, bias=True),
    "softcap_scale_temperature": dict(temperature=1.3, softcap=2.5, scale=0.37, bias=False),
    "all_with_bias": dict(temperature=0.6, softcap=4.0, scale=1.7, bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_output_and_gradient_matches_trls_function(case):
    c = CASES[case]
    hidden, weight, bias, targets = _inputs(0, c["bias"])
    args = (targets, c["temperature"], CHUNK, c["softcap"], c["scale"], OUTPUTS)
    expected = ChunkedLogProbFunction.apply(hidden, weight, bias, *args)
    got = trl_head.FusedHead(ChunkedLogProbFunction).apply(hidden, weight, bias, *args)
    for name, x, y in zip(("log_probs",) + OUTPUTS, got, expected):
        assert x.dtype == y.dtype and x.shape == y.shape and x.requires_grad == y.requires_grad, name
        if name == "is_top1":
            assert torch.equal(x, y) and 0 < int(y.sum()) < len(y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
    # The log-probs' gradient (the op's) and the entropy's (handed to TRL's function), alone and together.
    params = [p for p in (hidden, weight, bias) if p is not None]
    g_logp, g_ent = torch.randn(len(targets)), torch.randn(len(targets))
    for uses in ((g_logp, None), (None, g_ent), (g_logp, g_ent)):
        def loss(out):
            return sum((o * g).sum() for o, g in zip(out[:2], uses) if g is not None)

        for x, y in zip(torch.autograd.grad(loss(got), params, retain_graph=True),
                        torch.autograd.grad(loss(expected), params, retain_graph=True)):  # fmt: skip
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_requested_outputs_only_and_ignored_labels_as_trls_caller_scores_them(op_calls):
    """Only the requested outputs (the others None), no statistics when none is asked for; ignored labels
    (-100) as TRL's fused forward handles them on CPU: clamped to 0, then the outputs masked."""
    hidden, weight, bias, targets = _inputs(1, True)
    mask = torch.rand(len(targets)) > 0.3
    labels = targets.masked_fill(~mask, -100)
    for outputs in ((), ("is_top1",), ("entropy", "mean_logits")):
        args = (labels.clamp(min=0), 0.9, CHUNK, 3.0, 1.0, outputs)
        got = trl_head.FusedHead(ChunkedLogProbFunction).apply(hidden, weight, bias, *args)
        expected = ChunkedLogProbFunction.apply(hidden, weight, bias, *args)
        missing = [False] + [o not in outputs for o in OUTPUTS]
        assert [x is None for x in got] == [x is None for x in expected] == missing
        for x, y in zip(got, expected):
            if x is not None:
                torch.testing.assert_close(x.masked_fill(~mask, 0), y.masked_fill(~mask, 0), rtol=1e-5, atol=1e-5)
    assert len(op_calls) == 3


def test_no_rows_and_no_grad():
    hidden, weight, bias, targets = _inputs(2, False)
    head = trl_head.FusedHead(ChunkedLogProbFunction)
    # All labels ignored (TRL's compacted GPU path then passes no rows): a differentiable empty output.
    logp, entropy, *_ = head.apply(hidden[:0], weight, None, targets[:0], 1.0, CHUNK, None, 1.0, ("entropy",))
    assert logp.shape == entropy.shape == (0,) and logp.requires_grad
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad is None or not hidden.grad.any()
    with torch.no_grad():
        out = head.apply(hidden, weight, bias, targets, 1.0, CHUNK, None, 1.0, OUTPUTS)
    assert not any(x.requires_grad for x in out)


def test_zero3_calls_stay_trls(monkeypatch, op_calls):
    """Under ZeRO-3 the head's weight is gathered around the forward only; TRL's backward re-gathers it, the
    op's would not: the whole call is TRL's function's."""
    monkeypatch.setattr(trl_head, "_zero3", lambda: True)
    hidden, weight, bias, targets = _inputs(3, True)
    args = (targets, 0.8, CHUNK, 2.0, 1.0, OUTPUTS)
    got = trl_head.FusedHead(ChunkedLogProbFunction).apply(hidden, weight, bias, *args)
    expected = ChunkedLogProbFunction.apply(hidden, weight, bias, *args)
    assert not op_calls and type(got[0].grad_fn) is type(expected[0].grad_fn)
    for x, y in zip(got, expected):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------- the patch itself


def test_patch_undo_idempotence_and_context_manager():
    original = trl_utils._ChunkedLogProbFunction
    assert original is ChunkedLogProbFunction
    handle = patch_fused_lm_head()
    assert isinstance(trl_utils._ChunkedLogProbFunction, trl_head.FusedHead) and handle.active
    again = patch_fused_lm_head(backend="torch")  # one patch, its options updated
    assert trl_utils._ChunkedLogProbFunction is handle.head and again.head is handle.head
    assert handle.head.original is original and handle.head.backend == "torch"
    with patch_fused_lm_head():  # already in place: leaving the block keeps it
        pass
    assert handle.active
    handle.undo()
    assert trl_utils._ChunkedLogProbFunction is original and not handle.active
    handle.undo()  # a second undo is a no-op
    assert trl_utils._ChunkedLogProbFunction is original
    with patch_fused_lm_head() as p:
        assert p.active and trl_utils._ChunkedLogProbFunction is p.head
    assert trl_utils._ChunkedLogProbFunction is original
    with pytest.raises(RuntimeError, match="boom"), patch_fused_lm_head():
        raise RuntimeError("boom")
    assert trl_utils._ChunkedLogProbFunction is original
    with pytest.raises(ValueError, match="memory_budget"):
        patch_fused_lm_head(memory_budget=2)


def test_another_signature_is_refused_naming_it(monkeypatch):
    class Renamed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size, softcap=None, logit_scale=1.0):
            return hidden

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Renamed)
    with pytest.raises(TypeError, match=r"takes \(ctx, hidden, weight, bias, labels, .*softcap, logit_scale\)"):
        patch_fused_lm_head()
    assert trl_utils._ChunkedLogProbFunction is Renamed
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", lambda *a: None)
    with pytest.raises(TypeError, match="not an autograd Function"):
        patch_fused_lm_head()
    monkeypatch.setattr(trl_head, "_EXPECTED_OUTPUTS", ("entropy",))
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    with pytest.raises(TypeError, match="optional outputs"):
        patch_fused_lm_head()
    assert tuple(inspect.signature(ChunkedLogProbFunction.forward).parameters)[1:] == trl_head._EXPECTED_PARAMS


# ------------------------------------------------------------------------------- stock trainers


def _step(trainer, batch):
    """(loss, the metrics this step logged, gradients of the trainable parameters) of one compute_loss."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics["train"].values():
        values.clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    # num_tokens is a running count over the steps, not a number of this step
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v and k != "num_tokens"}
    return loss.detach(), metrics, grads


def _same_with_and_without_patch(trainer, batch, op_calls, step=_step):
    stock = step(trainer, batch)
    with patch_fused_lm_head():
        patched = step(trainer, batch)
    assert op_calls, "the op did not run"
    assert_same_step(stock, patched)
    return stock


def _common(tmp_path):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0,
                bf16=False, save_strategy="no", max_steps=1)  # fmt: skip


def _batch(trainer, n=4):
    examples = [trainer.train_dataset[i] for i in range(n)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def test_sft_trainer(tmp_path, op_calls):
    from trl import SFTConfig, SFTTrainer

    ds = make_dataset(8)
    ds = ds.map(lambda r: {"completion": r["chosen"]}, remove_columns=["chosen", "rejected"])
    trainer = SFTTrainer(model=llama(0), args=SFTConfig(**_common(tmp_path)), train_dataset=ds,
                         processing_class=make_tokenizer())  # fmt: skip
    _, metrics, _ = _same_with_and_without_patch(trainer, _batch(trainer), op_calls)
    assert {"entropy", "mean_token_accuracy"} <= metrics.keys()


def test_dpo_trainer_with_wpo_weights(tmp_path, op_calls):
    from trl import DPOTrainer

    trainer = build(DPOTrainer, tmp_path, use_weighting=True)
    _, metrics, _ = _same_with_and_without_patch(trainer, first_batch(trainer), op_calls, step=dpo_step)
    assert {"entropy", "logits/chosen", "mean_token_accuracy"} <= metrics.keys()
    assert len(op_calls) == 2  # the policy and the reference model


def test_kto_trainer(tmp_path, op_calls):
    from trl import KTOConfig, KTOTrainer

    ds = make_dataset(8)
    prompts, chosen, rejected = list(ds["prompt"]), list(ds["chosen"]), list(ds["rejected"])
    rows = {"prompt": prompts * 2, "completion": chosen + rejected, "label": [True] * 8 + [False] * 8}
    trainer = KTOTrainer(model=llama(0), ref_model=llama(1), args=KTOConfig(**_common(tmp_path)),
                         train_dataset=datasets.Dataset.from_dict(rows).shuffle(seed=0),
                         processing_class=make_tokenizer())  # fmt: skip
    _, metrics, _ = _same_with_and_without_patch(trainer, _batch(trainer), op_calls)
    assert "entropy" in metrics


def test_grpo_trainer_with_entropy_bonus(tmp_path, op_calls, monkeypatch):
    """GRPO's entropy bonus backpropagates through the entropy: its gradient is TRL's, the log-probs' the op's."""
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    ds = make_dataset(4).remove_columns(["chosen", "rejected"])
    args = GRPOConfig(**{**_common(tmp_path), "per_device_train_batch_size": 4}, num_generations=2,
                      max_completion_length=4, entropy_coef=0.1, beta=0.0, logging_steps=1)  # fmt: skip
    trainer = GRPOTrainer(model=llama(0), reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=make_tokenizer())  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which this test skips
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([ds[i // 2] for i in range(4)])
    assert batch["completion_mask"].sum() > 0
    recomputed, real = [], trl_head._EntropyGrad.backward
    monkeypatch.setattr(trl_head._EntropyGrad, "backward", lambda *a: recomputed.append(1) or real(*a))
    op_calls.clear()
    _, metrics, _ = _same_with_and_without_patch(trainer, batch, op_calls)
    assert recomputed == [1] and "entropy" in metrics
