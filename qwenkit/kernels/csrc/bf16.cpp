// Float linear kernels: the small-M GEMV over a bf16 weight (bf16 or fp32 activations) or an fp32 weight (fp32
// activations, exact fp32 FMA accumulation as in F.linear up to summation order).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common.h"

namespace qwenkit_cpu {
namespace {

// Accumulator sets per activation-row count MT = 1..8: U sets take alternate k steps, hiding the long
// vdpbf16ps latency when there are few independent rows. (Several weight rows at once were slower: the extra
// memory streams cost more than the reuse of x saves.)
constexpr int kAccB[8] = {4, 2, 2, 1, 1, 1, 1, 1};

// Weight row n times MT activation rows. x bf16: vdpbf16ps (exact bf16 products, fp32 sums); x fp32: weights
// widened to fp32 (or read as fp32 when WF32), fmadd. Unmasked loads except for the tail (masked loads that miss
// the cache are slow here).
template <bool XBF16, bool WF32, int MT, int U>
QK_NO_PRE inline void brow(const void* wrow, const void* x, int64_t K, float* res) {
  static_assert(!(XBF16 && WF32), "fp32 weights take fp32 activations");
  const uint16_t* wr = static_cast<const uint16_t*>(wrow);
  const float* wf = static_cast<const float*>(wrow);
  __m512 acc[U][MT];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_setzero_ps();
  constexpr int64_t step = XBF16 ? 32 : 16;
  for (int64_t k0 = 0; k0 < K; k0 += U * step) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * step;
      if (k >= K) break;
      const bool full = K - k >= step;
      if constexpr (XBF16) {
        const uint16_t* xb = static_cast<const uint16_t*>(x);
        const __mmask32 msk = full ? __mmask32(0xffffffffu) : __mmask32((1u << (K - k)) - 1);
        prefetch(wr + k);
        const __m512i wv = full ? _mm512_loadu_si512(wr + k) : _mm512_maskz_loadu_epi16(msk, wr + k);
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) {
          const __m512i xv = full ? _mm512_loadu_si512(xb + m * K + k) : _mm512_maskz_loadu_epi16(msk, xb + m * K + k);
          acc[u][m] = _mm512_dpbf16_ps(acc[u][m], (__m512bh)wv, (__m512bh)xv);
        }
      } else {
        const float* xf = static_cast<const float*>(x);
        const __mmask16 msk = tail16(K - k);
        __m512 wv;
        if constexpr (WF32) {
          prefetch(wf + k);  // 64 bytes per step
          wv = full ? _mm512_loadu_ps(wf + k) : _mm512_maskz_loadu_ps(msk, wf + k);
        } else {
          if (k % 32 == 0) prefetch(wr + k);
          const __m256i h = full ? _mm256_loadu_si256((const __m256i*)(wr + k)) : _mm256_maskz_loadu_epi16(msk, wr + k);
          wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) {
          const __m512 xv = full ? _mm512_loadu_ps(xf + m * K + k) : _mm512_maskz_loadu_ps(msk, xf + m * K + k);
          acc[u][m] = _mm512_fmadd_ps(wv, xv, acc[u][m]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    __m512 t = acc[0][m];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[u][m]);
    res[m] = _mm512_reduce_add_ps(t);
  }
}

struct BArgs {
  const void* w;  // [N, K] bf16 or fp32
  const void* x;  // [M, K] bf16 or fp32
  int64_t K, N;
  const void* bias;  // may be null
  FT bt;
  void* out;  // [M, N]
  FT outt;
};

template <bool XBF16, bool WF32, int MT>
QK_NO_PRE void brange(const BArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  const void* xm = static_cast<const char*>(a.x) + m0 * a.K * (XBF16 ? 2 : 4);
  const char* w = static_cast<const char*>(a.w);
  const int64_t row_bytes = a.K * (WF32 ? 4 : 2);
  float res[MT];
  for (int64_t n = n0; n < n1; ++n) {
    brow<XBF16, WF32, MT, kAccB[MT - 1]>(w + n * row_bytes, xm, a.K, res);
    const float b = a.bias ? ld1(a.bias, a.bt, n) : 0.f;
    for (int m = 0; m < MT; ++m) st1(a.out, a.outt, (m0 + m) * a.N + n, res[m] + b);
  }
}

template <bool XBF16, bool WF32>
void brange_m(const BArgs& a, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
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

}  // namespace

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const bool wf32 = weight.scalar_type() == at::kFloat;
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && (wf32 || weight.scalar_type() == at::kBFloat16),
              "weight must be contiguous 2-D bfloat16 or float32");
  TORCH_CHECK(!wf32 || x.scalar_type() == at::kFloat, "a float32 weight needs float32 x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight does not match K = ", K);
  BArgs a{weight.data_ptr(), x.data_ptr(), K, N, nullptr, FT::F32, nullptr, FT::F32};
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "bias must have N elements");
    a.bias = bias->data_ptr(), a.bt = ft_of(*bias, "bias");
  }
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr(), a.outt = ft_of(out, "out");
  const bool xbf = x.scalar_type() == at::kBFloat16;
  const int64_t tile = tile_rows(M, K * x.element_size());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
      const int64_t mt = std::min(tile, M - m0);
      if (xbf) brange_m<true, false>(a, m0, mt, n0, n1);
      else if (wf32) brange_m<false, true>(a, m0, mt, n0, n1);
      else brange_m<false, false>(a, m0, mt, n0, n1);
    }
  });
  return out;
}

}  // namespace qwenkit_cpu
