"""Differentiable gathers for compact execution: every parameter of a model in one autograd node.

Each compact forward replaces a model's full-size parameters by their kept entries (rows of the
open output channels, columns of the open inputs), with the gate values folded into some of them
as per-row scales. Done one tensor at a time, that is a few hundred small autograd nodes and
about ten small ops per tensor per step, which on a CPU costs more than the layers they serve at
small widths. :class:`Bundle` lays out, once per open set, every parameter of one dtype and device
side by side, so that :func:`gather_bundle` gathers all of them in one node (one index_select per
tensor, into one buffer) and its backward writes every full-size gradient into one buffer.

:func:`kept_gate_values` does the same for the gates: one node evaluates the gate values of every
group's kept channels, with the gradient of ``hard`` mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tg_kernels.gate import ShapeFn, limit_derivative


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill a block of its storage exactly once (contiguous in some dim order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order_entries(t: Tensor, dims: Sequence[tuple[int, Tensor]]) -> tuple[Tensor, tuple[int, ...]]:
    """Storage offsets (relative to ``t``'s first element) of the entries ``dims`` keeps, and their shape.

    ``dims`` is ``[(dim, sorted unique indices)]``; other dims keep every entry. The offsets are in
    the logical order of the kept block, so gathering them gives a contiguous tensor of that shape.
    ``t`` must be dense (:func:`is_dense`), as contiguous and channels_last tensors are.
    """
    device = dims[0][1].device if dims else t.device
    kept = {dim: index for dim, index in dims}
    offsets = torch.zeros((), dtype=torch.int64, device=device)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        index = kept.get(dim)
        if index is None:
            index = torch.arange(size, device=device)
        offsets = offsets.unsqueeze(-1) + index.to(torch.int64) * stride
    shape = tuple(offsets.shape)
    return offsets.reshape(-1), shape


def run_length(t: Tensor, dims: Sequence[tuple[int, Tensor]]) -> int:
    """How many elements the kept entries of ``t`` come in, contiguous in memory: the product of the
    trailing dims that ``dims`` does not slice and that are laid out innermost with stride 1 (a
    contiguous conv weight sliced along its out and in channels keeps runs of ``kh * kw``)."""
    if t.numel() == 0:
        return 1
    sliced = {dim for dim, _ in dims}
    run = 1
    for dim in reversed(range(t.dim())):
        if dim in sliced or (t.shape[dim] != 1 and t.stride(dim) != run):
            break
        run *= t.shape[dim]
    return run


_ALONG_ONE_DIM = 1 << 14  # tensors at least this large, sliced along one dim, are gathered along it


def _use_count(t: Tensor) -> int:
    """How many tensors (and storage handles) share ``t``'s storage; -1 where torch does not say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return -1 if count is None else count(t.untyped_storage()._cdata)


class ReusableBuffer:
    """A flat buffer handed out again, step after step, while nothing else holds its storage.

    Compact execution needs a few buffers of a model's parameter size every step (the gathered
    parameters, the full-size gradients). Freshly allocated, the CPU allocator maps new pages for
    each and the page faults cost more than the copies. A buffer is reused only when no view of it
    is alive (storage use count back to what it was when it was made): when a gradient handed out
    last step is still held (``param.grad``, a user's reference), a new buffer is made instead.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._alone = 0

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        b = self._buffer
        if (
            b is not None
            and self._alone > 0
            and b.numel() == numel
            and b.dtype == dtype
            and b.device == device
            and _use_count(b) == self._alone
        ):
            return b[:]
        b = torch.empty(numel, dtype=dtype, device=device)
        self._buffer, self._alone = b, _use_count(b)
        return b[:]  # a view: whoever keeps it (autograd's saved tensors too) holds the storage


@dataclass
class Bundle:
    """The layout of one gather: parameters of one dtype and device, with their kept entries.

    Parameters whose rows take a gate scale come first: 1-D ones (norm weights and biases, where
    a row is one element) in the first ``elementwise`` elements of the compact buffer, so one
    multiply scales them all; then scaled tensors with more dims, then unscaled ones.

    Small tensors and tensors sliced along several dims are gathered through their storage offsets
    (one ``index_copy`` backward serves all of them), in runs of contiguous elements where the
    kept entries come in runs (:func:`run_length`: a conv weight's ``kh * kw``); large tensors
    sliced along one dim (a Linear's rows or columns) use ``index_select`` / ``index_copy_`` along
    that dim, which copy whole rows instead of element by element.
    """

    dtype: torch.dtype
    device: torch.device
    entries: list[Tensor | None]  # per tensor: where its kept runs start in storage, counted in runs
    runs: list[int]  # per tensor: elements per run (1: element by element, those are in global_index)
    shapes: list[tuple[int, ...]]  # per tensor: its compact shape
    full_shapes: list[tuple[int, ...]]
    full_strides: list[tuple[int, ...]]
    offsets: list[int]  # compact buffer offsets, len n + 1
    full_offsets: list[int]  # per tensor: where its gradient starts in the full gradient buffer
    scaled_rows: list[tuple[int, int] | None]  # per tensor: (first scale row, rows) for tensors of > 1 dim
    elementwise: int  # leading compact elements scaled element by element
    scale_rows: int  # length of the scale vector the gather takes
    global_index: Tensor  # kept entries' positions in the full gradient buffer (tensors gathered by offset)
    along: list[tuple[int, Tensor] | None]  # per tensor: (dim, kept indices) if gathered along one dim, else None
    dropped: list[Tensor | None]  # per tensor gathered along one dim: the indices it drops there
    whole: list[bool]  # per tensor: keeps every entry (passed through where unscaled), 1-D scaled ones excepted
    full_numel: int  # the full gradient buffer: tensors gathered by offset first (zeroed at once), then the others
    by_offset_numel: int
    scaled_end: int  # compact elements of the scaled tensors (they come first)
    gathered_buffer: ReusableBuffer = field(default_factory=ReusableBuffer)
    index_cache: dict[tuple[bool, ...], Tensor] = field(default_factory=dict)  # global_index without passed tensors
    scaled_buffer: ReusableBuffer = field(default_factory=ReusableBuffer)
    grad_buffer: ReusableBuffer = field(default_factory=ReusableBuffer)

    @staticmethod
    def build(
        tensors: Sequence[Tensor], dims: Sequence[Sequence[tuple[int, Tensor]]], scaled: Sequence[bool]
    ) -> tuple[Bundle, list[int]]:
        """Lay out ``tensors`` (dense, one dtype and device); returns the bundle and the tensor order it uses.

        ``dims[i]`` lists tensor i's kept entries per sliced dim; ``scaled[i]`` says whether its rows
        (dim 0) are scaled. The caller passes tensors and scale rows in the returned order.
        """
        order = sorted(
            range(len(tensors)),
            key=lambda i: (0 if scaled[i] and tensors[i].dim() == 1 else 1 if scaled[i] else 2, i),
        )
        entries, shapes, scaled_rows, along, dropped, runs = [], [], [], [], [], []
        offsets = [0]
        elementwise = rows = scaled_end = 0
        for i in order:
            t = tensors[i]
            if len(dims[i]) == 1 and t.numel() >= _ALONG_ONE_DIM and not (scaled[i] and t.dim() == 1):
                dim, index = dims[i][0]
                shape = tuple(index.numel() if d == dim else size for d, size in enumerate(t.shape))
                flat = None
                along.append((dim, index))
                keep = torch.ones(t.shape[dim], dtype=torch.bool, device=index.device)
                keep[index] = False
                dropped.append(torch.nonzero(keep).flatten())
                runs.append(1)
            else:
                flat, shape = memory_order_entries(t, dims[i])
                run = run_length(t, dims[i])
                if run > 1:  # the first entry of each run, counted in runs
                    flat = flat.view(-1, run)[:, 0] // run
                along.append(None)
                dropped.append(None)
                runs.append(run)
            entries.append(flat)
            shapes.append(shape)
            n = math.prod(shape)
            scaled_end += n if scaled[i] else 0
            if scaled[i] and t.dim() == 1:
                elementwise += n
                scaled_rows.append(None)
            elif scaled[i]:
                scaled_rows.append((rows + elementwise, shape[0]))
                rows += shape[0]
            else:
                scaled_rows.append(None)
            offsets.append(offsets[-1] + n)
        full_offsets, at = [0] * len(order), 0
        for pass_along in (False, True):  # tensors gathered by offset first: their region is zeroed at once
            if pass_along:
                by_offset_numel = at
            for k, i in enumerate(order):
                if (along[k] is not None) == pass_along:
                    full_offsets[k], at = at, at + tensors[i].numel()
        pieces = [flat + full_offsets[k] for k, flat in enumerate(entries) if flat is not None and runs[k] == 1]
        first = tensors[order[0]] if order else None
        bundle = Bundle(
            dtype=first.dtype if first is not None else torch.float32,
            device=first.device if first is not None else torch.device("cpu"),
            entries=entries,
            runs=runs,
            shapes=shapes,
            whole=[
                (d is not None and d.numel() == 0)
                or (
                    flat is not None
                    and flat.numel() * run == tensors[i].numel()
                    and not (scaled[i] and tensors[i].dim() == 1)
                )
                for i, d, flat, run in zip(order, dropped, entries, runs)
            ],
            full_shapes=[tuple(tensors[i].shape) for i in order],
            full_strides=[tuple(tensors[i].stride()) for i in order],
            offsets=offsets,
            full_offsets=full_offsets,
            scaled_rows=scaled_rows,
            elementwise=elementwise,
            scale_rows=elementwise + rows,
            global_index=torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64),  # runs of 1 only
            along=along,
            dropped=dropped,
            full_numel=at,
            by_offset_numel=by_offset_numel,
            scaled_end=scaled_end,
        )
        return bundle, order

    def matches(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` (in bundle order) still have the dtype, device, shapes and strides it was built for."""
        return all(
            t is not None
            and t.dtype == self.dtype
            and t.device == self.device
            and tuple(t.shape) == shape
            and tuple(t.stride()) == stride
            for t, shape, stride in zip(tensors, self.full_shapes, self.full_strides)
        )


class _GatherBundle(torch.autograd.Function):
    """Every tensor of a bundle at its kept entries, rows scaled by ``scale``: one node forward and back."""

    @staticmethod
    def forward(ctx, bundle: Bundle, scale: Tensor | None, unit: bool, *fulls: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        gathered = bundle.gathered_buffer.get(bundle.offsets[-1], bundle.dtype, bundle.device)
        # tensors that keep every entry and take no scale (an all-open layer) are their full tensors
        passed = [
            bundle.whole[i] and (scale is None or unit or bundle.offsets[i] >= bundle.scaled_end)
            for i in range(len(fulls))
        ]
        for i, full in enumerate(fulls):
            piece = gathered[bundle.offsets[i] : bundle.offsets[i + 1]]
            along = bundle.along[i]
            if passed[i]:
                continue
            if along is not None:
                torch.index_select(full, along[0], along[1], out=piece.view(bundle.shapes[i]))
            else:
                run = bundle.runs[i]
                rows = full.as_strided((full.numel() // run, run), (run, 1))
                torch.index_select(rows, 0, bundle.entries[i], out=piece.view(-1, run))
        out = gathered
        if scale is not None and not unit:  # scaled tensors get their own buffer; the others stay views of `gathered`
            out = bundle.scaled_buffer.get(bundle.scaled_end, bundle.dtype, bundle.device)
            _scale_rows(out.copy_(gathered[: bundle.scaled_end]), scale, bundle)
        ctx.bundle, ctx.unit, ctx.passed = bundle, unit, passed
        grad_scale = scale is not None and ctx.needs_input_grad[1]
        scaled_passed = [full for i, full in enumerate(fulls) if passed[i] and bundle.offsets[i] < bundle.scaled_end]
        ctx.save_for_backward(gathered if grad_scale else None, scale, *(scaled_passed if grad_scale else ()))
        ctx.set_materialize_grads(False)
        return tuple(
            fulls[i]
            if passed[i]
            else (out if bundle.offsets[i] < out.numel() else gathered)[bundle.offsets[i] : bundle.offsets[i + 1]].view(
                shape
            )
            for i, shape in enumerate(bundle.shapes)
        )

    @staticmethod
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        bundle: Bundle = ctx.bundle
        gathered, scale, *scaled_passed = ctx.saved_tensors
        values_of = dict(
            zip([i for i, p in enumerate(ctx.passed) if p and bundle.offsets[i] < bundle.scaled_end], scaled_passed)
        )

        def grad_of(i: int) -> Tensor:
            g = grads[i]
            return g if g is not None else torch.zeros(bundle.shapes[i], dtype=bundle.dtype, device=bundle.device)

        n1 = bundle.elementwise
        first = next((i for i, off in enumerate(bundle.offsets) if off >= n1), len(grads))  # 1-D scaled: [0, first)
        ready: list[Tensor] = []
        scale_pieces = []
        if first:
            g1 = torch.cat([grad_of(i).reshape(-1) for i in range(first)])
            if gathered is not None:
                scale_pieces.append(g1 * gathered[:n1])
            if scale is not None and not ctx.unit:
                g1 = g1 * scale[:n1]
            ready += [g1[bundle.offsets[i] : bundle.offsets[i + 1]] for i in range(first)]
        for i in range(first, len(grads)):
            g, rows = grad_of(i), bundle.scaled_rows[i]
            if rows is not None and scale is not None:
                lo, hi = bundle.offsets[i], bundle.offsets[i + 1]
                if gathered is not None:
                    values = values_of[i] if i in values_of else gathered[lo:hi]
                    scale_pieces.append((g.reshape(rows[1], -1) * values.reshape(rows[1], -1)).sum(1))
                if not ctx.unit:
                    g = g * scale[rows[0] : rows[0] + rows[1]].view(-1, *([1] * (g.dim() - 1)))
            ready.append(g)
        full = bundle.grad_buffer.get(bundle.full_numel, bundle.dtype, bundle.device)
        copied = [i for i, along in enumerate(bundle.along) if along is None and not ctx.passed[i]]
        if copied:
            full[: bundle.by_offset_numel].zero_()
        singles = [i for i in copied if bundle.runs[i] == 1]
        if singles:
            index = bundle.global_index
            if len(singles) < sum(a is None and r == 1 for a, r in zip(bundle.along, bundle.runs)):  # some passed
                key = tuple(ctx.passed)
                if key not in bundle.index_cache:
                    bundle.index_cache[key] = torch.cat([bundle.entries[i] + bundle.full_offsets[i] for i in singles])
                index = bundle.index_cache[key]
            full.index_copy_(0, index, torch.cat([ready[i].reshape(-1) for i in singles]))
        for i in copied:
            run = bundle.runs[i]
            if run > 1:
                start = bundle.full_offsets[i]
                rows = full[start : start + math.prod(bundle.full_shapes[i])].view(-1, run)
                rows.index_copy_(0, bundle.entries[i], ready[i].reshape(-1, run))
        grads_full = []
        for i, (shape, stride) in enumerate(zip(bundle.full_shapes, bundle.full_strides)):
            if ctx.passed[i]:
                grads_full.append(ready[i] if ctx.needs_input_grad[3 + i] else None)
                continue
            view = full.as_strided(shape, stride, bundle.full_offsets[i])
            if bundle.along[i] is not None:  # every entry written once: zeros where dropped, the gradient where kept
                dim, index = bundle.along[i]
                view.index_fill_(dim, bundle.dropped[i], 0).index_copy_(dim, index, ready[i])
            grads_full.append(view if ctx.needs_input_grad[3 + i] else None)
        grad_scale = torch.cat(scale_pieces) if gathered is not None and scale_pieces else None
        return None, grad_scale, None, *grads_full


def _scale_rows(flat: Tensor, scale: Tensor, bundle: Bundle) -> None:
    """Multiply, in place, each scaled tensor's rows in the compact buffer ``flat`` by its scales."""
    n = bundle.elementwise
    flat[:n].mul_(scale[:n])
    for i, rows in enumerate(bundle.scaled_rows):
        if rows is not None:
            lo, hi = bundle.offsets[i], bundle.offsets[i + 1]
            flat[lo:hi].view(rows[1], -1).mul_(scale[rows[0] : rows[0] + rows[1], None])


def gather_bundle(
    bundle: Bundle, fulls: Sequence[Tensor], scale: Tensor | None = None, unit: bool = False
) -> tuple[Tensor, ...]:
    """The compact tensors of ``fulls`` (in bundle order), rows scaled by ``scale`` (``bundle.scale_rows`` long).

    Differentiable in ``fulls`` and ``scale``: the gradients of the full-size tensors are zeros
    outside the kept entries and have their tensors' strides. ``unit=True`` promises that every
    scale is exactly 1 (open gates in the limit form): the values are left unscaled, and ``scale``
    still gets its gradient.
    """
    if scale is not None:
        if scale.numel() != bundle.scale_rows:
            raise ValueError(
                f"the scale vector has {scale.numel()} entries, the bundle scales {bundle.scale_rows} rows"
            )
        scale = scale.to(bundle.dtype)
    if torch.is_grad_enabled() and (any(t.requires_grad for t in fulls) or (scale is not None and scale.requires_grad)):
        return _GatherBundle.apply(bundle, scale, unit, *fulls)
    return _GatherBundle.forward(_NoContext(), bundle, scale, unit, *fulls)


class _NoContext:
    """Stands in for autograd's ctx when the gather runs without gradients."""

    needs_input_grad = (False, False)

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def input_channel_scale(weight: Tensor, gate: Tensor, groups: int = 1, transposed: bool = False) -> Tensor:
    """The per-entry scale of a Linear's or conv's ``weight`` that multiplies each input channel by ``gate``.

    A gate on a layer's input is a scale of the weight entries that read that channel: a Linear's
    columns (``[out, in]``), a conv's dim 1 (``[out, in / groups, *k]``), a transposed conv's dim 0
    (``[in, out / groups, *k]``). In a grouped conv, output channel ``o`` reads input channel
    ``(o // (out / groups)) * (in / groups) + j`` through entry ``j`` (a depthwise conv's input
    channel ``c`` scales its rows ``c * m .. c * m + m - 1``). Returned broadcastable to ``weight``.
    """
    ones = [1] * (weight.dim() - 2)
    width = weight.shape[0] if transposed else weight.shape[1] * groups
    if gate.numel() != width:
        raise ValueError(f"{gate.numel()} input gates for a weight of shape {tuple(weight.shape)} with {groups} groups")
    if transposed:
        return gate.view(-1, 1, *ones)
    if groups == 1:
        return gate.view(1, -1, *ones)
    out, per_group = weight.shape[0], weight.shape[1]
    rows = gate.view(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group)
    return rows.view(out, per_group, *ones)


class _UnitScale(torch.autograd.Function):
    """``weight * scale`` where every scale is exactly 1: the weight itself, and the scale's gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return grad, None
        return grad, (grad * weight).sum_to_size(ctx.scale_shape).to(ctx.scale_dtype)


def scale_weight(weight: Tensor, scale: Tensor, unit: bool = False) -> Tensor:
    """``weight * scale`` (``scale`` broadcastable to it), differentiable in both; a weight-sized op.

    ``unit=True`` promises that every scale is exactly 1: no multiply, the weight passes through and
    ``scale`` still gets its gradient, ``sum(grad * weight)`` over the entries it scales.
    """
    if not unit:
        return weight * scale.to(weight.dtype)
    if torch.is_grad_enabled() and scale.requires_grad:
        return _UnitScale.apply(weight, scale)
    return weight


class _KeptGateValues(torch.autograd.Function):
    """The gate values of every group's kept channels, plus a trailing 1 (for ungated channels).

    The values are the open masks (exactly 0/1, the limit form of the gate); the gradient reaching
    a kept channel's ``w`` is the gate's derivative (:func:`~tg_kernels.gate.limit_derivative`,
    ``g(w)``) times the incoming gradient for ``graded`` channels (the open ones, as ``hard`` mode
    gives it) and zero for the others.
    """

    @staticmethod
    def forward(ctx, shape_fn: ShapeFn, kept: Tensor, open_kept: Tensor, graded: Tensor, *weights: Tensor) -> Tensor:  # type: ignore[override]
        w = torch.cat([t.reshape(-1) for t in weights]).index_select(0, kept)
        ctx.shape_fn = shape_fn
        ctx.sizes = [t.numel() for t in weights]
        ctx.save_for_backward(w, kept, graded)
        values = open_kept.to(w.dtype)
        return torch.cat([values, values.new_ones(1)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        w, kept, graded = ctx.saved_tensors
        g = limit_derivative(w, ctx.shape_fn)  # the gate's own backward (tg_kernels.gate)
        local = torch.where(graded, grad[:-1] * g, torch.zeros_like(g))
        full = local.new_zeros(sum(ctx.sizes)).index_copy_(0, kept, local)
        return None, None, None, None, *full.split(ctx.sizes)


def kept_gate_values(
    shape_fn: ShapeFn, weights: Sequence[Tensor], kept: Tensor, open_kept: Tensor, graded: Tensor | None = None
) -> Tensor:
    """Gate values at ``kept`` (indices into the concatenated ``weights``), then a 1; see :class:`_KeptGateValues`.

    ``graded`` (default: ``open_kept``) says which kept channels get ``g(w)`` times the incoming
    gradient: the closed channels of a group kept at full width in ``exact`` training get it too.
    """
    return _KeptGateValues.apply(shape_fn, kept, open_kept, open_kept if graded is None else graded, *weights)


__all__ = [
    "Bundle",
    "gather_bundle",
    "input_channel_scale",
    "is_dense",
    "kept_gate_values",
    "memory_order_entries",
    "scale_weight",
]
