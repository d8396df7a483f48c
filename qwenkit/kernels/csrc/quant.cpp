// Quantized (int8 / packed int4) linear kernels: the small-M GEMV and the fused dequantize used for prefill.
// Written once against simd.h (kL 32-bit lanes per vector), compiled once per kernel set.
//
// Quantized GEMV: activations x [M, K] are quantized per row to int16 (scale = absmax / 32767, so the error is
// ~1e-5 relative, far below the weight's own), weights are widened to int16 in registers and multiplied with
// idot16 (vpdpwssd, or vpmaddwd + vpaddd: 2 products per int32 lane). Int32 sums are converted to fp32 once
// per weight group ("flush"), scaled by the group's weight scale; offsets add sum_g offset[n, g] * sum_{k in g}
// xq[m, k] at the end:
//   y[m, n] = dx[m] * (sum_g s[n, g] * (q[n, g] . xq[m, g]) + sum_g o[n, g] * sum(xq[m, g])) + bias[n].
// A weight chunk is one vector load of 2 kL bytes (int8: 2 kL k; int4: 4 kL k). Int4: a byte holds k = 2j (low
// nibble) and 2j + 1 (high nibble); for every 4 kL k the quantized x is stored as 2 kL even-k words then 2 kL
// odd-k words, so the two nibble vectors multiply x without any weight shuffles.
#include <cmath>
#include <utility>
#include <limits>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common.h"

