"""The search mechanisms of tg.prune: the schedule in steps, the annealed goal, the Taylor-ranked gate
init and the budget's bottleneck protection."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import tg_kernels as tg
from tests.test_budget import SmallNet, gated, synthetic_data
from tg_kernels.pruning.train import annealed_goal, init_gates_from_importance, plan_schedule

# --------------------------------------------------------------------------------------------------
# the schedule, in optimizer steps
# --------------------------------------------------------------------------------------------------


def test_schedule_gives_a_small_dataset_a_longer_search_within_the_same_total():
    s = plan_schedule(12, gate_epochs=4, max_gate_epochs=4, finetune_epochs=14, min_search_steps=300, anneal=0.7)
    assert s.total_steps == 18 * 12  # the run's length is unchanged
    assert s.search_steps == int(0.6 * 18 * 12) > 4 * 12  # longer than 4 epochs, capped at 60% of the run
    assert s.anneal_steps == round(0.7 * s.search_steps)
    mid = plan_schedule(32, 4, 4, 14, 300, 0.7)
    assert mid.search_steps == 300 and mid.tune_steps == 18 * 32 - 300


def test_schedule_leaves_a_large_dataset_at_gate_epochs():
    s = plan_schedule(1000, 4, 4, 14, 300, 0.7)
    assert (s.search_steps, s.tune_steps) == (4000, 14000)
    assert plan_schedule(10, 2, 2, 0, 300, 0.5).search_steps == 20  # no fine-tuning: nothing to take from


def test_goal_anneals_from_one_to_the_target():
    goals = [annealed_goal(0.25, step, 100) for step in range(0, 121, 10)]
    assert goals[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(goals, goals[1:]))
    assert goals[-1] == goals[-3] == 0.25
    assert annealed_goal(0.25, 0, 0) == 0.25  # anneal=0: the target from the first step


# --------------------------------------------------------------------------------------------------
# the gate init from Taylor importance
# --------------------------------------------------------------------------------------------------


def test_importance_init_ranks_channels_within_each_group():
    model, bank, _ = gated(widths=(8, 16, 16))
    bn = model.features[1]
    with torch.no_grad():  # channel 3 of the first conv outputs exactly 0: no loss change if removed
        bn.weight[3] = 0.0
        bn.bias[3] = 0.0
        bn.weight[5] = 4.0  # channel 5 is loud
    scores = init_gates_from_importance(model, synthetic_data(), nn.functional.cross_entropy, low=0.1, high=1.0)
    key = next(iter(bank.gates))
    w = bank.gates[key].weight.detach()
    assert float(scores[key][3]) == 0.0
    assert float(w[3]) == pytest.approx(0.1) and float(w.min()) == pytest.approx(0.1)
    for gate in bank.gates.values():
        v = gate.weight.detach()
        assert float(v.min()) == pytest.approx(0.1) and float(v.max()) == pytest.approx(1.0)
        assert len(set(v.tolist())) == v.numel()  # one distinct height per rank
    order = torch.argsort(scores[key])
    assert torch.equal(torch.argsort(w), order)


def test_prune_gate_init_changes_where_the_search_starts():
    torch.manual_seed(0)
    seen = {}
    for init in ("taylor", "constant"):
        torch.manual_seed(0)
        model = SmallNet()
        result = tg.prune(
            model, synthetic_data(), target=0.9, gate_epochs=1, finetune_epochs=0, gate_init=init,
            anneal=0.0, progress=False,
        )
        seen[init] = torch.cat([g.weight.detach() for g in result.gated.tg_gates.gates.values()])
    assert seen["constant"].std() < seen["taylor"].std()  # constant: every gate starts at 0.5 and moves alike


# --------------------------------------------------------------------------------------------------
# the budget: goal and bottleneck protection
# --------------------------------------------------------------------------------------------------


def test_budget_goal_is_what_the_loss_pulls_to_and_never_below_the_target():
    model, bank, _ = gated()
    budget = tg.Budget(model, target=0.25)
    budget.eval()  # no multiplier updates
    full = float(budget().detach())
    budget.set_goal(0.8)
    lam = budget.current_weight()
    assert float(budget()) == pytest.approx(lam * abs(math.log(0.8)), rel=1e-5) and float(budget()) < full
    budget.set_goal(0.1)
    assert budget.goal == 0.25
    assert budget.status().target == 0.25
    with pytest.raises(ValueError, match="goal"):
        budget.set_goal(1.5)


def _grads(budget, bank):
    for g in bank.gates.values():
        g.weight.grad = None
    budget().backward()
    return {k: g.weight.grad.clone() for k, g in bank.gates.items()}


def test_protect_pushes_a_thin_group_open_and_leaves_wide_ones_closing():
    model, bank, _ = gated(widths=(8, 16, 16))
    keys = list(bank.gates)
    thin = keys[1]
    with torch.no_grad():  # the middle group down to 2 of its 16 channels, the others full
        bank.gates[thin].weight[2:] = -0.5
    plain = tg.Budget(model, target=0.1)  # still above it: the budget pushes closed
    plain.eval()
    raw = _grads(plain, bank)
    protected = tg.Budget(model, target=0.1, protect=0.5)
    protected.eval()
    held = _grads(protected, bank)
    # without protection the budget pushes every open gate closed (positive gradient) ...
    assert all(float(raw[k][0]) > 0 for k in keys)
    # ... with it, the thin group's open gates are pushed open while a full, costly group still closes
    assert float(held[thin][0]) < 0
    assert float(held[keys[0]][0]) > 0
    # the value of the ratio is untouched, only the gradient changes
    assert float(protected.ratio()) == float(plain.ratio())


def test_protect_zero_is_the_plain_budget_and_bad_values_are_rejected():
    model, bank, _ = gated()
    a = tg.Budget(model, target=0.5)
    b = tg.Budget(model, target=0.5, protect=0.0)
    a.eval(), b.eval()
    ga, gb = _grads(a, bank), _grads(b, bank)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="protect"):
            tg.Budget(model, target=0.5, protect=bad)


def test_marginal_costs_match_a_finite_difference():
    model, bank, _ = gated(widths=(8, 16, 16))
    budget = tg.Budget(model, target=0.5)
    costs = budget.marginal_costs()
    counts = {k: float(g.num_channels) for k, g in bank.gates.items()}
    base = budget._ratio_with(counts)
    for key in counts:  # the resource is bilinear in neighbouring counts: one channel is exact
        less = dict(counts)
        less[key] -= 1
        assert costs[key] == pytest.approx(base - budget._ratio_with(less), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# tg.prune end to end
# --------------------------------------------------------------------------------------------------


def test_prune_counts_its_steps_and_lands_on_target():
    torch.manual_seed(0)
    result = tg.prune(SmallNet(), synthetic_data(), target=0.3, gate_epochs=2, finetune_epochs=3, progress=False)
    s = result.schedule
    assert s.steps_per_epoch == 4
    assert result.steps == result.gate_steps + result.tune_steps == s.total_steps == 20
    assert result.status.within(0.01), result.summary()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"anneal": 1.5}, "anneal"),
        ({"gate_init": "magic"}, "gate_init"),
        ({"protect": 1.0}, "protect"),
        ({"min_search_steps": -1}, "min_search_steps"),
        ({"gain": -1.0}, "gain"),
        ({"balance": 1.5}, "balance"),
    ],
)
def test_prune_rejects_bad_search_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tg.prune(SmallNet(), synthetic_data(), progress=False, **kwargs)


def test_prune_does_not_squeeze_a_costly_layer_to_its_minimum():
    """The narrow digits-like net where each first-conv channel is costly: the search must not
    close that layer down to min_open (the failure this search was rebuilt against)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 1, :, :4].mean((1, 2)) > 0).long()
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]  # 16 steps per epoch
    torch.manual_seed(0)
    model = SmallNet((16, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tg.prune(model, data, target=0.25, progress=False)
    kept = [n for n, _ in result.status.kept.values()]
    assert result.status.within(0.01), result.summary()
    assert min(kept) > 1, result.summary()


# --------------------------------------------------------------------------------------------------
# settle spreads its flips; the multiplier's proportional term
# --------------------------------------------------------------------------------------------------


def _far_from_target(spread):
    """All gates open; the costliest group's gates are the nearest the threshold; settle to 0.3."""
    model, bank, _ = gated(widths=(16, 32, 32))
    keys = list(bank.gates)
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight.fill_(1.0)
        bank.gates[keys[0]].weight.copy_(torch.linspace(0.01, 0.02, 16))
    budget = tg.Budget(model, target=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flips = budget.settle(0.01, spread=spread)
    return budget, keys, flips


def test_settle_spread_keeps_a_group_above_a_share_of_the_mean_open_fraction():
    # without spread: the group whose gates are nearest the threshold and whose channels cost most is
    # closed to its minimum (what happened to a ResNet's first residual group: 11 -> 1 of 16)
    squeezed, keys, _ = _far_from_target(spread=0.0)
    assert squeezed.status().within(0.01)
    assert squeezed.status().kept[keys[0]][0] == 1
    spread, keys, flips = _far_from_target(spread=0.5)
    st = spread.status()
    assert st.within(0.01), spread.report()
    mean = sum(n for n, _ in st.kept.values()) / sum(size for _, size in st.kept.values())
    n, size = st.kept[keys[0]]
    assert n >= 0.5 * mean * size - 1  # at most the last landing flip goes below the floor
    assert n > 1 and flips > 0


def test_settle_rejects_bad_spread():
    model, _, _ = gated()
    budget = tg.Budget(model, target=0.5)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="spread"):
            budget.settle(0.01, spread=bad)


def test_gain_pushes_harder_while_the_ratio_lags_the_goal():
    model, bank, _ = gated(widths=(8, 16, 16))
    plain = tg.Budget(model, target=0.25)
    boosted = tg.Budget(model, target=0.25, gain=2.0)
    plain.eval(), boosted.eval()  # eval: the multiplier does not adapt, only the loss is compared
    gp, gb = _grads(plain, bank), _grads(boosted, bank)
    gap = math.log(float(plain.ratio().detach()) / 0.25)  # all open: ratio 1, log(4) above the goal
    factor = math.exp(2.0 * min(gap, 1.0))
    for k in gp:
        assert torch.allclose(gb[k], gp[k] * factor, rtol=1e-5)
    boosted.set_goal(1.0)  # at the goal: no boost and no push
    assert float(boosted()) == 0.0
    for bad in (-1.0, math.inf, True):
        with pytest.raises(ValueError, match="gain"):
            tg.Budget(model, target=0.5, gain=bad)


def test_balance_one_pushes_every_group_alike_whatever_its_cost():
    model, bank, _ = gated(widths=(8, 16, 16))
    keys = list(bank.gates)
    plain = tg.Budget(model, target=0.25)
    balanced = tg.Budget(model, target=0.25, balance=1.0)
    half = tg.Budget(model, target=0.25, balance=0.5)
    for b in (plain, balanced, half):
        b.eval()
    costs = plain.marginal_costs()
    assert len({round(costs[k], 6) for k in keys}) > 1  # the groups' channels do cost differently
    gp, g1, gh = _grads(plain, bank), _grads(balanced, bank), _grads(half, bank)
    push = {k: float(g1[k][0]) for k in keys}
    assert all(v > 0 for v in push.values())
    assert max(push.values()) == pytest.approx(min(push.values()), rel=1e-4)  # the same push on every group
    # the paper's push follows the cost; balance=0.5 lies in between (the spread of the pushes shrinks)
    spread = lambda g: max(float(g[k][0]) for k in keys) / min(float(g[k][0]) for k in keys)  # noqa: E731
    assert spread(gp) == pytest.approx(max(costs.values()) / min(costs.values()), rel=1e-4)
    assert 1.0 < spread(gh) < spread(gp)
    assert float(balanced.ratio().detach()) == float(plain.ratio().detach())  # only the gradient changes


def _protected_push(protect_cost, open_first):
    """Budget gradient on an open gate of the first (costliest) group with ``open_first`` of its 16 open."""
    model, bank, _ = gated(widths=(16, 32, 32))
    keys = list(bank.gates)
    with torch.no_grad():
        bank.gates[keys[0]].weight[open_first:] = -0.5
    budget = tg.Budget(model, target=0.1, protect=0.5, protect_cost=protect_cost)
    budget.eval()
    costs = budget.marginal_costs()
    assert costs[keys[0]] == max(costs.values())  # the first group's channels cost the most
    return float(_grads(budget, bank)[keys[0]][0])


def test_protect_holds_a_costly_group_at_the_same_share_of_the_mean_as_a_cheap_one():
    # 5 of 16 open (0.31) while the model keeps 0.84 of its channels: below protect x mean (0.42)
    # with its own cost, the hold starts at protect x the mean fraction whatever the group costs ...
    assert _protected_push("own", 5) < 0  # pushed open
    assert _protected_push("own", 8) > 0  # 0.5 open: above 0.42, still closing
    # ... with the mean cost (the former rule) a group three times costlier is held only much lower
    assert _protected_push("mean", 5) > 0
    with pytest.raises(ValueError, match="protect_cost"):
        gated_model = gated()[0]
        tg.Budget(gated_model, target=0.5, protect_cost="max")
