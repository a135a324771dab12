"""Gates go where closed gates keep a task gradient: never right before a ReLU-like activation.

``relu(g * z)`` and ``g * relu(z)`` are the same for a 0/1 gate, but the first passes no gradient to
a closed gate (ReLU's derivative at an exact 0 is 0), so such a channel could reopen only through the
budget. ``attach_gates`` therefore gates after the activation: on the module that returns it, past
a residual add (a ResNet block's output), or on the input of the conv / Linear that reads it.
``closed_gate_gradients=False`` keeps the old placement (cheaper ``exact`` training).

Every check compares with ``none`` mode in float64, with a random half of every group closed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import close_random_half, float64_case, reopen_by_task_gradient
from test_side_pass import _assert_equal, _exact_and_none
from torch import nn

import tg_kernels as tg
from bench.models import ResNetCifar

torchvision = pytest.importorskip("torchvision")


class _LeNet(nn.Module):
    """Conv -> nn.ReLU module, no BatchNorm (the gate used to sit on the conv, before the ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU())
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.features(x).flatten(1)))


class _FunctionalRelu(nn.Module):
    """``torch.relu`` in the forward between a Linear and its reader: the reader gates its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _RepVGGBlock(nn.Module):
    """Three branches summed before one ReLU: 3x3 conv + BN, 1x1 conv + BN and a BatchNorm identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.identity = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(x) + self.conv1(x) + self.identity(x))


class _RepVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(_RepVGGBlock(8), _RepVGGBlock(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.avg_pool2d(self.blocks(self.stem(x)), 2).mean((2, 3)))


def _resnet8() -> nn.Module:
    return ResNetCifar(8)


CASES = [
    pytest.param(_resnet8, (4, 3, 16, 16), id="resnet8_cifar"),
    pytest.param(_LeNet, (32, 1, 28, 28), id="lenet"),
    pytest.param(_FunctionalRelu, (32, 6), id="functional_relu"),
    pytest.param(_RepVGG, (4, 3, 8, 8), id="repvgg"),
    pytest.param(lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), id="resnet18"),
    pytest.param(lambda: torchvision.models.squeezenet1_0(num_classes=10), (2, 3, 64, 64), id="squeezenet"),
    # expand -> gate -> depthwise -> BatchNorm -> gate: the first gate is left out (the second suffices)
    pytest.param(lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32), id="mobilenet_v2"),
]


def _attach(build, shape, **options):
    model, x = float64_case(build, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(model, x, **options)
    close_random_half(bank)
    return model, bank, x


def _closed_gate_gradients(model: nn.Module, bank: tg.GateBank, x: torch.Tensor, skip: str) -> dict[str, torch.Tensor]:
    """The task gradient of every group's closed gates after one step in ``skip`` mode."""
    bank.set_skip(skip)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().mean().backward()
    return {key: gate.weight.grad[~gate.open_mask()] for key, gate in bank.gates.items()}


@pytest.mark.parametrize("build, shape", CASES)
def test_every_closed_gate_gets_a_task_gradient(build, shape):
    model, bank, x = _attach(build, shape)
    dead = [sp.point for sp in bank.analysis.side_passes if sp.dead]
    assert not dead, f"gate points whose closed gates get no task gradient by structure: {dead}"
    grads = _closed_gate_gradients(model, bank, x, "none")
    # (a unit whose ReLU input is negative on the whole batch has none either: that is data, not placement)
    silent = [key for key, g in grads.items() if g.numel() and float((g == 0).double().mean()) > 0.5]
    assert not silent, f"closed gates without a task gradient in {silent}"
    exported = tg.export(model)  # the same forward: export stays exact
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("build, shape", CASES[:3])
def test_gates_before_relu_when_asked_and_then_closed_gates_get_nothing(build, shape):
    model, bank, x = _attach(build, shape, closed_gate_gradients=False)
    assert any(sp.dead for sp in bank.analysis.side_passes)
    grads = _closed_gate_gradients(model, bank, x, "none")
    assert any(g.numel() and bool((g == 0).all()) for g in grads.values())
    assert not any(gp.on_input for gp in bank.analysis.gate_points)


def test_the_groups_do_not_depend_on_the_placement():
    for build, shape in ((_resnet8, (2, 3, 16, 16)), (lambda: torchvision.models.resnet18(), (1, 3, 64, 64))):
        _, moved, _ = _attach(build, shape)
        _, before, _ = _attach(build, shape, closed_gate_gradients=False)
        assert [(g.name, g.size) for g in moved.analysis.groups] == [(g.name, g.size) for g in before.analysis.groups]


def test_where_the_gates_go_in_a_resnet_block():
    _, bank, _ = _attach(_resnet8, (2, 3, 16, 16))
    points = {(gp.module, gp.on_input) for gp in bank.analysis.gate_points}
    assert ("blocks.0.conv2", True) in points, "relu(bn1(conv1(x))) is gated on conv2's input"
    assert ("blocks.0", False) in points, "the stream is gated on the block's output, after its ReLU"
    assert ("blocks.0.bn1", False) not in points and ("blocks.0.bn2", False) not in points
    projection = next(sp for sp in bank.analysis.side_passes if sp.point == "blocks.1")
    assert projection.terms and projection.terms[0].producer == "blocks.1.shortcut.0", "both branches rebuild u"


def test_a_closed_gate_before_a_relu_reopens_through_its_task_gradient():
    torch.manual_seed(0)
    teacher = _FunctionalRelu()
    x = torch.randn(64, 6)
    target = teacher(x).detach()
    moved = {}
    for closed_gradients in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            student, bank = tg.attach_gates(
                copy.deepcopy(teacher), x, skip="exact", closed_gate_gradients=closed_gradients
            )
        moved[closed_gradients] = reopen_by_task_gradient(student, bank, x, target)
    assert moved[True] > 0, "the closed gate reopened through its task gradient"
    assert moved[False] == pytest.approx(-0.05, abs=1e-7), "before the ReLU it gets no task gradient"


@pytest.mark.parametrize("build, shape", CASES)
def test_exact_training_equals_none_mode_with_gates_after_relus(build, shape):
    """Input gates, gates past residual adds (two or three non-zero branches: side-pass terms) and
    left-out producer gates: ``exact`` (compact + side pass) still gives every gradient of ``none``.
    A group with no recipe (RepVGG's dense convs from the group onto itself) runs full width."""
    _, bank, none, exact, _ = _exact_and_none(build, shape)
    if build is _RepVGG:  # its dense 1x1 and 3x3 branches map the group onto itself: no recipe, full width
        assert all("dense kernel" in why for why in bank.compact.full_width.values()), bank.compact.full_width
    else:
        assert not bank.compact.full_width, bank.compact.full_width
    # compact execution stayed on (a dense conv from a group onto itself, RepVGG's 1x1 branch, was once
    # replayed as a depthwise conv: the step raised and compact execution switched itself off)
    assert bank.compact.disabled_reason is None, bank.compact.disabled_reason
    _assert_equal(none, exact)