namespace QK_NS {
namespace {

// ---------------------------------------------------------------- activation quantization (per row, int16)

constexpr int64_t kChunkBytes = 2 * kL;  // weight bytes per vector load
constexpr int64_t chunk_k(bool int4) { return int4 ? 2 * kChunkBytes : kChunkBytes; }

struct QuantX {
  // [M, stride] int16, 64-byte aligned; int4 layout: per 4 kL k, 2 kL even-k words then 2 kL odd-k words. The
  // row stride is K + 32 so that rows are not 4 KiB apart (with K = 2048 that aliasing cost 30% for M = 2).
  std::vector<int16_t> buf;
  int16_t* q = nullptr;
  int64_t stride = 0;
  std::vector<float> dx;    // [M] dequantization scale: x ~= dx * q
  std::vector<float> gsum;  // [M, Gp] sum of q over each weight group (exact integers), zero padded to Gp
  int64_t Gp = 0;
};

// The order quantize_x stores each row's int16 words in (the weights' unpacking decides it):
// kPlain: k order. kGemvInt4: per 4 kL k, the 2 kL even ks then the 2 kL odd ks (quantized GEMV).
// kGemmInt8 / kGemmInt4: the int32 pairs of gemm_pair_k (int16 GEMM).
enum class XOrder { kPlain, kGemvInt4, kGemmInt8, kGemmInt4 };

// First k of the GEMM's int16 pair q (the second is this + the returned stride): the pairs the weight unpacking
// makes from one 32-bit word of weights with two 16-bit shifts and masks, no shuffles. int8: 4 k per word, pairs
// (0, 2), (1, 3); int4: 8 k per word (byte j: k = 2j low nibble, 2j + 1 high), pairs (0, 4), (1, 5), (2, 6), (3, 7).
inline int64_t gemm_pair_k(bool int4, int64_t q, int64_t& stride) {
  stride = int4 ? 4 : 2;
  return int4 ? 8 * (q / 4) + q % 4 : 4 * (q / 2) + q % 2;
}

void quantize_x(const void* x, FT xt, int64_t M, int64_t K, int64_t g, XOrder order, QuantX& out) {
  const int64_t G = K / g, ck = chunk_k(true), half = ck / 2;  // int4 layout blocks; K % chunk_k(int4) == 0
  out.Gp = (G + 15) / 16 * 16;
  out.stride = K + 32;
  out.buf.resize(M * out.stride + 32);
  out.q = out.buf.data() + (64 - reinterpret_cast<uintptr_t>(out.buf.data()) % 64) % 64 / 2;
  out.dx.resize(M);
  out.gsum.assign(M * out.Gp, 0.f);
  std::vector<float> xf(K);
  std::vector<int32_t> qi(K);
  for (int64_t m = 0; m < M; ++m) {
    load_f32(x, xt, m * K, K, xf.data());  // K is a multiple of kL (checked by the caller)
    vf amax = fzero();
    bool nan = false;  // vmaxps drops NaNs; remember them so that the row's outputs become NaN
    for (int64_t k = 0; k < K; k += kL) {
      const vf v = fload(xf.data() + k);
      nan |= fany_nan(v);
      amax = fmax_(amax, fabs_(v));
    }
    const float a = nan ? std::numeric_limits<float>::quiet_NaN() : freduce_max(amax);
    out.dx[m] = a / 32767.f;
    const vf inv = fset1(a > 0.f && a <= std::numeric_limits<float>::max() ? 32767.f / a : 0.f);
    for (int64_t k = 0; k < K; k += kL) istore(qi.data() + k, fround_i(fmul(fload(xf.data() + k), inv)));
    int16_t* qm = out.q + m * out.stride;
    float* gs = out.gsum.data() + m * out.Gp;
    for (int64_t k0 = 0; k0 < K; k0 += g) {
      int64_t s = 0;
      for (int64_t k = k0; k < k0 + g; ++k) {
        qi[k] = std::clamp<int32_t>(qi[k], -32768, 32767);  // saturate as vpmovsdw (NaN gave INT_MIN)
        s += qi[k];
      }
      gs[k0 / g] = float(s);
    }
    if (order == XOrder::kPlain) {
      for (int64_t k = 0; k < K; ++k) qm[k] = int16_t(qi[k]);
    } else if (order == XOrder::kGemvInt4) {  // per block of ck k: the even ks, then the odd ks
      for (int64_t k0 = 0; k0 < K; k0 += ck)
        for (int64_t j = 0; j < half; ++j) qm[k0 + j] = int16_t(qi[k0 + 2 * j]), qm[k0 + half + j] = int16_t(qi[k0 + 2 * j + 1]);
    } else {
      const bool w4 = order == XOrder::kGemmInt4;
      for (int64_t q = 0; q < K / 2; ++q) {
        int64_t st;
        const int64_t k = gemm_pair_k(w4, q, st);
        qm[2 * q] = int16_t(qi[k]), qm[2 * q + 1] = int16_t(qi[k + st]);
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

// One weight chunk (2 kL bytes: int8 2 kL k, int4 4 kL k) times MT activation rows, into int32 sums.
template <bool INT4, int MT>
QK_INLINE void qchunk(const uint8_t* wp, const int16_t* xp, int64_t xs, vi (&acc)[MT]) {
  if constexpr (INT4) {
    const vi v = iload_u8w(wp);
    const vi lo = iand(v, iset1_16(0x0f)), hi = isrli16(v, 4);  // even, odd k
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      acc[m] = idot16(acc[m], lo, iload(xp + m * xs));
      acc[m] = idot16(acc[m], hi, iload(xp + m * xs + 2 * kL));
    }
  } else {
    const vi v = iload_s8w(wp);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = idot16(acc[m], v, iload(xp + m * xs));
  }
}

// Weight row n times MT activation rows m0..m0+MT-1. SPLIT: int4 with a group of half a chunk (group 32 with
// kL = 16), two groups per flush block (lanes 0..kL/2-1 hold the first). sbuf: room for the row's G scales as
// fp32. (Two or four weight rows per step shared the x loads and ran faster from cache, but slower from
// memory: more streams. One row it is, as for bf16.)
template <bool INT4, bool SPLIT, int MT>
QK_NO_PRE inline void qrow(const QArgs& a, int64_t m0, int64_t n, float* sbuf) {
  const int64_t G = a.G;
  constexpr int64_t ck = chunk_k(INT4);
  constexpr int kPerLine = 64 / kChunkBytes;  // chunks per cache line of weights
  const int64_t cpf = a.F / ck;  // chunks per flush block
  load_f32(a.scales, a.st, n * G, G, sbuf);
  const int64_t xs = a.xq->stride;
  const int16_t* xp = a.xq->q + m0 * xs;
  const uint8_t* wp = a.w + n * a.row_bytes;
  vf accf[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) accf[m] = fzero();
  for (int64_t f = 0; f < a.nflush; ++f) {
    // int8: a second int32 accumulator set for the odd chunks. With one set, the dependent vpdpwssd per row
    // set the pace (AVX-512, int8 per channel, M = 1, from L3: 47 -> 60-65 GB/s on 1 thread). int4 has a short
    // block (flush per group) and twice the registers in use; there a second (or fourth) set was slower.
    vi acc[MT], acc2[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = acc2[m] = izero();
    int64_t i = 0;
    for (; i + kPerLine <= cpf; i += kPerLine, wp += 64, xp += kPerLine * ck) {  // one cache line per step
      prefetch(wp);
#pragma GCC unroll 4
      for (int c = 0; c < kPerLine; ++c) qchunk<INT4, MT>(wp + c * kChunkBytes, xp + c * ck, xs, (INT4 || c % 2 == 0) ? acc : acc2);
    }
    for (; i < cpf; ++i, wp += kChunkBytes, xp += ck) {
      prefetch(wp);
      qchunk<INT4, MT>(wp, xp, xs, acc);
    }
    if constexpr (!INT4) {
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[m] = iadd(acc[m], acc2[m]);
    }
    const int64_t gi = (f * a.gmul) >> a.gshift;
    vf sv = fset1(sbuf[gi]);
    if constexpr (SPLIT) sv = fblend_hi(sv, fset1(sbuf[gi + 1]));
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) accf[m] = ffma(icvt_f(acc[m]), sv, accf[m]);
  }
  if (a.offsets) {  // sum_g offset[n, g] * sum(q over group g); sbuf now holds the offsets
    load_f32(a.offsets, a.ot, n * G, G, sbuf);
    const float* gs = a.xq->gsum.data() + m0 * a.xq->Gp;
    int64_t gi = 0;
    for (; gi + kL <= G; gi += kL) {
      const vf ov = fload(sbuf + gi);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) accf[m] = ffma(ov, fload(gs + m * a.xq->Gp + gi), accf[m]);
    }
    float tail[MT] = {};
    for (; gi < G; ++gi)
      for (int m = 0; m < MT; ++m) tail[m] += sbuf[gi] * gs[m * a.xq->Gp + gi];
    for (int m = 0; m < MT; ++m) sbuf[G + m] = tail[m];
  }
  const float b = a.bias ? ld1(a.bias, a.bt, n) : 0.f;
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    const float t = a.offsets ? sbuf[G + m] : 0.f;
    st1(a.out, a.outt, (m0 + m) * a.N + n, (freduce_add(accf[m]) + t) * a.xq->dx[m0 + m] + b);
  }
}

template <bool INT4, bool SPLIT, int MT>
QK_NO_PRE void qrange(const QArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  std::vector<float> sbuf(a.G + kMaxTile + 16);
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

// k per int32 accumulation. int8, kL = 8: 4096 / 8 products per lane * 128 * 32767 = 2147418112 < 2^31 - 1.
constexpr int64_t kMaxFlush = 4096;

// The checks both quantized linear ops make; fills a's weight, scale, offset and bias fields.
void quant_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const std::optional<at::Tensor>& offsets, int64_t group_size, const std::optional<at::Tensor>& bias,
                int64_t bits, QArgs& a) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  const bool int4 = bits == 4;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "qweight must be contiguous 2-D");
  TORCH_CHECK(qweight.scalar_type() == (int4 ? at::kByte : at::kChar), "qweight must be ", int4 ? "uint8" : "int8");
  const int64_t K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * (int4 ? 2 : 1) == K, "qweight does not match K = ", K);
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "unsupported K / group size: ", K, " / ", group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G,
              "scales must be contiguous [N, K / group_size]");
  a.w = static_cast<const uint8_t*>(qweight.data_ptr());
  a.K = K, a.N = N, a.row_bytes = qweight.size(1), a.G = G;
  a.scales = scales.data_ptr(), a.st = ft_of(scales, "scales");
  a.offsets = nullptr;
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->is_contiguous() && offsets->sizes() == scales.sizes(), "offsets must be shaped like scales");
    a.offsets = offsets->data_ptr(), a.ot = ft_of(*offsets, "offsets");
  }
  a.bias = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "bias must have N elements");
    a.bias = bias->data_ptr(), a.bt = ft_of(*bias, "bias");
  }
}

}  // namespace

