"""The plug-in workflow: attach_gates on arbitrary models, a training step, Budget, export, save/load.

The central check: with a random half of every gate group closed, the exported plain model's
eval output equals the gated model's (in float64, so that only real differences show).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norms
from torch import nn

import tg_kernels as tg
from bench.flops import conv_linear_flops
from bench.models import MLPBlock as BenchMLPBlock
from bench.models import ResNetCifar
from tg_kernels.nn import PrunableMultiheadAttention
from tg_kernels.pruning.bank import GateHook

torchvision = pytest.importorskip("torchvision")

TORCHVISION_MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "vgg11_bn",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "vit_b_16",
]


# --------------------------------------------------------------------------------------------------
# Models defined here: CIFAR ResNet-56, a transformer MLP block, user-defined modules
# --------------------------------------------------------------------------------------------------


def resnet_cifar(depth: int = 56) -> nn.Module:
    """The benchmark's CIFAR ResNet-(6n+2): F.relu after each block, residual adds, shortcut projections."""
    return ResNetCifar(depth)


def mlp_block(dim: int = 32, hidden: int = 128) -> nn.Module:
    """The benchmark's pre-norm transformer MLP block: x + fc2(gelu(fc1(norm(x))))."""
    return BenchMLPBlock(dim, hidden)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it must stay an opaque module."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class UserNet(nn.Module):
    """User-defined modules and functional ops: concat of branches, squeeze-excite, a layer scale,
    a depthwise conv, a module called twice, flatten into a Linear, and an untraceable piece."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.branch_a = nn.Sequential(nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(12, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardswish())
        self.norm = nn.BatchNorm2d(14)
        self.depthwise = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.se_reduce = nn.Conv2d(8, 4, 1)
        self.se_expand = nn.Conv2d(4, 8, 1)
        self.scale = nn.Parameter(torch.rand(14, 1, 1) + 0.5)
        self.mix = nn.Conv2d(14, 10, 3, stride=2, padding=1)
        self.shared = nn.Conv2d(10, 10, 1)
        self.opaque = Untraceable(10)
        self.fc = nn.Linear(10 * 4 * 4, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = self.branch_a(x)
        a = a * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(a.mean((2, 3), keepdim=True)))))
        x = torch.cat([a, self.branch_b(x)], dim=1)
        x = F.relu(self.norm(x))
        x = self.depthwise(x) * self.scale
        x = F.relu(self.mix(x))
        x = self.opaque(self.shared(F.relu(self.shared(x))))
        return self.head(F.relu(self.fc(x.flatten(1))))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


class TinyUNet(nn.Module):
    """Down, up and a skip concatenation: pooling, upsampling (module and function) and padding."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.mid = nn.Conv2d(16, 16, 1)
        self.dec = nn.Sequential(nn.Conv2d(8 + 16, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.ReflectionPad2d(1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        down = self.down(e)
        d = F.relu(self.mid(F.interpolate(down, scale_factor=2.0)))
        y = torch.cat([e, self.up(down)[:, :, :, :] * 0.5 + d], dim=1)
        y = F.pad(self.dec(y), (1, 1, 1, 1))
        return self.head(y)


def _close_random(bank: tg.GateBank, fraction_closed: float = 0.5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in bank.gates.values():
            c = gate.num_channels
            closed = torch.randperm(c, generator=g)[: int(round(fraction_closed * c))]
            gate.weight.fill_(0.5)
            gate.weight[closed] = -0.5


def _attach(model: nn.Module, x: torch.Tensor, **kw) -> tuple[nn.Module, tg.GateBank]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tg.attach_gates(model, x, **kw)


def _train_step(model: nn.Module, x: torch.Tensor, budget: tg.Budget | None = None) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = model(x).float().square().mean()
    if budget is not None:
        loss = loss + budget()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _assert_plain(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, PrunableMultiheadAttention) and m.scaling != math.sqrt(1.0 / m.head_dim):
            continue  # its head dims were pruned: nn.MultiheadAttention cannot hold that (its scale follows head_dim)
        assert not type(m).__module__.startswith("tg_kernels"), f"exported model holds {type(m).__name__}"
        assert not any(isinstance(h, GateHook) for h in m._forward_hooks.values())
    assert not hasattr(model, "tg_gates")


def _check_export(model: nn.Module, bank: tg.GateBank, x: torch.Tensor, **export_options) -> nn.Module:
    """Close half the gates; the exported model must compute what the gated model computes."""
    _close_random(bank)
    model.eval().double()
    x = x.double()
    with torch.no_grad():
        expected = model(x)
        exported = tg.export(model, **export_options)
        actual = exported(x)
    _assert_plain(exported)
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=1e-10)
    dense_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in bank.parameters())
    assert sum(p.numel() for p in exported.parameters()) < dense_params
    return exported


# --------------------------------------------------------------------------------------------------
# Every model: attach, a training step, export, equality
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_model_attach_train_export(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    if name == "vit_b_16":
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero
    size = 224 if name == "vit_b_16" else 64
    x = torch.randn(2, 3, size, size)
    randomize_norms(model)
    model, bank = _attach(model, x)
    assert len(bank.groups) > 0
    before = {k: g.weight.detach().clone() for k, g in bank.gates.items()}
    _train_step(model, x, tg.Budget(model, target=0.5, weight=1.0))  # the fixed weight: one SGD step moves the gates
    assert any(not torch.equal(before[k], g.weight) for k, g in bank.gates.items()), "gates did not train"
    _check_export(model, bank, x[:1])


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: resnet_cifar(), (2, 3, 32, 32)),
        (lambda: mlp_block(), (2, 7, 32)),
        (lambda: UserNet(), (2, 3, 8, 8)),
        (
            lambda: nn.Sequential(
                nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.Linear(6, 2)
            ),
            (2, 3, 6, 6),
        ),
        (lambda: TinyUNet(), (2, 3, 8, 8)),
    ],
    ids=["resnet56_cifar", "mlp_block", "user_modules", "sequential_flatten", "tiny_unet"],
)
def test_own_models_attach_train_export(build, shape):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    randomize_norms(model)
    model, bank = _attach(model, x)
    assert len(bank.groups) > 0
    _train_step(model, x, tg.Budget(model))
    _check_export(model, bank, x)


