"""`attach_gates`: put trainable gates into an arbitrary model where they zero what consumers read.

The model keeps its own classes and forward code, except that every ``nn.MultiheadAttention`` becomes
the equivalent :class:`~tg_kernels.nn.PrunableMultiheadAttention` (whose heads can be pruned; export
turns it back where it can). Gates live in one module, ``model.tg_gates``
(a :class:`~tg_kernels.pruning.bank.GateBank`, so they are saved with the model's state_dict and synchronised by
DistributedDataParallel like any parameter). A Conv2d or Linear whose output is gated directly is
replaced by a :class:`~tg_kernels.GatedConv2d` / :class:`~tg_kernels.GatedLinear` sharing the
group's gate, so that it skips closed channels while training; every other gate point (after a
BatchNorm, a depthwise conv, a sigmoid) is a forward hook calling the fused
:func:`~tg_kernels.channel_gate`. A Conv2d whose gate sits after its BatchNorm becomes a
``GatedConv2d(gate_after_norm=True)``: it applies no gate but skips closed channels in its
backward (``exact``) or everywhere (``hard``). The hidden units of an ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN`` are gated inside the recurrence, on the parameters a forward pre-hook hands the module
(:class:`~tg_kernels.pruning.bank.RecurrentGateHook`).

This module is the procedure (analyse, self-check, install, compact execution); what it installs,
the bank and the hooks that export, compact execution and the budget read too, is
:mod:`tg_kernels.pruning.bank`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tg_kernels.gate import ShapeFn
from tg_kernels.nn import GatedConv2d, GatedLinear, swap_multihead_attention
from tg_kernels.ops._skip import check_skip
from tg_kernels.pruning.analysis import (
    Analysis,
    Rule,
    analyze,
    analyze_export,
    export_trace,
    output_tensors,
    real_trace,
    record_shapes,
    trace,
)
from tg_kernels.pruning.analysis.spaces import remap, remap_dims
from tg_kernels.pruning.analysis.tracing import restore_buffers
from tg_kernels.pruning.bank import (
    BANK_NAME,
    EnterOpenStats,
    ExitOpenStats,
    GateBank,
    GateHook,
    GroupInfo,
    InputGate,
    InputGateHook,
    NoFastPath,
    OpenChannelStats,
    Parts,
    RecurrentGateHook,
    RecurrentRestore,
    set_submodule,
)
from tg_kernels.pruning.compact import install
from tg_kernels.pruning.export import copy_model, export_in_place


def _keep_off_fast_paths(model: nn.Module) -> None:
    """PyTorch's transformer encoder layers and stacks that hold gates take their regular path."""
    gated = (GatedConv2d, GatedLinear)
    for module in model.modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(m, gated) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # nested tensors would skip the gates too
        elif not any(isinstance(h, NoFastPath) for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(NoFastPath())


def _excluded_names(model: nn.Module, exclude: Iterable[str | type] | None) -> set[str]:
    names: set[str] = set()
    for item in exclude or ():
        if isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError as error:
                raise ValueError(f"exclude names {item!r}, which is not a submodule of the model") from error
            names.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            names.update(name for name, m in model.named_modules() if isinstance(m, item) and name)
        else:
            raise TypeError(f"exclude takes submodule names or nn.Module classes, got {item!r}")
    return names


def _unique_key(name: str, taken: set[str]) -> str:
    key = name.replace(".", "_") or "input"
    candidate, n = key, 1
    while candidate in taken:
        n += 1
        candidate = f"{key}_{n}"
    taken.add(candidate)
    return candidate


def _install(
    model: nn.Module,
    analysis: Analysis,
    opaque: set[str],
    skip: str,
    gate_options: dict[str, Any],
) -> GateBank:
    """Put the gates the analysis placed into ``model`` (in place) and return their bank."""
    taken: set[str] = set()
    sizes = {group.space: group.size for group in analysis.groups}
    keys = {group.space: _unique_key(group.name, taken) for group in analysis.groups}
    param = next(model.parameters(), None)
    bank = GateBank({keys[s]: n for s, n in sizes.items()}, **gate_options)
    if param is not None:
        bank.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    bank.analysis = analysis
    bank.skip = skip
    bank.key_of_space = {space: keys[root] for space, root in analysis.root_of.items()}
    bank.groups = [GroupInfo(keys[g.space], g.size, tuple(g.producers)) for g in analysis.groups]
    bank.skipped = dict(analysis.fixed)
    for leaf in sorted(opaque):
        bank.skipped[leaf] = "untraceable code (kept as an opaque module)"

    for point in analysis.gate_points:
        if point.on_input:
            continue  # after every replacement below, so that the hook sits on the module that stays
        parts = bank.parts(point.parts)
        module = model.get_submodule(point.module)
        if point.replace:
            gated_cls = GatedConv2d if isinstance(module, nn.Conv2d) else GatedLinear
            make = gated_cls.from_conv if gated_cls is GatedConv2d else gated_cls.from_linear
            gated = make(module, skip=skip)
            gated.gate = bank.gates[parts[0][0]]
            gated.train(module.training)
            set_submodule(model, point.module, gated)
            bank.gated_layers.append(gated)
        else:
            dims = tuple(bank.parts(d) for d in point.dims)
            hook = GateHook(bank, parts, point.dim, hard=skip == "hard", repeat=point.repeat, dims=dims)
            module.register_forward_hook(hook)
            bank.hooks.append(hook)
    for point in analysis.recurrent:  # LSTM / GRU hidden units: gated inside the recurrence
        module = model.get_submodule(point.module)
        hook = RecurrentGateHook(bank, point, bank.key_of_space[point.space], hard=skip == "hard")
        module.register_forward_pre_hook(hook)
        module.register_forward_hook(RecurrentRestore(), always_call=True)
        bank.recurrent_hooks.append(hook)
    for name, space in analysis.after_norm:  # conv -> BN -> gate: the conv skips what is exact to skip
        conv = GatedConv2d.from_conv(model.get_submodule(name), skip=skip, gate_after_norm=True)
        conv.gate = bank.gates[bank.key_of_space[space]]
        conv.train(model.get_submodule(name).training)
        set_submodule(model, name, conv)
        bank.gated_layers.append(conv)
    for point in analysis.gate_points:  # input gates: on the modules that stay (after every replacement)
        if point.on_input:
            hook = InputGateHook(bank, bank.parts(point.parts), point.dim, hard=skip == "hard", repeat=point.repeat)
            model.get_submodule(point.module).register_forward_pre_hook(hook)
            bank.hooks.append(hook)
    for name, space_parts in analysis.conv_inputs:  # chains: a conv reading gated channels can drop closed ones
        conv = model.get_submodule(name)
        if isinstance(conv, GatedConv2d):
            conv.input_gate = InputGate(bank, bank.parts(space_parts))
    widths: dict[str, dict[int, Parts]] = {}
    for name, space_parts in analysis.norms:  # norms over gated channels: open-channel statistics
        parts = bank.parts(space_parts)
        widths.setdefault(name, {})[sum(size for _, size in parts)] = parts
    for name, by_width in widths.items():
        mode = OpenChannelStats(bank, by_width)
        module = model.get_submodule(name)
        module.register_forward_pre_hook(EnterOpenStats(mode))
        module.register_forward_hook(ExitOpenStats(mode), always_call=True)
    _keep_off_fast_paths(model)
    model.add_module(BANK_NAME, bank)

    return bank


def _leaves(value: Any) -> list[Tensor]:
    """The floating-point tensors of a model output that count as outputs (as the analysis counts them)."""
    return [t for t in output_tensors(value) if t.is_floating_point()]


def _gated(parts: Parts) -> bool:
    return any(r is not None for r, *_ in parts)


def _without_groups(analysis: Analysis, bad: set[int], reason: str) -> Analysis:
    """The analysis with the groups whose space is in ``bad`` kept whole (ungated) for ``reason``."""
    root_of = {s: r for s, r in analysis.root_of.items() if r not in bad}  # a kept root maps to itself

    fixed = dict(analysis.fixed)
    for g in analysis.groups:
        if g.space in bad:
            for p in g.producers:
                fixed[p] = reason

    points = []
    for gp in analysis.gate_points:
        parts = remap(gp.parts, root_of)
        dims = remap_dims(gp.dims, root_of)
        if any(r is not None for r, _ in parts) or dims:
            replace = gp.replace and parts[0][0] is not None
            points.append(dataclasses.replace(gp, parts=parts, replace=replace, dims=dims))
    return dataclasses.replace(
        analysis,
        groups=[g for g in analysis.groups if g.space not in bad],
        gate_points=points,
        layers=[
            dataclasses.replace(
                lc,
                in_parts=remap(lc.in_parts, root_of),
                out_parts=remap(lc.out_parts, root_of),
                in_dims=remap_dims(lc.in_dims, root_of),
                out_dims=remap_dims(lc.out_dims, root_of),
            )
            for lc in analysis.layers
        ],
        fixed=fixed,
        root_of=root_of,
        after_norm=[(n, s) for n, s in analysis.after_norm if s in root_of],
        conv_inputs=[(n, p) for n, p in ((n, remap(p, root_of)) for n, p in analysis.conv_inputs) if _gated(p)],
        norms=[(n, p) for n, p in ((n, remap(p, root_of)) for n, p in analysis.norms) if _gated(p)],
        size_attrs=[
            dataclasses.replace(sa, parts=remap(sa.parts, root_of), dims=remap(sa.dims, root_of))
            for sa in analysis.size_attrs
            if any(r is not None for r, _ in remap(sa.parts, root_of) + remap(sa.dims, root_of))
        ],
        side_passes=[sp for sp in analysis.side_passes if sp.space in root_of.values()],
        recurrent=[rg for rg in analysis.recurrent if rg.space in root_of],
        head_dims=[
            hd if hd.space is None or hd.space not in bad else dataclasses.replace(hd, space=None, reason=reason)
            for hd in analysis.head_dims
        ],
    )


# How much the self-check scales the q and k projections of attention with head-dim gates: at random
# initialisation attention is nearly uniform, and a scale computed from the head dim in the forward
# (not exact once head dims go) would change the outputs by less than the check's tolerance.
_SHARPEN = 8.0


def _export_differs(
    model: nn.Module, analysis: Analysis, inputs: tuple[Any, ...], kwargs: dict[str, Any], closed: set[int]
) -> bool:
    """Gate a copy, close a random half of the groups in ``closed``; does export change the output?

    The check runs in the model's own dtype (float64 convolutions are slow on CPU); a misread
    structure changes outputs by far more than rounding does.
    """
    trial = copy_model(model).eval()
    with torch.no_grad():  # sharp attention scores: a scale that follows the kept head dims shows
        for hd in analysis.head_dims:
            if hd.space is not None and hd.space in closed:
                for name in hd.scored:
                    trial.get_submodule(name).weight.mul_(_SHARPEN)
    bank = _install(trial, analysis, set(), "none", {})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for group in analysis.groups:
            gate = bank.gates[bank.key_of_space[group.space]]
            gate.weight.fill_(0.5)
            if group.space in closed and group.size > 1:
                gate.weight[torch.randperm(group.size, generator=g)[: group.size // 2]] = -0.5
        try:
            expected = _leaves(trial(*inputs, **kwargs))
            actual = _leaves(export_in_place(trial)(*inputs, **kwargs))  # trial is a throwaway copy
        except Exception:  # noqa: BLE001 - an export that cannot run is a mismatch
            return True
    if len(expected) != len(actual):
        return True
    for e, a in zip(expected, actual):
        if e.shape != a.shape:
            return True
        scale = e.abs().max().clamp_min(1e-30)
        tolerance = 1e-10 if e.dtype == torch.float64 else 1e-3  # removed channels change outputs by O(1)
        if not torch.allclose(a / scale, e / scale, rtol=0, atol=tolerance):
            return True
    return False


def _self_check(
    model: nn.Module, analysis: Analysis, inputs: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Analysis, list[str]]:
    """Verify that export equals the gated model with half of every group closed; keep failing groups whole.

    Failing groups are found by halving the set of closed groups. Returns the (possibly reduced)
    analysis and the names of the groups kept whole.
    """
    spaces = [g.space for g in analysis.groups]
    if not spaces or not _export_differs(model, analysis, inputs, kwargs, set(spaces)):
        return analysis, []
    bad: set[int] = set()

    def search(candidates: list[int]) -> None:
        if not _export_differs(model, analysis, inputs, kwargs, set(candidates)):
            return
        if len(candidates) == 1:
            bad.add(candidates[0])
            return
        half = len(candidates) // 2
        search(candidates[:half])
        search(candidates[half:])

    half = len(spaces) // 2
    search(spaces[:half])
    search(spaces[half:])
    if not bad:  # only closing several groups together fails: keep them all whole
        bad = set(spaces)
    names = [g.name for g in analysis.groups if g.space in bad]
    return _without_groups(
        analysis, bad, "self-check: the exported model differed when these channels were removed"
    ), names


TRACERS = ("auto", "export", "real", "fx")


def _check_runs(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise a ValueError if the model cannot run the example inputs at all (wrong shape, dtype or
    device), rather than reporting it as a model no tracer can read. Buffers are left as they were."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of the user's forward is the user's input
        raise ValueError(
            f"attach_gates: {type(model).__name__} cannot run the example inputs ({_first_line(error)}); "
            "pass inputs of the shape, dtype and device the model takes"
        ) from error
    finally:
        restore_buffers(model, saved)


def _first_line(error: BaseException) -> str:
    """``Type: the first line of the message``: tracer errors can hold a whole printed graph."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def _analyse(
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    excluded: set[str],
    tracer: str,
    closed_gradients: bool = True,
    rules: Mapping[str, Rule] | None = None,
) -> tuple[Analysis | None, set[str], str | None]:
    """(analysis or None, opaque submodules, why tracing failed) with the chosen tracer.

    ``"auto"`` reads the ``torch.export`` graph; where torch.export cannot trace the forward (Python
    control flow that reads tensor values), the same graph recorded by running the example inputs
    (:func:`~tg_kernels.pruning.analysis.tracing.real_trace`, with a warning); where that fails
    too, torch.fx (which can keep untraceable submodules opaque).
    """
    export_error: Exception | None = None
    if tracer in ("auto", "export"):
        try:
            traced = export_trace(model, inputs, kwargs)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: try the next tracer
            export_error = error
            if tracer == "export":
                return None, set(), f"torch.export failed: {_first_line(error)}"
        else:
            return analyze_export(model, traced, excluded, closed_gradients, rules=rules), set(), None
    if tracer in ("auto", "real"):
        try:
            traced = real_trace(model, inputs, kwargs)
        except Exception as error:  # noqa: BLE001
            if tracer == "real":
                return None, set(), f"the traced run failed: {_first_line(error)}"
        else:
            if export_error is not None:
                warnings.warn(
                    f"tg_kernels.attach_gates: torch.export cannot trace {type(model).__name__}.forward "
                    f"({_first_line(export_error)}); its graph was recorded by running the example inputs "
                    "instead, so Python branches that read tensor values take the way the example inputs "
                    "take (pass example inputs that take the branches your training takes)",
                    stacklevel=3,
                )
            return analyze_export(model, traced, excluded, closed_gradients, rules=rules), set(), None
    _check_runs(model, inputs, kwargs)  # no tracer could read it: a model that cannot run them is the inputs' fault
    if kwargs:
        reason = "torch.fx cannot pass keyword inputs (example_kwargs)"
        if export_error is not None:
            reason = f"torch.export failed ({_first_line(export_error)}) and {reason}"
        return None, set(), reason
    try:
        graph, opaque = trace(model)
    except Exception as error:  # noqa: BLE001
        return None, set(), f"{type(error).__name__}: {error}"
    shapes, module_flops = record_shapes(model, graph, inputs)
    return analyze(model, graph, shapes, excluded, module_flops), opaque, None


def attach_gates(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] = (),
    *,
    example_kwargs: dict[str, Any] | None = None,
    skip: str = "exact",
    exclude: Iterable[str | type] | None = None,
    gate_shape: str | ShapeFn | None = None,
    gate_M: float | None = None,
    gate_init: float = 0.5,
    tracer: str = "auto",
    self_check: bool = True,
    compact: bool = True,
    closed_gate_gradients: bool = True,
    rules: Mapping[str, Rule] | None = None,
    prunable_attention: bool = False,
) -> tuple[nn.Module, GateBank]:
    """Gate every prunable channel group of ``model`` (in place) and return ``(model, gates)``.

    Args:
        model: any ``nn.Module``; it is modified in place (a copy is not made).
        example_inputs: a tensor or a tuple of positional inputs, used once to trace shapes.
        example_kwargs: keyword inputs of the forward (``input_ids=...`` for Hugging Face models).
        skip: skip mode of the Gated layers that replace directly gated Conv2d/Linear producers
            (``"none"``, ``"exact"``, ``"hard"``; see :class:`~tg_kernels.GatedLinear`).
        exclude: submodule names or module classes whose output channels stay ungated.
        gate_shape, gate_M, gate_init: options of every :class:`~tg_kernels.TrainableGate`.
        tracer: ``"auto"`` (the ``torch.export`` graph; where torch.export cannot trace the forward,
            the same graph recorded by running the example inputs, with a warning; then torch.fx),
            ``"export"``, ``"real"`` (only the recorded run) or ``"fx"``.
        self_check: verify the analysis on the example inputs before gating: with a random half
            of every group closed, the exported model must compute what the gated model computes
            (on a copy, in the model's dtype). Groups that break it are found by halving, kept whole and named
            in a warning. It costs a few exports of the model; turn it off for very large models.
        compact: run the whole model compact (at the open width, as its exported model would) in
            ``"hard"`` mode and without gradients (:mod:`tg_kernels.pruning.compact`). A check on the
            example inputs turns it off, with a warning, where the model's code cannot run compact.
        closed_gate_gradients: place no gate right before an activation whose derivative at 0 is 0
            (ReLU, ReLU6): such a gate would get no task gradient while closed, so it could reopen
            only through the budget. The gate goes after the activation instead (on the module that
            returns it, past a residual add, or on the input of the Linear / conv reading it). The
            forward is the same (``relu(g * z) = g * relu(z)`` for 0/1 gates). ``False`` keeps gates
            before such activations: ``"exact"`` training is then cheaper (those closed gates'
            task gradients are exactly 0 and need no side pass), but closed channels reopen only
            through the budget. The torch.fx analysis always places gates before them.
        rules: extra channel rules for this call only, ``{"aten.op_name": rule}`` on top of (or
            replacing) :data:`~tg_kernels.pruning.analysis.RULES`; the torch.fx fallback ignores them.
            ``register_rule`` adds a rule for every call instead.
        prunable_attention: ``nn.MultiheadAttention`` packs q, k and v in one weight and checks that
            its input is ``embed_dim`` wide, so it cannot lose heads, head dims or the stream it
            reads: by default those stay whole and the exported model holds only the model's own
            classes and ``torch.nn`` modules. ``True`` swaps each one (in place; ``exclude`` keeps
            some) for :class:`~tg_kernels.nn.PrunableMultiheadAttention`, the same attention with
            separate projections (same numbers; new state_dict keys), so all of them prune; the
            exported model then holds one wherever ``nn.MultiheadAttention`` cannot (export warns).

    Returns:
        The model (now holding ``model.tg_gates``) and that :class:`GateBank`, which lists the groups
        (``bank.groups``) and the pieces left ungated with their reasons (``bank.skipped``).

    Pieces the analysis cannot handle (untraceable code, unknown ops) stay ungated with one warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_gates expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("attach gates to the bare model first, then wrap it in DistributedDataParallel")
    if hasattr(model, BANK_NAME):
        raise ValueError("this model already has gates (model.tg_gates); attach_gates runs once per model")
    check_skip(skip)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    excluded = _excluded_names(model, exclude)
    if prunable_attention:
        swap_multihead_attention(model, excluded)

    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    analysis, opaque, failure = _analyse(
        model, inputs, dict(example_kwargs or {}), excluded, tracer, closed_gate_gradients, rules
    )
    if analysis is None:
        warnings.warn(
            f"tg_kernels.attach_gates: cannot trace {type(model).__name__}.forward ({failure}); "
            "the model stays ungated",
            stacklevel=2,
        )
        bank = GateBank({})
        bank.skipped[type(model).__name__] = f"untraceable forward: {failure}"
        model.add_module(BANK_NAME, bank)
        return model, bank

    self_checked: list[str] = []
    if self_check and analysis.groups:
        analysis, self_checked = _self_check(model, analysis, inputs, dict(example_kwargs or {}))
    bank = _install(model, analysis, opaque, skip, {"shape": gate_shape, "M": gate_M, "init": gate_init})
    if compact and bank.gates:
        install(model, bank, inputs, dict(example_kwargs or {}))
    if self_checked:
        warnings.warn(
            "tg_kernels.attach_gates: the self-check found that removing channels of these groups changes "
            f"the model's output, so they stay whole: {', '.join(self_checked[:8])}"
            + (f" and {len(self_checked) - 8} more" if len(self_checked) > 8 else "")
            + " (a size read of a gated dim, or code the analysis misread)",
            stacklevel=2,
        )

    unhandled = [f"{leaf} (untraceable)" for leaf in sorted(opaque)] + analysis.barriers
    if unhandled:
        shown = "; ".join(unhandled[:8]) + (f"; and {len(unhandled) - 8} more" if len(unhandled) > 8 else "")
        warnings.warn(
            f"tg_kernels.attach_gates: channels that reach these pieces stay ungated: {shown}. "
            f"{len(bank.groups)} gate groups were attached; see the returned bank's .skipped for every reason.",
            stacklevel=2,
        )
    return model, bank
