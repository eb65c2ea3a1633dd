// Kernels of the cuda backend, as templates over the input dtype; each
// kernels_<dtype>.cu instantiates them once (RCKA_INSTANTIATE at the bottom).
//
// One thread block computes one square tile of a Gram matrix (or, on the
// small-group path, walks every tile of one group). A tile starts with the
// inner products of its row block and column block, accumulated over the
// feature dimension in chunks staged through shared memory: tensor cores
// (wmma 16x16x16, fp32 accumulation) for fp16/bf16, a SIMT register tile for
// fp32 and fp64. The epilogue turns inner products into kernel values
// (tile_math.cuh) and reduces them; nothing n x n leaves the chip.
//
// With RCKA_HOST_EMULATION defined (tests/build/cuda_host/emu.h) the kernels compile
// as plain C++ and run on the CPU, one std::thread per CUDA thread (wmma and
// the half types emulated too), so their indexing and synchronisation are
// tested without a GPU.
#pragma once

#ifndef RCKA_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define RCKA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "api.h"
#include "tile_math.cuh"

namespace rcka {

// ----------------------------------------------------------------------------- dtype traits

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  using acc = float;
  static constexpr int edge = 64, kc = 32, kpad = 1;
  static constexpr bool wmma = false;
};
template <>
struct Traits<__half> {
  using acc = float;
  static constexpr int edge = 64, kc = 32, kpad = 8;
  static constexpr bool wmma = true;
};
template <>
struct Traits<__nv_bfloat16> {
  using acc = float;
  static constexpr int edge = 64, kc = 32, kpad = 8;
  static constexpr bool wmma = true;
};
template <>
struct Traits<double> {
  using acc = double;
  static constexpr int edge = 32, kc = 16, kpad = 1;
  static constexpr bool wmma = false;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T>
__device__ __forceinline__ T zero_of() { return T(0); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.0f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.0f); }

// ----------------------------------------------------------------------------- operand views

template <typename T>
struct View {
  const T* a;
  const T* b;
  int64_t rows_a, rows, depth, sr, sk;
  __device__ __forceinline__ const T* at(int64_t r, int64_t k) const {
    return (r < rows_a ? a + r * sr : b + (r - rows_a) * sr) + k * sk;
  }
};

template <typename T>
__device__ __forceinline__ View<T> view_of(const Matrix& m, int64_t g) {
  View<T> v;
  v.a = static_cast<const T*>(m.a) + g * m.gs_a;
  v.b = static_cast<const T*>(m.b ? m.b : m.a) + g * m.gs_b;
  v.rows_a = m.rows_a;
  v.rows = m.rows;
  v.depth = m.depth;
  v.sr = m.sr;
  v.sk = m.sk;
  return v;
}

// Writable view with the same geometry (gradients, in the compute dtype).
template <typename A>
struct OutView {
  A* a;
  A* b;
  int64_t rows_a, sr, sk;
  __device__ __forceinline__ A* at(int64_t r, int64_t k) const {
    return (r < rows_a ? a + r * sr : b + (r - rows_a) * sr) + k * sk;
  }
};

template <typename A>
__device__ __forceinline__ OutView<A> out_of(const Matrix& m, void* pa, void* pb, int64_t g) {
  OutView<A> v;
  v.a = static_cast<A*>(pa) + g * m.gs_a;
  v.b = static_cast<A*>(pb ? pb : pa) + g * m.gs_b;
  v.rows_a = m.rows_a;
  v.sr = m.sr;
  v.sk = m.sk;
  return v;
}

// ----------------------------------------------------------------------------- shared memory

template <typename T>
struct Smem {
  using acc = typename Traits<T>::acc;
  static constexpr int edge = Traits<T>::edge;
  static constexpr int lds = Traits<T>::kc + Traits<T>::kpad;  // staging row stride (elements)
  static constexpr int ldd = edge + 4;                           // accumulator tile row stride
  static_assert(ldd % 4 == 0, "wmma stores need a multiple of 4 floats");