at::Tensor gemv_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offsets, int64_t group_size,
                      const std::optional<at::Tensor>& bias, int64_t bits) {
  QArgs a{};
  quant_args(x, qweight, scales, offsets, group_size, bias, bits, a);
  const bool int4 = bits == 4;
  const int64_t M = x.size(0), K = a.K, N = a.N, ck = chunk_k(int4);
  TORCH_CHECK(K % ck == 0, "unsupported K / group size: ", K, " / ", group_size);
  const bool split = group_size < ck;  // int4 with group 32 on 16-lane vectors
  TORCH_CHECK(!split || 2 * group_size == ck, "group size ", group_size, " is below half a weight chunk");
  int64_t F = std::max(group_size, ck);
  while (F > kMaxFlush && (F / 2) % ck == 0) F /= 2;
  TORCH_CHECK(F <= kMaxFlush && F % ck == 0, "group size ", group_size, " cannot be split into blocks of <= ", kMaxFlush);
  a.F = F, a.nflush = K / F;
  a.gmul = split ? 2 : 1;  // split: F = ck, two groups
  a.gshift = 0;
  while ((F << a.gshift) < group_size) ++a.gshift;  // group_size / F is a power of two
  QuantX xq;
  quantize_x(x.data_ptr(), ft_of(x, "x"), M, K, group_size, int4 ? XOrder::kGemvInt4 : XOrder::kPlain, xq);
  a.xq = &xq;
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr(), a.outt = ft_of(out, "out");
  const int64_t tile = tile_rows(M, 2 * K);  // int16 x
  for_tiles(M, tile, N, a.row_bytes, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    if (!int4) qrange_m<false, false>(a, m0, mt, n0, n1);
    else if (split) qrange_m<true, true>(a, m0, mt, n0, n1);
    else qrange_m<true, false>(a, m0, mt, n0, n1);
  });
  return out;
}

