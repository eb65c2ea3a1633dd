// The launchers of csrc/api.h for the CPU emulation (emu.h): every kernel of
// csrc/pair_kernels.cuh, instantiated exactly as kernels_<dtype>.cu do.
#include "pair_kernels.cuh"

RCKA_INSTANTIATE(float, f32)
RCKA_INSTANTIATE(__half, f16)
RCKA_INSTANTIATE(__nv_bfloat16, bf16)
RCKA_INSTANTIATE(double, f64)
