"""Shared math of the skipping layers (docs/design.md §3), written once for Linear and Conv2d.

A layer supplies three primitives through :class:`LayerMath` (forward, input gradient, weight
gradient); this module selects the active output channels, runs the primitives on the smaller
problem, scatters results back and assembles every gradient. Both layers keep the channel
dimension at 1 (``[N, C]`` for Linear, ``[N, C, H, W]`` for Conv2d).

Modes (``mode`` argument): ``"exact"`` (dX from active channels, one full weight-gradient GEMM on
the ungated dy, exact gate gradients for every channel) and ``"hard"`` (active channels only;
closed gates get zero gradient). A channel is active when its gate value is nonzero, so any gate
values (limit form or paper form) give correct results; only exact zeros are skipped.

Cost savers: where :func:`fused_kernels` holds (the native gate_scatter / gate_gather kernels: CUDA
tensors of their dtypes, and CPU), the gate multiply and the expansion to the full-size output are one
:func:`~tg_kernels.ops.gate_scatter.gate_scatter` pass, and gathering dy of the computed channels
with their gates one :func:`~tg_kernels.ops.gate_scatter.gate_gather` pass (except for 0/1 gates on
contiguous CPU tensors: a plain gather into a workspace buffer). Elsewhere (the torch fallback),
with 0/1 gates nothing is multiplied, and closed channels used as padding are computed as zero
weight rows, so a full-size result is one gather from the computed channels (no zero-fill plus
scatter). Where dX and dW share one dy, the layer computes them in one call; on CPU the temporaries
reuse per-thread :class:`Workspace` buffers.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from tg_kernels import _host
from tg_kernels.backends import ALL_FLOATS, BackendUnavailableError, requested_backend, resolve_backend, restore_backend
from tg_kernels.ops import gate_scatter as _fused

MODES = ("exact", "hard")
PAD_MULTIPLE = 8  # computed channel counts (groups == 1) are rounded up to this, padded with closed channels

# Dtypes of this (torch) implementation, which also serves the "cpp" backend: on CPU that is ATen's own
# C++ GEMM/convolution kernels reached through PyTorch ops. Each op module extends its own copy.
SUPPORTED_DTYPES = {"torch": ALL_FLOATS, "cpp": ALL_FLOATS}


class LayerMath:
    """The three dense primitives a skipping layer needs; ``groups`` is the (possibly reduced) group count.

    ``zero_row``: always compute one extra zero channel, so that the full-size output is one gather
    from the computed channels (worth it where the channel dimension is innermost, as in Linear;
    a conv would pay a whole extra output channel instead).
    """

    zero_row: bool = False
    writes_out: bool = False  # forward writes into the `out` buffer it is given

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, out: Tensor | None = None) -> Tensor:
        """The layer output; may be written into `out` (a buffer of the right shape) when given."""
        raise NotImplementedError

    def input_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        raise NotImplementedError

    def weight_grad(self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """(grad_weight, grad_z summed over every dimension but 1)."""
        raise NotImplementedError

    def backward(
        self, grad_z: Tensor, x: Tensor, weight: Tensor, groups: int, need_input: bool, need_weight: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(grad_x, grad_weight, grad_bias) for one dy; a layer may override this to share work."""
        grad_x = self.input_grad(grad_z, x, weight, groups) if need_input else None
        grad_w, grad_b = self.weight_grad(grad_z, x, weight, groups) if need_weight else (None, None)
        return grad_x, grad_w, grad_b


@dataclass(frozen=True)
class Plan:
    """Which weight rows (output channels) and input channels a skipping call computes.

    ``kind`` is ``"dense"`` (every gate nonzero: plain layer), ``"empty"`` (every gate zero) or
    ``"skip"``. For ``"skip"``: ``sel`` lists the weight rows computed; ``pad`` the positions in
    ``sel`` of closed channels, computed as zero rows (padding to a multiple of
    :data:`PAD_MULTIPLE`, or to equal group sizes); ``out_map[c]`` is the position in ``sel`` that
    output channel c reads, a zero row for closed channels (None when there is no zero row: then
    results are scattered, ``unsel`` being the channels to zero); ``in_idx`` the input channels kept (None: all).
    ``binary`` means every gate value is 0 or 1, so no multiplies are needed.
    """

    kind: str
    groups: int
    binary: bool
    closed: Tensor
    sel: Tensor | None = None
    pad: Tensor | None = None
    out_map: Tensor | None = None
    unsel: Tensor | None = None
    in_idx: Tensor | None = None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fetch_host(tensors: list[Tensor | None]) -> None:
    """Make the host values of several gate tensors known with at most one transfer (see :mod:`tg_kernels._host`)."""
    _host.fetch(tensors)


