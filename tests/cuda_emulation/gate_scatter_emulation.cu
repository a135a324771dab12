// Runs the per-group code of csrc/cuda/gate_scatter.cu on the CPU, one call per output group as
// the grid-stride loops would, over many shapes, dtypes, alignments and both index widths, and
// compares every output byte with a plain loop. Built and run by tests/test_gate_scatter.py
// (nvcc compiles the host side; no GPU needed), with AddressSanitizer where available, which
// catches any read or write out of bounds. Prints "ok <cases>" or the first mismatch.
#define TG_GATE_SCATTER_EMULATION 1
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "csrc/cuda/gate_scatter.cu"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

std::mt19937_64 rng(1234);
int64_t cases = 0;
int64_t path_count[2][3] = {};  // [scatter, gather][kCol, kRowVec, kRowScalar]

template <typename T>
struct Buffer {  // `n` elements starting `offset` elements into a 16-byte aligned allocation
  std::vector<T> storage;
  T* data;
  Buffer(int64_t n, int64_t offset) : storage(static_cast<size_t>(n + offset)), data(storage.data() + offset) {}
};

template <typename T>
bool same_bytes(const T& a, const T& b) {
  return memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename scalar_t>
void fill_random(scalar_t* p, int64_t n) {
  std::normal_distribution<float> d;
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(d(rng));
}

[[noreturn]] void fail(const char* what, int64_t outer, int64_t inner, int64_t A, int64_t C, int in_off,
                       int out_off, int idx32, int64_t at) {
  printf("MISMATCH %s outer=%lld inner=%lld A=%lld C=%lld in_off=%d out_off=%d idx32=%d at=%lld\n", what,
         (long long)outer, (long long)inner, (long long)A, (long long)C, in_off, out_off, idx32, (long long)at);
  exit(1);
}

// sel: the indices (may hold bad ones: then expectations follow the documented CUDA behaviour).
template <typename scalar_t, typename index_t>
void check_scatter(int64_t outer, int64_t inner, int64_t C, const std::vector<int64_t>& sel, int in_off,
                   int out_off) {
  constexpr int VEC = vec_size<scalar_t>();
  const int64_t A = static_cast<int64_t>(sel.size());
  Buffer<scalar_t> z(outer * A * inner, in_off);
  fill_random(z.data, outer * A * inner);
  std::vector<float> gate(static_cast<size_t>(A));
  for (auto& g : gate) g = std::uniform_real_distribution<float>(0.25f, 1.25f)(rng);
  const int64_t n_out = outer * C * inner;
  Buffer<scalar_t> y(n_out, out_off);
  const scalar_t poison = static_cast<scalar_t>(-12345.0f);
  for (int64_t i = 0; i < n_out; ++i) y.data[i] = poison;

  // Same steps as gate_scatter_cuda / launch_scatter.
  std::vector<int> map(static_cast<size_t>(C), static_cast<int>(A));
  for (int64_t a = 0; a < A; ++a) scatter_map_entry(a, sel.data(), map.data(), C);
  const Path path = choose_path(inner, C, VEC, is_aligned_16(z.data), is_aligned_16(y.data));
  const Plan<index_t> p = make_plan<index_t>(path, outer, inner, C, VEC);
  ++path_count[0][static_cast<int>(path)];
  const auto iA = static_cast<index_t>(A);
  for (index_t q = 0; q < p.groups; ++q) {
    if (path == Path::kCol) {
      scatter_col_group<scalar_t, VEC, index_t>(q, z.data, map.data(), gate.data(), y.data, p, iA);
    } else if (path == Path::kRowVec) {
      scatter_row_group<scalar_t, VEC, index_t>(q, z.data, map.data(), gate.data(), y.data, p, iA);
    } else {
      scatter_row_group<scalar_t, 1, index_t>(q, z.data, map.data(), gate.data(), y.data, p, iA);
    }
  }

  // Expected: first position of each in-range channel wins.
  std::vector<int64_t> src(static_cast<size_t>(C), -1);
  for (int64_t a = 0; a < A; ++a) {
    if (sel[a] >= 0 && sel[a] < C && src[sel[a]] < 0) src[sel[a]] = a;
  }
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < inner; ++j) {
        const int64_t e = (o * C + c) * inner + j;
        const int64_t a = src[c];
        const scalar_t want = a >= 0 ? static_cast<scalar_t>(static_cast<float>(z.data[(o * A + a) * inner + j]) * gate[a])
                                     : scalar_t(0);
        if (!same_bytes(y.data[e], want)) fail("scatter", outer, inner, A, C, in_off, out_off, sizeof(index_t) == 4, e);
      }
    }
  }
  ++cases;
}

