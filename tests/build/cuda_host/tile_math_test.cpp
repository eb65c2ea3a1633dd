// Host test of csrc/tile_math.cuh: the tile arithmetic of the CUDA kernels,
// compiled for the CPU. Two parts:
//
//   tile_math_test selfcheck
//     identities that need no reference: the upper-triangle enumeration is a
//     bijection onto {(ti, tj): ti <= tj} for many grid sizes, every slot of the
//     row-sum workspace is written exactly once, the shared-memory layouts are
//     aligned, disjoint and fit an sm_80 block. Exit status 0 and "ok".
//
//   tile_math_test emulate <in> <out>
//     replays the kernels' algorithm tile by tile in double precision with the
//     header's functions (enumeration, tile weights, row-sum slots, kernel
//     values, gradient weights, MMD categories) and writes the statistics and
//     gradients; tests/build/test_cuda_host.py compares them to the float64 reference.
//
// Input (whitespace separated): mode (0 HSIC RBF, 1 HSIC linear, 2 MMD RBF),
// edge, n, m (MMD: rows of y; else ignored), p, q, gamma_x, gamma_y, x (n*p),
// y (HSIC n*q, MMD m*p), gS (3), grx (n), gry (n).
// Output: S (3), rx (n), ry (n), dx, dy (HSIC modes; MMD: S, dx, dy).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "tile_math.cuh"

using namespace rcka;

static int fails = 0;
#define CHECK(cond, ...)                            \
  do {                                              \
    if (!(cond)) {                                  \
      ++fails;                                      \
      std::fprintf(stderr, "FAIL %s: ", #cond);     \
      std::fprintf(stderr, __VA_ARGS__);            \
      std::fprintf(stderr, "\n");                   \
    }                                               \
  } while (0)

static int selfcheck() {
  // enumeration of the upper triangle
  const int64_t sizes[] = {1, 2, 3, 4, 5, 7, 16, 31, 64, 100, 257, 1000, 4097};
  for (int64_t t : sizes) {
    const int64_t tri = num_tri_tiles(t);
    std::vector<char> seen((size_t)(t * t), 0);
    int64_t prev_i = 0, prev_j = -1;
    for (int64_t idx = 0; idx < tri; ++idx) {
      int64_t ti, tj;
      tri_tile(idx, t, &ti, &tj);
      CHECK(ti >= 0 && ti <= tj && tj < t, "T=%lld idx=%lld -> (%lld, %lld)", (long long)t, (long long)idx, (long long)ti, (long long)tj);
      if (!(ti >= 0 && ti <= tj && tj < t)) return 1;
      CHECK(!seen[ti * t + tj], "T=%lld tile (%lld, %lld) twice", (long long)t, (long long)ti, (long long)tj);
      seen[ti * t + tj] = 1;
      // row-major order: the next tile follows the previous one
      CHECK((ti == prev_i && tj == prev_j + 1) || (ti == prev_i + 1 && tj == ti), "T=%lld idx=%lld out of order", (long long)t, (long long)idx);
      prev_i = ti;
      prev_j = tj;
      CHECK(tri_row_start(ti, t) + (tj - ti) == idx, "row start of %lld", (long long)ti);
    }
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = i; j < t; ++j) CHECK(seen[i * t + j], "T=%lld tile (%lld, %lld) missed", (long long)t, (long long)i, (long long)j);
    // row-sum workspace: each (slot, tile-row) written once
    if (t <= 257) {
      std::vector<int> writes((size_t)(t * t), 0);
      for (int64_t idx = 0; idx < tri; ++idx) {
        int64_t ti, tj;
        tri_tile(idx, t, &ti, &tj);
        writes[rowsum_slot(ti, tj, false) * t + ti] += 1;
        if (ti != tj) writes[rowsum_slot(ti, tj, true) * t + tj] += 1;
      }
      for (int64_t k = 0; k < t * t; ++k) CHECK(writes[k] == 1, "T=%lld slot/row %lld written %d times", (long long)t, (long long)k, writes[k]);
    }
  }
  // weights of the tiles sum to the number of tile pairs
  for (int64_t t : sizes) {
    int64_t w = 0;
    for (int64_t idx = 0; idx < num_tri_tiles(t); ++idx) {
      int64_t ti, tj;
      tri_tile(idx, t, &ti, &tj);
      w += tile_weight(ti, tj);
    }
    CHECK(w == t * t, "weights of T=%lld sum to %lld", (long long)t, (long long)w);
  }
  // tile plans
  for (int dt = kF32; dt <= kF64; ++dt) {
    for (int64_t rows : {1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000}) {
      const Plan p = plan_gram(dt, rows);
      CHECK(p.tiles * p.edge >= rows && (p.tiles - 1) * p.edge < rows, "plan tiles dt=%d rows=%lld", dt, (long long)rows);
      CHECK(p.tri == p.tiles * (p.tiles + 1) / 2, "plan tri");
      CHECK(p.small == (rows <= kSmallRows), "plan small");
    }
  }
  // shared memory layouts of the four dtypes (edge, staging stride, input size, accumulator size)
  struct L { int edge, lds; size_t in, acc; };
  const L layouts[] = {{64, 33, 4, 4}, {64, 40, 2, 4}, {64, 40, 2, 4}, {32, 17, 8, 8}};
  for (const L& l : layouts) {
    const SmemLayout s = pair_smem_layout(l.edge, l.lds, l.in, l.acc);
    const size_t offs[] = {s.dot0, s.dot1, s.stage, s.vec, s.rows, s.red, s.total};
    for (size_t o : offs) CHECK(o % 128 == 0, "offset %zu not 128-byte aligned", o);
    CHECK(s.dot1 - s.dot0 >= (size_t)l.edge * dot_ld(l.edge) * l.acc, "dot tile 0 overlaps");
    CHECK(s.stage - s.dot1 >= (size_t)l.edge * dot_ld(l.edge) * l.acc, "dot tile 1 overlaps");
    CHECK(s.vec - s.stage >= 2 * (size_t)l.edge * l.lds * l.in, "staging overlaps");
    CHECK(s.vec - s.stage >= 2 * (size_t)l.edge * kGradChunk * l.acc, "gradient chunks overlap");
    CHECK(s.rows - s.vec >= 4 * (size_t)l.edge * l.acc, "vectors overlap");
    CHECK(s.red - s.rows >= 2 * (size_t)kSmallRows * l.acc, "small-group row sums overlap");
    CHECK(s.total - s.red >= 3 * (size_t)(kThreads / 32) * sizeof(double), "reduction scratch overlaps");
    CHECK(s.total <= 163 * 1024, "layout of %zu bytes does not fit an sm_80 block", s.total);
    CHECK(dot_ld(l.edge) % 4 == 0, "wmma store stride");
  }
  CHECK(kThreads % kGradChunk == 0 && 64 % (kThreads / kGradChunk) == 0, "gradient chunk mapping");
  if (fails == 0) std::printf("ok\n");
  return fails == 0 ? 0 : 1;
}

