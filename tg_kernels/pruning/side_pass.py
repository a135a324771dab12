"""The closed-channel side pass: ``exact`` training at compact speed (docs/design.md §3).

Compact execution computes every gradient of ``none`` mode except one: the task gradient of closed
gates, ``dL/dgate_c = sum(u_c * dout_c)``. This module computes it beside a compact forward from
the recipes of :mod:`tg_kernels.pruning.analysis.gradients`:

- ``u_c``: the producer's closed rows applied to the producer's compact input (captured by a
  forward pre-hook), or zeros shaped like a norm's input, then the recipe's source steps (batch norm
  with the closed channels' parameters, depthwise conv, activations);
- ``dout_c``: at each consumer, a forward hook wraps the output in :class:`_SideProbe`, an identity
  whose backward turns the consumer's output gradient into the input gradient of its closed columns
  (``dY @ W[:, closed]``, or the conv's input gradient) and pulls it back through the path's steps
  to the gate point (by replaying them on zeros under autograd, or by one number for elementwise
  paths). It returns ``sum(u * dout)`` as the gradient of the closed gates' values, so autograd
  carries it through the gate function into the gate parameters like any other gradient.

For a Linear producer read by a Linear consumer through elementwise ops only (a transformer MLP)
the sum is a bilinear form, ``k * W1_c (X^T dY) W2_c``, evaluated without ``u`` when that is cheaper:
``X^T dY`` costs ``T * d_in * d_out`` against ``T * closed * (d_in + d_out)`` for the two products.

Weights are read from the full-size tensors under ``no_grad``: in ``none`` mode closed rows and
columns get zero gradient, which the compact run already gives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tg_kernels.pruning.analysis.types import Analysis, SidePass, SidePath, SideStep


@dataclass
class _Pass:
    """One side pass for the current open set."""

    recipe: SidePass
    key: str  # the gate of its group
    closed: Tensor  # closed channel indices within the group
    rows: Tensor | None  # producer weight rows of the closed channels
    cols: Tensor | None  # producer weight input columns the compact run keeps (None: all)
    step_index: list[Tensor | None]  # per source step: the closed channels among its module's channels
    bilinear: bool = False  # may be evaluated as a bilinear form (Linear -> elementwise -> Linear)
    terms: list[_Term] = field(default_factory=list)  # values that "add" steps add in


@dataclass
class _Term:
    """A second producer's closed rows, added into ``u`` (``SideTerm``)."""

    producer: str | None  # None: zeros shaped like source_module's input
    rows: Tensor | None
    cols: Tensor | None
    steps: tuple[SideStep, ...]
    step_index: list[Tensor | None]
    source_module: str | None = None


@dataclass
class _Consumer:
    """A consumer that ends live paths: all its closed input columns, gathered once per forward."""

    module: str
    kind: str
    rows: Tensor | None  # consumer weight rows the compact run keeps (None: all)
    cols: Tensor  # the closed input columns of every path ending here, concatenated
    row_mask: Tensor | None  # kept rows whose gate value is 1 (its own rows scaled by gates; None: all pass)
    items: list[tuple[_Pass, SidePath, int, int]] = field(default_factory=list)  # (pass, path, start, count)


@dataclass
class SidePlan:
    """The side passes of one open set (built with the compact plan, used by every forward)."""

    passes: list[_Pass]
    consumers: list[_Consumer]
    producers: list[str]  # modules whose input is captured
    sources: list[str]  # modules whose input shape is captured (zero sources)


