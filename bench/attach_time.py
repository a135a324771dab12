"""How long ``attach_gates`` takes on the models of the plug-in tests (timm, transformers, task families).

    python bench/attach_time.py                 # every model, 3 runs each, writes bench/results/cpu/attach_time.csv
    python bench/attach_time.py densenet121 t5  # some of them, printed only

Each run builds the model afresh and times ``attach_gates(model, example_inputs)`` with its
defaults: the export-graph analysis, gate placement, the self-check on the example inputs and
compact execution's setup. timm models run at 224 x 224; the transformers, task-family and
recurrent models are the small configurations of ``tests/prune_zoo.py``. The figure is the median
of the runs (the first one also pays for torch.export's warm-up on a new model class). Needs timm and transformers
(``requirements-dev.txt``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import tg_kernels as tg  # noqa: E402
from bench.common import device_name  # noqa: E402
from tests.prune_zoo import TIMM_MODELS, hf_models, rnn_models, task_family_models  # noqa: E402


def models() -> dict:
    """name -> (builder, example positional inputs, example keyword inputs)."""
    import timm

    found = {
        name: (lambda n=name: timm.create_model(n, num_classes=10), (torch.randn(1, 3, 224, 224),), {})
        for name in TIMM_MODELS
    }
    found.update(hf_models())
    found.update(task_family_models())
    found.update(rnn_models())
    return found


def attach_seconds(build, args: tuple, kwargs: dict, runs: int) -> list[float]:
    """Wall time of ``attach_gates`` on ``runs`` freshly built models."""
    times = []
    for _ in range(runs):
        torch.manual_seed(0)
        model = build().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what stays ungated is listed in bank.skipped
            start = time.perf_counter()
            tg.attach_gates(model, args, example_kwargs=kwargs)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models to time (default: all, and write the CSV)")
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    available = models()
    unknown = [n for n in opts.names if n not in available]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(available)}")
    rows = []
    for name in opts.names or available:
        times = attach_seconds(*available[name], opts.runs)
        runs = " ".join(f"{t:.2f}" for t in times)
        rows.append({"model": name, "median_s": round(statistics.median(times), 3), "runs_s": runs})
        print(f"{name:32s} {rows[-1]['median_s']:5.2f} s   (runs: {rows[-1]['runs_s']})", flush=True)
    if not opts.names:
        out = REPO / "bench" / "results" / "cpu" / "attach_time.csv"  # (the models and inputs are on the CPU)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            f.write(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__}\n")
            writer = csv.DictWriter(f, fieldnames=["model", "median_s", "runs_s"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
