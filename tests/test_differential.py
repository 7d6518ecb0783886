"""Randomized differential test of sequence_logps: every backend against the fp64 reference.

A seeded list of small cases, each drawn over: the shape (V off every block size, 1..300 and a few next
to the kernels' block sizes; T from 1), the logits dtype, the label dtype, the layout of the logits
(contiguous, a vocabulary slice, a time slice, a transposed batch, every other sequence, an expand), the
mask (none, random, all), shift and average, and special values (NaN, ±inf, an all -inf row). Each case
runs on every backend; the per-sequence values and the gradient w.r.t. the logits are held to
- fp32: error from the fp64 truth at most max(2 × the fp32 reference's own error, 1e-5);
- bf16/fp16: values as fp32 (they are fp32 sums of exactly upcast inputs); gradients by the same-dtype
  rule of conftest.assert_low_precision_grad;
- special values: NaN exactly where the reference has NaN (values, and gradient rows of scored tokens),
  the rest as above; unscored rows' gradients exact zeros whatever their logits hold.

This is the suite's small-shape grid of sequence_logps (T = 1 and 2, V off the block sizes, every layout, shift
and average): tests/test_sequence_logps.py keeps the larger shapes and the layouts with a strided vocabulary,
tests/test_special_values.py the special values placed by hand past the first tile.
"""

import random

import pytest
import torch

from conftest import BACKENDS, DTYPES, LOW_PRECISION_ULPS
from dpo_kernels import reference, sequence_logps
from dpo_kernels.ops import native

N_CASES = 80  # each on every backend; test_the_cases_cover_the_space holds what they must span
SEED = 1234
LAYOUTS = ("contiguous", "vocab_slice", "time_slice", "transposed", "every_other", "expanded")
# Next to the kernels' block sizes: Triton's 1024 / 4096 tiles, the CPU kernel's vectors and 4096 tile.
EDGE_V = (1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1023, 1025, 4095, 4097)


def draw(index):
    rng = random.Random(SEED * 1000 + index)
    v = rng.choice(EDGE_V) if rng.random() < 0.15 else rng.randint(1, 300)
    # Few rows: the Triton interpreter runs a program per row.
    t = rng.choice((1, 2, 3)) if v > 1000 else rng.choice((1, 2, 3, 4, 5))
    return dict(
        n=rng.choice((1, 2, 3)),
        t=t,
        v=v,
        dtype=rng.choice(DTYPES),
        label_dtype=rng.choice((torch.int64, torch.int32)),
        layout=rng.choice(LAYOUTS),
        mask=rng.choice(("none", "random", "random", "all")),
        shift=rng.random() < 0.8,
        average=rng.random() < 0.25,
        special=rng.random() < 0.25,
        scale=rng.choice((1.0, 3.0, 30.0)),
        seed=rng.randrange(2**31),
    )


CASES = [draw(i) for i in range(N_CASES)]


def case_id(case):
    return "{n}x{t}x{v}-{layout}-{mask}".format(**case)


def make(case, device):
    """(logits view, labels): the view is a leaf-free tensor with the case's strides (no copy)."""
    g = torch.Generator().manual_seed(case["seed"])
    n, t, v, layout = case["n"], case["t"], case["v"], case["layout"]
    base_shape = {
        "contiguous": (n, t, v),
        "vocab_slice": (n, t, v + 5),
        "time_slice": (n, t + 2, v),
        "transposed": (t, n, v),
        "every_other": (2 * n, t, v),
        "expanded": (1, t, v),
    }[layout]
    base = torch.randn(base_shape, generator=g) * case["scale"]
    if case["special"] and layout != "expanded":  # an expand would repeat a special row in every sequence
        flat = base.view(-1, base_shape[-1])
        for _ in range(1 + int(torch.randint(0, 3, (1,), generator=g))):
            r = int(torch.randint(0, flat.shape[0], (1,), generator=g))
            c = int(torch.randint(0, flat.shape[1], (1,), generator=g))
            kind = int(torch.randint(0, 4, (1,), generator=g))
            if kind == 3:
                flat[r] = float("-inf")
            else:
                flat[r, c] = (float("nan"), float("inf"), float("-inf"))[kind]
    base = base.to(case["dtype"]).to(device)
    view = {
        "contiguous": lambda x: x,
        "vocab_slice": lambda x: x[..., 2 : 2 + v],
        "time_slice": lambda x: x[:, 1 : 1 + t],
        "transposed": lambda x: x.transpose(0, 1),
        "every_other": lambda x: x[::2],
        "expanded": lambda x: x.expand(n, t, v),
    }[layout](base)
    labels = torch.randint(0, v, (n, t), generator=g)
    if case["mask"] == "all":
        labels[:] = -100
    elif case["mask"] == "random":
        labels[torch.rand(n, t, generator=g) < 0.4] = -100
    return view, labels.to(case["label_dtype"]).to(device)


