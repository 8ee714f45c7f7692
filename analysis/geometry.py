"""The geometry stage: shard tasks, cache and driver (docs/geometry.md).

The math (exact factored SVDs, inner products, residuals and principal angles
of LoRA updates dW = s B A, never materialised) is in analysis/geometry_math.py;
reading adapters in analysis/geometry_io.py; the table contract in
analysis/geometry_tables.py. Costs: docs/benchmarks.geometry.md.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from collections import defaultdict
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa

from ..core import rundir, telemetry
from ..core.errors import WsgError
from . import geometry_bootstrap as gb
from . import geometry_io as gio
from . import geometry_tables as gt
from . import lora_io
from .geometry_io import parse_adapter_args  # noqa: F401  (public API)
from .geometry_math import (  # noqa: F401  (public API)
    NonFiniteFactors,
    factored_cosine,
    factored_inner,
    factored_svd,
    module_geometry,
    numerical_rank,
    principal_angles,
)
from .geometry_tables import effective_rank  # noqa: F401  (public API)

CACHE_VERSION = "geometry-v3"  # v3: per-pair products (v2 batched them, so its bits depended on the table)
# v2: float64 inner products (v1 cached float32-exact ones)


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
    factors = {}
    for h, w, specs in adapters:
        name, data = _weights(w)
        factors[h] = lora_io.load_factors(name, [specs[m] for m in modules], data)
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


def _weights(w) -> tuple:
    """(file, None) for a path; (file, bytes) for (file, ObjectRef of its bytes),
    which is how a multi-node cluster's shards get adapters that live on the
    driver's disk (an object-store run is copied to the driver's cache)."""
    if isinstance(w, str):
        return w, None
    import ray

    name, ref = w
    return name, ray.get(ref)


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
            for ha, hb, k, m, *raw in zip(*(t[k] for k in gt.RAW_PAIRS.names)):
                if k == top_k and ha in hashes and hb in hashes:
                    pairs[(ha, hb, m)] = tuple(raw)
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


def _hash_all(specs: list[lora_io.AdapterSpec], out: str) -> None:
    """Content hashes, memoised in the cache by (path, size, mtime) of both
    files so that a rerun or an incremental run hashes only new adapters."""
    from concurrent.futures import ThreadPoolExecutor

    memo_uri = rundir.join(_cache_dir(out), "hashes.json")
    try:
        memo = rundir.read_json(memo_uri) if rundir.exists(memo_uri) else {}
    except Exception:  # a damaged memo only costs rehashing
        memo = {}

    def stamp(spec):
        st = [os.stat(os.path.join(spec.path, f)) for f in (lora_io.CONFIG_FILE, lora_io.WEIGHTS_FILE)]
        return "|".join([_where(spec.path, out)] + [f"{x.st_size}:{x.st_mtime_ns}:{x.st_ino}" for x in st])

    todo = [s for s in specs if not isinstance(memo.get(stamp(s)), str)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(todo)))) as ex:  # hashlib releases the GIL
        for spec, h in zip(todo, ex.map(lora_io.content_hash, [s.path for s in todo])):
            memo[stamp(spec)] = h
    for spec in specs:
        spec.content_hash = memo[stamp(spec)]
    if todo:
        rundir.write_json(memo_uri, memo)


def _where(path: str, out: str) -> str:
    """An adapter's key in the memo without a path of this machine: relative
    to the output folder when a local one, else a digest of the path."""
    import hashlib

    if rundir.is_local(out):
        return os.path.relpath(path, rundir.resolve(out)[1])
    return hashlib.sha256(path.encode()).hexdigest()[:16]


def _run_in_process(jobs: list[dict], bar) -> list:
    """Shards on a thread pool, one torch thread each (BLAS and LAPACK release
    the GIL). One process-wide pool of 2+ torch threads per op collapses when
    anything else runs on the box (docs/benchmarks.geometry.md); the caller's setting is restored."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import torch

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


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _run_shards(jobs: list[dict], *, use_ray: bool, progress: bool):
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="geometry shards", unit="shard", disable=not progress)
    try:
        if not use_ray:
            return _run_in_process(jobs, bar)
        import ray

        opts = {"num_cpus": 1}
        if ray.cluster_resources().get("GPU", 0) >= 1:
            opts["num_gpus"] = 0.25  # small tasks: pack a few per GPU
        if sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
            # Shards may run on nodes without the driver's files: each adapter's
            # weights travel once through the object store.
            refs = {}
            for job in jobs:
                for _, w, _ in job["adapters"]:
                    if w not in refs:
                        refs[w] = ray.put(_read_bytes(w))
                job["adapters"] = [(h, (w, refs[w]), sp) for h, w, sp in job["adapters"]]
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
                 use_ray: bool = True, progress: bool = True, cells: Optional[Mapping] = None,
                 where: Optional[Mapping[str, str]] = None, n_boot: int = gb.N_RESAMPLES, boot_seed: int = gb.SEED) -> dict[str, pa.Table]:
    """Compute and write adapter_modules / module_pairs / layer_pairs /
    global_pairs .parquet to `out` (local path or URI); return the tables.

    cells: adapter name -> core.cells.AdapterRef, the identity columns of
    every table (`analysis.adapters.adapter_refs`); names not in it (adapters
    given by path) get nulls. where: adapter name -> how the metadata names
    its folder (a run's adapters: run-relative, so a copied run holds no path
    of this machine); default its path. n_boot, boot_seed: the layer bootstrap of the
    global_pairs CIs (recorded in its b"wsg.bootstrap" metadata).

    Results are cached under <out>/.cache/ by adapter content hash (+ top_k),
    so adding one adapter to a grid of N computes only the N new pairs; the
    identity columns and CIs are derived afresh from the cached numbers.
    """
    _check_args(adapters, top_k, n_boot)
    specs = [lora_io.read_adapter_spec(name, path) for name, path in sorted(adapters.items())]
    gio.check_compatible(specs)
    _hash_all(specs, out)
    names = {s.name: s.content_hash for s in specs}
    by_hash = {}
    for s in specs:
        by_hash.setdefault(s.content_hash, s)
    mod_list = [(m.module, m.layer, m.proj) for m in specs[0].modules.values()]

    sigma, pairs = _load_cache(out, set(by_hash), top_k)
    need_sigma, need_pairs = _missing(names, by_hash, [m for m, _, _ in mod_list], sigma, pairs)
    if need_sigma or need_pairs:
        jobs = _shard_jobs(by_hash, mod_list, need_sigma, need_pairs, top_k)
        results = _compute(jobs, use_ray=use_ray, progress=progress)
        _add_results(out, results, sigma, pairs)

    meta = gt.metadata(tool_version=_tool_version(), config_hash=config_hash, top_k=top_k,
                       adapters={s.name: ((where or {}).get(s.name, s.path), s.content_hash) for s in specs})
    tables = gt.assemble(names=names, modules=mod_list, sigma=sigma, pairs=pairs, meta=meta, cells=cells,
                         n_boot=n_boot, boot_seed=boot_seed)
    for name, table in tables.items():
        rundir.write_table(rundir.join(out, f"{name}.parquet"), table)
    return tables


