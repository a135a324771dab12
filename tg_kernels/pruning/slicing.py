"""The slicing recipe: which entries of which tensors a set of kept channels keeps.

One source of truth for :func:`~tg_kernels.export` (applied once, to a copy) and for compact
execution (applied every forward, differentiably, to the full-size parameters): for each tensor the
analysis lists (a :class:`~tg_kernels.pruning.analysis.Slice`: producer rows, norm statistics,
consumer columns, per-channel parameters) and each of its sliced dims, the indices of the entries
that stay. After slicing, :func:`sync_module_attributes` makes a module's size attributes
(``out_channels``, ``num_features``, ...) agree with its tensors, again for both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tg_kernels.nn import PrunableMultiheadAttention
from tg_kernels.pruning.analysis.types import SizeAttr
from tg_kernels.pruning.bank import GateBank


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


def size_values(bank: GateBank, model: nn.Module, kept: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """module name -> {attribute: its kept value} for every size attribute of the analysis; a list
    attribute (``self.splits``) gets each of its entries' kept sizes, in the attribute's own type."""
    values: dict[str, dict[str, Any]] = {}
    for sa in bank.analysis.size_attrs:
        attrs = values.setdefault(sa.module, {})
        if sa.index is None:
            attrs[sa.attr] = kept_size(bank, sa, kept)
            continue
        original = getattr(model.get_submodule(sa.module), sa.attr)
        entries = list(attrs.get(sa.attr, original))
        entries[sa.index] = kept_size(bank, sa, kept)
        attrs[sa.attr] = type(original)(entries)
    return values


def sync_module_attributes(module: nn.Module, was_depthwise: bool = False) -> None:
    """Make a module's size attributes agree with its tensors after channels were removed."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        module.out_channels = module.weight.shape[0]
        if was_depthwise:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):  # transposed: weight is (in, out / groups, *kernel)
        module.in_channels = module.weight.shape[0]
        module.out_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        stats = module.weight if module.weight is not None else module.running_mean
        if stats is not None:
            module.num_features = stats.shape[0]
    elif isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        if getattr(module, "weight", None) is not None and len(module.normalized_shape) == 1:
            module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.GroupNorm):
        if module.weight is not None:
            module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.RNNBase):  # LSTM, GRU, RNN; _flat_weights: refreshed by export (or by the forward)
        module.input_size = module.weight_ih_l0.shape[1]
        proj = getattr(module, "proj_size", 0)
        module.hidden_size = module.weight_hr_l0.shape[1] if proj > 0 else module.weight_hh_l0.shape[1]
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # Hugging Face's transposed Linear
        module.nf = module.weight.shape[1]
    elif isinstance(module, PrunableMultiheadAttention):  # embed_dim, kdim, vdim, out_dim, num_heads
        module.sync_sizes()


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise conv (one group per channel): its input channels follow its outputs."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


__all__ = ["is_depthwise", "kept_channels", "kept_entries", "kept_size", "sync_module_attributes", "tensor_of"]
