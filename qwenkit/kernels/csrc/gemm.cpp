// fp32 FMA GEMM over a bf16, int8 or packed int4 weight, for prefill where the CPU has no fast bf16 GEMM (AVX2;
// AVX-512 cores whose vdpbf16ps runs below the FMA's rate) and no faster int16 GEMM (quant.cpp): y = x @ W.T +
// bias with x widened to fp32 once, W converted to fp32 block by block while packed (bf16 -> fp32 is exact;
// int8/int4 dequantized as the `dequant` op does, q * scale + offset in one fp32 FMA), fp32 sums. The same
// products as F.linear on fp32 copies of both (the tiled path in cpu.py), up to summation order, without
// writing an fp32 copy of the weight.
//
// Layout (as the int16 GEMM in quant.cpp): a block is kGN = 2 vectors of output channels; its weight rows are
// packed into [k][kGN] fp32 (kL rows at a time, kL k at a time, transposed in registers), a K chunk at a time
// that stays in L2; a register tile of kGM rows x 2 vectors takes one broadcast of x per row and two weight
// vectors per k (avx512: 12 rows, 24 of 32 registers; avx2: 6 rows, 12 of 16). Rows of x go in panels of
// kRowPanel (their fp32 copy stays in cache while every block streams past it).
#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common.h"

namespace QK_NS {
namespace {

// (kGN channels per block, kGM rows per register tile: common.h)
// Packed weight bytes per K chunk (in L2: Zen 2/3 have 512 KiB) and rows of x per pass over the weight. Intel
// Xeon VM, M = 512, 6144x2048 and 2048x5504, avx2 set: panels of 512 rows 66.0 / 61.8 ms, 256 66.9 / 60.4, 128
// 69.5 / 63.5, 64 75.5 / 67.2; chunks of 64 KiB to 1 MiB within +-5% (avx512 too).
constexpr int64_t kChunkBytes = 1 << 17;
constexpr int64_t kRowPanel = 512;

struct FArgs {
  FloatWeight w;
  const float* x;  // [M, xs] fp32
  int64_t M, K, N, xs;
  const void* bias;  // may be null
  FT bt;
  void* out;  // [M, N]
  FT outt;
};

// Weight row n, k .. k + kL - 1 (k a multiple of kL; for int8/int4 within one group) as fp32.
template <int BITS>
QK_INLINE vf wload(const FloatWeight& w, int64_t n, int64_t k) {
  const auto* row = static_cast<const uint8_t*>(w.w) + n * w.row_bytes;
  if constexpr (BITS == 16) {
    return fload_bf16(reinterpret_cast<const uint16_t*>(row) + k);
  } else {
    const int64_t gi = n * w.G + k / w.group;
    const vf q = BITS == 8 ? fload_s8(row + k) : fload_u4(row + k / 2);
    return ffma(q, fset1(ld1(w.scales, w.st, gi)), fset1(w.offsets ? ld1(w.offsets, w.ot, gi) : 0.f));
  }
}

// Weight rows n0..n0+kGN-1 (rows past nb repeat the last: their outputs are not stored), k0..k0+kc-1 -> wp
// [kc][kGN] fp32. kL k of kL rows per step are widened and transposed; a k tail (K % kL, bf16 only: int8/int4
// have K % 32 == 0) element by element.
template <int BITS>
void pack(const FArgs& a, int64_t n0, int64_t nb, int64_t k0, int64_t kc, float* wp) {
  const int64_t kv = kc / kL * kL;
  for (int64_t k = 0; k < kv; k += kL) {
    for (int half = 0; half < 2; ++half) {
      vi r[kL];
#pragma GCC unroll 16
      for (int i = 0; i < kL; ++i) r[i] = (vi)wload<BITS>(a.w, n0 + std::min<int64_t>(kL * half + i, nb - 1), k0 + k);
      transpose_words(r);
#pragma GCC unroll 16
      for (int j = 0; j < kL; ++j) fstore(wp + (k + j) * kGN + kL * half, (vf)r[j]);
    }
  }
  if constexpr (BITS == 16) {
    for (int64_t k = kv; k < kc; ++k)
      for (int i = 0; i < kGN; ++i) {
        const auto* row = static_cast<const uint16_t*>(a.w.w) + (n0 + std::min<int64_t>(i, nb - 1)) * a.K;
        wp[k * kGN + i] = bf16_to_f32(row[k0 + k]);
      }
  }
}

// Rows m0..m0+MT-1 times the packed chunk (kc k from k0) -> acc [MT][kGN] (added to it unless first).
template <int MT>
QK_NO_PRE void ftile(const FArgs& a, const float* wp, int64_t m0, int64_t k0, int64_t kc, bool first, float* acc) {
  vf c[MT][2];
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) {
    c[m][0] = first ? fzero() : fload(acc + m * kGN);
    c[m][1] = first ? fzero() : fload(acc + m * kGN + kL);
  }
  const float* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = a.x + (m0 + m) * a.xs + k0;
  // unrolled: the loop's own instructions cost 66.0 -> 63.4 ms at 512 x 6144 x 2048 (avx2)
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k, wp += kGN) {
    const vf w0 = fload(wp), w1 = fload(wp + kL);
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) {
      const vf xv = fset1(xr[m][k]);
      c[m][0] = ffma(xv, w0, c[m][0]);
      c[m][1] = ffma(xv, w1, c[m][1]);
    }
  }
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) fstore(acc + m * kGN, c[m][0]), fstore(acc + m * kGN + kL, c[m][1]);
}

