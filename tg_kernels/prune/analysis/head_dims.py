"""Head dims: gates on the dims within each attention head, where removing them is exact.

Whole heads come from the op rules (:func:`~tg_kernels.prune.analysis.rules.attention`). This pass
runs once on the stable walk, per ``scaled_dot_product_attention`` call, and adds one more group:
one gate per head dim ``d``, shared by every head of q, k and v and by the out-projection's input
columns ``h * D + d`` (the same set of dims in every head, as Torch-Pruning prunes them). Closing
``d`` zeroes entry ``d`` of every head at the q, k and v projections' outputs: the scores
``q . k`` then do not depend on ``k``'s dim ``d``, and the attention output's dim ``d`` (a mix of
``v``'s dims ``d``) is zero, so the projections' rows and the out-projection's columns of ``d``
can go. One gate for q/k and v dims alike, because the models name one ``head_dim`` for all three
views (``view(B, N, -1, self.head_dim)``), so their kept sizes must agree.

It applies only where that is exact and the pass can see all of it:

- the call passes an explicit ``scale`` (Hugging Face passes ``scaling``): the default scale
  ``1 / sqrt(D)`` would change with the kept dims (timm's fused path keeps them whole);
- each of q, k and v reaches the call from a Linear (or GPT-2's ``addmm`` Conv1D) output through
  views, transposes and ``repeat_kv``'s expand alone, each value used once: a rotary embedding
  (Llama's ``q * cos + rotate_half(q) * sin``) or anything else in between keeps them whole;
- the output reaches one Linear through transposes and the reshape that merges the heads;
- every projection has its gate at its output.

Anything else keeps the head dims whole, with the reason in ``Analysis.head_dims`` (and
``Analysis.fixed``). The head dims' group is a product with the heads' group on the same entries:
slices carry ``Slice.tile`` (the dims' pattern repeats in every head), gate points
``GatePoint.dims``, costs ``LayerCost.in_dims`` / ``out_dims`` and size attributes ``SizeAttr.dims``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor

from tg_kernels.prune.analysis.types import ChannelInfo, GatePoint, HeadDims, Slice

if TYPE_CHECKING:
    from tg_kernels.prune.analysis.walk import Walk

_COPIES = ("contiguous", "clone", "alias", "_to_copy", "to", "detach")
_VIEWS = ("view", "reshape", "_unsafe_view")


class _Whole(Exception):
    """The head dims of this attention stay whole (the message says why)."""


def _name(node: Any) -> str:
    from tg_kernels.prune.analysis.walk import target_name

    return target_name(node.target) if isinstance(node, fx.Node) and node.op == "call_function" else ""


@dataclasses.dataclass
class _Producer:
    node: fx.Node  # the op (linear / addmm)
    module: str
    weight: str
    bias: str | None
    rows_dim: int  # the weight's dim along the outputs
    offset: int  # the chain's first entry in the producer's output
    heads: int


@dataclasses.dataclass
class _Consumer:
    module: str
    weight: str
    cols_dim: int
    heads: int


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


def find_head_dims(w: Walk) -> None:
    """Add head-dim groups to the stable walk ``w`` (before :func:`~.walk.finish` builds the result)."""
    w.head_dims = []
    for node in w.t.graph.nodes:
        if _name(node) != "scaled_dot_product_attention" or node not in w.live:
            continue
        module = w.scope_module(node) or node.name
        shape = w.shape(node)
        size = shape[-1] if shape is not None else 0
        try:
            _apply(w, node, module)
        except _Whole as why:
            w.head_dims.append(HeadDims(module, node.name, None, size, str(why)))
            w.head_dims_fixed[f"{module} (head dims)"] = str(why)
    _tie_shared_attributes(w)


def _apply(w: Walk, node: fx.Node, module: str) -> None:
    q, k, v = node.args[:3]
    shapes = [w.shape(t) for t in (q, k, v, node)]
    if any(s is None or len(s) < 3 for s in shapes):
        raise _Whole("attention with unknown shapes")
    size = shapes[0][-1]
    if any(s[-1] != size for s in shapes):
        raise _Whole("q, k and v heads of different widths")
    scale = node.kwargs.get("scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise _Whole("scaled_dot_product_attention with its default scale 1/sqrt(head_dim) (it would change)")
    if size < 2:
        raise _Whole("heads of one dim")
    producers = [_producer_of(w, node, t, size) for t in (q, k, v)]
    consumer = _consumer_of(w, node, size)
    if len({(p.module, p.offset) for p in producers}) != 3:
        raise _Whole("q, k and v overlap in one projection")
    points = {gp.module: i for i, gp in enumerate(w.points) if not gp.on_input}
    for p in producers:
        if p.module not in points:
            raise _Whole(f"no gate at the output of '{p.module}'")
    def updates(dims):  # raises _Whole before anything changes if the gates or costs do not line up
        new_points, new_layers = {}, {}
        for p in producers:
            i = points[p.module]
            new_points[i] = _with_dims(new_points.get(i, w.points[i]), p.offset, p.heads * size, dims, size)
            _cost_dims(w, new_layers, p.module, "out", p.offset, p.heads * size, dims, size)
        _cost_dims(w, new_layers, consumer.module, "in", 0, consumer.heads * size, dims, size)
        for i, lc in enumerate(w.layers):  # the attention itself: per head and head dim
            if lc.module == f"{module}@{node.name}" and lc.kind == "attention":
                parts = tuple((s, n, rep * size) for s, n, rep in lc.in_parts)
                new_layers[i] = dataclasses.replace(
                    lc, flops_per_pair=lc.flops_per_pair / size, in_parts=parts, out_parts=parts,
                    in_dims=(dims,) * len(parts), out_dims=(dims,) * len(parts),
                )  # fmt: skip
        if not any(lc.kind == "attention" for lc in new_layers.values()):
            raise _Whole("the attention's cost is not counted per head")
        return new_points, new_layers

    updates(((None, size),))
    # every check passed: the head dims get a group
    key = f"headdims:{module}.head_dims"
    space = w.spaces.new(size, key if key not in w.spaces.by_key else f"{key}_{node.name}", module)
    dims = ((space, size),)
    new_points, new_layers = updates(dims)
    for i, gp in new_points.items():
        w.points[i] = gp
    for i, lc in new_layers.items():
        w.layers[i] = lc
    for p in producers:
        w.slices.append(Slice(p.weight, p.rows_dim, p.offset, 1, space, p.heads, size))
        if p.bias is not None:
            w.slices.append(Slice(p.bias, 0, p.offset, 1, space, p.heads, size))
    w.slices.append(Slice(consumer.weight, consumer.cols_dim, 0, 1, space, consumer.heads, size))
    heads = {w.spaces.find(sp) for p in producers for sp, _ in w.points[points[p.module]].parts}
    for i, sa in enumerate(w.size_attrs):  # heads * head_dim widths (GPT-2's split_size)
        if not sa.dims and sa.repeat % size == 0 and sa.parts and all(w.spaces.find(s) in heads for s, _ in sa.parts):
            w.size_attrs[i] = dataclasses.replace(sa, dims=dims)
    for split_node in w.head_dim_views.pop(node, []):  # self.head_dim in view(B, N, -1, self.head_dim)
        w.size_attr(split_node, len(w.shape(split_node)) - 1, ChannelInfo((space,), 0, (None,), 1))
    w.head_dims.append(HeadDims(module, node.name, space, size))


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _producer_of(w: Walk, attention: fx.Node, value: Any, size: int) -> _Producer:
    """Follow q, k or v back from the attention to the projection that makes it."""
    node = value
    split = None
    if not isinstance(node, fx.Node) or not _single_user(node):
        raise _Whole("q, k or v is used by more than the attention")
    while split is None:  # (.., H, .., D) with D last, back to the view that split H * D into (H, D)
        name, shape = _name(node), w.shape(node)
        source = node.args[0] if node.args else None
        in_shape = w.shape(source)
        if shape is None or in_shape is None or not isinstance(source, fx.Node) or not _single_user(source):
            raise _Whole(f"q, k or v comes from '{name or node.op}' at '{node.name}', used elsewhere too")
        if name in ("transpose", "permute"):
            ndim = len(shape)
            moved = [d % ndim for d in node.args[1:3]] if name == "transpose" else None
            order = [d % ndim for d in node.args[1]] if name == "permute" else None
            if (moved is not None and ndim - 1 in moved) or (order is not None and order[-1] != ndim - 1):
                raise _Whole(f"a transpose moves the head dim at '{node.name}'")
        elif name in _COPIES or name in ("unsqueeze", "expand"):
            if in_shape[-1] != size or (name == "unsqueeze" and node.args[1] % len(shape) == len(shape) - 1):
                raise _Whole(f"'{name}' over the head dim at '{node.name}'")
        elif name in _VIEWS and in_shape[-1] == size:  # repeat_kv's (b, h, n_rep, n, d) -> (b, h * n_rep, n, d)
            pass
        elif name in _VIEWS and shape[-1] == size and len(shape) >= 2 and in_shape[-1] == shape[-2] * size:
            split = node
        else:
            raise _Whole(f"q, k or v passes through '{name or node.op}' at '{node.name}' (a rotary embedding?)")
        node = source
    heads = w.shape(node)[-1] // size
    w.head_dim_views.setdefault(attention, []).append(split)
    offset = 0
    while True:  # back from the (.., H * D) value to the projection, through views and split pieces
        name = _name(node)
        source = node.args[0] if node.args else None
        if name == "linear":
            bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            weight, bias, rows_dim = w.tensor_name(node.args[1]), w.tensor_name(bias_node), 0
        elif name == "addmm":
            bias_node = node.args[0]
            weight, bias, rows_dim = w.tensor_name(node.args[2]), w.tensor_name(bias_node), 1
        elif name == "getitem" and _name(source) in ("split", "split_with_sizes") and isinstance(node.args[1], int):
            dim = (source.args[2] if len(source.args) > 2 else source.kwargs.get("dim", 0)) % len(w.shape(source.args[0]))
            if dim != len(w.shape(source.args[0])) - 1:
                raise _Whole(f"a split across other dims at '{source.name}'")
            sizes = [w.shape(g)[-1] for g in sorted(source.users, key=lambda g: g.args[1])]
            if len(sizes) != len(source.users) or not all(_name(g) == "getitem" for g in source.users):
                raise _Whole(f"a split used other than piece by piece at '{source.name}'")
            offset += sum(sizes[: node.args[1]])
            node = source.args[0]
            if not _single_user(node):
                raise _Whole(f"the projection output is used elsewhere too at '{node.name}'")
            continue
        elif name in _VIEWS and w.shape(source) is not None and w.shape(source)[-1] == w.shape(node)[-1]:
            if not _single_user(source):
                raise _Whole(f"the projection output is used elsewhere too at '{source.name}'")
            node = source
            continue
        else:
            raise _Whole(f"q, k or v is made by '{name or node.op}' at '{node.name}', not a projection")
        if weight is None or w.t.reads.get(weight, 0) != 1 or (bias_node is not None and bias is None):
            raise _Whole(f"the projection at '{node.name}' has a computed or shared weight")
        return _Producer(node, w.owner(weight), weight, bias, rows_dim, offset, heads)


def _consumer_of(w: Walk, attention: fx.Node, size: int) -> _Consumer:
    """Follow the attention output to the Linear that reads its merged heads."""
    node = attention
    heads = None
    while True:
        if not _single_user(node):
            raise _Whole(f"the attention output is used more than once at '{node.name}'")
        user = next(iter(node.users))
        name, shape, in_shape = _name(user), w.shape(user), w.shape(node)
        if shape is None or in_shape is None or not user.args or user.args[0] is not node and name != "addmm":
            raise _Whole(f"the attention output reaches '{name or user.op}' at '{user.name}'")
        if heads is None:
            if name in ("transpose", "permute"):
                ndim = len(shape)
                moved = [d % ndim for d in user.args[1:3]] if name == "transpose" else None
                order = [d % ndim for d in user.args[1]] if name == "permute" else None
                if (moved is not None and ndim - 1 in moved) or (order is not None and order[-1] != ndim - 1):
                    raise _Whole(f"a transpose moves the head dim at '{user.name}'")
            elif name in _COPIES or (name in _VIEWS and shape[-1] == size and in_shape[-1] == size):
                if name in _VIEWS and math.prod(shape[-2:]) != math.prod(in_shape[-2:]) and shape[-2] != in_shape[-2]:
                    raise _Whole(f"a reshape mixes the head dims at '{user.name}'")
            elif name in _VIEWS and in_shape[-1] == size and shape[-1] == in_shape[-2] * size:
                heads = in_shape[-2]
            else:
                raise _Whole(f"the attention output reaches '{name or user.op}' at '{user.name}'")
        elif name in _VIEWS and shape[-1] == in_shape[-1]:
            pass
        elif name == "linear" and user.args[0] is node:
            weight = w.tensor_name(user.args[1])
            if weight is None or w.t.reads.get(weight, 0) != 1:
                raise _Whole(f"the out-projection at '{user.name}' has a computed or shared weight")
            return _Consumer(w.owner(weight), weight, 1, heads)
        elif name == "addmm" and user.args[1] is node:
            weight = w.tensor_name(user.args[2])
            if weight is None or w.t.reads.get(weight, 0) != 1:
                raise _Whole(f"the out-projection at '{user.name}' has a computed or shared weight")
            return _Consumer(w.owner(weight), weight, 0, heads)
        else:
            raise _Whole(f"the merged heads reach '{name or user.op}' at '{user.name}', not a projection")
        node = user


def _dims_of_range(parts, repeat: int, start: int, width: int, dims, size: int, before):
    """Per part (channels of ``repeat`` entries each), ``dims`` where the part lies inside entries
    ``[start, start + width)``; ``before`` are the parts' dims so far."""
    out = list(before) if before else [()] * len(parts)
    at = 0
    for i, (_, n, *_rest) in enumerate(parts):
        a, b = at * repeat, (at + n) * repeat
        at += n
        if b <= start or a >= start + width:
            continue
        if a < start or b > start + width or repeat % size:
            raise _Whole("the heads' gates do not line up with the head dims")
        out[i] = dims
    return tuple(out)


