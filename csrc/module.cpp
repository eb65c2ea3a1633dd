// pybind11 module rcka_kernels._rcka_cuda: the entry points of the cuda
// backend. Python (rcka_kernels/ops/cuda_backend.py) passes raw device
// pointers, sizes, element strides, dtype codes, the device index and the
// current stream; it checks tensors (device, shape, dtype, contiguity) before
// calling, and every entry point here checks the sizes, strides and codes
// again before launching, so a wrong call is an exception and never a launch
// (std::invalid_argument -> ValueError, a failed CUDA call -> RuntimeError).
#include <pybind11/pybind11.h>

#ifndef RCKA_HOST_EMULATION
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "api.h"
#include "tile_math.cuh"

namespace py = pybind11;
using namespace rcka;

namespace {

[[noreturn]] void fail(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string("rcka cuda ") + fn + ": " + what);
}

void check_cuda(cudaError_t err, const char* fn, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("rcka cuda ") + fn + ": " + what + ": " + cudaGetErrorString(err));
}

size_t elem_size(int dtype) { return dtype == kF64 ? 8 : (dtype == kF32 ? 4 : 2); }
size_t acc_size(int dtype) { return dtype == kF64 ? 8 : 4; }

void check_dtype(const char* fn, int dtype) {
  if (dtype < kF32 || dtype > kF64) fail(fn, "unknown dtype code " + std::to_string(dtype));
}

void check_ptr(const char* fn, const char* name, uintptr_t p, size_t align) {
  if (p == 0) fail(fn, std::string(name) + " is a null pointer");
  if (p % align != 0) fail(fn, std::string(name) + " is not aligned to " + std::to_string(align) + " bytes");
}

// (a_ptr, b_ptr, rows_a, rows, depth, gs_a, gs_b, sr, sk)
Matrix to_matrix(const char* fn, const char* name, const py::tuple& t, int dtype) {
  if (t.size() != 9) fail(fn, std::string(name) + ": expected a 9-tuple (a, b, rows_a, rows, depth, gs_a, gs_b, sr, sk)");
  Matrix m;
  const uintptr_t a = t[0].cast<uintptr_t>(), b = t[1].cast<uintptr_t>();
  m.rows_a = t[2].cast<int64_t>();
  m.rows = t[3].cast<int64_t>();
  m.depth = t[4].cast<int64_t>();
  m.gs_a = t[5].cast<int64_t>();
  m.gs_b = t[6].cast<int64_t>();
  m.sr = t[7].cast<int64_t>();
  m.sk = t[8].cast<int64_t>();
  check_ptr(fn, name, a, elem_size(dtype));
  if (m.rows < 1 || m.depth < 1) fail(fn, std::string(name) + ": empty operand");
  if (m.rows_a < 1 || m.rows_a > m.rows) fail(fn, std::string(name) + ": rows_a must be in [1, rows]");
  if (m.rows_a < m.rows) check_ptr(fn, name, b, elem_size(dtype));
  m.a = reinterpret_cast<const void*>(a);
  m.b = m.rows_a < m.rows ? reinterpret_cast<const void*>(b) : nullptr;
  return m;
}

// Sample-major rows (the pair kernels): contiguous (G, rows, depth) blocks.
void check_row_major(const char* fn, const char* name, const Matrix& m) {
  if (m.sk != 1 || m.sr != m.depth) fail(fn, std::string(name) + ": rows must be contiguous (sr = depth, sk = 1)");
  if (m.gs_a != m.rows_a * m.depth) fail(fn, std::string(name) + ": groups of the first part must be contiguous");
  if (m.rows_a < m.rows && m.gs_b != (m.rows - m.rows_a) * m.depth) fail(fn, std::string(name) + ": groups of the second part must be contiguous");
}

// Columns of a contiguous (G, n, features) tensor (the feature-space products).
void check_col_major(const char* fn, const char* name, const Matrix& m) {
  if (m.rows_a != m.rows) fail(fn, std::string(name) + ": a feature-space operand has one part");
  if (m.sr != 1 || m.sk != m.rows || m.gs_a != m.rows * m.depth) fail(fn, std::string(name) + ": expected the columns of a contiguous (G, n, p) tensor");
}

void check_groups(const char* fn, int64_t groups, int64_t blocks_per_group) {
  if (groups < 1) fail(fn, "groups must be >= 1");
  if (blocks_per_group > 0x7fffffffLL / groups) fail(fn, "problem too large for one launch (more than 2^31 - 1 blocks)");
}

// Makes `device` current for the launch and restores the previous device.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* fn) : prev_(-1) {
    check_cuda(cudaGetDevice(&prev_), fn, "cudaGetDevice");
    if (prev_ != device) check_cuda(cudaSetDevice(device), fn, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev_ >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }

 private:
  int prev_;
};

