"""`channel_gate(x, gate, dim)`: y = x * gate broadcast along `dim`, fused forward and backward.

Layers of this op, outermost first:

1. :func:`channel_gate` validates arguments and maps any layout onto the canonical
   ``[outer, C, inner]`` contiguous view (no copy for contiguous or channels-last inputs).
2. The custom ops ``tg_kernels::channel_gate`` / ``tg_kernels::channel_gate_backward``
   (torch.library, with fake implementations and autograd) pick a backend at run time. Plain eager
   calls take a shortcut to the same kernels, :class:`_EagerChannelGate` (see :func:`_eager`).
3. Backend kernels: :mod:`tg_kernels.reference` (torch), the C++ ops
   ``tg_kernels::channel_gate_{forward,backward}_kernel`` (cpp on CPU, cuda on CUDA), and
   :mod:`tg_kernels.triton.channel_gate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from tg_kernels import _extension, reference
from tg_kernels.backends import ALL_FLOATS, HALF_AND_SINGLE, requested_backend, resolve_backend, restore_backend

SUPPORTED_DTYPES = {"torch": ALL_FLOATS, "cpp": ALL_FLOATS, "cuda": HALF_AND_SINGLE, "triton": HALF_AND_SINGLE}


def _kernels(backend: str) -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor]]]:
    if backend == "torch":
        return reference.channel_gate_forward, reference.channel_gate_backward
    if backend in ("cpp", "cuda"):
        return torch.ops.tg_kernels.channel_gate_forward_kernel, torch.ops.tg_kernels.channel_gate_backward_kernel
    from tg_kernels.triton import channel_gate as triton_kernels

    return triton_kernels.channel_gate_forward, triton_kernels.channel_gate_backward


def _kernels_for(x: Tensor) -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor]]]:
    """(forward, backward) kernels of the backend chosen for x's device and dtype."""
    return _kernels(resolve_backend("channel_gate", x.device, x.dtype, SUPPORTED_DTYPES))


def _check_kernel_args(x: Tensor, gate: Tensor) -> None:
    """The custom ops' own contract (they are public through torch.ops, so they check it too)."""
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(
            f"tg_kernels::channel_gate takes a contiguous [outer, C, inner] tensor, got shape {tuple(x.shape)}"
        )
    if gate.dim() != 1 or gate.numel() != x.shape[1]:
        raise ValueError(f"tg_kernels::channel_gate takes gate of shape [{x.shape[1]}], got {tuple(gate.shape)}")


@torch.library.custom_op("tg_kernels::channel_gate", mutates_args=())
def _channel_gate_op(x: Tensor, gate: Tensor) -> Tensor:
    _check_kernel_args(x, gate)
    forward, _ = _kernels_for(x)
    return forward(x, gate)


def _forward_fake(x: Tensor, gate: Tensor) -> Tensor:
    _check_kernel_args(x, gate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_channel_gate_op.register_fake(_forward_fake)


@torch.library.custom_op("tg_kernels::channel_gate_backward", mutates_args=())
def _channel_gate_backward_op(grad_y: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    _check_kernel_args(x, gate)
    if grad_y.shape != x.shape or not grad_y.is_contiguous():
        raise ValueError(f"tg_kernels::channel_gate_backward takes a contiguous grad_y of shape {tuple(x.shape)}")
    _, backward = _kernels_for(x)
    return backward(grad_y, x, gate)


def _backward_fake(grad_y: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    _check_kernel_args(x, gate)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(gate)


_channel_gate_backward_op.register_fake(_backward_fake)


def _setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    x, gate = inputs
    ctx.save_for_backward(x, gate)
    ctx.backend = requested_backend()  # the backward may run on autograd's device thread


def _backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None]:
    x, gate = ctx.saved_tensors
    with restore_backend(ctx.backend):
        grad_x, grad_gate = _channel_gate_backward_op(grad_y.contiguous(), x, gate)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_gate if ctx.needs_input_grad[1] else None)


_channel_gate_op.register_autograd(_backward, setup_context=_setup_context)

if _extension.extension() is not None:
    # Fake implementations of the C++ kernel ops, so they too trace and pass opcheck.
    torch.library.register_fake("tg_kernels::channel_gate_forward_kernel", _forward_fake)
    torch.library.register_fake("tg_kernels::channel_gate_backward_kernel", _backward_fake)


class _EagerChannelGate(torch.autograd.Function):
    """Eager autograd for ``tg_kernels::channel_gate``: the same kernels, backend choice and saved tensors.

    The custom op's Python dispatch and autograd layers cost about 200 us a call on a 2-core CPU,
    more than the unfused PyTorch expression's whole forward and backward on small tensors, and
    4-5% of a 16 MB call. This autograd.Function skips them; :func:`_eager` decides when that is
    safe (a plain eager call: no compile, no tracing, no dispatch or function mode, no functorch).
    """

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor) -> Tensor:
        forward, backward = _kernels_for(x)
        ctx.save_for_backward(x, gate)
        ctx.backward_kernel = backward  # chosen with the forward's backend, on the forward's thread
        return forward(x, gate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, gate = ctx.saved_tensors
        backward = ctx.backward_kernel
        grad_x, grad_gate = backward(grad_y.contiguous(), x, gate)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_gate if ctx.needs_input_grad[1] else None)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _eager(x: Tensor, gate: Tensor) -> bool:
    """Whether a call may bypass the custom op: anything that traces or intercepts ops must see it."""
    return (
        type(x) in _PLAIN_TENSOR_TYPES
        and type(gate) in _PLAIN_TENSOR_TYPES
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._is_torch_function_mode_enabled()
        and not is_in_torch_dispatch_mode()
    )


