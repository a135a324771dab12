"""tg_kernels speed benchmark: how much faster gated training and inference get, against what you would use instead.

    python bench/run.py                  # default suite on the GPU if present, else the CPU
    python bench/run.py --quick          # a short run (under 2 minutes on 2 CPU cores)
    python bench/run.py --list           # the case families
    python bench/run.py --cases channel_gate --out /tmp/bench --compare bench/results/cpu/results.csv

Writes results.csv (one row per case x provider x mode x active fraction, with median and IQR over
interleaved rounds), results.json (the same plus device, versions, timestamp) and one PNG per case
family into the results folder, and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/run.py` puts bench/, not the repo, on sys.path
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

import tg_kernels  # noqa: E402
from bench import channel_gate, gated_layers, models  # noqa: E402
from bench.common import Row, device_name  # noqa: E402

# family -> (run_cases(device, quick, progress) -> rows, count_cases(device, quick) -> int, description)
FAMILIES: dict[str, tuple[Callable, Callable, str]] = {
    "channel_gate": (
        channel_gate.run_cases,
        channel_gate.count_cases,
        "fused channel gate vs the unfused PyTorch expression, and its bandwidth vs x.clone()",
    ),
    "gated_layers": (
        gated_layers.run_family,
        gated_layers.count_family,
        "GatedLinear / GatedConv2d train steps per skip mode and active fraction vs the full and the pruned nn layer",
    ),
    "models": (
        models.run_cases,
        models.count_cases,
        "train steps and inference of a gated CIFAR ResNet-56, a transformer MLP block and resnet18 vs dense and ideal",
    ),
}

CSV_COLUMNS = [
    "family",
    "case",
    "provider",
    "mode",
    "active_fraction",
    "median_ms",
    "iqr_ms",
    "rounds",
    "baseline",
    "speedup",
    "gbps",
    "copy_fraction",
    "vs_copy_time",
    "vs_ideal",
    "replan_ms",
]


def source_revision() -> str | None:
    """The checkout's git revision (with "-dirty" for uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    import triton

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tg_kernels": tg_kernels.__version__,
        "git_revision": source_revision(),
        "extension_built_from": tg_kernels.build_info().get("git_revision"),
        "backends": {n: b.available for n, b in tg_kernels.available_backends().items()},
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "timing": "median and IQR over interleaved rounds; CPU: torch.utils.benchmark blocked_autorange, "
        "GPU: CUDA events",
    }


def write_results(rows: list[Row], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.flat())
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": [r.flat() for r in rows]}, indent=1))


def load_previous(path: Path) -> dict[tuple, float]:
    """Median times of an earlier run (results.csv or results.json, or their folder) keyed by row identity."""
    if path.is_dir():
        path = path / "results.csv"
    if path.suffix == ".json":
        records = json.loads(path.read_text())["rows"]
    else:
        with open(path) as f:
            records = list(csv.DictReader(f))
    return {_key(r): float(r["median_ms"]) for r in records}


def _key(r: dict) -> tuple:
    return (r["family"], r["case"], r["provider"], r["mode"], round(float(r["active_fraction"]), 4))


def print_table(console: Console, rows: list[Row], previous: dict[tuple, float] | None) -> None:
    for family in dict.fromkeys(r.family for r in rows):
        table = Table(title=f"{family}", show_lines=False)
        for col in (
            "case",
            "provider",
            "mode",
            "active",
            "median ms",
            "IQR ms",
            "speed-up",
            "vs",
            "GB/s",
            "of copy BW",
        ):
            table.add_column(col, justify="left" if col in ("case", "provider", "mode", "vs") else "right")
        if previous is not None:
            table.add_column("vs previous", justify="right")
        for r in (r for r in rows if r.family == family):
            cells = [
                r.case,
                r.provider,
                r.mode,
                f"{r.active_fraction:.2f}",
                f"{r.median_ms:.3f}",
                f"{r.iqr_ms:.3f}",
                f"{r.speedup:.2f}x" if r.speedup is not None else "",
                r.baseline,
                f"{r.extra['gbps']:.1f}" if "gbps" in r.extra else "",
                f"{100 * r.extra['copy_fraction']:.0f}%" if "copy_fraction" in r.extra else "",
            ]
            if previous is not None:
                before = previous.get(_key(r.flat()))
                cells.append(f"{before / r.median_ms:.2f}x" if before else "n/a")
            table.add_row(*cells)
        console.print(table)


def plot(rows: list[Row], out: Path, device: str) -> list[Path]:
    """One PNG per family: per case, time against active fraction (lines) or per provider (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for family in dict.fromkeys(r.family for r in rows):
        fam = [r for r in rows if r.family == family]
        cases = list(dict.fromkeys(r.case for r in fam))
        fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
        for ax, case in zip(axes[0], cases):
            sel = [r for r in fam if r.case == case]
            series = list(dict.fromkeys((r.provider, r.mode) for r in sel))
            fractions = sorted({r.active_fraction for r in sel})
            if len(fractions) > 1:
                for provider, mode in series:
                    pts = sorted(
                        (r.active_fraction, r.median_ms) for r in sel if (r.provider, r.mode) == (provider, mode)
                    )
                    ax.plot(*zip(*pts), marker="o", label=f"{provider} {mode}")
                ax.set_xlabel("active fraction")
                ax.invert_xaxis()
            else:
                labels = [f"{p} {m}" for p, m in series]
                values = [next(r.median_ms for r in sel if (r.provider, r.mode) == s) for s in series]
                ax.barh(labels, values)
                ax.invert_yaxis()
            ax.set_title(case, fontsize=9)
            ax.set_ylabel("median ms") if len(fractions) > 1 else ax.set_xlabel("median ms")
            ax.legend(fontsize=7) if len(fractions) > 1 else None
        fig.suptitle(f"tg_kernels {family} on {device}", fontsize=10)
        fig.tight_layout()
        path = out / f"{family}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def default_out(device: torch.device) -> Path:
    return (
        REPO
        / "bench"
        / "results"
        / ("cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds (under 2 minutes on 2 cores)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--cases", nargs="*", default=None, metavar="FAMILY", help="families to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the case families and exit")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>)")
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="PREVIOUS_RESULTS",
        help="an earlier results.csv/.json (or its folder): adds a speed-up column",
    )
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)

    if args.list:
        for name, (_, _, description) in FAMILIES.items():
            console.print(f"[bold]{name}[/bold]: {description}")
        return 0
    unknown = [c for c in args.cases or [] if c not in FAMILIES]
    if unknown:
        parser.error(f"unknown case families {unknown}; choose from {list(FAMILIES)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    previous = load_previous(args.compare) if args.compare else None
    out = args.out or default_out(device)
    env = environment(device)
    console.print(f"tg_kernels {env['tg_kernels']} on {env['device']}, torch {env['torch']}; {env['timing']}")

    families = args.cases or list(FAMILIES)
    total = sum(FAMILIES[f][1](device, args.quick) for f in families)
    rows: list[Row] = []
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=total)
        for family in families:
            progress.update(task, description=family)
            rows += FAMILIES[family][0](device, args.quick, progress=lambda: progress.advance(task))
    env["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_results(rows, env, out)
    print_table(console, rows, previous)
    pngs = plot(rows, out, env["device"])
    console.print(
        f"wrote {out / 'results.csv'}, results.json, {', '.join(p.name for p in pngs)} in {env['wall_seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
