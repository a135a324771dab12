"""Prune a small CNN on scikit-learn's digits to half its FLOPs with trainable gates, then export it.

The workflow of Kim et al. (AAAI 2020) end to end, on real data that ships with scikit-learn
(``sklearn.datasets.load_digits``: 1797 grey 8x8 images of the digits 0-9, no download):

1. train a dense CNN (conv 1->64->128->128 with BatchNorm and ReLU, max pooling, a Linear head);
2. ``tg.attach_gates``: one trainable gate per prunable channel group;
3. fine-tune with task loss + ``tg.Budget`` (FLOPs towards ``--target`` of the dense model) until
   the FLOPs ratio lies within the tolerance, then freeze the gates and fine-tune the remaining weights;
4. ``tg.export``: a plain ``torch.nn`` model with the closed channels removed (checked to compute what
   the gated model computes), saved and loaded back with ``tg.save`` / ``tg.load``;
5. print test accuracy, FLOPs, parameters and the CPU latency of the dense and the exported model.

Run it (2-3 minutes on a busy 2-core CPU)::

    python examples/prune_digits.py                      # --epochs 20 --target 0.5 --seed 0
    python examples/prune_digits.py --quick              # about 30 s: the smoke test's setting

Seeds and the train/test split (1347 train / 450 test, stratified) are fixed. Training runs on one
CPU thread by default (``--train-threads``): its batches are small, and on a shared machine two OpenMP
threads that wait at barriers for a descheduled peer made a training step about 8x slower than one.
Latencies are medians of ``torch.utils.benchmark`` timings, reported with ``--threads`` threads (default:
all of them) and with one thread; the models are timed in interleaved rounds so that background load
hits both alike.

Gate training: Adam on the gate weights with lr 0.02 (cosine-annealed) and a budget weight of 0.2.
A larger budget weight (2.0 here) moves every gate in lockstep, closes whole layers at once and ends
in a dead network: once two coupled layers are both fully closed, the budget's gradient for either
(a product of their open counts) is zero and nothing re-opens them.
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


def train_gates(
    model: nn.Module,
    budget: tg.Budget,
    data: Data,
    *,
    min_epochs: int,
    max_epochs: int,
    lr: float,
    gate_lr: float,
    tol: float,
    batch_size: int,
    gen: torch.Generator,
    log,
) -> int:
    """Task loss + budget, weights and gates together, until the ratio is within ``tol`` of the target.

    The abs penalty pushes every gate the same way until the ratio crosses the target, then back:
    the ratio oscillates around the target with an amplitude set by the gate step size, which is
    annealed (cosine over ``min_epochs``) so that the oscillation settles. After ``min_epochs`` the
    phase ends at the first step whose ratio is within ``tol``. Returns the number of gate steps.
    """
    bank = model.tg_gates
    gate_params = list(bank.parameters())
    gate_ids = {id(p) for p in gate_params}
    weights = [p for p in model.parameters() if id(p) not in gate_ids]
    opt = torch.optim.Adam(
        [{"params": weights, "lr": lr}, {"params": gate_params, "lr": gate_lr, "betas": (0.9, 0.99)}]
    )
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    anneal = min_epochs * steps_per_epoch
    step = 0
    model.train()
    for epoch in range(max_epochs):
        for xb, yb in batches(data, batch_size, gen):
            opt.param_groups[1]["lr"] = gate_lr * max(cosine(step, anneal), 0.05)
            task = F.cross_entropy(model(xb), yb)
            loss = task + budget()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if epoch + 1 >= min_epochs and abs(budget.ratio().item() - budget.target) <= tol:
                log(f"  gates  epoch {epoch + 1:3d}  step {step}: FLOPs ratio {budget.ratio().item():.4f}, stop")
                return step
        if epoch == max_epochs - 1 or (epoch + 1) % max(1, min_epochs // 5) == 0:
            acc, _ = evaluate(model, data.x_test, data.y_test)
            log(
                f"  gates  epoch {epoch + 1:3d}  task {task.item():.4f}  FLOPs ratio {budget.ratio().item():.4f}  "
                f"open {bank.open_fraction():.3f}  test acc {acc:.4f}"
            )
    return step


def finetune(model: nn.Module, data: Data, epochs: int, lr: float, batch_size: int, gen: torch.Generator, log):
    """Fine-tune the non-gate weights with the gates frozen (the FLOPs ratio cannot move)."""
    gate_ids = {id(p) for p in model.tg_gates.parameters()}
    for p in model.tg_gates.parameters():
        p.requires_grad_(False)
    weights = [p for p in model.parameters() if id(p) not in gate_ids]
    train(model, weights, data, epochs, lr, batch_size, gen, log, "tune")


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
        f"of the target); gated model test accuracy {r.gated_acc:.4f}; seed {r.seed}; {r.seconds:.0f} s in all"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="dense training epochs (default 20)")
    p.add_argument("--gate-epochs", type=int, default=8, help="minimum epochs with the budget (default 8)")
    p.add_argument("--max-gate-epochs", type=int, default=30, help="give up reaching the target after these")
    p.add_argument("--finetune-epochs", type=int, default=10, help="epochs with frozen gates at the end")
    p.add_argument("--target", type=float, default=0.5, help="FLOPs of the pruned model / dense (default 0.5)")
    p.add_argument("--tol", type=float, default=0.01, help="stop when |ratio - target| <= tol (default 0.01)")
    p.add_argument("--budget-weight", type=float, default=0.2, help="the budget's lambda (default 0.2)")
    p.add_argument("--gate-lr", type=float, default=0.02, help="Adam lr of the gate weights (default 0.02)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW lr of the dense training (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-threads", type=int, default=1, help="CPU threads while training (default 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for the latencies")
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--latency-time", type=float, default=0.5, help="seconds per latency measurement")
    p.add_argument("--quick", action="store_true", help="a smoke test: 640 training images, few epochs, short timings")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")
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


def run(args: argparse.Namespace, log, start: float) -> Result:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_data()
    if args.quick:
        data.x_train, data.y_train = data.x_train[:640], data.y_train[:640]
    log(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images, seed {args.seed}")

    # 1. the dense baseline
    model = DigitsCNN()
    train(model, list(model.parameters()), data, args.epochs, args.lr, args.batch_size, gen, log, "dense")
    dense_acc, _ = evaluate(model, data.x_test, data.y_test)
    dense = copy.deepcopy(model).eval()

    # 2. gates (FLOPs are counted for the example input: one image)
    model, bank = tg.attach_gates(model, data.x_test[:1], skip="exact")
    budget = tg.Budget(model, target=args.target, metric="flops", weight=args.budget_weight)
    log(f"attached {len(bank.groups)} gate groups ({', '.join(g.key for g in bank.groups)}); ungated: {bank.skipped}")

    # 3. train towards the budget, then fine-tune with frozen gates
    train_gates(
        model,
        budget,
        data,
        min_epochs=args.gate_epochs,
        max_epochs=args.max_gate_epochs,
        lr=args.lr / 4,
        gate_lr=args.gate_lr,
        tol=args.tol,
        batch_size=args.batch_size,
        gen=gen,
        log=log,
    )
    finetune(model, data, args.finetune_epochs, args.lr / 4, args.batch_size, gen, log)
    gated_acc, gated_logits = evaluate(model, data.x_test, data.y_test)
    usage = budget.usage()
    log("")
    log(budget.report())

    # 4. export, check it computes what the gated model computes, save and load it back
    small = tg.export(model).eval()
    pruned_acc, pruned_logits = evaluate(small, data.x_test, data.y_test)
    torch.testing.assert_close(pruned_logits, gated_logits, rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits_pruned.pt")
        tg.save(small, path)
        loaded = tg.load(path, DigitsCNN()).eval()
    _, loaded_logits = evaluate(loaded, data.x_test, data.y_test)
    torch.testing.assert_close(loaded_logits, pruned_logits, rtol=0, atol=0)
    log("export: outputs equal the gated model's (assert_close); tg.save / tg.load round-trip exact")

    # 5. CPU latency of the dense and the exported model
    log("measuring latencies ...")
    x_batch = data.x_test.repeat(math.ceil(args.latency_batch / len(data.y_test)), 1, 1, 1)[: args.latency_batch]
    rounds = 1 if args.quick else 3
    latencies = {}
    for threads in dict.fromkeys((args.threads, 1)):
        for x in (x_batch.contiguous(), data.x_test[:1].contiguous()):
            lat = latency({"dense": dense, "pruned": small}, x, threads, args.latency_time, rounds)
            latencies[threads, len(x)] = (lat["dense"], lat["pruned"])

    return Result(
        seed=args.seed,
        target=args.target,
        dense_acc=dense_acc,
        gated_acc=gated_acc,
        pruned_acc=pruned_acc,
        flops_ratio=usage.flops / usage.full_flops,
        dense_flops=usage.full_flops,
        pruned_flops=usage.flops,
        dense_params=count_params(dense),
        pruned_params=count_params(small),
        kept_channels={info.key: (bank.gates[info.key].num_open(), info.size) for info in bank.groups},
        latencies=latencies,
        seconds=time.perf_counter() - start,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