template <typename scalar_t, typename index_t>
void check_gather(int64_t outer, int64_t inner, int64_t C, const std::vector<int64_t>& sel, int in_off, int out_off) {
  constexpr int VEC = vec_size<scalar_t>();
  const int64_t A = static_cast<int64_t>(sel.size());
  Buffer<scalar_t> t(outer * C * inner, in_off);
  fill_random(t.data, outer * C * inner);
  std::vector<float> gate(static_cast<size_t>(A));
  for (auto& g : gate) g = std::uniform_real_distribution<float>(0.25f, 1.25f)(rng);
  const int64_t n_out = outer * A * inner;
  Buffer<scalar_t> out(n_out, out_off);
  const scalar_t poison = static_cast<scalar_t>(-12345.0f);
  for (int64_t i = 0; i < n_out; ++i) out.data[i] = poison;

  const Path path = choose_path(inner, A, VEC, is_aligned_16(t.data), is_aligned_16(out.data));
  const Plan<index_t> p = make_plan<index_t>(path, outer, inner, A, VEC);
  ++path_count[1][static_cast<int>(path)];
  for (index_t q = 0; q < p.groups; ++q) {
    if (path == Path::kCol) {
      gather_col_group<scalar_t, VEC, index_t>(q, t.data, sel.data(), gate.data(), out.data, p, C);
    } else if (path == Path::kRowVec) {
      gather_row_group<scalar_t, VEC, index_t>(q, t.data, sel.data(), gate.data(), out.data, p, C);
    } else {
      gather_row_group<scalar_t, 1, index_t>(q, t.data, sel.data(), gate.data(), out.data, p, C);
    }
  }

  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t a = 0; a < A; ++a) {
      for (int64_t j = 0; j < inner; ++j) {
        const int64_t e = (o * A + a) * inner + j;
        const int64_t c = sel[a];
        const scalar_t want = (c >= 0 && c < C)
                                  ? static_cast<scalar_t>(static_cast<float>(t.data[(o * C + c) * inner + j]) * gate[a])
                                  : scalar_t(0);
        if (!same_bytes(out.data[e], want)) fail("gather", outer, inner, A, C, in_off, out_off, sizeof(index_t) == 4, e);
      }
    }
  }
  ++cases;
}

std::vector<int64_t> random_sel(int64_t C, int64_t A, bool sorted) {
  std::vector<int64_t> all(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) all[c] = c;
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(A));
  if (sorted) std::sort(all.begin(), all.end());
  return all;
}

template <typename scalar_t, typename index_t>
void run_all() {
  const int64_t outers[] = {1, 3, 5};
  const int64_t inners[] = {1, 2, 3, 4, 8, 16, 24, 49, 64};
  const int64_t channel_counts[] = {1, 4, 7, 8, 16, 24, 33};
  for (int64_t outer : outers) {
    for (int64_t inner : inners) {
      for (int64_t C : channel_counts) {
        for (int64_t A : {int64_t{1}, C / 2, C - 1, C, int64_t{8}, int64_t{16}}) {
          if (A <= 0 || A > C) continue;
          for (int in_off = 0; in_off < 2; ++in_off) {
            for (int out_off = 0; out_off < 2; ++out_off) {
              const auto sel = random_sel(C, A, (A + in_off) % 2 == 0);
              check_scatter<scalar_t, index_t>(outer, inner, C, sel, in_off, out_off);
              check_gather<scalar_t, index_t>(outer, inner, C, sel, in_off, out_off);
            }
          }
        }
      }
    }
  }
  // Bad indices (the CUDA kernels do not check them): never out of bounds, documented results.
  for (int64_t inner : {int64_t{1}, int64_t{8}, int64_t{3}}) {
    const std::vector<int64_t> bad = {3, -1, 16, 3, 0, 1000000, 5, -7};  // out of range and a duplicate
    check_scatter<scalar_t, index_t>(2, inner, 16, bad, 0, 0);
    check_gather<scalar_t, index_t>(2, inner, 16, bad, 0, 0);
    check_gather<scalar_t, index_t>(2, inner, 16, {4, 4, 4, 2, 2, 9, 9, 9}, 0, 0);  // repeats
  }
}

}  // namespace

int main() {
  run_all<float, uint32_t>();
  run_all<float, int64_t>();
  run_all<c10::Half, uint32_t>();
  run_all<c10::Half, int64_t>();
  run_all<c10::BFloat16, uint32_t>();
  run_all<c10::BFloat16, int64_t>();
  // every path of both ops must have run
  for (const auto& op : path_count) {
    for (int64_t n : op) {
      if (n == 0) {
        printf("MISSING a path: scatter %lld %lld %lld, gather %lld %lld %lld\n", (long long)path_count[0][0],
               (long long)path_count[0][1], (long long)path_count[0][2], (long long)path_count[1][0],
               (long long)path_count[1][1], (long long)path_count[1][2]);
        return 1;
      }
    }
  }
  printf("ok %lld\n", (long long)cases);
  return 0;
}
