// CUDA kernels of gate-scatter and gate-gather, the fused gather/scatter steps of the skipping
// layers (docs/design.md §3):
//
//   gate_scatter_kernel(z_sel [N, A, *S], sel [A], gate_sel [A], C) -> y [N, C, *S]
//       y[:, sel[a]] = z_sel[:, a] * gate_sel[a], every other channel exactly 0
//   gate_gather_kernel(t [N, C, *S], sel [A], gate_sel [A]) -> t_sel [N, A, *S]
//       t_sel[:, a] = t[:, sel[a]] * gate_sel[a]
//
// Data is float32, float16 or bfloat16, gate_sel float32, the product is computed in float32 and
// rounded once to the data dtype (bitwise the same as the CPU kernels and the torch reference).
// Schemas: csrc/tg_kernels.cpp. CPU kernels: csrc/cpu/gate_scatter.cpp.
//
// Layout: like the CPU kernels, on the canonical view [outer, K, inner] (K = A or C); 4-D
// channels_last data is [N*H*W, K, 1] and gives a channels_last output, any other non-contiguous
// input is read through one contiguous copy.
//
// Work mapping: the kernels are output-driven and elementwise. Thread i of the grid-stride loop
// owns output "group" q (VEC consecutive output elements, one 16-byte store), so every output
// element is written exactly once, zeros included, and consecutive threads write consecutive
// 16-byte chunks (coalesced):
//  - ROW path (any inner; VEC > 1 when inner % VEC == 0 and both pointers are 16-byte
//    aligned): a group lies inside one run (o, k) of `inner` elements, so it is one 16-byte load
//    of the matching source run (or zeros) scaled by one gate value.
//  - COL path (inner == 1: channels_last or [N, C]; VEC > 1 when K_out % VEC == 0 and the output
//    is aligned): a group is VEC consecutive output channels of one row; the loads are scalar
//    gathers from the source row (neighbouring channels, so mostly the same cache lines).
// Otherwise the ROW path runs with VEC = 1 (scalar, any shape and alignment).
//
// Index decomposition uses at::cuda::detail::IntDivider (multiply-shift division) with 32-bit
// indices when every index of input and output is below 2^31, and plain int64 division
// otherwise: indices never overflow.
//
// Indices are trusted from the Python layer: checking them here would need a host
// synchronisation. They are still never used to read or write out of bounds: in the scatter, an
// entry of sel outside [0, C) is ignored (its data is dropped; the channel stays zero) and a
// channel listed twice takes the data of its first position; in the gather, an entry outside
// [0, C) gives zeros. The CPU kernels raise errors for both.
//
// The per-group work is in __host__ __device__ functions (the kernels are grid-stride loops over
// them) and the choice of path and divisors in plain host functions, so that
// tests/cuda_emulation/gate_scatter_emulation.cu can run the same code on the CPU (compiled with
// TG_GATE_SCATTER_EMULATION, which leaves out everything that needs torch or a device).
#ifndef TG_GATE_SCATTER_EMULATION
// c10's stream and exception headers rather than <ATen/cuda/CUDAContext.h> (see channel_gate.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>
#endif
#include <c10/macros/Macros.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

namespace {

using at::cuda::detail::IntDivider;

constexpr int kThreads = 256;          // threads per block, every kernel
constexpr int64_t kMaxBlocks = 65536;  // grid cap; kernels grid-stride over their groups

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

template <typename T, int N>
struct alignas(16) Vec {
  static_assert(sizeof(T) * N == 16, "a Vec is 16 bytes");
  T v[N];
};

// One 128-bit load / store (p 16-byte aligned).
template <typename T, int N>
__host__ __device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
#ifdef __CUDA_ARCH__
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
#else
  uint4 raw;
  memcpy(&raw, p, sizeof(raw));
#endif
  Vec<T, N> r;
  memcpy(&r, &raw, sizeof(raw));
  return r;
}

template <typename T, int N>
__host__ __device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& r) {
  uint4 raw;
  memcpy(&raw, &r, sizeof(raw));
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint4*>(p) = raw;
#else
  memcpy(p, &raw, sizeof(raw));
#endif
}

inline bool is_aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename scalar_t>
__host__ __device__ __forceinline__ scalar_t scaled(scalar_t x, float g) {
  return static_cast<scalar_t>(static_cast<float>(x) * g);
}

// ---------------------------------------------------------------------------------------------
// Paths and plans (host).

enum class Path { kCol, kRowVec, kRowScalar };

