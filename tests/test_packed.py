"""Padding-free packed batches (cu_seqlens / position_ids) equal the padded layout they came from:
values and gradients on every backend, the reference included; bad packing is refused clearly."""

import pytest
import torch

from conftest import BACKENDS, assert_fp32_close, make_batch
from dpo_kernels import fused_dpo_loss, fused_linear_dpo_loss, fused_linear_sequence_logps, reference, sequence_logps

LENGTHS = [5, 3, 7, 1, 6, 4]  # 3 pairs: chosen 5, 3, 7; rejected 1, 6, 4 (a one-token sequence scores nothing)


def pack(padded, lengths):
    """(S, L, ...) right-padded rows -> (1, total, ...) with the padding dropped."""
    return torch.cat([row[:n] for row, n in zip(padded, lengths)]).unsqueeze(0)


def packed_batch(device, lengths=LENGTHS, v=123, dtype=torch.float32, prompt=0.0):
    """Padded logits/labels (labels -100 past each length) and their packed form with its boundaries.

    ``prompt=0``: the first label of most sequences is scored, so a shift across a boundary would be seen."""
    logits, labels = make_batch(len(lengths), max(lengths), v, dtype=dtype, prompt=prompt, device=device)
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    return logits, labels, pack(logits, lengths), pack(labels, lengths), cu, positions


def grads_of(fn, leaf_data, *args, **kwargs):
    leaf = leaf_data.detach().clone().requires_grad_()
    out = fn(leaf, *args, **kwargs)
    value = out[0] if isinstance(out, tuple) else out
    (value.sum() if value.dim() else value).backward()
    return out, leaf.grad


