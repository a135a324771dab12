"""How channels flow through each ATen op: one rule per op, in one table (:data:`RULES`).

A rule is ``rule(walk, node) -> value info``: it reads the infos of the node's inputs
(``walk.tracked(arg)``: a :class:`ChannelInfo` or None for a value that carries no gated channels)
and returns the node's. It may merge spaces (``walk.tie``), say that a consumer reads channels
that must be zero (``walk.need_zero``), list tensors that export must slice
(``walk.slice_tensor``), record the layer's cost (``walk.add_layer``), or give up on what reaches
it (``walk.barrier``, which keeps those channels whole and names the op in a warning); the
methods a rule may call are listed in :mod:`tg_kernels.pruning.analysis.walk`. An op without a
rule is a barrier for every gated value that reaches it.

Ops are named as in ``torch.ops.aten`` without the overload and without the in-place underscore
(``add_.Tensor`` is ``"add"``; :func:`~tg_kernels.pruning.analysis.aten.op_name`). Users extend the
table with :func:`register_rule`, for their own custom ops too (a custom op ``mylib::fused`` is
looked up as ``"fused"``), or for one analysis only: :func:`rule_table` makes a copy of the table
with a call's own rules (``analyze_export(..., rules=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tg_kernels.pruning.analysis.aten import COPIES, NO_CHANNEL_OPS, SPATIAL_OPS, ZERO_PRESERVING_OPS, op_name
from tg_kernels.pruning.analysis.types import ChannelInfo, LayerCost, RecurrentGate, SizeAttr, StackedInfo
from tg_kernels.pruning.analysis.walk import Filled, ParamView, Walk

Rule = Callable[[Walk, fx.Node], Any]
RULES: dict[str, Rule] = {}


def _check_rule(op: Any, rule: Any) -> None:
    if not isinstance(op, str) or not op:
        raise TypeError(f"op must be a non-empty op name, got {op!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable as rule(walk, node), got {rule!r}")


def register_rule(op: str, rule: Rule, *, replace: bool = False) -> None:
    """Teach the analysis how channels flow through ``op`` (an ATen or custom op name, see above),
    for every later analysis in this process.

    ``rule(walk, node)`` returns the output's :class:`ChannelInfo` (or None); see the module
    docstring for what it may do. Existing rules are kept unless ``replace=True``.
    """
    _check_rule(op, rule)
    if op in RULES and not replace:
        raise ValueError(f"a rule for {op!r} exists already; pass replace=True to override it")
    RULES[op] = rule


def rule_table(extra: Mapping[str, Rule] | None = None) -> dict[str, Rule]:
    """A copy of :data:`RULES` with ``extra`` (op name -> rule) added, for one analysis: a rule of
    ``extra`` replaces the table's rule for that op in the copy only; :data:`RULES` is left as it is."""
    table = dict(RULES)
    for op, rule in (extra or {}).items():
        _check_rule(op, rule)
        table[op] = rule
    return table


