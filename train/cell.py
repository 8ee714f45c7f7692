"""One training cell = one (loss, init seed, data seed, lr) Ray Train run,
offline or online alike (docs/training.md, "The cell").

`run_cell` is the single code path of `wsg train` and of every grid trial:

    validate → fingerprint → resume or start → fit → summarise → mark complete

Validation asks the loss registry what the loss trains on and builds that
data once on the driver: the tokenized rollouts (offline losses) or the
prompt set (online losses). The fit is a `TorchTrainer` (Train V2) whose
workers run train/worker.py; its run state (the one checkpoint/resume
format) lives in `<run>/train_state/<cell_id>`, and its FailureConfig is the
one retry policy: a worker or engine process that dies restarts the worker
group from the last registered checkpoint. A complete cell is skipped.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from wsg.sweep import integrity, rundir
from wsg.sweep.cells import CellKey
from wsg.sweep.config import ExperimentConfig, config_hash
from wsg.sweep.errors import WsgError
from wsg.sweep.layout import RunLayout
from wsg.train.losses import get_loss, validate_hyper
from wsg.train.task import CellTask, PromptSet, placement

# Keys of train: that do not change a cell's trajectory (resume may change them).
_RUNTIME_TRAIN_KEYS = ("max_failures", "cpus_per_worker", "gpus_per_worker", "resume_every")


def validate_cell(cfg: ExperimentConfig, run: str, key: CellKey, *, tokenizer=None):
    """Refuse bad input before any worker starts; return the cell's data
    (a TrainSet or a PromptSet)."""
    from wsg.sweep.models import load_tokenizer

    spec = get_loss(key.loss, cfg.loss_cfg(key.loss).variant)
    validate_hyper(key.loss, spec.variant, cfg.loss_cfg(key.loss).hyper)
    t = cfg.train
    bad = [s for s in t.checkpoint_steps if not 1 <= s <= t.max_steps]
    if bad:
        raise WsgError(f"train.checkpoint_steps {bad} lie beyond the last step (train.max_steps={t.max_steps}); "
                       "lower them or raise train.max_steps")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    if not spec.online:
        from wsg.train.data import build_train_set

        return build_train_set(cfg, run, loss=key.loss, tokenizer=tokenizer)
    from wsg.train.online import prepare_prompts, validate_online

    prompts = prepare_prompts(cfg, tokenizer)
    validate_online(cfg, prompts)
    return prompts


@dataclass(frozen=True)
class Prepared:
    """A cell's data built and validated once, in the object store: the grid
    builds one per loss before any trial starts and every cell of that loss
    uses it (its trials skip the rebuild)."""

    ref: Any          # ObjectRef of the TrainSet or PromptSet
    summary: dict     # data_summary() of it (the fingerprint's data part)


def data_summary(cfg: ExperimentConfig, data) -> dict:
    """What of the cell's data fixes its trajectory."""
    if isinstance(data, PromptSet):
        return {"data": cfg.data.model_dump(mode="json"),
                "online": cfg.online.model_dump(mode="json", exclude={"sync", "colocate", "engine_cpus",
                                                                      "engine_gpus"}),
                "engine": {"dtype": cfg.rollouts.dtype, "seed": cfg.rollouts.seed}}
    return {"data": {"items": int(len(data.items)), "tokens": int(len(data.tokens)), **data.stats}}


def prepare(cfg: ExperimentConfig, run: str, key: CellKey) -> Prepared:
    """validate_cell, with the data put in the object store (a Ray session must be up)."""
    import ray

    data = validate_cell(cfg, run, key)
    return Prepared(ray.put(data), data_summary(cfg, data))


def _fingerprint(cfg: ExperimentConfig, key: CellKey, summary: dict) -> dict:
    """What fixes a cell's trajectory: resuming under a different one is refused."""
    train = cfg.train.model_dump(mode="json")
    for k in _RUNTIME_TRAIN_KEYS:
        train.pop(k)
    return {"cell": key.as_dict(), "model": cfg.model.model_dump(mode="json"), "train": train,
            "loss_cfg": cfg.loss_cfg(key.loss).model_dump(mode="json", exclude={"lrs", "lr_scale"}), **summary}


def _delete(uri: str) -> None:
    if rundir.exists(uri):
        fs, path = rundir.resolve(uri)
        info = fs.get_file_info(path)
        fs.delete_dir(path) if info.type.name == "Directory" else fs.delete_file(path)


def _failure_message(cid: str, err: Exception) -> str:
    failures = getattr(err, "worker_failures", None) or {}
    lines = [f"  rank {r}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
             for r, e in sorted(failures.items())]
    detail = "\n".join(lines) if lines else f"  {type(err).__name__}: {err}"
    return (f"cell {cid}: training failed after train.max_failures retries:\n{detail}\n"
            "rerun the same command to resume from its last checkpoint")


