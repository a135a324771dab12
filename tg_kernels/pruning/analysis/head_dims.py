"""Head dims: gates on the dims within each attention head, where removing them is exact.

Whole heads come from the op rules (:func:`~tg_kernels.pruning.analysis.rules.attention`). This pass
runs once on the stable walk, per attention op (``scaled_dot_product_attention``, or unfused
``q @ k^T``, ops over the key positions, ``@ v``), and adds one more group: one gate per head dim
``d``, shared by every head of q, k and v and by the out-projection's input columns ``h * D + d``
(the same set of dims in every head, as Torch-Pruning prunes them). Closing ``d`` zeroes entry
``d`` of every head at the q, k and v projections' outputs: the scores ``q . k`` then do not
depend on ``k``'s dim ``d``, and the attention output's dim ``d`` (a mix of ``v``'s dims ``d``)
is zero, so the projections' rows and the out-projection's columns of ``d`` can go. One gate for
q/k and v dims alike, because the models name one ``head_dim`` for all three views
(``view(B, N, -1, self.head_dim)``), so their kept sizes must agree.

It applies only where that is exact and the pass can see all of it:

- sdpa gets an explicit ``scale`` (Hugging Face passes ``scaling``): the default scale
  ``1 / sqrt(D)`` would change with the kept dims (timm's fused path keeps them whole); unfused
  scores may be scaled by a number. A scale the forward computes from ``self.head_dim`` is a
  number in the graph too: the attach self-check sharpens the scores of every attention with
  head-dim gates (``HeadDims.scored``), so that such a scale shows and the group is dropped;
- each of q, k and v reaches the attention from a Linear (or GPT-2's ``addmm`` Conv1D) output
  through views, transposes, a scale, ``repeat_kv``'s expand, a fused projection's ``split`` or
  ``unbind`` / ``select`` pieces, and a rotary embedding (Llama's ``q * cos + rotate_half(q) *
  sin``: dims ``d`` and ``d + D / 2`` then share a gate, and the ``cos`` / ``sin`` tables are sliced
  through the frequency buffer they are computed from, which nothing else may read), each value
  used once;
- the output reaches one Linear through transposes and the reshape that merges the heads;
- every projection has its gate at its output.

Anything else keeps the head dims whole, with the reason in ``Analysis.head_dims`` (and
``Analysis.fixed``, as ``"<module> (head dims)"``). The head dims' group is a product with the
heads' group on the same entries: slices carry ``Slice.tile`` (the dims' pattern repeats in every
head), gate points ``GatePoint.dims``, costs ``LayerCost.in_dims`` / ``out_dims`` and size
attributes ``SizeAttr.dims``. Head-dim spaces that one attribute sizes, or that read one rotary
table (a model-wide ``rotary_emb``), are merged so that they keep alike.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx

from tg_kernels.pruning.analysis.aten import COPIES, VIEWS, target_name
from tg_kernels.pruning.analysis.types import ChannelInfo, GatePoint, HeadDims, Slice
from tg_kernels.pruning.analysis.walk import Walk


class _Whole(Exception):
    """The head dims of this attention stay whole (the message says why)."""


def _name(node: Any) -> str:
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


@dataclasses.dataclass
class _Match:
    """What one attention op needs for head-dim gates (checked, not applied yet)."""

    node: fx.Node
    module: str
    size: int  # D
    unit: int  # dims per gate pattern: D, or D / 2 across rotary pairs (d and d + D / 2 share a gate)
    producers: list[_Producer]
    consumer: _Consumer
    splits: list[fx.Node]  # the views that split H * D into (H, D): their D is self.head_dim
    tables: list[tuple[str, int]]  # rotary tables (buffer, dim of its D / 2 frequencies) to slice
    table_nodes: set[fx.Node]  # the nodes computing the rotary tables from those buffers
    rotary_muls: set[fx.Node]  # the q * cos, rotate_half(q) * sin products that read them
    nodes: tuple[fx.Node, ...] = ()  # the attention's ops: sdpa, or the two matmuls of unfused attention


def find_head_dims(w: Walk) -> list[HeadDims]:
    """Add head-dim groups to the stable walk ``w`` (before
    :func:`~tg_kernels.pruning.analysis.driver.finish` builds the result): their spaces, slices,
    gate points' and costs' dims and size attributes. Returns one :class:`HeadDims` per attention
    op, with the reason where its head dims stay whole."""
    found: list[HeadDims] = []
    rotary_tables: dict[str, int] = {}  # rotary frequency buffer -> the head-dim space slicing it
    matches: list[_Match] = []
    whole: dict[fx.Node, tuple[str, int, str]] = {}
    attention_costs = {lc.module for lc in w.layers if lc.kind == "attention"}
    taken: set[fx.Node] = set()  # the second matmul of unfused attention already matched
    for node in w.t.graph.nodes:
        name = _name(node)
        module = w.scope_module(node) or node.name
        unfused = name in ("matmul", "bmm") and f"{module}@{node.name}" in attention_costs and node not in taken
        if node not in w.live or not (name == "scaled_dot_product_attention" or unfused):
            continue
        if unfused and not _is_scores(w, node):
            continue  # p @ v
        shape = w.shape(node.args[0])
        try:
            m = _match(w, node, module) if not unfused else _match_unfused(w, node, module)
            matches.append(m)
            taken.update(m.nodes)
        except _Whole as why:
            whole[node] = (module, shape[-1] if shape is not None else 0, str(why))
    # a rotary table is sliced for everything that reads it: only rotary products we matched may
    tables_of: dict[str, list[_Match]] = {}
    for m in matches:
        for name, _ in m.tables:
            tables_of.setdefault(name, []).append(m)
    for name, ms in tables_of.items():
        inside = set().union(*(m.table_nodes for m in ms))
        allowed = inside | set().union(*(m.rotary_muls for m in ms))
        users = (u for n in inside for u in n.users if _name(u) != "_assert_tensor_metadata")
        leak = next((u for u in users if u not in allowed), None)
        if leak is not None:
            for m in ms:
                whole[m.node] = (m.module, m.size, f"the rotary table '{name}' is also read by '{leak.name}'")
    for m in matches:
        if m.node not in whole:
            try:
                found.append(_commit(w, m, rotary_tables))
            except _Whole as why:  # (checked before anything changes)
                whole[m.node] = (m.module, m.size, str(why))
    for node, (module, size, why) in whole.items():
        found.append(HeadDims(module, node.name, None, size, why))
    _tie_shared_spaces(w, rotary_tables)
    return found


def _match(w: Walk, node: fx.Node, module: str) -> _Match:
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
    m = _Match(node, module, size, size, [], None, [], [], set(), set(), (node,))  # type: ignore[arg-type]
    return _check(w, m, (q, k, v), node)


def _is_scores(w: Walk, node: fx.Node) -> bool:
    """``q @ k.transpose(-2, -1)``: the scores of unfused attention."""
    kt = node.args[1] if len(node.args) > 1 else None
    shape = w.shape(kt)
    if _name(kt) != "transpose" or shape is None or len(shape) < 3:
        return False
    return {d % len(shape) for d in kt.args[1:3]} == {len(shape) - 1, len(shape) - 2}


def _match_unfused(w: Walk, scores: fx.Node, module: str) -> _Match:
    """``softmax(q @ k^T * s + bias) @ v`` written out (timm's Swin, ``need_weights``): the scores reach the
    second product through ops over the key positions (scale, bias, mask, softmax, dropout), which never
    see the head dims; the scale is whatever the graph holds (a scale computed from ``self.head_dim`` in
    the forward is not exact once head dims go: the attach self-check sharpens the scores to see it)."""
    q, kt = scores.args[:2]
    k = kt.args[0]
    size = w.shape(q)[-1]
    node = scores
    for _ in range(32):  # forward to the product with v
        users = [u for u in node.users if u in w.live]
        if len(users) != 1:
            raise _Whole(f"the attention scores at '{node.name}' are used more than once")
        user = users[0]
        if _name(user) in ("matmul", "bmm") and user.args[0] is node:
            break
        if node not in user.all_input_nodes or user.op != "call_function":
            raise _Whole(f"the attention scores reach '{user.name}'")
        node = user
    else:
        raise _Whole(f"the attention scores at '{scores.name}' do not reach a product with v")
    v = user.args[1]
    if w.shape(v) is None or w.shape(v)[-1] != size or w.shape(k)[-1] != size or size < 2:
        raise _Whole("q, k and v heads of different widths")
    m = _Match(scores, module, size, size, [], None, [], [], set(), set(), (scores, user))  # type: ignore[arg-type]
    return _check(w, m, (q, k, v), user)


def _check(w: Walk, m: _Match, qkv: tuple, output: fx.Node) -> _Match:
    """Follow q, k, v to their projections and the output to its projection (raises _Whole)."""
    m.producers = [_producer_of(w, m, t) for t in qkv]
    m.consumer = _consumer_of(w, output, m.size)
    if len({(p.module, p.offset) for p in m.producers}) != 3:
        raise _Whole("q, k and v overlap in one projection")
    points = {gp.module: i for i, gp in enumerate(w.points) if not gp.on_input}
    for p in m.producers:
        if p.module not in points:
            raise _Whole(f"no gate at the output of '{p.module}'")
    _updates(w, m, ((None, m.unit),))  # raises _Whole if the gates or costs do not line up
    return m


def _updates(w: Walk, m: _Match, dims) -> tuple[dict[int, GatePoint], dict[int, Any]]:
    """The gate points and costs of ``m`` with head dims ``dims`` (nothing changes yet)."""
    points = {gp.module: i for i, gp in enumerate(w.points) if not gp.on_input}
    size, unit = m.size, m.unit
    new_points: dict[int, GatePoint] = {}
    new_layers: dict[int, Any] = {}
    for p in m.producers:
        i = points[p.module]
        new_points[i] = _with_dims(new_points.get(i, w.points[i]), p.offset, p.heads * size, dims, unit)
        _cost_dims(w, new_layers, p.module, "out", p.offset, p.heads * size, dims, unit)
    _cost_dims(w, new_layers, m.consumer.module, "in", 0, m.consumer.heads * size, dims, unit)
    names = {f"{m.module}@{n.name}" for n in m.nodes}
    for i, lc in enumerate(w.layers):  # the attention itself: per head and head dim
        if lc.module in names and lc.kind == "attention":
            parts = tuple((s, n, rep * size) for s, n, rep in lc.in_parts)
            new_layers[i] = dataclasses.replace(
                lc, flops_per_pair=lc.flops_per_pair / size, in_parts=parts, out_parts=parts,
                in_dims=(dims,) * len(parts), out_dims=(dims,) * len(parts),
            )  # fmt: skip
    if {lc.module for lc in new_layers.values() if lc.kind == "attention"} != names:
        raise _Whole("the attention's cost is not counted per head")
    return new_points, new_layers


def _commit(w: Walk, m: _Match, rotary_tables: dict[str, int]) -> HeadDims:
    """Give ``m``'s head dims a group: slices, gate points, costs and size attributes."""
    size, unit = m.size, m.unit
    key = f"headdims:{m.module}.head_dims"
    space = w.new_space(unit, key if key not in w.spaces.by_key else f"{key}_{m.node.name}", m.module)
    dims = ((space, unit),)
    new_points, new_layers = _updates(w, m, dims)
    for i, gp in new_points.items():
        w.set_point(i, gp)
    for i, lc in new_layers.items():
        w.set_layer(i, lc)
    tile = size // unit
    for p in m.producers:
        w.add_slice(Slice(p.weight, p.rows_dim, p.offset, 1, space, p.heads * tile, unit))
        if p.bias is not None:
            w.add_slice(Slice(p.bias, 0, p.offset, 1, space, p.heads * tile, unit))
    w.add_slice(Slice(m.consumer.weight, m.consumer.cols_dim, 0, 1, space, m.consumer.heads * tile, unit))
    for name, dim in dict.fromkeys(m.tables):  # rotary frequencies: one per pair
        w.add_slice(Slice(name, dim, 0, 1, space))
        rotary_tables.setdefault(name, space)
    heads = {w.spaces.find(sp) for p in m.producers for sp, _ in new_points[_point_index(w, p.module)].parts}
    for i, sa in enumerate(w.size_attrs):  # heads * head_dim widths (GPT-2's split_size)
        in_heads = sa.parts and all(w.spaces.find(s) in heads for s, _ in sa.parts)
        if sa.index is None and not sa.dims and sa.repeat % size == 0 and in_heads:
            w.set_size_attr(i, dataclasses.replace(sa, repeat=sa.repeat, dims=dims))
    for split in m.splits:  # self.head_dim in view(B, N, -1, self.head_dim)
        w.size_attr(split, len(w.shape(split)) - 1, ChannelInfo((space,), 0, (None,), tile))
    scored = tuple(dict.fromkeys(p.module for p in m.producers[:2]))
    return HeadDims(m.module, m.node.name, space, unit, None, scored)


def _point_index(w: Walk, module: str) -> int:
    return next(i for i, gp in enumerate(w.points) if gp.module == module and not gp.on_input)


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _by_number(node: fx.Node) -> bool:
    """``x * c`` or ``x / c`` with a (non-zero) Python number ``c``."""
    c = node.args[1] if len(node.args) > 1 else None
    if _name(node) not in ("mul", "div") or not isinstance(c, (int, float)) or isinstance(c, bool):
        return False
    return _name(node) == "mul" or c != 0


def _picked(w: Walk, node: fx.Node) -> tuple[fx.Node, tuple[int, int]] | None:
    """``(x, (dim, i))`` where ``node`` is piece ``i`` of ``x`` along ``dim`` (``x.unbind(dim)[i]``, ``x[i]``),
    ``x`` used for its pieces alone."""
    name = _name(node)
    if name == "getitem" and _name(node.args[0]) == "unbind" and isinstance(node.args[1], int):
        source, index = node.args[0], node.args[1]
        x = source.args[0]
        dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
        if not all(_name(g) == "getitem" for g in source.users) or not _single_user(x):
            raise _Whole(f"a fused projection's pieces are used otherwise at '{source.name}'")
    elif name == "select" and isinstance(node.args[2], int):
        x, dim, index = node.args[0], node.args[1], node.args[2]
        if not all(_name(u) == "select" for u in x.users):
            raise _Whole(f"a fused projection's pieces are used otherwise at '{x.name}'")
    else:
        return None
    shape = w.shape(x)
    if shape is None:
        raise _Whole(f"a fused projection of unknown shape at '{node.name}'")
    return x, (dim % len(shape), index % shape[dim % len(shape)])


def _producer_of(w: Walk, m: _Match, value: Any) -> _Producer:
    """Follow q, k or v back from the attention to the projection that makes it."""
    node = value
    size = m.size
    split = None
    if not isinstance(node, fx.Node) or not _single_user(node):
        raise _Whole("q, k or v is used by more than the attention")
    piece = None  # (dim, index): a piece of a fused (.., 3, H, D) projection, picked by unbind / select
    heads = 0
    while split is None:  # (.., H, .., D) with D last, back to the view that split H * D into (H, D)
        name, shape = _name(node), w.shape(node)
        if name == "add" and piece is None:  # a rotary embedding: x * cos + rotate_half(x) * sin
            node = _rotary(w, m, node)
            continue
        picked = _picked(w, node) if piece is None else None
        if picked is not None:  # qkv.unbind(0)[i], qkv[i]
            node, piece = picked
            continue
        if name in ("cat", "concat"):  # a KV cache's first update: cat([empty, k]) is k
            pieces = [t for t in node.args[0] if w.shape(t) != torch.Size([0])]
            if len(pieces) == 1 and isinstance(pieces[0], fx.Node) and _single_user(pieces[0]):
                node = pieces[0]
                continue
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
            if piece is not None and order is not None:
                piece = (order[piece[0]], piece[1])
            elif piece is not None:
                a, b = moved
                piece = (b if piece[0] == a else a if piece[0] == b else piece[0], piece[1])
        elif piece is not None and not (name in COPIES or (name in VIEWS and len(shape) >= 3 and shape[-1] == size)):
            raise _Whole(f"a piece of a fused projection passes through '{name}' at '{node.name}'")
        elif _by_number(node):  # q * scale
            pass
        elif name in COPIES or name in ("unsqueeze", "expand"):
            if in_shape[-1] != size or (name == "unsqueeze" and node.args[1] % len(shape) == len(shape) - 1):
                raise _Whole(f"'{name}' over the head dim at '{node.name}'")
        elif piece is not None:  # (.., 3 * H * D) -> (.., 3, H, D): the piece's H * D entries
            if piece[0] != len(shape) - 3 or in_shape[-1] != math.prod(shape[-3:]):
                raise _Whole(f"a fused projection split other than (.., pieces, heads, head_dim) at '{node.name}'")
            split, heads = node, shape[-2]
        elif name in VIEWS and in_shape[-1] == size:  # repeat_kv's (b, h, n_rep, n, d) -> (b, h * n_rep, n, d)
            pass
        elif name in VIEWS and shape[-1] == size and len(shape) >= 2 and in_shape[-1] == shape[-2] * size:
            split, heads = node, shape[-2]
        else:
            raise _Whole(f"q, k or v passes through '{name or node.op}' at '{node.name}' (a rotary embedding?)")
        node = source
    m.splits.append(split)
    offset = piece[1] * heads * size if piece is not None else 0
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
            ndim = len(w.shape(source.args[0]))
            dim = (source.args[2] if len(source.args) > 2 else source.kwargs.get("dim", 0)) % ndim
            if dim != ndim - 1:
                raise _Whole(f"a split across other dims at '{source.name}'")
            sizes = [w.shape(g)[-1] for g in sorted(source.users, key=lambda g: g.args[1])]
            if len(sizes) != len(source.users) or not all(_name(g) == "getitem" for g in source.users):
                raise _Whole(f"a split used other than piece by piece at '{source.name}'")
            offset += sum(sizes[: node.args[1]])
            node = source.args[0]
            if not _single_user(node):
                raise _Whole(f"the projection output is used elsewhere too at '{node.name}'")
            continue
        elif name in VIEWS and w.shape(source) is not None and w.shape(source)[-1] == w.shape(node)[-1]:
            if not _single_user(source):
                raise _Whole(f"the projection output is used elsewhere too at '{source.name}'")
            node = source
            continue
        else:
            raise _Whole(f"q, k or v is made by '{name or node.op}' at '{node.name}', not a projection")
        if weight is None or w.reads(weight) != 1 or (bias_node is not None and bias is None):
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
            elif name in COPIES or (name in VIEWS and shape[-1] == size and in_shape[-1] == size):
                if name in VIEWS and math.prod(shape[-2:]) != math.prod(in_shape[-2:]) and shape[-2] != in_shape[-2]:
                    raise _Whole(f"a reshape mixes the head dims at '{user.name}'")
            elif name in VIEWS and in_shape[-1] == size and shape[-1] == in_shape[-2] * size:
                heads = in_shape[-2]
            else:
                raise _Whole(f"the attention output reaches '{name or user.op}' at '{user.name}'")
        elif name in VIEWS and shape[-1] == in_shape[-1]:
            pass
        elif name == "linear" and user.args[0] is node:
            weight = w.tensor_name(user.args[1])
            if weight is None or w.reads(weight) != 1:
                raise _Whole(f"the out-projection at '{user.name}' has a computed or shared weight")
            return _Consumer(w.owner(weight), weight, 1, heads)
        elif name == "addmm" and user.args[1] is node:
            weight = w.tensor_name(user.args[2])
            if weight is None or w.reads(weight) != 1:
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


def _tie_shared_spaces(w: Walk, rotary_tables: dict[str, int]) -> None:
    """Head-dim spaces sized by one attribute (two calls reading ``self.head_dim``) or reading one
    rotary table (a model-wide ``rotary_emb``) share their gates, so that they keep alike."""
    by_attr: dict[tuple[str, str, int], int] = {}
    keys = {i for i, s in enumerate(w.spaces.spaces) if s.key.startswith("headdims:")}
    for sa in w.size_attrs:
        if sa.index is None and len(sa.parts) == 1 and sa.parts[0][0] in keys and not sa.dims:
            first = by_attr.setdefault((sa.module, sa.attr, sa.repeat), sa.parts[0][0])
            if w.spaces.size(first) != w.spaces.size(sa.parts[0][0]):
                w.fix([first, sa.parts[0][0]], f"'{sa.module}.{sa.attr}' sizes head dims of different widths")
            w.tie([first], [sa.parts[0][0]])
    for sl in w.slices:
        if sl.space in keys and sl.target in rotary_tables:
            w.tie([rotary_tables[sl.target]], [sl.space])


__all__ = ["find_head_dims"]


def _rotary(w: Walk, m: _Match, add: fx.Node) -> fx.Node:
    """``x * cos + rotate_half(x) * sin`` (Llama's rotary embedding, ``rotate_half(x) = cat(-x2, x1)``
    of the halves ``x1, x2`` of the head dim): returns ``x``. Dims ``d`` and ``d + D / 2`` rotate
    together, so they share a gate (``m.unit = D / 2``), and the tables ``cos``, ``sin`` are sliced
    at the kept pairs through the buffer of frequencies they are computed from."""
    size, half = m.size, m.size // 2
    if size % 2:
        raise _Whole(f"a rotary embedding over an odd head dim at '{add.name}'")
    a, b = add.args[:2]
    for plain, rotated in ((a, b), (b, a)):
        if _name(plain) != "mul" or _name(rotated) != "mul":
            continue
        cat_node = next((t for t in rotated.args[:2] if _name(t) == "cat"), None)
        if cat_node is None:
            continue
        sin = rotated.args[1] if rotated.args[0] is cat_node else rotated.args[0]
        pieces, dim = cat_node.args[0], cat_node.args[1] if len(cat_node.args) > 1 else 0
        if len(pieces) != 2 or dim % len(w.shape(cat_node)) != len(w.shape(cat_node)) - 1:
            continue
        neg, first = pieces
        if _name(neg) != "neg" or _name(neg.args[0]) != "slice" or _name(first) != "slice":
            continue
        second = neg.args[0]
        x = first.args[0]
        if second.args[0] is not x or not _slices_half(w, first, 0, half) or not _slices_half(w, second, half, size):
            continue
        if x not in plain.args[:2]:
            continue
        cos = plain.args[1] if plain.args[0] is x else plain.args[0]
        if set(x.users) != {plain, first, second} or any(
            not _single_user(n) for n in (plain, rotated, cat_node, neg, first, second)
        ):
            raise _Whole(f"the rotary embedding at '{add.name}' is used elsewhere too")
        for table in (cos, sin):
            m.tables.append(_table_source(w, m, table))
        m.rotary_muls.update((plain, rotated))
        m.unit = half
        return x
    raise _Whole(f"q, k or v passes through 'add' at '{add.name}' (not a rotary embedding this pass knows)")


def _slices_half(w: Walk, node: fx.Node, start: int, end: int) -> bool:
    shape = w.shape(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    lo = node.args[2] if len(node.args) > 2 else 0
    hi = node.args[3] if len(node.args) > 3 else shape[dim]
    step = node.args[4] if len(node.args) > 4 else 1
    lo, hi, step = slice(lo, hi, step).indices(shape[dim])
    return dim == len(shape) - 1 and (lo, hi, step) == (start, end, 1)


def _table_source(w: Walk, m: _Match, table: Any) -> tuple[str, int]:
    """Follow a rotary table (``cos`` or ``sin``, D wide, broadcast over the heads) back to the buffer
    of its ``D / 2`` frequencies: ``cat([f, f], -1)`` of ``f`` made from that buffer's entries by
    elementwise ops, broadcasts and products over other dims. Returns (buffer, its dim)."""
    node, dim = table, None
    halved = False
    shape = w.shape(table)
    if shape is None or shape[-1] != m.size or len(shape) < 3 or shape[-3] != 1:
        raise _Whole("a rotary table that is not broadcast over the heads")
    dim = len(shape) - 1
    for _ in range(64):
        if not isinstance(node, fx.Node):
            break
        m.table_nodes.add(node)
        name, shape = _name(node), w.shape(node)
        if node.op == "placeholder":
            tensor = w.tensor_name(node)
            if tensor is None or not halved or w.is_input(node):
                break
            return tensor, dim
        if shape is None:
            break
        if name in COPIES | {"lift_fresh_copy", "cos", "sin"}:
            node = node.args[0]
        elif name == "cat" and not halved:
            pieces = node.args[0]
            if len(pieces) != 2 or pieces[0] is not pieces[1] or dim != len(shape) - 1:
                break
            if (node.args[1] if len(node.args) > 1 else 0) % len(shape) != dim:
                break
            halved, node = True, pieces[0]
        elif name == "unsqueeze":
            at = node.args[1] % len(shape)
            if at == dim:
                break
            dim, node = dim - (at < dim), node.args[0]
        elif name == "transpose":
            a, b = (d % len(shape) for d in node.args[1:3])
            dim = b if dim == a else a if dim == b else dim
            node = node.args[0]
        elif name == "expand":
            lead = len(shape) - len(w.shape(node.args[0]))
            if dim < lead or w.shape(node.args[0])[dim - lead] != shape[dim]:
                break
            dim, node = dim - lead, node.args[0]
        elif name in ("mul", "div", "add", "sub"):
            operands = [t for t in node.args[:2] if isinstance(t, fx.Node)]
            along = [t for t in operands if _size_at(w, t, shape, dim) not in (None, 1)]
            others = [t for t in node.args[:2] if not isinstance(t, fx.Node)]
            if len(along) != 1 or any(not isinstance(o, (int, float)) for o in others):
                break
            if name in ("add", "sub") and len(operands) == 2:
                break  # (an offset along other dims would not be one per frequency)
            node, dim = along[0], dim - (len(shape) - len(w.shape(along[0])))
        elif name in ("matmul", "bmm"):
            a, b = node.args[:2]
            if dim == len(shape) - 2:
                node, dim = a, len(w.shape(a)) - 2
            elif dim == len(shape) - 1:
                node, dim = b, len(w.shape(b)) - 1
            else:
                break
        else:
            break
    raise _Whole("a rotary table this pass cannot follow to its frequencies")


def _size_at(w: Walk, t: fx.Node, out_shape, dim: int) -> int | None:
    shape = w.shape(t)
    if shape is None:
        return None
    at = dim - (len(out_shape) - len(shape))
    return shape[at] if at >= 0 else 1
