"""Small models, one per structural pattern that dependency-graph pruners test against.

The patterns follow the structures of Torch-Pruning's test models (cascaded and nested concats,
concat then split, splits into unequal pieces, a module called twice, non-channel concats, reshapes
between a Linear and a transposed conv, several inputs and outputs, a one-channel output, unused
parameters, per-channel parameters outside any module, LeNet), plus the common building blocks that
every pruner has to get right (grouped and depthwise convs, squeeze-and-excitation, chunk / unbind,
pixel shuffle, an inception block with a pooling branch, hand-written and ``nn.MultiheadAttention``
attention, RNNs, weight tying, layer scale). The code is this project's own; each model is small
enough to run in float64 in a fraction of a second.

``FIXTURES``: name -> (builder, example-input factory, reason). ``reason`` is ``None`` where the model
must gate at least one group; otherwise the exact phrase the package reports (in ``bank.skipped``
or a warning) for why it gates nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    """conv -> BatchNorm -> GELU, same spatial size."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.GELU())


class NestedConcat(nn.Module):
    """Four branches of different widths concatenated in three nested steps, then one conv reads them all."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Sequential(_cbr(c, c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(_cbr(c, 2 * c), nn.Conv2d(2 * c, 2 * c, 1), nn.BatchNorm2d(2 * c))
        self.c = nn.Sequential(nn.Conv2d(c, 3 * c, 1), nn.BatchNorm2d(3 * c))
        self.d = nn.Sequential(nn.Conv2d(c, 5 * c, 1), nn.BatchNorm2d(5 * c))
        self.out = nn.Conv2d(11 * c, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ab = torch.cat([self.a(x), self.b(x)], 1)
        abc = torch.cat([ab, self.c(x)], 1)
        return self.out(torch.cat([abc, self.d(x)], 1))


class WideAndDeep(nn.Module):
    """A recommender: a deep MLP (BatchNorm1d, dropout) beside a wide Linear, their outputs concatenated."""

    def __init__(self, features: int = 12) -> None:
        super().__init__()
        self.deep = nn.Sequential(
            nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(16, 1),
        )  # fmt: skip
        self.wide = nn.Linear(features, 3)
        self.top = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return torch.sigmoid(self.top(torch.cat([self.wide(x), self.deep(x)], dim=-1)))


class SplitConcatResidual(nn.Module):
    """A block's output split in two: one piece concatenated with a parallel path, the other added back at the end."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.block = nn.Sequential(_cbr(c, c), nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c))
        self.side = nn.Sequential(_cbr(c, c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.merge = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        first, second = torch.split(h, [h.shape[1] // 2, h.shape[1] - h.shape[1] // 2], 1)
        return self.merge(torch.cat([first, self.side(x)], 1)) + second


class UnequalSplitSharedBlock(nn.Module):
    """A split into three unequal pieces; one block (the same module) reads the first two pieces."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.expand = nn.Sequential(_cbr(c, c), nn.Conv2d(c, 4 * c, 1), nn.BatchNorm2d(4 * c))
        self.shared = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.head = nn.Conv2d(3 * c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.shared[0].in_channels
        p1, p2, p3 = torch.split(self.expand(x), [c, c, 2 * c], dim=1)
        return self.head(torch.cat([self.shared(p1), self.shared(p2), self.last(p3)], 1))


class SpatialConcatSplit(nn.Module):
    """Two branches concatenated along the height, one conv over both, split back along the height."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.top = nn.Sequential(_cbr(c, c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.bottom = nn.Sequential(_cbr(c, c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.mix = nn.Conv2d(c, c, 1)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = self.top(x), self.bottom(x)
        h = self.mix(torch.cat([t, b], dim=2))
        upper, _ = torch.split(h, [t.shape[2], b.shape[2]], dim=2)
        return self.out(upper)


class LinearToDeconv(nn.Module):
    """A Linear's features viewed as a (channels, 4, 4) map, two transposed convs, flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32 * 16)
        self.up1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.head = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x)).view(-1, self.up1.in_channels, 4, 4)
        h = F.relu(self.up2(F.relu(self.up1(h))))
        return self.head(torch.flatten(h, 1))


class TwoInputsThreeOutputs(nn.Module):
    """Two inputs, each through its own Linear, concatenated; the model returns all three activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(5, 12)
        self.fc3 = nn.Linear(20, 16)
        self.hidden = nn.Linear(5, 24)
        self.fc4 = nn.Linear(24, 12)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = F.relu(self.fc1(x1)), F.relu(self.fc2(x2))
        return a, b + self.fc4(F.relu(self.hidden(x2))), F.relu(self.fc3(torch.cat([a, b], 1)))


class OneChannelOutput(nn.Module):
    """Convs with BatchNorm down to a single output channel (with its own BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 2, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 1, 3, padding=1), nn.BatchNorm2d(1), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ScaledL2Norm(nn.Module):
    """x / ||x|| over the channel dim, a learned per-channel scale and shift, then a Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.shift = nn.Parameter(torch.randn(dim) * 0.1)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / x.pow(2).sum(dim=1, keepdim=True).sqrt()
        return self.fc(x * self.scale + self.shift)


class CustomLayerMLP(nn.Module):
    """A user-written layer (parameters used by hand, not through a torch.nn module) between Linears;
    one parameter is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 24)
        self.custom = ScaledL2Norm(24)
        self.fc2 = nn.Linear(24, 4)
        self.unused = nn.Parameter(torch.randn(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.custom(F.relu(self.fc1(x))))


class ResidualMLP(nn.Module):
    """fc1 -> ReLU, fc2 -> ReLU added to fc1's activation, fc3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(skip)) + skip)


class LeNet(nn.Module):
    """LeNet-5: conv, pool, conv, pool, flatten with view, three Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 4 * 4, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.relu(self.conv1(x)), 2)
        y = F.max_pool2d(F.relu(self.conv2(y)), 2)
        y = y.view(y.shape[0], -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(y)))))


class ConvTransposeSandwich(nn.Module):
    """conv -> transposed conv (upsampling) -> conv, each with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up, self.bn2 = nn.ConvTranspose2d(16, 32, 2, stride=2), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.up(h))))


class GroupedAndDepthwise(nn.Module):
    """A grouped 3x3 conv (4 groups), a depthwise-separable block and a residual around both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.grouped = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.pointwise(self.depthwise(self.grouped(h)))
        return self.head(h.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """An inverted residual with squeeze-and-excitation: the pooled channels scale the channels."""

    def __init__(self, c: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.stem = _cbr(3, c, 3)
        self.expand = _cbr(c, hidden)
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.BatchNorm2d(hidden))
        self.se_reduce, self.se_expand = nn.Conv2d(hidden, 8, 1), nn.Conv2d(8, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        e = F.silu(self.dw(self.expand(h)))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(e.mean((2, 3), keepdim=True)))))
        h = h + self.project(e * s)
        return self.head(h.mean((2, 3)))


class GatedLinearUnit(nn.Module):
    """A conv's output chunked in two halves along the channels, one half gating the other (GLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return self.out(a * torch.sigmoid(b))


class UnbindHeads(nn.Module):
    """A Linear's features viewed as three stacked parts, unbound and recombined elementwise."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3 * 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.fc(x).view(x.shape[0], 3, 16).unbind(1)
        return self.out(a * b + c)


class PixelShuffleUpsampler(nn.Module):
    """Super-resolution tail: conv to 4x channels, PixelShuffle(2), conv."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _cbr(3, 16, 3)
        self.up = nn.Conv2d(16, 8 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.shuffle(self.up(self.body(x)))))