// One operand viewed as rows (MMD: Z = [X; Y]).
struct Rows {
  const std::vector<double>* a;
  const std::vector<double>* b;
  int64_t rows_a, rows, depth;
  double at(int64_t r, int64_t k) const { return r < rows_a ? (*a)[r * depth + k] : (*b)[(r - rows_a) * depth + k]; }
};

static double dot_rows(const Rows& v, int64_t i, int64_t j) {
  double s = 0;
  for (int64_t k = 0; k < v.depth; ++k) s += v.at(i, k) * v.at(j, k);
  return s;
}

// Adds -2 gamma sum_{j in tile cols} M_ij (z_i - z_j) to the rows of the tile,
// and the mirrored update off the diagonal, as grad_update does.
static void grad_tile(const Rows& v, std::vector<double>& out_a, std::vector<double>& out_b, int64_t r0, int64_t c0, int edge,
                      bool mirror, const std::vector<double>& m, double gamma) {
  auto out = [&](int64_t r, int64_t k) -> double& { return r < v.rows_a ? out_a[r * v.depth + k] : out_b[(r - v.rows_a) * v.depth + k]; };
  std::vector<double> rs(edge, 0.0), cs(edge, 0.0);
  for (int i = 0; i < edge; ++i)
    for (int j = 0; j < edge; ++j) {
      rs[i] += m[i * edge + j];
      cs[j] += m[i * edge + j];
    }
  for (int64_t k = 0; k < v.depth; ++k) {
    for (int i = 0; i < edge && r0 + i < v.rows; ++i) {
      double mz = 0;
      for (int j = 0; j < edge && c0 + j < v.rows; ++j) mz += m[i * edge + j] * v.at(c0 + j, k);
      out(r0 + i, k) += input_grad(gamma, rs[i], v.at(r0 + i, k), mz);
    }
    if (!mirror) continue;
    for (int j = 0; j < edge && c0 + j < v.rows; ++j) {
      double mz = 0;
      for (int i = 0; i < edge && r0 + i < v.rows; ++i) mz += m[i * edge + j] * v.at(r0 + i, k);
      out(c0 + j, k) += input_grad(gamma, cs[j], v.at(c0 + j, k), mz);
    }
  }
}

