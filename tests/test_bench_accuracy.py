"""bench/accuracy.py: the independent FLOPs count, the clean skip without Fashion-MNIST, the report."""

from __future__ import annotations

import json

import pytest
import torch

from bench import accuracy as A
from bench.flops import conv_linear_flops


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """A.main sets torch's thread count for its runs: later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("build", [A.DigitsCNN, A.ResNet20, A.MobileNetV2Small])
def test_flop_counter_agrees_with_the_hook_count(build):
    model = build()
    x = torch.randn(1, 1, 8, 8) if build is A.DigitsCNN else torch.randn(1, 1, 14, 14)
    assert A.count_flops(model, x) == pytest.approx(conv_linear_flops(model, x), rel=1e-9)


def test_fashion_mnist_missing_skips_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(A, "FMNIST_DIR", tmp_path)
    with pytest.raises(A.Skip, match="dataset-fashion-mnist"):
        A.load_fmnist(100, 100)
    assert A.main(["--settings", "fmnist-resnet20", "--seeds", "0", "--out", str(tmp_path / "runs.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "skipping fmnist-resnet20" in out and "Fashion-MNIST not found" in out
    assert not (tmp_path / "runs.jsonl").exists()


def test_digits_splits_are_disjoint_and_sized():
    d = A.load_digits(0.5)
    assert len(d.y_train) + len(d.y_val) == 898 and len(d.y_test) == 899
    assert len(d.y_val) == 180  # 20% of the training split is held out for choosing defaults


def test_report_and_plot_from_rows(tmp_path):
    rows = []
    for seed in (0, 1):
        for method, acc in (("tg", 0.9), ("tp-l2", 0.8)):
            rows.append({"setting": "digits-b", "seed": seed, "target": 0.25, "method": method, "val": acc,
                         "test": acc + 0.01 * seed, "dense_val": 0.95, "dense_test": 0.96, "flops_ratio": 0.25,
                         "rel_error": 0.0, "widths": [4, 8, 8], "seconds": 1.0})
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    table = A.report(rows, "test")
    assert "| digits-b | 0.25 |" in table and "90.50 +- 0.71" in table
    assert A.main(["--report", str(path)]) == 0
