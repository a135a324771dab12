"""Test setup. TRITON_INTERPRET must be decided before any Triton kernel is decorated, hence first.

Without a CUDA device the Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1).
With one, they run compiled on the GPU, and the Triton test modules (marked ``triton``) also count
as ``gpu`` tests, so ``pytest -m gpu`` on a GPU machine runs compiled Triton and the CUDA kernels.
A TRITON_INTERPRET the user set is kept either way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def interpreter_setting(environ: Mapping[str, str], cuda_available: bool) -> str | None:
    """The TRITON_INTERPRET value for this run: the user's own if set, else "1" only without a CUDA device."""
    if "TRITON_INTERPRET" in environ:
        return environ["TRITON_INTERPRET"]
    return None if cuda_available else "1"


_CUDA = torch.cuda.is_available()
_setting = interpreter_setting(os.environ, _CUDA)
if _setting is not None:
    os.environ["TRITON_INTERPRET"] = _setting

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config, items):
    compiled_triton = _CUDA and os.environ.get("TRITON_INTERPRET") != "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if compiled_triton and "triton" in item.keywords:
            item.add_marker(pytest.mark.gpu)  # compiled Triton on the GPU: part of `pytest -m gpu`
        elif not _CUDA and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