  acc* dot0;
  acc* dot1;
  T* st_a;    // dot-product staging: edge x lds, two operand tiles
  T* st_b;
  acc* ch_i;  // backward feature chunks: edge x kGradChunk each (aliases the staging region)
  acc* ch_j;
  acc* vec;   // 4 x edge
  acc* rows;  // 2 x kSmallRows
  acc* red;   // 3 x warps

  __host__ __device__ static SmemLayout layout() { return pair_smem_layout(edge, lds, sizeof(T), sizeof(acc)); }

  __device__ explicit Smem(unsigned char* base) {
    const SmemLayout l = layout();
    dot0 = reinterpret_cast<acc*>(base + l.dot0);
    dot1 = reinterpret_cast<acc*>(base + l.dot1);
    st_a = reinterpret_cast<T*>(base + l.stage);
    st_b = st_a + edge * lds;
    ch_i = reinterpret_cast<acc*>(base + l.stage);
    ch_j = ch_i + edge * kGradChunk;
    vec = reinterpret_cast<acc*>(base + l.vec);
    rows = reinterpret_cast<acc*>(base + l.rows);
    red = reinterpret_cast<acc*>(base + l.red);
  }
};

// ----------------------------------------------------------------------------- the inner-product tile

// Copy rows [r0, r0 + edge) x features [k0, k0 + kc) of v into a staging tile
// (zeros outside the matrix). The thread order follows the unit stride.
template <typename T>
__device__ __forceinline__ void stage_tile(const View<T>& v, int64_t r0, int64_t k0, T* dst) {
  constexpr int E = Traits<T>::edge, KC = Traits<T>::kc, LDS = Smem<T>::lds;
  const bool k_fast = v.sk == 1;
  for (int e = threadIdx.x; e < E * KC; e += kThreads) {
    const int i = k_fast ? e / KC : e % E;
    const int kk = k_fast ? e % KC : e / E;
    const int64_t r = r0 + i, k = k0 + kk;
    dst[i * LDS + kk] = (r < v.rows && k < v.depth) ? *v.at(r, k) : zero_of<T>();
  }
}

// SIMT register tile: thread (ty, tx) of a 16 x 8 grid owns rows ty + 16 a and
// columns tx + 8 b of the tile.
template <typename T>
struct SimtTile {
  using acc = typename Traits<T>::acc;
  static constexpr int E = Traits<T>::edge, TM = E / 16, TN = E / 8;
  acc c[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TN; ++b) c[a][b] = acc(0);
  }
  __device__ __forceinline__ void step(const T* sa, const T* sb) {
    constexpr int LDS = Smem<T>::lds;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < Traits<T>::kc; ++kk) {
      acc av[TM], bv[TN];
#pragma unroll
      for (int a = 0; a < TM; ++a) av[a] = to_acc(sa[(ty + 16 * a) * LDS + kk]);
#pragma unroll
      for (int b = 0; b < TN; ++b) bv[b] = to_acc(sb[(tx + 8 * b) * LDS + kk]);
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TN; ++b) c[a][b] += av[a] * bv[b];
    }
  }
  __device__ __forceinline__ void store(acc* d) const {
    constexpr int LDD = Smem<T>::ldd;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TN; ++b) d[(ty + 16 * a) * LDD + tx + 8 * b] = c[a][b];
  }
};

// Tensor-core tile: 4 warps in a 2 x 2 grid, each a 32 x 32 block of 2 x 2
// wmma 16x16x16 fragments with fp32 accumulators.
template <typename T>
struct WmmaTile {
  static constexpr int E = Traits<T>::edge;
  static_assert(E == 64, "the wmma tile assumes a 64 x 64 tile and 4 warps");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) nvcuda::wmma::fill_fragment(c[a][b], 0.0f);
  }
  __device__ __forceinline__ void step(const T* sa, const T* sb) {
    using namespace nvcuda;
    constexpr int LDS = Smem<T>::lds;
    const int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;
#pragma unroll
    for (int ks = 0; ks < Traits<T>::kc; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], sa + (wr + 16 * a) * LDS + ks, LDS);
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], sb + (wc + 16 * b) * LDS + ks, LDS);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(c[a][b], fa[a], fb[b], c[a][b]);
    }
  }
  __device__ __forceinline__ void store(float* d) const {
    using namespace nvcuda;
    constexpr int LDD = Smem<T>::ldd;
    const int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
        wmma::store_matrix_sync(d + (wr + 16 * a) * LDD + wc + 16 * b, c[a][b], LDD, wmma::mem_row_major);
  }
};

