// Float linear kernels: the small-M GEMV over a bf16 weight (bf16 or fp32 activations) or an fp32 weight (fp32
// activations, exact fp32 FMA accumulation as in F.linear up to summation order). Written once against simd.h.
#include <algorithm>
#include <chrono>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common.h"

namespace QK_NS {
namespace {

// Accumulator sets per activation-row count MT = 1..8: U sets take alternate k steps, hiding the FMA (or
// vdpbf16ps) latency when there are few independent rows. (Several weight rows at once were slower: the extra
// memory streams cost more than the reuse of x saves.)
constexpr int kAccB[8] = {4, 2, 2, 1, 1, 1, 1, 1};

// One vector step at k for MT activation rows (row stride xs). XBF16 (sets with a bf16 dot only): bf16 x times
// bf16 weight pairs; else fp32 x times the weight widened to fp32 (WF32: read as fp32).
template <bool XBF16, bool WF32, int MT>
QK_INLINE void bstep(const void* wrow, const void* x, int64_t xs, int64_t k, vf (&acc)[MT]) {
  constexpr int64_t wbytes = WF32 ? 4 : 2;
  if (k % (64 / wbytes) == 0) prefetch(static_cast<const char*>(wrow) + k * wbytes);  // once per cache line
  if constexpr (XBF16) {
    const uint16_t* w = static_cast<const uint16_t*>(wrow) + k;
    const uint16_t* xb = static_cast<const uint16_t*>(x) + k;
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = fdot_bf16(acc[m], w, xb + m * xs);
  } else {
    const vf wv = WF32 ? fload(static_cast<const float*>(wrow) + k) : fload_bf16(static_cast<const uint16_t*>(wrow) + k);
    const float* xf = static_cast<const float*>(x) + k;
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = ffma(wv, fload(xf + m * xs), acc[m]);
  }
}

// Weight row times MT activation rows -> res[MT]: U accumulator sets over the vector part of K, then a scalar
// tail (only for K that are not a multiple of the vector step; no Qwen shape has one).
template <bool XBF16, bool WF32, int MT, int U>
QK_NO_PRE inline void brow(const void* wrow, const void* x, int64_t xs, int64_t K, float* res) {
  static_assert(!(XBF16 && WF32), "fp32 weights take fp32 activations");
  static_assert(!XBF16 || kBf16Dot, "bf16 activations need a bf16 dot instruction");
  vf acc[U][MT];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[u][m] = fzero();
  constexpr int64_t step = XBF16 ? 2 * kL : kL;
  const int64_t Kv = K / step * step;
  int64_t k = 0;
  for (; k + U * step <= Kv; k += U * step) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) bstep<XBF16, WF32, MT>(wrow, x, xs, k + u * step, acc[u]);
  }
  for (; k < Kv; k += step) bstep<XBF16, WF32, MT>(wrow, x, xs, k, acc[0]);
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    vf t = acc[0][m];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) t = fadd(t, acc[u][m]);
    res[m] = freduce_add(t);
  }
  for (; k < K; ++k) {
    const float w = WF32 ? static_cast<const float*>(wrow)[k] : bf16_to_f32(static_cast<const uint16_t*>(wrow)[k]);
    for (int m = 0; m < MT; ++m)
      res[m] += w * (XBF16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[m * xs + k]) : static_cast<const float*>(x)[m * xs + k]);
  }
}

struct BArgs {
  const void* w;  // [N, K] bf16 or fp32
  const void* x;  // [M, xs] bf16 or fp32
  int64_t K, N, xs;
  const void* bias;  // may be null
  FT bt;
  void* out;  // [M, N]
  FT outt;
};

template <bool XBF16, bool WF32, int MT>
QK_NO_PRE void brange(const BArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  const void* xm = static_cast<const char*>(a.x) + m0 * a.xs * (XBF16 ? 2 : 4);
  const char* w = static_cast<const char*>(a.w);
  const int64_t row_bytes = a.K * (WF32 ? 4 : 2);
  float res[MT];
  for (int64_t n = n0; n < n1; ++n) {
    brow<XBF16, WF32, MT, kAccB[MT - 1]>(w + n * row_bytes, xm, a.xs, a.K, res);
    const float b = a.bias ? ld1(a.bias, a.bt, n) : 0.f;
    for (int m = 0; m < MT; ++m) st1(a.out, a.outt, (m0 + m) * a.N + n, res[m] + b);
  }
}

