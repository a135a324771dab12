"""The runtime vocabulary of a gated model: what :func:`~tg_kernels.attach_gates` puts into it, and what
export, compact execution and the budget read from it.

- :class:`GateBank` (``model.tg_gates``): every gate of the model, the analysis that placed them and
  the layers and hooks :meth:`GateBank.set_skip` switches; :func:`gate_bank` and :func:`unwrap` find it.
- The hooks, all :class:`AttachedHook` (so that export removes them with one check):
  :class:`GateHook` (a module's output), :class:`InputGateHook` (its input),
  :class:`RecurrentGateHook` / :class:`RecurrentRestore` (an LSTM / GRU's hidden units),
  :class:`EnterOpenStats` / :class:`ExitOpenStats` (:class:`OpenChannelStats` around a module's
  forward) and :class:`NoFastPath`.
- :class:`InputGate`: the gates of a GatedConv2d's input channels.
- :class:`OpenChannelStats`: norms over gated channels with the open channels' statistics.
- :func:`entry_gates`: a gate point's gate vector entry by entry (heads times head dims).

Nothing here imports the procedures that use it (attach, export, compact execution).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tg_kernels import _host
from tg_kernels.gate import TrainableGate
from tg_kernels.nn import GatedConv2d, GatedLinear
from tg_kernels.ops import channel_gate
from tg_kernels.ops._skip import check_skip
from tg_kernels.pruning.analysis import Analysis, RecurrentGate

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
        self.held: set[str] = set()  # groups a Budget keeps whole (hold)

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

    def tie(self, groups: Iterable[Iterable[str]]) -> None:
        """Make each of ``groups`` (lists of gate group keys of one size) share one gate: the first's.

        Tied groups open and close the same channels: one decision for all of them, trained by the
        sum of their gradients. Call it before the optimizer is made (the shared gate is one
        parameter; the others leave the model).
        """
        for keys in groups:
            keys = list(keys)
            unknown = [key for key in keys if key not in self.gates]
            if unknown:
                raise KeyError(f"tie(): no gate group {unknown[0]!r}; the groups are {list(self.gates)[:8]}")
            shared = self.gates[keys[0]]
            for key in keys[1:]:
                old = self.gates[key]
                if old.num_channels != shared.num_channels:
                    raise ValueError(
                        f"tie(): '{key}' has {old.num_channels} channels and '{keys[0]}' {shared.num_channels}: "
                        "only groups of one size can share a gate"
                    )
                self.gates[key] = shared
                for layer in self.gated_layers:  # a Gated layer holds its gate itself
                    if layer.gate is old:
                        layer.gate = shared

    def tie_layers(self) -> dict[str, tuple[str, ...]]:
        """Tie the groups that differ only in their numbers (layer indices) and have one size: every
        layer then keeps the same heads, KV groups and MLP units, so that the exported model has the
        uniform widths a Hugging Face config describes. Returns the ties (first key -> all keys)."""
        by_pattern: dict[tuple[str, int], list[str]] = {}
        for key, gate in self.gates.items():
            by_pattern.setdefault((re.sub(r"\d+", "#", key), gate.num_channels), []).append(key)
        ties = {keys[0]: tuple(keys) for keys in by_pattern.values() if len(keys) > 1}
        self.tie(ties.values())
        return ties

    def hold(self, keys: Iterable[str]) -> None:
        """Keep the groups ``keys`` whole: a :class:`~tg_kernels.Budget` made afterwards sets their
        minimum open count to their size, so they never close."""
        keys = set(keys)
        unknown = keys - set(self.gates)
        if unknown:
            raise KeyError(f"hold(): no gate group {sorted(unknown)[0]!r}; the groups are {list(self.gates)[:8]}")
        self.held |= keys

    def head_dim_groups(self) -> list[str]:
        """The keys of the groups gating the dims inside attention heads."""
        if self.analysis is None:
            return []
        spaces = {hd.space for hd in self.analysis.head_dims if hd.space is not None}
        return sorted({self.key_of_space[s] for s in spaces if s in self.key_of_space})

    def make_uniform(self) -> dict[str, tuple[str, ...]]:
        """Every layer keeps the same widths, and the widths a config holds: :meth:`tie_layers`, and
        head dims held whole (a config rebuilds a rotary table from ``head_dim``, and no
        ``head_dim`` gives the frequencies of an arbitrary subset of rotary pairs). Returns the ties."""
        self.hold(self.head_dim_groups())
        return self.tie_layers()

    def tied(self) -> dict[str, tuple[str, ...]]:
        """Every distinct gate: the first key holding it -> all keys sharing it (itself alone if untied)."""
        out: dict[int, list[str]] = {}
        for key, gate in self.gates.items():
            out.setdefault(id(gate), []).append(key)
        return {keys[0]: tuple(keys) for keys in out.values()}

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


def entry_gates(pieces: list[Tensor], dims: list[Tensor | None], repeat: int) -> Tensor:
    """A gate point's gate vector entry by entry: part ``i``'s gates ``pieces[i]``, each covering
    ``repeat`` entries, times the head-dim gates ``dims[i]`` (tiled over those entries) where given."""
    out = []
    for gate, dim in zip(pieces, dims):
        if dim is None:
            out.append(gate if repeat == 1 else gate.repeat_interleave(repeat))
        else:
            out.append((gate[:, None] * dim.repeat(repeat // dim.numel())[None, :]).flatten())
    return out[0] if len(out) == 1 else torch.cat(out)


class AttachedHook:
    """A forward hook or pre-hook that :func:`~tg_kernels.attach_gates` registers on a module of the
    model. Export removes every hook of this class (and only those)."""


class GateHook(AttachedHook):
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


class RecurrentGateHook(AttachedHook):
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


class RecurrentRestore(AttachedHook):
    """Forward hook (always called) after :class:`RecurrentGateHook`: the module's ``_flat_weights``
    are its parameters again."""

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        params = [getattr(module, n, None) for n in module._flat_weights_names]
        module._flat_weights = params
        module._flat_weight_refs = [weakref.ref(t) if t is not None else None for t in params]


class InputGateHook(GateHook):
    """Forward pre-hook: multiply a module's (only) input by the gates of its channels
    (``GatePoint.on_input``: where no module returns the channels that must be zeroed)."""

    # Set by compact execution: a Linear's input gates are folded into its weight's columns, which
    # holds only where they gate the last dim (checked on the input; a mismatch reruns per layer)
    columns = False
    input_numel: int | None = None  # the input's size in the last compact forward

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:  # type: ignore[override]
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"cannot gate the input of {type(module).__name__}: its first argument is not a tensor")
        x = args[0]
        if self.compact:
            self.input_numel = x.numel()  # (compact execution weighs folding into the weight against this)
        if self.compact and self.columns and self.dim % x.dim() != x.dim() - 1:
            raise RuntimeError(f"input gates along dim {self.dim} of {type(module).__name__} folded into its columns")
        return (super().__call__(module, args, x), *args[1:])


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


class EnterOpenStats(AttachedHook):
    """Forward pre-hook: the module's forward runs inside its :class:`OpenChannelStats` mode."""

    def __init__(self, mode: OpenChannelStats) -> None:
        self.mode = mode

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        # Compact execution runs at the open width, where a plain norm already is the open-channel one
        # (except over groups that "exact" training keeps at full width).
        compact = self.mode.bank.compact
        running = getattr(compact, "running", False)
        self.mode.entered = not running or module in compact.full_width_norms
        if self.mode.entered:
            self.mode.__enter__()


class ExitOpenStats(AttachedHook):
    """Forward hook (always called) after :class:`EnterOpenStats`: the mode is left again."""

    def __init__(self, mode: OpenChannelStats) -> None:
        self.mode = mode

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if getattr(self.mode, "entered", False):
            self.mode.entered = False
            self.mode.__exit__(None, None, None)


class NoFastPath(AttachedHook):
    """A forward pre-hook that does nothing: its presence keeps ``nn.TransformerEncoderLayer`` off its
    fused inference path (which reads the layers' weights directly, past their gates)."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        return None


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


__all__ = [
    "BANK_NAME",
    "RECURRENT_ROWS",
    "AttachedHook",
    "EnterOpenStats",
    "ExitOpenStats",
    "GateBank",
    "GateHook",
    "GroupInfo",
    "InputGate",
    "InputGateHook",
    "NoFastPath",
    "OpenChannelStats",
    "Parts",
    "RecurrentGateHook",
    "RecurrentRestore",
    "entry_gates",
    "gate_bank",
    "set_submodule",
    "unwrap",
]
