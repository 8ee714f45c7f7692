"""Benchmark: factored geometry vs the dense baseline, same run, same box.

Synthetic PEFT adapters of Qwen3-4B shape (36 layers; q 4096x2560, k/v
1024x2560, o 2560x4096 as d_out x d_in; r = 32; float32 as peft saves them),
sharing a common component plus per-adapter noise so the angles are not
trivial. Measured:

- factored: `run_geometry` over all pairs, on a local Ray (started before the
  clock; its start-up is printed apart), cold workers and warm; then one more
  adapter added to the same out dir (the incremental cache: N new pairs);
- in-process (no Ray) in a child process: wall time and peak RSS, against the
  adapters' size on disk;
- dense baseline: materialise dW = s B A (float32) and SVD it (torch,
  gesdd), cosine from the dense matrices, principal angles from the dense
  top-k singular vectors. Measured on a sample of modules (q and k of layer 0;
  v has k's shape, o the transpose of q's) and scaled to N adapters x 36 layers + all pairs.

    python bench/geometry.py                 # 6 adapters (default, ~2-4 min)
    python bench/geometry.py --adapters 48   # the grid-size target (~4.5 GB of adapters)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"q_proj": (4096, 2560), "k_proj": (1024, 2560), "v_proj": (1024, 2560), "o_proj": (2560, 4096)}


def make_adapter(folder: str, seed: int, *, layers: int, rank: int, alpha: float) -> None:
    """A PEFT folder: B = common + noise (uneven column scales), same for A."""
    from safetensors.torch import save_file

    common = torch.Generator().manual_seed(0)
    own = torch.Generator().manual_seed(1000 + seed)
    decay = torch.logspace(0, -2, rank)  # uneven spectra: two decades
    tensors = {}
    for i in range(layers):
        for proj, (d_out, d_in) in SHAPES.items():
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            b = (torch.randn(d_out, rank, generator=common) + 0.7 * torch.randn(d_out, rank, generator=own)) * decay
            a = (torch.randn(rank, d_in, generator=common) + 0.7 * torch.randn(rank, d_in, generator=own)) / math.sqrt(d_in)
            tensors[f"{key}.lora_A.weight"] = a.contiguous()
            tensors[f"{key}.lora_B.weight"] = (1e-3 * b).contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": False,
                   "target_modules": sorted(SHAPES)}, f)


def dense_costs(folder_a: str, folder_b: str, *, top_k: int, scale: float) -> dict:
    """Seconds per adapter-module (materialise + SVD) and per pair-module
    (dense inner product + angles from dense singular vectors), per projection."""
    from safetensors import safe_open

    out = {}
    for proj in ("q_proj", "k_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{proj}"
        svds, t_adapter = [], []
        ws = []
        cpu_adapter = []
        for folder in (folder_a, folder_b):
            t0, c0 = time.perf_counter(), time.process_time()
            with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
                w = scale * f.get_tensor(f"{key}.lora_B.weight") @ f.get_tensor(f"{key}.lora_A.weight")
            svds.append(torch.linalg.svd(w, full_matrices=False))
            t_adapter.append(time.perf_counter() - t0)
            cpu_adapter.append(time.process_time() - c0)
            ws.append(w)
        t0, c0 = time.perf_counter(), time.process_time()
        cos = float((ws[0] * ws[1]).sum() / ws[0].norm() / ws[1].norm())
        c = torch.linalg.svdvals(svds[0][0][:, :top_k].T @ svds[1][0][:, :top_k])
        _ = torch.rad2deg(torch.arccos(c.clamp(-1, 1))), cos
        out[proj] = {"adapter_s": float(np.mean(t_adapter)), "pair_s": time.perf_counter() - t0,
                     "adapter_cpu_s": float(np.mean(cpu_adapter)), "pair_cpu_s": time.process_time() - c0}
    out["v_proj"] = out["k_proj"]  # same shape
    out["o_proj"] = out["q_proj"]  # the transposed shape: same SVD flops
    return out


def child_in_process(folders: dict, out: str, top_k: int) -> dict:
    """Run in-process (no Ray) in a fresh interpreter: wall time and peak RSS."""
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import torch, analysis.geometry as g
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'): return int(line.split()[1]) * 1024
base = rss()
t0 = time.perf_counter()
g.run_geometry({folders!r}, {out!r}, top_k={top_k}, use_ray=False, progress=False)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "rss_after_imports": base,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def ray_workers_cpu_s() -> float:
    """CPU seconds (user + sys) used so far by the Ray this process started
    (raylet, GCS, workers: all its descendants; other sessions' Ray processes
    on the box are not counted). On a shared box CPU seconds are the
    contention-free measure: wall time on an idle box is about CPU s / cores."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=6)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where to put the synthetic adapters (default: a temp dir, removed)")
    ap.add_argument("--skip-in-process", action="store_true", help="skip the no-Ray child run (memory numbers)")
    ap.add_argument("--skip-dense", action="store_true", help="skip the dense baseline (minutes of SVDs)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    return ap.parse_args()


def _make_adapters(args, root: str) -> dict[str, str]:
    """n + 1 synthetic adapters (one extra for the incremental measurement)."""
    t0 = time.perf_counter()
    folders = {}
    for i in range(args.adapters + 1):
        folders[f"a{i:02d}"] = os.path.join(root, f"a{i:02d}")
        if not os.path.exists(os.path.join(folders[f"a{i:02d}"], "adapter_config.json")):
            make_adapter(folders[f"a{i:02d}"], i, layers=args.layers, rank=args.rank, alpha=2.0 * args.rank)
    print(f"{args.adapters} adapters made in {time.perf_counter() - t0:.1f} s", flush=True)
    return folders


def _ray_runs(args, folders: dict, grid: dict, work: str, res: dict) -> dict:
    """Factored geometry on Ray: cold workers, warm workers, plus one adapter."""
    import ray
    from wsg.analysis.geometry import run_geometry

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    res["ray_init_s"] = time.perf_counter() - t0
    tables = {}
    try:
        for key, ads, out in (("cold", grid, "cold"), ("warm", grid, "warm"), ("plus_one", folders, "warm")):
            c0, t0 = time.process_time() + ray_workers_cpu_s(), time.perf_counter()
            got = run_geometry(ads, os.path.join(work, out), top_k=args.top_k, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() + ray_workers_cpu_s() - c0
            tables = got if key == "warm" else tables
            res[f"factored_ray_{key}_s"], res[f"factored_ray_{key}_cpu_s"] = wall, cpu
            print(f"factored, Ray, {key}: {wall:.2f} s wall, {cpu:.1f} CPU s", flush=True)
    finally:
        ray.shutdown()
    return tables


def _baselines(args, grid: dict, work: str, size: int, pairs: int, res: dict) -> dict:
    """The in-process child (memory) and the dense baseline, scaled up."""
    n = args.adapters
    if not args.skip_in_process:
        child = child_in_process(grid, os.path.join(work, "serial"), args.top_k)
        print(f"in-process: {child}", flush=True)
        res.update({"factored_in_process_s": child["wall_s"], "factored_in_process_cpu_s": child["cpu_s"],
                    "rss_after_imports": child["rss_after_imports"],
                    "peak_rss": child["peak_rss"],
                    "peak_rss_growth_over_disk": (child["peak_rss"] - child["rss_after_imports"]) / size})
    names = sorted(grid)
    dense = {} if args.skip_dense else dense_costs(grid[names[0]], grid[names[1]], top_k=args.top_k,
                                                   scale=2.0)
    if dense:
        res["dense_sample"] = dense
        res["dense_scaled_s"] = args.layers * sum(n * d["adapter_s"] + pairs * d["pair_s"] for d in dense.values())
        res["dense_scaled_cpu_s"] = args.layers * sum(n * d["adapter_cpu_s"] + pairs * d["pair_cpu_s"]
                                                      for d in dense.values())
        res["speedup_vs_dense"] = res["dense_scaled_s"] / res["factored_ray_warm_s"]
        res["speedup_vs_dense_cold"] = res["dense_scaled_s"] / res["factored_ray_cold_s"]
        res["speedup_vs_dense_cpu"] = res["dense_scaled_cpu_s"] / res["factored_ray_warm_cpu_s"]
    return dense


def _summary(res: dict, dense: dict, n: int, layers: int, pairs: int) -> None:
    print("\n== summary ==")
    print(f"1-min load average: {res['loadavg_start']:.1f} at start, {res['loadavg_end']:.1f} at end "
          f"({res['cpus']} cores)")
    print(f"ray.init (not timed below):      {res['ray_init_s']:.1f} s")
    print(f"factored, Ray, cold workers:     {res['factored_ray_cold_s']:.2f} s ({res['factored_ray_cold_cpu_s']:.0f} CPU s)")
    print(f"factored, Ray, warm workers:     {res['factored_ray_warm_s']:.2f} s ({res['factored_ray_warm_cpu_s']:.0f} CPU s)")
    print(f"  + one adapter (cache, {n} new pairs): {res['factored_ray_plus_one_s']:.2f} s "
          f"({res['factored_ray_plus_one_cpu_s']:.0f} CPU s)")
    if "peak_rss" in res:
        print(f"factored, in-process (no Ray):   {res['factored_in_process_s']:.2f} s "
              f"({res['factored_in_process_cpu_s']:.0f} CPU s), peak RSS "
              f"{res['peak_rss'] / 2**20:.0f} MiB ({res['rss_after_imports'] / 2**20:.0f} MiB after imports; "
              f"growth = {res['peak_rss_growth_over_disk']:.2f} x the adapters on disk)")
    for proj, d in dense.items():
        print(f"dense {proj}: {d['adapter_s']:.2f} s per adapter-module (materialise + SVD), "
              f"{d['pair_s'] * 1e3:.1f} ms per pair-module")
    if dense:
        print(f"dense baseline, scaled to {n} adapters x {layers} layers + {pairs} pairs: "
              f"{res['dense_scaled_s']:.0f} s ({res['dense_scaled_cpu_s']:.0f} CPU s)")
        print(f"speed-up factored vs dense: {res['speedup_vs_dense']:.0f}x warm, "
              f"{res['speedup_vs_dense_cold']:.0f}x cold (wall); {res['speedup_vs_dense_cpu']:.0f}x in CPU seconds (warm)")


def main() -> None:
    args = _args()
    root = args.dir or tempfile.mkdtemp(prefix="wsg-geo-bench-")
    n = args.adapters
    folders = _make_adapters(args, root)
    grid = {k: folders[k] for k in sorted(folders)[:n]}
    size = sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors")) for p in grid.values())
    print(f"{n} adapters, {args.layers} layers, r={args.rank}: {size / 2**20:.0f} MiB on disk", flush=True)
    pairs = n * (n - 1) // 2
    res = {"adapters": n, "layers": args.layers, "rank": args.rank, "top_k": args.top_k, "pairs": pairs,
           "disk_bytes": size, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "loadavg_start": os.getloadavg()[0]}  # other work on the box inflates every number here
    work = tempfile.mkdtemp(prefix="wsg-geo-out-")
    tables = _ray_runs(args, folders, grid, work, res)
    g = tables["global_pairs"].to_pandas()
    print(g[["adapter_a", "adapter_b", "cosine", "median_top1_angle_deg", "mean_u1_abs_dot"]].head(3).to_string())
    dense = _baselines(args, grid, work, size, pairs, res)
    shutil.rmtree(work, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()[0]
    _summary(res, dense, n, args.layers, pairs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