template <typename T>
using DotTile = typename std::conditional<Traits<T>::wmma, WmmaTile<T>, SimtTile<T>>::type;

// out[i][j] = <row r0+i of vr, row c0+j of vc> for the edge x edge tile; with
// norms != nullptr also norms[i] = |row r0+i of vr|^2, norms[edge + j] = |row
// c0+j of vc|^2 (from the same staged values). The caller synchronises before
// reading out or norms.
template <typename T>
__device__ void dot_tile(const View<T>& vr, int64_t r0, const View<T>& vc, int64_t c0, Smem<T>& sm,
                         typename Traits<T>::acc* out, typename Traits<T>::acc* norms) {
  using acc = typename Traits<T>::acc;
  constexpr int E = Traits<T>::edge, KC = Traits<T>::kc, LDS = Smem<T>::lds;
  DotTile<T> tile;
  tile.zero();
  acc nrm = acc(0);
  const int t = threadIdx.x;
  for (int64_t k0 = 0; k0 < vr.depth; k0 += KC) {
    stage_tile(vr, r0, k0, sm.st_a);
    stage_tile(vc, c0, k0, sm.st_b);
    __syncthreads();
    tile.step(sm.st_a, sm.st_b);
    if (norms != nullptr && t < 2 * E) {
      const T* row = t < E ? sm.st_a + t * LDS : sm.st_b + (t - E) * LDS;
#pragma unroll 8
      for (int kk = 0; kk < KC; ++kk) {
        const acc v = to_acc(row[kk]);
        nrm += v * v;
      }
    }
    __syncthreads();
  }
  tile.store(out);
  if (norms != nullptr && t < 2 * E) norms[t] = nrm;
}

// ----------------------------------------------------------------------------- reductions

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum of three per-thread values over the block; the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ void block_sum3(A& v0, A& v1, A& v2, A* red) {
  v0 = warp_sum(v0);
  v1 = warp_sum(v1);
  v2 = warp_sum(v2);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read from a previous use
  if (lane == 0) {
    red[3 * warp + 0] = v0;
    red[3 * warp + 1] = v1;
    red[3 * warp + 2] = v2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    v0 = v1 = v2 = A(0);
    for (int w = 0; w < kThreads / 32; ++w) {
      v0 += red[3 * w + 0];
      v1 += red[3 * w + 1];
      v2 += red[3 * w + 2];
    }
  }
}

// Row sums (columns = false) or column sums (columns = true) of an edge x edge
// tile d; `emit(index, sum)` is called once per row/column by one thread.
// Lanes that share a row are adjacent, so the combine is a few shuffles.
template <typename T, typename F>
__device__ __forceinline__ void line_sums(const typename Traits<T>::acc* d, bool columns, F emit) {
  using acc = typename Traits<T>::acc;
  constexpr int E = Traits<T>::edge, LDD = Smem<T>::ldd, TPR = kThreads / E;
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "threads per line must be a power of 2");
  const int line = threadIdx.x / TPR, part = threadIdx.x % TPR;
  acc s = acc(0);
  for (int o = part; o < E; o += TPR) s += columns ? d[o * LDD + line] : d[line * LDD + o];
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (part == 0) emit(line, s);
}

// ----------------------------------------------------------------------------- forward