def run(fn, logits, labels, upstream, **kw):
    x = logits.detach().requires_grad_()  # the case's strides, as a leaf
    out = fn(x, labels, **kw)
    (grad,) = torch.autograd.grad(out, x, upstream.to(out.dtype))
    return out.detach(), grad


def max_err(a, b):
    d = (a.double() - b.double()).abs()
    return d.max().item() if d.numel() else 0.0


def check(backend, case, logits, labels, upstream, truth, ref32):
    kw = dict(shift=case["shift"], average=case["average"])
    out, grad = run(sequence_logps, logits, labels, upstream, backend=backend, **kw)
    (t_out, t_grad), (r_out, r_grad) = truth, ref32
    assert out.dtype == torch.float32 and grad.dtype == logits.dtype and grad.shape == logits.shape
    n, t, _ = logits.shape
    scored = torch.zeros(n, t, dtype=torch.bool, device=labels.device)
    s = int(case["shift"])
    scored[:, : t - s] = labels[:, s:] != -100
    assert (grad[~scored] == 0).all(), "unscored rows must get exact zeros"
    # Values: NaN exactly where the reference has NaN; ±inf where it has ±inf.
    assert torch.equal(out.isnan(), t_out.isnan()), (out, t_out)
    finite = t_out.isfinite()
    assert torch.equal(out[~finite & ~t_out.isnan()], t_out[~finite & ~t_out.isnan()].float())
    tol = max(2 * max_err(r_out[finite], t_out[finite]), 1e-5)
    assert max_err(out[finite], t_out[finite]) <= tol, ("values", max_err(out[finite], t_out[finite]), tol)
    # Gradients of scored rows.
    g, tg, rg = grad[scored], t_grad[scored], r_grad[scored]
    assert torch.equal(g.isnan(), tg.isnan()), "NaN gradient rows must match the reference's"
    ok = ~tg.isnan().any(-1)
    g, tg, rg = g[ok], tg[ok], rg[ok]
    if logits.dtype == torch.float32:
        tol = max(2 * max_err(rg, tg), 1e-5)
        assert max_err(g, tg) <= tol, ("gradient", max_err(g, tg), tol)
    elif g.numel():
        margin = LOW_PRECISION_ULPS * torch.finfo(logits.dtype).eps * tg.abs().max().item()
        assert max_err(g, tg) <= max_err(rg, tg) + margin, ("gradient", max_err(g, tg), max_err(rg, tg), margin)


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{case_id(c)}" for i, c in enumerate(CASES)])
def test_every_backend_against_fp64(case, device):
    logits, labels = make(case, device)
    kw = dict(shift=case["shift"], average=case["average"])
    upstream = torch.randn(logits.shape[0], generator=torch.Generator().manual_seed(case["seed"])).to(device)
    truth = run(reference.sequence_logps, logits.double(), labels, upstream.double(), **kw)
    ref32 = run(reference.sequence_logps, logits, labels, upstream, **kw)
    for backend in BACKENDS:
        if backend == "native" and not native.has_kernel(device.type):
            continue
        check(backend, case, logits, labels, upstream, truth, ref32)


def test_the_cases_cover_the_space():
    """The seeded draw covers every option (so a change of the seed cannot silently drop one)."""
    for key, values in (("layout", LAYOUTS), ("mask", ("none", "random", "all")), ("dtype", DTYPES),
                        ("label_dtype", (torch.int64, torch.int32)), ("special", (False, True))):  # fmt: skip
        assert {c[key] for c in CASES} == set(values), key
    assert {(c["shift"], c["average"]) for c in CASES} == {(s, a) for s in (False, True) for a in (False, True)}
    # tests/test_sequence_logps.py leaves these layouts in 16-bit dtypes to this file
    for layout in ("time_slice", "transposed"):
        assert {c["dtype"] for c in CASES if c["layout"] == layout} == set(DTYPES), layout
    assert {c["t"] for c in CASES} >= {1, 2} and any(c["v"] > 4096 for c in CASES)
    assert any(c["v"] % 16 and c["v"] > 300 for c in CASES)