cudaStream_t to_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void dispatch_pair(bool backward, int dtype, const PairArgs& a, cudaStream_t s) {
  switch (dtype) {
    case kF32: return backward ? pair_backward_f32(a, s) : pair_forward_f32(a, s);
    case kF16: return backward ? pair_backward_f16(a, s) : pair_forward_f16(a, s);
    case kBF16: return backward ? pair_backward_bf16(a, s) : pair_forward_bf16(a, s);
    default: return backward ? pair_backward_f64(a, s) : pair_forward_f64(a, s);
  }
}

void pair_common(const char* fn, bool backward, int mode, int dtype, int64_t groups, const py::tuple& x, const py::tuple& y,
                 PairArgs& a) {
  check_dtype(fn, dtype);
  if (mode != kHsicRbf && mode != kHsicLinear && mode != kMmdRbf) fail(fn, "unknown mode " + std::to_string(mode));
  if (backward && mode == kHsicLinear) fail(fn, "the linear statistics have no backward kernel");
  a.mode = mode;
  a.groups = groups;
  a.x = to_matrix(fn, "x", x, dtype);
  check_row_major(fn, "x", a.x);
  if (mode == kMmdRbf) {
    if (a.x.rows_a == a.x.rows) fail(fn, "MMD needs x and y rows (Z = [X; Y] in two parts)");
  } else {
    a.y = to_matrix(fn, "y", y, dtype);
    check_row_major(fn, "y", a.y);
    if (a.x.rows_a != a.x.rows || a.y.rows_a != a.y.rows) fail(fn, "HSIC operands have one part each");
    if (a.x.rows != a.y.rows) fail(fn, "x and y must have the same number of rows");
  }
  const Plan p = plan_gram(dtype, a.x.rows);
  check_groups(fn, groups, p.small ? 1 : p.tri);
}

void pair_forward(int mode, int dtype, int64_t groups, const py::tuple& x, const py::tuple& y, uintptr_t gamma_x,
                  uintptr_t gamma_y, uintptr_t s, uintptr_t r0, uintptr_t r1, int device, uintptr_t stream) {
  const char* fn = "pair_forward";
  PairArgs a;
  pair_common(fn, false, mode, dtype, groups, x, y, a);
  const Plan p = plan_gram(dtype, a.x.rows);
  check_ptr(fn, "s", s, 8);
  if (mode != kHsicLinear) check_ptr(fn, "gamma_x", gamma_x, acc_size(dtype));
  if (mode == kHsicRbf) {
    check_ptr(fn, "gamma_y", gamma_y, acc_size(dtype));
    check_ptr(fn, "r0", r0, acc_size(dtype));
    check_ptr(fn, "r1", r1, acc_size(dtype));
  }
  a.gamma_x = reinterpret_cast<const void*>(gamma_x);
  a.gamma_y = reinterpret_cast<const void*>(gamma_y);
  a.s = reinterpret_cast<void*>(s);
  a.r0 = reinterpret_cast<void*>(r0);
  a.r1 = reinterpret_cast<void*>(r1);
  DeviceGuard guard(device, fn);
  dispatch_pair(false, dtype, a, to_stream(stream));
}

void pair_backward(int mode, int dtype, int64_t groups, const py::tuple& x, const py::tuple& y, uintptr_t gamma_x,
                   uintptr_t gamma_y, uintptr_t gs, uintptr_t grx, uintptr_t gry, uintptr_t dx, uintptr_t dy, int device,
                   uintptr_t stream) {
  const char* fn = "pair_backward";
  PairArgs a;
  pair_common(fn, true, mode, dtype, groups, x, y, a);
  const size_t as = acc_size(dtype);
  check_ptr(fn, "gamma_x", gamma_x, as);
  check_ptr(fn, "gs", gs, 8);
  check_ptr(fn, "dx", dx, as);
  check_ptr(fn, "dy", dy, as);
  if (mode == kHsicRbf) {
    check_ptr(fn, "gamma_y", gamma_y, as);
    check_ptr(fn, "grx", grx, as);
    check_ptr(fn, "gry", gry, as);
  }
  a.gamma_x = reinterpret_cast<const void*>(gamma_x);
  a.gamma_y = reinterpret_cast<const void*>(gamma_y);
  a.gs = reinterpret_cast<const double*>(gs);
  a.grx = reinterpret_cast<const void*>(grx);
  a.gry = reinterpret_cast<const void*>(gry);
  a.dx = reinterpret_cast<void*>(dx);
  a.dy = reinterpret_cast<void*>(dy);
  DeviceGuard guard(device, fn);
  dispatch_pair(true, dtype, a, to_stream(stream));
}

py::tuple cross_plan(int dtype, int64_t rows_a, int64_t rows_b, bool sym) {
  check_dtype("cross_plan", dtype);
  const int e = tile_edge(dtype);
  const int64_t ta = num_tiles(rows_a, e), tb = num_tiles(rows_b, e);
  return py::make_tuple(ta, tb, sym ? num_tri_tiles(ta) : ta * tb);
}

