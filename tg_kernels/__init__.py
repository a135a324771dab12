"""tg_kernels: trainable channel gates (Kim et al., AAAI 2020) with fused kernels that skip gated-out channels.

Public API:

- :func:`trainable_gate`, :class:`TrainableGate`: the gate function and the module holding its parameter.
- :func:`channel_gate`: fused ``x * gate`` along a channel dimension, with a one-pass backward.
- :class:`GatedLinear`, :class:`GatedConv2d`: drop-in layers with a gate per output channel that skip
  closed channels while training (``skip="none" | "exact" | "hard"``).
- :func:`available_backends`, :func:`use_backend`: which implementation runs (torch, cpp, cuda, triton).
- :func:`build_info`: how the compiled extension was built and whether it loaded.
"""

__version__ = "0.1.0"

from tg_kernels._extension import build_info
from tg_kernels.backends import BackendInfo, BackendUnavailableError, available_backends, use_backend
from tg_kernels.gate import SHAPES, TrainableGate, trainable_gate
from tg_kernels.nn import GatedConv2d, GatedLinear
from tg_kernels.ops import channel_gate

__all__ = [
    "SHAPES",
    "BackendInfo",
    "BackendUnavailableError",
    "GatedConv2d",
    "GatedLinear",
    "TrainableGate",
    "available_backends",
    "build_info",
    "channel_gate",
    "trainable_gate",
    "use_backend",
]
