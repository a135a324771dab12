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


def _backward_in_another_thread(loss: torch.Tensor) -> None:
    """Run loss.backward() on a fresh thread, as autograd's CUDA worker thread runs it: no ContextVars."""
    import threading

    errors = []

    def run():
        try:
            loss.backward()
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_forced_backend_holds_in_a_backward_on_another_thread(monkeypatch):
    """use_backend around the forward also picks the backward's backend (recorded, then restored)."""
    import importlib
    import threading

    channel_gate_ops = importlib.import_module("tg_kernels.ops.channel_gate")  # the name is also a function's
    gated_conv = importlib.import_module("tg_kernels.ops.gated_conv")
    gated_linear = importlib.import_module("tg_kernels.ops.gated_linear")

    seen = []  # (what, backend requested when the kernels were chosen, on the main thread?)
    main = threading.current_thread()
    for module, name in ((gated_linear, "_kernels"), (gated_conv, "_kernels")):
        original = getattr(module, name)

        def spy(x, _original=original, _what=module.__name__):
            seen.append((_what, requested_backend(), threading.current_thread() is main))
            return _original(x)

        monkeypatch.setattr(module, name, spy)
    original_kernels_for = channel_gate_ops._kernels_for

    def spy_channel_gate(x):
        seen.append(("channel_gate", requested_backend(), threading.current_thread() is main))
        return original_kernels_for(x)

    monkeypatch.setattr(channel_gate_ops, "_kernels_for", spy_channel_gate)

    torch.manual_seed(0)
    linear = tg_kernels.GatedLinear(8, 6, skip="hard")
    conv = tg_kernels.GatedConv2d(3, 4, 3, padding=1, skip="exact")
    conv_bn = tg_kernels.GatedConv2d(3, 4, 3, padding=1, skip="exact", gate_after_norm=True)
    with torch.no_grad():
        for m in (linear, conv, conv_bn):
            m.gate.weight[0] = -1.0  # one closed gate: the skipping path
    x, img = torch.randn(5, 8), torch.randn(2, 3, 5, 5)
    with use_backend("torch"):
        loss = linear(x).sum() + conv(img).sum() + conv_bn(img).sum()
        loss = loss + tg_kernels.channel_gate(img.requires_grad_(), torch.ones(3, requires_grad=True)).sum()
    _backward_in_another_thread(loss)
    backward_calls = [entry for entry in seen if not entry[2]]
    assert {what for what, _, _ in backward_calls} >= {"tg_kernels.ops.gated_linear", "tg_kernels.ops.gated_conv"}
    assert all(backend == "torch" for _, backend, _ in backward_calls), backward_calls
    assert requested_backend() is None


def test_forced_backend_holds_in_the_eager_channel_gate_backward(monkeypatch):
    """channel_gate's eager autograd keeps the backward kernel of the forward's backend."""
    from tg_kernels import reference

    calls = []
    original = reference.channel_gate_backward
    monkeypatch.setattr(reference, "channel_gate_backward", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(2, 3, 4, requires_grad=True)
    gate = torch.rand(3, requires_grad=True)
    with use_backend("torch"):
        y = tg_kernels.channel_gate(x, gate, dim=1)
    _backward_in_another_thread(y.square().sum())
    assert calls, "the backward did not run the torch backend's kernel"
    torch.testing.assert_close(gate.grad, (2 * y.detach() * x.detach()).sum((0, 2)))


def test_conftest_interprets_triton_only_without_a_gpu():
    """The test run compiles Triton on a GPU machine and interprets it on CPU; a user's setting wins."""
    from conftest import interpreter_setting

    assert interpreter_setting({}, cuda_available=False) == "1"
    assert interpreter_setting({}, cuda_available=True) is None  # compiled kernels on the GPU
    assert interpreter_setting({"TRITON_INTERPRET": "1"}, cuda_available=True) == "1"
    assert interpreter_setting({"TRITON_INTERPRET": "0"}, cuda_available=False) == "0"
