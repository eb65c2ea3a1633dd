// Linear-kernel CKA, HSIC and the uncentred alignment as one native autograd op,
// rcka_native::linear_alignment: the same arithmetic as rcka_kernels/ops/linear.py
// (which documents it step by step), with the per-call Python gone: at the paper's
// batch sizes (64 x 100 logits) the Python autograd.Function doing the same work costs
// more in interpreter time than in arithmetic. Also here: rcka_native::axis_pair_alignment,
// RCKA's sample and class axes in one autograd node built from the same pieces, and
// rcka_native::dense_rbf, ops/stats.py's RBF CKA and HSIC from whole Grams (small n). Apart from
// two CPU loops (one prepares small inputs: centring and scaling, a dozen tiny ATen calls
// otherwise; one selects the median bandwidth's order statistics), only ATen ops are called, so
// the ops run on any device ATen does (CPU, CUDA via cuBLAS). A backward that runs with grad mode on (create_graph=True) differentiates a
// recomputation of the forward from the ATen pieces with autograd recording (forward_value,
// recomputed_grads), as ops/linear.py does, so that second derivatives are right.
//
// Python side: rcka_kernels/_native.py (guarded import), ops/linear.py and ops/stats.py (dispatch).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorIndexing.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace rcka_native {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kSmall = int64_t(1) << 16;  // entries below which op count, not memory traffic, sets the time
constexpr int64_t kCka = 0, kHsic = 1;        // the statistic argument

Tensor safe_reciprocal(const Tensor& s) {  // 1/s, and 0 where s = 0 (NaN data still reaches the inputs)
  return s.reciprocal().nan_to_num_(0.0, 0.0, c10::nullopt);
}

Tensor even(const Tensor& t) { return t.slice(0, 0, c10::nullopt, 2); }
Tensor odd(const Tensor& t) { return t.slice(0, 1, c10::nullopt, 2); }
Tensor mT(const Tensor& t) { return t.transpose(-2, -1); }

struct Scaled {
  Tensor u, s, inv;
};

// Groups z (B, n, f) centred (if asked), then times inv = 1/s, s = max |entry| per group.
// The first row is subtracted before the mean (``shifted``: it was), so a constant column is 0.
Scaled scale(Tensor z, bool centered, bool owned, bool shifted = false) {
  if (z.scalar_type() != at::kFloat && z.scalar_type() != at::kDouble) {
    z = z.to(at::kFloat);
    owned = true;
  }
  if (centered) {
    if (!shifted) {
      Tensor first = z.narrow(1, 0, 1);
      z = owned ? z.sub_(first.clone()) : z - first;
    }
    z.sub_(z.mean({1}, true));
  } else if (!owned) {
    z = z.clone();
  }
  Tensor s, inv;
  {
    at::NoGradGuard constants;  // s, inv: constants to autograd, as in Python
    s = z.numel() < kSmall ? z.abs().amax({1, 2}, true)
                           : at::maximum(z.amax({1, 2}, true), z.amin({1, 2}, true).neg_());
    inv = safe_reciprocal(s);
  }
  return {z.mul_(inv), s, inv};
}

struct Prepared {
  Tensor u, w, s, inv;  // w undefined: u (2G, n, p) holds each group's x and y side by side
};

// The small stacked cases on the CPU in one loop per matrix instead of ~9 ATen calls (at
// 64 x 100 their dispatch, not their arithmetic, is the time): u = ((z - z_0) - mean) / s,
// z_0 the first row, the column means summed in double; s = max |entry| (NaN when any
// entry is NaN); inv = 1/s, or 0 where that is not finite, as ``scale`` computes them.
// z is read with its strides (rs, cs), so a transposed view (RCKA's class axis) needs no copy.
bool cpu_loops = true;  // rcka_native::set_cpu_loops: tests run the ATen path on the CPU too

template <typename T>
void prepare_cpu_loop(const T* z, int64_t rs, int64_t cs, T* dst, T* s_out, T* inv_out, int64_t n, int64_t p,
                      bool centered) {
  std::vector<double> mean(centered ? p : 0);
  if (centered) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < p; ++j) mean[j] += double(z[i * rs + j * cs] - z[j * cs]);
    for (auto& m : mean) m /= double(n);
  }
  T s = 0;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < p; ++j) {
      const T u = centered ? T((z[i * rs + j * cs] - z[j * cs]) - T(mean[j])) : z[i * rs + j * cs];
      dst[i * p + j] = u;
      const T a = std::abs(u);
      nan = nan || std::isnan(a);
      s = a > s ? a : s;
    }
  }
  if (nan) s = std::numeric_limits<T>::quiet_NaN();
  T inv = T(1) / s;
  if (!std::isfinite(inv)) inv = 0;  // s = 0, NaN or too small to invert: as safe_reciprocal
  for (int64_t k = 0; k < n * p; ++k) dst[k] *= inv;
  *s_out = s;
  *inv_out = inv;
}

