// Gate-scatter and gate-gather, C++ CPU kernels (the `cpp` backend): the fused gather/scatter
// steps of the skipping layers (docs/design.md §3).
//
//   gate_scatter_kernel(z_sel [N, A, *S], sel [A], gate_sel [A], C) -> y [N, C, *S]
//       y[:, sel[a]] = z_sel[:, a] * gate_sel[a], every other channel exactly 0
//   gate_gather_kernel(t [N, C, *S], sel [A], gate_sel [A]) -> t_sel [N, A, *S]
//       t_sel[:, a] = t[:, sel[a]] * gate_sel[a]
//
// Each output element is written exactly once (the zeros of unselected channels in the same
// pass), in the input's dtype, with the product computed in float32 (float64 for float64 data;
// gate_sel must have that dtype). The output has the input's memory format: 4-D channels_last in,
// channels_last out; any other non-contiguous input is read through one contiguous copy and gives
// a contiguous output. Schemas: csrc/tg_kernels.cpp. Oracle: tg_kernels/ops/gate_scatter.py.
//
// Both layouts are handled on the canonical view [outer, K, inner] of the data (K = A or C):
//  - "rows" (inner > 1, e.g. contiguous NCHW): each (o, k) is a contiguous run of `inner` values;
//    a run of the output is a scaled copy of one run of the input, or zeros (std::fill).
//  - "columns" (inner == 1: channels_last, where outer = N*H*W, or 2-D [N, C]): rows of K values;
//    the inner loop runs across the output channels and reads its source through a per-channel
//    map (scatter: channel -> position in sel or -1; gather: sel itself).
//
// Indices are checked here (in range; distinct for the scatter) before anything is written.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tg_kernels {
namespace {

constexpr int64_t kGrainValues = 32768;  // output values per parallel task, roughly

// The data of a [N, K, *S] tensor as [outer, K, inner] (contiguous after the view).
struct Canonical {
  at::Tensor data;  // contiguous in the canonical order
  int64_t outer;
  int64_t inner;
  bool channels_last;  // the output takes channels_last format
};

// Channels-last is recognised for 4-D tensors that are not also contiguous (the rule of
// tg_kernels/ops/gate_scatter.py's fakes, and of _skip.output_format).
bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Canonical canonical(const at::Tensor& t) {
  if (is_channels_last(t)) {
    return {t, t.size(0) * t.size(2) * t.size(3), 1, true};
  }
  at::Tensor data = t.contiguous();
  int64_t inner = 1;
  for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
  return {data, t.size(0), inner, false};
}

at::Tensor empty_output(const at::Tensor& like, const Canonical& view, int64_t channels) {
  std::vector<int64_t> sizes = like.sizes().vec();
  sizes[1] = channels;
  return at::empty(sizes, like.options().memory_format(view.channels_last ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous));
}

// Checks shared by both ops. `data` is z_sel (scatter) or t (gather).
void check_args(const char* op, const char* data_name, const at::Tensor& data, const at::Tensor& sel,
                const at::Tensor& gate_sel) {
  TORCH_CHECK(data.device().is_cpu() && sel.device().is_cpu() && gate_sel.device().is_cpu(), op,
              ": expected CPU tensors, got ", data_name, " on ", data.device(), ", sel on ", sel.device(),
              " and gate_sel on ", gate_sel.device());
  TORCH_CHECK(data.dim() >= 2, op, ": ", data_name, " must have at least 2 dimensions [N, channels, *spatial], got ",
              data.dim(), " (shape ", data.sizes(), ")");
  TORCH_CHECK(at::isFloatingType(data.scalar_type()), op, ": ", data_name,
              " must be float16, bfloat16, float32 or float64, got ", data.scalar_type());
  TORCH_CHECK(sel.scalar_type() == at::kLong, op, ": sel must be int64 (torch.long) channel indices, got ",
              sel.scalar_type());
  TORCH_CHECK(sel.dim() == 1, op, ": sel must be 1-D, got shape ", sel.sizes());
  const auto gate_dtype = data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(gate_sel.scalar_type() == gate_dtype, op, ": gate_sel must be ", gate_dtype, " for ", data_name,
              " of dtype ", data.scalar_type(), ", got ", gate_sel.scalar_type());
  TORCH_CHECK(gate_sel.dim() == 1 && gate_sel.size(0) == sel.size(0), op,
              ": gate_sel must have shape [", sel.size(0), "] (one value per entry of sel), got ", gate_sel.sizes());
}

// out[i] = in[i] * g over a contiguous run (vectorisable).
template <typename scalar_t, typename acc_t>
void scale_run(scalar_t* __restrict__ out, const scalar_t* __restrict__ in, acc_t g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * g);
}

// out[i] = in[i] * g[i] over a contiguous run (vectorisable).
template <typename scalar_t, typename acc_t>
void scale_products(scalar_t* __restrict__ out, const scalar_t* __restrict__ in, const acc_t* __restrict__ g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * g[i]);
}

