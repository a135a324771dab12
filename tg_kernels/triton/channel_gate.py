"""Triton kernels of the channel gate: ``y = x * gate[c]`` on ``x: [outer, C, inner]`` and its backward.

Same contract as :func:`tg_kernels.reference.channel_gate_forward` / ``channel_gate_backward``:
``x`` contiguous float32/float16/bfloat16, ``gate`` contiguous float32 ``[C]``; math in float32,
outputs in x's dtype except ``grad_gate`` (float32).

Design (one plan for both layouts):

- Every kernel works on 3-D tiles ``[BLOCK_O, BLOCK_C, BLOCK_I]`` (powers of two, inner dimension
  fastest). NCHW-like inputs (large ``inner``) get long contiguous runs along ``inner``; inputs with
  channels contiguous (``inner == 1`` or small) get ``BLOCK_I = next_pow2(inner)`` and tile across
  ``C`` and ``outer`` instead, so loads stay coalesced in both cases. Block sizes come from a plain
  function of the shape and dtype (:func:`plan`); no autotuning (it needs a GPU and would make the
  reduction order depend on timing).
- Forward: one tile per program, reads x once, writes y once.
- Backward: the ``(outer, inner)`` reduction domain of every channel tile is cut into a fixed grid of
  ``split_o x split_i`` chunks that depends only on the shape and dtype (never on the device). One
  program per (chunk, channel tile) streams its chunk once, writes ``grad_x`` and accumulates
  ``grad_y * x`` in a float32 register tile, then stores one row of a ``[splits, C]`` float32 partial
  buffer. A second tiny Triton kernel sums the partials over splits in a fixed order. No atomics, so
  ``grad_gate`` is bitwise reproducible for a given shape, dtype and Triton build (the interpreter
  uses larger tiles than a GPU, so interpreter and GPU results may differ in the last bits).
- Offsets are int32 unless the padded extent reaches 2**31, then int64 (a compile-time switch).
- Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors; the tests also compile
  them for sm_90 offline and check that loads are 16-byte vectors where the shape allows.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ChannelGatePlan", "channel_gate_backward", "channel_gate_forward", "make_plan", "plan"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31

# Tile size in bytes of x per loop step (16 KiB: 4096 fp32 / 8192 fp16 elements = 16 or 32 per thread
# with 8 warps, several 16-byte loads in flight per thread). Under the interpreter every program
# instance and every loop step has a fixed Python cost, so tiles are larger there.
_TILE_BYTES_GPU = 16 * 1024
_TILE_BYTES_INTERPRET = 256 * 1024
# Backward grid: about this many programs (a device-independent constant, a few waves on current
# GPUs), with at least this many tiles per program to amortize each program's start and its partials,
_TARGET_PROGRAMS = 2048
_MIN_TILES_PER_PROGRAM = 2
# ... and at least this many (outer, inner) positions per program, so the [splits, C] partial buffer
# stays below 1/64 of the input.
_MIN_REDUCE = 64
# Shortest contiguous run (elements) a tile should read along its fastest dimension, for coalescing.
_MIN_RUN = 128
# Largest padding (masked lanes) accepted when a dimension is cut into several blocks, as a fraction of
# its size. Masked lanes cost issue slots, not bandwidth; under the interpreter fewer programs win, so
# there a dimension that fits in the tile is never cut.
_MAX_PAD = 0.125
_REDUCE_TILE = 4096


@triton.jit(do_not_specialize=["outer"])  # the batch-derived size: new batch sizes reuse the kernel
def _forward_kernel(
    x_ptr,
    gate_ptr,
    y_ptr,
    outer,
    C,
    inner,
    n_c_tiles,
    n_i_tiles,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INT64: tl.constexpr,
):
    """One [BLOCK_O, BLOCK_C, BLOCK_I] tile of y = x * gate[c]; program ids run inner tiles fastest."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    i_tile = pid % n_i_tiles
    rest = pid // n_i_tiles
    c_tile = rest % n_c_tiles
    o_tile = rest // n_c_tiles
    o = o_tile * BLOCK_O + tl.arange(0, BLOCK_O)
    c = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    i = i_tile * BLOCK_I + tl.arange(0, BLOCK_I)
    o3 = o[:, None, None]
    c3 = c[None, :, None]
    i3 = i[None, None, :]
    mask = (o3 < outer) & (c3 < C) & (i3 < inner)
    offsets = (o3 * C + c3) * inner + i3
    g = tl.load(gate_ptr + c, mask=c < C, other=0.0)
    xv = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = xv * g[None, :, None]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["outer"])