// Not while autograd records (a recomputation for second derivatives): the loop is not differentiable.
bool use_cpu_loop(const Tensor& x) {
  return cpu_loops && !at::GradMode::is_enabled() && x.device().is_cpu() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// x, y (..., n, p) into u (2G, n, p), each group's x and y side by side, with s, inv (2G, 1, 1).
Prepared prepare_cpu(const Tensor& x, const Tensor& y, bool centered) {
  const int64_t n = x.size(-2), p = x.size(-1);
  const std::array<Tensor, 2> src = {x.reshape({-1, n, p}), y.reshape({-1, n, p})};  // views, unless they cannot be
  const int64_t groups = src[0].size(0);
  Tensor z = at::empty({2 * groups, n, p}, x.options());
  Tensor s = at::empty({2 * groups, 1, 1}, x.options()), inv = at::empty({2 * groups, 1, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rcka_native_prepare", [&] {
    for (int64_t k = 0; k < 2 * groups; ++k) {
      const Tensor& a = src[k % 2];
      prepare_cpu_loop<scalar_t>(a.const_data_ptr<scalar_t>() + (k / 2) * a.stride(0), a.stride(1), a.stride(2),
                                 z.data_ptr<scalar_t>() + k * n * p, s.data_ptr<scalar_t>() + k,
                                 inv.data_ptr<scalar_t>() + k, n, p, centered);
    }
  });
  return {z, Tensor(), s, inv};
}

Prepared prepare(const Tensor& x, const Tensor& y, bool centered) {
  const int64_t n = x.size(-2);
  if (x.sizes() == y.sizes() && 2 * x.numel() < kSmall && use_cpu_loop(x)) return prepare_cpu(x, y, centered);
  if (x.sizes() == y.sizes() && 2 * x.numel() < kSmall) {
    const bool shift = centered && !at::GradMode::is_enabled() &&  // sub_out is not differentiable
                       (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
    Tensor z;
    if (shift) {  // stack and subtract the first rows in two ops
      auto shape = x.sizes().vec();
      shape.insert(shape.end() - 2, 2);
      z = at::empty(shape, x.options());
      Tensor zx = z.select(-3, 0), zy = z.select(-3, 1);
      at::sub_out(zx, x, x.narrow(-2, 0, 1));
      at::sub_out(zy, y, y.narrow(-2, 0, 1));
    } else {
      z = at::stack({x, y}, -3);
    }
    Scaled a = scale(z.view({-1, n, x.size(-1)}), centered, true, shift);
    return {a.u, Tensor(), a.s, a.inv};
  }
  Scaled a = scale(x.reshape({-1, n, x.size(-1)}), centered, false);
  Scaled b = scale(y.reshape({-1, n, y.size(-1)}), centered, false);
  return {a.u, b.u, at::stack({a.s, b.s}, 1).view({-1, 1, 1}), at::stack({a.inv, b.inv}, 1).view({-1, 1, 1})};
}

std::array<Tensor, 2> halves(const Prepared& p) {
  if (p.w.defined()) return {p.u, p.w};
  return {even(p.u), odd(p.u)};
}

Tensor sq_norm(const Tensor& m) {  // (G,) squared Frobenius norms of (G, a, b)
  return at::linalg_vector_norm(m, 2, at::IntArrayRef({-2, -1})).square();
}

Tensor gram_of_grams(const Tensor& kl, const Tensor& kk, const Tensor& ll) {
  return at::stack({kk, kl, kl, ll}, -1).view({-1, 2, 2});
}

// S (G, 2, 2) = [[<K,K>, <K,L>], [<L,K>, <L,L>]] and what the backward reuses:
// (K, L) in sample space, (X^T Y, X^T X, Y^T Y) in feature space (torch_backend.linear_stats_saving).
std::pair<Tensor, std::vector<Tensor>> plain_products(const Prepared& p, bool feature) {
  if (!p.w.defined()) {
    const int64_t g2 = p.u.size(0), n = p.u.size(1);
    if (feature) {
      Tensor c = at::bmm(mT(p.u), p.u);
      Tensor a = at::bmm(mT(even(p.u)), odd(p.u));
      Tensor kkll = sq_norm(c).view({-1, 2});
      return {gram_of_grams(sq_norm(a), kkll.select(1, 0), kkll.select(1, 1)), {a, even(c), odd(c)}};
    }
    Tensor kl = at::bmm(p.u, mT(p.u));
    Tensor fl = kl.view({g2 / 2, 2, n * n});
    return {at::bmm(fl, mT(fl)), {even(kl), odd(kl)}};
  }
  const Tensor &x = p.u, &y = p.w;
  if (feature) {
    Tensor a = at::bmm(mT(x), y), cx = at::bmm(mT(x), x), cy = at::bmm(mT(y), y);
    return {gram_of_grams(sq_norm(a), sq_norm(cx), sq_norm(cy)), {a, cx, cy}};
  }
  Tensor k = at::bmm(x, mT(x)), l = at::bmm(y, mT(y));
  return {gram_of_grams(at::linalg_vecdot(k.flatten(1), l.flatten(1)), sq_norm(k), sq_norm(l)), {k, l}};
}

constexpr int64_t kGramBlock = 512;  // torch_backend.GRAM_BLOCK

// torch_backend.gram64: u u^T (B, n, n) in float64, float32 products over blocks of max(kGramBlock, n)
// columns added in float64; one batched product per group or per block, whichever is fewer.
Tensor gram64(const Tensor& u) {
  const int64_t b = u.size(0), n = u.size(1), p = u.size(2), w = std::max(kGramBlock, n);
  if (u.scalar_type() == at::kDouble || p <= w) return at::bmm(u, mT(u)).to(at::kDouble);
  const int64_t full = p - p % w;
  Tensor k;
  if (b <= full / w) {
    std::vector<Tensor> out;
    for (int64_t g = 0; g < b; ++g) {
      Tensor blocks = u.select(0, g).narrow(1, 0, full).unfold(-1, w, w).transpose(0, 1);  // (p / w, n, w), a view
      out.push_back(at::bmm(blocks, mT(blocks)).to(at::kDouble).sum(0));
    }
    k = at::stack(out);
  } else {
    k = at::bmm(u.narrow(2, 0, w), mT(u.narrow(2, 0, w))).to(at::kDouble);
    for (int64_t i = w; i < full; i += w) k += at::bmm(u.narrow(2, i, w), mT(u.narrow(2, i, w))).to(at::kDouble);
  }
  if (full < p) {
    Tensor rest = u.narrow(2, full, p - full);
    k = k + at::bmm(rest, mT(rest)).to(at::kDouble);
  }
  return k;
}

// torch_backend.centre_nxn: the centring map on (G, n, n) matrices g, in place (g is returned): H g H,
// or with ``debiased`` the U-centring (zero diagonal, zero row sums).
Tensor centre_nxn_(Tensor g, bool debiased) {
  const int64_t n = g.size(-1);
  if (!debiased) {
    g.sub_(g.mean(-1, true));
    return g.sub_(g.mean(-2, true));
  }
  g.diagonal(0, -2, -1).zero_();
  Tensor rows = g.sum(-1, true), cols = g.sum(-2, true), total = g.sum(at::IntArrayRef({-2, -1}), true);
  g.sub_(rows, 1.0 / double(n - 2)).sub_(cols, 1.0 / double(n - 2)).add_(total, 1.0 / double((n - 1) * (n - 2)));
  g.diagonal(0, -2, -1).zero_();
  return g;
}

// torch_backend.debiased_products: S of the U-centred Grams (n (n-3) times the unbiased HSIC terms),
// which the backward uses in place of K, L.
std::pair<Tensor, std::vector<Tensor>> debiased_products(const Prepared& p) {
  const auto cd = p.u.scalar_type();
  if (!p.w.defined()) {
    Tensor ku = centre_nxn_(gram64(p.u), true);
    Tensor f = ku.view({-1, 2, ku.size(-1) * ku.size(-1)});
    ku = ku.to(cd);
    return {at::bmm(f, mT(f)).to(cd), {even(ku), odd(ku)}};
  }
  Tensor ku = centre_nxn_(gram64(p.u), true), lu = centre_nxn_(gram64(p.w), true);
  Tensor s = gram_of_grams(at::linalg_vecdot(ku.flatten(1), lu.flatten(1)), sq_norm(ku), sq_norm(lu)).to(cd);
  return {s, {ku.to(cd), lu.to(cd)}};
}

std::pair<double, double> debias_terms(int64_t n) {
  return {double(n) / double(n - 2), 1.0 / (double(n - 1) * double(n - 2))};
}

struct Products {
  Tensor s;
  std::vector<Tensor> saved;
  Tensor d, t;  // debiased in feature space: the diagonals (G, 2, n) and their sums (G, 2, 1)
};

// linear._products on the torch backend; debiased: n (n-3) times the unbiased HSIC terms
// (sample space: the U-centred Grams; feature space: linear.debias by the diagonals).
Products products(const Prepared& p, bool debiased) {
  const int64_t n = p.u.size(1);
  const bool feature = p.w.defined() ? p.u.size(2) + p.w.size(2) <= n : 2 * p.u.size(2) <= n;
  if (debiased && !feature) {
    auto pr = debiased_products(p);
    return {pr.first, pr.second, Tensor(), Tensor()};
  }
  auto pr = plain_products(p, feature);
  if (!debiased) return {pr.first, pr.second, Tensor(), Tensor()};
  Tensor d = p.w.defined() ? at::stack({at::linalg_vector_norm(p.u, 2, -1).square(),
                                        at::linalg_vector_norm(p.w, 2, -1).square()}, 1)
                           : at::linalg_vector_norm(p.u, 2, -1).square().view({-1, 2, n});
  Tensor t = d.sum(-1, true);
  auto c = debias_terms(n);
  Tensor s = at::add(pr.first, at::add(at::matmul(t, mT(t)), at::matmul(d, mT(d)), -c.first / c.second), c.second);
  return {s, pr.second, d, t};
}

double tiny(at::ScalarType t) {  // torch.finfo(t).tiny of the compute dtypes
  return t == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

// estimators.cka_scale: r = (kk ll)^(-1/2), which turns the cross term into CKA, in ``dtype``; ``guarded``:
// 0 where a self-term is not above that dtype's smallest normal number (estimators.self_term_ok).
Tensor cka_scale(const Tensor& kk, const Tensor& ll, at::ScalarType dtype, bool guarded) {
  Tensor r = (kk * ll).clamp_min(tiny(dtype)).rsqrt();
  return guarded ? at::where(at::minimum(kk, ll) > tiny(dtype), r, 0.0) : r;
}

struct Value {
  Tensor kk, ll, r, v;
};

// linear.value. v comes back in ``shape`` (the batch dims; a fresh tensor, not a view, so
// autograd wraps a plain output); kk, ll, r are (G, 1, 1). Out of place: autograd can record it.
Value value(const Tensor& s, const Tensor& scale_, int64_t statistic, int64_t n, bool debiased,
            at::IntArrayRef shape) {
  Tensor kk = s.narrow(1, 0, 1).narrow(2, 0, 1), kl = s.narrow(1, 0, 1).narrow(2, 1, 1),
         ll = s.narrow(1, 1, 1).narrow(2, 1, 1);
  Tensor r;
  if (statistic == kHsic) {  // (s_x s_y)^2 / estimators.normaliser(n, debiased)
    const double norm = debiased ? double(n) * double(n - 3) : double(n - 1) * double(n - 1);
    r = scale_.view({-1, 2}).prod(1).square().div(norm).view({-1, 1, 1});
  } else {
    r = cka_scale(kk, ll, s.scalar_type(), debiased);
  }
  return {kk, ll, r, at::mul(kl.view(shape), r.view(shape))};
}

// What one alignment's backward needs, as linear._LinearAlignment saves it: the prepared inputs h
// (undefined where not needed), 1/s, the value's terms, the diagonals d, t (debiased in feature space;
// else undefined) and the products the backward reuses.
struct State {
  std::array<Tensor, 2> h;
  Tensor inv, kk, ll, r, v, d, t;
  std::vector<Tensor> saved;

  void pack(variable_list& out) const {
    out.insert(out.end(), {h[0], h[1], inv, kk, ll, r, v, d, t});
    out.insert(out.end(), saved.begin(), saved.end());
  }
  static State unpack(variable_list::const_iterator it, variable_list::const_iterator end) {
    return {{it[0], it[1]}, it[2], it[3], it[4], it[5], it[6], it[7], it[8], std::vector<Tensor>(it + 9, end)};
  }
};

// linear._forward from the prepared inputs: products, value (in ``shape``) and what the backward keeps.
// need[i]: whether input i's gradient can be asked for (in sample space an input serves only its own).
State forward_state(const Prepared& p, int64_t statistic, bool debiased, int64_t n, at::IntArrayRef shape,
                    std::array<bool, 2> need) {
  Products prod = products(p, debiased);
  Value val = value(prod.s, p.s, statistic, n, debiased, shape);
  auto h = halves(p);
  if (prod.saved.size() == 2 && !prod.d.defined()) {
    for (int i = 0; i < 2; ++i)
      if (!need[i]) h[i] = Tensor();
  }
  return {h, p.inv, val.kk, val.ll, val.r, val.v, prod.d, prod.t, std::move(prod.saved)};
}

// The forward's value alone: what a backward differentiates, with autograd recording, when it runs
// with grad mode on (create_graph=True).
Tensor forward_value(const Tensor& x, const Tensor& y, int64_t statistic, bool centered, bool debiased) {
  return forward_state(prepare(x, y, centered), statistic, debiased, x.size(-2), x.sizes().slice(0, x.dim() - 2),
                       {true, true}).v;
}

// linear.recomputed_grads: the gradient of fn(inputs) for upstream gv, by autograd on a recomputation
// with a graph, so that it can be differentiated again; undefined where not needed.
template <typename Fn>
variable_list recomputed_grads(const variable_list& inputs, const Tensor& gv, const std::vector<bool>& need, Fn fn) {
  Tensor v;
  {
    at::AutoGradMode on(true);
    v = fn();
  }
  variable_list wanted;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (need[i]) wanted.push_back(inputs[i]);
  auto grads = torch::autograd::grad({v}, wanted, {gv}, std::nullopt, /*create_graph=*/true);
  variable_list out(inputs.size());
  for (size_t i = 0, k = 0; i < inputs.size(); ++i)
    if (need[i]) out[i] = grads[k++];
  return out;
}

// The backend products' vector-Jacobian product over gkl = dv/d<K,L>: with the ratio
// dv/d<K,K> = -gkl tf_x / 2 (CKA: tf_x = v r ll; tf undefined: 0),
//   dX / gkl = 2 L X - 2 tf_x K X   (feature space: 2 Y (X^T Y)^T - 2 tf_x X (X^T X)),
// dY likewise; the caller scales by gkl (one op on the result, none on the n x n inputs).
std::array<Tensor, 2> products_backward(const std::array<Tensor, 2>& h, const std::array<Tensor, 2>& tf,
                                        const std::vector<Tensor>& saved, const std::array<bool, 2>& need) {
  std::array<Tensor, 2> out;
  for (int i = 0; i < 2; ++i) {
    if (!need[i]) continue;
    const Tensor &self = h[i], &other = h[1 - i];
    if (saved.size() == 3) {
      const Tensor cross = i == 0 ? mT(saved[0]) : saved[0];
      Tensor d = at::baddbmm(self, other, cross, 0.0, 2.0);  // beta = 0: the input is ignored
      out[i] = tf[i].defined() ? d.baddbmm_(self, saved[1 + i] * tf[i], 1.0, -2.0) : d;
    } else {
      Tensor m = tf[i].defined() ? at::addcmul(saved[1 - i], saved[i], tf[i], -1.0) : saved[1 - i];
      out[i] = at::baddbmm(self, m, self, 0.0, 2.0);
    }
  }
  return out;
}

// linear.add_diagonal_grad, then the centring projection: the diagonals' share 2 (dv/dd_i) u_i, with
// dv/dd = -c1 gs d + c2 (gs t) 1', gs = [[2 gkk, gkl], [gkl, 2 gll]] = gkl [[-tf_x, 1], [1, -tf_y]].
void add_diagonal_grad(std::array<Tensor, 2>& grads, const State& st, const Tensor& gkl,
                       const std::array<Tensor, 2>& tf, bool centered) {
  auto c = debias_terms(st.d.size(-1));
  Tensor one = at::ones_like(gkl), zero = at::zeros_like(gkl);
  Tensor gs = at::cat({tf[0].defined() ? -tf[0] : zero, one, one, tf[1].defined() ? -tf[1] : zero}, 1)
                  .view({-1, 2, 2})
                  .mul_(gkl);
  Tensor gd = at::add(at::matmul(gs, st.t) * c.second, at::matmul(gs, st.d), -c.first);
  for (int i = 0; i < 2; ++i) {
    if (!grads[i].defined()) continue;
    grads[i].addcmul_(gd.select(1, i).unsqueeze(-1), st.h[i], 2.0);
    if (centered) grads[i].sub_(grads[i].mean({1}, true));  // the diagonals' share has nonzero column sums
  }
}

// linear._LinearAlignment.backward without grad mode: the gradients of grad * v with respect to the
// inputs, (G, n, p) and (G, n, q) in the compute dtype; undefined where need[i] is false.
std::array<Tensor, 2> backward_state(const State& st, const Tensor& grad, int64_t statistic, bool centered,
                                     std::array<bool, 2> need) {
  const bool one = need[0] != need[1];
  Tensor gv = grad.reshape({-1, 1, 1});
  if (one) gv = gv * st.inv.slice(0, need[0] ? 0 : 1, c10::nullopt, 2);  // the one input's 1/s, folded in
  Tensor gkl = gv * st.r;    // dv/d<K,L>
  std::array<Tensor, 2> tf;  // (dv/d<K,K>, dv/d<L,L>) = -gkl tf / 2
  if (statistic == kCka) {
    Tensor vr = st.v.view({-1, 1, 1}) * st.r;
    if (need[0] || st.d.defined()) tf[0] = vr * st.ll;
    if (need[1] || st.d.defined()) tf[1] = vr * st.kk;
  }
  auto grads = products_backward(st.h, tf, st.saved, need);
  for (auto& gi : grads) {
    if (gi.defined()) gi.mul_(gkl);
  }
  if (st.d.defined()) add_diagonal_grad(grads, st, gkl, tf, centered);
  if (need[0] && need[1]) {
    grads[0].mul_(even(st.inv));
    grads[1].mul_(odd(st.inv));
  }
  return grads;
}

// A gradient in the compute dtype, as the input it belongs to (its dtype and shape).
Tensor as_input(const Tensor& g, const Tensor& input) {
  return (g.scalar_type() == input.scalar_type() ? g : g.to(input.scalar_type())).view(input.sizes());
}

struct LinearAlignment : public torch::autograd::Function<LinearAlignment> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, int64_t statistic, bool centered,
                        bool debiased, bool need_x, bool need_y) {
    State st = forward_state(prepare(x, y, centered), statistic, debiased, x.size(-2),
                             x.sizes().slice(0, x.dim() - 2), {need_x, need_y});
    variable_list keep = {x, y};
    st.pack(keep);
    ctx->save_for_backward(keep);
    // one entry (each costs a hash-map insert): statistic, centered, debiased
    ctx->saved_data["meta"] = std::vector<int64_t>{statistic, centered, debiased};
    return st.v;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // a backward run inside autocast
    variable_list out(7);
    const std::array<bool, 2> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!need[0] && !need[1]) return out;
    auto sv = ctx->get_saved_variables();
    const auto meta = ctx->saved_data["meta"].toIntVector();
    const int64_t statistic = meta[0];
    const bool centered = meta[1] != 0, debiased = meta[2] != 0;
    const Tensor &x = sv[0], &y = sv[1];
    if (at::GradMode::is_enabled()) {  // create_graph=True: a gradient autograd can differentiate again
      auto g = recomputed_grads({x, y}, grad_out[0], {need[0], need[1]},
                                [&] { return forward_value(x, y, statistic, centered, debiased); });
      return {g[0], g[1], Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto grads = backward_state(State::unpack(sv.begin() + 2, sv.end()), grad_out[0], statistic, centered, need);
    for (int i = 0; i < 2; ++i) {
      if (grads[i].defined()) out[i] = as_input(grads[i], sv[i]);
    }
    return out;
  }
};

// ``check``: the caller's name, to raise ValueError in it when the value is NaN, which it is exactly
// when the input holds NaN or Inf (a CPU value is read in place; elsewhere this is one host
// synchronisation); the message is _validate.non_finite_error's. None: no check.
void check_not_nan(const Tensor& v, std::optional<c10::string_view> check) {
  if (!check.has_value()) return;
  bool nan = false;
  if (v.device().is_cpu() && v.is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "rcka_native_check", [&] {
      const scalar_t* p = v.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < v.numel(); ++i) nan = nan || std::isnan(p[i]);
    });
  } else {
    nan = at::isnan(v).any().item<bool>();
  }
  TORCH_CHECK_VALUE(!nan, std::string(*check),
                    ": input contains NaN or Inf (set rcka_kernels.config.check_finite = False to skip this check)");
}

