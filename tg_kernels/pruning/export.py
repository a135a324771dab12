"""`export`: a plain, physically smaller model; `save` / `load`: files that need no pickled code.

Export copies the gated model, folds every gate value into the module it follows (a producer's
weight rows, a BatchNorm's affine parameters), removes closed channels from every tensor the
analysis listed (producer rows, norm statistics, consumer columns, per-channel parameters),
turns Gated layers back into ``nn.Conv2d`` / ``nn.Linear``, removes the gate hooks and the gates,
and updates module attributes (``out_channels``, ``num_features``, ``hidden_size``, ...) to the new sizes
(an LSTM / GRU's gated rows are scaled by its units' gate values first, as its gate hook does). With
limit-form gates (exactly 0 or 1) the result computes what the gated model computes in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from tg_kernels.nn import (
    GatedConv2d,
    GatedLinear,
    PrunableMultiheadAttention,
    restore_multihead_attention,
    swap_multihead_attention,
)
from tg_kernels.pruning.analysis import GatePoint
from tg_kernels.pruning.bank import (
    BANK_NAME,
    RECURRENT_ROWS,
    AttachedHook,
    GateBank,
    entry_gates,
    gate_bank,
    set_submodule,
    unwrap,
)
from tg_kernels.pruning.slicing import (
    is_depthwise,
    kept_channels,
    kept_entries,
    size_values,
    sync_module_attributes,
    tensor_of,
)

FORMAT = "tg_kernels.exported_model"
FORMAT_VERSION = 1
# On an exported model: the int attributes export set to kept sizes (``analysis.size_attrs``), by module
SIZES_ATTR = "_tg_size_attributes"


def _kept_channels(is_open: Tensor, round_to: int) -> Tensor:
    """Indices of channels to keep: the open ones (``TrainableGate.open_mask()``, the one source of
    truth, which respects ``min_open``), padded with closed ones up to a multiple of round_to. A
    completely closed group (possible only with ``min_open=0``) keeps one channel, folded to zero,
    because PyTorch layers cannot have zero channels."""
    return kept_channels(is_open, round_to)


def kept_open(gate: torch.nn.Module) -> bool:
    """Whether a gate has any open channel."""
    return bool(gate.open_mask().any())


def _scale_along(module: nn.Module, scale: Tensor, dim: int, names: Iterable[str]) -> None:
    """Multiply ``module``'s tensors ``names`` by ``scale`` along ``dim`` (a bias: along its only dim)."""
    for name in names:
        t = getattr(module, name, None)
        if isinstance(t, Tensor):
            d = dim if t.dim() > 1 else 0
            shape = [1] * t.dim()
            shape[d] = -1
            t.data.mul_(scale.to(device=t.device, dtype=t.dtype).view(shape))


