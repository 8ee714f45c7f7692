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
- Across the adapters of a module, one stacked float64 product gives every
  pair's r x r blocks U_a^T U_b, V_a^T V_b, hence <dW_a, dW_b>_F to ~1e-15
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

from collections import defaultdict

import numpy as np

# Eigenvalues of a factor's Gram below EIG_RTOL * largest are dropped: factor
# directions below ~1e-6 of the largest singular value are below the float32
# resolution of the stored factors.
EIG_RTOL = 1e-12
# Numerical rank of dW for the principal-angle cap: singular values above
# RANK_RTOL * s_1 (the float32 resolution of the stored factors).
RANK_RTOL = 1e-7
# Rows of Gram blocks per GEMM: taller GEMMs run ~1.4x faster than one row at a time.
ROW_BLOCK = 8
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
    EIG_RTOL (rank-deficient factors, e.g. B = 0 at peft's init, or rank
    padding)."""
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


def _stacked(mats, r: int, device):
    """Factors (d x r_i) as one float64 (n, d, r) tensor on device, ranks
    padded to r with zero columns (zero columns change no dW)."""
    import torch

    out = torch.zeros((len(mats), mats[0].shape[0], r), dtype=torch.float64, device=device)
    for i, m in enumerate(mats):
        out[i, :, :m.shape[1]] = torch.as_tensor(m).to(device)
    return out


def singular_bases(factors, device=None):
    """Batched thin SVD of dW_i = s_i B_i A_i without forming U, V: (sigma (n,
    r) numpy, (Q_B, M), (Q_A, N)) with dW_i's singular bases U_i = Q_B,i M_i,
    V_i = Q_A,i N_i (columns by descending singular value). Q_B (d_out, n r),
    Q_A (d_in, n r): the first-pass Cholesky-QR bases of the factors, stacked
    (adapter i in columns i r .. (i + 1) r, ranks padded to the largest r with
    zero columns); M, N (n, r, r) numpy.

    B = Q R_B, A^T = Q' R_A, so dW = Q (s R_B R_A^T) Q'^T and the SVD of the
    r x r core U_c S V_c^T gives dW's: U = Q U_c = Q_B P2_B U_c (Q = Q_B P2_B
    after the second pass). Cross Grams U_a^T U_b = M_a^T (Q_B,a^T Q_B,b) M_b
    are then r x r work on top of one stacked GEMM of the Q_B."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    n, r = len(factors), max(int(f[0].shape[1]) for f in factors)
    q1s, p2s, rs = [], [], []
    for mats in ([f[0] for f in factors], [torch.as_tensor(f[1]).T for f in factors]):
        x = _stacked(mats, r, dev)
        gram = (x.mT @ x).cpu()
        # NaN/inf anywhere in a factor reaches its Gram: one r x r check per adapter.
        bad = torch.nonzero(~torch.isfinite(gram).reshape(n, -1).all(-1)).flatten().tolist()
        if bad:
            raise NonFiniteFactors(bad)
        q1, p2, rf = _qr2(x, gram)
        del x
        q1s.append(q1.permute(1, 0, 2).reshape(q1.shape[1], n * r))  # (n, d, r) -> (d, n r)
        p2s.append(p2)
        rs.append(rf)
        del q1
    scale = torch.tensor([float(f[2]) for f in factors], dtype=torch.float64)
    uc, sigma, vch = torch.linalg.svd(scale[:, None, None] * (rs[0] @ rs[1].transpose(-1, -2)))
    return sigma.numpy(), (q1s[0], (p2s[0] @ uc).numpy()), (q1s[1], (p2s[1] @ vch.mT).numpy())


def _columns(basis, i: int, r: int, p: int):
    """Adapter i's first p singular vectors (d x p torch) from (Q, M)."""
    import torch

    q, m = basis
    return q[:, i * r:(i + 1) * r] @ torch.from_numpy(np.ascontiguousarray(m[i][:, :p])).to(q.device)


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
    return _columns(ub, 0, r, r).numpy(), sigma[0], _columns(vb, 0, r, r).numpy().T