def host_copy(t: Tensor) -> Tensor:
    """`t` (detached) on the host: remembered, derived from its gate module's host copy, or read (one transfer)."""
    return _host.host_values(t).host


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host index tensor on `device` without a synchronisation (pinned, asynchronous copy)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else t.to(device)


def open_input_index(input_gate: Tensor) -> Tensor | None:
    """The input channels whose gate is open, on `input_gate`'s device (None: all open), planned on the host.

    At least one channel is kept. No synchronisation beyond the input gate's host copy; remembered with it.
    """
    values = _host.host_values(input_gate)
    key = ("open_inputs", input_gate.device)
    if key not in values.plans:
        with torch.inference_mode(False):  # remembered beyond an inference-mode caller
            values.plans[key] = _open_index_from_host(values.host, input_gate.device)
    return values.plans[key]


def _open_index_from_host(host: Tensor, device: torch.device) -> Tensor | None:
    open_idx = torch.nonzero(host != 0).flatten()
    if open_idx.numel() == host.numel():
        return None
    if open_idx.numel() == 0:
        open_idx = open_idx.new_zeros(1)
    return _to_device(open_idx, device)


def plan_active(gate: Tensor, groups: int, in_channels: int, zero_row: bool = False) -> Plan:
    """Select the channels to compute: every open one (gate != 0), padded with closed ones as zero rows.

    groups == 1: the open count (plus one if `zero_row`) is rounded up to a multiple of :data:`PAD_MULTIPLE`.
    groups > 1: each group with an open channel keeps the same number k of channels (its open ones
    padded with its closed ones, k = the largest open count of any group) so the smaller conv is
    still a grouped conv; groups with no open channel are dropped, with their input channels.

    Planned on the host from the gate's host values (:func:`tg_kernels._host.host_values`: for the
    output of a limit-form :class:`~tg_kernels.TrainableGate`, its module's host copy, read only when
    the gate weight changed; else at most one transfer per tensor) and remembered with them, so the
    backward of the same call, and every call while the gate weight is unchanged, plans nothing.
    """
    values = _host.host_values(gate)
    key = (groups, in_channels, zero_row, gate.device)
    plan = values.plans.get(key)
    if plan is None:
        with torch.inference_mode(False):  # remembered beyond an inference-mode caller
            plan = values.plans[key] = _plan_from_host(values.host, groups, in_channels, zero_row, gate.device)
    return plan


def _plan_from_host(host: Tensor, groups: int, in_channels: int, zero_row: bool, device: torch.device) -> Plan:
    """:func:`plan_active` on the host values of the gate; index tensors are then moved to `device`."""
    gate = host
    channels = gate.numel()
    is_open = gate != 0
    closed = torch.nonzero(~is_open).flatten()
    binary = bool((~is_open | (gate == 1)).all())
    n_open = channels - closed.numel()
    if n_open == channels:
        return Plan("dense", groups, binary, _to_device(closed, device))
    if n_open == 0:
        return Plan("empty", groups, binary, _to_device(closed, device))
    in_idx = None
    if groups == 1:
        n_keep = min(channels, _round_up(n_open + zero_row, PAD_MULTIPLE))
        keep = is_open.clone()
        keep[closed[: n_keep - n_open]] = True
        sel = torch.nonzero(keep).flatten()
    else:
        per_group = channels // groups
        open_groups = is_open.view(groups, per_group)
        counts = open_groups.sum(1)
        k = int(counts.max())
        active_groups = torch.nonzero(counts).flatten()
        # open channels first (stable sort keeps index order), then closed ones as padding
        order = torch.sort((~open_groups).to(torch.int8), dim=1, stable=True).indices[active_groups, :k]
        sel = torch.sort(order + (active_groups * per_group).view(-1, 1), dim=1).values.flatten()
        if active_groups.numel() < groups:
            in_per_group = in_channels // groups
            offsets = torch.arange(in_per_group).view(1, -1)
            in_idx = (active_groups.view(-1, 1) * in_per_group + offsets).flatten()
        groups = active_groups.numel()
    pad = torch.nonzero(~is_open[sel]).flatten()
    out_map = unsel = None
    if pad.numel():
        out_map = torch.full((channels,), int(pad[0]), dtype=torch.long)
        out_map[sel] = torch.arange(sel.numel())
    else:
        unselected = torch.ones(channels, dtype=torch.bool)
        unselected[sel] = False
        unsel = torch.nonzero(unselected).flatten()
    moved = [_to_device(t, device) if t is not None else None for t in (closed, sel, pad, out_map, unsel, in_idx)]
    return Plan("skip", groups, binary, *moved)


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


