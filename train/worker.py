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

from wsg.sweep import rundir, telemetry, tracking
from wsg.sweep.errors import WsgError
from wsg.sweep.layout import RunLayout
from wsg.train import checkpoint as ck
from wsg.sweep.adapter_card import AdapterCard
from wsg.train.task import CellTask


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
        from wsg.sweep.models import cache_root

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
        from wsg.train.online import OnPolicySource

        return OnPolicySource(task, data, device=device)
    from wsg.train.data import RolloutSource

    return RolloutSource(task, data, rank=rank, world=world)


def _record_placement_group(task: CellTask) -> None:
    """Which placement group this attempt's workers hold: when a Ray Train
    controller fails on an error it does not retry (e.g. an actor lost with
    a node), it can leave its worker group's placement group behind, holding
    CPUs until the driver exits; train/cell.py frees it from this record."""
    import ray

    pg = ray.util.get_current_placement_group()
    if pg is not None:
        rundir.write_json(RunLayout(task.run).cell(task.key.id).placement_group, {"id": pg.id.hex()})


def train_loop_per_worker(config: dict) -> None:
    """Entry point of `TorchTrainer`: config = {"task": CellTask}."""
    import ray.train
    import ray.train.torch

    from wsg.train.steps import configure_threads

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
    import ray

    from wsg.train.losses import get_loss, validate_hyper
    from wsg.train.steps import PolicyTrainer, build_policy, resolve_autocast, train_step, warmup_steps

    cfg, key, t = task.cfg, task.key, task.cfg.train
    cl = RunLayout(task.run).cell(key.id)
    lcfg = cfg.loss_cfg(key.loss)
    spec = get_loss(key.loss, lcfg.variant)
    hyper = validate_hyper(key.loss, lcfg.variant, lcfg.hyper)
    clock = {"worker_entered": entered or time.time(), "steps_s": 0.0, "checkpoint_s": 0.0}
    source.begin()  # an engine starts loading while the trainer builds
    policy = build_policy(cfg, seed=key.init_seed, device=device)
    torch.manual_seed(key.data_seed * 1009 + rank)  # dropout stream: per rank, from the data seed only
    trainer = PolicyTrainer(
        policy, lr=key.lr, weight_decay=t.weight_decay, warmup_steps=warmup_steps(t.max_steps, t.warmup_frac),
        max_steps=t.max_steps, max_grad_norm=t.max_grad_norm, device=device, world_size=world,
        micro_per_step=source.micro_per_step, units_per_micro=source.units_per_micro,
        autocast=resolve_autocast(t.precision, torch.device(device)),
        deepspeed_stage=t.deepspeed.zero_stage if t.deepspeed.enabled and not task.online else None)

    start, history = 0, []
    if resume_dir is not None:
        state = ck.load_resume_state(trainer, resume_dir, rank=rank)
        start, history = int(state["step"]), list(state["history"])[: int(state["step"])]
        source.restore(state.get("source", {}))
    publish = set(t.checkpoint_steps) | {t.max_steps}
    status = {"state": "complete", "step": t.max_steps}
    source.ready(policy)
    clock["setup_done"] = time.time()
    tracker = tracking.NULL
    if rank == 0:
        tracker = tracking.open_cell(cfg.tracking, experiment=cfg.name, run=task.run, key=key,
                                     params=tracking.cell_params(cfg, key, hyper=hyper),
                                     paths=RunLayout(task.run).tracking_paths(key.id), start_step=start)

    for step in range(start, t.max_steps):
        s = step + 1
        _maybe_inject_fault(task.fault_crash_at, s, cl.fault_marker)
        stopping = task.stop_after is not None and s >= task.stop_after and s < t.max_steps
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            batch = source.batch(step)
        except WsgError as err:  # e.g. the engine refused the prompts: retrying cannot help
            status = {"state": "failed", "step": s, "reason": "error", "message": f"cell {key.id}: {err}"}
            break
        t1 = time.perf_counter()
        out = train_step(trainer, spec, hyper, batch.micro_batches, world=world, observer=batch.observer)
        t2 = time.perf_counter()
        bad = _non_finite(out)
        after = source.after_step(policy, s, last=s == t.max_steps or stopping or bad is not None)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        clock["steps_s"] += dt
        # CPU seconds too: on a shared box wall time measures the neighbours.
        row = {"step": s, **out, **batch.metrics, **after, "train_s": t2 - t1, "tokens_per_s": out["tokens"] / dt,
               "step_time_s": dt, "step_cpu_s": cpu, **_peak_memory(device)}
        history.append(row)
        if rank == 0:
            telemetry.train_step(key.loss, s, float(out["loss"]), row["tokens_per_s"])
            ck.write_metrics(cl.metrics, history)
            rundir.write_json(cl.progress, {"step": s, "max_steps": t.max_steps, "loss": float(out["loss"]),
                                            "tokens_per_s": row["tokens_per_s"], "time": time.time()})
            tracker.log(row)
        if bad:
            status = {"state": "failed", "step": s, "reason": "nan",
                      "message": f"cell {key.id}: the {bad} at step {s} (loss={out['loss']}, grad_norm="
                                 f"{out['grad_norm']}); lower the learning rate ({key.lr:g}) or check the rollouts"}
            report(row, None)
            break
        t3 = time.perf_counter()
        if s in publish:
            card = AdapterCard.of(cfg, key, s, rollouts_hash=task.rollouts_hash if not task.online else "on-policy",
                                  hyper=hyper)
            ck.publish_adapter(trainer, cl.step(s), rank=rank, card=card, root=task.run)
        if s in publish or stopping or (t.resume_every and s % t.resume_every == 0):
            with tempfile.TemporaryDirectory(prefix="wsg-resume-", ignore_cleanup_errors=True) as tmp:
                ck.save_resume_state(trainer, tmp, rank=rank, state={
                    "step": s, "history": history, "fingerprint": task.fingerprint, "source": source.state()})
                report(row, tmp)
            tracker.flush()
        else:
            report(row, None)
        clock["checkpoint_s"] += time.perf_counter() - t3
        if stopping:
            status = {"state": "stopped", "step": s}
            break
    if rank == 0:
        status["final"] = history[-1] if history else {}
        status["node_id"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        status["timeline"] = {**clock, "loop_done": time.time()}
        rundir.write_json(cl.status, status)
        tracker.close({**status, "cell_id": key.id}, state=status["state"])
    return {"policy": policy, "history": history, "status": status}
