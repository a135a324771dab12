"""Prune a small CNN on scikit-learn's digits to a FLOPs target with trainable gates, then export it.

The workflow of Kim et al. (AAAI 2020) end to end, on real data that ships with scikit-learn
(``sklearn.datasets.load_digits``: 1797 grey 8x8 images of the digits 0-9, no download):

1. train a dense CNN (conv 1->64->128->128 with BatchNorm and ReLU, max pooling, a Linear head;
   ``--widths 16,32,32`` for a narrow one, where pruning costs accuracy);
2. ``tg.prune(model, batches, target=...)``: attach the gates (started at heights ranked by each
   channel's Taylor importance), search with the adaptive budget and its annealed goal (skip mode
   ``"exact"``, 4 epochs or 300 optimizer steps, whichever is more, at most 60% of the 18 epochs),
   land the FLOPs ratio within ``--tol`` of the target (``Budget.settle``), freeze the gates and
   fine-tune for the rest of the 18 epochs (``"hard"``: only open channels are computed), export;
3. check that the exported plain ``torch.nn`` model computes what the gated model computes, save it
   and load it back with ``tg.save`` / ``tg.load``;
4. print test accuracy, FLOPs, parameters and CPU latency of the dense and the exported model,
   and write a PNG (``--plot``) of the FLOPs ratio and test accuracy per epoch and of the channels
   each layer kept. ``--compare-none`` runs the same pruning with every step in skip mode
   ``"none"`` (dense compute) and prints both wall times.

Run it (about a minute on a busy 2-core CPU)::

    python examples/prune_digits.py                      # --target 0.5 --seed 0
    python examples/prune_digits.py --target 0.125 --widths 16,32,32
    python examples/prune_digits.py --quick              # about 20 s: the smoke test's setting

Seeds and the train/test split (1347 train / 450 test, stratified) are fixed. Training runs on one
CPU thread by default (``--train-threads``): its batches are small, and on a shared machine two OpenMP
threads that wait at barriers for a descheduled peer made a training step about 8x slower than one.
Latencies are medians of ``torch.utils.benchmark`` timings, reported with ``--threads`` threads (default:
all of them) and with one thread; the models are timed in interleaved rounds so that background load
hits both alike. The test accuracy recorded per epoch is for the picture only; nothing is selected on it.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import benchmark

import tg_kernels as tg


class DigitsCNN(nn.Module):
    """conv(1->w1)-BN-ReLU, conv(w1->w2)-BN-ReLU, pool, conv(w2->w3)-BN-ReLU, pool, Linear(w3*2*2 -> 10)."""

    def __init__(self, widths: tuple[int, int, int] = (64, 128, 128), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, w1, 3, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w1, w2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(w2, w3, 3, padding=1, bias=False),
            nn.BatchNorm2d(w3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.head = nn.Linear(w3 * 2 * 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(test_size: float = 0.25, split_seed: int = 0) -> Data:
    """The digits set as float tensors (N, 1, 8, 8) scaled to [0, 1], with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=test_size, random_state=split_seed, stratify=digits.target
    )
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    return Data(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def shift_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by -1, 0 or +1 pixels in each direction (zero fill): cheap, label-preserving."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(8)).view(n, 1, 8, 1).expand(n, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(8)).view(n, 1, 1, 8).expand(n, 1, 8, 8)
    return out.gather(3, cols)


def batches(data: Data, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(data.y_train), generator=generator)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield shift_augment(data.x_train[idx], generator), data.y_train[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """(accuracy, logits) in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    return (logits.argmax(1) == y).float().mean().item(), logits


# --------------------------------------------------------------------------------------------------
# training phases
# --------------------------------------------------------------------------------------------------


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train(
    model: nn.Module, params, data: Data, epochs: int, lr: float, batch_size: int, gen: torch.Generator, log, tag: str
):
    """AdamW with a cosine schedule on ``params`` (task loss only)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(data.y_train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps))
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for xb, yb in batches(data, batch_size, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(yb)
        if epoch == epochs - 1 or (epoch + 1) % max(1, epochs // 4) == 0:
            acc, _ = evaluate(model, data.x_test, data.y_test)
            log(f"  {tag:<6} epoch {epoch + 1:3d}/{epochs}  loss {total / len(data.y_train):.4f}  test acc {acc:.4f}")


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def latency(
    models: dict[str, nn.Module], x: Tensor, threads: int, min_run_time: float, rounds: int
) -> dict[str, float]:
    """Median seconds per forward (eval, no_grad) with ``threads`` CPU threads, models timed in interleaved rounds.

    Each round takes ``blocked_autorange``'s median for every model in turn, so load from other
    processes on a shared machine hits them alike; the result is the median over rounds.
    """
    samples: dict[str, list[float]] = {name: [] for name in models}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for model in models.values():  # warm-up: first-call allocations and algorithm choice
                model.eval()
                for _ in range(3):
                    model(x)
            for _ in range(rounds):
                for name, model in models.items():
                    timer = benchmark.Timer(
                        stmt="model(x)",
                        globals={"model": model, "x": x},
                        num_threads=threads,
                        label="digits CNN",
                        description=name,
                    )
                    samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    finally:
        torch.set_num_threads(previous)
    return {name: statistics.median(s) for name, s in samples.items()}


@dataclass
class Result:
    seed: int
    target: float
    widths: tuple[int, int, int]
    dense_acc: float
    gated_acc: float
    pruned_acc: float
    flops_ratio: float
    dense_flops: float
    pruned_flops: float
    dense_params: int
    pruned_params: int
    kept_channels: dict[str, tuple[int, int]]
    latencies: dict[tuple[int, int], tuple[float, float]]  # (threads, batch) -> (dense s, pruned s)
    history: list[dict]
    prune_seconds: float  # tg.prune's wall time (search + fine-tuning + export)
    none_seconds: float | None  # the same run with every step in skip mode "none" (--compare-none)
    settled_flips: int
    plot: str | None
    seconds: float

    def speedup(self, threads: int, batch: int) -> float:
        dense, pruned = self.latencies[threads, batch]
        return dense / pruned


def summary(r: Result) -> str:
    rows = [
        ("", "dense", "pruned (exported)", "pruned / dense"),
        (
            "test accuracy",
            f"{r.dense_acc:.4f}",
            f"{r.pruned_acc:.4f}",
            f"{(r.pruned_acc - r.dense_acc) * 100:+.2f} pts",
        ),
        ("FLOPs / image", f"{r.dense_flops:,.0f}", f"{r.pruned_flops:,.0f}", f"{r.flops_ratio:.4f}x"),
        ("parameters", f"{r.dense_params:,}", f"{r.pruned_params:,}", f"{r.pruned_params / r.dense_params:.4f}x"),
    ]
    for (threads, batch), (dense, pruned) in r.latencies.items():
        label = f"CPU latency, batch {batch}, {threads} thread{'s' if threads > 1 else ''}"
        rows.append((label, f"{dense * 1e3:.3f} ms", f"{pruned * 1e3:.3f} ms", f"{dense / pruned:.2f}x speed-up"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("kept channels: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in r.kept_channels.items()))
    lines.append(
        f"FLOPs target {r.target:.3f}, reached {r.flops_ratio:.4f} ({(r.flops_ratio / r.target - 1) * 100:+.2f}% "
        f"of the target; {r.settled_flips} gates flipped by Budget.settle); gated model test accuracy "
        f"{r.gated_acc:.4f}; widths {'/'.join(map(str, r.widths))}; seed {r.seed}"
    )
    timing = f"pruning run (tg.prune: exact search, hard fine-tuning, export) {r.prune_seconds:.1f} s"
    if r.none_seconds is not None:
        timing += f"; the same run with every step in skip mode 'none' {r.none_seconds:.1f} s"
        timing += f" ({r.none_seconds / r.prune_seconds:.2f}x)"
    lines.append(timing + f"; {r.seconds:.0f} s in all")
    if r.plot:
        lines.append(f"picture: {r.plot}")
    return "\n".join(lines)


def plot(result_history: list[dict], kept: dict[str, tuple[int, int]], target: float, path: str, title: str) -> str:
    """FLOPs ratio and test accuracy per epoch (left), kept channels per layer (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    x = [i for i, _ in enumerate(result_history)]  # the first row is the start (epoch 0)
    ratio = [row["ratio"] for row in result_history]
    ax.plot(x, ratio, "o-", color="tab:blue", label="FLOPs ratio")
    ax.axhline(target, color="tab:blue", linestyle=":", label=f"target {target:g}")
    ax.set_xlabel("epoch (0: gates attached; gate search, then fine-tuning with frozen gates)")
    ax.set_ylabel("FLOPs / dense FLOPs", color="tab:blue")
    ax.set_ylim(0, 1.05)
    search = sum(1 for row in result_history if row["phase"] == "gates")
    ax.axvline(search + 0.5, color="grey", linewidth=0.8)
    ax.text(search + 0.6, 1.0, "gates frozen", fontsize=8, color="grey", va="top")
    if any("metric" in row for row in result_history):
        acc = ax.twinx()
        acc.plot(x, [row.get("metric", float("nan")) for row in result_history], "s-", color="tab:orange")
        acc.set_ylabel("test accuracy", color="tab:orange")
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    names = list(kept)
    bars.bar(names, [b for _, b in kept.values()], color="lightgrey", label="dense")
    bars.bar(names, [a for a, _ in kept.values()], color="tab:green", label="kept")
    for i, (a, b) in enumerate(kept.values()):
        bars.text(i, a, f"{a}/{b}", ha="center", va="bottom", fontsize=8)
    bars.set_ylabel("output channels")
    bars.set_title("channels kept per gated layer", fontsize=9)
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="dense training epochs (default 20)")
    p.add_argument("--widths", default="64,128,128", help="the CNN's three conv widths (default 64,128,128)")
    p.add_argument(
        "--gate-epochs",
        type=int,
        default=4,
        help="epochs of gate search, or tg.prune's min_search_steps if more (default 4)",
    )
    p.add_argument(
        "--max-gate-epochs", type=int, default=None, help="search on until within --tol, up to these (default: none)"
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=14,
        help="the run is --gate-epochs + these epochs; fine-tuning gets what the search leaves (default 14)",
    )
    p.add_argument("--target", type=float, default=0.5, help="FLOPs of the pruned model / dense (default 0.5)")
    p.add_argument("--tol", type=float, default=0.01, help="stop when |ratio / target - 1| <= tol (default 0.01)")
    p.add_argument("--gate-lr", type=float, default=0.02, help="Adam lr of the gate weights (default 0.02)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW lr of the dense training (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-threads", type=int, default=1, help="CPU threads while training (default 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for the latencies")
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--latency-time", type=float, default=0.5, help="seconds per latency measurement")
    p.add_argument("--plot", default="prune_digits.png", help="PNG to write ('' for none; default prune_digits.png)")
    p.add_argument("--compare-none", action="store_true", help="also time the same run with skip mode 'none'")
    p.add_argument("--quick", action="store_true", help="a smoke test: 640 training images, few epochs, short timings")
    p.add_argument("--quiet", action="store_true", help="print only the summary (no progress bar)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or min(widths) < 1:
        p.error(f"--widths takes three positive ints separated by commas, got {args.widths!r}")
    args.widths = widths
    if args.quick:
        args.epochs, args.gate_epochs, args.max_gate_epochs, args.finetune_epochs = 5, 4, 20, 2
        args.gate_lr, args.tol = 0.04, 0.02
        args.latency_batch, args.latency_time = 64, 0.05
    return args


def main(argv: Sequence[str] | None = None) -> Result:
    """Run the example; returns the figures it prints."""
    args = parse_args(argv)
    start = time.perf_counter()
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.train_threads)
    try:
        result = run(args, log, start)
    finally:
        torch.set_num_threads(previous_threads)
    print()
    print(summary(result))
    return result


def prune_run(dense: nn.Module, data: Data, args: argparse.Namespace, skip: tuple[str, str], progress: bool):
    """One tg.prune run on a copy of ``dense`` (the seed fixes the batches, so runs are comparable)."""
    torch.manual_seed(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    result = tg.prune(
        copy.deepcopy(dense),
        lambda: batches(data, args.batch_size, gen),
        target=args.target,
        example_inputs=data.x_test[:1],  # FLOPs are counted for one image
        gate_epochs=args.gate_epochs,
        max_gate_epochs=args.max_gate_epochs,
        finetune_epochs=args.finetune_epochs,
        lr=args.lr / 4,
        gate_lr=args.gate_lr,
        tol=args.tol,
        skip=skip,
        evaluate=lambda m: evaluate(m, data.x_test, data.y_test)[0],
        progress=progress,
    )
    return result, time.perf_counter() - start


def run(args: argparse.Namespace, log, start: float) -> Result:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_data()
    if args.quick:
        data.x_train, data.y_train = data.x_train[:640], data.y_train[:640]
    log(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images, seed {args.seed}")

    # 1. the dense baseline
    model = DigitsCNN(args.widths)
    train(model, list(model.parameters()), data, args.epochs, args.lr, args.batch_size, gen, log, "dense")
    dense_acc, _ = evaluate(model, data.x_test, data.y_test)
    dense = copy.deepcopy(model).eval()

    # 2. gates, the adaptive budget, fine-tuning and export in one call
    log(f"tg.prune: FLOPs target {args.target}, gate search in skip mode 'exact', fine-tuning in 'hard'")
    result, prune_seconds = prune_run(dense, data, args, ("exact", "hard"), progress=not args.quiet)
    none_seconds = None
    if args.compare_none:
        log("the same run with every step in skip mode 'none' (for its wall time) ...")
        _, none_seconds = prune_run(dense, data, args, ("none", "none"), progress=not args.quiet)
    gated, small, budget = result.gated, result.model.eval(), result.budget
    gated_acc, gated_logits = evaluate(gated, data.x_test, data.y_test)
    usage = budget.usage()
    log("")
    log(budget.report())

    # 3. the exported model computes what the gated model computes; save and load it back
    pruned_acc, pruned_logits = evaluate(small, data.x_test, data.y_test)
    torch.testing.assert_close(pruned_logits, gated_logits, rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits_pruned.pt")
        tg.save(small, path)
        loaded = tg.load(path, DigitsCNN(args.widths)).eval()
    _, loaded_logits = evaluate(loaded, data.x_test, data.y_test)
    torch.testing.assert_close(loaded_logits, pruned_logits, rtol=0, atol=0)
    log("export: outputs equal the gated model's (assert_close); tg.save / tg.load round-trip exact")

    # 4. CPU latency of the dense and the exported model
    log("measuring latencies ...")
    x_batch = data.x_test.repeat(math.ceil(args.latency_batch / len(data.y_test)), 1, 1, 1)[: args.latency_batch]
    rounds = 1 if args.quick else 3
    latencies = {}
    for threads in dict.fromkeys((args.threads, 1)):
        for x in (x_batch.contiguous(), data.x_test[:1].contiguous()):
            lat = latency({"dense": dense, "pruned": small}, x, threads, args.latency_time, rounds)
            latencies[threads, len(x)] = (lat["dense"], lat["pruned"])

    kept = dict(result.status.kept)
    picture = None
    if args.plot:
        title = (
            f"digits CNN {'/'.join(map(str, args.widths))}, FLOPs target {args.target:g}: reached "
            f"{usage.flops / usage.full_flops:.4f}, test accuracy {dense_acc:.3f} -> {pruned_acc:.3f}"
        )
        try:
            picture = plot(result.history, kept, args.target, args.plot, title)
        except ImportError:
            log("matplotlib is not installed: no picture")
    return Result(
        seed=args.seed,
        target=args.target,
        widths=args.widths,
        dense_acc=dense_acc,
        gated_acc=gated_acc,
        pruned_acc=pruned_acc,
        flops_ratio=usage.flops / usage.full_flops,
        dense_flops=usage.full_flops,
        pruned_flops=usage.flops,
        dense_params=count_params(dense),
        pruned_params=count_params(small),
        kept_channels=kept,
        latencies=latencies,
        history=result.history,
        prune_seconds=prune_seconds,
        none_seconds=none_seconds,
        settled_flips=result.settled_flips,
        plot=picture,
        seconds=time.perf_counter() - start,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
