"""Whole-model benchmarks: train steps and inference of a CIFAR ResNet-56, a transformer MLP block and
torchvision's resnet18, gated with the plug-in workflow and exported.

The models are plain ``nn`` modules. At each active fraction the gated providers are built with
``tg_kernels.attach_gates(model, x, skip=mode)`` on a fresh plain model, then a random (1 - fraction)
of every gate group's channels is closed (the same seed for every provider, so they all close the
same channels). Providers:

- ``dense``: the plain model (what you train without this package): the speed-up baseline;
- ``tg_kernels`` in the train modes below and ``eval`` (inference): the gated model;
- ``ideal``: ``tg_kernels.export(gated_model)``, the plain model with closed channels physically
  removed: the target a skipping model approaches in training, and what you deploy for inference.
  Before timing, each case checks that the exported model's eval output equals the gated model's.

Gated models run compact (``tg_kernels.pruning.compact``): in ``hard`` and ``exact`` mode and without
gradients the whole model runs its exported structure, with parameters gathered from the full
tensors each forward, so ``hard`` training and every ``eval`` row approach the ``ideal`` (exported)
model. Train modes:

- ``exact``: compact plus the closed-channel side pass (``tg_kernels.pruning.side_pass``) on every
  step, which gives closed gates their task gradient (``none`` mode's gradients); gates sit after
  ReLUs (``closed_gate_gradients=True``, the default), so every closed gate has one;
- ``search``: the default search step (what ``tg.prune`` runs): ``exact`` with the side pass on every
  ``k``-th step only, its gradients times ``k`` (``side_pass_every``, default
  ``tg_kernels.pruning.train.DEFAULT_SIDE_PASS_EVERY``: an unbiased estimate); each timed call runs
  ``k`` steps, the figure is per step;
- ``exact_before_relu``: ``exact`` with ``closed_gate_gradients=False``: gates before a ReLU, whose
  closed gates' task gradient is exactly 0 and needs no side pass (cheaper; those channels reopen
  only through the budget);
- ``hard``: fine-tuning as ``tg.prune`` runs it: the gates are frozen. These rows also record
  ``replan_ms``: what rebuilding the index tensors and size attributes costs when the open set
  changes (a gate crosses 0), a median of a few rebuilds;
- ``hard_learning``: ``hard`` with learning gates (the long-hand loop with ``skip="hard"``): gates on
  a layer's input are folded into its weight, gates that no layer can take multiply the activation.

Train steps are forward + backward + parameter-gradient reset; inference is an eval-mode forward
under ``torch.no_grad``.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import tg_kernels
from bench.common import Row, time_interleaved
from tg_kernels.pruning.train import DEFAULT_SIDE_PASS_EVERY

FAMILY = "models"
FRACTIONS = (1.0, 0.5, 0.25)
MODES = ("search", "exact", "exact_before_relu", "hard", "hard_learning")
SIDE_PASS_EVERY = DEFAULT_SIDE_PASS_EVERY  # search: the side pass on every k-th step, scaled by k
SEED = 0


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block (conv-BN-ReLU-conv-BN plus the shortcut, then ReLU)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (stages of 16, 32 and 64 channels)."""

    def __init__(self, depth: int = 56) -> None:
        super().__init__()
        n = (depth - 2) // 6
        stages = [16] * n + [32] * n + [64] * n
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for i, cout in enumerate(stages):
            blocks.append(BasicBlock(cin, cout, 2 if i in (n, 2 * n) else 1))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MLPBlock(nn.Module):
    """Pre-norm transformer MLP block: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def _plain(build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """A plain model with seeded weights and non-trivial norm statistics (so the export check means something)."""
    torch.manual_seed(SEED)
    model = build()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.to(device)


def _gated(
    build: Callable[[], nn.Module], x: torch.Tensor, mode: str, fraction: float
) -> tuple[nn.Module, tg_kernels.GateBank]:
    """attach_gates on a fresh plain model, then close a random (1 - fraction) of every gate group's channels."""
    model = _plain(build, x.device)
    with warnings.catch_warnings():  # the MLP block's residual over its input stays ungated (expected)
        warnings.filterwarnings("ignore", message="tg_kernels.attach_gates: channels that reach")
        if mode == "exact_before_relu":  # the cheaper placement: closed gates before a ReLU get no task gradient
            model, bank = tg_kernels.attach_gates(model, x, skip="exact", closed_gate_gradients=False)
        else:
            model, bank = tg_kernels.attach_gates(model, x, skip="exact" if mode == "search" else mode.split("_")[0])
        if mode == "search":
            bank.compact.side_pass_every = SIDE_PASS_EVERY
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for gate in bank.gates.values():
            c = gate.num_channels
            closed = torch.randperm(c, generator=g)[max(1, round(fraction * c)) :]
            gate.weight[closed.to(gate.weight.device)] = -1.0
    if mode == "hard":  # fine-tuning, as tg.prune runs it: the open set has settled, the gates are frozen
        bank.requires_grad_(False)
    return model, bank