def _fold_gate_values(model: nn.Module, bank: GateBank, values: dict[str, Tensor], kept: dict[str, Tensor]) -> None:
    """Scale each gate point's kept channels by their gate values, in the module its point folds into.

    Open limit-form gates are exactly 1 and closed channels are removed, so there is usually nothing
    to do; folding matters for closed channels kept by ``round_to`` (they must output zeros) and for
    paper-form gates (values near but not exactly 0 and 1).
    """
    for point in bank.analysis.gate_points:
        parts = bank.parts(point.parts)
        pieces = [values[key] if key is not None else torch.ones(size) for key, size in parts]
        keep_pieces = [
            torch.isin(torch.arange(size), kept[key]) if key is not None else torch.ones(size, dtype=torch.bool)
            for key, size in parts
        ]
        if point.dims:  # head dims: gate values and kept entries are products of head and dim
            inner = [bank.parts(d) for d in point.dims]
            dim_values = [
                torch.cat([values[k] if k is not None else torch.ones(n) for k, n in d]) if d else None for d in inner
            ]
            dim_keep = [
                torch.cat([torch.isin(torch.arange(n), kept[k]) if k is not None else torch.ones(n, dtype=torch.bool)
                           for k, n in d]) if d else None
                for d in inner
            ]  # fmt: skip
            scale = entry_gates(pieces, dim_values, point.repeat)
            keep = entry_gates(keep_pieces, dim_keep, point.repeat)
            point = dataclasses.replace(point, repeat=1)  # scale and keep are per entry now
        else:
            scale, keep = torch.cat(pieces), torch.cat(keep_pieces)
        if torch.all(scale[keep] == 1):
            continue
        fold = _fold_target(model, point)
        if fold is None:
            raise ValueError(
                f"cannot fold gate values into '{point.module}' ({type(model.get_submodule(point.module)).__name__}): "
                "closed gates there must be exactly 0 and open ones 1 (limit-form gates, gate_M=None)"
            )
        module, dim, names = fold
        size = module.weight.shape[dim]
        if point.repeat != 1 and size == scale.numel() * point.repeat:  # a head's rows share its gate
            scale = scale.repeat_interleave(point.repeat)
        elif size != scale.numel():  # pragma: no cover - the analysis folds only into matching rows
            raise ValueError(f"cannot fold gate values of '{point.module}' into '{point.fold or point.module}'")
        _scale_along(module, scale, dim, names)


def _fold_target(model: nn.Module, point: GatePoint) -> tuple[nn.Module, int, tuple[str, ...]] | None:
    """Where a gate point's values can be multiplied into weights: (module, weight dim, tensors to
    scale), or None where no layer can take them (a block's output past a residual add)."""
    if point.on_input:  # a gate on a layer's input: scale the layer's input columns
        module = model.get_submodule(point.module)
        if isinstance(module, nn.Linear):
            return module, 1, ("weight",)
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
            return module, 0 if module.transposed else 1, ("weight",)
        return None
    module = model.get_submodule(point.fold) if point.fold is not None else None
    if isinstance(module, nn.Linear):
        return module, 0, ("weight", "bias")
    if isinstance(module, nn.modules.conv._ConvNd):
        if not module.transposed:
            return module, 0, ("weight", "bias")
        return (module, 1, ("weight", "bias")) if module.groups == 1 else None
    affine = getattr(module, "weight", None) is not None and getattr(module, "bias", None) is not None
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and affine:
        return module, 0, ("weight", "bias")
    return None


def unpaddable_groups(model: nn.Module, bank: GateBank) -> dict[str, str]:
    """Gate groups whose closed channels an export cannot keep as zeros, with the reason.

    ``round_to`` pads a group with closed channels that must compute zeros in the exported model:
    their gate values (0) are folded into a layer. That is exact only where every gate point of the
    group has a layer to fold into, and where no norm computes statistics over the group (the
    padded channels would count in them).
    """
    reasons: dict[str, str] = {}
    for name, parts in bank.analysis.norms:
        for key, _ in bank.parts(parts):
            if key is not None:
                reasons.setdefault(key, f"'{name}' normalises over it")
    for point in bank.analysis.gate_points:
        if _fold_target(model, point) is None:
            for key, _ in [*bank.parts(point.parts), *(part for d in point.dims for part in bank.parts(d))]:
                if key is not None:
                    reasons.setdefault(key, f"its gate at '{point.module}' has no layer to fold into")
    return reasons


def _fold_recurrent(model: nn.Module, bank: GateBank, values: dict[str, Tensor]) -> None:
    """Scale the gated block's rows of every LSTM / GRU layer by its units' gate values (what
    :class:`~tg_kernels.pruning.bank.RecurrentGateHook` does in each forward), before slicing."""
    for point in bank.analysis.recurrent:
        module = model.get_submodule(point.module)
        gate = values[bank.key_of_space[point.space]]
        ones = torch.ones(point.size)
        scale = torch.cat([ones] * point.block + [gate] + [ones] * (point.blocks - point.block - 1))
        names = [n for n in module._flat_weights_names if n.startswith(RECURRENT_ROWS)]
        _scale_along(module, scale, 0, names)


