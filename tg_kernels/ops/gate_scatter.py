"""Fused gather/scatter building blocks of the skipping layers (docs/design.md §3).

* :func:`gate_scatter` ``(z_sel [N, A, *S], sel [A], gate_sel [A], channels) -> y [N, channels, *S]``:
  ``y[:, sel[a]] = z_sel[:, a] * gate_sel[a]`` and every other channel exactly zero, written in
  one pass over ``y`` (the layer output from the active channels only).
* :func:`gate_gather` ``(t [N, C, *S], sel [A], gate_sel [A]) -> t_sel [N, A, *S]``:
  ``t_sel[:, a] = t[:, sel[a]] * gate_sel[a]`` in one pass (grad_y of the active channels, gated).

Both keep the data's dtype, compute the product in float32 (float64 for float64 data), and keep the
data's memory format: a 4-D channels_last input gives a channels_last output; contiguous inputs give
contiguous outputs; any other strided input is read through one contiguous copy (contiguous output).

They are building blocks for code that runs inside other custom ops, so they have no autograd.
Backends (:func:`tg_kernels.backends.resolve_backend`): ``torch`` runs the reference functions of
this module, ``cpp`` / ``cuda`` the C++ ops ``tg_kernels::gate_scatter_kernel`` and
``tg_kernels::gate_gather_kernel`` (csrc/cpu/gate_scatter.cpp, csrc/cuda/gate_scatter.cu), which get
fake implementations here so that they trace under torch.compile and pass opcheck.

Indices: ``sel`` is int64, entries in ``[0, C)``, distinct for the scatter (repeats are fine in the
gather). The cpp backend raises on out-of-range entries and on repeats in the scatter; the torch
backend raises on out-of-range entries (PyTorch's index ops; on CUDA a device-side assert) but not
on repeats; the cuda backend trusts them (checking would synchronise with the host) but never reads
or writes out of bounds: out-of-range entries are dropped by the scatter and give zeros in the
gather, and a channel listed twice in the scatter takes its first position's data.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tg_kernels import _extension
from tg_kernels.backends import ALL_FLOATS, HALF_AND_SINGLE, resolve_backend

__all__ = ["gate_gather", "gate_gather_reference", "gate_scatter", "gate_scatter_reference", "supported_dtypes"]

_KERNEL_OPS = {"gate_scatter": "gate_scatter_kernel", "gate_gather": "gate_gather_kernel"}


@functools.cache
def supported_dtypes(op: str) -> dict[str, frozenset[torch.dtype]]:
    """Backends implementing `op` ("gate_scatter" or "gate_gather") here, with their dtypes.

    ``cpp`` and ``cuda`` count only where the loaded extension registers the kernel (an extension
    built from older sources lacks it; the op then falls back to ``torch`` unless a backend is forced).
    """
    kernel = _KERNEL_OPS[op]
    implemented = {"torch": ALL_FLOATS}
    if _extension.has_kernel(kernel, "CPU"):
        implemented["cpp"] = ALL_FLOATS
    if _extension.has_kernel(kernel, "CUDA"):
        implemented["cuda"] = HALF_AND_SINGLE
    return implemented


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(t: Tensor) -> torch.memory_format:
    """The output format for data `t` (the rule of the C++ kernels): channels_last for 4-D tensors
    that are channels_last and not also contiguous, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _channel_view(g: Tensor, ndim: int) -> Tensor:
    return g.view([1, -1] + [1] * (ndim - 2))


