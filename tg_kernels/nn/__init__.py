"""Gated layers: drop-in nn.Linear / nn.Conv2d with one trainable gate per output channel; and
PrunableMultiheadAttention, the form of ``nn.MultiheadAttention`` whose heads can be pruned."""

from tg_kernels.nn.attention import PrunableMultiheadAttention, restore_multihead_attention, swap_multihead_attention
from tg_kernels.nn.gated import GatedConv2d, GatedLinear, forget_open_sets

__all__ = [
    "GatedConv2d",
    "GatedLinear",
    "PrunableMultiheadAttention",
    "forget_open_sets",
    "restore_multihead_attention",
    "swap_multihead_attention",
]
