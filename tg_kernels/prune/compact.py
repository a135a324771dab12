"""Compact execution: a gated model runs its exported structure in the forward (DESIGN.md §3).

Per-layer skipping stops at the layer boundary: each gated layer writes its output back at full
width, so the norms, activations, residual adds and the next layer's input between gated layers
run at full width. Compact execution runs the whole model at the open width instead. For each
forward it

1. checks the open set of every gate (one comparison over all gates: one host synchronisation on
   CUDA) and, only when it changed, rebuilds the index tensors (the slicing recipe of
   :mod:`tg_kernels.prune.slicing`, the same one :func:`~tg_kernels.export` applies once) and
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
every forward without gradients (eval / ``torch.no_grad``). Training in ``"exact"`` or ``"none"`` keeps
the per-layer path, where closed gates get their task gradient.

Where compact execution cannot be exact (a model whose code keeps a gated size), the self-check at
attach time (or a failure at run time) says so once, with a warning, and the model runs the
per-layer path from then on.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from tg_kernels.prune.attach import GateBank, GateHook, Parts
from tg_kernels.prune.export import _is_depthwise, sync_module_attributes
from tg_kernels.prune.slicing import kept_channels, kept_entries

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


@dataclass
class _Fold:
    """One gate point: where its gate values go in compact execution.

    ``module`` names the module whose ``weight``/``bias`` rows are scaled (None: the hook multiplies
    the compact activation); ``hook`` is the point's GateHook (None for Gated layers, which fold).
    """

    parts: Parts
    module: str | None
    hook: GateHook | None


@dataclass
class _SwapSpec:
    """One tensor to replace for a forward: gathered along ``dims``, rows scaled by ``fold``'s gates."""

    target: str
    owner: nn.Module
    attr: str
    is_param: bool
    dims: list[tuple[int, Tensor]]  # (dim, kept entry indices)
    fold: _Fold | None
    flat: Tensor | None = None  # the same entries as flat indices (for contiguous tensors)
    shape: tuple[int, ...] = ()  # the compact shape


@dataclass
class _Plan:
    """Everything that depends on the open set only (rebuilt when it changes)."""

    mask: Tensor  # the concatenated open masks it was built for
    kept: dict[str, Tensor]  # group key -> kept channel indices
    padded: dict[str, bool]  # group key -> whether closed channels are among the kept ones
    swaps: list[_SwapSpec]  # every tensor replaced in the forward
    # buffer name -> (its entries of open channels, their positions in the compact buffer)
    write_back: dict[str, tuple[Tensor, Tensor]]
    attributes: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]  # module, compact values, full values
    build_seconds: float


@dataclass
class _Swapped:
    """A full-size tensor replaced by its compact version for one forward."""

    target: str
    owner: nn.Module
    attr: str
    is_param: bool
    full: Tensor
    compact: Tensor


@dataclass
class CompactStats:
    """Counters a user (or a test) can read: how compact execution has been used."""

    forwards: int = 0  # forwards that ran compact
    plans: int = 0  # times the open set changed and index tensors were rebuilt
    last_plan_seconds: float = 0.0  # how long the last rebuild took
    fallbacks: int = 0  # forwards that ran the per-layer path because compact execution was not active


class _GatherScaled(torch.autograd.Function):
    """``t`` gathered along several dims (sorted, unique indices), its rows then scaled by ``scale``.

    One autograd node per tensor, with a cheap backward: the gradient is written into zeros of the
    full shape by a copy (dim 0) or index_add (other dims, where that is the faster CPU kernel).
    ATen's own index_select backward accumulates with scatter_add, which on CPU costs a hundred
    times more than a copy; with unique indices every way gives the same result.
    """

    @staticmethod
    def forward(ctx, t: Tensor, scale: Tensor | None, dims: tuple[int, ...], *indices: Tensor) -> Tensor:  # type: ignore[override]
        shapes = []
        out = t
        for dim, index in zip(dims, indices):
            shapes.append(out.shape)
            out = out.index_select(dim, index)
        ctx.dims, ctx.shapes = dims, shapes
        ctx.has_scale = scale is not None
        if scale is not None:
            ctx.save_for_backward(out, scale, *indices)
            out = out * scale.view(-1, *([1] * (out.dim() - 1)))
        else:
            ctx.save_for_backward(*indices)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        grad_scale = None
        if ctx.has_scale:
            gathered, scale, *indices = saved
            view = scale.view(-1, *([1] * (grad.dim() - 1)))
            if ctx.needs_input_grad[1]:
                grad_scale = (
                    (grad * gathered).sum(dim=tuple(range(1, grad.dim()))) if grad.dim() > 1 else grad * gathered
                )
                grad_scale = grad_scale.to(scale.dtype)
            grad = grad * view
        else:
            indices = list(saved)
        for dim, index, shape in reversed(list(zip(ctx.dims, indices, ctx.shapes))):
            full = grad.new_zeros(shape)
            if dim == 0:
                full.index_copy_(0, index, grad)
            else:
                full.index_add_(dim, index, grad)
            grad = full
        return (grad if ctx.needs_input_grad[0] else None), grad_scale, None, *([None] * len(indices))


