"""GatedLinear and GatedConv2d: nn.Linear / nn.Conv2d whose outputs are gated per channel, skipping closed ones.

``skip`` (docs/design.md §3): ``"none"`` computes everything densely and gates afterwards; ``"exact"``
skips closed channels in the forward and in dX and still gives every gate its exact gradient
(same gradients as ``"none"``); ``"hard"`` skips closed channels everywhere (their gates get no
task gradient). In eval mode and under ``torch.no_grad`` every mode skips closed channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tg_kernels import _host
from tg_kernels.gate import ShapeFn, TrainableGate
from tg_kernels.ops._skip import check_skip, fetch_host, open_input_index
from tg_kernels.ops.gated_conv import conv2d_open_channels, gated_conv2d
from tg_kernels.ops.gated_linear import gated_linear


def forget_open_sets() -> None:
    """Make every gated layer read its gates again at its next call.

    The layers plan which channels to skip from a host copy of each gate, read again only when the
    gate weight changes as PyTorch sees it: an in-place op on it, a new tensor, a changed
    ``min_open``, or any ``torch.optim`` optimizer step. Call this after changing gate weights in a
    way PyTorch does not see (in place through ``.data``, or from outside PyTorch).
    """
    _host.forget()


class _Gated:
    """What GatedLinear and GatedConv2d share: the gate, the skip mode and their repr."""

    gate: TrainableGate
    skip: str
    training: bool
    # Set by compact execution (tg_kernels.pruning.compact) for one forward: the weights are already
    # the compact, gate-folded ones, so the layer runs as its plain nn layer.
    _tg_compact: bool = False

    def _init_gate(
        self,
        channels: int,
        skip: str,
        gate_shape: str | ShapeFn | None,
        gate_M: float | None,
        gate_init: float,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        check_skip(skip)
        self.skip = skip
        self.gate = TrainableGate(channels, shape=gate_shape, M=gate_M, init=gate_init, device=device, dtype=dtype)

    def _mode(self) -> str:
        """The skip mode for this call: eval mode skips closed channels (with the exact gradients of ``none``)."""
        return "exact" if self.skip == "none" and not self.training else self.skip

    def _gate_repr(self) -> str:
        return f"skip={self.skip!r}, open={self.gate.num_open()}/{self.gate.num_channels}"


class GatedLinear(nn.Linear, _Gated):
    """``nn.Linear`` followed by a trainable gate per output feature; closed features are skipped.

    Args are those of ``nn.Linear`` plus ``skip`` (``"none"``, ``"exact"``, ``"hard"``) and the
    gate options ``gate_shape``, ``gate_M`` and ``gate_init`` of :class:`TrainableGate`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        skip: str = "exact",
        gate_shape: str | ShapeFn | None = None,
        gate_M: float | None = None,
        gate_init: float = 0.5,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_gate(out_features, skip, gate_shape, gate_M, gate_init, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self._tg_compact:
            return F.linear(x, self.weight, self.bias)
        return gated_linear(x, self.weight, self.bias, self.gate(), skip=self._mode())

    @classmethod
    def from_linear(cls, module: nn.Linear, **options) -> GatedLinear:
        """A GatedLinear with `module`'s weights (shared, not copied), device and dtype; gates open."""
        w = module.weight
        gated = cls(
            module.in_features, module.out_features, module.bias is not None, device="meta", dtype=w.dtype, **options
        )
        gated.weight, gated.bias = module.weight, module.bias
        gated.gate = gated.gate.to_empty(device=w.device)
        nn.init.constant_(gated.gate.weight, options.get("gate_init", 0.5))
        return gated

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with this layer's weights (shared, not copied) and no gate."""
        plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._gate_repr()}"


