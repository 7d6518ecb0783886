"""dpo_kernels.losses against independent fp64 formulas written here with Python floats.

The expected values never call losses.py: every formula is re-derived elementwise with ``math`` so a
shared mistake cannot hide. fp64 results must match to 1e-10, fp32 to the suite's fp32 tolerance
(the reference then runs on the fp32-rounded inputs), and gradients are checked by finite differences.
"""

import math

import pytest
import torch
from conftest import FP32_ATOL, FP32_RTOL

from dpo_kernels import losses as L

pytestmark = pytest.mark.cpu_only(
    "formulas on per-sequence vectors in plain torch; the loss family runs on CUDA tensors in test_dpo_family.py"
)

B = 6
FP64_TOL = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Data and scalar reference formulas
# ------------------------------------------------------------------------------------------------


def make_pairs(batch=B):
    """Per-sequence log-probs shaped like real ones: length × an average log-prob in [-3, -0.2]
    (ORPO's log(1 − e^a) then sees both sides of its −log 2 branch point), reference nearby."""
    chosen_lengths = torch.randint(1, 13, (batch,))
    rejected_lengths = torch.randint(1, 13, (batch,))
    chosen = -(0.2 + 2.8 * torch.rand(batch, dtype=torch.float64)) * chosen_lengths
    rejected = -(0.2 + 2.8 * torch.rand(batch, dtype=torch.float64)) * rejected_lengths
    ref_chosen = chosen + 1.5 * torch.randn(batch, dtype=torch.float64)
    ref_rejected = rejected + 1.5 * torch.randn(batch, dtype=torch.float64)
    pair_weights = 0.2 + torch.rand(batch, dtype=torch.float64)
    # the NLL over more tokens than the scored ones (TRL's ORPO: the prompt too)
    nll_lengths = chosen_lengths + torch.randint(0, 6, (batch,))
    nll = chosen - (0.2 + 2.8 * torch.rand(batch, dtype=torch.float64)) * (nll_lengths - chosen_lengths)
    return dict(
        nll=nll,
        nll_lengths=nll_lengths,
        chosen=chosen,
        rejected=rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_weights=pair_weights,
    )


def cast(data, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}


def floats(t):
    return [float(x) for x in t.double().tolist()]


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


