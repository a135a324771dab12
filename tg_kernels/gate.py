"""The trainable gate function of Kim et al. (AAAI 2020) and the module that holds its parameter.

This is the one place where gate math lives (docs/design.md §1). With one scalar ``w`` per channel:

    TG_M(w) = b(w) + s_M(w) * g(w)
    b(w)    = 1 if w >= 0 else 0                 (step)
    s_M(w)  = (M*w - floor(M*w)) / M             (sawtooth: values in [0, 1/M), slope 1)
    g(w)    = gradient-shaping function           (default 1)
    dTG/dw  = g(w) + s_M(w) * g'(w)

The limit form (``M=None``) has value exactly ``b(w)`` and derivative exactly ``g(w)``: exact 0/1
gate values are what lets the kernels skip closed channels. Kernels never evaluate ``g``; they
return ``dL/dgate`` and this module's backward turns it into ``dL/dw``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from tg_kernels import _host

ShapeFn = Callable[[Tensor], Tensor]


def constant_shape(w: Tensor) -> Tensor:
    """g(w) = 1: the straight-through estimator."""
    return torch.ones_like(w)


def gaussian_shape(w: Tensor, sigma: float = 1.0) -> Tensor:
    """g(w) = exp(-w^2 / (2 sigma^2)): a bell around the step, peak 1."""
    return torch.exp(-0.5 * (w / sigma) ** 2)


def triangle_shape(w: Tensor, width: float = 1.0) -> Tensor:
    """g(w) = max(0, 1 - |w| / width): a triangular bump, zero beyond ``width``."""
    return torch.clamp(1.0 - w.abs() / width, min=0.0)


SHAPES: dict[str, ShapeFn] = {
    "constant": constant_shape,
    "gaussian": gaussian_shape,
    "triangle": triangle_shape,
}


def resolve_shape(shape: str | ShapeFn | None) -> ShapeFn:
    """Turn a shape argument (None, a name in :data:`SHAPES`, or a callable) into a callable."""
    if shape is None:
        return constant_shape
    if isinstance(shape, str):
        try:
            return SHAPES[shape]
        except KeyError:
            raise ValueError(f"unknown gate shape {shape!r}; expected one of {sorted(SHAPES)} or a callable") from None
    if callable(shape):
        return shape
    raise TypeError(
        f"shape must be None, a name in {sorted(SHAPES)} or a callable on tensors, got {type(shape).__name__}"
    )


def _check_M(M: float | None) -> None:
    if M is None:
        return
    if isinstance(M, bool) or not isinstance(M, (int, float)):
        raise TypeError(f"M must be a positive number or None (the limit form), got {type(M).__name__}")
    if not (M > 0 and math.isfinite(M)):
        raise ValueError(f"M must be a positive finite number or None (the limit form), got {M}")


def _check_min_open(min_open: int) -> None:
    if isinstance(min_open, bool) or not isinstance(min_open, int) or min_open < 0:
        raise ValueError(f"min_open must be an int >= 0 (gates always kept open), got {min_open!r}")


def _evaluate_shape(shape_fn: ShapeFn, w: Tensor) -> Tensor:
    g = shape_fn(w)
    if not isinstance(g, Tensor):
        raise TypeError(f"the gate shape function must return a tensor, got {type(g).__name__}")
    if g.shape != w.shape:
        try:
            g = g.expand(w.shape)
        except RuntimeError:
            raise ValueError(
                f"the gate shape function returned shape {tuple(g.shape)}, which does not broadcast to w's shape "
                f"{tuple(w.shape)}"
            ) from None
    return g.to(w.dtype)


def limit_derivative(w: Tensor, shape: str | ShapeFn | None = None) -> Tensor:
    """dTG/dw of the limit form (``M=None``) at ``w``: exactly ``g(w)``, in ``w``'s dtype and shape.

    The one definition of the gate's backward: the limit form's autograd function and every fused
    path that evaluates many gates in one node (compact execution's kept gate values) turn the
    gradient reaching the gate values into ``dL/dw = limit_derivative(w) * dL/dgate`` with it.
    """
    return _evaluate_shape(resolve_shape(shape), w)


class _StepWithShapedGradient(torch.autograd.Function):
    """Value ``open`` as 0/1 (exact); gradient g(w) times the incoming gradient."""

    @staticmethod
    def forward(ctx, w: Tensor, shape_fn: ShapeFn, open_: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        ctx.shape_fn = shape_fn
        return open_.to(w.dtype)

    @staticmethod
    def backward(ctx, grad_gate: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        with torch.no_grad():
            g = limit_derivative(w, ctx.shape_fn)
        return grad_gate * g, None, None


def open_mask(w: Tensor, min_open: int = 0) -> Tensor:
    """Which gates are open: ``w >= 0``, and at least the ``min_open`` largest ``w`` (ties: lowest index).

    This is the one definition of "open" (the gate value is exactly 1 there in the limit form). It
    needs no host synchronisation: the ``min_open`` largest entries are found with a stable sort on
    the device whether or not the step alone keeps enough open.
    """
    step = w.detach() >= 0
    k = min(int(min_open), w.numel())
    if k <= 0:
        return step
    # a stable order (ties broken by index) so that every call picks the same channels
    order = torch.sort(w.detach().flatten(), descending=True, stable=True).indices[:k]
    forced = torch.zeros_like(step.flatten()).index_fill_(0, order, True).view_as(step)
    return step | forced


@functools.lru_cache(maxsize=64)
def _segments(sizes: tuple[int, ...], min_opens: tuple[int, ...], device: torch.device) -> tuple[Tensor, ...]:
    """Index tensors of :func:`open_masks` for one layout, made once (no host-to-device copy per call)."""
    with torch.inference_mode(False):  # cached: must not be inference tensors
        n = torch.tensor(sizes, device=device)
        segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), n)
        starts = torch.cumsum(n, 0) - n
        return segment, starts, torch.tensor(min_opens, device=device), torch.arange(sum(sizes), device=device)


def open_masks(weights: list[Tensor], min_opens: list[int]) -> Tensor:
    """:func:`open_mask` of every ``(w, min_open)`` pair, concatenated, in a fixed number of ops.

    Compact execution checks every gate of a model each forward; one gate at a time that is a sort
    per gate. Here one stable sort by value and one by gate order rank each gate's entries (ties:
    lowest index, as in :func:`open_mask`), so the result is the same entry for entry.
    """
    if not weights:
        return torch.zeros(0, dtype=torch.bool)
    with torch.no_grad():
        w = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in weights])
    step = w >= 0
    if not any(k > 0 for k in min_opens):
        return step
    segment, starts, least, positions = _segments(tuple(t.numel() for t in weights), tuple(min_opens), w.device)
    by_value = torch.sort(w, descending=True, stable=True).indices
    order = by_value[torch.sort(segment[by_value], stable=True).indices]  # per gate, largest w first
    owner = segment[order]
    forced_sorted = positions - starts[owner] < least[owner]
    forced = torch.zeros_like(step).index_put_((order,), forced_sorted)
    return step | forced


def trainable_gate(w: Tensor, shape: str | ShapeFn | None = None, M: float | None = None, min_open: int = 0) -> Tensor:
    """Gate values TG(w) for gate parameters `w` (any shape), differentiable in `w`.

    Args:
        w: floating-point tensor of gate parameters; ``w >= 0`` means open.
        shape: the gradient-shaping function g: None (constant 1), a name in :data:`SHAPES`
            (``"constant"``, ``"gaussian"``, ``"triangle"``), or any callable on tensors. The paper
            form differentiates it with autograd, so it must be differentiable there.
        M: None for the limit form (value exactly the step, gradient exactly g), or the paper's
            positive sawtooth frequency M (value within sup|g|/M of the step).
        min_open: keep at least this many gates open (those with the largest ``w``; see
            :func:`open_mask`), whatever their sign; their step is 1 and their gradient still g(w).
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"trainable_gate expects a tensor w, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"trainable_gate expects a floating-point tensor w, got dtype {w.dtype}")
    _check_M(M)
    _check_min_open(min_open)
    shape_fn = resolve_shape(shape)
    is_open = open_mask(w, min_open)
    if M is None:
        return _StepWithShapedGradient.apply(w, shape_fn, is_open)
    step = is_open.to(w.dtype)
    scaled = M * w
    sawtooth = (scaled - torch.floor(scaled)) / M  # floor has zero gradient: slope 1
    return step + sawtooth * _evaluate_shape(shape_fn, w)


