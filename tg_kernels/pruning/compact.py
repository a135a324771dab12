"""Compact execution: a gated model runs its exported structure in the forward (docs/design.md §3).

Per-layer skipping stops at the layer boundary: each gated layer writes its output back at full
width, so the norms, activations, residual adds and the next layer's input between gated layers
run at full width. Compact execution runs the whole model at the open width instead. For each
forward it

1. checks the open set of every gate (one comparison over all gates: one host synchronisation on
   CUDA) and, only when it changed, rebuilds the index tensors (the slicing recipe of
   :mod:`tg_kernels.pruning.slicing`, the same one :func:`~tg_kernels.export` applies once) and
   the compact size attributes of the affected modules;
2. gathers (``index_select``) every tensor the analysis lists from its full-size parameter, so that
   autograd scatters the gradients back into the full-size parameters (closed rows and columns get
   zeros), and folds the gate values differentiably into the producer's weight rows, or into the
   norm's affine parameters after a BatchNorm, so that every open gate gets its task gradient;
3. runs the model's own forward code on those tensors (Gated layers act as plain layers; a gate
   that cannot be folded is applied by its hook on the compact activation);
4. puts the full-size parameters and size attributes back, and writes the updated running statistics
   of open channels back into the full buffers (closed channels' statistics stay unchanged).

The gradients are exactly ``hard`` mode's: compact execution serves ``skip="hard"`` training and
every forward without gradients (eval / ``torch.no_grad``). ``"exact"`` training runs compact too,
plus the closed-channel side pass of :mod:`tg_kernels.pruning.side_pass`, which gives closed gates
their task gradient: every gradient is then ``none`` mode's. A group with a gate point that has no
side-pass recipe runs at full width in ``"exact"`` forwards instead (``full_width`` says which and
why): its closed channels are computed, with gate value 0, and autograd gives their gates the
task gradient. ``"none"`` keeps the per-layer path, and so does ``"exact"`` where the analysis gives
no recipes at all (the torch.fx analysis: ``exact_reason``).

Where compact execution cannot be exact (a model whose code keeps a gated size), the self-check at
attach time (or a failure at run time) says so once, with a warning, and the model runs the
per-layer path from then on.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from tg_kernels import _host
from tg_kernels.gate import open_masks, resolve_shape
from tg_kernels.pruning.bank import GateBank, GateHook, Parts
from tg_kernels.pruning.gather import (
    Bundle,
    gather_bundle,
    input_channel_scale,
    is_dense,
    kept_gate_values,
    scale_weight,
)
from tg_kernels.pruning.side_pass import SidePlan, SideRun, build_plan, full_width_groups
from tg_kernels.pruning.slicing import is_depthwise, kept_channels, kept_entries, size_values, sync_module_attributes

# Activations that commute with a 0/1 (or any non-negative) per-channel scale in value *and* in the
# gradient of that scale: relu(g * z) = g * relu(z). A gate after such an activation can be folded
# into the BatchNorm before it with the same gate gradient; after others (GELU, SiLU, ...) it is
# applied on the compact activation instead.
_HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(eq=False)  # hashed by identity: plans key their rows by fold (deepcopy remaps such keys)
class _Fold:
    """One gate point: where its gate values go in compact execution.

    ``module`` names the module whose ``weight``/``bias`` rows are scaled (None: the hook multiplies
    the compact activation); ``hook`` is the point's GateHook (None for Gated layers, which fold).
    """

    parts: Parts
    module: str | None
    hook: GateHook | None
    repeat: int = 1  # entries per gate (a head's rows share its gate)
    through: bool = False  # folded into a BatchNorm before a homogeneous activation
    dims: tuple[Parts, ...] = ()  # per part: head-dim gates multiplying its entries (GatePoint.dims), or ()
    columns: bool = False  # a gate on ``module``'s input: it scales the weight entries reading each channel


@dataclass
class _SwapSpec:
    """One tensor to replace for a forward: gathered along ``dims``, rows scaled by ``fold``'s gates."""

    target: str
    owner: nn.Module
    attr: str
    dims: list[tuple[int, Tensor]]  # (dim, kept entry indices)
    fold: _Fold | None
    slot: dict[str, Any]  # the owner's _parameters or _buffers
    aliases: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # other modules holding it (tied)
    write_back: tuple[Tensor, Tensor | None] | None = None  # running statistics: (open entries, compact positions)


