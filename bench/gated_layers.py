"""Train-step benchmark (forward + backward) of GatedLinear / GatedConv2d against plain nn layers.

For each case and active fraction it times, interleaved round by round (so that load from other
processes hits every provider alike): the gated layer in modes none / exact / hard, the plain nn
layer of full size ("full") and the physically pruned plain layer with only the active channels
("pruned"). Run ``python bench/gated_layers.py`` (``--help`` for options); :func:`run_cases`
returns the rows for bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import benchmark

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Row, time_interleaved  # noqa: E402
from tg_kernels.backends import resolve_backend  # noqa: E402
from tg_kernels.nn import GatedConv2d, GatedLinear  # noqa: E402
from tg_kernels.ops.channel_gate import SUPPORTED_DTYPES as CHANNEL_GATE_DTYPES  # noqa: E402

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
MODES = ("none", "exact", "hard")


@dataclass(frozen=True)
class Case:
    """One layer shape: ``kind`` is "linear" (tokens x in -> out) or "conv3x3" (N x in x H x W -> out)."""

    name: str
    kind: str
    batch: int
    in_channels: int
    out_channels: int
    size: int = 0  # H = W for convs

    def input(self) -> torch.Tensor:
        if self.kind == "linear":
            return torch.randn(self.batch, self.in_channels)
        return torch.randn(self.batch, self.in_channels, self.size, self.size)

    def plain(self, out_channels: int) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(self.in_channels, out_channels)
        return nn.Conv2d(self.in_channels, out_channels, 3, padding=1)

    def gated(self, mode: str) -> nn.Module:
        if self.kind == "linear":
            return GatedLinear(self.in_channels, self.out_channels, skip=mode)
        return GatedConv2d(self.in_channels, self.out_channels, 3, padding=1, skip=mode)


CASES = {
    "linear_4096x1024x4096": Case("linear_4096x1024x4096", "linear", 4096, 1024, 4096),
    "linear_1024x512x1024": Case("linear_1024x512x1024", "linear", 1024, 512, 1024),
    "conv3x3_n32_64x64_32x32": Case("conv3x3_n32_64x64_32x32", "conv3x3", 32, 64, 64, 32),
    "conv3x3_n32_128x128_16x16": Case("conv3x3_n32_128x128_16x16", "conv3x3", 32, 128, 128, 16),
}


class _PrototypeLinear(torch.autograd.Function):
    """The naive skipping prototype of docs/design.md §7 in plain PyTorch ops: the baseline to beat.

    index_select the active weight rows, F.linear, index_copy_ into a zeroed output; backward from
    the active channels, with one full weight-gradient GEMM for the gate gradients ("exact") or
    active rows only ("hard").
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gate, hard):  # type: ignore[override]
        idx = torch.nonzero(gate).flatten()
        z = torch.nn.functional.linear(x, weight.index_select(0, idx), bias.index_select(0, idx))
        y = x.new_zeros(x.shape[0], weight.shape[0]).index_copy_(1, idx, z * gate[idx])
        ctx.save_for_backward(x, weight, bias, gate, idx)
        ctx.hard = hard
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, bias, gate, idx = ctx.saved_tensors
        grad_y_a, gate_a = grad_y.index_select(1, idx), gate[idx]
        grad_x = (grad_y_a * gate_a) @ weight.index_select(0, idx)
        if ctx.hard:
            g_a, s_a = grad_y_a.t() @ x, grad_y_a.sum(0)
            grad_w = torch.zeros_like(weight).index_copy_(0, idx, g_a * gate_a[:, None])
            grad_b = torch.zeros_like(bias).index_copy_(0, idx, s_a * gate_a)
            dots = (weight.index_select(0, idx) * g_a).sum(1) + bias[idx] * s_a
            grad_gate = torch.zeros_like(gate).index_copy_(0, idx, dots)
        else:
            g, s = grad_y.t() @ x, grad_y.sum(0)
            grad_w, grad_b = g * gate[:, None], s * gate
            grad_gate = (weight * g).sum(1) + bias * s
        return grad_x, grad_w, grad_b, grad_gate, None


class _Prototype(nn.Module):
    def __init__(self, layer: GatedLinear, hard: bool) -> None:
        super().__init__()
        self.layer, self.hard = layer, hard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return _PrototypeLinear.apply(x, layer.weight, layer.bias, layer.gate(), self.hard)


def _train_step(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad_y)

    return step


def _providers(
    case: Case, fraction: float, channels_last: bool = False, seed: int = 0, device: torch.device | None = None
) -> dict[tuple[str, str], Callable[[], None]]:
    """Train-step closures keyed by (provider, mode); gates open on a random `fraction` of channels."""
    torch.manual_seed(seed)
    device = device or torch.device("cpu")
    x = case.input().to(device)
    fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    n_open = round(fraction * case.out_channels)
    steps = {}
    for mode in MODES:
        layer = case.gated(mode).to(device=device, memory_format=fmt)
        with torch.no_grad():
            layer.gate.weight[torch.randperm(case.out_channels)[n_open:].to(device)] = -1.0
        grad_y = torch.randn_like(layer(x))
        steps[("tg_kernels", mode)] = _train_step(layer, x, grad_y)
        if case.kind == "linear" and mode != "none":
            steps[("prototype", f"proto_{mode}")] = _train_step(_Prototype(layer, mode == "hard"), x, grad_y)
    for mode, channels in (("full", case.out_channels), ("pruned", n_open)):
        layer = case.plain(channels).to(device=device, memory_format=fmt)
        grad_y = torch.randn_like(layer(x))
        steps[("torch.nn", mode)] = _train_step(layer, x, grad_y)
    return steps


