"""The ATen vocabulary of the analysis: op names, the named sets of ops that the passes treat alike,
and what an elementwise op does at 0.

Ops are named as in ``torch.ops.aten`` without the overload and without the in-place underscore
(``aten.relu_.default`` is ``"relu"``; :func:`op_name`). This module imports nothing else of the
analysis, so every pass (the op rules, the head-dim pass, the side-pass recipes) and the walk can
read it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

# --------------------------------------------------------------------------------------------------
# Op names
# --------------------------------------------------------------------------------------------------


def target_name(target: Any) -> str:
    """An ATen op's name without overload or in-place suffix (``aten.relu_.default`` -> ``relu``)."""
    name = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def op_name(node: fx.Node) -> str:
    """The name of the op a ``call_function`` node runs (see :func:`target_name`)."""
    return target_name(node.target)


# --------------------------------------------------------------------------------------------------
# Named sets of ops
# --------------------------------------------------------------------------------------------------

# Elementwise activations with f(0) = 0 (the walk moves gates past them; dead_at_zero checks which
# of them have derivative 0 at 0 numerically).
ACTIVATIONS = frozenset(
    {
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
)
# Ops that zero random entries (and scale the rest): zeros stay zero.
DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout"})
# Ops whose output holds exactly the input's values, dtype and all (maybe in new storage).
SAME_VALUES = frozenset({"clone", "contiguous", "alias", "detach"})
# dtype / device casts.
CASTS = frozenset({"to", "_to_copy"})
# Copies: the input's values, maybe cast. A copy of a parameter is still a view of it, a copy of
# stacked channel pieces or of a filled tensor is still that.
COPIES = SAME_VALUES | CASTS
# Copies through which a gradient passes as it is (``detach`` stops it; a constant lifted into the
# graph and ``type_as`` casts pass it).
GRADIENT_COPIES = (COPIES - {"detach"}) | {"lift_fresh_copy", "type_as"}
# Views that reshape a tensor.
VIEWS = frozenset({"view", "reshape", "_unsafe_view"})

# The ops a producer's gate may move past: activations, dropout and copies (they keep zeros).
ACTIVATION_OPS = ACTIVATIONS | DROPOUTS | SAME_VALUES
# Ops a regate may move past: zero-preserving, one input, channels kept (only their position moves).
PASS_OPS = ACTIVATION_OPS | CASTS | VIEWS | {"permute", "transpose", "flatten"}
# Ops that accept stacked channel pieces (pieces of channels along one dim): they pick pieces or move dims.
STACK_OPS = SAME_VALUES | {"permute", "transpose", "unbind", "select", "getitem", "squeeze"}

# Elementwise math with f(0) = 0 besides the activations.
ZERO_KEEPING_MATH = frozenset({"neg", "abs", "square", "sin", "erf"})
# Elementwise with f(0) = 0: closed channels stay zero (the side-pass recipes replay them too).
ZERO_PRESERVING_OPS = ACTIVATION_OPS | CASTS | {"type_as", "lift_fresh_copy"} | ZERO_KEEPING_MATH
# Elementwise ops of one tensor that a side pass replays as they are (their derivative at 0 is read
# off numerically): the zero-preserving ops less dropout, copies and the per-channel ``prelu``.
REPLAYED_ELEMENTWISE = (ACTIVATIONS - {"prelu"}) | ZERO_KEEPING_MATH

# Per-channel ops over the dims after the channel dim: pooling, upsampling, padding by reflection or
# replication (the side-pass recipes replay them too).
SPATIAL_OPS = frozenset(
    {
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "upsample_linear1d",
        "upsample_trilinear3d",
        "_upsample_nearest_exact2d",
        "_upsample_bilinear2d_aa",
        "reflection_pad1d",
        "reflection_pad2d",
        "reflection_pad3d",
        "replication_pad1d",
        "replication_pad2d",
        "replication_pad3d",
        "max_pool2d_with_indices",
    }
)
# Constant padding.
PADS = frozenset({"pad", "constant_pad_nd"})
# Per-channel ops over the other dims, reductions that keep the channel dim included: replayed on
# zeros, they pull gradients back as at full width.
OVER_OTHER_DIMS = SPATIAL_OPS | PADS | {"mean", "sum"}
# Ops that only move dims.
LAYOUT_OPS = frozenset({"permute", "transpose", "unsqueeze", "squeeze", "t"})
# The ops of Linear, Conv2d and ConvTranspose2d modules (the layers side passes know).
LINEAR_CONV2D_OPS = frozenset({"linear", "conv2d", "convolution", "conv_transpose2d"})
# Ops that read no tensor values (sizes, metadata checks): no channels flow through them.
NO_CHANNEL_OPS = frozenset({"_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "_assert_scalar", "size"})

# --------------------------------------------------------------------------------------------------
# Elementwise ops at 0
# --------------------------------------------------------------------------------------------------


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


def op_reference(op: Any) -> Any:
    """A picklable stand-in for an ATen op (``torch._ops.OpOverload`` objects do not pickle): its
    namespace, name and overload. Anything else is returned as it is."""
    if isinstance(op, torch._ops.OpOverload):
        namespace, name = op._schema.name.split("::")
        return ("aten-op", namespace, name, op._overloadname)
    return op


def op_from_reference(reference: Any) -> Any:
    """The op :func:`op_reference` stands for."""
    if isinstance(reference, tuple) and len(reference) == 4 and reference[0] == "aten-op":
        _, namespace, name, overload = reference
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    return reference


def constant(value: Any) -> bool:
    """Whether an op argument is a constant (no graph value in it)."""
    if isinstance(value, (list, tuple)):
        return all(constant(v) for v in value)
    return not isinstance(value, fx.Node) and (value is None or isinstance(value, (int, float, bool, str, torch.dtype)))


_DEAD_CACHE: dict[tuple[Any, str], bool] = {}


def dead_at_zero(node: fx.Node) -> bool:
    """Whether ``node`` is an activation that keeps 0 at 0 with derivative 0 there (ReLU, ReLU6,
    hardshrink): a closed gate right before it gets no task gradient, so gates go after it."""
    if node.op != "call_function" or op_name(node) not in ACTIVATIONS:
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


__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_OPS",
    "CASTS",
    "COPIES",
    "DROPOUTS",
    "GRADIENT_COPIES",
    "LAYOUT_OPS",
    "LINEAR_CONV2D_OPS",
    "NO_CHANNEL_OPS",
    "OVER_OTHER_DIMS",
    "PADS",
    "PASS_OPS",
    "REPLAYED_ELEMENTWISE",
    "SAME_VALUES",
    "SPATIAL_OPS",
    "STACK_OPS",
    "VIEWS",
    "ZERO_KEEPING_MATH",
    "ZERO_PRESERVING_OPS",
    "at_zero",
    "constant",
    "dead_at_zero",
    "functional",
    "op_name",
    "target_name",
]
