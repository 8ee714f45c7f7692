"""What only a GPU shows about a cell's training step (docs/benchmarks.md, "GPU").

1. Correctness on CUDA. For every registered loss, one optimizer step of the
   trainer a cell runs (`train.steps.PolicyTrainer` + `train_step`) on the same
   sequences, from the same LoRA weights: on CPU in fp32 (the reference), on
   CUDA in fp32 (must agree: loss, pre-clip grad norm, updated weights), and on
   CUDA with bf16 autocast, as the paper config trains (reported: relative
   error of loss and grad norm, cosine of the weight update to the fp32 one).
2. The one loss normaliser on CUDA: a step over one micro-batch equals the
   step over the same rows in two micro-batches (groups and pairs kept whole).
3. bf16 throughput and peak GPU memory of the step at two shapes with random
   weights (a device without network cannot download; speed does not depend
   on the values): SmolLM2-135M and Qwen3-4B, the paper's LoRA (q,k,v,o, r=32,
   alpha 64), per-device batch 4, sequences of a 128-token prompt plus
   256..(max_seq_len - 128) completion tokens (configs/paper_qwen3_4b.yaml),
   SFT (policy forward) and DPO (policy + reference forward).

4. DeepSpeed (the paper config's `train.deepspeed: {zero_stage: 2}`), when
   importable: the same trainer with ZeRO-2 and ZeRO-3 on one GPU (a
   one-rank NCCL group), bf16. Correctness on the tiny model against the
   plain bf16-autocast step (DeepSpeed keeps bf16 weights with fp32 master
   copies, so close, not equal), and throughput/peak memory at Qwen3-4B.

Needs torch with CUDA, transformers, peft, pydantic, pyarrow, yaml; no Ray,
no vLLM. The tiny model is any small causal LM folder (wsg's `tiny-qwen3`
cache folder: `python -c "from core.models import resolve_model as r;
print(r('tiny-qwen3'))"`).

    python bench/gpu_check.py --tiny FOLDER [--steps 5] [--out gpu_check.json]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from wsg.core.config import LoraCfg  # noqa: E402
from wsg.train.data import collate_sequences  # noqa: E402
from wsg.train.losses import LOSSES, get_loss, validate_hyper  # noqa: E402
from wsg.train.steps import PolicyTrainer, attach_lora, train_step  # noqa: E402

PAPER_LORA = {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# Shapes from the models' published config.json files (random weights here).
SHAPES = {
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0),
    "qwen3-4b": dict(arch="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0),
}


def _lora_cfg(r=8):
    return LoraCfg(**{**PAPER_LORA, "r": r, "alpha": 2 * r})


@functools.lru_cache(maxsize=1)
def _tiny_base(tiny: str):
    """The tiny model, read once; each step takes a deep copy (peft mutates it)."""
    from wsg.core.models import load_causal_lm

    return load_causal_lm(tiny, dtype=torch.float32)


def _vocab(tiny: str) -> int:
    return int(_tiny_base(tiny).config.vocab_size)


# ----------------------------------------------------------------- 1 and 2

def _sequences(vocab: int, rng) -> dict:
    """8 sequences: 2 prompts x 4 samples, 2 right + 2 wrong per prompt."""
    seqs, npr, rewards, groups, behaviour = [], [], [], [], []
    for g in range(2):
        prompt = rng.integers(10, vocab, size=int(rng.integers(12, 24))).tolist()
        for s in range(4):
            comp = rng.integers(10, vocab, size=int(rng.integers(5, 40))).tolist()
            seqs.append(prompt + comp)
            npr.append(len(prompt))
            rewards.append(float(s < 2))
            groups.append(g)
            behaviour.append((-rng.uniform(0.1, 3.0, size=len(comp))).tolist())
    return {"seqs": seqs, "npr": npr, "rewards": rewards, "groups": groups, "behaviour": behaviour}


def _micro(data: dict, rows: list[int], pad: int):
    """A micro-batch of `rows`: pairs (right, wrong) within each group."""
    local = {r: i for i, r in enumerate(rows)}
    pairs = [(local[a], local[b]) for g in (0, 4) for a, b in ((g, g + 2), (g + 1, g + 3))
             if a in local and b in local]
    pick = lambda k: [data[k][r] for r in rows]  # noqa: E731
    return collate_sequences(pick("seqs"), pick("npr"), pad_id=pad, rewards=pick("rewards"),
                             group_ids=pick("groups"), pair_index=pairs or None, behaviour_logprobs=pick("behaviour"))


def _one_step(tiny: str, loss: str, data: dict, splits: list[list[int]], device: str, autocast,
              zero: int | None = None) -> dict:
    base = copy.deepcopy(_tiny_base(tiny))
    policy = attach_lora(base, _lora_cfg(), seed=5, device="cpu")
    with torch.no_grad():  # a non-zero adapter: DPO's margin and the ratios are then non-trivial
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.to(device)
    trainer = PolicyTrainer(policy, lr=1e-3, weight_decay=0.01, warmup_steps=0, max_steps=4, max_grad_norm=1e9,
                            device=torch.device(device), micro_per_step=len(splits), autocast=autocast,
                            deepspeed_stage=zero, units_per_micro=len(splits[0]))
    pad = int(base.config.pad_token_id or 0)
    out = train_step(trainer, get_loss(loss), validate_hyper(loss), [_micro(data, s, pad) for s in splits], world=1)
    with trainer.gathered():
        after = {n: p.detach().float().cpu() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    delta = torch.cat([(after[n] - before[n]).flatten() for n in sorted(before)])
    return {"loss": out["loss"], "grad_norm": out["grad_norm"], "after": after, "delta": delta}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def correctness(tiny: str, device: str = "cuda") -> list[dict]:
    data = _sequences(_vocab(tiny), np.random.default_rng(0))
    whole, halves = [list(range(8))], [list(range(4)), list(range(4, 8))]
    rows = []
    for loss in sorted(LOSSES):
        try:
            rows.append(_compare(tiny, loss, data, whole, halves, device))
        except Exception as exc:  # noqa: BLE001 - one loss failing must not hide the others
            rows.append({"loss": loss, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _compare(tiny: str, loss: str, data: dict, whole, halves, device: str) -> dict:
    ref = _one_step(tiny, loss, data, whole, "cpu", None)
    gpu = _one_step(tiny, loss, data, whole, device, None)
    split = _one_step(tiny, loss, data, halves, device, None)
    bf16 = _one_step(tiny, loss, data, whole, device, torch.bfloat16)
    wdiff = max(float((gpu["after"][n] - ref["after"][n]).abs().max()) for n in ref["after"])
    sdiff = max(float((split["after"][n] - gpu["after"][n]).abs().max()) for n in gpu["after"])
    cos = float(torch.nn.functional.cosine_similarity(bf16["delta"], ref["delta"], dim=0))
    row = {"loss": loss, "loss_cpu": ref["loss"], "loss_cuda": gpu["loss"], "grad_norm_cpu": ref["grad_norm"],
           "cuda_fp32_loss_rel": _rel(gpu["loss"], ref["loss"]),
           "cuda_fp32_gradnorm_rel": _rel(gpu["grad_norm"], ref["grad_norm"]),
           "cuda_fp32_weights_maxabs": wdiff,
           "split_loss_rel": _rel(split["loss"], gpu["loss"]),
           "split_gradnorm_rel": _rel(split["grad_norm"], gpu["grad_norm"]), "split_weights_maxabs": sdiff,
           "bf16_loss_rel": _rel(bf16["loss"], ref["loss"]),
           "bf16_gradnorm_rel": _rel(bf16["grad_norm"], ref["grad_norm"]), "bf16_update_cos": cos}
    # lr 1e-3: Adam's first step moves an entry by ~lr; 1e-5 is 1% of it.
    row["ok"] = bool(ref["grad_norm"] > 0 and row["cuda_fp32_loss_rel"] < 1e-4 and
                     row["cuda_fp32_gradnorm_rel"] < 1e-3 and wdiff < 1e-5 and
                     row["split_loss_rel"] < 1e-5 and row["split_gradnorm_rel"] < 1e-4 and sdiff < 1e-5)
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------- 3

def _random_model(shape: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    kw = dict(shape)
    conf = (LlamaConfig if kw.pop("arch") == "llama" else Qwen3Config)(**kw)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)


def throughput(name: str, *, steps: int, batch: int, max_len: int, zero: int | None = None,
               ckpt: bool = False) -> list[dict]:
    shape = SHAPES[name]
    torch.cuda.empty_cache()
    base = _random_model(shape)
    policy = attach_lora(base, _lora_cfg(PAPER_LORA["r"]), seed=42, device="cuda", gradient_checkpointing=ckpt)
    trainer = PolicyTrainer(policy, lr=5e-6, weight_decay=0.01, warmup_steps=0, max_steps=10**6, max_grad_norm=1.0,
                            device=torch.device("cuda"), micro_per_step=1, autocast=torch.bfloat16,
                            deepspeed_stage=zero, units_per_micro=batch)
    rng = np.random.default_rng(0)
    rows = []
    for loss in ("sft", "dpo"):
        rows_per_micro = max(batch, 2) if loss == "dpo" else batch  # a DPO micro-batch holds whole pairs

        def micro(b=rows_per_micro):
            seqs = [rng.integers(10, shape["vocab_size"], size=128 + int(rng.integers(256, max_len - 127))).tolist()
                    for _ in range(b)]
            pairs = [(i, i + b // 2) for i in range(b // 2)] if loss == "dpo" else None
            return collate_sequences(seqs, [128] * b, pad_id=0, rewards=[1.0] * b, pair_index=pairs)

        spec, hyper = get_loss(loss), validate_hyper(loss)
        train_step(trainer, spec, hyper, [micro()], world=1)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, tokens = [], 0
        for _ in range(steps):
            mb = micro()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = train_step(trainer, spec, hyper, [mb], world=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            tokens += mb.n_tokens
            assert math.isfinite(out["loss"]), out
        row = {"model": name, "zero": zero, "ckpt": ckpt, "loss": loss, "rows": rows_per_micro, "max_len": max_len,
               "steps": steps,
               "s_per_step": float(np.median(times)), "tok_s": tokens / sum(times),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(json.dumps(row), flush=True)
        rows.append(row)
    del trainer, policy, base
    return rows


# ---------------------------------------------------------------------- 4

def _one_rank_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0"})
        dist.init_process_group("nccl", rank=0, world_size=1)
        torch.cuda.set_device(0)


def deepspeed_checks(tiny: str, *, steps: int, max_len: int, shapes: list[str]) -> dict:
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - reported, the rest of the check still counts
        return {"skipped": f"deepspeed not importable: {exc!r}"[:300]}
    _one_rank_group()
    data = _sequences(_vocab(tiny), np.random.default_rng(0))
    out = {"version": deepspeed.__version__, "correctness": [], "throughput": []}
    for zero in (2, 3):
        for loss in ("sft", "dpo", "online_grpo"):
            try:
                plain = _one_step(tiny, loss, data, [list(range(8))], "cuda", torch.bfloat16)
                ds = _one_step(tiny, loss, data, [list(range(8))], "cuda", torch.bfloat16, zero=zero)
                row = {"zero": zero, "loss": loss, "loss_rel": _rel(ds["loss"], plain["loss"]),
                       "gradnorm_rel": _rel(ds["grad_norm"], plain["grad_norm"]),
                       "update_cos": float(torch.nn.functional.cosine_similarity(ds["delta"], plain["delta"], dim=0))}
                row["ok"] = bool(row["loss_rel"] < 2e-2 and row["gradnorm_rel"] < 5e-2 and row["update_cos"] > 0.9)
            except Exception as exc:  # noqa: BLE001
                row = {"zero": zero, "loss": loss, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            print(json.dumps(row), flush=True)
            out["correctness"].append(row)
    for name in shapes:
        try:
            out["throughput"] += throughput(name, steps=steps, batch=4, max_len=max_len, zero=2)
        except Exception as exc:  # noqa: BLE001 - out of memory, or a DeepSpeed failure: reported
            out["throughput"].append({"model": name, "zero": 2, "error": f"{type(exc).__name__}: {exc}"[:400]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", required=True, help="folder of a small causal LM (correctness part)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="smollm2-135m,qwen3-4b", help="throughput shapes (comma list, may be empty)")
    ap.add_argument("--device", default="cuda", help="'cpu' dry-runs parts 1 and 2 without a GPU")
    ap.add_argument("--parts", default="correctness,throughput,checkpointing,deepspeed",
                    help="which parts to run (comma list)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.device == "cpu":
        rows = correctness(args.tiny, "cpu")
        return 0 if all(r["ok"] for r in rows) else 1
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(json.dumps(res), flush=True)
    t0 = time.perf_counter()
    res["correctness"] = correctness(args.tiny, "cuda") if "correctness" in parts else []
    res["correctness_s"] = time.perf_counter() - t0
    res["throughput"] = []
    shapes = [s for s in args.shapes.split(",") if s]
    runs = [(name, 4, False) for name in shapes if "throughput" in parts]
    # Gradient checkpointing at the paper's batch, and at batch 1 (smaller GPUs).
    runs += [(name, b, True) for name in shapes if name == "qwen3-4b" and "checkpointing" in parts for b in (4, 1)]
    for name, batch, ckpt in runs:
        try:
            res["throughput"] += throughput(name, steps=args.steps, batch=batch, max_len=3072, ckpt=ckpt)
        except torch.OutOfMemoryError as exc:  # report, do not lose the rest
            res["throughput"].append({"model": name, "ckpt": ckpt, "error": f"out of memory: {exc}"[:300]})
    _write(args.out, res)  # before the DeepSpeed part, so that a crash there loses nothing
    res["deepspeed"] = (deepspeed_checks(args.tiny, steps=args.steps, max_len=3072,
                                         shapes=[s for s in shapes if s == "qwen3-4b"])
                        if "deepspeed" in parts else {})
    _write(args.out, res)
    ok = all(r["ok"] for r in res["correctness"] + res["deepspeed"].get("correctness", []))
    print(f"correctness: {'all ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def _write(path: str | None, res: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
