"""Cells in a shared worker process: the grid pays for training steps, not
start-ups (docs/design.md "Cells", docs/benchmarks.md "Cell overhead").

A grid trial whose cell fits one worker (one rank, no DeepSpeed, no GPU) runs
the cell's loop in the Tune trial's own process instead of a fresh Ray Train
worker group, and Tune hands that process the next cell of the same shape
(`reuse_actors`). So the process start, the base model (kept by
`build_policy(keep_base=True)`, each cell training a copy) and an online
cell's vLLM engine (train/online.py `_shared_engine`) are paid once per
worker slot, not once per cell. What makes a cell its own is untouched: its
LoRA init, data order, optimizer, schedule and RNG streams are all seeded at
its start (train/worker.py), and its checkpoints, status, metrics and
tracked run are written as before.

Resume state: the folders a Ray Train worker would report as checkpoints are
written under `<run>/train_state/<cell>/resume/step_<N>/` instead (the last
two kept; a folder counts once its `_COMPLETE` marker is written). A trial
whose process dies is retried by Tune (FailureConfig = train.max_failures)
and resumes from the last one; an error in one cell fails that cell's trial
only, and the next cell on the process starts from its own seeds.
"""
from __future__ import annotations

import contextlib
import tempfile
import time

import torch

from ..core import rundir
from ..core.config import ExperimentConfig
from ..core.layout import RunLayout
from .steps import configure_threads
from .task import CellTask
from .worker import _setup_env, fit, make_source

KEEP = 2  # resume folders kept per cell (Ray Train's CheckpointConfig(num_to_keep=2) before)


def shares_worker(cfg: ExperimentConfig, *, online: bool) -> bool:
    """Whether a cell of this config runs in a shared grid worker process:
    one rank, on CPU, no DeepSpeed (an online cell never uses DeepSpeed), and
    `resources.share_workers` on. Others keep a Ray Train worker group."""
    t = cfg.train
    return (cfg.resources.share_workers and t.num_workers == 1 and t.gpus_per_worker == 0
            and (online or not t.deepspeed.enabled))


class ResumeStore:
    """A cell's resume folders under `<run>/train_state/<cell>/resume/`."""

    def __init__(self, layout: RunLayout, cell_id: str):
        self.root = rundir.join(layout.train_state(cell_id), "resume")

    def _steps(self) -> list[int]:
        if not rundir.exists(self.root):
            return []
        names = [n for n in rundir.listdir(self.root) if n.startswith("step_")]
        return sorted(int(n[5:]) for n in names if rundir.is_complete(rundir.join(self.root, n)))

    def save(self, step: int, local_dir: str) -> None:
        """Keep `local_dir` as the state after `step`, whole (marker last), then
        drop all but the last KEEP."""
        dest = rundir.join(self.root, f"step_{step:08d}")
        rundir.upload_dir(local_dir, dest)
        rundir.mark_complete(dest, {"step": step})
        for old in self._steps()[:-KEEP]:
            fs, path = rundir.resolve(rundir.join(self.root, f"step_{old:08d}"))
            fs.delete_dir(path)

    @contextlib.contextmanager
    def latest(self):
        """A local folder with the last complete state, or None."""
        steps = self._steps()
        if not steps:
            yield None
            return
        src = rundir.join(self.root, f"step_{steps[-1]:08d}")
        if rundir.is_local(src):
            yield rundir.resolve(src)[1]
            return
        with tempfile.TemporaryDirectory(prefix="wsg-resume-") as tmp:
            yield rundir.download_dir(src, tmp)


def run_here(task: CellTask) -> None:
    """The cell's loop in this process (rank 0 of 1): what a Ray Train worker
    runs (train/worker.py `train_loop_per_worker`), with the resume state
    kept by a ResumeStore instead of Ray Train's checkpoints."""
    entered = time.time()
    store = ResumeStore(task.layout, task.key.id)
    _setup_env(use_gpu=False)
    configure_threads(task.placement.trainer_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        if ckpt_dir:
            store.save(int(metrics["step"]), ckpt_dir)

    source = make_source(task, rank=0, world=1, device="cpu")
    try:
        with store.latest() as resume_dir:
            fit(task, source, rank=0, world=1, device="cpu", report=report, resume_dir=resume_dir,
                entered=entered)
    finally:
        source.close()


__all__ = ["ResumeStore", "run_here", "shares_worker"]
