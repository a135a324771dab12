"""Compact execution: a gated model in hard mode (and without gradients) runs its exported structure.

The central checks, in float64 so that only real differences show: one compact hard train step
gives the same loss and gradients as the same model on the per-layer path (``compact=False``) and as
the exported model (its gradients mapped back into the full tensors, zeros elsewhere).
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import float64_case, randomize_norms
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tg_kernels as tg
from bench.models import MLPBlock, ResNetCifar
from tg_kernels.ops import _skip
from tg_kernels.pruning.compact import _tensor_leaves
from tg_kernels.pruning.slicing import kept_channels, kept_entries

torchvision = pytest.importorskip("torchvision")


def _close_random(bank: tg.GateBank, seed: int = 1) -> None:
    """Close a random half of every group (at least one channel stays open)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in bank.gates.values():
            c = gate.num_channels
            closed = torch.randperm(c, generator=g)[: c // 2]
            gate.weight.fill_(0.5)
            gate.weight[closed] = -0.5


def _pair(build, shape, seed: int = 0, **attach_options):
    """The same float64 model gated twice: compact (default) and per-layer (compact=False), hard mode."""
    base, x = float64_case(build, shape, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compact, cbank = tg.attach_gates(copy.deepcopy(base), x, skip="hard", **attach_options)
        per_layer, pbank = tg.attach_gates(copy.deepcopy(base), x, skip="hard", compact=False)
    assert cbank.compact is not None and cbank.compact.disabled_reason is None, cbank.compact.disabled_reason
    _close_random(cbank)
    _close_random(pbank)
    return compact, cbank, per_layer, pbank, x


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().mean()


def _step(model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = _loss(model, x)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _assert_grads_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        ga, gb = a[name], b[name]
        if ga is None or gb is None:
            assert ga is None and gb is None, name
            continue
        scale = gb.abs().max().item()
        assert (ga - gb).abs().max().item() <= 1e-9 * scale + 1e-11, name  # absolute part: gradients that are 0


MODELS = [
    pytest.param(lambda: ResNetCifar(56), (2, 3, 16, 16), id="resnet56"),
    pytest.param(lambda: MLPBlock(16, 64), (2, 5, 16), id="mlp_block"),
    pytest.param(
        lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), id="resnet18", marks=pytest.mark.slow
    ),
    # (64x64: at 32x32 the last BatchNorm sees 2 values per channel, and its tiny batch variance
    # amplifies float reassociation to 1e-7 of gradients of size 6e4)
    pytest.param(
        lambda: torchvision.models.densenet121(num_classes=10), (2, 3, 64, 64), id="densenet121", marks=pytest.mark.slow
    ),
    pytest.param(
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        (2, 3, 32, 32),
        id="mobilenet_v2",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("build, shape", MODELS)
def test_compact_hard_step_matches_per_layer_and_exported(build, shape):
    compact, cbank, per_layer, _, x = _pair(build, shape)
    exported = tg.export(compact)
    exported_params = dict(exported.named_parameters())

    loss_c, grads_c = _step(compact, x)
    loss_p, grads_p = _step(per_layer, x)
    loss_e, grads_e = _step(exported, x)
    assert cbank.compact.stats.forwards == 1
    assert loss_c == pytest.approx(loss_p, rel=1e-12) and loss_c == pytest.approx(loss_e, rel=1e-12)
    _assert_grads_equal(grads_c, grads_p)

    # The exported model's gradients are the compact model's at the kept entries; zeros elsewhere.
    kept = {key: kept_channels(gate.open_mask()) for key, gate in cbank.gates.items()}
    entries = kept_entries(compact, cbank, kept)
    gate_names = {n for n, p in compact.named_parameters() if any(p is g.weight for g in cbank.gates.values())}
    for name, grad in grads_c.items():
        if name in gate_names:
            continue
        mapped = grad
        for (target, dim), index in entries.items():
            if target == name:
                mapped = mapped.index_select(dim, index)
        expected = exported_params[name].grad
        scale = expected.abs().max().item()
        assert (mapped - expected).abs().max().item() <= 1e-9 * scale + 1e-11, name
        assert mapped.abs().sum().item() == pytest.approx(grad.abs().sum().item(), rel=1e-12), f"{name}: closed entries"


class _SharedReluMLP(nn.Module):
    """Linear layers behind one shared ``nn.ReLU``: no module returns a gated value, so gates sit on
    the next Linear's input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class _SharedReluConvs(nn.Module):
    """1x1 conv, a grouped (depthwise at ``groups=16``) conv, then a conv or transposed conv, behind one
    shared ``nn.ReLU``: the gates sit on the grouped conv's and the last conv's inputs."""

    def __init__(self, groups: int, transposed: bool = False) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.grouped, self.b2 = nn.Conv2d(16, 32, 3, padding=1, groups=groups), nn.BatchNorm2d(32)
        self.c3 = nn.ConvTranspose2d(32, 8, 2, stride=2) if transposed else nn.Conv2d(32, 8, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.act(self.b2(self.grouped(self.act(self.b1(self.c1(x)))))))


INPUT_GATED = [
    pytest.param(lambda: ResNetCifar(8), (2, 3, 16, 16), {"blocks.0.conv2", "blocks.1.conv2"}, id="resnet_cifar"),
    pytest.param(
        lambda: torchvision.models.resnet18(num_classes=10),
        (2, 3, 32, 32),
        {"layer1.0.conv2", "layer4.1.conv2"},
        id="resnet18_shared_relu",
        marks=pytest.mark.slow,
    ),
    pytest.param(_SharedReluMLP, (2, 5, 16), {"fc2", "fc3"}, id="mlp_shared_relu"),
    pytest.param(lambda: _SharedReluConvs(16), (2, 3, 8, 8), {"grouped", "c3"}, id="depthwise"),
    pytest.param(lambda: _SharedReluConvs(4), (2, 3, 8, 8), {"grouped", "c3"}, id="grouped"),
    pytest.param(lambda: _SharedReluConvs(1, transposed=True), (2, 3, 8, 8), {"grouped", "c3"}, id="conv_transpose"),
]


@pytest.mark.parametrize("round_to", [1, 3], ids=["open-gates-only", "padded-with-closed"])
@pytest.mark.parametrize("build, shape, folded", INPUT_GATED)
def test_input_gates_fold_into_weights_with_per_layer_gradients(build, shape, folded, round_to):
    """A gate on a layer's input scales the weight entries reading each channel (a weight-sized op):
    learning gates get the same loss and gradients (weights, biases, norms and gates) as on the
    per-layer path, which multiplies the activations. ``round_to=3`` keeps closed channels as padding
    (gate value 0): their scale is an actual multiply, the open-only case passes the weight through."""
    compact, cbank, per_layer, _, x = _pair(build, shape)
    cbank.compact.round_to = round_to
    columns = {fold.module for fold, _ in cbank.compact._column_folds}
    assert folded <= columns
    seen = []
    # while the layer runs, its input hook leaves the activation alone: the weight took the gate
    hooks = [fold.hook for fold, _ in cbank.compact._column_folds]
    for hook in hooks:  # (input size not seen yet: on the weight; see the test below for the other side)
        hook.input_numel = None
    handles = [
        compact.get_submodule(fold.module).register_forward_pre_hook(
            lambda m, a, h=fold.hook: seen.append(h.compact and h.compact_gate is None)
        )
        for fold, _ in cbank.compact._column_folds
    ]
    loss_c, grads_c = _step(compact, x)
    for handle in handles:
        handle.remove()
    loss_p, grads_p = _step(per_layer, x)
    assert cbank.compact.stats.forwards == 1 and len(seen) == len(hooks) and all(seen)
    if round_to != 1:
        assert not cbank.compact._plan.open_kept.all(), "some group is padded with closed channels"
    assert loss_c == pytest.approx(loss_p, rel=1e-12)
    gates = {n for n, p in compact.named_parameters() if any(p is g.weight for g in cbank.gates.values())}
    assert gates and all(grads_c[n] is not None and grads_c[n].abs().sum() > 0 for n in gates)
    _assert_grads_equal(grads_c, grads_p)


@pytest.mark.parametrize("round_to", [1, 3], ids=["open-gates-only", "padded-with-closed"])
@pytest.mark.parametrize("build, shape, folded", INPUT_GATED)
def test_learning_input_gates_go_on_the_smaller_of_input_and_weight(build, shape, folded, round_to):
    """From the second compact forward on, a learning input gate multiplies the layer's input where
    that input (as the last forward saw it) is smaller than the layer's compact weight, and scales
    the weight otherwise: the same loss and gradients as the per-layer path either way."""
    compact, cbank, per_layer, _, x = _pair(build, shape)
    cbank.compact.round_to = round_to
    _step(compact, x)
    _step(per_layer, x)
    placed = {}
    handles = [
        compact.get_submodule(fold.module).register_forward_pre_hook(
            lambda m, a, h=fold.hook, name=fold.module: placed.__setitem__(
                name, (h.compact_gate is not None, a[0].numel() < m.weight.numel())
            )
        )
        for fold, _ in cbank.compact._column_folds
    ]
    loss_c, grads_c = _step(compact, x)
    for handle in handles:
        handle.remove()
    loss_p, grads_p = _step(per_layer, x)
    assert placed and all(on_input == smaller for on_input, smaller in placed.values()), placed
    if build is _SharedReluMLP:  # 10 tokens: fc2's input is smaller than its weight
        assert placed["fc2"][0]
    assert loss_c == pytest.approx(loss_p, rel=1e-12)
    _assert_grads_equal(grads_c, grads_p)


def test_open_gates_get_their_task_gradient_and_closed_ones_none():
    compact, cbank, per_layer, pbank, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    _step(compact, x)
    _step(per_layer, x)
    for key, gate in cbank.gates.items():
        grad = gate.weight.grad
        assert torch.all(grad[~gate.open_mask()] == 0), key
        assert grad[gate.open_mask()].abs().sum() > 0, key
        torch.testing.assert_close(grad, pbank.gates[key].weight.grad, rtol=1e-9, atol=1e-12)


def test_batchnorm_statistics_update_open_channels_only():
    compact, cbank, _, _, x = _pair(lambda: ResNetCifar(8), (4, 3, 16, 16))
    before = {n: b.clone() for n, b in compact.named_buffers()}
    exported = tg.export(compact)
    _step(compact, x)
    _step(exported, x)
    exported_buffers = dict(exported.named_buffers())
    kept = {key: kept_channels(gate.open_mask()) for key, gate in cbank.gates.items()}
    entries = kept_entries(compact, cbank, kept)
    changed = 0
    for name, buffer in compact.named_buffers():
        index = entries.get((name, 0))
        if index is None:
            torch.testing.assert_close(buffer, exported_buffers[name])
            continue
        torch.testing.assert_close(buffer.index_select(0, index), exported_buffers[name])
        closed = torch.ones(buffer.shape[0], dtype=torch.bool)
        closed[index] = False
        assert torch.equal(buffer[closed], before[name][closed]), f"{name}: closed channels changed"
        changed += int(not torch.equal(buffer, before[name]))
    assert changed > 0


def test_a_gate_crossing_zero_changes_the_next_step():
    compact, cbank, per_layer, pbank, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    _step(compact, x)
    _step(per_layer, x)
    plans = cbank.compact.stats.plans
    for bank in (cbank, pbank):
        with torch.no_grad():
            gate = next(iter(bank.gates.values()))
            closed = torch.nonzero(~gate.open_mask()).flatten()
            opened = torch.nonzero(gate.open_mask()).flatten()
            gate.weight[closed[0]] = 0.25  # reopens
            gate.weight[opened[-1]] = -0.25  # closes
    loss_c, grads_c = _step(compact, x)
    loss_p, grads_p = _step(per_layer, x)
    assert cbank.compact.stats.plans == plans + 1
    assert loss_c == pytest.approx(loss_p, rel=1e-12)
    _assert_grads_equal(grads_c, grads_p)
    _step(compact, x)
    assert cbank.compact.stats.plans == plans + 1, "an unchanged open set must not be planned again"


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd_momentum", "adamw"],
)
def test_five_optimizer_steps_match_per_layer(make_optimizer):
    compact, cbank, per_layer, pbank, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    for model, bank in ((compact, cbank), (per_layer, pbank)):
        budget = tg.Budget(bank, target=0.3, weight=0.5)
        opt = make_optimizer(model.parameters())
        for _ in range(5):
            opt.zero_grad()
            (_loss(model, x) + budget()).backward()
            opt.step()
    for (name, a), (_, b) in zip(compact.named_parameters(), per_layer.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_eval_and_no_grad_run_compact_in_every_mode():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for skip in ("none", "exact", "hard"):
        base = ResNetCifar(8).double()
        randomize_norms(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, bank = tg.attach_gates(base, x, skip=skip)
        _close_random(bank)
        model.eval()
        with torch.no_grad():
            bank.compact.enabled = False
            expected = model(x)
            bank.compact.enabled = True
            forwards = bank.compact.stats.forwards
            actual = model(x)
            assert bank.compact.stats.forwards == forwards + 1
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        if skip == "none":  # training with gradients in "none" keeps the per-layer path
            model.train()
            fallbacks = bank.compact.stats.fallbacks
            model(x).sum().backward()
            assert bank.compact.stats.fallbacks == fallbacks + 1
        if skip == "exact":  # "exact" runs compact with the closed-channel side pass
            model.train()
            side = bank.compact.stats.exact_forwards
            model(x).sum().backward()
            assert bank.compact.stats.exact_forwards == side + 1


def _transformer_case(name: str):
    """(model, args, kwargs) of a small Hugging Face model (tests/prune_zoo.py) or timm's ViT at 32x32."""
    if name == "timm_vit":
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
        return model, (torch.randn(2, 3, 32, 32),), {}
    if name == "translation":  # nn.Transformer: attach swaps in PrunableMultiheadAttention; an input gate
        from tests.prune_zoo import task_family_models

        build, args, kwargs = task_family_models()[name]
        return build(), args, kwargs
    pytest.importorskip("transformers")
    from tests.prune_zoo import hf_models

    build, args, kwargs = hf_models()[name]
    return build(), args, kwargs


def _attached_twice(base: nn.Module, args: tuple, kwargs: dict):
    """``base`` gated compact and per layer (hard mode), a random half of each group closed in both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compact, cbank = tg.attach_gates(copy.deepcopy(base), args, example_kwargs=kwargs, skip="hard")
        per_layer, pbank = tg.attach_gates(copy.deepcopy(base), args, example_kwargs=kwargs, skip="hard", compact=False)
    _close_random(cbank)
    _close_random(pbank)
    return compact, cbank, per_layer, pbank


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_gqa", "vit", "t5", "timm_vit", "translation"])
def test_transformers_run_compact_with_whole_heads_and_tied_embeddings(name):
    """Gates over whole heads (repeat), size attributes (num_heads) and tied embedding / LM head weights:
    compact hard mode gives per-layer hard mode's outputs and gradients (float64; eval mode, so no dropout)."""
    torch.manual_seed(0)
    base, args, kwargs = _transformer_case(name)
    compact, cbank, per_layer, pbank = _attached_twice(base.eval(), args, kwargs)
    assert cbank.compact is not None and cbank.compact.disabled_reason is None, cbank.compact.disabled_reason
    assert len(cbank.gates) == len(pbank.gates) > 0
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    grads = []
    for model in (compact, per_layer):
        model.double()
        out = [t for t in _tensor_leaves(model(*args, **kwargs)) if t.is_floating_point()]
        sum((t * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).square().mean() for t in out).backward()
        grads.append(({n: p.grad for n, p in model.named_parameters()}, out))
    forwards = cbank.compact.stats.forwards
    assert forwards >= 1
    (gc, outc), (gp, outp) = grads
    for a, b in zip(outc, outp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # Llama's RMSNorm computes in float32
    for name_, g in gp.items():
        if g is None or gc[name_] is None:
            assert (g is None or not g.any()) and (gc[name_] is None or not gc[name_].any()), name_
            continue
        scale = g.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(gc[name_] / scale, g / scale, rtol=0, atol=1e-5, msg=name_)


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_padding_to_a_multiple_of_round_to_keeps_results_exact(name):
    """CUDA pads kept channel counts with closed channels (round_to=8); forced on CPU here. Groups a norm
    normalises over (BERT's residual stream under LayerNorm) are never padded: padding would count there."""
    if name == "resnet":
        compact, cbank, per_layer, pbank, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
        args, kwargs = (x,), {}
    else:
        torch.manual_seed(0)
        base, args, kwargs = _transformer_case("bert")
        args = tuple(a.double() if a.is_floating_point() else a for a in args)
        compact, cbank, per_layer, pbank = _attached_twice(base.eval().double(), args, kwargs)
    cbank.compact.round_to = 3
    results = []
    for model in (compact, per_layer):
        model.zero_grad(set_to_none=True)
        out = [t for t in _tensor_leaves(model(*args, **kwargs)) if t.is_floating_point()]
        sum((t * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).square().mean() for t in out).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    plan = cbank.compact._plan
    assert not plan.open_kept.all(), "some group is padded with closed channels"
    (oc, gc), (op, gp) = results
    for a, b in zip(oc, op, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for n, g in gp.items():
        if g is not None and gc[n] is not None:
            torch.testing.assert_close(gc[n], g, rtol=1e-8, atol=1e-12, msg=n)


def test_conversions_after_attach_replan_and_still_match_per_layer():
    """.float(), channels_last and in-place parameter changes between forwards: compact follows each."""
    compact, cbank, per_layer, pbank, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    for model in (compact, per_layer):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), per_layer(x), rtol=1e-10, atol=1e-12)  # caches compact tensors
        plans = cbank.compact.stats.plans
        for model in (compact, per_layer):
            model.float().to(memory_format=torch.channels_last)
        xf = x.float().to(memory_format=torch.channels_last)
        torch.testing.assert_close(compact(xf), per_layer(xf), rtol=1e-4, atol=1e-5)
        assert cbank.compact.stats.plans == plans + 1, "new dtype and strides: the plan is rebuilt once"
        for model in (compact, per_layer):
            model.blocks[0].conv1.weight.mul_(-2.0)  # bumps _version: the cached compact tensors are stale
        torch.testing.assert_close(compact(xf), per_layer(xf), rtol=1e-4, atol=1e-5)
        assert cbank.compact.stats.plans == plans + 1
    compact.train()
    per_layer.train()
    torch.testing.assert_close(_loss(compact, xf), _loss(per_layer, xf), rtol=1e-4, atol=1e-5)


def test_eval_after_a_fused_optimizer_step_or_a_data_edit_sees_the_new_parameters():
    """The no-grad cache of compact tensors: fused optimizers and .data edits bypass _version."""
    compact, cbank, per_layer, pbank, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    compact.float(), per_layer.float()
    x = x.float()
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (compact, per_layer)]

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            out = model(x)
        model.train()
        return out

    for _ in range(2):
        torch.testing.assert_close(evaluate(compact), evaluate(per_layer), rtol=1e-5, atol=1e-5)
        for model, opt in zip((compact, per_layer), opts):
            _loss(model, x).backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(evaluate(compact), evaluate(per_layer), rtol=1e-5, atol=1e-5)
    for model in (compact, per_layer):
        model.blocks[0].conv2.weight.data.mul_(3.0)  # invisible to _version
    tg.nn.forget_open_sets()
    torch.testing.assert_close(evaluate(compact), evaluate(per_layer), rtol=1e-5, atol=1e-5)


def test_reused_buffers_never_overwrite_gradients_someone_still_holds():
    """Compact execution reuses its gather and gradient buffers step to step only when nothing holds them."""
    compact, cbank, per_layer, pbank, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    x2 = torch.randn_like(x)
    _, first = _step(compact, x)
    held = {n: g for n, g in first.items() if g is not None}  # the very tensors, not copies
    copies = {n: g.clone() for n, g in held.items()}
    _step(compact, x2)  # zero_grad(set_to_none=True), then a step on other data
    for name, g in held.items():
        assert torch.equal(g, copies[name]), f"{name}: a gradient held from the last step was overwritten"
    del held, first
    # accumulation over two steps (no zero_grad in between) equals the sum of the two
    compact.zero_grad(set_to_none=True)
    for inputs in (x, x2, x, x2):
        _loss(compact, inputs).backward()
    _, g1 = _step(per_layer, x)
    g1 = {n: g.clone() for n, g in g1.items() if g is not None}
    _, g2 = _step(per_layer, x2)
    for name, p in compact.named_parameters():
        if name in g1:
            torch.testing.assert_close(p.grad, 2 * (g1[name] + g2[name]), rtol=1e-9, atol=1e-12, msg=name)


def test_set_skip_switches_a_model_into_and_out_of_compact_training():
    compact, cbank, _, _, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    cbank.set_skip("none")
    _step(compact, x)
    assert cbank.compact.stats.forwards == 0
    cbank.set_skip("exact")
    _step(compact, x)
    assert (cbank.compact.stats.forwards, cbank.compact.stats.exact_forwards) == (1, 1)
    closed_grads = torch.cat([g.weight.grad[~g.open_mask()] for g in cbank.gates.values()])
    assert closed_grads.abs().sum() > 0, "exact mode gives closed gates their task gradient"
    cbank.set_skip("hard")
    _step(compact, x)
    assert (cbank.compact.stats.forwards, cbank.compact.stats.exact_forwards) == (2, 1)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_the_open_set_is_planned_once_per_forward_not_per_layer():
    compact, cbank, _, _, x = _pair(lambda: ResNetCifar(20), (2, 3, 16, 16))
    _step(compact, x)  # the first forward plans
    with mock.patch.object(_skip, "plan_active", wraps=_skip.plan_active) as per_layer_plans:
        with _CountOps() as ops:
            _loss(compact.train(), x).backward()
        with torch.no_grad(), _CountOps() as eval_ops:
            compact.eval()(x)
    assert per_layer_plans.call_count == 0
    for counts in (ops.counts, eval_ops.counts):
        assert counts.get("equal", 0) == 1, counts.get("equal")  # the one comparison of the open set
        assert counts.get("nonzero", 0) == 0 and counts.get("_local_scalar_dense", 0) == 0


class _KeepsAGatedSize(nn.Module):
    """Reads the channel count of a gated tensor and keeps it: compact execution cannot follow this."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.channels = 8
        self.grid = (8, -1)  # not an int attribute: export's size attributes cannot follow it

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        flat = h.reshape(h.shape[0], *self.grid).mean(-1)  # fine at full width, wrong when compact
        return self.head(flat)


def test_a_model_that_keeps_a_gated_size_falls_back_with_one_warning():
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    base = _KeepsAGatedSize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_layer, pbank = tg.attach_gates(copy.deepcopy(base), x, skip="hard", compact=False, self_check=False)
    # self_check=False: the analysis' own self-check would keep this group whole (and export exact);
    # here compact execution's check has to catch it.
    with pytest.warns(UserWarning, match="compact execution is off") as caught:
        model, bank = tg.attach_gates(base, x, skip="hard", self_check=False)
    assert len([w for w in caught if "compact execution" in str(w.message)]) == 1
    assert "example inputs" in bank.compact.disabled_reason
    _close_random(bank)
    _close_random(pbank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not again at every forward
        torch.testing.assert_close(model(x), per_layer(x))
    assert bank.compact.stats.forwards == 0


class _HoldsAGatedSize(_KeepsAGatedSize):
    """Reshapes with ``self.channels`` (torchvision's ViT does ``reshape(n, self.hidden_dim, h * w)``)."""

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.reshape(h.shape[0], self.channels, -1).mean(-1))


def test_a_channel_count_held_in_an_int_attribute_follows_the_kept_channels():
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the self-check nor compact execution objects
        model, bank = tg.attach_gates(_HoldsAGatedSize(), x, skip="hard")
    assert [(sa.module, sa.attr) for sa in bank.analysis.size_attrs] == [("", "channels")]
    _close_random(bank)
    model.double().eval()
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x.double()), model(x.double()), rtol=1e-10, atol=1e-12)
    assert exported.channels == exported.conv.out_channels == 4 and model.channels == 8
    assert bank.compact.disabled_reason is None and bank.compact.stats.forwards >= 1


class _FailsCompactLater(_KeepsAGatedSize):
    """Fine at attach time; once ``later`` is set its code keeps a gated size: caught at run time."""

    later = False

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if self.later:
            h = h.reshape(h.shape[0], self.channels, -1)
        return self.head(h.flatten(2).mean(-1))


def test_a_forward_that_fails_compact_at_run_time_is_rerun_per_layer():
    torch.manual_seed(0)
    model, bank = tg.attach_gates(_FailsCompactLater(), torch.randn(2, 3, 8, 8), skip="hard", self_check=False)
    assert bank.compact.disabled_reason is None
    _close_random(bank)
    twin = copy.deepcopy(model)
    twin.tg_gates.compact.enabled = False
    model.later = twin.later = True
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match="compact execution is off"):
        out = model(x)
    torch.testing.assert_close(out, twin(x))
    assert "raised" in bank.compact.disabled_reason
    with pytest.raises((RuntimeError, ValueError)):  # an input that fails on every path still raises
        model(torch.randn(4, 5, 8, 8))


