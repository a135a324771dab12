// CUDA kernels of the channel gate op on the canonical view x: [outer, C, inner] (contiguous):
//
//   forward:  y[o, c, i] = x[o, c, i] * gate[c]
//   backward: grad_x[o, c, i] = grad_y[o, c, i] * gate[c]
//             grad_gate[c]    = sum over o, i of grad_y[o, c, i] * x[o, c, i]
//
// x, y, grad_y, grad_x are float32, float16 or bfloat16; gate and grad_gate are float32; all math
// is float32. Schemas: csrc/tg_kernels.cpp. Oracle: tg_kernels/reference.py.
//
// Two work layouts, picked from the shapes (the same for forward and backward):
//
// - ROW mode (inner >= one warp's span of 16-byte vectors, e.g. NCHW): every (o, c) row is a
//   contiguous run of `inner` elements. Rows are cut into segments ("units") of at most
//   kGroupsPerThread warp spans. A block owns one channel c and a fixed range of that channel's
//   units (a "split"); its warps walk one unit at a time, so one gate value and one accumulator
//   serve a whole unit. The block writes one partial sum: partial[c, split].
// - COL mode (small inner, e.g. channels-last or (N, C) where inner == 1): x is the matrix
//   [outer, K = C * inner] and threads map across its columns, so a warp reads a contiguous
//   stretch of each row. Each thread owns VEC adjacent columns over a range of rows (a "split")
//   and sums each column; the block adds its rows of sums and writes partial[split, k].
//
// Determinism of grad_gate, by construction: which thread adds which elements, in which order,
// and how the partials are combined depend only on the shapes and the dtype (never on the
// device's SM count, the grid size or timing). There are no atomics: every partial has its own
// slot, and a second small kernel adds each channel's partials in a fixed order with a fixed
// tree. Products are accumulated with explicit fmaf, so compiler contraction cannot differ
// between code paths.
//
// Memory access: 16-byte vector loads and stores where every pointer is 16-byte aligned (in COL
// mode also K % VEC == 0); otherwise the same thread does the same work with scalar accesses.
// Alignment therefore changes speed, never the result bits. All indices are int64, and every
// kernel loops over its work items (grid-stride), so the grid is capped at kMaxBlocks.

// c10's stream and exception headers rather than <ATen/cuda/CUDAContext.h>: that one includes the
// cuBLAS, cuSPARSE and cuSOLVER headers, which a minimal CUDA toolkit (as on our build machines)
// does not ship, and these kernels need none of them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

constexpr int kThreads = 256;               // threads per block, every kernel
constexpr int kWarps = kThreads / 32;       // warps per block
constexpr int kGroupsPerThread = 8;         // target vector groups per thread per unit (ROW)
constexpr int kMaxRowsPerThread = 16;       // rows per thread per split (COL), upper bound
constexpr int kMinRowsPerThread = 4;        // lower bound: keeps the partial buffer small
constexpr int64_t kBlocksWanted = 1024;     // enough blocks to fill a large GPU (shape-only rule)
constexpr int64_t kMaxBlocks = 8192;        // grid cap; kernels grid-stride over their items

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// VEC elements moved as one 16-byte load or store.
template <typename T, int N>
struct alignas(16) Vec {
  static_assert(sizeof(T) * N == 16, "a Vec is 16 bytes");
  T v[N];
};

// 16-byte load and store through uint4 and the __ldg / __stcg intrinsics, so that each is always
// one 128-bit instruction (the optimiser was seen splitting a plain struct store into scalar
// stores). p must be 16-byte aligned.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Vec<T, N> r;
  memcpy(&r, &raw, sizeof(raw));
  return r;
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& r) {
  uint4 raw;
  memcpy(&raw, &r, sizeof(raw));
  __stcg(reinterpret_cast<uint4*>(p), raw);
}

__host__ __device__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

bool is_aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// ---------------------------------------------------------------------------------------------
// ROW mode.

struct RowPlan {
  int64_t channels;           // C
  int64_t inner;              // row length
  int64_t seg_len;            // unit length (multiple of VEC; the last unit of a row may be shorter)
  int64_t segs_per_row;       // units per row
  int64_t units_per_channel;  // outer * segs_per_row
  int64_t units_per_split;    // units per block item (a multiple of kWarps)
  int64_t splits;             // block items per channel
};

