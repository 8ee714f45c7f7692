"""The Ray Train loop of an offline cell (one process per rank).

Per optimizer step (seed paper §2 Training: AdamW, cosine with warmup, weight
decay, clip 1.0): take the step's global batch from the seeded data order,
count its loss units over every micro-batch and rank (one normaliser per
step, train/losses.py), run forward+backward per micro-batch (reference
log-probs first, adapter disabled, for DPO/IPO), then clip and step. Metrics
of every step go to `ray.train.report` and `<cell>/metrics.parquet`;
adapters and resume state are written at the checkpoint steps.

A NaN/inf loss or gradient norm stops the cell: every rank sees the same
all-reduced value, so all stop together, and rank 0 records the step in
`<cell>/status.json` (the driver raises it as a WsgError; raising here would
make Ray Train retry a deterministic failure).
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import torch

from sweep import rundir, telemetry
from sweep.config import parse_config
from train import checkpoint as ck
from train.data import collate, epoch_at, micro_batches_per_rank, plan_step
from train.steps import PolicyTrainer, build_policy, configure_threads, resolve_autocast, train_step, warmup_steps

STATUS_FILE = "status.json"
METRICS_EVERY = 10  # also rewrite metrics.parquet every this many steps (progress)


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
        from sweep.models import cache_root

        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_root() / "torch_extensions")  # DeepSpeed op builds, cached


def _maybe_inject_fault(crash_at: int | None, step: int, cdir: str) -> None:
    """Fault-injection hook of the fault-tolerance tests: the worker process
    dies (as from an OOM kill) at the start of step `crash_at`, once per cell
    (a marker in the cell folder records it), so Ray Train must restart the
    worker group and resume from the last registered checkpoint. Off unless
    the driver's environment sets WSG_FAULT_CRASH_AT_STEP."""
    if crash_at is None or step != int(crash_at):
        return
    marker = rundir.join(cdir, "_fault_injected")
    if rundir.exists(marker):
        return
    rundir.write_text(marker, f"worker crashed on purpose at step {step}\n")
    os._exit(1)


def train_loop_per_worker(config: dict) -> None:
    """Entry point of `TorchTrainer`: config holds the cell, the resolved
    config dict and an ObjectRef to the driver-built TrainSet."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_env(config["use_gpu"])
    configure_threads(config["cpus_per_worker"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    ts = ray.get(config["data"])
    device = ray.train.torch.get_device()
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        c = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        name = f"step_{int(metrics['step']):08d}" if ckpt_dir else None
        ray.train.report(metrics, checkpoint=c, checkpoint_dir_name=name)

    if ckpt is not None:
        with ckpt.as_directory() as d:
            train_offline(config, ts, rank=rank, world=world, device=device, report=report, resume_dir=d)
    else:
        train_offline(config, ts, rank=rank, world=world, device=device, report=report, resume_dir=None)


def train_offline(config: dict, ts, *, rank: int, world: int, device, report, resume_dir: str | None) -> None:
    """The loop itself, with Ray's report/checkpoint passed in."""
    from train.losses import get_loss, validate_hyper

    cfg = parse_config(config["cfg"])
    run, cid, loss, seed, lr = config["run"], config["cell_id"], config["loss"], config["seed"], config["lr"]
    t, lcfg = cfg.train, cfg.loss_cfg(loss)
    spec = get_loss(loss, lcfg.variant)
    hyper = validate_hyper(loss, lcfg.variant, lcfg.hyper)
    m_per_rank, upm = micro_batches_per_rank(paired=ts.paired, per_device_batch=t.per_device_batch,
                                             grad_accum=t.grad_accum)
    policy = build_policy(cfg, seed=seed, device=device)
    torch.manual_seed(seed * 1009 + rank)  # dropout stream: per rank, from the seed only
    trainer = PolicyTrainer(
        policy, lr=lr, weight_decay=t.weight_decay, warmup_steps=warmup_steps(t.max_steps, t.warmup_frac),
        max_steps=t.max_steps, max_grad_norm=t.max_grad_norm, device=device, world_size=world,
        micro_per_step=m_per_rank, units_per_micro=upm, autocast=resolve_autocast(t.precision, torch.device(device)),
        deepspeed_stage=t.deepspeed.zero_stage if t.deepspeed.enabled else None)

    start, history = 0, []
    if resume_dir is not None:
        state = ck.load_resume_state(trainer, resume_dir, rank=rank)
        start, history = int(state["step"]), list(state["history"])[: int(state["step"])]
    publish = set(t.checkpoint_steps) | {t.max_steps}
    stop_after = config.get("stop_after")
    cdir = rundir.cell_dir(run, cid)
    status = {"state": "complete", "step": t.max_steps}

    for step in range(start, t.max_steps):
        s = step + 1
        _maybe_inject_fault(config.get("fault_crash_at_step"), s, cdir)
        t0, c0 = time.perf_counter(), time.process_time()
        mine = [collate(ts, idx) for idx in plan_step(
            ts, seed=seed, step=step, effective_batch=t.effective_batch, num_workers=world,
            per_device_batch=t.per_device_batch, grad_accum=t.grad_accum)[rank]]
        out = train_step(trainer, spec, hyper, mine, world=world)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        # CPU seconds too: on a shared box wall time measures the neighbours.
        row = {"step": s, **out, "tokens_per_s": out["tokens"] / dt, "step_time_s": dt, "step_cpu_s": cpu,
               "epoch": epoch_at(ts, step=s, effective_batch=t.effective_batch), **_peak_memory(device)}
        history.append(row)
        if rank == 0:
            telemetry.train_step(loss, s, float(out["loss"]), row["tokens_per_s"])
        bad = _non_finite(out)
        if bad:
            status = {"state": "failed", "step": s, "reason": "nan",
                      "message": f"cell {cid}: the {bad} at step {s} (loss={out['loss']}, grad_norm="
                                 f"{out['grad_norm']}); lower the learning rate ({lr:g}) or check the rollouts"}
            if rank == 0:
                ck.write_metrics(run, cid, history)
            report(row, None)
            break
        if s in publish:
            ck.publish_adapter(trainer, run, cid, s, rank=rank)
        stopping = stop_after is not None and s >= stop_after and s < t.max_steps
        want_state = s in publish or stopping or (t.resume_every and s % t.resume_every == 0)
        if rank == 0 and (want_state or s % METRICS_EVERY == 0):
            ck.write_metrics(run, cid, history)
        if want_state:
            with tempfile.TemporaryDirectory(prefix="wsg-resume-", ignore_cleanup_errors=True) as tmp:
                ck.save_resume_state(trainer, tmp, rank=rank, state={"step": s, "history": history,
                                                                     "fingerprint": config["fingerprint"]})
                report(row, tmp)
        else:
            report(row, None)
        if stopping:
            status = {"state": "stopped", "step": s}
            break
    if rank == 0:
        status["final"] = history[-1] if history else {}
        rundir.write_json(rundir.join(cdir, STATUS_FILE), status)
