"""Channel analysis of an arbitrary model: which channels are coupled, where gates go, what export slices.

The model is traced with ``torch.export`` (non-strict; analysis only: the model keeps running its
own code), or by running it on the example inputs where torch.export cannot. Every value that
carries channels gets a :class:`ChannelInfo`: its channel dimension and the list of *spaces* its
channels come from. A space is created by a producer (a Conv or Linear
output) and merged with others where an op couples channels (a residual add shares one gate);
``cat`` concatenates spaces; ``split`` / slicing cut a producer's output into pieces; a depthwise
conv passes its input's spaces through. Anything the rules do not understand is a *barrier*: the
spaces that reach it are fixed (kept whole, ungated) and named in a warning.

Layout (each module imports only those above it in this list):

- :mod:`.aten`: the ATen vocabulary: op names (:func:`~.aten.op_name`), the named sets of ops the
  passes treat alike, an elementwise op's value and derivative at 0, picklable op references.
- :mod:`.types`: the result types (:class:`Analysis` and its parts).
- :mod:`.spaces`: the union-find over channel spaces, and the map of spaces to their groups.
- :mod:`.tracing`: the export trace (or, where the forward reads tensor values, the trace of a run
  on the example inputs) and its map back to the model (parameters, module calls).
- :mod:`.walk`: one pass over the graph (:class:`~.walk.Walk`): its state, and the methods the op
  rules call.
- :mod:`.rules`: one rule per ATen op (:data:`RULES`, extended with :func:`register_rule`, or per
  analysis with :func:`rule_table`).
- :mod:`.head_dims`: gates on the dims within attention heads, a pass over the stable walk.
- :mod:`.gradients`: the side-pass recipes of ``exact`` mode, read off the stable walk.
- :mod:`.driver`: the driver: walks repeated until stable, then the result (:func:`analyze_export`).
- :mod:`.fx_legacy`: the torch.fx analysis, used for models that torch.export cannot trace.

Gates must zero what consumers read (docs/design.md §4). A producer is gated at its output, or after
the BatchNorm that is its only user (and the activations right after it). Ops that keep a zero
channel zero pass that on; ops that do not (a norm, ``sigmoid``) break it, and a consumer that
reads such a value asks for a gate right after the module that returns it ("regate"), or, where no
module returns it, fixes the space.
"""

from tg_kernels.pruning.analysis.driver import analyze_export
from tg_kernels.pruning.analysis.fx_legacy import analyze, record_shapes, trace
from tg_kernels.pruning.analysis.rules import RULES, Rule, register_rule, rule_table
from tg_kernels.pruning.analysis.tracing import Trace, export_trace, output_tensors, real_trace
from tg_kernels.pruning.analysis.types import (
    Analysis,
    AnalysisError,
    ChannelInfo,
    GatePoint,
    Group,
    LayerCost,
    RecurrentGate,
    Slice,
)

__all__ = [
    "RULES",
    "Rule",
    "Analysis",
    "AnalysisError",
    "ChannelInfo",
    "GatePoint",
    "Group",
    "LayerCost",
    "RecurrentGate",
    "Slice",
    "Trace",
    "analyze",
    "analyze_export",
    "export_trace",
    "output_tensors",
    "real_trace",
    "record_shapes",
    "register_rule",
    "rule_table",
    "trace",
]