@pytest.mark.parametrize("skip", ["none", "exact", "hard"])
def test_skip_modes_reach_the_gated_layers(skip):
    model, bank = _attach(mlp_block(), torch.randn(2, 3, 32), skip=skip)
    assert isinstance(model.fc1, tg.GatedLinear) and model.fc1.skip == skip
    assert model.fc1.gate is bank.gates[bank.groups[0].key]
    _train_step(model, torch.randn(2, 3, 32))


# --------------------------------------------------------------------------------------------------
# What the analysis decides
# --------------------------------------------------------------------------------------------------


def test_residual_adds_share_one_gate():
    model, bank = _attach(resnet_cifar(depth=8), torch.randn(1, 3, 32, 32))
    groups = {tuple(info.producers) for info in bank.groups}
    # The first stage's stream: the stem conv and the block's second conv share one gate.
    assert ("stem.0", "blocks.0.conv2") in groups
    # Second stage: the shortcut projection joins the stream.
    assert any("blocks.1.shortcut.0" in p and "blocks.1.conv2" in p for p in groups)
    # Inner widths are groups of their own; the classifier output is never gated.
    assert ("blocks.0.conv1",) in groups
    assert "head" in bank.skipped


def test_gates_sit_after_batchnorm_and_after_activation_modules():
    model, bank = _attach(resnet_cifar(depth=8), torch.randn(1, 3, 32, 32))
    hooked = {
        name for name, m in model.named_modules() if any(isinstance(h, GateHook) for h in m._forward_hooks.values())
    }
    input_hooked = {
        name for name, m in model.named_modules() if any(isinstance(h, GateHook) for h in m._forward_pre_hooks.values())
    }
    # F.relu follows bn1: no gate before it (closed gates would get no task gradient); conv2 gates its input
    assert "blocks.0.bn1" not in hooked and "blocks.0.conv2" in input_hooked
    assert "stem.2" in hooked and "stem.1" not in hooked  # an nn.ReLU module follows: the gate moves past it
    assert "blocks.0" in hooked and "blocks.0.bn2" not in hooked  # relu(bn2 + x): gated at the block's output
    conv = model.blocks[0].conv2  # its output is gated later, on the same channels: it may skip closed ones
    assert isinstance(conv, tg.GatedConv2d) and conv.gate_after_norm and conv.gate is bank.gates["stem_0"]
    # closed_gate_gradients=False: right after the BatchNorm, as the per-layer gate sits
    model, bank = _attach(resnet_cifar(depth=8), torch.randn(1, 3, 32, 32), closed_gate_gradients=False)
    hooked = {
        name for name, m in model.named_modules() if any(isinstance(h, GateHook) for h in m._forward_hooks.values())
    }
    assert "blocks.0.bn1" in hooked and "blocks.0.bn2" in hooked
    conv = model.blocks[0].conv1
    assert isinstance(conv, tg.GatedConv2d) and conv.gate_after_norm and conv.gate is bank.gates["blocks_0_conv1"]


