"""Smoke test of examples/prune_digits.py: the whole workflow (train, gate, budget, export, save/load), quick."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prune_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("prune_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_prune_digits_quick(capsys, tmp_path):
    example = load_example()
    # main() itself asserts that the exported model computes what the gated one does and that
    # tg.save / tg.load round-trips exactly; here we check the figures it returns and prints.
    png = tmp_path / "digits.png"
    result = example.main(["--quick", "--quiet", "--seed", "0", "--plot", str(png)])

    assert abs(result.flops_ratio / 0.5 - 1) <= 0.02 + 1e-9, result.flops_ratio  # --quick's tolerance
    assert result.pruned_flops < result.dense_flops
    assert result.pruned_params < result.dense_params
    assert sum(kept for kept, _ in result.kept_channels.values()) < sum(n for _, n in result.kept_channels.values())
    assert result.dense_acc > 0.9, result.dense_acc
    assert result.pruned_acc > 0.9, result.pruned_acc
    assert result.pruned_acc == result.gated_acc  # the exported model predicts what the gated one does
    assert result.latencies
    for dense, pruned in result.latencies.values():
        assert math.isfinite(dense) and dense > 0
        assert math.isfinite(pruned) and pruned > 0

    assert all(n >= 1 for n, _ in result.kept_channels.values())  # the per-group minimum
    phases = [row["phase"] for row in result.history]
    assert phases[0] == "start" and "gates" in phases and phases[-1] == "tune"
    assert all(0 < row["ratio"] <= 1 and 0 <= row["metric"] <= 1 for row in result.history)
    assert result.prune_seconds > 0 and result.none_seconds is None

    out = capsys.readouterr().out
    assert "test accuracy" in out and "FLOPs / image" in out and "CPU latency" in out
    assert "pruning run" in out
    assert result.plot == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--target", "1.5"], ["--widths", "16,32"], ["--widths", "a,b,c"]])
def test_prune_digits_rejects_bad_arguments(argv):
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(argv)


def test_prune_digits_narrow_widths_parse():
    example = load_example()
    assert example.parse_args(["--widths", "16,32,32"]).widths == (16, 32, 32)
