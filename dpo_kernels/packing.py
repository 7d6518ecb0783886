"""Padding-free packed batches: every sequence of a batch concatenated into one row.

A packed batch is logits (1, total, V) or hidden states (1, total, H) with labels (1, total), and the
sequence boundaries as flash-attention's ``cu_seqlens`` ((S + 1,) sequence starts, 0 first and
``total`` last) or as Hugging Face ``position_ids`` ((1, total), restarting at 0 for each sequence).
Sequences 0..B-1 are the chosen and B..2B-1 the rejected ones, as in the padded layout.

The kernels need nothing new: with the shift, the label each position predicts is moved by one inside
its own sequence, and the last position of a sequence predicts nothing (``shifted_labels``), so one
kernel pass over the packed row with ``shift=False`` gives every per-token output; ``unpack`` then lays
those (1, total) outputs out as (S, L) rows, L the longest sequence, so that the padded layout's
per-sequence reductions, losses and metrics apply unchanged.

Checking the boundaries reads them on the host: one small device-to-host copy of ``cu_seqlens`` (or of
the sequence starts found in ``position_ids``) per call, which also gives L.
"""

from typing import NamedTuple

import torch


class Packing(NamedTuple):
    cu_seqlens: torch.Tensor  # (S + 1,) int64 on the labels' device
    lengths: torch.Tensor  # (S,) int64 on the labels' device
    max_length: int  # L, the longest sequence
    bounds: tuple  # the same starts as Python ints, for loops over sequences


def wanted(cu_seqlens, position_ids) -> bool:
    return cu_seqlens is not None or position_ids is not None


def resolve(labels: torch.Tensor, cu_seqlens=None, position_ids=None, *, tokens_name: str = "logits") -> Packing:
    """Check a packed batch's boundaries (given as either or both conventions) and return them."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[0] != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"a packed batch (cu_seqlens= or position_ids=) has one row: {tokens_name} (1, total, ...) and "
            f"labels (1, total); got labels of shape {shape}"
        )
    total = labels.shape[1]
    from_positions = None if position_ids is None else _starts_from_positions(position_ids, labels)
    if cu_seqlens is None:
        bounds = from_positions + [total]
    else:
        bounds = _check_cu_seqlens(cu_seqlens, labels, total)
        if from_positions is not None and from_positions + [total] != bounds:
            raise ValueError(
                f"cu_seqlens {bounds} and position_ids (sequences starting at {from_positions}) disagree; "
                "give one of them, or both describing the same sequences"
            )
    cu = torch.tensor(bounds, dtype=torch.int64, device=labels.device)
    lengths = cu.diff()
    max_length = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return Packing(cu, lengths, max_length, tuple(bounds))


def _check_cu_seqlens(cu_seqlens, labels: torch.Tensor, total: int) -> list:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64 sequence starts, got {cu_seqlens.dtype}")
    if cu_seqlens.device != labels.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but labels are on {labels.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (S + 1,) with S >= 1, got {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]} (cu_seqlens = {bounds})")
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequence), got {bounds}")
    if bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must end at total = {total} (the packed length of labels), got {bounds[-1]} "
            f"(cu_seqlens = {bounds})"
        )
    return bounds


def _starts_from_positions(position_ids, labels: torch.Tensor) -> list:
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"position_ids must be int32 or int64, got {position_ids.dtype}")
    if position_ids.device != labels.device:
        raise ValueError(f"position_ids are on {position_ids.device} but labels are on {labels.device}")
    if tuple(position_ids.shape) != tuple(labels.shape):
        raise ValueError(
            f"position_ids must have the labels' shape {tuple(labels.shape)} (1, total), got {tuple(position_ids.shape)}"
        )
    pos = position_ids[0].long()
    if pos.numel() == 0:
        raise ValueError("position_ids describe no sequence: the packed batch is empty")
    # every position either starts a sequence (0) or follows its predecessor (previous + 1)
    broken = torch.cat([pos[:1] != 0, (pos[1:] != 0) & (pos[1:] != pos[:-1] + 1)])
    bad = broken.nonzero().flatten()[:1].tolist()
    if bad:
        p = bad[0]
        before = "the row start" if p == 0 else f"{int(pos[p - 1])} at position {p - 1}"
        raise ValueError(
            f"position_ids must restart at 0 for each sequence and count up by 1 inside it; position {p} holds "
            f"{int(pos[p])} after {before}"
        )
    return (pos == 0).nonzero().flatten().tolist()


def shifted_labels(labels: torch.Tensor, packing: Packing, ignore_index: int, shift: bool) -> torch.Tensor:
    """(1, total) labels for one kernel pass with ``shift=False``: with ``shift``, position p gets the
    label of p + 1 inside its sequence, and the last position of each sequence gets ``ignore_index``
    (it must never predict the first token of the next sequence)."""
    if not shift:
        return labels
    out = labels.new_full(labels.shape, ignore_index)
    out[:, :-1] = labels[:, 1:]
    out[0, packing.cu_seqlens[1:] - 1] = ignore_index
    return out


def unpack(tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(1, total, ...) per-token values -> (S, L, ...), each sequence's values at its row's start and
    zeros past its length (as the padded layout holds for unscored tokens)."""
    column = torch.arange(packing.max_length, device=tokens.device)
    valid = column < packing.lengths.unsqueeze(1)
    index = (packing.cu_seqlens[:-1].unsqueeze(1) + column).clamp(max=max(tokens.shape[1] - 1, 0))
    rows = tokens[0][index]
    valid = valid.reshape(*valid.shape, *([1] * (rows.dim() - 2)))
    return torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def kernel_labels(labels: torch.Tensor, pk, ignore_index: int, shift: bool):
    """(labels, shift) for the kernels: a padded batch's as given, a packed one's moved by
    :func:`shifted_labels` and scored without a shift."""
    return (labels, shift) if pk is None else (shifted_labels(labels, pk, ignore_index, shift), False)


def layout(tokens: torch.Tensor, pk) -> torch.Tensor:
    """Per-token kernel outputs in the padded layout: as they are, or :func:`unpack`-ed."""
    return tokens if pk is None else unpack(tokens, pk)


def scored(labels: torch.Tensor, shift: bool, pk, ignore_index: int) -> torch.Tensor:
    """The scored-token mask, in :func:`layout`'s layout, of the kernels' (labels, shift)."""
    return layout(labels[:, int(shift) :] != ignore_index, pk)