Aliases = dict[int, tuple[Tensor, list[tuple[nn.Module, str]]]]


def _aliases(model: nn.Module) -> Aliases:
    """Every (module, name) holding each parameter, by the parameter's id (the parameter is kept, so
    that its id stays its own)."""
    found: Aliases = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                found.setdefault(id(p), (p, []))[1].append((module, name))
    return found


def _replace_tensor(model: nn.Module, target: str, new: Tensor, aliases: Aliases | None = None) -> None:
    """Replace a parameter or buffer, and every alias of it (a tied LM head holds the embedding's)."""
    owner_name, _, attr = target.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        param = nn.Parameter(new, requires_grad=old.requires_grad)
        owner._parameters[attr] = param
        held, holders = (aliases or {}).get(id(old), (None, []))
        for module, name in holders if held is old else ():
            module._parameters[name] = param
    elif attr in owner._buffers:
        owner._buffers[attr] = new
    else:  # pragma: no cover - the analysis only lists parameters and buffers
        raise KeyError(target)


def _computed_tensors(value: Any, found: list[Tensor]) -> None:
    """Tensors inside ``value`` (dicts, lists, tuples) that autograd computed (they have a grad_fn)."""
    if isinstance(value, Tensor):
        if value.grad_fn is not None:
            found.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _computed_tensors(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _computed_tensors(v, found)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also where the model caches tensors computed with gradients in plain
    attributes (timm's LeViT keeps its attention biases, computed from a parameter in an eval forward,
    in a dict): ``deepcopy`` refuses such tensors, so the copy holds them detached."""
    found: list[Tensor] = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                _computed_tensors(value, found)
    memo: dict[int, Any] = {id(t): t.detach().clone() for t in found}
    return copy.deepcopy(model, memo)


def _held(model: nn.Module, target: str) -> Tensor | None:
    """The parameter or buffer the model holds now under ``target`` (after earlier replacements)."""
    owner_name, _, attr = target.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner._parameters.get(attr, owner._buffers.get(attr))


def export(model: nn.Module, *, round_to: int = 1) -> nn.Module:
    """A plain copy of a gated model with closed channels physically removed.

    The result contains only the model's own classes and ``torch.nn`` modules (no tg_kernels types,
    hooks or gates), with one exception, opted into with ``attach_gates(prunable_attention=True)``
    and warned about: an ``nn.MultiheadAttention`` whose kept heads do not span its kept input width
    (which that class cannot hold) stays the :class:`~tg_kernels.nn.PrunableMultiheadAttention`
    attach made of it. In eval mode it computes
    what the gated model computes. The gated model is
    left unchanged. ``round_to`` keeps each group's channel count a multiple of it (padding with
    closed channels whose outputs are zeroed), which some hardware runs faster; at least one
    channel per group is kept.
    """
    _check_round_to(round_to)
    exported = _export(model, round_to, in_place=False)
    _warn_about_kept_attention(exported)
    return exported


def _warn_about_kept_attention(exported: nn.Module) -> None:
    """An exported model is plain unless attach_gates(prunable_attention=True) made it otherwise: say so."""
    kept = [name for name, m in exported.named_modules() if isinstance(m, PrunableMultiheadAttention)]
    if kept:
        warnings.warn(
            f"tg_kernels.export: {len(kept)} attention module(s) stay tg_kernels.nn.PrunableMultiheadAttention "
            f"({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''}): their kept heads do not span their kept "
            "width (attach_gates(prunable_attention=True)), which nn.MultiheadAttention cannot hold; loading "
            "the exported model needs tg_kernels",
            stacklevel=3,
        )


def export_in_place(model: nn.Module, *, round_to: int = 1) -> nn.Module:
    """:func:`export` without the copy: ``model`` itself becomes the exported model (and is returned).

    For a model that is a throwaway copy already: attach's self-check exports one this way, which
    saves a second copy of the model.
    """
    _check_round_to(round_to)
    return _export(model, round_to, in_place=True)


def _check_round_to(round_to: int) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")


def _export(model: nn.Module, round_to: int, in_place: bool) -> nn.Module:
    """:func:`export`; ``in_place`` turns ``model`` itself into the exported model."""
    model = unwrap(model)
    gate_bank(model)  # a clear error for a model without gates
    exported = model if in_place else copy_model(model)
    ebank = gate_bank(exported)
    with torch.no_grad():
        values = {key: gate().detach().cpu() for key, gate in ebank.gates.items()}
        if ebank.analysis is not None:
            unpadded = unpaddable_groups(exported, ebank) if round_to > 1 else {}
            kept = {
                key: _kept_channels(gate.open_mask().cpu(), 1 if key in unpadded else round_to)
                for key, gate in ebank.gates.items()
            }
            short = {
                key: why
                for key, why in unpadded.items()
                if key in kept and kept[key].numel() % round_to and kept[key].numel() < ebank.gates[key].num_channels
            }
            if short:
                listed = "; ".join(f"'{key}' ({why})" for key, why in sorted(short.items()))
                warnings.warn(
                    f"tg_kernels.export: round_to={round_to} leaves {len(short)} gate group(s) at their open count, "
                    f"because padding them with closed channels would not be exact: {listed}",
                    stacklevel=3,
                )
            closed = [key for key, gate in ebank.gates.items() if gate.num_channels and not kept_open(gate)]
            if closed:
                warnings.warn(
                    f"tg_kernels.export: gate groups {closed} are completely closed (allowed by min_open=0); the "
                    "model passes no signal through them. Each keeps one zeroed channel (layers cannot have zero "
                    "channels), so the exported FLOPs and parameters are slightly above Budget.ratio()'s",
                    stacklevel=2,
                )
            _fold_gate_values(exported, ebank, values, kept)
            _fold_recurrent(exported, ebank, values)
            depthwise = {name for name, m in exported.named_modules() if is_depthwise(m)}
            aliases = _aliases(exported)
            for (target, dim), entries in kept_entries(exported, ebank, kept).items():
                tensor = tensor_of(exported, target)
                new = tensor.detach().index_select(dim, entries.to(tensor.device))
                _replace_tensor(exported, target, new, aliases)
            for name, module in exported.named_modules():
                sync_module_attributes(module, name in depthwise)
                if isinstance(module, nn.RNNBase):
                    module._init_flat_weights()  # it holds the parameters it had before slicing
            sized = size_values(ebank, exported, kept)  # self.num_heads, self.splits and the like
            for module_name, attrs in sized.items():
                for attr, value in attrs.items():
                    setattr(exported.get_submodule(module_name), attr, value)
            exported.__dict__[SIZES_ATTR] = sized  # for save(): a fresh model needs them too
    # attach swapped nn.MultiheadAttention for PrunableMultiheadAttention: back where the kept heads span
    # the kept width (PyTorch's class can hold only that)
    restore_multihead_attention(exported)
    for name, module in list(exported.named_modules()):
        if isinstance(module, (GatedConv2d, GatedLinear)):
            set_submodule(exported, name, module.to_conv() if isinstance(module, GatedConv2d) else module.to_linear())
    for module in exported.modules():  # every hook attach_gates registered (tg_kernels.pruning.bank)
        for hook_id, hook in list(module._forward_hooks.items()):
            if isinstance(hook, AttachedHook):
                del module._forward_hooks[hook_id]
                module._forward_hooks_always_called.pop(hook_id, None)
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, AttachedHook):
                del module._forward_pre_hooks[hook_id]
    runner = ebank.compact  # compact execution's forward (tg_kernels.pruning.compact), an instance attribute
    if runner is not None and exported.__dict__.get("forward") is runner:
        del exported.__dict__["forward"]
    delattr(exported, BANK_NAME)
    return exported


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


def _module_sizes(model: nn.Module) -> dict[str, dict[str, Any]]:
    sizes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            sizes[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            sizes[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            sizes[name] = {"num_features": m.num_features}
        elif isinstance(m, nn.RNNBase):
            sizes[name] = {"input_size": m.input_size, "hidden_size": m.hidden_size}
        elif isinstance(m, (nn.MultiheadAttention, PrunableMultiheadAttention)):
            names = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim") + (
                ("out_dim",) if isinstance(m, PrunableMultiheadAttention) else ()
            )
            sizes[name] = {attr: getattr(m, attr) for attr in names}
        elif isinstance(m, nn.Transformer):
            sizes[name] = {"d_model": m.d_model}
        elif isinstance(m, nn.LayerNorm):
            sizes[name] = {"normalized_shape": tuple(m.normalized_shape)}
        elif isinstance(m, nn.Embedding):
            sizes[name] = {"embedding_dim": m.embedding_dim}
    return sizes


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save an exported (plain) model's tensors and layer sizes; the file holds no pickled code.

    Load it with :func:`load` into a freshly built model of the same architecture, or inspect it
    with ``torch.load(path, weights_only=True)``.
    """
    if hasattr(model, BANK_NAME):
        raise ValueError("save() stores exported models: call tg_kernels.export(model) first")
    checkpoint = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
        "module_sizes": _module_sizes(model),
        "state_dict": model.state_dict(),
        # tensors a fresh model rebuilds at full size that export may have sliced (a rotary
        # embedding's inv_freq, at its kept head dims): state_dict leaves non-persistent buffers out
        "buffers": {
            f"{name}.{b}" if name else b: m._buffers[b]
            for name, m in model.named_modules()
            for b in sorted(m._non_persistent_buffers_set)
            if m._buffers.get(b) is not None
        },
    }
    for name, attrs in getattr(model, SIZES_ATTR, {}).items():  # self.head_dim and the like
        checkpoint["module_sizes"].setdefault(name, {}).update(attrs)
    torch.save(checkpoint, path)


