"""The teacher as a recorded factor: who wrote the rollouts and what they are like.

At the scale a CPU box affords, a cross-loss cosine is bounded by how much two
runs of the *same* loss agree (the data-order floor), and that floor is set
far more by how varied the teacher's text is than by its accuracy
(docs/findings.md "The teacher"): templated text puts the floor near 1 within
a few dozen steps, sampled text keeps it near 0.1-0.2. So every run records

- the teacher's identity (`teacher_identity`): a model through vLLM, the
  scripted teacher with its error rate, or an OpenAI-compatible endpoint;
- what it produced (`teacher_profile`): the fraction of correct samples, the
  fraction of prompts with both outcomes, and two measures of text variety
  within a prompt's K samples: the number of distinct completions and the
  mean pairwise Jaccard overlap of their token sets (1 = the K samples use
  the same tokens; identical texts count as overlap 1).

The profile goes into the rollouts stage's summary (its _COMPLETE marker),
the claims table's metadata, the report's first lines and tracked runs'
params. Keys are flat and prefixed `teacher_` so they can be columns.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from typing import Iterable, Optional, Sequence

from ..core import rundir
from ..core.layout import RunLayout
from ..core.teacher import teacher_identity
from .schema import reward_summary


def jaccard(a: Iterable, b: Iterable) -> float:
    """|A ∩ B| / |A ∪ B| of two token sets; two empty sets are identical (1)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def text_variety(rows: Sequence[dict]) -> dict:
    """Per prompt (rows of one prompt_id: completion, completion_token_ids):
    the number of distinct completion texts and the mean Jaccard overlap of
    the token sets over the K(K-1)/2 pairs of its samples; both averaged over
    prompts (prompts with one sample have no pair and add no overlap)."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["prompt_id"]].append(r)
    distinct, overlaps = [], []
    for samples in by.values():
        distinct.append(len({s["completion"] for s in samples}))
        pairs = [jaccard(a["completion_token_ids"], b["completion_token_ids"]) for a, b in combinations(samples, 2)]
        if pairs:
            overlaps.append(sum(pairs) / len(pairs))
    k = max((len(v) for v in by.values()), default=0)
    return {"teacher_distinct_per_prompt": sum(distinct) / len(distinct) if distinct else None,
            "teacher_distinct_frac": (sum(distinct) / (len(distinct) * k)) if distinct and k else None,
            "teacher_token_jaccard": sum(overlaps) / len(overlaps) if overlaps else None}


def teacher_profile(cfg, rows: Sequence[dict]) -> dict:
    """Identity plus what the teacher produced on these rollouts rows."""

    s = reward_summary(rows)
    return {**teacher_identity(cfg), "teacher_accuracy": s["reward_mean"],
            "teacher_frac_prompts_mixed": s["frac_prompts_mixed"], **text_variety(rows)}


def read_teacher_profile(cfg, run: str | RunLayout) -> Optional[dict]:
    """The profile of a run's finished rollouts: from the stage's summary, or
    computed from rollouts.parquet for runs written before it was recorded;
    None when the rollouts are not there."""

    lay = RunLayout.of(run)
    if rundir.exists(lay.rollouts_complete):
        prof = rundir.read_json(lay.rollouts_complete).get("teacher_profile")
        if prof:
            return prof
    if not rundir.exists(lay.rollouts):
        return None
    cols = ["prompt_id", "completion", "completion_token_ids", "reward"]
    return teacher_profile(cfg, rundir.read_table(lay.rollouts, columns=cols).to_pylist())


def describe(p: Optional[dict]) -> str:
    """One sentence for a reader: who the teacher is and what it wrote."""
    if not p:
        return "Teacher: unknown (the rollouts stage has not finished)."
    who = {"scripted": f"the scripted teacher (templated text, error rate {p.get('teacher_error_rate')})",
           "endpoint": f"an endpoint ({p.get('teacher')})",
           "vllm": f"{p.get('teacher')} through vLLM" + (" (the model itself)" if p.get("teacher_is_policy") else "")
           }.get(p.get("teacher_kind"), str(p.get("teacher")))

    def pct(x):
        return "?" if x is None else f"{100 * x:.0f}%"

    def num(x, f):
        return "?" if x is None else format(x, f)

    return (f"Teacher: {who}, K={p.get('teacher_k')} at T={p.get('teacher_temperature')}: "
            f"{pct(p.get('teacher_accuracy'))} of samples correct, {pct(p.get('teacher_frac_prompts_mixed'))} of "
            f"prompts with both outcomes; text variety: {num(p.get('teacher_distinct_per_prompt'), '.2f')} "
            f"distinct completions per prompt, mean token-set overlap (Jaccard) within a prompt "
            f"{num(p.get('teacher_token_jaccard'), '.3f')}.")
