"""Trace tg.prune's search on the VALIDATION split (the traces in search_traces_fmnist-resnet20_val.md).

    python bench/results/accuracy/trace_search.py fmnist-resnet20 0.5 0 '{"gain": 0, "balance": 0}' trace.jsonl

Arguments: setting, FLOPs target, seed, tg.prune keyword arguments as JSON (a "budget" entry is passed
on to tg.Budget), output JSONL. Every 5 search steps one row: goal, ratio, multiplier, open channels
per group, marginal costs, and per group the mean and mean-absolute task gradient and the budget
gradient on its gates (task gradient read after backward of the task loss alone, budget gradient as
the difference after backward of the budget term). Replaces tg_kernels.pruning.train._search with an
instrumented copy of the same loop; the dense model comes from bench/accuracy.py's cache.
"""
import sys, json, time, copy, warnings, math
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[3]))
import torch
torch.set_num_threads(1)
import bench.accuracy as A
import tg_kernels as tg
from tg_kernels.pruning import train as T
from pathlib import Path
name, target, seed, kw, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
class Args: fmnist_train=2000; fmnist_val=1000; fmnist_dense_epochs=15
s = A.make_setting(name, Args)
dense, _ = A.dense_model(s, seed, Path('bench/results/tmp/accuracy_cache'))
log = open(out, 'w')
state = {}
orig_search = T._search
def _search(model, budget, opt, stream, schedule, loss_fn, gate_lr, target, tol, record):
    model.train(); step = 0
    bank = T.gate_bank(model)
    keys = list(bank.gates)
    params = [bank.gates[k].weight for k in keys]
    log.write(json.dumps({"keys": keys, "sizes": [bank.gates[k].num_channels for k in keys],
                          "costs0": budget.marginal_costs(), "schedule": str(schedule)}) + "\n")
    for epoch_now, batch in stream:
        budget.set_goal(T._goal(target, step, schedule.anneal_steps))
        hold = schedule.search_steps - schedule.anneal_steps
        anneal = T._cosine(step - schedule.anneal_steps, hold) if step >= schedule.anneal_steps else 1.0
        opt.param_groups[1]["lr"] = gate_lr * max(anneal, 0.05)
        inputs, targets = T._split(batch)
        output = T._call(model, inputs)
        task = loss_fn(output, targets)
        opt.zero_grad(set_to_none=True)
        task.backward()
        tgrad = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        b = budget()
        b.backward()
        if step % 5 == 0:
            row = {"step": step, "goal": budget.goal, "ratio": float(budget.ratio()), "lam": budget.current_weight(),
                   "task": float(task), "open": [bank.gates[k].num_open() for k in keys],
                   "costs": budget.marginal_costs()}
            g = {}
            for k, p, tgv in zip(keys, params, tgrad):
                bg = (p.grad - tgv)
                g[k] = {"t_mean": float(tgv.mean()), "t_absmean": float(tgv.abs().mean()),
                        "b": float(bg.mean()), "w_mean": float(p.detach().mean()), "w_min": float(p.detach().min()),
                        "w_max": float(p.detach().max())}
            row["g"] = g
            log.write(json.dumps(row) + "\n"); log.flush()
        opt.step(); step += 1
        if step >= schedule.search_steps:
            if step >= schedule.max_search_steps or abs(float(budget.ratio().detach()) / target - 1) <= tol:
                break
    budget.set_goal(target)
    log.write(json.dumps({"search_done": step, "open": [bank.gates[k].num_open() for k in keys]}) + "\n")
    return step
T._search = _search
bkw = kw.pop("budget", {})
if bkw:
    _B = T.Budget
    T.Budget = lambda *a, **k: _B(*a, **{**k, **bkw})
data = s.data
gen = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
t0 = time.time()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    r = tg.prune(copy.deepcopy(dense), lambda: A.batches(data, gen), target=target, example_inputs=data.x_train[:1],
                 progress=False, log=lambda l: log.write(json.dumps({"line": l}) + "\n"), **kw)
acc = A.accuracy(r.model, data.x_val, data.y_val)
flops = A.count_flops(r.model, data.x_train[:1]) / A.count_flops(dense, data.x_train[:1])
res = {"final": True, "kw": kw, "val": acc, "flops": flops, "widths": A.widths(r.model), "settled": r.settled_flips,
       "kept": {k: v[0] for k, v in r.status.kept.items()}, "seconds": time.time() - t0}
log.write(json.dumps(res) + "\n"); print(json.dumps(res), flush=True)
