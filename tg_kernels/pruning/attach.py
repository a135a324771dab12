"""`attach_gates`: put trainable gates into an arbitrary model where they zero what consumers read.

The model keeps its own classes and forward code, except that every ``nn.MultiheadAttention`` becomes
the equivalent :class:`~tg_kernels.nn.PrunableMultiheadAttention` (whose heads can be pruned; export
turns it back where it can). Gates live in one module, ``model.tg_gates``
(a :class:`GateBank`, so they are saved with the model's state_dict and synchronised by
DistributedDataParallel like any parameter). A Conv2d or Linear whose output is gated directly is
replaced by a :class:`~tg_kernels.GatedConv2d` / :class:`~tg_kernels.GatedLinear` sharing the
group's gate, so that it skips closed channels while training; every other gate point (after a
BatchNorm, a depthwise conv, a sigmoid) is a forward hook calling the fused
:func:`~tg_kernels.channel_gate`. A Conv2d whose gate sits after its BatchNorm becomes a
``GatedConv2d(gate_after_norm=True)``: it applies no gate but skips closed channels in its
backward (``exact``) or everywhere (``hard``). The hidden units of an ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN`` are gated inside the recurrence, on the parameters a forward pre-hook hands the module
(:class:`RecurrentGateHook`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tg_kernels import _host
from tg_kernels.gate import ShapeFn, TrainableGate
from tg_kernels.nn import GatedConv2d, GatedLinear, swap_multihead_attention
from tg_kernels.ops import channel_gate
from tg_kernels.ops._skip import check_skip
from tg_kernels.pruning.analysis import (
    Analysis,
    RecurrentGate,
    analyze,
    analyze_export,
    export_trace,
    record_shapes,
    trace,
)
from tg_kernels.pruning.analysis.head_dims import entry_gates

BANK_NAME = "tg_gates"

Parts = tuple[tuple[str | None, int], ...]  # (gate group key or None for never-gated channels, size)


@dataclass(frozen=True)
class GroupInfo:
    """One gate group as users see it: its key in ``model.tg_gates``, size and the modules producing it."""

    key: str
    size: int
    producers: tuple[str, ...]


class GateBank(nn.Module):
    """Holds every gate of a gated model (``model.tg_gates``) and the analysis that placed them."""

    def __init__(self, sizes: dict[str, int], **gate_options: Any) -> None:
        super().__init__()
        self.gates = nn.ModuleDict({key: TrainableGate(size, **gate_options) for key, size in sizes.items()})
        self.analysis: Analysis | None = None
        self.key_of_space: dict[int, str] = {}
        self.groups: list[GroupInfo] = []
        self.skipped: dict[str, str] = {}
        self.skip = "exact"
        # What set_skip switches: the Gated layers and gate hooks attach_gates put into the model
        # (plain lists, not submodules: the layers belong to the model, the bank only points at them).
        self.gated_layers: list[GatedConv2d | GatedLinear] = []
        self.hooks: list[GateHook] = []
        self.recurrent_hooks: list[RecurrentGateHook] = []  # LSTM / GRU hidden units (gated on parameters)
        self.compact: Any = None  # the CompactForward running this model compact (prune/compact.py), if any

    def forward(self, x: Any) -> Any:
        """Identity. Gates are applied by the gated layers and hooks, not here; this exists because a
        gated ``nn.Sequential`` holds the bank as its last element and calls it."""
        return x

    def vector(self, parts: Parts, like: Tensor) -> Tensor:
        """Gate values for channels made of ``parts`` (ones where channels are never gated)."""
        pieces = [self.gates[key]().to(like.dtype) if key is not None else like.new_ones(size) for key, size in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def parts(self, space_parts: Iterable[tuple[int | None, int]]) -> Parts:
        return tuple((self.key_of_space.get(s) if s is not None else None, size) for s, size in space_parts)

    def set_skip(self, skip: str) -> None:
        """Switch every gated layer and gate hook of the model to skip mode ``skip`` without re-attaching.

        ``"exact"`` while the gates search (every gate, closed ones included, gets its task gradient),
        ``"hard"`` for fine-tuning once the open set has settled (closed channels are skipped
        everywhere and, with compact execution, the model trains at its exported model's speed).
        """
        check_skip(skip)
        self.skip = skip
        for layer in self.gated_layers:
            layer.skip = skip
        for hook in self.hooks:
            hook.hard = skip == "hard"
        for hook in self.recurrent_hooks:
            hook.hard = skip == "hard"

    def open_fraction(self) -> float:
        """Fraction of gated channels whose gate is open."""
        total = sum(g.num_channels for g in self.gates.values())
        return sum(g.num_open() for g in self.gates.values()) / total if total else 1.0

    def coverage(self, max_reasons: int = 10) -> str:
        """Which share of the model's FLOPs (for the example inputs) the gates control, and why the
        rest is fixed, largest first."""
        if self.analysis is None:
            return "no analysis: the model could not be traced"
        a = self.analysis
        lines = [f"gates control {a.coverage:.1%} of the FLOPs ({a.tracer} graph); the rest is fixed because:"]
        total = sum(a.uncovered.values()) / (1 - a.coverage) if a.coverage < 1 else 0.0
        for reason, flops in sorted(a.uncovered.items(), key=lambda kv: -kv[1])[:max_reasons]:
            lines.append(f"  {flops / total if total else 0.0:6.1%}  {reason}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"groups={len(self.gates)}, channels={sum(g.num_channels for g in self.gates.values())}"


class GateHook:
    """Forward hook: multiply a module's output by the gates of its channels (fused channel_gate)."""

    def __init__(
        self, bank: GateBank, parts: Parts, dim: int, hard: bool = False, repeat: int = 1, dims: tuple[Parts, ...] = ()
    ) -> None:
        self.bank = bank
        self.parts = parts
        self.dim = dim
        self.hard = hard
        self.repeat = repeat  # entries per gate along dim (a head of head_dim entries)
        self.dims = dims  # per part: head-dim gates tiled over its repeat entries (GatePoint.dims), or ()
        # Set by compact execution for one forward: the output is compact; multiply it by
        # compact_gate, or leave it alone when the gate was folded into a module's rows (None).
        self.compact = False
        self.compact_gate: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, (tuple, list)):  # (attn_output, None) from nn.MultiheadAttention
            tensors = [i for i, o in enumerate(output) if isinstance(o, Tensor)]
            if len(tensors) != 1:
                raise TypeError(f"cannot gate the output of {type(module).__name__}: it returns several tensors")
            items = list(output)
            items[tensors[0]] = self(module, inputs, items[tensors[0]])
            return type(output)(items) if isinstance(output, tuple) else items
        if self.compact:
            return output if self.compact_gate is None else channel_gate(output, self.compact_gate, self.dim)
        if self.dims:  # head dims: each head's gate times its dims' gates
            pieces = [self.bank.vector((part,), output) for part in self.parts]
            inner = [self.bank.vector(d, output) if d else None for d in self.dims]
            if self.hard:
                pieces = [torch.where(g != 0, g, g.detach()) for g in pieces]
                inner = [None if g is None else torch.where(g != 0, g, g.detach()) for g in inner]
            return channel_gate(output, entry_gates(pieces, inner, self.repeat), self.dim)
        gate = self.bank.vector(self.parts, output)
        if self.hard:  # skip="hard": closed gates get no task gradient (only the budget moves them)
            gate = torch.where(gate != 0, gate, gate.detach())
        if self.repeat != 1:
            gate = gate.repeat_interleave(self.repeat)
        return channel_gate(output, gate, self.dim)