Tensor linear_alignment(const Tensor& x, const Tensor& y, int64_t statistic, bool centered, bool debiased,
                        std::optional<c10::string_view> check) {
  const bool grad = at::GradMode::is_enabled();
  Tensor v = LinearAlignment::apply(x, y, statistic, centered, debiased, grad && x.requires_grad(),
                                    grad && y.requires_grad());
  check_not_nan(v, check);
  return v;
}

// ----------------------------------------------------------------------------- both axes of RCKA
//
// RCKA on logits (N, P) aligns the sample axis, A(xs, ys) (N x N relations), and the class axis,
// A(xc^T, yc^T) (P x P relations), A the linear CKA (centred) or the uncentred alignment. One autograd
// node for both, built from LinearAlignment's pieces (prepare, forward_state, backward_state), whose value
// is offset + ws A(xs, ys) + wc A(xc^T, yc^T) (the loss, as RCKALoss weighs it): the definition is
// ops/linear.axis_pair_alignment's two calls of the linear op, with the per-call overhead of the second
// node gone.
struct AxisPair : public torch::autograd::Function<AxisPair> {
  static Tensor forward(AutogradContext* ctx, const Tensor& xs, const Tensor& ys, const Tensor& xc, const Tensor& yc,
                        double ws, double wc, double offset, bool centered, std::array<bool, 4> need) {
    State s = forward_state(prepare(xs, ys, centered), kCka, false, xs.size(0), {}, {need[0], need[1]});
    State c = forward_state(prepare(mT(xc), mT(yc), centered), kCka, false, xc.size(1), {}, {need[2], need[3]});
    variable_list keep = {xs, ys, xc, yc};
    s.pack(keep);
    const int64_t split = static_cast<int64_t>(keep.size());  // where the class axis's state begins
    c.pack(keep);
    ctx->save_for_backward(keep);
    ctx->saved_data["w"] = std::vector<double>{ws, wc, offset};
    ctx->saved_data["meta"] = std::vector<int64_t>{centered, split};
    Tensor v = at::add(s.v * ws, c.v, wc);
    return offset != 0.0 ? v.add_(offset) : v;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // a backward run inside autocast
    auto sv = ctx->get_saved_variables();
    const auto w = ctx->saved_data["w"].toDoubleVector();
    const auto meta = ctx->saved_data["meta"].toIntVector();
    const bool centered = meta[0] != 0;
    const variable_list in(sv.begin(), sv.begin() + 4);
    variable_list out(9);
    if (at::GradMode::is_enabled()) {  // create_graph=True: the two axes' values, recomputed with autograd recording
      std::vector<bool> need;
      for (int i = 0; i < 4; ++i) need.push_back(ctx->needs_input_grad(i));
      auto g = recomputed_grads(in, grad_out[0], need, [&] {
        return forward_value(in[0], in[1], kCka, centered, false) * w[0] +
               forward_value(mT(in[2]), mT(in[3]), kCka, centered, false) * w[1] + w[2];
      });
      std::copy(g.begin(), g.end(), out.begin());
      return out;
    }
    for (int axis = 0; axis < 2; ++axis) {  // 0: the sample axis (xs, ys); 1: the class axis (xc^T, yc^T)
      const std::array<bool, 2> need = {ctx->needs_input_grad(2 * axis), ctx->needs_input_grad(2 * axis + 1)};
      if (!need[0] && !need[1]) continue;
      const auto from = sv.begin() + (axis == 0 ? 4 : meta[1]), to = axis == 0 ? sv.begin() + meta[1] : sv.end();
      auto g = backward_state(State::unpack(from, to), grad_out[0] * w[axis], kCka, centered, need);
      for (int i = 0; i < 2; ++i) {
        if (!g[i].defined()) continue;
        const Tensor& input = in[2 * axis + i];
        out[2 * axis + i] = axis == 0 ? as_input(g[i], input) : mT(as_input(g[i], mT(input)));
      }
    }
    return out;
  }
};

