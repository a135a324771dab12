"""Tests of the CUDA kernels of the channel gate (csrc/cuda/channel_gate.cu).

The raw kernel ops ``tg_kernels::channel_gate_{forward,backward}_kernel`` are checked against
:mod:`tg_kernels.reference` on CUDA tensors. One test runs without a GPU (the kernels are
registered whenever the extension was built with CUDA); the rest are marked ``gpu`` and skip
without a CUDA device.

Paths the shapes exercise (VEC = 4 elements for float32, 8 for float16/bfloat16; a warp's span is
32 * VEC): ROW mode when inner >= 32 * VEC, COL mode below; rows longer than 8 warp spans cut into
segments; several splits per channel (a partial buffer and the summing kernel) or one (grad_gate
written directly); column counts C * inner that are not a multiple of VEC (scalar path); storage
offsets that misalign the pointers (scalar path); more work items than the grid cap (grid-stride).
"""

from __future__ import annotations

import math

import pytest
import torch

import tg_kernels
from tg_kernels import reference

OPS = ("channel_gate_forward_kernel", "channel_gate_backward_kernel")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps


def _cuda_kernels_built() -> bool:
    info = tg_kernels.build_info()
    return bool(info["extension_loaded"] and info["with_cuda"])


requires_cuda_build = pytest.mark.skipif(
    not _cuda_kernels_built(), reason="the tg_kernels extension is not loaded or was built without CUDA kernels"
)
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_test(fn):
    """Mark a test as needing a GPU and the CUDA kernels."""
    return pytest.mark.gpu(requires_gpu(requires_cuda_build(fn)))


# (outer, C, inner). Comments: mode for float32 / for 16-bit dtypes.
SHAPES = [
    (1, 1, 1),  # COL, a single element
    (2, 3, 5),  # COL, K = 15 (scalar path), summing kernel over inner
    (4, 8, 1),  # COL, channels-last, grad_gate written directly
    (64, 1, 1),  # COL, C = 1
    (3, 1, 1000),  # ROW, C = 1
    (7, 5, 49),  # COL, 7x7 maps
    (2, 16, 196),  # ROW / COL, 14x14 maps
    (4, 7, 3136),  # ROW with segments, 56x56 maps
    (1, 3, 7001),  # ROW, odd rows cut into segments
    (5000, 64, 1),  # COL, many splits
    (3000, 3, 1),  # COL, C = 3 (one thread column, scalar path)
    (300, 100, 2),  # COL, splits and inner both summed
    (513, 130, 1),  # COL, odd sizes
    (33, 3, 129),  # ROW / COL, rows not a multiple of VEC
    (3, 2, 255),  # ROW / COL, one below the 16-bit span
    (3, 2, 256),  # ROW / ROW, exactly the 16-bit span
    (100, 9, 300),  # ROW, several splits per channel
    (1, 1, 100003),  # ROW, one long row, several splits
    (2, 1030, 3),  # COL, many column tiles
    (17000, 2, 1),  # COL, tall and narrow
]
# More work items than the grid cap of 8192 blocks, so the kernels grid-stride.
LARGE_SHAPES = [
    (1, 10000, 256),  # ROW: 10000 block items
    (3, 2**20 + 3, 2),  # COL: over 8192 column tiles; the summing kernel over 2**17 blocks
]
EMPTY_SHAPES = [(0, 5, 3), (2, 0, 3), (2, 5, 0), (0, 0, 0)]


def _forward(x, gate):
    return torch.ops.tg_kernels.channel_gate_forward_kernel(x, gate)


def _backward(grad_y, x, gate):
    return torch.ops.tg_kernels.channel_gate_backward_kernel(grad_y, x, gate)