RowPlan make_row_plan(int64_t outer, int64_t channels, int64_t inner, int vec) {
  const int64_t seg_max = int64_t{kGroupsPerThread} * 32 * vec;
  RowPlan p{};
  p.channels = channels;
  p.inner = inner;
  // Rows longer than seg_max are cut into near-equal segments whose length is a whole number of
  // warp spans, so that only the last segment of a row leaves lanes idle.
  p.segs_per_row = ceil_div(inner, seg_max);
  const int64_t round_to = p.segs_per_row == 1 ? vec : 32 * vec;
  p.seg_len = ceil_div(ceil_div(inner, p.segs_per_row), round_to) * round_to;
  p.segs_per_row = ceil_div(inner, p.seg_len);
  p.units_per_channel = outer * p.segs_per_row;
  // Each warp takes about seg_max elements per item: several short rows or one segment. Fewer
  // per item when that is what it takes to have kBlocksWanted items.
  int64_t units_per_warp = std::max<int64_t>(1, seg_max / std::min(p.seg_len, inner));
  while (units_per_warp > 1 &&
         channels * ceil_div(p.units_per_channel, kWarps * units_per_warp) < kBlocksWanted) {
    units_per_warp /= 2;
  }
  p.units_per_split = kWarps * units_per_warp;
  p.splits = ceil_div(p.units_per_channel, p.units_per_split);
  return p;
}

// Block item b -> (split s = b / C, channel c = b % C): consecutive blocks read neighbouring rows.
// Warp w of the block takes units s * units_per_split + w, + kWarps, ... (u < units_per_channel);
// unit u is segment u % segs_per_row of row o = u / segs_per_row, i.e. elements
// [(o * C + c) * inner + j0, ... + min(j0 + seg_len, inner)) with j0 = (u % segs_per_row) * seg_len.
// Lanes take the VEC-element groups (counted from element 0 of the tensor) that meet the unit,
// lane by lane; a group only partly inside the unit, or any group when a pointer is misaligned,
// is done element by element in the same order.
// Backward: in = grad_y, out = grad_x, and partial[c * splits + s] gets the item's sum.
// Forward: in = x, out = y; x and partial are unused.
template <typename scalar_t, bool kBackward>
__global__ void __launch_bounds__(kThreads) channel_gate_row_kernel(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
    const float* __restrict__ gate, float* __restrict__ partial, const RowPlan p, const bool aligned) {
  constexpr int VEC = vec_size<scalar_t>();
  using V = Vec<scalar_t, VEC>;
  __shared__ float warp_sums[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t items = p.channels * p.splits;

  for (int64_t b = blockIdx.x; b < items; b += gridDim.x) {
    const int64_t s = b / p.channels;
    const int64_t c = b - s * p.channels;
    const float g = gate[c];
    float acc = 0.f;
    const int64_t u_end = std::min(p.units_per_channel, (s + 1) * p.units_per_split);
    for (int64_t u = s * p.units_per_split + warp; u < u_end; u += kWarps) {
      const int64_t o = p.segs_per_row == 1 ? u : u / p.segs_per_row;  // skip the division if we can
      const int64_t j0 = (u - o * p.segs_per_row) * p.seg_len;
      const int64_t row_start = (o * p.channels + c) * p.inner;
      const int64_t e_begin = row_start + j0;
      const int64_t e_end = row_start + std::min(j0 + p.seg_len, p.inner);
      for (int64_t e0 = (e_begin / VEC + lane) * VEC; e0 < e_end; e0 += 32 * VEC) {
        if (aligned && e0 >= e_begin && e0 + VEC <= e_end) {
          const V a = load_vec<scalar_t, VEC>(in + e0);
          V r;
          if constexpr (kBackward) {
            const V xv = load_vec<scalar_t, VEC>(x + e0);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const float gy = static_cast<float>(a.v[v]);
              r.v[v] = static_cast<scalar_t>(gy * g);
              acc = fmaf(gy, static_cast<float>(xv.v[v]), acc);
            }
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              r.v[v] = static_cast<scalar_t>(static_cast<float>(a.v[v]) * g);
            }
          }
          store_vec<scalar_t, VEC>(out + e0, r);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const int64_t e = e0 + v;
            if (e >= e_begin && e < e_end) {
              const float a = static_cast<float>(in[e]);
              out[e] = static_cast<scalar_t>(a * g);
              if constexpr (kBackward) {
                acc = fmaf(a, static_cast<float>(x[e]), acc);
              }
            }
          }
        }
      }
    }
    if constexpr (kBackward) {
      // Fixed tree within each warp, then warp 0's thread 0 adds the warps in order.
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
      }
      if (lane == 0) {
        warp_sums[warp] = acc;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          total += warp_sums[w];
        }
        partial[c * p.splits + s] = total;
      }
      __syncthreads();  // warp_sums is rewritten by the next item
    }
  }
}

