"""run_geometry end to end: the four contract tables vs a dense float64
reference, provenance, the incremental cache, and Ray shard tasks."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.linalg
from test_geometry import SHAPES, random_factors, stored, uneven, write_adapter
from wsg.analysis.geometry import CACHE_VERSION, read_metadata, run_geometry
from wsg.analysis.geometry_tables import TABLES, effective_rank
from wsg.analysis.lora_io import lora_scale
from wsg.core.errors import WsgError

TOP_K = 3


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Four adapters: base; a perturbed copy; a gauge-transformed copy (B R,
    R^-1 A) of base; an rsLoRA adapter of a different rank. Returns
    (folders, dense dW per adapter and module)."""
    root = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(10)
    base = random_factors(rng, 4)
    near = {k: (b + 0.4 * uneven(rng, *b.shape), a + 0.4 * uneven(rng, *a.shape)) for k, (b, a) in base.items()}
    gauge = {}
    for k, (b, a) in base.items():
        g = uneven(rng, 4, 4, decades=1.0) + 0.2 * np.eye(4)
        gauge[k] = (b @ g, np.linalg.solve(g, a))
    rs = random_factors(rng, 6)
    specs = {"base": (base, 4, 8, False), "near": (near, 4, 8, False), "gauge": (gauge, 4, 8, False),
             "rs": (rs, 6, 12, True)}
    folders, dws = {}, {}
    for name, (fac, r, alpha, rsl) in specs.items():
        folders[name] = write_adapter(str(root / name), fac, r=r, alpha=alpha, rslora=rsl)
        s = alpha / np.sqrt(r) if rsl else alpha / r  # peft's scaling, written out independently
        dws[name] = {f"layers.{i}.{p}": s * stored(b) @ stored(a) for (i, p), (b, a) in fac.items()}
    assert lora_scale(6, 12, True) == pytest.approx(12 / np.sqrt(6)) and lora_scale(4, 8, False) == 2.0
    return folders, dws


def _orth_sq(wa, wb):
    if np.sum(wa * wa) == 0:
        return np.sum(wb * wb)
    res = wb - np.sum(wa * wb) / np.sum(wa * wa) * wa
    return np.sum(res * res)


