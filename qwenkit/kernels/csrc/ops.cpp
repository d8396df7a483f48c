// Registers the qwenkit CPU kernels as torch.ops.qwenkit_cpu.* (built and loaded by qwenkit/kernels/cpu.py).
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(qwenkit_cpu, m) {
  m.def("gemv_quant(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int group_size, Tensor? bias, int bits)"
        " -> Tensor",
        &qwenkit_cpu::gemv_quant);
  m.def("gemv_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &qwenkit_cpu::gemv_bf16);
  m.def("dequant(Tensor qweight, Tensor scales, Tensor? offsets, int group_size, int bits, Tensor(a!) out) -> ()",
        &qwenkit_cpu::dequant);
}
