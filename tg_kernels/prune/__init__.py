"""The plug-in workflow: gate an arbitrary network, train it towards a budget, export a smaller model.

- :func:`attach_gates`: analyse a model's channels and put one trainable gate per coupled group.
- :class:`Budget`: the differentiable FLOPs / parameter / channel regulariser, with ``report()``.
- :func:`export`: a plain model with closed channels removed; :func:`save` / :func:`load`.
- :func:`prune`: all of it in one call with the recommended schedule. The package itself is
  callable: ``tg_kernels.prune(model, data, target=0.25)`` is ``tg_kernels.prune.prune(...)``.
"""

import sys
import types

from tg_kernels.prune.analysis import AnalysisError
from tg_kernels.prune.attach import GateBank, GroupInfo, attach_gates, gate_bank
from tg_kernels.prune.budget import METRICS, Budget, BudgetStatus, Usage
from tg_kernels.prune.export import export, load, save
from tg_kernels.prune.train import PruneResult, prune


class _CallablePackage(types.ModuleType):
    """Lets ``tg_kernels.prune(...)`` run :func:`prune` while ``tg_kernels.prune.Budget`` etc. still work."""

    def __call__(self, *args, **kwargs) -> PruneResult:
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

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