@pytest.mark.parametrize("boundaries", ["cu_seqlens", "position_ids", "both"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps_packed_equals_padded(device, backend, average, boundaries):
    logits, labels, p_logits, p_labels, cu, positions = packed_batch(device)
    kw = {"cu_seqlens": cu} if boundaries == "cu_seqlens" else {"position_ids": positions}
    if boundaries == "both":
        kw["cu_seqlens"] = cu.long()
    padded, padded_grad = grads_of(sequence_logps, logits, labels, backend=backend, average=average)
    packed, packed_grad = grads_of(sequence_logps, p_logits, p_labels, backend=backend, average=average, **kw)
    assert packed.shape == (len(LENGTHS),)
    assert_fp32_close(packed, padded)
    assert_fp32_close(packed_grad, pack(padded_grad, LENGTHS))
    assert_fp32_close(reference.sequence_logps(p_logits, p_labels, average=average, **kw), padded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_never_crosses_a_sequence_boundary(device, backend):
    """The last position of a sequence predicts nothing: changing its logits changes nothing, nor does
    the next sequence's first label."""
    _, _, p_logits, p_labels, cu, _ = packed_batch(device)
    base = sequence_logps(p_logits, p_labels, cu_seqlens=cu, backend=backend)
    ends = cu[1:-1].long() - 1
    changed_logits = p_logits.clone()
    changed_logits[0, ends] = torch.randn_like(changed_logits[0, ends]) * 10
    changed_labels = p_labels.clone()
    changed_labels[0, cu[1:-1].long()] = (p_labels[0, cu[1:-1].long()] + 1) % p_logits.shape[-1]
    assert torch.equal(sequence_logps(changed_logits, p_labels, cu_seqlens=cu, backend=backend), base)
    assert torch.equal(sequence_logps(p_logits, changed_labels, cu_seqlens=cu, backend=backend), base)
    _, grad = grads_of(sequence_logps, p_logits, p_labels, cu_seqlens=cu, backend=backend)
    assert (grad[0, cu[1:].long() - 1] == 0).all()


@pytest.mark.parametrize("ref_mode", ["logits", "logps", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_loss_packed_equals_padded(device, backend, ref_mode):
    logits, labels, p_logits, p_labels, cu, positions = packed_batch(device)
    ref_padded = ref_packed = None
    if ref_mode == "logits":
        ref_padded = torch.randn_like(logits) * 3
        ref_packed = pack(ref_padded, LENGTHS)
    elif ref_mode == "logps":
        ref_padded = ref_packed = -torch.rand(len(LENGTHS), device=device) * 20
    opts = dict(beta=0.3, backend=backend, use_weighting=True, rpo_alpha=0.5)
    (loss, metrics), grad = grads_of(fused_dpo_loss, logits, ref_padded, labels, **opts)
    for kw in ({"cu_seqlens": cu}, {"position_ids": positions}):
        (p_loss, p_metrics), p_grad = grads_of(fused_dpo_loss, p_logits, ref_packed, p_labels, **opts, **kw)
        assert_fp32_close(p_loss, loss)
        assert p_metrics.keys() == metrics.keys()
        for name in metrics:
            assert_fp32_close(p_metrics[name], metrics[name])
        assert_fp32_close(p_grad, pack(grad, LENGTHS))
    opts.pop("backend")
    (r_loss, r_metrics), r_grad = grads_of(reference.dpo_loss, p_logits, ref_packed, p_labels, **opts, cu_seqlens=cu)
    assert_fp32_close(r_loss, loss)
    assert_fp32_close(r_grad, pack(grad, LENGTHS))


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_options_packed(device, loss_type):
    logits, labels, p_logits, p_labels, cu, _ = packed_batch(device)
    kw = dict(loss_type=loss_type, backend="torch")
    loss, _ = fused_dpo_loss(logits, None, labels, **kw)
    assert_fp32_close(fused_dpo_loss(p_logits, None, p_labels, cu_seqlens=cu, **kw)[0], loss)
    loss, _ = fused_dpo_loss(logits, None, labels, ld_alpha=0.4, backend="torch")
    assert_fp32_close(fused_dpo_loss(p_logits, None, p_labels, cu_seqlens=cu, ld_alpha=0.4, backend="torch")[0], loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_packed_equals_padded(device, backend):
    h, v = 16, 50
    _, labels, _, p_labels, cu, positions = packed_batch(device, v=v)
    hidden = torch.randn(len(LENGTHS), max(LENGTHS), h, device=device)
    weight = torch.randn(v, h, device=device) / 4
    p_hidden = pack(hidden, LENGTHS)
    padded, grad = grads_of(fused_linear_sequence_logps, hidden, weight, labels, backend=backend)
    packed, p_grad = grads_of(fused_linear_sequence_logps, p_hidden, weight, p_labels, cu_seqlens=cu, backend=backend)
    assert_fp32_close(packed, padded)
    assert_fp32_close(p_grad, pack(grad, LENGTHS))

    ref_hidden = torch.randn_like(hidden)
    kw = dict(backend=backend, beta=0.2)
    (loss, metrics), grad = grads_of(fused_linear_dpo_loss, hidden, weight, labels, ref_hidden=ref_hidden, **kw)
    (p_loss, p_metrics), p_grad = grads_of(
        fused_linear_dpo_loss, p_hidden, weight, p_labels, ref_hidden=pack(ref_hidden, LENGTHS), position_ids=positions,
        **kw,
    )  # fmt: skip
    assert_fp32_close(p_loss, loss)
    for name in metrics:
        assert_fp32_close(p_metrics[name], metrics[name])
    assert_fp32_close(p_grad, pack(grad, LENGTHS))


def bad_packing_cases(device):
    _, _, logits, labels, cu, positions = packed_batch(device)
    total = labels.shape[1]
    restart = positions.clone()
    restart[0, 2] = 7
    return {
        "cu_not_from_0": (dict(cu_seqlens=cu + 1), ValueError, "cu_seqlens must start at 0"),
        "cu_not_increasing": (dict(cu_seqlens=cu[[0, 2, 1, 3, 4, 5, 6]]), ValueError, "cu_seqlens must be strictly increasing"),
        "cu_empty_sequence": (dict(cu_seqlens=cu[[0, 1, 1, 2, 3, 4, 5, 6]]), ValueError, "strictly increasing"),
        "cu_not_total": (dict(cu_seqlens=cu[:-1]), ValueError, rf"cu_seqlens must end at total = {total}"),
        "cu_float": (dict(cu_seqlens=cu.float()), TypeError, "cu_seqlens must be int32 or int64"),
        "cu_2d": (dict(cu_seqlens=cu.unsqueeze(0)), ValueError, r"cu_seqlens must have shape \(S \+ 1,\)"),
        "cu_device": (dict(cu_seqlens=cu.to("meta")), ValueError, "cu_seqlens is on meta"),
        "positions_inconsistent": (dict(position_ids=restart), ValueError, "position_ids must restart at 0.*position 2 holds 7"),
        "positions_shape": (dict(position_ids=positions[:, :-1]), ValueError, "position_ids must have the labels' shape"),
        "positions_float": (dict(position_ids=positions.float()), TypeError, "position_ids must be int32 or int64"),
        "disagree": (dict(cu_seqlens=cu, position_ids=torch.arange(total, device=device).unsqueeze(0)), ValueError, "disagree"),
        "odd_sequences": (dict(cu_seqlens=cu[[0, 1, 2, 6]]), ValueError, "packed batch.*must hold 2B sequences.*odd"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(bad_packing_cases("cpu")))
def test_bad_packing_is_refused(device, case):
    _, _, logits, labels, _, _ = packed_batch(device)
    kwargs, error, message = bad_packing_cases(device)[case]
    with pytest.raises(error, match=message):
        fused_dpo_loss(logits, None, labels, backend="torch", **kwargs)
    if case != "odd_sequences":  # sequence_logps takes any number of sequences
        with pytest.raises(error, match=message):
            sequence_logps(logits, labels, backend="torch", **kwargs)


def test_packed_batch_must_be_one_row(device):
    logits, labels, _, _, cu, _ = packed_batch(device)
    with pytest.raises(ValueError, match=r"a packed batch .* has one row"):
        sequence_logps(logits, labels, cu_seqlens=cu, backend="torch")


def test_precomputed_reference_must_have_one_value_per_sequence(device):
    _, _, logits, labels, cu, _ = packed_batch(device)
    with pytest.raises(ValueError, match=r"must have shape \(6,\)"):
        fused_dpo_loss(logits, torch.zeros(4, device=device), labels, cu_seqlens=cu, backend="torch")