def f_score(x, fdiv, alpha):
    if fdiv == "reverse_kl" or (fdiv == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return x
    if fdiv == "forward_kl":
        return 1 - math.exp(-x)
    if fdiv == "js_divergence":
        return math.log(2) + logsig(x)
    return (math.exp(min((alpha - 1) * x, 80.0)) - 1) / (alpha - 1)


def smoothed(m, eps):
    return -(1 - eps) * logsig(m) - eps * logsig(-m)


def log1mexp(x):
    return math.log(1 - math.exp(x)) if x < -1 else math.log(-math.expm1(x))


def alphapo(u, a):
    """AlphaPO's reward (Gupta et al. 2025), as TRL's CPOTrainer writes it: (1 − p^(−α))/α, p = e^u."""
    return u if a == 0 else (1 - math.exp(u) ** -a) / a


def expected_per_pair(t, d, beta, eps, fdiv, alpha, tau, gamma, bco_delta, a_po=0.0):
    c, r, rc, rr = d["c"], d["r"], d["rc"], d["rr"]
    lc, lr = d["lc"], d["lr"]
    n = len(c)
    xc = [c[i] - rc[i] for i in range(n)]
    xr = [r[i] - rr[i] for i in range(n)]
    sc = [alphapo(x, a_po) if a_po else f_score(x, fdiv, alpha) for x in xc]
    sr = [alphapo(x, a_po) if a_po else f_score(x, fdiv, alpha) for x in xr]
    # per-token average scores; AlphaPO shapes the average reward, f-DPO averages the sequence's score
    if a_po:
        nc = [alphapo(xc[i] / max(lc[i], 1), a_po) for i in range(n)]
        nr = [alphapo(xr[i] / max(lr[i], 1), a_po) for i in range(n)]
    else:
        nc = [sc[i] / max(lc[i], 1) for i in range(n)]
        nr = [sr[i] / max(lr[i], 1) for i in range(n)]
    m = [beta * (sc[i] - sr[i]) for i in range(n)]
    nll = -sum(d["nll"]) / max(sum(d["nll_n"]), 1)
    out = []
    for i in range(n):
        if t == "sigmoid":
            v = smoothed(m[i], eps)
        elif t == "robust":
            v = (-(1 - eps) * logsig(m[i]) + eps * logsig(-m[i])) / (1 - 2 * eps)
        elif t == "exo_pair":
            qw, ql = sig(m[i]), sig(-m[i])
            v = qw * (math.log(qw) - math.log(1 - eps)) + ql * (math.log(ql) - math.log(eps))
        elif t == "hinge":
            v = max(0.0, 1 - m[i])
        elif t == "ipo":
            v = (nc[i] - nr[i] - 1 / (2 * beta)) ** 2
        elif t == "bco_pair":
            delta = bco_delta or 0.0
            v = -logsig(beta * xc[i] - delta) - logsig(-(beta * xr[i] - delta))
        elif t == "sppo_hard":
            v = (xc[i] - 0.5 / beta) ** 2 + (xr[i] + 0.5 / beta) ** 2
        elif t == "nca_pair":
            v = -logsig(beta * xc[i]) - 0.5 * logsig(-beta * xc[i]) - 0.5 * logsig(-beta * xr[i])
        elif t == "aot":
            pol = sorted(c[j] - r[j] for j in range(n))
            ref = sorted(rc[j] - rr[j] for j in range(n))
            v = smoothed(beta * (pol[i] - ref[i]), eps)
        elif t == "aot_unpaired":
            v = smoothed(beta * (sorted(xc)[i] - sorted(xr)[i]), eps)
        elif t == "apo_zero":
            v = 1 - sig(beta * xc[i]) + sig(beta * xr[i])
        elif t == "apo_down":
            v = sig(beta * xc[i]) + 1 - sig(beta * (xc[i] - xr[i]))
        elif t == "discopop":
            mod = sig(m[i] / tau)
            v = -logsig(m[i]) * (1 - mod) + math.exp(-m[i]) * mod
        elif t == "sigmoid_norm":
            # SimPO, smoothed as CPO's "simpo": −(1−ε)·log σ(β·(Δ̄ − γ/β)) − ε·log σ(−β·(Δ̄ − γ/β))
            v = smoothed(beta * (nc[i] - nr[i] - gamma / beta), eps)
        elif t == "sft":
            v = nll
        elif t == "orpo":
            ac, ar = c[i] / max(lc[i], 1), r[i] / max(lr[i], 1)
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            v = nll - beta * logsig(log_odds)
        else:
            raise AssertionError(t)
        out.append(v)
    return out


def expected_loss(
    data,
    loss_type="sigmoid",
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    gamma=0.0,
    rpo_alpha=None,
    pair_weights=False,
    bco_delta=None,
    alphapo_alpha=0.0,
    nll_tokens=False,
):
    d = dict(
        c=floats(data["chosen"]),
        r=floats(data["rejected"]),
        rc=floats(data["ref_chosen"]),
        rr=floats(data["ref_rejected"]),
        lc=floats(data["chosen_lengths"]),
        lr=floats(data["rejected_lengths"]),
    )
    # the NLL's tokens: the scored ones, or (nll_tokens) the chosen_nll_* of the data
    d["nll"], d["nll_n"] = (floats(data["nll"]), floats(data["nll_lengths"])) if nll_tokens else (d["c"], d["lc"])
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(types)
    n = len(d["c"])
    total = [0.0] * n
    for t, w in zip(types, weights):
        per = expected_per_pair(
            t, d, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, gamma, bco_delta,
            alphapo_alpha,
        )  # fmt: skip
        total = [total[i] + w * per[i] for i in range(n)]
    if rpo_alpha is not None:
        nll = -sum(d["nll"]) / max(sum(d["nll_n"]), 1)
        total = [x + rpo_alpha * nll for x in total]
    if pair_weights:
        pw = floats(data["pair_weights"])
        total = [total[i] * pw[i] for i in range(n)]
    return sum(total) / n


def call(data, pair_weights=False, nll_tokens=False, **opts):
    if nll_tokens:
        opts.update(chosen_nll_logps=data["nll"], chosen_nll_lengths=data["nll_lengths"])
    return L.preference_loss(
        data["chosen"],
        data["rejected"],
        data["ref_chosen"],
        data["ref_rejected"],
        chosen_lengths=data["chosen_lengths"],
        rejected_lengths=data["rejected_lengths"],
        pair_weights=data["pair_weights"] if pair_weights else None,
        **opts,
    )


# ------------------------------------------------------------------------------------------------
# Cases: (id, options). Every loss type once with defaults, then each modifier.
# ------------------------------------------------------------------------------------------------

DEFAULTS = {t: {"label_smoothing": 0.1} if t == "exo_pair" else {} for t in L.LOSS_TYPES}
CASES = [(t, dict(loss_type=t, **DEFAULTS[t])) for t in L.LOSS_TYPES]
CASES += [
    ("sigmoid-beta0.5", dict(loss_type="sigmoid", beta=0.5)),
    ("cdpo-0.1", dict(loss_type="sigmoid", label_smoothing=0.1)),
    ("cdpo-0.5", dict(loss_type="sigmoid", label_smoothing=0.5)),
    ("robust-0.2", dict(loss_type="robust", label_smoothing=0.2)),
    ("exo_pair-1e-3", dict(loss_type="exo_pair", label_smoothing=1e-3)),
    ("aot-0.2", dict(loss_type="aot", label_smoothing=0.2)),
    ("aot_unpaired-0.3", dict(loss_type="aot_unpaired", label_smoothing=0.3)),
    ("discopop-tau0.5", dict(loss_type="discopop", discopop_tau=0.5, beta=0.5)),
    ("ipo-beta0.5", dict(loss_type="ipo", beta=0.5)),
    ("sigmoid_norm-gamma", dict(loss_type="sigmoid_norm", beta=2.0, gamma=0.5)),
    ("simpo-smoothed-0.2", dict(loss_type="sigmoid_norm", beta=2.0, gamma=0.5, label_smoothing=0.2)),
    ("simpo-smoothed-0.5", dict(loss_type="sigmoid_norm", beta=2.0, gamma=0.5, label_smoothing=0.5)),
    ("alphapo-simpo", dict(loss_type="sigmoid_norm", beta=2.0, gamma=0.5, label_smoothing=0.1, alphapo_alpha=0.3)),
    ("alphapo-sigmoid", dict(loss_type="sigmoid", alphapo_alpha=-0.05)),
    ("alphapo-hinge", dict(loss_type="hinge", beta=0.5, alphapo_alpha=0.05)),
    ("alphapo-ipo", dict(loss_type="ipo", alphapo_alpha=0.7)),
    ("orpo-nll-tokens", dict(loss_type="orpo", beta=0.5, nll_tokens=True)),
    ("rpo-nll-tokens", dict(loss_type=["sigmoid", "sft"], rpo_alpha=0.3, nll_tokens=True)),
    ("orpo-beta0.5", dict(loss_type="orpo", beta=0.5)),
    ("rpo-sigmoid", dict(loss_type="sigmoid", rpo_alpha=0.7)),
    ("rpo-ipo", dict(loss_type="ipo", rpo_alpha=1.0)),
    ("wpo-sigmoid", dict(loss_type="sigmoid", pair_weights=True)),
    ("wpo-sft", dict(loss_type="sft", pair_weights=True)),
    ("wpo-orpo", dict(loss_type="orpo", pair_weights=True)),
    ("wpo-rpo-hinge", dict(loss_type="hinge", pair_weights=True, rpo_alpha=0.5)),
    ("mpo", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])),
    ("mpo-wpo-rpo", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], pair_weights=True,
                         rpo_alpha=0.3)),  # fmt: skip
    ("combo-default-weights", dict(loss_type=["ipo", "nca_pair", "apo_down"])),
    ("combo-orpo-sigmoid", dict(loss_type=["orpo", "sigmoid"], loss_weights=[0.5, 2.0])),
    ("combo-smoothing", dict(loss_type=["robust", "exo_pair", "sigmoid"], label_smoothing=0.2)),
]
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
F_DIV_OPTIONS = [
    ("forward_kl", {}),
    ("js_divergence", {}),
    ("alpha_divergence", {"f_alpha_divergence_coef": 0.5}),
    ("alpha_divergence", {"f_alpha_divergence_coef": 1.5}),
    ("alpha_divergence", {"f_alpha_divergence_coef": 1.0}),  # the log fallback
    ("alpha_divergence", {"f_alpha_divergence_coef": 1.0 + 1e-7}),  # inside the fallback window
]
for t in F_DIV_TYPES:
    for fdiv, extra in F_DIV_OPTIONS:
        cid = f"{t}-{fdiv}" + (f"-{extra['f_alpha_divergence_coef']}" if extra else "")
        CASES.append((cid, dict(loss_type=t, f_divergence_type=fdiv, **DEFAULTS[t], **extra)))