def _check_export(gated: nn.Module, exported: nn.Module, x: torch.Tensor) -> None:
    """The exported model computes what the gated model computes in eval mode (restores train mode)."""
    for model in (gated, exported):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), gated(x))
    for model in (gated, exported):
        model.train()


def _cases(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    """(name, plain model builder, input shape)."""
    batch = 64 if device.type == "cuda" else (8 if quick else 32)
    depth = 20 if quick else 56
    tokens = 8192 if device.type == "cuda" else (512 if quick else 2048)
    dim = 1024 if device.type == "cuda" else 512
    image_batch, side = (64, 224) if device.type == "cuda" else ((4, 32) if quick else (16, 64))
    return [
        (f"resnet{depth}_cifar_n{batch}", lambda: ResNetCifar(depth), (batch, 3, 32, 32)),
        (f"mlp_block_{tokens}x{dim}x{4 * dim}", lambda: MLPBlock(dim, 4 * dim), (tokens, dim)),
        (f"tv_resnet18_n{image_batch}_{side}px", _torchvision_resnet18, (image_batch, 3, side, side)),
    ]


def _torchvision_resnet18() -> nn.Module:
    """torchvision's resnet18 (10 classes): one nn.ReLU shared in each block, so gates sit on conv2's input."""
    import torchvision  # a bench requirement only

    return torchvision.models.resnet18(num_classes=10)


def _train_step(model: nn.Module, x: torch.Tensor, repeat: int = 1) -> Callable[[], None]:
    """One train step (``repeat`` of them per call: a whole cycle of a side pass run every k-th step)."""
    model.train()
    params = list(model.parameters())

    def step() -> None:
        for _ in range(repeat):
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


def _replan_ms(bank: tg_kernels.GateBank, repeats: int = 5) -> float | None:
    """Median time to rebuild compact execution's index tensors and size attributes for the current open set."""
    runner = bank.compact
    if runner is None or runner.disabled_reason is not None:
        return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner._build_plan(runner.open_masks())
        times.append(time.perf_counter() - start)
    runner._plan = None
    return 1e3 * statistics.median(times)


def run_cases(device: torch.device, quick: bool, progress=None) -> list[Row]:
    fractions = (0.5,) if quick else FRACTIONS
    rounds, min_run_time = (3, 0.05) if quick else (7, 0.2)  # 7: eval rows take ~20 ms and swing ±7%
    rows: list[Row] = []
    for name, build, shape in _cases(device, quick):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED)).to(device)
        for fraction in fractions:
            train, infer = {}, {}
            dense = _plain(build, device)
            train[("dense", "train")] = _train_step(dense, x)
            infer[("dense", "eval")] = _inference(copy.deepcopy(dense), x)
            replan_ms = None
            for mode in MODES:
                gated, bank = _gated(build, x, mode, fraction)
                if mode == "hard":
                    replan_ms = _replan_ms(bank)
                if mode == "exact":
                    exported = tg_kernels.export(gated)
                    _check_export(gated, exported, x)
                    infer[("tg_kernels", "eval")] = _inference(copy.deepcopy(gated), x)
                repeat = SIDE_PASS_EVERY if mode == "search" else 1
                train[("tg_kernels", mode)] = _train_step(gated, x, repeat)
            train[("ideal", "train")] = _train_step(exported, x)
            infer[("ideal", "eval")] = _inference(copy.deepcopy(exported), x)
            for kind, fns in (("train", train), ("eval", infer)):
                timings = time_interleaved(fns, device, rounds, min_run_time)
                if ("tg_kernels", "search") in timings:  # its calls run k steps: per step
                    timings[("tg_kernels", "search")] = tuple(
                        t / SIDE_PASS_EVERY for t in timings[("tg_kernels", "search")]
                    )
                base, ideal = timings[("dense", kind)][0], timings[("ideal", kind)][0]
                for (provider, mode), (median, iqr) in timings.items():
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
                            {"vs_ideal": median / ideal}
                            | ({"replan_ms": replan_ms} if (kind, mode) == ("train", "hard") and replan_ms else {}),
                        )
                    )
            if progress is not None:
                progress()
    return rows


def count_cases(device: torch.device, quick: bool) -> int:
    return len(_cases(device, quick)) * (1 if quick else len(FRACTIONS))
