"""Every everyday path on every small fixture of the zoo, each result against an independent reference.

Models: torchvision's resnet18, a tiny Hugging Face Llama (grouped KV heads, default config), a CNN
with BatchNorm and a residual add, a LayerNorm MLP, a GroupNorm conv net, a non-affine
InstanceNorm net, branches concatenated along a spatial dim, and PyTorch's tutorial transformer (its
causal mask made in the forward). Paths: train steps in every skip mode with learning and with
frozen gates, eval with and without gradients, ``copy.deepcopy``, ``swa_utils.AveragedModel``, a
state_dict loaded into a freshly attached model, ``torch.save`` / ``torch.load`` of the gated model,
``export`` with ``round_to`` 1 and 8, ``tg.save`` / ``tg.load``, and a train step of the exported
model, and ``torch.compile``. The reference for the gated model is the same model in ``none`` mode (the per-layer path,
which multiplies by the gates), computed in float64.
"""

from __future__ import annotations

import copy
import io
import os
import time
import warnings

import pytest
import torch
import torchvision
from helpers import close_random_half
from prune_zoo import extra_hf_models, hf_models, rnn_models, task_family_models
from test_trust import CatAlongHeight, InstanceNormNet, NormNet, TutorialTransformer, tiny_llama
from torch import nn

import tg_kernels as tg


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))) + h)
        return self.head(h.mean((2, 3)))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 48)
        self.norm = nn.LayerNorm(48)
        self.fc2 = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _one(make):
    return lambda: ((make(),), {})


# name -> (builder, example inputs: () -> (positional, keyword))
FIXTURES = {
    "torchvision_resnet18": (_resnet18, _one(lambda: torch.randn(2, 3, 32, 32))),
    "hf_llama": (tiny_llama, _one(lambda: torch.randint(0, 64, (2, 8)))),
    "residual_cnn": (ResidualCNN, _one(lambda: torch.randn(3, 3, 8, 8))),
    "layernorm_mlp": (LayerNormMLP, _one(lambda: torch.randn(5, 12))),
    "norms": (NormNet, _one(lambda: torch.randn(3, 3, 8, 8))),
    "instance_norm": (InstanceNormNet, _one(lambda: torch.randn(2, 3, 8, 8))),
    "cat_along_height": (CatAlongHeight, _one(lambda: torch.randn(2, 3, 7, 7))),
    "tutorial_transformer": (TutorialTransformer, _one(lambda: torch.randint(0, 50, (6, 2)))),
}


def _timm(name: str, size: int, **options):
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, num_classes=10, **options)

    return build, _one(lambda: torch.randn(2, 3, size, size))


def _from_zoo() -> dict:
    """The zoo of tests/prune_zoo.py (transformers with the library's defaults, the task families,
    the recurrent models) and timm models at a small image size, for the cheap paths."""
    found = {}
    for name, (build, args, kwargs) in {
        **hf_models(),
        **extra_hf_models(),
        **task_family_models(),
        **rnn_models(),
    }.items():
        found[f"zoo_{name}"] = (build, lambda a=args, k=kwargs: (a, k))
    timm_small = {
        "convnext_atto": 32, "efficientnet_b0": 32, "mobilenetv3_large_100": 32, "regnetx_002": 32,
        "poolformer_s12": 32, "ghostnet_100": 32, "repvgg_a0": 32, "mixnet_s": 32,
    }  # fmt: skip
    for name, size in timm_small.items():
        found[f"timm_{name}"] = _timm(name, size)
    found["timm_vit_tiny_patch16_224"] = _timm("vit_tiny_patch16_224", 32, img_size=32)
    return found


