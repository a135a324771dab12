"""Functional ops: validation, layout handling, autograd and backend dispatch around the kernels."""

from tg_kernels.ops.channel_gate import channel_gate

__all__ = ["channel_gate"]
