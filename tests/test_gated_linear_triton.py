"""Triton gated-linear kernels (tg_kernels.triton.gated_linear) against the torch skipping oracle.

The oracle is ``_skip.skip_forward`` / ``_skip.skip_backward`` with ``LinearMath`` run in float64 on
the same (rounded) inputs, plus a dense ``F.linear(x, W, b) * gate`` autograd reference. Without a
GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small; a forced plan of 16-wide tiles exercises the multi-tile
paths (several row, channel and K tiles, channel tiles wholly beyond the active count) that real
GPU plans take on large layers. Every float buffer the launcher allocates is NaN-poisoned, so an
element a kernel fails to write shows up.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the compiled extension may be missing here; irrelevant to Triton
    import tg_kernels  # noqa: F401

from tg_kernels.backends import triton_interpret
from tg_kernels.ops import _skip
from tg_kernels.ops.gated_linear import LinearMath

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton  # interpreted on CPU; on a GPU machine compiled, and part of `pytest -m gpu`

if not (triton_interpret() or torch.cuda.is_available()):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from tg_kernels.triton import gated_linear as tgl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret() else "cpu"
MATH = LinearMath()
MODES = ("exact", "hard")
# Relative tolerance of values rounded to the storage dtype (the interpreter truncates fp32 -> bf16).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SMALL_PLAN = tgl.GatedLinearPlan(16, 16, 16, 16, 16, 16, 16, 16, 16, num_warps=4, num_stages=2, int64=False)


class _PoisonedTorch:
    """The torch module, except that empty/empty_like float tensors come back filled with NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-(2**30))

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(tgl, "torch", _PoisonedTorch())


@pytest.fixture(params=["default", "small"])
def tile_plan(request, monkeypatch):
    """The shape's own plan, or 16-wide tiles everywhere (many tiles on small shapes)."""
    if request.param == "small":
        monkeypatch.setattr(tgl, "plan", lambda *args, **kwargs: SMALL_PLAN)
    return request.param


