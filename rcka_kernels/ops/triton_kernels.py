"""Triton kernels of the fused backend (the launchers live in triton_backend.py).

Every kernel works on a batch of groups in one launch: grid axis 0 enumerates
(group, tile) pairs, tile fastest (so neighbouring programs share a group's rows
in L2, and neither G nor the tile count hits the 65535 limit of axes 1 and 2);
backward kernels put the output column chunk on axis 1.
Gram tiles come from ``tl.dot`` over the feature axis with fp32 accumulation
(fp64 for fp64 inputs); squared distances add the squared row norms, computed
once per call by the launcher (``nx_ptr``/``ny_ptr``, (G, n) in the accumulation
dtype), so the loaded blocks feed the dot only and the loop pipelines.

Forward kernels write one partial sum per (group, tile) to a small workspace
that the launcher reduces in float64 with torch: deterministic, no atomics.
Backward kernels recompute tiles FlashAttention-style: one program owns a block
of output rows (and a chunk of output columns) and walks over all column
blocks; nothing n x n is stored.

Notation: ``BM`` rows per tile, ``BK`` features per dot step, ``DC`` output
columns per backward program; ``ACC`` is the accumulation dtype; ``PREC`` the
``input_precision`` of the Gram dots ("ieee" or "tf32", ignored for fp16/bf16/
fp64), ``PREC2`` that of the backward's weight @ rows product.
"""

import triton
import triton.language as tl