def _rule(*names: str):
    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def arg(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    """An op argument by position or keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _nonzero(info: ChannelInfo, node: fx.Node) -> ChannelInfo:
    return ChannelInfo(info.parts, info.dim, (node,) * len(info.parts), info.repeat)


# --------------------------------------------------------------------------------------------------
# Ops that carry no channels, and elementwise ops of one tensor
# --------------------------------------------------------------------------------------------------

for _name in sorted(NO_CHANNEL_OPS):
    RULES[_name] = lambda w, node: None


@_rule(*sorted(ZERO_PRESERVING_OPS))
def zero_preserving(w: Walk, node: fx.Node) -> Any:
    """Elementwise and f(0) = 0: closed channels stay zero (or stay as non-zero as they were)."""
    x = w.tracked(node.args[0]) if node.args else None
    value = w.value(node.args[0]) if node.args else None
    if isinstance(value, StackedInfo | Filled) and len(node.all_input_nodes) == 1 and op_name(node) in COPIES:
        return value  # a copy of stacked pieces or of a filled tensor
    if x is None:
        pv = w.param_view(node.args[0]) if node.args else None
        return pv if pv is not None and op_name(node) in COPIES else None
    if w.all_tracked((node.args[1:], node.kwargs)):
        w.barrier(node, f"'{op_name(node)}' of several gated tensors at '{node.name}'")
        return None
    return x


@_rule("prelu")
def prelu(w: Walk, node: fx.Node) -> Any:
    """PReLU keeps zeros; a per-channel slope (weight of C entries) is sliced with the channels."""
    x = w.tracked(node.args[0])
    if x is None:
        return None
    weight = w.tensor_name(node.args[1])
    shape = w.shape(node.args[1])
    if shape is None or math.prod(shape) == 1:
        return x
    if weight is None or x.dim != 1 or x.repeat != 1 or w.reads(weight) != 1:
        w.barrier(node, f"per-channel prelu at '{node.name}'")
        return None
    w.slice_tensor(weight, 0, x)
    return x


@_rule("sigmoid", "hardsigmoid", "exp", "softplus", "cos", "log_sigmoid", "pow")
def nonzero_elementwise(w: Walk, node: fx.Node) -> Any:
    """Elementwise with f(0) != 0 (finite): closed channels become non-zero here."""
    x = w.tracked(node.args[0])
    if x is None:
        return None
    if op_name(node) == "pow":
        exponent = node.args[1] if len(node.args) > 1 else None
        if not isinstance(exponent, (int, float)) or exponent < 0:
            w.barrier(node, f"'pow' at '{node.name}'")
            return None
        return x if exponent > 0 else _nonzero(x, node)
    return _nonzero(x, node)


# --------------------------------------------------------------------------------------------------
# Binary elementwise ops
# --------------------------------------------------------------------------------------------------


@_rule("add", "sub", "mul", "div", "rsub", "maximum", "minimum")
def binary(w: Walk, node: fx.Node) -> Any:
    kind = {"rsub": "sub", "maximum": "add", "minimum": "add"}.get(op_name(node), op_name(node))
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    ia, ib = w.tracked(a), w.tracked(b)
    out_shape = w.shape(node)
    if ia is None and ib is None:
        return None
    if out_shape is None:
        w.barrier(node, f"'{kind}' at '{node.name}'")
        return None
    if ia is not None and ib is not None:
        return _binary_tracked(w, node, kind, a, ia, b, ib, out_shape)
    swapped = ia is None
    x_node, x, other = (b, ib, a) if swapped else (a, ia, b)
    if kind == "div" and swapped:
        w.barrier(node, f"division by gated channels at '{node.name}'")
        return None
    dim = x.dim + len(out_shape) - len(w.shape(x_node))
    if isinstance(other, (int, float, bool)):
        if kind in ("mul", "div") or other == 0:
            return x.with_dim(dim)
        return ChannelInfo(x.parts, dim, (node,) * len(x.parts), x.repeat)
    other_shape = w.shape(other)
    if other_shape is None:
        w.barrier(node, f"'{kind}' with an untracked operand at '{node.name}'")
        return None
    other_dim = dim - (len(out_shape) - len(other_shape))
    other_size = other_shape[other_dim] if 0 <= other_dim < len(other_shape) else 1
    if other_size != 1:
        if w.is_input(other):  # a residual over the model input
            w.barrier(node, f"'{kind}' with the model input '{other.name}'", warn=False)
            return None
        pv = w.param_view(other)
        tensor_dim = pv.dims[other_dim] if pv is not None else None
        if tensor_dim is None or x.repeat != 1:
            w.barrier(node, f"'{kind}' with an untracked tensor over the channels at '{node.name}'")
            return None
        w.slice_tensor(pv.name, tensor_dim, x)
        per_channel = math.prod(other_shape) / other_size
        parts = w.cost_parts(x, other_size)
        w.add_layer(
            LayerCost(
                module=pv.name,
                kind="param",
                flops_per_pair=0.0,
                params_per_pair=0.0,
                bias_per_out=per_channel,
                in_parts=parts,
                out_parts=parts,
                depthwise=True,
                count_params=w.first_call(pv.name),
            )
        )
    if kind in ("mul", "div"):
        return x.with_dim(dim)
    return ChannelInfo(x.parts, dim, (node,) * len(x.parts), x.repeat)


def _binary_tracked(w: Walk, node, kind, a, ia: ChannelInfo, b, ib: ChannelInfo, out_shape) -> Any:
    dim_a = ia.dim + len(out_shape) - len(w.shape(a))
    dim_b = ib.dim + len(out_shape) - len(w.shape(b))
    sizes_a, sizes_b = w.sizes(ia), w.sizes(ib)
    if dim_a != dim_b or ia.repeat != ib.repeat:
        w.barrier(node, f"'{kind}' of differently arranged channels at '{node.name}'")
        return None
    if sizes_a != sizes_b:
        if sum(sizes_a) == sum(sizes_b):  # the same channels, cut differently: cut both alike
            offsets = _offsets(sizes_a) | _offsets(sizes_b)
            if w.request_cuts(ia, sorted(offsets)) | w.request_cuts(ib, sorted(offsets)):
                return None
        w.barrier(node, f"'{kind}' of differently arranged channels at '{node.name}'")
        return None
    w.tie(ia.parts, ib.parts)
    if kind == "mul":
        nonzero = tuple(None if (sa is None or sb is None) else sa for sa, sb in zip(ia.nonzero, ib.nonzero))
    elif kind == "div":
        nonzero = ia.nonzero
    else:
        nonzero = tuple(sa if sa is not None else sb for sa, sb in zip(ia.nonzero, ib.nonzero))
    return ChannelInfo(ia.parts, dim_a, nonzero, ia.repeat)


def _offsets(sizes: list[int]) -> set[int]:
    out, at = set(), 0
    for s in sizes[:-1]:
        at += s
        out.add(at)
    return out


# --------------------------------------------------------------------------------------------------
# Layers: convolutions, linear maps, batch norm
# --------------------------------------------------------------------------------------------------


@_rule("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(w: Walk, node: fx.Node) -> Any:
    name = op_name(node)
    x_node, weight_node = node.args[0], node.args[1]
    bias_node = arg(node, 2, "bias")
    groups = arg(node, 8 if name == "convolution" else 6, "groups", 1)
    transposed = bool(arg(node, 6, "transposed", False)) if name == "convolution" else name.startswith("conv_transpose")
    weight, bias = w.tensor_name(weight_node), w.tensor_name(bias_node)
    x = w.tracked(x_node)
    out_shape, w_shape = w.shape(node), w.shape(weight_node)
    if weight is None or out_shape is None or w_shape is None or (bias_node is not None and bias is None):
        if x is not None:
            w.barrier(node, f"convolution with a computed weight at '{node.name}'")
        return None
    module = w.module_reading(weight, node)
    out_channels = out_shape[1]
    in_channels = w_shape[0] if transposed else w_shape[1] * groups
    positions = w.shape(x_node) if transposed else out_shape  # a transposed conv's cost follows its input
    spatial = math.prod(positions[:1] + positions[2:]) if positions is not None else 0
    kernel = math.prod(w_shape[2:])
    w.add_flops(node, 2.0 * spatial * kernel * in_channels * out_channels / groups)
    reused = w.reads(weight) > 1
    depthwise = groups > 1 and groups == in_channels == out_channels
    if depthwise:
        if x is None or x.dim != 1 or x.repeat != 1 or reused:
            if x is not None:
                w.fix(x.parts, f"depthwise conv '{module}' (input not traceable or module reused)")
            out = ChannelInfo((w.new_space(out_channels, f"fixed:{module}", None, "depthwise"),), 1, (None,))
        else:
            w.slice_tensor(weight, 0, x)
            w.slice_tensor(bias, 0, x)
            out = ChannelInfo(x.parts, 1, tuple(node if bias is not None else s for s in x.nonzero))
        parts = w.cost_parts(out, out_channels)
        per_out = 1.0 if bias else 0.0
        first = w.first_call(module)
        w.add_layer(
            LayerCost(
                module=module,
                kind="conv",
                flops_per_pair=2.0 * spatial * kernel,
                params_per_pair=kernel,
                bias_per_out=per_out,
                in_parts=parts,
                out_parts=parts,
                depthwise=True,
                count_params=first,
            ),
            op=node,
        )
        return out
    in_dim = 0 if transposed else 1
    out_dim = 1 if transposed else 0
    if x is not None:
        gateable = isinstance(w.module_of(module), nn.Conv2d | nn.ConvTranspose2d)
        w.need_zero(x, f"conv '{module}'", module if gateable else None)
        if groups == 1 and x.dim == 1 and not reused:  # repeat > 1: runs of channels (pixel_unshuffle)
            w.slice_tensor(weight, in_dim, x)
            if name == "conv2d" and x.repeat == 1:
                w.conv_input(module, x)
        elif groups > 1 and not transposed and x.dim == 1 and x.repeat == 1 and not reused:
            first = _group_aligned(w, node, x, groups)  # channel i of every group shares one gate
            if first is not None:
                w.slice_tensor(weight, 1, first)
            else:
                x = None
        else:
            w.fix(x.parts, f"input of grouped or reused conv '{module}'")
            x = None
    fixed = "grouped transposed conv output" if groups > 1 and transposed else None
    out = w.producer(node, module, out_channels, 1, fixed, foldable=not transposed)
    w.slice_tensor(weight, out_dim, out)
    w.slice_tensor(bias, 0, out)
    if groups > 1 and not transposed:
        _group_aligned(w, node, out, groups)
    w.add_layer(
        LayerCost(
            module=module,
            kind="conv",
            flops_per_pair=2.0 * spatial * kernel / groups,
            params_per_pair=kernel / groups,
            bias_per_out=1.0 if bias else 0.0,
            in_parts=w.cost_parts(x, in_channels),
            out_parts=w.cost_parts(out, out_channels),
            depthwise=False,
            count_params=w.first_call(module),
        ),
        op=node,
    )
    return out


def _group_aligned(w: Walk, node: fx.Node, x: ChannelInfo, groups: int) -> ChannelInfo | None:
    """Tie the channels of a grouped conv's groups (input or output) so that every group keeps the
    same channels: cut ``x`` at the group boundaries and merge the groups' spaces one-to-one.
    Returns the first group's channels (None while the cuts wait for the next walk, or if the
    groups cannot be aligned, which fixes them)."""
    per = w.width(x) // groups
    pieces = _pieces(w, node, x, [(i * per, (i + 1) * per) for i in range(groups)])
    if pieces is None:
        return None
    first = pieces[0]
    if any(w.sizes(p) != w.sizes(first) for p in pieces[1:]):
        w.fix(x.parts, f"groups of grouped conv at '{node.name}' are arranged differently")
        return None
    for piece in pieces[1:]:
        w.tie(first.parts, piece.parts)
    return first


@_rule("linear")
def linear(w: Walk, node: fx.Node) -> Any:
    x_node, weight_node = node.args[0], node.args[1]
    bias_node = arg(node, 2, "bias")
    weight, bias = w.tensor_name(weight_node), w.tensor_name(bias_node)
    x = w.tracked(x_node)
    in_shape, out_shape, w_shape = w.shape(x_node), w.shape(node), w.shape(weight_node)
    if in_shape is not None and w_shape is not None:
        w.add_flops(node, 2.0 * math.prod(in_shape[:-1]) * math.prod(w_shape))
    if weight is None or in_shape is None or out_shape is None or (bias_node is not None and bias is None):
        if x is not None:
            w.barrier(node, f"linear with a computed weight at '{node.name}'")
        return None
    module = w.module_reading(weight, node)
    out_features, in_features = w_shape
    tokens = math.prod(in_shape[:-1])
    if x is not None:
        w.need_zero(x, f"Linear '{module}'", module if isinstance(w.module_of(module), nn.Linear) else None)
        if x.dim == len(in_shape) - 1:  # a weight read elsewhere too (tied) is sliced alike there
            w.slice_tensor(weight, 1, x)
        else:
            w.fix(x.parts, f"Linear '{module}' reads channels from a dimension other than the last")
            x = None
    out = w.producer(node, module, out_features, len(out_shape) - 1)
    w.slice_tensor(weight, 0, out)
    w.slice_tensor(bias, 0, out)
    w.add_layer(
        LayerCost(
            module=module,
            kind="linear",
            flops_per_pair=2.0 * tokens,
            params_per_pair=1.0,
            bias_per_out=1.0 if bias else 0.0,
            in_parts=w.cost_parts(x, in_features),
            out_parts=w.cost_parts(out, out_features),
            depthwise=False,
            count_params=w.first_call(module),
        ),
        op=node,
    )
    return out


@_rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional")
def batch_norm(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    tensors = [w.tensor_name(a) for a in node.args[1:5]]
    stats = next((t for t in tensors if t), None)
    if x is None:
        return None
    if x.dim != 1 or x.repeat != 1 or stats is None or w.reads(stats) != 1:
        w.barrier(node, f"batch norm at '{node.name}' (not over dim 1, or reused)")
        return None
    for t in tensors:
        w.slice_tensor(t, 0, x)
    module = w.owner(stats)
    parts = w.cost_parts(x, w.width(x))
    affine = 2.0 if tensors[0] is not None else 0.0
    w.add_layer(
        LayerCost(
            module=module,
            kind="norm",
            flops_per_pair=0.0,
            params_per_pair=0.0,
            bias_per_out=affine,
            in_parts=parts,
            out_parts=parts,
            depthwise=True,
            count_params=w.first_call(module),
        )
    )
    return _nonzero(x, node)


def _channel_count(w: Walk, node: fx.Node, x: ChannelInfo, attr: str) -> None:
    """A norm module's channel count (``num_features``, ``num_channels``) follows the kept channels,
    also where no tensor of it tells its size (a non-affine InstanceNorm or GroupNorm)."""
    path = w.scope_module(node)
    module = w.module_of(path) if path is not None else None
    if module is not None and getattr(module, attr, None) == w.width(x):
        w.add_size_attrs([SizeAttr(path, attr, w.sized(x), x.repeat)])


@_rule("instance_norm")
def instance_norm(w: Walk, node: fx.Node) -> Any:
    """Per channel over the spatial dims: like batch norm, and zero stays zero without an affine bias."""
    x = w.tracked(node.args[0])
    if x is None:
        return None
    tensors = [w.tensor_name(a) for a in node.args[1:5]]
    if x.dim != 1 or x.repeat != 1 or any(a is not None and t is None for a, t in zip(node.args[1:5], tensors)):
        w.barrier(node, f"instance norm at '{node.name}'")
        return None
    for t in tensors:
        w.slice_tensor(t, 0, x)
    _channel_count(w, node, x, "num_features")
    if tensors[0] is not None or tensors[1] is not None:
        module = w.owner(tensors[0] or tensors[1])
        parts = w.cost_parts(x, w.width(x))
        w.add_layer(
            LayerCost(
                module=module,
                kind="norm",
                flops_per_pair=0.0,
                params_per_pair=0.0,
                bias_per_out=2.0,
                in_parts=parts,
                out_parts=parts,
                depthwise=True,
                count_params=w.first_call(module),
            )
        )
    return _nonzero(x, node) if tensors[1] is not None else x


@_rule("layer_norm", "rms_norm")
def layer_norm(w: Walk, node: fx.Node) -> Any:
    """A norm over the channel dim: exact after export when it normalises over the open channels only
    (attach gives it open-channel statistics at full width: ``Analysis.norms``)."""
    x = w.tracked(node.args[0])
    shape = w.shape(node.args[0])
    if x is None or shape is None:
        return None
    normalized = list(arg(node, 1, "normalized_shape", ()))
    names = ("weight", "bias") if op_name(node) == "layer_norm" else ("weight",)
    raw = [arg(node, 2 + i, n) for i, n in enumerate(names)]
    tensors = [w.tensor_name(a) for a in raw]
    module = next((w.owner(t) for t in tensors if t), None) or w.scope_module(node)
    if (
        x.dim != len(shape) - 1
        or len(normalized) != 1
        or x.repeat != 1
        or module is None
        or any(a is not None and t is None for a, t in zip(raw, tensors))
        or any(t is not None and w.reads(t) != 1 for t in tensors)
    ):
        w.barrier(node, f"'{op_name(node)}' at '{node.name}' (not over the channel dim alone, or reused)")
        return None
    w.need_zero(x, f"norm '{module}'", module)
    for t in tensors:
        w.slice_tensor(t, 0, x)
    parts = w.cost_parts(x, w.width(x))
    w.norm_over(module, x)
    w.add_layer(
        LayerCost(
            module=module,
            kind="norm",
            flops_per_pair=0.0,
            params_per_pair=0.0,
            bias_per_out=float(sum(t is not None for t in tensors)),
            in_parts=parts,
            out_parts=parts,
            depthwise=True,
            count_params=w.first_call(module),
        )
    )
    return _nonzero(x, node)


@_rule("embedding")
def embedding(w: Walk, node: fx.Node) -> Any:
    """A table lookup makes new channels (the table's columns), like a producer."""
    weight = w.tensor_name(node.args[0])
    out_shape = w.shape(node)
    if weight is None or out_shape is None:
        return None
    module = w.module_reading(weight, node)
    channels = out_shape[-1]
    out = w.producer(node, module, channels, len(out_shape) - 1, foldable=False)
    w.slice_tensor(weight, 1, out)
    rows = w.shape(node.args[0])[0]
    w.add_layer(
        LayerCost(
            module=module,
            kind="embedding",
            flops_per_pair=0.0,
            params_per_pair=float(rows),
            bias_per_out=0.0,
            in_parts=((None, 1, 1),),
            out_parts=w.cost_parts(out, channels),
            depthwise=False,
            count_params=w.first_call(module),
        )
    )
    return out


@_rule("addmm", "mm", "matmul", "bmm")
def matmul(w: Walk, node: fx.Node) -> Any:
    """``x @ W`` with a parameter ``W`` (GPT-2's Conv1D: ``addmm(bias, x, W)``) is a linear layer
    with the weight stored transposed; a product of two activations is a barrier for their channels."""
    name = op_name(node)
    bias_node, x_node, weight_node = (
        (node.args[0], node.args[1], node.args[2]) if name == "addmm" else (None, *node.args[:2])
    )
    weight, bias = w.tensor_name(weight_node), w.tensor_name(bias_node)
    x = w.tracked(x_node)
    in_shape, out_shape, w_shape = w.shape(x_node), w.shape(node), w.shape(weight_node)
    if in_shape is None or out_shape is None or w_shape is None:
        return None
    w.add_flops(node, 2.0 * math.prod(out_shape) * in_shape[-1])
    if weight is None or len(w_shape) != 2 or (bias_node is not None and bias is None):
        if x is not None or w.tracked(weight_node) is not None:
            if name in ("matmul", "bmm"):
                return _batched_matmul(w, node, x_node, weight_node)
            w.barrier(node, f"'{name}' of gated activations at '{node.name}'")
        return None
    module = w.module_reading(weight, node)
    in_features, out_features = w_shape
    tokens = math.prod(in_shape[:-1])
    if x is not None:
        w.need_zero(x, f"'{name}' with '{weight}'")
        if x.dim == len(in_shape) - 1:  # a tied weight is sliced alike at every read
            w.slice_tensor(weight, 0, x)
        else:
            w.fix(x.parts, f"'{weight}' is read twice or across another dim")
            x = None
    out = w.producer(node, module, out_features, len(out_shape) - 1, foldable=False)
    w.slice_tensor(weight, 1, out)
    w.slice_tensor(bias, 0, out)
    w.add_layer(
        LayerCost(
            module=module,
            kind="linear",
            flops_per_pair=2.0 * tokens,
            params_per_pair=1.0,
            bias_per_out=1.0 if bias else 0.0,
            in_parts=w.cost_parts(x, in_features),
            out_parts=w.cost_parts(out, out_features),
            depthwise=False,
            count_params=w.first_call(module),
        ),
        op=node,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Pooling, padding, resampling: they act on the dims after the channel dim
# --------------------------------------------------------------------------------------------------


@_rule(*sorted(SPATIAL_OPS))
def spatial(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    if x is None:
        return None
    if x.dim != 1 or x.repeat != 1:
        w.barrier(node, f"'{op_name(node)}' over the channel dim at '{node.name}'")
        return None
    if op_name(node) == "max_pool2d_with_indices":
        return [x, None]
    return x


@_rule("pad", "constant_pad_nd")
def pad(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    in_shape = w.shape(node.args[0])
    amounts = arg(node, 1, "pad")
    if x is None:
        return None
    if in_shape is None or not isinstance(amounts, (list, tuple)):
        w.barrier(node, f"pad at '{node.name}'")
        return None
    from_end = len(in_shape) - 1 - x.dim  # pads come in (before, after) pairs from the last dim
    if 2 * from_end + 1 < len(amounts) and (amounts[2 * from_end] != 0 or amounts[2 * from_end + 1] != 0):
        w.barrier(node, f"pad over the channel dim at '{node.name}'")
        return None
    if op_name(node) == "constant_pad_nd":
        value = arg(node, 2, "value", 0)
    else:
        value = arg(node, 3, "value", None) if arg(node, 2, "mode", "constant") == "constant" else 0
    return _nonzero(x, node) if value else x


# --------------------------------------------------------------------------------------------------
# Shape ops
# --------------------------------------------------------------------------------------------------


@_rule("view", "reshape", "_unsafe_view", "unflatten")
def reshape(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    in_shape, out_shape = w.shape(node.args[0]), w.shape(node)
    if x is None:
        return _view_param(w, node)
    if in_shape is None or out_shape is None:
        w.barrier(node, f"reshape at '{node.name}'")
        return None
    lead = math.prod(in_shape[: x.dim])
    block = in_shape[x.dim]
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) != lead:
            continue
        if out_shape[k] == block:
            out = x.with_dim(k)
            w.size_attr(node, k, out)  # (n, self.hidden_dim, h * w): torchvision's ViT flattens its patches
            return out
        for j in range(x.dim + 1, len(in_shape) + 1):
            if out_shape[k] == block * math.prod(in_shape[x.dim + 1 : j]):
                out = x.with_dim(k, x.repeat * math.prod(in_shape[x.dim + 1 : j]))
                w.size_attr(node, k, out)  # (B, N, self.attn_dim): merged heads
                return out
    for k in range(len(out_shape)):  # after every same-size match: a leading size-1 dim is no split
        if math.prod(out_shape[:k]) != lead or out_shape[k] == 1:
            continue
        for m in range(k + 2, len(out_shape) + 1):
            if math.prod(out_shape[k:m]) == block:
                return _split_channels(w, node, x, out_shape, k, m)
    w.barrier(node, f"reshape that splits the channel dim at '{node.name}'")
    return None


def _split_channels(w: Walk, node: fx.Node, x: ChannelInfo, out_shape, k: int, m: int) -> Any:
    """The channel dim becomes dims ``k .. m-1`` (``(B, N, H * D) -> (B, N, H, D)``).

    The last of them must lie within one channel: a first walk makes the channels that coarse
    (each head of ``D`` entries becomes one channel of its producer). The channels then lie along
    dim ``k``, or along dim ``k + 1`` with dim ``k`` picking equal pieces (``(B, N, 3, H, D)`` of a
    fused qkv projection: q, k and v).
    """
    inner = out_shape[m - 1]
    r = x.repeat
    if r % inner:
        factor = inner // math.gcd(r, inner)
        if w.request_units(x, factor):
            return None
        w.barrier(node, f"reshape that splits channels at '{node.name}'")
        return None
    trail = [math.prod(out_shape[j + 1 : m]) for j in range(k, m)]
    j = next(j for j in range(k, m) if r % trail[j - k] == 0)
    if j == k:
        out = ChannelInfo(x.parts, k, x.nonzero, r // trail[0])
        w.size_attr(node, k, out)
        return out
    if j == k + 1 and len(x.parts) >= 1:
        n = out_shape[k]
        width = w.width(x)
        if width % n:
            w.barrier(node, f"reshape that splits channels unevenly at '{node.name}'")
            return None
        per = width // n
        pieces = _pieces(w, node, x, [(i * per, (i + 1) * per) for i in range(n)])
        if pieces is None:
            return None
        items = tuple(ChannelInfo(p.parts, k + 1, p.nonzero, r // trail[1]) for p in pieces)
        w.size_attr(node, k + 1, items[0])
        return StackedInfo(k, items)
    w.barrier(node, f"reshape that splits the channel dim into several dims at '{node.name}'")
    return None


def _view_param(w: Walk, node: fx.Node) -> ParamView | None:
    """A view of a parameter keeps track of the parameter's dims that it keeps whole (same size, and
    the same number of entries before them)."""
    pv = w.param_view(node.args[0])
    in_shape, out_shape = w.shape(node.args[0]), w.shape(node)
    if pv is None or in_shape is None or out_shape is None:
        return None
    dims: list[int | None] = [None] * len(out_shape)
    for di, size in enumerate(in_shape):
        if size == 1 or pv.dims[di] is None:
            continue
        before = math.prod(in_shape[:di])
        for do, out_size in enumerate(out_shape):
            if out_size == size and math.prod(out_shape[:do]) == before:
                dims[do] = pv.dims[di]
                break
    if not any(d is not None for d in dims):
        return None
    return ParamView(pv.name, tuple(dims))


@_rule("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle(w: Walk, node: fx.Node) -> Any:
    """``pixel_shuffle(x, r)`` moves each run of ``r * r`` channels into one channel's ``r x r`` block of
    pixels; ``pixel_unshuffle`` does the reverse. A gated channel stays one run of entries along the
    channel dim: ``r * r`` times shorter after the shuffle (so a channel must cover whole runs: the
    producer's channels become runs of ``r * r`` where they do not), ``r * r`` times longer after the
    unshuffle."""
    x = w.tracked(node.args[0])
    if x is None:
        return None
    in_shape = w.shape(node.args[0])
    if in_shape is None or x.dim != len(in_shape) - 3:
        w.barrier(node, f"'{op_name(node)}' at '{node.name}'")
        return None
    run = arg(node, 1, "upscale_factor" if op_name(node) == "pixel_shuffle" else "downscale_factor") ** 2
    if op_name(node) == "pixel_unshuffle":
        return x.with_dim(x.dim, x.repeat * run)
    if x.repeat % run:
        if not w.request_units(x, run // math.gcd(x.repeat, run)):
            w.barrier(node, f"'pixel_shuffle' within a channel at '{node.name}'")
        return None
    return x.with_dim(x.dim, x.repeat // run)


@_rule("index")
def index(w: Walk, node: fx.Node) -> Any:
    """A table indexed along its first dims (a relative position bias ``table[index]``) keeps its other dims."""
    pv = w.param_view(node.args[0])
    indices = node.args[1]
    if w.tracked(node.args[0]) is not None or w.all_tracked(indices):
        w.barrier(node, f"indexing at '{node.name}'")
        return None
    if pv is None or not isinstance(indices, (list, tuple)) or any(i is None for i in indices):
        return None
    shapes = [w.shape(i) for i in indices]
    if any(sh is None for sh in shapes) or len({tuple(sh) for sh in shapes}) != 1:
        return None
    return ParamView(pv.name, (None,) * len(shapes[0]) + tuple(pv.dims[len(indices) :]))


@_rule("flatten")
def flatten(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    in_shape = w.shape(node.args[0])
    if x is None:
        return _view_param(w, node)
    if in_shape is None:
        return None
    ndim = len(in_shape)
    start, end = arg(node, 1, "start_dim", 0) % ndim, arg(node, 2, "end_dim", -1) % ndim
    if x.dim < start:
        return x
    if x.dim > end:
        return x.with_dim(x.dim - (end - start))
    lead = math.prod(in_shape[start : x.dim])
    if lead != 1:
        if x.dim == end and x.repeat == 1:  # channels last in the merged dims: the spaces repeat (Swin)
            return ChannelInfo(x.parts * lead, start, x.nonzero * lead)
        w.barrier(node, f"flatten of the channel dim with leading dims at '{node.name}'")
        return None
    return x.with_dim(start, x.repeat * math.prod(in_shape[x.dim + 1 : end + 1]))


@_rule("permute", "transpose", "t", "movedim", "swapaxes")
def permute(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    pv = w.param_view(node.args[0])
    stacked = w.value(node.args[0])
    stacked = stacked if isinstance(stacked, StackedInfo) else None
    in_shape = w.shape(node.args[0])
    if (x is None and pv is None and stacked is None) or in_shape is None:
        return None
    ndim = len(in_shape)
    name = op_name(node)
    if name == "permute":
        order = [d % ndim for d in node.args[1]]
    elif name == "t":
        order = [1, 0] if ndim == 2 else [0]
    elif name == "movedim":
        order = list(range(ndim))
        order.insert(node.args[2] % ndim, order.pop(node.args[1] % ndim))
    else:
        a, b = node.args[1] % ndim, node.args[2] % ndim
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
    if stacked is not None:
        return StackedInfo(order.index(stacked.dim), tuple(i.with_dim(order.index(i.dim)) for i in stacked.items))
    if x is None:
        return ParamView(pv.name, tuple(pv.dims[d] for d in order))
    return x.with_dim(order.index(x.dim))  # entries along the channel dim keep their order


@_rule("roll", "flip")
def roll(w: Walk, node: fx.Node) -> Any:
    """Moves entries along other dims than the channel dim."""
    x = w.tracked(node.args[0])
    shape = w.shape(node.args[0])
    if x is None or shape is None:
        return None
    dims = arg(node, 2, "dims", None) if op_name(node) == "roll" else arg(node, 1, "dims", None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or x.dim in {d % len(shape) for d in dims} or x.repeat != 1:
        w.barrier(node, f"'{op_name(node)}' over the channel dim at '{node.name}'")
        return None
    return x


@_rule("unsqueeze")
def unsqueeze(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    if x is None:
        return _view_param(w, node)
    d = node.args[1] % (len(w.shape(node.args[0])) + 1)
    return x.with_dim(x.dim + 1 if d <= x.dim else x.dim)


@_rule("squeeze")
def squeeze(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    stacked = w.value(node.args[0])
    if isinstance(stacked, StackedInfo):  # an unbatched RNN's h_n, c_n: (states, 1, H) -> (states, H)
        return _squeeze_stacked(w, node, stacked)
    if x is None:
        return _view_param(w, node)
    in_shape, out_shape = w.shape(node.args[0]), w.shape(node)
    removed = [d for d in range(x.dim) if in_shape[d] == 1]
    if len(in_shape) - len(out_shape) == sum(1 for s in in_shape if s == 1) or len(node.args) < 2:
        return x.with_dim(x.dim - len(removed))
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    dims = {d % len(in_shape) for d in dims if in_shape[d % len(in_shape)] == 1}
    return x.with_dim(x.dim - sum(1 for d in dims if d < x.dim))


def _squeeze_stacked(w: Walk, node: fx.Node, stacked: StackedInfo) -> StackedInfo | None:
    """``squeeze`` of stacked pieces: their dims move down past the removed size-1 dims."""
    in_shape = w.shape(node.args[0])
    if in_shape is None:
        w.barrier(node, f"'squeeze' of stacked channel pieces at '{node.name}'")
        return None
    given = node.args[1] if len(node.args) > 1 else None
    dims = range(len(in_shape)) if given is None else (given if isinstance(given, (list, tuple)) else [given])
    removed = {d % len(in_shape) for d in dims if in_shape[d % len(in_shape)] == 1}
    if stacked.dim in removed or any(item.dim in removed for item in stacked.items):
        w.barrier(node, f"'squeeze' of stacked channel pieces at '{node.name}'")
        return None

    def moved(d: int) -> int:
        return d - sum(1 for r in removed if r < d)

    return StackedInfo(moved(stacked.dim), tuple(item.with_dim(moved(item.dim)) for item in stacked.items))


@_rule("expand", "expand_as")
def expand(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    in_shape, out_shape = w.shape(node.args[0]), w.shape(node)
    if in_shape is None or out_shape is None:
        return None
    lead = len(out_shape) - len(in_shape)
    if x is None:
        value = w.value(node.args[0])
        if isinstance(value, Filled):
            grown = [d if in_shape[i] == out_shape[lead + i] else None for i, d in enumerate(value.dims)]
            return Filled(value.node, value.arg_index, (None,) * lead + tuple(grown))
        pv = w.param_view(node.args[0])
        return ParamView(pv.name, (None,) * lead + pv.dims) if pv is not None else None
    if out_shape[x.dim + lead] != in_shape[x.dim]:
        w.barrier(node, f"expand of the channel dim at '{node.name}'")
        return None
    return x.with_dim(x.dim + lead)


@_rule("mean", "sum", "amax", "amin")
def reduce(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    in_shape = w.shape(node.args[0])
    if x is None:
        return None
    dims = arg(node, 1, "dim")
    keepdim = arg(node, 2, "keepdim", False)
    if in_shape is None or dims is None or x.repeat != 1:
        w.barrier(node, f"reduction at '{node.name}'")
        return None
    dims = {d % len(in_shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if x.dim in dims:
        name = op_name(node)
        module = w.scope_module(node)
        if name == "sum" or (name == "mean" and dims == {x.dim} and module is not None):
            # With closed channels exactly zero, a sum over them is the exported model's sum; a mean
            # is too once it divides by the open count, which attach arranges at full width.
            w.need_zero(x, f"'{name}' over the channels at '{node.name}'")
            if name == "mean":
                w.norm_over(module, x)
            return None
        w.barrier(node, f"reduction over the channel dim at '{node.name}'")
        return None
    return x if keepdim else x.with_dim(x.dim - sum(1 for d in dims if d < x.dim))


@_rule("cat", "concat")
def cat(w: Walk, node: fx.Node) -> Any:
    # torch.cat skips 1-D empty tensors whatever the dim (a KV cache's first update: cat([empty, k]))
    tensors = [t for t in node.args[0] if w.shape(t) != torch.Size([0])]
    out_shape = w.shape(node)
    dim = arg(node, 1, "dim", 0)
    infos = [w.tracked(t) for t in tensors]
    if all(i is None for i in infos) or out_shape is None:
        return None
    dim %= len(out_shape)
    if all(i is not None and i.dim == dim and i.repeat == 1 for i in infos):
        return ChannelInfo(tuple(p for i in infos for p in i.parts), dim, tuple(s for i in infos for s in i.nonzero))
    if any(i is not None and i.dim == dim for i in infos):
        w.barrier(node, f"cat over the channel dim at '{node.name}'")
        return None
    first = next(i for i in infos if i is not None)
    nonzero = list(first.nonzero)
    for t, other in zip(tensors, infos):
        if other is None:  # an untracked piece: a parameter (class token) can be sliced alike
            pv = w.param_view(t)
            shape = w.shape(t)
            tdim = pv.dims[first.dim] if pv is not None and first.repeat == 1 else None
            if tdim is None or shape is None or shape[first.dim] != w.width(first):
                w.barrier(node, f"cat of gated and untracked tensors at '{node.name}'")
                return None
            w.slice_tensor(pv.name, tdim, first)
            nonzero = [node] * len(nonzero)
            continue
        if other.dim != first.dim or other.repeat != first.repeat or w.sizes(other) != w.sizes(first):
            w.barrier(node, f"cat of differently arranged channels at '{node.name}'")
            return None
        w.tie(first.parts, other.parts)
        nonzero = [n if n is not None else s for n, s in zip(nonzero, other.nonzero)]
    return ChannelInfo(first.parts, first.dim, tuple(nonzero), first.repeat)


def _pieces(w: Walk, node: fx.Node, x: ChannelInfo, bounds: list[tuple[int, int]]) -> list[ChannelInfo] | None:
    """The infos of channel ranges ``[a, b)`` of ``x``; cuts spaces where a range ends inside one."""
    offsets = _offsets(w.sizes(x)) | {0, w.width(x)}
    wanted = {c for ab in bounds for c in ab}
    if not wanted <= offsets:
        if w.request_cuts(x, sorted(wanted)):
            return None
        w.barrier(node, f"slicing the channel dim at '{node.name}'")
        return None
    out = []
    for a, b in bounds:
        keep = [(p, s) for (p, at), s in zip(w.part_offsets(x), x.nonzero) if a <= at < b]
        out.append(ChannelInfo(tuple(p for p, _ in keep), x.dim, tuple(s for _, s in keep), x.repeat))
    return out


@_rule("split", "split_with_sizes", "chunk", "unsafe_split")
def split(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    shape = w.shape(node.args[0])
    if x is None or shape is None:
        return None
    name = op_name(node)
    dim = arg(node, 2, "dim", 0) % len(shape)
    size = shape[dim]
    if name == "chunk":
        n = node.args[1]
        step = -(-size // n)
        sizes = [min(step, size - i) for i in range(0, size, step)]
    elif isinstance(node.args[1], int):
        sizes = [min(node.args[1], size - i) for i in range(0, size, node.args[1])]
    else:
        sizes = list(node.args[1])
    if dim != x.dim:
        return [x for _ in sizes]
    if any(s % x.repeat for s in sizes):
        w.barrier(node, f"split of flattened channels at '{node.name}'")
        return None
    at, bounds = 0, []
    for s in sizes:
        bounds.append((at, at + s // x.repeat))  # in channels of repeat entries each
        at += s // x.repeat
    pieces = _pieces(w, node, x, bounds)
    if pieces and name != "chunk" and isinstance(node.args[1], int):
        w.size_attr(node, None, pieces[0])  # split(self.split_size): every piece keeps as many channels
    elif pieces and name != "chunk":
        w.size_list(node, pieces)  # split(self.splits): each entry follows its piece
    return pieces


@_rule("slice")
def slice_(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    shape = w.shape(node.args[0])
    if shape is None:
        return None
    if x is None:  # a slice of a parameter (a position table cut to the sequence length)
        pv = w.param_view(node.args[0])
        if pv is None:
            return None
        dim = arg(node, 1, "dim", 0) % len(shape)
        same = w.shape(node) == shape
        return ParamView(pv.name, tuple(d if (i != dim or same) else None for i, d in enumerate(pv.dims)))
    dim = arg(node, 1, "dim", 0) % len(shape)
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    start, end, _ = slice(start, end, step).indices(shape[dim])
    if dim != x.dim:
        return x
    if (start, end, step) == (0, shape[dim], 1):
        return x
    if step != 1 or start % x.repeat or end % x.repeat:
        w.barrier(node, f"strided slicing of the channel dim at '{node.name}'")
        return None
    pieces = _pieces(w, node, x, [(start // x.repeat, end // x.repeat)])
    return pieces[0] if pieces else None


@_rule("select", "unbind")
def select(w: Walk, node: fx.Node) -> Any:
    x = w.tracked(node.args[0])
    shape = w.shape(node.args[0])
    stacked = w.value(node.args[0])
    if isinstance(stacked, StackedInfo) and shape is not None:
        dim = arg(node, 1, "dim", 0) % len(shape)
        if dim != stacked.dim:
            w.barrier(node, f"'{op_name(node)}' across stacked channel pieces at '{node.name}'")
            return None
        items = [i.with_dim(i.dim - 1 if i.dim > dim else i.dim) for i in stacked.items]
        if op_name(node) == "unbind":
            return items
        index = node.args[2]
        return items[index] if isinstance(index, int) and -len(items) <= index < len(items) else None
    if x is None or shape is None:
        return None
    dim = arg(node, 1, "dim", 0) % len(shape)
    if dim == x.dim:
        w.barrier(node, f"selecting a channel at '{node.name}'")
        return None
    out = x.with_dim(x.dim - 1 if dim < x.dim else x.dim)
    return [out] * shape[dim] if op_name(node) == "unbind" else out


@_rule("getitem")
def getitem(w: Walk, node: fx.Node) -> Any:
    value = w.value(node.args[0])
    index = node.args[1]
    if isinstance(value, (list, tuple)) and isinstance(index, int) and -len(value) <= index < len(value):
        return value[index]
    if isinstance(value, ChannelInfo):
        w.barrier(node, f"indexing at '{node.name}'")
    return None


# --------------------------------------------------------------------------------------------------
# Attention: whole heads
# --------------------------------------------------------------------------------------------------


def _heads_agree(w: Walk, node: fx.Node, a: ChannelInfo, ha: int, b: ChannelInfo, hb: int) -> bool | None:
    """Tie head ``i`` of ``a`` (``ha`` heads) to the head(s) of ``b`` (``hb`` heads) it is paired
    with, ``hb`` dividing ``ha`` (grouped KV heads: ``ha / hb`` query heads share one KV head).

    True when tied; None when a coarser channel was requested for the next walk (a channel of
    ``a`` must cover as many heads as one of ``b``); False when they cannot be tied."""
    if ha % hb:
        return False
    ra, rb = a.repeat, b.repeat * (ha // hb)  # heads of a per channel of a / per channel of b
    if ra != rb:
        finer, factor = (a, rb // ra) if ra < rb else (b, ra // rb)
        if max(ra, rb) % min(ra, rb) == 0 and w.request_units(finer, factor):
            return None
        return False
    sizes_a, sizes_b = w.sizes(a), w.sizes(b)
    if sizes_a != sizes_b:
        if sum(sizes_a) == sum(sizes_b):
            offsets = _offsets(sizes_a) | _offsets(sizes_b)
            if w.request_cuts(a, sorted(offsets)) | w.request_cuts(b, sorted(offsets)):
                return None
        return False
    w.tie(a.parts, b.parts)
    return True


@_rule("scaled_dot_product_attention")
def attention(w: Walk, node: fx.Node) -> Any:
    """``softmax(q k^T) v`` per head (dim -3): heads of q, k and v are tied (a query head to the KV
    head it reads, with grouped KV heads), and head i of the output is zero where v's head i is, so
    closed heads are removed from q, k, v and from whatever reads the output. Head dims (the last
    dim) are not pruned. The mask may be a tensor over the heads (a bias table), sliced alike."""
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    infos = [w.tracked(t) for t in (q, k, v)]
    shapes = [w.shape(t) for t in (q, k, v)]
    mask_info = w.tracked(mask)
    out_shape = w.shape(node)
    if all(i is None for i in infos) and mask_info is None:
        return None
    if out_shape is None or any(s is None or len(s) < 3 for s in shapes):
        w.barrier(node, f"attention at '{node.name}'")
        return None
    heads = [s[-3] for s in shapes]
    if any(i is None or i.dim != len(s) - 3 for i, s in zip(infos, shapes)):
        w.barrier(node, f"attention over channels other than whole heads at '{node.name}'")
        return None
    iq, ik, iv = infos
    for a, ha, b, hb in ((ik, heads[1], iv, heads[2]), (iq, heads[0], ik, heads[1])):
        tied = _heads_agree(w, node, a, ha, b, hb)
        if tied is None:
            return None
        if not tied:
            w.barrier(node, f"attention with heads arranged differently at '{node.name}'")
            return None
    if mask is not None and not _mask_heads(w, node, mask, iq, heads[0]):
        return None
    nonzero = iv.nonzero if len(iv.nonzero) == len(iq.parts) else (node,) * len(iq.parts)
    out = ChannelInfo(iq.parts, len(out_shape) - 3, nonzero, iq.repeat)
    total = 2.0 * math.prod(shapes[0][:-1]) * shapes[1][-2] * (shapes[0][-1] + shapes[2][-1])
    w.add_flops(node, total)
    parts = w.cost_parts(out, heads[0])
    module = w.scope_module(node) or node.name
    per_head = total / heads[0]
    w.add_layer(
        LayerCost(
            module=f"{module}@{node.name}",
            kind="attention",
            flops_per_pair=per_head,
            params_per_pair=0.0,
            bias_per_out=0.0,
            in_parts=parts,
            out_parts=parts,
            depthwise=True,
            count_params=False,
        ),
        op=node,
    )
    return out


def _mask_heads(w: Walk, node: fx.Node, mask: Any, iq: ChannelInfo, heads: int) -> bool:
    """An attention mask or bias: broadcast over the heads, or per head (tracked, or a parameter view)."""
    shape = w.shape(mask)
    if shape is None:
        return True  # a bool or None
    if len(shape) < 3 or shape[-3] == 1:
        info = w.tracked(mask)
        if info is not None:
            w.barrier(node, f"attention mask over gated channels at '{node.name}'")
            return False
        return True
    info = w.tracked(mask)
    if info is not None:
        if info.dim != len(shape) - 3 or _heads_agree(w, node, iq, heads, info, heads) is not True:
            w.barrier(node, f"attention mask arranged differently from the heads at '{node.name}'")
            return False
        return True
    filled = w.value(mask)
    if isinstance(filled, Filled) and filled.dims[len(shape) - 3] is not None:
        # a bias the forward fills per head (zeros of n_heads): its size follows the kept heads
        w.size_attr(filled.node, filled.dims[len(shape) - 3], iq, filled.arg_index)
        return True
    pv = w.param_view(mask)
    tensor_dim = pv.dims[len(shape) - 3] if pv is not None else None
    if tensor_dim is None or iq.repeat != 1:
        w.barrier(node, f"attention with a per-head mask that is not a parameter at '{node.name}'")
        return False
    w.slice_tensor(pv.name, tensor_dim, iq)
    return True


@_rule("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def softmax(w: Walk, node: fx.Node) -> Any:
    """Over another dim than the channels: per channel, and zeros become non-zero."""
    x = w.tracked(node.args[0])
    shape = w.shape(node.args[0])
    if x is None or shape is None:
        return None
    if arg(node, 1, "dim", -1) % len(shape) == x.dim:
        w.barrier(node, f"'{op_name(node)}' over the channel dim at '{node.name}'")
        return None
    return _nonzero(x, node)


@_rule("where")
def where(w: Walk, node: fx.Node) -> Any:
    """``where(cond, a, b)``: channels of a and b are coupled like a sum's; the condition must be
    the same for every channel (broadcast over the channel dim)."""
    cond, a, b = (node.args + (None, None, None))[:3]
    out_shape = w.shape(node)
    ia, ib = w.tracked(a), w.tracked(b)
    if ia is None and ib is None:
        if w.tracked(cond) is not None:
            w.barrier(node, f"'where' with a gated condition at '{node.name}'")
            return None
        return _filled_through(w, node, (cond, a, b))
    if out_shape is None or w.tracked(cond) is not None:
        w.barrier(node, f"'where' at '{node.name}'")
        return None
    if ia is not None and ib is not None:
        return _binary_tracked(w, node, "add", a, ia, b, ib, out_shape)
    x_node, x, other = (a, ia, b) if ia is not None else (b, ib, a)
    dim = x.dim + len(out_shape) - len(w.shape(x_node))
    for t in (cond, other):
        shape = w.shape(t)
        at = dim - (len(out_shape) - len(shape)) if shape is not None else -1
        if at >= 0 and shape[at] != 1:
            w.barrier(node, f"'where' that differs across the channels at '{node.name}'")
            return None
    zero = isinstance(other, (int, float)) and other == 0
    return x.with_dim(dim) if zero else ChannelInfo(x.parts, dim, (node,) * len(x.parts), x.repeat)


def _batched_matmul(w: Walk, node: fx.Node, a: Any, b: Any) -> Any:
    """``a @ b`` of activations (attention's ``q @ k^T`` and ``p @ v``): channels along a batch dim
    (the heads) are tied between a and b; the output's head i is zero where a's or b's is."""
    ia, ib = w.tracked(a), w.tracked(b)
    sa, sb, out_shape = w.shape(a), w.shape(b), w.shape(node)
    if sa is None or sb is None or out_shape is None or len(sa) < 3 or len(sb) < 3:
        w.barrier(node, f"'{op_name(node)}' of gated activations at '{node.name}'")
        return None
    n = len(out_shape)
    dims = []
    for info, shape in ((ia, sa), (ib, sb)):
        if info is None:
            dims.append(None)
            continue
        d = info.dim + n - len(shape)
        if info.dim >= len(shape) - 2:
            w.barrier(node, f"'{op_name(node)}' over gated channels at '{node.name}'")
            return None
        dims.append(d)
    if ia is not None and ib is not None:
        if dims[0] != dims[1] or _heads_agree(w, node, ia, out_shape[dims[0]], ib, out_shape[dims[1]]) is not True:
            w.barrier(node, f"'{op_name(node)}' of differently arranged channels at '{node.name}'")
            return None
        x, d = ia, dims[0]
        nonzero = tuple(None if (p is None or q is None) else p for p, q in zip(ia.nonzero, ib.nonzero))
    else:
        x, d = (ia, dims[0]) if ia is not None else (ib, dims[1])
        other = sb if ia is not None else sa
        at = d - (n - len(other))
        if at >= 0 and other[at] != 1:
            w.barrier(node, f"'{op_name(node)}' with an untracked tensor over the channels at '{node.name}'")
            return None
        nonzero = x.nonzero
    out = ChannelInfo(x.parts, d, nonzero, x.repeat)
    total = 2.0 * math.prod(out_shape) * sa[-1]
    w.add_flops(node, total)
    parts = w.cost_parts(out, out_shape[d])
    module = w.scope_module(node) or node.name
    per = total / out_shape[d]
    w.add_layer(
        LayerCost(
            module=f"{module}@{node.name}",
            kind="attention",
            flops_per_pair=per,
            params_per_pair=0.0,
            bias_per_out=0.0,
            in_parts=parts,
            out_parts=parts,
            depthwise=True,
            count_params=False,
        ),
        op=node,
    )
    return out


@_rule("group_norm")
def group_norm(w: Walk, node: fx.Node) -> Any:
    """GroupNorm over gated channels: group-aligned (channel i of every group shares a gate, so every
    group keeps as many channels and the exported norm keeps its group count), with open-channel
    statistics at full width (``Analysis.norms``)."""
    x = w.tracked(node.args[0])
    if x is None:
        return None
    groups = arg(node, 1, "num_groups")
    raw = [arg(node, 2, "weight"), arg(node, 3, "bias")]
    tensors = [w.tensor_name(a) for a in raw]
    module = next((w.owner(t) for t in tensors if t), None) or w.scope_module(node)
    if (
        x.dim != 1
        or x.repeat != 1
        or not isinstance(groups, int)
        or module is None
        or any(a is not None and t is None for a, t in zip(raw, tensors))
        or any(t is not None and w.reads(t) != 1 for t in tensors)
    ):
        w.barrier(node, f"group norm at '{node.name}'")
        return None
    if groups > 1 and _group_aligned(w, node, x, groups) is None:
        return None
    w.need_zero(x, f"norm '{module}'")
    for t in tensors:
        w.slice_tensor(t, 0, x)
    _channel_count(w, node, x, "num_channels")
    w.norm_over(module, x)
    parts = w.cost_parts(x, w.width(x))
    affine = float(sum(t is not None for t in tensors))
    w.add_layer(
        LayerCost(
            module=module,
            kind="norm",
            flops_per_pair=0.0,
            params_per_pair=0.0,
            bias_per_out=affine,
            in_parts=parts,
            out_parts=parts,
            depthwise=True,
            count_params=w.first_call(module),
        )
    )
    return _nonzero(x, node)


@_rule("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty")
def factory(w: Walk, node: fx.Node) -> Any:
    """A tensor filled with one value: constant along every dim (:class:`Filled`)."""
    index = 1 if op_name(node).startswith("new_") else 0
    shape = w.shape(node)
    return Filled(node, index, tuple(range(len(shape)))) if shape is not None else None


def _filled_through(w: Walk, node: fx.Node, operands) -> Filled | None:
    """An elementwise op of a :class:`Filled` value and untracked ones: still constant along the
    dims where every other operand has size 1."""
    out_shape = w.shape(node)
    filled = [w.value(t) for t in operands if isinstance(t, fx.Node) and isinstance(w.value(t), Filled)]
    if out_shape is None or len(filled) != 1:
        return None
    source = next(t for t in operands if isinstance(t, fx.Node) and w.value(t) is filled[0])
    lead = len(out_shape) - len(w.shape(source))
    dims: list[int | None] = [None] * lead + list(filled[0].dims)
    for t in operands:
        shape = w.shape(t)
        if t is source or shape is None:
            continue
        off = len(out_shape) - len(shape)
        for i, size in enumerate(shape):
            if size != 1:
                dims[off + i] = None
    return Filled(filled[0].node, filled[0].arg_index, tuple(dims))


# --------------------------------------------------------------------------------------------------
# Recurrent layers: LSTM, GRU and RNN hidden units
# --------------------------------------------------------------------------------------------------

# Per op: (gate blocks per hidden unit, the block a gate scales). LSTM: i, f, g, o, the cell
# candidate g; GRU: r, z, n, the new gate n; nn.RNN: one block, h = tanh/relu(W x + U h + b) itself.
_RECURRENT_BLOCKS = {"lstm": (4, 2), "gru": (3, 2), "rnn_tanh": (1, 0), "rnn_relu": (1, 0)}


@_rule(*_RECURRENT_BLOCKS)
def recurrent(w: Walk, node: fx.Node) -> Any:
    """``aten.lstm.input`` / ``aten.gru.input`` / ``aten.rnn_tanh.input`` / ``aten.rnn_relu.input``:
    every layer (and direction) of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in one op, its
    parameters one flat list ``[w_ih, w_hh, b_ih, b_hh, (w_hr)]`` per layer and direction.

    The hidden units make one new space of ``hidden_size`` channels, shared by every layer and
    direction (the module has one ``hidden_size``, and ``h_0`` is one ``(layers * directions, B, H)``
    tensor, so a physically smaller module keeps as many units in each). Unit ``j`` is rows
    ``j, H + j, ...`` of each layer's ``w_ih``, ``w_hh`` and biases, column ``j`` of ``w_hh`` (the
    recurrence), of the next layer's ``w_ih`` (once per direction) and of whatever reads the output.
    The gate acts inside the recurrence, on the parameters (:class:`RecurrentGate`), so closed units
    are exact zeros in the output, ``h_n`` and ``c_n`` alike. With ``proj_size`` the units are the LSTM's
    cells: rows as above and column ``j`` of ``w_hr``; the projected outputs stay whole.
    """
    kind = op_name(node)
    blocks, block = _RECURRENT_BLOCKS[kind]
    x_node = node.args[0]
    x = w.tracked(x_node)
    overload = getattr(node.target, "_overloadname", "")
    if overload != "input" or len(node.args) < 9:  # lstm.data / gru.data: a PackedSequence
        w.barrier(node, f"'{kind}' of a packed sequence at '{node.name}'")
        return None
    hx, flat, has_biases, num_layers = node.args[1], node.args[2], node.args[3], node.args[4]
    directions = 2 if node.args[7] else 1
    names = [w.tensor_name(p) for p in flat]
    in_shape = w.shape(x_node)
    per = len(flat) // (num_layers * directions) if num_layers * directions else 0
    if any(n is None for n in names) or in_shape is None or per not in (2, 3, 4, 5):
        w.barrier(node, f"'{kind}' with computed weights at '{node.name}'")
        return None
    module = w.owner(names[0])
    rnn = w.module_of(module)
    if not isinstance(rnn, nn.RNNBase) or any(w.owner(n) != module for n in names):
        w.barrier(node, f"'{kind}' outside an nn.LSTM / nn.GRU / nn.RNN at '{node.name}'")
        return None
    hidden = rnn.hidden_size
    proj = getattr(rnn, "proj_size", 0)
    fixed = None
    if w.is_excluded(module):
        fixed = "excluded by the user"
    elif any(w.reads(n) > 1 for n in names):
        fixed = "module is called more than once"
    elif not all(isinstance(h, fx.Node) and op_name(h) in ("zeros", "new_zeros") for h in _as_list(hx)):
        fixed = "initial hidden state given (closed units would not stay zero)"
    for info in w.all_tracked(hx):
        w.fix(info.parts, f"initial state of {type(rnn).__name__} '{module}'")
    key = f"producer:{module}"
    space = w.new_space(hidden, key, module, fixed)
    units = ChannelInfo((space,), 0, (None,))
    w.add_recurrent(RecurrentGate(module, space, hidden, block, blocks))

    tokens = math.prod(in_shape[:-1])
    if x is not None:
        w.need_zero(x, f"{type(rnn).__name__} '{module}'")
        if x.dim != len(in_shape) - 1:
            w.fix(x.parts, f"{type(rnn).__name__} '{module}' reads channels from a dimension other than the last")
            x = None
    rows = ((space, hidden, blocks),)
    flops = 0.0
    for layer in range(num_layers):
        for d in range(directions):
            at = (layer * directions + d) * per
            w_ih, w_hh = names[at], names[at + 1]
            biases = names[at + 2 : at + 4] if has_biases else []
            w_hr = names[at + per - 1] if proj > 0 else None
            if layer == 0:
                inputs = w.cost_parts(x, in_shape[-1])
                if x is not None:
                    w.slice_tensor(w_ih, 1, x)
            elif proj > 0:
                inputs = ((None, directions * proj, 1),)
            else:
                inputs = ((space, hidden, 1),) * directions
                for e in range(directions):
                    w.slice_tensor(w_ih, 1, units, offset=e * hidden)
            for t in [w_ih, w_hh, *biases]:
                for b in range(blocks):
                    w.slice_tensor(t, 0, units, offset=b * hidden)
            recurrence = ((None, proj, 1),) if proj > 0 else ((space, hidden, 1),)
            if proj == 0:
                w.slice_tensor(w_hh, 1, units)
            costs = [(w_ih, inputs, rows), (w_hh, recurrence, rows)]
            if w_hr is not None:
                w.slice_tensor(w_hr, 1, units)
                costs.append((w_hr, ((space, hidden, 1),), ((None, proj, 1),)))
            for name, in_parts, out_parts in costs:
                a = sum(size * rep for _, size, rep in in_parts)
                b = sum(size * rep for _, size, rep in out_parts)
                flops += 2.0 * tokens * a * b
                w.add_layer(
                    LayerCost(
                        module=name,
                        kind="linear",
                        flops_per_pair=2.0 * tokens,
                        params_per_pair=1.0,
                        bias_per_out=0.0,
                        in_parts=in_parts,
                        out_parts=out_parts,
                        depthwise=False,
                        count_params=w.first_call(name),
                    ),
                    op=node,  # the op's FLOPs are the sum of its layers'
                )
            for name in biases:
                w.add_layer(
                    LayerCost(
                        module=name,
                        kind="param",
                        flops_per_pair=0.0,
                        params_per_pair=0.0,
                        bias_per_out=1.0,
                        in_parts=rows,
                        out_parts=rows,
                        depthwise=True,
                        count_params=w.first_call(name),
                    )
                )
    w.add_flops(node, flops)
    dim = len(in_shape) - 1  # the output has the input's dims, its features last
    output = None if proj > 0 else ChannelInfo((space,) * directions, dim, (None,) * directions)
    states = num_layers * directions  # h_n, c_n: (states, B, H), or (states, H) for an unbatched input
    cells = StackedInfo(0, (ChannelInfo((space,), 1 if len(in_shape) == 2 else 2, (None,)),) * states)
    h_n = None if proj > 0 else cells
    return [output, h_n, cells] if kind == "lstm" else [output, h_n]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


__all__ = ["RULES", "Rule", "arg", "register_rule", "rule_table"]
