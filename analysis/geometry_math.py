"""Exact factored geometry of LoRA updates: the math (docs/geometry.md,
"How it is computed"; the quantities are the seed paper's, arXiv 2606.23740 §2).

dW = s * B @ A (B: d_out x r, A: r x d_in) is never materialised; only d x r
and r x r products are formed, all in float64 (the float32 factors of a saved
adapter multiply exactly in float64; only accumulations round).

- Per adapter and module: orthonormal bases of B and A^T by Cholesky-QR run
  twice (CholeskyQR2, Fukaya et al. 2014: the second pass restores
  orthogonality to ~1e-16 for condition numbers up to ~1e7, where one pass
  leaves ~1e-16 cond^2), then the SVD of the r x r core s R_B R_A^T gives
  dW's singular values and its singular bases U (d_out x r), V (d_in x r).
- Per pair of a module, one float64 product of the pair's bases gives its
  r x r blocks U_a^T U_b, V_a^T V_b, hence <dW_a, dW_b>_F to ~1e-15
  relative. The orthogonal residual ||dW_b||^2 - <a,b>^2/||dW_a||^2 cancels
  for near-colinear pairs: with float32 blocks (1e-7) a gauge copy of one
  update read an orthogonal fraction of ~3e-4; in float64 it reads ~1e-8.
- Principal angles: cosines are the singular values of the top-k block
  U_a,k^T U_b,k; arccos loses accuracy near 0 (an error e in a cosine is an
  error sqrt(2e) in the angle), so where a pair has an angle under
  SINE_BELOW_DEG its angles under 45 degrees come from the sines, the singular
  values of the d x k residual U_b,k - U_a,k (U_a,k^T U_b,k) (Bjorck & Golub
  1973; scipy.linalg.subspace_angles does the same).
"""
from __future__ import annotations

import math

import numpy as np

# Eigenvalues of a factor's Gram below EIG_RTOL * largest are dropped: factor
# directions below ~1e-6 of the largest singular value are below the float32
# resolution of the stored factors.
EIG_RTOL = 1e-12
# Numerical rank of dW for the principal-angle cap: singular values above
# RANK_RTOL * s_1 (the float32 resolution of the stored factors).
RANK_RTOL = 1e-7
# Pairs whose smallest angle (from arccos) is under this get their small angles
# from sines (d x k work per pair): above it, a cosine error of 1e-13 moves an
# angle by < 1e-9 degree.
SINE_BELOW_DEG = 1.0


class NonFiniteFactors(ValueError):
    """Factors of these adapter indices hold NaN or inf."""

    def __init__(self, indices):
        super().__init__(f"non-finite LoRA factors at adapter indices {indices}")
        self.indices = indices


def _r_factor(gram):
    """For Grams g = X^T X (n, r, r, float64 torch on CPU): R with X = Q R,
    and P with Q = X P (orthonormal Q). Cholesky where it is well conditioned
    (Cholesky-QR), else an eigendecomposition that drops directions below
    EIG_RTOL (rank-deficient factors, e.g. B = 0 at peft's init)."""
    import torch

    low, info = torch.linalg.cholesky_ex(gram)
    diag2 = torch.diagonal(low, dim1=-2, dim2=-1) ** 2
    trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    # Cholesky only where every pivot is clear of round-off (lambda_max <= trace).
    ok = (info == 0) & (diag2.min(-1).values > EIG_RTOL * trace)
    r_fac = low.transpose(-1, -2).clone()  # upper triangular, R^T R = G
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype).expand_as(gram)
    p_fac = torch.linalg.solve_triangular(torch.where(ok[:, None, None], r_fac, eye), eye, upper=True)
    for i in torch.nonzero(~ok).flatten().tolist():
        lam, w = torch.linalg.eigh(gram[i])
        keep = (lam > EIG_RTOL * lam.max()) & (lam > 0)
        root = torch.sqrt(torch.where(keep, lam, torch.ones_like(lam)))
        r_fac[i] = torch.where(keep, root, torch.zeros_like(lam))[:, None] * w.T
        p_fac[i] = w * torch.where(keep, 1.0 / root, torch.zeros_like(lam))[None, :]
    return r_fac, p_fac