def run_cell(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float, init_seed: int | None = None,
             data_seed: int | None = None, resume: bool = True, stop_after: int | None = None,
             fault_crash_at: int | None = None, prepared: Prepared | None = None) -> dict:
    """Train one cell; returns its summary (also in `_COMPLETE`), or the
    stored summary with skipped=True when the cell is already complete.

    seed: the grid seed (LoRA init and data order); init_seed / data_seed
    override one of them (control cells). resume=False starts over,
    deleting the cell's resume state; stop_after stops resumably after that
    step (the cell is then not complete; call again to finish). prepared:
    the cell's data already built and validated (the grid's), else built
    here. Works standalone (starts a local Ray, and stops only that) and
    inside a Tune trial."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from wsg.sweep.session import session
    from wsg.train.worker import train_loop_per_worker

    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise WsgError(f"learning rate must be a finite number > 0, got lr={lr!r}")
    t0 = time.time()
    key = CellKey.of(loss, seed, lr, init_seed=init_seed, data_seed=data_seed)
    layout = RunLayout.of(run)  # local runs made absolute: workers run in another working directory
    cl = layout.cell(key.id)
    if integrity.revoke(cl.root, f"cell {key.id}", run=layout.root):
        return {**integrity.info(cl.root), "skipped": True}
    t = cfg.train
    if fault_crash_at is None and os.environ.get("WSG_FAULT_CRASH_AT_STEP"):  # the fault-tolerance tests
        fault_crash_at = int(os.environ["WSG_FAULT_CRASH_AT_STEP"])
    if stop_after is not None and not 1 <= stop_after <= t.max_steps:
        raise WsgError(f"stop_after={stop_after} must lie in 1..train.max_steps={t.max_steps}")
    spec = get_loss(key.loss, cfg.loss_cfg(key.loss).variant)
    data = None
    if prepared is None:
        data = validate_cell(cfg, layout.root, key)
        summary = data_summary(cfg, data)
    else:
        summary = prepared.summary
    fingerprint = _fingerprint(cfg, key, summary)
    if not resume:
        _delete(layout.train_state(key.id))
    elif rundir.exists(cl.fingerprint) and rundir.read_json(cl.fingerprint) != fingerprint:
        raise WsgError(f"cell {key.id} was started under a different training config or data ({cl.fingerprint}); "
                       "resuming would mix two runs: restore the old config, or start the cell over "
                       "(resume=False / delete its folder)")
    rundir.write_json(cl.fingerprint, fingerprint)
    rundir.write_json(cl.spec, {**key.as_dict(), "id": key.id, "variant": spec.variant, "online": spec.online})
    _delete(cl.status)
    place = placement(cfg, online=spec.online)
    sync = None
    if spec.online:
        from wsg.rollouts.engine_rules import adapter_mode

        sync = adapter_mode(cfg.online.sync, gpus=cfg.online.engine_gpus, field="online.sync")

    t_fit = time.time()
    with session(cfg.resources.ray_address):
        task = CellTask(cfg=cfg, run=layout.root, key=key, fingerprint=fingerprint,
                        data=prepared.ref if prepared is not None else ray.put(data),
                        online=spec.online, placement=place, sync=sync, stop_after=stop_after,
                        fault_crash_at=fault_crash_at, rollouts_hash=None if spec.online else _rollouts_hash(layout))
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"task": task},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=place.use_gpu,
                                         resources_per_worker=place.worker),
            run_config=RunConfig(name=key.id, storage_path=_storage(layout),
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        try:
            trainer.fit()
        except TrainingFailedError as err:  # worker/controller errors after max_failures retries
            free_placement_group(cl.placement_group)
            raise WsgError(_failure_message(key.id, err)) from err
    t_done = time.time()

    if not rundir.exists(cl.status):
        raise WsgError(f"cell {key.id}: training ended without writing {cl.status}; rerun to resume")
    status = rundir.read_json(cl.status)
    if status["state"] == "failed":
        raise WsgError(status["message"])
    steps = sorted(s for s in set(t.checkpoint_steps) | {t.max_steps} if s <= status["step"])
    summary = {"cell_id": key.id, **key.as_dict(), "seed": key.seed, "variant": spec.variant,
               "online": spec.online, "state": status["state"], "step": status["step"], "max_steps": t.max_steps,
               "checkpoints": [layout.relative(cl.step(s)) for s in steps], "final": status.get("final", {}),
               "node_id": status.get("node_id"), "sync": sync, "num_workers": t.num_workers,
               "deepspeed_stage": t.deepspeed.zero_stage if t.deepspeed.enabled and not spec.online else None,
               "config_hash": config_hash(cfg), "wall_s": round(time.time() - t0, 3), "skipped": False,
               "timeline": {"started": t0, "fit_started": t_fit, "fit_done": t_done, **status.get("timeline", {})}}
    if status["state"] == "complete":
        # The marker vouches for the cell's adapters and tables (run-relative).
        from wsg.train.checkpoint import ADAPTER_FILES

        vouched = [cl.metrics, cl.spec, cl.fingerprint] + [rundir.join(cl.step(s), f) for s in steps
                                                            for f in ADAPTER_FILES]
        rundir.mark_complete(cl.root, summary, files=vouched, root=layout.root)
        _delete(layout.train_state(key.id))  # resume state is useless once the cell is whole
    return summary


def free_placement_group(record: str) -> bool:
    """Remove the placement group named in a cell's placement_group.json if
    Ray still holds it (Ray Train leaves it behind when its controller fails
    on an error it does not retry; the group then keeps its CPUs, and a cell
    that needs them, e.g. an online cell's two on one node, waits). The grid
    also frees, when it ends, every group it made that is still held (for a
    run that failed before its worker wrote the record). True if removed."""
    from wsg.sweep.session import remove_placement_groups

    if not rundir.exists(record):
        return False
    return remove_placement_groups([rundir.read_json(record)["id"]]) == 1


def _rollouts_hash(layout: RunLayout) -> str | None:
    """The spec hash of the rollouts the cell trains on (its adapters' cards name it)."""
    if not rundir.exists(layout.rollouts_complete):
        return None
    return rundir.read_json(layout.rollouts_complete).get("spec_hash")


def _storage(layout: RunLayout) -> str:
    """Ray Train's storage_path: a plain path for local runs, the URI otherwise."""
    uri = layout.train_state_dir
    return rundir.resolve(uri)[1] if rundir.is_local(uri) else uri