def test_conv_bn_gate_modes_match_none():
    """exact: the same outputs and gradients as none; hard: the same, except closed gates get none."""
    torch.manual_seed(0)
    base = resnet_cifar(depth=8).double()
    randomize_norms(base)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    results = {}
    for skip in ("none", "exact", "hard"):
        model, bank = _attach(copy.deepcopy(base), x, skip=skip)
        _close_random(bank)
        model.train()
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        closed = {f"tg_gates.gates.{k}.weight": g.weight < 0 for k, g in bank.gates.items()}
        gate_grads = {k: bank.gates[k.split(".")[2]].weight.grad for k in closed}
        results[skip] = out.detach(), grads, gate_grads, closed
    out_none, grads_none, gates_none, closed = results["none"]
    assert any(float(g[closed[k]].abs().sum()) > 0 for k, g in gates_none.items())  # closed gates do learn
    for skip in ("exact", "hard"):
        out, grads, gates, _ = results[skip]
        torch.testing.assert_close(out, out_none, rtol=0, atol=1e-12)
        for name, g in grads_none.items():
            if "gate" not in name:  # gate gradients are compared below
                torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=f"{skip}: {name}")
        for k, g in gates_none.items():
            expected = torch.where(closed[k], torch.zeros_like(g), g) if skip == "hard" else g
            torch.testing.assert_close(gates[k], expected, rtol=1e-9, atol=1e-12)


def test_user_net_groups_and_warning():
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="opaque.*untraceable"):
        model, bank = tg.attach_gates(UserNet(), x)
    assert bank.skipped["opaque"].startswith("untraceable")
    producers = {p for info in bank.groups for p in info.producers}
    # concat parts, the SE expand conv (coupled to the concat by the multiply) and the stem are gated
    assert {"branch_a.0", "branch_b.0", "stem", "se_reduce", "se_expand", "fc"} == producers
    assert "called more than once" in bank.skipped["shared"]
    assert "mix" in bank.skipped  # read by the reused conv
    assert "model output" in bank.skipped["head"]


