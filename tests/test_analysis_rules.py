"""The op-rule table of the export analysis: per-call rules extend a copy, the shared table stays as it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tg_kernels.pruning.analysis import RULES, analyze_export, export_trace, rule_table


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


def test_per_call_rules_extend_a_copy_of_the_table():
    model = _model()
    trace = export_trace(model, (torch.randn(1, 3, 8, 8),), {})
    before = dict(RULES)

    def opaque(w, node):
        w.barrier(node, f"opaque '{node.name}'")
        return None

    plain = analyze_export(model, trace)
    custom = analyze_export(model, trace, rules={"relu": opaque})
    assert [g.producers for g in plain.groups] == [["0"]]
    assert custom.groups == [] and "0" in custom.fixed
    assert dict(RULES) == before  # the shared table is unchanged
    assert [g.producers for g in analyze_export(model, trace).groups] == [["0"]]


def test_rule_table_checks_its_rules():
    table = rule_table({"my_op": lambda w, node: None})
    assert "my_op" in table and "my_op" not in RULES and table["conv2d"] is RULES["conv2d"]
    with pytest.raises(TypeError):
        rule_table({"": lambda w, node: None})
    with pytest.raises(TypeError):
        rule_table({"my_op": 3})