@triton.jit
def _gram_tile(a_ptr, b_ptr, sa, sb, rows, cols, na, nb, D,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr):
    """A_rows . B_cols^T (BM, BN) over D features; rows/cols out of range give 0.

    The loaded blocks feed the dot only (squared norms come precomputed), so they
    can stay in shared memory and the loop pipelines."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    ks = tl.arange(0, BK)
    rmask = rows < na
    cmask = cols < nb
    for k0 in range(0, D, BK):
        kk = k0 + ks
        kmask = kk < D
        a = tl.load(a_ptr + rows[:, None] * sa + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(b_ptr + cols[None, :] * sb + kk[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _rbf_tile(dot, na_ptr, nb_ptr, gamma, rows, cols, na, nb, same):
    """exp(-gamma |a_r - b_c|^2) from the dot tile and the squared row norms,
    0 outside the matrix and, in a same-matrix tile, exactly 0 on the diagonal:
    the contract's RBF sums run over i != j (the caller adds the unit diagonal
    back exactly)."""
    na2 = tl.load(na_ptr + rows, mask=rows < na, other=0.0)
    nb2 = tl.load(nb_ptr + cols, mask=cols < nb, other=0.0)
    d = na2[:, None] + nb2[None, :] - 2.0 * dot
    d = tl.maximum(d, 0.0)
    k = tl.exp(-gamma * d)
    keep = (rows[:, None] < na) & (cols[None, :] < nb) & ((rows[:, None] != cols[None, :]) | (not same))
    return tl.where(keep, k, 0.0)


# ----------------------------------------------------------------------------- HSIC forward


@triton.jit
def hsic_stats_fwd_kernel(
    x_ptr, y_ptr, nx_ptr, ny_ptr, gx_ptr, gy_ptr, ti_ptr, tj_ptr, s_ptr, w_ptr,
    N, P, Q, sxg, sxn, syg, syn, T, NB,
    IS_RBF: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Tile (i, j), j >= i, of the Grams K of x and L of y (RBF, or linear in sample space).

    s[g, t, :] = w (sum K*L, sum K*K, sum L*L) over the tile with w = 2 off the
    diagonal (symmetry). RBF only: w_ptr is (G, 2, NB, NB, BM) and receives the
    row sums of the tile at [g, 0, i, j] (K) / [g, 1, i, j] (L) and, off the
    diagonal, its column sums at [g, :, j, i]; summing over the 4th axis gives K 1, L 1.
    """
    pid = tl.program_id(0)
    t = pid % T
    g = (pid // T).to(tl.int64)
    i = tl.load(ti_ptr + t)
    j = tl.load(tj_ptr + t)
    r = tl.arange(0, BM)
    rows = i * BM + r
    cols = j * BM + r
    xg = x_ptr + g * sxg
    yg = y_ptr + g * syg
    kx = _gram_tile(xg, xg, sxn, sxn, rows, cols, N, N, P, BM, BM, BK, ACC, PREC)
    ky = _gram_tile(yg, yg, syn, syn, rows, cols, N, N, Q, BM, BM, BK, ACC, PREC)
    if IS_RBF:
        kx = _rbf_tile(kx, nx_ptr + g * N, nx_ptr + g * N, tl.load(gx_ptr + g), rows, cols, N, N, True)
        ky = _rbf_tile(ky, ny_ptr + g * N, ny_ptr + g * N, tl.load(gy_ptr + g), rows, cols, N, N, True)
    w = tl.where(i == j, 1.0, 2.0)
    sp = s_ptr + (g * T + t) * 3
    tl.store(sp + 0, w * tl.sum(tl.sum(kx * ky, 1), 0))
    tl.store(sp + 1, w * tl.sum(tl.sum(kx * kx, 1), 0))
    tl.store(sp + 2, w * tl.sum(tl.sum(ky * ky, 1), 0))
    if IS_RBF:
        wx = w_ptr + g * (2 * NB * NB * BM)
        wy = wx + NB * NB * BM
        tl.store(wx + (i * NB + j) * BM + r, tl.sum(kx, 1))
        tl.store(wy + (i * NB + j) * BM + r, tl.sum(ky, 1))
        if i != j:
            tl.store(wx + (j * NB + i) * BM + r, tl.sum(kx, 0))
            tl.store(wy + (j * NB + i) * BM + r, tl.sum(ky, 0))


# ----------------------------------------------------------------------------- HSIC backward


@triton.jit
def hsic_stats_bwd_kernel(
    x_ptr, y_ptr, nx_ptr, ny_ptr, gx_ptr, gy_ptr, gs_ptr, grx_ptr, gry_ptr, dx_ptr, dy_ptr,
    N, P, Q, sxg, sxn, syg, syn, sdxg, sdxn, sdyg, sdyn, NRB,
    IS_RBF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DC: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, PREC2: tl.constexpr,
):
    """Rows i*BM.. of dx and dy, columns c*DC.. (grid: groups x row blocks, column chunks).

    With M_K = (G_K + G_K^T) o K for G_K = dLoss/dK (2 gxy L + 4 gxx K + grx 1^T + 1 grx^T for RBF):
      RBF:    dx_i = -2 gamma_x (sum_j M_K,ij x_i - sum_j M_K,ij x_j)
      linear: dx_i = sum_j (2 gxy L + 4 gxx K)_ij x_j
    and the same for y with L. K and L tiles are recomputed, never stored.
    """
    pid = tl.program_id(0)
    ib = pid % NRB
    g = (pid // NRB).to(tl.int64)
    c = tl.program_id(1)
    rows = ib * BM + tl.arange(0, BM)
    rmask = rows < N
    ccols = c * DC + tl.arange(0, DC)
    xg = x_ptr + g * sxg
    yg = y_ptr + g * syg
    gxy = tl.load(gs_ptr + g * 3 + 0)
    gxx = tl.load(gs_ptr + g * 3 + 1)
    gyy = tl.load(gs_ptr + g * 3 + 2)
    gam_x = tl.load(gx_ptr + g)
    gam_y = tl.load(gy_ptr + g)
    if IS_RBF:
        grx_i = tl.load(grx_ptr + g * N + rows, mask=rmask, other=0.0)
        gry_i = tl.load(gry_ptr + g * N + rows, mask=rmask, other=0.0)
    acc_x = tl.zeros((BM, DC), dtype=ACC)
    acc_y = tl.zeros((BM, DC), dtype=ACC)
    rs_x = tl.zeros((BM,), dtype=ACC)
    rs_y = tl.zeros((BM,), dtype=ACC)
    for j0 in range(0, N, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < N
        kx = _gram_tile(xg, xg, sxn, sxn, rows, cols, N, N, P, BM, BN, BK, ACC, PREC)
        ky = _gram_tile(yg, yg, syn, syn, rows, cols, N, N, Q, BM, BN, BK, ACC, PREC)
        if IS_RBF:
            kx = _rbf_tile(kx, nx_ptr + g * N, nx_ptr + g * N, gam_x, rows, cols, N, N, True)
            ky = _rbf_tile(ky, ny_ptr + g * N, ny_ptr + g * N, gam_y, rows, cols, N, N, True)
            grx_j = tl.load(grx_ptr + g * N + cols, mask=cmask, other=0.0)
            gry_j = tl.load(gry_ptr + g * N + cols, mask=cmask, other=0.0)
            mk = (2.0 * gxy * ky + 4.0 * gxx * kx + grx_i[:, None] + grx_j[None, :]) * kx
            ml = (2.0 * gxy * kx + 4.0 * gyy * ky + gry_i[:, None] + gry_j[None, :]) * ky
            rs_x += tl.sum(mk, 1)
            rs_y += tl.sum(ml, 1)
        else:
            mk = 2.0 * gxy * ky + 4.0 * gxx * kx
            ml = 2.0 * gxy * kx + 4.0 * gyy * ky
        xj = tl.load(xg + cols[:, None] * sxn + ccols[None, :], mask=cmask[:, None] & (ccols[None, :] < P), other=0.0)
        yj = tl.load(yg + cols[:, None] * syn + ccols[None, :], mask=cmask[:, None] & (ccols[None, :] < Q), other=0.0)
        acc_x = tl.dot(mk, xj.to(ACC), acc_x, input_precision=PREC2, out_dtype=ACC)
        acc_y = tl.dot(ml, yj.to(ACC), acc_y, input_precision=PREC2, out_dtype=ACC)
    mx = rmask[:, None] & (ccols[None, :] < P)
    my = rmask[:, None] & (ccols[None, :] < Q)
    if IS_RBF:
        xi = tl.load(xg + rows[:, None] * sxn + ccols[None, :], mask=mx, other=0.0).to(ACC)
        yi = tl.load(yg + rows[:, None] * syn + ccols[None, :], mask=my, other=0.0).to(ACC)
        acc_x = -2.0 * gam_x * (rs_x[:, None] * xi - acc_x)
        acc_y = -2.0 * gam_y * (rs_y[:, None] * yi - acc_y)
    dxp = dx_ptr + g * sdxg + rows[:, None] * sdxn + ccols[None, :]
    dyp = dy_ptr + g * sdyg + rows[:, None] * sdyn + ccols[None, :]
    tl.store(dxp, acc_x.to(dx_ptr.dtype.element_ty), mask=mx)
    tl.store(dyp, acc_y.to(dy_ptr.dtype.element_ty), mask=my)


# ----------------------------------------------------------------------------- MMD


@triton.jit
def mmd_sums_fwd_kernel(
    x_ptr, y_ptr, nx_ptr, ny_ptr, gam_ptr, tab_ptr, s_ptr,
    N, M, D, sxg, sxn, syg, syn, T,
    BM: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Tile t of the table (kind, i, j): kind 0 = (X, X) and 1 = (Y, Y) with j >= i
    (off-diagonal tiles weighted 2), kind 2 = (X, Y). s[g, t] = w sum of the tile."""
    pid = tl.program_id(0)
    t = pid % T
    g = (pid // T).to(tl.int64)
    kind = tl.load(tab_ptr + t)
    i = tl.load(tab_ptr + T + t)
    j = tl.load(tab_ptr + 2 * T + t)
    if kind == 1:
        a_ptr = y_ptr + g * syg
        an_ptr = ny_ptr + g * M
        sa = syn
        na = M
    else:
        a_ptr = x_ptr + g * sxg
        an_ptr = nx_ptr + g * N
        sa = sxn
        na = N
    if kind == 0:
        b_ptr = x_ptr + g * sxg
        bn_ptr = nx_ptr + g * N
        sb = sxn
        nb = N
    else:
        b_ptr = y_ptr + g * syg
        bn_ptr = ny_ptr + g * M
        sb = syn
        nb = M
    r = tl.arange(0, BM)
    rows = i * BM + r
    cols = j * BM + r
    same = kind < 2
    dot = _gram_tile(a_ptr, b_ptr, sa, sb, rows, cols, na, nb, D, BM, BM, BK, ACC, PREC)
    k = _rbf_tile(dot, an_ptr, bn_ptr, tl.load(gam_ptr + g), rows, cols, na, nb, same)
    w = tl.where(same & (i != j), 2.0, 1.0)
    tl.store(s_ptr + g * T + t, w * tl.sum(tl.sum(k, 1), 0))


@triton.jit
def mmd_sums_bwd_kernel(
    x_ptr, y_ptr, nx_ptr, ny_ptr, gam_ptr, gs_ptr, dx_ptr, dy_ptr,
    N, M, D, sxg, sxn, syg, syn, sdxg, sdxn, sdyg, sdyn, NBX, NRB,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DC: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, PREC2: tl.constexpr,
):
    """Rows of dx (row blocks 0..NBX-1) or dy (the rest), columns c*DC...

    For a row a_i of A (X or Y) with "self" weight ws (2 gxx or 2 gyy) and the
    other sample B with weight gxy:
      dA_i = -2 gamma sum_j W_ij k(a_i, c_j) (a_i - c_j) over c in A (ws) and B (gxy).
    """
    pid = tl.program_id(0)
    rb = pid % NRB
    g = (pid // NRB).to(tl.int64)
    c = tl.program_id(1)
    gxx = tl.load(gs_ptr + g * 3 + 0)
    gyy = tl.load(gs_ptr + g * 3 + 1)
    gxy = tl.load(gs_ptr + g * 3 + 2)
    gam = tl.load(gam_ptr + g)
    if rb < NBX:
        a_ptr = x_ptr + g * sxg
        an_ptr = nx_ptr + g * N
        sa = sxn
        na = N
        b_ptr = y_ptr + g * syg
        bn_ptr = ny_ptr + g * M
        sb = syn
        nb = M
        ws = 2.0 * gxx
        o_ptr = dx_ptr + g * sdxg
        so = sdxn
        ib = rb
    else:
        a_ptr = y_ptr + g * syg
        an_ptr = ny_ptr + g * M
        sa = syn
        na = M
        b_ptr = x_ptr + g * sxg
        bn_ptr = nx_ptr + g * N
        sb = sxn
        nb = N
        ws = 2.0 * gyy
        o_ptr = dy_ptr + g * sdyg
        so = sdyn
        ib = rb - NBX
    rows = ib * BM + tl.arange(0, BM)
    rmask = rows < na
    ccols = c * DC + tl.arange(0, DC)
    cm = ccols < D
    acc = tl.zeros((BM, DC), dtype=ACC)
    rs = tl.zeros((BM,), dtype=ACC)
    for j0 in range(0, na, BN):
        cols = j0 + tl.arange(0, BN)
        dot = _gram_tile(a_ptr, a_ptr, sa, sa, rows, cols, na, na, D, BM, BN, BK, ACC, PREC)
        k = ws * _rbf_tile(dot, an_ptr, an_ptr, gam, rows, cols, na, na, True)
        rs += tl.sum(k, 1)
        aj = tl.load(a_ptr + cols[:, None] * sa + ccols[None, :], mask=(cols[:, None] < na) & cm[None, :], other=0.0)
        acc = tl.dot(k, aj.to(ACC), acc, input_precision=PREC2, out_dtype=ACC)
    for j0 in range(0, nb, BN):
        cols = j0 + tl.arange(0, BN)
        dot = _gram_tile(a_ptr, b_ptr, sa, sb, rows, cols, na, nb, D, BM, BN, BK, ACC, PREC)
        k = gxy * _rbf_tile(dot, an_ptr, bn_ptr, gam, rows, cols, na, nb, False)
        rs += tl.sum(k, 1)
        bj = tl.load(b_ptr + cols[:, None] * sb + ccols[None, :], mask=(cols[:, None] < nb) & cm[None, :], other=0.0)
        acc = tl.dot(k, bj.to(ACC), acc, input_precision=PREC2, out_dtype=ACC)
    m = rmask[:, None] & cm[None, :]
    ai = tl.load(a_ptr + rows[:, None] * sa + ccols[None, :], mask=m, other=0.0).to(ACC)
    out = -2.0 * gam * (rs[:, None] * ai - acc)
    tl.store(o_ptr + rows[:, None] * so + ccols[None, :], out.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- linear, feature space


@triton.jit
def linear_fro_fwd_kernel(
    x_ptr, y_ptr, tab_ptr, s_ptr,
    N, P, Q, sxg, sxn, syg, syn, T,
    BF: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Tile t = (kind, i, j) of a feature-space product C = A^T B summed over the
    n samples in BK steps, then squared and summed in registers (C is never
    written): kind 0 = X^T Y (all tiles), 1 = X^T X and 2 = Y^T Y (j >= i, weight 2
    off the diagonal). s[g, t] = w |C_tile|_F^2."""
    pid = tl.program_id(0)
    t = pid % T
    g = (pid // T).to(tl.int64)
    kind = tl.load(tab_ptr + t)
    i = tl.load(tab_ptr + T + t)
    j = tl.load(tab_ptr + 2 * T + t)
    if kind == 2:
        a_ptr = y_ptr + g * syg
        sa = syn
        da = Q
    else:
        a_ptr = x_ptr + g * sxg
        sa = sxn
        da = P
    if kind == 1:
        b_ptr = x_ptr + g * sxg
        sb = sxn
        db = P
    else:
        b_ptr = y_ptr + g * syg
        sb = syn
        db = Q
    fa = i * BF + tl.arange(0, BF)
    fb = j * BF + tl.arange(0, BF)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BF, BF), dtype=ACC)
    for k0 in range(0, N, BK):
        kk = k0 + ks
        km = kk < N
        at = tl.load(a_ptr + kk[None, :] * sa + fa[:, None], mask=km[None, :] & (fa[:, None] < da), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * sb + fb[None, :], mask=km[:, None] & (fb[None, :] < db), other=0.0)
        acc = tl.dot(at, b, acc, input_precision=PREC, out_dtype=ACC)
    w = tl.where((kind > 0) & (i != j), 2.0, 1.0)
    tl.store(s_ptr + g * T + t, w * tl.sum(tl.sum(acc * acc, 1), 0))


# ----------------------------------------------------------------------------- centred Gram


@triton.jit
def centered_gram_kernel(
    x_ptr, nx_ptr, gam_ptr, a_ptr, c_ptr, o_ptr,
    N, P, sxg, sxn, sog, son, T, NB,
    IS_RBF: tl.constexpr, DEBIASED: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Tile (i, j) = (t // NB, t % NB) of the centred Gram, written once, never read.

    K is the linear or RBF Gram (diagonal exactly 1 for RBF); a (G, n) and c (G,)
    come from pass 1: biased a = row means, c = their mean, out = K - a_i - a_j + c;
    debiased (U-centring) a = off-diagonal row sums / (n - 2), c = sum a / (n - 1),
    out = K - a_i - a_j + c off the diagonal and 0 on it."""
    pid = tl.program_id(0)
    t = pid % T
    g = (pid // T).to(tl.int64)
    i = t // NB
    j = t % NB
    r = tl.arange(0, BM)
    rows = i * BM + r
    cols = j * BM + r
    xg = x_ptr + g * sxg
    k = _gram_tile(xg, xg, sxn, sxn, rows, cols, N, N, P, BM, BM, BK, ACC, PREC)
    diag = rows[:, None] == cols[None, :]
    if IS_RBF:
        k = _rbf_tile(k, nx_ptr + g * N, nx_ptr + g * N, tl.load(gam_ptr + g), rows, cols, N, N, True)
        k = tl.where(diag, 1.0, k)
    rmask = rows < N
    cmask = cols < N
    ai = tl.load(a_ptr + g * N + rows, mask=rmask, other=0.0)
    aj = tl.load(a_ptr + g * N + cols, mask=cmask, other=0.0)
    c = tl.load(c_ptr + g)
    out = k - ai[:, None] - aj[None, :] + c
    if DEBIASED:
        out = tl.where(diag, 0.0, out)
    op = o_ptr + g * sog + rows.to(tl.int64)[:, None] * son + cols[None, :]
    tl.store(op, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