@dataclass
class _Plan:
    """Everything that depends on the open set only (rebuilt when it changes)."""

    mask: Tensor  # the concatenated open masks it was built for
    kept: dict[str, Tensor]  # group key -> kept channel indices
    # gate values of the kept channels, all groups concatenated, then a 1 (for ungated channels):
    kept_global: Tensor  # their indices into the concatenated gate weights
    open_kept: Tensor  # whether each is open
    grad_kept: Tensor  # whether each gets its gate's task gradient (open, or closed in a full-width group)
    value_offsets: dict[str, int]  # group key -> where its values start
    fold_rows: dict[_Fold, Tensor]  # fold -> its gate vector, as rows of the values
    params: list[tuple[Bundle, list[_SwapSpec], Tensor | None]]  # gathered together, with their scale rows
    unit_scales: list[bool]  # per bundle: every scale is exactly 1 (no closed channel kept as padding)
    buffers: list[_SwapSpec]  # gathered one by one, without gradients
    swaps: list[_SwapSpec]  # every tensor replaced in the forward (params, then buffers)
    attributes: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]  # module, compact values, full values
    build_seconds: float
    side: SidePlan | None = None  # the closed-channel side passes of "exact" training (built on first use)
    side_args: tuple | None = None  # what build_plan needs to make ``side`` (None: no side passes)
    exact: bool = False  # made for "exact" training: full-width groups keep every channel
    unit_hooks: frozenset = frozenset()  # hooked folds whose kept gates are all open (their gate multiplies by 1)


_Swapped = tuple[_SwapSpec, Tensor, Tensor]  # a tensor replaced for one forward: (spec, full, compact)


def take_rows(values: Tensor, rows: Tensor) -> Tensor:
    """``values`` at ``rows``; for ``(2, n)`` rows (heads x head dims) the product of the two."""
    if rows.dim() == 2:
        return values.index_select(0, rows[0]) * values.index_select(0, rows[1])
    return values.index_select(0, rows)


def _key(t: Tensor | None) -> tuple[int, int, int] | None:
    """What identifies a tensor's contents between forwards (in-place changes bump ``_version``).

    Fused optimizers and edits through ``.data`` bypass ``_version``: the cache of compact tensors
    is also keyed on :func:`tg_kernels._host.epoch` (every optimizer step, and
    ``tg_kernels.nn.forget_open_sets()`` after an edit PyTorch cannot see).
    """
    return None if t is None else (id(t), t._version, t.data_ptr())


class _Unsupported(Exception):
    """Raised while planning when compact execution cannot represent the model (the reason is the message)."""


@dataclass
class CompactStats:
    """Counters a user (or a test) can read: how compact execution has been used."""

    forwards: int = 0  # forwards that ran compact
    plans: int = 0  # times the open set changed and index tensors were rebuilt
    last_plan_seconds: float = 0.0  # how long the last rebuild took
    fallbacks: int = 0  # forwards that ran the per-layer path because compact execution was not active
    exact_forwards: int = 0  # "exact" training forwards that ran compact (side passes, full-width groups)


