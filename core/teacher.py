"""Who wrote the rollouts, read from the config alone: the teacher's name and
identity (docs/findings.md "The teacher"). What the teacher produced (its
accuracy and text variety) is measured from the rollouts by
rollouts/teacher.py; both travel with the claims and the tracked runs."""
from __future__ import annotations


def teacher_name(cfg) -> str:
    """The teacher as one string: the vLLM model, the scripted teacher with
    its error rate, or the endpoint's model."""
    if cfg.rollouts.backend == "openai":
        return f"openai:{cfg.rollouts.endpoint.model}"
    if cfg.rollouts.backend == "scripted":
        return f"scripted:error_rate={cfg.rollouts.scripted_error_rate}"
    return cfg.rollouts.teacher or cfg.model.name


def teacher_identity(cfg) -> dict:
    """kind (vllm | scripted | endpoint), name, and what else fixes the
    teacher: the scripted error rate, the endpoint's URL, the sampling."""
    ro = cfg.rollouts
    kind = {"vllm": "vllm", "scripted": "scripted", "openai": "endpoint"}[ro.backend]
    return {"teacher": teacher_name(cfg), "teacher_kind": kind,
            "teacher_error_rate": float(ro.scripted_error_rate) if kind == "scripted" else None,
            "teacher_endpoint": ro.endpoint.base_url if kind == "endpoint" and ro.endpoint else None,
            "teacher_is_policy": kind == "vllm" and teacher_name(cfg) == cfg.model.name,
            "teacher_k": int(ro.k), "teacher_temperature": float(ro.temperature)}
