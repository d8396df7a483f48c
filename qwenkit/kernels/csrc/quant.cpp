// Quantized (int8 / packed int4) linear kernels: the small-M GEMV and the fused dequantize used for prefill.
//
// Quantized GEMV: activations x [M, K] are quantized per row to int16 (scale = absmax / 32767, so the error is
// ~1e-5 relative, far below the weight's own), weights are widened to int16 in registers and multiplied with
// vpdpwssd (2 products per int32 lane). Int32 sums are converted to fp32 once per weight group ("flush"),
// scaled by the group's weight scale; offsets add sum_g offset[n, g] * sum_{k in g} xq[m, k] at the end:
//   y[m, n] = dx[m] * (sum_g s[n, g] * (q[n, g] . xq[m, g]) + sum_g o[n, g] * sum(xq[m, g])) + bias[n].
// Int4: a byte holds k = 2j (low nibble) and 2j + 1 (high nibble); for every 64 k the quantized x is stored as
// 32 even-k words then 32 odd-k words, so the two nibble vectors multiply x without any weight shuffles.
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common.h"

namespace qwenkit_cpu {
namespace {

// ---------------------------------------------------------------- activation quantization (per row, int16)

// k per weight chunk (32 bytes of a weight row): 32 for int8, 64 for int4.
constexpr int64_t chunk_k(bool int4) { return int4 ? 64 : 32; }

struct QuantX {
  // [M, stride] int16, 64-byte aligned; int4 layout: per 64 k, 32 even-k words then 32 odd-k words. The row
  // stride is K + 32 so that rows are not 4 KiB apart (with K = 2048 that aliasing cost 30% for M = 2).
  std::vector<int16_t> buf;
  int16_t* q = nullptr;
  int64_t stride = 0;
  std::vector<float> dx;    // [M] dequantization scale: x ~= dx * q
  std::vector<float> gsum;  // [M, Gp] sum of q over each weight group (exact integers), zero padded to Gp
  int64_t Gp = 0;
};

void quantize_x(const void* x, FT xt, int64_t M, int64_t K, int64_t g, bool int4, QuantX& out) {
  const int64_t G = K / g;
  out.Gp = (G + 15) / 16 * 16;
  out.stride = K + 32;
  out.buf.resize(M * out.stride + 32);
  out.q = out.buf.data() + (64 - reinterpret_cast<uintptr_t>(out.buf.data()) % 64) % 64 / 2;
  out.dx.resize(M);
  out.gsum.assign(M * out.Gp, 0.f);
  alignas(64) int16_t idx_even[32], idx_odd[32];
  for (int j = 0; j < 32; ++j) idx_even[j] = int16_t(2 * j), idx_odd[j] = int16_t(2 * j + 1);
  const __m512i ie = _mm512_load_si512(idx_even), io = _mm512_load_si512(idx_odd);
  const __m512i ones = _mm512_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;  // vmaxps drops NaNs; remember them so that the row's outputs become NaN
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = ld16(x, xt, m * K + k, 0xffff);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    const float a = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
    out.dx[m] = a / 32767.f;
    const __m512 inv = _mm512_set1_ps(a > 0.f && a <= std::numeric_limits<float>::max() ? 32767.f / a : 0.f);
    int16_t* qm = out.q + m * out.stride;
    __m512i gacc = _mm512_setzero_si512();
    __m512i prev = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 32) {
      const __m256i lo = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(ld16(x, xt, m * K + k, 0xffff), inv)));
      const __m256i hi =
          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(ld16(x, xt, m * K + k + 16, 0xffff), inv)));
      const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // 32 words, natural order
      gacc = _mm512_add_epi32(gacc, _mm512_madd_epi16(w, ones));
      if ((k + 32) % g == 0) {
        out.gsum[m * out.Gp + k / g] = float(_mm512_reduce_add_epi32(gacc));
        gacc = _mm512_setzero_si512();
      }
      if (!int4) {
        _mm512_storeu_si512(qm + k, w);
      } else if (k % 64 == 0) {
        prev = w;
      } else {  // words k-32..k+31 -> the even ks, then the odd ks
        _mm512_storeu_si512(qm + k - 32, _mm512_permutex2var_epi16(prev, ie, w));
        _mm512_storeu_si512(qm + k, _mm512_permutex2var_epi16(prev, io, w));
      }
    }
  }
}