def _check_against_dense(tables, dws):
    names = sorted(dws)
    mods = sorted(dws[names[0]], key=lambda m: (int(m.split(".")[1]), m.split(".")[2]))
    am = tables["adapter_modules"].to_pylist()
    assert [(r["adapter"], r["module"]) for r in am] == [(n, m) for n in names for m in mods]
    for row in am:
        w = dws[row["adapter"]][row["module"]]
        s = np.linalg.svd(w, compute_uv=False)
        r = len(row["singular_values"])
        np.testing.assert_allclose(row["singular_values"], s[:r], rtol=0, atol=1e-6)
        assert row["fro_norm"] == pytest.approx(np.linalg.norm(w), abs=1e-6)
        assert row["effective_rank"] == pytest.approx(effective_rank(s[:r]), abs=1e-6)
        assert row["layer"] == int(row["module"].split(".")[1]) and row["proj"] == row["module"].split(".")[2]

    mp = tables["module_pairs"].to_pylist()
    assert len(mp) == len(names) * (len(names) - 1) // 2 * len(mods)
    for row in mp:
        wa, wb = dws[row["adapter_a"]][row["module"]], dws[row["adapter_b"]][row["module"]]
        assert row["adapter_a"] < row["adapter_b"]
        cos = np.sum(wa * wb) / np.linalg.norm(wa) / np.linalg.norm(wb)
        assert row["cosine"] == pytest.approx(cos, abs=1e-6)
        ua, _, vha = np.linalg.svd(wa, full_matrices=False)
        ub, _, vhb = np.linalg.svd(wb, full_matrices=False)
        ref = np.sort(np.degrees(scipy.linalg.subspace_angles(ua[:, :TOP_K], ub[:, :TOP_K])))
        np.testing.assert_allclose(row["principal_angles_deg"], ref, atol=1e-6)
        assert row["top1_angle_deg"] == pytest.approx(ref[0], abs=1e-6)
        assert row["worst_angle_deg"] == pytest.approx(ref[-1], abs=1e-6)
        assert row["u1_abs_dot"] == pytest.approx(abs(ua[:, 0] @ ub[:, 0]), abs=1e-6)
        assert row["v1_abs_dot"] == pytest.approx(abs(vha[0] @ vhb[0]), abs=1e-6)
        assert row["orth_frac_b_off_a"] == pytest.approx(np.sqrt(_orth_sq(wa, wb) / np.sum(wb * wb)), abs=1e-6)
        assert row["orth_frac_a_off_b"] == pytest.approx(np.sqrt(_orth_sq(wb, wa) / np.sum(wa * wa)), abs=1e-6)

    def agg(a, b, sel):
        va = np.concatenate([dws[a][m].ravel() for m in sel])
        vb = np.concatenate([dws[b][m].ravel() for m in sel])
        cos = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
        ob = np.sqrt(sum(_orth_sq(dws[a][m], dws[b][m]) for m in sel) / (vb @ vb))
        oa = np.sqrt(sum(_orth_sq(dws[b][m], dws[a][m]) for m in sel) / (va @ va))
        return cos, ob, oa

    for row in tables["layer_pairs"].to_pylist():
        sel = [m for m in mods if m.startswith(f"layers.{row['layer']}.")]
        cos, ob, oa = agg(row["adapter_a"], row["adapter_b"], sel)
        assert row["cosine"] == pytest.approx(cos, abs=1e-6)
        assert (row["orth_frac_b_off_a"], row["orth_frac_a_off_b"]) == pytest.approx((ob, oa), abs=1e-6)
    assert tables["layer_pairs"].num_rows == len(mp) // len(SHAPES)
    for row in tables["global_pairs"].to_pylist():
        cos, ob, oa = agg(row["adapter_a"], row["adapter_b"], mods)
        assert row["cosine"] == pytest.approx(cos, abs=1e-6)
        assert (row["orth_frac_b_off_a"], row["orth_frac_a_off_b"]) == pytest.approx((ob, oa), abs=1e-6)
        mine = [r for r in mp if (r["adapter_a"], r["adapter_b"]) == (row["adapter_a"], row["adapter_b"])]
        assert row["median_top1_angle_deg"] == pytest.approx(np.median([r["top1_angle_deg"] for r in mine]))
        assert row["median_worst_angle_deg"] == pytest.approx(np.median([r["worst_angle_deg"] for r in mine]))
        assert row["mean_u1_abs_dot"] == pytest.approx(np.mean([r["u1_abs_dot"] for r in mine]))
        assert row["mean_v1_abs_dot"] == pytest.approx(np.mean([r["v1_abs_dot"] for r in mine]))


