"""Exact factored geometry of LoRA updates (DESIGN.md "Geometry").

dW = s * B @ A (B: d_out x r, A: r x d_in) is never materialised; only d x r
and r x r products are formed.

- Per adapter and module (float64): R factors of B and A^T from their r x r
  Grams (Cholesky-QR; an eigendecomposition where a Gram is singular, e.g.
  B = 0 at peft's init), then the SVD of the r x r core s * R_B R_A^T gives
  dW's singular values and U = B M, V = A^T N with M, N r x r.
- Across the adapters of a module, one stacked product gives every pair:
  <dW_a, dW_b>_F = sum_kl s_ak s_bl (U_a^T U_b)_kl (V_a^T V_b)_kl from the r x r
  blocks of the stacked orthonormal bases (float32: the bulk of the flops),
  principal angles and u1/v1 dots from the top-k columns (float64).

Why Cholesky-QR from Grams and not Householder QR: on this CPU a float64 QR of
a 4096 x 32 factor costs 5-30 ms, its Gram ~0.1 ms. Why float64 where it is:
squaring float32's 1e-7 in a Gram blurs small singular values and puts a ~0.3
degree floor under small angles. Details and measured precision:
docs/geometry.md; costs: docs/benchmarks.geometry.md.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from collections import defaultdict

import numpy as np
import pyarrow as pa

from analysis import geometry_io as gio
from analysis import geometry_tables as gt
from analysis.geometry_io import parse_adapter_args  # noqa: F401  (public API)
from analysis.geometry_tables import effective_rank  # noqa: F401  (public API)
from sweep import rundir
from sweep.errors import WsgError

# Eigenvalues of a factor's Gram below EIG_RTOL * largest are dropped: factor
# directions below ~1e-6 of the largest singular value are below the float32
# resolution of the stored factors.
EIG_RTOL = 1e-12
# Numerical rank of dW for the principal-angle cap: singular values above
# RANK_RTOL * s_1 (the float32 resolution of the stored factors).
RANK_RTOL = 1e-7
CACHE_VERSION = "geometry-v1"
# Rows of Gram blocks per GEMM: taller GEMMs run ~1.4x faster than one row at a time.
ROW_BLOCK = 8


class NonFiniteFactors(ValueError):
    """Factors of these adapter indices hold NaN or inf."""

    def __init__(self, indices):
        super().__init__(f"non-finite LoRA factors at adapter indices {indices}")
        self.indices = indices


# --- pure math -----------------------------------------------------------------
def _r_factor(g: np.ndarray):
    """For Grams g = X^T X (n, r, r): R with X = Q R, and P with Q = X P
    (orthonormal Q). Cholesky where it is well conditioned (Cholesky-QR), else
    an eigendecomposition that drops directions below EIG_RTOL (rank-deficient
    factors, e.g. B = 0 at peft's init)."""
    import torch

    gram = torch.from_numpy(np.ascontiguousarray(g))
    low, info = torch.linalg.cholesky_ex(gram)
    diag2 = torch.diagonal(low, dim1=-2, dim2=-1) ** 2
    trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    # Cholesky only where every pivot is clear of round-off (lambda_max <= trace).
    ok = (info == 0) & (diag2.min(-1).values > EIG_RTOL * trace)
    r_fac = low.transpose(-1, -2).clone()  # upper triangular, R^T R = G
    eye = torch.eye(g.shape[-1], dtype=gram.dtype).expand_as(gram)
    p_fac = torch.linalg.solve_triangular(torch.where(ok[:, None, None], r_fac, eye), eye, upper=True)
    for i in torch.nonzero(~ok).flatten().tolist():
        lam, w = torch.linalg.eigh(gram[i])
        keep = (lam > EIG_RTOL * lam.max()) & (lam > 0)
        root = torch.sqrt(torch.where(keep, lam, torch.ones_like(lam)))
        r_fac[i] = torch.where(keep, root, torch.zeros_like(lam))[:, None] * w.T
        p_fac[i] = w * torch.where(keep, 1.0 / root, torch.zeros_like(lam))[None, :]
    return r_fac, p_fac


def _factor(gb: np.ndarray, ga: np.ndarray, scale: np.ndarray):
    """Batched thin SVD of dW_i = s_i B_i A_i from Grams gb = B^T B, ga = A A^T
    (n, r, r), float64. Returns (sigma (n, r), M (n, r, r), N (n, r, r)) with
    U = B M and V = A^T N (columns by descending singular value).

    B = Q_B R_B, A^T = Q_A R_A, so dW = Q_B (s R_B R_A^T) Q_A^T and the SVD of
    the r x r core gives dW's: U = Q_B U_c = B (P_B U_c), V = A^T (P_A V_c)."""
    import torch

    rb, pb = _r_factor(gb)
    ra, pa_ = _r_factor(ga)
    core = torch.from_numpy(np.asarray(scale, dtype=np.float64))[:, None, None] * (rb @ ra.transpose(-1, -2))
    uc, sigma, vch = torch.linalg.svd(core)
    return sigma.numpy(), (pb @ uc).numpy(), (pa_ @ vch.transpose(-1, -2)).numpy()


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
    b, a = np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)
    sigma, m, n = _factor((b.T @ b)[None], (a @ a.T)[None], np.array([scale]))
    return b @ m[0], sigma[0], (a.T @ n[0]).T