class SEOverConcat(nn.Module):
    """Squeeze-excite over a concatenation: the SE conv's output must be cut to match the concat's parts."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
        self.se = nn.Conv2d(6, 6, 1)
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.out(y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True))))


def test_coupling_of_differently_cut_channels_cuts_the_producer():
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, bank = tg.attach_gates(SEOverConcat(), x)
    assert sorted(info.producers for info in bank.groups) == [("a", "se"), ("b", "se")]
    assert sorted(info.size for info in bank.groups) == [2, 4]
    _check_export(model, bank, x)


def test_unsupported_coupling_is_a_barrier_not_an_error():
    class Flip(SEOverConcat):
        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            return self.out(y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True))).flip(1))

    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="'flip'"):
        model, bank = tg.attach_gates(Flip(), x)
    assert {"a", "b", "se"} <= set(bank.skipped)
    _check_export(model, bank, x) if bank.groups else _assert_plain(tg.export(model))


def test_untraceable_model_stays_ungated_with_a_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.warns(UserWarning, match="cannot trace"):
        model, bank = tg.attach_gates(Net(), torch.randn(1, 3, 4, 4))
    assert len(bank.gates) == 0
    _assert_plain(tg.export(model))


def test_residual_over_the_model_input_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, bank = tg.attach_gates(mlp_block(), torch.randn(2, 32))
    assert [info.producers for info in bank.groups] == [("fc1",)]
    assert "model input" in bank.skipped["fc2"]


def test_exclude_keeps_a_layer_whole():
    model, bank = _attach(mlp_block(), torch.randn(2, 32), exclude=["fc1"])
    assert len(bank.groups) == 0 and bank.skipped["fc1"] == "excluded by the user"
    _, bank = _attach(resnet_cifar(depth=8), torch.randn(1, 3, 32, 32), exclude=[nn.Conv2d])
    assert len(bank.groups) == 0


# --------------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, shape", [(lambda: resnet_cifar(depth=14), (2, 3, 32, 32)), (UserNet, (2, 3, 8, 8))])
def test_budget_counts_what_export_removes(build, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    dense = build()
    dense_flops = conv_linear_flops(dense, x)
    model, bank = _attach(dense, x)
    _close_random(bank, 0.4)
    budget = tg.Budget(model, metric="flops")
    usage = budget.usage()
    exported = tg.export(model).eval()
    assert usage.full_flops == pytest.approx(dense_flops)
    assert usage.flops == pytest.approx(conv_linear_flops(exported, x))
    assert usage.params == sum(p.numel() for p in exported.parameters())
    assert float(budget.ratio().detach()) == pytest.approx(usage.flops / usage.full_flops)


def test_budget_gradient_pushes_gates_down_above_target():
    model, bank = _attach(resnet_cifar(depth=8), torch.randn(1, 3, 32, 32))
    for metric in ("flops", "params", "channels"):
        budget = tg.Budget(model, target=0.3, metric=metric, weight=2.0)
        model.zero_grad()
        loss = budget()
        assert float(loss.detach()) == pytest.approx(2.0 * 0.7)
        loss.backward()
        grads = torch.cat([g.weight.grad for g in bank.gates.values()])
        assert torch.all(grads >= 0) and grads.sum() > 0


def test_budget_report_is_readable():
    model, bank = _attach(resnet_cifar(depth=8), torch.randn(1, 3, 32, 32))
    _close_random(bank, 0.5)
    text = tg.Budget(model).report()
    assert "FLOPs" in text and "params" in text and bank.groups[0].key in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metric": "latency"}, "metric"),
        ({"target": 0.0}, "target"),
        ({"target": 1.5}, "target"),
        ({"weight": -1.0}, "weight"),
        ({"penalty": "huber"}, "penalty"),
    ],
)
def test_budget_rejects_bad_arguments(kwargs, match):
    model, _ = _attach(mlp_block(), torch.randn(2, 32))
    with pytest.raises(ValueError, match=match):
        tg.Budget(model, **kwargs)


# --------------------------------------------------------------------------------------------------
# Export options, save and load, errors
# --------------------------------------------------------------------------------------------------


def test_export_round_to_keeps_multiples_and_stays_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = resnet_cifar(depth=8)
    randomize_norms(model)
    model, bank = _attach(model, x)
    exported = _check_export(model, bank, x, round_to=8)
    for m in exported.modules():
        if isinstance(m, nn.Conv2d) and m is not exported.stem[0]:
            assert m.out_channels % 8 == 0


def test_export_leaves_the_gated_model_working():
    model, bank = _attach(mlp_block(), torch.randn(2, 32))
    _close_random(bank)
    tg.export(model)
    assert isinstance(model.fc1, tg.GatedLinear)
    _train_step(model, torch.randn(2, 32))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = torchvision.models.resnet18(num_classes=10)
    randomize_norms(model)
    model, bank = _attach(model, x)
    _close_random(bank)
    exported = tg.export(model).eval()
    path = tmp_path / "small.pt"
    tg.save(exported, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "tg_kernels.exported_model"
    loaded = tg.load(path, torchvision.models.resnet18(num_classes=10)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), exported(x))
    assert loaded.layer1[0].conv1.out_channels == exported.layer1[0].conv1.out_channels
    with pytest.raises(ValueError, match="holds a"):
        tg.load(path, torchvision.models.mobilenet_v2())
    with pytest.raises(ValueError, match="export"):
        tg.save(model, tmp_path / "gated.pt")


def test_errors_are_clear():
    model, _ = _attach(mlp_block(), torch.randn(2, 32))
    with pytest.raises(ValueError, match="already has gates"):
        tg.attach_gates(model, torch.randn(2, 32))
    with pytest.raises(ValueError, match="no gates"):
        tg.export(mlp_block())
    with pytest.raises(ValueError, match="not a submodule"):
        tg.attach_gates(mlp_block(), torch.randn(2, 32), exclude=["nope"])
    with pytest.raises(ValueError, match="skip"):
        tg.attach_gates(mlp_block(), torch.randn(2, 32), skip="sometimes")
    with pytest.raises(ValueError, match="round_to"):
        tg.export(model, round_to=0)
    with pytest.raises(TypeError, match="nn.Module"):
        tg.attach_gates(lambda x: x, torch.randn(2, 32))


def test_attach_leaves_weights_and_buffers_untouched():
    torch.manual_seed(0)
    model = resnet_cifar(depth=8)
    randomize_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model, _ = _attach(model, torch.randn(4, 3, 32, 32))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.slow
def test_gated_model_compiles():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model, bank = _attach(resnet_cifar(depth=8), x)
    _close_random(bank)
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    actual = torch.compile(model)(x)
    actual.sum().backward()
    torch.testing.assert_close(actual, expected)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip", ["exact", "hard"])
def test_convs_drop_closed_input_channels_exactly(skip):
    """hard mode (and no-grad evaluation) drops closed input channels: same outputs and gradients as keeping them."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    model, bank = _attach(resnet_cifar(8).double(), x, skip=skip)
    randomize_norms(model)
    _close_random(bank)
    chained = [m for m in model.modules() if isinstance(m, tg.GatedConv2d) and m.input_gate is not None]
    assert len(chained) >= 4

    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def run(train: bool):
        with torch.no_grad():  # every run starts from the same BatchNorm statistics
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.train(train)
        model.zero_grad()
        out = model(x)
        if train:
            out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_drop = run(True), run(False)
    saved = [m.input_gate for m in chained]
    for m in chained:
        m.input_gate = None
    without = run(True), run(False)
    for m, g in zip(chained, saved):
        m.input_gate = g
    for (out_a, grads_a), (out_b, grads_b) in zip(with_drop, without):
        torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12, msg=name)