def output_format(x: Tensor) -> torch.memory_format:
    """Memory format of a layer output for input `x`: channels_last for channels_last 4-d inputs."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def output_strides(shape: list[int], x: Tensor) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=output_format(x)).stride()


class Workspace(threading.local):
    """Reusable CPU buffers for temporaries that never leave an op, one set per thread.

    Fresh large CPU allocations are page-faulted on first touch on every call, which costs as much
    as the gathers themselves; reusing a buffer avoids that. Buffers above :data:`WORKSPACE_MAX_BYTES`
    are not kept. :func:`clear_workspace` frees the calling thread's buffers.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def take(self, slot: str, shape: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor; valid until the next `take` of the same slot on this thread."""
        numel = math.prod(shape)
        if device.type != "cpu" or numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        if torch.is_inference_mode_enabled():  # a buffer made here would be an inference tensor for good
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self.buffers.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


WORKSPACE_MAX_BYTES = 256 * 2**20
_workspace = Workspace()


def clear_workspace() -> None:
    """Free the calling thread's reusable buffers (see :class:`Workspace`)."""
    _workspace.buffers.clear()


def _index_select(t: Tensor, dim: int, idx: Tensor, slot: str | None) -> Tensor:
    if slot is None:
        return t.index_select(dim, idx)
    shape = list(t.shape)
    shape[dim] = idx.numel()
    return torch.index_select(t, dim, idx, out=_workspace.take(slot, shape, t.dtype, t.device))


def _gather(t: Tensor, dim: int, idx: Tensor, slot: str | None = None) -> Tensor:
    """``t.index_select(dim, idx)`` in one pass, channels_last tensors (activations or weights) staying so.

    With `slot`, the result goes into that workspace slot (a temporary of the caller).
    """
    if output_format(t) == torch.channels_last:  # gather on the contiguous NHWC view
        nhwc = _index_select(t.permute(0, 2, 3, 1), (0, 3, 1, 2)[dim], idx, slot)
        return nhwc.permute(0, 3, 1, 2)
    return _index_select(t, dim, idx, slot)


def _expand(t_sel: Tensor, dim: int, plan: Plan, channels: int) -> Tensor:
    """Full-size tensor along `dim` from the computed channels ``t_sel`` (zero at ``plan.pad``)."""
    if plan.out_map is not None:
        return _gather(t_sel, dim, plan.out_map)
    shape = list(t_sel.shape)
    shape[dim] = channels
    out = torch.empty(shape, dtype=t_sel.dtype, device=t_sel.device, memory_format=output_format(t_sel))
    out.index_copy_(dim, plan.sel, t_sel)
    return out.index_fill_(dim, plan.unsel, 0) if plan.unsel.numel() else out


def fused_kernels(t: Tensor) -> bool:
    """The rule for the fused building blocks: use gate_scatter / gate_gather wherever they run a
    native kernel for t's device and dtype (``cuda`` on CUDA, ``cpp`` on CPU), i.e. unless the torch
    backend is forced or the extension lacks them; there the multi-pass torch sequences run instead."""
    try:
        return all(
            resolve_backend(op, t.device, t.dtype, _fused.supported_dtypes(op)) != "torch"
            for op in ("gate_scatter", "gate_gather")
        )
    except BackendUnavailableError:  # a forced backend without these kernels: the torch sequences
        return False