# The parameters of an LSTM / GRU / RNN layer whose rows are hidden units' gate blocks (not weight_hr_l*).
RECURRENT_ROWS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class RecurrentGateHook:
    """Forward pre-hook of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: run it with its hidden units
    gated inside the recurrence (:class:`~tg_kernels.pruning.analysis.RecurrentGate`).

    The module's forward reads its parameters from ``module._flat_weights``. For one call this hook
    puts there each parameter with the rows of the gated block (LSTM's cell candidate, GRU's new
    gate, RNN's only block) multiplied by the unit's gate value, differentiably;
    :class:`RecurrentRestore` (its forward hook) puts the parameters themselves back. A closed unit
    is then exactly zero at every step, which is what removing it computes. Under compact execution
    the parameters are already the kept units' and the hook scales them by the kept gates' values.
    """

    def __init__(self, bank: GateBank, point: RecurrentGate, key: str, hard: bool = False) -> None:
        self.bank = bank
        self.point = point
        self.key = key
        self.hard = hard

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        names = module._flat_weights_names
        params = [getattr(module, n, None) for n in names]
        gate = self.bank.gates[self.key]()
        runner = self.bank.compact
        compact = runner is not None and getattr(runner, "running", False)
        if compact:  # the parameters hold the kept units only (compact.py gathered them)
            gate = gate.index_select(0, runner._plan.kept[self.key].to(gate.device))
        # closed gates get no task gradient (only the budget moves them), except in "exact" training,
        # where compact execution keeps recurrent groups at full width for them
        if self.hard or (compact and not runner._plan.exact):
            gate = torch.where(gate != 0, gate, gate.detach())
        gated = []
        for name, t in zip(names, params):
            if t is None or not name.startswith(RECURRENT_ROWS):
                gated.append(t)
                continue
            units = t.shape[0] // self.point.blocks
            g = gate.to(t.dtype)
            ones = t.new_ones(units)
            scale = torch.cat([ones] * self.point.block + [g] + [ones] * (self.point.blocks - self.point.block - 1))
            gated.append(t * scale.view(-1, *([1] * (t.dim() - 1))))
        module._flat_weights = gated
        # the parameters are unchanged: the forward must not rebuild _flat_weights from them
        module._flat_weight_refs = [weakref.ref(t) if t is not None else None for t in params]


