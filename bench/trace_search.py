"""Trace tg.prune's search on the VALIDATION split.

The traces in bench/results/accuracy/search_traces_fmnist-resnet20_val.md were written by it:

    python bench/trace_search.py fmnist-resnet20 0.5 0 '{"gain": 0, "balance": 0}' trace.jsonl

Arguments: setting, FLOPs target, seed, tg.prune keyword arguments as JSON (a "budget" entry is passed
on to tg.Budget, e.g. ``{"budget": {"protect_cost": "mean"}}``), output JSONL. Every 5 search steps
one row: goal, ratio, multiplier, open channels per group, marginal costs, and per group the mean and
mean-absolute task gradient and the budget gradient on its gates (the task gradient read after the
backward of the task loss alone, the budget gradient as the difference after the backward of the
budget term). Replaces tg_kernels.pruning.train._search with an instrumented copy of the same loop;
the dense model comes from (or goes to) bench/accuracy.py's cache. Run from the repository root.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.accuracy as A  # noqa: E402
import tg_kernels as tg  # noqa: E402
from tg_kernels.pruning import train as T  # noqa: E402

CACHE = Path("bench/results/tmp/accuracy_cache")


class Args:
    fmnist_train = 2000
    fmnist_val = 1000
    fmnist_dense_epochs = 15
    fmnist_full_val = 5000
    fmnist_full_dense_epochs = 4


def main() -> None:
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    name, target, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    kw, out = json.loads(sys.argv[4]), sys.argv[5]
    setting = A.make_setting(name, Args)
    dense, _ = A.dense_model(setting, seed, CACHE)
    with open(out, "w") as log:

        def write(row: dict) -> None:
            log.write(json.dumps(row) + "\n")
            log.flush()

        def search(model, budget, opt, stream, schedule, loss_fn, gate_lr, target, tol, record):
            model.train()
            step = 0
            bank = T.gate_bank(model)
            keys = list(bank.gates)
            params = [bank.gates[k].weight for k in keys]
            sizes = [bank.gates[k].num_channels for k in keys]
            write({"keys": keys, "sizes": sizes, "costs0": budget.marginal_costs(), "schedule": str(schedule)})
            for _, batch in stream:
                budget.set_goal(T._goal(target, step, schedule.anneal_steps))
                hold = schedule.search_steps - schedule.anneal_steps
                anneal = T._cosine(step - schedule.anneal_steps, hold) if step >= schedule.anneal_steps else 1.0
                opt.param_groups[1]["lr"] = gate_lr * max(anneal, 0.05)
                inputs, targets = T._split(batch)
                task = loss_fn(T._call(model, inputs), targets)
                opt.zero_grad(set_to_none=True)
                task.backward()
                tgrad = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
                budget().backward()
                if step % 5 == 0:
                    g = {}
                    for k, p, tv in zip(keys, params, tgrad):
                        bg = p.grad - tv
                        w = p.detach()
                        g[k] = {"t_mean": float(tv.mean()), "t_absmean": float(tv.abs().mean()), "b": float(bg.mean()),
                                "w_mean": float(w.mean()), "w_min": float(w.min()), "w_max": float(w.max())}
                    write({"step": step, "goal": budget.goal, "ratio": float(budget.ratio().detach()),
                           "lam": budget.current_weight(), "task": float(task), "costs": budget.marginal_costs(),
                           "open": [bank.gates[k].num_open() for k in keys], "g": g})
                opt.step()
                step += 1
                done = step >= schedule.search_steps and (
                    step >= schedule.max_search_steps or abs(float(budget.ratio().detach()) / target - 1) <= tol
                )
                if done:
                    break
            budget.set_goal(target)
            write({"search_done": step, "open": [bank.gates[k].num_open() for k in keys]})
            return step

        T._search = search
        budget_kwargs = kw.pop("budget", {})
        if budget_kwargs:
            plain = T.Budget
            T.Budget = lambda *a, **k: plain(*a, **{**k, **budget_kwargs})
        data = setting.data
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = tg.prune(
                copy.deepcopy(dense), lambda: A.batches(data, gen), target=target,
                example_inputs=data.x_train[:1], progress=False, log=lambda line: write({"line": line}), **kw,
            )
        x1 = data.x_train[:1]
        row = {
            "final": True, "kw": kw, "budget": budget_kwargs, "val": A.accuracy(result.model, data.x_val, data.y_val),
            "flops": A.count_flops(result.model, x1) / A.count_flops(dense, x1), "widths": A.widths(result.model),
            "settled": result.settled_flips, "kept": {k: v[0] for k, v in result.status.kept.items()},
            "seconds": time.time() - t0,
        }
        write(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