// inner: run length; k_out: channels of the output (C for the scatter, A for the gather);
// in_ok / out_ok: the input / output base pointer is 16-byte aligned.
inline Path choose_path(int64_t inner, int64_t k_out, int vec, bool in_ok, bool out_ok) {
  if (inner == 1 && k_out % vec == 0 && out_ok) {
    return Path::kCol;
  }
  if (inner % vec == 0 && in_ok && out_ok) {
    return Path::kRowVec;
  }
  return Path::kRowScalar;
}

// groups: output groups; major: divisor of the group index (ROW: groups per run; COL: groups per
// row); minor: divisor of the run index (ROW: k_out; COL: unused, 1). vec: elements per group.
template <typename index_t>
struct Plan {
  index_t groups;
  IntDivider<index_t> major;
  IntDivider<index_t> minor;
  int vec;
};

template <typename index_t>
Plan<index_t> make_plan(Path path, int64_t outer, int64_t inner, int64_t k_out, int vec) {
  const int v = path == Path::kRowScalar ? 1 : vec;
  const int64_t groups = outer * k_out * inner / v;
  if (path == Path::kCol) {
    return {static_cast<index_t>(groups), IntDivider<index_t>(static_cast<index_t>(k_out / v)),
            IntDivider<index_t>(1), v};
  }
  return {static_cast<index_t>(groups), IntDivider<index_t>(static_cast<index_t>(inner / v)),
          IntDivider<index_t>(static_cast<index_t>(k_out)), v};
}

// Whether every index of the input (numel in_numel) and of the output fits the 32-bit fast path
// (IntDivider<uint32_t> needs dividends and divisors <= INT32_MAX).
inline bool use_32bit(int64_t in_numel, int64_t out_numel) {
  return std::max(in_numel, out_numel) <= INT32_MAX;
}

// ---------------------------------------------------------------------------------------------
// Scatter. map[c] is the position of channel c in sel, or A for unselected channels.

// map[c] = A for every c (set before), then map[sel[a]] = the smallest a listing c (a channel
// listed twice takes its first position); entries of sel outside [0, C) are ignored.
__host__ __device__ __forceinline__ void scatter_map_entry(int64_t a, const int64_t* sel, int* map, int64_t C) {
  const int64_t c = sel[a];
  if (c >= 0 && c < C) {
#ifdef __CUDA_ARCH__
    atomicMin(map + c, static_cast<int>(a));
#else
    map[c] = std::min(map[c], static_cast<int>(a));
#endif
  }
}

// ROW group q (q < outer * C * inner / VEC): run (o, c) = divmod(q / (inner / VEC), C), vector
// jv = q % (inner / VEC) of the run.
template <typename scalar_t, int VEC, typename index_t>
__host__ __device__ __forceinline__ void scatter_row_group(index_t q, const scalar_t* __restrict__ z,
                                                           const int* __restrict__ map,
                                                           const float* __restrict__ gate, scalar_t* __restrict__ y,
                                                           const Plan<index_t>& p, index_t A) {
  const index_t iv = p.major.divisor;  // groups per run
  const auto run_j = p.major.divmod(q);
  const auto o_c = p.minor.divmod(run_j.div);
  const index_t a = static_cast<index_t>(map[o_c.mod]);
  const bool selected = a < A;
  const index_t src = ((o_c.div * A + a) * iv + run_j.mod) * VEC;  // only used when selected
  if constexpr (VEC == 1) {
    y[q] = selected ? scaled(z[src], gate[a]) : scalar_t(0);
  } else {
    Vec<scalar_t, VEC> r;
    if (selected) {
      const float g = gate[a];
      r = load_vec<scalar_t, VEC>(z + src);
#pragma unroll
      for (int v = 0; v < VEC; ++v) r.v[v] = scaled(r.v[v], g);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) r.v[v] = scalar_t(0);
    }
    store_vec<scalar_t, VEC>(y + static_cast<int64_t>(q) * VEC, r);
  }
}

// COL group q (inner == 1, q < outer * C / VEC): row o = q / (C / VEC), channels
// c0 = (q % (C / VEC)) * VEC, ... + VEC - 1. The loads are scalar gathers from row o of z.
template <typename scalar_t, int VEC, typename index_t>
__host__ __device__ __forceinline__ void scatter_col_group(index_t q, const scalar_t* __restrict__ z,
                                                           const int* __restrict__ map,
                                                           const float* __restrict__ gate, scalar_t* __restrict__ y,
                                                           const Plan<index_t>& p, index_t A) {
  const auto o_k = p.major.divmod(q);
  const scalar_t* zrow = z + static_cast<int64_t>(o_k.div) * A;
  const index_t c0 = o_k.mod * VEC;
  Vec<scalar_t, VEC> r;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const index_t a = static_cast<index_t>(map[c0 + v]);
    r.v[v] = a < A ? scaled(zrow[a], gate[a]) : scalar_t(0);
  }
  store_vec<scalar_t, VEC>(y + static_cast<int64_t>(q) * VEC, r);
}