def test_tables_match_dense_reference(grid, tmp_path):
    folders, dws = grid
    out = str(tmp_path / "geo")
    tables = run_geometry(folders, out, top_k=TOP_K, config_hash="cfg123", use_ray=False, progress=False)
    assert set(tables) == set(TABLES)
    for name, schema in TABLES.items():
        on_disk = pq.read_table(os.path.join(out, f"{name}.parquet"))
        assert on_disk.schema.remove_metadata() == schema  # exact column names and types
        assert on_disk.equals(tables[name])
        md = read_metadata(on_disk)
        assert md["config_hash"] == "cfg123" and md["top_k"] == TOP_K and md["tool_version"]
        assert set(md["adapters"]) == set(folders)
        assert md["adapters"]["base"]["path"] == os.path.abspath(folders["base"])
        assert len(md["adapters"]["base"]["content_hash"]) == 16
    _check_against_dense(tables, dws)
    # the gauge-transformed copy is the same update: cosine 1, zero angles
    g = [r for r in tables["module_pairs"].to_pylist() if (r["adapter_a"], r["adapter_b"]) == ("base", "gauge")]
    assert len(g) == 8
    for r in g:
        assert r["cosine"] == pytest.approx(1.0, abs=1e-6)
        # float32 storage of B R, R^-1 A perturbs dW by ~1e-7 of s_1: the true (dense) angles of
        # the stored copies are up to ~3e-4 degree (checked to 1e-6 above); exact copies: test_geometry_exact
        assert max(r["principal_angles_deg"]) < 1e-3
        assert r["orth_frac_b_off_a"] <= 1e-6 and r["u1_abs_dot"] == pytest.approx(1.0, abs=1e-6)
        assert -1.0 <= r["cosine"] <= 1.0
    # rank 6 vs 4 with top_k 3: three angles; with top_k 10 they cap at the smaller rank
    rs = [r for r in tables["module_pairs"].to_pylist() if r["adapter_b"] == "rs"]
    assert rs and all(len(r["principal_angles_deg"]) == 3 for r in rs)
    t10 = run_geometry({"base": folders["base"], "rs": folders["rs"]}, str(tmp_path / "k10"), top_k=10,
                       use_ray=False, progress=False)
    assert all(len(x) == 4 for x in t10["module_pairs"].column("principal_angles_deg").to_pylist())


def _assert_tables_close(t1, t2):
    """Equal up to rounding (another processing order changes the BLAS blocking)."""
    assert t1.schema == t2.schema and t1.num_rows == t2.num_rows
    for name in t1.column_names:
        a, b = t1.column(name).to_pylist(), t2.column(name).to_pylist()
        if t1.schema.field(name).type in (pa.float64(), pa.list_(pa.float64())):
            flat = (lambda c: [x for v in c for x in v]) if isinstance(a[0], list) else (lambda c: c)
            # an orthogonal fraction near 0 is the square root of a float64 residual of a few
            # eps: up to sqrt(1e-14) = 1e-7 absolute (2.4e-8 against 0 seen on an AMD EPYC box)
            atol = 1e-7 if name.startswith("orth_frac") else 1e-9
            np.testing.assert_allclose(np.array(flat(a), float), np.array(flat(b), float), rtol=1e-9, atol=atol)
        else:
            assert a == b


def _cache_files(out, kind):
    folder = os.path.join(out, ".cache", CACHE_VERSION)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(kind))


def test_incremental_cache_computes_only_new_pairs(grid, tmp_path):
    folders, dws = grid
    out = str(tmp_path / "geo")
    first = {k: folders[k] for k in ("base", "near", "rs")}
    run_geometry(first, out, top_k=TOP_K, use_ray=False, progress=False)
    assert pq.read_table(_cache_files(out, "pairs")[0]).num_rows == 3 * 8
    # same adapters again under new names: nothing is recomputed (keys are content hashes)
    renamed = {f"x_{k}": v for k, v in first.items()}
    run_geometry(renamed, out, top_k=TOP_K, use_ray=False, progress=False)
    assert len(_cache_files(out, "pairs")) == 1 and len(_cache_files(out, "adapters")) == 1
    # one more adapter: exactly its 3 pairs and its own singular values are computed
    tables = run_geometry(folders, out, top_k=TOP_K, use_ray=False, progress=False)
    gauge_hash = read_metadata(tables["global_pairs"])["adapters"]["gauge"]["content_hash"]
    pair_files = _cache_files(out, "pairs")
    assert len(pair_files) == 2
    new = [t for t in map(pq.read_table, pair_files) if gauge_hash in t.column("hash_a").to_pylist()
           + t.column("hash_b").to_pylist()]
    assert len(new) == 1 and new[0].num_rows == 3 * 8
    assert all(gauge_hash in (a, b) for a, b in zip(new[0].column("hash_a").to_pylist(),
                                                     new[0].column("hash_b").to_pylist()))
    new_sigma = [t for t in map(pq.read_table, _cache_files(out, "adapters")) if t.num_rows == 8]
    assert len(_cache_files(out, "adapters")) == 2 and set(new_sigma[-1].column("hash").to_pylist()) == {gauge_hash}
    fresh = run_geometry(folders, str(tmp_path / "fresh"), top_k=TOP_K, use_ray=False, progress=False)
    for name in TABLES:
        _assert_tables_close(tables[name], fresh[name])
    _check_against_dense(tables, dws)
    # a different top_k is a different key
    run_geometry(first, out, top_k=2, use_ray=False, progress=False)
    assert len(_cache_files(out, "pairs")) == 3