at::Tensor gate_scatter_cpu(const at::Tensor& z_sel, const at::Tensor& sel_arg, const at::Tensor& gate_arg,
                            int64_t channels) {
  const char* op = "tg_kernels::gate_scatter_kernel";
  check_args(op, "z_sel", z_sel, sel_arg, gate_arg);
  const int64_t A = z_sel.size(1);
  TORCH_CHECK(sel_arg.size(0) == A, op, ": sel must hold one channel index per channel of z_sel (z_sel.shape[1] = ",
              A, "), got ", sel_arg.size(0), " indices");
  TORCH_CHECK(channels >= A, op, ": channels (", channels, ") must be at least the number of selected channels (",
              A, ")");
  const at::Tensor sel = sel_arg.contiguous();
  const at::Tensor gate_sel = gate_arg.contiguous();

  // src[c]: position of channel c in sel, or -1. Checks range and distinctness before any write.
  std::vector<int64_t> src(static_cast<size_t>(channels), -1);
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  for (int64_t a = 0; a < A; ++a) {
    const int64_t c = sp[a];
    TORCH_CHECK(c >= 0 && c < channels, op, ": sel[", a, "] = ", c, " is out of range for ", channels, " channels");
    TORCH_CHECK(src[c] < 0, op, ": sel holds channel ", c, " twice (positions ", src[c], " and ", a,
                "); selected channels must be distinct");
    src[c] = a;
  }

  const Canonical view = canonical(z_sel);
  at::Tensor y = empty_output(z_sel, view, channels);
  if (y.numel() == 0) return y;
  const int64_t outer = view.outer, inner = view.inner;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z_sel.scalar_type(), "gate_scatter_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = view.data.const_data_ptr<scalar_t>();
    const acc_t* gp = gate_sel.const_data_ptr<acc_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t* srcp = src.data();
    if (inner > 1) {
      // Output run r = o * C + c.
      const int64_t runs = outer * channels;
      at::parallel_for(0, runs, std::max<int64_t>(1, kGrainValues / inner), [&](int64_t begin, int64_t end) {
        int64_t o = begin / channels, c = begin - o * channels;
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* out = yp + r * inner;
          const int64_t a = srcp[c];
          if (a >= 0) {
            scale_run(out, zp + (o * A + a) * inner, gp[a], inner);
          } else {
            std::fill_n(out, inner, scalar_t(0));
          }
          if (++c == channels) {
            c = 0;
            ++o;
          }
        }
      });
    } else if (A == 0) {
      at::parallel_for(0, outer, std::max<int64_t>(1, kGrainValues / channels), [&](int64_t begin, int64_t end) {
        std::fill(yp + begin * channels, yp + end * channels, scalar_t(0));
      });
    } else {
      // Per row: the gated values of the A selected channels go to a small buffer (a contiguous,
      // vectorisable loop) followed by one zero; then the output row is a gather from that buffer
      // through idx[c] = position of c in sel, or A (the zero) for unselected channels. Every
      // output element is written once, unselected ones as an exact +0.
      std::vector<int64_t> idx(static_cast<size_t>(channels));
      for (int64_t c = 0; c < channels; ++c) idx[c] = srcp[c] >= 0 ? srcp[c] : A;
      const int64_t* ip = idx.data();
      at::parallel_for(0, outer, std::max<int64_t>(1, kGrainValues / channels), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buffer(static_cast<size_t>(A + 1));
        scalar_t* bp = buffer.data();
        bp[A] = scalar_t(0);
        for (int64_t o = begin; o < end; ++o) {
          scale_products(bp, zp + o * A, gp, A);
          scalar_t* yrow = yp + o * channels;
          for (int64_t c = 0; c < channels; ++c) yrow[c] = bp[ip[c]];
        }
      });
    }
  });
  return y;
}

at::Tensor gate_gather_cpu(const at::Tensor& t, const at::Tensor& sel_arg, const at::Tensor& gate_arg) {
  const char* op = "tg_kernels::gate_gather_kernel";
  check_args(op, "t", t, sel_arg, gate_arg);
  const int64_t channels = t.size(1);
  const int64_t A = sel_arg.size(0);
  const at::Tensor sel = sel_arg.contiguous();
  const at::Tensor gate_sel = gate_arg.contiguous();
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  for (int64_t a = 0; a < A; ++a) {
    TORCH_CHECK(sp[a] >= 0 && sp[a] < channels, op, ": sel[", a, "] = ", sp[a], " is out of range for t with ",
                channels, " channels (t.shape[1])");
  }

  const Canonical view = canonical(t);
  at::Tensor out = empty_output(t, view, A);
  if (out.numel() == 0) return out;
  const int64_t outer = view.outer, inner = view.inner;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "gate_gather_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = view.data.const_data_ptr<scalar_t>();
    const acc_t* gp = gate_sel.const_data_ptr<acc_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    if (inner > 1) {
      // Output run r = o * A + a.
      const int64_t runs = outer * A;
      at::parallel_for(0, runs, std::max<int64_t>(1, kGrainValues / inner), [&](int64_t begin, int64_t end) {
        int64_t o = begin / A, a = begin - o * A;
        for (int64_t r = begin; r < end; ++r) {
          scale_run(op_ + r * inner, tp + (o * channels + sp[a]) * inner, gp[a], inner);
          if (++a == A) {
            a = 0;
            ++o;
          }
        }
      });
    } else {
      at::parallel_for(0, outer, std::max<int64_t>(1, kGrainValues / A), [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) {
          const scalar_t* trow = tp + o * channels;
          scalar_t* orow = op_ + o * A;
          for (int64_t a = 0; a < A; ++a) orow[a] = static_cast<scalar_t>(static_cast<acc_t>(trow[sp[a]]) * gp[a]);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tg_kernels, CPU, m) {
  m.impl("gate_scatter_kernel", &gate_scatter_cpu);
  m.impl("gate_gather_kernel", &gate_gather_cpu);
}

}  // namespace tg_kernels
