"""The one-pass route of ``fused_linear_dpo_loss`` (the policy's logits formed once, the loss's gradient taken
while they are live) against the recompute route: every loss option on every backend, groups of pairs,
16-bit inputs, the autograd semantics a trainer relies on, the route's choice, and the ops' contract."""

import pytest
import torch

from conftest import BACKENDS, BACKENDS_TRITON_SLOW, make_batch, slow_beyond
from dpo_kernels import fused_linear_dpo_loss, losses
from dpo_kernels import tokens as tokens_module

B, T, H, V = 3, 9, 24, 211
OPTIONS = {
    "sigmoid": dict(),
    "types_weights_rpo": dict(loss_type=["sigmoid", "ipo", "hinge", "sft"], loss_weights=[1.0, 0.5, 0.3, 0.2],
                              rpo_alpha=0.7),  # fmt: skip
    "ld_alpha_wpo": dict(ld_alpha=0.4, use_weighting=True),
    "f_divergence_smoothing": dict(loss_type="robust", f_divergence_type="alpha_divergence", label_smoothing=0.2),
    "simpo": dict(loss_type="sigmoid_norm", gamma=0.5, label_smoothing=0.1),
    "average": dict(loss_type=["sigmoid", "exo_pair"], label_smoothing=0.1, average=True),
    "others": dict(loss_type=["nca_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "bco_pair"]),
    "transform": dict(softcap=2.5, logit_scale=1.3, temperature=0.8),
}
REFS = ["hidden", "logps", "none"]


def batch(dtype, device, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(2 * B, T, H).to(dtype).to(device)
    weight = (torch.randn(V, H) / H**0.5 * 3).to(dtype).to(device)
    bias = (torch.randn(V) * 0.5).to(dtype).to(device)
    _, labels = make_batch(2 * B, T, V)
    labels[1, 4:] = -100  # sequences of different lengths, one short
    return hidden, weight, bias, labels.to(device)


def step(route, hidden, weight, bias, labels, upstream=1.0, **kwargs):
    """(loss, metrics, d_hidden, d_weight, d_bias) of ``upstream · loss``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = fused_linear_dpo_loss(leaves[0], leaves[1], labels, bias=leaves[2], route=route, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), metrics, *(None if leaf is None else leaf.grad for leaf in leaves)


def reference_side(ref_mode, hidden, device):
    if ref_mode == "hidden":
        return dict(ref_hidden=torch.randn_like(hidden))
    if ref_mode == "logps":
        return dict(ref_logps=(-torch.rand(2 * B) * 30).to(device))
    return {}


def assert_routes_agree(one, two, rtol=2e-6):
    """Loss, every metric and the three gradients at fp32 tolerance relative to each tensor's largest entry."""
    (loss, metrics, *grads), (loss2, metrics2, *grads2) = one, two
    assert metrics.keys() == metrics2.keys()
    for name, a, b in [("loss", loss, loss2), *((k, metrics[k], metrics2[k]) for k in metrics),
                       *zip(("d_hidden", "d_weight", "d_bias"), grads, grads2)]:  # fmt: skip
        scale = b.abs().max().clamp(min=1e-6)
        if name.startswith("logits/"):  # a mean of logits cancels: its rounding scales with the logits (about 3)
            scale = scale.clamp(min=3.0)
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale.item(), msg=lambda m: f"{name}: {m}")


def packed(hidden, labels):
    """The batch as one packed row of sequences of lengths T, 5, T - 1, ... (the padded rows cut short) and
    its cu_seqlens."""
    lengths = [T - (i % 3) * (i % 2 + 1) for i in range(2 * B)]
    rows = [(hidden[i, :n], labels[i, :n]) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=labels.device)
    return torch.cat([h for h, _ in rows])[None], torch.cat([y for _, y in rows])[None], cu


# every option with the reference as hidden states on every backend; the other reference modes on one; a
# packed batch with the options that read the scored tokens' layout (counts, weights, statistics)
CASES = (
    [(b, o, "hidden", False) for b in BACKENDS for o in OPTIONS]
    + [("torch", o, r, False) for o in OPTIONS for r in REFS[1:]]
    + [(b, o, "hidden", True) for b in BACKENDS for o in ("ld_alpha_wpo", "simpo", "transform")]
    + [("torch", "types_weights_rpo", "logps", True)]
)
# the options that change what the kernels compute: token weights and statistics, the logits' transform
KERNEL_OPTIONS = ("sigmoid", "ld_alpha_wpo", "transform")


@pytest.mark.parametrize(("backend", "options", "ref_mode", "is_packed"), slow_beyond(CASES, KERNEL_OPTIONS))
def test_one_pass_equals_recompute(backend, options, ref_mode, is_packed, device):
    """Three groups of one pair each (the budget holds one pair's rows), every loss option, fp32; padded or
    packed."""
    hidden, weight, bias, labels = batch(torch.float32, device)
    layout = {}
    if is_packed:
        hidden, labels, layout["cu_seqlens"] = packed(hidden, labels)
    kwargs = dict(beta=0.3, backend=backend, memory_budget=16 * V * 4, **OPTIONS[options], **layout,
                  **reference_side(ref_mode, hidden, device))  # fmt: skip
    if ref_mode == "none" and options == "f_divergence_smoothing":
        kwargs["f_divergence_type"] = "js_divergence"
    assert_routes_agree(step("one_pass", hidden, weight, bias, labels, **kwargs),
                        step("recompute", hidden, weight, bias, labels, **kwargs))  # fmt: skip


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_bf16_within_the_recompute_error(backend, with_bias, device):
    """16-bit inputs: the one-pass gradients' error from the fp64 truth stays within the recompute route's
    (d_weight is rounded once per group: three groups here), at most 1.5× plus an ulp of the largest entry;
    with a bias (an fp32 buffer) and without (a plain head: a 16-bit buffer on the portable backends)."""
    hidden, weight, bias, labels = batch(torch.bfloat16, device)
    bias = bias if with_bias else None
    kwargs = dict(beta=0.3, backend=backend, memory_budget=16 * V * 4, ld_alpha=0.5)
    truth = step("recompute", hidden.double(), weight.double(), bias if bias is None else bias.double(), labels,
                 **{**kwargs, "backend": "torch"})  # fmt: skip
    one = step("one_pass", hidden, weight, bias, labels, **kwargs)
    two = step("recompute", hidden, weight, bias, labels, **kwargs)
    for name, i in [("loss", 0), ("d_hidden", 2), ("d_weight", 3), ("d_bias", 4)][: 3 + with_bias]:
        err_one = (one[i].double() - truth[i]).abs().max().item()
        err_two = (two[i].double() - truth[i]).abs().max().item()
        ulp = truth[i].abs().max().item() * 2**-8
        assert err_one <= 1.5 * err_two + ulp, (name, err_one, err_two)


def test_autograd_semantics(device):
    """The backward scales the gradients formed in the forward: a halved loss, micro-batches accumulated into
    .grad, backward(retain_graph=True) twice; a second backward without a retained graph and a gradient of the
    gradient raise autograd's errors instead of returning wrong numbers."""
    hidden, weight, bias, labels = batch(torch.float32, device)
    kwargs = dict(beta=0.3, backend="torch", memory_budget=16 * V * 4)
    full = step("recompute", hidden, weight, bias, labels, **kwargs)
    half = step("one_pass", hidden, weight, bias, labels, upstream=0.5, **kwargs)
    for a, b in zip(half[2:], full[2:]):
        torch.testing.assert_close(a, 0.5 * b, rtol=1e-5, atol=1e-7)

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    for _ in range(2):  # gradient accumulation: two micro-batches (the same one twice)
        loss, _ = fused_linear_dpo_loss(leaves[0], leaves[1], labels, bias=leaves[2], route="one_pass", **kwargs)
        (loss / 2).backward()
    for leaf, b in zip(leaves, full[2:]):
        torch.testing.assert_close(leaf.grad, b, rtol=1e-5, atol=1e-7)

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = fused_linear_dpo_loss(leaves[0], leaves[1], labels, bias=leaves[2], route="one_pass", **kwargs)
    loss.backward(retain_graph=True)
    loss.backward()
    for leaf, b in zip(leaves, full[2:]):
        torch.testing.assert_close(leaf.grad, 2 * b, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()

    h = hidden.detach().clone().requires_grad_()
    loss, _ = fused_linear_dpo_loss(h, weight, labels, bias=bias, route="one_pass", **kwargs)
    (grad,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def test_frozen_head_and_partial_requires_grad(device):
    """Only the inputs that require a gradient get one (a frozen head, PEFT style)."""
    hidden, weight, bias, labels = batch(torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_dpo_loss(h, weight, labels, bias=bias, route="one_pass", backend="torch")
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    loss2, _ = fused_linear_dpo_loss(h2, weight, labels, bias=bias, route="recompute", backend="torch")
    loss2.backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)
    assert weight.grad is None and bias.grad is None


def test_the_route_is_chosen_and_refused_with_reasons(monkeypatch, device):
    """"auto" takes the one-pass route where it applies and the recompute route elsewhere; "one_pass" where it
    does not apply raises, naming why."""
    hidden, weight, bias, labels = batch(torch.float32, device)
    calls = []
    real = tokens_module.one_pass
    monkeypatch.setattr(tokens_module, "one_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = hidden.clone().requires_grad_()

    def auto(**kwargs):
        calls.clear()
        fused_linear_dpo_loss(h, weight, labels, backend="torch", **kwargs)
        return bool(calls)

    assert auto()
    assert not auto(route="recompute")
    refused = {
        "aot": dict(loss_type="aot"),
        "bco_state": dict(loss_type="bco_pair", bco_state=losses.BCOState()),
        "gradient_filter": dict(gradient_filter="auto"),
        "memory_budget": dict(memory_budget=4 * V * 4),
    }
    for why, kwargs in refused.items():
        assert not auto(**kwargs), why
        with pytest.raises(ValueError, match="route='one_pass'"):
            auto(route="one_pass", **kwargs)
    with torch.no_grad():
        assert not auto()
    with pytest.raises(ValueError, match="route must be one of"):
        auto(route="fast")


def test_compile_traces_the_entry_point(device):
    """Under torch.compile(fullgraph=True) the "auto" route is the recompute route (the grouping reads the
    labels on the host), with the one-pass route's numbers in eager mode."""
    hidden, weight, bias, labels = batch(torch.float32, device)
    torch._dynamo.reset()
    compiled = torch.compile(fused_linear_dpo_loss, fullgraph=True, backend="aot_eager")
    h = hidden.clone().requires_grad_()
    loss, _ = compiled(h, weight, labels, bias=bias, backend="torch")
    loss.backward()
    eager = step("auto", hidden, weight, bias, labels, backend="torch")
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad, eager[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS_TRITON_SLOW)
def test_opcheck(backend, device):
    hidden, weight, bias, labels = batch(torch.float32, device)
    rows, y = hidden[:, :5].reshape(-1, H).contiguous(), labels[:, 1:6].reshape(-1).clamp(min=0)
    buffer = torch.empty(rows.shape[0], V, device=device)
    args = (buffer, rows, weight, bias, y, 1.2, 3.0, 0.9, backend, True, 7)
    torch.library.opcheck(torch.ops.dpo_kernels.fused_linear_logits.default, args)
    _, lse, _ = torch.ops.dpo_kernels.fused_linear_logits(*args)
    grad = torch.randn(rows.shape[0], device=device)
    d_weight, d_bias = torch.zeros_like(weight), torch.zeros(V, device=device)
    bwd = (buffer, grad, rows, weight, bias, y, lse, 1.2, 3.0, 0.9, backend, d_weight, d_bias, 7)
    torch.library.opcheck(torch.ops.dpo_kernels.fused_linear_logits_backward_.default, bwd)