class CompactForward:
    """Replaces a gated model's ``forward`` (an instance attribute): runs it compact when that applies.

    Installed by :func:`~tg_kernels.attach_gates` (``compact=True``, the default). The model's class
    forward is what runs, with compact tensors swapped in; ``bank.compact`` turns it off and on.
    """

    def __init__(self, model: nn.Module, bank: GateBank, inner: Any) -> None:
        self.model = model
        self.bank = bank
        self.inner = inner  # the model's own (bound) forward
        self.enabled = True
        self.disabled_reason: str | None = None
        self.stats = CompactStats()
        self.running = False  # between _enter and _exit: the model's tensors are the compact ones
        # kept channel counts are rounded up to a multiple of this (padded with closed channels, whose
        # outputs are zero) so that tensor cores and algorithm caches see few shapes; None: 8 on CUDA, else 1
        self.round_to: int | None = None
        self._plan: _Plan | None = None
        self._cache: tuple[_Plan, list[tuple[int, int]], list[Tensor]] | None = None  # no-grad compact tensors
        # gate key -> why its group runs at full width in "exact" training (a gate point without a recipe)
        self.full_width: dict[str, str] = full_width_groups(bank.analysis, bank.key_of_space)
        for point in bank.analysis.gate_points:  # head dims: no side-pass recipe (their heads have none either)
            for d in point.dims:
                for key, _ in bank.parts(d):
                    if key is not None:
                        self.full_width.setdefault(key, f"head dims at '{point.module}' (no side-pass recipe)")
        self._norms_together()
        # norms over full-width groups compute open-channel statistics (as on the per-layer path)
        # modules themselves, not their id(): a deepcopy of the model must find its own copies
        self._wide_norms: set[nn.Module] = {
            model.get_submodule(name)
            for name, parts in bank.analysis.norms
            if any(key in self.full_width for key, _ in bank.parts(parts))
        }
        self.full_width_norms: set[nn.Module] = set()  # while an "exact" full-width plan runs: _wide_norms
        self._folds = self._build_folds()
        rows = [fold for fold in self._folds if fold.module and not fold.columns]
        self._scaled = {f"{fold.module}.{t}": fold for fold in rows for t in ("weight", "bias")}
        # input gates folded into their layer's weight (a weight-sized op instead of an activation-sized one)
        self._column_folds = [(fold, model.get_submodule(fold.module)) for fold in self._folds if fold.columns]
        self._column_swapped: list[tuple[nn.Module, Tensor, str]] = []  # (layer, its own weight, its name)
        self._layers = list(bank.gated_layers)
        self._quiet = self._hooks_to_silence()
        self._depthwise = {name for name, m in model.named_modules() if is_depthwise(m)}
        if any(gate.M is not None for gate in bank.gates.values()):
            self.disabled_reason = "paper-form gates (gate_M set) are not exactly 0 for closed channels"
        # why "exact" training keeps the per-layer path (None: it runs compact with side passes)
        self.exact_reason: str | None = (
            None if bank.analysis.tracer == "export" else "the torch.fx analysis gives no side-pass recipes"
        )
        self._side: SideRun | None = None
        # "exact" training runs the closed-channel side pass on every k-th forward, its gradients
        # scaled by k: an unbiased estimate of the closed gates' task gradient at 1/k of its cost (1: every step)
        self.side_pass_every = 1
        self._spare: _Plan | None = None  # the plan of the other kind ("exact" training or not)
        self.__wrapped__ = inner  # so that inspect.signature(model.forward) shows the model's own signature

    # ---- static structure ----
    def _build_folds(self) -> list[_Fold]:
        assert self.bank.analysis is not None
        hooks = {id(h): h for h in self.bank.hooks}
        hook_of: dict[tuple[str, bool], GateHook] = {}  # (module, on its input)
        for name, module in self.model.named_modules():
            for hook in module._forward_hooks.values():
                if id(hook) in hooks:
                    hook_of[name, False] = hook
            for hook in module._forward_pre_hooks.values():
                if id(hook) in hooks:
                    hook_of[name, True] = hook
        folds = []
        for point in self.bank.analysis.gate_points:
            parts = self.bank.parts(point.parts)
            if point.replace:
                folds.append(_Fold(parts, point.module, None, point.repeat))
                continue
            hook = hook_of.get((point.module, point.on_input))
            if point.on_input:
                columns = not point.dims and self._input_foldable(point.module, point.dim)
                if columns and hook is not None and isinstance(self.model.get_submodule(point.module), nn.Linear):
                    hook.columns = True  # (a Linear's gated dim must be its input's last: checked per call)
                folds.append(_Fold(parts, point.module if columns else None, hook, point.repeat, columns=columns))
                continue
            target = self._fold_target(point.module, point.fold)
            through = target is not None and target != point.module
            if through and any(key in self.full_width for key, _ in parts):
                # relu(0 * z) has no gradient in the gate: a full-width group's closed gates need g * relu(z)
                target, through = None, False
            dims = tuple(self.bank.parts(d) for d in point.dims)
            folds.append(_Fold(parts, target, hook, point.repeat, through, dims))
        return folds

    def _fold_target(self, point_module: str, fold: str | None) -> str | None:
        """The module whose rows take a gate at ``point_module`` with the same value and gradient, or None."""
        if fold is None:
            return None
        target = self.model.get_submodule(fold)
        at = self.model.get_submodule(point_module)
        if isinstance(target, _NORMS):
            plain = type(target).forward is nn.modules.batchnorm._BatchNorm.forward  # no activation inside
            if not (plain and target.affine and (point_module == fold or isinstance(at, _HOMOGENEOUS))):
                return None
            return fold
        if isinstance(target, (nn.modules.conv._ConvNd, nn.Linear)) and point_module == fold:
            return fold
        return None

    def _input_foldable(self, module_name: str, dim: int) -> bool:
        """Whether a gate on ``module_name``'s input can scale its weight instead: a Linear gated along
        its last dim, a conv (grouped, depthwise, transposed) along its channel dim."""
        module = self.model.get_submodule(module_name)
        if isinstance(module, nn.Linear):
            return True  # the dim is checked on the input (InputGateHook.columns)
        return isinstance(module, nn.modules.conv._ConvNd) and dim == 1

    @staticmethod
    def _input_is_smaller(fold: _Fold, module: nn.Module) -> bool:
        """Whether a learning input gate costs less on the layer's input than on its weight.

        Folded into the weight, the gate's gradient is a weight-sized product and sum each step; on the
        input, an activation-sized multiply forward and backward. Late layers of a CNN (a 3x3 conv of
        512 channels on 4x4 pixels) read inputs far smaller than their weights. The input's size is
        the one the hook saw in the last compact forward (none yet: the weight).
        """
        seen = getattr(fold.hook, "input_numel", None)
        return seen is not None and seen < module._parameters["weight"].numel()

    def _norms_together(self) -> None:
        """A norm over a full-width group and another group: that one runs at full width too (the
        open-channel statistics of the per-layer path need the whole normalised width)."""
        changed = True
        while changed:
            changed = False
            for name, parts in self.bank.analysis.norms:
                keys = [key for key, _ in self.bank.parts(parts) if key is not None]
                wide = next((key for key in keys if key in self.full_width), None)
                for key in keys:
                    if wide is not None and key not in self.full_width:
                        self.full_width[key] = f"normalised by '{name}' together with {wide} (at full width)"
                        changed = True

    def _hooks_to_silence(self) -> list[nn.Module]:
        """Modules whose only forward hooks are gates folded into rows: compact forwards run them hook-free.

        A module without hooks takes ``nn.Module``'s fast call path; a folded gate's hook would only
        return its input.
        """
        folded = {id(fold.hook) for fold in self._folds if fold.hook is not None and fold.module is not None}
        return [
            module
            for module in self.model.modules()
            if module._forward_hooks and all(id(hook) in folded for hook in module._forward_hooks.values())
        ]

    # ---- when it applies ----
    def active(self) -> bool:
        """Compact execution runs for ``skip="hard"``, for ``"exact"`` where side passes exist, and for
        every forward without gradients."""
        if not self.enabled or self.disabled_reason is not None:
            return False
        skip = self.bank.skip
        return skip == "hard" or not torch.is_grad_enabled() or (skip == "exact" and self.exact_reason is None)

    def _side_active(self) -> bool:
        return self.bank.skip == "exact" and torch.is_grad_enabled() and self.exact_reason is None

    def disable(self, reason: str) -> None:
        """Run the per-layer path from now on, saying why once."""
        if self.disabled_reason is None:
            self.disabled_reason = reason
            warnings.warn(
                f"tg_kernels: compact execution is off for {type(self.model).__name__}: {reason}. The model "
                "runs the per-layer path (correct, slower); bank.compact.disabled_reason keeps the reason.",
                stacklevel=3,
            )

    # ---- the forward ----
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active():
            self.stats.fallbacks += 1
            return self.inner(*args, **kwargs)
        try:
            state = self._enter()
        except _Unsupported as reason:
            self.disable(str(reason))
            return self.inner(*args, **kwargs)
        try:
            out = self.inner(*args, **kwargs)
        except Exception as compact_error:
            self._exit(state, write_back=False)
            out = self.inner(*args, **kwargs)  # a per-layer failure too means the input was at fault: it raises
            self.disable(f"its forward raised {type(compact_error).__name__}: {compact_error}")
            return out
        self._exit(state, write_back=True)
        self.stats.forwards += 1
        return out

    @torch.compiler.disable
    def _enter(self) -> list[_Swapped]:
        plan = self._current_plan()
        values = None
        swapped = self._reuse(plan) if not torch.is_grad_enabled() else None
        if swapped is None:  # (with no_grad and unchanged parameters the last forward's compact tensors serve)
            if not self._tensors_match(plan):  # converted (.to, .double, channels_last) since the plan was built
                plan = self._plan = self._build_plan(plan.mask, plan.exact)
            values = self._gate_values(plan)
            swapped = self._swap_in(plan, values)
            if not torch.is_grad_enabled():
                keys = [_host.epoch(), *(_key(full) for _, full, _ in swapped)]
                self._cache = (plan, keys, [compact for _, _, compact in swapped])
        for spec, _, compact in swapped:
            spec.slot[spec.attr] = compact
            for slot, attr in spec.aliases:
                slot[attr] = compact
        for module, compact, _ in plan.attributes:
            module.__dict__.update(compact)
        self.running = True
        self.full_width_norms = self._wide_norms if plan.exact else set()
        # (module.__dict__ directly: nn.Module.__setattr__ costs more than the rest of this loop)
        for layer in self._layers:
            layer.__dict__["_tg_compact"] = True
        for module in self._quiet:
            module.__dict__["_tg_hooks"] = module._forward_hooks
            module.__dict__["_forward_hooks"] = OrderedDict()
        # a hook multiplying by ones only matters for the gradient it passes to the gates
        gates_learn = torch.is_grad_enabled() and any(g.weight.requires_grad for g in self.bank.gates.values())
        column_scales: dict[str, Tensor] = {}
        on_input: set[_Fold] = set()  # learning input gates applied to the (smaller) input instead
        for fold, module in self._column_folds:
            unit = fold in plan.unit_hooks
            if unit and not gates_learn:
                continue  # every kept gate is 1 and takes no gradient: the weight as it is
            if gates_learn and self._input_is_smaller(fold, module):
                on_input.add(fold)
                continue
            if values is None:
                values = self._gate_values(plan)
            weight = module._parameters["weight"]
            try:
                scale = input_channel_scale(
                    weight,
                    take_rows(values, plan.fold_rows[fold]),
                    getattr(module, "groups", 1),
                    getattr(module, "transposed", False),
                )
            except ValueError as error:
                self._exit(swapped, write_back=False)
                raise _Unsupported(f"the input gates of '{fold.module}' do not match its weight: {error}") from None
            module._parameters["weight"] = scale_weight(weight, scale, unit)
            self._column_swapped.append((module, weight, fold.module))
            if not unit:  # the side pass applies this layer's closed rows to its input: zero padded columns there too
                column_scales[fold.module] = scale.detach()
        for fold in self._folds:
            if fold.hook is not None:
                if (fold.module is not None and fold not in on_input) or (not gates_learn and fold in plan.unit_hooks):
                    fold.hook.compact_gate = None
                else:
                    if values is None:
                        values = self._gate_values(plan)
                    fold.hook.compact_gate = take_rows(values, plan.fold_rows[fold])
                fold.hook.compact = True
        if self._side_active():
            self.stats.exact_forwards += 1
            every = self.side_pass_every
            sampled = gates_learn and self.stats.exact_forwards % every == 1 % every  # the 1st, (k+1)th, ... step
            if sampled and plan.side is None and plan.side_args is not None:
                plan.side = build_plan(*plan.side_args)  # (lazily: hard training and eval never need it)
            if sampled and plan.side is not None and plan.side.passes:
                fulls = {spec.target: full for spec, full, _ in swapped}
                for _, weight, name in self._column_swapped:  # weights not gathered: the unscaled one
                    fulls.setdefault(f"{name}.weight", weight)
                self._side = SideRun(
                    self.model, plan.side, fulls, lambda key: self.bank.gates[key](), every, column_scales
                )
                self._side.install()
        return swapped

    @torch.compiler.disable
    def _exit(self, swapped: list[_Swapped], write_back: bool) -> None:
        plan = self._plan
        assert plan is not None
        for module, weight, _ in reversed(self._column_swapped):
            module._parameters["weight"] = weight
        self._column_swapped.clear()
        if self._side is not None:  # before the silenced hooks are restored: its hooks are among them
            self._side.remove()
            self._side = None
        for fold in self._folds:
            if fold.hook is not None:
                fold.hook.compact = False
                fold.hook.compact_gate = None
        self.running = False
        self.full_width_norms = set()
        for layer in self._layers:
            layer.__dict__["_tg_compact"] = False
        for module in self._quiet:
            added = module._forward_hooks  # hooks registered during the forward, if any, are kept
            module.__dict__["_forward_hooks"] = module.__dict__.pop("_tg_hooks")
            module._forward_hooks.update(added)
        for module, _, full in plan.attributes:
            module.__dict__.update(full)
        with torch.no_grad():
            for spec, full, compact in swapped:
                spec.slot[spec.attr] = full
                for slot, attr in spec.aliases:
                    slot[attr] = full
                # Norms update running statistics in place in training mode (without bumping _version).
                if spec.write_back is not None and write_back and spec.owner.training:
                    entries, positions = spec.write_back
                    values = compact if positions is None else compact.index_select(0, positions)
                    full.index_copy_(0, entries, values.to(full.dtype))

    def _find_aliases(self, specs: list[_SwapSpec]) -> None:
        """Other modules holding the same parameter object (tied weights): they get the compact tensor too."""
        primary = {(id(spec.slot), spec.attr) for spec in specs}
        holders: dict[int, list[tuple[dict[str, Any], str]]] = {}
        for module in self.model.modules():
            for attr, t in module._parameters.items():
                if t is not None and (id(module._parameters), attr) not in primary:
                    holders.setdefault(id(t), []).append((module._parameters, attr))
        for spec in specs:
            spec.aliases = holders.get(id(spec.slot[spec.attr]), [])

    @staticmethod
    def _tensors_match(plan: _Plan) -> bool:
        """Whether the model's tensors still have the dtypes, devices, shapes and strides the plan was made for."""
        return all(bundle.matches([s.slot[s.attr] for s in specs]) for bundle, specs, _ in plan.params) and all(
            spec.slot[spec.attr] is not None for spec in plan.buffers
        )

    def _reuse(self, plan: _Plan) -> list[_Swapped] | None:
        """The cached compact tensors, if they were made for this plan from these exact tensors."""
        if self._cache is None or self._cache[0] is not plan:
            return None
        _, keys, compacts = self._cache
        fulls = [spec.slot[spec.attr] for spec in plan.swaps]
        if [_host.epoch(), *(_key(full) for full in fulls)] != keys:
            return None
        return list(zip(plan.swaps, fulls, compacts))

    def _swap_in(self, plan: _Plan, values: Tensor) -> list[_Swapped]:
        """Every listed tensor with its compact version (parameters in one gather per bundle)."""
        swapped = []
        for (bundle, specs, scale_rows), unit in zip(plan.params, plan.unit_scales):
            fulls = [spec.slot[spec.attr] for spec in specs]
            scale = None if scale_rows is None else take_rows(values, scale_rows)
            swapped += zip(specs, fulls, gather_bundle(bundle, fulls, scale, unit))
        for spec in plan.buffers:
            full = compact = spec.slot[spec.attr]
            for dim, index in spec.dims:
                compact = compact.index_select(dim, index)
            swapped.append((spec, full, compact))
        return swapped

    def _gate_values(self, plan: _Plan) -> Tensor:
        """The gate values of every group's kept channels, concatenated, then a 1 (for ungated channels).

        Open channels get their task gradient (``g(w)`` times the incoming gradient); closed kept
        channels (padding, or a group kept at one channel) get none, as in ``hard`` mode.
        """
        gates = list(self.bank.gates.values())
        shape_fns = {id(resolve_shape(gate.shape)) for gate in gates}
        if len(shape_fns) == 1 and len({(g.weight.dtype, g.weight.device) for g in gates}) == 1:
            weights = [gate.weight for gate in gates]
            return kept_gate_values(
                resolve_shape(gates[0].shape), weights, plan.kept_global, plan.open_kept, plan.grad_kept
            )
        pieces = []  # gates with different shapes, dtypes or devices: one at a time
        for key, gate in self.bank.gates.items():
            g = gate().index_select(0, plan.kept[key])
            graded = plan.grad_kept[plan.value_offsets[key] : plan.value_offsets[key] + g.numel()]
            pieces.append(torch.where(graded.to(g.device), g, g.detach()))
        like = pieces[0]
        return torch.cat([p.to(like.dtype, like.device) for p in pieces] + [like.new_ones(1)])

    @staticmethod
    def _plan_rows(fold: _Fold, value_offsets: dict[str, int], kept: dict[str, Tensor], ones: int) -> Tensor:
        """A gate point's gate vector, entry by entry, as rows of the concatenated values (``ones``: the 1).

        With head dims (``fold.dims``) two rows per entry, ``(2, entries)``: the head's gate and the
        head dim's, whose product is the entry's gate (:func:`take_rows`). Kept entries of such a part
        run head by head, and within a head over its kept dims (the order :func:`kept_entries` keeps).
        """

        def rows_of(parts) -> Tensor:
            rows = []
            for key, size in parts:
                if key is None:
                    rows.append(torch.full((size,), ones, dtype=torch.int64))
                else:
                    start = value_offsets[key]
                    rows.append(torch.arange(start, start + kept[key].numel()))
            return torch.cat(rows)

        if not fold.dims:
            rows = rows_of(fold.parts)
            return rows if fold.repeat == 1 else rows.repeat_interleave(fold.repeat)
        heads, dims = [], []
        for part, inner in zip(fold.parts, fold.dims):
            head = rows_of((part,))
            if not inner:
                heads.append(head.repeat_interleave(fold.repeat))
                dims.append(torch.full((heads[-1].numel(),), ones, dtype=torch.int64))
                continue
            tiles = fold.repeat // sum(size for _, size in inner)
            dim = rows_of(inner).repeat(tiles)
            heads.append(head.repeat_interleave(dim.numel()))
            dims.append(dim.repeat(head.numel()))
        return torch.stack([torch.cat(heads), torch.cat(dims)])

    # ---- the plan ----
    def open_masks(self) -> Tensor:
        """Every gate's open mask, concatenated (the one comparison per forward)."""
        gates = list(self.bank.gates.values())
        if len({(g.weight.device, g.weight.dtype) for g in gates}) > 1:
            return torch.cat([gate.open_mask().cpu() for gate in gates])
        return open_masks([gate.weight for gate in gates], [gate.min_open for gate in gates])

    def _current_plan(self) -> _Plan:
        mask = self.open_masks()
        exact = self._side_active() and bool(self.full_width)  # plans differ only with full-width groups
        if self._plan is not None and self._plan.exact != exact:
            self._plan, self._spare = self._spare, self._plan
        plan = self._plan
        if (
            plan is None
            or plan.mask.shape != mask.shape
            or plan.mask.device != mask.device
            or not torch.equal(plan.mask, mask)
        ):
            plan = self._build_plan(mask, exact)
            self._plan = plan
        return plan

    def _build_plan(self, mask: Tensor, exact: bool = False) -> _Plan:
        """The plan for open set ``mask``; ``exact``: for "exact" training (full-width groups keep every channel)."""
        start = time.perf_counter()
        model, bank = self.model, self.bank
        wide = set(self.full_width) if exact else set()
        device = mask.device
        round_to = self.round_to or (8 if device.type == "cuda" else 1)
        # padding channels would count in the statistics of a norm over them (LayerNorm over the stream)
        unpadded = {key for _, parts in bank.analysis.norms for key, _ in bank.parts(parts) if key is not None}
        kept, open_only, mask_of = {}, {}, {}
        graded = mask.clone()  # which channels' gates get the task gradient: open ones, all of full-width groups
        at = 0
        for key, gate in bank.gates.items():
            m = mask_of[key] = mask[at : at + gate.num_channels]
            at += gate.num_channels
            if key in wide:  # every channel, closed ones with gate value 0 (and their gates' gradient)
                kept[key] = open_only[key] = torch.arange(gate.num_channels, device=device)
                graded[at - gate.num_channels : at] = True
                continue
            kept[key] = kept_channels(m, 1 if key in unpadded else round_to)
            open_only[key] = torch.nonzero(m).flatten()
        entries: dict[str, list[tuple[int, Tensor]]] = {}
        kept_entries_of_plan = kept_entries(model, bank, kept)
        for (target, dim), index in sorted(kept_entries_of_plan.items()):
            entries.setdefault(target, []).append((dim, index))
        write_back = {}
        padded = any(kept[key].numel() != open_only[key].numel() for key in kept)
        open_entries = kept_entries(model, bank, open_only) if padded else kept_entries_of_plan
        for target, dims in entries.items():
            owner_name, _, attr = target.rpartition(".")
            if attr in model.get_submodule(owner_name)._buffers:
                if len(dims) != 1 or dims[0][0] != 0:
                    continue  # only per-channel statistics (one dim) are updated by a forward
                index = dims[0][1]
                full = open_entries.get((target, 0), index)
                write_back[target] = (full, None if full.numel() == index.numel() else torch.searchsorted(index, full))
        attributes = self._compact_attributes(entries, kept)
        self._add_size_attributes(attributes, kept)

        # gate values: every group's kept channels, in bank order, then the 1 of ungated channels
        value_offsets, kept_global, starts = {}, [], 0
        for key, gate in bank.gates.items():
            value_offsets[key] = sum(k.numel() for k in kept_global)
            kept_global.append(kept[key] + starts)
            starts += gate.num_channels
        kept_all = torch.cat(kept_global) if kept_global else torch.zeros(0, dtype=torch.int64, device=device)
        ones_row = kept_all.numel()
        fold_rows = {fold: self._plan_rows(fold, value_offsets, kept, ones_row).to(device) for fold in self._folds}

        params: dict[tuple[torch.dtype, torch.device], list[tuple[_SwapSpec, Tensor]]] = {}
        buffers = []
        for target in dict.fromkeys([*entries, *self._scaled]):
            owner_name, _, attr = target.rpartition(".")
            owner = model.get_submodule(owner_name)
            is_param = attr in owner._parameters
            slot = owner._parameters if is_param else owner._buffers
            full = slot.get(attr)
            if full is None:
                continue
            spec = _SwapSpec(target, owner, attr, entries.get(target, []), self._scaled.get(target), slot)
            if not is_param:
                spec.write_back = write_back.get(target)
                buffers.append(spec)
                continue
            if not is_dense(full):
                raise _Unsupported(f"parameter {target} is a strided view (not dense in memory)")
            params.setdefault((full.dtype, full.device), []).append((spec, full))
        self._find_aliases([spec for members in params.values() for spec, _ in members])
        bundles = []
        for members in params.values():
            specs = [spec for spec, _ in members]
            bundle, order = Bundle.build(
                [full for _, full in members], [spec.dims for spec in specs], [spec.fold is not None for spec in specs]
            )
            specs = [specs[i] for i in order]
            scaled = [fold_rows[spec.fold] for spec in specs if spec.fold is not None]
            if any(rows.dim() == 2 for rows in scaled):  # head dims: (head, dim) rows for every entry
                scaled = [
                    rows if rows.dim() == 2 else torch.stack([rows, torch.full_like(rows, ones_row)]) for rows in scaled
                ]
            bundles.append((bundle, specs, torch.cat(scaled, dim=-1) if scaled else None))
        swaps = [spec for _, specs, _ in bundles for spec in specs] + buffers
        values = torch.cat([mask[kept_all], torch.ones(1, dtype=torch.bool, device=device)])
        unit_scales = [rows is None or bool(values[rows].all()) for _, _, rows in bundles]
        side_args = None
        if self.exact_reason is None:
            key_of = bank.key_of_space
            closed = {key: torch.nonzero(~mask_of[key]).flatten() for key in bank.gates if key not in self.full_width}
            recipes = [sp for sp in bank.analysis.side_passes if key_of[sp.space] not in self.full_width]
            # a consumer whose own rows take gate values: its padded closed rows pass no gradient back
            row_masks = {
                target.rpartition(".")[0]: take_rows(values, fold_rows[fold])
                for target, fold in self._scaled.items()
                if target.endswith(".weight")
            }
            side_args = (model, recipes, key_of, closed, entries, row_masks)
        self.stats.plans += 1
        seconds = time.perf_counter() - start
        self.stats.last_plan_seconds = seconds
        return _Plan(
            mask.clone(),
            kept,
            kept_all,
            mask[kept_all],
            graded[kept_all],
            value_offsets,
            fold_rows,
            bundles,
            unit_scales,
            buffers,
            swaps,
            attributes,
            seconds,
            None,
            side_args,
            exact,
            frozenset(f for f in self._folds if f.hook is not None and bool(values[fold_rows[f]].all())),
        )

    def _add_size_attributes(self, attributes: list, kept: dict[str, Tensor]) -> None:
        """Int attributes the forward reads as gated sizes (``self.num_heads``), at their kept values (export's)."""
        by_module = {id(module): (compact, full) for module, compact, full in attributes}
        for name, values in size_values(self.bank, self.model, kept).items():
            module = self.model.get_submodule(name)
            if id(module) not in by_module:
                by_module[id(module)] = ({}, {})
                attributes.append((module, *by_module[id(module)]))
            compact, full = by_module[id(module)]
            for attr, value in values.items():
                full.setdefault(attr, getattr(module, attr))
                compact[attr] = value

    def _compact_attributes(self, entries: dict[str, list[tuple[int, Tensor]]], kept: dict[str, Tensor]):
        """Size attributes (out_channels, groups, num_features, ...) of every sliced module at the compact sizes."""
        owners: dict[str, list[str]] = {}
        for target in entries:
            owner_name, _, attr = target.rpartition(".")
            owners.setdefault(owner_name, []).append(attr)
        result = []
        for owner_name, attrs in owners.items():
            module = self.model.get_submodule(owner_name)
            before = dict(module.__dict__)
            saved = {}
            for attr in attrs:
                store = module._parameters if attr in module._parameters else module._buffers
                saved[attr] = store[attr]
                shape = list(saved[attr].shape)
                for dim, index in entries[f"{owner_name}.{attr}".lstrip(".")]:
                    shape[dim] = index.numel()
                store[attr] = torch.empty(shape, device="meta")  # only the shape is read
            sync_module_attributes(module, owner_name in self._depthwise)
            for attr, t in saved.items():
                (module._parameters if attr in module._parameters else module._buffers)[attr] = t
            compact = {k: v for k, v in module.__dict__.items() if k in before and v != before[k]}
            if compact:
                full = {k: before[k] for k in compact}
                module.__dict__.update(full)
                result.append((module, compact, full))
        return result


