"""What the cell driver hands its Ray Train worker (one frozen object, not a
string-keyed dict), and where a cell's processes run.

Placement (docs/training.md, "Where a cell runs"): an offline cell's worker
holds `train.cpus_per_worker` (+ GPUs). An online cell also owns a vLLM
engine. A CPU engine is reserved *inside* the worker's own Ray Train bundle
(worker CPUs + online.engine_cpus), so a cell is placed whole or not at all
(two online cells can never each hold a trainer and wait for an engine's
CPU), and the engine runs as a zero-resource actor pinned to the worker's
node. Steps alternate (sample, then train, then sync), so the trainer uses
the engine's cores while it computes and the engine the trainer's while it
samples: torch and vLLM each get the whole bundle's threads (1 engine on 2
cores: 174 vs 109 tok/s, docs/benchmarks.online.md). A GPU engine asks for
its own GPU (soft affinity to the worker's node when online.colocate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.cells import CellKey
from ..core.config import ExperimentConfig
from ..core.layout import RunLayout


@dataclass(frozen=True)
class Placement:
    """Resources of a cell's worker (and engine) and the threads each uses."""

    worker: dict[str, float]          # resources_per_worker of the Ray Train worker
    engine: Optional[dict[str, float]]  # the engine actor's own resources (None: inside the worker's bundle)
    trainer_threads: int
    engine_threads: Optional[int]     # vLLM OpenMP threads (None: what its actor was given)
    use_gpu: bool

    @property
    def total(self) -> dict[str, float]:
        """What one running cell holds in all (the grid's concurrency bound)."""
        out = dict(self.worker)
        for k, v in (self.engine or {}).items():
            out[k] = out.get(k, 0.0) + v
        return out


def placement(cfg: ExperimentConfig, *, online: bool) -> Placement:
    t, o = cfg.train, cfg.online
    use_gpu = t.gpus_per_worker > 0
    worker = {"CPU": float(t.cpus_per_worker), **({"GPU": float(t.gpus_per_worker)} if use_gpu else {})}
    if not online:
        return Placement(worker, None, max(1, int(t.cpus_per_worker)), None, use_gpu)
    if o.engine_gpus == 0 and o.colocate:
        worker["CPU"] += float(o.engine_cpus)
        threads = max(1, int(t.cpus_per_worker + o.engine_cpus))
        return Placement(worker, None, threads, threads, use_gpu)
    engine = {"CPU": float(o.engine_cpus), **({"GPU": float(o.engine_gpus)} if o.engine_gpus > 0 else {})}
    return Placement(worker, engine, max(1, int(t.cpus_per_worker)), None, use_gpu)


@dataclass(frozen=True)
class PromptSet:
    """An online cell's prompts: token ids (the rollout engines' chat
    template) and gold answers, built once by the driver."""

    prompt_ids: list
    golds: list


@dataclass(frozen=True)
class CellTask:
    """Everything one cell's worker needs; crosses the process boundary whole."""

    cfg: ExperimentConfig
    layout: RunLayout         # the run's folder, named once by the driver
    key: CellKey
    fingerprint: dict
    data: Any                 # ObjectRef of the TrainSet (offline) or PromptSet (online)
    online: bool
    placement: Placement
    sync: Optional[str] = None          # online: the resolved weight-sync strategy
    stop_after: Optional[int] = None    # stop resumably after this step
    fault_crash_at: Optional[int] = None  # fault-tolerance tests only (train/worker.py)
    rollouts_hash: Optional[str] = None   # the shared rollouts' spec hash (adapter cards)
    shared: bool = False      # runs in a shared grid worker process (train/shared.py)

    @property
    def run(self) -> str:
        return self.layout.root

    @property
    def cell_id(self) -> str:
        return self.key.id