// ---------------------------------------------------------------- int16 x int8/int4 GEMM (prefill)
//
// Many rows of x (prefill, and batched decode from QUANT_GEMM_MIN_ROWS rows, see cpu.py): x quantized
// per row to int16 as for the GEMV, the weight unpacked block by block of kGN = 2 vectors of output channels into
// int16 pairs laid out so that one vector holds one k pair of kL channels (for decode-sized M one K chunk at a
// time, see gemm_quant), and idot16 (vpdpwssd, or vpmaddwd + vpaddd)
// sums pairs of products into int32 lanes = output channels. A register tile of kGM rows x 2 vectors takes one
// broadcast of an x pair per row and two weight vectors per k pair (avx512: 12 rows, 24 of the 32 registers;
// avx2: 6 rows, 12 of 16); int32 sums are flushed per group (or every <= 256 k of a longer one) into fp32 sums,
// times the group's scales (one vector of channels).
// (kGN, kGM: common.h)

struct GemmBlock {
  std::vector<int32_t> w;   // [chunk k / 2][kGN] int16 pairs of gemm_pair_k, one K chunk
  std::vector<float> s, o;  // [G][kGN] scales, offsets (0 past the last channel)
  std::vector<float> acc;   // [M][kGN] fp32 sums of the chunks so far
  std::vector<float> tmp;   // one row of scales
  float bias[kGN];
  const uint8_t* row[kGN];  // the block's weight rows (rows past nb repeat row nb - 1: their scales are 0)
};

// Scales, offsets, bias and row pointers of channels n0..n0+nb-1.
void block_setup(const QArgs& a, int64_t n0, int64_t nb, int64_t M, GemmBlock& blk) {
  const int64_t G = a.G;
  blk.s.assign(G * kGN, 0.f);
  blk.o.assign(G * kGN, 0.f);
  blk.acc.assign(M * kGN, 0.f);
  for (int i = 0; i < kGN; ++i) blk.row[i] = a.w + (n0 + std::min<int64_t>(i, nb - 1)) * a.row_bytes;
  for (int64_t j = 0; j < kGN; ++j) blk.bias[j] = a.bias && j < nb ? ld1(a.bias, a.bt, n0 + j) : 0.f;
  blk.tmp.resize(G + kL);
  for (int64_t j = 0; j < nb; ++j) {  // (a row of G as fp32, then strided stores: no per-element dtype switch)
    load_f32(a.scales, a.st, (n0 + j) * G, G, blk.tmp.data());
    for (int64_t g = 0; g < G; ++g) blk.s[g * kGN + j] = blk.tmp[g];
    if (a.offsets) {
      load_f32(a.offsets, a.ot, (n0 + j) * G, G, blk.tmp.data());
      for (int64_t g = 0; g < G; ++g) blk.o[g * kGN + j] = blk.tmp[g];
    }
  }
}

