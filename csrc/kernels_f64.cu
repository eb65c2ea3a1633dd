// The cuda backend's kernels for double inputs (templates in pair_kernels.cuh).
#include "pair_kernels.cuh"

RCKA_INSTANTIATE(double, f64)
