"""bench/run.py end to end on a tiny run, and its output schema."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import run  # noqa: E402
from bench.common import Row, quantiles  # noqa: E402
from tg_kernels.pruning.train import DEFAULT_SIDE_PASS_EVERY  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["--quick", "--device", "cpu", "--cases", "channel_gate", "--out", str(out)]) == 0
    return out


def test_writes_csv_json_and_plot(quick_run):
    with open(quick_run / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == run.CSV_COLUMNS
        rows = list(reader)
    providers = {r["provider"] for r in rows}
    assert {"unfused", "copy", "torch"} <= providers
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["iqr_ms"]) >= 0
        assert float(r["active_fraction"]) == 1.0
        if r["provider"] != "copy":
            assert r["baseline"] == "unfused" and float(r["speedup"]) > 0
    unfused = [r for r in rows if r["provider"] == "unfused"]
    assert all(abs(float(r["speedup"]) - 1.0) < 1e-12 for r in unfused)
    meta = json.loads((quick_run / "results.json").read_text())
    for key in ("device", "torch", "triton", "tg_kernels", "timestamp", "timing", "wall_seconds"):
        assert key in meta["environment"]
    assert len(meta["rows"]) == len(rows)
    assert (quick_run / "channel_gate.png").stat().st_size > 1000


def test_compare_reads_a_previous_run(quick_run, capsys):
    previous = run.load_previous(quick_run)
    assert previous and all(v > 0 for v in previous.values())
    key = next(iter(previous))
    row = Row(key[0], key[1], key[2], key[3], key[4], previous[key] / 2, 0.0, 1)
    run.print_table(run.Console(width=200), [row], previous)
    assert "2.00x" in capsys.readouterr().out


def test_list_and_bad_family(capsys):
    assert run.main(["--list"]) == 0
    assert "channel_gate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run.main(["--cases", "nope"])


def test_quantiles():
    assert quantiles([3.0]) == (3.0, 0.0)
    median, iqr = quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert median == 3.0 and iqr == 2.0


def test_models_family_uses_attach_gates_and_export(monkeypatch):
    """Gated providers come from attach_gates, `ideal` is the exported model, checked against the gated one."""
    from bench import models

    tiny = [
        ("resnet8", lambda: models.ResNetCifar(8), (1, 3, 16, 16)),
        ("mlp", lambda: models.MLPBlock(16, 64), (32, 16)),
    ]
    monkeypatch.setattr(models, "_cases", lambda device, quick: tiny)

    def run_each_once(fns, device, rounds, min_run_time):  # the timing itself is tested with channel_gate
        for fn in fns.values():
            fn()
        return {name: (1.0 + i, 0.0) for i, name in enumerate(fns)}

    monkeypatch.setattr(models, "time_interleaved", run_each_once)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: 2 threads on a busy 2-core machine spin for ~0.4 s per forward
    try:
        _check_models_family(models, tiny)
    finally:
        torch.set_num_threads(threads)


def _check_models_family(models, tiny):
    import tg_kernels

    x = torch.randn(tiny[1][2])
    gated, bank = models._gated(tiny[1][1], x, "hard", 0.5)
    assert isinstance(gated.fc1, tg_kernels.GatedLinear) and gated.fc1.skip == "hard"
    assert bank.open_fraction() == 0.5
    exported = tg_kernels.export(gated)
    assert type(exported.fc1) is torch.nn.Linear and exported.fc1.out_features == 32
    x = torch.randn(tiny[0][2])
    resnet, bank = models._gated(tiny[0][1], x, "exact", 0.25)
    assert len(bank.gates) > 1
    assert all(g.num_open() == max(1, round(0.25 * g.num_channels)) for g in bank.gates.values())
    models._check_export(resnet, tg_kernels.export(resnet), x)
    frozen, bank = models._gated(tiny[0][1], x, "hard", 0.5)
    learning, learning_bank = models._gated(tiny[0][1], x, "hard_learning", 0.5)
    assert not any(p.requires_grad for p in bank.parameters())
    assert learning_bank.skip == "hard" and all(p.requires_grad for p in learning_bank.parameters())
    every, every_bank = models._gated(tiny[0][1], x, "search", 0.5)
    assert every_bank.skip == "exact" and every_bank.compact.side_pass_every == DEFAULT_SIDE_PASS_EVERY > 1

    rows = models.run_cases(torch.device("cpu"), quick=True)
    assert {(r.case, r.provider, r.mode) for r in rows} == {
        (f"{name}_{kind}", provider, mode)
        for name, _, _ in tiny
        for kind, pairs in (
            ("train", [("dense", "train"), ("ideal", "train")] + [("tg_kernels", m) for m in models.MODES]),
            ("eval", [("dense", "eval"), ("ideal", "eval"), ("tg_kernels", "eval")]),
        )
        for provider, mode in pairs
    }
    for r in rows:
        assert r.active_fraction == 0.5 and r.median_ms > 0 and r.baseline == "dense" and r.speedup > 0
        assert "vs_ideal" in r.flat()
        if r.provider == "ideal":
            assert r.extra["vs_ideal"] == 1.0
