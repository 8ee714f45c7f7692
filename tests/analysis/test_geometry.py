"""Factored geometry math vs a dense float64 reference and scipy.

Random LoRA factors with uneven spectra (singular values spread over two
decades per factor); the reference materialises dW = s B A in float64 and uses
numpy's SVD and scipy.linalg.subspace_angles. The helpers here also build
adapter folders for tests/test_geometry_*.py.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.linalg
from wsg.analysis.geometry import (
    factored_cosine,
    factored_inner,
    factored_svd,
    module_geometry,
    numerical_rank,
    principal_angles,
)
from wsg.analysis.geometry_tables import effective_rank

# Tiny "model": d_out x d_in per projection (q/o differ from k/v like GQA).
SHAPES = {"q_proj": (24, 16), "k_proj": (8, 16), "v_proj": (8, 16), "o_proj": (16, 24)}
LAYERS = 2


def uneven(rng, rows, cols, decades=2.0):
    """A random rows x cols matrix whose singular values span `decades`."""
    k = min(rows, cols)
    q1, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    q2, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (q1 * np.logspace(0, -decades, k)) @ q2.T


def rand_lora(rng, d_out, d_in, r):
    return uneven(rng, d_out, r), uneven(rng, r, d_in)


def dense(b, a, s=1.0):
    return s * np.asarray(b, np.float64) @ np.asarray(a, np.float64)


def ref_angles(wa, wb, k):
    """Reference principal angles (degrees, ascending) between the top-p left
    singular subspaces, p = min(k, rank_a, rank_b) (docs/geometry.md)."""
    ua = np.linalg.svd(wa, full_matrices=False)[0]
    ub = np.linalg.svd(wb, full_matrices=False)[0]
    p = min(k, np.linalg.matrix_rank(wa), np.linalg.matrix_rank(wb))
    return np.sort(np.degrees(scipy.linalg.subspace_angles(ua[:, :p], ub[:, :p])))


def write_adapter(folder, factors, *, r, alpha, rslora=False, rank_pattern=None, alpha_pattern=None,
                  dtype="float32"):
    """A PEFT-format folder: factors[(layer, proj)] = (B, A)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for (layer, proj), (b, a) in factors.items():
        key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
        tensors[f"{key}.lora_A.weight"] = torch.tensor(np.asarray(a), dtype=getattr(torch, dtype))
        tensors[f"{key}.lora_B.weight"] = torch.tensor(np.asarray(b), dtype=getattr(torch, dtype))
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
           "target_modules": sorted(SHAPES), "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def random_factors(rng, r, shapes=SHAPES, layers=LAYERS):
    return {(i, p): rand_lora(rng, *shapes[p], r) for i in range(layers) for p in shapes}


def stored(x):
    """What a float32 file gives back."""
    return np.asarray(x, np.float32).astype(np.float64)


# --- tests ---------------------------------------------------------------------------
def test_effective_rank_hand_examples():
    assert effective_rank([1.0, 1.0, 0.0]) == pytest.approx(2.0)
    p = np.array([0.75, 0.25])
    assert effective_rank([3.0, 1.0]) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert np.isnan(effective_rank([0.0, 0.0]))


def test_factored_inner_and_cosine_match_dense():
    rng = np.random.default_rng(0)
    b1, a1 = rand_lora(rng, 40, 30, 6)
    b2, a2 = rand_lora(rng, 40, 30, 3)  # different rank
    b2 = b2 + 0.5 * b1[:, :3]  # correlated, so the cosine is far from 0
    w1, w2 = dense(b1, a1, 2.0), dense(b2, a2, 0.7)
    assert factored_inner(b1, a1, b2, a2, scale_a=2.0, scale_b=0.7) == pytest.approx(np.sum(w1 * w2), rel=1e-12)
    ref = np.sum(w1 * w2) / np.linalg.norm(w1) / np.linalg.norm(w2)
    assert factored_cosine(b1, a1, b2, a2, scale_a=2.0, scale_b=0.7) == pytest.approx(ref, rel=1e-12)
    assert np.isnan(factored_cosine(np.zeros_like(b1), a1, b2, a2))


def test_factored_svd_matches_dense_svd():
    rng = np.random.default_rng(1)
    b, a = rand_lora(rng, 50, 36, 8)
    w = dense(b, a, 1.5)
    u, s, vh = factored_svd(b, a, scale=1.5)
    ud, sd, vhd = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(s, sd[:8], rtol=1e-9)
    np.testing.assert_allclose(u @ np.diag(s) @ vh, w, atol=1e-12)
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(u * ud[:, :8], axis=0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(vh * vhd[:8], axis=1)), 1.0, atol=1e-8)


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(2)
    qa = np.linalg.qr(rng.standard_normal((30, 5)))[0]
    qb = np.linalg.qr(qa[:, :5] + 0.4 * rng.standard_normal((30, 5)))[0]
    ref = np.sort(np.degrees(scipy.linalg.subspace_angles(qa, qb)))
    np.testing.assert_allclose(principal_angles(qa, qb), ref, atol=1e-8)
    assert ref[-1] > 5 and ref[0] > 0.1  # non-trivial angles


