"""`Budget`: the paper's resource regulariser, a differentiable function of the gate values.

For every Conv/Linear call the analysis recorded how its FLOPs and parameters depend on its open
input count ``a`` and open output count ``b`` (docs/design.md §2): FLOPs ``= 2 * positions * k * a * b /
groups`` and parameters ``= k * a * b / groups + bias * b``. Open counts are sums of gate values,
which are exactly 0 or 1 with a surrogate gradient, so the resource ``R`` is exact and
differentiable.

Two ways to weigh it against the task loss:

- ``weight=None`` (the default): a multiplier that adapts itself so that the target is reached
  without tuning. The loss is ``lam * |log(R / R_full) - log(target)|``; every training-mode call
  moves ``log(lam)`` by ``rate * clamp(log(R / R_full / target), -1, 1)``: up while the model is
  above its target, down while below. ``lam`` therefore settles at the strength that holds the
  ratio at the target (dual ascent on the constraint, in log space so that it is scale-free: the
  task gradient's scale does not matter, only how long the multiplier takes to find it). The log
  keeps the budget's gradient from fading as the model thins (``d log R = dR / R``).
- ``weight=<number>``: the paper's fixed ``weight * |R / R_full - target|`` (or its square).

Every gate group keeps at least ``min_open`` channels open (``TrainableGate.min_open``, respected by
the forward, ``open_mask()``, ``ratio()`` and ``export`` alike), so the budget cannot close a layer.
:meth:`Budget.settle` makes the last few single-channel moves (the gates closest to their
threshold) that put the ratio within a tolerance of the target; :meth:`Budget.report` and
:meth:`Budget.status` say where training stands.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tg_kernels.pruning.analysis import LayerCost
from tg_kernels.pruning.bank import GateBank, gate_bank

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


@dataclass(frozen=True)
class BudgetStatus:
    """Where a budgeted model stands (from :meth:`Budget.status`)."""

    metric: str
    ratio: float  # current resource / full, for ``metric``
    target: float
    weight: float  # the multiplier now (fixed or adapted)
    kept: dict[str, tuple[int, int]]  # group key -> (open channels, size)
    at_minimum: tuple[str, ...]  # groups held open by min_open (their gates alone would keep fewer)
    closed: tuple[str, ...]  # groups with no open channel (only possible with min_open=0)

    @property
    def error(self) -> float:
        """Relative distance to the target: ``ratio / target - 1``."""
        return self.ratio / self.target - 1.0

    def within(self, tol: float) -> bool:
        """Whether ``|ratio / target - 1| <= tol``."""
        return abs(self.error) <= tol + 1e-12


class Budget(nn.Module):
    """A loss term that pulls a gated model's FLOPs, parameters or kept channels towards a target.

    Args:
        model_or_gates: a model gated by :func:`~tg_kernels.attach_gates` (DDP-wrapped is fine) or
            its :class:`~tg_kernels.pruning.GateBank`.
        target: the wanted fraction of the full model's resource, in (0, 1].
        metric: ``"flops"``, ``"params"`` or ``"channels"`` (kept gated channels).
        weight: ``None`` (default) adapts the multiplier so that the target is reached (see the
            module docstring); a number is the paper's fixed lambda on ``|ratio - target|``.
        penalty: ``"abs"`` (the paper) or ``"square"``, of ``log(ratio / target)`` when adaptive and of
            ``ratio - target`` when the weight is fixed.
        min_open: channels every group keeps open whatever its gates say: an int (default 1: no
            layer ever closes completely), a fraction in (0, 1) of each group's size (rounded up),
            or 0 to allow whole groups to close (then the budget warns when one does). Set on the
            gates (``TrainableGate.min_open``), so the gated model, ``ratio()`` and ``export`` agree.
        initial_weight: the adaptive multiplier's starting value.
        rate: how fast the adaptive multiplier moves, in log units per call at full error. It trades
            speed for overshoot: the gates react to a change of multiplier only after they have
            travelled to their threshold (about ``gate_init / gate_lr`` steps with Adam), and a
            multiplier that grows much in that time overshoots the target before it turns back.

        balance: in ``[0, 1]``: scales each group's push by ``(reference cost / its cost) **
            balance`` (values unchanged): ``0`` the paper's push, ``1`` the same push on every group.
        protect: in ``[0, 1)``: holds a group open once it keeps less than ``protect`` times the
            model-wide open fraction (see :meth:`_bottleneck_term`); ``0``: off.
        gain: a proportional term: the loss is multiplied by ``exp(gain * clamp(log(ratio / goal),
            -1, 1))``, so a ratio that lags its goal is pushed harder at once (adaptive mode only).
        protect_cost: ``"own"`` (default) or ``"mean"``: which cost scales the protection.

    Call the budget once per optimisation step (it returns the loss term, a 0-dim tensor with
    gradients for every gate); in training mode with gradients enabled that call also adapts the
    multiplier. Use :meth:`ratio`, :meth:`status` or :meth:`report` to look without adapting.
    FLOPs and parameters count Conv, Linear and BatchNorm layers as functions of the gates, plus
    the constant cost of everything else that the analysis saw (attention, embeddings, ...).
    """

    log_weight: Tensor

    def __init__(
        self,
        model_or_gates: nn.Module,
        target: float = 0.5,
        metric: str = "flops",
        weight: float | None = None,
        penalty: str = "abs",
        *,
        min_open: int | float = 1,
        initial_weight: float = 0.1,
        rate: float = 0.02,
        balance: float = 0.0,
        protect: float = 0.0,
        gain: float = 0.0,
        protect_cost: str = "own",
    ) -> None:
        super().__init__()
        bank = model_or_gates if isinstance(model_or_gates, GateBank) else gate_bank(model_or_gates)
        if bank.analysis is None:
            raise ValueError("these gates come from a model that could not be analysed; there is nothing to budget")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise ValueError(
                f"target is a fraction of the full model's {metric}: expected 0 < target <= 1, got {target!r}"
            )
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise ValueError(f"weight must be None (adaptive) or a number >= 0, got {weight!r}")
        if penalty not in ("abs", "square"):
            raise ValueError(f"penalty must be 'abs' or 'square', got {penalty!r}")
        if isinstance(balance, bool) or not isinstance(balance, (int, float)) or not 0 <= balance <= 1:
            raise ValueError(f"balance must be a number in [0, 1], got {balance!r}")
        if isinstance(protect, bool) or not isinstance(protect, (int, float)) or not 0 <= protect < 1:
            raise ValueError(f"protect must be a number in [0, 1), got {protect!r}")
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 <= gain < math.inf:
            raise ValueError(f"gain must be a finite number >= 0, got {gain!r}")
        for name, value in (("initial_weight", initial_weight), ("rate", rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        self.gates = [bank]  # a list, so that the bank is not registered twice as a submodule
        self.target = float(target)
        self.goal = float(target)  # what the loss pulls towards now (set_goal anneals it; default: target)
        self.balance = float(balance)
        self.protect = float(protect)
        self.gain = float(gain)
        if protect_cost not in ("mean", "own"):
            raise ValueError(f"protect_cost must be 'mean' or 'own', got {protect_cost!r}")
        self.protect_cost = protect_cost
        self.metric = metric
        self.weight = None if weight is None else float(weight)
        self.penalty = penalty
        self.rate = float(rate)
        self.min_open = min_open
        param = next(iter(bank.parameters()), None)
        device = param.device if param is not None else None
        self.register_buffer("log_weight", torch.tensor(math.log(initial_weight), dtype=torch.float32, device=device))
        held = getattr(bank, "held", set())  # groups kept whole (GateBank.hold)
        minima = {
            key: gate.num_channels if key in held else _minimum(min_open, gate.num_channels)
            for key, gate in bank.gates.items()
        }
        floor = self._ratio_with({key: float(n) for key, n in minima.items()})
        if self.target < floor - 1e-12:
            raise ValueError(
                f"target {self.target} is below the smallest {metric} ratio that min_open={min_open!r} allows "
                f"({floor:.4f}: every group at its minimum); lower min_open or raise the target"
            )
        self.floor = floor  # the smallest ratio the minimum allows
        for key, gate in bank.gates.items():
            gate.min_open = minima[key]
        self._closed_warned: set[str] = set()
        self._may_close = any(gate.min_open == 0 and gate.num_channels for gate in bank.gates.values())

    @property
    def bank(self) -> GateBank:
        return self.gates[0]

    @property
    def adaptive(self) -> bool:
        return self.weight is None

    def current_weight(self) -> float:
        """The multiplier now: the fixed weight, or the adapted one."""
        return self.weight if self.weight is not None else float(self.log_weight.exp())

    # ----------------------------------------------------------------------------------------------
    # counting
    # ----------------------------------------------------------------------------------------------

    def _open_counts(self) -> dict[str, Tensor]:
        return {key: gate().sum() for key, gate in self.bank.gates.items()}

    def _resources(self, counts: dict[str, Tensor | float] | None) -> tuple[Tensor | float, Tensor | float]:
        """(FLOPs, params) with the given open counts per group (None: everything open)."""
        analysis = self.bank.analysis
        flops: Tensor | float = analysis.other_flops
        params: Tensor | float = float(analysis.other_params)
        for layer in analysis.layers:
            a = self._count(layer.in_parts, counts, layer.in_dims)
            b = self._count(layer.out_parts, counts, layer.out_dims)
            pairs = b if layer.depthwise else a * b
            flops = flops + layer.flops_per_pair * pairs
            if layer.count_params:
                params = params + layer.params_per_pair * pairs + layer.bias_per_out * b
        return flops, params

    def _count(self, parts: tuple[tuple[int | None, int, int], ...], counts: dict[str, Tensor | float] | None, dims=()):
        """Open entries of ``parts``; a part with head dims counts ``open heads * open dims`` (per tile)."""

        def opened(space: int | None, size: int) -> Tensor | float:
            key = self.bank.key_of_space.get(space) if space is not None else None
            return counts[key] if counts is not None and key is not None else size

        total: Tensor | float = 0.0
        for i, (space, size, repeat) in enumerate(parts):
            n = opened(space, size)
            inner = dims[i] if dims else ()
            if inner:
                width = sum(s for _, s in inner)
                total = total + n * (repeat // width) * sum(opened(s, m) for s, m in inner)
            else:
                total = total + n * repeat
        return total

    def _ratio_from(self, counts: dict[str, Tensor | float]) -> Tensor | float:
        if self.metric == "channels":
            full = sum(gate.num_channels for gate in self.bank.gates.values())
            return sum(counts.values()) / full if full else 1.0
        flops, params = self._resources(counts)
        full_flops, full_params = self._resources(None)
        current, full = (flops, full_flops) if self.metric == "flops" else (params, full_params)
        return current / full if full else 1.0

    def _ratio_with(self, counts: dict[str, float]) -> float:
        return float(self._ratio_from(counts))

    def ratio(self) -> Tensor:
        """Current resource as a fraction of the full model's (differentiable in the gates).

        Equals what :func:`~tg_kernels.export` produces: both count the channels of
        ``TrainableGate.open_mask()``.
        """
        return torch.as_tensor(self._ratio_from(self._open_counts()))

    # ----------------------------------------------------------------------------------------------
    # the loss
    # ----------------------------------------------------------------------------------------------

    def set_goal(self, goal: float) -> None:
        """Pull towards ``goal`` (a ratio between the target and 1) instead of the target, for now.

        :func:`~tg_kernels.prune` lowers the goal from 1 to the target over the search (the paper's
        gradual target) so that channels close a few at a time while the weights adapt. ``status``,
        ``report`` and ``settle`` always use the final ``target``.
        """
        if isinstance(goal, bool) or not isinstance(goal, (int, float)) or not (0 < goal <= 1):
            raise ValueError(f"goal must be a ratio in (0, 1], got {goal!r}")
        self.goal = max(float(goal), self.target)

    def marginal_costs(self) -> dict[str, float]:
        """``d ratio / d (open channels)`` of every group now: what one more open channel costs."""
        with torch.enable_grad():
            counts = {key: gate().sum().detach().float().requires_grad_(True) for key, gate in self.bank.gates.items()}
            ratio = torch.as_tensor(self._ratio_from(counts))
            if not ratio.requires_grad:
                return {key: 0.0 for key in counts}
            grads = torch.autograd.grad(ratio, list(counts.values()), allow_unused=True)
        return {key: (0.0 if g is None else float(g)) for key, g in zip(counts, grads)}

    def _balanced(self, counts: dict[str, Tensor]) -> dict[str, Tensor]:
        """The counts with each group's gradient scaled by ``(reference cost / its cost) ** balance``.

        Values are unchanged (the ratio stays exact); only the budget's push on each group changes.
        The reference is the channel-weighted geometric mean of the groups' marginal costs, so the
        overall scale (which the adaptive multiplier finds anyway) stays put.
        """
        costs = self.marginal_costs()
        sizes = {key: gate.num_channels for key, gate in self.bank.gates.items()}
        live = {key: c for key, c in costs.items() if c > 0 and sizes[key]}
        if not live:
            return counts
        total = sum(sizes[key] for key in live)
        ref = math.exp(sum(sizes[key] * math.log(c) for key, c in live.items()) / total)
        out = {}
        for key, n in counts.items():
            c = live.get(key)
            if c is None:
                out[key] = n
                continue
            scale = min(max((ref / c) ** self.balance, 1e-2), 1e2)
            out[key] = n.detach() + (n - n.detach()) * scale
        return out

    def forward(self) -> Tensor:
        counts = self._open_counts()
        if self._may_close:
            self._check_closed(counts)
        if self.balance:
            counts = self._balanced(counts)
        ratio = torch.as_tensor(self._ratio_from(counts))
        if self.weight is not None:  # the paper's fixed lambda on the linear gap
            gap = ratio - self.goal
            return self.weight * (gap.abs() if self.penalty == "abs" else gap.square())
        gap = torch.log(ratio.clamp_min(1e-12)) - math.log(self.goal)
        if self.training and torch.is_grad_enabled():  # dual ascent on the multiplier, on the device
            with torch.no_grad():
                step = gap.detach().to(self.log_weight).clamp(-1.0, 1.0) * self.rate
                self.log_weight.add_(step).clamp_(math.log(1e-4), math.log(1e4))
        lam = self.log_weight.exp().to(gap.dtype)
        if self.gain:  # the proportional term: a lagging ratio is pushed harder now, not only once lam has grown
            lam = lam * torch.exp(self.gain * gap.detach().clamp(-1.0, 1.0))
        loss = lam * (gap.abs() if self.penalty == "abs" else gap.square())
        if self.protect and float(gap.detach()) > 0:
            loss = loss + lam * self._bottleneck_term(counts)
        return loss

    def _bottleneck_term(self, counts: dict[str, Tensor]) -> Tensor:
        """A push that holds open the last channels of a group thinner than the others.

        The budget pushes each gate of group ``k`` closed with its marginal cost ``c_k = d log R /
        d n_k``. This term pushes them open with ``protect * c * f_mean / f_k``, where ``f_k = n_k /
        N_k`` is the fraction of the group still open, ``f_mean`` the fraction of all gated channels
        still open, and ``c`` the group's own cost ``c_k`` (``protect_cost="own"``, the default) or
        the channel-weighted mean cost (``"mean"``, the former rule). With its own cost the budget's
        net push on the group is ``c_k * (1 - protect * f_mean / f_k)``: it closes while the group
        keeps more than ``protect`` times the model-wide open fraction and pushes it open below that,
        whatever the group costs. With the mean cost a group stops only when ``c_k * f_k < protect *
        c_mean * f_mean``, so a group three times as costly as the mean (a residual stage's coupled
        group) is held only at a third of that share: on a ResNet-20 the search closed such groups
        to 1 of 16 and 3 of 32 at a 0.125 target while the inner convs stayed full. The task
        gradient of a layer's last channels only grows once the layer already costs accuracy (too
        late on a short search); this is that prior, and the task gradient can still override it.
        ``protect = 0`` leaves each channel's push at its raw marginal cost (the paper's budget).
        """
        costs = self.marginal_costs()
        sizes = {key: self.bank.gates[key].num_channels for key in counts}
        live = [key for key in counts if costs.get(key, 0.0) > 0 and sizes[key]]
        if not live:
            return counts[next(iter(counts))].new_zeros(()) if counts else torch.zeros(())
        opened = {key: float(counts[key].detach()) for key in counts}
        ratio = max(self._ratio_with(opened), 1e-12)
        channels = sum(sizes[key] for key in live)
        c_mean = sum(sizes[key] * costs[key] for key in live) / channels / ratio  # d log R / d n, averaged
        f_mean = sum(opened[key] for key in live) / channels
        total = 0.0
        for key in live:
            own = costs[key] / ratio if self.protect_cost == "own" else c_mean
            total = total - own * sizes[key] * torch.log(counts[key].clamp_min(1.0))
        return self.protect * f_mean * total

    def _check_closed(self, counts: dict[str, Tensor]) -> None:
        for key, count in counts.items():
            gate = self.bank.gates[key]
            if gate.num_channels == 0:
                continue
            closed = float(count.detach()) == 0.0
            if closed and key not in self._closed_warned:
                self._closed_warned.add(key)
                warnings.warn(
                    f"tg_kernels.Budget: gate group '{key}' closed completely ({gate.num_channels} channels, "
                    "min_open=0): layers that read only these channels now get no signal, and a network whose "
                    "every path crosses a closed group outputs a constant. Keep min_open >= 1 to prevent this",
                    RuntimeWarning,
                    stacklevel=3,
                )
            elif not closed:
                self._closed_warned.discard(key)

    # ----------------------------------------------------------------------------------------------
    # landing on the target
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def settle(self, tol: float = 0.01, spread: float = 0.5, fixed: tuple[str, ...] = ()) -> int:
        """Open or close the gates nearest their threshold until ``|ratio / target - 1| <= tol``.

        Training with the budget brings the ratio near the target, where it moves in steps of one
        channel; this makes the last moves deterministically. A move flips, in one group, the open
        gate with the smallest weight (closing) or the closed gate with the largest (opening), never
        below the group's ``min_open`` and never a gate flipped before (so it ends). Each round takes
        the one- or two-flip move that lands within ``tol`` and disturbs the learned gates least
        (the smallest ``|w|`` flipped); failing that, the single flip towards the target, not
        crossing the band, that disturbs the least per unit of ratio it moves (smallest ``|w| /
        |d ratio|``), or, when every flip would cross it, the smallest one. Flipped gates get ``w =
        +-1e-3``. Returns the number of gates flipped; warns when the tolerance could not be reached.

        ``spread`` (in ``[0, 1]``): a closing flip that would leave its group with a smaller open
        fraction than ``spread`` times the model-wide open fraction is taken only when no other move
        is left. Without it, a search that ends far above the target is finished by closing the
        costliest group again and again (each of its channels moves the ratio furthest): a residual
        stage's coupled group went from 11 to 1 of 16 channels in one settle. ``0`` turns this off.

        ``fixed``: keys of groups settle leaves as they are.
        """
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0 <= spread <= 1:
            raise ValueError(f"spread must be a number in [0, 1], got {spread!r}")
        ties = self.bank.tied()  # tied groups (GateBank.tie) move together: one unit per distinct gate
        gates = {key: self.bank.gates[key] for key in ties}
        masks = {key: gate.open_mask().clone() for key, gate in gates.items()}
        weights = {key: gate.weight.detach().clone() for key, gate in gates.items()}
        frozen = {key: torch.zeros_like(m) for key, m in masks.items()}  # flipped once: never again
        counts = {key: float(m.sum()) for key, m in masks.items()}
        eps = 1e-12
        lo, hi = self.target * (1 - tol) - eps, self.target * (1 + tol) + eps

        def candidates():
            """(group, +1 open / -1 close, index, |w|): each group's nearest-threshold flip each way."""
            out = []
            for key, mask in masks.items():
                if any(k in fixed for k in ties[key]):
                    continue
                w = weights[key]
                closable = mask & ~frozen[key]
                if counts[key] > gates[key].min_open and bool(closable.any()):
                    idx = int(torch.where(closable, w, torch.full_like(w, math.inf)).argmin())
                    out.append((key, -1, idx, abs(float(w[idx]))))
                openable = ~mask & ~frozen[key]
                if bool(openable.any()):
                    idx = int(torch.where(openable, w, torch.full_like(w, -math.inf)).argmax())
                    out.append((key, +1, idx, abs(float(w[idx]))))
            return out

        def every_key(unit_counts: dict[str, float]) -> dict[str, float]:
            return {key: unit_counts[unit] for unit, keys in ties.items() for key in keys}

        def ratio_after(moves) -> float:
            trial = dict(counts)
            for key, sign, _, _ in moves:
                trial[key] += sign
            return self._ratio_with(every_key(trial))

        sizes = {key: gate.num_channels for key, gate in gates.items()}
        all_channels = sum(sizes[unit] * len(keys) for unit, keys in ties.items())

        def thins(moves) -> int:
            """How many of ``moves`` close a group below ``spread`` x the model-wide open fraction."""
            if not spread or not all_channels:
                return 0
            trial = dict(counts)
            for key, sign, _, _ in moves:
                trial[key] += sign
            mean = sum(trial[unit] * len(keys) for unit, keys in ties.items()) / all_channels
            return sum(1 for key, sign, _, _ in moves if sign < 0 and trial[key] < spread * mean * sizes[key] - 1e-9)

        flipped = 0
        while True:
            r = self._ratio_with(every_key(counts))
            if lo <= r <= hi:
                break
            cands = candidates()
            if not cands:
                break
            pairs = [(a, b) for i, a in enumerate(cands) for b in cands[i + 1 :] if a[0] != b[0]]
            moves = [((c,), ratio_after((c,))) for c in cands] + [(m, ratio_after(m)) for m in pairs]
            landing = [m for m, after in moves if lo <= after <= hi]
            if landing:
                chosen = min(landing, key=lambda m: (thins(m), sum(c[3] for c in m), len(m)))
            else:
                toward = [(m, after) for m, after in moves if len(m) == 1 and (after < r if r > hi else after > r)]
                if not toward:
                    break
                inside = [(m, after) for m, after in toward if (after > hi if r > hi else after < lo)]
                if inside:  # approach without crossing the band, disturbing the least per unit of ratio
                    chosen = min(inside, key=lambda t: (thins(t[0]), (t[0][0][3] + 1e-3) / abs(t[1] - r)))[0]
                else:  # every flip crosses the band: take the smallest, then come back from the other side
                    chosen = min(toward, key=lambda t: (thins(t[0]), abs(t[1] - r)))[0]
            for key, sign, idx, _ in chosen:
                masks[key][idx] = sign > 0
                frozen[key][idx] = True
                weights[key][idx] = 1e-3 if sign > 0 else -1e-3
                counts[key] += sign
                flipped += 1
        for key, gate in gates.items():
            if not torch.equal(weights[key], gate.weight.detach()):
                gate.weight.copy_(weights[key])
        final = float(self.ratio())
        if not (lo <= final <= hi):
            warnings.warn(
                f"tg_kernels.Budget.settle: the {self.metric} ratio is {final:.4f}, outside {tol:.1%} of the "
                f"target {self.target} (single-channel moves could not land closer)",
                RuntimeWarning,
                stacklevel=2,
            )
        return flipped

    # ----------------------------------------------------------------------------------------------
    # feedback
    # ----------------------------------------------------------------------------------------------

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

    def status(self) -> BudgetStatus:
        """Where training stands: ratio, target, multiplier, kept channels, groups at their minimum."""
        with torch.no_grad():
            ratio = float(self.ratio())
            kept, at_min, closed = {}, [], []
            for info in self.bank.groups:
                gate = self.bank.gates[info.key]
                n = gate.num_open()
                kept[info.key] = (n, info.size)
                if n == 0 and info.size:
                    closed.append(info.key)
                elif gate.min_open and n == gate.min_open:  # it cannot close further
                    at_min.append(info.key)
        return BudgetStatus(self.metric, ratio, self.target, self.current_weight(), kept, tuple(at_min), tuple(closed))

    def report(self, max_groups: int = 20) -> str:
        """A table a person can read: ratio vs target, FLOPs and parameters, kept channels per group."""
        u = self.usage()
        st = self.status()
        lines = [
            f"{self.metric} ratio {st.ratio:.4f}, target {st.target:.4f} ({st.error:+.1%}); "
            f"budget weight {st.weight:.4g} ({'adaptive' if self.adaptive else 'fixed'}), min_open={self.min_open!r}",
            f"{'':<10}{'current':>16}{'full':>16}{'ratio':>8}",
            f"{'FLOPs':<10}{u.flops:>16,.0f}{u.full_flops:>16,.0f}{u.flops / u.full_flops:>8.3f}",
            f"{'params':<10}{u.params:>16,.0f}{u.full_params:>16,.0f}{u.params / u.full_params:>8.3f}",
            f"{'channels':<10}{u.channels:>16,}{u.full_channels:>16,}"
            f"{(u.channels / u.full_channels if u.full_channels else 1.0):>8.3f}",
            "(FLOPs for the example inputs given to attach_gates)",
            "",
            f"{'gate group':<40}{'kept':>8}{'of':>8}  note",
        ]
        for info in self.bank.groups[:max_groups]:
            n, size = st.kept[info.key]
            note = "CLOSED" if info.key in st.closed else "at minimum" if info.key in st.at_minimum else ""
            lines.append(f"{info.key:<40}{n:>8}{size:>8}  {note}".rstrip())
        if len(self.bank.groups) > max_groups:
            lines.append(f"... and {len(self.bank.groups) - max_groups} more groups")
        if st.at_minimum:
            lines.append(f"{len(st.at_minimum)} group(s) held at their minimum: {', '.join(st.at_minimum[:8])}")
        if st.closed:
            lines.append(f"WARNING: {len(st.closed)} group(s) closed completely: {', '.join(st.closed[:8])}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        weight = "adaptive" if self.adaptive else self.weight
        return (
            f"metric={self.metric!r}, target={self.target}, weight={weight}, penalty={self.penalty!r}, "
            f"min_open={self.min_open!r}"
        )


def _minimum(min_open: int | float, size: int) -> int:
    """A group's minimum open count from Budget's ``min_open`` (int count or fraction)."""
    if isinstance(min_open, bool) or not isinstance(min_open, (int, float)):
        raise TypeError(f"min_open must be an int (channels) or a float fraction in (0, 1), got {min_open!r}")
    if isinstance(min_open, int):
        if min_open < 0:
            raise ValueError(f"min_open must be >= 0, got {min_open}")
        return min(min_open, size)
    if not 0 < min_open < 1:
        raise ValueError(f"a fractional min_open must lie in (0, 1), got {min_open!r}")
    return min(size, max(1, math.ceil(min_open * size)))


__all__ = ["METRICS", "Budget", "BudgetStatus", "LayerCost", "Usage"]
