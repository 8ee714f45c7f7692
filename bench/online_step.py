"""Benchmark: seconds per online step, split into generation, reward,
training and sync, for both sync strategies; and the learning check.

Each run is a real online cell (`train.cell.run_cell`: local Ray, a Ray
Train worker whose bundle holds its vLLM engine actor too,
SmolLM2-135M-Instruct from the embedded default config, math-verify
rewards), read back from its metrics.parquet. The first step is excluded
from the split (first-call warm-up) and the last has no sync.

    python bench/online_step.py                       # split: GRPO merged vs lora, + DAPO (auto)
    python bench/online_step.py --mode learn --steps 40   # mean reward over a few dozen GRPO steps

The split prints every part as a ratio to the LoRA-sync run measured in the
same invocation (the baseline: vLLM serving the adapter as a LoRARequest).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from wsg.core.cells import CellKey
from wsg.core.layout import RunLayout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARTS = ("gen_s", "reward_s", "train_s", "sync_s", "step_time_s")


def make_cfg(args, *, sync: str, steps: int):
    from wsg.core.config import default_config_path
    from wsg.sweep.config import load_config, parse_config

    d = load_config(default_config_path()).model_dump(mode="json")
    d["model"]["name"] = args.model
    d["rollouts"]["dtype"] = args.engine_dtype
    d["online"].update(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                       max_tokens=args.max_tokens, sync=sync)
    # resume state every 5 steps: a process killed on a busy box costs little
    d["train"].update(max_steps=steps, checkpoint_steps=[steps], warmup_frac=0.0, resume_every=5)
    d["data"]["n_prompts"] = args.n_prompts
    d["grid"]["losses"] = ["online_grpo", "online_dapo"]
    d["analysis"]["reference_loss"] = "online_grpo"
    return parse_config(d)


def run_cell(args, *, loss: str, sync: str, steps: int, lr: float) -> tuple[dict, list[dict]]:
    import pyarrow.parquet as pq
    from wsg.core import rundir
    from wsg.train.cell import run_cell

    cfg = make_cfg(args, sync=sync, steps=steps)
    run = tempfile.mkdtemp(prefix="wsg-bench-online-", dir=args.workdir)
    t0 = time.perf_counter()
    out = run_cell(cfg, run, CellKey.of(loss, args.seed, lr))
    wall = time.perf_counter() - t0
    rows = pq.read_table(os.path.join(RunLayout.of(run).cell(out["cell_id"]).root, "metrics.parquet")).to_pylist()
    adapters = [p for p in (rundir.join(run, c) for c in out["checkpoints"]) if rundir.is_complete(p)]
    return {"loss": loss, "sync": out["sync"], "steps": out["step"], "wall_s": wall, "adapters": adapters,
            "run": run}, rows


def split(rows: list[dict]) -> dict:
    mid = rows[1:-1] or rows  # skip the warm-up step and the last (no sync)
    out = {p: statistics.median(r[p] for r in mid) for p in PARTS}
    out["gen_tok_per_s"] = sum(r["gen_tokens"] for r in mid) / sum(r["gen_s"] for r in mid)
    out["task_reward_mean"] = statistics.fmean(r["task_reward_mean"] for r in rows)
    out["behaviour_gap_max"] = max(r["behaviour_gap_max"] for r in rows)
    return out


def gen_ab(args, adapter_dir: str, *, repeats: int = 3) -> dict:
    """Generation alone, back to back in this process: the same trained
    adapter served as a LoRARequest vs merged into the weights (what the two
    sync strategies make the engine do), same prompts, same seeds."""
    import tempfile as tf

    from peft import PeftModel
    from wsg.core.models import load_causal_lm
    from wsg.rollouts.engine import EngineActor
    from wsg.rollouts.engine_rules import online_engine_options
    from wsg.train.online import prepare_prompts
    from wsg.train.online_sync import write_merged

    cfg = make_cfg(args, sync="lora", steps=2)
    prompts = prepare_prompts(cfg).prompt_ids[: args.prompts_per_step]
    out = {}
    with tf.TemporaryDirectory(prefix="wsg-bench-merged-") as merged:
        model = PeftModel.from_pretrained(load_causal_lm(cfg.model.name), adapter_dir)
        write_merged(model, merged, dtype=None)
        del model
        for name in ("lora", "merged"):
            eng = EngineActor(online_engine_options(cfg, name))
            try:
                lora = ("ab", 1, adapter_dir) if name == "lora" else None
                if name == "merged":
                    eng.load_merged_weights(merged)
                eng.generate(prompts[:1], n=1, max_tokens=4, lora=lora)  # first-call warm-up
                rates = []
                for rep in range(repeats):
                    t0 = time.perf_counter()
                    res = eng.generate(prompts, n=args.group_size, max_tokens=args.max_tokens, logprobs=True,
                                       lora=lora, seed=rep)
                    n = sum(len(x["token_ids"]) for r in res for x in r["samples"])
                    rates.append(n / (time.perf_counter() - t0))
                out[name] = statistics.median(rates)
            finally:
                eng.shutdown()
    print(f"generation alone, same adapter: lora {out['lora']:.1f} tok/s, merged {out['merged']:.1f} tok/s "
          f"({out['merged'] / out['lora']:.2f}x)", flush=True)
    return out


def mode_split(args) -> dict:
    results = {}
    for loss, sync in (("online_grpo", "lora"), ("online_grpo", "merged"), ("online_dapo", "auto")):
        info, rows = run_cell(args, loss=loss, sync=sync, steps=args.steps, lr=args.lr)
        results[f"{loss}/{info['sync']}"] = {**info, **split(rows)}
        print(f"{loss} sync={info['sync']}: {info['steps']} steps, {len(info['adapters'])} adapter folder(s), "
              f"cell wall {info['wall_s']:.0f} s", flush=True)
    base = results["online_grpo/lora"]
    print("\nmedian seconds per step (steps 2..N-1); ratio = LoRA-sync run / this run")
    print(f"{'run':24s}" + "".join(f"{p:>16s}" for p in PARTS) + f"{'gen tok/s':>12s}")
    for name, r in results.items():
        cells = "".join(f"{r[p]:9.2f} ({base[p] / max(r[p], 1e-9):4.1f}x)" for p in PARTS)
        print(f"{name:24s}{cells}{r['gen_tok_per_s']:12.1f}")
    results["gen_ab_tok_per_s"] = gen_ab(args, base["adapters"][-1])
    m = results["online_grpo/merged"]
    print(f"\nmerged vs lora: step {base['step_time_s'] / m['step_time_s']:.2f}x faster, generation "
          f"{m['gen_tok_per_s'] / base['gen_tok_per_s']:.2f}x the tok/s; sync {m['sync_s']:.2f} s vs "
          f"{base['sync_s']:.2f} s")
    return results


def mode_learn(args) -> dict:
    from scipy import stats

    info, rows = run_cell(args, loss=args.loss, sync="auto", steps=args.steps, lr=args.lr)
    # accuracy over everything sampled (DAPO's kept groups are biased to the middle)
    r = [row.get("sampled_task_reward_mean", row["task_reward_mean"]) for row in rows]
    k = max(1, min(5, len(r) // 4))
    fit = stats.linregress([row["step"] for row in rows], r)
    out = {**info, "reward_per_step": r, "first_k_mean": statistics.fmean(r[:k]), "last_k_mean": statistics.fmean(r[-k:]),
           "k": k, "slope_per_step": fit.slope, "slope_p": fit.pvalue,
           "response_len": [row["response_len_mean"] for row in rows],
           "entropy": [row["entropy"] for row in rows], "step_s_median": statistics.median(
               row["step_time_s"] for row in rows)}
    print("step  reward  len   entropy")
    for row in rows:
        print(f"{row['step']:4d}  {r[row['step'] - 1]:.3f}  {row['response_len_mean']:5.1f}  {row['entropy']:.3f}")
    print(f"\nmean task reward: first {k} steps {out['first_k_mean']:.3f} -> last {k} steps {out['last_k_mean']:.3f} "
          f"({out['last_k_mean'] / max(out['first_k_mean'], 1e-9):.2f}x); OLS slope {fit.slope:+.4f}/step, "
          f"p = {fit.pvalue:.2g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["split", "learn"], default="split")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--loss", default="online_grpo", help="learn mode only")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--engine-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--workdir", default=None, help="where the temporary run dirs go")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        res = mode_split(args) if args.mode == "split" else mode_learn(args)
    finally:
        ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
