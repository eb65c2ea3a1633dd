// The cuda backend's kernels for __nv_bfloat16 inputs (templates in pair_kernels.cuh).
#include "pair_kernels.cuh"

RCKA_INSTANTIATE(__nv_bfloat16, bf16)
