"""Shared test helpers: which backends and devices to parametrize over."""

import pytest
import torch

import tg_kernels


def backends_for(device: str) -> list[str]:
    """Available backends that run tensors on `device` ("cpu" or "cuda")."""
    runs_on = {"torch": {"cpu", "cuda"}, "cpp": {"cpu"}, "cuda": {"cuda"}, "triton": {"cuda"}}
    if tg_kernels.backends.triton_interpret():
        runs_on["triton"] = {"cpu"}
    available = tg_kernels.available_backends()
    return [name for name, info in available.items() if info.available and device in runs_on[name]]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backend_device_params() -> list:
    """(backend, device) pairs: every available backend on every device it runs on."""
    return [pytest.param(b, d, id=f"{b}-{d}") for d in devices() for b in backends_for(d)]


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that a misplaced gate or slice shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


def float64_case(build, shape, seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Module, torch.Tensor]:
    """``build()`` in float64 with non-trivial norms and dropout off (compact runs draw other dropout
    numbers at the compact width), and a seeded input of ``shape``."""
    torch.manual_seed(seed)
    base = build()
    randomize_norms(base)
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return base.double().to(device), torch.randn(shape, dtype=torch.float64, device=device)


def reopen_by_task_gradient(student: torch.nn.Module, bank, x: torch.Tensor, target: torch.Tensor) -> float:
    """Close gate 3 of the model's one group near its threshold, train the gates for 20 steps on the
    task loss alone (budget weight 0) and return that gate's weight: above 0 if it reopened."""
    (gate,) = bank.gates.values()
    with torch.no_grad():
        gate.weight.fill_(0.5)
        gate.weight[3] = -0.05
    budget = tg_kernels.Budget(student, target=0.5, weight=0.0)
    opt = torch.optim.SGD(bank.parameters(), lr=0.5)
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(student(x), target) + budget()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gate.weight[3].item()


def close_random_half(bank, seed: int = 1) -> None:
    """Open gates at random weights in (0.1, 0.9), a random half of every group closed at -0.3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in bank.gates.values():
            c = gate.num_channels
            w = torch.empty(c, dtype=gate.weight.dtype).uniform_(0.1, 0.9, generator=g)
            w[torch.randperm(c, generator=g)[: c // 2]] = -0.3
            gate.weight.copy_(w)


def close_half(bank, seed: int = 1) -> None:
    """Every gate open at 0.5, then a random half of every group closed at -0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight.fill_(0.5)
            gate.weight[torch.randperm(gate.num_channels, generator=g)[: gate.num_channels // 2]] = -0.5
