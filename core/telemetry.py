"""Custom Ray metrics shown in the Ray dashboard (Metrics tab / Prometheus).

Tags are low-cardinality on purpose (loss name, stage), never a cell id or a
step: a metric per cell would explode the time-series count on a big grid.
Every call is a no-op outside a Ray worker/driver, so stages stay testable.
"""
from __future__ import annotations

import functools

_TAGS = ("loss", "stage")


@functools.lru_cache(maxsize=None)
def _metric(kind: str, name: str, description: str):
    from ray.util import metrics

    cls = {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind]
    return cls(name, description=description, tag_keys=_TAGS)


def _emit(kind: str, name: str, description: str, value: float, **tags) -> None:
    try:
        import ray

        if not ray.is_initialized():
            return
        m = _metric(kind, name, description)
        full = {k: str(tags.get(k, "")) for k in _TAGS}
        if kind == "counter":
            m.inc(value, tags=full)
        else:
            m.set(value, tags=full)
    except Exception:  # metrics must never break training
        pass


def cell_finished(loss: str, ok: bool) -> None:
    name = "wsg_cells_done" if ok else "wsg_cells_failed"
    _emit("counter", name, "grid cells finished" if ok else "grid cells failed", 1.0, loss=loss, stage="train")


def train_step(loss: str, step: int, loss_value: float, tokens_per_s: float) -> None:
    _emit("gauge", "wsg_train_step", "optimizer step of the running cell", float(step), loss=loss, stage="train")
    _emit("gauge", "wsg_train_loss", "training loss of the running cell", float(loss_value), loss=loss, stage="train")
    _emit("gauge", "wsg_train_tokens_per_s", "training tokens/s", float(tokens_per_s), loss=loss, stage="train")


def rollout_throughput(tokens_per_s: float, stage: str = "rollouts") -> None:
    _emit("gauge", "wsg_rollout_tokens_per_s", "generation tokens/s", float(tokens_per_s), stage=stage)


def geometry_pairs_done(n: int) -> None:
    _emit("counter", "wsg_geometry_pairs_done", "adapter pairs x modules computed", float(n), stage="geometry")