CASES.append(("mpo-js", dict(loss_type=["sigmoid", "ipo", "sft"], f_divergence_type="js_divergence")))

CASE_IDS = [c[0] for c in CASES]
CASE_OPTS = [c[1] for c in CASES]


@pytest.mark.parametrize("opts", CASE_OPTS, ids=CASE_IDS)
def test_fp64_matches_formula(opts):
    data = make_pairs()
    out = call(data, **opts)
    expected = expected_loss(data, **opts)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss.item(), expected, **FP64_TOL)


@pytest.mark.parametrize("opts", CASE_OPTS, ids=CASE_IDS)
def test_fp32_matches_formula(opts):
    data = cast(make_pairs(), torch.float32)
    out = call(data, **opts)
    assert out.loss.dtype == torch.float32
    expected = torch.tensor(expected_loss(data, **opts), dtype=torch.float32)
    torch.testing.assert_close(out.loss.detach(), expected, rtol=FP32_RTOL, atol=FP32_ATOL)


GRAD_CASES = [(t, dict(loss_type=t, **DEFAULTS[t])) for t in L.LOSS_TYPES] + [
    ("cdpo", dict(loss_type="sigmoid", label_smoothing=0.2)),
    ("robust-0.2", dict(loss_type="robust", label_smoothing=0.2)),
    ("aot-smoothed", dict(loss_type="aot", label_smoothing=0.2)),
    ("forward_kl", dict(loss_type="sigmoid", f_divergence_type="forward_kl")),
    ("js", dict(loss_type="ipo", f_divergence_type="js_divergence")),
    ("alpha", dict(loss_type="discopop", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    ("gamma", dict(loss_type="sigmoid_norm", gamma=0.4)),
    ("simpo-smoothed", dict(loss_type="sigmoid_norm", gamma=0.4, label_smoothing=0.3)),
    ("alphapo-simpo", dict(loss_type="sigmoid_norm", gamma=0.4, alphapo_alpha=0.2)),
    ("rpo-wpo", dict(loss_type="sigmoid", rpo_alpha=0.5, pair_weights=True)),
    ("mpo", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])),
]