def principal_angles(u_a, u_b) -> np.ndarray:
    """Principal angles (degrees, ascending) between the spans of two
    orthonormal column sets."""
    c = np.linalg.svd(np.asarray(u_a, np.float64).T @ np.asarray(u_b, np.float64), compute_uv=False)
    return np.sort(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def module_geometry(factors, *, top_k: int = 10, pairs=None, device=None, gram_dtype: str = "float32"):
    """Geometry of one module across n adapters, batched.

    factors: list of (B d_out x r_i, A r_i x d_in, scale) as torch tensors or
    arrays; ranks may differ (padded with zero columns/rows, which change no
    dW). pairs: iterable of (i, j), i <= j, to compute (default: all i < j).
    gram_dtype: precision of the cross-adapter r x r blocks U_i^T U_j, V_i^T V_j
    of the orthonormal singular bases that give the inner products (the bulk
    of the flops). Each adapter's own Gram (its SVD) and the top-k
    singular-vector products (angles, dots) are always float64.
    Returns (sigma: list of (r_i,) arrays, results: {(i, j): (inner,
    angles_deg, u1_abs_dot, v1_abs_dot)}).
    """
    import torch

    n = len(factors)
    ranks = [int(f[0].shape[1]) for f in factors]
    r = max(ranks)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cross_dtype = {"float32": torch.float32, "float64": torch.float64}[gram_dtype]

    # Per adapter, in float64: factors exact, own Grams, then the SVD.
    b64 = [torch.as_tensor(f[0]).to(dev, torch.float64) for f in factors]
    a64 = [torch.as_tensor(f[1]).to(dev, torch.float64) for f in factors]
    gb_diag, ga_diag = np.zeros((n, r, r)), np.zeros((n, r, r))
    for i in range(n):
        gb_diag[i, :ranks[i], :ranks[i]] = (b64[i].T @ b64[i]).cpu().numpy()
        ga_diag[i, :ranks[i], :ranks[i]] = (a64[i] @ a64[i].T).cpu().numpy()
    # NaN/inf anywhere in a factor reaches its Gram: one r x r check per adapter.
    bad = [i for i in range(n) if not (np.isfinite(gb_diag[i]).all() and np.isfinite(ga_diag[i]).all())]
    if bad:
        raise NonFiniteFactors(bad)
    sigma, m, nn = _factor(gb_diag, ga_diag, np.array([float(f[2]) for f in factors]))
    kcap = [min(top_k, numerical_rank(s)) for s in sigma]
    k = min(top_k, r)
    # Stacked singular bases U_i = B_i M_i, V_i = A_i^T N_i (rank padded to r):
    # all r columns in gram_dtype (inner products), top-k and v1 in float64 (angles, dots).
    def small(x, cols, dtype):
        return torch.from_numpy(np.ascontiguousarray(x[:, cols])).to(dev, dtype)

    bx = b64 if cross_dtype == torch.float64 else [torch.as_tensor(f[0]).to(dev, cross_dtype) for f in factors]
    ax = a64 if cross_dtype == torch.float64 else [torch.as_tensor(f[1]).to(dev, cross_dtype) for f in factors]
    ucat = torch.cat([bx[i] @ small(m[i][:ranks[i]], slice(None), cross_dtype) for i in range(n)], dim=1)
    vcat = torch.cat([ax[i].T @ small(nn[i][:ranks[i]], slice(None), cross_dtype) for i in range(n)], dim=1)
    ukcat = torch.cat([b64[i] @ small(m[i][:ranks[i]], slice(0, k), torch.float64) for i in range(n)], dim=1)
    v1cat = torch.cat([a64[i].T @ small(nn[i][:ranks[i]], slice(0, 1), torch.float64) for i in range(n)], dim=1)
    del b64, a64, bx, ax

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
        grams = [(x[:, r0 * w:(r1 + 1) * w].T @ x[:, c0 * w:]).cpu().numpy().astype(np.float64)
                 .reshape(r1 + 1 - r0, w, n - c0, w) for x, w in ((ucat, r), (vcat, r), (ukcat, k))]
        g_v1 = (v1cat[:, r0:r1 + 1].T @ v1cat[:, c0:]).cpu().numpy()
        for i in rows[g:g + ROW_BLOCK]:
            jj = sorted(want[i])
            sel = np.array(jj) - c0
            gu, gv, uu = (x[i - r0].transpose(1, 0, 2)[sel] for x in grams)  # (len(jj), w, w)
            # <dW_i, dW_j> = sum_kl s_ik s_jl (U_i^T U_j)_kl (V_i^T V_j)_kl
            inner = np.einsum("k,mkl,ml->m", sigma[i], gu * gv, sigma[jj])
            v1 = g_v1[i - r0, sel]
            _pair_results(results, i, jj, inner, uu, v1, kcap)
    return [sigma[i][:ranks[i]] for i in range(n)], results


def _pair_results(results, i, jj, inner, uu, v1, kcap):
    """Angles (one batched SVD per rank cap) and dots of row i's pairs."""
    ki = kcap[i]
    kj = np.array([kcap[j] for j in jj])
    angles = [[] for _ in jj]
    for kval in set(kj.tolist()) if ki else ():
        hit = np.flatnonzero(kj == kval)
        if kval:  # one batched SVD for all partners with this rank cap
            cos = np.linalg.svd(uu[hit, :ki, :kval], compute_uv=False)
            deg = np.sort(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))), axis=-1)
            for h, d in zip(hit, deg):
                angles[h] = d.tolist()
    for off, j in enumerate(jj):
        live = ki > 0 and kcap[j] > 0
        results[(i, j)] = (float(inner[off]), angles[off],
                           float(abs(uu[off, 0, 0])) if live else float("nan"),
                           float(abs(v1[off])) if live else float("nan"))


