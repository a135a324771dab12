"""`gated_conv2d(x, weight, bias, gate, ...)`: ``conv2d(x, weight, bias) * gate`` that skips closed channels.

The custom ops ``tg_kernels::gated_conv2d`` / ``tg_kernels::gated_conv2d_backward`` take a 4-d
``x: [N, C_in, H, W]`` (contiguous or channels_last, already padded for non-zero padding modes) and
pick a backend at run time; the math lives in :mod:`tg_kernels.ops._skip`. Grouped convs keep the
same number of channels in every group that has an open channel and drop the other groups with
their input channels (:func:`tg_kernels.ops._skip.plan_active`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tg_kernels import _host
from tg_kernels.backends import requested_backend, resolve_backend, restore_backend
from tg_kernels.ops import _skip
from tg_kernels.ops.channel_gate import channel_gate


class Conv2dMath(_skip.LayerMath):
    """Dense Conv2d primitives for fixed stride, padding and dilation."""

    def __init__(self, stride: list[int], padding: list[int], dilation: list[int]) -> None:
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, out: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _backward(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int, mask: list[bool]) -> tuple:
        return torch.ops.aten.convolution_backward(
            grad_z, x, weight, [weight.shape[0]], self.stride, self.padding, self.dilation, False, [0, 0], groups, mask
        )

    def input_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        return self._backward(grad_z, x, weight, groups, [True, False, False])[0]

    def weight_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        _, grad_w, grad_b = self._backward(grad_z, x, weight, groups, [False, True, True])
        return grad_w, grad_b

    def backward(
        self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int, need_input: bool, need_weight: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self._backward(grad_z, x, weight, groups, [need_input, need_weight, need_weight])


# Backends implementing the op, with their dtypes. "cpp" on CPU is ATen's own convolutions reached
# through PyTorch ops, so it shares the torch implementation, which on CUDA tensors runs cuDNN on the
# gathered weights with the fused CUDA gate_scatter / gate_gather kernels (_skip.fused_kernels). A
# Triton or CUDA implementation plugs in by adding its entry here and a branch in _kernels returning
# (forward, backward) with the signatures of _torch_forward / _torch_backward.
SUPPORTED_DTYPES = dict(_skip.SUPPORTED_DTYPES)


def _torch_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    shape = output_shape(x, weight, stride, padding, dilation)
    return _skip.skip_forward(Conv2dMath(stride, padding, dilation), x, weight, bias, gate, groups, shape)


def _torch_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    math = Conv2dMath(stride, padding, dilation)
    return _skip.skip_backward(math, grad_y, x, weight, bias, gate, groups, mode, need_input, need_params)


def _kernels(x: Tensor) -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]]:
    """(forward, backward) of the backend that runs on x's device and dtype."""
    resolve_backend("gated_conv2d", x.device, x.dtype, SUPPORTED_DTYPES)  # torch or cpp: one implementation
    return _torch_forward, _torch_backward


def _pair(v: int | list[int] | tuple[int, ...]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def output_shape(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int]) -> list[int]:
    sizes = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]
    return [x.shape[0], weight.shape[0], *sizes]


def _check_args(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mode: str,
) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"tg_kernels::gated_conv2d takes 4-d x and weight, got {list(x.shape)} and {list(weight.shape)}"
        )
    if groups < 1 or weight.shape[0] % groups or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x {list(x.shape)} and weight {list(weight.shape)} do not match groups={groups}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError("stride, padding and dilation must have two entries each")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    _skip.check_gate(gate, weight.shape[0], x)
    if mode not in _skip.MODES:
        raise ValueError(f"mode must be one of {_skip.MODES}, got {mode!r}")


@torch.library.custom_op("tg_kernels::gated_conv2d", mutates_args=())
def gated_conv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mode: str,
) -> Tensor:
    _check_args(x, weight, bias, gate, stride, padding, dilation, groups, mode)
    forward, _ = _kernels(x)
    return forward(x, weight, bias, gate, stride, padding, dilation, groups)


@gated_conv2d_op.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mode: str,
) -> Tensor:
    _check_args(x, weight, bias, gate, stride, padding, dilation, groups, mode)
    shape = output_shape(x, weight, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=_skip.output_format(x))


@torch.library.custom_op("tg_kernels::gated_conv2d_backward", mutates_args=())
def gated_conv2d_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_args(x, weight, bias, gate, stride, padding, dilation, groups, mode)
    _, backward = _kernels(x)
    return backward(grad_y, x, weight, bias, gate, stride, padding, dilation, groups, mode, need_input, need_params)