@pytest.mark.parametrize("opts", [c[1] for c in GRAD_CASES], ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_policy_logps(opts):
    data = make_pairs()
    chosen = data["chosen"].clone().requires_grad_()
    rejected = data["rejected"].clone().requires_grad_()

    def fn(c, r):
        return call({**data, "chosen": c, "rejected": r}, **opts).loss

    assert torch.autograd.gradcheck(fn, (chosen, rejected))


def test_rewards():
    data = make_pairs()
    data["chosen"].requires_grad_()
    out = call(data, loss_type=["sigmoid", "ipo"], beta=0.3)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (data["chosen"] - data["ref_chosen"]).detach(), **FP64_TOL)
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (data["rejected"] - data["ref_rejected"]), **FP64_TOL)
    # f-divergences change the loss's scores, not the logged rewards
    fwd = call(data, loss_type="sigmoid", beta=0.3, f_divergence_type="forward_kl")
    torch.testing.assert_close(fwd.chosen_rewards, out.chosen_rewards, rtol=0, atol=0)
    # ORPO logs β times the average per-token log-prob, as TRL's ORPO trainer does
    orpo = call(data, loss_type="orpo", beta=0.3)
    expected = [0.3 * c / n for c, n in zip(floats(data["chosen"]), floats(data["chosen_lengths"]))]
    torch.testing.assert_close(orpo.chosen_rewards, torch.tensor(expected, dtype=torch.float64), **FP64_TOL)
    # AlphaPO logs β times its shaped reward, as TRL's CPOTrainer does with alpha != 0
    shaped = call(data, loss_type="sigmoid", beta=0.3, alphapo_alpha=0.2)
    logratios = floats(data["rejected"] - data["ref_rejected"])
    expected = torch.tensor([0.3 * alphapo(x, 0.2) for x in logratios], dtype=torch.float64)
    torch.testing.assert_close(shaped.rejected_rewards, expected, **FP64_TOL)


def test_zero_length_sequences_are_clamped():
    data = make_pairs()
    data["chosen_lengths"][0] = 0
    for t in ("ipo", "sigmoid_norm"):
        torch.testing.assert_close(call(data, loss_type=t).loss.item(), expected_loss(data, loss_type=t), **FP64_TOL)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", ["ipo", "sft"]])
def test_norm_lengths_replace_the_divisor_of_normalised_losses_only(loss_type):
    """ipo / sigmoid_norm divide by ``*_norm_lengths`` when given; sft's token mean keeps the scored counts."""
    data = make_pairs()
    norm = {k: data[k] + 1 for k in ("chosen_lengths", "rejected_lengths")}
    got = call(data, loss_type=loss_type, chosen_norm_lengths=norm["chosen_lengths"],
               rejected_norm_lengths=norm["rejected_lengths"]).loss  # fmt: skip
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    expected = 0.0
    for t in types:
        lengths = norm if t in ("ipo", "sigmoid_norm") else data
        expected += expected_loss(dict(data, **lengths), loss_type=t)
    torch.testing.assert_close(got.item(), expected, **FP64_TOL)
    with pytest.raises(ValueError, match="chosen_norm_lengths"):
        call(data, loss_type="ipo", chosen_norm_lengths=norm["chosen_lengths"][:-1])


@pytest.mark.parametrize("opts", [dict(loss_type="sft"), dict(loss_type="orpo"), dict(loss_type="ipo", rpo_alpha=0.4)],
                         ids=["sft", "orpo", "rpo"])  # fmt: skip
def test_sum_logps_feed_the_nll_and_odds_terms(opts):
    """With ``*_sum_logps`` the NLL / odds terms read the sums, the DPO terms the (here: averaged)
    log-probs given; the same as the formula with each part on its own inputs."""
    data = make_pairs()
    averaged = dict(data)
    for side in ("chosen", "rejected"):
        averaged[side] = data[side] / data[f"{side}_lengths"]
    got = call(averaged, chosen_sum_logps=data["chosen"], rejected_sum_logps=data["rejected"], **opts).loss
    if opts["loss_type"] == "ipo":  # the DPO part on the averaged log-probs, the NLL on the sums
        expected = expected_loss(averaged, loss_type="ipo") + 0.4 * -data["chosen"].sum().item() / data[
            "chosen_lengths"].sum().item()  # fmt: skip
    else:  # sft and orpo read the sums only
        expected = expected_loss(data, **opts)
    torch.testing.assert_close(got.item(), expected, **FP64_TOL)


def test_alpha_divergence_clamp():
    # (α − 1)·log-ratio = 2·60 = 120 > 80: the score saturates at (e^80 − 1)/(α − 1), zero gradient.
    data = make_pairs(2)
    data["chosen"] = data["ref_chosen"] + torch.tensor([60.0, 0.5], dtype=torch.float64)
    opts = dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=3.0, beta=1e-35)
    chosen = data["chosen"].clone().requires_grad_()
    out = call({**data, "chosen": chosen}, **opts)
    torch.testing.assert_close(out.loss.item(), expected_loss(data, **opts), **FP64_TOL)
    (grad,) = torch.autograd.grad(out.loss, chosen)
    assert grad[0].item() == 0.0 and grad[1].item() != 0.0


def test_bco_state_two_steps():
    state = L.BCOState()
    beta = 0.2
    batch_means = []
    for step in range(2):
        data = make_pairs()
        rewards = [beta * (c - rc) for c, rc in zip(floats(data["chosen"]), floats(data["ref_chosen"]))]
        rewards += [beta * (r - rr) for r, rr in zip(floats(data["rejected"]), floats(data["ref_rejected"]))]
        batch_means.append(sum(rewards) / len(rewards))
        delta = sum(batch_means) / len(batch_means)  # running mean of batch means, this batch included
        out = call(data, loss_type="bco_pair", beta=beta, bco_state=state)
        torch.testing.assert_close(out.loss.item(), expected_loss(data, "bco_pair", beta=beta, bco_delta=delta),
                                   **FP64_TOL)  # fmt: skip
        assert state.count == step + 1
        torch.testing.assert_close(state.mean, delta, **FP64_TOL)
    # Without a state, the loss is TRL 1.16's uncentred pairwise form.
    assert call(data, loss_type="bco_pair", beta=beta).loss.item() == pytest.approx(
        expected_loss(data, "bco_pair", beta=beta), rel=1e-12
    )