// ---------------------------------------------------------------- quantized GEMV

struct QArgs {
  const uint8_t* w;
  int64_t K, N, row_bytes;  // row_bytes: K (int8) or K / 2 (int4)
  const void* scales;
  const void* offsets;  // may be null
  FT st, ot;
  int64_t G, F, nflush;  // groups per row; flush block (k per int32 -> fp32 conversion) and blocks per row
  int64_t gmul, gshift;  // scale index of flush block f: (f * gmul) >> gshift (no division in the loop)
  const QuantX* xq;
  const void* bias;  // may be null
  FT bt;
  void* out;  // [M, N]
  FT outt;
};

// One 32-byte chunk of a weight row (int8: 32 k; int4: 64 k) times MT activation rows, into int32 sums.
template <bool INT4, int MT>
QK_NO_PRE inline void qchunk(const uint8_t* wp, const int16_t* xp, int64_t xs, __m512i (&acc)[MT]) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  if constexpr (INT4) {
    const __m512i v = _mm512_cvtepu8_epi16(raw);
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(0x0f)), hi = _mm512_srli_epi16(v, 4);  // even, odd k
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      acc[m] = _mm512_dpwssd_epi32(acc[m], lo, _mm512_load_si512(xp + m * xs));
      acc[m] = _mm512_dpwssd_epi32(acc[m], hi, _mm512_load_si512(xp + m * xs + 32));
    }
  } else {
    const __m512i v = _mm512_cvtepi8_epi16(raw);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_dpwssd_epi32(acc[m], v, _mm512_load_si512(xp + m * xs));
  }
}

// Weight row n times MT activation rows m0..m0+MT-1. SPLIT: int4 with group 32, two groups per flush block
// of 64 k (lanes 0-7 hold k 0..31, lanes 8-15 k 32..63). sbuf: room for the row's G scales as fp32.
// (Two or four weight rows per step shared the x loads and ran faster from cache, but slower from memory:
// more streams. One row it is, as for bf16.)
template <bool INT4, bool SPLIT, int MT>
QK_NO_PRE inline void qrow(const QArgs& a, int64_t m0, int64_t n, float* sbuf) {
  const int64_t K = a.K, G = a.G;
  constexpr int64_t ck = chunk_k(INT4);
  const int64_t cpf = a.F / ck;  // chunks per flush block
  for (int64_t i = 0; i < G; i += 16) _mm512_storeu_ps(sbuf + i, ld16(a.scales, a.st, n * G + i, tail16(G - i)));
  const int64_t xs = a.xq->stride;
  const int16_t* xp = a.xq->q + m0 * xs;
  const uint8_t* wp = a.w + n * a.row_bytes;
  __m512 accf[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) accf[m] = _mm512_setzero_ps();
  for (int64_t f = 0; f < a.nflush; ++f) {
    // int8: a second int32 accumulator set for the odd chunks. With one set, the dependent vpdpwssd per row
    // set the pace (int8 per channel, M = 1, from L3: 47 -> 60-65 GB/s on 1 thread). int4 has a short block
    // (flush per group) and twice the registers in use; there a second (or fourth) set was slower.
    __m512i acc[MT], acc2[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = acc2[m] = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 2 <= cpf; i += 2, wp += 64, xp += 2 * ck) {  // one cache line of weights per step
      prefetch(wp);
      qchunk<INT4, MT>(wp, xp, xs, acc);
      qchunk<INT4, MT>(wp + 32, xp + ck, xs, INT4 ? acc : acc2);
    }
    if (i < cpf) {
      prefetch(wp);
      qchunk<INT4, MT>(wp, xp, xs, acc);
      wp += 32, xp += ck;
    }
    if constexpr (!INT4) {
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_add_epi32(acc[m], acc2[m]);
    }
    const int64_t gi = (f * a.gmul) >> a.gshift;
    __m512 sv = _mm512_set1_ps(sbuf[gi]);
    if constexpr (SPLIT) sv = _mm512_mask_blend_ps(0xff00, sv, _mm512_set1_ps(sbuf[gi + 1]));
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), sv, accf[m]);
  }
  if (a.offsets) {  // sum_g offset[n, g] * sum(q over group g)
    const float* gs = a.xq->gsum.data() + m0 * a.xq->Gp;
    for (int64_t gi = 0; gi < G; gi += 16) {
      const __m512 ov = ld16(a.offsets, a.ot, n * G + gi, tail16(G - gi));
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) accf[m] = _mm512_fmadd_ps(ov, _mm512_loadu_ps(gs + m * a.xq->Gp + gi), accf[m]);
    }
  }
  const float b = a.bias ? ld1(a.bias, a.bt, n) : 0.f;
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
    st1(a.out, a.outt, (m0 + m) * a.N + n, _mm512_reduce_add_ps(accf[m]) * a.xq->dx[m0 + m] + b);
}

