// Linear-kernel CKA, HSIC and the uncentred alignment as one native autograd op,
// rcka_native::linear_alignment: the same arithmetic as rcka_kernels/ops/linear.py
// (which documents it step by step), with the per-call Python gone: at the paper's
// batch sizes (64 x 100 logits) the Python autograd.Function doing the same work costs
// more in interpreter time than in arithmetic. Also here: rcka_native::axis_pair_alignment,
// RCKA's sample and class axes in one op. Apart from one CPU loop that prepares small
// inputs (centring and scaling, a dozen tiny ATen calls otherwise), only ATen ops are
// called, so the ops run on any device ATen does (CPU, CUDA via cuBLAS). A backward that
// runs with grad mode on (create_graph=True) differentiates a recomputation of the forward
// from the ATen pieces with autograd recording (forward_value, recomputed_grads), as
// ops/linear.py does, so that second derivatives are right.
//
// Python side: rcka_kernels/_native.py (guarded import), ops/linear.py (dispatch).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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
// centred over the rows (z_0 the first row, column means; ``over_rows``) or over the
// columns (z_0 the first column, row means), sums in double; s = max |entry| (NaN when any
// entry is NaN); inv = 1/s, or 0 where that is not finite, as ``scale`` computes them.
bool cpu_loops = true;  // rcka_native::set_cpu_loops: tests run the ATen path on the CPU too

template <typename T>
void prepare_cpu_loop(const T* src, T* dst, T* s_out, T* inv_out, int64_t n, int64_t p, bool centered,
                      bool over_rows) {
  std::vector<double> mean(centered ? (over_rows ? p : n) : 0);
  if (centered) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < p; ++j)
        mean[over_rows ? j : i] += double(src[i * p + j] - src[over_rows ? j : i * p]);
    for (auto& m : mean) m /= double(over_rows ? n : p);
  }
  T s = 0;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < p; ++j) {
      const T u = centered ? T((src[i * p + j] - src[over_rows ? j : i * p]) - T(mean[over_rows ? j : i]))
                           : src[i * p + j];
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

// Matrices srcs[k] (each ``groups`` contiguous (n, p) blocks) into z (groups * K, n, p)
// interleaved per group, with s, inv (groups * K, 1, 1); over_rows[k] as above.
void prepare_cpu_into(const std::vector<Tensor>& srcs, const std::vector<bool>& over_rows, const Tensor& z,
                      const Tensor& s, const Tensor& inv, int64_t groups, int64_t n, int64_t p, bool centered) {
  const int64_t k_count = static_cast<int64_t>(srcs.size());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rcka_native_prepare", [&] {
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t k = 0; k < k_count; ++k) {
        const int64_t slot = g * k_count + k;
        prepare_cpu_loop<scalar_t>(srcs[k].const_data_ptr<scalar_t>() + g * n * p, z.data_ptr<scalar_t>() + slot * n * p,
                                   s.data_ptr<scalar_t>() + slot, inv.data_ptr<scalar_t>() + slot, n, p, centered,
                                   over_rows[k]);
      }
    }
  });
}