// HSIC modes: S = (sum K o L, sum K o K, sum L o L) and (RBF) the row sums of
// K and L. MMD: S = (sum K_XX, sum K_YY, 2 sum K_XY) over Z = [X; Y].
// SMALL: block g walks all tiles of group g and writes the totals (S as
// float64); otherwise block (g, tile) writes its weighted partials.
template <typename T, int MODE, bool SMALL>
__global__ void __launch_bounds__(kThreads, 1) pair_forward_kernel(PairArgs args, int64_t tiles, int64_t tri) {
  using acc = typename Traits<T>::acc;
  constexpr int E = Traits<T>::edge, LDD = Smem<T>::ldd;
  constexpr bool RBF = MODE != kHsicLinear;
  constexpr bool TWO = MODE != kMmdRbf;  // two Grams (K of x, L of y)
  RCKA_DYNAMIC_SMEM(smem_raw);
  Smem<T> sm(smem_raw);

  // 32-bit division: the launcher keeps the grid below 2^31 blocks
  const int64_t g = SMALL ? (int64_t)blockIdx.x : (int64_t)(blockIdx.x / (unsigned)tri);
  const int64_t first = SMALL ? 0 : (int64_t)(blockIdx.x % (unsigned)tri);
  const int64_t last = SMALL ? tri : first + 1;
  const View<T> X = view_of<T>(args.x, g);
  const View<T> Y = view_of<T>(args.y, g);
  const int64_t n = X.rows;
  const acc gx = RBF ? static_cast<const acc*>(args.gamma_x)[g] : acc(0);
  const acc gy = (RBF && TWO) ? static_cast<const acc*>(args.gamma_y)[g] : acc(0);
  acc* nk = sm.vec;           // norms of x: rows [0, E), columns [E, 2E)
  acc* nl = sm.vec + 2 * E;   // norms of y
  constexpr bool ROWSUMS = MODE == kHsicRbf;

  if (SMALL && ROWSUMS) {
    for (int i = threadIdx.x; i < 2 * kSmallRows; i += kThreads) sm.rows[i] = acc(0);
  }
  // a tile's sums in the compute dtype, across tiles (and threads) in float64
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int64_t tile = first; tile < last; ++tile) {
    int64_t ti, tj;
    tri_tile(tile, tiles, &ti, &tj);
    const int64_t r0 = ti * E, c0 = tj * E;
    const double w = (double)tile_weight(ti, tj);
    dot_tile<T>(X, r0, X, c0, sm, sm.dot0, RBF ? nk : nullptr);
    if (TWO) dot_tile<T>(Y, r0, Y, c0, sm, sm.dot1, RBF ? nl : nullptr);
    __syncthreads();

    acc t0 = acc(0), t1 = acc(0), t2 = acc(0);
    for (int e = threadIdx.x; e < E * E; e += kThreads) {
      const int i = e / E, j = e % E;
      const int64_t gi = r0 + i, gj = c0 + j;
      const bool valid = gi < n && gj < n;
      if (MODE == kMmdRbf) {
        const acc k = valid ? rbf_value(nk[i], nk[E + j], sm.dot0[i * LDD + j], gx, gi == gj) : acc(0);
        const int cat = mmd_category(gi, gj, X.rows_a);
        t0 += cat == 0 ? k : acc(0);
        t1 += cat == 1 ? k : acc(0);
        t2 += cat == 2 ? k : acc(0);
      } else {
        acc k = acc(0), l = acc(0);
        if (valid) {
          k = sm.dot0[i * LDD + j];
          l = sm.dot1[i * LDD + j];
          if (RBF) {
            k = rbf_value(nk[i], nk[E + j], k, gx, gi == gj);
            l = rbf_value(nl[i], nl[E + j], l, gy, gi == gj);
          }
        }
        if (ROWSUMS) {
          sm.dot0[i * LDD + j] = k;
          sm.dot1[i * LDD + j] = l;
        }
        t0 += k * l;
        t1 += k * k;
        t2 += l * l;
      }
    }
    s0 += w * (double)t0;
    s1 += w * (double)t1;
    s2 += w * (double)t2;

    if (ROWSUMS) {
      __syncthreads();
      acc* rk = static_cast<acc*>(args.r0);
      acc* rl = static_cast<acc*>(args.r1);
      for (int side = 0; side < 2; ++side) {
        const bool cols = side == 1;
        if (cols && ti == tj) break;
        const int64_t base = cols ? c0 : r0;
        const int64_t slot = rowsum_slot(ti, tj, cols);
#pragma unroll 1
        for (int which = 0; which < 2; ++which) {
          line_sums<T>(which ? sm.dot1 : sm.dot0, cols, [&](int line, acc v) {
            const int64_t r = base + line;
            if (r >= n) return;
            if (SMALL) sm.rows[which * kSmallRows + r] += v;
            else (which ? rl : rk)[(g * tiles + slot) * n + r] = v;
          });
        }
      }
    }
    __syncthreads();  // the next tile overwrites the tiles and vectors
  }

  block_sum3(s0, s1, s2, reinterpret_cast<double*>(sm.red));
  if (threadIdx.x == 0) {
    double* out = static_cast<double*>(args.s) + (SMALL ? g : g * tri + first) * 3;
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
  }
  if (SMALL && ROWSUMS) {
    acc* rk = static_cast<acc*>(args.r0) + g * n;
    acc* rl = static_cast<acc*>(args.r1) + g * n;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      rk[i] = sm.rows[i];
      rl[i] = sm.rows[kSmallRows + i];
    }
  }
}

