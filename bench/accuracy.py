"""Accuracy of pruned models at equal FLOPs and equal training: tg.prune against Torch-Pruning.

Settings (dataset x model):

- ``digits-a``: scikit-learn digits, 1347 train / 450 test (stratified, seed 0), the narrow
  16/32/32 CNN of ``examples/prune_digits.py``;
- ``digits-b``: the same CNN on a 898 train / 899 test split (stratified, seed 0);
- ``fmnist-resnet20``: Fashion-MNIST (the idx files of the Debian package ``dataset-fashion-mnist``
  under ``/usr/share/datasets/fashion-mnist``), images average-pooled to 14x14, a stratified training
  subset (``--fmnist-train``, default 2000 images), a CIFAR-style ResNet-20 (stages 16/32/64);
- ``fmnist-mbv2``: the same data, a MobileNetV2-style net (depthwise convs, inverted residuals);
- ``fmnist-full-cnn``: every Fashion-MNIST training image at 14x14 (55000 fit + 5000 validation, about
  860 optimizer steps an epoch against digits' 17), the digits CNN with a 3x3 head; dense for 4 epochs,
  then a 4-epoch pruning run (``gate_epochs=1, finetune_epochs=3``: the user's run length for a large
  dataset; every schedule knob of ``tg.prune`` stays at its default).

Every setting holds out a validation split from its training images (20% for digits,
``--fmnist-val`` images for Fashion-MNIST); models train on the rest. ``--split val`` evaluates on the
validation split only (what the defaults of ``tg.prune`` were chosen on; the test split is not even
evaluated); ``--split test`` reports both. The test split is only for reported figures.

For every setting, seed and FLOPs target: train the dense model (cached), then

- ``tg``: ``tg.prune`` at its defaults (or ``--tg-kwargs``);
- ``tp-l2`` / ``tp-taylor`` / ``tp-bn`` / ``random``: Torch-Pruning's ``MagnitudePruner`` with
  ``GroupMagnitudeImportance(p=2)``, ``GroupTaylorImportance`` (gradients of the task loss on a few
  training batches), ``BNScaleImportance`` or ``RandomImportance``: one pruning ratio for every layer,
  the classifier kept, the ratio bisected to the smallest FLOPs count at or above what ``tg`` reached;
  where integer widths leave that more than 1% above, single channels are pruned by the same criterion
  (lowest normalised score over the groups, among moves that stay within 1%), so that both run at equal
  FLOPs (within 1%, where a move can land there); then fine-tuned
  for as many optimizer steps as ``tg.prune`` took after the dense model (search + fine-tuning, the
  same batches), with ``tg.prune``'s fine-tuning optimiser (AdamW, lr 5e-4, cosine).

FLOPs are counted independently on the exported plain model with
``torch.utils.flop_counter.FlopCounterMode`` (2 x multiply-adds of convs and linears, one image).
Every run records its wall time. Runs use one CPU thread (``torch.set_num_threads(1)``).

    python bench/accuracy.py --settings digits-a digits-b fmnist-resnet20 fmnist-mbv2 \\
        --out bench/results/accuracy/runs.jsonl --split test
    python bench/accuracy.py --report bench/results/accuracy/runs.jsonl   # table + plots

When ``/usr/share/datasets/fashion-mnist`` is missing the Fashion-MNIST settings are skipped with a
message (the digits settings still run).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import statistics
import struct
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tg_kernels as tg  # noqa: E402
from bench.models import BasicBlock  # noqa: E402  (the CIFAR basic block, shared with the speed benchmark)

FMNIST_DIR = Path(os.environ.get("TG_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SETTINGS = ("digits-a", "digits-b", "fmnist-resnet20", "fmnist-mbv2", "fmnist-full-cnn")
METHODS = ("tg", "tp-l2", "tp-taylor", "tp-bn", "random")
TUNE_LR = 5e-4  # tg.prune's fine-tuning learning rate, used for every baseline's fine-tuning
BATCH = 64


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """The CNN of examples/prune_digits.py (copied so that the benchmark does not import the example)."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 32), num_classes: int = 10, size: int = 8) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, w1, 3, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w1, w2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1, bias=False),
            nn.BatchNorm2d(w3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(w3 * (size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class FashionCNN(DigitsCNN):
    """The digits CNN for 14x14 images (its head sees a 3x3 map)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes=num_classes, size=14)


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels) for 1-channel images."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style net for small grey images: stem, inverted residual blocks, 1x1 conv, head."""

    CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1))  # (expand, channels, blocks, stride)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        blocks, cin = [], 16
        for expand, cout, n, stride in self.CONFIG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(cin, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    description: str


class Skip(Exception):
    """A setting that cannot run here (its data is missing)."""


def _stratified(y: Tensor, n: int, seed: int, exclude: Tensor | None = None) -> Tensor:
    """Indices of ``n`` samples with (as nearly as possible) equal class shares, drawn with ``seed``."""
    from sklearn.model_selection import train_test_split

    pool = torch.arange(len(y))
    if exclude is not None:
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[exclude] = False
        pool = pool[keep]
    if n >= len(pool):
        return pool
    chosen, _ = train_test_split(pool.numpy(), train_size=n, random_state=seed, stratify=y[pool].numpy())
    return torch.as_tensor(chosen)


def load_digits(test_size: float, val_share: float = 0.2) -> Data:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_size, random_state=0, stratify=digits.target)
    n_train = len(idx_train)
    idx_fit, idx_val = train_test_split(
        idx_train, test_size=val_share, random_state=0, stratify=digits.target[idx_train]
    )
    fit, val, test = (torch.tensor(i) for i in (idx_fit, idx_val, idx_test))
    return Data(
        x[fit], y[fit], x[val], y[val], x[test], y[test],
        f"digits {n_train} train ({len(fit)} fit + {len(val)} validation) / {len(test)} test",
    )


def _read_idx(path: Path) -> Tensor:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    _, _, dtype, ndim = struct.unpack(">BBBB", raw[:4])
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def load_fmnist(n_train: int, n_val: int, size: int = 14) -> Data:
    files = {
        "xtr": "train-images-idx3-ubyte.gz",
        "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz",
        "yte": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (FMNIST_DIR / name).exists()]
    if missing:
        raise Skip(
            f"Fashion-MNIST not found ({FMNIST_DIR}/{missing[0]} is missing): install the Debian package "
            "dataset-fashion-mnist or set TG_FASHION_MNIST to a folder with the four idx .gz files"
        )
    t = {k: _read_idx(FMNIST_DIR / v) for k, v in files.items()}

    def images(raw: Tensor) -> Tensor:
        x = raw.float().unsqueeze(1) / 255.0
        if size != x.shape[-1]:
            x = F.adaptive_avg_pool2d(x, size)
        return (x - 0.286) / 0.353

    ytr = t["ytr"].long()
    fit = _stratified(ytr, n_train, seed=0)
    val = _stratified(ytr, n_val, seed=1, exclude=fit)
    xtr = images(t["xtr"])
    return Data(
        xtr[fit], ytr[fit], xtr[val], ytr[val], images(t["xte"]), t["yte"].long(),
        f"Fashion-MNIST {size}x{size}: {len(fit)} fit + {len(val)} validation images of the 60000, "
        f"{len(t['yte'])} test",
    )


def shift_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by -1, 0 or +1 pixels in each direction (zero fill)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, cols)