class _TakeScaled(torch.autograd.Function):
    """``t.flatten()[flat].view(shape)``, rows scaled by ``scale``: the gather compact execution runs.

    ``flat`` (sorted, unique) holds the entries of every sliced dim at once, so one index_select
    forward and one index_copy backward (into zeros of the full shape) serve any number of sliced
    dims; ATen's own index_select backward accumulates with scatter_add, which costs a hundred times
    more on CPU.
    """

    @staticmethod
    def forward(ctx, t: Tensor, scale: Tensor | None, flat: Tensor, shape: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        out = t.reshape(-1).index_select(0, flat).view(shape)
        ctx.full_shape = t.shape
        ctx.has_scale = scale is not None
        if scale is not None:
            ctx.save_for_backward(flat, out, scale)
            return out * scale.view(-1, *([1] * (out.dim() - 1)))
        ctx.save_for_backward(flat)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_scale = None
        if ctx.has_scale:
            flat, gathered, scale = ctx.saved_tensors
            if ctx.needs_input_grad[1]:
                prod = grad * gathered
                grad_scale = prod.sum(dim=tuple(range(1, grad.dim()))) if grad.dim() > 1 else prod
            grad = grad * scale.view(-1, *([1] * (grad.dim() - 1)))
        else:
            (flat,) = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[0]:
            grad_t = grad.new_zeros(ctx.full_shape.numel()).index_copy_(0, flat, grad.reshape(-1)).view(ctx.full_shape)
        return grad_t, grad_scale, None, None


def flat_entries(shape: torch.Size, dims: list[tuple[int, Tensor]]) -> tuple[Tensor, tuple[int, ...]]:
    """The flat indices of the entries ``dims`` keeps in a contiguous tensor of ``shape``, and their shape."""
    device = dims[0][1].device if dims else None
    flat = torch.arange(shape.numel(), device=device).view(shape)
    for dim, index in dims:
        flat = flat.index_select(dim, index)
    return flat.reshape(-1), tuple(flat.shape)


def take_scaled(t: Tensor, flat: Tensor, shape: tuple[int, ...], scale: Tensor | None = None) -> Tensor:
    """The entries ``flat`` of contiguous ``t`` as a tensor of ``shape``, rows scaled by ``scale``."""
    if scale is not None:
        scale = scale.to(t.dtype)
    if torch.is_grad_enabled() and (t.requires_grad or (scale is not None and scale.requires_grad)):
        return _TakeScaled.apply(t, scale, flat, shape)
    out = t.reshape(-1).index_select(0, flat).view(shape)
    return out if scale is None else out * scale.view(-1, *([1] * (out.dim() - 1)))


def gather_scaled(t: Tensor, dims: list[tuple[int, Tensor]], scale: Tensor | None = None) -> Tensor:
    """``t``'s entries at ``dims`` (``[(dim, sorted unique indices)]``), rows scaled by ``scale``.

    Differentiable in ``t`` and ``scale``: gradients flow back into the full-size ``t``.
    """
    if scale is not None:
        scale = scale.to(t.dtype)
    if torch.is_grad_enabled() and (t.requires_grad or (scale is not None and scale.requires_grad)):
        return _GatherScaled.apply(t, scale, tuple(d for d, _ in dims), *(i for _, i in dims))
    out = t
    for dim, index in dims:
        out = out.index_select(dim, index)
    return out if scale is None else out * scale.view(-1, *([1] * (out.dim() - 1)))


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
        self._plan: _Plan | None = None
        self._cache: tuple[_Plan, list[tuple[int, int]], list[Tensor]] | None = None  # no-grad compact tensors
        self._folds = self._build_folds()
        self._scaled = {f"{fold.module}.{t}": fold for fold in self._folds if fold.module for t in ("weight", "bias")}
        self._layers = list(bank.gated_layers)
        self._depthwise = {name for name, m in model.named_modules() if _is_depthwise(m)}
        if any(gate.M is not None for gate in bank.gates.values()):
            self.disabled_reason = "paper-form gates (gate_M set) are not exactly 0 for closed channels"
        self.__wrapped__ = inner  # so that inspect.signature(model.forward) shows the model's own signature

    # ---- static structure ----
    def _build_folds(self) -> list[_Fold]:
        assert self.bank.analysis is not None
        hooks = {id(h): h for h in self.bank.hooks}
        hook_of: dict[str, GateHook] = {}
        for name, module in self.model.named_modules():
            for hook in module._forward_hooks.values():
                if id(hook) in hooks:
                    hook_of[name] = hook
        folds = []
        for point in self.bank.analysis.gate_points:
            parts = self.bank.parts(point.parts)
            if point.replace:
                folds.append(_Fold(parts, point.module, None))
                continue
            folds.append(_Fold(parts, self._fold_target(point.module, point.fold), hook_of.get(point.module)))
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

    # ---- when it applies ----
    def active(self) -> bool:
        """Compact execution runs for ``skip="hard"`` and for every forward without gradients."""
        return (
            self.enabled and self.disabled_reason is None and (self.bank.skip == "hard" or not torch.is_grad_enabled())
        )

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
        state = self._enter()
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
        swapped: list[_Swapped] = []
        if not torch.is_grad_enabled() and self._reuse(plan, swapped):
            pass  # inference with unchanged parameters: the compact tensors of the last forward serve again
        else:
            values = self._gate_values(plan)
            scales: dict[int, Tensor] = {}
            for spec in plan.swaps:
                self._swap(spec, values, scales, swapped)
            if not torch.is_grad_enabled():
                self._cache = (plan, [(id(x.full), x.full._version) for x in swapped], [x.compact for x in swapped])
        for module, compact, _ in plan.attributes:
            module.__dict__.update(compact)
        self.running = True
        for layer in self._layers:
            layer._tg_compact = True
        for fold in self._folds:
            if fold.hook is not None:
                fold.hook.compact_gate = None if fold.module is not None else self._vector(fold.parts, values, plan)
                fold.hook.compact = True
        return swapped

    @torch.compiler.disable
    def _exit(self, swapped: list[_Swapped], write_back: bool) -> None:
        plan = self._plan
        assert plan is not None
        for fold in self._folds:
            if fold.hook is not None:
                fold.hook.compact = False
                fold.hook.compact_gate = None
        self.running = False
        for layer in self._layers:
            layer._tg_compact = False
        for module, _, full in plan.attributes:
            module.__dict__.update(full)
        for s in swapped:
            (s.owner._parameters if s.is_param else s.owner._buffers)[s.attr] = s.full
            # Norms update running statistics in place in training mode (without bumping _version).
            if not s.is_param and write_back and s.owner.training and s.target in plan.write_back:
                entries, positions = plan.write_back[s.target]
                with torch.no_grad():
                    s.full.index_copy_(0, entries, s.compact.index_select(0, positions).to(s.full.dtype))

    def _reuse(self, plan: _Plan, swapped: list[_Swapped]) -> bool:
        """Swap in the cached compact tensors if they were made for this plan from these exact tensors."""
        if self._cache is None or self._cache[0] is not plan:
            return False
        _, keys, compacts = self._cache
        specs = [
            spec
            for spec in plan.swaps
            if (spec.owner._parameters if spec.is_param else spec.owner._buffers)[spec.attr] is not None
        ]
        if len(specs) != len(keys):
            return False
        fulls = [(spec.owner._parameters if spec.is_param else spec.owner._buffers)[spec.attr] for spec in specs]
        if any((id(f), f._version) != key for f, key in zip(fulls, keys)):
            return False
        for spec, full, compact in zip(specs, fulls, compacts):
            (spec.owner._parameters if spec.is_param else spec.owner._buffers)[spec.attr] = compact
            swapped.append(_Swapped(spec.target, spec.owner, spec.attr, spec.is_param, full, compact))
        return True

    def _swap(self, spec: _SwapSpec, values: dict[str, Tensor], scales: dict[int, Tensor], swapped: list[_Swapped]):
        store = spec.owner._parameters if spec.is_param else spec.owner._buffers
        full = store[spec.attr]
        if full is None:
            return
        scale = None
        if spec.fold is not None:
            scale = scales.get(id(spec.fold))
            if scale is None:
                scale = scales[id(spec.fold)] = self._vector(spec.fold.parts, values, self._plan)
        if spec.flat is not None and full.is_contiguous():
            compact = take_scaled(full, spec.flat, spec.shape, scale)
        else:
            compact = gather_scaled(full, spec.dims, scale)
        store[spec.attr] = compact
        swapped.append(_Swapped(spec.target, spec.owner, spec.attr, spec.is_param, full, compact))

    def _gate_values(self, plan: _Plan) -> dict[str, Tensor]:
        """Each group's gate values at its kept channels; closed (padding) ones get no task gradient."""
        values = {}
        for key, gate in self.bank.gates.items():
            g = gate()
            if plan.kept[key].numel() != g.numel():
                g = g.index_select(0, plan.kept[key])
            if plan.padded.get(key, True):  # kept closed channels (padding, or a group kept at one channel)
                g = torch.where(g != 0, g, g.detach())
            values[key] = g
        return values

    def _vector(self, parts: Parts, values: dict[str, Tensor], plan: _Plan | None) -> Tensor:
        assert plan is not None
        pieces = []
        for key, size in parts:
            if key is None:
                like = next(iter(values.values()))
                pieces.append(like.new_ones(size))
            else:
                pieces.append(values[key])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    # ---- the plan ----
    def open_masks(self) -> Tensor:
        """Every gate's open mask, concatenated (the one comparison per forward)."""
        masks = [gate.open_mask() for gate in self.bank.gates.values()]
        return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)

    def _current_plan(self) -> _Plan:
        mask = self.open_masks()
        plan = self._plan
        if plan is None or plan.mask.shape != mask.shape or not torch.equal(plan.mask, mask):
            plan = self._build_plan(mask)
            self._plan = plan
        return plan

    def _build_plan(self, mask: Tensor) -> _Plan:
        start = time.perf_counter()
        model, bank = self.model, self.bank
        device = mask.device
        round_to = 8 if device.type == "cuda" else 1  # few distinct shapes for tensor cores and algorithm caches
        kept, open_only = {}, {}
        at = 0
        for key, gate in bank.gates.items():
            m = mask[at : at + gate.num_channels]
            at += gate.num_channels
            kept[key] = kept_channels(m, round_to)
            open_only[key] = torch.nonzero(m).flatten()
        entries: dict[str, list[tuple[int, Tensor]]] = {}
        for (target, dim), index in sorted(kept_entries(model, bank, kept).items()):
            entries.setdefault(target, []).append((dim, index))
        write_back = {}
        open_entries = kept_entries(model, bank, open_only)
        for target, dims in entries.items():
            owner_name, _, attr = target.rpartition(".")
            if attr in model.get_submodule(owner_name)._buffers:
                if len(dims) != 1 or dims[0][0] != 0:
                    continue  # only per-channel statistics (one dim) are updated by a forward
                index = dims[0][1]
                full = open_entries.get((target, 0), index)
                write_back[target] = (full, torch.searchsorted(index, full))
        attributes = self._compact_attributes(entries, kept)
        swaps = []
        for target in dict.fromkeys([*entries, *self._scaled]):
            owner_name, _, attr = target.rpartition(".")
            owner = model.get_submodule(owner_name)
            is_param = attr in owner._parameters
            if (owner._parameters if is_param else owner._buffers).get(attr) is not None:
                dims = entries.get(target, [])
                spec = _SwapSpec(target, owner, attr, is_param, dims, self._scaled.get(target))
                if dims:
                    full = (owner._parameters if is_param else owner._buffers)[attr]
                    spec.flat, spec.shape = flat_entries(full.shape, dims)
                swaps.append(spec)
        self.stats.plans += 1
        seconds = time.perf_counter() - start
        self.stats.last_plan_seconds = seconds
        padded = {key: kept[key].numel() != open_only[key].numel() for key in kept}
        return _Plan(mask.clone(), kept, padded, swaps, write_back, attributes, seconds)

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
