"""The plug-in workflow: gate an arbitrary network, train it towards a budget, export a smaller model.

- :func:`attach_gates`: analyse a model's channels and put one trainable gate per coupled group.
- :class:`Budget`: the differentiable FLOPs / parameter / channel regulariser, with ``report()``.
- :func:`export`: a plain model with closed channels removed; :func:`save` / :func:`load`.
"""

from tg_kernels.prune.analysis import AnalysisError
from tg_kernels.prune.attach import GateBank, GroupInfo, attach_gates, gate_bank
from tg_kernels.prune.budget import METRICS, Budget, Usage
from tg_kernels.prune.export import export, load, save

__all__ = [
    "METRICS",
    "AnalysisError",
    "Budget",
    "GateBank",
    "GroupInfo",
    "Usage",
    "attach_gates",
    "export",
    "gate_bank",
    "load",
    "save",
]
