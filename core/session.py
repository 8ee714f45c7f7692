"""The one way wsg becomes a Ray driver.

Every stage can run standalone (tests, `wsg eval`, a bench) or inside a
running pipeline (which already holds a Ray session, possibly on a cluster).
`connect` joins what this process already has, else the cluster named by
`address` (`auto`, `host:port`, `ray://…`), else starts a *new* local
instance: never silently the latest cluster started on this machine
(Ray's default for `ray.init()` without an address, which would put one
test's work on another's cluster).

A local instance declares `wsg_trial_slot`, the custom resource grid trial
drivers hold instead of CPU (sweep/grid.py), and starts the dashboard only
when asked (the CLI asks; standalone stages do not).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

TRIAL_SLOT = "wsg_trial_slot"
TRIAL_SLOTS = 1000
# Ray Train settings for short cells (docs/benchmarks.md, "Cell overhead"):
# every TorchTrainer fit would start a preemption-watcher actor (a process of
# its own, for spot-instance notices wsg does not act on), and the controller
# polls its workers every 2 s, which a cell of a few steps pays at its start
# and end. A cell whose resources are held by another (two online cells on a
# small box) waits for them: its worker group's start would otherwise time out
# every 60 s and retry, leaving up to a minute idle after they free up. Set in
# the environment of a local instance's processes; a cluster sets them in its
# start commands (cluster.yaml).
RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600"}


def connect(address: str | None = None, *, dashboard: bool = False, log_to_driver: bool = True) -> bool:
    """Make this process a Ray driver; True when this call started (or joined)
    Ray, so the caller owns the session and shuts it down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for k, v in RAY_TRAIN_ENV.items():
        os.environ.setdefault(k, v)
    if address and address != "local":
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=log_to_driver, resources={TRIAL_SLOT: TRIAL_SLOTS})
    return True


def dashboard_url() -> str | None:
    """host:port of the Ray dashboard of this process's session, if any."""
    try:
        from ray._private.worker import get_dashboard_url

        return get_dashboard_url() or None
    except Exception:  # noqa: BLE001 - only shown to the user
        return None


@contextlib.contextmanager
def session(address: str | None = None, *, dashboard: bool = False, log_to_driver: bool = True) -> Iterator[bool]:
    """`connect` for the length of a block; shuts down only what it started."""
    import ray

    started = connect(address, dashboard=dashboard, log_to_driver=log_to_driver)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def placement_groups() -> set[str]:
    """Ids (hex) of the placement groups Ray holds now (state CREATED or
    pending), or an empty set without a Ray session."""
    import ray

    if not ray.is_initialized():
        return set()
    from ray.util.placement_group import placement_group_table

    return {pid for pid, info in placement_group_table().items() if info.get("state") not in ("REMOVED", None)}


def remove_placement_groups(ids) -> int:
    """Remove these placement groups (hex ids) if Ray still holds them; the
    number removed. Ray Train leaves its worker group's group behind when its
    controller fails on an error it does not retry (an actor lost with a
    node); the group is owned by the driver's job and holds its CPUs until
    the driver exits."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    n = 0
    for pid in ids:
        try:
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pid)))
            if ray.is_initialized() and placement_group_table(pg).get("state") not in ("REMOVED", None):
                remove_placement_group(pg)
                n += 1
        except Exception:  # noqa: BLE001  (best effort: never fail a stage for the cleanup)
            continue
    return n

