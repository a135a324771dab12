"""Backend selection: which implementation (torch, cpp, cuda, triton) runs an op.

Automatic per tensor device: CUDA tensors use ``triton``, else ``cuda``, else ``torch``; CPU tensors
use ``cpp``, else ``torch``. Override with the environment variable ``TG_KERNELS_BACKEND`` or, with
priority, the context manager :func:`use_backend`; a backend forced around a forward also runs that
op's backward (:func:`restore_backend`), although autograd may run it on another thread. Under
``TRITON_INTERPRET=1`` the ``triton`` backend also runs CPU tensors (that is how Triton kernels are
tested without a GPU), but it is only used there when asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

from tg_kernels import _extension

BACKENDS = ("torch", "cpp", "cuda", "triton")
# Dtype sets that ops declare per backend (the second argument of resolve_backend's `implemented`).
HALF_AND_SINGLE = frozenset({torch.float16, torch.bfloat16, torch.float32})
ALL_FLOATS = HALF_AND_SINGLE | {torch.float64}
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tg_kernels_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (the message says why)."""


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend works in this process, and if not, why."""

    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def triton_interpret() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not break tg_kernels
        return f"importing triton failed: {exc}"
    return None


def _backend_info(name: str) -> BackendInfo:
    return _backend_info_cached(name, triton_interpret())


@functools.cache
def _backend_info_cached(name: str, interpret: bool) -> BackendInfo:
    """Availability never changes within a process except through TRITON_INTERPRET, hence the cache key."""
    if name == "torch":
        return BackendInfo(name, True, "pure PyTorch, runs everywhere")
    if name == "cpp":
        if not _extension.has_kernel("channel_gate_forward_kernel", "CPU"):
            return BackendInfo(name, False, _extension.extension_error() or "no CPU kernels registered")
        return BackendInfo(name, True, "C++ CPU kernels")
    if name == "cuda":
        if _extension.extension() is None:
            return BackendInfo(name, False, _extension.extension_error() or "extension not loaded")
        if not _extension.has_kernel("channel_gate_forward_kernel", "CUDA"):
            return BackendInfo(
                name, False, "the extension was built without CUDA kernels (TG_KERNELS_CUDA=0 or no toolkit)"
            )
        if not torch.cuda.is_available():
            return BackendInfo(name, False, "CUDA kernels are compiled but no CUDA device is visible")
        return BackendInfo(name, True, "C++/CUDA kernels")
    if name == "triton":
        error = _triton_import_error()
        if error is not None:
            return BackendInfo(name, False, error)
        if interpret:
            return BackendInfo(name, True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
        if not torch.cuda.is_available():
            return BackendInfo(name, False, "no CUDA device is visible (set TRITON_INTERPRET=1 to interpret on CPU)")
        return BackendInfo(name, True, "Triton kernels on CUDA")
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def available_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it works here and why (not)."""
    return {name: _backend_info(name) for name in BACKENDS}


def _supports_device(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and triton_interpret())


def _check_usable(name: str) -> None:
    info = _backend_info(name)
    if not info.available:
        raise BackendUnavailableError(f"tg_kernels backend {name!r} is unavailable: {info.reason}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run tg_kernels ops inside the block with backend `name` (overrides TG_KERNELS_BACKEND)."""
    _check_usable(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


@contextlib.contextmanager
def restore_backend(name: str | None) -> Iterator[None]:
    """Run the block with the backend a forward recorded (:func:`requested_backend` then), or none forced.

    Autograd runs the backward of CUDA tensors on a per-device worker thread, which does not see the
    caller's :func:`use_backend` (a ContextVar). Each op's autograd records the forced backend in its
    forward and restores it around its backward with this, so a forced backend holds in both. ``None``
    (nothing was forced) leaves the backward to automatic selection and TG_KERNELS_BACKEND.
    """
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` or TG_KERNELS_BACKEND, or None for automatic."""
    name = _override.get()
    if name is None:
        name = os.environ.get("TG_KERNELS_BACKEND") or None
    return name


def resolve_backend(op: str, device: torch.device, dtype: torch.dtype, implemented: dict[str, Collection]) -> str:
    """Pick the backend that runs `op` on tensors of `device` and `dtype`.

    `implemented` maps each backend that implements the op to the dtypes it supports. A forced
    backend that cannot run the call raises :class:`BackendUnavailableError` naming the reason;
    automatic selection falls through to the next candidate.
    """
    forced = requested_backend()
    if forced is not None:
        _check_usable(forced)
        if forced not in implemented:
            raise BackendUnavailableError(f"tg_kernels backend {forced!r} does not implement {op}")
        if not _supports_device(forced, device):
            raise BackendUnavailableError(f"tg_kernels backend {forced!r} cannot run {op} on {device.type} tensors")
        if dtype not in implemented[forced]:
            raise BackendUnavailableError(
                f"tg_kernels backend {forced!r} does not support {dtype} for {op}; "
                f"supported: {', '.join(str(d) for d in implemented[forced])}"
            )
        return forced
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if name in implemented and dtype in implemented[name] and _backend_info(name).available:
            return name
    return "torch"
