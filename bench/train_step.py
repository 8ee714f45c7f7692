"""Training throughput of a wsg cell's step vs TRL's SFTTrainer, and peak
memory of a DPO cell vs an SFT cell, measured in one run on one machine.

Both get the same model (SmolLM2-135M-Instruct by default), LoRA (r=32,
α=64, q,k,v,o, fp32), rows, batch (8), max length (256), AdamW/cosine/clip
settings and thread count (2), completion-only SFT loss, no gradient
checkpointing (docs/stack.md "Training": the TRL anchor).

Throughput: TRL's step (its collator, `training_step`, clip, AdamW,
schedule) and the step a cell's worker runs (length-split forwards, LM head
on completion positions only, `train.steps.train_step`) alternate on the
SAME rows every step in this process, so load from neighbours on a shared
box hits both alike; tokens/s = real (non-pad) prompt+completion tokens per
second, first step excluded. Memory: real cells (`train.cell.run_cell`, Ray
Train worker) for SFT and DPO with the same config; peak RSS of the worker
(its metrics.parquet also gives the cell's wall tokens/s).

    .venv/bin/python -m bench.train_step [--steps 8] [--model smollm2-135m-instruct]

Prints per-step times, the ratios and a JSON line; the numbers are recorded
in docs/benchmarks.train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

# Run as a script, this folder is sys.path[0] and bench/rollouts.py would
# shadow the `rollouts` package: look packages up from the repo instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from wsg.core import rundir  # noqa: E402
from wsg.core.cells import CellKey
from wsg.core.layout import RunLayout
from wsg.sweep.config import parse_config

LORA = {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def make_rollouts(tokenizer, *, n_prompts: int, k: int, seed: int, max_len: int):
    """Arithmetic chat prompts with K completions of spread-out lengths
    (like sampled chains of thought), binary rewards, and DPO pairs."""
    from wsg.rollouts.schema import pairs_table, rollouts_table

    rng = np.random.default_rng(seed)
    rows, pairs = [], []
    for p in range(n_prompts):
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}? Put the final "
                                                 "answer in \\boxed{}."}], tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        outcome = []
        for s in range(k):
            right = bool(rng.random() < 0.5)
            n_lines = int(rng.integers(1, 13))
            steps = " ".join(f"Step {i + 1}: {int(rng.integers(0, 99))} + {int(rng.integers(0, 99))} is a "
                             "partial sum we keep." for i in range(n_lines))
            completion = f"{steps} So the answer is \\boxed{{{a + b if right else a + b + 1}}}."
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"][: max_len - len(p_ids) - 1]
            c_ids = c_ids + [tokenizer.eos_token_id]
            rows.append({"prompt_id": f"p{p}", "sample_idx": s, "problem": f"{a} + {b}", "prompt_text": prompt,
                         "completion": tokenizer.decode(c_ids[:-1]), "gold": str(a + b), "reward": float(right),
                         "prompt_token_ids": p_ids, "completion_token_ids": c_ids, "completion_logprobs": None,
                         "n_prompt_tokens": len(p_ids), "n_completion_tokens": len(c_ids), "finish_reason": "stop",
                         "teacher": "policy", "temperature": 1.0, "top_p": 1.0, "max_tokens": max_len})
            outcome.append((s, right, rows[-1]["completion"]))
        for g, w in list(zip([o for o in outcome if o[1]], [o for o in outcome if not o[1]]))[:2]:
            pairs.append({"prompt_id": f"p{p}", "prompt_text": prompt, "chosen": g[2], "rejected": w[2],
                          "chosen_sample_idx": g[0], "rejected_sample_idx": w[0]})
    return rollouts_table(rows), pairs_table(pairs)


def cell_config(model: str, *, steps: int, batch: int, max_len: int, threads: int):
    return parse_config({
        "model": {"name": model},
        "train": {"lora": LORA, "effective_batch": batch, "per_device_batch": batch, "grad_accum": 1,
                  "num_workers": 1, "cpus_per_worker": threads, "max_steps": steps, "checkpoint_steps": [steps],
                  "max_seq_len": max_len, "warmup_frac": 0.0, "precision": "fp32", "max_failures": 0},
        "grid": {"losses": ["sft"]}, "analysis": {"reference_loss": "sft"}})


def _trl_trainer(model: str, table, *, steps: int, batch: int, max_len: int, lr: float, callbacks=()):
    """TRL's SFTTrainer on the rows (pre-tokenized, completion-only loss)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from wsg.core.models import load_causal_lm, load_tokenizer

    ids, masks = [], []
    for p, c in zip(table.column("prompt_token_ids").to_pylist(), table.column("completion_token_ids").to_pylist()):
        ids.append((p + c)[:max_len])
        masks.append(([0] * len(p) + [1] * len(c))[:max_len])
    data = Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="wsg-bench-trl-"), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, max_steps=steps, learning_rate=lr, lr_scheduler_type="cosine",
                     warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no",
                     report_to=[], gradient_checkpointing=False, max_length=max_len, completion_only_loss=True,
                     padding_free=False, use_cpu=True, seed=42, dataloader_num_workers=0, bf16=False, fp16=False)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target_modules"],
                      task_type="CAUSAL_LM")
    return SFTTrainer(model=load_causal_lm(model), args=args, train_dataset=data, processing_class=load_tokenizer(model),
                      peft_config=lora, callbacks=list(callbacks))