template <int... Ms>
void ftile_m(int64_t mt, const FArgs& a, const float* wp, int64_t m0, int64_t k0, int64_t kc, bool first, float* acc,
             std::integer_sequence<int, Ms...>) {
  ((mt == Ms + 1 ? (ftile<Ms + 1>(a, wp, m0, k0, kc, first, acc), true) : false) || ...);
}

// acc [rows][kGN] + bias -> out rows m0.., channels n0..n0+nb-1.
void fstore_rows(const FArgs& a, const float* acc, int64_t m0, int64_t rows, int64_t n0, int64_t nb, const float* bias) {
  const vf b0 = fload(bias), b1 = fload(bias + kL);
  for (int64_t m = 0; m < rows; ++m) {
    const vf r0 = fadd(fload(acc + m * kGN), b0), r1 = fadd(fload(acc + m * kGN + kL), b1);
    store_2v(a.out, a.outt, (m0 + m) * a.N + n0, nb, r0, r1);
  }
}

}  // namespace

at::Tensor gemm_f32(const at::Tensor& x, const FloatWeight& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.N;
  TORCH_CHECK(w.K == K, "weight does not match K = ", K);
  TORCH_CHECK(w.bits == 16 || K % 32 == 0, "internal: K % 32 != 0 for a quantized weight");
  FArgs a{w, nullptr, M, K, N, K + 16, nullptr, FT::F32, nullptr, FT::F32};
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "bias must have N elements");
    a.bias = bias->data_ptr(), a.bt = ft_of(*bias, "bias");
  }
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr(), a.outt = ft_of(out, "out");
  if (M == 0 || N == 0) return out;
  std::vector<float> xf;
  widen_rows(x, a.xs, xf);
  a.x = xf.data();
  const int64_t blocks = (N + kGN - 1) / kGN;
  const int64_t ck = std::max<int64_t>(32, std::min(K, kChunkBytes / (kGN * 4)) / 32 * 32);
  const auto pack_chunk = w.bits == 16 ? pack<16> : w.bits == 8 ? pack<8> : pack<4>;
  for (int64_t p0 = 0; p0 < M; p0 += kRowPanel) {
    const int64_t rows = std::min(kRowPanel, M - p0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> wp(ck * kGN);
      std::vector<float> acc(rows * kGN);
      alignas(64) float bv[kGN];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kGN, nb = std::min<int64_t>(kGN, N - n0);
        for (int64_t k0 = 0; k0 < K; k0 += ck) {
          const int64_t kc = std::min(ck, K - k0);
          pack_chunk(a, n0, nb, k0, kc, wp.data());
          for (int64_t m0 = 0; m0 < rows; m0 += kGM) {
            const int64_t mt = std::min<int64_t>(kGM, rows - m0);
            ftile_m(mt, a, wp.data(), p0 + m0, k0, kc, k0 == 0, acc.data() + m0 * kGN,
                    std::make_integer_sequence<int, kGM>{});
          }
        }
        for (int j = 0; j < kGN; ++j) bv[j] = a.bias && j < nb ? ld1(a.bias, a.bt, n0 + j) : 0.f;
        fstore_rows(a, acc.data(), p0, rows, n0, nb, bv);
      }
    });
  }
  return out;
}

at::Tensor gemm_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kBFloat16,
              "weight must be contiguous 2-D bfloat16");
  FloatWeight w{weight.data_ptr(), 16, weight.size(1) * 2, weight.size(1), weight.size(0)};
  return gemm_f32(x, w, bias);
}

}  // namespace QK_NS