void cross_sq(int dtype, int64_t groups, const py::tuple& a_t, const py::tuple& b_t, bool sym, uintptr_t s, int device,
              uintptr_t stream) {
  const char* fn = "cross_sq";
  check_dtype(fn, dtype);
  CrossArgs a;
  a.groups = groups;
  a.a = to_matrix(fn, "a", a_t, dtype);
  a.b = to_matrix(fn, "b", b_t, dtype);
  check_col_major(fn, "a", a.a);
  check_col_major(fn, "b", a.b);
  if (a.a.depth != a.b.depth) fail(fn, "a and b must have the same number of samples");
  if (sym && (a.a.a != a.b.a || a.a.rows != a.b.rows)) fail(fn, "sym needs a and b to be the same operand");
  a.sym = sym ? 1 : 0;
  const int e = tile_edge(dtype);
  const int64_t ta = num_tiles(a.a.rows, e), tb = num_tiles(a.b.rows, e);
  check_groups(fn, groups, sym ? num_tri_tiles(ta) : ta * tb);
  check_ptr(fn, "s", s, 8);
  a.s = reinterpret_cast<void*>(s);
  DeviceGuard guard(device, fn);
  const cudaStream_t st = to_stream(stream);
  switch (dtype) {
    case kF32: return cross_sq_f32(a, st);
    case kF16: return cross_sq_f16(a, st);
    case kBF16: return cross_sq_bf16(a, st);
    default: return cross_sq_f64(a, st);
  }
}

// What this process can run: CUDA runtime (linked) and driver versions, the
// number of devices and the lowest compute capability among them. Never throws.
py::dict device_status() {
  py::dict d;
  int rt = 0, drv = 0, count = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    count = 0;
    cudaGetLastError();  // clear the sticky error of a failed query
  }
  int min_cc = 0;
  for (int i = 0; i < count; ++i) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, i) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, i) != cudaSuccess)
      continue;
    const int cc = 10 * major + minor;
    if (min_cc == 0 || cc < min_cc) min_cc = cc;
  }
  d["runtime_version"] = rt;
  d["driver_version"] = drv;
  d["device_count"] = count;
  d["error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  d["min_compute_capability"] = min_cc;
  return d;
}

}  // namespace

PYBIND11_MODULE(_rcka_cuda, m) {
  m.doc() = "CUDA kernels of rcka_kernels (raw pointers + stream; see rcka_kernels/ops/cuda_backend.py)";
  m.attr("F32") = int(kF32);
  m.attr("F16") = int(kF16);
  m.attr("BF16") = int(kBF16);
  m.attr("F64") = int(kF64);
  m.attr("HSIC_RBF") = int(kHsicRbf);
  m.attr("HSIC_LINEAR") = int(kHsicLinear);
  m.attr("MMD_RBF") = int(kMmdRbf);
  m.attr("SMALL_ROWS") = kSmallRows;
#ifdef RCKA_CUDA_ARCHS
  m.attr("ARCHS") = RCKA_CUDA_ARCHS;
#else
  m.attr("ARCHS") = "";
#endif
  m.def("device_status", &device_status, "runtime/driver versions, device count, lowest compute capability");
  m.def(
      "plan",
      [](int dtype, int64_t rows) {
        check_dtype("plan", dtype);
        if (rows < 1) fail("plan", "rows must be >= 1");
        const Plan p = plan_gram(dtype, rows);
        return py::make_tuple(p.edge, p.tiles, p.tri, bool(p.small));
      },
      py::arg("dtype"), py::arg("rows"), "(edge, tiles per side, upper-triangle tiles, small-group path) of a Gram");
  m.def("cross_plan", &cross_plan, py::arg("dtype"), py::arg("rows_a"), py::arg("rows_b"), py::arg("sym"));
  m.def("pair_forward", &pair_forward, py::arg("mode"), py::arg("dtype"), py::arg("groups"), py::arg("x"), py::arg("y"),
        py::arg("gamma_x"), py::arg("gamma_y"), py::arg("s"), py::arg("r0"), py::arg("r1"), py::arg("device"),
        py::arg("stream"));
  m.def("pair_backward", &pair_backward, py::arg("mode"), py::arg("dtype"), py::arg("groups"), py::arg("x"),
        py::arg("y"), py::arg("gamma_x"), py::arg("gamma_y"), py::arg("gs"), py::arg("grx"), py::arg("gry"),
        py::arg("dx"), py::arg("dy"), py::arg("device"), py::arg("stream"));
  m.def("cross_sq", &cross_sq, py::arg("dtype"), py::arg("groups"), py::arg("a"), py::arg("b"), py::arg("sym"),
        py::arg("s"), py::arg("device"), py::arg("stream"));
}