def _dy_selected(grad_y: Tensor, plan: Plan, gate_sel: Tensor, fused: bool, ungated: bool) -> tuple[Tensor, Tensor]:
    """(dz, dy) of the computed channels: ``grad_y[:, sel] * gate_sel``, and ``grad_y[:, sel]`` if
    `ungated` (else dz again). With 0/1 gates dz serves as dy: they differ only at padding rows, whose
    weight rows are zero and whose gradient rows are zeroed.

    dz is one fused pass, except for 0/1 gates on a contiguous CPU tensor, where a plain gather into
    a reused :class:`Workspace` buffer measures faster (no fresh allocation to fault in).
    """
    plain_gather = plan.binary and grad_y.device.type == "cpu" and output_format(grad_y) != torch.channels_last
    if fused and not plain_gather:
        grad_z_sel = _fused.gate_gather(grad_y, plan.sel, gate_sel)
        grad_y_sel = _gather(grad_y, 1, plan.sel, "grad_y") if ungated and not plan.binary else grad_z_sel
        return grad_z_sel, grad_y_sel
    grad_y_sel = _gather(grad_y, 1, plan.sel, "grad_y")
    return (grad_y_sel if plan.binary else _scaled(grad_y_sel, gate_sel, _channel_view)), grad_y_sel


def _zero_rows(t: Tensor | None, rows: Tensor) -> Tensor | None:
    """`t` with the given rows (dim 0) set to zero, in place (`t` must be owned by the caller)."""
    if t is not None and rows.numel():
        t.index_fill_(0, rows, 0)
    return t


def _selected(weight: Tensor, bias: Tensor | None, plan: Plan) -> tuple[Tensor, Tensor | None]:
    """Weight rows and bias entries of ``plan.sel``, zero for the padding (closed) channels (temporaries)."""
    w_sel = _zero_rows(_gather(weight, 0, plan.sel, "weight"), plan.pad)
    b_sel = _zero_rows(bias.index_select(0, plan.sel), plan.pad) if bias is not None else None
    return w_sel, b_sel


def _scaled(t: Tensor, gate: Tensor, view) -> Tensor:
    """``t * gate`` along the channel dimension (a new tensor)."""
    return t * view(gate.to(t.dtype), t.dim())


def _no_elements(shape: list[int]) -> bool:
    """Whether a tensor of `shape` is empty. (An empty x can still give a non-empty output:
    in_features == 0 gives bias * gate.)"""
    return any(size == 0 for size in shape)


def skip_forward(
    math: LayerMath, x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, groups: int, out_shape: list[int]
) -> Tensor:
    """y = layer(x) * gate along dim 1, computing only the active output channels."""
    strides = output_strides(out_shape, x)
    fused = fused_kernels(x)  # gate_scatter needs no zero row to gather from
    plan = plan_active(gate, groups, weight.shape[1] * groups, math.zero_row and not fused)
    if plan.kind == "empty" or _no_elements(out_shape):
        return torch.empty_strided(out_shape, strides, dtype=x.dtype, device=x.device).zero_()
    if plan.kind == "dense":
        z = math.forward(x, weight, bias, groups)
        return _with_strides(z if plan.binary else z.mul_(_channel_view(gate.to(z.dtype), z.dim())), strides)
    w_sel, b_sel = _selected(weight, bias, plan)
    x_sel = x if plan.in_idx is None else _gather(x, 1, plan.in_idx)
    out_shape_sel = [x.shape[0], plan.sel.numel(), *out_shape[2:]]
    out = _workspace.take("output", out_shape_sel, x.dtype, x.device) if math.writes_out else None
    z = math.forward(x_sel, w_sel, b_sel, plan.groups, out)
    gate_sel = gate.index_select(0, plan.sel)
    if fused:  # padding channels have gate 0, so they come out zero; 0/1 gates multiply exactly
        return _with_strides(_fused.gate_scatter(z, plan.sel, gate_sel, weight.shape[0]), strides)
    if not plan.binary:
        z.mul_(_channel_view(gate_sel.to(z.dtype), z.dim()))
    return _with_strides(_expand(z, 1, plan, weight.shape[0]), strides)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gate_grad(
    weight: Tensor, grad_weight: Tensor, bias: Tensor | None, grad_bias: Tensor, dtype: torch.dtype
) -> Tensor:
    """dgate_c = <W_c, G_c> + b_c * sum(dy_c), from the weight gradient G on the ungated dy."""
    acc = _accumulate_dtype(grad_weight.dtype)
    rows = weight.shape[0]  # row-wise dot products as a batched GEMM: no elementwise temporary
    out = torch.bmm(weight.reshape(rows, 1, -1).to(acc), grad_weight.reshape(rows, -1, 1).to(acc)).view(rows)
    if bias is not None:
        out = out + bias.to(acc) * grad_bias.to(acc)
    return out.to(dtype)