// ---------------------------------------------------------------------------------------------
// COL mode.

struct ColPlan {
  int64_t outer;           // rows
  int64_t cols;            // K = C * inner
  int64_t inner;           // column k belongs to channel k / inner
  int64_t col_tiles;       // column tiles of tx_count * VEC columns
  int64_t rows_per_split;  // rows per block item (a multiple of ty_count)
  int64_t splits;          // block items per column tile
  int tx_count;            // threads across columns (a power of 2, <= 32)
  int ty_count;            // threads across rows: kThreads / tx_count
};

ColPlan make_col_plan(int64_t outer, int64_t channels, int64_t inner, int vec) {
  ColPlan p{};
  p.outer = outer;
  p.cols = channels * inner;
  p.inner = inner;
  const int64_t groups = ceil_div(p.cols, vec);  // column groups of VEC columns
  p.tx_count = 1;
  while (p.tx_count < 32 && p.tx_count < groups) {
    p.tx_count *= 2;
  }
  p.ty_count = kThreads / p.tx_count;
  p.col_tiles = ceil_div(groups, p.tx_count);
  // Many rows per thread keep the partial buffer small next to the data; fewer when that is
  // what it takes to have kBlocksWanted items.
  int64_t rows_per_thread = kMaxRowsPerThread;
  while (rows_per_thread > kMinRowsPerThread &&
         p.col_tiles * ceil_div(outer, p.ty_count * rows_per_thread) < kBlocksWanted) {
    rows_per_thread /= 2;
  }
  p.rows_per_split = p.ty_count * rows_per_thread;
  p.splits = ceil_div(outer, p.rows_per_split);
  return p;
}