def test_gauge_copy_has_cosine_one_and_zero_angles():
    """(B R, R^-1 A) is the same dW: the factored metrics must not see R."""
    rng = np.random.default_rng(3)
    b, a = rand_lora(rng, 40, 32, 6)
    g = uneven(rng, 6, 6, decades=1.0) + 0.1 * np.eye(6)
    b2, a2 = b @ g, np.linalg.solve(g, a)
    assert factored_cosine(b, a, b2, a2) == pytest.approx(1.0, abs=1e-12)
    sig, res = module_geometry([(b, a, 1.0), (b2, a2, 1.0)], top_k=4)
    np.testing.assert_allclose(sig[0], sig[1], rtol=1e-9)
    inner, angles, u1, v1 = res[(0, 1)]
    assert len(angles) == 4 and max(angles) < 1e-6  # degrees: small angles come from sines
    assert u1 == pytest.approx(1.0, abs=1e-10) and v1 == pytest.approx(1.0, abs=1e-10)
    sq_a, sq_b = np.sum(sig[0] ** 2), np.sum(sig[1] ** 2)
    assert np.sqrt(max(sq_b - inner ** 2 / sq_a, 0.0) / sq_b) <= 1e-6  # orthogonal fraction


def test_module_geometry_matches_dense_reference_mixed_ranks():
    rng = np.random.default_rng(4)
    d_out, d_in, k = 36, 28, 4
    base_b, base_a = rand_lora(rng, d_out, d_in, 6)
    facs = [
        (base_b, base_a, 2.0),
        (base_b + 0.3 * uneven(rng, d_out, 6), base_a + 0.3 * uneven(rng, 6, d_in), 2.0),  # near
        (*rand_lora(rng, d_out, d_in, 3), 0.5),  # rank 3 < k: angles capped at 3
        (*rand_lora(rng, d_out, d_in, 8), 8 / np.sqrt(8)),  # rank 8, rsLoRA-like scale
    ]
    sig, res = module_geometry(facs, top_k=k)
    ws = [dense(b, a, s) for b, a, s in facs]
    for (b, a, s), w, sg in zip(facs, ws, sig):
        assert sg.shape == (b.shape[1],)
        np.testing.assert_allclose(sg, np.linalg.svd(w, compute_uv=False)[: b.shape[1]], rtol=1e-8, atol=1e-13)
    assert set(res) == {(i, j) for i in range(4) for j in range(i + 1, 4)}
    for (i, j), (inner, angles, u1, v1) in res.items():
        assert abs(inner - np.sum(ws[i] * ws[j])) <= 1e-12 * np.linalg.norm(ws[i]) * np.linalg.norm(ws[j])
        ref = ref_angles(ws[i], ws[j], k)
        assert len(angles) == len(ref) == min(k, facs[i][0].shape[1], facs[j][0].shape[1])
        np.testing.assert_allclose(angles, ref, atol=1e-6)  # degrees
        ua, _, vha = np.linalg.svd(ws[i], full_matrices=False)
        ub, _, vhb = np.linalg.svd(ws[j], full_matrices=False)
        assert u1 == pytest.approx(abs(ua[:, 0] @ ub[:, 0]), abs=1e-8)
        assert v1 == pytest.approx(abs(vha[0] @ vhb[0]), abs=1e-8)
    assert res[(0, 1)][1][0] < 30 and res[(0, 1)][1][0] > 0.01  # the near pair has a small, non-zero angle


def test_module_geometry_pair_subset_and_self_pair():
    rng = np.random.default_rng(5)
    facs = [(*rand_lora(rng, 20, 12, 4), 1.0) for _ in range(4)]
    sig, res = module_geometry(facs, top_k=3, pairs=[(2, 3), (0, 3), (1, 1)])
    assert set(res) == {(2, 3), (0, 3), (1, 1)}
    w1 = dense(*facs[1][:2])
    assert res[(1, 1)][0] == pytest.approx(np.sum(w1 * w1), rel=1e-12)
    assert max(res[(1, 1)][1]) < 1e-6


def test_zero_and_rank_deficient_updates():
    """B = 0 (peft's init) gives dW = 0: norms 0, no angles, NaN dots; a
    rank-2 B caps the angles at the numerical rank."""
    rng = np.random.default_rng(6)
    b, a = rand_lora(rng, 20, 16, 4)
    b_def = b.copy()
    b_def[:, 2:] = 0.0
    facs = [(np.zeros_like(b), a, 2.0), (b, a, 2.0), (b_def, a, 2.0)]
    sig, res = module_geometry(facs, top_k=4)
    assert np.all(sig[0] == 0) and numerical_rank(sig[0]) == 0
    inner, angles, u1, v1 = res[(0, 1)]
    assert inner == 0.0 and angles == [] and np.isnan(u1) and np.isnan(v1)
    assert numerical_rank(sig[2]) == 2
    np.testing.assert_allclose(sig[2][:2], np.linalg.svd(dense(b_def, a, 2.0), compute_uv=False)[:2], rtol=1e-9)
    angles = res[(1, 2)][1]
    ref = ref_angles(dense(b, a), dense(b_def, a), 4)
    assert len(angles) == 2
    np.testing.assert_allclose(angles, ref, atol=1e-6)
