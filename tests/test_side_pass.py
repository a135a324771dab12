"""``exact`` training at compact speed: compact execution plus the closed-channel side pass.

The central check, in float64: one ``exact`` step (compact, with the side pass) gives every gradient
of ``none`` mode on the per-layer path: weights, biases, norm parameters, the input, and every gate,
closed ones included, with a random half of every group closed.
"""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
from helpers import close_random_half, float64_case, reopen_by_task_gradient
from torch import nn

import tg_kernels as tg
from bench.models import MLPBlock, ResNetCifar
from tg_kernels.pruning.compact import CompactForward

torchvision = pytest.importorskip("torchvision")


class _PoolBetween(nn.Module):
    """Gated convs read through pooling, padding, upsampling, concatenation and non-ReLU activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, bias=False)
        self.conv3 = nn.Conv2d(22, 8, 1)
        self.conv4 = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.silu(self.bn1(self.conv1(x)))
        pooled = nn.functional.max_pool2d(a, 2)  # conv2 reads a pooled, padded gated value
        b = nn.functional.gelu(self.conv2(nn.functional.pad(pooled, (1, 1, 1, 1))))
        c = torch.tanh(self.conv3(torch.cat([nn.functional.avg_pool2d(a, 2), b], 1)))
        d = self.conv4(nn.functional.interpolate(pooled, scale_factor=2.0, mode="nearest"))
        return self.head(nn.functional.adaptive_avg_pool2d(c, 1).flatten(1) + d.mean((2, 3)))


class _Recurrent(nn.Module):
    """An LSTM's hidden units (gated inside the recurrence: a full-width group in exact forwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.rnn = nn.LSTM(8, 10, num_layers=2, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(nn.functional.gelu(self.inp(x)))
        return self.head(out)


def _gradients(model: nn.Module, bank: tg.GateBank, x: torch.Tensor, skip: str) -> dict[str, torch.Tensor]:
    bank.set_skip(skip)
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input"] = x.grad
    grads.update({f"gate:{key}": gate.weight.grad for key, gate in bank.gates.items()})
    return grads


def _exact_and_none(build, shape, seed: int = 0):
    base, x = float64_case(build, shape, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(base, x, skip="exact")
    assert bank.compact.disabled_reason is None and bank.compact.exact_reason is None, bank.compact.exact_reason
    close_random_half(bank)
    state = copy.deepcopy(model.state_dict())
    none = _gradients(model, bank, x, "none")
    none_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    side = bank.compact.stats.exact_forwards
    exact = _gradients(model, bank, x, "exact")
    assert bank.compact.stats.exact_forwards == side + 1, "the exact step ran compact with its side pass"
    return model, bank, none, exact, none_state


def _assert_equal(none: dict, exact: dict) -> None:
    """Equal up to float reassociation: relative to each tensor, with a floor relative to all gradients
    (a gradient that is 0 up to cancellation, such as a norm's bias before another norm, is noise)."""
    assert none.keys() == exact.keys()
    overall = max(g.abs().max().item() for g in none.values() if g is not None and g.numel())
    for name, expected in none.items():
        got = exact[name]
        if expected is None or got is None:
            assert expected is None and got is None, name
            continue
        scale = expected.abs().max().item() if expected.numel() else 0.0
        assert (got - expected).abs().max().item() <= 1e-9 * scale + 1e-10 * overall, name


MODELS = [
    pytest.param(lambda: ResNetCifar(56), (2, 3, 16, 16), id="resnet56"),
    pytest.param(lambda: MLPBlock(16, 64), (2, 5, 16), id="mlp_block"),
    pytest.param(_PoolBetween, (2, 3, 12, 12), id="pooling_between"),
    pytest.param(lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), id="resnet18"),
    pytest.param(
        lambda: torchvision.models.densenet121(num_classes=10), (2, 3, 32, 32), id="densenet121", marks=pytest.mark.slow
    ),
    pytest.param(lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32), id="mobilenet_v2"),
    pytest.param(_Recurrent, (2, 6, 5), id="lstm"),
]


@pytest.mark.parametrize("build, shape", MODELS)
def test_exact_gradients_equal_none_mode(build, shape):
    model, bank, none, exact, _ = _exact_and_none(build, shape)
    _assert_equal(none, exact)
    closed = torch.cat([none[f"gate:{k}"][~g.open_mask()] for k, g in bank.gates.items()])
    live = [sp for sp in bank.analysis.side_passes if not sp.dead]
    assert live, "the model has gate points whose closed gates get a task gradient"
    assert closed.abs().sum() > 0, "some closed gates get a task gradient (so the side pass is tested)"