def test_paper_form_gates_run_per_layer_and_say_why():
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, bank = tg.attach_gates(ResNetCifar(8), x, skip="hard", gate_M=10.0)
    assert "paper-form" in bank.compact.disabled_reason


def test_copies_state_dict_and_export_of_a_compact_model():
    compact, cbank, _, _, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    names = [n for n, _ in compact.named_parameters()]
    _step(compact, x)
    assert [n for n, _ in compact.named_parameters()] == names, "parameters are the full-size ones after a step"
    for name, p in compact.named_parameters():
        assert isinstance(p, nn.Parameter), name
    twin = copy.deepcopy(compact)
    assert twin.forward.model is twin and twin.tg_gates.compact is twin.forward
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), compact.eval()(x))
    exported = tg.export(compact)
    assert "forward" not in exported.__dict__
    state = compact.state_dict()
    assert all(state[n].shape == p.shape for n, p in compact.named_parameters())


@pytest.mark.slow
def test_compiled_compact_model_matches_eager():
    compact, cbank, per_layer, _, x = _pair(lambda: ResNetCifar(8), (2, 3, 16, 16))
    compact.float()
    x = x.float()
    expected = _loss(compact, x)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in compact.named_parameters()}
    compact.zero_grad(set_to_none=True)
    compiled = torch.compile(compact)
    actual = _loss(compiled, x)
    actual.backward()
    torch.testing.assert_close(actual, expected)
    for name, p in compact.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert cbank.compact.stats.forwards >= 2


