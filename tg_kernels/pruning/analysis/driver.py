"""The analysis driver: walks over a model's export graph, repeated until stable, then the result.

:func:`analyze_export` runs :class:`~tg_kernels.pruning.analysis.walk.Walk` s with a rule table
(:data:`~tg_kernels.pruning.analysis.rules.RULES`, or a copy extended for one call) until a walk
learns nothing new (no new regate, space to keep whole, cut or head unit), drops gate points that
became unnecessary and, with ``closed_gradients``, leaves out producer gates that a later gate of
their group makes redundant. :func:`finish` turns the stable walk into an
:class:`~tg_kernels.pruning.analysis.types.Analysis`, after the passes that run on it: head dims
(:mod:`~tg_kernels.pruning.analysis.head_dims`) and side-pass recipes
(:mod:`~tg_kernels.pruning.analysis.gradients`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from torch import nn

from tg_kernels.pruning.analysis.aten import op_name
from tg_kernels.pruning.analysis.gradients import side_passes
from tg_kernels.pruning.analysis.head_dims import find_head_dims
from tg_kernels.pruning.analysis.rules import Rule, rule_table
from tg_kernels.pruning.analysis.spaces import remap, remap_dims
from tg_kernels.pruning.analysis.tracing import Trace
from tg_kernels.pruning.analysis.types import (
    Analysis,
    AnalysisError,
    GatePoint,
    Group,
    LayerCost,
    RecurrentGate,
    SizeAttr,
)
from tg_kernels.pruning.analysis.walk import Walk


def analyze_export(
    model: nn.Module,
    trace: Trace,
    excluded: set[str] | None = None,
    closed_gradients: bool = True,
    rules: Mapping[str, Rule] | None = None,
) -> Analysis:
    """Analyse a model from its export trace (see the module docstring). ``closed_gradients``: place
    no gate right before a ReLU-like activation (see ``attach_gates``). ``rules``: op name ->
    rule for this call only, on top of (or instead of) the rules of :data:`RULES` for those ops,
    which stays as it is (:func:`~tg_kernels.pruning.analysis.rules.rule_table`)."""
    table = rule_table(rules)
    gate_points: set[str] = set()
    requested: set[str] = set()
    forced_fixed: dict[str, str] = {}
    cuts: dict[str, set[int]] = {}
    units: dict[str, int] = {}

    suppressed: frozenset[str] = frozenset()

    def walk(points: set[str]) -> Walk:
        w = Walk(model, trace, points, forced_fixed, cuts, set(excluded or ()), units, closed_gradients, suppressed)
        w.run(table)
        return w

    def learned(w: Walk, points: set[str]) -> bool:
        return bool(
            w.new_gate_points - points or set(w.spaces.new_fixed) - set(forced_fixed) or w.new_cuts or w.new_units
        )

    for _ in range(200):
        w = walk(set(gate_points))
        if not learned(w, gate_points):
            break
        if w.new_cuts or w.new_units:  # they change the spaces: what this walk fixed or gated may not hold after them
            for key, c in w.new_cuts.items():
                cuts.setdefault(key, set()).update(c)
            units.update(w.new_units)
            continue
        requested |= w.new_gate_points - gate_points
        gate_points |= w.new_gate_points
        forced_fixed.update(w.spaces.new_fixed)
    else:  # pragma: no cover - each walk only adds
        raise AnalysisError("channel analysis did not converge")
    # A gate point requested early may have become unnecessary (a later regate upstream made the
    # channels zero anyway); drop those, since export cannot fold gates into every kind of module.
    for _ in range(len(requested) + 1):
        idle = {name for name in requested & gate_points if not w.needed.get(name, True)}
        if not idle:
            break
        trial = gate_points - idle
        tried = walk(set(trial))
        if learned(tried, trial):  # dropping them all at once does not hold: drop them one by one
            for name in sorted(idle):
                one = gate_points - {name}
                if not learned(walk(set(one)), one):
                    gate_points = one
            break
        gate_points, w = trial, tried
    w = walk(set(gate_points))
    result = finish(model, trace, w)
    if not closed_gradients:
        return result
    # A producer's gate whose closed gates get no task gradient because a later gate of the group
    # zeros the channels again (MobileNetV2: expand -> gate -> depthwise -> BatchNorm -> gate) is not
    # needed where the ops between keep channels apart: leave it out, so that the later gate's
    # closed channels carry the producer's values (and a task gradient) instead of BatchNorm's beta,
    # unless that leaves the later gate without a side-pass recipe (exact training would then run
    # its group at full width).
    dead = sorted({w.placed_by[sp.point] for sp in result.side_passes if sp.dead and sp.point in w.placed_by})
    kept: frozenset[str] = frozenset()

    def without_recipe(a: Analysis) -> set[str]:
        name_of = {g.space: g.name for g in a.groups}
        return {name_of.get(a.root_of.get(sp.space), "") for sp in a.side_passes if sp.reason is not None}

    slow = without_recipe(result)

    finished: dict[frozenset[str], Analysis] = {}  # left-out set -> its result, where that held

    def holds(trial: Walk) -> bool:  # exact as before, and no group newly without a side-pass recipe
        if learned(trial, gate_points):
            return False
        analysis = finish(model, trace, trial)
        if without_recipe(analysis) <= slow:
            finished[suppressed] = analysis
            return True
        return False

    def leave_out(names: list[str]) -> None:  # all at once where that holds, else by halves
        nonlocal suppressed, kept
        suppressed = kept | set(names)
        if holds(walk(set(gate_points))):
            kept = suppressed
        elif len(names) > 1:
            leave_out(names[: len(names) // 2])
            leave_out(names[len(names) // 2 :])
        suppressed = kept

    if dead:
        leave_out(dead)
    if not kept:
        return result
    return finished[kept] if kept in finished else finish(model, trace, walk(set(gate_points)))


def _checked_widths(model: nn.Module, w: Walk) -> list[SizeAttr]:
    """Int attributes that a ``torch.nn`` forward compares with a gated width in Python, outside the
    graph: ``nn.Transformer`` checks that src and tgt are ``d_model`` wide (the width its encoder's
    final norm normalises over)."""
    norms = dict(w.norms)
    found = []
    for name, module in model.named_modules():
        norm = f"{name}.encoder.norm" if name else "encoder.norm"
        if isinstance(module, nn.Transformer) and norm in norms:
            found.append(SizeAttr(name, "d_model", norms[norm], 1))
    return found


def finish(model: nn.Module, trace: Trace, w: Walk) -> Analysis:
    """The result of a stable walk."""
    w.add_size_attrs(_checked_widths(model, w))
    head_dims = find_head_dims(w)
    sp = w.spaces
    groups: dict[int, Group] = {}
    fixed: dict[str, str] = {}
    for root, members in sorted(sp.roots().items()):
        producers = list(dict.fromkeys(sp.spaces[m].producer for m in members if sp.spaces[m].producer))
        reason = next((sp.spaces[m].fixed for m in members if sp.spaces[m].fixed), None)
        if reason is not None:
            for prod in producers:
                fixed.setdefault(prod, reason)
            continue
        if not producers:
            continue
        first = next(sp.spaces[m] for m in members if sp.spaces[m].producer)
        label = first.key.split(":", 1)[1]
        groups[root] = Group(root, label.replace("#", "_"), sp.size(root), producers)
    root_of = {s: sp.find(s) for s in range(len(sp)) if sp.find(s) in groups}
    for sl in dict.fromkeys(w.slices):
        if sl.space in root_of:
            groups[root_of[sl.space]].slices.append(sl)
    for name in [n for n in fixed if any(n in g.producers for g in groups.values())]:
        del fixed[name]  # a producer cut into pieces: some gated, some not
    fixed.update({f"{hd.module} (head dims)": hd.reason for hd in head_dims if hd.reason is not None})

    def gated(parts):
        return remap(parts, root_of)

    def gated_dims(dims):  # per part: () or (space, size) parts
        return remap_dims(dims, root_of)

    points: dict[tuple[str, bool], GatePoint] = {}
    for gp in w.points:
        parts = gated(gp.parts)
        if (all(r is None for r, _ in parts) and not gated_dims(gp.dims)) or (gp.module, gp.on_input) in points:
            continue
        replace = gp.replace and len(parts) == 1
        points[gp.module, gp.on_input] = GatePoint(
            gp.module, gp.dim, parts, replace, gp.fold, gp.repeat, gp.on_input, gated_dims(gp.dims)
        )

    layers = [
        dataclasses.replace(
            lc,
            in_parts=gated(lc.in_parts),
            out_parts=gated(lc.out_parts),
            in_dims=gated_dims(lc.in_dims),
            out_dims=gated_dims(lc.out_dims),
        )
        for lc in w.layers
    ]
    counted = {lc.module for lc in layers}
    other_params = sum(
        param.numel()
        for name, param in model.named_parameters()
        if name not in counted and (name.rsplit(".", 1)[0] if "." in name else "") not in counted
    )
    other_flops = 0.0  # ops whose FLOPs no LayerCost counts
    for node in trace.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name == "scaled_dot_product_attention":
            q, k, v = (trace.shape(a) for a in node.args[:3])
            if q is not None and k is not None and v is not None:
                w.add_flops(node, 2.0 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1]))
        elif name in ("baddbmm", "einsum") and trace.shape(node) is not None:
            shapes = [trace.shape(a) for a in node.all_input_nodes]
            if name == "baddbmm" and len(shapes) == 3 and shapes[1] is not None:
                w.add_flops(node, 2.0 * math.prod(trace.shape(node)) * shapes[1][-1])
        if node in w.flops_of and node not in w.costed_nodes:
            other_flops += w.flops_of[node]
    covered = 0.0
    uncovered: dict[str, float] = {}
    for lc in layers:
        f = lc.flops_per_pair * _pairs(lc)
        if _gated(lc):
            covered += f
        elif f:
            reason = fixed.get(lc.module, "its channels are never gated")
            uncovered[reason] = uncovered.get(reason, 0.0) + f
    if other_flops:
        uncovered["attention and other ops whose cost does not depend on gates"] = other_flops
    total = covered + sum(uncovered.values())

    gate_points = list(points.values())
    return Analysis(
        groups=list(groups.values()),
        gate_points=gate_points,
        layers=layers,
        fixed=fixed,
        barriers=list(dict.fromkeys(w.barriers)),
        root_of=root_of,
        other_params=other_params,
        other_flops=other_flops,
        after_norm=[(name, space) for name, space in w.after_norm if space in root_of],
        conv_inputs=[(name, gated(parts)) for name, parts in w.conv_inputs if any(s in root_of for s, _ in parts)],
        tracer="export",
        norms=[(name, gated(parts)) for name, parts in w.norms if any(s in root_of for s, _ in parts)],
        coverage=covered / total if total else 0.0,
        uncovered=uncovered,
        size_attrs=[
            dataclasses.replace(sa, parts=gated(sa.parts), dims=gated(sa.dims))
            for sa in dict.fromkeys(w.size_attrs)
            if any(s in root_of for s, _ in sa.parts + sa.dims)
        ],
        side_passes=side_passes(model, w, root_of, gate_points),
        recurrent=[
            RecurrentGate(rg.module, root_of[rg.space], rg.size, rg.block, rg.blocks)
            for rg in dict.fromkeys(w.recurrent)
            if rg.space in root_of
        ],
        head_dims=[dataclasses.replace(hd, space=root_of.get(hd.space)) for hd in head_dims],
    )


def _pairs(lc: LayerCost) -> float:
    a = sum(size * rep for _, size, rep in lc.in_parts)
    b = sum(size * rep for _, size, rep in lc.out_parts)
    return b if lc.depthwise else a * b


def _gated(lc: LayerCost) -> bool:
    return any(s is not None for s, _, _ in lc.in_parts + lc.out_parts)


__all__ = ["analyze_export", "finish"]