class RecurrentRestore:
    """Forward hook (always called) after :class:`RecurrentGateHook`: the module's ``_flat_weights``
    are its parameters again."""

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        params = [getattr(module, n, None) for n in module._flat_weights_names]
        module._flat_weights = params
        module._flat_weight_refs = [weakref.ref(t) if t is not None else None for t in params]


class InputGateHook(GateHook):
    """Forward pre-hook: multiply a module's (only) input by the gates of its channels
    (``GatePoint.on_input``: where no module returns the channels that must be zeroed)."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:  # type: ignore[override]
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"cannot gate the input of {type(module).__name__}: its first argument is not a tensor")
        return (super().__call__(module, args, args[0]), *args[1:])


class InputGate:
    """The gates of a layer's input channels (set on a GatedConv2d so that it can drop closed inputs)."""

    def __init__(self, bank: GateBank, parts: Parts) -> None:
        self.bank = bank
        self.parts = parts
        self._host = _host.ConcatCache()

    def __call__(self, like: Tensor) -> Tensor:
        values = self.bank.vector(self.parts, like)
        # its host copy (what the layer plans from) comes from the gates' host copies, without a sync
        _host.track(values, [self.bank.gates[key] if key is not None else size for key, size in self.parts], self._host)
        return values


class OpenChannelStats(TorchFunctionMode):
    """Inside one module's forward: norms over gated channels use the open channels' statistics.

    At full width closed channels are exact zeros, so a mean over the channel dim divides by the
    full width where the exported model divides by the open count. While the module runs, this mode
    turns ``F.layer_norm`` / ``torch.rms_norm`` over a gated width into their open-channel versions
    and a ``mean`` over a gated dim into ``sum / open count``, which is what the exported model computes.
    """

    def __init__(self, bank: GateBank, parts_by_width: dict[int, Parts]) -> None:
        super().__init__()
        self.bank = bank
        self.parts_by_width = parts_by_width

    def _mask(self, like: Tensor, width: int | None = None) -> Tensor:
        """The open mask of a gated width, without gradient: which channels a statistic counts is a
        discrete choice (the exported model has no gate there), so gates get no gradient through it."""
        return self.bank.vector(self.parts_by_width[like.shape[-1] if width is None else width], like).detach()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm) or func is getattr(F, "rms_norm", None):
            x = args[0]
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            if isinstance(x, Tensor) and len(shape) == 1 and shape[0] in self.parts_by_width:
                names = ("weight", "bias", "eps") if func is not getattr(F, "rms_norm", None) else ("weight", "eps")
                values = dict(zip(names, args[2:]))
                values.update({k: v for k, v in kwargs.items() if k in names})
                return _open_norm(x, self._mask(x), values, centered="bias" in names)
        elif func is F.group_norm:
            x = args[0]
            if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] in self.parts_by_width:
                names = ("num_groups", "weight", "bias", "eps")
                values = dict(zip(names, args[1:]))
                values.update({k: v for k, v in kwargs.items() if k in names})
                return _open_group_norm(x, self._mask(x, x.shape[1]), values)
        elif func in (torch.mean, Tensor.mean) and (len(args) >= 2 or "dim" in kwargs):
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            dims = dim if isinstance(dim, (list, tuple)) else [dim]
            if isinstance(x, Tensor) and len(dims) == 1 and isinstance(dims[0], int):
                d = dims[0] % x.dim()
                if x.shape[d] in self.parts_by_width:
                    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
                    count = self._mask(x, x.shape[d]).sum().clamp_min(1.0)
                    return x.sum(d, keepdim=keepdim) / count
        return func(*args, **kwargs)