def _name_of(path: Any) -> str:
    """A path as it reads in a message (an open file or buffer has none)."""
    return repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "the file given"


def load(path: str | os.PathLike, model: nn.Module, *, map_location: Any = None) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, a freshly built (unpruned) model of the same
    architecture: its layers are resized to the saved sizes, then the saved tensors are loaded.

    Returns ``model`` (changed in place). Uses ``torch.load(weights_only=True)``: no code is unpickled.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{_name_of(path)} is not a file written by tg_kernels.save")
    if checkpoint.get("version") != FORMAT_VERSION:
        version = checkpoint.get("version")
        raise ValueError(f"{_name_of(path)} has format version {version}, this tg_kernels reads {FORMAT_VERSION}")
    state: dict[str, Tensor] = checkpoint["state_dict"]
    architecture = f"{type(model).__module__}.{type(model).__qualname__}"
    if architecture != checkpoint["architecture"]:
        raise ValueError(f"the file holds a {checkpoint['architecture']}, but the model given is a {architecture}")
    # attention that export kept as PrunableMultiheadAttention (heads apart from the stream)
    prunable = {name for name in checkpoint["module_sizes"] if f"{name}.q_proj.weight" in state}
    swap_multihead_attention(model, {name for name, _ in model.named_modules() if name not in prunable})
    for name, sizes in checkpoint["module_sizes"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"the saved model has a layer '{name}' that the given model lacks") from error
        for attr, value in sizes.items():
            setattr(module, attr, value)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in checkpoint.get("buffers", {}).items():
        if key in own:
            _replace_tensor(model, key, tensor.to(own[key].device))
    # every name of every tensor (a tied LM head's weight under both of its names), resized once for
    # all its holders, so that the tie survives
    own = set(dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers()))
    aliases = _aliases(model)
    for key, tensor in state.items():
        current = _held(model, key) if key in own else None
        if current is not None and current.shape != tensor.shape:
            empty = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
            _replace_tensor(model, key, empty, aliases)
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()  # the resized parameters
    return model
