// Channel gate, C++ CPU kernels (the `cpp` backend).
//
// x is the canonical view [outer, C, inner], contiguous. Two loop shapes cover every layout:
//  - "rows" (inner >= kRowPathMinInner, e.g. NCHW): each (o, c) is a contiguous run of `inner`
//    values sharing one gate; the run is cut into chunks of kChunk values.
//  - "blocks" (small inner, e.g. channels-last or (N, C)): blocks of whole outer rows, the inner
//    loop runs across channels.
// The backward's per-channel sums go through a partial-sum buffer whose layout and summation order
// depend only on the shapes, never on the thread count, so results are bitwise reproducible.
// The backward opens one parallel region (the fused pass): the partials start life inside it and
// are summed serially unless they are large. Each extra region costs a wake-up and a barrier, which
// on a 2-core machine with other work running can cost more than the whole reduction.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace tg_kernels {
namespace {

constexpr int64_t kRowPathMinInner = 64;  // below this, runs are too short to pay for a row each
constexpr int64_t kChunk = 16384;          // values per partial sum on the row path
constexpr int64_t kBlockValues = 16384;    // values per block on the block path
constexpr int64_t kGrainValues = 32768;    // values per parallel task, roughly
constexpr int64_t kReduceGrainValues = 1 << 20;  // partial sums per reduction task: below this, serial

void check_args(const at::Tensor& x, const at::Tensor& gate, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && gate.device().is_cpu(), op, ": expected CPU tensors, got x on ",
              x.device(), " and gate on ", gate.device());
  TORCH_CHECK(x.dim() == 3, op, ": expected x of shape [outer, C, inner], got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_contiguous(), op, ": expected a contiguous x");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const auto gate_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(gate.scalar_type() == gate_dtype, op, ": gate must be ", gate_dtype, " for x of dtype ",
              x.scalar_type(), ", got ", gate.scalar_type());
  TORCH_CHECK(gate.dim() == 1 && gate.size(0) == x.size(1), op, ": gate must have shape [", x.size(1),
              "] (one value per channel), got ", gate.sizes());
  TORCH_CHECK(gate.is_contiguous(), op, ": expected a contiguous gate");
}

// y[i] = in[i] * g over a contiguous run.
template <typename scalar_t, typename acc_t>
void scale_run(scalar_t* __restrict__ out, const scalar_t* __restrict__ in, acc_t g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * g);
}

// The backward over one contiguous run, in one pass: dx = dy * g, and returns sum(dy * x).
// The sum uses 8 independent lanes (vectorisable) combined in a fixed order, so it is reproducible.
template <typename scalar_t, typename acc_t>
acc_t scale_and_dot_run(scalar_t* __restrict__ dx, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                        acc_t g, int64_t n) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const acc_t d = static_cast<acc_t>(dy[i + j]);
      dx[i + j] = static_cast<scalar_t>(d * g);
      lanes[j] += d * static_cast<acc_t>(x[i + j]);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const acc_t d = static_cast<acc_t>(dy[i]);
    dx[i] = static_cast<scalar_t>(d * g);
    lanes[j] += d * static_cast<acc_t>(x[i]);
  }
  acc_t sum = 0;
  for (int j = 0; j < 8; ++j) sum += lanes[j];
  return sum;
}

// One row of channels (inner == 1): y[c] = x[c] * gate[c]. Restrict lets the compiler vectorise.
template <typename scalar_t, typename acc_t>
void scale_row(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, const acc_t* __restrict__ gate, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] = static_cast<scalar_t>(static_cast<acc_t>(x[c]) * gate[c]);
}

// The backward over one row of channels (inner == 1): dx[c] = dy[c] * gate[c], acc[c] += dy[c] * x[c].
template <typename scalar_t, typename acc_t>
void scale_and_accumulate_row(scalar_t* __restrict__ dx, const scalar_t* __restrict__ dy,
                              const scalar_t* __restrict__ x, const acc_t* __restrict__ gate,
                              acc_t* __restrict__ acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const acc_t d = static_cast<acc_t>(dy[c]);
    dx[c] = static_cast<scalar_t>(d * gate[c]);
    acc[c] += d * static_cast<acc_t>(x[c]);
  }
}

// The backward over one outer row with short runs (1 < inner < kRowPathMinInner, e.g. 7x7 maps):
// plain loops, since the 8-lane dot's setup would cost more than a short run.
template <typename scalar_t, typename acc_t>
void scale_and_accumulate_short_runs(scalar_t* __restrict__ dx, const scalar_t* __restrict__ dy,
                                     const scalar_t* __restrict__ x, const acc_t* __restrict__ gate,
                                     acc_t* __restrict__ acc, int64_t channels, int64_t inner) {
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t g = gate[c];
    acc_t sum = 0;
    for (int64_t i = c * inner; i < (c + 1) * inner; ++i) {
      const acc_t d = static_cast<acc_t>(dy[i]);
      dx[i] = static_cast<scalar_t>(d * g);
      sum += d * static_cast<acc_t>(x[i]);
    }
    acc[c] += sum;
  }
}

// out[c] += in[c]: one row of partial sums added into the running sums.
template <typename acc_t>
void sum_into(acc_t* __restrict__ out, const acc_t* __restrict__ in, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] += in[c];
}

