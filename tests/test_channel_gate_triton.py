"""Triton channel-gate kernels against the pure-PyTorch oracle (tg_kernels.reference).

Without a GPU these run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel is decorated). Interpreter launches are slow, so shapes are
small; forced plans (small blocks, many splits) exercise the multi-tile, multi-split paths that
real GPU plans take on large tensors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the compiled extension may be missing here; irrelevant to Triton
    import tg_kernels

from tg_kernels import reference
from tg_kernels.backends import triton_interpret

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton  # interpreted on CPU; on a GPU machine compiled, and part of `pytest -m gpu`

if not (triton_interpret() or torch.cuda.is_available()):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from tg_kernels.triton import channel_gate as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One ulp (relative) of the storage dtype; the interpreter truncates fp32 -> bf16 instead of rounding.
ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    grad_y = torch.randn(shape, generator=gen).to(dtype)
    gate = torch.randn(shape[1], generator=gen)
    gate[::3] = 0.0  # closed gates, as in training
    return x.to(DEVICE), gate.to(DEVICE), grad_y.to(DEVICE)


def _assert_close_ulp(actual, expected):
    """Bitwise equal for float32; within one ulp of the storage dtype for float16/bfloat16."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=ULP[expected.dtype], atol=0.0)


def _assert_grad_gate(grad_gate, grad_y, x):
    """float32 result against a float64 sum (products of half inputs are exact in float32)."""
    expected = (grad_y.double() * x.double()).sum(dim=(0, 2))
    assert grad_gate.dtype == torch.float32 and grad_gate.shape == expected.shape
    terms = max(1, x.shape[0] * x.shape[2])
    torch.testing.assert_close(grad_gate.double(), expected, rtol=1e-5, atol=1e-6 * math.sqrt(terms))


def _check(shape, dtype, plan=None, seed=0):
    x, gate, grad_y = _inputs(shape, dtype, seed)
    if plan is None:
        y = tk.channel_gate_forward(x, gate)
        grad_x, grad_gate = tk.channel_gate_backward(grad_y, x, gate)
    else:
        y = tk._launch_forward(x, gate, plan)
        grad_x, grad_gate = tk._launch_backward(grad_y, x, gate, plan)
    _assert_close_ulp(y, reference.channel_gate_forward(x, gate))
    ref_grad_x, _ = reference.channel_gate_backward(grad_y, x, gate)
    _assert_close_ulp(grad_x, ref_grad_x)
    _assert_grad_gate(grad_gate, grad_y, x)
    return y, grad_x, grad_gate


