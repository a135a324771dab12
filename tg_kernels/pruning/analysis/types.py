"""The result types of the channel analysis: what attach, Budget, export and compact execution consume.

Spaces are integer ids of channel sets; a :class:`Group` is the set of spaces that share one gate
(``Analysis.root_of`` maps every gated space to its group's space). Fields are only ever added to
these types, never changed in meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tg_kernels.pruning.analysis.aten import op_from_reference, op_reference


class AnalysisError(RuntimeError):
    """The model cannot be analysed at all (for example, it cannot be run on the example inputs)."""


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Export removes closed channels of ``space`` from tensor ``target`` along ``dim``.

    The space's channels sit at ``offset`` (in channels) within that dim, each occupying ``repeat``
    consecutive entries (a Linear reading a flattened ``C x H x W`` map has ``repeat = H * W``).

    ``tile`` > 1: the space's pattern repeats ``tile`` times along the dim, copy ``k`` starting
    ``k * period`` channels after ``offset`` (head dims: dim ``d`` of every head, entries
    ``(offset + k * period + d) * repeat + r``). Together with the head space's own slice, an entry
    ``h * D + d`` stays only where both its head and its head dim stay (a product of two spaces).
    """

    target: str
    dim: int
    offset: int
    repeat: int
    space: int
    tile: int = 1
    period: int = 0


@dataclass(frozen=True)
class GatePoint:
    """Multiply the output of module ``module`` by the gates of ``parts`` along ``dim``.

    ``parts`` is a tuple of ``(space, size)``; ``replace`` says the module is a Conv2d or Linear
    producer that becomes a Gated layer (the only part is its own space). ``fold`` names the module
    whose output rows export may scale by the gate values (the point itself, or the BatchNorm before
    a gated activation; None where there is none). Each gate covers ``repeat`` consecutive entries
    along ``dim`` (an attention head of ``repeat`` entries shares one gate).

    ``on_input``: multiply the module's (only) input instead of its output, before the module runs.
    Such a point sits at a Linear or a norm that reads channels made non-zero where no module
    returns them (a position table added in the model's own forward); ``fold`` is None.

    ``dims`` (empty, or one entry per part): head-dim gates. Entry ``i`` lists ``(space, size)``
    parts (concatenated width ``S``, ``repeat`` a multiple of ``S``; empty for a part without them)
    that tile each of part ``i``'s gates' ``repeat`` entries: entry ``r`` of channel ``c`` is
    multiplied by ``gate[c] * dim_gate[r % S]`` (:func:`~tg_kernels.pruning.bank.entry_gates`).
    """

    module: str
    dim: int
    parts: tuple[tuple[int, int], ...]
    replace: bool
    fold: str | None = None
    repeat: int = 1
    on_input: bool = False
    dims: tuple[tuple[tuple[int | None, int], ...], ...] = ()


@dataclass(frozen=True)
class RecurrentGate:
    """Gate the hidden units of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` ``module`` inside its recurrence.

    A hidden unit cannot be gated on the module's output: the recurrence reads it back (and the
    layers after the first read it inside the one fused ATen op). Instead gate ``j`` of ``space``
    (``size`` units, shared by every layer and direction, which must keep the same hidden size)
    multiplies rows ``block * size + j`` of every ``weight_ih_l*``, ``weight_hh_l*``, ``bias_ih_l*``
    and ``bias_hh_l*`` while the module runs: the cell candidate ``g`` of an LSTM (``block`` 2 of
    its ``blocks`` = 4 gate blocks i, f, g, o), the new gate ``n`` of a GRU (``block`` 2 of r, z, n),
    the only block of an ``nn.RNN``. With a zero initial state a closed unit then stays exactly zero
    at every step (LSTM: ``c = f c + i * 0 = 0``, ``h = o tanh(0) = 0``; GRU: ``n = tanh(0 + r * 0) = 0``,
    ``h = (1 - z) 0 + z 0 = 0``; RNN: ``h = tanh(0) = relu(0) = 0``), so it adds nothing to the
    recurrence, to the next layer or to any consumer, and removing it is exact.
    """

    module: str
    space: int
    size: int
    block: int
    blocks: int


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """FLOPs and parameters of one Conv/Linear call as a function of its open input/output counts.

    FLOPs = ``flops_per_pair * a * b`` (+ ``bias_flops_per_out * b``) where ``a`` and ``b`` are the
    open input and output channel counts; ``in_parts`` / ``out_parts`` are ``(space, size, repeat)``
    (``space`` None for channels that are never gated). A depthwise conv has ``a = 1`` per output.

    ``in_dims`` / ``out_dims`` (empty, or one entry per part): head-dim gates over each part's
    ``repeat`` entries, as in :attr:`GatePoint.dims`; such a part counts
    ``open(space) * (repeat // S) * open(dims)`` entries instead of ``open(space) * repeat``.
    """

    module: str
    kind: str
    flops_per_pair: float
    params_per_pair: float
    bias_per_out: float
    in_parts: tuple[tuple[int | None, int, int], ...]
    out_parts: tuple[tuple[int | None, int, int], ...]
    depthwise: bool
    count_params: bool
    in_dims: tuple[tuple[tuple[int | None, int], ...], ...] = ()
    out_dims: tuple[tuple[tuple[int | None, int], ...], ...] = ()