def run_cases(
    cases: list[str] | None = None,
    fractions: tuple[float, ...] = FRACTIONS,
    repeats: int = 5,
    warmup: int = 1,
    channels_last: bool = False,
) -> list[dict]:
    """Benchmark rows: dicts with case, provider, mode, active_fraction, median_ms, iqr_ms (and min_ms).

    With `channels_last`, conv inputs and weights are channels_last (case names get a ``_cl`` suffix).
    """
    rows = []  # timed with perf_counter in interleaved rounds; statistics from torch.utils.benchmark.Measurement
    for name in cases or list(CASES):
        case = CASES[name]
        for fraction in fractions:
            print(f"  {name} active={fraction} ...", file=sys.stderr, flush=True)
            steps = _providers(case, fraction, channels_last)
            for _ in range(warmup):
                for step in steps.values():
                    step()
            times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
            for _ in range(repeats):  # interleaved rounds: drifting load hits every provider alike
                for key, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[key].append(time.perf_counter() - start)
            for (provider, mode), ts in times.items():
                m = benchmark.Measurement(1, ts, benchmark.TaskSpec(stmt=f"{name} {provider} {mode}", setup="pass"))
                rows.append(
                    dict(
                        case=name + ("_cl" if channels_last and case.kind != "linear" else ""),
                        provider=provider,
                        mode=mode,
                        active_fraction=fraction,
                        median_ms=m.median * 1e3,
                        iqr_ms=m.iqr * 1e3,
                        min_ms=min(ts) * 1e3,
                    )
                )
    return rows


def run_family(device: torch.device, quick: bool, progress=None) -> list[Row]:
    """Rows for bench/run.py: speed-up against the full plain layer, and time relative to the pruned one."""
    names = ["linear_1024x512x1024", "conv3x3_n32_128x128_16x16"] if quick else list(CASES)
    fractions = (0.5,) if quick else FRACTIONS
    rounds, min_run_time = (3, 0.05) if quick else (5, 0.2)
    rows = []
    for name in names:
        for fraction in fractions:
            timings = time_interleaved(_providers(CASES[name], fraction, device=device), device, rounds, min_run_time)
            full, pruned = timings[("torch.nn", "full")][0], timings[("torch.nn", "pruned")][0]
            for (provider, mode), (median, iqr) in timings.items():
                extra = {"vs_ideal": median / pruned}
                rows.append(
                    Row(
                        "gated_layers",
                        name,
                        provider,
                        mode,
                        fraction,
                        median,
                        iqr,
                        rounds,
                        "full",
                        full / median,
                        extra,
                    )
                )
            if progress is not None:
                progress()
    return rows


def count_family(device: torch.device, quick: bool) -> int:
    return 2 if quick else len(CASES) * len(FRACTIONS)


_TIME_COLUMNS = ("full", "pruned", "none", "exact", "hard", "proto_exact", "proto_hard")
_RATIOS = (
    ("none", "exact"),
    ("none", "hard"),
    ("hard", "pruned"),
    ("none", "full"),
    ("exact", "full"),
    ("hard", "full"),
    ("proto_exact", "exact"),
    ("proto_hard", "hard"),
)


def format_table(rows: list[dict], stat: str = "median_ms") -> str:
    """Times (`stat`: median_ms or min_ms) and the issue's ratios, one line per (case, active fraction).

    ``proto_*`` is the naive prototype of docs/design.md §7 (Linear only); ``a/b`` is time(a) / time(b).
    """
    ratio_names = [f"{a}/{b}" for a, b in _RATIOS]
    head = " ".join(f"{c:>11}" for c in _TIME_COLUMNS)
    lines = [f"{'case':28} {'active':>6} | {head} | " + " ".join(f"{r:>{max(9, len(r))}}" for r in ratio_names)]
    lines.append(f"{'':28} {'':6} | {'(ms, ' + stat[:-3] + ')':>11}")
    keys = sorted({(r["case"], r["active_fraction"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    for case, fraction in keys:
        t = {r["mode"]: r[stat] for r in rows if r["case"] == case and r["active_fraction"] == fraction}
        times = " ".join(f"{t[c]:11.1f}" if c in t else f"{'-':>11}" for c in _TIME_COLUMNS)
        ratios = " ".join(
            f"{t[a] / t[b]:>{max(9, len(n))}.2f}" if a in t and b in t else f"{'-':>{max(9, len(n))}}"
            for (a, b), n in zip(_RATIOS, ratio_names, strict=True)
        )
        lines.append(f"{case:28} {fraction:6.2f} | {times} | {ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=None)
    parser.add_argument("--fractions", nargs="*", type=float, default=list(FRACTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per provider")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last conv inputs and weights")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gate_backend = resolve_backend("channel_gate", torch.device("cpu"), torch.float32, CHANNEL_GATE_DTYPES)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; train step = forward + backward "
        f"(grads of x and params); channel_gate backend for mode none: {gate_backend}; {args.repeats} rounds; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    rows = run_cases(args.cases, tuple(args.fractions), args.repeats, channels_last=args.channels_last)
    print(format_table(rows))
    print("\nThe same rounds, minimum over rounds (less sensitive to load from other processes):")
    print(format_table(rows, "min_ms"))
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on this machine distort the timings)")


if __name__ == "__main__":
    main()