def build_plan(
    model: nn.Module,
    recipes: list[SidePass],
    key_of: dict[int, str],
    closed: dict[str, Tensor],
    entries: dict[str, list[tuple[int, Tensor]]],
    row_masks: dict[str, Tensor] | None = None,
) -> SidePlan:
    """The side plan for the open set whose closed channels (per gate key) are ``closed``.

    ``entries`` is the compact plan's kept entries: target -> [(dim, kept indices)]; ``row_masks``:
    consumer -> which of its kept rows are open, for consumers whose rows the compact run scales by
    gate values (a padded closed row is zero there, and passes no gradient to the input).
    """

    def kept(target: str, dim: int) -> Tensor | None:
        return next((index for d, index in entries.get(target, []) if d == dim), None)

    passes, consumers = [], {}
    producers, sources = set(), set()
    for recipe in recipes:
        if recipe.dead:
            continue
        key = key_of[recipe.space]
        cl = closed[key]
        if cl.numel() == 0:
            continue
        rows = cols = None
        if recipe.producer is not None:
            rows = cl + recipe.row_offset
            # (a ConvTranspose2d's weight is [in, out, ...]: its rows are dim 1)
            transposed = isinstance(model.get_submodule(recipe.producer), nn.ConvTranspose2d)
            cols = kept(f"{recipe.producer}.weight", 0 if transposed else 1)
            producers.add(recipe.producer)
        else:
            sources.add(recipe.source_module)
        step_index = _step_index(recipe.source_steps, cl)
        terms = []
        for term in recipe.terms:
            if term.producer is None:
                terms.append(_Term(None, None, None, term.steps, _step_index(term.steps, cl), term.source_module))
                sources.add(term.source_module)
                continue
            transposed = isinstance(model.get_submodule(term.producer), nn.ConvTranspose2d)
            terms.append(
                _Term(
                    term.producer,
                    cl + term.row_offset,
                    kept(f"{term.producer}.weight", 0 if transposed else 1),
                    term.steps,
                    _step_index(term.steps, cl),
                )
            )
            producers.add(term.producer)
        one = len(recipe.paths) == 1 and recipe.paths[0]
        bilinear = bool(
            one
            and one.kind == "linear"
            and one.elementwise
            and recipe.producer is not None
            and not recipe.source_steps
            and isinstance(model.get_submodule(recipe.producer), nn.Linear)
        )
        item = _Pass(recipe, key, cl, rows, cols, step_index, bilinear, terms)
        passes.append(item)
        for path in recipe.paths:
            consumer = consumers.get(path.consumer)
            if consumer is None:
                mask = (row_masks or {}).get(path.consumer)
                consumer = consumers[path.consumer] = _Consumer(
                    path.consumer,
                    path.kind,
                    kept(f"{path.consumer}.weight", 1 if path.kind == "conv_t" else 0),
                    cl.new_zeros(0),
                    None if mask is None or bool(mask.all()) else mask,
                )
            start = consumer.cols.numel()
            cols = cl + path.offset
            if path.repeat != 1:  # each channel is path.repeat consecutive columns (flattened C x H x W)
                cols = (cols[:, None] * path.repeat + torch.arange(path.repeat, device=cl.device)).flatten()
            consumer.cols = torch.cat([consumer.cols, cols])
            consumer.items.append((item, path, start, cols.numel()))
    return SidePlan(passes, list(consumers.values()), sorted(producers), sorted(s for s in sources if s))


def _step_index(steps: tuple[SideStep, ...], closed: Tensor) -> list[Tensor | None]:
    """Per step: the closed channels among its module's channels (norm and depthwise conv steps)."""
    return [closed + s.offset if s.kind in ("norm", "instance_norm", "conv") else None for s in steps]


def _replay(
    steps: tuple[SideStep, ...],
    x: Tensor,
    index: list[Tensor | None] | None,
    run: SideRun,
    terms: list[Tensor] | None = None,
) -> Tensor:
    """Apply recipe steps to closed channels ``x`` (``index``: per step, the channels among a module's;
    ``terms``: the values that ``"add"`` steps add)."""
    for i, step in enumerate(steps):
        if step.kind == "add":
            x = x + terms[step.args[0]]
        elif step.kind == "op":
            x = step.op(x, *step.args, **dict(step.kwargs))
        elif step.kind == "item":
            x = x[step.args[0]]
        elif step.kind == "dropout":  # at the module's probability now (it may have changed since the trace)
            module = run.model.get_submodule(step.module)
            p = module.p if isinstance(module, nn.modules.dropout._DropoutNd) else step.args[0]
            x = step.op(x, p, module.training)
        elif step.kind == "norm":
            bn = run.model.get_submodule(step.module)
            idx = index[i]
            weight, bias = run.full(step.module, "weight"), run.full(step.module, "bias")
            weight = None if weight is None else weight.index_select(0, idx)
            bias = None if bias is None else bias.index_select(0, idx)
            mean, var = run.full(step.module, "running_mean"), run.full(step.module, "running_var")
            if bn.training or mean is None or var is None:  # batch statistics, as the norm computes them
                x = F.batch_norm(x, None, None, weight, bias, True, 0.0, bn.eps)
            else:
                x = F.batch_norm(
                    x, mean.index_select(0, idx), var.index_select(0, idx), weight, bias, False, 0.0, bn.eps
                )
        elif step.kind == "instance_norm":  # per sample and channel: the closed channels alone
            norm = run.model.get_submodule(step.module)
            weight, bias = run.full(step.module, "weight"), run.full(step.module, "bias")
            weight = None if weight is None else weight.index_select(0, index[i])
            bias = None if bias is None else bias.index_select(0, index[i])
            x = F.instance_norm(x, None, None, weight, bias, True, 0.0, norm.eps)
        else:  # depthwise conv
            conv = run.model.get_submodule(step.module)
            idx = index[i]
            weight, bias = run.full(step.module, "weight"), run.full(step.module, "bias")
            bias = None if bias is None else bias.index_select(0, idx)
            x = F.conv2d(x, weight.index_select(0, idx), bias, conv.stride, conv.padding, conv.dilation, idx.numel())
    return x


