"""Where the grid's processes may sit on a Ray cluster, and what it says when
a cell cannot be placed (docs/cluster.md, "Trial drivers and capacity").

Three rules, so that a grid never hangs in silence:

- A trial driver (one per running cell, sweep/grid.py) holds no CPU or GPU a
  cell needs. It holds the custom `wsg_trial_slot` resource where the cluster
  declares it (a local Ray that wsg starts, cluster.yaml's head); on a cluster
  without it, a sliver of Ray's built-in head-node resource
  (`node:__internal_head__`, which every Ray head carries), so drivers run on
  the head with 0 CPU. Before, such a driver held 0.01 CPU wherever Ray put
  it: on a 2-CPU worker it left 1.99 CPUs, and an online cell's 2-CPU bundle
  stayed PENDING forever.
- A cell whose bundles no node of the cluster can ever hold (the alive nodes,
  and the node types an autoscaler reports it may add) fails before the grid
  starts, naming the cell, what it asks for and the largest node.
- A cell that waits for resources longer than WAIT_S says so on the console,
  naming the cell and the pending demand (`GroupWait`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

from ..core import console, rundir
from ..core.errors import WsgError
from ..core.session import TRIAL_SLOT

HEAD = "node:__internal_head__"  # Ray's resource of the head node (1.0 on it, absent elsewhere)
HEAD_SLICE = 0.001               # what one trial driver holds of it: 1000 drivers at once
# Seconds a cell may wait for its resources before the console says so (and
# again at each further multiple). WSG_WAIT_WARN_S overrides (the tests).
WAIT_S = 300.0
_BUNDLE_KEYS = ("CPU", "GPU")


def wait_warn_s() -> float:
    v = os.environ.get("WSG_WAIT_WARN_S")
    return float(v) if v else WAIT_S


def trial_driver_resources() -> dict[str, float]:
    """What a trial's driver function holds: nothing its cell needs. (Tune
    refuses `{"CPU": 0}` alone as an empty bundle: the driver holds a custom
    resource instead.)"""
    import ray

    total = ray.cluster_resources()
    if total.get(TRIAL_SLOT, 0) >= 1:
        return {"CPU": 0, TRIAL_SLOT: 1}
    if total.get(HEAD, 0) > 0:
        console.say(f"wsg: the Ray cluster declares no {TRIAL_SLOT!r} resource: trial drivers run on the head "
                    "node and hold no CPU (declare it on a node to put them there, e.g. "
                    f"`ray start --resources='{{\"{TRIAL_SLOT}\": 1000}}'`)")
        return {"CPU": 0, HEAD: HEAD_SLICE}
    raise WsgError(f"the Ray cluster declares neither {TRIAL_SLOT!r} nor a head node resource ({HEAD!r}): "
                   "grid trial drivers would take CPUs a cell needs; declare the resource on one node, e.g. "
                   f"`ray start ... --resources='{{\"{TRIAL_SLOT}\": 1000}}'`")


# --- what nodes the cluster has, or may get -------------------------------------
def node_shapes() -> list[tuple[str, dict[str, float], int]]:
    """(label, total resources, how many such nodes) of every alive node, and
    of every node type an autoscaler may add (count -1: unbounded)."""
    import ray

    out = []
    for n in ray.nodes():
        if n.get("Alive"):
            res = n.get("Resources", {})
            label = (f"node {n.get('NodeManagerAddress', '?')} {n.get('NodeID', '')[:8]}"
                     + (" (head)" if res.get(HEAD) else ""))
            out.append((label, dict(res), 1))
    return out + _autoscaler_types()


def _autoscaler_types() -> list[tuple[str, dict[str, float], int]]:
    """The node types of the cluster config an autoscaler reports to Ray
    (KubeRay, autoscaler v2); none otherwise."""
    out = []
    with contextlib.suppress(Exception):  # private API: without it, none
        from ray._private.state import state

        cfg = state.get_cluster_config()
        for g in (cfg.node_group_configs if cfg is not None else []):
            if g.max_count != 0:
                out.append((f"node type {g.name!r} (autoscaler, up to {g.max_count})", dict(g.resources),
                            int(g.max_count)))
    return out


def fixed_cluster() -> bool:
    """True when no node will be added: Ray's autoscaler runs read-only (a
    local Ray, or nodes made by `ray start`), which it reports as one node
    type per alive node, named `node_<its id>`. False when an autoscaler
    with real node types runs (`ray up`), or Ray does not say."""
    with contextlib.suppress(Exception):
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
        types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
        return bool(types) and all(v == f"node_{k}" for k, v in types.items())
    return False


def _copies(bundle: dict[str, float], res: dict[str, float]) -> int:
    """How many copies of the bundle fit in the resources (a large number
    when the bundle asks for nothing)."""
    asks = [(k, v) for k, v in bundle.items() if v > 0]
    if not asks:
        return 1 << 30
    return min(int(math.floor(res.get(k, 0.0) / v + 1e-9)) for k, v in asks)


def _fmt(res: dict[str, float]) -> str:
    keys = [k for k in _BUNDLE_KEYS if k in res] + sorted(k for k in res if k not in _BUNDLE_KEYS
                                                           and not k.startswith(("node:", "memory", "object_store")))
    return "{" + ", ".join(f"{k}: {res[k]:g}" for k in keys) + "}"


def largest(shapes) -> str:
    """The node with the most CPUs (then GPUs), as a line."""
    if not shapes:
        return "no alive node"
    label, res, _ = max(shapes, key=lambda s: (s[1].get("CPU", 0.0), s[1].get("GPU", 0.0)))
    return f"{label} {_fmt({k: res.get(k, 0.0) for k in _BUNDLE_KEYS})}"


def unplaceable(demands: dict[str, tuple[dict, int, dict | None]], shapes) -> list[str]:
    """Lines for the cells no node can ever hold. demands: cell id -> (worker
    bundle, number of workers, engine actor's resources or None). The worker
    bundles form one PACK placement group (spread over nodes if need be); the
    engine (a GPU engine) is an actor of its own."""
    bad = []
    for cid, (bundle, n, engine) in demands.items():
        room = sum(_copies(bundle, res) * (count if count > 0 else 1 << 20) for _, res, count in shapes)
        ok_engine = engine is None or any(_copies(engine, res) >= 1 for _, res, _ in shapes)
        if room >= n and ok_engine:
            continue
        what = f"{_fmt(bundle)} per Ray Train worker x {n}" + (f" + an engine {_fmt(engine)}" if engine else "")
        bad.append(f"  {cid}: asks for {what}; the largest node is {largest(shapes)}")
    return bad


def check_cells_fit(demands: dict[str, tuple[dict, int, dict | None]]) -> None:
    """Refuse, before any cell starts, cells that no node can ever hold. On a
    cluster that an autoscaler may grow with node types Ray does not report
    (`ray up`'s v1 autoscaler) nothing is refused: a cell that waits is told
    on the console instead (GroupWait)."""
    shapes = node_shapes()
    if not fixed_cluster() and not _autoscaler_types():
        return
    bad = unplaceable(demands, shapes)
    if bad:
        raise WsgError(f"{len(bad)} cell(s) ask for more than any node of the Ray cluster can ever provide "
                       "(they would wait forever):\n" + "\n".join(bad) + "\nlower train.cpus_per_worker / "
                       "train.gpus_per_worker / online.engine_cpus / online.engine_gpus or train.num_workers, "
                       "or add a node that large")


# --- a cell that waits ----------------------------------------------------------
def pending_groups(ignore: set[str]) -> dict[str, dict]:
    """Placement groups Ray holds PENDING (or RESCHEDULING), but those in
    `ignore`: id -> {bundles, strategy, scheduling_state}."""
    import ray
    from ray.util.placement_group import placement_group_table

    if not ray.is_initialized():
        return {}
    return {pid: info for pid, info in placement_group_table().items()
            if pid not in ignore and info.get("state") in ("PENDING", "RESCHEDULING")}


def _free_per_node() -> str:
    """What each alive node has free now, as a line ('' if Ray cannot say)."""
    import ray

    with contextlib.suppress(Exception):  # private API: the caller falls back to the cluster's sum
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
        parts = []
        for n in ray.nodes():
            if n.get("Alive") and n["NodeID"] in free:
                avail = free[n["NodeID"]]
                parts.append(f"node {n['NodeID'][:8]}{' (head)' if n['Resources'].get(HEAD) else ''} "
                             f"{_fmt({k: avail.get(k, 0.0) for k in _BUNDLE_KEYS})}")
        return ", ".join(parts)
    return ""


def _mtime(uri: str):
    with contextlib.suppress(Exception):
        fs, path = rundir.resolve(uri)
        info = fs.get_file_info(path)
        return info.mtime if info.type.name == "File" else None
    return None


class GroupWait(console.Watcher):
    """While the grid runs: a placement group of this grid that stays
    pending longer than `wait_s` gets a console line naming the cells that
    wait and what they ask for, then one again at each further multiple of
    wait_s. A cell waits when it started (cell.json rewritten) but has no
    worker yet (placement_group.json not rewritten since) and is not training
    either (progress.json not rewritten: a cell in a shared worker trains in
    its trial's own process and writes no placement group). When no started
    cell waits, the pending group is a trial's own: the next cell of
    `cell_ids` (the grid's start order) not yet started is named."""

    def __init__(self, layout, cell_ids: list[str], ignore: set[str], *, wait_s: float | None = None,
                 poll_s: float = 5.0):
        self.layout, self.ids, self.ignore = layout, list(cell_ids), set(ignore)
        self.wait_s = wait_s if wait_s is not None else wait_warn_s()
        super().__init__("wsg-group-wait", min(poll_s, self.wait_s / 2))
        self._seen: dict[str, float] = {}   # pending group id -> first seen
        self._told: dict[str, int] = {}     # group id -> multiples of wait_s told
        self._start_marks = {c: self._marks(c) for c in self.ids}
        self.lines: list[str] = []          # what was said (tests read it)

    def _marks(self, cid: str):
        cl = self.layout.cell(cid)
        return _mtime(cl.spec), _mtime(cl.placement_group), _mtime(cl.progress)

    def waiting_cells(self) -> list[str]:
        out, unstarted = [], []
        for cid in self.ids:
            cl = self.layout.cell(cid)
            spec, pg, prog = self._marks(cid)
            spec0, pg0, prog0 = self._start_marks[cid]
            if rundir.is_complete(cl.root) or rundir.exists(cl.failed):
                continue
            started = spec is not None and spec != spec0
            has_worker = pg is not None and pg != pg0 and (spec is None or pg >= spec)
            training = prog is not None and prog != prog0
            if not started:
                unstarted.append(cid)
            elif not has_worker and not training:
                out.append(cid)
        return out or [f"{c} (next to start)" for c in unstarted[:1]]

    def check(self, now: float | None = None) -> list[str]:
        """One poll: the lines to say now (also said and kept in self.lines)."""
        now = time.time() if now is None else now
        pending = pending_groups(self.ignore)
        for pid in list(self._seen):
            if pid not in pending:
                self._seen.pop(pid)
                self._told.pop(pid, None)
        due = []
        for pid, info in pending.items():
            first = self._seen.setdefault(pid, now)
            k = int((now - first) // self.wait_s)
            if k >= 1 and k > self._told.get(pid, 0):
                self._told[pid] = k
                due.append((pid, info, now - first))
        if not due:
            return []
        import ray

        cells = ", ".join(self.waiting_cells()) or "(a cell of this grid)"
        free = _free_per_node() or _fmt({k: v for k, v in ray.available_resources().items() if k in _BUNDLE_KEYS})
        lines = []
        for pid, info, waited in due:
            bundles = list((info.get("bundles") or {}).values())
            ask = " + ".join(_fmt(b) for b in bundles) or "?"
            state = (info.get("stats") or {}).get("scheduling_state", "")
            lines.append(f"wsg: cell {cells} has waited {waited:.0f} s for its resources: a placement group of "
                         f"{ask} ({info.get('strategy', '?')}{', ' + state if state else ''}); free in the "
                         f"cluster now: {free}; largest node: {largest(node_shapes())}")
        for line in lines:
            console.say(line)
        self.lines.extend(lines)
        return lines

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with contextlib.suppress(Exception):  # a watcher never fails the grid
                self.check()