def _qr2(x, first_grams):
    """CholeskyQR2 of stacked d x r factors X (n, d, r), float64 torch: Q1 =
    X P1 from the Grams given, then Q1 = Q R2. Returns (Q1, P2, R = R2 R1):
    X = Q1 R1, Q = Q1 P2 orthonormal, X = Q R."""
    r1, p1 = _r_factor(first_grams)
    q1 = x @ p1.to(x.device)
    r2, p2 = _r_factor((q1.mT @ q1).cpu())
    return q1, p2, r2 @ r1


def _basis(mat, device):
    """One factor (d x r) as a float64 (1, d, r) tensor on device."""
    import torch

    return torch.as_tensor(mat).to(device=device, dtype=torch.float64)[None]


def singular_bases(factors, device=None):
    """Thin SVD of each dW_i = s_i B_i A_i without forming U, V: (sigma: list
    of (r_i,) numpy, U bases, V bases), a basis being a list of (Q_i, M_i) with
    U_i = Q_i M_i: Q_i (d_out, r_i) the first-pass Cholesky-QR basis of B_i (a
    torch tensor on device), M_i (r_i, r_i) numpy; the same for V with A_i^T.

    B = Q R_B, A^T = Q' R_A, so dW = Q (s R_B R_A^T) Q'^T and the SVD of the
    r x r core U_c S V_c^T gives dW's: U = Q U_c = Q_B P2_B U_c (Q = Q_B P2_B
    after the second pass). Cross Grams U_a^T U_b = M_a^T (Q_B,a^T Q_B,b) M_b.

    Each adapter is computed alone, at its own rank: batching adapters (or
    padding ranks to the table's largest) made an adapter's bits depend on
    which others were in the table (a batched GEMM's rounding follows its
    shape; a padded factor takes the eigendecomposition path)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    sigma, ub, vb, bad = [], [], [], []
    for i, (b, a, scale) in enumerate(factors):
        out = []
        for mat in (b, torch.as_tensor(a).T):
            x = _basis(mat, dev)
            gram = (x.mT @ x).cpu()
            # NaN/inf anywhere in a factor reaches its Gram: one r x r check.
            if not bool(torch.isfinite(gram).all()):
                break
            q1, p2, rf = _qr2(x, gram)
            out.append((q1[0], p2[0], rf[0]))
        if len(out) < 2:
            bad.append(i)
            continue
        (qb, p2b, rb), (qa, p2a, ra) = out
        uc, sg, vch = torch.linalg.svd(float(scale) * (rb @ ra.T))
        sigma.append(sg.numpy())
        ub.append((qb, (p2b @ uc).numpy()))
        vb.append((qa, (p2a @ vch.T).numpy()))
    if bad:
        raise NonFiniteFactors(bad)
    return sigma, ub, vb


def _columns(basis, i: int, p: int):
    """Adapter i's first p singular vectors (d x p torch) from [(Q, M)]."""
    import torch

    q, m = basis[i]
    return q @ torch.from_numpy(np.ascontiguousarray(m[:, :p])).to(q.device)


def numerical_rank(sigma: np.ndarray) -> int:
    s = np.asarray(sigma)
    return int(np.sum(s > RANK_RTOL * s[0])) if s.size and s[0] > 0 else 0


def factored_inner(b1, a1, b2, a2, *, scale_a: float = 1.0, scale_b: float = 1.0) -> float:
    """<s_a B1 A1, s_b B2 A2>_F from the r x r products only."""
    b1, a1, b2, a2 = (np.asarray(x, dtype=np.float64) for x in (b1, a1, b2, a2))
    return float(scale_a * scale_b * np.sum((b1.T @ b2) * (a1 @ a2.T)))


def factored_cosine(b1, a1, b2, a2, *, scale_a: float = 1.0, scale_b: float = 1.0) -> float:
    """Frobenius cosine of s_a B1 A1 and s_b B2 A2 (NaN if either is zero)."""
    ab = factored_inner(b1, a1, b2, a2, scale_a=scale_a, scale_b=scale_b)
    aa = factored_inner(b1, a1, b1, a1, scale_a=scale_a, scale_b=scale_a)
    bb = factored_inner(b2, a2, b2, a2, scale_a=scale_b, scale_b=scale_b)
    return ab / np.sqrt(aa * bb) if aa > 0 and bb > 0 else float("nan")