def _open_norm(x: Tensor, g: Tensor, values: dict[str, Any], centered: bool) -> Tensor:
    """LayerNorm (``centered``) or RMSNorm over the last dim, over the channels where ``g`` != 0."""
    eps = values.get("eps")
    eps = 1e-5 if eps is None else eps
    count = g.sum().clamp_min(1.0)
    if centered:
        mean = (x * g).sum(-1, keepdim=True) / count
        x = x - mean
    var = (x * g).square().sum(-1, keepdim=True) / count
    y = x * torch.rsqrt(var + eps)
    if values.get("weight") is not None:
        y = y * values["weight"]
    if values.get("bias") is not None:
        y = y + values["bias"]
    return y


def _open_group_norm(x: Tensor, g: Tensor, values: dict[str, Any]) -> Tensor:
    """GroupNorm over the channels where ``g`` != 0 (the same count in every group: group-aligned)."""
    groups = values["num_groups"]
    eps = values.get("eps")
    eps = 1e-5 if eps is None else eps
    shape = x.shape
    xg = x.reshape(shape[0], groups, -1)
    mask = g.to(x.dtype).reshape(groups, -1, *([1] * (x.dim() - 2))).expand(groups, -1, *shape[2:])
    mask = mask.reshape(1, groups, -1)
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (xg * mask).sum(-1, keepdim=True) / count
    var = ((xg - mean) * mask).square().sum(-1, keepdim=True) / count
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(shape)
    affine = [1, -1] + [1] * (x.dim() - 2)
    if values.get("weight") is not None:
        y = y * values["weight"].reshape(affine)
    if values.get("bias") is not None:
        y = y + values["bias"].reshape(affine)
    return y


class _EnterMode:
    def __init__(self, mode: OpenChannelStats) -> None:
        self.mode = mode

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        # Compact execution runs at the open width, where a plain norm already is the open-channel one
        # (except over groups that "exact" training keeps at full width).
        compact = self.mode.bank.compact
        running = getattr(compact, "running", False)
        self.mode.entered = not running or id(module) in compact.full_width_norms
        if self.mode.entered:
            self.mode.__enter__()


class _ExitMode:
    def __init__(self, mode: OpenChannelStats) -> None:
        self.mode = mode

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if getattr(self.mode, "entered", False):
            self.mode.entered = False
            self.mode.__exit__(None, None, None)


