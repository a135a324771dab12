"""channel_gate on every available backend against the float64 pure-PyTorch reference."""

import importlib

import pytest
import torch
from helpers import backend_device_params

import tg_kernels
from tg_kernels import channel_gate, trainable_gate, use_backend
from tg_kernels.ops.channel_gate import SUPPORTED_DTYPES
from tg_kernels.reference import channel_gate_unfused

BACKEND_DEVICE = backend_device_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_input(layout: str, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """An input of the given layout and the channel dim it is gated along."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "nchw":
        return randn(2, 5, 6, 7), 1
    if layout == "channels_last":
        return randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last), 1
    if layout == "nc":
        return randn(9, 33), 1
    if layout == "nlc":
        return randn(2, 7, 12), -1
    if layout == "dim0":
        return randn(4, 3, 5), 0
    if layout == "dim2_of_4d":
        return randn(2, 3, 4, 5), 2
    if layout == "transposed":
        return randn(6, 4, 5).transpose(0, 2), 1  # no copy-free canonical view
    if layout == "sliced":
        return randn(3, 8, 10)[:, 1:6, ::2], 1
    if layout == "1d":
        return randn(11), 0
    raise ValueError(layout)


LAYOUTS = ["nchw", "channels_last", "nc", "nlc", "dim0", "dim2_of_4d", "transposed", "sliced", "1d"]


def reference_with_grads(x, gate, dim, grad_y):
    """y, grad_x, grad_gate from the unfused expression with plain autograd in float64."""
    x64 = x.detach().double().requires_grad_(True)
    g64 = gate.detach().double().requires_grad_(True)
    y64 = channel_gate_unfused(x64, g64, dim)
    y64.backward(grad_y.double())
    return y64.detach(), x64.grad, g64.grad


def run_with_grads(x, gate, dim, grad_y):
    x = x.detach().requires_grad_(True)
    gate = gate.detach().requires_grad_(True)
    y = channel_gate(x, gate, dim)
    y.backward(grad_y)
    return y.detach(), x.grad, gate.grad


def tolerances(dtype: torch.dtype, reduced_count: int) -> dict:
    """Elementwise results: one rounding of the output dtype. Reductions: fp32 accumulation error."""
    eps = {torch.float64: 1e-15, torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.9e-3}[dtype]
    acc_eps = 1.2e-7  # float32 accumulation, or a float32 gate's gradient rounded from float64
    return {
        "elementwise": dict(rtol=eps, atol=eps * 1e-2),
        "reduction": dict(rtol=acc_eps * 8 * reduced_count**0.5 + 1e-12, atol=acc_eps * 8 * reduced_count**0.5),
    }


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_float64_reference(backend, device, dtype, layout):
    if dtype not in SUPPORTED_DTYPES[backend]:
        pytest.skip(f"{backend} does not support {dtype}")
    x, dim = make_input(layout, device, dtype)
    channels = x.shape[dim]
    gate = torch.rand(channels, generator=torch.Generator().manual_seed(1)).to(device)
    gate[0] = 0.0  # a closed channel
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device, dtype)
    with use_backend(backend):
        y, grad_x, grad_gate = run_with_grads(x, gate, dim, grad_y)
    ref_y, ref_grad_x, ref_grad_gate = reference_with_grads(x, gate, dim, grad_y)
    tol = tolerances(dtype, x.numel() // max(channels, 1))
    assert y.dtype == dtype and grad_x.dtype == dtype and grad_gate.dtype == gate.dtype
    torch.testing.assert_close(y.double(), ref_y, **tol["elementwise"])
    torch.testing.assert_close(grad_x.double(), ref_grad_x, **tol["elementwise"])
    # grad_gate sums products of rounded inputs exactly as the reference does, in fp32 or better.
    scale = (grad_y.double().abs() * x.double().abs()).movedim(dim, 0).reshape(channels, -1).sum(1) + 1
    assert ((grad_gate.double() - ref_grad_gate).abs() <= tol["reduction"]["rtol"] * scale).all()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_output_keeps_input_layout(backend, device):
    x = torch.randn(2, 4, 3, 5, device=device).contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        y = channel_gate(x, torch.rand(4, device=device))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == x.stride()


EDGE_CASES = {
    "empty_batch": ((0, 3, 4, 4), 1),
    "zero_channels": ((2, 0, 3), 1),
    "empty_spatial": ((2, 3, 0), 1),
    "one_channel": ((3, 1, 5, 5), 1),
    "huge_spatial_tiny_c": ((1, 2, 128, 256), 1),
    "tiny_spatial_huge_c": ((3, 4096, 1, 1), 1),
    "tiny_spatial_huge_c_last": ((5, 3000), -1),
}


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_shapes(backend, device, case):
    shape, dim = EDGE_CASES[case]
    x = torch.randn(shape, device=device)
    gate = torch.rand(shape[dim], device=device)
    grad_y = torch.randn(shape, device=device)
    with use_backend(backend):
        y, grad_x, grad_gate = run_with_grads(x, gate, dim, grad_y)
    ref_y, ref_grad_x, ref_grad_gate = reference_with_grads(x, gate, dim, grad_y)
    assert y.shape == x.shape and grad_gate.shape == gate.shape
    torch.testing.assert_close(y.double(), ref_y, rtol=1.2e-7, atol=1e-30)
    torch.testing.assert_close(grad_x.double(), ref_grad_x, rtol=1.2e-7, atol=1e-30)
    torch.testing.assert_close(grad_gate.double(), ref_grad_gate, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("gate_value", [0.0, 1.0])
def test_all_closed_and_all_open(backend, device, gate_value):
    x = torch.randn(3, 6, 4, 4, device=device)
    gate = torch.full((6,), gate_value, device=device)
    grad_y = torch.randn_like(x)
    with use_backend(backend):
        y, grad_x, grad_gate = run_with_grads(x, gate, 1, grad_y)
    assert torch.equal(y, x * gate_value)
    assert torch.equal(grad_x, grad_y * gate_value)
    torch.testing.assert_close(grad_gate, (grad_y * x).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("shape", [(16, 8, 96), (300, 12, 1)], ids=["rows", "channels_last"])
def test_gate_gradient_is_bitwise_reproducible(backend, device, shape):
    x = torch.randn(shape, device=device)
    gate = torch.rand(shape[1], device=device)
    grad_y = torch.randn(shape, device=device)
    with use_backend(backend):
        runs = [run_with_grads(x, gate, 1, grad_y)[2] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize(
    "backend, device", [p for p in BACKEND_DEVICE if "float64" in str(SUPPORTED_DTYPES[p.values[0]])]
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nlc", "transposed"])
def test_gradcheck(backend, device, layout):
    x, dim = make_input(layout, device, torch.float64)
    gate = torch.rand(x.shape[dim], dtype=torch.float64, device=device, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: channel_gate(a, b, dim), (x.requires_grad_(True), gate))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_trains_gate_parameters_through_trainable_gate(backend, device):
    w = torch.tensor([0.3, -0.2, 0.1, -0.4], device=device, requires_grad=True)
    x = torch.randn(2, 4, 3, 3, device=device)
    with use_backend(backend):
        y = channel_gate(x, trainable_gate(w, shape="gaussian"))
    y.sum().backward()
    expected = x.sum((0, 2, 3)) * torch.exp(-0.5 * w.detach() ** 2)
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_opcheck(backend, device):
    x = torch.randn(3, 5, 7, device=device)
    gate = torch.rand(5, device=device)
    grad_y = torch.randn(3, 5, 7, device=device)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.tg_kernels.channel_gate.default, (x, gate))
        torch.library.opcheck(
            torch.ops.tg_kernels.channel_gate.default, (x.requires_grad_(True), gate.requires_grad_(True))
        )
        torch.library.opcheck(torch.ops.tg_kernels.channel_gate_backward.default, (grad_y, x.detach(), gate.detach()))


@pytest.mark.skipif(not tg_kernels.available_backends()["cpp"].available, reason="extension not built")
def test_opcheck_cpp_kernel_ops():
    x, gate, grad_y = torch.randn(3, 5, 7), torch.rand(5), torch.randn(3, 5, 7)
    torch.library.opcheck(torch.ops.tg_kernels.channel_gate_forward_kernel.default, (x, gate))
    torch.library.opcheck(torch.ops.tg_kernels.channel_gate_backward_kernel.default, (grad_y, x, gate))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    def step(x, w):
        return (channel_gate(torch.relu(x), trainable_gate(w), dim=1) * 2).sum()

    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    w = torch.tensor([0.5, -0.5, 0.2, 0.1], requires_grad=True)
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, w)
    loss.backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad, w.grad = None, None
    step(x, w).backward()
    torch.testing.assert_close(loss, step(x, w))
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_bad_input_gives_clear_errors(backend, device):
    x = torch.randn(2, 4, 3, device=device)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"one value per channel: expected shape \[4\]"):
            channel_gate(x, torch.rand(3, device=device))
        with pytest.raises(ValueError, match="one value per channel"):
            channel_gate(x, torch.rand(2, 2, device=device))
        with pytest.raises(ValueError, match="gate is on meta but x is on"):
            channel_gate(x, torch.rand(4, device="meta"))
        with pytest.raises(TypeError, match="x has dtype torch.int64"):
            channel_gate(torch.ones(2, 4, 3, dtype=torch.long, device=device), torch.rand(4, device=device))
        with pytest.raises(TypeError, match="gate has dtype torch.int32"):
            channel_gate(x, torch.ones(4, dtype=torch.int32, device=device))
        with pytest.raises(IndexError, match="dim 3 is out of range"):
            channel_gate(x, torch.rand(4, device=device), dim=3)
        with pytest.raises(IndexError, match="dim -4 is out of range"):
            channel_gate(x, torch.rand(4, device=device), dim=-4)
        with pytest.raises(ValueError, match="at least one dimension"):
            channel_gate(torch.tensor(1.0, device=device), torch.rand(1, device=device), dim=0)


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICE if p.values[0] in ("triton", "cuda")])
def test_float64_on_a_backend_without_it_names_the_problem(backend, device):
    with (
        use_backend(backend),
        pytest.raises(tg_kernels.BackendUnavailableError, match="does not support torch.float64"),
    ):
        channel_gate(
            torch.randn(2, 3, dtype=torch.float64, device=device), torch.rand(3, dtype=torch.float64, device=device)
        )


@pytest.mark.skipif(not tg_kernels.available_backends()["cpp"].available, reason="extension not built")
def test_cpp_kernel_ops_reject_bad_input_without_crashing():
    ops = torch.ops.tg_kernels
    with pytest.raises(RuntimeError, match=r"expected x of shape \[outer, C, inner\]"):
        ops.channel_gate_forward_kernel(torch.randn(2, 3), torch.rand(3))
    with pytest.raises(RuntimeError, match="gate must have shape"):
        ops.channel_gate_forward_kernel(torch.randn(2, 3, 4), torch.rand(4))
    with pytest.raises(RuntimeError, match="gate must be Float"):
        ops.channel_gate_forward_kernel(torch.randn(2, 3, 4), torch.rand(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.channel_gate_forward_kernel(torch.randn(4, 3, 2).transpose(0, 2), torch.rand(3))
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.channel_gate_forward_kernel(torch.ones(2, 3, 4, dtype=torch.int32), torch.rand(3))
    with pytest.raises(RuntimeError, match="grad_y must be contiguous with x's shape"):
        ops.channel_gate_backward_kernel(torch.randn(2, 3, 5), torch.randn(2, 3, 4), torch.rand(3))


def _run_both_paths(monkeypatch, x, gate, dim, grad_y):
    """(y, grad_x, grad_gate) through the eager shortcut, then through the custom op."""
    module = importlib.import_module("tg_kernels.ops.channel_gate")  # the package attribute is the function
    results = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(module, "_eager", lambda x, gate: False)
        results.append(run_with_grads(x, gate, dim, grad_y))
    return results


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nlc", "transposed"])
def test_eager_shortcut_is_bitwise_the_custom_op(monkeypatch, backend, device, layout):
    x, dim = make_input(layout, device, torch.float32)
    gate = torch.rand(x.shape[dim], device=device)
    grad_y = torch.randn(x.shape, device=device)
    with use_backend(backend):
        eager, op = _run_both_paths(monkeypatch, x, gate, dim, grad_y)
    for a, b in zip(eager, op, strict=True):
        assert a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_eager_output_allows_in_place_ops_and_parameter_gates(backend, device):
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    gate = torch.nn.Parameter(torch.rand(4, device=device))
    with use_backend(backend):
        y = channel_gate(x, gate)
        y.relu_()
        y.sum().backward()
    expected = ((x.detach() * gate.detach().view(1, 4, 1, 1)) > 0).to(x.dtype)
    torch.testing.assert_close(x.grad, expected * gate.detach().view(1, 4, 1, 1))
    torch.testing.assert_close(gate.grad, (expected * x.detach()).sum((0, 2, 3)))
    with torch.no_grad(), use_backend(backend):
        assert channel_gate(x, gate).grad_fn is None


def test_double_backward_raises_instead_of_returning_wrong_grads():
    x = torch.randn(2, 4, 3, requires_grad=True)
    gate = torch.rand(4, requires_grad=True)
    (grad_x,) = torch.autograd.grad(channel_gate(x, gate).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


def test_dispatch_modes_see_the_custom_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 4, 3, requires_grad=True)
    with Record() as record:
        channel_gate(x, torch.rand(4)).sum().backward()
    assert "tg_kernels.channel_gate.default" in record.ops
    assert "tg_kernels.channel_gate_backward.default" in record.ops


@pytest.mark.skipif(not tg_kernels.available_backends()["cpp"].available, reason="extension not built")
@pytest.mark.parametrize(
    "shape",
    [(40, 700, 1), (512, 8192, 1), (3, 40, 20000), (6, 5, 49)],
    ids=["blocks-serial-sum", "blocks-parallel-sum", "chunked-rows", "short-runs"],
)
def test_cpp_backward_does_not_depend_on_thread_count(shape):
    g = torch.Generator().manual_seed(0)
    x, grad_y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    gate = torch.rand(shape[1], generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.tg_kernels.channel_gate_backward_kernel(grad_y, x, gate))
    finally:
        torch.set_num_threads(threads)
    for grad_x, grad_gate in results[1:]:
        assert torch.equal(grad_x, results[0][0]) and torch.equal(grad_gate, results[0][1])
    expected = (grad_y.double() * x.double()).sum((0, 2))
    torch.testing.assert_close(results[0][1].double(), expected, rtol=1e-4, atol=1e-3)
