"""`Budget`: the paper's resource regulariser, a differentiable function of the gate values.

For every Conv/Linear call the analysis recorded how its FLOPs and parameters depend on its open
input count ``a`` and open output count ``b`` (DESIGN.md §2): FLOPs ``= 2 * positions * k * a * b /
groups`` and parameters ``= k * a * b / groups + bias * b``. Open counts are sums of gate values,
which are exactly 0 or 1 with a surrogate gradient, so the resource ``R`` is exact and
differentiable; the loss is ``weight * |R / R_full - target|`` (or its square).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tg_kernels.prune.analysis import LayerCost
from tg_kernels.prune.attach import GateBank, gate_bank

METRICS = ("flops", "params", "channels")


@dataclass(frozen=True)
class Usage:
    """Resource use of a gated model: current (with closed channels removed) and full."""

    flops: float
    full_flops: float
    params: float
    full_params: float
    channels: int
    full_channels: int


class Budget(nn.Module):
    """A loss term that pulls a gated model's FLOPs, parameters or kept channels towards a target.

    Args:
        model_or_gates: a model gated by :func:`~tg_kernels.attach_gates` (DDP-wrapped is fine) or
            its :class:`~tg_kernels.prune.GateBank`.
        target: the wanted fraction of the full model's resource, in (0, 1].
        metric: ``"flops"``, ``"params"`` or ``"channels"`` (kept gated channels).
        weight: the regularisation strength (the paper's lambda).
        penalty: ``"abs"`` for ``|ratio - target|`` (the paper) or ``"square"``.

    Calling the budget returns the loss term (a 0-dim tensor with gradients for every gate).
    FLOPs and parameters count Conv, Linear and BatchNorm layers as functions of the gates, plus
    the constant cost of everything else that the analysis saw (attention, embeddings, ...).
    """

    def __init__(
        self,
        model_or_gates: nn.Module,
        target: float = 0.5,
        metric: str = "flops",
        weight: float = 1.0,
        penalty: str = "abs",
    ) -> None:
        super().__init__()
        bank = model_or_gates if isinstance(model_or_gates, GateBank) else gate_bank(model_or_gates)
        if bank.analysis is None:
            raise ValueError("these gates come from a model that could not be analysed; there is nothing to budget")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise ValueError(
                f"target is a fraction of the full model's {metric}: expected 0 < target <= 1, got {target!r}"
            )
        if not (isinstance(weight, (int, float)) and weight >= 0):
            raise ValueError(f"weight must be a number >= 0, got {weight!r}")
        if penalty not in ("abs", "square"):
            raise ValueError(f"penalty must be 'abs' or 'square', got {penalty!r}")
        self.gates = [bank]  # a list, so that the bank is not registered twice as a submodule
        self.target = float(target)
        self.metric = metric
        self.weight = float(weight)
        self.penalty = penalty

    @property
    def bank(self) -> GateBank:
        return self.gates[0]

    def _open_counts(self) -> dict[str, Tensor]:
        return {key: gate().sum() for key, gate in self.bank.gates.items()}

    def _resources(self, counts: dict[str, Tensor] | None) -> tuple[Tensor | float, Tensor | float]:
        """(FLOPs, params) with the given open counts per group (None: everything open)."""
        analysis = self.bank.analysis
        flops: Tensor | float = analysis.other_flops
        params: Tensor | float = float(analysis.other_params)
        for layer in analysis.layers:
            a = self._count(layer.in_parts, counts)
            b = self._count(layer.out_parts, counts)
            pairs = b if layer.depthwise else a * b
            flops = flops + layer.flops_per_pair * pairs
            if layer.count_params:
                params = params + layer.params_per_pair * pairs + layer.bias_per_out * b
        return flops, params

    def _count(self, parts: tuple[tuple[int | None, int, int], ...], counts: dict[str, Tensor] | None):
        total: Tensor | float = 0.0
        for space, size, repeat in parts:
            key = self.bank.key_of_space.get(space) if space is not None else None
            n = counts[key] if counts is not None and key is not None else size
            total = total + n * repeat
        return total

    def ratio(self) -> Tensor:
        """Current resource as a fraction of the full model's (differentiable in the gates)."""
        if self.metric == "channels":
            counts = self._open_counts()
            full = sum(gate.num_channels for gate in self.bank.gates.values())
            return sum(counts.values()) / full if full else torch.ones(())
        flops, params = self._resources(self._open_counts())
        full_flops, full_params = self._resources(None)
        current, full = (flops, full_flops) if self.metric == "flops" else (params, full_params)
        return torch.as_tensor(current) / full

    def forward(self) -> Tensor:
        gap = self.ratio() - self.target
        return self.weight * (gap.abs() if self.penalty == "abs" else gap.square())

    def usage(self) -> Usage:
        """Current and full FLOPs (for the example inputs), parameters and gated channels."""
        with torch.no_grad():
            counts = self._open_counts()
            flops, params = self._resources(counts)
            full_flops, full_params = self._resources(None)
        return Usage(
            float(flops),
            float(full_flops),
            float(params),
            float(full_params),
            int(sum(float(c) for c in counts.values())),
            sum(gate.num_channels for gate in self.bank.gates.values()),
        )

    def report(self, max_groups: int = 20) -> str:
        """A table a person can read: current vs full FLOPs and parameters, kept channels per group."""
        u = self.usage()
        lines = [
            f"{'':<10}{'current':>16}{'full':>16}{'ratio':>8}",
            f"{'FLOPs':<10}{u.flops:>16,.0f}{u.full_flops:>16,.0f}{u.flops / u.full_flops:>8.3f}",
            f"{'params':<10}{u.params:>16,.0f}{u.full_params:>16,.0f}{u.params / u.full_params:>8.3f}",
            f"{'channels':<10}{u.channels:>16,}{u.full_channels:>16,}"
            f"{(u.channels / u.full_channels if u.full_channels else 1.0):>8.3f}",
            f"target: {self.metric} = {self.target:.3f} (FLOPs for the example inputs given to attach_gates)",
            "",
            f"{'gate group':<40}{'kept':>8}{'of':>8}",
        ]
        for info in self.bank.groups[:max_groups]:
            gate = self.bank.gates[info.key]
            lines.append(f"{info.key:<40}{gate.num_open():>8}{info.size:>8}")
        if len(self.bank.groups) > max_groups:
            lines.append(f"... and {len(self.bank.groups) - max_groups} more groups")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, target={self.target}, weight={self.weight}, penalty={self.penalty!r}"


__all__ = ["METRICS", "Budget", "LayerCost", "Usage"]
