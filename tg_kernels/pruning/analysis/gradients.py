"""Side-pass recipes: how ``exact`` mode's closed-gate gradients are computed beside a compact run.

In ``none`` mode a closed channel ``c`` is exactly zero after its gate, so its weight rows, norm
parameters and consumer columns get zero gradient and it adds nothing to any other gradient. The
only gradient compact execution misses is the closed gate's own,

    dL/dgate_c = sum(u_c * dout_c)     (over every gate point of the group)

with ``u`` the value the gate multiplies and ``dout`` the gradient at the gate's output. Both depend
on closed channels only, and both can be rebuilt from what a compact run has:

- ``u_c`` from the *source*: the producer's closed rows applied to its (compact) input, or zeros where
  the channel is already zero (after an earlier gate of the group), then the ops between the source
  and the gate point (batch norm, depthwise conv, activations), replayed on the closed channels;
- ``dout_c`` from every *path* to a consumer (a Conv2d or Linear reading the channels): the
  consumer's input gradient restricted to the closed columns, pulled back through the ops on the
  path (activations at 0, pooling, padding, upsampling, adds, concatenation, permutes).

A path is *dead* when its gradient is exactly zero whatever the data: it meets an activation whose
derivative at 0 is 0 (ReLU) while the channel is still exactly zero, or another gate of the same
group (which multiplies the gradient by 0). A gate point whose paths are all dead needs no side
pass. Where a recipe cannot be built (an op this module does not know on a live path), the recipe
says why (``reason``) and compact execution keeps the per-layer path for ``exact`` training.

This module reads the last walk of the analysis (its per-node channel information); it adds
:class:`SidePass` entries to the :class:`~tg_kernels.pruning.analysis.types.Analysis`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tg_kernels.pruning.analysis.aten import (
    DROPOUTS,
    GRADIENT_COPIES,
    LAYOUT_OPS,
    LINEAR_CONV2D_OPS,
    NO_CHANNEL_OPS,
    OVER_OTHER_DIMS,
    REPLAYED_ELEMENTWISE,
    SPATIAL_OPS,
    at_zero,
    constant,
    functional,
    op_name,
    target_name,
)
from tg_kernels.pruning.analysis.types import ChannelInfo, GatePoint, SidePass, SidePath, SideStep, SideTerm
from tg_kernels.pruning.analysis.walk import Walk


def _conv_groups(conv: fx.Node) -> int:
    """The ``groups`` argument of a ``conv2d`` / ``convolution`` / ``conv_transpose2d`` node."""
    if op_name(conv) == "convolution":
        return conv.args[8]
    return conv.args[6] if len(conv.args) > 6 else 1


class _NoRecipe(Exception):
    """A side pass cannot be built for this gate point (the message says why)."""


class _Builder:
    """Builds the side passes of one analysis from its last walk."""

    def __init__(self, model: nn.Module, w: Walk, root_of: dict[int, int], points: list[GatePoint]) -> None:
        self.model = model
        self.w = w
        self.root_of = root_of
        self.node_of: dict[str, fx.Node] = {}
        for node, names in w.t.output_of.items():
            for name in names:
                self.node_of.setdefault(name, node)
        self.gated_at: dict[fx.Node, set[int]] = {}  # module output -> groups gated there
        self.input_gated: dict[fx.Node, set[int]] = {}  # a Linear / conv call -> groups gated on its input
        for gp in points:
            node = self.node_of.get(gp.module)
            if node is not None:
                at = self.input_gated if gp.on_input else self.gated_at
                at.setdefault(node, set()).update(r for r, _ in gp.parts if r is not None)

    # ---- channel positions ----
    def root(self, member: int) -> int | None:
        return self.root_of.get(self.w.spaces.find(member))

    def position(self, node: Any, root: int) -> tuple[int, int, bool] | None:
        """(offset, dim, exactly zero) of ``root``'s channels in ``node``'s value; None if it has none."""
        info = self.w.value(node)
        if not isinstance(info, ChannelInfo):
            return None
        found = []
        at = 0
        for part, source in zip(info.parts, info.nonzero):
            if self.root(part) == root:
                found.append((at, source is None))
            at += self.w.spaces.size(part)
        if not found:
            return None
        if len(found) > 1 or info.repeat != 1:
            raise _NoRecipe(f"the channels appear more than once, or flattened, at '{node.name}'")
        return found[0][0], info.dim, found[0][1]

    def along_channels(self, cat: fx.Node, channel_dim: int) -> bool:
        """Whether a ``cat`` node concatenates along ``channel_dim`` (not along H, W or tokens)."""
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        ndim = len(self.w.shape(cat) or ())
        return ndim > 0 and isinstance(dim, int) and dim % ndim == channel_dim

    def module(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def weight_owner(self, node: fx.Node, kinds: tuple[type, ...]) -> str | None:
        """The module owning ``node``'s weight argument, if it is of ``kinds`` and called once."""
        weight = self.w.tensor_name(node.args[1]) if len(node.args) > 1 else None
        if weight is None or self.w.reads(weight) != 1:
            return None
        name = self.w.owner(weight)
        module = self.module(name)
        return name if isinstance(module, kinds) and self.w.t.calls.get(name, 0) == 1 else None

    # ---- one gate point ----
    def build(self, gp: GatePoint, index: int, root: int) -> SidePass:
        node = self.node_of.get(gp.module)
        base = dict(point=gp.module, part=index, space=root, dim=gp.dim)
        if node is None:
            return SidePass(**base, reason=f"gate point '{gp.module}' is not a node of the graph")
        if gp.repeat != 1:
            return SidePass(**base, reason=f"gate point '{gp.module}' gates whole heads")
        if gp.on_input:
            return self.build_input(gp, node, base, root)
        try:
            paths = self.paths(node, root)
            if not paths:
                return SidePass(**base, dead=True)
            producer, row_offset, source_module, steps, terms = self.source(node, root)
            if producer is None and source_module is None:  # u is exactly zero
                return SidePass(**base, dead=True)
        except _NoRecipe as why:
            return SidePass(**base, reason=str(why))
        return SidePass(
            **base,
            producer=producer,
            row_offset=row_offset,
            source_module=source_module,
            source_steps=tuple(steps),
            paths=tuple(paths),
            terms=tuple(terms),
        )

    def build_input(self, gp: GatePoint, node: fx.Node, base: dict, root: int) -> SidePass:
        """A gate on a Linear's or conv's input: ``u`` is what the layer reads, the one path is the layer."""
        x = node.args[0] if node.args else None
        if op_name(node) not in LINEAR_CONV2D_OPS or not isinstance(x, fx.Node):
            return SidePass(**base, reason=f"the gate is on the input of '{gp.module}', not of a Linear or conv")
        try:
            path = self.consumer(node, x, root, (), True, True)
            if path is None:
                raise _NoRecipe(f"the gate is on the input of depthwise conv '{gp.module}'")
            producer, row_offset, source_module, steps, terms = self.source(x, root)
        except _NoRecipe as why:
            return SidePass(**base, reason=str(why))
        if producer is None and source_module is None:
            return SidePass(**base, dead=True)
        return SidePass(
            **base,
            producer=producer,
            row_offset=row_offset,
            source_module=source_module,
            source_steps=tuple(steps),
            paths=(path,),
            terms=tuple(terms),
        )

    def paths(self, start: fx.Node, root: int) -> list[SidePath]:
        """Every live path from the gate point's output to a consumer (dead paths are dropped)."""
        found: list[SidePath] = []
        stack: list[tuple[fx.Node, tuple[SideStep, ...], bool, bool]] = [(start, (), True, True)]
        seen = 0
        while stack:
            node, steps, zero, replayable = stack.pop()
            seen += 1
            if seen > 10_000:
                raise _NoRecipe("too many paths to follow")
            for user in node.users:
                for item in self.follow(node, user, root, steps, zero, replayable):
                    if isinstance(item, SidePath):
                        found.append(item)
                    else:
                        stack.append(item)
        return found

    def follow(self, node: fx.Node, user: fx.Node, root: int, steps: tuple, zero: bool, replayable: bool) -> list:
        """What one user does to the channels: continue (a new stack entry), end at a consumer, or die."""
        if user.op == "output":
            raise _NoRecipe("the channels reach the model's output")
        name = op_name(user)
        if user in self.gated_at and root in self.gated_at[user]:
            return []  # a gate of the same group multiplies the gradient by 0
        if name in NO_CHANNEL_OPS:
            return []
        if name in LINEAR_CONV2D_OPS and user.args[0] is node:
            if root in self.input_gated.get(user, ()):
                return []  # the layer's input gate multiplies the gradient by 0
            consumer = self.consumer(user, node, root, steps, zero, replayable)
            if consumer is not None:
                return [consumer]
        if name == "flatten":
            info = self.w.value(user)
            if isinstance(info, ChannelInfo) and info.repeat > 1:
                return self.flattened(node, user, root, steps, zero and replayable)
        out = self.position(user, root)
        if out is None:
            raise _NoRecipe(f"'{name}' at '{user.name}' reads the channels in a way side passes do not follow")
        if name == "detach":
            return []
        if name in GRADIENT_COPIES:  # copies and dtype casts: the gradient passes as it is
            return [(user, steps, zero, replayable)]
        if name in REPLAYED_ELEMENTWISE or name in DROPOUTS:
            if name in DROPOUTS:
                p = user.args[1] if len(user.args) > 1 else 0.5
                if not p:
                    return [(user, steps, zero, replayable)]
                # replayed in the mode of the module running it (the trace's flag is the mode at attach);
                # the side pass draws its own mask, as compact runs draw theirs at the compact width
                owner = self.w.scope_module(user)
                if owner is None:
                    raise _NoRecipe(f"dropout at '{user.name}' outside a module")
                step = SideStep("dropout", functional(user.target), (p,), module=owner)
                return [(user, (*steps, step), zero, replayable)]
            if not zero:
                return [(user, steps, zero, False)]
            args, kwargs = self.constants(user)
            f0, d0 = at_zero(functional(user.target), args, kwargs)
            if d0 == 0.0:
                return []  # ReLU-like at an exact zero: no gradient passes
            step = SideStep("op", functional(user.target), args, tuple(kwargs.items()))
            return [(user, (*steps, step), f0 == 0.0, replayable)]
        if name in ("add", "sub", "rsub"):
            return [self.binary(node, user, root, steps, zero, replayable)]
        if name in ("mul", "div"):
            other = user.args[1] if user.args[0] is node else user.args[0]
            if name == "mul" and isinstance(other, fx.Node) and other is not node:
                there, here = self.position(other, root), self.position(node, root)
                if there is not None and there[2] and here is not None and there[:2] == here[:2]:
                    return []  # times a factor that is exactly 0 at these channels (SwiGLU's gate * up)
            if not isinstance(other, (int, float)) or (name == "div" and user.args[0] is not node):
                raise _NoRecipe(f"'{name}' by a tensor at '{user.name}'")
            return [(user, (*steps, SideStep("op", functional(user.target), (other,), ())), zero, replayable)]
        if name in ("cat", "concat"):
            if not self.along_channels(user, out[1]):  # pieces stacked along H, W or tokens
                raise _NoRecipe(f"cat along a dim other than the channels at '{user.name}'")
            return [(user, steps, zero, replayable)]
        if name in OVER_OTHER_DIMS or name in LAYOUT_OPS or name == "flatten":
            args, kwargs = self.constants(user)
            value = 0  # what padding adds: pad(x, pad, mode="constant", value=None); constant_pad_nd(x, pad, value)
            if name == "constant_pad_nd" and len(args) > 1:
                value = args[1]
            elif name == "pad":
                mode = args[1] if len(args) > 1 else kwargs.get("mode", "constant")
                value = (args[2] if len(args) > 2 else kwargs.get("value")) if mode == "constant" else 0
                value = value or 0
            step = SideStep("op", functional(user.target), args, tuple(kwargs.items()))
            return [(user, (*steps, step), zero and not value, replayable and zero)]
        if name == "getitem":
            return [(user, (*steps, SideStep("item", args=(user.args[1],))), zero, replayable)]
        if name in ("batch_norm", "instance_norm", "conv2d", "convolution"):
            return [(user, steps, False, False)]  # per-channel, not replayed: only a later gate may end it
        raise _NoRecipe(f"'{name}' at '{user.name}'")

    def flattened(self, node: fx.Node, user: fx.Node, root: int, steps: tuple, replayable: bool) -> list[SidePath]:
        """``flatten`` of C x H x W channels read by Linear layers (a CNN classifier): each channel is
        ``repeat`` consecutive input columns of the Linear."""
        info = self.w.value(user)
        at, found = 0, None
        for part in info.parts:
            if self.root(part) == root:
                if found is not None:
                    raise _NoRecipe(f"the channels appear more than once at '{user.name}'")
                found = at
            at += self.w.spaces.size(part)
        if found is None or not replayable or info.dim != len(self.w.shape(user) or ()) - 1:
            raise _NoRecipe(f"flatten at '{user.name}' (not replayable, or not into the last dim)")
        args, kwargs = self.constants(user)
        steps = (*steps, SideStep("op", functional(user.target), args, tuple(kwargs.items())))
        paths = []
        for reader in user.users:
            owner = self.weight_owner(reader, (nn.Linear,)) if op_name(reader) == "linear" else None
            if owner is None or reader.args[0] is not user:
                raise _NoRecipe(f"'{op_name(reader)}' at '{reader.name}' reads flattened channels")
            if root in self.input_gated.get(reader, ()):
                continue
            paths.append(SidePath(owner, "linear", found, steps, False, info.repeat))
        return paths

    def constants(self, node: fx.Node) -> tuple[tuple, dict]:
        """The op's arguments after the tensor, which must all be constants."""
        args, kwargs = tuple(node.args[1:]), dict(node.kwargs)
        if not constant(list(args)) or not constant(list(kwargs.values())):
            raise _NoRecipe(f"'{op_name(node)}' at '{node.name}' takes computed arguments")
        return args, kwargs

    def binary(self, node: fx.Node, user: fx.Node, root: int, steps: tuple, zero: bool, replayable: bool):
        a, b = user.args[0], user.args[1] if len(user.args) > 1 else user.kwargs.get("other")
        if a is b:
            raise _NoRecipe(f"'{op_name(user)}' of a value with itself at '{user.name}'")
        other = b if a is node else a
        negate = (op_name(user) == "sub" and b is node) or (op_name(user) == "rsub" and a is node)
        if len(user.args) > 2 or user.kwargs.get("alpha", 1) != 1:
            raise _NoRecipe(f"'{op_name(user)}' with alpha at '{user.name}'")
        if isinstance(other, fx.Node):
            there = self.position(other, root)
            zero = zero and there is not None and there[2]
        elif other != 0:
            zero = False
        if negate:
            steps = (*steps, SideStep("op", torch.ops.aten.neg.default))
        return (user, steps, zero, replayable)

    def _depthwise(self, conv: fx.Node, node: fx.Node) -> bool:
        """Whether ``conv`` (a convolution node reading ``node``) is depthwise: one group per channel."""
        transposed = op_name(conv) == "conv_transpose2d" or (op_name(conv) == "convolution" and bool(conv.args[6]))
        groups = _conv_groups(conv)
        return not transposed and groups != 1 and groups == (self.w.shape(node) or (0, 0))[1]

    def consumer(self, user: fx.Node, node: fx.Node, root: int, steps, zero: bool, replayable: bool):
        """A Conv2d or Linear reading the channels (None for a depthwise conv, which passes them on)."""
        name = op_name(user)
        at = self.position(node, root)
        assert at is not None
        if name == "linear":
            owner = self.weight_owner(user, (nn.Linear,))
            if owner is None or at[1] != len(self.w.shape(node) or ()) - 1:
                raise _NoRecipe(f"Linear at '{user.name}' (reused, or not over the channel dim)")
            kind = "linear"
        else:
            transposed = name == "conv_transpose2d" or (name == "convolution" and bool(user.args[6]))
            groups = _conv_groups(user)
            if self._depthwise(user, node):
                return None  # depthwise: the group passes through
            owner = self.weight_owner(user, (nn.ConvTranspose2d,) if transposed else (nn.Conv2d,))
            if owner is None or groups != 1 or at[1] != 1:
                raise _NoRecipe(f"convolution at '{user.name}' (grouped, reused or not over dim 1)")
            if self.module(owner).padding_mode != "zeros":
                raise _NoRecipe(f"'{owner}' pads with mode '{self.module(owner).padding_mode}'")
            kind = "conv_t" if transposed else "conv"
        if not (zero and replayable):
            raise _NoRecipe(f"{kind} '{owner}' reads the channels after ops side passes cannot replay")
        elementwise = all(s.kind == "op" and target_name(s.op) in REPLAYED_ELEMENTWISE for s in steps)
        return SidePath(owner, kind, at[0], tuple(steps), elementwise)

    def source(
        self, point: fx.Node, root: int, start: fx.Node | None = None
    ) -> tuple[str | None, int, str | None, list[SideStep], list[SideTerm]]:
        """(producer, its row offset, zero-source module, steps from the source to the gate point,
        the terms that ``"add"`` steps add). ``start``: where the walk back begins when it is not
        the gate point (a term's own branch, which is checked for zeros from its first node)."""
        steps: list[SideStep] = []
        terms: list[SideTerm] = []
        node = point if start is None else start
        if start is not None:
            point = None  # (check the first node for zeros too)
        while True:
            name = op_name(node) if node.op == "call_function" else node.op
            if node is not point:
                at = self.position(node, root)
                if at is not None and at[2]:  # exactly zero here: u is made from zeros
                    steps.reverse()
                    first = steps[0] if steps else None
                    if first is None or first.kind == "op":
                        value = torch.zeros(1, dtype=torch.float64)
                        for s in steps:
                            value = s.op(value, *s.args, **dict(s.kwargs))
                        if float(value[0]) == 0.0:
                            return None, 0, None, [], terms  # u is exactly zero
                        raise _NoRecipe(f"the value gated at '{node.name}' is a function of zeros without a module")
                    return None, 0, first.module, steps, terms
            x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if name in ("linear", "conv2d", "convolution", "conv_transpose2d"):
                inside = self.position(x, root) if x is not None else None
                transposed = name == "conv_transpose2d" or (name == "convolution" and bool(node.args[6]))
                if inside is None:  # the producer: new channels
                    kinds = (nn.Linear,) if name == "linear" else (nn.ConvTranspose2d,) if transposed else (nn.Conv2d,)
                    owner = self.weight_owner(node, kinds)
                    at = self.position(node, root)
                    if owner is None or at is None or (name != "linear" and self.module(owner).groups != 1):
                        raise _NoRecipe(f"producer at '{node.name}' (reused, grouped or not a plain layer)")
                    if name != "linear" and self.module(owner).padding_mode != "zeros":
                        raise _NoRecipe(f"Conv2d '{owner}' pads with mode '{self.module(owner).padding_mode}'")
                    steps.reverse()
                    return owner, at[0], None, steps, terms
                owner = self.weight_owner(node, (nn.Conv2d,))
                if owner is None or name == "linear" or transposed or self.module(owner).padding_mode != "zeros":
                    raise _NoRecipe(f"'{name}' at '{node.name}' before the gate point")
                if not self._depthwise(node, x):  # a dense conv from the group to itself mixes closed channels in
                    raise _NoRecipe(f"conv '{owner}' maps the group's channels onto themselves with a dense kernel")
                steps.append(SideStep("conv", module=owner, offset=inside[0]))
                node = x
                continue
            if name == "batch_norm":
                stats = next((self.w.tensor_name(a) for a in node.args[1:5] if self.w.tensor_name(a)), None)
                at = self.position(x, root) if x is not None else None
                owner = self.w.owner(stats) if stats else None
                if owner is None or at is None or not isinstance(self.module(owner), nn.modules.batchnorm._BatchNorm):
                    raise _NoRecipe(f"batch norm at '{node.name}'")
                steps.append(SideStep("norm", module=owner, offset=at[0]))
                node = x
                continue
            if name in SPATIAL_OPS and x is not None:
                at_in, at_out = self.position(x, root), self.position(node, root)
                if at_in is None or at_out is None or at_in[:2] != at_out[:2]:
                    raise _NoRecipe(f"'{name}' at '{node.name}' moves the channels")
                args, kwargs = self.constants(node)  # pooling / upsampling: per channel
                steps.append(SideStep("op", functional(node.target), args, tuple(kwargs.items())))
                node = x
                continue
            if name == "instance_norm" and x is not None:
                at = self.position(x, root)
                weight = self.w.tensor_name(node.args[1]) if len(node.args) > 1 else None
                owner = self.w.owner(weight) if weight else self.w.scope_module(node)
                module = self.module(owner) if owner else None
                if at is None or not isinstance(module, nn.modules.instancenorm._InstanceNorm):
                    raise _NoRecipe(f"instance norm at '{node.name}'")
                if module.track_running_stats:
                    raise _NoRecipe(f"instance norm with running statistics at '{node.name}'")
                steps.append(SideStep("instance_norm", module=owner, offset=at[0]))
                node = x
                continue
            if (name in REPLAYED_ELEMENTWISE or name in GRADIENT_COPIES) and x is not None:
                if name not in GRADIENT_COPIES:
                    args, kwargs = self.constants(node)
                    steps.append(SideStep("op", functional(node.target), args, tuple(kwargs.items())))
                node = x
                continue
            if name in ("add", "sub") and len(node.args) == 2:
                live = [
                    a for a in node.args if isinstance(a, fx.Node) and not (self.position(a, root) or (0, 0, True))[2]
                ]
                if any(not isinstance(a, fx.Node) and a != 0 for a in node.args):
                    raise _NoRecipe(f"'{name}' of a constant at '{node.name}'")
                if len(live) == 2 and name == "add" and node.kwargs.get("alpha", 1) == 1:
                    # a residual add of two non-zero values (a projection shortcut): one more term
                    producer, offset, zero_source, term_steps, inner = self.source(live[1], root, live[1])
                    if (producer is None and zero_source is None) or inner:
                        raise _NoRecipe(f"'{name}' of several non-zero values at '{node.name}'")
                    steps.append(SideStep("add", args=(len(terms),)))
                    terms.append(SideTerm(producer, offset, tuple(term_steps), zero_source))
                    live = live[:1]
                if len(live) != 1:
                    raise _NoRecipe(f"'{name}' of several non-zero values at '{node.name}'")
                if name == "sub" and live[0] is node.args[1]:
                    steps.append(SideStep("op", torch.ops.aten.neg.default))
                node = live[0]
                continue
            if name in ("cat", "concat"):
                pieces = [t for t in node.args[0] if isinstance(t, fx.Node) and self.position(t, root) is not None]
                at = self.position(node, root)
                if len(pieces) != 1 or at is None or not self.along_channels(node, at[1]):
                    raise _NoRecipe(f"cat at '{node.name}'")
                node = pieces[0]
                continue
            raise _NoRecipe(f"'{name}' at '{node.name}' makes the gated value")


def side_passes(model: nn.Module, w: Walk, root_of: dict[int, int], points: list[GatePoint]) -> list[SidePass]:
    """One :class:`SidePass` per gated part of every gate point (see the module docstring)."""
    builder = _Builder(model, w, root_of, points)
    result = []
    for gp in points:
        for index, (root, _) in enumerate(gp.parts):
            if root is not None:
                result.append(builder.build(gp, index, root))
    return result


__all__ = ["side_passes"]
