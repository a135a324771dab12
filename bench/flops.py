"""An independent FLOPs count of a plain model, to check the budget's count against.

Counted with forward hooks on Conv2d and Linear only, as the budget counts them:
``2 * outputs * kernel * in_channels / groups`` for a conv, ``2 * outputs * in_features`` for a Linear
(bias and everything else excluded). Used by the tests and by ``bench/digits_budget.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def conv_linear_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of the Conv2d and Linear layers in one eval-mode forward of `x` (the model's mode is kept)."""
    total = 0.0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2.0 * out.numel() * math.prod(m.kernel_size) * m.in_channels / m.groups
        else:
            total += 2.0 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total