@gated_conv2d_backward_op.register_fake
def _(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _skip.backward_fakes(x, weight, bias, gate, need_input, need_params)


_skip.register_skip_autograd(gated_conv2d_op, gated_conv2d_backward_op)


def _prepare_inputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, caller: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Autocast dtypes, a 4-d check, and x contiguous unless channels_last (what the custom ops take)."""
    x, weight, bias = _skip.autocast_inputs(x, weight, bias)
    if x.dim() != 4:
        raise ValueError(f"{caller} takes a 4-d input [N, C, H, W], got shape {list(x.shape)}")
    if _skip.output_format(x) != torch.channels_last:
        x = x.contiguous()
    return x, weight, bias


def gated_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: int | list[int] = 1,
    padding: int | list[int] = 0,
    dilation: int | list[int] = 1,
    groups: int = 1,
    skip: str = "exact",
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups) * gate`` along dim 1, skipping closed channels.

    `padding` is numeric (pad `x` yourself for other padding modes). `skip` is ``"none"`` (dense,
    then :func:`channel_gate`), ``"exact"`` or ``"hard"`` (docs/design.md §3). Without gradients
    (``torch.no_grad``) every mode skips closed channels.
    """
    _skip.check_skip(skip)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if skip == "none" and torch.is_grad_enabled():
        return channel_gate(F.conv2d(x, weight, bias, stride, padding, dilation, groups), gate, dim=1)
    mode = "exact" if skip == "none" else skip
    x, weight, bias = _prepare_inputs(x, weight, bias, "gated_conv2d")
    return gated_conv2d_op(x, weight, bias, gate, stride, padding, dilation, groups, mode)


class _DenseForwardSkippingBackward(torch.autograd.Function):
    """``F.conv2d`` forward; backward over the open output channels only (closed ones get zero dW rows).

    Exact when the gradient reaching closed output channels is zero, as it is when their gate is
    applied after a per-channel norm layer (docs/design.md §3, conv -> BN -> gate).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias, mask)
        ctx.params = (stride, padding, dilation, groups)
        ctx.backend = requested_backend()  # the backward may run on autograd's device thread
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, bias, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_input, need_params = needs[0], needs[1] or needs[2]
        with restore_backend(ctx.backend):
            grad_x, grad_w, grad_b, _ = gated_conv2d_backward_op(
                grad_y.contiguous(memory_format=_skip.output_format(x)),
                x,
                weight,
                bias,
                mask,
                *ctx.params,
                "hard",
                need_input,
                need_params,
            )
        return (
            grad_x if need_input else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            None,
            None,
            None,
            None,
            None,
        )


def _open_mask_values(values: _host.HostValues) -> _host.HostValues:
    """Host values of ``gate != 0`` from the gate's: the same object (and plans) for 0/1 gates."""
    mask = values.plans.get("open_mask")
    if mask is None:
        with torch.inference_mode(False):
            host = (values.host != 0).to(values.host.dtype)
        mask = values.plans["open_mask"] = values if torch.equal(host, values.host) else _host.HostValues(host)
    return mask


def conv2d_open_channels(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    stride: int | list[int] = 1,
    padding: int | list[int] = 0,
    dilation: int | list[int] = 1,
    groups: int = 1,
    skip: str = "exact",
) -> Tensor:
    """``F.conv2d`` for a conv whose gate is applied later, after a norm layer (conv -> BN -> gate).

    The gate is not applied here: its open set (``gate != 0``, no gradient) says which output
    channels matter. ``skip="none"``: a plain conv. ``"exact"``: a full forward (the norm needs
    every channel's statistics, and closed gates their gradient) and a backward over the open
    channels only, which is exact because the later gate zeros the gradient of closed channels.
    ``"hard"``: closed channels are skipped in the forward too (their outputs are zero). Without
    gradients every mode skips closed channels.
    """
    _skip.check_skip(skip)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if skip == "none" and torch.is_grad_enabled():
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    mask = (gate.detach() != 0).to(gate.dtype)
    if not torch.compiler.is_compiling():  # planned from the gate's host values: no synchronisation of its own
        _host.remember(mask, _open_mask_values(_host.host_values(gate)))
    x, weight, bias = _prepare_inputs(x, weight, bias, "conv2d_open_channels")
    if skip == "exact" and torch.is_grad_enabled():
        return _DenseForwardSkippingBackward.apply(x, weight, bias, mask, stride, padding, dilation, groups)
    return gated_conv2d_op(x, weight, bias, mask, stride, padding, dilation, groups, "hard")
