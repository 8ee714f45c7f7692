"""A pair's geometry does not depend on its neighbours (issue 23): every
number of a pair, and every number of an adapter, is the same bit for bit
whatever other adapters the table holds. A BLAS product over pairs rounds
differently with its shape (one pair is a GEMV, several a GEMM; OpenBLAS
picks kernels by size and CPU): on a 2-core AVX-512 box a pair's bootstrap
interval changed when other adapters joined the table."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_geometry import uneven, write_adapter
from wsg.analysis import geometry_bootstrap as gb
from wsg.analysis import geometry_math as gm
from wsg.analysis.geometry import run_geometry

SHAPES = {"q_proj": (24, 16), "v_proj": (8, 16), "o_proj": (16, 24)}
LAYERS = 5
ROW_COUNTS = (1, 2, 3, 7, 16, 61)


def _rows(rng, n, k):
    return rng.normal(size=(n, k)) * np.exp(rng.normal(0, 2, size=(n, k)))


@pytest.mark.parametrize("k", [3, 6, 30])
def test_ordered_dot_and_cis_of_a_row_do_not_depend_on_the_other_rows(k):
    """The same row, alone or among 1..60 others, anywhere in the block."""
    rng = np.random.default_rng(k)
    counts = gb.layer_counts(k, 400, seed=1)
    base = {n: _rows(rng, 1, k) for n in ("inner", "sq_a", "sq_b", "resid_b", "resid_a")}
    base = {n: np.abs(v) if n != "inner" else v for n, v in base.items()}
    top1 = rng.uniform(0, 90, size=(1, 2 * k))
    ml = np.repeat(np.arange(k), 2)
    alone = gb.global_cis(layer_sums=base, top1=top1, module_layer=ml, n_boot=400, seed=1)
    dot = gb.ordered_dot(base["inner"], counts.T)
    # the reference: the sum written out term by term, in index order
    want = np.zeros(400)
    for j in range(k):
        want = want + base["inner"][0, j] * counts[:, j]
    assert np.array_equal(dot[0], want)
    np.testing.assert_allclose(dot[0], base["inner"][0] @ counts.T, rtol=1e-12)
    for n in ROW_COUNTS[1:]:
        at = int(rng.integers(0, n))
        sums = {}
        for name, row in base.items():
            others = _rows(rng, n, k)
            others = np.abs(others) if name != "inner" else others
            others[at] = row[0]
            sums[name] = others
        tops = rng.uniform(0, 90, size=(n, 2 * k))
        tops[at] = top1[0]
        assert np.array_equal(gb.ordered_dot(sums["inner"], counts.T)[at], dot[0]), n
        many = gb.global_cis(layer_sums=sums, top1=tops, module_layer=ml, n_boot=400, seed=1)
        for col, v in alone.items():
            assert np.array_equal(many[col][at], v[0], equal_nan=True), (n, col)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Nine adapters of mixed ranks (the rank padding of a table follows its
    largest rank) and one zero update."""
    root = tmp_path_factory.mktemp("neigh")
    rng = np.random.default_rng(9)
    out = {}
    for i in range(9):
        r = (2, 4, 6)[i % 3]
        fac = {(lay, p): (uneven(rng, d_out, r), uneven(rng, r, d_in)) for lay in range(LAYERS)
               for p, (d_out, d_in) in SHAPES.items()}
        if i == 8:
            fac = {key: (0 * b, a) for key, (b, a) in fac.items()}
        out[f"ad{i}"] = write_adapter(str(root / f"ad{i}"), fac, r=r, alpha=2 * r)
    return out


def _pair_rows(tables, a, b):
    return {name: t.filter(pc.and_(pc.equal(t["adapter_a"], a), pc.equal(t["adapter_b"], b))).to_pylist()
            for name, t in tables.items() if name != "adapter_modules"}


def _same(x, y):
    """Equal bit for bit, NaN equal to NaN, through lists and dicts."""
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    if isinstance(x, float) and isinstance(y, float):
        return np.float64(x).tobytes() == np.float64(y).tobytes() or (np.isnan(x) and np.isnan(y))
    return x == y


def test_a_pairs_tables_are_the_same_whatever_else_is_in_the_table(adapters, tmp_path):
    """Tables of 2, 3, 5 and 9 adapters (no shared cache: every table
    computed afresh), then a table that reuses the cache of another: the pair
    (ad1, ad4) and the adapters ad1, ad4 read the same in all."""
    names = sorted(adapters)
    sets = [["ad1", "ad4"], ["ad1", "ad4", "ad8"], ["ad0", "ad1", "ad3", "ad4", "ad7"], names]
    got = []
    for i, pick in enumerate(sets):
        t = run_geometry({n: adapters[n] for n in pick}, str(tmp_path / f"t{i}"), top_k=3, use_ray=False,
                         progress=False, n_boot=300, boot_seed=2)
        mods = t["adapter_modules"]
        got.append((_pair_rows(t, "ad1", "ad4"),
                    mods.filter(pc.is_in(mods["adapter"], value_set=pa.array(["ad1", "ad4"])))
                    .to_pylist()))
    # incremental: the 5-adapter table's cache reused for all nine
    t = run_geometry(adapters, str(tmp_path / "t2"), top_k=3, use_ray=False, progress=False, n_boot=300, boot_seed=2)
    mods = t["adapter_modules"]
    got.append((_pair_rows(t, "ad1", "ad4"),
                mods.filter(pc.is_in(mods["adapter"], value_set=pa.array(["ad1", "ad4"]))).to_pylist()))
    assert len(got[0][0]["global_pairs"]) == 1 and len(got[0][0]["module_pairs"]) == LAYERS * len(SHAPES)
    assert not np.isnan(got[0][0]["global_pairs"][0]["cosine_ci_low"])
    for n, g in zip([2, 3, 5, 9, "9 from the 5's cache"], got):
        assert _same(g, got[0]), n


@pytest.mark.parametrize("d_out,d_in,r", [(24, 16, 4), (576, 576, 8), (1536, 576, 16)])
def test_module_geometry_of_a_pair_does_not_depend_on_the_others(d_out, d_in, r):
    """The engine's stacked GEMMs: pair (3, 7) and adapters 3, 7 computed
    alone, among 12 or 40 adapters, or as one wanted pair of many."""
    rng = np.random.default_rng(d_out + r)
    facs = [(rng.normal(size=(d_out, r)).astype(np.float32), rng.normal(size=(r, d_in)).astype(np.float32),
             2.0) for _ in range(40)]
    ref_s, ref = gm.module_geometry([facs[3], facs[7]], top_k=3)
    for n, pairs in ((12, None), (40, None), (40, [(3, 7), (20, 31)])):
        sig, res = gm.module_geometry(facs[:n], top_k=3, pairs=pairs)
        assert np.array_equal(sig[3], ref_s[0]) and np.array_equal(sig[7], ref_s[1]), n
        assert _same(list(res[(3, 7)]), list(ref[(0, 1)])), n
