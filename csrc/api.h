// Host interface between the pybind11 module (module.cpp, a plain C++ file)
// and the per-dtype kernel files (kernels_*.cu). No libtorch: tensors arrive
// as raw device pointers with sizes and element strides.
#pragma once

#ifndef RCKA_HOST_EMULATION
#include <cuda_runtime.h>
#endif
#include <stdint.h>

namespace rcka {

// A (G, rows, depth) operand read row by row. Rows [0, rows_a) come from `a`,
// rows [rows_a, rows) from `b` (MMD reads Z = [X; Y] without concatenating):
//   element (g, r, k) = (r < rows_a ? a + g*gs_a + r*sr : b + g*gs_b + (r-rows_a)*sr)[k*sk]
// With sr = 1 and sk = ld the "rows" are the columns of a sample-major matrix
// (the feature-space products X^T Y of the linear statistics).
struct Matrix {
  const void* a = nullptr;
  const void* b = nullptr;
  int64_t rows_a = 0, rows = 0, depth = 0;
  int64_t gs_a = 0, gs_b = 0, sr = 0, sk = 0;
};

// Arguments of the sample-space pair kernels (one Gram per operand, walked in
// tiles of its upper triangle). Scalars live in the compute dtype ("acc":
// float, or double for fp64 inputs) unless stated.
struct PairArgs {
  int mode = 0;           // Mode in tile_math.cuh
  int64_t groups = 0;
  Matrix x, y;            // HSIC: the two operands (same rows); MMD: x = Z, y unused
  const void* gamma_x = nullptr;  // (G,) acc; MMD uses gamma_x
  const void* gamma_y = nullptr;
  // forward outputs. tiled: s (G, tri, 3) float64 partials, r0/r1 (G, tiles, n) acc partial row sums;
  // small: s (G, 3) float64 totals, r0/r1 (G, n) acc row sums. RBF sums leave the diagonal out.
  void* s = nullptr;
  void* r0 = nullptr;
  void* r1 = nullptr;
  // backward inputs: gS (G, 3) float64, row-sum cotangents (G, n) acc (HSIC)
  const double* gs = nullptr;
  const void* grx = nullptr;
  const void* gry = nullptr;
  // backward outputs, zero-initialised acc tensors with the geometry of x (and
  // y): HSIC dx, dy; MMD rows < rows_a go to dx, the rest to dy.
  void* dx = nullptr;
  void* dy = nullptr;
};

// Feature-space linear statistic: partial sums of |A^T B|_F^2 over tiles of
// A^T B, A = a (G, n, p), B = (G, n, q) given as Matrix views with sr = 1.
struct CrossArgs {
  int64_t groups = 0;
  Matrix a, b;
  int sym = 0;            // a is b: walk the upper triangle with weights 1 / 2
  void* s = nullptr;      // (G, tiles launched) float64 partials
};

// Launchers (one definition per dtype in kernels_<dtype>.cu). They throw
// std::runtime_error naming the kernel when a CUDA call fails.
#define RCKA_DECLARE_LAUNCHERS(SUFFIX)                              \
  void pair_forward_##SUFFIX(const PairArgs& args, cudaStream_t s); \
  void pair_backward_##SUFFIX(const PairArgs& args, cudaStream_t s); \
  void cross_sq_##SUFFIX(const CrossArgs& args, cudaStream_t s);

RCKA_DECLARE_LAUNCHERS(f32)
RCKA_DECLARE_LAUNCHERS(f16)
RCKA_DECLARE_LAUNCHERS(bf16)
RCKA_DECLARE_LAUNCHERS(f64)

#undef RCKA_DECLARE_LAUNCHERS

}  // namespace rcka