def test_the_mlp_block_uses_the_bilinear_form_and_still_matches():
    # 8 x 16 tokens, 16 -> 64 -> 16: X^T dY (16 x 16) is cheaper than the two closed-column products
    _, bank, none, exact, _ = _exact_and_none(lambda: MLPBlock(16, 64), (8, 16, 16))
    (recipe,) = [sp for sp in bank.analysis.side_passes if not sp.dead]
    assert recipe.producer == "fc1" and recipe.paths[0].consumer == "fc2" and recipe.paths[0].elementwise
    _assert_equal(none, exact)


def test_dead_gate_points_are_those_before_a_relu_or_another_gate():
    model, bank, none, _, _ = _exact_and_none(lambda: ResNetCifar(8), (2, 3, 16, 16))
    for recipe in bank.analysis.side_passes:
        key = bank.key_of_space[recipe.space]
        if recipe.dead and all(not (r.space == recipe.space and not r.dead) for r in bank.analysis.side_passes):
            closed = ~bank.gates[key].open_mask()
            assert torch.all(none[f"gate:{key}"][closed] == 0), recipe.point


def test_batchnorm_statistics_of_open_channels_match_none_mode():
    model, bank, _, _, none_state = _exact_and_none(lambda: ResNetCifar(8), (4, 3, 16, 16))
    exact_state = model.state_dict()
    checked = 0
    for group in bank.analysis.groups:
        open_ = bank.gates[bank.key_of_space[group.space]].open_mask()
        for sl in group.slices:
            if not sl.target.endswith(("running_mean", "running_var")):
                continue
            rows = torch.arange(open_.numel()) + sl.offset
            torch.testing.assert_close(exact_state[sl.target][rows[open_]], none_state[sl.target][rows[open_]])
            checked += 1
    assert checked > 0


def test_a_closed_gate_reopens_through_its_task_gradient_alone():
    """A GELU after the gate (no ReLU): with the budget weight at 0, only the task gradient can move it."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    x = torch.randn(64, 6)
    target = teacher(x).detach()
    for skip in ("exact", "hard"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            student, bank = tg.attach_gates(copy.deepcopy(teacher), x, skip=skip)
        reopened = reopen_by_task_gradient(student, bank, x, target)
        if skip == "exact":
            assert bank.compact.stats.exact_forwards > 0
            assert reopened > 0, "the closed gate reopened through its task gradient"
        else:
            assert reopened == pytest.approx(-0.05, abs=1e-7), "hard mode gives closed gates nothing"


class _ExpandBetween(nn.Module):
    """An expand between a gated layer and its consumer: no side-pass recipe (the group runs at full width)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.fc1(x))
        return self.fc2(h.unsqueeze(1).expand(-1, 2, -1).sum(1))


def test_a_group_without_a_recipe_runs_at_full_width_and_stays_exact():
    model, bank, none, exact, _ = _exact_and_none(_ExpandBetween, (6, 8))
    assert list(bank.compact.full_width) == list(bank.gates), bank.compact.full_width
    (reason,) = bank.compact.full_width.values()
    assert "fc1" in reason and "expand" in reason
    _assert_equal(none, exact)
    closed = torch.cat([none[f"gate:{k}"][~g.open_mask()] for k, g in bank.gates.items()])
    assert closed.abs().sum() > 0


def test_full_width_groups_fold_no_gate_through_an_activation():
    """A gate after a ReLU module is folded into the BatchNorm before it (hard mode); in a full-width
    group that would give closed gates relu'(0) = 0: the gate is applied on the activation instead."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(6)
            self.act = nn.ReLU()
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.bn(self.conv(x)))
            return self.head(h.unsqueeze(1).expand(-1, 2, -1, -1, -1).sum(1).mean((2, 3)))

    model, bank, none, exact, none_state = _exact_and_none(Net, (2, 3, 8, 8))
    assert bank.compact.full_width
    _assert_equal(none, exact)
    for name in ("bn.running_mean", "bn.running_var"):  # a full-width group: closed channels' statistics too
        torch.testing.assert_close(model.state_dict()[name], none_state[name])


def test_the_torch_fx_analysis_keeps_exact_on_the_per_layer_path():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(ResNetCifar(8), x, skip="exact", tracer="fx")
    assert bank.compact.exact_reason is not None
    fallbacks = bank.compact.stats.fallbacks
    model(x).sum().backward()
    assert bank.compact.stats.fallbacks == fallbacks + 1 and bank.compact.stats.exact_forwards == 0


def test_exact_steps_plan_the_open_set_once_per_forward():
    torch.manual_seed(0)
    base = ResNetCifar(8)
    x = torch.randn(2, 3, 16, 16)
    model, bank = tg.attach_gates(base, x, skip="exact")
    close_random_half(bank)
    with mock.patch.object(CompactForward, "open_masks", autospec=True, side_effect=CompactForward.open_masks) as masks:
        for _ in range(3):
            model(x).sum().backward()  # no optimizer step: the open set does not change
    assert masks.call_count == 3
    plans = bank.compact.stats.plans
    model(x).sum().backward()
    assert bank.compact.stats.plans == plans, "an unchanged open set is not planned again"


class _InPlaceAfterConsumer(nn.Module):
    """The consumer's output is modified in place (``out += x``), as residual blocks often do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(nn.functional.gelu(self.fc1(x)))
        out += x
        return out.relu_()