static int emulate(const char* in_path, const char* out_path) {
  std::ifstream in(in_path);
  int mode, edge;
  int64_t n, m, p, q;
  double gx, gy;
  in >> mode >> edge >> n >> m >> p >> q >> gx >> gy;
  if (!in || edge < 1 || n < 1 || p < 1) {
    std::fprintf(stderr, "bad input header\n");
    return 2;
  }
  const bool mmd = mode == kMmdRbf;
  const int64_t ny = mmd ? m : n, py = mmd ? p : q;
  std::vector<double> x(n * p), y(ny * py), gs(3), grx(n), gry(n);
  for (double& v : x) in >> v;
  for (double& v : y) in >> v;
  for (double& v : gs) in >> v;
  for (double& v : grx) in >> v;
  for (double& v : gry) in >> v;
  if (!in) {
    std::fprintf(stderr, "bad input body\n");
    return 2;
  }
  const Rows X = mmd ? Rows{&x, &y, n, n + m, p} : Rows{&x, &x, n, n, p};
  const Rows Y = Rows{&y, &y, ny, ny, py};
  const int64_t rows = X.rows;
  const int64_t tiles = num_tiles(rows, edge), tri = num_tri_tiles(tiles);
  double s[3] = {0, 0, 0};
  std::vector<double> ws_r0(tiles * rows, 0.0), ws_r1(tiles * rows, 0.0);
  std::vector<double> dx(x.size(), 0.0), dy(y.size(), 0.0);
  std::vector<double> kt(edge * edge), lt(edge * edge), mk(edge * edge), ml(edge * edge);
  for (int64_t idx = 0; idx < tri; ++idx) {
    int64_t ti, tj;
    tri_tile(idx, tiles, &ti, &tj);
    const int64_t r0 = ti * edge, c0 = tj * edge;
    const double w = tile_weight(ti, tj);
    for (int i = 0; i < edge; ++i)
      for (int j = 0; j < edge; ++j) {
        const int64_t gi = r0 + i, gj = c0 + j;
        const int e = i * edge + j;
        kt[e] = lt[e] = mk[e] = ml[e] = 0.0;
        if (gi >= rows || gj >= rows) continue;
        if (mode == kHsicLinear) {
          kt[e] = dot_rows(X, gi, gj);
          lt[e] = dot_rows(Y, gi, gj);
        } else {
          kt[e] = rbf_value(dot_rows(X, gi, gi), dot_rows(X, gj, gj), dot_rows(X, gi, gj), gx, gi == gj);
          if (!mmd) lt[e] = rbf_value(dot_rows(Y, gi, gi), dot_rows(Y, gj, gj), dot_rows(Y, gi, gj), gy, gi == gj);
        }
        if (mmd) {
          const int cat = mmd_category(gi, gj, n);
          s[cat] += w * kt[e];
          mk[e] = kt[e] * mmd_grad_weight(cat, gs[0], gs[1], gs[2]);
        } else {
          s[0] += w * kt[e] * lt[e];
          s[1] += w * kt[e] * kt[e];
          s[2] += w * lt[e] * lt[e];
          hsic_grad_weights(kt[e], lt[e], gs[0], gs[1], gs[2], grx[gi], grx[gj], gry[gi], gry[gj], &mk[e], &ml[e]);
        }
      }
    if (mode == kHsicRbf) {
      for (int side = 0; side < (ti == tj ? 1 : 2); ++side) {
        const bool cols = side == 1;
        const int64_t base = cols ? c0 : r0, slot = rowsum_slot(ti, tj, cols);
        for (int a = 0; a < edge && base + a < rows; ++a) {
          double sk = 0, sl = 0;
          for (int b = 0; b < edge; ++b) {
            sk += cols ? kt[b * edge + a] : kt[a * edge + b];
            sl += cols ? lt[b * edge + a] : lt[a * edge + b];
          }
          ws_r0[slot * rows + base + a] = sk;
          ws_r1[slot * rows + base + a] = sl;
        }
      }
    }
    if (mode != kHsicLinear) {
      grad_tile(X, dx, dy, r0, c0, edge, ti != tj, mk, gx);
      if (!mmd) grad_tile(Y, dy, dy, r0, c0, edge, ti != tj, ml, gy);
    }
  }
  std::ofstream out(out_path);
  out << std::setprecision(17);
  if (mmd) s[2] *= 0.5;  // the cross blocks of K_ZZ hold sum K_XY twice (cuda_backend.rbf_mmd_sums)
  for (double v : s) out << v << "\n";
  if (!mmd) {
    for (int r = 0; r < 2; ++r)
      for (int64_t i = 0; i < n; ++i) {
        double t = 0;
        for (int64_t sl = 0; sl < tiles; ++sl) t += (r ? ws_r1 : ws_r0)[sl * rows + i];
        out << t << "\n";
      }
  }
  for (double v : dx) out << v << "\n";
  for (double v : dy) out << v << "\n";
  return out ? 0 : 2;
}

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "selfcheck") return selfcheck();
  if (argc >= 4 && std::string(argv[1]) == "emulate") return emulate(argv[2], argv[3]);
  std::fprintf(stderr, "usage: %s selfcheck | emulate <in> <out>\n", argv[0]);
  return 2;
}