Prepared prepare_cpu(const Tensor& x, const Tensor& y, bool centered) {
  const int64_t n = x.size(-2), p = x.size(-1), groups = x.numel() / (n * p);
  auto shape = x.sizes().vec();
  shape.insert(shape.end() - 2, 2);
  Tensor z = at::empty(shape, x.options());
  Tensor s = at::empty({2 * groups, 1, 1}, x.options()), inv = at::empty({2 * groups, 1, 1}, x.options());
  prepare_cpu_into({x.contiguous(), y.contiguous()}, {true, true}, z, s, inv, groups, n, p, centered);
  return {z.view({-1, n, p}), Tensor(), s, inv};
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

// torch_backend.centre_nxn(g, debiased=True): the U-centred matrices (zero diagonal, zero row sums).
Tensor u_centre(const Tensor& k) {
  const int64_t n = k.size(-1);
  Tensor eye = at::eye(n, k.options().dtype(at::kBool));
  Tensor g = k.masked_fill(eye, 0.0);
  Tensor u = g - g.sum(-1, true) / double(n - 2) - g.sum(-2, true) / double(n - 2) +
             g.sum(at::IntArrayRef({-2, -1}), true) / (double(n - 1) * double(n - 2));
  return u.masked_fill(eye, 0.0);
}

// torch_backend.debiased_products: S of the U-centred Grams (n (n-3) times the unbiased HSIC terms),
// which the backward uses in place of K, L.
std::pair<Tensor, std::vector<Tensor>> debiased_products(const Prepared& p) {
  const auto cd = p.u.scalar_type();
  if (!p.w.defined()) {
    Tensor ku = u_centre(gram64(p.u));
    Tensor f = ku.view({-1, 2, ku.size(-1) * ku.size(-1)});
    ku = ku.to(cd);
    return {at::bmm(f, mT(f)).to(cd), {even(ku), odd(ku)}};
  }
  Tensor ku = u_centre(gram64(p.u)), lu = u_centre(gram64(p.w));
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

double tiny(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

// estimators.cka_scale: r = (kk ll)^(-1/2), which turns the cross term into CKA; ``guarded``: 0 where a
// self-term is not above the dtype's smallest normal number (estimators.self_term_ok).
Tensor cka_scale(const Tensor& kk, const Tensor& ll, bool guarded) {
  Tensor r = (kk * ll).clamp_min(tiny(kk)).rsqrt();
  return guarded ? at::where(at::minimum(kk, ll) > tiny(kk), r, 0.0) : r;
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
    r = cka_scale(kk, ll, debiased);
  }
  return {kk, ll, r, at::mul(kl.view(shape), r.view(shape))};
}

// The forward's value alone (linear._forward): what a backward differentiates, with autograd
// recording, when it runs with grad mode on (create_graph=True).
Tensor forward_value(const Tensor& x, const Tensor& y, int64_t statistic, bool centered, bool debiased) {
  Prepared p = prepare(x, y, centered);
  Products pr = products(p, debiased);
  return value(pr.s, p.s, statistic, x.size(-2), debiased, x.sizes().slice(0, x.dim() - 2)).v;
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

struct LinearAlignment : public torch::autograd::Function<LinearAlignment> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, int64_t statistic, bool centered,
                        bool debiased, bool need_x, bool need_y) {
    Prepared p = prepare(x, y, centered);
    Products prod = products(p, debiased);
    Value val = value(prod.s, p.s, statistic, x.size(-2), debiased, x.sizes().slice(0, x.dim() - 2));
    auto h = halves(p);
    if (prod.saved.size() == 2 && !prod.d.defined()) {  // sample space: an input is used only for its own gradient
      if (!need_x) h[0] = Tensor();
      if (!need_y) h[1] = Tensor();
    }
    variable_list keep = {x, y, h[0], h[1], p.inv, val.kk, val.ll, val.r, val.v, prod.d, prod.t};
    keep.insert(keep.end(), prod.saved.begin(), prod.saved.end());
    ctx->save_for_backward(keep);
    // one entry (each costs a hash-map insert): statistic, centered, debiased, dtype
    ctx->saved_data["meta"] = std::vector<int64_t>{statistic, centered, debiased, static_cast<int64_t>(x.scalar_type())};
    return val.v;
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
    const auto dtype = static_cast<at::ScalarType>(meta[3]);
    const Tensor &x = sv[0], &y = sv[1];
    if (at::GradMode::is_enabled()) {  // create_graph=True: a gradient autograd can differentiate again
      auto g = recomputed_grads({x, y}, grad_out[0], {need[0], need[1]},
                                [&] { return forward_value(x, y, statistic, centered, debiased); });
      out[0] = g[0];
      out[1] = g[1];
      return out;
    }
    const std::array<Tensor, 2> h = {sv[2], sv[3]};
    const Tensor &inv = sv[4], &kk = sv[5], &ll = sv[6], &r = sv[7], &d = sv[9], &t = sv[10];
    const Tensor v = sv[8].view({-1, 1, 1});
    const std::vector<Tensor> saved(sv.begin() + 11, sv.end());
    const bool one = need[0] != need[1];
    Tensor gv = grad_out[0].reshape({-1, 1, 1});
    if (one) gv = gv * inv.slice(0, need[0] ? 0 : 1, c10::nullopt, 2);  // the one input's 1/s, folded in
    Tensor gkl = gv * r;  // dv/d<K,L>
    std::array<Tensor, 2> tf;  // (dv/d<K,K>, dv/d<L,L>) = -gkl tf / 2
    if (statistic == kCka) {
      Tensor vr = v * r;
      if (need[0] || d.defined()) tf[0] = vr * ll;
      if (need[1] || d.defined()) tf[1] = vr * kk;
    }
    auto grads = products_backward(h, tf, saved, need);
    for (auto& gi : grads) {
      if (gi.defined()) gi.mul_(gkl);
    }
    if (d.defined()) {  // the diagonals' share: 2 (dv/dd_i) u_i, dv/dd = -c1 gs d + c2 (gs t) 1'
      auto c = debias_terms(d.size(-1));
      Tensor one_ = at::ones_like(gkl);  // gs = gkl [[-tf_x, 1], [1, -tf_y]] = [[2 gkk, gkl], [gkl, 2 gll]]
      Tensor zero = at::zeros_like(gkl);
      Tensor gs = at::cat({tf[0].defined() ? -tf[0] : zero, one_, one_, tf[1].defined() ? -tf[1] : zero}, 1)
                      .view({-1, 2, 2})
                      .mul_(gkl);
      Tensor gd = at::add(at::matmul(gs, t) * c.second, at::matmul(gs, d), -c.first);
      for (int i = 0; i < 2; ++i) {
        if (!grads[i].defined()) continue;
        grads[i].addcmul_(gd.select(1, i).unsqueeze(-1), h[i], 2.0);
        if (centered) grads[i].sub_(grads[i].mean({1}, true));
      }
    }
    if (!one) {
      grads[0].mul_(even(inv));
      grads[1].mul_(odd(inv));
    }

    for (int i = 0; i < 2; ++i) {
      if (!grads[i].defined()) continue;
      Tensor gi = grads[i].scalar_type() == dtype ? grads[i] : grads[i].to(dtype);
      out[i] = gi.view((i == 0 ? x : y).sizes());
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
// RCKA on logits (N, P) aligns the sample axis (CKA of x, y: N x N relations) and the
// class axis (CKA of x^T, y^T: P x P relations). Both come from the four prepared
// matrices U = [xs, ys, xc, yc] (4, N, P): xs, ys centred over the samples (columns
// centred), xc, yc over the classes (rows centred), each scaled into [-1, 1]. With
// Q = U (N <= P) or U^T (N > P), Q is (4, m, k) with m = min(N, P), and every product
// is m x m: G = Q Q^T holds the Grams of one axis (the "Gram axis": the sample axis
// when N <= P) and the feature-space products X^T X of the other (the "cross axis"),
// which also needs C = Qx Qy^T. With F the Gram matrix of the flattened G (4 x 4):
//   Gram axis g:  kl = F[2g, 2g+1], kk = F[2g, 2g], ll = F[2g+1, 2g+1]
//   cross axis c: kl = |C|^2,        kk = F[2c, 2c], ll = F[2c+1, 2c+1]
// and the gradients in Q space are
//   dQx = (2 gkl Gy + 4 gkk Gx) Qx, dQy = (2 gkl Gx + 4 gll Gy) Qy           (Gram axis)
//   dQx = 4 gkk Gx Qx + 2 gkl C Qy,  dQy = 4 gll Gy Qy + 2 gkl C^T Qx        (cross axis)
// All of it is a handful of batched ops for both axes; the value returned is
// offset + ws v_sample + wc v_class (the loss, as RCKALoss weighs it).

struct AxisPair : public torch::autograd::Function<AxisPair> {
  static Tensor forward(AutogradContext* ctx, const Tensor& xs, const Tensor& ys, const Tensor& xc, const Tensor& yc,
                        double ws, double wc, double offset, bool centered) {
    const int64_t N = xs.size(0), P = xs.size(1);
    const bool half = xs.scalar_type() != at::kFloat && xs.scalar_type() != at::kDouble;
    Tensor z, inv;
    if (use_cpu_loop(xs)) {  // sample axis centred over the rows, class axis over the columns
      z = at::empty({4, N, P}, xs.options());
      Tensor s = at::empty({4, 1, 1}, xs.options());
      inv = at::empty({4, 1, 1}, xs.options());
      prepare_cpu_into({xs.contiguous(), ys.contiguous(), xc.contiguous(), yc.contiguous()}, {true, true, false, false},
                       z, s, inv, 1, N, P, centered);
    } else if (centered && !half) {  // stacked with the first row (sample axis) or column (class axis) subtracted
      z = at::empty({4, N, P}, xs.options());
      Tensor z0 = z.select(0, 0), z1 = z.select(0, 1), z2 = z.select(0, 2), z3 = z.select(0, 3);
      at::sub_out(z0, xs, xs.narrow(0, 0, 1));
      at::sub_out(z1, ys, ys.narrow(0, 0, 1));
      at::sub_out(z2, xc, xc.narrow(1, 0, 1));
      at::sub_out(z3, yc, yc.narrow(1, 0, 1));
    } else {
      z = at::stack({xs, ys, xc, yc}, 0);
      if (half) z = z.to(at::kFloat);
      if (centered) {
        Tensor a = z.narrow(0, 0, 2), b = z.narrow(0, 2, 2);
        a.sub_(a.narrow(1, 0, 1).clone());
        b.sub_(b.narrow(2, 0, 1).clone());
      }
    }
    if (!inv.defined()) {
      if (centered) {  // sample axis: over the rows; class axis: over the columns
        Tensor a = z.narrow(0, 0, 2), b = z.narrow(0, 2, 2);
        a.sub_(a.mean({1}, true));
        b.sub_(b.mean({2}, true));
      }
      inv = safe_reciprocal(z.abs().amax({1, 2}, true));
      z.mul_(inv);
    }
    const bool t = N > P;
    const int64_t g = t ? 1 : 0, c = 1 - g;
    Tensor q = t ? mT(z) : z;
    Tensor gram = at::bmm(q, mT(q));                                        // (4, m, m)
    Tensor cross = at::mm(q.select(0, 2 * c), mT(q.select(0, 2 * c + 1)));  // (m, m), contiguous
    Tensor fl = gram.view({1, 4, -1});
    Tensor f = at::bmm(fl, mT(fl)).view({4, 4});
    Tensor kkll = f.diagonal().view({2, 2});  // [[kk, ll] per axis]
    Tensor klg = f.select(0, 2 * g).select(0, 2 * g + 1);
    Tensor klc = at::dot(cross.view(-1), cross.view(-1));
    Tensor kl = g == 0 ? at::stack({klg, klc}) : at::stack({klc, klg});  // (2,): sample axis, class axis
    Tensor r = kkll.prod(1).clamp_min_(tiny(z)).rsqrt_();
    Tensor v = kl * r;
    Tensor loss = at::add(v.select(0, 0) * ws, v.select(0, 1), wc).add_(offset);
    ctx->save_for_backward({q, gram, cross, kkll, r, v, inv, xs, ys, xc, yc});
    ctx->saved_data["w"] = std::vector<double>{ws, wc, offset};
    ctx->saved_data["centered"] = centered;
    ctx->saved_data["g"] = g;
    ctx->saved_data["transposed"] = t;
    ctx->saved_data["dtype"] = static_cast<int64_t>(xs.scalar_type());
    return loss;
  }

  // For the inputs of one side p (0: the x's, 1: the y's) of both axes j, in Q space:
  //   dQ_jp = 2 [gkl_j [j = g] G_jq - gkl_j v_j r_j o_j G_jp] Q_jp + 2 gkl_j [j = c] C_p Q_jq
  // with q = 1 - p, o_j = ll_j (p = 0) or kk_j (p = 1), C_0 = C, C_1 = C^T, gkl = gl w r.
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // a backward run inside autocast
    auto sv = ctx->get_saved_variables();
    const Tensor &q = sv[0], &gram = sv[1], &cross = sv[2], &kkll = sv[3], &r = sv[4], &v = sv[5], &inv = sv[6];
    const auto w = ctx->saved_data["w"].toDoubleVector();
    variable_list out(8);
    if (at::GradMode::is_enabled()) {  // create_graph=True: the two axes' values, recomputed with autograd recording
      const variable_list in(sv.begin() + 7, sv.end());
      const bool centered = ctx->saved_data["centered"].toBool();
      std::vector<bool> need;
      for (int i = 0; i < 4; ++i) need.push_back(ctx->needs_input_grad(i));
      auto g = recomputed_grads(in, grad_out[0], need, [&] {
        return forward_value(in[0], in[1], kCka, centered, false) * w[0] +
               forward_value(mT(in[2]), mT(in[3]), kCka, centered, false) * w[1] + w[2];
      });
      std::copy(g.begin(), g.end(), out.begin());
      return out;
    }
    const int64_t g = ctx->saved_data["g"].toInt(), c = 1 - g;
    const bool transposed = ctx->saved_data["transposed"].toBool();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    Tensor wr = r * w[0];  // (2,) w_j r_j
    if (w[1] != w[0]) {
      if (w[0] != 0.0) {
        wr.narrow(0, 1, 1).mul_(w[1] / w[0]);
      } else {
        wr.narrow(0, 1, 1).copy_(r.narrow(0, 1, 1) * w[1]);
      }
    }
    Tensor gkl = wr * grad_out[0];
    Tensor svr = (v * r).mul_(gkl);  // gkl_j v_j r_j
    for (int64_t p = 0; p < 2; ++p) {
      if (!ctx->needs_input_grad(p) && !ctx->needs_input_grad(2 + p)) continue;
      const Tensor gp = gram.slice(0, p, c10::nullopt, 2), gq = gram.slice(0, 1 - p, c10::nullopt, 2);
      const Tensor qp = q.slice(0, p, c10::nullopt, 2), qq = q.slice(0, 1 - p, c10::nullopt, 2);
      Tensor a = gp * (svr * kkll.select(1, 1 - p)).neg_().view({2, 1, 1});
      a.narrow(0, g, 1).addcmul_(gq.narrow(0, g, 1), gkl.narrow(0, g, 1).view({1, 1, 1}));
      Tensor d = at::baddbmm(qp, a, qp, 0.0, 2.0);  // beta = 0: the input is ignored
      Tensor cp = (p == 0 ? cross : mT(cross)) * gkl.narrow(0, c, 1);
      d.narrow(0, c, 1).baddbmm_(cp.unsqueeze(0), qq.narrow(0, c, 1), 1.0, 2.0);
      d.mul_(inv.slice(0, p, c10::nullopt, 2));
      if (transposed) d = mT(d);  // dU = dQ^T
      if (d.scalar_type() != dtype) d = d.to(dtype);
      out[p] = d.select(0, 0);      // xs or ys
      out[2 + p] = d.select(0, 1);  // xc or yc
    }
    return out;
  }
};

// offset + ws CKA(xs, ys) + wc CKA(xc^T, yc^T) for (N, P) inputs (centered=False: the
// uncentred alignments); N, P >= 2 when centred.
Tensor axis_pair_alignment(const Tensor& xs, const Tensor& ys, const Tensor& xc, const Tensor& yc, double ws,
                           double wc, double offset, bool centered, std::optional<c10::string_view> check) {
  Tensor v = AxisPair::apply(xs, ys, xc, yc, ws, wc, offset, centered);
  check_not_nan(v, check);
  return v;
}

}  // namespace
}  // namespace rcka_native

void set_cpu_loops(bool on) { rcka_native::cpu_loops = on; }

TORCH_LIBRARY(rcka_native, m) {
  m.def("set_cpu_loops(bool on) -> ()", &set_cpu_loops);  // tests: the ATen path on CPU tensors too
  m.def("linear_alignment(Tensor x, Tensor y, int statistic, bool centered, bool debiased, str? check) -> Tensor");
  m.def("axis_pair_alignment(Tensor xs, Tensor ys, Tensor xc, Tensor yc, float ws, float wc, float offset, "
        "bool centered, str? check) -> Tensor");
}

TORCH_LIBRARY_IMPL(rcka_native, CompositeImplicitAutograd, m) {
  m.impl("linear_alignment", &rcka_native::linear_alignment);
  m.impl("axis_pair_alignment", &rcka_native::axis_pair_alignment);
}

// A Python module with nothing in it: importing it registers the op above.
static struct PyModuleDef rcka_native_module = {PyModuleDef_HEAD_INIT, "_rcka_native", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__rcka_native(void) { return PyModule_Create(&rcka_native_module); }