def test_pooling_upsampling_and_padding_keep_channels_gated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in this model is a barrier
        model, bank = tg.attach_gates(TinyUNet(), torch.randn(2, 3, 8, 8))
    producers = {p for info in bank.groups for p in info.producers}
    assert {"enc.0", "dec.0"} <= producers
    assert any("down.1" in info.producers and "mid" in info.producers for info in bank.groups)
    assert "model output" in bank.skipped["head"]


def test_set_skip_switches_every_gated_layer_and_hook():
    model, bank = _attach(resnet_cifar(depth=8), torch.randn(2, 3, 32, 32))
    assert bank.skip == "exact" and bank.gated_layers and bank.hooks
    bank.set_skip("hard")
    assert all(layer.skip == "hard" for layer in bank.gated_layers)
    assert all(hook.hard for hook in bank.hooks)
    assert all(m.skip == "hard" for m in model.modules() if isinstance(m, (tg.GatedConv2d, tg.GatedLinear)))
    bank.set_skip("none")
    assert all(layer.skip == "none" for layer in bank.gated_layers) and not any(hook.hard for hook in bank.hooks)
    with pytest.raises(ValueError, match="skip"):
        bank.set_skip("fast")


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
        (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
        (lambda: resnet_cifar(depth=8), (1, 3, 16, 16)),
        (TinyUNet, (2, 3, 8, 8)),
    ],
    ids=["resnet18", "mobilenet_v2", "resnet8_cifar", "tiny_unet"],
)
def test_export_graph_gives_the_groups_of_the_fx_analysis(build, shape):
    """The torch.export analysis reproduces the torch.fx one: groups, slices, gate points, costs
    (gate points with ``closed_gate_gradients=False``: the fx analysis gates before ReLUs)."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    results = []
    for tracer in ("fx", "export"):
        _, bank = _attach(build(), x, tracer=tracer, self_check=False, closed_gate_gradients=tracer == "fx")
        a = bank.analysis
        assert a.tracer == tracer
        name = {g.space: g.producers[0] for g in a.groups}
        results.append(
            (
                sorted(
                    (tuple(g.producers), g.size, sorted({(s.target, s.dim, s.offset, s.repeat) for s in g.slices}))
                    for g in a.groups
                ),
                sorted(
                    (p.module, p.dim, tuple((name.get(r), n) for r, n in p.parts), p.replace, p.fold)
                    for p in a.gate_points
                ),
                sorted((lc.module, lc.kind, lc.flops_per_pair, lc.params_per_pair, lc.bias_per_out) for lc in a.layers),
                sorted(a.fixed),
                a.other_params,
            )
        )
    assert results[0] == results[1]


class _RecurrentNet(nn.Module):
    """Embedding -> 2-layer LSTM / GRU / RNN (bidirectional: both directions) -> Linear."""

    def __init__(self, cls: type[nn.Module], bidirectional: bool, proj_size: int = 0, relu: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        extra = {"proj_size": proj_size} if proj_size else {}
        if relu:
            extra["nonlinearity"] = "relu"
        self.rnn = cls(8, 12, num_layers=2, batch_first=True, bidirectional=bidirectional, **extra)
        self.head = nn.Linear((proj_size or 12) * (2 if bidirectional else 1), 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


@pytest.mark.parametrize(
    ("cls", "bidirectional", "proj_size", "relu"),
    [
        (nn.LSTM, False, 0, False),
        (nn.LSTM, True, 0, False),
        (nn.LSTM, False, 4, False),
        (nn.GRU, False, 0, False),
        (nn.GRU, True, 0, False),
        (nn.RNN, True, 0, False),
        (nn.RNN, False, 0, True),
    ],
)
def test_rnn_hard_training_step_then_export_is_exact(cls, bidirectional, proj_size, relu):
    """LSTM / GRU / RNN hidden units: one hard-mode step compact (gradients equal the per-layer path's,
    closed units' rows get none), then the exported model equals the gated model in float64."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 30, (3, 9))
    base = _RecurrentNet(cls, bidirectional, proj_size, relu).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no barrier, no compact fallback, no self-check failure
        compact, cbank = tg.attach_gates(copy.deepcopy(base), tokens, skip="hard")
        per_layer, pbank = tg.attach_gates(copy.deepcopy(base), tokens, skip="hard", compact=False)
    assert cbank.compact.disabled_reason is None
    assert {g.key: g.size for g in cbank.groups}["rnn"] == 12
    g = torch.Generator().manual_seed(3)
    closed = {}
    with torch.no_grad():
        for key, gate in cbank.gates.items():
            closed[key] = torch.randperm(gate.num_channels, generator=g)[: gate.num_channels // 2]
            for bank in (cbank, pbank):
                bank.gates[key].weight.fill_(0.5)
                bank.gates[key].weight[closed[key]] = -0.5
    for model in (compact, per_layer):
        model.train()
        model(tokens).square().mean().backward()
    assert cbank.compact.stats.forwards == 1
    grads = {n: p.grad for n, p in per_layer.named_parameters() if p.grad is not None}
    for name, p in compact.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-9, atol=1e-12, msg=name)
    rows = compact.rnn.weight_ih_l0.grad.reshape(-1, 12, 8)  # (gate blocks, units, inputs)
    open_units = [i for i in range(12) if i not in closed["rnn"]]
    assert torch.all(rows[:, closed["rnn"]] == 0) and rows[:, open_units].abs().sum() > 0
    with torch.no_grad():
        for p in compact.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    compact.eval()
    with torch.no_grad():
        gated = compact(tokens)
        cbank.compact.enabled = False
        full_width = compact(tokens)
        cbank.compact.enabled = True
        exported = tg.export(compact)
        out = exported(tokens)
    assert exported.rnn.hidden_size == 12 - closed["rnn"].numel()
    assert type(exported.rnn) is cls and not exported.rnn._forward_pre_hooks and not exported.rnn._forward_hooks
    torch.testing.assert_close(full_width, gated, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, gated, rtol=0, atol=1e-12)


def test_rnn_given_initial_state_keeps_hidden_units_whole():
    """A closed unit stays zero only from a zero initial state: with h_0 given, the units stay ungated."""

    class WithState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 6, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x, h0):
            return self.head(self.rnn(x, h0)[0])

    model, bank = tg.attach_gates(WithState(), (torch.randn(2, 5, 4), torch.randn(1, 2, 6)))
    assert "rnn" not in {g.key for g in bank.groups}
    assert "initial hidden state" in bank.skipped["rnn"]


