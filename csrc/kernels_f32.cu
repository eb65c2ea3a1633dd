// The cuda backend's kernels for float inputs (templates in pair_kernels.cuh).
#include "pair_kernels.cuh"

RCKA_INSTANTIATE(float, f32)
