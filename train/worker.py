"""The Ray Train loop of every cell (one process per rank), offline or online.

Per optimizer step (seed paper §2 Training: AdamW, cosine with warmup, weight
decay, clip 1.0): the cell's batch source gives this rank's micro-batches —
the seeded window of the shared rollouts (`RolloutSource`, train/data.py) or
groups freshly sampled from the current policy (`OnPolicySource`,
train/online.py) — then one `train_step` (train/steps.py) runs forward and
backward over them and steps the optimizer, and the source may act on the
new weights (the on-policy source syncs them to its engine). Every step's
metrics go to `ray.train.report` and `<cell>/metrics.parquet`; adapters and
resume state (one format, train/checkpoint.py) are written at the
checkpoint steps.

A NaN/inf loss or gradient norm, or a user error (WsgError) while sampling,
stops the cell: rank 0 records it in `<cell>/status.json` and the loop
returns (raising would make Ray Train retry a deterministic failure). A
process that dies (OOM kill, engine crash, lost node) is retried by Ray
Train from the last registered checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time

import torch

from ..core import rundir, telemetry, tracking
from ..core.adapter_card import AdapterCard
from ..core.errors import WsgError
from ..core.models import cache_root
from . import checkpoint as ck
from .data import RolloutSource
from .losses import get_loss, validate_hyper
from .online import OnPolicySource
from .steps import (
    PolicyTrainer,
    build_policy,
    configure_threads,
    resolve_autocast,
    train_step,
    warmup_steps,
)
from .task import CellTask


def _non_finite(out: dict) -> str | None:
    """'loss is NaN' etc. when the step's loss or gradient norm is not finite."""
    for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
        v = out[key]
        if not math.isfinite(v):
            return f"{name} is {'NaN' if math.isnan(v) else 'infinite'}"
    return None


def _peak_memory(device) -> dict:
    """Peak RSS of this worker process so far (and peak CUDA memory), in MB."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # Linux: KiB
    if torch.device(device).type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _setup_env(use_gpu: bool) -> None:
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_root() / "torch_extensions")  # DeepSpeed op builds, cached


def _maybe_inject_fault(crash_at: int | None, step: int, marker: str) -> None:
    """Fault-injection hook of the fault-tolerance tests: the worker process
    dies (as from an OOM kill) at the start of step `crash_at`, once per cell
    (a marker in the cell folder records it), so Ray Train must restart the
    worker group and resume from the last registered checkpoint."""
    if crash_at is None or step != int(crash_at) or rundir.exists(marker):
        return
    rundir.write_text(marker, f"worker crashed on purpose at step {step}\n")
    os._exit(1)


def make_source(task: CellTask, *, rank: int, world: int, device):
    """The cell's batch source: what the registry says the loss trains on."""
    import ray

    data = ray.get(task.data) if isinstance(task.data, ray.ObjectRef) else task.data
    if task.online:
        return OnPolicySource(task, data, device=device)

    return RolloutSource(task, data, rank=rank, world=world)


def _record_placement_group(task: CellTask) -> None:
    """Which placement group this attempt's workers hold: when a Ray Train
    controller fails on an error it does not retry (e.g. an actor lost with
    a node), it can leave its worker group's placement group behind, holding
    CPUs until the driver exits; train/cell.py frees it from this record."""
    import ray

    pg = ray.util.get_current_placement_group()
    if pg is not None:
        rundir.write_json(task.layout.cell(task.key.id).placement_group, {"id": pg.id.hex()})


