"""The analysis pass over a model's export graph: one walk in graph order, repeated until stable.

Each node's value gets a :class:`~tg_kernels.pruning.analysis.types.ChannelInfo` (which channel
spaces lie along which dim, and whether closed channels are exactly zero there) from the rule of
its ATen op (:mod:`tg_kernels.pruning.analysis.rules`). A walk learns things that the next walk must
use: a module output to gate again ("regate", where a norm or a non-zero-preserving op sits
between a gate and a consumer), a space to keep whole, a producer whose output the model cuts into
pieces (``split``, ``chunk``, slicing). :func:`analyze_export` repeats walks until nothing new is
learned, then :func:`finish` turns the last walk into an :class:`Analysis`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tg_kernels.pruning.analysis.spaces import Spaces
from tg_kernels.pruning.analysis.tracing import Trace
from tg_kernels.pruning.analysis.types import (
    Analysis,
    AnalysisError,
    ChannelInfo,
    GatePoint,
    Group,
    HeadDims,
    LayerCost,
    RecurrentGate,
    SizeAttr,
    Slice,
    StackedInfo,
)


class ParamView:
    """A value that is a view of one parameter or buffer: ``dims[i]`` is the tensor's dim at dim i
    of this value (None for a dim that the view added)."""

    def __init__(self, name: str, dims: tuple[int | None, ...]) -> None:
        self.name = name
        self.dims = dims


class Filled:
    """A value that a factory (``zeros``, ``full``, ...) filled with one value, maybe combined with
    values that do not vary along some of its dims: ``dims[i]`` is the position in the factory's
    size argument of dim i, for the dims along which the value is still constant (None otherwise).
    Such a dim may lose entries with the heads it meets, if the factory's size follows them."""

    def __init__(self, node: fx.Node, arg_index: int, dims: tuple[int | None, ...]) -> None:
        self.node = node
        self.arg_index = arg_index
        self.dims = dims