Tensor axis_pair_alignment(const Tensor& xs, const Tensor& ys, const Tensor& xc, const Tensor& yc, double ws,
                           double wc, double offset, bool centered, std::optional<c10::string_view> check) {
  const bool grad = at::GradMode::is_enabled();
  const std::array<bool, 4> need = {grad && xs.requires_grad(), grad && ys.requires_grad(),
                                    grad && xc.requires_grad(), grad && yc.requires_grad()};
  Tensor v = AxisPair::apply(xs, ys, xc, yc, ws, wc, offset, centered, need);
  check_not_nan(v, check);
  return v;
}

// ----------------------------------------------------------------------------- RBF CKA and HSIC, dense (small n)
//
// ops/stats.py's dense RBF path (_dense_value, _DenseRBF; they document the steps) natively: the Grams
// of x and y formed whole, HSIC of every pair from the centred Grams in float64, CKA, and the gradient in
// closed form with the value, the bandwidth a constant. Python's names are kept step by step.

constexpr int64_t kMedian = 0, kMean = 1, kGiven = 2;  // the rule argument (_native.RULES)

at::ScalarType compute_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// sigma^2: a float f, or t, (G, 2) or (G, 1) (stats.pair_sigma2's result)
struct Sigma2 {
  double f = 0.0;
  Tensor t;
};