def _path_gradient(path: SidePath, grad: Tensor, like: Tensor, run: SideRun) -> Tensor:
    """The gradient at the gate point's closed channels (shaped like ``like``) from the consumer's input gradient."""
    if not path.steps:
        return grad
    with torch.enable_grad():
        if path.elementwise:  # one number: the chain's derivative at 0
            z = torch.zeros(1, dtype=grad.dtype, device=grad.device, requires_grad=True)
            (k,) = torch.autograd.grad(_replay(path.steps, z, None, run).sum(), z, allow_unused=True)
            return grad * (0.0 if k is None else k)
        z = torch.zeros_like(like, requires_grad=True)
        (g,) = torch.autograd.grad(_replay(path.steps, z, None, run), z, grad, allow_unused=True)
        return torch.zeros_like(like) if g is None else g


def _conv_input_gradient(conv: nn.Conv2d, weight: Tensor, dy: Tensor, input_shape: torch.Size) -> Tensor:
    """The input gradient of ``conv`` computed with ``weight`` (``[out, in, kh, kw]``) for output gradient ``dy``.

    On the CPU a stride-1 conv's input gradient runs as a forward conv with the transposed, flipped
    kernel: the same numbers, and for thin convs (a few closed columns of a 16-channel 32x32 layer)
    about 4-7x faster than oneDNN's backward-data kernel. Elsewhere ``conv2d_input`` (autograd for
    ``padding="same"``, whose two sides may differ).
    """
    kernel = weight.shape[2:]
    simple = (
        dy.device.type == "cpu"
        and all(s == 1 for s in conv.stride)
        and not isinstance(conv.padding, str)
        and all(d * (k - 1) >= p for d, k, p in zip(conv.dilation, kernel, conv.padding))
    )
    if simple:
        flipped = weight.transpose(0, 1).flip((2, 3))
        padding = tuple(d * (k - 1) - p for d, k, p in zip(conv.dilation, kernel, conv.padding))
        return F.conv2d(dy, flipped, None, 1, padding, conv.dilation)
    shape = (input_shape[0], weight.shape[1], *input_shape[2:])
    if isinstance(conv.padding, str):  # "same" / "valid": autograd through the conv itself
        with torch.enable_grad():
            z = dy.new_zeros(shape, requires_grad=True)
            y = F.conv2d(z, weight, None, conv.stride, conv.padding, conv.dilation)
            return torch.autograd.grad(y, z, dy)[0]
    return torch.nn.grad.conv2d_input(shape, weight, dy, conv.stride, conv.padding, conv.dilation, 1)


class _SideProbe(torch.autograd.Function):
    """Identity on a consumer's output; its backward returns the closed gates' task gradients."""

    @staticmethod
    def forward(ctx, output: Tensor, job: _ConsumerJob, *gates: Tensor) -> Tensor:
        ctx.job = job
        ctx.gate_dtypes = [gate.dtype for gate in gates]
        # a copy, not a view: the model may modify the consumer's output in place (``out += identity``),
        # which autograd forbids on views made inside a custom Function
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        job: _ConsumerJob = ctx.job  # (kept: a retain_graph=True backward runs this again)
        grads = job.gate_gradients(grad_output)
        return (grad_output, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.gate_dtypes)))


