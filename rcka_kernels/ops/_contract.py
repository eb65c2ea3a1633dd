"""What a backend implements: the sufficient statistics of HSIC, CKA and MMD.

Every backend (torch, triton, cuda) is a module listed in ``rcka_kernels._dispatch``
(``_LOADERS``; ``_dispatch.kernels(name)`` loads it) that provides the functions
below, with these exact signatures. The custom ops in ``rcka_kernels/ops/stats.py``
call them; the linear-kernel autograd op is ``rcka_kernels/ops/linear.py``; the step
from these statistics to HSIC and CKA lives once, in ``rcka_kernels/estimators.py``.
This module is documentation only: nothing imports it.

Conventions
- ``x`` is ``(G, n, p)`` and ``y`` is ``(G, n, q)`` (``(G, m, p)`` for MMD),
  contiguous, on one device, dtype float16, bfloat16, float32 or float64 (both
  the same). Inputs to the HSIC statistics are already column-centred by the
  caller (a translation changes neither distances nor centred Grams, and it
  removes the cancellation of the uncentred formulas).
- Accumulate in float32, or float64 for float64 inputs ("compute dtype");
  the scalar sums ``S`` are returned as float64, row sums in the compute dtype.
- ``gamma`` tensors are ``(G,)`` in the compute dtype: k(a, b) = exp(-gamma |a - b|^2).
- RBF sums leave the diagonal out: every RBF sum and row sum below runs over
  i != j only (k(x_i, x_i) = 1 is added back exactly by the caller). This keeps
  the unbiased estimators free of the cancellation S - n when K is close to I.
- Gradients are returned in the dtype of the input they belong to.

Functions
- ``linear_stats(x, y) -> S``: ``S[:, 0] = |X^T Y|_F^2``, ``S[:, 1] = |X^T X|_F^2``,
  ``S[:, 2] = |Y^T Y|_F^2`` (= sum_ij K_ij L_ij, sum K_ij^2, sum L_ij^2 for K = X X^T).
- ``linear_stats_backward(x, y, g) -> (dx, dy)``: vector-Jacobian product for
  ``g`` (G, 3) float64.
  The linear-kernel autograd op (``ops/linear.py``) calls these on inputs it has
  centred and scaled into [-1, 1]. The torch backend, which it calls directly,
  also takes the two inputs stacked (``x`` (2G, n, p), ``y`` None), returns S as
  the (G, 2, 2) Gram matrix of K and L with what its backward reuses
  (``linear_stats_saving``; ``debiased_products`` for the debiased estimator in
  sample space), and skips the gradient of an input not needed.
- ``rbf_stats(x, y, gamma_x, gamma_y) -> (S, rx, ry)``: ``S`` as above for the
  RBF Grams K, L but over i != j; ``rx_i = sum_{j != i} K_ij``, ``ry`` likewise (G, n).
- ``rbf_stats_backward(x, y, gamma_x, gamma_y, gS, grx, gry) -> (dx, dy)``.
  No n x n matrix may be saved between forward and backward: recompute.
- ``rbf_mmd_sums(x, y, gamma) -> S``: ``S[:, 0] = sum_{i != j} K_XX``,
  ``S[:, 1] = sum_{i != j} K_YY``, ``S[:, 2] = sum K_XY`` (all pairs) with one bandwidth.
- ``rbf_mmd_sums_backward(x, y, gamma, gS) -> (dx, dy)``.

Optional (``_dispatch.provides(name, member)``; the public functions fall back to
the torch backend's where a backend lacks it)
- ``centered_gram(x, kernel, gamma, debiased) -> (G, n, n)`` in the compute dtype:
  H K H, or the U-centred K (zero diagonal) if debiased; gamma (G,) for RBF.
"""