// torch_backend._per_gram: the factor of Grams lo..hi of (G, k, n, n) tensors
Tensor per_gram(const Tensor& v, int64_t lo, int64_t hi) {
  return v.expand({-1, 2}).slice(1, lo, hi).unsqueeze(-1).unsqueeze(-1);
}

// torch_backend.stacked_rows
Tensor stacked_rows(const Tensor& x, const Tensor& y) {
  const int64_t p = x.size(-1), q = y.size(-1), w = std::max(p, q);
  Tensor a = p < w ? at::constant_pad_nd(x, {0, w - p}) : x, b = q < w ? at::constant_pad_nd(y, {0, w - q}) : y;
  return at::stack({a, b}, 1).to(compute_type(x)).flatten(0, 1);
}

// _validate.rows_equal
Tensor rows_equal(const Tensor& t) { return at::eq(t.amax(1), t.amin(1)).all(-1); }

// _bandwidth._select_dense on the CPU: the r[t]-th smallest strictly-upper entry of each of the m
// (n, n) matrices of d, into out (2, m), by std::nth_element over one matrix's entries at a time (the
// memory of those entries once, where kthvalue copies the whole batch and adds int64 indices); r[1]
// is r[0] or r[0] + 1, the smallest entry above the r[0]-th. NaN orders last, as kthvalue has it.
template <typename T>
void select_upper_cpu(const T* d, int64_t m, int64_t n, const int64_t r[2], T* out) {
  std::vector<T> buf(n * (n - 1) / 2);
  const auto less = [](T a, T b) { return a < b || (std::isnan(b) && !std::isnan(a)); };
  for (int64_t g = 0; g < m; ++g, d += n * n) {
    T* b = buf.data();
    for (int64_t i = 0; i < n; ++i) b = std::copy(d + i * n + i + 1, d + (i + 1) * n, b);
    std::nth_element(buf.begin(), buf.begin() + r[0], buf.end(), less);
    out[g] = buf[r[0]];
    out[m + g] = r[1] == r[0] ? buf[r[0]] : *std::min_element(buf.begin() + r[0] + 1, buf.end(), less);
  }
}

