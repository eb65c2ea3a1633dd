// CPU emulation of the little of CUDA that the SIMT kernels use, so that
// csrc/pair_kernels.cuh (fp32 and fp64 paths) and csrc/module.cpp compile with
// g++ and run on CPU memory (tests/test_cuda_emulated.py). Force-included
// (g++ -include emu.h) ahead of the sources.
//
// A launch runs its blocks one after another; each block is kThreads
// std::threads meeting at std::barrier for __syncthreads and at per-warp
// barriers for shuffles. Shared memory is refilled with NaN bytes before every
// block, so a read of shared memory that the block did not write shows up.
// Tensor cores are emulated per warp (wmma below) with the half types in
// software. Not emulated: streams, timing, the memory model's weaker corners.
#pragma once
#define RCKA_HOST_EMULATION 1

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace rcka_emu {
struct Dim {
  unsigned x;
};
inline thread_local Dim thread_idx{0};
inline thread_local Dim block_idx{0};
inline unsigned char* smem_base = nullptr;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barrier[32] = {};
inline double shuffle_buf[32][32];

inline void sync_block() { block_barrier->arrive_and_wait(); }

template <typename A>
inline A shfl_xor(unsigned, A v, int off) {
  const unsigned w = thread_idx.x / 32, l = thread_idx.x % 32;
  shuffle_buf[w][l] = (double)v;
  warp_barrier[w]->arrive_and_wait();
  const A r = (A)shuffle_buf[w][l ^ (unsigned)off];
  warp_barrier[w]->arrive_and_wait();
  return r;
}

}  // namespace rcka_emu

#define threadIdx (::rcka_emu::thread_idx)
#define blockIdx (::rcka_emu::block_idx)
#define __syncthreads() ::rcka_emu::sync_block()
#define __shfl_xor_sync(mask, v, off) ::rcka_emu::shfl_xor(mask, v, off)
#define RCKA_DYNAMIC_SMEM(name) unsigned char* name = ::rcka_emu::smem_base

// ----------------------------------------------------------------------------- half types

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return __half{(_Float16)f}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = (uint32_t)b.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}

inline float emu_to_float(float v) { return v; }
inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// ----------------------------------------------------------------------------- wmma (16x16x16)
// Every thread of the warp holds the whole 16 x 16 fragment and computes the
// product itself; lane 0 alone stores. The element layouts are the documented
// ones: matrix_a row_major A(m, k) = p[m * ldm + k], matrix_b col_major
// B(k, n) = p[n * ldm + k], mem_row_major C(m, n) = p[m * ldm + n].

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  T x[16 * 16];
};

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 8 != 0) throw std::runtime_error("wmma load: misaligned");
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) f.x[m * 16 + k] = p[m * ldm + k];
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 8 != 0) throw std::runtime_error("wmma load: misaligned");
  for (int n = 0; n < 16; ++n)
    for (int k = 0; k < 16; ++k) f.x[k * 16 + n] = p[n * ldm + k];
}

template <typename T>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, col_major>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) acc += emu_to_float(a.x[m * 16 + k]) * emu_to_float(b.x[k * 16 + n]);
      out[m * 16 + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 4 != 0 || layout != mem_row_major) throw std::runtime_error("wmma store: misaligned");
  if (rcka_emu::thread_idx.x % 32 != 0) return;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) p[m * ldm + n] = f.x[m * 16 + n];
}
}  // namespace wmma
}  // namespace nvcuda

// ----------------------------------------------------------------------------- the runtime API module.cpp calls

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }
inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorInvalidValue"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int* c) { *c = 1; return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}

// ----------------------------------------------------------------------------- launch

namespace rcka {
template <typename K, typename... Args>
inline void launch(K kernel, const char* name, int64_t blocks, size_t smem, cudaStream_t, const Args&... args) {
  constexpr int threads = 128;  // kThreads
  if (blocks <= 0) return;
  if (blocks > 0x7fffffffLL) throw std::runtime_error(std::string("rcka emu: ") + name + ": too many blocks");
  std::vector<unsigned char> buf(smem + 256);
  unsigned char* base = buf.data() + (128 - reinterpret_cast<uintptr_t>(buf.data()) % 128);
  std::barrier<> bar(threads);
  std::vector<std::barrier<>*> warps;
  for (int w = 0; w < threads / 32; ++w) warps.push_back(new std::barrier<>(32));
  rcka_emu::smem_base = base;
  rcka_emu::block_barrier = &bar;
  for (int w = 0; w < threads / 32; ++w) rcka_emu::warp_barrier[w] = warps[w];
  std::memset(base, 0xff, smem);  // NaN in every float/double
  // RCKA_EMU_BLOCK_ORDER=<seed>: run the blocks in a shuffled order, as a GPU may
  std::vector<int64_t> order(blocks);
  for (int64_t b = 0; b < blocks; ++b) order[b] = b;
  if (const char* seed = std::getenv("RCKA_EMU_BLOCK_ORDER")) {
    std::mt19937_64 rng(std::strtoull(seed, nullptr, 10));
    std::shuffle(order.begin(), order.end(), rng);
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      rcka_emu::thread_idx.x = (unsigned)t;
      for (int64_t b : order) {
        rcka_emu::block_idx.x = (unsigned)b;
        kernel(args...);
        bar.arrive_and_wait();
        if (t == 0) std::memset(base, 0xff, smem);
        bar.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto* w : warps) delete w;
}
}  // namespace rcka
