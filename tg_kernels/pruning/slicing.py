"""The slicing recipe: which entries of which tensors a set of kept channels keeps.

One source of truth for :func:`~tg_kernels.export` (applied once, to a copy) and for compact
execution (applied every forward, differentiably, to the full-size parameters): for each tensor the
analysis lists (a :class:`~tg_kernels.pruning.analysis.Slice`: producer rows, norm statistics,
consumer columns, per-channel parameters) and each of its sliced dims, the indices of the entries
that stay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tg_kernels.pruning.analysis.types import SizeAttr
from tg_kernels.pruning.attach import GateBank


def kept_channels(open_mask: Tensor, round_to: int = 1) -> Tensor:
    """Indices of the channels to keep: the open ones, padded with closed ones up to a multiple of round_to.

    At least one channel is kept, so that no layer ends up with zero channels (the kept closed
    channels output zeros: their gate values are folded in).
    """
    open_idx = torch.nonzero(open_mask).flatten()
    size = open_mask.numel()
    target = min(size, max(1, math.ceil(open_idx.numel() / round_to) * round_to))
    if open_idx.numel() >= target:
        return open_idx
    closed_idx = torch.nonzero(~open_mask).flatten()[: target - open_idx.numel()]
    return torch.sort(torch.cat([open_idx, closed_idx])).values


def tensor_of(model: nn.Module, target: str, modules: Mapping[str, nn.Module] | None = None) -> Tensor:
    """The parameter or buffer named ``target`` (a dotted name); ``modules``: ``dict(model.named_modules())``,
    where the caller looks up many (``get_submodule`` walks the dotted path each time)."""
    owner_name, _, attr = target.rpartition(".")
    owner = modules[owner_name] if modules is not None else model.get_submodule(owner_name)
    tensor = owner._parameters.get(attr)
    if tensor is None:
        tensor = owner._buffers[attr]
    return tensor


def kept_entries(model: nn.Module, bank: GateBank, kept: Mapping[str, Tensor]) -> dict[tuple[str, int], Tensor]:
    """For each ``(tensor name, dim)`` that loses entries, the sorted indices of the entries kept.

    ``kept`` maps each gate group key to the indices of its kept channels (sorted). A channel ``c`` of
    a slice covers entries ``(offset + c) * repeat + r`` for ``r < repeat`` (and, for a tiled slice,
    the same in each of its ``tile`` copies, ``period`` channels apart: head dims in every head). An
    entry stays only where every slice over it keeps it (a head's entry ``h * D + d`` needs head ``h``
    and head dim ``d``). Tensors and dims that keep every entry are left out.
    """
    assert bank.analysis is not None
    masks: dict[tuple[str, int], Tensor] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for group in bank.analysis.groups:
        keep = kept[bank.key_of_space[group.space]]
        if keep.numel() == group.size:
            continue
        removed = torch.ones(group.size, dtype=torch.bool, device=keep.device)
        removed[keep] = False
        removed_idx = torch.nonzero(removed).flatten()
        for sl in group.slices:
            key = (sl.target, sl.dim)
            if key not in masks:
                tensor = tensor_of(model, sl.target, modules)
                masks[key] = torch.ones(tensor.shape[sl.dim], dtype=torch.bool, device=keep.device)
            start = sl.offset + removed_idx
            if sl.tile > 1:
                copies = torch.arange(sl.tile, device=keep.device) * (sl.period or group.size)
                start = (copies[:, None] + start[None, :]).flatten()
            entries = start[:, None] * sl.repeat + torch.arange(sl.repeat, device=keep.device)
            masks[key][entries.flatten()] = False
    return {key: torch.nonzero(mask).flatten() for key, mask in masks.items()}


def kept_size(bank: GateBank, sa: SizeAttr, kept: Mapping[str, Tensor]) -> int:
    """The kept value of a size attribute (:class:`~tg_kernels.pruning.analysis.types.SizeAttr`)."""

    def count(parts) -> int:
        return sum(kept[key].numel() if key is not None else size for key, size in bank.parts(parts))

    if sa.dims:
        return count(sa.parts) * (sa.repeat // sum(size for _, size in sa.dims)) * count(sa.dims)
    return count(sa.parts) * sa.repeat


__all__ = ["kept_channels", "kept_entries", "kept_size", "tensor_of"]