def paired_steps(model: str, cfg, run: str, table, *, steps: int, batch: int, max_len: int, threads: int,
                 lr: float) -> dict:
    """TRL's training step and a wsg cell's training step, alternating on the
    SAME rows every step, in one process: neighbours on a shared box slow
    both alike. TRL side: its collator + `training_step` (forward, loss,
    backward) + clip + AdamW + schedule, what `Trainer.train` runs per step.
    wsg side: exactly what a cell's worker runs per step (plan_step's length
    sort, collate's length-split forwards, train_step)."""
    import torch
    from wsg.core.models import load_tokenizer
    from wsg.train.data import build_train_set, collate
    from wsg.train.losses import get_loss, validate_hyper
    from wsg.train.steps import PolicyTrainer, build_policy, train_step

    torch.set_num_threads(threads)
    trl = _trl_trainer(model, table, steps=steps, batch=batch, max_len=max_len, lr=lr)
    trl.create_optimizer_and_scheduler(num_training_steps=steps)
    trl.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
    trl.model.train()
    ts = build_train_set(cfg, run, loss="sft", tokenizer=load_tokenizer(model))
    t = cfg.train
    wsg = PolicyTrainer(build_policy(cfg, seed=42), lr=lr, weight_decay=t.weight_decay, warmup_steps=0,
                        max_steps=steps, max_grad_norm=t.max_grad_norm, device=torch.device("cpu"))
    spec, hyper = get_loss("sft"), validate_hyper("sft")

    def trl_step(idx):
        inputs = trl.data_collator([trl.train_dataset[int(j)] for j in idx])
        trl.training_step(trl.model, inputs)
        torch.nn.utils.clip_grad_norm_(trl.model.parameters(), 1.0)
        trl.optimizer.step()
        trl.lr_scheduler.step()
        trl.model.zero_grad()
        return int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["input_ids"].numel())

    def wsg_step(idx):  # one worker, per_device_batch = batch: the step is one micro-batch
        return int(train_step(wsg, spec, hyper, [collate(ts, np.asarray(idx))], world=1)["tokens"])

    rows = {"trl": [], "wsg": []}
    order = np.random.default_rng(0).permutation(table.num_rows)
    for step in range(steps):
        idx = order[(step * batch) % len(order):][:batch]
        sides = [("trl", trl_step), ("wsg", wsg_step)]
        for name, fn in (sides if step % 2 == 0 else sides[::-1]):  # alternate who goes first
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = fn(idx)
            rows[name].append((tokens, time.perf_counter() - t0, time.process_time() - c0))
        print(f"  step {step + 1}: TRL {rows['trl'][-1][1]:.1f}s ({rows['trl'][-1][2]:.1f} CPU-s), "
              f"wsg {rows['wsg'][-1][1]:.1f}s ({rows['wsg'][-1][2]:.1f} CPU-s), {rows['trl'][-1][0]} tokens", flush=True)
    return _compare(rows)


def _compare(rows: dict[str, list[tuple]]) -> dict:
    """Throughput of each side from its (tokens, seconds, CPU seconds) per
    step, and wsg's over TRL's."""
    out = {}
    for name, r in rows.items():
        arr = np.array(r[1:], dtype=float)  # first step excluded (warm-up)
        out[name] = {"tok_s": float(arr[:, 0].sum() / arr[:, 1].sum()), "s_per_step": float(arr[:, 1].mean()),
                     "tok_per_cpu_s": float(arr[:, 0].sum() / arr[:, 2].sum())}
    per_step = np.array([a[1] / b[1] for a, b in zip(rows["trl"][1:], rows["wsg"][1:])])  # same rows: time ratio
    out["ratio"] = out["wsg"]["tok_s"] / out["trl"]["tok_s"]
    out["ratio_median_per_step"] = float(np.median(per_step))
    # CPU seconds: with one thread, the work done, whatever the neighbours do
    # (with more threads, spinning while a descheduled sibling is waited for
    # counts too).
    out["ratio_cpu"] = out["wsg"]["tok_per_cpu_s"] / out["trl"]["tok_per_cpu_s"]
    return out