def _on_gpu(values: torch.Tensor, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """`values` as a contiguous CUDA tensor of `dtype` that starts `offset` elements into its storage.

    A slice of a contiguous buffer at an odd offset is still contiguous but its pointer is not
    16-byte aligned, which sends the kernels down their scalar path.
    """
    buffer = torch.empty(values.numel() + offset, dtype=dtype, device="cuda")
    out = buffer[offset:].view(values.shape)
    out.copy_(values)
    if offset % (16 // out.element_size()) != 0 and out.numel() > 0:
        assert out.data_ptr() % 16 != 0
    return out


def _random_inputs(shape, dtype, offset=0, seed=0, integers=False):
    """(x, grad_y, gate) on the GPU. With `integers`, x and grad_y hold small integers."""
    generator = torch.Generator().manual_seed(seed)
    if integers:
        x = torch.randint(-3, 4, shape, generator=generator).float()
        grad_y = torch.randint(-3, 4, shape, generator=generator).float()
    else:
        x = torch.randn(shape, generator=generator)
        grad_y = torch.randn(shape, generator=generator)
    gate = torch.randn(shape[1], generator=generator)
    gate[::3] = 0.0  # closed gates
    gate[1::5] = 1.0
    return _on_gpu(x, dtype, offset), _on_gpu(grad_y, dtype, offset), gate.cuda()


def _grad_gate_tolerance(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel bound on the float32 summation error: 4 * eps * sqrt(n) * ||grad_y * x||_2."""
    products = grad_y.double() * x.double()
    n = x.shape[0] * x.shape[2]
    return 4 * EPS32 * math.sqrt(max(n, 1)) * products.square().sum(dim=(0, 2)).sqrt() + 1e-30


def _check_against_reference(x, grad_y, gate):
    x_before, grad_y_before, gate_before = x.clone(), grad_y.clone(), gate.clone()
    dtype = x.dtype
    finfo = torch.finfo(dtype)

    y = _forward(x, gate)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device and y.is_contiguous()
    # Bitwise equal to the contract: float32 math, one rounding to x's dtype.
    torch.testing.assert_close(y, reference.channel_gate_forward(x, gate), rtol=0, atol=0)
    y64 = reference.channel_gate_forward(x.double(), gate.double())
    torch.testing.assert_close(y.double(), y64, rtol=finfo.eps, atol=finfo.tiny)

    grad_x, grad_gate = _backward(grad_y, x, gate)
    assert grad_x.shape == x.shape and grad_x.dtype == dtype and grad_x.is_contiguous()
    assert grad_gate.shape == gate.shape and grad_gate.dtype == torch.float32 and grad_gate.device == x.device
    ref_grad_x, _ = reference.channel_gate_backward(grad_y, x, gate)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=0, atol=0)
    grad_x64, grad_gate64 = reference.channel_gate_backward(grad_y.double(), x.double(), gate.double())
    torch.testing.assert_close(grad_x.double(), grad_x64, rtol=finfo.eps, atol=finfo.tiny)
    error = (grad_gate.double() - grad_gate64).abs()
    tolerance = _grad_gate_tolerance(grad_y, x)
    assert bool((error <= tolerance).all()), f"grad_gate error {error.max().item():.3g} above tolerance"

    # The kernels only read their inputs.
    assert torch.equal(x, x_before) and torch.equal(grad_y, grad_y_before) and torch.equal(gate, gate_before)


def test_cuda_kernels_registered():
    """Runs without a GPU: an extension built with CUDA registers both ops for the CUDA key."""
    if not _cuda_kernels_built():
        pytest.skip("the tg_kernels extension is not loaded or was built without CUDA kernels")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tg_kernels::{op}", "CUDA"), op


@gpu_test
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, offset):
    _check_against_reference(*_random_inputs(shape, dtype, offset))


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
def test_matches_reference_grid_stride(shape, dtype):
    _check_against_reference(*_random_inputs(shape, dtype))


@gpu_test
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=str)
def test_grad_gate_exact_on_integers(shape, dtype, offset):
    """Small integers make every partial sum exact in float32, whatever the order: any element
    missed, counted twice or given to the wrong channel shows up as an exact mismatch."""
    x, grad_y, gate = _random_inputs(shape, dtype, offset, integers=True)
    _, grad_gate = _backward(grad_y, x, gate)
    expected = (grad_y.double() * x.double()).sum(dim=(0, 2))
    assert torch.equal(grad_gate.double(), expected)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty(shape, dtype):
    x, grad_y, gate = _random_inputs(shape, dtype)
    y = _forward(x, gate)
    assert y.shape == shape and y.dtype == dtype
    grad_x, grad_gate = _backward(grad_y, x, gate)
    assert grad_x.shape == shape and grad_x.dtype == dtype
    assert grad_gate.dtype == torch.float32 and torch.equal(grad_gate, torch.zeros(shape[1], device="cuda"))


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5000, 64, 1), (300, 100, 2), (100, 9, 300), (1, 1, 100003), (4, 7, 3136)], ids=str)
def test_deterministic(shape, dtype):
    """Bitwise equal results run to run, and whatever the pointers' alignment."""
    x, grad_y, gate = _random_inputs(shape, dtype)
    first = _backward(grad_y, x, gate)
    second = _backward(grad_y, x, gate)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    misaligned = _backward(_on_gpu(grad_y, dtype, offset=3), _on_gpu(x, dtype, offset=1), gate)
    assert torch.equal(first[0], misaligned[0]) and torch.equal(first[1], misaligned[1])


@gpu_test
def test_cuda_graph_capture():
    """The kernels launch on the current stream: capturing them in a CUDA graph works."""
    x, grad_y, gate = _random_inputs((300, 100, 2), torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _forward(x, gate)
            _backward(grad_y, x, gate)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _forward(x, gate)
        grad_x, grad_gate = _backward(grad_y, x, gate)
    new_x, new_grad_y, _ = _random_inputs((300, 100, 2), torch.float32, seed=1)
    x.copy_(new_x)
    grad_y.copy_(new_grad_y)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, reference.channel_gate_forward(x, gate), rtol=0, atol=0)
    ref_grad_x, ref_grad_gate = reference.channel_gate_backward(grad_y, x, gate)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_gate, ref_grad_gate, rtol=1e-5, atol=1e-4)


@gpu_test
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on a device other than the current one: the kernels run on the tensors' device."""
    x, grad_y, gate = (t.to("cuda:1") for t in _random_inputs((33, 3, 129), torch.float32))
    with torch.cuda.device(0):
        y = _forward(x, gate)
        grad_x, grad_gate = _backward(grad_y, x, gate)
    assert y.device == x.device and grad_gate.device == x.device
    torch.testing.assert_close(y, reference.channel_gate_forward(x, gate), rtol=0, atol=0)
    ref_grad_x, ref_grad_gate = reference.channel_gate_backward(grad_y, x, gate)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_gate, ref_grad_gate, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="same device"):
        _forward(x, gate.to("cuda:0"))


@gpu_test
def test_bad_inputs_raise():
    x, grad_y, gate = _random_inputs((4, 3, 6), torch.float32)
    cases = [
        (lambda: _forward(x, gate.cpu()), "gate must be a CUDA tensor"),
        (lambda: _forward(x.cpu(), gate), "x must be a CUDA tensor"),
        (lambda: _forward(x.double(), gate.double()), "float64 is not supported"),
        (lambda: _forward(x.double(), gate), "float64 is not supported"),
        (lambda: _forward(x.int(), gate), "x must be float32, float16 or bfloat16"),
        (lambda: _forward(x.view(12, 6), gate), "x must be 3-D"),
        (lambda: _forward(x.transpose(0, 2), gate), "x must be contiguous"),
        (lambda: _forward(x, gate[:2]), r"gate must have shape \[3\]"),
        (lambda: _forward(x, gate.view(1, 3)), r"gate must have shape \[3\]"),
        (lambda: _forward(x, gate.half()), "gate must be float32"),
        (lambda: _forward(x, torch.randn(6, device="cuda")[::2]), "gate must be contiguous"),
        (lambda: _backward(grad_y, x, gate.cpu()), "gate must be a CUDA tensor"),
        (lambda: _backward(grad_y.cpu(), x, gate), "grad_y must be on x's device"),
        (lambda: _backward(grad_y.half(), x, gate), "grad_y must have x's dtype"),
        (lambda: _backward(grad_y[:2], x, gate), "grad_y must have x's shape"),
        (lambda: _backward(grad_y.transpose(0, 2).contiguous().transpose(0, 2), x, gate), "grad_y must be contiguous"),
        (lambda: _backward(grad_y.double(), x.double(), gate.double()), "float64 is not supported"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    torch.cuda.synchronize()  # nothing was launched with bad arguments


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_through_channel_gate_with_cuda_backend(dtype):
    """The public op on the cuda backend, NCHW and channels-last, with autograd."""
    generator = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(4, 16, 9, 9, generator=generator)
    gate_cpu = torch.randn(16, generator=generator)
    grad_cpu = torch.randn(4, 16, 9, 9, generator=generator)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = x_cpu.to("cuda", dtype).to(memory_format=memory_format).requires_grad_()
        gate = gate_cpu.cuda().requires_grad_()
        grad = grad_cpu.to("cuda", dtype)
        with tg_kernels.use_backend("cuda"):
            y = tg_kernels.channel_gate(x, gate, dim=1)
            y.backward(grad)
        expected = (x.detach().float() * gate.detach().view(1, -1, 1, 1)).to(dtype)
        torch.testing.assert_close(y.detach(), expected, rtol=0, atol=0)
        expected_grad_x = (grad.float() * gate.detach().view(1, -1, 1, 1)).to(dtype)
        torch.testing.assert_close(x.grad, expected_grad_x, rtol=0, atol=0)
        expected_grad_gate = (grad.double() * x.detach().double()).sum(dim=(0, 2, 3))
        torch.testing.assert_close(gate.grad.double(), expected_grad_gate, rtol=1e-5, atol=1e-4)


def _chunks(shape, chunk=2**26):
    """Index tuples that cover a [outer, C, inner] tensor in pieces of about `chunk` elements."""
    rows = max(1, chunk // (shape[1] * shape[2]))
    for o0 in range(0, shape[0], rows):
        for i0 in range(0, shape[2], chunk):
            yield slice(o0, o0 + rows), slice(None), slice(i0, i0 + chunk)


@pytest.mark.slow
@gpu_test
@pytest.mark.parametrize("shape", [(1, 2, 2**30 + 4099), (2**21 + 3, 1024, 1)], ids=["row", "col"])
def test_more_than_2_31_elements(shape):
    """int64 indexing: float16 tensors of more than 2**31 elements, in both modes."""
    numel = math.prod(shape)
    assert numel > 2**31
    needed = 3 * numel * 2 + 2**31
    if torch.cuda.mem_get_info()[0] < needed:
        pytest.skip(f"needs about {needed / 2**30:.0f} GiB of free GPU memory")
    x = torch.empty(shape, dtype=torch.float16, device="cuda")
    x.copy_(torch.randint(-2, 3, shape, dtype=torch.int8, device="cuda"))  # small integers
    gate = torch.linspace(-2.0, 2.0, shape[1], device="cuda")

    def check(out):
        for index in _chunks(shape):
            assert torch.equal(out[index], (x[index].float() * gate.view(1, -1, 1)).half())

    y = _forward(x, gate)
    check(y)
    del y
    grad_x, grad_gate = _backward(x, x, gate)  # grad_y = x: grad_gate[c] = sum of x**2, all terms >= 0
    check(grad_x)
    del grad_x
    expected = torch.zeros(shape[1], dtype=torch.float64, device="cuda")
    for index in _chunks(shape):
        expected += x[index].double().square().sum(dim=(0, 2))
    torch.testing.assert_close(grad_gate.double(), expected, rtol=1e-5, atol=0)
