"""Shared math of the skipping layers (DESIGN.md §3), written once for Linear and Conv2d.

A layer supplies three primitives through :class:`LayerMath` (forward, input gradient, weight
gradient); this module selects the active output channels, runs the primitives on the smaller
problem, scatters results back and assembles every gradient. Both layers keep the channel
dimension at 1 (``[N, C]`` for Linear, ``[N, C, H, W]`` for Conv2d).

Modes (``mode`` argument): ``"exact"`` (dX from active channels, one full weight-gradient GEMM on
the ungated dy, exact gate gradients for every channel) and ``"hard"`` (active channels only;
closed gates get zero gradient). A channel is active when its gate value is nonzero, so any gate
values (limit form or paper form) give correct results; only exact zeros are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("exact", "hard")
PAD_MULTIPLE = 8  # active counts are rounded up to this multiple (groups == 1) with closed channels

_HALF_AND_SINGLE = frozenset({torch.float16, torch.bfloat16, torch.float32})
_ALL_FLOATS = _HALF_AND_SINGLE | {torch.float64}
# "cpp" on CPU is ATen's own C++ GEMM/convolution kernels reached through PyTorch ops: the torch
# implementation is that backend's implementation too. Triton/CUDA implementations plug in here.
SUPPORTED_DTYPES = {"torch": _ALL_FLOATS, "cpp": _ALL_FLOATS}


class LayerMath:
    """The three dense primitives a skipping layer needs; ``groups`` is the (possibly reduced) group count."""

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        raise NotImplementedError

    def input_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        raise NotImplementedError

    def weight_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """(grad_weight, grad_z summed over every dimension but 1)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Plan:
    """Which output (and input) channels a skipping call computes.

    ``out_idx`` None means all output channels (dense); an empty ``out_idx`` means none.
    ``in_idx`` None means all input channels; grouped convs drop the inputs of fully closed groups.
    """

    out_idx: Tensor | None
    in_idx: Tensor | None
    groups: int

    @property
    def dense(self) -> bool:
        return self.out_idx is None

    @property
    def empty(self) -> bool:
        return self.out_idx is not None and self.out_idx.numel() == 0