def _with_dims(gp: GatePoint, start: int, width: int, dims, size: int) -> GatePoint:
    return dataclasses.replace(gp, dims=_dims_of_range(gp.parts, gp.repeat, start, width, dims, size, gp.dims))


def _cost_dims(w: Walk, updates: dict, module: str, side: str, start: int, width: int, dims, size: int) -> None:
    """The cost of Linear ``module`` with head dims on its outputs or inputs ``[start, start + width)``."""
    found_any = False
    for i, lc in enumerate(w.layers):
        lc = updates.get(i, lc)
        if lc.module != module or lc.kind != "linear":
            continue
        found_any = True
        parts = lc.out_parts if side == "out" else lc.in_parts
        at, found = 0, []
        for j, (_, n, rep) in enumerate(parts):
            a, b = at, at + n * rep
            at = b
            if b <= start or a >= start + width:
                continue
            if a < start or b > start + width or rep % size:
                raise _Whole(f"the cost of '{module}' does not line up with the head dims")
            found.append(j)
        old = (lc.out_dims if side == "out" else lc.in_dims) or ((),) * len(parts)
        new = tuple(dims if j in found else old[j] for j in range(len(parts)))
        updates[i] = dataclasses.replace(lc, **{f"{side}_dims": new})
    if not found_any:
        raise _Whole(f"no cost recorded for '{module}'")


def _tie_shared_attributes(w: Walk) -> None:
    """Head-dim spaces sized by one attribute (two calls reading ``self.head_dim``) share their gates."""
    by_attr: dict[tuple[str, str], int] = {}
    keys = {i for i, s in enumerate(w.spaces.spaces) if s.key.startswith("headdims:")}
    for sa in w.size_attrs:
        if len(sa.parts) == 1 and sa.parts[0][0] in keys and sa.repeat == 1:
            first = by_attr.setdefault((sa.module, sa.attr), sa.parts[0][0])
            w.spaces.union(first, sa.parts[0][0])


__all__ = ["entry_gates", "find_head_dims"]
