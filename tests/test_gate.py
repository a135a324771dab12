"""The trainable gate function and module, against the formulas of docs/design.md §1 in float64."""

import math
from functools import partial

import pytest
import torch

from tg_kernels import SHAPES, TrainableGate, trainable_gate
from tg_kernels.gate import gaussian_shape

# Points on both sides of the step, at the step, and across several sawtooth teeth for M = 4.
W_POINTS = torch.tensor(
    [-2.3, -1.0, -0.75, -0.26, -0.25, -0.24, -1e-9, 0.0, 1e-9, 0.1, 0.24, 0.25, 0.26, 0.5, 0.99, 1.7],
    dtype=torch.float64,
)


def value_and_grad(w: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.clone().requires_grad_(True)
    out = trainable_gate(w, **kwargs)
    (grad,) = torch.autograd.grad(out.sum(), w)
    return out.detach(), grad


def custom_shape(w: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + w**2)


def custom_shape_derivative(w: torch.Tensor) -> torch.Tensor:
    return -2.0 * w / (1.0 + w**2) ** 2


SHAPE_CASES = [
    (None, lambda w: torch.ones_like(w), lambda w: torch.zeros_like(w)),
    ("gaussian", lambda w: torch.exp(-0.5 * w**2), lambda w: -w * torch.exp(-0.5 * w**2)),
    (
        partial(gaussian_shape, sigma=0.3),
        lambda w: torch.exp(-0.5 * (w / 0.3) ** 2),
        lambda w: -w / 0.09 * torch.exp(-0.5 * (w / 0.3) ** 2),
    ),
    (custom_shape, custom_shape, custom_shape_derivative),
]


@pytest.mark.parametrize("shape, g, _", SHAPE_CASES)
def test_limit_form_value_is_step_and_gradient_is_shape(shape, g, _):
    value, grad = value_and_grad(W_POINTS, shape=shape)
    torch.testing.assert_close(value, (W_POINTS >= 0).double(), rtol=0, atol=0)
    torch.testing.assert_close(grad, g(W_POINTS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("M", [1.0, 4, 100.0])
@pytest.mark.parametrize("shape, g, dg", SHAPE_CASES)
def test_paper_form_matches_formula(M, shape, g, dg):
    value, grad = value_and_grad(W_POINTS, shape=shape, M=M)
    sawtooth = (M * W_POINTS - torch.floor(M * W_POINTS)) / M
    expected_value = (W_POINTS >= 0).double() + sawtooth * g(W_POINTS)
    expected_grad = g(W_POINTS) + sawtooth * dg(W_POINTS)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_paper_form_is_within_sup_g_over_M_of_the_step():
    w = torch.linspace(-3, 3, 10001, dtype=torch.float64)
    for M in (2.0, 10.0, 1000.0):
        value = trainable_gate(w, M=M)
        assert (value - (w >= 0).double()).abs().max() < 1.0 / M
        assert (value - (w >= 0).double()).min() >= 0


def test_sawtooth_teeth_restart_at_multiples_of_one_over_M():
    M = 4.0
    w = torch.tensor([0.25 - 1e-9, 0.25, 0.5 - 1e-9, 0.5], dtype=torch.float64)
    value = trainable_gate(w, M=M) - 1.0
    assert value[0] > 0.2499 and value[1] == 0.0
    assert value[2] > 0.2499 and value[3] == 0.0


def test_limit_form_keeps_input_shape_and_dtype():
    w = torch.randn(3, 5, dtype=torch.float32)
    out = trainable_gate(w)
    assert out.shape == w.shape and out.dtype == torch.float32


def test_closed_gates_still_receive_gradient():
    _, grad = value_and_grad(torch.tensor([-0.5, -0.1], dtype=torch.float64), shape="gaussian")
    assert (grad > 0).all()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_named_shapes_peak_at_one(name):
    assert SHAPES[name](torch.zeros(1, dtype=torch.float64)).item() == 1.0


def test_bad_arguments_give_clear_errors():
    with pytest.raises(TypeError, match="floating-point"):
        trainable_gate(torch.arange(3))
    with pytest.raises(TypeError, match="tensor"):
        trainable_gate([0.1, 0.2])
    for bad_M in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="M must be"):
            trainable_gate(torch.zeros(2), M=bad_M)
    with pytest.raises(TypeError, match="M must be"):
        trainable_gate(torch.zeros(2), M="4")
    with pytest.raises(ValueError, match="unknown gate shape"):
        trainable_gate(torch.zeros(2), shape="bump")
    with pytest.raises(TypeError, match="shape must be"):
        trainable_gate(torch.zeros(2), shape=3)
    with pytest.raises(ValueError, match="broadcast"):
        trainable_gate(torch.zeros(2), shape=lambda w: torch.ones(3), M=2.0)


def test_module_starts_open_and_trains_w():
    gate = TrainableGate(6, shape="gaussian")
    assert gate.weight.shape == (6,)
    assert gate.num_open() == 6
    values = gate()
    torch.testing.assert_close(values, torch.ones(6))
    (values * torch.arange(6.0)).sum().backward()
    expected = torch.arange(6.0) * torch.exp(-0.5 * gate.weight.detach() ** 2)
    torch.testing.assert_close(gate.weight.grad, expected)
    with torch.no_grad():
        gate.weight[2] = -1.0
    assert gate.num_open() == 5 and gate()[2] == 0
    assert list(gate.state_dict()) == ["weight"]
    assert "gaussian" in repr(gate)


def test_module_paper_form_and_dtype():
    gate = TrainableGate(3, M=8.0, init=0.3, dtype=torch.float64)
    values = gate()
    assert values.dtype == torch.float64
    torch.testing.assert_close(
        values, 1.0 + (8.0 * 0.3 - math.floor(8.0 * 0.3)) / 8.0 * torch.ones(3, dtype=torch.float64)
    )


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="num_channels"):
        TrainableGate(-1)
    with pytest.raises(ValueError, match="num_channels"):
        TrainableGate(2.5)
    with pytest.raises(ValueError, match="starts open"):
        TrainableGate(3, init=-0.1)
    with pytest.raises(ValueError, match="M must be"):
        TrainableGate(3, M=0)
    with pytest.raises(ValueError, match="unknown gate shape"):
        TrainableGate(3, shape="nope")