class Walk:
    """One propagation over the graph with a fixed set of gate points and cuts."""

    def __init__(
        self,
        model: nn.Module,
        trace: Trace,
        gate_points: set[str],
        forced_fixed: dict[str, str],
        cuts: dict[str, set[int]],
        excluded: set[str],
        units: dict[str, int] | None = None,
        closed_gradients: bool = True,
        suppressed: frozenset[str] = frozenset(),
    ) -> None:
        self.model = model
        # place no gate right before a ReLU-like activation, so that closed gates keep a task gradient
        self.closed_gradients = closed_gradients
        self.suppressed = suppressed  # producers whose own gate is left out (a later gate of the group suffices)
        self.placed_by: dict[str, str] = {}  # gate point -> the producer whose output chain placed it
        self.t = trace
        self.gate_points = gate_points
        self.cuts = cuts
        self.units = units if units is not None else {}  # producer key -> entries per channel (heads)
        self.new_units: dict[str, int] = {}
        self.size_attrs: list[SizeAttr] = []
        self.tied: dict[tuple[str, int, int, int], ChannelInfo] = {}  # slices of tensors read more than once
        self.excluded = excluded
        self.spaces = Spaces(forced_fixed)
        self.info: dict[fx.Node, Any] = {}
        self.slices: list[Slice] = []
        self.points: list[GatePoint] = []
        self.emitted: set[str] = set()
        self.layers: list[LayerCost] = []
        self.barriers: list[str] = []
        self.new_gate_points: set[str] = set()
        self.new_cuts: dict[str, set[int]] = {}
        self.other_flops = 0.0
        self.costed: set[str] = set()
        self.after_norm: list[tuple[str, int]] = []
        self.conv_inputs: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self.norms: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self.fold_of: dict[str, str | None] = {}
        self.flops_of: dict[fx.Node, float] = {}  # every op's FLOPs, for the coverage report
        self.node_reason: dict[fx.Node, str] = {}
        self.costed_nodes: set[fx.Node] = set()  # op nodes whose FLOPs a LayerCost counts
        self.needed: dict[str, bool] = {}  # gate point -> whether non-zero closed channels reached it
        self.recurrent: list[RecurrentGate] = []  # LSTM / GRU hidden units, gated on their parameters
        self.live = _live_nodes(trace.graph)  # nodes some output depends on
        self.current: fx.Node | None = None  # the node whose rule runs
        # head dims (analysis/head_dims.py, after the walk): per attention op, or why they stay whole
        self.head_dims: list[HeadDims] = []
        self.head_dims_fixed: dict[str, str] = {}
        self.rotary_tables: dict[str, int] = {}  # rotary frequency buffer -> the head-dim space slicing it

    # ---- names and values ----
    def shape(self, node: Any):
        return self.t.shape(node)

    def tensor_name(self, node: Any) -> str | None:
        return self.t.tensor_of.get(node) if isinstance(node, fx.Node) else None

    def owner(self, tensor: str) -> str:
        return tensor.rpartition(".")[0]

    def module_reading(self, tensor: str, node: fx.Node) -> str:
        """The module a layer op belongs to: its weight's owner, or, for a weight that several ops
        read (tied embeddings), the module running this op."""
        if self.t.reads.get(tensor, 0) > 1:
            return self.scope_module(node) or f"{self.owner(tensor)}@{node.name}"
        return self.owner(tensor)

    def tracked(self, arg: Any) -> ChannelInfo | None:
        value = self.info.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, ChannelInfo) else None

    def param_view(self, arg: Any) -> ParamView | None:
        value = self.info.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, ParamView) else None

    def all_tracked(self, value: Any) -> list[ChannelInfo]:
        found: list[ChannelInfo] = []
        fx.node.map_arg(value, lambda n: found.extend(_flatten_infos(self.info.get(n))))
        return found

    def sizes(self, info: ChannelInfo) -> list[int]:
        return [self.spaces.size(p) for p in info.parts]

    def width(self, info: ChannelInfo) -> int:
        return sum(self.sizes(info))

    def module_of(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    # ---- decisions ----
    def barrier(self, node: fx.Node, what: str, warn: bool = True) -> None:
        """Keep every space reaching ``node`` whole; ``warn`` lists it among the pieces not understood."""
        infos = self.all_tracked((node.args, node.kwargs))
        if infos:
            if warn:
                self.barriers.append(what)
            for info in infos:
                self.spaces.fix(info.parts, f"reaches {what}")

    def fix(self, parts: Sequence[int], reason: str) -> None:
        self.spaces.fix(parts, reason)

    def scope_module(self, node: fx.Node) -> str | None:
        """The innermost module, called once, whose forward runs ``node``."""
        stack = node.meta.get("nn_module_stack") or {}
        for entry in reversed(list(stack.values())):
            path = entry[0] if isinstance(entry, tuple) else str(entry)
            if path and self.t.calls.get(path, 0) == 1:
                return path
        return None

    def hookable(self, node: fx.Node) -> str | None:
        """The innermost module, called once, whose call returns exactly ``node`` (None if none)."""
        for name in self.t.output_of.get(node, ()):
            if self.t.calls.get(name, 0) == 1 and not isinstance(self.module_of(name), nn.ModuleList | nn.ModuleDict):
                return name
        return None

    def need_zero(self, info: ChannelInfo, reader: str, module: str | None = None) -> None:
        """A consumer reads ``info``: closed channels must be exactly zero there.

        ``module``: the module whose (only) input ``info`` is, if the consumer is one (a Linear, a
        norm). Where no module returns the non-zero channels (a position table added in the
        model's own forward), that module's input is gated instead (``GatePoint.on_input``).
        """
        if self.current is not None and self.current not in self.live:
            return  # no output depends on it (attention weights nn.MultiheadAttention returns unasked)
        key = module + INPUT_GATE if module is not None else None
        if key is not None and key in self.gate_points:
            if key not in self.emitted:
                self.emitted.add(key)
                parts = tuple((p, self.spaces.size(p)) for p in info.parts)
                self.points.append(GatePoint(module, info.dim, parts, False, None, info.repeat, on_input=True))
            return
        for part, source in zip(info.parts, info.nonzero):
            if source is None or self.spaces.is_fixed(part):
                continue
            early, late = self._regate_points(source) if isinstance(source, fx.Node) else (None, None)
            if late is not None:
                self.new_gate_points.add(late)
            elif key is not None and self._input_gateable(module):
                self.new_gate_points.add(key)
            elif early is not None:  # before a ReLU-like activation: exact, but closed gates get no task gradient
                self.new_gate_points.add(early)
            else:
                where = source.name if isinstance(source, fx.Node) else str(source)
                self.fix([part], f"{reader} reads it after '{where}', which makes zeros non-zero")

    def _input_gateable(self, module: str) -> bool:
        """Whether a forward pre-hook can gate ``module``'s input: a Linear, conv or norm called once."""
        norms = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
        layers = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, *norms)
        return self.t.calls.get(module, 0) == 1 and isinstance(self.module_of(module), layers)

    def _regate_points(self, source: fx.Node) -> tuple[str | None, str | None]:
        """Modules to gate again after ``source``, one that returns it or returns the activation chain
        that is all ``source`` feeds (timm's ``BatchNormAct2d`` applies its act inside): (the first
        such module, the first one after the chain's last ReLU-like activation). The second is None
        when no module returns the chain after that activation: a gate before it would get no task
        gradient while closed, so the reader gates its input instead where it can."""
        early = late = None
        node = source
        while True:
            name = self.hookable(node)
            if name is not None:
                early = early or name
                late = late or name
            users = list(node.users)
            if len(users) != 1 or _op_name(users[0]) not in PASS_OPS or users[0].args[0] is not node:
                return early, late
            node = users[0]
            if self.closed_gradients and dead_at_zero(node):
                late = None

    def _fold_for(self, name: str, node: fx.Node) -> str | None:
        """The module whose rows export may scale by a regate's values: the gated module itself, or
        the batch norm that the activations before ``node`` read."""
        if _foldable(self.module_of(name)):
            return name
        while _op_name(node) in PASS_OPS and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        if _op_name(node) == "batch_norm":
            stats = next((self.tensor_name(a) for a in node.args[1:5] if self.tensor_name(a)), None)
            if stats is not None and _foldable(self.module_of(self.owner(stats))):
                return self.owner(stats)
        return None

    def request_cuts(self, info: ChannelInfo, cuts: Sequence[int]) -> bool:
        """Ask the next walk to cut spaces at these channel offsets of ``info``; True if any is new."""
        new = False
        at = 0
        for p, size in zip(info.parts, self.sizes(info)):
            inner = {c - at for c in cuts if at < c < at + size}
            if inner:
                for m in self.spaces.members(p):
                    key, unit = self.spaces.spaces[m].key, self.spaces.spaces[m].unit
                    key, _, piece = key.partition("#")  # a piece of a cut output: cut the output there
                    at_raw = int(piece) if piece.isdigit() else 0
                    raw = {at_raw + c * unit for c in inner}  # cuts are kept in the producer's output entries
                    have = self.cuts.get(key, set()) | self.new_cuts.get(key, set())
                    if not raw <= have:
                        self.new_cuts.setdefault(key, set()).update(raw)
                        new = True
            at += size
        return new

    def request_units(self, info: ChannelInfo, factor: int) -> bool:
        """Ask the next walk to make every channel of ``info`` ``factor`` times coarser (a head of
        ``factor`` channels becomes one channel); True if that is new and possible."""
        if factor <= 1:
            return False
        wanted: dict[str, int] = {}
        for p in info.parts:
            if self.spaces.size(p) % factor:
                return False
            for m in self.spaces.members(p):
                space = self.spaces.spaces[m]
                key = space.key.split("#", 1)[0]
                if space.producer is None or not key.startswith("producer:"):
                    return False
                unit = space.unit * factor
                if any(c % unit for c in self.cuts.get(key, ())):
                    return False
                wanted[key] = max(wanted.get(key, 1), unit)
        new = False
        for key, unit in wanted.items():
            if unit > max(self.units.get(key, 1), self.new_units.get(key, 1)):
                self.new_units[key] = unit
                new = True
        return new

    def size_attr(self, node: fx.Node, position: int | None, info: ChannelInfo, arg_index: int = 1) -> None:
        """The forward passes a literal size for a gated dim: the size at ``position`` of the op's
        shape argument (``node.args[arg_index]``), or (``position`` None) that int argument itself
        (``split(self.split_size)``). Export sets the int attributes of the module running it that
        hold that size (``self.num_heads``) to the kept size; the self-check catches a wrong guess."""
        shape = node.args[arg_index] if len(node.args) > arg_index else None
        if position is not None:
            shape = shape[position] if isinstance(shape, (list, tuple)) and position < len(shape) else None
        if not isinstance(shape, int) or isinstance(shape, bool) or shape == -1:
            return
        stack = node.meta.get("nn_module_stack") or {}
        for entry in reversed(list(stack.values())):
            path = entry[0] if isinstance(entry, tuple) else str(entry)
            module = self.module_of(path)  # "" is the model itself (torchvision ViT: self.hidden_dim)
            if module is None:
                continue
            parts = tuple((p, self.spaces.size(p)) for p in info.parts)
            for attr, value in vars(module).items():
                if type(value) is int and value == shape and not attr.startswith("_") and not _is_index_name(attr):
                    self.size_attrs.append(SizeAttr(path, attr, parts, info.repeat))
            return

    def part_offsets(self, info: ChannelInfo) -> list[tuple[int, int]]:
        offsets, at = [], 0
        for p in info.parts:
            offsets.append((p, at))
            at += self.spaces.size(p)
        return offsets

    def slice_tensor(self, tensor: str | None, dim: int, info: ChannelInfo, offset: int = 0, repeat: int = 1) -> None:
        """Export removes closed channels of ``info``'s spaces from ``tensor`` along ``dim``."""
        if tensor is None:
            return
        if self.t.reads.get(tensor, 0) > 1:  # a tied tensor (an embedding that is also the LM head)
            key = (tensor, dim, offset, repeat * info.repeat)
            before = self.tied.setdefault(key, info)
            if before is not info:
                if self.sizes(before) != self.sizes(info):
                    self.fix(before.parts + info.parts, f"'{tensor}' is read with differently arranged channels")
                    return
                for a, b in zip(before.parts, info.parts):  # every read removes the same channels
                    self.spaces.union(a, b)
        for p, at in self.part_offsets(info):
            self.slices.append(Slice(tensor, dim, offset + at, repeat * info.repeat, p))

    def first_call(self, name: str) -> bool:
        first = name not in self.costed
        self.costed.add(name)
        return first

    def cost_parts(self, info: ChannelInfo | None, channels: int) -> tuple[tuple[int | None, int, int], ...]:
        if info is None:
            return ((None, channels, 1),)
        return tuple((p, self.spaces.size(p), info.repeat) for p in info.parts)

    def producer(
        self, node: fx.Node, name: str, channels: int, dim: int, fixed: str | None = None, foldable: bool = True
    ) -> ChannelInfo:
        """The output of a layer that makes new channels (Conv, Linear): new spaces, and its gate.

        ``name`` is the module owning the weight. The output is cut into several spaces where a
        walk asked for it (the model splits this output). The gate goes at the module's output,
        or after the BatchNorm that is its only user (then after the activations that follow).
        """
        if any(name == e or name.startswith(e + ".") for e in self.excluded):
            fixed = "excluded by the user"
        elif self.t.reads.get(_weight_of(self, node) or "", 1) > 1:
            fixed = "module is called more than once"
        key = f"producer:{name}"
        fixed = fixed or self.spaces.forced_fixed.get(key)
        cuts = sorted(c for c in self.cuts.get(key, ()) if 0 < c < channels)
        bounds = [0, *cuts, channels]
        unit = self.units.get(key, 1)
        if any((b - a) % unit for a, b in zip(bounds[:-1], bounds[1:])):
            unit = 1
        if cuts:
            pieces = zip(bounds[:-1], bounds[1:])
            parts = tuple(self.spaces.new((b - a) // unit, f"{key}#{a}", name, fixed, unit) for a, b in pieces)
        else:
            parts = (self.spaces.new(channels // unit, key, name, fixed, unit),)
        sized = tuple((p, self.spaces.size(p)) for p in parts)
        module = self.module_of(name)
        point, fold = (None, None) if name in self.suppressed else self._gate_point_for(node, name)
        if point is not None:
            self.placed_by[point] = name
        if point == name and node in self.t.output_of and name in self.t.output_of[node]:
            replace = type(module) in (nn.Conv2d, nn.Linear) and _op_name(node) in ("conv2d", "linear") and unit == 1
            self.points.append(GatePoint(name, dim, sized, replace, name if foldable else None, unit))
            self.emitted.add(name)
            return ChannelInfo(parts, dim, (None,) * len(parts), unit)
        if point is not None and point != name:
            self.gate_points.add(point)
            self.fold_of[point] = fold
            if isinstance(module, nn.Conv2d) and len(parts) == 1 and unit == 1:
                self.after_norm.append((name, parts[0]))
        return ChannelInfo(parts, dim, (node,) * len(parts), unit)

    def _gate_point_for(self, node: fx.Node, name: str) -> tuple[str | None, str | None]:
        """(module to gate, module to fold gate values into) for a producer's output.

        The gate goes at a module output in the chain of the producer, its BatchNorm (if it is the
        only user) and the activations after them: the last one after a BatchNorm, else the first.
        No gate goes before a ReLU-like activation (a closed gate there would get no task gradient):
        the chain then goes on through a residual add and the activations after it (a ResNet block
        returns ``relu(bn2(conv2(h)) + x)``, gated at the block's output), and where no module
        returns it after the activation, the point is None and the readers gate the channels
        (:meth:`need_zero`).
        """
        chain = [node]
        fold = name
        users = list(node.users)
        if len(users) == 1 and _op_name(users[0]) == "batch_norm" and users[0].args[0] is node:
            bn = users[0]
            stats = next((self.tensor_name(a) for a in bn.args[1:5] if self.tensor_name(a)), None)
            if stats is None or self.t.reads.get(stats, 0) != 1:
                point = self.hookable(node)
                return (name, name) if point == name else (None, None)
            chain, fold = [bn], self.owner(stats)
        self._extend(chain)
        added = len(chain)  # residual adds, then activations: where a ReLU after the adds would kill the gate
        while self.closed_gradients and len(chain[-1].users) == 1:
            last = next(iter(chain[-1].users))
            if not _residual_add(last, chain[-1]):
                break
            chain.append(last)  # (RepVGG adds three branches: two adds)
            self._extend(chain)
        valid = [
            (i, point)
            for i, point in ((i, self.hookable(n)) for i, n in enumerate(chain))
            if point is not None
            and not (chain[i] is node and point != name)
            and not (self.closed_gradients and any(dead_at_zero(n) for n in chain[i + 1 :]))
        ]
        if not valid:
            return None, None
        before = [(i, p) for i, p in valid if i < added]
        if before:  # after a BatchNorm the last module output; without one the producer itself (a Gated layer)
            i, point = before[-1] if fold != name else before[0]
            return point, fold
        return valid[0][1], None  # after the add: nothing to fold into

    @staticmethod
    def _extend(chain: list[fx.Node]) -> None:
        """Append the activations that are all the chain's last value feeds."""
        while len(chain[-1].users) == 1:
            nxt = next(iter(chain[-1].users))
            if _op_name(nxt) not in ACTIVATION_OPS or nxt.args[0] is not chain[-1]:
                break
            chain.append(nxt)

    # ---- the walk ----
    def run(self) -> None:
        from tg_kernels.pruning.analysis.rules import RULES

        for node in self.t.graph.nodes:
            if node.op == "placeholder":
                name = self.tensor_name(node)
                self.info[node] = ParamView(name, tuple(range(len(self.shape(node) or ())))) if name else None
                continue
            if node.op == "output":
                for info in self.all_tracked(node.args):
                    self.fix(info.parts, "model output")
                continue
            if node.op != "call_function":
                self.barrier(node, f"'{node.op}' node '{node.name}'")
                self.info[node] = None
                continue
            name = _op_name(node)
            rule = RULES.get(name)
            tracked = self.all_tracked((node.args, node.kwargs))
            if name not in STACK_OPS and any(isinstance(self.info.get(a), StackedInfo) for a in node.all_input_nodes):
                self.barrier(node, f"'{name}' of stacked channel pieces at '{node.name}'")
                self.info[node] = None
                continue
            if rule is None:
                if tracked:
                    self.barrier(node, f"'{name}' at '{node.name}' (no rule for this op)")
                self.info[node] = None
                continue
            self.current = node
            out = rule(self, node)
            self.current = None
            if isinstance(out, ChannelInfo):
                out = self._emit(node, out)
            self.info[node] = out

    def _emit(self, node: fx.Node, info: ChannelInfo) -> ChannelInfo:
        """Apply a requested gate where ``node`` is the output of a gated module."""
        for name in self.t.output_of.get(node, ()):
            if name in self.gate_points and name not in self.emitted:
                self.emitted.add(name)
                self.needed[name] = any(s is not None for s in info.nonzero)
                parts = tuple((p, self.spaces.size(p)) for p in info.parts)
                fold = self.fold_of[name] if name in self.fold_of else self._fold_for(name, node)
                self.points.append(GatePoint(name, info.dim, parts, False, fold, info.repeat))
                return ChannelInfo(info.parts, info.dim, (None,) * len(info.parts), info.repeat)
        return info


# Elementwise activations with f(0) = 0 (the walk moves gates past them; dead_at_zero checks which
# of them have derivative 0 at 0 numerically).
ACTIVATIONS = {
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "hardtanh",
    "tanh",
    "softsign",
    "softshrink",
    "hardshrink",
    "prelu",
}
# ... and the ops that copy or drop entries, which keep zeros too.
ACTIVATION_OPS = ACTIVATIONS | {"dropout", "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias", "detach"}


# Suffix of a gate point key that gates a module's input (GatePoint.on_input), not its output.
INPUT_GATE = "#input"


# Ops a regate may move past: zero-preserving, one input, channels kept (only their position moves).
PASS_OPS = ACTIVATION_OPS | {"permute", "transpose", "view", "reshape", "_unsafe_view", "flatten", "to", "_to_copy"}


def at_zero(op: Any, args: tuple, kwargs: dict) -> tuple[float, float]:
    """(f(0), f'(0)) of an elementwise op, in float64 (read off with autograd, not from a table)."""
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    y = op(z, *args, **kwargs)
    (d,) = torch.autograd.grad(y.sum(), z, allow_unused=True)
    return float(y.detach()[0]), 0.0 if d is None else float(d[0])


def functional(op: Any) -> Any:
    """The out-of-place form of an in-place ATen op (``relu_`` -> ``relu``); other ops as they are."""
    name = getattr(op, "_opname", "")
    if name.endswith("_") and not name.startswith("_"):
        packet = getattr(torch.ops.aten, name[:-1], None)
        if packet is not None and hasattr(packet, op._overloadname):
            return getattr(packet, op._overloadname)
    return op


def constant(value: Any) -> bool:
    """Whether an op argument is a constant (no graph value in it)."""
    if isinstance(value, (list, tuple)):
        return all(constant(v) for v in value)
    return not isinstance(value, fx.Node) and (value is None or isinstance(value, (int, float, bool, str, torch.dtype)))


_DEAD_CACHE: dict[tuple[Any, str], bool] = {}


def dead_at_zero(node: fx.Node) -> bool:
    """Whether ``node`` is an activation that keeps 0 at 0 with derivative 0 there (ReLU, ReLU6,
    hardshrink): a closed gate right before it gets no task gradient, so gates go after it."""
    if node.op != "call_function" or _op_name(node) not in ACTIVATIONS:
        return False
    args, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if not constant(list(args)) or not constant(list(kwargs.values())):
        return False
    key = (node.target, repr((args, sorted(kwargs.items()))))
    if key not in _DEAD_CACHE:
        try:
            f0, d0 = at_zero(functional(node.target), args, kwargs)
        except Exception:  # an overload that does not take float64 scalars: treat it as live
            f0, d0 = 1.0, 1.0
        _DEAD_CACHE[key] = f0 == 0.0 and d0 == 0.0
    return _DEAD_CACHE[key]


def _residual_add(node: fx.Node, operand: fx.Node) -> bool:
    """``operand + other`` (or ``other + operand``) of two tensors, as a residual connection adds."""
    if _op_name(node) != "add" or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b and operand in (a, b)


def _is_index_name(attr: str) -> bool:
    """An attribute that names a position (``layer_idx``), never a size: size attributes leave it alone."""
    return attr.endswith(("idx", "index", "_id")) or attr in ("id", "rank")


def _foldable(module: nn.Module | None) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):
        return not module.transposed
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine and getattr(module, "bias", None) is not None
    return isinstance(module, nn.Linear) or (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine)


def _weight_of(w: Walk, node: fx.Node) -> str | None:
    return w.tensor_name(node.args[1]) if len(node.args) > 1 else None


def _op_name(node: fx.Node) -> str:
    return target_name(node.target)


def target_name(target: Any) -> str:
    """An ATen op's name without overload or in-place suffix (``aten.relu_.default`` -> ``relu``)."""
    name = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


# Ops that accept a StackedInfo (pieces of channels along one dim): they pick pieces or move dims.
STACK_OPS = {"permute", "transpose", "unbind", "select", "getitem", "clone", "contiguous", "alias", "detach", "squeeze"}


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that the graph's outputs (user outputs and buffer updates) depend on."""
    live: set[fx.Node] = set()
    stack = [node for node in graph.nodes if node.op == "output"]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


def _flatten_infos(value: Any) -> list[ChannelInfo]:
    if isinstance(value, ChannelInfo):
        return [value]
    if isinstance(value, StackedInfo):
        return list(value.items)
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _flatten_infos(v)]
    return []


# --------------------------------------------------------------------------------------------------
# Repeat until stable, then the result
# --------------------------------------------------------------------------------------------------


def analyze_export(
    model: nn.Module, trace: Trace, excluded: set[str] | None = None, closed_gradients: bool = True
) -> Analysis:
    """Analyse a model from its export trace (see the module docstring). ``closed_gradients``: place
    no gate right before a ReLU-like activation (see ``attach_gates``)."""
    gate_points: set[str] = set()
    requested: set[str] = set()
    forced_fixed: dict[str, str] = {}
    cuts: dict[str, set[int]] = {}
    units: dict[str, int] = {}

    suppressed: frozenset[str] = frozenset()

    def walk(points: set[str]) -> Walk:
        w = Walk(model, trace, points, forced_fixed, cuts, set(excluded or ()), units, closed_gradients, suppressed)
        w.run()
        return w

    def learned(w: Walk, points: set[str]) -> bool:
        return bool(
            w.new_gate_points - points or set(w.spaces.new_fixed) - set(forced_fixed) or w.new_cuts or w.new_units
        )

    for _ in range(200):
        w = walk(set(gate_points))
        if not learned(w, gate_points):
            break
        if w.new_cuts or w.new_units:  # they change the spaces: what this walk fixed or gated may not hold after them
            for key, c in w.new_cuts.items():
                cuts.setdefault(key, set()).update(c)
            units.update(w.new_units)
            continue
        requested |= w.new_gate_points - gate_points
        gate_points |= w.new_gate_points
        forced_fixed.update(w.spaces.new_fixed)
    else:  # pragma: no cover - each walk only adds
        raise AnalysisError("channel analysis did not converge")
    # A gate point requested early may have become unnecessary (a later regate upstream made the
    # channels zero anyway); drop those, since export cannot fold gates into every kind of module.
    for _ in range(len(requested) + 1):
        idle = {name for name in requested & gate_points if not w.needed.get(name, True)}
        if not idle:
            break
        trial = gate_points - idle
        tried = walk(set(trial))
        if learned(tried, trial):  # dropping them all at once does not hold: drop them one by one
            for name in sorted(idle):
                one = gate_points - {name}
                if not learned(walk(set(one)), one):
                    gate_points = one
            break
        gate_points, w = trial, tried
    w = walk(set(gate_points))
    result = finish(model, trace, w)
    if not closed_gradients:
        return result
    # A producer's gate whose closed gates get no task gradient because a later gate of the group
    # zeros the channels again (MobileNetV2: expand -> gate -> depthwise -> BatchNorm -> gate) is not
    # needed where the ops between keep channels apart: leave it out, so that the later gate's
    # closed channels carry the producer's values (and a task gradient) instead of BatchNorm's beta,
    # unless that leaves the later gate without a side-pass recipe (exact training would then run
    # its group at full width).
    dead = sorted({w.placed_by[sp.point] for sp in result.side_passes if sp.dead and sp.point in w.placed_by})
    kept: frozenset[str] = frozenset()

    def without_recipe(a: Analysis) -> set[str]:
        name_of = {g.space: g.name for g in a.groups}
        return {name_of.get(a.root_of.get(sp.space), "") for sp in a.side_passes if sp.reason is not None}

    slow = without_recipe(result)

    finished: dict[frozenset[str], Analysis] = {}  # left-out set -> its result, where that held

    def holds(trial: Walk) -> bool:  # exact as before, and no group newly without a side-pass recipe
        if learned(trial, gate_points):
            return False
        analysis = finish(model, trace, trial)
        if without_recipe(analysis) <= slow:
            finished[suppressed] = analysis
            return True
        return False

    def leave_out(names: list[str]) -> None:  # all at once where that holds, else by halves
        nonlocal suppressed, kept
        suppressed = kept | set(names)
        if holds(walk(set(gate_points))):
            kept = suppressed
        elif len(names) > 1:
            leave_out(names[: len(names) // 2])
            leave_out(names[len(names) // 2 :])
        suppressed = kept

    if dead:
        leave_out(dead)
    if not kept:
        return result
    return finished[kept] if kept in finished else finish(model, trace, walk(set(gate_points)))


def _checked_widths(model: nn.Module, w: Walk) -> list[SizeAttr]:
    """Int attributes that a ``torch.nn`` forward compares with a gated width in Python, outside the
    graph: ``nn.Transformer`` checks that src and tgt are ``d_model`` wide (the width its encoder's
    final norm normalises over)."""
    norms = dict(w.norms)
    found = []
    for name, module in model.named_modules():
        norm = f"{name}.encoder.norm" if name else "encoder.norm"
        if isinstance(module, nn.Transformer) and norm in norms:
            found.append(SizeAttr(name, "d_model", norms[norm], 1))
    return found


def finish(model: nn.Module, trace: Trace, w: Walk) -> Analysis:
    """The result of a stable walk."""
    from tg_kernels.pruning.analysis.head_dims import find_head_dims

    w.size_attrs.extend(_checked_widths(model, w))
    find_head_dims(w)
    sp = w.spaces
    roots: dict[int, list[int]] = {}
    for s in range(len(sp)):
        roots.setdefault(sp.find(s), []).append(s)
    groups: dict[int, Group] = {}
    fixed: dict[str, str] = {}
    for root, members in sorted(roots.items()):
        producers = list(dict.fromkeys(sp.spaces[m].producer for m in members if sp.spaces[m].producer))
        reason = next((sp.spaces[m].fixed for m in members if sp.spaces[m].fixed), None)
        if reason is not None:
            for prod in producers:
                fixed.setdefault(prod, reason)
            continue
        if not producers:
            continue
        first = next(sp.spaces[m] for m in members if sp.spaces[m].producer)
        label = first.key.split(":", 1)[1]
        groups[root] = Group(root, label.replace("#", "_"), sp.size(root), producers)
    root_of = {s: sp.find(s) for s in range(len(sp)) if sp.find(s) in groups}
    for sl in dict.fromkeys(w.slices):
        if sl.space in root_of:
            groups[root_of[sl.space]].slices.append(sl)
    for name in [n for n in fixed if any(n in g.producers for g in groups.values())]:
        del fixed[name]  # a producer cut into pieces: some gated, some not
    fixed.update(w.head_dims_fixed)

    def gated(parts):
        return tuple((root_of.get(s), size) for s, size in parts)

    def gated_dims(dims):  # per part: () or (space, size) parts
        dims = tuple(gated(d) for d in dims)
        return dims if any(r is not None for d in dims for r, _ in d) else ()

    points: dict[tuple[str, bool], GatePoint] = {}
    for gp in w.points:
        parts = gated(gp.parts)
        if (all(r is None for r, _ in parts) and not gated_dims(gp.dims)) or (gp.module, gp.on_input) in points:
            continue
        replace = gp.replace and len(parts) == 1
        points[gp.module, gp.on_input] = GatePoint(
            gp.module, gp.dim, parts, replace, gp.fold, gp.repeat, gp.on_input, gated_dims(gp.dims)
        )

    def cost(parts):
        return tuple((root_of.get(s) if s is not None else None, size, rep) for s, size, rep in parts)

    layers = [
        LayerCost(
            lc.module,
            lc.kind,
            lc.flops_per_pair,
            lc.params_per_pair,
            lc.bias_per_out,
            cost(lc.in_parts),
            cost(lc.out_parts),
            lc.depthwise,
            lc.count_params,
            gated_dims(lc.in_dims),
            gated_dims(lc.out_dims),
        )
        for lc in w.layers
    ]
    counted = {lc.module for lc in layers}
    other_params = sum(
        param.numel()
        for name, param in model.named_parameters()
        if name not in counted and (name.rsplit(".", 1)[0] if "." in name else "") not in counted
    )
    other_flops = w.other_flops
    for node in trace.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node)
        if name == "scaled_dot_product_attention":
            q, k, v = (trace.shape(a) for a in node.args[:3])
            if q is not None and k is not None and v is not None:
                w.flops_of[node] = 2.0 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
        elif name in ("baddbmm", "einsum") and trace.shape(node) is not None:
            shapes = [trace.shape(a) for a in node.all_input_nodes]
            if name == "baddbmm" and len(shapes) == 3 and shapes[1] is not None:
                w.flops_of[node] = 2.0 * math.prod(trace.shape(node)) * shapes[1][-1]
        if node in w.flops_of and node not in w.costed_nodes:
            other_flops += w.flops_of[node]
    covered = 0.0
    uncovered: dict[str, float] = {}
    for lc in layers:
        f = lc.flops_per_pair * _pairs(lc)
        if _gated(lc):
            covered += f
        elif f:
            reason = fixed.get(lc.module, "its channels are never gated")
            uncovered[reason] = uncovered.get(reason, 0.0) + f
    if other_flops:
        uncovered["attention and other ops whose cost does not depend on gates"] = other_flops
    total = covered + sum(uncovered.values())
    from tg_kernels.pruning.analysis.gradients import side_passes

    gate_points = list(points.values())
    return Analysis(
        groups=list(groups.values()),
        gate_points=gate_points,
        layers=layers,
        fixed=fixed,
        barriers=list(dict.fromkeys(w.barriers)),
        root_of=root_of,
        other_params=other_params,
        other_flops=other_flops,
        after_norm=[(name, space) for name, space in w.after_norm if space in root_of],
        conv_inputs=[
            (name, tuple((root_of.get(s), size) for s, size in parts))
            for name, parts in w.conv_inputs
            if any(s in root_of for s, _ in parts)
        ],
        tracer="export",
        norms=[(name, gated(parts)) for name, parts in w.norms if any(s in root_of for s, _ in parts)],
        coverage=covered / total if total else 0.0,
        uncovered=uncovered,
        size_attrs=[
            SizeAttr(sa.module, sa.attr, gated(sa.parts), sa.repeat, gated(sa.dims))
            for sa in dict.fromkeys(w.size_attrs)
            if any(s in root_of for s, _ in sa.parts + sa.dims)
        ],
        side_passes=side_passes(model, w, root_of, gate_points),
        recurrent=[
            RecurrentGate(rg.module, root_of[rg.space], rg.size, rg.block, rg.blocks)
            for rg in dict.fromkeys(w.recurrent)
            if rg.space in root_of
        ],
        head_dims=[
            HeadDims(
                hd.module,
                hd.node,
                root_of.get(hd.space) if hd.space is not None else None,
                hd.size,
                hd.reason,
                hd.scored,
            )
            for hd in w.head_dims
        ],
    )


def _pairs(lc: LayerCost) -> float:
    a = sum(size * rep for _, size, rep in lc.in_parts)
    b = sum(size * rep for _, size, rep in lc.out_parts)
    return b if lc.depthwise else a * b


def _gated(lc: LayerCost) -> bool:
    return any(s is not None for s, _, _ in lc.in_parts + lc.out_parts)


def _prod(xs) -> int:
    return math.prod(xs)


__all__ = ["ParamView", "Walk", "analyze_export", "finish"]