@dataclass
class Group:
    """Channels that share one gate: every space merged into ``space`` and what export slices."""

    space: int
    name: str
    size: int
    producers: list[str]
    slices: list[Slice] = field(default_factory=list)


@dataclass
class Analysis:
    """Everything attach, budget and export need to know about a model's channels.

    ``tracer`` says which graph the analysis read: ``"export"`` (the ``torch.export`` graph, the
    default) or ``"fx"`` (the torch.fx fallback for models that torch.export cannot trace).
    ``norms`` lists the norm layers that normalise over gated channels, as ``(module, parts)``:
    at full width they must compute their statistics over the open channels only (attach replaces
    them by open-channel versions). ``coverage`` is the share of the model's FLOPs (for the example
    inputs) that gates control, and ``uncovered`` says why the rest is fixed: reason -> FLOPs.
    """

    groups: list[Group]
    gate_points: list[GatePoint]
    layers: list[LayerCost]
    fixed: dict[str, str]  # producer module -> why its channels are kept whole
    barriers: list[str]  # human-readable pieces that stopped the analysis
    root_of: dict[int, int]  # any space -> the group space it belongs to (gated spaces only)
    other_params: int  # parameters not covered by any LayerCost (embeddings, LayerNorm, ...)
    other_flops: float  # FLOPs of opaque layers counted as constant (attention)
    after_norm: list[tuple[str, int]] = field(default_factory=list)  # (Conv2d gated after its BatchNorm, space)
    conv_inputs: list[tuple[str, tuple[tuple[int | None, int], ...]]] = field(default_factory=list)
    # (Conv2d with groups == 1, the (group space or None, size) parts of its input channels)
    tracer: str = "fx"
    norms: list[tuple[str, tuple[tuple[int | None, int], ...]]] = field(default_factory=list)
    coverage: float = 0.0
    uncovered: dict[str, float] = field(default_factory=dict)
    size_attrs: list[SizeAttr] = field(default_factory=list)
    side_passes: list[SidePass] = field(default_factory=list)  # one per gated part of every gate point
    recurrent: list[RecurrentGate] = field(default_factory=list)  # LSTM / GRU hidden units (gated on parameters)
    head_dims: list[HeadDims] = field(default_factory=list)  # one per attention op: its head dims, or why whole


@dataclass(frozen=True)
class HeadDims:
    """The head dims of one attention op (``module``, graph node ``node``): gated by group ``space``
    (``size`` gates, shared by every head of q, k, v and by the out-projection's columns; across a
    rotary embedding ``size`` is ``D / 2``, gate ``j`` covering dims ``j`` and ``j + D / 2``), or kept
    whole (``space`` None) for ``reason``. ``scored``: the modules projecting q and k (the attach
    self-check sharpens their scores, so that a scale computed from the head dim would show)."""

    module: str
    node: str
    space: int | None
    size: int
    reason: str | None = None
    scored: tuple[str, ...] = ()


@dataclass(frozen=True)
class SideStep:
    """One op of a side pass, replayed on a gate point's closed channels only.

    ``kind``: ``"op"`` calls ``op(x, *args, **dict(kwargs))``; ``"item"`` takes ``x[args[0]]``;
    ``"dropout"`` calls ``op(x, args[0], module.training)``; ``"norm"`` is the batch norm ``module``
    and ``"conv"`` the depthwise Conv2d ``module``, at the channels that start at ``offset`` among
    the module's channels (``"instance_norm"``: the InstanceNorm ``module``, likewise);
    ``"add"`` adds the value of term ``args[0]`` of the :class:`SidePass`
    (a residual add of two non-zero values: a ResNet block's projection shortcut).
    """

    kind: str
    op: Any = None
    args: tuple = ()
    kwargs: tuple = ()
    module: str | None = None
    offset: int = 0

    def __getstate__(self) -> dict[str, Any]:  # torch.save of a gated model: ATen ops do not pickle
        return {**self.__dict__, "op": op_reference(self.op)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, op=op_from_reference(state["op"]))