def plan_active(gate: Tensor, groups: int, in_channels: int) -> Plan:
    """Select the channels to compute: every open one (gate != 0), padded with closed ones.

    groups == 1: the open count is rounded up to a multiple of :data:`PAD_MULTIPLE`.
    groups > 1: each group with an open channel keeps the same number k of channels (its open ones
    padded with its closed ones, k = the largest open count of any group) so the smaller conv is
    still a grouped conv; groups with no open channel are dropped, with their input channels.
    Runs on the host (one synchronisation on CUDA).
    """
    channels = gate.numel()
    is_open = gate.detach() != 0
    if groups == 1:
        n_open = int(is_open.sum())
        if n_open == channels:
            return Plan(None, None, 1)
        n_keep = min(channels, -(-n_open // PAD_MULTIPLE) * PAD_MULTIPLE)
        keep = is_open
        if n_keep > n_open:
            closed = torch.nonzero(~is_open).flatten()[: n_keep - n_open]
            keep = is_open.clone()
            keep[closed] = True
        return Plan(torch.nonzero(keep).flatten(), None, 1)
    per_group = channels // groups
    open_groups = is_open.view(groups, per_group)
    counts = open_groups.sum(1)
    k = int(counts.max()) if channels else 0
    active_groups = torch.nonzero(counts).flatten()
    n_groups = active_groups.numel()
    if k == per_group and n_groups == groups:
        return Plan(None, None, groups)
    if k == 0:
        return Plan(torch.zeros(0, dtype=torch.long, device=gate.device), None, groups)
    # open channels first (stable sort keeps index order), then closed ones as padding
    order = torch.sort((~open_groups).to(torch.int8), dim=1, stable=True).indices[active_groups, :k]
    base = (active_groups * per_group).view(-1, 1)
    out_idx = torch.sort(order + base, dim=1).values.flatten()
    in_idx = None
    if n_groups < groups:
        in_per_group = in_channels // groups
        offsets = torch.arange(in_per_group, device=gate.device).view(1, -1)
        in_idx = (active_groups.view(-1, 1) * in_per_group + offsets).flatten()
    return Plan(out_idx, in_idx, n_groups)


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """A [C] tensor shaped to broadcast along dimension 1 of an `ndim`-dimensional tensor."""
    return t.view([1, -1] + [1] * (ndim - 2))


def _param_view(t: Tensor, ndim: int) -> Tensor:
    """A [C] tensor shaped to broadcast along dimension 0 of an `ndim`-dimensional weight."""
    return t.view([-1] + [1] * (ndim - 1))


def _with_strides(t: Tensor, strides: tuple[int, ...]) -> Tensor:
    """`t` with exactly the given strides (copies only when they differ), so fakes can promise them."""
    if t.stride() == strides:
        return t
    out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def _strides_like(ref: Tensor) -> tuple[int, ...]:
    """The strides ``torch.empty_like(ref)`` gives (what the fake implementations return)."""
    return torch.empty_like(ref, device="meta").stride()


def _zeros(shape: list[int], strides: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device).zero_()


def output_format(x: Tensor) -> torch.memory_format:
    """Memory format of a layer output for input `x`: channels_last for channels_last 4-d inputs."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def output_strides(shape: list[int], x: Tensor) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=output_format(x)).stride()


def _select(t: Tensor | None, dim: int, idx: Tensor | None) -> Tensor | None:
    if t is None or idx is None:
        return t
    return t.index_select(dim, idx)


def skip_forward(
    math: LayerMath, x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, groups: int, out_shape: list[int]
) -> Tensor:
    """y = layer(x) * gate along dim 1, computing only the active output channels."""
    strides = output_strides(out_shape, x)
    plan = plan_active(gate, groups, weight.shape[1] * groups)
    if plan.empty or x.numel() == 0:
        return _zeros(out_shape, strides, x)
    w_s, b_s, x_s = _select(weight, 0, plan.out_idx), _select(bias, 0, plan.out_idx), _select(x, 1, plan.in_idx)
    z = math.forward(x_s, w_s, b_s, plan.groups)
    g = _channel_view(_select(gate, 0, plan.out_idx).to(z.dtype), z.dim())
    if plan.dense:
        return _with_strides(z.mul_(g), strides)
    y = _zeros(out_shape, strides, z)
    return y.index_copy_(1, plan.out_idx, z.mul_(g))


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gate_grad(
    weight: Tensor, grad_weight: Tensor, bias: Tensor | None, grad_bias: Tensor, dtype: torch.dtype
) -> Tensor:
    """dgate_c = <W_c, G_c> + b_c * sum(dy_c), from the weight gradient G on the ungated dy."""
    acc = _accumulate_dtype(grad_weight.dtype)
    out = torch.linalg.vecdot(weight.flatten(1).to(acc), grad_weight.flatten(1).to(acc))
    if bias is not None:
        out = out + bias.to(acc) * grad_bias.to(acc)
    return out.to(dtype)


def skip_backward(
    math: LayerMath,
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    groups: int,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_gate) of :func:`skip_forward` under `mode`.

    A gradient that is not needed comes back as an empty tensor; so does grad_bias without bias.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    plan = plan_active(gate, groups, weight.shape[1] * groups)
    grad_x, grad_w, grad_b, grad_gate = (x.new_empty(0) for _ in range(4))  # distinct: outputs must not alias
    ndim = grad_y.dim()
    gate_s = _select(gate, 0, plan.out_idx)
    grad_y_s = _select(grad_y, 1, plan.out_idx)
    batch_empty = x.numel() == 0 or grad_y.numel() == 0

    if need_input:
        if plan.empty or batch_empty:
            grad_x = torch.zeros_like(x)
        else:
            w_s, x_s = _select(weight, 0, plan.out_idx), _select(x, 1, plan.in_idx)
            grad_z_s = grad_y_s * _channel_view(gate_s.to(grad_y.dtype), ndim)
            grad_x_s = math.input_grad(grad_z_s, x_s, w_s, plan.groups)
            if plan.in_idx is None:
                grad_x = _with_strides(grad_x_s, _strides_like(x))
            else:
                grad_x = torch.zeros_like(x).index_copy_(1, plan.in_idx, grad_x_s)

    if need_params:
        full = mode == "exact" and not plan.dense
        if batch_empty:
            g_w, g_sum = torch.zeros_like(weight), grad_y.new_zeros(weight.shape[0])
        elif full or plan.dense:
            g_w, g_sum = math.weight_grad(grad_y, x, weight, groups)
        elif plan.empty:
            g_w, g_sum = None, None
        else:
            g_w, g_sum = math.weight_grad(
                grad_y_s, _select(x, 1, plan.in_idx), _select(weight, 0, plan.out_idx), plan.groups
            )
        if g_w is None:  # hard mode, every gate closed: no task gradient at all
            grad_w, grad_gate = torch.zeros_like(weight), torch.zeros_like(gate)
            grad_b = torch.zeros_like(bias) if bias is not None else grad_b
        elif full or plan.dense or batch_empty:
            grad_w = _with_strides(g_w * _param_view(gate.to(g_w.dtype), weight.dim()), _strides_like(weight))
            grad_gate = _gate_grad(weight, g_w, bias, g_sum, gate.dtype)
            if mode == "hard":  # dense plan in hard mode: closed gates still get no task gradient
                grad_gate = grad_gate * (gate != 0)
            if bias is not None:
                grad_b = (g_sum * gate.to(g_sum.dtype)).to(bias.dtype)
        else:
            g_w_s = g_w * _param_view(gate_s.to(g_w.dtype), weight.dim())
            grad_w = torch.zeros_like(weight).index_copy_(0, plan.out_idx, g_w_s.to(weight.dtype))
            gate_grad_s = _gate_grad(
                _select(weight, 0, plan.out_idx), g_w, _select(bias, 0, plan.out_idx), g_sum, gate.dtype
            )
            gate_grad_s = gate_grad_s * (gate_s != 0)  # padding channels are closed
            grad_gate = torch.zeros_like(gate).index_copy_(0, plan.out_idx, gate_grad_s)
            if bias is not None:
                grad_b = torch.zeros_like(bias).index_copy_(
                    0, plan.out_idx, (g_sum * gate_s.to(g_sum.dtype)).to(bias.dtype)
                )
    return grad_x, grad_w, grad_b, grad_gate


def backward_fakes(
    x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, need_input: bool, need_params: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (meta) outputs of a skipping backward op, with the strides the real one promises."""
    grad_x = torch.empty_like(x) if need_input else x.new_empty(0)
    if not need_params:
        return grad_x, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    grad_b = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return grad_x, torch.empty_like(weight), grad_b, torch.empty_like(gate)


def register_skip_autograd(forward_op, backward_op) -> None:
    """Autograd for a skipping op ``f(x, weight, bias, gate, *params, mode)`` whose backward op is
    ``f_backward(grad_y, x, weight, bias, gate, *params, mode, need_input, need_params)``."""

    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, gate = inputs[:4]
        ctx.save_for_backward(x, weight, bias, gate)
        ctx.params = inputs[4:]

    def backward(ctx, grad_y: Tensor) -> tuple:
        x, weight, bias, gate = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_input, need_params = needs[0], any(needs[1:4])
        grad_x, grad_w, grad_b, grad_gate = backward_op(
            grad_y, x, weight, bias, gate, *ctx.params, need_input, need_params
        )
        return (
            grad_x if need_input else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            grad_gate if needs[3] else None,
        ) + (None,) * len(ctx.params)

    forward_op.register_autograd(backward, setup_context=setup_context)


def check_skip(skip: str) -> None:
    if skip not in ("none", "exact", "hard"):
        raise ValueError(f"skip must be 'none', 'exact' or 'hard', got {skip!r}")


def autocast_inputs(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Cast the layer inputs as autocast would cast them for linear/conv (custom ops are not autocast)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def check_gate(gate: Tensor, channels: int, like: Tensor) -> None:
    if gate.dim() != 1 or gate.numel() != channels:
        raise ValueError(f"gate must have shape [{channels}] (one value per output channel), got {list(gate.shape)}")
    if not gate.dtype.is_floating_point:
        raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
    if gate.device != like.device:
        raise ValueError(f"gate is on {gate.device} but the layer input is on {like.device}")