def train_loop_per_worker(config: dict) -> None:
    """Entry point of `TorchTrainer`: config = {"task": CellTask}."""
    import ray.train
    import ray.train.torch

    task: CellTask = config["task"]
    entered = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        _record_placement_group(task)
    _setup_env(task.placement.use_gpu)
    configure_threads(task.placement.trainer_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = ray.train.torch.get_device()
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        c = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        name = f"step_{int(metrics['step']):08d}" if ckpt_dir else None
        ray.train.report(metrics, checkpoint=c, checkpoint_dir_name=name)

    source = make_source(task, rank=rank, world=world, device=device)
    try:
        with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(None) as resume_dir:
            fit(task, source, rank=rank, world=world, device=device, report=report, resume_dir=resume_dir,
                entered=entered)
    finally:
        source.close()


def fit(task: CellTask, source, *, rank: int, world: int, device, report, resume_dir: str | None,
        entered: float | None = None) -> dict:
    """The loop itself, with Ray's report/checkpoint passed in. Returns the
    policy and the metrics history (for in-process use: tests, benches).

    status.json's `timeline` (wall-clock seconds since the epoch, and
    durations) says where the cell's time went besides its steps
    (bench/cell_overhead.py): loop entry, setup done, the steps, checkpoints."""
    loop = _Loop(task, source, rank=rank, world=world, device=device, report=report, entered=entered)
    loop.start(resume_dir)
    status = {"state": "complete", "step": task.cfg.train.max_steps}
    for step in range(loop.start_step, task.cfg.train.max_steps):
        status = loop.step(step)
        if status is not None:
            break
    return loop.finish(status or {"state": "complete", "step": task.cfg.train.max_steps})


class _Loop:
    """One cell's training loop on one rank: set-up (policy, trainer, resume,
    tracker), one step at a time, and the final status."""

    def __init__(self, task: CellTask, source, *, rank: int, world: int, device, report, entered: float | None):
        self.task, self.source, self.rank, self.world, self.device, self.report = task, source, rank, world, device, report
        cfg, key = task.cfg, task.key
        self.cl = task.layout.cell(key.id)
        lcfg = cfg.loss_cfg(key.loss)
        self.spec = get_loss(key.loss, lcfg.variant)
        self.hyper = validate_hyper(key.loss, lcfg.variant, lcfg.hyper)
        self.clock = {"worker_entered": entered or time.time(), "steps_s": 0.0, "checkpoint_s": 0.0}
        self.tracker = tracking.NULL
        self.start_step, self.history = 0, []

    def start(self, resume_dir: str | None) -> None:
        task, cfg, key, t, source = self.task, self.task.cfg, self.task.key, self.task.cfg.train, self.source
        source.begin()  # an engine starts loading while the trainer builds
        self.policy = build_policy(cfg, seed=key.init_seed, device=self.device, keep_base=task.shared)
        torch.manual_seed(key.data_seed * 1009 + self.rank)  # dropout stream: per rank, from the data seed only
        self.trainer = PolicyTrainer(
            self.policy, lr=key.lr, weight_decay=t.weight_decay,
            warmup_steps=warmup_steps(t.max_steps, t.warmup_frac), max_steps=t.max_steps,
            max_grad_norm=t.max_grad_norm, device=self.device, world_size=self.world,
            micro_per_step=source.micro_per_step, units_per_micro=source.units_per_micro,
            autocast=resolve_autocast(t.precision, torch.device(self.device)),
            deepspeed_stage=t.deepspeed.zero_stage if t.deepspeed.enabled and not task.online else None)
        if resume_dir is not None:
            state = ck.load_resume_state(self.trainer, resume_dir, rank=self.rank)
            self.start_step = int(state["step"])
            self.history = list(state["history"])[: self.start_step]
            source.restore(state.get("source", {}))
        self.publish = set(t.checkpoint_steps) | {t.max_steps}
        source.ready(self.policy)
        self.clock["setup_done"] = time.time()
        if self.rank == 0:
            self.tracker = tracking.open_cell(cfg.tracking, experiment=cfg.name, run=task.run, key=key,
                                              params=tracking.cell_params(cfg, key, hyper=self.hyper),
                                              paths=task.layout.tracking_paths(key.id), start_step=self.start_step)

    def step(self, step: int) -> dict | None:
        """Train step `step` + 1; a status when the loop ends here, else None."""
        task, key, t, source = self.task, self.task.key, self.task.cfg.train, self.source
        s = step + 1
        _maybe_inject_fault(task.fault_crash_at, s, self.cl.fault_marker)
        stopping = task.stop_after is not None and s >= task.stop_after and s < t.max_steps
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            batch = source.batch(step)
        except WsgError as err:  # e.g. the engine refused the prompts: retrying cannot help
            return {"state": "failed", "step": s, "reason": "error", "message": f"cell {key.id}: {err}"}
        t1 = time.perf_counter()
        out = train_step(self.trainer, self.spec, self.hyper, batch.micro_batches, world=self.world,
                         observer=batch.observer)
        t2 = time.perf_counter()
        bad = _non_finite(out)
        after = source.after_step(self.policy, s, last=s == t.max_steps or stopping or bad is not None)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.clock["steps_s"] += dt
        # CPU seconds too: on a shared box wall time measures the neighbours.
        row = {"step": s, **out, **batch.metrics, **after, "train_s": t2 - t1, "tokens_per_s": out["tokens"] / dt,
               "step_time_s": dt, "step_cpu_s": cpu, **_peak_memory(self.device)}
        self.history.append(row)
        if self.rank == 0:
            self._record(s, row, out)
        if bad:
            self.report(row, None)
            return {"state": "failed", "step": s, "reason": "nan",
                    "message": f"cell {key.id}: the {bad} at step {s} (loss={out['loss']}, grad_norm="
                               f"{out['grad_norm']}); lower the learning rate ({key.lr:g}) or check the rollouts"}
        t3 = time.perf_counter()
        self._checkpoint(s, row, stopping)
        self.clock["checkpoint_s"] += time.perf_counter() - t3
        return {"state": "stopped", "step": s} if stopping else None

    def _record(self, s: int, row: dict, out: dict) -> None:
        t = self.task.cfg.train
        telemetry.train_step(self.task.key.loss, s, float(out["loss"]), row["tokens_per_s"])
        ck.write_metrics(self.cl.metrics, self.history)
        rundir.write_json(self.cl.progress, {"step": s, "max_steps": t.max_steps, "loss": float(out["loss"]),
                                             "tokens_per_s": row["tokens_per_s"], "time": time.time()})
        self.tracker.log(row)

    def _checkpoint(self, s: int, row: dict, stopping: bool) -> None:
        """Publish the adapter at a checkpoint step; save resume state there,
        when stopping and every `train.resume_every` steps; report to Ray."""
        task, t = self.task, self.task.cfg.train
        if s in self.publish:
            card = AdapterCard.of(task.cfg, task.key, s, hyper=self.hyper,
                                  rollouts_hash=task.rollouts_hash if not task.online else "on-policy")
            ck.publish_adapter(self.trainer, self.cl.step(s), rank=self.rank, card=card, root=task.run)
        if s in self.publish or stopping or (t.resume_every and s % t.resume_every == 0):
            with tempfile.TemporaryDirectory(prefix="wsg-resume-", ignore_cleanup_errors=True) as tmp:
                ck.save_resume_state(self.trainer, tmp, rank=self.rank, state={
                    "step": s, "history": self.history, "fingerprint": task.fingerprint,
                    "source": self.source.state()})
                self.report(row, tmp)
            self.tracker.flush()
        else:
            self.report(row, None)

    def finish(self, status: dict) -> dict:
        import ray

        if self.rank == 0:
            status["final"] = self.history[-1] if self.history else {}
            status["node_id"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
            status["pid"] = os.getpid()  # which worker process trained it (a shared one trains many)
            status["timeline"] = {**self.clock, "loop_done": time.time()}
            rundir.write_json(self.cl.status, status)
            self.tracker.close({**status, "cell_id": self.task.key.id}, state=status["state"])
        return {"policy": self.policy, "history": self.history, "status": status}