// _bandwidth.median_sq_distance with the distances d (M, n, n) given
Tensor median_sq_distance(const Tensor& d) {
  const int64_t n = d.size(1), m = d.size(0);
  const int64_t k[2] = {(n * n - 1) / 2, (n * n) / 2};
  const int64_t r[2] = {std::max<int64_t>(0, (k[0] - n) / 2), std::max<int64_t>(0, (k[1] - n) / 2)};
  Tensor v;
  if (cpu_loops && d.device().is_cpu() && d.is_contiguous()) {
    v = at::empty({2, m}, d.options());
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "rcka_native_select", [&] {
      select_upper_cpu<scalar_t>(d.const_data_ptr<scalar_t>(), m, n, r, v.mutable_data_ptr<scalar_t>());
    });
  } else {
    Tensor iu = at::triu_indices(n, n, 1, d.options().dtype(at::kLong));
    Tensor upper = d.index({at::indexing::Slice(), iu[0], iu[1]});
    v = at::stack({std::get<0>(upper.kthvalue(r[0] + 1, 1)), std::get<0>(upper.kthvalue(r[1] + 1, 1))});
  }
  for (int t = 0; t < 2; ++t) {
    if (k[t] < n) v[t].zero_();  // a diagonal zero
  }
  return (v[0] + v[1]) * 0.5;
}