at::Tensor channel_gate_forward_cpu(const at::Tensor& x, const at::Tensor& gate) {
  check_args(x, gate, "tg_kernels::channel_gate_forward_kernel");
  auto y = at::empty_like(x);
  const int64_t outer = x.size(0), channels = x.size(1), inner = x.size(2);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_gate_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t* gp = gate.data_ptr<acc_t>();
    if (inner >= kRowPathMinInner) {
      const int64_t rows = outer * channels;
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainValues / inner), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scale_run(yp + r * inner, xp + r * inner, gp[r % channels], inner);
        }
      });
    } else {
      const int64_t row_values = channels * inner;
      at::parallel_for(0, outer, std::max<int64_t>(1, kGrainValues / row_values), [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) {
          const scalar_t* xrow = xp + o * row_values;
          scalar_t* yrow = yp + o * row_values;
          if (inner == 1) {
            scale_row(yrow, xrow, gp, channels);
          } else {
            for (int64_t c = 0; c < channels; ++c) scale_run(yrow + c * inner, xrow + c * inner, gp[c], inner);
          }
        }
      });
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& gate) {
  check_args(x, gate, "tg_kernels::channel_gate_backward_kernel");
  TORCH_CHECK(grad_y.device().is_cpu(), "tg_kernels::channel_gate_backward_kernel: expected grad_y on CPU, got ",
              grad_y.device());
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.is_contiguous(),
              "tg_kernels::channel_gate_backward_kernel: grad_y must be contiguous with x's shape ", x.sizes(),
              " and dtype ", x.scalar_type(), ", got shape ", grad_y.sizes(), " and dtype ", grad_y.scalar_type());
  const int64_t outer = x.size(0), channels = x.size(1), inner = x.size(2);
  auto grad_x = at::empty_like(x);
  if (x.numel() == 0) return {grad_x, at::zeros_like(gate)};

  at::Tensor partials;  // [*, C]: summed over dim 0 in index order at the end
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_gate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = grad_y.data_ptr<scalar_t>();
    scalar_t* dxp = grad_x.data_ptr<scalar_t>();
    const acc_t* gp = gate.data_ptr<acc_t>();
    if (inner >= kRowPathMinInner) {
      // Work item (o, c, k): chunk k of row (o, c). partials laid out [outer, chunks, C].
      const int64_t chunks = (inner + kChunk - 1) / kChunk;
      partials = at::empty({outer * chunks, channels}, gate.options());
      acc_t* pp = partials.data_ptr<acc_t>();
      const int64_t items = outer * channels * chunks;
      const int64_t values_per_item = std::min(inner, kChunk);
      at::parallel_for(0, items, std::max<int64_t>(1, kGrainValues / values_per_item), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t k = item % chunks, row = item / chunks;
          const int64_t o = row / channels, c = row % channels;
          const int64_t start = row * inner + k * kChunk;
          const int64_t n = std::min(kChunk, inner - k * kChunk);
          pp[(o * chunks + k) * channels + c] = scale_and_dot_run(dxp + start, dyp + start, xp + start, gp[c], n);
        }
      });
    } else {
      // Block b holds outer rows [b * rows_per_block, ...): partials laid out [blocks, C].
      const int64_t row_values = channels * inner;
      const int64_t rows_per_block = std::max<int64_t>(1, kBlockValues / row_values);
      const int64_t blocks = (outer + rows_per_block - 1) / rows_per_block;
      partials = at::empty({blocks, channels}, gate.options());
      acc_t* pp = partials.data_ptr<acc_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          acc_t* acc = pp + b * channels;
          std::fill(acc, acc + channels, acc_t(0));  // here rather than at::zeros: no extra parallel pass
          const int64_t o_end = std::min(outer, (b + 1) * rows_per_block);
          for (int64_t o = b * rows_per_block; o < o_end; ++o) {
            const int64_t base = o * row_values;
            if (inner == 1) {
              scale_and_accumulate_row(dxp + base, dyp + base, xp + base, gp, acc, channels);
            } else {
              scale_and_accumulate_short_runs(dxp + base, dyp + base, xp + base, gp, acc, channels, inner);
            }
          }
        }
      });
    }
  });
  // Fixed-order reduction over the partials' first dimension: out[c] = ((p0 + p1) + p2) + ... for
  // every channel. Rows are read in order (contiguous, vectorisable across channels); channel
  // ranges go to threads only when the partials are large, so small ones need no parallel region.
  auto grad_gate = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "channel_gate_reduce_cpu", [&] {
    const scalar_t* pp = partials.data_ptr<scalar_t>();
    scalar_t* out = grad_gate.data_ptr<scalar_t>();
    const int64_t parts = partials.size(0);
    const int64_t grain = std::max<int64_t>(64, kReduceGrainValues / parts);
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      std::fill(out + begin, out + end, scalar_t(0));
      for (int64_t p = 0; p < parts; ++p) sum_into(out + begin, pp + p * channels + begin, end - begin);
    });
  });
  return {grad_x, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(tg_kernels, CPU, m) {
  m.impl("channel_gate_forward_kernel", &channel_gate_forward_cpu);
  m.impl("channel_gate_backward_kernel", &channel_gate_backward_cpu);
}

}  // namespace tg_kernels
