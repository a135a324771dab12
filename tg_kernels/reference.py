"""Pure-PyTorch reference implementations: the `torch` backend and the oracle the kernels are tested against.

Kernel-level functions take the canonical layouts that the C++/CUDA/Triton kernels take (see
csrc/tg_kernels.cpp): the channel gate works on ``x: [outer, C, inner]`` contiguous and a float32
(float64 for float64 ``x``) ``gate: [C]``.
"""

from __future__ import annotations

from torch import Tensor


def channel_gate_forward(x: Tensor, gate: Tensor) -> Tensor:
    """y = x * gate[c] on ``x: [outer, C, inner]``, computed in gate's dtype."""
    return (x.to(gate.dtype) * gate.view(1, -1, 1)).to(x.dtype)


def channel_gate_backward(grad_y: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_gate) of :func:`channel_gate_forward`; grad_gate accumulated in gate's dtype."""
    grad_y_wide = grad_y.to(gate.dtype)
    grad_x = (grad_y_wide * gate.view(1, -1, 1)).to(x.dtype)
    grad_gate = (grad_y_wide * x.to(gate.dtype)).sum(dim=(0, 2))
    return grad_x, grad_gate


def channel_gate_unfused(x: Tensor, gate: Tensor, dim: int = 1) -> Tensor:
    """The expression a user writes without this package: ``x * gate`` broadcast along `dim`."""
    shape = [1] * x.ndim
    shape[dim] = -1
    return x * gate.view(shape).to(x.dtype)
