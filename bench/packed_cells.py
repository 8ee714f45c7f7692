"""K cells packed on one frozen base (train/packed.py) against the same K
cells trained one after another on the same device (docs/benchmarks.md,
"Packed cells").

Both sides run the same SFT steps on the same random sequences (per cell:
per-device batch `--batch`, prompt 32 tokens, completions of random length up
to `--len`), from random-weight models of a published shape (speed does not
depend on the values; a device without network cannot download). Separate:
for each cell its own PolicyTrainer + train_step (what a cell runs today).
Packed: one PackedTrainer + packed_train_step for all K. Prints each side's
training tokens per second, the ratio packed / separate, and on CUDA the
model FLOP utilisation (4 × base parameters per token: forward and the
activation gradients; the frozen base computes no weight gradients) against
`--peak` TFLOP/s.

    python bench/packed_cells.py [--shape smollm2-135m] [--cells 4] [--steps 4] \
        [--batch 4] [--len 256] [--dtype bfloat16] [--peak 989] [--out packed.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench.gpu_check import SHAPES as GPU_CHECK_SHAPES  # noqa: E402
from wsg.core.config import LoraCfg  # noqa: E402
from wsg.train.data import collate_sequences  # noqa: E402
from wsg.train.losses import get_loss, validate_hyper  # noqa: E402
from wsg.train.packed import PackedCell, PackedTrainer, packed_train_step  # noqa: E402
from wsg.train.steps import PolicyTrainer, attach_lora, train_step  # noqa: E402

# The published shapes bench/gpu_check.py measures, and a tiny one for a quick look.
SHAPES = {"tiny": dict(arch="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16), **GPU_CHECK_SHAPES}
LORA = LoraCfg(r=32, alpha=64, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
OPT = dict(weight_decay=0.01, warmup_steps=1, max_steps=1000, max_grad_norm=1.0)


def random_model(shape: str, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    kw = dict(SHAPES[shape])
    conf = (LlamaConfig if kw.pop("arch") == "llama" else Qwen3Config)(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(conf, dtype=dtype).eval()


def batches(cells: int, steps: int, batch: int, max_len: int, vocab: int):
    """[cell][step] -> [one micro-batch of `batch` rows]."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(cells):
        row = []
        for _ in range(steps):
            seqs = [rng.integers(1, vocab, 32 + int(rng.integers(max_len // 2, max_len + 1))).tolist()
                    for _ in range(batch)]
            row.append([collate_sequences(seqs, [32] * batch, pad_id=0)])
        out.append(row)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_separate(base, data, device) -> float:
    spec, hyper = get_loss("sft"), validate_hyper("sft")
    _sync(device)
    t = time.perf_counter()
    for k, steps in enumerate(data):
        policy = attach_lora(copy.deepcopy(base), LORA, seed=k, device=device)
        trainer = PolicyTrainer(policy, lr=1e-4, device=device, **OPT)
        for mbs in steps:
            train_step(trainer, spec, hyper, mbs, world=1)
    _sync(device)
    return time.perf_counter() - t


def run_packed(base, data, device) -> float:
    spec, hyper = get_loss("sft"), validate_hyper("sft")
    _sync(device)
    t = time.perf_counter()
    trainer = PackedTrainer(copy.deepcopy(base), LORA, [PackedCell(seed=k, lr=1e-4) for k in range(len(data))],
                            device=device, **OPT)
    for s in range(len(data[0])):
        packed_train_step(trainer, [spec] * len(data), [hyper] * len(data), [d[s] for d in data])
    _sync(device)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                    choices=["bfloat16", "float32"])
    ap.add_argument("--peak", type=float, default=989.0, help="the device's dense bf16 TFLOP/s (H100/H200: 989)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = random_model(a.shape, getattr(torch, a.dtype), device)
    n_params = sum(p.numel() for p in base.parameters())
    data = batches(a.cells, a.steps + 1, a.batch, a.len, SHAPES[a.shape]["vocab_size"])
    # One warm-up step per side (kernels, allocator), then the timed steps.
    run_separate(base, [d[:1] for d in data], device)
    run_packed(base, [d[:1] for d in data], device)
    timed = [d[1:] for d in data]
    n_tok = sum(mb.n_tokens for d in timed for mbs in d for mb in mbs)
    t_sep, t_pack = run_separate(base, timed, device), run_packed(base, timed, device)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": a.shape,
           "dtype": a.dtype, "cells": a.cells, "steps": a.steps, "batch": a.batch, "max_len": a.len,
           "threads": torch.get_num_threads(), "tokens": n_tok, "separate_s": round(t_sep, 3),
           "packed_s": round(t_pack, 3), "separate_tok_s": round(n_tok / t_sep, 1),
           "packed_tok_s": round(n_tok / t_pack, 1), "ratio_packed_over_separate": round(t_sep / t_pack, 3)}
    if device.type == "cuda":
        for side in ("separate", "packed"):
            res[f"{side}_mfu"] = round(res[f"{side}_tok_s"] * 4 * n_params / (a.peak * 1e12), 4)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