@dataclass
class _ConsumerJob:
    """What one consumer call's backward needs (the closed columns, the input shape, each pass's ``u``)."""

    consumer: _Consumer
    module: nn.Module
    weight: Tensor  # consumer weight at the kept rows and the closed columns ([closed, out, ...] for conv_t)
    input_shape: torch.Size
    values: list[tuple[str, Any]]  # per item: ("u", u) or ("bilinear", (x, producer rows, bias))
    run: SideRun

    def gate_gradients(self, grad_output: Tensor) -> list[Tensor]:
        c = self.consumer
        with torch.no_grad():
            dy = grad_output.to(self.weight.dtype)
            if c.kind == "linear":
                dx = None if all(kind == "bilinear" for kind, _ in self.values) else dy @ self.weight
            elif c.kind == "conv_t":  # the input gradient of a transposed conv is a conv
                m = self.module
                dx = F.conv2d(dy, self.weight, None, m.stride, m.padding, m.dilation)
            else:
                dx = _conv_input_gradient(self.module, self.weight, dy, self.input_shape)
            grads = []
            for (item, path, start, count), (kind, value) in zip(c.items, self.values):
                if kind == "bilinear":
                    grads.append(self._bilinear(path, dy, value, start, count))
                    continue
                channel = -1 if c.kind == "linear" else 1
                d = _path_gradient(path, dx.narrow(channel, start, count), value, self.run)
                dim = item.recipe.dim % value.dim()
                others = [i for i in range(value.dim()) if i != dim]
                grads.append((value * d).sum(others) if others else value * d)
        return grads if self.run.scale == 1 else [g * self.run.scale for g in grads]

    def _bilinear(self, path: SidePath, dy: Tensor, value: tuple, start: int, count: int) -> Tensor:
        """``k * (W1_c M W2_c + b1_c s W2_c)`` with ``M = X^T dY``, ``s = sum_t dY``."""
        x, w1, b1 = value
        w2 = self.weight.narrow(1, start, count)  # [out, closed]
        x2, dy2 = x.reshape(-1, x.shape[-1]).to(dy.dtype), dy.reshape(-1, dy.shape[-1])
        g = ((w1 @ (x2.t() @ dy2)) * w2.t()).sum(1)
        if b1 is not None:
            g = g + b1 * (dy2.sum(0) @ w2)
        k = _path_gradient(path, torch.ones(1, dtype=g.dtype, device=g.device), g, self.run)
        return g * k


