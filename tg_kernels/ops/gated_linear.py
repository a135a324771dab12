"""`gated_linear(x, weight, bias, gate, skip)`: ``linear(x, weight, bias) * gate`` that skips closed channels.

The custom ops ``tg_kernels::gated_linear`` / ``tg_kernels::gated_linear_backward`` take a 2-d
``x: [N, in_features]`` and pick a backend at run time; the math lives in :mod:`tg_kernels.ops._skip`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tg_kernels.backends import HALF_AND_SINGLE, resolve_backend
from tg_kernels.ops import _skip
from tg_kernels.ops.channel_gate import channel_gate


class LinearMath(_skip.LayerMath):
    """Dense Linear primitives on ``x: [N, in]``, ``weight: [out, in]``."""

    zero_row = True
    writes_out = True

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, out: Tensor | None = None) -> Tensor:
        if out is None:
            return F.linear(x, weight, bias)
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)

    def input_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        return torch.mm(grad_z, weight)

    def weight_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        return torch.mm(grad_z.t(), x), grad_z.sum(0)


_MATH = LinearMath()

# Backends implementing the op, with their dtypes. "torch" and "cpp" share the _skip implementation
# ("cpp" on CPU is ATen's own C++ GEMMs reached through PyTorch ops, with the fused C++ gate_scatter /
# gate_gather kernels). "triton" (the default on CUDA tensors) runs the Triton gather-GEMM kernels of
# tg_kernels.triton.gated_linear through _triton_forward / _triton_backward. Another backend plugs in
# with its entry here and a branch in _kernels returning (forward, backward) with those signatures.
SUPPORTED_DTYPES = {**_skip.SUPPORTED_DTYPES, "triton": HALF_AND_SINGLE}


def _torch_forward(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor) -> Tensor:
    return _skip.skip_forward(_MATH, x, weight, bias, gate, 1, [x.shape[0], weight.shape[0]])


def _torch_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _skip.skip_backward(_MATH, grad_y, x, weight, bias, gate, 1, mode, need_input, need_params)


def _triton_forward(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor) -> Tensor:
    from tg_kernels.triton import gated_linear as kernels

    bias = bias.contiguous() if bias is not None else None
    return kernels.gated_linear_forward(x, weight.contiguous(), bias, gate.detach().float().contiguous())


def _triton_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from tg_kernels.triton import gated_linear as kernels

    contiguous_bias = bias.contiguous() if bias is not None else None
    grad_x, grad_w, grad_b, grad_gate = kernels.gated_linear_backward(
        grad_y, x, weight.contiguous(), contiguous_bias, gate.float().contiguous(), mode, need_input, need_params
    )
    if need_params:
        grad_w = _skip._with_strides(grad_w, _skip._strides_like(weight))
        grad_gate = grad_gate.to(gate.dtype)
    return grad_x, grad_w, grad_b, grad_gate


def _kernels(x: Tensor) -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]]:
    """(forward, backward) of the backend that runs on x's device and dtype."""
    if resolve_backend("gated_linear", x.device, x.dtype, SUPPORTED_DTYPES) == "triton":
        return _triton_forward, _triton_backward
    return _torch_forward, _torch_backward  # torch, and cpp (ATen's C++ GEMMs through PyTorch ops)


def _check_args(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, mode: str) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"tg_kernels::gated_linear takes x [N, in] and weight [out, in], got {list(x.shape)} and "
            f"{list(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    _skip.check_gate(gate, weight.shape[0], x)
    if mode not in _skip.MODES:
        raise ValueError(f"mode must be one of {_skip.MODES}, got {mode!r}")


@torch.library.custom_op("tg_kernels::gated_linear", mutates_args=())
def gated_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, mode: str) -> Tensor:
    _check_args(x, weight, bias, gate, mode)
    forward, _ = _kernels(x)
    return forward(x, weight, bias, gate)


@gated_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, mode: str) -> Tensor:
    _check_args(x, weight, bias, gate, mode)
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("tg_kernels::gated_linear_backward", mutates_args=())
def gated_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_args(x, weight, bias, gate, mode)
    _, backward = _kernels(x)
    return backward(grad_y, x, weight, bias, gate, mode, need_input, need_params)


@gated_linear_backward_op.register_fake
def _(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _skip.backward_fakes(x, weight, bias, gate, need_input, need_params)


_skip.register_skip_autograd(gated_linear_op, gated_linear_backward_op)


def gated_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, skip: str = "exact") -> Tensor:
    """``F.linear(x, weight, bias) * gate`` (gate along the last dimension), skipping channels whose gate is 0.

    `skip` is ``"none"`` (dense, then :func:`channel_gate`), ``"exact"`` or ``"hard"`` (docs/design.md §3).
    Without gradients (``torch.no_grad``) every mode skips closed channels.
    """
    _skip.check_skip(skip)
    if skip == "none" and torch.is_grad_enabled():
        return channel_gate(F.linear(x, weight, bias), gate, dim=-1)
    mode = "exact" if skip == "none" else skip
    x, weight, bias = _skip.autocast_inputs(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    y = gated_linear_op(x2.contiguous(), weight, bias, gate, mode)
    return y.view(*x.shape[:-1], weight.shape[0])
