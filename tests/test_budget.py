"""Budget: reaching targets, the per-group minimum, collapse warnings, settle, feedback, and tg.prune."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import tg_kernels as tg
from bench.flops import conv_linear_flops
from tg_kernels.gate import open_mask, trainable_gate


class SmallNet(nn.Module):
    def __init__(self, widths=(8, 16, 16)) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1, bias=False),
            nn.BatchNorm2d(a),
            nn.ReLU(),
            nn.Conv2d(a, b, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def gated(widths=(8, 16, 16), seed=0):
    torch.manual_seed(seed)
    model = SmallNet(widths)
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(model, x)
    return model, bank, x


def synthetic_data(n=64, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


# --------------------------------------------------------------------------------------------------
# the per-group minimum, in the gate itself
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [None, 10.0])
@pytest.mark.parametrize("min_open", [0, 1, 3, 8])
def test_gate_minimum_forward_and_open_mask_agree(min_open, M):
    torch.manual_seed(min_open)
    w = torch.randn(8, dtype=torch.float64) - 1.0  # mostly closed
    gate = tg.TrainableGate(8, M=M, min_open=min_open)
    with torch.no_grad():
        gate.weight.copy_(w)
    mask = gate.open_mask()
    assert int(mask.sum()) == max(min_open, int((w >= 0).sum()))
    expected = (w >= 0) | torch.zeros(8, dtype=torch.bool).index_fill_(
        0, torch.argsort(w, descending=True)[:min_open], True
    )
    assert torch.equal(mask, expected)
    values = gate()
    if M is None:
        assert torch.equal(values, mask.to(values.dtype))  # exactly 1 where open, 0 elsewhere
    else:  # paper form: the step is 1 where open, and the sawtooth adds less than 1/M
        assert torch.all((values - mask.to(values.dtype)).abs() < 1 / M)


def test_gate_minimum_keeps_gradients_and_ties_are_stable():
    w = torch.full((6,), -0.3, requires_grad=True)  # all tied and closed
    values = trainable_gate(w, shape="gaussian", min_open=2)
    assert values.tolist() == [1, 1, 0, 0, 0, 0]  # ties: the lowest indices, every call
    assert torch.equal(open_mask(w, 2), values.bool())
    (values * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(6.0) * torch.exp(torch.tensor(-0.045)))


def test_gate_minimum_rejects_bad_values():
    with pytest.raises(ValueError, match="min_open"):
        tg.TrainableGate(4, min_open=-1)
    with pytest.raises(ValueError, match="min_open"):
        trainable_gate(torch.zeros(3), min_open=1.5)


def test_group_held_at_its_minimum_everywhere():
    """A fully closed group stays at min_open in the gated model, ratio() and export, exactly."""
    model, bank, x = gated()
    budget = tg.Budget(model, target=0.3, min_open=2)
    key = bank.groups[1].key
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight.uniform_(0.1, 1.0)
        bank.gates[key].weight.uniform_(-1.0, -0.1)  # the budget wanted it gone
        w = bank.gates[key].weight.detach().clone()
    gate = bank.gates[key]
    assert gate.min_open == 2 and gate.num_open() == 2
    assert torch.equal(
        torch.nonzero(gate.open_mask()).flatten().sort().values, torch.argsort(w, descending=True)[:2].sort().values
    )
    st = budget.status()
    assert st.kept[key] == (2, bank.groups[1].size) and key in st.at_minimum and not st.closed
    assert "at minimum" in budget.report()
    model.eval()
    small = tg.export(model).eval()
    usage = budget.usage()
    assert usage.flops == pytest.approx(conv_linear_flops(small, x), rel=1e-12)
    assert float(budget.ratio().detach()) == pytest.approx(usage.flops / usage.full_flops, rel=1e-6)  # float32
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    assert small.features[3].out_channels == 2


@pytest.mark.parametrize("min_open, expected", [(0, [0, 0, 0]), (3, [3, 3, 3]), (0.25, [2, 4, 4]), (20, [8, 16, 16])])
def test_budget_sets_the_minimum_on_every_gate(min_open, expected):
    model, bank, _ = gated()
    tg.Budget(model, target=1.0, min_open=min_open)
    assert [bank.gates[g.key].min_open for g in bank.groups] == expected


@pytest.mark.parametrize("min_open", [-1, 1.5, "one", True])
def test_budget_rejects_bad_minimum(min_open):
    model, _, _ = gated()
    with pytest.raises((TypeError, ValueError), match="min_open"):
        tg.Budget(model, min_open=min_open)


def test_target_below_what_the_minimum_allows_is_an_error():
    model, _, _ = gated()
    with pytest.raises(ValueError, match="smallest"):
        tg.Budget(model, target=0.01, min_open=0.5)


# --------------------------------------------------------------------------------------------------
# collapse warnings
# --------------------------------------------------------------------------------------------------


def test_collapse_warning_fires_on_a_forced_collapse():
    model, bank, x = gated()
    budget = tg.Budget(model, target=0.5, min_open=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget()  # nothing closed yet: no warning
    key = bank.groups[0].key
    with torch.no_grad():
        bank.gates[key].weight.fill_(-1.0)
    with pytest.warns(RuntimeWarning, match=f"'{key}' closed completely"):
        budget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget()  # said once, not every step
    assert budget.status().closed == (key,)
    assert "closed completely" in budget.report()
    with pytest.warns(UserWarning, match="completely closed"):
        tg.export(model)
    with torch.no_grad():
        bank.gates[key].weight[0] = 0.5  # reopens ...
    budget()
    with torch.no_grad():
        bank.gates[key].weight[0] = -0.5
    with pytest.warns(RuntimeWarning, match="closed completely"):  # ... and a new closing warns again
        budget()


def test_default_minimum_prevents_collapse_under_a_huge_fixed_weight():
    model, bank, x = gated()
    budget = tg.Budget(model, target=0.1, weight=1e4)
    opt = torch.optim.Adam(bank.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(20):
            loss = budget()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(gate.num_open() >= 1 for gate in bank.gates.values())
    assert model(torch.randn(4, 3, 8, 8)).std(0).max() > 0  # still passes signal


def test_prune_warns_when_the_network_stops_passing_signal():
    from tg_kernels.pruning.train import _check_signal

    with pytest.warns(RuntimeWarning, match="stopped passing signal"):
        _check_signal(torch.ones(8, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_signal(torch.randn(8, 10))


# --------------------------------------------------------------------------------------------------
# the adaptive multiplier
# --------------------------------------------------------------------------------------------------


def test_adaptive_multiplier_rises_above_the_target_and_falls_below():
    model, bank, _ = gated()
    budget = tg.Budget(model, target=0.5, initial_weight=0.1, rate=0.05)
    for _ in range(10):
        budget()
    assert budget.current_weight() == pytest.approx(0.1 * math.exp(10 * 0.05 * min(1.0, math.log(1 / 0.5))), rel=1e-5)
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight.fill_(-1.0)  # every group at its minimum: far below the target
    high = budget.current_weight()
    budget()
    assert budget.current_weight() < high
    budget.eval()  # not in training mode: looking does not adapt
    before = budget.current_weight()
    budget()
    with torch.no_grad():
        budget.train()()
    assert budget.current_weight() == before


def test_adaptive_loss_gradient_points_towards_the_target():
    model, bank, _ = gated()
    budget = tg.Budget(model, target=0.3)
    budget().backward()
    grads = torch.cat([g.weight.grad for g in bank.gates.values()])
    assert torch.all(grads >= 0) and grads.sum() > 0  # above the target: descent closes gates
    assert "adaptive" in repr(budget)


# --------------------------------------------------------------------------------------------------
# settle
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.2, 0.35, 0.6])
def test_settle_lands_within_tolerance_and_flips_gates_nearest_threshold(target):
    model, bank, x = gated(widths=(16, 32, 32))
    budget = tg.Budget(model, target=target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight.copy_(torch.randn(gate.num_channels, generator=g))
    before = {k: gate.open_mask().clone() for k, gate in bank.gates.items()}
    flips = budget.settle(tol=0.01)
    assert budget.status().within(0.01), budget.report()
    changed = sum(int((before[k] != gate.open_mask()).sum()) for k, gate in bank.gates.items())
    assert changed == flips > 0
    small = tg.export(model.eval())
    assert budget.usage().flops == pytest.approx(conv_linear_flops(small, x), rel=1e-12)


def test_settle_does_nothing_when_already_within():
    model, _, _ = gated()
    budget = tg.Budget(model, target=1.0)
    assert budget.settle(tol=0.0) == 0


# --------------------------------------------------------------------------------------------------
# reaching targets by training: tg.prune
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric, target", [("flops", 0.15), ("params", 0.3)])
def test_prune_reaches_a_tight_target_and_ratio_equals_the_exported_model(metric, target):
    model, _, x = gated(widths=(16, 32, 32))
    data = synthetic_data()
    result = tg.prune(
        model,
        data,
        target=target,
        metric=metric,
        gate_epochs=6,
        max_gate_epochs=12,
        finetune_epochs=1,
        gate_lr=0.05,
        lr=1e-3,
        progress=False,
    )
    st = result.status
    assert st.within(0.01), result.summary()
    assert not st.closed
    assert all(n >= 1 for n, _ in st.kept.values())
    small = result.model.eval()
    budget = result.budget
    usage = budget.usage()
    # an independent count of the exported model (the ratio itself is float32, like the gates)
    assert usage.flops == pytest.approx(conv_linear_flops(small, x), rel=1e-12)
    assert usage.params == sum(p.numel() for p in small.parameters())
    full = usage.full_flops if metric == "flops" else usage.full_params
    assert st.ratio == pytest.approx((usage.flops if metric == "flops" else usage.params) / full, rel=1e-6)
    result.gated.eval()
    torch.testing.assert_close(small(x), result.gated(x), rtol=1e-5, atol=1e-6)
    assert [row["phase"] for row in result.history][-1] == "tune"
    assert "ratio" in result.summary()


def test_prune_attaches_gates_itself_and_is_callable_as_the_package():
    torch.manual_seed(0)
    model = SmallNet()
    data = synthetic_data()
    seen = []
    result = tg.prune(
        model,
        lambda: iter(data),
        target=0.5,
        gate_epochs=2,
        max_gate_epochs=20,
        finetune_epochs=0,
        gate_lr=0.05,
        progress=False,
        evaluate=lambda m: 0.5,
        log=seen.append,
    )
    assert result.status.within(0.01)
    assert hasattr(result.gated, "tg_gates") and not hasattr(result.model, "tg_gates")
    assert all("metric" in row for row in result.history) and seen
    assert tg.prune is tg.pruning.train.prune and callable(tg.prune)  # a function; the pieces live in tg.pruning


def test_prune_default_searches_gate_epochs_then_settles():
    """max_gate_epochs=None (the default): the search runs gate_epochs epochs, Budget.settle lands the rest."""
    torch.manual_seed(0)
    result = tg.prune(SmallNet(), synthetic_data(), target=0.3, gate_epochs=2, finetune_epochs=1, progress=False)
    phases = [row["phase"] for row in result.history]
    assert phases.count("gates") <= 2 and phases.count("tune") == 1
    assert result.status.within(0.01), result.summary()
    assert abs(result.status.ratio / 0.3 - 1) <= 0.01


@pytest.mark.parametrize("closed_gate_gradients", [True, False])
def test_prune_passes_the_gate_placement_to_attach_gates(closed_gate_gradients):
    """True (the default): every closed gate has a task gradient; False: gates before ReLUs have none."""
    torch.manual_seed(0)
    result = tg.prune(
        SmallNet(),
        synthetic_data(),
        target=0.5,
        gate_epochs=1,
        finetune_epochs=0,
        progress=False,
        closed_gate_gradients=closed_gate_gradients,
    )
    recipes = result.gated.tg_gates.analysis.side_passes
    # a dead recipe: the closed gates' task gradient is 0 by structure (a gate right before a ReLU)
    dead = [r.point for r in recipes if r.dead]
    assert recipes and (not dead if closed_gate_gradients else dead), dead


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gate_epochs": 0}, "gate_epochs"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"max_gate_epochs": 1, "gate_epochs": 2}, "max_gate_epochs"),
    ],
)
def test_prune_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tg.prune(SmallNet(), synthetic_data(), **kwargs)


def test_prune_rejects_batches_it_cannot_split():
    with pytest.raises(TypeError, match="inputs, targets"):
        tg.prune(SmallNet(), [torch.randn(2, 3, 8, 8)], progress=False)


def test_budget_fixed_weight_is_the_papers_linear_penalty():
    model, _, _ = gated()
    budget = tg.Budget(model, target=0.3, weight=2.0)
    assert float(budget().detach()) == pytest.approx(2.0 * 0.7)