def _with_format(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """`t` with exactly the strides of an empty tensor of that format (copies only if they differ)."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)
    if t.stride() == out.stride():
        return t
    return out.copy_(t)


# --------------------------------------------------------------------------------------------------
# Reference implementations (the torch backend and the oracle of the tests).


def gate_scatter_reference(z_sel: Tensor, sel: Tensor, gate_sel: Tensor, channels: int) -> Tensor:
    """Pure-PyTorch gate-scatter: zeros, then ``index_copy_`` of the gated ``z_sel`` (two passes).

    Same math as the kernels: ``(z_sel in the compute dtype) * gate_sel``, rounded once to z_sel's dtype.
    """
    acc = _compute_dtype(z_sel.dtype)
    values = (z_sel.to(acc) * _channel_view(gate_sel.to(acc), z_sel.dim())).to(z_sel.dtype)
    shape = list(z_sel.shape)
    shape[1] = channels
    out = torch.empty(shape, dtype=z_sel.dtype, device=z_sel.device, memory_format=_memory_format(z_sel))
    return out.zero_().index_copy_(1, sel, values)


def gate_gather_reference(t: Tensor, sel: Tensor, gate_sel: Tensor) -> Tensor:
    """Pure-PyTorch gate-gather: ``index_select`` of the channels, times the gate, in the compute dtype."""
    acc = _compute_dtype(t.dtype)
    memory_format = _memory_format(t)
    if memory_format == torch.channels_last:  # gather along the last (dense) dimension: stays channels_last
        picked = t.permute(0, 2, 3, 1).index_select(3, sel)
        out = (picked.to(acc) * gate_sel.to(acc)).to(t.dtype).permute(0, 3, 1, 2)
    else:
        out = (t.index_select(1, sel).to(acc) * _channel_view(gate_sel.to(acc), t.dim())).to(t.dtype)
    return _with_format(out, memory_format)


# --------------------------------------------------------------------------------------------------
# Fakes of the C++ ops (shapes, dtype, strides as the kernels give them).


def _check_kernel_args(op: str, data: Tensor, sel: Tensor, gate_sel: Tensor) -> None:
    if data.dim() < 2:
        raise RuntimeError(f"tg_kernels::{op}: data must have at least 2 dimensions, got shape {tuple(data.shape)}")
    if sel.dim() != 1 or gate_sel.dim() != 1 or gate_sel.shape[0] != sel.shape[0]:
        raise RuntimeError(
            f"tg_kernels::{op}: sel and gate_sel must be 1-D of equal length, got {tuple(sel.shape)} "
            f"and {tuple(gate_sel.shape)}"
        )


def _gate_scatter_fake(z_sel: Tensor, sel: Tensor, gate_sel: Tensor, channels: int) -> Tensor:
    _check_kernel_args("gate_scatter_kernel", z_sel, sel, gate_sel)
    if sel.shape[0] != z_sel.shape[1] or channels < z_sel.shape[1]:
        raise RuntimeError(
            f"tg_kernels::gate_scatter_kernel: sel must have z_sel.shape[1] = {z_sel.shape[1]} entries and "
            f"channels ({channels}) must be at least that"
        )
    shape = list(z_sel.shape)
    shape[1] = channels
    return torch.empty(shape, dtype=z_sel.dtype, device=z_sel.device, memory_format=_memory_format(z_sel))


def _gate_gather_fake(t: Tensor, sel: Tensor, gate_sel: Tensor) -> Tensor:
    _check_kernel_args("gate_gather_kernel", t, sel, gate_sel)
    shape = list(t.shape)
    shape[1] = sel.shape[0]
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=_memory_format(t))


if _extension.extension() is not None:
    for _name, _fake in (("gate_scatter_kernel", _gate_scatter_fake), ("gate_gather_kernel", _gate_gather_fake)):
        if hasattr(torch.ops.tg_kernels, _name):  # an extension built from older sources lacks the op
            torch.library.register_fake(f"tg_kernels::{_name}", _fake)


# --------------------------------------------------------------------------------------------------
# Public functions.


def _check_inputs(op: str, data_name: str, data: Tensor, sel: Tensor, gate_sel: Tensor) -> None:
    for name, value in ((data_name, data), ("sel", sel), ("gate_sel", gate_sel)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
    if data.dtype not in ALL_FLOATS:
        raise TypeError(f"{op}: {data_name} must be float16, bfloat16, float32 or float64, got {data.dtype}")
    if data.dim() < 2:
        raise ValueError(f"{op}: {data_name} must be [N, channels, *spatial], got shape {list(data.shape)}")
    if sel.dtype != torch.int64 or sel.dim() != 1:
        raise TypeError(f"{op}: sel must be a 1-D int64 tensor, got dtype {sel.dtype} and shape {list(sel.shape)}")
    if not gate_sel.dtype.is_floating_point:
        raise TypeError(f"{op}: gate_sel must be a floating-point tensor, got {gate_sel.dtype}")
    if gate_sel.dim() != 1 or gate_sel.shape[0] != sel.shape[0]:
        raise ValueError(
            f"{op}: gate_sel must have shape [{sel.shape[0]}] (one value per entry of sel), got {list(gate_sel.shape)}"
        )
    for name, value in (("sel", sel), ("gate_sel", gate_sel)):
        if value.device != data.device:
            raise ValueError(f"{op}: {name} is on {value.device} but {data_name} is on {data.device}")


def gate_scatter(z_sel: Tensor, sel: Tensor, gate_sel: Tensor, channels: int) -> Tensor:
    """Scatter the gated active channels into a full-size output, zeros elsewhere, in one pass.

    Args:
        z_sel: ``[N, A, *spatial]`` floating tensor (``[N, A]`` for Linear, ``[N, A, H, W]`` for
            conv), contiguous or channels_last: the layer output computed for the A selected channels.
        sel: int64 ``[A]``, the distinct output channel of each column of z_sel, in ``[0, channels)``.
        gate_sel: ``[A]`` gate value of each selected channel (any floating dtype; the product is
            computed in float32, float64 for float64 z_sel).
        channels: C, the full channel count (``>= A``).

    Returns:
        ``[N, C, *spatial]`` in z_sel's dtype and memory format with ``y[:, sel[a]] =
        z_sel[:, a] * gate_sel[a]`` and every other channel exactly zero. No autograd.
    """
    _check_inputs("gate_scatter", "z_sel", z_sel, sel, gate_sel)
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise TypeError(f"gate_scatter: channels must be an int, got {type(channels).__name__}")
    if sel.shape[0] != z_sel.shape[1]:
        raise ValueError(
            f"gate_scatter: sel must hold one index per channel of z_sel (z_sel.shape[1] = {z_sel.shape[1]}), "
            f"got {sel.shape[0]}"
        )
    if channels < z_sel.shape[1]:
        raise ValueError(f"gate_scatter: channels ({channels}) must be at least z_sel.shape[1] ({z_sel.shape[1]})")
    gate_sel = gate_sel.to(_compute_dtype(z_sel.dtype))
    backend = resolve_backend("gate_scatter", z_sel.device, z_sel.dtype, supported_dtypes("gate_scatter"))
    if backend == "torch":
        return gate_scatter_reference(z_sel, sel, gate_sel, channels)
    return torch.ops.tg_kernels.gate_scatter_kernel(z_sel, sel, gate_sel, channels)


def gate_gather(t: Tensor, sel: Tensor, gate_sel: Tensor) -> Tensor:
    """Gather the selected channels of `t` and multiply each by its gate value, in one pass.

    Args:
        t: ``[N, C, *spatial]`` floating tensor, contiguous or channels_last (e.g. grad_y).
        sel: int64 ``[A]`` channel indices in ``[0, C)`` (repeats allowed).
        gate_sel: ``[A]`` gate value per entry of sel (product in float32, float64 for float64 t).

    Returns:
        ``[N, A, *spatial]`` in t's dtype and memory format, ``t[:, sel[a]] * gate_sel[a]``. No autograd.
    """
    _check_inputs("gate_gather", "t", t, sel, gate_sel)
    gate_sel = gate_sel.to(_compute_dtype(t.dtype))
    backend = resolve_backend("gate_gather", t.device, t.dtype, supported_dtypes("gate_gather"))
    if backend == "torch":
        return gate_gather_reference(t, sel, gate_sel)
    return torch.ops.tg_kernels.gate_gather_kernel(t, sel, gate_sel)