def _gate(channels: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    if pattern == "open":
        return torch.ones(channels)
    if pattern == "closed":
        return torch.zeros(channels)
    if pattern == "binary":  # about half closed, 0/1 values
        return (torch.rand(channels, generator=gen) < 0.5).float()
    if pattern == "values":  # arbitrary nonzero values (paper-form gates, negatives), some exact zeros
        gate = torch.randn(channels, generator=gen)
        gate[torch.rand(channels, generator=gen) < 0.4] = 0.0
        return gate
    if pattern == "first16":  # the active count is exactly one small tile
        gate = torch.zeros(channels)
        gate[torch.randperm(channels, generator=gen)[:16]] = 1.5
        return gate
    raise ValueError(pattern)


def _inputs(n, k, c, dtype, pattern, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen).to(dtype)
    weight = (torch.randn(c, k, generator=gen) / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if bias else None
    grad_y = torch.randn(n, c, generator=gen).to(dtype)
    gate = _gate(c, pattern, gen)
    return tuple(t.to(DEVICE) if t is not None else None for t in (grad_y, x, weight, b, gate))


def _f64(t):
    return t.double() if t is not None else None


def _oracle(grad_y, x, weight, bias, gate, mode):
    """(y, grad_x, grad_weight, grad_bias, grad_gate) of the torch skipping path, in float64."""
    x64, w64, b64, dy64 = _f64(x), _f64(weight), _f64(bias), _f64(grad_y)
    y = _skip.skip_forward(MATH, x64, w64, b64, gate, 1, [x.shape[0], weight.shape[0]])
    grads = _skip.skip_backward(MATH, dy64, x64, w64, b64, gate, 1, mode, True, True)
    return (y, *grads)


def _close(actual, expected, dtype, what, tol=None):
    """Within `tol` (default: the dtype's rounding) relative to the element and to the largest |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{what}: NaN (an element was not written)"
    tol = TOL[dtype] if tol is None else tol
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale, msg=what)


def _check(grad_y, x, weight, bias, gate, mode):
    dtype = x.dtype
    y = tgl.gated_linear_forward(x, weight, bias, gate)
    grad_x, grad_w, grad_b, grad_gate = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, mode, True, True)
    ref = _oracle(grad_y, x, weight, bias, gate, mode)
    assert y.dtype == grad_x.dtype == grad_w.dtype == dtype and grad_gate.dtype == torch.float32
    _close(y, ref[0], dtype, "y")
    _close(grad_x, ref[1], dtype, "grad_x")
    _close(grad_w, ref[2], dtype, "grad_weight")
    if bias is None:
        assert grad_b.numel() == 0
    else:
        assert grad_b.dtype == dtype
        _close(grad_b, ref[3], dtype, "grad_bias")
    # grad_gate sums exact products of the stored inputs in float32 (G is never rounded): fp32 accuracy.
    _close(grad_gate, ref[4], torch.float32, "grad_gate", tol=2e-5)
    closed = gate == 0
    assert torch.equal(y[:, closed], torch.zeros_like(y[:, closed])), "closed columns of y must be exact zeros"
    assert torch.equal(grad_w[closed], torch.zeros_like(grad_w[closed]))
    if bias is not None:
        assert torch.equal(grad_b[closed], torch.zeros_like(grad_b[closed]))
    if mode == "hard":
        assert torch.equal(grad_gate[closed], torch.zeros_like(grad_gate[closed]))
    return y, grad_x, grad_w, grad_b, grad_gate


PATTERNS = ["open", "binary", "values", "closed"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_oracle(dtype, pattern, mode, tile_plan):
    """N, K and C odd (not multiples of any tile); every gate pattern, both modes, both plans."""
    _check(*_inputs(37, 33, 45, dtype, pattern, seed=hash((pattern, mode)) % 1000), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", ["binary", "values"])
def test_bfloat16(pattern, mode, tile_plan):
    _check(*_inputs(37, 33, 45, torch.bfloat16, pattern, seed=3), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", ["values", "first16"])
def test_without_bias(pattern, mode):
    _check(*_inputs(21, 19, 35, torch.float32, pattern, bias=False, seed=4), mode)


@pytest.mark.parametrize("mode", MODES)
def test_active_count_on_tile_boundary(mode, tile_plan):
    """Exactly 16 open channels: the first tile is wholly active, the others wholly closed."""
    _check(*_inputs(20, 24, 48, torch.float32, "first16", seed=5), mode)


def test_default_plan_several_tiles():
    """A shape larger than the interpreter's 64-wide tiles: several tiles with the shape's own plan."""
    _check(*_inputs(70, 67, 131, torch.float16, "values", seed=6), "exact")


@pytest.mark.parametrize("mode", MODES)
def test_closed_channels_are_skipped(mode, tile_plan):
    """NaN weights and bias of closed channels never reach y or grad_x (skipped, not computed and masked);
    in `hard` they reach nothing, in `exact` only the closed gates' own gradients (as in the oracle)."""
    grad_y, x, weight, bias, gate = _inputs(23, 21, 45, torch.float32, "values", seed=11)
    closed = gate == 0
    weight[closed] = float("nan")
    bias[closed] = float("nan")
    y = tgl.gated_linear_forward(x, weight, bias, gate)
    grad_x, grad_w, grad_b, grad_gate = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, mode, True, True)
    ref = _oracle(grad_y, x, weight, bias, gate, mode)
    for name, actual, expected in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, grad_x, grad_w, grad_b), ref):
        _close(actual, expected, torch.float32, name)
    if mode == "exact":  # <W_c, G_c> with NaN W_c, exactly as the torch path computes it
        assert grad_gate[closed].isnan().all()
    else:
        assert (grad_gate[closed] == 0).all()
    _close(grad_gate[~closed], ref[4][~closed], torch.float32, "grad_gate", tol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_dense_autograd_reference(mode):
    """Against F.linear(x, W, b) * gate and plain autograd (float64): `hard` zeroes closed rows."""
    grad_y, x, weight, bias, gate = _inputs(29, 18, 40, torch.float32, "values", seed=7)
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    gate64 = gate.double().requires_grad_()
    y_ref = F.linear(*leaves) * gate64
    y_ref.backward(grad_y.double())
    expected = [leaves[0].grad, leaves[1].grad, leaves[2].grad, gate64.grad]
    if mode == "hard":
        closed = gate == 0
        for t in expected[1:]:
            t[closed] = 0
    y = tgl.gated_linear_forward(x, weight, bias, gate)
    grads = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, mode, True, True)
    _close(y, y_ref.detach(), torch.float32, "y")
    for name, actual, exp in zip(("grad_x", "grad_weight", "grad_bias", "grad_gate"), grads, expected):
        _close(actual, exp, torch.float32, name, tol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_batch_zero(mode):
    grad_y, x, weight, bias, gate = _inputs(0, 13, 21, torch.float32, "values")
    y = tgl.gated_linear_forward(x, weight, bias, gate)
    assert y.shape == (0, 21)
    grad_x, grad_w, grad_b, grad_gate = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, mode, True, True)
    assert grad_x.shape == (0, 13)
    for t, like in ((grad_w, weight), (grad_b, bias), (grad_gate, gate)):
        assert t.shape == like.shape and torch.equal(t, torch.zeros_like(t))


