"""The state of one analysis pass over a model's export graph, and the API the op rules call.

A :class:`Walk` visits the graph's nodes in order and gives each node's value a
:class:`~tg_kernels.pruning.analysis.types.ChannelInfo` (which channel spaces lie along which dim,
and whether closed channels are exactly zero there) from the rule of its ATen op (a table such as
:data:`~tg_kernels.pruning.analysis.rules.RULES`, passed to :meth:`Walk.run`). A walk learns things
that the next walk must use: a module output to gate again ("regate", where a norm or a
non-zero-preserving op sits between a gate and a consumer), a space to keep whole, a producer whose
output the model cuts into pieces (``split``, ``chunk``, slicing), heads to treat as one channel.
The driver (:mod:`tg_kernels.pruning.analysis.driver`) repeats walks until nothing new is learned.

What a rule may call (``rule(walk, node) -> value info``):

- read its inputs: :meth:`Walk.tracked` (a :class:`ChannelInfo` or None), :meth:`Walk.all_tracked`,
  :meth:`Walk.param_view`, :meth:`Walk.value` (any value info), :meth:`Walk.shape`,
  :meth:`Walk.tensor_name`, :meth:`Walk.reads`, :meth:`Walk.is_input`; the channels' sizes:
  :meth:`Walk.sizes`, :meth:`Walk.sized`, :meth:`Walk.width`, :meth:`Walk.part_offsets`;
  and the model: :meth:`Walk.owner`, :meth:`Walk.module_of`, :meth:`Walk.module_reading`,
  :meth:`Walk.scope_module`, :meth:`Walk.is_excluded`;
- couple channels: :meth:`Walk.tie` (share gates one to one), :meth:`Walk.producer` (new channels
  and their gate), :meth:`Walk.new_space`;
- keep channels whole: :meth:`Walk.barrier` (the op is not understood, named in a warning),
  :meth:`Walk.fix` (with a reason);
- ask for zeros: :meth:`Walk.need_zero` (a consumer reads the channels);
- ask the next walk for finer or coarser spaces: :meth:`Walk.request_cuts`, :meth:`Walk.request_units`;
- tell export what to change: :meth:`Walk.slice_tensor`, :meth:`Walk.size_attr`,
  :meth:`Walk.norm_over`, :meth:`Walk.conv_input`, :meth:`Walk.add_recurrent`;
- count costs: :meth:`Walk.add_layer` (a :class:`LayerCost`, built with :meth:`Walk.cost_parts` and
  :meth:`Walk.first_call`), :meth:`Walk.add_flops` (an op's FLOPs, for the coverage report).

Everything else on a :class:`Walk` is its own bookkeeping, read by the driver and the passes that
run on the stable walk (head dims, side passes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from tg_kernels.pruning.analysis.aten import ACTIVATION_OPS, PASS_OPS, STACK_OPS, dead_at_zero, op_name
from tg_kernels.pruning.analysis.spaces import Spaces
from tg_kernels.pruning.analysis.tracing import Trace
from tg_kernels.pruning.analysis.types import (
    ChannelInfo,
    GatePoint,
    LayerCost,
    RecurrentGate,
    SizeAttr,
    Slice,
    StackedInfo,
)

# Suffix of a gate point key that gates a module's input (GatePoint.on_input), not its output.
INPUT_GATE = "#input"


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
        self.costed: set[str] = set()
        self.after_norm: list[tuple[str, int]] = []
        self.conv_inputs: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self.norms: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self.fold_of: dict[str, str | None] = {}
        self.flops_of: dict[fx.Node, float] = {}  # every op's FLOPs, for the coverage report
        self.costed_nodes: set[fx.Node] = set()  # op nodes whose FLOPs a LayerCost counts
        self.needed: dict[str, bool] = {}  # gate point -> whether non-zero closed channels reached it
        self.recurrent: list[RecurrentGate] = []  # LSTM / GRU hidden units, gated on their parameters
        self.live = _live_nodes(trace.graph)  # nodes some output depends on
        self.current: fx.Node | None = None  # the node whose rule runs

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

    def reads(self, tensor: str) -> int:
        """How many op nodes read parameter or buffer ``tensor`` (more than 1: tied or reused)."""
        return self.t.reads.get(tensor, 0)

    def is_input(self, node: Any) -> bool:
        """Whether ``node`` is one of the user's inputs to the model."""
        return isinstance(node, fx.Node) and node in self.t.inputs

    def value(self, arg: Any) -> Any:
        """What the walk knows of ``arg``'s value: a :class:`ChannelInfo`, :class:`StackedInfo`,
        :class:`ParamView`, :class:`Filled`, a list of those (an op returning several values), or None."""
        return self.info.get(arg) if isinstance(arg, fx.Node) else None

    def tracked(self, arg: Any) -> ChannelInfo | None:
        """``arg``'s gated channels (None for a value that carries none)."""
        value = self.value(arg)
        return value if isinstance(value, ChannelInfo) else None

    def param_view(self, arg: Any) -> ParamView | None:
        value = self.value(arg)
        return value if isinstance(value, ParamView) else None

    def all_tracked(self, value: Any) -> list[ChannelInfo]:
        found: list[ChannelInfo] = []
        fx.node.map_arg(value, lambda n: found.extend(_flatten_infos(self.info.get(n))))
        return found

    def sizes(self, info: ChannelInfo) -> list[int]:
        return [self.spaces.size(p) for p in info.parts]

    def sized(self, info: ChannelInfo) -> tuple[tuple[int, int], ...]:
        """``info``'s parts as ``(space, size)`` (as :class:`GatePoint` and :class:`SizeAttr` hold them)."""
        return tuple((p, self.spaces.size(p)) for p in info.parts)

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
        """Keep these spaces whole (ungated) for ``reason``; the next walks agree."""
        self.spaces.fix(parts, reason)

    def tie(self, a: Sequence[int], b: Sequence[int]) -> None:
        """Part ``i`` of ``a`` and part ``i`` of ``b`` share their gates (a residual add, a cat of
        coupled values, the groups of a grouped conv, the heads of q, k and v)."""
        for pa, pb in zip(a, b):
            self.spaces.union(pa, pb)

    def new_space(
        self, size: int, key: str, producer: str | None = None, fixed: str | None = None, unit: int = 1
    ) -> int:
        """The space named ``key`` (made on first use; see :meth:`Spaces.new`)."""
        return self.spaces.new(size, key, producer, fixed, unit)

    def is_excluded(self, module: str) -> bool:
        """Whether the user excluded ``module`` (or a module containing it) from gating."""
        return any(module == e or module.startswith(e + ".") for e in self.excluded)

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
                self.points.append(
                    GatePoint(module, info.dim, self.sized(info), False, None, info.repeat, on_input=True)
                )
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
            if len(users) != 1 or op_name(users[0]) not in PASS_OPS or users[0].args[0] is not node:
                return early, late
            node = users[0]
            if self.closed_gradients and dead_at_zero(node):
                late = None

    def _fold_for(self, name: str, node: fx.Node) -> str | None:
        """The module whose rows export may scale by a regate's values: the gated module itself, or
        the batch norm that the activations before ``node`` read."""
        if _foldable(self.module_of(name)):
            return name
        while op_name(node) in PASS_OPS and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        if op_name(node) == "batch_norm":
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
            parts = self.sized(info)
            for attr, value in vars(module).items():
                if type(value) is int and value == shape and not attr.startswith("_") and not _is_index_name(attr):
                    self.size_attrs.append(SizeAttr(path, attr, parts, info.repeat))
            return

    def size_list(self, node: fx.Node, pieces: list[ChannelInfo]) -> None:
        """The forward passes a literal list of sizes of a gated dim (``torch.split(x, self.splits)``):
        export sets the list attribute of the module running it that holds those sizes, entry by
        entry, to the pieces' kept sizes; the self-check catches a wrong guess."""
        sizes = node.args[1] if len(node.args) > 1 else None
        if not isinstance(sizes, (list, tuple)) or not all(type(s) is int for s in sizes):
            return
        for entry in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
            path = entry[0] if isinstance(entry, tuple) else str(entry)
            module = self.module_of(path)
            if module is None:
                continue
            for attr, value in vars(module).items():
                if (
                    isinstance(value, (list, tuple))
                    and not attr.startswith("_")
                    and all(type(v) is int for v in value)
                    and list(value) == list(sizes)
                ):
                    for i, piece in enumerate(pieces):
                        self.size_attrs.append(SizeAttr(path, attr, self.sized(piece), piece.repeat, index=i))
            return

    def part_offsets(self, info: ChannelInfo) -> list[tuple[int, int]]:
        """``(space, its first channel)`` for each part of ``info``."""
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
        """``info``'s parts as a :class:`LayerCost` counts them, ``(space, size, repeat)``; without
        ``info``, ``channels`` channels that are never gated."""
        if info is None:
            return ((None, channels, 1),)
        return tuple((p, self.spaces.size(p), info.repeat) for p in info.parts)

    # ---- costs and what export changes besides slices ----
    def add_layer(self, cost: LayerCost, op: fx.Node | None = None) -> None:
        """Count a layer's FLOPs and parameters as a function of its open channels; ``op``: the node
        whose FLOPs (:meth:`add_flops`) this cost counts, so that the coverage report does not
        count them again as ungated."""
        self.layers.append(cost)
        if op is not None:
            self.costed_nodes.add(op)

    def add_flops(self, node: fx.Node, flops: float) -> None:
        """An op's FLOPs on the example inputs (for the share of the model's FLOPs that gates control)."""
        self.flops_of[node] = flops

    def norm_over(self, module: str, info: ChannelInfo) -> None:
        """``module`` normalises (or averages) over ``info``'s channels: at full width it must compute
        its statistics over the open channels only (``Analysis.norms``)."""
        self.norms.append((module, self.sized(info)))

    def conv_input(self, module: str, info: ChannelInfo) -> None:
        """Conv2d ``module`` (groups 1) reads ``info``'s channels (``Analysis.conv_inputs``)."""
        self.conv_inputs.append((module, self.sized(info)))

    def add_recurrent(self, gate: RecurrentGate) -> None:
        """Hidden units gated inside an LSTM / GRU / RNN's recurrence (``Analysis.recurrent``)."""
        self.recurrent.append(gate)

    # ---- edits by the passes that run on the stable walk (head dims) ----
    def add_slice(self, sl: Slice) -> None:
        self.slices.append(sl)

    def set_point(self, index: int, point: GatePoint) -> None:
        self.points[index] = point

    def set_layer(self, index: int, cost: LayerCost) -> None:
        self.layers[index] = cost

    def set_size_attr(self, index: int, attr: SizeAttr) -> None:
        self.size_attrs[index] = attr

    def add_size_attrs(self, attrs: Sequence[SizeAttr]) -> None:
        self.size_attrs.extend(attrs)

    def producer(
        self, node: fx.Node, name: str, channels: int, dim: int, fixed: str | None = None, foldable: bool = True
    ) -> ChannelInfo:
        """The output of a layer that makes new channels (Conv, Linear): new spaces, and its gate.

        ``name`` is the module owning the weight. The output is cut into several spaces where a
        walk asked for it (the model splits this output). The gate goes at the module's output,
        or after the BatchNorm that is its only user (then after the activations that follow).
        """
        if self.is_excluded(name):
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
            replace = type(module) in (nn.Conv2d, nn.Linear) and op_name(node) in ("conv2d", "linear") and unit == 1
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
        if len(users) == 1 and op_name(users[0]) == "batch_norm" and users[0].args[0] is node:
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
            if op_name(nxt) not in ACTIVATION_OPS or nxt.args[0] is not chain[-1]:
                break
            chain.append(nxt)

    # ---- the walk ----
    def run(self, rules: Mapping[str, Any]) -> None:
        """Visit every node in graph order; ``rules``: op name -> ``rule(walk, node)`` (an op
        without a rule is a barrier for every gated value that reaches it)."""
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
            name = op_name(node)
            rule = rules.get(name)
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
                fold = self.fold_of[name] if name in self.fold_of else self._fold_for(name, node)
                self.points.append(GatePoint(name, info.dim, self.sized(info), False, fold, info.repeat))
                return ChannelInfo(info.parts, info.dim, (None,) * len(info.parts), info.repeat)
        return info


def _residual_add(node: fx.Node, operand: fx.Node) -> bool:
    """``operand + other`` (or ``other + operand``) of two tensors, as a residual connection adds."""
    if op_name(node) != "add" or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
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


__all__ = ["INPUT_GATE", "Filled", "ParamView", "Walk"]
