"""Every structural fixture (tests/structural_fixtures.py) run the way a new user runs a model.

For each: ``attach_gates`` with its defaults, a random half of every group closed, a train step,
eval, ``copy.deepcopy``, ``export``, ``tg.save`` / ``tg.load`` into a fresh model, a train step of
the loaded model. Everything in float64; the exported, copied and loaded models must compute what
the gated model computes. A fixture either gates something, or gates nothing for exactly the
reason listed beside it (the phrase the package puts in ``bank.skipped``). The tests at the end
guard the mechanisms these fixtures found broken.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from helpers import close_random_half
from structural_fixtures import (
    FIXTURES,
    CachedBias,
    MixedKernelSplit,
    PixelShuffleUpsampler,
    PixelUnshuffleDownsampler,
    TiedEmbeddings,
)
from torch import nn

import tg_kernels as tg


def _leaves(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, tuple) else [output]


def _loss(output) -> torch.Tensor:
    return sum(o.double().square().mean() for o in _leaves(output))


def _assert_same(actual, expected, what: str) -> None:
    for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
        torch.testing.assert_close(a, e, msg=f"{what} differs")


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FIXTURES[name][0]().double()


def _inputs(name: str) -> tuple:
    torch.manual_seed(1)
    return tuple(a.double() if a.is_floating_point() else a for a in FIXTURES[name][1]())


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixture_runs_every_everyday_path(name):
    reason = FIXTURES[name][2]
    x = _inputs(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what stays whole is in bank.skipped, checked below
        model, bank = tg.attach_gates(_build(name), x)
    if reason is None:
        assert bank.gates, f"{name} gates nothing: {bank.skipped}"
    else:
        assert not bank.gates and reason in bank.skipped.values(), bank.skipped
    close_random_half(bank)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = _loss(model(*x))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)

    model.eval()
    with torch.no_grad():
        expected = model(*x)
        _assert_same(copy.deepcopy(model)(*x), expected, "copy.deepcopy")
        small = tg.export(model)
        _assert_same(small(*x), expected, "the exported model")
    buffer = io.BytesIO()
    tg.save(small, buffer)
    buffer.seek(0)
    loaded = tg.load(buffer, _build(name))
    assert not any(type(m).__module__.startswith("tg_kernels") for m in loaded.modules())
    loaded.eval()
    with torch.no_grad():
        _assert_same(loaded(*x), expected, "the loaded model")
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.01)
    _loss(loaded(*x)).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_load_keeps_tied_weights_tied_and_resized():
    """Defect: tg.load resized a tied parameter under one name only (named_parameters drops the
    second name), so loading an exported model with a tied LM head raised a size mismatch."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (2, 6))
    model, bank = tg.attach_gates(TiedEmbeddings(), tokens)
    assert "embed" in bank.gates  # the stream the embedding and the tied head share
    close_random_half(bank)
    model.eval()
    small = tg.export(model)
    buffer = io.BytesIO()
    tg.save(small, buffer)
    buffer.seek(0)
    loaded = tg.load(buffer, TiedEmbeddings())
    assert loaded.lm_head.weight is loaded.embed.weight
    assert loaded.embed.weight.shape == small.embed.weight.shape
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


@pytest.mark.parametrize("build", [PixelShuffleUpsampler, PixelUnshuffleDownsampler], ids=["shuffle", "unshuffle"])
def test_pixel_shuffle_channels_move_as_runs(build):
    """Defect: pixel_shuffle had no channel rule, so the conv feeding it stayed whole. Its producer's
    channels now prune in runs of r * r (one output channel each); pixel_unshuffle's in single channels."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model, bank = tg.attach_gates(build().double(), x)
    producer = "up" if build is PixelShuffleUpsampler else "conv1"
    sizes = {g.key: g.size for g in bank.groups}
    assert sizes.get(producer) == (8 if build is PixelShuffleUpsampler else 6), (sizes, bank.skipped)
    close_random_half(bank)
    model.eval()
    with torch.no_grad():
        small = tg.export(model)
        torch.testing.assert_close(small(x), model(x))
    conv = small.up if build is PixelShuffleUpsampler else small.conv1
    assert conv.out_channels == (16 if build is PixelShuffleUpsampler else 3)


@pytest.mark.parametrize("name", ["pixel_shuffle", "pixel_unshuffle", "tied_embeddings", "mixed_kernel_split"])
@pytest.mark.parametrize("skip", ["exact", "hard"])
def test_fixed_fixtures_train_like_the_per_layer_model(name, skip):
    """The models of the fixes above: a train step in ``skip`` mode gives the per-layer (none) loss and
    gradients (hard: the open channels' weight gradients)."""
    x = _inputs(name)
    model, bank = tg.attach_gates(_build(name), x)
    close_random_half(bank)
    model.train()

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = _loss(model(*x))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    bank.set_skip("none")
    ref_loss, ref_grads = step()
    bank.set_skip(skip)
    loss, grads = step()
    torch.testing.assert_close(loss, ref_loss)
    gate_ids = {id(p) for p in bank.parameters()}
    for n, p in model.named_parameters():
        if n in ref_grads and not (skip == "hard" and id(p) in gate_ids):
            mask = ref_grads[n] != 0 if skip == "hard" else torch.ones_like(p, dtype=torch.bool)
            torch.testing.assert_close(grads[n][mask], ref_grads[n][mask], msg=n)


def test_models_caching_computed_tensors_attach_and_export_after_an_eval_forward():
    """Defect: the self-check and export deep-copied the model, and deepcopy refuses a tensor with a
    grad_fn, so a model that caches one in a plain attribute (evaluated once before attaching, as
    users do) crashed inside attach_gates."""
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    model = CachedBias().eval()
    model(x)  # fills the cache, with gradients on
    assert model.cache["bias"].grad_fn is not None
    model, bank = tg.attach_gates(model, x)
    close_random_half(bank)
    with torch.no_grad():
        torch.testing.assert_close(tg.export(model)(x), model(x))


def test_split_sizes_held_in_a_list_attribute_follow_the_kept_channels():
    """Defect: ``torch.split(x, self.splits)`` (MixNet's mixed convs) passes literal sizes that export
    did not update, so the self-check kept every split channel whole (and, halving through dozens of
    groups, made attach_gates on timm's mixnet_s take minutes). Export now sets each entry of the
    list attribute to its piece's kept size; tg.save / tg.load carry it."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model, bank = tg.attach_gates(MixedKernelSplit().double(), x)
    assert sorted(g.size for g in bank.groups) == [8, 16], bank.skipped
    close_random_half(bank)
    model.eval()
    small = tg.export(model)
    assert small.splits == [4, 8] and model.splits == [8, 16]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    buffer = io.BytesIO()
    tg.save(small, buffer)
    buffer.seek(0)
    loaded = tg.load(buffer, MixedKernelSplit().double()).eval()
    assert loaded.splits == [4, 8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    bank.set_skip("hard")  # compact execution sets the list to the kept sizes while it runs
    model.train()
    model(x).sum().backward()
    assert model.splits == [8, 16]
