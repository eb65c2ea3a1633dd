// The cuda backend's kernels for __half inputs (templates in pair_kernels.cuh).
#include "pair_kernels.cuh"

RCKA_INSTANTIATE(__half, f16)