class TrainableGate(nn.Module):
    """One trainable gate per channel: holds ``weight`` (shape ``[num_channels]``); calling returns the gates.

    All gates start open: ``weight`` is filled with ``init >= 0``. ``min_open`` gates (those with the
    largest weights) stay open whatever their sign, in the forward and in :meth:`open_mask` alike, so
    that a group never closes completely unless ``min_open=0``; :class:`~tg_kernels.Budget` sets it
    on the gates it budgets.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        shape: str | ShapeFn | None = None,
        M: float | None = None,
        init: float = 0.5,
        min_open: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_min_open(min_open)
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 0:
            raise ValueError(f"num_channels must be a non-negative int, got {num_channels!r}")
        if not (isinstance(init, (int, float)) and math.isfinite(init) and init >= 0):
            raise ValueError(f"init must be a finite number >= 0 so that every gate starts open, got {init!r}")
        _check_M(M)
        resolve_shape(shape)  # validate now rather than at the first forward
        self.shape = shape
        self.M = M
        self.min_open = min_open
        self.weight = nn.Parameter(torch.full((num_channels,), float(init), device=device, dtype=dtype))

    @property
    def num_channels(self) -> int:
        return self.weight.numel()

    def forward(self) -> Tensor:
        values = trainable_gate(self.weight, self.shape, self.M, self.min_open)
        if self.M is None:  # 0/1 values: the skipping layers plan from this module's host copy (no sync)
            _host.track(values, [self])
        return values

    def open_mask(self, weight: Tensor | None = None) -> Tensor:
        """Boolean mask of open gates: ``weight >= 0``, plus the ``min_open`` largest weights.

        The one source of truth for which channels are open: the forward's gate values are exactly 1
        there (limit form) and 0 elsewhere, and :func:`~tg_kernels.export` keeps exactly these.
        ``weight``: a copy of this gate's weight to read instead of the parameter (the host cache of
        :mod:`tg_kernels._host` passes its host copy, so that no device tensor is read).
        """
        return open_mask(self.weight if weight is None else weight, self.min_open)

    def num_open(self) -> int:
        """How many gates are open (synchronises with the device)."""
        return int(self.open_mask().sum())

    def extra_repr(self) -> str:
        shape = (
            self.shape
            if isinstance(self.shape, str) or self.shape is None
            else getattr(self.shape, "__name__", "custom")
        )
        if isinstance(self.shape, partial):
            shape = f"{self.shape.func.__name__}({', '.join(f'{k}={v}' for k, v in self.shape.keywords.items())})"
        extra = f", min_open={self.min_open}" if self.min_open else ""
        return f"{self.num_channels}, shape={shape or 'constant'}, M={self.M}{extra}"
