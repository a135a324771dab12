"""Backend availability, automatic selection and overrides."""

import pytest
import torch

import tg_kernels
from tg_kernels import BackendUnavailableError, available_backends, use_backend
from tg_kernels.backends import BACKENDS, requested_backend, resolve_backend
from tg_kernels.ops.channel_gate import SUPPORTED_DTYPES


def test_every_backend_is_listed_with_a_reason():
    infos = available_backends()
    assert list(infos) == list(BACKENDS)
    assert infos["torch"].available
    for info in infos.values():
        assert info.reason
        assert info.name in str(info)


def test_unknown_backend_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match="expected one of torch, cpp, cuda, triton"), use_backend("tpu"):
        pass


def test_unavailable_backend_error_names_the_reason():
    unavailable = [name for name, info in available_backends().items() if not info.available]
    if not unavailable:
        pytest.skip("every backend is available here")
    name = unavailable[0]
    reason = available_backends()[name].reason
    with pytest.raises(BackendUnavailableError, match=reason.split("(")[0][:40]), use_backend(name):
        pass


def test_automatic_selection_on_cpu_prefers_cpp_then_torch():
    expected = "cpp" if available_backends()["cpp"].available else "torch"
    assert resolve_backend("channel_gate", torch.device("cpu"), torch.float32, SUPPORTED_DTYPES) == expected


def test_automatic_selection_never_picks_interpreted_triton_for_cpu_tensors():
    choice = resolve_backend(
        "channel_gate", torch.device("cpu"), torch.float16, {"torch": {torch.float16}, "triton": {torch.float16}}
    )
    assert choice == "torch"


def test_automatic_selection_skips_backends_without_the_dtype():
    implemented = {"torch": SUPPORTED_DTYPES["torch"], "cpp": {torch.float32}}
    assert resolve_backend("op", torch.device("cpu"), torch.float64, implemented) == "torch"


def test_context_manager_overrides_environment_and_restores(monkeypatch):
    monkeypatch.setenv("TG_KERNELS_BACKEND", "torch")
    assert requested_backend() == "torch"
    with use_backend("torch"):
        assert requested_backend() == "torch"
    monkeypatch.delenv("TG_KERNELS_BACKEND")
    assert requested_backend() is None
    with use_backend("torch"):
        with use_backend("torch"):
            pass
        assert requested_backend() == "torch"
    assert requested_backend() is None


def test_environment_variable_selects_and_validates(monkeypatch):
    monkeypatch.setenv("TG_KERNELS_BACKEND", "torch")
    assert resolve_backend("channel_gate", torch.device("cpu"), torch.float32, SUPPORTED_DTYPES) == "torch"
    monkeypatch.setenv("TG_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        tg_kernels.channel_gate(torch.randn(2, 3), torch.rand(3))


def test_forced_backend_on_the_wrong_device_is_an_error():
    if not available_backends()["cpp"].available:
        pytest.skip("cpp backend not built")
    with use_backend("cpp"), pytest.raises(BackendUnavailableError, match="cannot run channel_gate on meta tensors"):
        resolve_backend("channel_gate", torch.device("meta"), torch.float32, SUPPORTED_DTYPES)


def test_forced_backend_without_the_op_is_an_error():
    with use_backend("torch"), pytest.raises(BackendUnavailableError, match="does not implement some_op"):
        resolve_backend("some_op", torch.device("cpu"), torch.float32, {"cpp": {torch.float32}})
