// The launchers of csrc/api.h for the CPU emulation (emu.h): the fp32 and fp64
// kernels of csrc/pair_kernels.cuh, instantiated exactly as kernels_f32.cu and
// kernels_f64.cu do. fp16/bf16 need tensor cores and are not emulated.
#include "pair_kernels.cuh"

RCKA_INSTANTIATE(float, f32)
RCKA_INSTANTIATE(double, f64)

namespace rcka {
#define RCKA_NOT_EMULATED(SUFFIX)                                                                              \
  void pair_forward_##SUFFIX(const PairArgs&, cudaStream_t) { throw std::runtime_error("not emulated"); }  \
  void pair_backward_##SUFFIX(const PairArgs&, cudaStream_t) { throw std::runtime_error("not emulated"); } \
  void cross_sq_##SUFFIX(const CrossArgs&, cudaStream_t) { throw std::runtime_error("not emulated"); }
RCKA_NOT_EMULATED(f16)
RCKA_NOT_EMULATED(bf16)
}  // namespace rcka