// ---------------------------------------------------------------------------------------------
// Gather. Entries of sel outside [0, C) give zeros.

// ROW group q (q < outer * A * inner / VEC): run (o, a) = divmod(q / (inner / VEC), A).
template <typename scalar_t, int VEC, typename index_t>
__host__ __device__ __forceinline__ void gather_row_group(index_t q, const scalar_t* __restrict__ t,
                                                          const int64_t* __restrict__ sel,
                                                          const float* __restrict__ gate, scalar_t* __restrict__ out,
                                                          const Plan<index_t>& p, int64_t C) {
  const index_t iv = p.major.divisor;
  const auto run_j = p.major.divmod(q);
  const auto o_a = p.minor.divmod(run_j.div);
  const int64_t c = sel[o_a.mod];
  const bool valid = c >= 0 && c < C;
  const index_t src = ((o_a.div * static_cast<index_t>(C) + static_cast<index_t>(c)) * iv + run_j.mod) * VEC;
  if constexpr (VEC == 1) {
    out[q] = valid ? scaled(t[src], gate[o_a.mod]) : scalar_t(0);
  } else {
    Vec<scalar_t, VEC> r;
    if (valid) {
      const float g = gate[o_a.mod];
      r = load_vec<scalar_t, VEC>(t + src);
#pragma unroll
      for (int v = 0; v < VEC; ++v) r.v[v] = scaled(r.v[v], g);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) r.v[v] = scalar_t(0);
    }
    store_vec<scalar_t, VEC>(out + static_cast<int64_t>(q) * VEC, r);
  }
}

// COL group q (inner == 1, q < outer * A / VEC): row o, positions a0 = (q % (A / VEC)) * VEC, ...
template <typename scalar_t, int VEC, typename index_t>
__host__ __device__ __forceinline__ void gather_col_group(index_t q, const scalar_t* __restrict__ t,
                                                          const int64_t* __restrict__ sel,
                                                          const float* __restrict__ gate, scalar_t* __restrict__ out,
                                                          const Plan<index_t>& p, int64_t C) {
  const auto o_k = p.major.divmod(q);
  const scalar_t* trow = t + static_cast<int64_t>(o_k.div) * C;
  const index_t a0 = o_k.mod * VEC;
  Vec<scalar_t, VEC> r;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int64_t c = sel[a0 + v];
    r.v[v] = (c >= 0 && c < C) ? scaled(trow[c], gate[a0 + v]) : scalar_t(0);
  }
  store_vec<scalar_t, VEC>(out + static_cast<int64_t>(q) * VEC, r);
}

// ---------------------------------------------------------------------------------------------
// Kernels: grid-stride loops over the groups (q + stride stays below 2^32 in the 32-bit path:
// q < 2^31 and stride <= kMaxBlocks * kThreads = 2^24).

#define TG_GRID_STRIDE_LOOP(q, count)                                                                     \
  for (index_t q = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; q < (count);                \
       q += static_cast<index_t>(gridDim.x) * kThreads)

template <typename scalar_t, int VEC, typename index_t, bool kCol>
__global__ void __launch_bounds__(kThreads) scatter_groups_kernel(const scalar_t* __restrict__ z,
                                                                const int* __restrict__ map,
                                                                const float* __restrict__ gate,
                                                                scalar_t* __restrict__ y, const Plan<index_t> p,
                                                                const index_t A) {
  TG_GRID_STRIDE_LOOP(q, p.groups) {
    if constexpr (kCol) {
      scatter_col_group<scalar_t, VEC, index_t>(q, z, map, gate, y, p, A);
    } else {
      scatter_row_group<scalar_t, VEC, index_t>(q, z, map, gate, y, p, A);
    }
  }
}

__global__ void scatter_map_kernel(const int64_t* __restrict__ sel, int* __restrict__ map, const int64_t A,
                                        const int64_t C) {
  using index_t = int64_t;
  TG_GRID_STRIDE_LOOP(a, A) {
    scatter_map_entry(a, sel, map, C);
  }
}

