"""Channel gate benchmark: fused backends against the unfused PyTorch expression and a plain copy.

Modes: ``fwd`` (no autograd) and ``fwd+bwd`` (forward, then grad_x and grad_gate). Bandwidth counts
the bytes a fused kernel must move (forward: read x, write y; backward: read dy and x, write dx) and
is reported as a fraction of ``x.clone()``'s bandwidth measured in the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import tg_kernels
from bench.common import Row, time_interleaved
from tg_kernels.reference import channel_gate_unfused

FAMILY = "channel_gate"


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dim: int
    dtype: torch.dtype
    channels_last: bool = False

    def make(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(self.shape, device=device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        gate = (torch.rand(self.shape[self.dim], device=device) > 0.5).float()
        return x, gate, torch.randn_like(x)


CPU_CASES = [
    Case("nchw_64x64x32x32_f32", (64, 64, 32, 32), 1, torch.float32),
    Case("channels_last_64x64x32x32_f32", (64, 64, 32, 32), 1, torch.float32, channels_last=True),
    Case("nlc_16x512x512_f32", (16, 512, 512), -1, torch.float32),
]
GPU_CASES = [
    Case("nchw_128x256x56x56_f32", (128, 256, 56, 56), 1, torch.float32),
    Case("nchw_128x256x56x56_bf16", (128, 256, 56, 56), 1, torch.bfloat16),
    Case("channels_last_128x256x56x56_bf16", (128, 256, 56, 56), 1, torch.bfloat16, channels_last=True),
    Case("nlc_32x2048x4096_bf16", (32, 2048, 4096), -1, torch.bfloat16),
]


def _providers(case: Case, device: torch.device) -> dict[str, dict[str, object]]:
    """{provider: {mode: callable}} for every backend that runs natively on `device`."""
    x, gate, grad_y = case.make(device)
    x_leaf, gate_leaf = x.detach().requires_grad_(True), gate.detach().requires_grad_(True)
    runs_here = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}[device.type]
    backends = [b for b in runs_here if tg_kernels.available_backends()[b].available]

    def fused(backend: str):
        def fwd():
            with tg_kernels.use_backend(backend), torch.no_grad():
                return tg_kernels.channel_gate(x, gate, case.dim)

        def fwd_bwd():
            with tg_kernels.use_backend(backend):
                y = tg_kernels.channel_gate(x_leaf, gate_leaf, case.dim)
                return torch.autograd.grad(y, (x_leaf, gate_leaf), grad_y)

        return {"fwd": fwd, "fwd+bwd": fwd_bwd}

    def unfused_fwd():
        with torch.no_grad():
            return channel_gate_unfused(x, gate, case.dim)

    def unfused_fwd_bwd():
        y = channel_gate_unfused(x_leaf, gate_leaf, case.dim)
        return torch.autograd.grad(y, (x_leaf, gate_leaf), grad_y)

    providers = {b: fused(b) for b in backends}
    providers["unfused"] = {"fwd": unfused_fwd, "fwd+bwd": unfused_fwd_bwd}
    providers["copy"] = {"copy": x.clone}
    return providers


def run_cases(device: torch.device, quick: bool, progress=None) -> list[Row]:
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    if quick:
        cases = cases[:1]
    rounds, min_run_time = (3, 0.1) if quick else (7, 0.25)
    rows: list[Row] = []
    for case in cases:
        providers = _providers(case, device)
        fns = {(p, m): fn for p, modes in providers.items() for m, fn in modes.items()}
        timings = time_interleaved(fns, device, rounds, min_run_time)
        x_bytes = math.prod(case.shape) * case.dtype.itemsize
        moved = {"fwd": 2 * x_bytes, "fwd+bwd": 5 * x_bytes, "copy": 2 * x_bytes}
        copy_gbps = moved["copy"] / (timings[("copy", "copy")][0] * 1e-3) / 1e9
        for (provider, mode), (median, iqr) in timings.items():
            gbps = moved[mode] / (median * 1e-3) / 1e9
            baseline = "unfused" if mode != "copy" else ""
            speedup = timings[("unfused", mode)][0] / median if baseline else None
            extra = {"gbps": gbps, "copy_fraction": gbps / copy_gbps}
            if mode != "copy":
                extra["vs_copy_time"] = median / timings[("copy", "copy")][0]
            rows.append(Row(FAMILY, case.name, provider, mode, 1.0, median, iqr, rounds, baseline, speedup, extra))
        if progress is not None:
            progress()
    return rows


def count_cases(device: torch.device, quick: bool) -> int:
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    return 1 if quick else len(cases)
