"""bench/run.py end to end on a tiny run, and its output schema."""

import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import run  # noqa: E402
from bench.common import Row, quantiles  # noqa: E402


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