def test_single_adapter_gives_empty_pair_tables(grid, tmp_path):
    folders, _ = grid
    tables = run_geometry({"base": folders["base"]}, str(tmp_path / "one"), top_k=TOP_K, use_ray=False,
                          progress=False)
    assert tables["adapter_modules"].num_rows == 8
    assert tables["module_pairs"].num_rows == 0 and tables["global_pairs"].num_rows == 0
    assert tables["module_pairs"].schema.remove_metadata() == TABLES["module_pairs"]


def test_in_process_error_names_file_and_module(grid, tmp_path):
    folders, _ = grid
    rng = np.random.default_rng(12)
    fac = random_factors(rng, 4)
    fac[(0, "o_proj")][1][2, 5] = np.inf
    bad = write_adapter(str(tmp_path / "inf"), fac, r=4, alpha=8)
    with pytest.raises(WsgError, match=r"inf/adapter_model\.safetensors: module layers\.0\.o_proj holds NaN or inf"):
        run_geometry({"base": folders["base"], "inf": bad}, str(tmp_path / "o"), use_ray=False, progress=False)
    assert not os.path.exists(tmp_path / "o" / "global_pairs.parquet")


@pytest.fixture
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_shard_tasks_match_dense_reference(grid, tmp_path, local_ray):
    folders, dws = grid
    # use_ray=False still runs on a Ray the caller started, and leaves it running
    dist = run_geometry(folders, str(tmp_path / "ray"), top_k=TOP_K, use_ray=False, progress=True)
    assert local_ray.is_initialized()
    _check_against_dense(dist, dws)
    meta = json.loads(dist["global_pairs"].schema.metadata[b"wsg.adapters"])
    assert set(meta) == set(folders)
    # an error found inside a shard task comes back as a WsgError naming the file
    rng = np.random.default_rng(11)
    fac = random_factors(rng, 4)
    fac[(1, "v_proj")][0][3, 1] = np.nan
    bad = write_adapter(str(tmp_path / "nan"), fac, r=4, alpha=8)
    with pytest.raises(WsgError, match=r"nan/adapter_model\.safetensors: module layers\.1\.v_proj holds NaN"):
        run_geometry({"base": folders["base"], "nan": bad}, str(tmp_path / "bad"), use_ray=True, progress=False)
    assert local_ray.is_initialized()


def test_shards_read_weights_shipped_through_the_object_store(grid, local_ray):
    """On a multi-node cluster a shard may run where the driver's files are not:
    it gets each adapter's bytes from the object store, with identical results."""
    from wsg.analysis import lora_io
    from wsg.analysis.geometry import compute_shard

    folders, _ = grid
    specs = {n: lora_io.read_adapter_spec(n, p) for n, p in sorted(folders.items())}  # names stand for hashes
    mods = list(next(iter(specs.values())).modules)[:3]
    by_path = [(h, s.weights, {m: s.modules[m] for m in mods}) for h, s in sorted(specs.items())]
    by_ref = [(h, (w, local_ray.put(open(w, "rb").read())), sp) for h, w, sp in by_path]
    hashes = [h for h, _, _ in by_path]
    pairs = [(hashes[i], hashes[i + 1]) for i in range(len(hashes) - 1)]
    want = compute_shard(mods, by_path, hashes, pairs, TOP_K)
    got = local_ray.get(local_ray.remote(compute_shard).remote(mods, by_ref, hashes, pairs, TOP_K))
    assert want[0].equals(got[0]) and want[1].equals(got[1]) and want[1].num_rows == len(pairs) * len(mods) > 0
