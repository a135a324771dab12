"""The torch.fx channel analysis (the fallback for models that torch.export cannot trace).

The model is traced with ``torch.fx`` (analysis only: the model keeps running its own code) and
run once on the example inputs to learn every tensor's shape. Each traced value that carries
channels gets a :class:`ChannelInfo`: its channel dimension and the list of *spaces* its channels
come from. A space is created by a producer (a Conv or Linear output) and merged with others where
an elementwise op couples channels (a residual add shares one gate); ``cat`` concatenates spaces;
a depthwise conv passes its input's spaces through. Anything the analysis does not understand is a
*barrier*: the spaces that reach it are fixed (kept whole, ungated) and named in a warning.

Gates must zero what consumers read (docs/design.md §4). A producer is gated at its output, or after
the BatchNorm that is its only user. Ops that keep a zero channel zero (ReLU, pooling, ``mul``, a
bias-free depthwise conv) pass the property on; ops that do not (a norm layer, ``sigmoid``) break
it, and a consumer that reads such a value asks for the gate to be applied again right after that
module ("regate"), or, where that is no module, fixes the space. The analysis repeats until
stable. The result, :class:`Analysis`, lists the gate groups with every tensor that export must
slice, the gate points, and the per-layer costs the budget needs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from tg_kernels.pruning.analysis.spaces import Spaces, remap
from tg_kernels.pruning.analysis.types import (
    Analysis,
    AnalysisError,
    ChannelInfo,
    GatePoint,
    Group,
    LayerCost,
    Slice,
)

# Modules and functions that map a zero channel to a zero channel and keep channel positions.
ZERO_PRESERVING_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Tanhshrink,
    nn.Softsign,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
POOLING_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)  # they act on the dims after the channel dim and map a zero channel to a zero channel
# Activations a producer's gate may move past (after its BatchNorm), so closed gates keep a gradient.
ACTIVATION_MODULES = tuple(
    m for m in ZERO_PRESERVING_MODULES if m not in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
)
NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_MODULES = (nn.modules.batchnorm._BatchNorm,)

_ZERO_PRESERVING_NAMES = {
    "relu",
    "relu_",
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
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "stochastic_depth",
    "contiguous",
    "clone",
    "detach",
    "float",
    "half",
    "double",
    "bfloat16",
    "to",
    "type_as",
    "neg",
    "abs",
    "square",
}
_NONZERO_NAMES = {"sigmoid", "hardsigmoid", "exp", "softplus", "cos", "sigmoid_"}
_POOLING_NAMES = {
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "adaptive_max_pool2d",
    "interpolate",
    "upsample",
}
_REDUCTION_NAMES = {"mean", "sum", "amax", "amin"}
_HARMLESS_NAMES = {"size", "dim", "getattr", "_assert", "eq", "ne", "floordiv", "mul_int", "numel", "len", "_shape"}
_BINARY = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.iadd: "add",
    operator.imul: "mul",
    torch.add: "add",
    torch.sub: "sub",
    torch.mul: "mul",
    torch.div: "div",
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
}


class _Tracer(fx.Tracer):
    """A tracer that treats some extra modules as leaves and remembers where tracing failed."""

    def __init__(self, extra_leaves: set[str]) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.extra_leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None and not self.is_leaf_module(m, qualname):
                self.failed_in = qualname
            raise


def trace(model: nn.Module, leaves: set[str] | None = None) -> tuple[fx.Graph, set[str]]:
    """Trace `model`, turning submodules that fail to trace into leaves; return graph and those leaves.

    Raises the tracing error when the model's own forward (outside any submodule) cannot be traced.
    """
    leaves = set(leaves or ())
    while True:
        tracer = _Tracer(leaves)
        try:
            return tracer.trace(model), leaves
        except Exception:
            if tracer.failed_in is None or tracer.failed_in in leaves:
                raise
            leaves.add(tracer.failed_in)


def _summarize(value: Any) -> Any:
    """What the analysis keeps of a run-time value: shapes of tensors, the rest as is."""
    if isinstance(value, Tensor):
        return torch.Size(value.shape)
    if isinstance(value, (tuple, list)):
        return type(value)(_summarize(v) for v in value)
    return value


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and records a summary (shapes) of every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = _summarize(result)
        return result


# --------------------------------------------------------------------------------------------------
# The analysis pass
# --------------------------------------------------------------------------------------------------


class _Pass:
    """One propagation over the graph with fixed gate points; collects requests for the next pass."""

    def __init__(
        self,
        model: nn.Module,
        graph: fx.Graph,
        shapes: dict[fx.Node, Any],
        gate_points: set[str],
        forced_fixed: dict[str, str],
        excluded: set[str],
        call_counts: dict[int, int],
    ) -> None:
        self.model = model
        self.graph = graph
        self.shapes = shapes
        self.gate_points = gate_points
        self.excluded = excluded
        self.call_counts = call_counts
        self.spaces = Spaces(forced_fixed)  # the fixed reasons learned by earlier passes, and this pass's (new_fixed)
        self.info: dict[fx.Node, Any] = {}
        self.slices: list[Slice] = []
        self.points: list[GatePoint] = []
        self.layers: list[LayerCost] = []
        self.barriers: list[str] = []
        self.new_gate_points: set[str] = set()
        self.other_flops = 0.0
        self.costed: set[str] = set()
        self.after_norm: list[tuple[str, int]] = []
        self.conv_inputs: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self.fold_of: dict[str, str] = {}  # gate point -> the module export folds it into

    # ---- helpers ----
    def module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(node.target)

    def shape(self, node: Any) -> torch.Size | None:
        value = self.shapes.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, torch.Size) else None

    def tracked(self, arg: Any) -> ChannelInfo | None:
        value = self.info.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, ChannelInfo) else None

    def all_tracked(self, value: Any) -> list[ChannelInfo]:
        found: list[ChannelInfo] = []
        fx.node.map_arg(value, lambda n: found.extend(_flatten_infos(self.info.get(n))))
        return found

    def barrier(self, node: fx.Node, what: str, warn: bool = True) -> None:
        """Keep every space reaching `node` whole; `warn` lists it among the pieces not understood."""
        infos = self.all_tracked((node.args, node.kwargs))
        if infos:
            if warn:
                self.barriers.append(what)
            for info in infos:
                self.spaces.fix(info.parts, f"reaches {what}")

    def need_zero(self, info: ChannelInfo, reader: str) -> None:
        """A consumer reads `info`: closed channels must be exactly zero there."""
        for part, source in zip(info.parts, info.nonzero):
            if source is None or self.spaces.is_fixed(part):
                continue
            if source.op == "call_module" and self.call_counts.get(id(self.module(source)), 0) == 1:
                self.new_gate_points.add(source.target)
            else:
                self.spaces.fix([part], f"{reader} reads it after '{source.name}', which makes zeros non-zero")

    def part_offsets(self, info: ChannelInfo) -> list[tuple[int, int]]:
        offsets, at = [], 0
        for p in info.parts:
            offsets.append((p, at))
            at += self.spaces.size(p)
        return offsets

    def add_slices(self, module_name: str, tensors: Sequence[str], dim: int, info: ChannelInfo) -> None:
        module = self.model.get_submodule(module_name)
        for tensor_name in tensors:
            if getattr(module, tensor_name, None) is None:
                continue
            target = f"{module_name}.{tensor_name}" if module_name else tensor_name
            for p, offset in self.part_offsets(info):
                self.slices.append(Slice(target, dim, offset, info.repeat, p))

    def first_call(self, module_name: str) -> bool:
        """True the first time a module is costed, so that its parameters count once."""
        first = module_name not in self.costed
        self.costed.add(module_name)
        return first

    def cost_parts(self, info: ChannelInfo | None, channels: int) -> tuple[tuple[int | None, int, int], ...]:
        if info is None:
            return ((None, channels, 1),)
        return tuple((p, self.spaces.size(p), info.repeat) for p in info.parts)

    # ---- the walk ----
    def run(self) -> None:
        for node in self.graph.nodes:
            self.info[node] = self.visit(node)

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder" or node.op == "get_attr":
            return None
        if node.op == "output":
            for info in self.all_tracked(node.args):
                self.spaces.fix(info.parts, "model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.module(node))
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return self.visit_function(node, node.target, name)

    def producer_output(self, node: fx.Node, module: nn.Module, out_channels: int, dim: int, grouped: bool) -> Any:
        name = node.target
        reason = None
        if any(name == e or name.startswith(e + ".") for e in self.excluded):
            reason = "excluded by the user"
        elif grouped:
            reason = "grouped conv output (groups are not pruned)"
        elif self.call_counts.get(id(module), 0) != 1:
            reason = "module is called more than once"
        space = self.spaces.new(out_channels, f"producer:{name}", name, reason)
        point, fold = self._gate_point_for(node)
        if point is node:
            replace = isinstance(module, (nn.Conv2d, nn.Linear))
            self.points.append(GatePoint(name, dim, ((space, out_channels),), replace, name))
            return ChannelInfo((space,), dim, (None,))
        self.gate_points.add(point.target)  # the BatchNorm after it (or its activation) gates it
        self.fold_of[point.target] = fold.target
        if isinstance(module, nn.Conv2d):
            self.after_norm.append((name, space))
        return ChannelInfo((space,), dim, (node,))

    def _only_user(self, node: fx.Node, types: tuple[type, ...]) -> fx.Node | None:
        """The single user of `node` if it is a call of a module of `types` that is called only there."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        module = self.module(users[0])
        if isinstance(module, types) and self.call_counts.get(id(module), 0) == 1:
            return users[0]
        return None

    def _gate_point_for(self, node: fx.Node) -> tuple[fx.Node, fx.Node]:
        """Where a producer's gate goes, and the module export folds it into.

        At the producer's output, unless a BatchNorm is its only user: then after that BatchNorm, or
        after the activation module that is the BatchNorm's only user. Gating after a ReLU rather
        than before it keeps the task gradient of closed gates (ReLU's gradient at an exact zero is 0).
        """
        norm = self._only_user(node, NORM_MODULES)
        if norm is None:
            return node, node
        activation = self._only_user(norm, ACTIVATION_MODULES)
        return (activation if activation is not None else norm), norm

    def visit_module(self, node: fx.Node, m: nn.Module) -> Any:
        x = self.tracked(node.args[0]) if node.args else None
        out_shape = self.shape(node)
        name = node.target
        called_once = self.call_counts.get(id(m), 0) == 1
        if isinstance(m, CONV_MODULES):
            spatial = math.prod(out_shape[:1] + out_shape[2:]) if out_shape else 0  # output positions, batch included
            kernel = math.prod(m.kernel_size)
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if depthwise:
                if x is None or x.dim != 1 or x.repeat != 1 or not called_once:
                    if x is not None:
                        self.spaces.fix(x.parts, f"depthwise conv '{name}' (input not traceable or module reused)")
                    out = ChannelInfo(
                        (self.spaces.new(m.out_channels, f"fixed:{name}", None, "depthwise"),), 1, (None,)
                    )
                else:
                    self.add_slices(name, ("weight", "bias"), 0, x)
                    nonzero = tuple(node if m.bias is not None else s for s in x.nonzero)
                    out = ChannelInfo(x.parts, 1, nonzero)
                    if name in self.gate_points:
                        out = ChannelInfo(x.parts, 1, (None,) * len(x.parts))
                        parts = tuple((p, self.spaces.size(p)) for p in x.parts)
                        self.points.append(GatePoint(name, 1, parts, False, name))
                parts = self.cost_parts(out, m.out_channels)
                self.layers.append(
                    LayerCost(
                        module=name,
                        kind="conv",
                        flops_per_pair=2.0 * spatial * kernel,
                        params_per_pair=kernel,
                        bias_per_out=1.0 if m.bias is not None else 0.0,
                        in_parts=parts,
                        out_parts=parts,
                        depthwise=True,
                        count_params=self.first_call(name),
                    )
                )
                return out
            if x is not None:
                self.need_zero(x, f"conv '{name}'")
                if m.groups == 1 and x.dim == 1 and x.repeat == 1 and called_once:
                    self.add_slices(name, ("weight",), 1, x)
                    self.conv_inputs.append((name, tuple((p, self.spaces.size(p)) for p in x.parts)))
                else:
                    self.spaces.fix(x.parts, f"input of grouped or reused conv '{name}'")
            out = self.producer_output(node, m, m.out_channels, 1, m.groups > 1)
            in_parts = self.cost_parts(x if x is not None and m.groups == 1 else None, m.in_channels)
            self.layers.append(
                LayerCost(
                    module=name,
                    kind="conv",
                    flops_per_pair=2.0 * spatial * kernel / m.groups,
                    params_per_pair=kernel / m.groups,
                    bias_per_out=1.0 if m.bias is not None else 0.0,
                    in_parts=in_parts,
                    out_parts=self.cost_parts(out, m.out_channels),
                    depthwise=False,
                    count_params=self.first_call(name),
                )
            )
            self._producer_slices(name, out)
            return out
        if isinstance(m, nn.Linear):
            in_shape = self.shape(node.args[0])
            tokens = math.prod(in_shape[:-1]) if in_shape else 0
            if x is not None:
                self.need_zero(x, f"Linear '{name}'")
                if in_shape is not None and x.dim == len(in_shape) - 1 and called_once:
                    self.add_slices(name, ("weight",), 1, x)
                else:
                    self.spaces.fix(x.parts, f"Linear '{name}' reads channels from a dimension other than the last")
                    x = None
            dim = len(out_shape) - 1 if out_shape else 1
            out = self.producer_output(node, m, m.out_features, dim, False)
            self.layers.append(
                LayerCost(
                    module=name,
                    kind="linear",
                    flops_per_pair=2.0 * tokens,
                    params_per_pair=1.0,
                    bias_per_out=1.0 if m.bias is not None else 0.0,
                    in_parts=self.cost_parts(x, m.in_features),
                    out_parts=self.cost_parts(out, m.out_features),
                    depthwise=False,
                    count_params=self.first_call(name),
                )
            )
            self._producer_slices(name, out)
            return out
        if isinstance(m, NORM_MODULES):
            if x is None:
                return None
            if x.dim != 1 or x.repeat != 1 or not called_once:
                self.barrier(node, f"{type(m).__name__} '{name}' (not over dim 1, or reused)")
                return None
            self.add_slices(name, ("weight", "bias", "running_mean", "running_var"), 0, x)
            parts = self.cost_parts(x, m.num_features)
            affine = 2.0 if m.affine else 0.0
            self.layers.append(
                LayerCost(
                    module=name,
                    kind="norm",
                    flops_per_pair=0.0,
                    params_per_pair=0.0,
                    bias_per_out=affine,
                    in_parts=parts,
                    out_parts=parts,
                    depthwise=True,
                    count_params=self.first_call(name),
                )
            )
            if name in self.gate_points:
                self.points.append(GatePoint(name, 1, tuple((p, self.spaces.size(p)) for p in x.parts), False, name))
                return ChannelInfo(x.parts, 1, (None,) * len(x.parts))
            return ChannelInfo(x.parts, 1, (node,) * len(x.parts))
        if isinstance(m, ZERO_PRESERVING_MODULES) or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
            return self._regated(node, x) if x is not None else None
        if isinstance(m, NONZERO_MODULES):
            if x is None:
                return None
            if name in self.gate_points:
                return self._regated(node, x)
            return ChannelInfo(x.parts, x.dim, (node,) * len(x.parts), x.repeat)
        if isinstance(m, POOLING_MODULES):
            if x is not None and (x.dim != 1 or x.repeat != 1):
                self.barrier(node, f"{type(m).__name__} '{name}' over the channel dim")
                return None
            return x
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, nn.MultiheadAttention):
            self._attention_cost(node, m)
        self.barrier(node, f"{type(m).__name__} '{name}'")
        return None

    def _regated(self, node: fx.Node, x: ChannelInfo) -> ChannelInfo:
        if node.op == "call_module" and node.target in self.gate_points:
            parts = tuple((p, self.spaces.size(p)) for p in x.parts)
            self.points.append(GatePoint(node.target, x.dim, parts, False, self.fold_of.get(node.target)))
            return ChannelInfo(x.parts, x.dim, (None,) * len(x.parts), x.repeat)
        return x

    def _producer_slices(self, name: str, out: ChannelInfo) -> None:
        self.add_slices(name, ("weight", "bias"), 0, out)

    def _attention_cost(self, node: fx.Node, m: nn.MultiheadAttention) -> None:
        shape = self.shape(node.args[0])
        if shape is None:
            return
        tokens = math.prod(shape[:-1])
        seq = shape[0] if not m.batch_first else shape[1]
        e = m.embed_dim
        self.other_flops += 2.0 * tokens * e * 4 * e + 4.0 * tokens * seq * e

    def _flatten(self, node: fx.Node, x: ChannelInfo | None, start: int, end: int) -> ChannelInfo | None:
        in_shape = self.shape(node.args[0])
        if x is None or in_shape is None:
            return None
        ndim = len(in_shape)
        start, end = start % ndim, end % ndim
        if x.dim < start:
            return x
        if x.dim > end:
            return x.with_dim(x.dim - (end - start))
        if math.prod(in_shape[start : x.dim]) != 1:
            self.barrier(node, f"flatten of the channel dim with leading dims at '{node.name}'")
            return None
        return x.with_dim(start, x.repeat * math.prod(in_shape[x.dim + 1 : end + 1]))

    # ---- functions and methods ----
    def visit_function(self, node: fx.Node, target: Any, name: str) -> Any:
        args = node.args
        first = args[0] if args else None
        x = self.tracked(first)
        binary = _BINARY.get(target) if not isinstance(target, str) else _BINARY.get(name)
        if binary is not None and len(args) >= 2:
            return self._binary(node, binary, args[0], args[1])
        if name in _HARMLESS_NAMES or target is getattr:
            return None
        if name == "getitem":
            return self._getitem(node, first, args[1])
        if name == "cat" or name == "concat":
            return self._cat(node)
        if not self.all_tracked((args, node.kwargs)):
            return None
        if x is None:
            self.barrier(node, f"'{name}' at '{node.name}'")
            return None
        if name in _ZERO_PRESERVING_NAMES and not self.all_tracked((args[1:], node.kwargs)):
            return x
        if name in _NONZERO_NAMES:
            return ChannelInfo(x.parts, x.dim, (node,) * len(x.parts), x.repeat)
        if name in _POOLING_NAMES and x.dim == 1 and x.repeat == 1:
            return x
        if name == "pad":
            return self._pad(node, x)
        if name == "flatten":
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            return self._flatten(node, x, start, end)
        if name in ("view", "reshape"):
            return self._reshape(node, x)
        if name in ("permute", "transpose", "swapaxes", "movedim"):
            return self._permute(node, x, name)
        if name in _REDUCTION_NAMES:
            return self._reduce(node, x)
        if name == "expand":
            out_shape, in_shape = self.shape(node), self.shape(first)
            same_rank = out_shape is not None and in_shape is not None and len(out_shape) == len(in_shape)
            if same_rank and out_shape[x.dim] == in_shape[x.dim]:
                return x
        self.barrier(node, f"'{name}' at '{node.name}'")
        return None

    def _binary(self, node: fx.Node, kind: str, a: Any, b: Any) -> Any:
        ia, ib = self.tracked(a), self.tracked(b)
        out_shape = self.shape(node)
        if ia is None and ib is None:
            return None
        if out_shape is None:
            self.barrier(node, f"'{kind}' at '{node.name}'")
            return None
        if ia is not None and ib is not None:
            return self._binary_tracked(node, kind, a, ia, b, ib, out_shape)
        swapped = ia is None
        x_node, x, other = (b, ib, a) if swapped else (a, ia, b)
        if kind == "div" and swapped:
            self.barrier(node, f"division by gated channels at '{node.name}'")
            return None
        x_shape = self.shape(x_node)
        dim = x.dim + len(out_shape) - len(x_shape)
        if isinstance(other, fx.Node) and isinstance(self.shapes.get(other), (int, float, bool)):
            other = self.shapes[other]
        if isinstance(other, (int, float, bool)):
            if kind in ("mul", "div") or other == 0:
                return x.with_dim(dim)
            return ChannelInfo(x.parts, dim, (node,) * len(x.parts), x.repeat)
        other_shape = self.shape(other)
        if other_shape is None:
            self.barrier(node, f"'{kind}' with an untracked operand at '{node.name}'")
            return None
        other_dim = dim - (len(out_shape) - len(other_shape))
        other_size = other_shape[other_dim] if 0 <= other_dim < len(other_shape) else 1
        if other_size != 1:
            if isinstance(other, fx.Node) and other.op == "placeholder":  # a residual over the model input
                self.barrier(node, f"'{kind}' with the model input '{other.name}'", warn=False)
                return None
            if not (isinstance(other, fx.Node) and other.op == "get_attr" and x.repeat == 1):
                self.barrier(node, f"'{kind}' with an untracked tensor over the channels at '{node.name}'")
                return None
            for p, offset in self.part_offsets(x):
                self.slices.append(Slice(other.target, other_dim, offset, 1, p))
            per_channel = math.prod(other_shape) / other_size
            parts = self.cost_parts(x, other_size)
            self.layers.append(
                LayerCost(
                    module=other.target,
                    kind="param",
                    flops_per_pair=0.0,
                    params_per_pair=0.0,
                    bias_per_out=per_channel,
                    in_parts=parts,
                    out_parts=parts,
                    depthwise=True,
                    count_params=self.first_call(other.target),
                )
            )
        if kind in ("mul", "div"):
            return x.with_dim(dim)
        return ChannelInfo(x.parts, dim, (node,) * len(x.parts), x.repeat)

    def _binary_tracked(self, node, kind, a, ia: ChannelInfo, b, ib: ChannelInfo, out_shape) -> Any:
        dim_a = ia.dim + len(out_shape) - len(self.shape(a))
        dim_b = ib.dim + len(out_shape) - len(self.shape(b))
        sizes_a = [self.spaces.size(p) for p in ia.parts]
        sizes_b = [self.spaces.size(p) for p in ib.parts]
        if dim_a != dim_b or ia.repeat != ib.repeat or sizes_a != sizes_b:
            self.barrier(node, f"'{kind}' of differently arranged channels at '{node.name}'")
            return None
        for pa, pb in zip(ia.parts, ib.parts):
            self.spaces.union(pa, pb)
        if kind == "mul":
            nonzero = tuple(None if (sa is None or sb is None) else sa for sa, sb in zip(ia.nonzero, ib.nonzero))
        elif kind == "div":
            nonzero = ia.nonzero
        else:
            nonzero = tuple(sa if sa is not None else sb for sa, sb in zip(ia.nonzero, ib.nonzero))
        return ChannelInfo(ia.parts, dim_a, nonzero, ia.repeat)

    def _getitem(self, node: fx.Node, container: Any, index: Any) -> Any:
        value = self.info.get(container) if isinstance(container, fx.Node) else None
        if isinstance(value, list):
            return value[index] if isinstance(index, int) and -len(value) <= index < len(value) else None
        x = self.tracked(container)
        in_shape = self.shape(container)
        if x is None:
            return None
        index = index if isinstance(index, tuple) else (index,)
        if in_shape is None or any(isinstance(i, fx.Node) for i in index):
            self.barrier(node, f"indexing at '{node.name}'")
            return None
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(in_shape) - consumed))
            else:
                expanded.append(i)
        in_dim, out_dim = 0, 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if in_dim == x.dim:
                if not (isinstance(i, slice) and i == slice(None)):
                    self.barrier(node, f"indexing the channel dim at '{node.name}'")
                    return None
                return x.with_dim(out_dim)
            if isinstance(i, slice):
                out_dim += 1
            elif not isinstance(i, int):
                self.barrier(node, f"indexing at '{node.name}'")
                return None
            in_dim += 1
        return x.with_dim(out_dim + (x.dim - in_dim))

    def _cat(self, node: fx.Node) -> Any:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = _arg(node, 1, "dim", 0)
        infos = [self.tracked(t) for t in tensors]
        out_shape = self.shape(node)
        if all(i is None for i in infos):
            return None
        if any(i is None for i in infos) or out_shape is None:
            self.barrier(node, f"cat of gated and untracked tensors at '{node.name}'")
            return None
        dim %= len(out_shape)
        first = infos[0]
        if all(i.dim == dim and i.repeat == 1 for i in infos):
            parts = tuple(p for i in infos for p in i.parts)
            nonzero = tuple(s for i in infos for s in i.nonzero)
            return ChannelInfo(parts, dim, nonzero)
        if any(i.dim == dim for i in infos):
            self.barrier(node, f"cat over the channel dim at '{node.name}'")
            return None
        for other in infos[1:]:
            if other.dim != first.dim or [self.spaces.size(p) for p in other.parts] != [
                self.spaces.size(p) for p in first.parts
            ]:
                self.barrier(node, f"cat of differently arranged channels at '{node.name}'")
                return None
            for pa, pb in zip(first.parts, other.parts):
                self.spaces.union(pa, pb)
        nonzero = tuple(
            next((i.nonzero[k] for i in infos if i.nonzero[k] is not None), None) for k in range(len(first.parts))
        )
        return ChannelInfo(first.parts, first.dim, nonzero, first.repeat)

    def _pad(self, node: fx.Node, x: ChannelInfo) -> ChannelInfo | None:
        """F.pad: fine when it pads only dims after the channel dim; a non-zero constant breaks zeros."""
        in_shape = self.shape(node.args[0])
        pad = _arg(node, 1, "pad", None)
        if in_shape is None or not isinstance(pad, (list, tuple)) or x.dim >= len(in_shape) - len(pad) // 2:
            self.barrier(node, f"pad over the channel dim at '{node.name}'")
            return None
        mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        if mode == "constant" and value:
            return ChannelInfo(x.parts, x.dim, (node,) * len(x.parts), x.repeat)
        return x

    def _reshape(self, node: fx.Node, x: ChannelInfo) -> ChannelInfo | None:
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if in_shape is None or out_shape is None:
            self.barrier(node, f"reshape at '{node.name}'")
            return None
        lead = math.prod(in_shape[: x.dim])
        channel_block = in_shape[x.dim]
        for k in range(len(out_shape)):
            if math.prod(out_shape[:k]) != lead:
                continue
            if out_shape[k] == channel_block:
                return x.with_dim(k)
            for j in range(x.dim + 1, len(in_shape) + 1):
                if out_shape[k] == channel_block * math.prod(in_shape[x.dim + 1 : j]):
                    return x.with_dim(k, x.repeat * math.prod(in_shape[x.dim + 1 : j]))
        self.barrier(node, f"reshape that splits the channel dim at '{node.name}'")
        return None

    def _permute(self, node: fx.Node, x: ChannelInfo, name: str) -> ChannelInfo | None:
        in_shape = self.shape(node.args[0])
        if in_shape is None or x.repeat != 1:
            self.barrier(node, f"{name} at '{node.name}'")
            return None
        ndim = len(in_shape)
        rest = list(node.args[1:])
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = list(node.kwargs.get("dims", dims))
            order = [d % ndim for d in dims]
            return x.with_dim(order.index(x.dim))
        a = _arg(node, 1, "dim0", None)
        b = _arg(node, 2, "dim1", None)
        if name == "movedim":
            a, b = _arg(node, 1, "source", None), _arg(node, 2, "destination", None)
            if not isinstance(a, int) or not isinstance(b, int):
                self.barrier(node, f"movedim at '{node.name}'")
                return None
            order = list(range(ndim))
            order.insert(b % ndim, order.pop(a % ndim))
            return x.with_dim(order.index(x.dim))
        a, b = a % ndim, b % ndim
        return x.with_dim(b if x.dim == a else a if x.dim == b else x.dim)

    def _reduce(self, node: fx.Node, x: ChannelInfo) -> ChannelInfo | None:
        in_shape = self.shape(node.args[0])
        dims = _arg(node, 1, "dim", None)
        keepdim = _arg(node, 2, "keepdim", False)
        if in_shape is None or dims is None or x.repeat != 1:
            self.barrier(node, f"reduction at '{node.name}'")
            return None
        dims = {d % len(in_shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if x.dim in dims:
            self.barrier(node, f"reduction over the channel dim at '{node.name}'")
            return None
        return x if keepdim else x.with_dim(x.dim - sum(1 for d in dims if d < x.dim))


def _flatten_infos(value: Any) -> list[ChannelInfo]:
    if isinstance(value, ChannelInfo):
        return [value]
    if isinstance(value, list):
        return [i for v in value for i in _flatten_infos(v)]
    return []


def _arg(node: fx.Node, position: int, name: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _call_counts(model: nn.Module, graph: fx.Graph) -> dict[int, int]:
    counts: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            key = id(model.get_submodule(node.target))
            counts[key] = counts.get(key, 0) + 1
    return counts


def _layer_flops(module: nn.Module, output: Tensor) -> float:
    """FLOPs of one Conv/Linear call from its output (the same formula as LayerCost)."""
    if isinstance(module, nn.Linear):
        return 2.0 * output.numel() * module.in_features
    return 2.0 * output.numel() * math.prod(module.kernel_size) * module.in_channels / module.groups


def record_shapes(
    model: nn.Module, graph: fx.Graph, example_inputs: tuple[Any, ...]
) -> tuple[dict[fx.Node, Any], dict[str, float]]:
    """Run the traced graph once on the inputs, leaving parameters and buffers exactly as they were.

    Returns the shape summary of every node and the FLOPs of every Conv/Linear call by module name
    (so that layers inside opaque modules still count, as constants, in the budget).
    """
    gm = fx.GraphModule(model, graph)
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    recorder = _ShapeRecorder(gm)
    flops: dict[str, float] = {}

    def count(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                flops[name] = flops.get(name, 0.0) + _layer_flops(module, output)

        return hook

    handles = [
        m.register_forward_hook(count(name))
        for name, m in model.named_modules()
        if isinstance(m, (*CONV_MODULES, nn.Linear))
    ]
    try:
        with torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as error:
        raise AnalysisError(f"running the traced model on the example inputs failed: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
    return recorder.shapes, flops


def analyze(
    model: nn.Module,
    graph: fx.Graph,
    shapes: dict[fx.Node, Any],
    excluded: set[str] | None = None,
    module_flops: dict[str, float] | None = None,
) -> Analysis:
    """Analyse a traced model (see the module docstring); repeats passes until gate points are stable."""
    gate_points: set[str] = set()
    requested: set[str] = set()
    forced_fixed: dict[str, str] = {}
    counts = _call_counts(model, graph)

    def run_pass(points: set[str]) -> _Pass:
        p = _Pass(model, graph, shapes, points, forced_fixed, set(excluded or ()), counts)
        p.run()
        return p

    for _ in range(100):
        p = run_pass(gate_points)
        if not p.new_gate_points - gate_points and not set(p.spaces.new_fixed) - set(forced_fixed):
            break
        requested |= p.new_gate_points - gate_points
        gate_points |= p.new_gate_points
        forced_fixed.update(p.spaces.new_fixed)
    else:  # pragma: no cover - each pass only adds
        raise AnalysisError("channel analysis did not converge")
    # A gate point requested early may have become unnecessary (a later regate upstream made the
    # channels zero anyway); drop those, since export cannot fold gates into every kind of module.
    for point in sorted(requested):
        trial = gate_points - {point}
        p = run_pass(set(trial))
        if not p.new_gate_points - trial and not set(p.spaces.new_fixed) - set(forced_fixed):
            gate_points = trial
    return _finish(model, run_pass(set(gate_points)), module_flops or {})


def _finish(model: nn.Module, p: _Pass, module_flops: dict[str, float]) -> Analysis:
    sp = p.spaces
    roots = sp.roots()
    fixed_roots = {r for r, members in roots.items() if any(sp.spaces[m].fixed for m in members)}
    groups: dict[int, Group] = {}
    fixed: dict[str, str] = {}
    for root, members in sorted(roots.items()):
        producers = [sp.spaces[m].producer for m in members if sp.spaces[m].producer]
        if root in fixed_roots:
            reason = next(sp.spaces[m].fixed for m in members if sp.spaces[m].fixed)
            for prod in producers:
                fixed[prod] = reason
            continue
        if not producers:
            continue
        groups[root] = Group(root, producers[0], sp.size(root), producers)
    root_of = {s: sp.find(s) for s in range(len(sp)) if sp.find(s) in groups}
    for sl in dict.fromkeys(p.slices):
        if sl.space in root_of:
            groups[root_of[sl.space]].slices.append(sl)

    points: dict[str, GatePoint] = {}
    for gp in p.points:
        parts = remap(gp.parts, root_of)
        if all(r is None for r, _ in parts) or gp.module in points:
            continue
        points[gp.module] = GatePoint(gp.module, gp.dim, parts, gp.replace, gp.fold)

    layers = [
        dataclasses.replace(lc, in_parts=remap(lc.in_parts, root_of), out_parts=remap(lc.out_parts, root_of))
        for lc in p.layers
    ]
    counted = {lc.module for lc in layers}
    other_params = sum(
        param.numel()
        for name, param in model.named_parameters()
        if name not in counted and (name.rsplit(".", 1)[0] if "." in name else "") not in counted
    )
    return Analysis(
        groups=list(groups.values()),
        gate_points=list(points.values()),
        layers=layers,
        fixed=fixed,
        barriers=list(dict.fromkeys(p.barriers)),
        root_of=root_of,
        other_params=other_params,
        after_norm=[(name, space) for name, space in p.after_norm if space in root_of],
        conv_inputs=[
            (name, remap(parts, root_of)) for name, parts in p.conv_inputs if any(s in root_of for s, _ in parts)
        ],
        other_flops=p.other_flops + sum(f for name, f in module_flops.items() if name not in counted),
    )


__all__ = ["analyze", "record_shapes", "trace"]