ZOO_SAMPLE = _from_zoo()
ZOO = {**FIXTURES, **ZOO_SAMPLE}
# timm models whose float64 paths take long on CPU (RegNet's grouped convs: minutes on 2 shared cores)
# run one a day; the rest of the sample runs every time.
SLOW = sorted(
    n for n in ZOO_SAMPLE if n.startswith("timm_") and n not in ("timm_convnext_atto", "timm_vit_tiny_patch16_224")
)
FAST = sorted(n for n in ZOO_SAMPLE if n not in SLOW)
# The full path list runs on the fixtures and on two FAST zoo models, the cheap paths on the other
# FAST models and one SLOW one; the choice rotates with TG_MATRIX_ROTATION (default: the day number),
# so that successive CI runs go through the whole sample.
_ROTATION = int(os.environ.get("TG_MATRIX_ROTATION", time.time() // 86400))
ROTATING = [FAST[(_ROTATION * 2 + i) % len(FAST)] for i in range(2)]
FULL = list(FIXTURES) + ROTATING
CHEAP = [n for n in FAST if n not in ROTATING] + [SLOW[_ROTATION % len(SLOW)]]


def _inputs(name: str) -> tuple[tuple, dict]:
    """The model's example inputs, floating-point ones in float64."""
    torch.manual_seed(1)
    args, kwargs = ZOO[name][1]()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    return args, {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}


def _attached(name: str, skip: str = "exact") -> tuple[nn.Module, tg.GateBank]:
    torch.manual_seed(0)
    build = ZOO[name][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args, kwargs = _inputs(name)
        model, bank = tg.attach_gates(build().double(), args, example_kwargs=kwargs, skip=skip)
    assert bank.gates, f"{name} gates nothing: {bank.skipped}"
    close_random_half(bank)
    return model, bank


def _no_dropout(model: nn.Module) -> None:
    """Deterministic train steps: dropout off (attention's, and the probabilities Hugging Face
    modules hold as floats, too), so two steps can be compared."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "drop_rate"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _with_reference(name: str):
    """The gated model (dropout off, training mode), its input, and the per-layer (none) step on it."""
    model, bank = _attached(name)
    _no_dropout(model)
    x = _inputs(name)
    model.train()
    bank.set_skip("none")
    return model, bank, x, *_step(model, x)


def _out(output) -> torch.Tensor:
    """The tensor a model returns (a Hugging Face output's logits)."""
    return output.logits if hasattr(output, "logits") else output


def _run(model: nn.Module, x: tuple[tuple, dict]):
    return _out(model(*x[0], **x[1]))


def _step(model: nn.Module, x: tuple[tuple, dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = _run(model, x).square().mean()
    loss.backward()
    return loss.detach(), {
        n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("name", FULL)
@pytest.mark.parametrize("skip", ["exact", "hard"])
@pytest.mark.parametrize("learning", [True, False], ids=["learning-gates", "frozen-gates"])
def test_train_step_matches_the_per_layer_reference(name, skip, learning):
    """exact: every gradient of none mode; hard: none mode's loss and weight gradients of open channels."""
    model, bank, x, ref_loss, ref_grads = _with_reference(name)
    _check_step(name, model, bank, x, ref_loss, ref_grads, skip, learning)


def _check_step(name, model, bank, x, ref_loss, ref_grads, skip: str, learning: bool) -> None:
    bank.set_skip(skip)
    if not learning:
        for p in bank.parameters():
            p.requires_grad_(False)
    loss, grads = _step(model, x)
    torch.testing.assert_close(loss, ref_loss)
    gate_ids = {id(p) for p in bank.parameters()}
    for n, p in model.named_parameters():
        if n not in grads:
            continue
        if id(p) in gate_ids and skip == "hard":
            continue  # hard: closed gates get no task gradient by design
        mask = torch.ones_like(p, dtype=torch.bool)
        if skip == "hard":
            mask = ref_grads[n] != 0  # weights of closed channels get zero in hard mode
        torch.testing.assert_close(grads[n][mask], ref_grads[n][mask], msg=f"{name}: {n}")


@pytest.mark.parametrize("name", FULL)
def test_eval_with_and_without_gradients(name):
    model, bank = _attached(name)
    x = _inputs(name)
    model.eval()
    bank.set_skip("none")
    reference = _run(model, x).detach()
    bank.set_skip("exact")
    with torch.no_grad():
        torch.testing.assert_close(_run(model, x), reference)
    torch.testing.assert_close(_run(model, x).detach(), reference)


@pytest.mark.parametrize("name", FULL)
def test_copies_and_checkpoints_of_the_gated_model(name):
    model, bank = _attached(name)
    _no_dropout(model)
    x = _inputs(name)
    model.train()
    loss, grads = _step(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    twins = {
        "deepcopy": copy.deepcopy(model),
        "torch.load": torch.load(buffer, weights_only=False),
    }
    fresh, _ = _attached(name)  # another attach: same structure, other (closed-half) weights
    fresh.load_state_dict(model.state_dict())
    _no_dropout(fresh)
    twins["state_dict"] = fresh
    for how, twin in twins.items():
        twin.train()
        twin_loss, twin_grads = _step(twin, x)
        torch.testing.assert_close(twin_loss, loss, msg=f"{name} via {how}")
        for n, g in grads.items():
            torch.testing.assert_close(twin_grads[n], g, msg=f"{name} via {how}: {n}")
    averaged = torch.optim.swa_utils.AveragedModel(model)
    averaged.eval()
    model.eval()
    torch.testing.assert_close(_run(averaged, x), _run(model, x))


@pytest.mark.parametrize("name", FULL)
@pytest.mark.parametrize("round_to", [1, 8])
def test_export_save_load_and_train_the_exported_model(name, round_to):
    model, bank = _attached(name)
    _export_save_load_train(name, model, round_to)


def _export_save_load_train(name: str, model: nn.Module, round_to: int) -> None:
    x = _inputs(name)
    # attention opted in to pruning (prunable_attention=True) may stay a tg_kernels module; nothing else
    opted_in = any(isinstance(m, tg.nn.PrunableMultiheadAttention) for m in model.modules())
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # round_to=8 names the groups it cannot pad
        small = tg.export(model, round_to=round_to)
    with torch.no_grad():
        reference = _run(model, x)
        torch.testing.assert_close(_run(small, x), reference)
    buffer = io.BytesIO()
    tg.save(small, buffer)
    buffer.seek(0)
    torch.manual_seed(0)
    loaded = tg.load(buffer, ZOO[name][0]().double())
    _no_dropout(loaded)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(loaded, x), reference)
    kept = {type(m).__name__ for m in loaded.modules() if type(m).__module__.startswith("tg_kernels")}
    assert kept <= ({"PrunableMultiheadAttention"} if opted_in else set()), kept
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.01)
    _run(loaded, x).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


@pytest.mark.parametrize("name", CHEAP)
def test_zoo_model_on_the_cheap_paths(name):
    """Zoo models not in today's rotation: attach, close half; a learning-gates exact train step
    against the per-layer reference; a deepcopy trains alike; eval; export (round_to 1), tg.save /
    tg.load, a train step of the loaded model."""
    model, bank, x, ref_loss, ref_grads = _with_reference(name)
    twin = copy.deepcopy(model)
    _check_step(name, model, bank, x, ref_loss, ref_grads, "exact", True)
    twin_loss, _ = _step(twin, x)
    torch.testing.assert_close(twin_loss, ref_loss, msg=f"{name} via deepcopy")
    _export_save_load_train(name, model, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIXTURES))
def test_torch_compile_trains_and_evaluates_like_the_eager_model(name):
    """torch.compile of a gated model: the exact step's gradients are none mode's; eval is the same."""
    model, bank, x, ref_loss, ref_grads = _with_reference(name)
    bank.set_skip("exact")
    compiled = torch.compile(model)
    loss, grads = _step(compiled, x)
    torch.testing.assert_close(loss, ref_loss)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, msg=f"{name}: {n}")
    compiled.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(compiled, x), _run(model, x))