// _bandwidth.sigma2 with the distances d (M, n, n) given, for "median" or "mean"
Tensor heuristic_sigma2(const Tensor& d, int64_t rule) {
  at::NoGradGuard no_grad;
  Tensor mean = d.mean(at::IntArrayRef({1, 2}));
  mean = at::where(mean > 0, mean, at::ones_like(mean));
  if (rule == kMean) return mean;
  Tensor med = median_sq_distance(d);
  return at::where(med > 0, med, mean);
}

// torch_backend.dense_rbf_grams: (KL (G, 2, n, n), sigma^2) of the centred stacked rows z (2G, n, P);
// a heuristic ``rule`` sets s2.t from the distances
std::pair<Tensor, Sigma2> dense_rbf_grams(const Tensor& z, Sigma2 s2, int64_t rule, bool zero_diagonal) {
  const int64_t n = z.size(1);
  Tensor d;
  {  // the products let go before the bandwidth's selection, which takes memory of its own
    Tensor gm = at::bmm(z, mT(z));
    Tensor sq = gm.diagonal(0, -2, -1);
    d = (sq.unsqueeze(-1) + sq.unsqueeze(-2)).sub_(gm, 2.0).clamp_min_(0.0).view({-1, 2, n, n});
  }
  if (rule != kGiven) s2.t = heuristic_sigma2(d.flatten(0, 1), rule).view({-1, 2});
  if (zero_diagonal) d.diagonal(0, -2, -1).fill_(std::numeric_limits<double>::infinity());
  Tensor kl = s2.t.defined() ? d.div_(per_gram(s2.t * -2.0, 0, 2)).exp_() : d.div_(-2.0 * s2.f).exp_();
  return {kl, s2};
}

// torch_backend.dense_rbf_backward: the gradients of the Grams lo..hi-1 in x and y, centred again
std::array<Tensor, 2> dense_rbf_backward(const Tensor& kl, const Tensor& x, const Tensor& y, const Sigma2& s2, Tensor dk,
                                         int64_t lo, int64_t hi) {
  Tensor m = dk.mul_(kl.slice(1, lo, hi));
  m = s2.t.defined() ? m.mul_(per_gram(s2.t.reciprocal() * 2.0, lo, hi)) : m.mul_(2.0 / s2.f);  // 4 gamma
  m.diagonal(0, -2, -1).sub_(m.sum(-1));
  m = m.to(kl.scalar_type());
  std::array<Tensor, 2> out;
  for (int64_t a = lo; a < hi; ++a) {
    Tensor t = (a == 0 ? x : y).to(kl.scalar_type());
    out[a] = at::bmm(m.select(1, a - lo), t - t.mean(1, true));
  }
  return out;
}

struct Dense {
  Tensor value, h;  // (G,) and the HSIC of every pair (G, 2, 2), float64
  std::array<Tensor, 2> grads;  // (G, n, p), (G, n, q) in the compute dtype; undefined where not needed
  Sigma2 s2;
};

// stats._dense_value
Dense dense_value(const Tensor& x, const Tensor& y, const Sigma2& s2_in, int64_t rule, bool debiased, bool cka,
                  std::array<bool, 2> need) {
  const int64_t n = x.size(1);
  const double norm = debiased ? double(n) * double(n - 3) : double(n - 1) * double(n - 1);
  Tensor degenerate, kl;
  Sigma2 s2;
  {  // z let go before the gradient, which centres the inputs it needs again
    Tensor z = stacked_rows(x, y);
    degenerate = rows_equal(z).view({-1, 2}).any(1);
    z.sub_(z.mean(1, true));
    std::tie(kl, s2) = dense_rbf_grams(z, s2_in, rule, debiased);
  }
  Tensor h;
  {
    Tensor c = centre_nxn_(kl.to(at::kDouble, false, true), debiased).flatten(2);
    h = at::bmm(c, mT(c)).div_(norm);
  }
  Tensor hs = h.view({-1, 4});
  Tensor hxx = hs.select(1, 0), hxy = hs.select(1, 1), hyy = hs.select(1, 3);
  Tensor value, w;
  if (cka) {  // estimators.cka with_scale
    Tensor r = at::where(degenerate, 0.0, cka_scale(hxx, hyy, compute_type(x), true));
    value = hxy * r + 0.0 * (hxy + hxx + hyy);
    Tensor minus = value * r * r;
    w = at::stack({-minus * hyy, r, r, -minus * hxx}, -1);
  } else {
    value = at::where(degenerate, 0.0, hxy);
    Tensor one = at::logical_not(degenerate).to(h.scalar_type()), zero = at::zeros_like(hxy);
    w = at::stack({zero, one, one, zero}, -1);
  }
  Dense out{value, h, {}, s2};
  if (!need[0] && !need[1]) return out;
  const int64_t lo = need[0] ? 0 : 1, hi = need[1] ? 2 : 1;
  Tensor wk = w.view({-1, 2, 2, 1, 1}).slice(1, lo, hi).div(norm);
  Tensor dk = centre_nxn_((kl.select(1, 0).unsqueeze(1) * wk.select(2, 0)).addcmul_(kl.select(1, 1).unsqueeze(1), wk.select(2, 1)),
                          debiased);
  out.grads = dense_rbf_backward(kl, x, y, s2, dk, lo, hi);
  return out;
}