template <typename scalar_t, int VEC, typename index_t, bool kCol>
__global__ void __launch_bounds__(kThreads) gather_groups_kernel(const scalar_t* __restrict__ t,
                                                               const int64_t* __restrict__ sel,
                                                               const float* __restrict__ gate,
                                                               scalar_t* __restrict__ out, const Plan<index_t> p,
                                                               const int64_t C) {
  TG_GRID_STRIDE_LOOP(q, p.groups) {
    if constexpr (kCol) {
      gather_col_group<scalar_t, VEC, index_t>(q, t, sel, gate, out, p, C);
    } else {
      gather_row_group<scalar_t, VEC, index_t>(q, t, sel, gate, out, p, C);
    }
  }
}

#undef TG_GRID_STRIDE_LOOP

#ifndef TG_GATE_SCATTER_EMULATION
// ---------------------------------------------------------------------------------------------
// Host side.

int grid_for(int64_t groups) {
  return static_cast<int>(std::min((groups + kThreads - 1) / kThreads, kMaxBlocks));
}

// Data as [outer, K, inner]; `data` is contiguous in that order.
struct Canonical {
  at::Tensor data;
  int64_t outer;
  int64_t inner;
  bool channels_last;
};

// Channels-last is recognised for 4-D tensors that are not also contiguous (the rule of the
// Python fakes in tg_kernels/ops/gate_scatter.py).
bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Canonical canonical(const at::Tensor& t) {
  if (is_channels_last(t)) {
    return {t, t.size(0) * t.size(2) * t.size(3), 1, true};
  }
  int64_t inner = 1;
  for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
  return {t.contiguous(), t.size(0), inner, false};
}

