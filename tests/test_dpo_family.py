"""Every loss type and modifier through the fused entry points, on every backend, against the reference;
and TRL's logged metrics against values computed straight from the full fp32 logits."""

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, assert_fp32_close, make_batch, slow_beyond
from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss, losses, reference, sequence_logps

REWARD_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip
TOKEN_METRICS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")

# (loss options, whether an NLL term is logged). Each runs on every backend against the reference.
CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "cdpo": dict(loss_type="sigmoid", label_smoothing=0.2),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "exo_pair": dict(loss_type="exo_pair", label_smoothing=1e-3),
    "hinge": dict(loss_type="hinge"),
    "ipo": dict(loss_type="ipo"),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard"),
    "nca_pair": dict(loss_type="nca_pair"),
    "aot": dict(loss_type="aot"),
    "aot_unpaired": dict(loss_type="aot_unpaired"),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop", discopop_tau=0.05),
    "simpo": dict(loss_type="sigmoid_norm", gamma=0.5),
    "simpo_smoothed": dict(loss_type="sigmoid_norm", gamma=0.5, label_smoothing=0.2),
    "alphapo": dict(loss_type="sigmoid_norm", gamma=0.5, label_smoothing=0.1, alphapo_alpha=0.2),
    "orpo": dict(loss_type="orpo"),
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "rpo": dict(loss_type="sigmoid", rpo_alpha=0.5),
    "rpo_average": dict(loss_type="sigmoid", rpo_alpha=0.5, average=True),
    "mpo_ld_dpo": dict(loss_type=["sigmoid", "sft"], ld_alpha=0.3),
    "orpo_average": dict(loss_type="orpo", average=True),
    "ld_dpo": dict(loss_type="sigmoid", ld_alpha=0.3),
    "wpo": dict(loss_type="sigmoid", use_weighting=True),
    "forward_kl": dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    "js": dict(loss_type="hinge", f_divergence_type="js_divergence"),
    "alpha": dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
}


def family_batch():
    """Logits of scale 1 (WPO weights of order 1, not 1e-7) and pairs of unequal lengths (LD-DPO bites)."""
    policy, labels = make_batch(4, 9, 123, scale=1.0)
    labels[2, -3:] = -100
    return policy, labels


def run(fn, policy, ref, labels, **kwargs):
    leaf = policy.detach().clone().requires_grad_()
    loss, metrics = fn(leaf, ref, labels, **kwargs)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def assert_same(actual, expected, grad_rtol=1e-5):
    loss, metrics, grad = actual
    ref_loss, ref_metrics, ref_grad = expected
    assert_fp32_close(loss, ref_loss)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad, name
        assert_fp32_close(metrics[name], value)
    # Losses such as discopop's exp(−βΔ) scale the per-token gradient by a large factor; fp32 rounding
    # of that factor is relative to the largest element, so the absolute tolerance is too.
    torch.testing.assert_close(grad, ref_grad, rtol=grad_rtol, atol=grad_rtol * ref_grad.abs().max().item())


# the cases that change what the kernels compute or return: token weights, lengths, the NLL term's tokens
KERNEL_CASES = ("sigmoid", "wpo", "ld_dpo", "mpo", "rpo_average")


@pytest.mark.parametrize(("backend", "case"), slow_beyond([(b, c) for b in BACKENDS for c in CASES], KERNEL_CASES))
def test_loss_family_matches_reference(backend, case, device):
    options = CASES[case]
    policy, labels = family_batch()
    ref = torch.randn(4, 9, 123).to(device)
    actual = run(fused_dpo_loss, policy, ref, labels, beta=0.5, backend=backend, **options)
    expected = run(reference.dpo_loss, policy, ref, labels, beta=0.5, **options)
    # discopop's exp(−βΔ) term amplifies the log-probs' fp32 rounding by its own magnitude.
    assert_same(actual, expected, grad_rtol=1e-4 if case == "discopop" else 1e-5)
    assert set(REWARD_METRICS + TOKEN_METRICS) <= set(actual[1])
    assert torch.isfinite(actual[2]).all() and actual[2].abs().sum() > 0