class NoFastPath:
    """A forward pre-hook that does nothing: its presence keeps ``nn.TransformerEncoderLayer`` off its
    fused inference path (which reads the layers' weights directly, past their gates)."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        return None


def _keep_off_fast_paths(model: nn.Module) -> None:
    """PyTorch's transformer encoder layers and stacks that hold gates take their regular path."""
    gated = (GatedConv2d, GatedLinear)
    for module in model.modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(m, gated) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # nested tensors would skip the gates too
        elif not any(isinstance(h, NoFastPath) for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(NoFastPath())


def unwrap(model: nn.Module) -> nn.Module:
    """The gated model itself when `model` wraps it (DistributedDataParallel, DataParallel)."""
    return getattr(model, "module", model) if not hasattr(model, BANK_NAME) else model


def gate_bank(model: nn.Module) -> GateBank:
    """The GateBank of a model gated by :func:`attach_gates` (unwrapping DDP / DataParallel)."""
    bank = getattr(unwrap(model), BANK_NAME, None)
    if not isinstance(bank, GateBank):
        raise ValueError("this model has no gates: call tg_kernels.attach_gates(model, example_inputs) first")
    return bank


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _excluded_names(model: nn.Module, exclude: Iterable[str | type] | None) -> set[str]:
    names: set[str] = set()
    for item in exclude or ():
        if isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError as error:
                raise ValueError(f"exclude names {item!r}, which is not a submodule of the model") from error
            names.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            names.update(name for name, m in model.named_modules() if isinstance(m, item) and name)
        else:
            raise TypeError(f"exclude takes submodule names or nn.Module classes, got {item!r}")
    return names


def _unique_key(name: str, taken: set[str]) -> str:
    key = name.replace(".", "_") or "input"
    candidate, n = key, 1
    while candidate in taken:
        n += 1
        candidate = f"{key}_{n}"
    taken.add(candidate)
    return candidate


def _install(
    model: nn.Module,
    analysis: Analysis,
    opaque: set[str],
    skip: str,
    gate_options: dict[str, Any],
) -> GateBank:
    """Put the gates the analysis placed into ``model`` (in place) and return their bank."""
    taken: set[str] = set()
    sizes = {group.space: group.size for group in analysis.groups}
    keys = {group.space: _unique_key(group.name, taken) for group in analysis.groups}
    param = next(model.parameters(), None)
    bank = GateBank({keys[s]: n for s, n in sizes.items()}, **gate_options)
    if param is not None:
        bank.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    bank.analysis = analysis
    bank.skip = skip
    bank.key_of_space = {space: keys[root] for space, root in analysis.root_of.items()}
    bank.groups = [GroupInfo(keys[g.space], g.size, tuple(g.producers)) for g in analysis.groups]
    bank.skipped = dict(analysis.fixed)
    for leaf in sorted(opaque):
        bank.skipped[leaf] = "untraceable code (kept as an opaque module)"

    for point in analysis.gate_points:
        if point.on_input:
            continue  # after every replacement below, so that the hook sits on the module that stays
        parts = bank.parts(point.parts)
        module = model.get_submodule(point.module)
        if point.replace:
            gated_cls = GatedConv2d if isinstance(module, nn.Conv2d) else GatedLinear
            make = gated_cls.from_conv if gated_cls is GatedConv2d else gated_cls.from_linear
            gated = make(module, skip=skip)
            gated.gate = bank.gates[parts[0][0]]
            gated.train(module.training)
            set_submodule(model, point.module, gated)
            bank.gated_layers.append(gated)
        else:
            dims = tuple(bank.parts(d) for d in point.dims)
            hook = GateHook(bank, parts, point.dim, hard=skip == "hard", repeat=point.repeat, dims=dims)
            module.register_forward_hook(hook)
            bank.hooks.append(hook)
    for point in analysis.recurrent:  # LSTM / GRU hidden units: gated inside the recurrence
        module = model.get_submodule(point.module)
        hook = RecurrentGateHook(bank, point, bank.key_of_space[point.space], hard=skip == "hard")
        module.register_forward_pre_hook(hook)
        module.register_forward_hook(RecurrentRestore(), always_call=True)
        bank.recurrent_hooks.append(hook)
    for name, space in analysis.after_norm:  # conv -> BN -> gate: the conv skips what is exact to skip
        conv = GatedConv2d.from_conv(model.get_submodule(name), skip=skip, gate_after_norm=True)
        conv.gate = bank.gates[bank.key_of_space[space]]
        conv.train(model.get_submodule(name).training)
        set_submodule(model, name, conv)
        bank.gated_layers.append(conv)
    for point in analysis.gate_points:  # input gates: on the modules that stay (after every replacement)
        if point.on_input:
            hook = InputGateHook(bank, bank.parts(point.parts), point.dim, hard=skip == "hard", repeat=point.repeat)
            model.get_submodule(point.module).register_forward_pre_hook(hook)
            bank.hooks.append(hook)
    for name, space_parts in analysis.conv_inputs:  # chains: a conv reading gated channels can drop closed ones
        conv = model.get_submodule(name)
        if isinstance(conv, GatedConv2d):
            conv.input_gate = InputGate(bank, bank.parts(space_parts))
    widths: dict[str, dict[int, Parts]] = {}
    for name, space_parts in analysis.norms:  # norms over gated channels: open-channel statistics
        parts = bank.parts(space_parts)
        widths.setdefault(name, {})[sum(size for _, size in parts)] = parts
    for name, by_width in widths.items():
        mode = OpenChannelStats(bank, by_width)
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_EnterMode(mode))
        module.register_forward_hook(_ExitMode(mode), always_call=True)
    _keep_off_fast_paths(model)
    model.add_module(BANK_NAME, bank)

    return bank