def test_bco_state_in_combination_fp32():
    state = L.BCOState(mean=0.3, count=4)
    data = cast(make_pairs(), torch.float32)
    opts = dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2])
    rewards = [0.1 * (a - b) for a, b in zip(floats(data["chosen"]), floats(data["ref_chosen"]))]
    rewards += [0.1 * (a - b) for a, b in zip(floats(data["rejected"]), floats(data["ref_rejected"]))]
    delta = 0.3 + (sum(rewards) / len(rewards) - 0.3) / 5
    out = call(data, bco_state=state, **opts)
    expected = torch.tensor(expected_loss(data, bco_delta=delta, **opts), dtype=torch.float32)
    torch.testing.assert_close(out.loss, expected, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert state.count == 5


def test_dpo_sigmoid_legacy():
    data = make_pairs()
    loss, metrics = L.dpo_sigmoid(data["chosen"], data["rejected"], data["ref_chosen"], data["ref_rejected"], 0.1)
    torch.testing.assert_close(loss.item(), expected_loss(data), **FP64_TOL)
    assert set(metrics) == {"reward_chosen", "reward_rejected", "accuracy"}
    rc = 0.1 * (data["chosen"] - data["ref_chosen"])
    rr = 0.1 * (data["rejected"] - data["ref_rejected"])
    torch.testing.assert_close(metrics["reward_chosen"], rc.mean())
    torch.testing.assert_close(metrics["accuracy"], (rc > rr).double().mean())


# ------------------------------------------------------------------------------------------------
# Per-token helpers: LD-DPO and WPO
# ------------------------------------------------------------------------------------------------


def ragged_tokens(rows=6, t=11):
    token_logps = -3 * torch.rand(rows, t, dtype=torch.float64)
    mask = torch.rand(rows, t) < 0.7
    mask[1] = False  # a sequence with no scored token
    mask[4, :3] = False
    # Unscored positions hold garbage: neither helper may read them.
    token_logps = torch.where(mask, token_logps, torch.full_like(token_logps, 123.0))
    return token_logps, mask


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_logps(ld_alpha):
    token_logps, mask = ragged_tokens()
    out = L.ld_dpo_logps(token_logps, mask, ld_alpha)
    half = token_logps.shape[0] // 2
    scored = [[x for x, m in zip(floats(row), mrow.tolist()) if m] for row, mrow in zip(token_logps, mask)]
    expected = []
    for i, seq in enumerate(scored):
        j = i % half
        shared = min(len(scored[j]), len(scored[j + half]))
        expected.append(sum(seq[:shared]) + ld_alpha * sum(seq[shared:]))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), **FP64_TOL)
    out32 = L.ld_dpo_logps(token_logps.float(), mask, ld_alpha)
    torch.testing.assert_close(out32, out.float(), rtol=FP32_RTOL, atol=FP32_ATOL)
    assert torch.autograd.gradcheck(lambda x: L.ld_dpo_logps(x, mask, ld_alpha), (token_logps.requires_grad_(),))


def test_wpo_weights():
    token_logps, mask = ragged_tokens()
    log_sum_sq = -torch.rand_like(token_logps)  # log Σp² ≤ 0
    token_logps.requires_grad_()
    w = L.wpo_weights(token_logps, log_sum_sq, mask)
    assert not w.requires_grad
    expected = []
    for i in range(token_logps.shape[0]):
        terms = [
            a - s for a, s, m in zip(floats(token_logps[i].detach()), floats(log_sum_sq[i]), mask[i].tolist()) if m
        ]
        expected.append(math.exp(sum(terms) / max(len(terms), 1)))
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), **FP64_TOL)
    assert w[1].item() == 1.0  # no scored token
    pair = L.wpo_pair_weights(w)
    half = len(expected) // 2
    torch.testing.assert_close(
        pair, torch.tensor([expected[i] * expected[i + half] for i in range(half)], dtype=torch.float64), **FP64_TOL
    )
    w32 = L.wpo_weights(token_logps.detach().float(), log_sum_sq.float(), mask)
    torch.testing.assert_close(w32, w.float(), rtol=FP32_RTOL, atol=FP32_ATOL)


# ------------------------------------------------------------------------------------------------
# KTO
# ------------------------------------------------------------------------------------------------


def expected_kto(pol, ref, pkl, rkl, desirable, beta, wd, wu, loss_type):
    kl = 0.0
    if loss_type == "kto":
        kl = max(0.0, sum(a - b for a, b in zip(pkl, rkl)) / len(pkl))
    losses = []
    for p, r, d in zip(pol, ref, desirable):
        x = p - r
        if loss_type == "kto":
            v = wd * (1 - sig(beta * (x - kl))) if d else wu * (1 - sig(beta * (kl - x)))
        else:
            v = wd * (1 - sig(beta * x)) if d else wu * sig(beta * x)
        losses.append(v)
    return sum(losses) / len(losses), kl