// Weight bytes [b0, b1) of each of the block's rows (a multiple of 4) into blk.w as int16 pairs: kL rows at a
// time are read 4 kL bytes per row and transposed, so that each vector holds one 32-bit word (int4: 8 k, int8:
// 4 k) of kL channels; two 16-bit shifts and masks per vector then give the pairs of gemm_pair_k. For
// decode-sized M the chunk is small enough to stay in L1 for the tiles that read it (packing the whole K into a
// 128 KiB buffer, or unpacking with vpgatherdd, made the pack as slow as the vpdpwssd work of 12 rows).
void pack_chunk(bool int4, int64_t b0, int64_t b1, GemmBlock& blk) {
  const vi nib = iset1_16(0x0f);
  for (int64_t off = b0; off < b1; off += 4 * kL) {
    const int words = int(std::min<int64_t>(kL, (b1 - off) / 4));
    for (int half = 0; half < 2; ++half) {
      int32_t* d = blk.w.data() + kL * half;
      vi r[kL];
#pragma GCC unroll 16
      for (int i = 0; i < kL; ++i) r[i] = iload_words(blk.row[kL * half + i] + off, words);
      transpose_words(r);
      for (int j = 0; j < words; ++j) {
        if (int4) {  // word = 4 bytes = 4 pairs: (k0, k4) (k1, k5) (k2, k6) (k3, k7)
          int32_t* o = d + (off - b0 + 4 * j) * kGN;
          istore(o, iand(r[j], nib));
          istore(o + kGN, iand(isrli16(r[j], 4), nib));
          istore(o + 2 * kGN, iand(isrli16(r[j], 8), nib));
          istore(o + 3 * kGN, isrli16(r[j], 12));
        } else {  // word = 4 int8 = 2 pairs: (k0, k2) (k1, k3), sign-extended
          int32_t* o = d + (off - b0 + 4 * j) / 2 * kGN;
          istore(o, israi16(islli16(r[j], 8), 8));
          istore(o + kGN, israi16(r[j], 8));
        }
      }
    }
  }
}

// Rows m0..m0+MT-1 times the packed chunk (k pairs kp0..kp0+np-1, whole flush blocks of fk k) into blk.acc.
// Int32 sums are flushed every fk k (the group, or a part of a longer one: `gemm_flush_k`), times the scales of
// the group they lie in.
template <int MT>
QK_NO_PRE void gemm_tile(const QArgs& a, GemmBlock& blk, int64_t m0, int64_t kp0, int64_t np, int64_t g, int64_t fk) {
  const QuantX& xq = *a.xq;
  const int64_t xs = xq.stride, fp = fk / 2;  // k pairs per flush
  vf cf[MT][2];
  float* accp = blk.acc.data() + m0 * kGN;
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) cf[m][0] = fload(accp + m * kGN), cf[m][1] = fload(accp + m * kGN + kL);
  const int32_t* xrow[MT];
  for (int m = 0; m < MT; ++m) xrow[m] = reinterpret_cast<const int32_t*>(xq.q + (m0 + m) * xs) + kp0;
  const int32_t* wp = blk.w.data();
  for (int64_t f = 0; f < np / fp; ++f) {
    const int64_t gi = (kp0 + f * fp) * 2 / g;
    vi acc[MT][2];
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = izero();
    for (int64_t kp = f * fp; kp < (f + 1) * fp; ++kp, wp += kGN) {
      const vi w0 = iload(reinterpret_cast<const int16_t*>(wp)), w1 = iload(reinterpret_cast<const int16_t*>(wp + kL));
#pragma GCC unroll 12
      for (int m = 0; m < MT; ++m) {
        const vi xv = iset1_32(xrow[m][kp]);
        acc[m][0] = idot16(acc[m][0], xv, w0);
        acc[m][1] = idot16(acc[m][1], xv, w1);
      }
    }
    const vf s0 = fload(blk.s.data() + gi * kGN), s1 = fload(blk.s.data() + gi * kGN + kL);
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) {
      cf[m][0] = ffma(icvt_f(acc[m][0]), s0, cf[m][0]);
      cf[m][1] = ffma(icvt_f(acc[m][1]), s1, cf[m][1]);
    }
  }
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) fstore(accp + m * kGN, cf[m][0]), fstore(accp + m * kGN + kL, cf[m][1]);
}

