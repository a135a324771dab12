"""The 33-model zoo, each model in a fresh Python process: attach, close half, export, compare.

    python bench/zoo_check.py               # every model; writes bench/results/cpu/zoo_check.{csv,md}
    python bench/zoo_check.py gpt2 albert   # some of them, printed only
    python bench/zoo_check.py --write bert  # some of them, merged into the written results
    python bench/zoo_check.py --one gpt2    # one model in this process, one JSON line (what the others run)

For each model of ``tests/prune_zoo.zoo()`` (timm at 224 x 224, small transformers configurations
with the library's defaults, the paper's task families, LSTM / GRU models), a new interpreter builds
it with random weights, runs ``attach_gates(model, example_inputs)`` with its defaults (timed:
the first call in the process, so it includes torch.export's warm-up), closes a random half of
every group, exports, and compares the exported model's outputs with the gated model's in float64
(largest absolute difference over the largest absolute output, over every output tensor). It
records the groups gated, the share of FLOPs the gates control, the exported/original MACs
(``FlopCounterMode`` with the math attention backend; on CPU it counts nothing inside ``nn.LSTM``,
so ``budget_ratio``, the package's own count, is the one to read there) and whether the exported
model holds only the model's own classes and ``torch.nn`` modules. A fresh process per model means
no state (caches, registered rules, compiled graphs) carries from one model to the next.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FIELDS = (
    "model", "groups", "coverage", "outputs", "macs_ratio", "budget_ratio", "export_rel_err", "exact", "plain",
    "attach_s", "total_s", "error",
)  # fmt: skip
EXACT = 1e-6  # float64: the exported model computes what the gated model computes up to reassociation


def _leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):  # a Hugging Face ModelOutput
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []


def _macs(model: torch.nn.Module, args: tuple, kwargs: dict) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return float(counter.get_total_flops())


def check_here(name: str) -> dict:
    """Run the check on model ``name`` in this process; the row of the table."""
    import tg_kernels as tg
    from tests.helpers import close_random_half
    from tests.prune_zoo import zoo

    start = time.perf_counter()
    torch.manual_seed(0)
    build, args, kwargs = zoo()[name]
    model = build().eval()
    full_macs = _macs(model, args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what stays whole is in bank.skipped
        t0 = time.perf_counter()
        model, bank = tg.attach_gates(model, args, example_kwargs=kwargs)
        attach_s = time.perf_counter() - t0
    coverage = bank.analysis.coverage if bank.analysis is not None else 0.0
    budget = tg.Budget(model, target=1.0)  # usage only
    close_random_half(bank)
    model.double()
    dargs = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export names attention it keeps
        expected = _leaves(model(*dargs, **kwargs))
        exported = tg.export(model)
        actual = _leaves(exported(*dargs, **kwargs))
    if len(actual) != len(expected):
        raise AssertionError(f"the exported model returns {len(actual)} tensors, the gated one {len(expected)}")
    compared = [(e, a) for e, a in zip(expected, actual, strict=True) if e.is_floating_point()]
    if not compared:
        raise AssertionError("the model returns no floating-point tensor to compare")
    err = max(float((a - e).abs().max() / e.abs().max().clamp_min(1e-30)) for e, a in compared)
    exported.float()
    usage = budget.usage()
    return {
        "model": name,
        "groups": len(bank.groups),
        "coverage": round(coverage, 3),
        "macs_ratio": round(_macs(exported, args, kwargs) / full_macs, 3),
        "budget_ratio": round(usage.flops / usage.full_flops, 3),
        "outputs": len(compared),
        "export_rel_err": f"{err:.1e}",
        "exact": err <= EXACT,
        "plain": not any(type(m).__module__.startswith("tg_kernels") for m in exported.modules()),
        "attach_s": round(attach_s, 2),
        "total_s": round(time.perf_counter() - start, 1),
        "error": "",
    }


def check_in_fresh_process(name: str, timeout: float = 600.0) -> dict:
    """Run :func:`check_here` for ``name`` in a new interpreter; a crash becomes the row's ``error``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"model": name, "groups": 0, "exact": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "groups": 0, "exact": False, "error": tail[:300]}
    return json.loads(lines[-1])


def markdown(rows: list[dict]) -> str:
    """The zoo table of docs/checks.md (rows as check_here returns them, or as read back from the CSV)."""
    head = "| model | groups | FLOPs gated | MACs ratio | Budget ratio | export rel. err | plain | attach (s) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | FAILED: {r['error']} | | | | | | |")
            continue
        coverage, macs, budget, attach = (float(r[k]) for k in ("coverage", "macs_ratio", "budget_ratio", "attach_s"))
        plain = "yes" if str(r["plain"]) == "True" else "no"  # (a bool, or its text read back from the CSV)
        lines.append(
            f"| {r['model']} | {r['groups']} | {coverage:.0%} | {macs:.2f} | {budget:.2f} "
            f"| {r['export_rel_err']} | {plain} | {attach:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models to check (default: all, and write the results)")
    parser.add_argument("--one", metavar="NAME", help="check one model in this process and print its JSON row")
    parser.add_argument("--write", action="store_true", help="with names: merge their rows into the results")
    opts = parser.parse_args()
    if opts.one:
        print(json.dumps(check_here(opts.one)), flush=True)
        return
    from tests.prune_zoo import zoo

    available = list(zoo())
    unknown = [n for n in opts.names if n not in available]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {available}")
    rows = []
    for name in opts.names or available:
        rows.append(check_in_fresh_process(name))
        r = rows[-1]
        status = r["error"] or f"{r['groups']} groups, MACs {r['macs_ratio']}, err {r['export_rel_err']}"
        print(f"{name:32s} {status}", flush=True)
        if opts.write or not opts.names:
            write_results(rows, available)  # after every model: a long run keeps what it has done
    failed = [r["model"] for r in rows if r.get("error") or not r["groups"] or not r["exact"]]
    if failed:
        sys.exit(f"not gated or not exact: {failed}")


def write_results(rows: list[dict], order: list[str]) -> None:
    """Merge ``rows`` into bench/results/cpu/zoo_check.csv (by model) and rewrite the markdown table."""
    out = REPO / "bench" / "results" / "cpu"
    out.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict] = {}
    if (out / "zoo_check.csv").exists():
        with open(out / "zoo_check.csv", newline="") as f:
            merged = {r["model"]: r for r in csv.DictReader(f)}
    merged.update({r["model"]: {k: r.get(k, "") for k in FIELDS} for r in rows})
    ordered = [merged[n] for n in order if n in merged]
    with open(out / "zoo_check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(ordered)
    (out / "zoo_check.md").write_text(markdown(ordered))


if __name__ == "__main__":
    main()
