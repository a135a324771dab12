"""The graph the analysis reads: a ``torch.export`` (non-strict) trace of the model, mapped back to it.

Non-strict export runs the model's own Python forward on fake tensors, so it sees through
``**kwargs`` forwards, functional calls (``F.batch_norm``) and containers such as ``nn.Transformer``,
and records a small ATen vocabulary (``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``,
``aten.split``, ``aten.scaled_dot_product_attention``, ...). Every node carries its value's shape
(``node.meta["val"]``) and its owning module calls (``node.meta["nn_module_stack"]``); the graph
signature names every parameter and buffer. :class:`Trace` collects what the rules need from that:
which placeholder is which tensor, which module call returns which node, how often each module
is called. The model is not changed and its buffers are restored.

Only the output's tensors count as outputs: objects pytree cannot flatten (a Hugging Face
``DynamicCache`` that ``use_cache=True`` returns) are left out of the trace's outputs, so they
neither stop the trace nor fix the channels they hold.

Where torch.export cannot trace the forward because Python control flow reads tensor values
(``nn.TransformerEncoder`` comparing a mask with a causal one), :func:`real_trace` records the
same ATen graph by running the model on the example inputs themselves: each such branch takes the
way the example takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.fx.experimental import proxy_tensor


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
            with _tensor_outputs(model) as outputs, _quiet_unless_traced():
                program = torch.export.export(model, tuple(args), dict(kwargs or {}), strict=False)
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit
        restore_buffers(model, saved)
    _say_left_out(model, outputs.left_out)
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
    return _finished(Trace(graph, tensor_of, inputs, seconds=seconds))


@contextlib.contextmanager
def _quiet_unless_traced() -> Iterator[None]:
    """Hold back what torch.export writes to stderr: a failed export prints its partial graph and
    logs data-dependent guards, which the caller's one warning replaces. After a successful trace,
    whatever was written (the model's own messages) is passed on."""
    held = io.StringIO()
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        logger.setLevel(level)
    sys.stderr.write(held.getvalue())


def output_tensors(output: Any, left_out: set[str] | None = None) -> list[Tensor]:
    """The tensors of a model output that count as outputs: pytree's leaves (tuples, lists, dicts,
    Hugging Face outputs), inside dataclasses too. Other objects (a KV cache the caller hands back
    in) are left out; the names of their types go to ``left_out``."""
    found: list[Tensor] = []
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found += output_tensors([getattr(leaf, f.name) for f in dataclasses.fields(leaf)], left_out)
        elif left_out is not None and leaf is not None and not isinstance(leaf, (int, float, bool, str)):
            left_out.add(type(leaf).__name__)
    return found


class _tensor_outputs:
    """While active, the model returns only the tensors of its output (see the module docstring).
    ``left_out``: the types of the objects left out."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.left_out: set[str] = set()

    def _tensors(self, module: nn.Module, args: Any, output: Any) -> tuple[Tensor, ...]:
        return tuple(output_tensors(output, self.left_out))

    def __enter__(self) -> _tensor_outputs:
        self.handle = self.model.register_forward_hook(self._tensors)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _say_left_out(model: nn.Module, left_out: set[str]) -> None:
    if left_out:
        warnings.warn(
            f"tg_kernels.attach_gates: {type(model).__name__}'s output holds {', '.join(sorted(left_out))}, "
            "which is not counted as an output: its tensors may shrink with the pruned model (right for a "
            "KV cache the caller hands back in). Return tensors, tuples, dicts or dataclasses for outputs "
            "whose channels must stay whole",
            stacklevel=4,
        )


def restore_buffers(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Put back the buffers a traced forward changed (batch statistics) and RNN flat weights."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in saved and b.shape == saved[name].shape:
                b.copy_(saved[name])
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()  # its real parameters, not the traced ones


class _ModuleCalls:
    """Forward hooks that record, for every module call, the graph nodes its forward created.

    Gives a real-value trace the ``nn_module_stack`` metadata torch.export writes: every node maps
    to the module calls it ran in, outermost first, keyed per call (``path@n`` for the n-th call).
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: name for name, m in model.named_modules(remove_duplicate=False)}
        self.stack: list[tuple[str, str, fx.Node | None]] = []
        self.count: dict[str, int] = {}
        self.spans: list[tuple[list[tuple[str, tuple[str, str]]], fx.Node | None, fx.Node | None]] = []
        self.handles: list[Any] = []
        self.model = model

    @staticmethod
    def _last_node() -> fx.Node | None:
        mode = proxy_tensor.get_proxy_mode()
        if mode is None:
            return None
        nodes = mode.tracer.graph.nodes
        return next(iter(reversed(nodes)), None)

    def _pre(self, module: nn.Module, args: Any) -> None:
        path = self.names.get(module, "")
        n = self.count[path] = self.count.get(path, 0) + 1
        key = path if n == 1 else f"{path}@{n - 1}"
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        self.stack.append((key, (path, kind), self._last_node()))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        key, entry, before = self.stack.pop()
        outer = [(k, e) for k, e, _ in self.stack] + [(key, entry)]
        self.spans.append((outer, before, self._last_node()))

    def __enter__(self) -> _ModuleCalls:
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def annotate(self, graph: fx.Graph) -> None:
        """Write ``nn_module_stack`` into every node created inside a recorded call."""
        order = {node: i for i, node in enumerate(graph.nodes)}
        nodes = list(graph.nodes)
        stacks: dict[fx.Node, dict[str, tuple[str, str]]] = {}
        for outer, before, last in self.spans:
            if last is None or last not in order:
                continue
            start = order[before] + 1 if before in order else 0
            for node in nodes[start : order[last] + 1]:
                stack = stacks.setdefault(node, {})
                for key, entry in outer:
                    stack.setdefault(key, entry)
        for node, stack in stacks.items():  # the innermost call's span came first: its nesting order
            node.meta["nn_module_stack"] = stack