Tensor groups(const Tensor& t) { return t.reshape({-1, t.size(-2), t.size(-1)}); }

// _validate.check_statistics: NaN/Inf read off the statistics h
void check_statistics(const Tensor& h, const Tensor& x, const Tensor& y, std::optional<c10::string_view> check) {
  if (!check.has_value() || std::isfinite(h.sum().item<double>())) return;
  const bool finite = at::isfinite(x).all().item<bool>() && at::isfinite(y).all().item<bool>();
  TORCH_CHECK_VALUE(finite, std::string(*check),
                    ": input contains NaN or Inf (set rcka_kernels.config.check_finite = False to skip this check)");
  TORCH_CHECK_VALUE(false, std::string(*check),
                    ": the inputs' squared distances overflow their dtype; scale the inputs down or pass float64");
}

// stats._DenseRBF
struct DenseRBF : public torch::autograd::Function<DenseRBF> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, Sigma2 s2, int64_t rule, bool debiased,
                        bool cka, bool need_x, bool need_y, std::optional<c10::string_view> check) {
    Dense d = dense_value(groups(x), groups(y), s2, rule, debiased, cka, {need_x, need_y});
    check_statistics(d.h, x, y, check);
    ctx->save_for_backward({x, y, d.grads[0], d.grads[1], d.s2.t});
    ctx->saved_data["s2"] = d.s2.f;
    ctx->saved_data["meta"] = std::vector<int64_t>{debiased, cka};
    return d.value.to(compute_type(x), false, true).view(x.sizes().slice(0, x.dim() - 2));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // a backward run inside autocast
    variable_list out(9);
    const std::array<bool, 2> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!need[0] && !need[1]) return out;
    auto sv = ctx->get_saved_variables();
    const Tensor &x = sv[0], &y = sv[1];
    const Sigma2 s2{ctx->saved_data["s2"].toDouble(), sv[4]};
    const auto meta = ctx->saved_data["meta"].toIntVector();
    if (at::GradMode::is_enabled()) {  // create_graph=True: the bandwidth a constant, as in the forward's gradient
      auto g = recomputed_grads({x, y}, grad_out[0], {need[0], need[1]}, [&] {
        Dense d = dense_value(groups(x), groups(y), s2, kGiven, meta[0] != 0, meta[1] != 0, {false, false});
        return d.value.to(compute_type(x)).view(x.sizes().slice(0, x.dim() - 2));
      });
      out[0] = g[0];
      out[1] = g[1];
      return out;
    }
    Tensor g = grad_out[0].reshape({-1, 1, 1});
    for (int i = 0; i < 2; ++i) {
      if (need[i]) out[i] = as_input(sv[2 + i] * g, sv[i]);
    }
    return out;
  }
};

// ``rule``: kMedian or kMean (the heuristic from the distances), or kGiven: sigma (one per group) if
// defined, else sigma_value
Tensor dense_rbf(const Tensor& x, const Tensor& y, const std::optional<Tensor>& sigma, double sigma_value, int64_t rule,
                 bool debiased, bool cka, std::optional<c10::string_view> check) {
  const bool grad = at::GradMode::is_enabled();
  Sigma2 s2{sigma_value * sigma_value, Tensor()};
  if (sigma.has_value() && sigma->defined()) {  // _bandwidth.sigma2(x, sigma)[:, None]
    Tensor s = sigma->detach().to(x.device(), compute_type(x)).reshape(-1);
    s2.t = (s * s).expand(x.numel() / (x.size(-2) * x.size(-1))).contiguous().unsqueeze(1);
  }
  return DenseRBF::apply(x, y, s2, rule, debiased, cka, grad && x.requires_grad(), grad && y.requires_grad(), check);
}

}  // namespace
}  // namespace rcka_native

void set_cpu_loops(bool on) { rcka_native::cpu_loops = on; }

TORCH_LIBRARY(rcka_native, m) {
  m.def("set_cpu_loops(bool on) -> ()", &set_cpu_loops);  // tests: the ATen path on CPU tensors too
  m.def("linear_alignment(Tensor x, Tensor y, int statistic, bool centered, bool debiased, str? check) -> Tensor");
  m.def("axis_pair_alignment(Tensor xs, Tensor ys, Tensor xc, Tensor yc, float ws, float wc, float offset, "
        "bool centered, str? check) -> Tensor");
  m.def("dense_rbf(Tensor x, Tensor y, Tensor? sigma, float sigma_value, int rule, bool debiased, bool cka, "
        "str? check) -> Tensor");
}

TORCH_LIBRARY_IMPL(rcka_native, CompositeImplicitAutograd, m) {
  m.impl("linear_alignment", &rcka_native::linear_alignment);
  m.impl("axis_pair_alignment", &rcka_native::axis_pair_alignment);
  m.impl("dense_rbf", &rcka_native::dense_rbf);
}

// A Python module with nothing in it: importing it registers the op above.
static struct PyModuleDef rcka_native_module = {PyModuleDef_HEAD_INIT, "_rcka_native", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__rcka_native(void) { return PyModule_Create(&rcka_native_module); }