def _tensor_leaves(value: Any) -> list[Tensor]:
    if hasattr(value, "to_tuple") and callable(value.to_tuple):
        value = value.to_tuple()
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, Tensor)]


def self_check(
    model: nn.Module,
    bank: GateBank,
    runner: CompactForward,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
) -> None:
    """Run the example once compact and once per-layer with a random half of every group closed.

    A mismatch or an error means the model's code depends on a gated size in a way compact execution
    cannot follow: the runner is disabled with a warning naming the cause. Gates, training flags and
    buffers are left as they were.
    """
    if runner.disabled_reason is not None or not bank.gates:
        return
    kwargs = example_kwargs or {}
    saved_gates = {key: gate.weight.detach().clone() for key, gate in bank.gates.items()}
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for gate in bank.gates.values():
                n = gate.num_channels
                closed = torch.randperm(n, generator=g)[: n // 2]
                gate.weight[closed.to(gate.weight.device)] = -1.0
            model.eval()
            runner.enabled = False
            reference = _tensor_leaves(model(*example_inputs, **kwargs))
            runner.enabled = True
            try:
                state = runner._enter()
                try:
                    compact = _tensor_leaves(runner.inner(*example_inputs, **kwargs))
                finally:
                    runner._exit(state, write_back=False)
            except Exception as error:
                runner.disable(f"its forward raised {type(error).__name__} on the example inputs: {error}")
                return
            problem = _compare(reference, compact)
            if problem:
                runner.disable(f"on the example inputs, with half of every gate group closed, {problem}")
    finally:
        runner.enabled = True
        runner._plan = None
        with torch.no_grad():
            for key, gate in bank.gates.items():
                gate.weight.copy_(saved_gates[key])
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for m, training in modes.items():
            m.training = training


def _compare(reference: list[Tensor], compact: list[Tensor]) -> str | None:
    if len(reference) != len(compact):
        return f"it returns {len(compact)} tensors instead of {len(reference)}"
    for i, (r, c) in enumerate(zip(reference, compact)):
        if r.shape != c.shape:
            return f"output {i} has shape {tuple(c.shape)} instead of {tuple(r.shape)}"
        if not r.is_floating_point():
            if not torch.equal(r, c):
                return f"output {i} differs"
            continue
        scale = r.detach().abs().max().item() if r.numel() else 0.0
        tol = (1e-3 if r.dtype in (torch.float16, torch.bfloat16) else 1e-4) * max(scale, 1.0)
        if r.numel() and (c - r).abs().max().item() > tol:
            return f"output {i} differs from the per-layer path by {(c - r).abs().max().item():.3g}"
    return None


def install(
    model: nn.Module,
    bank: GateBank,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    check: bool = True,
) -> CompactForward:
    """Make ``model.forward`` a :class:`CompactForward` (and run the self-check unless ``check=False``)."""
    runner = CompactForward(model, bank, model.forward)
    model.__dict__["forward"] = runner
    bank.compact = runner
    if check:
        self_check(model, bank, runner, example_inputs, example_kwargs)
    return runner


def uninstall(model: nn.Module) -> None:
    """Remove a CompactForward from ``model`` (export does this on its copy)."""
    if isinstance(model.__dict__.get("forward"), CompactForward):
        del model.__dict__["forward"]


__all__ = ["CompactForward", "CompactStats", "install", "self_check", "uninstall"]