def _leaves(value: Any) -> list[Tensor]:
    """The floating-point tensors in a model output (tensors, tuples, dicts, Hugging Face outputs)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict) or hasattr(value, "items"):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []


def _without_groups(analysis: Analysis, bad: set[int], reason: str) -> Analysis:
    """The analysis with the groups whose space is in ``bad`` kept whole (ungated) for ``reason``."""
    root_of = {s: r for s, r in analysis.root_of.items() if r not in bad}

    def parts2(parts):
        return tuple((r if r in root_of.values() else None, n) for r, n in parts)

    def parts3(parts):
        return tuple((s if s is not None and s in root_of else None, n, k) for s, n, k in parts)

    fixed = dict(analysis.fixed)
    for g in analysis.groups:
        if g.space in bad:
            for p in g.producers:
                fixed[p] = reason

    def dims2(dims):
        dims = tuple(parts2(d) for d in dims)
        return dims if any(r is not None for d in dims for r, _ in d) else ()

    points = []
    for gp in analysis.gate_points:
        parts = parts2(gp.parts)
        if any(r is not None for r, _ in parts) or dims2(gp.dims):
            replace = gp.replace and parts[0][0] is not None
            points.append(dataclasses.replace(gp, parts=parts, replace=replace, dims=dims2(gp.dims)))
    return dataclasses.replace(
        analysis,
        groups=[g for g in analysis.groups if g.space not in bad],
        gate_points=points,
        layers=[
            dataclasses.replace(
                lc,
                in_parts=parts3(lc.in_parts),
                out_parts=parts3(lc.out_parts),
                in_dims=dims2(lc.in_dims),
                out_dims=dims2(lc.out_dims),
            )
            for lc in analysis.layers
        ],
        fixed=fixed,
        root_of=root_of,
        after_norm=[(n, s) for n, s in analysis.after_norm if s in root_of],
        conv_inputs=[(n, parts2(p)) for n, p in analysis.conv_inputs if any(r is not None for r, _ in parts2(p))],
        norms=[(n, parts2(p)) for n, p in analysis.norms if any(r is not None for r, _ in parts2(p))],
        size_attrs=[
            dataclasses.replace(sa, parts=parts2(sa.parts), dims=parts2(sa.dims))
            for sa in analysis.size_attrs
            if any(r is not None for r, _ in parts2(sa.parts) + parts2(sa.dims))
        ],
        side_passes=[sp for sp in analysis.side_passes if sp.space in root_of.values()],
        recurrent=[rg for rg in analysis.recurrent if rg.space in root_of],
        head_dims=[
            hd if hd.space is None or hd.space not in bad else dataclasses.replace(hd, space=None, reason=reason)
            for hd in analysis.head_dims
        ],
    )


# How much the self-check scales the q and k projections of attention with head-dim gates: at random
# initialisation attention is nearly uniform, and a scale computed from the head dim in the forward
# (not exact once head dims go) would change the outputs by less than the check's tolerance.
_SHARPEN = 8.0


def _export_differs(
    model: nn.Module, analysis: Analysis, inputs: tuple[Any, ...], kwargs: dict[str, Any], closed: set[int]
) -> bool:
    """Gate a copy, close a random half of the groups in ``closed``; does export change the output?

    The check runs in the model's own dtype (float64 convolutions are slow on CPU); a misread
    structure changes outputs by far more than rounding does.
    """
    from tg_kernels.pruning.export import _export

    trial = copy.deepcopy(model).eval()
    with torch.no_grad():  # sharp attention scores: a scale that follows the kept head dims shows
        for hd in analysis.head_dims:
            if hd.space is not None and hd.space in closed:
                for name in hd.scored:
                    trial.get_submodule(name).weight.mul_(_SHARPEN)
    bank = _install(trial, analysis, set(), "none", {})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for group in analysis.groups:
            gate = bank.gates[bank.key_of_space[group.space]]
            gate.weight.fill_(0.5)
            if group.space in closed and group.size > 1:
                gate.weight[torch.randperm(group.size, generator=g)[: group.size // 2]] = -0.5
        try:
            expected = _leaves(trial(*inputs, **kwargs))
            actual = _leaves(_export(trial, 1, in_place=True)(*inputs, **kwargs))  # trial is a throwaway copy
        except Exception:  # noqa: BLE001 - an export that cannot run is a mismatch
            return True
    if len(expected) != len(actual):
        return True
    for e, a in zip(expected, actual):
        if e.shape != a.shape:
            return True
        scale = e.abs().max().clamp_min(1e-30)
        tolerance = 1e-10 if e.dtype == torch.float64 else 1e-3  # removed channels change outputs by O(1)
        if not torch.allclose(a / scale, e / scale, rtol=0, atol=tolerance):
            return True
    return False


def _self_check(
    model: nn.Module, analysis: Analysis, inputs: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Analysis, list[str]]:
    """Verify that export equals the gated model with half of every group closed; keep failing groups whole.

    Failing groups are found by halving the set of closed groups. Returns the (possibly reduced)
    analysis and the names of the groups kept whole.
    """
    spaces = [g.space for g in analysis.groups]
    if not spaces or not _export_differs(model, analysis, inputs, kwargs, set(spaces)):
        return analysis, []
    bad: set[int] = set()

    def search(candidates: list[int]) -> None:
        if not _export_differs(model, analysis, inputs, kwargs, set(candidates)):
            return
        if len(candidates) == 1:
            bad.add(candidates[0])
            return
        half = len(candidates) // 2
        search(candidates[:half])
        search(candidates[half:])

    half = len(spaces) // 2
    search(spaces[:half])
    search(spaces[half:])
    if not bad:  # only closing several groups together fails: keep them all whole
        bad = set(spaces)
    names = [g.name for g in analysis.groups if g.space in bad]
    return _without_groups(
        analysis, bad, "self-check: the exported model differed when these channels were removed"
    ), names


TRACERS = ("auto", "export", "fx")


def _analyse(
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    excluded: set[str],
    tracer: str,
    closed_gradients: bool = True,
) -> tuple[Analysis | None, set[str], str | None]:
    """(analysis or None, opaque submodules, why tracing failed) with the chosen tracer.

    ``"auto"`` reads the ``torch.export`` graph and falls back to torch.fx (which can keep
    untraceable submodules opaque) when torch.export cannot trace the model.
    """
    export_error: Exception | None = None
    if tracer in ("auto", "export"):
        try:
            traced = export_trace(model, inputs, kwargs)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: try the next tracer
            export_error = error
            if tracer == "export":
                return None, set(), f"torch.export failed: {type(error).__name__}: {error}"
        else:
            return analyze_export(model, traced, excluded, closed_gradients), set(), None
    if kwargs:
        reason = "torch.fx cannot pass keyword inputs (example_kwargs)"
        if export_error is not None:
            reason = f"torch.export failed ({type(export_error).__name__}: {export_error}) and {reason}"
        return None, set(), reason
    try:
        graph, opaque = trace(model)
    except Exception as error:  # noqa: BLE001
        return None, set(), f"{type(error).__name__}: {error}"
    shapes, module_flops = record_shapes(model, graph, inputs)
    return analyze(model, graph, shapes, excluded, module_flops), opaque, None


def attach_gates(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] = (),
    *,
    example_kwargs: dict[str, Any] | None = None,
    skip: str = "exact",
    exclude: Iterable[str | type] | None = None,
    gate_shape: str | ShapeFn | None = None,
    gate_M: float | None = None,
    gate_init: float = 0.5,
    tracer: str = "auto",
    self_check: bool = True,
    compact: bool = True,
    closed_gate_gradients: bool = True,
) -> tuple[nn.Module, GateBank]:
    """Gate every prunable channel group of ``model`` (in place) and return ``(model, gates)``.

    Args:
        model: any ``nn.Module``; it is modified in place (a copy is not made). Its
            ``nn.MultiheadAttention`` modules are swapped for
            :class:`~tg_kernels.nn.PrunableMultiheadAttention` (same numbers; new state_dict keys)
            unless ``exclude`` names them or their class.
        example_inputs: a tensor or a tuple of positional inputs, used once to trace shapes.
        example_kwargs: keyword inputs of the forward (``input_ids=...`` for Hugging Face models).
        skip: skip mode of the Gated layers that replace directly gated Conv2d/Linear producers
            (``"none"``, ``"exact"``, ``"hard"``; see :class:`~tg_kernels.GatedLinear`).
        exclude: submodule names or module classes whose output channels stay ungated.
        gate_shape, gate_M, gate_init: options of every :class:`~tg_kernels.TrainableGate`.
        tracer: ``"auto"`` (the ``torch.export`` graph, falling back to torch.fx where torch.export
            cannot trace the model), ``"export"`` or ``"fx"``.
        self_check: verify the analysis on the example inputs before gating: with a random half
            of every group closed, the exported model must compute what the gated model computes
            (on a copy, in the model's dtype). Groups that break it are found by halving, kept whole and named
            in a warning. It costs a few exports of the model; turn it off for very large models.
        compact: run the whole model compact (at the open width, as its exported model would) in
            ``"hard"`` mode and without gradients (:mod:`tg_kernels.pruning.compact`). A check on the
            example inputs turns it off, with a warning, where the model's code cannot run compact.
        closed_gate_gradients: place no gate right before an activation whose derivative at 0 is 0
            (ReLU, ReLU6): such a gate would get no task gradient while closed, so it could reopen
            only through the budget. The gate goes after the activation instead (on the module that
            returns it, past a residual add, or on the input of the Linear / conv reading it). The
            forward is the same (``relu(g * z) = g * relu(z)`` for 0/1 gates). ``False`` keeps gates
            before such activations: ``"exact"`` training is then cheaper (those closed gates'
            task gradients are exactly 0 and need no side pass), but closed channels reopen only
            through the budget. The torch.fx analysis always places gates before them.

    Returns:
        The model (now holding ``model.tg_gates``) and that :class:`GateBank`, which lists the groups
        (``bank.groups``) and the pieces left ungated with their reasons (``bank.skipped``).

    Pieces the analysis cannot handle (untraceable code, unknown ops) stay ungated with one warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_gates expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("attach gates to the bare model first, then wrap it in DistributedDataParallel")
    if hasattr(model, BANK_NAME):
        raise ValueError("this model already has gates (model.tg_gates); attach_gates runs once per model")
    check_skip(skip)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    excluded = _excluded_names(model, exclude)
    # nn.MultiheadAttention packs q, k, v and cannot lose heads: the same attention with separate
    # projections can (tg_kernels.nn.PrunableMultiheadAttention; exclude the class to keep it).
    swap_multihead_attention(model, excluded)

    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    analysis, opaque, failure = _analyse(
        model, inputs, dict(example_kwargs or {}), excluded, tracer, closed_gate_gradients
    )
    if analysis is None:
        warnings.warn(
            f"tg_kernels.attach_gates: cannot trace {type(model).__name__}.forward ({failure}); "
            "the model stays ungated",
            stacklevel=2,
        )
        bank = GateBank({})
        bank.skipped[type(model).__name__] = f"untraceable forward: {failure}"
        model.add_module(BANK_NAME, bank)
        return model, bank

    self_checked: list[str] = []
    if self_check and analysis.groups:
        analysis, self_checked = _self_check(model, analysis, inputs, dict(example_kwargs or {}))
    bank = _install(model, analysis, opaque, skip, {"shape": gate_shape, "M": gate_M, "init": gate_init})
    if compact and bank.gates:
        from tg_kernels.pruning.compact import install  # compact imports this module

        install(model, bank, inputs, dict(example_kwargs or {}))
    if self_checked:
        warnings.warn(
            "tg_kernels.attach_gates: the self-check found that removing channels of these groups changes "
            f"the model's output, so they stay whole: {', '.join(self_checked[:8])}"
            + (f" and {len(self_checked) - 8} more" if len(self_checked) > 8 else "")
            + " (a size read of a gated dim, or code the analysis misread)",
            stacklevel=2,
        )

    unhandled = [f"{leaf} (untraceable)" for leaf in sorted(opaque)] + analysis.barriers
    if unhandled:
        shown = "; ".join(unhandled[:8]) + (f"; and {len(unhandled) - 8} more" if len(unhandled) > 8 else "")
        warnings.warn(
            f"tg_kernels.attach_gates: channels that reach these pieces stay ungated: {shown}. "
            f"{len(bank.groups)} gate groups were attached; see the returned bank's .skipped for every reason.",
            stacklevel=2,
        )
    return model, bank