@pytest.mark.parametrize("case", ["sigmoid", "ipo", "mpo", "wpo", "ld_dpo"])
def test_fused_linear_loss_family_matches_reference(case, device):
    options = CASES[case]
    hidden = torch.randn(4, 9, 24).to(device)
    weight = (torch.randn(123, 24) / 24**0.5).to(device)
    _, labels = family_batch()
    ref_logps = (-torch.rand(4) * 30).to(device)

    def linear(h, ref, y, **kw):
        return fused_linear_dpo_loss(h, weight, y, ref_logps=ref, **kw)

    def naive(h, ref, y, **kw):
        return reference.dpo_loss(reference.lm_head_logits(h, weight), ref, y, **kw)

    actual = run(linear, hidden, ref_logps, labels, beta=0.5, backend="torch", **options)
    expected = run(naive, hidden, ref_logps, labels, beta=0.5, **options)
    assert_same(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_metrics_from_full_logits(backend):
    """TRL's definitions, computed here from the fp32 logits without any library code."""
    policy, labels = make_batch(4, 9, 123)
    policy[0, 3, :] = 0.0  # a row of ties: argmax is index 0
    labels[0, 4] = 0
    policy[1, 5, 7] = policy[1, 5].max() + 1  # the label is the argmax
    labels[1, 6] = 7
    _, metrics = fused_dpo_loss(policy, None, labels, backend=backend)
    z, y = policy[:, :-1].float(), labels[:, 1:]
    mask = y != -100
    chosen = mask.clone()
    chosen[2:] = False
    rejected = mask & ~chosen
    logp = F.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = z.argmax(-1) == y
    assert top1[chosen].any()  # the case above is exercised
    torch.testing.assert_close(metrics["logits/chosen"], z.mean(-1)[chosen].mean())
    torch.testing.assert_close(metrics["logits/rejected"], z.mean(-1)[rejected].mean())
    torch.testing.assert_close(metrics["entropy"], entropy[mask].mean())
    torch.testing.assert_close(metrics["mean_token_accuracy"], top1[chosen].float().mean())


def test_token_metrics_can_be_skipped_and_empty_sides_report_zero():
    policy, labels = make_batch(2, 6, 123)
    labels[0] = -100  # the chosen completion has no scored token
    _, metrics = fused_dpo_loss(policy, None, labels, token_metrics=False, backend="torch")
    assert set(metrics) == set(REWARD_METRICS) | {"reward_chosen", "reward_rejected", "accuracy"}
    _, metrics = fused_dpo_loss(policy, None, labels, backend="torch")
    assert metrics["logits/chosen"].item() == 0.0 and metrics["mean_token_accuracy"].item() == 0.0


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(loss_type="sigmoidd"), "loss_type"),
        (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type="robust", label_smoothing=0.7), "label_smoothing"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(ld_alpha=1.5), "ld_alpha"),
        (dict(ld_alpha=0.5, average=True), "ld_alpha"),
        (dict(loss_type="ipo", average=True), "length twice"),
        (dict(loss_type=["sigmoid", "sigmoid_norm"], average=True), "length twice"),
        (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "f_divergence_type"),
    ],
)
def test_bad_options_name_the_argument(options, match):
    policy, labels = make_batch(2, 6, 123)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_dpo_loss(policy, None, labels, backend="torch", **options)


# ------------------------------------------------------------------------------ listwise and KTO


@pytest.mark.parametrize("backend", BACKENDS)
def test_listwise_on_fused_log_probs(backend, device):
    """The README's layout: K responses of a prompt consecutive, (B·K, T, V) -> sequence_logps -> (B, K),
    column 0 ranked best. Equals listwise on the reference's log-probs (loss and logits gradient), and for
    K = 2 the sigmoid loss of fused_dpo_loss on the chosen-first layout."""
    B, K = 2, 3
    logits, labels = make_batch(B * K, 7, 123, scale=1.0)
    ref_logps = (-torch.rand(B, K) * 20).to(device)

    def listwise(logps_fn, x):
        loss, _ = losses.listwise_loss(logps_fn(x, labels).view(B, K), ref_logps, beta=0.2)
        return loss

    fused = logits.clone().requires_grad_()
    loss = listwise(lambda x, y: sequence_logps(x, y, backend=backend), fused)
    loss.backward()
    naive = logits.clone().requires_grad_()
    expected = listwise(reference.sequence_logps, naive)
    expected.backward()
    assert_fp32_close(loss, expected)
    torch.testing.assert_close(fused.grad, naive.grad, rtol=1e-5, atol=1e-6)

    pairs = logits[: 2 * B].clone().requires_grad_()  # K = 2: rows (c0, r0, c1, r1)
    pair_labels, ref2 = labels[: 2 * B], ref_logps[:, :2]
    loss2, _ = losses.listwise_loss(sequence_logps(pairs, pair_labels, backend=backend).view(B, 2), ref2, beta=0.2)
    order = torch.tensor([0, 2, 1, 3], device=device)  # chosen first, then rejected
    dpo, _ = fused_dpo_loss(logits[: 2 * B][order], ref2.T.reshape(-1), pair_labels[order], beta=0.2,
                            backend=backend, token_metrics=False)  # fmt: skip
    assert_fp32_close(loss2, dpo)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_false_on_every_entry_point(backend, device):
    """``shift=False`` (labels already aligned with the positions that predict them) on the four entry points,
    against the reference with ``shift=False``; a reference side scored the same way."""
    from dpo_kernels import fused_linear_sequence_logps

    policy, labels = family_batch()
    policy, labels = policy.to(device), labels.to(device)
    labels[:, -1] = 5  # the last position is scored without a shift
    ref = torch.randn(4, 9, 123).to(device)
    assert_fp32_close(sequence_logps(policy, labels, shift=False, backend=backend),
                      reference.sequence_logps(policy, labels, shift=False))  # fmt: skip
    options = dict(beta=0.5, loss_type="sigmoid", rpo_alpha=0.5, use_weighting=True, shift=False)
    actual = run(fused_dpo_loss, policy, ref, labels, backend=backend, **options)
    assert_same(actual, run(reference.dpo_loss, policy, ref, labels, **options))
    hidden, ref_hidden = torch.randn(4, 9, 24).to(device), torch.randn(4, 9, 24).to(device)
    weight = (torch.randn(123, 24) / 24**0.5).to(device)
    linear_backend = backend if backend != "triton" else "torch"  # the Triton head has its own tests
    naive_logits = reference.lm_head_logits(hidden, weight)
    assert_fp32_close(fused_linear_sequence_logps(hidden, weight, labels, shift=False, backend=linear_backend),
                      reference.sequence_logps(naive_logits, labels, shift=False))  # fmt: skip

    def linear(h, r, y, **kw):
        return fused_linear_dpo_loss(h, weight, y, ref_hidden=r, backend=linear_backend, **kw)

    def naive(h, r, y, **kw):
        return reference.dpo_loss(reference.lm_head_logits(h, weight), reference.lm_head_logits(r, weight), y, **kw)

    assert_same(run(linear, hidden, ref_hidden, labels, **options), run(naive, hidden, ref_hidden, labels, **options))