def _check_args(adapters: dict[str, str], top_k, n_boot) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise WsgError(f"--top-k must be a positive integer (got {top_k!r})")
    if not adapters:
        raise WsgError("geometry needs at least one adapter (--adapter NAME=PATH)")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise WsgError(f"the number of bootstrap resamples must be a positive integer (got {n_boot!r})")


def _missing(names: dict[str, str], by_hash: dict, mods: list[str], sigma: dict, pairs: dict
             ) -> tuple[list[str], list[tuple[str, str]]]:
    """The adapter hashes whose spectra and the hash pairs whose products the
    cache lacks (for any module)."""
    need_sigma = sorted(h for h in by_hash if any((h, m) not in sigma for m in mods))
    wanted = set()
    order = sorted(names)
    for ia, a in enumerate(order):
        for b in order[ia + 1:]:
            wanted.add(tuple(sorted((names[a], names[b]))))
    need_pairs = sorted(p for p in wanted if any((p[0], p[1], m) not in pairs for m in mods))
    return need_sigma, need_pairs


def _shard_jobs(by_hash: dict, mod_list: list[tuple[str, int, str]], need_sigma: list[str],
                need_pairs: list[tuple[str, str]], top_k: int) -> list[dict]:
    """One compute_shard job per layer, over the adapters involved."""
    involved = set(need_sigma) | {h for p in need_pairs for h in p}
    # Cached adapters first, new ones last (the order results are listed in;
    # every pair is computed from its own two adapters, module_geometry).
    proc = sorted(involved, key=lambda h: (h in need_sigma, h))
    by_layer = defaultdict(list)
    for m, layer, _ in mod_list:
        by_layer[layer].append(m)
    return [dict(modules=ms, adapters=[(h, by_hash[h].weights, {m: by_hash[h].modules[m] for m in ms})
                                       for h in proc],  # only this shard's module specs travel
                 need_sigma=need_sigma, need_pairs=need_pairs, top_k=top_k)
            for _, ms in sorted(by_layer.items())]


def _compute(jobs: list[dict], *, use_ray: bool, progress: bool) -> list:
    """Run the shards on Ray (a local one started, and stopped, here when
    none is running) or in this process."""
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
        return _run_shards(jobs, use_ray=use_ray, progress=progress)
    finally:
        if started_ray:
            ray.shutdown()


def _add_results(out: str, results: list, sigma: dict, pairs: dict) -> None:
    """Write the shards' raw results to the cache and into sigma / pairs."""
    _write_cache(out, "adapters", [r[0] for r in results], gt.RAW_ADAPTERS)
    _write_cache(out, "pairs", [r[1] for r in results], gt.RAW_PAIRS)
    for ab, _ in results:
        for h, m, s in zip(*(ab.column(k).to_pylist() for k in gt.RAW_ADAPTERS.names)):
            sigma[(h, m)] = np.asarray(s, dtype=np.float64)
    for _, pb in results:
        for ha, hb, _, m, *raw in zip(*(pb.column(k).to_pylist() for k in gt.RAW_PAIRS.names)):
            pairs[(ha, hb, m)] = tuple(raw)


def read_metadata(table: pa.Table) -> dict:
    """The provenance written by run_geometry, decoded."""
    md = table.schema.metadata or {}
    return {"tool_version": md.get(b"wsg.tool_version", b"").decode(),
            "config_hash": md.get(b"wsg.config_hash", b"").decode(),
            "top_k": int(md.get(b"wsg.top_k", b"0") or 0),
            "adapters": json.loads(md.get(b"wsg.adapters", b"{}") or b"{}"),
            "bootstrap": json.loads(md.get(b"wsg.bootstrap", b"{}") or b"{}")}  # global_pairs only


__all__ = ["run_geometry", "parse_adapter_args", "factored_inner", "factored_cosine", "factored_svd",
           "principal_angles", "effective_rank", "module_geometry", "compute_shard", "read_metadata",
           "numerical_rank"]