template <bool XBF16, bool WF32>
void brange_m(const BArgs& a, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  if constexpr (XBF16 && !kBf16Dot) {
    TORCH_CHECK(false, "internal: bf16 activations on a kernel set without a bf16 dot");
  } else {
    switch (mt) {
      case 1: return brange<XBF16, WF32, 1>(a, m0, n0, n1);
      case 2: return brange<XBF16, WF32, 2>(a, m0, n0, n1);
      case 3: return brange<XBF16, WF32, 3>(a, m0, n0, n1);
      case 4: return brange<XBF16, WF32, 4>(a, m0, n0, n1);
      case 5: return brange<XBF16, WF32, 5>(a, m0, n0, n1);
      case 6: return brange<XBF16, WF32, 6>(a, m0, n0, n1);
      case 7: return brange<XBF16, WF32, 7>(a, m0, n0, n1);
      default: return brange<XBF16, WF32, 8>(a, m0, n0, n1);
    }
  }
}

// Multiply-adds per nanosecond of one thread: {vdpbf16ps (0 on a set without it), fp32 FMA}, each the best of 7
// timings of 12 independent chains (enough to hide either instruction's latency). CPUs differ by 4x in the
// ratio (an AVX-512 BF16 core without AMX may run vdpbf16ps at half the MAC rate of its FMAs, or at twice it),
// and oneDNN's bf16 GEMM is bound by it there: cpu.py picks the prefill GEMM dtype from these figures.
constexpr int kChains = 12;
constexpr int64_t kProbeIters = 8192;

template <bool BF16>
QK_NO_PRE __attribute__((noinline)) float chains(float seed) {
  vf acc[kChains];
#pragma GCC unroll 12
  for (int c = 0; c < kChains; ++c) acc[c] = fset1(seed);
  const vf x = fset1(seed * 0.5f), y = fset1(seed * 0.25f);
  alignas(64) uint16_t pairs[2 * kL];
  std::fill(pairs, pairs + 2 * kL, uint16_t(0x3f80));  // bf16 1.0
  for (int64_t i = 0; i < kProbeIters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) {
      if constexpr (BF16) acc[c] = fdot_bf16(acc[c], pairs, pairs);
      else acc[c] = ffma(x, y, acc[c]);
      asm volatile("" : "+v"(acc[c]));  // keeps the chains interleaved (GCC would run them one at a time)
    }
  }
  vf t = acc[0];
#pragma GCC unroll 12
  for (int c = 1; c < kChains; ++c) t = fadd(t, acc[c]);
  return freduce_add(t);
}

template <bool BF16>
double best_ns() {
  volatile float seed = 1.0f, sink = 0.f;
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    sink = sink + chains<BF16>(seed);
    best = std::min(best, std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

std::vector<double> dot_rates() {
  const double macs = double(kProbeIters) * kChains * kL;
  double bf16_rate = 0.0;
  if constexpr (kBf16Dot) bf16_rate = 2 * macs / best_ns<true>();
  return {bf16_rate, macs / best_ns<false>()};
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     bool widen_x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const bool wf32 = weight.scalar_type() == at::kFloat;
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && (wf32 || weight.scalar_type() == at::kBFloat16),
              "weight must be contiguous 2-D bfloat16 or float32");
  TORCH_CHECK(!wf32 || x.scalar_type() == at::kFloat, "a float32 weight needs float32 x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight does not match K = ", K);
  BArgs a{weight.data_ptr(), x.data_ptr(), K, N, K, nullptr, FT::F32, nullptr, FT::F32};
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "bias must have N elements");
    a.bias = bias->data_ptr(), a.bt = ft_of(*bias, "bias");
  }
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr(), a.outt = ft_of(out, "out");
  bool xbf = x.scalar_type() == at::kBFloat16;
  std::vector<float> xf;
  // widen x to fp32 once (no bf16 dot; or asked: where vdpbf16ps has a lower multiply-add rate than the FMA,
  // see cpu.py); rows K + 16 apart (rows 4 KiB apart alias in L1)
  if (xbf && (!kBf16Dot || widen_x)) {
    a.xs = K + 16;
    widen_rows(x, a.xs, xf);
    a.x = xf.data(), xbf = false;
  }
  const int64_t tile = tile_rows(M, K * (xbf ? 2 : 4));
  for_tiles(M, tile, N, K * (wf32 ? 4 : 2), [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    if (xbf) brange_m<true, false>(a, m0, mt, n0, n1);
    else if (wf32) brange_m<false, true>(a, m0, mt, n0, n1);
    else brange_m<false, false>(a, m0, mt, n0, n1);
  });
  return out;
}

}  // namespace QK_NS
