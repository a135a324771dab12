"""Loading of the compiled extension `tg_kernels._C`, with a pure-PyTorch fallback.

`import tg_kernels` never fails because of the extension: when it is missing, broken, or built for
another torch, one warning says why and the `torch` backend keeps working.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")

_module: ModuleType | None = None
_load_error: str | None = None
_build_info: dict[str, Any] = {}


def _read_build_info() -> dict[str, Any]:
    try:
        return json.loads(_BUILD_INFO_PATH.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable {_BUILD_INFO_PATH.name}: {exc}"}


def _load() -> None:
    """Import `tg_kernels._C` once; on failure record why and warn once."""
    global _module, _load_error, _build_info
    _build_info = _read_build_info()
    if os.environ.get("TG_KERNELS_DISABLE_EXTENSION") == "1":
        _load_error = "disabled by TG_KERNELS_DISABLE_EXTENSION=1"
        return
    built_for = _build_info.get("torch_version")
    if built_for is not None and built_for != torch.__version__:
        _load_error = (
            f"the extension was built for torch {built_for} but torch {torch.__version__} is installed; "
            "rebuild with `pip install --no-build-isolation .`"
        )
    else:
        # Only a library beside this file counts (an editable install's finder can offer another copy).
        spec = importlib.util.find_spec("tg_kernels._C")
        if spec is None or spec.origin is None or Path(spec.origin).parent != Path(__file__).parent:
            _load_error = "the extension tg_kernels._C is not built (install with `pip install --no-build-isolation .`)"
        else:
            try:
                _module = importlib.import_module("tg_kernels._C")
            except (ImportError, OSError) as exc:
                _load_error = f"importing the extension failed: {exc}"
    if _load_error is not None:
        warnings.warn(
            f"tg_kernels: C++/CUDA kernels unavailable, using the pure-PyTorch backend: {_load_error}",
            RuntimeWarning,
            stacklevel=3,
        )


def extension() -> ModuleType | None:
    """The loaded extension module, or None."""
    return _module


def extension_error() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    return _load_error


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether `torch.ops.tg_kernels.<op_name>` has a kernel registered for `dispatch_key`."""
    if _module is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tg_kernels::{op_name}", dispatch_key)


def build_info() -> dict[str, Any]:
    """How the installed extension was built, and whether it loaded.

    Keys: ``version``, ``torch_version`` (built against), ``torch_cuda_version``, ``with_cuda``
    (whether CUDA kernels were compiled), ``cuda_arch_list``, ``git_revision``, plus
    ``extension_loaded``, ``extension_error`` and ``runtime_torch_version``.
    """
    info: dict[str, Any] = {
        "version": None,
        "torch_version": None,
        "torch_cuda_version": None,
        "with_cuda": False,
        "cuda_arch_list": None,
        "git_revision": None,
    }
    info.update(_build_info)
    if _module is not None:
        info["with_cuda"] = bool(getattr(_module, "WITH_CUDA", info["with_cuda"]))
    info["extension_loaded"] = _module is not None
    info["extension_error"] = _load_error
    info["runtime_torch_version"] = torch.__version__
    return info


_load()