class PixelUnshuffleDownsampler(nn.Module):
    """conv -> PixelUnshuffle(2) (each channel becomes four, at half the resolution) -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.pixel_unshuffle(torch.relu(self.conv1(x)), 2))


class MixedKernelSplit(nn.Module):
    """MixNet-style mixed depthwise conv: the expanded channels split by a list attribute
    (``self.splits``), each piece through a depthwise conv of its own kernel size, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.splits = [8, 16]
        self.mixed = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.splits, (3, 5), strict=True)
        )
        self.out = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(self.expand(x), self.splits, 1)
        return self.out(torch.cat([conv(p) for conv, p in zip(self.mixed, pieces, strict=True)], 1))


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1, 1x1-3x3, 1x1-5x5, maxpool-1x1) concatenated, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 12, 3)
        self.b1 = _cbr(12, 8)
        self.b2 = nn.Sequential(_cbr(12, 6), _cbr(6, 8, 3))
        self.b3 = nn.Sequential(_cbr(12, 4), _cbr(4, 6, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(12, 6))
        self.head = nn.Linear(28, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.cat([self.b1(h), self.b2(h), self.b3(h), self.b4(h)], 1)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class HandwrittenAttention(nn.Module):
    """A pre-norm transformer block written by hand: token embedding, a fused qkv Linear split into
    heads by reshape / permute / unbind, softmax attention, output projection, MLP, residuals."""

    def __init__(self, features: int = 8, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(features, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, -1))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class TorchMultiheadAttention(nn.Module):
    """nn.MultiheadAttention between Linears (a kept stream: by default its heads stay whole)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 48), nn.ReLU(), nn.Linear(48, dim))
        self.out = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(h + self.ffn(h))


class RecurrentEncoder(nn.Module):
    """A conv front end over a sequence (Conv1d), an LSTM over its output, a GRU cell-free head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        out, _ = self.lstm(h)
        return self.head(out[:, -1])


class TiedEmbeddings(nn.Module):
    """A language model whose output projection reuses the embedding matrix."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.lm_head(self.norm(h + self.ffn(h)))


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style block: depthwise 7x7, channels-last LayerNorm, MLP, a per-channel layer scale
    parameter multiplied by hand (not owned by any torch.nn layer), residual."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.norm(self.dw(h).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))) * self.gamma
        h = h + y.permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


class ChannelReadInForward(nn.Module):
    """A forward that branches on a channel count it reads from the tensor: the count is data the
    model computes with, so removing a channel would change what the model does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(h) * h.shape[1] / 16


class FeatureOnlyModel(nn.Module):
    """One Linear straight to the output: the only channels are the model's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class CachedBias(nn.Module):
    """A learned per-position bias that the eval forward computes once and keeps in a plain dict
    (what timm's LeViT does with its attention biases): the cache holds a tensor with a grad_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.bias_table = nn.Parameter(torch.randn(4, 16))
        self.cache: dict[str, torch.Tensor] = {}

    def position_bias(self) -> torch.Tensor:
        if self.training:
            return self.bias_table.mean(0)
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias_table.mean(0)
        return self.cache["bias"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)) + self.position_bias())


# the reasons the package gives (bank.skipped) for channels it keeps whole
SELF_CHECK = "self-check: the exported model differed when these channels were removed"
OUTPUT = "model output"
# (B, 3 * 16) viewed as (B, 3, 16) reads as 3 channels of 16 entries (the head split of attention),
# so unbind over dim 1 selects single channels: the Linear stays whole
UNBIND = "reaches selecting a channel at 'unbind'"
# a bias computed from a parameter (its mean over positions) is added over the channels: the analysis
# follows parameters through views, not through reductions, so fc1's channels stay whole
COMPUTED_BIAS = "reaches 'add' with an untracked tensor over the channels at 'add'"


def _randn(*shape: int) -> Callable[[], tuple[Any, ...]]:
    return lambda: (torch.randn(*shape),)


# name -> (builder, example inputs, None or the exact reason it gates nothing)
FIXTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]], str | None]] = {
    "nested_concat": (NestedConcat, _randn(2, 4, 6, 6), None),
    "wide_and_deep": (WideAndDeep, _randn(6, 12), None),
    "split_concat_residual": (SplitConcatResidual, _randn(2, 4, 6, 6), None),
    "unequal_split_shared_block": (UnequalSplitSharedBlock, _randn(2, 4, 6, 6), None),
    "spatial_concat_split": (SpatialConcatSplit, _randn(2, 4, 5, 6), None),
    "linear_to_deconv": (LinearToDeconv, _randn(3, 16), None),
    "two_inputs_three_outputs": (TwoInputsThreeOutputs, lambda: (torch.randn(4, 6), torch.randn(4, 5)), None),
    "one_channel_output": (OneChannelOutput, _randn(2, 3, 8, 8), None),
    "custom_layer_mlp": (CustomLayerMLP, _randn(5, 10), None),
    "residual_mlp": (ResidualMLP, _randn(5, 10), None),
    "lenet": (LeNet, _randn(2, 1, 28, 28), None),
    "conv_transpose_sandwich": (ConvTransposeSandwich, _randn(2, 3, 6, 6), None),
    "grouped_and_depthwise": (GroupedAndDepthwise, _randn(2, 3, 8, 8), None),
    "squeeze_excite": (SqueezeExcite, _randn(2, 3, 8, 8), None),
    "gated_linear_unit": (GatedLinearUnit, _randn(2, 3, 6, 6), None),
    "unbind_parts": (UnbindHeads, _randn(5, 8), UNBIND),
    "pixel_shuffle": (PixelShuffleUpsampler, _randn(2, 3, 6, 6), None),
    "pixel_unshuffle": (PixelUnshuffleDownsampler, _randn(2, 3, 6, 6), None),
    "mixed_kernel_split": (MixedKernelSplit, _randn(2, 3, 8, 8), None),
    "inception_block": (InceptionBlock, _randn(2, 3, 8, 8), None),
    "handwritten_attention": (HandwrittenAttention, _randn(2, 6, 8), None),
    "torch_multihead_attention": (TorchMultiheadAttention, _randn(2, 5, 6), None),
    "recurrent_encoder": (RecurrentEncoder, _randn(2, 7, 4), None),
    "tied_embeddings": (TiedEmbeddings, lambda: (torch.randint(0, 40, (2, 6)),), None),
    "layer_scale_block": (LayerScaleBlock, _randn(2, 3, 8, 8), None),
    "channel_read_in_forward": (ChannelReadInForward, _randn(4, 6), SELF_CHECK),
    "feature_only": (FeatureOnlyModel, _randn(3, 8), OUTPUT),
    "cached_bias": (CachedBias, _randn(5, 6), COMPUTED_BIAS),
}