// Block item b -> (split s = b / col_tiles, tile t = b % col_tiles). Thread (tx, ty) =
// (threadIdx.x % tx_count, threadIdx.x / tx_count) owns columns k = k0 + v (v < VEC, k < K) with
// k0 = (t * tx_count + tx) * VEC, in rows o = s * rows_per_split + ty, + ty_count, ... (o < outer
// and within the split). Backward: each thread sums its columns over its rows; the block adds
// its ty_count rows of sums with a fixed tree and writes partial[s * K + k].
// Forward: in = x, out = y; x and partial are unused.
template <typename scalar_t, bool kBackward>
__global__ void __launch_bounds__(kThreads) channel_gate_col_kernel(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
    const float* __restrict__ gate, float* __restrict__ partial, const ColPlan p, const bool aligned) {
  constexpr int VEC = vec_size<scalar_t>();
  using V = Vec<scalar_t, VEC>;
  // Column sums of the block, laid out [VEC][kThreads] so the tree steps avoid bank conflicts.
  __shared__ float sums[kBackward ? VEC * kThreads : 1];
  const int tx = threadIdx.x % p.tx_count;
  const int ty = threadIdx.x / p.tx_count;
  const int64_t items = p.col_tiles * p.splits;

  for (int64_t b = blockIdx.x; b < items; b += gridDim.x) {
    const int64_t s = b / p.col_tiles;
    const int64_t t = b - s * p.col_tiles;
    const int64_t k0 = (t * p.tx_count + tx) * VEC;
    // Gate of each owned column: one division, then step through (channel, position).
    float g[VEC];
    float acc[VEC];
    int64_t c = k0 / p.inner;
    int64_t j = k0 - c * p.inner;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      g[v] = k0 + v < p.cols ? gate[c] : 0.f;
      acc[v] = 0.f;
      if (++j == p.inner) {
        j = 0;
        ++c;
      }
    }
    if (k0 < p.cols) {
      const int64_t o_end = std::min(p.outer, (s + 1) * p.rows_per_split);
      for (int64_t o = s * p.rows_per_split + ty; o < o_end; o += p.ty_count) {
        const int64_t e0 = o * p.cols + k0;
        if (aligned) {  // K % VEC == 0 here, so the group is whole and 16-byte aligned
          const V a = load_vec<scalar_t, VEC>(in + e0);
          V r;
          if constexpr (kBackward) {
            const V xv = load_vec<scalar_t, VEC>(x + e0);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const float gy = static_cast<float>(a.v[v]);
              r.v[v] = static_cast<scalar_t>(gy * g[v]);
              acc[v] = fmaf(gy, static_cast<float>(xv.v[v]), acc[v]);
            }
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              r.v[v] = static_cast<scalar_t>(static_cast<float>(a.v[v]) * g[v]);
            }
          }
          store_vec<scalar_t, VEC>(out + e0, r);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            if (k0 + v < p.cols) {
              const float a = static_cast<float>(in[e0 + v]);
              out[e0 + v] = static_cast<scalar_t>(a * g[v]);
              if constexpr (kBackward) {
                acc[v] = fmaf(a, static_cast<float>(x[e0 + v]), acc[v]);
              }
            }
          }
        }
      }
    }
    if constexpr (kBackward) {
      // Fixed tree over ty: row ty adds row ty + stride (ty_count is a power of 2).
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        sums[v * kThreads + threadIdx.x] = acc[v];
      }
      for (int stride = p.ty_count / 2; stride > 0; stride /= 2) {
        __syncthreads();
        if (ty < stride) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            sums[v * kThreads + threadIdx.x] += sums[v * kThreads + threadIdx.x + stride * p.tx_count];
          }
        }
      }
      if (ty == 0) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          if (k0 + v < p.cols) {
            partial[s * p.cols + k0 + v] = sums[v * kThreads + threadIdx.x];
          }
        }
      }
      __syncthreads();  // sums is rewritten by the next item
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sum of partials, backward only.
//
// partial is [S, C, J] (ROW: S = 1, J = splits; COL: S = splits, J = inner).
// grad_gate[c] = sum over m = s * J + j < S * J of partial[(s * C + c) * J + j]: a group of
// `group` threads (a power of 2 in [32, kThreads]) takes channel c, thread i of the group adds
// m = i, i + group, ... in order, and the group adds its threads' sums with a fixed tree.
__global__ void __launch_bounds__(kThreads) channel_gate_sum_partials_kernel(
    const float* __restrict__ partial, float* __restrict__ grad_gate, const int64_t channels,
    const int64_t S, const int64_t J, const int group) {
  __shared__ float sums[kThreads];
  const int i = threadIdx.x % group;
  const int64_t groups_per_block = kThreads / group;
  const int64_t items = ceil_div(channels, groups_per_block);
  const int64_t n = S * J;
  for (int64_t b = blockIdx.x; b < items; b += gridDim.x) {
    const int64_t c = b * groups_per_block + threadIdx.x / group;
    float total = 0.f;
    if (c < channels) {
      for (int64_t m = i; m < n; m += group) {
        const int64_t s = m / J;
        const int64_t j = m - s * J;
        total += partial[(s * channels + c) * J + j];
      }
    }
    sums[threadIdx.x] = total;
    for (int stride = group / 2; stride > 0; stride /= 2) {
      __syncthreads();
      if (i < stride) {
        sums[threadIdx.x] += sums[threadIdx.x + stride];
      }
    }
    if (i == 0 && c < channels) {
      grad_gate[c] = sums[threadIdx.x];
    }
    __syncthreads();  // sums is rewritten by the next item
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// True: ROW mode; false: COL mode. ROW needs rows of at least one warp's span of vectors.
template <typename scalar_t>
bool use_row_mode(int64_t inner) {
  return inner >= int64_t{32} * vec_size<scalar_t>();
}

int grid_for(int64_t items) {
  return static_cast<int>(std::min(items, kMaxBlocks));
}

// Forward (kBackward = false: in = x, out = y) or backward (in = grad_y, x, out = grad_x, and
// grad_gate is written).
template <typename scalar_t, bool kBackward>
void launch_channel_gate(const at::Tensor& in, const at::Tensor* x, const at::Tensor& out,
                         const at::Tensor& gate, at::Tensor* grad_gate) {
  constexpr int VEC = vec_size<scalar_t>();
  const int64_t outer = in.size(0);
  const int64_t channels = in.size(1);
  const int64_t inner = in.size(2);
  const scalar_t* in_ptr = in.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = kBackward ? x->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const float* gate_ptr = gate.const_data_ptr<float>();
  bool aligned = is_aligned_16(in_ptr) && is_aligned_16(out_ptr) && (!kBackward || is_aligned_16(x_ptr));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const bool row_mode = use_row_mode<scalar_t>(inner);
  int64_t S = 1;  // partial is [S, C, J]
  int64_t J = 1;
  RowPlan row_plan{};
  ColPlan col_plan{};
  if (row_mode) {
    row_plan = make_row_plan(outer, channels, inner, VEC);
    J = row_plan.splits;
  } else {
    col_plan = make_col_plan(outer, channels, inner, VEC);
    aligned = aligned && col_plan.cols % VEC == 0;
    S = col_plan.splits;
    J = inner;
  }

  // With a single partial per channel the main kernel writes grad_gate itself.
  at::Tensor partial;
  float* partial_ptr = nullptr;
  if constexpr (kBackward) {
    partial = S * J == 1 ? *grad_gate : at::empty({S * channels * J}, gate.options());
    partial_ptr = partial.mutable_data_ptr<float>();
  }

  if (row_mode) {
    channel_gate_row_kernel<scalar_t, kBackward>
        <<<grid_for(channels * row_plan.splits), kThreads, 0, stream>>>(
            in_ptr, x_ptr, out_ptr, gate_ptr, partial_ptr, row_plan, aligned);
  } else {
    channel_gate_col_kernel<scalar_t, kBackward>
        <<<grid_for(col_plan.col_tiles * col_plan.splits), kThreads, 0, stream>>>(
            in_ptr, x_ptr, out_ptr, gate_ptr, partial_ptr, col_plan, aligned);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if constexpr (kBackward) {
    if (S * J > 1) {
      // About four partials per thread, 32 to kThreads threads per channel.
      int group = 32;
      while (group < kThreads && int64_t{group} * 4 < S * J) {
        group *= 2;
      }
      const int64_t blocks = ceil_div(channels, kThreads / group);
      channel_gate_sum_partials_kernel<<<grid_for(blocks), kThreads, 0, stream>>>(
          partial_ptr, grad_gate->mutable_data_ptr<float>(), channels, S, J, group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// float32, float16 and bfloat16 only: float64 never reaches a kernel (checked before).
#define TG_DISPATCH_HALF_AND_SINGLE(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

bool is_half_or_single(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Checks shared by both ops: x is a contiguous CUDA [outer, C, inner] tensor of a supported
// dtype; gate a contiguous float32 [C] tensor on the same device.
void check_x_and_gate(const char* op, const at::Tensor& x, const at::Tensor& gate) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got a tensor on ", x.device());
  TORCH_CHECK(gate.is_cuda(), op, ": gate must be a CUDA tensor on x's device ", x.device(),
              ", got a tensor on ", gate.device());
  TORCH_CHECK(gate.device() == x.device(), op, ": gate is on ", gate.device(), " but x is on ",
              x.device(), "; all tensors must be on the same device");
  TORCH_CHECK(x.scalar_type() != at::kDouble, op,
              ": float64 is not supported by the CUDA kernels (x has dtype float64); use the cpp "
              "or torch backend, or float32, float16 or bfloat16");
  TORCH_CHECK(is_half_or_single(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D [outer, C, inner], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous, got shape ", x.sizes(),
              " with strides ", x.strides());
  TORCH_CHECK(gate.scalar_type() == at::kFloat, op, ": gate must be float32, got ",
              gate.scalar_type());
  TORCH_CHECK(gate.dim() == 1 && gate.size(0) == x.size(1), op, ": gate must have shape [",
              x.size(1), "] (x.shape[1] of x with shape ", x.sizes(), "), got shape ", gate.sizes());
  TORCH_CHECK(gate.is_contiguous(), op, ": gate must be contiguous, got stride ", gate.strides());
}

at::Tensor channel_gate_forward_cuda(const at::Tensor& x, const at::Tensor& gate) {
  check_x_and_gate("tg_kernels::channel_gate_forward_kernel", x, gate);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) {
    return y;
  }
  TG_DISPATCH_HALF_AND_SINGLE(x.scalar_type(), "channel_gate_forward_cuda", [&] {
    launch_channel_gate<scalar_t, false>(x, nullptr, y, gate, nullptr);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_cuda(const at::Tensor& grad_y,
                                                              const at::Tensor& x,
                                                              const at::Tensor& gate) {
  const char* op = "tg_kernels::channel_gate_backward_kernel";
  check_x_and_gate(op, x, gate);
  TORCH_CHECK(grad_y.is_cuda() && grad_y.device() == x.device(), op,
              ": grad_y must be on x's device ", x.device(), ", got a tensor on ", grad_y.device());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype ",
              x.scalar_type(), ", got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.is_contiguous(), op, ": grad_y must be contiguous, got strides ",
              grad_y.strides());
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) {
    return {grad_x, at::zeros({x.size(1)}, gate.options())};
  }
  at::Tensor grad_gate = at::empty({x.size(1)}, gate.options());
  TG_DISPATCH_HALF_AND_SINGLE(x.scalar_type(), "channel_gate_backward_cuda", [&] {
    launch_channel_gate<scalar_t, true>(grad_y, &x, grad_x, gate, &grad_gate);
  });
  return {grad_x, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(tg_kernels, CUDA, m) {
  m.impl("channel_gate_forward_kernel", &channel_gate_forward_cuda);
  m.impl("channel_gate_backward_kernel", &channel_gate_backward_cuda);
}