def batches(data: Data, generator: torch.Generator, batch_size: int = BATCH):
    order = torch.randperm(len(data.y_train), generator=generator)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2:
            continue
        yield shift_augment(data.x_train[idx], generator), data.y_train[idx]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    right = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was)
    return right / len(y)


def count_flops(model: nn.Module, x1: Tensor) -> float:
    """FLOPs of one forward (torch.utils.flop_counter: 2 x multiply-adds of convs and linears)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x1)
    finally:
        model.train(was)
    return float(counter.get_total_flops())


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------


@dataclass
class Setting:
    name: str
    data: Data
    build: type
    dense_epochs: int
    dense_lr: float
    run_kwargs: dict | None = None  # the pruning run's length (tg.prune's epochs) where not its defaults


def make_setting(name: str, args) -> Setting:
    if name == "digits-a":
        return Setting(name, load_digits(0.25), DigitsCNN, 20, 2e-3)
    if name == "digits-b":
        return Setting(name, load_digits(0.5), DigitsCNN, 20, 2e-3)
    if name == "fmnist-resnet20":
        return Setting(name, load_fmnist(args.fmnist_train, args.fmnist_val), ResNet20, args.fmnist_dense_epochs, 2e-3)
    if name == "fmnist-full-cnn":
        # every Fashion-MNIST training image: ~860 optimizer steps an epoch, against ~17 for digits
        return Setting(
            name, load_fmnist(60000 - args.fmnist_full_val, args.fmnist_full_val), FashionCNN,
            args.fmnist_full_dense_epochs, 2e-3, {"gate_epochs": 1, "finetune_epochs": 3},
        )
    if name == "fmnist-mbv2":
        return Setting(
            name, load_fmnist(args.fmnist_train, args.fmnist_val), MobileNetV2Small, args.fmnist_dense_epochs, 2e-3
        )
    raise ValueError(f"unknown setting {name!r}; expected one of {SETTINGS}")


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_steps(model: nn.Module, data: Data, steps: int, lr: float, seed: int) -> None:
    """AdamW (weight decay 1e-4) with a cosine schedule for ``steps`` optimizer steps of shuffled batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps))
    model.train()
    done = 0
    while done < steps:
        for xb, yb in batches(data, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break


def steps_per_epoch(data: Data) -> int:
    return sum(1 for start in range(0, len(data.y_train), BATCH) if len(data.y_train) - start >= 2)


def dense_model(setting: Setting, seed: int, cache: Path) -> tuple[nn.Module, float]:
    path = cache / f"{setting.name}_seed{seed}_e{setting.dense_epochs}_n{len(setting.data.y_train)}.pt"
    torch.manual_seed(seed)
    model = setting.build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, 0.0
    t0 = time.perf_counter()
    train_steps(model, setting.data, setting.dense_epochs * steps_per_epoch(setting.data), setting.dense_lr, seed)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, seconds


# --------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------


def run_tg(dense: nn.Module, setting: Setting, target: float, seed: int, kwargs: dict) -> tuple[nn.Module, dict]:
    data = setting.data
    x1 = data.x_train[:1]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tg.prune(
            copy.deepcopy(dense), lambda: batches(data, gen), target=target, example_inputs=x1, progress=False,
            **{**(setting.run_kwargs or {}), **kwargs},
        )
    steps = int(getattr(result, "steps", 0)) or (
        result.gate_steps + sum(1 for r in result.history if r["phase"] == "tune") * steps_per_epoch(data)
    )
    info = {
        "steps": steps,
        "gate_steps": result.gate_steps,
        "settled_flips": result.settled_flips,
        "kept": {k: v[0] for k, v in result.status.kept.items()},
        "budget_ratio": result.status.ratio,
    }
    return result.model, info


def _tp_importance(method: str):
    import torch_pruning as tp

    if method == "tp-l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if method == "tp-taylor":
        return tp.importance.GroupTaylorImportance()
    if method == "tp-bn":
        return tp.importance.BNScaleImportance()
    if method == "random":
        return tp.importance.RandomImportance()
    raise ValueError(method)


def _head(model: nn.Module) -> nn.Module:
    return model.head


def _bisect(build, count, flops: float, tol: float) -> list[tuple[float, nn.Module]]:
    """Every ``(FLOPs, model)`` a bisection of ``build(r)`` over ``r`` in [0, 0.99] (FLOPs falling as ``r``
    grows) tries on its way to ``flops``; it stops at a model within ``[flops, flops * (1 + tol)]``."""
    lo, hi = 0.0, 0.99
    tried = []
    for _ in range(14):
        mid = (lo + hi) / 2
        model = build(mid)
        f = count(model)
        tried.append((f, model))
        if flops <= f <= flops * (1 + tol):
            break
        if f > flops:
            lo = mid
        else:
            hi = mid
    return tried


def _equal_flops_choice(tried: list[tuple[float, nn.Module]], flops: float, tol: float) -> tuple[float, nn.Module]:
    """The model to compare at ``flops``: within ``tol`` and not below it if any, else within ``tol``, else the
    closest (Torch-Pruning is never given fewer FLOPs than it needs to match)."""

    def key(item: tuple[float, nn.Module]) -> tuple[bool, bool, float]:
        f = item[0]
        return (abs(f / flops - 1) > tol, f < flops, abs(f - flops))

    return min(tried, key=key)


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that keeps the parameters' ``.grad`` (Taylor importance reads them; Torch-Pruning prunes
    them along with the weights)."""
    clone = copy.deepcopy(model)
    for p, q in zip(model.parameters(), clone.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return clone


def _top_off(
    model: nn.Module, method: str, flops: float, count, x1: Tensor, tol: float
) -> list[tuple[float, nn.Module]]:
    """Prune single channels by the criterion until FLOPs are within ``tol`` of ``flops``.

    Each move takes, over every group, the channel the criterion ranks lowest (its normalised score, as in
    Torch-Pruning's global ranking) among the moves that keep FLOPs at or above ``flops * (1 - tol)``.
    Returns every model on the way. A uniform ratio leaves widths on a coarse grid (one first-conv channel of
    the digits CNN is 4% of its FLOPs); this lands the criterion's model at the compared FLOPs.
    """
    import torch_pruning as tp

    tried = []
    f = count(model)
    while f > flops * (1 + tol):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x1)
        importance = _tp_importance(method)
        moves = []
        for group in graph.get_all_groups(ignored_layers=[_head(model)], root_module_types=(nn.Conv2d, nn.Linear)):
            scores = importance(group)
            if scores is None or len(scores) < 2:
                continue
            root = group[0].dep.target.module
            moves.append((float(scores.min()), root, group[0].dep.handler, int(scores.argmin())))
        best = None
        names = {m: n for n, m in model.named_modules()}
        for _, root, handler, idx in sorted(moves, key=lambda m: m[0]):
            clone = _copy_with_grads(model)
            target = dict(clone.named_modules())[names[root]]
            graph_c = tp.DependencyGraph().build_dependency(clone, example_inputs=x1)
            graph_c.get_pruning_group(target, handler, idxs=[idx]).prune()
            fc = count(clone)
            if fc >= flops * (1 - tol):
                best = (fc, clone)
                break
        if best is None:
            break
        f, model = best
        tried.append(best)
    return tried


def tp_prune_to(
    dense: nn.Module, method: str, flops: float, setting: Setting, seed: int, tol: float = 0.01
) -> tuple[nn.Module, float]:
    """Torch-Pruning at ``flops`` (within ``tol``, not below where it can; the head kept): the model and its
    FLOPs ratio.

    First one pruning ratio for every layer (Torch-Pruning's usual use), bisected to the largest whose model
    keeps at least ``flops``; where integer widths leave that more than ``tol`` above, :func:`_top_off`
    prunes the rest channel by channel with the same criterion, so that both methods run at equal FLOPs.
    """
    import torch_pruning as tp

    x1 = setting.data.x_train[:1]
    start = copy.deepcopy(dense)
    if method == "tp-taylor":  # gradients of the task loss on a few training batches (summed)
        start.eval()  # BN statistics as in deployment; Taylor scores read the gradients only
        gen = torch.Generator().manual_seed(seed + 2000)
        start.zero_grad()
        for i, (xb, yb) in enumerate(batches(setting.data, gen)):
            F.cross_entropy(start(xb), yb).backward()
            if i == 7:
                break
        start.train()

    def pruned(ratio: float) -> nn.Module:
        model = _copy_with_grads(start)
        torch.manual_seed(seed)
        pruner = tp.pruner.MagnitudePruner(
            model, x1, importance=_tp_importance(method), pruning_ratio=ratio, ignored_layers=[_head(model)]
        )
        pruner.step()
        return model

    def count(model: nn.Module) -> float:
        return count_flops(model, x1)

    tried = _bisect(pruned, count, flops, tol)
    above = [(f, m) for f, m in tried if f >= flops]
    if above and not any(f <= flops * (1 + tol) for f, _ in above):
        torch.manual_seed(seed)
        tried += _top_off(min(above, key=lambda item: item[0])[1], method, flops, count, x1, tol)
    f, model = _equal_flops_choice(tried, flops, tol)
    model.zero_grad(set_to_none=True)
    return model, f / count(dense)


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def _read_rows(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def run_setting(setting: Setting, args, out: Path | None) -> list[dict]:
    """Every seed x target x method of ``setting``; one JSON line a run, appended to ``out`` as it ends.

    Runs already in ``out`` (same setting, seed, target, method, split and tag) are not run again, so an
    interrupted benchmark resumes. ``tg`` runs found in ``out`` or in ``--reuse-tg`` (same settings and
    ``tg.prune`` keywords, and the same dense model: its validation accuracy must match) give the
    FLOPs and optimizer steps the baselines are compared at, instead of running ``tg.prune`` again.
    """
    data = setting.data
    x1 = data.x_train[:1]
    rows = []
    tg_kwargs = json.loads(args.tg_kwargs) if args.tg_kwargs else {}
    done = _read_rows(out)
    reusable = done + _read_rows(Path(args.reuse_tg) if args.reuse_tg else None)
    for seed in args.seeds:
        dense, dense_seconds = dense_model(setting, seed, Path(args.cache))
        full = count_flops(dense, x1)
        base = {
            "setting": setting.name,
            "data": data.description,
            "seed": seed,
            "split": args.split,
            "dense_val": accuracy(dense, data.x_val, data.y_val),
            "dense_seconds": dense_seconds,
            "dense_flops": full,
            "dense_widths": widths(dense),
            "tag": args.tag,
        }
        if args.split == "test":
            base["dense_test"] = accuracy(dense, data.x_test, data.y_test)
        for target in args.targets:
            cell = {"setting": setting.name, "seed": seed, "target": target}
            todo = [m for m in args.methods if _find(done, **cell, method=m, split=args.split, tag=args.tag) is None]
            if not todo:
                continue
            earlier = _find(
                reusable, **cell, method="tg", tg_kwargs=tg_kwargs, dense_val=base["dense_val"], split=args.split
            )
            if earlier is not None:
                flops, steps = earlier["flops_ratio"] * full, earlier["steps"]
                if "tg" in todo:  # the same run, recorded again under this file and tag
                    row = {**earlier, "tag": args.tag, "reused": True}
                    rows.append(row)
                    _write(out, row, setting.name)
            else:
                t0 = time.perf_counter()
                small, info = run_tg(dense, setting, target, seed, tg_kwargs)
                flops, steps = count_flops(small, x1), info["steps"]
                if "tg" in todo:
                    row = _row(base, target, "tg", small, flops / full, time.perf_counter() - t0, data, args)
                    row.update(tg_kwargs=tg_kwargs, **info)
                    rows.append(row)
                    _write(out, row, setting.name)
            for method in todo:
                if method == "tg":
                    continue
                t0 = time.perf_counter()
                model, ratio = tp_prune_to(dense, method, flops, setting, seed)
                train_steps(model, data, steps, TUNE_LR, seed + 1000)
                row = _row(base, target, method, model, ratio, time.perf_counter() - t0, data, args)
                row.update(tg_kwargs=None, steps=steps)
                rows.append(row)
                _write(out, row, setting.name)
    return rows


def _row(base: dict, target: float, method: str, model: nn.Module, ratio: float, secs: float, data: Data, args) -> dict:
    row = {
        **base,
        "target": target,
        "method": method,
        "flops_ratio": ratio,
        "rel_error": ratio / target - 1,
        "widths": widths(model),
        "val": accuracy(model, data.x_val, data.y_val),
        "seconds": secs,
    }
    if args.split == "test":
        row["test"] = accuracy(model, data.x_test, data.y_test)
    return row


def _write(out: Path | None, row: dict, name: str) -> None:
    test = f" test {row['test']:.4f}" if "test" in row else ""
    print(
        f"{name} seed {row['seed']} target {row['target']} {row['method']:<9} ratio {row['flops_ratio']:.4f} "
        f"val {row['val']:.4f}{test} widths {row['widths']} {row['seconds']:.0f} s"
        + (" (reused)" if row.get("reused") else ""),
        flush=True,
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * 100
    s = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{m:.2f} +- {s:.2f}"


def report(rows: list[dict], split: str, tag: str | None = None) -> str:
    key = "test" if split == "test" else "val"
    rows = [r for r in rows if key in r and (tag is None or r.get("tag") == tag)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [
        f"accuracy ({key} split, %, mean +- std over seeds); FLOPs ratio counted on the exported model; wall s per run",
        "",
        "| setting | target | dense | " + " | ".join(methods)
        + " | tg FLOPs ratio (max rel. err) | tg kept widths (seed 0) | wall s: " + " / ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods) + "---|---|---|",
    ]
    for setting in SETTINGS:
        srows = [r for r in rows if r["setting"] == setting]
        for target in sorted({r["target"] for r in srows}, reverse=True):
            trows = [r for r in srows if r["target"] == target]
            dense = {r["seed"]: r.get(f"dense_{key}") for r in trows}
            cells = []
            for m in methods:
                cells.append(_mean_std([r[key] for r in trows if r["method"] == m]))
            tgr = [r for r in trows if r["method"] == "tg"]
            ratio = (
                f"{statistics.mean(r['flops_ratio'] for r in tgr):.4f} ({max(abs(r['rel_error']) for r in tgr):.2%})"
                if tgr else "-"
            )
            kept = next((r["widths"] for r in sorted(tgr, key=lambda r: r["seed"])), None)
            kept_s = "/".join(map(str, kept[:6])) + ("/..." if kept and len(kept) > 6 else "") if kept else "-"
            wall = " / ".join(
                f"{statistics.mean(secs):.0f}" if (secs := [r["seconds"] for r in trows if r["method"] == m]) else "-"
                for m in methods
            )
            lines.append(
                f"| {setting} | {target:g} | {_mean_std(list(dense.values()))} | " + " | ".join(cells)
                + f" | {ratio} | {kept_s} | {wall} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], split: str, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    key = "test" if split == "test" else "val"
    rows = [r for r in rows if key in r]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), squeeze=False)
    colours = {"tg": "tab:red", "tp-l2": "tab:blue", "tp-taylor": "tab:green", "tp-bn": "tab:purple",
               "random": "tab:grey"}
    for ax, setting in zip(axes[0], settings):
        srows = [r for r in rows if r["setting"] == setting]
        for m in METHODS:
            mrows = [r for r in srows if r["method"] == m]
            if not mrows:
                continue
            targets = sorted({r["target"] for r in mrows})
            xs = [statistics.mean(r["flops_ratio"] for r in mrows if r["target"] == t) for t in targets]
            ys = [statistics.mean(r[key] for r in mrows if r["target"] == t) * 100 for t in targets]
            es = [
                (statistics.stdev([r[key] for r in mrows if r["target"] == t]) * 100)
                if sum(1 for r in mrows if r["target"] == t) > 1 else 0.0
                for t in targets
            ]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, color=colours.get(m))
        dense = statistics.mean(r[f"dense_{key}"] for r in srows) * 100
        ax.axhline(dense, color="black", linestyle=":", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("FLOPs / dense (counted on the exported model)")
        ax.set_ylabel(f"{key} accuracy (%)")
        ax.set_title(setting, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25, 0.125])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["tg", "tp-l2", "tp-taylor", "random"], choices=METHODS)
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val: evaluate on the validation split only (for choosing defaults); test: report both")
    p.add_argument("--tg-kwargs", default="", help="JSON of tg.prune keyword arguments (default: its defaults)")
    p.add_argument("--tag", default=None, help="a label stored in every row")
    p.add_argument("--fmnist-train", type=int, default=2000, help="Fashion-MNIST training images (default 2000)")
    p.add_argument("--fmnist-val", type=int, default=1000, help="Fashion-MNIST validation images (default 1000)")
    p.add_argument("--fmnist-dense-epochs", type=int, default=15)
    p.add_argument("--fmnist-full-val", type=int, default=5000, help="validation images of fmnist-full-cnn")
    p.add_argument("--fmnist-full-dense-epochs", type=int, default=4)
    p.add_argument("--cache", default=str(ROOT / "bench" / "results" / "tmp" / "accuracy_cache"))
    p.add_argument("--out", default=None, help="append one JSON line per run here (runs already in it are skipped)")
    p.add_argument(
        "--reuse-tg", default=None, help="a JSONL of earlier runs whose tg rows (same dense model) are taken, not rerun"
    )
    p.add_argument("--report", default=None, help="print the table of the runs in this JSONL file, write plots, exit")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        split = "test" if any("test" in r for r in rows) else "val"
        print(report(rows, split, args.tag))
        path = plot(rows, split, Path(args.report).with_suffix(".png"))
        if path:
            print(f"plot: {path}")
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    for name in args.settings:
        try:
            setting = make_setting(name, args)
        except Skip as skip:
            print(f"skipping {name}: {skip}", flush=True)
            continue
        print(f"{name}: {setting.data.description}", flush=True)
        run_setting(setting, args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
