// Registers the qwenkit CPU kernels of one kernel set as torch.ops.<QK_NS>.* (qwenkit_avx512 or qwenkit_avx2;
// built and loaded by qwenkit/kernels/cpu.py).
#include <torch/library.h>

#include "common.h"

// TORCH_LIBRARY pastes its first argument as written; this indirection expands QK_NS first.
#define QK_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

QK_TORCH_LIBRARY(QK_NS, m) {
  m.def("gemv_quant(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int group_size, Tensor? bias, int bits)"
        " -> Tensor",
        &QK_NS::gemv_quant);
  m.def("gemm_quant(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int group_size, Tensor? bias, int bits)"
        " -> Tensor",
        &QK_NS::gemm_quant);
  m.def("gemm_dequant(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int group_size, Tensor? bias,"
        " int bits) -> Tensor",
        &QK_NS::gemm_dequant);
  m.def("gemv_bf16(Tensor x, Tensor weight, Tensor? bias, bool widen_x=False) -> Tensor", &QK_NS::gemv_bf16);
  m.def("gemm_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &QK_NS::gemm_bf16);
  m.def("dot_rates() -> float[]", &QK_NS::dot_rates);
  m.def("dequant(Tensor qweight, Tensor scales, Tensor? offsets, int group_size, int bits, Tensor(a!) out) -> ()",
        &QK_NS::dequant);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? k_scale, Tensor? v_scale, Tensor lengths, float scale)"
        " -> Tensor",
        &QK_NS::decode_attention);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &QK_NS::rms_norm);
  m.def("rotary_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_scale, Tensor rows, Tensor positions,"
        " Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? k_scale, Tensor(d!)? v_scale) -> Tensor",
        &QK_NS::rotary_kv);
}
