"""Does the budget reach its target, and how accurate is the result? Digits, against Torch-Pruning.

For each network width, seed and FLOPs target: train the dense digits CNN of
``examples/prune_digits.py`` (cached per width and seed), prune it with ``tg_kernels.prune`` at its
default settings, and count the exported model's FLOPs independently (forward hooks on Conv2d and
Linear: ``2 * outputs * kernel * in_channels / groups``; ``2 * outputs * in_features``). With
``--torch-pruning``, also prune the same dense model with Torch-Pruning's L2 magnitude pruning
(``MagnitudePruner`` with ``GroupMagnitudeImportance(p=2)``, the same ratio for every layer, the head
kept) to the FLOPs the gates reached (the pruning ratio is bisected on that independent count, and the
smallest model with at least the gates' FLOPs is kept), then
fine-tune it for as many epochs as the gated model trained after the dense phase (search + fine-tune),
with the same optimiser and learning rate.

One JSON line per run goes to ``--out`` (appended), and a table is printed at the end. Runs use one
CPU thread each (``torch.set_num_threads(1)``); the digits batches are small.

    python bench/digits_budget.py --widths 64,128,128 16,32,32 --targets 0.5 0.25 0.125 --seeds 0 1 2 \
        --torch-pruning --out bench/results/digits/runs.jsonl
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tg_kernels as tg  # noqa: E402
from bench.flops import conv_linear_flops  # noqa: E402


def load_example():
    spec = importlib.util.spec_from_file_location("prune_digits", ROOT / "examples" / "prune_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = load_example()


def dense_model(widths: tuple[int, int, int], seed: int, data, epochs: int, cache: Path, log) -> nn.Module:
    path = cache / f"dense_{'-'.join(map(str, widths))}_seed{seed}_e{epochs}.pt"
    model = ex.DigitsCNN(widths)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    torch.manual_seed(seed)
    model = ex.DigitsCNN(widths)
    gen = torch.Generator().manual_seed(seed)
    ex.train(model, list(model.parameters()), data, epochs, 2e-3, 64, gen, log, "dense")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def finetune_plain(model: nn.Module, data, epochs: int, lr: float, seed: int) -> None:
    """AdamW with a cosine schedule, the task loss alone (what tg.prune's fine-tuning does)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(data.y_train) / 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: ex.cosine(s, steps))
    model.train()
    for _ in range(epochs):
        for xb, yb in ex.batches(data, 64, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def torch_pruning_to(
    dense: nn.Module, flops: float, x: torch.Tensor, closest_too: bool = False
) -> tuple[nn.Module, float] | tuple[tuple[nn.Module, float], tuple[nn.Module, float]]:
    """Torch-Pruning L2 magnitude pruning (uniform ratio, head kept) to the given FLOPs (bisected).

    Returns the smallest model the bisection saw with at least ``flops`` (so that Torch-Pruning never
    has fewer FLOPs than the gates: uniform ratios move in coarse steps on narrow layers), or the
    closest one if none reaches it, with its FLOPs ratio; with ``closest_too``, also the model whose
    FLOPs are closest to ``flops`` (the same model where they coincide)."""
    import torch_pruning as tp

    full = conv_linear_flops(dense, x)

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense)
        pruner = tp.pruner.MagnitudePruner(
            model,
            x,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[model.head],
        )
        pruner.step()
        return model

    lo, hi = 0.0, 0.99
    closest = (math.inf, None, 0.0)
    above = (math.inf, None, 0.0)
    for _ in range(14):
        mid = (lo + hi) / 2
        model = pruned(mid)
        f = conv_linear_flops(model, x)
        if abs(f - flops) < closest[0]:
            closest = (abs(f - flops), model, f)
        if flops * (1 - 1e-9) <= f < above[0]:
            above = (f, model, f)
        if f > flops:
            lo = mid
        else:
            hi = mid
    best = above if above[1] is not None else closest
    if closest_too:
        return (best[1], best[2] / full), (closest[1], closest[2] / full)
    return best[1], best[2] / full


def run_one(widths, seed, target, args, data, log) -> dict:
    x1 = data.x_test[:1]
    dense = dense_model(widths, seed, data, args.dense_epochs, Path(args.cache), log)
    dense_acc, _ = ex.evaluate(dense, data.x_test, data.y_test)
    full = conv_linear_flops(dense, x1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    result = tg.prune(
        copy.deepcopy(dense),
        lambda: ex.batches(data, 64, gen),
        target=target,
        example_inputs=x1,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    small = result.model.eval()
    acc, _ = ex.evaluate(small, data.x_test, data.y_test)
    reached = conv_linear_flops(small, x1) / full
    gated_acc, _ = ex.evaluate(result.gated, data.x_test, data.y_test)
    gate_epochs = sum(1 for row in result.history if row["phase"] == "gates")
    tune_epochs = sum(1 for row in result.history if row["phase"] == "tune")
    row = {
        "widths": list(widths),
        "seed": seed,
        "target": target,
        "dense_acc": dense_acc,
        "tg_acc": acc,
        "tg_gated_acc": gated_acc,
        "tg_ratio_budget": result.status.ratio,
        "tg_ratio_counted": reached,
        "tg_ratio_search_end": [r["ratio"] for r in result.history if r["phase"] == "gates"][-1],  # before settle
        "tg_rel_error": reached / target - 1,
        "tg_kept": {k: v[0] for k, v in result.status.kept.items()},
        "tg_at_min": list(result.status.at_minimum),
        "tg_gate_epochs": gate_epochs,
        "tg_tune_epochs": tune_epochs,
        "tg_gate_steps": result.gate_steps,
        "tg_settled_flips": result.settled_flips,
        "tg_final_weight": result.status.weight,
        "tg_seconds": seconds,
    }
    if args.torch_pruning:
        torch.manual_seed(seed)
        (model, tp_ratio), (near, near_ratio) = torch_pruning_to(dense, reached * full, x1, closest_too=True)
        epochs = gate_epochs + tune_epochs
        finetune_plain(model, data, epochs, 5e-4, seed)
        tp_acc, _ = ex.evaluate(model, data.x_test, data.y_test)
        row.update({"tp_acc": tp_acc, "tp_ratio_counted": tp_ratio, "tp_finetune_epochs": epochs})
        if near is not model:  # the closest count lies below the gates' FLOPs: that one too, for the record
            finetune_plain(near, data, epochs, 5e-4, seed)
            near_acc = ex.evaluate(near, data.x_test, data.y_test)[0]
        else:
            near_acc = tp_acc
        row.update({"tp_closest_acc": near_acc, "tp_closest_ratio_counted": near_ratio})
    return row


def table(rows: list[dict]) -> str:
    lines = [
        f"{'widths':<12}{'target':>7}{'seeds':>6}{'reached (each seed)':>30}{'max |err|':>10}"
        f"{'tg acc':>8}{'TP acc':>8}{'dense':>8}"
    ]
    keys = sorted({(tuple(r["widths"]), r["target"]) for r in rows}, key=lambda k: (-k[0][0], -k[1]))
    for widths, target in keys:
        rs = [r for r in rows if tuple(r["widths"]) == widths and r["target"] == target]
        reached = " ".join(f"{r['tg_ratio_counted']:.4f}" for r in rs)
        err = max(abs(r["tg_rel_error"]) for r in rs)
        tg_acc = statistics.mean(r["tg_acc"] for r in rs)
        tp = [r["tp_acc"] for r in rs if "tp_acc" in r]
        tp_acc = f"{statistics.mean(tp):.4f}" if tp else "-"
        dense = statistics.mean(r["dense_acc"] for r in rs)
        lines.append(
            f"{'/'.join(map(str, widths)):<12}{target:>7.3f}{len(rs):>6}{reached:>30}{err:>9.2%}"
            f"{tg_acc:>8.4f}{tp_acc:>8}{dense:>8.4f}"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The table of :func:`table` in Markdown: accuracies as the mean over seeds, then each seed's."""
    lines = [
        "| widths | FLOPs target | reached (each seed) | max rel. error | gates acc.: mean (each seed) "
        "| Torch-Pruning L2 acc.: mean (each seed) | TP FLOPs ratio (each seed) | gates - TP (pts) | dense acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(tuple(r["widths"]), r["target"]) for r in rows}, key=lambda k: (-k[0][0], -k[1]))

    def stat(values):
        return f"{statistics.mean(values):.4f} ({', '.join(f'{v:.4f}' for v in values)})" if values else "-"

    for widths, target in keys:
        rs = sorted(
            (r for r in rows if tuple(r["widths"]) == widths and r["target"] == target), key=lambda r: r["seed"]
        )
        reached = ", ".join(f"{r['tg_ratio_counted']:.4f}" for r in rs)
        err = max(abs(r["tg_rel_error"]) for r in rs)
        tg_acc = [r["tg_acc"] for r in rs]
        tp_acc = [r["tp_acc"] for r in rs if "tp_acc" in r]
        # rounded first, so that a tie (the same number of test images right) reads +0.00
        tp_ratio = ", ".join(f"{r['tp_ratio_counted']:.4f}" for r in rs if "tp_acc" in r)
        diff = f"{round((statistics.mean(tg_acc) - statistics.mean(tp_acc)) * 100, 4) + 0.0:+.2f}" if tp_acc else "-"
        lines.append(
            f"| {'/'.join(map(str, widths))} | {target:g} | {reached} | {err:.2%} | {stat(tg_acc)} "
            f"| {stat(tp_acc)} | {tp_ratio or '-'} "
            f"| {diff} | {statistics.mean(r['dense_acc'] for r in rs):.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", nargs="+", default=["64,128,128", "16,32,32"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25, 0.125])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dense-epochs", type=int, default=20)
    p.add_argument("--torch-pruning", action="store_true", help="also run Torch-Pruning's L2 pruning")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tg_digits_cache"))
    p.add_argument("--out", default=None, help="append one JSON line per run here")
    p.add_argument("--table-only", action="store_true", help="print the table of the runs in --out and exit")
    p.add_argument("--markdown", action="store_true", help="with --table-only: a Markdown table")
    args = p.parse_args(argv)
    if args.table_only:
        with open(args.out) as f:
            rows = [json.loads(line) for line in f]
        print(markdown(rows) if args.markdown else table(rows))
        return
    torch.set_num_threads(1)
    data = ex.load_data()
    rows = []
    for spec in args.widths:
        widths = tuple(int(w) for w in spec.split(","))
        for seed in args.seeds:
            for target in args.targets:
                row = run_one(widths, seed, target, args, data, lambda *a: None)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