template <bool INT4, bool SPLIT, int MT>
QK_NO_PRE void qrange(const QArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  std::vector<float> sbuf(a.G + 16);
  for (int64_t n = n0; n < n1; ++n) qrow<INT4, SPLIT, MT>(a, m0, n, sbuf.data());
}

template <bool INT4, bool SPLIT>
void qrange_m(const QArgs& a, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  switch (mt) {
    case 1: return qrange<INT4, SPLIT, 1>(a, m0, n0, n1);
    case 2: return qrange<INT4, SPLIT, 2>(a, m0, n0, n1);
    case 3: return qrange<INT4, SPLIT, 3>(a, m0, n0, n1);
    case 4: return qrange<INT4, SPLIT, 4>(a, m0, n0, n1);
    case 5: return qrange<INT4, SPLIT, 5>(a, m0, n0, n1);
    case 6: return qrange<INT4, SPLIT, 6>(a, m0, n0, n1);
    case 7: return qrange<INT4, SPLIT, 7>(a, m0, n0, n1);
    default: return qrange<INT4, SPLIT, 8>(a, m0, n0, n1);
  }
}

constexpr int64_t kMaxFlush = 4096;  // k per int32 accumulation; int8: 4096 / 16 * 128 * 32767 < 2^31

}  // namespace

at::Tensor gemv_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offsets, int64_t group_size,
                      const std::optional<at::Tensor>& bias, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  const bool int4 = bits == 4;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "qweight must be contiguous 2-D");
  TORCH_CHECK(qweight.scalar_type() == (int4 ? at::kByte : at::kChar), "qweight must be ", int4 ? "uint8" : "int8");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), ck = chunk_k(int4);
  TORCH_CHECK(qweight.size(1) * (int4 ? 2 : 1) == K, "qweight does not match K = ", K);
  TORCH_CHECK(K % ck == 0 && group_size % 32 == 0 && K % group_size == 0, "unsupported K / group size: ", K, " / ",
              group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G,
              "scales must be contiguous [N, K / group_size]");
  const bool split = group_size < ck;  // int4 with group 32
  int64_t F = std::max(group_size, ck);
  while (F > kMaxFlush && (F / 2) % ck == 0) F /= 2;
  TORCH_CHECK(F <= kMaxFlush && F % ck == 0, "group size ", group_size, " cannot be split into blocks of <= ", kMaxFlush);

  QArgs a{};
  a.w = static_cast<const uint8_t*>(qweight.data_ptr());
  a.K = K, a.N = N, a.row_bytes = qweight.size(1);
  a.scales = scales.data_ptr(), a.st = ft_of(scales, "scales");
  a.offsets = nullptr;
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->is_contiguous() && offsets->sizes() == scales.sizes(), "offsets must be shaped like scales");
    a.offsets = offsets->data_ptr(), a.ot = ft_of(*offsets, "offsets");
  }
  a.G = G, a.F = F, a.nflush = K / F;
  a.gmul = split ? 2 : 1;  // split: F = 64, group 32
  a.gshift = 0;
  while ((F << a.gshift) < group_size) ++a.gshift;  // group_size / F is a power of two
  a.bias = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "bias must have N elements");
    a.bias = bias->data_ptr(), a.bt = ft_of(*bias, "bias");
  }
  QuantX xq;
  quantize_x(x.data_ptr(), ft_of(x, "x"), M, K, group_size, int4, xq);
  a.xq = &xq;
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr(), a.outt = ft_of(out, "out");
  const int64_t tile = tile_rows(M, 2 * K);  // int16 x
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
      const int64_t mt = std::min(tile, M - m0);
      if (!int4) qrange_m<false, false>(a, m0, mt, n0, n1);
      else if (split) qrange_m<true, true>(a, m0, mt, n0, n1);
      else qrange_m<true, false>(a, m0, mt, n0, n1);
    }
  });
  return out;
}