# --------------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 gloo processes
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, bank = tg.attach_gates(ResNetCifar(8), torch.randn(2, 3, 16, 16), skip="hard")
        _close_random(bank)
        ddp = nn.parallel.DistributedDataParallel(
            model
        )  # find_unused_parameters=False: every parameter gets a gradient
        budget = tg.Budget(ddp, target=0.3, weight=0.5)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(100 + rank)
        for _ in range(3):
            x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
            loss = nn.functional.cross_entropy(ddp(x), y) + budget()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert bank.compact.stats.forwards == 3
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_ranks_keep_identical_parameters(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0, r1)


@pytest.mark.gpu
def test_one_host_synchronisation_per_forward_on_cuda():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(ResNetCifar(20).cuda(), x, skip="hard")
    _close_random(bank)
    model(x).sum().backward()  # plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


def _bundle_case(conv_rows_only: bool = False):
    """Four float64 tensors: scaled 1-D and 4-D (one channels_last), an unscaled 2-D one (transposed), a 1-D one."""
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(6, 5, 3, 2, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
    tensors = [
        torch.randn(7, dtype=torch.float64, generator=g),
        conv,
        torch.randn(4, 6, dtype=torch.float64, generator=g).t(),  # dense, not contiguous
        torch.randn(5, dtype=torch.float64, generator=g),
    ]
    dims = [
        [(0, torch.tensor([1, 2, 6]))],
        [(0, torch.tensor([0, 2, 3, 5]))] + ([] if conv_rows_only else [(1, torch.tensor([1, 4]))]),
        [(1, torch.tensor([0, 3]))],
        [],
    ]
    scaled = [True, True, False, False]
    return [t.requires_grad_() for t in tensors], dims, scaled


def _reference_gather(t, dims, scale=None):
    out = t
    for dim, index in dims:
        out = out.index_select(dim, index)
    return out if scale is None else out * scale.view(-1, *([1] * (out.dim() - 1)))


@pytest.mark.parametrize("along_one_dim", [False, True], ids=["by-offset", "along-one-dim"])
def test_gather_bundle_matches_index_select_and_passes_gradcheck(along_one_dim, monkeypatch):
    from tg_kernels.pruning import gather
    from tg_kernels.pruning.gather import Bundle, gather_bundle

    if along_one_dim:  # tensors sliced along one dim are gathered along it from this size on
        monkeypatch.setattr(gather, "_ALONG_ONE_DIM", 1)

    tensors, dims, scaled = _bundle_case(conv_rows_only=along_one_dim)
    bundle, order = Bundle.build(tensors, dims, scaled)
    assert [a is not None for a in bundle.along] == [False, along_one_dim, along_one_dim, False]
    assert bundle.matches([tensors[i] for i in order])
    assert not bundle.matches([tensors[i].contiguous() for i in order])  # the strides changed
    rows = [3, 4]  # the scaled tensors' kept rows, in bundle order (the 1-D one first)
    scale = torch.rand(sum(rows), dtype=torch.float64, requires_grad=True)
    out = gather_bundle(bundle, [tensors[i] for i in order], scale)
    pieces = dict(zip(order, out))
    torch.testing.assert_close(pieces[0], _reference_gather(tensors[0], dims[0], scale[:3]))
    torch.testing.assert_close(pieces[1], _reference_gather(tensors[1], dims[1], scale[3:]))
    torch.testing.assert_close(pieces[2], _reference_gather(tensors[2], dims[2]))
    torch.testing.assert_close(pieces[3], tensors[3])

    def run(s, *ts):
        return gather_bundle(bundle, ts, s)

    assert torch.autograd.gradcheck(run, (scale, *[tensors[i] for i in order]))
    # the full-size gradients keep their tensors' layouts (so AccumulateGrad need not copy them)
    sum(o.sum() for o in gather_bundle(bundle, [tensors[i] for i in order], scale)).backward()
    assert tensors[1].grad.stride() == tensors[1].stride() and tensors[2].grad.stride() == tensors[2].stride()
    with pytest.raises(ValueError, match="scale vector has 2 entries"):
        gather_bundle(bundle, [tensors[i] for i in order], scale[:2])
    # unit=True (every scale exactly 1): the same values and the same gradients, without the multiplies
    results = []
    for unit in (False, True):
        ones = torch.ones_like(scale, requires_grad=True)
        fulls = [tensors[i].detach().clone().requires_grad_() for i in order]
        out = gather_bundle(bundle, fulls, ones, unit=unit)
        sum((o * torch.arange(o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in out).backward()
        results.append((out, ones.grad, [f.grad for f in fulls]))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    torch.testing.assert_close(results[1][1], results[0][1])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(b, a)


def test_gather_bundle_copies_conv_weights_in_runs_of_their_kernel():
    """A contiguous conv weight sliced along its out and in channels keeps runs of kh * kw elements,
    gathered and scattered run by run; a channels_last one (its in channels innermost) element by element."""
    from tg_kernels.pruning.gather import Bundle, gather_bundle, run_length

    g = torch.Generator().manual_seed(1)
    conv = torch.randn(6, 5, 3, 2, dtype=torch.float64, generator=g)
    last = torch.randn(6, 5, 3, 2, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
    rows, cols = torch.tensor([0, 2, 3]), torch.tensor([1, 4])
    dims = [[(0, rows), (1, cols)], [(0, rows), (1, cols)], [(1, cols)]]
    tensors = [conv, last, torch.randn(4, 5, 2, 2, dtype=torch.float64, generator=g)]
    assert [run_length(t, d) for t, d in zip(tensors, dims)] == [6, 1, 4]
    assert run_length(torch.zeros(0, 3), []) == 1
    bundle, order = Bundle.build(tensors, dims, [True, False, False])
    assert sorted(bundle.runs) == [1, 4, 6]
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    fulls = [tensors[i].clone().requires_grad_() for i in order]
    out = dict(zip(order, gather_bundle(bundle, fulls, scale)))
    torch.testing.assert_close(out[0], _reference_gather(conv, dims[0], scale))
    torch.testing.assert_close(out[1], _reference_gather(last, dims[1]))
    torch.testing.assert_close(out[2], _reference_gather(tensors[2], dims[2]))

    def run(s, *ts):
        return gather_bundle(bundle, ts, s)

    assert torch.autograd.gradcheck(run, (scale, *fulls))


def test_kept_gate_values_are_the_open_masks_with_hard_mode_gradients():
    from tg_kernels.gate import gaussian_shape
    from tg_kernels.pruning.gather import kept_gate_values

    weights = [torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)]
    weights = [w.requires_grad_() for w in weights]
    kept = torch.tensor([0, 1, 4])  # channel 1 of the first gate is closed but kept (padding)
    open_kept = torch.tensor([True, False, True])
    values = kept_gate_values(gaussian_shape, weights, kept, open_kept)
    torch.testing.assert_close(values, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    (values * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).sum().backward()
    g = gaussian_shape(torch.tensor([0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(weights[0].grad, torch.tensor([g[0], 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(weights[1].grad, torch.tensor([0.0, 3 * g[1]], dtype=torch.float64))


def test_open_masks_equals_open_mask_gate_by_gate():
    from tg_kernels.gate import open_mask, open_masks

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(1, 6, (1,), generator=g))
        weights = [
            torch.randn(int(torch.randint(0, 9, (1,), generator=g)), generator=g).round() - 0.5 for _ in range(n)
        ]
        min_opens = [int(torch.randint(0, 4, (1,), generator=g)) for _ in range(n)]  # ties above, k > size too
        expected = torch.cat([open_mask(w, k) for w, k in zip(weights, min_opens)])
        assert torch.equal(open_masks(weights, min_opens), expected)


@pytest.mark.parametrize("along_one_dim", [False, True])
def test_gather_bundle_passes_whole_tensors_through_with_the_same_gradients(along_one_dim, monkeypatch):
    """An all-open layer keeps every entry: unscaled (or unit-scaled) it is its full tensor, not a copy,
    and its gradients (the full tensor's and the scale's) are those of the copying path."""
    from tg_kernels.pruning import gather
    from tg_kernels.pruning.gather import Bundle, gather_bundle

    if along_one_dim:
        monkeypatch.setattr(gather, "_ALONG_ONE_DIM", 1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, dtype=torch.float64, generator=g)  # rows scaled, every row kept
    b = torch.randn(3, 6, dtype=torch.float64, generator=g)  # columns sliced: copied
    c = torch.randn(4, 5, dtype=torch.float64, generator=g)  # unscaled, every column kept
    dims = [[(0, torch.arange(5))], [(1, torch.tensor([0, 2, 5]))], [(1, torch.arange(5))]]
    bundle, order = Bundle.build([a, b, c], dims, [True, False, False])
    assert [bundle.whole[order.index(i)] for i in range(3)] == [True, False, True]
    fulls = [t.clone().requires_grad_() for t in (a, b, c)]
    ones = torch.ones(5, dtype=torch.float64, requires_grad=True)
    results = []
    for unit in (True, False):
        for f in (*fulls, ones):
            f.grad = None
        out = dict(zip(order, gather_bundle(bundle, [fulls[i] for i in order], ones, unit=unit)))
        if unit:
            assert out[0]._base is fulls[0] or out[0].data_ptr() == fulls[0].data_ptr()  # not copied
        sum((o * torch.arange(o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in out.values()).backward()
        results.append(([out[i].detach() for i in range(3)], [f.grad.clone() for f in fulls], ones.grad.clone()))
    (v1, g1, s1), (v2, g2, s2) = results
    for x, y in zip(v1 + g1 + [s1], v2 + g2 + [s2]):
        torch.testing.assert_close(x, y)

    def run(s, *ts):
        return gather_bundle(bundle, ts, s)

    scale = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (scale, *[fulls[i].detach().requires_grad_() for i in order]))