// ----------------------------------------------------------------------------- backward

// out(r0 + i, :) += -2 gamma (rs_i z_i - sum_j M_ij z_{c0+j}) for the rows of
// the tile and, with mirror, the mirrored update of the columns' rows.
// M (in sm.dot-tile m) is zero outside the matrix; rs/cs are its row and
// column sums. The calling block owns every row it updates (a SMALL block its
// group, any other block its row block, without mirror), so it adds without
// atomics: the sums run in a fixed order and the gradient is the same from run
// to run.
template <typename T, bool SMALL>
__device__ void grad_update(const View<T>& v, const OutView<typename Traits<T>::acc>& out, int64_t r0, int64_t c0,
                            bool mirror, const typename Traits<T>::acc* m, const typename Traits<T>::acc* rs,
                            const typename Traits<T>::acc* cs, typename Traits<T>::acc gamma, Smem<T>& sm) {
  using acc = typename Traits<T>::acc;
  constexpr int E = Traits<T>::edge, LDD = Smem<T>::ldd, PC = kGradChunk, RPT = E / (kThreads / PC);
  const int c = threadIdx.x % PC, rg = threadIdx.x / PC;
  for (int64_t f0 = 0; f0 < v.depth; f0 += PC) {
#pragma unroll 4
    for (int e = threadIdx.x; e < E * PC; e += kThreads) {
      const int i = e / PC, cc = e % PC;
      const int64_t f = f0 + cc;
      const int64_t ri = r0 + i, rj = c0 + i;
      sm.ch_i[e] = (ri < v.rows && f < v.depth) ? to_acc(*v.at(ri, f)) : acc(0);
      sm.ch_j[e] = (rj < v.rows && f < v.depth) ? to_acc(*v.at(rj, f)) : acc(0);
    }
    __syncthreads();
    const int64_t f = f0 + c;
    if (f < v.depth) {
      acc a[RPT];
#pragma unroll
      for (int s = 0; s < RPT; ++s) a[s] = acc(0);
#pragma unroll 2
      for (int j = 0; j < E; ++j) {
        const acc zj = sm.ch_j[j * PC + c];
#pragma unroll
        for (int s = 0; s < RPT; ++s) a[s] += m[(rg + 4 * s) * LDD + j] * zj;
      }
#pragma unroll
      for (int s = 0; s < RPT; ++s) {
        const int i = rg + 4 * s;
        const int64_t r = r0 + i;
        if (r < v.rows) {
          const acc val = input_grad(gamma, rs[i], sm.ch_i[i * PC + c], a[s]);
          *out.at(r, f) += val;
        }
      }
      if (SMALL && mirror) {  // only a SMALL block mirrors (the others own a row block)
#pragma unroll
        for (int s = 0; s < RPT; ++s) a[s] = acc(0);
#pragma unroll 2
        for (int i = 0; i < E; ++i) {
          const acc zi = sm.ch_i[i * PC + c];
#pragma unroll
          for (int s = 0; s < RPT; ++s) a[s] += m[i * LDD + rg + 4 * s] * zi;
        }
#pragma unroll
        for (int s = 0; s < RPT; ++s) {
          const int j = rg + 4 * s;
          const int64_t r = c0 + j;
          if (r < v.rows) {
            const acc val = input_grad(gamma, cs[j], sm.ch_j[j * PC + c], a[s]);
            *out.at(r, f) += val;
          }
        }
      }
    }
    __syncthreads();
  }
}