def run_wsg(cfg, run: str, loss: str, lr: float) -> dict:
    from wsg.core.cells import cell_id
    from wsg.train.cell import run_cell

    run_cell(cfg, run, CellKey.of(loss, 42, lr))
    m = rundir.read_table(RunLayout.of(run).cell(cell_id(loss, 42, lr)).metrics).to_pandas()
    m = m[m.step > 1]
    return {"tok_s": float(m.tokens.sum() / m.step_time_s.sum()), "s_per_step": float(m.step_time_s.mean()),
            "peak_rss_mb": float(m.peak_rss_mb.max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cells", action="store_true", help="only the paired throughput steps")
    ap.add_argument("--prompts", type=int, default=32)
    args = ap.parse_args(argv)
    import ray
    from wsg.core.models import load_tokenizer, resolve_model

    resolve_model(args.model)  # build the cached folder once, outside the timings
    tok = load_tokenizer(args.model)
    rows, pairs = make_rollouts(tok, n_prompts=args.prompts, k=4, seed=0, max_len=args.max_len)
    run = tempfile.mkdtemp(prefix="wsg-bench-run-")
    rundir.write_table(RunLayout.of(run).rollouts, rows)
    rundir.write_table(RunLayout.of(run).pairs, pairs)
    cfg = cell_config(args.model, steps=args.steps, batch=args.batch, max_len=args.max_len, threads=args.threads)
    lengths = np.array([len(p) + len(c) for p, c in zip(rows.column("prompt_token_ids").to_pylist(),
                                                       rows.column("completion_token_ids").to_pylist())])
    print(f"data: {rows.num_rows} rollouts, {pairs.num_rows} pairs, length {lengths.min()}-{lengths.max()} "
          f"(mean {lengths.mean():.0f}) tokens; batch {args.batch}, {args.steps} steps, {args.threads} threads",
          flush=True)
    paired = paired_steps(args.model, cfg, run, rows, steps=args.steps, batch=args.batch, max_len=args.max_len,
                          threads=args.threads, lr=1e-5)
    print(f"paired steps: TRL {paired['trl']['tok_s']:.1f} tok/s ({paired['trl']['tok_per_cpu_s']:.1f} tok/CPU-s), "
          f"wsg {paired['wsg']['tok_s']:.1f} tok/s ({paired['wsg']['tok_per_cpu_s']:.1f} tok/CPU-s)", flush=True)
    if args.skip_cells:
        print(json.dumps({"model": args.model, "steps": args.steps, "threads": args.threads, "paired": paired}))
        return 0
    ray.init(address="local", num_cpus=max(args.threads, 2), include_dashboard=False, log_to_driver=False)
    try:
        sft = run_wsg(cfg, run, "sft", 1e-5)
        print(f"wsg sft cell:   {sft['tok_s']:.1f} tok/s ({sft['s_per_step']:.2f} s/step), "
              f"peak RSS {sft['peak_rss_mb']:.0f} MB", flush=True)
        dpo = run_wsg(cfg, run, "dpo", 1e-6)
        print(f"wsg dpo cell:   peak RSS {dpo['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        ray.shutdown()
    out = {"model": args.model, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
           "threads": args.threads, "paired": paired, "wsg_sft_cell": sft, "wsg_dpo_cell": dpo,
           "throughput_ratio_wsg_over_trl": paired["ratio"],
           "peak_memory_ratio_dpo_over_sft": dpo["peak_rss_mb"] / sft["peak_rss_mb"]}
    print(f"ratio wsg/TRL tokens/s (same rows, interleaved): {paired['ratio']:.2f}x wall (median per step "
          f"{paired['ratio_median_per_step']:.2f}x), {paired['ratio_cpu']:.2f}x per CPU-second (target >= 1.2x)")
    print(f"ratio DPO/SFT cell peak memory: {out['peak_memory_ratio_dpo_over_sft']:.2f}x (target <= 1.3x)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