def test_no_channels_and_no_inputs():
    """C = 0 (nothing to compute) and K = 0 (y = bias * gate, as F.linear gives)."""
    grad_y, x, weight, bias, gate = _inputs(5, 7, 0, torch.float32, "values")
    assert tgl.gated_linear_forward(x, weight, bias, gate).shape == (5, 0)
    grad_x, grad_w, grad_b, grad_gate = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, "exact", True, True)
    assert torch.equal(grad_x, torch.zeros_like(x)) and grad_w.shape == (0, 7) and grad_gate.shape == (0,)
    grad_y, x, weight, bias, gate = _inputs(5, 0, 9, torch.float32, "values")
    y = tgl.gated_linear_forward(x, weight, bias, gate)
    torch.testing.assert_close(y, (bias * gate).expand(5, 9))
    grad_x, grad_w, grad_b, grad_gate = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, "exact", True, True)
    assert grad_x.shape == (5, 0) and grad_w.shape == (9, 0)
    torch.testing.assert_close(grad_b, gate * grad_y.sum(0))
    torch.testing.assert_close(grad_gate, bias * grad_y.sum(0))


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_strided_grad_y(layout):
    """grad_y may have any strides (autograd hands out expanded gradients, e.g. from y.sum())."""
    grad_y, x, weight, bias, gate = _inputs(19, 17, 23, torch.float32, "values", seed=8)
    column_major = grad_y.t().contiguous().t()
    grad_y = column_major if layout == "transposed" else torch.randn(1, 23, device=DEVICE).expand(19, 23)
    assert not grad_y.is_contiguous()
    _check(grad_y, x, weight, bias, gate, "exact")


def test_need_flags():
    grad_y, x, weight, bias, gate = _inputs(9, 17, 21, torch.float32, "binary")
    full = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, "exact", True, True)
    only_x = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, "exact", True, False)
    assert torch.equal(only_x[0], full[0]) and all(t.numel() == 0 for t in only_x[1:])
    only_params = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, "hard", False, True)
    assert only_params[0].numel() == 0 and all(t.numel() > 0 for t in only_params[1:])
    nothing = tgl.gated_linear_backward(grad_y, x, weight, bias, gate, "exact", False, False)
    assert all(t.numel() == 0 for t in nothing)
    assert len({t.data_ptr() for t in full}) == 4 and len({id(t) for t in nothing}) == 4  # no aliased outputs


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(mode, tile_plan):
    """Bitwise equal results on repeated runs (fixed-order reductions, no atomics).

    Under the interpreter programs run one at a time, so this cannot expose a race; on a GPU it can.
    """
    inputs = _inputs(37, 50, 45, torch.float16, "values", seed=9)
    first = (tgl.gated_linear_forward(*inputs[1:]), *tgl.gated_linear_backward(*inputs, mode, True, True))
    second = (tgl.gated_linear_forward(*inputs[1:]), *tgl.gated_linear_backward(*inputs, mode, True, True))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_active_channels():
    gate = torch.tensor([0.0, 2.0, 0.0, -1.0, 0.5, 0.0], device=DEVICE)
    perm, n_active = tgl.active_channels(gate)
    assert perm.dtype == n_active.dtype == torch.int32 and n_active.shape == (1,)
    assert perm.tolist() == [1, 3, 4, 0, 2, 5] and n_active.item() == 3