// Vector-Jacobian products of the forward above (HSIC RBF or MMD), recomputing
// each tile; gradients accumulate into zero-initialised compute-dtype outputs.
template <typename T, int MODE, bool SMALL>
__global__ void __launch_bounds__(kThreads, 1) pair_backward_kernel(PairArgs args, int64_t tiles, int64_t tri) {
  using acc = typename Traits<T>::acc;
  constexpr int E = Traits<T>::edge, LDD = Smem<T>::ldd;
  constexpr bool TWO = MODE == kHsicRbf;
  RCKA_DYNAMIC_SMEM(smem_raw);
  Smem<T> sm(smem_raw);

  // SMALL: one block per group walks the triangle of tiles (it owns the group).
  // Otherwise one block per (group, row block) walks every column block and
  // updates only its own rows: no atomics, a fixed order of summation, so the
  // gradient is deterministic, at the price of computing each off-diagonal tile
  // twice. 32-bit division: the launcher keeps the grid below 2^31 blocks.
  const int64_t g = SMALL ? (int64_t)blockIdx.x : (int64_t)(blockIdx.x / (unsigned)tiles);
  const int64_t own = SMALL ? 0 : (int64_t)(blockIdx.x % (unsigned)tiles);
  const int64_t steps = SMALL ? tri : tiles;
  const View<T> X = view_of<T>(args.x, g);
  const View<T> Y = view_of<T>(args.y, g);
  const OutView<acc> DX = out_of<acc>(args.x, args.dx, TWO ? nullptr : args.dy, g);
  const OutView<acc> DY = out_of<acc>(args.y, TWO ? args.dy : args.dx, nullptr, g);
  const int64_t n = X.rows;
  const acc gx = static_cast<const acc*>(args.gamma_x)[g];
  const acc gy = TWO ? static_cast<const acc*>(args.gamma_y)[g] : acc(0);
  const double* gsp = args.gs + 3 * g;
  const acc g0 = (acc)gsp[0], g1 = (acc)gsp[1], g2 = (acc)gsp[2];
  const acc* grx = TWO ? static_cast<const acc*>(args.grx) + g * n : nullptr;
  const acc* gry = TWO ? static_cast<const acc*>(args.gry) + g * n : nullptr;
  acc* nk = sm.vec;
  acc* nl = sm.vec + 2 * E;

  for (int64_t step = 0; step < steps; ++step) {
    int64_t ti = own, tj = step;
    if (SMALL) tri_tile(step, tiles, &ti, &tj);
#ifdef __CUDA_ARCH__
    // opaque to the optimiser: hoisting the row block's values out of the loop
    // kept them live across it and spilled registers
    if (!SMALL) asm volatile("" : "+l"(ti));
#endif
    const int64_t r0 = ti * E, c0 = tj * E;
    dot_tile<T>(X, r0, X, c0, sm, sm.dot0, nk);
    if (TWO) dot_tile<T>(Y, r0, Y, c0, sm, sm.dot1, nl);
    __syncthreads();

    for (int e = threadIdx.x; e < E * E; e += kThreads) {
      const int i = e / E, j = e % E;
      const int64_t gi = r0 + i, gj = c0 + j;
      const bool valid = gi < n && gj < n;
      if (TWO) {
        acc mk = acc(0), ml = acc(0);
        if (valid) {
          const acc k = rbf_value(nk[i], nk[E + j], sm.dot0[i * LDD + j], gx, gi == gj);
          const acc l = rbf_value(nl[i], nl[E + j], sm.dot1[i * LDD + j], gy, gi == gj);
          hsic_grad_weights(k, l, g0, g1, g2, grx[gi], grx[gj], gry[gi], gry[gj], &mk, &ml);
        }
        sm.dot0[i * LDD + j] = mk;
        sm.dot1[i * LDD + j] = ml;
      } else {
        acc m = acc(0);
        if (valid) {
          const acc k = rbf_value(nk[i], nk[E + j], sm.dot0[i * LDD + j], gx, gi == gj);
          m = k * mmd_grad_weight(mmd_category(gi, gj, X.rows_a), g0, g1, g2);
        }
        sm.dot0[i * LDD + j] = m;
      }
    }
    __syncthreads();  // the norms are dead from here: the vectors hold sums of M
    const bool mirror = SMALL && ti != tj;
    for (int side = 0; side < 2; ++side) {
      line_sums<T>(sm.dot0, side == 1, [&](int line, acc v) { nk[side * E + line] = v; });
      if (TWO) line_sums<T>(sm.dot1, side == 1, [&](int line, acc v) { nl[side * E + line] = v; });
    }
    __syncthreads();
    grad_update<T, SMALL>(X, DX, r0, c0, mirror, sm.dot0, nk, nk + E, gx, sm);
    if (TWO) grad_update<T, SMALL>(Y, DY, r0, c0, mirror, sm.dot1, nl, nl + E, gy, sm);
    __syncthreads();
  }
}