def principal_angles(u_a, u_b) -> np.ndarray:
    """Principal angles (degrees, ascending) between the spans of two
    orthonormal column sets (arccos of the cosines; see _angles for the exact
    small-angle path the engine uses)."""
    c = np.linalg.svd(np.asarray(u_a, np.float64).T @ np.asarray(u_b, np.float64), compute_uv=False)
    return np.sort(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def module_geometry(factors, *, top_k: int = 10, pairs=None, device=None):
    """Geometry of one module across n adapters, batched, in float64.

    factors: list of (B d_out x r_i, A r_i x d_in, scale) as torch tensors or
    arrays; ranks may differ (padded with zero columns/rows, which change no
    dW). pairs: iterable of (i, j), i <= j, to compute (default: all i < j).
    Returns (sigma: list of (r_i,) arrays, results: {(i, j): (inner,
    angles_deg, u1_abs_dot, v1_abs_dot)}).
    """

    n = len(factors)
    ranks = [int(f[0].shape[1]) for f in factors]
    r = max(ranks)
    sigma, ub, vb = singular_bases(factors, device)
    kcap = [min(top_k, numerical_rank(s)) for s in sigma]
    k = min(top_k, r)

    want = defaultdict(set)
    for i, j in (pairs if pairs is not None else [(i, j) for i in range(n) for j in range(i + 1, n)]):
        want[min(i, j)].add(max(i, j))
    results = {}
    rows = sorted(want)
    for g in range(0, len(rows), ROW_BLOCK):
        # A block of rows [r0, r1] against columns [c0, n): c0 is the first
        # wanted partner (the caller orders adapters so that cached pairs fall
        # before it). Blocks of rows keep the GEMMs efficient.
        r0, r1 = rows[g], rows[min(g + ROW_BLOCK, len(rows)) - 1]
        c0 = min(min(want[i]) for i in rows[g:g + ROW_BLOCK])
        gu, gv = ((q[:, r0 * r:(r1 + 1) * r].T @ q[:, c0 * r:]).cpu().numpy().reshape(r1 + 1 - r0, r, n - c0, r)
                  for q, _ in (ub, vb))
        for i in rows[g:g + ROW_BLOCK]:
            jj = sorted(want[i])
            sel = np.array(jj) - c0
            # U_i^T U_j = M_i^T (Q_i^T Q_j) M_j, and the same for V: (len(jj), r, r)
            bu, bv = (m[i].T @ x[i - r0].transpose(1, 0, 2)[sel] @ m[jj] for x, (_, m) in ((gu, ub), (gv, vb)))
            # <dW_i, dW_j> = sum_kl s_ik s_jl (U_i^T U_j)_kl (V_i^T V_j)_kl
            inner = np.einsum("k,mkl,ml->m", sigma[i], bu * bv, sigma[jj])
            angles = _angles(i, jj, bu[:, :k, :k], kcap, ub, r)
            for off, j in enumerate(jj):
                live = kcap[i] > 0 and kcap[j] > 0
                results[(i, j)] = (float(inner[off]), angles[off],
                                   float(abs(bu[off, 0, 0])) if live else float("nan"),
                                   float(abs(bv[off, 0, 0])) if live else float("nan"))
    return [sigma[i][:ranks[i]] for i in range(n)], results


def _angles(i, jj, uu, kcap, ub, r) -> list[list[float]]:
    """Principal angles (degrees, ascending) of row i's pairs between the top-p
    left singular subspaces, p = min(top_k, rank_i, rank_j) (docs/geometry.md):
    one batched SVD per p for the cosines, and sines for pairs with a small angle."""
    import torch

    p_of = np.array([min(kcap[i], kcap[j]) for j in jj])
    out = [[] for _ in jj]
    for p in set(p_of.tolist()) - {0}:
        hit = np.flatnonzero(p_of == p)
        cos = np.linalg.svd(uu[hit, :p, :p], compute_uv=False)  # (m, p), descending
        rad = np.arccos(np.clip(cos, -1.0, 1.0))
        small = hit[rad[:, 0] < np.radians(SINE_BELOW_DEG)]
        if small.size:
            # Sines: singular values of U_j,p - U_i,p (U_i,p^T U_j,p), the part of
            # one span outside the other, ascending (d x p per pair, batched).
            ui = _columns(ub, i, r, p)
            uj = torch.stack([_columns(ub, jj[h], r, p) for h in small])  # (m, d, p)
            blk = torch.from_numpy(np.ascontiguousarray(uu[small, :p, :p])).to(ui.device)
            sines = torch.linalg.svdvals(uj - ui @ blk).cpu().numpy()[:, ::-1]
            at = np.searchsorted(hit, small)
            rad[at] = np.where(cos[at] ** 2 >= 0.5, np.arcsin(np.clip(sines, 0.0, 1.0)), rad[at])
        deg = np.sort(np.degrees(rad), axis=-1)
        for h, d in zip(hit, deg):
            out[h] = d.tolist()
    return out


__all__ = ["module_geometry", "singular_bases", "factored_inner", "factored_cosine", "factored_svd",
           "principal_angles", "numerical_rank", "NonFiniteFactors"]
