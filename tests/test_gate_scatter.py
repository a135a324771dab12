"""gate_scatter / gate_gather on every available backend against the pure-PyTorch reference."""

import glob
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import backend_device_params

import tg_kernels
from tg_kernels import use_backend
from tg_kernels.ops.gate_scatter import (
    gate_gather,
    gate_gather_reference,
    gate_scatter,
    gate_scatter_reference,
    supported_dtypes,
)

# backends that implement these ops (the triton backend does not)
BACKEND_DEVICE = [p for p in backend_device_params() if p.values[0] in supported_dtypes("gate_scatter")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HAS_CPP = "cpp" in supported_dtypes("gate_scatter")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="extension without the gate_scatter kernels")


def skip_unsupported(backend: str, op: str, dtype: torch.dtype) -> None:
    implemented = supported_dtypes(op)
    if backend not in implemented:
        pytest.skip(f"{backend} does not implement {op}")
    if dtype not in implemented[backend]:
        pytest.skip(f"{backend} does not support {dtype}")


def randn(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def make_data(shape, layout, device, dtype, seed=0):
    """A tensor of `shape` in `layout` ("contiguous", "channels_last" or "strided": not dense)."""
    if layout == "channels_last":
        return randn(shape, device, dtype, seed).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = list(shape)
        wide[-1] *= 2
        return randn(wide, device, dtype, seed)[..., ::2]
    return randn(shape, device, dtype, seed)


def random_sel(channels, active, device, seed=0, sort=True):
    g = torch.Generator().manual_seed(seed)
    sel = torch.randperm(channels, generator=g)[:active]
    return (sel.sort().values if sort else sel).to(device)


def random_gate(active, device, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(active, generator=g) + 0.25).to(device)


def expected_format(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def assert_same(out, ref, memory_format):
    """Bitwise equal values (same float math as the reference), dtype, shape and memory format."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=memory_format)
    assert torch.equal(out, ref)
    # torch.equal treats -0.0 == 0.0: unselected channels must be +0.0 exactly, like the reference
    assert torch.equal(torch.signbit(out), torch.signbit(ref))


# (shape of z_sel / t with channels at dim 1 replaced by None, layout)
CASES = [
    ((37, None), "contiguous"),
    ((3, None, 5, 7), "contiguous"),
    ((3, None, 5, 7), "channels_last"),
    ((2, None, 8, 8), "contiguous"),  # inner a multiple of every vector width
    ((2, None, 4, 6), "channels_last"),
    ((4, None, 9), "contiguous"),  # 3-D: the general contiguous path
    ((3, None, 5, 7), "strided"),  # not dense: one copy, contiguous output
]
CHANNELS = [(16, 8), (13, 5), (24, 24), (7, 1)]  # (C, A)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout", CASES, ids=[f"{len(s)}d-{lay}" for s, lay in CASES])
@pytest.mark.parametrize("channels, active", CHANNELS, ids=[f"C{c}A{a}" for c, a in CHANNELS])
def test_gate_scatter_matches_reference(backend, device, dtype, shape, layout, channels, active):
    skip_unsupported(backend, "gate_scatter", dtype)
    z_sel = make_data([s if s is not None else active for s in shape], layout, device, dtype)
    sel = random_sel(channels, active, device, sort=active % 2 == 0)  # sorted and unsorted
    gate_sel = random_gate(active, device)
    with use_backend(backend):
        y = gate_scatter(z_sel, sel, gate_sel, channels)
    ref = gate_scatter_reference(z_sel, sel, gate_sel, channels)
    assert_same(y, ref, expected_format(z_sel))
    # independent check of the definition
    unselected = torch.ones(channels, dtype=torch.bool, device=device)
    unselected[sel] = False
    assert (y[:, unselected] == 0).all()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expect = (z_sel.to(acc) * gate_sel.to(acc).view([1, -1] + [1] * (z_sel.dim() - 2))).to(dtype)
    assert torch.equal(y[:, sel], expect)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout", CASES, ids=[f"{len(s)}d-{lay}" for s, lay in CASES])
@pytest.mark.parametrize("channels, active", CHANNELS, ids=[f"C{c}A{a}" for c, a in CHANNELS])
def test_gate_gather_matches_reference(backend, device, dtype, shape, layout, channels, active):
    skip_unsupported(backend, "gate_gather", dtype)
    t = make_data([s if s is not None else channels for s in shape], layout, device, dtype)
    sel = random_sel(channels, active, device, sort=active % 2 == 0)
    gate_sel = random_gate(active, device)
    with use_backend(backend):
        out = gate_gather(t, sel, gate_sel)
    ref = gate_gather_reference(t, sel, gate_sel)
    assert_same(out, ref, expected_format(t))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expect = (t[:, sel].to(acc) * gate_sel.to(acc).view([1, -1] + [1] * (t.dim() - 2))).to(dtype)
    assert torch.equal(out, expect)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_gather_repeated_indices(backend, device):
    skip_unsupported(backend, "gate_gather", torch.float32)
    t = randn((3, 6, 2, 2), device, torch.float32)
    sel = torch.tensor([4, 4, 0, 5, 0], device=device)
    gate_sel = random_gate(5, device)
    with use_backend(backend):
        out = gate_gather(t, sel, gate_sel)
    assert_same(out, gate_gather_reference(t, sel, gate_sel), torch.contiguous_format)


EMPTY_CASES = [
    # (z_sel shape, channels, layout)
    ((0, 4), 9, "contiguous"),  # N = 0, 2-D
    ((0, 4, 3, 3), 9, "contiguous"),  # N = 0
    ((0, 4, 3, 3), 9, "channels_last"),
    ((2, 4, 0, 3), 9, "contiguous"),  # spatial 0
    ((2, 0), 9, "contiguous"),  # A = 0, 2-D: all zeros
    ((2, 0, 3, 3), 9, "contiguous"),  # A = 0: all zeros
    ((2, 0, 3, 3), 9, "channels_last"),
    ((2, 0, 3, 3), 0, "contiguous"),  # C = 0
]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("z_shape, channels, layout", EMPTY_CASES)
def test_scatter_empty(backend, device, z_shape, channels, layout):
    skip_unsupported(backend, "gate_scatter", torch.float32)
    z_sel = make_data(z_shape, layout, device, torch.float32)
    active = z_shape[1]
    sel = random_sel(channels, active, device)
    gate_sel = random_gate(active, device)
    with use_backend(backend):
        y = gate_scatter(z_sel, sel, gate_sel, channels)
    ref = gate_scatter_reference(z_sel, sel, gate_sel, channels)
    assert_same(y, ref, expected_format(z_sel))
    assert y.shape == (z_shape[0], channels, *z_shape[2:])
    if active == 0:
        assert (y == 0).all()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("z_shape, channels, layout", EMPTY_CASES)
def test_gather_empty(backend, device, z_shape, channels, layout):
    skip_unsupported(backend, "gate_gather", torch.float32)
    active = z_shape[1]
    t_shape = (z_shape[0], channels, *z_shape[2:])
    t = make_data(t_shape, layout, device, torch.float32)
    sel = random_sel(channels, active, device)
    gate_sel = random_gate(active, device)
    with use_backend(backend):
        out = gate_gather(t, sel, gate_sel)
    ref = gate_gather_reference(t, sel, gate_sel)
    assert_same(out, ref, expected_format(t))
    assert out.shape == z_shape


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_special_values(backend, device):
    """inf/nan in selected channels propagate; unselected channels stay exactly +0."""
    skip_unsupported(backend, "gate_scatter", torch.float32)
    z_sel = torch.tensor([[float("inf"), -0.0, float("nan")], [-1.0, 2.0, -float("inf")]], device=device)
    sel = torch.tensor([1, 3, 4], device=device)
    gate_sel = torch.tensor([0.5, 2.0, 0.0], device=device)
    with use_backend(backend):
        y = gate_scatter(z_sel, sel, gate_sel, 6)
        back = gate_gather(y, sel, gate_sel)
    ref = gate_scatter_reference(z_sel, sel, gate_sel, 6)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(ref))
    assert torch.equal(torch.signbit(y[:, [0, 2, 5]]), torch.zeros(2, 3, dtype=torch.bool, device=device))
    ref_back = gate_gather_reference(ref, sel, gate_sel)
    assert torch.equal(torch.nan_to_num(back), torch.nan_to_num(ref_back))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_parallel(backend, device, layout):
    """Sizes that split across threads (CPU) and blocks (CUDA)."""
    skip_unsupported(backend, "gate_scatter", torch.float32)
    channels, active = 96, 40
    z_sel = make_data((16, active, 14, 14), layout, device, torch.float32)
    sel = random_sel(channels, active, device, sort=False)
    gate_sel = random_gate(active, device)
    with use_backend(backend):
        y = gate_scatter(z_sel, sel, gate_sel, channels)
        back = gate_gather(y, sel, gate_sel)
    assert_same(y, gate_scatter_reference(z_sel, sel, gate_sel, channels), expected_format(z_sel))
    assert_same(back, gate_gather_reference(y, sel, gate_sel), expected_format(z_sel))
    z2 = randn((4096, active), device, torch.float32)  # Linear-like [tokens, A]
    with use_backend(backend):
        y2 = gate_scatter(z2, sel, gate_sel, channels)
        back2 = gate_gather(y2, sel, gate_sel)
    assert_same(y2, gate_scatter_reference(z2, sel, gate_sel, channels), torch.contiguous_format)
    assert_same(back2, gate_gather_reference(y2, sel, gate_sel), torch.contiguous_format)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_gate_dtype_is_converted(backend, device):
    """gate_sel of any floating dtype is used in the compute dtype (float32 for half data)."""
    skip_unsupported(backend, "gate_scatter", torch.float16)
    z_sel = randn((3, 4, 2, 2), device, torch.float16)
    sel = torch.tensor([0, 2, 3, 5], device=device)
    gate64 = random_gate(4, device).double()
    with use_backend(backend):
        y = gate_scatter(z_sel, sel, gate64, 6)
    assert_same(y, gate_scatter_reference(z_sel, sel, gate64.float(), 6), torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# The C++ ops: opcheck and errors.

CPP_DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)]


def opcheck_cases(device):
    z4 = randn((2, 3, 4, 5), device, torch.float32)
    t4 = randn((2, 7, 4, 5), device, torch.float32)
    sel = torch.tensor([5, 0, 3], device=device)
    g = random_gate(3, device)
    cl = torch.channels_last
    return [
        (torch.ops.tg_kernels.gate_scatter_kernel.default, (z4, sel, g, 7)),
        (torch.ops.tg_kernels.gate_scatter_kernel.default, (z4.contiguous(memory_format=cl), sel, g, 7)),
        (torch.ops.tg_kernels.gate_scatter_kernel.default, (randn((6, 3), device, torch.float16), sel, g, 9)),
        (torch.ops.tg_kernels.gate_scatter_kernel.default, (z4[:0], sel, g, 7)),
        (torch.ops.tg_kernels.gate_gather_kernel.default, (t4, sel, g)),
        (torch.ops.tg_kernels.gate_gather_kernel.default, (t4.contiguous(memory_format=cl), sel, g)),
        (torch.ops.tg_kernels.gate_gather_kernel.default, (randn((6, 7), device, torch.bfloat16), sel, g)),
        (torch.ops.tg_kernels.gate_gather_kernel.default, (t4[:, :, :0], sel, g)),
    ]


@needs_cpp
@pytest.mark.parametrize("device", CPP_DEVICES)
def test_opcheck_kernel_ops(device):
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)


@needs_cpp
def test_kernel_ops_trace_under_compile():
    def f(z, sel, g, t):
        y = torch.ops.tg_kernels.gate_scatter_kernel(z, sel, g, 8)
        return torch.ops.tg_kernels.gate_gather_kernel(t + y, sel, g)

    z, t = torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4)
    sel, g = torch.tensor([1, 4, 6]), torch.rand(3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(z, sel, g, t), f(z, sel, g, t))


def kernel_error_cases(device):
    scatter, gather = torch.ops.tg_kernels.gate_scatter_kernel, torch.ops.tg_kernels.gate_gather_kernel
    z = torch.randn(2, 3, 4, device=device)
    t = torch.randn(2, 6, 4, device=device)
    sel = torch.tensor([0, 2, 5], device=device)
    g = torch.rand(3, device=device)
    return [
        (lambda: scatter(torch.randn(3, device=device), sel, g, 6), "at least 2 dimensions"),
        (lambda: gather(torch.randn(6, device=device), sel, g), "at least 2 dimensions"),
        (lambda: scatter(z.int(), sel, g, 6), "must be float"),
        (lambda: scatter(z, sel.int(), g, 6), "sel must be int64"),
        (lambda: gather(t, sel.int(), g), "sel must be int64"),
        (lambda: scatter(z, sel.view(3, 1), g, 6), "sel must be 1-D"),
        (lambda: scatter(z, sel, g[:2], 6), r"gate_sel must have shape \[3\]"),
        (lambda: gather(t, sel, g[:2]), r"gate_sel must have shape \[3\]"),
        (lambda: scatter(z, sel, g.half(), 6), "gate_sel must be (Float|float32)"),
        (lambda: scatter(z, sel[:2], g[:2], 6), "one channel index per channel of z_sel"),
        (lambda: scatter(z, sel, g, 2), r"channels \(2\) must be at least"),
    ]


@needs_cpp
@pytest.mark.parametrize("device", CPP_DEVICES)
def test_kernel_op_errors(device):
    for call, message in kernel_error_cases(device):
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_cpp
def test_cpu_kernel_index_errors():
    scatter, gather = torch.ops.tg_kernels.gate_scatter_kernel, torch.ops.tg_kernels.gate_gather_kernel
    z, t, g = torch.randn(2, 3, 4), torch.randn(2, 6, 4), torch.rand(3)
    with pytest.raises(RuntimeError, match=r"sel\[2\] = 6 is out of range for 6 channels"):
        scatter(z, torch.tensor([0, 2, 6]), g, 6)
    with pytest.raises(RuntimeError, match=r"sel\[0\] = -1 is out of range"):
        scatter(z, torch.tensor([-1, 2, 3]), g, 6)
    with pytest.raises(RuntimeError, match="holds channel 2 twice"):
        scatter(z, torch.tensor([2, 1, 2]), g, 6)
    with pytest.raises(RuntimeError, match=r"sel\[1\] = 9 is out of range for t with 6 channels"):
        gather(t, torch.tensor([0, 9, 1]), g)
    with pytest.raises(RuntimeError, match="out of range"):
        gather(t.permute(0, 2, 1).contiguous().permute(0, 2, 1), torch.tensor([0, 1, -3]), g)
    with pytest.raises(RuntimeError, match="gate_sel must be Double"):
        scatter(z.double(), torch.tensor([0, 2, 5]), g, 6)


def test_python_argument_errors():
    z, sel, g = torch.randn(2, 3, 4), torch.tensor([0, 2, 5]), torch.rand(3)
    with pytest.raises(TypeError, match="z_sel must be float16"):
        gate_scatter(z.int(), sel, g, 6)
    with pytest.raises(TypeError, match="sel must be a 1-D int64"):
        gate_scatter(z, sel.int(), g, 6)
    with pytest.raises(TypeError, match="gate_sel must be a floating-point"):
        gate_scatter(z, sel, g.int(), 6)
    with pytest.raises(ValueError, match=r"gate_sel must have shape \[3\]"):
        gate_gather(z, sel, g[:2])
    with pytest.raises(ValueError, match="one index per channel of z_sel"):
        gate_scatter(z, sel[:2], g[:2], 6)
    with pytest.raises(ValueError, match=r"channels \(2\) must be at least"):
        gate_scatter(z, sel, g, 2)
    with pytest.raises(TypeError, match="channels must be an int"):
        gate_scatter(z, sel, g, 6.0)
    with pytest.raises(ValueError, match=r"\[N, channels, \*spatial\]"):
        gate_gather(torch.randn(6), sel, g)
    with pytest.raises(ValueError, match="sel is on meta but t is on cpu"):
        gate_gather(z, sel.to("meta"), g)
    with pytest.raises(TypeError, match="must be a tensor"):
        gate_gather(z, [0, 2], g)


def test_forced_backend_without_the_op_raises():
    if tg_kernels.available_backends()["triton"].available:
        with use_backend("triton"), pytest.raises(tg_kernels.BackendUnavailableError, match="does not implement"):
            gate_scatter(torch.randn(2, 1), torch.tensor([0]), torch.ones(1), 2)


# ---------------------------------------------------------------------------------------------
# CUDA-only behaviour (run where a GPU is visible).

VEC_CASES = [
    # (z_sel / t shape with None for the channel dim, layout, C, A): vector and scalar paths
    ((8, None, 16, 16), "contiguous", 64, 32),  # ROW, vectorised
    ((8, None, 7, 7), "contiguous", 64, 32),  # ROW, inner % VEC != 0: scalar
    ((8, None, 7, 7), "channels_last", 64, 32),  # COL, C and A multiples of 8: vectorised
    ((8, None, 7, 7), "channels_last", 60, 30),  # COL, C % 8 != 0: scalar for half
    ((513, None), "contiguous", 1000, 333),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, layout, channels, active", VEC_CASES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_cuda_paths(dtype, shape, layout, channels, active, offset):
    def data(k):
        full = [s if s is not None else k for s in shape]
        base = randn([full[0] * 2] + full[1:], "cuda", dtype)
        flat = base.flatten()[offset : offset + torch.Size(full).numel()]  # storage offset breaks alignment
        out = flat.view(full)
        if layout == "channels_last":
            out = flat.view(full[0], full[2], full[3], full[1]).permute(0, 3, 1, 2)
        return out

    sel = random_sel(channels, active, "cuda", sort=False)
    g = random_gate(active, "cuda")
    z_sel, t = data(active), data(channels)
    assert expected_format(z_sel) == (torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    with use_backend("cuda"):
        y = gate_scatter(z_sel, sel, g, channels)
        out = gate_gather(t, sel, g)
    assert_same(y, gate_scatter_reference(z_sel, sel, g, channels), expected_format(z_sel))
    assert_same(out, gate_gather_reference(t, sel, g), expected_format(t))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_every_output_element_written(layout):
    """The caching allocator hands back a NaN-filled block: any element not written shows."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    z_sel = randn((4, 20, 9, 9), "cuda", torch.float32).contiguous(memory_format=fmt)
    sel = random_sel(48, 20, "cuda")
    g = random_gate(20, "cuda")
    poison = torch.full((4, 48, 9, 9), float("nan"), device="cuda")  # the output's size: its block comes back
    del poison
    with use_backend("cuda"):
        y = gate_scatter(z_sel, sel, g, 48)
    assert not y.isnan().any()
    assert_same(y, gate_scatter_reference(z_sel, sel, g, 48), fmt)


@pytest.mark.gpu
def test_cuda_bad_indices_stay_in_bounds():
    """Indices are trusted on CUDA: bad ones never fault; out of range are dropped / give zeros."""
    scatter, gather = torch.ops.tg_kernels.gate_scatter_kernel, torch.ops.tg_kernels.gate_gather_kernel
    z = torch.randn(2, 3, 4, device="cuda")
    g = torch.rand(3, device="cuda")
    y = scatter(z, torch.tensor([0, 100, -5], device="cuda"), g, 6)
    torch.testing.assert_close(y[:, 0], z[:, 0] * g[0], rtol=0, atol=0)
    assert (y[:, 1:] == 0).all()
    y = scatter(z, torch.tensor([2, 2, 1], device="cuda"), g, 6)  # duplicate: first position wins
    torch.testing.assert_close(y[:, 2], z[:, 0] * g[0], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 1], z[:, 2] * g[2], rtol=0, atol=0)
    t = torch.randn(2, 6, 4, device="cuda")
    out = gather(t, torch.tensor([1, 6, -1], device="cuda"), g)
    assert (out[:, 1:] == 0).all()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_device_and_dtype_errors():
    scatter, gather = torch.ops.tg_kernels.gate_scatter_kernel, torch.ops.tg_kernels.gate_gather_kernel
    z = torch.randn(2, 3, 4, device="cuda")
    sel = torch.tensor([0, 2, 5], device="cuda")
    g = torch.rand(3, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        scatter(z, sel.cpu(), g, 6)
    with pytest.raises(RuntimeError, match="same device"):
        gather(z, sel, g.cpu())
    with pytest.raises(RuntimeError, match="float64 is not supported by the CUDA kernels"):
        scatter(z.double(), sel, g.double(), 6)
    with use_backend("cuda"), pytest.raises(tg_kernels.BackendUnavailableError, match="float64"):
        gate_scatter(z.double(), sel, g, 6)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_64bit_indexing():
    """Outputs past 2^31 elements take the int64 index path."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    channels, active, rows = 64, 32, 2**31 // 64 + 1024
    z = torch.ones(rows, active, device="cuda", dtype=torch.float16)
    z[-1] = 3.0
    sel = torch.arange(1, 2 * active, 2, device="cuda")
    g = torch.full((active,), 0.5, device="cuda")
    with use_backend("cuda"):
        y = gate_scatter(z, sel, g, channels)
    assert y.numel() > 2**31
    assert (y[-1, sel] == 1.5).all() and (y[-1, sel - 1] == 0).all() and (y[0, sel] == 0.5).all()
    del z
    with use_backend("cuda"):
        back = gate_gather(y, sel, g)
    assert (back[-1] == 0.75).all() and (back[0] == 0.25).all()


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' per-group code, run on the CPU (no GPU needed): see
# tests/cuda_emulation/gate_scatter_emulation.cu.


def _find_nvcc() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.exists() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return nvcc
    return None


@pytest.mark.slow
def test_cuda_kernel_code_emulated_on_cpu(tmp_path):
    """Every output byte of the CUDA per-group code for ~43k cases (shapes, dtypes, alignments,
    32- and 64-bit indices, bad indices), under AddressSanitizer where the compiler has it."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    root = Path(__file__).resolve().parent.parent
    source = root / "tests" / "cuda_emulation" / "gate_scatter_emulation.cu"
    include = Path(torch.__file__).parent / "include"
    exe = tmp_path / "gate_scatter_emulation"
    base = [str(nvcc), "-std=c++20", "-O1", f"-I{root}", f"-I{include}", "--expt-relaxed-constexpr", str(source)]
    base += ["-o", str(exe)]
    build = subprocess.run([*base, "-Xcompiler", "-fsanitize=address", "-lasan"], capture_output=True, text=True)
    if build.returncode != 0:  # no AddressSanitizer runtime: plain build
        build = subprocess.run(base, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in supported_dtypes("gate_scatter")])
def test_out_of_range_indices_raise_on_cpu(backend):
    z, g = torch.randn(2, 3), torch.ones(3)
    with use_backend(backend):
        with pytest.raises((IndexError, RuntimeError), match="(?i)out of (range|bounds|data bounds)"):
            gate_scatter(z, torch.tensor([0, 1, 7]), g, 5)
        with pytest.raises((IndexError, RuntimeError), match="(?i)out of (range|bounds|data bounds)"):
            gate_gather(torch.randn(2, 5), torch.tensor([0, -9, 1]), g)