// ----------------------------------------------------------------------------- linear, feature space

// Partial sums of |A^T B|_F^2 over one tile of A^T B (upper triangle when sym).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) cross_sq_kernel(CrossArgs args, int64_t tiles_a, int64_t tiles_b, int64_t ntile) {
  using acc = typename Traits<T>::acc;
  constexpr int E = Traits<T>::edge, LDD = Smem<T>::ldd;
  RCKA_DYNAMIC_SMEM(smem_raw);
  Smem<T> sm(smem_raw);
  const int64_t g = blockIdx.x / (unsigned)ntile, tile = blockIdx.x % (unsigned)ntile;
  int64_t ti, tj;
  if (args.sym) {
    tri_tile(tile, tiles_a, &ti, &tj);
  } else {
    ti = (unsigned)tile / (unsigned)tiles_b;
    tj = (unsigned)tile % (unsigned)tiles_b;
  }
  const View<T> A = view_of<T>(args.a, g);
  const View<T> B = view_of<T>(args.b, g);
  dot_tile<T>(A, ti * E, B, tj * E, sm, sm.dot0, nullptr);
  __syncthreads();
  acc t = acc(0);
  for (int e = threadIdx.x; e < E * E; e += kThreads) {
    const int i = e / E, j = e % E;
    const acc v = sm.dot0[i * LDD + j];
    if (ti * E + i < A.rows && tj * E + j < B.rows) t += v * v;
  }
  double t0 = (double)t, t1 = 0.0, t2 = 0.0;
  block_sum3(t0, t1, t2, reinterpret_cast<double*>(sm.red));
  if (threadIdx.x == 0) {
    const double w = args.sym ? (double)tile_weight(ti, tj) : 1.0;
    static_cast<double*>(args.s)[g * ntile + tile] = w * t0;
  }
}

// ----------------------------------------------------------------------------- launchers

#ifndef RCKA_HOST_EMULATION  // the emulation provides its own launch()
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("rcka cuda: ") + what + ": " + cudaGetErrorString(err));
}