def test_rnn_save_load_round_trip(tmp_path):
    """An exported LSTM model (smaller hidden_size) saves and loads into a fresh full-size model."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 30, (2, 6))
    model, bank = tg.attach_gates(_RecurrentNet(nn.LSTM, True), tokens)
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight[: gate.num_channels // 2] = -0.5
    exported = tg.export(model).eval()
    tg.save(exported, tmp_path / "lstm.pt")
    loaded = tg.load(tmp_path / "lstm.pt", _RecurrentNet(nn.LSTM, True)).eval()
    assert loaded.rnn.hidden_size == exported.rnn.hidden_size == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), exported(tokens), rtol=0, atol=0)


def test_rnn_final_states_and_unbatched_input():
    """Consumers of the output, of h_n and of c_n (an unbatched input: nn.LSTM squeezes them) all see
    exact zeros for closed units; in "exact" mode closed units' gates still get their task gradient."""

    class States(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.rnn = nn.LSTM(8, 10, num_layers=2, bidirectional=True)
            self.out_head, self.h_head, self.c_head = nn.Linear(20, 3), nn.Linear(20, 3), nn.Linear(10, 3)

        def forward(self, x):
            out, (h, c) = self.rnn(torch.relu(self.inp(x)))
            return self.out_head(out) + self.h_head(torch.cat([h[-2], h[-1]], -1)) + self.c_head(c[-1])

    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)  # (time, features): no batch dim
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, bank = tg.attach_gates(States().double(), x)
    assert {g.key: g.size for g in bank.groups} == {"inp": 8, "rnn": 10}
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight[: gate.num_channels // 2] = -0.5
    model(x).square().sum().backward()
    assert bank.gates["rnn"].weight.grad[:5].abs().min() > 0
    model.eval()
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-12)
    assert exported.rnn.hidden_size == 5 and exported.inp.out_features == 4