def test_in_place_ops_on_a_consumer_output_keep_exact_compact():
    model, bank, none, exact, _ = _exact_and_none(_InPlaceAfterConsumer, (4, 6))
    assert bank.compact.disabled_reason is None
    _assert_equal(none, exact)


def _model_case(name: str):
    from test_compact import _transformer_case

    if name in ("translation", "flownet_s", "style_transfer"):
        from tests.prune_zoo import task_family_models

        build, args, kwargs = task_family_models()[name]
        return build(), args, kwargs
    return _transformer_case(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["bert", "gpt2", "llama_gqa", "vit", "t5", "timm_vit", "translation", "flownet_s", "style_transfer"]
)
def test_transformers_exact_gradients_equal_none_mode(name):
    """Heads (gates over whole heads) have no recipe: their groups run at full width, MLP hidden units get
    the side pass; every gradient is none mode's (float64, eval mode: no dropout)."""
    torch.manual_seed(0)
    base, args, kwargs = _model_case(name)
    base = base.eval().double()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(base, args, example_kwargs=kwargs, skip="exact")
    assert bank.compact.disabled_reason is None and bank.compact.exact_reason is None
    close_random_half(bank)
    results = []
    for skip in ("none", "exact"):
        bank.set_skip(skip)
        model.zero_grad(set_to_none=True)
        from tg_kernels.pruning.compact import _tensor_leaves

        out = [t for t in _tensor_leaves(model(*args, **kwargs)) if t.is_floating_point()]
        sum((t * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).square().mean() for t in out).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        grads.update({f"gate:{k}": g.weight.grad for k, g in bank.gates.items()})
        results.append(grads)
    assert bank.compact.stats.exact_forwards == 1
    _assert_equal(*results)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_under_autocast_gives_closed_gates_gradients_close_to_float32(dtype):
    """Mixed precision: the side pass computes in the parameters' dtype whatever autocast runs."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(MLPBlock(16, 64), x, skip="exact")
    close_random_half(bank)
    results = []
    for skip, autocast in (("none", False), ("exact", True)):
        bank.set_skip(skip)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
        results.append(torch.cat([g.weight.grad for g in bank.gates.values()]))
    closed = torch.cat([~g.open_mask() for g in bank.gates.values()])
    none, exact = results
    assert exact[closed].abs().sum() > 0
    torch.testing.assert_close(exact[closed], none[closed], rtol=0.1, atol=0.05 * none[closed].abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("build, shape", [MODELS[0], MODELS[1], MODELS[2]])
def test_exact_gradients_equal_none_mode_on_cuda(build, shape):
    """The same check on the GPU (compact kept counts padded to a multiple of 8 there)."""
    base, x = float64_case(build, shape, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(base, x, skip="exact")
    close_random_half(bank)
    state = copy.deepcopy(model.state_dict())
    none = _gradients(model, bank, x, "none")
    model.load_state_dict(state)
    exact = _gradients(model, bank, x, "exact")
    assert bank.compact.stats.exact_forwards == 1
    _assert_equal(none, exact)


@pytest.mark.parametrize("build, shape", [MODELS[0], MODELS[1], MODELS[2], MODELS[3]])
def test_exact_with_kept_counts_padded_still_equals_none_mode(build, shape):
    """CUDA pads kept channel counts with closed channels (round_to=8); forced on CPU here: padded closed
    channels are computed (as zeros) and their gates get their gradient from the side pass alone."""
    base, x = float64_case(build, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(base, x, skip="exact")
    bank.compact.round_to = 3  # half-open counts are even: 3 pads them
    close_random_half(bank)
    state = copy.deepcopy(model.state_dict())
    none = _gradients(model, bank, x, "none")
    model.load_state_dict(state)
    exact = _gradients(model, bank, x, "exact")
    padded = [key for key, kept in bank.compact._plan.kept.items() if kept.numel() > bank.gates[key].open_mask().sum()]
    assert padded, "some group is padded with closed channels"
    _assert_equal(none, exact)


def test_a_retained_graph_gives_the_same_closed_gate_gradients_twice():
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.manual_seed(0)
    base = MLPBlock(16, 64).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, gates = tg.attach_gates(base, x, skip="exact")
    close_random_half(gates)
    loss = net(x).square().mean()
    loss.backward(retain_graph=True)
    first = torch.cat([g.weight.grad.clone() for g in gates.gates.values()])
    loss.backward()
    second = torch.cat([g.weight.grad for g in gates.gates.values()])
    torch.testing.assert_close(second, 2 * first)
    assert first[torch.cat([~g.open_mask() for g in gates.gates.values()])].abs().sum() > 0


def test_compiled_exact_model_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(MLPBlock(16, 64), x, skip="exact")
    close_random_half(bank)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.compile(model)(x).square().mean().backward()
    assert bank.compact.disabled_reason is None and bank.compact.stats.exact_forwards == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 1},
        {"kernel_size": (1, 3), "padding": (0, 2), "dilation": (1, 2)},
        {"kernel_size": 5, "padding": 1},  # padding below d * (k - 1): a "valid"-like conv
        {"kernel_size": 3, "padding": 2},  # padding above d * (k - 1): conv2d_input
        {"kernel_size": 3, "padding": 1, "stride": 2},  # strided: conv2d_input
        {"kernel_size": 3, "padding": "same"},
    ],
)
def test_conv_input_gradient_equals_autograd(kwargs):
    """The side pass's consumer input gradient (a flipped-kernel forward conv where it can) is autograd's."""
    from tg_kernels.pruning.side_pass import _conv_input_gradient

    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, bias=False, **kwargs).double()
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    dy = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, dy)
    actual = _conv_input_gradient(conv, conv.weight.detach(), dy, x.shape)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    "build, shape",
    [
        pytest.param(lambda: ResNetCifar(8), (2, 3, 16, 16), id="resnet_cifar"),
        pytest.param(lambda: MLPBlock(16, 64), (2, 5, 16), id="mlp_block"),
        pytest.param(_PoolBetween, (2, 3, 12, 12), id="pooling_between"),
    ],
)
@pytest.mark.parametrize("every", [2, 3])
def test_side_pass_every_k_steps_is_an_unbiased_estimate_of_none_modes_gradients(build, shape, every):
    """``side_pass_every=k``: the side pass runs on every k-th step with its gradients times k. Every
    step's other gradients (weights, open gates) are ``none`` mode's; a closed gate's is k times its
    ``none`` gradient on one step in k and 0 on the others, so the mean over the k steps (the
    expectation over where a run starts in the cycle) is ``none`` mode's, in float64 at the same parameters."""
    model, bank, none, _, state = _exact_and_none(build, shape)
    _, x = float64_case(build, shape)
    closed = {f"gate:{key}": ~gate.open_mask() for key, gate in bank.gates.items()}
    by_param = {id(gate.weight): closed[f"gate:{key}"] for key, gate in bank.gates.items()}
    closed |= {n: by_param[id(p)] for n, p in model.named_parameters() if id(p) in by_param}  # (the same tensors)
    assert any(mask.any() for mask in closed.values())
    bank.compact.side_pass_every = every
    bank.compact.stats.exact_forwards = 0
    steps = []
    for _ in range(2 * every):  # two whole cycles
        model.load_state_dict(state)
        steps.append(_gradients(model, bank, x, "exact"))
    for i, grads in enumerate(steps):
        others = {n: g if n not in closed else g[~closed[n]] for n, g in grads.items() if g is not None}
        _assert_equal({n: g if n not in closed else g[~closed[n]] for n, g in none.items() if g is not None}, others)
        scale = every if i % every == 0 else 0
        _assert_equal({n: scale * none[n][m] for n, m in closed.items()}, {n: grads[n][m] for n, m in closed.items()})
    for cycle in (steps[:every], steps[every:]):
        mean = {name: sum(g[name] for g in cycle) / every for name in closed}
        _assert_equal({name: none[name] for name in closed}, mean)