template <typename K, typename... Args>
inline void launch(K kernel, const char* name, int64_t blocks, size_t smem, cudaStream_t stream, const Args&... args) {
  if (blocks <= 0) return;
  if (blocks > 0x7fffffffLL) throw std::runtime_error(std::string("rcka cuda: ") + name + ": too many blocks");
  if (smem > 48 * 1024) check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), name);
  kernel<<<(unsigned)blocks, kThreads, smem, stream>>>(args...);
  check_cuda(cudaGetLastError(), name);
  // RCKA_CUDA_SYNC=1: wait for the kernel, so that a fault is reported with its name
  static const bool sync = [] {
    const char* v = std::getenv("RCKA_CUDA_SYNC");
    return v != nullptr && v[0] == '1';
  }();
  if (sync) check_cuda(cudaStreamSynchronize(stream), name);
}
#endif

template <typename T, int MODE>
void pair_forward_mode(const PairArgs& a, cudaStream_t stream, const char* name) {
  const int64_t rows = a.x.rows;
  const Plan p = plan_gram_edge(Traits<T>::edge, rows);
  const size_t smem = Smem<T>::layout().total;
  if (p.small) launch(pair_forward_kernel<T, MODE, true>, name, a.groups, smem, stream, a, p.tiles, p.tri);
  else launch(pair_forward_kernel<T, MODE, false>, name, a.groups * p.tri, smem, stream, a, p.tiles, p.tri);
}

template <typename T, int MODE>
void pair_backward_mode(const PairArgs& a, cudaStream_t stream, const char* name) {
  const int64_t rows = a.x.rows;
  const Plan p = plan_gram_edge(Traits<T>::edge, rows);
  const size_t smem = Smem<T>::layout().total;
  if (p.small) launch(pair_backward_kernel<T, MODE, true>, name, a.groups, smem, stream, a, p.tiles, p.tri);
  else launch(pair_backward_kernel<T, MODE, false>, name, a.groups * p.tiles, smem, stream, a, p.tiles, p.tri);
}

template <typename T>
void pair_forward_impl(const PairArgs& a, cudaStream_t stream) {
  switch (a.mode) {
    case kHsicRbf: return pair_forward_mode<T, kHsicRbf>(a, stream, "pair_forward_kernel<hsic_rbf>");
    case kHsicLinear: return pair_forward_mode<T, kHsicLinear>(a, stream, "pair_forward_kernel<hsic_linear>");
    case kMmdRbf: return pair_forward_mode<T, kMmdRbf>(a, stream, "pair_forward_kernel<mmd_rbf>");
    default: throw std::runtime_error("rcka cuda: pair_forward: unknown mode");
  }
}

template <typename T>
void pair_backward_impl(const PairArgs& a, cudaStream_t stream) {
  switch (a.mode) {
    case kHsicRbf: return pair_backward_mode<T, kHsicRbf>(a, stream, "pair_backward_kernel<hsic_rbf>");
    case kMmdRbf: return pair_backward_mode<T, kMmdRbf>(a, stream, "pair_backward_kernel<mmd_rbf>");
    default: throw std::runtime_error("rcka cuda: pair_backward: mode has no backward kernel");
  }
}

template <typename T>
void cross_sq_impl(const CrossArgs& a, cudaStream_t stream) {
  constexpr int E = Traits<T>::edge;
  const int64_t ta = num_tiles(a.a.rows, E), tb = num_tiles(a.b.rows, E);
  const int64_t nt = a.sym ? num_tri_tiles(ta) : ta * tb;
  launch(cross_sq_kernel<T>, "cross_sq_kernel", a.groups * nt, Smem<T>::layout().total, stream, a, ta, tb, nt);
}

}  // namespace rcka

#define RCKA_INSTANTIATE(T, SUFFIX)                                                                              \
  namespace rcka {                                                                                               \
  void pair_forward_##SUFFIX(const PairArgs& a, cudaStream_t s) { pair_forward_impl<T>(a, s); }                  \
  void pair_backward_##SUFFIX(const PairArgs& a, cudaStream_t s) { pair_backward_impl<T>(a, s); }                \
  void cross_sq_##SUFFIX(const CrossArgs& a, cudaStream_t s) { cross_sq_impl<T>(a, s); }                         \
  }