SHAPES = [
    (2, 3, 5),  # tiny, odd everywhere
    (4, 16, 64),  # NCHW-like, inner large
    (3, 8, 300),  # inner not a power of two
    (16, 32, 49),  # 7x7 feature maps
    (8, 64, 1),  # channels contiguous
    (33, 7, 1),  # inner 1, odd C
    (5, 1, 33),  # C = 1
    (1, 1, 1),
    (1, 5, 2),  # small inner > 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_default_plan_matches_reference(shape, dtype):
    _check(shape, dtype)


# (shape, blocks (o, c, i), wanted splits (o, i)): several tiles and partial tiles along every axis,
# several chunks along outer and inner, uneven last chunks.
FORCED = [
    ((7, 5, 37), (2, 2, 8), (3, 2)),
    ((9, 13, 1), (2, 4, 1), (4, 1)),
    ((1, 3, 70), (1, 1, 16), (1, 5)),
    ((6, 3, 10), (4, 4, 4), (1, 3)),
    ((20, 300, 1), (1, 128, 1), (20, 1)),  # 20 splits, C > 256: the split sum loops over blocks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "blocks", "splits"), FORCED, ids=str)
def test_forced_plans_match_reference(shape, blocks, splits, dtype):
    plan = tk.make_plan(
        *shape, block_o=blocks[0], block_c=blocks[1], block_i=blocks[2], split_o=splits[0], split_i=splits[1]
    )
    assert plan.splits > 1 or plan.c_tiles > 1
    _check(shape, dtype, plan)


def test_int64_offsets_path():
    """The int64 variant (used from 2**31 padded elements, too big to run here) on a small shape."""
    shape = (5, 6, 21)
    plan = tk.make_plan(*shape, block_o=2, block_c=4, block_i=8, split_o=2, split_i=2, force_int64=True)
    assert plan.int64
    for dtype in DTYPES:
        _check(shape, dtype, plan)


@pytest.mark.parametrize("shape", [(64, 96, 1), (4, 16, 300)], ids=str)
def test_gpu_plan_runs_correctly(shape):
    """The plan a GPU would use for this shape (smaller tiles than the interpreter's) is also right."""
    plan = tk.plan(*shape, torch.float32, interpret=False)
    _check(shape, torch.float32, plan)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(shape, dtype):
    x, gate, grad_y = _inputs(shape, dtype)
    y = tk.channel_gate_forward(x, gate)
    assert y.shape == shape and y.dtype == dtype
    grad_x, grad_gate = tk.channel_gate_backward(grad_y, x, gate)
    assert grad_x.shape == shape and grad_x.dtype == dtype
    assert grad_gate.dtype == torch.float32 and torch.equal(grad_gate, torch.zeros(shape[1], device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype):
    shape = (7, 5, 37)
    plan = tk.make_plan(*shape, block_o=2, block_c=2, block_i=8, split_o=3, split_i=2)
    x, gate, grad_y = _inputs(shape, dtype, seed=3)
    runs = [tk._launch_backward(grad_y, x, gate, plan) for _ in range(2)]
    runs += [tk.channel_gate_backward(grad_y, x, gate) for _ in range(2)]
    for grad_x, grad_gate in runs[1:2]:
        assert torch.equal(grad_x, runs[0][0]) and torch.equal(grad_gate, runs[0][1])
    for grad_x, grad_gate in runs[3:]:
        assert torch.equal(grad_x, runs[2][0]) and torch.equal(grad_gate, runs[2][1])


LARGE_SHAPES = [
    (32, 64, 3136),
    (256, 256, 3136),
    (128, 512, 49),
    (1, 3, 2**26),
    (8192, 768, 1),
    (65536, 96, 1),
    (4096, 4096, 1),
    (3, 2**30, 1),
    (2**20, 2048, 1),
    (1000, 3, 1),
    (16, 288, 289),
    (2, 65536, 3),
]


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
def test_plan_invariants(shape, dtype, interpret):
    """Plans (no launch) for realistic and huge shapes: valid blocks, full coverage, bounded grids."""
    outer, channels, inner = shape
    p = tk.plan(*shape, dtype, interpret=interpret)
    assert p == tk.plan(*shape, dtype, interpret=interpret)  # a pure function of the shape
    blocks = (p.block_o, p.block_c, p.block_i)
    assert all(b >= 1 and b & (b - 1) == 0 for b in blocks)
    assert math.prod(blocks) <= 2**20  # Triton's largest block
    # Chunks cover each dimension exactly once and none is empty.
    assert p.o_chunk % p.block_o == 0 and p.i_chunk % p.block_i == 0
    assert (p.split_o - 1) * p.o_chunk < outer <= p.split_o * p.o_chunk
    assert (p.split_i - 1) * p.i_chunk < inner <= p.split_i * p.i_chunk
    assert p.forward_grid < 2**31 and p.backward_grid < 2**31
    assert p.backward_grid <= max(tk._TARGET_PROGRAMS, p.c_tiles)
    if outer * channels * inner >= 2**31:
        assert p.int64  # never int32 offsets where they could overflow
    if not interpret:
        # Partial sums are a small fraction of the input; channel-contiguous reads are long runs.
        assert p.splits * channels <= max(channels, outer * channels * inner // 64)
        assert p.block_c * p.block_i >= min(128, channels * inner) or p.block_i < inner
    if outer * channels * inner >= 2**24 and not interpret:
        assert p.backward_grid >= 256  # enough programs to fill a GPU


def test_validation():
    x, gate, grad_y = _inputs((2, 3, 4), torch.float32)
    with pytest.raises(ValueError, match="3-D"):
        tk.channel_gate_forward(x.view(6, 4), gate)
    with pytest.raises(ValueError, match="contiguous"):
        tk.channel_gate_forward(x.transpose(0, 2).contiguous().transpose(0, 2), gate)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.channel_gate_forward(x.double(), gate)
    with pytest.raises(TypeError, match="gate must be float32"):
        tk.channel_gate_forward(x, gate.half())
    with pytest.raises(ValueError, match=r"gate must have shape \[3\]"):
        tk.channel_gate_forward(x, gate[:2])
    with pytest.raises(ValueError, match="gate must be contiguous"):
        tk.channel_gate_forward(x, torch.zeros(6, device=DEVICE)[::2])
    with pytest.raises(TypeError, match="expects tensors"):
        tk.channel_gate_forward(x.tolist(), gate)
    with pytest.raises(ValueError, match="grad_y must match x"):
        tk.channel_gate_backward(grad_y.half(), x, gate)
    with pytest.raises(ValueError, match="grad_y must match x"):
        tk.channel_gate_backward(grad_y[:1], x, gate)
    with pytest.raises(ValueError, match="grad_y must be contiguous"):
        tk.channel_gate_backward(grad_y.transpose(0, 2).contiguous().transpose(0, 2), x, gate)
    with pytest.raises(ValueError, match="power of two"):
        tk.make_plan(2, 3, 4, block_o=3, block_c=1, block_i=1, split_o=1, split_i=1)
    with pytest.raises(ValueError, match="plan for shape"):
        tk._launch_forward(x, gate, tk.plan(2, 3, 5, torch.float32))


def _public_cases():
    """(name, x, dim) for the public op: every layout the op layer maps onto [outer, C, inner]."""
    gen = torch.Generator().manual_seed(7)
    nchw = torch.randn(2, 6, 5, 3, generator=gen)
    return [
        ("nchw", nchw, 1),
        ("channels_last", nchw.to(memory_format=torch.channels_last), 1),
        ("nc", torch.randn(9, 6, generator=gen), 1),
        ("nlc_dim-1", torch.randn(3, 4, 6, generator=gen), -1),
        ("permuted", torch.randn(5, 6, 4, generator=gen).transpose(0, 2), 1),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(_public_cases())), ids=[c[0] for c in _public_cases()])
def test_public_op_with_triton_backend(case, dtype):
    name, x0, dim = _public_cases()[case]
    x0 = x0.to(DEVICE)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(x0.shape[dim], generator=gen).to(DEVICE)
    w[::2] = 0.0
    shape = [1] * x0.dim()
    shape[dim] = -1
    grad_y = torch.randn(x0.shape, generator=gen).to(DEVICE).to(dtype)

    x = x0.to(dtype).requires_grad_()
    gate = w.clone().requires_grad_()
    with tg_kernels.use_backend("triton"):
        y = tg_kernels.channel_gate(x, gate, dim)
        y.backward(grad_y)

    x_ref = x.detach()
    y_ref = (x_ref.float() * w.view(shape)).to(dtype)
    _assert_close_ulp(y, y_ref)
    if name != "permuted":  # the op layer copies other layouts to contiguous and returns that layout
        assert y.stride() == x.stride()  # output keeps the input's layout
    _assert_close_ulp(x.grad, (grad_y.float() * w.view(shape)).to(dtype))
    reduce_dims = [d for d in range(x0.dim()) if d != dim % x0.dim()]
    expected = (grad_y.double() * x_ref.double()).sum(dim=reduce_dims)
    terms = x0.numel() // x0.shape[dim]
    torch.testing.assert_close(gate.grad.double(), expected, rtol=1e-5, atol=1e-6 * math.sqrt(terms))


# Compiles the kernels for sm_90 without a GPU (Triton ships ptxas), with the argument specialization
# the JIT applies at launch (ints equal to 1 become constants, multiples of 16 are marked divisible),
# and lists the global load instructions, so a change that breaks GPU compilation or 16-byte
# vectorized loads fails here. Runs in a subprocess: these kernels are interpreted in this one.
_COMPILE_SCRIPT = r"""
import json, re, sys, warnings
warnings.simplefilter("ignore")
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tg_kernels.triton import channel_gate as k

def compile_kernel(fn, pointers, scalars, constexprs, num_warps):
    sig, attrs, consts = {}, {}, dict(constexprs)
    unspecialised = {fn.arg_names[a] if isinstance(a, int) else a for a in fn.do_not_specialize}
    for idx, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif name in unspecialised:
            sig[name] = "i64" if scalars[name] >= 2**31 else "i32"
        elif scalars[name] == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i64" if scalars[name] >= 2**31 else "i32"
            if scalars[name] % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    return sorted(set(re.findall(r"ld\.global[.\w]*", compiled.asm["ptx"])))

results = []
for outer, channels, inner, dtype_name in json.loads(sys.argv[1]):
    p = k.plan(outer, channels, inner, getattr(torch, dtype_name), interpret=False)
    ptr = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[dtype_name]
    fwd = compile_kernel(
        k._forward_kernel, {"x_ptr": ptr, "gate_ptr": "*fp32", "y_ptr": ptr},
        k._forward_scalars(p), k._constexprs(p), p.num_warps,
    )
    bwd_ptrs = {"grad_y_ptr": ptr, "x_ptr": ptr, "gate_ptr": "*fp32", "grad_x_ptr": ptr, "partial_ptr": "*fp32"}
    bwd = compile_kernel(k._backward_kernel, bwd_ptrs, k._backward_scalars(p), k._constexprs(p), p.num_warps)
    block_s, block_c = k._sum_splits_config(channels, max(p.splits, 2))
    red = compile_kernel(
        k._sum_splits_kernel, {"partial_ptr": "*fp32", "out_ptr": "*fp32"},
        {"splits": max(p.splits, 2), "C": channels}, {"BLOCK_S": block_s, "BLOCK_C": block_c}, 4,
    )
    results.append({"forward": fwd, "backward": bwd, "sum": red})
print(json.dumps(results))
"""

# (shape, dtype, whether the contiguous runs are 16-element aligned so loads must be 16-byte vectors)
_COMPILE_CASES = [
    ((32, 64, 3136), "float32", True),  # NCHW
    ((8192, 768, 1), "bfloat16", True),  # channels last / (N, L, C)
    ((16, 288, 289), "float16", False),  # odd spatial size: scalar loads, still must compile
    ((3, 2**30, 1), "float32", True),  # int64 offsets
]


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_vector_loads():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = json.dumps([[*shape, dtype] for shape, dtype, _ in _COMPILE_CASES])
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, cases],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (shape, dtype, aligned), loads in zip(_COMPILE_CASES, results):
        for kernel in ("forward", "backward"):
            assert loads[kernel], (shape, dtype, kernel)
            if aligned:
                assert "ld.global.v4.b32" in loads[kernel], (shape, dtype, kernel, loads[kernel])