def _gated_param_grads(
    grad_w: Tensor, grad_b: Tensor, gate: Tensor, closed: Tensor, binary: bool
) -> tuple[Tensor, Tensor]:
    """(gate * G, gate * sum(dy)) row-wise, in place on the caller's G and sum(dy)."""
    if binary:
        return _zero_rows(grad_w, closed), _zero_rows(grad_b, closed)
    return grad_w.mul_(_param_view(gate.to(grad_w.dtype), grad_w.dim())), grad_b.mul_(gate.to(grad_b.dtype))


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
    fused = fused_kernels(x)
    plan = plan_active(gate, groups, weight.shape[1] * groups, math.zero_row and not fused)
    grad_x, grad_w, grad_b, grad_gate = (x.new_empty(0) for _ in range(4))  # distinct: outputs must not alias
    if grad_y.numel() == 0 or (plan.kind == "empty" and (mode == "hard" or not need_params)):
        if need_input:
            grad_x = torch.zeros_like(x)
        if need_params:
            grad_w, grad_gate = torch.zeros_like(weight), torch.zeros_like(gate)
            grad_b = torch.zeros_like(bias) if bias is not None else grad_b
        return grad_x, grad_w, grad_b, grad_gate

    # the problem dX is computed on (full or selected channels), its dy, and the weight-gradient problem
    full_wgrad = mode == "exact" or plan.kind == "dense"  # one weight gradient on the full ungated dy
    weight_problem = (grad_y, x, weight, groups)
    if plan.kind == "skip":
        w_sel, b_sel = _selected(weight, bias, plan)
        x_sel = x if plan.in_idx is None else _gather(x, 1, plan.in_idx)
        gate_sel = gate.index_select(0, plan.sel)
        grad_z_sel, grad_y_sel = _dy_selected(grad_y, plan, gate_sel, fused, ungated=not full_wgrad)
        input_problem = (grad_z_sel, x_sel, w_sel, plan.groups)
        if not full_wgrad:  # hard: the weight gradient of the computed channels only, on their ungated dy
            weight_problem = (grad_y_sel, x_sel, w_sel, plan.groups)
    else:
        input_problem = (grad_y if plan.binary else _scaled(grad_y, gate, _channel_view), x, weight, groups)

    need_dx = need_input and plan.kind != "empty"
    grad_x_c = g_w = g_sum = None
    same_problem = plan.binary and (plan.kind == "dense" or not full_wgrad)
    if need_dx and need_params and same_problem:
        # 0/1 gates and the same problem (dense, or hard skip): dz == dy, one backward call
        grad_x_c, g_w, g_sum = math.backward(*weight_problem, True, True)
    else:
        if need_dx:
            grad_x_c = math.backward(*input_problem, True, False)[0]
        if need_params:
            _, g_w, g_sum = math.backward(*weight_problem, False, True)

    if need_input:
        if plan.kind == "empty":
            grad_x = torch.zeros_like(x)
        elif plan.kind == "skip" and plan.in_idx is not None:
            grad_x = torch.zeros_like(x).index_copy_(1, plan.in_idx, grad_x_c)
        else:
            grad_x = _with_strides(grad_x_c, _strides_like(x))

    if need_params:
        if full_wgrad:
            grad_gate = _gate_grad(weight, g_w, bias, g_sum, gate.dtype)
            grad_w, g_sum = _gated_param_grads(g_w, g_sum, gate, plan.closed, plan.binary)
        else:  # hard: active rows only; zero rows give zero gate gradients for the padding
            gate_grad_sel = _gate_grad(w_sel, g_w, b_sel, g_sum, gate.dtype)
            g_w, g_sum = _gated_param_grads(g_w, g_sum, gate_sel, plan.pad, plan.binary)
            channels = weight.shape[0]
            grad_w = _expand(g_w, 0, plan, channels)
            g_sum, grad_gate = _expand(g_sum, 0, plan, channels), _expand(gate_grad_sel, 0, plan, channels)
        grad_w = _with_strides(grad_w.to(weight.dtype), _strides_like(weight))
        if bias is not None:
            grad_b = g_sum.to(bias.dtype)
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
        ctx.backend = requested_backend()  # the backward may run on autograd's device thread

    def backward(ctx, grad_y: Tensor) -> tuple:
        x, weight, bias, gate = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_input, need_params = needs[0], any(needs[1:4])
        with restore_backend(ctx.backend):
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
