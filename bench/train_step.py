"""Training throughput of a wsg cell vs TRL's SFTTrainer, and peak memory of
a DPO cell vs an SFT cell, measured in one run on the same machine.

Both trainers get the same model (SmolLM2-135M-Instruct by default), LoRA
(r=32, α=64, q,k,v,o, fp32), rows, batch (8), max length (256), optimizer
settings and thread count (2), completion-only SFT loss, no gradient
checkpointing (FACTS.md "Training": the TRL anchor). Throughput = real (non-
pad) prompt+completion tokens per second of optimizer steps, first step
excluded on both sides. The wsg side is a real cell (`train.cell.run_cell`:
Ray Train worker, length buckets, LM head on completion positions only);
its step times come from its metrics.parquet.

    .venv/bin/python -m bench.train_step [--steps 8] [--model smollm2-135m-instruct]

Prints a table and a JSON line; record the numbers in docs/benchmarks.train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

# Run as a script, this folder is sys.path[0] and bench/rollouts.py would
# shadow the `rollouts` package: look packages up from the repo instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from sweep import rundir  # noqa: E402
from sweep.config import parse_config  # noqa: E402

LORA = {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def make_rollouts(tokenizer, *, n_prompts: int, k: int, seed: int, max_len: int):
    """Arithmetic chat prompts with K completions of spread-out lengths
    (like sampled chains of thought), binary rewards, and DPO pairs."""
    from rollouts.schema import pairs_table, rollouts_table

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


def run_trl(model: str, table, *, steps: int, batch: int, max_len: int, threads: int, lr: float) -> dict:
    """TRL SFTTrainer on the same rows (pre-tokenized, completion-only loss)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sweep.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(threads)
    ids, masks = [], []
    for p, c in zip(table.column("prompt_token_ids").to_pylist(), table.column("completion_token_ids").to_pylist()):
        ids.append((p + c)[:max_len])
        masks.append(([0] * len(p) + [1] * len(c))[:max_len])
    data = Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    step_tokens, step_times = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            step_times.append((time.perf_counter() - self.t0, time.process_time() - self.c0))

    tok = load_tokenizer(model)
    out = tempfile.mkdtemp(prefix="wsg-bench-trl-")
    args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
                     learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
                     logging_steps=10**6, save_strategy="no", report_to=[], gradient_checkpointing=False,
                     max_length=max_len, completion_only_loss=True, padding_free=False, use_cpu=True, seed=42,
                     dataloader_num_workers=0, bf16=False, fp16=False)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target_modules"],
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=load_causal_lm(model), args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        batch_ = collate(features)
        step_tokens.append(int(batch_["attention_mask"].sum()) if "attention_mask" in batch_
                           else int(batch_["input_ids"].numel()))
        return batch_

    trainer.data_collator = counting
    trainer.train()
    tokens, times = np.array(step_tokens[1:steps]), np.array(step_times[1:steps])
    return {"tok_s": float(tokens.sum() / times[:, 0].sum()), "tok_per_cpu_s": float(tokens.sum() / times[:, 1].sum()),
            "s_per_step": float(times[:, 0].mean()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def run_wsg(cfg, run: str, loss: str, lr: float) -> dict:
    from train.cell import run_cell
    from train.cell_id import cell_id

    run_cell(cfg, run, loss=loss, seed=42, lr=lr)
    m = rundir.read_table(rundir.join(rundir.cell_dir(run, cell_id(loss, 42, lr)), "metrics.parquet")).to_pandas()
    m = m[m.step > 1]
    return {"tok_s": float(m.tokens.sum() / m.step_time_s.sum()), "tok_per_cpu_s": float(m.tokens.sum() / m.step_cpu_s.sum()),
            "s_per_step": float(m.step_time_s.mean()), "peak_rss_mb": float(m.peak_rss_mb.max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    args = ap.parse_args(argv)
    import ray

    from sweep.models import load_tokenizer, resolve_model

    resolve_model(args.model)  # build the cached folder once, outside the timings
    tok = load_tokenizer(args.model)
    rows, pairs = make_rollouts(tok, n_prompts=args.prompts, k=4, seed=0, max_len=args.max_len)
    run = tempfile.mkdtemp(prefix="wsg-bench-run-")
    rundir.write_table(rundir.join(rundir.rollouts_dir(run), "rollouts.parquet"), rows)
    rundir.write_table(rundir.join(rundir.rollouts_dir(run), "pairs.parquet"), pairs)
    cfg = cell_config(args.model, steps=args.steps, batch=args.batch, max_len=args.max_len, threads=args.threads)
    lengths = np.array([len(p) + len(c) for p, c in zip(rows.column("prompt_token_ids").to_pylist(),
                                                       rows.column("completion_token_ids").to_pylist())])
    print(f"data: {rows.num_rows} rollouts, {pairs.num_rows} pairs, length {lengths.min()}-{lengths.max()} "
          f"(mean {lengths.mean():.0f}) tokens; batch {args.batch}, {args.steps} steps, {args.threads} threads",
          flush=True)
    trl = run_trl(args.model, rows, steps=args.steps, batch=args.batch, max_len=args.max_len, threads=args.threads,
                  lr=1e-5)
    print(f"TRL SFTTrainer: {trl['tok_s']:.1f} tok/s ({trl['s_per_step']:.2f} s/step), "
          f"{trl['tok_per_cpu_s']:.1f} tok/CPU-s", flush=True)
    ray.init(num_cpus=max(args.threads, 2), include_dashboard=False, log_to_driver=False)
    try:
        sft = run_wsg(cfg, run, "sft", 1e-5)
        print(f"wsg sft cell:   {sft['tok_s']:.1f} tok/s ({sft['s_per_step']:.2f} s/step), "
              f"{sft['tok_per_cpu_s']:.1f} tok/CPU-s, peak RSS {sft['peak_rss_mb']:.0f} MB", flush=True)
        dpo = run_wsg(cfg, run, "dpo", 1e-6)
        print(f"wsg dpo cell:   peak RSS {dpo['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        ray.shutdown()
    out = {"model": args.model, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
           "threads": args.threads, "trl": trl, "wsg_sft": sft, "wsg_dpo": dpo,
           "throughput_ratio_wsg_over_trl": sft["tok_s"] / trl["tok_s"],
           "cpu_throughput_ratio_wsg_over_trl": sft["tok_per_cpu_s"] / trl["tok_per_cpu_s"],
           "peak_memory_ratio_dpo_over_sft": dpo["peak_rss_mb"] / sft["peak_rss_mb"]}
    print(f"ratio wsg/TRL tokens/s: {out['throughput_ratio_wsg_over_trl']:.2f}x wall, "
          f"{out['cpu_throughput_ratio_wsg_over_trl']:.2f}x per CPU-second (target >= 1.2x)")
    print(f"ratio DPO/SFT peak memory: {out['peak_memory_ratio_dpo_over_sft']:.2f}x (target <= 1.3x)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