def _drop_closed_inputs(x: Tensor, weight: Tensor, input_gate: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """x and weight without the input channels whose gate is closed (those channels of x are zeros).

    Exact in the forward and for dW; dX of the dropped channels comes back as zero, which is what
    ``hard`` mode and no-grad evaluation need (docs/design.md §3, chains). At least one channel is kept.
    The input gate and the layer's own `gate` reach the host together: from their gate modules' host
    copies (no synchronisation while the gate weights are unchanged, see :mod:`tg_kernels._host`),
    else in one transfer for the whole layer call, backward included.
    Under ``torch.compile`` nothing is dropped (a data-dependent shape would break the graph): the
    closed inputs are zeros, so the result is the same.
    """
    if torch.compiler.is_compiling():
        return x, weight
    fetch_host([input_gate, gate])
    open_idx = open_input_index(input_gate)
    if open_idx is None:
        return x, weight
    return x.index_select(1, open_idx), weight.index_select(1, open_idx)


def _conv_args(m: nn.Conv2d) -> tuple:
    """nn.Conv2d's positional constructor arguments that reproduce `m`'s configuration."""
    bias = m.bias is not None
    return m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias, m.padding_mode


class GatedConv2d(nn.Conv2d, _Gated):
    """``nn.Conv2d`` followed by a trainable gate per output channel; closed channels are skipped.

    Args are those of ``nn.Conv2d`` plus ``skip`` (``"none"``, ``"exact"``, ``"hard"``) and the
    gate options ``gate_shape``, ``gate_M`` and ``gate_init`` of :class:`TrainableGate`. Grouped
    and depthwise convs skip per group (a group with no open channel is dropped entirely).

    ``input_gate`` (None by default; :func:`~tg_kernels.attach_gates` sets it) returns the gates of
    the input channels: closed ones are zeros, so ``hard`` mode and no-grad evaluation drop them.

    ``gate_after_norm=True`` is for a conv followed by a norm layer whose output the same gate
    multiplies (conv -> BN -> gate, as :func:`~tg_kernels.attach_gates` sets it up): the layer does
    not apply the gate itself but skips closed channels where that is exact
    (:func:`~tg_kernels.ops.gated_conv.conv2d_open_channels`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        skip: str = "exact",
        gate_shape: str | ShapeFn | None = None,
        gate_M: float | None = None,
        gate_init: float = 0.5,
        gate_after_norm: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_gate(out_channels, skip, gate_shape, gate_M, gate_init, device, dtype)
        self.gate_after_norm = gate_after_norm
        self.input_gate: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._tg_compact:
            return self._conv_forward(x, self.weight, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):  # other modes, "same", "valid"
            pads = self._reversed_padding_repeated_twice
            if any(pads):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, pads, mode=mode)
            padding = (0, 0)
        weight, gate = self.weight, self.gate()
        if self.input_gate is not None and self.groups == 1 and (self.skip == "hard" or not torch.is_grad_enabled()):
            x, weight = _drop_closed_inputs(x, weight, self.input_gate(x), gate)
        conv = conv2d_open_channels if self.gate_after_norm else gated_conv2d
        return conv(
            x,
            weight,
            self.bias,
            gate,
            list(self.stride),
            list(padding),
            list(self.dilation),
            self.groups,
            skip=self._mode(),
        )

    @classmethod
    def from_conv(cls, module: nn.Conv2d, **options) -> GatedConv2d:
        """A GatedConv2d with `module`'s weights (shared, not copied), device and dtype; gates open."""
        w = module.weight
        gated = cls(*_conv_args(module), device="meta", dtype=w.dtype, **options)
        gated.weight, gated.bias = module.weight, module.bias
        gated.gate = gated.gate.to_empty(device=w.device)
        nn.init.constant_(gated.gate.weight, options.get("gate_init", 0.5))
        return gated

    def extra_repr(self) -> str:
        after_norm = ", gate_after_norm=True" if self.gate_after_norm else ""
        return f"{super().extra_repr()}, {self._gate_repr()}{after_norm}"

    def to_conv(self) -> nn.Conv2d:
        """A plain nn.Conv2d with this layer's weights (shared, not copied) and no gate."""
        plain = nn.Conv2d(*_conv_args(self), device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)