def _check_inputs(x: Tensor, gate: Tensor, dim: int) -> int:
    """Validate user arguments; return `dim` made non-negative."""
    if not isinstance(x, Tensor) or not isinstance(gate, Tensor):
        raise TypeError(f"channel_gate expects tensors x and gate, got {type(x).__name__} and {type(gate).__name__}")
    for name, t in (("x", x), ("gate", gate)):
        if t.dtype not in ALL_FLOATS:
            raise TypeError(f"channel_gate supports float16, bfloat16, float32 and float64; {name} has dtype {t.dtype}")
    if x.dim() == 0:
        raise ValueError("channel_gate needs x with at least one dimension (the channel dimension)")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(
            f"dim {dim} is out of range for x with {x.dim()} dimensions (expected {-x.dim()} to {x.dim() - 1})"
        )
    dim %= x.dim()
    if gate.dim() != 1 or gate.numel() != x.shape[dim]:
        raise ValueError(
            f"gate must hold one value per channel: expected shape [{x.shape[dim]}] (x.shape[{dim}]), "
            f"got {list(gate.shape)}"
        )
    if gate.device != x.device:
        raise ValueError(f"gate is on {gate.device} but x is on {x.device}; move them to the same device")
    return dim


def canonical_view(x: Tensor, dim: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View `x` as contiguous ``[outer, C, inner]`` with C = x.shape[dim]; also return the inverse map.

    Contiguous inputs keep their layout; inputs that are contiguous with `dim` moved last (such
    as channels_last with dim=1) become ``[outer, C, 1]`` without a copy; anything else is copied.
    The inverse map gives outputs the layout of the input.
    """
    channels = x.shape[dim]
    if not x.is_contiguous():
        moved = x.movedim(dim, -1)
        if moved.is_contiguous():
            return moved.view(math.prod(moved.shape[:-1]), channels, 1), lambda y: y.view(moved.shape).movedim(-1, dim)
        x = x.contiguous()
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1 :])
    shape = x.shape
    return x.view(outer, channels, inner), lambda y: y.view(shape)


def channel_gate(x: Tensor, gate: Tensor, dim: int = 1) -> Tensor:
    """Multiply `x` by one gate value per channel along `dim`; differentiable in both.

    One fused pass forward; one fused pass backward gives ``grad_x = grad_y * gate`` and
    ``grad_gate[c] = sum(grad_y * x)`` over every other dimension, accumulated in float32
    (float64 for float64 inputs) in a fixed order, so results are bitwise reproducible.

    Args:
        x: float16, bfloat16, float32 or float64 tensor of any layout (float64 on the torch and
            cpp backends only).
        gate: ``[x.shape[dim]]`` floating tensor on x's device, for example
            ``trainable_gate(w)``; its gradient comes back in its own dtype.
        dim: the channel dimension (default 1, as in NCHW).

    Returns:
        ``x * gate`` broadcast along `dim`, in x's dtype. Contiguous inputs and inputs that are
        contiguous with `dim` moved last (channels_last for dim=1) keep their layout; other
        strided inputs are copied once and the output is contiguous.
    """
    dim = _check_inputs(x, gate, dim)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x3, restore = canonical_view(x, dim)
    gate = gate.to(compute_dtype)
    if not _eager(x3, gate):
        return restore(_channel_gate_op(x3, gate))
    if torch.is_grad_enabled() and (x3.requires_grad or gate.requires_grad):
        return restore(_EagerChannelGate.apply(x3, gate))
    forward, _ = _kernels_for(x3)
    return restore(forward(x3, gate))