// ---------------------------------------------------------------- dequantize (prefill)

namespace {

// 16 fp32 weights -> out (bf16 or fp32) at element offset i.
inline void store16(void* out, bool bf, int64_t i, __m512 v) {
  if (bf) _mm256_storeu_si256((__m256i*)(static_cast<uint16_t*>(out) + i), (__m256i)_mm512_cvtneps_pbh(v));
  else _mm512_storeu_ps(static_cast<float*>(out) + i, v);
}

}  // namespace

void dequant(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
             int64_t group_size, int64_t bits, at::Tensor& out) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  const bool int4 = bits == 4;
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "qweight must be contiguous 2-D");
  TORCH_CHECK(qweight.scalar_type() == (int4 ? at::kByte : at::kChar), "qweight must be ", int4 ? "uint8" : "int8");
  const int64_t N = qweight.size(0), K = qweight.size(1) * (int4 ? 2 : 1), rb = qweight.size(1);
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "unsupported K / group size: ", K, " / ", group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G,
              "scales must be contiguous [N, K / group_size]");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == N && out.size(1) == K &&
                  (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat),
              "out must be a contiguous [N, K] bfloat16 or float32 tensor");
  const FT st = ft_of(scales, "scales");
  const void* off = offsets.has_value() ? offsets->data_ptr() : nullptr;
  const FT ot = offsets.has_value() ? ft_of(*offsets, "offsets") : FT::F32;
  if (off) TORCH_CHECK(offsets->is_contiguous() && offsets->sizes() == scales.sizes(), "offsets must be shaped like scales");
  const bool bf = out.scalar_type() == at::kBFloat16;
  const auto* q = static_cast<const uint8_t*>(qweight.data_ptr());
  void* o = out.data_ptr();
  const void* s = scales.data_ptr();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m256i nib = _mm256_set1_epi16(0x0f), hinib = _mm256_set1_epi16(0xf0);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < K; k += 32) {  // 32 k share one group (group_size % 32 == 0)
        const int64_t gi = n * G + k / group_size;
        const __m512 sv = _mm512_set1_ps(ld1(s, st, gi));
        const __m512 ov = _mm512_set1_ps(off ? ld1(off, ot, gi) : 0.f);
        __m128i b0, b1;  // 32 weights as bytes in k order
        if (int4) {
          const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(q + n * rb + k / 2)));
          // word j = byte j -> low byte k = 2j (low nibble), high byte k = 2j + 1 (high nibble)
          const __m256i nat = _mm256_or_si256(_mm256_and_si256(v, nib), _mm256_slli_epi16(_mm256_and_si256(v, hinib), 4));
          b0 = _mm256_castsi256_si128(nat), b1 = _mm256_extracti128_si256(nat, 1);
        } else {
          b0 = _mm_loadu_si128((const __m128i*)(q + n * rb + k));
          b1 = _mm_loadu_si128((const __m128i*)(q + n * rb + k + 16));
        }
        const __m512 f0 = int4 ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b0)) : _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0));
        const __m512 f1 = int4 ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b1)) : _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1));
        store16(o, bf, n * K + k, _mm512_fmadd_ps(f0, sv, ov));
        store16(o, bf, n * K + k + 16, _mm512_fmadd_ps(f1, sv, ov));
      }
    }
  });
}

}  // namespace qwenkit_cpu
