"""Shared benchmark machinery: interleaved timing, result rows, device description.

Timing is interleaved: every round times each provider once, so load from other processes on a
shared machine hits all providers alike; a provider's figure is the median over rounds, its spread
the interquartile range. CPU rounds use ``torch.utils.benchmark`` (``blocked_autorange``); GPU rounds
use CUDA events around a fixed number of calls after a warm-up.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils import benchmark


@dataclass
class Row:
    """One result: a case x provider x mode x active fraction."""

    family: str
    case: str
    provider: str
    mode: str
    active_fraction: float
    median_ms: float
    iqr_ms: float
    rounds: int
    baseline: str = ""  # provider this row's speed-up is relative to
    speedup: float | None = None  # baseline median / this median (same case, mode and fraction)
    extra: dict[str, float] = field(default_factory=dict)  # e.g. gbps, copy_fraction, vs_ideal

    def flat(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def quantiles(samples: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of `samples`."""
    if len(samples) < 2:
        return samples[0], 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return statistics.median(samples), q[2] - q[0]


def _time_once_cpu(fn: Callable[[], object], min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _time_once_cuda(fn: Callable[[], object], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, min_run_time: float
) -> dict[str, tuple[float, float]]:
    """Median and IQR (milliseconds) over `rounds` interleaved rounds for each callable."""
    calls = {}
    for name, fn in fns.items():  # warm-up: caches, allocator, algorithm selection, compilation
        for _ in range(3):
            started = time.perf_counter()
            fn()
            if time.perf_counter() - started > 0.1:  # slow calls: one more is warm-up enough
                fn()
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
            per_call = _time_once_cuda(fn, 3)
            calls[name] = max(3, min(1000, int(min_run_time / max(per_call, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                samples[name].append(_time_once_cuda(fn, calls[name]))
            else:
                samples[name].append(_time_once_cpu(fn, min_run_time))
    return {name: tuple(1e3 * v for v in quantiles(s)) for name, s in samples.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads of {os.cpu_count()} cpus)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
