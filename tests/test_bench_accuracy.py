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


@pytest.mark.parametrize("method", ["tp-l2", "tp-taylor"])
def test_torch_pruning_runs_at_the_compared_flops(method):
    """One pruning ratio for every layer leaves the digits CNN 8% above a 0.125 target; the criterion's
    channel-by-channel top-off brings it within 1%, so that the methods are compared at equal FLOPs."""
    pytest.importorskip("torch_pruning")
    setting = A.Setting("digits-b", A.load_digits(0.5), A.DigitsCNN, 1, 1e-3)
    torch.manual_seed(0)
    dense = A.DigitsCNN()
    x1 = setting.data.x_train[:1]
    full = A.count_flops(dense, x1)
    model, ratio = A.tp_prune_to(dense, method, 0.125 * full, setting, seed=0)
    assert abs(ratio / 0.125 - 1) <= 0.01, (ratio, A.widths(model))
    assert A.count_flops(model, x1) / full == pytest.approx(ratio)
    assert all(p.grad is None for p in model.parameters())  # Taylor's gradients do not leak into fine-tuning


def test_equal_flops_choice_prefers_within_tolerance_and_not_below():
    a, b, c, d = (torch.nn.Identity() for _ in range(4))
    tried = [(1.05, a), (0.995, b), (1.008, c), (0.9, d)]
    assert A._equal_flops_choice(tried, 1.0, 0.01)[1] is c
    assert A._equal_flops_choice(tried[:2] + tried[3:], 1.0, 0.01)[1] is b
    assert A._equal_flops_choice([(1.05, a), (0.9, d)], 1.0, 0.01)[1] is a


def test_runs_resume_and_reuse_earlier_gate_runs(tmp_path, monkeypatch):
    """An interrupted benchmark resumes from its --out file, and --reuse-tg compares baselines against
    recorded tg runs (their FLOPs and steps) instead of running tg.prune again."""
    pytest.importorskip("torch_pruning")
    calls = []

    def fake_dense(setting, seed, cache):
        torch.manual_seed(seed)
        return setting.build(), 0.0

    def fake_tg(dense, setting, target, seed, kwargs):
        calls.append(target)
        model, _ = A.tp_prune_to(dense, "tp-l2", target * A.count_flops(dense, setting.data.x_train[:1]), setting, 0)
        return model, {"steps": 2, "gate_steps": 1, "settled_flips": 0, "kept": {}, "budget_ratio": target}

    monkeypatch.setattr(A, "dense_model", fake_dense)
    monkeypatch.setattr(A, "run_tg", fake_tg)
    first = tmp_path / "first.jsonl"
    argv = ["--settings", "digits-b", "--seeds", "0", "--targets", "0.5", "--methods", "tg", "tp-l2"]
    assert A.main([*argv, "--out", str(first)]) == 0
    rows = A._read_rows(first)
    assert [r["method"] for r in rows] == ["tg", "tp-l2"] and calls == [0.5]
    assert A.main([*argv, "--out", str(first)]) == 0  # everything is there: nothing runs, nothing is added
    assert len(A._read_rows(first)) == 2 and calls == [0.5]
    second = tmp_path / "second.jsonl"
    assert A.main([*argv, "--out", str(second), "--reuse-tg", str(first)]) == 0
    again = A._read_rows(second)
    assert calls == [0.5] and again[0]["reused"] and again[0]["flops_ratio"] == rows[0]["flops_ratio"]
    assert again[1]["method"] == "tp-l2" and again[1]["steps"] == 2
    assert abs(again[1]["flops_ratio"] / rows[0]["flops_ratio"] - 1) <= 0.01