class DataDependentBranch(RuntimeError):
    """The forward reads a value computed from its inputs or weights (``if x.sum() > 0``): a
    recorded run would burn in one branch, so it does not stand for every input."""


def _check_branches_read_constants(graph: fx.Graph, module: fx.GraphModule, tensors: dict[int, str]) -> None:
    """Raise :class:`DataDependentBranch` where a value Python reads (``.item()``, ``bool(t)``) depends
    on the inputs, parameters or buffers; values made from constants alone (a causal mask built from
    the sequence length) take the same branch for every input, so a recorded run stands for all."""

    def from_data(node: fx.Node) -> bool:
        if node.op == "placeholder":
            return True
        return node.op == "get_attr" and id(getattr(module, node.target)) in tensors

    depends: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        depends[node] = from_data(node) or any(depends.get(a, False) for a in node.all_input_nodes)
        target = node.target
        if (
            node.op == "call_function"
            and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.data_dependent_output in target.tags
            and depends[node]
        ):
            where = next(iter(reversed(list((node.meta.get("nn_module_stack") or {}).values()))), ("", ""))[0]
            raise DataDependentBranch(
                f"the forward reads a value computed from its inputs or weights ('{target.name()}'"
                + (f" in '{where}'" if where else "")
                + "), so one recorded run does not stand for every input"
            )


def real_trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Trace:
    """Trace ``model(*args, **kwargs)`` by running it on the example inputs (``make_fx``, real values).

    The fallback for forwards whose Python control flow reads tensor values, which torch.export
    cannot trace: each such branch takes the way the example inputs take. That stands for every
    input only where the values read are made from constants (a mask built from the sequence
    length): a value read from the inputs, parameters or buffers raises
    :class:`DataDependentBranch`. The graph is the same
    pre-dispatch ATen graph torch.export records, with parameters and buffers as placeholders and
    each node's module calls in ``nn_module_stack``. Buffers are restored afterwards.
    """
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    kwargs = dict(kwargs or {})
    start = time.perf_counter()

    left_out: set[str] = set()

    def forward(*inputs: Any) -> tuple[Tensor, ...]:
        return tuple(output_tensors(model(*inputs, **kwargs), left_out))

    try:
        with warnings.catch_warnings(), _ModuleCalls(model) as calls:
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
            module = proxy_tensor.make_fx(
                forward, tracing_mode="real", pre_dispatch=True, _error_on_data_dependent_ops=False
            )(*args)
    finally:
        restore_buffers(model, saved)
    _say_left_out(model, left_out)
    graph = module.graph
    calls.annotate(graph)
    tensors = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
    _check_branches_read_constants(graph, module, tensors)
    tensor_of: dict[fx.Node, str] = {}
    inputs = {node for node in graph.nodes if node.op == "placeholder"}
    first = next(iter(graph.nodes))
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(module, node.target)
        name = tensors.get(id(value), str(node.target))  # a tensor the forward made: a constant
        with graph.inserting_before(first):
            placeholder = graph.placeholder(name.replace(".", "_"))
        placeholder.meta.update(node.meta)
        placeholder.meta.setdefault("val", value)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        tensor_of[placeholder] = name
    return _finished(Trace(graph, tensor_of, inputs, seconds=time.perf_counter() - start))


def _finished(trace: Trace) -> Trace:
    """Fill in the module calls and how often each parameter or buffer is read."""
    _map_module_calls(trace)
    for node in trace.graph.nodes:
        if node.op == "call_function":
            for arg in {a for a in node.all_input_nodes if a in trace.tensor_of}:
                name = trace.tensor_of[arg]
                trace.reads[name] = trace.reads.get(name, 0) + 1
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


__all__ = ["DataDependentBranch", "Trace", "export_trace", "output_tensors", "real_trace", "restore_buffers"]
