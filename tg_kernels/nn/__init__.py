"""Gated layers: drop-in nn.Linear / nn.Conv2d with one trainable gate per output channel."""

from tg_kernels.nn.gated import GatedConv2d, GatedLinear, forget_open_sets

__all__ = ["GatedConv2d", "GatedLinear", "forget_open_sets"]
