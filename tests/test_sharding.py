"""The vocabulary-parallel combine on simulated shards, in one process: each slice of the vocabulary scored by
the ops with its window, the partials stacked as the all-gather would stack them, ``sharding.combine`` against
the one-device op, and each slice's backward with the combined lse against the one-device gradient. The
collectives themselves run once, for real, in tests/test_distributed.py."""

import pytest
import torch

from conftest import BACKENDS, make_batch
from dpo_kernels import ops, reference, sharding
from dpo_kernels.ops import native

SPLITS = [(0, 13), (13, 13), (13, 40), (40, 41)]  # uneven, one empty, one a single column
V = SPLITS[-1][1]
SUM, ENTROPY, TOP1, LSE2 = range(4)


def _backend(name, device):
    if name == "native" and not native.has_kernel(device.type):
        pytest.skip("dpo_kernels._C is not built")
    return name


def _stacked(score, y, scored, with_stats, dtype):
    """The partials of every slice, stacked in vocabulary order as the all-gather stacks them."""
    parts = []
    for start, stop in SPLITS:
        if stop == start:
            parts.append(sharding._empty_partials(y, with_stats, dtype))
        else:
            parts.append(sharding._partials(*score(start, stop), y, scored, start, stop - start))
    return torch.stack(parts)


def _assert_combined(combined, single, scored, with_stats):
    logp, lse, stats = combined
    want_logp, want_lse, want_stats = single
    m = scored.reshape(-1)
    torch.testing.assert_close(logp[m], want_logp.reshape(-1)[m], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ops.lse_value(lse)[m], ops.lse_value(want_lse).reshape(-1)[m], rtol=1e-6, atol=1e-5)
    if with_stats:
        want = want_stats.reshape(-1, 4)[m]
        cols = [SUM, ENTROPY, LSE2]
        torch.testing.assert_close(stats[m][:, cols], want[:, cols], rtol=1e-5, atol=1e-4)
        assert torch.equal(stats[m][:, TOP1], want[:, TOP1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_stats", [False, True])
def test_logits_shards_combine_to_the_whole_vocabulary(backend, with_stats, device):
    backend = _backend(backend, device)
    logits, labels = make_batch(4, 9, V, device=device)
    labels[1, 3], labels[2, 4] = V - 1, 13  # the single-column slice's label; the first of the widest slice
    logits[3, 2, 20] = logits[3, 2].max() + 1  # a maximum whose tie-break spans slices
    logits[3, 2, 5] = logits[3, 2, 20]
    labels[3, 3] = 5
    common = dict(ignore_index=-100, shift=True, backend=backend)
    single = ops.token_logps(logits, labels, with_stats=with_stats, **common)
    y = labels[:, 1:]
    scored = y != -100

    def score(start, stop):
        return ops.token_logps(logits[..., start:stop], labels, with_stats=with_stats, vocab_start=start,
                               vocab_size=0, **common)  # fmt: skip

    combined = sharding.combine(_stacked(score, y, scored, with_stats, torch.float32), with_stats)
    _assert_combined(combined, single, scored, with_stats)
    # each slice's backward, handed the combined lse: the slice's columns of the whole gradient
    g = torch.randn(scored.shape, device=device)
    lse = combined[1].view(*scored.shape, 2)
    whole = ops.token_logps_backward(g, logits, labels, single[1], **common)
    for start, stop in SPLITS:
        if stop > start:
            part = ops.token_logps_backward(g, logits[..., start:stop], labels, lse, vocab_start=start, **common)
            torch.testing.assert_close(part, whole[..., start:stop], rtol=1e-5, atol=1e-6)


def test_special_values_combine_as_on_one_device(device):
    """NaN anywhere in a scored row makes it NaN, in whichever slice it lies; +inf too; a slice all at
    -inf (banned tokens) adds no mass."""
    logits, labels = make_batch(3, 5, V, device=device)
    logits[0, 1, 30] = float("nan")
    logits[1, 2, 2] = float("inf")
    logits[2, 3, 13:40] = -float("inf")
    labels[2, 4] = 3
    labels[0, 2], labels[1, 3] = 1, 20
    common = dict(ignore_index=-100, shift=True, backend="torch")
    single = ops.token_logps(logits, labels, **common)
    y, scored = labels[:, 1:], labels[:, 1:] != -100

    def score(start, stop):
        return ops.token_logps(logits[..., start:stop], labels, vocab_start=start, vocab_size=0, **common)

    logp, _, _ = sharding.combine(_stacked(score, y, scored, False, torch.float32), False)
    want = single[0].reshape(-1)
    m = scored.reshape(-1)
    assert torch.equal(logp[m].isnan(), want[m].isnan()) and logp[m].isnan().sum() == 2
    finite = m & ~want.isnan()
    torch.testing.assert_close(logp[finite], want[finite], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_shards_combine_to_the_whole_head(backend, device):
    N, T, H = 3, 6, 16
    hidden = torch.randn(N, T, H, device=device)
    weight, bias = torch.randn(V, H, device=device) * 0.5, torch.randn(V, device=device)
    _, labels = make_batch(N, T, V, device=device)
    common = dict(ignore_index=-100, shift=True, logit_scale=0.7, softcap=4.0, temperature=1.3, chunk_elements=0,
                  backend=backend)  # fmt: skip
    single = ops.linear_token_logps(hidden, weight, bias, labels, with_stats=True, **common)
    y, scored = labels[:, 1:], labels[:, 1:] != -100

    def score(start, stop):
        return ops.linear_token_logps(hidden, weight[start:stop], bias[start:stop], labels, with_stats=True,
                                      vocab_start=start, vocab_size=0, **common)  # fmt: skip

    combined = sharding.combine(_stacked(score, y, scored, True, torch.float32), True)
    _assert_combined(combined, single, scored, True)
    g = torch.randn(scored.shape, device=device)
    lse = combined[1].view(*scored.shape, 2)
    d_hidden, d_weight, d_bias = ops.linear_token_logps_backward(g, hidden, weight, bias, labels, single[1], **common)
    summed = torch.zeros_like(hidden)
    for start, stop in SPLITS:
        if stop > start:
            dh, dw, db = ops.linear_token_logps_backward(g, hidden, weight[start:stop], bias[start:stop], labels, lse,
                                                         vocab_start=start, **common)  # fmt: skip
            summed += dh
            torch.testing.assert_close(dw, d_weight[start:stop], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(db, d_bias[start:stop], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(summed, d_hidden, rtol=1e-5, atol=1e-5)
    z = reference.lm_head_logits(hidden, weight, bias, logit_scale=0.7, softcap=4.0, temperature=1.3)
    torch.testing.assert_close(single[0], reference.token_logps(z, labels), rtol=1e-5, atol=1e-5)