@dataclass(frozen=True)
class SidePath:
    """A live path from a gate point to a consumer: ``kind`` ``"linear"``, ``"conv"`` or ``"conv_t"`` (a
    Linear, a Conv2d or a ConvTranspose2d with groups 1) whose input channels start at ``offset``.
    ``steps`` are the ops between, replayed to pull the consumer's input gradient back;
    ``elementwise``: every step is elementwise (the path's derivative at the zero channels is one
    number). ``repeat``: the consumer reads each channel as that many consecutive input columns (a
    Linear after ``flatten`` of a C x H x W map)."""

    consumer: str
    kind: str
    offset: int
    steps: tuple[SideStep, ...]
    elementwise: bool
    repeat: int = 1


@dataclass(frozen=True)
class SideTerm:
    """A second value added into a side pass's ``u``: ``producer``'s rows that start at
    ``row_offset`` applied to its input, or (``producer`` None) zeros shaped like ``source_module``'s
    input, then ``steps`` (as a :class:`SidePass`'s source)."""

    producer: str | None
    row_offset: int
    steps: tuple[SideStep, ...] = ()
    source_module: str | None = None


@dataclass(frozen=True)
class SidePass:
    """How ``exact`` mode gets the closed gates' gradients of one gated part of a gate point beside a
    compact run (:mod:`tg_kernels.pruning.analysis.gradients`).

    ``dead``: the gradient is exactly zero (no side pass needed). Otherwise ``u`` (the value the
    gate multiplies) comes from ``producer``'s rows that start at ``row_offset`` applied to its input,
    or (``producer`` None) from zeros shaped like ``source_module``'s input, then ``source_steps``;
    ``paths`` give the gradient at the gate's output. ``reason`` (not None) says why no recipe exists.
    ``terms``: values that ``"add"`` steps of ``source_steps`` add in.
    """

    point: str
    part: int
    space: int
    dim: int
    dead: bool = False
    producer: str | None = None
    row_offset: int = 0
    source_module: str | None = None
    source_steps: tuple[SideStep, ...] = ()
    paths: tuple[SidePath, ...] = ()
    reason: str | None = None
    terms: tuple[SideTerm, ...] = ()


@dataclass(frozen=True)
class SizeAttr:
    """An int attribute of a module that the forward uses as the size of a gated dim (``self.num_heads``
    in ``x.reshape(B, N, self.num_heads, self.head_dim)``): export sets it to the kept size,
    ``sum(kept channels of each part) * repeat`` (``parts`` as in :class:`GatePoint`, space None for
    channels that are never gated). ``dims`` (not empty): the size counts head dims too, ``repeat``
    being heads times their ``S = sum(size of dims)`` entries: ``sum(kept of parts) * (repeat // S) *
    sum(kept of dims)`` (GPT-2's ``split_size``, a ``heads * head_dim`` width)."""

    module: str
    attr: str
    parts: tuple[tuple[int | None, int], ...]
    repeat: int
    dims: tuple[tuple[int | None, int], ...] = ()
    index: int | None = None  # the attribute is a list (``self.splits`` of ``torch.split(x, self.splits)``): this entry


# --------------------------------------------------------------------------------------------------
# Per-value channel information
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelInfo:
    """Channels of one tensor: along ``dim`` the concatenation of ``parts`` (space ids).

    ``nonzero[i]`` is None when closed channels of part i are exactly zero here, else the node
    that made them non-zero. ``repeat`` > 1 after flattening channels with trailing dims.
    """

    parts: tuple[int, ...]
    dim: int
    nonzero: tuple[Any, ...]
    repeat: int = 1

    def with_dim(self, dim: int, repeat: int | None = None) -> ChannelInfo:
        return ChannelInfo(self.parts, dim, self.nonzero, self.repeat if repeat is None else repeat)


@dataclass(frozen=True)
class StackedInfo:
    """A value whose dim ``dim`` indexes equal pieces of channels (``qkv.reshape(B, N, 3, H, D)``:
    dim 2 picks q, k or v); ``items[i]`` is the :class:`ChannelInfo` of piece i, its dims counted in
    the whole value. Only ops that pick a piece (``unbind``, ``select``) or move dims accept it."""

    dim: int
    items: tuple[ChannelInfo, ...]


__all__ = [
    "Analysis",
    "AnalysisError",
    "ChannelInfo",
    "GatePoint",
    "Group",
    "HeadDims",
    "LayerCost",
    "SidePass",
    "SidePath",
    "SideStep",
    "SideTerm",
    "RecurrentGate",
    "SizeAttr",
    "Slice",
    "StackedInfo",
]
