"""Bad inputs to every public entry point get a clear error that says what was expected.

The same cases, in words, are the table in docs/errors.md.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tg_kernels as tg


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _gated() -> nn.Module:
    model, _ = tg.attach_gates(Small(), X)
    return model


def _file_of(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _tie_mismatch() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    _, bank = tg.attach_gates(mlp, torch.randn(2, 4))
    bank.tie([list(bank.gates)])


CASES = {
    "attach: not a module": (lambda: tg.attach_gates("resnet", X), TypeError, "expects an nn.Module"),
    "attach: a DataParallel wrapper": (
        lambda: tg.attach_gates(nn.DataParallel(Small()), X),
        TypeError,
        "bare model first",
    ),
    "attach: a model already gated": (lambda: tg.attach_gates(_gated(), X), ValueError, "already has gates"),
    "attach: unknown skip mode": (lambda: tg.attach_gates(Small(), X, skip="fast"), ValueError, "skip must be"),
    "attach: unknown tracer": (lambda: tg.attach_gates(Small(), X, tracer="jit"), ValueError, "tracer must be"),
    "attach: keyword inputs not a dict": (
        lambda: tg.attach_gates(Small(), example_kwargs=[X]),
        TypeError,
        "example_kwargs must be a dict",
    ),
    "attach: exclude names no submodule": (
        lambda: tg.attach_gates(Small(), X, exclude=["nope"]),
        ValueError,
        "not a submodule",
    ),
    "attach: inputs of the wrong shape": (
        lambda: tg.attach_gates(Small(), torch.randn(2, 5, 8, 8)),
        ValueError,
        "cannot run the example inputs",
    ),
    "attach: inputs of the wrong dtype": (
        lambda: tg.attach_gates(Small(), X.double()),
        ValueError,
        "cannot run the example inputs",
    ),
    "Budget: a model without gates": (lambda: tg.Budget(Small(), target=0.5), ValueError, "has no gates"),
    "Budget: target above 1": (lambda: tg.Budget(_gated(), target=1.5), ValueError, "0 < target <= 1"),
    "Budget: target 0": (lambda: tg.Budget(_gated(), target=0.0), ValueError, "0 < target <= 1"),
    "Budget: unknown metric": (
        lambda: tg.Budget(_gated(), target=0.5, metric="latency"),
        ValueError,
        "metric must be one of",
    ),
    "export: a model without gates": (lambda: tg.export(Small()), ValueError, "has no gates"),
    "export: round_to 0": (lambda: tg.export(_gated(), round_to=0), ValueError, "round_to must be a positive int"),
    "save: a gated (not exported) model": (
        lambda: tg.save(_gated(), io.BytesIO()),
        ValueError,
        "call tg_kernels.export(model) first",
    ),
    "load: a file tg.save did not write": (
        lambda: tg.load(_file_of({"weights": torch.zeros(1)}), Small()),
        ValueError,
        "not a file written by tg_kernels.save",
    ),
    "load: another architecture": (
        lambda: tg.load(_saved_small(), nn.Sequential(nn.Linear(2, 2))),
        ValueError,
        "but the model given is a",
    ),
    "prune: no batches": (lambda: tg.prune(Small(), [], target=0.5, progress=False), ValueError, "no batches"),
    "prune: target above 1": (
        lambda: tg.prune(Small(), [(X, torch.tensor([0, 1]))], target=2.0, progress=False),
        ValueError,
        "target",
    ),
    "prune: side_pass_every 0": (
        lambda: tg.prune(Small(), [(X, torch.tensor([0, 1]))], side_pass_every=0, progress=False),
        ValueError,
        "side_pass_every must be an int >= 1",
    ),
    "prune: a batch neither a pair nor a dict": (
        lambda: tg.prune(Small(), [X], progress=False),
        TypeError,
        "expects batches of (inputs, targets) or dicts",
    ),
    "prune: autocast not a floating dtype": (
        lambda: tg.prune(Small(), [(X, torch.tensor([0, 1]))], autocast="bf16", progress=False),
        ValueError,
        "autocast must be None or a floating dtype",
    ),
    "prune: uniform not a bool": (
        lambda: tg.prune(Small(), [(X, torch.tensor([0, 1]))], uniform="layers", progress=False),
        TypeError,
        "uniform must be True or False",
    ),
    "GateBank.tie: groups of different sizes": (
        _tie_mismatch,
        ValueError,
        "only groups of one size can share a gate",
    ),
    "channel_gate: a gate of the wrong length": (
        lambda: tg.channel_gate(X, torch.ones(4)),
        ValueError,
        "one value per channel",
    ),
    "channel_gate: an integer tensor": (
        lambda: tg.channel_gate(X.long(), torch.ones(3)),
        TypeError,
        "supports float16, bfloat16, float32 and float64",
    ),
    "TrainableGate: a negative channel count": (lambda: tg.TrainableGate(-1), ValueError, "non-negative int"),
    "trainable_gate: an unknown shape": (
        lambda: tg.trainable_gate(torch.zeros(3), shape="box"),
        ValueError,
        "unknown gate shape",
    ),
}


def _saved_small() -> io.BytesIO:
    model = _gated()
    model.eval()
    buffer = io.BytesIO()
    tg.save(tg.export(model), buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_error(case):
    call, kind, message = CASES[case]
    with pytest.raises(kind, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


def test_the_docs_table_lists_every_case():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for case, (_, kind, message) in CASES.items():
        entry, _, what = case.partition(": ")
        row = f"| {entry} | {what} | `{kind.__name__}`: {message} |"
        assert row in table, f"docs/errors.md lacks the row {row!r}"
