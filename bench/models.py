"""Whole-model benchmarks: train steps of a gated CIFAR ResNet-56 and a transformer MLP block, and inference.

Providers, at each active fraction (a random share of each gated layer's channels left open):

- ``dense``: the plain model (what you train without this package): the speed-up baseline;
- ``tg_kernels`` in modes ``none`` / ``exact`` / ``hard``: the gated model;
- ``ideal``: the plain model physically built at the active widths (what export yields): the
  target a skipping model approaches.

Train steps are forward + backward + parameter-gradient reset; inference is an eval-mode forward
under ``torch.no_grad`` (the gated model then skips closed channels in every mode). In the ResNet the
gate sits on each block's first conv, before its BatchNorm: a speed proxy (the BN costs the same
either way); placing gates after norm layers is the job of the plug-in workflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench.common import Row, time_interleaved
from tg_kernels import GatedConv2d, GatedLinear

FAMILY = "models"
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
MODES = ("none", "exact", "hard")


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; the first conv's output channels (`width`) are the prunable ones."""

    def __init__(self, cin: int, cout: int, width: int, stride: int, gated: str | None) -> None:
        super().__init__()
        if gated is None:
            self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        else:
            self.conv1 = GatedConv2d(cin, width, 3, stride, 1, bias=False, skip=gated)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `widths` gives each block's inner width (default: its stage width)."""

    def __init__(self, depth: int = 56, widths: list[int] | None = None, gated: str | None = None) -> None:
        super().__init__()
        n = (depth - 2) // 6
        stages = [16] * n + [32] * n + [64] * n
        widths = widths or stages
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for i, (cout, width) in enumerate(zip(stages, widths)):
            stride = 2 if i in (n, 2 * n) else 1
            blocks.append(BasicBlock(cin, cout, width, stride, gated))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MLPBlock(nn.Module):
    """Pre-norm transformer MLP block: x + fc2(gelu(fc1(norm(x)))); fc1's hidden units are prunable."""

    def __init__(self, dim: int, hidden: int, gated: str | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden) if gated is None else GatedLinear(dim, hidden, skip=gated)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def _close_random(model: nn.Module, fraction: float, seed: int = 0) -> list[int]:
    """Close a random (1 - fraction) of every gate's channels; return each gated layer's open count."""
    g = torch.Generator().manual_seed(seed)
    counts = []
    for m in model.modules():
        if isinstance(m, (GatedConv2d, GatedLinear)):
            c = m.gate.num_channels
            n_open = max(1, round(fraction * c))
            with torch.no_grad():
                m.gate.weight[torch.randperm(c, generator=g)[n_open:].to(m.gate.weight.device)] = -1.0
            counts.append(n_open)
    return counts


def _cases(device: torch.device, quick: bool) -> list[tuple[str, Callable, tuple[int, ...]]]:
    """(name, builder(widths or None, gated mode or None), input shape)."""
    batch = 64 if device.type == "cuda" else (8 if quick else 32)
    depth = 20 if quick else 56
    tokens = 8192 if device.type == "cuda" else (512 if quick else 2048)
    dim = 1024 if device.type == "cuda" else 512
    return [
        (f"resnet{depth}_cifar_n{batch}", lambda w, g: ResNetCifar(depth, w, g), (batch, 3, 32, 32)),
        (f"mlp_block_{tokens}x{dim}x{4 * dim}", lambda w, g: MLPBlock(dim, w[0] if w else 4 * dim, g), (tokens, dim)),
    ]


def _train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        model(x).float().square().mean().backward()

    return step


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    model.eval()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def run_cases(device: torch.device, quick: bool, progress=None) -> list[Row]:
    fractions = (0.5,) if quick else FRACTIONS
    rounds, min_run_time = (3, 0.05) if quick else (5, 0.2)
    rows: list[Row] = []
    for name, build, shape in _cases(device, quick):
        x = torch.randn(shape, device=device)
        for fraction in fractions:
            train, infer = {}, {}
            train[("dense", "train")] = _train_step(build(None, None).to(device), x)
            infer[("dense", "eval")] = _inference(build(None, None).to(device), x)
            for mode in MODES:
                gated = build(None, mode).to(device)
                widths = _close_random(gated, fraction)
                train[("tg_kernels", mode)] = _train_step(gated, x)
            eval_model = build(None, "exact").to(device)
            _close_random(eval_model, fraction)
            infer[("tg_kernels", "eval")] = _inference(eval_model, x)
            train[("ideal", "train")] = _train_step(build(widths, None).to(device), x)
            infer[("ideal", "eval")] = _inference(build(widths, None).to(device), x)
            for kind, fns in (("train", train), ("eval", infer)):
                timings = time_interleaved(fns, device, rounds, min_run_time)
                base, ideal = timings[("dense", kind)][0], timings[("ideal", kind)][0]
                for (provider, mode), (median, iqr) in timings.items():
                    extra = {"vs_ideal": median / ideal}
                    rows.append(
                        Row(
                            FAMILY,
                            f"{name}_{kind}",
                            provider,
                            mode,
                            fraction,
                            median,
                            iqr,
                            rounds,
                            "dense",
                            base / median,
                            extra,
                        )
                    )
            if progress is not None:
                progress()
    return rows


def count_cases(device: torch.device, quick: bool) -> int:
    return len(_cases(device, quick)) * (1 if quick else len(FRACTIONS))
