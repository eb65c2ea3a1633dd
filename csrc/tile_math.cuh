// Tile arithmetic shared by the CUDA kernels and the host: tile counts and
// offsets, the upper-triangle enumeration of symmetric Gram tiles, the weights
// that combine per-tile partial sums, the per-element kernel value, the
// gradient weights of the backward passes, and the shared-memory layout.
//
// Everything here is plain arithmetic on scalars so that it compiles for the
// device (nvcc) and for the host (g++, tests/build/cuda_host/), where it is checked
// against the float64 reference.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RCKA_HD __host__ __device__ __forceinline__
#else
#define RCKA_HD inline
#endif

namespace rcka {

// Threads per block of every kernel, and the largest group (rows of one Gram)
// handled by the small-group path, where one block owns a whole group.
constexpr int kThreads = 128;
constexpr int kSmallRows = 128;
// Feature chunk of the backward's second product (one warp spans it).
constexpr int kGradChunk = 32;

// Statistic modes of the pair kernels.
enum Mode : int { kHsicRbf = 0, kHsicLinear = 1, kMmdRbf = 2 };

// dtype codes shared with Python (rcka_kernels/ops/cuda_backend.py).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

RCKA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

RCKA_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Square tile edge (rows = cols) per dtype: 64 for fp32/fp16/bf16, 32 for fp64
// (double accumulators and double shared memory tiles).
RCKA_HD int tile_edge(int dtype) { return dtype == kF64 ? 32 : 64; }

RCKA_HD int64_t num_tiles(int64_t rows, int64_t edge) { return ceil_div(rows, edge); }

// Tiles (ti <= tj) of the upper triangle of a T x T tile grid.
RCKA_HD int64_t num_tri_tiles(int64_t t) { return t * (t + 1) / 2; }

// Linear index of the first tile of tile-row ti in the upper triangle,
// enumerated row by row: (0,0) (0,1) .. (0,T-1) (1,1) .. (T-1,T-1).
RCKA_HD int64_t tri_row_start(int64_t ti, int64_t t) { return ti * t - ti * (ti - 1) / 2; }

// Inverse of the enumeration above: the tile (ti, tj), ti <= tj, of linear index idx.
// Closed form (root of ti^2 - (2T+1) ti + 2 idx = 0) in single precision (a
// hardware square root: no call, no register spills), then an exact integer fix-up.
RCKA_HD void tri_tile(int64_t idx, int64_t t, int64_t* ti, int64_t* tj) {
  const float b = 2.0f * (float)t + 1.0f;
  const float disc = b * b - 8.0f * (float)idx;
  int64_t r = (int64_t)((b - sqrtf(disc > 0.0f ? disc : 0.0f)) * 0.5f);
  if (r < 0) r = 0;
  if (r > t - 1) r = t - 1;
  while (r > 0 && tri_row_start(r, t) > idx) --r;
  while (r + 1 < t && tri_row_start(r + 1, t) <= idx) ++r;
  *ti = r;
  *tj = r + (idx - tri_row_start(r, t));
}

// A symmetric Gram is walked over its upper triangle of tiles only: an
// off-diagonal tile stands for itself and its mirror image.
RCKA_HD int tile_weight(int64_t ti, int64_t tj) { return ti == tj ? 1 : 2; }

// Slot of the row-sum workspace (G, T, n) that tile (ti, tj) writes for its
// rows (row pass, slot tj) and, when off-diagonal, for its columns (slot ti):
// every (slot, row) pair is written by exactly one tile.
RCKA_HD int64_t rowsum_slot(int64_t ti, int64_t tj, bool columns) { return columns ? ti : tj; }

// Tile plan of a Gram with `rows` rows: edge, tiles per side, tiles launched
// per group (upper triangle), and whether one block owns the whole group.
struct Plan {
  int edge;
  int64_t tiles;
  int64_t tri;
  int small;
};

RCKA_HD Plan plan_gram_edge(int edge, int64_t rows) {
  Plan p;
  p.edge = edge;
  p.tiles = num_tiles(rows, p.edge);
  p.tri = num_tri_tiles(p.tiles);
  p.small = rows <= kSmallRows ? 1 : 0;
  return p;
}

RCKA_HD Plan plan_gram(int dtype, int64_t rows) { return plan_gram_edge(tile_edge(dtype), rows); }

// Squared distance from squared norms and the inner product, clamped at 0
// (rounding can make it slightly negative for near-identical rows).
template <typename A>
RCKA_HD A sq_dist(A norm_i, A norm_j, A dot) {
  const A d = norm_i + norm_j - A(2) * dot;
  return d > A(0) ? d : A(0);
}

RCKA_HD float rcka_exp(float v) { return expf(v); }
RCKA_HD double rcka_exp(double v) { return exp(v); }

// k(a, b) = exp(-gamma |a - b|^2) as it enters the sums of the backend
// contract: a row against itself is left out (0; the caller adds the exact
// k(a, a) = 1 back), which also makes its gradient weight 0.
template <typename A>
RCKA_HD A rbf_value(A norm_i, A norm_j, A dot, A gamma, bool same_row) {
  return same_row ? A(0) : rcka_exp(-gamma * sq_dist(norm_i, norm_j, dot));
}

// Symmetrised weights M = (G + G^T) o K of the HSIC backward, for
// G = dS/dK with S = (S_xy, S_xx, S_yy, K 1, L 1):
//   M_K = (2 g_xy L + 4 g_xx K + grx_i + grx_j) K,  M_L likewise with (K, g_yy, gry).
template <typename A>
RCKA_HD void hsic_grad_weights(A k, A l, A gxy, A gxx, A gyy, A grx_i, A grx_j, A gry_i, A gry_j, A* mk, A* ml) {
  *mk = (A(2) * gxy * l + A(4) * gxx * k + grx_i + grx_j) * k;
  *ml = (A(2) * gxy * k + A(4) * gyy * l + gry_i + gry_j) * l;
}

// MMD works on Z = [X; Y] (n + m rows): an entry of K_ZZ is in the XX block
// (0), the YY block (1) or a cross block (2). Summed over the whole K_ZZ the
// cross category counts sum K_XY twice; Python halves it.
RCKA_HD int mmd_category(int64_t gi, int64_t gj, int64_t n_x) {
  const bool xi = gi < n_x, xj = gj < n_x;
  return (xi && xj) ? 0 : ((!xi && !xj) ? 1 : 2);
}

// Weight of K_ij in the MMD backward for gS = (g_xx, g_yy, g_xy):
// d/dz_i of g_xx sum K_XX is sum_j 2 g_xx dK_ij/dz_i, and of g_xy sum K_XY is sum_j g_xy dK_ij/dz_i.
template <typename A>
RCKA_HD A mmd_grad_weight(int category, A gxx, A gyy, A gxy) {
  return category == 0 ? A(2) * gxx : (category == 1 ? A(2) * gyy : gxy);
}

// Gradient of sum_j M_ij k(z_i, z_j) with respect to z_i[c], for symmetric M
// already multiplied by K: -2 gamma (sum_j M_ij z_i[c] - sum_j M_ij z_j[c]).
template <typename A>
RCKA_HD A input_grad(A gamma, A m_rowsum, A z_ic, A mz_ic) {
  return A(-2) * gamma * (m_rowsum * z_ic - mz_ic);
}

// Shared memory of the pair kernels, in bytes, every region 128-byte aligned
// (wmma needs 32-byte aligned tile pointers):
//   two (edge x ld_dot) accumulator tiles, one staging region (two operand
//   tiles of the dot product, or two feature chunks of the backward), four
//   edge-long vectors (norms, then the row/column sums of M), the small-group
//   row sums (2 x kSmallRows) and the block-reduction scratch (float64).
struct SmemLayout {
  size_t dot0, dot1, stage, vec, rows, red, total;
};

RCKA_HD int dot_ld(int edge) { return edge + 4; }  // a multiple of 4 floats, as wmma stores need

RCKA_HD SmemLayout pair_smem_layout(int edge, int kc_ld, size_t in_size, size_t acc_size) {
  SmemLayout s;
  const size_t a = 128;
  const size_t dot = (size_t)round_up((int64_t)edge * dot_ld(edge) * acc_size, a);
  const size_t stage_dot = 2 * (size_t)edge * kc_ld * in_size;
  const size_t stage_grad = 2 * (size_t)edge * kGradChunk * acc_size;
  const size_t stage = (size_t)round_up((int64_t)(stage_dot > stage_grad ? stage_dot : stage_grad), a);
  s.dot0 = 0;
  s.dot1 = s.dot0 + dot;
  s.stage = s.dot1 + dot;
  s.vec = s.stage + stage;
  s.rows = s.vec + (size_t)round_up(4 * (int64_t)edge * acc_size, a);
  s.red = s.rows + (size_t)round_up(2 * (int64_t)kSmallRows * acc_size, a);
  s.total = s.red + (size_t)round_up(3 * (kThreads / 32) * (int64_t)sizeof(double), a);
  return s;
}

}  // namespace rcka
