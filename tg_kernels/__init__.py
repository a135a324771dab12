"""tg_kernels: trainable channel gates (Kim et al., AAAI 2020) with fused kernels that skip gated-out channels.

Public API:

- :func:`trainable_gate`, :class:`TrainableGate`: the gate function and the module holding its parameter.
- :func:`channel_gate`: fused ``x * gate`` along a channel dimension, with a one-pass backward.
- :class:`GatedLinear`, :class:`GatedConv2d`: drop-in layers with a gate per output channel that skip
  closed channels while training (``skip="none" | "exact" | "hard"``).
- :func:`attach_gates`, :class:`Budget`, :func:`export`, :func:`save`, :func:`load`: the plug-in
  pruning workflow (gate any network, train towards a FLOPs budget, export a smaller plain model).
- :func:`prune`: that workflow in one call with the recommended schedule
  (``tg_kernels.prune(model, data, target=0.25)``); the pieces live in :mod:`tg_kernels.pruning`.
- :func:`available_backends`, :func:`use_backend`: which implementation runs (torch, cpp, cuda, triton).
- :func:`build_info`: how the compiled extension was built and whether it loaded.
"""

__version__ = "0.1.0"

from tg_kernels._extension import build_info
from tg_kernels.backends import BackendInfo, BackendUnavailableError, available_backends, use_backend
from tg_kernels.gate import SHAPES, TrainableGate, trainable_gate
from tg_kernels.nn import GatedConv2d, GatedLinear
from tg_kernels.ops import channel_gate
from tg_kernels.pruning import Budget, GateBank, attach_gates, export, load, prune, save

__all__ = [
    "SHAPES",
    "BackendInfo",
    "BackendUnavailableError",
    "Budget",
    "GateBank",
    "GatedConv2d",
    "GatedLinear",
    "TrainableGate",
    "attach_gates",
    "available_backends",
    "build_info",
    "channel_gate",
    "export",
    "load",
    "prune",
    "save",
    "trainable_gate",
    "use_backend",
]
