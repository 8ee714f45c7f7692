"""A scripted teacher: procedurally written worked solutions whose final
answer is wrong with a configurable probability.

The fallback the rollouts issue names for settings where the real policy
cannot reach mixed rewards (e.g. the tiny random model of the end-to-end and
fault-tolerance tests, which answers nothing right): every loss still gets
positives, negatives and DPO pairs. Rewards are still computed by the real
math-verify reward on the written text; nothing about the pipeline changes
but who wrote the completions.
"""
from __future__ import annotations

import numpy as np

from ..core.models import load_tokenizer
from .datasets import Problem
from .prompts import encode_prompts, render_prompts

_OPENERS = ("Let me work this out.", "We compute step by step.", "Reading the question carefully:",
            "First, restate the problem.")


def _numeric(answer: str) -> float | None:
    try:
        return float(answer)
    except ValueError:
        return None


def scripted_completion(problem: Problem, rng: np.random.Generator, *, error_rate: float) -> str:
    """One worked solution; the boxed answer is off by 1-3 with prob. error_rate."""
    gold = problem.answer.strip()
    value = _numeric(gold)
    wrong = bool(rng.random() < error_rate)
    if wrong:
        delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
        if value is not None:
            v = value + delta
            ans = str(int(v)) if float(v).is_integer() else f"{v:g}"
        else:
            ans = f"{gold}{abs(delta)}"
    else:
        ans = gold
    steps = " ".join(["Check the arithmetic once more."] * int(rng.integers(0, 4)))
    opener = _OPENERS[int(rng.integers(0, len(_OPENERS)))]
    return f"{opener} {problem.problem.strip()} {steps} The answer is \\boxed{{{ans}}}.".replace("  ", " ")


def scripted_samples(problems: list[Problem], *, k: int, error_rate: float, seed: int) -> list[list[str]]:
    """K completions per problem, deterministic in (seed, problem order)."""
    rng = np.random.default_rng(seed)
    return [[scripted_completion(p, rng, error_rate=error_rate) for _ in range(k)] for p in problems]


def run_scripted(job) -> dict:
    """Backend of the rollouts stage (a rollouts.stage.SamplingJob, like the vLLM/endpoint ones)."""
    import time

    cfg, stats = job.cfg, job.stats
    ro = cfg.rollouts
    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    stats.reward_cpus = 0.0
    stats.t_first = time.perf_counter()
    for i in job.pending:
        probs = job.shards[i]
        texts = render_prompts(tok, probs, instruction=cfg.data.instruction, system_prompt=cfg.data.system_prompt)
        pids = encode_prompts(tok, texts)
        comps = scripted_samples(probs, k=ro.k, error_rate=ro.scripted_error_rate, seed=ro.seed * 1_000_003 + i)
        results = [{"prompt_token_ids": pid, "samples": [
            {"text": c, "finish_reason": "stop", "logprobs": None,
             "token_ids": tok.encode(c, add_special_tokens=False) + [tok.eos_token_id]} for c in cs]}
            for pid, cs in zip(pids, comps)]
        job.finish_shard(i, texts, results)
    return {"n_engines": 0, "teacher": "scripted", "error_rate": ro.scripted_error_rate}
