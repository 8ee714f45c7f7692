"""One offline training cell = one (loss, seed, lr) Ray Train run.

`run_cell` is the single code path of both `wsg train` (one cell) and the
grid (each Tune trial calls it): validate everything on the driver, build
the tokenized TrainSet once and hand it to the workers through the object
store, fit a `TorchTrainer` (Train V2) whose run state lives in
`<run>/train_state/<cell_id>`, then mark `<run>/cells/<cell_id>/` complete.
A second call resumes from the latest Ray Train checkpoint of that cell;
a complete cell is skipped.
"""
from __future__ import annotations

import math
import os
import time

from sweep import rundir
from sweep.config import OFFLINE_LOSSES, ONLINE_LOSSES, ExperimentConfig, config_hash
from sweep.errors import WsgError
from train.cell_id import cell_id as make_cell_id
from train.worker import STATUS_FILE

FINGERPRINT_FILE = "fingerprint.json"


def validate_cell(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float, tokenizer=None):
    """Refuse bad input before any worker starts; return the cell's TrainSet."""
    from sweep.models import load_tokenizer
    from train.data import build_train_set
    from train.losses import get_loss, validate_hyper

    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise WsgError(f"learning rate must be a finite number > 0, got lr={lr!r}")
    if loss in ONLINE_LOSSES:
        raise WsgError(f"{loss} is an online loss: its cells run with train.online, not train.cell")
    if loss not in OFFLINE_LOSSES:
        raise WsgError(f"unknown offline loss {loss!r}; valid: {', '.join(OFFLINE_LOSSES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise WsgError(f"seed must be an integer, got {seed!r}")
    t = cfg.train
    bad = [s for s in t.checkpoint_steps if not 1 <= s <= t.max_steps]
    if bad:
        raise WsgError(f"train.checkpoint_steps {bad} lie beyond the last step (train.max_steps={t.max_steps}); "
                       "lower them or raise train.max_steps")
    got = t.per_device_batch * t.grad_accum * t.num_workers
    if got != t.effective_batch:
        raise WsgError(f"train.effective_batch={t.effective_batch} but per_device_batch x grad_accum x num_workers "
                       f"= {t.per_device_batch} x {t.grad_accum} x {t.num_workers} = {got}; make them agree")
    lcfg = cfg.loss_cfg(loss)
    get_loss(loss, lcfg.variant)
    validate_hyper(loss, lcfg.variant, lcfg.hyper)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    return build_train_set(cfg, run, loss=loss, tokenizer=tokenizer)


def _fingerprint(cfg: ExperimentConfig, *, loss: str, seed: int, lr: float, ts) -> dict:
    """What fixes a cell's trajectory: resuming under a different one is refused."""
    train = cfg.train.model_dump(mode="json")
    for k in ("max_failures", "cpus_per_worker", "gpus_per_worker", "resume_every"):
        train.pop(k)
    return {"loss": loss, "seed": seed, "lr": lr, "model": cfg.model.model_dump(mode="json"), "train": train,
            "loss_cfg": cfg.loss_cfg(loss).model_dump(mode="json", exclude={"lrs", "lr_scale"}),
            "data": {"items": int(len(ts.items)), "tokens": int(len(ts.tokens)), **ts.stats}}


def _delete(uri: str) -> None:
    if rundir.exists(uri):
        fs, path = rundir.resolve(uri)
        info = fs.get_file_info(path)
        fs.delete_dir(path) if info.type.name == "Directory" else fs.delete_file(path)


def _storage(run: str) -> str:
    uri = rundir.join(run, "train_state")
    return rundir.resolve(uri)[1] if rundir.is_local(uri) else uri


def _ensure_ray(cfg: ExperimentConfig) -> bool:
    """Start a local Ray (or join cfg.resources.ray_address) unless the caller
    already has one; True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=cfg.resources.ray_address, include_dashboard=False, log_to_driver=True)
    return True


def _failure_message(cid: str, err: Exception) -> str:
    failures = getattr(err, "worker_failures", None) or {}
    lines = [f"  rank {r}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
             for r, e in sorted(failures.items())]
    detail = "\n".join(lines) if lines else f"  {type(err).__name__}: {err}"
    return (f"cell {cid}: training failed after train.max_failures retries:\n{detail}\n"
            "rerun the same command to resume from its last checkpoint")


def run_cell(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float, resume: bool = True,
             stop_after: int | None = None) -> dict:
    """Train one offline cell; returns its summary (also in `_COMPLETE`).

    resume: continue from the cell's last Ray Train checkpoint (False starts
    over, deleting that state). stop_after: train up to this step now and
    stop resumably (the cell is then not complete; call again to finish).
    Works standalone (starts a local Ray if none is up, and stops only that
    one) and inside a Ray Tune function trainable."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from train.worker import train_loop_per_worker

    if rundir.is_local(run):  # Ray Train workers run in another working directory
        run = rundir.resolve(run)[1]
    cid = make_cell_id(loss, seed, lr)
    cdir = rundir.cell_dir(run, cid)
    if rundir.is_complete(cdir):
        return {**rundir.read_json(rundir.join(cdir, rundir.COMPLETE_MARKER)), "skipped": True}
    ts = validate_cell(cfg, run, loss=loss, seed=seed, lr=lr)
    if stop_after is not None and not 1 <= stop_after <= cfg.train.max_steps:
        raise WsgError(f"stop_after={stop_after} must lie in 1..train.max_steps={cfg.train.max_steps}")
    t = cfg.train
    storage = _storage(run)
    fingerprint = _fingerprint(cfg, loss=loss, seed=seed, lr=lr, ts=ts)
    fp_uri = rundir.join(cdir, FINGERPRINT_FILE)
    if not resume:
        _delete(rundir.join(run, "train_state", cid))
    elif rundir.exists(fp_uri) and rundir.read_json(fp_uri) != fingerprint:
        raise WsgError(f"cell {cid} was started under a different training config or data ({fp_uri}); "
                       "resuming would mix two runs: restore the old config, or start the cell over "
                       "(resume=False / delete its folder)")
    rundir.write_json(fp_uri, fingerprint)
    _delete(rundir.join(cdir, STATUS_FILE))

    started = _ensure_ray(cfg)
    t0 = time.time()
    try:
        use_gpu = t.gpus_per_worker > 0
        resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "run": run, "cell_id": cid, "loss": loss,
                               "seed": seed, "lr": float(lr), "data": ray.put(ts), "use_gpu": use_gpu,
                               "cpus_per_worker": t.cpus_per_worker, "stop_after": stop_after,
                               "fingerprint": fingerprint,
                               # fault-tolerance tests only (train/worker.py)
                               "fault_crash_at_step": os.environ.get("WSG_FAULT_CRASH_AT_STEP")},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=cid, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        try:
            trainer.fit()
        except TrainingFailedError as err:  # worker/controller errors after max_failures retries
            raise WsgError(_failure_message(cid, err)) from err
    finally:
        if started:
            ray.shutdown()

    status_uri = rundir.join(cdir, STATUS_FILE)
    if not rundir.exists(status_uri):
        raise WsgError(f"cell {cid}: training ended without writing {status_uri}; rerun to resume")
    status = rundir.read_json(status_uri)
    if status["state"] == "failed":
        raise WsgError(status["message"])
    steps = sorted(s for s in set(t.checkpoint_steps) | {t.max_steps} if s <= status["step"])
    summary = {"cell_id": cid, "loss": loss, "variant": cfg.loss_cfg(loss).variant, "seed": seed, "lr": float(lr),
               "state": status["state"], "step": status["step"], "max_steps": t.max_steps,
               "checkpoints": [rundir.step_dir(run, cid, s) for s in steps], "final": status.get("final", {}),
               "data": fingerprint["data"], "num_workers": t.num_workers,
               "deepspeed_stage": t.deepspeed.zero_stage if t.deepspeed.enabled else None,
               "config_hash": config_hash(cfg), "wall_s": round(time.time() - t0, 3), "skipped": False}
    if status["state"] == "complete":
        rundir.mark_complete(cdir, summary)
    return summary