def _backward_kernel(
    grad_y_ptr,
    x_ptr,
    gate_ptr,
    grad_x_ptr,
    partial_ptr,
    outer,
    C,
    inner,
    n_c_tiles,
    split_i,
    o_chunk,
    i_chunk,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INT64: tl.constexpr,
):
    """One (chunk, channel tile): grad_x = grad_y * gate[c] over the chunk, and its sum of grad_y * x.

    The chunk is ``o_chunk`` outer rows by ``i_chunk`` inner positions (multiples of the blocks);
    the float32 sum goes to ``partial[split, c]`` with ``split = so * split_i + si``.
    """
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    c_tile = pid % n_c_tiles
    split = pid // n_c_tiles
    so = split // split_i
    si = split % split_i
    o_start = so * o_chunk
    o_end = tl.minimum(o_start + o_chunk, outer)
    i_start = si * i_chunk
    i_end = tl.minimum(i_start + i_chunk, inner)

    c = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    g = tl.load(gate_ptr + c, mask=c_mask, other=0.0)[None, :, None]
    acc = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], dtype=tl.float32)
    for o0 in range(o_start, o_end, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        rows = (o[:, None, None] * C + c[None, :, None]) * inner
        row_mask = (o < o_end)[:, None, None] & c_mask[None, :, None]
        for i0 in range(i_start, i_end, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            offsets = rows + i[None, None, :]
            mask = row_mask & (i < i_end)[None, None, :]
            dy = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_x_ptr + offsets, (dy * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
            acc += dy * xv
    total = tl.sum(tl.sum(acc, axis=2), axis=0)
    tl.store(partial_ptr + split * C + c, total, mask=c_mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, splits, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum over s of partial[s, c], in a fixed order (blocks of splits, then a tree sum)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < splits)[:, None] & c_mask[None, :]
        acc += tl.load(partial_ptr + s[:, None] * C + c[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + c, tl.sum(acc, axis=0), mask=c_mask)


_INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


@dataclasses.dataclass(frozen=True)
class ChannelGatePlan:
    """Tiles and backward split of one ``[outer, C, inner]`` shape (a pure function of shape and dtype)."""

    outer: int
    channels: int
    inner: int
    block_o: int
    block_c: int
    block_i: int
    split_o: int  # chunks of the outer dimension (backward)
    split_i: int  # chunks of the inner dimension (backward)
    o_chunk: int  # outer rows per chunk, a multiple of block_o
    i_chunk: int  # inner positions per chunk, a multiple of block_i
    int64: bool
    num_warps: int

    @property
    def splits(self) -> int:
        """Rows of the partial-sum buffer."""
        return self.split_o * self.split_i

    @property
    def c_tiles(self) -> int:
        return triton.cdiv(self.channels, self.block_c)

    @property
    def forward_grid(self) -> int:
        return triton.cdiv(self.outer, self.block_o) * self.c_tiles * triton.cdiv(self.inner, self.block_i)

    @property
    def backward_grid(self) -> int:
        return self.splits * self.c_tiles


def _fit_pow2(n: int, cap: int, floor: int, max_pad: float) -> int:
    """A power of two for tiling `n`: the largest in [floor, cap] whose padding is at most `max_pad` of `n`,
    else the one that pads least (ties: the larger). `floor` and `cap` are clamped to next_pow2(n)."""
    hi = min(triton.next_power_of_2(n), cap)
    lo = min(max(floor, 1), hi)
    best, best_pad = hi, None
    b = hi
    while b >= lo:
        pad = triton.cdiv(n, b) * b - n
        if pad <= max_pad * n:
            return b
        if best_pad is None or pad < best_pad:
            best, best_pad = b, pad
        b //= 2
    return best


def _split(tiles: int, want: int) -> tuple[int, int]:
    """Cut `tiles` into at most `want` equal chunks; return (chunks, tiles per chunk), no empty chunk."""
    per = triton.cdiv(tiles, max(1, min(want, tiles)))
    return triton.cdiv(tiles, per), per


def make_plan(
    outer: int,
    channels: int,
    inner: int,
    *,
    block_o: int,
    block_c: int,
    block_i: int,
    split_o: int,
    split_i: int,
    num_warps: int = 4,
    force_int64: bool = False,
) -> ChannelGatePlan:
    """A plan with explicit blocks and wanted splits (normalized so no chunk is empty). For tests and tuning."""
    for name, b in (("block_o", block_o), ("block_c", block_c), ("block_i", block_i)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two, got {b}")
    tiles_o = triton.cdiv(max(outer, 1), block_o)
    tiles_i = triton.cdiv(max(inner, 1), block_i)
    split_o, o_tiles_per = _split(tiles_o, split_o)
    split_i, i_tiles_per = _split(tiles_i, split_i)
    padded = tiles_o * block_o * triton.cdiv(max(channels, 1), block_c) * block_c * tiles_i * block_i
    return ChannelGatePlan(
        outer=outer,
        channels=channels,
        inner=inner,
        block_o=block_o,
        block_c=block_c,
        block_i=block_i,
        split_o=split_o,
        split_i=split_i,
        o_chunk=o_tiles_per * block_o,
        i_chunk=i_tiles_per * block_i,
        int64=force_int64 or padded >= _INT32_LIMIT,
        num_warps=num_warps,
    )


def plan(outer: int, channels: int, inner: int, dtype: torch.dtype, interpret: bool | None = None) -> ChannelGatePlan:
    """The plan the kernels use for this shape and dtype (and interpreter or not); never the device.

    Tiles hold a fixed number of bytes (half as many when the shape rules out 16-byte vector loads).
    ``BLOCK_I`` takes the inner dimension first (whole when it is short, else a power of two that
    pads little); ``BLOCK_C`` then ``BLOCK_O`` fill the rest of the tile, each contiguous run being at
    least ``_MIN_RUN`` elements where the shape allows. Channel tiles narrow (down to that run) while
    the backward would have too few programs. The backward split aims at ``_TARGET_PROGRAMS``
    programs with at least ``_MIN_TILES_PER_PROGRAM`` tiles and ``_MIN_REDUCE`` reduced positions
    each, cutting the outer dimension first and the inner one only when outer is too short.
    """
    if interpret is None:
        interpret = _INTERPRETED
    shape = (outer, channels, inner)
    # The compiler vectorizes loads only when every contiguous run starts 16-element aligned (it knows
    # integer arguments divisible by 16); scalar loads need one address per element, so halve the tile.
    aligned = channels % 16 == 0 if inner == 1 else inner % 16 == 0
    tile_bytes = _TILE_BYTES_INTERPRET if interpret else _TILE_BYTES_GPU if aligned else _TILE_BYTES_GPU // 2
    tile = tile_bytes // dtype.itemsize
    outer, channels, inner = max(outer, 1), max(channels, 1), max(inner, 1)
    max_pad = 1.0 if interpret else _MAX_PAD
    block_i = _fit_pow2(inner, tile, _MIN_RUN, max_pad)
    min_block_c = triton.cdiv(_MIN_RUN, block_i)
    block_c = _fit_pow2(channels, tile // block_i, min_block_c, max_pad)
    # Wide C with few (outer, inner) positions: narrower channel tiles give the backward enough programs.
    positions = outer * inner
    goal = min(_TARGET_PROGRAMS, positions * channels // (_MIN_TILES_PER_PROGRAM * tile))
    while block_c > min_block_c and triton.cdiv(channels, block_c) * max(1, positions // _MIN_REDUCE) < goal:
        block_c //= 2
    block_o = min(triton.next_power_of_2(outer), tile // (block_i * block_c))
    tiles_o = triton.cdiv(outer, block_o)
    tiles_i = triton.cdiv(inner, block_i)
    c_tiles = triton.cdiv(channels, block_c)
    want = max(
        1,
        min(_TARGET_PROGRAMS // c_tiles, (tiles_o * tiles_i) // _MIN_TILES_PER_PROGRAM, positions // _MIN_REDUCE),
    )
    split_o = min(want, tiles_o)
    split_i = max(1, want // split_o)
    tile_elems = block_o * block_c * block_i
    return make_plan(
        *shape,
        block_o=block_o,
        block_c=block_c,
        block_i=block_i,
        split_o=split_o,
        split_i=split_i,
        num_warps=max(1, min(8, tile_elems // 256)),
    )


def _check_device(t: Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if not (_INTERPRETED and t.device.type == "cpu"):
        raise ValueError(
            f"triton channel_gate needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"tg_kernels.triton is imported); {name} is on {t.device}"
        )


def _check_x_gate(x: Tensor, gate: Tensor, op: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(gate, Tensor):
        raise TypeError(f"{op} expects tensors, got {type(x).__name__} and {type(gate).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if gate.dtype != torch.float32:
        raise TypeError(f"{op}: gate must be float32, got {gate.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be 3-D [outer, C, inner], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous")
    if gate.dim() != 1 or gate.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: gate must have shape [{x.shape[1]}] (x.shape[1]), got {tuple(gate.shape)}")
    if not gate.is_contiguous():
        raise ValueError(f"{op}: gate must be contiguous")
    if gate.device != x.device:
        raise ValueError(f"{op}: gate is on {gate.device} but x is on {x.device}")
    _check_device(x, "x")


def _constexprs(p: ChannelGatePlan) -> dict[str, int | bool]:
    return {"BLOCK_O": p.block_o, "BLOCK_C": p.block_c, "BLOCK_I": p.block_i, "INT64": p.int64}


def _forward_scalars(p: ChannelGatePlan) -> dict[str, int]:
    """Integer arguments of the forward kernel (the JIT specializes them on value 1 and divisibility by 16,
    except ``outer``: ``do_not_specialize``)."""
    n_i_tiles = triton.cdiv(p.inner, p.block_i)
    return {"outer": p.outer, "C": p.channels, "inner": p.inner, "n_c_tiles": p.c_tiles, "n_i_tiles": n_i_tiles}


def _backward_scalars(p: ChannelGatePlan) -> dict[str, int]:
    """Integer arguments of the backward kernel."""
    return {
        "outer": p.outer,
        "C": p.channels,
        "inner": p.inner,
        "n_c_tiles": p.c_tiles,
        "split_i": p.split_i,
        "o_chunk": p.o_chunk,
        "i_chunk": p.i_chunk,
    }


def _sum_splits_config(channels: int, splits: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of the split-sum kernel."""
    block_c = min(triton.next_power_of_2(channels), 256)
    return min(triton.next_power_of_2(splits), max(1, _REDUCE_TILE // block_c)), block_c


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_plan(x: Tensor, p: ChannelGatePlan) -> None:
    if (p.outer, p.channels, p.inner) != tuple(x.shape):
        raise ValueError(f"plan for shape {(p.outer, p.channels, p.inner)} used on x of shape {tuple(x.shape)}")


def _launch_forward(x: Tensor, gate: Tensor, p: ChannelGatePlan) -> Tensor:
    """Run the forward kernel with plan `p` (inputs already validated)."""
    _check_plan(x, p)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    with _device_guard(x):
        _forward_kernel[(p.forward_grid,)](x, gate, y, **_forward_scalars(p), **_constexprs(p), num_warps=p.num_warps)
    return y


def _launch_backward(grad_y: Tensor, x: Tensor, gate: Tensor, p: ChannelGatePlan) -> tuple[Tensor, Tensor]:
    """Run the backward kernel with plan `p`, then the fixed-order sum over splits (inputs already validated)."""
    _check_plan(x, p)
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x, torch.zeros(p.channels, dtype=torch.float32, device=x.device)
    partial = torch.empty((p.splits, p.channels), dtype=torch.float32, device=x.device)
    with _device_guard(x):
        _backward_kernel[(p.backward_grid,)](
            grad_y, x, gate, grad_x, partial, **_backward_scalars(p), **_constexprs(p), num_warps=p.num_warps
        )
        if p.splits == 1:
            return grad_x, partial.view(p.channels)
        grad_gate = torch.empty(p.channels, dtype=torch.float32, device=x.device)
        block_s, block_c = _sum_splits_config(p.channels, p.splits)
        _sum_splits_kernel[(triton.cdiv(p.channels, block_c),)](
            partial, grad_gate, p.splits, p.channels, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4
        )
    return grad_x, grad_gate


def channel_gate_forward(x: Tensor, gate: Tensor) -> Tensor:
    """y = x * gate[c] for contiguous ``x: [outer, C, inner]`` and float32 ``gate: [C]``; y has x's dtype.

    One pass: reads x once, writes y once; the product is computed in float32.
    """
    _check_x_gate(x, gate, "channel_gate_forward")
    return _launch_forward(x, gate, plan(*x.shape, x.dtype))


def channel_gate_backward(grad_y: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_gate) of :func:`channel_gate_forward`.

    ``grad_x = grad_y * gate[c]`` in x's dtype and ``grad_gate[c] = sum(grad_y * x)`` over outer and
    inner, accumulated in float32 in a fixed order (deterministic, no atomics). One pass over grad_y
    and x, plus a tiny reduction of per-chunk partial sums.
    """
    _check_x_gate(x, gate, "channel_gate_backward")
    if not isinstance(grad_y, Tensor):
        raise TypeError(f"channel_gate_backward expects a tensor grad_y, got {type(grad_y).__name__}")
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError(
            f"channel_gate_backward: grad_y must match x (shape {tuple(x.shape)}, {x.dtype}), "
            f"got shape {tuple(grad_y.shape)}, {grad_y.dtype}"
        )
    if not grad_y.is_contiguous():
        raise ValueError("channel_gate_backward: grad_y must be contiguous")
    if grad_y.device != x.device:
        raise ValueError(f"channel_gate_backward: grad_y is on {grad_y.device} but x is on {x.device}")
    return _launch_backward(grad_y, x, gate, plan(*x.shape, x.dtype))
