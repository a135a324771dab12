"""The plug-in workflow: gate an arbitrary network, train it towards a budget, export a smaller model.

- :func:`attach_gates`: analyse a model's channels and put one trainable gate per coupled group.
- :class:`Budget`: the differentiable FLOPs / parameter / channel regulariser, with ``report()``.
- :func:`export`: a plain model with closed channels removed; :func:`save` / :func:`load`.
- :func:`prune`: all of it in one call with the recommended schedule (``tg_kernels.prune``).
"""

from tg_kernels.pruning.analysis import AnalysisError
from tg_kernels.pruning.attach import attach_gates
from tg_kernels.pruning.bank import GateBank, GroupInfo, gate_bank
from tg_kernels.pruning.budget import METRICS, Budget, BudgetStatus, Usage
from tg_kernels.pruning.export import export, load, save
from tg_kernels.pruning.train import PruneResult, prune

__all__ = [
    "METRICS",
    "AnalysisError",
    "Budget",
    "BudgetStatus",
    "GateBank",
    "GroupInfo",
    "PruneResult",
    "Usage",
    "attach_gates",
    "export",
    "gate_bank",
    "load",
    "prune",
    "save",
]