at::Tensor empty_output(const at::Tensor& like, const Canonical& view, int64_t channels) {
  std::vector<int64_t> sizes = like.sizes().vec();
  sizes[1] = channels;
  return at::empty(sizes, like.options().memory_format(view.channels_last ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous));
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

// Checks shared by both ops. `data` is z_sel (scatter) or t (gather).
void check_args(const char* op, const char* data_name, const at::Tensor& data, const at::Tensor& sel,
                const at::Tensor& gate_sel) {
  TORCH_CHECK(data.is_cuda(), op, ": ", data_name, " must be a CUDA tensor, got a tensor on ", data.device());
  TORCH_CHECK(sel.device() == data.device() && gate_sel.device() == data.device(), op, ": sel is on ",
              sel.device(), " and gate_sel on ", gate_sel.device(), " but ", data_name, " is on ", data.device(),
              "; all tensors must be on the same device");
  TORCH_CHECK(data.dim() >= 2, op, ": ", data_name, " must have at least 2 dimensions [N, channels, *spatial], got ",
              data.dim(), " (shape ", data.sizes(), ")");
  TORCH_CHECK(data.scalar_type() != at::kDouble, op, ": float64 is not supported by the CUDA kernels (", data_name,
              " has dtype float64); use the cpp or torch backend, or float32, float16 or bfloat16");
  TORCH_CHECK(is_half_or_single(data.scalar_type()), op, ": ", data_name,
              " must be float32, float16 or bfloat16, got ", data.scalar_type());
  TORCH_CHECK(sel.scalar_type() == at::kLong, op, ": sel must be int64 (torch.long) channel indices, got ",
              sel.scalar_type());
  TORCH_CHECK(sel.dim() == 1, op, ": sel must be 1-D, got shape ", sel.sizes());
  TORCH_CHECK(gate_sel.scalar_type() == at::kFloat, op, ": gate_sel must be float32, got ", gate_sel.scalar_type());
  TORCH_CHECK(gate_sel.dim() == 1 && gate_sel.size(0) == sel.size(0), op,
              ": gate_sel must have shape [", sel.size(0), "] (one value per entry of sel), got ", gate_sel.sizes());
}

template <typename scalar_t, typename index_t>
void launch_scatter(const Canonical& view, const at::Tensor& map, const at::Tensor& gate_sel, const at::Tensor& y,
                    int64_t A, int64_t C) {
  constexpr int VEC = vec_size<scalar_t>();
  const scalar_t* z = view.data.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int* mp = map.const_data_ptr<int>();
  const float* gp = gate_sel.const_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Path path = choose_path(view.inner, C, VEC, is_aligned_16(z), is_aligned_16(yp));
  const Plan<index_t> p = make_plan<index_t>(path, view.outer, view.inner, C, VEC);
  const int grid = grid_for(static_cast<int64_t>(p.groups));
  const auto iA = static_cast<index_t>(A);
  if (path == Path::kCol) {
    scatter_groups_kernel<scalar_t, VEC, index_t, true><<<grid, kThreads, 0, stream>>>(z, mp, gp, yp, p, iA);
  } else if (path == Path::kRowVec) {
    scatter_groups_kernel<scalar_t, VEC, index_t, false><<<grid, kThreads, 0, stream>>>(z, mp, gp, yp, p, iA);
  } else {
    scatter_groups_kernel<scalar_t, 1, index_t, false><<<grid, kThreads, 0, stream>>>(z, mp, gp, yp, p, iA);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch_gather(const Canonical& view, const at::Tensor& sel, const at::Tensor& gate_sel, const at::Tensor& out,
                   int64_t A, int64_t C) {
  constexpr int VEC = vec_size<scalar_t>();
  const scalar_t* t = view.data.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  const float* gp = gate_sel.const_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Path path = choose_path(view.inner, A, VEC, is_aligned_16(t), is_aligned_16(op));
  const Plan<index_t> p = make_plan<index_t>(path, view.outer, view.inner, A, VEC);
  const int grid = grid_for(static_cast<int64_t>(p.groups));
  if (path == Path::kCol) {
    gather_groups_kernel<scalar_t, VEC, index_t, true><<<grid, kThreads, 0, stream>>>(t, sp, gp, op, p, C);
  } else if (path == Path::kRowVec) {
    gather_groups_kernel<scalar_t, VEC, index_t, false><<<grid, kThreads, 0, stream>>>(t, sp, gp, op, p, C);
  } else {
    gather_groups_kernel<scalar_t, 1, index_t, false><<<grid, kThreads, 0, stream>>>(t, sp, gp, op, p, C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gate_scatter_cuda(const at::Tensor& z_sel, const at::Tensor& sel_arg, const at::Tensor& gate_arg,
                             int64_t channels) {
  const char* op = "tg_kernels::gate_scatter_kernel";
  check_args(op, "z_sel", z_sel, sel_arg, gate_arg);
  const int64_t A = z_sel.size(1);
  TORCH_CHECK(sel_arg.size(0) == A, op, ": sel must hold one channel index per channel of z_sel (z_sel.shape[1] = ",
              A, "), got ", sel_arg.size(0), " indices");
  TORCH_CHECK(channels >= A, op, ": channels (", channels, ") must be at least the number of selected channels (",
              A, ")");
  TORCH_CHECK(channels <= INT32_MAX, op, ": at most ", INT32_MAX, " channels are supported, got ", channels);
  const c10::cuda::CUDAGuard device_guard(z_sel.device());
  const Canonical view = canonical(z_sel);
  at::Tensor y = empty_output(z_sel, view, channels);
  if (y.numel() == 0) {
    return y;
  }
  if (A == 0) {
    return y.zero_();
  }
  const at::Tensor sel = sel_arg.contiguous();
  const at::Tensor gate_sel = gate_arg.contiguous();
  at::Tensor map = at::full({channels}, A, sel.options().dtype(at::kInt));
  scatter_map_kernel<<<grid_for(A), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sel.const_data_ptr<int64_t>(), map.mutable_data_ptr<int>(), A, channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TG_DISPATCH_HALF_AND_SINGLE(z_sel.scalar_type(), "gate_scatter_cuda", [&] {
    if (use_32bit(view.data.numel(), y.numel())) {
      launch_scatter<scalar_t, uint32_t>(view, map, gate_sel, y, A, channels);
    } else {
      launch_scatter<scalar_t, int64_t>(view, map, gate_sel, y, A, channels);
    }
  });
  return y;
}

at::Tensor gate_gather_cuda(const at::Tensor& t, const at::Tensor& sel_arg, const at::Tensor& gate_arg) {
  const char* op = "tg_kernels::gate_gather_kernel";
  check_args(op, "t", t, sel_arg, gate_arg);
  const int64_t A = sel_arg.size(0);
  const int64_t channels = t.size(1);
  const c10::cuda::CUDAGuard device_guard(t.device());
  const Canonical view = canonical(t);
  at::Tensor out = empty_output(t, view, A);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor sel = sel_arg.contiguous();
  const at::Tensor gate_sel = gate_arg.contiguous();
  TG_DISPATCH_HALF_AND_SINGLE(t.scalar_type(), "gate_gather_cuda", [&] {
    if (use_32bit(view.data.numel(), out.numel())) {
      launch_gather<scalar_t, uint32_t>(view, sel, gate_sel, out, A, channels);
    } else {
      launch_gather<scalar_t, int64_t>(view, sel, gate_sel, out, A, channels);
    }
  });
  return out;
}

#endif  // TG_GATE_SCATTER_EMULATION

}  // namespace

#ifndef TG_GATE_SCATTER_EMULATION
TORCH_LIBRARY_IMPL(tg_kernels, CUDA, m) {
  m.impl("gate_scatter_kernel", &gate_scatter_cuda);
  m.impl("gate_gather_kernel", &gate_gather_cuda);
}
#endif
