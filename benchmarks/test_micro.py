"""pytest-benchmark micro-benchmarks of the kernels: ``pytest benchmarks/ --benchmark-only``.

One forward + backward per round, every provider of the harness that can run here (the same registry,
inputs and correctness contract as ``python -m benchmarks``), at small shapes so a full run takes about
a minute on a 2-core CPU. Compare runs with pytest-benchmark's ``--benchmark-autosave`` /
``--benchmark-compare``. Each benchmark first checks its provider against the reference.
"""

import pytest
import torch

from benchmarks import measure, providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {
    "logits": measure.Case("logits", "fp32", n=4, t=256, v=8192, h=0, prompt_frac=0.25),
    "lm_head": measure.Case("lm_head", "fp32", n=4, t=128, v=8192, h=256, prompt_frac=0.25),
}


def _params():
    out = []
    for p in providers.registry():
        why = p.available(DEVICE)
        marks = [pytest.mark.skip(reason=why)] if why else []
        out.append(pytest.param(p.workload, p.name, id=f"{p.workload}-{p.name}", marks=marks))
    return out


@pytest.fixture(scope="module")
def inputs():
    return {w: measure.Inputs(c, DEVICE) for w, c in CASES.items()}


@pytest.mark.parametrize("workload,name", _params())
def test_fwd_bwd(benchmark, inputs, workload, name):
    x = inputs[workload]
    fns = {"reference": providers.get(workload, "reference").build(), name: providers.get(workload, name).build()}
    result = measure.check(fns, x)[name]
    assert result["ok"], result
    fn = fns[name]
    benchmark.group = CASES[workload].label()
    benchmark.extra_info["max_rel_err"] = result["max_err"]

    def setup():
        x.restore()  # the in-place variant overwrites the logits; not timed
        return (), {}

    benchmark.pedantic(lambda: measure.forward_backward(fn, x), setup=setup, rounds=5, warmup_rounds=1)