# --- one shard (a Ray task, or in-process) -------------------------------------
def compute_shard(modules: list[str], adapters: list[tuple[str, str, dict]], need_sigma: list[str],
                  need_pairs: list[tuple[str, str]], top_k: int):
    """Raw results for these modules. adapters: (hash, weights file,
    {module: ModuleSpec}) in processing order, each hash once; need_sigma:
    hashes whose singular values are wanted; need_pairs: (h_a, h_b), h_a <= h_b.
    Returns (RAW_ADAPTERS batch, RAW_PAIRS batch)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else None
    pos = {h: i for i, (h, _, _) in enumerate(adapters)}
    factors = {h: gio.load_factors(w, [specs[m] for m in modules]) for h, w, specs in adapters}
    idx_pairs = [(pos[a], pos[b]) for a, b in need_pairs]
    ar = {k: [] for k in gt.RAW_ADAPTERS.names}
    pr = {k: [] for k in gt.RAW_PAIRS.names}
    hashes = [h for h, _, _ in adapters]
    for k, mod in enumerate(modules):
        fac = [(*factors[h][k], specs[mod].scale) for h, _, specs in adapters]
        try:
            sigma, res = module_geometry(fac, top_k=top_k, pairs=idx_pairs, device=device)
        except NonFiniteFactors as e:
            files = ", ".join(adapters[i][1] for i in e.indices)
            raise WsgError(f"{files}: module {mod} holds NaN or inf values; the adapter is corrupt (or its "
                           "training diverged): geometry needs finite LoRA factors") from None
        for h in need_sigma:
            for key, v in zip(gt.RAW_ADAPTERS.names, (h, mod, sigma[pos[h]].tolist())):
                ar[key].append(v)
        for (i, j), (inner, ang, u1, v1) in res.items():
            ha, hb = sorted((hashes[i], hashes[j]))  # every pair result is symmetric in a, b
            for key, v in zip(gt.RAW_PAIRS.names, (ha, hb, top_k, mod, inner, ang, u1, v1)):
                pr[key].append(v)
    return (pa.RecordBatch.from_pydict(ar, schema=gt.RAW_ADAPTERS),
            pa.RecordBatch.from_pydict(pr, schema=gt.RAW_PAIRS))


# --- cache -----------------------------------------------------------------------
def _cache_dir(out: str) -> str:
    return rundir.join(out, ".cache", CACHE_VERSION)


def _load_cache(out: str, hashes: set[str], top_k: int):
    sigma, pairs = {}, {}
    folder = _cache_dir(out)
    for fname in rundir.listdir(folder):
        if not fname.endswith(".parquet"):
            continue
        try:
            t = rundir.read_table(rundir.join(folder, fname)).to_pydict()
        except Exception:  # a damaged cache file only costs recomputation
            continue
        if fname.startswith("adapters-") and "singular_values" in t:
            for h, m, s in zip(t["hash"], t["module"], t["singular_values"]):
                if h in hashes:
                    sigma[(h, m)] = np.asarray(s, dtype=np.float64)
        elif fname.startswith("pairs-") and "inner" in t:
            for row in zip(*(t[k] for k in gt.RAW_PAIRS.names)):
                ha, hb, k, m, inner, ang, u1, v1 = row
                if k == top_k and ha in hashes and hb in hashes:
                    pairs[(ha, hb, m)] = (inner, ang, u1, v1)
    return sigma, pairs


def _write_cache(out: str, kind: str, batches: list[pa.RecordBatch], schema: pa.Schema) -> None:
    batches = [b for b in batches if b.num_rows]
    if batches:
        rundir.write_table(rundir.join(_cache_dir(out), f"{kind}-{uuid.uuid4().hex[:12]}.parquet"),
                           pa.Table.from_batches(batches, schema=schema))


# --- driver ------------------------------------------------------------------------
def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsg")
    except PackageNotFoundError:
        return "unknown"


def _hash_all(specs: list[gio.AdapterSpec], out: str) -> None:
    """Content hashes, memoised in the cache by (path, size, mtime) of both
    files so that a rerun or an incremental run hashes only new adapters."""
    from concurrent.futures import ThreadPoolExecutor

    memo_uri = rundir.join(_cache_dir(out), "hashes.json")
    try:
        memo = rundir.read_json(memo_uri) if rundir.exists(memo_uri) else {}
    except Exception:  # a damaged memo only costs rehashing
        memo = {}

    def stamp(spec):
        st = [os.stat(os.path.join(spec.path, f)) for f in (gio.CONFIG_FILE, gio.WEIGHTS_FILE)]
        return "|".join([spec.path] + [f"{x.st_size}:{x.st_mtime_ns}:{x.st_ino}" for x in st])

    todo = [s for s in specs if not isinstance(memo.get(stamp(s)), str)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(todo)))) as ex:  # hashlib releases the GIL
        for spec, h in zip(todo, ex.map(gio.content_hash, todo)):
            memo[stamp(spec)] = h
    for spec in specs:
        spec.content_hash = memo[stamp(spec)]
    if todo:
        rundir.write_json(memo_uri, memo)


def _run_in_process(jobs: list[dict], bar) -> list:
    """Shards on a thread pool, one torch thread each (BLAS and LAPACK release
    the GIL). One process-wide pool of 2+ torch threads per op collapses when
    anything else runs on the box (FACTS.md); the caller's setting is restored."""
    import torch
    from concurrent.futures import ThreadPoolExecutor, as_completed

    workers = max(1, min(len(os.sched_getaffinity(0)), len(jobs)))
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            futures = [ex.submit(compute_shard, **job) for job in jobs]
            for fut in as_completed(futures):
                if fut.exception() is not None:  # stop early on the first error
                    for other in futures:
                        other.cancel()
                    raise fut.exception()
                bar.update(1)
            return [f.result() for f in futures]
    finally:
        torch.set_num_threads(prev)


