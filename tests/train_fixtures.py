"""Shared helpers of the train tests: a tiny run directory with rollouts and
pairs tables of the real schema (docs/design.md), tokenized for tiny-qwen3,
and a Ray instance for the session's train tests."""
from __future__ import annotations

import numpy as np
import pytest
from wsg.core import rundir
from wsg.core.layout import RunLayout
from wsg.rollouts.schema import pairs_table, rollouts_table
from wsg.sweep.config import parse_config


def tiny_cfg(**train):
    """tiny-qwen3, LoRA r=4, few steps, seq ≤ 64."""
    t = dict(lora={"r": 4, "alpha": 8, "dropout": 0.0}, effective_batch=4, per_device_batch=2, grad_accum=2,
             num_workers=1, max_steps=2, checkpoint_steps=[1, 2], max_seq_len=64, warmup_frac=0.25,
             cpus_per_worker=1, max_failures=0)
    t.update(train)
    return parse_config({"model": {"name": "tiny-qwen3"}, "train": t,
                         "grid": {"losses": ["sft"]}, "analysis": {"reference_loss": "sft"}})


def make_rollouts(tokenizer, *, n_prompts=6, k=4, seed=0, all_wrong=False, all_right=False):
    """Arithmetic prompts, K sampled-looking completions each, binary rewards;
    token ids stored as the policy (teacher = policy) would have."""
    rng = np.random.default_rng(seed)
    rows, pairs = [], []
    for p in range(n_prompts):
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        problem = f"What is {a} + {b}?"
        prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                                    add_generation_prompt=True)
        p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        outcomes = []
        for s in range(k):
            right = bool(rng.random() < 0.5) if not (all_wrong or all_right) else all_right
            ans = a + b if right else a + b + int(rng.integers(1, 5))
            filler = " ".join(["so"] * int(rng.integers(0, 12)))
            completion = f"We add {a} and {b} {filler}. The answer is \\boxed{{{ans}}}."
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append({"prompt_id": f"p{p}", "sample_idx": s, "problem": problem, "prompt_text": prompt_text,
                         "completion": completion, "gold": str(a + b), "reward": float(right),
                         "prompt_token_ids": p_ids, "completion_token_ids": c_ids, "completion_logprobs": None,
                         "n_prompt_tokens": len(p_ids), "n_completion_tokens": len(c_ids), "finish_reason": "stop",
                         "teacher": "tiny-qwen3", "temperature": 1.0, "top_p": 1.0, "max_tokens": 64})
            outcomes.append((s, right, completion))
        good = [o for o in outcomes if o[1]]
        bad = [o for o in outcomes if not o[1]]
        for g, w in list(zip(good, bad))[:2]:
            pairs.append({"prompt_id": f"p{p}", "prompt_text": prompt_text, "chosen": g[2], "rejected": w[2],
                          "chosen_sample_idx": g[0], "rejected_sample_idx": w[0]})
    return rollouts_table(rows), pairs_table(pairs)


def write_run(run: str, tokenizer, **kw) -> str:
    r, p = make_rollouts(tokenizer, **kw)
    rundir.write_table(RunLayout.of(run).rollouts, r)
    rundir.write_table(RunLayout.of(run).pairs, p)
    return run


@pytest.fixture(scope="session")
def tokenizer():
    from wsg.core.models import load_tokenizer

    return load_tokenizer("tiny-qwen3")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for a module's tests. It stays up for the next module (one
    start per session, shut down at exit by Ray itself); a module that needs
    a process without Ray (test_train_validation) shuts it down, and the next
    user starts it again here."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