template <int... Ms>
void gemm_tile_m(int64_t mt, const QArgs& a, GemmBlock& blk, int64_t m0, int64_t kp0, int64_t np, int64_t g,
                 int64_t fk, std::integer_sequence<int, Ms...>) {
  ((mt == Ms + 1 ? (gemm_tile<Ms + 1>(a, blk, m0, kp0, np, g, fk), true) : false) || ...);
}

// The block's sums (blk.acc) + offsets and bias, times each row's dx -> out (channels n0..n0+nb-1).
void gemm_store(const QArgs& a, const GemmBlock& blk, int64_t M, int64_t n0, int64_t nb) {
  const QuantX& xq = *a.xq;
  const vf b0 = fload(blk.bias), b1 = fload(blk.bias + kL);
  for (int64_t m = 0; m < M; ++m) {
    vf c0 = fload(blk.acc.data() + m * kGN), c1 = fload(blk.acc.data() + m * kGN + kL);
    if (a.offsets) {  // + sum_g offset[n, g] * sum(xq over group g)
      for (int64_t gi = 0; gi < a.G; ++gi) {
        const vf gs = fset1(xq.gsum[m * xq.Gp + gi]);
        c0 = ffma(fload(blk.o.data() + gi * kGN), gs, c0);
        c1 = ffma(fload(blk.o.data() + gi * kGN + kL), gs, c1);
      }
    }
    const vf dx = fset1(xq.dx[m]);
    const vf r0 = ffma(c0, dx, b0), r1 = ffma(c1, dx, b1);
    store_2v(a.out, a.outt, m * a.N + n0, nb, r0, r1);
  }
}

// k per int32 flush: the group, halved while above kGemmMaxFlush and still a whole number of k pairs
// (int32 lanes sum fk products of at most 128 * 32767: fk <= 256 cannot overflow).
constexpr int64_t kGemmMaxFlush = 256;
constexpr int64_t kGemmChunkMaxRows = 32;  // rows of x up to which the GEMM works through K in chunks
inline int64_t gemm_flush_k(int64_t g) {
  int64_t fk = g;
  while (fk > kGemmMaxFlush && fk % 4 == 0) fk /= 2;
  return fk;
}

// ---------------------------------------------------------------- the fp32 GEMM over a quantized weight

// Prefill where neither a fast bf16 GEMM nor the int16 GEMM applies (AMD Zen 2/3: no AVX-VNNI; fp32 x): the
// fp32 GEMM of gemm.cpp, which dequantizes the weight block by block while packing it.
at::Tensor gemm_dequant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, int64_t group_size,
                        const std::optional<at::Tensor>& bias, int64_t bits) {
  QArgs a{};
  quant_args(x, qweight, scales, offsets, group_size, bias, bits, a);
  FloatWeight w{a.w, int(bits), a.row_bytes, a.K, a.N, a.scales, a.offsets, a.st, a.ot, a.G, group_size};
  return gemm_f32(x, w, bias);
}

// ---------------------------------------------------------------- dequantize (prefill)

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
    alignas(32) uint8_t nat[32];  // int4: 32 weights as bytes in k order
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < K; k += 32) {  // 32 k share one group (group_size % 32 == 0)
        const int64_t gi = n * G + k / group_size;
        const vf sv = fset1(ld1(s, st, gi));
        const vf ov = fset1(off ? ld1(off, ot, gi) : 0.f);
        const uint8_t* b = q + n * rb + k;
        if (int4) {
          const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(q + n * rb + k / 2)));
          // word j = byte j -> low byte k = 2j (low nibble), high byte k = 2j + 1 (high nibble)
          _mm256_store_si256((__m256i*)nat, _mm256_or_si256(_mm256_and_si256(v, nib), _mm256_slli_epi16(_mm256_and_si256(v, hinib), 4)));
          b = nat;
        }
