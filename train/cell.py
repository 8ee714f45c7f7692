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

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from ..core import integrity, rundir
from ..core.cells import CellKey
from ..core.config import ExperimentConfig, config_hash
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..core.models import load_tokenizer
from ..core.session import remove_placement_groups, session
from ..rollouts.engine_rules import adapter_mode
from .checkpoint import ADAPTER_FILES
from .data import build_train_set
from .losses import get_loss, validate_hyper
from .online import prepare_prompts, validate_online
from .shared import run_here
from .task import CellTask, PromptSet, placement
from .worker import train_loop_per_worker

# Keys of train: that do not change a cell's trajectory (resume may change them).
_RUNTIME_TRAIN_KEYS = ("max_failures", "cpus_per_worker", "gpus_per_worker", "resume_every")


def validate_cell(cfg: ExperimentConfig, run: str, key: CellKey, *, tokenizer=None):
    """Refuse bad input before any worker starts; return the cell's data
    (a TrainSet or a PromptSet)."""

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
        return build_train_set(cfg, run, loss=key.loss, tokenizer=tokenizer)

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


def run_cell(cfg: ExperimentConfig, run: str | RunLayout, key: CellKey, *, resume: bool = True,
             stop_after: int | None = None, fault_crash_at: int | None = None, prepared: Prepared | None = None,
             shared: bool = False) -> dict:
    """Train one cell; returns its summary (also in `_COMPLETE`), or the
    stored summary with skipped=True when the cell is already complete.

    resume=False starts over, deleting the cell's resume state; stop_after
    stops resumably after that step (the cell is then not complete; call
    again to finish). prepared: the cell's data already built and validated
    (the grid's), else built here. A horizon control (key.horizon) trains
    with train.max_steps = key.horizon, its schedule ending there. shared: run the loop in this process, a
    grid worker that trains many cells in turn (train/shared.py); else a Ray
    Train worker group. Works standalone (starts a local Ray, and stops only
    that) and inside a Tune trial."""
    import ray

    t0 = time.time()
    layout = RunLayout.of(run)  # local runs made absolute
    cfg = cfg.for_horizon(key.horizon)
    cl = layout.cell(key.id)
    if integrity.revoke(cl.root, f"cell {key.id}", run=layout.root):
        return {**integrity.info(cl.root), "skipped": True}
    if fault_crash_at is None and os.environ.get("WSG_FAULT_CRASH_AT_STEP"):  # the fault-tolerance tests
        fault_crash_at = int(os.environ["WSG_FAULT_CRASH_AT_STEP"])
    if stop_after is not None and not 1 <= stop_after <= cfg.train.max_steps:
        raise WsgError(f"stop_after={stop_after} must lie in 1..train.max_steps={cfg.train.max_steps}")
    task = _task(cfg, layout, key, resume=resume, prepared=prepared, stop_after=stop_after,
                 fault_crash_at=fault_crash_at, shared=shared)
    t_fit = time.time()
    with session(cfg.resources.ray_address):
        if not isinstance(task.data, ray.ObjectRef):  # one copy in the object store, read by the worker
            task = dataclasses.replace(task, data=ray.put(task.data))
        if shared:
            run_here(task)
        else:
            _fit_worker_group(task)
    return _summarise(task, {"started": t0, "fit_started": t_fit, "fit_done": time.time()})


def _task(cfg: ExperimentConfig, layout: RunLayout, key: CellKey, *, resume: bool, prepared: Prepared | None,
          **kw) -> CellTask:
    """Validate the cell, fingerprint it (refusing to resume under another
    one) and write its spec: the one object its worker gets."""
    cl = layout.cell(key.id)
    spec = get_loss(key.loss, cfg.loss_cfg(key.loss).variant)
    data = None
    if prepared is None:
        data = validate_cell(cfg, layout.root, key)
    summary = prepared.summary if prepared is not None else data_summary(cfg, data)
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
    sync = adapter_mode(cfg.online.sync, gpus=cfg.online.engine_gpus, field="online.sync") if spec.online else None
    return CellTask(cfg=cfg, layout=layout, key=key, fingerprint=fingerprint,
                    data=prepared.ref if prepared is not None else data, online=spec.online,
                    placement=placement(cfg, online=spec.online), sync=sync,
                    rollouts_hash=None if spec.online else _rollouts_hash(layout), **kw)


def _fit_worker_group(task: CellTask) -> None:
    """The cell as a Ray Train run: a TorchTrainer whose workers run
    train/worker.py, its FailureConfig the retry policy."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    t, key = task.cfg.train, task.key
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"task": task},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=task.placement.use_gpu,
                                     resources_per_worker=task.placement.worker),
        run_config=RunConfig(name=key.id, storage_path=_storage(task.layout),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    try:
        trainer.fit()
    except TrainingFailedError as err:  # worker/controller errors after max_failures retries
        free_placement_group(task.layout.cell(key.id).placement_group)
        raise WsgError(_failure_message(key.id, err)) from err


def _summarise(task: CellTask, timeline: dict) -> dict:
    """The cell's summary from its status.json; a complete cell is marked
    complete and its resume state deleted."""
    cfg, key, layout, t = task.cfg, task.key, task.layout, task.cfg.train
    cl = layout.cell(key.id)
    if not rundir.exists(cl.status):
        raise WsgError(f"cell {key.id}: training ended without writing {cl.status}; rerun to resume")
    status = rundir.read_json(cl.status)
    if status["state"] == "failed":
        raise WsgError(status["message"])
    spec = get_loss(key.loss, cfg.loss_cfg(key.loss).variant)
    steps = sorted(s for s in set(t.checkpoint_steps) | {t.max_steps} if s <= status["step"])
    summary = {"cell_id": key.id, **key.as_dict(), "seed": key.seed, "variant": spec.variant,
               "online": spec.online, "state": status["state"], "step": status["step"], "max_steps": t.max_steps,
               "checkpoints": [layout.relative(cl.step(s)) for s in steps], "final": status.get("final", {}),
               "node_id": status.get("node_id"), "sync": task.sync, "num_workers": t.num_workers,
               "deepspeed_stage": t.deepspeed.zero_stage if t.deepspeed.enabled and not spec.online else None,
               "shared_worker": task.shared, "config_hash": config_hash(cfg),
               "wall_s": round(time.time() - timeline["started"], 3), "skipped": False,
               "timeline": {**timeline, **status.get("timeline", {})}}
    if status["state"] == "complete":
        # The marker vouches for the cell's adapters and tables (run-relative).
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