def factored_svd(b, a, *, scale: float = 1.0):
    """Thin SVD of s * B @ A without forming it: (U d_out x r, S (r,), Vh r x d_in)."""
    sigma, ub, vb = singular_bases([(np.asarray(b, np.float64), np.asarray(a, np.float64), scale)])
    r = len(sigma[0])
    return _columns(ub, 0, r).numpy(), sigma[0], _columns(vb, 0, r).numpy().T


def principal_angles(u_a, u_b) -> np.ndarray:
    """Principal angles (degrees, ascending) between the spans of two
    orthonormal column sets (arccos of the cosines; see _angles for the exact
    small-angle path the engine uses)."""
    c = np.linalg.svd(np.asarray(u_a, np.float64).T @ np.asarray(u_b, np.float64), compute_uv=False)
    return np.sort(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def module_geometry(factors, *, top_k: int = 10, pairs=None, device=None):
    """Geometry of one module across n adapters, in float64.

    factors: list of (B d_out x r_i, A r_i x d_in, scale) as torch tensors or
    arrays; ranks may differ. pairs: iterable of (i, j), i <= j, to compute
    (default: all i < j). Returns (sigma: list of (r_i,) arrays, results:
    {(i, j): (inner, angles_deg, u1_abs_dot, v1_abs_dot)}).

    Every number of a pair is computed from that pair's two adapters alone,
    with operands of the pair's own shapes: the same bits whatever else the
    table holds (the geometry cache reuses pairs across tables).
    """
    sigma, ub, vb = singular_bases(factors, device)
    kcap = [min(top_k, numerical_rank(s)) for s in sigma]
    todo = sorted({(min(i, j), max(i, j)) for i, j in
                   (pairs if pairs is not None else [(i, j) for i in range(len(factors))
                                                      for j in range(i + 1, len(factors))])})
    results = {}
    for i, j in todo:
        # U_i^T U_j = M_i^T (Q_i^T Q_j) M_j, and the same for V: (r_i, r_j)
        bu, bv = (m_i.T @ (q_i.T @ q_j).cpu().numpy() @ m_j
                  for (q_i, m_i), (q_j, m_j) in ((ub[i], ub[j]), (vb[i], vb[j])))
        # <dW_i, dW_j> = sum_kl s_ik s_jl (U_i^T U_j)_kl (V_i^T V_j)_kl, summed
        # exactly rounded (fsum): no order to depend on
        inner = math.fsum((sigma[i][:, None] * (bu * bv) * sigma[j][None, :]).ravel())
        live = kcap[i] > 0 and kcap[j] > 0
        results[(i, j)] = (inner, _angles(i, j, bu, kcap, ub),
                           float(abs(bu[0, 0])) if live else float("nan"),
                           float(abs(bv[0, 0])) if live else float("nan"))
    return sigma, results


def _angles(i, j, uu, kcap, ub) -> list[float]:
    """Principal angles (degrees, ascending) of pair (i, j) between the top-p
    left singular subspaces, p = min(top_k, rank_i, rank_j) (docs/geometry.md):
    the SVD of the top-p block for the cosines, and sines for a pair with a
    small angle."""
    import torch

    p = min(kcap[i], kcap[j])
    if p == 0:
        return []
    cos = np.linalg.svd(uu[:p, :p], compute_uv=False)  # descending
    rad = np.arccos(np.clip(cos, -1.0, 1.0))
    if rad[0] < np.radians(SINE_BELOW_DEG):
        # Sines: singular values of U_j,p - U_i,p (U_i,p^T U_j,p), the part of
        # one span outside the other, ascending (d x p work).
        ui, uj = _columns(ub, i, p), _columns(ub, j, p)
        blk = torch.from_numpy(np.ascontiguousarray(uu[:p, :p])).to(ui.device)
        sines = torch.linalg.svdvals(uj - ui @ blk).cpu().numpy()[::-1]
        rad = np.where(cos ** 2 >= 0.5, np.arcsin(np.clip(sines, 0.0, 1.0)), rad)
    return np.sort(np.degrees(rad)).tolist()


__all__ = ["module_geometry", "singular_bases", "factored_inner", "factored_cosine", "factored_svd",
           "principal_angles", "numerical_rank", "NonFiniteFactors"]