def test_plan_tiles():
    for shape in [(1, 1, 1), (37, 45, 33), (4096, 4096, 1024), (5, 100000, 3)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for interpret in (False, True):
                p = tgl.plan(*shape, dtype, interpret=interpret)
                tiles = [v for f, v in dataclasses.asdict(p).items() if f not in ("num_warps", "num_stages", "int64")]
                assert all(t >= 16 and t & (t - 1) == 0 for t in tiles), (shape, p)
    assert tgl.plan(2**16, 2**16, 2**15, torch.float16).int64
    assert not tgl.plan(4096, 4096, 1024, torch.float16).int64


def _bad_call(**overrides):
    grad_y, x, weight, bias, gate = _inputs(4, 6, 5, torch.float32, "binary")
    args = {"grad_y": grad_y, "x": x, "weight": weight, "bias": bias, "gate": gate, "mode": "exact"}
    args.update(overrides)
    return args


def _on_device(value):
    """A CPU tensor moved to DEVICE with its strides kept (non-contiguous stays non-contiguous)."""
    if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or DEVICE == "cpu":
        return value
    out = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=DEVICE)
    return out.copy_(value)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"x": torch.randn(4, 6, 1)}, ValueError, "2-D"),
        ({"weight": torch.randn(5, 7)}, ValueError, "disagree on K"),
        ({"x": torch.randn(4, 6, dtype=torch.float64)}, TypeError, "float32, float16 or bfloat16"),
        ({"weight": torch.randn(5, 6, dtype=torch.float16)}, TypeError, "weight must have x's dtype"),
        ({"bias": torch.randn(6)}, ValueError, "bias must have shape"),
        ({"bias": torch.randn(5, dtype=torch.float16)}, TypeError, "bias must have x's dtype"),
        ({"gate": torch.ones(5, dtype=torch.float64)}, TypeError, "gate must be float32"),
        ({"gate": torch.ones(4)}, ValueError, r"gate must have shape \[5\]"),
        ({"gate": torch.ones(5, 1)}, ValueError, r"gate must have shape \[5\]"),
        ({"x": torch.randn(6, 4).t()}, ValueError, "x must be contiguous"),
        ({"weight": torch.randn(6, 5).t()}, ValueError, "weight must be contiguous"),
        ({"gate": torch.ones(10)[::2]}, ValueError, "gate must be contiguous"),
        ({"gate": torch.ones(5, device="meta")}, ValueError, "gate is on meta"),
        ({"x": "not a tensor"}, TypeError, "x must be a tensor"),
        ({"grad_y": torch.randn(4, 6)}, ValueError, "grad_y must have shape"),
        ({"grad_y": torch.randn(4, 5, dtype=torch.float16)}, ValueError, "grad_y must have shape"),
        ({"mode": "none"}, ValueError, "mode must be one of"),
    ],
)
def test_bad_inputs(overrides, error, match):
    args = _bad_call(**{name: _on_device(value) for name, value in overrides.items()})
    with pytest.raises(error, match=match):
        tgl.gated_linear_backward(*args.values(), True, True)
    if not set(overrides) & {"grad_y", "mode"}:
        del args["grad_y"], args["mode"]
        with pytest.raises(error, match=match):
            tgl.gated_linear_forward(*args.values())


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the message for CPU tensors without the interpreter")
def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(tgl, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        tgl.gated_linear_forward(*_inputs(4, 6, 5, torch.float32, "binary")[1:])


_TF32_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    exec(sys.argv[1])  # the user's TF32 setting, before anything reads it
    from tg_kernels.triton import gated_linear as tgl
    device = "cuda" if torch.cuda.is_available() and not tgl._INTERPRETED else "cpu"
    x, w, b = torch.randn(5, 7, device=device), torch.randn(6, 7, device=device), torch.randn(6, device=device)
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], device=device)
    y = tgl.gated_linear_forward(x, w, b, gate)  # the float32 launch reads the TF32 setting
    tgl.gated_linear_backward(torch.ones_like(y), x, w, b, gate, "exact", True, True)
    torch.testing.assert_close(y, (x @ w.t() + b) * gate, rtol=2e-2, atol=2e-2)
    print(tgl._dot_config(torch.float32, interpret=False)["PRECISION"])
    """
)


@pytest.mark.parametrize(
    ("setting", "precision"),
    [
        ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),  # the new API
        ("torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
        ("torch.set_float32_matmul_precision('high')", "tf32"),  # the legacy API
    ],
    ids=["new-api", "new-api-override", "legacy-high"],
)
def test_float32_launch_reads_the_tf32_setting_through_either_api(setting, precision):
    """A float32 launch works and uses TF32 exactly when the user's setting allows it, whichever API set it.

    (Reading the legacy ``allow_tf32`` raised a RuntimeError once the new API had been used.) In a
    subprocess: mixing the two APIs leaves process-wide state that later legacy reads trip over.
    """
    env = dict(os.environ)
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _TF32_SCRIPT, setting], env=env, capture_output=True, text=True, timeout=300, cwd=repo
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == precision


def test_float32_is_ieee_unless_tf32_is_allowed():
    """The default torch settings (no TF32 for float32 matmuls): IEEE float32 products, no tensor cores."""
    assert tgl.matmul_allows_tf32() is False  # nothing in the test suite sets it
    assert tgl._dot_config(torch.float32, interpret=False) == {"DOT_F32": True, "PRECISION": "ieee"}
    assert tgl._dot_config(torch.bfloat16, interpret=False) == {"DOT_F32": False, "PRECISION": None}
    assert tgl._dot_config(torch.bfloat16, interpret=True) == {"DOT_F32": True, "PRECISION": "tf32"}


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tg_kernels.triton import gated_linear as tgl

    FP32_PTRS = {"gate_ptr", "partial_ptr", "sum_ptr", "gg_ptr"}
    I32_PTRS = {"perm_ptr", "n_active_ptr"}

    def compile_for(arch, kernel, dtype, constexprs, **options):
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32" if name in FP32_PTRS else "*i32" if name in I32_PTRS else "*" + dtype
            else:
                sig[name] = "i32"
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

    # the operand rule a GPU launch uses (bf16 stays bf16 there)
    dots = {name: tgl._dot_config(getattr(torch, full), interpret=False)
            for name, full in (("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"))}
    opts = {"num_warps": 8, "num_stages": 3}
    for arch in (80, 90):
        fwd = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "HAS_BIAS": True, "INT64": False}
        compile_for(arch, tgl._forward_kernel, "fp16", {**fwd, **dots["fp16"]}, **opts)
        compile_for(arch, tgl._forward_kernel, "bf16", {**fwd, **dots["bf16"]}, **opts)
        dx = {"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_C": 32, "INT64": True}
        compile_for(arch, tgl._input_grad_kernel, "fp32", {**dx, **dots["fp32"]}, **opts)
        dw = {"BLOCK_C": 128, "BLOCK_K": 128, "BLOCK_N": 64, "HARD": True, "INT64": False}
        compile_for(arch, tgl._weight_grad_kernel, "bf16", {**dw, **dots["bf16"]}, **opts)
        gg = {"BLOCK_S": 16, "BLOCK_C": 256, "HAS_BIAS": True, "HARD": True}
        compile_for(arch, tgl._gate_grad_kernel, "bf16", gg, num_warps=4)
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    """The kernels go through the real compiler (TTIR -> PTX -> ptxas cubin for sm_80, sm_90) without a GPU.

    The interpreter runs Python, so it accepts code the compiler rejects (e.g. a constexpr branch
    returning two dtypes); this catches that class of bug here.
    """
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=900, cwd=repo
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_real_plan_no_host_sync(dtype, mode):
    """On a GPU: the real plan on a layer-sized shape, and no host synchronisation in either call."""
    if triton_interpret():
        pytest.skip("runs the compiled kernels (TRITON_INTERPRET is set)")
    gen = torch.Generator().manual_seed(10)
    n, k, c = 300, 260, 520
    x = torch.randn(n, k, generator=gen).to(dtype).cuda()
    weight = (torch.randn(c, k, generator=gen) / k**0.5).to(dtype).cuda()
    bias = torch.randn(c, generator=gen).to(dtype).cuda()
    grad_y = torch.randn(n, c, generator=gen).to(dtype).cuda()
    gate = _gate(c, "values", gen).cuda()
    _check(grad_y, x, weight, bias, gate, mode)  # compiles, then checks values
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tgl.gated_linear_forward(x, weight, bias, gate)
        tgl.gated_linear_backward(grad_y, x, weight, bias, gate, mode, True, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("skip", ["none", "exact", "hard"])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_linear_module_on_the_triton_backend_matches_torch(skip, bias):
    """The op-level wiring: GatedLinear under use_backend("triton") against the torch backend."""
    from tg_kernels import GatedLinear, use_backend

    torch.manual_seed(0)
    layer = GatedLinear(24, 40, bias=bias, skip=skip).to(DEVICE)
    with torch.no_grad():
        layer.gate.weight[torch.randperm(40)[:15]] = -0.3
    x = torch.randn(3, 7, 24, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        layer.zero_grad()
        xb = x.clone().requires_grad_(True)
        with use_backend(backend):
            y = layer(xb)
            y.backward(torch.ones_like(y))
        grads = [xb.grad, layer.weight.grad, layer.gate.weight.grad] + ([layer.bias.grad] if bias else [])
        results[backend] = [y.detach(), *[g.clone() for g in grads]]
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