KTO_MASKS = {
    "mixed": [True, False, True, True, False, False, True],
    "all-desirable": [True] * 7,
    "all-undesirable": [False] * 7,
}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("mask_name", list(KTO_MASKS))
@pytest.mark.parametrize("kl_shift", [0.8, -5.0], ids=["kl-positive", "kl-clamped"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)], ids=["unweighted", "weighted"])
def test_kto(loss_type, mask_name, kl_shift, weights):
    n = 7
    pol = -20 * torch.rand(n, dtype=torch.float64)
    ref = pol + 2 * torch.randn(n, dtype=torch.float64)
    pkl = -20 * torch.rand(5, dtype=torch.float64)
    rkl = pkl - kl_shift + 0.3 * torch.randn(5, dtype=torch.float64)
    desirable = torch.tensor(KTO_MASKS[mask_name])
    beta = 0.3
    wd, wu = weights
    kw = dict(beta=beta, desirable_weight=wd, undesirable_weight=wu, loss_type=loss_type)
    loss, kl = expected_kto(floats(pol), floats(ref), floats(pkl), floats(rkl), KTO_MASKS[mask_name], beta, wd, wu,
                            loss_type)  # fmt: skip
    out = L.kto_loss(pol, ref, pkl, rkl, desirable, **kw)
    torch.testing.assert_close(out.loss.item(), loss, **FP64_TOL)
    torch.testing.assert_close(out.kl.item(), kl, **FP64_TOL)
    if kl_shift < 0 or loss_type != "kto":
        assert out.kl.item() == 0.0
    rewards = beta * (pol - ref)
    torch.testing.assert_close(out.chosen_rewards, rewards[desirable], **FP64_TOL)
    torch.testing.assert_close(out.rejected_rewards, rewards[~desirable], **FP64_TOL)
    assert out.chosen_rewards.shape[0] + out.rejected_rewards.shape[0] == n

    out32 = L.kto_loss(pol.float(), ref.float(), pkl.float(), rkl.float(), desirable, **kw)
    loss32, _ = expected_kto(floats(pol.float()), floats(ref.float()), floats(pkl.float()), floats(rkl.float()),
                             KTO_MASKS[mask_name], beta, wd, wu, loss_type)  # fmt: skip
    torch.testing.assert_close(out32.loss, torch.tensor(loss32, dtype=torch.float32), rtol=FP32_RTOL, atol=FP32_ATOL)

    # The KL estimate is a constant: gradients reach the policy log-probs only.
    pkl_g = pkl.clone().requires_grad_()
    fn = lambda p: L.kto_loss(p, ref, pkl_g, rkl, desirable, **kw).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pol.clone().requires_grad_(),))
    L.kto_loss(pol.clone().requires_grad_(), ref, pkl_g, rkl, desirable, **kw).loss.backward()
    assert pkl_g.grad is None


def test_apo_zero_unpaired_needs_no_kl_logps():
    pol, ref = -torch.rand(4, dtype=torch.float64), -torch.rand(4, dtype=torch.float64)
    desirable = torch.tensor([True, False, False, True])
    out = L.kto_loss(pol, ref, None, None, desirable, loss_type="apo_zero_unpaired")
    expected, _ = expected_kto(floats(pol), floats(ref), [], [], desirable.tolist(), 0.1, 1, 1, "apo_zero_unpaired")
    torch.testing.assert_close(out.loss.item(), expected, **FP64_TOL)


# ------------------------------------------------------------------------------------------------
# Listwise (Plackett–Luce)
# ------------------------------------------------------------------------------------------------


