"""Triton kernels of the skipping Linear layer: ``y = (x @ W^T + b) * gate``, closed channels skipped.

Same contract as :func:`tg_kernels.ops._skip.skip_forward` / ``skip_backward`` with
:class:`tg_kernels.ops.gated_linear.LinearMath` (docs/design.md §3): ``x [N, K]`` and ``weight [C, K]``
contiguous, ``bias [C]`` or None, all of one dtype (float32, float16 or bfloat16); ``gate [C]``
float32, any values, exactly 0 meaning closed. Accumulation is float32; outputs and parameter
gradients come back in the inputs' dtype, ``grad_gate`` in float32.

Active set, on the device and without host synchronisation: ``perm`` lists the channels with the open
ones first (a stable sort of ``gate == 0``) and ``n_active`` (a 1-element int32 tensor) counts them.
Every kernel reads ``n_active`` from memory; grids have their worst-case size and programs whose
channel tile lies wholly beyond ``n_active`` only write zeros (or nothing) and return, as fused-MoE
kernels do. The active count is thus rounded up to the channel tile (>= 16, a multiple of 8): the
padding slots of the last active tile are closed channels, loaded as zero rows and written as zeros.

Kernels:

- Forward (:func:`gated_linear_forward`), a gather-GEMM: program (row tile, column tile j) gathers weight
  rows ``perm[j*BN:(j+1)*BN]``, computes ``x @ W_sel^T`` with ``tl.dot``, adds the bias, multiplies
  by the gate and scatter-stores into ``y[:, perm[...]]``. Column tiles beyond ``n_active`` store
  zeros without a GEMM, so closed columns are zeroed in the same pass.
- Input gradient (both modes): ``grad_x = (grad_y[:, A] * gate[A]) @ W[A]``: one GEMM whose reduction
  runs over the gathered active channels only, its loop bound read from ``n_active``.
- Weight gradient, ``"exact"``: one full ``G = grad_y^T x`` (every channel, ungated dy) per
  (channel tile, K tile) program, fused with the row-dot ``<W_c, G_c>`` over that K tile: programs
  write ``grad_weight = gate * G`` and ``partial[k_tile, c]``; the K-tile-0 program also writes
  ``sum(grad_y[:, c])``. A second small kernel sums the partials over K tiles in a fixed order and
  writes ``grad_gate = sum + b * sum(dy)`` and ``grad_bias = gate * sum(dy)``. No atomics:
  bitwise reproducible for a given shape, dtype and Triton build.
- Weight gradient, ``"hard"``: the same kernel over ``perm`` order; tiles beyond ``n_active`` write zeros
  (grad_weight rows, partials, sums) and return, so closed channels get zero grad_weight, grad_bias
  and grad_gate.

``tl.dot`` operand rule (one rule for GPU and interpreter):

- float16, and bfloat16 on a GPU: operands stay in the storage dtype (tensor cores at the 16-bit
  rate, float32 accumulation).
- bfloat16 in the interpreter (which cannot multiply bf16): operands are upcast to float32 and
  multiplied with ``input_precision="tf32"``. Every bfloat16 value is exact in tf32, so this is the
  same bf16 product with float32 accumulation.
- float32: ``"tf32"`` when the user's torch settings allow TF32 for float32 matmuls
  (:func:`matmul_allows_tf32`: ``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
  ``torch.set_float32_matmul_precision("high")``, ``allow_tf32 = True``), else ``"ieee"`` (PyTorch's
  default for float32; no tensor cores).
- The input gradient's ``grad_y * gate`` is rounded to the storage dtype before the dot, as the torch
  path does (the interpreter truncates fp32 -> bf16 where a GPU rounds).

Block sizes are a plain function of the shape and dtype (:func:`plan`); no autotuning. Offsets are
int32 unless an offset into a tensor (grad_y's from its strides) can reach 2**31, then int64 (a
compile-time switch). The row count and the arguments derived from it are not specialised
(``do_not_specialize``), so a new batch or token count reuses the compiled kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["GatedLinearPlan", "active_channels", "gated_linear_backward", "gated_linear_forward", "plan"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MODES = ("exact", "hard")
_INT32_LIMIT = 2**31
_REDUCE_TILE = 4096


@triton.jit
def _to_dot(t, DOT_F32: tl.constexpr):
    """A loaded tile as a tl.dot operand: float32 when DOT_F32, else the storage dtype (float16)."""
    return t.to(tl.float32 if DOT_F32 else t.dtype)


@triton.jit(do_not_specialize=["N", "m_tiles"])
def _forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    gate_ptr,
    perm_ptr,
    n_active_ptr,
    y_ptr,
    N,
    C,
    K,
    m_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    INT64: tl.constexpr,
):
    """y[rows, perm[cols]] = (x[rows] @ W[perm[cols]]^T + b) * gate for one (row tile, column tile)."""
    pid = tl.program_id(0)
    pid_m = pid % m_tiles
    pid_n = pid // m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    pos_mask = pos < C
    ch = tl.load(perm_ptr + pos, mask=pos_mask, other=0)
    if INT64:
        rows = rows.to(tl.int64)
        ch = ch.to(tl.int64)
    # The [BLOCK_M, BLOCK_N] output pointers and mask are built where they are stored, not before the
    # K loop: live across it they cost 2 registers per element and spill (ptxas -v, bench/ptxas_report.py).
    n_active = tl.load(n_active_ptr)
    if pid_n * BLOCK_N >= n_active:  # closed columns only: zeros, no GEMM
        tl.store(
            y_ptr + rows[:, None] * C + ch[None, :],
            tl.zeros([BLOCK_M, BLOCK_N], dtype=y_ptr.dtype.element_ty),
            mask=row_mask[:, None] & pos_mask[None, :],
        )
        return
    active = pos < n_active
    # Operand tiles need only the K mask: rows past N are clamped to row N - 1 (their results are not
    # stored) and positions past n_active hold closed channels or channel 0 (valid rows of weight,
    # whose results the gate test below zeroes). Pointers advance by BLOCK_K per step.
    k_offs = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tl.minimum(rows, N - 1)[:, None] * K + k_offs[None, :]
    b_ptrs = w_ptr + ch[None, :] * K + k_offs[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(k_offs < K - k0)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(k_offs < K - k0)[:, None], other=0.0)
        acc = tl.dot(_to_dot(a, DOT_F32), _to_dot(b, DOT_F32), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    g = tl.load(gate_ptr + ch, mask=active, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=active, other=0.0).to(tl.float32)[None, :]
    out = tl.where((g != 0.0)[None, :], acc * g[None, :], 0.0)
    tl.store(
        y_ptr + rows[:, None] * C + ch[None, :],
        out.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & pos_mask[None, :],
    )


@triton.jit(do_not_specialize=["N", "m_tiles"])
def _input_grad_kernel(
    dy_ptr,
    w_ptr,
    gate_ptr,
    perm_ptr,
    n_active_ptr,
    gx_ptr,
    N,
    C,
    K,
    stride_dyn,
    stride_dyc,
    m_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    INT64: tl.constexpr,
):
    """grad_x[rows, kk] = sum over active positions p of grad_y[rows, perm[p]] * gate[perm[p]] * W[perm[p], kk]."""
    pid = tl.program_id(0)
    pid_m = pid % m_tiles
    pid_k = pid // m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < N
    k_mask = kk < K
    if INT64:
        rows = rows.to(tl.int64)
    n_active = tl.load(n_active_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, n_active, BLOCK_C):
        pos = c0 + tl.arange(0, BLOCK_C)
        active = pos < n_active
        ch = tl.load(perm_ptr + pos, mask=active, other=0)
        if INT64:
            ch = ch.to(tl.int64)
        g = tl.load(gate_ptr + ch, mask=active, other=0.0)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dyn + ch[None, :] * stride_dyc,
            mask=row_mask[:, None] & active[None, :],
            other=0.0,
        )
        a = (dy.to(tl.float32) * g[None, :]).to(dy.dtype)  # grad_z in the storage dtype, as in the torch path
        w = tl.load(w_ptr + ch[:, None] * K + kk[None, :], mask=active[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(_to_dot(a, DOT_F32), _to_dot(w, DOT_F32), acc, input_precision=PRECISION)
    tl.store(
        gx_ptr + rows[:, None] * K + kk[None, :],
        acc.to(gx_ptr.dtype.element_ty),
        mask=row_mask[:, None] & k_mask[None, :],
    )


@triton.jit(do_not_specialize=["N"])
def _weight_grad_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    gate_ptr,
    perm_ptr,
    n_active_ptr,
    gw_ptr,
    partial_ptr,
    sum_ptr,
    N,
    C,
    K,
    stride_dyn,
    stride_dyc,
    k_tiles,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HARD: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    INT64: tl.constexpr,
):
    """One (channel tile, K tile) of G = grad_y^T x, fused with the gate row-dot.

    Writes grad_weight[c, kk] = gate[c] * G[c, kk] (0 where gate is 0), partial[k_tile, c] =
    sum over kk of W[c, kk] * G[c, kk] and, from K tile 0, sum[c] = sum over rows of grad_y[:, c].
    HARD: channels are taken in ``perm`` order and only the first ``n_active`` get nonzero results.
    """
    pid = tl.program_id(0)
    pid_k = pid % k_tiles
    pid_c = pid // k_tiles
    pos = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    pos_mask = pos < C
    k_mask = kk < K
    ch = tl.load(perm_ptr + pos, mask=pos_mask, other=0) if HARD else pos
    if INT64:
        ch = ch.to(tl.int64)
    if HARD:  # (grad_weight pointers are built at each store, not kept live across the row loop)
        n_active = tl.load(n_active_ptr)
        if pid_c * BLOCK_C >= n_active:  # closed channels only: zeros, no GEMM
            tl.store(
                gw_ptr + ch[:, None] * K + kk[None, :],
                tl.zeros([BLOCK_C, BLOCK_K], dtype=gw_ptr.dtype.element_ty),
                mask=pos_mask[:, None] & k_mask[None, :],
            )
            zero = tl.zeros([BLOCK_C], dtype=tl.float32)
            tl.store(partial_ptr + pid_k * C + ch, zero, mask=pos_mask)
            tl.store(sum_ptr + ch, zero, mask=pos_mask & (pid_k == 0))
            return
        active = pos < n_active
    else:
        active = pos_mask
    acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    dy_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        if INT64:
            rows = rows.to(tl.int64)
        dy_t = tl.load(
            dy_ptr + rows[None, :] * stride_dyn + ch[:, None] * stride_dyc,
            mask=active[:, None] & row_mask[None, :],
            other=0.0,
        )
        xt = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(_to_dot(dy_t, DOT_F32), _to_dot(xt, DOT_F32), acc, input_precision=PRECISION)
        dy_sum += tl.sum(dy_t.to(tl.float32), axis=1)
    w = tl.load(w_ptr + ch[:, None] * K + kk[None, :], mask=active[:, None] & k_mask[None, :], other=0.0)
    part = tl.sum(w.to(tl.float32) * acc, axis=1)
    tl.store(partial_ptr + pid_k * C + ch, tl.where(active, part, 0.0), mask=pos_mask)
    tl.store(sum_ptr + ch, tl.where(active, dy_sum, 0.0), mask=pos_mask & (pid_k == 0))
    g = tl.load(gate_ptr + ch, mask=active, other=0.0)
    gw = tl.where((g != 0.0)[:, None], acc * g[:, None], 0.0)
    gw_mask = pos_mask[:, None] & k_mask[None, :]
    tl.store(gw_ptr + ch[:, None] * K + kk[None, :], gw.to(gw_ptr.dtype.element_ty), mask=gw_mask)


@triton.jit
def _gate_grad_kernel(
    partial_ptr,
    sum_ptr,
    b_ptr,
    gate_ptr,
    gb_ptr,
    gg_ptr,
    C,
    k_tiles,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HARD: tl.constexpr,
):
    """grad_gate[c] = sum over k tiles of partial[., c] (fixed order) + b[c] * sum[c]; grad_bias = gate * sum.

    HARD: zero for closed channels (gate == 0).
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, k_tiles, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(
            partial_ptr + s[:, None] * C + c[None, :], mask=(s < k_tiles)[:, None] & c_mask[None, :], other=0.0
        )
    grad_gate = tl.sum(acc, axis=0)
    g = tl.load(gate_ptr + c, mask=c_mask, other=0.0)
    is_open = g != 0.0
    if HAS_BIAS:
        dy_sum = tl.load(sum_ptr + c, mask=c_mask, other=0.0)
        grad_gate += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32) * dy_sum
        tl.store(gb_ptr + c, tl.where(is_open, g * dy_sum, 0.0).to(gb_ptr.dtype.element_ty), mask=c_mask)
    if HARD:
        grad_gate = tl.where(is_open, grad_gate, 0.0)
    tl.store(gg_ptr + c, grad_gate, mask=c_mask)


_INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


@dataclasses.dataclass(frozen=True)
class GatedLinearPlan:
    """Tile sizes of one (N, C, K, dtype) problem: a pure function of them (see :func:`plan`).

    Forward tiles ``[fwd_m, fwd_n]`` of y with reduction step ``fwd_k``; input-gradient tiles
    ``[dx_m, dx_k]`` of grad_x with reduction step ``dx_c`` (channels); weight-gradient tiles
    ``[dw_c, dw_k]`` of grad_weight with reduction step ``dw_n`` (rows). All powers of two >= 16.
    """

    fwd_m: int
    fwd_n: int
    fwd_k: int
    dx_m: int
    dx_k: int
    dx_c: int
    dw_c: int
    dw_k: int
    dw_n: int
    num_warps: int
    num_stages: int
    int64: bool


def _tile(n: int, cap: int) -> int:
    """A power of two in [16, cap] covering as much of `n` as allowed (tl.dot needs >= 16 per dim)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def plan(n: int, channels: int, k: int, dtype: torch.dtype, interpret: bool | None = None) -> GatedLinearPlan:
    """The tiles the kernels use for ``x [n, k]``, ``weight [channels, k]`` and `dtype`.

    GPU: 128 x 128 output tiles (smaller when the dimension is), reduction step 64 for 16-bit
    dtypes and 32 for float32 (same bytes per stage), 8 warps for 128 x 128 tiles, 3 pipeline
    stages. Interpreter: every program instance and loop step has a fixed Python cost, so tiles
    up to 64 in every dimension (fewer programs, fewer steps).
    """
    if interpret is None:
        interpret = _INTERPRETED
    if interpret:
        out_cap, red_cap = 64, 64
    else:
        out_cap, red_cap = 128, 32 if dtype == torch.float32 else 64
    fwd_m, fwd_n, fwd_k = _tile(n, out_cap), _tile(channels, out_cap), _tile(k, red_cap)
    dx_m, dx_k, dx_c = _tile(n, out_cap), _tile(k, out_cap), _tile(channels, red_cap)
    dw_c, dw_k, dw_n = _tile(channels, out_cap), _tile(k, out_cap), _tile(n, red_cap)
    biggest = max(fwd_m * fwd_n, dx_m * dx_k, dw_c * dw_k)
    int64 = max(n * k, n * channels, channels * k) >= _INT32_LIMIT
    return GatedLinearPlan(
        fwd_m, fwd_n, fwd_k, dx_m, dx_k, dx_c, dw_c, dw_k, dw_n, 8 if biggest >= 128 * 128 else 4, 3, int64
    )


def matmul_allows_tf32() -> bool:
    """Whether the user's torch settings let float32 matmuls use TF32.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (falling back to ``torch.backends.fp32_precision``
    when it is ``"none"``), which reflects both the new API and the legacy ones (``allow_tf32``,
    ``torch.set_float32_matmul_precision``). Reading the legacy ``allow_tf32`` instead raises a
    RuntimeError in torch 2.14 once the new API was used.
    """
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def _dot_config(dtype: torch.dtype, interpret: bool | None = None) -> dict[str, object]:
    """DOT_F32 and PRECISION constexprs of the tl.dot operand rule (module docstring)."""
    if interpret is None:
        interpret = _INTERPRETED
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not interpret):
        return {"DOT_F32": False, "PRECISION": None}
    if dtype == torch.bfloat16:  # the interpreter cannot multiply bf16: the same product in tf32
        return {"DOT_F32": True, "PRECISION": "tf32"}
    return {"DOT_F32": True, "PRECISION": "tf32" if matmul_allows_tf32() else "ieee"}


def active_channels(gate: Tensor) -> tuple[Tensor, Tensor]:
    """(perm, n_active) on gate's device, no host synchronisation.

    ``perm`` (int32 ``[C]``): channel indices with the open ones (gate != 0) first, each group in
    index order; ``n_active`` (int32 ``[1]``): the number of open channels.
    """
    closed = gate == 0
    perm = torch.sort(closed.to(torch.int8), stable=True).indices.to(torch.int32)
    n_active = (~closed).sum(dtype=torch.int32).reshape(1)
    return perm, n_active


def _max_offset(t: Tensor) -> int:
    """The largest element offset (from the data pointer) a kernel computes from `t`'s strides."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_tensor(t: object, name: str, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, op: str) -> None:
    for name, t in (("x", x), ("weight", weight), ("gate", gate)):
        _check_tensor(t, name, op)
    if bias is not None:
        _check_tensor(bias, "bias", op)
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{op}: x must be 2-D [N, K] and weight 2-D [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x [N, K] and weight [C, K] disagree on K: {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    channels = weight.shape[0]
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != channels:
            raise ValueError(f"{op}: bias must have shape [{channels}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if gate.dtype != torch.float32:
        raise TypeError(f"{op}: gate must be float32, got {gate.dtype}")
    if gate.dim() != 1 or gate.shape[0] != channels:
        raise ValueError(
            f"{op}: gate must have shape [{channels}] (one value per output channel), got {tuple(gate.shape)}"
        )
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("gate", gate)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    if x.device.type != "cuda" and not (_INTERPRETED and x.device.type == "cpu"):
        raise ValueError(
            f"{op} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before tg_kernels.triton is "
            f"imported); x is on {x.device}"
        )


def gated_linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor) -> Tensor:
    """``y = (x @ weight^T + bias) * gate`` computing only the open channels (gate != 0); zeros elsewhere.

    One gather-GEMM pass writes every column of ``y [N, C]`` (x's dtype); no host synchronisation.
    """
    _check_inputs(x, weight, bias, gate, "gated_linear_forward")
    n, k = x.shape
    channels = weight.shape[0]
    y = torch.empty((n, channels), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    p = plan(n, channels, k, x.dtype)
    perm, n_active = active_channels(gate)
    m_tiles = triton.cdiv(n, p.fwd_m)
    grid = (m_tiles * triton.cdiv(channels, p.fwd_n),)
    with _device_guard(x):
        _forward_kernel[grid](
            x,
            weight,
            bias if bias is not None else gate,  # dummy pointer, never read without HAS_BIAS
            gate,
            perm,
            n_active,
            y,
            n,
            channels,
            k,
            m_tiles,
            BLOCK_M=p.fwd_m,
            BLOCK_N=p.fwd_n,
            BLOCK_K=p.fwd_k,
            HAS_BIAS=bias is not None,
            INT64=p.int64,
            num_warps=p.num_warps,
            num_stages=p.num_stages,
            **_dot_config(x.dtype),
        )
    return y


def gated_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor,
    mode: str,
    need_input: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_gate) of :func:`gated_linear_forward` under `mode`.

    ``"exact"``: grad_x from the open channels; one full weight-gradient GEMM on the ungated grad_y
    gives grad_weight = gate * G, grad_bias = gate * sum(grad_y) and every gate's gradient
    ``<W_c, G_c> + b_c * sum(grad_y[:, c])``. ``"hard"``: the same for open channels, zeros for closed
    ones. A gradient not needed (``need_input`` / ``need_params``) comes back as ``x.new_empty(0)``;
    so does grad_bias without bias. grad_y may have any strides. Deterministic (no atomics).
    """
    op = "gated_linear_backward"
    _check_inputs(x, weight, bias, gate, op)
    _check_tensor(grad_y, "grad_y", op)
    if mode not in _MODES:
        raise ValueError(f"{op}: mode must be one of {_MODES}, got {mode!r}")
    n, k = x.shape
    channels = weight.shape[0]
    if grad_y.shape != (n, channels) or grad_y.dtype != x.dtype:
        raise ValueError(
            f"{op}: grad_y must have shape {(n, channels)} and dtype {x.dtype}, got {tuple(grad_y.shape)} and "
            f"{grad_y.dtype}"
        )
    if grad_y.device != x.device:
        raise ValueError(f"{op}: grad_y is on {grad_y.device} but x is on {x.device}")
    grad_x, grad_w, grad_b, grad_gate = (x.new_empty(0) for _ in range(4))
    if not (need_input or need_params):
        return grad_x, grad_w, grad_b, grad_gate
    p = plan(n, channels, k, x.dtype)
    if not p.int64 and _max_offset(grad_y) >= _INT32_LIMIT:  # a narrow view of a larger gradient
        p = dataclasses.replace(p, int64=True)
    perm, n_active = active_channels(gate)
    dot = _dot_config(x.dtype)
    hard = mode == "hard"
    with _device_guard(x):
        if need_input:
            grad_x = torch.empty_like(x)
            if grad_x.numel():
                m_tiles = triton.cdiv(n, p.dx_m)
                _input_grad_kernel[(m_tiles * triton.cdiv(k, p.dx_k),)](
                    grad_y,
                    weight,
                    gate,
                    perm,
                    n_active,
                    grad_x,
                    n,
                    channels,
                    k,
                    grad_y.stride(0),
                    grad_y.stride(1),
                    m_tiles,
                    BLOCK_M=p.dx_m,
                    BLOCK_K=p.dx_k,
                    BLOCK_C=p.dx_c,
                    INT64=p.int64,
                    num_warps=p.num_warps,
                    num_stages=p.num_stages,
                    **dot,
                )
        if need_params:
            grad_w = torch.empty_like(weight)
            grad_gate = torch.empty_like(gate)
            if bias is not None:
                grad_b = torch.empty_like(bias)
            if channels:
                k_tiles = max(1, triton.cdiv(k, p.dw_k))  # at least one: it also writes sum(grad_y)
                partial = torch.empty((k_tiles, channels), dtype=torch.float32, device=x.device)
                dy_sum = torch.empty(channels, dtype=torch.float32, device=x.device)
                _weight_grad_kernel[(triton.cdiv(channels, p.dw_c) * k_tiles,)](
                    grad_y,
                    x,
                    weight,
                    gate,
                    perm,
                    n_active,
                    grad_w,
                    partial,
                    dy_sum,
                    n,
                    channels,
                    k,
                    grad_y.stride(0),
                    grad_y.stride(1),
                    k_tiles,
                    BLOCK_C=p.dw_c,
                    BLOCK_K=p.dw_k,
                    BLOCK_N=p.dw_n,
                    HARD=hard,
                    INT64=p.int64,
                    num_warps=p.num_warps,
                    num_stages=p.num_stages,
                    **dot,
                )
                block_c = min(triton.next_power_of_2(channels), 256)
                block_s = min(triton.next_power_of_2(k_tiles), max(1, _REDUCE_TILE // block_c))
                _gate_grad_kernel[(triton.cdiv(channels, block_c),)](
                    partial,
                    dy_sum,
                    bias if bias is not None else gate,  # dummy pointers, never used without HAS_BIAS
                    gate,
                    grad_b if bias is not None else gate,
                    grad_gate,
                    channels,
                    k_tiles,
                    BLOCK_S=block_s,
                    BLOCK_C=block_c,
                    HAS_BIAS=bias is not None,
                    HARD=hard,
                    num_warps=4,
                )
    return grad_x, grad_w, grad_b, grad_gate