#pragma GCC unroll 4
        for (int j = 0; j < 32; j += kL) {
          const vf w = ffma(int4 ? fload_u8(b + j) : fload_s8(b + j), sv, ov);
          if (bf) fstore_bf16(static_cast<uint16_t*>(o) + n * K + k + j, w);
          else fstore(static_cast<float*>(o) + n * K + k + j, w);
        }
      }
    }
  });
}

at::Tensor gemm_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offsets, int64_t group_size,
                      const std::optional<at::Tensor>& bias, int64_t bits) {
  QArgs a{};
  quant_args(x, qweight, scales, offsets, group_size, bias, bits, a);
  const bool int4 = bits == 4;
  const int64_t M = x.size(0), K = a.K, N = a.N;
  TORCH_CHECK(K % 64 == 0 && gemm_flush_k(group_size) <= kGemmMaxFlush, "unsupported K / group size for the GEMM: ", K,
              " / ", group_size);
  const int64_t fk = gemm_flush_k(group_size);
  QuantX xq;
  quantize_x(x.data_ptr(), ft_of(x, "x"), M, K, group_size, int4 ? XOrder::kGemmInt4 : XOrder::kGemmInt8, xq);
  a.xq = &xq;
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr(), a.outt = ft_of(out, "out");
  const int64_t blocks = (N + kGN - 1) / kGN;
  // Decode-sized M: K chunks of whole flush blocks and whole 32-bit weight words (8 k), about 128 k: 8 KiB of
  // pairs (at most 32 KiB, for flushes of 172-256 k), packed and used while in L1. Prefill: the whole K at once, so that each register tile
  // streams its rows of x from start to end (chunks of 128 k made M = 512 1.3-1.45x slower: x is ~2 MiB).
  const int64_t unit = std::lcm(fk, int64_t(8));
  const int64_t ck = M > kGemmChunkMaxRows ? K : unit * std::max<int64_t>(1, 128 / unit);  // divides K
  const int64_t bpp = int4 ? 1 : 2, nchunks = (K + ck - 1) / ck;  // row bytes per k pair
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    GemmBlock blk;
    blk.w.resize(ck / 2 * kGN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kGN, nb = std::min<int64_t>(kGN, N - n0);
      block_setup(a, n0, nb, M, blk);
      // The next block's rows (contiguous bytes) into L2, a slice per chunk: the chunk reads one line of each
      // of kGN rows, which the hardware prefetcher does not follow (those loads were ~80% of the pack's time).
      // (Not with one chunk, prefill: the pack is a small part of the time there; not measured with it.)
      const int64_t next_bytes = b + 1 < blocks && nchunks > 1 ? std::min<int64_t>(kGN, N - n0 - kGN) * a.row_bytes : 0;
      const uint8_t* next = next_bytes ? a.w + (n0 + kGN) * a.row_bytes : nullptr;
      const int64_t slice = (next_bytes + nchunks - 1) / nchunks;
      for (int64_t k0 = 0, c = 0; k0 < K; k0 += ck, ++c) {
        const int64_t kc = std::min(ck, K - k0);  // a whole number of flush blocks (fk divides K)
        for (int64_t l = c * slice; l < std::min((c + 1) * slice, next_bytes); l += 64)
          _mm_prefetch(reinterpret_cast<const char*>(next + l), _MM_HINT_T1);
        pack_chunk(int4, k0 / 2 * bpp, (k0 + kc) / 2 * bpp, blk);
        for (int64_t m0 = 0; m0 < M; m0 += kGM) {
          const int64_t mt = std::min<int64_t>(kGM, M - m0);
          gemm_tile_m(mt, a, blk, m0, k0 / 2, kc / 2, group_size, fk, std::make_integer_sequence<int, kGM>{});
        }
      }
      gemm_store(a, blk, M, n0, nb);
    }
  });
  return out;
}

}  // namespace QK_NS
