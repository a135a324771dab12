"""The zoo check of bench/zoo_check.py on a few models, each in a fresh Python process.

The whole zoo (33 models, about 10 minutes here) runs with ``python bench/zoo_check.py``; CI runs
two fixed models and three that rotate with TG_MATRIX_ROTATION (default: the day number), so
successive runs go through the zoo. Each must be gated, and its export exact in float64.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from prune_zoo import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.zoo_check import EXACT, check_in_fresh_process, markdown  # noqa: E402

_ROTATION = int(os.environ.get("TG_MATRIX_ROTATION", time.time() // 86400))
_NAMES = list(zoo())
FIXED = ["albert", "lstm_classifier"]  # one layer module called for every layer; h_n read by the head
ROTATING = [n for n in (_NAMES[(_ROTATION * 3 + i) % len(_NAMES)] for i in range(3)) if n not in FIXED]


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXED + ROTATING)
def test_zoo_model_in_a_fresh_process(name):
    row = check_in_fresh_process(name, timeout=400)
    assert not row["error"], row["error"]
    assert row["groups"] > 0, f"{name} gates nothing"
    assert row["exact"] and float(row["export_rel_err"]) <= EXACT, row
    assert 0 < row["macs_ratio"] < 1 and 0 < row["budget_ratio"] < 1, row
    assert name in markdown([row])


def test_a_crash_in_the_child_becomes_the_rows_error():
    row = check_in_fresh_process("no_such_model", timeout=120)
    assert row["groups"] == 0 and not row["exact"] and "KeyError" in row["error"], row
