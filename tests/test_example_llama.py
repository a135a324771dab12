"""Smoke test of examples/prune_llama.py at toy sizes: every stage runs and the figures it writes hold together."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prune_llama.py"


def load_example():
    spec = importlib.util.spec_from_file_location("prune_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_prune_llama_toy_sizes(tmp_path):
    example = load_example()
    if example.load_corpus() is None:
        pytest.skip("the fortunes corpus is not installed (apt-get install fortunes)")
    toy = "--hidden 64 --intermediate 96 --layers 2 --heads 8 --kv-heads 2 --head-dim 8 --seq 32 --batch 4"
    steps = "--dense-steps 12 --prune-steps 16 --eval-windows 8 --threads 1"
    assert example.main([*toy.split(), *steps.split(), "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert abs(results["tg"]["ratio"] / 0.5 - 1) <= 0.01
    assert results["tg"]["ppl_reloaded"] == pytest.approx(results["tg"]["ppl"], rel=1e-5)  # from_pretrained
    assert results["tg"]["params_reloaded"] == results["tg"]["params"]
    if "skipped" not in results["torch_pruning"]:  # torch-pruning is a benchmark requirement only
        tp_row = results["torch_pruning"]
        # at least the gates' parameters (at toy sizes the library's steps of 8 channels are coarse)
        assert results["tg"]["params"] <= tp_row["params"] < 0.75 * results["dense"]["params"]
        assert tp_row["params_reloaded"] == tp_row["params"]
        assert tp_row["ppl_reloaded"] == pytest.approx(tp_row["ppl"], rel=1e-5)
    assert results["scratch"]["params"] == results["tg"]["params"]
    for name in ("dense", "tg", "tg_none", "torch_pruning", "scratch"):
        if "skipped" in results[name]:
            continue
        assert math.isfinite(results[name]["ppl"]) and 1 < results[name]["ppl"] < 256
    assert all(v > 0 for v in results["tokens_per_s"].values())
    assert (tmp_path / "steps.csv").read_text().count("\n") == 17
    assert (tmp_path / "throughput.png").stat().st_size > 0
    # a second seed of the gates and the Torch-Pruning baseline on the same dense model
    assert (
        example.main([*toy.split(), *steps.split(), "--out", str(tmp_path), "--reuse-dense", "--repeat-seeds", "1"])
        == 0
    )
    summary = json.loads((tmp_path / "results.json").read_text())["seeds_summary"]
    assert (
        summary["tg"]["seeds"] == 2
        and summary["tg"]["ppl_min"] <= summary["tg"]["ppl_mean"] <= summary["tg"]["ppl_max"]
    )


def test_missing_corpus_skips_cleanly(tmp_path):
    example = load_example()
    assert example.load_corpus(tmp_path) is None  # an empty folder: no corpus