def expected_listwise(pol, ref, beta):
    total = 0.0
    for prow, rrow in zip(pol, ref):
        r = [beta * (a - b) for a, b in zip(prow, rrow)]
        for k in range(len(r) - 1):
            top = max(r[k:])
            lse = top + math.log(sum(math.exp(x - top) for x in r[k:]))
            total -= r[k] - lse
    return total / len(pol)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_listwise_matches_formula(k):
    pol = -30 * torch.rand(4, k, dtype=torch.float64)
    ref = pol + 3 * torch.randn(4, k, dtype=torch.float64)
    loss, rewards = L.listwise_loss(pol, ref, beta=0.5)
    expected = expected_listwise(pol.tolist(), ref.tolist(), 0.5)
    torch.testing.assert_close(loss.item(), expected, **FP64_TOL)
    torch.testing.assert_close(rewards, 0.5 * (pol - ref), **FP64_TOL)
    loss32, _ = L.listwise_loss(pol.float(), ref.float(), beta=0.5)
    expected32 = expected_listwise(pol.float().double().tolist(), ref.float().double().tolist(), 0.5)
    torch.testing.assert_close(loss32, torch.tensor(expected32, dtype=torch.float32), rtol=FP32_RTOL, atol=FP32_ATOL)
    assert torch.autograd.gradcheck(lambda p: L.listwise_loss(p, ref, beta=0.5)[0], (pol.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_listwise_k2_is_sigmoid_dpo(dtype):
    data = cast(make_pairs(), dtype)
    pol = torch.stack([data["chosen"], data["rejected"]], dim=1)
    ref = torch.stack([data["ref_chosen"], data["ref_rejected"]], dim=1)
    listwise, _ = L.listwise_loss(pol, ref, beta=0.3)
    dpo = call(data, loss_type="sigmoid", beta=0.3).loss
    if dtype == torch.float64:
        assert abs(listwise.item() - dpo.item()) <= 1e-12
    else:
        torch.testing.assert_close(listwise, dpo, rtol=FP32_RTOL, atol=FP32_ATOL)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

ERROR_CASES = [
    ("unknown-type", dict(loss_type="dpo"), ValueError, "loss_type.*sigmoid.*orpo"),
    ("unknown-in-list", dict(loss_type=["sigmoid", "kto"]), ValueError, "loss_type"),
    ("empty-type-list", dict(loss_type=[]), ValueError, "loss_type"),
    ("weights-length", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError, "loss_weights"),
    ("weights-single", dict(loss_weights=[1.0, 2.0]), ValueError, "loss_weights"),
    ("robust-0.5", dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
    ("sigmoid-0.6", dict(loss_type="sigmoid", label_smoothing=0.6), ValueError, "label_smoothing"),
    ("sigmoid-negative", dict(loss_type="sigmoid", label_smoothing=-0.1), ValueError, "label_smoothing"),
    ("aot-0.7", dict(loss_type="aot", label_smoothing=0.7), ValueError, "label_smoothing"),
    ("aot_unpaired-neg", dict(loss_type="aot_unpaired", label_smoothing=-0.01), ValueError, "label_smoothing"),
    ("exo-0", dict(loss_type="exo_pair"), ValueError, "label_smoothing"),
    ("exo-1", dict(loss_type="exo_pair", label_smoothing=1.0), ValueError, "label_smoothing"),
    ("hinge-smoothing", dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing"),
    ("combo-smoothing", dict(loss_type=["robust", "ipo"], label_smoothing=0.1), ValueError, "label_smoothing"),
    ("beta-0", dict(beta=0.0), ValueError, "beta"),
    ("beta-neg", dict(beta=-0.1), ValueError, "beta"),
    ("beta-nan", dict(beta=float("nan")), ValueError, "beta"),
    ("fdiv-unknown", dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
    ("fdiv-bco", dict(loss_type="bco_pair", f_divergence_type="forward_kl"), ValueError, "f_divergence_type"),
    ("fdiv-orpo", dict(loss_type="orpo", f_divergence_type="js_divergence"), ValueError, "f_divergence_type"),
    ("fdiv-combo", dict(loss_type=["sigmoid", "apo_zero"], f_divergence_type="alpha_divergence"), ValueError,
     "f_divergence_type"),  # fmt: skip
    ("tau", dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
    ("gamma-sigmoid", dict(gamma=0.5), ValueError, "gamma"),
    ("simpo-0.6", dict(loss_type="sigmoid_norm", label_smoothing=0.6), ValueError, "label_smoothing"),
    ("alphapo-orpo", dict(loss_type="orpo", alphapo_alpha=0.1), ValueError, "alphapo_alpha"),
    ("alphapo-fdiv", dict(alphapo_alpha=0.1, f_divergence_type="js_divergence"), ValueError, "alphapo_alpha"),
    ("nll-logps-alone", dict(loss_type="sft", chosen_nll_logps=torch.zeros(B)), ValueError, "chosen_nll_lengths"),
    ("bco-state-sigmoid", dict(bco_state=L.BCOState()), ValueError, "bco_state"),
    ("bco-state-type", dict(loss_type="bco_pair", bco_state={"mean": 0.0}), TypeError, "bco_state"),
]


@pytest.mark.parametrize("opts,exc,match", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_option_errors(opts, exc, match):
    with pytest.raises(exc, match=match):
        call(make_pairs(), **opts)


@pytest.mark.parametrize("which", ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"])
def test_shape_mismatch_names_argument(which):
    args = [torch.zeros(B, dtype=torch.float64) for _ in range(4)]
    names = ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    args[names.index(which)] = torch.zeros(B + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"{which}=\({B + 1},\)"):
        L.preference_loss(*args)
    args[names.index(which)] = torch.zeros(B, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=which):
        L.preference_loss(*args)
    args[names.index(which)] = torch.zeros(B, dtype=torch.int64)
    with pytest.raises(TypeError, match=which):
        L.preference_loss(*args)


@pytest.mark.parametrize(
    "opts,missing",
    [
        (dict(loss_type="ipo"), "chosen_lengths"),
        (dict(loss_type="ipo", chosen_lengths=True), "rejected_lengths"),
        (dict(loss_type="sigmoid_norm", chosen_lengths=True), "rejected_lengths"),
        (dict(loss_type="sft"), "chosen_lengths"),
        (dict(loss_type="orpo", chosen_lengths=True), "rejected_lengths"),
        (dict(loss_type="orpo", rejected_lengths=True), "chosen_lengths"),
        (dict(loss_type="sigmoid", rpo_alpha=1.0), "chosen_lengths"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]), "chosen_lengths"),
    ],
)
def test_missing_lengths(opts, missing):
    data = make_pairs()
    for side in ("chosen_lengths", "rejected_lengths"):
        opts[side] = data[side] if opts.get(side) else None
    with pytest.raises(ValueError, match=missing):
        L.preference_loss(data["chosen"], data["rejected"], data["ref_chosen"], data["ref_rejected"], **opts)


@pytest.mark.parametrize("name", ["chosen_lengths", "rejected_lengths", "pair_weights"])
def test_per_pair_argument_shapes(name):
    data = make_pairs()
    data[name] = data[name][:-1]
    with pytest.raises(ValueError, match=name):
        call(data, loss_type="ipo", pair_weights=True)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_pair_weights_rejected_with_sorting_losses(loss_type):
    with pytest.raises(ValueError, match="pair_weights"):
        call(make_pairs(), loss_type=loss_type, pair_weights=True)


def test_helper_errors():
    token_logps, mask = ragged_tokens()
    with pytest.raises(ValueError, match="ld_alpha"):
        L.ld_dpo_logps(token_logps, mask, 1.5)
    with pytest.raises(TypeError, match="mask"):
        L.ld_dpo_logps(token_logps, mask.long(), 0.5)
    with pytest.raises(ValueError, match="token_logps"):
        L.ld_dpo_logps(token_logps[:-1], mask[:-1], 0.5)
    with pytest.raises(ValueError, match="mask"):
        L.ld_dpo_logps(token_logps, mask[:, :-1], 0.5)
    with pytest.raises(ValueError, match="token_log_sum_sq_probs"):
        L.wpo_weights(token_logps, token_logps[:, :-1], mask)
    with pytest.raises(ValueError, match="seq_weights"):
        L.wpo_pair_weights(torch.ones(5))


def test_listwise_errors():
    with pytest.raises(ValueError, match="policy_logps"):
        L.listwise_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="ref_logps"):
        L.listwise_loss(torch.zeros(3, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="policy_logps"):
        L.listwise_loss(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        L.listwise_loss(torch.zeros(3, 2), torch.zeros(3, 2), beta=0)


def test_kto_errors():
    pol = torch.zeros(4, dtype=torch.float64)
    good = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="desirable"):
        L.kto_loss(pol, pol, pol, pol, good[:3])
    with pytest.raises(TypeError, match="desirable"):
        L.kto_loss(pol, pol, pol, pol, good.long())
    with pytest.raises(ValueError, match="loss_type"):
        L.kto_loss(pol, pol, pol, pol, good, loss_type="bco")
    with pytest.raises(ValueError, match="policy_kl_logps"):
        L.kto_loss(pol, pol, None, None, good)
    with pytest.raises(ValueError, match="ref_kl_logps"):
        L.kto_loss(pol, pol, pol, pol[:2], good)
    with pytest.raises(ValueError, match="ref_logps"):
        L.kto_loss(pol, pol[:3], pol, pol, good)
    with pytest.raises(ValueError, match="beta"):
        L.kto_loss(pol, pol, pol, pol, good, beta=-1.0)


def test_public_names():
    assert L.LOSS_TYPES == (
        "sigmoid", "robust", "exo_pair", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "orpo",
    )  # fmt: skip
    assert L.F_DIVERGENCES == ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orpo_near_zero_log_probs(dtype):
    # An average log-prob a ≈ 0 makes 1 − eᵃ cancel; log(−expm1(a)) keeps full precision there.
    data = cast(make_pairs(3), dtype)
    # Pairs of near-zero averages keep log_odds O(1), where an error in log(1 − eᵃ) shows.
    data["chosen"] = torch.tensor([-1e-9, -1e-5, -0.3], dtype=dtype) * data["chosen_lengths"]
    data["rejected"] = torch.tensor([-2e-9, -3e-5, -2.0], dtype=dtype) * data["rejected_lengths"]
    out = call(data, loss_type="orpo", beta=1.0)
    c, r = floats(data["chosen"]), floats(data["rejected"])
    lc, lr = floats(data["chosen_lengths"]), floats(data["rejected_lengths"])
    nll = -sum(c) / sum(lc)
    total = 0.0
    for i in range(3):
        ac, ar = c[i] / lc[i], r[i] / lr[i]
        log_odds = (ac - ar) - (math.log(-math.expm1(ac)) - math.log(-math.expm1(ar)))
        total += nll - logsig(log_odds)
    tol = FP64_TOL if dtype == torch.float64 else dict(rtol=FP32_RTOL, atol=FP32_ATOL)
    torch.testing.assert_close(out.loss.item(), total / 3, **tol)


def test_label_smoothing_types_limit_where_epsilon_applies():
    """TRL 1.16's convention: ε for robust only, sigmoid and hinge ignore it (no error, no smoothing)."""
    data = make_pairs()
    opts = dict(loss_type=["sigmoid", "robust", "hinge"], loss_weights=[1.0, 0.5, 0.25])
    out = call(data, label_smoothing=0.2, label_smoothing_types=["robust"], **opts)
    expected = (
        expected_loss(data, loss_type=["sigmoid"])
        + 0.5 * expected_loss(data, loss_type=["robust"], label_smoothing=0.2)
        + 0.25 * expected_loss(data, loss_type=["hinge"])
    )
    torch.testing.assert_close(out.loss.item(), expected, **FP64_TOL)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):  # the listed types are still checked
        call(data, label_smoothing=0.7, label_smoothing_types=["robust"], **opts)
    with pytest.raises(ValueError, match="label_smoothing_types must be a list of loss types"):
        call(data, label_smoothing=0.2, label_smoothing_types="robust", **opts)