def _run_shards(jobs: list[dict], *, use_ray: bool, progress: bool):
    from tqdm import tqdm

    from sweep import telemetry

    bar = tqdm(total=len(jobs), desc="geometry shards", unit="shard", disable=not progress)
    try:
        if not use_ray:
            return _run_in_process(jobs, bar)
        import ray

        opts = {"num_cpus": 1}
        if ray.cluster_resources().get("GPU", 0) >= 1:
            opts["num_gpus"] = 0.25  # small tasks: pack a few per GPU
        task = ray.remote(compute_shard).options(**opts)
        pending = {task.remote(**job): i for i, job in enumerate(jobs)}
        done = [None] * len(jobs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                try:
                    k = pending.pop(ref)
                    done[k] = ray.get(ref)
                    telemetry.geometry_pairs_done(len(jobs[k]["need_pairs"]) * len(jobs[k]["modules"]))
                except ray.exceptions.RayTaskError as e:
                    for ref2 in pending:
                        ray.cancel(ref2)
                    if isinstance(e.cause, WsgError):
                        raise WsgError(str(e.cause)) from None
                    raise
                bar.update(1)
        return done
    finally:
        bar.close()


def run_geometry(adapters: dict[str, str], out: str, *, top_k: int = 10, config_hash: str = "",
                 use_ray: bool = True, progress: bool = True) -> dict[str, pa.Table]:
    """Compute and write adapter_modules / module_pairs / layer_pairs /
    global_pairs .parquet to `out` (local path or URI); return the tables.

    Results are cached under <out>/.cache/ by adapter content hash (+ top_k),
    so adding one adapter to a grid of N computes only the N new pairs.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise WsgError(f"--top-k must be a positive integer (got {top_k!r})")
    if not adapters:
        raise WsgError("geometry needs at least one adapter (--adapter NAME=PATH)")
    specs = [gio.read_adapter_spec(name, path) for name, path in sorted(adapters.items())]
    gio.check_compatible(specs)
    _hash_all(specs, out)
    names = {s.name: s.content_hash for s in specs}
    by_hash = {}
    for s in specs:
        by_hash.setdefault(s.content_hash, s)
    ref = specs[0]
    mod_list = [(m.module, m.layer, m.proj) for m in ref.modules.values()]
    mods = [m for m, _, _ in mod_list]

    sigma, pairs = _load_cache(out, set(by_hash), top_k)
    need_sigma = sorted(h for h in by_hash if any((h, m) not in sigma for m in mods))
    wanted = set()
    order = sorted(names)
    for ia, a in enumerate(order):
        for b in order[ia + 1:]:
            wanted.add(tuple(sorted((names[a], names[b]))))
    need_pairs = sorted(p for p in wanted if any((p[0], p[1], m) not in pairs for m in mods))

    if need_sigma or need_pairs:
        involved = set(need_sigma) | {h for p in need_pairs for h in p}
        # Cached adapters first, new ones last: each row of Gram blocks then
        # starts at the first adapter it has a missing pair with (module_geometry).
        proc = sorted(involved, key=lambda h: (h in need_sigma, h))
        by_layer = defaultdict(list)
        for m, layer, _ in mod_list:
            by_layer[layer].append(m)
        jobs = [dict(modules=ms, adapters=[(h, by_hash[h].weights, {m: by_hash[h].modules[m] for m in ms})
                                           for h in proc],  # only this shard's module specs travel
                     need_sigma=need_sigma, need_pairs=need_pairs, top_k=top_k)
                for _, ms in sorted(by_layer.items())]
        started_ray = False
        if use_ray:
            import ray

            if not ray.is_initialized():
                # A local instance (or RAY_ADDRESS): never attach to some other
                # session's `ray start` cluster found on the box.
                ray.init(address=os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True,
                         include_dashboard=False, log_to_driver=False)
                started_ray = True
        else:  # a Ray the caller started is used; never import ray just to ask
            ray_mod = sys.modules.get("ray")
            use_ray = bool(ray_mod is not None and ray_mod.is_initialized())
        try:
            results = _run_shards(jobs, use_ray=use_ray, progress=progress)
        finally:
            if started_ray:
                ray.shutdown()
        _write_cache(out, "adapters", [r[0] for r in results], gt.RAW_ADAPTERS)
        _write_cache(out, "pairs", [r[1] for r in results], gt.RAW_PAIRS)
        for ab, _ in results:
            for h, m, s in zip(*(ab.column(k).to_pylist() for k in gt.RAW_ADAPTERS.names)):
                sigma[(h, m)] = np.asarray(s, dtype=np.float64)
        for _, pb in results:
            for ha, hb, _, m, inner, ang, u1, v1 in zip(*(pb.column(k).to_pylist() for k in gt.RAW_PAIRS.names)):
                pairs[(ha, hb, m)] = (inner, ang, u1, v1)

    meta = gt.metadata(tool_version=_tool_version(), config_hash=config_hash, top_k=top_k,
                       adapters={s.name: (s.path, s.content_hash) for s in specs})
    tables = gt.assemble(names=names, modules=mod_list, sigma=sigma, pairs=pairs, meta=meta)
    for name, table in tables.items():
        rundir.write_table(rundir.join(out, f"{name}.parquet"), table)
    return tables


def read_metadata(table: pa.Table) -> dict:
    """The provenance written by run_geometry, decoded."""
    md = table.schema.metadata or {}
    return {"tool_version": md.get(b"wsg.tool_version", b"").decode(),
            "config_hash": md.get(b"wsg.config_hash", b"").decode(),
            "top_k": int(md.get(b"wsg.top_k", b"0") or 0),
            "adapters": json.loads(md.get(b"wsg.adapters", b"{}") or b"{}")}


__all__ = ["run_geometry", "parse_adapter_args", "factored_inner", "factored_cosine", "factored_svd",
           "principal_angles", "effective_rank", "module_geometry", "compute_shard", "read_metadata",
           "numerical_rank"]
