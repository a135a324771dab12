"""The graph the analysis reads: a ``torch.export`` (non-strict) trace of the model, mapped back to it.

Non-strict export runs the model's own Python forward on fake tensors, so it sees through
``**kwargs`` forwards, functional calls (``F.batch_norm``) and containers such as ``nn.Transformer``,
and records a small ATen vocabulary (``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``,
``aten.split``, ``aten.scaled_dot_product_attention``, ...). Every node carries its value's shape
(``node.meta["val"]``) and its owning module calls (``node.meta["nn_module_stack"]``); the graph
signature names every parameter and buffer. :class:`Trace` collects what the rules need from that:
which placeholder is which tensor, which module call returns which node, how often each module
is called. The model is not changed and its buffers are restored.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn


@dataclass
class Trace:
    """A model's export graph and its map back to the model.

    Attributes:
        graph: the ATen graph (``ExportedProgram.graph``).
        tensor_of: placeholder node -> the fully qualified name of the parameter, buffer or constant
            it stands for.
        inputs: placeholder nodes that are the user's inputs.
        output_of: node -> names of the modules whose call returns exactly that node (innermost
            first). A gate hook on such a module multiplies exactly that value.
        calls: module name -> how many times the forward calls it.
        reads: tensor name -> how many op nodes read its placeholder.
        seconds: how long the export took.
    """

    graph: fx.Graph
    tensor_of: dict[fx.Node, str]
    inputs: set[fx.Node]
    output_of: dict[fx.Node, list[str]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    _shapes: dict[fx.Node, torch.Size | None] = field(default_factory=dict, repr=False)

    def shape(self, node: Any) -> torch.Size | None:
        """The static shape of a tensor node (None for non-tensors and non-nodes)."""
        if not isinstance(node, fx.Node):
            return None
        if node in self._shapes:
            return self._shapes[node]
        self._shapes[node] = shape = self._shape(node)
        return shape

    def _shape(self, node: fx.Node) -> torch.Size | None:
        value = node.meta.get("val")
        if isinstance(value, Tensor):
            try:
                return torch.Size(int(s) for s in value.shape)
            except (TypeError, ValueError):  # symbolic sizes: not static
                return None
        return None

    def value(self, node: Any) -> Any:
        """The example value of a node (a fake tensor, a Python number, a list of those)."""
        return node.meta.get("val") if isinstance(node, fx.Node) else node


def export_trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Trace:
    """Trace ``model(*args, **kwargs)`` with ``torch.export.export(strict=False)``.

    Raises whatever torch.export raises when it cannot trace the model (data-dependent control
    flow, for example); callers fall back to torch.fx then. Parameters and buffers are left as they
    were (batch statistics are restored).
    """
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    start = time.perf_counter()
    emit = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True  # the analysis never reads them; recording costs ~20%
    try:
        with warnings.catch_warnings():
            # nn.LSTM / nn.GRU rebuild their _flat_weights from the traced parameters (restored below)
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
            program = torch.export.export(model, tuple(args), dict(kwargs or {}), strict=False)
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved and b.shape == saved[name].shape:
                    b.copy_(saved[name])
        for module in model.modules():
            if isinstance(module, nn.RNNBase):
                module._init_flat_weights()  # its real parameters, not the traced ones
    seconds = time.perf_counter() - start
    signature = program.graph_signature
    names: dict[str, str] = {}
    names.update(signature.inputs_to_parameters)
    names.update(signature.inputs_to_buffers)
    names.update(getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {})
    graph = program.graph
    tensor_of: dict[fx.Node, str] = {}
    inputs: set[fx.Node] = set()
    user_inputs = set(signature.user_inputs)
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in names:
            tensor_of[node] = names[node.name]
        elif node.name in user_inputs:
            inputs.add(node)
    trace = Trace(graph, tensor_of, inputs, seconds=seconds)
    _map_module_calls(trace)
    for node in graph.nodes:
        if node.op == "call_function":
            for arg in {a for a in node.all_input_nodes if a in tensor_of}:
                trace.reads[tensor_of[arg]] = trace.reads.get(tensor_of[arg], 0) + 1
    return trace


def _map_module_calls(trace: Trace) -> None:
    """Fill ``output_of`` and ``calls`` from every node's ``nn_module_stack``."""
    scope: dict[str, set[fx.Node]] = {}
    path_of: dict[str, str] = {}
    depth_of: dict[str, int] = {}
    for node in trace.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for depth, (key, entry) in enumerate(stack.items()):
            path = entry[0] if isinstance(entry, tuple) else str(entry)
            if path == "":
                continue
            scope.setdefault(key, set()).add(node)
            path_of[key] = path
            depth_of[key] = depth
    for path in path_of.values():
        trace.calls[path] = trace.calls.get(path, 0) + 1
    found: dict[fx.Node, list[tuple[int, str]]] = {}
    for key, nodes in scope.items():
        outs = [n for n in nodes if any(u not in nodes for u in n.users)]
        if len(outs) == 1:
            found.setdefault(outs[0], []).append((depth_of[key], path_of[key]))
    for node, entries in found.items():
        trace.output_of[node] = [path for _, path in sorted(entries, reverse=True)]


__all__ = ["Trace", "export_trace"]