class SideRun:
    """One forward's side passes: captures the inputs they need and wraps the consumers' outputs."""

    def __init__(
        self,
        model: nn.Module,
        plan: SidePlan,
        fulls: dict[str, Tensor],
        gate_values: Any,
        scale: int = 1,
        input_scales: dict[str, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.scale = scale  # the closed gates' gradients are multiplied by it (a pass run on every k-th step: k)
        # producer -> the scale of its kept input columns where its input gates are folded into its weight
        # and some are 0 (closed channels kept as padding): its captured input is not multiplied by them
        self.input_scales = input_scales or {}
        self.plan = plan
        self.fulls = fulls  # target -> the full-size tensor (the compact run has swapped them out)
        self.gate_values = gate_values  # key -> the group's gate values (with their gradient)
        self.inputs: dict[str, Tensor] = {}
        self.handles: list[Any] = []
        self._gates: dict[str, Tensor] = {}

    def full(self, module: str, attr: str) -> Tensor | None:
        target = f"{module}.{attr}"
        if target in self.fulls:
            return self.fulls[target]
        return getattr(self.model.get_submodule(module), attr, None)

    def install(self) -> None:
        for name in {*self.plan.producers, *self.plan.sources}:
            module = self.model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._capture(name)))
        for consumer in self.plan.consumers:
            module = self.model.get_submodule(consumer.module)
            self.handles.append(module.register_forward_hook(self._wrap(consumer)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.inputs.clear()

    def _capture(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[name] = args[0]

        return hook

    def _gate(self, item: _Pass) -> Tensor:
        values = self._gates.get(item.key)
        if values is None:
            values = self._gates[item.key] = self.gate_values(item.key)
        return values.index_select(0, item.closed.to(values.device))

    def _value(self, item: _Pass, out_width: int) -> tuple[str, Any]:
        """``("u", u)`` for an explicit pass; ``("bilinear", (x, producer rows, bias rows))`` where that is cheaper."""
        recipe = item.recipe
        with torch.no_grad():
            if recipe.producer is not None:
                x = self.inputs[recipe.producer]
                weight, bias = self._rows(recipe.producer, item.rows, item.cols)
                if item.bilinear:
                    d_in, closed = x.shape[-1], item.closed.numel()
                    tokens = x.numel() // max(d_in, 1)
                    if d_in * out_width * (tokens + closed) < tokens * closed * (d_in + out_width):
                        return "bilinear", (x, weight, bias)
                u = self._apply(recipe.producer, x, weight, bias)
            else:
                u = self._zeros(recipe.source_module, item.closed.numel())
            terms = []
            for term in item.terms:
                if term.producer is None:
                    t = self._zeros(term.source_module, item.closed.numel())
                else:
                    weight, bias = self._rows(term.producer, term.rows, term.cols)
                    t = self._apply(term.producer, self.inputs[term.producer], weight, bias)
                terms.append(_replay(term.steps, t, term.step_index, self))
            u = _replay(recipe.source_steps, u, item.step_index, self, terms)
            return "u", u.to(self.full(recipe.producer or recipe.source_module, "weight").dtype)  # (autocast)

    def _zeros(self, module: str, channels: int) -> Tensor:
        """Zeros shaped like ``module``'s captured input at ``channels`` channels (a zero source)."""
        shape = list(self.inputs[module].shape)
        shape[1] = channels
        like = self.full(module, "weight")
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def _rows(self, name: str, rows: Tensor, cols: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """A producer's weight at its closed rows (and the input columns the compact run keeps), and its bias."""
        rows_dim = 1 if isinstance(self.model.get_submodule(name), nn.ConvTranspose2d) else 0
        weight = self.full(name, "weight").index_select(rows_dim, rows)
        if cols is not None:
            weight = weight.index_select(1 - rows_dim, cols)
        if name in self.input_scales:
            weight = weight * self.input_scales[name]
        bias = self.full(name, "bias")
        return weight, None if bias is None else bias.index_select(0, rows)

    def _apply(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The producer ``name`` with ``weight`` and ``bias`` in place of its own."""
        producer = self.model.get_submodule(name)
        if isinstance(producer, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(producer, nn.ConvTranspose2d):
            p = producer
            return F.conv_transpose2d(x, weight, bias, p.stride, p.padding, p.output_padding, 1, p.dilation)
        return F.conv2d(x, weight, bias, producer.stride, producer.padding, producer.dilation, 1)

    def _wrap(self, consumer: _Consumer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            with torch.no_grad():
                rows_dim = 1 if consumer.kind == "conv_t" else 0  # (a ConvTranspose2d's weight is [in, out, ...])
                weight = self.full(consumer.module, "weight")
                if consumer.rows is not None:
                    weight = weight.index_select(rows_dim, consumer.rows)
                weight = weight.index_select(1 - rows_dim, consumer.cols)
                if consumer.row_mask is not None:
                    shape = [1] * weight.dim()
                    shape[rows_dim] = -1
                    weight = weight * consumer.row_mask.to(weight.dtype).view(shape)
            values, gates, cache = [], [], {}
            for item, *_ in consumer.items:
                if id(item) not in cache:
                    cache[id(item)] = self._value(item, weight.shape[0])
                values.append(cache[id(item)])
                gates.append(self._gate(item))
            job = _ConsumerJob(consumer, module, weight, args[0].shape, values, self)
            return _SideProbe.apply(output, job, *gates)

        return hook


def full_width_groups(analysis: Analysis, key_of: dict[int, str]) -> dict[str, str]:
    """Gate key -> why its group has no side pass, so that it runs at full width in ``exact`` training:
    a gate point without a recipe, or hidden units gated inside a recurrence."""
    wide: dict[str, str] = {}
    for recipe in analysis.side_passes:
        if recipe.reason is not None:
            wide.setdefault(key_of[recipe.space], f"gate point '{recipe.point}': {recipe.reason}")
    for rg in analysis.recurrent:
        wide.setdefault(key_of[rg.space], f"hidden units of '{rg.module}' (a recurrence)")
    return wide


__all__ = ["SidePlan", "SideRun", "build_plan", "full_width_groups"]
